//! 100 000 entries on one node (issue 13: the sync snapshot used to be one gRPC message, and an
//! agent whose node held over about 33 000 entries never became ready). The real `sigil-server`
//! gets 100 000 entries under the node alias through the batch API; a real `sigil-agent` attested
//! under that alias must sync them all (in pages) and serve this process its SVID, which the
//! `spiffe` crate's client fetches. On SQLite and on a fresh Postgres database; the times are
//! printed, the targets live in `bench-agents` and docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sigil_proto::admin::BatchCreateEntriesRequest;
use sigil_proto::common;
use sigil_tests::steps::metric;
use sigil_tests::{AgentProcess, NODE_ALIAS, PATIENCE, ServerProcess, postgres, this_uid_selector};

const ENTRIES: usize = 100_000;
const WEB: &str = "spiffe://example.org/scale/web";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_100_000_entries_syncs_and_serves_on_sqlite() -> anyhow::Result<()> {
    hundred_thousand_entries(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_100_000_entries_syncs_and_serves_on_postgres() -> anyhow::Result<()> {
    let Some(database) = postgres::fresh_database("sync_scale_e2e").await? else {
        return Ok(());
    };
    hundred_thousand_entries(Some(&database.url)).await
}

async fn hundred_thousand_entries(datastore_url: Option<&str>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), datastore_url, "")?;
    let token = server.join_token(NODE_ALIAS)?;
    let mut admin = sigil_server::api::admin::connect(&server.socket).await?;
    let this_uid = this_uid_selector()?;
    let entry = |n: usize| {
        let (spiffe_id, selector) = if n == 0 {
            (WEB.to_string(), this_uid.clone())
        } else {
            (
                format!("spiffe://example.org/scale/w{n}"),
                format!("unix:uid:{}", 2_000_000 + n),
            )
        };
        let (kind, value) = selector.split_once(':').unwrap_or_default();
        common::Entry {
            spiffe_id,
            parent_id: NODE_ALIAS.into(),
            selectors: vec![common::Selector {
                r#type: kind.into(),
                value: value.into(),
            }],
            ..common::Entry::default()
        }
    };
    let created_at = Instant::now();
    for start in (0..ENTRIES).step_by(1000) {
        let entries = (start..start + 1000).map(entry).collect();
        let results = admin
            .batch_create_entries(BatchCreateEntriesRequest { entries })
            .await?
            .into_inner()
            .results;
        ensure!(
            results.iter().all(|r| r.code == 0),
            "batch at {start}: {:?}",
            results.iter().find(|r| r.code != 0)
        );
    }
    eprintln!("{ENTRIES} entries created in {:?}", created_at.elapsed());

    let bundle = dir.path().join("bundle.pem");
    server.write_trust(&bundle)?;
    let started = Instant::now();
    let agent = AgentProcess::start(
        &dir.path().join("agent"),
        &server,
        &bundle,
        Some(&token),
        "",
    )?;
    let client = agent.workload_client().await?;
    let deadline = Instant::now() + PATIENCE;
    let served = loop {
        match client.fetch_x509_svid().await {
            Ok(svid) if svid.spiffe_id().to_string() == WEB => break started.elapsed(),
            Ok(other) => anyhow::bail!("served {} instead of {WEB}", other.spiffe_id()),
            // Not synced yet: the agent answers only once the whole snapshot is in.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("the agent never served the workload"),
        }
    };
    eprintln!("agent start to the workload's SVID with {ENTRIES} entries on the node: {served:?}");
    let held = metric(&agent.health, "sigil_agent_entries")?;
    ensure!(
        held == ENTRIES as f64,
        "the agent holds {held} entries, not {ENTRIES}"
    );
    Ok(())
}

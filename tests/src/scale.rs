//! Many entries on one node, for the scale test and `bench-entries`: entries under
//! [`NODE_ALIAS`] written through the batch admin API, the first for this
//! process's uid (so the test can fetch its SVID), the rest for uids nobody has.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::ensure;
use sigil_proto::admin::BatchCreateEntriesRequest;
use sigil_proto::common;

use crate::{AgentProcess, NODE_ALIAS, PATIENCE, ServerProcess, this_uid_selector};

/// The SPIFFE ID of the one entry this process matches.
pub const SCALE_WORKLOAD: &str = "spiffe://example.org/scale/web";

/// Entries per batch call (the admin API's limit).
const BATCH: usize = 1000;

/// Creates `count` entries under the node alias through `BatchCreateEntries` from `callers`
/// concurrent clients of the admin socket `socket`; returns how long it took.
pub async fn create_node_entries(
    socket: &Path,
    count: usize,
    callers: usize,
) -> anyhow::Result<Duration> {
    let this_uid = this_uid_selector()?;
    let started = Instant::now();
    let batches: Vec<std::ops::Range<usize>> = (0..count)
        .step_by(BATCH)
        .map(|start| start..(start + BATCH).min(count))
        .collect();
    let per_caller = batches.len().div_ceil(callers.max(1)).max(1);
    let mut calls = Vec::new();
    for share in batches.chunks(per_caller) {
        let share = share.to_vec();
        let this_uid = this_uid.clone();
        let mut admin = sigil_server::api::admin::connect(socket).await?;
        calls.push(tokio::spawn(async move {
            for range in share {
                let entries = range.clone().map(|n| node_entry(n, &this_uid)).collect();
                let results = admin
                    .batch_create_entries(BatchCreateEntriesRequest { entries })
                    .await?
                    .into_inner()
                    .results;
                ensure!(
                    results.iter().all(|r| r.code == 0),
                    "batch at {}: {:?}",
                    range.start,
                    results.iter().find(|r| r.code != 0)
                );
            }
            anyhow::Ok(())
        }));
    }
    for call in calls {
        call.await??;
    }
    Ok(started.elapsed())
}

/// Entry `n`: the first selects this process, the others uids nobody has.
fn node_entry(n: usize, this_uid: &str) -> common::Entry {
    let (spiffe_id, value) = if n == 0 {
        (
            SCALE_WORKLOAD.to_string(),
            this_uid.trim_start_matches("unix:").to_string(),
        )
    } else {
        (
            format!("spiffe://example.org/scale/w{n}"),
            format!("uid:{}", 2_000_000 + n),
        )
    };
    common::Entry {
        spiffe_id,
        parent_id: NODE_ALIAS.into(),
        selectors: vec![common::Selector {
            r#type: "unix".into(),
            value,
        }],
        ..common::Entry::default()
    }
}

/// Waits until the agent whose Workload API is `client` serves [`SCALE_WORKLOAD`] (it answers
/// only once its whole snapshot is in), at most `patience`.
async fn wait_served(client: &spiffe::WorkloadApiClient, patience: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match client.fetch_x509_svid().await {
            Ok(svid) if svid.spiffe_id().to_string() == SCALE_WORKLOAD => return Ok(()),
            Ok(other) => anyhow::bail!("served {} instead of {SCALE_WORKLOAD}", other.spiffe_id()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => anyhow::bail!("the agent never served {SCALE_WORKLOAD}: {e}"),
        }
    }
}

/// Starts a real agent in `dir` attested with `join_token` against `server`, and waits until it
/// serves [`SCALE_WORKLOAD`]; returns it and the time from its start to that first answer.
pub async fn start_agent_until_served(
    dir: &Path,
    server: &ServerProcess,
    join_token: &str,
) -> anyhow::Result<(AgentProcess, Duration)> {
    let bundle = dir.join("bundle.pem");
    server.write_trust(&bundle)?;
    let started = Instant::now();
    let agent = AgentProcess::start(&dir.join("agent"), server, &bundle, Some(join_token), "")?;
    let client = agent.workload_client().await?;
    wait_served(&client, PATIENCE).await?;
    Ok((agent, started.elapsed()))
}

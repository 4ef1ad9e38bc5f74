//! 100 000 entries on one node (issue 13: the sync snapshot used to be one gRPC message, and an
//! agent whose node held over about 33 000 entries never became ready). The real `sigil-server`
//! gets 100 000 entries under the node alias through the batch API; a real `sigil-agent` attested
//! under that alias must sync them all (in pages) and serve this process its SVID, which the
//! `spiffe` crate's client fetches. On SQLite and on a fresh Postgres database; the times are
//! printed, the targets live in `bench-agents` and docs/PERFORMANCE.md.

use anyhow::ensure;
use sigil_tests::scale::{create_node_entries, start_agent_until_served};
use sigil_tests::steps::metric;
use sigil_tests::{NODE_ALIAS, ServerProcess, postgres};

const ENTRIES: usize = 100_000;

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
    // Four concurrent callers, as automation runs: on Postgres their batches take change-feed ids
    // when they insert and commit out of order, and the server's feed once lost a whole batch
    // that committed after a later one had been read (the workload's entry among it).
    let created = create_node_entries(&server.socket, ENTRIES, 4).await?;
    eprintln!("{ENTRIES} entries created in {created:?}");

    let (agent, served) = start_agent_until_served(dir.path(), &server, &token).await?;
    eprintln!("agent start to the workload's SVID with {ENTRIES} entries on the node: {served:?}");
    let held = metric(&agent.health, "sigil_agent_entries")?;
    ensure!(
        held == ENTRIES as f64,
        "the agent holds {held} entries, not {ENTRIES}"
    );
    Ok(())
}

//! Entries at scale (issue 13), on SQLite and Postgres, against the real `sigil-server` and
//! `sigil-agent`: 100 000 entries created through `BatchCreateEntries` (target under 20 s), read
//! back page by page and counted, the server's resident memory per entry, and a fresh agent whose
//! node holds them all, from its start to serving its workload (target under 5 s).
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-entries
//! ```

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use sigil_proto::admin::{CountEntriesRequest, ListEntriesRequest};
use sigil_tests::bench::procfs::rss_kib;
use sigil_tests::scale::{create_node_entries, start_agent_until_served};
use sigil_tests::{NODE_ALIAS, ServerProcess, postgres};

#[derive(Debug, Parser)]
#[command(about = "Entry creation through the batch API, paged reads, and an agent syncing them")]
struct Args {
    /// Which datastores to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    datastores: Vec<String>,
    /// Entries created under one node alias.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Concurrent batch callers.
    #[arg(long, default_value_t = 4)]
    callers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "| datastore | entries | create s | entries/s | list all s | count ms | server RSS empty / full MiB | KiB per entry | agent ready s | agent RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for datastore in &args.datastores {
        let Some(database) = postgres::bench_datastore(datastore, "bench-entries").await? else {
            continue;
        };
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(&dir.path().join("server"), database.url(), "")?;
        let pid = server.pid().context("server pid")?;
        let token = server.join_token(NODE_ALIAS)?;
        let empty_rss = rss_kib(pid)?;
        let created = create_node_entries(&server.socket, args.entries, args.callers).await?;
        let full_rss = rss_kib(pid)?;

        let mut admin = sigil_server::api::admin::connect(&server.socket).await?;
        let listed_at = Instant::now();
        let mut listed = 0;
        let mut page_token = String::new();
        loop {
            let page = admin
                .list_entries(ListEntriesRequest {
                    page_size: 5000,
                    page_token,
                    ..ListEntriesRequest::default()
                })
                .await?
                .into_inner();
            listed += page.entries.len();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let list_time = listed_at.elapsed();
        let counted_at = Instant::now();
        let count = admin
            .count_entries(CountEntriesRequest::default())
            .await?
            .into_inner()
            .count;
        let count_time = counted_at.elapsed();
        anyhow::ensure!(
            listed as u64 == count && count as usize > args.entries,
            "listed {listed}, counted {count}"
        );

        let (agent, ready) = start_agent_until_served(dir.path(), &server, &token).await?;
        let agent_rss = rss_kib(agent.pid().context("agent pid")?)?;
        println!(
            "| {datastore} | {} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} / {:.1} | {:.2} | {:.2} | {:.1} |",
            args.entries,
            created.as_secs_f64(),
            args.entries as f64 / created.as_secs_f64(),
            list_time.as_secs_f64(),
            count_time.as_secs_f64() * 1000.0,
            empty_rss as f64 / 1024.0,
            full_rss as f64 / 1024.0,
            full_rss.saturating_sub(empty_rss) as f64 / args.entries as f64,
            ready.as_secs_f64(),
            agent_rss as f64 / 1024.0,
        );
    }
    Ok(())
}

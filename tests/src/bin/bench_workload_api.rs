//! Workload API latency with 1, 100 and 1000 concurrent streams, the time from creating an entry
//! to a waiting workload receiving it, and the agent's resident memory with 1000 cached SVIDs.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-workload-api
//! ```
//!
//! The server and the agent are the real binaries; the workloads are Workload API clients in this
//! process (one HTTP/2 connection per 100 streams, as many processes would open).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use sigil_proto::admin::CreateEntryRequest;
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::common;
use sigil_tests::bench::procfs::status_kib;
use sigil_tests::bench::report::LatencyMs;
use sigil_tests::{AgentProcess, NODE_ALIAS, Node};
use sigil_workload_api::client::WorkloadClient;

#[derive(Debug, Parser)]
#[command(about = "Workload API latency, entry delivery time and agent memory")]
struct Args {
    /// Concurrent stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    streams: Vec<usize>,
    /// Entries created one by one while a workload waits, for the delivery times.
    #[arg(long, default_value_t = 200)]
    deliveries: usize,
    /// SVIDs cached before the agent's memory is read.
    #[arg(long, default_value_t = 1000)]
    cached: usize,
}

/// The server's admin API, over its socket.
type AdminClient = AdminApiClient<tonic::transport::Channel>;

fn entry(spiffe_id: String, selector: &str) -> CreateEntryRequest {
    CreateEntryRequest {
        entry: Some(common::Entry {
            spiffe_id,
            parent_id: NODE_ALIAS.into(),
            selectors: vec![common::Selector {
                r#type: "unix".into(),
                value: selector.into(),
            }],
            ..common::Entry::default()
        }),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uid_selector = format!("uid:{}", sigil_tests::current_uid()?);
    let node = Node::for_this_uid(&[("spiffe://example.org/bench", &[])])?;
    let agent = &node.agent;
    let mut admin = sigil_server::api::admin::connect(&node.server.socket).await?;

    // The first fetch signs the SVID; every later stream is served from the cache.
    let started = Instant::now();
    WorkloadClient::connect(&agent.socket)
        .await?
        .fetch_x509()
        .await?;
    println!(
        "first X509SVIDResponse after agent start (includes signing): {:?}",
        started.elapsed()
    );
    let pid = agent.pid().context("agent pid")?;
    println!(
        "fresh agent with one SVID: VmRSS {} KiB, RssAnon {} KiB",
        status_kib(pid, "VmRSS")?,
        status_kib(pid, "RssAnon")?
    );
    println!();
    println!("| concurrent streams | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for &count in &args.streams {
        report_concurrent_streams(&agent.socket, count).await?;
    }
    report_deliveries(&agent.socket, &mut admin, &uid_selector, args.deliveries).await?;
    report_cached_memory(agent, &mut admin, &uid_selector, &args).await
}

/// Opens `count` streams at once (one connection per 100) and prints the latencies of their
/// first responses as a table row.
async fn report_concurrent_streams(socket: &Path, count: usize) -> anyhow::Result<()> {
    let connections = count.div_ceil(100);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(WorkloadClient::connect(socket).await?);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let mut client = clients[n % connections].clone();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let mut stream = client.watch_x509().await?;
            let first = stream.message().await?.context("stream ended")?;
            let elapsed = started.elapsed();
            ensure!(first.svids.len() == 1, "one SVID");
            // Keep the stream open until every stream has its first message.
            Ok::<_, anyhow::Error>((elapsed, stream))
        });
    }
    let mut latencies = Vec::with_capacity(count);
    let mut open = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        let (elapsed, stream) = done??;
        latencies.push(elapsed);
        open.push(stream);
    }
    let figures = LatencyMs::of(&mut latencies);
    println!(
        "| {count} | {:.2} ms | {:.2} ms | {:.2} ms |",
        figures.p50, figures.p99, figures.max
    );
    Ok(())
}

/// Creates `count` entries for this uid one by one (admin API) and prints how long each took
/// to reach a waiting stream.
async fn report_deliveries(
    socket: &Path,
    admin: &mut AdminClient,
    uid_selector: &str,
    count: usize,
) -> anyhow::Result<()> {
    let mut watcher = WorkloadClient::connect(socket).await?;
    let mut stream = watcher.watch_x509().await?;
    stream.message().await?.context("first message")?;
    let mut deliveries = Vec::with_capacity(count);
    for n in 0..count {
        let spiffe_id = format!("spiffe://example.org/delivery/{n}");
        let started = Instant::now();
        admin
            .create_entry(entry(spiffe_id.clone(), uid_selector))
            .await?;
        loop {
            let update = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await??
                .context("stream ended")?;
            if update.svids.iter().any(|s| s.spiffe_id == spiffe_id) {
                break;
            }
        }
        deliveries.push(started.elapsed());
    }
    drop(stream);
    let figures = LatencyMs::of(&mut deliveries);
    println!();
    println!(
        "entry create -> workload delivery over {} entries: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        deliveries.len(),
        figures.p50,
        figures.p99,
        figures.max
    );
    Ok(())
}

/// Prints the agent's resident memory (all of it, and the anonymous part: heap rather than the
/// binary's file-backed pages) with `args.cached` SVIDs, after the concurrent streams of the
/// earlier steps were served and closed: entries for this uid, fetched once so each is signed and
/// cached (the entries of the earlier steps count).
async fn report_cached_memory(
    agent: &AgentProcess,
    admin: &mut AdminClient,
    uid_selector: &str,
    args: &Args,
) -> anyhow::Result<()> {
    let pid = agent.pid().context("agent pid")?;
    let before = status_kib(pid, "VmRSS")?;
    let before_anon = status_kib(pid, "RssAnon")?;
    let existing = 1 + args.deliveries;
    for n in existing..args.cached.max(existing) {
        admin
            .create_entry(entry(
                format!("spiffe://example.org/cached/{n}"),
                uid_selector,
            ))
            .await?;
    }
    let mut client = WorkloadClient::connect(&agent.socket).await?;
    let started = Instant::now();
    let mut updates = client.watch_x509().await?;
    let response = loop {
        let response = updates.message().await?.context("stream ended")?;
        if response.svids.len() >= args.cached {
            break response;
        }
    };
    let signing = started.elapsed();
    let after = status_kib(pid, "VmRSS")?;
    let after_anon = status_kib(pid, "RssAnon")?;
    let peak = status_kib(pid, "VmHWM")?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!(
        "agent memory after the streams above: VmRSS {:.1} MiB (RssAnon {:.1}); with {} cached SVIDs: VmRSS {:.1} MiB (RssAnon {:.1}), peak VmHWM {:.1} MiB ({:.1} KiB per SVID); fetching all of them took {signing:?}",
        mib(before),
        mib(before_anon),
        response.svids.len(),
        mib(after),
        mib(after_anon),
        mib(peak),
        (after.saturating_sub(before)) as f64 / response.svids.len() as f64
    );
    Ok(())
}

//! High availability in figures (issue 12): three real servers on one private Postgres and an
//! agent that knows all three. Measures cross-server propagation (an entry created on server B
//! to the SVID at a workload whose agent syncs with server A), the agent's failover after
//! `kill -9` of its server (to a sync stream on another), the resync after every server was down
//! and returns, and then runs `bench-signing` for the signing rate with durable issuance records
//! against the raw rate.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-ha
//! ```
//!
//! A sync stream counts as open when the agent holds a TCP connection to a server and that
//! server's `sigil_server_agents_connected` gauge counts it (see `sigil_tests::ha::topology`);
//! both are polled every 10 ms, which bounds the resolution of the failover and resync figures.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use sigil_proto::admin::CreateEntryRequest;
use sigil_proto::common;
use sigil_tests::bench::parse_duration;
use sigil_tests::bench::report::LatencyMs;
use sigil_tests::ha::{Cluster, TRUST_DOMAIN, node_alias};
use sigil_workload_api::client::WorkloadClient;

#[derive(Debug, Parser)]
#[command(about = "Cross-server propagation, agent failover and resync, durable signing rate")]
struct Args {
    /// Entries created on one server while a workload on another server's agent waits.
    #[arg(long, default_value_t = 200)]
    propagation_samples: usize,
    /// Rounds of `kill -9` of the agent's server.
    #[arg(long, default_value_t = 10)]
    failover_rounds: usize,
    /// Rounds of every server down and back.
    #[arg(long, default_value_t = 3)]
    resync_rounds: usize,
    /// How long every server stays down in a resync round (long enough for the agent's
    /// reconnect backoff to reach its ceiling).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    outage: Duration,
    /// Skip running `bench-signing` at the end.
    #[arg(long)]
    skip_signing: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::start("bench-ha", 3, 1)
        .await?
        .context("bench-ha needs the Postgres server binaries")?;
    println!("| measurement | samples | p50 | p99 | max | target |");
    println!("|---|---|---|---|---|---|");
    let mut propagation = propagation(&cluster, args.propagation_samples).await?;
    row(
        "entry on server B to SVID at a workload on A's agent",
        &mut propagation,
        "p99 < 100 ms",
    );
    let mut failover = failover(&mut cluster, args.failover_rounds).await?;
    row(
        "agent failover after kill -9 of its server",
        &mut failover,
        "< 2 s",
    );
    let mut resync = resync(&mut cluster, args.resync_rounds, args.outage).await?;
    row(
        &format!("resync after every server was down {:?}", args.outage),
        &mut resync,
        "< 5 s",
    );
    cluster.check_entries(Duration::from_secs(10)).await?;
    let records = cluster.check_records(Duration::from_secs(20)).await?;
    println!(
        "\nafterwards: no entry lost on any server; every SVID the workload polled was recorded ({records:?} after the last round)"
    );
    drop(cluster);
    if !args.skip_signing {
        signing()?;
    }
    Ok(())
}

/// Prints one table row of `samples`.
fn row(what: &str, samples: &mut [Duration], target: &str) {
    let count = samples.len();
    let figures = LatencyMs::of(samples);
    println!(
        "| {what} | {count} | {:.1} ms | {:.1} ms | {:.1} ms | {target} |",
        figures.p50, figures.p99, figures.max
    );
}

/// Creates `samples` entries one by one on a server the agent does not sync with (admin API),
/// each timed until a waiting Workload API stream holds its SVID.
async fn propagation(cluster: &Cluster, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let synced = cluster.connected_server(0)?;
    let other = (synced + 1) % cluster.servers.len();
    let mut admin = sigil_server::api::admin::connect(&cluster.servers[other].socket).await?;
    let mut client = WorkloadClient::connect(&cluster.agents[0].socket).await?;
    let mut stream = client.watch_x509().await?;
    stream.message().await?.context("no first message")?;
    let uid = format!("uid:{}", sigil_tests::current_uid()?);
    let mut times = Vec::with_capacity(samples);
    for n in 0..samples {
        let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/propagation/{n}");
        let request = CreateEntryRequest {
            entry: Some(common::Entry {
                spiffe_id: spiffe_id.clone(),
                parent_id: node_alias(0),
                selectors: vec![common::Selector {
                    r#type: "unix".into(),
                    value: uid.clone(),
                }],
                // Long-lived, so a hundred entries do not keep the agent renewing meanwhile.
                x509_svid_ttl: 3600,
                ..common::Entry::default()
            }),
        };
        let started = Instant::now();
        admin.create_entry(request).await?;
        loop {
            let update = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .with_context(|| format!("{spiffe_id} did not arrive within 10 s"))??
                .context("the stream ended")?;
            if update.svids.iter().any(|s| s.spiffe_id == spiffe_id) {
                break;
            }
        }
        times.push(started.elapsed());
    }
    ensure!(
        cluster.connected_server(0)? == synced,
        "the agent changed servers during the propagation runs"
    );
    Ok(times)
}

/// `rounds` times: kill -9 the agent's server, time until the agent's sync stream is open on
/// another, start the killed one again.
async fn failover(cluster: &mut Cluster, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let victim = cluster.connected_server(0)?;
        let killed = Instant::now();
        cluster.servers[victim].crash()?;
        let (_, synced) = cluster
            .wait_synced(0, Some(victim), Duration::from_secs(30))
            .await?;
        times.push(synced - killed);
        cluster.servers[victim].restart_stopped()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(times)
}

/// `rounds` times: kill -9 every server, wait `outage`, start them all again at once, time until
/// the agent's sync stream is open again.
async fn resync(
    cluster: &mut Cluster,
    rounds: usize,
    outage: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        for server in &mut cluster.servers {
            server.crash()?;
        }
        tokio::time::sleep(outage).await;
        let back = cluster.restart_stopped_servers()?;
        let synced = cluster.wait_all_synced(Duration::from_secs(30)).await?;
        times.push(synced.saturating_duration_since(back));
        // Let the fast SVIDs be renewed before the next outage, so none expires in it.
        cluster.wait_served(0, Duration::from_secs(30)).await?;
    }
    Ok(times)
}

/// Runs `bench-signing` (built beside this binary) on SQLite and the machine's Postgres: the
/// signing rate with the issuance records written before each batch is answered, against the
/// raw rate of one core.
fn signing() -> anyhow::Result<()> {
    println!();
    println!("bench-signing (durable issuance records), on this machine's shared Postgres:");
    let status = std::process::Command::new(sigil_tests::binary("bench-signing")?).status()?;
    ensure!(status.success(), "bench-signing failed: {status}");
    Ok(())
}

//! The mTLS forwarder against stunnel, HAProxy and Envoy: the same mutual-TLS path built with
//! each, measured in one run with the same client, the same backend and the same certificates.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-forwarder
//! ```
//!
//! The path, for every peer:
//!
//! ```text
//! client ──plain──▶ [outbound proxy] ──mTLS──▶ [inbound proxy] ──plain──▶ backend
//! ```
//!
//! Each peer runs two processes (as on two nodes): an outbound one that takes plaintext on
//! loopback and originates mTLS with the client SVID, verifying the server's chain, and an inbound
//! one that terminates mTLS with the server SVID, requires and verifies the client's certificate,
//! and forwards plaintext to the backend. The client and the backend live in this process (tokio):
//! the client speaks plain TCP, so no TLS code of this crate is on the measured path and every
//! byte of TLS is done by the peers themselves. "direct" is the client talking to the backend with
//! no proxy, the baseline for added latency.
//!
//! The certificates are the same for all: the real server and agent issue a client and a server
//! SVID to this uid (24 h TTL); `sigil-agent api fetch x509 --write` writes them to files for
//! stunnel, HAProxy and Envoy, and the forwarder takes the very same SVIDs (the agent caches one
//! per entry) over the Workload API. Every peer does a full handshake for every connection: the
//! forwarder never resumes sessions (see docs/forwarder.md), so resumption is turned off on the
//! client side of the others too. Envoy reads its certificate files from disk like stunnel and
//! HAProxy (not SDS), and both its sides are set to TLS 1.3, which the others negotiate by
//! default (Envoy's upstream default is TLS 1.2); ciphers and groups stay at each one's defaults.
//!
//! Measured per peer: bulk throughput client -> backend on 1 and on 64 connections (bytes counted
//! at the backend), new connections per second (connect, one byte there and back, close: one full
//! mTLS handshake each), round-trip time of a small request over a kept connection (p50/p99,
//! compared with direct TCP), and the resident memory of each proxy process before and after
//! opening N idle connections (`VmRSS` in `/proc/<pid>/status`). The proxies' CPU time during each
//! measurement comes from `/proc/<pid>/stat`, and the CPU that other processes of the machine took
//! from /proc/stat, so a window disturbed by a build next door shows as such.
//!
//! The peers are measured in rounds (3 by default), each round in a rotated order, and the table
//! gives the median of each figure over the rounds: on a small shared machine one window can be
//! unlucky, and the order should not favour anyone.

use std::time::{Duration, Instant};

use clap::Parser;
use sigil_tests::Node;
use sigil_tests::bench::load::{self, Backend, Load, backend};
use sigil_tests::bench::parse_duration;
use sigil_tests::bench::peers::{self, CLIENT_ID, Certificates, Peer, SERVER_ID, certificates};
use sigil_tests::bench::procfs::{Ticks, wait_for_quiet};
use sigil_tests::bench::report::{MIB, Outcome, table};

#[derive(Debug, Parser)]
#[command(about = "The Sigil mTLS forwarder against stunnel, HAProxy and Envoy on the same path")]
struct Args {
    /// Which set-ups to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,sigil,stunnel,haproxy,envoy"
    )]
    peers: Vec<Peer>,
    /// How hard and how long each measurement drives a peer.
    #[command(flatten)]
    load: Load,
    /// Rounds over all peers (peers interleaved, so each meets the same machine); the table
    /// shows the median of each figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Before each peer, wait at most this long for other processes to leave the cores alone.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    quiet_wait: Duration,
}

/// Measures `peer` once: memory of idle connections, round trips, bulk, new connections.
async fn measure(
    peer: Peer,
    node: &Node,
    certs: &Certificates,
    backend: &Backend,
    load: &Load,
) -> anyhow::Result<Option<Outcome>> {
    let dir = node.dir.path().join(format!("{peer:?}").to_lowercase());
    std::fs::create_dir_all(&dir)?;
    let Some(running) = peers::start(peer, node, certs, backend.port, &dir).await? else {
        return Ok(None);
    };
    let mut outcome = Outcome {
        version: running.version.clone(),
        ..Outcome::default()
    };
    println!("{}: {}", peer.label(), outcome.version);
    if !running.pids.is_empty() {
        // First, on fresh processes: afterwards the bulk tests' buffers would be reused.
        outcome.memory = load::idle_memory(backend, &running, load).await?;
        for (role, before, after) in &outcome.memory {
            println!(
                "  {role} RSS {:.1} MiB -> {:.1} MiB with {} idle connections: {:.1} KiB each",
                *before as f64 / 1024.0,
                *after as f64 / 1024.0,
                load.idle,
                after.saturating_sub(*before) as f64 / load.idle as f64
            );
        }
    }
    let (ticks, started) = (Ticks::now(&running.proxy_pids()), Instant::now());
    let (p50, p99) = load::latency(&running, load).await?;
    outcome.others = ticks
        .rate(&running.proxy_pids(), 0.0, started.elapsed())
        .others;
    println!(
        "  round trip of {} bytes, kept connection: p50 {p50:.2?}, p99 {p99:.2?}",
        load.request_size
    );
    outcome.latency = Some((p50, p99));
    let one = load::bulk(backend, &running, 1, load).await?;
    println!(
        "  bulk, 1 connection: {:.0} MiB/s (proxies used {:.2} cores, other processes {:.2})",
        one.per_second / MIB,
        one.cores,
        one.others
    );
    outcome.bulk_one = Some(one);
    let many = load::bulk(backend, &running, load.streams, load).await?;
    println!(
        "  bulk, {} connections: {:.0} MiB/s (proxies used {:.2} cores, other processes {:.2})",
        load.streams,
        many.per_second / MIB,
        many.cores,
        many.others
    );
    outcome.bulk_many = Some(many);
    let (rate, failures) = load::connection_rate(backend, &running, load).await?;
    println!(
        "  new connections: {:.0}/s, {failures} failed (proxies used {:.2} cores, other processes {:.2})",
        rate.per_second, rate.cores, rate.others
    );
    outcome.connections = Some(rate);
    outcome.others = [one.others, many.others, rate.others]
        .into_iter()
        .fold(outcome.others, f64::max);
    outcome.connection_failures = failures;
    if let Some(admin) = running.envoy_admin {
        let stats = peers::envoy_tls_stats(admin);
        println!("  Envoy inbound TLS: {stats}");
        outcome.notes.push(stats);
    }
    Ok(Some(outcome))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let ttl: &[&str] = &["--x509-svid-ttl", "24h"];
    let node =
        tokio::task::block_in_place(|| Node::for_this_uid(&[(CLIENT_ID, ttl), (SERVER_ID, ttl)]))?;
    let certs = tokio::task::block_in_place(|| certificates(&node))?;
    let backend = backend().await?;
    println!(
        "path: client -> outbound proxy -> mTLS -> inbound proxy -> backend; {} round(s); windows of {:?} after {:?} warm-up; {} idle connections",
        args.rounds, args.load.duration, args.load.warmup, args.load.idle
    );
    let mut results: Vec<(Peer, Vec<Outcome>)> =
        args.peers.iter().map(|peer| (*peer, Vec::new())).collect();
    for round in 1..=args.rounds {
        println!("\nround {round} of {}", args.rounds);
        // Rotated each round, so no peer always follows the same neighbour or runs first.
        let count = results.len();
        for index in 0..count {
            let Some((peer, outcomes)) = results.get_mut((index + round - 1) % count) else {
                continue;
            };
            // A peer that was not installed in round 1 is not looked for again.
            if round > 1 && outcomes.is_empty() {
                continue;
            }
            wait_for_quiet(args.quiet_wait).await;
            match measure(*peer, &node, &certs, &backend, &args.load).await {
                Ok(Some(outcome)) => outcomes.push(outcome),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("{} failed: {e:#}", peer.label());
                    return Err(e);
                }
            }
        }
    }
    println!("\n{}", table(&results, args.rounds, &args.load));
    println!(
        "cores: CPU time of both proxy processes over the window (the benchmark's own client and backend share the same cores); others: the most CPU any other process of the machine took in one of that peer's windows"
    );
    println!("total time {:.0?}", started.elapsed());
    Ok(())
}

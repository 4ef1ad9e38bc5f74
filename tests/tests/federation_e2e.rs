//! Two trust domains, `a.test` and `b.test`, each with its own real server and agent, federated
//! through their bundle endpoints (profile `https_spiffe`). A workload of A and a workload of B
//! do mTLS with each other through openssl `s_server`/`s_client`, using the files
//! `sigil-agent api fetch x509 --write` gives them. The endpoint serves the SPIFFE bundle format
//! (checked with curl), and a refresh that fails keeps the last good bundle.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use sigil_tests::federation::{Domain, federate};
use sigil_tests::svid::SvidFiles;
use sigil_tests::tools::openssl_identity;
use sigil_tests::{AgentProcess, ServerProcess, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_and_do_mtls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Domain::start(dir.path(), "a.test", "web", "b.test", "")?;
    let mut b = Domain::start(dir.path(), "b.test", "db", "a.test", "")?;
    federate(&a, &b, "b.test")?;
    federate(&b, &a, "a.test")?;
    a_fetches_bs_bundle_over_bs_endpoint(&a, &b)?;
    the_endpoint_speaks_the_spiffe_bundle_format(&a)?;

    // Each workload receives the other domain's bundle beside its own.
    let files_a = write_files(&a.agent, &dir.path().join("files-a"), "b.test")?;
    let files_b = write_files(&b.agent, &dir.path().join("files-b"), "a.test")?;
    let json = a.agent.cli_json(&["api", "fetch", "x509"])?;
    ensure!(
        json["federated_trust_domains"] == serde_json::json!(["spiffe://b.test"]),
        "{json}"
    );

    a_jwt_svid_of_b_validates_at_a(&a, &b)?;
    mtls_works_through_the_federated_bundles(&files_a, &files_b)?;
    refreshes_refuse_an_impostor_and_keep_the_last_good_bundle(&a, &mut b)
}

/// A fetches B's bundle over B's endpoint, authenticating it with the bundle it was given.
fn a_fetches_bs_bundle_over_bs_endpoint(a: &Domain, b: &Domain) -> anyhow::Result<()> {
    let fetched = a
        .server
        .cli(&["federation", "refresh", "--trust-domain", "b.test"])?;
    ensure!(
        fetched == b.server.cli(&["bundle", "show"])?,
        "A holds B's bundle"
    );
    let listed = a.server.cli_json(&["federation", "list"])?;
    ensure!(
        listed["relationships"][0]["last_error"] == ""
            && listed["relationships"][0]["last_success_at"].as_i64() > Some(0),
        "{listed}"
    );
    Ok(())
}

/// The endpoint speaks the SPIFFE bundle format to a client nobody here wrote.
fn the_endpoint_speaks_the_spiffe_bundle_format(a: &Domain) -> anyhow::Result<()> {
    let served = Command::new("curl")
        .args(["-sk", &format!("https://127.0.0.1:{}/", a.endpoint_port)])
        .output()?;
    let served: serde_json::Value = serde_json::from_slice(&served.stdout)
        .with_context(|| String::from_utf8_lossy(&served.stderr).into_owned())?;
    ensure!(
        served["spiffe_sequence"].as_u64() > Some(0) && served["spiffe_refresh_hint"] == 1,
        "{served}"
    );
    let keys = served["keys"].as_array().context("keys")?;
    ensure!(
        keys.iter()
            .any(|k| k["use"] == "x509-svid" && k["x5c"].is_array())
            && keys
                .iter()
                .any(|k| k["use"] == "jwt-svid" && k["kid"].is_string()),
        "{served}"
    );
    Ok(())
}

/// A JWT-SVID of B's workload validates at A's agent, through B's federated JWT keys.
fn a_jwt_svid_of_b_validates_at_a(a: &Domain, b: &Domain) -> anyhow::Result<()> {
    let token = b.agent.cli_jwt("a-service")?;
    let checked = a.agent.cli_validate_jwt("a-service", &token)?;
    ensure!(checked.contains("spiffe://b.test/db"), "{checked}");
    Ok(())
}

/// mTLS: B's workload serves, A's connects; each verifies the other with the federated bundle,
/// each side's certificate names its own domain's workload, and without the federated bundle the
/// same certificate is refused: trust comes from federation.
fn mtls_works_through_the_federated_bundles(
    files_a: &SvidFiles,
    files_b: &SvidFiles,
) -> anyhow::Result<()> {
    let port = free_port()?;
    let accept = port.to_string();
    let mut server = openssl(
        &["s_server", "-accept", &accept, "-naccept", "1"],
        &["-Verify", "1", "-verify_return_error"],
        files_b,
    )
    .spawn()?;
    let printed = printed_lines(&mut server);
    let mut server_text = String::new();
    while !server_text.contains("ACCEPT") {
        let line = printed
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("openssl s_server did not start:\n{server_text}"))?;
        server_text.push_str(&line);
        server_text.push('\n');
    }
    let connect = format!("127.0.0.1:{port}");
    let client = openssl(
        &["s_client", "-connect", &connect],
        &["-verify_return_error", "-brief"],
        files_a,
    )
    .output()?;
    let _ = server.wait();
    server_text.extend(printed.iter().map(|line| line + "\n"));
    let client_text = format!(
        "{}{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );
    ensure!(
        client_text.contains("Verification: OK"),
        "A's workload did not verify B's:\n{client_text}\nserver:\n{server_text}"
    );
    ensure!(
        server_text.contains("verify return:1") && !server_text.contains("verify error"),
        "B's workload did not verify A's certificate:\n{server_text}"
    );
    ensure!(
        uri_san(&files_a.cert)?.contains("spiffe://a.test/web")
            && uri_san(&files_b.cert)?.contains("spiffe://b.test/db"),
        "identities"
    );
    let own_bundle = files_a.cert.with_file_name("bundle.0.pem");
    let untrusted = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(own_bundle)
        .arg(&files_b.cert)
        .output()?;
    ensure!(
        !untrusted.status.success(),
        "A's own bundle must not trust B"
    );
    Ok(())
}

/// `openssl <command> <options>` presenting `svid` and verifying the peer with its bundle, every
/// stream piped so the test reads what openssl says about the handshake.
fn openssl(command: &[&str], options: &[&str], svid: &SvidFiles) -> Command {
    let mut openssl = Command::new("openssl");
    openssl
        .args(command)
        .args(options)
        .args(openssl_identity(&svid.cert, &svid.key, &svid.bundle))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    openssl
}

/// Every line `child` prints, from both of its streams, as they come (s_server says ACCEPT once
/// it listens, and its verdict on the client once it exits).
fn printed_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let (lines, printed) = std::sync::mpsc::channel::<String>();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
    for stream in [stdout, stderr].into_iter().flatten() {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
    }
    printed
}

/// An https_spiffe endpoint that does not present the configured ID is refused; so is a refresh
/// while B is down, with the reason, and the last good bundle stays.
fn refreshes_refuse_an_impostor_and_keep_the_last_good_bundle(
    a: &Domain,
    b: &mut Domain,
) -> anyhow::Result<()> {
    a.server.cli(&[
        "federation",
        "update",
        "--trust-domain",
        "b.test",
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{}/", b.endpoint_port),
        "--endpoint-spiffe-id",
        "spiffe://b.test/impostor",
    ])?;
    let refresh = ["federation", "refresh", "--trust-domain", "b.test"];
    let refused = a.server.cli_error(&refresh)?;
    ensure!(refused.contains("TLS"), "{refused}");

    b.agent.stop()?;
    b.server.stop()?;
    let refused = a.server.cli_error(&refresh)?;
    ensure!(refused.contains("cannot connect"), "{refused}");
    ensure!(
        a.server
            .cli(&["bundle", "show", "--trust-domain", "b.test"])?
            .contains("BEGIN CERTIFICATE"),
        "the last good bundle is kept"
    );
    Ok(())
}

/// `federation create` for `trust_domain` at `url`, its endpoint presenting `endpoint_id`, with
/// `extra` flags.
fn federation_create<'a>(
    trust_domain: &'a str,
    url: &'a str,
    endpoint_id: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let relationship = [
        "federation",
        "create",
        "--trust-domain",
        trust_domain,
        "--bundle-endpoint-url",
        url,
        "--endpoint-spiffe-id",
        endpoint_id,
    ];
    [&relationship[..], extra].concat()
}

/// `bundle set` of the SPIFFE bundle at `path` for `trust_domain`.
fn bundle_set<'a>(trust_domain: &'a str, path: &'a Path) -> anyhow::Result<[&'a str; 6]> {
    let path = path.to_str().context("path")?;
    Ok([
        "bundle",
        "set",
        "--trust-domain",
        trust_domain,
        "--path",
        path,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_relationships_and_bundles_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = ServerProcess::start_in_domain(&dir.path().join("a"), "a.test", "", None, &[])?;
    let own_json = a.cli(&["bundle", "show", "--format", "spiffe"])?;
    let own_path = dir.path().join("a.json");
    std::fs::write(&own_path, &own_json)?;

    let refusals: [(Vec<&str>, &str); 5] = [
        (
            federation_create("a.test", "https://a.test/", "spiffe://a.test/x", &[]),
            "own trust domain",
        ),
        (
            federation_create("b.test", "http://b.test/", "spiffe://b.test/x", &[]),
            "https://",
        ),
        (
            federation_create("b.test", "https://b.test/", "spiffe://b.test/x", &[]),
            "none is stored",
        ),
        (
            federation_create(
                "b.test",
                "https://b.test/",
                "spiffe://b.test/x",
                &["--profile", "https_web"],
            ),
            "only an https_spiffe endpoint",
        ),
        // A's own bundle presented as another domain's: its CA names spiffe://a.test.
        (
            bundle_set("c.test", &own_path)?.to_vec(),
            "another trust domain",
        ),
    ];
    for (args, reason) in refusals {
        let error = a.cli_error(&args)?;
        ensure!(error.contains(reason), "{args:?}: {error}");
    }
    ensure!(
        a.cli_json(&["bundle", "list"])?["bundles"]
            .as_array()
            .is_some_and(|b| b.len() == 1),
        "nothing was stored"
    );
    a_set_bundle_only_moves_forward(&a, dir.path())
}

/// A bundle of another server's domain set by hand, then a newer one; an older one and one that
/// is not JSON are refused, and the last good bundle stays.
fn a_set_bundle_only_moves_forward(a: &ServerProcess, dir: &Path) -> anyhow::Result<()> {
    let b = ServerProcess::start_in_domain(&dir.join("b"), "b.test", "", None, &[])?;
    let b_json = b.cli(&["bundle", "show", "--format", "spiffe"])?;
    let b_path = dir.join("b.json");
    let set_b = bundle_set("b.test", &b_path)?;
    std::fs::write(&b_path, &b_json)?;
    a.cli(&set_b)?;
    let mut newer: serde_json::Value = serde_json::from_str(&b_json)?;
    newer["spiffe_sequence"] =
        serde_json::json!(newer["spiffe_sequence"].as_u64().unwrap_or(0) + 5);
    std::fs::write(&b_path, newer.to_string())?;
    a.cli(&set_b)?;
    std::fs::write(&b_path, &b_json)?;
    let older = a.cli_error(&set_b)?;
    ensure!(older.contains("below the stored"), "{older}");
    std::fs::write(&b_path, "{ not json")?;
    let garbage = a.cli_error(&set_b)?;
    ensure!(garbage.contains("bundle"), "{garbage}");
    ensure!(
        a.cli_json(&["bundle", "list"])?["bundles"][1]["sequence"].as_u64()
            == newer["spiffe_sequence"].as_u64(),
        "the last good bundle stays"
    );
    Ok(())
}

/// Writes `agent`'s SVIDs into `dir`; the first one's files, with the federated bundle of `peer`
/// (which must be there) as the bundle that verifies the other side.
fn write_files(agent: &AgentProcess, dir: &Path, peer: &str) -> anyhow::Result<SvidFiles> {
    agent.write_svids(dir)?;
    let federated = dir.join(format!("federated.{peer}.pem"));
    ensure!(
        federated.exists(),
        "no federated bundle of {peer} in {}",
        dir.display()
    );
    Ok(SvidFiles {
        cert: dir.join("svid.0.pem"),
        key: dir.join("svid.0.key"),
        bundle: federated,
    })
}

fn uri_san(pem: &Path) -> anyhow::Result<String> {
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(pem)
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A web CA and a certificate for `localhost` it signed, as PEM files in `dir`: `web-ca.pem`,
/// and `endpoint.crt`/`endpoint.key` (replaced atomically, as a certificate renewer would).
struct WebPki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl WebPki {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test Web CA");
        let ca = params.self_signed(&key)?;
        std::fs::write(dir.join("web-ca.pem"), ca.pem())?;
        Ok(WebPki {
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// Writes a fresh `localhost` certificate and key; returns the certificate's DER.
    fn issue(&self, dir: &Path) -> anyhow::Result<Vec<u8>> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
            .signed_by(&key, &self.issuer)?;
        for (name, text) in [
            ("endpoint.key", key.serialize_pem()),
            ("endpoint.crt", cert.pem()),
        ] {
            let staging = dir.join(format!("{name}.tmp"));
            std::fs::write(&staging, text)?;
            std::fs::rename(&staging, dir.join(name))?;
        }
        Ok(cert.der().to_vec())
    }

    /// A TLS server config presenting a fresh `localhost` certificate.
    fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
            .signed_by(&key, &self.issuer)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
        Ok(Arc::new(config))
    }
}

/// A misbehaving bundle endpoint on `localhost`: `/redirect` answers 301, `/garbage` a body that
/// is not a bundle, and `/serve` whatever document was put in `serve`.
async fn hostile_endpoint(
    tls: Arc<rustls::ServerConfig>,
    serve: Arc<std::sync::Mutex<String>>,
) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(socket).await else {
                    return;
                };
                let mut request = vec![0u8; 4096];
                let Ok(read) = stream.read(&mut request).await else {
                    return;
                };
                let request = String::from_utf8_lossy(&request[..read]).into_owned();
                let response = if request.starts_with("GET /redirect") {
                    "HTTP/1.1 301 Moved Permanently\r\nLocation: https://elsewhere.example/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                } else if request.starts_with("GET /garbage") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{ not a }"
                        .to_string()
                } else {
                    let body = serve
                        .lock()
                        .map(|document| document.clone())
                        .unwrap_or_default();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_web_endpoints_static_relationships_and_hostile_endpoints() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let web = WebPki::new(dir.path())?;
    let first_cert = web.issue(dir.path())?;

    // a.test serves its bundle with a web certificate from files.
    let endpoint_port = free_port()?;
    let a = ServerProcess::start_in_domain(
        &dir.path().join("a"),
        "a.test",
        &format!(
            "[federation]\nbundle_endpoint_address = \"127.0.0.1:{endpoint_port}\"\nbundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert_file = \"{}\"\nbundle_endpoint_key_file = \"{}\"\n",
            dir.path().join("endpoint.crt").display(),
            dir.path().join("endpoint.key").display()
        ),
        None,
        &[],
    )?;
    // b.test trusts it through a relationship fixed in its configuration, checking the web
    // certificate against the CA in SSL_CERT_FILE.
    let ca_file = dir.path().join("web-ca.pem");
    let b = ServerProcess::start_in_domain(
        &dir.path().join("b"),
        "b.test",
        &format!(
            "[federation]\nmin_refresh = \"1s\"\n[[federation.relationships]]\ntrust_domain = \"a.test\"\nbundle_endpoint_url = \"https://localhost:{endpoint_port}/\"\nprofile = \"https_web\"\n"
        ),
        None,
        &[("SSL_CERT_FILE", ca_file.to_str().context("utf-8 path")?)],
    )?;
    let fetched = b.cli(&["federation", "refresh", "--trust-domain", "a.test"])?;
    ensure!(
        fetched == a.cli(&["bundle", "show"])?,
        "b.test holds a.test's bundle"
    );

    // The endpoint's certificate is re-read when its files change.
    let served = |port: u16| -> anyhow::Result<Vec<u8>> {
        let output = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-showcerts"])
            .stdin(Stdio::null())
            .output()?;
        let certs = sigil_tests::pem_certificates(&String::from_utf8_lossy(&output.stdout))?;
        certs.into_iter().next().context("no certificate served")
    };
    ensure!(
        served(endpoint_port)? == first_cert,
        "the first certificate"
    );
    let renewed = web.issue(dir.path())?;
    ensure!(
        served(endpoint_port)? == renewed,
        "the renewed certificate is served without a restart"
    );

    // A hostile endpoint: each answer is refused with its reason and the last good bundle stays.
    let document = Arc::new(std::sync::Mutex::new(String::new()));
    let hostile = hostile_endpoint(web.server_config()?, document.clone()).await?;
    let good = b.cli(&["bundle", "show", "--trust-domain", "a.test"])?;
    let point_at = |path: &str| {
        b.cli(&[
            "federation",
            "update",
            "--trust-domain",
            "a.test",
            "--bundle-endpoint-url",
            &format!("https://localhost:{hostile}/{path}"),
            "--profile",
            "https_web",
        ])
    };
    let a_json = a.cli(&["bundle", "show", "--format", "spiffe"])?;
    let mut older: serde_json::Value = serde_json::from_str(&a_json)?;
    older["spiffe_sequence"] = serde_json::json!(0);
    let other_domain = b.cli(&["bundle", "show", "--format", "spiffe"])?;
    let cases = [
        ("redirect", String::new(), "redirects"),
        ("garbage", String::new(), "not a valid SPIFFE bundle"),
        ("serve", other_domain, "another trust domain"),
        ("serve", older.to_string(), "below the stored"),
    ];
    for (path, body, reason) in cases {
        if let Ok(mut served) = document.lock() {
            *served = body;
        }
        point_at(path)?;
        let refused = b.cli_error(&["federation", "refresh", "--trust-domain", "a.test"])?;
        ensure!(refused.contains(reason), "{path}: {refused}");
        ensure!(
            b.cli(&["bundle", "show", "--trust-domain", "a.test"])? == good,
            "{path}: the last good bundle is kept"
        );
    }
    let shown = b.cli_json(&["federation", "show", "--trust-domain", "a.test"])?;
    ensure!(
        shown["relationships"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("below the stored")),
        "{shown}"
    );
    // Counted.
    let metrics = Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", b.health)])
        .output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    // At least the four refreshes asked for (the refresher may have tried on its own too).
    let refused = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "sigil_server_federated_bundle_refreshes_total{trust_domain=\"a.test\",result=\"refused\"} ",
            )
        })
        .and_then(|count| count.trim().parse::<u64>().ok());
    ensure!(refused >= Some(4), "{metrics}");
    Ok(())
}

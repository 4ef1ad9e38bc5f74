//! End to end: HTTP rules of the real `sigil-agent forward` hold against every spelling of a path
//! and a method that once slipped past them (issue 10, attack 5), and a permissive listener with
//! rules warns at start that plaintext callers skip them (attack 8).
//!
//! The callers are `curl` with SVIDs that `sigil-agent api fetch x509 --write` wrote, sending raw
//! request targets (`--request-target`, so curl neither merges slashes nor resolves dot segments)
//! over HTTP/1.1 and HTTP/2; the application records every request target it receives, so the
//! test sees both what was refused and what reached it.

use std::sync::{Arc, Mutex};

use anyhow::{Context, ensure};
use sigil_tests::echo::recording_http_server;
use sigil_tests::forwarder::{Forward, ForwarderProcess};
use sigil_tests::svid::{SvidFiles, fetch_svid};
use sigil_tests::tools::{curl, peer_tools};
use sigil_tests::{Node, free_port};

#[path = "../../forwarder/tests/support/bypasses.rs"]
mod bypasses;

use bypasses::BYPASSES;

const FORWARDER: &str = "spiffe://example.org/forwarder";
const CLIENT: &str = "spiffe://example.org/ns/prod/web";

/// The rules of the attack: nobody reaches `/admin`, nobody deletes under `/api`, and only GET
/// under `/api` is allowed at all.
const RULES: [&str; 6] = [
    "--http-deny",
    "* * /admin",
    "--http-deny",
    "* DELETE /api",
    "--http-allow",
    "* GET /api",
];

/// Requests that pass: (method, request target as sent, what the application must receive).
const ALLOWED: [(&str, &str, &str); 5] = [
    ("GET", "/api", "/api"),
    ("GET", "/api?q=%2e%2E/admin&a=1", "/api?q=%2e%2E/admin&a=1"),
    ("GET", "//api/./items/../x/", "/api/x/"),
    ("GET", "/%61pi/%69tems", "/api/items"),
    ("GET", "/api/caf%c3%a9", "/api/caf%C3%A9"),
];

/// One request with curl to `base` (scheme, host and port) with the raw `target`: (status code,
/// body).
async fn request(
    base: &str,
    svid: Option<&SvidFiles>,
    method: &str,
    target: &str,
    extra: &[&str],
) -> anyhow::Result<(u16, String)> {
    let mut args = vec!["-X", method, "--request-target", target];
    args.extend_from_slice(extra);
    let (status, body) = curl(&format!("{base}/"), svid, &args).await?;
    let code = status.split_whitespace().next().context("no status code")?;
    Ok((code.parse()?, body))
}

/// The recording application behind an HTTP inbound forwarder on `port`.
struct Recorded {
    node: Node,
    port: u16,
    forwarder: ForwarderProcess,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Recorded {
    /// Starts a node with `entries`, the application, and an HTTP inbound forwarder in front of
    /// it with the flags `listener` adds.
    async fn start(
        entries: &[(&str, &[&str])],
        listener: impl FnOnce(Forward) -> Forward,
    ) -> anyhow::Result<Self> {
        let node = Node::for_this_uid(entries)?;
        let (app, seen) = recording_http_server().await?;
        let port = free_port()?;
        let forwarder = listener(Forward::inbound(port, app).http()).start(&node.agent)?;
        Ok(Recorded {
            node,
            port,
            forwarder,
            seen,
        })
    }

    /// The request targets the application received so far, in order.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_path_and_method_spelling_is_refused_and_the_normal_form_is_forwarded()
-> anyhow::Result<()> {
    let test = "every_path_and_method_spelling_is_refused_and_the_normal_form_is_forwarded";
    if !peer_tools(test, &["curl"])? {
        return Ok(());
    }
    let recorded = Recorded::start(
        &[(FORWARDER, &["--dns", "localhost"]), (CLIENT, &[])],
        |listener| {
            listener
                .spiffe_id(FORWARDER)
                .args(&["--max-path-length", "1024"])
                .args(&RULES)
        },
    )
    .await?;
    let (node, port, forwarder) = (&recorded.node, recorded.port, &recorded.forwarder);
    let result = async {
        let client = fetch_svid(&node.agent, &node.dir.path().join("svids"), CLIENT)?;
        let resolve = format!("localhost:{port}:127.0.0.1");
        let base = format!("https://localhost:{port}");
        for version in ["--http1.1", "--http2"] {
            let extra = ["--resolve", resolve.as_str(), version];
            for (method, target) in BYPASSES {
                let (status, body) = request(&base, Some(&client), method, target, &extra).await?;
                ensure!(
                    status == 403 || status == 400,
                    "{version} {method} {target} was not refused: {status} {body}"
                );
            }
            for (method, target, _) in ALLOWED {
                let (status, body) = request(&base, Some(&client), method, target, &extra).await?;
                ensure!(status == 200, "{version} {method} {target}: {status} {body}");
            }
            // Over the configured bound, before any normalising.
            let long = format!("/api/{}", "a".repeat(1024));
            let (status, body) = request(&base, Some(&client), "GET", &long, &extra).await?;
            ensure!(status == 414, "{version} a long path: {status} {body}");
            ensure!(body.contains("max_path_length of 1024"), "{body}");
        }
        let h1 = ["--resolve", resolve.as_str(), "--http1.1"];
        // An absolute-form target is normalised like any other (RFC 9112 3.2.2 makes a server
        // accept it); asterisk-form has no path to check.
        let absolute = format!("https://localhost:{port}/api/../%61dmin");
        let (status, body) = request(&base, Some(&client), "GET", &absolute, &h1).await?;
        ensure!(status == 403, "absolute-form: {status} {body}");
        let (status, body) = request(&base, Some(&client), "OPTIONS", "*", &h1).await?;
        ensure!(status == 400, "asterisk-form: {status} {body}");
        // hyper refuses a method that is no RFC 9110 token before the forwarder sees it.
        let (status, body) = request(&base, Some(&client), "G(T", "/api", &h1).await?;
        ensure!(status == 400, "a method that is no token: {status} {body}");
        // Each 400 says what was wrong and what to send instead.
        let (status, body) = request(&base, Some(&client), "delete", "/api/x", &h1).await?;
        ensure!(
            status == 400 && body.contains("send `DELETE`"),
            "lowercase delete: {status} {body}"
        );
        let (status, body) = request(&base, Some(&client), "GET", "/api/a%2Fb", &h1).await?;
        ensure!(
            status == 400 && body.contains("escaped_slashes"),
            "an escaped slash: {status} {body}"
        );

        let seen = recorded.seen();
        let expected: Vec<&str> = ALLOWED.iter().map(|(_, _, forwarded)| *forwarded).collect();
        ensure!(
            seen == [expected.clone(), expected].concat(),
            "the application received exactly the normal forms of the allowed requests, in order; it saw {seen:?}"
        );
        ensure!(
            !forwarder.logs().contains("plaintext callers skip"),
            "a strict listener warns of nothing"
        );
        let refused = forwarder.refusals(&format!("inbound-{port}"), "bad_request")?;
        ensure!(refused >= 10.0, "400s counted: {refused}");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permissive_listener_with_rules_warns_and_kept_escaped_slashes_stay_escaped()
-> anyhow::Result<()> {
    let test = "a_permissive_listener_with_rules_warns_and_kept_escaped_slashes_stay_escaped";
    if !peer_tools(test, &["curl"])? {
        return Ok(());
    }
    let recorded = Recorded::start(&[(FORWARDER, &[])], |listener| {
        listener.mode("permissive").allow(CLIENT).args(&[
            "--escaped-slashes",
            "keep",
            "--http-deny",
            "* * /admin",
        ])
    })
    .await?;
    let (port, forwarder) = (recorded.port, &recorded.forwarder);
    let result = async {
        let logs = forwarder.logs();
        ensure!(
            logs.contains(&format!(
                "listener `inbound-{port}` is permissive: plaintext callers skip its allow/deny peer policy"
            )) && logs.contains("use mode strict"),
            "the start-up warning"
        );
        // The warning is true: a plaintext caller reaches the application although only CLIENT
        // is allowed.
        let base = format!("http://127.0.0.1:{port}");
        let (status, body) = request(&base, None, "GET", "/files/a%2fb\\c", &[]).await?;
        ensure!(status == 200, "kept escapes: {status} {body}");
        let (status, body) = request(&base, None, "GET", "/x/..//%61dmin", &[]).await?;
        ensure!(status == 403, "rules still hold on the normal form: {status} {body}");
        let seen = recorded.seen();
        ensure!(seen == ["/files/a%2Fb%5Cc"], "the application saw {seen:?}");
        Ok(())
    }
    .await;
    forwarder.with_log(result)
}

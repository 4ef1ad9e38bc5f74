//! End to end: a real `sigil-server` and `sigil-agent`, and workloads that talk to the agent with
//! clients nobody here wrote: the `spiffe` crate's `WorkloadApiClient` and py-spiffe; SVIDs are
//! checked with `openssl verify`. Covers delivery of new entries to waiting workloads, rotation
//! before expiry, and restarts of either side.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_tests::steps::{http_get, json_stdout, refused_with};
use sigil_tests::{NODE_ALIAS, Node, entry_create, python, this_uid_selector};
use spiffe::WorkloadApiClient;
use tokio::io::AsyncBufReadExt;

/// A server and an agent, with one entry for this process's uid under the node alias.
fn node(entry_id: &str, extra_flags: &[&str]) -> anyhow::Result<Node> {
    Node::for_this_uid(&[(entry_id, extra_flags)])
}

/// Like [`node`], with the spiffe crate's client of the agent: this process as the workload.
async fn serving(
    entry_id: &str,
    extra_flags: &[&str],
) -> anyhow::Result<(Node, WorkloadApiClient)> {
    let node = node(entry_id, extra_flags)?;
    let client = node.agent.workload_client().await?;
    Ok((node, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_fetch_their_identity_with_the_spiffe_crate_and_the_cli() -> anyhow::Result<()> {
    let (node, client) = serving(
        "spiffe://example.org/workload",
        &["--dns", "workload.example.org"],
    )
    .await?;
    the_spiffe_crate_fetches_and_validates(&client).await?;
    the_cli_writes_fetches_and_validates(&node)?;
    bad_clients_leave_the_agent_serving(&node, &client).await
}

/// The spiffe crate's client gets the X509-SVID, the bundle and a JWT-SVID (cached), and the agent
/// validates the JWT-SVID for its audience only, untampered.
async fn the_spiffe_crate_fetches_and_validates(client: &WorkloadApiClient) -> anyhow::Result<()> {
    let svid = client.fetch_x509_svid().await?;
    ensure!(
        svid.spiffe_id().to_string() == "spiffe://example.org/workload",
        "{}",
        svid.spiffe_id()
    );
    let bundles = client.fetch_x509_bundles().await?;
    let td = spiffe::TrustDomain::new("example.org")?;
    ensure!(bundles.get(&td).is_some(), "the own bundle is served");

    let jwt = client.fetch_jwt_svid(["db"], None).await?;
    ensure!(
        jwt.spiffe_id().to_string() == "spiffe://example.org/workload",
        "jwt subject"
    );
    let validated = client.validate_jwt_token("db", jwt.token()).await?;
    ensure!(
        validated.spiffe_id().to_string() == "spiffe://example.org/workload",
        "validated subject"
    );
    ensure!(
        client
            .validate_jwt_token("other", jwt.token())
            .await
            .is_err(),
        "a wrong audience is refused"
    );
    let mut tampered = jwt.token().to_string();
    tampered.insert(tampered.len() - 2, 'A');
    ensure!(
        client.validate_jwt_token("db", &tampered).await.is_err(),
        "a tampered token is refused"
    );
    ensure!(
        client.fetch_jwt_svid(["db"], None).await?.token() == jwt.token(),
        "JWT-SVIDs are cached"
    );
    Ok(())
}

/// The CLI writes the SVID, key (0600) and bundle, which openssl verifies; prints them as JSON;
/// fetches and validates a JWT-SVID and the bundles; and checks the agent's health.
fn the_cli_writes_fetches_and_validates(node: &Node) -> anyhow::Result<()> {
    let out = node.dir.path().join("svid");
    node.agent.write_svids(&out)?;
    let key_mode = std::fs::metadata(out.join("svid.0.key"))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(key_mode == 0o600, "key mode {key_mode:o}");
    openssl_verify(&out.join("bundle.0.pem"), &out.join("svid.0.pem"))?;
    let json = node.agent.cli_json(&["api", "fetch", "x509"])?;
    ensure!(
        json["svids"][0]["spiffe_id"] == "spiffe://example.org/workload",
        "{json}"
    );
    let token = node.agent.cli_jwt("cli")?;
    let checked = node.agent.cli_validate_jwt("cli", &token)?;
    ensure!(
        checked.contains("spiffe://example.org/workload"),
        "{checked}"
    );
    ensure!(
        node.agent
            .cli(&["api", "fetch", "bundles"])?
            .contains("BEGIN CERTIFICATE"),
        "bundles"
    );
    ensure!(
        node.agent
            .cli(&["healthcheck", "--health-address", &node.agent.health])?
            .contains("ready"),
        "ready"
    );
    Ok(())
}

/// A call without the security header gets InvalidArgument, and garbage on the socket is dropped
/// without harm: the agent serves the next caller.
async fn bad_clients_leave_the_agent_serving(
    node: &Node,
    client: &WorkloadApiClient,
) -> anyhow::Result<()> {
    let mut raw = SpiffeWorkloadApiClient::new(node.agent.grpc_channel().await?);
    refused_with(
        raw.fetch_x509svid(X509svidRequest {}).await,
        tonic::Code::InvalidArgument,
        "no header accepted",
    )?;
    {
        use tokio::io::AsyncWriteExt;
        let mut garbage = tokio::net::UnixStream::connect(&node.agent.socket).await?;
        garbage
            .write_all(b"\x00\x01not http/2 at all\r\n\r\n")
            .await?;
    }
    ensure!(
        client.fetch_x509_svid().await.is_ok(),
        "still serving after bad clients"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_and_removed_entries_reach_a_waiting_workload() -> anyhow::Result<()> {
    let (node, client) = serving("spiffe://example.org/first", &[]).await?;
    let mut updates = client.stream_x509_contexts().await?;
    let first = updates.next().await.context("stream ended")??;
    ensure!(first.svids().len() == 1, "one identity at first");

    let selector = this_uid_selector()?;
    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    for n in 0..5 {
        let spiffe_id = format!("spiffe://example.org/extra/{n}");
        let started = Instant::now();
        ids.push(
            node.server
                .create_entry(&spiffe_id, NODE_ALIAS, &selector, &[])?,
        );
        let update = tokio::time::timeout(Duration::from_secs(10), updates.next())
            .await?
            .context("stream ended")??;
        latencies.push(started.elapsed());
        ensure!(
            update
                .svids()
                .iter()
                .any(|s| s.spiffe_id().to_string() == spiffe_id),
            "{spiffe_id} delivered"
        );
    }
    latencies.sort();
    eprintln!(
        "entry create (CLI process included) to workload delivery: min {:?}, max {:?}",
        latencies[0],
        latencies[latencies.len() - 1]
    );

    node.server.cli(&["entry", "delete", "--id", &ids[0]])?;
    let update = tokio::time::timeout(Duration::from_secs(10), updates.next())
        .await?
        .context("stream ended")??;
    ensure!(
        !update
            .svids()
            .iter()
            .any(|s| s.spiffe_id().to_string() == "spiffe://example.org/extra/0"),
        "a removed entry disappears"
    );
    ensure!(
        update.svids().len() == 5,
        "the others stay: {}",
        update.svids().len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_rotate_before_they_expire_without_a_gap() -> anyhow::Result<()> {
    // A 6 s lifetime: renewed after about 3 s (half-life, minus jitter).
    let (node, client) = serving(
        "spiffe://example.org/short-lived",
        &["--x509-svid-ttl", "6s"],
    )
    .await?;
    let mut updates = client.stream_x509_svids().await?;
    // Beside it, the CLI keeps files on disk up to date (as istiod's or a proxy's helper would).
    let written = node.dir.path().join("watched");
    let mut writer = tokio::process::Command::new(sigil_tests::binary("sigil-agent")?)
        .args([
            "api",
            "fetch",
            "x509",
            "--watch",
            "--cert-name",
            "tls.crt",
            "--write",
        ])
        .arg(&written)
        .env("SPIFFE_ENDPOINT_SOCKET", node.agent.endpoint())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut writer_lines =
        tokio::io::BufReader::new(writer.stderr.take().context("stderr")?).lines();
    let mut current = updates.next().await.context("stream ended")??;
    for _ in 0..2 {
        let old = facts(&current)?;
        let next = tokio::time::timeout(Duration::from_secs(20), updates.next())
            .await?
            .context("stream ended")??;
        let now = now_unix();
        let new = facts(&next)?;
        ensure!(new.serial != old.serial, "a new certificate");
        ensure!(
            now < old.not_after,
            "the new SVID arrived at {now}, before the old one expired at {}",
            old.not_after
        );
        ensure!(new.not_after > old.not_after, "the new SVID lives longer");
        current = next;
    }
    // The writer wrote the first SVID and each of the two rotations.
    let mut writes = 0;
    while writes < 3 {
        let line = tokio::time::timeout(Duration::from_secs(20), writer_lines.next_line())
            .await?
            .context("reading the writer's output")?
            .context("the writer exited")?;
        if line.starts_with("wrote 1 SVID") {
            writes += 1;
        }
    }
    let on_disk =
        sigil_tests::pem_certificates(&std::fs::read_to_string(written.join("tls.crt"))?)?;
    ensure!(
        on_disk[0].as_slice() == current.leaf().as_ref(),
        "the file holds the newest SVID"
    );
    let metrics = http_get(&node.agent.health, "/metrics")?;
    ensure!(
        metrics.contains("sigil_agent_svid_renewals_total"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_workloads_served() -> anyhow::Result<()> {
    let (mut node, client) = serving("spiffe://example.org/steady", &[]).await?;
    let before = client.fetch_x509_svid().await?;

    // The server goes away: the agent keeps serving what it holds.
    node.server.stop()?;
    let mut updates = client.stream_x509_svids().await?;
    let during = updates.next().await.context("stream ended")??;
    ensure!(
        during.leaf().as_ref() == before.leaf().as_ref(),
        "the cached SVID is served while the server is down"
    );
    node.server.restart_stopped()?;
    // Once back, the agent resyncs: a new entry reaches the waiting workload.
    let selector = this_uid_selector()?;
    node.server.cli(&entry_create(
        "spiffe://example.org/after-restart",
        NODE_ALIAS,
        &selector,
        &[],
    ))?;
    let context_stream = client.stream_x509_contexts().await?;
    tokio::pin!(context_stream);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let context = tokio::time::timeout_at(deadline.into(), context_stream.next())
            .await?
            .context("stream ended")??;
        if context
            .svids()
            .iter()
            .any(|s| s.spiffe_id().to_string() == "spiffe://example.org/after-restart")
        {
            break;
        }
    }

    // The agent restarts without a join token, from its stored identity.
    node.agent.restart()?;
    let client = node.agent.workload_client().await?;
    ensure!(
        client.fetch_all_x509_svids().await?.len() == 2,
        "both identities after the agent restart"
    );
    ensure!(
        node.agent
            .logs()
            .contains("using the stored agent identity"),
        "no new attestation"
    );

    // A crashed agent leaves its socket file; the next start replaces it.
    node.agent.crash()?;
    ensure!(
        node.agent.socket.exists(),
        "the crash left the socket behind"
    );
    node.agent.start_again()?;
    let client = node.agent.workload_client().await?;
    ensure!(
        client.fetch_x509_svid().await.is_ok(),
        "served after a crash"
    );
    let mode = std::fs::metadata(&node.agent.socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o777, "socket mode {mode:o}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_do_not_starve_other_workloads() -> anyhow::Result<()> {
    let node = node("spiffe://example.org/popular", &[])?;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut greedy =
            sigil_workload_api::client::WorkloadClient::connect(&node.agent.socket).await?;
        for _ in 0..100 {
            streams.push(greedy.watch_x509().await?);
        }
    }
    let client = node.agent.workload_client().await?;
    let svid = tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_svid()).await??;
    ensure!(
        svid.spiffe_id().to_string() == "spiffe://example.org/popular",
        "served beside 2000 streams"
    );
    ensure!(streams.len() == 2000, "all streams open");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_and_validates() -> anyhow::Result<()> {
    let Some(python) = python::py_spiffe_python("py_spiffe_fetches_and_validates")? else {
        return Ok(());
    };
    let node = node("spiffe://example.org/python", &[])?;
    let output = python::py_spiffe_workload(&python, &node.agent.endpoint()).output()?;
    let result = json_stdout(output, "py-spiffe failed")?;
    ensure!(
        result["x509_spiffe_id"] == "spiffe://example.org/python",
        "{result}"
    );
    ensure!(
        result["jwt_spiffe_id"] == "spiffe://example.org/python",
        "{result}"
    );
    ensure!(
        result["validated_spiffe_id"] == "spiffe://example.org/python",
        "{result}"
    );
    ensure!(result["wrong_audience"] != "accepted", "{result}");
    ensure!(result["x509_trust_domains"][0] == "example.org", "{result}");
    ensure!(result["jwt_trust_domains"][0] == "example.org", "{result}");
    Ok(())
}

struct Facts {
    serial: String,
    not_after: i64,
}

fn facts(svid: &spiffe::X509Svid) -> anyhow::Result<Facts> {
    let facts = sigil_core::x509::certificate_facts(svid.leaf().as_ref())?;
    Ok(Facts {
        serial: facts.serial,
        not_after: facts.not_after,
    })
}

fn now_unix() -> i64 {
    sigil_core::clock::unix_seconds(std::time::SystemTime::now())
}

fn openssl_verify(bundle: &Path, chain: &Path) -> anyhow::Result<()> {
    sigil_tests::tools::openssl_verify(bundle, None, chain, &["-purpose", "sslclient"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_own_svid_at_half_life() -> anyhow::Result<()> {
    // Agent SVIDs of 6 s: the agent renews after about 3 s, twice within the wait below.
    let selector = this_uid_selector()?;
    let node = Node::start_with("[ca]\nagent_svid_ttl = \"6s\"\n", |server| {
        Node::entry(server, "spiffe://example.org/renewing", &selector, &[])
    })?;
    let (server, agent) = (&node.server, &node.agent);
    let first_serial = server.cli_json(&["agent", "list"])?["agents"][0]["svid_serial"].clone();
    ensure!(
        agent.wait_for_log("renewed the agent SVID", 2, Duration::from_secs(30)),
        "two renewals: {}",
        agent.logs()
    );
    // At half-life, not in a loop: by the second renewal there have been two or three, not hundreds.
    let renewals = agent.logs().matches("renewed the agent SVID").count();
    ensure!(
        renewals <= 3,
        "{renewals} renewals: the agent renews far too often"
    );
    let agents = server.cli_json(&["agent", "list"])?;
    ensure!(
        agents["agents"][0]["svid_serial"] != first_serial,
        "the server recorded the renewed SVID"
    );
    // Calls made with the renewed SVID work.
    let client = agent.workload_client().await?;
    ensure!(
        client.fetch_x509_svid().await?.spiffe_id().to_string() == "spiffe://example.org/renewing",
        "served"
    );
    Ok(())
}

//! Attacks on the server's trust boundary, performed against the real `sigil-server` and
//! `sigil-agent` (issue 10, attacks 1, 2 and the agent API's connection bounds). Each worked
//! against the code before its fix.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rcgen::{Issuer, KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, ServerName};
use sigil_agent::node::{AgentIdentity, IdentityStore};
use sigil_core::id::{parse_spiffe_id, server_id};
use sigil_core::tls::{SpiffeServerVerifier, crypto_provider};
use sigil_core::x509::{KeyType, leaf_params};
use sigil_proto::agent::{
    AttestNodeRequest, BatchSignX509SvidRequest, SyncRequest, X509SvidRequest,
};
use sigil_tests::bench::procfs::rss_kib;
use sigil_tests::{NODE_ALIAS, Node, ServerProcess, entry_create, pem_certificates};
use tokio::io::AsyncReadExt;

const RESERVED: [&str; 3] = [
    "spiffe://example.org/sigil/server",
    "spiffe://example.org/sigil/agent/join_token/victim",
    "spiffe://example.org/sigil/anything",
];

/// A server in a fresh directory, with `config` added to its configuration file; the directory
/// goes when the caller drops it, after the server.
fn scratch_server(config: &str) -> anyhow::Result<(tempfile::TempDir, ServerProcess)> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), None, config)?;
    Ok((dir, server))
}

/// The attack began with `entry create` for an agent's or the server's ID; every way of naming
/// an ID is now refused inside `/sigil/`, and nothing is stored.
#[test]
fn reserved_ids_cannot_be_registered_by_any_path() -> anyhow::Result<()> {
    let (_dir, server) = scratch_server("server_dns_names = [\"sigil-server.sigil.svc\"]\n")?;
    for id in RESERVED {
        let err = server.cli_error(&entry_create(id, NODE_ALIAS, "unix:uid:0", &[]))?;
        assert!(err.contains("reserved namespace"), "{id}: {err}");
        let err = server.cli_error(&["token", "generate", "--spiffe-id", id])?;
        assert!(err.contains("reserved namespace"), "{id}: {err}");
    }
    // Updating a harmless entry into the namespace is refused the same way.
    let id = server.create_entry("spiffe://example.org/web", NODE_ALIAS, "unix:uid:0", &[])?;
    let err = server.cli_error(&[
        "entry",
        "update",
        "--id",
        &id,
        "--spiffe-id",
        RESERVED[1],
        "--parent-id",
        NODE_ALIAS,
        "--selector",
        "unix:uid:0",
    ])?;
    assert!(err.contains("reserved namespace"), "{err}");
    let err = server.cli_error(&[
        "federation",
        "create",
        "--trust-domain",
        "b.example",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/",
        "--endpoint-spiffe-id",
        "spiffe://example.org/sigil/server",
    ])?;
    assert!(err.contains("reserved namespace"), "{err}");

    // The server's own DNS names (what istio-agent checks it by) are reserved the same way.
    for name in ["sigil-server.sigil.svc", "*.sigil.svc"] {
        let err = server.cli_error(&entry_create(
            "spiffe://example.org/dns",
            NODE_ALIAS,
            "unix:uid:0",
            &["--dns", name],
        ))?;
        assert!(err.contains("server_dns_names"), "{name}: {err}");
    }

    let entries = server.cli_json(&["entry", "list"])?;
    let stored = entries.to_string();
    assert!(
        !stored.contains("example.org/sigil/"),
        "nothing reserved was stored: {stored}"
    );
    Ok(())
}

/// A row that slipped in before the rule (or by hand) keeps the server from starting, named.
#[test]
fn a_stored_reserved_entry_stops_start_up_with_the_row_named() -> anyhow::Result<()> {
    let (_dir, mut server) = scratch_server("")?;
    let id = server.create_entry("spiffe://example.org/web", NODE_ALIAS, "unix:uid:0", &[])?;
    server.stop()?;
    let database = server.data_dir.join("datastore.sqlite3");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        use sqlx::Connection;
        let mut db =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", database.display())).await?;
        sqlx::query("UPDATE entries SET spiffe_id = $1 WHERE id = $2")
            .bind(RESERVED[1])
            .bind(&id)
            .execute(&mut db)
            .await?;
        anyhow::Ok(())
    })?;
    let err = server
        .restart_stopped()
        .expect_err("the server must not start with a reserved entry")
        .to_string();
    assert!(err.contains("reserved namespace"), "{err}");
    assert!(err.contains(&id), "the row is named: {err}");
    assert!(err.contains(RESERVED[1]), "{err}");
    Ok(())
}

/// The CA key and certificate of a running server, read from its data directory: what an
/// attacker who minted (or kept) a CA-signed agent certificate would hold.
fn server_ca(server: &ServerProcess, bundle_pem: &str) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let root = pem_certificates(bundle_pem)?
        .into_iter()
        .next()
        .context("no root in the bundle")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&root)?;
    let spki = parsed.public_key().raw.to_vec();
    for file in std::fs::read_dir(server.data_dir.join("keys"))? {
        let path = file?.path();
        let Ok(key) = KeyPair::try_from(std::fs::read(&path)?.as_slice()) else {
            continue;
        };
        if key.subject_public_key_info() == spki {
            return Ok(Issuer::from_ca_cert_der(&CertificateDer::from(root), key)?);
        }
    }
    anyhow::bail!("no key in the data directory matches the CA certificate")
}

/// A valid agent certificate for `agent_id`, signed by the server's own CA, but not one the
/// server issued to that agent (so its serial is not the agent's).
fn minted_agent_identity(
    issuer: &Issuer<'static, KeyPair>,
    agent_id: &str,
) -> anyhow::Result<AgentIdentity> {
    let id = parse_spiffe_id("agent_id", agent_id)?;
    let key = KeyType::EcP256.generate()?;
    let now = SystemTime::now();
    let params = leaf_params(&id, &[], now, now + Duration::from_secs(3600))?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(AgentIdentity {
        spiffe_id: id,
        chain: vec![cert.der().to_vec()],
        expires_at: 0,
        key,
    })
}

/// Defence in depth: the TLS handshake proves only that our CA signed a certificate. A minted
/// (or stolen, or pre-eviction) agent certificate with the right ID is refused on every call,
/// while the agent's own current SVID keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_the_datastore_does_not_hold_is_refused() -> anyhow::Result<()> {
    let node =
        Node::start(|server| Node::entry(server, "spiffe://example.org/db", "unix:uid:4242", &[]))?;
    let trust = node.server.trust()?;
    let (own, _) = IdentityStore::open(&node.agent.data_dir)?
        .load(&trust.trust_domain)?
        .context("the agent stored no identity")?;
    let agent_id = own.spiffe_id.to_string();

    // The agent's own certificate: a sync stream opens with its snapshot.
    let mut genuine = trust.connect(&node.server, Some(&own)).await?;
    let mut stream = genuine
        .client
        .sync(SyncRequest::default())
        .await?
        .into_inner();
    let first = stream.message().await?.context("no snapshot")?;
    assert!(first.full_snapshot);
    assert!(
        !first.entries.is_empty(),
        "the genuine agent sees its entries"
    );

    let issuer = server_ca(&node.server, &trust.pem)?;
    let minted = minted_agent_identity(&issuer, &agent_id)?;
    let mut forged = trust.connect(&node.server, Some(&minted)).await?;
    let refused = match forged.client.sync(SyncRequest::default()).await {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .err()
            .context("a sync stream opened with a minted agent certificate")?,
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("not the current SVID"),
        "{refused:?}"
    );
    let csr = sigil_core::x509::csr_for(&KeyType::EcP256.generate()?, None)?;
    let refused = forged
        .client
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: vec![X509SvidRequest {
                entry_id: first.entries[0].id.clone(),
                csr,
            }],
        })
        .await
        .expect_err("signing for a minted agent certificate");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // The genuine agent is untouched by the attempt.
    let again = genuine
        .client
        .sync(SyncRequest::default())
        .await?
        .into_inner()
        .message()
        .await?;
    assert!(again.is_some_and(|m| m.full_snapshot));
    Ok(())
}

/// `AttestNode.attestor` is any string an unauthenticated caller sends. 100 distinct 1 MB names
/// once grew the server by 112 MiB for good, `/metrics` to 100 MB, and came back whole in the
/// status and the log. Labels now come from a fixed set and echoes are truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestor_names_cannot_grow_metrics_logs_or_statuses() -> anyhow::Result<()> {
    let (_dir, server) = scratch_server("")?;
    let pid = server.pid().context("server pid")?;
    let mut connection = server.trust()?.connect(&server, None).await?;
    // One request first, so what the first call allocates for good is not counted as growth.
    let warm = connection
        .client
        .attest_node(AttestNodeRequest {
            attestor: "warm-up".into(),
            ..AttestNodeRequest::default()
        })
        .await;
    assert!(warm.is_err());
    let before = rss_kib(pid)?;
    let log_before = server.logs().len();
    for round in 0..100 {
        let name = format!("{round:03}{}", "x".repeat(1024 * 1024 - 3));
        let status = connection
            .client
            .attest_node(AttestNodeRequest {
                attestor: name,
                ..AttestNodeRequest::default()
            })
            .await
            .expect_err("an unknown attestor is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().len() < 1024,
            "the status echoes {} bytes",
            status.message().len()
        );
    }
    let grown_kib = rss_kib(pid)?.saturating_sub(before);
    let metrics = sigil_tests::steps::http_get(&server.health, "/metrics")?;
    let log_grown = server.logs().len() - log_before;
    println!(
        "server resident memory grew by {grown_kib} KiB; /metrics is {} bytes; the log grew by {log_grown} bytes",
        metrics.len()
    );
    assert!(grown_kib < 20 * 1024, "the server grew by {grown_kib} KiB");
    assert!(
        metrics.len() < 64 * 1024,
        "/metrics is {} bytes",
        metrics.len()
    );
    assert!(
        metrics.contains("attestor=\"unknown\""),
        "unknown names share one label"
    );
    assert!(log_grown < 100 * 1024, "the log grew by {log_grown} bytes");
    Ok(())
}

/// Every node can reach the agent API before it is authenticated: clients that connect and never
/// finish a handshake, or simply stay connected, once held unbounded tasks and sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_api_bounds_handshakes_and_connections() -> anyhow::Result<()> {
    let (_dir, server) = scratch_server(
        "[agent_api]\nmax_handshakes = 4\nmax_connections = 6\nhandshake_timeout = \"2s\"\nunauthenticated_connection_lifetime = \"3s\"\n",
    )?;
    let trust = server.trust()?;
    let verifier = SpiffeServerVerifier::new(&trust.roots, server_id(&trust.trust_domain))?;
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = |connector: tokio_rustls::TlsConnector, address: String| async move {
        let tcp = tokio::net::TcpStream::connect(&address).await?;
        let name = ServerName::try_from("sigil-server")?;
        anyhow::Ok(connector.connect(name, tcp).await?)
    };

    // Four clients that connect and say nothing take every handshake slot.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        let mut socket = tokio::net::TcpStream::connect(&server.agent_api).await?;
        silent.push(tokio::spawn(async move {
            let mut byte = [0u8; 1];
            let _ = socket.read(&mut byte).await;
            started.elapsed()
        }));
    }
    // A real client must wait until the server gives up on one of them.
    let waited = tokio::spawn({
        let (connector, address) = (connector.clone(), server.agent_api.clone());
        async move {
            let stream = handshake(connector, address).await;
            (started.elapsed(), stream)
        }
    });
    for task in silent {
        task.await?;
    }
    let (handshake_done, stream) = waited.await?;
    let _held = stream.context("the real client got through once a slot freed")?;
    // The server frees a slot no earlier than handshake_timeout after it accepted a silent
    // client, and it accepted them all after `started`. Comparing with the silent clients' own
    // "closed" timestamps instead raced: their tasks may be scheduled after the handshake ends.
    assert!(
        handshake_done >= Duration::from_secs(2),
        "the fifth handshake finished after {handshake_done:?}, before any of the four silent ones could time out (2 s)"
    );

    // Six finished connections fill the connection cap: the seventh is closed at once.
    let mut open = vec![_held];
    while open.len() < 6 {
        open.push(handshake(connector.clone(), server.agent_api.clone()).await?);
    }
    let over = handshake(connector.clone(), server.agent_api.clone()).await;
    assert!(over.is_err(), "a seventh connection was served");
    open.pop();
    // Closing one frees its slot; the server notices the close asynchronously, so retry on the
    // close signal rather than sleeping: each refused attempt is answered at once.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match handshake(connector.clone(), server.agent_api.clone()).await {
            Ok(stream) => {
                open.push(stream);
                break;
            }
            Err(_) if attempts < 1000 => tokio::task::yield_now().await,
            Err(e) => return Err(e.context("a freed slot was never reused")),
        }
    }

    // A connection without a client certificate that finished its handshake is not kept for
    // good: the server ends it after unauthenticated_connection_lifetime.
    let mut idle = open.remove(0);
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buffer = [0u8; 1024];
        loop {
            match idle.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "an unauthenticated connection was kept past its lifetime"
    );
    Ok(())
}

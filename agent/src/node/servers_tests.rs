//! The connector against real loopback servers: a dead port, a server that never finishes its
//! handshake, a server whose certificate comes from another CA, and a good one. Real time: the
//! handshakes are real I/O.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use rcgen::{Issuer, KeyPair};
use sigil_core::id::{TrustDomain, parse_trust_domain, server_id};
use sigil_core::tls::{SpiffeServerVerifier, chain_and_key, crypto_provider};
use sigil_core::x509::{KeyType, leaf_params, root_ca_params};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;

fn trust_domain() -> TrustDomain {
    parse_trust_domain("trust_domain", "example.org").expect("td")
}

/// A CA for `example.org`: its issuer and its DER certificate.
fn ca() -> (Issuer<'static, KeyPair>, Vec<u8>) {
    let key = KeyType::EcP256.generate().expect("key");
    let params = root_ca_params(
        &trust_domain(),
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .expect("params");
    let der = params
        .self_signed(&key)
        .expect("self-signed")
        .der()
        .to_vec();
    (Issuer::new(params, key), der)
}

/// A TLS server presenting `spiffe://example.org/sigil/server` signed by `ca`; counts the
/// connections it accepts.
async fn tls_server(ca: &Issuer<'static, KeyPair>) -> (String, Arc<AtomicUsize>) {
    let key = KeyType::EcP256.generate().expect("key");
    let now = SystemTime::now();
    let leaf = leaf_params(
        &server_id(&trust_domain()),
        &[],
        now,
        now + Duration::from_secs(600),
    )
    .expect("params")
    .signed_by(&key, ca)
    .expect("signed");
    let (chain, key) = chain_and_key(&[leaf.der().to_vec()], key.serialize_der());
    let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    // Held open until the client goes.
                    let _ = tls.read(&mut [0u8; 1]).await;
                }
            });
        }
    });
    (address, handshakes)
}

/// A connector that trusts `root` for the servers of `example.org`, as the agent's does.
fn connector(root: &[u8]) -> TlsConnector {
    let verifier =
        SpiffeServerVerifier::new(&[root.to_vec()], server_id(&trust_domain())).expect("verifier");
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

fn name() -> ServerName<'static> {
    ServerName::try_from("sigil-server").expect("name")
}

/// A loopback port nothing listens on.
async fn dead_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address").to_string()
}

fn peer(tls: &TlsStream<TcpStream>) -> String {
    tls.get_ref().0.peer_addr().expect("peer").to_string()
}

#[tokio::test]
async fn every_connection_reaches_the_live_server_past_a_dead_one_and_a_hung_one() {
    let (issuer, root) = ca();
    let (good, accepted) = tls_server(&issuer).await;
    let hung = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hung_address = hung.local_addr().expect("address").to_string();
    let port = good.rsplit_once(':').expect("port").1;
    // The live server also by name, as a DNS name with several addresses would give it.
    let servers = Servers::new(vec![
        dead_port().await,
        hung_address,
        format!("localhost:{port}"),
    ]);
    let connector = connector(&root);
    for _ in 0..4 {
        let started = Instant::now();
        let tls = servers
            .connect(&connector, &name())
            .await
            .expect("connected");
        assert_eq!(peer(&tls), good);
        // At most one hung server's deadline, whatever the order.
        assert!(
            started.elapsed() < CONNECT_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_server_that_does_not_verify_is_skipped_for_a_while_then_tried_again() {
    let (issuer, root) = ca();
    let (other_issuer, _) = ca();
    let (impostor, impostor_accepted) = tls_server(&other_issuer).await;
    let (good, _) = tls_server(&issuer).await;
    let connector = connector(&root);

    let alone = Servers::new(vec![impostor.clone()]);
    let refused = alone
        .connect(&connector, &name())
        .await
        .expect_err("impostor");
    assert!(refused.to_string().contains(&impostor), "{refused}");
    // Skipped: not even a TCP connection while the skip lasts.
    let before = impostor_accepted.load(Ordering::SeqCst);
    let refused = alone
        .connect(&connector, &name())
        .await
        .expect_err("skipped");
    assert!(refused.to_string().contains("skipped"), "{refused}");
    assert_eq!(impostor_accepted.load(Ordering::SeqCst), before);
    // New roots: the impostor is tried again (and fails again).
    alone.forget_skipped();
    let refused = alone
        .connect(&connector, &name())
        .await
        .expect_err("impostor");
    assert!(!refused.to_string().contains("skipped"), "{refused}");

    let both = Servers::new(vec![impostor, good.clone()]);
    for _ in 0..6 {
        let tls = both
            .connect(&connector, &name())
            .await
            .expect("the good one");
        assert_eq!(peer(&tls), good);
    }
}

#[tokio::test]
async fn the_server_a_call_failed_on_is_tried_last() {
    let (issuer, root) = ca();
    let (first, _) = tls_server(&issuer).await;
    let (second, _) = tls_server(&issuer).await;
    let servers = Servers::new(vec![first, second]);
    let connector = connector(&root);
    for _ in 0..6 {
        let before = peer(&servers.connect(&connector, &name()).await.expect("one"));
        servers.demote_current();
        let after = peer(
            &servers
                .connect(&connector, &name())
                .await
                .expect("the other"),
        );
        assert_ne!(before, after);
        servers.inner.state.lock_unpoisoned().demoted.clear();
    }
}

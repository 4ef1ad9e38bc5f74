//! The server's own identity on the agent API: an X509-SVID for `spiffe://<td>/sigil/server`,
//! signed by its own CA, renewed at half-life and whenever the bundle changes, and swapped into
//! the TLS configuration without a restart.
//!
//! Client certificates are optional at the TLS layer (attestation happens before an agent has
//! one) and verified against the bundle when present; each handler decides whether it needs one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use sigil_core::id::server_id;
use sigil_core::tls::crypto_provider;
use sigil_core::x509::KeyType;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::ServerState;
use crate::config::AgentApiConfig;
use crate::datastore::DataStore;
use crate::{Error, Result};

/// The current TLS configuration of the agent API.
#[derive(Debug)]
pub struct ServerTls {
    config: ArcSwap<rustls::ServerConfig>,
    expires_at: std::sync::atomic::AtomicI64,
    bundle_sequence: std::sync::atomic::AtomicU64,
    /// The CA that signed the current SVID.
    authority: ArcSwap<String>,
}

impl ServerTls {
    /// Issues the server's first SVID.
    pub async fn new<D: DataStore>(state: &ServerState<D>) -> Result<Self> {
        let (config, expires_at, sequence, authority) = build(state).await?;
        Ok(ServerTls {
            config: ArcSwap::from_pointee(config),
            expires_at: expires_at.into(),
            bundle_sequence: sequence.into(),
            authority: ArcSwap::from_pointee(authority),
        })
    }

    /// Renews the server SVID when half its life has passed, the bundle changed, or another CA
    /// became active (so a tainted CA's SVID does not outlive the taint).
    pub async fn refresh_if_due<D: DataStore>(&self, state: &ServerState<D>) -> Result<()> {
        use std::sync::atomic::Ordering;
        let now = state.clock.unix_now();
        let expires_at = self.expires_at.load(Ordering::SeqCst);
        let lifetime =
            i64::try_from(state.ca.settings().default_x509_svid_ttl.as_secs()).unwrap_or(i64::MAX);
        let bundle_changed =
            state.ca.bundle().sequence != self.bundle_sequence.load(Ordering::SeqCst);
        let other_ca = *self.authority.load_full() != state.ca.active_x509_id();
        if bundle_changed || other_ca || expires_at - now <= lifetime / 2 {
            let (config, expires_at, sequence, authority) = build(state).await?;
            self.config.store(Arc::new(config));
            self.expires_at.store(expires_at, Ordering::SeqCst);
            self.bundle_sequence.store(sequence, Ordering::SeqCst);
            self.authority.store(Arc::new(authority));
            tracing::info!(expires_at, "renewed the server SVID");
        }
        Ok(())
    }

    /// The same identity for the bundle endpoint: HTTP/1.1 and no client certificate asked for.
    pub fn bundle_endpoint_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let current = self.config.load_full();
        crate::federation::endpoint::endpoint_config(current.cert_resolver.clone())
    }

    /// Accepts TCP connections on `listener`, completes TLS handshakes off the accept loop, and
    /// hands finished connections to `sender` (the gRPC server's incoming stream).
    ///
    /// `limits` bounds what unauthenticated clients can hold: at most `max_handshakes` handshakes
    /// in flight (the loop stops accepting while they are all taken, so further clients wait in
    /// the kernel's backlog rather than in memory; a slot frees after `handshake_timeout` at the
    /// latest) and at most `max_connections` connections open (more are closed at once).
    pub async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        sender: mpsc::Sender<std::io::Result<LimitedConnection>>,
        limits: AgentApiConfig,
        mut stopped: watch::Receiver<bool>,
    ) {
        let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let unauthenticated = Arc::new(Semaphore::new(limits.max_unauthenticated_connections));
        let lifetime = limits.unauthenticated_connection_lifetime.0;
        let timeout = limits.handshake_timeout.0;
        let mut last_refusal_logged: Option<Instant> = None;
        loop {
            let handshake = tokio::select! {
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stopped.wait_for(|stop| *stop) => return,
            };
            let Some((socket, peer)) = accept_next(&listener, &mut stopped, "agent API").await
            else {
                return;
            };
            let Ok(connection) = connections.clone().try_acquire_owned() else {
                // One line per interval, not per connection: a flood must not become a log flood.
                if last_refusal_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "refusing agent API connections: agent_api.max_connections are open; raise it if this many agents are expected"
                    );
                    last_refusal_logged = Some(Instant::now());
                }
                continue;
            };
            let _ = socket.set_nodelay(true);
            let acceptor = TlsAcceptor::from(self.config.load_full());
            let handoff = sender.clone();
            let unauthenticated = unauthenticated.clone();
            tokio::spawn(async move {
                let handshake_result = tokio::time::timeout(timeout, acceptor.accept(socket)).await;
                drop(handshake);
                match handshake_result {
                    Ok(Ok(stream)) => {
                        // Without a client certificate only AttestNode can be called: such a
                        // connection takes one of a smaller set of slots and is closed after a
                        // while, so nobody holds the port with connections that cost them nothing.
                        let anonymous = if stream.get_ref().1.peer_certificates().is_none() {
                            let Ok(slot) = unauthenticated.try_acquire_owned() else {
                                tracing::debug!(%peer, "closing a connection without a client certificate: agent_api.max_unauthenticated_connections are open");
                                return;
                            };
                            Some((slot, Box::pin(tokio::time::sleep(lifetime))))
                        } else {
                            None
                        };
                        let _ = handoff
                            .send(Ok(LimitedConnection {
                                stream,
                                _slot: connection,
                                anonymous,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if sender.is_closed() {
                return;
            }
        }
    }
}

/// How often a refusal for too many connections is logged at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An agent API connection that holds one of the `max_connections` slots until it closes; one
/// without a client certificate also holds an unauthenticated slot and ends (reads see the end of
/// the stream) when its lifetime is over.
#[derive(Debug)]
pub struct LimitedConnection {
    stream: TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
    anonymous: Option<(OwnedSemaphorePermit, Pin<Box<tokio::time::Sleep>>)>,
}

impl Connected for LimitedConnection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some((_, expiry)) = self.anonymous.as_mut()
            && expiry.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    sigil_core::pass_writes_to!(
        stream: poll_write,
        poll_write_vectored,
        is_write_vectored,
        poll_flush,
        poll_shutdown,
    );
}

/// A fresh server SVID in a TLS configuration, with its expiry, the bundle sequence it was made
/// under, and the CA that signed it.
async fn build<D: DataStore>(
    state: &ServerState<D>,
) -> Result<(rustls::ServerConfig, i64, u64, String)> {
    let provider = crypto_provider();
    let key = KeyType::EcP256.generate()?;
    let id = server_id(state.ca.trust_domain());
    let svid = state
        .issuer
        .server_x509(&key, &id, &state.server_dns_names)?
        .recorded()
        .await?;
    let bundle = state.ca.bundle();
    let mut roots = RootCertStore::empty();
    for der in &bundle.x509_authorities {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| Error::ca_caused("a bundle certificate is not a usable root", e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::ca_caused("cannot build the client verifier", e))?;
    let (chain, key_der) = sigil_core::tls::chain_and_key(&svid.chain, key.serialize_der());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::ca_caused("TLS configuration", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| Error::ca_caused("TLS configuration", e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, svid.not_after, bundle.sequence, svid.authority_id))
}

/// The next connection on `listener`, or `None` once `stopped` turns true. A failed accept (out
/// of file descriptors, a connection reset before it was accepted) is logged and retried after a
/// pause, so one bad moment does not end the listener.
pub(crate) async fn accept_next(
    listener: &TcpListener,
    stopped: &mut watch::Receiver<bool>,
    listener_name: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => return None,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(e) => {
                tracing::warn!(error = %e, "accepting a {listener_name} connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

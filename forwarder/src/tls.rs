//! rustls pieces over the shared identity state: the certificate resolver (the newest SVID for
//! every new handshake) and the verifiers of inbound clients and outbound upstreams.
//!
//! A peer is authenticated when its leaf has exactly one URI SAN that is a SPIFFE ID, its chain
//! verifies, at the handshake's time, against the bundle of the peer's own trust domain, and the
//! leaf meets the rest of the X509-SVID profile (CA=false, key usage): never against a merged set of roots, so a federated CA cannot vouch
//! for our own domain. Policy is checked inside the verifier, so a refused peer gets a TLS alert
//! (`access_denied`, `unknown_ca`, `certificate_expired`, `bad_certificate`) from rustls itself.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sigil_core::id::SpiffeId;
use sigil_core::tls::crypto_provider;

use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::policy::{IdPattern, PeerPolicy, join_patterns};

/// Presents the current SVID, as a server and as a client.
#[derive(Debug)]
pub struct SvidResolver {
    store: Arc<IdentityStore>,
}

impl SvidResolver {
    /// A resolver over `store`.
    pub fn new(store: Arc<IdentityStore>) -> Self {
        SvidResolver { store }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.current_key()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a peer certificate was refused: a metric reason, a description for the log, and the TLS
/// error (which decides the alert).
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    why: String,
    error: CertificateError,
}

/// Authenticates a peer certificate: SVID profile, then the chain against its own domain's
/// bundle at `now`. Returns the peer's SPIFFE ID.
fn authenticate(
    store: &IdentityStore,
    algorithms: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Refusal> {
    let facts = sigil_core::x509::certificate_facts(end_entity).map_err(|e| Refusal {
        reason: "bad_identity",
        why: format!("the certificate does not parse: {e}"),
        error: CertificateError::BadEncoding,
    })?;
    let id = facts.spiffe_id.ok_or_else(|| Refusal {
        reason: "bad_identity",
        why: "the certificate does not carry exactly one URI SAN that is a SPIFFE ID".into(),
        error: CertificateError::BadEncoding,
    })?;
    let state = store.load();
    let trust_domain = id.trust_domain();
    let Some(roots) = state.roots(trust_domain) else {
        return Err(Refusal {
            reason: "untrusted",
            why: format!("{id}: no trust bundle for trust domain {trust_domain}"),
            error: CertificateError::UnknownIssuer,
        });
    };
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| Refusal {
        reason: "bad_identity",
        why: format!("{id}: the certificate does not parse: {e}"),
        error: CertificateError::BadEncoding,
    })?;
    cert.verify_for_usage(algorithms.all, roots, intermediates, now, usage, None, None)
        .map_err(|e| {
            let (reason, error) = match e {
                webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                    ("expired", CertificateError::Expired)
                }
                webpki::Error::RequiredEkuNotFoundContext(_) => {
                    ("bad_identity", CertificateError::InvalidPurpose)
                }
                // A bad signature from a same-named CA is as untrusted as an unknown issuer.
                _ => ("untrusted", CertificateError::UnknownIssuer),
            };
            Refusal {
                reason,
                why: format!(
                    "{id}: the chain does not verify against the bundle of {trust_domain}: {e}"
                ),
                error,
            }
        })?;
    // Trusted, so the profile is checked last: the finer reasons (CA=false, key usage) only
    // matter for certificates our own CAs signed.
    sigil_core::x509::check_leaf_profile(end_entity).map_err(|e| Refusal {
        reason: "bad_identity",
        why: format!("{id}: the certificate is not an X509-SVID: {e}"),
        error: CertificateError::BadEncoding,
    })?;
    Ok(id)
}

/// What both verifiers share: a listener's view of the identity state, and the one place a
/// refusal is logged and counted.
#[derive(Debug)]
struct Authenticator {
    listener: String,
    /// Who is refused, for the log line: `peer` (an inbound client) or `upstream`.
    role: &'static str,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Authenticator {
    fn new(
        listener: String,
        role: &'static str,
        store: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Authenticator {
            listener,
            role,
            store,
            metrics,
            algorithms: crypto_provider().signature_verification_algorithms,
        }
    }

    /// [`authenticate`] against the current state; a refusal is logged and counted.
    fn authenticate(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        authenticate(
            &self.store,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            usage,
        )
        .map_err(|refusal| self.refuse(refusal))
    }

    fn refuse(&self, refusal: Refusal) -> rustls::Error {
        tracing::warn!(
            listener = %self.listener,
            reason = refusal.reason,
            "refused {}: {}",
            self.role,
            refusal.why
        );
        self.metrics.refuse(&self.listener, refusal.reason);
        rustls::Error::InvalidCertificate(refusal.error)
    }
}

/// Verifies inbound clients: authenticated, then the listener's [`PeerPolicy`].
#[derive(Debug)]
pub struct ClientVerifier {
    peers: Authenticator,
    policy: PeerPolicy,
}

impl ClientVerifier {
    /// A verifier for the inbound listener `listener`.
    pub fn new(
        listener: String,
        store: Arc<IdentityStore>,
        policy: PeerPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        ClientVerifier {
            peers: Authenticator::new(listener, "peer", store, metrics),
            policy,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the roots change with rotation and federation, and a client with one SVID
        // has nothing to choose from anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self.peers.authenticate(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let own = self.peers.store.load().trust_domain();
        self.policy.check(&id, own.as_ref()).map_err(|rule| {
            self.peers.refuse(Refusal {
                reason: "policy",
                why: format!("{id} refused by {rule}"),
                error: CertificateError::ApplicationVerificationFailure,
            })
        })?;
        Ok(ClientCertVerified::assertion())
    }

    sigil_core::handshake_signatures!(peers.algorithms);
}

/// Verifies outbound upstreams: authenticated, and the ID one of the expected ones. The TLS server
/// name is not checked: a SPIFFE peer is named by its ID.
#[derive(Debug)]
pub struct UpstreamVerifier {
    upstreams: Authenticator,
    expect: Vec<IdPattern>,
}

impl UpstreamVerifier {
    /// A verifier for the outbound listener `listener`.
    pub fn new(
        listener: String,
        store: Arc<IdentityStore>,
        expect: Vec<IdPattern>,
        metrics: Arc<Metrics>,
    ) -> Self {
        UpstreamVerifier {
            upstreams: Authenticator::new(listener, "upstream", store, metrics),
            expect,
        }
    }
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.upstreams.authenticate(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if self.expect.iter().any(|pattern| pattern.matches(&id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(self.upstreams.refuse(Refusal {
                reason: "upstream_identity",
                why: format!(
                    "the upstream presented {id}, expected {}",
                    join_patterns(&self.expect, " or ")
                ),
                error: CertificateError::ApplicationVerificationFailure,
            }))
        }
    }

    sigil_core::handshake_signatures!(upstreams.algorithms);
}

/// ring's provider with AES-128-GCM first: as safe as AES-256-GCM for these short-lived
/// sessions and cheaper per byte (AES decryption was the forwarder's largest cost in user space
/// under bulk load). Both ends of a forwarder pair send this order, so it is what they agree on.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = (*crypto_provider()).clone();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The server configuration of an inbound listener (`alpn`: `h2` and `http/1.1` in HTTP mode).
pub fn server_config(
    store: Arc<IdentityStore>,
    verifier: Arc<ClientVerifier>,
    alpn: bool,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SvidResolver::new(store)));
    if alpn {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    // No resumption: a resumed session skips the verifier, so a peer refused by a newer policy or
    // bundle (or whose SVID expired) could come back on an old ticket.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client configuration of an outbound listener.
pub fn client_config(
    store: Arc<IdentityStore>,
    verifier: Arc<UpstreamVerifier>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SvidResolver::new(store)));
    // Every connection verifies the upstream against the current bundle (see server_config).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests;

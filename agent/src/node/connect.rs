//! A gRPC channel to the servers' agent API over TLS that authenticates each server by SPIFFE ID.
//! The channel connects through [`Servers::connect`], which picks one of the configured servers.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use sigil_core::id::{TrustDomain, server_id};
use sigil_core::tls::{SpiffeServerVerifier, crypto_provider};
use sigil_proto::agent::agent_api_client::AgentApiClient;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::{AgentIdentity, Servers};
use crate::{Error, Result};

/// How often an idle connection is pinged, and how long a ping may go unanswered before the
/// connection counts as broken: a server that vanished without closing its connections (a node
/// lost, a network split) is noticed within these, not after the kernel's TCP timeouts.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// An open channel to the agent API.
#[derive(Debug, Clone)]
pub struct ServerConnection {
    /// The generated client; clone it freely, clones share the connection.
    pub client: AgentApiClient<Channel>,
}

/// Connects to one of `servers` (`host:port`, or [`Servers`]), trusting `roots` (DER) for the
/// servers of `trust_domain`, and presenting `identity` as the client certificate when given.
///
/// The channel connects lazily and reconnects by itself, so an agent started while every server is
/// away still starts; calls fail with `Unavailable` until a server answers.
pub async fn connect(
    servers: impl Into<Servers>,
    trust_domain: &TrustDomain,
    roots: &[Vec<u8>],
    identity: Option<&AgentIdentity>,
) -> Result<ServerConnection> {
    Ok(ServerConnection {
        client: AgentApiClient::new(server_channel(servers, trust_domain, roots, identity)?),
    })
}

/// Connects to one of `servers` without authenticating it at all: the insecure bootstrap, for
/// development only. Whatever answers is trusted, and so is the bundle it hands out.
pub async fn connect_insecure(servers: impl Into<Servers>) -> Result<ServerConnection> {
    let servers = servers.into();
    tracing::warn!(
        servers = %servers.describe(),
        "INSECURE BOOTSTRAP: the server is not authenticated on first contact; anyone on the network path can impersonate it. Use trust_bundle_path outside development."
    );
    let verifier = AcceptAnyServer(crypto_provider().signature_verification_algorithms);
    Ok(ServerConnection {
        client: AgentApiClient::new(channel_with(servers, Arc::new(verifier), None)?),
    })
}

/// A channel to one of `servers`, each authenticated by its SPIFFE ID against `roots`, for the
/// agent API and the servers' other services on the same port (such as Istio's certificate
/// service).
pub fn server_channel(
    servers: impl Into<Servers>,
    trust_domain: &TrustDomain,
    roots: &[Vec<u8>],
    identity: Option<&AgentIdentity>,
) -> Result<Channel> {
    let verifier = SpiffeServerVerifier::new(roots, server_id(trust_domain))?;
    channel_with(servers.into(), Arc::new(verifier), identity)
}

fn channel_with(
    servers: Servers,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    identity: Option<&AgentIdentity>,
) -> Result<Channel> {
    let connect_error = |reason: String| Error::Connect {
        address: servers.describe(),
        reason,
    };
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| connect_error(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => {
            let (chain, key) =
                sigil_core::tls::chain_and_key(&identity.chain, identity.key.serialize_der());
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| connect_error(format!("unusable agent SVID: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));

    // The TLS server name is required by the API but not checked: the verifier checks the
    // server's SPIFFE ID instead.
    let server_name =
        ServerName::try_from("sigil-server").map_err(|e| connect_error(e.to_string()))?;
    // The URI only names the `:authority` of requests; the connector chooses the server.
    let channel = Endpoint::from_static("http://sigil-server")
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let servers = servers.clone();
            async move {
                let tls = servers.connect(&connector, &server_name).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }));
    Ok(channel)
}

/// The insecure bootstrap's verifier: it accepts any server certificate (but still checks that
/// the handshake is signed by the key in it).
#[derive(Debug)]
struct AcceptAnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    sigil_core::handshake_signatures!(0);
}

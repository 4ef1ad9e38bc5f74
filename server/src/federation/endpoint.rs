//! The bundle endpoint: the own trust domain's SPIFFE bundle over HTTPS, for federated servers to
//! fetch. Profile `https_spiffe` serves it with the server's own X509-SVID; `https_web` with a
//! certificate and key from files, reloaded when either file changes.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_core::bundle::TrustBundle;
use sigil_core::sync::MutexExt;
use sigil_core::tls::crypto_provider;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::api::tls::ServerTls;
use crate::{Error, Result};

/// How long a client has to finish its TLS handshake and request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the endpoint's TLS identity comes from.
#[derive(Debug, Clone)]
pub enum EndpointTls {
    /// The server's own X509-SVID (profile `https_spiffe`).
    Spiffe(Arc<ServerTls>),
    /// A web certificate from files (profile `https_web`).
    Web(Arc<FileCertificate>),
}

impl EndpointTls {
    fn config(&self) -> Result<Arc<rustls::ServerConfig>> {
        match self {
            EndpointTls::Spiffe(tls) => tls.bundle_endpoint_config(),
            EndpointTls::Web(files) => Ok(files.config.clone()),
        }
    }
}

/// A certificate chain and key read from PEM files, read again when a file's modification time
/// changes (certificate renewers such as cert-manager replace them in place).
#[derive(Debug)]
pub struct FileCertificate {
    /// Its resolver holds the files and the key in service.
    config: Arc<rustls::ServerConfig>,
}

#[derive(Debug)]
struct CertificateFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// The key in service, and the files' modification times it was read at.
    loaded: Mutex<(Arc<CertifiedKey>, Option<SystemTime>, Option<SystemTime>)>,
}

impl FileCertificate {
    /// Reads the files; a missing file or a key that does not match is an error at start-up.
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<Arc<Self>> {
        let key = read_certified_key(&cert_file, &key_file)?;
        let stamps = (modified(&cert_file), modified(&key_file));
        let source = Arc::new(CertificateFiles {
            cert_file,
            key_file,
            loaded: Mutex::new((key, stamps.0, stamps.1)),
        });
        Ok(Arc::new(FileCertificate {
            config: endpoint_config(source)?,
        }))
    }
}

/// The bundle endpoint's TLS: HTTP/1.1, no client certificate asked for, the certificate from
/// `certificates` (files, or the server's own SVID).
pub(crate) fn endpoint_config(
    certificates: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::ca_caused("TLS for the bundle endpoint", e))?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl CertificateFiles {
    /// The current key, re-read first if a file changed. A file that fails to read keeps the
    /// last good key in service (and says so in the log).
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock_unpoisoned();
        let stamps = (modified(&self.cert_file), modified(&self.key_file));
        if stamps != (loaded.1, loaded.2) {
            match read_certified_key(&self.cert_file, &self.key_file) {
                Ok(key) => {
                    tracing::info!(cert_file = %self.cert_file.display(), "reloaded the bundle endpoint certificate");
                    *loaded = (key, stamps.0, stamps.1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the bundle endpoint certificate; serving the previous one")
                }
            }
        }
        loaded.0.clone()
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_certified_key(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| Error::config(cert_file, format!("cannot read PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(Error::config(cert_file, "holds no certificate".to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| Error::config(key_file, format!("cannot read a PEM private key: {e}")))?;
    let certified = CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|e| {
        Error::config(
            key_file,
            format!("the key does not go with {}: {e}", cert_file.display()),
        )
    })?;
    Ok(Arc::new(certified))
}

/// Serves `bundle()` as SPIFFE bundle JSON to every GET on `listener` until `stopping`.
pub async fn serve(
    listener: TcpListener,
    tls: EndpointTls,
    bundle: Arc<dyn Fn() -> Arc<TrustBundle> + Send + Sync>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let Some((socket, peer)) =
            crate::api::tls::accept_next(&listener, &mut stopping, "bundle endpoint").await
        else {
            return;
        };
        let acceptor = match tls.config() {
            Ok(config) => TlsAcceptor::from(config),
            Err(e) => {
                tracing::warn!(error = %e, "the bundle endpoint has no TLS configuration");
                continue;
            }
        };
        let bundle = bundle.clone();
        tokio::spawn(async move {
            let served = tokio::time::timeout(CONNECTION_TIMEOUT, async move {
                let stream = acceptor.accept(socket).await?;
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let bundle = bundle.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &bundle())) }
                });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                    .map_err(std::io::Error::other)
            })
            .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bundle endpoint connection failed")
                }
                Err(_) => tracing::debug!(%peer, "bundle endpoint connection timed out"),
            }
        });
    }
}

fn answer<B>(request: &Request<B>, bundle: &TrustBundle) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the bundle endpoint answers GET only\n".into(),
        );
    }
    match bundle.to_spiffe_json() {
        Ok(document) => reply(StatusCode::OK, "application/json", document),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("the bundle cannot be encoded: {e}\n"),
        ),
    }
}

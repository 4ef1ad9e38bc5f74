//! One HTTPS GET of a bundle endpoint, with the TLS verification its profile asks for, bounded in
//! time and size, never following a redirect.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use sigil_core::bundle::MAX_BUNDLE_JSON_LEN;
use sigil_core::id::SpiffeId;
use sigil_core::tls::{SpiffeServerVerifier, crypto_provider};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long connecting, the handshake and the whole answer may take together.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS for an `https_spiffe` endpoint: its certificate must be an X509-SVID for `endpoint_id`
/// chaining to `roots` (the last bundle stored for its trust domain); the host name is not used.
pub(crate) fn spiffe_tls(
    roots: &[Vec<u8>],
    endpoint_id: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let verifier = SpiffeServerVerifier::new(roots, endpoint_id)
        .map_err(|e| format!("the stored bundle cannot authenticate the endpoint: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(with_http1(config)))
}

/// TLS for an `https_web` endpoint: a certificate for the URL's host from a CA the system
/// trusts (the platform store, or the file named by `SSL_CERT_FILE`).
pub(crate) fn web_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    for certificate in found.certs {
        // A system store may hold certificates rustls cannot use; the rest still count.
        let _ = roots.add(certificate);
    }
    if roots.is_empty() {
        return Err(format!(
            "no trusted web CA certificates were found on this system ({:?}); install ca-certificates or set SSL_CERT_FILE",
            found.errors
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(with_http1(config)))
}

fn with_http1(mut config: rustls::ClientConfig) -> rustls::ClientConfig {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// GETs `url` over `tls` and returns the body, or why not.
pub(crate) async fn fetch(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<String, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_unbounded(url, tls))
        .await
        .map_err(|_| format!("no complete answer within {FETCH_TIMEOUT:?}"))?
}

async fn fetch_unbounded(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.clone())
        .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {host}:{port} failed: {e}"))?;
    tokio::spawn(connection);
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("the request to {url} failed: {e}"))?;
    let status = response.status();
    if status.is_redirection() {
        let location = response
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("?");
        return Err(format!(
            "the endpoint redirects ({status}) to {location}; redirects are not followed: configure the final URL"
        ));
    }
    if !status.is_success() {
        return Err(format!("the endpoint answered {status}"));
    }
    let body = Limited::new(response.into_body(), MAX_BUNDLE_JSON_LEN)
        .collect()
        .await
        .map_err(|e| {
            format!("reading the answer failed (larger than {MAX_BUNDLE_JSON_LEN} bytes?): {e}")
        })?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the answer is not UTF-8 text".to_string())
}

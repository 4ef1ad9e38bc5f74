//! HTTP mode of an inbound listener: HTTP/1.1 and HTTP/2 from callers (by ALPN, or the HTTP/2
//! preface), HTTP/1.1 to the application, `x-forwarded-client-cert` set as Envoy sets it
//! (`By=<own id>;URI=<peer id>`, any incoming one removed), and the listener's HTTP rules.
//!
//! Each request is checked in this order: the request target (origin-form or absolute-form, no
//! CONNECT, at most `max_path_length` bytes: 400 or 414), the method (no standard method in
//! another case: 400), the path normalised once ([`crate::path`]: 400 when refused), then the
//! rules on the normalised path (403). The application receives the normalised path and the
//! query as sent: what the rules checked is what it serves.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_core::id::SpiffeId;
use sigil_core::untrusted::untrusted;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::path::{EscapedSlashes, normalize};
use crate::policy::{HttpRule, check_http, check_method};

/// The header that carries the caller's identity to the application.
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Headers that belong to one hop, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP side of one inbound listener.
#[derive(Debug)]
pub(crate) struct HttpProxy {
    listener: String,
    target: String,
    rules: Vec<HttpRule>,
    escaped_slashes: EscapedSlashes,
    max_path_length: usize,
    client: Client<HttpConnector, Incoming>,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    header_timeout: std::time::Duration,
}

/// A refused request: the status, the metric's reason label, and the message for the caller and
/// the log.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    why: String,
}

impl Refusal {
    fn bad_request(why: String) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: "bad_request",
            why,
        }
    }
}

/// How a listener's requests are checked.
#[derive(Debug, Clone)]
pub(crate) struct RequestChecks {
    pub(crate) rules: Vec<HttpRule>,
    pub(crate) escaped_slashes: EscapedSlashes,
    pub(crate) max_path_length: usize,
}

impl HttpProxy {
    pub(crate) fn new(
        listener: String,
        target: String,
        checks: RequestChecks,
        connect_timeout: std::time::Duration,
        header_timeout: std::time::Duration,
        store: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        HttpProxy {
            listener,
            target,
            rules: checks.rules,
            escaped_slashes: checks.escaped_slashes,
            max_path_length: checks.max_path_length,
            client: Client::builder(TokioExecutor::new()).build(connector),
            store,
            metrics,
            header_timeout,
        }
    }

    /// The request target the application receives (the normalised path and the query as
    /// sent), or why the request is refused.
    fn admit(
        &self,
        request: &Request<Incoming>,
        peer: Option<&SpiffeId>,
    ) -> Result<String, Refusal> {
        let method = request.method().as_str();
        let uri = request.uri();
        let target_length = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_length > self.max_path_length {
            return Err(Refusal {
                status: StatusCode::URI_TOO_LONG,
                reason: "path_too_long",
                why: format!(
                    "the request path and query are {target_length} bytes, over this listener's max_path_length of {}; shorten them or raise the limit",
                    self.max_path_length
                ),
            });
        }
        // A tunnel would carry bytes no rule sees; authority-form (`CONNECT host:port`) and
        // asterisk-form (`OPTIONS *`) have no path to check, and normalize() refuses them.
        if request.method() == http::Method::CONNECT {
            return Err(Refusal::bad_request(
                "CONNECT is not forwarded in HTTP mode; use a TCP listener (no --http) for tunnels"
                    .into(),
            ));
        }
        check_method(method).map_err(Refusal::bad_request)?;
        let path = normalize(uri.path(), self.escaped_slashes)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        check_http(&self.rules, peer, method, &path).map_err(|rule| Refusal {
            status: StatusCode::FORBIDDEN,
            reason: "http_policy",
            why: format!("forbidden by the forwarder's HTTP policy: {rule}"),
        })?;
        Ok(match uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        })
    }

    async fn handle(
        &self,
        mut request: Request<Incoming>,
        peer: Option<&SpiffeId>,
    ) -> Response<Body> {
        let path_and_query = match self.admit(&request, peer) {
            Ok(target) => target,
            Err(refusal) => {
                let caller =
                    peer.map_or_else(|| "unauthenticated".to_string(), ToString::to_string);
                tracing::warn!(
                    listener = %self.listener,
                    peer = %caller,
                    method = %untrusted(request.method().as_str()),
                    path = %untrusted(request.uri().path()),
                    "refused request: {}",
                    refusal.why
                );
                self.metrics.refuse(&self.listener, refusal.reason);
                return text(refusal.status, format!("{}\n", refusal.why));
            }
        };
        let authority = request.uri().authority().map(|a| a.to_string());
        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        // Only the forwarder may say who the caller is: whatever the caller sent is dropped.
        headers.remove(XFCC);
        if let Some(peer) = peer {
            let own = self
                .store
                .load()
                .svid
                .as_ref()
                .map(|svid| svid.id.to_string());
            if let Some(value) =
                own.and_then(|own| HeaderValue::from_str(&format!("By={own};URI={peer}")).ok())
            {
                headers.insert(XFCC, value);
            }
        }
        // HTTP/2 callers carry the host in :authority, HTTP/1.1 callers in absolute-form in the
        // target, and either wins over a Host header (RFC 9113 8.3.1, RFC 9112 3.2.2); the
        // application speaks HTTP/1.1 with origin-form targets.
        if let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            headers.insert(HOST, value);
        }
        let Ok(uri) = format!("http://{}{path_and_query}", self.target).parse::<Uri>() else {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "`{}` is not a valid request target\n",
                    untrusted(&path_and_query)
                ),
            );
        };
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        match self.client.request(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                tracing::warn!(listener = %self.listener, target = %self.target, "the application did not answer: {e:#}");
                self.metrics.refuse(&self.listener, "connect_failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "the forwarder cannot reach the application at {}\n",
                        self.target
                    ),
                )
            }
        }
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves HTTP on one accepted connection until it ends; at shutdown, finishes the requests in
/// flight and closes (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`).
pub(crate) async fn serve<S>(
    io: S,
    peer: Option<SpiffeId>,
    proxy: Arc<HttpProxy>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let listener = proxy.listener.clone();
    let header_timeout = proxy.header_timeout;
    let service = service_fn(move |request| {
        let (proxy, peer) = (proxy.clone(), peer.clone());
        async move { Ok::<_, Infallible>(proxy.handle(request, peer.as_ref()).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A caller that trickles its request headers (an HTTP slowloris, never idle) is cut off.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(listener = %listener, "HTTP connection ended: {e}");
            }
        }
        () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

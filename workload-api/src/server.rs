//! The Workload API server: the tonic service over an [`IdentitySource`], served on the socket
//! [`bind_socket`] creates. Each accepted connection's process is held from accept (see
//! [`crate::peer`]) and every call is attested as that process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use sigil_core::bundle::TrustBundle;
use sigil_core::selector::Selector;
use sigil_proto::codec::Encoded;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::authority::AuthorityRewrite;
use crate::peer::Peer;
use crate::shared::{Rendered, SharedResponses};
pub use crate::socket::bind_socket;
use crate::source::{Caller, IdentitySource, X509View};
use crate::{Error, HEADER, Result, jwt};

/// At most this many concurrent streams per client connection, so one client cannot hold an
/// unbounded share of the agent.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// The Workload API over an identity source.
#[derive(Debug)]
pub struct WorkloadApi<S> {
    source: Arc<S>,
    stopping: watch::Receiver<bool>,
    proc_root: PathBuf,
    responses: Arc<Responses>,
}

/// The encoded responses the streams send, shared by content (see [`crate::shared`]).
#[derive(Debug)]
struct Responses {
    x509_svids: SharedResponses<X509View, Encoded>,
    x509_bundles: SharedResponses<Vec<Arc<TrustBundle>>, Encoded>,
    jwt_bundles: SharedResponses<Vec<Arc<TrustBundle>>, Encoded>,
}

impl<S: IdentitySource> WorkloadApi<S> {
    /// The service; its streams end when `stopping` turns true.
    pub fn new(source: Arc<S>, stopping: watch::Receiver<bool>) -> Self {
        WorkloadApi {
            source,
            stopping,
            proc_root: PathBuf::from("/proc"),
            responses: Arc::new(Responses {
                x509_svids: SharedResponses::new(),
                x509_bundles: SharedResponses::new(),
                jwt_bundles: SharedResponses::new(),
            }),
        }
    }

    /// Where callers' processes are found at accept (default `/proc`, for agents that mount the
    /// host's proc filesystem elsewhere).
    pub fn with_proc_root(mut self, proc_root: PathBuf) -> Self {
        self.proc_root = proc_root;
        self
    }

    /// Wraps the service for tonic.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }
}

/// Serves the Workload API and SDS on `listener` until `stopping` turns true.
pub async fn serve<S: IdentitySource>(
    listener: UnixListener,
    api: WorkloadApi<S>,
    sds: crate::sds::Sds<S>,
    limits: crate::authority::HeaderLimits,
    mut stopping: watch::Receiver<bool>,
) -> Result<()> {
    let proc_root = api.proc_root.clone();
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // The rewriter holds header lists to this already; the server advertises it to clients.
        .http2_max_header_list_size(u32::try_from(limits.max_header_list_size).unwrap_or(u32::MAX))
        .add_service(api.into_service())
        .add_service(sds.into_service())
        .serve_with_incoming_shutdown(
            // The process is held at accept, before the caller can do anything else.
            UnixListenerStream::new(listener).map_ok(move |stream| {
                let peer = Peer::accept(&stream, &proc_root);
                AuthorityRewrite::new(stream, peer, limits)
            }),
            async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            },
        )
        .await
        .map_err(|e| Error::Io {
            context: "serving the Workload API".into(),
            source: std::io::Error::other(e),
        })
}

/// Checks the header and reads the caller's peer credentials.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let header = request.metadata().get(HEADER).and_then(|v| v.to_str().ok());
    if header != Some("true") {
        return Err(Status::invalid_argument(format!(
            "security header missing: every Workload API call must carry the metadata `{HEADER}: true`"
        )));
    }
    peer_caller(request)
}

/// The caller of a unary call (see [`caller`]) and the call's message.
fn caller_and_message<T>(request: Request<T>) -> Result<(Caller, T), Status> {
    Ok((caller(&request)?, request.into_inner()))
}

/// The caller as held since its connection was accepted (see [`crate::peer`]).
pub(crate) fn peer_caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let peer = request.extensions().get::<Peer>().ok_or_else(|| {
        Status::permission_denied("cannot read the caller's credentials from the socket")
    })?;
    peer.caller()
        .map_err(|reason| Status::permission_denied(reason.to_string()))
}

fn concat_der(certificates: &[Vec<u8>]) -> Vec<u8> {
    certificates.concat()
}

fn x509_response(view: &X509View) -> X509svidResponse {
    let bundle = concat_der(&view.bundle.x509_authorities);
    X509svidResponse {
        svids: view
            .svids
            .iter()
            .map(|svid| sigil_proto::workload::X509svid {
                spiffe_id: svid.spiffe_id.clone(),
                x509_svid: concat_der(&svid.chain),
                x509_svid_key: svid.key.to_vec(),
                bundle: bundle.clone(),
                hint: svid.hint.clone(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: view
            .federated
            .iter()
            .map(|b| (b.trust_domain.id_string(), concat_der(&b.x509_authorities)))
            .collect(),
    }
}

fn x509_bundles(bundles: &[Arc<TrustBundle>]) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: bundles
            .iter()
            .map(|b| (b.trust_domain.id_string(), concat_der(&b.x509_authorities)))
            .collect(),
    }
}

fn jwt_bundles(bundles: &[Arc<TrustBundle>]) -> Result<JwtBundlesResponse, Status> {
    let mut documents = HashMap::new();
    for bundle in bundles {
        let mut keys_only = TrustBundle::new(bundle.trust_domain.clone());
        keys_only.jwt_authorities = bundle.jwt_authorities.clone();
        keys_only.sequence = bundle.sequence;
        keys_only.refresh_hint_seconds = bundle.refresh_hint_seconds;
        let json = keys_only
            .to_spiffe_json()
            .map_err(|e| Status::internal(format!("cannot encode the JWT bundle: {e}")))?;
        documents.insert(bundle.trust_domain.id_string(), json.into_bytes());
    }
    Ok(JwtBundlesResponse { bundles: documents })
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

/// What a stream renders on each change: the shared response for the content it may see now.
type Render<S, K> = Box<
    dyn for<'a> Fn(
            &'a S,
        )
            -> futures::future::BoxFuture<'a, Result<Arc<Rendered<K, Encoded>>, Status>>
        + Send
        + Sync,
>;

/// Runs `render` now and after every change, sending each response that differs from the last,
/// until the client leaves, the agent stops, or `render` fails (the error is sent, then the
/// stream ends). A stream holds only the shared response it sent last.
fn follow<S, K>(
    source: Arc<S>,
    mut stopping: watch::Receiver<bool>,
    render: Render<S, K>,
) -> ResponseStream
where
    S: IdentitySource,
    K: Send + Sync + 'static,
{
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut changes = source.changes();
        let mut last: Option<Arc<Rendered<K, Encoded>>> = None;
        loop {
            changes.borrow_and_update();
            match render(&source).await {
                Ok(rendered) => {
                    // Equal content is the same shared response while this stream holds it.
                    if !last
                        .as_ref()
                        .is_some_and(|sent| Arc::ptr_eq(sent, &rendered))
                    {
                        let bytes = rendered.value().clone();
                        last = Some(rendered);
                        if sender.send(Ok(bytes)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(status) => {
                    let _ = sender.send(Err(status)).await;
                    return;
                }
            }
            let stop = tokio::select! {
                changed = changes.changed() => changed.is_err(),
                () = sender.closed() => true,
                _ = stopping.wait_for(|stop| *stop) => true,
            };
            if stop {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}

fn no_identity() -> Status {
    Status::permission_denied(
        "no identity issued: no registration entry matches this workload's selectors",
    )
}

impl<S: IdentitySource> WorkloadApi<S> {
    /// The stream of both bundle calls: the trust bundles `caller` may see, as `encode` answers
    /// them (shared through `pick`'s table), sent again whenever they change.
    async fn follow_bundles(
        &self,
        caller: Caller,
        pick: fn(&Responses) -> &SharedResponses<Vec<Arc<TrustBundle>>, Encoded>,
        encode: fn(&[Arc<TrustBundle>]) -> Result<Encoded, Status>,
    ) -> Result<Response<ResponseStream>, Status> {
        let selectors: Arc<Vec<Selector>> = Arc::new(self.source.attest(caller).await?);
        let responses = self.responses.clone();
        let render: Render<S, Vec<Arc<TrustBundle>>> = Box::new(move |source: &S| {
            let selectors = selectors.clone();
            let responses = responses.clone();
            Box::pin(async move {
                let bundles = source.bundles(&selectors)?;
                pick(&responses).get_or_render(bundles, |bundles| encode(bundles))
            })
        });
        Ok(Response::new(follow(
            self.source.clone(),
            self.stopping.clone(),
            render,
        )))
    }
}

#[tonic::async_trait]
impl<S: IdentitySource> SpiffeWorkloadApi for WorkloadApi<S> {
    type FetchX509SVIDStream = ResponseStream;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = caller(&request)?;
        let selectors: Arc<Vec<Selector>> = Arc::new(self.source.attest(caller).await?);
        // Fail the call itself (not just the stream) when the caller has no identity at all.
        let first = self.source.x509_view(&selectors).await?;
        if first.svids.is_empty() {
            return Err(no_identity());
        }
        let responses = self.responses.clone();
        let render: Render<S, X509View> = Box::new(move |source: &S| {
            let selectors = selectors.clone();
            let responses = responses.clone();
            Box::pin(async move {
                let view = source.x509_view(&selectors).await?;
                if view.svids.is_empty() {
                    return Err(no_identity());
                }
                responses
                    .x509_svids
                    .get_or_render(view, |view| Ok(Encoded::new(&x509_response(view))))
            })
        });
        Ok(Response::new(follow(
            self.source.clone(),
            self.stopping.clone(),
            render,
        )))
    }

    type FetchX509BundlesStream = ResponseStream;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.follow_bundles(
            caller(&request)?,
            |responses| &responses.x509_bundles,
            |bundles| Ok(Encoded::new(&x509_bundles(bundles))),
        )
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let (caller, request) = caller_and_message(request)?;
        if request.audience.is_empty() || request.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "audience is required: ask for at least one non-empty audience",
            ));
        }
        let selectors = self.source.attest(caller).await?;
        let wanted = Some(request.spiffe_id.as_str()).filter(|id| !id.is_empty());
        let svids = self
            .source
            .jwt_svids(&selectors, &request.audience, wanted)
            .await?;
        if svids.is_empty() {
            return Err(no_identity());
        }
        Ok(Response::new(JwtsvidResponse {
            svids: svids
                .into_iter()
                .map(|svid| sigil_proto::workload::Jwtsvid {
                    spiffe_id: svid.spiffe_id,
                    svid: svid.token,
                    hint: svid.hint,
                })
                .collect(),
        }))
    }

    type FetchJWTBundlesStream = ResponseStream;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.follow_bundles(
            caller(&request)?,
            |responses| &responses.jwt_bundles,
            |bundles| Ok(Encoded::new(&jwt_bundles(bundles)?)),
        )
        .await
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let (caller, request) = caller_and_message(request)?;
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if request.svid.is_empty() {
            return Err(Status::invalid_argument(
                "svid is required: pass the JWT-SVID to validate",
            ));
        }
        let selectors = self.source.attest(caller).await?;
        let bundles = self.source.bundles(&selectors)?;
        let valid = jwt::validate(
            &request.svid,
            &request.audience,
            &bundles,
            self.source.now(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id,
            claims: Some(to_struct(valid.claims)),
        }))
    }
}

fn to_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

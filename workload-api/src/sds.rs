//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket, so Envoy (and Istio's
//! sidecars, which point Envoy straight at this socket) take their certificates from the agent.
//!
//! Resource names: `default` (the caller's SVID as a TLS certificate), `ROOTCA` (the own trust
//! bundle as a validation context), `ALL` (every bundle the caller may use), `spiffe://<td>` (that
//! domain's bundle) and a SPIFFE ID (that SVID). The caller is attested like any workload, from its
//! peer credentials, so an Envoy receives only its own pod's identity.
//!
//! State-of-the-world streams follow the xDS protocol: every response carries a version (a digest
//! of its content) and a nonce; a request that acknowledges the current version is not answered
//! again, a NACK (a request with `error_detail`) is logged, and every rotation or bundle change is
//! pushed. Delta streams (Envoy's `DELTA_GRPC`) track subscriptions and send only the resources
//! whose version changed, each with its own version. Each secret is encoded once per content
//! and the encoding shared by every stream that serves it (the crate's `shared` module).
//!
//! Every request is bounded by [`Sds::with_max_resource_names`] (default
//! [`DEFAULT_MAX_RESOURCE_NAMES`]): a request naming more resources, or a delta stream subscribing
//! to more, is refused with `InvalidArgument`. Repeated names are answered once, and a delta
//! stream keeps the versions Envoy says it holds only for resources it subscribed to, so what a
//! stream keeps is bounded by what it subscribed to.
//!
//! Validation contexts for several trust domains use Envoy's SPIFFE certificate validator, which
//! checks each peer against its own domain's bundle. An Envoy that cannot use it (an older build,
//! or a policy of plain validation) sets the node metadata `disable_spiffe_cert_validation: true`
//! (the key SPIRE's agent honours too) and gets every bundle as one plain `trusted_ca` instead.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use prost::Message;
use ring::digest::{SHA256, digest};
use sigil_core::bundle::TrustBundle;
use sigil_core::selector::Selector;
use sigil_core::untrusted::untrusted;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server::peer_caller;
use crate::shared::{Rendered, SharedResponses};
use crate::source::{IdentitySource, X509Svid, X509View};

mod bounds;
mod secrets;
pub use bounds::BoundedRequests;
use secrets::{tls_certificate, validation_context, wants_plain_validation};

/// The type URL of every SDS resource.
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The node metadata key by which an Envoy asks for plain `trusted_ca` validation contexts.
pub const PLAIN_VALIDATION_METADATA: &str = "disable_spiffe_cert_validation";

/// The configurable names of the three well-known resources (Istio asks for `default` and
/// `ROOTCA`).
#[derive(Debug, Clone)]
pub struct SdsNames {
    /// The caller's own SVID (Istio asks for `default`).
    pub default_svid: String,
    /// The own trust bundle (Istio asks for `ROOTCA`).
    pub own_bundle: String,
    /// Every bundle the caller may use.
    pub all_bundles: String,
}

/// The default of [`Sds::with_max_resource_names`], the agent's `sds.max_resource_names`.
pub const DEFAULT_MAX_RESOURCE_NAMES: usize = 64;

/// The length of the versions this service sends (hex of 12 digest bytes); a version Envoy
/// claims to hold that has another length cannot be one of ours.
const VERSION_LEN: usize = 24;

/// The SDS service over an identity source.
#[derive(Debug)]
pub struct Sds<S> {
    source: Arc<S>,
    names: SdsNames,
    stopping: watch::Receiver<bool>,
    max_resource_names: usize,
    secrets: Arc<SharedResponses<SecretSource, EncodedSecret>>,
}

/// What one secret is rendered from: equal sources render equal secrets, so every stream that
/// needs it shares one encoding (see [`crate::shared`]).
#[derive(Debug, PartialEq, Eq, Hash)]
enum SecretSource {
    Certificate {
        name: String,
        svid: X509Svid,
    },
    Validation {
        name: String,
        bundles: Vec<Arc<TrustBundle>>,
        plain: bool,
    },
}

/// One secret, encoded once, and its version (a digest of the encoding).
#[derive(Debug)]
struct EncodedSecret {
    bytes: Vec<u8>,
    version: String,
}

/// The secrets one response carries.
type Secrets = Vec<Arc<Rendered<SecretSource, EncodedSecret>>>;

// Not derived: a derive would ask `S: Clone`, and only the `Arc` is cloned.
impl<S> Clone for Sds<S> {
    fn clone(&self) -> Self {
        Sds {
            source: self.source.clone(),
            names: self.names.clone(),
            stopping: self.stopping.clone(),
            max_resource_names: self.max_resource_names,
            secrets: self.secrets.clone(),
        }
    }
}

/// What a stream's task does next: a request arrived (`Some`), or secrets may have changed
/// (`None`); `Err` when the stream or the agent is done, with the status to end the stream with
/// when its requests failed (one refused before it was decoded, see [`BoundedRequests`]).
async fn next_event<T>(
    inbound: &mut Streaming<T>,
    changes: &mut watch::Receiver<u64>,
    stopping: &mut watch::Receiver<bool>,
) -> Result<Option<T>, StreamEnd> {
    tokio::select! {
        message = inbound.message() => match message {
            Ok(Some(request)) => Ok(Some(request)),
            Ok(None) => Err(None),
            Err(status) => Err(Some(status)),
        },
        changed = changes.changed() => changed.map(|()| None).map_err(|_| None),
        _ = stopping.wait_for(|stop| *stop) => Err(None),
    }
}

impl<S: IdentitySource> Sds<S> {
    /// The service; its streams end when `stopping` turns true.
    pub fn new(source: Arc<S>, names: SdsNames, stopping: watch::Receiver<bool>) -> Self {
        Sds {
            source,
            names,
            stopping,
            max_resource_names: DEFAULT_MAX_RESOURCE_NAMES,
            secrets: Arc::new(SharedResponses::new()),
        }
    }

    /// Bounds the resource names one request may carry (in each of a delta request's lists), and
    /// the resources one delta stream may subscribe to. Default [`DEFAULT_MAX_RESOURCE_NAMES`].
    pub fn with_max_resource_names(mut self, max: usize) -> Self {
        self.max_resource_names = max;
        self
    }

    /// Wraps the service for tonic, with the resource-name bound checked on every request before
    /// it is decoded.
    pub fn into_service(self) -> BoundedRequests<SecretDiscoveryServiceServer<Self>> {
        let max = self.max_resource_names;
        BoundedRequests::new(SecretDiscoveryServiceServer::new(self), max)
    }
}

impl<S: IdentitySource> Sds<S> {
    /// The secrets `names` resolve to for a caller with `selectors`, and their version (of one
    /// secret its own, of several a digest of theirs); `plain` asks for plain `trusted_ca`
    /// validation contexts.
    async fn render(
        &self,
        selectors: &[Selector],
        names: &[String],
        plain: bool,
    ) -> Result<(String, Secrets), Status> {
        let view: X509View = self.source.x509_view(selectors).await?;
        let bundles = self.source.bundles(selectors)?;
        let mut secrets = Vec::with_capacity(names.len());
        for name in names {
            let source = self.secret_source(name, &view, &bundles, plain)?;
            secrets.push(self.secrets.get_or_render(source, |source| {
                let bytes = match source {
                    SecretSource::Certificate { name, svid } => {
                        tls_certificate(name, &svid.chain, &svid.key)
                    }
                    SecretSource::Validation {
                        name,
                        bundles,
                        plain,
                    } => validation_context(name, bundles, *plain),
                }
                .encode_to_vec();
                let version = hex_digest(&bytes);
                Ok(EncodedSecret { bytes, version })
            })?);
        }
        let version = match secrets.as_slice() {
            [one] => one.value().version.clone(),
            several => hex_digest(
                several
                    .iter()
                    .map(|secret| secret.value().version.as_str())
                    .collect::<String>()
                    .as_bytes(),
            ),
        };
        Ok((version, secrets))
    }

    /// What the secret `name` is made of for this caller, or why it may not have it.
    fn secret_source(
        &self,
        name: &str,
        view: &X509View,
        bundles: &[Arc<TrustBundle>],
        plain: bool,
    ) -> Result<SecretSource, Status> {
        let validation = |bundles: &[Arc<TrustBundle>]| SecretSource::Validation {
            name: name.to_owned(),
            bundles: bundles.to_vec(),
            plain,
        };
        if name == self.names.default_svid {
            let svid = view.svids.first().ok_or_else(|| {
                Status::permission_denied(
                    "no identity issued: no registration entry matches this Envoy",
                )
            })?;
            return Ok(SecretSource::Certificate {
                name: name.to_owned(),
                svid: svid.clone(),
            });
        }
        if name == self.names.own_bundle {
            return Ok(validation(std::slice::from_ref(&view.bundle)));
        }
        if name == self.names.all_bundles {
            return Ok(validation(bundles));
        }
        if let Some(bundle) = bundles.iter().find(|b| b.trust_domain.id_string() == name) {
            return Ok(validation(std::slice::from_ref(bundle)));
        }
        if let Some(svid) = view.svids.iter().find(|s| s.spiffe_id == name) {
            return Ok(SecretSource::Certificate {
                name: name.to_owned(),
                svid: svid.clone(),
            });
        }
        Err(Status::permission_denied(format!(
            "this caller may not have the secret `{}`: it is neither {}, {}, {}, a trust domain it may use, nor one of its SPIFFE IDs",
            untrusted(name),
            self.names.default_svid,
            self.names.own_bundle,
            self.names.all_bundles
        )))
    }
}

impl<S> Sds<S> {
    /// Applies a delta request to a stream's subscriptions and to the versions Envoy holds;
    /// refuses a subscription set over the bound (each request's lists are bounded before it is
    /// decoded, by [`BoundedRequests`]). Envoy says on a reconnect which versions it holds: only
    /// those of subscribed resources, in our version format, are kept.
    fn subscribe(
        &self,
        subscribed: &mut BTreeSet<String>,
        held: &mut HashMap<String, String>,
        request: DeltaDiscoveryRequest,
    ) -> Result<(), Status> {
        for name in request.resource_names_unsubscribe {
            subscribed.remove(&name);
            held.remove(&name);
        }
        subscribed.extend(request.resource_names_subscribe);
        let max = self.max_resource_names;
        if subscribed.len() > max {
            return Err(Status::invalid_argument(format!(
                "this stream would subscribe to {} resources; at most {max} are allowed (the agent's sds.max_resource_names)",
                subscribed.len()
            )));
        }
        for (name, version) in request.initial_resource_versions {
            if version.len() == VERSION_LEN && subscribed.contains(&name) {
                held.insert(name, version);
            }
        }
        Ok(())
    }
}

/// `names` without repeats, in the order first named. (How many a request may carry is checked
/// before it is decoded, by [`BoundedRequests`].)
fn distinct(names: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::with_capacity(names.len());
    names
        .into_iter()
        .filter(|name| seen.insert(name.clone()))
        .collect()
}

fn hex_digest(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A secret as a resource of a response: the shared encoding, copied into it.
fn secret_any(secret: &Rendered<SecretSource, EncodedSecret>) -> Any {
    Any {
        type_url: SECRET_TYPE.into(),
        value: secret.value().bytes.clone(),
    }
}

fn response(version: String, secrets: &Secrets, nonce: u64) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version,
        resources: secrets.iter().map(|secret| secret_any(secret)).collect(),
        type_url: SECRET_TYPE.into(),
        nonce: nonce.to_string(),
        ..DiscoveryResponse::default()
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How a stream's task ends: `Some` with the status to end the stream with, `None` to end it
/// quietly (Envoy left, the agent is stopping, or the response could not be sent).
type StreamEnd = Option<Status>;

/// One SDS stream, as its task sees it: the caller's selectors, Envoy's requests, what wakes the
/// task, and where its responses go.
struct SdsStream<Req, Resp> {
    selectors: Vec<Selector>,
    inbound: Streaming<Req>,
    changes: watch::Receiver<u64>,
    stopping: watch::Receiver<bool>,
    sender: mpsc::Sender<Result<Resp, Status>>,
}

impl<Req, Resp> SdsStream<Req, Resp> {
    /// A request arrived (`Some`), or secrets may have changed (`None`).
    async fn next(&mut self) -> Result<Option<Req>, StreamEnd> {
        next_event(&mut self.inbound, &mut self.changes, &mut self.stopping).await
    }

    async fn send(&self, response: Resp) -> Result<(), StreamEnd> {
        self.sender.send(Ok(response)).await.map_err(|_| None)
    }
}

impl<S: IdentitySource> Sds<S> {
    /// Attests the caller and serves its stream with `serve` in a task of its own; the status
    /// `serve` ends with, if any, is the stream's last message.
    async fn open<Req, Resp, Served>(
        &self,
        request: Request<Streaming<Req>>,
        serve: impl FnOnce(Self, SdsStream<Req, Resp>) -> Served,
    ) -> Result<Response<ResponseStream<Resp>>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        Served: Future<Output = Result<(), StreamEnd>> + Send + 'static,
    {
        let caller = peer_caller(&request)?;
        let selectors = self.source.attest(caller).await?;
        let (sender, receiver) = mpsc::channel(4);
        let stream = SdsStream {
            selectors,
            inbound: request.into_inner(),
            changes: self.source.changes(),
            stopping: self.stopping.clone(),
            sender: sender.clone(),
        };
        let served = serve(self.clone(), stream);
        tokio::spawn(async move {
            if let Err(Some(status)) = served.await {
                let _ = sender.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    /// A delta stream: tracks what Envoy subscribed to and the version it holds of each, and
    /// sends only what changed.
    async fn serve_delta(
        self,
        mut stream: SdsStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>,
    ) -> Result<(), StreamEnd> {
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        let mut held: HashMap<String, String> = HashMap::new();
        let mut plain = false;
        let mut nonce = 0u64;
        loop {
            if let Some(request) = stream.next().await? {
                if request.node.is_some() {
                    plain = wants_plain_validation(request.node.as_ref());
                }
                if let Some(error) = &request.error_detail {
                    tracing::warn!(nonce = %untrusted(&request.response_nonce), error = %untrusted(&error.message), "Envoy rejected delta SDS secrets (NACK)");
                    continue;
                }
                self.subscribe(&mut subscribed, &mut held, request)
                    .map_err(Some)?;
            }
            let resources = self
                .changed_resources(&stream.selectors, &subscribed, &mut held, plain)
                .await
                .map_err(Some)?;
            if resources.is_empty() {
                continue;
            }
            nonce += 1;
            stream
                .send(DeltaDiscoveryResponse {
                    system_version_info: system_version(&held),
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: nonce.to_string(),
                    ..DeltaDiscoveryResponse::default()
                })
                .await?;
        }
    }

    /// The subscribed resources whose version differs from the one Envoy holds (or that it has
    /// never been sent), each with its own version; `held` is updated to what is sent.
    async fn changed_resources(
        &self,
        selectors: &[Selector],
        subscribed: &BTreeSet<String>,
        held: &mut HashMap<String, String>,
        plain: bool,
    ) -> Result<Vec<Resource>, Status> {
        let mut resources = Vec::new();
        for name in subscribed {
            let (version, secrets) = self
                .render(selectors, std::slice::from_ref(name), plain)
                .await?;
            if held.get(name) == Some(&version) {
                continue;
            }
            for secret in &secrets {
                resources.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(secret_any(secret)),
                    ..Resource::default()
                });
            }
            held.insert(name.clone(), version);
        }
        Ok(resources)
    }

    /// A state-of-the-world stream: answers each new set of names, ignores ACKs and answers to
    /// older responses, logs NACKs, and pushes a new version whenever the secrets change.
    async fn serve_state_of_the_world(
        self,
        mut stream: SdsStream<DiscoveryRequest, DiscoveryResponse>,
    ) -> Result<(), StreamEnd> {
        let mut names: Option<Vec<String>> = None;
        // Envoy may send its node only on the first request of a stream.
        let mut plain = false;
        let mut sent_version = String::new();
        let mut nonce = 0u64;
        loop {
            if let Some(request) = stream.next().await? {
                if request.node.is_some() {
                    plain = wants_plain_validation(request.node.as_ref());
                }
                if !request.response_nonce.is_empty() && request.response_nonce != nonce.to_string()
                {
                    continue; // An answer to an older response; the newer one is on its way.
                }
                if let Some(error) = &request.error_detail {
                    tracing::warn!(version = %untrusted(&request.version_info), error = %untrusted(&error.message), "Envoy rejected SDS secrets (NACK)");
                    continue;
                }
                let requested = distinct(request.resource_names);
                let same_names = names.as_ref() == Some(&requested);
                names = Some(requested);
                if same_names && request.version_info == sent_version {
                    continue; // An ACK of what Envoy has.
                }
            }
            let Some(wanted) = &names else { continue };
            let (version, secrets) = self
                .render(&stream.selectors, wanted, plain)
                .await
                .map_err(Some)?;
            if version != sent_version {
                nonce += 1;
                sent_version = version.clone();
                stream.send(response(version, &secrets, nonce)).await?;
            }
        }
    }
}

/// A delta stream's overall version: a digest of the versions Envoy holds, in order.
fn system_version(held: &HashMap<String, String>) -> String {
    let mut versions: Vec<&str> = held.values().map(String::as_str).collect();
    versions.sort_unstable();
    hex_digest(versions.concat().as_bytes())
}

#[tonic::async_trait]
impl<S: IdentitySource> SecretDiscoveryService for Sds<S> {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.open(request, Self::serve_delta).await
    }

    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.open(request, Self::serve_state_of_the_world).await
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = peer_caller(&request)?;
        let selectors = self.source.attest(caller).await?;
        let request = request.into_inner();
        let plain = wants_plain_validation(request.node.as_ref());
        let names = distinct(request.resource_names);
        let (version, secrets) = self.render(&selectors, &names, plain).await?;
        Ok(Response::new(response(version, &secrets, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sds(max: usize) -> Sds<()> {
        Sds {
            source: Arc::new(()),
            names: SdsNames {
                default_svid: "default".into(),
                own_bundle: "ROOTCA".into(),
                all_bundles: "ALL".into(),
            },
            stopping: watch::channel(false).1,
            max_resource_names: max,
            secrets: Arc::new(SharedResponses::new()),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn repeated_names_are_answered_once() {
        assert_eq!(
            distinct(names(&["ROOTCA", "default", "ROOTCA", "default"])),
            names(&["ROOTCA", "default"])
        );
    }

    #[test]
    fn a_delta_stream_keeps_only_versions_of_what_it_subscribed_to() {
        let sds = sds(3);
        let (mut subscribed, mut held) = (BTreeSet::new(), HashMap::new());
        let ours = "0123456789abcdef01234567".to_string();
        let request = DeltaDiscoveryRequest {
            resource_names_subscribe: names(&["default"]),
            initial_resource_versions: [
                ("default".to_string(), ours.clone()),
                ("ROOTCA".to_string(), ours.clone()),
                ("ALL".to_string(), "x".repeat(10_000)),
            ]
            .into(),
            ..DeltaDiscoveryRequest::default()
        };
        sds.subscribe(&mut subscribed, &mut held, request)
            .expect("within the bound");
        assert_eq!(held, [("default".to_string(), ours)].into());
        let unsubscribe = DeltaDiscoveryRequest {
            resource_names_unsubscribe: names(&["default"]),
            ..DeltaDiscoveryRequest::default()
        };
        sds.subscribe(&mut subscribed, &mut held, unsubscribe)
            .expect("within the bound");
        assert!(subscribed.is_empty() && held.is_empty());
    }

    #[test]
    fn a_delta_stream_subscribes_to_at_most_the_bound() {
        let sds = sds(3);
        let (mut subscribed, mut held) = (BTreeSet::new(), HashMap::new());
        for (i, list) in [["a", "b"], ["c", "d"]].iter().enumerate() {
            let result = sds.subscribe(
                &mut subscribed,
                &mut held,
                DeltaDiscoveryRequest {
                    resource_names_subscribe: names(list),
                    ..DeltaDiscoveryRequest::default()
                },
            );
            match result {
                Ok(()) => assert_eq!(i, 0),
                Err(status) => {
                    assert_eq!(i, 1);
                    assert!(
                        status.message().contains("4 resources")
                            && status.message().contains("sds.max_resource_names"),
                        "{status:?}"
                    );
                }
            }
        }
    }
}

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
//! whose version changed, each with its own version.
//!
//! Validation contexts for several trust domains use Envoy's SPIFFE certificate validator, which
//! checks each peer against its own domain's bundle. An Envoy that cannot use it (an older build,
//! or a policy of plain validation) sets the node metadata `disable_spiffe_cert_validation: true`
//! (the key SPIRE's agent honours too) and gets every bundle as one plain `trusted_ca` instead.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source::Specifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::{Any, value::Kind};
use futures::Stream;
use prost::Message;
use ring::digest::{SHA256, digest};
use sigil_core::bundle::{TrustBundle, pem_block};
use sigil_core::selector::Selector;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server::peer_caller;
use crate::source::{IdentitySource, X509View};

/// The type URL of every SDS resource.
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The type URL of Envoy's SPIFFE certificate validator configuration.
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The node metadata key by which an Envoy asks for plain `trusted_ca` validation contexts.
pub const PLAIN_VALIDATION_METADATA: &str = "disable_spiffe_cert_validation";

/// Whether the Envoy that sent `node` asked for plain validation contexts (a boolean `true`, or
/// the string `"true"`, as YAML bootstraps often carry it).
fn wants_plain_validation(node: Option<&Node>) -> bool {
    let Some(metadata) = node.and_then(|node| node.metadata.as_ref()) else {
        return false;
    };
    match metadata
        .fields
        .get(PLAIN_VALIDATION_METADATA)
        .and_then(|value| value.kind.as_ref())
    {
        Some(Kind::BoolValue(flag)) => *flag,
        Some(Kind::StringValue(text)) => text.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

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

/// The SDS service over an identity source.
#[derive(Debug)]
pub struct Sds<S> {
    source: Arc<S>,
    names: SdsNames,
    stopping: watch::Receiver<bool>,
}

// Not derived: a derive would ask `S: Clone`, and only the `Arc` is cloned.
impl<S> Clone for Sds<S> {
    fn clone(&self) -> Self {
        Sds {
            source: self.source.clone(),
            names: self.names.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

/// What a stream's task does next: a request arrived (`Some`), or secrets may have changed
/// (`None`); `Err` when the stream or the agent is done.
async fn next_event<T>(
    inbound: &mut Streaming<T>,
    changes: &mut watch::Receiver<u64>,
    stopping: &mut watch::Receiver<bool>,
) -> Result<Option<T>, ()> {
    tokio::select! {
        message = inbound.message() => match message {
            Ok(Some(request)) => Ok(Some(request)),
            Ok(None) | Err(_) => Err(()),
        },
        changed = changes.changed() => changed.map(|()| None).map_err(|_| ()),
        _ = stopping.wait_for(|stop| *stop) => Err(()),
    }
}

impl<S: IdentitySource> Sds<S> {
    /// The service; its streams end when `stopping` turns true.
    pub fn new(source: Arc<S>, names: SdsNames, stopping: watch::Receiver<bool>) -> Self {
        Sds {
            source,
            names,
            stopping,
        }
    }

    /// Wraps the service for tonic.
    pub fn into_service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..DataSource::default()
    })
}

fn pem_chain(chain: &[Vec<u8>]) -> Vec<u8> {
    chain
        .iter()
        .map(|der| pem_block("CERTIFICATE", der))
        .collect::<String>()
        .into_bytes()
}

fn tls_certificate(name: &str, chain: &[Vec<u8>], key: &[u8]) -> Secret {
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(pem_chain(chain)),
            private_key: inline(pem_block("PRIVATE KEY", key).into_bytes()),
            ..TlsCertificate::default()
        })),
    }
}

/// A validation context for `bundles`: plain `trusted_ca` for one trust domain or when `plain`
/// is asked for, Envoy's SPIFFE validator otherwise.
fn validation_context(name: &str, bundles: &[Arc<TrustBundle>], plain: bool) -> Secret {
    let context = match bundles {
        [one] => CertificateValidationContext {
            trusted_ca: inline(one.to_pem().into_bytes()),
            ..CertificateValidationContext::default()
        },
        all if plain => CertificateValidationContext {
            trusted_ca: inline(
                all.iter()
                    .map(|b| b.to_pem())
                    .collect::<String>()
                    .into_bytes(),
            ),
            ..CertificateValidationContext::default()
        },
        many => {
            // Several trust domains: Envoy's SPIFFE validator checks each peer against the bundle
            // of the peer's own trust domain only.
            let config = SpiffeCertValidatorConfig {
                trust_domains: many
                    .iter()
                    .map(|b| spiffe_cert_validator_config::TrustDomain {
                        name: b.trust_domain.to_string(),
                        trust_bundle: inline(b.to_pem().into_bytes()),
                        ..spiffe_cert_validator_config::TrustDomain::default()
                    })
                    .collect(),
                ..SpiffeCertValidatorConfig::default()
            };
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: "envoy.tls.cert_validator.spiffe".into(),
                    typed_config: Some(Any {
                        type_url: SPIFFE_VALIDATOR_TYPE.into(),
                        value: config.encode_to_vec(),
                    }),
                }),
                ..CertificateValidationContext::default()
            }
        }
    };
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }
}

impl<S: IdentitySource> Sds<S> {
    /// The secrets `names` resolve to for a caller with `selectors`, and their version; `plain`
    /// asks for plain `trusted_ca` validation contexts.
    async fn render(
        &self,
        selectors: &[Selector],
        names: &[String],
        plain: bool,
    ) -> Result<(String, Vec<Secret>), Status> {
        let view: X509View = self.source.x509_view(selectors).await?;
        let bundles = self.source.bundles(selectors)?;
        let mut secrets = Vec::with_capacity(names.len());
        for name in names {
            let secret = if *name == self.names.default_svid {
                let svid = view.svids.first().ok_or_else(|| {
                    Status::permission_denied(
                        "no identity issued: no registration entry matches this Envoy",
                    )
                })?;
                tls_certificate(name, &svid.chain, &svid.key)
            } else if *name == self.names.own_bundle {
                validation_context(name, std::slice::from_ref(&view.bundle), plain)
            } else if *name == self.names.all_bundles {
                validation_context(name, &bundles, plain)
            } else if let Some(bundle) =
                bundles.iter().find(|b| b.trust_domain.id_string() == *name)
            {
                validation_context(name, std::slice::from_ref(bundle), plain)
            } else if let Some(svid) = view.svids.iter().find(|s| s.spiffe_id == *name) {
                tls_certificate(name, &svid.chain, &svid.key)
            } else {
                return Err(Status::permission_denied(format!(
                    "this caller may not have the secret `{name}`: it is neither {}, {}, {}, a trust domain it may use, nor one of its SPIFFE IDs",
                    self.names.default_svid, self.names.own_bundle, self.names.all_bundles
                )));
            };
            secrets.push(secret);
        }
        let mut encoded = Vec::new();
        for secret in &secrets {
            encoded.extend(secret.encode_to_vec());
        }
        let version = hex_digest(&encoded);
        Ok((version, secrets))
    }
}

fn hex_digest(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn response(version: String, secrets: Vec<Secret>, nonce: u64) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version,
        resources: secrets
            .into_iter()
            .map(|secret| Any {
                type_url: SECRET_TYPE.into(),
                value: secret.encode_to_vec(),
            })
            .collect(),
        type_url: SECRET_TYPE.into(),
        nonce: nonce.to_string(),
        ..DiscoveryResponse::default()
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: IdentitySource> SecretDiscoveryService for Sds<S> {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let caller = peer_caller(&request)?;
        let selectors = self.source.attest(caller).await?;
        let mut inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel(4);
        let sds = self.clone();
        tokio::spawn(async move {
            let mut changes = sds.source.changes();
            let mut stopping = sds.stopping.clone();
            // What Envoy subscribed to, and the version of each resource it holds.
            let mut subscribed: BTreeSet<String> = BTreeSet::new();
            let mut held: HashMap<String, String> = HashMap::new();
            let mut plain = false;
            let mut nonce = 0u64;
            loop {
                let Ok(request) = next_event(&mut inbound, &mut changes, &mut stopping).await
                else {
                    return;
                };
                if let Some(request) = request {
                    if request.node.is_some() {
                        plain = wants_plain_validation(request.node.as_ref());
                    }
                    if let Some(error) = &request.error_detail {
                        tracing::warn!(nonce = %request.response_nonce, error = %error.message, "Envoy rejected delta SDS secrets (NACK)");
                        continue;
                    }
                    // On a reconnect Envoy says what it already holds.
                    held.extend(request.initial_resource_versions);
                    for name in request.resource_names_unsubscribe {
                        subscribed.remove(&name);
                        held.remove(&name);
                    }
                    subscribed.extend(request.resource_names_subscribe);
                }
                // Only what changed (or was never sent) goes out, each with its own version.
                let mut resources = Vec::new();
                for name in &subscribed {
                    match sds
                        .render(&selectors, std::slice::from_ref(name), plain)
                        .await
                    {
                        Ok((version, secrets)) if held.get(name) != Some(&version) => {
                            for secret in secrets {
                                resources.push(Resource {
                                    name: name.clone(),
                                    version: version.clone(),
                                    resource: Some(Any {
                                        type_url: SECRET_TYPE.into(),
                                        value: secret.encode_to_vec(),
                                    }),
                                    ..Resource::default()
                                });
                            }
                            held.insert(name.clone(), version);
                        }
                        Ok(_) => {}
                        Err(status) => {
                            let _ = sender.send(Err(status)).await;
                            return;
                        }
                    }
                }
                if resources.is_empty() {
                    continue;
                }
                nonce += 1;
                let mut versions: Vec<&String> = held.values().collect();
                versions.sort();
                let system_version = hex_digest(
                    versions
                        .iter()
                        .map(|v| v.as_str())
                        .collect::<String>()
                        .as_bytes(),
                );
                let response = DeltaDiscoveryResponse {
                    system_version_info: system_version,
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: nonce.to_string(),
                    ..DeltaDiscoveryResponse::default()
                };
                if sender.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = peer_caller(&request)?;
        let selectors = self.source.attest(caller).await?;
        let mut inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel(4);
        let sds = self.clone();
        tokio::spawn(async move {
            let mut changes = sds.source.changes();
            let mut stopping = sds.stopping.clone();
            let mut names: Option<Vec<String>> = None;
            // Envoy may send its node only on the first request of a stream.
            let mut plain = false;
            let mut sent_version = String::new();
            let mut nonce = 0u64;
            loop {
                // What to do next: a request arrived, or something changed.
                let Ok(request_names) = next_event(&mut inbound, &mut changes, &mut stopping).await
                else {
                    return;
                };
                if let Some(request) = request_names {
                    if request.node.is_some() {
                        plain = wants_plain_validation(request.node.as_ref());
                    }
                    if !request.response_nonce.is_empty()
                        && request.response_nonce != nonce.to_string()
                    {
                        continue; // An answer to an older response; the newer one is on its way.
                    }
                    if let Some(error) = &request.error_detail {
                        tracing::warn!(version = %request.version_info, error = %error.message, "Envoy rejected SDS secrets (NACK)");
                        continue;
                    }
                    let same_names = names.as_ref() == Some(&request.resource_names);
                    names = Some(request.resource_names);
                    if same_names && request.version_info == sent_version {
                        continue; // An ACK of what Envoy has.
                    }
                }
                let Some(wanted) = &names else { continue };
                match sds.render(&selectors, wanted, plain).await {
                    Ok((version, secrets)) if version != sent_version => {
                        nonce += 1;
                        sent_version = version.clone();
                        if sender
                            .send(Ok(response(version, secrets, nonce)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = peer_caller(&request)?;
        let selectors = self.source.attest(caller).await?;
        let request = request.into_inner();
        let plain = wants_plain_validation(request.node.as_ref());
        let (version, secrets) = self
            .render(&selectors, &request.resource_names, plain)
            .await?;
        Ok(Response::new(response(version, secrets, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Struct, Value};
    use sigil_core::id::parse_trust_domain;

    fn bundle(domain: &str, der: &[u8]) -> Arc<TrustBundle> {
        let mut bundle = TrustBundle::new(parse_trust_domain("trust_domain", domain).expect("td"));
        bundle.x509_authorities.push(der.to_vec());
        Arc::new(bundle)
    }

    fn node_with(key: &str, kind: Kind) -> Node {
        Node {
            metadata: Some(Struct {
                fields: [(key.to_string(), Value { kind: Some(kind) })].into(),
            }),
            ..Node::default()
        }
    }

    fn context(secret: &Secret) -> &CertificateValidationContext {
        match &secret.r#type {
            Some(secret::Type::ValidationContext(context)) => context,
            other => panic!("not a validation context: {other:?}"),
        }
    }

    #[test]
    fn one_domain_is_a_plain_trusted_ca() {
        let secret = validation_context("ROOTCA", &[bundle("a.test", b"a")], false);
        let context = context(&secret);
        assert!(context.trusted_ca.is_some());
        assert!(context.custom_validator_config.is_none());
    }

    #[test]
    fn several_domains_use_the_spiffe_validator_with_one_entry_per_domain() {
        let bundles = [bundle("a.test", b"a"), bundle("b.test", b"b")];
        let secret = validation_context("ALL", &bundles, false);
        let context = context(&secret);
        assert!(context.trusted_ca.is_none());
        let validator = context.custom_validator_config.as_ref().expect("validator");
        assert_eq!(validator.name, "envoy.tls.cert_validator.spiffe");
        let config = SpiffeCertValidatorConfig::decode(
            validator
                .typed_config
                .as_ref()
                .expect("typed config")
                .value
                .as_slice(),
        )
        .expect("decodes");
        let domains: Vec<_> = config.trust_domains.iter().map(|d| &d.name).collect();
        assert_eq!(domains, ["a.test", "b.test"]);
    }

    #[test]
    fn node_metadata_asks_for_plain_validation_of_several_domains() {
        let bundles = [bundle("a.test", b"a"), bundle("b.test", b"b")];
        let asks = node_with(PLAIN_VALIDATION_METADATA, Kind::BoolValue(true));
        assert!(wants_plain_validation(Some(&asks)));
        let secret = validation_context("ALL", &bundles, wants_plain_validation(Some(&asks)));
        let context = context(&secret);
        assert!(context.custom_validator_config.is_none());
        let pem = match &context.trusted_ca.as_ref().expect("trusted_ca").specifier {
            Some(Specifier::InlineBytes(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            other => panic!("not inline bytes: {other:?}"),
        };
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[test]
    fn only_a_true_flag_asks_for_plain_validation() {
        let as_string = node_with(PLAIN_VALIDATION_METADATA, Kind::StringValue("True".into()));
        assert!(wants_plain_validation(Some(&as_string)));
        let off = node_with(PLAIN_VALIDATION_METADATA, Kind::BoolValue(false));
        assert!(!wants_plain_validation(Some(&off)));
        let other_key = node_with("cluster", Kind::BoolValue(true));
        assert!(!wants_plain_validation(Some(&other_key)));
        assert!(!wants_plain_validation(None));
    }
}

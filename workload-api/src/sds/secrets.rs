//! The secrets SDS serves, built from SVIDs and bundles: TLS certificates, and validation
//! contexts (plain `trusted_ca` for one trust domain or when the Envoy asks for it, Envoy's SPIFFE
//! validator for several).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source::Specifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::google::protobuf::{Any, value::Kind};
use prost::Message;
use sigil_core::bundle::{TrustBundle, pem_block};

use super::PLAIN_VALIDATION_METADATA;

/// The type URL of Envoy's SPIFFE certificate validator configuration.
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// Whether the Envoy that sent `node` asked for plain validation contexts (a boolean `true`, or
/// the string `"true"`, as YAML bootstraps often carry it).
pub(super) fn wants_plain_validation(node: Option<&Node>) -> bool {
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

pub(super) fn tls_certificate(name: &str, chain: &[Vec<u8>], key: &[u8]) -> Secret {
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
pub(super) fn validation_context(name: &str, bundles: &[Arc<TrustBundle>], plain: bool) -> Secret {
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

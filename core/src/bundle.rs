//! Trust bundles: the X.509 roots and JWT public keys of one trust domain, and their SPIFFE bundle
//! JSON form (a JWKS with `spiffe_sequence` and `spiffe_refresh_hint`).
//!
//! Bundles of different trust domains are never merged: each [`TrustBundle`] names its domain.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::id::TrustDomain;
use crate::untrusted::untrusted;
use crate::x509::certificate_facts;
use crate::{Error, Result};

/// A JWT signing key published in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The `kid` JWT-SVIDs carry in their header.
    pub key_id: String,
    /// DER SubjectPublicKeyInfo.
    pub public_key: Vec<u8>,
    /// Unix seconds after which no JWT-SVID signed with it is valid (0 when unknown).
    pub expires_at: i64,
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The domain these authorities speak for.
    pub trust_domain: TrustDomain,
    /// DER certificates of the X.509 authorities (roots, or the upstream root).
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT signing keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// Increases with every change.
    pub sequence: u64,
    /// How often, in seconds, holders should fetch the bundle again.
    pub refresh_hint_seconds: i64,
}

// Hashed by domain and sequence (which changes with every change), not by every authority:
// equal bundles hash alike, and hashing one costs nothing however many authorities it holds.
impl std::hash::Hash for TrustBundle {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.trust_domain.hash(state);
        self.sequence.hash(state);
    }
}

#[derive(Serialize, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use")]
    usage: String,
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

/// DER prefixes of a SubjectPublicKeyInfo for an uncompressed point on each curve, so a JWK's
/// coordinates can be turned back into the SPKI that certificates and verifiers use.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

/// The largest bundle document Sigil parses, in bytes.
pub const MAX_BUNDLE_JSON_LEN: usize = 1024 * 1024;

impl TrustBundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        TrustBundle {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint_seconds: 300,
        }
    }

    /// The X.509 authorities as concatenated PEM blocks (what `openssl verify -CAfile` reads).
    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect()
    }

    /// The SPIFFE bundle JSON document.
    pub fn to_spiffe_json(&self) -> Result<String> {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let spki = certificate_spki(der)?;
            let mut jwk = jwk_from_spki(&spki, "x509-svid")?;
            jwk.x5c = Some(vec![STANDARD.encode(der)]);
            keys.push(jwk);
        }
        for key in &self.jwt_authorities {
            let mut jwk = jwk_from_spki(&key.public_key, "jwt-svid")?;
            jwk.kid = Some(key.key_id.clone());
            keys.push(jwk);
        }
        let doc = Jwks {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: Some(self.refresh_hint_seconds),
        };
        serde_json::to_string_pretty(&doc).map_err(|e| Error::InvalidBundle(e.to_string()))
    }

    /// Parses a SPIFFE bundle JSON document for `trust_domain`.
    ///
    /// Keys whose `use` is neither `x509-svid` nor `jwt-svid` are skipped, as the spec asks;
    /// a malformed key of a known use is an error, so a bad document never half-applies.
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &str) -> Result<Self> {
        if json.len() > MAX_BUNDLE_JSON_LEN {
            return Err(Error::InvalidBundle(format!(
                "the document is {} bytes; at most {MAX_BUNDLE_JSON_LEN} are accepted",
                json.len()
            )));
        }
        let doc: Jwks = serde_json::from_str(json).map_err(|e| {
            Error::InvalidBundle(format!(
                "not a JWKS document: {}",
                untrusted(&e.to_string())
            ))
        })?;
        let mut bundle = TrustBundle::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence.unwrap_or(0);
        if let Some(hint) = doc.spiffe_refresh_hint {
            bundle.refresh_hint_seconds = hint;
        }
        for (index, key) in doc.keys.into_iter().enumerate() {
            match key.usage.as_str() {
                "x509-svid" => {
                    let chain = key.x5c.unwrap_or_default();
                    let [cert] = chain.as_slice() else {
                        return Err(Error::InvalidBundle(format!(
                            "key {index}: an x509-svid key has exactly one certificate in x5c"
                        )));
                    };
                    let der = STANDARD.decode(cert).map_err(|e| {
                        Error::InvalidBundle(format!("key {index}: x5c is not base64: {e}"))
                    })?;
                    certificate_facts(&der)
                        .map_err(|e| Error::InvalidBundle(format!("key {index}: {e}")))?;
                    // What is accepted must serialise again (the datastore stores bundles as
                    // this JSON): an authority whose key a JWK cannot carry is refused here,
                    // not when it is stored.
                    let publishable =
                        certificate_spki(&der).and_then(|spki| jwk_from_spki(&spki, "x509-svid"));
                    if let Err(e) = publishable {
                        let why = match e {
                            Error::InvalidBundle(why) => why,
                            other => other.to_string(),
                        };
                        return Err(Error::InvalidBundle(format!(
                            "key {index}: the CA certificate's key cannot be published ({why}); use an EC P-256/P-384 or RSA CA"
                        )));
                    }
                    bundle.x509_authorities.push(der);
                }
                "jwt-svid" => {
                    let key_id = key.kid.clone().filter(|k| !k.is_empty()).ok_or_else(|| {
                        Error::InvalidBundle(format!("key {index}: a jwt-svid key needs a kid"))
                    })?;
                    let public_key = spki_from_jwk(&key)
                        .map_err(|e| Error::InvalidBundle(format!("key {index}: {e}")))?;
                    bundle.jwt_authorities.push(JwtAuthority {
                        key_id,
                        public_key,
                        expires_at: 0,
                    });
                }
                _ => {}
            }
        }
        Ok(bundle)
    }
}

/// One PEM block with the given label.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn certificate_spki(der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::InvalidBundle(format!("bad authority certificate: {e}")))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

fn jwk_from_spki(spki_der: &[u8], usage: &str) -> Result<Jwk> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| Error::InvalidBundle(format!("bad public key: {e}")))?;
    let mut jwk = Jwk {
        usage: usage.to_string(),
        kty: String::new(),
        kid: None,
        crv: None,
        x: None,
        y: None,
        n: None,
        e: None,
        x5c: None,
    };
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            let (crv, len) = match data.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                other => {
                    return Err(Error::InvalidBundle(format!(
                        "EC point of {other} bytes is not an uncompressed P-256/P-384 point"
                    )));
                }
            };
            jwk.kty = "EC".into();
            jwk.crv = Some(crv.into());
            jwk.x = Some(URL_SAFE_NO_PAD.encode(&data[1..=len]));
            jwk.y = Some(URL_SAFE_NO_PAD.encode(&data[1 + len..]));
        }
        Ok(PublicKey::RSA(rsa)) => {
            jwk.kty = "RSA".into();
            jwk.n = Some(URL_SAFE_NO_PAD.encode(trim_leading_zeros(rsa.modulus)));
            jwk.e = Some(URL_SAFE_NO_PAD.encode(trim_leading_zeros(rsa.exponent)));
        }
        _ => {
            return Err(Error::InvalidBundle(
                "only EC and RSA keys can be published".into(),
            ));
        }
    }
    Ok(jwk)
}

fn trim_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn spki_from_jwk(jwk: &Jwk) -> std::result::Result<Vec<u8>, String> {
    if jwk.kty != "EC" {
        return Err(format!(
            "kty `{}` is not supported for JWT keys; Sigil reads EC (P-256, P-384) keys",
            jwk.kty
        ));
    }
    let (prefix, len) = match jwk.crv.as_deref() {
        Some("P-256") => (P256_SPKI_PREFIX, 32),
        Some("P-384") => (P384_SPKI_PREFIX, 48),
        other => {
            return Err(format!(
                "curve {} is not P-256 or P-384",
                untrusted(other.unwrap_or("(none)"))
            ));
        }
    };
    let coordinate = |name: &str, value: &Option<String>| {
        let bytes = URL_SAFE_NO_PAD
            .decode(value.as_deref().unwrap_or_default())
            .map_err(|e| format!("`{name}` is not base64url: {e}"))?;
        if bytes.len() == len {
            Ok(bytes)
        } else {
            Err(format!("`{name}` is {} bytes, expected {len}", bytes.len()))
        }
    };
    let mut spki = prefix.to_vec();
    spki.push(0x04);
    spki.extend(coordinate("x", &jwk.x)?);
    spki.extend(coordinate("y", &jwk.y)?);
    Ok(spki)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::parse_trust_domain;
    use crate::x509::{KeyType, root_ca_params};
    use rcgen::PublicKeyData;
    use std::time::{Duration, SystemTime};

    fn bundle() -> TrustBundle {
        let td = parse_trust_domain("trust_domain", "example.org").expect("td");
        let key = KeyType::EcP256.generate().expect("key");
        let ca = root_ca_params(&td, SystemTime::now(), Duration::from_secs(3600))
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let jwt_key = KeyType::EcP384.generate().expect("key");
        let mut bundle = TrustBundle::new(td);
        bundle.x509_authorities.push(ca.der().to_vec());
        bundle.jwt_authorities.push(JwtAuthority {
            key_id: "k1".into(),
            public_key: jwt_key.subject_public_key_info(),
            expires_at: 0,
        });
        bundle.sequence = 7;
        bundle
    }

    #[test]
    fn spiffe_json_round_trips() {
        let original = bundle();
        let json = original.to_spiffe_json().expect("json");
        assert!(json.contains("\"spiffe_sequence\": 7"));
        assert!(json.contains("\"use\": \"x509-svid\""));
        let parsed =
            TrustBundle::from_spiffe_json(original.trust_domain.clone(), &json).expect("parse");
        assert_eq!(parsed, original);
        assert!(
            original
                .to_pem()
                .starts_with("-----BEGIN CERTIFICATE-----\n")
        );
    }

    #[test]
    fn refuses_bad_documents() {
        let td = parse_trust_domain("trust_domain", "example.org").expect("td");
        for bad in [
            "",
            "{",
            r#"{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
            r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["!!"]}]}"#,
            r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["AAAA"]}]}"#,
        ] {
            assert!(
                TrustBundle::from_spiffe_json(td.clone(), bad).is_err(),
                "{bad}"
            );
        }
        // Found by the bundle_json fuzz target: a bundle with an Ed25519 CA parsed, then could
        // not be serialised to be stored.
        let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let ca = root_ca_params(&td, SystemTime::now(), Duration::from_secs(3600))
            .expect("params")
            .self_signed(&ed25519)
            .expect("cert");
        let document = format!(
            r#"{{"keys":[{{"use":"x509-svid","kty":"OKP","x5c":["{}"]}}]}}"#,
            STANDARD.encode(ca.der())
        );
        let err = TrustBundle::from_spiffe_json(td.clone(), &document).expect_err("ed25519 CA");
        assert!(err.to_string().contains("cannot be published"), "{err}");
        let unknown_use = r#"{"keys":[{"use":"other","kty":"EC"}]}"#;
        assert!(
            TrustBundle::from_spiffe_json(td, unknown_use)
                .expect("ok")
                .x509_authorities
                .is_empty()
        );
    }
}

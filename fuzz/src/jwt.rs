//! JWT-SVIDs: tokens any workload hands the agent's `ValidateJWTSVID` (and `sigil-agent api
//! validate jwt`), checked by `sigil_workload_api::jwt::validate`. The server only signs
//! JWT-SVIDs and hands the ServiceAccount tokens of PSAT and the Istio CA API to the Kubernetes
//! TokenReview API, so this is the one JWT parser Sigil has.

use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::PublicKeyData;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm,
};
use serde_json::Value;
use sigil_core::bundle::{JwtAuthority, TrustBundle};
use sigil_core::id::parse_trust_domain;
use sigil_core::x509::KeyType;
use sigil_workload_api::jwt::{ValidatedJwt, validate};

use crate::text;

/// The audience every token is validated for.
const AUDIENCE: &str = "db";
/// "Now" for expiry, in Unix seconds.
const NOW: i64 = 1_000_000;

/// The signing keys and the bundles that publish them: `k1` (P-256) for example.org and `k2`
/// (P-384) for other.org. Made once per process: nothing outside this process trusts them.
struct Keys {
    k1: EcdsaKeyPair,
    k2: EcdsaKeyPair,
    bundles: Vec<Arc<TrustBundle>>,
}

fn key(kind: KeyType, algorithm: &'static EcdsaSigningAlgorithm) -> (EcdsaKeyPair, Vec<u8>) {
    let key = kind.generate().expect("a key");
    let pair = EcdsaKeyPair::from_pkcs8(algorithm, &key.serialize_der(), &SystemRandom::new())
        .expect("ring reads an rcgen key");
    (pair, key.subject_public_key_info())
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let bundle = |td: &str, kid: &str, public_key: Vec<u8>| {
            let mut bundle =
                TrustBundle::new(parse_trust_domain("trust_domain", td).expect("a trust domain"));
            bundle.jwt_authorities.push(JwtAuthority {
                key_id: kid.into(),
                public_key,
                expires_at: 0,
            });
            Arc::new(bundle)
        };
        let (k1, k1_public) = key(KeyType::EcP256, &ECDSA_P256_SHA256_FIXED_SIGNING);
        let (k2, k2_public) = key(KeyType::EcP384, &ECDSA_P384_SHA384_FIXED_SIGNING);
        Keys {
            k1,
            k2,
            bundles: vec![
                bundle("example.org", "k1", k1_public),
                bundle("other.org", "k2", k2_public),
            ],
        }
    })
}

/// `validate` on an arbitrary token: everything a caller reaches before the signature check
/// (splitting, base64url, JSON, alg, kid, sub, bundle lookup).
///
/// Holds: see `assert_consistent` (in this file).
pub fn jwt_svid(data: &[u8]) {
    let Some(token) = text(data) else { return };
    if let Ok(valid) = validate(token, AUDIENCE, &keys().bundles, NOW) {
        assert_consistent(token, &valid);
    }
}

/// A token whose header is the input's first line and claims its second, signed with the key
/// its `kid` names (`k2`: P-384, anything else `k1`: P-256), then `validate`: everything after
/// the signature check (exp, aud, sub) with the signature out of the way.
///
/// Holds: see `assert_consistent` (in this file).
pub fn jwt_claims(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let mut lines = input.splitn(2, '\n');
    let (header, claims) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    let keys = keys();
    let signer = match serde_json::from_str::<Value>(header) {
        Ok(h) if h.get("kid").and_then(Value::as_str) == Some("k2") => &keys.k2,
        _ => &keys.k1,
    };
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let Ok(signature) = signer.sign(&SystemRandom::new(), signed.as_bytes()) else {
        return;
    };
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
    if let Ok(valid) = validate(&token, AUDIENCE, &keys.bundles, NOW) {
        assert_consistent(&token, &valid);
    }
}

/// What holds of every token `validate` accepts: its header's alg is an asymmetric one and its
/// kid is in the bundle of the subject's trust domain; the subject is the token's `sub`; `exp`
/// is after now; the audience is in `aud`.
fn assert_consistent(token: &str, valid: &ValidatedJwt) {
    let header_part = token.split('.').next().unwrap_or_default();
    let header: Value = URL_SAFE_NO_PAD
        .decode(header_part)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .expect("an accepted token has a JSON header");
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        [
            "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"
        ]
        .contains(&alg),
        "accepted alg `{alg}`"
    );
    let sub = valid.claims.get("sub").and_then(Value::as_str);
    assert_eq!(
        sub,
        Some(valid.spiffe_id.as_str()),
        "the subject is not `sub`"
    );
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let td = valid
        .spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    assert!(
        keys()
            .bundles
            .iter()
            .any(|b| b.trust_domain.as_str() == td
                && b.jwt_authorities.iter().any(|k| k.key_id == kid)),
        "kid `{kid}` is not a key of {td}"
    );
    let exp = valid.claims.get("exp").and_then(Value::as_i64);
    assert!(
        exp.is_some_and(|exp| exp > NOW),
        "accepted with exp {exp:?}"
    );
    let audience_listed = match valid.claims.get("aud") {
        Some(Value::String(one)) => one == AUDIENCE,
        Some(Value::Array(many)) => many.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    assert!(audience_listed, "accepted without the audience in aud");
}

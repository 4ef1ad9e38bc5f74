//! JWT-SVID validation (the SPIFFE JWT-SVID standard): a compact JWS whose `alg` is one of the
//! ES/RS/PS families (never `none` or HMAC), whose `kid` names a key in the bundle of the trust
//! domain of its `sub`, with `exp` in the future and the expected audience in `aud`.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::{Map, Value};
use sigil_core::bundle::TrustBundle;
use sigil_core::id::parse_spiffe_id;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::{Error, Result};

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// Its `sub`.
    pub spiffe_id: String,
    /// All of its claims.
    pub claims: Map<String, Value>,
}

fn invalid(why: impl Into<String>) -> Error {
    Error::InvalidJwt(why.into())
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| invalid(format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(invalid(format!("the {what} is not a JSON object"))),
    }
}

fn algorithm(alg: &str, key: &PublicKey<'_>) -> Result<&'static dyn VerificationAlgorithm> {
    let algorithm: &'static dyn VerificationAlgorithm = match (alg, key) {
        ("ES256", PublicKey::EC(_)) => &signature::ECDSA_P256_SHA256_FIXED,
        ("ES384", PublicKey::EC(_)) => &signature::ECDSA_P384_SHA384_FIXED,
        ("RS256", PublicKey::RSA(_)) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("RS384", PublicKey::RSA(_)) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("RS512", PublicKey::RSA(_)) => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("PS256", PublicKey::RSA(_)) => &signature::RSA_PSS_2048_8192_SHA256,
        ("PS384", PublicKey::RSA(_)) => &signature::RSA_PSS_2048_8192_SHA384,
        ("PS512", PublicKey::RSA(_)) => &signature::RSA_PSS_2048_8192_SHA512,
        ("ES256" | "ES384" | "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512", _) => {
            return Err(invalid(format!(
                "alg {alg} does not match the type of key the kid names"
            )));
        }
        (other, _) => {
            return Err(invalid(format!(
                "alg `{other}` is not allowed; JWT-SVIDs use ES256/ES384, RS256/384/512 or PS256/384/512"
            )));
        }
    };
    Ok(algorithm)
}

/// Validates `token` for `audience` against `bundles` at `now` (Unix seconds).
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &[Arc<TrustBundle>],
    now: i64,
) -> Result<ValidatedJwt> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid(format!("the token is over {MAX_TOKEN_LEN} bytes")));
    }
    let mut parts = token.split('.');
    let (Some(header_part), Some(claims_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("not a compact JWS (three dot-separated parts)"));
    };
    let header = decode_json(header_part, "header")?;
    let claims = decode_json(claims_part, "claims")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if alg.is_empty() || alg.eq_ignore_ascii_case("none") {
        return Err(invalid("alg `none` (or no alg) is never accepted"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("the header has no kid"))?;
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("the token has no sub"))?;
    let spiffe_id = parse_spiffe_id("sub", subject).map_err(|e| invalid(e.to_string()))?;
    let bundle = bundles
        .iter()
        .find(|b| b.trust_domain.as_str() == spiffe_id.trust_domain_name())
        .ok_or_else(|| {
            invalid(format!(
                "no bundle for trust domain {}",
                spiffe_id.trust_domain_name()
            ))
        })?;
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|key| key.key_id == kid)
        .ok_or_else(|| {
            invalid(format!(
                "kid `{kid}` is not in the bundle of {}",
                bundle.trust_domain
            ))
        })?;
    let (_, spki) = SubjectPublicKeyInfo::from_der(&authority.public_key)
        .map_err(|_| invalid(format!("the key `{kid}` in the bundle is unreadable")))?;
    let key = spki
        .parsed()
        .map_err(|_| invalid(format!("the key `{kid}` in the bundle is unreadable")))?;
    let algorithm = algorithm(alg, &key)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_part)
        .map_err(|_| invalid("the signature is not base64url"))?;
    let signed = &token[..header_part.len() + 1 + claims_part.len()];
    UnparsedPublicKey::new(algorithm, spki.subject_public_key.data.as_ref())
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| invalid("the signature does not verify"))?;

    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| invalid("the token has no exp"))?;
    if exp <= now {
        return Err(invalid(format!("the token expired at {exp}")));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => return Err(invalid("the token has no aud")),
    };
    if !audiences.contains(&audience) {
        return Err(invalid(format!(
            "audience `{audience}` is not in the token's aud {audiences:?}"
        )));
    }
    Ok(ValidatedJwt {
        spiffe_id: spiffe_id.to_string(),
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use sigil_core::bundle::JwtAuthority;
    use sigil_core::id::parse_trust_domain;
    use sigil_core::x509::KeyType;

    struct Signer {
        key: EcdsaKeyPair,
        bundle: Arc<TrustBundle>,
    }

    fn signer() -> Signer {
        let key = KeyType::EcP256.generate().expect("key");
        let mut bundle =
            TrustBundle::new(parse_trust_domain("trust_domain", "example.org").expect("td"));
        bundle.jwt_authorities.push(JwtAuthority {
            key_id: "k1".into(),
            public_key: key.subject_public_key_info(),
            expires_at: 0,
        });
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .expect("ring key");
        Signer {
            key,
            bundle: Arc::new(bundle),
        }
    }

    fn token(signer: &Signer, header: &str, claims: &str) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = signer
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }

    const HEADER: &str = r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#;
    const CLAIMS: &str = r#"{"sub":"spiffe://example.org/web","aud":["db","cache"],"exp":2000}"#;

    #[test]
    fn accepts_a_good_token() {
        let s = signer();
        let valid = validate(
            &token(&s, HEADER, CLAIMS),
            "db",
            std::slice::from_ref(&s.bundle),
            1000,
        )
        .expect("valid");
        assert_eq!(valid.spiffe_id, "spiffe://example.org/web");
        assert_eq!(valid.claims["exp"], 2000);
    }

    #[test]
    fn mutated_tokens_never_panic_and_never_validate_as_someone_else() {
        let s = signer();
        let bundles = [s.bundle.clone()];
        let good = token(&s, HEADER, CLAIMS);
        let mut next = crate::xorshift(0x5eed_0005_u64);
        for _ in 0..3000 {
            let mut bytes = good.clone().into_bytes();
            for _ in 0..=(next() % 3) {
                let at = next() as usize % bytes.len();
                bytes[at] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
                    [next() as usize % 65];
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(valid) = validate(&text, "db", &bundles, 1000) {
                assert_eq!(
                    valid.spiffe_id, "spiffe://example.org/web",
                    "a mutation changed the subject"
                );
            }
        }
    }

    #[test]
    fn refuses_bad_tokens() {
        let s = signer();
        let bundles = [s.bundle.clone()];
        let good = token(&s, HEADER, CLAIMS);
        let cases = [
            (validate(&good, "other", &bundles, 1000), "audience"),
            (validate(&good, "db", &bundles, 2000), "expired"),
            (validate(&good, "db", &[], 1000), "no bundle"),
            (
                validate(
                    &token(&s, r#"{"alg":"none","kid":"k1"}"#, CLAIMS),
                    "db",
                    &bundles,
                    1000,
                ),
                "none",
            ),
            (
                validate(
                    &token(&s, r#"{"alg":"HS256","kid":"k1"}"#, CLAIMS),
                    "db",
                    &bundles,
                    1000,
                ),
                "not allowed",
            ),
            (
                validate(
                    &token(&s, r#"{"alg":"ES256","kid":"k2"}"#, CLAIMS),
                    "db",
                    &bundles,
                    1000,
                ),
                "kid",
            ),
            (
                validate(
                    &token(&s, r#"{"alg":"RS256","kid":"k1"}"#, CLAIMS),
                    "db",
                    &bundles,
                    1000,
                ),
                "does not match",
            ),
            (
                validate(
                    &token(
                        &s,
                        HEADER,
                        r#"{"sub":"spiffe://example.org/web","aud":"db"}"#,
                    ),
                    "db",
                    &bundles,
                    1000,
                ),
                "exp",
            ),
            (
                validate(
                    &token(&s, HEADER, r#"{"sub":"not-spiffe","aud":"db","exp":2000}"#),
                    "db",
                    &bundles,
                    1000,
                ),
                "sub",
            ),
            (validate("a.b", "db", &bundles, 1000), "three"),
            (validate("!!.!!.!!", "db", &bundles, 1000), "base64url"),
        ];
        for (outcome, expected) in cases {
            let err = outcome.expect_err(expected).to_string();
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        // A tampered payload keeps the signature of the original.
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        parts[1] =
            URL_SAFE_NO_PAD.encode(r#"{"sub":"spiffe://example.org/admin","aud":"db","exp":2000}"#);
        let err = validate(&parts.join("."), "db", &bundles, 1000).expect_err("tampered");
        assert!(err.to_string().contains("signature"), "{err}");
    }
}

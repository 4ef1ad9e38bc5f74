//! JWT-SVID signing with the server's ES256 keys.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{KeyPair, PublicKeyData};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde::Serialize;
use sigil_core::id::SpiffeId;

use crate::{Error, Result};

/// One JWT signing key: the `kid` it is published under and the key itself.
#[derive(Debug)]
pub struct JwtKey {
    /// Published in the bundle; carried in every token's header.
    pub key_id: String,
    /// Unix seconds; no token outlives its key.
    pub not_after: i64,
    /// DER SubjectPublicKeyInfo, as published.
    pub public_key: Vec<u8>,
    signing: EcdsaKeyPair,
    rng: SystemRandom,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: String,
    aud: Audience<'a>,
    exp: i64,
    iat: i64,
    jti: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl JwtKey {
    /// Wraps a P-256 key (from the key manager) published as `key_id`.
    pub fn new(key_id: String, key: &KeyPair, not_after: i64) -> Result<Self> {
        let rng = SystemRandom::new();
        let signing =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &rng)
                .map_err(|e| Error::ca(format!("JWT key `{key_id}` is not a P-256 key: {e}")))?;
        Ok(JwtKey {
            key_id,
            not_after,
            public_key: key.subject_public_key_info(),
            signing,
            rng,
        })
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience`, issued at `now` and expiring at `exp`
    /// (Unix seconds), with the unique id `jti`.
    pub fn sign(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        now: i64,
        exp: i64,
        jti: &str,
    ) -> Result<String> {
        let header = Header {
            alg: "ES256",
            kid: &self.key_id,
            typ: "JWT",
        };
        let aud = match audience {
            [one] => Audience::One(one),
            many => Audience::Many(many),
        };
        let claims = Claims {
            sub: spiffe_id.to_string(),
            aud,
            exp,
            iat: now,
            jti,
        };
        let signing_input = format!("{}.{}", base64_json(&header)?, base64_json(&claims)?);
        let signature = self
            .signing
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| Error::ca("JWT signing failed"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

fn base64_json(value: &impl Serialize) -> Result<String> {
    let json = serde_json::to_vec(value).map_err(|e| Error::ca_caused("cannot encode JWT", e))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use sigil_core::x509::KeyType;

    #[test]
    fn signs_a_verifiable_es256_token() {
        let key = KeyType::EcP256.generate().expect("key");
        let jwt = JwtKey::new("kid-1".into(), &key, 2_000_000_000).expect("jwt key");
        let id = SpiffeId::new("spiffe://example.org/web").expect("id");
        let token = jwt
            .sign(&id, &["db".to_string()], 100, 400, "j1")
            .expect("token");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "kid-1");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["sub"], "spiffe://example.org/web");
        assert_eq!(claims["aud"], "db");
        assert_eq!(claims["exp"], 400);
        // The raw public key is the SPKI's last 65 bytes (the uncompressed point).
        let point = &jwt.public_key[jwt.public_key.len() - 65..];
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature verifies");
    }
}

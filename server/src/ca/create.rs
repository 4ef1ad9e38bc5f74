//! Making and loading authorities: a new X.509 CA (self-signed, or signed by the upstream CA)
//! or JWT key written to the journal, and the signing halves of journal rows whose keys the key
//! manager still holds.

use std::time::{Duration, SystemTime};

use rcgen::Issuer;
use sigil_core::clock::unix_seconds;
use sigil_core::x509::{KeyType, certificate_facts, root_ca_params};

use super::{AuthorityState, CaSettings, JwtKey, KeyManager, X509Authority};
use crate::datastore::{Authority, AuthorityKind, DataStore};
use crate::{Error, Result};

/// The signing half of the X.509 CA `authority`; `None` when its key is gone.
pub(super) fn load_x509(
    authority: &Authority,
    settings: &CaSettings,
    keys: &dyn KeyManager,
) -> Result<Option<X509Authority>> {
    let Some(key) = keys.load(&authority.key_ref)? else {
        // Another server's CA (every server keeps its own keys), or a key this one lost.
        tracing::debug!(authority = %authority.id, "no key for this CA here");
        return Ok(None);
    };
    let issuer =
        Issuer::from_ca_cert_der(&authority.public_data.as_slice().into(), key).map_err(|e| {
            Error::ca_caused(
                format!("stored CA certificate {} is unreadable", authority.id),
                e,
            )
        })?;
    Ok(Some(X509Authority {
        id: authority.id.clone(),
        issuer,
        not_after: authority.not_after,
        chain_above: settings.chain_above(&authority.public_data),
    }))
}

/// The signing half of the JWT key `authority`; `None` when its key is gone.
pub(super) fn load_jwt(authority: &Authority, keys: &dyn KeyManager) -> Result<Option<JwtKey>> {
    let Some(key) = keys.load(&authority.key_ref)? else {
        tracing::debug!(key_id = %authority.id, "no key for this JWT key here");
        return Ok(None);
    };
    JwtKey::new(authority.id.clone(), &key, authority.not_after).map(Some)
}

/// Makes an X.509 CA (a root, or an intermediate the upstream signs) and writes it to the
/// journal in `state`, owned by `owner`.
pub(super) async fn create_x509<D: DataStore>(
    settings: &CaSettings,
    owner: &str,
    keys: &dyn KeyManager,
    now: SystemTime,
    datastore: &D,
    state: AuthorityState,
) -> Result<X509Authority> {
    let key = settings.key_type.generate()?;
    let certificate = match &settings.upstream {
        Some(upstream) => {
            // An intermediate cannot outlive the CA that signs it.
            let left = upstream.not_after() - unix_seconds(now);
            let ttl = Duration::from_secs(u64::try_from(left).unwrap_or(0)).min(settings.ca_ttl);
            if ttl.is_zero() {
                return Err(Error::ca(
                    "the upstream CA certificate has expired; renew it",
                ));
            }
            let params = root_ca_params(&settings.trust_domain, now, ttl)?;
            let der = upstream.sign_ca(&params, &key)?;
            (params, der)
        }
        None => {
            let params = root_ca_params(&settings.trust_domain, now, settings.ca_ttl)?;
            let der = params
                .self_signed(&key)
                .map_err(|e| Error::ca_caused("cannot self-sign the CA certificate", e))?
                .der()
                .to_vec();
            (params, der)
        }
    };
    let (params, der) = certificate;
    let facts = certificate_facts(&der)?;
    // Named by the authority's id (its subject key identifier, a digest of this key): two CAs
    // made in the same second, by one server or by two sharing the journal, never share a file.
    // The key is kept before the journal row that names it is written.
    let key_ref = format!("x509-{}", facts.subject_key_id);
    keys.store(&key_ref, &key)?;
    datastore
        .put_authority(&Authority {
            id: facts.subject_key_id.clone(),
            kind: AuthorityKind::X509,
            key_ref,
            public_data: der.clone(),
            state,
            not_after: facts.not_after,
            created_at: unix_seconds(now),
            owner: owner.to_string(),
        })
        .await?;
    tracing::info!(authority = %facts.subject_key_id, not_after = facts.not_after, "created a new X.509 CA");
    Ok(X509Authority {
        id: facts.subject_key_id,
        issuer: Issuer::new(params, key),
        not_after: facts.not_after,
        chain_above: settings.chain_above(&der),
    })
}

/// Makes a JWT signing key and writes it to the journal in `state`, owned by `owner`.
pub(super) async fn create_jwt<D: DataStore>(
    settings: &CaSettings,
    owner: &str,
    keys: &dyn KeyManager,
    now: i64,
    datastore: &D,
    state: AuthorityState,
) -> Result<JwtKey> {
    // JWT-SVIDs are ES256 whatever the CA's key type: the algorithm every SPIFFE verifier supports.
    let key = KeyType::EcP256.generate()?;
    let key_id = hex::encode(&sigil_core::x509::random_serial()?.to_bytes()[..12]);
    let key_ref = format!("jwt-{key_id}");
    keys.store(&key_ref, &key)?;
    let not_after = now + i64::try_from(settings.ca_ttl.as_secs()).unwrap_or(i64::MAX / 2);
    let jwt = JwtKey::new(key_id.clone(), &key, not_after)?;
    datastore
        .put_authority(&Authority {
            id: key_id,
            kind: AuthorityKind::Jwt,
            key_ref,
            public_data: jwt.public_key.clone(),
            state,
            not_after,
            created_at: now,
            owner: owner.to_string(),
        })
        .await?;
    Ok(jwt)
}

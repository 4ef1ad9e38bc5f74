//! Signing: X509-SVIDs and JWT-SVIDs with the active authority, and the checks that keep the
//! reserved `/sigil/` namespace and the server's own DNS names out of workload identities.

use std::time::Duration;

use rcgen::PublicKeyData;
use sigil_core::clock::{from_unix_seconds, unix_seconds};
use sigil_core::id::{SpiffeId, check_not_reserved, is_reserved};
use sigil_core::x509::leaf_params;

use super::Ca;
use crate::{Error, Result};

/// A signed X509-SVID.
#[derive(Debug, Clone)]
pub struct SignedX509Svid {
    /// DER certificates, leaf first, then any intermediates (the root is in the bundle).
    pub chain: Vec<Vec<u8>>,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The signing authority's id (hex subject key identifier).
    pub authority_id: String,
}

/// Who an X509-SVID is for, which decides the IDs it may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holder {
    /// A workload: never an ID in the reserved `/sigil/` namespace.
    Workload,
    /// One of Sigil's own components: only IDs in the reserved namespace.
    Component,
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct SignedJwtSvid {
    /// The compact JWS.
    pub token: String,
    /// Its `jti`.
    pub token_id: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// The signing key's `kid`.
    pub key_id: String,
}

impl Ca {
    /// Signs an X509-SVID for `public_key` naming `spiffe_id`, valid for `ttl` (capped by the CA's
    /// own expiry). Zero `ttl` means the default.
    ///
    /// `holder` keeps the reserved `/sigil/` namespace apart: a workload's SVID (agent batches,
    /// the Istio CA API) never names an ID in it or a DNS name of the server, whatever an entry, a
    /// token or a CSR says; a component's (the server's TLS certificate, an agent SVID) names
    /// only IDs in it.
    pub(super) fn sign_x509_svid(
        &self,
        holder: Holder,
        public_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<SignedX509Svid> {
        match holder {
            Holder::Workload => {
                check_not_reserved("spiffe_id", spiffe_id, &self.settings.trust_domain)
                    .map_err(|e| Error::PermissionDenied(e.to_string()))?;
                self.check_workload_dns_names(dns_names)?;
            }
            Holder::Component if !is_reserved(spiffe_id, &self.settings.trust_domain) => {
                return Err(Error::ca(format!(
                    "{spiffe_id} is not the ID of a Sigil component; sign workloads as Holder::Workload"
                )));
            }
            Holder::Component => {}
        }
        let authority = self.x509.load();
        let now = self.clock.now();
        let ttl = or_default(ttl, self.settings.default_x509_svid_ttl);
        let not_after = (now + ttl).min(from_unix_seconds(authority.not_after));
        let params = leaf_params(spiffe_id, dns_names, now, not_after)?;
        let certificate = params
            .signed_by(public_key, &authority.issuer)
            .map_err(|e| {
                Error::ca_caused(format!("signing an X509-SVID for {spiffe_id} failed"), e)
            })?;
        Ok(SignedX509Svid {
            serial: params
                .serial_number
                .as_ref()
                .map(|s| hex::encode(s.to_bytes()))
                .unwrap_or_default(),
            chain: std::iter::once(certificate.der().to_vec())
                .chain(authority.chain_above.iter().cloned())
                .collect(),
            not_before: unix_seconds(params.not_before.into()),
            not_after: unix_seconds(not_after),
            authority_id: authority.id.clone(),
        })
    }

    /// Refuses workload DNS names that can name the server's own host (see
    /// [`super::CaSettings::reserved_dns_names`]).
    pub fn check_workload_dns_names(&self, dns_names: &[String]) -> Result<()> {
        for name in dns_names {
            if let Some(reserved) = self
                .settings
                .reserved_dns_names
                .iter()
                .find(|reserved| sigil_core::entry::dns_names_overlap(name, reserved))
            {
                return Err(Error::PermissionDenied(format!(
                    "DNS name `{}` can name the server itself (server_dns_names has `{reserved}`); a workload may not hold it",
                    sigil_core::untrusted::untrusted(name)
                )));
            }
        }
        Ok(())
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience`, valid for `ttl` (zero: the default),
    /// never past the signing key's own expiry.
    pub(super) fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<SignedJwtSvid> {
        check_not_reserved("spiffe_id", spiffe_id, &self.settings.trust_domain)
            .map_err(|e| Error::PermissionDenied(e.to_string()))?;
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(Error::Invalid(sigil_core::Error::field(
                "audience",
                "at least one non-empty audience is required",
            )));
        }
        let key = self.jwt.load();
        let now = self.clock.unix_now();
        let ttl = or_default(ttl, self.settings.default_jwt_svid_ttl);
        let expires_at =
            (now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2)).min(key.not_after);
        let token_id = hex::encode(sigil_core::x509::random_serial()?.to_bytes());
        let token = key.sign(spiffe_id, audience, now, expires_at, &token_id)?;
        Ok(SignedJwtSvid {
            token,
            token_id,
            issued_at: now,
            expires_at,
            key_id: key.key_id.clone(),
        })
    }
}

/// `ttl`, or `default` when it is zero (a request that leaves the lifetime to the server).
fn or_default(ttl: Duration, default: Duration) -> Duration {
    if ttl.is_zero() { default } else { ttl }
}

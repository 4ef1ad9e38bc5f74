//! The trust domain's certificate authority.
//!
//! [`Ca`] holds the active X.509 authority and JWT key, signs X509-SVIDs and JWT-SVIDs, and keeps
//! the trust domain's own bundle in the datastore in step with the CA journal (the `authorities`
//! table). Private keys live behind a [`KeyManager`]; the journal holds only their ids.
//!
//! | file | what it holds |
//! |---|---|
//! | `journal.rs` | [`AuthorityState`], the schedule ([`journal::plan`]), prepare / activate / taint / revoke |
//! | `issue.rs` | [`Issuer`]: every SVID the server hands out is signed, recorded and counted there |
//! | `sign.rs` | signing X509-SVIDs and JWT-SVIDs, and the reserved-namespace checks |
//! | `bundle.rs` | the own bundle, rebuilt from the journal |
//! | `create.rs` | making and loading authorities |
//! | `keys.rs`, `jwt.rs`, `upstream.rs`, `record.rs` | key managers, the JWT key, the upstream CA, the issuance record and its spool (`record/spool.rs`) |

mod bundle;
mod create;
mod issue;
mod journal;
mod jwt;
mod keys;
mod record;
mod sign;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rcgen::KeyPair;
use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::id::TrustDomain;
use sigil_core::x509::KeyType;
use tokio::sync::Mutex;

use crate::Result;
use crate::datastore::{Authority, AuthorityKind, DataStore};

pub use issue::{Issuer, Recipient};
pub use journal::{AuthorityState, Plan, plan};
pub use jwt::JwtKey;
pub use keys::{DiskKeyManager, KeyManager, MemoryKeyManager};
pub use record::{IssuanceRecorder, RecorderSettings, SPOOL_FILE, Unrecorded};
pub use sign::{SignedJwtSvid, SignedX509Svid};
pub use upstream::{DiskUpstream, UpstreamAuthority, is_self_issued};

/// How the CA is shaped; from the `[ca]` section of the configuration.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// The trust domain this CA speaks for.
    pub trust_domain: TrustDomain,
    /// The CA key's type.
    pub key_type: KeyType,
    /// Lifetime of each CA certificate (and JWT key).
    pub ca_ttl: Duration,
    /// X509-SVID lifetime when an entry does not set one.
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime when an entry does not set one.
    pub default_jwt_svid_ttl: Duration,
    /// Advertised `spiffe_refresh_hint` of the bundle.
    pub bundle_refresh_hint: Duration,
    /// The operator's CA that signs this one, when there is one; otherwise the CA is a root.
    pub upstream: Option<Arc<dyn UpstreamAuthority>>,
    /// DNS names of the server's own certificate (`server_dns_names`): clients that check the
    /// server by host name (istio-agent does) must never accept a workload in its place, so no
    /// workload SVID carries one of them.
    pub reserved_dns_names: Vec<String>,
    /// How long a new authority made because the key of the active one is gone is published
    /// before it signs: the time the bundle takes to reach every server and, through them, every
    /// agent and workload (twice the change feed's poll interval).
    pub publication_wait: Duration,
}

impl CaSettings {
    /// Whether a CA certificate of the journal belongs to the current setup: signed by the
    /// upstream when there is one, a root when there is none.
    fn fits(&self, certificate: &[u8]) -> bool {
        match &self.upstream {
            Some(upstream) => upstream.issued(certificate),
            None => is_self_issued(certificate),
        }
    }

    /// The certificates a workload needs between a leaf signed by `certificate` and a trust
    /// anchor: none for a root, the CA itself and the upstream's chain for an intermediate.
    fn chain_above(&self, certificate: &[u8]) -> Vec<Vec<u8>> {
        match &self.upstream {
            Some(upstream) => std::iter::once(certificate.to_vec())
                .chain(upstream.chain().iter().cloned())
                .collect(),
            None => Vec::new(),
        }
    }

    /// An authority with less life than this left is replaced: twice the longest default SVID
    /// lifetime, so every SVID it signs can live its full span, and never more than half its own
    /// lifetime.
    pub(crate) fn minimum_remaining_life(&self) -> i64 {
        let longest = self.default_x509_svid_ttl.max(self.default_jwt_svid_ttl);
        let wanted = longest.saturating_mul(2).min(self.ca_ttl / 2);
        i64::try_from(wanted.as_secs()).unwrap_or(i64::MAX)
    }
}

/// An X.509 CA that can sign.
struct X509Authority {
    id: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
    not_after: i64,
    /// Intermediates to send after a leaf it signs (empty when it is a root).
    chain_above: Vec<Vec<u8>>,
}

/// The certificate authority of one trust domain.
pub struct Ca {
    settings: CaSettings,
    /// This server's instance id: the journal rows it owns (see [`Authority::owner`]).
    owner: String,
    keys: Arc<dyn KeyManager>,
    clock: SharedClock,
    x509: ArcSwap<X509Authority>,
    jwt: ArcSwap<JwtKey>,
    bundle: ArcSwap<TrustBundle>,
    /// Tainted authority ids, as of the last bundle publication.
    tainted: ArcSwap<Vec<String>>,
    /// Serializes rotation so two checks never both make a new authority.
    rotation: Mutex<()>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.settings.trust_domain)
            .field("owner", &self.owner)
            .field("x509_authority", &self.x509.load().id)
            .field("jwt_key", &self.jwt.load().key_id)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads this server's (`owner`'s) active authorities from the journal, and their keys from
    /// `keys`, making new ones when none is usable, and brings the stored bundle in step. Every
    /// server of a trust domain has its own authorities in the shared journal and never uses
    /// another's key; rows from before owners were recorded are adopted by the server that holds
    /// their key.
    pub async fn load<D: DataStore>(
        settings: CaSettings,
        owner: String,
        keys: Arc<dyn KeyManager>,
        clock: SharedClock,
        datastore: &D,
    ) -> Result<Self> {
        let journal = journal::adopt_and_list_own(datastore, &owner, keys.as_ref()).await?;
        let now = clock.unix_now();
        let min_life = settings.minimum_remaining_life();
        let lost = journal::active_without_key(&journal, now, keys.as_ref())?;
        let x509 = match journal::usable(&journal, AuthorityKind::X509, now, min_life)
            .filter(|a| settings.fits(&a.public_data))
            .find_map(|a| create::load_x509(a, &settings, keys.as_ref()).transpose())
            .transpose()?
        {
            Some(authority) => authority,
            None => {
                tracing::info!("no usable X.509 CA in the journal has its key here; making one");
                create::create_x509(
                    &settings,
                    &owner,
                    keys.as_ref(),
                    clock.now(),
                    datastore,
                    AuthorityState::Active,
                )
                .await?
            }
        };
        let jwt = match journal::usable(&journal, AuthorityKind::Jwt, now, min_life)
            .find_map(|a| create::load_jwt(a, keys.as_ref()).transpose())
            .transpose()?
        {
            Some(key) => key,
            None => {
                create::create_jwt(
                    &settings,
                    &owner,
                    keys.as_ref(),
                    now,
                    datastore,
                    AuthorityState::Active,
                )
                .await?
            }
        };
        let bundle = TrustBundle::new(settings.trust_domain.clone());
        let ca = Ca {
            settings,
            owner,
            keys,
            clock,
            x509: ArcSwap::from_pointee(x509),
            jwt: ArcSwap::from_pointee(jwt),
            bundle: ArcSwap::from_pointee(bundle),
            tainted: ArcSwap::from_pointee(Vec::new()),
            rotation: Mutex::new(()),
        };
        if !lost.is_empty() {
            ca.replace_lost(datastore, &lost).await?;
        }
        ca.publish_bundle(datastore).await?;
        if !lost.is_empty() {
            // Agents and workloads of other servers check what this one signs against the bundle
            // they hold: they must hold the new authority before the first SVID it signs.
            tracing::warn!(
                wait = ?ca.settings.publication_wait,
                "the new authorities are published; waiting for the bundle to reach every server before signing with them"
            );
            tokio::time::sleep(ca.settings.publication_wait).await;
        }
        Ok(ca)
    }

    /// Retires this server's active authorities whose key is gone (`lost`), now that new ones
    /// are active: they stay published as `old`, so what they signed verifies until it expires.
    async fn replace_lost<D: DataStore>(&self, datastore: &D, lost: &[Authority]) -> Result<()> {
        for authority in lost {
            tracing::warn!(
                authority = %authority.id,
                kind = ?authority.kind,
                "the key of this server's active authority is gone (the data dir was lost or replaced); it is retired, still published until it expires, and a new one replaces it"
            );
            let mut retired = authority.clone();
            retired.state = AuthorityState::Old;
            datastore.put_authority(&retired).await?;
        }
        Ok(())
    }

    /// This server's instance id, the owner of its journal rows.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
    }

    /// The settings the CA runs with.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }
}

#[cfg(test)]
mod tests;

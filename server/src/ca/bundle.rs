//! The trust domain's own bundle, rebuilt from the journal: every authority not yet expired or
//! revoked (roots only; under an upstream CA, the upstream's trust anchors stand for Sigil's
//! intermediates), stored with the next sequence number when it changes.

use std::sync::Arc;

use sigil_core::bundle::{JwtAuthority, TrustBundle};

use super::{AuthorityState, Ca, is_self_issued};
use crate::Result;
use crate::datastore::{AuthorityKind, DataStore};

impl Ca {
    /// The current own trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// The id (subject key identifier) of the X.509 CA that signs now.
    pub fn active_x509_id(&self) -> String {
        self.x509.load().id.clone()
    }

    /// When the active X.509 CA and the active JWT key expire, in Unix seconds.
    pub fn active_expiry(&self) -> (i64, i64) {
        (self.x509.load().not_after, self.jwt.load().not_after)
    }

    /// Ids of tainted authorities (X.509 subject key ids and JWT key ids) not yet expired:
    /// agents renew at once whatever these signed.
    pub fn tainted(&self) -> Arc<Vec<String>> {
        self.tainted.load_full()
    }

    /// Rebuilds the bundle from the journal (every authority not yet expired) and stores it
    /// with the next sequence number if it differs from what is stored. Returns whether it did.
    pub(super) async fn publish_bundle<D: DataStore>(&self, datastore: &D) -> Result<bool> {
        let now = self.clock.unix_now();
        let journal = datastore.list_authorities().await?;
        let mut fresh = TrustBundle::new(self.settings.trust_domain.clone());
        fresh.refresh_hint_seconds =
            i64::try_from(self.settings.bundle_refresh_hint.as_secs()).unwrap_or(300);
        self.tainted.store(Arc::new(
            journal
                .iter()
                .filter(|a| a.state == AuthorityState::Tainted && a.not_after > now)
                .map(|a| a.id.clone())
                .collect(),
        ));
        for authority in journal
            .iter()
            .filter(|a| a.not_after > now && a.state != AuthorityState::Revoked)
        {
            match authority.kind {
                // Roots go in the bundle (older self-signed ones until they expire); Sigil's
                // intermediates under an upstream do not: the upstream's roots stand for them.
                AuthorityKind::X509 if !is_self_issued(&authority.public_data) => {}
                AuthorityKind::X509 => fresh.x509_authorities.push(authority.public_data.clone()),
                AuthorityKind::Jwt => fresh.jwt_authorities.push(JwtAuthority {
                    key_id: authority.id.clone(),
                    public_key: authority.public_data.clone(),
                    expires_at: authority.not_after,
                }),
            }
        }
        if let Some(upstream) = &self.settings.upstream {
            for anchor in upstream.trust_anchors() {
                if !fresh.x509_authorities.contains(anchor) {
                    fresh.x509_authorities.push(anchor.clone());
                }
            }
        }
        let stored = datastore.get_bundle(&self.settings.trust_domain).await?;
        let same = |stored: &TrustBundle| {
            stored.x509_authorities == fresh.x509_authorities
                && stored
                    .jwt_authorities
                    .iter()
                    .map(|k| (&k.key_id, &k.public_key))
                    .eq(fresh
                        .jwt_authorities
                        .iter()
                        .map(|k| (&k.key_id, &k.public_key)))
                && stored.refresh_hint_seconds == fresh.refresh_hint_seconds
        };
        let changed = match &stored {
            Some(stored) if same(stored) => {
                fresh.sequence = stored.sequence;
                false
            }
            Some(stored) => {
                fresh.sequence = stored.sequence + 1;
                true
            }
            None => {
                fresh.sequence = 1;
                true
            }
        };
        if changed {
            datastore.put_bundle(&fresh).await?;
        }
        self.bundle.store(Arc::new(fresh));
        Ok(changed)
    }
}

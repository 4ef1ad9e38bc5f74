//! The trust bundles as last stored: this trust domain's own and the federated domains'.
//!
//! The CA publishes the own bundle to the datastore and the federation refresher stores foreign
//! ones; every server (including ones sharing the database) learns of both through the change
//! feed ([`crate::feed`]), which reloads a bundle here when its event arrives. The agent API's
//! sync stream, the bundle endpoint and the Kubernetes ConfigMap publishers read from here, so
//! none of them waits on the database.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sigil_core::bundle::TrustBundle;
use sigil_core::id::{TrustDomain, parse_trust_domain};
use sigil_core::sync::RwLockExt;
use tokio::sync::watch;

use crate::datastore::DataStore;
use crate::{Error, Result};

#[derive(Debug, Default)]
struct Stored {
    own: Option<Arc<TrustBundle>>,
    /// By trust domain name.
    federated: BTreeMap<String, Arc<TrustBundle>>,
}

/// The own and the federated trust bundles, mirrored from the datastore.
#[derive(Debug)]
pub struct TrustBundles {
    trust_domain: TrustDomain,
    stored: RwLock<Stored>,
    /// Counts changes; publishers of the bundle wake on it.
    changes: watch::Sender<u64>,
}

impl TrustBundles {
    /// Loads every stored bundle.
    pub async fn load<D: DataStore>(trust_domain: TrustDomain, datastore: &D) -> Result<Self> {
        let mut stored = Stored::default();
        for bundle in datastore.list_bundles().await? {
            if bundle.trust_domain == trust_domain {
                stored.own = Some(Arc::new(bundle));
            } else {
                stored
                    .federated
                    .insert(bundle.trust_domain.to_string(), Arc::new(bundle));
            }
        }
        Ok(TrustBundles {
            trust_domain,
            stored: RwLock::new(stored),
            changes: watch::channel(0).0,
        })
    }

    /// Reloads the bundle of `subject` (a trust domain name from a change-feed event).
    pub async fn reload<D: DataStore>(&self, datastore: &D, subject: &str) -> Result<()> {
        let trust_domain = parse_trust_domain("trust_domain", subject)
            .map_err(|e| Error::Integrity(format!("a bundle event names {subject}: {e}")))?;
        let bundle = datastore.get_bundle(&trust_domain).await?.map(Arc::new);
        {
            let mut stored = self.stored.write_unpoisoned();
            if trust_domain == self.trust_domain {
                stored.own = bundle;
            } else {
                match bundle {
                    Some(bundle) => stored.federated.insert(subject.to_string(), bundle),
                    None => stored.federated.remove(subject),
                };
            }
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The own trust bundle as last stored (none before the CA first published one).
    pub fn own(&self) -> Option<Arc<TrustBundle>> {
        self.stored.read_unpoisoned().own.clone()
    }

    /// The bundles of foreign trust domains, by trust domain name.
    pub fn federated(&self) -> Vec<Arc<TrustBundle>> {
        self.stored
            .read_unpoisoned()
            .federated
            .values()
            .cloned()
            .collect()
    }

    /// A receiver that changes whenever a bundle does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

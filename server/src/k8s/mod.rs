//! Kubernetes: the pod watch behind automatic ServiceAccount identities, and the ConfigMaps that
//! carry the trust bundle to agents and to Istio's sidecars in the cluster.
//!
//! With `kubernetes.auto_identity`, the server watches every pod and keeps, per node, the set of
//! ServiceAccounts with a pod there. The agent of node N may then obtain exactly the identities of
//! those ServiceAccounts (`spiffe://<td>/ns/<ns>/sa/<sa>` by default), matched on the workload side
//! by the selectors `k8s:ns` and `k8s:sa`. Nothing is written to the database per pod: pod churn
//! only changes this in-memory view, and the sync streams push the difference.
//!
//! When the watch breaks, the last view keeps serving for `max_staleness`; after that the server
//! refuses automatic identities rather than authorize from stale data.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use sigil_core::entry::Entry;
use sigil_core::id::{SpiffeId, TrustDomain, parse_member_id};
use sigil_core::selector::Selector;
use sigil_core::sync::{MutexExt, RwLockExt};
use tokio::sync::watch;

use crate::{Error, Result};

mod configmaps;
mod token_review;

pub use configmaps::{ISTIO_ROOT_CERT_CONFIGMAP, publish_bundle, publish_istio_root_certs};
pub use token_review::{ReviewedToken, review};

/// The prefix of the ids of automatic entries: `k8s:<namespace>:<service account>`.
pub const AUTO_ENTRY_PREFIX: &str = "k8s:";

/// How automatic identities are named and scoped.
#[derive(Debug, Clone)]
pub struct AutoIdentitySettings {
    /// The trust domain the IDs belong to.
    pub trust_domain: TrustDomain,
    /// `spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}` by default.
    pub template: String,
    /// Only these namespaces, when not empty.
    pub include: Vec<String>,
    /// Never these namespaces (`kube-system` by default).
    pub exclude: Vec<String>,
    /// How long a broken watch's last view may still be used.
    pub max_staleness: Duration,
}

impl AutoIdentitySettings {
    fn admits(&self, namespace: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|n| n == namespace))
            && !self.exclude.iter().any(|n| n == namespace)
    }

    /// The SPIFFE ID the template gives a ServiceAccount.
    pub fn spiffe_id(&self, namespace: &str, account: &str) -> Result<SpiffeId> {
        let id = self
            .template
            .replace("{trust_domain}", self.trust_domain.as_str())
            .replace("{namespace}", namespace)
            .replace("{service_account}", account);
        Ok(parse_member_id(
            "kubernetes.identity_template",
            &id,
            &self.trust_domain,
        )?)
    }
}

#[derive(Debug, Default)]
struct View {
    /// node -> (namespace, service account) -> pods
    by_node: HashMap<String, BTreeMap<(String, String), usize>>,
    /// pod uid -> (node, namespace, service account)
    pods: HashMap<String, (String, String, String)>,
}

/// Which ServiceAccounts have pods on which node.
#[derive(Debug)]
pub struct PodIdentities {
    settings: AutoIdentitySettings,
    view: RwLock<View>,
    broken_since: Mutex<Option<Instant>>,
    changes: watch::Sender<u64>,
}

impl PodIdentities {
    /// An empty view.
    pub fn new(settings: AutoIdentitySettings) -> Self {
        PodIdentities {
            settings,
            view: RwLock::default(),
            broken_since: Mutex::new(None),
            changes: watch::channel(0).0,
        }
    }

    /// Changes whenever the view does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn fresh(&self) -> Result<()> {
        let broken = *self.broken_since.lock_unpoisoned();
        match broken {
            Some(since) if since.elapsed() > self.settings.max_staleness => {
                Err(Error::Unavailable(format!(
                    "the Kubernetes pod watch has been broken for {:?}; automatic identities are withheld until it recovers",
                    since.elapsed()
                )))
            }
            _ => Ok(()),
        }
    }

    /// The automatic entries of the agent `agent_id` on `node`.
    pub fn entries_for(&self, agent_id: &SpiffeId, node: &str) -> Result<Vec<Entry>> {
        self.fresh()?;
        let view = self.view.read_unpoisoned();
        let Some(accounts) = view.by_node.get(node) else {
            return Ok(Vec::new());
        };
        Ok(accounts
            .keys()
            .filter_map(|(namespace, account)| self.entry(agent_id, namespace, account).ok())
            .collect())
    }

    /// The automatic entry `entry_id` if the agent on `node` may obtain it.
    pub fn authorize(&self, agent_id: &SpiffeId, node: &str, entry_id: &str) -> Result<Entry> {
        self.fresh()?;
        let denied = || {
            Error::PermissionDenied(format!(
                "no pod of `{}` runs on node {node}, so its agent may not obtain it",
                sigil_core::untrusted::untrusted(entry_id)
            ))
        };
        let (namespace, account) = entry_id
            .strip_prefix(AUTO_ENTRY_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(denied)?;
        let view = self.view.read_unpoisoned();
        let present = view.by_node.get(node).is_some_and(|accounts| {
            accounts.contains_key(&(namespace.to_string(), account.to_string()))
        });
        if !present {
            return Err(denied());
        }
        self.entry(agent_id, namespace, account)
    }

    fn entry(&self, agent_id: &SpiffeId, namespace: &str, account: &str) -> Result<Entry> {
        Ok(Entry {
            id: format!("{AUTO_ENTRY_PREFIX}{namespace}:{account}"),
            spiffe_id: self.settings.spiffe_id(namespace, account)?,
            parent_id: agent_id.clone(),
            selectors: vec![
                Selector::new("k8s", format!("ns:{namespace}"))?,
                Selector::new("k8s", format!("sa:{account}"))?,
            ],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: Vec::new(),
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
            hint: String::new(),
            expires_at: 0,
            created_at: 0,
            // The entry's content never changes: a new revision would only make agents re-sign.
            revision: 1,
        })
    }

    fn placement(&self, pod: &Pod) -> Option<(String, (String, String, String))> {
        let uid = pod.metadata.uid.clone()?;
        let namespace = pod.metadata.namespace.clone()?;
        if !self.settings.admits(&namespace) {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.clone()?;
        let account = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
        (!finished).then_some((uid, (node, namespace, account)))
    }

    fn add(view: &mut View, uid: String, placement: (String, String, String)) {
        let (node, namespace, account) = placement.clone();
        *view
            .by_node
            .entry(node)
            .or_default()
            .entry((namespace, account))
            .or_insert(0) += 1;
        view.pods.insert(uid, placement);
    }

    fn remove(view: &mut View, uid: &str) {
        let Some((node, namespace, account)) = view.pods.remove(uid) else {
            return;
        };
        if let Some(accounts) = view.by_node.get_mut(&node) {
            let key = (namespace, account);
            if let Some(count) = accounts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    accounts.remove(&key);
                }
            }
            if accounts.is_empty() {
                view.by_node.remove(&node);
            }
        }
    }

    fn apply(&self, pod: &Pod) {
        let mut view = self.view.write_unpoisoned();
        if let Some(uid) = &pod.metadata.uid {
            Self::remove(&mut view, uid);
        }
        if let Some((uid, placement)) = self.placement(pod) {
            Self::add(&mut view, uid, placement);
        }
    }

    fn delete(&self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            Self::remove(&mut self.view.write_unpoisoned(), uid);
        }
    }

    fn replace(&self, pods: &[Pod]) {
        let mut fresh = View::default();
        for pod in pods {
            if let Some((uid, placement)) = self.placement(pod) {
                Self::add(&mut fresh, uid, placement);
            }
        }
        *self.view.write_unpoisoned() = fresh;
    }

    fn set_broken(&self, broken: bool) {
        let mut since = self.broken_since.lock_unpoisoned();
        match (broken, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

/// Follows every pod of the cluster into `identities` until `stopping` turns true; the watch
/// reconnects with backoff when the API server goes away.
pub async fn watch_pods(
    client: kube::Client,
    identities: Arc<PodIdentities>,
    mut stopping: watch::Receiver<bool>,
) {
    let pods: Api<Pod> = Api::all(client);
    let stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(
        pods,
        watcher::Config::default(),
    ));
    futures::pin_mut!(stream);
    let mut initial = Vec::new();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        match event {
            Some(Ok(event)) => {
                identities.set_broken(false);
                match event {
                    Event::Init => initial.clear(),
                    Event::InitApply(pod) => initial.push(pod),
                    Event::InitDone => {
                        identities.replace(&initial);
                        initial.clear();
                        identities.changed();
                    }
                    Event::Apply(pod) => {
                        identities.apply(&pod);
                        identities.changed();
                    }
                    Event::Delete(pod) => {
                        identities.delete(&pod);
                        identities.changed();
                    }
                }
            }
            Some(Err(e)) => {
                identities.set_broken(true);
                tracing::warn!(error = %e, "the pod watch failed; serving the last view and retrying");
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::id::parse_trust_domain;

    fn identities(max_staleness: Duration) -> PodIdentities {
        PodIdentities::new(AutoIdentitySettings {
            trust_domain: parse_trust_domain("trust_domain", "example.org").expect("td"),
            template: "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}".into(),
            include: Vec::new(),
            exclude: vec!["kube-system".into()],
            max_staleness,
        })
    }

    fn pod(namespace: &str, name: &str, node: &str, account: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": []},
            "status": {"phase": "Running"},
        }))
        .expect("pod")
    }

    fn agent() -> SpiffeId {
        SpiffeId::new("spiffe://example.org/sigil/agent/k8s_psat/demo/uid-a").expect("id")
    }

    #[test]
    fn identities_follow_pods_and_stay_on_their_node() {
        let pods = identities(Duration::from_secs(300));
        pods.replace(&[
            pod("prod", "web-1", "node-a", "web"),
            pod("prod", "db-1", "node-b", "db"),
            pod("kube-system", "dns", "node-a", "coredns"),
        ]);
        let ids: Vec<String> = pods
            .entries_for(&agent(), "node-a")
            .expect("fresh")
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/ns/prod/sa/web"],
            "kube-system is excluded; db runs elsewhere"
        );
        assert!(pods.authorize(&agent(), "node-a", "k8s:prod:web").is_ok());
        assert!(matches!(
            pods.authorize(&agent(), "node-a", "k8s:prod:db"),
            Err(Error::PermissionDenied(_))
        ));

        // Two pods of one account: the identity stays until the last one goes.
        pods.apply(&pod("prod", "web-2", "node-a", "web"));
        pods.delete(&pod("prod", "web-1", "node-a", "web"));
        assert!(pods.authorize(&agent(), "node-a", "k8s:prod:web").is_ok());
        pods.delete(&pod("prod", "web-2", "node-a", "web"));
        assert!(pods.authorize(&agent(), "node-a", "k8s:prod:web").is_err());
        assert!(
            pods.entries_for(&agent(), "node-a")
                .expect("fresh")
                .is_empty()
        );
    }

    #[test]
    fn a_broken_watch_withholds_identities_after_the_bound() {
        let tolerant = identities(Duration::from_secs(300));
        tolerant.replace(&[pod("prod", "web-1", "node-a", "web")]);
        tolerant.set_broken(true);
        assert!(
            tolerant
                .authorize(&agent(), "node-a", "k8s:prod:web")
                .is_ok(),
            "within the bound the last view serves"
        );

        let strict = identities(Duration::ZERO);
        strict.replace(&[pod("prod", "web-1", "node-a", "web")]);
        strict.set_broken(true);
        assert!(matches!(
            strict.authorize(&agent(), "node-a", "k8s:prod:web"),
            Err(Error::Unavailable(_))
        ));
        assert!(strict.entries_for(&agent(), "node-a").is_err());
        strict.set_broken(false);
        assert!(
            strict.authorize(&agent(), "node-a", "k8s:prod:web").is_ok(),
            "a recovered watch serves again"
        );
    }
}

//! ConfigMaps that carry the trust bundle inside the cluster: one for agents to bootstrap from,
//! and, for Istio, an `istio-ca-root-cert` in every namespace (the root istio-agent trusts istiod
//! and the mesh with, which istiod keeps itself when it is the CA).
//!
//! Both are written with server-side apply under the field manager `sigil-server`, rewritten when
//! the bundle's sequence changes, and retried with backoff when the API server refuses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use crate::bundles::TrustBundles;

/// The ConfigMap istio-agent mounts to find the mesh's root certificate (key `root-cert.pem`).
pub const ISTIO_ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";

/// The first and the longest wait before retrying a refused write.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// Writes `data` into the ConfigMap `namespace/name`, creating it if needed.
async fn apply(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    data: serde_json::Value,
) -> Result<(), kube::Error> {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let configmap = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    });
    configmaps
        .patch(
            name,
            &PatchParams::apply("sigil-server").force(),
            &Patch::Apply(configmap),
        )
        .await
        .map(|_| ())
}

/// Keeps the ConfigMap `namespace/name` holding the current bundle (`bundle.crt` PEM and
/// `bundle.spiffe` JSON), rewriting it whenever the bundle's sequence changes.
pub async fn publish_bundle(
    client: kube::Client,
    namespace: String,
    name: String,
    bundles: Arc<TrustBundles>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut changes = bundles.subscribe();
    let mut published = None;
    let mut backoff = FIRST_RETRY;
    loop {
        changes.borrow_and_update();
        if let Some(current) = bundles.own().filter(|b| published != Some(b.sequence)) {
            let outcome = match current.to_spiffe_json() {
                Ok(document) => apply(
                    &client,
                    &namespace,
                    &name,
                    serde_json::json!({"bundle.crt": current.to_pem(), "bundle.spiffe": document}),
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => {
                    tracing::info!(configmap = %format!("{namespace}/{name}"), sequence = current.sequence, "published the trust bundle");
                    published = Some(current.sequence);
                    backoff = FIRST_RETRY;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the bundle ConfigMap; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stopping.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(LONGEST_RETRY);
                    continue;
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// Keeps `istio-ca-root-cert` (key `root-cert.pem`, the bundle's X.509 authorities) in every
/// namespace of the cluster, following namespaces as they come and go and the bundle as it
/// changes, so sidecars in a new namespace find their root and a CA rotation reaches all of them.
pub async fn publish_istio_root_certs(
    client: kube::Client,
    bundles: Arc<TrustBundles>,
    mut stopping: watch::Receiver<bool>,
) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let events = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(
        namespaces,
        watcher::Config::default(),
    ));
    futures::pin_mut!(events);
    let mut changes = bundles.subscribe();
    // Each live namespace, with the bundle sequence its ConfigMap holds (None: not written yet).
    let mut written: BTreeMap<String, Option<u64>> = BTreeMap::new();
    let mut backoff = FIRST_RETRY;
    loop {
        changes.borrow_and_update();
        let mut failed = false;
        if let Some(bundle) = bundles.own() {
            let pem = bundle.to_pem();
            for (namespace, sequence) in written.iter_mut() {
                if *sequence == Some(bundle.sequence) {
                    continue;
                }
                let data = serde_json::json!({ "root-cert.pem": pem });
                match apply(&client, namespace, ISTIO_ROOT_CERT_CONFIGMAP, data).await {
                    Ok(()) => *sequence = Some(bundle.sequence),
                    Err(e) => {
                        failed = true;
                        tracing::warn!(%namespace, error = %e, "cannot write istio-ca-root-cert; retrying");
                    }
                }
            }
        }
        let wait = failed.then_some(backoff);
        backoff = if failed {
            (backoff * 2).min(LONGEST_RETRY)
        } else {
            FIRST_RETRY
        };
        let retry = async move {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Apply(namespace) | Event::InitApply(namespace))) => {
                    if let Some(name) = namespace.metadata.name {
                        // A terminating namespace refuses new objects; it is about to go anyway.
                        let terminating = namespace.status.and_then(|s| s.phase).as_deref() == Some("Terminating");
                        if terminating {
                            written.remove(&name);
                        } else {
                            written.entry(name).or_insert(None);
                        }
                    }
                }
                Some(Ok(Event::Delete(namespace))) => {
                    if let Some(name) = namespace.metadata.name {
                        written.remove(&name);
                    }
                }
                Some(Ok(Event::Init | Event::InitDone)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "the namespace watch failed; retrying"),
                None => return,
            },
            changed = changes.changed() => if changed.is_err() { return },
            () = retry => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

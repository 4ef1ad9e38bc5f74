//! The Kubernetes workload attestor: the caller's pid -> its cgroup -> the container ID -> the pod
//! that runs it, from a watch of the pods scheduled on this agent's node kept in memory, so an
//! attestation never lists pods (SPIRE's kubelet polling costs agents hundreds of millicores on
//! busy nodes).
//!
//! Selectors: `k8s:ns:<namespace>`, `k8s:sa:<service account>`, `k8s:pod-name:<name>`,
//! `k8s:pod-uid:<uid>`, `k8s:pod-label:<key>:<value>`, `k8s:container-name:<name>`,
//! `k8s:container-image:<image>`, `k8s:node-name:<node>`. A container the watch has not seen yet
//! (a pod that just started) is waited for, up to a bound, then refused with a clear error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use sigil_core::selector::Selector;
use sigil_workload_api::peer::PeerProcess;
use tokio::sync::watch;
use tonic::Status;

/// What the agent knows about one container of a pod on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ContainerInfo {
    namespace: String,
    pod_name: String,
    pod_uid: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    container_name: String,
    image: String,
}

/// The pods of this node, by container ID, following a watch.
#[derive(Debug)]
pub struct PodIndex {
    node_name: String,
    containers: RwLock<HashMap<String, ContainerInfo>>,
    changes: watch::Sender<u64>,
}

impl PodIndex {
    /// An empty index for `node_name`.
    pub fn new(node_name: String) -> Self {
        PodIndex {
            node_name,
            containers: RwLock::default(),
            changes: watch::channel(0).0,
        }
    }

    fn lookup(&self, container_id: &str) -> Option<ContainerInfo> {
        self.containers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(container_id)
            .cloned()
    }

    fn replace(&self, pods: &[Pod]) {
        let mut fresh = HashMap::new();
        for pod in pods {
            fresh.extend(containers_of(pod));
        }
        *self
            .containers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        self.changes.send_modify(|n| *n += 1);
    }

    fn apply(&self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut containers = self
            .containers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        containers.retain(|_, info| info.pod_uid != uid);
        containers.extend(containers_of(pod));
        drop(containers);
        self.changes.send_modify(|n| *n += 1);
    }

    fn delete(&self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.containers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, info| info.pod_uid != uid);
        self.changes.send_modify(|n| *n += 1);
    }
}

/// Container ID (without the `containerd://` prefix) -> what the pod says about it.
fn containers_of(pod: &Pod) -> Vec<(String, ContainerInfo)> {
    let metadata = &pod.metadata;
    let spec = pod.spec.as_ref();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let init_statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.clone())
        .unwrap_or_default();
    statuses
        .into_iter()
        .chain(init_statuses)
        .filter_map(|status| {
            let id = status
                .container_id
                .as_deref()?
                .split_once("://")?
                .1
                .to_string();
            Some((
                id,
                ContainerInfo {
                    namespace: metadata.namespace.clone().unwrap_or_default(),
                    pod_name: metadata.name.clone().unwrap_or_default(),
                    pod_uid: metadata.uid.clone().unwrap_or_default(),
                    service_account: spec
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into()),
                    labels: metadata.labels.clone().unwrap_or_default(),
                    container_name: status.name.clone(),
                    image: status.image.clone(),
                },
            ))
        })
        .collect()
}

/// Keeps `index` in step with the pods scheduled on its node until `stopping` turns true. The
/// watch reconnects by itself (with backoff) when the API server goes away.
pub async fn watch_pods(
    client: kube::Client,
    index: Arc<PodIndex>,
    mut stopping: watch::Receiver<bool>,
) {
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", index.node_name));
    let stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(pods, config));
    futures::pin_mut!(stream);
    let mut initial: Vec<Pod> = Vec::new();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        match event {
            Some(Ok(Event::Init)) => initial.clear(),
            Some(Ok(Event::InitApply(pod))) => initial.push(pod),
            Some(Ok(Event::InitDone)) => {
                index.replace(&initial);
                tracing::debug!(pods = initial.len(), node = %index.node_name, "pod watch (re)listed");
                initial.clear();
            }
            Some(Ok(Event::Apply(pod))) => index.apply(&pod),
            Some(Ok(Event::Delete(pod))) => index.delete(&pod),
            Some(Err(e)) => tracing::warn!(error = %e, "the pod watch failed; retrying"),
            None => return,
        }
    }
}

/// The container ID in a `/proc/<pid>/cgroup` file, for containerd, CRI-O and Docker under cgroup
/// v1 or v2; `None` for a process that is not in a container.
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        // `hierarchy-id:controllers:path`; the path may itself contain colons.
        let path = line.splitn(3, ':').nth(2)?;
        let last = path.rsplit('/').next()?;
        let last = last.strip_suffix(".scope").unwrap_or(last);
        let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
            .iter()
            .find_map(|prefix| last.strip_prefix(prefix))
            .unwrap_or(last);
        let in_container =
            path.contains("kubepods") || path.contains("/docker") || last.len() != id.len();
        (in_container && id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_string())
    })
}

/// Attests callers that run in containers on this node.
#[derive(Debug, Clone)]
pub struct K8sAttestor {
    index: Arc<PodIndex>,
    pod_wait: Duration,
}

impl K8sAttestor {
    /// An attestor over a pod index, waiting up to `pod_wait` for a container the watch has not
    /// delivered yet.
    pub fn new(index: Arc<PodIndex>, pod_wait: Duration) -> Self {
        K8sAttestor { index, pod_wait }
    }

    /// The Kubernetes selectors of the process held since the caller connected; empty for a
    /// process outside any container.
    pub async fn attest(&self, process: &PeerProcess) -> Result<Vec<Selector>, Status> {
        let pid = process.pid();
        let cgroup = process.read("cgroup").map_err(|e| {
            Status::permission_denied(format!(
                "cannot read the cgroup of process {pid} ({e}); it may have exited"
            ))
        })?;
        // The cgroup read is the connecting process's only if it is still that process.
        process
            .verify()
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let Some(container) = container_id(&cgroup) else {
            return Ok(Vec::new());
        };
        let mut changes = self.index.changes.subscribe();
        let found = tokio::time::timeout(self.pod_wait, async {
            loop {
                if let Some(info) = self.index.lookup(&container) {
                    return Some(info);
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten();
        let info = found.ok_or_else(|| {
            Status::unavailable(format!(
                "container {container} of process {pid} is not in any pod on node {} after waiting {:?}; if the pod just started, retry",
                self.index.node_name, self.pod_wait
            ))
        })?;
        let mut selectors = Vec::with_capacity(8 + info.labels.len());
        let mut push = |value: String| {
            if let Ok(selector) = Selector::new("k8s", value) {
                selectors.push(selector);
            }
        };
        push(format!("ns:{}", info.namespace));
        push(format!("sa:{}", info.service_account));
        push(format!("pod-name:{}", info.pod_name));
        push(format!("pod-uid:{}", info.pod_uid));
        push(format!("container-name:{}", info.container_name));
        push(format!("container-image:{}", info.image));
        push(format!("node-name:{}", self.index.node_name));
        for (key, value) in &info.labels {
            push(format!("pod-label:{key}:{value}"));
        }
        Ok(selectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn container_ids_from_every_runtime_and_cgroup_version() {
        let cases = [
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"
            ),
            format!("0::/kubepods.slice/kubepods-pod1234.slice/crio-{ID}.scope"),
            format!("0::/system.slice/docker-{ID}.scope"),
            format!(
                "12:memory:/kubepods/burstable/pod1234/{ID}\n11:cpu:/kubepods/burstable/pod1234/{ID}"
            ),
            format!("4:pids:/docker/{ID}"),
        ];
        for cgroup in cases {
            assert_eq!(container_id(&cgroup).as_deref(), Some(ID), "{cgroup}");
        }
    }

    #[test]
    fn processes_outside_containers_have_none() {
        for cgroup in [
            "0::/user.slice/user-1000.slice/session-3.scope",
            "0::/",
            "",
            "garbage",
            "1:name=systemd:/init.scope",
        ] {
            assert_eq!(container_id(cgroup), None, "{cgroup}");
        }
    }
}

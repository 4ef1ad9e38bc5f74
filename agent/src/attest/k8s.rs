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
use sigil_core::untrusted::untrusted;
use sigil_workload_api::source::Caller;
use tokio::sync::watch;

use super::{Startup, WorkloadAttestor, read_proc};
use crate::{Error, Result};
use sigil_core::sync::RwLockExt;

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
        self.containers.read_unpoisoned().get(container_id).cloned()
    }

    fn replace(&self, pods: &[Pod]) {
        let mut fresh = HashMap::new();
        for pod in pods {
            fresh.extend(containers_of(pod));
        }
        *self.containers.write_unpoisoned() = fresh;
        self.changes.send_modify(|n| *n += 1);
    }

    fn apply(&self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut containers = self.containers.write_unpoisoned();
        containers.retain(|_, info| info.pod_uid != uid);
        containers.extend(containers_of(pod));
        drop(containers);
        self.changes.send_modify(|n| *n += 1);
    }

    fn delete(&self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.containers
            .write_unpoisoned()
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

/// Where the kubelet put a process: the pod (by UID) and the container (by runtime ID) whose
/// cgroup holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID as the API server spells it (dashes, not the systemd driver's underscores).
    pub pod_uid: String,
    /// The container ID without the runtime's prefix, 64 hex digits.
    pub container_id: String,
}

/// The pod and container of a `/proc/<pid>/cgroup` file, for containerd, CRI-O and Docker under
/// the kubelet's systemd or cgroupfs driver, cgroup v1 or v2; `None` for a process outside any
/// pod.
///
/// Only the kubelet's own tree counts, read from the top: a process may create cgroups below one
/// it was delegated (a container with a writable cgroupfs, or any user's systemd session), and a
/// path that merely ends in another container's ID, or carries a `kubepods` tree of its own inside
/// such a delegation, must not name that container. So the pod's cgroup must sit where the kubelet
/// puts it (`kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice` under systemd,
/// where a slice's name spells its ancestors, or `kubepods/<qos>/pod<uid>` under cgroupfs), the
/// container's cgroup right below it, and whatever a container made inside its own cgroup is still
/// that container. A path that starts with `..` is read from inside the agent's cgroup namespace:
/// the `..` stand for the ancestors the kubelet's tree shares with the agent's, and nobody can name
/// a cgroup `..`. A kubelet `--cgroup-root` is supported under systemd (`kubelet.slice/
/// kubelet-kubepods.slice/...`), not under cgroupfs.
pub fn pod_container(cgroup: &str) -> Option<PodContainer> {
    cgroup.lines().find_map(|line| {
        // `hierarchy-id:controllers:path`; the path may itself contain colons.
        let path = line.splitn(3, ':').nth(2)?;
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let ups = segments.iter().take_while(|s| **s == "..").count();
        let segments = &segments[ups..];
        let in_namespace = ups > 0;
        let (pod_at, pod_uid) = segments.iter().enumerate().find_map(|(at, segment)| {
            let (ancestors, uid) =
                systemd_pod_slice(segment).or_else(|| cgroupfs_pod(segment, &segments[..at]))?;
            sits_under(&segments[..at], &ancestors, in_namespace).then_some((at, uid))
        })?;
        let container_id = container_scope(segments.get(pod_at + 1)?)?;
        Some(PodContainer {
            pod_uid,
            container_id,
        })
    })
}

/// `kubepods-burstable-pod<uid>.slice` -> the slices systemd puts it under (`kubepods.slice`,
/// `kubepods-burstable.slice`) and the pod UID.
fn systemd_pod_slice(segment: &str) -> Option<(Vec<String>, String)> {
    let unit = segment.strip_suffix(".slice")?;
    let (parent, uid) = unit.rsplit_once("-pod")?;
    let parent_is_kubepods = ["kubepods", "kubepods-besteffort", "kubepods-burstable"]
        .iter()
        .any(|name| parent == *name || parent.ends_with(&format!("-{name}")));
    // The systemd driver spells the UID's dashes as underscores: a dash would make another slice.
    if !parent_is_kubepods || !is_pod_uid(uid) || uid.contains('-') {
        return None;
    }
    // A slice `a-b-c.slice` lives in `a-b.slice`, which lives in `a.slice`.
    let ancestors = parent
        .match_indices('-')
        .map(|(at, _)| &parent[..at])
        .chain([parent])
        .map(|name| format!("{name}.slice"))
        .collect();
    Some((ancestors, uid.replace('_', "-")))
}

/// `pod<uid>` under the cgroupfs driver -> the directories above it (`kubepods`, and the QoS
/// class the path names, if any) and the pod UID.
fn cgroupfs_pod(segment: &str, above: &[&str]) -> Option<(Vec<String>, String)> {
    let uid = segment.strip_prefix("pod")?;
    if !is_pod_uid(uid) {
        return None;
    }
    let mut ancestors = vec!["kubepods".to_string()];
    if let Some(qos @ ("besteffort" | "burstable")) = above.last().copied() {
        ancestors.push(qos.to_string());
    }
    Some((ancestors, uid.to_string()))
}

/// Whether the path above a pod's cgroup is exactly its `ancestors`, or, read from inside a
/// cgroup namespace, the last of them.
fn sits_under(above: &[&str], ancestors: &[String], in_namespace: bool) -> bool {
    if above.len() > ancestors.len() || (!in_namespace && above.len() != ancestors.len()) {
        return false;
    }
    ancestors[ancestors.len() - above.len()..]
        .iter()
        .zip(above)
        .all(|(expected, segment)| expected == segment)
}

/// A pod UID as the kubelet spells it in a cgroup name (dashes, or underscores under systemd).
fn is_pod_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The container ID of a container's cgroup: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope` or a bare `<id>`.
fn container_scope(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
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

    /// The attestor the `[kubernetes]` settings describe, over a pod index that a watch of this
    /// node's pods, spawned on the agent's tasks, keeps current.
    pub async fn start(startup: &mut Startup<'_>) -> Result<Self> {
        let settings = &startup.config.kubernetes;
        let node_name = settings.node_name(startup.source)?;
        let client = settings.client().await?;
        let index = Arc::new(PodIndex::new(node_name));
        startup
            .tasks
            .spawn(watch_pods(client, index.clone(), startup.stopping.clone()));
        Ok(K8sAttestor::new(index, settings.pod_wait.0))
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for K8sAttestor {
    /// The Kubernetes selectors of the process held since the caller connected; empty for a
    /// process outside any container, or a caller whose pid the agent cannot see.
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>> {
        let Some(process) = &caller.process else {
            return Ok(Vec::new());
        };
        let pid = process.pid();
        let cgroup = read_proc(process, "cgroup", |e| {
            format!("cannot read the cgroup of process {pid} ({e}); it may have exited")
        })?;
        // The cgroup read is the connecting process's only if it is still that process.
        process.verify().map_err(Error::CallerChanged)?;
        let Some(PodContainer {
            pod_uid,
            container_id: container,
        }) = pod_container(&cgroup)
        else {
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
        let info = found.ok_or_else(|| Error::PodNotFound {
            container: container.clone(),
            pid,
            node: self.index.node_name.clone(),
            waited: self.pod_wait,
        })?;
        // The kubelet names the pod's cgroup after its UID; a container ID found under another
        // pod's cgroup is a cgroup tree somebody made up.
        if info.pod_uid != pod_uid {
            return Err(Error::CallerRefused(format!(
                "process {pid} is in a cgroup of pod {} but its container {container} belongs to pod {}; refusing to attest it",
                untrusted(&pod_uid),
                info.pod_uid
            )));
        }
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
    const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn found(cgroup: &str) -> Option<(String, String)> {
        pod_container(cgroup).map(|found| (found.pod_uid, found.container_id))
    }

    #[test]
    fn pods_and_containers_from_every_runtime_driver_and_cgroup_version() {
        let uid = "8f4c1d2e-0000-4a5b-9c6d-1234567890ab";
        let systemd_uid = uid.replace('-', "_");
        let cases = [
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!("0::/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-{ID}.scope"),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/docker-{ID}.scope"
            ),
            format!(
                "12:memory:/kubepods/burstable/pod{uid}/{ID}\n11:cpu:/kubepods/burstable/pod{uid}/{ID}"
            ),
            format!("0::/kubepods/pod{uid}/{ID}"),
            // A kubelet with --cgroup-root=/kubelet under systemd.
            format!(
                "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            ),
            // Read from inside the agent's cgroup namespace.
            format!(
                "0::/../../kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!("0::/../../pod{uid}/{ID}"),
            // A cgroup the container made inside its own is still that container.
            format!(
                "0::/kubepods.slice/kubepods-pod{systemd_uid}.slice/cri-containerd-{ID}.scope/init"
            ),
        ];
        for cgroup in cases {
            assert_eq!(
                found(&cgroup),
                Some((uid.to_string(), ID.to_string())),
                "{cgroup}"
            );
        }
    }

    #[test]
    fn processes_outside_pods_have_none() {
        for cgroup in [
            "0::/user.slice/user-1000.slice/session-3.scope".to_string(),
            "0::/".into(),
            "".into(),
            "garbage".into(),
            "1:name=systemd:/init.scope".into(),
            // Docker containers outside Kubernetes are in no pod.
            format!("0::/system.slice/docker-{ID}.scope"),
            format!("4:pids:/docker/{ID}"),
            // A pod's own cgroup, above its containers (the pause process's parent).
            "0::/kubepods.slice/kubepods-poda.slice".into(),
            format!("0::/kubepods.slice/kubepods-poda.slice/crio-conmon-{ID}.scope"),
        ] {
            assert_eq!(found(&cgroup), None, "{cgroup}");
        }
    }

    /// A process that may create cgroups (a user's systemd session is delegated its subtree, as
    /// is a container with a writable cgroupfs) builds a path that ends in another pod's
    /// container ID. None of them may name that container.
    #[test]
    fn cgroups_made_below_a_delegation_name_no_other_container() {
        for cgroup in [
            // The last component is the victim's ID, anywhere.
            format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/{ID}"),
            format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod1/{ID}"),
            // A whole kubepods tree inside a user's session.
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-podv.slice/cri-containerd-{ID}.scope"
            ),
            // A slice whose name claims parents it is not under.
            format!("0::/kubepods-burstable-podv.slice/cri-containerd-{ID}.scope"),
            format!("0::/kubepods.slice/kubepods-burstable-podv.slice/cri-containerd-{ID}.scope"),
            // A dash in a slice name is a level of the hierarchy, never part of a pod UID.
            format!("0::/kubepods.slice/kubepods-podv-1.slice/cri-containerd-{ID}.scope"),
        ] {
            assert_eq!(found(&cgroup), None, "{cgroup}");
        }
        // Inside its own container, a fake pod tree naming the victim still names its own.
        let nested = format!(
            "0::/kubepods.slice/kubepods-podown.slice/cri-containerd-{OTHER}.scope/kubepods.slice/kubepods-podv.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(found(&nested), Some(("own".to_string(), OTHER.to_string())));
    }
}

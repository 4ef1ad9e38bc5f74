//! Kubernetes end to end, against a fake API server in this process that the real binaries (and
//! kube-rs in them) reach through a kubeconfig: PSAT node attestation and each of its refusals, a
//! workload mapped through its cgroup to a pod and given its ServiceAccount's identity through the
//! real Workload API, identities scoped to the node, a deleted pod's identity withdrawn, the bundle
//! ConfigMap, cgroups made up to name another pod's container refused, and 1000 pods created at
//! once reaching their node's agent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use sigil_agent::node::{IdentityStore, attest_node};
use sigil_core::id::SpiffeId;
use sigil_core::x509::{KeyType, csr_for};
use sigil_proto::agent::{BatchSignX509SvidRequest, X509SvidRequest};
use sigil_tests::kubernetes::{FakeCluster, FakeToken, KubernetesServer};
use sigil_tests::steps::{ServerTrust, metric, refused_because};
use sigil_tests::{AgentProcess, ServerProcess};
use sigil_workload_api::client::WorkloadClient;
use spiffe::WorkloadApiClient;

const WEB_CONTAINER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DB_CONTAINER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const AGENT_CONTAINER: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
const DNS_CONTAINER: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
const INTRUDER_CONTAINER: &str = "1111111111111111111111111111111111111111111111111111111111111111";
/// The cgroup the kubelet (systemd driver) gives web-1's container; its pod UID is `pod-web-1`.
const WEB_CGROUP: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podpod_web_1.slice/cri-containerd-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope\n";

/// A pod of the fixture, in the order `FakeKubernetes::add_pod` takes it: `(namespace, pod, pod
/// UID, node, ServiceAccount, labels, its one container (name, image, container ID))`.
type PodFixture = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    (&'static str, &'static str, &'static str),
);

/// Two nodes and the pods on them: node-a's agent, web-1 (which this test process plays), an
/// intruder beside it, db-1 on node-b, and coredns in kube-system.
const PODS: [PodFixture; 5] = [
    (
        "sigil",
        "sigil-agent-a",
        "pod-agent-a",
        "node-a",
        "sigil-agent",
        &[],
        ("agent", "sigil-agent:dev", AGENT_CONTAINER),
    ),
    (
        "prod",
        "web-1",
        "pod-web-1",
        "node-a",
        "web",
        &[("app", "web")],
        ("web", "web:1", WEB_CONTAINER),
    ),
    (
        "prod",
        "intruder-1",
        "pod-intruder-1",
        "node-a",
        "intruder",
        &[],
        ("intruder", "intruder:1", INTRUDER_CONTAINER),
    ),
    (
        "prod",
        "db-1",
        "pod-db-1",
        "node-b",
        "db",
        &[],
        ("db", "db:1", DB_CONTAINER),
    ),
    (
        "kube-system",
        "dns",
        "pod-dns",
        "node-a",
        "coredns",
        &[],
        ("dns", "dns:1", DNS_CONTAINER),
    ),
];

/// A ServiceAccount token TokenReview knows: `(token, audience, (namespace, account), pod,
/// expired)`.
type TokenFixture = (
    &'static str,
    &'static str,
    (&'static str, &'static str),
    &'static str,
    bool,
);

/// The tokens of the fixture. Only `psat-a` attests node-a's agent; each other one is refused for
/// its own reason.
const TOKENS: [TokenFixture; 5] = [
    (
        "psat-a",
        "sigil-server",
        ("sigil", "sigil-agent"),
        "sigil-agent-a",
        false,
    ),
    (
        "psat-wrong-audience",
        "someone-else",
        ("sigil", "sigil-agent"),
        "sigil-agent-a",
        false,
    ),
    (
        "psat-expired",
        "sigil-server",
        ("sigil", "sigil-agent"),
        "sigil-agent-a",
        true,
    ),
    (
        "psat-not-allowed",
        "sigil-server",
        ("prod", "web"),
        "web-1",
        false,
    ),
    (
        "psat-pod-gone",
        "sigil-server",
        ("sigil", "sigil-agent"),
        "sigil-agent-gone",
        false,
    ),
];

/// The cluster of the scenario: the fake API server, a server with automatic identities and the
/// bundle ConfigMap, and node-a's agent attested by PSAT. This test process plays a container of
/// prod/web-1 through `cgroup_file`, its cgroup in the agent's proc root.
struct Cluster {
    agent: AgentProcess,
    server: ServerProcess,
    trust: ServerTrust,
    /// The spiffe crate's client of node-a's agent: the workload's view.
    workload: WorkloadApiClient,
    cgroup_file: PathBuf,
    k8s: FakeCluster,
}

impl Cluster {
    async fn start() -> anyhow::Result<Self> {
        let k8s = FakeCluster::start().await?;
        let (fake, dir) = (&k8s.fake, k8s.dir.path());
        fake.add_node("node-a", "uid-a", &[("zone", "a")]);
        fake.add_node("node-b", "uid-b", &[]);
        for (namespace, name, uid, node, account, labels, container) in PODS {
            fake.add_pod(namespace, name, uid, node, account, labels, &[container]);
        }
        for (token, audience, (namespace, account), pod, expired) in TOKENS {
            let details = FakeToken {
                audiences: vec![audience.into()],
                service_account: (namespace.into(), account.into()),
                pod: (namespace.into(), pod.into()),
                expired,
            };
            fake.add_token(token, details);
        }
        let KubernetesServer {
            server,
            trust,
            bundle_path,
        } = k8s.start_server(
            "",
            "cluster = \"demo\"\nauto_identity = true\nbundle_configmap = \"sigil-bundle\"\n",
        )?;
        let proc_root = dir.join("proc");
        let cgroup_file = play_web_container(&proc_root)?;
        let token_path = dir.join("psat-token");
        std::fs::write(&token_path, "psat-a\n")?;
        let agent = AgentProcess::start(
            &dir.join("agent"),
            &server,
            &bundle_path,
            None,
            &format!(
                "node_attestor = \"k8s_psat\"\nproc_root = \"{}\"\n[kubernetes]\nworkload_attestor = true\npod_wait = \"1s\"\nnode_name = \"node-a\"\nkubeconfig = \"{}\"\ncluster = \"demo\"\ntoken_path = \"{}\"\n",
                proc_root.display(),
                k8s.kubeconfig.display(),
                token_path.display()
            ),
        )?;
        let workload = agent.workload_client().await?;
        Ok(Cluster {
            agent,
            server,
            trust,
            workload,
            cgroup_file,
            k8s,
        })
    }

    /// Puts this test process in the agent's proc root with `cgroup` as its cgroup: the container
    /// the agent's workload attestor will see it as.
    fn set_cgroup(&self, cgroup: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(&self.cgroup_file, cgroup)?)
    }
}

/// Makes `proc_root` hold an entry for this process with web-1's container's cgroup, its real
/// uid and its real start time; returns the cgroup file.
fn play_web_container(proc_root: &Path) -> anyhow::Result<PathBuf> {
    let pid = std::process::id();
    std::fs::create_dir_all(proc_root.join(pid.to_string()))?;
    let cgroup_file = proc_root.join(format!("{pid}/cgroup"));
    std::fs::write(&cgroup_file, WEB_CGROUP)?;
    let uid = sigil_tests::current_uid()?;
    std::fs::write(
        proc_root.join(format!("{pid}/status")),
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGroups:\t\n"),
    )?;
    // The agent holds the caller from accept by its start time (field 22 of stat).
    std::fs::write(
        proc_root.join(format!("{pid}/stat")),
        std::fs::read_to_string("/proc/self/stat")?,
    )?;
    Ok(cgroup_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_identities_follow_pods_and_stay_on_their_node() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    bad_tokens_are_refused_with_the_reason(&cluster).await?;
    the_agent_is_named_and_selected_by_its_node(&cluster)?;
    the_workload_gets_its_service_account_identity(&cluster).await?;
    let mut raw = made_up_cgroups_get_no_borrowed_identity(&cluster).await?;
    the_agent_signs_only_for_pods_on_its_node(&cluster).await?;
    // The bundle is in the ConfigMap agents bootstrap from.
    cluster
        .k8s
        .fake
        .wait_for_configmap("sigil", "sigil-bundle", |data| {
            data["bundle.crt"] == cluster.trust.pem.as_str()
        })
        .await?;
    deleting_the_pod_withdraws_its_identity(&cluster).await?;
    an_unknown_container_is_refused_after_pod_wait(&cluster, &mut raw).await?;
    a_thousand_new_pods_reach_the_agent(&cluster).await
}

/// Each bad token is refused, with the reason.
async fn bad_tokens_are_refused_with_the_reason(cluster: &Cluster) -> anyhow::Result<()> {
    for (token, k8s_cluster, expected) in [
        ("psat-wrong-audience", "demo", "audience"),
        ("psat-expired", "demo", "expired"),
        ("psat-not-allowed", "demo", "may not attest"),
        ("psat-pod-gone", "demo", "gone"),
        ("forged", "demo", "invalid bearer token"),
        ("psat-a", "elsewhere", "cluster `elsewhere`"),
    ] {
        let mut anonymous = cluster.trust.connect(&cluster.server, None).await?;
        let payload = serde_json::json!({"cluster": k8s_cluster, "token": token})
            .to_string()
            .into_bytes();
        let refused = attest_node(&mut anonymous, "k8s_psat", payload)
            .await
            .err()
            .context("accepted a bad token")?;
        ensure!(
            refused.to_string().contains(expected),
            "{token}: expected `{expected}` in: {refused}"
        );
    }
    Ok(())
}

/// The agent's ID names the cluster and the node's UID; its selectors, the node and its pod.
fn the_agent_is_named_and_selected_by_its_node(cluster: &Cluster) -> anyhow::Result<()> {
    let agents = cluster.server.cli_json(&["agent", "list"])?;
    ensure!(
        agents["agents"][0]["spiffe_id"] == "spiffe://example.org/sigil/agent/k8s_psat/demo/uid-a",
        "{agents}"
    );
    let selectors = agents["agents"][0]["selectors"].to_string();
    for expected in [
        "agent_node_name:node-a",
        "agent_ns:sigil",
        "agent_sa:sigil-agent",
        "agent_node_label:zone:a",
        "cluster:demo",
    ] {
        ensure!(
            selectors.contains(expected),
            "{expected} missing from {selectors}"
        );
    }
    Ok(())
}

/// The workload gets its ServiceAccount's identity with no registration entry.
async fn the_workload_gets_its_service_account_identity(cluster: &Cluster) -> anyhow::Result<()> {
    let svid = cluster.workload.fetch_x509_svid().await?;
    ensure!(
        svid.spiffe_id().to_string() == "spiffe://example.org/ns/prod/sa/web",
        "{}",
        svid.spiffe_id()
    );
    Ok(())
}

/// A process that may create cgroups names one after web-1's container: a user's systemd session
/// (delegated its subtree) growing a kubepods tree of its own gets no identity, the intruder's
/// container, which made the same tree inside its own cgroup, gets its own, and a container ID
/// under another pod's cgroup is refused. Returns the raw client that saw the refusal.
async fn made_up_cgroups_get_no_borrowed_identity(
    cluster: &Cluster,
) -> anyhow::Result<WorkloadClient> {
    cluster.set_cgroup(&format!(
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podpod_web_1.slice/cri-containerd-{WEB_CONTAINER}.scope\n"
    ))?;
    let from_session = cluster.workload.fetch_x509_svid().await;
    ensure!(
        from_session.is_err(),
        "a user session's made-up cgroup got {:?}",
        from_session.map(|svid| svid.spiffe_id().to_string())
    );
    cluster.set_cgroup(&format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podpod_intruder_1.slice/cri-containerd-{INTRUDER_CONTAINER}.scope/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podpod_web_1.slice/cri-containerd-{WEB_CONTAINER}.scope\n"
    ))?;
    let intruder = cluster.workload.fetch_x509_svid().await?;
    ensure!(
        intruder.spiffe_id().to_string() == "spiffe://example.org/ns/prod/sa/intruder",
        "the intruder got {}",
        intruder.spiffe_id()
    );
    // A tree the kubelet never makes.
    cluster.set_cgroup(&format!(
        "0::/kubepods.slice/kubepods-podpod_intruder_1.slice/cri-containerd-{WEB_CONTAINER}.scope\n"
    ))?;
    let mut raw = WorkloadClient::connect(&cluster.agent.socket).await?;
    refused_because(
        raw.fetch_x509().await,
        "belongs to pod pod-web-1",
        "a container under another pod's cgroup got an identity",
    )?;
    cluster.set_cgroup(WEB_CGROUP)?;
    Ok(raw)
}

/// The agent of node-a may not obtain identities whose pods run elsewhere, or in kube-system.
async fn the_agent_signs_only_for_pods_on_its_node(cluster: &Cluster) -> anyhow::Result<()> {
    let td = &cluster.trust.trust_domain;
    let (identity, _) = IdentityStore::open(&cluster.agent.data_dir)?
        .load(td)?
        .context("stored agent identity")?;
    let mut as_agent = cluster
        .trust
        .connect(&cluster.server, Some(&identity))
        .await?;
    for (entry_id, spiffe_id, allowed) in [
        ("k8s:prod:db", "spiffe://example.org/ns/prod/sa/db", false),
        (
            "k8s:kube-system:coredns",
            "spiffe://example.org/ns/kube-system/sa/coredns",
            false,
        ),
        ("k8s:prod:web", "spiffe://example.org/ns/prod/sa/web", true),
    ] {
        let csr = csr_for(
            &KeyType::EcP256.generate()?,
            Some(&SpiffeId::new(spiffe_id)?),
        )?;
        let response = as_agent
            .client
            .batch_sign_x509_svid(BatchSignX509SvidRequest {
                requests: vec![X509SvidRequest {
                    entry_id: entry_id.into(),
                    csr,
                }],
            })
            .await?
            .into_inner();
        let code = response.results[0].error_code;
        ensure!(
            (code == 0) == allowed,
            "{entry_id}: code {code} {}",
            response.results[0].error_message
        );
        if !allowed {
            ensure!(
                code == tonic::Code::PermissionDenied as i32,
                "{entry_id}: {code}"
            );
        }
    }
    Ok(())
}

/// Deleting the pod withdraws the identity from the waiting workload.
async fn deleting_the_pod_withdraws_its_identity(cluster: &Cluster) -> anyhow::Result<()> {
    let mut updates = cluster.workload.stream_x509_svids().await?;
    updates.next().await.context("stream ended")??;
    cluster.k8s.fake.delete_pod("prod", "web-1");
    let after = tokio::time::timeout(Duration::from_secs(10), updates.next()).await?;
    ensure!(
        matches!(after, Some(Err(_)) | None),
        "the identity should be withdrawn, got {after:?}"
    );
    ensure!(
        cluster.workload.fetch_x509_svid().await.is_err(),
        "no identity once the pod is gone"
    );
    Ok(())
}

/// A container no pod on the node has (yet) is waited for, up to pod_wait, then refused with the
/// reason.
async fn an_unknown_container_is_refused_after_pod_wait(
    cluster: &Cluster,
    raw: &mut WorkloadClient,
) -> anyhow::Result<()> {
    cluster.set_cgroup(
        "0::/kubepods.slice/kubepods-podnew.slice/cri-containerd-eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.scope\n",
    )?;
    refused_because(
        raw.fetch_x509().await,
        "is not in any pod on node node-a",
        "an unknown container got an identity",
    )
}

/// 1000 pods created at once reach node-a's agent.
async fn a_thousand_new_pods_reach_the_agent(cluster: &Cluster) -> anyhow::Result<()> {
    let health = &cluster.agent.health;
    let before = metric(health, "sigil_agent_entries")?;
    let started = Instant::now();
    for n in 0..1000 {
        let name = format!("bulk-{n}");
        let container = format!("{n:064x}");
        cluster.k8s.fake.add_pod(
            "bulk",
            &name,
            &format!("pod-bulk-{n}"),
            "node-a",
            &format!("svc-{n}"),
            &[],
            &[("app", "app:1", &container)],
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if metric(health, "sigil_agent_entries")? >= before + 1000.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "1000 pods did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "1000 pods created at once reached their node's agent in {:?}",
        started.elapsed()
    );
    Ok(())
}

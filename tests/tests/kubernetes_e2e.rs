//! Kubernetes end to end, against a fake API server in this process that the real binaries (and
//! kube-rs in them) reach through a kubeconfig: PSAT node attestation and each of its refusals, a
//! workload mapped through its cgroup to a pod and given its ServiceAccount's identity through the
//! real Workload API, identities scoped to the node, a deleted pod's identity withdrawn, the bundle
//! ConfigMap, cgroups made up to name another pod's container refused, and 1000 pods created at
//! once reaching their node's agent.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use sigil_agent::node::{IdentityStore, attest_node, connect};
use sigil_core::id::{SpiffeId, parse_trust_domain};
use sigil_core::x509::{KeyType, csr_for};
use sigil_proto::agent::{BatchSignX509SvidRequest, X509SvidRequest};
use sigil_tests::kubernetes::{FakeKubernetes, FakeToken};
use sigil_tests::{AgentProcess, ServerProcess, pem_certificates};
use spiffe::WorkloadApiClient;

const WEB_CONTAINER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DB_CONTAINER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const AGENT_CONTAINER: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
const DNS_CONTAINER: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
const INTRUDER_CONTAINER: &str = "1111111111111111111111111111111111111111111111111111111111111111";
/// The cgroup the kubelet (systemd driver) gives web-1's container; its pod UID is `pod-web-1`.
const WEB_CGROUP: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podpod_web_1.slice/cri-containerd-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope\n";

fn token(audience: &str, namespace: &str, account: &str, pod: &str, expired: bool) -> FakeToken {
    FakeToken {
        audiences: vec![audience.into()],
        service_account: (namespace.into(), account.into()),
        pod: (namespace.into(), pod.into()),
        expired,
    }
}

async fn metric(address: &str, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .with_context(|| format!("no {name} in the agent's metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_identities_follow_pods_and_stay_on_their_node() -> anyhow::Result<()> {
    let fake = FakeKubernetes::start().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig)?;
    fake.add_node("node-a", "uid-a", &[("zone", "a")]);
    fake.add_node("node-b", "uid-b", &[]);
    fake.add_pod(
        "sigil",
        "sigil-agent-a",
        "pod-agent-a",
        "node-a",
        "sigil-agent",
        &[],
        &[("agent", "sigil-agent:dev", AGENT_CONTAINER)],
    );
    fake.add_pod(
        "prod",
        "web-1",
        "pod-web-1",
        "node-a",
        "web",
        &[("app", "web")],
        &[("web", "web:1", WEB_CONTAINER)],
    );
    fake.add_pod(
        "prod",
        "intruder-1",
        "pod-intruder-1",
        "node-a",
        "intruder",
        &[],
        &[("intruder", "intruder:1", INTRUDER_CONTAINER)],
    );
    fake.add_pod(
        "prod",
        "db-1",
        "pod-db-1",
        "node-b",
        "db",
        &[],
        &[("db", "db:1", DB_CONTAINER)],
    );
    fake.add_pod(
        "kube-system",
        "dns",
        "pod-dns",
        "node-a",
        "coredns",
        &[],
        &[("dns", "dns:1", DNS_CONTAINER)],
    );
    fake.add_token(
        "psat-a",
        token(
            "sigil-server",
            "sigil",
            "sigil-agent",
            "sigil-agent-a",
            false,
        ),
    );
    fake.add_token(
        "psat-wrong-audience",
        token(
            "someone-else",
            "sigil",
            "sigil-agent",
            "sigil-agent-a",
            false,
        ),
    );
    fake.add_token(
        "psat-expired",
        token(
            "sigil-server",
            "sigil",
            "sigil-agent",
            "sigil-agent-a",
            true,
        ),
    );
    fake.add_token(
        "psat-not-allowed",
        token("sigil-server", "prod", "web", "web-1", false),
    );
    fake.add_token(
        "psat-pod-gone",
        token(
            "sigil-server",
            "sigil",
            "sigil-agent",
            "sigil-agent-gone",
            false,
        ),
    );

    let server = ServerProcess::start(
        &dir.path().join("server"),
        None,
        &format!(
            "[kubernetes]\ncluster = \"demo\"\nkubeconfig = \"{}\"\nauto_identity = true\nbundle_configmap = \"sigil-bundle\"\n",
            kubeconfig.display()
        ),
    )?;
    let bundle_pem = server.cli(&["bundle", "show"])?;
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, &bundle_pem)?;
    let roots = pem_certificates(&bundle_pem)?;
    let td = parse_trust_domain("trust_domain", "example.org")?;

    // Each bad token is refused, with the reason.
    for (token, cluster, expected) in [
        ("psat-wrong-audience", "demo", "audience"),
        ("psat-expired", "demo", "expired"),
        ("psat-not-allowed", "demo", "may not attest"),
        ("psat-pod-gone", "demo", "gone"),
        ("forged", "demo", "invalid bearer token"),
        ("psat-a", "elsewhere", "cluster `elsewhere`"),
    ] {
        let mut anonymous = connect(&server.agent_api, &td, &roots, None).await?;
        let payload = serde_json::json!({"cluster": cluster, "token": token})
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

    // This test process plays a container of pod prod/web-1 on node-a: a proc root whose entry for
    // our pid has that container's cgroup.
    let pid = std::process::id();
    let proc_root = dir.path().join("proc");
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
    let token_path = dir.path().join("psat-token");
    std::fs::write(&token_path, "psat-a\n")?;
    let agent = AgentProcess::start_with(
        &dir.path().join("agent"),
        &server,
        &bundle_path,
        None,
        &format!(
            "node_attestor = \"k8s_psat\"\nproc_root = \"{}\"\n[kubernetes]\nworkload_attestor = true\npod_wait = \"1s\"\nnode_name = \"node-a\"\nkubeconfig = \"{}\"\ncluster = \"demo\"\ntoken_path = \"{}\"\n",
            proc_root.display(),
            kubeconfig.display(),
            token_path.display()
        ),
    )?;
    let agents = server.cli_json(&["agent", "list"])?;
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

    // The workload gets its ServiceAccount's identity with no registration entry.
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await?;
    let svid = client.fetch_x509_svid().await?;
    ensure!(
        svid.spiffe_id().to_string() == "spiffe://example.org/ns/prod/sa/web",
        "{}",
        svid.spiffe_id()
    );

    // A process that may create cgroups names one after web-1's container: a user's systemd
    // session (delegated its subtree) growing a kubepods tree of its own gets no identity, and
    // the intruder's container, which made the same tree inside its own cgroup, gets its own.
    std::fs::write(
        &cgroup_file,
        format!(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podpod_web_1.slice/cri-containerd-{WEB_CONTAINER}.scope\n"
        ),
    )?;
    let from_session = client.fetch_x509_svid().await;
    ensure!(
        from_session.is_err(),
        "a user session's made-up cgroup got {:?}",
        from_session.map(|svid| svid.spiffe_id().to_string())
    );
    std::fs::write(
        &cgroup_file,
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podpod_intruder_1.slice/cri-containerd-{INTRUDER_CONTAINER}.scope/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podpod_web_1.slice/cri-containerd-{WEB_CONTAINER}.scope\n"
        ),
    )?;
    let intruder = client.fetch_x509_svid().await?;
    ensure!(
        intruder.spiffe_id().to_string() == "spiffe://example.org/ns/prod/sa/intruder",
        "the intruder got {}",
        intruder.spiffe_id()
    );
    // A container ID under another pod's cgroup (a tree the kubelet never makes) is refused.
    std::fs::write(
        &cgroup_file,
        format!(
            "0::/kubepods.slice/kubepods-podpod_intruder_1.slice/cri-containerd-{WEB_CONTAINER}.scope\n"
        ),
    )?;
    let mut raw = sigil_workload_api::client::WorkloadClient::connect(&agent.socket).await?;
    let refused = raw
        .fetch_x509()
        .await
        .err()
        .context("a container under another pod's cgroup got an identity")?;
    ensure!(
        refused.to_string().contains("belongs to pod pod-web-1"),
        "{refused}"
    );
    std::fs::write(&cgroup_file, WEB_CGROUP)?;

    // The agent of node-a may not obtain identities whose pods run elsewhere, or in kube-system.
    let (identity, _) = IdentityStore::open(&agent.data_dir)?
        .load(&td)?
        .context("stored agent identity")?;
    let mut as_agent = connect(&server.agent_api, &td, &roots, Some(&identity)).await?;
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

    // The bundle is in the ConfigMap agents bootstrap from.
    fake.wait_for_configmap("sigil", "sigil-bundle", |data| {
        data["bundle.crt"] == bundle_pem.as_str()
    })
    .await?;

    // Deleting the pod withdraws the identity from the waiting workload.
    let mut updates = client.stream_x509_svids().await?;
    updates.next().await.context("stream ended")??;
    fake.delete_pod("prod", "web-1");
    let after = tokio::time::timeout(Duration::from_secs(10), updates.next()).await?;
    ensure!(
        matches!(after, Some(Err(_)) | None),
        "the identity should be withdrawn, got {after:?}"
    );
    ensure!(
        client.fetch_x509_svid().await.is_err(),
        "no identity once the pod is gone"
    );

    // A container no pod on the node has (yet) is waited for, up to pod_wait, then refused with
    // the reason.
    std::fs::write(
        &cgroup_file,
        "0::/kubepods.slice/kubepods-podnew.slice/cri-containerd-eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.scope\n",
    )?;
    let refused = raw
        .fetch_x509()
        .await
        .err()
        .context("an unknown container got an identity")?;
    ensure!(
        refused
            .to_string()
            .contains("is not in any pod on node node-a"),
        "{refused}"
    );

    // 1000 pods created at once reach node-a's agent.
    let health = agent.health.clone();
    let before = metric(&health, "sigil_agent_entries").await?;
    let started = Instant::now();
    for n in 0..1000 {
        let name = format!("bulk-{n}");
        let container = format!("{n:064x}");
        fake.add_pod(
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
        if metric(&health, "sigil_agent_entries").await? >= before + 1000.0 {
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

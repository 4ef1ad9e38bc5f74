//! Workload attestation on a Kubernetes node with 100 pods, and the agent's CPU and memory with its
//! pod watch, against the in-process fake API server.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-kubernetes
//! ```
//!
//! The real server (PSAT attestation, automatic identities) and agent (k8s workload attestor)
//! reach the fake through a kubeconfig. This process plays a container of one of the 100 pods:
//! each `FetchX509SVID` is attested anew (peer credentials, cgroup, pod lookup in the watch).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use sigil_tests::bench::procfs::{cpu_time, rss_kib};
use sigil_tests::bench::report::LatencyMs;
use sigil_tests::kubernetes::{FakeKubernetes, FakeToken};
use sigil_tests::{AgentProcess, ServerProcess};
use sigil_workload_api::client::WorkloadClient;

#[derive(Debug, Parser)]
#[command(about = "Kubernetes workload attestation latency and agent cost")]
struct Args {
    /// Pods on the node.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Attestations timed.
    #[arg(long, default_value_t = 500)]
    attestations: usize,
    /// Seconds of idle watch to measure the agent's CPU over.
    #[arg(long, default_value_t = 5)]
    idle_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fake = FakeKubernetes::start().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig)?;
    add_node_with_pods(&fake, args.pods);
    let server = ServerProcess::start(
        &dir.path().join("server"),
        None,
        &format!(
            "[kubernetes]\ncluster = \"demo\"\nkubeconfig = \"{}\"\nauto_identity = true\n",
            kubeconfig.display()
        ),
    )?;
    let agent = start_agent(dir.path(), &server, &kubeconfig)?;
    let agent_pid = agent.pid().context("agent pid")?;
    let mut client = WorkloadClient::connect(&agent.socket).await?;
    let first = client.fetch_x509().await?;
    ensure!(
        first
            .svids
            .first()
            .is_some_and(|s| s.spiffe_id == "spiffe://example.org/ns/apps/sa/sa-0"),
        "identity"
    );

    report_attestations(&mut client, &args).await?;
    report_idle_agent(agent_pid, &args).await?;
    report_pod_churn(&fake, agent_pid, args.pods).await
}

/// Puts `node-a` in the fake with the agent's own pod, `pods` application pods (ten service
/// accounts among them) and the agent's projected service account token `psat`.
fn add_node_with_pods(fake: &FakeKubernetes, pods: usize) {
    fake.add_node("node-a", "uid-a", &[]);
    fake.add_pod(
        "sigil",
        "agent",
        "pod-agent",
        "node-a",
        "sigil-agent",
        &[],
        &[("agent", "sigil:1", &"c".repeat(64))],
    );
    for n in 0..pods {
        let container = format!("{n:064x}");
        fake.add_pod(
            "apps",
            &format!("app-{n}"),
            &format!("pod-{n}"),
            "node-a",
            &format!("sa-{}", n % 10),
            &[("app", "bench")],
            &[("app", "app:1", &container)],
        );
    }
    fake.add_token(
        "psat",
        FakeToken {
            audiences: vec!["sigil-server".into()],
            service_account: ("sigil".into(), "sigil-agent".into()),
            pod: ("sigil".into(), "agent".into()),
            expired: false,
        },
    );
}

/// Starts the agent of `node-a` (PSAT node attestation, the k8s workload attestor) in `dir`,
/// with a proc root in which this process is a container of pod app-0.
fn start_agent(
    dir: &Path,
    server: &ServerProcess,
    kubeconfig: &Path,
) -> anyhow::Result<AgentProcess> {
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, server.cli(&["bundle", "show"])?)?;
    let proc_root = play_app_0_container(dir)?;
    let token = dir.join("token");
    std::fs::write(&token, "psat")?;
    AgentProcess::start(
        &dir.join("agent"),
        server,
        &bundle,
        None,
        &format!(
            "node_attestor = \"k8s_psat\"\nproc_root = \"{}\"\n[kubernetes]\nworkload_attestor = true\nnode_name = \"node-a\"\nkubeconfig = \"{}\"\ncluster = \"demo\"\ntoken_path = \"{}\"\n",
            proc_root.display(),
            kubeconfig.display(),
            token.display()
        ),
    )
}

/// A proc root under `dir` in which this process is a container of pod app-0: its cgroup names
/// the container, its status and stat are this process's own. Returns the proc root.
fn play_app_0_container(dir: &Path) -> anyhow::Result<PathBuf> {
    let pid = std::process::id();
    let proc_root = dir.join("proc");
    let own = proc_root.join(pid.to_string());
    std::fs::create_dir_all(&own)?;
    std::fs::write(
        own.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-podpod_0.slice/cri-containerd-{:064x}.scope\n",
            0
        ),
    )?;
    std::fs::write(
        own.join("status"),
        std::fs::read_to_string("/proc/self/status")?,
    )?;
    // The agent holds the caller from accept by its start time (field 22 of stat).
    std::fs::write(
        own.join("stat"),
        std::fs::read_to_string("/proc/self/stat")?,
    )?;
    Ok(proc_root)
}

/// Times `args.attestations` fetches, each attested anew, and prints their p50 and p99.
async fn report_attestations(client: &mut WorkloadClient, args: &Args) -> anyhow::Result<()> {
    let mut latencies = Vec::with_capacity(args.attestations);
    for _ in 0..args.attestations {
        let started = Instant::now();
        client.fetch_x509().await?;
        latencies.push(started.elapsed());
    }
    let figures = LatencyMs::of(&mut latencies);
    println!(
        "workload attestation + first X509SVIDResponse on a node with {} pods, {} calls: p50 {:.2} ms, p99 {:.2} ms",
        args.pods,
        latencies.len(),
        figures.p50,
        figures.p99
    );
    Ok(())
}

/// Prints the agent's resident memory and its CPU over `args.idle_seconds` of an idle watch.
async fn report_idle_agent(agent_pid: u32, args: &Args) -> anyhow::Result<()> {
    let rss = rss_kib(agent_pid)?;
    let before = cpu_time(agent_pid)?;
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let idle = cpu_time(agent_pid)?.saturating_sub(before);
    println!(
        "agent with the watch of {} pods: {} KiB resident; {:.1} millicores while idle ({:?} CPU over {} s)",
        args.pods + 1,
        rss,
        idle.as_secs_f64() * 1000.0 / args.idle_seconds as f64,
        idle,
        args.idle_seconds
    );
    Ok(())
}

/// Adds and deletes `pods` pods five times over and prints the agent's CPU for those events.
async fn report_pod_churn(
    fake: &FakeKubernetes,
    agent_pid: u32,
    pods: usize,
) -> anyhow::Result<()> {
    let before = cpu_time(agent_pid)?;
    for round in 0..5 {
        for n in 0..pods {
            let name = format!("churn-{round}-{n}");
            fake.add_pod(
                "churn",
                &name,
                &format!("uid-{name}"),
                "node-a",
                "churn",
                &[],
                &[(
                    "c",
                    "c:1",
                    &format!("{:064x}", 1_000_000 + round * 1000 + n),
                )],
            );
            fake.delete_pod("churn", &name);
        }
    }
    // Let the agent drain the events before reading its CPU time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let churn = cpu_time(agent_pid)?.saturating_sub(before);
    println!(
        "agent CPU for {} pod events (adds and deletes): {:?} ({:.1} us per event)",
        10 * pods,
        churn,
        churn.as_secs_f64() * 1e6 / (10 * pods) as f64
    );
    Ok(())
}

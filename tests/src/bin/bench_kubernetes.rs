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

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use sigil_tests::bench::procfs::{cpu_time, rss_kib};
use sigil_tests::bench::report::percentile;
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
    for n in 0..args.pods {
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
    let server = ServerProcess::start(
        &dir.path().join("server"),
        None,
        &format!(
            "[kubernetes]\ncluster = \"demo\"\nkubeconfig = \"{}\"\nauto_identity = true\n",
            kubeconfig.display()
        ),
    )?;
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, server.cli(&["bundle", "show"])?)?;

    // This process is a container of pod app-0.
    let pid = std::process::id();
    let proc_root = dir.path().join("proc");
    std::fs::create_dir_all(proc_root.join(pid.to_string()))?;
    std::fs::write(
        proc_root.join(format!("{pid}/cgroup")),
        format!(
            "0::/kubepods.slice/kubepods-podpod_0.slice/cri-containerd-{:064x}.scope\n",
            0
        ),
    )?;
    let own_status = std::fs::read_to_string("/proc/self/status")?;
    std::fs::write(proc_root.join(format!("{pid}/status")), own_status)?;
    // The agent holds the caller from accept by its start time (field 22 of stat).
    std::fs::write(
        proc_root.join(format!("{pid}/stat")),
        std::fs::read_to_string("/proc/self/stat")?,
    )?;
    let token = dir.path().join("token");
    std::fs::write(&token, "psat")?;
    let agent = AgentProcess::start_with(
        &dir.path().join("agent"),
        &server,
        &bundle,
        None,
        &format!(
            "node_attestor = \"k8s_psat\"\nproc_root = \"{}\"\n[kubernetes]\nworkload_attestor = true\nnode_name = \"node-a\"\nkubeconfig = \"{}\"\ncluster = \"demo\"\ntoken_path = \"{}\"\n",
            proc_root.display(),
            kubeconfig.display(),
            token.display()
        ),
    )?;
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

    let mut latencies = Vec::with_capacity(args.attestations);
    for _ in 0..args.attestations {
        let started = Instant::now();
        client.fetch_x509().await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "workload attestation + first X509SVIDResponse on a node with {} pods, {} calls: p50 {:.2} ms, p99 {:.2} ms",
        args.pods,
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );

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

    let before = cpu_time(agent_pid)?;
    for round in 0..5 {
        for n in 0..args.pods {
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
        10 * args.pods,
        churn,
        churn.as_secs_f64() * 1e6 / (10 * args.pods) as f64
    );
    Ok(())
}

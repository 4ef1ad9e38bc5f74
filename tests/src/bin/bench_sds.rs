//! SDS on the agent: how fast 100 Envoy-like SDS streams get their first secrets, how long a
//! rotation takes to reach all of them, and how many SDS responses per second that is.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-sds
//! ```
//!
//! The server and agent are the real binaries; the SDS clients are `StreamSecrets` streams from
//! this process over the agent's socket, acknowledging each response as Envoy does. The entry's
//! SVIDs live 6 s, so the agent rotates them every ~3 s.

use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use sigil_tests::Node;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[derive(Debug, Parser)]
#[command(about = "SDS first responses, rotation push and responses per second")]
struct Args {
    /// Concurrent SDS streams.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Rotations to wait for.
    #[arg(long, default_value_t = 3)]
    rotations: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let node = Node::for_this_uid(&[("spiffe://example.org/envoy", &["--x509-svid-ttl", "6s"])])?;
    let agent = &node.agent;

    // Every stream reports (stream index, version, when) for each response it receives.
    let (reports, mut received) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    let started = Instant::now();
    for index in 0..args.streams {
        // One connection per stream, as separate Envoys would open.
        let channel = agent.grpc_channel().await?;
        let reports = reports.clone();
        tokio::spawn(async move {
            let mut client = SecretDiscoveryServiceClient::new(channel);
            let (requests, outbound) = mpsc::channel(4);
            let first = DiscoveryRequest {
                type_url: SECRET_TYPE.into(),
                resource_names: vec!["default".into(), "ROOTCA".into()],
                ..DiscoveryRequest::default()
            };
            if requests.send(first.clone()).await.is_err() {
                return;
            }
            let Ok(response) = client.stream_secrets(ReceiverStream::new(outbound)).await else {
                return;
            };
            let mut inbound = response.into_inner();
            while let Ok(Some(message)) = inbound.message().await {
                let _ = reports.send((index, message.version_info.clone(), Instant::now()));
                let ack = DiscoveryRequest {
                    version_info: message.version_info,
                    response_nonce: message.nonce,
                    ..first.clone()
                };
                if requests.send(ack).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(reports);

    let mut first_seen = 0;
    let mut total = 0usize;
    let mut versions: std::collections::HashMap<String, (usize, Instant, Instant)> =
        std::collections::HashMap::new();
    let mut first_done = None;
    let deadline = Instant::now() + Duration::from_secs(10 + 4 * args.rotations as u64);
    while let Ok(Some((_, version, at))) =
        tokio::time::timeout_at(deadline.into(), received.recv()).await
    {
        total += 1;
        let entry = versions.entry(version).or_insert((0, at, at));
        entry.0 += 1;
        entry.2 = at;
        if entry.0 == args.streams && first_done.is_none() {
            first_done = Some(at.duration_since(started));
            first_seen = total;
        }
        if versions
            .values()
            .filter(|(n, _, _)| *n == args.streams)
            .count()
            > args.rotations
        {
            break;
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{} SDS streams ({} responses in {:.2?}, {:.0} responses/s overall)",
        args.streams,
        total,
        elapsed,
        total as f64 / elapsed.as_secs_f64()
    );
    if let Some(first) = first_done {
        println!(
            "first secrets on all {} streams: {first:.2?} ({:.0} responses/s)",
            args.streams,
            first_seen as f64 / first.as_secs_f64()
        );
    }
    let mut rotations: Vec<_> = versions
        .values()
        .filter(|(n, _, _)| *n == args.streams)
        .collect();
    rotations.sort_by_key(|(_, first, _)| *first);
    for (count, first, last) in rotations.iter().skip(1) {
        println!(
            "rotation pushed to {count} streams: first {:.2?} after start, all within {:.2?} of the first",
            first.duration_since(started),
            last.duration_since(*first)
        );
    }
    Ok(())
}

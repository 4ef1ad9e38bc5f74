//! The SDS protocol as Envoy speaks it, against the real agent: versions, nonces, ACKs and NACKs,
//! a refused resource name failing only its own stream, and plain validation asked for through
//! node metadata. (Real Envoys are in `envoy_e2e.rs`; this drives the corner cases Envoy does not
//! produce on demand.)

use std::time::Duration;

use anyhow::{Context, ensure};
use envoy_types::pb::envoy::config::core::v3::Node as EnvoyNode;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use sigil_tests::Node;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const WAIT: Duration = Duration::from_secs(10);

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        ..DiscoveryRequest::default()
    }
}

/// The request that acknowledges `response` for `names`.
fn ack(names: &[&str], response: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: response.version_info.clone(),
        response_nonce: response.nonce.clone(),
        ..request(names)
    }
}

fn secrets(response: &DiscoveryResponse) -> anyhow::Result<Vec<Secret>> {
    response
        .resources
        .iter()
        .map(|any| Ok(Secret::decode(any.value.as_slice())?))
        .collect()
}

async fn next(stream: &mut Streaming<DiscoveryResponse>) -> anyhow::Result<DiscoveryResponse> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .context("no SDS response in time")??
        .context("the SDS stream ended")
}

/// Opens a stream on `client` and sends `first`; returns the sender for later requests.
async fn open(
    client: &mut SecretDiscoveryServiceClient<tonic::transport::Channel>,
    first: DiscoveryRequest,
) -> anyhow::Result<SdsStream> {
    let (requests, outbound) = mpsc::channel(8);
    requests.send(first).await?;
    let stream = client
        .stream_secrets(ReceiverStream::new(outbound))
        .await?
        .into_inner();
    Ok((requests, stream))
}

/// The SDS stream of one test: the sender of its requests and its responses.
type SdsStream = (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_versions_acks_nacks_and_refusals() -> anyhow::Result<()> {
    let selector = format!("unix:uid:{}", sigil_tests::current_uid()?);
    let node =
        Node::start(|server| Node::entry(server, "spiffe://example.org/envoy", &selector, &[]))?;
    let mut client = SecretDiscoveryServiceClient::new(node.agent.grpc_channel().await?);

    let both = ["default", "ROOTCA"];
    let mut stream = open(&mut client, request(&both)).await?;
    let first = expect_both_secrets(&mut stream).await?;
    let second = expect_the_ack_unanswered(&mut stream, &first).await?;
    expect_the_nack_logged(&stream, &first, &second, &node).await?;
    expect_a_refusal_on_its_own_stream(&mut client, &mut stream, &second).await?;
    expect_plain_validation_on_fetch(&mut client).await
}

/// The first response carries both secrets, a version and a nonce.
async fn expect_both_secrets(stream: &mut SdsStream) -> anyhow::Result<DiscoveryResponse> {
    let first = next(&mut stream.1).await?;
    ensure!(
        !first.version_info.is_empty() && !first.nonce.is_empty(),
        "{first:?}"
    );
    let received = secrets(&first)?;
    ensure!(received.len() == 2, "two secrets: {received:?}");
    ensure!(
        matches!(received[0].r#type, Some(secret::Type::TlsCertificate(_)))
            && received[0].name == "default",
        "default is the SVID"
    );
    ensure!(
        matches!(received[1].r#type, Some(secret::Type::ValidationContext(ref c)) if c.trusted_ca.is_some()),
        "ROOTCA is a trusted_ca validation context"
    );
    Ok(first)
}

/// An ACK of `first` is not answered. Then a change of names is: so the next response on the
/// stream is the answer to the change, not a repeat of the acknowledged secrets. Returns it.
async fn expect_the_ack_unanswered(
    (requests, stream): &mut SdsStream,
    first: &DiscoveryResponse,
) -> anyhow::Result<DiscoveryResponse> {
    requests.send(ack(&["default", "ROOTCA"], first)).await?;
    requests.send(ack(&["default"], first)).await?;
    let second = next(stream).await?;
    let received = secrets(&second)?;
    ensure!(
        received.len() == 1 && received[0].name == "default",
        "the ACK was answered with the same secrets again: {received:?}"
    );
    ensure!(
        second.version_info != first.version_info && second.nonce != first.nonce,
        "a new version and nonce"
    );
    Ok(second)
}

/// A NACK of `second` (keeping `first`'s version) is logged by the agent of `node`, and not
/// answered with the same secrets.
async fn expect_the_nack_logged(
    (requests, _): &SdsStream,
    first: &DiscoveryResponse,
    second: &DiscoveryResponse,
    node: &Node,
) -> anyhow::Result<()> {
    requests
        .send(DiscoveryRequest {
            version_info: first.version_info.clone(),
            response_nonce: second.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "test rejects this certificate".into(),
                details: Vec::new(),
            }),
            ..request(&["default"])
        })
        .await?;
    ensure!(
        node.agent
            .wait_for_log("test rejects this certificate", 1, WAIT),
        "the NACK was not logged:\n{}",
        node.agent.logs()
    );
    Ok(())
}

/// A name this caller may not have fails its own stream only: `stream` carries on after it,
/// answering a change of names after `second`.
async fn expect_a_refusal_on_its_own_stream(
    client: &mut SecretDiscoveryServiceClient<tonic::transport::Channel>,
    (requests, stream): &mut SdsStream,
    second: &DiscoveryResponse,
) -> anyhow::Result<()> {
    let (_other_requests, mut refused) =
        open(client, request(&["spiffe://example.org/someone-else"])).await?;
    let error = tokio::time::timeout(WAIT, refused.message())
        .await?
        .err()
        .context("a foreign SPIFFE ID was served")?;
    ensure!(
        error.code() == tonic::Code::PermissionDenied && error.message().contains("someone-else"),
        "{error:?}"
    );
    requests.send(ack(&["default", "ROOTCA"], second)).await?;
    let third = next(stream).await?;
    ensure!(
        secrets(&third)?.len() == 2,
        "the first stream carries on after another stream's refusal"
    );
    Ok(())
}

/// FetchSecrets answers once, with the node's request for plain validation honoured.
async fn expect_plain_validation_on_fetch(
    client: &mut SecretDiscoveryServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<()> {
    let metadata = Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        )]
        .into(),
    };
    let fetched = client
        .fetch_secrets(DiscoveryRequest {
            node: Some(EnvoyNode {
                id: "sds-e2e".into(),
                metadata: Some(metadata),
                ..EnvoyNode::default()
            }),
            ..request(&["ALL", "spiffe://example.org"])
        })
        .await?
        .into_inner();
    for secret in secrets(&fetched)? {
        ensure!(
            matches!(secret.r#type, Some(secret::Type::ValidationContext(ref c)) if c.trusted_ca.is_some() && c.custom_validator_config.is_none()),
            "{} is a plain trusted_ca context",
            secret.name
        );
    }
    Ok(())
}

//! Attacks on the agent's Workload API socket by a local process, against the real binaries: an
//! HPACK decompression bomb in raw HTTP/2 frames, and SDS requests that ask for one secret 100 000
//! times. Each test measures the agent's resident memory from `/proc/<pid>/status` before and
//! after, checks the refusal the attacker gets, and keeps a py-spiffe workload fetching its
//! identity while the attack runs and after it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use sigil_tests::steps::{ensure_count, json_stdout, refused};
use sigil_tests::{Node, python};
use sigil_workload_api::http2::{
    CONTINUATION, END_HEADERS, GOAWAY, HEADERS, MAX_FRAME, PREFACE, SETTINGS, frame, hpack_integer,
};
use tokio_stream::StreamExt;
use tonic::Streaming;
use tonic::transport::Channel;

const SPIFFE_ID: &str = "spiffe://example.org/attacked";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// How much the agent's resident memory may grow under an attack.
const GROWTH_LIMIT_KIB: u64 = 20 * 1024;
/// Attack rounds at least, and at most while py-spiffe has not finished.
const MIN_ROUNDS: usize = 5;
const MAX_ROUNDS: usize = 400;
/// How many copies of one name the SDS attack asks for.
const COPIES: usize = 100_000;

const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn node() -> anyhow::Result<Node> {
    Node::for_this_uid(&[(SPIFFE_ID, &[])])
}

/// VmRSS and VmHWM (the peak) of a process, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    peak: u64,
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

fn ensure_flat(before: Memory, after: Memory, attack: &str) -> anyhow::Result<()> {
    println!("{attack}: agent memory before {before:?}, after {after:?} (KiB)");
    ensure!(
        after.rss.saturating_sub(before.rss) < GROWTH_LIMIT_KIB
            && after.peak.saturating_sub(before.peak) < GROWTH_LIMIT_KIB,
        "{attack} grew the agent by more than 20 MiB: before {before:?}, after {after:?} (KiB)"
    );
    Ok(())
}

/// A py-spiffe workload (tests/python/workload.py) fetching its SVIDs, bundles and JWT-SVIDs.
fn py_spiffe(python: &Path, node: &Node) -> anyhow::Result<Child> {
    Ok(python::py_spiffe_workload(python, &node.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn py_spiffe_succeeded(child: Child, when: &str) -> anyhow::Result<()> {
    let result = json_stdout(
        child.wait_with_output()?,
        &format!("py-spiffe failed {when}"),
    )?;
    ensure!(
        result["x509_spiffe_id"] == SPIFFE_ID && result["validated_spiffe_id"] == SPIFFE_ID,
        "py-spiffe got the wrong identity {when}: {result}"
    );
    Ok(())
}

/// Runs `round` at least [`MIN_ROUNDS`] times and until py-spiffe (when there is Python) has
/// fetched everything, so the workload is served while the attack goes on; then py-spiffe once
/// more after it. What each round leaves open (its streams) is returned, for the caller to hold
/// until it has measured.
async fn attack_while_py_spiffe_runs<T, F, Fut>(
    python: Option<&PathBuf>,
    node: &Node,
    mut round: F,
) -> anyhow::Result<Vec<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut during = python.map(|p| py_spiffe(p, node)).transpose()?;
    let mut rounds = Vec::new();
    loop {
        rounds.push(round().await?);
        let finished = match during.as_mut() {
            Some(child) => child.try_wait()?.is_some(),
            None => true,
        };
        if rounds.len() >= MAX_ROUNDS || (rounds.len() >= MIN_ROUNDS && finished) {
            break;
        }
    }
    if let Some(child) = during {
        py_spiffe_succeeded(child, "during the attack")?;
    }
    if let Some(python) = python {
        py_spiffe_succeeded(py_spiffe(python, node)?, "after the attack")?;
    }
    Ok(rounds)
}

/// A header block split into one HEADERS frame and CONTINUATION frames.
fn header_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let count = block.len().div_ceil(MAX_FRAME);
    for (i, chunk) in block.chunks(MAX_FRAME).enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == count { END_HEADERS } else { 0 };
        out.extend(frame(kind, flags, stream, chunk));
    }
    out
}

/// A 64 KiB header block: `prefix`, a literal with incremental indexing of a `value_len`-byte
/// header (it enters the dynamic table as index 62), then one-byte references to it.
fn bomb_block(prefix: &[u8], value_len: usize) -> Vec<u8> {
    let mut block = prefix.to_vec();
    block.extend_from_slice(&[0x40, 0x04]);
    block.extend_from_slice(b"bomb");
    hpack_integer(&mut block, 0x00, 7, value_len);
    block.extend(std::iter::repeat_n(b'a', value_len));
    block.resize(4 * MAX_FRAME, 0x80 | 62);
    block
}

/// Sends `frames` after the preface and an empty SETTINGS frame, and reads until the agent's
/// GOAWAY (its error code and debug text) or the end of the connection (`None`).
fn send_and_await_goaway(socket: &Path, frames: &[u8]) -> anyhow::Result<Option<(u32, String)>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut input = PREFACE.to_vec();
    input.extend(frame(SETTINGS, 0, 0, &[]));
    input.extend_from_slice(frames);
    // The agent may close before reading everything: a failed write is part of the refusal.
    let _ = stream.write_all(&input);
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let mut rest = &received[..];
        while rest.len() >= 9 {
            let length =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if rest.len() < 9 + length {
                break;
            }
            if rest[3] == GOAWAY && length >= 8 {
                let code = u32::from_be_bytes([rest[13], rest[14], rest[15], rest[16]]);
                let debug = String::from_utf8_lossy(&rest[17..9 + length]).into_owned();
                return Ok(Some((code, debug)));
            }
            rest = &rest[9 + length..];
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e).context("reading the agent's answer to the bomb"),
        }
    }
}

/// One round of the HPACK attack: the bomb (a 4 KB table entry referenced from a 64 KiB block),
/// followed on the same connection by a table size update to 1 GiB and a second bomb with a
/// 12 KB entry; and on a second connection the size update alone.
fn hpack_round(socket: &Path) -> anyhow::Result<()> {
    let mut resize = Vec::new();
    hpack_integer(&mut resize, 0x20, 5, 1 << 30);
    let mut frames = header_frames(1, &bomb_block(&[], 4000));
    frames.extend(header_frames(3, &bomb_block(&resize, 12_000)));
    let answer = send_and_await_goaway(socket, &frames)?;
    let (code, debug) = answer.context("the bomb's connection was closed without a GOAWAY")?;
    ensure!(
        code == ENHANCE_YOUR_CALM && debug.contains("max_header_list_size"),
        "the bomb got GOAWAY code {code:#x}: {debug}"
    );
    let answer = send_and_await_goaway(socket, &header_frames(1, &bomb_block(&resize, 12_000)))?;
    let (code, debug) = answer.context("the resize's connection was closed without a GOAWAY")?;
    ensure!(
        code == COMPRESSION_ERROR && debug.contains("4096"),
        "a table size update to 1 GiB got GOAWAY code {code:#x}: {debug}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_is_refused_with_a_goaway_and_memory_stays_flat() -> anyhow::Result<()> {
    let python = python::py_spiffe_python("an_hpack_bomb_is_refused_with_a_goaway")?;
    let node = node()?;
    let pid = node.agent.pid().context("the agent is not running")?;
    if let Some(python) = &python {
        py_spiffe_succeeded(py_spiffe(python, &node)?, "before the attack")?;
    }
    let before = memory(pid)?;
    let socket = node.agent.socket.clone();
    let rounds = attack_while_py_spiffe_runs(python.as_ref(), &node, || {
        let socket = socket.clone();
        async move { tokio::task::spawn_blocking(move || hpack_round(&socket)).await? }
    })
    .await?;
    let after = memory(pid)?;
    let rounds = rounds.len();
    ensure_flat(before, after, &format!("{rounds} rounds of the HPACK bomb"))?;
    ensure!(
        node.agent
            .logs()
            .contains("refused a Workload API connection"),
        "the refusals were not logged:\n{}",
        node.agent.logs()
    );
    Ok(())
}

fn sds_request(names: Vec<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names: names,
        ..DiscoveryRequest::default()
    }
}

fn ensure_refused_naming_the_cap(status: &tonic::Status, call: &str) -> anyhow::Result<()> {
    ensure!(
        status.code() == tonic::Code::InvalidArgument
            && status.message().contains("at most 64")
            && status.message().contains("sds.max_resource_names"),
        "{call} with {COPIES} names was not refused with the cap: {status:?}"
    );
    Ok(())
}

/// A request stream that sends `request` and then stays open, as an attacker's would: the agent
/// must answer the request itself, not the end of the stream.
fn held_open<T>(request: T) -> impl tokio_stream::Stream<Item = T> {
    tokio_stream::iter([request]).chain(tokio_stream::pending())
}

/// The first answer on `stream` must be a refusal naming the cap (when it is not, the error
/// says what was `accepted`); returns it.
async fn refused_naming_the_cap<T>(
    stream: &mut Streaming<T>,
    call: &str,
    accepted: &str,
) -> anyhow::Result<tonic::Status> {
    let status = refused(stream.message().await, accepted)?;
    ensure_refused_naming_the_cap(&status, call)?;
    Ok(status)
}

/// The attacker's streams, kept open as an attacker would keep them: whatever the agent keeps per
/// stream stays until they close.
#[derive(Default)]
struct OpenStreams {
    sotw: Vec<Streaming<DiscoveryResponse>>,
    delta: Vec<Streaming<DeltaDiscoveryResponse>>,
}

/// One round of the SDS attack: FetchSecrets and StreamSecrets naming `default` 100 000 times,
/// and three delta streams each claiming to hold 100 000 resource versions.
async fn sds_round(
    mut client: SecretDiscoveryServiceClient<Channel>,
) -> anyhow::Result<OpenStreams> {
    let mut open = OpenStreams::default();
    let copies = vec!["default".to_string(); COPIES];
    let status = refused(
        client.fetch_secrets(sds_request(copies.clone())).await,
        "FetchSecrets answered 100 000 copies of the private key",
    )?;
    ensure_refused_naming_the_cap(&status, "FetchSecrets")?;

    let mut stream = client
        .stream_secrets(held_open(sds_request(copies)))
        .await?
        .into_inner();
    let accepted = "StreamSecrets answered 100 000 names";
    refused_naming_the_cap(&mut stream, "StreamSecrets", accepted).await?;
    open.sotw.push(stream);

    for streams in 0..3 {
        let delta = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: vec!["default".into()],
            initial_resource_versions: (0..COPIES)
                .map(|i| (format!("s{streams}-{i}"), "0".repeat(24)))
                .collect(),
            ..DeltaDiscoveryRequest::default()
        };
        let mut stream = client.delta_secrets(held_open(delta)).await?.into_inner();
        let accepted = "a delta stream took 100 000 initial resource versions";
        let status = refused_naming_the_cap(&mut stream, "DeltaSecrets", accepted).await?;
        ensure!(
            status.message().contains("initial_resource_versions"),
            "{status:?}"
        );
        open.delta.push(stream);
    }
    Ok(open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_requests_for_100000_copies_are_refused_and_memory_stays_flat() -> anyhow::Result<()> {
    let python = python::py_spiffe_python("sds_requests_for_100000_copies_are_refused")?;
    let node = node()?;
    let pid = node.agent.pid().context("the agent is not running")?;
    let mut client = SecretDiscoveryServiceClient::new(node.agent.grpc_channel().await?);
    let served = client
        .fetch_secrets(sds_request(vec!["default".into(), "default".into()]))
        .await?
        .into_inner();
    ensure_count(served.resources.len(), 1, "answers to a repeated name")?;
    if let Some(python) = &python {
        py_spiffe_succeeded(py_spiffe(python, &node)?, "before the attack")?;
    }
    let before = memory(pid)?;
    let open =
        attack_while_py_spiffe_runs(python.as_ref(), &node, || sds_round(client.clone())).await?;
    let after = memory(pid)?;
    let rounds = open.len();
    ensure_flat(
        before,
        after,
        &format!("{rounds} rounds of SDS amplification"),
    )?;
    drop(open);
    let served = client
        .fetch_secrets(sds_request(vec!["default".into()]))
        .await?
        .into_inner();
    ensure!(
        served.resources.len() == 1,
        "SDS still serves after the attack"
    );
    Ok(())
}

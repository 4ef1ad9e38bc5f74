//! End to end: attestation is bound to the process that connected, not to its pid.
//!
//! The attack: a process connects to the agent's socket, then `execve`s another program, which
//! keeps the pid and the start time and inherits the connection, and asks for an SVID on it. An
//! agent that reads `/proc/<pid>/exe` at call time attests the new program, so whatever connected
//! gets the identity registered for the program it executed (with a fork before the `execve`, the
//! attacker's own code makes the call). The agent must refuse, and still give the program its
//! identity when it connects itself.
//!
//! The peers are this test binary run again in a helper role (`SIGIL_TEST_PEER_ROLE`): a copy of
//! it at a path of its own is the registered program (`unix:path:<copy>`), and the original is the
//! process that connects and then executes the copy, handing it the connection as its stdin.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::StreamExt;
use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_tests::Node;

const ROLE: &str = "SIGIL_TEST_PEER_ROLE";
const SOCKET: &str = "SIGIL_TEST_PEER_SOCKET";
const EXEC: &str = "SIGIL_TEST_PEER_EXEC";
/// The test below, which runs the helper roles when `ROLE` is set.
const THIS_TEST: &str = "an_execve_after_connect_is_not_attested_as_the_new_program";
/// The line a helper prints its outcome on.
const OUTCOME: &str = "PEER-OUTCOME: ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execve_after_connect_is_not_attested_as_the_new_program() -> anyhow::Result<()> {
    if let Ok(role) = std::env::var(ROLE) {
        return peer(&role).await;
    }
    let dir = tempfile::tempdir()?;
    let program = dir.path().join("registered-program");
    std::fs::copy(std::env::current_exe()?, &program)?;
    let selector = format!("unix:path:{}", program.display());
    let node =
        Node::start(|server| Node::entry(server, "spiffe://example.org/program", &selector, &[]))?;
    let socket = node.agent.socket.clone();

    // The registered program connecting itself gets its identity.
    let direct = run_peer(&program, "connect-and-call", &socket, None).await?;
    ensure!(
        direct == "svid spiffe://example.org/program",
        "the registered program itself: {direct}"
    );

    // Another program connects, waits until the agent has accepted (the server's first HTTP/2
    // frame arrives), then executes the registered program, which calls on that connection.
    let after_exec = run_peer(
        &std::env::current_exe()?,
        "connect-then-exec",
        &socket,
        Some(&program),
    )
    .await?;
    ensure!(
        after_exec.starts_with("refused PermissionDenied")
            && after_exec.contains("the caller changed")
            && after_exec.contains("executed another program"),
        "a connection made before execve was attested as the new program: {after_exec}"
    );
    ensure!(
        // The agent may answer before its log line is flushed: wait for it.
        node.agent
            .wait_for_log("workload attestation failed", 1, Duration::from_secs(5)),
        "the refusal is logged"
    );

    // The agent goes on serving.
    let again = run_peer(&program, "connect-and-call", &socket, None).await?;
    ensure!(
        again == "svid spiffe://example.org/program",
        "after the attack: {again}"
    );
    Ok(())
}

/// Runs `binary` (this test binary or a copy) in a helper role; its outcome line.
async fn run_peer(
    binary: &Path,
    role: &str,
    socket: &Path,
    exec: Option<&Path>,
) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new(binary);
    command
        .args([THIS_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ROLE, role)
        .env(SOCKET, socket)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(exec) = exec {
        command.env(EXEC, exec);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("the helper did not finish within 60 s")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        // libtest's `test <name> ... ` precedes it on the same line.
        .find_map(|line| line.split_once(OUTCOME))
        .map(|(_, outcome)| outcome.to_string())
        .with_context(|| {
            format!(
                "the {role} helper printed no outcome ({}); stdout:\n{stdout}\nstderr:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// The helper roles.
async fn peer(role: &str) -> anyhow::Result<()> {
    match role {
        "connect-and-call" => {
            let socket = std::env::var(SOCKET).context("no socket")?;
            call(std::os::unix::net::UnixStream::connect(socket)?).await
        }
        "connect-then-exec" => {
            let socket = std::env::var(SOCKET).context("no socket")?;
            let program = std::env::var(EXEC).context("no program to execute")?;
            let stream = std::os::unix::net::UnixStream::connect(socket)?;
            // The agent sends its HTTP/2 SETTINGS once it has accepted the connection (and held
            // its process); peeking leaves the bytes for the program that continues it.
            let mut first = [0u8; 1];
            rustix::net::recv(&stream, &mut first, rustix::net::RecvFlags::PEEK)?;
            let error = std::process::Command::new(program)
                .args([THIS_TEST, "--exact", "--nocapture", "--test-threads", "1"])
                .env(ROLE, "call-on-stdin")
                .stdin(Stdio::from(OwnedFd::from(stream)))
                .exec();
            Err(error).context("executing the registered program")
        }
        "call-on-stdin" => {
            let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
            call(std::os::unix::net::UnixStream::from(fd)).await
        }
        other => anyhow::bail!("unknown helper role {other}"),
    }
}

/// Asks for an X509-SVID on `stream` and prints the outcome.
async fn call(stream: std::os::unix::net::UnixStream) -> anyhow::Result<()> {
    stream.set_nonblocking(true)?;
    let slot = Arc::new(Mutex::new(Some(tokio::net::UnixStream::from_std(stream)?)));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = slot.lock().ok().and_then(|mut slot| slot.take());
            async move {
                let stream =
                    stream.ok_or_else(|| std::io::Error::other("the one connection is used up"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse()?);
    let outcome = match SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
    {
        Ok(response) => match response.into_inner().next().await {
            Some(Ok(message)) => format!(
                "svid {}",
                message
                    .svids
                    .first()
                    .map(|svid| svid.spiffe_id.as_str())
                    .unwrap_or("<none>")
            ),
            Some(Err(status)) => format!("refused {:?} {}", status.code(), status.message()),
            None => "the stream ended at once".into(),
        },
        Err(status) => format!("refused {:?} {}", status.code(), status.message()),
    };
    println!("{OUTCOME}{outcome}");
    Ok(())
}

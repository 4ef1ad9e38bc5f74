//! Small steps the end-to-end scenarios share: a call that must be refused, a process that must
//! have succeeded, a plain HTTP GET on a health port, and [`ServerTrust`], how a client of the
//! agent API trusts a server. Each check fails with what the peer said, so a failing test reads as
//! the refusal or the output it got.

use std::process::Output;

use anyhow::{Context, ensure};

/// The status of a call that must fail; when it succeeded, the error says what was `accepted`.
pub fn refused<T>(
    result: Result<T, tonic::Status>,
    accepted: &str,
) -> anyhow::Result<tonic::Status> {
    result.err().with_context(|| accepted.to_string())
}

/// Like [`refused`], and the status must carry `code`.
pub fn refused_with<T>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    accepted: &str,
) -> anyhow::Result<tonic::Status> {
    let status = refused(result, accepted)?;
    ensure!(status.code() == code, "{status:?}");
    Ok(status)
}

/// The error of a step that must fail, which must name `reason`; when the step succeeded, the
/// error says what was `accepted`.
pub fn refused_because<T, E: std::fmt::Display>(
    result: Result<T, E>,
    reason: &str,
    accepted: &str,
) -> anyhow::Result<()> {
    let refusal = result
        .err()
        .with_context(|| accepted.to_string())?
        .to_string();
    ensure!(refusal.contains(reason), "{refusal}");
    Ok(())
}

/// What a finished process printed on stdout; unless it succeeded, an error `<what>: <stderr>`.
pub fn stdout_of(output: Output, what: &str) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The JSON a finished process printed on stdout, checked as [`stdout_of`] checks it.
pub fn json_stdout(output: Output, what: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&stdout_of(output, what)?)?)
}

/// Fails unless `found` things are `expected` ones, saying how many `what` there were.
pub fn ensure_count(found: usize, expected: usize, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(found == expected, "{found} {what}, expected {expected}");
    Ok(())
}

/// The status and body of `GET <path>` on `address` (a health port: `/metrics`, `/ready`), over
/// a plain connection the test writes itself so nothing between it and the process can hide an
/// answer; it gives up on a silent peer after 10 s.
pub fn http_response(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context;
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The body of `GET <path>` on `address`, whatever its status (see [`http_response`]).
pub fn http_get(address: &str, path: &str) -> anyhow::Result<String> {
    Ok(http_response(address, path)?.1)
}

/// The value of the first `/metrics` sample on `address` whose line starts with `name` (a metric
/// name, or a name with its labels).
pub fn metric(address: &str, name: &str) -> anyhow::Result<f64> {
    http_get(address, "/metrics")?
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .with_context(|| format!("no {name} in the metrics of {address}"))
}

/// What a client of the agent API trusts a server by: its trust domain and the X.509 roots of its
/// bundle, with the PEM text `bundle show` printed them as (what agents, openssl and the bundle
/// ConfigMaps read).
#[derive(Debug, Clone)]
pub struct ServerTrust {
    /// The server's trust domain.
    pub trust_domain: sigil_core::id::TrustDomain,
    /// The bundle as `bundle show` printed it.
    pub pem: String,
    /// The bundle's certificates, DER.
    pub roots: Vec<Vec<u8>>,
}

impl ServerTrust {
    /// A connection to `server`'s agent API that authenticates the server by these roots,
    /// presenting `identity` when given (anonymous otherwise, as before attestation).
    pub async fn connect(
        &self,
        server: &crate::ServerProcess,
        identity: Option<&sigil_agent::node::AgentIdentity>,
    ) -> anyhow::Result<sigil_agent::node::ServerConnection> {
        Ok(
            sigil_agent::node::connect(
                &server.agent_api,
                &self.trust_domain,
                &self.roots,
                identity,
            )
            .await?,
        )
    }
}

//! A real `sigil-agent forward` process for tests, and the SVID files a test's own clients use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::AgentProcess;
use crate::server::{Logs, spawn_until, terminate};

/// A running `sigil-agent forward`, a workload of `agent`.
#[derive(Debug)]
pub struct ForwarderProcess {
    child: Option<Child>,
    /// `127.0.0.1:<port>` of `/live`, `/ready`, `/metrics`.
    pub health: String,
    logs: Arc<Logs>,
}

impl ForwarderProcess {
    /// Starts `sigil-agent forward <args>` against `agent`'s socket, with a health address of its
    /// own, and waits until it says it is running (it holds its SVID and listens).
    pub fn start(agent: &AgentProcess, args: &[&str]) -> anyhow::Result<Self> {
        let health = format!("127.0.0.1:{}", crate::free_port()?);
        let logs = Arc::default();
        let child = spawn_until(
            Self::command(agent, &health, args)?,
            "sigil-agent forward is running",
            &logs,
        )?;
        Ok(ForwarderProcess {
            child: Some(child),
            health,
            logs,
        })
    }

    /// Starts the forwarder but waits only for its health endpoint, not for its SVID.
    pub fn start_unready(agent: &AgentProcess, args: &[&str]) -> anyhow::Result<Self> {
        let health = format!("127.0.0.1:{}", crate::free_port()?);
        let logs = Arc::default();
        let child = spawn_until(
            Self::command(agent, &health, args)?,
            "waiting for the first X509-SVID",
            &logs,
        )?;
        Ok(ForwarderProcess {
            child: Some(child),
            health,
            logs,
        })
    }

    fn command(agent: &AgentProcess, health: &str, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = Command::new(crate::binary("sigil-agent")?);
        command
            .arg("forward")
            .args(["--health-address", health, "--log-level", "info"])
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint());
        Ok(command)
    }

    /// Runs `sigil-agent forward <args>` expecting it to fail at once; returns its stderr.
    pub fn run_to_failure(args: &[&str]) -> anyhow::Result<String> {
        let output: Output = Command::new(crate::binary("sigil-agent")?)
            .arg("forward")
            .args(args)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()?;
        anyhow::ensure!(
            !output.status.success(),
            "sigil-agent forward {} should have failed",
            args.join(" ")
        );
        Ok(String::from_utf8(output.stderr)?)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the forwarder logged so far.
    pub fn logs(&self) -> String {
        self.logs.snapshot()
    }

    /// Waits until the forwarder has logged `needle` `count` times in all (at most `timeout`).
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        self.logs.wait_for(needle, count, timeout)
    }

    /// GETs `path` on the health address: (status code, body).
    pub fn health_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.health)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: forwarder\r\nConnection: close\r\n\r\n"
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

    /// The value of the Prometheus series whose line starts with `series` (name and labels).
    pub fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let (_, text) = self.health_get("/metrics")?;
        text.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no series `{series}` in:\n{text}"))
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("the forwarder is not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(())
    }

    /// Waits for the process to exit on its own; fails unless it exits successfully.
    pub fn wait_exit(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the forwarder is not running")?;
        let status = child.wait()?;
        anyhow::ensure!(
            status.success(),
            "the forwarder exited with {status}; log:\n{}",
            self.logs()
        );
        Ok(())
    }

    /// Stops the forwarder with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self.child.take() {
            Some(mut child) => terminate(&mut child, &self.logs),
            None => Ok(()),
        }
    }
}

impl Drop for ForwarderProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The certificate and key files of one SVID, as `sigil-agent api fetch x509 --write` wrote them.
#[derive(Debug, Clone)]
pub struct SvidFiles {
    /// The chain, PEM.
    pub cert: PathBuf,
    /// The PKCS#8 key, PEM.
    pub key: PathBuf,
    /// The trust bundle, PEM.
    pub bundle: PathBuf,
}

/// Writes every SVID of this process into `dir` with the real CLI, and returns the files of the
/// one for `spiffe_id` (found by reading each certificate's URI SAN).
pub fn fetch_svid(agent: &AgentProcess, dir: &Path, spiffe_id: &str) -> anyhow::Result<SvidFiles> {
    agent.cli(&[
        "api",
        "fetch",
        "x509",
        "--write",
        dir.to_str().context("utf-8 path")?,
    ])?;
    for index in 0.. {
        let cert = dir.join(format!("svid.{index}.pem"));
        let Ok(pem) = std::fs::read_to_string(&cert) else {
            break;
        };
        let der = crate::pem_certificates(&pem)?;
        let leaf = der.first().context("an empty chain")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)?;
        let uri = parsed
            .subject_alternative_name()?
            .into_iter()
            .flat_map(|san| san.value.general_names.iter())
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            });
        if uri.as_deref() == Some(spiffe_id) {
            return Ok(SvidFiles {
                cert,
                key: dir.join(format!("svid.{index}.key")),
                bundle: dir.join(format!("bundle.{index}.pem")),
            });
        }
    }
    anyhow::bail!("no SVID for {spiffe_id} in {}", dir.display())
}

/// True when every one of `tools` (e.g. `openssl`, `curl`) runs. On a developer machine without
/// one, prints a notice and answers false so `test` can skip; under `CI=true` that is an error.
pub fn peer_tools(test: &str, tools: &[&str]) -> anyhow::Result<bool> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        // Only whether it starts matters: `openssl --version` exits 1, but openssl is there.
        .filter(|tool| Command::new(tool).arg("--version").output().is_err())
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    crate::skip_unless_ci(
        test,
        &format!("{} cannot be started", missing.join(", ")),
        "install it (Debian: apt-get install openssl curl)",
    )?;
    Ok(false)
}

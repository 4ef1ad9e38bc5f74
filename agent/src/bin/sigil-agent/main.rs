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
use sigil_agent::config::{AgentConfig, AgentFlags};
use sigil_core::clock::SystemClock;
use tokio::signal::unix::{Signal, SignalKind, signal};
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
    #[command(flatten)]
    flags: AgentFlags,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Api(command) => api::run(command).await,
        Command::Forward(args) => forward::run(*args).await,
        // A one-shot command with nothing else to do, so the probe blocks.
        Command::Healthcheck { health_address } => {
            sigil_core::health::probe_ready(health_address, Duration::from_secs(5))
                .map(|body| println!("{body}"))
                .map_err(anyhow::Error::msg)
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (config, source) = AgentConfig::load(args.config.as_deref(), args.flags)?;
    init_logging("log_level", &config.log_level)?;
    let agent = sigil_agent::run::start(config, &source, Arc::new(SystemClock)).await?;
    stop_requested(&mut sigterm()?).await?;
    tracing::info!("stopping");
    agent.shutdown().await;
    Ok(())
}

/// Logs to stderr at `level` (a level or a tracing filter), which came from the setting `name`.
fn init_logging(name: &str, level: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level)
        .with_context(|| format!("{name} `{level}` is not a level or tracing filter"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// SIGTERM as a stream, installed before start-up so that one arriving meanwhile is not lost.
fn sigterm() -> anyhow::Result<Signal> {
    signal(SignalKind::terminate()).context("installing the SIGTERM handler")
}

/// Waits for SIGINT or SIGTERM.
async fn stop_requested(terminate: &mut Signal) -> anyhow::Result<()> {
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

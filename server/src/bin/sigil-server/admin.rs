//! The subcommands: `run` starts a server; the rest talk to a running one over its admin socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SystemClock;
use sigil_core::selector::Selector;
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{
    AgentId, CountAgentsRequest, CreateJoinTokenRequest, GetBundleRequest, ListAgentsRequest,
    ListBundlesRequest, ListSvidsRequest, SetBundleRequest, SvidSerial, TrustDomainName,
};
use sigil_proto::common;
use sigil_server::config::{LogFormat, ServerConfig, ServerFlags, parse_ttl};
use tonic::transport::Channel;
use tracing_subscriber::EnvFilter;

use crate::Command;
use crate::entries;
use crate::output::{self, Format, ListPrinter};

/// `sigil-server run`
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The TOML configuration file; flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ServerFlags,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (config, source) = ServerConfig::load(args.config.as_deref(), args.flags)?;
    let filter = EnvFilter::try_new(&config.log_level).with_context(|| {
        format!(
            "log_level `{}` is not a level or tracing filter",
            config.log_level
        )
    })?;
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().init(),
    }
    let server = sigil_server::server::start(config, &source, Arc::new(SystemClock)).await?;
    wait_for_signal().await?;
    tracing::info!("stopping");
    server.shutdown().await?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// `sigil-server healthcheck`
#[derive(Debug, Args)]
pub(crate) struct HealthcheckArgs {
    /// The server's health address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    health_address: SocketAddr,
    /// Print every component's state (`ca: ok`, `datastore: ok`), not only the verdict and the
    /// components that are degraded.
    #[arg(long)]
    verbose: bool,
}

/// A one-shot command with nothing else to do, so the probe blocks. Without `--verbose` it
/// prints the verdict and any component that is not ok, so a degraded datastore always shows.
pub(crate) fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<()> {
    let body = sigil_core::health::probe_ready(args.health_address, Duration::from_secs(5))
        .map_err(anyhow::Error::msg)?;
    for (index, line) in body.lines().enumerate() {
        if args.verbose || index == 0 || !line.ends_with(": ok") {
            println!("{line}");
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Generates a one-time join token.
    Generate {
        /// A node alias the agent attesting with this token also receives.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// How long the token stays usable (default: the server's join_token.default_ttl).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Lists attested agents (fetched and printed a page at a time).
    List,
    /// Counts attested agents.
    Count,
    /// Shows one agent.
    Show {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Deletes an agent: it must attest again.
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Bans an agent: it can neither call the server nor attest again until evicted.
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BundleCommand {
    /// Prints the trust domain's bundle (or a foreign one's).
    Show {
        /// pem (X.509 roots, for openssl and agents' bootstrap) or spiffe (the SPIFFE bundle JSON).
        #[arg(long, value_enum, default_value_t = output::BundleFormat::Pem)]
        format: output::BundleFormat,
        /// A foreign trust domain; default: the own one.
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Lists every stored bundle, own and foreign.
    List,
    /// Sets a foreign trust domain's bundle by hand from SPIFFE bundle JSON (the output of
    /// `sigil-server bundle show --format spiffe` on that domain's server).
    Set {
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
        /// The file holding the bundle (`-` reads standard input).
        #[arg(long)]
        path: PathBuf,
    },
    /// Deletes a foreign trust domain's bundle (refused while a relationship fetches it).
    Delete {
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SvidCommand {
    /// Lists issued SVIDs, newest first.
    List {
        /// Only SVIDs with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only SVIDs issued to this agent.
        #[arg(long)]
        agent_id: Option<String>,
        /// Only SVIDs not yet expired.
        #[arg(long)]
        valid: bool,
    },
    /// Shows one issued SVID.
    Show {
        /// Its hex serial (or a JWT's jti).
        #[arg(long)]
        serial: String,
    },
}

async fn connect(socket: &Path) -> anyhow::Result<AdminApiClient<Channel>> {
    Ok(sigil_server::api::admin::connect(socket).await?)
}

/// Awaits one admin call: its answer, or the server's message for a refusal without gRPC framing.
pub(crate) async fn answer<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match call.await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(anyhow::anyhow!("{}", status.message())),
    }
}

/// Runs one admin command against the server listening on `socket`.
pub(crate) async fn administer(
    socket: &Path,
    format: Format,
    command: Command,
) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    match command {
        Command::Token(command) => run_token(&mut client, format, command).await?,
        Command::Entry(command) => entries::run(&mut client, format, command).await?,
        Command::Agent(command) => run_agent(&mut client, format, command).await?,
        Command::Bundle(command) => run_bundle(&mut client, format, command).await?,
        Command::Ca(command) => {
            crate::ca::run(&mut client, format, command).await?;
        }
        Command::Federation(command) => {
            crate::federation::run(&mut client, format, command).await?;
        }
        Command::Svid(command) => run_svid(&mut client, format, command).await?,
        Command::Run(_) | Command::Healthcheck(_) => {
            bail!("`run` and `healthcheck` do not use the admin socket")
        }
    }
    Ok(())
}

/// `token ...`: join tokens.
async fn run_token(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: TokenCommand,
) -> anyhow::Result<()> {
    match command {
        TokenCommand::Generate { spiffe_id, ttl } => {
            let response = answer(client.create_join_token(CreateJoinTokenRequest {
                alias_spiffe_id: spiffe_id.unwrap_or_default(),
                ttl: ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            }))
            .await?;
            output::token(format, &response);
        }
    }
    Ok(())
}

/// `agent ...`: attested agents.
async fn run_agent(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: AgentCommand,
) -> anyhow::Result<()> {
    match command {
        AgentCommand::List => {
            let mut printer = ListPrinter::new(format, "agents", "No attested agents found");
            let mut page_token = String::new();
            loop {
                let page = answer(client.list_agents(ListAgentsRequest {
                    page_size: 0,
                    page_token,
                }))
                .await?;
                printer.agents(&page.agents);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            printer.finish();
        }
        AgentCommand::Count => {
            let count = answer(client.count_agents(CountAgentsRequest {})).await?;
            output::count(format, "agents", count.count);
        }
        AgentCommand::Show { spiffe_id } => {
            let agent = answer(client.get_agent(AgentId { spiffe_id })).await?;
            output::agents(format, &[agent]);
        }
        AgentCommand::Evict { spiffe_id } => {
            let agent = answer(client.evict_agent(AgentId { spiffe_id })).await?;
            output::agents(format, &[agent]);
        }
        AgentCommand::Ban { spiffe_id } => {
            let agent = answer(client.ban_agent(AgentId { spiffe_id })).await?;
            output::agents(format, &[agent]);
        }
    }
    Ok(())
}

/// `bundle ...`: the own and foreign trust bundles.
async fn run_bundle(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: BundleCommand,
) -> anyhow::Result<()> {
    match command {
        BundleCommand::Show {
            format: bundle_format,
            trust_domain,
        } => {
            let bundle = answer(client.get_bundle(GetBundleRequest {
                trust_domain: trust_domain.unwrap_or_default(),
            }))
            .await?;
            print!("{}", render_bundle(bundle, bundle_format)?);
        }
        BundleCommand::List => {
            let bundles = answer(client.list_bundles(ListBundlesRequest {}))
                .await?
                .bundles;
            output::bundles(format, &bundles);
        }
        BundleCommand::Set { trust_domain, path } => {
            let document = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
            };
            let bundle = answer(client.set_bundle(SetBundleRequest {
                trust_domain,
                spiffe_bundle_json: document,
            }))
            .await?;
            output::bundles(format, &[bundle]);
        }
        BundleCommand::Delete { trust_domain } => {
            let bundle = answer(client.delete_bundle(TrustDomainName { trust_domain })).await?;
            output::bundles(format, &[bundle]);
        }
    }
    Ok(())
}

/// `svid ...`: the issuance record.
async fn run_svid(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: SvidCommand,
) -> anyhow::Result<()> {
    match command {
        SvidCommand::List {
            spiffe_id,
            agent_id,
            valid,
        } => {
            let response = answer(client.list_svids(ListSvidsRequest {
                spiffe_id: spiffe_id.unwrap_or_default(),
                agent_id: agent_id.unwrap_or_default(),
                valid_only: valid,
            }))
            .await?;
            output::svids(format, &response.svids);
        }
        SvidCommand::Show { serial } => {
            let svid = answer(client.get_svid(SvidSerial { serial })).await?;
            output::svids(format, &[svid]);
        }
    }
    Ok(())
}

pub(crate) fn render_bundle(
    bundle: common::Bundle,
    format: output::BundleFormat,
) -> anyhow::Result<String> {
    let bundle = TrustBundle::try_from(&bundle)?;
    Ok(match format {
        output::BundleFormat::Pem => bundle.to_pem(),
        output::BundleFormat::Spiffe => format!("{}\n", bundle.to_spiffe_json()?),
    })
}

/// `--selector` flags as selectors, refusing a malformed one before anything is sent.
pub(crate) fn selector_flags(flags: &[String]) -> anyhow::Result<Vec<common::Selector>> {
    flags
        .iter()
        .map(|text| {
            Ok(common::Selector::from(
                &Selector::parse(text).map_err(|e| anyhow::anyhow!("--selector: {e}"))?,
            ))
        })
        .collect()
}

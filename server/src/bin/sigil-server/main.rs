//! `sigil-server`: runs the Sigil server, and administers a running one over its admin socket.
//!
//! The binary only parses flags and prints; everything it does is in the `sigil_server` library.

mod admin;
mod ca;
mod entries;
mod federation;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The Sigil server: the SPIFFE certificate authority of one trust domain.
#[derive(Debug, Parser)]
#[command(name = "sigil-server", version, about)]
struct Cli {
    /// The admin socket of the running server (for every command but `run`).
    #[arg(
        long,
        global = true,
        env = "SIGIL_ADMIN_SOCKET",
        default_value = ".sigil/server/admin.sock"
    )]
    socket: PathBuf,

    /// Output format of listing commands.
    #[arg(long, global = true, value_enum, default_value_t = output::Format::Text)]
    output: output::Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the server until SIGINT or SIGTERM.
    Run(admin::RunArgs),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(entries::EntryCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(admin::AgentCommand),
    /// Trust bundles: the own one, and foreign ones (federation).
    #[command(subcommand)]
    Bundle(admin::BundleCommand),
    /// The CA journal: prepare, activate, taint and revoke authorities.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Federation relationships with other trust domains.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// The record of issued SVIDs.
    #[command(subcommand)]
    Svid(admin::SvidCommand),
    /// Exits 0 when the server's `/ready` answers 200.
    Healthcheck(admin::HealthcheckArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => admin::run(args).await,
        Command::Healthcheck(args) => admin::healthcheck(args),
        command => admin::administer(&cli.socket, cli.output, command).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

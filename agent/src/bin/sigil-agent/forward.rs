//! `sigil-agent forward`: the mTLS forwarder, a workload of its own. The flags are
//! `sigil_forwarder::config::Flags`; everything else is in the `sigil_forwarder` library.

use std::path::PathBuf;

use clap::Args;
use sigil_forwarder::Forwarder;
use sigil_forwarder::config::{Flags, ForwarderConfig};

/// `sigil-agent forward`
#[derive(Debug, Args)]
pub(crate) struct ForwardArgs {
    /// A TOML file with several listeners ([[inbound]], [[outbound]]); the listener flags below
    /// describe one listener instead.
    #[arg(long, short, conflicts_with_all = [
        "inbound", "target", "mode", "allow", "deny", "http", "http_allow", "http_deny",
        "escaped_slashes",
        "outbound", "upstream", "expect_id", "expect_trust_domain", "expect_pattern",
    ])]
    config: Option<PathBuf>,
    /// The socket, SVID, health address, limits, and one listener.
    #[command(flatten)]
    flags: Flags,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long, default_value = "info")]
    log_level: String,
}

pub(crate) async fn run(args: ForwardArgs) -> anyhow::Result<()> {
    crate::init_logging("--log-level", &args.log_level)?;
    let config = ForwarderConfig::load(args.config.as_deref(), &args.flags)?;
    let mut terminate = crate::sigterm()?;
    let forwarder = tokio::select! {
        started = Forwarder::start(config) => started?,
        _ = crate::stop_requested(&mut terminate) => return Ok(()),
    };
    crate::stop_requested(&mut terminate).await?;
    tracing::info!("stopping: draining connections");
    forwarder.drain().await;
    Ok(())
}

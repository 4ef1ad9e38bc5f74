//! `sigil-agent forward`: the mTLS forwarder, a workload of its own. The flags map onto
//! `sigil_forwarder::config::Flags`; everything else is in the `sigil_forwarder` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use sigil_forwarder::Forwarder;
use sigil_forwarder::config::{Flags, ForwarderConfig};
use sigil_workload_api::ENDPOINT_ENV;
use tracing_subscriber::EnvFilter;

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
    /// The Workload API socket, unix:///path.
    #[arg(long, env = ENDPOINT_ENV)]
    socket: Option<String>,
    /// Which of this workload's SVIDs to use (default: the first one received, kept while held).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Serve /live, /ready and /metrics here.
    #[arg(long)]
    health_address: Option<String>,
    /// Inbound: listen here for mTLS callers, e.g. 0.0.0.0:15443.
    #[arg(long)]
    inbound: Option<String>,
    /// Inbound: the local application, e.g. 127.0.0.1:8080.
    #[arg(long)]
    target: Option<String>,
    /// Inbound: strict (mTLS only), permissive (mTLS or plaintext), or disable (plain TCP).
    #[arg(long)]
    mode: Option<String>,
    /// Inbound: allow peers matching this SPIFFE ID, trust domain (spiffe://td) or pattern
    /// (spiffe://td/ns/prod/*, /**); repeatable. Default: the own trust domain.
    #[arg(long)]
    allow: Vec<String>,
    /// Inbound: refuse peers matching this (wins over --allow); repeatable.
    #[arg(long)]
    deny: Vec<String>,
    /// Inbound: speak HTTP (HTTP/1.1 and HTTP/2), set x-forwarded-client-cert, apply HTTP rules.
    #[arg(long)]
    http: bool,
    /// Inbound HTTP: allow `PRINCIPAL METHODS PATH-PREFIX` (`*` for any); repeatable.
    #[arg(long)]
    http_allow: Vec<String>,
    /// Inbound HTTP: deny `PRINCIPAL METHODS PATH-PREFIX` (checked first); repeatable.
    #[arg(long)]
    http_deny: Vec<String>,
    /// Inbound HTTP: `%2F`, `%5C` and `\` in a request path: reject (400, the default) or keep.
    #[arg(long)]
    escaped_slashes: Option<String>,
    /// Outbound: listen here (loopback) for plaintext, e.g. 127.0.0.1:9000.
    #[arg(long)]
    outbound: Option<String>,
    /// Outbound: the mTLS upstream, host:port.
    #[arg(long)]
    upstream: Option<String>,
    /// Outbound: the upstream must present this SPIFFE ID; repeatable.
    #[arg(long)]
    expect_id: Vec<String>,
    /// Outbound: the upstream may present any ID of this trust domain; repeatable.
    #[arg(long)]
    expect_trust_domain: Vec<String>,
    /// Outbound: the upstream's ID must match this pattern; repeatable.
    #[arg(long)]
    expect_pattern: Vec<String>,
    /// Timeout for connecting to a target or upstream, e.g. 5s.
    #[arg(long)]
    connect_timeout: Option<String>,
    /// Timeout from accept to a finished TLS handshake, e.g. 10s.
    #[arg(long)]
    handshake_timeout: Option<String>,
    /// Close connections idle this long, e.g. 1h.
    #[arg(long)]
    idle_timeout: Option<String>,
    /// On SIGTERM, wait this long for open connections, e.g. 30s.
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Connections open at once, over all listeners.
    #[arg(long)]
    max_connections: Option<usize>,
    /// HTTP mode: bytes of a request's path and query; longer ones get 414 (default 8192).
    #[arg(long)]
    max_path_length: Option<usize>,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long, default_value = "info")]
    log_level: String,
}

pub(crate) async fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_level).with_context(|| {
        format!(
            "--log-level `{}` is not a level or tracing filter",
            args.log_level
        )
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags {
        socket: args.socket,
        spiffe_id: args.spiffe_id,
        health_address: args.health_address,
        connect_timeout: args.connect_timeout,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        drain_timeout: args.drain_timeout,
        max_connections: args.max_connections,
        max_path_length: args.max_path_length,
        inbound: args.inbound,
        target: args.target,
        mode: args.mode,
        allow: args.allow,
        deny: args.deny,
        http: args.http,
        http_allow: args.http_allow,
        http_deny: args.http_deny,
        escaped_slashes: args.escaped_slashes,
        outbound: args.outbound,
        upstream: args.upstream,
        expect_id: args.expect_id,
        expect_trust_domain: args.expect_trust_domain,
        expect_pattern: args.expect_pattern,
    };
    let config = match &args.config {
        Some(path) => {
            let mut config = ForwarderConfig::from_file(path)?;
            config.apply_overrides(&flags)?;
            config
        }
        None => ForwarderConfig::from_flags(&flags)?,
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let forwarder = tokio::select! {
        started = Forwarder::start(config) => started?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping: draining connections");
    forwarder.drain().await;
    Ok(())
}

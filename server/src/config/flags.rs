//! The flags of `sigil-server run` and `--ttl`-style values: what the command line sets on top of
//! the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sigil_core::config::HumanDuration;

use super::ServerConfig;

/// Parses a positive duration flag such as `--ttl 30s`, `10m`, `24h`, `7d` (or `1h30m`).
pub fn parse_ttl(text: &str) -> std::result::Result<Duration, String> {
    let duration = text.parse::<HumanDuration>()?.0;
    if duration.is_zero() {
        return Err(format!("`{text}` is zero; a lifetime must be positive"));
    }
    Ok(duration)
}

/// The flags of `sigil-server run` that override the file's settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerFlags {
    /// The trust domain this server is the CA of, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Where the SQLite database, keys and admin socket live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The agent API address (mTLS).
    #[arg(long)]
    pub bind_address: Option<SocketAddr>,
    /// The /live, /ready and /metrics address.
    #[arg(long)]
    pub health_address: Option<SocketAddr>,
    /// The admin socket path (default `<data-dir>/admin.sock`).
    #[arg(long, help = "The admin socket path (default <data-dir>/admin.sock)")]
    pub admin_socket: Option<PathBuf>,
    /// `sqlite://<path>` or `postgres://user@host/db` (also from `SIGIL_DATASTORE_URL`).
    #[arg(
        long,
        env = "SIGIL_DATASTORE_URL",
        help = "sqlite://<path> or postgres://user@host/db (also from SIGIL_DATASTORE_URL, e.g. a Secret)"
    )]
    pub datastore_url: Option<String>,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long)]
    pub log_level: Option<String>,
}

impl ServerFlags {
    /// Sets every setting a flag was given for.
    pub(super) fn merge_into(self, config: &mut ServerConfig) {
        config.trust_domain = self.trust_domain.or(config.trust_domain.take());
        config.admin_socket = self.admin_socket.or(config.admin_socket.take());
        config.datastore.url = self.datastore_url.or(config.datastore.url.take());
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        config.bind_address = self.bind_address.unwrap_or(config.bind_address);
        config.health_address = self.health_address.unwrap_or(config.health_address);
        if let Some(log_level) = self.log_level {
            config.log_level = log_level;
        }
    }
}

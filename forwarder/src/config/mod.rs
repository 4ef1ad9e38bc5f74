//! The forwarder's configuration: one listener from flags, or several from a TOML file.
//!
//! ```toml
//! socket = "unix:///run/sigil/api.sock"   # default: $SPIFFE_ENDPOINT_SOCKET
//! spiffe_id = "spiffe://example.org/web"  # which of this workload's SVIDs to use (default: the first)
//! health_address = "127.0.0.1:15021"
//! mode = "strict"                         # default of every [[inbound]]; each may override it
//!
//! [limits]
//! connect_timeout = "5s"
//! handshake_timeout = "10s"
//! idle_timeout = "1h"
//! drain_timeout = "30s"
//! max_connections = 10000
//! max_path_length = 8192          # bytes of a request's path and query (HTTP mode); 414 over it
//!
//! [[inbound]]
//! name = "web"
//! listen = "0.0.0.0:15443"
//! target = "127.0.0.1:8080"
//! mode = "permissive"             # strict | permissive | disable; overrides the default
//! allow = ["spiffe://example.org/ns/prod/*"]
//! deny = ["spiffe://example.org/ns/prod/legacy"]
//! http = true
//! escaped_slashes = "reject"      # %2F, %5C, `\` in a path: reject (400, default) | keep
//! [[inbound.http_rules]]
//! action = "deny"
//! methods = ["DELETE"]
//! paths = ["/admin"]              # /admin and below, on the normalised path; `/admin*`: raw prefix
//!
//! [[outbound]]
//! name = "db"
//! listen = "127.0.0.1:9000"
//! upstream = "db.internal:5432"
//! expect = ["spiffe://example.org/db"]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sigil_core::config::{ConfigError, FLAGS_SOURCE};
use sigil_core::id::SpiffeId;

mod convert;
mod spec;

pub use spec::{Flags, ForwarderSpec, HttpRuleSpec, InboundSpec, LimitsSpec, OutboundSpec};

use crate::path::EscapedSlashes;
use crate::policy::{HttpRule, IdPattern, PeerPolicy};
use crate::{Error, Result};

/// How an inbound listener treats its callers (Istio's PeerAuthentication modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Mutual TLS only: anything else is refused.
    Strict,
    /// Mutual TLS when the caller starts with a TLS ClientHello, plaintext otherwise (marked as
    /// unauthenticated).
    Permissive,
    /// Plain TCP (or HTTP) forwarding, no TLS.
    Disable,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "strict" => Ok(Mode::Strict),
            "permissive" => Ok(Mode::Permissive),
            "disable" => Ok(Mode::Disable),
            other => Err(format!(
                "`{other}` is not a mode; use strict, permissive or disable"
            )),
        }
    }
}

/// An inbound listener: terminates mTLS and forwards to a local target.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The name in logs and metrics.
    pub name: String,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to forward (`host:port`).
    pub target: String,
    /// STRICT, PERMISSIVE or DISABLE.
    pub mode: Mode,
    /// Which authenticated peers are accepted.
    pub policy: PeerPolicy,
    /// Speak HTTP to the target (HTTP/1.1 and HTTP/2 to callers), with XFCC and HTTP rules.
    pub http: bool,
    /// HTTP rules (HTTP mode only).
    pub http_rules: Vec<HttpRule>,
    /// What HTTP mode does with `%2F`, `%5C` and `\` in a request path.
    pub escaped_slashes: EscapedSlashes,
}

impl Inbound {
    /// Why the listener's rules do not hold for every caller, if they do not: in permissive mode
    /// plaintext callers skip the peer policy and match no principal of an HTTP rule. Logged as a
    /// warning at start.
    pub fn permissive_bypass(&self) -> Option<String> {
        let peer_rules = !(self.policy.allow.is_empty() && self.policy.deny.is_empty());
        if self.mode != Mode::Permissive || (!peer_rules && self.http_rules.is_empty()) {
            return None;
        }
        Some(format!(
            "listener `{}` is permissive: plaintext callers skip its allow/deny peer policy and match no principal in its HTTP rules (a deny rule naming principals never stops them); use mode strict once every caller speaks mTLS",
            self.name
        ))
    }
}

/// An outbound listener: plaintext on loopback, mTLS to an upstream whose ID is checked.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The name in logs and metrics.
    pub name: String,
    /// Where to listen (loopback).
    pub listen: SocketAddr,
    /// The upstream `host:port`.
    pub upstream: String,
    /// The identities the upstream may present; at least one.
    pub expect: Vec<IdPattern>,
}

/// Timeouts and limits shared by every listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connecting to a target or upstream.
    pub connect_timeout: Duration,
    /// From accept to a finished TLS handshake (a slowloris is dropped after this).
    pub handshake_timeout: Duration,
    /// A connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// How long SIGTERM waits for open connections before exiting.
    pub drain_timeout: Duration,
    /// Connections open at once, over all listeners; more are closed at accept.
    pub max_connections: usize,
    /// Bytes of an HTTP request's path and query; a longer one is answered with 414.
    pub max_path_length: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_path_length: 8192,
        }
    }
}

/// Everything the forwarder needs to start.
#[derive(Debug, Clone, Default)]
pub struct ForwarderConfig {
    /// The Workload API socket path.
    pub socket: PathBuf,
    /// Which SVID to use when the workload has several (default: the first one received, kept
    /// as long as the workload has it).
    pub spiffe_id: Option<SpiffeId>,
    /// Where `/live`, `/ready` and `/metrics` are served, if anywhere.
    pub health_address: Option<SocketAddr>,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Inbound listeners.
    pub inbound: Vec<Inbound>,
    /// Outbound listeners.
    pub outbound: Vec<Outbound>,
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::Read { path, source } => Error::ReadConfig { path, source },
            other => Error::ParseConfig {
                path: other.path().to_path_buf(),
                reason: other.reason(),
            },
        }
    }
}

/// Where a value came from, to name it in an error as the user wrote it: the flag
/// (`--connect-timeout`) or the file and the dotted key (`limits.connect_timeout`).
#[derive(Debug, Clone, Copy)]
enum Origin<'a> {
    /// Flags: a value is named by its flag.
    Flags,
    /// A file: a value is named by its key under `table` (`inbound[0]`; empty at the top level).
    File {
        /// The file, as errors show it.
        name: &'a str,
        /// The table the values are in.
        table: &'a str,
    },
}

impl<'a> Origin<'a> {
    /// The same origin, for the values of `table` in a file.
    fn table(self, table: &'a str) -> Origin<'a> {
        match self {
            Origin::Flags => Origin::Flags,
            Origin::File { name, .. } => Origin::File { name, table },
        }
    }

    /// The key of `field` in a file, or `flag`.
    fn named(self, field: &str, flag: &str) -> String {
        match self {
            Origin::Flags => flag.to_string(),
            Origin::File { table: "", .. } => field.to_string(),
            Origin::File { table, .. } => format!("{table}.{field}"),
        }
    }

    /// The key of `field` in a file, or its flag: `--` and the field with dashes.
    fn key(self, field: &str) -> String {
        self.named(field, &format!("--{}", field.replace('_', "-")))
    }

    /// An [`Error::Config`] about `key`.
    fn error(self, key: String, reason: impl std::fmt::Display) -> Error {
        let source = match self {
            Origin::Flags => FLAGS_SOURCE,
            Origin::File { name, .. } => name,
        };
        Error::config(source, key, reason)
    }

    /// The patterns of a list: keyed `field[i]` in a file, `flag` for flags (each a repeat).
    fn patterns(self, field: &str, flag: &str, texts: &[String]) -> Result<Vec<IdPattern>> {
        let list = self.named(field, flag);
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let key = match self {
                    Origin::Flags => list.clone(),
                    Origin::File { .. } => format!("{list}[{i}]"),
                };
                IdPattern::parse(&key, text).map_err(|e| self.error(key.clone(), e))
            })
            .collect()
    }

    /// An `IP:port` to listen on or serve at.
    fn socket_addr(self, key: String, text: &str) -> Result<SocketAddr> {
        text.parse().map_err(|_| {
            self.error(
                key,
                format!(
                    "`{text}` is not an IP address and port, e.g. 0.0.0.0:15443 or 127.0.0.1:9000"
                ),
            )
        })
    }

    /// The address of a listener: `listen` in a file, `flag` (`--inbound`, `--outbound`).
    fn listen_addr(self, flag: &str, text: &Option<String>) -> Result<SocketAddr> {
        let key = self.named("listen", flag);
        match text {
            Some(text) => self.socket_addr(key, text),
            None => Err(self.error(key, "a listener needs an address to listen on, IP:port")),
        }
    }

    /// A `host:port` to connect to.
    fn host_port(self, key: String, text: &str) -> Result<()> {
        let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
        });
        if valid {
            Ok(())
        } else {
            Err(self.error(
                key,
                format!("`{text}` is not HOST:PORT, e.g. 127.0.0.1:8080 or db.internal:5432"),
            ))
        }
    }
}

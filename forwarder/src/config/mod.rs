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
use sigil_core::id::SpiffeId;

mod file;
mod flags;

pub use flags::Flags;

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
#[derive(Debug, Clone)]
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

/// The source name in errors about flags.
const FLAGS: &str = "<flags>";

#[allow(clippy::too_many_arguments)]
fn inbound(
    source: &str,
    key: &str,
    name: Option<String>,
    listen: SocketAddr,
    target: &str,
    mode: Mode,
    allow: Vec<IdPattern>,
    deny: Vec<IdPattern>,
    http: bool,
    http_rules: Vec<HttpRule>,
    escaped_slashes: Option<EscapedSlashes>,
) -> Result<Inbound> {
    let target_key = if source == FLAGS {
        "--target".to_string()
    } else {
        format!("{key}.target")
    };
    host_port(source, &target_key, target)?;
    if !http_rules.is_empty() && !http {
        return Err(Error::config(
            source,
            if source == FLAGS {
                "--http-allow".to_string()
            } else {
                format!("{key}.http_rules")
            },
            "HTTP rules need HTTP mode (--http, or `http = true`)",
        ));
    }
    if escaped_slashes.is_some() && !http {
        return Err(Error::config(
            source,
            if source == FLAGS {
                "--escaped-slashes".to_string()
            } else {
                format!("{key}.escaped_slashes")
            },
            "escaped_slashes applies to request paths, so it needs HTTP mode (--http, or `http = true`)",
        ));
    }
    if mode == Mode::Disable && !(allow.is_empty() && deny.is_empty()) {
        return Err(Error::config(
            source,
            if source == FLAGS {
                "--allow".to_string()
            } else {
                format!("{key}.allow")
            },
            "allow and deny rules check mTLS peers, and mode `disable` has none; use strict or permissive, or drop the rules",
        ));
    }
    Ok(Inbound {
        name: name.unwrap_or_else(|| format!("inbound-{}", listen.port())),
        listen,
        target: target.to_string(),
        mode,
        policy: PeerPolicy { allow, deny },
        http,
        http_rules,
        escaped_slashes: escaped_slashes.unwrap_or_default(),
    })
}

fn outbound(
    source: &str,
    key: &str,
    name: Option<String>,
    listen: SocketAddr,
    upstream: &str,
    expect: Vec<IdPattern>,
) -> Result<Outbound> {
    let (listen_key, upstream_key, expect_key) = if source == FLAGS {
        (
            "--outbound".to_string(),
            "--upstream".to_string(),
            "--expect-id".to_string(),
        )
    } else {
        (
            format!("{key}.listen"),
            format!("{key}.upstream"),
            format!("{key}.expect"),
        )
    };
    if !listen.ip().is_loopback() {
        return Err(Error::config(
            source,
            listen_key,
            format!(
                "{listen} is not a loopback address; an outbound listener takes plaintext and must listen on 127.0.0.1 or ::1"
            ),
        ));
    }
    host_port(source, &upstream_key, upstream)?;
    if expect.is_empty() {
        return Err(Error::config(
            source,
            expect_key,
            "an outbound listener must say which identity the upstream presents: --expect-id, --expect-trust-domain or --expect-pattern (`expect = [...]` in a file)",
        ));
    }
    Ok(Outbound {
        name: name.unwrap_or_else(|| format!("outbound-{}", listen.port())),
        listen,
        upstream: upstream.to_string(),
        expect,
    })
}

fn patterns(source: &str, key: &str, texts: &[String]) -> Result<Vec<IdPattern>> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let key = if source == FLAGS {
                key.to_string()
            } else {
                format!("{key}[{i}]")
            };
            IdPattern::parse(&key, text).map_err(|e| Error::config(source, key.clone(), e))
        })
        .collect()
}

fn socket_addr(source: &str, key: &str, text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        Error::config(
            source,
            key,
            format!("`{text}` is not an IP address and port, e.g. 0.0.0.0:15443 or 127.0.0.1:9000"),
        )
    })
}

fn host_port(source: &str, key: &str, text: &str) -> Result<()> {
    let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
    });
    if valid {
        Ok(())
    } else {
        Err(Error::config(
            source,
            key,
            format!("`{text}` is not HOST:PORT, e.g. 127.0.0.1:8080 or db.internal:5432"),
        ))
    }
}

fn duration(source: &str, key: &str, text: &str) -> Result<Duration> {
    let value = humantime::parse_duration(text).map_err(|e| {
        Error::config(
            source,
            key,
            format!("`{text}` is not a duration ({e}); write e.g. 500ms, 10s or 1h"),
        )
    })?;
    if value.is_zero() {
        return Err(Error::config(
            source,
            key,
            "a timeout of zero would refuse everything; give a positive duration",
        ));
    }
    Ok(value)
}

fn max_connections(source: &str, key: &str, value: usize) -> Result<usize> {
    // The semaphore behind the limit holds at most u32::MAX >> 3 permits per acquire.
    if value == 0 || value > 1_000_000 {
        return Err(Error::config(
            source,
            key,
            format!("{value} is out of range; give between 1 and 1000000"),
        ));
    }
    Ok(value)
}

/// The most `max_path_length` may be: the http crate refuses longer request targets anyway.
const MAX_PATH_LENGTH: usize = 65_534;

fn max_path_length(source: &str, key: &str, value: usize) -> Result<usize> {
    if value == 0 || value > MAX_PATH_LENGTH {
        return Err(Error::config(
            source,
            key,
            format!("{value} is out of range; give between 1 and {MAX_PATH_LENGTH} bytes"),
        ));
    }
    Ok(value)
}

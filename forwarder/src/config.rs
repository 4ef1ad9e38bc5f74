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
//!
//! [[inbound]]
//! name = "web"
//! listen = "0.0.0.0:15443"
//! target = "127.0.0.1:8080"
//! mode = "permissive"             # strict | permissive | disable; overrides the default
//! allow = ["spiffe://example.org/ns/prod/*"]
//! deny = ["spiffe://example.org/ns/prod/legacy"]
//! http = true
//! [[inbound.http_rules]]
//! action = "deny"
//! methods = ["DELETE"]
//!
//! [[outbound]]
//! name = "db"
//! listen = "127.0.0.1:9000"
//! upstream = "db.internal:5432"
//! expect = ["spiffe://example.org/db"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_core::id::{SpiffeId, parse_spiffe_id};

use crate::policy::{Action, HttpRule, IdPattern, PeerPolicy};
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(30),
            max_connections: 10_000,
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

/// Settings that flags give (or override), as the user wrote them. Strings are checked by
/// [`ForwarderConfig::from_flags`] and [`ForwarderConfig::apply_overrides`], so every error names
/// its flag.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--socket` (or `$SPIFFE_ENDPOINT_SOCKET`).
    pub socket: Option<String>,
    /// `--spiffe-id`.
    pub spiffe_id: Option<String>,
    /// `--health-address`.
    pub health_address: Option<String>,
    /// `--connect-timeout`.
    pub connect_timeout: Option<String>,
    /// `--handshake-timeout`.
    pub handshake_timeout: Option<String>,
    /// `--idle-timeout`.
    pub idle_timeout: Option<String>,
    /// `--drain-timeout`.
    pub drain_timeout: Option<String>,
    /// `--max-connections`.
    pub max_connections: Option<usize>,
    /// `--inbound`.
    pub inbound: Option<String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--mode`.
    pub mode: Option<String>,
    /// `--allow`.
    pub allow: Vec<String>,
    /// `--deny`.
    pub deny: Vec<String>,
    /// `--http`.
    pub http: bool,
    /// `--http-allow`.
    pub http_allow: Vec<String>,
    /// `--http-deny`.
    pub http_deny: Vec<String>,
    /// `--outbound`.
    pub outbound: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--expect-id`.
    pub expect_id: Vec<String>,
    /// `--expect-trust-domain`.
    pub expect_trust_domain: Vec<String>,
    /// `--expect-pattern`.
    pub expect_pattern: Vec<String>,
}

const FLAGS: &str = "<flags>";

impl ForwarderConfig {
    /// One listener (inbound or outbound) from flags.
    pub fn from_flags(flags: &Flags) -> Result<Self> {
        let mut config = ForwarderConfig {
            socket: PathBuf::new(),
            spiffe_id: None,
            health_address: None,
            limits: Limits::default(),
            inbound: Vec::new(),
            outbound: Vec::new(),
        };
        let any_inbound = flags.target.is_some()
            || flags.mode.is_some()
            || !flags.allow.is_empty()
            || !flags.deny.is_empty()
            || flags.http
            || !flags.http_allow.is_empty()
            || !flags.http_deny.is_empty();
        let any_outbound = flags.upstream.is_some()
            || !flags.expect_id.is_empty()
            || !flags.expect_trust_domain.is_empty()
            || !flags.expect_pattern.is_empty();
        match (&flags.inbound, &flags.outbound) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    FLAGS,
                    "--inbound",
                    "flags describe one listener; for an inbound and an outbound one, use --config with [[inbound]] and [[outbound]]",
                ));
            }
            (None, None) => {
                return Err(Error::config(
                    FLAGS,
                    "--inbound",
                    "no listener: give --inbound ADDR --target ADDR, or --outbound ADDR --upstream HOST:PORT --expect-id ID, or --config FILE",
                ));
            }
            (Some(listen), None) => {
                if any_outbound {
                    return Err(Error::config(
                        FLAGS,
                        "--upstream",
                        "--upstream and --expect-* belong to an --outbound listener, not --inbound",
                    ));
                }
                let listen = socket_addr(FLAGS, "--inbound", listen)?;
                let target = flags.target.as_deref().ok_or_else(|| {
                    Error::config(
                        FLAGS,
                        "--target",
                        "--inbound needs --target HOST:PORT, the local application to forward to",
                    )
                })?;
                let mode = match &flags.mode {
                    Some(mode) => mode
                        .parse()
                        .map_err(|e| Error::config(FLAGS, "--mode", e))?,
                    None => Mode::Strict,
                };
                let mut http_rules = Vec::new();
                for (key, action, list) in [
                    ("--http-deny", Action::Deny, &flags.http_deny),
                    ("--http-allow", Action::Allow, &flags.http_allow),
                ] {
                    for text in list {
                        http_rules.push(
                            HttpRule::parse_flag(key, action, text)
                                .map_err(|e| Error::config(FLAGS, key, e))?,
                        );
                    }
                }
                config.inbound.push(inbound(
                    FLAGS,
                    "--inbound",
                    None,
                    listen,
                    target,
                    mode,
                    patterns(FLAGS, "--allow", &flags.allow)?,
                    patterns(FLAGS, "--deny", &flags.deny)?,
                    flags.http,
                    http_rules,
                )?);
            }
            (None, Some(listen)) => {
                if any_inbound {
                    return Err(Error::config(
                        FLAGS,
                        "--target",
                        "--target, --mode, --allow, --deny and --http belong to an --inbound listener, not --outbound",
                    ));
                }
                let listen = socket_addr(FLAGS, "--outbound", listen)?;
                let upstream = flags.upstream.as_deref().ok_or_else(|| {
                    Error::config(
                        FLAGS,
                        "--upstream",
                        "--outbound needs --upstream HOST:PORT, the mTLS server to connect to",
                    )
                })?;
                let mut expect = patterns(FLAGS, "--expect-id", &flags.expect_id)?;
                if let Some(bad) = expect.iter().find(|p| !matches!(p, IdPattern::Exact(_))) {
                    return Err(Error::config(
                        FLAGS,
                        "--expect-id",
                        format!(
                            "`{bad}` is not a single SPIFFE ID; use --expect-trust-domain or --expect-pattern"
                        ),
                    ));
                }
                for td in &flags.expect_trust_domain {
                    let text = if td.starts_with("spiffe://") {
                        td.clone()
                    } else {
                        format!("spiffe://{td}")
                    };
                    match IdPattern::parse("--expect-trust-domain", &text) {
                        Ok(pattern @ IdPattern::TrustDomain(_)) => expect.push(pattern),
                        Ok(_) => {
                            return Err(Error::config(
                                FLAGS,
                                "--expect-trust-domain",
                                format!(
                                    "`{td}` has a path; give only the trust domain, e.g. example.org"
                                ),
                            ));
                        }
                        Err(e) => return Err(Error::config(FLAGS, "--expect-trust-domain", e)),
                    }
                }
                expect.extend(patterns(FLAGS, "--expect-pattern", &flags.expect_pattern)?);
                config.outbound.push(outbound(
                    FLAGS,
                    "--outbound",
                    None,
                    listen,
                    upstream,
                    expect,
                )?);
            }
        }
        config.apply_overrides(flags)?;
        Ok(config)
    }

    /// Reads a TOML file (unknown keys are refused, errors name the file and key).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text that came from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let file: File = toml::from_str(text).map_err(|e| Error::ParseConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let source = path.display().to_string();
        let source = source.as_str();
        let mut config = ForwarderConfig {
            socket: PathBuf::new(),
            spiffe_id: None,
            health_address: None,
            limits: Limits::default(),
            inbound: Vec::new(),
            outbound: Vec::new(),
        };
        if let Some(socket) = &file.socket {
            config.socket = sigil_workload_api::socket_path(socket)
                .map_err(|e| Error::config(source, "socket", e))?;
        }
        if let Some(id) = &file.spiffe_id {
            config.spiffe_id = Some(
                parse_spiffe_id("spiffe_id", id)
                    .map_err(|e| Error::config(source, "spiffe_id", e))?,
            );
        }
        if let Some(address) = &file.health_address {
            config.health_address = Some(socket_addr(source, "health_address", address)?);
        }
        let limits = &file.limits;
        for (key, value, slot) in [
            (
                "limits.connect_timeout",
                &limits.connect_timeout,
                &mut config.limits.connect_timeout,
            ),
            (
                "limits.handshake_timeout",
                &limits.handshake_timeout,
                &mut config.limits.handshake_timeout,
            ),
            (
                "limits.idle_timeout",
                &limits.idle_timeout,
                &mut config.limits.idle_timeout,
            ),
            (
                "limits.drain_timeout",
                &limits.drain_timeout,
                &mut config.limits.drain_timeout,
            ),
        ] {
            if let Some(value) = value {
                *slot = duration(source, key, value)?;
            }
        }
        if let Some(max) = limits.max_connections {
            config.limits.max_connections = max_connections(source, "limits.max_connections", max)?;
        }
        for (i, raw) in file.inbound.iter().enumerate() {
            let key = format!("inbound[{i}]");
            let listen = socket_addr(source, &format!("{key}.listen"), &raw.listen)?;
            let mut rules = Vec::new();
            for (j, rule) in raw.http_rules.iter().enumerate() {
                let rule_key = format!("{key}.http_rules[{j}]");
                let principals =
                    patterns(source, &format!("{rule_key}.principals"), &rule.principals)?;
                rules.push(
                    HttpRule::new(
                        rule.action,
                        principals,
                        rule.methods.clone(),
                        rule.paths.clone(),
                    )
                    .map_err(|e| Error::config(source, rule_key.clone(), e))?,
                );
            }
            if !rules.is_empty() && !raw.http {
                return Err(Error::config(
                    source,
                    format!("{key}.http_rules"),
                    "HTTP rules need `http = true` on the listener",
                ));
            }
            config.inbound.push(inbound(
                source,
                &key,
                raw.name.clone(),
                listen,
                &raw.target,
                raw.mode.or(file.mode).unwrap_or(Mode::Strict),
                patterns(source, &format!("{key}.allow"), &raw.allow)?,
                patterns(source, &format!("{key}.deny"), &raw.deny)?,
                raw.http,
                rules,
            )?);
        }
        for (i, raw) in file.outbound.iter().enumerate() {
            let key = format!("outbound[{i}]");
            let listen = socket_addr(source, &format!("{key}.listen"), &raw.listen)?;
            let expect = patterns(source, &format!("{key}.expect"), &raw.expect)?;
            config.outbound.push(outbound(
                source,
                &key,
                raw.name.clone(),
                listen,
                &raw.upstream,
                expect,
            )?);
        }
        if config.inbound.is_empty() && config.outbound.is_empty() {
            return Err(Error::config(
                source,
                "inbound",
                "the file has no listener; add an [[inbound]] or [[outbound]] table",
            ));
        }
        let mut names: Vec<&str> = config
            .inbound
            .iter()
            .map(|l| l.name.as_str())
            .chain(config.outbound.iter().map(|l| l.name.as_str()))
            .collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Error::config(
                source,
                "name",
                format!(
                    "two listeners are named `{}`; names must be unique",
                    pair[0]
                ),
            ));
        }
        Ok(config)
    }

    /// Applies the flags that may also accompany `--config`: socket, SVID, health address and
    /// limits. Without a socket from anywhere, `$SPIFFE_ENDPOINT_SOCKET` must be set (the binary
    /// passes it as `--socket`).
    pub fn apply_overrides(&mut self, flags: &Flags) -> Result<()> {
        if let Some(socket) = &flags.socket {
            self.socket = sigil_workload_api::socket_path(socket)
                .map_err(|e| Error::config(FLAGS, "--socket", e))?;
        }
        if self.socket.as_os_str().is_empty() {
            return Err(Error::config(
                FLAGS,
                "--socket",
                "no Workload API socket: pass --socket unix:///path or set SPIFFE_ENDPOINT_SOCKET",
            ));
        }
        if let Some(id) = &flags.spiffe_id {
            self.spiffe_id = Some(
                parse_spiffe_id("--spiffe-id", id)
                    .map_err(|e| Error::config(FLAGS, "--spiffe-id", e))?,
            );
        }
        if let Some(address) = &flags.health_address {
            self.health_address = Some(socket_addr(FLAGS, "--health-address", address)?);
        }
        for (key, value, slot) in [
            (
                "--connect-timeout",
                &flags.connect_timeout,
                &mut self.limits.connect_timeout,
            ),
            (
                "--handshake-timeout",
                &flags.handshake_timeout,
                &mut self.limits.handshake_timeout,
            ),
            (
                "--idle-timeout",
                &flags.idle_timeout,
                &mut self.limits.idle_timeout,
            ),
            (
                "--drain-timeout",
                &flags.drain_timeout,
                &mut self.limits.drain_timeout,
            ),
        ] {
            if let Some(value) = value {
                *slot = duration(FLAGS, key, value)?;
            }
        }
        if let Some(max) = flags.max_connections {
            self.limits.max_connections = max_connections(FLAGS, "--max-connections", max)?;
        }
        Ok(())
    }
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    socket: Option<String>,
    /// The mode of every inbound listener that does not set its own.
    mode: Option<Mode>,
    spiffe_id: Option<String>,
    health_address: Option<String>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    inbound: Vec<FileInbound>,
    #[serde(default)]
    outbound: Vec<FileOutbound>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    connect_timeout: Option<String>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    drain_timeout: Option<String>,
    max_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInbound {
    name: Option<String>,
    listen: String,
    target: String,
    mode: Option<Mode>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    http: bool,
    #[serde(default)]
    http_rules: Vec<FileHttpRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttpRule {
    action: Action,
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOutbound {
    name: Option<String>,
    listen: String,
    upstream: String,
    expect: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ForwarderConfig> {
        ForwarderConfig::from_toml(text, Path::new("forward.toml"))
    }

    #[test]
    fn a_full_file_parses() {
        let config = parse(
            r#"
socket = "unix:///tmp/api.sock"
health_address = "127.0.0.1:15021"
[limits]
handshake_timeout = "2s"
max_connections = 10
[[inbound]]
listen = "0.0.0.0:15443"
target = "127.0.0.1:8080"
mode = "permissive"
allow = ["spiffe://example.org/ns/prod/*"]
http = true
[[inbound.http_rules]]
action = "deny"
methods = ["delete"]
[[outbound]]
name = "db"
listen = "127.0.0.1:9000"
upstream = "db.internal:5432"
expect = ["spiffe://example.org/db"]
"#,
        )
        .expect("valid");
        assert_eq!(config.socket, PathBuf::from("/tmp/api.sock"));
        assert_eq!(config.limits.handshake_timeout, Duration::from_secs(2));
        assert_eq!(config.limits.max_connections, 10);
        assert_eq!(config.inbound[0].name, "inbound-15443");
        assert_eq!(config.inbound[0].mode, Mode::Permissive);
        assert_eq!(config.inbound[0].http_rules[0].methods, vec!["DELETE"]);
        assert_eq!(config.outbound[0].name, "db");

        let inherited = parse(
            "mode = \"permissive\"\n[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\n[[inbound]]\nlisten = \"0.0.0.0:2\"\ntarget = \"x:2\"\nmode = \"strict\"\n",
        )
        .expect("valid");
        assert_eq!(inherited.inbound[0].mode, Mode::Permissive);
        assert_eq!(inherited.inbound[1].mode, Mode::Strict);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        for (text, says) in [
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\ncolour = 1\n",
                "colour",
            ),
            (
                "[[inbound]]\nlisten = \"nowhere\"\ntarget = \"x:1\"\n",
                "inbound[0].listen",
            ),
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x\"\n",
                "inbound[0].target",
            ),
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nallow = [\"spiffe://a\", \"web\"]\n",
                "inbound[0].allow[1]",
            ),
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nmode = \"lax\"\n",
                "lax",
            ),
            (
                "[[outbound]]\nlisten = \"0.0.0.0:1\"\nupstream = \"x:1\"\nexpect = [\"spiffe://a\"]\n",
                "loopback",
            ),
            (
                "[[outbound]]\nlisten = \"127.0.0.1:1\"\nupstream = \"x:1\"\nexpect = []\n",
                "outbound[0].expect",
            ),
            ("[limits]\nidle_timeout = \"soon\"\n", "limits.idle_timeout"),
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nmode = \"disable\"\ndeny = [\"spiffe://a\"]\n",
                "inbound[0].allow",
            ),
            ("", "no listener"),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains("forward.toml"), "{err}");
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn flags_make_one_listener() {
        let flags = Flags {
            socket: Some("unix:///tmp/api.sock".into()),
            outbound: Some("127.0.0.1:9000".into()),
            upstream: Some("localhost:8443".into()),
            expect_trust_domain: vec!["example.org".into()],
            ..Flags::default()
        };
        let config = ForwarderConfig::from_flags(&flags).expect("valid");
        assert_eq!(
            config.outbound[0].expect[0].to_string(),
            "spiffe://example.org"
        );

        let bad = Flags {
            inbound: Some("0.0.0.0:15443".into()),
            upstream: Some("x:1".into()),
            ..flags.clone()
        };
        let err = ForwarderConfig::from_flags(&bad)
            .expect_err("both")
            .to_string();
        assert!(err.contains("--inbound"), "{err}");
        let no_target = Flags {
            outbound: None,
            upstream: None,
            expect_trust_domain: Vec::new(),
            inbound: Some("0.0.0.0:15443".into()),
            ..flags
        };
        let err = ForwarderConfig::from_flags(&no_target)
            .expect_err("target")
            .to_string();
        assert!(err.contains("--target"), "{err}");
    }
}

//! The configuration from flags: one listener, or overrides of a file's settings.

use std::path::PathBuf;

use sigil_core::id::parse_spiffe_id;

use super::{
    FLAGS, ForwarderConfig, IdPattern, Inbound, Limits, Mode, Outbound, duration, inbound,
    max_connections, max_path_length, outbound, patterns, socket_addr,
};
use crate::policy::{Action, HttpRule};
use crate::{Error, Result};

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
    /// `--max-path-length`.
    pub max_path_length: Option<usize>,
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
    /// `--escaped-slashes`.
    pub escaped_slashes: Option<String>,
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
            (Some(listen), None) => config.inbound.push(inbound_from_flags(flags, listen)?),
            (None, Some(listen)) => config.outbound.push(outbound_from_flags(flags, listen)?),
        }
        config.apply_overrides(flags)?;
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
        if let Some(max) = flags.max_path_length {
            self.limits.max_path_length = max_path_length(FLAGS, "--max-path-length", max)?;
        }
        Ok(())
    }
}

/// Whether any flag of an `--inbound` listener is given.
fn has_inbound_flags(flags: &Flags) -> bool {
    flags.target.is_some()
        || flags.mode.is_some()
        || !flags.allow.is_empty()
        || !flags.deny.is_empty()
        || flags.http
        || !flags.http_allow.is_empty()
        || !flags.http_deny.is_empty()
        || flags.escaped_slashes.is_some()
}

/// Whether any flag of an `--outbound` listener is given.
fn has_outbound_flags(flags: &Flags) -> bool {
    flags.upstream.is_some()
        || !flags.expect_id.is_empty()
        || !flags.expect_trust_domain.is_empty()
        || !flags.expect_pattern.is_empty()
}

/// The inbound listener of `--inbound listen` and the flags that go with it.
fn inbound_from_flags(flags: &Flags, listen: &str) -> Result<Inbound> {
    if has_outbound_flags(flags) {
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
    let http_rules = http_rules_from_flags(flags)?;
    inbound(
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
        flags
            .escaped_slashes
            .as_deref()
            .map(|text| text.parse())
            .transpose()
            .map_err(|e| Error::config(FLAGS, "--escaped-slashes", e))?,
    )
}

/// The HTTP rules of `--http-deny` then `--http-allow`, in that order.
fn http_rules_from_flags(flags: &Flags) -> Result<Vec<HttpRule>> {
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
    Ok(http_rules)
}

/// The outbound listener of `--outbound listen` and the flags that go with it.
fn outbound_from_flags(flags: &Flags, listen: &str) -> Result<Outbound> {
    if has_inbound_flags(flags) {
        return Err(Error::config(
            FLAGS,
            "--target",
            "--target, --mode, --allow, --deny, --http and --escaped-slashes belong to an --inbound listener, not --outbound",
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
    let expect = expected_upstream_ids(flags)?;
    outbound(FLAGS, "--outbound", None, listen, upstream, expect)
}

/// The identities an outbound upstream may present: `--expect-id`, `--expect-trust-domain` and
/// `--expect-pattern`, in that order.
fn expected_upstream_ids(flags: &Flags) -> Result<Vec<IdPattern>> {
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
        expect.push(trust_domain_pattern(td)?);
    }
    expect.extend(patterns(FLAGS, "--expect-pattern", &flags.expect_pattern)?);
    Ok(expect)
}

/// The pattern of one `--expect-trust-domain`, given with or without `spiffe://`.
fn trust_domain_pattern(td: &str) -> Result<IdPattern> {
    let text = if td.starts_with("spiffe://") {
        td.to_string()
    } else {
        format!("spiffe://{td}")
    };
    match IdPattern::parse("--expect-trust-domain", &text) {
        Ok(pattern @ IdPattern::TrustDomain(_)) => Ok(pattern),
        Ok(_) => Err(Error::config(
            FLAGS,
            "--expect-trust-domain",
            format!("`{td}` has a path; give only the trust domain, e.g. example.org"),
        )),
        Err(e) => Err(Error::config(FLAGS, "--expect-trust-domain", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn path_settings_from_flags_name_their_flag() {
        let inbound = Flags {
            socket: Some("unix:///tmp/api.sock".into()),
            inbound: Some("0.0.0.0:15443".into()),
            target: Some("127.0.0.1:8080".into()),
            http: true,
            escaped_slashes: Some("keep".into()),
            max_path_length: Some(100),
            http_deny: vec!["* * /admin".into()],
            ..Flags::default()
        };
        let config = ForwarderConfig::from_flags(&inbound).expect("valid");
        assert_eq!(
            config.inbound[0].escaped_slashes,
            crate::path::EscapedSlashes::Keep
        );
        assert_eq!(config.limits.max_path_length, 100);
        assert!(config.inbound[0].permissive_bypass().is_none(), "strict");
        for (bad, says) in [
            (
                Flags {
                    escaped_slashes: Some("decode".into()),
                    ..inbound.clone()
                },
                "--escaped-slashes",
            ),
            (
                Flags {
                    http: false,
                    http_deny: Vec::new(),
                    ..inbound.clone()
                },
                "--escaped-slashes",
            ),
            (
                Flags {
                    max_path_length: Some(0),
                    ..inbound.clone()
                },
                "--max-path-length",
            ),
            (
                Flags {
                    http_deny: vec!["* * //admin".into()],
                    ..inbound.clone()
                },
                "write `/admin`",
            ),
        ] {
            let err = ForwarderConfig::from_flags(&bad)
                .expect_err(says)
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}

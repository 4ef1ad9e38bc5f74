//! The one check of what the user wrote ([`super::spec`]) into the [`ForwarderConfig`] the
//! forwarder runs: the same code for flags and files, naming the flag or the file and key.

use std::path::Path;

use sigil_core::config::{load_toml, parse_toml};
use sigil_core::id::parse_spiffe_id;

use super::{
    Flags, ForwarderConfig, ForwarderSpec, Inbound, InboundSpec, Limits, LimitsSpec, Mode, Origin,
    Outbound, OutboundSpec,
};
use crate::Result;
use crate::policy::{Action, HttpRule, IdPattern, PeerPolicy};

/// The most `max_connections` may be: the semaphore behind the limit holds at most
/// `u32::MAX >> 3` permits per acquire.
const MAX_CONNECTIONS: usize = 1_000_000;

/// The most `max_path_length` may be: the http crate refuses longer request targets anyway.
const MAX_PATH_LENGTH: usize = 65_534;

impl ForwarderConfig {
    /// The configuration of `sigil-agent forward`: the listeners of the file at `file`, or the
    /// one listener the flags describe; then the flags' settings over the file's. Without a
    /// socket from anywhere, `$SPIFFE_ENDPOINT_SOCKET` must be set (clap passes it as `--socket`).
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Self> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::from_listener_flags(flags)?,
        };
        flags.settings.apply(Origin::Flags, &mut config)?;
        if config.socket.as_os_str().is_empty() {
            return Err(Origin::Flags.error(
                "--socket".into(),
                "no Workload API socket: pass --socket unix:///path or set SPIFFE_ENDPOINT_SOCKET",
            ));
        }
        Ok(config)
    }

    /// Reads a TOML file (unknown keys are refused, errors name the file and key).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_spec(&load_toml(path)?, path)
    }

    /// Parses TOML text that came from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        Self::from_spec(&parse_toml(text, path)?, path)
    }

    /// The listeners and settings of a file.
    fn from_spec(spec: &ForwarderSpec, path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = Origin::File {
            name: &name,
            table: "",
        };
        let mut config = ForwarderConfig::default();
        spec.apply(file, &mut config)?;
        for (i, inbound) in spec.inbound.iter().enumerate() {
            let table = format!("inbound[{i}]");
            let inbound = inbound.to_inbound(file.table(&table), spec.mode)?;
            config.inbound.push(inbound);
        }
        for (i, outbound) in spec.outbound.iter().enumerate() {
            let table = format!("outbound[{i}]");
            config
                .outbound
                .push(outbound.to_outbound(file.table(&table))?);
        }
        if config.inbound.is_empty() && config.outbound.is_empty() {
            return Err(file.error(
                "inbound".into(),
                "the file has no listener; add an [[inbound]] or [[outbound]] table",
            ));
        }
        config.check_unique_names(file)?;
        Ok(config)
    }

    /// The one listener (inbound or outbound) of the flags.
    fn from_listener_flags(flags: &Flags) -> Result<Self> {
        let (inbound, outbound) = (&flags.inbound, &flags.outbound);
        let flag_error = |flag: &str, reason| Err(Origin::Flags.error(flag.into(), reason));
        let mut config = ForwarderConfig::default();
        match (&inbound.listen, &outbound.listen) {
            (Some(_), Some(_)) => {
                return flag_error(
                    "--inbound",
                    "flags describe one listener; for an inbound and an outbound one, use --config with [[inbound]] and [[outbound]]",
                );
            }
            (None, None) => {
                return flag_error(
                    "--inbound",
                    "no listener: give --inbound ADDR --target ADDR, or --outbound ADDR --upstream HOST:PORT --expect-id ID, or --config FILE",
                );
            }
            (Some(_), None) if outbound.has_settings() => {
                return flag_error(
                    "--upstream",
                    "--upstream and --expect-* belong to an --outbound listener, not --inbound",
                );
            }
            (None, Some(_)) if inbound.has_settings() => {
                return flag_error(
                    "--target",
                    "--target, --mode, --allow, --deny, --http and --escaped-slashes belong to an --inbound listener, not --outbound",
                );
            }
            (Some(_), None) => config
                .inbound
                .push(inbound.to_inbound(Origin::Flags, None)?),
            (None, Some(_)) => config.outbound.push(outbound.to_outbound(Origin::Flags)?),
        }
        Ok(config)
    }

    /// Refuses two listeners (inbound or outbound) with the same name.
    fn check_unique_names(&self, file: Origin<'_>) -> Result<()> {
        let mut names: Vec<&str> = self
            .inbound
            .iter()
            .map(|l| l.name.as_str())
            .chain(self.outbound.iter().map(|l| l.name.as_str()))
            .collect();
        names.sort_unstable();
        match names.windows(2).find(|pair| pair[0] == pair[1]) {
            Some(pair) => Err(file.error(
                "name".into(),
                format!(
                    "two listeners are named `{}`; names must be unique",
                    pair[0]
                ),
            )),
            None => Ok(()),
        }
    }
}

impl ForwarderSpec {
    /// Sets the socket, SVID, health address and limits that are given.
    fn apply(&self, origin: Origin<'_>, config: &mut ForwarderConfig) -> Result<()> {
        if let Some(socket) = &self.socket {
            config.socket = sigil_workload_api::socket_path(socket)
                .map_err(|e| origin.error(origin.key("socket"), e))?;
        }
        if let Some(id) = &self.spiffe_id {
            let id = parse_spiffe_id("spiffe_id", id)
                .map_err(|e| origin.error(origin.key("spiffe_id"), e))?;
            config.spiffe_id = Some(id);
        }
        if let Some(address) = &self.health_address {
            let address = origin.socket_addr(origin.key("health_address"), address)?;
            config.health_address = Some(address);
        }
        self.limits
            .apply(origin.table("limits"), &mut config.limits)
    }
}

impl LimitsSpec {
    /// Sets the limits that are given over `limits`.
    fn apply(&self, origin: Origin<'_>, limits: &mut Limits) -> Result<()> {
        for (field, value, slot) in [
            (
                "connect_timeout",
                self.connect_timeout,
                &mut limits.connect_timeout,
            ),
            (
                "handshake_timeout",
                self.handshake_timeout,
                &mut limits.handshake_timeout,
            ),
            ("idle_timeout", self.idle_timeout, &mut limits.idle_timeout),
            (
                "drain_timeout",
                self.drain_timeout,
                &mut limits.drain_timeout,
            ),
        ] {
            let Some(value) = value else { continue };
            if value.0.is_zero() {
                return Err(origin.error(
                    origin.key(field),
                    "a timeout of zero would refuse everything; give a positive duration",
                ));
            }
            *slot = value.0;
        }
        for (field, value, slot, max, unit) in [
            (
                "max_connections",
                self.max_connections,
                &mut limits.max_connections,
                MAX_CONNECTIONS,
                "",
            ),
            (
                "max_path_length",
                self.max_path_length,
                &mut limits.max_path_length,
                MAX_PATH_LENGTH,
                " bytes",
            ),
        ] {
            let Some(value) = value else { continue };
            if value == 0 || value > max {
                return Err(origin.error(
                    origin.key(field),
                    format!("{value} is out of range; give between 1 and {max}{unit}"),
                ));
            }
            *slot = value;
        }
        Ok(())
    }
}

impl InboundSpec {
    /// The inbound listener; `default_mode` is a file's top-level `mode`.
    fn to_inbound(&self, origin: Origin<'_>, default_mode: Option<Mode>) -> Result<Inbound> {
        let listen = origin.listen_addr("--inbound", &self.listen)?;
        let target = required_host_port(
            origin,
            "target",
            &self.target,
            "an inbound listener needs --target HOST:PORT (`target` in a file), the local application to forward to",
        )?;
        let http_rules = self.http_rules(origin)?;
        if !http_rules.is_empty() && !self.http {
            return Err(origin.error(
                origin.named("http_rules", "--http-allow"),
                "HTTP rules need HTTP mode (--http, or `http = true`)",
            ));
        }
        if self.escaped_slashes.is_some() && !self.http {
            return Err(origin.error(
                origin.key("escaped_slashes"),
                "escaped_slashes applies to request paths, so it needs HTTP mode (--http, or `http = true`)",
            ));
        }
        let mode = self.mode.or(default_mode).unwrap_or(Mode::Strict);
        if mode == Mode::Disable && !(self.allow.is_empty() && self.deny.is_empty()) {
            return Err(origin.error(
                origin.key("allow"),
                "allow and deny rules check mTLS peers, and mode `disable` has none; use strict or permissive, or drop the rules",
            ));
        }
        Ok(Inbound {
            name: self
                .name
                .clone()
                .unwrap_or_else(|| format!("inbound-{}", listen.port())),
            listen,
            target: target.to_string(),
            mode,
            policy: PeerPolicy {
                allow: origin.patterns("allow", "--allow", &self.allow)?,
                deny: origin.patterns("deny", "--deny", &self.deny)?,
            },
            http: self.http,
            http_rules,
            escaped_slashes: self.escaped_slashes.unwrap_or_default(),
        })
    }

    /// The HTTP rules: a file's `[[inbound.http_rules]]` tables, then `--http-deny` and
    /// `--http-allow`, in that order (a listener has rules of one form only).
    fn http_rules(&self, origin: Origin<'_>) -> Result<Vec<HttpRule>> {
        let mut rules = Vec::new();
        for (j, rule) in self.http_rules.iter().enumerate() {
            let key = origin.named(&format!("http_rules[{j}]"), "--http-allow");
            let table = key.clone();
            let principals = origin
                .table(&table)
                .patterns("principals", "", &rule.principals)?;
            let rule = HttpRule::new(
                rule.action,
                principals,
                rule.methods.clone(),
                rule.paths.clone(),
            )
            .map_err(|e| origin.error(key, e))?;
            rules.push(rule);
        }
        for (flag, action, list) in [
            ("--http-deny", Action::Deny, &self.http_deny),
            ("--http-allow", Action::Allow, &self.http_allow),
        ] {
            for text in list {
                let rule = HttpRule::parse_flag(flag, action, text)
                    .map_err(|e| origin.error(flag.into(), e))?;
                rules.push(rule);
            }
        }
        Ok(rules)
    }
}

impl OutboundSpec {
    /// The outbound listener.
    fn to_outbound(&self, origin: Origin<'_>) -> Result<Outbound> {
        let listen_key = origin.named("listen", "--outbound");
        let listen = origin.listen_addr("--outbound", &self.listen)?;
        if !listen.ip().is_loopback() {
            return Err(origin.error(
                listen_key,
                format!(
                    "{listen} is not a loopback address; an outbound listener takes plaintext and must listen on 127.0.0.1 or ::1"
                ),
            ));
        }
        let upstream = required_host_port(
            origin,
            "upstream",
            &self.upstream,
            "an outbound listener needs --upstream HOST:PORT (`upstream` in a file), the mTLS server to connect to",
        )?;
        let expect = self.expected_ids(origin)?;
        if expect.is_empty() {
            return Err(origin.error(
                origin.named("expect", "--expect-id"),
                "an outbound listener must say which identity the upstream presents: --expect-id, --expect-trust-domain or --expect-pattern (`expect = [...]` in a file)",
            ));
        }
        Ok(Outbound {
            name: self
                .name
                .clone()
                .unwrap_or_else(|| format!("outbound-{}", listen.port())),
            listen,
            upstream: upstream.to_string(),
            expect,
        })
    }

    /// The identities the upstream may present: a file's `expect`, then `--expect-id`,
    /// `--expect-trust-domain` and `--expect-pattern`, in that order.
    fn expected_ids(&self, origin: Origin<'_>) -> Result<Vec<IdPattern>> {
        let mut expect = origin.patterns("expect", "--expect-id", &self.expect)?;
        let ids = origin.patterns("expect", "--expect-id", &self.expect_id)?;
        if let Some(bad) = ids.iter().find(|p| !matches!(p, IdPattern::Exact(_))) {
            return Err(origin.error(
                "--expect-id".into(),
                format!(
                    "`{bad}` is not a single SPIFFE ID; use --expect-trust-domain or --expect-pattern"
                ),
            ));
        }
        expect.extend(ids);
        for td in &self.expect_trust_domain {
            expect.push(trust_domain_pattern(td)?);
        }
        expect.extend(origin.patterns("expect", "--expect-pattern", &self.expect_pattern)?);
        Ok(expect)
    }
}

/// The `HOST:PORT` a listener cannot do without (`name` in a file), checked; `missing` says what
/// to give when it is absent.
fn required_host_port<'v>(
    origin: Origin<'_>,
    name: &str,
    value: &'v Option<String>,
    missing: &str,
) -> Result<&'v str> {
    let value = value
        .as_deref()
        .ok_or_else(|| origin.error(origin.key(name), missing))?;
    origin.host_port(origin.key(name), value)?;
    Ok(value)
}

/// The pattern of one `--expect-trust-domain`, given with or without `spiffe://`.
fn trust_domain_pattern(td: &str) -> Result<IdPattern> {
    let flag = "--expect-trust-domain";
    let text = if td.starts_with("spiffe://") {
        td.to_string()
    } else {
        format!("spiffe://{td}")
    };
    match IdPattern::parse(flag, &text) {
        Ok(pattern @ IdPattern::TrustDomain(_)) => Ok(pattern),
        Ok(_) => Err(Origin::Flags.error(
            flag.into(),
            format!("`{td}` has a path; give only the trust domain, e.g. example.org"),
        )),
        Err(e) => Err(Origin::Flags.error(flag.into(), e)),
    }
}

#[cfg(test)]
mod tests;

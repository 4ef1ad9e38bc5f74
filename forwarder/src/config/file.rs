//! The TOML form of the configuration: `sigil-agent forward --config FILE`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sigil_core::id::parse_spiffe_id;

use super::{
    ForwarderConfig, Inbound, Limits, Mode, Outbound, duration, inbound, max_connections,
    max_path_length, outbound, patterns, socket_addr,
};
use crate::path::EscapedSlashes;
use crate::policy::{Action, HttpRule};
use crate::{Error, Result};

impl ForwarderConfig {
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
        config.apply_file_settings(source, &file)?;
        config.limits = limits_from_file(source, &file.limits)?;
        for (i, raw) in file.inbound.iter().enumerate() {
            config
                .inbound
                .push(inbound_from_file(source, i, raw, file.mode)?);
        }
        for (i, raw) in file.outbound.iter().enumerate() {
            config.outbound.push(outbound_from_file(source, i, raw)?);
        }
        if config.inbound.is_empty() && config.outbound.is_empty() {
            return Err(Error::config(
                source,
                "inbound",
                "the file has no listener; add an [[inbound]] or [[outbound]] table",
            ));
        }
        config.check_unique_names(source)?;
        Ok(config)
    }

    /// Sets the socket, SVID and health address that the file's top level gives.
    fn apply_file_settings(&mut self, source: &str, file: &File) -> Result<()> {
        if let Some(socket) = &file.socket {
            self.socket = sigil_workload_api::socket_path(socket)
                .map_err(|e| Error::config(source, "socket", e))?;
        }
        if let Some(id) = &file.spiffe_id {
            self.spiffe_id = Some(
                parse_spiffe_id("spiffe_id", id)
                    .map_err(|e| Error::config(source, "spiffe_id", e))?,
            );
        }
        if let Some(address) = &file.health_address {
            self.health_address = Some(socket_addr(source, "health_address", address)?);
        }
        Ok(())
    }

    /// Refuses two listeners (inbound or outbound) with the same name.
    fn check_unique_names(&self, source: &str) -> Result<()> {
        let mut names: Vec<&str> = self
            .inbound
            .iter()
            .map(|l| l.name.as_str())
            .chain(self.outbound.iter().map(|l| l.name.as_str()))
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
        Ok(())
    }
}

/// The `[limits]` table over the defaults.
fn limits_from_file(source: &str, limits: &FileLimits) -> Result<Limits> {
    let mut result = Limits::default();
    for (key, value, slot) in [
        (
            "limits.connect_timeout",
            &limits.connect_timeout,
            &mut result.connect_timeout,
        ),
        (
            "limits.handshake_timeout",
            &limits.handshake_timeout,
            &mut result.handshake_timeout,
        ),
        (
            "limits.idle_timeout",
            &limits.idle_timeout,
            &mut result.idle_timeout,
        ),
        (
            "limits.drain_timeout",
            &limits.drain_timeout,
            &mut result.drain_timeout,
        ),
    ] {
        if let Some(value) = value {
            *slot = duration(source, key, value)?;
        }
    }
    if let Some(max) = limits.max_connections {
        result.max_connections = max_connections(source, "limits.max_connections", max)?;
    }
    if let Some(max) = limits.max_path_length {
        result.max_path_length = max_path_length(source, "limits.max_path_length", max)?;
    }
    Ok(result)
}

/// The `i`th `[[inbound]]` table; `default_mode` is the file's top-level `mode`.
fn inbound_from_file(
    source: &str,
    i: usize,
    raw: &FileInbound,
    default_mode: Option<Mode>,
) -> Result<Inbound> {
    let key = format!("inbound[{i}]");
    let listen = socket_addr(source, &format!("{key}.listen"), &raw.listen)?;
    let rules = http_rules_from_file(source, &key, &raw.http_rules)?;
    if !rules.is_empty() && !raw.http {
        return Err(Error::config(
            source,
            format!("{key}.http_rules"),
            "HTTP rules need `http = true` on the listener",
        ));
    }
    inbound(
        source,
        &key,
        raw.name.clone(),
        listen,
        &raw.target,
        raw.mode.or(default_mode).unwrap_or(Mode::Strict),
        patterns(source, &format!("{key}.allow"), &raw.allow)?,
        patterns(source, &format!("{key}.deny"), &raw.deny)?,
        raw.http,
        rules,
        raw.escaped_slashes,
    )
}

/// The `[[inbound.http_rules]]` of the listener at `key`.
fn http_rules_from_file(source: &str, key: &str, raw: &[FileHttpRule]) -> Result<Vec<HttpRule>> {
    let mut rules = Vec::new();
    for (j, rule) in raw.iter().enumerate() {
        let rule_key = format!("{key}.http_rules[{j}]");
        let principals = patterns(source, &format!("{rule_key}.principals"), &rule.principals)?;
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
    Ok(rules)
}

/// The `i`th `[[outbound]]` table.
fn outbound_from_file(source: &str, i: usize, raw: &FileOutbound) -> Result<Outbound> {
    let key = format!("outbound[{i}]");
    let listen = socket_addr(source, &format!("{key}.listen"), &raw.listen)?;
    let expect = patterns(source, &format!("{key}.expect"), &raw.expect)?;
    outbound(
        source,
        &key,
        raw.name.clone(),
        listen,
        &raw.upstream,
        expect,
    )
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
    max_path_length: Option<usize>,
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
    escaped_slashes: Option<EscapedSlashes>,
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
    use std::time::Duration;

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
max_path_length = 2048
[[inbound]]
listen = "0.0.0.0:15443"
target = "127.0.0.1:8080"
mode = "permissive"
allow = ["spiffe://example.org/ns/prod/*"]
http = true
escaped_slashes = "keep"
[[inbound.http_rules]]
action = "deny"
methods = ["delete"]
paths = ["/admin", "/api*"]
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
        assert_eq!(config.inbound[0].escaped_slashes, EscapedSlashes::Keep);
        assert_eq!(config.limits.max_path_length, 2048);
        let rule = config.inbound[0].http_rules[0].to_string();
        assert_eq!(rule, "deny * DELETE /admin,/api*");
        let warning = config.inbound[0].permissive_bypass().expect("a warning");
        assert!(
            warning.contains("`inbound-15443` is permissive: plaintext callers skip"),
            "{warning}"
        );
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
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nescaped_slashes = \"keep\"\n",
                "inbound[0].escaped_slashes",
            ),
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nhttp = true\nescaped_slashes = \"decode\"\n",
                "escaped_slashes",
            ),
            ("[limits]\nmax_path_length = 0\n", "limits.max_path_length"),
            ("[limits]\nmax_path_length = 70000\n", "between 1 and 65534"),
            (
                "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nhttp = true\n[[inbound.http_rules]]\naction = \"deny\"\npaths = [\"/a/../admin\"]\n",
                "inbound[0].http_rules[0]",
            ),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains("forward.toml"), "{err}");
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}

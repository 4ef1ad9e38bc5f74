//! The forwarder's configuration as the user wrote it, in one shape for both forms: the flags of
//! `sigil-agent forward` (clap fills these structs) and a TOML file (serde fills the same
//! structs). Strings are checked once, in `convert.rs`, so every error names its flag or key.
//!
//! A few fields exist in one form only: a file names its listeners and writes HTTP rules as
//! tables and expected IDs as one list; flags write HTTP rules as one line each and expected IDs
//! by kind. They are marked "files only" or "flags only".

use clap::Args;
use serde::Deserialize;
use sigil_core::config::HumanDuration;
use sigil_workload_api::ENDPOINT_ENV;

use super::Mode;
use crate::path::EscapedSlashes;
use crate::policy::Action;

/// Everything but the listeners: a file's top level, and the flags that may accompany `--config`.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct ForwarderSpec {
    /// The Workload API socket, unix:///path.
    #[arg(long, env = ENDPOINT_ENV)]
    pub socket: Option<String>,
    /// Which of this workload's SVIDs to use (default: the first one received, kept while held).
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Serve /live, /ready and /metrics here.
    #[arg(long)]
    pub health_address: Option<String>,
    /// The mode of every inbound listener that does not set its own (files only).
    #[arg(skip)]
    pub mode: Option<Mode>,
    /// Timeouts and limits (`[limits]` in a file).
    #[command(flatten)]
    #[serde(default)]
    pub limits: LimitsSpec,
    /// The `[[inbound]]` listeners (files only: flags describe one, in [`Flags`]).
    #[arg(skip)]
    #[serde(default)]
    pub inbound: Vec<InboundSpec>,
    /// The `[[outbound]]` listeners (files only).
    #[arg(skip)]
    #[serde(default)]
    pub outbound: Vec<OutboundSpec>,
}

/// Timeouts and limits shared by every listener; unset ones keep their defaults.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Timeout for connecting to a target or upstream, e.g. 5s.
    #[arg(long)]
    pub connect_timeout: Option<HumanDuration>,
    /// Timeout from accept to a finished TLS handshake, e.g. 10s.
    #[arg(long)]
    pub handshake_timeout: Option<HumanDuration>,
    /// Close connections idle this long, e.g. 1h.
    #[arg(long)]
    pub idle_timeout: Option<HumanDuration>,
    /// On SIGTERM, wait this long for open connections, e.g. 30s.
    #[arg(long)]
    pub drain_timeout: Option<HumanDuration>,
    /// Connections open at once, over all listeners.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// HTTP mode: bytes of a request's path and query; longer ones get 414 (default 8192).
    #[arg(long)]
    pub max_path_length: Option<usize>,
}

/// An inbound listener: `--inbound` and the flags after it, or an `[[inbound]]` table.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct InboundSpec {
    /// The name in logs and metrics (files only; default `inbound-<port>`).
    #[arg(skip)]
    pub name: Option<String>,
    /// Inbound: listen here for mTLS callers, e.g. 0.0.0.0:15443.
    #[arg(id = "inbound", long = "inbound", value_name = "INBOUND")]
    pub listen: Option<String>,
    /// Inbound: the local application, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub target: Option<String>,
    /// Inbound: strict (mTLS only), permissive (mTLS or plaintext), or disable (plain TCP).
    #[arg(long)]
    pub mode: Option<Mode>,
    /// Inbound: allow peers matching this SPIFFE ID, trust domain (spiffe://td) or pattern
    /// (spiffe://td/ns/prod/*, /**); repeatable. Default: the own trust domain.
    #[arg(long)]
    #[serde(default)]
    pub allow: Vec<String>,
    /// Inbound: refuse peers matching this (wins over --allow); repeatable.
    #[arg(long)]
    #[serde(default)]
    pub deny: Vec<String>,
    /// Inbound: speak HTTP (HTTP/1.1 and HTTP/2), set x-forwarded-client-cert, apply HTTP rules.
    #[arg(long)]
    #[serde(default)]
    pub http: bool,
    /// HTTP rules as `[[inbound.http_rules]]` tables (files only).
    #[arg(skip)]
    #[serde(default)]
    pub http_rules: Vec<HttpRuleSpec>,
    /// Inbound HTTP: allow `PRINCIPAL METHODS PATH-PREFIX` (`*` for any); repeatable.
    #[arg(long)]
    #[serde(skip)]
    pub http_allow: Vec<String>,
    /// Inbound HTTP: deny `PRINCIPAL METHODS PATH-PREFIX` (checked first); repeatable.
    #[arg(long)]
    #[serde(skip)]
    pub http_deny: Vec<String>,
    /// Inbound HTTP: `%2F`, `%5C` and `\` in a request path: reject (400, the default) or keep.
    #[arg(long)]
    pub escaped_slashes: Option<EscapedSlashes>,
}

impl InboundSpec {
    /// Whether any setting of an inbound listener but its address is given.
    pub(super) fn has_settings(&self) -> bool {
        self.target.is_some()
            || self.mode.is_some()
            || !self.allow.is_empty()
            || !self.deny.is_empty()
            || self.http
            || !self.http_allow.is_empty()
            || !self.http_deny.is_empty()
            || self.escaped_slashes.is_some()
    }
}

/// One `[[inbound.http_rules]]` table (files only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRuleSpec {
    /// `allow` or `deny`.
    pub action: Action,
    /// The callers the rule is about (SPIFFE ID patterns); empty: every caller.
    #[serde(default)]
    pub principals: Vec<String>,
    /// The methods; empty: every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The path prefixes; empty: every path.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// An outbound listener: `--outbound` and the flags after it, or an `[[outbound]]` table.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct OutboundSpec {
    /// The name in logs and metrics (files only; default `outbound-<port>`).
    #[arg(skip)]
    pub name: Option<String>,
    /// Outbound: listen here (loopback) for plaintext, e.g. 127.0.0.1:9000.
    #[arg(id = "outbound", long = "outbound", value_name = "OUTBOUND")]
    pub listen: Option<String>,
    /// Outbound: the mTLS upstream, host:port.
    #[arg(long)]
    pub upstream: Option<String>,
    /// The identities the upstream may present, as SPIFFE ID patterns (files only).
    #[arg(skip)]
    #[serde(default)]
    pub expect: Vec<String>,
    /// Outbound: the upstream must present this SPIFFE ID; repeatable.
    #[arg(long)]
    #[serde(skip)]
    pub expect_id: Vec<String>,
    /// Outbound: the upstream may present any ID of this trust domain; repeatable.
    #[arg(long)]
    #[serde(skip)]
    pub expect_trust_domain: Vec<String>,
    /// Outbound: the upstream's ID must match this pattern; repeatable.
    #[arg(long)]
    #[serde(skip)]
    pub expect_pattern: Vec<String>,
}

impl OutboundSpec {
    /// Whether any setting of an outbound listener but its address is given.
    pub(super) fn has_settings(&self) -> bool {
        self.upstream.is_some()
            || !self.expect_id.is_empty()
            || !self.expect_trust_domain.is_empty()
            || !self.expect_pattern.is_empty()
    }
}

/// The flags of `sigil-agent forward`: the settings, and one listener (inbound or outbound)
/// unless `--config` gives the listeners.
#[derive(Debug, Clone, Default, Args)]
pub struct Flags {
    /// The socket, SVID, health address and limits.
    #[command(flatten)]
    pub settings: ForwarderSpec,
    /// `--inbound` and its flags.
    #[command(flatten)]
    pub inbound: InboundSpec,
    /// `--outbound` and its flags.
    #[command(flatten)]
    pub outbound: OutboundSpec,
}

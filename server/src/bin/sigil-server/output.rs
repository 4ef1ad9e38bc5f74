//! How the CLI prints: aligned `Key : value` blocks for people, JSON for scripts.

use serde_json::{Value, json};
use sigil_proto::{admin, common};

/// `--output`
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned blocks, one per item.
    Text,
    /// One JSON document.
    Json,
}

/// `bundle show --format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BundleFormat {
    /// PEM certificates of the X.509 authorities.
    Pem,
    /// The SPIFFE bundle JSON document.
    Spiffe,
}

/// Prints `items` for people (each item a block of the rows `text` gives; `empty` when there is
/// none) or for scripts (`{ "<key>": [ <json of each item> ] }`).
pub(crate) fn print_items<T>(
    format: Format,
    items: &[T],
    key: &str,
    empty: &str,
    text: impl Fn(&T) -> Vec<(&'static str, String)>,
    json: impl Fn(&T) -> Value,
) {
    match format {
        Format::Text => print_blocks(&items.iter().map(text).collect::<Vec<_>>(), empty),
        Format::Json => {
            let items: Vec<Value> = items.iter().map(json).collect();
            print_json(&json!({ key: items }));
        }
    }
}

/// Prints a list page by page as the pages arrive, in the same shapes as [`print_items`] (JSON
/// with one item per line), so a list of 100 000 entries never sits whole in the CLI's memory.
pub(crate) struct ListPrinter {
    format: Format,
    key: &'static str,
    empty: &'static str,
    printed: usize,
}

impl ListPrinter {
    pub(crate) fn new(format: Format, key: &'static str, empty: &'static str) -> Self {
        ListPrinter {
            format,
            key,
            empty,
            printed: 0,
        }
    }

    /// Prints one page of entries.
    pub(crate) fn entries(&mut self, entries: &[common::Entry]) {
        self.page(entries, entry_rows, entry_json);
    }

    /// Prints one page of agents.
    pub(crate) fn agents(&mut self, agents: &[admin::Agent]) {
        self.page(agents, agent_rows, agent_json);
    }

    fn page<T>(
        &mut self,
        items: &[T],
        text: impl Fn(&T) -> Vec<(&'static str, String)>,
        json: impl Fn(&T) -> Value,
    ) {
        for item in items {
            match self.format {
                Format::Text => {
                    if self.printed > 0 {
                        println!();
                    }
                    for (key, value) in text(item) {
                        println!("{key:<16}: {value}");
                    }
                }
                Format::Json => {
                    let separator = if self.printed == 0 {
                        format!("{{\"{}\": [\n", self.key)
                    } else {
                        ",\n".into()
                    };
                    print!("{separator}{}", json(item));
                }
            }
            self.printed += 1;
        }
    }

    /// Ends the list (the empty notice, or the JSON document's close).
    pub(crate) fn finish(self) {
        match (self.format, self.printed) {
            (Format::Text, 0) => println!("{}", self.empty),
            (Format::Text, _) => {}
            (Format::Json, 0) => println!("{{\"{}\": []}}", self.key),
            (Format::Json, _) => println!("\n]}}"),
        }
    }
}

fn print_blocks(blocks: &[Vec<(&str, String)>], empty: &str) {
    if blocks.is_empty() {
        println!("{empty}");
        return;
    }
    for (index, block) in blocks.iter().enumerate() {
        if index > 0 {
            println!();
        }
        for (key, value) in block {
            println!("{key:<16}: {value}");
        }
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn ttl(seconds: i64) -> String {
    if seconds == 0 {
        "default".into()
    } else {
        format!("{seconds}s")
    }
}

pub(crate) fn token(format: Format, token: &admin::CreateJoinTokenResponse) {
    match format {
        Format::Text => {
            println!("Token: {}", token.token);
            println!("Agent ID: {}", token.agent_spiffe_id);
            println!("Expires at: {}", token.expires_at);
        }
        Format::Json => print_json(&json!({
            "token": token.token,
            "agent_spiffe_id": token.agent_spiffe_id,
            "expires_at": token.expires_at,
        })),
    }
}

pub(crate) fn entries(format: Format, entries: &[common::Entry]) {
    print_items(
        format,
        entries,
        "entries",
        "No entries found",
        entry_rows,
        entry_json,
    );
}

fn entry_json(entry: &common::Entry) -> Value {
    json!({
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "selectors": selectors_json(&entry.selectors),
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "dns_names": entry.dns_names,
        "federates_with": entry.federates_with,
        "admin": entry.admin,
        "downstream": entry.downstream,
        "hint": entry.hint,
        "expires_at": entry.expires_at,
        "created_at": entry.created_at,
        "revision": entry.revision,
    })
}

fn entry_rows(entry: &common::Entry) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("Entry ID", entry.id.clone()),
        ("SPIFFE ID", entry.spiffe_id.clone()),
        ("Parent ID", entry.parent_id.clone()),
        ("Revision", entry.revision.to_string()),
        ("X509-SVID TTL", ttl(entry.x509_svid_ttl)),
        ("JWT-SVID TTL", ttl(entry.jwt_svid_ttl)),
    ];
    rows.extend(selector_rows(&entry.selectors));
    rows.extend(entry.dns_names.iter().map(|d| ("DNS name", d.clone())));
    rows.extend(
        entry
            .federates_with
            .iter()
            .map(|t| ("FederatesWith", t.clone())),
    );
    if entry.admin {
        rows.push(("Admin", "true".into()));
    }
    if entry.downstream {
        rows.push(("Downstream", "true".into()));
    }
    if !entry.hint.is_empty() {
        rows.push(("Hint", entry.hint.clone()));
    }
    if entry.expires_at != 0 {
        rows.push(("Expires at", entry.expires_at.to_string()));
    }
    rows
}

fn selector_rows(selectors: &[common::Selector]) -> impl Iterator<Item = (&'static str, String)> {
    selectors
        .iter()
        .map(|s| ("Selector", format!("{}:{}", s.r#type, s.value)))
}

fn selectors_json(selectors: &[common::Selector]) -> Vec<Value> {
    selectors
        .iter()
        .map(|s| json!({"type": s.r#type, "value": s.value}))
        .collect()
}

pub(crate) fn agents(format: Format, agents: &[admin::Agent]) {
    print_items(
        format,
        agents,
        "agents",
        "No attested agents found",
        agent_rows,
        agent_json,
    );
}

fn agent_rows(agent: &admin::Agent) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("SPIFFE ID", agent.spiffe_id.clone()),
        ("Attestor", agent.attestor.clone()),
        ("SVID serial", agent.svid_serial.clone()),
        ("SVID expires at", agent.svid_expires_at.to_string()),
        ("Banned", agent.banned.to_string()),
    ];
    rows.extend(selector_rows(&agent.selectors));
    rows
}

fn agent_json(agent: &admin::Agent) -> Value {
    json!({
        "spiffe_id": agent.spiffe_id,
        "attestor": agent.attestor,
        "selectors": selectors_json(&agent.selectors),
        "svid_serial": agent.svid_serial,
        "svid_expires_at": agent.svid_expires_at,
        "banned": agent.banned,
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
    })
}

pub(crate) fn svids(format: Format, svids: &[admin::IssuedSvid]) {
    let rows = |svid: &admin::IssuedSvid| {
        vec![
            ("Serial", svid.serial.clone()),
            ("Kind", svid.kind.clone()),
            ("SPIFFE ID", svid.spiffe_id.clone()),
            ("Agent ID", svid.agent_id.clone()),
            ("Entry ID", svid.entry_id.clone()),
            ("Authority", svid.authority_id.clone()),
            ("Not before", svid.not_before.to_string()),
            ("Not after", svid.not_after.to_string()),
        ]
    };
    print_items(
        format,
        svids,
        "svids",
        "No issued SVIDs found",
        rows,
        |svid| {
            json!({
                "serial": svid.serial,
                "kind": svid.kind,
                "spiffe_id": svid.spiffe_id,
                "agent_id": svid.agent_id,
                "entry_id": svid.entry_id,
                "authority_id": svid.authority_id,
                "not_before": svid.not_before,
                "not_after": svid.not_after,
            })
        },
    );
}

pub(crate) fn bundles(format: Format, bundles: &[common::Bundle]) {
    let rows = |bundle: &common::Bundle| {
        vec![
            ("Trust domain", bundle.trust_domain.clone()),
            ("Sequence", bundle.sequence.to_string()),
            (
                "X.509 authorities",
                bundle.x509_authorities.len().to_string(),
            ),
            ("JWT authorities", bundle.jwt_authorities.len().to_string()),
            ("Refresh hint (s)", bundle.refresh_hint_seconds.to_string()),
        ]
    };
    print_items(
        format,
        bundles,
        "bundles",
        "No bundles found",
        rows,
        |bundle| {
            json!({
                "trust_domain": bundle.trust_domain,
                "sequence": bundle.sequence,
                "x509_authorities": bundle.x509_authorities.len(),
                "jwt_authorities": bundle.jwt_authorities.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(),
                "refresh_hint_seconds": bundle.refresh_hint_seconds,
            })
        },
    );
}

/// A count: `<n>` for people, `{"<key>": <n>}` for scripts.
pub(crate) fn count(format: Format, key: &str, count: u64) {
    match format {
        Format::Text => println!("{count}"),
        Format::Json => print_json(&json!({ key: count })),
    }
}

//! `sigil-server entry ...`: registration entries, one from flags or many from a JSON file (the
//! shape SPIRE's `entry create -data` takes), written through the batch API, and lists fetched a
//! page at a time.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{
    BatchCreateEntriesRequest, BatchEntriesResponse, BatchUpdateEntriesRequest,
    CountEntriesRequest, CreateEntryRequest, EntryId, EntryResult, ListEntriesRequest,
    UpdateEntryRequest,
};
use sigil_proto::common;
use sigil_server::api::admin::MAX_BATCH;
use sigil_server::config::parse_ttl;
use tonic::transport::Channel;

use crate::admin::{answer, selector_flags};
use crate::output::{self, Format, ListPrinter};

/// The largest `--data` file read (a 100 000-entry file in SPIRE's shape is about 30 MiB).
const MAX_DATA_FILE: u64 = 256 << 20;

/// Flags shared by `entry create` and `entry update`.
#[derive(Debug, Args)]
pub(crate) struct EntryFields {
    /// The SPIFFE ID workloads matching the entry receive.
    #[arg(long, required = false, required_unless_present = "data")]
    spiffe_id: String,
    /// The agent (or node alias) whose workloads may receive it.
    #[arg(long, required = false, required_unless_present = "data")]
    parent_id: String,
    /// A selector, type:value (repeat for several; all must match).
    #[arg(long = "selector", required = false, required_unless_present = "data")]
    selectors: Vec<String>,
    /// X509-SVID lifetime (e.g. 1h); default: the server's.
    #[arg(long, value_parser = parse_ttl)]
    x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime (e.g. 5m); default: the server's.
    #[arg(long, value_parser = parse_ttl)]
    jwt_svid_ttl: Option<Duration>,
    /// A DNS SAN (repeat for several).
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    /// A foreign trust domain whose bundle the workload receives (repeat for several).
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// The workload may use the admin API (over mTLS on the agent API port).
    #[arg(long)]
    admin: bool,
    /// The workload is a downstream CA (refused: Sigil has no nested servers yet).
    #[arg(long)]
    downstream: bool,
    /// A hint for workloads holding several SVIDs.
    #[arg(long, default_value = "")]
    hint: String,
    /// Unix seconds after which the entry no longer applies.
    #[arg(long, default_value_t = 0)]
    expires_at: i64,
}

impl EntryFields {
    fn into_proto(self, id: String) -> anyhow::Result<common::Entry> {
        let selectors = selector_flags(&self.selectors)?;
        let seconds = |ttl: Option<Duration>| {
            ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        Ok(common::Entry {
            id,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors,
            x509_svid_ttl: seconds(self.x509_svid_ttl),
            jwt_svid_ttl: seconds(self.jwt_svid_ttl),
            dns_names: self.dns_names,
            federates_with: self.federates_with,
            admin: self.admin,
            downstream: self.downstream,
            hint: self.hint,
            expires_at: self.expires_at,
            ..common::Entry::default()
        })
    }
}

/// Flags of `entry list` and `entry count`.
#[derive(Debug, Args)]
pub(crate) struct EntryFilterFlags {
    /// Only entries with this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Only entries with this parent.
    #[arg(long)]
    parent_id: Option<String>,
    /// Only entries having this selector (repeat: all of them).
    #[arg(long = "selector")]
    selectors: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum EntryCommand {
    /// Creates a registration entry from flags, or every entry of a JSON file (`--data`).
    Create {
        /// A JSON file of entries, `{"entries": [...]}` as SPIRE's `entry create -data` takes
        /// (`-` reads standard input); each entry's result is printed.
        #[arg(long, conflicts_with = "spiffe_id")]
        data: Option<String>,
        #[command(flatten)]
        fields: Option<EntryFields>,
    },
    /// Replaces a registration entry (every field is set anew), or every entry of a JSON file
    /// (`--data`, each with its `id`).
    Update {
        /// The entry to replace.
        #[arg(long, required = false, required_unless_present = "data")]
        id: Option<String>,
        /// A JSON file of entries with their ids (`-` reads standard input).
        #[arg(long, conflicts_with_all = ["id", "spiffe_id"])]
        data: Option<String>,
        #[command(flatten)]
        fields: Option<EntryFields>,
    },
    /// Deletes a registration entry.
    Delete {
        /// The entry to delete.
        #[arg(long)]
        id: String,
    },
    /// Shows one registration entry.
    Show {
        /// The entry to show.
        #[arg(long)]
        id: String,
    },
    /// Lists registration entries (fetched and printed a page at a time).
    List(EntryFilterFlags),
    /// Counts registration entries.
    Count(EntryFilterFlags),
}

/// Runs one `entry` command.
pub(crate) async fn run(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: EntryCommand,
) -> anyhow::Result<()> {
    match command {
        EntryCommand::Create {
            data: Some(path), ..
        } => write_file(client, format, &path, true).await?,
        EntryCommand::Create {
            fields: Some(fields),
            ..
        } => {
            let entry = fields.into_proto(String::new())?;
            let created =
                answer(client.create_entry(CreateEntryRequest { entry: Some(entry) })).await?;
            output::entries(format, &[created]);
        }
        EntryCommand::Create { .. } => {
            bail!("give --spiffe-id, --parent-id and --selector, or --data FILE")
        }
        EntryCommand::Update {
            data: Some(path), ..
        } => write_file(client, format, &path, false).await?,
        EntryCommand::Update {
            id: Some(id),
            fields: Some(fields),
            ..
        } => {
            let entry = fields.into_proto(id)?;
            let updated =
                answer(client.update_entry(UpdateEntryRequest { entry: Some(entry) })).await?;
            output::entries(format, &[updated]);
        }
        EntryCommand::Update { .. } => {
            bail!("give --id with --spiffe-id, --parent-id and --selector, or --data FILE")
        }
        EntryCommand::Delete { id } => {
            let deleted = answer(client.delete_entry(EntryId { id })).await?;
            output::entries(format, &[deleted]);
        }
        EntryCommand::Show { id } => {
            let entry = answer(client.get_entry(EntryId { id })).await?;
            output::entries(format, &[entry]);
        }
        EntryCommand::List(filter) => {
            let selectors = selector_flags(&filter.selectors)?;
            let mut printer = ListPrinter::new(format, "entries", "No entries found");
            let mut page_token = String::new();
            loop {
                let page = answer(client.list_entries(ListEntriesRequest {
                    spiffe_id: filter.spiffe_id.clone().unwrap_or_default(),
                    parent_id: filter.parent_id.clone().unwrap_or_default(),
                    selectors: selectors.clone(),
                    page_size: 0,
                    page_token,
                }))
                .await?;
                printer.entries(&page.entries);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            printer.finish();
        }
        EntryCommand::Count(filter) => {
            let count = answer(client.count_entries(CountEntriesRequest {
                spiffe_id: filter.spiffe_id.unwrap_or_default(),
                parent_id: filter.parent_id.unwrap_or_default(),
                selectors: selector_flags(&filter.selectors)?,
            }))
            .await?;
            output::count(format, "entries", count.count);
        }
    }
    Ok(())
}

/// `entry create|update --data PATH`: every entry of the file, sent in batches of
/// [`MAX_BATCH`]; prints each entry's result and fails when any failed.
async fn write_file(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    path: &str,
    create: bool,
) -> anyhow::Result<()> {
    let items = read_data(path)?;
    let mut results: Vec<(usize, Result<common::Entry, String>)> = Vec::new();
    let mut to_send = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match entry_from_json(item, create) {
            Ok(entry) => to_send.push((index, entry)),
            Err(why) => results.push((index, Err(why))),
        }
    }
    for batch in to_send.chunks(MAX_BATCH) {
        let entries: Vec<common::Entry> = batch.iter().map(|(_, entry)| entry.clone()).collect();
        let response: BatchEntriesResponse = if create {
            answer(client.batch_create_entries(BatchCreateEntriesRequest { entries })).await?
        } else {
            answer(client.batch_update_entries(BatchUpdateEntriesRequest { entries })).await?
        };
        if response.results.len() != batch.len() {
            bail!(
                "the server answered {} results for {} entries",
                response.results.len(),
                batch.len()
            );
        }
        for ((index, _), result) in batch.iter().zip(response.results) {
            results.push((*index, outcome(result)));
        }
    }
    results.sort_by_key(|(index, _)| *index);
    let failed = results.iter().filter(|(_, result)| result.is_err()).count();
    print_results(format, &items, &results, create);
    if failed > 0 {
        bail!(
            "{failed} of {} entries failed; the others were {}",
            items.len(),
            if create { "created" } else { "updated" }
        );
    }
    Ok(())
}

fn outcome(result: EntryResult) -> Result<common::Entry, String> {
    match result.entry {
        Some(entry) if result.code == 0 => Ok(entry),
        _ => Err(result.message),
    }
}

/// The entries of a `--data` file (or of standard input for `-`).
fn read_data(path: &str) -> anyhow::Result<Vec<Value>> {
    let mut text = String::new();
    let read = if path == "-" {
        std::io::stdin()
            .take(MAX_DATA_FILE + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_DATA_FILE + 1).read_to_string(&mut text))
    };
    read.with_context(|| format!("cannot read --data {path}"))?;
    if text.len() as u64 > MAX_DATA_FILE {
        bail!(
            "--data {path} is over {} MiB; split it into several files",
            MAX_DATA_FILE >> 20
        );
    }
    let document: Value =
        serde_json::from_str(&text).with_context(|| format!("--data {path} is not JSON"))?;
    match document.get("entries") {
        Some(Value::Array(entries)) => Ok(entries.clone()),
        _ => bail!(
            "--data {path}: expected {{\"entries\": [ ... ]}}, each entry with spiffe_id, parent_id and selectors"
        ),
    }
}

/// One entry of a `--data` file. Accepts SPIRE's names and shapes: `spiffe_id` and `parent_id`
/// as a URI or as `{"trust_domain", "path"}`, `ttl` for `x509_svid_ttl`, `entry_expiry` for
/// `expires_at`; fields Sigil does not have are ignored.
fn entry_from_json(item: &Value, create: bool) -> Result<common::Entry, String> {
    let Value::Object(fields) = item else {
        return Err("is not a JSON object".into());
    };
    let text = |key: &str| -> Result<String, String> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{key} must be a string")),
        }
    };
    let id_field = |key: &str| -> Result<String, String> {
        match fields.get(key) {
            Some(Value::Object(id)) => {
                let trust_domain = id.get("trust_domain").and_then(Value::as_str);
                let path = id.get("path").and_then(Value::as_str).unwrap_or_default();
                trust_domain
                    .map(|td| format!("spiffe://{td}{path}"))
                    .ok_or_else(|| format!("{key} needs a trust_domain"))
            }
            _ => text(key),
        }
    };
    let number = |keys: &[&str]| -> Result<i64, String> {
        for key in keys {
            match fields.get(*key) {
                None | Some(Value::Null) => {}
                Some(value) => {
                    return value
                        .as_i64()
                        .ok_or_else(|| format!("{key} must be a whole number"));
                }
            }
        }
        Ok(0)
    };
    let flag = |key: &str| -> Result<bool, String> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("{key} must be true or false")),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("{key} must be a list of strings"))
                })
                .collect(),
            Some(_) => Err(format!("{key} must be a list of strings")),
        }
    };
    let selectors = match fields.get("selectors") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match (item.get("type"), item.get("value")) {
                (Some(Value::String(kind)), Some(Value::String(value))) => Ok(common::Selector {
                    r#type: kind.clone(),
                    value: value.clone(),
                }),
                _ => Err("each selector needs a string type and value".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("selectors must be a list of {\"type\", \"value\"}".into()),
    };
    let id = text("id").and_then(|id| {
        if id.is_empty() {
            text("entry_id")
        } else {
            Ok(id)
        }
    })?;
    if !create && id.is_empty() {
        return Err("id is required to update an entry".into());
    }
    Ok(common::Entry {
        id: if create { String::new() } else { id },
        spiffe_id: id_field("spiffe_id")?,
        parent_id: id_field("parent_id")?,
        selectors,
        x509_svid_ttl: number(&["x509_svid_ttl", "ttl"])?,
        jwt_svid_ttl: number(&["jwt_svid_ttl"])?,
        dns_names: strings("dns_names")?,
        federates_with: strings("federates_with")?,
        admin: flag("admin")?,
        downstream: flag("downstream")?,
        hint: text("hint")?,
        expires_at: number(&["expires_at", "entry_expiry"])?,
        ..common::Entry::default()
    })
}

/// Each entry's result: for people a line per entry, for scripts `{"results": [...]}`.
fn print_results(
    format: Format,
    items: &[Value],
    results: &[(usize, Result<common::Entry, String>)],
    create: bool,
) {
    let verb = if create { "created" } else { "updated" };
    let named = |index: usize| {
        items
            .get(index)
            .and_then(|item| item.get("spiffe_id"))
            .map(|id| match id {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    };
    match format {
        Format::Text => {
            for (index, result) in results {
                match result {
                    Ok(entry) => println!(
                        "entry {}: {verb} {} ({})",
                        index + 1,
                        entry.id,
                        entry.spiffe_id
                    ),
                    Err(why) => println!("entry {}: failed ({}): {why}", index + 1, named(*index)),
                }
            }
        }
        Format::Json => {
            let results: Vec<Value> = results
                .iter()
                .map(|(index, result)| match result {
                    Ok(entry) => json!({"index": index, "status": "ok", "id": entry.id, "spiffe_id": entry.spiffe_id}),
                    Err(why) => json!({"index": index, "status": "failed", "spiffe_id": named(*index), "error": why}),
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({ "results": results })).unwrap_or_default()
            );
        }
    }
}

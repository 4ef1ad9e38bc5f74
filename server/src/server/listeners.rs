//! The server's listeners: the agent API (with Istio's CA on the same port), the admin socket,
//! the health endpoint and the federation bundle endpoint, each served by a task that ends when
//! the server stops.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sigil_proto::admin::admin_api_server::AdminApiServer;
use sigil_proto::agent::agent_api_server::AgentApiServer;
use sigil_proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use sigil_workload_api::authority::{HeaderLimits, rewrite_authority};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;

use crate::api::admin::{AdminService, admin_workloads_only};
use crate::api::agent::AgentService;
use crate::api::istio::IstioCa;
use crate::api::tls::ServerTls;
use crate::api::{ServerState, health};
use crate::config::ServerConfig;
use crate::datastore::DataStore;
use crate::federation::endpoint::{self, EndpointTls, FileCertificate};
use crate::{Error, Result};

/// Binds the agent API and serves it (and Istio's certificate service, when `kube_client` is
/// given and `[kubernetes] istio_ca` is on) until `stopped`. Returns the bound address.
pub(super) async fn serve_agent_api<D: DataStore>(
    tasks: &mut JoinSet<()>,
    config: &ServerConfig,
    state: &Arc<ServerState<D>>,
    server_tls: &Arc<ServerTls>,
    kube_client: Option<&kube::Client>,
    stopped: &watch::Receiver<bool>,
) -> Result<SocketAddr> {
    // TLS handshakes happen in `ServerTls::accept`; finished connections flow into tonic through
    // a channel, which carries the peer certificates along.
    let agent_listener = TcpListener::bind(config.bind_address).await.map_err(|e| {
        Error::io(
            format!("binding the agent API to {}", config.bind_address),
            e,
        )
    })?;
    let agent_api_address = local_address(&agent_listener)?;
    let (connections, incoming) = mpsc::channel(256);
    tasks.spawn(server_tls.clone().accept(
        agent_listener,
        connections,
        config.agent_api.clone(),
        stopped.clone(),
    ));
    let agent_service = AgentApiServer::new(AgentService::new(state.clone(), &config.agent_api))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    // Istio's certificate service shares the port (and the TLS identity) when enabled.
    let kubernetes = &config.kubernetes;
    let istio_service = kube_client.filter(|_| kubernetes.istio_ca).map(|client| {
        IstioCertificateServiceServer::new(IstioCa::new(
            state.clone(),
            client.clone(),
            kubernetes.istio_ca_audience.clone(),
            kubernetes.istio_max_validity.0,
        ))
        .max_decoding_message_size(config.max_message_bytes)
    });
    // Workloads whose entry has `admin = true` manage entries over mTLS on this port.
    let remote_admin = InterceptedService::new(
        AdminApiServer::new(AdminService::new(state.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        admin_workloads_only(state.clone()),
    );
    let agent_api_limits = config.agent_api.clone();
    // tonic leaves hyper's HTTP/2 stream and reset limits off unless told: every node can reach
    // this port, so each is set.
    let serving = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(agent_api_limits.max_streams_per_connection))
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_header_list_size(Some(16 * 1024))
        .timeout(agent_api_limits.request_timeout.0)
        .add_service(agent_service)
        .add_service(remote_admin)
        .add_optional_service(istio_service)
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), until_stopped(stopped));
    tasks.spawn(logged("the agent API", serving));
    Ok(agent_api_address)
}

/// Binds the admin socket (see [`bind_admin_socket`]) and serves the admin API on it until
/// `stopped`. Returns the socket's path.
pub(super) async fn serve_admin_api<D: DataStore>(
    tasks: &mut JoinSet<()>,
    config: &ServerConfig,
    state: &Arc<ServerState<D>>,
    stopped: &watch::Receiver<bool>,
) -> Result<PathBuf> {
    let admin_socket = config.admin_socket_path();
    let admin_listener = bind_admin_socket(&admin_socket).await?;
    let admin_service = AdminApiServer::new(AdminService::new(state.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let limits = HeaderLimits::default();
    let serving = tonic::transport::Server::builder()
        .http2_max_header_list_size(u32::try_from(limits.max_header_list_size).unwrap_or(u32::MAX))
        .add_service(admin_service)
        .serve_with_incoming_shutdown(
            // grpcio and grpc-go send the socket path as `:authority`, which the HTTP/2 server
            // refuses; the rewriter makes it `localhost` (as on the agent's Workload API socket).
            UnixListenerStream::new(admin_listener)
                .map_ok(move |stream| rewrite_authority(stream, limits)),
            until_stopped(stopped),
        );
    tasks.spawn(logged("the admin API", serving));
    Ok(admin_socket)
}

/// Binds `/live`, `/ready` and `/metrics` and serves them until `stopped`. Returns the bound
/// address.
pub(super) async fn serve_health<D: DataStore>(
    tasks: &mut JoinSet<()>,
    config: &ServerConfig,
    state: &Arc<ServerState<D>>,
    stopped: &watch::Receiver<bool>,
) -> Result<SocketAddr> {
    let health_listener = TcpListener::bind(config.health_address)
        .await
        .map_err(|e| {
            Error::io(
                format!("binding the health endpoint to {}", config.health_address),
                e,
            )
        })?;
    let health_address = local_address(&health_listener)?;
    tasks.spawn(sigil_core::health::serve(
        health_listener,
        health::router(state.clone()),
        stopped.clone(),
    ));
    Ok(health_address)
}

/// Binds the federation bundle endpoint when `[federation] bundle_endpoint_address` is set and
/// serves the own bundle there (`https_spiffe` with the server SVID, or `https_web` with the
/// configured certificate files). Returns the bound address, if any.
pub(super) async fn serve_bundle_endpoint<D: DataStore>(
    tasks: &mut JoinSet<()>,
    config: &ServerConfig,
    state: &Arc<ServerState<D>>,
    server_tls: &Arc<ServerTls>,
    stopped: &watch::Receiver<bool>,
) -> Result<Option<SocketAddr>> {
    let Some(address) = config.federation.bundle_endpoint_address else {
        return Ok(None);
    };
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| Error::io(format!("binding the bundle endpoint to {address}"), e))?;
    let bound = local_address(&listener)?;
    let tls = match (
        config.federation.bundle_endpoint_profile.as_str(),
        &config.federation.bundle_endpoint_cert_file,
        &config.federation.bundle_endpoint_key_file,
    ) {
        ("https_web", Some(cert), Some(key)) => {
            EndpointTls::Web(FileCertificate::load(cert.clone(), key.clone())?)
        }
        _ => EndpointTls::Spiffe(server_tls.clone()),
    };
    let bundles = state.bundles.clone();
    let ca = state.ca.clone();
    let bundle = Arc::new(move || bundles.own().unwrap_or_else(|| ca.bundle()));
    tasks.spawn(endpoint::serve(listener, tls, bundle, stopped.clone()));
    tracing::info!(address = %bound, profile = %config.federation.bundle_endpoint_profile, "bundle endpoint listening");
    Ok(Some(bound))
}

/// Resolves once `stopped` turns true (or its sender is gone): a listener's shutdown signal.
fn until_stopped(stopped: &watch::Receiver<bool>) -> impl Future<Output = ()> + use<> {
    let mut stopped = stopped.clone();
    async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    }
}

/// Runs a gRPC server to its end, logging why when it fails: `what` names it in the log.
async fn logged(
    what: &'static str,
    serving: impl Future<Output = std::result::Result<(), tonic::transport::Error>>,
) {
    if let Err(e) = serving.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

/// The address `listener` is bound to (the port the OS chose for port 0).
fn local_address(listener: &TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|e| Error::io("reading a listener's address", e))
}

/// Creates the data directory, readable by the server's user only.
pub(super) fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating data directory {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("restricting data directory {}", dir.display()), e))
}

/// Binds the admin socket with owner-only permissions, replacing a stale file left by a crashed
/// server but never a live one.
///
/// The socket never appears at its path with a wider mode than 0600: binding it there and then
/// restricting it would leave a moment in which any local user could connect (and the umask is
/// process-wide, so it is not changed for this). Instead the socket is bound in a private
/// directory (created 0700, next to the path so that both are on one filesystem), restricted
/// there where nobody else can reach it, and renamed into place, which also replaces a stale
/// socket atomically.
async fn bind_admin_socket(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};

    let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            parent.to_path_buf()
        }
        None => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::config(
            path,
            "admin_socket must name a socket file, e.g. /run/sigil/admin.sock",
        )
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(found) if found.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(Error::Unavailable(format!(
                    "another server is listening on the admin socket {}; stop it or set admin_socket",
                    path.display()
                )));
            }
        }
        Ok(_) => {
            return Err(Error::io(
                format!("the admin socket path {}", path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "something other than a socket is there; remove it or set admin_socket",
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("checking {}", path.display()), e)),
    }
    // A fresh name: a leftover of a crash, or a name someone else took first, is skipped.
    let mut staging = None;
    for attempt in 0..16 {
        let candidate = parent.join(format!(
            ".{}.{}.{attempt}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => {
                staging = Some(candidate);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("creating a private directory in {}", parent.display()),
                    e,
                ));
            }
        }
    }
    let staging = staging.ok_or_else(|| {
        Error::io(
            format!("creating a private directory in {}", parent.display()),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "16 candidate names are taken; remove the stale .<socket>.* directories",
            ),
        )
    })?;
    let staged = staging.join(name);
    let bound = async {
        let listener = UnixListener::bind(&staged)
            .map_err(|e| Error::io(format!("binding the admin socket {}", path.display()), e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            Error::io(
                format!("restricting the admin socket {}", path.display()),
                e,
            )
        })?;
        std::fs::rename(&staged, path).map_err(|e| {
            Error::io(
                format!("moving the admin socket into place at {}", path.display()),
                e,
            )
        })?;
        Ok(listener)
    }
    .await;
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    bound
}

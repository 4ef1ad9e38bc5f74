//! Assembles a running server from its configuration: datastore, CA, authorizations, the three
//! listeners and the background tasks, and takes it down again in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sigil_core::clock::SharedClock;
use sigil_proto::admin::admin_api_server::AdminApiServer;
use sigil_proto::agent::agent_api_server::AgentApiServer;
use sigil_proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use crate::api::admin::AdminService;
use crate::api::agent::AgentService;
use crate::api::istio::IstioCa;
use crate::api::tls::ServerTls;
use crate::api::{ServerState, health};
use crate::attest::{JoinTokenAttestor, NodeAttestor, PsatAttestor};
use crate::authz::Authorizations;
use crate::ca::{Ca, DiskKeyManager, IssuanceRecorder, Issuer, KeyManager, MemoryKeyManager};
use crate::config::{KeyManagerKind, ServerConfig};
use crate::datastore::{DataStore, SqlDataStore};
use crate::federation::endpoint::{self, EndpointTls, FileCertificate};
use crate::federation::{Federation, RefreshBounds, RelationshipInput, check_foreign_bundle};
use crate::k8s::{self, AutoIdentitySettings, PodIdentities};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How often the CA checks whether an authority is due for rotation and the server SVID for
/// renewal.
const ROTATION_CHECK: Duration = Duration::from_secs(30);
/// How often expired records are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// A started server. Drop it or call [`RunningServer::shutdown`] to stop.
#[derive(Debug)]
pub struct RunningServer {
    /// Where the agent API listens.
    pub agent_api_address: SocketAddr,
    /// Where `/live`, `/ready` and `/metrics` answer.
    pub health_address: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Where the bundle endpoint listens, when it is on.
    pub bundle_endpoint_address: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    recorder_task: tokio::task::JoinHandle<()>,
    state: Arc<ServerState<SqlDataStore>>,
}

/// Starts a server from `config` (read from `source`, named in errors).
pub async fn start(
    config: ServerConfig,
    source: &Path,
    clock: SharedClock,
) -> Result<RunningServer> {
    config.validate(source)?;
    let trust_domain = config.trust_domain(source)?;
    create_private_dir(&config.data_dir)?;

    let datastore = Arc::new(SqlDataStore::connect(&config.datastore_url(), clock.clone()).await?);
    crate::authz::reserved::check_stored_rows(
        datastore.as_ref(),
        &trust_domain,
        &config.server_dns_names,
    )
    .await?;
    let keys: Arc<dyn KeyManager> = match config.ca.key_manager {
        KeyManagerKind::Disk => Arc::new(DiskKeyManager::new(config.data_dir.join("keys"))?),
        KeyManagerKind::Memory => Arc::new(MemoryKeyManager::default()),
    };
    let ca = Arc::new(
        Ca::load(
            config.ca_settings(trust_domain.clone())?,
            keys,
            clock.clone(),
            datastore.as_ref(),
        )
        .await?,
    );
    let kubernetes = &config.kubernetes;
    let kube_client = if kubernetes.enabled() {
        Some(kubernetes.client().await?)
    } else {
        None
    };
    let mut authz =
        Authorizations::load(trust_domain.clone(), clock.clone(), datastore.as_ref()).await?;
    let pod_identities = match (&kube_client, kubernetes.auto_identity) {
        (Some(_), true) => {
            let pods = Arc::new(PodIdentities::new(AutoIdentitySettings {
                trust_domain: trust_domain.clone(),
                template: kubernetes.identity_template.clone(),
                include: kubernetes.namespaces_include.clone(),
                exclude: kubernetes.namespaces_exclude.clone(),
                max_staleness: kubernetes.max_staleness.0,
            }));
            authz = authz.with_pod_identities(pods.clone());
            Some(pods)
        }
        _ => None,
    };
    let authz = Arc::new(authz);
    let (recorder, recorder_task) = IssuanceRecorder::start(datastore.clone());

    let (stop, stopped) = watch::channel(false);
    let mut attestors: HashMap<&'static str, Arc<dyn NodeAttestor>> = HashMap::new();
    let join_token = JoinTokenAttestor::new(datastore.clone(), trust_domain.clone(), clock.clone());
    attestors.insert(join_token.name(), Arc::new(join_token));
    if let (Some(client), Some(cluster)) = (&kube_client, &kubernetes.cluster) {
        let psat = PsatAttestor::new(
            client.clone(),
            trust_domain.clone(),
            cluster.clone(),
            kubernetes.psat_audience.clone(),
            kubernetes.allowed_service_accounts.clone(),
        );
        attestors.insert(psat.name(), Arc::new(psat));
    }

    let metrics = Arc::new(Metrics::default());
    let federation = Arc::new(Federation::new(
        trust_domain.clone(),
        RefreshBounds {
            min: config.federation.min_refresh.0,
            max: config.federation.max_refresh.0,
        },
        clock.clone(),
        metrics.clone(),
        authz.clone(),
    ));
    load_static_relationships(&config, source, &trust_domain, datastore.as_ref(), &clock).await?;
    let state = Arc::new(ServerState {
        datastore: datastore.clone(),
        ca: ca.clone(),
        authz,
        issuer: Issuer::new(ca.clone(), recorder, metrics.clone()),
        metrics,
        federation: federation.clone(),
        ca_changed: Arc::new(tokio::sync::Notify::new()),
        clock,
        attestors,
        agent_svid_ttl: config.ca.agent_svid_ttl.0,
        join_token_ttl: config.join_token.default_ttl.0,
        server_dns_names: config.server_dns_names.clone(),
        stopping: stopped.clone(),
    });
    let server_tls = Arc::new(ServerTls::new(&state)?);

    let mut tasks = JoinSet::new();

    // The agent API: TLS handshakes happen in `ServerTls::accept`; finished connections flow into
    // tonic through a channel, which carries the peer certificates along.
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
    let agent_service = AgentApiServer::new(AgentService::new(state.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    // Istio's certificate service shares the port (and the TLS identity) when enabled.
    let istio_service = match (&kube_client, kubernetes.istio_ca) {
        (Some(client), true) => Some(
            IstioCertificateServiceServer::new(IstioCa::new(
                state.clone(),
                client.clone(),
                kubernetes.istio_ca_audience.clone(),
                kubernetes.istio_max_validity.0,
            ))
            .max_decoding_message_size(config.max_message_bytes),
        ),
        _ => None,
    };
    let mut agent_stop = stopped.clone();
    let agent_api_limits = config.agent_api.clone();
    tasks.spawn(async move {
        // tonic leaves hyper's HTTP/2 stream and reset limits off unless told: every node can
        // reach this port, so each is set.
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(agent_api_limits.max_streams_per_connection))
            .http2_max_local_error_reset_streams(Some(1024))
            .http2_max_pending_accept_reset_streams(Some(20))
            .http2_max_header_list_size(Some(16 * 1024))
            .timeout(agent_api_limits.request_timeout.0)
            .add_service(agent_service)
            .add_optional_service(istio_service)
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                let _ = agent_stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the agent API stopped");
        }
    });

    let admin_socket = config.admin_socket_path();
    let admin_listener = bind_admin_socket(&admin_socket).await?;
    let admin_service = AdminApiServer::new(AdminService::new(state.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let mut admin_stop = stopped.clone();
    tasks.spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(admin_service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), async move {
                let _ = admin_stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the admin API stopped");
        }
    });

    let health_listener = TcpListener::bind(config.health_address)
        .await
        .map_err(|e| {
            Error::io(
                format!("binding the health endpoint to {}", config.health_address),
                e,
            )
        })?;
    let health_address = local_address(&health_listener)?;
    let mut health_stop = stopped.clone();
    let router = health::router(state.clone());
    tasks.spawn(async move {
        let result = axum::serve(health_listener, router)
            .with_graceful_shutdown(async move {
                let _ = health_stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the health endpoint stopped");
        }
    });

    let bundle_endpoint_address = match config.federation.bundle_endpoint_address {
        Some(address) => {
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
            let authz = state.authz.clone();
            let ca = state.ca.clone();
            let bundle = Arc::new(move || authz.bundle().unwrap_or_else(|| ca.bundle()));
            tasks.spawn(endpoint::serve(listener, tls, bundle, stopped.clone()));
            tracing::info!(address = %bound, profile = %config.federation.bundle_endpoint_profile, "bundle endpoint listening");
            Some(bound)
        }
        None => None,
    };
    tasks.spawn(federation.run(datastore.clone(), stopped.clone()));

    tasks.spawn(follow_changes(
        state.clone(),
        config.change_poll_interval.0,
        stopped.clone(),
    ));
    if let (Some(client), Some(pods)) = (&kube_client, pod_identities) {
        tasks.spawn(k8s::watch_pods(
            client.clone(),
            pods.clone(),
            stopped.clone(),
        ));
        tasks.spawn(follow_pods(pods, state.authz.clone(), stopped.clone()));
    }
    if let (Some(client), Some(name)) = (&kube_client, &kubernetes.bundle_configmap) {
        tasks.spawn(k8s::publish_bundle(
            client.clone(),
            kubernetes.bundle_configmap_namespace.clone(),
            name.clone(),
            state.authz.clone(),
            stopped.clone(),
        ));
    }
    if let Some(client) = kube_client
        .as_ref()
        .filter(|_| kubernetes.istio_root_cert_configmaps)
    {
        tasks.spawn(k8s::publish_istio_root_certs(
            client.clone(),
            state.authz.clone(),
            stopped.clone(),
        ));
    }
    tasks.spawn(maintain_ca(state.clone(), server_tls, stopped.clone()));
    tasks.spawn(prune(
        state.clone(),
        config.issuance_record.retention.0,
        stopped,
    ));

    tracing::info!(
        trust_domain = %trust_domain,
        agent_api = %agent_api_address,
        health = %health_address,
        admin_socket = %admin_socket.display(),
        "sigil-server is running"
    );
    Ok(RunningServer {
        agent_api_address,
        health_address,
        admin_socket,
        bundle_endpoint_address,
        stop,
        tasks,
        recorder_task,
        state,
    })
}

/// Writes the relationships of `[[federation.relationships]]` into the datastore (the file wins
/// over what the admin API set for the same trust domain), with their first bundle when none of
/// that domain is stored yet. A bad relationship or bundle stops start-up with the reason.
async fn load_static_relationships<D: DataStore>(
    config: &ServerConfig,
    source: &Path,
    own: &sigil_core::id::TrustDomain,
    datastore: &D,
    clock: &SharedClock,
) -> Result<()> {
    let bad = |reason: String| Error::Config {
        path: source.to_path_buf(),
        reason,
    };
    let now = clock.unix_now();
    for configured in &config.federation.relationships {
        let input = RelationshipInput {
            trust_domain: configured.trust_domain.clone(),
            bundle_endpoint_url: configured.bundle_endpoint_url.clone(),
            profile: configured.profile.clone(),
            endpoint_spiffe_id: configured.endpoint_spiffe_id.clone(),
        };
        let mut relationship = input
            .validate(own, now)
            .map_err(|e| bad(format!("federation.relationships: {e}")))?;
        if let Some(existing) = datastore.get_federation(&relationship.trust_domain).await? {
            relationship.created_at = existing.created_at;
        }
        let td = relationship.trust_domain.clone();
        if let Some(path) = &configured.trust_bundle_path
            && datastore.get_bundle(&td).await?.is_none()
        {
            let document = std::fs::read_to_string(path).map_err(|e| {
                bad(format!(
                    "federation.relationships ({td}): cannot read trust_bundle_path {}: {e}",
                    path.display()
                ))
            })?;
            let bundle = sigil_core::bundle::TrustBundle::from_spiffe_json(td.clone(), &document)
                .map_err(|e| {
                bad(format!(
                    "federation.relationships ({td}): {} is not a SPIFFE bundle: {e}",
                    path.display()
                ))
            })?;
            check_foreign_bundle(&td, &bundle, None).map_err(|reason| {
                bad(format!(
                    "federation.relationships ({td}): {}: {reason}",
                    path.display()
                ))
            })?;
            datastore.put_bundle(&bundle).await?;
        }
        datastore.put_federation(&relationship).await?;
    }
    Ok(())
}

impl RunningServer {
    /// Stops accepting work, lets streams end, writes every pending issuance record, and closes
    /// the datastore.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within 10 s; closing them");
            self.tasks.abort_all();
        }
        let datastore = self.state.datastore.clone();
        // The recorder task ends once the last recorder clone is gone: the state holds it.
        drop(self.state);
        let _ = self.recorder_task.await;
        datastore.close().await;
        let _ = std::fs::remove_file(&self.admin_socket);
        tracing::info!("sigil-server stopped");
        Ok(())
    }
}

fn local_address(listener: &TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|e| Error::io("reading a listener's address", e))
}

fn create_private_dir(dir: &Path) -> Result<()> {
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
    let name = path.file_name().ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        reason: "admin_socket must name a socket file, e.g. /run/sigil/admin.sock".into(),
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

/// Follows the change feed for writes this process did not make (other servers sharing the
/// database, or an operator's direct change).
async fn follow_changes<D: DataStore>(
    state: Arc<ServerState<D>>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = state.authz.catch_up(state.datastore.as_ref()).await {
            tracing::warn!(error = %e, "cannot read the change feed; serving from the cache and retrying");
        }
    }
}

/// Wakes the sync streams whenever the pods behind automatic identities change.
async fn follow_pods(
    pods: Arc<PodIdentities>,
    authz: Arc<Authorizations>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut changes = pods.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        authz.bump();
    }
}

async fn maintain_ca<D: DataStore>(
    state: Arc<ServerState<D>>,
    tls: Arc<ServerTls>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ROTATION_CHECK) => {}
            () = state.ca_changed.notified() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let tainted = state.ca.tainted();
        match state.ca.rotate_if_due(state.datastore.as_ref()).await {
            Ok(changed) if changed || state.ca.tainted() != tainted => {
                if let Err(e) = state.authz.catch_up(state.datastore.as_ref()).await {
                    tracing::warn!(error = %e, "cannot read the change feed after a bundle change");
                }
                // Sync streams resend the tainted set (another server may have changed it).
                state.authz.bump();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "CA rotation check failed; retrying"),
        }
        if let Err(e) = tls.refresh_if_due(&state) {
            tracing::error!(error = %e, "cannot renew the server SVID; retrying");
        }
    }
}

async fn prune<D: DataStore>(
    state: Arc<ServerState<D>>,
    retention: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX / 2);
    loop {
        tokio::select! {
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let now = state.clock.unix_now();
        let datastore = state.datastore.as_ref();
        let outcome = async {
            let svids = datastore.prune_issued_svids(now - retention).await?;
            let tokens = datastore.prune_join_tokens(now - 24 * 3600).await?;
            let events = datastore.prune_events(now - 24 * 3600).await?;
            Ok::<_, Error>((svids, tokens, events))
        }
        .await;
        match outcome {
            Ok((svids, tokens, events)) => {
                tracing::debug!(svids, tokens, events, "pruned expired records")
            }
            Err(e) => tracing::warn!(error = %e, "pruning failed; retrying later"),
        }
    }
}

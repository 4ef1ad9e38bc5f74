//! Assembles a running server from its configuration: datastore, CA, authorizations, the
//! listeners (`server/listeners.rs`) and the background tasks (`server/tasks.rs`), and takes it
//! down again in order.

mod instance;
mod listeners;
mod tasks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sigil_core::clock::SharedClock;
use sigil_core::id::TrustDomain;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::ServerState;
use crate::api::tls::ServerTls;
use crate::attest::{JoinTokenAttestor, NodeAttestor, PsatAttestor};
use crate::authz::AuthzSources;
use crate::ca::{
    Ca, DiskKeyManager, IssuanceRecorder, Issuer, KeyManager, MemoryKeyManager, RecorderSettings,
};
use crate::config::{KeyManagerKind, ServerConfig};
use crate::datastore::{DataStore, SqlDataStore};
use crate::federation::{Federation, RefreshBounds, check_foreign_bundle};
use crate::feed::Feed;
use crate::k8s::{self, AutoIdentitySettings, PodIdentities};
use crate::metrics::Metrics;
use crate::{Error, Result};

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
    listeners::create_private_dir(&config.data_dir)?;

    let datastore = Arc::new(
        SqlDataStore::connect_within(
            &config.datastore_url(),
            clock.clone(),
            config.datastore.timeout.0,
        )
        .await?,
    );
    crate::authz::reserved::check_stored_rows(
        datastore.as_ref(),
        &trust_domain,
        &config.server_dns_names,
    )
    .await?;
    let ca = Arc::new(load_ca(&config, &trust_domain, &clock, datastore.as_ref()).await?);
    if config.datastore_url().starts_with("sqlite:") {
        warn_of_other_servers(ca.owner(), datastore.as_ref()).await?;
    }
    let kube_client = if config.kubernetes.enabled() {
        Some(config.kubernetes.client().await?)
    } else {
        None
    };
    let pod_identities = pod_identities(&config, &trust_domain, kube_client.as_ref());
    let feed = Arc::new(
        Feed::load(
            AuthzSources {
                trust_domain: trust_domain.clone(),
                clock: clock.clone(),
                pods: pod_identities.clone(),
            },
            datastore.as_ref(),
        )
        .await?,
    );
    let (stop, stopped) = watch::channel(false);
    let attestors = node_attestors(
        &config,
        &trust_domain,
        &clock,
        kube_client.as_ref(),
        &datastore,
    );

    let metrics = Arc::new(Metrics::default());
    let (recorder, recorder_task) = IssuanceRecorder::start(
        datastore.clone(),
        &RecorderSettings {
            data_dir: config.data_dir.clone(),
            spool_max_bytes: config.issuance_record.spool_max_mib * 1024 * 1024,
            write_timeout: config.datastore.timeout.0,
        },
        metrics.clone(),
    )?;
    let federation = Arc::new(Federation::new(
        trust_domain.clone(),
        RefreshBounds {
            min: config.federation.min_refresh.0,
            max: config.federation.max_refresh.0,
        },
        clock.clone(),
        metrics.clone(),
        feed.clone(),
    ));
    load_static_relationships(&config, source, &trust_domain, datastore.as_ref(), &clock).await?;
    let state = Arc::new(ServerState {
        datastore: datastore.clone(),
        ca: ca.clone(),
        authz: feed.authz().clone(),
        bundles: feed.bundles().clone(),
        feed,
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
    let server_tls = Arc::new(ServerTls::new(&state).await?);

    let mut tasks = JoinSet::new();
    let agent_api_address = listeners::serve_agent_api(
        &mut tasks,
        &config,
        &state,
        &server_tls,
        kube_client.as_ref(),
        &stopped,
    )
    .await?;
    let admin_socket = listeners::serve_admin_api(&mut tasks, &config, &state, &stopped).await?;
    let health_address = listeners::serve_health(&mut tasks, &config, &state, &stopped).await?;
    let bundle_endpoint_address =
        listeners::serve_bundle_endpoint(&mut tasks, &config, &state, &server_tls, &stopped)
            .await?;
    tasks.spawn(federation.run(datastore, stopped.clone()));
    spawn_background_tasks(
        &mut tasks,
        &config,
        &state,
        server_tls,
        kube_client.as_ref(),
        pod_identities,
        stopped,
    );

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

/// The CA, with its keys on disk (`<data_dir>/keys`) or in memory as `[ca] key_manager` says.
async fn load_ca<D: DataStore>(
    config: &ServerConfig,
    trust_domain: &TrustDomain,
    clock: &SharedClock,
    datastore: &D,
) -> Result<Ca> {
    let keys: Arc<dyn KeyManager> = match config.ca.key_manager {
        KeyManagerKind::Disk => Arc::new(DiskKeyManager::new(config.data_dir.join("keys"))?),
        KeyManagerKind::Memory => Arc::new(MemoryKeyManager::default()),
    };
    Ca::load(
        config.ca_settings(trust_domain.clone())?,
        instance::load_or_create(&config.data_dir)?,
        keys,
        clock.clone(),
        datastore,
    )
    .await
}

/// SQLite serves one server: several on one file would each see the others' writes only by
/// polling, and one file cannot be shared across machines. A journal holding another instance's
/// authorities means another server uses (or used) this file; say so, since nothing else would.
async fn warn_of_other_servers<D: DataStore>(own: &str, datastore: &D) -> Result<()> {
    let mut others: Vec<String> = datastore
        .list_authorities()
        .await?
        .into_iter()
        .map(|authority| authority.owner)
        .filter(|owner| !owner.is_empty() && owner != own)
        .collect();
    others.sort();
    others.dedup();
    if !others.is_empty() {
        tracing::warn!(
            others = %others.join(","),
            "this SQLite datastore holds the CA of another server instance: SQLite serves one server at a time; run several servers of a trust domain on Postgres"
        );
    }
    Ok(())
}

/// The automatic ServiceAccount identities, when `[kubernetes] auto_identity` is on.
fn pod_identities(
    config: &ServerConfig,
    trust_domain: &TrustDomain,
    kube_client: Option<&kube::Client>,
) -> Option<Arc<PodIdentities>> {
    let kubernetes = &config.kubernetes;
    kube_client.filter(|_| kubernetes.auto_identity)?;
    Some(Arc::new(PodIdentities::new(AutoIdentitySettings {
        trust_domain: trust_domain.clone(),
        template: kubernetes.identity_template.clone(),
        include: kubernetes.namespaces_include.clone(),
        exclude: kubernetes.namespaces_exclude.clone(),
        max_staleness: kubernetes.max_staleness.0,
    })))
}

/// The node attestors by name: join tokens always, `k8s_psat` when a cluster is configured.
fn node_attestors(
    config: &ServerConfig,
    trust_domain: &TrustDomain,
    clock: &SharedClock,
    kube_client: Option<&kube::Client>,
    datastore: &Arc<SqlDataStore>,
) -> HashMap<&'static str, Arc<dyn NodeAttestor>> {
    let mut attestors: HashMap<&'static str, Arc<dyn NodeAttestor>> = HashMap::new();
    let join_token = JoinTokenAttestor::new(datastore.clone(), trust_domain.clone(), clock.clone());
    attestors.insert(join_token.name(), Arc::new(join_token));
    let kubernetes = &config.kubernetes;
    if let (Some(client), Some(cluster)) = (kube_client, &kubernetes.cluster) {
        let psat = PsatAttestor::new(
            client.clone(),
            trust_domain.clone(),
            cluster.clone(),
            kubernetes.psat_audience.clone(),
            kubernetes.allowed_service_accounts.clone(),
        );
        attestors.insert(psat.name(), Arc::new(psat));
    }
    attestors
}

/// Starts the tasks that run beside the listeners: the change feed, the pod watch and the
/// ConfigMap publishers (with Kubernetes), CA maintenance and pruning.
fn spawn_background_tasks<D: DataStore>(
    tasks: &mut JoinSet<()>,
    config: &ServerConfig,
    state: &Arc<ServerState<D>>,
    server_tls: Arc<ServerTls>,
    kube_client: Option<&kube::Client>,
    pod_identities: Option<Arc<PodIdentities>>,
    stopped: watch::Receiver<bool>,
) {
    tasks.spawn(tasks::follow_changes(
        state.clone(),
        config.change_poll_interval.0,
        stopped.clone(),
    ));
    let kubernetes = &config.kubernetes;
    if let (Some(client), Some(pods)) = (kube_client, pod_identities) {
        tasks.spawn(k8s::watch_pods(
            client.clone(),
            pods.clone(),
            stopped.clone(),
        ));
        tasks.spawn(tasks::follow_pods(
            pods,
            state.feed.clone(),
            stopped.clone(),
        ));
    }
    if let (Some(client), Some(name)) = (kube_client, &kubernetes.bundle_configmap) {
        tasks.spawn(k8s::publish_bundle(
            client.clone(),
            kubernetes.bundle_configmap_namespace.clone(),
            name.clone(),
            state.bundles.clone(),
            stopped.clone(),
        ));
    }
    if let Some(client) = kube_client.filter(|_| kubernetes.istio_root_cert_configmaps) {
        tasks.spawn(k8s::publish_istio_root_certs(
            client.clone(),
            state.bundles.clone(),
            stopped.clone(),
        ));
    }
    tasks.spawn(tasks::maintain_ca(
        state.clone(),
        server_tls,
        stopped.clone(),
    ));
    tasks.spawn(tasks::prune(
        state.clone(),
        config.issuance_record.retention.0,
        stopped,
    ));
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
    let bad = |reason: String| Error::config(source, reason);
    let now = clock.unix_now();
    for configured in &config.federation.relationships {
        let input = configured.input();
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

//! Assembles a running agent: the link to the server, the cache and its signer, the sync stream,
//! the rotation tasks, the Workload API socket and the health endpoint; and stops it in order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sigil_core::clock::SharedClock;
use sigil_core::id::TrustDomain;
use sigil_workload_api::authority::HeaderLimits;
use sigil_workload_api::sds::{Sds, SdsNames};
use sigil_workload_api::server::{WorkloadApi, bind_socket, serve};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::attest::{Startup, WorkloadAttestors};
use crate::cache::{
    Cache, CacheStore, Signer, SignerSettings, keep_cache_on_disk, keep_svids_fresh,
};
use crate::config::{AgentConfig, NodeAttestorKind};
use crate::health::{Health, router};
use crate::metrics::Metrics;
use crate::node::{
    Bootstrap, IdentityStore, LinkSettings, NodeAttestation, ServerLink, keep_agent_svid_fresh,
};
use crate::workload::AgentSource;
use crate::{Error, Result, sync};

/// A started agent.
#[derive(Debug)]
pub struct RunningAgent {
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// Where `/live`, `/ready` and `/metrics` answer.
    pub health_address: SocketAddr,
    /// The agent's SPIFFE ID.
    pub spiffe_id: String,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Starts an agent from `config` (read from `source`, named in errors).
pub async fn start(config: AgentConfig, source: &Path, clock: SharedClock) -> Result<RunningAgent> {
    config.validate(source)?;
    let trust_domain = config.trust_domain(source)?;
    let metrics = Arc::new(Metrics::default());
    let (link, bundle) =
        ServerLink::establish(link_settings(&config, trust_domain.clone()), &clock).await?;
    let link = Arc::new(link);
    let spiffe_id = link.identity().spiffe_id.to_string();
    let cache = Arc::new(Cache::new(
        trust_domain,
        clock.clone(),
        metrics.clone(),
        Some(bundle),
    ));
    let cache_store = CacheStore::new(IdentityStore::open(&config.data_dir)?);
    load_cache(&config, &cache_store, &cache)?;
    let signer = Signer::start(
        link.clone(),
        cache.clone(),
        metrics.clone(),
        SignerSettings {
            max_batch: config.max_batch,
            window: config.batch_window.0,
        },
    );

    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    spawn_upkeep(
        &mut tasks, &link, &cache, &signer, &metrics, &clock, &stopping,
    );
    if config.persist_svid_cache {
        tasks.spawn(keep_cache_on_disk(
            cache.clone(),
            cache_store,
            stopping.clone(),
        ));
    }

    let attestors = WorkloadAttestors::from_config(Startup {
        config: &config,
        source,
        tasks: &mut tasks,
        stopping: &stopping,
    })
    .await?;
    let source = Arc::new(AgentSource::new(
        attestors,
        cache.clone(),
        signer,
        link.clone(),
        metrics.clone(),
    ));
    let socket_path = config.socket();
    serve_workload_api(&config, &socket_path, source, &mut tasks, &stopping).await?;
    let health = Health {
        link,
        cache,
        metrics,
    };
    let health_address = serve_health(config.health_address, health, &mut tasks, &stopping).await?;

    tracing::info!(
        agent = %spiffe_id,
        socket = %socket_path.display(),
        endpoint = %sigil_workload_api::endpoint_address(&socket_path),
        health = %health_address,
        "sigil-agent is running; point workloads at SPIFFE_ENDPOINT_SOCKET={}",
        sigil_workload_api::endpoint_address(&socket_path)
    );
    Ok(RunningAgent {
        socket_path,
        health_address,
        spiffe_id,
        stop,
        tasks,
    })
}

/// Loads the stored SVID cache, so the agent serves it until a server answers; or, with
/// `persist_svid_cache = false`, deletes any stored one, so no workload key stays on disk.
fn load_cache(config: &AgentConfig, store: &CacheStore, cache: &Cache) -> Result<()> {
    if !config.persist_svid_cache {
        if store.remove()? {
            tracing::info!(
                "persist_svid_cache is off: deleted the SVID cache stored in the data directory"
            );
        }
        return Ok(());
    }
    if let Some(restored) = store.restore(cache)? {
        tracing::info!(
            svids = restored,
            entries = cache.entry_count(),
            "loaded the stored SVID cache; serving it until a server answers"
        );
    }
    Ok(())
}

/// Spawns the sync stream from the server and the rotation of the workload SVIDs and of the
/// agent's own SVID.
fn spawn_upkeep(
    tasks: &mut JoinSet<()>,
    link: &Arc<ServerLink>,
    cache: &Arc<Cache>,
    signer: &Signer,
    metrics: &Arc<Metrics>,
    clock: &SharedClock,
    stopping: &watch::Receiver<bool>,
) {
    tasks.spawn(sync::follow(
        link.clone(),
        cache.clone(),
        metrics.clone(),
        stopping.clone(),
    ));
    tasks.spawn(keep_svids_fresh(
        cache.clone(),
        signer.clone(),
        metrics.clone(),
        stopping.clone(),
    ));
    tasks.spawn(keep_agent_svid_fresh(
        link.clone(),
        cache.clone(),
        clock.clone(),
        stopping.clone(),
    ));
}

/// The settings of the link to the server: its address, the first-contact trust and how the
/// node attests.
fn link_settings(config: &AgentConfig, trust_domain: TrustDomain) -> LinkSettings {
    let bootstrap = match (&config.trust_bundle_path, config.insecure_bootstrap) {
        (Some(path), _) => Bootstrap::BundleFile(path.clone()),
        (None, true) => Bootstrap::Insecure,
        (None, false) => Bootstrap::None,
    };
    LinkSettings {
        addresses: config.server_address.clone(),
        trust_domain,
        data_dir: config.data_dir.clone(),
        bootstrap,
        attestation: match config.node_attestor {
            NodeAttestorKind::JoinToken => {
                config.join_token.clone().map(NodeAttestation::JoinToken)
            }
            NodeAttestorKind::K8sPsat => Some(NodeAttestation::KubernetesPsat {
                cluster: config.kubernetes.cluster.clone(),
                token_path: config.kubernetes.token_path.clone(),
            }),
        },
    }
}

/// Opens the Workload API socket at `socket_path` and serves the Workload API and SDS on it.
async fn serve_workload_api(
    config: &AgentConfig,
    socket_path: &Path,
    source: Arc<AgentSource>,
    tasks: &mut JoinSet<()>,
    stopping: &watch::Receiver<bool>,
) -> Result<()> {
    let listener = bind_socket(socket_path).await?;
    let names = SdsNames {
        default_svid: config.sds.default_svid_name.clone(),
        own_bundle: config.sds.own_bundle_name.clone(),
        all_bundles: config.sds.all_bundles_name.clone(),
    };
    let sds = Sds::new(source.clone(), names, stopping.clone())
        .with_max_resource_names(config.sds.max_resource_names);
    let api = WorkloadApi::new(source, stopping.clone()).with_proc_root(config.proc_root.clone());
    let limits = HeaderLimits {
        max_header_list_size: config.workload_api.max_header_list_size,
    };
    let serving = stopping.clone();
    tasks.spawn(async move {
        if let Err(e) = serve(listener, api, sds, limits, serving).await {
            tracing::error!(error = %e, "the Workload API stopped");
        }
    });
    Ok(())
}

/// Binds the health endpoint (`/live`, `/ready`, `/metrics`) and serves it; returns the address
/// it listens on.
async fn serve_health(
    address: SocketAddr,
    health: Health,
    tasks: &mut JoinSet<()>,
    stopping: &watch::Receiver<bool>,
) -> Result<SocketAddr> {
    let health_listener = TcpListener::bind(address)
        .await
        .map_err(|e| Error::io(format!("binding the health endpoint to {address}"), e))?;
    let health_address = health_listener
        .local_addr()
        .map_err(|e| Error::io("reading the health address", e))?;
    tasks.spawn(sigil_core::health::serve(
        health_listener,
        router(health),
        stopping.clone(),
    ));
    Ok(health_address)
}

impl RunningAgent {
    /// Ends every stream and task, and removes the socket.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(std::time::Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10 s; aborting them");
            self.tasks.abort_all();
        }
        let _ = std::fs::remove_file(&self.socket_path);
        tracing::info!("sigil-agent stopped");
    }
}

//! Starting the forwarder, and draining it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ForwarderConfig, Inbound, Outbound};
use crate::http::{HttpProxy, RequestChecks};
use crate::identity::{self, IdentityStore};
use crate::metrics::Metrics;
use crate::proxy::{InboundListener, OutboundListener, Shared, Side};
use crate::tls::{ClientVerifier, UpstreamVerifier, client_config, server_config};
use crate::{Error, Result};

/// A running forwarder: its listeners, the Workload API follower and the health endpoint.
#[derive(Debug)]
pub struct Forwarder {
    shutdown: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    drain_timeout: Duration,
    listeners: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    /// The metrics (also served on the health address).
    pub metrics: Arc<Metrics>,
    /// The identity state.
    pub store: Arc<IdentityStore>,
}

impl Forwarder {
    /// Starts the health endpoint and the Workload API follower, waits for the first SVID, then
    /// binds every listener. Logs `sigil-agent forward is running` when it serves.
    pub async fn start(config: ForwarderConfig) -> Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(IdentityStore::new(config.spiffe_id.clone()));
        let (shutdown, stop) = watch::channel(false);
        let mut background = Vec::new();
        if let Some(address) = config.health_address {
            background
                .push(serve_health(address, store.clone(), metrics.clone(), stop.clone()).await?);
        }
        background.push(tokio::spawn(identity::follow(
            store.clone(),
            config.socket.clone(),
            metrics.clone(),
            stop.clone(),
        )));
        tracing::info!(socket = %config.socket.display(), "waiting for the first X509-SVID from the Workload API");
        store.wait_ready().await;

        let shared = Arc::new(Shared {
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            shutdown: stop.clone(),
        });
        let mut listeners = Vec::new();
        for spec in config.inbound {
            listeners.push(start_inbound(spec, &store, &shared).await?);
        }
        for spec in config.outbound {
            listeners.push(start_outbound(spec, &store, &shared).await?);
        }
        tracing::info!("sigil-agent forward is running");
        Ok(Forwarder {
            shutdown,
            permits: shared.permits.clone(),
            max_connections: config.limits.max_connections,
            drain_timeout: config.limits.drain_timeout,
            listeners,
            background,
            metrics,
            store,
        })
    }

    /// Stops accepting, lets open connections finish (HTTP connections finish their requests in
    /// flight, then close) for at most the drain timeout, then stops everything.
    pub async fn drain(self) {
        self.shutdown.send_replace(true);
        for listener in self.listeners {
            let _ = listener.await;
        }
        let open = self.max_connections - self.permits.available_permits();
        tracing::info!(
            "stopped accepting; draining {open} open connections (at most {:?})",
            self.drain_timeout
        );
        // Every open connection holds a permit: holding them all means none is open.
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        match tokio::time::timeout(self.drain_timeout, self.permits.acquire_many(all)).await {
            Ok(_) => tracing::info!("drained"),
            Err(_) => tracing::warn!(
                "the drain timeout passed with {} connections still open; closing them",
                self.max_connections - self.permits.available_permits()
            ),
        }
        for task in self.background {
            let _ = task.await;
        }
    }
}

/// Binds the health endpoint (`/live`, `/ready`, `/metrics`) and serves it until `stop`.
async fn serve_health(
    address: SocketAddr,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            address: address.to_string(),
            what: "the health endpoint".into(),
            source,
        })?;
    let router = crate::health::router(
        store,
        metrics,
        std::sync::Arc::new(sigil_core::clock::SystemClock),
    );
    let task = tokio::spawn(sigil_core::health::serve(listener, router, stop));
    tracing::info!(%address, "health endpoint: /live, /ready, /metrics");
    Ok(task)
}

/// Binds one inbound listener, builds its TLS server (and HTTP proxy, in HTTP mode) and serves it.
async fn start_inbound(
    spec: Inbound,
    store: &Arc<IdentityStore>,
    shared: &Arc<Shared>,
) -> Result<JoinHandle<()>> {
    let tcp = bind(spec.listen, &spec.name).await?;
    let verifier = Arc::new(ClientVerifier::new(
        spec.name.clone(),
        store.clone(),
        spec.policy.clone(),
        shared.metrics.clone(),
    ));
    let tls = server_config(store.clone(), verifier, spec.http)
        .map_err(|e| Error::Identity(format!("cannot build the TLS server configuration: {e}")))?;
    let http = spec.http.then(|| {
        Arc::new(HttpProxy::new(
            spec.name.clone(),
            spec.target.clone(),
            RequestChecks {
                rules: spec.http_rules.clone(),
                escaped_slashes: spec.escaped_slashes,
                max_path_length: shared.limits.max_path_length,
            },
            shared.limits.connect_timeout,
            shared.limits.handshake_timeout,
            store.clone(),
            shared.metrics.clone(),
        ))
    });
    tracing::info!(
        listener = %spec.name,
        listen = %spec.listen,
        target = %spec.target,
        mode = ?spec.mode,
        http = spec.http,
        "inbound listener"
    );
    if let Some(warning) = spec.permissive_bypass() {
        tracing::warn!(listener = %spec.name, "{warning}");
    }
    let inbound = Arc::new(InboundListener {
        spec,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        http,
    });
    let side = Side::Inbound(inbound);
    Ok(tokio::spawn(crate::proxy::serve(tcp, side, shared.clone())))
}

/// Binds one outbound listener, builds its TLS client and serves it.
async fn start_outbound(
    spec: Outbound,
    store: &Arc<IdentityStore>,
    shared: &Arc<Shared>,
) -> Result<JoinHandle<()>> {
    let tcp = bind(spec.listen, &spec.name).await?;
    let verifier = Arc::new(UpstreamVerifier::new(
        spec.name.clone(),
        store.clone(),
        spec.expect.clone(),
        shared.metrics.clone(),
    ));
    let tls = client_config(store.clone(), verifier)
        .map_err(|e| Error::Identity(format!("cannot build the TLS client configuration: {e}")))?;
    tracing::info!(
        listener = %spec.name,
        listen = %spec.listen,
        upstream = %spec.upstream,
        expect = %spec.expect.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "outbound listener"
    );
    let outbound = Arc::new(OutboundListener {
        server_name: server_name(&spec.upstream),
        spec,
        connector: TlsConnector::from(Arc::new(tls)),
    });
    let side = Side::Outbound(outbound);
    Ok(tokio::spawn(crate::proxy::serve(tcp, side, shared.clone())))
}

async fn bind(address: std::net::SocketAddr, name: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            address: address.to_string(),
            what: format!("listener `{name}`"),
            source,
        })
}

/// The TLS server name for an upstream `host:port`: SPIFFE peers are checked by ID, not name, but
/// rustls needs one for SNI.
fn server_name(upstream: &str) -> ServerName<'static> {
    let host = upstream
        .rsplit_once(':')
        .map_or(upstream, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    // A host that is no DNS name gets no SNI at all: an IP server name is never sent.
    ServerName::try_from(host.to_string()).unwrap_or(ServerName::IpAddress(
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into(),
    ))
}

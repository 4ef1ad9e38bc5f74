//! `/live`, `/ready` and `/metrics` over plain HTTP on the health address. `/ready` answers 200
//! once the agent holds its SVID, the trust bundle and the first snapshot of its entries.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::node::ServerLink;

/// What the health routes look at.
#[derive(Debug, Clone)]
pub struct Health {
    /// The agent's connection and identity.
    pub link: Arc<ServerLink>,
    /// The cache.
    pub cache: Arc<Cache>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// The health and metrics routes.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn ready(State(health): State<Health>) -> impl IntoResponse {
    let now = health.cache.clock().unix_now();
    if health.link.identity().expires_at <= now {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent SVID has expired\n",
        )
    } else if health.cache.bundle().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "no trust bundle yet\n")
    } else if !health.cache.is_synced() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first sync with the server\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

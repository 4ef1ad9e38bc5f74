//! `/live`, `/ready` and `/metrics` over plain HTTP on the health address. `/ready` answers 200
//! only once the first SVID is held.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::identity::IdentityStore;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct Health {
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
}

/// The health and metrics routes.
pub(crate) fn router(store: Arc<IdentityStore>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(Health { store, metrics })
}

async fn ready(State(health): State<Health>) -> impl IntoResponse {
    if health.store.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first X509-SVID from the Workload API\n",
        )
    }
}

async fn metrics_text(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

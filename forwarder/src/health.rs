//! `/live`, `/ready` and `/metrics` over plain HTTP on the health address. `/ready` answers 200
//! only while an SVID is held that has not expired.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use sigil_core::clock::SharedClock;

use crate::identity::IdentityStore;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct Health {
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
}

/// The health and metrics routes.
pub(crate) fn router(
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(Health {
            store,
            metrics,
            clock,
        })
}

async fn ready(State(health): State<Health>) -> impl IntoResponse {
    match health.store.not_ready_at(health.clock.unix_now()) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
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

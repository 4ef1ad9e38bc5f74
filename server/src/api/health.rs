//! `/live`, `/ready` and `/metrics` over plain HTTP on the health address.
//!
//! `/live` answers while the process serves requests. `/ready` answers 200 only when the
//! datastore answers and the CA is loaded (it always is once the server has started).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::ServerState;
use crate::datastore::DataStore;

/// The health and metrics routes.
pub fn router<D: DataStore>(state: Arc<ServerState<D>>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready::<D>))
        .route("/metrics", get(metrics::<D>))
        .with_state(state)
}

async fn ready<D: DataStore>(State(state): State<Arc<ServerState<D>>>) -> impl IntoResponse {
    match state.datastore.ping().await {
        Ok(()) if !state.ca.bundle().x509_authorities.is_empty() => {
            (StatusCode::OK, "ready\n".to_string())
        }
        Ok(()) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the CA is not loaded\n".to_string(),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the datastore does not answer: {e}\n"),
        ),
    }
}

async fn metrics<D: DataStore>(State(state): State<Arc<ServerState<D>>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

//! `/live`, `/ready` and `/metrics` over plain HTTP on the health address.
//!
//! `/live` answers while the process serves requests. `/ready` answers 200 once the CA is
//! loaded, whether or not the datastore answers: signing and sync run from the server's mirrors,
//! so a server whose database is away still serves its agents. Its body lists each component
//! (`sigil-server healthcheck --verbose` prints it), so a degraded datastore is visible there and
//! in the `datastore_up` metric. Every datastore probe here is bounded by `PROBE_TIMEOUT` (500 ms), so
//! both answer within a second whatever the database does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::ServerState;
use crate::datastore::DataStore;
use crate::metrics::AuthorityLabels;

/// How long a health or metrics request waits for the datastore to answer a ping.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The health and metrics routes.
pub fn router<D: DataStore>(state: Arc<ServerState<D>>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready::<D>))
        .route("/metrics", get(metrics::<D>))
        .with_state(state)
}

/// Pings the datastore within [`PROBE_TIMEOUT`] and records the outcome in the metrics;
/// `Err` says why it does not answer.
async fn probe_datastore<D: DataStore>(state: &ServerState<D>) -> Result<(), String> {
    let outcome = match tokio::time::timeout(PROBE_TIMEOUT, state.datastore.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    state.metrics.datastore_up.set(i64::from(outcome.is_ok()));
    if outcome.is_err() {
        state.metrics.datastore_errors.inc();
    }
    outcome
}

async fn ready<D: DataStore>(State(state): State<Arc<ServerState<D>>>) -> impl IntoResponse {
    let datastore = probe_datastore(&state).await;
    let ca_loaded = !state.ca.bundle().x509_authorities.is_empty();
    let status = if ca_loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = String::from(if ca_loaded { "ready\n" } else { "not ready\n" });
    body.push_str(if ca_loaded {
        "ca: ok\n"
    } else {
        "ca: not loaded\n"
    });
    match datastore {
        Ok(()) => body.push_str("datastore: ok\n"),
        Err(reason) => body.push_str(&format!(
            "datastore: unavailable: {reason} (signing and sync go on from the server's mirrors; admin calls and attestation fail until it is back)\n"
        )),
    }
    (status, body)
}

async fn metrics<D: DataStore>(State(state): State<Arc<ServerState<D>>>) -> impl IntoResponse {
    // Gauges that describe the present are read at scrape time, so they are never stale.
    let _ = probe_datastore(&state).await;
    let (x509, jwt) = state.ca.active_expiry();
    for (kind, expires_at) in [("x509", x509), ("jwt", jwt)] {
        state
            .metrics
            .ca_expiry
            .get_or_create(&AuthorityLabels { kind })
            .set(expires_at);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

//! The health endpoint every Sigil process serves (`/live`, `/ready`, `/metrics`), and the probe
//! behind `sigil-server healthcheck` and `sigil-agent healthcheck`: an HTTP GET of `/ready` on a
//! health address, answering whether it returned 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::sync::watch;

/// Serves `routes` on `listener` until `stop` turns true. A failure is logged, not returned: the
/// health endpoint is a side door, and the process it reports on goes on without it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let served = axum::serve(listener, routes)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the health endpoint stopped");
    }
}

/// Asks `address` for `/ready`; `Ok` with the body on 200, otherwise an error saying why.
pub fn probe_ready(address: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("cannot reach the health endpoint at {address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| {
            stream.write_all(
                format!("GET /ready HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
        })
        .map_err(|e| format!("cannot ask {address} for /ready: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("{address} did not answer /ready: {e}"))?;
    let status = response.lines().next().unwrap_or_default().to_string();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body)
    } else {
        Err(format!("not ready: {status}: {body}"))
    }
}

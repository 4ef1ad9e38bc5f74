//! What the server's, the agent's and the forwarder's Prometheus metrics share: registering a
//! series and rendering the registry for `/metrics`.

use prometheus_client::registry::{Metric, Registry};

/// Registers `metric` as `name` and hands it back: the registry keeps a clone, and metrics are
/// shared handles, so the one returned counts into the registered series.
pub fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The Prometheus text exposition of every series in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

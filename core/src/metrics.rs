//! What the server's, the agent's and the forwarder's Prometheus metrics share: registering a
//! series and rendering the registry for `/metrics`.

use prometheus_client::registry::{Metric, Registry};

/// Registering a series and handing it back in one call: the registry keeps a clone, and metrics
/// are shared handles, so the one returned counts into the registered series.
pub trait Register {
    /// A new `M` registered as `name`, described by `help`.
    fn series<M: Metric + Clone + Default>(&mut self, name: &str, help: &str) -> M;
    /// `metric` registered as `name`: for one that needs a constructor (a histogram's buckets).
    fn series_of<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M;
}

impl Register for Registry {
    fn series<M: Metric + Clone + Default>(&mut self, name: &str, help: &str) -> M {
        self.series_of(name, help, M::default())
    }

    fn series_of<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.register(name, help, metric.clone());
        metric
    }
}

/// The Prometheus text exposition of every series in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

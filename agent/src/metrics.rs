//! The agent's Prometheus metrics, served at `/metrics` on the health address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sigil_core::metrics::registered;

/// Labels of workload attestation counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Every series the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Workload API calls attested, by result: one per call or stream, so also the count of
    /// workload connections served.
    pub workload_attestations: Family<ResultLabels, Counter>,
    /// X509-SVIDs currently cached.
    pub svids_cached: Gauge,
    /// X509-SVIDs renewed before expiry.
    pub svid_renewals: Counter,
    /// X509-SVIDs signed (first issue and renewals).
    pub svids_signed: Counter,
    /// 1 while the sync stream with the server is up.
    pub sync_connected: Gauge,
    /// Sync messages received.
    pub sync_updates: Counter,
    /// Entries the server says this agent may use.
    pub entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_agent");
        Metrics {
            workload_attestations: registered(
                &mut registry,
                "workload_attestations",
                "Workload attestations by result",
                Family::<ResultLabels, Counter>::default(),
            ),
            svids_cached: registered(
                &mut registry,
                "svids_cached",
                "X509-SVIDs held in the cache",
                Gauge::default(),
            ),
            svid_renewals: registered(
                &mut registry,
                "svid_renewals",
                "X509-SVIDs renewed before expiry",
                Counter::default(),
            ),
            svids_signed: registered(
                &mut registry,
                "svids_signed",
                "X509-SVIDs obtained from the server",
                Counter::default(),
            ),
            sync_connected: registered(
                &mut registry,
                "sync_connected",
                "1 while the sync stream with the server is up",
                Gauge::default(),
            ),
            sync_updates: registered(
                &mut registry,
                "sync_updates",
                "Sync messages received from the server",
                Counter::default(),
            ),
            entries: registered(
                &mut registry,
                "entries",
                "Entries the server says this agent may use",
                Gauge::default(),
            ),
            registry,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        sigil_core::metrics::encode(&self.registry)
    }
}

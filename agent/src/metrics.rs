//! The agent's Prometheus metrics, served at `/metrics` on the health address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sigil_core::metrics::Register;

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
    /// Unix seconds at which the soonest-expiring cached X509-SVID expires; 0 when none is
    /// cached. An alert on it sees an agent that stopped renewing before its workloads notice.
    pub svid_earliest_expiry: Gauge,
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
            workload_attestations: registry
                .series("workload_attestations", "Workload attestations by result"),
            svids_cached: registry.series("svids_cached", "X509-SVIDs held in the cache"),
            svid_earliest_expiry: registry.series(
                "svid_earliest_expiry_timestamp_seconds",
                "Unix seconds at which the soonest-expiring cached X509-SVID expires (0: none)",
            ),
            svid_renewals: registry.series("svid_renewals", "X509-SVIDs renewed before expiry"),
            svids_signed: registry.series("svids_signed", "X509-SVIDs obtained from the server"),
            sync_connected: registry.series(
                "sync_connected",
                "1 while the sync stream with the server is up",
            ),
            sync_updates: registry.series("sync_updates", "Sync messages received from the server"),
            entries: registry.series("entries", "Entries the server says this agent may use"),
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

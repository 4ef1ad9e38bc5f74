//! The agent's Prometheus metrics, served at `/metrics` on the health address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
        let workload_attestations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "workload_attestations",
            "Workload attestations by result",
            workload_attestations.clone(),
        );
        let svids_cached = Gauge::default();
        registry.register(
            "svids_cached",
            "X509-SVIDs held in the cache",
            svids_cached.clone(),
        );
        let svid_renewals = Counter::default();
        registry.register(
            "svid_renewals",
            "X509-SVIDs renewed before expiry",
            svid_renewals.clone(),
        );
        let svids_signed = Counter::default();
        registry.register(
            "svids_signed",
            "X509-SVIDs obtained from the server",
            svids_signed.clone(),
        );
        let sync_connected = Gauge::default();
        registry.register(
            "sync_connected",
            "1 while the sync stream with the server is up",
            sync_connected.clone(),
        );
        let sync_updates = Counter::default();
        registry.register(
            "sync_updates",
            "Sync messages received from the server",
            sync_updates.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "entries",
            "Entries the server says this agent may use",
            entries.clone(),
        );
        Metrics {
            registry,
            entries,
            workload_attestations,
            svids_cached,
            svid_renewals,
            svids_signed,
            sync_connected,
            sync_updates,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

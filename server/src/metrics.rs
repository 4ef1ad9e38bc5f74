//! The server's Prometheus metrics, served at `/metrics` on the health address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_core::metrics::Register;

/// Labels of signed-SVID counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SvidLabels {
    /// `x509` or `jwt` (workloads), `agent` or `server` (Sigil's own).
    pub kind: &'static str,
}

/// Labels of attestation counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestationLabels {
    /// The node attestor: one of the configured attestors' names, or `unknown` for any other name
    /// a caller sent (labels come from a fixed set, so callers cannot grow the metrics).
    pub attestor: &'static str,
    /// `success`, `refused` or `error`.
    pub result: &'static str,
}

/// Labels of federated bundle refreshes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleRefreshLabels {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// `success` or `refused` (down, invalid, older, or not authenticated).
    pub result: &'static str,
}

/// Labels of the CA expiry gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabels {
    /// `x509` (the X.509 CA) or `jwt` (the JWT signing key).
    pub kind: &'static str,
}

/// Every series the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// SVIDs signed, by kind.
    pub svids_signed: Family<SvidLabels, Counter>,
    /// Time to check a CSR and sign it, in seconds.
    pub signing_seconds: Histogram,
    /// Node attestations, by attestor and result.
    pub attestations: Family<AttestationLabels, Counter>,
    /// Agents with at least one open sync stream.
    pub agents_connected: Gauge,
    /// Open sync streams.
    pub sync_streams: Gauge,
    /// Federated bundle refreshes, by trust domain and result.
    pub bundle_refreshes: Family<BundleRefreshLabels, Counter>,
    /// 1 while the datastore answers, 0 while it does not.
    pub datastore_up: Gauge,
    /// Datastore calls that failed because it could not be reached, and failed health probes.
    pub datastore_errors: Counter,
    /// When this server's active authority of each kind expires, in Unix seconds.
    pub ca_expiry: Family<AuthorityLabels, Gauge>,
    /// Issuance records in the local spool, waiting for the datastore.
    pub issuance_spool_records: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_server");
        Metrics {
            svids_signed: registry.series("svids_signed", "SVIDs signed"),
            signing_seconds: registry.series_of(
                "svid_signing_seconds",
                "Time to check one CSR and sign its X509-SVID",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            ),
            attestations: registry.series(
                "node_attestations",
                "Node attestations by attestor and result",
            ),
            agents_connected: registry
                .series("agents_connected", "Agents with an open sync stream"),
            sync_streams: registry.series("sync_streams_open", "Open agent sync streams"),
            bundle_refreshes: registry.series(
                "federated_bundle_refreshes",
                "Fetches of federated trust domains' bundles, by result",
            ),
            datastore_up: registry.series("datastore_up", "1 while the datastore answers"),
            datastore_errors: registry.series(
                "datastore_errors",
                "Datastore calls and probes that failed to reach the datastore",
            ),
            ca_expiry: registry.series(
                "ca_expiry_timestamp_seconds",
                "When the server's active authority expires, by kind, in Unix seconds",
            ),
            issuance_spool_records: registry.series(
                "issuance_spool_records",
                "Issuance records in the local spool, waiting for the datastore to come back",
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

//! The forwarder's Prometheus metrics, served at `/metrics` on the health address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_core::metrics::Register;

/// A listener.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener's name.
    pub listener: String,
}

/// A listener and what kind of connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// The listener's name.
    pub listener: String,
    /// `mtls` or `plaintext`.
    pub security: &'static str,
}

/// A listener and a direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The listener's name.
    pub listener: String,
    /// `received` (from the accepted connection) or `sent` (back to it).
    pub direction: &'static str,
}

/// A listener and a handshake outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// The listener's name.
    pub listener: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// A listener and why a connection or request was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The listener's name.
    pub listener: String,
    /// `plaintext`, `untrusted`, `expired`, `bad_identity`, `policy`, `upstream_identity`,
    /// `handshake_timeout`, `handshake_failed`, `max_connections`, `connect_failed`, `http_policy`,
    /// `bad_request` (a request target, method or path refused with 400), `path_too_long` (414).
    pub reason: &'static str,
}

/// Every series the forwarder exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted and handled, by security.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Connections open now.
    pub active_connections: Family<ListenerLabels, Gauge>,
    /// Bytes forwarded.
    pub bytes: Family<BytesLabels, Counter>,
    /// TLS handshakes by result.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Refused connections and requests by reason.
    pub refusals: Family<RefusalLabels, Counter>,
    /// TLS handshake duration, seconds.
    pub handshake_seconds: Family<ListenerLabels, Histogram>,
    /// Workload API updates applied.
    pub svid_updates: Counter,
    /// Expiry of the SVID in use, Unix seconds.
    pub svid_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_forwarder");
        Metrics {
            connections: registry.series(
                "connections",
                "Connections handled, by listener and security",
            ),
            active_connections: registry.series("active_connections", "Connections open now"),
            bytes: registry.series("bytes", "Bytes forwarded, by direction"),
            handshakes: registry.series("handshakes", "TLS handshakes, by result"),
            refusals: registry.series("refusals", "Refused connections and requests, by reason"),
            handshake_seconds: registry.series_of(
                "handshake_seconds",
                "TLS handshake latency",
                // 100 µs to about 3 s.
                Family::<ListenerLabels, Histogram>::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
                }),
            ),
            svid_updates: registry.series("svid_updates", "Workload API updates applied"),
            svid_expiry: registry.series(
                "svid_expiry_seconds",
                "Expiry of the SVID in use, Unix seconds",
            ),
            registry,
        }
    }
}

impl Metrics {
    /// Counts a refusal.
    pub fn refuse(&self, listener: &str, reason: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                listener: listener.to_string(),
                reason,
            })
            .inc();
    }

    /// Counts a handshake.
    pub fn handshake(&self, listener: &str, ok: bool, seconds: f64) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                listener: listener.to_string(),
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        if ok {
            self.handshake_seconds
                .get_or_create(&ListenerLabels {
                    listener: listener.to_string(),
                })
                .observe(seconds);
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        sigil_core::metrics::encode(&self.registry)
    }
}

//! Federation: trusting other trust domains' bundles, and publishing our own.
//!
//! A [`FederationRelationship`] names a foreign trust domain and its bundle endpoint. The
//! [`Federation`] refresher fetches each endpoint at the bundle's `spiffe_refresh_hint` (within
//! configured bounds), checks what comes back, and stores it in the datastore beside the own
//! bundle; the change feed then carries it to every agent, which hands it to the workloads whose
//! entries federate with that domain. A fetch that fails, or returns something that does not pass
//! the checks, is logged and counted, and the last good bundle stays in service.
//!
//! Bundles of different trust domains are never merged: each is stored and delivered under its
//! own name, and an `https_spiffe` endpoint is authenticated with the stored bundle of its own
//! domain only.

pub mod endpoint;
mod fetch;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::id::{TrustDomain, check_not_reserved, parse_spiffe_id, parse_trust_domain};
use sigil_core::sync::MutexExt;
use tokio::sync::{Notify, watch};

use crate::datastore::{DataStore, EndpointProfile, FederationRelationship};
use crate::feed::Feed;
use crate::metrics::{BundleRefreshLabels, Metrics};
use crate::{Error, Result};

/// A relationship as an operator writes it (admin API, CLI, configuration file).
#[derive(Debug, Clone, Default)]
pub struct RelationshipInput {
    /// The foreign trust domain, e.g. `b.example`.
    pub trust_domain: String,
    /// `https://host[:port]/path` of its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// For `https_spiffe`: the SPIFFE ID the endpoint presents.
    pub endpoint_spiffe_id: String,
}

impl RelationshipInput {
    /// Checks the input and makes the relationship, stamped `now`. Federating with the own trust
    /// domain is refused: its bundle comes from the CA, never from outside.
    pub fn validate(&self, own: &TrustDomain, now: i64) -> Result<FederationRelationship> {
        let invalid = |field: &'static str, reason: String| {
            Error::Invalid(sigil_core::Error::field(field, reason))
        };
        let trust_domain = parse_trust_domain("trust_domain", &self.trust_domain)?;
        if &trust_domain == own {
            return Err(invalid(
                "trust_domain",
                format!("{own} is this server's own trust domain; federate with another one"),
            ));
        }
        let uri: hyper::Uri = self.bundle_endpoint_url.parse().map_err(|e| {
            invalid(
                "bundle_endpoint_url",
                format!("`{}` is not a URL: {e}", self.bundle_endpoint_url),
            )
        })?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(invalid(
                "bundle_endpoint_url",
                format!(
                    "`{}` must be an https:// URL with a host",
                    self.bundle_endpoint_url
                ),
            ));
        }
        let profile = match (self.profile.as_str(), self.endpoint_spiffe_id.as_str()) {
            ("https_web", "") => EndpointProfile::HttpsWeb,
            ("https_web", _) => {
                return Err(invalid(
                    "endpoint_spiffe_id",
                    "only an https_spiffe endpoint has a SPIFFE ID; leave it out for https_web"
                        .into(),
                ));
            }
            ("https_spiffe", "") => {
                return Err(invalid(
                    "endpoint_spiffe_id",
                    "an https_spiffe endpoint needs the SPIFFE ID it presents (e.g. spiffe://<td>/sigil/server)".into(),
                ));
            }
            ("https_spiffe", id) => {
                let endpoint_spiffe_id = parse_spiffe_id("endpoint_spiffe_id", id)?;
                // Another domain's endpoint never holds our server's or agents' identity.
                check_not_reserved("endpoint_spiffe_id", &endpoint_spiffe_id, own)?;
                EndpointProfile::HttpsSpiffe { endpoint_spiffe_id }
            }
            (other, _) => {
                return Err(invalid(
                    "profile",
                    format!("`{other}` is not a profile; use https_spiffe or https_web"),
                ));
            }
        };
        Ok(FederationRelationship {
            trust_domain,
            bundle_endpoint_url: self.bundle_endpoint_url.clone(),
            profile,
            created_at: now,
            updated_at: now,
        })
    }
}

/// Checks a bundle fetched or set for `trust_domain` against the one stored, if any. Returns why
/// it must not replace it.
pub fn check_foreign_bundle(
    trust_domain: &TrustDomain,
    fresh: &TrustBundle,
    stored: Option<&TrustBundle>,
) -> std::result::Result<(), String> {
    if fresh.x509_authorities.is_empty() && fresh.jwt_authorities.is_empty() {
        return Err("the bundle holds no keys".into());
    }
    for der in &fresh.x509_authorities {
        // A CA certificate that names a SPIFFE ID names its own trust domain: one naming another
        // is a bundle for another domain, served by mistake or by an attacker.
        let facts = sigil_core::x509::certificate_facts(der)
            .map_err(|e| format!("an X.509 authority is unreadable: {e}"))?;
        if let Some(id) = facts
            .spiffe_id
            .filter(|id| id.trust_domain_name() != trust_domain.as_str())
        {
            return Err(format!(
                "an X.509 authority names {id}: this is a bundle of another trust domain, not {trust_domain}"
            ));
        }
    }
    if let Some(stored) = stored
        && fresh.sequence < stored.sequence
    {
        return Err(format!(
            "its spiffe_sequence {} is below the stored {}: an older bundle (a replay or a rollback)",
            fresh.sequence, stored.sequence
        ));
    }
    Ok(())
}

/// What the refresher makes of the body a bundle endpoint of `trust_domain` answered: the bundle
/// to store, or why the answer must not replace `stored`. Pure (no I/O), so the fuzz target
/// `federation_bundle` drives exactly what a hostile endpoint reaches.
pub fn read_fetched_bundle(
    trust_domain: &TrustDomain,
    document: &str,
    stored: Option<&TrustBundle>,
) -> std::result::Result<TrustBundle, String> {
    let fresh = TrustBundle::from_spiffe_json(trust_domain.clone(), document)
        .map_err(|e| format!("the answer is not a valid SPIFFE bundle: {e}"))?;
    check_foreign_bundle(trust_domain, &fresh, stored)?;
    Ok(fresh)
}

/// Bounds on how often an endpoint is fetched, whatever its refresh hint says.
#[derive(Debug, Clone, Copy)]
pub struct RefreshBounds {
    /// Never more often than this.
    pub min: Duration,
    /// Never less often than this.
    pub max: Duration,
}

/// What the refresher knows about one relationship.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    /// Unix seconds of the last attempt (0: none yet).
    pub last_attempt_at: i64,
    /// Unix seconds of the last fetch that was accepted.
    pub last_success_at: i64,
    /// Why the last attempt failed; empty when it succeeded.
    pub last_error: String,
    /// Unix seconds of the next attempt.
    pub next_attempt_at: i64,
}

/// The bundle refresher of every federation relationship.
#[derive(Debug)]
pub struct Federation {
    own: TrustDomain,
    bounds: RefreshBounds,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    /// Told at once about a new bundle, so agents get it without waiting for the change-feed
    /// poll.
    feed: Arc<Feed>,
    statuses: Mutex<BTreeMap<String, RefreshStatus>>,
    /// Relationships changed, or a refresh was asked for: look again now.
    wake: Notify,
}

impl Federation {
    /// A refresher for `own`'s relationships.
    pub fn new(
        own: TrustDomain,
        bounds: RefreshBounds,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        feed: Arc<Feed>,
    ) -> Self {
        Federation {
            own,
            bounds,
            clock,
            metrics,
            feed,
            statuses: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// The own trust domain.
    pub fn own_trust_domain(&self) -> &TrustDomain {
        &self.own
    }

    fn statuses(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RefreshStatus>> {
        self.statuses.lock_unpoisoned()
    }

    /// What the refresher knows about `trust_domain`'s relationship.
    pub fn status(&self, trust_domain: &TrustDomain) -> RefreshStatus {
        self.statuses()
            .get(trust_domain.as_str())
            .cloned()
            .unwrap_or_default()
    }

    /// Makes the refresher look at the relationships again now (one was created or changed).
    pub fn relationships_changed(&self) {
        self.wake.notify_one();
    }

    /// Fetches `relationship`'s bundle now, checks it and stores it when it is new. Returns the
    /// bundle in service afterwards; on failure the stored one stays and the error says why.
    pub async fn refresh<D: DataStore>(
        &self,
        datastore: &D,
        relationship: &FederationRelationship,
    ) -> Result<TrustBundle> {
        let td = &relationship.trust_domain;
        let now = self.clock.unix_now();
        let stored = datastore.get_bundle(td).await?;
        let outcome = self.fetch_checked(relationship, stored.as_ref()).await;
        let (result, status) = match outcome {
            Ok(fresh) => {
                let changed = stored.as_ref() != Some(&fresh);
                if changed {
                    datastore.put_bundle(&fresh).await?;
                    self.feed.catch_up(datastore).await?;
                    tracing::info!(trust_domain = %td, sequence = fresh.sequence, "stored a new federated bundle");
                }
                let next = now + self.interval(fresh.refresh_hint_seconds);
                let status = RefreshStatus {
                    last_attempt_at: now,
                    last_success_at: now,
                    last_error: String::new(),
                    next_attempt_at: next,
                };
                (Ok(fresh), status)
            }
            Err(reason) => {
                tracing::warn!(trust_domain = %td, url = %relationship.bundle_endpoint_url, error = %reason, "bundle refresh refused; keeping the last good bundle");
                // Retry sooner than a full interval, but not in a tight loop.
                let retry = i64::try_from(self.bounds.min.as_secs()).unwrap_or(1).max(1);
                let status = RefreshStatus {
                    last_attempt_at: now,
                    last_success_at: self.status(td).last_success_at,
                    last_error: reason.clone(),
                    next_attempt_at: now + retry,
                };
                (
                    Err(Error::Unavailable(format!(
                        "refreshing the bundle of {td} from {} failed: {reason}",
                        relationship.bundle_endpoint_url
                    ))),
                    status,
                )
            }
        };
        self.metrics
            .bundle_refreshes
            .get_or_create(&BundleRefreshLabels {
                trust_domain: td.to_string(),
                result: if result.is_ok() { "success" } else { "refused" },
            })
            .inc();
        self.statuses().insert(td.to_string(), status);
        result
    }

    /// Seconds until the next fetch for a bundle with `hint_seconds`, within the bounds.
    fn interval(&self, hint_seconds: i64) -> i64 {
        let min = i64::try_from(self.bounds.min.as_secs()).unwrap_or(1).max(1);
        let max = i64::try_from(self.bounds.max.as_secs())
            .unwrap_or(i64::MAX)
            .max(min);
        let hint = if hint_seconds > 0 { hint_seconds } else { 300 };
        hint.clamp(min, max)
    }

    async fn fetch_checked(
        &self,
        relationship: &FederationRelationship,
        stored: Option<&TrustBundle>,
    ) -> std::result::Result<TrustBundle, String> {
        let td = &relationship.trust_domain;
        let tls = match &relationship.profile {
            EndpointProfile::HttpsWeb => fetch::web_tls()?,
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let Some(stored) = stored.filter(|b| !b.x509_authorities.is_empty()) else {
                    return Err(format!(
                        "no bundle of {td} is stored to authenticate its https_spiffe endpoint with; set the first one with `sigil-server bundle set` or `federation create --trust-bundle`"
                    ));
                };
                fetch::spiffe_tls(&stored.x509_authorities, endpoint_spiffe_id.clone())?
            }
        };
        let document = fetch::fetch(&relationship.bundle_endpoint_url, tls).await?;
        read_fetched_bundle(td, &document, stored)
    }

    /// Refreshes every relationship when it is due, until `stopping`.
    pub async fn run<D: DataStore>(
        self: Arc<Self>,
        datastore: Arc<D>,
        mut stopping: watch::Receiver<bool>,
    ) {
        loop {
            let now = self.clock.unix_now();
            let mut next_due = now + i64::try_from(self.bounds.max.as_secs()).unwrap_or(3600);
            match datastore.list_federations().await {
                Ok(relationships) => {
                    let names: Vec<String> = relationships
                        .iter()
                        .map(|r| r.trust_domain.to_string())
                        .collect();
                    self.statuses().retain(|td, _| names.contains(td));
                    for relationship in &relationships {
                        let status = self.status(&relationship.trust_domain);
                        let due = status.next_attempt_at;
                        if due <= now {
                            // The outcome is logged, counted and kept in the status.
                            let _ = self.refresh(datastore.as_ref(), relationship).await;
                        }
                        next_due =
                            next_due.min(self.status(&relationship.trust_domain).next_attempt_at);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list federation relationships; retrying");
                    next_due = now + 1;
                }
            }
            let wait = Duration::from_secs(u64::try_from(next_due - now).unwrap_or(0).max(1));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                // Another server (or this one) changed a relationship.
                () = self.feed.relationships_changed() => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
    }
}

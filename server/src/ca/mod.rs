//! The trust domain's certificate authority.
//!
//! [`Ca`] holds the active X.509 authority and JWT key, signs X509-SVIDs and JWT-SVIDs, and keeps
//! the trust domain's own bundle in the datastore in step with the CA journal (the `authorities`
//! table). Private keys live behind a [`KeyManager`]; the journal holds only their ids.
//!
//! Rotation follows the journal: `prepared` (published in the bundle, not signing) -> `active`
//! (signing) -> `old` (in the bundle until it expires); an operator can also `taint` an old
//! authority (agents replace what it signed at once) and then `revoke` it (out of the bundle).
//! The same holds for JWT signing keys. See [`Ca::rotate_if_due`] for the schedule.

mod jwt;
mod keys;
mod record;
mod upstream;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::{Issuer, KeyPair, PublicKeyData};
use sigil_core::bundle::{JwtAuthority, TrustBundle};
use sigil_core::clock::{SharedClock, from_unix_seconds, unix_seconds};
use sigil_core::id::{SpiffeId, TrustDomain, check_not_reserved, is_reserved};
use sigil_core::x509::{KeyType, certificate_facts, leaf_params, root_ca_params};
use tokio::sync::Mutex;

use crate::datastore::{Authority, AuthorityKind, DataStore};
use crate::{Error, Result};

pub use jwt::JwtKey;

/// Journal states: made and published, not yet signing.
pub const STATE_PREPARED: &str = "prepared";
/// Signing.
pub const STATE_ACTIVE: &str = "active";
/// Replaced; still in the bundle until it expires.
pub const STATE_OLD: &str = "old";
/// Not to be relied on: agents replace what it signed; still in the bundle until revoked.
pub const STATE_TAINTED: &str = "tainted";
/// Removed from the bundle.
pub const STATE_REVOKED: &str = "revoked";
pub use keys::{DiskKeyManager, KeyManager, MemoryKeyManager};
pub use record::IssuanceRecorder;
pub use upstream::{DiskUpstream, UpstreamAuthority, is_self_issued};

/// How the CA is shaped; from the `[ca]` section of the configuration.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// The trust domain this CA speaks for.
    pub trust_domain: TrustDomain,
    /// The CA key's type.
    pub key_type: KeyType,
    /// Lifetime of each CA certificate (and JWT key).
    pub ca_ttl: Duration,
    /// X509-SVID lifetime when an entry does not set one.
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime when an entry does not set one.
    pub default_jwt_svid_ttl: Duration,
    /// Advertised `spiffe_refresh_hint` of the bundle.
    pub bundle_refresh_hint: Duration,
    /// The operator's CA that signs this one, when there is one; otherwise the CA is a root.
    pub upstream: Option<Arc<dyn UpstreamAuthority>>,
    /// DNS names of the server's own certificate (`server_dns_names`): clients that check the
    /// server by host name (istio-agent does) must never accept a workload in its place, so no
    /// workload SVID carries one of them.
    pub reserved_dns_names: Vec<String>,
}

impl CaSettings {
    /// Whether a CA certificate of the journal belongs to the current setup: signed by the
    /// upstream when there is one, a root when there is none.
    fn fits(&self, certificate: &[u8]) -> bool {
        match &self.upstream {
            Some(upstream) => upstream.issued(certificate),
            None => is_self_issued(certificate),
        }
    }

    /// The certificates a workload needs between a leaf signed by `certificate` and a trust
    /// anchor: none for a root, the CA itself and the upstream's chain for an intermediate.
    fn chain_above(&self, certificate: &[u8]) -> Vec<Vec<u8>> {
        match &self.upstream {
            Some(upstream) => std::iter::once(certificate.to_vec())
                .chain(upstream.chain().iter().cloned())
                .collect(),
            None => Vec::new(),
        }
    }
}

/// An X.509 CA that can sign.
struct X509Authority {
    id: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
    /// Intermediates to send after a leaf it signs (empty when it is a root).
    chain_above: Vec<Vec<u8>>,
}

/// A signed X509-SVID.
#[derive(Debug, Clone)]
pub struct SignedX509Svid {
    /// DER certificates, leaf first, then any intermediates (the root is in the bundle).
    pub chain: Vec<Vec<u8>>,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The signing authority's id (hex subject key identifier).
    pub authority_id: String,
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct SignedJwtSvid {
    /// The compact JWS.
    pub token: String,
    /// Its `jti`.
    pub token_id: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// The signing key's `kid`.
    pub key_id: String,
}

/// The certificate authority of one trust domain.
pub struct Ca {
    settings: CaSettings,
    keys: Arc<dyn KeyManager>,
    clock: SharedClock,
    x509: ArcSwap<X509Authority>,
    jwt: ArcSwap<JwtKey>,
    bundle: ArcSwap<TrustBundle>,
    /// Tainted authority ids, as of the last bundle publication.
    tainted: ArcSwap<Vec<String>>,
    /// Serializes rotation so two checks never both make a new authority.
    rotation: Mutex<()>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.settings.trust_domain)
            .field("x509_authority", &self.x509.load().id)
            .field("jwt_key", &self.jwt.load().key_id)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the active authorities from the journal (and their keys from `keys`), making new ones
    /// when there are none usable, and brings the stored bundle in step.
    pub async fn load<D: DataStore>(
        settings: CaSettings,
        keys: Arc<dyn KeyManager>,
        clock: SharedClock,
        datastore: &D,
    ) -> Result<Self> {
        let journal = datastore.list_authorities().await?;
        let now = clock.unix_now();
        let min_life = settings.minimum_remaining_life();
        let x509 = match usable(&journal, AuthorityKind::X509, now, min_life)
            .filter(|a| settings.fits(&a.public_data))
            .find_map(|a| load_x509(a, &settings, keys.as_ref()).transpose())
            .transpose()?
        {
            Some(authority) => authority,
            None => {
                create_x509(
                    &settings,
                    keys.as_ref(),
                    clock.now(),
                    datastore,
                    STATE_ACTIVE,
                )
                .await?
            }
        };
        let jwt = match usable(&journal, AuthorityKind::Jwt, now, min_life)
            .find_map(|a| load_jwt(a, keys.as_ref()).transpose())
            .transpose()?
        {
            Some(key) => key,
            None => create_jwt(&settings, keys.as_ref(), now, datastore, STATE_ACTIVE).await?,
        };
        let bundle = TrustBundle::new(settings.trust_domain.clone());
        let ca = Ca {
            settings,
            keys,
            clock,
            x509: ArcSwap::from_pointee(x509),
            jwt: ArcSwap::from_pointee(jwt),
            bundle: ArcSwap::from_pointee(bundle),
            tainted: ArcSwap::from_pointee(Vec::new()),
            rotation: Mutex::new(()),
        };
        ca.publish_bundle(datastore).await?;
        Ok(ca)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
    }

    /// The settings the CA runs with.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    /// The current own trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Follows the journal's schedule: prepares the next authorities once the active X.509 CA
    /// has used half its life (published at once, not yet signing), and activates them when it
    /// has less than twice the longest SVID lifetime left, provided they have been published for
    /// at least one bundle refresh hint (so agents and federated peers hold them first); an
    /// active CA about to run out is replaced at once whatever the delay. Returns whether the
    /// bundle changed.
    pub async fn rotate_if_due<D: DataStore>(&self, datastore: &D) -> Result<bool> {
        let _guard = self.rotation.lock().await;
        let now = self.clock.unix_now();
        let min_life = self.settings.minimum_remaining_life();
        let half_life = i64::try_from(self.settings.ca_ttl.as_secs() / 2).unwrap_or(i64::MAX);
        let remaining = self.x509.load().not_after.min(self.jwt.load().not_after) - now;
        let journal = datastore.list_authorities().await?;
        let prepared: Vec<&Authority> = journal
            .iter()
            .filter(|a| a.state == STATE_PREPARED && a.not_after > now)
            .collect();
        let mut changed = false;
        if remaining <= half_life && prepared.is_empty() {
            self.prepare_locked(datastore).await?;
            changed = true;
        }
        let hint = i64::try_from(self.settings.bundle_refresh_hint.as_secs()).unwrap_or(0);
        let published_long_enough = journal
            .iter()
            .filter(|a| a.state == STATE_PREPARED)
            .all(|a| now - a.created_at >= hint);
        if remaining < min_life && (published_long_enough || remaining < min_life / 2) {
            if journal.iter().all(|a| a.state != STATE_PREPARED) && !changed {
                self.prepare_locked(datastore).await?;
            }
            self.activate_locked(datastore).await?;
            changed = true;
        }
        let published = self.publish_bundle(datastore).await?;
        Ok(changed || published)
    }

    /// `ca prepare`: makes the next X.509 CA and JWT key, published in the bundle at once and
    /// used only once activated. Refused while prepared ones wait.
    pub async fn prepare<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let _guard = self.rotation.lock().await;
        if datastore
            .list_authorities()
            .await?
            .iter()
            .any(|a| a.state == STATE_PREPARED)
        {
            return Err(Error::AlreadyExists(
                "prepared authorities; activate them (`sigil-server ca activate`) first".into(),
            ));
        }
        let made = self.prepare_locked(datastore).await?;
        self.publish_bundle(datastore).await?;
        Ok(made)
    }

    async fn prepare_locked<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let now = self.clock.now();
        let x509 = create_x509(
            &self.settings,
            self.keys.as_ref(),
            now,
            datastore,
            STATE_PREPARED,
        )
        .await?;
        let jwt = create_jwt(
            &self.settings,
            self.keys.as_ref(),
            unix_seconds(now),
            datastore,
            STATE_PREPARED,
        )
        .await?;
        tracing::info!(authority = %x509.id, key_id = %jwt.key_id, "prepared the next X.509 CA and JWT key; published in the bundle");
        let journal = datastore.list_authorities().await?;
        Ok(journal
            .into_iter()
            .filter(|a| a.id == x509.id || a.id == jwt.key_id)
            .collect())
    }

    /// `ca activate`: the prepared X.509 CA and JWT key start signing; the ones they replace
    /// become `old` and stay in the bundle until they expire.
    pub async fn activate<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let _guard = self.rotation.lock().await;
        let activated = self.activate_locked(datastore).await?;
        self.publish_bundle(datastore).await?;
        Ok(activated)
    }

    async fn activate_locked<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let journal = datastore.list_authorities().await?;
        let now = self.clock.unix_now();
        let prepared: Vec<&Authority> = journal
            .iter()
            .filter(|a| a.state == STATE_PREPARED && a.not_after > now)
            .collect();
        if prepared.is_empty() {
            return Err(Error::NotFound(
                "a prepared authority to activate; run `sigil-server ca prepare` first".into(),
            ));
        }
        let mut activated = Vec::new();
        for authority in prepared {
            match authority.kind {
                AuthorityKind::X509 => {
                    let Some(loaded) = load_x509(authority, &self.settings, self.keys.as_ref())?
                    else {
                        return Err(Error::Ca(format!(
                            "the key of prepared CA {} is missing; prepare again",
                            authority.id
                        )));
                    };
                    self.x509.store(Arc::new(loaded));
                }
                AuthorityKind::Jwt => {
                    let Some(loaded) = load_jwt(authority, self.keys.as_ref())? else {
                        return Err(Error::Ca(format!(
                            "the key of prepared JWT key {} is missing; prepare again",
                            authority.id
                        )));
                    };
                    self.jwt.store(Arc::new(loaded));
                }
            }
            for previous in journal
                .iter()
                .filter(|a| a.kind == authority.kind && a.state == STATE_ACTIVE)
            {
                set_state(datastore, previous, STATE_OLD).await?;
            }
            activated.push(set_state(datastore, authority, STATE_ACTIVE).await?);
        }
        for authority in &activated {
            tracing::info!(authority = %authority.id, kind = ?authority.kind, "activated");
        }
        Ok(activated)
    }

    /// `ca taint`: an `old` authority that must no longer be relied on. It stays in the bundle
    /// (what it signed still verifies) while agents renew everything it signed at once; the
    /// active or prepared authority cannot be tainted.
    pub async fn taint<D: DataStore>(&self, datastore: &D, id: &str) -> Result<Authority> {
        let _guard = self.rotation.lock().await;
        let authority = find(datastore, id).await?;
        match authority.state.as_str() {
            STATE_OLD => {}
            STATE_TAINTED => return Ok(authority),
            state => {
                return Err(Error::Invalid(sigil_core::Error::field(
                    "id",
                    format!(
                        "authority {id} is {state}; only an old one can be tainted (prepare and activate a new one first)"
                    ),
                )));
            }
        }
        let tainted = set_state(datastore, &authority, STATE_TAINTED).await?;
        self.publish_bundle(datastore).await?;
        tracing::warn!(authority = %id, "tainted: agents renew everything it signed");
        Ok(tainted)
    }

    /// `ca revoke`: removes a tainted authority from the bundle, once nothing still valid
    /// depends on it (every SVID it signed has been replaced by one from another authority, or
    /// has expired).
    pub async fn revoke<D: DataStore>(&self, datastore: &D, id: &str) -> Result<Authority> {
        let _guard = self.rotation.lock().await;
        let authority = find(datastore, id).await?;
        if authority.state != STATE_TAINTED {
            return Err(Error::Invalid(sigil_core::Error::field(
                "id",
                format!(
                    "authority {id} is {}; taint it first (`sigil-server ca taint --id {id}`) so agents replace what it signed",
                    authority.state
                ),
            )));
        }
        let now = self.clock.unix_now();
        let valid = datastore
            .list_issued_svids(&crate::datastore::SvidFilter {
                valid_at: Some(now),
                ..crate::datastore::SvidFilter::default()
            })
            .await?;
        let outstanding: Vec<_> = valid
            .iter()
            .filter(|svid| svid.authority_id == id)
            .filter(|svid| {
                !valid.iter().any(|newer| {
                    newer.authority_id != id
                        && newer.kind == svid.kind
                        && newer.spiffe_id == svid.spiffe_id
                        && newer.agent_id == svid.agent_id
                        && newer.entry_id == svid.entry_id
                        && newer.not_before >= svid.not_before
                })
            })
            .collect();
        if let Some(example) = outstanding.first() {
            return Err(Error::Invalid(sigil_core::Error::field(
                "id",
                format!(
                    "{} valid SVID(s) signed by {id} have not been replaced yet (e.g. {} for {}); wait for the agents to renew them, then revoke",
                    outstanding.len(),
                    example.serial,
                    example.spiffe_id
                ),
            )));
        }
        let revoked = set_state(datastore, &authority, STATE_REVOKED).await?;
        self.publish_bundle(datastore).await?;
        tracing::warn!(authority = %id, "revoked: removed from the bundle");
        Ok(revoked)
    }

    /// The id (subject key identifier) of the X.509 CA that signs now.
    pub fn active_x509_id(&self) -> String {
        self.x509.load().id.clone()
    }

    /// Ids of tainted authorities (X.509 subject key ids and JWT key ids) not yet expired:
    /// agents renew at once whatever these signed.
    pub fn tainted(&self) -> Arc<Vec<String>> {
        self.tainted.load_full()
    }

    /// Rebuilds the bundle from the journal (every authority not yet expired) and stores it
    /// with the next sequence number if it differs from what is stored. Returns whether it did.
    async fn publish_bundle<D: DataStore>(&self, datastore: &D) -> Result<bool> {
        let now = self.clock.unix_now();
        let journal = datastore.list_authorities().await?;
        let mut fresh = TrustBundle::new(self.settings.trust_domain.clone());
        fresh.refresh_hint_seconds =
            i64::try_from(self.settings.bundle_refresh_hint.as_secs()).unwrap_or(300);
        self.tainted.store(Arc::new(
            journal
                .iter()
                .filter(|a| a.state == STATE_TAINTED && a.not_after > now)
                .map(|a| a.id.clone())
                .collect(),
        ));
        for authority in journal
            .iter()
            .filter(|a| a.not_after > now && a.state != STATE_REVOKED)
        {
            match authority.kind {
                // Roots go in the bundle (older self-signed ones until they expire); Sigil's
                // intermediates under an upstream do not: the upstream's roots stand for them.
                AuthorityKind::X509 if !is_self_issued(&authority.public_data) => {}
                AuthorityKind::X509 => fresh.x509_authorities.push(authority.public_data.clone()),
                AuthorityKind::Jwt => fresh.jwt_authorities.push(JwtAuthority {
                    key_id: authority.id.clone(),
                    public_key: authority.public_data.clone(),
                    expires_at: authority.not_after,
                }),
            }
        }
        if let Some(upstream) = &self.settings.upstream {
            for anchor in upstream.trust_anchors() {
                if !fresh.x509_authorities.contains(anchor) {
                    fresh.x509_authorities.push(anchor.clone());
                }
            }
        }
        let stored = datastore.get_bundle(&self.settings.trust_domain).await?;
        let same = |stored: &TrustBundle| {
            stored.x509_authorities == fresh.x509_authorities
                && stored
                    .jwt_authorities
                    .iter()
                    .map(|k| (&k.key_id, &k.public_key))
                    .eq(fresh
                        .jwt_authorities
                        .iter()
                        .map(|k| (&k.key_id, &k.public_key)))
                && stored.refresh_hint_seconds == fresh.refresh_hint_seconds
        };
        let changed = match &stored {
            Some(stored) if same(stored) => {
                fresh.sequence = stored.sequence;
                false
            }
            Some(stored) => {
                fresh.sequence = stored.sequence + 1;
                true
            }
            None => {
                fresh.sequence = 1;
                true
            }
        };
        if changed {
            datastore.put_bundle(&fresh).await?;
        }
        self.bundle.store(Arc::new(fresh));
        Ok(changed)
    }

    /// Signs an X509-SVID for `public_key` naming `spiffe_id`, valid for `ttl` (capped by the CA's
    /// own expiry). Zero `ttl` means the default.
    ///
    /// This is the path of every workload identity (agent batches, the Istio CA API), so it
    /// refuses IDs in the reserved `/sigil/` namespace: whatever an entry, a token or a CSR says,
    /// a workload can never hold the server's or an agent's identity.
    pub fn sign_x509_svid(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<SignedX509Svid> {
        check_not_reserved("spiffe_id", spiffe_id, &self.settings.trust_domain)
            .map_err(|e| Error::PermissionDenied(e.to_string()))?;
        self.check_workload_dns_names(dns_names)?;
        self.sign_x509(public_key, spiffe_id, dns_names, ttl)
    }

    /// Refuses workload DNS names that can name the server's own host (see
    /// [`CaSettings::reserved_dns_names`]).
    pub fn check_workload_dns_names(&self, dns_names: &[String]) -> Result<()> {
        for name in dns_names {
            if let Some(reserved) = self
                .settings
                .reserved_dns_names
                .iter()
                .find(|reserved| sigil_core::entry::dns_names_overlap(name, reserved))
            {
                return Err(Error::PermissionDenied(format!(
                    "DNS name `{}` can name the server itself (server_dns_names has `{reserved}`); a workload may not hold it",
                    sigil_core::untrusted::untrusted(name)
                )));
            }
        }
        Ok(())
    }

    /// Signs the X509-SVID of one of Sigil's own components: the server's TLS certificate or an
    /// agent SVID, whose IDs are the only ones in the reserved `/sigil/` namespace.
    pub fn sign_component_x509_svid(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<SignedX509Svid> {
        if !is_reserved(spiffe_id, &self.settings.trust_domain) {
            return Err(Error::Ca(format!(
                "{spiffe_id} is not the ID of a Sigil component; sign workloads with sign_x509_svid"
            )));
        }
        self.sign_x509(public_key, spiffe_id, dns_names, ttl)
    }

    fn sign_x509(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<SignedX509Svid> {
        let authority = self.x509.load();
        let now = self.clock.now();
        let ttl = if ttl.is_zero() {
            self.settings.default_x509_svid_ttl
        } else {
            ttl
        };
        let not_after = (now + ttl).min(from_unix_seconds(authority.not_after));
        let params = leaf_params(spiffe_id, dns_names, now, not_after)?;
        let certificate = params
            .signed_by(public_key, &authority.issuer)
            .map_err(|e| Error::Ca(format!("signing an X509-SVID for {spiffe_id} failed: {e}")))?;
        Ok(SignedX509Svid {
            serial: params
                .serial_number
                .as_ref()
                .map(|s| hex::encode(s.to_bytes()))
                .unwrap_or_default(),
            chain: std::iter::once(certificate.der().to_vec())
                .chain(authority.chain_above.iter().cloned())
                .collect(),
            not_before: unix_seconds(params.not_before.into()),
            not_after: unix_seconds(not_after),
            authority_id: authority.id.clone(),
        })
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience`, valid for `ttl` (zero: the default),
    /// never past the signing key's own expiry.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<SignedJwtSvid> {
        check_not_reserved("spiffe_id", spiffe_id, &self.settings.trust_domain)
            .map_err(|e| Error::PermissionDenied(e.to_string()))?;
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(Error::Invalid(sigil_core::Error::field(
                "audience",
                "at least one non-empty audience is required",
            )));
        }
        let key = self.jwt.load();
        let now = self.clock.unix_now();
        let ttl = if ttl.is_zero() {
            self.settings.default_jwt_svid_ttl
        } else {
            ttl
        };
        let expires_at =
            (now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2)).min(key.not_after);
        let token_id = hex::encode(sigil_core::x509::random_serial()?.to_bytes());
        let token = key.sign(spiffe_id, audience, now, expires_at, &token_id)?;
        Ok(SignedJwtSvid {
            token,
            token_id,
            issued_at: now,
            expires_at,
            key_id: key.key_id.clone(),
        })
    }
}

impl CaSettings {
    /// An authority with less life than this left is replaced: twice the longest default SVID
    /// lifetime, so every SVID it signs can live its full span, and never more than half its own
    /// lifetime.
    fn minimum_remaining_life(&self) -> i64 {
        let longest = self.default_x509_svid_ttl.max(self.default_jwt_svid_ttl);
        let wanted = longest.saturating_mul(2).min(self.ca_ttl / 2);
        i64::try_from(wanted.as_secs()).unwrap_or(i64::MAX)
    }
}

fn usable(
    journal: &[Authority],
    kind: AuthorityKind,
    now: i64,
    min_life: i64,
) -> impl Iterator<Item = &Authority> {
    // Newest first: after a restart, the most recently made authority is the one in use.
    journal
        .iter()
        .rev()
        .filter(move |a| a.kind == kind && a.state == STATE_ACTIVE && a.not_after - now >= min_life)
}

fn load_x509(
    authority: &Authority,
    settings: &CaSettings,
    keys: &dyn KeyManager,
) -> Result<Option<X509Authority>> {
    let Some(key) = keys.load(&authority.key_ref)? else {
        tracing::warn!(authority = %authority.id, "the key of a CA in the journal is missing; making a new CA");
        return Ok(None);
    };
    let issuer =
        Issuer::from_ca_cert_der(&authority.public_data.as_slice().into(), key).map_err(|e| {
            Error::Ca(format!(
                "stored CA certificate {} is unreadable: {e}",
                authority.id
            ))
        })?;
    Ok(Some(X509Authority {
        id: authority.id.clone(),
        issuer,
        not_after: authority.not_after,
        chain_above: settings.chain_above(&authority.public_data),
    }))
}

fn load_jwt(authority: &Authority, keys: &dyn KeyManager) -> Result<Option<JwtKey>> {
    let Some(key) = keys.load(&authority.key_ref)? else {
        tracing::warn!(key_id = %authority.id, "a JWT key in the journal is missing; making a new one");
        return Ok(None);
    };
    JwtKey::new(authority.id.clone(), &key, authority.not_after).map(Some)
}

async fn create_x509<D: DataStore>(
    settings: &CaSettings,
    keys: &dyn KeyManager,
    now: SystemTime,
    datastore: &D,
    state: &str,
) -> Result<X509Authority> {
    let key_ref = format!("x509-ca-{}", unix_seconds(now));
    let key_ref = unique_key_ref(keys, key_ref)?;
    let key = keys.generate(&key_ref, settings.key_type)?;
    let certificate = match &settings.upstream {
        Some(upstream) => {
            // An intermediate cannot outlive the CA that signs it.
            let left = upstream.not_after() - unix_seconds(now);
            let ttl = Duration::from_secs(u64::try_from(left).unwrap_or(0)).min(settings.ca_ttl);
            if ttl.is_zero() {
                return Err(Error::Ca(
                    "the upstream CA certificate has expired; renew it".into(),
                ));
            }
            let params = root_ca_params(&settings.trust_domain, now, ttl)?;
            let der = upstream.sign_ca(&params, &key)?;
            (params, der)
        }
        None => {
            let params = root_ca_params(&settings.trust_domain, now, settings.ca_ttl)?;
            let der = params
                .self_signed(&key)
                .map_err(|e| Error::Ca(format!("cannot self-sign the CA certificate: {e}")))?
                .der()
                .to_vec();
            (params, der)
        }
    };
    let (params, der) = certificate;
    let facts = certificate_facts(&der)?;
    datastore
        .put_authority(&Authority {
            id: facts.subject_key_id.clone(),
            kind: AuthorityKind::X509,
            key_ref,
            public_data: der.clone(),
            state: state.into(),
            not_after: facts.not_after,
            created_at: unix_seconds(now),
        })
        .await?;
    tracing::info!(authority = %facts.subject_key_id, not_after = facts.not_after, "created a new X.509 CA");
    Ok(X509Authority {
        id: facts.subject_key_id,
        issuer: Issuer::new(params, key),
        not_after: facts.not_after,
        chain_above: settings.chain_above(&der),
    })
}

async fn create_jwt<D: DataStore>(
    settings: &CaSettings,
    keys: &dyn KeyManager,
    now: i64,
    datastore: &D,
    state: &str,
) -> Result<JwtKey> {
    let key_ref = unique_key_ref(keys, format!("jwt-{now}"))?;
    // JWT-SVIDs are ES256 whatever the CA's key type: the algorithm every SPIFFE verifier supports.
    let key = keys.generate(&key_ref, KeyType::EcP256)?;
    let key_id = hex::encode(&sigil_core::x509::random_serial()?.to_bytes()[..12]);
    let not_after = now + i64::try_from(settings.ca_ttl.as_secs()).unwrap_or(i64::MAX / 2);
    let jwt = JwtKey::new(key_id.clone(), &key, not_after)?;
    datastore
        .put_authority(&Authority {
            id: key_id,
            kind: AuthorityKind::Jwt,
            key_ref,
            public_data: jwt.public_key.clone(),
            state: state.into(),
            not_after,
            created_at: now,
        })
        .await?;
    Ok(jwt)
}

/// The authority `id` of the journal.
async fn find<D: DataStore>(datastore: &D, id: &str) -> Result<Authority> {
    datastore
        .list_authorities()
        .await?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| Error::NotFound(format!("authority {id} (see `sigil-server ca show`)")))
}

/// Writes `authority` with `state` and returns it so.
async fn set_state<D: DataStore>(
    datastore: &D,
    authority: &Authority,
    state: &str,
) -> Result<Authority> {
    let mut changed = authority.clone();
    changed.state = state.into();
    datastore.put_authority(&changed).await?;
    Ok(changed)
}

/// `base`, or `base-N` when a key of that name exists (two authorities made in one second).
fn unique_key_ref(keys: &dyn KeyManager, base: String) -> Result<String> {
    if keys.load(&base)?.is_none() {
        return Ok(base);
    }
    for n in 1..1000 {
        let candidate = format!("{base}-{n}");
        if keys.load(&candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    Err(Error::Ca(format!(
        "cannot find a free key name near `{base}`"
    )))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use sigil_core::clock::{Clock, ManualClock};
    use sigil_core::id::parse_trust_domain;
    use sigil_core::x509::check_leaf_profile;

    use super::*;
    use crate::datastore::{IssuedSvid, SqlDataStore};

    fn settings() -> CaSettings {
        CaSettings {
            trust_domain: parse_trust_domain("trust_domain", "example.org").expect("td"),
            key_type: KeyType::EcP256,
            ca_ttl: Duration::from_secs(7 * 24 * 3600),
            default_x509_svid_ttl: Duration::from_secs(24 * 3600),
            default_jwt_svid_ttl: Duration::from_secs(300),
            bundle_refresh_hint: Duration::from_secs(300),
            upstream: None,
            reserved_dns_names: vec!["sigil-server.sigil.svc".into()],
        }
    }

    /// A temporary directory, a clock standing at a fixed time, and a SQLite datastore in it.
    async fn fixture() -> (tempfile::TempDir, Arc<ManualClock>, SqlDataStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        let ds = datastore(&dir, clock.clone()).await;
        (dir, clock, ds)
    }

    /// A CA whose keys live in memory only.
    async fn memory_ca(clock: &Arc<ManualClock>, ds: &SqlDataStore) -> Ca {
        Ca::load(
            settings(),
            Arc::new(MemoryKeyManager::default()),
            clock.clone(),
            ds,
        )
        .await
        .expect("ca")
    }

    async fn datastore(dir: &tempfile::TempDir, clock: SharedClock) -> SqlDataStore {
        let url = format!("sqlite://{}", dir.path().join("db.sqlite3").display());
        SqlDataStore::connect(&url, clock).await.expect("datastore")
    }

    #[tokio::test]
    async fn signs_profile_svids_and_keeps_its_ca_across_restarts() {
        let (dir, clock, ds) = fixture().await;
        let keys: Arc<dyn KeyManager> =
            Arc::new(DiskKeyManager::new(dir.path().join("keys")).expect("keys"));
        let ca = Ca::load(settings(), keys.clone(), clock.clone(), &ds)
            .await
            .expect("ca");
        let bundle = ca.bundle();
        assert_eq!(bundle.sequence, 1);
        assert_eq!(bundle.x509_authorities.len(), 1);
        assert_eq!(bundle.jwt_authorities.len(), 1);

        let key = KeyType::EcP256.generate().expect("key");
        let id = SpiffeId::new("spiffe://example.org/web").expect("id");
        let svid = ca
            .sign_x509_svid(&key, &id, &[], Duration::ZERO)
            .expect("signed");
        assert_eq!(check_leaf_profile(&svid.chain[0]).expect("profile"), id);
        assert_eq!(svid.not_after - clock.unix_now(), 24 * 3600, "default TTL");
        // A TTL beyond the CA's own life is capped at the CA's expiry.
        let long = ca
            .sign_x509_svid(&key, &id, &[], Duration::from_secs(30 * 24 * 3600))
            .expect("signed");
        assert_eq!(
            long.not_after,
            certificate_facts(&bundle.x509_authorities[0])
                .expect("facts")
                .not_after
        );

        let again = Ca::load(settings(), keys, clock.clone(), &ds)
            .await
            .expect("reloaded");
        assert_eq!(
            again.bundle().x509_authorities,
            bundle.x509_authorities,
            "same CA after restart"
        );
        assert_eq!(
            again.bundle().sequence,
            1,
            "an unchanged bundle keeps its sequence"
        );
    }

    #[tokio::test]
    async fn rotates_before_the_ca_runs_out_and_keeps_the_old_root_published() {
        let (_dir, clock, ds) = fixture().await;
        let ca = memory_ca(&clock, &ds).await;
        assert!(
            !ca.rotate_if_due(&ds).await.expect("check"),
            "nothing due on day one"
        );
        clock.advance(Duration::from_secs(5 * 24 * 3600 + 1));
        assert!(ca.rotate_if_due(&ds).await.expect("rotated"));
        let bundle = ca.bundle();
        assert_eq!(
            bundle.x509_authorities.len(),
            2,
            "old and new roots are both trusted"
        );
        assert_eq!(bundle.sequence, 2);
        let key = KeyType::EcP256.generate().expect("key");
        let svid = ca
            .sign_x509_svid(
                &key,
                &SpiffeId::new("spiffe://example.org/web").expect("id"),
                &[],
                Duration::ZERO,
            )
            .expect("signed");
        assert_eq!(
            svid.not_after - clock.unix_now(),
            24 * 3600,
            "the new CA signs full-length SVIDs"
        );
        clock.advance(Duration::from_secs(3 * 24 * 3600));
        ca.rotate_if_due(&ds).await.expect("check");
        assert_eq!(
            ca.bundle().x509_authorities.len(),
            1,
            "the expired root leaves the bundle"
        );
    }

    fn sign_web(ca: &Ca) -> SignedX509Svid {
        let key = KeyType::EcP256.generate().expect("key");
        ca.sign_x509_svid(
            &key,
            &SpiffeId::new("spiffe://example.org/web").expect("id"),
            &[],
            Duration::ZERO,
        )
        .expect("signed")
    }

    fn issued(svid: &SignedX509Svid) -> IssuedSvid {
        IssuedSvid {
            serial: svid.serial.clone(),
            kind: "x509".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            agent_id: "spiffe://example.org/sigil/agent/join_token/a".into(),
            entry_id: "e1".into(),
            authority_id: svid.authority_id.clone(),
            not_before: svid.not_before,
            not_after: svid.not_after,
        }
    }

    #[tokio::test]
    async fn the_journal_prepares_activates_taints_and_revokes() {
        let (_dir, clock, ds) = fixture().await;
        let ca = memory_ca(&clock, &ds).await;
        let first = ca.x509.load().id.clone();
        let before = sign_web(&ca);
        ds.record_issued_svids(&[issued(&before)])
            .await
            .expect("recorded");

        // Prepared: published at once, not signing yet.
        let prepared = ca.prepare(&ds).await.expect("prepared");
        assert_eq!(prepared.len(), 2, "an X.509 CA and a JWT key");
        assert_eq!(ca.bundle().x509_authorities.len(), 2);
        assert_eq!(ca.bundle().jwt_authorities.len(), 2);
        assert_eq!(
            sign_web(&ca).authority_id,
            first,
            "still the first CA signs"
        );
        assert!(ca.prepare(&ds).await.is_err(), "one prepared set at a time");

        // Active: the new one signs; the first is old and still trusted.
        ca.activate(&ds).await.expect("activated");
        let second = ca.x509.load().id.clone();
        assert_ne!(first, second);
        assert_eq!(ca.bundle().x509_authorities.len(), 2);
        assert!(ca.activate(&ds).await.is_err(), "nothing prepared any more");

        // Only an old authority can be tainted; tainting keeps it in the bundle.
        assert!(ca.taint(&ds, &second).await.is_err(), "not the active one");
        ca.taint(&ds, &first).await.expect("tainted");
        assert_eq!(ca.tainted().as_slice(), std::slice::from_ref(&first));
        assert_eq!(ca.bundle().x509_authorities.len(), 2);

        // Revocation waits until what it signed has been replaced.
        let refused = ca.revoke(&ds, &first).await.expect_err("not replaced yet");
        assert!(
            refused.to_string().contains("not been replaced"),
            "{refused}"
        );
        assert!(ca.revoke(&ds, &second).await.is_err(), "only tainted ones");
        ds.record_issued_svids(&[issued(&sign_web(&ca))])
            .await
            .expect("recorded");
        ca.revoke(&ds, &first).await.expect("revoked");
        assert_eq!(ca.bundle().x509_authorities.len(), 1, "out of the bundle");
        assert!(ca.tainted().is_empty());
    }

    #[tokio::test]
    async fn the_schedule_prepares_at_half_life_and_activates_after_a_refresh_hint() {
        let (_dir, clock, ds) = fixture().await;
        let ca = memory_ca(&clock, &ds).await;
        let first = ca.x509.load().id.clone();
        // 7-day CA, 24 h SVIDs: prepare at 3.5 days, activate with 2 days left.
        clock.advance(Duration::from_secs(3 * 24 * 3600 + 13 * 3600));
        assert!(ca.rotate_if_due(&ds).await.expect("prepared"));
        assert_eq!(ca.x509.load().id, first, "prepared, not active");
        assert_eq!(ca.bundle().x509_authorities.len(), 2);
        clock.advance(Duration::from_secs(24 * 3600 + 12 * 3600));
        ca.rotate_if_due(&ds).await.expect("activated");
        assert_ne!(ca.x509.load().id, first, "the prepared CA signs now");
        assert_eq!(
            sign_web(&ca).not_after - clock.unix_now(),
            24 * 3600,
            "full-length SVIDs"
        );
    }

    #[tokio::test]
    async fn a_missing_key_means_a_new_ca_not_a_crash() {
        let (_dir, clock, ds) = fixture().await;
        let first = memory_ca(&clock, &ds).await;
        let second = memory_ca(&clock, &ds).await;
        assert_ne!(first.x509.load().id, second.x509.load().id);
        assert_eq!(
            second.bundle().x509_authorities.len(),
            2,
            "the lost CA stays trusted until it expires"
        );
    }

    #[tokio::test]
    async fn jwt_svids_need_an_audience_and_expire_with_their_key() {
        let (_dir, clock, ds) = fixture().await;
        let ca = memory_ca(&clock, &ds).await;
        let id = SpiffeId::new("spiffe://example.org/web").expect("id");
        assert!(ca.sign_jwt_svid(&id, &[], Duration::ZERO).is_err());
        assert!(
            ca.sign_jwt_svid(&id, &[String::new()], Duration::ZERO)
                .is_err()
        );
        let jwt = ca
            .sign_jwt_svid(&id, &["db".into()], Duration::ZERO)
            .expect("signed");
        assert_eq!(jwt.expires_at - jwt.issued_at, 300);
        assert!(
            ca.bundle()
                .jwt_authorities
                .iter()
                .any(|k| k.key_id == jwt.key_id)
        );
    }

    #[tokio::test]
    async fn workload_signing_never_issues_a_reserved_id() {
        let (_dir, clock, ds) = fixture().await;
        let ca = memory_ca(&clock, &ds).await;
        let key = KeyType::EcP256.generate().expect("key");
        let workload = SpiffeId::new("spiffe://example.org/web").expect("id");
        for reserved in [
            "spiffe://example.org/sigil/server",
            "spiffe://example.org/sigil/agent/join_token/abc",
            "spiffe://example.org/sigil/x",
        ] {
            let id = SpiffeId::new(reserved).expect("id");
            let err = ca
                .sign_x509_svid(&key, &id, &[], Duration::ZERO)
                .expect_err("a workload SVID with a reserved ID");
            assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
            assert!(
                ca.sign_jwt_svid(&id, &["db".into()], Duration::ZERO)
                    .is_err()
            );
            ca.sign_component_x509_svid(&key, &id, &[], Duration::ZERO)
                .expect("components are signed on their own path");
        }
        assert!(
            ca.sign_component_x509_svid(&key, &workload, &[], Duration::ZERO)
                .is_err(),
            "the component path signs only reserved IDs"
        );
        for name in ["sigil-server.sigil.svc", "*.sigil.svc"] {
            let err = ca
                .sign_x509_svid(&key, &workload, &[name.into()], Duration::ZERO)
                .expect_err("a workload SVID with the server's DNS name");
            assert!(err.to_string().contains("server_dns_names"), "{err}");
        }
    }
}

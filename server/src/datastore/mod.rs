//! The datastore: the source of truth for entries, agents, join tokens, bundles, the CA journal
//! and the record of issued SVIDs.
//!
//! One narrow trait per concern: [`EntryStore`], [`AgentStore`], [`JoinTokenStore`],
//! [`BundleStore`] (bundles and federation relationships), [`AuthorityJournal`] (the CA journal),
//! [`IssuedSvidStore`] (the issuance record) and [`ChangeFeed`]. [`DataStore`] is all of them plus
//! a health check; the rest of the server is generic over it. [`SqlDataStore`] implements each
//! trait once, in the `sql/` file of its concern, for SQLite (the embedded default) and Postgres
//! through sqlx's Any driver. Each trait has its own conformance suite
//! (`server/tests/datastore/<concern>.rs`), written against the trait and run on both databases.
//!
//! Every write that another server must see (entries, agents and bans, bundles, federation
//! relationships, the CA journal) appends an [`Event`] in the same transaction: the change feed
//! that lets in-memory caches, this server's and those of other servers sharing the database,
//! follow without rescanning tables. On Postgres the commit also sends a `NOTIFY` (migration
//! `0005_event_notify.sql`), which [`ChangeFeed::listen`] turns into a wake-up, so other servers
//! read the feed at once instead of on their next poll.

mod sql;

use std::future::Future;

use sigil_core::bundle::TrustBundle;
use sigil_core::entry::Entry;
use sigil_core::id::{SpiffeId, TrustDomain};
use sigil_core::selector::Selector;

use crate::Result;
use crate::ca::AuthorityState;

pub use sql::{ChangeListener, SqlDataStore};

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// `spiffe://<td>/sigil/agent/<attestor>/...`
    pub spiffe_id: String,
    /// The node attestor that vouched for it, e.g. `join_token`.
    pub attestor: String,
    /// Node selectors from attestation (what node aliases match on).
    pub selectors: Vec<Selector>,
    /// Hex serial of the agent's current SVID.
    pub svid_serial: String,
    /// Hex serial of the SVID before the last renewal (empty after an attestation).
    pub previous_svid_serial: String,
    /// Unix seconds.
    pub svid_expires_at: i64,
    /// A banned agent cannot attest again until it is evicted (deleted).
    pub banned: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A join token, as stored: only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Lower-case hex SHA-256 of the token.
    pub token_hash: String,
    /// A node alias the agent receives, or empty.
    pub alias_spiffe_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub created_at: i64,
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token was ever issued.
    Unknown,
    /// The token was used already.
    AlreadyUsed,
    /// The token's expiry has passed.
    Expired,
}

/// What kind of key an authority holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityKind {
    /// An X.509 CA certificate.
    X509,
    /// A JWT signing key.
    Jwt,
}

impl AuthorityKind {
    fn as_str(self) -> &'static str {
        match self {
            AuthorityKind::X509 => "x509",
            AuthorityKind::Jwt => "jwt",
        }
    }
}

/// How a foreign trust domain's bundle endpoint proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// Web PKI: a certificate for the URL's host name from a CA the system trusts.
    HttpsWeb,
    /// An X509-SVID with this SPIFFE ID, verified against the last stored bundle of the foreign
    /// trust domain (the first one given when the relationship is created).
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: SpiffeId,
    },
}

impl EndpointProfile {
    /// `https_web` or `https_spiffe`.
    pub fn name(&self) -> &'static str {
        match self {
            EndpointProfile::HttpsWeb => "https_web",
            EndpointProfile::HttpsSpiffe { .. } => "https_spiffe",
        }
    }
}

/// A federation relationship: this server fetches a foreign trust domain's bundle from its
/// bundle endpoint and keeps it in the datastore beside its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRelationship {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// `https://...` serving the domain's SPIFFE bundle.
    pub bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    pub profile: EndpointProfile,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// One entry of the CA journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// X.509: hex subject key identifier; JWT: the `kid`.
    pub id: String,
    /// X.509 CA or JWT key.
    pub kind: AuthorityKind,
    /// The key manager's id for the private key.
    pub key_ref: String,
    /// X.509: the DER certificate; JWT: the DER SubjectPublicKeyInfo.
    pub public_data: Vec<u8>,
    /// Where it is in the journal.
    pub state: AuthorityState,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// The server instance that holds its key and acts on it (prepares, activates, signs);
    /// empty for rows written before servers were told apart, until their server adopts them.
    pub owner: String,
}

/// A record of one signed SVID. Never holds a key. Serialised as JSON in the issuance spool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedSvid {
    /// X.509: hex serial; JWT: the `jti`.
    pub serial: String,
    /// `x509` or `jwt`.
    pub kind: String,
    /// The identity in it.
    pub spiffe_id: String,
    /// The agent that asked for it (empty for the server's own SVIDs).
    pub agent_id: String,
    /// The entry it was issued for (empty for agent and server SVIDs).
    pub entry_id: String,
    /// The signing authority's id.
    pub authority_id: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// Filters for [`EntryStore::list_entries`]; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Exact parent ID.
    pub parent_id: Option<String>,
    /// Entries having all of these selectors.
    pub selectors: Vec<Selector>,
}

/// Filters for [`IssuedSvidStore::list_issued_svids`]; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct SvidFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Exact agent ID.
    pub agent_id: Option<String>,
    /// Only SVIDs whose `not_after` is after this time (Unix seconds).
    pub valid_at: Option<i64>,
}

/// What a change-feed event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An entry was created, updated or deleted; the subject is its id.
    Entry,
    /// An agent was attested, renewed, banned or evicted; the subject is its SPIFFE ID.
    Agent,
    /// A bundle changed or was deleted; the subject is its trust domain.
    Bundle,
    /// A federation relationship was created, updated or deleted; the subject is its trust
    /// domain.
    Federation,
    /// An authority of the CA journal was made or changed state (on any server); the subject is
    /// its id.
    Authority,
}

/// One change-feed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Increasing position in the feed.
    pub id: u64,
    /// What changed.
    pub kind: EventKind,
    /// Which one changed.
    pub subject: String,
}

/// The server's persistent state: every concern's store, plus a health check.
///
/// The rest of the server is generic over `D: DataStore`, so it can call any store's methods;
/// code holding a concrete [`SqlDataStore`] imports the narrow trait it uses. Writes are
/// transactional: either the row and its change event are written, or neither.
pub trait DataStore:
    EntryStore
    + AgentStore
    + JoinTokenStore
    + BundleStore
    + AuthorityJournal
    + IssuedSvidStore
    + ChangeFeed
    + Send
    + Sync
    + 'static
{
    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
}

/// Registration entries. Each write appends an [`EventKind::Entry`] event.
pub trait EntryStore {
    /// Stores a new entry; refuses an exact duplicate (same SPIFFE ID, parent and selectors).
    /// Returns it with its revision.
    fn create_entry(&self, entry: &Entry) -> impl Future<Output = Result<Entry>> + Send;
    /// Replaces the entry with the same id (keeping its `created_at`).
    fn update_entry(&self, entry: &Entry) -> impl Future<Output = Result<Entry>> + Send;
    /// Deletes an entry and returns what it was.
    fn delete_entry(&self, id: &str) -> impl Future<Output = Result<Entry>> + Send;
    /// Applies a batch of writes in one transaction: each gets its own result (`AlreadyExists`
    /// for a duplicate, `NotFound` for a missing id), in the order given, and every write that
    /// succeeded is committed together. A failure of the database itself fails the whole batch,
    /// and nothing of it is written.
    fn write_entries(
        &self,
        writes: &[EntryWrite],
    ) -> impl Future<Output = Result<Vec<Result<Entry>>>> + Send;
    /// One entry by id.
    fn get_entry(&self, id: &str) -> impl Future<Output = Result<Option<Entry>>> + Send;
    /// The entries among `ids` that exist, in any order.
    fn get_entries(&self, ids: &[String]) -> impl Future<Output = Result<Vec<Entry>>> + Send;
    /// Entries matching the filter, ordered by id.
    fn list_entries(&self, filter: &EntryFilter)
    -> impl Future<Output = Result<Vec<Entry>>> + Send;
    /// At most `limit` entries matching the filter whose ids sort after `after` (empty: from the
    /// start), ordered by id: a page that stays stable while entries are written.
    fn list_entries_page(
        &self,
        filter: &EntryFilter,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Entry>>> + Send;
    /// How many entries match the filter.
    fn count_entries(&self, filter: &EntryFilter) -> impl Future<Output = Result<u64>> + Send;
}

/// One write of a batch given to [`EntryStore::write_entries`].
#[derive(Debug, Clone)]
pub enum EntryWrite {
    /// A new entry (its id already assigned).
    Create(Entry),
    /// Replaces the stored entry with the same id; its `created_at` is kept.
    Update(Entry),
    /// Deletes the entry with this id.
    Delete(String),
}

/// Attested agents. Each write appends an [`EventKind::Agent`] event.
pub trait AgentStore {
    /// Creates or replaces an agent (after attestation). Never lifts a ban: when the stored agent
    /// is banned nothing is written and the call fails with `PermissionDenied`, decided in the same
    /// statement, so a ban racing an attestation always wins.
    fn put_agent(&self, agent: &AgentRecord) -> impl Future<Output = Result<()>> + Send;
    /// One agent by SPIFFE ID.
    fn get_agent(
        &self,
        spiffe_id: &str,
    ) -> impl Future<Output = Result<Option<AgentRecord>>> + Send;
    /// All agents, ordered by SPIFFE ID.
    fn list_agents(&self) -> impl Future<Output = Result<Vec<AgentRecord>>> + Send;
    /// At most `limit` agents whose SPIFFE IDs sort after `after` (empty: from the start).
    fn list_agents_page(
        &self,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AgentRecord>>> + Send;
    /// How many agents are stored.
    fn count_agents(&self) -> impl Future<Output = Result<u64>> + Send;
    /// Records a renewed agent SVID, asked for with the certificate of `presented_serial`: it
    /// becomes the previous serial and `serial` the current one. Refused with `PermissionDenied`
    /// unless `presented_serial` is the stored current or previous serial of an agent that is not
    /// banned (so a lost answer can be retried with the same certificate, but a certificate from
    /// before a re-attestation cannot renew); `NotFound` when there is no such agent.
    fn set_agent_svid(
        &self,
        spiffe_id: &str,
        presented_serial: &str,
        serial: &str,
        expires_at: i64,
        now: i64,
    ) -> impl Future<Output = Result<AgentRecord>> + Send;
    /// Marks an agent banned: it keeps its row but can neither call the server nor attest.
    fn ban_agent(
        &self,
        spiffe_id: &str,
        now: i64,
    ) -> impl Future<Output = Result<AgentRecord>> + Send;
    /// Deletes an agent: it must attest again.
    fn delete_agent(&self, spiffe_id: &str) -> impl Future<Output = Result<AgentRecord>> + Send;
}

/// Join tokens, stored only as hashes and used at most once.
pub trait JoinTokenStore {
    /// Stores a new join token (its hash).
    fn create_join_token(&self, token: &JoinToken) -> impl Future<Output = Result<()>> + Send;
    /// Marks a join token used, atomically, so two callers cannot both use it.
    /// Returns the token, or why it was refused.
    fn use_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> impl Future<Output = Result<Result<JoinToken, TokenRefusal>>> + Send;
    /// Deletes tokens that expired before `before`; returns how many.
    fn prune_join_tokens(&self, before: i64) -> impl Future<Output = Result<u64>> + Send;
}

/// Trust bundles (own and foreign) and the federation relationships that fetch foreign ones.
/// Each write appends an [`EventKind::Bundle`] or [`EventKind::Federation`] event.
pub trait BundleStore {
    /// The bundle of a trust domain.
    fn get_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> impl Future<Output = Result<Option<TrustBundle>>> + Send;
    /// Creates or replaces the bundle of its trust domain.
    fn put_bundle(&self, bundle: &TrustBundle) -> impl Future<Output = Result<()>> + Send;
    /// Every stored bundle, own and foreign, by trust domain name.
    fn list_bundles(&self) -> impl Future<Output = Result<Vec<TrustBundle>>> + Send;
    /// Deletes a trust domain's bundle; returns whether there was one.
    fn delete_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Creates or replaces a federation relationship (by its trust domain).
    fn put_federation(
        &self,
        relationship: &FederationRelationship,
    ) -> impl Future<Output = Result<()>> + Send;
    /// One federation relationship.
    fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> impl Future<Output = Result<Option<FederationRelationship>>> + Send;
    /// Every federation relationship, by trust domain name.
    fn list_federations(&self) -> impl Future<Output = Result<Vec<FederationRelationship>>> + Send;
    /// Deletes a federation relationship (not the bundle it fetched); returns it if it existed.
    fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> impl Future<Output = Result<Option<FederationRelationship>>> + Send;
}

/// The CA journal: every X.509 CA certificate and JWT key, and where it is in its life. Each
/// write appends an [`EventKind::Authority`] event.
pub trait AuthorityJournal {
    /// The whole CA journal, oldest first.
    fn list_authorities(&self) -> impl Future<Output = Result<Vec<Authority>>> + Send;
    /// Creates or replaces one authority.
    fn put_authority(&self, authority: &Authority) -> impl Future<Output = Result<()>> + Send;
}

/// The issuance record: one [`IssuedSvid`] per SVID the server signed.
pub trait IssuedSvidStore {
    /// Records signed SVIDs, all in one transaction. A serial already recorded is kept as is.
    fn record_issued_svids(&self, svids: &[IssuedSvid]) -> impl Future<Output = Result<()>> + Send;
    /// Issued SVIDs matching the filter, newest first.
    fn list_issued_svids(
        &self,
        filter: &SvidFilter,
    ) -> impl Future<Output = Result<Vec<IssuedSvid>>> + Send;
    /// One issued SVID by serial.
    fn get_issued_svid(
        &self,
        serial: &str,
    ) -> impl Future<Output = Result<Option<IssuedSvid>>> + Send;
    /// Deletes records of SVIDs that expired before `before`; returns how many.
    fn prune_issued_svids(&self, before: i64) -> impl Future<Output = Result<u64>> + Send;
}

/// The most ids one [`ChangeFeed::events_with_ids`] call takes.
pub const MAX_EVENT_IDS: usize = 500;

/// The change feed: the [`Event`]s the other stores append with each write.
pub trait ChangeFeed {
    /// Up to `limit` change-feed events after `after`, oldest first.
    fn events_after(
        &self,
        after: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send;
    /// The events among `ids` that exist (at most [`MAX_EVENT_IDS`] ids), oldest first: how the
    /// feed looks again for ids it skipped over, whose transactions had not committed yet.
    fn events_with_ids(&self, ids: &[u64]) -> impl Future<Output = Result<Vec<Event>>> + Send;
    /// The newest event id (0 when there is none).
    fn latest_event_id(&self) -> impl Future<Output = Result<u64>> + Send;
    /// Deletes events created before `before` (Unix seconds); returns how many.
    fn prune_events(&self, before: i64) -> impl Future<Output = Result<u64>> + Send;
    /// A connection that is told whenever a transaction that appended events commits, from any
    /// handle on the same database; `None` where the database cannot push (SQLite, which the
    /// poll serves alone). Fails when the database cannot be reached; the caller tries again.
    fn listen(&self) -> impl Future<Output = Result<Option<ChangeListener>>> + Send;
}

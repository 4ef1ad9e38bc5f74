//! The datastore conformance suites: one module per narrow trait of `sigil_server::datastore`
//! (entries, agents, join tokens, bundles and federation, CA journal, issuance record, change
//! feed) plus persistence across reconnecting. Each case is a generic function over the traits it
//! exercises, so any implementation can be held to it; [`on_both_backends!`] runs every case
//! against SQLite and against Postgres. On a machine without Postgres the Postgres half prints a
//! notice and passes; under `CI=true` it fails instead.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use sigil_core::bundle::TrustBundle;
use sigil_core::clock::{ManualClock, SharedClock};
use sigil_core::entry::{Entry, EntryInput};
use sigil_core::id::parse_trust_domain;
use sigil_core::selector::Selector;
use sigil_server::datastore::{AgentRecord, JoinToken, SqlDataStore};

/// Generates `on_sqlite::<case>` and `on_postgres::<case>` tests in the calling module. A case is
/// called as `case(&backend.store)`, or, when written `case(backend) => call`, by `call` with
/// `backend` (a [`Backend`]) in scope, for cases that need more than the store.
macro_rules! on_both_backends {
    ($($case:ident $(($backend:ident) => $call:expr)?),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let backend = $crate::Backend::sqlite().await?;
                    on_both_backends!(@call backend, $case $(, $backend => $call)?)
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    match $crate::Backend::postgres(stringify!($case)).await? {
                        Some(backend) => {
                            on_both_backends!(@call backend, $case $(, $backend => $call)?)
                        }
                        None => Ok(()),
                    }
                }
            )*
        }
    };
    (@call $given:ident, $case:ident) => {
        super::$case(&$given.store).await
    };
    (@call $given:ident, $case:ident, $backend:ident => $call:expr) => {{
        let $backend = $given;
        $call
    }};
}

mod agents;
mod authorities;
mod bundles;
mod entries;
mod events;
mod issued_svids;
mod join_tokens;
mod persistence;

/// The time every case runs at, on a [`ManualClock`].
const NOW: i64 = 1_800_000_000;

/// The agent most cases attest or parent entries to.
const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/abc";

/// A datastore under test, and what keeps it alive.
struct Backend {
    store: SqlDataStore,
    url: String,
    clock: SharedClock,
    _dir: tempfile::TempDir,
    _database: Option<sigil_tests::postgres::FreshDatabase>,
}

impl Backend {
    /// A new SQLite file in a temporary directory.
    async fn sqlite() -> anyhow::Result<Backend> {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}",
            dir.path().join("conformance.sqlite3").display()
        );
        Backend::open(url, dir, None).await
    }

    /// A fresh Postgres database, or `None` when Postgres is unavailable off CI.
    async fn postgres(test: &str) -> anyhow::Result<Option<Backend>> {
        let Some(database) = sigil_tests::postgres::fresh_database(test).await? else {
            return Ok(None);
        };
        let url = database.url.clone();
        Ok(Some(
            Backend::open(url, tempfile::tempdir()?, Some(database)).await?,
        ))
    }

    async fn open(
        url: String,
        dir: tempfile::TempDir,
        database: Option<sigil_tests::postgres::FreshDatabase>,
    ) -> anyhow::Result<Backend> {
        let clock: SharedClock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(NOW as u64),
        ));
        let store = SqlDataStore::connect(&url, clock.clone()).await?;
        Ok(Backend {
            store,
            url,
            clock,
            _dir: dir,
            _database: database,
        })
    }

    /// Closes the store and connects again to the same database.
    async fn reconnect(&self) -> anyhow::Result<SqlDataStore> {
        self.store.close().await;
        Ok(SqlDataStore::connect(&self.url, self.clock.clone()).await?)
    }
}

/// A valid entry in `example.org`.
fn entry(id: &str, spiffe_id: &str, parent_id: &str, selectors: &[&str]) -> Entry {
    let td = parse_trust_domain("trust_domain", "example.org").expect("td");
    EntryInput {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: selectors
            .iter()
            .map(|s| Selector::parse(s).expect("selector"))
            .collect(),
        dns_names: vec!["web.example.org".into()],
        federates_with: vec!["partner.org".into()],
        x509_svid_ttl: 3600,
        hint: "internal".into(),
        ..EntryInput::default()
    }
    .validate(&td, id.into(), NOW)
    .expect("valid entry")
}

/// The entry the change-feed and persistence cases write: `e1`, for `web` under [`AGENT`].
fn web_entry() -> Entry {
    entry("e1", "spiffe://example.org/web", AGENT, &["unix:uid:1"])
}

/// A freshly attested agent.
fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.into(),
        attestor: "join_token".into(),
        selectors: vec![Selector::parse("join_token:abc").expect("selector")],
        svid_serial: "01".into(),
        previous_svid_serial: String::new(),
        svid_expires_at: NOW + 3600,
        banned: false,
        created_at: NOW,
        updated_at: NOW,
    }
}

/// An unused join token without alias.
fn token(hash: &str, expires_at: i64) -> JoinToken {
    JoinToken {
        token_hash: hash.into(),
        alias_spiffe_id: String::new(),
        expires_at,
        created_at: NOW,
    }
}

/// A bundle of `domain` holding one fresh self-signed CA.
fn bundle_of(domain: &str, sequence: u64) -> anyhow::Result<TrustBundle> {
    let td = parse_trust_domain("trust_domain", domain)?;
    let key = sigil_core::x509::KeyType::EcP256.generate()?;
    let ca = sigil_core::x509::root_ca_params(
        &td,
        UNIX_EPOCH + Duration::from_secs(NOW as u64),
        Duration::from_secs(86_400),
    )?
    .self_signed(&key)?;
    let mut bundle = TrustBundle::new(td);
    bundle.x509_authorities.push(ca.der().to_vec());
    bundle.sequence = sequence;
    Ok(bundle)
}

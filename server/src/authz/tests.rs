use std::time::{Duration, UNIX_EPOCH};

use sigil_core::clock::{Clock, ManualClock};
use sigil_core::entry::EntryInput;
use sigil_core::id::parse_trust_domain;

use super::*;
use crate::datastore::{AgentRecord, AgentStore, EntryStore, SqlDataStore};
use crate::feed::Feed;

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/a1";
const OTHER_AGENT: &str = "spiffe://example.org/sigil/agent/join_token/b2";

struct Fixture {
    datastore: SqlDataStore,
    feed: Feed,
    authz: Arc<Authorizations>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let url = format!("sqlite://{}", dir.path().join("db.sqlite3").display());
    let datastore = SqlDataStore::connect(&url, clock.clone())
        .await
        .expect("datastore");
    for (id, selector) in [(AGENT, "join_token:a1"), (OTHER_AGENT, "join_token:b2")] {
        datastore
            .put_agent(&AgentRecord {
                spiffe_id: id.into(),
                attestor: "join_token".into(),
                selectors: vec![Selector::parse(selector).expect("selector")],
                svid_serial: String::new(),
                previous_svid_serial: String::new(),
                svid_expires_at: 0,
                banned: false,
                created_at: 0,
                updated_at: 0,
            })
            .await
            .expect("agent");
    }
    let td = parse_trust_domain("trust_domain", "example.org").expect("td");
    let feed = Feed::load(sources(td, &clock), &datastore)
        .await
        .expect("load");
    Fixture {
        datastore,
        authz: feed.authz().clone(),
        feed,
        clock,
        _dir: dir,
    }
}

/// An entry to store: id, SPIFFE ID, parent ID, one selector, expiry (0: never).
type TestEntry<'a> = (&'a str, &'a str, &'a str, &'a str, i64);

/// The entry most tests start from: a workload directly under [`AGENT`].
const DIRECT: TestEntry = ("direct", "spiffe://example.org/web", AGENT, "unix:uid:1", 0);

async fn add_entries(f: &Fixture, entries: &[TestEntry<'_>]) {
    let td = parse_trust_domain("trust_domain", "example.org").expect("td");
    for &(id, spiffe_id, parent, selector, expires_at) in entries {
        let entry = EntryInput {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.into(),
            selectors: vec![Selector::parse(selector).expect("selector")],
            expires_at,
            ..EntryInput::default()
        }
        .validate(&td, id.into(), f.clock.unix_now())
        .expect("valid");
        f.datastore.create_entry(&entry).await.expect("created");
    }
}

fn sources(trust_domain: TrustDomain, clock: &Arc<ManualClock>) -> AuthzSources {
    AuthzSources {
        trust_domain,
        clock: clock.clone(),
        pods: None,
    }
}

fn ids(entries: &[Arc<Entry>]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

#[tokio::test]
async fn agents_get_their_own_and_their_aliases_entries_only() {
    let f = fixture().await;
    add_entries(
        &f,
        &[
            DIRECT,
            (
                "alias",
                "spiffe://example.org/node/one",
                "spiffe://example.org/sigil/server",
                "join_token:a1",
                0,
            ),
            (
                "via-alias",
                "spiffe://example.org/db",
                "spiffe://example.org/node/one",
                "unix:uid:2",
                0,
            ),
            (
                "foreign",
                "spiffe://example.org/admin",
                OTHER_AGENT,
                "unix:uid:3",
                0,
            ),
        ],
    )
    .await;
    let changes = f.feed.subscribe();
    f.feed.catch_up(&f.datastore).await.expect("catch up");
    assert!(
        changes.has_changed().expect("open"),
        "a change wakes subscribers"
    );

    assert_eq!(
        ids(&f.authz.entries_for_agent(AGENT)),
        ["direct", "via-alias"]
    );
    assert_eq!(ids(&f.authz.entries_for_agent(OTHER_AGENT)), ["foreign"]);
    assert!(f.authz.authorize(AGENT, "via-alias").is_ok());
    assert!(matches!(
        f.authz.authorize(AGENT, "foreign"),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        f.authz.authorize(AGENT, "missing"),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        f.authz
            .authorize("spiffe://example.org/sigil/agent/x/y", "direct"),
        Err(Error::PermissionDenied(_))
    ));
}

#[tokio::test]
async fn deletes_bans_evictions_and_expiry_take_effect() {
    let f = fixture().await;
    add_entries(
        &f,
        &[
            DIRECT,
            (
                "short",
                "spiffe://example.org/batch",
                AGENT,
                "unix:uid:9",
                f.clock.unix_now() + 60,
            ),
        ],
    )
    .await;
    f.feed.catch_up(&f.datastore).await.expect("catch up");
    assert_eq!(ids(&f.authz.entries_for_agent(AGENT)), ["direct", "short"]);

    f.clock.advance(Duration::from_secs(61));
    assert_eq!(
        ids(&f.authz.entries_for_agent(AGENT)),
        ["direct"],
        "expired entries stop applying"
    );

    f.datastore.delete_entry("direct").await.expect("deleted");
    f.feed.catch_up(&f.datastore).await.expect("catch up");
    assert!(f.authz.entries_for_agent(AGENT).is_empty());

    f.datastore.ban_agent(OTHER_AGENT, 0).await.expect("banned");
    f.datastore.delete_agent(AGENT).await.expect("evicted");
    f.feed.catch_up(&f.datastore).await.expect("catch up");
    assert!(
        f.authz
            .check_agent(OTHER_AGENT)
            .unwrap_err()
            .to_string()
            .contains("banned")
    );
    assert!(
        f.authz
            .check_agent(AGENT)
            .unwrap_err()
            .to_string()
            .contains("not attested")
    );
}

#[tokio::test]
async fn a_second_cache_on_the_same_database_follows_the_first_ones_writes() {
    let f = fixture().await;
    let td = parse_trust_domain("trust_domain", "example.org").expect("td");
    let other_server = Feed::load(sources(td, &f.clock), &f.datastore)
        .await
        .expect("load");
    add_entries(&f, &[DIRECT]).await;
    other_server.catch_up(&f.datastore).await.expect("catch up");
    assert_eq!(
        ids(&other_server.authz().entries_for_agent(AGENT)),
        ["direct"]
    );
    // Catching up again applies nothing twice and changes nothing.
    let mut changes = other_server.subscribe();
    changes.mark_unchanged();
    other_server.catch_up(&f.datastore).await.expect("catch up");
    assert!(!changes.has_changed().expect("open"));
}

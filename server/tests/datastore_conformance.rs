//! The datastore conformance suite: every case runs against SQLite and against Postgres, through
//! the same `DataStore` trait the server uses. On a machine without Postgres the Postgres half
//! prints a notice and passes; under `CI=true` it fails instead.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use sigil_core::bundle::{JwtAuthority, TrustBundle};
use sigil_core::clock::{ManualClock, SharedClock};
use sigil_core::entry::{Entry, EntryInput};
use sigil_core::id::{parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::Selector;
use sigil_server::Error;
use sigil_server::ca::AuthorityState;
use sigil_server::datastore::{
    AgentRecord, Authority, AuthorityKind, DataStore, EndpointProfile, EntryFilter, EventKind,
    FederationRelationship, IssuedSvid, JoinToken, SqlDataStore, SvidFilter, TokenRefusal,
};

const NOW: i64 = 1_800_000_000;

/// A datastore under test, and what keeps it alive.
struct Backend {
    store: SqlDataStore,
    url: String,
    clock: SharedClock,
    _dir: tempfile::TempDir,
    _database: Option<sigil_tests::postgres::FreshDatabase>,
}

impl Backend {
    async fn reopen(&self) -> anyhow::Result<SqlDataStore> {
        Ok(SqlDataStore::connect(&self.url, self.clock.clone()).await?)
    }
}

async fn sqlite() -> anyhow::Result<Option<Backend>> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}",
        dir.path().join("conformance.sqlite3").display()
    );
    let clock: SharedClock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(NOW as u64),
    ));
    let store = SqlDataStore::connect(&url, clock.clone()).await?;
    Ok(Some(Backend {
        store,
        url,
        clock,
        _dir: dir,
        _database: None,
    }))
}

async fn postgres(test: &str) -> anyhow::Result<Option<Backend>> {
    let Some(database) = sigil_tests::postgres::fresh_database(test).await? else {
        return Ok(None);
    };
    let clock: SharedClock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(NOW as u64),
    ));
    let store = SqlDataStore::connect(&database.url, clock.clone()).await?;
    Ok(Some(Backend {
        store,
        url: database.url.clone(),
        clock,
        _dir: tempfile::tempdir()?,
        _database: Some(database),
    }))
}

/// Generates `sqlite::<case>` and `postgres::<case>` tests for each case.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::sqlite().await?.expect("SQLite is always available");
                    super::$case(&backend).await
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    match super::postgres(stringify!($case)).await? {
                        Some(backend) => super::$case(&backend).await,
                        None => Ok(()),
                    }
                }
            )*
        }
    };
}

conformance!(
    entries_round_trip_and_filter,
    duplicate_entries_are_refused_without_writing,
    missing_entries_are_not_found,
    agents_are_attested_renewed_banned_and_evicted,
    join_tokens_are_single_use,
    join_tokens_are_single_use_under_concurrency,
    bundles_round_trip,
    foreign_bundles_are_listed_and_deleted,
    federation_relationships_round_trip,
    authorities_journal,
    issued_svids_are_recorded_filtered_and_pruned,
    change_feed_follows_every_write,
    data_survives_reconnecting,
);

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

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/abc";

async fn entries_round_trip_and_filter(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    let web = ds
        .create_entry(&entry(
            "e1",
            "spiffe://example.org/web",
            AGENT,
            &["unix:uid:1000", "k8s:ns:prod"],
        ))
        .await?;
    assert!(web.revision > 0);
    assert_eq!(ds.get_entry("e1").await?, Some(web.clone()));
    ds.create_entry(&entry(
        "e2",
        "spiffe://example.org/db",
        AGENT,
        &["unix:uid:1001"],
    ))
    .await?;
    ds.create_entry(&entry(
        "e3",
        "spiffe://example.org/web",
        "spiffe://example.org/other",
        &["unix:uid:1000"],
    ))
    .await?;

    let all = ds.list_entries(&EntryFilter::default()).await?;
    assert_eq!(
        all.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e1", "e2", "e3"]
    );
    let by_id = ds
        .list_entries(&EntryFilter {
            spiffe_id: Some("spiffe://example.org/web".into()),
            ..EntryFilter::default()
        })
        .await?;
    assert_eq!(by_id.len(), 2);
    let by_parent = ds
        .list_entries(&EntryFilter {
            parent_id: Some(AGENT.into()),
            ..EntryFilter::default()
        })
        .await?;
    assert_eq!(by_parent.len(), 2);
    let by_selector = ds
        .list_entries(&EntryFilter {
            selectors: vec![Selector::parse("k8s:ns:prod")?],
            ..EntryFilter::default()
        })
        .await?;
    assert_eq!(
        by_selector
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["e1"]
    );

    let mut changed = web.clone();
    changed.selectors = vec![Selector::parse("unix:uid:2000")?];
    changed.hint = "external".into();
    let updated = ds.update_entry(&changed).await?;
    assert!(updated.revision > web.revision);
    let stored = ds.get_entry("e1").await?.expect("still there");
    assert_eq!(stored.hint, "external");
    assert_eq!(stored.created_at, web.created_at);
    assert_eq!(stored.revision, updated.revision);

    let deleted = ds.delete_entry("e2").await?;
    assert_eq!(deleted.spiffe_id.to_string(), "spiffe://example.org/db");
    assert_eq!(ds.get_entry("e2").await?, None);
    Ok(())
}

async fn duplicate_entries_are_refused_without_writing(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    ds.create_entry(&entry(
        "e1",
        "spiffe://example.org/web",
        AGENT,
        &["unix:uid:1000", "unix:gid:1"],
    ))
    .await?;
    let events_before = ds.latest_event_id().await?;
    // Same ID, parent and selectors (in another order): refused.
    let duplicate = ds
        .create_entry(&entry(
            "e2",
            "spiffe://example.org/web",
            AGENT,
            &["unix:gid:1", "unix:uid:1000"],
        ))
        .await;
    assert!(
        matches!(duplicate, Err(Error::AlreadyExists(_))),
        "{duplicate:?}"
    );
    assert_eq!(ds.list_entries(&EntryFilter::default()).await?.len(), 1);
    assert_eq!(
        ds.latest_event_id().await?,
        events_before,
        "the refused write left no event"
    );
    // An update into a duplicate is refused too.
    ds.create_entry(&entry(
        "e3",
        "spiffe://example.org/web",
        AGENT,
        &["unix:uid:1000"],
    ))
    .await?;
    let clash = ds
        .update_entry(&entry(
            "e3",
            "spiffe://example.org/web",
            AGENT,
            &["unix:uid:1000", "unix:gid:1"],
        ))
        .await;
    assert!(matches!(clash, Err(Error::AlreadyExists(_))), "{clash:?}");
    assert_eq!(ds.get_entry("e3").await?.expect("kept").selectors.len(), 1);
    Ok(())
}

async fn missing_entries_are_not_found(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    assert_eq!(ds.get_entry("nope").await?, None);
    assert!(matches!(
        ds.delete_entry("nope").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        ds.update_entry(&entry("nope", "spiffe://example.org/x", AGENT, &["a:b"]))
            .await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

async fn agents_are_attested_renewed_banned_and_evicted(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    ds.put_agent(&agent(AGENT)).await?;
    assert_eq!(ds.get_agent(AGENT).await?, Some(agent(AGENT)));
    let renewed = ds
        .set_agent_svid(AGENT, "01", "02", NOW + 7200, NOW + 10)
        .await?;
    assert_eq!(
        (
            renewed.svid_serial.as_str(),
            renewed.svid_expires_at,
            renewed.updated_at
        ),
        ("02", NOW + 7200, NOW + 10)
    );
    assert_eq!(
        renewed.previous_svid_serial, "01",
        "renewal keeps the serial it replaced"
    );
    let again = ds
        .set_agent_svid(AGENT, "02", "03", NOW + 7200, NOW + 11)
        .await?;
    assert_eq!(
        (
            again.svid_serial.as_str(),
            again.previous_svid_serial.as_str()
        ),
        ("03", "02"),
        "only the immediately previous serial is kept"
    );
    // A lost answer is retried with the same certificate: it stays the previous one.
    let retried = ds
        .set_agent_svid(AGENT, "02", "03b", NOW + 7200, NOW + 12)
        .await?;
    assert_eq!(
        (
            retried.svid_serial.as_str(),
            retried.previous_svid_serial.as_str()
        ),
        ("03b", "02")
    );
    // A certificate two generations old, or none, cannot renew.
    for stale in ["01", ""] {
        assert!(matches!(
            ds.set_agent_svid(AGENT, stale, "99", NOW, NOW).await,
            Err(Error::PermissionDenied(_))
        ));
    }
    // Attesting again starts afresh: no serial from before survives.
    let mut reattested = agent(AGENT);
    reattested.svid_serial = "04".into();
    ds.put_agent(&reattested).await?;
    let stored = ds.get_agent(AGENT).await?.expect("agent");
    assert_eq!(
        (
            stored.svid_serial.as_str(),
            stored.previous_svid_serial.as_str()
        ),
        ("04", "")
    );
    let banned = ds.ban_agent(AGENT, NOW + 20).await?;
    assert!(banned.banned);
    // An attestation that read the row before the ban cannot lift it.
    assert!(matches!(
        ds.put_agent(&agent(AGENT)).await,
        Err(Error::PermissionDenied(_))
    ));
    assert!(ds.get_agent(AGENT).await?.expect("agent").banned);
    assert_eq!(ds.list_agents().await?.len(), 1);
    let evicted = ds.delete_agent(AGENT).await?;
    assert_eq!(evicted.spiffe_id, AGENT);
    assert!(ds.list_agents().await?.is_empty());
    assert!(matches!(
        ds.delete_agent(AGENT).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        ds.ban_agent(AGENT, NOW).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        ds.set_agent_svid(AGENT, "04", "05", NOW, NOW).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

fn token(hash: &str, expires_at: i64) -> JoinToken {
    JoinToken {
        token_hash: hash.into(),
        alias_spiffe_id: String::new(),
        expires_at,
        created_at: NOW,
    }
}

async fn join_tokens_are_single_use(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    ds.create_join_token(&token("h1", NOW + 600)).await?;
    ds.create_join_token(&token("h2", NOW + 600)).await?;
    assert!(matches!(
        ds.create_join_token(&token("h1", NOW + 600)).await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(
        ds.use_join_token("h1", NOW).await?.map(|t| t.token_hash),
        Ok("h1".into())
    );
    assert_eq!(
        ds.use_join_token("h1", NOW + 1)
            .await?
            .map(|t| t.token_hash),
        Err(TokenRefusal::AlreadyUsed)
    );
    assert_eq!(
        ds.use_join_token("unknown", NOW)
            .await?
            .map(|t| t.token_hash),
        Err(TokenRefusal::Unknown)
    );
    assert_eq!(
        ds.use_join_token("h2", NOW + 600)
            .await?
            .map(|t| t.token_hash),
        Err(TokenRefusal::Expired)
    );
    assert_eq!(ds.prune_join_tokens(NOW + 601).await?, 2);
    Ok(())
}

async fn join_tokens_are_single_use_under_concurrency(backend: &Backend) -> anyhow::Result<()> {
    let ds = Arc::new(backend.reopen().await?);
    ds.create_join_token(&token("race", NOW + 600)).await?;
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let ds = ds.clone();
        attempts.spawn(async move { ds.use_join_token("race", NOW).await });
    }
    let mut winners = 0;
    while let Some(outcome) = attempts.join_next().await {
        if outcome??.is_ok() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one of eight concurrent uses wins");
    Ok(())
}

async fn bundles_round_trip(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    let td = parse_trust_domain("trust_domain", "example.org")?;
    assert_eq!(ds.get_bundle(&td).await?, None);
    let key = sigil_core::x509::KeyType::EcP256.generate()?;
    let ca = sigil_core::x509::root_ca_params(
        &td,
        UNIX_EPOCH + Duration::from_secs(NOW as u64),
        Duration::from_secs(86_400),
    )?
    .self_signed(&key)?;
    let mut bundle = TrustBundle::new(td.clone());
    bundle.x509_authorities.push(ca.der().to_vec());
    bundle.jwt_authorities.push(JwtAuthority {
        key_id: "k1".into(),
        public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
        expires_at: 0,
    });
    bundle.sequence = 1;
    ds.put_bundle(&bundle).await?;
    assert_eq!(ds.get_bundle(&td).await?, Some(bundle.clone()));
    bundle.sequence = 2;
    bundle.jwt_authorities.clear();
    ds.put_bundle(&bundle).await?;
    assert_eq!(ds.get_bundle(&td).await?, Some(bundle));
    // Domains are never merged.
    assert_eq!(
        ds.get_bundle(&parse_trust_domain("trust_domain", "partner.org")?)
            .await?,
        None
    );
    Ok(())
}

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

async fn foreign_bundles_are_listed_and_deleted(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    let own = bundle_of("example.org", 3)?;
    let partner = bundle_of("partner.org", 7)?;
    ds.put_bundle(&partner).await?;
    ds.put_bundle(&own).await?;
    let before = ds.latest_event_id().await?;
    // Listed by trust domain name, each under its own name.
    assert_eq!(ds.list_bundles().await?, vec![own.clone(), partner.clone()]);
    assert!(ds.delete_bundle(&partner.trust_domain).await?);
    assert!(!ds.delete_bundle(&partner.trust_domain).await?);
    assert_eq!(ds.list_bundles().await?, vec![own]);
    let events = ds.events_after(before, 10).await?;
    assert_eq!(
        events.len(),
        1,
        "one event for the one deletion: {events:?}"
    );
    assert_eq!(events[0].kind, EventKind::Bundle);
    assert_eq!(events[0].subject, "partner.org");
    Ok(())
}

async fn federation_relationships_round_trip(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    let partner = parse_trust_domain("trust_domain", "partner.org")?;
    assert_eq!(ds.get_federation(&partner).await?, None);
    let mut spiffe = FederationRelationship {
        trust_domain: partner.clone(),
        bundle_endpoint_url: "https://partner.org:8443/".into(),
        profile: EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: parse_spiffe_id("id", "spiffe://partner.org/sigil/server")?,
        },
        created_at: NOW,
        updated_at: NOW,
    };
    let web = FederationRelationship {
        trust_domain: parse_trust_domain("trust_domain", "another.org")?,
        bundle_endpoint_url: "https://bundles.another.org/".into(),
        profile: EndpointProfile::HttpsWeb,
        created_at: NOW,
        updated_at: NOW,
    };
    let before = ds.latest_event_id().await?;
    ds.put_federation(&spiffe).await?;
    ds.put_federation(&web).await?;
    assert_eq!(ds.get_federation(&partner).await?, Some(spiffe.clone()));
    assert_eq!(
        ds.list_federations().await?,
        vec![web.clone(), spiffe.clone()]
    );
    // An update replaces the endpoint but keeps the creation time.
    spiffe.bundle_endpoint_url = "https://partner.org:9443/".into();
    spiffe.updated_at = NOW + 5;
    let mut written = spiffe.clone();
    written.created_at = NOW + 5;
    ds.put_federation(&written).await?;
    assert_eq!(ds.get_federation(&partner).await?, Some(spiffe.clone()));
    assert_eq!(ds.delete_federation(&partner).await?, Some(spiffe));
    assert_eq!(ds.delete_federation(&partner).await?, None);
    assert_eq!(ds.list_federations().await?, vec![web]);
    let kinds: Vec<_> = ds
        .events_after(before, 10)
        .await?
        .into_iter()
        .map(|e| (e.kind, e.subject))
        .collect();
    assert_eq!(kinds.len(), 4, "create, create, update, delete: {kinds:?}");
    assert!(kinds.iter().all(|(kind, _)| *kind == EventKind::Federation));
    Ok(())
}

async fn authorities_journal(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    let mut first = Authority {
        id: "aa".into(),
        kind: AuthorityKind::X509,
        key_ref: "x509-ca-1".into(),
        public_data: vec![1, 2, 3],
        state: AuthorityState::Active,
        not_after: NOW + 100,
        created_at: NOW,
    };
    let second = Authority {
        id: "bb".into(),
        kind: AuthorityKind::Jwt,
        key_ref: "jwt-1".into(),
        created_at: NOW + 1,
        ..first.clone()
    };
    ds.put_authority(&first).await?;
    ds.put_authority(&second).await?;
    first.state = AuthorityState::Old;
    ds.put_authority(&first).await?;
    assert_eq!(ds.list_authorities().await?, vec![first, second]);
    Ok(())
}

fn issued(serial: &str, spiffe_id: &str, agent_id: &str, not_after: i64) -> IssuedSvid {
    IssuedSvid {
        serial: serial.into(),
        kind: "x509".into(),
        spiffe_id: spiffe_id.into(),
        agent_id: agent_id.into(),
        entry_id: "e1".into(),
        authority_id: "aa".into(),
        not_before: not_after - 100,
        not_after,
    }
}

async fn issued_svids_are_recorded_filtered_and_pruned(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    let batch: Vec<IssuedSvid> = (0..250)
        .map(|n| {
            issued(
                &format!("s{n:03}"),
                if n % 2 == 0 {
                    "spiffe://example.org/web"
                } else {
                    "spiffe://example.org/db"
                },
                AGENT,
                NOW + n,
            )
        })
        .collect();
    ds.record_issued_svids(&batch).await?;
    // A serial recorded twice keeps its first record.
    ds.record_issued_svids(&[issued("s000", "spiffe://example.org/changed", AGENT, NOW)])
        .await?;
    assert_eq!(
        ds.get_issued_svid("s000").await?.map(|s| s.spiffe_id),
        Some("spiffe://example.org/web".into())
    );
    assert_eq!(
        ds.list_issued_svids(&SvidFilter::default()).await?.len(),
        250
    );
    let web = SvidFilter {
        spiffe_id: Some("spiffe://example.org/web".into()),
        ..SvidFilter::default()
    };
    assert_eq!(ds.list_issued_svids(&web).await?.len(), 125);
    let other_agent = SvidFilter {
        agent_id: Some("spiffe://example.org/sigil/agent/x".into()),
        ..SvidFilter::default()
    };
    assert!(ds.list_issued_svids(&other_agent).await?.is_empty());
    let valid = SvidFilter {
        valid_at: Some(NOW + 200),
        ..SvidFilter::default()
    };
    assert_eq!(ds.list_issued_svids(&valid).await?.len(), 49);
    assert_eq!(ds.prune_issued_svids(NOW + 100).await?, 100);
    assert_eq!(
        ds.list_issued_svids(&SvidFilter::default()).await?.len(),
        150
    );
    assert_eq!(ds.get_issued_svid("s000").await?, None);
    Ok(())
}

async fn change_feed_follows_every_write(backend: &Backend) -> anyhow::Result<()> {
    let ds = &backend.store;
    assert_eq!(ds.latest_event_id().await?, 0);
    ds.create_entry(&entry(
        "e1",
        "spiffe://example.org/web",
        AGENT,
        &["unix:uid:1"],
    ))
    .await?;
    ds.put_agent(&agent(AGENT)).await?;
    let td = parse_trust_domain("trust_domain", "example.org")?;
    ds.put_bundle(&TrustBundle::new(td)).await?;
    ds.delete_entry("e1").await?;
    ds.ban_agent(AGENT, NOW).await?;
    let events = ds.events_after(0, 100).await?;
    let seen: Vec<(EventKind, &str)> = events
        .iter()
        .map(|e| (e.kind, e.subject.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (EventKind::Entry, "e1"),
            (EventKind::Agent, AGENT),
            (EventKind::Bundle, "example.org"),
            (EventKind::Entry, "e1"),
            (EventKind::Agent, AGENT),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert_eq!(ds.latest_event_id().await?, events[4].id);
    let page = ds.events_after(events[1].id, 2).await?;
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[2].id, events[3].id]
    );
    // Pruning keeps the newest event so the feed position never goes back.
    assert_eq!(ds.prune_events(NOW + 1).await?, 4);
    assert_eq!(ds.latest_event_id().await?, events[4].id);
    Ok(())
}

async fn data_survives_reconnecting(backend: &Backend) -> anyhow::Result<()> {
    backend
        .store
        .create_entry(&entry(
            "e1",
            "spiffe://example.org/web",
            AGENT,
            &["unix:uid:1"],
        ))
        .await?;
    backend.store.put_agent(&agent(AGENT)).await?;
    backend
        .store
        .create_join_token(&token("h1", NOW + 600))
        .await?;
    assert!(backend.store.use_join_token("h1", NOW).await?.is_ok());
    backend.store.close().await;
    let reopened = backend.reopen().await?;
    assert!(reopened.get_entry("e1").await?.is_some());
    assert!(reopened.get_agent(AGENT).await?.is_some());
    assert_eq!(
        reopened
            .use_join_token("h1", NOW)
            .await?
            .map(|t| t.token_hash),
        Err(TokenRefusal::AlreadyUsed)
    );
    Ok(())
}

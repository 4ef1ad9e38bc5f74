use std::time::UNIX_EPOCH;

use sigil_core::clock::{Clock, ManualClock};
use sigil_core::id::parse_trust_domain;
use sigil_core::x509::check_leaf_profile;

use sigil_core::id::SpiffeId;
use sigil_core::x509::certificate_facts;

use super::sign::Holder;
use super::*;
use crate::Error;
use crate::datastore::{AuthorityJournal, BundleStore, IssuedSvid, IssuedSvidStore, SqlDataStore};

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
        publication_wait: Duration::ZERO,
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
        "server-a".into(),
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
    let ca = Ca::load(
        settings(),
        "server-a".into(),
        keys.clone(),
        clock.clone(),
        &ds,
    )
    .await
    .expect("ca");
    let bundle = ca.bundle();
    assert_eq!(bundle.sequence, 1);
    assert_eq!(bundle.x509_authorities.len(), 1);
    assert_eq!(bundle.jwt_authorities.len(), 1);

    let key = KeyType::EcP256.generate().expect("key");
    let id = SpiffeId::new("spiffe://example.org/web").expect("id");
    let svid = ca
        .sign_x509_svid(Holder::Workload, &key, &id, &[], Duration::ZERO)
        .expect("signed");
    assert_eq!(check_leaf_profile(&svid.chain[0]).expect("profile"), id);
    assert_eq!(svid.not_after - clock.unix_now(), 24 * 3600, "default TTL");
    // A TTL beyond the CA's own life is capped at the CA's expiry.
    let long = ca
        .sign_x509_svid(
            Holder::Workload,
            &key,
            &id,
            &[],
            Duration::from_secs(30 * 24 * 3600),
        )
        .expect("signed");
    assert_eq!(
        long.not_after,
        certificate_facts(&bundle.x509_authorities[0])
            .expect("facts")
            .not_after
    );

    let again = Ca::load(settings(), "server-a".into(), keys, clock.clone(), &ds)
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

/// Two servers share one journal and make their CAs in the same second (the clock stands
/// still): each keeps its own key, and after both restart each signs with its own CA, and
/// what it signs verifies against the published bundle (once, both loaded the same file and
/// one signed with the other's certificate).
#[tokio::test]
async fn two_servers_making_cas_in_the_same_second_keep_their_own_after_restarts() {
    let (dir, clock, ds) = fixture().await;
    let keys = |name: &str| -> Arc<dyn KeyManager> {
        Arc::new(DiskKeyManager::new(dir.path().join(name)).expect("keys"))
    };
    let (a_keys, b_keys) = (keys("a"), keys("b"));
    let load = |owner: &str, keys: &Arc<dyn KeyManager>| {
        Ca::load(settings(), owner.into(), keys.clone(), clock.clone(), &ds)
    };
    let first = [
        load("server-a", &a_keys).await.expect("a"),
        load("server-b", &b_keys).await.expect("b"),
    ];
    assert_ne!(first[0].x509.load().id, first[1].x509.load().id);
    let restarted = [
        load("server-a", &a_keys).await.expect("a again"),
        load("server-b", &b_keys).await.expect("b again"),
    ];
    let id = SpiffeId::new("spiffe://example.org/web").expect("id");
    for (before, after) in first.iter().zip(&restarted) {
        assert_eq!(after.x509.load().id, before.x509.load().id, "its own CA");
        assert_eq!(
            after.jwt.load().key_id,
            before.jwt.load().key_id,
            "its own JWT key"
        );
        let key = KeyType::EcP256.generate().expect("key");
        let svid = after
            .sign_x509_svid(Holder::Workload, &key, &id, &[], Duration::ZERO)
            .expect("signed");
        let verifier = sigil_core::tls::SpiffeServerVerifier::new(
            &after.bundle().x509_authorities,
            id.clone(),
        )
        .expect("verifier");
        let now = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(clock.unix_now()).expect("after 1970"),
        ));
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &verifier,
            &svid.chain[0].clone().into(),
            &[],
            &rustls_pki_types::ServerName::try_from("web").expect("name"),
            &[],
            now,
        )
        .expect("the SVID verifies against the bundle");
    }
}

/// `ca prepare` and `ca activate` on one server rotate its own authorities only: the other
/// server's stay active, in the bundle, and loaded after its restart (once, activating on
/// one server made every other server's CA `old`).
#[tokio::test]
async fn activating_on_one_server_leaves_the_others_authorities_alone() {
    let (_dir, clock, ds) = fixture().await;
    let load = |owner: &str, keys: Arc<dyn KeyManager>| {
        Ca::load(settings(), owner.into(), keys, clock.clone(), &ds)
    };
    let b_keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
    let a = load("server-a", Arc::new(MemoryKeyManager::default()))
        .await
        .expect("a");
    let b = load("server-b", b_keys.clone()).await.expect("b");
    let b_ca = b.x509.load().id.clone();
    a.prepare(&ds).await.expect("prepared");
    let activated = a.activate(&ds).await.expect("activated");
    assert!(activated.iter().all(|row| row.owner == "server-a"));
    let journal = ds.list_authorities().await.expect("journal");
    let b_rows: Vec<_> = journal
        .iter()
        .filter(|row| row.owner == "server-b")
        .collect();
    assert_eq!(b_rows.len(), 2, "b's CA and JWT key");
    assert!(
        b_rows.iter().all(|row| row.state == AuthorityState::Active),
        "{b_rows:?}"
    );
    assert!(
        a.bundle()
            .x509_authorities
            .iter()
            .any(|der| certificate_facts(der).expect("facts").subject_key_id == b_ca),
        "b's CA stays in the bundle"
    );
    let b_again = load("server-b", b_keys).await.expect("b again");
    assert_eq!(
        b_again.x509.load().id,
        b_ca,
        "b keeps signing with its own CA"
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
            Holder::Workload,
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
        Holder::Workload,
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
async fn a_lost_key_means_a_new_ca_published_before_it_signs() {
    let (_dir, clock, ds) = fixture().await;
    let first = memory_ca(&clock, &ds).await;
    // The same server (owner) again, but its keys are gone: a lost data dir.
    // Real time: the datastore's pool times out at once under tokio's paused clock. The bound
    // is a lower one (load waited at least this), which no slow machine can break.
    let wait = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let second = Ca::load(
        CaSettings {
            publication_wait: wait,
            ..settings()
        },
        "server-a".into(),
        Arc::new(MemoryKeyManager::default()),
        clock.clone(),
        &ds,
    )
    .await
    .expect("ca");
    assert!(
        started.elapsed() >= wait,
        "the new CA waited for its publication before it could sign"
    );
    let (lost, new) = (first.x509.load().id.clone(), second.x509.load().id.clone());
    assert_ne!(lost, new);
    let journal = ds.list_authorities().await.expect("journal");
    let state_of = |id: &str| journal.iter().find(|a| a.id == id).map(|a| a.state);
    assert_eq!(state_of(&lost), Some(AuthorityState::Old));
    assert_eq!(state_of(&new), Some(AuthorityState::Active));
    assert_eq!(
        state_of(&first.jwt.load().key_id),
        Some(AuthorityState::Old),
        "the lost JWT key is retired too"
    );
    let stored = ds
        .get_bundle(second.trust_domain())
        .await
        .expect("bundle")
        .expect("stored");
    assert_eq!(
        stored.x509_authorities.len(),
        2,
        "the new CA is in the stored bundle, and the lost one stays trusted until it expires"
    );
    assert_eq!(stored.jwt_authorities.len(), 2);
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
            .sign_x509_svid(Holder::Workload, &key, &id, &[], Duration::ZERO)
            .expect_err("a workload SVID with a reserved ID");
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        assert!(
            ca.sign_jwt_svid(&id, &["db".into()], Duration::ZERO)
                .is_err()
        );
        ca.sign_x509_svid(Holder::Component, &key, &id, &[], Duration::ZERO)
            .expect("components are signed on their own path");
    }
    assert!(
        ca.sign_x509_svid(Holder::Component, &key, &workload, &[], Duration::ZERO)
            .is_err(),
        "the component path signs only reserved IDs"
    );
    for name in ["sigil-server.sigil.svc", "*.sigil.svc"] {
        let err = ca
            .sign_x509_svid(
                Holder::Workload,
                &key,
                &workload,
                &[name.into()],
                Duration::ZERO,
            )
            .expect_err("a workload SVID with the server's DNS name");
        assert!(err.to_string().contains("server_dns_names"), "{err}");
    }
}

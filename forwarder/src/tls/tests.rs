use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, SanType};
use sigil_core::id::TrustDomain;
use sigil_core::x509::{KeyType, leaf_params, root_ca_params};
use sigil_proto::workload::{X509svid, X509svidResponse};

use super::*;

/// A CA of `trust_domain`: its DER certificate and what signs with it.
struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(trust_domain: &str) -> Ca {
    let td = TrustDomain::new(trust_domain).expect("valid trust domain");
    let key = KeyType::EcP256.generate().expect("key");
    let params =
        root_ca_params(&td, SystemTime::now(), Duration::from_secs(86_400)).expect("params");
    let der = params
        .self_signed(&key)
        .expect("self-signed")
        .der()
        .to_vec();
    Ca {
        der,
        issuer: Issuer::new(params, key),
    }
}

/// A leaf for `id` signed by `ca`, valid from `from` to `until` (relative to now), with
/// `extra_uri` as a second URI SAN when given. Returns (certificate DER, PKCS#8 key DER).
fn leaf(ca: &Ca, id: &str, from: i64, until: i64, extra_uri: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let at = |offset: i64| {
        let now = SystemTime::now();
        if offset >= 0 {
            now + Duration::from_secs(offset.unsigned_abs())
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        }
    };
    let key = KeyType::EcP256.generate().expect("key");
    let id = SpiffeId::new(id).expect("valid ID");
    let mut params = leaf_params(&id, &[], at(from), at(until)).expect("params");
    if let Some(uri) = extra_uri {
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().expect("ia5 string")));
    }
    let cert = params.signed_by(&key, &ca.issuer).expect("signed");
    (cert.der().to_vec(), key.serialize_der())
}

/// A Workload API message: our SVID from `own`, and federated bundles.
fn response(own: &Ca, federated: &[(&str, &Ca)]) -> X509svidResponse {
    let (cert, key) = leaf(own, "spiffe://example.org/forwarder", -60, 3600, None);
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: "spiffe://example.org/forwarder".into(),
            x509_svid: cert,
            x509_svid_key: key,
            bundle: own.der.clone(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated
            .iter()
            .map(|(td, ca)| (format!("spiffe://{td}"), ca.der.clone()))
            .collect::<HashMap<_, _>>(),
    }
}

fn verifier(store: &Arc<IdentityStore>, allow: &[&str]) -> (ClientVerifier, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let policy = PeerPolicy {
        allow: allow
            .iter()
            .map(|p| IdPattern::parse("test", p).expect("valid pattern"))
            .collect(),
        deny: Vec::new(),
    };
    (
        ClientVerifier::new("test".into(), store.clone(), policy, metrics.clone()),
        metrics,
    )
}

fn check(verifier: &ClientVerifier, cert: &[u8]) -> Result<(), rustls::Error> {
    verifier
        .verify_client_cert(&CertificateDer::from(cert), &[], UnixTime::now())
        .map(|_| ())
}

fn refused_with(result: Result<(), rustls::Error>, expected: CertificateError) {
    match result {
        Err(rustls::Error::InvalidCertificate(error)) => assert_eq!(error, expected),
        other => panic!("expected {expected:?}, got {other:?}"),
    }
}

#[test]
fn bad_certificates_are_refused_with_the_right_alert_and_counted() {
    let (own, other) = (ca("example.org"), ca("other.org"));
    let store = Arc::new(IdentityStore::new(None));
    store
        .apply(&response(&own, &[("other.org", &other)]))
        .expect("usable response");
    let (verifier, metrics) = verifier(&store, &[]);

    let (good, _) = leaf(&own, "spiffe://example.org/web", -60, 3600, None);
    check(&verifier, &good).expect("a valid SVID of our own domain");

    let (expired, _) = leaf(&own, "spiffe://example.org/web", -7200, -3600, None);
    refused_with(check(&verifier, &expired), CertificateError::Expired);

    let (two_ids, _) = leaf(
        &own,
        "spiffe://example.org/web",
        -60,
        3600,
        Some("spiffe://example.org/admin"),
    );
    refused_with(check(&verifier, &two_ids), CertificateError::BadEncoding);

    // Bundles are never merged: other.org's CA cannot vouch for an example.org ID.
    let (impostor, _) = leaf(&other, "spiffe://example.org/web", -60, 3600, None);
    refused_with(check(&verifier, &impostor), CertificateError::UnknownIssuer);

    let (unknown_domain, _) = leaf(&other, "spiffe://third.org/web", -60, 3600, None);
    refused_with(
        check(&verifier, &unknown_domain),
        CertificateError::UnknownIssuer,
    );

    // A federated peer verifies, but needs an explicit allow rule.
    let (federated, _) = leaf(&other, "spiffe://other.org/web", -60, 3600, None);
    refused_with(
        check(&verifier, &federated),
        CertificateError::ApplicationVerificationFailure,
    );
    let (allowing, _) = super::tests::verifier(&store, &["spiffe://other.org"]);
    check(&allowing, &federated).expect("allowed federated peer");

    let text = metrics.encode();
    for reason in ["expired", "bad_identity", "untrusted", "policy"] {
        assert!(
            text.contains(&format!("reason=\"{reason}\"")),
            "{reason} counted:\n{text}"
        );
    }
}

#[test]
fn a_new_state_applies_to_the_next_handshake() {
    let (old_ca, new_ca) = (ca("example.org"), ca("example.org"));
    let store = Arc::new(IdentityStore::new(None));
    store.apply(&response(&old_ca, &[])).expect("usable");
    let first_key = store.current_key().expect("a key");
    let (verifier, _) = verifier(&store, &[]);
    let (old_peer, _) = leaf(&old_ca, "spiffe://example.org/web", -60, 3600, None);
    let (new_peer, _) = leaf(&new_ca, "spiffe://example.org/web", -60, 3600, None);
    check(&verifier, &old_peer).expect("old CA trusted");
    refused_with(check(&verifier, &new_peer), CertificateError::UnknownIssuer);

    // The CA changes: the same verifier and resolver see the new state at once.
    store.apply(&response(&new_ca, &[])).expect("usable");
    check(&verifier, &new_peer).expect("new CA trusted");
    refused_with(check(&verifier, &old_peer), CertificateError::UnknownIssuer);
    let second_key = store.current_key().expect("a key");
    assert_ne!(
        first_key.cert[0], second_key.cert[0],
        "a new SVID is presented"
    );
}

#[test]
fn without_a_wanted_id_the_held_identity_sticks() {
    let own = ca("example.org");
    let store = Arc::new(IdentityStore::new(None));
    store.apply(&response(&own, &[])).expect("usable");
    // The next update lists another SVID of the workload first.
    let mut update = response(&own, &[]);
    let (cert, key) = leaf(&own, "spiffe://example.org/other", -60, 3600, None);
    let mut other = update.svids[0].clone();
    other.spiffe_id = "spiffe://example.org/other".into();
    other.x509_svid = cert;
    other.x509_svid_key = key;
    update.svids.insert(0, other);
    let state = store.apply(&update).expect("usable");
    let held = state.svid.as_ref().map(|svid| svid.id.to_string());
    assert_eq!(held.as_deref(), Some("spiffe://example.org/forwarder"));
}

#[test]
fn ready_only_while_the_svid_is_valid() {
    let own = ca("example.org");
    let store = Arc::new(IdentityStore::new(None));
    let now = sigil_core::clock::unix_seconds(SystemTime::now());
    assert!(store.not_ready_at(now).is_some(), "no SVID yet");
    store.apply(&response(&own, &[])).expect("usable");
    assert_eq!(store.not_ready_at(now), None);
    // The SVID lives an hour: two hours on, with no update, the forwarder is not ready.
    let why = store.not_ready_at(now + 7200).expect("expired");
    assert!(why.contains("expired"), "{why}");
}

#[test]
fn an_unusable_update_keeps_the_last_good_state() {
    let own = ca("example.org");
    let store = Arc::new(IdentityStore::new(Some(
        SpiffeId::new("spiffe://example.org/forwarder").expect("valid"),
    )));
    store.apply(&response(&own, &[])).expect("usable");
    let before = store.current_key().expect("a key");
    let mut broken = response(&own, &[]);
    broken.svids[0].x509_svid_key = vec![1, 2, 3];
    let err = store.apply(&broken).expect_err("a bad key").to_string();
    assert!(err.contains("key"), "{err}");
    let mut other = response(&own, &[]);
    other.svids[0].spiffe_id = "spiffe://example.org/other".into();
    let err = store.apply(&other).expect_err("not ours").to_string();
    assert!(err.contains("drop --spiffe-id"), "{err}");
    let after = store.current_key().expect("a key");
    assert_eq!(before.cert[0], after.cert[0]);
}

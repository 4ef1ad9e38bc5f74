//! SPIFFE bundle JSON: what `bundle set`, the federation bundle endpoints and the agent's stored
//! bundle feed `TrustBundle::from_spiffe_json`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use sigil_core::bundle::TrustBundle;
use sigil_core::x509::{KeyType, certificate_facts, root_ca_params};
use sigil_server::federation::read_fetched_bundle;

use crate::{example_org, text};

/// `TrustBundle::from_spiffe_json`.
///
/// Holds: a bundle that parses serialises with `to_spiffe_json` (the datastore stores it so,
/// and the Workload API and bundle endpoint serve it so) and parses back to the same bundle.
pub fn bundle_json(data: &[u8]) {
    let Some(input) = text(data) else { return };
    if let Ok(bundle) = TrustBundle::from_spiffe_json(example_org(), input) {
        assert_round_trips(&bundle);
    }
}

fn assert_round_trips(bundle: &TrustBundle) {
    let json = bundle
        .to_spiffe_json()
        .unwrap_or_else(|e| panic!("a bundle that parsed does not serialise: {e}"));
    let again = TrustBundle::from_spiffe_json(bundle.trust_domain.clone(), &json)
        .unwrap_or_else(|e| panic!("a serialised bundle does not parse: {e}\n{json}"));
    assert_eq!(&again, bundle, "a bundle changed on its way through JSON");
    let _ = bundle.to_pem();
}

/// The bundle of example.org the refresher already holds: one CA, sequence 5.
fn stored() -> &'static TrustBundle {
    static STORED: OnceLock<TrustBundle> = OnceLock::new();
    STORED.get_or_init(|| {
        let key = KeyType::EcP256.generate().expect("a P-256 key");
        let ca = root_ca_params(&example_org(), SystemTime::now(), Duration::from_secs(3600))
            .expect("CA parameters")
            .self_signed(&key)
            .expect("a self-signed CA");
        let mut bundle = TrustBundle::new(example_org());
        bundle.x509_authorities.push(ca.der().to_vec());
        bundle.sequence = 5;
        bundle
    })
}

/// `read_fetched_bundle`: what the federation refresher makes of a bundle endpoint's answer,
/// with and without a bundle of that domain already stored.
///
/// Holds: an accepted answer has at least one key, names no other trust domain in its CA
/// certificates, never goes below the stored sequence, is also accepted when nothing is stored,
/// and survives the JSON round trip (it is stored as JSON).
pub fn federation_bundle(data: &[u8]) {
    let Some(document) = text(data) else { return };
    let td = example_org();
    let first = read_fetched_bundle(&td, document, None);
    let Ok(fresh) = read_fetched_bundle(&td, document, Some(stored())) else {
        return;
    };
    assert!(
        first.is_ok(),
        "accepted over a stored bundle but refused as the first one"
    );
    assert!(
        fresh.sequence >= stored().sequence,
        "a rollback was accepted"
    );
    assert!(
        !(fresh.x509_authorities.is_empty() && fresh.jwt_authorities.is_empty()),
        "an empty bundle was accepted"
    );
    for der in &fresh.x509_authorities {
        let facts = certificate_facts(der).expect("an accepted authority is readable");
        if let Some(id) = facts.spiffe_id {
            assert_eq!(id.trust_domain_name(), td.as_str(), "a foreign CA accepted");
        }
    }
    assert_round_trips(&fresh);
}

//! [`BundleStore`]: own and foreign bundles, and federation relationships, each write with its
//! change event.

use sigil_core::bundle::JwtAuthority;
use sigil_core::id::{parse_spiffe_id, parse_trust_domain};
use sigil_server::datastore::{
    BundleStore, ChangeFeed, EndpointProfile, EventKind, FederationRelationship,
};

use crate::{NOW, bundle_of};

on_both_backends!(
    bundles_round_trip,
    foreign_bundles_are_listed_and_deleted,
    federation_relationships_round_trip,
);

async fn bundles_round_trip(ds: &impl BundleStore) -> anyhow::Result<()> {
    let td = parse_trust_domain("trust_domain", "example.org")?;
    assert_eq!(ds.get_bundle(&td).await?, None);
    // One X.509 authority and one JWT key.
    let mut bundle = bundle_of("example.org", 1)?;
    let jwt_key = sigil_core::x509::KeyType::EcP256.generate()?;
    bundle.jwt_authorities.push(JwtAuthority {
        key_id: "k1".into(),
        public_key: rcgen::PublicKeyData::subject_public_key_info(&jwt_key),
        expires_at: 0,
    });
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

async fn foreign_bundles_are_listed_and_deleted(
    ds: &(impl BundleStore + ChangeFeed),
) -> anyhow::Result<()> {
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

async fn federation_relationships_round_trip(
    ds: &(impl BundleStore + ChangeFeed),
) -> anyhow::Result<()> {
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

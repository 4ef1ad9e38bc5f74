//! [`IssuedSvidStore`]: the issuance record is written in batches, filtered and pruned.

use sigil_server::datastore::{IssuedSvid, IssuedSvidStore, SvidFilter};

use crate::{AGENT, NOW};

on_both_backends!(issued_svids_are_recorded_filtered_and_pruned);

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

async fn issued_svids_are_recorded_filtered_and_pruned(
    ds: &impl IssuedSvidStore,
) -> anyhow::Result<()> {
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

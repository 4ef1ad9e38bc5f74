//! [`AgentStore`]: agents are attested, renewed (only with a certificate they still hold),
//! banned (a ban no attestation lifts) and evicted.

use sigil_server::Error;
use sigil_server::datastore::{AgentRecord, AgentStore};

use crate::{AGENT, NOW, agent};

on_both_backends!(agents_are_attested_renewed_banned_and_evicted);

async fn agents_are_attested_renewed_banned_and_evicted(
    ds: &impl AgentStore,
) -> anyhow::Result<()> {
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
        serials(&again),
        ("03", "02"),
        "only the immediately previous serial is kept"
    );
    // A lost answer is retried with the same certificate: it stays the previous one.
    let retried = ds
        .set_agent_svid(AGENT, "02", "03b", NOW + 7200, NOW + 12)
        .await?;
    assert_eq!(serials(&retried), ("03b", "02"));
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
    assert_eq!(ds.count_agents().await?, 1);
    assert_eq!(ds.list_agents_page("", 10).await?.len(), 1);
    assert!(
        ds.list_agents_page(AGENT, 10).await?.is_empty(),
        "nothing after the last"
    );
    let evicted = ds.delete_agent(AGENT).await?;
    assert_eq!(evicted.spiffe_id, AGENT);
    assert!(ds.list_agents().await?.is_empty());
    assert_eq!(ds.count_agents().await?, 0);
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

/// An agent's current and previous SVID serials.
fn serials(agent: &AgentRecord) -> (&str, &str) {
    (&agent.svid_serial, &agent.previous_svid_serial)
}

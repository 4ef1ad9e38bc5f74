//! Entries, agents and used join tokens survive closing the store and connecting again.

use std::future::Future;

use sigil_server::datastore::{AgentStore, EntryStore, JoinTokenStore, TokenRefusal};

use crate::{AGENT, NOW, agent, token, web_entry};

on_both_backends!(
    data_survives_reconnecting(backend) => {
        super::data_survives_reconnecting(&backend.store, backend.reconnect()).await
    },
);

/// Writes through `ds`, then reads through the store `reconnect` opens on the same data once it
/// runs (after every write: a future does nothing until awaited).
async fn data_survives_reconnecting<S>(
    ds: &S,
    reconnect: impl Future<Output = anyhow::Result<S>>,
) -> anyhow::Result<()>
where
    S: EntryStore + AgentStore + JoinTokenStore,
{
    ds.create_entry(&web_entry()).await?;
    ds.put_agent(&agent(AGENT)).await?;
    ds.create_join_token(&token("h1", NOW + 600)).await?;
    assert!(ds.use_join_token("h1", NOW).await?.is_ok());
    let reopened = reconnect.await?;
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

//! [`JoinTokenStore`]: a join token is used at most once, even by concurrent callers.

use sigil_server::Error;
use sigil_server::datastore::{JoinTokenStore, TokenRefusal};

use crate::{NOW, token};

on_both_backends!(
    join_tokens_are_single_use,
    join_tokens_are_single_use_under_concurrency,
);

async fn join_tokens_are_single_use(ds: &impl JoinTokenStore) -> anyhow::Result<()> {
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

async fn join_tokens_are_single_use_under_concurrency(
    ds: &impl JoinTokenStore,
) -> anyhow::Result<()> {
    ds.create_join_token(&token("race", NOW + 600)).await?;
    // Eight uses in flight at once; on Postgres each holds a connection of its own.
    let attempts = (0..8).map(|_| ds.use_join_token("race", NOW));
    let mut winners = 0;
    for outcome in futures::future::join_all(attempts).await {
        if outcome?.is_ok() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one of eight concurrent uses wins");
    Ok(())
}

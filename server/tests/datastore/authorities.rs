//! [`AuthorityJournal`]: the CA journal keeps every authority, oldest first, and updates its
//! state in place.

use sigil_server::ca::AuthorityState;
use sigil_server::datastore::{Authority, AuthorityJournal, AuthorityKind};

use crate::NOW;

on_both_backends!(authorities_journal);

async fn authorities_journal(ds: &impl AuthorityJournal) -> anyhow::Result<()> {
    let mut first = Authority {
        id: "aa".into(),
        kind: AuthorityKind::X509,
        key_ref: "x509-ca-1".into(),
        public_data: vec![1, 2, 3],
        state: AuthorityState::Active,
        not_after: NOW + 100,
        created_at: NOW,
        owner: "server-a".into(),
    };
    let second = Authority {
        id: "bb".into(),
        kind: AuthorityKind::Jwt,
        key_ref: "jwt-1".into(),
        created_at: NOW + 1,
        owner: String::new(),
        ..first.clone()
    };
    ds.put_authority(&first).await?;
    ds.put_authority(&second).await?;
    first.state = AuthorityState::Old;
    ds.put_authority(&first).await?;
    // A row from before owners were recorded is adopted by the server holding its key.
    let mut adopted = second.clone();
    adopted.owner = "server-b".into();
    ds.put_authority(&adopted).await?;
    let second = adopted;
    assert_eq!(ds.list_authorities().await?, vec![first, second]);
    Ok(())
}

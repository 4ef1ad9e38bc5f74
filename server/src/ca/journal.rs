//! The CA journal: the states an authority goes through, the moves between them, and the
//! schedule that prepares and activates the next authority.
//!
//! `prepared` (published in the bundle, not signing) -> `active` (signing) -> `old` (replaced; in
//! the bundle until it expires) -> `tainted` (an operator's `ca taint`: agents replace what it
//! signed at once; still in the bundle) -> `revoked` (`ca revoke`: out of the bundle). The same
//! holds for JWT signing keys. [`plan`] is the schedule as a pure function of the time and the
//! journal; [`Ca::rotate_if_due`] carries it out.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::create::{load_jwt, load_x509};
use sigil_core::clock::unix_seconds;

use super::{Ca, KeyManager, create};
use crate::datastore::{Authority, AuthorityKind, DataStore, SvidFilter};
use crate::{Error, Result};

/// Where an authority (an X.509 CA or a JWT key) is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorityState {
    /// Made and published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Replaced; still in the bundle until it expires.
    Old,
    /// Not to be relied on: agents replace what it signed; still in the bundle until revoked.
    Tainted,
    /// Removed from the bundle.
    Revoked,
}

impl AuthorityState {
    /// The name stored in the journal and shown by `ca show`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthorityState::Prepared => "prepared",
            AuthorityState::Active => "active",
            AuthorityState::Old => "old",
            AuthorityState::Tainted => "tainted",
            AuthorityState::Revoked => "revoked",
        }
    }

    /// `prepared` -> `active`; `None` from any other state.
    pub fn activate(self) -> Option<Self> {
        (self == AuthorityState::Prepared).then_some(AuthorityState::Active)
    }

    /// `active` -> `old`, when another authority of its kind is activated.
    pub fn retire(self) -> Option<Self> {
        (self == AuthorityState::Active).then_some(AuthorityState::Old)
    }

    /// `old` -> `tainted` (and a tainted one stays so); the active or a prepared authority
    /// cannot be tainted: prepare and activate a new one first.
    pub fn taint(self) -> Option<Self> {
        matches!(self, AuthorityState::Old | AuthorityState::Tainted)
            .then_some(AuthorityState::Tainted)
    }

    /// `tainted` -> `revoked`: only an authority agents have been told to stop relying on can
    /// leave the bundle.
    pub fn revoke(self) -> Option<Self> {
        (self == AuthorityState::Tainted).then_some(AuthorityState::Revoked)
    }

    /// Whether an authority in this state belongs in the bundle (until it expires).
    pub fn published(self) -> bool {
        self != AuthorityState::Revoked
    }
}

impl fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthorityState {
    type Err = String;

    fn from_str(state: &str) -> std::result::Result<Self, String> {
        [
            AuthorityState::Prepared,
            AuthorityState::Active,
            AuthorityState::Old,
            AuthorityState::Tainted,
            AuthorityState::Revoked,
        ]
        .into_iter()
        .find(|known| known.as_str() == state)
        .ok_or_else(|| format!("`{state}` is not a journal state"))
    }
}

/// What the schedule wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// Make the next X.509 CA and JWT key (published at once, not yet signing).
    pub prepare: bool,
    /// Let the prepared ones sign.
    pub activate: bool,
}

/// The journal's schedule at `now` (Unix seconds), for an active pair of authorities with
/// `remaining` seconds of life left (the shorter of the two): prepare once half of `ca_ttl` is
/// used and nothing is prepared; activate with less than `min_life` left, provided what is
/// prepared has been published for at least `refresh_hint` seconds (so agents and federated
/// peers hold it first), or at once with less than half of `min_life` left, preparing first if
/// nothing is.
pub fn plan(
    journal: &[Authority],
    now: i64,
    remaining: i64,
    half_life: i64,
    min_life: i64,
    refresh_hint: i64,
) -> Plan {
    let prepared = || {
        journal
            .iter()
            .filter(|a| a.state == AuthorityState::Prepared)
    };
    let prepare_at_half_life = remaining <= half_life && !prepared().any(|a| a.not_after > now);
    let published_long_enough = prepared().all(|a| now - a.created_at >= refresh_hint);
    let activate = remaining < min_life && (published_long_enough || remaining < min_life / 2);
    let prepare_to_activate = activate && prepared().next().is_none();
    Plan {
        prepare: prepare_at_half_life || prepare_to_activate,
        activate,
    }
}

impl Ca {
    /// Follows the journal's schedule (see [`plan`]); an active CA about to run out is replaced
    /// at once whatever the delay. Returns whether the bundle changed.
    pub async fn rotate_if_due<D: DataStore>(&self, datastore: &D) -> Result<bool> {
        let _guard = self.rotation.lock().await;
        let now = self.clock.unix_now();
        let remaining = self.x509.load().not_after.min(self.jwt.load().not_after) - now;
        let journal = owned_by(datastore, &self.owner).await?;
        let due = plan(
            &journal,
            now,
            remaining,
            i64::try_from(self.settings.ca_ttl.as_secs() / 2).unwrap_or(i64::MAX),
            self.settings.minimum_remaining_life(),
            i64::try_from(self.settings.bundle_refresh_hint.as_secs()).unwrap_or(0),
        );
        if due.prepare {
            self.prepare_locked(datastore).await?;
        }
        if due.activate {
            self.activate_locked(datastore).await?;
        }
        let published = self.publish_bundle(datastore).await?;
        Ok(due.prepare || due.activate || published)
    }

    /// `ca prepare`: makes this server's next X.509 CA and JWT key, published in the bundle at
    /// once and used only once activated. Refused while its prepared ones wait.
    pub async fn prepare<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let _guard = self.rotation.lock().await;
        if owned_by(datastore, &self.owner)
            .await?
            .iter()
            .any(|a| a.state == AuthorityState::Prepared)
        {
            return Err(Error::AlreadyExists(
                "prepared authorities; activate them (`sigil-server ca activate`) first".into(),
            ));
        }
        let made = self.prepare_locked(datastore).await?;
        self.publish_bundle(datastore).await?;
        Ok(made)
    }

    async fn prepare_locked<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let now = self.clock.now();
        let x509 = create::create_x509(
            &self.settings,
            &self.owner,
            self.keys.as_ref(),
            now,
            datastore,
            AuthorityState::Prepared,
        )
        .await?;
        let jwt = create::create_jwt(
            &self.settings,
            &self.owner,
            self.keys.as_ref(),
            unix_seconds(now),
            datastore,
            AuthorityState::Prepared,
        )
        .await?;
        tracing::info!(authority = %x509.id, key_id = %jwt.key_id, "prepared the next X.509 CA and JWT key; published in the bundle");
        let journal = datastore.list_authorities().await?;
        Ok(journal
            .into_iter()
            .filter(|a| a.id == x509.id || a.id == jwt.key_id)
            .collect())
    }

    /// `ca activate`: this server's prepared X.509 CA and JWT key start signing; the ones they
    /// replace become `old` and stay in the bundle until they expire. Other servers' authorities
    /// are theirs to rotate and stay as they are.
    pub async fn activate<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let _guard = self.rotation.lock().await;
        let activated = self.activate_locked(datastore).await?;
        self.publish_bundle(datastore).await?;
        Ok(activated)
    }

    async fn activate_locked<D: DataStore>(&self, datastore: &D) -> Result<Vec<Authority>> {
        let journal = owned_by(datastore, &self.owner).await?;
        let now = self.clock.unix_now();
        let prepared: Vec<&Authority> = journal
            .iter()
            .filter(|a| a.state == AuthorityState::Prepared && a.not_after > now)
            .collect();
        if prepared.is_empty() {
            return Err(Error::NotFound(
                "a prepared authority to activate; run `sigil-server ca prepare` first".into(),
            ));
        }
        let mut activated = Vec::new();
        for authority in prepared {
            match authority.kind {
                AuthorityKind::X509 => {
                    let Some(loaded) = load_x509(authority, &self.settings, self.keys.as_ref())?
                    else {
                        return Err(Error::ca(format!(
                            "the key of prepared CA {} is missing; prepare again",
                            authority.id
                        )));
                    };
                    self.x509.store(Arc::new(loaded));
                }
                AuthorityKind::Jwt => {
                    let Some(loaded) = load_jwt(authority, self.keys.as_ref())? else {
                        return Err(Error::ca(format!(
                            "the key of prepared JWT key {} is missing; prepare again",
                            authority.id
                        )));
                    };
                    self.jwt.store(Arc::new(loaded));
                }
            }
            for previous in journal.iter().filter(|a| a.kind == authority.kind) {
                if let Some(old) = previous.state.retire() {
                    set_state(datastore, previous, old).await?;
                }
            }
            if let Some(active) = authority.state.activate() {
                activated.push(set_state(datastore, authority, active).await?);
            }
        }
        for authority in &activated {
            tracing::info!(authority = %authority.id, kind = ?authority.kind, "activated");
        }
        Ok(activated)
    }

    /// `ca taint`: an `old` authority that must no longer be relied on. It stays in the bundle
    /// (what it signed still verifies) while agents renew everything it signed at once; the
    /// active or prepared authority cannot be tainted.
    pub async fn taint<D: DataStore>(&self, datastore: &D, id: &str) -> Result<Authority> {
        let _guard = self.rotation.lock().await;
        let authority = find(datastore, id).await?;
        if authority.state == AuthorityState::Tainted {
            return Ok(authority);
        }
        let Some(tainted) = authority.state.taint() else {
            return Err(wrong_state(
                &authority,
                "only an old one can be tainted (prepare and activate a new one first)",
            ));
        };
        let tainted = set_state(datastore, &authority, tainted).await?;
        self.publish_bundle(datastore).await?;
        tracing::warn!(authority = %id, "tainted: agents renew everything it signed");
        Ok(tainted)
    }

    /// `ca revoke`: removes a tainted authority from the bundle, once nothing still valid
    /// depends on it (every SVID it signed has been replaced by one from another authority, or
    /// has expired).
    pub async fn revoke<D: DataStore>(&self, datastore: &D, id: &str) -> Result<Authority> {
        let _guard = self.rotation.lock().await;
        let authority = find(datastore, id).await?;
        let Some(revoked) = authority.state.revoke() else {
            return Err(wrong_state(
                &authority,
                &format!(
                    "taint it first (`sigil-server ca taint --id {id}`) so agents replace what it signed"
                ),
            ));
        };
        let now = self.clock.unix_now();
        let valid = datastore
            .list_issued_svids(&SvidFilter {
                valid_at: Some(now),
                ..SvidFilter::default()
            })
            .await?;
        let outstanding: Vec<_> = valid
            .iter()
            .filter(|svid| svid.authority_id == id)
            .filter(|svid| {
                !valid.iter().any(|newer| {
                    newer.authority_id != id
                        && newer.kind == svid.kind
                        && newer.spiffe_id == svid.spiffe_id
                        && newer.agent_id == svid.agent_id
                        && newer.entry_id == svid.entry_id
                        && newer.not_before >= svid.not_before
                })
            })
            .collect();
        if let Some(example) = outstanding.first() {
            return Err(Error::Invalid(sigil_core::Error::field(
                "id",
                format!(
                    "{} valid SVID(s) signed by {id} have not been replaced yet (e.g. {} for {}); wait for the agents to renew them, then revoke",
                    outstanding.len(),
                    example.serial,
                    example.spiffe_id
                ),
            )));
        }
        let revoked = set_state(datastore, &authority, revoked).await?;
        self.publish_bundle(datastore).await?;
        tracing::warn!(authority = %id, "revoked: removed from the bundle");
        Ok(revoked)
    }
}

/// The active authorities of `kind` with at least `min_life` seconds left, newest first.
pub(super) fn usable(
    journal: &[Authority],
    kind: AuthorityKind,
    now: i64,
    min_life: i64,
) -> impl Iterator<Item = &Authority> {
    // Newest first: after a restart, the most recently made authority is the one in use.
    journal.iter().rev().filter(move |a| {
        a.kind == kind && a.state == AuthorityState::Active && a.not_after - now >= min_life
    })
}

/// The refusal of a transition `authority`'s state does not allow; `what_to_do` says which state
/// it needs and how to get there.
fn wrong_state(authority: &Authority, what_to_do: &str) -> Error {
    Error::Invalid(sigil_core::Error::field(
        "id",
        format!(
            "authority {} is {}; {what_to_do}",
            authority.id, authority.state
        ),
    ))
}

/// The unexpired active authorities of `journal` whose key `keys` no longer holds: the server
/// lost its data dir, or it was replaced by another's.
pub(super) fn active_without_key(
    journal: &[Authority],
    now: i64,
    keys: &dyn KeyManager,
) -> Result<Vec<Authority>> {
    let mut lost = Vec::new();
    for authority in journal {
        if authority.state == AuthorityState::Active
            && authority.not_after > now
            && keys.load(&authority.key_ref)?.is_none()
        {
            lost.push(authority.clone());
        }
    }
    Ok(lost)
}

/// The journal rows `owner` owns, oldest first.
pub(super) async fn owned_by<D: DataStore>(datastore: &D, owner: &str) -> Result<Vec<Authority>> {
    let mut journal = datastore.list_authorities().await?;
    journal.retain(|a| a.owner == owner);
    Ok(journal)
}

/// The journal rows `owner` owns, oldest first, after adopting the rows from before owners were
/// recorded whose key `keys` holds (they belong to the server that has their key).
pub(super) async fn adopt_and_list_own<D: DataStore>(
    datastore: &D,
    owner: &str,
    keys: &dyn KeyManager,
) -> Result<Vec<Authority>> {
    let mut own = Vec::new();
    for mut authority in datastore.list_authorities().await? {
        if authority.owner.is_empty() && keys.load(&authority.key_ref)?.is_some() {
            tracing::info!(authority = %authority.id, "adopting an authority written before servers were told apart");
            authority.owner = owner.to_string();
            datastore.put_authority(&authority).await?;
        }
        if authority.owner == owner {
            own.push(authority);
        }
    }
    Ok(own)
}

async fn find<D: DataStore>(datastore: &D, id: &str) -> Result<Authority> {
    datastore
        .list_authorities()
        .await?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| Error::NotFound(format!("authority {id} (see `sigil-server ca show`)")))
}

/// Writes `authority` with `state` and returns it so.
async fn set_state<D: DataStore>(
    datastore: &D,
    authority: &Authority,
    state: AuthorityState,
) -> Result<Authority> {
    let mut changed = authority.clone();
    changed.state = state;
    datastore.put_authority(&changed).await?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use AuthorityState::{Active, Old, Prepared, Revoked, Tainted};

    const ALL: [AuthorityState; 5] = [Prepared, Active, Old, Tainted, Revoked];

    /// One of the journal's moves.
    type Move = fn(AuthorityState) -> Option<AuthorityState>;

    #[test]
    fn each_state_moves_only_forward_one_step() {
        let moves: [(Move, &[(AuthorityState, AuthorityState)]); 4] = [
            (AuthorityState::activate, &[(Prepared, Active)]),
            (AuthorityState::retire, &[(Active, Old)]),
            (AuthorityState::taint, &[(Old, Tainted), (Tainted, Tainted)]),
            (AuthorityState::revoke, &[(Tainted, Revoked)]),
        ];
        for (step, allowed) in moves {
            for from in ALL {
                let expected = allowed.iter().find(|(f, _)| *f == from).map(|(_, to)| *to);
                assert_eq!(step(from), expected, "from {from}");
            }
        }
        assert!(ALL.iter().filter(|s| !s.published()).eq([&Revoked]));
    }

    #[test]
    fn states_read_back_what_they_write_and_refuse_anything_else() {
        for state in ALL {
            assert_eq!(state.as_str().parse::<AuthorityState>(), Ok(state));
        }
        let refused = "Active"
            .parse::<AuthorityState>()
            .expect_err("case matters");
        assert!(refused.contains("`Active`"), "{refused}");
    }

    const NOW: i64 = 1_000_000;
    /// A CA of 100 s whose SVIDs live 10 s: half-life 50, minimum life 20, hint 5.
    fn plan_at(journal: &[Authority], remaining: i64) -> Plan {
        plan(journal, NOW, remaining, 50, 20, 5)
    }

    fn prepared(created_ago: i64) -> Authority {
        Authority {
            id: "next".into(),
            kind: AuthorityKind::X509,
            key_ref: "k".into(),
            public_data: Vec::new(),
            state: Prepared,
            not_after: NOW + 100,
            created_at: NOW - created_ago,
            owner: "server-a".into(),
        }
    }

    #[test]
    fn the_schedule_prepares_at_half_life_and_activates_once_published_long_enough() {
        let nothing = Plan::default();
        assert_eq!(plan_at(&[], 100), nothing, "a fresh CA");
        assert_eq!(plan_at(&[], 51), nothing, "before half-life");
        assert_eq!(
            plan_at(&[], 50),
            Plan {
                prepare: true,
                activate: false
            },
            "at half-life"
        );
        assert_eq!(plan_at(&[prepared(1)], 40), nothing, "prepared already");
        assert_eq!(
            plan_at(&[prepared(1)], 19),
            nothing,
            "due, but published 1 s of the 5 s hint"
        );
        let activate = Plan {
            prepare: false,
            activate: true,
        };
        assert_eq!(
            plan_at(&[prepared(5)], 19),
            activate,
            "published for the hint"
        );
        assert_eq!(plan_at(&[prepared(1)], 9), activate, "running out: at once");
        assert_eq!(
            plan_at(&[], 9),
            Plan {
                prepare: true,
                activate: true
            },
            "running out with nothing prepared"
        );
        let mut expired = prepared(200);
        expired.not_after = NOW - 1;
        assert_eq!(
            plan_at(&[expired], 45),
            Plan {
                prepare: true,
                activate: false
            },
            "an expired prepared authority does not count"
        );
    }
}

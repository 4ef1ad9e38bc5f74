//! Digests of what an agent holds, so a sync stream opened again (after a reconnect, on another
//! server, or after the agent's restart with its cache on disk) sends only what differs instead of
//! a whole snapshot. Both sides compute them with these functions.
//!
//! Entries fall into [`ENTRY_BUCKETS`] buckets by id; a bucket's digest is the wrapping sum of a
//! 64-bit hash of each `(id, revision)` pair in it, so the order entries arrive in does not matter
//! and an empty bucket is 0. A bucket whose digest differs is sent again whole: with 100 000
//! entries a single change resends about 1 600 of them, and the digests themselves stay at 512
//! bytes. An entry's revision is the shared change feed's, the same on every server.
//!
//! The digests only decide what to send; the agent still checks every entry and bundle it is sent,
//! so a collision can at worst leave a change to the next update, never let anything in.

use std::collections::BTreeSet;

use ring::digest::{Context, SHA256};

use crate::bundle::TrustBundle;

/// How many buckets entries are digested in.
pub const ENTRY_BUCKETS: usize = 64;

/// Per-bucket digests of a set of `(entry id, revision)` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryDigests([u64; ENTRY_BUCKETS]);

impl Default for EntryDigests {
    fn default() -> Self {
        Self([0; ENTRY_BUCKETS])
    }
}

impl EntryDigests {
    /// The digests of every pair `entries` yields.
    pub fn of<'a>(entries: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut digests = Self::default();
        for (id, revision) in entries {
            let bucket = &mut digests.0[entry_bucket(id)];
            *bucket = bucket.wrapping_add(entry_hash(id, revision));
        }
        digests
    }

    /// Digests as a peer sent them; `None` unless there are exactly [`ENTRY_BUCKETS`].
    pub fn from_slice(buckets: &[u64]) -> Option<Self> {
        buckets.try_into().ok().map(Self)
    }

    /// The digests, bucket by bucket.
    pub fn buckets(&self) -> &[u64] {
        &self.0
    }

    /// The buckets whose digests differ from `other`'s, in ascending order.
    pub fn differing(&self, other: &Self) -> Vec<u32> {
        (0u32..)
            .zip(self.0.iter().zip(other.0.iter()))
            .filter(|(_, (ours, theirs))| ours != theirs)
            .map(|(bucket, _)| bucket)
            .collect()
    }
}

/// The bucket an entry id falls in (FNV-1a: cheap, and the same on every platform).
pub fn entry_bucket(id: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // The remainder is below ENTRY_BUCKETS, so it fits.
    usize::try_from(hash % ENTRY_BUCKETS as u64).unwrap_or(0)
}

/// The digest of the own trust bundle (0 when there is none).
pub fn bundle_digest(bundle: Option<&TrustBundle>) -> u64 {
    bundle.map_or(0, one_bundle)
}

/// The digest of a set of foreign bundles, whatever their order.
pub fn federated_digest<'a>(bundles: impl IntoIterator<Item = &'a TrustBundle>) -> u64 {
    bundles
        .into_iter()
        .map(one_bundle)
        .fold(0, u64::wrapping_add)
}

/// The digest of a set of tainted authority ids, whatever their order or repeats.
pub fn tainted_digest<'a>(ids: impl IntoIterator<Item = &'a str>) -> u64 {
    let ids: BTreeSet<&str> = ids.into_iter().collect();
    let mut context = Context::new(&SHA256);
    for id in ids {
        field(&mut context, id.as_bytes());
    }
    finish(context)
}

fn entry_hash(id: &str, revision: u64) -> u64 {
    let mut context = Context::new(&SHA256);
    field(&mut context, id.as_bytes());
    context.update(&revision.to_le_bytes());
    finish(context)
}

/// Everything a bundle holds, each field length-prefixed so no two bundles hash alike by
/// shifting bytes between fields.
fn one_bundle(bundle: &TrustBundle) -> u64 {
    let mut context = Context::new(&SHA256);
    field(&mut context, bundle.trust_domain.to_string().as_bytes());
    context.update(&bundle.sequence.to_le_bytes());
    context.update(&bundle.refresh_hint_seconds.to_le_bytes());
    context.update(&(bundle.x509_authorities.len() as u64).to_le_bytes());
    for certificate in &bundle.x509_authorities {
        field(&mut context, certificate);
    }
    for key in &bundle.jwt_authorities {
        field(&mut context, key.key_id.as_bytes());
        field(&mut context, &key.public_key);
        context.update(&key.expires_at.to_le_bytes());
    }
    finish(context)
}

fn field(context: &mut Context, bytes: &[u8]) {
    context.update(&(bytes.len() as u64).to_le_bytes());
    context.update(bytes);
}

fn finish(context: Context) -> u64 {
    let digest = context.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_digests_ignore_order_and_see_a_revision_change() {
        let forward = EntryDigests::of([("a", 1), ("b", 2), ("c", 3)]);
        let backward = EntryDigests::of([("c", 3), ("b", 2), ("a", 1)]);
        assert_eq!(forward, backward);
        let changed = EntryDigests::of([("a", 1), ("b", 5), ("c", 3)]);
        assert_eq!(
            forward.differing(&changed),
            vec![u32::try_from(entry_bucket("b")).expect("small")]
        );
        let removed = EntryDigests::of([("a", 1), ("c", 3)]);
        assert_eq!(forward.differing(&removed).len(), 1);
        assert!(EntryDigests::default().buckets().iter().all(|b| *b == 0));
    }

    #[test]
    fn digests_from_a_peer_need_every_bucket() {
        let digests = EntryDigests::of([("a", 1)]);
        assert_eq!(EntryDigests::from_slice(digests.buckets()), Some(digests));
        assert_eq!(EntryDigests::from_slice(&[0; 63]), None);
        assert_eq!(EntryDigests::from_slice(&[0; 65]), None);
    }

    #[test]
    fn ids_spread_over_the_buckets() {
        let mut used = BTreeSet::new();
        for n in 0..1000 {
            used.insert(entry_bucket(&format!("entry-{n}")));
        }
        assert_eq!(used.len(), ENTRY_BUCKETS);
    }

    #[test]
    fn tainted_and_federated_digests_ignore_order() {
        assert_eq!(tainted_digest(["x", "y"]), tainted_digest(["y", "x", "y"]));
        assert_ne!(tainted_digest(["x"]), tainted_digest(["xy"]));
        assert_ne!(tainted_digest([]), tainted_digest([""]));
        let a = TrustBundle {
            trust_domain: "a.org".parse().expect("domain"),
            x509_authorities: vec![vec![1, 2, 3]],
            jwt_authorities: Vec::new(),
            sequence: 1,
            refresh_hint_seconds: 300,
        };
        let mut b = a.clone();
        b.trust_domain = "b.org".parse().expect("domain");
        assert_eq!(federated_digest([&a, &b]), federated_digest([&b, &a]));
        let mut resequenced = a.clone();
        resequenced.sequence = 2;
        assert_ne!(bundle_digest(Some(&a)), bundle_digest(Some(&resequenced)));
        assert_eq!(bundle_digest(None), 0);
    }
}

//! Responses rendered once per content and shared by every stream that sends them.
//!
//! An agent with a thousand streams open for one workload identity (a Deployment's pods on one
//! node share their entries) used to build, encode and keep a copy of the same response per
//! stream, and again for each of them on every change. A stream now renders what it would send
//! (the [`X509View`](crate::source::X509View) or bundles it is entitled to, cheap to compare), and
//! asks this table for the response of that content: the first stream to ask encodes it, the
//! others get the same [`Arc`]. Entries live as long as some stream holds them (the table keeps
//! only [`Weak`] references), so the table holds no key material of its own.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tonic::Status;

/// One rendered response: the content it was rendered from, and what was rendered.
#[derive(Debug)]
pub(crate) struct Rendered<K, V> {
    key: K,
    value: V,
}

impl<K, V> Rendered<K, V> {
    /// What was rendered (e.g. the encoded response).
    pub(crate) fn value(&self) -> &V {
        &self.value
    }
}

/// The table of responses in use, by content.
#[derive(Debug)]
pub(crate) struct SharedResponses<K, V> {
    hasher: RandomState,
    table: Mutex<Table<K, V>>,
}

#[derive(Debug)]
struct Table<K, V> {
    buckets: HashMap<u64, Vec<Weak<Rendered<K, V>>>>,
    /// Buckets after the last sweep of dead references: the next sweep comes at twice as many.
    live_at_sweep: usize,
}

/// The table is swept of responses no stream holds once it has this many buckets and twice as
/// many as after the last sweep: a sweep's cost is spread over as many insertions.
const FIRST_SWEEP: usize = 64;

impl<K: Hash + PartialEq, V> SharedResponses<K, V> {
    pub(crate) fn new() -> Self {
        SharedResponses {
            hasher: RandomState::new(),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                live_at_sweep: 0,
            }),
        }
    }

    /// The response for `key`: one a stream already holds, else `render`'s, kept for the
    /// streams that ask next. `render` runs outside the table's lock; two streams that render
    /// the same new content at once both render it and the first one stored is shared.
    pub(crate) fn get_or_render(
        &self,
        key: K,
        render: impl FnOnce(&K) -> Result<V, Status>,
    ) -> Result<Arc<Rendered<K, V>>, Status> {
        let hash = self.hasher.hash_one(&key);
        if let Some(found) = self.find(hash, &key) {
            return Ok(found);
        }
        let value = render(&key)?;
        let rendered = Arc::new(Rendered { key, value });
        let mut table = self.lock();
        let bucket = table.buckets.entry(hash).or_default();
        bucket.retain(|weak| weak.strong_count() > 0);
        if let Some(found) = bucket
            .iter()
            .filter_map(Weak::upgrade)
            .find(|held| held.key == rendered.key)
        {
            return Ok(found);
        }
        bucket.push(Arc::downgrade(&rendered));
        if table.buckets.len() >= FIRST_SWEEP.max(2 * table.live_at_sweep) {
            table.sweep();
        }
        Ok(rendered)
    }

    fn find(&self, hash: u64, key: &K) -> Option<Arc<Rendered<K, V>>> {
        self.lock()
            .buckets
            .get(&hash)?
            .iter()
            .filter_map(Weak::upgrade)
            .find(|held| held.key == *key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<K, V>> {
        // The table only caches: what a panicking holder left is still a valid cache.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn buckets(&self) -> usize {
        self.lock().buckets.len()
    }
}

impl<K, V> Table<K, V> {
    fn sweep(&mut self) {
        self.buckets.retain(|_, bucket| {
            bucket.retain(|weak| weak.strong_count() > 0);
            !bucket.is_empty()
        });
        self.live_at_sweep = self.buckets.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn equal_content_is_rendered_once_while_held() {
        let shared = SharedResponses::<String, u32>::new();
        let renders = Cell::new(0);
        let render = |_: &String| {
            renders.set(renders.get() + 1);
            Ok(renders.get())
        };
        let first = shared
            .get_or_render("web".into(), render)
            .expect("rendered");
        let second = shared.get_or_render("web".into(), render).expect("shared");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(renders.get(), 1);
        let other = shared.get_or_render("db".into(), render).expect("rendered");
        assert_eq!(*other.value(), 2);
        // Nobody holds it any more: the next stream renders it again.
        drop((first, second));
        let again = shared
            .get_or_render("web".into(), render)
            .expect("rendered");
        assert_eq!(*again.value(), 3);
    }

    #[test]
    fn a_failed_render_is_not_kept() {
        let shared = SharedResponses::<String, u32>::new();
        let refused = shared.get_or_render("web".into(), |_| Err(Status::internal("no")));
        assert!(refused.is_err());
        let rendered = shared
            .get_or_render("web".into(), |_| Ok(7))
            .expect("rendered");
        assert_eq!(*rendered.value(), 7);
    }

    #[test]
    fn responses_nobody_holds_are_swept() {
        let shared = SharedResponses::<u32, u32>::new();
        let held: Vec<_> = (0..10)
            .map(|n| shared.get_or_render(n, |n| Ok(*n)).expect("rendered"))
            .collect();
        for n in 10..10_000 {
            drop(shared.get_or_render(n, |n| Ok(*n)).expect("rendered"));
        }
        assert!(
            shared.buckets() <= 2 * FIRST_SWEEP,
            "{} buckets kept for 10 held responses",
            shared.buckets()
        );
        assert_eq!(held.len(), 10);
        for (n, rendered) in held.iter().enumerate() {
            let again = shared.get_or_render(n as u32, |_| Ok(0)).expect("held");
            assert!(Arc::ptr_eq(rendered, &again));
        }
    }
}

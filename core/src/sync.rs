//! Locks that go on serving after a panic.
//!
//! Sigil's shared in-memory state is replaced a whole value at a time under its locks (an entry,
//! a certified key, a view of the pods), so a task that panicked while holding one cannot have
//! left half an update behind that would matter more than refusing service would. A poisoned
//! lock is therefore used as it is, everywhere, through these methods.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`RwLock`] access that ignores poisoning (see the module documentation).
pub trait RwLockExt<T> {
    /// A read guard, poisoned or not.
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T>;
    /// A write guard, poisoned or not.
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLockExt<T> for RwLock<T> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`Mutex`] access that ignores poisoning (see the module documentation).
pub trait MutexExt<T> {
    /// The guard, poisoned or not.
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T> MutexExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_serves_its_last_value() {
        let lock = std::sync::Arc::new(RwLock::new(1));
        let mutex = std::sync::Arc::new(Mutex::new(2));
        let (l, m) = (lock.clone(), mutex.clone());
        let panicked = std::thread::spawn(move || {
            let _write = l.write_unpoisoned();
            let _guard = m.lock_unpoisoned();
            panic!("poison both");
        })
        .join();
        assert!(panicked.is_err());
        assert!(lock.is_poisoned() && mutex.is_poisoned());
        *lock.write_unpoisoned() += 1;
        assert_eq!(*lock.read_unpoisoned(), 2);
        assert_eq!(*mutex.lock_unpoisoned(), 2);
    }
}

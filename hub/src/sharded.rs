//! A map split into independently locked shards, so that work on different keys (users)
//! rarely contends. Used by the local registry ([`crate::fanout`]) and the in-process history
//! ([`crate::backplane::memory`]).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

use parking_lot::{Mutex, MutexGuard};

const SHARDS: usize = 64;

/// A `HashMap` in 64 shards, each behind its own lock. A guard is held only for map updates
/// and non-blocking work, never across an `.await`.
pub struct ShardedMap<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: RandomState,
}

impl<K: Eq + Hash, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<K: Eq + Hash, V> ShardedMap<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks the shard that holds `key`.
    pub fn lock<Q>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + ?Sized,
    {
        let h = self.hasher.hash_one(key) as usize;
        self.shards[h % SHARDS].lock()
    }

    /// Every shard, one after another (for sweeps; each is locked only while visited).
    pub fn shards(&self) -> impl Iterator<Item = &Mutex<HashMap<K, V>>> {
        self.shards.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_key_is_found_through_a_borrowed_form() {
        let map: ShardedMap<Arc<str>, u32> = ShardedMap::new();
        map.lock("alice").insert(Arc::from("alice"), 1);
        assert_eq!(map.lock("alice").get("alice"), Some(&1));
        let total: usize = map.shards().map(|s| s.lock().len()).sum();
        assert_eq!(total, 1);
    }
}

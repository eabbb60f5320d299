//! A bounded map whose entries expire: for answers of the API server the
//! operator may reuse for a short while (token reviews, access reviews).
//! At its bound it drops expired entries first, then the oldest, never the
//! whole map. Callers pass the time.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

pub struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant, Instant)>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), capacity: capacity.max(1) }
    }

    /// The value for `key`, if it has not expired at `now`.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        let (value, _, expires) = self.entries.get(key)?;
        (now < *expires).then(|| value.clone())
    }

    /// Keeps `value` for `ttl` from `now`.
    pub fn insert(&mut self, key: K, value: V, ttl: Duration, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, _, expires)| now < *expires);
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, at, _))| *at).map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (value, now, now + ttl));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_bound_drops_the_oldest_not_all() {
        let start = Instant::now();
        let mut cache = TtlCache::new(3);
        cache.insert("a", 1, Duration::from_secs(10), start);
        cache.insert("b", 2, Duration::from_secs(1), start);
        assert_eq!(cache.get(&"a", start), Some(1));
        assert_eq!(cache.get(&"b", start + Duration::from_secs(1)), None, "expired");
        cache.insert("c", 3, Duration::from_secs(10), start + Duration::from_millis(1));
        // Full: the expired "b" goes first.
        cache.insert("d", 4, Duration::from_secs(10), start + Duration::from_secs(2));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&"a", start + Duration::from_secs(2)), Some(1));
        // Full of live entries: only the oldest goes; the good ones stay.
        cache.insert("e", 5, Duration::from_secs(10), start + Duration::from_secs(3));
        let now = start + Duration::from_secs(3);
        assert_eq!(cache.get(&"a", now), None);
        assert_eq!([cache.get(&"c", now), cache.get(&"d", now), cache.get(&"e", now)], [Some(3), Some(4), Some(5)]);
        // Replacing a key does not evict anything.
        cache.insert("e", 6, Duration::from_secs(10), now);
        assert_eq!(cache.len(), 3);
    }
}

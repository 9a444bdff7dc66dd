//! A least-recently-used index with sizes, shared by the render cache and the module cache,
//! which differ only in what they bound (entries or bytes) and what a value is.

use std::collections::{BTreeMap, HashMap};

/// Values by key, in order of last use, with their total size.
#[derive(Debug)]
pub struct Lru<V> {
    tick: u64,
    entries: HashMap<String, Slot<V>>,
    by_use: BTreeMap<u64, String>,
    bytes: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    size: u64,
    tick: u64,
}

impl<V> Default for Lru<V> {
    fn default() -> Self {
        Self {
            tick: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            bytes: 0,
        }
    }
}

impl<V> Lru<V> {
    /// The value of `key`, now the most recently used.
    pub fn get(&mut self, key: &str) -> Option<&V> {
        self.tick += 1;
        let slot = self.entries.get_mut(key)?;
        self.by_use.remove(&slot.tick);
        slot.tick = self.tick;
        self.by_use.insert(self.tick, key.to_string());
        Some(&slot.value)
    }

    /// The value of `key` to change, now the most recently used.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.get(key)?;
        self.entries.get_mut(key).map(|slot| &mut slot.value)
    }

    /// Inserts or replaces `key` as the most recently used.
    pub fn insert(&mut self, key: String, value: V, size: u64) {
        self.remove(&key);
        self.tick += 1;
        self.by_use.insert(self.tick, key.clone());
        self.entries.insert(
            key,
            Slot {
                value,
                size,
                tick: self.tick,
            },
        );
        self.bytes += size;
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let slot = self.entries.remove(key)?;
        self.by_use.remove(&slot.tick);
        self.bytes -= slot.size;
        Some(slot.value)
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<(String, V)> {
        let (_, key) = self.by_use.pop_first()?;
        let slot = self.entries.remove(&key)?;
        self.bytes -= slot.size;
        Some((key, slot.value))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the sizes of all entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_is_the_least_recently_used() {
        let mut lru = Lru::default();
        lru.insert("a".into(), 1, 10);
        lru.insert("b".into(), 2, 20);
        assert_eq!(lru.get_mut("a").map(|v| std::mem::replace(v, 1)), Some(1));
        lru.insert("c".into(), 3, 30);
        assert_eq!(lru.bytes(), 60);
        assert_eq!(lru.pop_oldest(), Some(("b".to_string(), 2)));
        assert_eq!(lru.pop_oldest(), Some(("a".to_string(), 1)));
        lru.insert("c".into(), 4, 5);
        assert_eq!((lru.len(), lru.bytes()), (1, 5));
        assert_eq!(lru.remove("c"), Some(4));
        assert!(lru.is_empty() && lru.pop_oldest().is_none());
        assert_eq!(lru.bytes(), 0);
    }
}

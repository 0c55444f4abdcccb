//! Typed ownership: which part of a worker owns a key the backend or
//! control hands back (a watched descriptor, a datagram endpoint, an ask,
//! a signature), so every completion and answer goes straight to its
//! owner, never found by trying one table after another.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::Hash;

use crate::slab::Key as ConnKey;

/// A tunnel's key in the worker's tunnel table ([`crate::tunnel::Tunnels`]).
pub type TunnelId = crate::slab::Key;

/// The HTTP connection that carries a tunnel, or that waits for a
/// handshake signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Carrier {
    /// An HTTP/3 connection (its key on the HTTP/3 side).
    H3(ConnKey),
    /// A TCP front connection (HTTP/2 or HTTP/1.1).
    Front(ConnKey),
}

/// Who owns a watched descriptor (readiness: the TCP sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchOwner {
    /// The TCP front's listener `i`.
    Listener(usize),
    /// A TCP front connection's socket.
    FrontConn(ConnKey),
    /// A classic CONNECT's TCP connection to its target.
    Tunnel(TunnelId),
}

/// Keys of one kind mapped to their owners.
#[derive(Debug)]
pub struct Registry<K, V> {
    owners: HashMap<K, V>,
}

impl<K, V> Default for Registry<K, V> {
    fn default() -> Self {
        Self { owners: HashMap::new() }
    }
}

impl<K: Copy + Eq + Hash, V: Copy> Registry<K, V> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `owner` owns `key` (replacing an earlier owner).
    pub fn insert(&mut self, key: K, owner: V) {
        self.owners.insert(key, owner);
    }

    /// The owner of `key`.
    pub fn get(&self, key: K) -> Option<V> {
        self.owners.get(&key).copied()
    }

    /// Forgets `key`; returns its owner.
    pub fn remove(&mut self, key: K) -> Option<V> {
        self.owners.remove(&key)
    }

    /// Whether `key` has an owner.
    pub fn contains(&self, key: K) -> bool {
        self.owners.contains_key(&key)
    }

    /// Keys and owners, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        self.owners.iter().map(|(k, v)| (*k, *v))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether no key has an owner.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

/// Keys handed out in order, never reused for the worker's life.
#[derive(Debug)]
pub struct KeyCounter {
    next: u64,
}

impl Default for KeyCounter {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl KeyCounter {
    /// A fresh key.
    pub fn fresh(&mut self) -> u64 {
        let k = self.next;
        self.next += 1;
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_come_back_once() {
        let mut r: Registry<u64, char> = Registry::new();
        let mut keys = KeyCounter::default();
        let (a, b) = (keys.fresh(), keys.fresh());
        assert_ne!(a, b);
        r.insert(a, 'a');
        r.insert(b, 'b');
        assert_eq!(r.get(a), Some('a'));
        assert_eq!(r.remove(a), Some('a'));
        assert_eq!(r.remove(a), None);
        assert!(!r.contains(a) && r.contains(b));
        assert_eq!(r.len(), 1);
    }
}

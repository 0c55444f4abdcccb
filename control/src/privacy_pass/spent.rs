//! The spent-token store: each token nonce is accepted once. Tokens are
//! single-use; preventing double spending is the redeeming origin's job
//! (RFC 9576, the architecture; the relay is the origin here).
//!
//! Nonces are kept per (token key, redemption window): a token can only be
//! redeemed while its key is in force and its challenge's window is the
//! current or the previous one, so a set can be dropped whole once its
//! window is older than that, or its key is gone. With the empty redemption
//! context (no windows) the one set of a key lives as long as the key.
//!
//! Memory is bounded by `max`: a nonce is 32 bytes in a `HashSet` (one
//! control byte beside it, at most 87.5 % full, doubling when it grows), so
//! an entry costs about 37 to 75 bytes: about 75 MB at the default bound of
//! 1,000,000. A full store refuses new tokens (fail closed) rather than
//! forget spent ones.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};

use super::wire::{KeyId, NONCE_LEN};

/// Why a token could not be spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    /// The nonce was accepted before.
    #[error("token replayed")]
    Replayed,
    /// The store holds its bound of live nonces.
    #[error("spent-token store full")]
    Full,
}

/// Spent nonces, per key and window.
#[derive(Debug)]
pub struct SpentNonces {
    sets: BTreeMap<(KeyId, u64), HashSet<[u8; NONCE_LEN]>>,
    len: usize,
    max: usize,
}

impl SpentNonces {
    /// An empty store of at most `max` nonces.
    pub fn new(max: usize) -> Self {
        Self { sets: BTreeMap::new(), len: 0, max }
    }

    /// Nonces held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Spends `nonce` of a token of `key` for window `window`: refused if
    /// any set holds it (a nonce is accepted once whatever its key or
    /// window), or if the store is full.
    pub fn spend(&mut self, key: &KeyId, window: u64, nonce: &[u8; NONCE_LEN]) -> Result<(), SpendError> {
        if self.sets.values().any(|s| s.contains(nonce)) {
            return Err(SpendError::Replayed);
        }
        if self.len >= self.max {
            return Err(SpendError::Full);
        }
        self.sets.entry((*key, window)).or_default().insert(*nonce);
        self.len += 1;
        Ok(())
    }

    /// Drops every set `keep` refuses (windows too old to redeem, keys no
    /// longer in force); returns the nonces dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&KeyId, u64) -> bool) -> usize {
        let before = self.len;
        self.sets.retain(|(key, window), set| {
            let k = keep(key, *window);
            if !k {
                self.len -= set.len();
            }
            k
        });
        before - self.len
    }

    /// Sets held (at most keys in force x 2 windows).
    pub fn sets(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_spent_once_across_keys_and_windows() {
        let mut s = SpentNonces::new(10);
        let (a, b) = ([1; 32], [2; 32]);
        assert_eq!(s.spend(&a, 5, &[9; 32]), Ok(()));
        assert_eq!(s.spend(&a, 5, &[9; 32]), Err(SpendError::Replayed));
        assert_eq!(s.spend(&b, 6, &[9; 32]), Err(SpendError::Replayed));
        assert_eq!(s.spend(&a, 6, &[8; 32]), Ok(()));
        assert_eq!((s.len(), s.sets()), (2, 2));
    }

    #[test]
    fn the_bound_holds_and_dropping_old_windows_frees_room() {
        let mut s = SpentNonces::new(3);
        let key = [1; 32];
        for n in 0..3u8 {
            s.spend(&key, u64::from(n), &[n; 32]).unwrap();
        }
        assert_eq!(s.spend(&key, 3, &[3; 32]), Err(SpendError::Full));
        assert_eq!(s.spend(&key, 3, &[0; 32]), Err(SpendError::Replayed), "replays are still named");
        assert_eq!(s.retain(|_, w| w >= 2), 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.spend(&key, 3, &[3; 32]), Ok(()));
        // A dropped window's nonce is accepted again: the caller drops only
        // windows whose challenges it no longer accepts.
        assert_eq!(s.spend(&key, 3, &[0; 32]), Ok(()));
        assert_eq!(s.spend(&key, 3, &[5; 32]), Err(SpendError::Full));
        assert_eq!(s.retain(|k, _| k != &key), 3);
        assert!(s.is_empty());
    }
}

//! A generational slab: O(1) insert, lookup and removal by a `u64` key that
//! never matches a later occupant of the same slot.
//!
//! Connections live here (boxed, so taking one out to work on it while the
//! worker is borrowed mutably moves a pointer, not the connection), and the
//! I/O backends keep their target sockets here too.
#![forbid(unsafe_code)]

/// A slab key: slot index in the low 32 bits, generation in the high 32.
pub type Key = u64;

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
    /// Reserved while its value is taken out with [`Slab::take`].
    reserved: bool,
}

/// Values addressed by generational keys.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn split(key: Key) -> (usize, u32) {
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

impl<T> Slab<T> {
    /// An empty slab.
    pub fn new() -> Self {
        Self { slots: Vec::new(), free: Vec::new(), len: 0 }
    }

    /// Number of values stored (including values taken out).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slab is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value`; returns its key.
    pub fn insert(&mut self, value: T) -> Key {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return u64::from(index) | (u64::from(slot.generation) << 32);
        }
        let index = self.slots.len() as u32;
        self.slots.push(Slot { generation: 0, value: Some(value), reserved: false });
        u64::from(index)
    }

    fn slot(&self, key: Key) -> Option<&Slot<T>> {
        let (index, generation) = split(key);
        self.slots.get(index).filter(|s| s.generation == generation)
    }

    fn slot_mut(&mut self, key: Key) -> Option<&mut Slot<T>> {
        let (index, generation) = split(key);
        self.slots.get_mut(index).filter(|s| s.generation == generation)
    }

    /// Whether `key` names a live value (stored or taken out).
    pub fn contains(&self, key: Key) -> bool {
        self.slot(key).is_some_and(|s| s.value.is_some() || s.reserved)
    }

    /// The value under `key`.
    pub fn get(&self, key: Key) -> Option<&T> {
        self.slot(key).and_then(|s| s.value.as_ref())
    }

    /// The value under `key`, mutably.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        self.slot_mut(key).and_then(|s| s.value.as_mut())
    }

    /// Takes the value out to work on it; the key stays reserved until
    /// [`Slab::put`] returns it or [`Slab::release`] frees the slot.
    pub fn take(&mut self, key: Key) -> Option<T> {
        let slot = self.slot_mut(key)?;
        let value = slot.value.take()?;
        slot.reserved = true;
        Some(value)
    }

    /// Puts back a value taken with [`Slab::take`].
    pub fn put(&mut self, key: Key, value: T) {
        if let Some(slot) = self.slot_mut(key)
            && slot.reserved
        {
            slot.reserved = false;
            slot.value = Some(value);
        }
    }

    /// Frees the slot of a value taken out with [`Slab::take`] (the value
    /// is gone for good).
    pub fn release(&mut self, key: Key) {
        let (index, _) = split(key);
        if let Some(slot) = self.slot_mut(key)
            && slot.reserved
        {
            slot.reserved = false;
            slot.generation = slot.generation.wrapping_add(1);
            self.free.push(index as u32);
            self.len -= 1;
        }
    }

    /// Removes and returns the value under `key`.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        let (index, _) = split(key);
        let slot = self.slot_mut(key)?;
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        self.len -= 1;
        Some(value)
    }

    /// Keys of every stored value (not those taken out).
    pub fn keys(&self) -> Vec<Key> {
        self.iter().map(|(k, _)| k).collect()
    }

    /// Every stored value with its key.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.value.as_ref().map(|v| (i as u64 | (u64::from(s.generation) << 32), v)))
    }

    /// Every stored value with its key, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| {
            let generation = s.generation;
            s.value.as_mut().map(move |v| (i as u64 | (u64::from(generation) << 32), v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_removed_values_never_match_new_ones() {
        let mut s = Slab::new();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        let c = s.insert("c");
        assert_ne!(a, c, "the slot is reused with a new generation");
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&"c"));
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn take_put_and_release() {
        let mut s = Slab::new();
        let a = s.insert(1);
        let v = s.take(a).unwrap();
        assert!(s.contains(a), "a taken value keeps its key");
        assert_eq!(s.take(a), None);
        let b = s.insert(2);
        assert_ne!(a & 0xffff_ffff, b & 0xffff_ffff, "a reserved slot is not reused");
        s.put(a, v + 10);
        assert_eq!(s.get(a), Some(&11));
        s.take(a).unwrap();
        s.release(a);
        assert!(!s.contains(a));
        assert_eq!(s.len(), 1);
        s.put(a, 5); // a stale put is ignored
        assert_eq!(s.get(a), None);
        assert_eq!(s.keys(), vec![b]);
    }
}

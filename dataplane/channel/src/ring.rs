//! A single-producer single-consumer ring of fixed-size records in shared
//! memory.
//!
//! The ring header holds two `u32` indices on separate cache lines: `head`
//! (next slot to read, written by the consumer) and `tail` (next slot to
//! write, written by the producer). Indices run freely and wrap; the slot is
//! `index % RING_SLOTS`. Each side keeps its own index locally and only
//! *reads* the peer's, validating it (`tail - head <= RING_SLOTS`), so a peer
//! that scribbles on the header is detected as [`RingError::Corrupt`] instead
//! of steering this side out of bounds.
//!
//! Slots are copied in and out with atomic word stores and loads
//! (`Mapping::store_words`, `Mapping::load_words`): the consumer's copy is
//! private memory, and the peer rewriting the slot during the copy can only
//! make the copy garbage, which the record decoder then refuses.
//!
//! The index protocol (which side stores which index, with which memory
//! ordering, and when a slot may be touched) is written once, generic over
//! `RingMemory`, so the loom model test (`cargo xtask test` runs it with
//! `--cfg loom`) checks the very code the shared-memory ring runs, with
//! loom's atomics and its data-race-detecting cells in place of the mapping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use relay_proto::channel::RECORD_SIZE;

use crate::mapping::Mapping;
use crate::region::RING_HEADER;

/// Record slots per ring (a power of two).
pub const RING_SLOTS: u32 = 512;

const HEAD: usize = 0;
const TAIL: usize = 64;

/// Why a ring operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// No free slot (producer) — the consumer is behind.
    #[error("ring full")]
    Full,
    /// The peer's index is impossible; the ring cannot be trusted.
    #[error("ring indices corrupt")]
    Corrupt,
}

/// A ring inside a mapping.
#[derive(Debug)]
pub(crate) struct Ring {
    map: Arc<Mapping>,
    offset: usize,
}

impl Ring {
    /// The ring whose header starts `offset` bytes into `map`.
    pub(crate) fn new(map: Arc<Mapping>, offset: usize) -> Self {
        assert!(
            offset + RING_HEADER + RING_SLOTS as usize * RECORD_SIZE <= map.len(),
            "ring inside the mapping"
        );
        Self { map, offset }
    }

    fn index(&self, which: usize) -> &AtomicU32 {
        self.map.atomic_u32(self.offset + which)
    }

    fn slot_offset(&self, index: u32) -> usize {
        self.offset + RING_HEADER + (index % RING_SLOTS) as usize * RECORD_SIZE
    }
}

/// A 32-bit atomic the ring's indices live in (std's, or loom's in the
/// model test).
pub(crate) trait Index32 {
    fn load(&self, order: Ordering) -> u32;
    fn store(&self, value: u32, order: Ordering);
}

impl Index32 for AtomicU32 {
    fn load(&self, order: Ordering) -> u32 {
        AtomicU32::load(self, order)
    }
    fn store(&self, value: u32, order: Ordering) {
        AtomicU32::store(self, value, order)
    }
}

/// The memory a ring lives in: two indices and `capacity` slots of `R`
/// (a record).
pub(crate) trait RingMemory {
    type Index: Index32;
    type Record: ?Sized;
    fn capacity(&self) -> u32;
    fn head(&self) -> &Self::Index;
    fn tail(&self) -> &Self::Index;
    /// Copies `record` into slot `index % capacity`.
    ///
    /// # Safety
    /// The caller is the producer and the slot is free (not yet published,
    /// or already released by the consumer).
    unsafe fn write_slot(&self, index: u32, record: &Self::Record);
    /// Copies slot `index % capacity` into `out`.
    ///
    /// # Safety
    /// The caller is the consumer and the slot was published to it.
    unsafe fn read_slot(&self, index: u32, out: &mut Self::Record);
}

impl RingMemory for Ring {
    type Index = AtomicU32;
    type Record = [u8; RECORD_SIZE];
    fn capacity(&self) -> u32 {
        RING_SLOTS
    }
    fn head(&self) -> &AtomicU32 {
        self.index(HEAD)
    }
    fn tail(&self) -> &AtomicU32 {
        self.index(TAIL)
    }
    unsafe fn write_slot(&self, index: u32, record: &[u8; RECORD_SIZE]) {
        // Atomic word stores: even a consumer that reads the slot early
        // (breaking the protocol) races nothing.
        self.map.store_words(self.slot_offset(index), record);
    }
    unsafe fn read_slot(&self, index: u32, out: &mut [u8; RECORD_SIZE]) {
        // Atomic word loads into private memory: a producer that rewrites
        // the slot meanwhile (breaking the protocol) only garbles the copy.
        self.map.load_words(self.slot_offset(index), out);
    }
}

/// Records written but not yet consumed, as the producer sees it.
pub(crate) fn pending<M: RingMemory>(mem: &M, tail: u32) -> Result<u32, RingError> {
    let head = mem.head().load(Ordering::Acquire);
    let used = tail.wrapping_sub(head);
    if used > mem.capacity() { Err(RingError::Corrupt) } else { Ok(used) }
}

/// The producer's step: copy `record` into the next slot, then publish it.
pub(crate) fn push<M: RingMemory>(mem: &M, tail: &mut u32, record: &M::Record) -> Result<(), RingError> {
    if pending(mem, *tail)? == mem.capacity() {
        return Err(RingError::Full);
    }
    // SAFETY: the slot is free: the consumer has released it (head passed
    // it, read with Acquire in `pending`) and does not touch slots at or
    // past `tail` until the Release store below publishes them.
    unsafe { mem.write_slot(*tail, record) };
    *tail = tail.wrapping_add(1);
    mem.tail().store(*tail, Ordering::Release);
    Ok(())
}

/// The consumer's step: copy the next record out, then release its slot.
pub(crate) fn pop<M: RingMemory>(mem: &M, head: &mut u32, out: &mut M::Record) -> Result<bool, RingError> {
    let tail = mem.tail().load(Ordering::Acquire);
    let available = tail.wrapping_sub(*head);
    if available == 0 {
        return Ok(false);
    }
    if available > mem.capacity() {
        return Err(RingError::Corrupt);
    }
    // SAFETY: the slot was published by the producer's Release store of
    // `tail` (read with Acquire above) and is not written again until the
    // Release store of `head` below releases it. The record is copied out
    // before that, and decoded only from the copy; a misbehaving producer
    // can at worst make the copy garbage, which the decoder rejects (on the
    // shared mapping the copy is atomic loads, so not even that races).
    unsafe { mem.read_slot(*head, out) };
    *head = head.wrapping_add(1);
    mem.head().store(*head, Ordering::Release);
    Ok(true)
}

/// The writing end of a ring, untyped (wrapped by
/// [`Sender`](crate::ends::Sender)).
#[derive(Debug)]
pub(crate) struct Producer {
    ring: Ring,
    tail: u32,
}

/// The reading end of a ring, untyped (wrapped by
/// [`Receiver`](crate::ends::Receiver)).
#[derive(Debug)]
pub(crate) struct Consumer {
    ring: Ring,
    head: u32,
}

impl Producer {
    /// Takes the producer role, continuing from the tail in memory.
    pub(crate) fn attach(ring: Ring) -> Self {
        let tail = ring.index(TAIL).load(Ordering::Acquire);
        Self { ring, tail }
    }

    /// Number of records written but not yet consumed, as far as this side
    /// can tell.
    pub(crate) fn pending(&self) -> Result<u32, RingError> {
        pending(&self.ring, self.tail)
    }

    /// Copies `record` into the next slot and publishes it.
    pub(crate) fn push(&mut self, record: &[u8; RECORD_SIZE]) -> Result<(), RingError> {
        push(&self.ring, &mut self.tail, record)
    }
}

impl Consumer {
    /// Takes the consumer role, continuing from the head in memory.
    pub(crate) fn attach(ring: Ring) -> Self {
        let head = ring.index(HEAD).load(Ordering::Acquire);
        Self { ring, head }
    }

    /// Copies the next record into `out` and releases its slot. Returns
    /// `Ok(false)` when the ring is empty.
    pub(crate) fn pop(&mut self, out: &mut [u8; RECORD_SIZE]) -> Result<bool, RingError> {
        pop(&self.ring, &mut self.head, out)
    }
}

/// The loom model: every interleaving (and every weak-memory outcome loom
/// models) of a producer and a consumer on a two-slot ring, through the
/// same `push`/`pop` code. loom's `UnsafeCell` flags any slot access that
/// is not ordered by the index protocol as a data race. Run with
/// `RUSTFLAGS="--cfg loom" cargo test -p relay-channel --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_model {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU32 as LoomU32;

    use super::*;

    impl Index32 for LoomU32 {
        fn load(&self, order: Ordering) -> u32 {
            LoomU32::load(self, order)
        }
        fn store(&self, value: u32, order: Ordering) {
            LoomU32::store(self, value, order)
        }
    }

    /// Two slots of two words (a record is a tag and its complement, so a
    /// torn copy is caught too).
    struct Model {
        head: LoomU32,
        tail: LoomU32,
        slots: [UnsafeCell<[u32; 2]>; 2],
    }

    impl RingMemory for Model {
        type Index = LoomU32;
        type Record = [u32; 2];
        fn capacity(&self) -> u32 {
            2
        }
        fn head(&self) -> &LoomU32 {
            &self.head
        }
        fn tail(&self) -> &LoomU32 {
            &self.tail
        }
        unsafe fn write_slot(&self, index: u32, record: &[u32; 2]) {
            // SAFETY: loom checks the caller's exclusivity claim.
            self.slots[(index % 2) as usize].with_mut(|p| unsafe { *p = *record });
        }
        unsafe fn read_slot(&self, index: u32, out: &mut [u32; 2]) {
            // SAFETY: loom checks the caller's exclusivity claim.
            self.slots[(index % 2) as usize].with(|p| *out = unsafe { *p });
        }
    }

    #[test]
    fn loom_spsc_ring_delivers_in_order_without_races() {
        // Three records through two slots: the producer meets a full ring,
        // the consumer an empty one, and the indices wrap the slots.
        const N: u32 = 3;
        loom::model(|| {
            let mem = Arc::new(Model {
                head: LoomU32::new(0),
                tail: LoomU32::new(0),
                slots: [UnsafeCell::new([0; 2]), UnsafeCell::new([0; 2])],
            });
            let producer_mem = mem.clone();
            let producer = loom::thread::spawn(move || {
                let mut tail = 0;
                for tag in 1..=N {
                    while push(&*producer_mem, &mut tail, &[tag, !tag]) == Err(RingError::Full) {
                        loom::thread::yield_now();
                    }
                }
            });
            let mut head = 0;
            let mut out = [0u32; 2];
            for expect in 1..=N {
                loop {
                    match pop(&*mem, &mut head, &mut out) {
                        Ok(true) => break,
                        Ok(false) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
                assert_eq!(out, [expect, !expect], "in order and whole");
            }
            assert_eq!(pop(&*mem, &mut head, &mut out), Ok(false));
            producer.join().unwrap();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;

    /// Raw ends of worker 0's asks ring: (dataplane's producer, control's
    /// consumer).
    fn asks_ends(region: &Region) -> (Producer, Consumer) {
        (Producer::attach(region.asks_ring(0)), Consumer::attach(region.asks_ring(0)))
    }

    fn record(tag: u32) -> Box<[u8; RECORD_SIZE]> {
        let mut r = Box::new([0u8; RECORD_SIZE]);
        r[..4].copy_from_slice(&tag.to_le_bytes());
        r[RECORD_SIZE - 4..].copy_from_slice(&tag.to_le_bytes());
        r
    }

    #[test]
    fn fifo_fill_drain_and_wrap() {
        let (region, _fd) = Region::create(1).unwrap();
        let (mut tx, mut rx) = asks_ends(&region);
        let mut out = Box::new([0u8; RECORD_SIZE]);
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        for round in 0..5 {
            // Fill to capacity, then one more must be Full.
            while tx.push(&record(next_in)).is_ok() {
                next_in += 1;
            }
            assert_eq!(tx.push(&record(0)), Err(RingError::Full), "round {round}");
            assert_eq!(tx.pending(), Ok(RING_SLOTS));
            // Drain part way (so the next round wraps at a new offset).
            for _ in 0..RING_SLOTS / 2 + round {
                assert!(rx.pop(&mut out).unwrap());
                assert_eq!(out[..4], next_out.to_le_bytes());
                assert_eq!(out[RECORD_SIZE - 4..], next_out.to_le_bytes());
                next_out += 1;
            }
        }
        while rx.pop(&mut out).unwrap() {
            assert_eq!(out[..4], next_out.to_le_bytes());
            next_out += 1;
        }
        assert_eq!(next_in, next_out);
    }

    #[test]
    fn threads_in_two_mappings_agree() {
        let (region, fd) = Region::create(1).unwrap();
        let other = Region::attach(fd).unwrap();
        let mut tx = Producer::attach(region.asks_ring(0));
        let mut rx = Consumer::attach(other.asks_ring(0));
        const N: u32 = 20_000;
        let producer = std::thread::spawn(move || {
            for i in 0..N {
                let r = record(i);
                while tx.push(&r) == Err(RingError::Full) {
                    std::thread::yield_now();
                }
            }
        });
        let mut out = Box::new([0u8; RECORD_SIZE]);
        let mut expect = 0;
        while expect < N {
            if rx.pop(&mut out).unwrap() {
                assert_eq!(out[..4], expect.to_le_bytes());
                assert_eq!(out[RECORD_SIZE - 4..], expect.to_le_bytes());
                expect += 1;
            } else {
                std::thread::yield_now();
            }
        }
        producer.join().unwrap();
    }

    /// Model test: a long pseudo-random sequence of pushes and pops (bursts
    /// of each, so the ring often runs full and empty, and the 32-bit
    /// indices are started near their wrap-around) against a `VecDeque`.
    #[test]
    fn random_operations_match_a_fifo_model() {
        let (region, _fd) = Region::create(1).unwrap();
        let (mut tx, mut rx) = asks_ends(&region);
        // Start both indices just below u32::MAX: the sequence crosses the
        // wrap of the free-running counters.
        let start = u32::MAX - 1000;
        tx.tail = start;
        tx.ring.index(TAIL).store(start, Ordering::Release);
        rx.head = start;
        rx.ring.index(HEAD).store(start, Ordering::Release);
        let mut model = std::collections::VecDeque::new();
        let mut out = Box::new([0u8; RECORD_SIZE]);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut tag = 0u32;
        for _ in 0..2_000 {
            let burst = (next() % (2 * RING_SLOTS as u64)) as usize;
            if next() % 2 == 0 {
                for _ in 0..burst {
                    match tx.push(&record(tag)) {
                        Ok(()) => {
                            assert!(model.len() < RING_SLOTS as usize, "push past capacity succeeded");
                            model.push_back(tag);
                            tag = tag.wrapping_add(1);
                        }
                        Err(RingError::Full) => assert_eq!(model.len(), RING_SLOTS as usize),
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
            } else {
                for _ in 0..burst {
                    let got = rx.pop(&mut out).unwrap();
                    match model.pop_front() {
                        Some(expect) => {
                            assert!(got, "the ring lost a record");
                            assert_eq!(out[..4], expect.to_le_bytes());
                            assert_eq!(out[RECORD_SIZE - 4..], expect.to_le_bytes());
                        }
                        None => assert!(!got, "the ring invented a record"),
                    }
                }
            }
            assert_eq!(tx.pending(), Ok(model.len() as u32));
        }
    }

    #[test]
    fn corrupt_peer_index_is_detected() {
        let (region, _fd) = Region::create(1).unwrap();
        let (mut tx, mut rx) = asks_ends(&region);
        tx.push(&record(1)).unwrap();
        let mut out = Box::new([0u8; RECORD_SIZE]);
        assert!(rx.pop(&mut out).unwrap());
        rx.head = rx.head.wrapping_add(RING_SLOTS * 4);
        rx.ring.index(HEAD).store(rx.head, Ordering::Release);
        assert_eq!(tx.push(&record(2)), Err(RingError::Corrupt));
        let mut dp_rx = Consumer::attach(region.answers_ring(0));
        let answers = Producer::attach(region.answers_ring(0));
        answers.ring.index(TAIL).store(RING_SLOTS + 1, Ordering::Release);
        assert_eq!(dp_rx.pop(&mut out), Err(RingError::Corrupt));
    }
}

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
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::region::{Mapping, RING_HEADER};
use super::{RECORD_SIZE, RING_SLOTS};

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
pub struct Ring {
    map: Arc<Mapping>,
    offset: usize,
}

impl Ring {
    pub(super) fn new(map: Arc<Mapping>, offset: usize) -> Self {
        Self { map, offset }
    }

    fn index(&self, which: usize) -> &std::sync::atomic::AtomicU32 {
        self.map.atomic_u32(self.offset + which)
    }

    fn slot(&self, index: u32) -> *mut u8 {
        let slot = (index % RING_SLOTS) as usize;
        self.map.at(self.offset + RING_HEADER + slot * RECORD_SIZE)
    }
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct Producer {
    ring: Ring,
    tail: u32,
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct Consumer {
    ring: Ring,
    head: u32,
}

impl Producer {
    /// Takes the producer role, continuing from the tail in memory.
    pub fn attach(ring: Ring) -> Self {
        let tail = ring.index(TAIL).load(Ordering::Acquire);
        Self { ring, tail }
    }

    /// Number of records written but not yet consumed, as far as this side
    /// can tell.
    pub fn pending(&self) -> Result<u32, RingError> {
        let head = self.ring.index(HEAD).load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > RING_SLOTS { Err(RingError::Corrupt) } else { Ok(used) }
    }

    /// Copies `record` into the next slot and publishes it.
    pub fn push(&mut self, record: &[u8; RECORD_SIZE]) -> Result<(), RingError> {
        if self.pending()? == RING_SLOTS {
            return Err(RingError::Full);
        }
        let dst = self.ring.slot(self.tail);
        // SAFETY: `dst` points at a whole slot inside the mapping. The slot
        // is free: the consumer has released it (head passed it, read with
        // Acquire above) and does not touch slots at or past `tail` until the
        // Release store below publishes them.
        unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), dst, RECORD_SIZE) };
        self.tail = self.tail.wrapping_add(1);
        self.ring.index(TAIL).store(self.tail, Ordering::Release);
        Ok(())
    }
}

impl Consumer {
    /// Takes the consumer role, continuing from the head in memory.
    pub fn attach(ring: Ring) -> Self {
        let head = ring.index(HEAD).load(Ordering::Acquire);
        Self { ring, head }
    }

    /// Copies the next record into `out` and releases its slot. Returns
    /// `Ok(false)` when the ring is empty.
    pub fn pop(&mut self, out: &mut [u8; RECORD_SIZE]) -> Result<bool, RingError> {
        let tail = self.ring.index(TAIL).load(Ordering::Acquire);
        let available = tail.wrapping_sub(self.head);
        if available == 0 {
            return Ok(false);
        }
        if available > RING_SLOTS {
            return Err(RingError::Corrupt);
        }
        let src = self.ring.slot(self.head);
        // SAFETY: `src` points at a whole slot inside the mapping, published
        // by the producer's Release store of `tail` (read with Acquire). The
        // record is copied out before the slot is released, and decoded only
        // from the copy; a misbehaving producer can at worst make the copy
        // garbage, which the record decoder rejects.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), RECORD_SIZE) };
        self.head = self.head.wrapping_add(1);
        self.ring.index(HEAD).store(self.head, Ordering::Release);
        Ok(true)
    }
}

// SAFETY: a producer or consumer is one end of an SPSC ring; moving it to
// another thread is fine as long as only one thread uses it at a time, which
// `&mut self` on push/pop enforces. The mapping itself is Send + Sync.
unsafe impl Send for Producer {}
// SAFETY: as above.
unsafe impl Send for Consumer {}

#[cfg(test)]
mod tests {
    use super::super::region::Region;
    use super::*;

    fn record(tag: u32) -> Box<[u8; RECORD_SIZE]> {
        let mut r = Box::new([0u8; RECORD_SIZE]);
        r[..4].copy_from_slice(&tag.to_le_bytes());
        r[RECORD_SIZE - 4..].copy_from_slice(&tag.to_le_bytes());
        r
    }

    #[test]
    fn fifo_fill_drain_and_wrap() {
        let (region, _fd) = Region::create(1).unwrap();
        let mut dp = region.dataplane_side(0);
        let mut ctl = region.control_side(0);
        let mut out = Box::new([0u8; RECORD_SIZE]);
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        for round in 0..5 {
            // Fill to capacity, then one more must be Full.
            while dp.tx.push(&record(next_in)).is_ok() {
                next_in += 1;
            }
            assert_eq!(dp.tx.push(&record(0)), Err(RingError::Full), "round {round}");
            assert_eq!(dp.tx.pending(), Ok(RING_SLOTS));
            // Drain part way (so the next round wraps at a new offset).
            for _ in 0..RING_SLOTS / 2 + round {
                assert!(ctl.rx.pop(&mut out).unwrap());
                assert_eq!(out[..4], next_out.to_le_bytes());
                assert_eq!(out[RECORD_SIZE - 4..], next_out.to_le_bytes());
                next_out += 1;
            }
        }
        while ctl.rx.pop(&mut out).unwrap() {
            assert_eq!(out[..4], next_out.to_le_bytes());
            next_out += 1;
        }
        assert_eq!(next_in, next_out);
    }

    #[test]
    fn threads_in_two_mappings_agree() {
        let (region, fd) = Region::create(1).unwrap();
        let other = Region::attach(fd).unwrap();
        let mut tx = region.dataplane_side(0).tx;
        let mut rx = other.control_side(0).rx;
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
        let mut dp = region.dataplane_side(0);
        let mut ctl = region.control_side(0);
        // Start both indices just below u32::MAX: the sequence crosses the
        // wrap of the free-running counters.
        let start = u32::MAX - 1000;
        dp.tx.tail = start;
        dp.tx.ring.index(TAIL).store(start, Ordering::Release);
        ctl.rx.head = start;
        ctl.rx.ring.index(HEAD).store(start, Ordering::Release);
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
                    match dp.tx.push(&record(tag)) {
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
                    let got = ctl.rx.pop(&mut out).unwrap();
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
            assert_eq!(dp.tx.pending(), Ok(model.len() as u32));
        }
    }

    #[test]
    fn corrupt_peer_index_is_detected() {
        let (region, _fd) = Region::create(1).unwrap();
        let mut dp = region.dataplane_side(0);
        let mut ctl = region.control_side(0);
        dp.tx.push(&record(1)).unwrap();
        let mut out = Box::new([0u8; RECORD_SIZE]);
        assert!(ctl.rx.pop(&mut out).unwrap());
        ctl.rx.head = ctl.rx.head.wrapping_add(RING_SLOTS * 4);
        ctl.rx.ring.index(HEAD).store(ctl.rx.head, Ordering::Release);
        assert_eq!(dp.tx.push(&record(2)), Err(RingError::Corrupt));
        let mut dp_rx = dp.rx;
        ctl.tx.ring.index(TAIL).store(RING_SLOTS + 1, Ordering::Release);
        assert_eq!(dp_rx.pop(&mut out), Err(RingError::Corrupt));
    }
}

//! The typed ends of a ring: a [`Sender`] encodes records of its direction
//! into slots, a [`Receiver`] copies slots into private memory and decodes
//! records of its direction out of the copy.
//!
//! The record type is the ring's direction: the region hands a worker a
//! `Sender<AskRecord>` and a `Receiver<AnswerRecord>`, and control the
//! reverse ([`DataplaneChannel`](crate::region::DataplaneChannel),
//! [`ControlChannel`](crate::region::ControlChannel)); nothing else can make
//! an end, so pushing an answer into the asks ring does not compile. A
//! record of the wrong direction found in a ring (a peer that breaks the
//! rule) is refused as [`RecordError::WrongDirection`].
#![forbid(unsafe_code)]

use std::marker::PhantomData;

use relay_proto::channel::RECORD_SIZE;
use relay_proto::channel::record::{ChannelRecord, RecordError};

use crate::ring::{Consumer, Producer, RingError};

/// Why a typed end could not push or pop a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The record is invalid. Pushing: a field out of its limits (nothing
    /// was written). Popping: the slot held no valid record of this
    /// direction (torn, hostile or foreign); it was consumed and skipped,
    /// and the caller counts it.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The ring refused: full (pushing), or its peer index is corrupt and
    /// the ring cannot be used again.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// The writing end of a ring carrying `R`.
#[derive(Debug)]
pub struct Sender<R> {
    producer: Producer,
    scratch: Box<[u8; RECORD_SIZE]>,
    records: PhantomData<fn(&R)>,
}

impl<R: ChannelRecord> Sender<R> {
    pub(crate) fn new(producer: Producer) -> Self {
        Self { producer, scratch: Box::new([0; RECORD_SIZE]), records: PhantomData }
    }

    /// Encodes `record` (in private memory) and publishes it in the next
    /// slot.
    pub fn push(&mut self, record: &R) -> Result<(), ChannelError> {
        record.encode(&mut self.scratch)?;
        Ok(self.producer.push(&self.scratch)?)
    }

    /// Records published but not yet consumed, as far as this side can
    /// tell.
    pub fn pending(&self) -> Result<u32, RingError> {
        self.producer.pending()
    }
}

/// The reading end of a ring carrying `R`.
#[derive(Debug)]
pub struct Receiver<R> {
    consumer: Consumer,
    copy: Box<[u8; RECORD_SIZE]>,
    records: PhantomData<fn() -> R>,
}

impl<R: ChannelRecord> Receiver<R> {
    pub(crate) fn new(consumer: Consumer) -> Self {
        Self { consumer, copy: Box::new([0; RECORD_SIZE]), records: PhantomData }
    }

    /// Takes the next record: copies its slot into private memory, releases
    /// the slot, then decodes and validates the copy (version, kind and
    /// direction, lengths, every field). `Ok(None)`: the ring is empty. An
    /// invalid record is consumed and returned as [`ChannelError::Record`];
    /// the next call goes on with the next slot.
    pub fn pop(&mut self) -> Result<Option<R>, ChannelError> {
        if !self.consumer.pop(&mut self.copy)? {
            return Ok(None);
        }
        Ok(Some(R::decode(&self.copy[..])?))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use relay_proto::channel::record::{AnswerRecord, AskRecord, FlowClosed};

    use super::*;
    use crate::region::{RING_HEADER, Region, asks_ring_offset};
    use crate::ring::RING_SLOTS;

    fn closed(flow_id: u64) -> AskRecord {
        AskRecord::FlowClosed(FlowClosed {
            flow_id,
            packets_up: flow_id,
            bytes_up: !flow_id,
            packets_down: flow_id.rotate_left(7),
            bytes_down: 3,
        })
    }

    /// The fields a valid `closed` record ties together.
    fn consistent(record: &AskRecord) -> bool {
        matches!(record, AskRecord::FlowClosed(f) if f.packets_up == f.flow_id && f.bytes_up == !f.flow_id)
    }

    fn slot_offset(worker: u32, slot: u32) -> u64 {
        (asks_ring_offset(worker) + RING_HEADER + slot as usize * RECORD_SIZE) as u64
    }

    #[test]
    fn typed_ends_carry_their_direction() {
        let (region, _fd) = Region::create(1).unwrap();
        let mut worker = region.dataplane_side(0);
        let mut control = region.control_side(0);
        worker.tx.push(&closed(1)).unwrap();
        assert_eq!(worker.tx.pending(), Ok(1));
        assert_eq!(control.rx.pop().unwrap(), Some(closed(1)));
        assert_eq!(control.rx.pop().unwrap(), None);
        control.tx.push(&AnswerRecord::Drain).unwrap();
        assert_eq!(worker.rx.pop().unwrap(), Some(AnswerRecord::Drain));
        // An invalid record is refused before anything is written.
        let bad = AnswerRecord::ListConns { request_id: 1, limit: 0 };
        assert_eq!(control.tx.push(&bad), Err(ChannelError::Record(RecordError::BadValue("limit"))));
        assert_eq!(worker.rx.pop().unwrap(), None);
    }

    /// A peer that rewrites a published slot before it is read: the reader
    /// decodes only its private copy, refuses it (counted by the caller)
    /// and goes on with the next record.
    #[test]
    fn a_slot_rewritten_after_publication_is_refused_and_skipped() {
        let (region, fd) = Region::create(1).unwrap();
        let peer = File::from(fd);
        let mut worker = region.dataplane_side(0);
        let mut control = region.control_side(0);
        worker.tx.push(&closed(1)).unwrap();
        worker.tx.push(&closed(2)).unwrap();
        worker.tx.push(&closed(3)).unwrap();
        // Slot 0: a kind of the other direction. Slot 1: a payload length
        // past the slot.
        peer.write_all_at(&[relay_proto::channel::record::VERSION, 5, 0, 0], slot_offset(0, 0)).unwrap();
        peer.write_all_at(&[relay_proto::channel::record::VERSION, 3, 0xff, 0xff], slot_offset(0, 1))
            .unwrap();
        assert_eq!(control.rx.pop(), Err(ChannelError::Record(RecordError::WrongDirection(5))));
        assert_eq!(control.rx.pop(), Err(ChannelError::Record(RecordError::PayloadLength(0xffff))));
        assert_eq!(control.rx.pop().unwrap(), Some(closed(3)));
        assert_eq!(control.rx.pop().unwrap(), None);
        // A tail the producer could not have written: corrupt, for good.
        peer.write_all_at(&(3 + RING_SLOTS + 1).to_ne_bytes(), asks_ring_offset(0) as u64 + 64).unwrap();
        assert_eq!(control.rx.pop(), Err(ChannelError::Ring(RingError::Corrupt)));
    }

    /// A hostile peer process keeps rewriting every slot (and, in the
    /// second round, the indices) of a ring while the reader drains it:
    /// every pop is a valid record or an error, never a panic or a read out
    /// of bounds. With the indices intact, every published slot yields
    /// exactly one result.
    #[test]
    fn a_peer_rewriting_slots_during_reads_only_yields_records_or_errors() {
        const N: u64 = 20_000;
        for scribble_indices in [false, true] {
            let (region, fd) = Region::create(1).unwrap();
            let peer = File::from(fd);
            let mut tx = region.dataplane_side(0).tx;
            let mut rx = region.control_side(0).rx;
            // A scribbled index can leave both ends waiting for each other.
            let deadline = Instant::now() + Duration::from_secs(if scribble_indices { 2 } else { 60 });
            let stop = Arc::new(AtomicBool::new(false));
            let producer = std::thread::spawn(move || {
                for i in 0..N {
                    loop {
                        match tx.push(&closed(i)) {
                            Ok(()) => break,
                            Err(ChannelError::Ring(RingError::Full)) if Instant::now() < deadline => {
                                std::thread::yield_now()
                            }
                            Err(_) => return,
                        }
                    }
                }
            });
            let hostile = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
                    let mut junk = [0u8; 64];
                    let tail_at = asks_ring_offset(0) as u64 + 64;
                    while !stop.load(Ordering::Relaxed) {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        for (i, b) in junk.iter_mut().enumerate() {
                            *b = (seed >> (i % 8 * 8)) as u8 ^ i as u8;
                        }
                        // A plausible header (version 2, some kind, a
                        // length) over junk, or junk alone.
                        let at_header = seed & 1 == 0;
                        if at_header {
                            junk[..4].copy_from_slice(&[2, (seed >> 8) as u8 % 14, 40, 0]);
                        }
                        // Half the time the slot published last (most
                        // likely still unread), else any slot.
                        let mut tail = [0u8; 4];
                        let target = if seed & 4 == 0 && peer.read_exact_at(&mut tail, tail_at).is_ok() {
                            u32::from_ne_bytes(tail).wrapping_sub(1) % RING_SLOTS
                        } else {
                            (seed % u64::from(RING_SLOTS)) as u32
                        };
                        let slot = slot_offset(0, target);
                        let at =
                            if at_header { slot } else { slot + (seed >> 20) % (RECORD_SIZE as u64 - 64) };
                        let _ = peer.write_all_at(&junk, at);
                        if scribble_indices && seed.is_multiple_of(1024) {
                            let index = asks_ring_offset(0) as u64 + if seed & 2 == 0 { 0 } else { 64 };
                            let _ = peer.write_all_at(&junk[..4], index);
                        }
                    }
                })
            };
            let (mut valid, mut refused, mut whole) = (0u64, 0u64, 0u64);
            let corrupt = loop {
                match rx.pop() {
                    Ok(Some(record)) => {
                        // Whatever decoded is a valid record: it encodes
                        // back to itself.
                        let mut buf = [0u8; RECORD_SIZE];
                        record.encode(&mut buf).unwrap();
                        assert_eq!(AskRecord::decode(&buf).unwrap(), record);
                        valid += 1;
                        whole += u64::from(consistent(&record));
                    }
                    Ok(None) if producer.is_finished() || Instant::now() > deadline => break false,
                    Ok(None) => std::thread::yield_now(),
                    Err(ChannelError::Record(_)) => refused += 1,
                    Err(ChannelError::Ring(RingError::Corrupt)) => break true,
                    Err(e) => panic!("{e}"),
                }
            };
            stop.store(true, Ordering::Relaxed);
            hostile.join().unwrap();
            producer.join().unwrap();
            eprintln!(
                "scribble_indices={scribble_indices}: {valid} valid ({whole} untouched), {refused} refused, corrupt={corrupt}"
            );
            if !scribble_indices {
                assert!(!corrupt, "slots alone cannot corrupt the ring");
                assert_eq!(valid + refused, N, "one result per published slot");
                assert!(refused > 0, "the hostile writer garbled some slots");
            }
        }
    }
}

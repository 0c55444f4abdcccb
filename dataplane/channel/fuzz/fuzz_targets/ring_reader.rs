//! The typed ring ends over memory a hostile peer writes: the input is a
//! script of peer writes (through the region's memfd, anywhere in either
//! ring of a worker: indices or slots), honest pushes and pops. Every pop is
//! a valid record of its ring's direction, "empty", a refused record or a
//! corrupt ring: never a panic, a read out of bounds or a record that does
//! not survive its own round trip.
//!
//! Script: `op` bytes, `op % 6` being
//! 0 / 1: peer write into the asks / answers ring: `slot u16 LE` (past the
//!        last slot: the ring's index header), `offset u16 LE`, `len u8`,
//!        then `len` bytes;
//! 2 / 3: control pops an ask / the worker pops an answer;
//! 4 / 5: the worker pushes an ask / control pushes an answer.
//! At the end both readers drain their rings.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use relay_channel::ends::{ChannelError, Receiver};
use relay_channel::region::{RING_HEADER, Region, answers_ring_offset, asks_ring_offset};
use relay_channel::ring::{RING_SLOTS, RingError};
use relay_proto::channel::RECORD_SIZE;
use relay_proto::channel::record::{AnswerRecord, AskRecord, ChannelRecord, FlowClosed};

/// Pops once; checks what came out. Returns whether the ring had nothing
/// more to give (empty or corrupt).
fn pop<R: ChannelRecord + PartialEq + std::fmt::Debug>(rx: &mut Receiver<R>) -> bool {
    match rx.pop() {
        Ok(Some(record)) => {
            let mut again = [0u8; RECORD_SIZE];
            record.encode(&mut again).expect("a decoded record re-encodes");
            assert_eq!(R::decode(&again).expect("re-encoded record decodes"), record);
            false
        }
        Ok(None) | Err(ChannelError::Ring(RingError::Corrupt)) => true,
        Err(ChannelError::Record(_)) => false,
        Err(ChannelError::Ring(RingError::Full)) => panic!("a pop cannot find the ring full"),
    }
}

/// A peer write: where, and the bytes.
fn peer_write(peer: &File, ring: usize, script: &mut &[u8]) {
    let Some((head, rest)) = script.split_at_checked(5) else {
        *script = &[];
        return;
    };
    let slot = u32::from(u16::from_le_bytes([head[0], head[1]]));
    let offset = usize::from(u16::from_le_bytes([head[2], head[3]]));
    let len = usize::from(head[4]).min(rest.len());
    let (bytes, rest) = rest.split_at(len);
    *script = rest;
    let (base, room) = if slot < RING_SLOTS {
        (RING_HEADER + slot as usize * RECORD_SIZE, RECORD_SIZE)
    } else {
        (0, RING_HEADER)
    };
    let offset = offset % room;
    let bytes = &bytes[..bytes.len().min(room - offset)];
    peer.write_all_at(bytes, (ring + base + offset) as u64).expect("write into the region");
}

fuzz_target!(|data: &[u8]| {
    let (region, fd) = Region::create(1).expect("region");
    let peer = File::from(fd);
    let mut worker = region.dataplane_side(0);
    let mut control = region.control_side(0);
    let mut script = data;
    let mut pushed = 0u64;
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        match op % 6 {
            0 => peer_write(&peer, asks_ring_offset(0), &mut script),
            1 => peer_write(&peer, answers_ring_offset(0), &mut script),
            2 => {
                pop(&mut control.rx);
            }
            3 => {
                pop(&mut worker.rx);
            }
            4 => {
                pushed += 1;
                let _ = worker.tx.push(&AskRecord::FlowClosed(FlowClosed::unused(pushed)));
            }
            _ => {
                pushed += 1;
                let _ = control.tx.push(&AnswerRecord::KillFlow { flow_id: pushed });
            }
        }
    }
    // A reader never finds more than a ring's worth before it is empty or
    // corrupt.
    let drained = |done: &mut dyn FnMut() -> bool| (0..=RING_SLOTS).any(|_| done());
    assert!(drained(&mut || pop(&mut control.rx)), "asks ring never ran dry");
    assert!(drained(&mut || pop(&mut worker.rx)), "answers ring never ran dry");
});

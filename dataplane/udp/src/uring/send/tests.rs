use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::*;
use crate::uring::testutil::{require_uring, ring, wait};

fn pair() -> (UdpSocket, UdpSocket) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (a, b)
}

/// Submits `entry` and returns its completion result.
fn send_one(ring: &mut io_uring::IoUring, entry: &squeue::Entry, user_data: u64) -> i32 {
    crate::uring::testutil::push(ring, entry);
    let got = wait(ring, 1, Duration::from_secs(2));
    assert_eq!(got.len(), 1, "one completion expected: {got:?}");
    assert_eq!(got[0].user_data, user_data);
    got[0].result
}

/// Ten 1000-byte segments and a 300-byte one in one SendMsg with
/// UDP_SEGMENT arrive as eleven datagrams at a plain socket without GRO;
/// the slot is then reused for a plain datagram on a connected socket.
#[test]
fn gso_send_through_the_ring_arrives_as_separate_datagrams() {
    let Some(_) = require_uring() else { return };
    let mut ring = ring(8);
    let (a, b) = pair();
    let mut slots = SendSlots::new(2);
    let id = slots.acquire().unwrap();
    let buf = slots.buffer(id).unwrap();
    assert!(buf.capacity() >= MAX_GSO_BYTES);
    for i in 0..10u8 {
        buf.extend(std::iter::repeat_n(i, 1000));
    }
    buf.extend(std::iter::repeat_n(99u8, 300));
    let dest = b.local_addr().unwrap();
    let entry = slots.prepare(id, a.as_raw_fd(), Some(dest), 1000, 7).unwrap();
    assert_eq!(slots.prepared(id), Some(PreparedSend { dest: Some(dest), segment_size: 1000, segments: 11 }));
    assert!(slots.buffer(id).is_none(), "an in-flight buffer must not be writable");
    assert_eq!(slots.in_flight(), 1);
    let res = send_one(&mut ring, &entry, 7);
    assert_eq!(slots.outcome(id, res), SendOutcome::Sent(10_300));
    assert!(slots.release(id));
    assert_eq!(slots.in_flight(), 0);

    let mut rbuf = [0u8; 2048];
    for i in 0..10u8 {
        let (n, from) = b.recv_from(&mut rbuf).unwrap();
        assert_eq!(from, a.local_addr().unwrap());
        assert_eq!(&rbuf[..n], &[i; 1000][..], "datagram {i}");
    }
    let (n, _) = b.recv_from(&mut rbuf).unwrap();
    assert_eq!(&rbuf[..n], &[99u8; 300][..]);

    // Same slot again (low ids first), connected socket, one datagram: no
    // address, no control message.
    a.connect(dest).unwrap();
    let id2 = slots.acquire().unwrap();
    assert_eq!(id2, id);
    let buf = slots.buffer(id2).unwrap();
    assert!(buf.is_empty() && buf.capacity() >= MAX_GSO_BYTES, "released buffers are cleared and kept");
    buf.extend_from_slice(b"hello");
    let entry = slots.prepare(id2, a.as_raw_fd(), None, 1000, 8).unwrap();
    assert_eq!(slots.prepared(id2).unwrap().segments, 1);
    assert_eq!(slots.outcome(id2, send_one(&mut ring, &entry, 8)), SendOutcome::Sent(5));
    slots.release(id2);
    let (n, _) = b.recv_from(&mut rbuf).unwrap();
    assert_eq!(&rbuf[..n], b"hello");
}

/// A datagram above the IPv4 UDP limit completes with -EMSGSIZE, which is
/// a drop, not a GSO refusal.
#[test]
fn oversize_datagram_is_a_drop() {
    let Some(_) = require_uring() else { return };
    let mut ring = ring(8);
    let (a, b) = pair();
    let mut slots = SendSlots::new(1);
    let id = slots.acquire().unwrap();
    slots.buffer(id).unwrap().resize(MAX_GSO_BYTES + 1, 0);
    let entry = slots.prepare(id, a.as_raw_fd(), Some(b.local_addr().unwrap()), 0, 1).unwrap();
    let res = send_one(&mut ring, &entry, 1);
    assert_eq!(res, -libc::EMSGSIZE);
    assert_eq!(slots.outcome(id, res), SendOutcome::Dropped(libc::EMSGSIZE));
    slots.release(id);
}

#[test]
fn prepare_validates_the_batch() {
    let mut slots = SendSlots::new(1);
    let id = slots.acquire().unwrap();
    let dest = Some("127.0.0.1:9".parse().unwrap());
    slots.buffer(id).unwrap().resize(65 * 10, 0);
    assert_eq!(slots.prepare(id, -1, dest, 10, 0).unwrap_err(), PrepareError::TooManySegments);
    slots.buffer(id).unwrap().resize(140_000, 0);
    assert_eq!(slots.prepare(id, -1, dest, 70_000, 0).unwrap_err(), PrepareError::SegmentTooLarge);
    slots.buffer(id).unwrap().resize(64 * 1100, 0);
    assert_eq!(slots.prepare(id, -1, dest, 1100, 0).unwrap_err(), PrepareError::TooLarge);
    // Refusals leave the slot acquired; a plain datagram is fine.
    slots.buffer(id).unwrap().truncate(1100);
    slots.prepare(id, -1, dest, 1100, 0).unwrap();
    assert_eq!(slots.prepare(id, -1, dest, 0, 0).unwrap_err(), PrepareError::NotAcquired);
    assert_eq!(slots.prepare(SlotId(5), -1, dest, 0, 0).unwrap_err(), PrepareError::NotAcquired);
}

#[test]
fn the_pool_is_bounded_and_keeps_count() {
    let mut slots = SendSlots::new(2);
    let x = slots.acquire().unwrap();
    let y = slots.acquire().unwrap();
    assert_eq!(slots.acquire(), None);
    assert_eq!(slots.available(), 0);
    slots.prepare(x, -1, None, 0, 0).unwrap();
    assert_eq!(slots.in_flight(), 1);
    assert!(slots.release(y), "an acquired slot can be given back unused");
    assert!(!slots.release(y));
    assert!(!slots.release(SlotId(9)));
    assert_eq!(slots.acquire(), Some(y));
    assert!(slots.data(x).is_some());
    assert!(slots.data(y).is_none());
    // Dropped with `x` in flight: leaked, not freed.
    drop(slots);
}

#[test]
fn completions_are_classified() {
    assert_eq!(send_outcome(1200, 1), SendOutcome::Sent(1200));
    assert_eq!(send_outcome(-libc::EIO, 3), SendOutcome::GsoRefused);
    assert_eq!(send_outcome(-libc::EINVAL, 2), SendOutcome::GsoRefused);
    assert!(is_gso_refusal(-libc::EINVAL, 2));
    assert!(!is_gso_refusal(-libc::EINVAL, 1));
    assert_eq!(send_outcome(-libc::EINVAL, 1), SendOutcome::Failed(libc::EINVAL));
    for e in [libc::EAGAIN, libc::ENOBUFS, libc::ECONNREFUSED, libc::EMSGSIZE, libc::ECANCELED] {
        assert_eq!(send_outcome(-e, 2), SendOutcome::Dropped(e));
    }
    assert_eq!(send_outcome(-libc::EBADF, 1), SendOutcome::Failed(libc::EBADF));
    assert_eq!(send_outcome(i32::MIN, 1), SendOutcome::Failed(i32::MAX));
}

//! What a worker's core asks its backend to perform, and what the backend
//! reports back (I/O statistics).
//!
//! QUIC packets are written by quiche straight into the tail of the GSO
//! batch being built ([`Output::quic_space`] then [`Output::quic_commit`]):
//! consecutive packets to the same client with the same size (the last may
//! be shorter) share one buffer and one send, with no copy in between.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};

use relay_channel::region::{Counter, Counters};
use relay_udp::{MAX_GSO_BYTES, MAX_SEGMENTS};

use std::os::fd::RawFd;

use super::{TargetKey, WatchKey};
use crate::quic::MAX_SEND_UDP_PAYLOAD;

/// Capacity of every pooled buffer: a full GSO batch plus room to write one
/// more packet before deciding it does not fit.
pub const BUFFER_CAPACITY: usize = MAX_GSO_BYTES + MAX_SEND_UDP_PAYLOAD;
/// Buffers kept for reuse.
const POOL_LIMIT: usize = 64;

/// QUIC packets for one client: `segments` datagrams of `segment_size`
/// bytes back to back (the last may be shorter).
#[derive(Debug)]
pub struct QuicBatch {
    /// The packets.
    pub buf: Vec<u8>,
    /// The client.
    pub to: SocketAddr,
    /// Size of every packet but the last.
    pub segment_size: usize,
    /// Number of packets.
    pub segments: usize,
    /// A shorter packet ended the batch.
    closed: bool,
    /// [`Output::quic_space`] reserved room at the tail that no packet
    /// has been committed to yet.
    reserved: bool,
}

impl QuicBatch {
    fn drop_reservation(&mut self) {
        if self.reserved {
            self.reserved = false;
            let len = self.buf.len() - MAX_SEND_UDP_PAYLOAD;
            self.buf.truncate(len);
        }
    }
}

/// A descriptor the core services itself, to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// The core's name for it.
    pub key: WatchKey,
    /// The descriptor (owned by the core, which keeps it open until the
    /// backend has forgotten it: [`Output::unwatches`]).
    pub fd: RawFd,
    /// Also report writability (TCP sockets with output waiting, or a
    /// connect in progress), not only readability.
    pub writable: bool,
}

/// A UDP socket the core hands to the backend: a connect-udp target's
/// (connected) or a bound tunnel's (unconnected: receives report the
/// sender, sends name the peer).
#[derive(Debug)]
pub struct Endpoint {
    /// The core's name for it.
    pub key: TargetKey,
    /// The socket.
    pub sock: UdpSocket,
    /// Connected to one target (no sender address on receives).
    pub connected: bool,
}

/// Payloads for one datagram endpoint, in the same layout as
/// [`QuicBatch`].
#[derive(Debug)]
pub struct UpSend {
    /// The endpoint.
    pub key: TargetKey,
    /// The payloads.
    pub buf: Vec<u8>,
    /// Size of every payload but the last.
    pub segment_size: usize,
    /// Number of payloads.
    pub segments: usize,
    /// The peer, on an unconnected endpoint.
    pub to: Option<SocketAddr>,
}

/// I/O statistics a backend accumulates during a turn; the core adds them
/// to the shared counters once per turn.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    /// Receive completions (or `recvmsg` results) on the QUIC socket.
    pub quic_receives: u64,
    /// QUIC packets received.
    pub quic_packets_in: u64,
    /// Sends on the QUIC socket.
    pub quic_sends: u64,
    /// QUIC packets sent.
    pub quic_packets_out: u64,
    /// QUIC packets the kernel refused.
    pub quic_send_drops: u64,
    /// Receive completions on target sockets.
    pub target_receives: u64,
    /// Datagrams received from targets.
    pub target_packets_in: u64,
    /// Sends on target sockets.
    pub target_sends: u64,
    /// Payloads the kernel took towards targets.
    pub datagrams_up: u64,
    /// Payload bytes the kernel took towards targets.
    pub bytes_up: u64,
    /// Payloads towards targets the kernel refused.
    pub drop_target_send: u64,
    /// System calls the backend made (epoll_wait, recvmmsg, sendmmsg, ...,
    /// or io_uring_enter).
    pub syscalls: u64,
    /// Receives that found no free buffer (io_uring -ENOBUFS).
    pub recv_no_buffers: u64,
    /// Datagrams dropped because they did not fit the receive buffer.
    pub recv_truncated: u64,
    /// Loop turns.
    pub turns: u64,
    /// Waits that were batched (io_uring `min_wait_usec`).
    pub waits_batched: u64,
    /// IP packets written to the TUN device.
    pub tun_packets_out: u64,
    /// TUN writes that carried a coalesced GSO packet.
    pub tun_gso_writes: u64,
    /// Packets those coalesced writes carried.
    pub tun_coalesced_packets: u64,
    /// Packets the TUN device refused.
    pub tun_write_drops: u64,
    /// Reads the TUN device could not hand over (the packet is gone).
    pub tun_read_errors: u64,
}

impl std::ops::AddAssign for IoStats {
    fn add_assign(&mut self, s: IoStats) {
        self.quic_receives += s.quic_receives;
        self.quic_packets_in += s.quic_packets_in;
        self.quic_sends += s.quic_sends;
        self.quic_packets_out += s.quic_packets_out;
        self.quic_send_drops += s.quic_send_drops;
        self.target_receives += s.target_receives;
        self.target_packets_in += s.target_packets_in;
        self.target_sends += s.target_sends;
        self.datagrams_up += s.datagrams_up;
        self.bytes_up += s.bytes_up;
        self.drop_target_send += s.drop_target_send;
        self.syscalls += s.syscalls;
        self.recv_no_buffers += s.recv_no_buffers;
        self.recv_truncated += s.recv_truncated;
        self.turns += s.turns;
        self.waits_batched += s.waits_batched;
        self.tun_packets_out += s.tun_packets_out;
        self.tun_gso_writes += s.tun_gso_writes;
        self.tun_coalesced_packets += s.tun_coalesced_packets;
        self.tun_write_drops += s.tun_write_drops;
        self.tun_read_errors += s.tun_read_errors;
    }
}

impl IoStats {
    /// Adds the statistics to `counters` and resets them.
    pub fn flush_into(&mut self, counters: &Counters) {
        let pairs = [
            (Counter::QuicReceives, self.quic_receives),
            (Counter::QuicPacketsIn, self.quic_packets_in),
            (Counter::QuicSends, self.quic_sends),
            (Counter::QuicPacketsOut, self.quic_packets_out),
            (Counter::QuicSendDrops, self.quic_send_drops),
            (Counter::TargetReceives, self.target_receives),
            (Counter::TargetPacketsIn, self.target_packets_in),
            (Counter::TargetSends, self.target_sends),
            (Counter::DatagramsUp, self.datagrams_up),
            (Counter::BytesUp, self.bytes_up),
            (Counter::DropTargetSend, self.drop_target_send),
            (Counter::IoSyscalls, self.syscalls),
            (Counter::RecvNoBuffers, self.recv_no_buffers),
            (Counter::RecvTruncated, self.recv_truncated),
            (Counter::LoopTurns, self.turns),
            (Counter::WaitsBatched, self.waits_batched),
            (Counter::TunPacketsOut, self.tun_packets_out),
            (Counter::TunGsoWrites, self.tun_gso_writes),
            (Counter::TunCoalescedPackets, self.tun_coalesced_packets),
            (Counter::DropTargetSend, self.tun_write_drops),
            (Counter::DropMalformed, self.tun_read_errors),
        ];
        for (counter, n) in pairs {
            if n != 0 {
                counters.add(counter, n);
            }
        }
        *self = IoStats::default();
    }
}

/// The core's output queue for one turn.
#[derive(Debug)]
pub struct Output {
    building: Option<QuicBatch>,
    /// Complete QUIC batches, in order.
    pub quic: Vec<QuicBatch>,
    /// Target batches, in order.
    pub up: Vec<UpSend>,
    /// New datagram endpoints to serve.
    pub opens: Vec<Endpoint>,
    /// Datagram endpoints to close (after their pending sends).
    pub closes: Vec<TargetKey>,
    /// Datagram endpoints to stop reading from until resumed (their
    /// tunnel's path to the client is backlogged). Receives the backend
    /// already holds are still delivered.
    pub pauses: Vec<TargetKey>,
    /// Paused endpoints to read from again.
    pub resumes: Vec<TargetKey>,
    /// Descriptors the core reads and writes itself, to watch for
    /// readiness (edge-triggered: [`super::Handler::on_ready`]).
    pub watches: Vec<Watch>,
    /// Watched descriptors to forget (before the core closes them).
    pub unwatches: Vec<(WatchKey, RawFd)>,
    /// IP packets for the TUN device (connect-ip).
    pub tun: TunOut,
    pool: Vec<Vec<u8>>,
    /// Statistics the backend accumulates.
    pub stats: IoStats,
}

impl Default for Output {
    fn default() -> Self {
        Self::new()
    }
}

impl Output {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            building: None,
            quic: Vec::new(),
            up: Vec::new(),
            opens: Vec::new(),
            closes: Vec::new(),
            pauses: Vec::new(),
            resumes: Vec::new(),
            watches: Vec::new(),
            unwatches: Vec::new(),
            tun: TunOut::default(),
            pool: Vec::new(),
            stats: IoStats::default(),
        }
    }

    /// A cleared buffer with [`BUFFER_CAPACITY`].
    pub fn buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_else(|| Vec::with_capacity(BUFFER_CAPACITY))
    }

    /// Returns a buffer to the pool.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < POOL_LIMIT && buf.capacity() >= BUFFER_CAPACITY {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// Room for the next QUIC packet, at the tail of the batch being built.
    /// Write at most `MAX_SEND_UDP_PAYLOAD` bytes, then call
    /// [`Output::quic_commit`].
    pub fn quic_space(&mut self) -> &mut [u8] {
        if let Some(b) = self.building.as_mut() {
            b.drop_reservation();
        }
        let full = self.building.as_ref().is_some_and(|b| {
            b.closed || b.segments >= MAX_SEGMENTS || b.buf.len() + MAX_SEND_UDP_PAYLOAD > MAX_GSO_BYTES
        });
        if full {
            self.finish_quic();
        }
        if self.building.is_none() {
            let buf = self.buffer();
            self.building = Some(QuicBatch {
                buf,
                to: SocketAddr::from(([0, 0, 0, 0], 0)),
                segment_size: 0,
                segments: 0,
                closed: false,
                reserved: false,
            });
        }
        let b = self.building.as_mut().expect("just ensured");
        let used = b.buf.len();
        b.buf.resize(used + MAX_SEND_UDP_PAYLOAD, 0);
        b.reserved = true;
        &mut b.buf[used..]
    }

    /// The packet written into [`Output::quic_space`] is `len` bytes for
    /// `to`. `gso` says whether the kernel segments batches.
    pub fn quic_commit(&mut self, len: usize, to: SocketAddr, gso: bool) {
        let Some(b) = self.building.as_mut().filter(|b| b.reserved) else { return };
        b.reserved = false;
        let start = b.buf.len() - MAX_SEND_UDP_PAYLOAD;
        let len = len.min(MAX_SEND_UDP_PAYLOAD);
        if b.segments == 0 {
            b.buf.truncate(start + len);
            b.to = to;
            b.segment_size = len;
            b.segments = 1;
            b.closed = !gso;
            return;
        }
        let joins = b.to == to && len <= b.segment_size && gso;
        if joins {
            b.buf.truncate(start + len);
            b.segments += 1;
            b.closed = len < b.segment_size;
            return;
        }
        // It cannot join this batch: move it into a batch of its own.
        let mut buf = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(BUFFER_CAPACITY));
        buf.extend_from_slice(&b.buf[start..start + len]);
        b.buf.truncate(start);
        self.finish_quic();
        self.building =
            Some(QuicBatch { buf, to, segment_size: len, segments: 1, closed: !gso, reserved: false });
    }

    /// Ends the batch being built (called when a connection has nothing
    /// more to send, so batches never wait for another turn).
    pub fn finish_quic(&mut self) {
        if let Some(mut b) = self.building.take() {
            b.drop_reservation();
            if b.segments == 0 {
                b.buf.clear();
                self.recycle(b.buf);
            } else {
                self.quic.push(b);
            }
        }
    }

    /// Whether there is nothing to perform.
    pub fn is_empty(&self) -> bool {
        self.building.is_none()
            && self.quic.is_empty()
            && self.up.is_empty()
            && self.opens.is_empty()
            && self.closes.is_empty()
            && self.tun.is_empty()
    }
}

/// IP packets for the TUN device, written by the backend at the end of the
/// turn they were queued in (nothing waits for a later turn: RFC 9298
/// section 6); runs of one TCP flow go out as one GSO write when the device
/// has offloads. Bounded by what one turn can receive.
#[derive(Debug, Default)]
pub struct TunOut {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl TunOut {
    /// Packets one turn queues at most.
    pub const MAX_PACKETS: usize = 4096;
    /// Bytes one turn queues at most.
    pub const MAX_BYTES: usize = 8 << 20;

    /// Queues a packet; `false` (dropped) past the bounds.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if self.ends.len() >= Self::MAX_PACKETS || self.bytes.len() + packet.len() > Self::MAX_BYTES {
            return false;
        }
        self.bytes.extend_from_slice(packet);
        self.ends.push(self.bytes.len());
        true
    }

    /// The packets, in order.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(a, b)| &self.bytes[a..b])
    }

    /// Number of packets queued.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Forgets the packets (keeps the allocation).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(out: &mut Output, len: usize, byte: u8, to: SocketAddr, gso: bool) {
        let space = out.quic_space();
        assert!(space.len() >= MAX_SEND_UDP_PAYLOAD);
        space[..len].fill(byte);
        out.quic_commit(len, to, gso);
    }

    #[test]
    fn packets_to_one_client_share_a_batch_until_a_short_one() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut out = Output::new();
        for i in 0..3 {
            write(&mut out, 1200, i, a, true);
        }
        write(&mut out, 500, 9, a, true); // short: closes the batch
        write(&mut out, 1200, 7, a, true);
        write(&mut out, 1200, 8, b, true); // other client
        write(&mut out, 1300, 6, b, true); // larger than the segment
        out.finish_quic();
        let shapes: Vec<_> =
            out.quic.iter().map(|q| (q.to, q.segment_size, q.segments, q.buf.len())).collect();
        assert_eq!(
            shapes,
            vec![(a, 1200, 4, 4100), (a, 1200, 1, 1200), (b, 1200, 1, 1200), (b, 1300, 1, 1300)]
        );
        assert_eq!(&out.quic[0].buf[3600..], &[9u8; 500][..]);
        assert_eq!(out.quic[3].buf, vec![6u8; 1300]);
    }

    #[test]
    fn batches_respect_segment_and_size_limits() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut out = Output::new();
        for _ in 0..200 {
            write(&mut out, 1350, 1, a, true);
        }
        out.finish_quic();
        assert_eq!(out.quic.iter().map(|q| q.segments).sum::<usize>(), 200);
        for q in &out.quic {
            assert!(q.segments <= MAX_SEGMENTS && q.buf.len() <= MAX_GSO_BYTES);
            assert_eq!(q.buf.len(), q.segments * 1350);
        }
        let mut out = Output::new();
        for _ in 0..200 {
            write(&mut out, 40, 1, a, true);
        }
        out.finish_quic();
        assert!(out.quic.iter().all(|q| q.segments <= MAX_SEGMENTS));
        assert_eq!(out.quic.len(), 4);
    }

    #[test]
    fn without_gso_every_packet_is_its_own_send() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut out = Output::new();
        for _ in 0..3 {
            write(&mut out, 1000, 1, a, false);
        }
        out.finish_quic();
        assert_eq!(out.quic.len(), 3);
        assert!(out.quic.iter().all(|q| q.segments == 1 && q.buf.len() == 1000));
    }

    #[test]
    fn tun_packets_queue_in_order_within_bounds() {
        let mut t = TunOut::default();
        assert!(t.push(b"ab") && t.push(b"") && t.push(b"cde"));
        assert_eq!(t.packets().collect::<Vec<_>>(), vec![&b"ab"[..], &b""[..], &b"cde"[..]]);
        assert!(!t.push(&vec![0; TunOut::MAX_BYTES]));
        t.clear();
        for _ in 0..TunOut::MAX_PACKETS {
            assert!(t.push(b"x"));
        }
        assert!(!t.push(b"x"));
        assert_eq!(t.len(), TunOut::MAX_PACKETS);
    }

    #[test]
    fn unused_space_is_not_sent() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut out = Output::new();
        write(&mut out, 100, 1, a, true);
        let _ = out.quic_space(); // quiche had nothing more
        let _ = out.quic_space();
        write(&mut out, 100, 2, a, true);
        let _ = out.quic_space();
        out.finish_quic();
        assert_eq!(out.quic.len(), 1);
        assert_eq!(out.quic[0].buf.len(), 200);
        assert_eq!(out.quic[0].segments, 2);
        out.quic.clear();
        let _ = out.quic_space();
        out.finish_quic();
        assert!(out.quic.is_empty());
        assert!(out.is_empty());
    }
}

//! The shared-memory region: layout, creation (control), attachment
//! (dataplane) and per-worker counters.
//!
//! ```text
//! offset 0      region header (4 KiB): magic, version, workers, slots, record size
//! then, per worker w:
//!               counters (4 KiB, of which COUNTER_SLOTS x u64 are used, written by worker w only)
//!               asks ring    (worker w -> control)
//!               answers ring (control -> worker w)
//! ring:         head u32 @0, tail u32 @64, slots from 128
//! ```
//!
//! Control creates the region in a memfd sealed against shrinking, growing
//! and further seals, checks the seals and the size, and only then maps it;
//! the dataplane refuses a region without those seals. So neither side can
//! make the other's mapping run past the end of the file (SIGBUS).
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use relay_proto::channel::RECORD_SIZE;
use relay_proto::channel::record::{AnswerRecord, AskRecord};

use crate::ends::{Receiver, Sender};
use crate::mapping::Mapping;
use crate::memfd;
use crate::ring::{Consumer, Producer, RING_SLOTS, Ring};

/// Identifies a relay channel region.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MASQSHM1");
/// Layout version; bumped on any incompatible change.
pub const REGION_VERSION: u32 = 1;
/// Counter slots per worker.
pub const COUNTER_SLOTS: usize = 128;
/// Most workers a region can describe.
pub const MAX_WORKERS: u32 = 256;

/// Bytes of the region header.
pub const HEADER_BYTES: usize = 4096;
/// Bytes of a worker's counter block.
pub const COUNTERS_BYTES: usize = 4096;
/// Bytes of a ring's index header (head and tail on separate cache lines).
pub const RING_HEADER: usize = 128;
/// Bytes of one ring: its index header and its slots.
pub const RING_BYTES: usize = RING_HEADER + RING_SLOTS as usize * RECORD_SIZE;
const WORKER_BYTES: usize = COUNTERS_BYTES + 2 * RING_BYTES;

/// Total bytes of a region for `workers` workers.
pub const fn region_len(workers: u32) -> usize {
    HEADER_BYTES + workers as usize * WORKER_BYTES
}

/// Offset of `worker`'s asks ring (worker -> control) in the region.
pub const fn asks_ring_offset(worker: u32) -> usize {
    HEADER_BYTES + worker as usize * WORKER_BYTES + COUNTERS_BYTES
}

/// Offset of `worker`'s answers ring (control -> worker) in the region.
pub const fn answers_ring_offset(worker: u32) -> usize {
    asks_ring_offset(worker) + RING_BYTES
}

/// Why a region could not be created or attached.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The region's header does not describe a region this build can use.
    #[error("incompatible region: {0}")]
    Incompatible(&'static str),
    /// The worker count is out of range.
    #[error("worker count {0} out of range 1..={MAX_WORKERS}")]
    Workers(u32),
    /// The region's memfd is not sealed against resizing and further
    /// seals: whoever else holds it could truncate it under our mapping.
    #[error("region memfd lacks its seals (has {0:#x}, needs shrink, grow and seal); refused")]
    Unsealed(i32),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> RegionError {
    move |source| RegionError::Io { op, source }
}

/// Checks that `file` is a memfd carrying [`memfd::REQUIRED_SEALS`].
fn check_sealed(file: &File) -> Result<(), RegionError> {
    let seals = memfd::seals(file).map_err(io_err("F_GET_SEALS (is the region a memfd?)"))?;
    if seals & memfd::REQUIRED_SEALS != memfd::REQUIRED_SEALS {
        return Err(RegionError::Unsealed(seals));
    }
    Ok(())
}

/// A mapped channel region.
#[derive(Debug, Clone)]
pub struct Region {
    map: Arc<Mapping>,
    workers: u32,
}

/// One worker's view: its counters, the ring this side writes and the ring
/// it reads, typed by direction.
#[derive(Debug)]
pub struct WorkerChannel<T, R> {
    /// The worker's counters.
    pub counters: Counters,
    /// The ring this side writes.
    pub tx: T,
    /// The ring this side reads.
    pub rx: R,
}

/// A worker's end: pushes asks, pops answers.
pub type DataplaneChannel = WorkerChannel<Sender<AskRecord>, Receiver<AnswerRecord>>;
/// Control's end of one worker's channel: pushes answers, pops asks.
pub type ControlChannel = WorkerChannel<Sender<AnswerRecord>, Receiver<AskRecord>>;

impl Region {
    /// Creates a region in a new sealed memfd (control side). Returns the
    /// region and the memfd to pass to the dataplane.
    pub fn create(workers: u32) -> Result<(Self, OwnedFd), RegionError> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(RegionError::Workers(workers));
        }
        let len = region_len(workers);
        let file =
            memfd::create_sealed(c"masque-relay-channel", len as u64).map_err(io_err("sealed memfd"))?;
        // Trust the mapping only once the file provably cannot change size.
        check_sealed(&file)?;
        if file.metadata().map_err(io_err("fstat"))?.len() != len as u64 {
            return Err(RegionError::Incompatible("region size differs from its layout"));
        }
        let map = Mapping::map(&file, len).map_err(io_err("mmap"))?;
        // Fresh memfd pages are zero: indices and counters start at 0.
        map.atomic_u32(8).store(REGION_VERSION, Ordering::Relaxed);
        map.atomic_u32(12).store(workers, Ordering::Relaxed);
        map.atomic_u32(16).store(RING_SLOTS, Ordering::Relaxed);
        map.atomic_u32(20).store(RECORD_SIZE as u32, Ordering::Relaxed);
        map.atomic_u64(0).store(MAGIC, Ordering::Release);
        Ok((Self { map: Arc::new(map), workers }, OwnedFd::from(file)))
    }

    /// Maps a region received from control: refuses one without its seals,
    /// then checks its header and size.
    pub fn attach(fd: OwnedFd) -> Result<Self, RegionError> {
        let file = File::from(fd);
        check_sealed(&file)?;
        let size = file.metadata().map_err(io_err("fstat"))?.len();
        if size < HEADER_BYTES as u64 {
            return Err(RegionError::Incompatible("region smaller than its header"));
        }
        let header = Mapping::map(&file, HEADER_BYTES).map_err(io_err("mmap"))?;
        if header.atomic_u64(0).load(Ordering::Acquire) != MAGIC {
            return Err(RegionError::Incompatible("bad magic"));
        }
        if header.atomic_u32(8).load(Ordering::Relaxed) != REGION_VERSION {
            return Err(RegionError::Incompatible("layout version mismatch"));
        }
        if header.atomic_u32(16).load(Ordering::Relaxed) != RING_SLOTS
            || header.atomic_u32(20).load(Ordering::Relaxed) != RECORD_SIZE as u32
        {
            return Err(RegionError::Incompatible("ring geometry mismatch"));
        }
        let workers = header.atomic_u32(12).load(Ordering::Relaxed);
        if workers == 0 || workers > MAX_WORKERS {
            return Err(RegionError::Workers(workers));
        }
        let len = region_len(workers);
        if size != len as u64 {
            return Err(RegionError::Incompatible("region size does not match its worker count"));
        }
        drop(header);
        Ok(Self { map: Arc::new(Mapping::map(&file, len).map_err(io_err("mmap"))?), workers })
    }

    /// Number of workers the region serves.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    fn check_worker(&self, worker: u32) {
        assert!(worker < self.workers, "worker index in range");
    }

    /// `worker`'s asks ring (worker -> control).
    pub(crate) fn asks_ring(&self, worker: u32) -> Ring {
        self.check_worker(worker);
        Ring::new(self.map.clone(), asks_ring_offset(worker))
    }

    /// `worker`'s answers ring (control -> worker).
    pub(crate) fn answers_ring(&self, worker: u32) -> Ring {
        self.check_worker(worker);
        Ring::new(self.map.clone(), answers_ring_offset(worker))
    }

    /// The counters of `worker`.
    pub fn counters(&self, worker: u32) -> Counters {
        self.check_worker(worker);
        Counters { map: self.map.clone(), base: HEADER_BYTES + worker as usize * WORKER_BYTES }
    }

    /// The dataplane side of `worker`'s channel: push asks, pop answers.
    /// Only one thread may hold it at a time.
    pub fn dataplane_side(&self, worker: u32) -> DataplaneChannel {
        WorkerChannel {
            counters: self.counters(worker),
            tx: Sender::new(Producer::attach(self.asks_ring(worker))),
            rx: Receiver::new(Consumer::attach(self.answers_ring(worker))),
        }
    }

    /// The control side of `worker`'s channel: pop asks, push answers.
    /// Only one thread may hold it at a time.
    pub fn control_side(&self, worker: u32) -> ControlChannel {
        WorkerChannel {
            counters: self.counters(worker),
            tx: Sender::new(Producer::attach(self.answers_ring(worker))),
            rx: Receiver::new(Consumer::attach(self.asks_ring(worker))),
        }
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $idx:literal, $metric:literal; )*) => {
        /// Per-worker counters kept in the shared region.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Counter {
            $( $(#[$doc])* $name = $idx, )*
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name),*];

            /// The metric name (snake case) used by control and relayctl.
            pub fn name(self) -> &'static str {
                match self { $(Counter::$name => $metric,)* }
            }
        }
    };
}

counters! {
    /// QUIC connections accepted.
    ConnectionsAccepted = 0, "connections_accepted";
    /// QUIC connections closed.
    ConnectionsClosed = 1, "connections_closed";
    /// QUIC handshakes completed.
    HandshakesCompleted = 2, "handshakes_completed";
    /// Request header sections received.
    RequestsReceived = 3, "requests_received";
    /// Requests reset as malformed (H3_MESSAGE_ERROR).
    RequestsMalformed = 4, "requests_malformed";
    /// Tunnels opened (2xx sent).
    TunnelsOpened = 5, "tunnels_opened";
    /// Requests answered with a 4xx/5xx status.
    TunnelsRefused = 6, "tunnels_refused";
    /// Tunnels closed.
    TunnelsClosed = 7, "tunnels_closed";
    /// UDP payloads forwarded client -> target.
    DatagramsUp = 8, "datagrams_up";
    /// UDP payload bytes forwarded client -> target.
    BytesUp = 9, "bytes_up";
    /// UDP payloads forwarded target -> client.
    DatagramsDown = 10, "datagrams_down";
    /// UDP payload bytes forwarded target -> client.
    BytesDown = 11, "bytes_down";
    /// Datagrams dropped: unknown context ID.
    DropUnknownContext = 12, "drop_unknown_context";
    /// Datagrams dropped: no open tunnel on that stream.
    DropNoTunnel = 13, "drop_no_tunnel";
    /// Datagrams dropped: too large for the client's QUIC path.
    DropTooLarge = 14, "drop_too_large";
    /// Datagrams dropped: a bounded queue was full.
    DropQueueFull = 15, "drop_queue_full";
    /// Datagrams dropped: the target socket refused the send.
    DropTargetSend = 16, "drop_target_send";
    /// Datagrams dropped: malformed HTTP datagram.
    DropMalformed = 17, "drop_malformed";
    /// Authorization asks sent to control.
    AsksSent = 18, "asks_sent";
    /// Authorization asks that timed out or could not be sent.
    AsksFailed = 19, "asks_failed";
    /// Invalid records read from the channel.
    ChannelErrors = 20, "channel_errors";
    /// UDP packets received on the QUIC socket.
    QuicPacketsIn = 21, "quic_packets_in";
    /// UDP packets sent on the QUIC socket.
    QuicPacketsOut = 22, "quic_packets_out";
    /// Tunnels currently open (gauge).
    TunnelsActive = 23, "tunnels_active";
    /// QUIC connections currently open (gauge).
    ConnectionsActive = 24, "connections_active";
    /// Receive system calls on the QUIC socket (GRO: packets / receives).
    QuicReceives = 25, "quic_receives";
    /// Send system calls on the QUIC socket (GSO: packets / sends).
    QuicSends = 26, "quic_sends";
    /// QUIC packets the kernel refused to send (full socket buffer).
    QuicSendDrops = 27, "quic_send_drops";
    /// Send system calls on target sockets (GSO: datagrams_up / target_sends).
    TargetSends = 28, "target_sends";
    /// Receive operations on target sockets (GRO: target_packets_in / target_receives).
    TargetReceives = 29, "target_receives";
    /// Datagrams received from targets.
    TargetPacketsIn = 30, "target_packets_in";
    /// System calls made by the worker's I/O loop (epoll_wait, recvmmsg,
    /// sendmmsg, ... or io_uring_enter).
    IoSyscalls = 31, "io_syscalls";
    /// Receives that found no free buffer (io_uring buffer ring empty).
    RecvNoBuffers = 32, "recv_no_buffers";
    /// Datagrams dropped because they did not fit the receive buffer.
    RecvTruncated = 33, "recv_truncated";
    /// Turns of the worker's loop.
    LoopTurns = 34, "loop_turns";
    /// QUIC packets handed to the worker that owns their connection.
    HandoffsOut = 35, "handoffs_out";
    /// QUIC packets received from other workers.
    HandoffsIn = 36, "handoffs_in";
    /// Hand-offs dropped because the owner's queue was full.
    DropHandoffFull = 37, "drop_handoff_full";
    /// QUIC packets for no known connection (not an Initial), dropped.
    DropNoConnection = 38, "drop_no_connection";
    /// The worker's I/O backend (gauge: 1 = io_uring, 2 = epoll).
    IoBackend = 39, "io_backend";
    /// Handshake signatures asked of control (keyless TLS).
    SignsSent = 40, "signs_sent";
    /// Handshake signatures that failed (refused, timed out, control gone).
    SignsFailed = 41, "signs_failed";
    /// Tunnels ended because they used up their byte budget (quota).
    TunnelsOverBudget = 42, "tunnels_over_budget";
    /// Retry packets sent (address validation under handshake load).
    RetriesSent = 43, "retries_sent";
    /// Initials dropped for a forged or foreign Retry token.
    RetryTokensInvalid = 44, "retry_tokens_invalid";
    /// The TLS material generation the worker serves new connections with
    /// (gauge; grows with each certificate reload).
    TlsGeneration = 45, "tls_generation";
    /// Handshakes that resumed a session from a ticket (no signature
    /// needed).
    HandshakesResumed = 46, "handshakes_resumed";
    /// connect-ip packets dropped: destination or protocol outside the
    /// tunnel's routes (either direction).
    DropIpOutOfScope = 47, "drop_ip_out_of_scope";
    /// connect-ip packets dropped: source not assigned to the client.
    DropIpBadSource = 48, "drop_ip_bad_source";
    /// ICMP errors sent (to clients, or back through the TUN device).
    IcmpErrorsSent = 49, "icmp_errors_sent";
    /// IP packets read from the worker's TUN device.
    TunPacketsIn = 50, "tun_packets_in";
    /// IP packets written to the worker's TUN device.
    TunPacketsOut = 51, "tun_packets_out";
    /// connect-udp tunnels closed because the OS reported the target
    /// unreachable (ICMP Destination Unreachable; RFC 9298 section 3.1).
    TunnelsTargetUnreachable = 52, "tunnels_target_unreachable";
    /// Bound-tunnel datagrams from peers dropped: filtered (the client never
    /// sent to them) or no context to deliver them on.
    BindFiltered = 53, "bind_filtered";
    /// Bound-tunnel datagrams dropped: the peer is outside the target
    /// policy (either direction).
    BindPeerDenied = 54, "bind_peer_denied";
    /// TCP connections accepted by the TCP front (TLS or cleartext).
    TcpConnectionsAccepted = 55, "tcp_connections_accepted";
    /// TCP front connections open (gauge).
    TcpConnectionsActive = 56, "tcp_connections_active";
    /// TCP connections closed at accept: the worker's limit was reached.
    TcpConnectionsRejected = 57, "tcp_connections_rejected";
    /// TCP front connections closed because they did not finish their TLS
    /// handshake and first request in time, or idled out.
    TcpTimeouts = 58, "tcp_timeouts";
    /// TLS handshakes over TCP that failed.
    TcpTlsFailures = 59, "tcp_tls_failures";
    /// HTTP/1.1 requests received by the TCP front.
    Http1Requests = 60, "http1_requests";
    /// HTTP/2 requests (streams) received by the TCP front.
    Http2Requests = 61, "http2_requests";
    /// TCP CONNECT payload bytes client -> target (every HTTP version).
    TcpBytesUp = 62, "tcp_bytes_up";
    /// TCP CONNECT payload bytes target -> client (every HTTP version).
    TcpBytesDown = 63, "tcp_bytes_down";
    /// TCP CONNECT tunnels whose target connection failed (refused, timed
    /// out, unreachable).
    TcpConnectFailures = 64, "tcp_connect_failures";
    /// TUN reads that carried a GSO packet (split into several packets;
    /// each counts in `tun_packets_in`).
    TunGsoReads = 65, "tun_gso_reads";
    /// TUN writes that carried several coalesced TCP segments as one GSO
    /// packet.
    TunGsoWrites = 66, "tun_gso_writes";
    /// Packets written to the TUN device inside coalesced writes.
    TunCoalescedPackets = 67, "tun_coalesced_packets";
    /// connect-ip IPv6 link MTU probes sent (1280-byte ICMPv6 Echo
    /// Requests; RFC 9484 section 7.2).
    IpMtuProbesSent = 68, "ip_mtu_probes_sent";
    /// connect-ip tunnels whose link answered a probe in full.
    IpMtuProbesConfirmed = 69, "ip_mtu_probes_confirmed";
    /// connect-ip tunnels torn down: no reply to the probes in time, or
    /// QUIC datagrams too small for 1280-byte packets.
    IpMtuProbeFailures = 70, "ip_mtu_probe_failures";
    /// ICMPv6 Echo Replies sent to clients probing the relay's end of
    /// their tunnel link.
    IpEchoReplies = 71, "ip_echo_replies";
    /// Stateless Resets sent for short-header packets of unknown
    /// connections (RFC 9000 section 10.3).
    StatelessResetsSent = 72, "stateless_resets_sent";
    /// Connection IDs issued to clients with NEW_CONNECTION_ID (spares, and
    /// replacements when the QUIC-LB configuration rotates).
    ConnectionIdsIssued = 73, "connection_ids_issued";
    /// The last qlog command (`relayctl qlog`) this worker applied
    /// (control's session number; gauge).
    QlogSession = 74, "qlog_session";
    /// Open connections that command matched here when applied, and new
    /// ones since (gauge).
    QlogMatched = 75, "qlog_matched";
    /// Open connections writing qlog (gauge).
    QlogConnections = 76, "qlog_connections";
    /// qlog files created.
    QlogFiles = 77, "qlog_files";
    /// Connections that matched but got no qlog file (every file of
    /// `qlog.max_files` still being written, or the file not created).
    QlogRefused = 78, "qlog_refused";
    /// WebSocket sessions relayed to an upstream origin (both handshakes
    /// done).
    WebsocketsOpened = 79, "websockets_opened";
    /// WebSocket requests whose upstream handshake failed (the origin
    /// refused, answered badly, closed, or did not answer in time).
    WebsocketUpstreamFailures = 80, "websocket_upstream_failures";
    /// WebTransport sessions relayed to an upstream origin (the origin
    /// accepted the session).
    WebtransportSessionsOpened = 81, "webtransport_sessions_opened";
    /// WebTransport requests whose upstream session failed (QUIC or TLS to
    /// the origin failed, the origin refused or did not answer in time).
    WebtransportUpstreamFailures = 82, "webtransport_upstream_failures";
    /// WebTransport streams relayed (either side opened them).
    WebtransportStreams = 83, "webtransport_streams";
    /// WebTransport datagrams relayed (both ways).
    WebtransportDatagrams = 84, "webtransport_datagrams";
    /// Waits of the worker's loop that were batched (`dataplane.wait_batch_us`).
    WaitsBatched = 85, "waits_batched";
    /// Times a connect-udp or bound tunnel stopped reading its sockets
    /// because its connection's DATAGRAM queue towards the client filled
    /// (the kernel drops what the targets send meanwhile, at no cost to
    /// the worker).
    TargetReadsPaused = 86, "target_reads_paused";
}

/// A worker's counters. Each counter has a single writer (its worker), so
/// increments are a relaxed load and store, not a locked read-modify-write.
#[derive(Debug, Clone)]
pub struct Counters {
    map: Arc<Mapping>,
    base: usize,
}

impl Counters {
    fn slot(&self, c: Counter) -> &AtomicU64 {
        self.map.atomic_u64(self.base + 8 * c as usize)
    }

    /// Adds `n` to `c` (writer side only).
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        let slot = self.slot(c);
        slot.store(slot.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge (writer side only).
    #[inline]
    pub fn sub(&self, c: Counter, n: u64) {
        let slot = self.slot(c);
        slot.store(slot.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
    }

    /// Sets a gauge (writer side only).
    #[inline]
    pub fn set(&self, c: Counter, n: u64) {
        self.slot(c).store(n, Ordering::Relaxed);
    }

    /// Reads `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.slot(c).load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_attach_and_share_counters() {
        let (region, fd) = Region::create(2).unwrap();
        let other = Region::attach(fd).unwrap();
        assert_eq!(other.workers(), 2);
        region.counters(1).add(Counter::BytesUp, 42);
        assert_eq!(other.counters(1).get(Counter::BytesUp), 42);
        assert_eq!(other.counters(0).get(Counter::BytesUp), 0);
    }

    #[test]
    fn attach_refuses_foreign_memory() {
        let (region, fd) = Region::create(1).unwrap();
        region.map.atomic_u64(0).store(1, Ordering::Relaxed);
        assert!(matches!(Region::attach(fd), Err(RegionError::Incompatible("bad magic"))));
        assert!(matches!(Region::create(0), Err(RegionError::Workers(0))));
    }

    /// The descriptor control passes is sealed: the dataplane (or anyone
    /// it leaks to) cannot shrink or grow the region under control's
    /// mapping, nor add seals; control's mapping keeps working up to its
    /// last byte.
    #[test]
    fn a_passed_region_cannot_be_resized_and_controls_mapping_keeps_working() {
        use relay_proto::channel::record::AnswerRecord;

        let (region, fd) = Region::create(2).unwrap();
        let dataplane = Region::attach(fd.try_clone().unwrap()).unwrap();
        let passed = File::from(fd);
        let len = region_len(2) as u64;
        for size in [0, HEADER_BYTES as u64, len - 4096, len + 4096] {
            let e = passed.set_len(size).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "resizing to {size}");
        }
        for seal in [libc::F_SEAL_WRITE, libc::F_SEAL_FUTURE_WRITE] {
            let e = memfd::add_seals(&passed, seal).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "adding seal {seal:#x}");
        }
        assert_eq!(passed.metadata().unwrap().len(), len);
        // The last worker's answers ring ends at the region's end: fill it,
        // so every slot up to the last byte is written by control and read
        // back by the dataplane.
        let mut control = region.control_side(1);
        let mut worker = dataplane.dataplane_side(1);
        for round in 0..2u64 {
            for i in 0..u64::from(RING_SLOTS) {
                control.tx.push(&AnswerRecord::KillFlow { flow_id: round << 32 | i }).unwrap();
            }
            for i in 0..u64::from(RING_SLOTS) {
                assert_eq!(
                    worker.rx.pop().unwrap(),
                    Some(AnswerRecord::KillFlow { flow_id: round << 32 | i })
                );
            }
        }
        let last = *Counter::ALL.last().unwrap();
        region.counters(1).set(last, 9);
        assert_eq!(dataplane.counters(1).get(last), 9);
    }

    /// Copies `region`'s bytes into a fresh memfd carrying `seals` only.
    fn copy_with_seals(region_fd: &OwnedFd, workers: u32, seals: libc::c_int) -> OwnedFd {
        use std::os::unix::fs::FileExt;
        let len = region_len(workers);
        let source = File::from(region_fd.try_clone().unwrap());
        let copy = memfd::create(c"unsealed", libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING).unwrap();
        copy.set_len(len as u64).unwrap();
        let mut header = vec![0u8; HEADER_BYTES];
        source.read_exact_at(&mut header, 0).unwrap();
        copy.write_all_at(&header, 0).unwrap();
        if seals != 0 {
            memfd::add_seals(&copy, seals).unwrap();
        }
        OwnedFd::from(copy)
    }

    #[test]
    fn attach_refuses_a_region_without_its_seals() {
        let (_region, fd) = Region::create(1).unwrap();
        // The same bytes, sealed as control seals them: accepted.
        Region::attach(copy_with_seals(&fd, 1, memfd::REQUIRED_SEALS)).unwrap();
        for seals in [0, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW, libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL] {
            match Region::attach(copy_with_seals(&fd, 1, seals)) {
                Err(RegionError::Unsealed(found)) => assert_eq!(found, seals),
                other => panic!("seals {seals:#x}: {other:?}"),
            }
        }
        // A memfd created without sealing allowed carries F_SEAL_SEAL only.
        let plain = memfd::create(c"plain", libc::MFD_CLOEXEC).unwrap();
        plain.set_len(region_len(1) as u64).unwrap();
        let e = Region::attach(OwnedFd::from(plain)).unwrap_err();
        assert!(matches!(e, RegionError::Unsealed(libc::F_SEAL_SEAL)), "{e}");
        // Something that is not a memfd at all.
        let not_memfd = File::open("/dev/null").unwrap();
        let e = Region::attach(OwnedFd::from(not_memfd)).unwrap_err();
        assert!(matches!(e, RegionError::Io { .. }), "{e}");
        assert!(e.to_string().contains("memfd"), "{e}");
    }

    #[test]
    fn counter_slots_fit() {
        assert!(Counter::ALL.len() <= COUNTER_SLOTS);
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}

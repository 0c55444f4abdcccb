//! The epoll (mio) backend, for hosts where io_uring is not available or
//! not allowed (seccomp profiles of many container runtimes return EPERM or
//! ENOSYS for `io_uring_setup`).
//!
//! Receives are GRO `recvmmsg` calls ([`RECV_MESSAGES`] buffers of up to 64
//! datagrams each); QUIC batches leave in GSO `sendmmsg` calls, target
//! batches in one GSO `sendmsg` per target and turn.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use relay_udp::mmsg::{self, Batch, Message, RECV_MESSAGES, RecvBatch};
use tracing::warn;

use super::{Handler, IoStats, Output, RECV_BUDGET, Ready, TargetKey, Turn, Wake, WatchKey};
use crate::tun::TunDevice;

const QUIC_SOCKET: Token = Token(0);
const ANSWER_BELL: Token = Token(1);
const WORKER_BELL: Token = Token(2);
const TUN: Token = Token(3);
const FIRST_TARGET: usize = 16;

fn target_token(key: TargetKey) -> Token {
    Token(key as usize + FIRST_TARGET)
}

/// Watched descriptors' tokens live above the targets'.
const WATCH_BIT: usize = 1 << 62;

fn watch_token(key: WatchKey) -> Token {
    Token(WATCH_BIT | key as usize)
}

/// A worker's epoll loop.
pub struct EpollBackend {
    poll: Poll,
    events: Events,
    socket: mio::net::UdpSocket,
    /// Datagram endpoints, and whether each is connected.
    targets: HashMap<TargetKey, (mio::net::UdpSocket, bool)>,
    rx: RecvBatch,
    answer_bell: Option<(RawFd, u64)>,
    quic_backlog: bool,
    target_backlog: Vec<TargetKey>,
    /// Targets the core paused: not read until resumed (readiness is
    /// edge-triggered, so a resumed target is read once unasked).
    paused: HashSet<TargetKey>,
    /// Target sends the OS refused as unreachable, for the core.
    unreachable: Vec<(TargetKey, i32)>,
    /// The worker's TUN device (connect-ip) and its read buffer.
    tun: Option<(TunDevice, Vec<u8>)>,
    /// The TUN device may have packets left (its read budget ran out).
    tun_backlog: bool,
}

impl EpollBackend {
    /// Wraps the worker's bound QUIC socket.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        poll.registry().register(&mut socket, QUIC_SOCKET, Interest::READABLE)?;
        Ok(Self {
            poll,
            events: Events::with_capacity(1024),
            socket,
            targets: HashMap::new(),
            rx: RecvBatch::new(),
            answer_bell: None,
            quic_backlog: false,
            target_backlog: Vec::new(),
            paused: HashSet::new(),
            unreachable: Vec::new(),
            tun: None,
            tun_backlog: false,
        })
    }

    /// Serves the worker's TUN device too (connect-ip).
    pub fn with_tun(mut self, dev: Option<TunDevice>) -> Self {
        self.tun = dev.map(|d| (d, vec![0; relay_proto::ip::offload::VNET_HDR_LEN + 65_536]));
        self.tun_backlog = self.tun.is_some();
        self
    }

    /// Runs the loop until the handler says stop.
    pub fn run<H: Handler>(&mut self, h: &mut H) -> io::Result<()> {
        self.poll.registry().register(&mut SourceFd(&h.worker_bell()), WORKER_BELL, Interest::READABLE)?;
        if let Some((dev, _)) = self.tun.as_ref() {
            use std::os::fd::AsRawFd;
            self.poll.registry().register(&mut SourceFd(&dev.as_raw_fd()), TUN, Interest::READABLE)?;
        }
        self.watch_answer_bell(h);
        let mut deadline = Instant::now();
        let mut turn_start = deadline;
        loop {
            let backlog = self.quic_backlog || !self.target_backlog.is_empty() || self.tun_backlog;
            let timeout =
                if backlog { Duration::ZERO } else { deadline.saturating_duration_since(turn_start) };
            let mut stats = IoStats { syscalls: 1, ..IoStats::default() };
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
                Err(e) => return Err(e),
            }
            turn_start = Instant::now();
            h.begin_turn(turn_start);
            for (key, errno) in std::mem::take(&mut self.unreachable) {
                h.on_target_unreachable(key, errno);
            }
            let mut quic_ready = std::mem::take(&mut self.quic_backlog);
            let mut tun_ready = std::mem::take(&mut self.tun_backlog);
            let mut ready = std::mem::take(&mut self.target_backlog);
            for event in self.events.iter() {
                match event.token() {
                    QUIC_SOCKET => quic_ready = true,
                    ANSWER_BELL => h.on_wake(Wake::Answers),
                    WORKER_BELL => h.on_wake(Wake::Worker),
                    TUN => tun_ready = true,
                    Token(t) if t & WATCH_BIT != 0 => {
                        let ready = Ready {
                            readable: event.is_readable() || event.is_read_closed() || event.is_error(),
                            writable: event.is_writable() || event.is_write_closed() || event.is_error(),
                        };
                        h.on_ready((t & !WATCH_BIT) as WatchKey, ready)
                    }
                    Token(t) => ready.push((t - FIRST_TARGET) as TargetKey),
                }
            }
            if quic_ready {
                self.quic_backlog = self.read_quic(h, &mut stats);
            }
            for key in ready {
                if self.paused.contains(&key) {
                    continue;
                }
                if self.read_target(h, key, &mut stats) {
                    self.target_backlog.push(key);
                }
            }
            if tun_ready && let Some((dev, buf)) = self.tun.as_mut() {
                self.tun_backlog = super::tun::read(dev, buf, h, &mut stats);
            }
            let turn = h.end_turn();
            self.perform(h.output(), &mut stats);
            h.output().stats += stats;
            self.watch_answer_bell(h);
            match turn {
                Turn::Stop => return Ok(()),
                Turn::Continue { deadline: d } => deadline = d,
            }
        }
    }

    /// Registers control's doorbell again when the link changed.
    fn watch_answer_bell<H: Handler>(&mut self, h: &H) {
        let current = h.answer_bell();
        if self.answer_bell == Some(current) {
            return;
        }
        if let Some((old, _)) = self.answer_bell.take() {
            // The old eventfd may already be closed (then epoll dropped it).
            let _ = self.poll.registry().deregister(&mut SourceFd(&old));
        }
        match self.poll.registry().register(&mut SourceFd(&current.0), ANSWER_BELL, Interest::READABLE) {
            Ok(()) => self.answer_bell = Some(current),
            Err(e) => warn!("registering control's doorbell: {e}"),
        }
    }

    /// Reads the QUIC socket; returns whether its budget ran out first.
    fn read_quic<H: Handler>(&mut self, h: &mut H, stats: &mut IoStats) -> bool {
        for _ in 0..RECV_BUDGET {
            stats.syscalls += 1;
            let n = match self.rx.recv(&self.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    warn!("QUIC socket receive: {e}");
                    return false;
                }
            };
            for i in 0..n {
                match self.rx.message(i) {
                    Some(Message::Data(r, buf)) => {
                        stats.quic_receives += 1;
                        stats.quic_packets_in += r.segments() as u64;
                        h.on_quic(buf, r.segment_size, r.from);
                    }
                    Some(Message::Truncated) => stats.recv_truncated += 1,
                    None => {}
                }
            }
            if n < RECV_MESSAGES {
                return false; // the socket is drained
            }
        }
        true
    }

    /// Reads one target socket; returns whether its budget ran out first.
    fn read_target<H: Handler>(&mut self, h: &mut H, key: TargetKey, stats: &mut IoStats) -> bool {
        for _ in 0..RECV_BUDGET {
            let Some((sock, connected)) = self.targets.get(&key) else { return false };
            let connected = *connected;
            stats.syscalls += 1;
            let n = match self.rx.recv(sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                // An ICMP error from an earlier send: the target is
                // unreachable (RFC 9298 section 3.1 closes the tunnel).
                Err(e) if e.raw_os_error().is_some_and(super::is_unreachable) => {
                    h.on_target_unreachable(key, e.raw_os_error().unwrap_or(0));
                    return false;
                }
                Err(_) => continue,
            };
            for i in 0..n {
                match self.rx.message(i) {
                    Some(Message::Data(r, buf)) => {
                        stats.target_receives += 1;
                        stats.target_packets_in += r.segments() as u64;
                        h.on_target(key, (!connected).then_some(r.from), buf, r.segment_size);
                    }
                    Some(Message::Truncated) => stats.recv_truncated += 1,
                    None => {}
                }
            }
            if n < RECV_MESSAGES {
                return false;
            }
        }
        true
    }

    /// Performs the core's output: new targets, target batches, QUIC
    /// batches, closed targets, in that order.
    fn perform(&mut self, out: &mut Output, stats: &mut IoStats) {
        if let Some((dev, _)) = self.tun.as_ref() {
            super::tun::write(dev, &mut out.tun, stats);
        }
        for e in out.opens.drain(..) {
            if let Err(err) = e.sock.set_nonblocking(true) {
                warn!("target socket: {err}");
                continue;
            }
            let mut sock = mio::net::UdpSocket::from_std(e.sock);
            if let Err(err) =
                self.poll.registry().register(&mut sock, target_token(e.key), Interest::READABLE)
            {
                // Sends still work; replies cannot be read. Rare (ENOMEM).
                warn!("registering a target socket: {err}");
            }
            self.targets.insert(e.key, (sock, e.connected));
        }
        // Watches first: a descriptor watched and forgotten in one turn is
        // registered and removed again.
        for w in out.watches.drain(..) {
            let interest =
                if w.writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = self.poll.registry().register(&mut SourceFd(&w.fd), watch_token(w.key), interest)
            {
                warn!("watching a descriptor: {e}");
            }
        }
        for (_, fd) in out.unwatches.drain(..) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        for send in std::mem::take(&mut out.up) {
            match self.targets.get(&send.key) {
                Some((sock, _)) => {
                    let r = match send.to {
                        None => mmsg::send_connected(sock, &send.buf, send.segment_size, send.segments),
                        Some(to) => {
                            let batch = Batch {
                                buf: &send.buf,
                                to,
                                segment_size: send.segment_size,
                                segments: send.segments,
                            };
                            mmsg::send_batches(sock, &[batch])
                        }
                    };
                    stats.syscalls += r.syscalls;
                    stats.target_sends += r.syscalls;
                    stats.datagrams_up += r.sent;
                    stats.bytes_up += sent_bytes(send.buf.len(), send.segment_size, send.segments, r.sent);
                    stats.drop_target_send += r.dropped;
                    if let Some(errno) = r.last_errno.filter(|e| super::is_unreachable(*e)) {
                        self.unreachable.push((send.key, errno));
                    }
                }
                None => stats.drop_target_send += send.segments as u64,
            }
            out.recycle(send.buf);
        }
        out.finish_quic();
        if !out.quic.is_empty() {
            let batches: Vec<Batch<'_>> = out
                .quic
                .iter()
                .map(|q| Batch { buf: &q.buf, to: q.to, segment_size: q.segment_size, segments: q.segments })
                .collect();
            let r = mmsg::send_batches(&self.socket, &batches);
            drop(batches);
            stats.syscalls += r.syscalls;
            stats.quic_sends += r.syscalls;
            stats.quic_packets_out += r.sent;
            stats.quic_send_drops += r.dropped;
            for q in std::mem::take(&mut out.quic) {
                out.recycle(q.buf);
            }
        }
        for key in out.pauses.drain(..) {
            if self.targets.contains_key(&key) {
                self.paused.insert(key);
            }
        }
        for key in out.resumes.drain(..) {
            if self.paused.remove(&key) && !self.target_backlog.contains(&key) {
                self.target_backlog.push(key);
            }
        }
        for key in out.closes.drain(..) {
            if let Some((mut sock, _)) = self.targets.remove(&key) {
                let _ = self.poll.registry().deregister(&mut sock);
            }
            self.paused.remove(&key);
            self.target_backlog.retain(|k| *k != key);
        }
    }
}

/// Payload bytes of the first `sent` datagrams of a batch.
pub(crate) fn sent_bytes(len: usize, segment_size: usize, segments: usize, sent: u64) -> u64 {
    if sent as usize >= segments { len as u64 } else { (sent as usize * segment_size).min(len) as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::busy_core::BusyCore;

    #[test]
    fn busy_turns_still_deliver_readiness() {
        // The io_uring backend once starved readiness while every turn was
        // busy; epoll's turns poll with a zero timeout then, which still
        // reports ready descriptors.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut backend = EpollBackend::new(sock).expect("epoll backend");
        let mut core = BusyCore::new();
        backend.run(&mut core).expect("loop");
        core.assert_readied_within(5);
    }

    #[test]
    fn a_paused_target_is_not_read_until_resumed() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut backend = EpollBackend::new(sock).expect("epoll backend");
        let mut core = crate::io::pause_core::PauseCore::new();
        backend.run(&mut core).expect("loop");
        core.assert_paused_then_resumed();
    }
}

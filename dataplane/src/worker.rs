//! A dataplane worker: one thread, one `mio::Poll`, one QUIC socket, and the
//! connections, tunnels and target sockets it owns.
//!
//! This is the simple epoll driver of the vertical slice; the io_uring fast
//! path replaces the I/O here, not the protocol logic, which lives in
//! `relay_proto` (request validation, capsules, datagrams) and
//! [`crate::tunnel`] (tunnel state).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use quiche::h3::NameValue;
use relay_proto::channel::bootstrap::Bootstrap;
use relay_proto::channel::record::{AuthAnswer, FlowClosed, RecordError, Verdict};
use relay_proto::channel::region::Counter;
use relay_proto::datagram;
use relay_proto::proxy_status::ProxyError;
use relay_proto::request;
use relay_proto::template::UriTemplate;
use tracing::{debug, info, warn};

use crate::link::{AskError, ControlLink};
use crate::quic;
use crate::response::{self, Headers};
use crate::socket;
use crate::tunnel::{DownPath, Limits, Phase, Tunnel, UpOutcome};
use crate::upbatch::UpBatch;
use relay_udp::SegmentBatcher;

const QUIC_SOCKET: Token = Token(0);
const ANSWER_BELL: Token = Token(1);
const FIRST_TARGET_TOKEN: usize = 16;

/// HTTP/3 error codes (RFC 9114 section 8.1, RFC 9297 section 5.2).
pub mod h3_code {
    /// H3_NO_ERROR.
    pub const NO_ERROR: u64 = 0x100;
    /// H3_INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u64 = 0x102;
    /// H3_REQUEST_REJECTED.
    pub const REQUEST_REJECTED: u64 = 0x10b;
    /// H3_REQUEST_CANCELLED.
    pub const REQUEST_CANCELLED: u64 = 0x10c;
    /// H3_MESSAGE_ERROR.
    pub const MESSAGE_ERROR: u64 = 0x10e;
    /// H3_DATAGRAM_ERROR.
    pub const DATAGRAM_ERROR: u64 = 0x33;
}

/// Packets read from a socket per readiness event before yielding.
const READ_BUDGET: usize = 1024;
/// How often tunnels are checked for idleness and ask deadlines.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

struct TunnelEntry {
    tunnel: Tunnel,
    target: Option<(mio::net::UdpSocket, usize)>,
    response_pending: Option<Headers>,
    /// Payloads for the target collected this turn (see [`UpBatch`]).
    up: Option<UpBatch>,
}

/// Buffers kept for reuse by target batches.
const UP_POOL: usize = 64;

struct Conn {
    quic: quiche::Connection,
    /// The client's address when the connection was accepted.
    peer: SocketAddr,
    /// Lowest request stream ID not seen yet (for GOAWAY).
    next_request_id: u64,
    /// Whether GOAWAY went out on this connection.
    goaway_sent: bool,
    h3: Option<quiche::h3::Connection>,
    cids: Vec<quiche::ConnectionId<'static>>,
    tunnels: HashMap<u64, TunnelEntry>,
    settings_known: bool,
    established_counted: bool,
}

/// Settings a worker runs with.
pub struct WorkerSettings {
    /// Worker index.
    pub index: u32,
    /// What control sent at attach.
    pub bootstrap: Bootstrap,
    /// The parsed URI template.
    pub template: UriTemplate,
}

/// A worker.
pub struct Worker {
    settings: WorkerSettings,
    poll: Poll,
    socket: mio::net::UdpSocket,
    local: SocketAddr,
    quic_config: quiche::Config,
    h3_config: quiche::h3::Config,
    conns: HashMap<u64, Conn>,
    by_cid: HashMap<quiche::ConnectionId<'static>, u64>,
    next_conn: u64,
    targets: HashMap<usize, (u64, u64)>,
    next_target_token: usize,
    backlogged_targets: Vec<usize>,
    asks: HashMap<u64, (u64, u64)>,
    link: ControlLink,
    relink: std::sync::mpsc::Receiver<ControlLink>,
    limits: Limits,
    buf: Vec<u8>,
    rx: Vec<u8>,
    out: Vec<u8>,
    dgram: Vec<u8>,
    batcher: SegmentBatcher,
    up_pool: Vec<Vec<u8>>,
    dirty_up: Vec<(u64, u64)>,
    dgram_in: Vec<u8>,
    quic_backlogged: bool,
    last_sweep: Instant,
    /// When a graceful drain must end.
    drain_deadline: Option<Instant>,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Socket or poll setup failed.
    #[error("worker I/O: {0}")]
    Io(#[from] io::Error),
    /// TLS or QUIC configuration failed (e.g. unreadable certificate).
    #[error("QUIC configuration: {0}")]
    Quic(#[from] quiche::Error),
    /// HTTP/3 configuration failed.
    #[error("HTTP/3 configuration: {0}")]
    H3(#[from] quiche::h3::Error),
}

fn random_cid() -> quiche::ConnectionId<'static> {
    let mut id = [0u8; quiche::MAX_CONN_ID_LEN];
    let mut filled = 0;
    while filled < id.len() {
        // SAFETY: getrandom writes at most the given length into our buffer.
        let n = unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), id.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    quiche::ConnectionId::from_vec(id.to_vec())
}

impl Worker {
    /// Binds the worker's QUIC socket and prepares its configuration.
    pub fn new(
        settings: WorkerSettings,
        link: ControlLink,
        relink: std::sync::mpsc::Receiver<ControlLink>,
    ) -> Result<Self, WorkerError> {
        let poll = Poll::new()?;
        let mut socket = socket::quic_listener(settings.bootstrap.listen)?;
        let local = socket.local_addr()?;
        poll.registry().register(&mut socket, QUIC_SOCKET, Interest::READABLE)?;
        poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(link.answer_bell())),
            ANSWER_BELL,
            Interest::READABLE,
        )?;
        let quic_config = quic::transport_config(&settings.bootstrap)?;
        let h3_config = quic::h3_config()?;
        let limits = Limits {
            max_capsule_len: settings.bootstrap.max_capsule_len as usize,
            max_queued_datagrams: settings.bootstrap.pending_datagrams_per_tunnel as usize,
            stream_out_limit: 256 * 1024,
        };
        Ok(Self {
            settings,
            poll,
            socket,
            local,
            quic_config,
            h3_config,
            conns: HashMap::new(),
            by_cid: HashMap::new(),
            next_conn: 1,
            targets: HashMap::new(),
            next_target_token: FIRST_TARGET_TOKEN,
            backlogged_targets: Vec::new(),
            asks: HashMap::new(),
            link,
            relink,
            limits,
            buf: vec![0; 65_536],
            rx: vec![0; relay_udp::MAX_GRO_BUFFER],
            out: vec![0; quic::MAX_SEND_UDP_PAYLOAD],
            batcher: SegmentBatcher::new(quic::MAX_SEND_UDP_PAYLOAD),
            up_pool: Vec::new(),
            dirty_up: Vec::new(),
            dgram_in: vec![0; 65_536],
            dgram: Vec::with_capacity(2048),
            quic_backlogged: false,
            last_sweep: Instant::now(),
            drain_deadline: None,
        })
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn count(&self, c: Counter, n: u64) {
        self.link.counters().add(c, n);
    }

    /// Runs until `stop` is set, or until a drain requested by `drain` has
    /// let every tunnel finish (or its deadline passed); then closes every
    /// connection.
    pub fn run(&mut self, stop: &AtomicBool, drain: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        info!(worker = self.settings.index, addr = %self.local, "worker serving");
        while !stop.load(Ordering::Relaxed) {
            let timeout = self.next_timeout();
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            self.check_relink(now);
            let requested = self.link.take_drain_request();
            if (requested || drain.load(Ordering::Relaxed)) && self.drain_deadline.is_none() {
                self.start_drain(now);
            }
            if let Some(deadline) = self.drain_deadline {
                let open: usize = self.conns.values().map(|c| c.tunnels.len()).sum();
                if open == 0 || now >= deadline {
                    info!(worker = self.settings.index, tunnels_left = open, "drain finished");
                    break;
                }
            }
            let mut quic_ready = std::mem::take(&mut self.quic_backlogged);
            let mut ready_targets = std::mem::take(&mut self.backlogged_targets);
            for event in events.iter() {
                match event.token() {
                    QUIC_SOCKET => quic_ready = true,
                    ANSWER_BELL => {}
                    Token(t) => ready_targets.push(t),
                }
            }
            if quic_ready {
                self.read_quic(now);
            }
            for token in ready_targets {
                self.read_target(token, now);
            }
            self.read_answers(now);
            self.kill_requested_flows();
            self.flush_up();
            self.on_timeouts(now);
            self.flush_all();
            // Processing during the flush may have queued more payloads; no
            // batch outlives its turn.
            self.flush_up();
        }
        self.shutdown();
        Ok(())
    }

    fn next_timeout(&self) -> Duration {
        if self.quic_backlogged || !self.backlogged_targets.is_empty() {
            return Duration::ZERO;
        }
        let quic = self.conns.values().filter_map(|c| c.quic.timeout()).min();
        quic.unwrap_or(SWEEP_INTERVAL).min(SWEEP_INTERVAL)
    }

    /// Reads QUIC packets; with GRO one receive may carry many packets from
    /// one sender, split by the kernel-reported stride.
    fn read_quic(&mut self, now: Instant) {
        let mut rx = std::mem::take(&mut self.rx);
        let mut exhausted = true;
        for _ in 0..READ_BUDGET {
            let r = match relay_udp::recv_segments(&self.socket, &mut rx) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    exhausted = false;
                    break;
                }
                Err(e) => {
                    warn!("QUIC socket receive: {e}");
                    exhausted = false;
                    break;
                }
            };
            self.count(Counter::QuicPacketsIn, r.segments() as u64);
            self.count(Counter::QuicReceives, 1);
            let stride = r.segment_size.max(1);
            let mut offset = 0;
            while offset < r.len {
                let end = (offset + stride).min(r.len);
                self.on_quic_packet(&mut rx[offset..end], r.from, now);
                offset = end;
            }
        }
        self.rx = rx;
        self.quic_backlogged = exhausted;
    }

    fn on_quic_packet(&mut self, pkt: &mut [u8], from: SocketAddr, now: Instant) {
        let hdr = match quiche::Header::from_slice(pkt, quiche::MAX_CONN_ID_LEN) {
            Ok(h) => h,
            Err(_) => return,
        };
        let serial = match self.by_cid.get(&hdr.dcid) {
            Some(s) => *s,
            None => {
                if hdr.ty != quiche::Type::Initial {
                    return;
                }
                if !quiche::version_is_supported(hdr.version) {
                    if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.out) {
                        let _ = self.socket.send_to(&self.out[..n], from);
                    }
                    return;
                }
                if self.conns.len() >= self.settings.bootstrap.max_connections_per_worker as usize
                    || self.drain_deadline.is_some()
                {
                    return;
                }
                let scid = random_cid();
                let odcid = hdr.dcid.clone().into_owned();
                let quic = match quiche::accept(&scid, None, self.local, from, &mut self.quic_config) {
                    Ok(c) => c,
                    Err(e) => {
                        debug!("accept failed: {e}");
                        return;
                    }
                };
                let serial = self.next_conn;
                self.next_conn += 1;
                self.by_cid.insert(scid.clone(), serial);
                self.by_cid.insert(odcid.clone(), serial);
                self.conns.insert(
                    serial,
                    Conn {
                        quic,
                        h3: None,
                        cids: vec![scid, odcid],
                        tunnels: HashMap::new(),
                        settings_known: false,
                        established_counted: false,
                        peer: from,
                        next_request_id: 0,
                        goaway_sent: false,
                    },
                );
                self.count(Counter::ConnectionsAccepted, 1);
                self.count(Counter::ConnectionsActive, 1);
                serial
            }
        };
        let Some(mut conn) = self.conns.remove(&serial) else { return };
        let info = quiche::RecvInfo { from, to: self.local };
        match conn.quic.recv(pkt, info) {
            Ok(_) => self.process_conn(serial, &mut conn, now),
            Err(e) => debug!("QUIC recv: {e}"),
        }
        self.conns.insert(serial, conn);
    }

    fn process_conn(&mut self, serial: u64, conn: &mut Conn, now: Instant) {
        if conn.quic.is_established() && !conn.established_counted {
            conn.established_counted = true;
            self.count(Counter::HandshakesCompleted, 1);
        }
        if conn.h3.is_none() && (conn.quic.is_established() || conn.quic.is_in_early_data()) {
            match quiche::h3::Connection::with_transport(&mut conn.quic, &self.h3_config) {
                Ok(h3) => conn.h3 = Some(h3),
                Err(e) => {
                    warn!("HTTP/3 setup failed: {e}");
                    let _ = conn.quic.close(true, h3_code::INTERNAL_ERROR, b"h3 setup");
                    return;
                }
            }
        }
        if conn.h3.is_none() {
            return;
        }
        if self.drain_deadline.is_some() {
            send_goaway(conn);
        }
        loop {
            let event = match conn.h3.as_mut().map(|h3| h3.poll(&mut conn.quic)) {
                Some(Ok(ev)) => ev,
                Some(Err(quiche::h3::Error::Done)) | None => break,
                Some(Err(e)) => {
                    debug!("HTTP/3 error: {e}");
                    break;
                }
            };
            match event {
                (stream_id, quiche::h3::Event::Headers { list, more_frames }) => {
                    self.on_request(serial, conn, stream_id, &list, more_frames, now)
                }
                (stream_id, quiche::h3::Event::Data) => self.on_stream_data(serial, conn, stream_id, now),
                (stream_id, quiche::h3::Event::Finished) => self.on_stream_finished(conn, stream_id),
                (stream_id, quiche::h3::Event::Reset(_)) => {
                    if let Some(entry) = conn.tunnels.remove(&stream_id) {
                        let _ = conn.quic.stream_shutdown(
                            stream_id,
                            quiche::Shutdown::Write,
                            h3_code::REQUEST_CANCELLED,
                        );
                        self.close_tunnel(entry);
                    }
                }
                (_, quiche::h3::Event::PriorityUpdate) | (_, quiche::h3::Event::GoAway) => {}
            }
        }
        if !conn.settings_known && conn.h3.as_ref().is_some_and(|h| h.peer_settings_raw().is_some()) {
            conn.settings_known = true;
            let ids: Vec<u64> = conn.tunnels.keys().copied().collect();
            for id in ids {
                let waiting =
                    conn.tunnels.get_mut(&id).map(|e| e.tunnel.take_waiting_down()).unwrap_or_default();
                for payload in waiting {
                    self.send_down(conn, id, &payload, now);
                }
            }
        }
        self.read_datagrams(serial, conn, now);
    }

    fn read_datagrams(&mut self, serial: u64, conn: &mut Conn, now: Instant) {
        // The buffer is taken out of `self` so payloads can be borrowed from
        // it while the worker queues them.
        let mut buf = std::mem::take(&mut self.dgram_in);
        while let Ok(len) = conn.quic.dgram_recv(&mut buf) {
            let d = match datagram::decode(&buf[..len]) {
                Ok(d) => d,
                Err(e) if e.is_connection_error() => {
                    // RFC 9297 section 2.1: H3_DATAGRAM_ERROR.
                    self.count(Counter::DropMalformed, 1);
                    let _ = conn.quic.close(true, h3_code::DATAGRAM_ERROR, b"malformed HTTP datagram");
                    break;
                }
                Err(_) => {
                    self.count(Counter::DropMalformed, 1);
                    continue;
                }
            };
            let stream_id = d.stream_id;
            let Some(entry) = conn.tunnels.get_mut(&stream_id) else {
                // RFC 9297 section 2.1: datagrams for streams that are not
                // (or no longer) tunnels are dropped.
                self.count(Counter::DropNoTunnel, 1);
                continue;
            };
            let outcome = entry.tunnel.on_quic_datagram(d.context_id, d.payload, now);
            if outcome == UpOutcome::AbortTooLarge {
                self.count(Counter::DropTooLarge, 1);
                self.abort_tunnel(conn, stream_id, h3_code::DATAGRAM_ERROR);
                continue;
            }
            self.forward_up(serial, stream_id, entry, outcome, d.payload);
        }
        self.dgram_in = buf;
    }

    fn on_request(
        &mut self,
        serial: u64,
        conn: &mut Conn,
        stream_id: u64,
        list: &[quiche::h3::Header],
        more_frames: bool,
        now: Instant,
    ) {
        if conn.tunnels.contains_key(&stream_id) {
            return; // trailers on a tunnel stream: nothing to do
        }
        conn.next_request_id = conn.next_request_id.max(stream_id + 4);
        if self.drain_deadline.is_some() {
            // RFC 9114 section 5.2: after GOAWAY, requests are rejected with
            // H3_REQUEST_REJECTED (the client may retry them elsewhere).
            self.count(Counter::TunnelsRefused, 1);
            let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::REQUEST_REJECTED);
            let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Write, h3_code::REQUEST_REJECTED);
            return;
        }
        self.count(Counter::RequestsReceived, 1);
        let req = match request::parse_request(list.iter().map(|h| (h.name(), h.value())), true) {
            Ok(r) => r,
            Err(why) => {
                // RFC 9114 section 4.1.2: a malformed request is a stream
                // error of type H3_MESSAGE_ERROR.
                debug!(stream_id, "malformed request: {why}");
                self.count(Counter::RequestsMalformed, 1);
                let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::MESSAGE_ERROR);
                let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Write, h3_code::MESSAGE_ERROR);
                return;
            }
        };
        let connect = match request::classify_connect_udp(&req, &self.settings.template) {
            Ok(c) => c,
            Err(refusal) => {
                return self.refuse(conn, stream_id, refusal.status, refusal.proxy_error, refusal.reason);
            }
        };
        if !more_frames {
            return self.refuse(
                conn,
                stream_id,
                400,
                Some(ProxyError::HttpRequestError),
                "request stream already ended",
            );
        }
        if conn.tunnels.len() >= self.settings.bootstrap.max_tunnels_per_connection as usize {
            return self.refuse(
                conn,
                stream_id,
                429,
                Some(ProxyError::HttpRequestDenied),
                "too many tunnels on this connection",
            );
        }
        let target_host = match &connect.target_host {
            relay_proto::target::TargetHost::Ip(ip) => ip.to_string(),
            relay_proto::target::TargetHost::Name(n) => n.clone(),
        };
        let asked = self.link.ask(
            conn.peer,
            &connect.authority,
            &connect.path,
            &target_host,
            connect.target_port,
            connect.authorization.as_deref(),
        );
        let ask_id = match asked {
            Ok(id) => id,
            Err(e) => {
                let (status, proxy_error, reason) = match e {
                    AskError::ControlDown => {
                        (503, Some(ProxyError::ProxyInternalError), "control plane unavailable")
                    }
                    AskError::Full => (503, Some(ProxyError::ProxyInternalError), "control plane overloaded"),
                    AskError::TooLarge(RecordError::FieldTooLong("path")) => (414, None, "path too long"),
                    AskError::TooLarge(RecordError::FieldTooLong("authorization")) => {
                        (431, None, "credentials too long")
                    }
                    AskError::TooLarge(_) => (400, Some(ProxyError::HttpRequestError), "request too large"),
                };
                if matches!(e, AskError::ControlDown | AskError::Full) {
                    self.count(Counter::AsksFailed, 1);
                }
                return self.refuse(conn, stream_id, status, proxy_error, reason);
            }
        };
        let timeout = Duration::from_millis(u64::from(self.settings.bootstrap.ask_timeout_ms));
        let tunnel = Tunnel::pending(stream_id, ask_id, now, timeout, self.limits);
        conn.tunnels
            .insert(stream_id, TunnelEntry { tunnel, target: None, response_pending: None, up: None });
        self.asks.insert(ask_id, (serial, stream_id));
    }

    /// Sends a complete refusal and stops reading the request.
    fn refuse(
        &mut self,
        conn: &mut Conn,
        stream_id: u64,
        status: u16,
        proxy_error: Option<ProxyError>,
        reason: &str,
    ) {
        debug!(stream_id, status, reason, "request refused");
        self.count(Counter::TunnelsRefused, 1);
        let headers = response::refusal(
            status,
            proxy_error,
            reason,
            &self.settings.bootstrap.proxy_name,
            &self.settings.bootstrap.auth_realm,
        );
        let Some(h3) = conn.h3.as_mut() else { return };
        if h3.send_response(&mut conn.quic, stream_id, &headers, true).is_err() {
            let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Write, h3_code::INTERNAL_ERROR);
        }
        // RFC 9114 section 4.1: a server that does not need the rest of the
        // request aborts reading with H3_NO_ERROR.
        let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::NO_ERROR);
    }

    fn on_stream_data(&mut self, serial: u64, conn: &mut Conn, stream_id: u64, now: Instant) {
        let Some(h3) = conn.h3.as_mut() else { return };
        loop {
            let n = match h3.recv_body(&mut conn.quic, stream_id, &mut self.buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            let Some(entry) = conn.tunnels.get_mut(&stream_id) else {
                continue; // body of a refused request: discarded
            };
            let mut payloads: Vec<(UpOutcome, Vec<u8>)> = Vec::new();
            let result = entry.tunnel.on_stream_bytes(&self.buf[..n], now, |outcome, payload| {
                payloads.push((outcome, payload.to_vec()));
            });
            let mut too_large = false;
            for (outcome, payload) in payloads {
                too_large |= outcome == UpOutcome::AbortTooLarge;
                self.forward_up(serial, stream_id, entry, outcome, &payload);
            }
            if too_large {
                self.abort_tunnel(conn, stream_id, h3_code::DATAGRAM_ERROR);
                return;
            }
            if let Err(e) = result {
                // RFC 9297 section 3.3: a malformed capsule makes the
                // message malformed.
                debug!(stream_id, "capsule error: {e}");
                self.abort_tunnel(conn, stream_id, h3_code::MESSAGE_ERROR);
                return;
            }
        }
    }

    fn on_stream_finished(&mut self, conn: &mut Conn, stream_id: u64) {
        let Some(entry) = conn.tunnels.get(&stream_id) else { return };
        if entry.tunnel.on_stream_end().is_err() {
            return self.abort_tunnel(conn, stream_id, h3_code::MESSAGE_ERROR);
        }
        let Some(entry) = conn.tunnels.remove(&stream_id) else { return };
        // RFC 9298 section 3: closing the stream closes the tunnel; end ours.
        if matches!(entry.tunnel.phase, Phase::Open { .. }) && entry.response_pending.is_none() {
            if let Some(h3) = conn.h3.as_mut() {
                let _ = h3.send_body(&mut conn.quic, stream_id, &[], true);
            }
        } else {
            let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Write, h3_code::REQUEST_CANCELLED);
        }
        self.close_tunnel(entry);
    }

    fn abort_tunnel(&mut self, conn: &mut Conn, stream_id: u64, code: u64) {
        let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, code);
        let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Write, code);
        if let Some(entry) = conn.tunnels.remove(&stream_id) {
            self.close_tunnel(entry);
        }
    }

    fn close_tunnel(&mut self, entry: TunnelEntry) {
        match entry.tunnel.phase {
            Phase::Pending { ask_id, .. } => {
                self.asks.remove(&ask_id);
                self.link.cancel(ask_id);
            }
            Phase::Open { flow_id, .. } => {
                let mut entry = entry;
                if let (Some(mut batch), Some((sock, _))) = (entry.up.take(), entry.target.as_ref()) {
                    let sent = batch.send(sock);
                    self.count_up_sent(sent);
                    self.recycle(batch);
                }
                if let Some((mut sock, token)) = entry.target {
                    let _ = self.poll.registry().deregister(&mut sock);
                    self.targets.remove(&token);
                }
                let t = entry.tunnel.totals;
                self.link.flow_closed(FlowClosed {
                    flow_id,
                    packets_up: t.packets_up,
                    bytes_up: t.bytes_up,
                    packets_down: t.packets_down,
                    bytes_down: t.bytes_down,
                });
                self.count(Counter::TunnelsClosed, 1);
                self.link.counters().sub(Counter::TunnelsActive, 1);
            }
        }
    }

    /// Switches to the channel of a control that attached after the
    /// previous one went away: asks sent to the dead control are answered
    /// with 503 now, and every open tunnel is reported so the new control
    /// learns the live flows.
    fn check_relink(&mut self, _now: Instant) {
        let Ok(mut new) = self.relink.try_recv() else { return };
        let registry = self.poll.registry();
        let old_fd = std::os::fd::AsRawFd::as_raw_fd(self.link.answer_bell());
        let _ = registry.deregister(&mut SourceFd(&old_fd));
        let new_fd = std::os::fd::AsRawFd::as_raw_fd(new.answer_bell());
        if let Err(e) = registry.register(&mut SourceFd(&new_fd), ANSWER_BELL, Interest::READABLE) {
            warn!("registering the new answers doorbell: {e}");
        }
        new.continue_ask_ids(self.link.next_ask_id());
        self.link = new;
        let pending: Vec<(u64, (u64, u64))> = self.asks.drain().collect();
        for (_, (serial, stream_id)) in pending {
            let Some(mut conn) = self.conns.remove(&serial) else { continue };
            if conn.tunnels.remove(&stream_id).is_some() {
                self.count(Counter::AsksFailed, 1);
                self.refuse(
                    &mut conn,
                    stream_id,
                    503,
                    Some(ProxyError::ProxyInternalError),
                    "control plane restarted",
                );
            }
            self.conns.insert(serial, conn);
        }
        let mut open = Vec::new();
        for conn in self.conns.values() {
            for entry in conn.tunnels.values() {
                if let Phase::Open { flow_id, target } = entry.tunnel.phase {
                    open.push(relay_proto::channel::record::FlowOpen { flow_id, client: conn.peer, target });
                }
            }
        }
        // The new region's counters start at zero: restore the gauges.
        self.count(Counter::ConnectionsActive, self.conns.len() as u64);
        self.count(Counter::TunnelsActive, open.len() as u64);
        let flows = open.len();
        for f in open {
            self.link.flow_open(f);
        }
        info!(worker = self.settings.index, flows, "attached to a new control; live flows reported");
    }

    /// Graceful drain: GOAWAY on every connection, no new connections or
    /// requests; open tunnels run until they end or the deadline passes.
    fn start_drain(&mut self, now: Instant) {
        let timeout = Duration::from_millis(self.settings.bootstrap.drain_timeout_ms);
        self.drain_deadline = Some(now + timeout);
        for conn in self.conns.values_mut() {
            send_goaway(conn);
        }
        let open: usize = self.conns.values().map(|c| c.tunnels.len()).sum();
        info!(worker = self.settings.index, tunnels = open, ?timeout, "draining");
    }

    /// Ends the tunnels control was asked to kill: both directions reset
    /// with H3_REQUEST_CANCELLED, the flow reported closed.
    fn kill_requested_flows(&mut self) {
        let kills = self.link.take_kill_requests();
        if kills.is_empty() {
            return;
        }
        let mut found = Vec::new();
        for (serial, conn) in &self.conns {
            for (stream_id, entry) in &conn.tunnels {
                if entry.tunnel.flow_id().is_some_and(|f| kills.contains(&f)) {
                    found.push((*serial, *stream_id));
                }
            }
        }
        for (serial, stream_id) in found {
            let Some(mut conn) = self.conns.remove(&serial) else { continue };
            info!(worker = self.settings.index, stream_id, "tunnel killed by the operator");
            self.abort_tunnel(&mut conn, stream_id, h3_code::REQUEST_CANCELLED);
            self.conns.insert(serial, conn);
        }
    }

    fn read_answers(&mut self, now: Instant) {
        let mut answers = Vec::new();
        self.link.poll_answers(|a| answers.push(a));
        for a in answers {
            self.on_answer(a, now);
        }
    }

    fn on_answer(&mut self, answer: AuthAnswer, now: Instant) {
        let Some((serial, stream_id)) = self.asks.remove(&answer.ask_id) else {
            // The request is gone (timed out, reset, connection closed).
            if let Verdict::Allow { flow_id, .. } = answer.verdict {
                self.link.flow_closed(FlowClosed::unused(flow_id));
            }
            return;
        };
        let Some(mut conn) = self.conns.remove(&serial) else { return };
        self.apply_answer(&mut conn, stream_id, answer.verdict, now);
        self.conns.insert(serial, conn);
    }

    fn apply_answer(&mut self, conn: &mut Conn, stream_id: u64, verdict: Verdict, now: Instant) {
        if !conn.tunnels.contains_key(&stream_id) {
            if let Verdict::Allow { flow_id, .. } = verdict {
                self.link.flow_closed(FlowClosed::unused(flow_id));
            }
            return;
        }
        match verdict {
            Verdict::Deny { status, proxy_error, details } => {
                conn.tunnels.remove(&stream_id);
                self.refuse(conn, stream_id, status, proxy_error, &details);
            }
            Verdict::Allow { flow_id, target, idle_timeout_ms } => {
                let mut sock = match socket::connected_target(target) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!("target socket: {e}");
                        conn.tunnels.remove(&stream_id);
                        self.link.flow_closed(FlowClosed::unused(flow_id));
                        let reason = "cannot open a socket to the target";
                        return self.refuse(
                            conn,
                            stream_id,
                            502,
                            Some(ProxyError::DestinationUnavailable),
                            reason,
                        );
                    }
                };
                let token = self.next_target_token;
                self.next_target_token += 1;
                if self.poll.registry().register(&mut sock, Token(token), Interest::READABLE).is_err() {
                    conn.tunnels.remove(&stream_id);
                    self.link.flow_closed(FlowClosed::unused(flow_id));
                    return self.refuse(
                        conn,
                        stream_id,
                        503,
                        Some(ProxyError::ProxyInternalError),
                        "socket registration failed",
                    );
                }
                let serial = *self.by_cid.get(&conn.cids[0]).expect("live connection is indexed");
                self.targets.insert(token, (serial, stream_id));
                let entry = conn.tunnels.get_mut(&stream_id).expect("checked above");
                let early = entry.tunnel.open(
                    flow_id,
                    target,
                    Duration::from_millis(u64::from(idle_timeout_ms)),
                    now,
                );
                entry.target = Some((sock, token));
                self.count(Counter::TunnelsOpened, 1);
                self.count(Counter::TunnelsActive, 1);
                let headers = response::tunnel_open();
                let sent =
                    conn.h3.as_mut().map(|h3| h3.send_response(&mut conn.quic, stream_id, &headers, false));
                if !matches!(sent, Some(Ok(()))) {
                    entry.response_pending = Some(headers);
                }
                for payload in early {
                    entry.tunnel.totals.packets_up += 1;
                    entry.tunnel.totals.bytes_up += payload.len() as u64;
                    self.forward_up(serial, stream_id, entry, UpOutcome::Forward, &payload);
                }
            }
        }
    }

    fn read_target(&mut self, token: usize, now: Instant) {
        let Some(&(serial, stream_id)) = self.targets.get(&token) else { return };
        let Some(mut conn) = self.conns.remove(&serial) else { return };
        // The buffer is taken out of `self` so a payload can be borrowed
        // from it while the worker sends it on (no per-datagram copy).
        let mut buf = std::mem::take(&mut self.buf);
        let mut drained = false;
        for _ in 0..READ_BUDGET {
            let Some((sock, _)) = conn.tunnels.get(&stream_id).and_then(|e| e.target.as_ref()) else {
                drained = true;
                break;
            };
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(_) => continue, // e.g. ECONNREFUSED from an ICMP error: UDP semantics
            };
            self.send_down(&mut conn, stream_id, &buf[..n], now);
        }
        self.buf = buf;
        if !drained {
            self.backlogged_targets.push(token);
        }
        self.conns.insert(serial, conn);
    }

    /// Sends one target payload towards the client on the tunnel's path.
    fn send_down(&mut self, conn: &mut Conn, stream_id: u64, payload: &[u8], now: Instant) {
        let peer_dgrams = conn.h3.as_ref().is_some_and(|h| h.dgram_enabled_by_peer(&conn.quic));
        let settings_known = conn.settings_known;
        let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return };
        match entry.tunnel.down_path(settings_known, peer_dgrams) {
            DownPath::Wait => {
                if !entry.tunnel.queue_down(payload) {
                    self.count(Counter::DropQueueFull, 1);
                }
            }
            DownPath::QuicDatagram => {
                datagram::encode_into(stream_id, datagram::UDP_PAYLOAD_CONTEXT, payload, &mut self.dgram);
                if conn.quic.dgram_max_writable_len().is_none_or(|max| self.dgram.len() > max) {
                    self.count(Counter::DropTooLarge, 1);
                    return;
                }
                match conn.quic.dgram_send(&self.dgram) {
                    Ok(()) => {
                        entry.tunnel.on_down(payload.len(), now);
                        self.count(Counter::DatagramsDown, 1);
                        self.count(Counter::BytesDown, payload.len() as u64);
                    }
                    Err(_) => self.count(Counter::DropQueueFull, 1),
                }
            }
            DownPath::Capsule => {
                if entry.tunnel.push_capsule(payload) {
                    entry.tunnel.on_down(payload.len(), now);
                    self.count(Counter::DatagramsDown, 1);
                    self.count(Counter::BytesDown, payload.len() as u64);
                } else {
                    self.count(Counter::DropQueueFull, 1);
                }
            }
        }
    }

    fn on_timeouts(&mut self, now: Instant) {
        for conn in self.conns.values_mut() {
            if conn.quic.timeout_instant().is_some_and(|t| t <= now) {
                conn.quic.on_timeout();
            }
        }
        if now.saturating_duration_since(self.last_sweep) < SWEEP_INTERVAL {
            return;
        }
        self.last_sweep = now;
        let serials: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.tunnels.values().any(|e| e.tunnel.expired(now)))
            .map(|(s, _)| *s)
            .collect();
        for serial in serials {
            let Some(mut conn) = self.conns.remove(&serial) else { continue };
            let expired: Vec<u64> =
                conn.tunnels.iter().filter(|(_, e)| e.tunnel.expired(now)).map(|(id, _)| *id).collect();
            for stream_id in expired {
                let Some(entry) = conn.tunnels.remove(&stream_id) else { continue };
                match entry.tunnel.phase {
                    Phase::Pending { .. } => {
                        self.count(Counter::AsksFailed, 1);
                        self.close_tunnel(entry);
                        self.refuse(
                            &mut conn,
                            stream_id,
                            503,
                            Some(ProxyError::ProxyInternalError),
                            "control plane did not answer in time",
                        );
                    }
                    Phase::Open { .. } => {
                        // Idle: end the tunnel cleanly from our side.
                        if let Some(h3) = conn.h3.as_mut() {
                            let _ = h3.send_body(&mut conn.quic, stream_id, &[], true);
                        }
                        let _ =
                            conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::NO_ERROR);
                        self.close_tunnel(entry);
                    }
                }
            }
            self.conns.insert(serial, conn);
        }
    }

    fn flush_all(&mut self) {
        let serials: Vec<u64> = self.conns.keys().copied().collect();
        for serial in serials {
            let Some(mut conn) = self.conns.remove(&serial) else { continue };
            // HTTP/3 events only come from received packets, which
            // `on_quic_packet` has processed already; here we only write.
            self.flush_streams(&mut conn);
            self.send_packets(&mut conn);
            if conn.quic.is_closed() {
                self.drop_conn(conn);
            } else {
                self.conns.insert(serial, conn);
            }
        }
    }

    fn flush_streams(&mut self, conn: &mut Conn) {
        let Some(h3) = conn.h3.as_mut() else { return };
        for (stream_id, entry) in conn.tunnels.iter_mut() {
            if let Some(headers) = &entry.response_pending {
                if h3.send_response(&mut conn.quic, *stream_id, headers, false).is_ok() {
                    entry.response_pending = None;
                } else {
                    continue;
                }
            }
            if !entry.tunnel.stream_out().is_empty()
                && let Ok(n) = h3.send_body(&mut conn.quic, *stream_id, entry.tunnel.stream_out(), false)
            {
                entry.tunnel.consume_stream_out(n);
            }
        }
    }

    /// Sends what quiche has for `conn`, coalescing consecutive packets to
    /// the peer into GSO batches.
    fn send_packets(&mut self, conn: &mut Conn) {
        let (calls0, sent0, dropped0) = (self.batcher.syscalls, self.batcher.datagrams, self.batcher.dropped);
        loop {
            let (n, info) = match conn.quic.send(&mut self.out) {
                Ok(v) => v,
                Err(quiche::Error::Done) => break,
                Err(e) => {
                    debug!("QUIC send: {e}");
                    let _ = conn.quic.close(false, 0x1, b"internal error");
                    break;
                }
            };
            if let Err(e) = self.batcher.push(&self.socket, info.to, &self.out[..n]) {
                debug!("QUIC socket send: {e}");
            }
        }
        if let Err(e) = self.batcher.flush(&self.socket) {
            debug!("QUIC socket send: {e}");
        }
        // Packets the kernel refused are lost; QUIC recovers them.
        self.count(Counter::QuicPacketsOut, self.batcher.datagrams - sent0);
        self.count(Counter::QuicSends, self.batcher.syscalls - calls0);
        self.count(Counter::QuicSendDrops, self.batcher.dropped - dropped0);
    }

    /// Accounts one client payload and queues it for the target's batch of
    /// this turn (sent by [`Worker::flush_up`]).
    fn forward_up(
        &mut self,
        serial: u64,
        stream_id: u64,
        entry: &mut TunnelEntry,
        outcome: UpOutcome,
        payload: &[u8],
    ) {
        match outcome {
            UpOutcome::Forward => {}
            UpOutcome::Buffered => return,
            UpOutcome::DroppedQueueFull => return self.count(Counter::DropQueueFull, 1),
            UpOutcome::DroppedUnknownContext => return self.count(Counter::DropUnknownContext, 1),
            UpOutcome::AbortTooLarge => return self.count(Counter::DropTooLarge, 1),
        }
        let Some((sock, _)) = entry.target.as_ref() else {
            return self.count(Counter::DropTargetSend, 1);
        };
        if entry.up.as_ref().is_some_and(|b| !b.fits(payload.len())) {
            // The batch cannot take it: send what is there first.
            let sent = entry.up.as_mut().map(|b| b.send(sock)).unwrap_or_default();
            self.count_up_sent(sent);
        }
        let batch = match entry.up.as_mut() {
            Some(b) => b,
            None => {
                let buf = self.up_pool.pop().unwrap_or_else(|| Vec::with_capacity(relay_udp::MAX_GSO_BYTES));
                self.dirty_up.push((serial, stream_id));
                entry.up.insert(UpBatch::new(buf))
            }
        };
        batch.push(payload);
    }

    fn count_up_sent(&self, sent: crate::upbatch::Sent) {
        self.count(Counter::DatagramsUp, sent.datagrams);
        self.count(Counter::BytesUp, sent.bytes);
        self.count(Counter::DropTargetSend, sent.dropped);
        self.count(Counter::TargetSends, sent.syscalls);
    }

    fn recycle(&mut self, batch: UpBatch) {
        if self.up_pool.len() < UP_POOL {
            self.up_pool.push(batch.into_buffer());
        }
    }

    /// Sends every target batch collected this turn.
    fn flush_up(&mut self) {
        let dirty = std::mem::take(&mut self.dirty_up);
        for (serial, stream_id) in &dirty {
            let Some(conn) = self.conns.get_mut(serial) else { continue };
            let Some(entry) = conn.tunnels.get_mut(stream_id) else { continue };
            let (Some(mut batch), Some((sock, _))) = (entry.up.take(), entry.target.as_ref()) else {
                continue;
            };
            let sent = batch.send(sock);
            self.count_up_sent(sent);
            self.recycle(batch);
        }
        let mut dirty = dirty;
        dirty.clear();
        self.dirty_up = dirty;
    }

    fn drop_conn(&mut self, mut conn: Conn) {
        for cid in &conn.cids {
            self.by_cid.remove(cid);
        }
        for (_, entry) in conn.tunnels.drain() {
            self.close_tunnel(entry);
        }
        self.count(Counter::ConnectionsClosed, 1);
        self.link.counters().sub(Counter::ConnectionsActive, 1);
    }

    fn shutdown(&mut self) {
        let serials: Vec<u64> = self.conns.keys().copied().collect();
        for serial in serials {
            if let Some(mut conn) = self.conns.remove(&serial) {
                let _ = conn.quic.close(true, h3_code::NO_ERROR, b"relay shutting down");
                self.send_packets(&mut conn);
                self.drop_conn(conn);
            }
        }
        info!(worker = self.settings.index, "worker stopped");
    }
}

/// Sends GOAWAY once on `conn`, naming the first request stream that will
/// not be processed (RFC 9114 section 5.2).
fn send_goaway(conn: &mut Conn) {
    if conn.goaway_sent {
        return;
    }
    if let Some(h3) = conn.h3.as_mut()
        && h3.send_goaway(&mut conn.quic, conn.next_request_id).is_ok()
    {
        conn.goaway_sent = true;
    }
}

//! A dataplane worker's protocol core: the QUIC connections, tunnels and
//! target flows one worker owns.
//!
//! The core never performs socket I/O after creating a socket: an I/O
//! backend ([`crate::io::uring`] or [`crate::io::epoll`]) feeds it through
//! [`Handler`] and performs the [`Output`] it queues (GSO batches of QUIC
//! packets, GSO batches of payloads for targets, target sockets to watch or
//! close). Protocol logic lives in `relay_proto` (request validation,
//! capsules, datagrams) and [`crate::tunnel`] (tunnel state).
//!
//! Per turn: the backend reads the clock once ([`Handler::begin_turn`]),
//! delivers packets, then [`Handler::end_turn`] fires due timers, sends the
//! target batches of the turn and lets every connection touched this turn
//! (and only those) write its packets.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quiche::h3::NameValue;
use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::Bootstrap;
use relay_proto::channel::record::{AuthAnswer, ConnInfo, FlowClosed, SignAnswer, SignResult, Verdict};
use relay_proto::cid::{CidLayout, Decoded};
use relay_proto::datagram;
use relay_proto::proxy_status::ProxyError;
use relay_proto::request;
use relay_proto::template::UriTemplate;
use tracing::{debug, error, info, warn};

use crate::handoff::{Handoff, Inbox};
use crate::io::{Handler, Output, Ready, TargetKey, Turn, UpSend, Wake, WatchKey};
use crate::keyless;
use crate::link::{Answer, ControlLink};
use crate::quic;
use crate::response::{self, Headers};
use crate::retry::{RetryTokens, TokenError};
use crate::slab::{Key as ConnKey, Slab};
use crate::socket;
use crate::timers::{TimerTarget, Timers};
use crate::tls::TlsShared;
use crate::tun::WorkerTun;
use relay_proto::template::IpUriTemplate;

mod bind;
mod connect_tcp;
pub mod ip;
use crate::tunnel::{DownPath, Limits, Phase, Tunnel, UpOutcome};
use crate::upbatch::UpBatch;
use bind::BoundTunnel;
pub use ip::{IpSide, IpTunnel};

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

/// The longest a backend waits without a turn, so stop requests (signals)
/// are seen promptly even when idle.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// Hand-offs taken from the inbox per turn.
const HANDOFF_BUDGET: usize = 1024;

struct TunnelEntry {
    tunnel: Tunnel,
    target: Option<TargetKey>,
    response_pending: Option<Headers>,
    /// Payloads for the target collected this turn (see [`UpBatch`]).
    up: Option<UpBatch>,
    /// Who opened it (control's quota key), reported to a restarted
    /// control with the flow.
    identity: String,
    /// A connect-ip tunnel's addresses and routes (once open).
    ip: Option<IpTunnel>,
    /// A bound connect-udp tunnel's socket and contexts (once open).
    bind: Option<Box<BoundTunnel>>,
    /// A bound request's fallback target (draft section 2), if it named one.
    bind_target: Option<SocketAddr>,
    /// The request is a classic CONNECT (RFC 9114 section 4.4).
    tcp_requested: bool,
    /// Its TCP connection, once allowed.
    tcp: Option<Box<connect_tcp::TcpTunnel>>,
}

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
    /// On the dirty list of this turn.
    dirty: bool,
    /// The QUIC timeout armed in the timer heap.
    timer: Option<Instant>,
    /// The handshake signature asked of control, if one is outstanding.
    signing: Option<u64>,
    /// This worker's serial number for it (`relayctl conns`).
    serial: u64,
    /// When it was accepted.
    accepted_at: Instant,
    /// The TLS material generation it was accepted with.
    tls_generation: u32,
}

/// What a classified request asks control.
struct TunnelAsk<'a> {
    authority: &'a str,
    path: &'a str,
    target_host: &'a str,
    target_port: u16,
    authorization: Option<&'a str>,
    protocol: relay_proto::channel::record::TunnelProtocol,
}

/// Settings a worker runs with.
pub struct WorkerSettings {
    /// Worker index.
    pub index: u32,
    /// What control sent at attach.
    pub bootstrap: Bootstrap,
    /// The parsed URI template.
    pub template: UriTemplate,
    /// The connection ID layout (QUIC-LB) shared by every worker.
    pub cids: CidLayout,
    /// The TLS material in force (replaced on reloads).
    pub tls: Arc<TlsShared>,
}

/// Process-wide flags the worker obeys.
pub struct Flags {
    /// Stop at once.
    pub stop: &'static AtomicBool,
    /// Drain gracefully.
    pub drain: &'static AtomicBool,
}

/// A worker's protocol core.
pub struct Worker {
    settings: WorkerSettings,
    flags: Flags,
    local: SocketAddr,
    quic_config: quiche::Config,
    /// The `TlsShared` epoch `quic_config` was built from.
    tls_epoch: u64,
    /// Its generation (reported in the counters).
    tls_generation: u32,
    h3_config: quiche::h3::Config,
    conns: Slab<Box<Conn>>,
    by_cid: HashMap<quiche::ConnectionId<'static>, ConnKey>,
    targets: HashMap<TargetKey, (ConnKey, u64)>,
    next_target: TargetKey,
    asks: HashMap<u64, (ConnKey, u64)>,
    /// Signing asks in flight: sign ID -> connection.
    signs: HashMap<u64, ConnKey>,
    /// Tunnels that used up their byte budget this turn.
    over_budget: Vec<(ConnKey, u64)>,
    /// `:protocol = connect-udp` is served.
    connect_udp_enabled: bool,
    /// Retry tokens (shared by the workers).
    retry: Arc<RetryTokens>,
    /// Connections accepted whose handshake has not completed.
    handshaking: usize,
    link: ControlLink,
    relink: std::sync::mpsc::Receiver<ControlLink>,
    inboxes: Arc<[Inbox]>,
    /// Workers whose bell must ring at the end of this turn.
    bells_due: Vec<usize>,
    limits: Limits,
    buf: Vec<u8>,
    dgram: Vec<u8>,
    dgram_in: Vec<u8>,
    out: Output,
    dirty: Vec<ConnKey>,
    dirty_up: Vec<(ConnKey, u64)>,
    timers: Timers,
    tunnels_open: usize,
    now: Instant,
    answers_due: bool,
    handoffs_due: bool,
    /// When a graceful drain must end.
    drain_deadline: Option<Instant>,
    stopped: bool,
    backend_gauge: u64,
    /// Incremented when control is replaced.
    link_epoch: u64,
    /// Serial number of the next accepted connection.
    next_serial: u64,
    /// connect-ip: the worker's TUN device and its tunnels' addresses.
    ip: Option<IpSide>,
    /// Bound tunnels' sockets by watch key.
    watched: HashMap<WatchKey, (ConnKey, u64)>,
    next_watch: WatchKey,
    /// Closed bound sockets, kept until the backend has forgotten them.
    closing_bound: Vec<std::net::UdpSocket>,
    /// Bound sockets with more to read than one turn's budget.
    bind_due: Vec<WatchKey>,
    /// Closed TCP target sockets, kept until the backend has forgotten them.
    closing_tcp: Vec<std::net::TcpStream>,
    /// Open TCP CONNECT tunnels on this worker's QUIC connections.
    tcp_tunnels: usize,
    /// The TCP front (HTTP/2 and HTTP/1.1), when served.
    front: Option<crate::front::Front>,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Socket or poll setup failed.
    #[error("worker I/O: {0}")]
    Io(#[from] io::Error),
    /// TLS or QUIC configuration failed (e.g. an invalid certificate chain).
    #[error(transparent)]
    Quic(#[from] quic::QuicConfigError),
    /// HTTP/3 configuration failed.
    #[error("HTTP/3 configuration: {0}")]
    H3(#[from] quiche::h3::Error),
}

/// Random connection ID nonces. BoringSSL's RAND_bytes does not fail (it
/// aborts the process if the system cannot provide entropy), so the result
/// is always filled.
fn fill_random(out: &mut [u8]) {
    let filled = boring::rand::rand_bytes(out);
    debug_assert!(filled.is_ok());
}

impl Worker {
    /// Prepares a worker serving QUIC on `local` (its socket is already
    /// bound, and owned by the backend).
    pub fn new(
        settings: WorkerSettings,
        flags: Flags,
        local: SocketAddr,
        link: ControlLink,
        relink: std::sync::mpsc::Receiver<ControlLink>,
        inboxes: Arc<[Inbox]>,
        retry: Arc<RetryTokens>,
    ) -> Result<Self, WorkerError> {
        let tls_epoch = settings.tls.epoch();
        let material = settings.tls.current();
        let quic_config = quic::transport_config(&settings.bootstrap, &material, settings.tls.tickets())?;
        let h3_config = quic::h3_config()?;
        let connect_udp_enabled =
            settings.bootstrap.protocols.contains(&relay_proto::channel::bootstrap::Protocol::ConnectUdp);
        let limits = Limits {
            max_capsule_len: settings.bootstrap.max_capsule_len as usize,
            max_queued_datagrams: settings.bootstrap.pending_datagrams_per_tunnel as usize,
            stream_out_limit: 256 * 1024,
        };
        Ok(Self {
            settings,
            flags,
            local,
            quic_config,
            tls_epoch,
            tls_generation: material.generation,
            h3_config,
            conns: Slab::new(),
            by_cid: HashMap::new(),
            targets: HashMap::new(),
            next_target: 1,
            asks: HashMap::new(),
            signs: HashMap::new(),
            over_budget: Vec::new(),
            connect_udp_enabled,
            retry,
            handshaking: 0,
            link,
            relink,
            inboxes,
            bells_due: Vec::new(),
            limits,
            buf: vec![0; 65_536],
            dgram: Vec::with_capacity(2048),
            dgram_in: vec![0; 65_536],
            out: Output::new(),
            dirty: Vec::new(),
            dirty_up: Vec::new(),
            timers: Timers::new(),
            tunnels_open: 0,
            now: Instant::now(),
            answers_due: true,
            handoffs_due: true,
            drain_deadline: None,
            stopped: false,
            backend_gauge: 0,
            link_epoch: 0,
            next_serial: 1,
            ip: None,
            watched: HashMap::new(),
            next_watch: 1,
            closing_bound: Vec::new(),
            bind_due: Vec::new(),
            closing_tcp: Vec::new(),
            tcp_tunnels: 0,
            front: None,
        })
    }

    /// The worker's index.
    pub fn index(&self) -> u32 {
        self.settings.index
    }

    fn count(&self, c: Counter, n: u64) {
        self.link.counters().add(c, n);
    }

    /// Serves connect-ip through `tun` (the worker's own device), for
    /// requests matching `template`.
    pub fn set_tun(&mut self, tun: WorkerTun, template: IpUriTemplate) {
        self.ip = Some(IpSide::new(tun, template));
    }

    /// Serves the TCP front too: its listeners are watched from the first
    /// turn.
    pub fn set_front(&mut self, mut front: crate::front::Front) {
        front.start(&mut self.out);
        self.front = Some(front);
    }

    /// Runs `f` on the TCP front with the worker's shared parts.
    fn with_front<R>(
        &mut self,
        f: impl FnOnce(&mut crate::front::Front, &mut crate::front::Ctx<'_>) -> R,
    ) -> Option<R> {
        let front = self.front.as_mut()?;
        let mut ctx = crate::front::Ctx {
            link: &mut self.link,
            out: &mut self.out,
            now: self.now,
            next_target: &mut self.next_target,
            draining: self.drain_deadline.is_some(),
            ip: self.ip.as_mut(),
        };
        Some(f(front, &mut ctx))
    }

    /// Records which backend serves this worker (a gauge in the counters,
    /// restored when control is replaced).
    pub fn set_backend_gauge(&mut self, value: u64) {
        self.backend_gauge = value;
        self.link.counters().set(Counter::IoBackend, value);
        self.link.counters().set(Counter::TlsGeneration, u64::from(self.tls_generation));
    }

    fn gso(&self) -> bool {
        relay_udp::gso_enabled()
    }

    /// Takes a connection out of the slab to work on it.
    fn take_conn(&mut self, key: ConnKey) -> Option<Box<Conn>> {
        self.conns.take(key)
    }

    /// Puts a connection back and puts it on this turn's dirty list: it may
    /// have packets to send.
    fn put_conn(&mut self, key: ConnKey, mut conn: Box<Conn>) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        self.conns.put(key, conn);
    }

    fn on_quic_packet(&mut self, pkt: &mut [u8], from: SocketAddr) {
        let hdr = match quiche::Header::from_slice(pkt, self.settings.cids.cid_len()) {
            Ok(h) => h,
            Err(_) => return self.count(Counter::DropNoConnection, 1),
        };
        let key = match self.by_cid.get(&hdr.dcid) {
            Some(k) => *k,
            None => {
                if hdr.ty != quiche::Type::Initial {
                    // Not ours: maybe another worker's (the client's address
                    // changed and the kernel picked our socket).
                    if let Decoded::Worker(w) = self.settings.cids.decode(&hdr.dcid) {
                        let w = usize::from(w);
                        if w != self.settings.index as usize && w < self.inboxes.len() {
                            return self.hand_off(w, pkt, from);
                        }
                    }
                    return self.count(Counter::DropNoConnection, 1);
                }
                match self.accept(&hdr, from) {
                    Some(k) => k,
                    None => return,
                }
            }
        };
        let Some(mut conn) = self.take_conn(key) else { return };
        let info = quiche::RecvInfo { from, to: self.local };
        match conn.quic.recv(pkt, info) {
            Ok(_) => self.process_conn(key, &mut conn),
            Err(e) => debug!("QUIC recv: {e}"),
        }
        self.ask_signatures(key, &mut conn);
        self.put_conn(key, conn);
    }

    fn accept(&mut self, hdr: &quiche::Header<'_>, from: SocketAddr) -> Option<ConnKey> {
        if !quiche::version_is_supported(hdr.version) {
            let space = self.out.quic_space();
            if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, space) {
                let gso = self.gso();
                self.out.quic_commit(n, from, gso);
                self.out.finish_quic();
            }
            return None;
        }
        if self.conns.len() >= self.settings.bootstrap.max_connections_per_worker as usize
            || self.drain_deadline.is_some()
        {
            return None;
        }
        let worker = self.settings.index as u8;
        let token = hdr.token.as_deref().unwrap_or(&[]);
        // RFC 9000 section 8.1.2: with a valid Retry token the client has
        // proven its address; the connection keeps the connection ID we
        // chose in the Retry (it names this worker) and reports the
        // original one in its transport parameters.
        let (scid, retried_odcid) = match self.retry.validate(token, from) {
            Ok(odcid) => (hdr.dcid.clone().into_owned(), Some(quiche::ConnectionId::from_vec(odcid))),
            Err(TokenError::BadMac) => {
                // Forged, or minted for another address: no state for it.
                self.count(Counter::RetryTokensInvalid, 1);
                return None;
            }
            // No token (or an expired or foreign one: treated as none,
            // section 8.1.3): Retry when many handshakes are in progress.
            Err(_) if self.handshaking >= self.settings.bootstrap.retry_threshold as usize => {
                self.send_retry(hdr, from);
                return None;
            }
            Err(_) => {
                let scid = self.settings.cids.generate_with(worker, fill_random);
                (quiche::ConnectionId::from_vec(scid.as_bytes().to_vec()), None)
            }
        };
        let odcid = match &retried_odcid {
            Some(original) => original.clone(),
            None => hdr.dcid.clone().into_owned(),
        };
        let accepted = quiche::accept(&scid, retried_odcid.as_ref(), self.local, from, &mut self.quic_config);
        let quic = match accepted {
            Ok(c) => c,
            Err(e) => {
                debug!("accept failed: {e}");
                return None;
            }
        };
        let key = self.conns.insert(Box::new(Conn {
            quic,
            h3: None,
            cids: vec![scid.clone(), odcid.clone()],
            tunnels: HashMap::new(),
            settings_known: false,
            established_counted: false,
            peer: from,
            next_request_id: 0,
            goaway_sent: false,
            dirty: false,
            timer: None,
            signing: None,
            serial: self.next_serial,
            accepted_at: self.now,
            tls_generation: self.tls_generation,
        }));
        self.next_serial += 1;
        self.by_cid.insert(scid, key);
        self.by_cid.insert(odcid, key);
        self.handshaking += 1;
        self.count(Counter::ConnectionsAccepted, 1);
        self.count(Counter::ConnectionsActive, 1);
        Some(key)
    }

    /// Answers a token-less Initial with a Retry carrying a token and a
    /// connection ID of this worker.
    fn send_retry(&mut self, hdr: &quiche::Header<'_>, from: SocketAddr) {
        let new_scid = self.settings.cids.generate_with(self.settings.index as u8, fill_random);
        let new_scid = quiche::ConnectionId::from_ref(new_scid.as_bytes());
        let token = self.retry.mint(from, &hdr.dcid);
        let space = self.out.quic_space();
        match quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, space) {
            Ok(n) => {
                let gso = self.gso();
                self.out.quic_commit(n, from, gso);
                self.out.finish_quic();
                self.count(Counter::RetriesSent, 1);
            }
            Err(e) => debug!("cannot build a Retry: {e}"),
        }
    }

    /// Sends the signing asks the connection's handshake made (keyless
    /// TLS). Returns whether one failed at once, so the handshake must be
    /// driven again to fail cleanly.
    fn ask_signatures(&mut self, key: ConnKey, conn: &mut Conn) -> bool {
        // Only handshakes sign: established connections skip the
        // thread-local lookup on their per-packet path.
        if conn.established_counted {
            return false;
        }
        let mut failed = false;
        for req in keyless::take_requests() {
            let id = req.sign_id;
            if let Some(old) = conn.signing.replace(id) {
                // A handshake signs once; a second ask replaces the first.
                self.signs.remove(&old);
                keyless::forget(old);
            }
            match self.link.sign(id, req.generation, req.algorithm, req.input) {
                Ok(()) => {
                    self.signs.insert(id, key);
                    let timeout = Duration::from_millis(u64::from(self.settings.bootstrap.ask_timeout_ms));
                    self.timers.push(self.now + timeout, TimerTarget::Sign(key, id));
                    self.count(Counter::SignsSent, 1);
                }
                Err(e) => {
                    debug!("handshake signature not asked: {e}");
                    conn.signing = None;
                    keyless::deliver(id, None);
                    self.count(Counter::SignsFailed, 1);
                    failed = true;
                }
            }
        }
        failed
    }

    /// Control's signature arrived: the handshake resumes when its
    /// connection sends (this turn).
    fn on_sign_answer(&mut self, answer: SignAnswer) {
        if !self.signs.contains_key(&answer.sign_id)
            && self.front.as_ref().is_some_and(|f| f.owns_sign(answer.sign_id))
        {
            let id = answer.sign_id;
            let signature = match answer.result {
                SignResult::Signature(sig) => Some(sig),
                SignResult::Failed(why) => {
                    warn!("control could not sign a TCP handshake: {why}");
                    self.count(Counter::SignsFailed, 1);
                    None
                }
            };
            self.with_front(|f, ctx| f.on_sign(ctx, id, signature));
            return;
        }
        let Some(key) = self.signs.remove(&answer.sign_id) else {
            return; // the connection is gone, or the ask timed out
        };
        let signature = match answer.result {
            SignResult::Signature(sig) => Some(sig),
            SignResult::Failed(why) => {
                warn!("control could not sign a handshake: {why}");
                self.count(Counter::SignsFailed, 1);
                None
            }
        };
        keyless::deliver(answer.sign_id, signature);
        if let Some(mut conn) = self.take_conn(key) {
            if conn.signing == Some(answer.sign_id) {
                conn.signing = None;
            }
            self.put_conn(key, conn);
        }
    }

    /// Fails a signing ask (no answer in time, or control replaced): the
    /// handshake ends with an alert instead of hanging.
    fn fail_sign(&mut self, sign_id: u64) {
        let Some(key) = self.signs.remove(&sign_id) else { return };
        keyless::deliver(sign_id, None);
        self.count(Counter::SignsFailed, 1);
        if let Some(mut conn) = self.take_conn(key) {
            conn.signing = None;
            self.put_conn(key, conn);
        }
    }

    /// Ends the tunnels that used up their byte budget (a quota's
    /// remainder): FIN on our side and stop reading, like an idle timeout.
    fn end_over_budget(&mut self) {
        for (key, stream_id) in std::mem::take(&mut self.over_budget) {
            let Some(mut conn) = self.take_conn(key) else { continue };
            if let Some(entry) = conn.tunnels.remove(&stream_id) {
                debug!(stream_id, "tunnel used up its byte budget");
                self.count(Counter::TunnelsOverBudget, 1);
                if let Some(h3) = conn.h3.as_mut() {
                    let _ = h3.send_body(&mut conn.quic, stream_id, &[], true);
                }
                let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::NO_ERROR);
                self.close_tunnel(entry);
            }
            self.put_conn(key, conn);
        }
    }

    /// Copies a packet into the owning worker's inbox.
    fn hand_off(&mut self, worker: usize, pkt: &[u8], from: SocketAddr) {
        if self.inboxes[worker].push(Handoff { packet: pkt.to_vec(), from }) {
            self.count(Counter::HandoffsOut, 1);
            if !self.bells_due.contains(&worker) {
                self.bells_due.push(worker);
            }
        } else {
            self.count(Counter::DropHandoffFull, 1);
        }
    }

    fn take_handoffs(&mut self) {
        let me = self.settings.index as usize;
        let mut taken = 0;
        while taken < HANDOFF_BUDGET {
            let Some(mut h) = self.inboxes[me].pop() else {
                self.handoffs_due = false;
                return;
            };
            taken += 1;
            self.count(Counter::HandoffsIn, 1);
            self.on_quic_packet(&mut h.packet, h.from);
        }
        self.handoffs_due = !self.inboxes[me].is_empty();
    }

    fn process_conn(&mut self, key: ConnKey, conn: &mut Conn) {
        // Path events (a client's address changed) need no action: quiche
        // validates and migrates by itself. Drain them so they cannot pile
        // up.
        while conn.quic.path_event_next().is_some() {}
        if conn.quic.is_established() && !conn.established_counted {
            conn.established_counted = true;
            self.handshaking = self.handshaking.saturating_sub(1);
            self.count(Counter::HandshakesCompleted, 1);
            if conn.quic.is_resumed() {
                self.count(Counter::HandshakesResumed, 1);
            }
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
                    self.on_request(key, conn, stream_id, &list, more_frames)
                }
                (stream_id, quiche::h3::Event::Data) => self.on_stream_data(key, conn, stream_id),
                (stream_id, quiche::h3::Event::Finished) => self.on_stream_finished(key, conn, stream_id),
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
                    self.send_down(conn, id, &payload);
                }
            }
        }
        self.read_datagrams(key, conn);
    }

    fn read_datagrams(&mut self, key: ConnKey, conn: &mut Conn) {
        // The buffer is taken out of `self` so payloads can be borrowed from
        // it while the worker queues them.
        let mut buf = std::mem::take(&mut self.dgram_in);
        let now = self.now;
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
            let bind = entry.bind.is_some();
            self.forward_up(key, stream_id, entry, outcome, d.payload);
            if bind && let Some(code) = self.bind_from_client(key, conn, stream_id) {
                self.abort_tunnel(conn, stream_id, code);
            }
        }
        self.dgram_in = buf;
    }

    fn on_request(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        stream_id: u64,
        list: &[quiche::h3::Header],
        more_frames: bool,
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
        if req.method == "CONNECT" && req.protocol.is_none() {
            return self.on_connect_tcp_request(key, conn, stream_id, &req, more_frames);
        }
        if req.protocol.as_deref() == Some("connect-ip") {
            return self.on_connect_ip_request(key, conn, stream_id, &req, more_frames);
        }
        // Bound connect-udp, when served; otherwise the field is ignored and
        // the request is plain connect-udp (draft section 6: the extension
        // is on only when both sides sent the field).
        if req.protocol.as_deref() == Some("connect-udp")
            && self.settings.bootstrap.bind.is_some()
            && request::request_wants_bind(&req)
        {
            return self.on_bind_request(key, conn, stream_id, &req, more_frames);
        }
        if req.protocol.as_deref() == Some("connect-udp") && !self.connect_udp_enabled {
            // RFC 8441 section 4: an unsupported :protocol SHOULD get 501.
            return self.refuse(conn, stream_id, 501, None, "connect-udp is not enabled on this relay");
        }
        let connect = match request::classify_connect_udp(&req, &self.settings.template) {
            Ok(c) => c,
            Err(refusal) => {
                return self.refuse(conn, stream_id, refusal.status, refusal.proxy_error, refusal.reason);
            }
        };
        let target_host = match &connect.target_host {
            relay_proto::target::TargetHost::Ip(ip) => ip.to_string(),
            relay_proto::target::TargetHost::Name(n) => n.clone(),
        };
        let ask = TunnelAsk {
            authority: &connect.authority,
            path: &connect.path,
            target_host: &target_host,
            target_port: connect.target_port,
            authorization: connect.authorization.as_deref(),
            protocol: relay_proto::channel::record::TunnelProtocol::ConnectUdp,
        };
        self.start_tunnel(key, conn, stream_id, more_frames, ask);
    }

    /// Asks control about a classified request and, while it decides,
    /// keeps the request as a pending tunnel.
    fn start_tunnel(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        stream_id: u64,
        more_frames: bool,
        ask: TunnelAsk<'_>,
    ) {
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
        let asked = self.link.ask(crate::link::AuthRequest {
            client: conn.peer,
            authority: ask.authority.to_string(),
            path: ask.path.to_string(),
            target_host: ask.target_host.to_string(),
            target_port: ask.target_port,
            authorization: ask.authorization.map(str::to_string),
            protocol: ask.protocol,
        });
        let ask_id = match asked {
            Ok(id) => id,
            Err(e) => {
                let (status, proxy_error, reason) = e.refusal();
                if e.is_control_failure() {
                    self.count(Counter::AsksFailed, 1);
                }
                return self.refuse(conn, stream_id, status, proxy_error, reason);
            }
        };
        let timeout = Duration::from_millis(u64::from(self.settings.bootstrap.ask_timeout_ms));
        let tunnel = if ask.protocol == relay_proto::channel::record::TunnelProtocol::ConnectIp {
            Tunnel::pending_ip(stream_id, ask_id, self.now, timeout, self.limits)
        } else if ask.protocol == relay_proto::channel::record::TunnelProtocol::ConnectUdpBind {
            Tunnel::pending_bind(
                stream_id,
                ask_id,
                self.now,
                timeout,
                self.limits,
                relay_proto::bind::BIND_CAPSULES,
            )
        } else {
            Tunnel::pending(stream_id, ask_id, self.now, timeout, self.limits)
        };
        self.timers.push(tunnel.deadline(), TimerTarget::Tunnel(key, stream_id));
        conn.tunnels.insert(
            stream_id,
            TunnelEntry {
                tunnel,
                target: None,
                response_pending: None,
                up: None,
                identity: String::new(),
                ip: None,
                bind: None,
                bind_target: None,
                tcp_requested: ask.protocol == relay_proto::channel::record::TunnelProtocol::ConnectTcp,
                tcp: None,
            },
        );
        self.asks.insert(ask_id, (key, stream_id));
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
        self.refuse_with(conn, stream_id, status, proxy_error, reason, None);
    }

    /// [`Self::refuse`], with a `Retry-After` of `retry_after` seconds.
    fn refuse_with(
        &mut self,
        conn: &mut Conn,
        stream_id: u64,
        status: u16,
        proxy_error: Option<ProxyError>,
        reason: &str,
        retry_after: Option<u32>,
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
        let mut headers = headers;
        if let Some(secs) = retry_after {
            headers.push(response::retry_after(secs));
        }
        let Some(h3) = conn.h3.as_mut() else { return };
        if h3.send_response(&mut conn.quic, stream_id, &headers, true).is_err() {
            let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Write, h3_code::INTERNAL_ERROR);
        }
        // RFC 9114 section 4.1: a server that does not need the rest of the
        // request aborts reading with H3_NO_ERROR.
        let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::NO_ERROR);
    }

    fn on_stream_data(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64) {
        if conn.tunnels.get(&stream_id).is_some_and(|e| e.tcp_requested) {
            // TCP bytes stay in quiche (its flow control holds the client)
            // until the target connection takes them.
            return self.pump_tcp(key, conn, stream_id);
        }
        let now = self.now;
        loop {
            let Some(h3) = conn.h3.as_mut() else { return };
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
                self.forward_up(key, stream_id, entry, outcome, &payload);
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
            let (is_ip, is_bind) = (entry.tunnel.is_ip(), entry.bind.is_some());
            if is_ip && !self.ip_capsules(conn, stream_id) {
                self.abort_tunnel(conn, stream_id, h3_code::MESSAGE_ERROR);
                return;
            }
            if is_bind && let Some(code) = self.bind_from_client(key, conn, stream_id) {
                self.abort_tunnel(conn, stream_id, code);
                return;
            }
        }
    }

    fn on_stream_finished(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64) {
        let Some(entry) = conn.tunnels.get(&stream_id) else { return };
        if entry.tcp.is_some() {
            return self.tcp_client_fin(key, conn, stream_id);
        }
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

    fn close_tunnel(&mut self, mut entry: TunnelEntry) {
        match entry.tunnel.phase {
            Phase::Pending { ask_id, .. } => {
                self.asks.remove(&ask_id);
                self.link.cancel(ask_id);
            }
            Phase::Open { flow_id, .. } => {
                if let Some(t) = entry.ip.take() {
                    self.ip_unregister(&t);
                }
                if let Some(t) = entry.tcp.take() {
                    self.release_tcp(*t);
                }
                if let Some(b) = entry.bind.take() {
                    self.watched.remove(&b.watch);
                    self.bind_due.retain(|w| *w != b.watch);
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&b.socket);
                    if let Some(i) = self.out.watches.iter().position(|w| w.key == b.watch) {
                        // Never handed to the backend: nothing to forget.
                        self.out.watches.swap_remove(i);
                    } else {
                        self.out.unwatches.push((b.watch, fd));
                    }
                    self.closing_bound.push(b.socket);
                }
                if let (Some(batch), Some(key)) = (entry.up.take(), entry.target) {
                    self.queue_up(key, batch);
                }
                if let Some(key) = entry.target {
                    self.targets.remove(&key);
                    self.out.closes.push(key);
                }
                self.link.flow_closed(entry.tunnel.totals.closed(flow_id));
                self.tunnels_open -= 1;
                self.count(Counter::TunnelsClosed, 1);
                self.link.counters().sub(Counter::TunnelsActive, 1);
            }
        }
    }

    fn on_answer(&mut self, answer: AuthAnswer) {
        if !self.asks.contains_key(&answer.ask_id)
            && self.front.as_ref().is_some_and(|f| f.owns_ask(answer.ask_id))
        {
            let (id, verdict) = (answer.ask_id, answer.verdict);
            self.with_front(|f, ctx| f.on_answer(ctx, id, verdict));
            return;
        }
        let Some((key, stream_id)) = self.asks.remove(&answer.ask_id) else {
            // The request is gone (timed out, reset, connection closed).
            if let Verdict::Allow { flow_id, .. }
            | Verdict::AllowIp { flow_id, .. }
            | Verdict::AllowBind { flow_id, .. } = answer.verdict
            {
                self.link.flow_closed(FlowClosed::unused(flow_id));
            }
            return;
        };
        let Some(mut conn) = self.take_conn(key) else { return };
        self.apply_answer(key, &mut conn, stream_id, answer.verdict);
        self.put_conn(key, conn);
    }

    fn apply_answer(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64, verdict: Verdict) {
        if !conn.tunnels.contains_key(&stream_id) {
            if let Verdict::Allow { flow_id, .. }
            | Verdict::AllowIp { flow_id, .. }
            | Verdict::AllowBind { flow_id, .. } = verdict
            {
                self.link.flow_closed(FlowClosed::unused(flow_id));
            }
            return;
        }
        match verdict {
            Verdict::AllowBind { flow_id, idle_timeout_ms, byte_budget, identity, peers } => {
                let target = conn.tunnels.get(&stream_id).and_then(|e| e.bind_target);
                let grant =
                    bind::BindGrant { flow_id, idle_timeout_ms, byte_budget, identity, peers, target };
                self.open_bound(key, conn, stream_id, grant);
            }
            Verdict::AllowIp { flow_id, idle_timeout_ms, byte_budget, identity, addresses, routes } => {
                let config = IpTunnel::from_allow(&addresses, &routes);
                let (Some(mut config), true) = (config, self.ip.is_some()) else {
                    conn.tunnels.remove(&stream_id);
                    self.link.flow_closed(FlowClosed::unused(flow_id));
                    return self.refuse(
                        conn,
                        stream_id,
                        503,
                        Some(ProxyError::ProxyInternalError),
                        "connect-ip is not available on this worker",
                    );
                };
                // RFC 9484 section 7.2: an IPv6 tunnel must carry 1280-byte
                // packets; if QUIC datagrams cannot, the stream is aborted.
                let v6 = config.addresses.iter().any(|p| p.addr.is_ipv6());
                let room = conn.quic.dgram_max_writable_len().map(|m| m.saturating_sub(9));
                if v6 && room.is_some_and(|r| r < 1280) {
                    conn.tunnels.remove(&stream_id);
                    self.link.flow_closed(FlowClosed::unused(flow_id));
                    debug!(stream_id, ?room, "QUIC path too small for IPv6's minimum MTU");
                    return self.refuse(
                        conn,
                        stream_id,
                        502,
                        Some(ProxyError::ProxyInternalError),
                        "the QUIC path cannot carry 1280-byte IPv6 packets",
                    );
                }
                self.ip_register(key, stream_id, &mut config);
                let now = self.now;
                let unspecified = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0);
                let entry = conn.tunnels.get_mut(&stream_id).expect("checked above");
                let early = entry.tunnel.open(
                    flow_id,
                    unspecified,
                    Duration::from_millis(u64::from(idle_timeout_ms)),
                    byte_budget,
                    now,
                );
                entry.identity = identity;
                if !entry.tunnel.push_raw_capsule(&config.opening_capsules()) {
                    self.count(Counter::DropQueueFull, 1);
                }
                entry.ip = Some(config);
                self.tunnels_open += 1;
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
                    self.forward_up(key, stream_id, entry, UpOutcome::Forward, &payload);
                }
                // Address requests that arrived before the allow.
                if !self.ip_capsules(conn, stream_id) {
                    self.abort_tunnel(conn, stream_id, h3_code::MESSAGE_ERROR);
                }
            }
            Verdict::Deny { status, proxy_error, details, retry_after_secs } => {
                conn.tunnels.remove(&stream_id);
                let retry_after = (retry_after_secs > 0).then_some(retry_after_secs);
                self.refuse_with(conn, stream_id, status, proxy_error, &details, retry_after);
            }
            Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity }
                if conn.tunnels.get(&stream_id).is_some_and(|e| e.tcp_requested) =>
            {
                self.open_tcp(
                    key,
                    conn,
                    stream_id,
                    (flow_id, target, idle_timeout_ms, byte_budget, identity),
                );
            }
            Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity } => {
                let sock = match socket::connected_target(target) {
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
                let target_key = self.next_target;
                self.next_target += 1;
                self.out.opens.push((target_key, sock));
                self.targets.insert(target_key, (key, stream_id));
                let now = self.now;
                let entry = conn.tunnels.get_mut(&stream_id).expect("checked above");
                let early = entry.tunnel.open(
                    flow_id,
                    target,
                    Duration::from_millis(u64::from(idle_timeout_ms)),
                    byte_budget,
                    now,
                );
                entry.target = Some(target_key);
                entry.identity = identity;
                self.tunnels_open += 1;
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
                    self.forward_up(key, stream_id, entry, UpOutcome::Forward, &payload);
                }
            }
        }
    }

    /// Sends one target payload towards the client on the tunnel's path.
    fn send_down(&mut self, conn: &mut Conn, stream_id: u64, payload: &[u8]) {
        self.send_down_ctx(conn, stream_id, datagram::UDP_PAYLOAD_CONTEXT, payload);
    }

    /// Sends one payload with `context_id` towards the client on the
    /// tunnel's path.
    fn send_down_ctx(&mut self, conn: &mut Conn, stream_id: u64, context_id: u64, payload: &[u8]) {
        let peer_dgrams = conn.h3.as_ref().is_some_and(|h| h.dgram_enabled_by_peer(&conn.quic));
        let settings_known = conn.settings_known;
        let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return };
        match entry.tunnel.down_path(settings_known, peer_dgrams) {
            DownPath::Wait => {
                // Only context-0 payloads wait (queued payloads are sent
                // with context 0 later); others are dropped.
                if context_id != datagram::UDP_PAYLOAD_CONTEXT || !entry.tunnel.queue_down(payload) {
                    self.count(Counter::DropQueueFull, 1);
                }
            }
            DownPath::QuicDatagram => {
                datagram::encode_into(stream_id, context_id, payload, &mut self.dgram);
                if conn.quic.dgram_max_writable_len().is_none_or(|max| self.dgram.len() > max) {
                    self.count(Counter::DropTooLarge, 1);
                    return;
                }
                match conn.quic.dgram_send(&self.dgram) {
                    Ok(()) => {
                        entry.tunnel.on_down(payload.len(), self.now);
                        self.count(Counter::DatagramsDown, 1);
                        self.count(Counter::BytesDown, payload.len() as u64);
                    }
                    Err(_) => self.count(Counter::DropQueueFull, 1),
                }
                if entry.tunnel.over_budget() {
                    let key = self.conn_key_of(conn);
                    self.note_over_budget(key, stream_id);
                }
            }
            DownPath::Capsule => {
                if entry.tunnel.push_capsule_ctx(context_id, payload) {
                    entry.tunnel.on_down(payload.len(), self.now);
                    self.count(Counter::DatagramsDown, 1);
                    self.count(Counter::BytesDown, payload.len() as u64);
                } else {
                    self.count(Counter::DropQueueFull, 1);
                }
                if entry.tunnel.over_budget() {
                    let key = self.conn_key_of(conn);
                    self.note_over_budget(key, stream_id);
                }
            }
        }
    }

    /// Fires the timers due at `now`: QUIC timeouts, ask deadlines (503),
    /// idle tunnels (closed from our side).
    fn fire_timers(&mut self) {
        let now = self.now;
        while let Some((at, target)) = self.timers.pop_due(now) {
            match target {
                TimerTarget::Conn(key) => {
                    let armed = self.conns.get(key).is_some_and(|c| c.timer == Some(at));
                    if !armed {
                        continue; // stale: the connection re-armed or closed
                    }
                    let Some(mut conn) = self.take_conn(key) else { continue };
                    conn.timer = None;
                    conn.quic.on_timeout();
                    self.put_conn(key, conn);
                }
                TimerTarget::Tunnel(key, stream_id) => self.check_tunnel_deadline(key, stream_id),
                TimerTarget::Sign(_, sign_id) => {
                    if self.signs.contains_key(&sign_id) {
                        debug!(sign_id, "control did not sign in time");
                        self.fail_sign(sign_id);
                    }
                }
            }
        }
        let live = self.conns.len() + self.tunnels_open + self.asks.len() + self.signs.len();
        if self.timers.len() > 4 * live + 4096 {
            self.compact_timers();
        }
    }

    fn check_tunnel_deadline(&mut self, key: ConnKey, stream_id: u64) {
        let now = self.now;
        let Some(deadline) =
            self.conns.get(key).and_then(|c| c.tunnels.get(&stream_id)).map(|e| e.tunnel.deadline())
        else {
            return; // the tunnel is gone
        };
        if deadline > now {
            // Traffic moved the deadline: wait again.
            return self.timers.push(deadline, TimerTarget::Tunnel(key, stream_id));
        }
        let Some(mut conn) = self.take_conn(key) else { return };
        if let Some(entry) = conn.tunnels.remove(&stream_id) {
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
                Phase::Open { .. } if entry.tcp.as_ref().is_some_and(|t| t.connecting()) => {
                    conn.tunnels.insert(stream_id, entry);
                    self.tcp_connect_timeout(&mut conn, stream_id);
                }
                Phase::Open { .. } => {
                    // Idle: end the tunnel cleanly from our side.
                    self.end_open_tunnel(&mut conn, stream_id, entry);
                }
            }
        }
        self.put_conn(key, conn);
    }

    /// Ends an open tunnel from the relay's side: FIN on the request stream
    /// (RFC 9298 section 3.1: closing the socket closes the stream), stop
    /// reading, release the target socket and report the flow.
    fn end_open_tunnel(&mut self, conn: &mut Conn, stream_id: u64, entry: TunnelEntry) {
        if let Some(h3) = conn.h3.as_mut() {
            let _ = h3.send_body(&mut conn.quic, stream_id, &[], true);
        }
        let _ = conn.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, h3_code::NO_ERROR);
        self.close_tunnel(entry);
    }

    /// The OS says a target socket is no longer usable (an ICMP
    /// Destination Unreachable turned into ECONNREFUSED, EHOSTUNREACH or
    /// ENETUNREACH on the connected socket): RFC 9298 section 3.1 says the
    /// proxy MUST close the request stream.
    fn target_unusable(&mut self, key: TargetKey, errno: i32) {
        let Some(&(conn_key, stream_id)) = self.targets.get(&key) else { return };
        let Some(mut conn) = self.take_conn(conn_key) else { return };
        if let Some(entry) = conn.tunnels.remove(&stream_id) {
            debug!(stream_id, errno, "target unreachable: closing the tunnel");
            self.count(Counter::TunnelsTargetUnreachable, 1);
            self.end_open_tunnel(&mut conn, stream_id, entry);
        }
        self.put_conn(conn_key, conn);
    }

    /// Drops stale timer entries.
    fn compact_timers(&mut self) {
        let conns = &self.conns;
        let signs = &self.signs;
        self.timers.retain(|at, target| match target {
            TimerTarget::Conn(key) => conns.get(key).is_some_and(|c| c.timer == Some(at)),
            TimerTarget::Tunnel(key, stream) => {
                conns.get(key).is_some_and(|c| c.tunnels.contains_key(&stream))
            }
            TimerTarget::Sign(_, sign_id) => signs.contains_key(&sign_id),
        });
    }

    /// Lets every connection touched this turn write what it has.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            let Some(mut conn) = self.conns.take(key) else { continue };
            conn.dirty = false;
            // While control signs, nothing of the handshake leaves: were the
            // ServerHello out, the client would drop its Initial keys and
            // could not read a CONNECTION_CLOSE if signing then fails
            // (quiche sends it in an Initial packet; RFC 9000 section
            // 10.2.3). The whole flight goes out once the signature is in.
            if conn.signing.is_none() {
                self.flush_streams(&mut conn);
                self.pump_conn_tcp(key, &mut conn);
                self.send_packets(&mut conn);
                if self.ask_signatures(key, &mut conn) {
                    // Signing failed at once (control gone): let the
                    // handshake fail now, with its CONNECTION_CLOSE.
                    self.send_packets(&mut conn);
                }
            }
            if conn.quic.is_closed() {
                self.conns.release(key);
                self.drop_conn(conn);
                continue;
            }
            let timeout = conn.quic.timeout_instant();
            if timeout != conn.timer {
                conn.timer = timeout;
                if let Some(at) = timeout {
                    self.timers.push(at, TimerTarget::Conn(key));
                }
            }
            self.conns.put(key, conn);
        }
        // Work done while flushing (closing tunnels) never re-dirties a
        // connection, so the list is empty: keep its allocation.
        if self.dirty.is_empty() {
            self.dirty = dirty;
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

    /// Writes what quiche has for `conn` into GSO batches.
    fn send_packets(&mut self, conn: &mut Conn) {
        let gso = self.gso();
        let mut failed = false;
        loop {
            let space = self.out.quic_space();
            let (n, info) = match conn.quic.send(space) {
                Ok(v) => v,
                Err(quiche::Error::Done) => break,
                Err(e) if !failed => {
                    // A failed handshake (e.g. no signature from control)
                    // leaves quiche with its TLS alert to send; anything
                    // else closes with INTERNAL_ERROR. Either way the
                    // CONNECTION_CLOSE goes out now, not at the next timer.
                    debug!("QUIC send: {e}");
                    failed = true;
                    let _ = conn.quic.close(false, 0x1, b"internal error");
                    continue;
                }
                Err(e) => {
                    debug!("QUIC send after close: {e}");
                    break;
                }
            };
            self.out.quic_commit(n, info.to, gso);
        }
        self.out.finish_quic();
    }

    /// Accounts one client payload and queues it for the target's batch of
    /// this turn (sent at the end of the turn).
    fn forward_up(
        &mut self,
        conn: ConnKey,
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
        let target = entry.target;
        if target.is_none() && entry.ip.is_none() {
            return self.out.stats.drop_target_send += 1;
        }
        if entry.tunnel.over_budget() {
            // This payload still goes out; the tunnel ends this turn.
            self.note_over_budget(conn, stream_id);
        }
        if let Some(t) = entry.ip.as_ref() {
            return self.ip_up(conn, stream_id, t, payload);
        }
        let Some(key) = target else { return };
        let gso = self.gso();
        if entry.up.as_ref().is_some_and(|b| !b.fits(payload.len(), gso)) {
            // The batch cannot take it: send what is there first.
            let full = entry.up.take().expect("checked");
            self.queue_up(key, full);
        }
        let batch = match entry.up.as_mut() {
            Some(b) => b,
            None => {
                let buf = self.out.buffer();
                self.dirty_up.push((conn, stream_id));
                entry.up.insert(UpBatch::new(buf))
            }
        };
        batch.push(payload);
    }

    fn note_over_budget(&mut self, conn: ConnKey, stream_id: u64) {
        if !self.over_budget.contains(&(conn, stream_id)) {
            self.over_budget.push((conn, stream_id));
        }
    }

    /// The slab key of a connection taken out of the slab.
    fn conn_key_of(&self, conn: &Conn) -> ConnKey {
        self.by_cid.get(&conn.cids[0]).copied().unwrap_or(u64::MAX)
    }

    fn queue_up(&mut self, key: TargetKey, batch: UpBatch) {
        if batch.is_empty() {
            return self.out.recycle(batch.into_buffer());
        }
        let (buf, segment_size, segments) = batch.into_parts();
        self.out.up.push(UpSend { key, buf, segment_size, segments });
    }

    /// Queues every target batch collected this turn.
    fn flush_up(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty_up);
        for (conn, stream_id) in dirty.drain(..) {
            let Some(entry) = self.conns.get_mut(conn).and_then(|c| c.tunnels.get_mut(&stream_id)) else {
                continue;
            };
            let (Some(batch), Some(key)) = (entry.up.take(), entry.target) else { continue };
            self.queue_up(key, batch);
        }
        self.dirty_up = dirty;
    }

    fn drop_conn(&mut self, mut conn: Box<Conn>) {
        for cid in &conn.cids {
            self.by_cid.remove(cid);
        }
        if let Some(sign_id) = conn.signing.take() {
            self.signs.remove(&sign_id);
            keyless::forget(sign_id);
        }
        if !conn.established_counted {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        for (_, entry) in conn.tunnels.drain() {
            self.close_tunnel(entry);
        }
        self.count(Counter::ConnectionsClosed, 1);
        self.link.counters().sub(Counter::ConnectionsActive, 1);
    }

    /// Closes every connection (the last turn).
    fn shutdown(&mut self) {
        for key in self.conns.keys() {
            if let Some(mut conn) = self.conns.take(key) {
                let _ = conn.quic.close(true, h3_code::NO_ERROR, b"relay shutting down");
                self.send_packets(&mut conn);
                self.conns.release(key);
                self.drop_conn(conn);
            }
        }
        self.with_front(|f, ctx| f.shutdown(ctx));
        self.flush_up();
        info!(worker = self.settings.index, "worker stopped");
    }

    /// Switches to the channel of a control that attached after the
    /// previous one went away: asks sent to the dead control are answered
    /// with 503 now, and every open tunnel is reported so the new control
    /// learns the live flows.
    fn check_relink(&mut self) {
        let Ok(mut new) = self.relink.try_recv() else { return };
        new.continue_ask_ids(self.link.next_ask_id());
        self.link = new;
        self.link_epoch += 1;
        self.answers_due = true;
        // Signatures asked of the dead control will never come.
        let signs: Vec<u64> = self.signs.keys().copied().collect();
        for sign_id in signs {
            self.fail_sign(sign_id);
        }
        let pending: Vec<(u64, (ConnKey, u64))> = self.asks.drain().collect();
        for (_, (key, stream_id)) in pending {
            let Some(mut conn) = self.take_conn(key) else { continue };
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
            self.put_conn(key, conn);
        }
        self.refuse_pending_addresses();
        let mut open = Vec::new();
        for (_, conn) in self.conns.iter() {
            for entry in conn.tunnels.values() {
                if let Phase::Open { flow_id, target } = entry.tunnel.phase {
                    let addresses = entry
                        .ip
                        .as_ref()
                        .map(|t| {
                            t.addresses
                                .iter()
                                .map(|p| relay_proto::channel::record::IpAssignment {
                                    addr: p.addr,
                                    len: p.len,
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    open.push(relay_proto::channel::record::FlowOpen {
                        flow_id,
                        client: conn.peer,
                        target,
                        identity: entry.identity.clone(),
                        addresses,
                    });
                }
            }
        }
        if let Some(front_flows) = self.with_front(|f, ctx| f.on_relink(ctx)) {
            open.extend(front_flows);
        }
        // The new region's counters start at zero: restore the gauges.
        self.count(Counter::ConnectionsActive, self.conns.len() as u64);
        if let Some(f) = self.front.as_ref() {
            self.link.counters().set(Counter::TcpConnectionsActive, f.connections() as u64);
        }
        self.count(Counter::TunnelsActive, open.len() as u64);
        self.link.counters().set(Counter::IoBackend, self.backend_gauge);
        self.link.counters().set(Counter::TlsGeneration, u64::from(self.tls_generation));
        let flows = open.len();
        for f in open {
            self.link.flow_open(f);
        }
        info!(worker = self.settings.index, flows, "attached to a new control; live flows reported");
    }

    /// Builds the QUIC configuration for new connections from the TLS
    /// material control sent (a reloaded certificate). Open connections
    /// keep theirs.
    fn adopt_tls(&mut self) {
        self.tls_epoch = self.settings.tls.epoch();
        let material = self.settings.tls.current();
        match quic::transport_config(&self.settings.bootstrap, &material, self.settings.tls.tickets()) {
            Ok(config) => {
                self.quic_config = config;
                self.tls_generation = material.generation;
                self.link.counters().set(Counter::TlsGeneration, u64::from(material.generation));
                info!(
                    worker = self.settings.index,
                    generation = material.generation,
                    "serving a new certificate"
                );
            }
            // Checked once before it was published; keep serving the old one.
            Err(e) => error!(worker = self.settings.index, "new TLS material refused: {e}"),
        }
    }

    /// Graceful drain: GOAWAY on every connection, no new connections or
    /// requests; open tunnels run until they end or the deadline passes.
    fn start_drain(&mut self) {
        let timeout = Duration::from_millis(self.settings.bootstrap.drain_timeout_ms);
        self.drain_deadline = Some(self.now + timeout);
        for key in self.conns.keys() {
            if let Some(mut conn) = self.take_conn(key) {
                send_goaway(&mut conn);
                self.put_conn(key, conn);
            }
        }
        self.with_front(|f, ctx| f.start_drain(ctx));
        info!(worker = self.settings.index, tunnels = self.tunnels_open, ?timeout, "draining");
    }

    /// Ends the tunnels control was asked to kill: both directions reset
    /// with H3_REQUEST_CANCELLED, the flow reported closed.
    fn kill_requested_flows(&mut self) {
        let kills = self.link.take_kill_requests();
        if kills.is_empty() {
            return;
        }
        self.with_front(|f, ctx| f.kill(ctx, &kills));
        let mut found = Vec::new();
        for (key, conn) in self.conns.iter() {
            for (stream_id, entry) in &conn.tunnels {
                if entry.tunnel.flow_id().is_some_and(|f| kills.contains(&f)) {
                    found.push((key, *stream_id));
                }
            }
        }
        for (key, stream_id) in found {
            let Some(mut conn) = self.take_conn(key) else { continue };
            info!(worker = self.settings.index, stream_id, "tunnel killed by the operator");
            self.abort_tunnel(&mut conn, stream_id, h3_code::REQUEST_CANCELLED);
            self.put_conn(key, conn);
        }
    }

    /// Lists this worker's connections for control (`relayctl conns`).
    fn answer_conn_listings(&mut self) {
        for (request_id, limit) in self.link.take_list_requests() {
            // A listing never takes more than half the room left in the
            // link's queue, so flow reports are never crowded out.
            let limit = (limit as usize).min(self.link.queue_room() / 2);
            let mut listed = Vec::new();
            for (_, conn) in self.conns.iter().take(limit) {
                let stats = conn.quic.stats();
                let path = conn.quic.path_stats().find(|p| p.active);
                listed.push(ConnInfo {
                    request_id,
                    transport: relay_proto::channel::record::Transport::H3,
                    conn_id: conn.serial,
                    client: path.as_ref().map_or(conn.peer, |p| p.peer_addr),
                    age_ms: self.now.saturating_duration_since(conn.accepted_at).as_millis() as u64,
                    established: conn.quic.is_established(),
                    resumed: conn.quic.is_resumed(),
                    tls_generation: conn.tls_generation,
                    tunnels: conn.tunnels.len() as u32,
                    rtt_us: path.as_ref().map_or(0, |p| p.rtt.as_micros() as u64),
                    packets_sent: stats.sent as u64,
                    packets_recv: stats.recv as u64,
                    packets_lost: stats.lost as u64,
                    bytes_sent: stats.sent_bytes,
                    bytes_recv: stats.recv_bytes,
                    // Quarter stream ID (up to 8 bytes) and context ID (1).
                    max_tunnel_payload: conn.quic.dgram_max_writable_len().map_or(0, |m| m.saturating_sub(9))
                        as u32,
                });
            }
            // Then the TCP front's, within the same limit.
            let (front, front_total) = match self.front.as_ref() {
                Some(f) => f.list_conns(request_id, limit.saturating_sub(listed.len()), self.now),
                None => (Vec::new(), 0),
            };
            for info in listed.into_iter().chain(front) {
                self.link.conn_info(info);
            }
            self.link.conn_list_end(request_id, (self.conns.len() + front_total) as u32);
        }
    }

    fn read_answers(&mut self) {
        let mut answers = Vec::new();
        let more = self.link.poll_answers(|a| answers.push(a));
        self.answers_due = more;
        for a in answers {
            match a {
                Answer::Auth(a) => self.on_answer(a),
                Answer::Sign(a) => self.on_sign_answer(a),
                Answer::Address(a) => self.on_address_answer(a),
            }
        }
    }
}

impl Handler for Worker {
    fn begin_turn(&mut self, now: Instant) {
        self.now = now;
        // The backend has forgotten these since the last turn.
        self.closing_bound.clear();
        self.closing_tcp.clear();
        if let Some(f) = self.front.as_mut() {
            f.begin_turn();
        }
        self.out.stats.turns += 1;
    }

    fn on_quic(&mut self, packets: &mut [u8], segment_size: usize, from: SocketAddr) {
        let stride = segment_size.max(1);
        for pkt in packets.chunks_mut(stride) {
            self.on_quic_packet(pkt, from);
        }
    }

    fn on_ready(&mut self, key: WatchKey, ready: Ready) {
        if crate::front::Front::owns_watch(key) {
            self.with_front(|f, ctx| f.on_ready(ctx, key, ready));
        } else if self.is_tcp_watch(key) {
            self.tcp_ready(key, ready);
        } else if ready.readable {
            self.bind_readable(key);
        }
    }

    fn on_target_unreachable(&mut self, key: TargetKey, errno: i32) {
        if !self.targets.contains_key(&key) && self.front.as_ref().is_some_and(|f| f.owns_target(key)) {
            self.with_front(|f, ctx| f.on_target_unreachable(ctx, key));
            return;
        }
        self.target_unusable(key, errno);
    }

    fn on_target(&mut self, key: TargetKey, payloads: &[u8], segment_size: usize) {
        let Some(&(conn_key, stream_id)) = self.targets.get(&key) else {
            if self.front.as_ref().is_some_and(|f| f.owns_target(key)) {
                self.with_front(|f, ctx| f.on_target(ctx, key, payloads, segment_size));
            }
            return;
        };
        let Some(mut conn) = self.take_conn(conn_key) else { return };
        for payload in payloads.chunks(segment_size.max(1)) {
            self.send_down(&mut conn, stream_id, payload);
        }
        self.put_conn(conn_key, conn);
    }

    fn on_wake(&mut self, wake: Wake) {
        match wake {
            Wake::Answers => self.answers_due = true,
            Wake::Worker => {
                self.inboxes[self.settings.index as usize].bell.drain();
                self.check_relink();
                self.handoffs_due = true;
            }
            Wake::Tun => {
                if let Some(ip) = self.ip.as_mut() {
                    ip.due = true;
                }
            }
        }
    }

    fn end_turn(&mut self) -> Turn {
        if self.stopped {
            return Turn::Stop;
        }
        if self.settings.tls.epoch() != self.tls_epoch {
            self.adopt_tls();
        }
        if self.handoffs_due {
            self.take_handoffs();
        }
        if self.answers_due {
            self.read_answers();
        } else {
            self.link.flush_queued();
        }
        if self.ip.as_ref().is_some_and(|ip| ip.due) {
            self.read_tun();
        }
        for watch in std::mem::take(&mut self.bind_due) {
            self.bind_readable(watch);
        }
        self.flush_ip_icmp();
        self.kill_requested_flows();
        self.answer_conn_listings();
        let requested = self.link.take_drain_request();
        if (requested || self.flags.drain.load(Ordering::Relaxed)) && self.drain_deadline.is_none() {
            self.start_drain();
        }
        let stop = self.flags.stop.load(Ordering::Relaxed);
        let front_tunnels = self.front.as_ref().map_or(0, |f| f.tunnels_open());
        let drained = self.drain_deadline.is_some_and(|deadline| {
            let done = self.tunnels_open + front_tunnels == 0 || self.now >= deadline;
            if done {
                info!(worker = self.settings.index, tunnels_left = self.tunnels_open, "drain finished");
            }
            done
        });
        self.fire_timers();
        self.with_front(|f, ctx| f.end_turn(ctx));
        self.flush_tun_writes();
        self.end_over_budget();
        self.flush_up();
        self.flush_dirty();
        self.flush_up();
        for w in self.bells_due.drain(..) {
            let _ = self.inboxes[w].bell.ring();
        }
        if stop || drained {
            self.stopped = true;
            self.shutdown();
            self.out.stats.flush_into(self.link.counters());
            return Turn::Stop;
        }
        self.out.stats.flush_into(self.link.counters());
        let busy = self.handoffs_due
            || self.answers_due
            || !self.bind_due.is_empty()
            || self.ip.as_ref().is_some_and(|ip| ip.due)
            || self.front.as_ref().is_some_and(|f| f.busy());
        let deadline = if busy {
            self.now
        } else {
            let cap = self.now + MAX_WAIT;
            let next = self.timers.next().map_or(cap, |t| t.min(cap));
            self.front.as_ref().and_then(|f| f.next_timer()).map_or(next, |t| t.min(next))
        };
        Turn::Continue { deadline }
    }

    fn output(&mut self) -> &mut Output {
        &mut self.out
    }

    fn answer_bell(&self) -> (RawFd, u64) {
        (self.link.answer_bell().as_raw_fd(), self.link_epoch)
    }

    fn worker_bell(&self) -> RawFd {
        self.inboxes[self.settings.index as usize].bell.as_raw_fd()
    }

    fn tun_fd(&self) -> Option<RawFd> {
        self.ip.as_ref().map(|ip| ip.tun.as_raw_fd())
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

//! One TCP front connection: the socket, TLS (or cleartext), and the HTTP
//! session on top.
//!
//! Edge-triggered I/O: the connection remembers whether its socket may
//! still be read or written (no `EAGAIN` since the last readiness event)
//! and [`Conn::pump`] moves bytes until nothing more can move: socket →
//! TLS → session → TLS → socket. Every buffer is bounded: the socket is not
//! read while the session has [`IN_LIMIT`] bytes it has not consumed, and
//! sessions produce output only while less than [`OUT_LIMIT`] bytes wait
//! for the socket. A connection with more work than one turn's rounds is
//! put on the front's due list.
//!
//! The first bytes choose the session: ALPN on TLS connections (`h2`,
//! otherwise HTTP/1.1), the connection preface or not on cleartext ones
//! ([`relay_proto::h2c::sniff`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use relay_channel::region::Counter;
use relay_proto::channel::record::{ConnInfo, FlowOpen, Transport, Verdict};
use relay_proto::h2c::{self, PeerSettings, Sniff};
use tracing::debug;

use super::tls::{Plain, Progress, TlsSession};
use super::{Ctx, Owner, Shared, h1, h2};
use crate::io::{Ready, WatchKey};
use crate::keyless;
use crate::slab::Key as ConnKey;

/// Plaintext a session may leave unconsumed before the socket is no
/// longer read.
pub const IN_LIMIT: usize = 256 * 1024;
/// Bytes waiting for the socket before sessions stop producing.
pub const OUT_LIMIT: usize = 256 * 1024;
/// Rounds of [`Conn::pump`] per call.
const ROUNDS: usize = 32;
/// Bytes read from the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// An h2c upgrade the HTTP/1.1 session asked for.
#[derive(Debug)]
pub struct H2cSwitch {
    /// The client's HTTP2-Settings.
    pub peer: PeerSettings,
    /// The encoded answer to the upgraded request (stream 1).
    pub stream1: Vec<u8>,
    /// Connection-level window the answer's DATA used.
    pub debt: u32,
}

/// What sessions see of their connection.
#[derive(Debug)]
pub struct ConnIo {
    /// The connection's key.
    pub key: ConnKey,
    /// The client.
    pub peer: SocketAddr,
    /// Over TLS (not the cleartext listener).
    pub secure: bool,
    /// Plaintext from the client, not yet consumed.
    pub plain_in: Vec<u8>,
    /// The client ended its side (FIN, or TLS close_notify).
    pub plain_eof: bool,
    /// Plaintext for the client.
    pub plain_out: Vec<u8>,
    /// Bytes waiting for the socket (set by the connection).
    pub wire_backlog: usize,
    /// A complete request head has been read (the handshake deadline no
    /// longer applies).
    pub first_request_seen: bool,
    /// Last time a request or a response completed (idle timeout).
    pub last_activity: Instant,
    /// End our writing side once the output drained (half-close).
    pub shutdown_write: bool,
    /// Close the connection once the output drained, for this reason.
    pub close: Option<&'static str>,
    /// Switch to HTTP/2 (h2c upgrade) after the current output.
    pub switch: Option<H2cSwitch>,
}

impl ConnIo {
    /// Room for more output.
    pub fn out_room(&self) -> usize {
        OUT_LIMIT.saturating_sub(self.wire_backlog + self.plain_out.len())
    }
}

enum Session {
    /// Cleartext: waiting for enough bytes to tell HTTP/2 from HTTP/1.1.
    Sniff,
    /// TLS handshake in progress.
    Handshake,
    H1(Box<h1::Session>),
    H2(Box<h2::Session>),
}

/// A TCP front connection.
pub struct Conn {
    sock: Option<TcpStream>,
    watch: WatchKey,
    /// What sessions see.
    pub io: ConnIo,
    tls: Option<TlsSession>,
    session: Session,
    readable: bool,
    writable: bool,
    sock_eof: bool,
    wire_out: Vec<u8>,
    wire_sent: usize,
    write_closed: bool,
    /// Our FIN went out (half-close).
    fin_sent: bool,
    /// The timer armed for it.
    pub armed: Option<Instant>,
    signing: Option<(u64, Instant)>,
    handshake_deadline: Instant,
    idle_timeout: Duration,
    done: bool,
    /// Its number on this worker.
    pub serial: u64,
    buf: Vec<u8>,
    /// When it was accepted.
    accepted_at: Instant,
    /// The TLS material generation its handshake was signed with (0: not
    /// signed: cleartext, resumed, or not yet).
    tls_generation: u32,
    /// Bytes read from and written to the socket.
    wire_in: u64,
    wire_written: u64,
}

impl Conn {
    /// A freshly accepted connection (TLS or cleartext).
    pub fn new(
        sock: TcpStream,
        peer: SocketAddr,
        tls: bool,
        serial: u64,
        sh: &mut Shared,
        ctx: &mut Ctx<'_>,
    ) -> io::Result<Self> {
        let tls = if tls {
            let Some(c) = sh.tls_ctx.as_ref() else {
                return Err(io::Error::other("no TLS context"));
            };
            Some(TlsSession::new(c).map_err(io::Error::other)?)
        } else {
            None
        };
        let s = &sh.settings.tcp;
        Ok(Self {
            sock: Some(sock),
            watch: 0,
            io: ConnIo {
                key: 0,
                peer,
                secure: tls.is_some(),
                plain_in: Vec::new(),
                plain_eof: false,
                plain_out: Vec::new(),
                wire_backlog: 0,
                first_request_seen: false,
                last_activity: ctx.now,
                shutdown_write: false,
                close: None,
                switch: None,
            },
            session: if tls.is_some() { Session::Handshake } else { Session::Sniff },
            tls,
            readable: true,
            writable: true,
            sock_eof: false,
            wire_out: Vec::new(),
            wire_sent: 0,
            write_closed: false,
            fin_sent: false,
            armed: None,
            signing: None,
            handshake_deadline: ctx.now + Duration::from_millis(u64::from(s.handshake_timeout_ms)),
            accepted_at: ctx.now,
            tls_generation: 0,
            wire_in: 0,
            wire_written: 0,
            idle_timeout: Duration::from_millis(s.idle_timeout_ms),
            done: false,
            serial,
            buf: Vec::new(),
        })
    }

    /// Watches the socket under its slab key.
    pub fn register(&mut self, key: ConnKey, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        self.io.key = key;
        if let Some(sock) = &self.sock {
            self.watch = sh.watch(ctx.out, sock.as_raw_fd(), Owner::Client(key));
        }
        // Bytes may already be waiting (the readiness event may precede
        // the watch): try at once.
        self.pump(sh, ctx);
    }

    /// Whether the connection is finished and can be released.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The socket is ready.
    pub fn on_socket_ready(&mut self, ready: Ready, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        self.readable |= ready.readable;
        self.writable |= ready.writable;
        self.pump(sh, ctx);
    }

    /// A TCP target of one of the session's exchanges is ready.
    pub fn on_target_ready(&mut self, stream: u32, ready: Ready, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        if let Some(ex) = self.exchange(stream) {
            super::flows::target_ready(ex, ready, sh, ctx);
        }
        self.pump(sh, ctx);
    }

    /// Payloads from a UDP target of one of the session's tunnels.
    pub fn on_udp_payloads(
        &mut self,
        stream: u32,
        payloads: &[u8],
        segment_size: usize,
        sh: &mut Shared,
        ctx: &mut Ctx<'_>,
    ) {
        if let Some(ex) = self.exchange(stream) {
            super::flows::down_udp(ex, payloads, segment_size, ctx);
        }
        self.pump(sh, ctx);
    }

    /// Whether a TUN packet's source and protocol are inside connect-ip
    /// tunnel `stream`'s routes.
    pub fn ip_routes_allow(&self, stream: u32, info: &relay_proto::ip::packet::PacketInfo) -> Option<bool> {
        let ex = match &self.session {
            Session::H1(s) => s.exchange_ref(stream),
            Session::H2(s) => s.exchange_ref(stream),
            _ => None,
        }?;
        match &ex.state {
            super::exchange::State::Ip { ip, .. } => Some(ip.routed(info.src, info.protocol)),
            _ => None,
        }
    }

    /// A TUN packet for connect-ip tunnel `stream`.
    pub fn on_ip_packet(&mut self, stream: u32, packet: &[u8], sh: &mut Shared, ctx: &mut Ctx<'_>) {
        if let Some(ex) = self.exchange(stream) {
            super::flows::down_ip(ex, packet, ctx);
        }
        self.pump(sh, ctx);
    }

    /// Control's verdict for one of the session's asks.
    pub fn on_verdict(&mut self, stream: u32, verdict: Verdict, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let place = super::flows::Place { conn: self.io.key, stream, peer: self.io.peer };
        match self.exchange(stream) {
            Some(ex) => super::flows::apply_verdict(ex, verdict, place, sh, ctx),
            None => {
                if let Some(flow_id) = super::allowed_flow(&verdict) {
                    ctx.link.flow_closed(relay_proto::channel::record::FlowClosed::unused(flow_id));
                }
            }
        }
        self.pump(sh, ctx);
    }

    /// The signature for the TLS handshake arrived (or failed).
    pub fn on_signed(&mut self, sign_id: u64, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        if self.signing.is_some_and(|(id, _)| id == sign_id) {
            self.signing = None;
        }
        self.pump(sh, ctx);
    }

    /// Ends one exchange from the relay's side.
    pub fn end_exchange(&mut self, stream: u32, _graceful: bool, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        match &mut self.session {
            Session::H1(s) => s.end_exchange(stream, &mut self.io, sh, ctx),
            Session::H2(s) => s.end_exchange(stream, &mut self.io, sh, ctx),
            _ => {}
        }
        self.pump(sh, ctx);
    }

    fn exchange(&mut self, stream: u32) -> Option<&mut super::exchange::Exchange> {
        match &mut self.session {
            Session::H1(s) => s.exchange(stream),
            Session::H2(s) => s.exchange(stream),
            _ => None,
        }
    }

    /// Sends this turn's UDP batch of `stream`.
    pub fn flush_udp(&mut self, stream: u32, ctx: &mut Ctx<'_>) {
        if let Some(ex) = self.exchange(stream) {
            super::flows::flush_udp(ex, ctx);
        }
    }

    /// Moves bytes until nothing more moves (or the rounds run out: then
    /// the connection is due next turn).
    pub fn pump(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let mut rounds = 0;
        while !self.done {
            rounds += 1;
            if rounds > ROUNDS {
                if !sh.due.contains(&self.io.key) {
                    sh.due.push(self.io.key);
                }
                break;
            }
            let mut progress = self.read_socket();
            progress |= self.run_tls(sh, ctx);
            if self.done {
                break;
            }
            self.io.wire_backlog = self.wire_out.len() - self.wire_sent;
            progress |= self.run_session(sh, ctx);
            progress |= self.seal_output();
            progress |= self.write_socket();
            progress |= self.finish_if_asked();
            if !progress {
                break;
            }
        }
    }

    fn input_backlog(&self) -> usize {
        self.io.plain_in.len() + self.tls.as_ref().map_or(0, |t| t.input_backlog())
    }

    fn read_socket(&mut self) -> bool {
        if !self.readable || self.sock_eof || self.input_backlog() >= IN_LIMIT {
            return false;
        }
        let Some(sock) = self.sock.as_mut() else { return false };
        self.buf.resize(READ_CHUNK, 0);
        match sock.read(&mut self.buf) {
            Ok(0) => {
                self.sock_eof = true;
                match self.tls.as_mut() {
                    Some(t) => t.feed_eof(),
                    None => self.io.plain_eof = true,
                }
                true
            }
            Ok(n) => {
                self.wire_in += n as u64;
                match self.tls.as_mut() {
                    Some(t) => t.feed(&self.buf[..n]),
                    None => self.io.plain_in.extend_from_slice(&self.buf[..n]),
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                debug!(peer = %self.io.peer, "TCP read: {e}");
                self.done = true;
                false
            }
        }
    }

    /// Drives the TLS handshake and decrypts what came in.
    fn run_tls(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        let Some(tls) = self.tls.as_mut() else { return false };
        let mut progress = false;
        if !tls.is_open() {
            if self.signing.is_some() {
                return false; // waiting for control
            }
            let progress_before = tls.output().len();
            let p = tls.handshake();
            let alpn = tls.alpn().map(<[u8]>::to_vec);
            self.ask_signatures(sh, ctx);
            match p {
                Progress::WantInput => {
                    if self.sock_eof {
                        self.done = true;
                    }
                }
                Progress::WantSignature => {}
                Progress::Done => {
                    self.session = match alpn.as_deref() {
                        Some(b"h2") => Session::H2(Box::new(h2::Session::new(false, sh))),
                        _ => Session::H1(Box::default()),
                    };
                    progress = true;
                }
                Progress::Failed(why) => {
                    debug!(peer = %self.io.peer, "TLS handshake failed: {why}");
                    ctx.link.counters().add(Counter::TcpTlsFailures, 1);
                    self.io.close.get_or_insert("TLS handshake failed");
                    progress = true;
                }
            }
            progress |= self.tls.as_mut().is_some_and(|t| t.output().len() != progress_before);
        }
        let Some(tls) = self.tls.as_mut() else { return progress };
        if tls.is_open() {
            while self.io.plain_in.len() < IN_LIMIT && !self.io.plain_eof {
                let room = IN_LIMIT - self.io.plain_in.len();
                match tls.read(&mut self.io.plain_in, room.min(READ_CHUNK)) {
                    Ok(Plain::Data(_)) => progress = true,
                    Ok(Plain::Blocked) => break,
                    Ok(Plain::Closed) => {
                        self.io.plain_eof = true;
                        progress = true;
                    }
                    Err(e) => {
                        debug!(peer = %self.io.peer, "TLS read: {e}");
                        self.io.close.get_or_insert("TLS error");
                        progress = true;
                        break;
                    }
                }
            }
        }
        progress
    }

    /// Sends the handshake's signing asks to control (keyless TLS).
    fn ask_signatures(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        for req in keyless::take_requests() {
            let id = req.sign_id;
            match ctx.link.sign(id, req.generation, req.algorithm, req.input) {
                Ok(()) => {
                    ctx.link.counters().add(Counter::SignsSent, 1);
                    self.tls_generation = req.generation;
                    sh.signs.insert(id, self.io.key);
                    self.signing = Some((id, ctx.now + sh.settings.ask_timeout));
                }
                Err(e) => {
                    debug!("handshake signature not asked: {e}");
                    ctx.link.counters().add(Counter::SignsFailed, 1);
                    keyless::deliver(id, None);
                }
            }
        }
    }

    fn run_session(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        if self.io.close.is_some() {
            // Closing: what the client sends now is not read.
            self.io.plain_in.clear();
            return false;
        }
        if matches!(self.session, Session::Sniff) {
            match h2c::sniff(&self.io.plain_in) {
                Sniff::NeedMore => {
                    if self.io.plain_eof {
                        self.io.close.get_or_insert("client closed");
                        return true;
                    }
                    return false;
                }
                Sniff::H2PriorKnowledge => self.session = Session::H2(Box::new(h2::Session::new(false, sh))),
                Sniff::Http1 => self.session = Session::H1(Box::default()),
                Sniff::Tls => {
                    ctx.link.counters().add(Counter::TcpTlsFailures, 1);
                    self.io.close.get_or_insert("TLS on the cleartext listener");
                    return true;
                }
            }
        }
        let progress = match &mut self.session {
            Session::H1(s) => s.run(&mut self.io, sh, ctx),
            Session::H2(s) => s.run(&mut self.io, sh, ctx),
            Session::Sniff | Session::Handshake => false,
        };
        if let Some(switch) = self.io.switch.take() {
            // RFC 7540 section 3.2: after the 101 the server's first frame
            // is its SETTINGS, then the answer on stream 1.
            let mut s = h2::Session::upgraded(switch, sh);
            let old = std::mem::replace(&mut self.session, Session::Sniff);
            if let Session::H1(mut h1s) = old {
                h1s.close(&mut self.io, sh, ctx);
            }
            s.run(&mut self.io, sh, ctx);
            self.session = Session::H2(Box::new(s));
            return true;
        }
        progress
    }

    /// Moves the session's plaintext into the wire buffer (through TLS).
    fn seal_output(&mut self) -> bool {
        let mut progress = false;
        if !self.io.plain_out.is_empty() {
            match self.tls.as_mut() {
                Some(t) if t.is_open() => {
                    if let Err(e) = t.write(&self.io.plain_out) {
                        debug!("TLS write: {e}");
                        self.done = true;
                    }
                    self.io.plain_out.clear();
                }
                Some(_) => {} // handshake not done: nothing can be sent yet
                None => {
                    if self.wire_sent == self.wire_out.len() && self.wire_out.is_empty() {
                        std::mem::swap(&mut self.wire_out, &mut self.io.plain_out);
                    } else {
                        self.wire_out.extend_from_slice(&self.io.plain_out);
                        self.io.plain_out.clear();
                    }
                }
            }
            progress = true;
        }
        if let Some(t) = self.tls.as_mut() {
            let out = t.output();
            if !out.is_empty() {
                if self.wire_out.is_empty() {
                    std::mem::swap(&mut self.wire_out, out);
                } else {
                    self.wire_out.extend_from_slice(out);
                    out.clear();
                }
                progress = true;
            }
        }
        progress
    }

    fn write_socket(&mut self) -> bool {
        let mut progress = false;
        let Some(sock) = self.sock.as_mut() else { return false };
        while self.writable && self.wire_sent < self.wire_out.len() {
            match sock.write(&self.wire_out[self.wire_sent..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.wire_sent += n;
                    self.wire_written += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(peer = %self.io.peer, "TCP write: {e}");
                    self.done = true;
                    return false;
                }
            }
        }
        if self.wire_sent == self.wire_out.len() && self.wire_sent > 0 {
            self.wire_out.clear();
            self.wire_sent = 0;
        }
        progress
    }

    /// Half-close or close once the output has drained, as the session
    /// asked.
    fn finish_if_asked(&mut self) -> bool {
        let drained = self.wire_out.is_empty() && self.io.plain_out.is_empty();
        if !drained {
            return false;
        }
        if self.io.close.is_some() {
            if let Some(t) = self.tls.as_mut()
                && t.is_open()
                && !self.write_closed
            {
                // close_notify, then the FIN.
                t.close();
                self.write_closed = true;
                return true;
            }
            self.done = true;
            return true;
        }
        if self.io.shutdown_write && !self.write_closed {
            self.write_closed = true;
            if let Some(t) = self.tls.as_mut() {
                t.close();
                return true; // the close_notify goes out first
            }
            if let Some(s) = &self.sock {
                self.fin_sent = true;
                let _ = s.shutdown(Shutdown::Write);
            }
            return true;
        }
        if self.write_closed
            && self.io.shutdown_write
            && !self.fin_sent
            && let Some(s) = &self.sock
        {
            // The close_notify has drained: now the FIN.
            self.fin_sent = true;
            let _ = s.shutdown(Shutdown::Write);
        }
        false
    }

    /// When the connection needs a timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut take = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if !self.io.first_request_seen {
            take(self.handshake_deadline);
        }
        if let Some((_, t)) = self.signing {
            take(t);
        }
        let session_deadline = match &self.session {
            Session::H1(s) => {
                if !s.busy() && self.io.first_request_seen {
                    take(self.io.last_activity + self.idle_timeout);
                }
                s.next_deadline()
            }
            Session::H2(s) => {
                if s.idle() {
                    take(self.io.last_activity + self.idle_timeout);
                }
                s.next_deadline()
            }
            _ => None,
        };
        if let Some(t) = session_deadline {
            take(t);
        }
        at
    }

    /// A timer fired.
    pub fn on_timer(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        if !self.io.first_request_seen && now >= self.handshake_deadline {
            // Slowloris: no TLS handshake or no complete request head in
            // time. Closed without an answer.
            ctx.link.counters().add(Counter::TcpTimeouts, 1);
            self.done = true;
            return;
        }
        if let Some((id, at)) = self.signing
            && now >= at
        {
            sh.signs.remove(&id);
            keyless::deliver(id, None);
            ctx.link.counters().add(Counter::SignsFailed, 1);
            self.signing = None;
        }
        let idle = match &mut self.session {
            Session::H1(s) => {
                s.on_timer(&mut self.io, sh, ctx);
                !s.busy()
            }
            Session::H2(s) => {
                s.on_timer(&mut self.io, sh, ctx);
                s.idle()
            }
            _ => false,
        };
        if idle && self.io.first_request_seen && now >= self.io.last_activity + self.idle_timeout {
            ctx.link.counters().add(Counter::TcpTimeouts, 1);
            self.io.close.get_or_insert("idle");
        }
        self.pump(sh, ctx);
    }

    /// Drain: HTTP/2 GOAWAY, HTTP/1.1 closes after the current exchange.
    pub fn drain(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        match &mut self.session {
            Session::H1(s) => s.drain(&mut self.io),
            Session::H2(s) => s.drain(),
            _ => {
                self.io.close.get_or_insert("drained");
            }
        }
        self.pump(sh, ctx);
    }

    /// Ends the exchanges carrying `flows`.
    pub fn kill(&mut self, flows: &[u64], sh: &mut Shared, ctx: &mut Ctx<'_>) {
        match &mut self.session {
            Session::H1(s) => s.kill(flows, &mut self.io, sh, ctx),
            Session::H2(s) => s.kill(flows, &mut self.io, sh, ctx),
            _ => return,
        }
        self.pump(sh, ctx);
    }

    /// Calls `visit` on the connection's exchanges until it returns true;
    /// when one did, the connection's output is pumped. Returns whether
    /// one did.
    pub fn visit_exchanges(
        &mut self,
        sh: &mut Shared,
        ctx: &mut Ctx<'_>,
        mut visit: impl FnMut(&mut super::exchange::Exchange, &mut Ctx<'_>) -> bool,
    ) -> bool {
        let hit = match &mut self.session {
            Session::H1(s) => s.exchanges_mut().any(|ex| visit(ex, ctx)),
            Session::H2(s) => s.exchanges_mut().any(|ex| visit(ex, ctx)),
            _ => false,
        };
        if hit {
            self.pump(sh, ctx);
        }
        hit
    }

    /// The connection as `relayctl conns` lists it; packets, losses and
    /// RTT from the kernel's `TCP_INFO`.
    pub fn info(&self, request_id: u64, now: Instant) -> ConnInfo {
        let (transport, established) = match (&self.session, self.io.secure) {
            (Session::H2(_), true) => (Transport::H2, true),
            (Session::H1(_), true) => (Transport::Http1, true),
            (Session::H2(_), false) => (Transport::H2c, true),
            (Session::H1(_), false) => (Transport::Http1Clear, true),
            (Session::Sniff | Session::Handshake, _) => (Transport::TcpPending, false),
        };
        let mut flows = Vec::new();
        self.open_flows(&mut flows);
        let tcp = self.sock.as_ref().and_then(|s| tcp_info(s.as_raw_fd()));
        ConnInfo {
            request_id,
            transport,
            conn_id: self.serial,
            client: self.io.peer,
            age_ms: now.saturating_duration_since(self.accepted_at).as_millis() as u64,
            established,
            resumed: self.tls.as_ref().is_some_and(TlsSession::resumed),
            tls_generation: self.tls_generation,
            tunnels: flows.len() as u32,
            rtt_us: tcp.map_or(0, |t| u64::from(t.tcpi_rtt)),
            packets_sent: tcp.map_or(0, |t| u64::from(t.tcpi_segs_out)),
            packets_recv: tcp.map_or(0, |t| u64::from(t.tcpi_segs_in)),
            packets_lost: tcp.map_or(0, |t| u64::from(t.tcpi_total_retrans)),
            bytes_sent: self.wire_written,
            bytes_recv: self.wire_in,
            // Capsules carry any IP packet or UDP payload.
            max_tunnel_payload: u32::from(u16::MAX),
        }
    }

    /// The open flows, for a re-attached control.
    pub fn open_flows(&self, out: &mut Vec<FlowOpen>) {
        match &self.session {
            Session::H1(s) => s.open_flows(self.io.peer, out),
            Session::H2(s) => s.open_flows(self.io.peer, out),
            _ => {}
        }
    }

    /// Releases everything: exchanges, the pending signature, the socket.
    pub fn close(&mut self, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        match &mut self.session {
            Session::H1(s) => s.close(&mut self.io, sh, ctx),
            Session::H2(s) => s.close(&mut self.io, sh, ctx),
            _ => {}
        }
        if let Some((id, _)) = self.signing.take() {
            sh.signs.remove(&id);
            keyless::forget(id);
        }
        if let Some(sock) = self.sock.take() {
            sh.unwatch(ctx.out, self.watch, sock);
        }
        self.done = true;
    }
}

/// The kernel's view of a TCP connection (`TCP_INFO`), if it gives one.
fn tcp_info(fd: std::os::fd::RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes and `len` holds the
    // buffer's size; the kernel writes at most that much.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

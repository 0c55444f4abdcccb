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
use relay_proto::channel::record::{ConnInfo, Transport};
use relay_proto::h2c::{self, PeerSettings, Sniff};
use tracing::debug;

use super::tls::{Plain, Progress, TlsSession};
use super::{Fx, Shared, h1, h2};
use crate::context::{Closing, WatchOwner};
use crate::io::{Ready, WatchKey};
use crate::keyless;
use crate::slab::Key as ConnKey;
use crate::tunnel::{Carrier, Tunnels};

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
    /// This worker's serial number for the connection (`relayctl conns`),
    /// the ID its log lines carry instead of the client's address.
    pub serial: u64,
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
    /// The client certificate the TLS handshake verified (mutual TLS).
    pub client_cert: Option<relay_proto::channel::record::ClientCert>,
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
        sh: &Shared,
        now: Instant,
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
                serial,
                secure: tls.is_some(),
                plain_in: Vec::new(),
                plain_eof: false,
                plain_out: Vec::new(),
                wire_backlog: 0,
                first_request_seen: false,
                client_cert: None,
                last_activity: now,
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
            handshake_deadline: now + Duration::from_millis(u64::from(s.handshake_timeout_ms)),
            accepted_at: now,
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
    pub fn register(&mut self, key: ConnKey, fx: &mut Fx<'_>) {
        self.io.key = key;
        if let Some(sock) = &self.sock {
            self.watch = fx.ctx.watch(sock.as_raw_fd(), WatchOwner::FrontConn(key), true);
        }
        // Bytes may already be waiting (the readiness event may precede
        // the watch): try at once.
        self.pump(fx);
    }

    /// Whether the connection is finished and can be released.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The socket is ready.
    pub fn on_socket_ready(&mut self, ready: Ready, fx: &mut Fx<'_>) {
        self.readable |= ready.readable;
        self.writable |= ready.writable;
        self.pump(fx);
    }

    /// The signature for the TLS handshake arrived (or failed).
    pub fn on_signed(&mut self, sign_id: u64, fx: &mut Fx<'_>) {
        if self.signing.is_some_and(|(id, _)| id == sign_id) {
            self.signing = None;
        }
        self.pump(fx);
    }

    /// Moves bytes until nothing more moves (or the rounds run out: then
    /// the connection is due next turn).
    pub fn pump(&mut self, fx: &mut Fx<'_>) {
        let mut rounds = 0;
        while !self.done {
            rounds += 1;
            if rounds > ROUNDS {
                fx.due(self.io.key);
                break;
            }
            let mut progress = self.read_socket();
            progress |= self.run_tls(fx);
            if self.done {
                break;
            }
            self.io.wire_backlog = self.wire_out.len() - self.wire_sent;
            progress |= self.run_session(fx);
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
                debug!(conn = self.io.serial, "TCP read: {e}");
                self.done = true;
                false
            }
        }
    }

    /// Drives the TLS handshake and decrypts what came in.
    fn run_tls(&mut self, fx: &mut Fx<'_>) -> bool {
        let Some(tls) = self.tls.as_mut() else { return false };
        let mut progress = false;
        if !tls.is_open() {
            if self.signing.is_some() {
                return false; // waiting for control
            }
            let progress_before = tls.output().len();
            let p = tls.handshake();
            let alpn = tls.alpn().map(<[u8]>::to_vec);
            let peer_cert = tls.peer_certificate();
            self.ask_signatures(fx);
            match p {
                Progress::WantInput => {
                    if self.sock_eof {
                        self.done = true;
                    }
                }
                Progress::WantSignature => {}
                Progress::Done => {
                    self.io.client_cert = peer_cert.map(|c| crate::client_cert::describe(&c));
                    self.session = match alpn.as_deref() {
                        Some(b"h2") => Session::H2(Box::new(h2::Session::new(&fx.sh.settings))),
                        _ => Session::H1(Box::default()),
                    };
                    progress = true;
                }
                Progress::Failed(why) => {
                    debug!(conn = self.io.serial, "TLS handshake failed: {why}");
                    fx.ctx.count(Counter::TcpTlsFailures, 1);
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
                        debug!(conn = self.io.serial, "TLS read: {e}");
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
    fn ask_signatures(&mut self, fx: &mut Fx<'_>) {
        for req in keyless::take_requests() {
            let id = req.sign_id;
            match fx.ctx.link.sign(id, req.generation, req.algorithm, req.input) {
                Ok(()) => {
                    fx.ctx.count(Counter::SignsSent, 1);
                    self.tls_generation = req.generation;
                    fx.ctx.signs.insert(id, Carrier::Front(self.io.key));
                    self.signing = Some((id, fx.ctx.now + fx.ctx.settings.ask_timeout));
                }
                Err(e) => {
                    debug!("handshake signature not asked: {e}");
                    fx.ctx.count(Counter::SignsFailed, 1);
                    keyless::deliver(id, None);
                }
            }
        }
    }

    fn run_session(&mut self, fx: &mut Fx<'_>) -> bool {
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
                Sniff::H2PriorKnowledge => {
                    self.session = Session::H2(Box::new(h2::Session::new(&fx.sh.settings)))
                }
                Sniff::Http1 => self.session = Session::H1(Box::default()),
                Sniff::Tls => {
                    fx.ctx.count(Counter::TcpTlsFailures, 1);
                    self.io.close.get_or_insert("TLS on the cleartext listener");
                    return true;
                }
            }
        }
        let progress = match &mut self.session {
            Session::H1(s) => s.run(&mut self.io, fx),
            Session::H2(s) => s.run(&mut self.io, fx),
            Session::Sniff | Session::Handshake => false,
        };
        if let Some(switch) = self.io.switch.take() {
            // RFC 7540 section 3.2: after the 101 the server's first frame
            // is its SETTINGS, then the answer on stream 1.
            let mut s = h2::Session::upgraded(switch, &fx.sh.settings);
            let old = std::mem::replace(&mut self.session, Session::Sniff);
            if let Session::H1(mut h1s) = old {
                h1s.close(&mut self.io, fx);
            }
            s.run(&mut self.io, fx);
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
                    debug!(conn = self.io.serial, "TCP write: {e}");
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

    /// When the connection needs a timer: the handshake and first
    /// request deadline, the signature's, or the idle timeout (its
    /// tunnels have their own timers).
    pub fn next_deadline(&self, tunnels: &Tunnels) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut take = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if !self.io.first_request_seen {
            take(self.handshake_deadline);
        }
        if let Some((_, t)) = self.signing {
            take(t);
        }
        if self.idle(tunnels) && self.io.first_request_seen {
            take(self.io.last_activity + self.idle_timeout);
        }
        at
    }

    fn idle(&self, tunnels: &Tunnels) -> bool {
        let _ = tunnels;
        match &self.session {
            Session::H1(s) => !s.busy(),
            Session::H2(s) => s.idle(),
            _ => false,
        }
    }

    /// A timer fired.
    pub fn on_timer(&mut self, fx: &mut Fx<'_>) {
        let now = fx.ctx.now;
        if !self.io.first_request_seen && now >= self.handshake_deadline {
            // Slowloris: no TLS handshake or no complete request head in
            // time. Closed without an answer.
            fx.ctx.count(Counter::TcpTimeouts, 1);
            self.done = true;
            return;
        }
        if let Some((id, at)) = self.signing
            && now >= at
        {
            fx.ctx.signs.remove(id);
            keyless::deliver(id, None);
            fx.ctx.count(Counter::SignsFailed, 1);
            self.signing = None;
        }
        if self.idle(fx.tunnels)
            && self.io.first_request_seen
            && now >= self.io.last_activity + self.idle_timeout
        {
            fx.ctx.count(Counter::TcpTimeouts, 1);
            self.io.close.get_or_insert("idle");
        }
        self.pump(fx);
    }

    /// Drain: HTTP/2 GOAWAY, HTTP/1.1 closes after the current exchange.
    pub fn drain(&mut self, fx: &mut Fx<'_>) {
        match &mut self.session {
            Session::H1(s) => s.drain(&mut self.io),
            Session::H2(s) => s.drain(),
            _ => {
                self.io.close.get_or_insert("drained");
            }
        }
        self.pump(fx);
    }

    /// The connection as `relayctl conns` lists it; packets, losses and
    /// RTT from the kernel's `TCP_INFO`.
    pub fn info(&self, request_id: u64, now: Instant, tunnels: &Tunnels) -> ConnInfo {
        let (transport, established) = match (&self.session, self.io.secure) {
            (Session::H2(_), true) => (Transport::H2, true),
            (Session::H1(_), true) => (Transport::Http1, true),
            (Session::H2(_), false) => (Transport::H2c, true),
            (Session::H1(_), false) => (Transport::Http1Clear, true),
            (Session::Sniff | Session::Handshake, _) => (Transport::TcpPending, false),
        };
        let open = match &self.session {
            Session::H1(s) => s.tunnels().filter(|id| tunnels.is_allowed(*id)).count(),
            Session::H2(s) => s.tunnels().filter(|id| tunnels.is_allowed(*id)).count(),
            _ => 0,
        };
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
            tunnels: open as u32,
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

    /// Releases everything: the session's tunnels, the pending signature,
    /// the socket.
    pub fn close(&mut self, fx: &mut Fx<'_>) {
        match &mut self.session {
            Session::H1(s) => s.close(&mut self.io, fx),
            Session::H2(s) => s.close(&mut self.io, fx),
            _ => {}
        }
        if let Some((id, _)) = self.signing.take() {
            fx.ctx.signs.remove(id);
            keyless::forget(id);
        }
        if let Some(sock) = self.sock.take() {
            fx.ctx.unwatch(self.watch, Closing::Tcp(sock));
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

//! A TCP connection to a CONNECT target (RFC 9110 section 9.3.6), shared
//! by the HTTP/3 request streams and the TCP front: a non-blocking socket,
//! a bounded buffer towards the target, and half-close in both directions.
//!
//! The socket is edge-triggered (the backend's watch list): [`TcpTarget`]
//! remembers whether the last read or write stopped at `EAGAIN`, so its
//! owner can tell "nothing to do until the next readiness event" from "more
//! to do once there is room". It never reads unless its owner has room for
//! the bytes: backpressure towards the target is the kernel's receive
//! window, never an unbounded buffer here.
//!
//! A `wss://` origin's connection runs TLS ([`TcpTarget::start_tls`]): the
//! buffers, reads and totals stay plaintext, and a [`ClientSession`] sits
//! between them and the socket. Its ciphertext towards the origin is
//! bounded ([`CIPHERTEXT_LIMIT`]: plaintext is encrypted only while less
//! waits), and the socket is read only when the session needs more bytes
//! for plaintext its owner has room for. The client's end becomes
//! close_notify, then FIN; the origin's close_notify (or its FIN) is the
//! end of its bytes.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::front::tls::Plain;
use crate::io::Ready;
use crate::origin_tls::{ClientSession, Progress, TlsFailure};

/// Ciphertext waiting for the socket past which no more plaintext is
/// encrypted.
pub const CIPHERTEXT_LIMIT: usize = 64 * 1024;

/// Plaintext encrypted per TLS write (one record's worth).
const TLS_WRITE_CHUNK: usize = 16 * 1024;

/// Ciphertext read from the socket per read (a record and its header).
const TLS_READ_CHUNK: usize = 16 * 1024 + 512;

/// TLS on a target's connection.
#[derive(Debug)]
struct TlsLayer {
    session: ClientSession,
    /// close_notify was written into the output.
    close_sent: bool,
    /// The socket gave end of file.
    sock_eof: bool,
    /// Why the session failed.
    failure: Option<TlsFailure>,
}

/// Where the connection to the target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// The non-blocking connect is in progress.
    Connecting,
    /// Connected: bytes flow.
    Connected,
    /// The connect failed, or the connection broke (its errno).
    Failed(i32),
}

/// What a read from the target gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRead {
    /// This many bytes were appended.
    Data(usize),
    /// Nothing more until the next readiness event (or no room was given).
    Blocked,
    /// The target closed its side (FIN): no more bytes will come.
    Eof,
}

/// A connection to a TCP target.
#[derive(Debug)]
pub struct TcpTarget {
    sock: TcpStream,
    state: TargetState,
    /// Bytes for the target not written yet, from `sent`.
    pending: Vec<u8>,
    sent: usize,
    limit: usize,
    /// The last read did not stop at EAGAIN (or a readiness event came
    /// since): reading may give more.
    readable: bool,
    /// The last write did not stop at EAGAIN.
    writable: bool,
    /// The target sent FIN.
    eof: bool,
    /// The client finished its side: shut down our writing side once
    /// `pending` has drained.
    finish_requested: bool,
    /// Our writing side is shut down.
    write_closed: bool,
    bytes_up: u64,
    bytes_down: u64,
    /// TLS to the target (a `wss://` origin).
    tls: Option<Box<TlsLayer>>,
}

impl TcpTarget {
    /// Starts a non-blocking connect to `addr`, buffering at most `limit`
    /// bytes towards it.
    pub fn connect(addr: SocketAddr, limit: usize) -> io::Result<Self> {
        let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
        // Tunnelled protocols do their own batching (TLS records, HTTP/2
        // frames); Nagle would only add latency.
        s.set_tcp_nodelay(true)?;
        match s.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(Self {
            sock: s.into(),
            state: TargetState::Connecting,
            pending: Vec::new(),
            sent: 0,
            limit,
            readable: false,
            writable: false,
            eof: false,
            finish_requested: false,
            write_closed: false,
            bytes_up: 0,
            bytes_down: 0,
            tls: None,
        })
    }

    /// Runs TLS over the connection from now on (before any byte was
    /// pushed): the handshake starts with the next [`Self::flush`], pushed
    /// bytes are encrypted once it is done, reads decrypt.
    pub fn start_tls(&mut self, session: ClientSession) {
        self.tls = Some(Box::new(TlsLayer { session, close_sent: false, sock_eof: false, failure: None }));
    }

    /// Why TLS to the target failed, once it has.
    pub fn tls_failure(&self) -> Option<&TlsFailure> {
        self.tls.as_ref().and_then(|t| t.failure.as_ref())
    }

    /// Whether TLS to the target has completed its handshake (always
    /// false without TLS).
    pub fn tls_open(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.session.is_open())
    }

    /// The session failed: the connection is broken (its alert, if any,
    /// is still written).
    fn tls_failed(&mut self, failure: TlsFailure) {
        if let Some(t) = self.tls.as_mut() {
            t.failure = Some(failure);
        }
        self.write_ciphertext();
        self.state = TargetState::Failed(libc::EPROTO);
    }

    /// Writes the session's ciphertext while the socket takes it; false
    /// when the connection broke.
    fn write_ciphertext(&mut self) -> bool {
        let Some(t) = self.tls.as_mut() else { return true };
        let out = t.session.output();
        while !out.is_empty() {
            match self.sock.write(out) {
                Ok(0) => break,
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !matches!(self.state, TargetState::Failed(_)) {
                        self.state = TargetState::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    }
                    return false;
                }
            }
        }
        true
    }

    /// [`Self::flush`] with TLS: drives the handshake, encrypts pending
    /// plaintext while the ciphertext stays under its bound, writes, and
    /// ends with close_notify then FIN once the client finished.
    fn flush_tls(&mut self) {
        loop {
            let Some(t) = self.tls.as_mut() else { return };
            if !t.session.is_open() {
                match t.session.handshake() {
                    Progress::Done | Progress::WantInput => {}
                    Progress::Failed(f) => return self.tls_failed(f),
                }
            }
            let mut encrypted = false;
            if t.session.is_open() {
                while self.sent < self.pending.len() && t.session.output().len() < CIPHERTEXT_LIMIT {
                    let end = self.pending.len().min(self.sent + TLS_WRITE_CHUNK);
                    if let Err(f) = t.session.write(&self.pending[self.sent..end]) {
                        return self.tls_failed(f);
                    }
                    self.bytes_up += (end - self.sent) as u64;
                    self.sent = end;
                    encrypted = true;
                }
                if self.sent == self.pending.len() {
                    self.pending.clear();
                    self.sent = 0;
                    if self.finish_requested && !t.close_sent {
                        t.session.close();
                        t.close_sent = true;
                    }
                }
            }
            let before = t.session.output().len();
            if !self.write_ciphertext() {
                return;
            }
            let Some(t) = self.tls.as_mut() else { return };
            let written = t.session.output().len() < before;
            if t.close_sent && t.session.output().is_empty() && !self.write_closed {
                self.write_closed = true;
                let _ = self.sock.shutdown(Shutdown::Write);
            }
            // Go round again only while the socket takes bytes and there
            // is plaintext left to encrypt.
            if !(encrypted && written && self.sent < self.pending.len()) {
                return;
            }
        }
    }

    /// [`Self::read_into`] with TLS: decrypts what the session holds, and
    /// reads the socket only when it needs more.
    fn read_tls(&mut self, out: &mut Vec<u8>, max: usize) -> TargetRead {
        let mut chunk = [0u8; TLS_READ_CHUNK];
        loop {
            let Some(t) = self.tls.as_mut() else { return TargetRead::Blocked };
            if t.session.is_open() {
                match t.session.read(out, max) {
                    Ok(Plain::Data(n)) => {
                        self.bytes_down += n as u64;
                        // Reading may have answered something (a key update).
                        self.write_ciphertext();
                        return TargetRead::Data(n);
                    }
                    Ok(Plain::Closed) => {
                        self.eof = true;
                        return TargetRead::Eof;
                    }
                    Ok(Plain::Blocked) => {}
                    Err(f) => {
                        self.tls_failed(f);
                        return TargetRead::Blocked;
                    }
                }
            }
            if t.sock_eof {
                // The session has all there will be and still wants more.
                if t.session.is_open() {
                    self.eof = true;
                    return TargetRead::Eof;
                }
                self.tls_failed(TlsFailure {
                    error: relay_proto::proxy_status::ProxyError::TlsProtocolError,
                    details: "the origin closed the connection during the TLS handshake".into(),
                });
                return TargetRead::Blocked;
            }
            match self.sock.read(&mut chunk) {
                Ok(0) => {
                    t.sock_eof = true;
                    t.session.feed_eof();
                }
                Ok(n) => t.session.feed(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return TargetRead::Blocked;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.state = TargetState::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    return TargetRead::Blocked;
                }
            }
            if !self.tls_open() {
                // Handshake bytes: drive it (and send what it answers, then
                // the plaintext waiting for it).
                self.flush_tls();
                if self.state != TargetState::Connected {
                    return TargetRead::Blocked;
                }
            }
        }
    }

    /// The protocol the TLS handshake selected by ALPN (none without TLS,
    /// before the handshake completed, or when the origin selected none).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tls.as_ref().and_then(|t| t.session.alpn())
    }

    /// The socket, for the backend's watch list (read and write interest).
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Where the connection is.
    pub fn state(&self) -> TargetState {
        self.state
    }

    /// Records a readiness event. A connect in progress completes (or
    /// fails) on the first writable event.
    pub fn on_ready(&mut self, ready: Ready) {
        self.readable |= ready.readable;
        self.writable |= ready.writable;
        if self.state == TargetState::Connecting && (ready.writable || ready.readable) {
            self.state = match self.sock.take_error() {
                Ok(None) => match self.sock.peer_addr() {
                    Ok(_) => TargetState::Connected,
                    // Not connected yet after all (a spurious wake-up).
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => TargetState::Connecting,
                    Err(e) => TargetState::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
                },
                Ok(Some(e)) | Err(e) => TargetState::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
            };
            if self.state == TargetState::Connecting {
                self.writable = false;
                self.readable = false;
            }
        }
    }

    /// Room left in the buffer towards the target.
    pub fn room(&self) -> usize {
        if self.finish_requested || matches!(self.state, TargetState::Failed(_)) {
            return 0;
        }
        self.limit.saturating_sub(self.pending.len() - self.sent)
    }

    /// Bytes waiting to be written to the target.
    pub fn backlog(&self) -> usize {
        self.pending.len() - self.sent
    }

    /// Queues client bytes for the target (the caller respects [`Self::room`];
    /// bytes beyond it are still taken, the bound is the caller's).
    pub fn push(&mut self, data: &[u8]) {
        if self.sent == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
        }
        self.pending.extend_from_slice(data);
    }

    /// The client ended its side: FIN to the target once the buffer has
    /// drained (half-close, RFC 9114 section 4.4 / RFC 9113 section 8.5).
    pub fn finish(&mut self) {
        self.finish_requested = true;
    }

    /// Whether the target has been sent our FIN.
    pub fn write_closed(&self) -> bool {
        self.write_closed
    }

    /// Whether the target sent its FIN.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Writes what is buffered while the socket takes it; then the FIN if
    /// the client finished. Errors break the connection (the state turns
    /// `Failed`).
    pub fn flush(&mut self) {
        if self.state != TargetState::Connected {
            return;
        }
        if self.tls.is_some() {
            return self.flush_tls();
        }
        while self.sent < self.pending.len() {
            match self.sock.write(&self.pending[self.sent..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.sent += n;
                    self.bytes_up += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.state = TargetState::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    return;
                }
            }
        }
        if self.sent == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
            if self.finish_requested && !self.write_closed {
                self.write_closed = true;
                let _ = self.sock.shutdown(Shutdown::Write);
            }
        }
    }

    /// Reads at most `max` bytes from the target into `out`.
    pub fn read_into(&mut self, out: &mut Vec<u8>, max: usize) -> TargetRead {
        if self.state != TargetState::Connected || self.eof {
            return if self.eof { TargetRead::Eof } else { TargetRead::Blocked };
        }
        if max == 0 {
            return TargetRead::Blocked;
        }
        if self.tls.is_some() {
            return self.read_tls(out, max);
        }
        let start = out.len();
        out.resize(start + max, 0);
        loop {
            match self.sock.read(&mut out[start..]) {
                Ok(0) => {
                    out.truncate(start);
                    self.eof = true;
                    return TargetRead::Eof;
                }
                Ok(n) => {
                    out.truncate(start + n);
                    self.bytes_down += n as u64;
                    return TargetRead::Data(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.truncate(start);
                    self.readable = false;
                    return TargetRead::Blocked;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.truncate(start);
                    self.state = TargetState::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    return TargetRead::Blocked;
                }
            }
        }
    }

    /// Whether a read might give bytes now (no EAGAIN since the last
    /// readiness event).
    pub fn may_read(&self) -> bool {
        let buffered = self.tls.as_ref().is_some_and(|t| t.session.has_buffered() || t.sock_eof);
        self.state == TargetState::Connected && (self.readable || buffered) && !self.eof
    }

    /// Whether buffered bytes wait for the socket to become writable.
    pub fn write_blocked(&self) -> bool {
        let ciphertext = self.tls.as_ref().is_some_and(|t| !t.session.output_is_empty());
        (self.backlog() > 0 || ciphertext) && !self.writable
    }

    /// Bytes written to the target and read from it so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.bytes_up, self.bytes_down)
    }

    /// The socket (to keep open until the backend has forgotten its watch).
    pub fn into_stream(self) -> TcpStream {
        self.sock
    }

    /// Resets the connection (RST instead of FIN): the tunnel was aborted.
    /// The RST goes out when the socket is closed (SO_LINGER 0), once the
    /// backend has forgotten its watch; no shutdown before it, which would
    /// send a FIN first and let the target take a cut-off stream for a
    /// complete one.
    pub fn abort(&mut self) {
        let s = socket2::SockRef::from(&self.sock);
        let _ = s.set_linger(Some(std::time::Duration::ZERO));
    }
}

/// The Proxy-Status error and HTTP status for a failed connect (RFC 9209
/// section 2.3).
pub fn connect_failure(errno: i32) -> (u16, relay_proto::proxy_status::ProxyError, &'static str) {
    use relay_proto::proxy_status::ProxyError;
    match errno {
        libc::ECONNREFUSED => (502, ProxyError::ConnectionRefused, "the target refused the connection"),
        libc::ETIMEDOUT => (504, ProxyError::ConnectionTimeout, "connecting to the target timed out"),
        libc::EHOSTUNREACH | libc::ENETUNREACH => {
            (502, ProxyError::DestinationIpUnroutable, "the target is unreachable")
        }
        _ => (502, ProxyError::DestinationUnavailable, "cannot connect to the target"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    fn ready() -> Ready {
        Ready { readable: true, writable: true }
    }

    /// Polls until the connect finishes (tests have no event loop).
    fn connected(t: &mut TcpTarget) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.state() == TargetState::Connecting {
            assert!(Instant::now() < deadline, "connect did not finish");
            std::thread::sleep(Duration::from_millis(5));
            t.on_ready(ready());
        }
    }

    #[test]
    fn bytes_flow_both_ways_and_half_close_reaches_the_target() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = TcpTarget::connect(listener.local_addr().unwrap(), 1024).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        connected(&mut t);
        assert_eq!(t.state(), TargetState::Connected);
        assert_eq!(t.room(), 1024);
        t.push(b"hello");
        assert_eq!(t.room(), 1024 - 5);
        t.finish();
        assert_eq!(t.room(), 0, "no more bytes after finish");
        t.flush();
        assert!(t.write_closed());
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello", "FIN after the buffered bytes");
        server.write_all(b"world").unwrap();
        drop(server);
        let mut down = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            t.on_ready(Ready { readable: true, writable: false });
            match t.read_into(&mut down, 3) {
                TargetRead::Eof => break,
                TargetRead::Data(n) => assert!(n <= 3),
                TargetRead::Blocked => std::thread::sleep(Duration::from_millis(5)),
            }
            assert!(Instant::now() < deadline);
        }
        assert_eq!(down, b"world");
        assert_eq!(t.totals(), (5, 5));
    }

    #[test]
    fn a_refused_connect_fails_with_its_errno() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        // The listener is dropped: nothing listens on that port now.
        let mut t = TcpTarget::connect(port, 1024).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.state() == TargetState::Connecting {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
            t.on_ready(ready());
        }
        assert_eq!(t.state(), TargetState::Failed(libc::ECONNREFUSED));
        assert_eq!(connect_failure(libc::ECONNREFUSED).0, 502);
    }

    #[test]
    fn reads_stop_at_eagain_and_never_without_room() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = TcpTarget::connect(listener.local_addr().unwrap(), 16).unwrap();
        let (_server, _) = listener.accept().unwrap();
        connected(&mut t);
        let mut out = Vec::new();
        assert_eq!(t.read_into(&mut out, 0), TargetRead::Blocked);
        assert_eq!(t.read_into(&mut out, 8), TargetRead::Blocked, "nothing sent yet: EAGAIN");
        assert!(!t.may_read());
        assert!(out.is_empty());
    }
}

//! The TCP front: HTTP/2 and HTTP/1.1 over TLS (ALPN `h2`, `http/1.1`) on
//! the QUIC port number, and an optional cleartext listener (HTTP/1.1,
//! h2c by prior knowledge or Upgrade) for relays behind a TLS-terminating
//! balancer. Its requests open the same tunnels as HTTP/3 requests
//! ([`crate::tunnel`]: connect-udp, connect-ip and bound UDP as capsules
//! on the stream, classic CONNECT to TCP targets); the front only carries
//! their framing, and sends `Alt-Svc` on every response so clients move to
//! HTTP/3.
//!
//! Placement: each worker owns a listener per address (SO_REUSEPORT, so
//! the kernel spreads connections over the workers) in its own loop, next
//! to its QUIC socket: the sockets are watched descriptors of the worker's
//! backend (io_uring poll or epoll), and everything a connection does
//! happens on the worker's thread. No runtime, no other thread, no lock
//! shared with another worker.
//!
//! Layers, each its own module: [`conn`] moves bytes between the socket,
//! TLS ([`tls`]) and the HTTP session; [`h1`] and [`h2`] are the sessions
//! (the `h2` crate, driven through the in-memory pipe of [`memio`]).

pub mod conn;
pub mod exchange;
pub mod h1;
pub mod h2;
pub mod memio;
pub mod tls;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use boring::ssl::SslContext;
use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::TcpBootstrap;
use relay_proto::channel::record::{ConnInfo, SignResult};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::context::{Ctx, WatchOwner};
use crate::io::Ready;
use crate::slab::{Key as ConnKey, Slab};
use crate::timers::TimerTarget;
use crate::tls::TlsShared;
use crate::tunnel::Tunnels;
use crate::tunnel::datagrams::Limits;
use conn::Conn;

/// Connections accepted per listener per turn at most.
const ACCEPT_BUDGET: usize = 64;

/// Fixed settings of a worker's front.
#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// The TCP front's part of the bootstrap.
    pub tcp: TcpBootstrap,
    /// Capsule tunnel bounds (the stream window is the buffer).
    pub limits: Limits,
}

/// What the front keeps besides its connections, lent to a connection for
/// a call together with the worker's tunnels and context.
pub struct Shared {
    /// Fixed settings.
    pub settings: FrontSettings,
    /// The TLS context for new connections.
    pub tls_ctx: Option<SslContext>,
    /// Connections with work left for the next turn.
    pub due: Vec<ConnKey>,
}

/// Everything a front connection works with during a call.
pub struct Fx<'a> {
    /// The front's shared parts.
    pub sh: &'a mut Shared,
    /// The worker's tunnels.
    pub tunnels: &'a mut Tunnels,
    /// The worker's context.
    pub ctx: &'a mut Ctx,
}

impl Fx<'_> {
    /// Lists connection `key` for another round next turn.
    pub fn due(&mut self, key: ConnKey) {
        if !self.sh.due.contains(&key) {
            self.sh.due.push(key);
        }
    }
}

struct Listener {
    sock: TcpListener,
    tls: bool,
}

/// A worker's TCP front.
pub struct Front {
    shared: Shared,
    listeners: Vec<Listener>,
    conns: Slab<Box<Conn>>,
    /// Listeners with connections left in their backlog.
    accept_due: Vec<usize>,
    tls_epoch: u64,
    tls: Arc<TlsShared>,
    next_serial: u64,
}

/// A TCP listener on `addr` shared by the workers (SO_REUSEPORT).
fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

impl Front {
    /// Binds the worker's listeners. `tls` is the material QUIC serves
    /// too (the same certificate and keyless signing).
    pub fn new(settings: FrontSettings, tls: Arc<TlsShared>) -> io::Result<Self> {
        let mut listeners = Vec::new();
        if let Some(addr) = settings.tcp.listen_tls {
            listeners.push(Listener { sock: listener(addr)?, tls: true });
        }
        if let Some(addr) = settings.tcp.listen_cleartext {
            listeners.push(Listener { sock: listener(addr)?, tls: false });
        }
        let tls_epoch = tls.epoch();
        let tls_ctx = tls::context(&tls.current(), tls.tickets())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Self {
            shared: Shared { settings, tls_ctx: Some(tls_ctx), due: Vec::new() },
            listeners,
            conns: Slab::new(),
            accept_due: Vec::new(),
            tls_epoch,
            tls,
            next_serial: 1,
        })
    }

    /// The listeners' addresses (for logs and tests).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.sock.local_addr().ok()).collect()
    }

    /// Registers the listeners with the backend (first turn).
    pub fn start(&mut self, ctx: &mut Ctx) {
        for (i, l) in self.listeners.iter().enumerate() {
            ctx.watch(l.sock.as_raw_fd(), WatchOwner::Listener(i), false);
        }
    }

    /// Up to `limit` of the front's connections as `relayctl conns` lists
    /// them, and how many it has.
    pub fn list(
        &self,
        request_id: u64,
        limit: usize,
        now: Instant,
        tunnels: &Tunnels,
    ) -> (Vec<ConnInfo>, usize) {
        let listed = self.conns.iter().take(limit).map(|(_, c)| c.info(request_id, now, tunnels)).collect();
        (listed, self.conns.len())
    }

    /// Whether work is left for the next turn.
    pub fn busy(&self) -> bool {
        !self.shared.due.is_empty() || !self.accept_due.is_empty()
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Listener `i` has connections to accept.
    pub fn on_listener(&mut self, i: usize, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        self.accept(i, tunnels, ctx);
    }

    /// Connection `key`'s socket is ready.
    pub fn on_ready(&mut self, key: ConnKey, ready: Ready, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        self.with_conn(key, tunnels, ctx, |conn, fx| conn.on_socket_ready(ready, fx));
    }

    /// One of connection `key`'s tunnels has something for the client:
    /// the connection moves bytes at the end of the turn.
    pub fn wake(&mut self, key: ConnKey) {
        if !self.shared.due.contains(&key) {
            self.shared.due.push(key);
        }
    }

    /// Control's answer to connection `key`'s signing ask.
    pub fn on_signed(
        &mut self,
        key: ConnKey,
        sign_id: u64,
        result: SignResult,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
    ) {
        let signature = match result {
            SignResult::Signature(sig) => Some(sig),
            SignResult::Failed(why) => {
                let conn = self.conns.get(key).map(|c| c.serial);
                warn!(conn, "control could not sign a TCP handshake: {why}");
                ctx.count(Counter::SignsFailed, 1);
                None
            }
        };
        crate::keyless::deliver(sign_id, signature);
        self.with_conn(key, tunnels, ctx, |conn, fx| conn.on_signed(sign_id, fx));
    }

    /// Connection `key`'s timer (armed for `at`) may be due.
    pub fn on_timer(&mut self, key: ConnKey, at: Instant, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        if !self.timer_live(key, at) {
            return; // stale
        }
        self.with_conn(key, tunnels, ctx, |conn, fx| {
            conn.armed = None;
            conn.on_timer(fx);
        });
    }

    /// Whether a timer entry for connection `key` at `at` is live
    /// (compaction).
    pub fn timer_live(&self, key: ConnKey, at: Instant) -> bool {
        self.conns.get(key).is_some_and(|c| c.armed == Some(at))
    }

    fn with_conn(
        &mut self,
        key: ConnKey,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
        f: impl FnOnce(&mut Conn, &mut Fx<'_>),
    ) {
        let Some(mut conn) = self.conns.take(key) else { return };
        let mut fx = Fx { sh: &mut self.shared, tunnels, ctx };
        f(&mut conn, &mut fx);
        self.settle(key, conn, tunnels, ctx);
    }

    /// Puts a connection back after work, or closes it.
    fn settle(&mut self, key: ConnKey, mut conn: Box<Conn>, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        if conn.is_done() {
            self.conns.release(key);
            let mut fx = Fx { sh: &mut self.shared, tunnels, ctx };
            conn.close(&mut fx);
            ctx.link.counters().sub(Counter::TcpConnectionsActive, 1);
            return;
        }
        if let Some(at) = conn.next_deadline(tunnels)
            && conn.armed != Some(at)
        {
            conn.armed = Some(at);
            ctx.timers.push(at, TimerTarget::FrontConn(key));
        }
        self.conns.put(key, conn);
    }

    fn accept(&mut self, i: usize, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        for _ in 0..ACCEPT_BUDGET {
            let (sock, peer) = match self.listeners[i].sock.accept() {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the listener stays watched; the
                    // backlog is retried next turn.
                    warn!("TCP accept: {e}");
                    self.accept_due.push(i);
                    return;
                }
            };
            let full = self.conns.len() >= self.shared.settings.tcp.max_connections_per_worker as usize;
            if full || ctx.draining {
                ctx.count(Counter::TcpConnectionsRejected, 1);
                continue; // dropped: the kernel resets or closes it
            }
            if let Err(e) = sock.set_nonblocking(true).and_then(|_| sock.set_nodelay(true)) {
                debug!("TCP socket setup: {e}");
                continue;
            }
            let tls = self.listeners[i].tls;
            let serial = self.next_serial;
            self.next_serial += 1;
            let conn = match Conn::new(sock, peer, tls, serial, &self.shared, ctx.now) {
                Ok(c) => c,
                Err(e) => {
                    debug!("TCP connection setup: {e}");
                    continue;
                }
            };
            ctx.count(Counter::TcpConnectionsAccepted, 1);
            ctx.count(Counter::TcpConnectionsActive, 1);
            let key = self.conns.insert(Box::new(conn));
            self.with_conn(key, tunnels, ctx, |conn, fx| conn.register(key, fx));
        }
        // More may be waiting: come back next turn.
        if !self.accept_due.contains(&i) {
            self.accept_due.push(i);
        }
    }

    /// End of the worker's turn: listeners and connections with work left
    /// (or woken by their tunnels), and new TLS material.
    pub fn end_turn(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        if self.tls.epoch() != self.tls_epoch {
            self.tls_epoch = self.tls.epoch();
            match tls::context(&self.tls.current(), self.tls.tickets()) {
                Ok(c) => self.shared.tls_ctx = Some(c),
                Err(e) => warn!("new TLS material refused by the TCP front: {e}"),
            }
        }
        for i in std::mem::take(&mut self.accept_due) {
            self.accept(i, tunnels, ctx);
        }
        for key in std::mem::take(&mut self.shared.due) {
            self.with_conn(key, tunnels, ctx, |conn, fx| conn.pump(fx));
        }
    }

    /// Drain: listeners stop accepting, HTTP/2 connections get GOAWAY,
    /// HTTP/1.1 ones close after their exchange; tunnels run on.
    pub fn start_drain(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        for key in self.conns.keys() {
            self.with_conn(key, tunnels, ctx, |conn, fx| conn.drain(fx));
        }
    }

    /// Control was replaced: the signature connection `key` waited for
    /// will never come.
    pub fn fail_sign(&mut self, key: ConnKey, sign_id: u64, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        self.on_signed(key, sign_id, SignResult::Failed("control plane restarted".into()), tunnels, ctx);
    }

    /// Closes everything (the worker stops).
    pub fn shutdown(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        for key in self.conns.keys() {
            if let Some(mut conn) = self.conns.take(key) {
                self.conns.release(key);
                let mut fx = Fx { sh: &mut self.shared, tunnels, ctx };
                conn.close(&mut fx);
                ctx.link.counters().sub(Counter::TcpConnectionsActive, 1);
            }
        }
        info!(worker = ctx.settings.index, "TCP front stopped");
    }
}

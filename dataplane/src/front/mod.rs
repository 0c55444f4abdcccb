//! The TCP front: HTTP/2 and HTTP/1.1 over TLS (ALPN `h2`, `http/1.1`) on
//! the QUIC port number, and an optional cleartext listener (HTTP/1.1,
//! h2c by prior knowledge or Upgrade) for relays behind a TLS-terminating
//! balancer. It carries the same tunnels as HTTP/3 — connect-udp and
//! connect-ip as capsules on the stream, and classic CONNECT to TCP
//! targets — with the same authorization through control, and sends
//! `Alt-Svc` on every response so clients move to HTTP/3.
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
//! (the `h2` crate, driven through the in-memory pipe of [`memio`]);
//! [`exchange`] is one request and its tunnel, whatever the version.

pub mod conn;
pub mod exchange;
pub mod flows;
pub mod h1;
pub mod h2;
pub mod memio;
pub mod tls;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boring::ssl::SslContext;
use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::{Bootstrap, TcpBootstrap};
use relay_proto::channel::record::{FlowClosed, FlowOpen, Verdict};
use relay_proto::template::{IpUriTemplate, UriTemplate};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::io::{Output, Ready, TargetKey, Watch, WatchKey};
use crate::link::ControlLink;
use crate::slab::{Key as ConnKey, Slab};
use crate::tls::TlsShared;
use crate::tunnel::Limits;
use conn::Conn;

/// Watch keys of the front carry this bit (the bound UDP sockets' keys
/// count up from 1 and stay far below it).
pub const FRONT_WATCH_BIT: WatchKey = 1 << 54;

/// Connections accepted per listener per turn at most.
const ACCEPT_BUDGET: usize = 64;

/// What the worker lends the front for a call.
pub struct Ctx<'a> {
    /// The channel to control.
    pub link: &'a mut ControlLink,
    /// The backend's output queue (watches, UDP target sockets, batches).
    pub out: &'a mut Output,
    /// This turn's clock.
    pub now: Instant,
    /// The worker's target key counter (shared with QUIC tunnels).
    pub next_target: &'a mut TargetKey,
    /// The worker is draining.
    pub draining: bool,
    /// The worker's connect-ip side (TUN device, address map), when served.
    pub ip: Option<&'a mut crate::worker::IpSide>,
}

/// Fixed settings of a worker's front.
pub struct FrontSettings {
    /// The TCP front's part of the bootstrap.
    pub tcp: TcpBootstrap,
    /// connect-udp's URI template.
    pub template: UriTemplate,
    /// connect-ip's, when served.
    pub ip_template: Option<IpUriTemplate>,
    /// Proxy-Status name.
    pub proxy_name: String,
    /// Proxy-Authenticate realm.
    pub realm: String,
    /// How long an ask (or a handshake signature) may take.
    pub ask_timeout: Duration,
    /// Capsule tunnel bounds.
    pub limits: Limits,
    /// The worker's index (status endpoint).
    pub worker: u32,
}

/// Who owns a watched descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Listener `i`.
    Listener(usize),
    /// A client connection.
    Client(ConnKey),
    /// A TCP target of a connection's exchange.
    Target(ConnKey, u32),
}

/// Everything of the front but the connections themselves (so a
/// connection taken out of the slab can use it).
pub struct Shared {
    /// Fixed settings.
    pub settings: FrontSettings,
    /// The TLS context for new connections.
    pub tls_ctx: Option<SslContext>,
    /// Watched descriptors.
    pub owners: HashMap<WatchKey, Owner>,
    next_watch: WatchKey,
    /// Authorization asks in flight: ask ID -> (connection, stream).
    pub asks: HashMap<u64, (ConnKey, u32)>,
    /// Handshake signatures in flight: sign ID -> connection.
    pub signs: HashMap<u64, ConnKey>,
    /// UDP target sockets of capsule tunnels.
    pub udp_targets: HashMap<TargetKey, (ConnKey, u32)>,
    timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    /// Connections with work left for the next turn.
    pub due: Vec<ConnKey>,
    /// Exchanges with a UDP batch collected this turn.
    pub dirty_up: Vec<(ConnKey, u32)>,
    /// Tunnels open on the front.
    pub tunnels_open: usize,
    /// Sockets closed this turn, kept until the backend has forgotten them
    /// (so no queued poll names a reused descriptor).
    closing: Vec<std::net::TcpStream>,
}

impl Shared {
    /// A fresh watch key.
    pub fn watch_key(&mut self) -> WatchKey {
        let k = self.next_watch;
        self.next_watch += 1;
        k
    }

    /// Watches `fd` (read and write) for `owner`.
    pub fn watch(&mut self, out: &mut Output, fd: std::os::fd::RawFd, owner: Owner) -> WatchKey {
        let key = self.watch_key();
        self.owners.insert(key, owner);
        out.watches.push(Watch { key, fd, writable: true });
        key
    }

    /// Forgets a watch; `sock` is dropped once the backend has forgotten it.
    pub fn unwatch(&mut self, out: &mut Output, key: WatchKey, sock: std::net::TcpStream) {
        self.owners.remove(&key);
        if let Some(i) = out.watches.iter().position(|w| w.key == key) {
            // Never handed to the backend.
            out.watches.swap_remove(i);
        } else {
            out.unwatches.push((key, sock.as_raw_fd()));
        }
        self.closing.push(sock);
    }

    /// Arms a timer for connection `key` at `at`.
    pub fn arm(&mut self, key: ConnKey, at: Instant) {
        self.timers.push(Reverse((at, key)));
    }

    /// Reports a flow's end to control and the counters.
    pub fn flow_closed(&mut self, link: &mut ControlLink, closed: FlowClosed) {
        link.flow_closed(closed);
        self.tunnels_open = self.tunnels_open.saturating_sub(1);
        link.counters().add(Counter::TunnelsClosed, 1);
        link.counters().sub(Counter::TunnelsActive, 1);
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
    pub fn new(b: &Bootstrap, settings: FrontSettings, tls: Arc<TlsShared>) -> io::Result<Self> {
        let mut listeners = Vec::new();
        if let Some(addr) = settings.tcp.listen_tls {
            listeners.push(Listener { sock: listener(addr)?, tls: true });
        }
        if let Some(addr) = settings.tcp.listen_cleartext {
            listeners.push(Listener { sock: listener(addr)?, tls: false });
        }
        let _ = b;
        let tls_epoch = tls.epoch();
        let tls_ctx = tls::context(&tls.current(), tls.tickets())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Self {
            shared: Shared {
                settings,
                tls_ctx: Some(tls_ctx),
                owners: HashMap::new(),
                next_watch: FRONT_WATCH_BIT,
                asks: HashMap::new(),
                signs: HashMap::new(),
                udp_targets: HashMap::new(),
                timers: BinaryHeap::new(),
                due: Vec::new(),
                dirty_up: Vec::new(),
                tunnels_open: 0,
                closing: Vec::new(),
            },
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
    pub fn start(&mut self, out: &mut Output) {
        for i in 0..self.listeners.len() {
            let fd = self.listeners[i].sock.as_raw_fd();
            let key = self.shared.watch_key();
            self.shared.owners.insert(key, Owner::Listener(i));
            out.watches.push(Watch { key, fd, writable: false });
        }
    }

    /// Whether `key` is one of the front's watches.
    pub fn owns_watch(key: WatchKey) -> bool {
        key & FRONT_WATCH_BIT != 0
    }

    /// Whether `key` is one of the front's UDP target sockets.
    pub fn owns_target(&self, key: TargetKey) -> bool {
        self.shared.udp_targets.contains_key(&key)
    }

    /// Whether `ask_id` is one of the front's asks.
    pub fn owns_ask(&self, ask_id: u64) -> bool {
        self.shared.asks.contains_key(&ask_id)
    }

    /// Whether `sign_id` is one of the front's signing asks.
    pub fn owns_sign(&self, sign_id: u64) -> bool {
        self.shared.signs.contains_key(&sign_id)
    }

    /// Up to `limit` of the front's connections as `relayctl conns` lists
    /// them, and how many it has.
    pub fn list_conns(
        &self,
        request_id: u64,
        limit: usize,
        now: Instant,
    ) -> (Vec<relay_proto::channel::record::ConnInfo>, usize) {
        let listed = self.conns.iter().take(limit).map(|(_, c)| c.info(request_id, now)).collect();
        (listed, self.conns.len())
    }

    /// Tunnels open (the drain waits for them).
    pub fn tunnels_open(&self) -> usize {
        self.shared.tunnels_open
    }

    /// Whether work is left for the next turn.
    pub fn busy(&self) -> bool {
        !self.shared.due.is_empty() || !self.accept_due.is_empty()
    }

    /// The earliest timer.
    pub fn next_timer(&self) -> Option<Instant> {
        self.shared.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// A turn begins: sockets closed last turn are forgotten by now.
    pub fn begin_turn(&mut self) {
        self.shared.closing.clear();
    }

    /// A watched descriptor is ready.
    pub fn on_ready(&mut self, ctx: &mut Ctx<'_>, key: WatchKey, ready: Ready) {
        match self.shared.owners.get(&key).copied() {
            Some(Owner::Listener(i)) => self.accept(ctx, i),
            Some(Owner::Client(c)) => {
                self.with_conn(ctx, c, |conn, sh, ctx| conn.on_socket_ready(ready, sh, ctx))
            }
            Some(Owner::Target(c, stream)) => {
                self.with_conn(ctx, c, |conn, sh, ctx| conn.on_target_ready(stream, ready, sh, ctx))
            }
            None => {}
        }
    }

    /// Payloads from a UDP target of a capsule tunnel.
    pub fn on_target(&mut self, ctx: &mut Ctx<'_>, key: TargetKey, payloads: &[u8], segment_size: usize) {
        let Some(&(c, stream)) = self.shared.udp_targets.get(&key) else { return };
        self.with_conn(ctx, c, |conn, sh, ctx| conn.on_udp_payloads(stream, payloads, segment_size, sh, ctx));
    }

    /// The OS reported a UDP target unreachable: the tunnel closes (RFC 9298
    /// section 3.1).
    pub fn on_target_unreachable(&mut self, ctx: &mut Ctx<'_>, key: TargetKey) {
        let Some(&(c, stream)) = self.shared.udp_targets.get(&key) else { return };
        ctx.link.counters().add(Counter::TunnelsTargetUnreachable, 1);
        self.with_conn(ctx, c, |conn, sh, ctx| conn.end_exchange(stream, false, sh, ctx));
    }

    /// Control answered an ask.
    pub fn on_answer(&mut self, ctx: &mut Ctx<'_>, ask_id: u64, verdict: Verdict) {
        let Some((c, stream)) = self.shared.asks.remove(&ask_id) else { return };
        if !self.conns.contains(c) {
            if let Some(flow_id) = allowed_flow(&verdict) {
                ctx.link.flow_closed(FlowClosed::unused(flow_id));
            }
            return;
        }
        self.with_conn(ctx, c, |conn, sh, ctx| conn.on_verdict(stream, verdict, sh, ctx));
    }

    /// Whether a packet from the TUN device for connect-ip tunnel
    /// (`conn`, `stream`) comes from inside its routes (`None`: no such
    /// tunnel).
    pub fn ip_routes_allow(
        &self,
        conn: ConnKey,
        stream: u32,
        info: &relay_proto::ip::packet::PacketInfo,
    ) -> Option<bool> {
        self.conns.get(conn)?.ip_routes_allow(stream, info)
    }

    /// A packet from the TUN device for connect-ip tunnel (`conn`, `stream`).
    pub fn ip_down(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, stream: u32, packet: &[u8]) {
        self.with_conn(ctx, conn, |c, sh, ctx| c.on_ip_packet(stream, packet, sh, ctx));
    }

    /// Control answered a signing ask (`None`: failed).
    pub fn on_sign(&mut self, ctx: &mut Ctx<'_>, sign_id: u64, signature: Option<Vec<u8>>) {
        let Some(c) = self.shared.signs.remove(&sign_id) else { return };
        crate::keyless::deliver(sign_id, signature);
        self.with_conn(ctx, c, |conn, sh, ctx| conn.on_signed(sign_id, sh, ctx));
    }

    fn with_conn(
        &mut self,
        ctx: &mut Ctx<'_>,
        key: ConnKey,
        f: impl FnOnce(&mut Conn, &mut Shared, &mut Ctx<'_>),
    ) {
        let Some(mut conn) = self.conns.take(key) else { return };
        f(&mut conn, &mut self.shared, ctx);
        self.settle(ctx, key, conn);
    }

    /// Puts a connection back after work, or closes it.
    fn settle(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, mut conn: Box<Conn>) {
        if conn.is_done() {
            self.conns.release(key);
            conn.close(&mut self.shared, ctx);
            ctx.link.counters().sub(Counter::TcpConnectionsActive, 1);
            return;
        }
        if let Some(at) = conn.next_deadline()
            && conn.armed != Some(at)
        {
            conn.armed = Some(at);
            self.shared.arm(key, at);
        }
        self.conns.put(key, conn);
    }

    fn accept(&mut self, ctx: &mut Ctx<'_>, i: usize) {
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
                ctx.link.counters().add(Counter::TcpConnectionsRejected, 1);
                continue; // dropped: the kernel resets or closes it
            }
            if let Err(e) = sock.set_nonblocking(true).and_then(|_| sock.set_nodelay(true)) {
                debug!("TCP socket setup: {e}");
                continue;
            }
            let tls = self.listeners[i].tls;
            let serial = self.next_serial;
            self.next_serial += 1;
            let conn = match Conn::new(sock, peer, tls, serial, &mut self.shared, ctx) {
                Ok(c) => c,
                Err(e) => {
                    debug!("TCP connection setup: {e}");
                    continue;
                }
            };
            ctx.link.counters().add(Counter::TcpConnectionsAccepted, 1);
            ctx.link.counters().add(Counter::TcpConnectionsActive, 1);
            let key = self.conns.insert(Box::new(conn));
            let Some(mut conn) = self.conns.take(key) else { continue };
            conn.register(key, &mut self.shared, ctx);
            self.settle(ctx, key, conn);
        }
        // More may be waiting: come back next turn.
        if !self.accept_due.contains(&i) {
            self.accept_due.push(i);
        }
    }

    /// End of the worker's turn: listeners and connections with work left,
    /// timers, new TLS material, batches towards UDP targets.
    pub fn end_turn(&mut self, ctx: &mut Ctx<'_>) {
        if self.tls.epoch() != self.tls_epoch {
            self.tls_epoch = self.tls.epoch();
            match tls::context(&self.tls.current(), self.tls.tickets()) {
                Ok(c) => self.shared.tls_ctx = Some(c),
                Err(e) => warn!("new TLS material refused by the TCP front: {e}"),
            }
        }
        for i in std::mem::take(&mut self.accept_due) {
            self.accept(ctx, i);
        }
        for key in std::mem::take(&mut self.shared.due) {
            self.with_conn(ctx, key, |conn, sh, ctx| conn.pump(sh, ctx));
        }
        let now = ctx.now;
        while let Some(Reverse((at, key))) = self.shared.timers.peek().copied() {
            if at > now {
                break;
            }
            self.shared.timers.pop();
            let Some(conn) = self.conns.get(key) else { continue };
            if conn.armed != Some(at) {
                continue; // stale
            }
            self.with_conn(ctx, key, |conn, sh, ctx| {
                conn.armed = None;
                conn.on_timer(sh, ctx);
            });
        }
        if self.shared.timers.len() > 4 * self.conns.len() + 1024 {
            let conns = &self.conns;
            let live: Vec<_> = self
                .shared
                .timers
                .drain()
                .filter(|Reverse((at, k))| conns.get(*k).is_some_and(|c| c.armed == Some(*at)))
                .collect();
            self.shared.timers.extend(live);
        }
        for (key, stream) in std::mem::take(&mut self.shared.dirty_up) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.flush_udp(stream, ctx);
            }
        }
    }

    /// Drain: listeners stop accepting, HTTP/2 connections get GOAWAY,
    /// HTTP/1.1 ones close after their exchange; tunnels run on.
    pub fn start_drain(&mut self, ctx: &mut Ctx<'_>) {
        for key in self.conns.keys() {
            self.with_conn(ctx, key, |conn, sh, ctx| conn.drain(sh, ctx));
        }
    }

    /// Ends the tunnels control was asked to kill.
    pub fn kill(&mut self, ctx: &mut Ctx<'_>, flows: &[u64]) {
        for key in self.conns.keys() {
            self.with_conn(ctx, key, |conn, sh, ctx| conn.kill(flows, sh, ctx));
        }
    }

    /// Control's answer to an address ask for one of the front's connect-ip
    /// tunnels (none holds it when the tunnel ended meanwhile).
    pub fn address_answer(&mut self, ctx: &mut Ctx<'_>, a: relay_proto::channel::record::AddressAnswer) {
        for key in self.conns.keys() {
            let mut held = false;
            self.with_conn(ctx, key, |conn, sh, ctx| {
                held = conn.visit_exchanges(sh, ctx, |ex, ctx| flows::address_answer(ex, &a, ctx));
            });
            if held {
                return;
            }
        }
    }

    /// Control was replaced: asks and signatures sent to the old one are
    /// failed, and the open flows are listed for the new one.
    pub fn on_relink(&mut self, ctx: &mut Ctx<'_>) -> Vec<FlowOpen> {
        let signs: Vec<u64> = self.shared.signs.keys().copied().collect();
        for sign_id in signs {
            self.on_sign(ctx, sign_id, None);
        }
        let asks: Vec<u64> = self.shared.asks.keys().copied().collect();
        for ask_id in asks {
            self.on_answer(
                ctx,
                ask_id,
                Verdict::Deny {
                    status: 503,
                    proxy_error: Some(relay_proto::proxy_status::ProxyError::ProxyInternalError),
                    details: "control plane restarted".into(),
                    retry_after_secs: 0,
                },
            );
        }
        // Address requests asked of the old control are refused.
        for key in self.conns.keys() {
            self.with_conn(ctx, key, |conn, sh, ctx| {
                conn.visit_exchanges(sh, ctx, |ex, ctx| {
                    flows::refuse_pending_addresses(ex, ctx);
                    false
                });
            });
        }
        let mut open = Vec::new();
        for (_, conn) in self.conns.iter() {
            conn.open_flows(&mut open);
        }
        open
    }

    /// Closes everything (the worker stops).
    pub fn shutdown(&mut self, ctx: &mut Ctx<'_>) {
        for key in self.conns.keys() {
            if let Some(mut conn) = self.conns.take(key) {
                self.conns.release(key);
                conn.close(&mut self.shared, ctx);
                ctx.link.counters().sub(Counter::TcpConnectionsActive, 1);
            }
        }
        info!(worker = self.shared.settings.worker, "TCP front stopped");
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

/// The flow ID of an allowing verdict.
pub fn allowed_flow(v: &Verdict) -> Option<u64> {
    match v {
        Verdict::Allow { flow_id, .. }
        | Verdict::AllowIp { flow_id, .. }
        | Verdict::AllowBind { flow_id, .. } => Some(*flow_id),
        Verdict::Deny { .. } => None,
    }
}

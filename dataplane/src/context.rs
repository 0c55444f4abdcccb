//! What every part of a worker shares: its settings, the channel to
//! control, the backend's output queue, the timers, the clock of the turn,
//! and the registries that say who owns each key the backend or control
//! hands back.
//!
//! The HTTP/3 side ([`crate::h3`]), the TCP front ([`crate::front`]) and
//! the tunnel layer ([`crate::tunnel`]) each get a `&mut Ctx` for a call;
//! none of them owns another, and this module depends on none of them.

use std::net::{TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::{Bootstrap, Protocol};
use relay_proto::cid::CidConfigs;
use relay_proto::template::{IpUriTemplate, UriTemplate};

pub use crate::registry::{Carrier, TunnelId, WatchOwner};

use crate::io::{Endpoint, Output, TargetKey, Watch, WatchKey};
use crate::link::ControlLink;
use crate::registry::{KeyCounter, Registry};
use crate::timers::Timers;

/// The names a relay puts in its answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The proxy's name in Proxy-Status.
    pub proxy: String,
    /// The realm of Proxy-Authenticate challenges.
    pub realm: String,
}

/// What the relay serves, as routing needs it.
#[derive(Debug, Clone)]
pub struct Served {
    /// connect-udp's URI template (bound UDP uses it too).
    pub template: UriTemplate,
    /// connect-ip's, when connect-ip is served.
    pub ip_template: Option<IpUriTemplate>,
    /// `:protocol = connect-udp` is served.
    pub connect_udp: bool,
    /// Bound connect-udp is served.
    pub bind: bool,
    /// WebSocket (`:protocol websocket`, HTTP/1.1 `Upgrade: websocket`) is
    /// relayed to upstream origins (control has `[[upstreams]]` routes).
    pub websocket: bool,
    /// WebTransport over HTTP/3 (`:protocol webtransport`) is relayed to
    /// upstream origins over HTTP/3.
    pub webtransport: bool,
}

/// A worker's fixed settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Worker index.
    pub index: u32,
    /// What control sent at attach.
    pub bootstrap: Bootstrap,
    /// Names in answers (Proxy-Status, Proxy-Authenticate).
    pub names: Names,
    /// What the relay serves (routing).
    pub served: Served,
    /// How long an ask (or a handshake signature) may take.
    pub ask_timeout: Duration,
    /// The connection ID layout (QUIC-LB) shared by every worker.
    pub cids: CidConfigs,
    /// The upstream routes and their TLS settings (`wss://` origins),
    /// built once at attach ([`crate::origin_tls::OriginTls::from_bootstrap`]).
    pub origin_tls: std::sync::Arc<crate::origin_tls::OriginTls>,
}

impl Settings {
    /// The settings of worker `index` from the bootstrap; `template` and
    /// `ip_template` are the parsed URI templates.
    pub fn new(
        index: u32,
        bootstrap: Bootstrap,
        template: UriTemplate,
        ip_template: Option<IpUriTemplate>,
        cids: CidConfigs,
    ) -> Self {
        let names = Names { proxy: bootstrap.proxy_name.clone(), realm: bootstrap.auth_realm.clone() };
        let served = Served {
            template,
            ip_template,
            connect_udp: bootstrap.protocols.contains(&Protocol::ConnectUdp),
            bind: bootstrap.bind.is_some(),
            websocket: bootstrap.protocols.contains(&Protocol::Websocket),
            webtransport: bootstrap.protocols.contains(&Protocol::Webtransport),
        };
        let ask_timeout = Duration::from_millis(u64::from(bootstrap.ask_timeout_ms));
        Self { index, bootstrap, names, served, ask_timeout, cids, origin_tls: Default::default() }
    }
}

/// A socket closed this turn, kept open until the backend has forgotten
/// it (so no queued poll or receive names a reused descriptor).
#[derive(Debug)]
pub enum Closing {
    /// A TCP socket.
    Tcp(TcpStream),
    /// A UDP socket.
    Udp(UdpSocket),
}

impl AsRawFd for Closing {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Closing::Tcp(s) => s.as_raw_fd(),
            Closing::Udp(s) => s.as_raw_fd(),
        }
    }
}

/// The worker's shared context.
pub struct Ctx {
    /// Fixed settings.
    pub settings: Settings,
    /// The channel to control.
    pub link: ControlLink,
    /// What the backend performs at the end of the turn.
    pub out: Output,
    /// Timers of every part.
    pub timers: Timers,
    /// This turn's clock.
    pub now: Instant,
    /// The worker is draining: no new connections or tunnels.
    pub draining: bool,
    /// UDP target sockets and their tunnels.
    pub endpoints: Registry<TargetKey, TunnelId>,
    endpoint_keys: KeyCounter,
    /// Watched descriptors and their owners.
    pub watches: Registry<WatchKey, WatchOwner>,
    watch_keys: KeyCounter,
    /// Authorization asks in flight and their tunnels.
    pub asks: Registry<u64, TunnelId>,
    /// Handshake signatures in flight and their connections.
    pub signs: Registry<u64, Carrier>,
    closing: Vec<Closing>,
}

impl Ctx {
    /// A context for a worker with `settings` and its channel to control.
    pub fn new(settings: Settings, link: ControlLink, now: Instant) -> Self {
        Self {
            settings,
            link,
            out: Output::new(),
            timers: Timers::new(),
            now,
            draining: false,
            endpoints: Registry::new(),
            endpoint_keys: KeyCounter::default(),
            watches: Registry::new(),
            watch_keys: KeyCounter::default(),
            asks: Registry::new(),
            signs: Registry::new(),
            closing: Vec::new(),
        }
    }

    /// Adds `n` to a counter.
    pub fn count(&self, c: Counter, n: u64) {
        self.link.counters().add(c, n);
    }

    /// A turn begins at `now`: sockets closed last turn are forgotten by
    /// the backend and can be closed.
    pub fn begin_turn(&mut self, now: Instant) {
        self.now = now;
        self.closing.clear();
    }

    /// Watches `fd` for `owner` (read, and write when `writable`).
    pub fn watch(&mut self, fd: RawFd, owner: WatchOwner, writable: bool) -> WatchKey {
        let key = self.watch_keys.fresh();
        self.watches.insert(key, owner);
        self.out.watches.push(Watch { key, fd, writable });
        key
    }

    /// Forgets a watch; `sock` is closed once the backend has forgotten it.
    pub fn unwatch(&mut self, key: WatchKey, sock: Closing) {
        self.watches.remove(key);
        if let Some(i) = self.out.watches.iter().position(|w| w.key == key) {
            // Never handed to the backend: nothing to forget.
            self.out.watches.swap_remove(i);
        } else {
            self.out.unwatches.push((key, sock.as_raw_fd()));
        }
        self.closing.push(sock);
    }

    /// Hands a UDP socket (`connected` to its target, or not: a bound
    /// tunnel's) to the backend for `owner`; returns its key.
    pub fn open_endpoint(&mut self, sock: UdpSocket, owner: TunnelId, connected: bool) -> TargetKey {
        let key = self.endpoint_keys.fresh();
        self.endpoints.insert(key, owner);
        self.out.opens.push(Endpoint { key, sock, connected });
        key
    }

    /// Stops reading from an endpoint until [`Ctx::resume_endpoint`].
    pub fn pause_endpoint(&mut self, key: TargetKey) {
        self.out.pauses.push(key);
    }

    /// Reads from a paused endpoint again.
    pub fn resume_endpoint(&mut self, key: TargetKey) {
        self.out.resumes.push(key);
    }

    /// Closes an endpoint after its queued sends.
    pub fn close_endpoint(&mut self, key: TargetKey) {
        self.endpoints.remove(key);
        self.out.closes.push(key);
    }
}

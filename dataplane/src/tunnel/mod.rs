//! The tunnel layer: every tunnel of a worker, whatever HTTP version
//! carries it, lives here once.
//!
//! A carrier (an HTTP/3 connection in [`crate::h3`], an HTTP/2 or HTTP/1.1
//! connection of the TCP front in [`crate::front`]) hands over each request
//! it parsed ([`Tunnels::start`]); from then on the tunnel layer owns
//! routing ([`route`]), the ask/verdict exchange with control, the per-kind
//! state ([`State`]: connect-udp, connect-ip, bound UDP, classic CONNECT,
//! WebSocket relayed to an origin),
//! forwarding both ways, ending and accounting. The carrier only moves its
//! framing: stream bytes in ([`Tunnels::on_stream_bytes`]), HTTP/3
//! datagrams in ([`Tunnels::on_datagram`]), and out: the response head
//! ([`Tunnels::take_head`]), stream bytes ([`Tunnels::out`]) and the end
//! ([`Tunnels::end`]). Towards the client, HTTP/3 datagrams go through the
//! carrier's [`DatagramPath`].
//!
//! Where each RFC rule of tunnel handling lives: request classification in
//! [`route`] (RFC 9298 section 3, RFC 9484 section 4, the bind draft
//! section 2, RFC 9110 section 9.3.6); answers in [`head`]; payload rules
//! (context IDs, sizes, capsule parsing, RFC 9297/9298 section 5) in
//! [`datagrams`]; UDP forwarding in [`udp`]; connect-ip's packet checks,
//! ICMP and address capsules in [`ip`]; bound UDP's context table use in
//! [`bind`]; classic CONNECT's half-close in [`tcp`]; WebSocket's upstream
//! handshake in [`websocket`] (its request checks in [`route`] and
//! `relay_proto::websocket`); the lifecycle (ask,
//! verdict, deadlines, ending, reporting flows) here.

pub mod backpressure;
pub mod bind;
pub mod datagrams;
pub mod flow;
pub mod head;
pub mod ip;
pub mod route;
pub mod tcp;
pub mod udp;
pub mod websocket;
pub mod webtransport;

mod events;
mod stream;
pub mod verdict;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_channel::region::Counter;
use relay_proto::channel::record::FlowClosed;
use relay_proto::proxy_status::ProxyError;
use relay_proto::request::Request;
use tracing::debug;

use crate::context::Ctx;
use crate::link::AuthRequest;
use crate::slab::Slab;
use crate::timers::TimerTarget;
use datagrams::{DatagramSupport, Datagrams, DownPath, Limits, Payloads};
use flow::Flow;
use head::{Head, Refusal};
use route::{Kind, Route, TunnelRequest};

pub use crate::registry::{Carrier, TunnelId};

/// Where a tunnel is: its carrier, its stream and the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The connection.
    pub carrier: Carrier,
    /// The request stream (HTTP/3, HTTP/2) or request number (HTTP/1.1).
    pub stream: u64,
    /// The client's address.
    pub peer: SocketAddr,
}

/// Why a carrier could not send an HTTP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramDrop {
    /// Larger than the path carries now.
    TooLarge,
    /// The connection's datagram queue is full.
    QueueFull,
}

/// A carrier's HTTP Datagrams outside the stream (HTTP/3 DATAGRAM frames).
pub trait DatagramPath {
    /// Whether the client takes HTTP/3 datagrams.
    fn support(&self) -> DatagramSupport;
    /// The largest payload a context-0 datagram carries now (`None`: no
    /// limit but the capsule's).
    fn room(&self) -> Option<usize>;
    /// Sends one HTTP datagram.
    fn send(&mut self, stream: u64, context_id: u64, payload: &[u8]) -> Result<(), DatagramDrop>;
    /// How full the path's queue towards the client is: a connect-udp
    /// tunnel stops reading its target while it is [`Backlog::High`] and
    /// starts again once it is [`Backlog::Low`]. Paths without a queue of
    /// their own are always low.
    fn backlog(&self) -> Backlog {
        Backlog::Low
    }
}

/// How full a datagram path's queue towards the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Room enough: paused targets are read again.
    Low,
    /// Between the marks: nothing changes.
    Middle,
    /// The client's connection is not taking datagrams as fast as they
    /// arrive: targets delivering into it are paused.
    High,
}

/// The path of carriers without datagrams (HTTP/2, HTTP/1.1): every
/// payload travels as a DATAGRAM capsule.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDatagrams;

impl DatagramPath for NoDatagrams {
    fn support(&self) -> DatagramSupport {
        DatagramSupport::Disabled
    }
    fn room(&self) -> Option<usize> {
        None
    }
    fn send(&mut self, _: u64, _: u64, _: &[u8]) -> Result<(), DatagramDrop> {
        Err(DatagramDrop::TooLarge)
    }
}

/// Why a tunnel's stream is reset; each carrier maps it to its code
/// (HTTP/3: RFC 9114 section 8.1, RFC 9297 section 5.2; HTTP/2: RFC 9113
/// section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// Cancelled by the client or the operator (H3_REQUEST_CANCELLED,
    /// CANCEL).
    Cancelled,
    /// Malformed capsules or messages (H3_MESSAGE_ERROR, PROTOCOL_ERROR).
    Message,
    /// A datagram the RFCs say aborts the stream (H3_DATAGRAM_ERROR,
    /// PROTOCOL_ERROR).
    Datagram,
    /// The TCP connection to the target broke (H3_CONNECT_ERROR,
    /// CONNECT_ERROR).
    Connect,
    /// The client lets more answers pile up unread than the relay buffers
    /// (the bind draft's section 9; H3_EXCESSIVE_LOAD, ENHANCE_YOUR_CALM).
    ExcessiveLoad,
}

/// How a tunnel's stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Not ending.
    Open,
    /// FIN after the head and the bytes waiting; `stop_reading`: the client's
    /// side is not needed any more (HTTP/3 STOP_SENDING with H3_NO_ERROR,
    /// HTTP/2 RST_STREAM NO_ERROR after the end, HTTP/1.1 close).
    Finish {
        /// Stop reading the client's side.
        stop_reading: bool,
    },
    /// Reset both ways now.
    Abort(Abort),
}

/// A request as a carrier hands it over.
#[derive(Debug)]
pub struct Opening<'a> {
    /// Where it came from.
    pub place: Place,
    /// The validated request.
    pub request: &'a Request,
    /// The request stream already ended: no tunnel can run on it.
    pub ended: bool,
    /// The carrier serves the status endpoint (GET/HEAD).
    pub status_endpoint: bool,
    /// The connection carries as many tunnels as it may (429).
    pub at_capacity: bool,
    /// The carrier's bounds for tunnels.
    pub limits: Limits,
    /// The client certificate the connection's handshake verified (mutual
    /// TLS), described for control.
    pub client_cert: Option<&'a relay_proto::channel::record::ClientCert>,
}

/// What became of a request.
#[derive(Debug)]
pub enum Start {
    /// A tunnel is being set up: the carrier maps its stream to it.
    Tunnel(TunnelId),
    /// Refused: the carrier sends the head and ends the stream.
    Refused(Head),
    /// The status endpoint (the carrier answers it).
    Status {
        /// HEAD: headers only.
        head_only: bool,
    },
}

/// Where a tunnel is in its life, with what it holds in each state.
#[derive(Debug)]
enum State {
    /// Waiting for control's answer to `ask_id` until `deadline`.
    Asking { ask_id: u64, deadline: Instant },
    /// Connecting to a TCP target (classic CONNECT, a WebSocket origin)
    /// until `deadline`.
    Connecting { leg: Box<tcp::TcpLeg>, flow: Flow, deadline: Instant },
    /// A WebSocket origin is connected: its Upgrade handshake runs until
    /// `deadline`.
    Upgrading { leg: Box<tcp::TcpLeg>, flow: Flow, deadline: Instant },
    /// A connect-udp tunnel.
    Udp { leg: udp::UdpLeg, flow: Flow },
    /// A connect-ip tunnel.
    Ip { leg: ip::IpTunnel, flow: Flow },
    /// A bound UDP tunnel.
    Bound { leg: Box<bind::BoundLeg>, flow: Flow },
    /// A classic CONNECT tunnel, or an open WebSocket relay.
    Tcp { leg: Box<tcp::TcpLeg>, flow: Flow },
    /// A WebTransport session relayed to its origin (opening or open).
    Session { leg: Box<webtransport::SessionLeg>, flow: Flow },
    /// Over: nothing is held but what the carrier still has to send.
    Done,
}

/// One tunnel.
#[derive(Debug)]
pub struct Tunnel {
    place: Place,
    kind: Kind,
    state: State,
    /// The HTTP Datagram codec of capsule tunnels.
    dg: Option<Datagrams>,
    /// Bytes for the client of a classic CONNECT.
    bytes_out: Vec<u8>,
    /// Client bytes of a classic CONNECT held until the target is up.
    early: Vec<u8>,
    limits: Limits,
    head: Option<Head>,
    end: End,
    fin_sent: bool,
    client_ended: bool,
    /// A bound request's fallback target.
    fallback: Option<SocketAddr>,
    /// A WebSocket tunnel's handshake, until it is done.
    ws: Option<Box<websocket::WsHandshake>>,
    /// A WebTransport request's fields for the origin, until its session
    /// is requested.
    wt: Option<Box<route::SessionFields>>,
    /// Streams a WebTransport client opened before control answered
    /// (bounded by [`webtransport::MAX_EARLY_STREAMS`]).
    early_streams: Vec<u64>,
    /// It counts as an open tunnel (opened, not yet closed).
    counted_open: bool,
}

impl Tunnel {
    fn flow(&self) -> Option<&Flow> {
        match &self.state {
            State::Connecting { flow, .. }
            | State::Upgrading { flow, .. }
            | State::Udp { flow, .. }
            | State::Ip { flow, .. }
            | State::Bound { flow, .. }
            | State::Tcp { flow, .. }
            | State::Session { flow, .. } => Some(flow),
            State::Asking { .. } | State::Done => None,
        }
    }

    /// When the tunnel next needs its timer.
    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Asking { deadline, .. }
            | State::Connecting { deadline, .. }
            | State::Upgrading { deadline, .. } => Some(*deadline),
            State::Done => None,
            State::Ip { leg, flow } => {
                let idle = flow.idle_deadline();
                Some(leg.probe.due().map_or(idle, |d| d.min(idle)))
            }
            State::Session { leg, flow } => {
                let idle = flow.idle_deadline();
                Some(leg.due().map_or(idle, |d| d.min(idle)))
            }
            _ => self.flow().map(Flow::idle_deadline),
        }
    }

    fn refuse(&mut self, refusal: &Refusal, ctx: &Ctx) {
        ctx.count(Counter::TunnelsRefused, 1);
        debug!(status = refusal.status, details = %refusal.details, "tunnel refused");
        self.head = Some(Head::refusal(refusal, &ctx.settings.names, "CONNECT"));
        self.end = End::Finish { stop_reading: true };
        self.bytes_out.clear();
        if let Some(dg) = self.dg.as_mut() {
            let n = dg.stream_out().len();
            dg.consume_stream_out(n);
        }
    }
}

/// The worker's tunnels.
#[derive(Debug, Default)]
pub struct Tunnels {
    slab: Slab<Tunnel>,
    /// Tunnels holding a flow (connecting or open): a drain waits for them.
    held: usize,
    /// Tunnels counted open (their 2xx queued, not yet closed).
    active: usize,
    /// Tunnels with a batch for their socket this turn.
    dirty_up: Vec<TunnelId>,
    /// Where bound datagrams are encoded for the client.
    scratch: Vec<u8>,
    /// connect-udp and bound tunnels whose socket reads are paused (their
    /// path's backlog was high); each is listed once.
    paused: Vec<TunnelId>,
    /// connect-ip's side of the worker (its TUN device), when served.
    ip: Option<ip::IpSide>,
}

impl Tunnels {
    /// No tunnels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves connect-ip through the worker's TUN device.
    pub fn set_ip(&mut self, side: ip::IpSide) {
        self.ip = Some(side);
    }

    /// connect-ip's side of the worker, when served.
    pub fn ip(&self) -> Option<&ip::IpSide> {
        self.ip.as_ref()
    }

    /// connect-ip's side of the worker, when served.
    pub fn ip_mut(&mut self) -> Option<&mut ip::IpSide> {
        self.ip.as_mut()
    }

    /// Tunnels holding a flow (the drain waits for them).
    pub fn held(&self) -> usize {
        self.held
    }

    /// Tunnels open (their 2xx queued, not yet closed).
    pub fn active(&self) -> usize {
        self.active
    }

    /// Number of tunnels (in any state).
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Where tunnel `id` is.
    pub fn place(&self, id: TunnelId) -> Option<Place> {
        self.slab.get(id).map(|t| t.place)
    }

    /// Its kind.
    pub fn kind(&self, id: TunnelId) -> Option<Kind> {
        self.slab.get(id).map(|t| t.kind)
    }

    /// Its flow ID, once control allowed it.
    pub fn flow_id(&self, id: TunnelId) -> Option<u64> {
        self.slab.get(id).and_then(Tunnel::flow).map(|f| f.flow_id)
    }

    /// Whether control allowed it and it has not ended (a flow is held).
    pub fn is_allowed(&self, id: TunnelId) -> bool {
        self.slab.get(id).is_some_and(|t| t.flow().is_some())
    }

    /// A request from a carrier: routed, then asked of control (or
    /// answered at once).
    pub fn start(&mut self, ctx: &mut Ctx, o: Opening<'_>) -> Start {
        let allow = if o.status_endpoint { "GET, HEAD, CONNECT" } else { "CONNECT" };
        let refuse = |ctx: &Ctx, r: Refusal| {
            ctx.count(Counter::TunnelsRefused, 1);
            debug!(status = r.status, details = %r.details, "request refused");
            Start::Refused(Head::refusal(&r, &ctx.settings.names, allow))
        };
        let request = match route::route(o.request, &ctx.settings.served, o.status_endpoint) {
            Route::Status { head_only } => return Start::Status { head_only },
            Route::Refuse(r) => return refuse(ctx, r),
            Route::Tunnel(t) => t,
        };
        if ctx.draining {
            return refuse(ctx, Refusal::new(503, Some(ProxyError::ProxyInternalError), "relay draining"));
        }
        if o.ended {
            let why = "request stream already ended";
            return refuse(ctx, Refusal::new(400, Some(ProxyError::HttpRequestError), why));
        }
        if o.at_capacity {
            let why = "too many tunnels on this connection";
            return refuse(ctx, Refusal::new(429, Some(ProxyError::HttpRequestDenied), why));
        }
        let ask_id = match ask(ctx, &request, o.place.peer, o.client_cert) {
            Ok(id) => id,
            Err(r) => return refuse(ctx, r),
        };
        let deadline = ctx.now + ctx.settings.ask_timeout;
        let dg = match request.kind {
            Kind::Udp => Some(Datagrams::new(Payloads::Udp, o.limits)),
            Kind::Ip => Some(Datagrams::new(Payloads::Ip, o.limits)),
            Kind::Bound => Some(Datagrams::new(Payloads::Bound, o.limits)),
            Kind::Tcp | Kind::WebSocket | Kind::WebTransport => None,
        };
        if request.kind == Kind::WebTransport && !matches!(o.place.carrier, Carrier::H3(_)) {
            // draft-ietf-webtrans-http3 is HTTP/3 only (WebTransport over
            // HTTP/2 is another draft, not served).
            let why = "webtransport is served over HTTP/3 only";
            return refuse(ctx, Refusal::new(501, None, why));
        }
        let ws = request.websocket.map(|h| Box::new(websocket::WsHandshake::new(*h)));
        let wt = request.webtransport;
        let id = self.slab.insert(Tunnel {
            place: o.place,
            kind: request.kind,
            state: State::Asking { ask_id, deadline },
            dg,
            bytes_out: Vec::new(),
            early: Vec::new(),
            limits: o.limits,
            head: None,
            end: End::Open,
            fin_sent: false,
            client_ended: false,
            fallback: request.fallback,
            ws,
            wt,
            early_streams: Vec::new(),
            counted_open: false,
        });
        ctx.asks.insert(ask_id, id);
        ctx.timers.push(deadline, TimerTarget::Tunnel(id));
        Start::Tunnel(id)
    }

    /// Resets the stream both ways and releases the tunnel.
    fn abort(&mut self, ctx: &mut Ctx, id: TunnelId, why: Abort) {
        self.release(ctx, id);
        if let Some(t) = self.slab.get_mut(id) {
            debug!(flow = ?t.flow().map(|f| f.flow_id), ?why, "tunnel aborted");
            t.end = End::Abort(why);
            t.head = None;
        }
    }

    /// Ends a tunnel from the relay's side (idle, target unreachable, byte
    /// budget): FIN after what is buffered, and the client's side is no
    /// longer read (RFC 9298 section 3.1).
    fn finish_from_relay(&mut self, ctx: &mut Ctx, id: TunnelId) {
        self.release(ctx, id);
        if let Some(t) = self.slab.get_mut(id)
            && matches!(t.end, End::Open)
        {
            t.end = End::Finish { stop_reading: true };
        }
    }

    fn end_over_budget(&mut self, ctx: &mut Ctx, id: TunnelId) {
        debug!(flow = ?self.flow_id(id), "tunnel used up its byte budget");
        ctx.count(Counter::TunnelsOverBudget, 1);
        self.finish_from_relay(ctx, id);
    }

    fn check_budget(&mut self, ctx: &mut Ctx, id: TunnelId) {
        if self.slab.get(id).and_then(Tunnel::flow).is_some_and(Flow::over_budget) {
            self.end_over_budget(ctx, id);
        }
    }

    /// Replaces a tunnel that will not open with a refusal.
    fn refuse(&mut self, ctx: &mut Ctx, id: TunnelId, refusal: &Refusal) {
        if let Some(t) = self.slab.get_mut(id) {
            t.refuse(refusal, ctx);
        }
    }

    /// Counts a tunnel as open (its 2xx is queued) and arms its timer.
    fn opened(&mut self, ctx: &mut Ctx, id: TunnelId) {
        let Some(t) = self.slab.get_mut(id) else { return };
        if !t.counted_open {
            t.counted_open = true;
            self.active += 1;
            ctx.count(Counter::TunnelsOpened, 1);
            ctx.count(Counter::TunnelsActive, 1);
        }
        if let Some(at) = t.deadline() {
            ctx.timers.push(at, TimerTarget::Tunnel(id));
        }
    }

    /// Releases what a tunnel holds (its ask, its target, its flow); the
    /// tunnel stays for the carrier to finish its stream.
    fn release(&mut self, ctx: &mut Ctx, id: TunnelId) {
        let Some(t) = self.slab.get_mut(id) else { return };
        let state = std::mem::replace(&mut t.state, State::Done);
        let finished_both_ways = t.fin_sent && t.client_ended;
        let closed = match state {
            State::Asking { ask_id, .. } => {
                ctx.asks.remove(ask_id);
                ctx.link.cancel(ask_id);
                return;
            }
            State::Done => return,
            State::Connecting { leg, flow, .. } | State::Upgrading { leg, flow, .. } => {
                leg.release(true, ctx);
                self.held -= 1;
                ctx.link.flow_closed(FlowClosed::unused(flow.flow_id));
                return;
            }
            State::Udp { leg, flow } => {
                if leg.paused() {
                    self.paused.retain(|p| *p != id);
                }
                leg.release(ctx);
                flow
            }
            State::Ip { leg, flow } => {
                if let Some(side) = self.ip.as_mut() {
                    side.unregister(&leg);
                }
                flow
            }
            State::Bound { leg, flow } => {
                if leg.paused() {
                    self.paused.retain(|p| *p != id);
                }
                leg.release(ctx);
                flow
            }
            State::Tcp { leg, flow } => {
                // RFC 9114 section 4.4: a tunnel that did not end cleanly
                // both ways resets the TCP connection.
                leg.release(!finished_both_ways, ctx);
                flow
            }
            State::Session { leg, flow } => {
                webtransport::release(leg, ctx);
                flow
            }
        };
        self.held -= 1;
        ctx.link.flow_closed(closed.closed());
        if t.counted_open {
            t.counted_open = false;
            self.active -= 1;
            ctx.count(Counter::TunnelsClosed, 1);
            ctx.link.counters().sub(Counter::TunnelsActive, 1);
        }
    }

    /// Moves a classic CONNECT's bytes between its target and the
    /// tunnel's buffers.
    fn pump_tcp(&mut self, ctx: &mut Ctx, id: TunnelId) {
        tcp::pump(self, ctx, id);
    }
}

fn flow_mut(state: &mut State) -> Option<&mut Flow> {
    match state {
        State::Connecting { flow, .. }
        | State::Upgrading { flow, .. }
        | State::Udp { flow, .. }
        | State::Ip { flow, .. }
        | State::Bound { flow, .. }
        | State::Tcp { flow, .. }
        | State::Session { flow, .. } => Some(flow),
        State::Asking { .. } | State::Done => None,
    }
}

/// Sends one payload towards the client on the tunnel's down path: an
/// HTTP/3 datagram, a DATAGRAM capsule, or (while the client's SETTINGS
/// are unknown) the bounded waiting queue. Counted either way.
pub(crate) fn deliver(
    dg: &mut Datagrams,
    flow: &mut Flow,
    stream: u64,
    context_id: u64,
    payload: &[u8],
    path: &mut dyn DatagramPath,
    ctx: &Ctx,
) {
    let sent = match dg.down_path(path.support()) {
        DownPath::Wait => {
            // Only context-0 payloads wait (they go out with context 0
            // later); others are dropped.
            if context_id != relay_proto::datagram::UDP_PAYLOAD_CONTEXT || !dg.queue_down(payload) {
                ctx.count(Counter::DropQueueFull, 1);
            }
            return;
        }
        DownPath::QuicDatagram => match path.send(stream, context_id, payload) {
            Ok(()) => true,
            Err(DatagramDrop::TooLarge) => {
                ctx.count(Counter::DropTooLarge, 1);
                false
            }
            Err(DatagramDrop::QueueFull) => {
                ctx.count(Counter::DropQueueFull, 1);
                false
            }
        },
        DownPath::Capsule => {
            let pushed = dg.push_capsule(context_id, payload);
            if !pushed {
                ctx.count(Counter::DropQueueFull, 1);
            }
            pushed
        }
    };
    if sent {
        flow.down(payload.len(), ctx.now);
        ctx.count(Counter::DatagramsDown, 1);
        ctx.count(Counter::BytesDown, payload.len() as u64);
    }
}

/// Sends an authorization ask for `request`; a request the channel cannot
/// carry, or a control that is gone or overloaded, is refused now.
fn ask(
    ctx: &mut Ctx,
    request: &TunnelRequest,
    client: SocketAddr,
    client_cert: Option<&relay_proto::channel::record::ClientCert>,
) -> Result<u64, Refusal> {
    let asked = ctx.link.ask(AuthRequest {
        client,
        authority: request.authority.clone(),
        path: request.path.clone(),
        target_host: request.target_host.clone(),
        target_port: request.target_port,
        authorization: request.authorization.clone(),
        protocol: request.kind.protocol(),
        client_cert: client_cert.cloned(),
    });
    asked.map_err(|e| {
        if e.is_control_failure() {
            ctx.count(Counter::AsksFailed, 1);
        }
        let (status, proxy_error, reason) = e.refusal();
        Refusal::new(status, proxy_error, reason)
    })
}

/// How long a classic CONNECT may take to connect before the request is
/// answered 504.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

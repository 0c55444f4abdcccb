//! The tunnel layer: every tunnel of a worker, whatever HTTP version
//! carries it, lives here once.
//!
//! A carrier (an HTTP/3 connection in [`crate::h3`], an HTTP/2 or HTTP/1.1
//! connection of the TCP front in [`crate::front`]) hands over each request
//! it parsed ([`Tunnels::start`]); from then on the tunnel layer owns
//! routing ([`route`]), the ask/verdict exchange with control, the per-kind
//! state ([`State`]: connect-udp, connect-ip, bound UDP, classic CONNECT),
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
//! [`bind`]; classic CONNECT's half-close in [`tcp`]; the lifecycle (ask,
//! verdict, deadlines, ending, reporting flows) here.

pub mod bind;
pub mod datagrams;
pub mod flow;
pub mod head;
pub mod ip;
pub mod route;
pub mod tcp;
pub mod udp;

pub mod verdict;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_proto::channel::record::{AddressAnswer, FlowClosed, FlowOpen, IpAssignment, Verdict};
use relay_proto::channel::region::Counter;
use relay_proto::proxy_status::ProxyError;
use relay_proto::request::Request;
use tracing::debug;

use crate::context::Ctx;
use crate::io::Ready;
use crate::slab::Slab;
use crate::timers::TimerTarget;
use datagrams::{DatagramSupport, Datagrams, DownPath, Limits, Payloads, UpOutcome};
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
    /// Connecting to a TCP target (classic CONNECT) until `deadline`.
    Connecting { leg: Box<tcp::TcpLeg>, flow: Flow, deadline: Instant },
    /// A connect-udp tunnel.
    Udp { leg: udp::UdpLeg, flow: Flow },
    /// A connect-ip tunnel.
    Ip { leg: ip::IpTunnel, flow: Flow },
    /// A bound UDP tunnel.
    Bound { leg: Box<bind::BoundLeg>, flow: Flow },
    /// A classic CONNECT tunnel.
    Tcp { leg: Box<tcp::TcpLeg>, flow: Flow },
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
    /// It counts as an open tunnel (opened, not yet closed).
    counted_open: bool,
}

impl Tunnel {
    fn flow(&self) -> Option<&Flow> {
        match &self.state {
            State::Connecting { flow, .. }
            | State::Udp { flow, .. }
            | State::Ip { flow, .. }
            | State::Bound { flow, .. }
            | State::Tcp { flow, .. } => Some(flow),
            State::Asking { .. } | State::Done => None,
        }
    }

    /// When the tunnel next needs its timer.
    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Asking { deadline, .. } | State::Connecting { deadline, .. } => Some(*deadline),
            State::Done => None,
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
        let ask_id = match ask(ctx, &request, o.place.peer) {
            Ok(id) => id,
            Err(r) => return refuse(ctx, r),
        };
        let deadline = ctx.now + ctx.settings.ask_timeout;
        let dg = match request.kind {
            Kind::Udp => Some(Datagrams::new(Payloads::Udp, o.limits)),
            Kind::Ip => Some(Datagrams::new(Payloads::Ip, o.limits)),
            Kind::Bound => Some(Datagrams::new(Payloads::Bound, o.limits)),
            Kind::Tcp => None,
        };
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
            counted_open: false,
        });
        ctx.asks.insert(ask_id, id);
        ctx.timers.push(deadline, TimerTarget::Tunnel(id));
        Start::Tunnel(id)
    }

    /// Client bytes the tunnel takes now: a classic CONNECT takes what its
    /// target buffer (or, before the target is up, its early buffer) has
    /// room for, so the carrier's flow control holds the rest; capsules
    /// are decoded as they come.
    pub fn up_room(&self, id: TunnelId) -> usize {
        let Some(t) = self.slab.get(id) else { return usize::MAX };
        match &t.state {
            State::Asking { .. } | State::Connecting { .. } if t.kind == Kind::Tcp => {
                t.limits.stream_out_limit.saturating_sub(t.early.len())
            }
            State::Tcp { leg, .. } => leg.target.room(),
            _ => usize::MAX,
        }
    }

    /// Bytes of the client's request stream (capsules, or a classic
    /// CONNECT's TCP bytes). Returns how many were taken (never more than
    /// [`Self::up_room`]); the rest stays with the carrier.
    pub fn on_stream_bytes(
        &mut self,
        ctx: &mut Ctx,
        id: TunnelId,
        bytes: &[u8],
        path: &mut dyn DatagramPath,
    ) -> usize {
        let Some(t) = self.slab.get_mut(id) else { return bytes.len() };
        let reading = match t.end {
            End::Open => true,
            End::Finish { stop_reading } => !stop_reading && !t.client_ended,
            End::Abort(_) => false,
        };
        if !reading {
            return bytes.len(); // discarded: the tunnel is over
        }
        if t.kind == Kind::Tcp {
            let n = bytes.len().min(self.up_room(id));
            let Some(t) = self.slab.get_mut(id) else { return n };
            match &mut t.state {
                State::Tcp { leg, .. } => {
                    leg.target.push(&bytes[..n]);
                    self.pump_tcp(ctx, id);
                }
                State::Asking { .. } | State::Connecting { .. } => t.early.extend_from_slice(&bytes[..n]),
                _ => return bytes.len(),
            }
            return n;
        }
        let mut payloads: Vec<(UpOutcome, Vec<u8>)> = Vec::new();
        let result = match t.dg.as_mut() {
            Some(dg) => dg.on_stream_bytes(bytes, |o, p| payloads.push((o, p.to_vec()))),
            None => Ok(()),
        };
        for (outcome, payload) in payloads {
            self.on_payload(ctx, id, outcome, &payload, path);
        }
        if let Err(e) = result {
            // RFC 9297 section 3.3: a malformed capsule makes the message
            // malformed.
            debug!(tunnel = id, "capsule error: {e}");
            self.abort(ctx, id, Abort::Message);
            return bytes.len();
        }
        self.after_capsules(ctx, id, path);
        bytes.len()
    }

    /// An HTTP/3 datagram for the tunnel (already split into context ID
    /// and payload).
    pub fn on_datagram(
        &mut self,
        ctx: &mut Ctx,
        id: TunnelId,
        context_id: u64,
        payload: &[u8],
        path: &mut dyn DatagramPath,
    ) {
        let Some(t) = self.slab.get_mut(id) else { return };
        if !matches!(t.end, End::Open) {
            return ctx.count(Counter::DropNoTunnel, 1);
        }
        let Some(dg) = t.dg.as_mut() else {
            // Classic CONNECT registers no datagrams (RFC 9297 section 2.1:
            // dropped).
            return ctx.count(Counter::DropNoTunnel, 1);
        };
        let outcome = dg.on_quic_datagram(context_id, payload);
        self.on_payload(ctx, id, outcome, payload, path);
        if self.slab.get(id).is_some_and(|t| t.kind == Kind::Bound) {
            self.after_capsules(ctx, id, path);
        }
    }

    /// One client payload's outcome.
    fn on_payload(
        &mut self,
        ctx: &mut Ctx,
        id: TunnelId,
        outcome: UpOutcome,
        payload: &[u8],
        path: &mut dyn DatagramPath,
    ) {
        match outcome {
            UpOutcome::Forward => self.forward_up(ctx, id, payload, path),
            UpOutcome::Buffered => {}
            UpOutcome::DroppedQueueFull => ctx.count(Counter::DropQueueFull, 1),
            UpOutcome::DroppedUnknownContext => ctx.count(Counter::DropUnknownContext, 1),
            UpOutcome::AbortTooLarge => {
                ctx.count(Counter::DropTooLarge, 1);
                self.abort(ctx, id, Abort::Datagram);
            }
        }
    }

    /// Forwards one client payload of an open tunnel.
    fn forward_up(&mut self, ctx: &mut Ctx, id: TunnelId, payload: &[u8], path: &mut dyn DatagramPath) {
        let Some(t) = self.slab.get_mut(id) else { return };
        let stream = t.place.stream;
        let over = match &mut t.state {
            State::Udp { leg, flow } => {
                flow.up(payload.len(), ctx.now);
                if leg.push(payload, ctx) {
                    self.dirty_up.push(id);
                }
                flow.over_budget()
            }
            State::Ip { leg, flow } => {
                flow.up(payload.len(), ctx.now);
                let dg = t.dg.as_mut().expect("capsule tunnels have a codec");
                if let Some(icmp) = ip::up(leg, payload, self.ip.as_mut(), ctx) {
                    deliver(dg, flow, stream, 0, &icmp, path, ctx);
                    ctx.count(Counter::IcmpErrorsSent, 1);
                }
                flow.over_budget()
            }
            _ => return ctx.count(Counter::DropTargetSend, 1),
        };
        if over {
            self.end_over_budget(ctx, id);
        }
    }

    /// Handles what capsule tunnels keep besides payloads: connect-ip's
    /// address requests, bound UDP's compression capsules and datagrams.
    fn after_capsules(&mut self, ctx: &mut Ctx, id: TunnelId, path: &mut dyn DatagramPath) {
        let Some(t) = self.slab.get_mut(id) else { return };
        let stream = t.place.stream;
        let result = match (&mut t.state, t.dg.as_mut()) {
            (State::Ip { leg, flow }, Some(dg)) => ip::capsules(leg, flow, dg, ctx),
            (State::Bound { leg, flow }, Some(dg)) => match bind::from_client(leg, flow, dg, ctx) {
                Ok(batched) => {
                    if batched {
                        self.dirty_up.push(id);
                    }
                    if flow.over_budget() {
                        return self.end_over_budget(ctx, id);
                    }
                    Ok(())
                }
                Err(abort) => Err(abort),
            },
            _ => Ok(()),
        };
        let _ = (path, stream);
        if let Err(abort) = result {
            self.abort(ctx, id, abort);
        }
    }

    /// The client ended its side of the stream.
    pub fn on_client_end(&mut self, ctx: &mut Ctx, id: TunnelId) {
        let Some(t) = self.slab.get_mut(id) else { return };
        if t.client_ended {
            return;
        }
        t.client_ended = true;
        if t.kind == Kind::Tcp {
            // A half-close: FIN to the target after the buffered bytes
            // (RFC 9114 section 4.4, RFC 9113 section 8.5); before the
            // target is up, it follows the early bytes.
            if let State::Tcp { leg, .. } = &mut t.state {
                leg.target.finish();
                self.pump_tcp(ctx, id);
            }
            return;
        }
        if !matches!(t.end, End::Open) {
            return;
        }
        if t.dg.as_ref().is_some_and(|dg| dg.on_stream_end().is_err()) {
            // RFC 9297 section 3.3: a capsule cut short is malformed.
            return self.abort(ctx, id, Abort::Message);
        }
        match t.state {
            // RFC 9298 section 3: closing the stream closes the tunnel;
            // we end ours.
            State::Udp { .. } | State::Ip { .. } | State::Bound { .. } => {
                self.release(ctx, id);
                if let Some(t) = self.slab.get_mut(id) {
                    t.end = End::Finish { stop_reading: false };
                }
            }
            _ => self.abort(ctx, id, Abort::Cancelled),
        }
    }

    /// The response head to send, if one is due.
    pub fn take_head(&mut self, id: TunnelId) -> Option<Head> {
        self.slab.get_mut(id)?.head.take()
    }

    /// Gives back a head the carrier could not send yet.
    pub fn restore_head(&mut self, id: TunnelId, head: Head) {
        if let Some(t) = self.slab.get_mut(id) {
            t.head = Some(head);
        }
    }

    /// Whether the carrier has anything to do for tunnel `id`: a head or
    /// bytes to send, an end to carry out, or (classic CONNECT) request
    /// bytes to take.
    pub fn needs_service(&self, id: TunnelId) -> bool {
        self.slab.get(id).is_none_or(|t| {
            t.head.is_some()
                || !matches!(t.end, End::Open)
                || t.kind == Kind::Tcp
                || t.dg.as_ref().is_some_and(|dg| !dg.stream_out().is_empty())
        })
    }

    /// Whether a head waits to be sent.
    pub fn head_pending(&self, id: TunnelId) -> bool {
        self.slab.get(id).is_some_and(|t| t.head.is_some())
    }

    /// Bytes for the client's stream, after the head.
    pub fn out(&self, id: TunnelId) -> &[u8] {
        match self.slab.get(id) {
            Some(t) if t.head.is_none() => match t.dg.as_ref() {
                Some(dg) => dg.stream_out(),
                None => &t.bytes_out,
            },
            _ => &[],
        }
    }

    /// The carrier sent `n` bytes of [`Self::out`]; a classic CONNECT
    /// reads its target again.
    pub fn consume(&mut self, ctx: &mut Ctx, id: TunnelId, n: usize) {
        let Some(t) = self.slab.get_mut(id) else { return };
        match t.dg.as_mut() {
            Some(dg) => dg.consume_stream_out(n),
            None => {
                t.bytes_out.drain(..n.min(t.bytes_out.len()));
                if n > 0 && matches!(t.state, State::Tcp { .. }) {
                    self.pump_tcp(ctx, id);
                }
            }
        }
    }

    /// How the stream ends.
    pub fn end(&self, id: TunnelId) -> End {
        self.slab.get(id).map_or(End::Abort(Abort::Cancelled), |t| t.end)
    }

    /// Whether the stream should end now: FIN after everything sent.
    pub fn wants_fin(&self, id: TunnelId) -> bool {
        self.slab.get(id).is_some_and(|t| {
            matches!(t.end, End::Finish { .. }) && !t.fin_sent && t.head.is_none() && self.out(id).is_empty()
        })
    }

    /// The carrier sent the stream's FIN.
    pub fn fin_sent(&mut self, id: TunnelId) {
        if let Some(t) = self.slab.get_mut(id) {
            t.fin_sent = true;
        }
    }

    /// Whether the tunnel is over both ways and can be removed: an abort,
    /// or our FIN sent and the client's side ended or not wanted (a
    /// classic CONNECT also waits for its FIN to reach the target).
    pub fn complete(&self, id: TunnelId) -> bool {
        let Some(t) = self.slab.get(id) else { return true };
        match t.end {
            End::Open => false,
            End::Abort(_) => true,
            End::Finish { stop_reading } => {
                let target_done = match &t.state {
                    State::Tcp { leg, .. } => leg.target.write_closed(),
                    _ => true,
                };
                t.fin_sent && (stop_reading || (t.client_ended && target_done))
            }
        }
    }

    /// Removes a tunnel: whatever it still holds is released (its flow
    /// reported). The carrier stops mapping its stream to it.
    pub fn remove(&mut self, ctx: &mut Ctx, id: TunnelId) {
        self.release(ctx, id);
        self.slab.remove(id);
    }

    /// The client's SETTINGS arrived (HTTP/3): payloads that waited for the
    /// down path go now.
    pub fn on_datagrams_known(&mut self, ctx: &mut Ctx, id: TunnelId, path: &mut dyn DatagramPath) {
        let Some(t) = self.slab.get_mut(id) else { return };
        let stream = t.place.stream;
        let (Some(dg), Some(flow)) = (t.dg.as_mut(), flow_mut(&mut t.state)) else { return };
        for payload in dg.take_waiting_down() {
            deliver(dg, flow, stream, 0, &payload, path, ctx);
        }
        self.check_budget(ctx, id);
    }

    /// Control's verdict on tunnel `id`'s ask.
    pub fn on_verdict(&mut self, ctx: &mut Ctx, id: TunnelId, verdict: Verdict, path: &mut dyn DatagramPath) {
        verdict::apply(self, ctx, id, verdict, path);
    }

    /// Datagrams from a tunnel's UDP socket: a connect-udp target's
    /// payloads, or a peer's on a bound tunnel (`from`).
    pub fn on_target(
        &mut self,
        ctx: &mut Ctx,
        id: TunnelId,
        from: Option<SocketAddr>,
        payloads: &[u8],
        segment_size: usize,
        path: &mut dyn DatagramPath,
    ) {
        let Some(t) = self.slab.get_mut(id) else { return };
        let stream = t.place.stream;
        if let (State::Bound { .. }, Some(from)) = (&t.state, from) {
            return bind::from_peer(self, ctx, id, from, payloads, segment_size, path);
        }
        let (Some(dg), State::Udp { flow, .. }) = (t.dg.as_mut(), &mut t.state) else { return };
        for payload in payloads.chunks(segment_size.max(1)) {
            deliver(dg, flow, stream, 0, payload, path, ctx);
        }
        self.check_budget(ctx, id);
    }

    /// The OS says a tunnel's UDP target is unreachable (an ICMP
    /// Destination Unreachable): RFC 9298 section 3.1 closes the tunnel.
    pub fn on_target_unreachable(&mut self, ctx: &mut Ctx, id: TunnelId) {
        if !self.slab.get(id).is_some_and(|t| matches!(t.state, State::Udp { .. })) {
            return;
        }
        debug!(tunnel = id, "target unreachable: closing the tunnel");
        ctx.count(Counter::TunnelsTargetUnreachable, 1);
        self.finish_from_relay(ctx, id);
    }

    /// A classic CONNECT's TCP target is ready.
    pub fn on_ready(&mut self, ctx: &mut Ctx, id: TunnelId, ready: Ready) {
        let Some(t) = self.slab.get_mut(id) else { return };
        match &mut t.state {
            State::Connecting { leg, .. } => {
                leg.target.on_ready(ready);
                match leg.target.state() {
                    crate::tcp_target::TargetState::Connecting => {}
                    crate::tcp_target::TargetState::Connected => tcp::connected(self, ctx, id),
                    crate::tcp_target::TargetState::Failed(errno) => {
                        tcp::connect_failed(self, ctx, id, errno)
                    }
                }
            }
            State::Tcp { leg, .. } => {
                leg.target.on_ready(ready);
                self.pump_tcp(ctx, id);
            }
            _ => {}
        }
    }

    /// A packet from the TUN device for connect-ip tunnel `id`.
    pub fn on_tun_packet(
        &mut self,
        ctx: &mut Ctx,
        id: TunnelId,
        packet: &mut [u8],
        info: &relay_proto::ip::packet::PacketInfo,
        path: &mut dyn DatagramPath,
    ) {
        let Some(t) = self.slab.get_mut(id) else { return };
        let stream = t.place.stream;
        let (Some(dg), State::Ip { leg, flow }) = (t.dg.as_mut(), &mut t.state) else { return };
        if !leg.routed(info.src, info.protocol) {
            return ctx.count(Counter::DropIpOutOfScope, 1);
        }
        let Some(side) = self.ip.as_mut() else { return };
        if ip::prepare_down(packet, path.room(), side, ctx) {
            deliver(dg, flow, stream, 0, packet, path, ctx);
        }
        self.check_budget(ctx, id);
    }

    /// A tunnel's deadline may have come: control did not answer (503),
    /// a TCP connect took too long (504), or the tunnel idled out.
    pub fn on_timer(&mut self, ctx: &mut Ctx, id: TunnelId) {
        let Some(t) = self.slab.get(id) else { return };
        let Some(deadline) = t.deadline() else { return };
        if deadline > ctx.now {
            // Traffic moved the deadline: wait again.
            return ctx.timers.push(deadline, TimerTarget::Tunnel(id));
        }
        match t.state {
            State::Asking { .. } => {
                ctx.count(Counter::AsksFailed, 1);
                self.release(ctx, id);
                let why = "control plane did not answer in time";
                self.refuse(ctx, id, &Refusal::new(503, Some(ProxyError::ProxyInternalError), why));
            }
            State::Connecting { .. } => tcp::connect_failed(self, ctx, id, libc::ETIMEDOUT),
            State::Done => {}
            _ => {
                debug!(tunnel = id, "tunnel idle: ending it");
                self.finish_from_relay(ctx, id);
            }
        }
    }

    /// Whether tunnel `id` has a deadline entry to keep (timer compaction).
    pub fn has_deadline(&self, id: TunnelId) -> bool {
        self.slab.get(id).is_some_and(|t| t.deadline().is_some())
    }

    /// Ends the tunnels carrying `flows` (an operator's kill): reset with
    /// H3_REQUEST_CANCELLED / CANCEL. Returns their carriers.
    pub fn kill(&mut self, ctx: &mut Ctx, flows: &[u64]) -> Vec<Carrier> {
        let hit: Vec<TunnelId> = self
            .slab
            .iter()
            .filter(|(_, t)| t.flow().is_some_and(|f| flows.contains(&f.flow_id)))
            .map(|(id, _)| id)
            .collect();
        let mut carriers = Vec::new();
        for id in hit {
            tracing::info!(tunnel = id, "tunnel killed by the operator");
            self.abort(ctx, id, Abort::Cancelled);
            if let Some(p) = self.place(id) {
                carriers.push(p.carrier);
            }
        }
        carriers
    }

    /// Control was replaced: asks sent to the old one are answered 503
    /// and address requests waiting on it are refused. Returns the
    /// carriers to wake.
    pub fn on_control_replaced(&mut self, ctx: &mut Ctx) -> Vec<Carrier> {
        let mut carriers = Vec::new();
        let ids: Vec<TunnelId> = self.slab.iter().map(|(id, _)| id).collect();
        for id in ids {
            let Some(t) = self.slab.get_mut(id) else { continue };
            match &mut t.state {
                State::Asking { .. } => {
                    ctx.count(Counter::AsksFailed, 1);
                    self.release(ctx, id);
                    let why = "control plane restarted";
                    self.refuse(ctx, id, &Refusal::new(503, Some(ProxyError::ProxyInternalError), why));
                }
                State::Ip { leg, .. } => {
                    let dg = t.dg.as_mut().expect("capsule tunnels have a codec");
                    if !ip::refuse_pending(leg, dg, ctx) {
                        continue;
                    }
                }
                _ => continue,
            }
            if let Some(p) = self.place(id) {
                carriers.push(p.carrier);
            }
        }
        carriers
    }

    /// Control's answer to a connect-ip tunnel's address ask. Returns the
    /// carrier of the tunnel holding the flow (none when it ended
    /// meanwhile: its FlowClosed, sent after the ask, releases the lease).
    pub fn on_address_answer(&mut self, ctx: &mut Ctx, a: &AddressAnswer) -> Option<Carrier> {
        let (_, t) = self.slab.iter_mut().find(|(_, t)| t.flow().is_some_and(|f| f.flow_id == a.flow_id))?;
        if let (State::Ip { leg, .. }, Some(dg)) = (&mut t.state, t.dg.as_mut()) {
            ip::address_answer(leg, dg, a, self.ip.as_mut(), ctx);
        }
        Some(t.place.carrier)
    }

    /// The open flows, for a control that attached after the previous one
    /// went away.
    pub fn open_flows(&self) -> Vec<FlowOpen> {
        self.slab
            .iter()
            .filter_map(|(_, t)| {
                let flow = t.flow()?;
                let addresses = match &t.state {
                    State::Ip { leg, .. } => {
                        leg.addresses.iter().map(|p| IpAssignment { addr: p.addr, len: p.len }).collect()
                    }
                    _ => Vec::new(),
                };
                Some(FlowOpen {
                    flow_id: flow.flow_id,
                    client: t.place.peer,
                    target: flow.target,
                    identity: flow.identity.clone(),
                    addresses,
                })
            })
            .collect()
    }

    /// Queues this turn's batches for the UDP targets (end of the turn:
    /// nothing waits for a later one, RFC 9298 section 6).
    pub fn flush_up(&mut self, ctx: &mut Ctx) {
        let mut dirty = std::mem::take(&mut self.dirty_up);
        for id in dirty.drain(..) {
            match self.slab.get_mut(id).map(|t| &mut t.state) {
                Some(State::Udp { leg, .. }) => leg.flush(ctx),
                Some(State::Bound { leg, .. }) => leg.flush(ctx),
                _ => {}
            }
        }
        self.dirty_up = dirty;
    }

    /// Resets the stream both ways and releases the tunnel.
    fn abort(&mut self, ctx: &mut Ctx, id: TunnelId, why: Abort) {
        self.release(ctx, id);
        if let Some(t) = self.slab.get_mut(id) {
            debug!(tunnel = id, ?why, "tunnel aborted");
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
        debug!(tunnel = id, "tunnel used up its byte budget");
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
            State::Connecting { leg, flow, .. } => {
                leg.release(true, ctx);
                self.held -= 1;
                ctx.link.flow_closed(FlowClosed::unused(flow.flow_id));
                return;
            }
            State::Udp { leg, flow } => {
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
                leg.release(ctx);
                flow
            }
            State::Tcp { leg, flow } => {
                // RFC 9114 section 4.4: a tunnel that did not end cleanly
                // both ways resets the TCP connection.
                leg.release(!finished_both_ways, ctx);
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
        | State::Udp { flow, .. }
        | State::Ip { flow, .. }
        | State::Bound { flow, .. }
        | State::Tcp { flow, .. } => Some(flow),
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
fn ask(ctx: &mut Ctx, request: &TunnelRequest, client: SocketAddr) -> Result<u64, Refusal> {
    let asked = ctx.link.ask(
        client,
        &request.authority,
        &request.path,
        &request.target_host,
        request.target_port,
        request.authorization.as_deref(),
        request.kind.protocol(),
    );
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

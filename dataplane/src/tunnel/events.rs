//! The worker's side of the tunnel layer: control's verdicts and the
//! backend's completions (datagrams from targets and peers, TCP target
//! readiness, TUN packets), deadlines, and control's requests (kills,
//! address leases, a replaced control).

use std::net::SocketAddr;

use relay_channel::region::Counter;
use relay_proto::channel::record::{AddressAnswer, FlowOpen, IpAssignment, Verdict};
use relay_proto::proxy_status::ProxyError;
use tracing::debug;

use super::datagrams::DownPath;
use super::head::Refusal;
use super::{
    Abort, Backlog, Carrier, DatagramPath, State, TunnelId, Tunnels, bind, deliver, ip, tcp, verdict,
    websocket, webtransport,
};
use crate::context::Ctx;
use crate::io::Ready;
use crate::timers::TimerTarget;

impl Tunnels {
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
        if let State::Session { .. } = &t.state {
            return webtransport::on_packets(self, id, from, payloads, segment_size);
        }
        if let (State::Bound { .. }, Some(from)) = (&t.state, from) {
            return bind::from_peer(self, ctx, id, from, payloads, segment_size, path);
        }
        let (Some(dg), State::Udp { flow, leg }) = (t.dg.as_mut(), &mut t.state) else { return };
        for payload in payloads.chunks(segment_size.max(1)) {
            deliver(dg, flow, stream, 0, payload, path, ctx);
        }
        // Backpressure: while the client's connection does not take
        // datagrams as fast as the target sends them, leave them in the
        // target socket (the kernel drops the excess) rather than read,
        // encode and drop them here.
        if leg.pause_if_backlogged(path.backlog(), ctx) {
            self.paused.push(id);
        }
        self.check_budget(ctx, id);
    }

    /// The OS says a tunnel's UDP target is unreachable (an ICMP
    /// Destination Unreachable): RFC 9298 section 3.1 closes the tunnel.
    pub fn on_target_unreachable(&mut self, ctx: &mut Ctx, id: TunnelId) {
        if self.slab.get(id).is_some_and(|t| matches!(t.state, State::Session { .. })) {
            return webtransport::unreachable(self, ctx, id);
        }
        if !self.slab.get(id).is_some_and(|t| matches!(t.state, State::Udp { .. })) {
            return;
        }
        debug!(flow = ?self.flow_id(id), "target unreachable: closing the tunnel");
        ctx.count(Counter::TunnelsTargetUnreachable, 1);
        self.finish_from_relay(ctx, id);
    }

    /// A classic CONNECT's TCP target (or a WebSocket origin) is ready.
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
            State::Upgrading { leg, .. } => {
                leg.target.on_ready(ready);
                websocket::pump(self, ctx, id);
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
        // RFC 9484 section 7.2: "If an endpoint is using QUIC DATAGRAM
        // frames to convey IPv6 packets and it detects that the QUIC MTU is
        // too low to allow sending 1280 bytes, it MUST abort the IP
        // proxying request stream."
        // The path's room, measured once per packet (quiche works it out
        // from the path MTU and the connection IDs each time).
        let room = path.room();
        if dg.down_path(path.support()) == DownPath::QuicDatagram
            && room.is_some_and(|r| r < relay_proto::ip::echo::IPV6_MIN_MTU)
            && leg.ipv6_address().is_some()
        {
            debug!(flow = ?self.flow_id(id), ?room, "QUIC datagrams shrank below IPv6's minimum MTU");
            ctx.count(Counter::IpMtuProbeFailures, 1);
            return self.abort(ctx, id, Abort::Cancelled);
        }
        let Some(side) = self.ip.as_mut() else { return };
        if ip::prepare_down(packet, room, side, ctx) {
            deliver(dg, flow, stream, 0, packet, path, ctx);
        }
        self.check_budget(ctx, id);
    }

    /// A tunnel's deadline may have come: control did not answer (503),
    /// a TCP connect took too long (504), a connect-ip link check is due,
    /// or the tunnel idled out.
    pub fn on_timer(&mut self, ctx: &mut Ctx, id: TunnelId, path: &mut dyn DatagramPath) {
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
            State::Upgrading { .. } => websocket::timed_out(self, ctx, id),
            State::Done => {}
            State::Session { ref leg, ref flow } => {
                let idle = flow.idle_deadline();
                if leg.due().is_some_and(|d| d <= ctx.now) {
                    webtransport::on_timer(self, ctx, id);
                }
                if idle <= ctx.now
                    && self.slab.get(id).is_some_and(|t| matches!(t.state, State::Session { .. }))
                {
                    debug!(flow = ?self.flow_id(id), "WebTransport session idle: ending it");
                    self.finish_from_relay(ctx, id);
                }
            }
            _ => {
                if let State::Ip { leg, .. } = &t.state
                    && leg.probe.due().is_some_and(|d| d <= ctx.now)
                {
                    ip::probe_tick(self, ctx, id, path);
                    let idle = self.slab.get(id).and_then(|t| t.flow()).map(|f| f.idle_deadline());
                    if idle.is_none_or(|at| at > ctx.now) {
                        return;
                    }
                }
                debug!(flow = ?self.flow_id(id), "tunnel idle: ending it");
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
            tracing::info!(flow = ?self.flow_id(id), "tunnel killed by the operator");
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
                    let refused = ip::refuse_pending(leg, dg);
                    match refused {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(abort) => self.abort(ctx, id, abort),
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
        let (id, t) = self.slab.iter_mut().find(|(_, t)| t.flow().is_some_and(|f| f.flow_id == a.flow_id))?;
        let carrier = t.place.carrier;
        let answered = match (&mut t.state, t.dg.as_mut()) {
            (State::Ip { leg, .. }, Some(dg)) => ip::address_answer(leg, dg, a, self.ip.as_mut()),
            _ => Ok(()),
        };
        if let Err(abort) = answered {
            self.abort(ctx, id, abort);
        }
        Some(carrier)
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
                    protocol: t.kind.protocol(),
                    route: flow.route.clone(),
                })
            })
            .collect()
    }

    /// Whether some connect-udp or bound tunnel's socket reads are paused.
    pub fn has_paused(&self) -> bool {
        !self.paused.is_empty()
    }

    /// After the turn's flush: reads again the sockets of every paused
    /// tunnel whose carrier's backlog (`backlog_of`) is low, and keeps the
    /// others listed (in the same allocation).
    pub fn resume_drained(&mut self, ctx: &mut Ctx, backlog_of: impl Fn(Carrier) -> Backlog) {
        let mut listed = std::mem::take(&mut self.paused);
        listed.retain(|&id| {
            let Some(t) = self.slab.get_mut(id) else { return false };
            let backlog = backlog_of(t.place.carrier);
            match &mut t.state {
                State::Udp { leg, .. } => leg.resume_if_drained(backlog, ctx),
                State::Bound { leg, .. } => leg.resume_if_drained(backlog, ctx),
                _ => false,
            }
        });
        self.paused = listed;
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
}

//! The carriers' side of a tunnel: what HTTP/3, HTTP/2 and HTTP/1.1
//! sessions hand in (request stream bytes, HTTP/3 datagrams, the client's
//! end) and take out (the response head, stream bytes, the stream's end).

use relay_channel::region::Counter;
use tracing::debug;

use super::datagrams::UpOutcome;
use super::head::Head;
use super::route::Kind;
use super::{Abort, DatagramPath, End, State, TunnelId, Tunnels, bind, deliver, flow_mut, ip, webtransport};
use crate::context::Ctx;

impl Tunnels {
    /// Client bytes the tunnel takes now: a classic CONNECT takes what its
    /// target buffer (or, before the target is up, its early buffer) has
    /// room for, so the carrier's flow control holds the rest; capsules
    /// are decoded as they come.
    pub fn up_room(&self, id: TunnelId) -> usize {
        let Some(t) = self.slab.get(id) else { return usize::MAX };
        match &t.state {
            State::Asking { .. } | State::Connecting { .. } | State::Upgrading { .. }
                if t.kind.byte_stream() =>
            {
                t.limits.stream_out_limit.saturating_sub(t.early.len())
            }
            State::Tcp { leg, .. } => leg.room(),
            State::Session { leg, .. } => webtransport::up_room(leg, t.limits.stream_out_limit),
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
        if t.kind.byte_stream() {
            let n = bytes.len().min(self.up_room(id));
            let Some(t) = self.slab.get_mut(id) else { return n };
            match &mut t.state {
                State::Tcp { leg, .. } => {
                    leg.push(&bytes[..n]);
                    self.pump_tcp(ctx, id);
                }
                State::Session { leg, .. } => webtransport::push_up(leg, &bytes[..n]),
                State::Asking { .. } | State::Connecting { .. } | State::Upgrading { .. } => {
                    t.early.extend_from_slice(&bytes[..n])
                }
                _ => return bytes.len(),
            }
            return n;
        }
        let Some(dg) = t.dg.as_mut() else {
            self.after_capsules(ctx, id, path);
            return bytes.len();
        };
        // connect-udp's payloads go straight from the capsule decoder into
        // the target's batch (no copy in between). Anything that needs the
        // whole tunnel (an abort, the end of the byte budget, connect-ip,
        // bound UDP, a tunnel not open yet) takes the general path below,
        // and every payload after it too, so the order is kept.
        let mut udp = match &mut t.state {
            State::Udp { leg, flow } => Some((leg, flow)),
            _ => None,
        };
        let mut later: Vec<(UpOutcome, Vec<u8>)> = Vec::new();
        let mut batched = false;
        let mut over_budget = false;
        let now = ctx.now;
        let result = dg.on_stream_bytes(bytes, |outcome, payload| match (&mut udp, outcome) {
            (Some((leg, flow)), UpOutcome::Forward) if later.is_empty() && !over_budget => {
                flow.up(payload.len(), now);
                batched |= leg.push(payload, ctx);
                over_budget = flow.over_budget();
            }
            (Some(_), UpOutcome::Buffered) if later.is_empty() && !over_budget => {}
            (Some(_), UpOutcome::DroppedQueueFull) if later.is_empty() && !over_budget => {
                ctx.count(Counter::DropQueueFull, 1)
            }
            (Some(_), UpOutcome::DroppedUnknownContext) if later.is_empty() && !over_budget => {
                ctx.count(Counter::DropUnknownContext, 1)
            }
            _ => later.push((outcome, payload.to_vec())),
        });
        if batched {
            self.dirty_up.push(id);
        }
        if over_budget {
            self.end_over_budget(ctx, id);
        }
        for (outcome, payload) in later {
            self.on_payload(ctx, id, outcome, &payload, path);
        }
        if let Err(e) = result {
            // RFC 9297 section 3.3: a malformed capsule makes the message
            // malformed.
            debug!(flow = ?self.flow_id(id), "capsule error: {e}");
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
    pub(super) fn forward_up(
        &mut self,
        ctx: &mut Ctx,
        id: TunnelId,
        payload: &[u8],
        path: &mut dyn DatagramPath,
    ) {
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
                if let Some(answer) = ip::up(leg, payload, self.ip.as_mut(), ctx) {
                    deliver(dg, flow, stream, 0, &answer, path, ctx);
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
    pub(super) fn after_capsules(&mut self, ctx: &mut Ctx, id: TunnelId, path: &mut dyn DatagramPath) {
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
        if t.kind.byte_stream() {
            // A half-close: FIN to the target after the buffered bytes
            // (RFC 9114 section 4.4, RFC 9113 section 8.5); before the
            // target is up, it follows the early bytes.
            match &mut t.state {
                State::Tcp { leg, .. } => {
                    leg.finish();
                    self.pump_tcp(ctx, id);
                }
                State::Session { leg, .. } => webtransport::on_client_end(leg),
                _ => {}
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
                || t.kind.byte_stream()
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

    /// Takes up to `n` bytes of [`Self::out`] as one buffer (the carrier
    /// sends them): capsules without a copy, a classic CONNECT's bytes
    /// copied out of its buffer (which then reads its target again).
    pub fn take_out(&mut self, ctx: &mut Ctx, id: TunnelId, n: usize) -> bytes::Bytes {
        let Some(t) = self.slab.get_mut(id) else { return bytes::Bytes::new() };
        if t.head.is_some() {
            return bytes::Bytes::new();
        }
        if let Some(dg) = t.dg.as_mut() {
            return dg.take_stream_out(n);
        }
        let k = n.min(t.bytes_out.len());
        let chunk = bytes::Bytes::copy_from_slice(&t.bytes_out[..k]);
        self.consume(ctx, id, k);
        chunk
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
                    State::Tcp { leg, .. } => leg.write_closed(),
                    State::Session { leg, .. } => webtransport::up_done(leg),
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
        if let State::Ip { leg, .. } = &mut t.state {
            // A link check that waited for the SETTINGS goes now.
            leg.probe.resume(ctx.now);
            ip::probe_tick(self, ctx, id, path);
        }
        self.check_budget(ctx, id);
    }

    /// A WebTransport session's turn on its client's connection: see
    /// [`webtransport::pump`].
    pub fn pump_session(&mut self, ctx: &mut Ctx, id: TunnelId, client: &mut webtransport::ClientSide<'_>) {
        webtransport::pump(self, ctx, id, client);
    }

    /// A stream the client opened in WebTransport session tunnel `id`;
    /// false: the tunnel is not a session or takes no more streams (the
    /// carrier rejects it with WT_BUFFERED_STREAM_REJECTED).
    pub fn on_session_stream(&mut self, id: TunnelId, stream: u64) -> bool {
        self.kind(id) == Some(Kind::WebTransport) && webtransport::on_client_stream(self, id, stream)
    }

    /// A client datagram of WebTransport session tunnel `id` (its HTTP
    /// Datagram Payload).
    pub fn on_session_datagram(&mut self, ctx: &mut Ctx, id: TunnelId, payload: &[u8]) {
        webtransport::on_datagram(self, ctx, id, payload);
    }
}

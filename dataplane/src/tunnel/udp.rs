//! connect-udp (RFC 9298): a connected UDP socket per tunnel, served by
//! the backend's GSO/GRO machinery. Client payloads are collected per turn
//! ([`UpBatch`]) and leave as one GSO send at the end of the turn (never
//! later: RFC 9298 section 6); target payloads go down the tunnel's path
//! ([`super::deliver`]).

use relay_proto::proxy_status::ProxyError;
use tracing::debug;

use super::backpressure::ReadPause;
use super::flow::Flow;
use super::head::{Head, Refusal};
use super::verdict::{hold, refuse_allowed};
use super::{Backlog, DatagramPath, State, TunnelId, Tunnels};
use crate::context::Ctx;
use crate::io::{TargetKey, UpSend};
use crate::upbatch::UpBatch;

/// A connect-udp tunnel's target side.
#[derive(Debug)]
pub struct UdpLeg {
    /// The target socket (the backend's).
    endpoint: TargetKey,
    /// Payloads for the target collected this turn.
    batch: Option<UpBatch>,
    /// Whether its target is being read.
    reads: ReadPause,
}

impl UdpLeg {
    /// A leg sending through `endpoint` (a WebTransport session's origin
    /// socket uses it for its QUIC packets).
    pub fn new(endpoint: TargetKey) -> Self {
        Self { endpoint, batch: None, reads: ReadPause::default() }
    }

    /// Whether its target reads are paused.
    pub fn paused(&self) -> bool {
        self.reads.is_paused()
    }

    /// Stops reading the target while `backlog` is high; returns whether
    /// this paused it (it was reading).
    pub fn pause_if_backlogged(&mut self, backlog: Backlog, ctx: &mut Ctx) -> bool {
        self.reads.pause_if_backlogged(backlog, [self.endpoint], ctx)
    }

    /// Reads the target again once `backlog` is low; returns whether it
    /// is still paused.
    pub fn resume_if_drained(&mut self, backlog: Backlog, ctx: &mut Ctx) -> bool {
        self.reads.resume_if_drained(backlog, [self.endpoint], ctx)
    }

    /// Adds a payload to this turn's batch; returns whether the batch is
    /// new (the caller lists the tunnel for the end of the turn).
    pub fn push(&mut self, payload: &[u8], ctx: &mut Ctx) -> bool {
        let gso = relay_udp::gso_enabled();
        if self.batch.as_ref().is_some_and(|b| !b.fits(payload.len(), gso)) {
            // The batch cannot take it: send what is there first.
            let full = self.batch.take().expect("checked");
            queue(self.endpoint, full, ctx);
        }
        let new = self.batch.is_none();
        let batch = self.batch.get_or_insert_with(|| UpBatch::new(ctx.out.buffer()));
        batch.push(payload);
        new
    }

    /// Queues this turn's batch.
    pub fn flush(&mut self, ctx: &mut Ctx) {
        if let Some(b) = self.batch.take() {
            queue(self.endpoint, b, ctx);
        }
    }

    /// Sends what is batched and closes the socket after it.
    pub fn release(mut self, ctx: &mut Ctx) {
        self.flush(ctx);
        ctx.close_endpoint(self.endpoint);
    }
}

fn queue(key: TargetKey, batch: UpBatch, ctx: &mut Ctx) {
    if batch.is_empty() {
        return ctx.out.recycle(batch.into_buffer());
    }
    let (buf, segment_size, segments) = batch.into_parts();
    ctx.out.up.push(UpSend { key, buf, segment_size, segments, to: None });
}

/// Control allowed a connect-udp tunnel: its socket (connected to the
/// target, DF set: RFC 9298 section 3.1 forbids fragmentation), the 2xx,
/// and the payloads the client sent early.
pub(super) fn open(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, flow: Flow, path: &mut dyn DatagramPath) {
    let sock = match crate::socket::connected_target(flow.target) {
        Ok(s) => s,
        Err(e) => {
            debug!("target socket: {e}");
            let why = Refusal::new(
                502,
                Some(ProxyError::DestinationUnavailable),
                "cannot open a socket to the target",
            );
            return refuse_allowed(ts, ctx, id, flow.flow_id, why);
        }
    };
    let endpoint = ctx.open_endpoint(sock, id, true);
    let Some(t) = ts.slab.get_mut(id) else { return };
    let early = t.dg.as_mut().map(|dg| dg.open()).unwrap_or_default();
    t.head = Some(Head::tunnel_open(true));
    hold(ts, id, State::Udp { leg: UdpLeg::new(endpoint), flow });
    ts.opened(ctx, id);
    for payload in early {
        ts.forward_up(ctx, id, &payload, path);
    }
}

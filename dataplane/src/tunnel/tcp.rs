//! Classic CONNECT (RFC 9110 section 9.3.6, RFC 9114 section 4.4, RFC 9113
//! section 8.5): once control allows it and the TCP connection to the
//! target is up, the 2xx goes out and the stream carries the TCP bytes
//! both ways. A WebSocket tunnel ([`super::websocket`]) connects here too,
//! does its upstream handshake, then relays with [`pump`] the same way.
//!
//! * Backpressure both ways: client bytes are taken only while the
//!   target's buffer has room ([`super::Tunnels::up_room`]: the carrier's
//!   flow control holds the client), and the target is read only while the
//!   bytes waiting for the client stay under the tunnel's bound.
//! * Half-close: the client's end becomes a FIN towards the target once
//!   the buffered bytes are written; the target's FIN becomes the stream's.
//!   The tunnel ends when both directions have ended.
//! * Errors: a failed connect is 502/504 with Proxy-Status (RFC 9209); a
//!   broken connection resets the stream (H3_CONNECT_ERROR, CONNECT_ERROR);
//!   a reset stream closes the TCP connection with RST.

use relay_channel::region::Counter;
use tracing::debug;

use super::flow::Flow;
use super::head::{Head, Refusal};
use super::route::Kind;
use super::verdict::{hold, refuse_allowed};
use super::{Abort, CONNECT_TIMEOUT, End, State, TunnelId, Tunnels};
use crate::context::{Closing, Ctx, WatchOwner};
use crate::io::WatchKey;
use crate::tcp_target::{TargetRead, TargetState, TcpTarget, connect_failure};
use crate::timers::TimerTarget;

/// Bytes read from the target per read.
const READ_CHUNK: usize = 64 * 1024;

/// A classic CONNECT's TCP connection and its watch.
#[derive(Debug)]
pub struct TcpLeg {
    /// The connection.
    pub target: TcpTarget,
    watch: WatchKey,
    /// Target totals already accounted.
    counted: (u64, u64),
}

impl TcpLeg {
    /// Starts the flow's accounting now: what crossed the connection so
    /// far (a WebSocket handshake) is not payload, except the last
    /// `pending_down` bytes read, which are.
    pub fn count_from_here(&mut self, pending_down: usize) {
        let (up, down) = self.target.totals();
        self.counted = (up, down.saturating_sub(pending_down as u64));
    }

    /// Closes the connection once the backend forgot its watch; with
    /// `reset`, RST instead of FIN.
    pub fn release(mut self, reset: bool, ctx: &mut Ctx) {
        if reset {
            self.target.abort();
        }
        ctx.unwatch(self.watch, Closing::Tcp(self.target.into_stream()));
    }
}

/// Control allowed a classic CONNECT: connect to the target; the 2xx
/// waits for the connection.
pub(super) fn open(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, flow: Flow) {
    let limit = ts.slab.get(id).map_or(0, |t| t.limits.stream_out_limit);
    let target = match TcpTarget::connect(flow.target, limit) {
        Ok(t) => t,
        Err(e) => {
            debug!("TCP target socket: {e}");
            ctx.count(Counter::TcpConnectFailures, 1);
            let (status, error, reason) = connect_failure(e.raw_os_error().unwrap_or(0));
            return refuse_allowed(ts, ctx, id, flow.flow_id, Refusal::new(status, Some(error), reason));
        }
    };
    let watch = ctx.watch(target.fd(), WatchOwner::Tunnel(id), true);
    let deadline = ctx.now + CONNECT_TIMEOUT;
    let leg = Box::new(TcpLeg { target, watch, counted: (0, 0) });
    hold(ts, id, State::Connecting { leg, flow, deadline });
    ctx.timers.push(deadline, TimerTarget::Tunnel(id));
}

/// The connect completed: the early bytes (and the client's FIN, if it
/// came) go to the target, the 2xx to the client.
pub(super) fn connected(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Connecting { mut leg, mut flow, .. } = std::mem::replace(&mut t.state, State::Done) else {
        return;
    };
    if t.kind == Kind::WebSocket {
        // The origin's handshake comes first; the early bytes wait for it.
        flow.stream_bytes(0, 0, ctx.now);
        return super::websocket::connected(ts, ctx, id, leg, flow);
    }
    leg.target.push(&std::mem::take(&mut t.early));
    if t.client_ended {
        leg.target.finish();
    }
    flow.stream_bytes(0, 0, ctx.now);
    // RFC 9110 section 9.3.6: a 2xx to CONNECT carries no content and no
    // capsule protocol: the stream is the TCP byte stream.
    t.head = Some(Head::tunnel_open(false));
    t.state = State::Tcp { leg, flow };
    ts.opened(ctx, id);
    pump(ts, ctx, id);
}

/// The connect failed or timed out: 502/504 with Proxy-Status, the flow
/// released unused.
pub(super) fn connect_failed(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, errno: i32) {
    debug!(flow = ?ts.flow_id(id), errno, "TCP target connect failed");
    ctx.count(Counter::TcpConnectFailures, 1);
    ts.release(ctx, id);
    let (status, error, reason) = connect_failure(errno);
    ts.refuse(ctx, id, &Refusal::new(status, Some(error), reason));
}

/// Moves bytes between the target and the tunnel's buffers as far as both
/// allow: client bytes out to the target, target bytes into the stream
/// output (within the bound), the target's FIN and failures, accounting.
pub(super) fn pump(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let limit = t.limits.stream_out_limit;
    let State::Tcp { leg, flow } = &mut t.state else { return };
    leg.target.flush();
    while leg.target.may_read() {
        let room = limit.saturating_sub(t.bytes_out.len());
        if room == 0 {
            break;
        }
        match leg.target.read_into(&mut t.bytes_out, room.min(READ_CHUNK)) {
            TargetRead::Data(_) => {}
            TargetRead::Blocked | TargetRead::Eof => break,
        }
    }
    let (up, down) = leg.target.totals();
    let (du, dd) = (up - leg.counted.0, down - leg.counted.1);
    if du + dd > 0 {
        leg.counted = (up, down);
        flow.stream_bytes(du, dd, ctx.now);
        ctx.count(Counter::TcpBytesUp, du);
        ctx.count(Counter::TcpBytesDown, dd);
    }
    let failed = matches!(leg.target.state(), TargetState::Failed(_));
    let eof = leg.target.eof();
    let over = flow.over_budget();
    if failed {
        debug!(flow = ?ts.flow_id(id), "TCP target connection failed");
        return ts.abort(ctx, id, Abort::Connect);
    }
    if over {
        return ts.end_over_budget(ctx, id);
    }
    if eof && matches!(t.end, End::Open) {
        // The target ended its side: the stream's FIN follows its bytes.
        t.end = End::Finish { stop_reading: false };
    }
}

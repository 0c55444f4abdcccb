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
use crate::origin_h2::OriginH2;
use crate::tcp_target::{TargetRead, TargetState, TcpTarget, connect_failure};
use crate::timers::TimerTarget;

/// Bytes read from the target per read.
const READ_CHUNK: usize = 64 * 1024;

/// A classic CONNECT's TCP connection and its watch; for a WebSocket
/// origin spoken HTTP/2, the connection's one extended CONNECT stream
/// ([`OriginH2`]) is the byte stream instead of the connection itself.
#[derive(Debug)]
pub struct TcpLeg {
    /// The connection.
    pub target: TcpTarget,
    watch: WatchKey,
    /// Target totals already accounted.
    counted: (u64, u64),
    /// HTTP/2 to the origin (RFC 8441), once chosen.
    pub h2: Option<Box<OriginH2>>,
    /// Bytes crossing between the connection and HTTP/2.
    scratch: Vec<u8>,
}

impl TcpLeg {
    /// Starts the flow's accounting now: what crossed the connection so
    /// far (a WebSocket handshake) is not payload, except the last
    /// `pending_down` bytes read, which are.
    pub fn count_from_here(&mut self, pending_down: usize) {
        let (up, down) = self.totals();
        self.counted = (up, down.saturating_sub(pending_down as u64));
    }

    /// Payload bytes written towards the target and read from it.
    fn totals(&self) -> (u64, u64) {
        match &self.h2 {
            Some(h2) => h2.totals(),
            None => self.target.totals(),
        }
    }

    /// Room for client bytes.
    pub fn room(&self) -> usize {
        match &self.h2 {
            Some(h2) => h2.room(),
            None => self.target.room(),
        }
    }

    /// Queues client bytes (within [`Self::room`]).
    pub fn push(&mut self, data: &[u8]) {
        match &mut self.h2 {
            Some(h2) => h2.push(data),
            None => self.target.push(data),
        }
    }

    /// The client ended its side: FIN (END_STREAM) after its bytes.
    pub fn finish(&mut self) {
        match &mut self.h2 {
            Some(h2) => h2.finish(),
            None => self.target.finish(),
        }
    }

    /// Whether the client's end reached the target.
    pub fn write_closed(&self) -> bool {
        match &self.h2 {
            Some(h2) => h2.write_closed(),
            None => self.target.write_closed(),
        }
    }

    /// Whether the target ended its side.
    fn eof(&self) -> bool {
        match &self.h2 {
            Some(h2) => h2.eof(),
            None => self.target.eof(),
        }
    }

    /// Why the connection (or the HTTP/2 stream) broke, if it did.
    fn broken(&self) -> Option<String> {
        if let TargetState::Failed(errno) = self.target.state() {
            return Some(format!("TCP connection to the target failed (errno {errno})"));
        }
        self.h2.as_ref().and_then(|h| h.broken().map(str::to_string))
    }

    /// Moves bytes between the connection and HTTP/2 as far as both allow
    /// (without HTTP/2: writes what is buffered).
    pub fn shuttle(&mut self) {
        let Some(h2) = self.h2.as_mut() else { return self.target.flush() };
        for _ in 0..8 {
            let mut moved = h2.drive();
            if h2.has_output() && self.target.room() > 0 {
                self.scratch.clear();
                h2.take_output(&mut self.scratch);
                self.target.push(&self.scratch);
                moved = true;
            }
            self.target.flush();
            while h2.wants_input() && self.target.may_read() {
                self.scratch.clear();
                match self.target.read_into(&mut self.scratch, READ_CHUNK) {
                    TargetRead::Data(_) => {
                        h2.feed(&mut self.scratch);
                        moved = true;
                    }
                    TargetRead::Eof => {
                        h2.feed_eof();
                        moved = true;
                        break;
                    }
                    TargetRead::Blocked => break,
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Reads the target's bytes into `out`, at most `max`.
    fn read_into(&mut self, out: &mut Vec<u8>, max: usize) -> TargetRead {
        match &mut self.h2 {
            Some(h2) => h2.read_into(out, max),
            None if self.target.may_read() => self.target.read_into(out, max),
            None => TargetRead::Blocked,
        }
    }

    /// Closes the connection once the backend forgot its watch; with
    /// `reset`, RST instead of FIN. An HTTP/2 connection first gets what
    /// h2 says on the way out (its stream's end, GOAWAY), best effort.
    pub fn release(mut self, reset: bool, ctx: &mut Ctx) {
        if reset {
            self.target.abort();
        } else if let Some(h2) = self.h2.as_mut() {
            h2.close();
            self.scratch.clear();
            h2.take_output(&mut self.scratch);
            self.target.push(&self.scratch);
            self.target.flush();
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
    let leg = Box::new(TcpLeg { target, watch, counted: (0, 0), h2: None, scratch: Vec::new() });
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
    leg.shuttle();
    let mut read = false;
    loop {
        let room = limit.saturating_sub(t.bytes_out.len());
        if room == 0 {
            break;
        }
        match leg.read_into(&mut t.bytes_out, room.min(READ_CHUNK)) {
            TargetRead::Data(_) => read = true,
            TargetRead::Blocked | TargetRead::Eof => break,
        }
    }
    if read && leg.h2.is_some() {
        // The window given back goes out now.
        leg.shuttle();
    }
    let (up, down) = leg.totals();
    let (du, dd) = (up - leg.counted.0, down - leg.counted.1);
    if du + dd > 0 {
        leg.counted = (up, down);
        flow.stream_bytes(du, dd, ctx.now);
        ctx.count(Counter::TcpBytesUp, du);
        ctx.count(Counter::TcpBytesDown, dd);
    }
    let broken = leg.broken();
    let eof = leg.eof();
    let over = flow.over_budget();
    if let Some(why) = broken {
        debug!(flow = ?ts.flow_id(id), "{why}");
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

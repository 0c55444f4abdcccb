//! The HTTP/2 session of a TCP front connection: the `h2` crate's server
//! (RFC 9113, with RFC 8441 extended CONNECT enabled) on the in-memory pipe
//! of [`super::memio`], polled by the worker whenever bytes or events
//! arrive. One [`Exchange`] per stream.
//!
//! Why `h2`: it is the HTTP/2 of hyper, fuzzed and hardened against the
//! protocol's known abuses (rapid reset, CONTINUATION floods, small-frame
//! floods, HPACK bombs), and it is sans-runtime at heart: it only needs
//! `AsyncRead`/`AsyncWrite` and a waker, both of which we give it without
//! tokio's scheduler. Writing our own would mean re-doing that hardening.
//!
//! Flow control is the backpressure: a stream's received bytes are
//! released to the peer ([`h2::FlowControl::release_capacity`]) only once
//! the exchange took them (a TCP target's buffer had room), so a slow
//! target stops the client at its stream window; towards the client, data
//! is sent only within the capacity h2 has granted, so nothing queues
//! without bound.
//!
//! Requests are checked again with [`relay_proto::request::parse_request`]
//! (h2 already enforces RFC 9113 section 8.2/8.3: pseudo-headers,
//! connection-specific fields, lowercase names) and routed like HTTP/3
//! requests; a malformed one is reset with PROTOCOL_ERROR (RFC 9113
//! section 8.1.1).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::server::{Connection, Handshake, SendResponse};
use h2::{Reason, RecvStream, SendStream};
use relay_channel::region::Counter;
use relay_proto::h2c::{ClientFrameFilter, DataGate, ServerFrameSplice};
use relay_proto::request::{self, Request};
use tracing::debug;

use super::conn::{ConnIo, H2cSwitch};
use super::exchange::{self, Exchange, Via};
use super::memio::{FlagWaker, MemIo};
use super::{FrontSettings, Fx};
use crate::tunnel::head::Head;
use crate::tunnel::{Abort, End, NoDatagrams, TunnelId};

/// Bytes of h2's output the pipe holds before h2 waits.
const PIPE_OUT: usize = 64 * 1024;
/// Bytes of input handed to h2 at once.
const PIPE_IN: usize = 64 * 1024;
/// Largest header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE), as HTTP/3's
/// SETTINGS_MAX_FIELD_SECTION_SIZE.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Connection-level receive window.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Output an h2c Upgrade's gate holds at most before h2 is stopped (its
/// DATA beyond the client's true window is at most the debt; the rest is
/// what follows it in order).
const GATE_HOLD: usize = 256 * 1024;

struct Stream {
    ex: Exchange,
    recv: Option<RecvStream>,
    respond: Option<SendResponse<Bytes>>,
    send: Option<SendStream<Bytes>>,
    /// Received bytes the tunnel has not taken yet.
    held: Option<Bytes>,
    /// The client ended its side (END_STREAM).
    up_ended: bool,
    /// We ended ours (END_STREAM or RST_STREAM sent).
    down_ended: bool,
    /// The client reset the stream: nothing more moves.
    reset_by_client: bool,
}

enum Conn {
    Handshaking(Handshake<MemIo, Bytes>),
    Open(Connection<MemIo, Bytes>),
    Closed,
}

/// An HTTP/2 connection's session.
pub struct Session {
    pipe: MemIo,
    flag: Arc<FlagWaker>,
    waker: Waker,
    conn: Conn,
    streams: HashMap<u32, Stream>,
    /// h2c upgrade: the client's frames about stream 1 are filtered out.
    filter: Option<ClientFrameFilter>,
    /// h2c upgrade: stream 1's answer goes out after h2's SETTINGS.
    splice: Option<ServerFrameSplice>,
    /// h2c upgrade: h2's DATA waits at the client's true connection window
    /// while the window stream 1's answer used is still owed.
    gate: Option<DataGate>,
    /// Output the gate let through, on its way to the splice.
    released: Vec<u8>,
    draining: bool,
    goaway_sent: bool,
    scratch: Vec<u8>,
}

fn builder(settings: &FrontSettings) -> h2::server::Builder {
    let t = &settings.tcp;
    let mut b = h2::server::Builder::new();
    b.enable_connect_protocol()
        .max_concurrent_streams(t.max_streams_per_connection)
        // A stream's window is its tunnel's buffer: the client never has
        // more in flight than the relay holds for it.
        .initial_window_size(t.tunnel_buffer_bytes.min(i32::MAX as u32))
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(t.tunnel_buffer_bytes as usize)
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

/// The HTTP/2 error code a tunnel's abort resets its stream with (RFC 9113
/// section 7; a malformed capsule stream makes the message malformed,
/// section 8.1.1).
fn reason(a: Abort) -> Reason {
    match a {
        Abort::Cancelled => Reason::CANCEL,
        Abort::Message | Abort::Datagram => Reason::PROTOCOL_ERROR,
        Abort::Connect => Reason::CONNECT_ERROR,
        Abort::ExcessiveLoad => Reason::ENHANCE_YOUR_CALM,
    }
}

impl Session {
    /// A session on a connection that starts with the client preface (ALPN
    /// `h2`, or cleartext prior knowledge).
    pub fn new(settings: &FrontSettings) -> Self {
        let pipe = MemIo::new(PIPE_OUT);
        let (flag, waker) = FlagWaker::new();
        let handshake = builder(settings).handshake(pipe.clone());
        Self {
            pipe,
            flag,
            waker,
            conn: Conn::Handshaking(handshake),
            streams: HashMap::new(),
            filter: None,
            splice: None,
            gate: None,
            released: Vec::new(),
            draining: false,
            goaway_sent: false,
            scratch: Vec::new(),
        }
    }

    /// A session after an h2c upgrade (RFC 7540 section 3.2): stream 1 was
    /// answered by the relay itself.
    pub fn upgraded(switch: H2cSwitch, settings: &FrontSettings) -> Self {
        let mut s = Self::new(settings);
        s.filter = Some(ClientFrameFilter::new(1, switch.debt));
        s.splice = Some(ServerFrameSplice::new(switch.stream1));
        s.gate = (switch.debt > 0).then(|| DataGate::new(switch.debt));
        s
    }

    /// Whether no stream is open (the idle timeout applies).
    pub fn idle(&self) -> bool {
        self.streams.is_empty()
    }

    /// The tunnels of the session's streams.
    pub fn tunnels(&self) -> impl Iterator<Item = TunnelId> + '_ {
        self.streams.values().filter_map(|s| s.ex.tunnel())
    }

    /// Feeds input, polls h2, serves the streams, takes h2's output.
    pub fn run(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) -> bool {
        let mut progress = self.feed(io);
        for _ in 0..8 {
            let _ = self.flag.take();
            let mut moved = self.poll_conn(io, fx);
            let ids: Vec<u32> = self.streams.keys().copied().collect();
            for id in ids {
                moved |= self.serve(id, io, fx);
            }
            moved |= self.poll_conn(io, fx);
            moved |= self.take_output(io);
            moved |= self.feed(io);
            progress |= moved;
            if !moved && !self.flag.take() {
                break;
            }
        }
        if matches!(self.conn, Conn::Closed) && self.streams.is_empty() && !self.pipe.has_output() {
            io.close.get_or_insert("HTTP/2 connection closed");
        }
        progress
    }

    /// Hands the client's bytes to h2 (through the h2c filter).
    fn feed(&mut self, io: &mut ConnIo) -> bool {
        let mut progress = false;
        if !io.plain_in.is_empty() && self.pipe.input_backlog() < PIPE_IN {
            let take = io.plain_in.len().min(PIPE_IN);
            match self.filter.as_mut() {
                Some(f) => {
                    self.scratch.clear();
                    let pushed = f.push(&io.plain_in[..take], &mut self.scratch);
                    let credit = f.take_credit();
                    let paid = f.debt() == 0;
                    if let Some(g) = self.gate.as_mut() {
                        self.released.clear();
                        g.credit(credit, &mut self.released);
                        let released = std::mem::take(&mut self.released);
                        self.emit(&released, io);
                        self.released = released;
                    }
                    if paid && self.gate.as_ref().is_some_and(|g| !g.holding()) {
                        // h2's own accounting is exact from now on.
                        self.gate = None;
                    }
                    match pushed {
                        Ok(()) => self.pipe.feed(&self.scratch),
                        Err(e) => {
                            // Nothing more reaches h2: the connection closes.
                            debug!(conn = io.serial, "h2c client frames refused: {e}");
                            io.close.get_or_insert("bad HTTP/2 frames after an h2c upgrade");
                        }
                    }
                }
                None if take == io.plain_in.len() => {
                    // All of it: the buffer itself goes into the pipe.
                    self.pipe.feed_vec(&mut io.plain_in);
                }
                None => self.pipe.feed(&io.plain_in[..take]),
            }
            io.plain_in.drain(..take.min(io.plain_in.len()));
            progress = true;
        }
        if io.plain_eof && io.plain_in.is_empty() {
            self.pipe.feed_eof();
        }
        progress
    }

    fn take_output(&mut self, io: &mut ConnIo) -> bool {
        if !self.pipe.has_output()
            || io.out_room() == 0
            || self.gate.as_ref().is_some_and(|g| g.held() > GATE_HOLD)
        {
            // A gate holding this much: h2 stops at its pipe's bound until
            // the client grants window. Below it h2 keeps running (a
            // blocked h2 would stop reading, and the client's
            // WINDOW_UPDATE, which releases the gate, would never be read).
            return false;
        }
        if self.gate.is_none() && self.splice.is_none() {
            // No h2c shim: h2's output goes on as it is (the buffer itself
            // when nothing waits before it).
            self.pipe.take_output(&mut io.plain_out);
            return true;
        }
        self.scratch.clear();
        self.pipe.take_output(&mut self.scratch);
        match self.gate.as_mut() {
            Some(g) => {
                self.released.clear();
                g.push(&self.scratch, &mut self.released);
                let released = std::mem::take(&mut self.released);
                self.emit(&released, io);
                self.released = released;
            }
            None => {
                let out = std::mem::take(&mut self.scratch);
                self.emit(&out, io);
                self.scratch = out;
            }
        }
        true
    }

    /// Sends h2's output on towards the client, through the h2c splice.
    fn emit(&mut self, bytes: &[u8], io: &mut ConnIo) {
        match self.splice.as_mut() {
            Some(s) => s.push(bytes, &mut io.plain_out),
            None => io.plain_out.extend_from_slice(bytes),
        }
    }

    /// Polls the handshake or the connection: new requests.
    fn poll_conn(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) -> bool {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let mut progress = false;
        if let Conn::Handshaking(hs) = &mut self.conn {
            match Pin::new(hs).poll(&mut cx) {
                Poll::Ready(Ok(c)) => {
                    self.conn = Conn::Open(c);
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    debug!(conn = io.serial, "HTTP/2 handshake: {e}");
                    self.conn = Conn::Closed;
                    return true;
                }
                Poll::Pending => return false,
            }
        }
        let Conn::Open(conn) = &mut self.conn else { return progress };
        if self.draining && !self.goaway_sent {
            // RFC 9113 section 6.8: GOAWAY, then the open streams finish.
            conn.graceful_shutdown();
            self.goaway_sent = true;
            progress = true;
        }
        while let Conn::Open(conn) = &mut self.conn {
            match conn.poll_accept(&mut cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    progress = true;
                    self.on_request(req, respond, io, fx);
                }
                Poll::Ready(Some(Err(e))) => {
                    debug!(conn = io.serial, "HTTP/2 connection error: {e}");
                    self.conn = Conn::Closed;
                    self.close_streams(io, fx);
                    return true;
                }
                Poll::Ready(None) => {
                    // GOAWAY exchanged and every stream done.
                    self.conn = Conn::Closed;
                    return true;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    fn on_request(
        &mut self,
        req: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        io: &mut ConnIo,
        fx: &mut Fx<'_>,
    ) {
        let id = respond.stream_id().as_u32();
        fx.ctx.count(Counter::Http2Requests, 1);
        io.first_request_seen = true;
        io.last_activity = fx.ctx.now;
        let (parts, recv) = req.into_parts();
        let request = match to_request(&parts) {
            Ok(r) => r,
            Err(why) => {
                // RFC 9113 section 8.1.1: malformed requests are a stream
                // error of type PROTOCOL_ERROR.
                debug!(stream = id, "malformed HTTP/2 request: {why}");
                fx.ctx.count(Counter::RequestsMalformed, 1);
                respond.send_reset(Reason::PROTOCOL_ERROR);
                return;
            }
        };
        let up_ended = recv.is_end_stream();
        let via = Via { protocol: "HTTP/2", secure: io.secure };
        let ex = exchange::start(&request, u64::from(id), up_ended, via, io, fx);
        self.streams.insert(
            id,
            Stream {
                ex,
                recv: Some(recv),
                respond: Some(respond),
                send: None,
                held: None,
                up_ended,
                down_ended: false,
                reset_by_client: false,
            },
        );
    }

    /// Moves one stream along; returns whether anything happened.
    fn serve(&mut self, id: u32, io: &mut ConnIo, fx: &mut Fx<'_>) -> bool {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let alt_svc = fx.sh.settings.tcp.alt_svc.clone();
        let Some(st) = self.streams.get_mut(&id) else { return false };
        let mut progress = recv_up(st, id, &mut cx, fx);
        // The response head.
        let head = match &mut st.ex {
            Exchange::Answer { head, .. } => head.take(),
            Exchange::Tunnel(t) => fx.tunnels.take_head(*t),
        };
        if let Some(h) = head
            && let Some(mut respond) = st.respond.take()
        {
            let (body_len, end) = match &st.ex {
                Exchange::Answer { body, .. } => (body.len(), body.is_empty()),
                Exchange::Tunnel(t) => (0, !h.tunnel && fx.tunnels.out(*t).is_empty()),
            };
            match respond.send_response(response(&h, body_len, alt_svc.as_deref()), end) {
                Ok(send) => {
                    st.send = Some(send);
                    st.down_ended = end;
                    if let (true, Some(t)) = (end, st.ex.tunnel()) {
                        fx.tunnels.fin_sent(t);
                    }
                }
                Err(e) => {
                    debug!(stream = id, "HTTP/2 response: {e}");
                    st.reset_by_client = true;
                }
            }
            progress = true;
        }
        progress |= send_down(st, id, &mut cx, fx);
        // The end.
        if let Some(t) = st.ex.tunnel()
            && let End::Abort(a) = fx.tunnels.end(t)
        {
            if !st.down_ended {
                match (st.send.as_mut(), st.respond.as_mut()) {
                    (Some(s), _) => s.send_reset(reason(a)),
                    (None, Some(r)) => r.send_reset(reason(a)),
                    _ => {}
                }
            }
            self.finish_stream(id, io, fx);
            return true;
        }
        if st.reset_by_client {
            self.finish_stream(id, io, fx);
            return true;
        }
        if st.down_ended {
            let stop_reading = match st.ex.tunnel() {
                None => true,
                Some(t) => matches!(fx.tunnels.end(t), End::Finish { stop_reading: true }),
            };
            if stop_reading && !st.up_ended {
                // RFC 9113 section 8.1: after a complete response the rest
                // of the request is not needed. Dropping the stream's
                // handles lets h2 reset it (NO_ERROR) once the response has
                // gone out (an explicit RST_STREAM now would discard the
                // queued response).
                st.recv = None;
                st.up_ended = true;
            }
            let complete = match st.ex.tunnel() {
                None => st.up_ended,
                Some(t) => fx.tunnels.complete(t),
            };
            if complete {
                self.finish_stream(id, io, fx);
                return true;
            }
        }
        progress
    }

    fn finish_stream(&mut self, id: u32, io: &mut ConnIo, fx: &mut Fx<'_>) {
        if let Some(st) = self.streams.remove(&id)
            && let Some(t) = st.ex.tunnel()
        {
            fx.tunnels.remove(fx.ctx, t);
        }
        io.last_activity = fx.ctx.now;
    }

    fn close_streams(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.finish_stream(id, io, fx);
        }
    }

    /// Drain: GOAWAY; open streams finish.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Releases everything (the connection closes).
    pub fn close(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) {
        self.close_streams(io, fx);
        self.conn = Conn::Closed;
    }
}

/// Takes the client's DATA into the stream's tunnel, releasing flow-control
/// window only for what the tunnel took (an answer's request body is
/// discarded).
fn recv_up(st: &mut Stream, id: u32, cx: &mut Context<'_>, fx: &mut Fx<'_>) -> bool {
    let mut progress = false;
    loop {
        // Bytes already held count as progress only once the tunnel takes
        // some: a stream waiting for its target's room must not keep the
        // connection busy (it would be serviced again every turn for
        // nothing).
        let (data, fresh) = match st.held.take() {
            Some(d) => (d, false),
            None => {
                let Some(recv) = st.recv.as_mut() else { return progress };
                match recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(d))) => (d, true),
                    Poll::Ready(Some(Err(e))) => {
                        debug!(stream = id, "HTTP/2 receive: {e}");
                        st.recv = None;
                        st.up_ended = true;
                        st.reset_by_client = true;
                        return true;
                    }
                    Poll::Ready(None) => {
                        st.recv = None;
                        if !st.up_ended {
                            st.up_ended = true;
                            if let Some(t) = st.ex.tunnel() {
                                fx.tunnels.on_client_end(fx.ctx, t);
                            }
                        }
                        return true;
                    }
                    Poll::Pending => return progress,
                }
            }
        };
        progress |= fresh;
        let len = data.len();
        let taken = match st.ex.tunnel() {
            None => len,
            Some(t) => {
                let n = len.min(fx.tunnels.up_room(t));
                if n > 0 { fx.tunnels.on_stream_bytes(fx.ctx, t, &data[..n], &mut NoDatagrams) } else { 0 }
            }
        };
        progress |= taken > 0;
        if let Some(recv) = st.recv.as_mut()
            && taken > 0
        {
            let _ = recv.flow_control().release_capacity(taken);
        }
        if taken < len {
            st.held = Some(data.slice(taken..));
            return progress;
        }
    }
}

/// Sends bytes towards the client within the capacity h2 granted, then
/// END_STREAM when the exchange is done.
fn send_down(st: &mut Stream, id: u32, cx: &mut Context<'_>, fx: &mut Fx<'_>) -> bool {
    let mut progress = false;
    let Some(send) = st.send.as_mut() else { return false };
    if st.down_ended {
        return false;
    }
    loop {
        let pending = match &st.ex {
            Exchange::Answer { body, .. } => body.len(),
            Exchange::Tunnel(t) => fx.tunnels.out(*t).len(),
        };
        if pending == 0 {
            break;
        }
        send.reserve_capacity(pending.min(PIPE_OUT));
        match send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(n))) if n > 0 => {
                let chunk = match &mut st.ex {
                    Exchange::Answer { body, .. } => {
                        let k = n.min(body.len());
                        Bytes::from(body.drain(..k).collect::<Vec<u8>>())
                    }
                    // Capsules leave as one buffer per send, not copied.
                    Exchange::Tunnel(t) => fx.tunnels.take_out(fx.ctx, *t, n),
                };
                if let Err(e) = send.send_data(chunk, false) {
                    debug!(stream = id, "HTTP/2 send: {e}");
                    st.reset_by_client = true;
                    return true;
                }
                progress = true;
            }
            Poll::Ready(Some(Ok(_))) | Poll::Pending => break,
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                st.reset_by_client = true;
                return true;
            }
        }
    }
    let finished = match &st.ex {
        Exchange::Answer { body, .. } => body.is_empty(),
        Exchange::Tunnel(t) => fx.tunnels.wants_fin(*t),
    };
    if finished {
        let _ = send.send_data(Bytes::new(), true);
        st.down_ended = true;
        if let Some(t) = st.ex.tunnel() {
            fx.tunnels.fin_sent(t);
        }
        progress = true;
    }
    if let Poll::Ready(Ok(reason)) = send.poll_reset(cx) {
        debug!(stream = id, ?reason, "stream reset by the client");
        st.reset_by_client = true;
    }
    progress
}

/// Rebuilds the request's header section for the relay's own checks.
fn to_request(parts: &http::request::Parts) -> Result<Request, request::Malformed> {
    let method = parts.method.as_str().to_string();
    let scheme = parts.uri.scheme_str().map(str::to_string);
    let authority = parts.uri.authority().map(|a| a.as_str().to_string());
    let path = parts.uri.path_and_query().map(|p| p.as_str().to_string());
    let protocol = parts.extensions.get::<h2::ext::Protocol>().map(|p| p.as_str().to_string());
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(parts.headers.len() + 5);
    fields.push((b":method".to_vec(), method.into_bytes()));
    if let Some(s) = scheme {
        fields.push((b":scheme".to_vec(), s.into_bytes()));
    }
    if let Some(a) = authority {
        fields.push((b":authority".to_vec(), a.into_bytes()));
    }
    // Plain CONNECT has no :path; h2 puts "/" in the URI for it only
    // when absent, so take it only when the request has a scheme.
    if let Some(p) = path.filter(|_| parts.uri.scheme().is_some()) {
        fields.push((b":path".to_vec(), p.into_bytes()));
    }
    if let Some(p) = protocol {
        fields.push((b":protocol".to_vec(), p.into_bytes()));
    }
    for (name, value) in &parts.headers {
        fields.push((name.as_str().as_bytes().to_vec(), value.as_bytes().to_vec()));
    }
    request::parse_request(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())), true)
}

fn response(h: &Head, body_len: usize, alt_svc: Option<&str>) -> http::Response<()> {
    let mut r = http::Response::builder().status(h.status);
    for (name, value) in &h.fields {
        r = r.header(*name, value.as_str());
    }
    if !h.tunnel {
        r = r.header("content-length", h.head_only_len.unwrap_or(body_len).to_string());
    }
    if let Some(alt) = alt_svc {
        r = r.header("alt-svc", alt);
    }
    // Every field above is ours and valid; an invalid one would be a bug,
    // answered as a bare 500.
    r.body(()).unwrap_or_else(|_| {
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_rebuilt_for_the_relay_checks() {
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("https://relay.example/.well-known/masque/udp/192.0.2.1/53/")
            .extension(h2::ext::Protocol::from_static("connect-udp"))
            .header("capsule-protocol", "?1")
            .header("proxy-authorization", "Bearer t")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let r = to_request(&parts).unwrap();
        assert_eq!(r.method, "CONNECT");
        assert_eq!(r.protocol.as_deref(), Some("connect-udp"));
        assert_eq!(r.authority.as_deref(), Some("relay.example"));
        assert_eq!(r.path.as_deref(), Some("/.well-known/masque/udp/192.0.2.1/53/"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer t"));
        let plain = http::Request::builder().method("CONNECT").uri("example.com:443").body(()).unwrap();
        let (parts, ()) = plain.into_parts();
        let r = to_request(&parts).unwrap();
        assert_eq!(r.authority.as_deref(), Some("example.com:443"));
        assert!(r.path.is_none() && r.scheme.is_none());
        let bad = http::Request::builder()
            .method("CONNECT")
            .uri("https://relay.example/x")
            .extension(h2::ext::Protocol::from_static("connect-udp"))
            .header("content-length", "5")
            .body(())
            .unwrap();
        let (parts, ()) = bad.into_parts();
        assert_eq!(to_request(&parts), Err(request::Malformed::ContentWithCapsules));
    }

    #[test]
    fn responses_carry_lengths_and_alt_svc() {
        let h = Head {
            status: 200,
            fields: vec![("capsule-protocol", "?1".into())],
            tunnel: true,
            head_only_len: None,
        };
        let r = response(&h, 0, Some("h3=\":4433\""));
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("content-length").is_none());
        assert_eq!(r.headers()["alt-svc"], "h3=\":4433\"");
        let h = Head { status: 404, fields: Vec::new(), tunnel: false, head_only_len: None };
        assert_eq!(response(&h, 0, None).headers()["content-length"], "0");
    }
}

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
use std::time::Instant;

use bytes::Bytes;
use h2::server::{Connection, Handshake, SendResponse};
use h2::{Reason, RecvStream, SendStream};
use relay_channel::region::Counter;
use relay_proto::channel::record::FlowOpen;
use relay_proto::h2c::{ClientFrameFilter, ServerFrameSplice};
use relay_proto::request::{self, Request};
use tracing::debug;

use super::conn::{ConnIo, H2cSwitch};
use super::exchange::{self, Exchange, Head, State};
use super::flows::{self, Place};
use super::memio::{FlagWaker, MemIo};
use super::{Ctx, Shared};

/// Bytes of h2's output the pipe holds before h2 waits.
const PIPE_OUT: usize = 64 * 1024;
/// Bytes of input handed to h2 at once.
const PIPE_IN: usize = 64 * 1024;
/// Largest header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE), as HTTP/3's
/// SETTINGS_MAX_FIELD_SECTION_SIZE.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Connection-level receive window.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An ordinary request: its body (if any) is discarded.
    Plain,
    /// Classic CONNECT: DATA frames are the TCP bytes.
    Connect,
    /// A capsule tunnel (connect-udp, connect-ip).
    Capsules,
}

struct Stream {
    ex: Exchange,
    kind: Kind,
    recv: Option<RecvStream>,
    respond: Option<SendResponse<Bytes>>,
    send: Option<SendStream<Bytes>>,
    /// Received bytes the exchange has not taken yet.
    held: Option<Bytes>,
    /// The client ended its side (END_STREAM).
    up_ended: bool,
    /// We ended ours (END_STREAM or RST_STREAM sent).
    down_ended: bool,
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
    draining: bool,
    goaway_sent: bool,
    scratch: Vec<u8>,
}

fn builder(sh: &Shared) -> h2::server::Builder {
    let t = &sh.settings.tcp;
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

impl Session {
    /// A session on a connection that starts with the client preface (ALPN
    /// `h2`, or cleartext prior knowledge).
    pub fn new(_upgraded: bool, sh: &Shared) -> Self {
        let pipe = MemIo::new(PIPE_OUT);
        let (flag, waker) = FlagWaker::new();
        let handshake = builder(sh).handshake(pipe.clone());
        Self {
            pipe,
            flag,
            waker,
            conn: Conn::Handshaking(handshake),
            streams: HashMap::new(),
            filter: None,
            splice: None,
            draining: false,
            goaway_sent: false,
            scratch: Vec::new(),
        }
    }

    /// A session after an h2c upgrade (RFC 7540 section 3.2): stream 1 was
    /// answered by the relay itself.
    pub fn upgraded(switch: H2cSwitch, sh: &Shared) -> Self {
        let mut s = Self::new(true, sh);
        s.filter = Some(ClientFrameFilter::new(1, switch.debt));
        s.splice = Some(ServerFrameSplice::new(switch.stream1));
        s
    }

    /// The exchange of `stream`.
    pub fn exchange(&mut self, stream: u32) -> Option<&mut Exchange> {
        self.streams.get_mut(&stream).map(|s| &mut s.ex)
    }

    /// The exchange of `stream`.
    pub fn exchange_ref(&self, stream: u32) -> Option<&Exchange> {
        self.streams.get(&stream).map(|s| &s.ex)
    }

    /// Whether no stream is open (the idle timeout applies).
    pub fn idle(&self) -> bool {
        self.streams.is_empty()
    }

    /// Feeds input, polls h2, serves the streams, takes h2's output.
    pub fn run(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        let mut progress = self.feed(io);
        for _ in 0..8 {
            let _ = self.flag.take();
            let mut moved = self.poll_conn(io, sh, ctx);
            let ids: Vec<u32> = self.streams.keys().copied().collect();
            for id in ids {
                moved |= self.serve(id, io, sh, ctx);
            }
            moved |= self.poll_conn(io, sh, ctx);
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
                    match f.push(&io.plain_in[..take], &mut self.scratch) {
                        Ok(()) => self.pipe.feed(&self.scratch),
                        Err(e) => {
                            // Nothing more reaches h2: the connection closes.
                            debug!(peer = %io.peer, "h2c client frames refused: {e}");
                            io.close.get_or_insert("bad HTTP/2 frames after an h2c upgrade");
                        }
                    }
                }
                None => self.pipe.feed(&io.plain_in[..take]),
            }
            io.plain_in.drain(..take);
            progress = true;
        }
        if io.plain_eof && io.plain_in.is_empty() {
            self.pipe.feed_eof();
        }
        progress
    }

    fn take_output(&mut self, io: &mut ConnIo) -> bool {
        if !self.pipe.has_output() || io.out_room() == 0 {
            return false;
        }
        self.scratch.clear();
        self.pipe.take_output(&mut self.scratch);
        match self.splice.as_mut() {
            Some(s) => s.push(&self.scratch, &mut io.plain_out),
            None => io.plain_out.extend_from_slice(&self.scratch),
        }
        true
    }

    /// Polls the handshake or the connection: new requests.
    fn poll_conn(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
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
                    debug!(peer = %io.peer, "HTTP/2 handshake: {e}");
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
                    self.on_request(req, respond, io, sh, ctx);
                }
                Poll::Ready(Some(Err(e))) => {
                    debug!(peer = %io.peer, "HTTP/2 connection error: {e}");
                    self.conn = Conn::Closed;
                    self.abort_all(io, sh, ctx);
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
        sh: &mut Shared,
        ctx: &mut Ctx<'_>,
    ) {
        let id = respond.stream_id().as_u32();
        ctx.link.counters().add(Counter::Http2Requests, 1);
        io.first_request_seen = true;
        io.last_activity = ctx.now;
        let (parts, recv) = req.into_parts();
        let request = match to_request(&parts) {
            Ok(r) => r,
            Err(why) => {
                // RFC 9113 section 8.1.1: malformed requests are a stream
                // error of type PROTOCOL_ERROR.
                debug!(stream = id, "malformed HTTP/2 request: {why}");
                ctx.link.counters().add(Counter::RequestsMalformed, 1);
                respond.send_reset(Reason::PROTOCOL_ERROR);
                return;
            }
        };
        let s = &sh.settings;
        let route = exchange::route(&request, &s.template, s.ip_template.as_ref(), s.tcp.status_endpoint);
        let kind = match &route {
            exchange::Route::Tcp { .. } => Kind::Connect,
            exchange::Route::Udp { .. } | exchange::Route::Ip { .. } => Kind::Capsules,
            _ => Kind::Plain,
        };
        let place = Place { conn: io.key, stream: id, peer: io.peer };
        let authority = request.authority.clone().unwrap_or_default();
        let via = flows::Via { protocol: "HTTP/2", secure: io.secure };
        let ex = flows::start(route, &authority, place, via, sh, ctx);
        let up_ended = recv.is_end_stream();
        self.streams.insert(
            id,
            Stream {
                ex,
                kind,
                recv: Some(recv),
                respond: Some(respond),
                send: None,
                held: None,
                up_ended,
                down_ended: false,
            },
        );
        if up_ended && kind != Kind::Plain {
            // A tunnel request must leave the stream open (RFC 8441
            // section 4: the stream carries the tunnel).
            if let Some(st) = self.streams.get_mut(&id) {
                st.ex.up_end();
            }
        }
    }

    /// Moves one stream along; returns whether anything happened.
    fn serve(&mut self, id: u32, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let place = Place { conn: io.key, stream: id, peer: io.peer };
        let alt_svc = sh.settings.tcp.alt_svc.clone();
        let Some(st) = self.streams.get_mut(&id) else { return false };
        let mut progress = false;
        // Client bytes.
        progress |= recv_up(st, place, &mut cx, sh, ctx);
        // The target's bytes.
        if matches!(st.ex.state, State::Tcp { .. }) {
            let (moved, up, down) = st.ex.pump_tcp(ctx.now);
            if up > 0 {
                ctx.link.counters().add(Counter::TcpBytesUp, up);
            }
            if down > 0 {
                ctx.link.counters().add(Counter::TcpBytesDown, down);
            }
            progress |= moved;
            if moved {
                progress |= recv_up(st, place, &mut cx, sh, ctx);
            }
        }
        if st.ex.over_budget() && st.ex.abort.is_none() {
            ctx.link.counters().add(Counter::TunnelsOverBudget, 1);
            st.ex.abort = Some("byte budget used up");
        }
        // The response head.
        if let Some(h) = st.ex.head.take()
            && let Some(mut respond) = st.respond.take()
        {
            let body_empty = st.ex.down_bytes().is_empty();
            let end = !h.tunnel && body_empty && st.ex.down_fin;
            match respond.send_response(response(&h, st.ex.down.len(), alt_svc.as_deref()), end) {
                Ok(send) => {
                    st.send = Some(send);
                    st.down_ended = end;
                }
                Err(e) => {
                    debug!(stream = id, "HTTP/2 response: {e}");
                    st.ex.abort.get_or_insert("response failed");
                }
            }
            progress = true;
        }
        // Bytes towards the client, within the capacity h2 granted.
        if let Some(send) = st.send.as_mut()
            && !st.down_ended
        {
            loop {
                let pending = st.ex.down_bytes().len();
                if pending == 0 {
                    break;
                }
                send.reserve_capacity(pending.min(PIPE_OUT));
                match send.poll_capacity(&mut cx) {
                    Poll::Ready(Some(Ok(n))) if n > 0 => {
                        let bytes = st.ex.down_bytes();
                        let k = n.min(bytes.len());
                        let chunk = Bytes::copy_from_slice(&bytes[..k]);
                        st.ex.consume_down(k);
                        if let Err(e) = send.send_data(chunk, false) {
                            debug!(stream = id, "HTTP/2 send: {e}");
                            st.ex.abort.get_or_insert("send failed");
                            break;
                        }
                        progress = true;
                    }
                    Poll::Ready(Some(Ok(_))) | Poll::Pending => break,
                    Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                        st.ex.abort.get_or_insert("stream reset by the client");
                        break;
                    }
                }
            }
            if st.ex.finished() && st.ex.abort.is_none() {
                let _ = send.send_data(Bytes::new(), true);
                st.down_ended = true;
                progress = true;
            }
            if let Poll::Ready(Ok(reason)) = send.poll_reset(&mut cx) {
                debug!(stream = id, ?reason, "stream reset by the client");
                st.ex.abort.get_or_insert("stream reset by the client");
            }
        }
        // The end.
        if let Some(why) = st.ex.abort {
            debug!(stream = id, "HTTP/2 stream aborted: {why}");
            if !st.down_ended {
                let reason = if matches!(st.ex.state, State::Tcp { .. }) {
                    Reason::CONNECT_ERROR
                } else {
                    Reason::CANCEL
                };
                match (st.send.as_mut(), st.respond.as_mut()) {
                    (Some(s), _) => s.send_reset(reason),
                    (None, Some(r)) => r.send_reset(reason),
                    _ => {}
                }
            }
            self.finish_stream(id, io, sh, ctx);
            return true;
        }
        if st.down_ended {
            let answer = matches!(st.ex.state, State::Answer | State::Done);
            if answer && !st.up_ended {
                // RFC 9113 section 8.1: after a complete response the rest
                // of the request is not needed. Dropping the stream's
                // handles lets h2 reset it once the response has gone out
                // (an explicit RST_STREAM now would discard the queued
                // response).
                st.recv = None;
                st.up_ended = true;
            }
            if st.up_ended {
                self.finish_stream(id, io, sh, ctx);
                return true;
            }
        }
        progress
    }

    fn finish_stream(&mut self, id: u32, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        if let Some(mut st) = self.streams.remove(&id) {
            flows::release(&mut st.ex, sh, ctx);
        }
        io.last_activity = ctx.now;
    }

    fn abort_all(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.finish_stream(id, io, sh, ctx);
        }
    }

    /// Ends one exchange from the relay's side: END_STREAM after what is
    /// buffered for a tunnel that idled out or whose target ended.
    pub fn end_exchange(&mut self, stream: u32, _io: &mut ConnIo, _sh: &mut Shared, _ctx: &mut Ctx<'_>) {
        if let Some(st) = self.streams.get_mut(&stream) {
            st.ex.abort.get_or_insert("ended by the relay");
        }
    }

    /// When a stream needs a timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.streams.values().filter_map(|s| s.ex.deadline()).min()
    }

    /// A timer fired: ask and connect deadlines, idle tunnels.
    pub fn on_timer(&mut self, _io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        let due: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| s.ex.deadline().is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(st) = self.streams.get_mut(&id) else { continue };
            match &st.ex.state {
                State::Asking { .. } => {
                    ctx.link.counters().add(Counter::AsksFailed, 1);
                    flows::release(&mut st.ex, sh, ctx);
                    st.ex = flows::refused(
                        sh,
                        503,
                        Some(relay_proto::proxy_status::ProxyError::ProxyInternalError),
                        "control plane did not answer in time",
                    );
                }
                State::Connecting { .. } => flows::connect_failed(&mut st.ex, libc::ETIMEDOUT, sh, ctx),
                State::Tcp { .. } | State::Udp { .. } | State::Ip { .. } => {
                    st.ex.abort.get_or_insert("idle");
                }
                State::Answer | State::Done => {}
            }
        }
    }

    /// Drain: GOAWAY; open streams finish.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Ends the streams carrying `flows`.
    pub fn kill(&mut self, flows_to_kill: &[u64], _io: &mut ConnIo, _sh: &mut Shared, _ctx: &mut Ctx<'_>) {
        for st in self.streams.values_mut() {
            if st.ex.flow_id().is_some_and(|f| flows_to_kill.contains(&f)) {
                st.ex.abort = Some("killed by the operator");
            }
        }
    }

    /// The streams' exchanges.
    pub fn exchanges_mut(&mut self) -> impl Iterator<Item = &mut Exchange> {
        self.streams.values_mut().map(|st| &mut st.ex)
    }

    /// The open flows, for a re-attached control.
    pub fn open_flows(&self, peer: std::net::SocketAddr, out: &mut Vec<FlowOpen>) {
        out.extend(self.streams.values().filter_map(|s| flows::open_flow(&s.ex, peer)));
    }

    /// Releases everything (the connection closes).
    pub fn close(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        self.abort_all(io, sh, ctx);
        self.conn = Conn::Closed;
    }
}

/// Takes the client's DATA into the exchange, releasing flow-control
/// window only for what the exchange took.
fn recv_up(st: &mut Stream, place: Place, cx: &mut Context<'_>, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
    let mut progress = false;
    loop {
        let data = match st.held.take() {
            Some(d) => d,
            None => {
                let Some(recv) = st.recv.as_mut() else { return progress };
                match recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(d))) => d,
                    Poll::Ready(Some(Err(e))) => {
                        debug!(stream = place.stream, "HTTP/2 receive: {e}");
                        st.recv = None;
                        st.up_ended = true;
                        st.ex.abort.get_or_insert("stream reset by the client");
                        return true;
                    }
                    Poll::Ready(None) => {
                        st.recv = None;
                        if !st.up_ended {
                            st.up_ended = true;
                            up_end(st);
                        }
                        return true;
                    }
                    Poll::Pending => return progress,
                }
            }
        };
        progress = true;
        let len = data.len();
        let taken = match (st.kind, &st.ex.state) {
            (_, State::Answer | State::Done) | (Kind::Plain, _) => len,
            (Kind::Connect, _) => {
                let n = len.min(st.ex.up_room());
                if n > 0 {
                    st.ex.up_tcp(&data[..n], ctx.now);
                }
                n
            }
            (Kind::Capsules, _) => {
                if let Err(why) = flows::up_capsules(&mut st.ex, &data, place, sh, ctx) {
                    st.ex.abort.get_or_insert(why);
                }
                len
            }
        };
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

/// The client ended its side of a stream.
fn up_end(st: &mut Stream) {
    match st.kind {
        Kind::Connect => st.ex.up_end(),
        Kind::Capsules => {
            // RFC 9298 section 3: the end of the stream closes the tunnel
            // (RFC 9297 section 3.3: inside a capsule it is malformed).
            if let State::Udp { tunnel, .. } | State::Ip { tunnel, .. } = &st.ex.state
                && tunnel.on_stream_end().is_err()
            {
                st.ex.abort.get_or_insert("stream ended inside a capsule");
            }
            st.ex.up_end();
            st.ex.down_fin = true;
        }
        Kind::Plain => st.ex.up_end(),
    }
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

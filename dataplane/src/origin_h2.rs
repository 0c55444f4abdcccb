//! One HTTP/2 client connection to a WebSocket origin, carrying one
//! extended CONNECT (RFC 8441), on in-memory bytes: no socket, no runtime.
//!
//! The tunnel layer ([`crate::tunnel::websocket`]) owns the TCP (and TLS)
//! connection and moves bytes: the origin's plaintext in
//! ([`OriginH2::feed`]), the connection's bytes out
//! ([`OriginH2::take_output`]). This module is the `h2` crate's client
//! driven through [`MemIo`] like the TCP front drives its server:
//!
//! * The relay sends its connection preface, then waits for the origin's
//!   (its SETTINGS frame, RFC 9113 section 3.4), read here from the first
//!   bytes with `relay_proto::h2c::server_preface`: an origin whose
//!   SETTINGS do not enable extended CONNECT is never sent one (RFC 8441
//!   section 3; [`Answer::NoExtendedConnect`]).
//! * The request: `:method CONNECT`, `:protocol websocket`, `:scheme`,
//!   `:authority` and `:path` (section 4), `sec-websocket-version` and
//!   the client's protocols, extensions and Origin; no
//!   `Sec-WebSocket-Key` (section 5). Its answer is checked by the caller
//!   (`relay_proto::websocket::check_connect_response`).
//! * Then the stream's DATA carries WebSocket frames unchanged, within
//!   HTTP/2 flow control both ways: client bytes wait in a bounded buffer
//!   until the origin grants capacity; the origin's bytes are released
//!   (WINDOW_UPDATE) only once the tunnel took them, so a slow client
//!   holds the origin back. END_STREAM is the TCP FIN both ways, the
//!   origin's RST_STREAM a reset (RFC 8441 section 5).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use relay_proto::websocket::ClientHandshake;

use crate::front::memio::{FlagWaker, MemIo};
use crate::tcp_target::TargetRead;

/// The stream's and the connection's receive window: what the origin may
/// send before the client took it.
const WINDOW: u32 = 256 * 1024;
/// h2's output held before it waits for the socket.
const PIPE_OUT: usize = 256 * 1024;
/// The origin's bytes handed in and not yet read by h2.
const PIPE_IN: usize = 256 * 1024;
/// Largest response header list taken from the origin.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Rounds of polling per call while h2 keeps waking itself.
const ROUNDS: usize = 8;

type Handshake =
    Pin<Box<dyn Future<Output = Result<(SendRequest<Bytes>, Connection<MemIo, Bytes>), h2::Error>> + Send>>;

/// What became of the extended CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The origin's response head: status and fields (names lower-case).
    Response {
        /// `:status`.
        status: u16,
        /// The fields, in order.
        fields: Vec<(String, Vec<u8>)>,
    },
    /// The origin's SETTINGS do not enable extended CONNECT.
    NoExtendedConnect,
    /// The connection or the stream failed first (what happened).
    Failed(String),
}

enum Phase {
    Handshaking(Handshake),
    /// Waiting for the origin's SETTINGS.
    Settings(SendRequest<Bytes>),
    Requested(ResponseFuture),
    Open,
    Done,
}

/// The HTTP/2 connection to one origin and its one stream.
pub struct OriginH2 {
    pipe: MemIo,
    flag: Arc<FlagWaker>,
    waker: Waker,
    phase: Phase,
    conn: Option<Connection<MemIo, Bytes>>,
    request: Option<http::Request<()>>,
    /// The origin's first bytes, until its preface frame is complete.
    preface: Vec<u8>,
    /// Whether the preface was read and enables extended CONNECT.
    preface_read: Option<bool>,
    answer: Option<Answer>,
    send: Option<SendStream<Bytes>>,
    recv: Option<RecvStream>,
    /// Received from the origin, not yet taken by the tunnel.
    held: Bytes,
    /// Client bytes for the origin not yet given to h2.
    up: BytesMut,
    up_limit: usize,
    finish_requested: bool,
    end_sent: bool,
    recv_ended: bool,
    /// The stream or the connection broke after the answer.
    broken: Option<String>,
    /// Payload bytes sent and received on the stream.
    totals: (u64, u64),
}

impl std::fmt::Debug for OriginH2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match self.phase {
            Phase::Handshaking(_) => "handshaking",
            Phase::Settings(_) => "settings",
            Phase::Requested(_) => "requested",
            Phase::Open => "open",
            Phase::Done => "done",
        };
        f.debug_struct("OriginH2")
            .field("phase", &phase)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

impl OriginH2 {
    /// A connection that will ask `scheme://authority/path` for a
    /// WebSocket with the client's choices, buffering at most `up_limit`
    /// client bytes. Fails when the target does not make a request URI.
    pub fn new(
        scheme: &str,
        authority: &str,
        path: &str,
        client: &ClientHandshake,
        up_limit: usize,
    ) -> Result<Self, String> {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{scheme}://{authority}{path}"))
            .extension(h2::ext::Protocol::from_static("websocket"));
        for (name, value) in relay_proto::websocket::connect_request_fields(client) {
            req =
                req.header(name, http::HeaderValue::from_bytes(value.as_bytes()).map_err(|e| e.to_string())?);
        }
        let request = req.body(()).map_err(|e| format!("the upstream request: {e}"))?;
        let pipe = MemIo::new(PIPE_OUT);
        let mut b = h2::client::Builder::new();
        b.enable_push(false)
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_send_buffer_size(up_limit.max(16 * 1024))
            .max_header_list_size(MAX_HEADER_LIST);
        let handshake: Handshake = Box::pin(b.handshake::<MemIo, Bytes>(pipe.clone()));
        let (flag, waker) = FlagWaker::new();
        let mut me = Self {
            pipe,
            flag,
            waker,
            phase: Phase::Handshaking(handshake),
            conn: None,
            request: Some(request),
            preface: Vec::new(),
            preface_read: None,
            answer: None,
            send: None,
            recv: None,
            held: Bytes::new(),
            up: BytesMut::new(),
            up_limit,
            finish_requested: false,
            end_sent: false,
            recv_ended: false,
            broken: None,
            totals: (0, 0),
        };
        // The client's preface is written at once.
        me.drive();
        Ok(me)
    }

    /// Hands in the origin's plaintext, taking it (`data` is left empty;
    /// its buffer goes into the pipe when h2 has read everything before,
    /// without a copy).
    pub fn feed(&mut self, data: &mut Vec<u8>) {
        if self.preface_read.is_none() {
            self.preface.extend_from_slice(data);
            match relay_proto::h2c::server_preface(&self.preface) {
                Ok(None) => {}
                Ok(Some((settings, _))) => {
                    self.preface_read = Some(settings.enable_connect_protocol);
                    self.preface = Vec::new();
                }
                Err(e) => {
                    // h2 finds the same fault and fails the connection.
                    self.preface_read = Some(false);
                    self.preface = Vec::new();
                    self.fail(format!("the origin's HTTP/2 preface: {e}"));
                }
            }
        }
        self.pipe.feed_vec(data);
    }

    /// The origin's side of the connection ended.
    pub fn feed_eof(&mut self) {
        self.pipe.feed_eof();
    }

    /// Whether more of the origin's bytes may be handed in.
    pub fn wants_input(&self) -> bool {
        self.pipe.input_backlog() < PIPE_IN
    }

    /// Takes the bytes to send the origin.
    pub fn take_output(&mut self, out: &mut Vec<u8>) {
        self.pipe.take_output(out);
    }

    /// Whether bytes wait to be sent to the origin.
    pub fn has_output(&self) -> bool {
        self.pipe.has_output()
    }

    /// The answer to the extended CONNECT, once (after [`Self::drive`]).
    pub fn take_answer(&mut self) -> Option<Answer> {
        self.answer.take()
    }

    /// Room for client bytes.
    pub fn room(&self) -> usize {
        if self.finish_requested || self.broken.is_some() {
            return 0;
        }
        self.up_limit.saturating_sub(self.up.len())
    }

    /// Queues client bytes (the caller respects [`Self::room`]).
    pub fn push(&mut self, data: &[u8]) {
        self.up.extend_from_slice(data);
    }

    /// The client ended its side: END_STREAM once its bytes are sent.
    pub fn finish(&mut self) {
        self.finish_requested = true;
    }

    /// Whether END_STREAM went to the origin.
    pub fn write_closed(&self) -> bool {
        self.end_sent
    }

    /// Whether the origin ended its side and every byte was taken.
    pub fn eof(&self) -> bool {
        self.recv_ended && self.held.is_empty()
    }

    /// Why the stream broke after the answer (the origin reset it, or the
    /// connection failed).
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Payload bytes sent to the origin and received from it.
    pub fn totals(&self) -> (u64, u64) {
        self.totals
    }

    /// Whether client bytes wait for the origin's flow control.
    pub fn backlog(&self) -> usize {
        self.up.len()
    }

    /// Moves the origin's bytes into `out`, at most `max`; their window is
    /// given back to the origin.
    pub fn read_into(&mut self, out: &mut Vec<u8>, max: usize) -> TargetRead {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let mut read = 0;
        while read < max {
            if self.held.is_empty() {
                let Some(recv) = self.recv.as_mut() else { break };
                match recv.poll_data(&mut cx) {
                    Poll::Ready(Some(Ok(d))) => self.held = d,
                    Poll::Ready(Some(Err(e))) => {
                        self.recv = None;
                        self.fail(origin_error(&e));
                        break;
                    }
                    Poll::Ready(None) => {
                        self.recv = None;
                        self.recv_ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let n = self.held.len().min(max - read);
            out.extend_from_slice(&self.held[..n]);
            self.held = self.held.slice(n..);
            if let Some(recv) = self.recv.as_mut() {
                let _ = recv.flow_control().release_capacity(n);
            }
            read += n;
        }
        self.totals.1 += read as u64;
        match (read, self.eof()) {
            (0, true) => TargetRead::Eof,
            (0, false) => TargetRead::Blocked,
            (n, _) => TargetRead::Data(n),
        }
    }

    /// Drops the stream before the connection is closed: h2 sends what
    /// the stream's end calls for (RST_STREAM CANCEL when it is still
    /// open; GOAWAY with NO_ERROR once the connection has no stream and no
    /// request handle left, RFC 9113 section 6.8); the bytes are in
    /// [`Self::take_output`].
    pub fn close(&mut self) {
        self.send = None;
        self.recv = None;
        self.phase = Phase::Done;
        self.drive();
    }

    /// Polls the connection and the stream as far as they go: the
    /// handshake, the request once the origin's SETTINGS allow it, the
    /// answer, client bytes within the granted capacity and END_STREAM.
    /// Returns whether anything moved.
    pub fn drive(&mut self) -> bool {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let mut progress = false;
        for _ in 0..ROUNDS {
            let _ = self.flag.take();
            let mut moved = self.poll_phase(&mut cx);
            moved |= self.send_up(&mut cx);
            moved |= self.poll_conn(&mut cx);
            progress |= moved;
            if !moved && !self.flag.take() {
                break;
            }
        }
        progress
    }

    fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else { return false };
        match Pin::new(conn).poll(cx) {
            Poll::Pending => false,
            Poll::Ready(r) => {
                self.conn = None;
                let why = match r {
                    Ok(()) => "the origin closed the HTTP/2 connection".to_string(),
                    Err(e) => origin_error(&e),
                };
                if !self.recv_ended || !self.end_sent {
                    self.fail(why);
                }
                true
            }
        }
    }

    fn poll_phase(&mut self, cx: &mut Context<'_>) -> bool {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Handshaking(mut hs) => match hs.as_mut().poll(cx) {
                Poll::Ready(Ok((send_request, conn))) => {
                    self.conn = Some(conn);
                    self.phase = Phase::Settings(send_request);
                    true
                }
                Poll::Ready(Err(e)) => {
                    self.fail(format!("HTTP/2 handshake: {e}"));
                    true
                }
                Poll::Pending => {
                    self.phase = Phase::Handshaking(hs);
                    false
                }
            },
            Phase::Settings(mut send_request) => {
                match self.preface_read {
                    None => {
                        self.phase = Phase::Settings(send_request);
                        return false;
                    }
                    Some(false) => {
                        if self.answer.is_none() && self.broken.is_none() {
                            self.answer = Some(Answer::NoExtendedConnect);
                        }
                        return true;
                    }
                    Some(true) => {}
                }
                // h2 applies the SETTINGS once it read them: wait for that.
                if !send_request.is_extended_connect_protocol_enabled() {
                    self.phase = Phase::Settings(send_request);
                    return false;
                }
                match send_request.poll_ready(cx) {
                    Poll::Pending => {
                        self.phase = Phase::Settings(send_request);
                        false
                    }
                    Poll::Ready(Err(e)) => {
                        self.fail(origin_error(&e));
                        true
                    }
                    Poll::Ready(Ok(())) => {
                        let Some(request) = self.request.take() else { return true };
                        match send_request.send_request(request, false) {
                            Ok((response, send)) => {
                                self.send = Some(send);
                                self.phase = Phase::Requested(response);
                            }
                            Err(e) => self.fail(origin_error(&e)),
                        }
                        true
                    }
                }
            }
            Phase::Requested(mut response) => match Pin::new(&mut response).poll(cx) {
                Poll::Pending => {
                    self.phase = Phase::Requested(response);
                    false
                }
                Poll::Ready(Err(e)) => {
                    self.fail(origin_error(&e));
                    true
                }
                Poll::Ready(Ok(resp)) => {
                    let (parts, body) = resp.into_parts();
                    let fields = parts
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                        .collect();
                    self.answer = Some(Answer::Response { status: parts.status.as_u16(), fields });
                    self.recv = Some(body);
                    self.phase = Phase::Open;
                    true
                }
            },
            Phase::Open => {
                self.phase = Phase::Open;
                if let Some(send) = self.send.as_mut()
                    && let Poll::Ready(r) = send.poll_reset(cx)
                {
                    self.send = None;
                    let why = match r {
                        Ok(reason) => format!("the origin reset the stream ({reason})"),
                        Err(e) => origin_error(&e),
                    };
                    self.fail(why);
                    return true;
                }
                false
            }
            Phase::Done => false,
        }
    }

    /// Client bytes within the capacity h2 granted, then END_STREAM.
    fn send_up(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(self.phase, Phase::Open) || self.end_sent {
            return false;
        }
        let Some(send) = self.send.as_mut() else { return false };
        let mut progress = false;
        while !self.up.is_empty() {
            send.reserve_capacity(self.up.len());
            match send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(n))) if n > 0 => {
                    let n = n.min(self.up.len());
                    // The chunk leaves the buffer without a copy.
                    let chunk = self.up.split_to(n).freeze();
                    if let Err(e) = send.send_data(chunk, false) {
                        let why = origin_error(&e);
                        self.fail(why);
                        return true;
                    }
                    self.totals.0 += n as u64;
                    progress = true;
                }
                Poll::Ready(Some(Ok(_))) | Poll::Pending => break,
                Poll::Ready(Some(Err(e))) => {
                    let why = origin_error(&e);
                    self.fail(why);
                    return true;
                }
                Poll::Ready(None) => {
                    self.fail("the origin's stream closed".into());
                    return true;
                }
            }
        }
        if self.up.is_empty() && self.finish_requested {
            let _ = send.send_data(Bytes::new(), true);
            self.end_sent = true;
            progress = true;
        }
        progress
    }

    fn fail(&mut self, why: String) {
        if matches!(self.phase, Phase::Open) || self.answer.is_some() {
            self.broken.get_or_insert(why);
        } else {
            self.answer.get_or_insert(Answer::Failed(why));
            self.broken.get_or_insert_with(|| "the origin's HTTP/2 connection failed".into());
        }
        self.phase = Phase::Done;
    }
}

/// What an h2 error says about the origin.
fn origin_error(e: &h2::Error) -> String {
    if let Some(reason) = e.reason()
        && e.is_remote()
    {
        return format!("the origin sent {reason}");
    }
    format!("HTTP/2 with the origin: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    type ServerHandshake =
        Pin<Box<dyn Future<Output = Result<h2::server::Connection<MemIo, Bytes>, h2::Error>>>>;

    /// An origin played by the `h2` crate's server over a second pipe: the
    /// bytes cross by hand.
    struct Origin {
        pipe: MemIo,
        conn: Option<h2::server::Connection<MemIo, Bytes>>,
        hs: Option<ServerHandshake>,
        waker: Waker,
        requests: Vec<(http::Request<RecvStream>, h2::server::SendResponse<Bytes>)>,
    }

    impl Origin {
        fn new(connect_protocol: bool) -> Self {
            let pipe = MemIo::new(1 << 20);
            let mut b = h2::server::Builder::new();
            if connect_protocol {
                b.enable_connect_protocol();
            }
            let hs = Box::pin(b.handshake::<MemIo, Bytes>(pipe.clone()));
            let (_, waker) = FlagWaker::new();
            Self { pipe, conn: None, hs: Some(hs), waker, requests: Vec::new() }
        }

        fn poll(&mut self) {
            let mut cx = Context::from_waker(&self.waker);
            if let Some(hs) = self.hs.as_mut()
                && let Poll::Ready(r) = hs.as_mut().poll(&mut cx)
            {
                self.conn = Some(r.unwrap());
                self.hs = None;
            }
            if let Some(conn) = self.conn.as_mut() {
                while let Poll::Ready(Some(Ok(r))) = conn.poll_accept(&mut cx) {
                    self.requests.push(r);
                }
            }
        }
    }

    /// Moves bytes both ways until neither side has any.
    fn exchange(client: &mut OriginH2, origin: &mut Origin) {
        for _ in 0..32 {
            client.drive();
            origin.poll();
            let mut a = Vec::new();
            client.take_output(&mut a);
            let mut b = Vec::new();
            origin.pipe.take_output(&mut b);
            if a.is_empty() && b.is_empty() {
                client.drive();
                origin.poll();
                if !client.has_output() && !origin.pipe.has_output() {
                    return;
                }
                continue;
            }
            origin.pipe.feed(&a);
            client.feed(&mut b);
        }
    }

    fn offered() -> ClientHandshake {
        ClientHandshake {
            protocols: Some("chat".into()),
            extensions: None,
            origin: Some("https://a.example".into()),
            key: None,
        }
    }

    #[test]
    fn the_extended_connect_waits_for_settings_and_carries_the_clients_choices() {
        let mut client = OriginH2::new("https", "chat.internal", "/ws?x=1", &offered(), 1 << 20).unwrap();
        let mut origin = Origin::new(true);
        assert!(client.take_answer().is_none());
        exchange(&mut client, &mut origin);
        assert_eq!(origin.requests.len(), 1, "one request once the SETTINGS allowed it");
        let (req, mut respond) = origin.requests.pop().unwrap();
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.extensions().get::<h2::ext::Protocol>().map(|p| p.as_str()), Some("websocket"));
        assert_eq!(req.uri().to_string(), "https://chat.internal/ws?x=1");
        let h = req.headers();
        assert_eq!(h["sec-websocket-version"], "13");
        assert_eq!(h["sec-websocket-protocol"], "chat");
        assert_eq!(h["origin"], "https://a.example");
        assert!(h.get("sec-websocket-key").is_none(), "RFC 8441 section 5");
        let resp =
            http::Response::builder().status(200).header("sec-websocket-protocol", "chat").body(()).unwrap();
        let mut down = respond.send_response(resp, false).unwrap();
        let mut body = req.into_body();
        exchange(&mut client, &mut origin);
        match client.take_answer() {
            Some(Answer::Response { status: 200, fields }) => {
                assert!(fields.contains(&("sec-websocket-protocol".into(), b"chat".to_vec())));
            }
            other => panic!("{other:?}"),
        }
        // Bytes both ways, larger than the initial windows, then END_STREAM.
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        client.push(&big);
        client.finish();
        let mut got = Vec::new();
        let waker = origin.waker.clone();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..200 {
            exchange(&mut client, &mut origin);
            while let Poll::Ready(Some(Ok(d))) = body.poll_data(&mut cx) {
                got.extend_from_slice(&d);
                let _ = body.flow_control().release_capacity(d.len());
            }
            if got.len() == big.len() {
                break;
            }
        }
        assert_eq!(got, big);
        assert!(client.write_closed());
        down.send_data(Bytes::from_static(b"\x81\x02hi"), true).unwrap();
        exchange(&mut client, &mut origin);
        let mut out = Vec::new();
        assert_eq!(client.read_into(&mut out, 1024), TargetRead::Data(4));
        exchange(&mut client, &mut origin);
        assert_eq!(client.read_into(&mut out, 1024), TargetRead::Eof);
        assert_eq!(out, b"\x81\x02hi");
        assert_eq!(client.totals(), (big.len() as u64, 4));
        assert!(client.broken().is_none());
    }

    #[test]
    fn an_origin_without_extended_connect_is_never_sent_one() {
        let mut client = OriginH2::new("http", "o", "/", &offered(), 1024).unwrap();
        let mut origin = Origin::new(false);
        exchange(&mut client, &mut origin);
        assert_eq!(client.take_answer(), Some(Answer::NoExtendedConnect));
        assert!(origin.requests.is_empty());
    }

    #[test]
    fn an_origin_reset_breaks_the_stream_and_garbage_fails_the_answer() {
        let mut client = OriginH2::new("https", "o", "/", &offered(), 1024).unwrap();
        let mut origin = Origin::new(true);
        exchange(&mut client, &mut origin);
        let (_, mut respond) = origin.requests.pop().unwrap();
        let resp = http::Response::builder().status(200).body(()).unwrap();
        let mut down = respond.send_response(resp, false).unwrap();
        exchange(&mut client, &mut origin);
        assert!(matches!(client.take_answer(), Some(Answer::Response { status: 200, .. })));
        down.send_reset(h2::Reason::CANCEL);
        exchange(&mut client, &mut origin);
        let mut out = Vec::new();
        let _ = client.read_into(&mut out, 10);
        client.drive();
        assert!(client.broken().is_some_and(|b| b.contains("reset the stream")), "{:?}", client.broken());
        assert_eq!(client.room(), 0);

        let mut client = OriginH2::new("https", "o", "/", &offered(), 1024).unwrap();
        client.feed(&mut b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        client.drive();
        match client.take_answer() {
            Some(Answer::Failed(why)) => assert!(why.contains("preface"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}

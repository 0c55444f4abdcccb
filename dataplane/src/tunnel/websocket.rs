//! WebSocket relayed to an upstream origin (RFC 6455, RFC 8441, RFC 9220):
//! the upstream half of the tunnel's life between the TCP connect and the
//! byte relay.
//!
//! Control picked the origin (a `[[upstreams]]` route) and answered
//! `AllowUpstream` with its address, the `Host` and the path to ask for.
//! Once the TCP connection is up ([`super::tcp`]), the relay is an RFC 6455
//! client: it sends an Upgrade request with its own fresh
//! `Sec-WebSocket-Key` and the client's subprotocols, extensions and
//! Origin, and checks the origin's `101` (section 4.1). Only then does the
//! client get its answer: `200` on HTTP/2 and HTTP/3, `101` with its own
//! `Sec-WebSocket-Accept` on HTTP/1.1, carrying the subprotocol and
//! extensions the origin chose. From there the stream and the connection
//! carry WebSocket frames unchanged, exactly as a classic CONNECT carries
//! its bytes ([`super::tcp::pump`]): backpressure, half-close and resets
//! are the same (RFC 8441 section 5: END_STREAM is the TCP FIN, a stream
//! reset the TCP RST).
//!
//! A `wss://` origin's connection runs TLS first
//! ([`crate::origin_tls`]): the handshake starts as soon as the TCP
//! connection is up, and the Upgrade request, the origin's answer and the
//! relayed frames all go through it. The handshake and the Upgrade share
//! [`UPGRADE_TIMEOUT`]. A certificate that does not verify answers 502
//! `tls_certificate_error`, an alert from the origin 502
//! `tls_alert_received`, any other TLS failure 502 `tls_protocol_error`
//! (RFC 9209 sections 2.3.13 to 2.3.15).
//!
//! A route with `origin_http = "h2"` or `"auto"` may reach its origin
//! over HTTP/2 instead (RFC 8441; [`crate::origin_h2`]): `ws://` with
//! prior knowledge (RFC 9113 section 3.3), `wss://` when ALPN selects
//! `h2`. The relay sends its extended CONNECT only once the origin's
//! SETTINGS enabled it (RFC 8441 section 3); under `auto` an origin that
//! selected h2 without enabling it is reached again on a second connection
//! offering only `http/1.1`, and under `h2` it gets 502. The origin's 2xx
//! (its subprotocol and extensions checked as for a 101) opens the tunnel,
//! whose bytes are then the stream's DATA.
//!
//! Bytes the client sends before its answer (RFC 6455 forbids it on
//! HTTP/1.1; extended CONNECT clients may) wait in the tunnel's bounded
//! early buffer and follow the handshake.

use std::time::Duration;

use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::OriginHttp;
use relay_proto::websocket::{self, ClientHandshake, Upgraded, UpstreamError};
use tracing::debug;

use super::flow::Flow;
use super::head::{Head, Refusal};
use super::tcp::{self, TcpLeg};
use super::{State, TunnelId, Tunnels};
use crate::context::Ctx;
use crate::origin_h2::{Answer, OriginH2};
use crate::origin_tls::{ClientSession, RouteTls, TlsFailure};
use crate::tcp_target::{TargetRead, TargetState};
use crate::timers::TimerTarget;

/// How long the origin may take to answer the Upgrade request (504
/// `http_response_timeout` after).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an Upgrade request could not be made.
const NO_RANDOMNESS: &str = "no randomness for the WebSocket key";

/// A WebSocket tunnel's handshake state.
#[derive(Debug)]
pub struct WsHandshake {
    /// What the client asked for.
    client: ClientHandshake,
    /// The upstream request's `Host` and path, once control allowed it.
    upstream: Option<(String, String)>,
    /// The `Sec-WebSocket-Accept` the origin must answer.
    expected_accept: String,
    /// The origin's response so far.
    response: Vec<u8>,
    /// TLS to the origin (`wss://`).
    tls: Option<RouteTls>,
    /// Which HTTP the route speaks to its origin.
    http: OriginHttp,
    /// This is the second connection of an `auto` route: HTTP/1.1 only.
    fallback: bool,
    /// TLS is running and its ALPN result chooses the HTTP (`h2`, `auto`).
    awaiting_alpn: bool,
}

impl WsHandshake {
    /// The handshake of a request the route classified.
    pub fn new(client: ClientHandshake) -> Self {
        Self {
            client,
            upstream: None,
            expected_accept: String::new(),
            response: Vec::new(),
            tls: None,
            http: OriginHttp::Http1,
            fallback: false,
            awaiting_alpn: false,
        }
    }

    /// Control's choice of `Host` and path for the origin, the route's TLS
    /// settings when its origin is `wss://`, and its HTTP.
    pub fn set_upstream(&mut self, host: String, path: String, tls: Option<RouteTls>, http: OriginHttp) {
        self.upstream = Some((host, path));
        self.tls = tls;
        self.http = http;
    }

    /// The HTTP/1.1 Upgrade request for `host` and `path`, with a fresh
    /// `Sec-WebSocket-Key` whose accept value the answer must carry. `None`
    /// without randomness for the key.
    fn upgrade_request(&mut self, host: &str, path: &str) -> Option<Vec<u8>> {
        let mut nonce = [0u8; 16];
        boring::rand::rand_bytes(&mut nonce).ok()?;
        let key = websocket::key_from_nonce(&nonce);
        self.expected_accept = accept_for(&key);
        let mut request = Vec::with_capacity(512);
        websocket::write_upgrade_request(&mut request, host, path, &key, &self.client);
        Some(request)
    }

    /// The HTTP of this connection to the origin.
    fn http_now(&self) -> OriginHttp {
        if self.fallback { OriginHttp::Http1 } else { self.http }
    }
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 section 4.2.2), SHA-1 by
/// BoringSSL.
fn accept_for(key: &str) -> String {
    websocket::accept_value(&boring::sha::sha1(&websocket::accept_input(key)))
}

/// The TCP connection to the origin is up: send the Upgrade request and
/// wait for the answer.
pub(super) fn connected(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, mut leg: Box<TcpLeg>, flow: Flow) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let Some(ws) = t.ws.as_mut() else { return };
    let Some((host, path)) = ws.upstream.clone() else { return };
    if let Some(route) = &ws.tls {
        let session =
            if ws.fallback { ClientSession::http1_fallback(route) } else { ClientSession::new(route) };
        match session {
            Ok(session) => leg.target.start_tls(session),
            Err(e) => {
                t.state = State::Upgrading { leg, flow, deadline: ctx.now };
                return fail_tls(
                    ts,
                    ctx,
                    id,
                    TlsFailure {
                        error: relay_proto::proxy_status::ProxyError::TlsProtocolError,
                        details: format!("cannot start TLS to the origin: {e}"),
                    },
                );
            }
        }
    }
    let limit = t.limits.stream_out_limit;
    match (ws.http_now(), ws.tls.is_some()) {
        (OriginHttp::Http1, _) => match ws.upgrade_request(&host, &path) {
            Some(request) => leg.target.push(&request),
            None => {
                t.state = State::Upgrading { leg, flow, deadline: ctx.now };
                return fail(ts, ctx, id, UpstreamError::Malformed, NO_RANDOMNESS);
            }
        },
        // ALPN decides once the TLS handshake is done.
        (_, true) => ws.awaiting_alpn = true,
        // h2 with prior knowledge (`auto` needs TLS: control refuses it).
        (_, false) => match OriginH2::new("http", &host, &path, &ws.client, limit) {
            Ok(h2) => leg.h2 = Some(Box::new(h2)),
            Err(e) => {
                t.state = State::Upgrading { leg, flow, deadline: ctx.now };
                return fail(ts, ctx, id, UpstreamError::Malformed, &e);
            }
        },
    }
    let deadline = ctx.now + UPGRADE_TIMEOUT;
    t.state = State::Upgrading { leg, flow, deadline };
    ctx.timers.push(deadline, TimerTarget::Tunnel(id));
    pump(ts, ctx, id);
}

/// Moves the handshake on: writes what is left of the request, reads the
/// origin's answer, and opens or refuses the tunnel once it is complete.
pub(super) fn pump(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let limit = t.limits.stream_out_limit;
    let (State::Upgrading { leg, .. }, Some(ws)) = (&mut t.state, t.ws.as_mut()) else { return };
    if leg.h2.is_some() {
        return pump_h2(ts, ctx, id);
    }
    leg.target.flush();
    let mut eof = false;
    while leg.target.may_read() {
        let room = (websocket::MAX_RESPONSE_HEAD + 1).saturating_sub(ws.response.len());
        if room == 0 {
            break;
        }
        match leg.target.read_into(&mut ws.response, room) {
            TargetRead::Data(_) => {}
            TargetRead::Blocked => break,
            TargetRead::Eof => {
                eof = true;
                break;
            }
        }
    }
    let broken = matches!(leg.target.state(), TargetState::Failed(_));
    if let Some(failure) = leg.target.tls_failure() {
        let failure = failure.clone();
        return fail_tls(ts, ctx, id, failure);
    }
    if ws.awaiting_alpn {
        if !leg.target.tls_open() {
            if eof || broken {
                return fail(
                    ts,
                    ctx,
                    id,
                    UpstreamError::Incomplete,
                    "the origin closed during the TLS handshake",
                );
            }
            return;
        }
        ws.awaiting_alpn = false;
        let (host, path) = ws.upstream.clone().unwrap_or_default();
        if leg.target.alpn() == Some(b"h2") {
            let mut h2 = match OriginH2::new("https", &host, &path, &ws.client, limit) {
                Ok(h2) => h2,
                Err(e) => return fail(ts, ctx, id, UpstreamError::Malformed, &e),
            };
            // The origin's SETTINGS may already be here.
            h2.feed(&mut ws.response);
            if eof {
                h2.feed_eof();
            }
            leg.h2 = Some(Box::new(h2));
            return pump_h2(ts, ctx, id);
        }
        if ws.http == OriginHttp::H2 {
            return fail(ts, ctx, id, UpstreamError::NotHttp2, "");
        }
        // `auto`, and the origin selected http/1.1 (or nothing).
        let Some(request) = ws.upgrade_request(&host, &path) else {
            return fail(ts, ctx, id, UpstreamError::Malformed, NO_RANDOMNESS);
        };
        leg.target.push(&request);
        leg.target.flush();
        if !ws.response.is_empty() {
            // An HTTP/1.1 origin says nothing before the request.
            return fail(ts, ctx, id, UpstreamError::Malformed, "the origin sent bytes before the request");
        }
        return;
    }
    match websocket::parse_upgrade_response(&ws.response, &ws.expected_accept, &ws.client) {
        Ok(Some(upgraded)) => open(ts, ctx, id, upgraded),
        Ok(None) if eof || broken => fail(ts, ctx, id, UpstreamError::Incomplete, ""),
        Ok(None) => {}
        Err(e) => fail(ts, ctx, id, e, ""),
    }
}

/// The HTTP/2 handshake with the origin: both prefaces, the extended
/// CONNECT once the origin's SETTINGS allow it, its answer.
fn pump_h2(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let (State::Upgrading { leg, .. }, Some(ws)) = (&mut t.state, t.ws.as_mut()) else { return };
    leg.shuttle();
    if let Some(failure) = leg.target.tls_failure() {
        let failure = failure.clone();
        return fail_tls(ts, ctx, id, failure);
    }
    let broken = matches!(leg.target.state(), TargetState::Failed(_));
    let Some(h2) = leg.h2.as_mut() else { return };
    match h2.take_answer() {
        Some(Answer::Response { status, fields }) => {
            let fields = fields.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
            match websocket::check_connect_response(status, fields, &ws.client) {
                Ok(upgraded) => open(ts, ctx, id, upgraded),
                Err(e) => fail(ts, ctx, id, e, ""),
            }
        }
        Some(Answer::NoExtendedConnect) if ws.http == OriginHttp::Auto && !ws.fallback => {
            debug!(flow = ?ts.flow_id(id), "the origin's HTTP/2 lacks extended CONNECT: HTTP/1.1 on a new connection");
            fall_back_to_http1(ts, ctx, id);
        }
        Some(Answer::NoExtendedConnect) => fail(ts, ctx, id, UpstreamError::NoExtendedConnect, ""),
        Some(Answer::Failed(why)) => fail(ts, ctx, id, UpstreamError::Http2Failed, &why),
        None if broken => fail(ts, ctx, id, UpstreamError::Incomplete, ""),
        None => {}
    }
}

/// An `auto` route's origin selected h2 without enabling extended
/// CONNECT: this connection closes and a second one offers only
/// `http/1.1` (within the same deadline the first one had).
fn fall_back_to_http1(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Upgrading { leg, flow, .. } = std::mem::replace(&mut t.state, State::Done) else { return };
    let Some(ws) = t.ws.as_mut() else { return };
    ws.fallback = true;
    ws.response.clear();
    leg.release(false, ctx);
    tcp::open(ts, ctx, id, flow);
}

/// The origin did not answer in time (504 `http_response_timeout`; the
/// TLS handshake counts against the same deadline).
pub(super) fn timed_out(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let in_tls_handshake = ts.slab.get(id).is_some_and(|t| match &t.state {
        State::Upgrading { leg, .. } => {
            t.ws.as_ref().is_some_and(|w| w.tls.is_some()) && !leg.target.tls_open()
        }
        _ => false,
    });
    let details = if in_tls_handshake { "the origin did not complete the TLS handshake in time" } else { "" };
    fail(ts, ctx, id, UpstreamError::Timeout, details);
}

/// Both handshakes are done: the client's answer, then the byte relay.
fn open(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, up: Upgraded) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Upgrading { mut leg, flow, .. } = std::mem::replace(&mut t.state, State::Done) else { return };
    let Some(ws) = t.ws.take() else { return };
    // What followed the origin's head is already WebSocket data.
    t.bytes_out.extend_from_slice(&ws.response[up.head_len..]);
    leg.count_from_here(ws.response.len() - up.head_len);
    leg.push(&std::mem::take(&mut t.early));
    if t.client_ended {
        leg.finish();
    }
    let accept = ws.client.key.as_deref().map(accept_for);
    t.head = Some(Head::websocket_open(accept, up.protocol, up.extensions));
    t.state = State::Tcp { leg, flow };
    ctx.count(Counter::WebsocketsOpened, 1);
    ts.opened(ctx, id);
    tcp::pump(ts, ctx, id);
}

/// The upstream handshake failed: the flow goes back unused and the
/// client gets 502/504 with Proxy-Status naming why (RFC 9209).
fn fail(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, e: UpstreamError, details: &str) {
    debug!(flow = ?ts.flow_id(id), "WebSocket upstream handshake failed: {e}");
    ctx.count(Counter::WebsocketUpstreamFailures, 1);
    ts.release(ctx, id);
    let (status, error, received) = e.answer();
    let details = if details.is_empty() { e.to_string() } else { details.to_string() };
    let mut refusal = Refusal::new(status, Some(error), details);
    refusal.received_status = received;
    ts.refuse(ctx, id, &refusal);
}

/// TLS to the origin failed: 502 with the TLS error type (RFC 9209
/// sections 2.3.13 to 2.3.15) and what went wrong.
fn fail_tls(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, failure: TlsFailure) {
    debug!(flow = ?ts.flow_id(id), "WebSocket upstream TLS failed: {}", failure.details);
    ctx.count(Counter::WebsocketUpstreamFailures, 1);
    ts.release(ctx, id);
    ts.refuse(ctx, id, &Refusal::new(502, Some(failure.error), failure.details));
}

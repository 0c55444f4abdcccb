//! The HTTP/1.1 session of a TCP front connection (RFC 9112).
//!
//! One exchange at a time: the request head is parsed
//! ([`relay_proto::http1`]), routed like an HTTP/2 or HTTP/3 request, and
//! answered. Three requests turn the connection into something else:
//! * `CONNECT host:port` (RFC 9110 section 9.3.6): after the 200 the
//!   connection carries the TCP tunnel's bytes both ways; each side's end
//!   is passed on as a half-close, and the connection closes when both
//!   sides are done.
//! * `GET` with `Upgrade: connect-udp` (RFC 9298 section 3.2) or
//!   `connect-ip` (RFC 9484 section 4.2): after the 101 the connection
//!   carries capsules.
//! * `Upgrade: h2c` (RFC 7540 section 3.2; deprecated by RFC 9113, accepted
//!   for old clients): after the 101 the connection speaks HTTP/2 and the
//!   request is answered on stream 1 ([`super::h2`]).
//!
//! Requests with a body are answered and the connection is closed (the
//! relay serves no request bodies; RFC 9112 section 9.6 lets a server
//! close instead of reading one). A refused tunnel request also closes the
//! connection: the client may have sent tunnel bytes optimistically.

use std::time::Instant;

use relay_proto::h2c::{self, PeerSettings};
use relay_proto::http1::{self, Parse, RequestHead, RequestKind, UpgradeProtocol};
use relay_proto::request::Request;
use tracing::debug;

use super::conn::{ConnIo, H2cSwitch};
use super::exchange::{self, Exchange, Head, Route, State};
use super::flows::{self, Place};
use super::{Ctx, Shared};
use relay_channel::region::Counter;

/// What the current request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An ordinary request (status endpoint, refusals).
    Plain,
    /// Classic CONNECT: raw bytes after the 200.
    Connect,
    /// An upgrade to a capsule tunnel: capsules after the 101.
    Upgrade(UpgradeProtocol),
}

struct Current {
    ex: Exchange,
    kind: Kind,
    /// Close the connection after this exchange.
    close_after: bool,
    /// The client's end was passed to the exchange.
    up_ended: bool,
}

/// An HTTP/1.1 connection's session.
pub struct Session {
    current: Option<Current>,
    /// Number of the current request (the exchange's stream number).
    serial: u32,
    draining: bool,
    limits: http1::Limits,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A session waiting for its first request.
    pub fn new() -> Self {
        Self { current: None, serial: 0, draining: false, limits: http1::Limits::default() }
    }

    fn place(&self, io: &ConnIo) -> Place {
        Place { conn: io.key, stream: self.serial, peer: io.peer }
    }

    /// Whether an exchange is in progress.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// The exchange for `stream`, if it is the current one.
    pub fn exchange(&mut self, stream: u32) -> Option<&mut Exchange> {
        if stream != self.serial {
            return None;
        }
        self.current.as_mut().map(|c| &mut c.ex)
    }

    /// The exchange for `stream`, if it is the current one.
    pub fn exchange_ref(&self, stream: u32) -> Option<&Exchange> {
        if stream != self.serial {
            return None;
        }
        self.current.as_ref().map(|c| &c.ex)
    }

    /// Parses, routes and answers requests; moves tunnel bytes. Returns
    /// whether anything happened.
    pub fn run(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        let mut progress = false;
        for _ in 0..8 {
            let moved = match self.current.is_some() {
                false => self.read_request(io, sh, ctx),
                true => self.serve(io, sh, ctx),
            };
            progress |= moved;
            if !moved || io.close.is_some() || io.switch.is_some() {
                break;
            }
        }
        progress
    }

    fn read_request(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        if self.draining && io.plain_in.is_empty() {
            io.close.get_or_insert("drained");
            return true;
        }
        let (head, used) = match http1::parse_request_head(&io.plain_in, &self.limits) {
            Ok(Parse::Partial) => {
                if io.plain_eof {
                    // A client that ends mid-head (or between requests).
                    io.close.get_or_insert("client closed");
                    return true;
                }
                return false;
            }
            Ok(Parse::Complete(head, used)) => (head, used),
            Err(e) => {
                debug!(peer = %io.peer, "bad HTTP/1.1 request: {e}");
                io.plain_in.clear();
                io.first_request_seen = true;
                self.serial += 1;
                let ex = flows::refused(sh, e.status(), None, &e.to_string());
                self.current = Some(Current { ex, kind: Kind::Plain, close_after: true, up_ended: true });
                return true;
            }
        };
        io.plain_in.drain(..used);
        io.first_request_seen = true;
        io.last_activity = ctx.now;
        self.serial += 1;
        ctx.link.counters().add(Counter::Http1Requests, 1);
        let close_after = !head.keep_alive() || self.draining;
        let kind = match http1::classify(&head) {
            Ok(k) => k,
            Err(e) => {
                let ex = flows::refused(sh, e.status(), None, &e.to_string());
                self.current = Some(Current { ex, kind: Kind::Plain, close_after: true, up_ended: true });
                return true;
            }
        };
        let place = self.place(io);
        let (route, authority, kind, has_body) = match kind {
            RequestKind::Connect { host, port } => {
                let authority =
                    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                let req = Request {
                    method: "CONNECT".into(),
                    authority: Some(authority.clone()),
                    authorization: head.authorization().map(str::to_string),
                    ..Request::default()
                };
                (self.route(&req, sh), authority, Kind::Connect, false)
            }
            RequestKind::Tunnel { protocol, path, authority } => {
                let req = http1::to_extended_connect(&head, protocol, &path, &authority);
                (self.route(&req, sh), authority, Kind::Upgrade(protocol), false)
            }
            // RFC 7540 section 3.3: h2c is never negotiated over TLS (ALPN
            // is); on the TLS listener the upgrade is ignored.
            RequestKind::H2cUpgrade { path, authority, .. } if io.secure => {
                let req = plain_request(&head, &path, &authority);
                (self.route(&req, sh), authority, Kind::Plain, !matches!(head.body(), Ok(http1::Body::None)))
            }
            RequestKind::H2cUpgrade { settings, path, authority } => {
                match h2c::decode_http2_settings(&settings) {
                    Ok(peer) => return self.switch_to_h2c(&head, &path, &authority, peer, io, sh, ctx),
                    // RFC 7540 section 3.2.1: without a valid HTTP2-Settings
                    // the server must not upgrade; the request is served
                    // over HTTP/1.1.
                    Err(e) => {
                        debug!("h2c upgrade refused: {e}");
                        let req = plain_request(&head, &path, &authority);
                        (
                            self.route(&req, sh),
                            authority,
                            Kind::Plain,
                            !matches!(head.body(), Ok(http1::Body::None)),
                        )
                    }
                }
            }
            RequestKind::Plain { path, authority } => {
                let req = plain_request(&head, &path, &authority);
                (self.route(&req, sh), authority, Kind::Plain, !matches!(head.body(), Ok(http1::Body::None)))
            }
        };
        let via = flows::Via { protocol: "HTTP/1.1", secure: io.secure };
        let ex = flows::start(route, &authority, place, via, sh, ctx);
        let close_after = close_after || has_body || head.body().is_err();
        self.current = Some(Current { ex, kind, close_after, up_ended: kind == Kind::Plain });
        true
    }

    fn route(&self, req: &Request, sh: &Shared) -> Route {
        let s = &sh.settings;
        exchange::route(req, &s.template, s.ip_template.as_ref(), s.tcp.status_endpoint)
    }

    /// Answers an h2c upgrade: 101, then the connection switches to HTTP/2
    /// with this request's answer on stream 1 (RFC 7540 section 3.2).
    #[allow(clippy::too_many_arguments)]
    fn switch_to_h2c(
        &mut self,
        head: &RequestHead,
        path: &str,
        authority: &str,
        peer: PeerSettings,
        io: &mut ConnIo,
        sh: &mut Shared,
        ctx: &mut Ctx<'_>,
    ) -> bool {
        let req = plain_request(head, path, authority);
        let route = self.route(&req, sh);
        let place = self.place(io);
        let via = flows::Via { protocol: "HTTP/2", secure: io.secure };
        let ex = flows::start(route, authority, place, via, sh, ctx);
        let Some(h) = ex.head.clone() else { return false };
        let mut fields: Vec<(&str, String)> = h.fields.clone();
        if let Some(alt) = &sh.settings.tcp.alt_svc {
            fields.push(("alt-svc", alt.clone()));
        }
        let len = h.head_only_len.unwrap_or(ex.down.len());
        let len_text = len.to_string();
        fields.push(("content-length", len_text));
        let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        // The connection window stream 1's DATA uses, owed by the filter.
        let (stream1, debt) = match h2c::encode_response(1, h.status, &refs, &ex.down, &peer) {
            Ok(b) => (b, ex.down.len() as u32),
            Err(e) => {
                debug!("h2c stream 1 response: {e}");
                let no_body: Vec<(&str, &str)> =
                    refs.iter().filter(|f| f.0 != "content-length").copied().collect();
                match h2c::encode_response(1, 503, &no_body, &[], &peer) {
                    Ok(b) => (b, 0),
                    Err(_) => return false,
                }
            }
        };
        let mut fields = vec![("connection", "Upgrade".to_string()), ("upgrade", "h2c".to_string())];
        if let Some(alt) = &sh.settings.tcp.alt_svc {
            fields.push(("alt-svc", alt.clone()));
        }
        let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http1::write_response_head(&mut io.plain_out, 101, &refs);
        io.switch = Some(H2cSwitch { peer, stream1, debt });
        true
    }

    /// Moves the current exchange along: the head, body or tunnel bytes
    /// towards the client, client bytes towards the target, and its end.
    fn serve(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) -> bool {
        let place = self.place(io);
        let alt_svc = sh.settings.tcp.alt_svc.clone();
        let Some(cur) = self.current.as_mut() else { return false };
        let mut progress = false;
        // Client bytes.
        if cur.kind != Kind::Plain && !io.plain_in.is_empty() {
            match (&cur.ex.state, cur.kind) {
                (State::Answer | State::Done, _) => {
                    // A refused tunnel: what the client sent is discarded,
                    // and the connection closes after the answer.
                    io.plain_in.clear();
                    cur.close_after = true;
                    progress = true;
                }
                (_, Kind::Connect) => {
                    let n = io.plain_in.len().min(cur.ex.up_room());
                    if n > 0 {
                        cur.ex.up_tcp(&io.plain_in[..n], ctx.now);
                        io.plain_in.drain(..n);
                        progress = true;
                    }
                }
                (_, Kind::Upgrade(_)) => {
                    let data = std::mem::take(&mut io.plain_in);
                    if let Err(why) = flows::up_capsules(&mut cur.ex, &data, place, sh, ctx) {
                        cur.ex.abort.get_or_insert(why);
                    }
                    progress = true;
                }
                (_, Kind::Plain) => {}
            }
        } else if cur.kind == Kind::Plain && !io.plain_in.is_empty() && cur.close_after {
            io.plain_in.clear();
        }
        if io.plain_eof && io.plain_in.is_empty() && !cur.up_ended {
            cur.up_ended = true;
            match cur.kind {
                Kind::Connect => cur.ex.up_end(),
                // RFC 9298 section 3: the end of the stream closes the tunnel.
                Kind::Upgrade(_) | Kind::Plain => {
                    if let State::Udp { tunnel, .. } | State::Ip { tunnel, .. } = &cur.ex.state
                        && tunnel.on_stream_end().is_err()
                    {
                        cur.ex.abort.get_or_insert("stream ended inside a capsule");
                    }
                    cur.ex.up_end();
                    cur.ex.down_fin = true;
                }
            }
            progress = true;
        }
        // The target's bytes.
        if matches!(cur.ex.state, State::Tcp { .. }) {
            let (moved, up, down) = cur.ex.pump_tcp(ctx.now);
            if up > 0 {
                ctx.link.counters().add(Counter::TcpBytesUp, up);
            }
            if down > 0 {
                ctx.link.counters().add(Counter::TcpBytesDown, down);
            }
            progress |= moved;
            // Target bytes may have freed room for more client bytes.
            if moved && !io.plain_in.is_empty() {
                let n = io.plain_in.len().min(cur.ex.up_room());
                if n > 0 {
                    cur.ex.up_tcp(&io.plain_in[..n], ctx.now);
                    io.plain_in.drain(..n);
                }
            }
        }
        if cur.ex.over_budget() {
            ctx.link.counters().add(Counter::TunnelsOverBudget, 1);
            cur.ex.down_fin = true;
            cur.close_after = true;
            cur.ex.abort.get_or_insert("byte budget used up");
        }
        // Towards the client.
        if let Some(h) = cur.ex.head.take() {
            let head = render_head(&h, cur.kind, cur.close_after, cur.ex.down.len(), alt_svc.as_deref());
            if io.out_room() < head.len() && !io.plain_out.is_empty() {
                cur.ex.head = Some(h);
                return progress;
            }
            io.plain_out.extend_from_slice(&head);
            if !h.tunnel {
                // After a refused tunnel request the connection closes.
                cur.close_after |= cur.kind != Kind::Plain;
            }
            progress = true;
        }
        if cur.ex.head.is_none() {
            let room = io.out_room();
            let bytes = cur.ex.down_bytes();
            let n = bytes.len().min(room);
            if n > 0 {
                io.plain_out.extend_from_slice(&bytes[..n]);
                cur.ex.consume_down(n);
                progress = true;
            }
        }
        // The end.
        if let Some(why) = cur.ex.abort {
            debug!(peer = %io.peer, "HTTP/1.1 tunnel aborted: {why}");
            io.close.get_or_insert(why);
            self.end_current(io, sh, ctx);
            return true;
        }
        if cur.ex.finished() {
            let tunnel = matches!(cur.ex.state, State::Tcp { .. } | State::Udp { .. } | State::Ip { .. });
            if tunnel {
                // Our side of the tunnel is done: FIN (and close_notify)
                // towards the client; the connection closes when the
                // client is done too.
                if !io.shutdown_write {
                    io.shutdown_write = true;
                    progress = true;
                }
                if cur.up_ended {
                    io.close.get_or_insert("tunnel finished");
                    self.end_current(io, sh, ctx);
                    return true;
                }
            } else {
                let close = cur.close_after;
                self.end_current(io, sh, ctx);
                if close {
                    io.close.get_or_insert("response sent");
                }
                return true;
            }
        }
        progress
    }

    fn end_current(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        if let Some(mut cur) = self.current.take() {
            flows::release(&mut cur.ex, sh, ctx);
        }
        io.last_activity = ctx.now;
    }

    /// Ends the current exchange from the relay's side (idle, killed,
    /// target unreachable): the connection closes.
    pub fn end_exchange(&mut self, stream: u32, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        if stream == self.serial && self.current.is_some() {
            io.close.get_or_insert("tunnel ended by the relay");
            self.end_current(io, sh, ctx);
        }
    }

    /// When the current exchange needs a timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.current.as_ref().and_then(|c| c.ex.deadline())
    }

    /// A timer fired: ask and connect deadlines, idle tunnels.
    pub fn on_timer(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let Some(cur) = self.current.as_mut() else { return };
        let Some(at) = cur.ex.deadline() else { return };
        if at > ctx.now {
            return;
        }
        match &cur.ex.state {
            State::Asking { .. } => {
                ctx.link.counters().add(Counter::AsksFailed, 1);
                flows::release(&mut cur.ex, sh, ctx);
                let head = flows::refused(
                    sh,
                    503,
                    Some(relay_proto::proxy_status::ProxyError::ProxyInternalError),
                    "control plane did not answer in time",
                );
                cur.ex = head;
                cur.close_after = true;
            }
            State::Connecting { .. } => flows::connect_failed(&mut cur.ex, libc::ETIMEDOUT, sh, ctx),
            State::Tcp { .. } | State::Udp { .. } | State::Ip { .. } => {
                self.end_exchange(self.serial, io, sh, ctx)
            }
            State::Answer | State::Done => {}
        }
    }

    /// Drain: no new requests; the current one finishes.
    pub fn drain(&mut self, io: &mut ConnIo) {
        self.draining = true;
        if self.current.is_none() {
            io.close.get_or_insert("drained");
        }
    }

    /// Ends the current exchange if its flow is in `flows`.
    pub fn kill(&mut self, flows_to_kill: &[u64], io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        let hit =
            self.current.as_ref().and_then(|c| c.ex.flow_id()).is_some_and(|f| flows_to_kill.contains(&f));
        if hit {
            if let Some(c) = self.current.as_mut() {
                c.ex.abort = Some("killed by the operator");
            }
            self.end_exchange(self.serial, io, sh, ctx);
        }
    }

    /// The current exchange, if any.
    pub fn exchanges_mut(&mut self) -> impl Iterator<Item = &mut Exchange> {
        self.current.as_mut().map(|c| &mut c.ex).into_iter()
    }

    /// The open flow, for a re-attached control.
    pub fn open_flows(
        &self,
        peer: std::net::SocketAddr,
        out: &mut Vec<relay_proto::channel::record::FlowOpen>,
    ) {
        if let Some(f) = self.current.as_ref().and_then(|c| flows::open_flow(&c.ex, peer)) {
            out.push(f);
        }
    }

    /// Releases everything (the connection closes).
    pub fn close(&mut self, io: &mut ConnIo, sh: &mut Shared, ctx: &mut Ctx<'_>) {
        self.end_current(io, sh, ctx);
    }

    /// Sends this turn's UDP batch.
    pub fn flush_udp(&mut self, stream: u32, ctx: &mut Ctx<'_>) {
        if let Some(ex) = self.exchange(stream) {
            flows::flush_udp(ex, ctx);
        }
    }
}

fn plain_request(head: &RequestHead, path: &str, authority: &str) -> Request {
    Request {
        method: head.method.clone(),
        scheme: Some("https".into()),
        authority: Some(authority.to_string()),
        path: Some(path.to_string()),
        authorization: head.authorization().map(str::to_string),
        ..Request::default()
    }
}

/// The status endpoint's JSON body: plain clients can see which protocol
/// they negotiated.
pub fn status_body(name: &str, protocol: &str, secure: bool, sh: &Shared) -> Vec<u8> {
    let body = serde_json::json!({
        "status": "ok",
        "relay": name,
        "protocol": protocol,
        "transport": if secure { "tls" } else { "cleartext" },
        "alt_svc": sh.settings.tcp.alt_svc,
        "worker": sh.settings.worker,
    });
    let mut out = body.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// The response head in HTTP/1.1 form.
fn render_head(h: &Head, kind: Kind, close: bool, body_len: usize, alt_svc: Option<&str>) -> Vec<u8> {
    let mut fields: Vec<(&str, String)> = h.fields.clone();
    let status = match (h.tunnel, kind) {
        (true, Kind::Upgrade(p)) => {
            // RFC 9298 section 3.3 / RFC 9484 section 4.3: 101 with
            // Connection and Upgrade; Capsule-Protocol is among the fields.
            fields.push(("connection", "Upgrade".into()));
            fields.push(("upgrade", p.token().into()));
            101
        }
        // RFC 9110 section 9.3.6: a 2xx to CONNECT has no content.
        (true, _) => h.status,
        (false, _) => {
            fields.push(("content-length", h.head_only_len.unwrap_or(body_len).to_string()));
            if close {
                fields.push(("connection", "close".into()));
            }
            h.status
        }
    };
    if let Some(alt) = alt_svc {
        fields.push(("alt-svc", alt.to_string()));
    }
    let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut out = Vec::with_capacity(256);
    http1::write_response_head(&mut out, status, &refs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_in_http1_form() {
        let tunnel = Head {
            status: 200,
            fields: vec![("capsule-protocol", "?1".into())],
            tunnel: true,
            head_only_len: None,
        };
        let text = String::from_utf8(render_head(
            &tunnel,
            Kind::Upgrade(UpgradeProtocol::ConnectUdp),
            false,
            0,
            Some("h3=\":4433\""),
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(text.to_ascii_lowercase().contains("upgrade: connect-udp\r\n"), "{text}");
        assert!(text.to_ascii_lowercase().contains("connection: upgrade\r\n"), "{text}");
        assert!(text.contains("alt-svc: h3=\":4433\"\r\n"), "{text}");
        let connect = Head { status: 200, fields: Vec::new(), tunnel: true, head_only_len: None };
        let text = String::from_utf8(render_head(&connect, Kind::Connect, false, 0, None)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 "));
        assert!(!text.to_ascii_lowercase().contains("content-length"), "{text}");
        let refusal = Head { status: 403, fields: Vec::new(), tunnel: false, head_only_len: None };
        let text = String::from_utf8(render_head(&refusal, Kind::Connect, true, 0, None)).unwrap();
        assert!(text.contains("content-length: 0\r\n") && text.contains("connection: close\r\n"), "{text}");
        let head = Head { status: 200, fields: Vec::new(), tunnel: false, head_only_len: Some(42) };
        let text = String::from_utf8(render_head(&head, Kind::Plain, false, 0, None)).unwrap();
        assert!(text.contains("content-length: 42\r\n"), "{text}");
    }
}

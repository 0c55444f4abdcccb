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

use relay_proto::h2c::{self, PeerSettings};
use relay_proto::http1::{self, Parse, RequestHead, RequestKind, UpgradeProtocol};
use relay_proto::request::Request;
use tracing::debug;

use super::Fx;
use super::conn::{ConnIo, H2cSwitch};
use super::exchange::{self, Exchange, Via};
use crate::tunnel::head::{Head, Refusal};
use crate::tunnel::{End, NoDatagrams, TunnelId};
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
    /// The client's end was passed on.
    up_ended: bool,
    /// The head went out as a tunnel's 2xx / 101.
    tunnel_open: bool,
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

    /// Whether an exchange is in progress.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// The current exchange's tunnel, if any.
    pub fn tunnels(&self) -> impl Iterator<Item = TunnelId> + '_ {
        self.current.as_ref().and_then(|c| c.ex.tunnel()).into_iter()
    }

    /// Parses, routes and answers requests; moves tunnel bytes. Returns
    /// whether anything happened.
    pub fn run(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) -> bool {
        let mut progress = false;
        for _ in 0..8 {
            let moved = match self.current.is_some() {
                false => self.read_request(io, fx),
                true => self.serve(io, fx),
            };
            progress |= moved;
            if !moved || io.close.is_some() || io.switch.is_some() {
                break;
            }
        }
        progress
    }

    fn answer_now(&mut self, status: u16, details: String, fx: &Fx<'_>) {
        let head =
            Head::refusal(&Refusal::new(status, None, details), &fx.ctx.settings.names, "GET, HEAD, CONNECT");
        self.current = Some(Current {
            ex: Exchange::refusal(head),
            kind: Kind::Plain,
            close_after: true,
            up_ended: true,
            tunnel_open: false,
        });
    }

    fn read_request(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) -> bool {
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
                debug!(conn = io.serial, "bad HTTP/1.1 request: {e}");
                io.plain_in.clear();
                io.first_request_seen = true;
                self.serial += 1;
                self.answer_now(e.status(), e.to_string(), fx);
                return true;
            }
        };
        io.plain_in.drain(..used);
        io.first_request_seen = true;
        io.last_activity = fx.ctx.now;
        self.serial += 1;
        fx.ctx.count(Counter::Http1Requests, 1);
        let close_after = !head.keep_alive() || self.draining;
        let kind = match http1::classify(&head) {
            Ok(k) => k,
            Err(e) => {
                self.answer_now(e.status(), e.to_string(), fx);
                return true;
            }
        };
        let has_body = !matches!(head.body(), Ok(http1::Body::None));
        let (req, kind, has_body) = match kind {
            RequestKind::Connect { host, port } => {
                let authority =
                    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                let req = Request {
                    method: "CONNECT".into(),
                    authority: Some(authority),
                    authorization: head.authorization().map(str::to_string),
                    ..Request::default()
                };
                (req, Kind::Connect, false)
            }
            RequestKind::Tunnel { protocol, path, authority } => (
                http1::to_extended_connect(&head, protocol, &path, &authority),
                Kind::Upgrade(protocol),
                false,
            ),
            // RFC 7540 section 3.3: h2c is never negotiated over TLS (ALPN
            // is); on the TLS listener the upgrade is ignored.
            RequestKind::H2cUpgrade { path, authority, .. } if io.secure => {
                (plain_request(&head, &path, &authority), Kind::Plain, has_body)
            }
            RequestKind::H2cUpgrade { settings, path, authority } => {
                match h2c::decode_http2_settings(&settings) {
                    Ok(peer) => return self.switch_to_h2c(&head, &path, &authority, peer, io, fx),
                    // RFC 7540 section 3.2.1: without a valid HTTP2-Settings
                    // the server must not upgrade; the request is served
                    // over HTTP/1.1.
                    Err(e) => {
                        debug!("h2c upgrade refused: {e}");
                        (plain_request(&head, &path, &authority), Kind::Plain, has_body)
                    }
                }
            }
            RequestKind::Plain { path, authority } => {
                (plain_request(&head, &path, &authority), Kind::Plain, has_body)
            }
        };
        let via = Via { protocol: "HTTP/1.1", secure: io.secure };
        let ex = exchange::start(&req, u64::from(self.serial), false, via, io, fx);
        let close_after = close_after || has_body || head.body().is_err();
        self.current =
            Some(Current { ex, kind, close_after, up_ended: kind == Kind::Plain, tunnel_open: false });
        true
    }

    /// Answers an h2c upgrade: 101, then the connection switches to HTTP/2
    /// with this request's answer on stream 1 (RFC 7540 section 3.2).
    fn switch_to_h2c(
        &mut self,
        head: &RequestHead,
        path: &str,
        authority: &str,
        peer: PeerSettings,
        io: &mut ConnIo,
        fx: &mut Fx<'_>,
    ) -> bool {
        let req = plain_request(head, path, authority);
        let via = Via { protocol: "HTTP/2", secure: io.secure };
        let (h, body) = match exchange::start(&req, 1, true, via, io, fx) {
            Exchange::Answer { head: Some(h), body } => (h, body),
            Exchange::Answer { head: None, .. } => return false,
            // A plain request never opens a tunnel; if it did, it is ended.
            Exchange::Tunnel(id) => {
                fx.tunnels.remove(fx.ctx, id);
                return false;
            }
        };
        let mut fields: Vec<(&str, String)> = h.fields.clone();
        if let Some(alt) = &fx.sh.settings.tcp.alt_svc {
            fields.push(("alt-svc", alt.clone()));
        }
        let len = h.head_only_len.unwrap_or(body.len());
        fields.push(("content-length", len.to_string()));
        let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        // The connection window stream 1's DATA uses, owed by the filter.
        let (stream1, debt) = match h2c::encode_response(1, h.status, &refs, &body, &peer) {
            Ok(b) => (b, body.len() as u32),
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
        if let Some(alt) = &fx.sh.settings.tcp.alt_svc {
            fields.push(("alt-svc", alt.clone()));
        }
        let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http1::write_response_head(&mut io.plain_out, 101, &refs);
        io.switch = Some(H2cSwitch { peer, stream1, debt });
        true
    }

    /// Moves the current exchange along: client bytes towards the tunnel,
    /// the head, body or tunnel bytes towards the client, and its end.
    fn serve(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) -> bool {
        let alt_svc = fx.sh.settings.tcp.alt_svc.clone();
        let Some(cur) = self.current.as_mut() else { return false };
        let mut progress = false;
        // Client bytes.
        match (cur.ex.tunnel(), cur.kind) {
            (_, Kind::Plain) => {
                if !io.plain_in.is_empty() && cur.close_after {
                    io.plain_in.clear();
                }
            }
            (None, _) => {
                // A refused tunnel: what the client sent is discarded, and
                // the connection closes after the answer.
                if !io.plain_in.is_empty() {
                    io.plain_in.clear();
                    progress = true;
                }
                cur.close_after = true;
            }
            (Some(t), _) => {
                let n = io.plain_in.len().min(fx.tunnels.up_room(t));
                if n > 0 {
                    let taken = fx.tunnels.on_stream_bytes(fx.ctx, t, &io.plain_in[..n], &mut NoDatagrams);
                    io.plain_in.drain(..taken.min(n));
                    progress = true;
                }
            }
        }
        if io.plain_eof && io.plain_in.is_empty() && !cur.up_ended {
            cur.up_ended = true;
            if let Some(t) = cur.ex.tunnel() {
                fx.tunnels.on_client_end(fx.ctx, t);
            }
            progress = true;
        }
        // The head.
        let head = match &mut cur.ex {
            Exchange::Answer { head, .. } => head.take(),
            Exchange::Tunnel(t) => fx.tunnels.take_head(*t),
        };
        if let Some(h) = head {
            let body_len = match &cur.ex {
                Exchange::Answer { body, .. } => body.len(),
                Exchange::Tunnel(_) => 0,
            };
            if !h.tunnel && cur.kind != Kind::Plain {
                // A refused tunnel request closes the connection: the client
                // may have sent tunnel bytes optimistically.
                cur.close_after = true;
            }
            let rendered = render_head(&h, cur.kind, cur.close_after, body_len, alt_svc.as_deref());
            if io.out_room() < rendered.len() && !io.plain_out.is_empty() {
                match &mut cur.ex {
                    Exchange::Answer { head, .. } => *head = Some(h),
                    Exchange::Tunnel(t) => fx.tunnels.restore_head(*t, h),
                }
                return progress;
            }
            io.plain_out.extend_from_slice(&rendered);
            cur.tunnel_open |= h.tunnel;
            if let (false, Some(t)) = (h.tunnel, cur.ex.tunnel()) {
                // The refusal is complete as it stands.
                fx.tunnels.fin_sent(t);
            }
            progress = true;
        }
        // Bytes towards the client.
        let room = io.out_room();
        match &mut cur.ex {
            Exchange::Answer { head: None, body } if !body.is_empty() => {
                let n = body.len().min(room);
                io.plain_out.extend_from_slice(&body[..n]);
                body.drain(..n);
                progress |= n > 0;
            }
            Exchange::Tunnel(t) => {
                let out = fx.tunnels.out(*t);
                let n = out.len().min(room);
                if n > 0 {
                    io.plain_out.extend_from_slice(&out[..n]);
                    fx.tunnels.consume(fx.ctx, *t, n);
                    progress = true;
                }
            }
            _ => {}
        }
        // The end.
        match cur.ex.tunnel() {
            None => {
                let done = matches!(&cur.ex, Exchange::Answer { head: None, body } if body.is_empty());
                if done {
                    let close = cur.close_after;
                    self.end_current(io, fx);
                    if close {
                        io.close.get_or_insert("response sent");
                    }
                    return true;
                }
            }
            Some(t) => match fx.tunnels.end(t) {
                End::Open => {}
                End::Abort(a) => {
                    debug!(conn = io.serial, ?a, "HTTP/1.1 tunnel aborted");
                    io.close.get_or_insert("tunnel aborted");
                    self.end_current(io, fx);
                    return true;
                }
                End::Finish { stop_reading } => {
                    if fx.tunnels.wants_fin(t) {
                        fx.tunnels.fin_sent(t);
                        if cur.tunnel_open && !io.shutdown_write {
                            // Our side of the tunnel is done: FIN (and
                            // close_notify) towards the client; the
                            // connection closes when the client is done too.
                            io.shutdown_write = true;
                        }
                        progress = true;
                    }
                    if fx.tunnels.complete(t) {
                        let why = if stop_reading { "tunnel ended by the relay" } else { "tunnel finished" };
                        io.close.get_or_insert(why);
                        self.end_current(io, fx);
                        return true;
                    }
                }
            },
        }
        progress
    }

    fn end_current(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) {
        if let Some(cur) = self.current.take()
            && let Some(t) = cur.ex.tunnel()
        {
            fx.tunnels.remove(fx.ctx, t);
        }
        io.last_activity = fx.ctx.now;
    }

    /// Drain: no new requests; the current one finishes.
    pub fn drain(&mut self, io: &mut ConnIo) {
        self.draining = true;
        if self.current.is_none() {
            io.close.get_or_insert("drained");
        }
    }

    /// Releases everything (the connection closes).
    pub fn close(&mut self, io: &mut ConnIo, fx: &mut Fx<'_>) {
        self.end_current(io, fx);
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

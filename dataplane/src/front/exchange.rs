//! One request on the TCP front, whatever HTTP version carries it: what
//! the relay answers and, for a tunnel, the bytes it moves.
//!
//! An HTTP/1.1 connection has at most one exchange at a time (the
//! connection itself becomes the tunnel after the 2xx / 101); an HTTP/2
//! connection has one per stream. The session ([`super::h1`] or
//! [`super::h2`]) parses the request into a [`Request`], calls [`route`],
//! and then moves bytes: client bytes in through [`Exchange::up`], bytes
//! for the client out of [`Exchange::down`]. The exchange never touches the
//! client's connection, and touches a target only through its own socket.
//!
//! Tunnels:
//! * TCP (classic CONNECT): bytes both ways through a [`TcpTarget`],
//!   bounded by `tunnel_buffer_bytes` each way; the 2xx is sent once the
//!   target connection is up, a failed connect is 502/504 with
//!   Proxy-Status (RFC 9209), and each side's end is passed on as a
//!   half-close.
//! * UDP (connect-udp over HTTP/2 or HTTP/1.1): DATAGRAM capsules on the
//!   stream (RFC 9297 section 3.5, RFC 9298 section 5) to and from a
//!   connected UDP socket served by the backend's GSO machinery, through the
//!   same [`Tunnel`] state machine as HTTP/3 tunnels use.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_proto::proxy_status::ProxyError;
use relay_proto::request::{self, Refusal, Request};
use relay_proto::target::TargetHost;
use relay_proto::template::{IpUriTemplate, UriTemplate};

use crate::tcp_target::{TargetRead, TargetState, TcpTarget};
use crate::tunnel::Tunnel;

/// Paths of the status endpoint.
pub const STATUS_PATHS: [&str; 2] = ["/", "/.well-known/masque-relay/status"];

/// What a request is, once classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// GET or HEAD of the status endpoint.
    Status {
        /// HEAD: headers only.
        head_only: bool,
    },
    /// Classic CONNECT to a TCP target.
    Tcp {
        /// Target host (IP literal or name).
        host: String,
        /// Target port.
        port: u16,
        /// Credentials.
        authorization: Option<String>,
    },
    /// connect-udp.
    Udp {
        /// Target host (IP literal or name).
        host: String,
        /// Target port.
        port: u16,
        /// Credentials.
        authorization: Option<String>,
        /// `:path`, for the ask.
        path: String,
    },
    /// connect-ip (its target and IP protocol as the ask carries them).
    Ip {
        /// Target (`*`, a prefix, an address or a name).
        target: String,
        /// IP protocol (256: any).
        ipproto: u16,
        /// Credentials.
        authorization: Option<String>,
        /// `:path`.
        path: String,
    },
    /// An answer without a tunnel.
    Refuse(Refusal),
}

fn host_text(h: &TargetHost) -> String {
    match h {
        TargetHost::Ip(ip) => ip.to_string(),
        TargetHost::Name(n) => n.clone(),
    }
}

/// Classifies a well-formed request: the same rules and statuses as the
/// HTTP/3 side (RFC 9298, RFC 9484, RFC 9110 section 9.3.6), plus the
/// status endpoint for plain GET/HEAD.
pub fn route(
    req: &Request,
    template: &UriTemplate,
    ip_template: Option<&IpUriTemplate>,
    status_endpoint: bool,
) -> Route {
    match (req.method.as_str(), req.protocol.as_deref()) {
        ("CONNECT", None) => match request::classify_connect_tcp(req) {
            Ok(c) => Route::Tcp {
                host: host_text(&c.target_host),
                port: c.target_port,
                authorization: c.authorization,
            },
            Err(r) => Route::Refuse(r),
        },
        ("CONNECT", Some("connect-udp")) => match request::classify_connect_udp(req, template) {
            Ok(c) => Route::Udp {
                host: host_text(&c.target_host),
                port: c.target_port,
                authorization: c.authorization,
                path: c.path,
            },
            Err(r) => Route::Refuse(r),
        },
        ("CONNECT", Some("connect-ip")) => match ip_template {
            None => Route::Refuse(Refusal {
                status: 501,
                proxy_error: None,
                reason: "connect-ip is not enabled on this relay",
            }),
            Some(t) => match request::classify_connect_ip(req, t) {
                Ok(c) => Route::Ip {
                    target: c.ask_target(),
                    ipproto: c.ask_ipproto(),
                    authorization: c.authorization,
                    path: c.path,
                },
                Err(r) => Route::Refuse(r),
            },
        },
        ("CONNECT", Some(_)) => {
            Route::Refuse(Refusal { status: 501, proxy_error: None, reason: "unsupported :protocol" })
        }
        (method @ ("GET" | "HEAD"), _) if status_endpoint => {
            let path = req.path.as_deref().unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            if STATUS_PATHS.contains(&path) {
                Route::Status { head_only: method == "HEAD" }
            } else {
                Route::Refuse(Refusal { status: 404, proxy_error: None, reason: "not found" })
            }
        }
        _ => Route::Refuse(Refusal { status: 405, proxy_error: None, reason: "method not allowed" }),
    }
}

/// A response head for the session to send (it adds what its version
/// needs: Alt-Svc, lengths, the 101 form of HTTP/1.1 upgrades).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Fields (lowercase names).
    pub fields: Vec<(&'static str, String)>,
    /// A 2xx that turns the stream into a tunnel (no body length; the
    /// stream stays open).
    pub tunnel: bool,
    /// The body's length when it is not sent (HEAD).
    pub head_only_len: Option<usize>,
}

/// Which tunnel an exchange is asking control for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// Classic CONNECT.
    Tcp,
    /// connect-udp.
    Udp,
    /// connect-ip.
    Ip,
}

/// Control allowed a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Control's flow ID.
    pub flow_id: u64,
    /// Who opened it (quota key).
    pub identity: String,
    /// Payload bytes the flow may carry both ways (0: unlimited).
    pub byte_budget: u64,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// The target address (connect-udp, TCP).
    pub target: SocketAddr,
}

/// Where an exchange is.
#[derive(Debug)]
pub enum State {
    /// A response without a tunnel is being sent.
    Answer,
    /// Waiting for control.
    Asking {
        /// The ask.
        ask_id: u64,
        /// What was asked.
        kind: TunnelKind,
        /// Give up (503) at this time.
        deadline: Instant,
        /// The connect-udp/ip tunnel, collecting early capsules.
        tunnel: Option<Tunnel>,
    },
    /// Connecting to a TCP target.
    Connecting {
        /// The connection.
        target: TcpTarget,
        /// Its watch.
        watch: crate::io::WatchKey,
        /// The flow.
        flow: Flow,
        /// Give up (504) at this time.
        deadline: Instant,
    },
    /// A TCP tunnel.
    Tcp {
        /// The connection.
        target: TcpTarget,
        /// Its watch.
        watch: crate::io::WatchKey,
        /// The flow.
        flow: Flow,
        /// Last time bytes moved.
        last_activity: Instant,
    },
    /// A connect-udp tunnel.
    Udp {
        /// The capsule tunnel state.
        tunnel: Tunnel,
        /// The target socket (the backend's).
        key: crate::io::TargetKey,
        /// The flow.
        flow: Flow,
        /// Payloads for the target collected this turn.
        batch: Option<crate::upbatch::UpBatch>,
    },
    /// A connect-ip tunnel.
    Ip {
        /// The capsule tunnel state.
        tunnel: Tunnel,
        /// Its addresses and routes.
        ip: crate::worker::IpTunnel,
        /// The flow.
        flow: Flow,
    },
    /// Over: the session finishes the stream.
    Done,
}

/// One request and, once allowed, its tunnel.
#[derive(Debug)]
pub struct Exchange {
    /// Where it is.
    pub state: State,
    /// A response head waiting to be sent.
    pub head: Option<Head>,
    /// Bytes for the client: a response body, or TCP tunnel bytes.
    pub down: Vec<u8>,
    /// After `down` (and the capsule output) drains, end the stream.
    pub down_fin: bool,
    /// The stream must be aborted (RST_STREAM / connection close); set
    /// with the reason for logs.
    pub abort: Option<&'static str>,
    /// The client ended its side.
    pub up_fin: bool,
    /// Client bytes held while control decides or the target connects
    /// (TCP), at most `limit`.
    early: Vec<u8>,
    limit: usize,
    /// A TCP tunnel's target totals already counted.
    tcp_counted: (u64, u64),
}

impl Exchange {
    /// An exchange that only answers.
    pub fn answer(head: Head, body: Vec<u8>) -> Self {
        Self {
            state: State::Answer,
            head: Some(head),
            down: body,
            down_fin: true,
            abort: None,
            up_fin: false,
            early: Vec::new(),
            limit: 0,
            tcp_counted: (0, 0),
        }
    }

    /// An exchange waiting for control's answer to `ask_id`.
    pub fn asking(
        ask_id: u64,
        kind: TunnelKind,
        deadline: Instant,
        tunnel: Option<Tunnel>,
        limit: usize,
    ) -> Self {
        Self {
            state: State::Asking { ask_id, kind, deadline, tunnel },
            head: None,
            down: Vec::new(),
            down_fin: false,
            abort: None,
            up_fin: false,
            early: Vec::new(),
            limit,
            tcp_counted: (0, 0),
        }
    }

    /// Replaces the state with a refusal.
    pub fn refuse(&mut self, head: Head) {
        self.state = State::Answer;
        self.head = Some(head);
        self.down.clear();
        self.down_fin = true;
        self.early.clear();
    }

    /// How many client bytes the exchange takes now (the session holds the
    /// rest: HTTP/2 flow control, or the socket's receive buffer).
    pub fn up_room(&self) -> usize {
        match &self.state {
            State::Asking { kind: TunnelKind::Tcp, .. } | State::Connecting { .. } => {
                self.limit.saturating_sub(self.early.len())
            }
            State::Tcp { target, .. } => target.room(),
            // Capsules are decoded as they come: datagrams beyond the
            // bounded queues are dropped (counted), never held.
            State::Asking { .. } | State::Udp { .. } | State::Ip { .. } => usize::MAX,
            // Bytes after the end of a refused request are discarded.
            State::Answer | State::Done => usize::MAX,
        }
    }

    /// Holds early TCP bytes (the caller respects [`Self::up_room`]).
    pub fn hold_early(&mut self, data: &[u8]) {
        self.early.extend_from_slice(data);
    }

    /// Takes the held early bytes.
    pub fn take_early(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.early)
    }

    /// Bytes for the client, in order: a TCP tunnel's or a response body
    /// first, a capsule tunnel's capsules.
    pub fn down_bytes(&self) -> &[u8] {
        match &self.state {
            State::Udp { tunnel, .. } | State::Ip { tunnel, .. } if self.down.is_empty() => {
                tunnel.stream_out()
            }
            _ => &self.down,
        }
    }

    /// Marks `n` bytes of [`Self::down_bytes`] sent.
    pub fn consume_down(&mut self, n: usize) {
        if !self.down.is_empty() {
            self.down.drain(..n.min(self.down.len()));
        } else if let State::Udp { tunnel, .. } | State::Ip { tunnel, .. } = &mut self.state {
            tunnel.consume_stream_out(n);
        }
    }

    /// Whether the stream should end now (everything sent).
    pub fn finished(&self) -> bool {
        self.down_fin && self.head.is_none() && self.down_bytes().is_empty()
    }

    /// Moves bytes between a TCP tunnel's target and the exchange's
    /// buffers: client bytes to the target, target bytes into `down`
    /// (within `limit`). Returns whether anything moved, and the bytes
    /// written to and read from the target.
    pub fn pump_tcp(&mut self, now: Instant) -> (bool, u64, u64) {
        let room = self.limit.saturating_sub(self.down.len());
        let State::Tcp { target, last_activity, .. } = &mut self.state else { return (false, 0, 0) };
        let before = self.tcp_counted;
        target.flush();
        let mut moved = false;
        let mut room = room;
        while room > 0 && target.may_read() {
            match target.read_into(&mut self.down, room.min(64 * 1024)) {
                TargetRead::Data(n) => {
                    room -= n;
                    moved = true;
                }
                TargetRead::Blocked | TargetRead::Eof => break,
            }
        }
        if target.eof() && !self.down_fin {
            // The target ended its side: end the client's stream after
            // the bytes (half-close).
            self.down_fin = true;
            moved = true;
        }
        if let TargetState::Failed(_) = target.state() {
            self.abort.get_or_insert("the target connection failed");
        }
        // Counted from what the previous call saw, so bytes written to the
        // target by `up_tcp` in between count too.
        let after = target.totals();
        self.tcp_counted = after;
        if after != before {
            *last_activity = now;
            moved = true;
        }
        (moved, after.0 - before.0, after.1 - before.1)
    }

    /// Whether a TCP tunnel has carried its byte budget.
    pub fn over_budget(&self) -> bool {
        match &self.state {
            State::Tcp { target, flow, .. } => {
                let (up, down) = target.totals();
                flow.byte_budget != 0 && up + down >= flow.byte_budget
            }
            State::Udp { tunnel, .. } | State::Ip { tunnel, .. } => tunnel.over_budget(),
            _ => false,
        }
    }

    /// Client bytes for a TCP tunnel (the caller respects [`Self::up_room`]).
    pub fn up_tcp(&mut self, data: &[u8], now: Instant) {
        match &mut self.state {
            State::Tcp { target, last_activity, .. } => {
                target.push(data);
                target.flush();
                *last_activity = now;
            }
            State::Asking { kind: TunnelKind::Tcp, .. } | State::Connecting { .. } => {
                self.early.extend_from_slice(data)
            }
            _ => {}
        }
    }

    /// The client finished its side.
    pub fn up_end(&mut self) {
        self.up_fin = true;
        if let State::Tcp { target, .. } = &mut self.state {
            target.finish();
            target.flush();
        }
    }

    /// The flow, when a tunnel is open.
    pub fn flow_id(&self) -> Option<u64> {
        match &self.state {
            State::Connecting { flow, .. } | State::Tcp { flow, .. } => Some(flow.flow_id),
            State::Udp { tunnel, .. } | State::Ip { tunnel, .. } => tunnel.flow_id(),
            _ => None,
        }
    }

    /// The TCP target's socket, when there is one.
    pub fn target_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.state {
            State::Connecting { target, .. } | State::Tcp { target, .. } => Some(target.fd()),
            _ => None,
        }
    }

    /// When the exchange next needs attention from a timer.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Asking { deadline, .. } | State::Connecting { deadline, .. } => Some(*deadline),
            State::Tcp { flow, last_activity, .. } => Some(*last_activity + flow.idle_timeout),
            State::Udp { tunnel, .. } | State::Ip { tunnel, .. } => Some(tunnel.deadline()),
            State::Answer | State::Done => None,
        }
    }
}

/// The refusal head for `status`: Proxy-Status when there is an error
/// type, a Bearer challenge on 407 (RFC 9110 section 11.7.1), Allow on 405,
/// Retry-After on a quota's 429.
pub fn refusal_head(
    status: u16,
    proxy_error: Option<ProxyError>,
    details: &str,
    proxy_name: &str,
    realm: &str,
    retry_after: Option<u32>,
) -> Head {
    let mut fields = Vec::new();
    for h in crate::response::refusal(status, proxy_error, details, proxy_name, realm) {
        use quiche::h3::NameValue;
        let name = match h.name() {
            b"proxy-status" => "proxy-status",
            b"proxy-authenticate" => "proxy-authenticate",
            b"allow" => "allow",
            _ => continue, // :status
        };
        fields.push((name, String::from_utf8_lossy(h.value()).into_owned()));
    }
    if status == 405 {
        // The TCP front also serves GET/HEAD of its status endpoint.
        for f in fields.iter_mut().filter(|f| f.0 == "allow") {
            f.1 = "GET, HEAD, CONNECT".into();
        }
    }
    if let Some(secs) = retry_after {
        fields.push(("retry-after", secs.to_string()));
    }
    Head { status, fields, tunnel: false, head_only_len: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, protocol: Option<&str>, authority: &str, path: Option<&str>) -> Request {
        Request {
            method: method.into(),
            scheme: path.map(|_| "https".into()),
            authority: Some(authority.into()),
            path: path.map(str::to_string),
            protocol: protocol.map(str::to_string),
            authorization: Some("Bearer x".into()),
            ..Request::default()
        }
    }

    fn template() -> UriTemplate {
        UriTemplate::parse("/.well-known/masque/udp/{target_host}/{target_port}/").unwrap()
    }

    #[test]
    fn routes() {
        let t = template();
        assert_eq!(
            route(&req("CONNECT", None, "example.com:443", None), &t, None, true),
            Route::Tcp { host: "example.com".into(), port: 443, authorization: Some("Bearer x".into()) }
        );
        let udp = route(
            &req("CONNECT", Some("connect-udp"), "relay", Some("/.well-known/masque/udp/192.0.2.1/53/")),
            &t,
            None,
            true,
        );
        assert!(matches!(udp, Route::Udp { ref host, port: 53, .. } if host == "192.0.2.1"), "{udp:?}");
        let ip = route(&req("CONNECT", Some("connect-ip"), "relay", Some("/x")), &t, None, true);
        assert!(matches!(ip, Route::Refuse(Refusal { status: 501, .. })));
        let other = route(&req("CONNECT", Some("websocket"), "relay", Some("/x")), &t, None, true);
        assert!(matches!(other, Route::Refuse(Refusal { status: 501, .. })));
        assert_eq!(
            route(&req("GET", None, "relay", Some("/")), &t, None, true),
            Route::Status { head_only: false }
        );
        assert_eq!(
            route(&req("HEAD", None, "relay", Some("/.well-known/masque-relay/status?x=1")), &t, None, true),
            Route::Status { head_only: true }
        );
        assert!(matches!(
            route(&req("GET", None, "relay", Some("/")), &t, None, false),
            Route::Refuse(Refusal { status: 405, .. })
        ));
        assert!(matches!(
            route(&req("GET", None, "relay", Some("/nope")), &t, None, true),
            Route::Refuse(Refusal { status: 404, .. })
        ));
        assert!(matches!(
            route(&req("POST", None, "relay", Some("/")), &t, None, true),
            Route::Refuse(Refusal { status: 405, .. })
        ));
        assert!(matches!(
            route(&req("CONNECT", None, "example.com", None), &t, None, true),
            Route::Refuse(Refusal { status: 400, .. })
        ));
    }

    #[test]
    fn refusal_heads() {
        let h = refusal_head(405, None, "", "relay", "realm", None);
        assert_eq!(h.fields, vec![("allow", "GET, HEAD, CONNECT".to_string())]);
        let h = refusal_head(429, Some(ProxyError::HttpRequestDenied), "quota", "relay", "realm", Some(3));
        assert!(h.fields.contains(&("retry-after", "3".to_string())));
        assert!(h.fields.iter().any(|f| f.0 == "proxy-status" && f.1.contains("http_request_denied")));
        let h = refusal_head(407, Some(ProxyError::HttpRequestDenied), "", "relay", "realm", None);
        assert!(h.fields.iter().any(|f| f.0 == "proxy-authenticate"));
    }

    #[test]
    fn answers_finish_after_their_body() {
        let mut e = Exchange::answer(
            Head { status: 200, fields: Vec::new(), tunnel: false, head_only_len: None },
            b"ok".to_vec(),
        );
        assert!(!e.finished());
        e.head = None;
        assert_eq!(e.down_bytes(), b"ok");
        e.consume_down(2);
        assert!(e.finished());
    }
}

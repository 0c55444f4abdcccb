//! What a request asks for, whatever HTTP version carried it (sans-IO):
//! one classification for HTTP/3, HTTP/2 and HTTP/1.1, so every request
//! gets the same answer on every version (RFC 9298, RFC 9484,
//! draft-ietf-masque-connect-udp-listen, RFC 9110 section 9.3.6, and
//! WebSocket: RFC 6455 section 4.2.1, RFC 8441, RFC 9220).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use relay_proto::channel::record::TunnelProtocol;
use relay_proto::request::{self, Request};
use relay_proto::target::TargetHost;
use relay_proto::websocket::{self, ClientHandshake};

use super::head::Refusal;
pub use crate::context::Served;

/// The tunnel kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// connect-udp (RFC 9298).
    Udp,
    /// connect-ip (RFC 9484).
    Ip,
    /// Bound connect-udp (draft-ietf-masque-connect-udp-listen).
    Bound,
    /// Classic CONNECT to a TCP target (RFC 9110 section 9.3.6).
    Tcp,
    /// WebSocket relayed to an upstream origin (RFC 6455, RFC 8441, RFC
    /// 9220): a TCP connection to the origin, an Upgrade handshake on it,
    /// then the bytes both ways as for [`Kind::Tcp`].
    WebSocket,
    /// WebTransport over HTTP/3 relayed to an upstream origin over HTTP/3
    /// (draft-ietf-webtrans-http3): a QUIC connection to the origin, a
    /// session on it, and the session's streams and datagrams mapped one to
    /// one; the session's own stream carries its capsules as bytes.
    WebTransport,
}

impl Kind {
    /// The protocol as the ask to control names it.
    pub fn protocol(self) -> TunnelProtocol {
        match self {
            Kind::Udp => TunnelProtocol::ConnectUdp,
            Kind::Ip => TunnelProtocol::ConnectIp,
            Kind::Bound => TunnelProtocol::ConnectUdpBind,
            Kind::Tcp => TunnelProtocol::ConnectTcp,
            Kind::WebSocket => TunnelProtocol::WebSocket,
            Kind::WebTransport => TunnelProtocol::WebTransport,
        }
    }

    /// Whether the tunnel runs on the Capsule Protocol (every kind but
    /// those whose stream carries a TCP connection's bytes).
    pub fn capsules(self) -> bool {
        !self.byte_stream()
    }

    /// Whether the stream's body is relayed as bytes, unchanged: a TCP
    /// connection's (classic CONNECT, WebSocket), or a WebTransport
    /// session's capsules (to the origin's session stream).
    pub fn byte_stream(self) -> bool {
        matches!(self, Kind::Tcp | Kind::WebSocket | Kind::WebTransport)
    }

    /// The kind's name in logs and listings.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Udp => "connect-udp",
            Kind::Ip => "connect-ip",
            Kind::Bound => "connect-udp-bind",
            Kind::Tcp => "connect-tcp",
            Kind::WebSocket => "websocket",
            Kind::WebTransport => "webtransport",
        }
    }
}

/// A tunnel request, as control is asked about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    /// What kind of tunnel.
    pub kind: Kind,
    /// `:authority`.
    pub authority: String,
    /// `:path` (empty for classic CONNECT).
    pub path: String,
    /// The target as the ask carries it: a host (IP literal or name) for
    /// connect-udp and CONNECT, `*` / a prefix / a name for connect-ip,
    /// `*` or an IP literal for bound UDP.
    pub target_host: String,
    /// The target port (connect-ip: the IP protocol, 256 for any).
    pub target_port: u16,
    /// Credentials.
    pub authorization: Option<String>,
    /// A bound request's fallback target (draft section 2), if it named one.
    pub fallback: Option<SocketAddr>,
    /// A WebSocket request's handshake.
    pub websocket: Option<Box<ClientHandshake>>,
    /// A WebTransport request's fields for the origin.
    pub webtransport: Option<Box<SessionFields>>,
}

/// What a WebTransport request passes to the origin's session request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFields {
    /// `origin` (the draft's section 3.2: the origin checks it).
    pub origin: Option<String>,
    /// `wt-available-protocols` (section 3.3).
    pub protocols: Option<String>,
}

/// What a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// GET or HEAD of the status endpoint (carriers that serve it).
    Status {
        /// HEAD: headers only.
        head_only: bool,
    },
    /// A tunnel to ask control about.
    Tunnel(TunnelRequest),
    /// An answer without a tunnel.
    Refuse(Refusal),
}

/// Paths of the status endpoint.
pub const STATUS_PATHS: [&str; 2] = ["/", "/.well-known/masque-relay/status"];

fn host_text(h: &TargetHost) -> String {
    match h {
        TargetHost::Ip(ip) => ip.to_string(),
        TargetHost::Name(n) => n.clone(),
    }
}

/// Classifies a well-formed request; `status_endpoint` says whether the
/// carrier serves GET/HEAD of the status endpoint.
pub fn route(req: &Request, served: &Served, status_endpoint: bool) -> Route {
    let refuse = |r: request::Refusal| Route::Refuse(r.into());
    match (req.method.as_str(), req.protocol.as_deref()) {
        ("CONNECT", None) => match request::classify_connect_tcp(req) {
            Ok(c) => Route::Tunnel(TunnelRequest {
                kind: Kind::Tcp,
                authority: req.authority.clone().unwrap_or_default(),
                path: String::new(),
                target_host: host_text(&c.target_host),
                target_port: c.target_port,
                authorization: c.authorization,
                fallback: None,
                websocket: None,
                webtransport: None,
            }),
            Err(r) => refuse(r),
        },
        ("CONNECT", Some("connect-ip")) => {
            let Some(template) = served.ip_template.as_ref() else {
                // RFC 8441 section 4: an unsupported :protocol SHOULD get 501.
                return Route::Refuse(Refusal::new(501, None, "connect-ip is not enabled on this relay"));
            };
            match request::classify_connect_ip(req, template) {
                Ok(c) => Route::Tunnel(TunnelRequest {
                    kind: Kind::Ip,
                    target_host: c.ask_target(),
                    target_port: c.ask_ipproto(),
                    authority: c.authority,
                    path: c.path,
                    authorization: c.authorization,
                    fallback: None,
                    websocket: None,
                    webtransport: None,
                }),
                Err(r) => refuse(r),
            }
        }
        // Bound connect-udp, when served; otherwise the field is ignored and
        // the request is plain connect-udp (draft section 6: the extension
        // is on only when both sides sent the field).
        ("CONNECT", Some("connect-udp")) if served.bind && request::request_wants_bind(req) => {
            let c = match request::classify_connect_udp_bind(req, &served.template) {
                Ok(c) => c,
                Err(r) => return refuse(r),
            };
            let (target_host, target_port, fallback) = match &c.target {
                None => ("*".to_string(), 0, None),
                Some((TargetHost::Ip(ip), port)) => {
                    (ip.to_string(), *port, Some(SocketAddr::new(*ip, *port)))
                }
                Some((TargetHost::Name(_), _)) => {
                    return Route::Refuse(Refusal::new(
                        400,
                        Some(relay_proto::proxy_status::ProxyError::HttpRequestError),
                        "a bound request's fallback target must be an IP address (or both '*')",
                    ));
                }
            };
            Route::Tunnel(TunnelRequest {
                kind: Kind::Bound,
                authority: c.authority,
                path: c.path,
                target_host,
                target_port,
                authorization: c.authorization,
                fallback,
                websocket: None,
                webtransport: None,
            })
        }
        ("CONNECT", Some("websocket")) => websocket_request(req, served),
        // Draft-16 section 3.2's `webtransport-h3`, and the older drafts'
        // `webtransport` that deployed browsers still send.
        ("CONNECT", Some(p)) if super::webtransport::is_session_token(p) => webtransport_request(req, served),
        ("CONNECT", Some("connect-udp")) if !served.connect_udp => {
            Route::Refuse(Refusal::new(501, None, "connect-udp is not enabled on this relay"))
        }
        ("CONNECT", Some(_)) => match request::classify_connect_udp(req, &served.template) {
            Ok(c) => Route::Tunnel(TunnelRequest {
                kind: Kind::Udp,
                target_host: host_text(&c.target_host),
                target_port: c.target_port,
                authority: c.authority,
                path: c.path,
                authorization: c.authorization,
                fallback: None,
                websocket: None,
                webtransport: None,
            }),
            Err(r) => refuse(r),
        },
        (method @ ("GET" | "HEAD"), _) if status_endpoint => {
            let path = req.path.as_deref().unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            if STATUS_PATHS.contains(&path) {
                Route::Status { head_only: method == "HEAD" }
            } else {
                Route::Refuse(Refusal::new(404, None, "not found"))
            }
        }
        _ => Route::Refuse(Refusal::new(405, None, "method not allowed")),
    }
}

/// A WebSocket request (RFC 6455 section 4.2.1 on HTTP/1.1, RFC 8441
/// section 5 / RFC 9220 section 3 on extended CONNECT): control picks the
/// upstream by authority and path.
fn websocket_request(req: &Request, served: &Served) -> Route {
    if !served.websocket {
        // RFC 8441 section 4: an unsupported :protocol SHOULD get 501.
        return Route::Refuse(Refusal::new(501, None, "websocket is not served by this relay"));
    }
    let carrier =
        if req.http1_upgrade { websocket::Carrier::Http1 } else { websocket::Carrier::ExtendedConnect };
    if !matches!(req.scheme.as_deref(), Some("https" | "http")) {
        let why = ":scheme must be https or http";
        return Route::Refuse(Refusal::new(
            400,
            Some(relay_proto::proxy_status::ProxyError::HttpRequestError),
            why,
        ));
    }
    let handshake = match websocket::check_client(&req.websocket, carrier) {
        Ok(h) => h,
        Err(e) => {
            let mut r = Refusal::new(
                e.status(carrier),
                Some(relay_proto::proxy_status::ProxyError::HttpRequestError),
                e.to_string(),
            );
            if e.names_version() {
                // RFC 6455 section 4.4: the versions the server speaks.
                r.fields.push(("sec-websocket-version", websocket::VERSION.to_string()));
                if carrier == websocket::Carrier::Http1 {
                    // RFC 9110 section 15.5.22: a 426 names the protocol.
                    r.fields.push(("upgrade", "websocket".to_string()));
                }
            }
            return Route::Refuse(r);
        }
    };
    Route::Tunnel(TunnelRequest {
        kind: Kind::WebSocket,
        authority: req.authority.clone().unwrap_or_default(),
        path: req.path.clone().unwrap_or_default(),
        target_host: String::new(),
        target_port: 0,
        authorization: req.authorization.clone(),
        fallback: None,
        websocket: Some(Box::new(handshake)),
        webtransport: None,
    })
}

/// A WebTransport request (draft-ietf-webtrans-http3 section 3.2: an
/// extended CONNECT with `:protocol webtransport` and `:scheme https`):
/// control picks the upstream by authority and path. Only HTTP/3 carries
/// it (the tunnel layer refuses it on the TCP front).
fn webtransport_request(req: &Request, served: &Served) -> Route {
    if !served.webtransport {
        // RFC 9220 section 3 / RFC 8441 section 4: an unsupported
        // :protocol SHOULD get 501.
        return Route::Refuse(Refusal::new(501, None, "webtransport is not served by this relay"));
    }
    if req.scheme.as_deref() != Some("https") {
        let why = ":scheme must be https";
        return Route::Refuse(Refusal::new(
            400,
            Some(relay_proto::proxy_status::ProxyError::HttpRequestError),
            why,
        ));
    }
    Route::Tunnel(TunnelRequest {
        kind: Kind::WebTransport,
        authority: req.authority.clone().unwrap_or_default(),
        path: req.path.clone().unwrap_or_default(),
        target_host: String::new(),
        target_port: 0,
        authorization: req.authorization.clone(),
        fallback: None,
        websocket: None,
        webtransport: Some(Box::new(SessionFields {
            origin: req.websocket.origin.clone(),
            protocols: req.wt_available_protocols.clone(),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::template::UriTemplate;

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

    fn served() -> Served {
        Served {
            template: UriTemplate::parse("/.well-known/masque/udp/{target_host}/{target_port}/").unwrap(),
            ip_template: None,
            connect_udp: true,
            bind: true,
            websocket: false,
            webtransport: false,
        }
    }

    fn status(r: Route) -> u16 {
        match r {
            Route::Refuse(r) => r.status,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn tunnels() {
        let s = served();
        let Route::Tunnel(t) = route(&req("CONNECT", None, "example.com:443", None), &s, true) else {
            panic!()
        };
        assert_eq!((t.kind, t.target_host.as_str(), t.target_port), (Kind::Tcp, "example.com", 443));
        assert_eq!(t.authority, "example.com:443");
        let udp = req("CONNECT", Some("connect-udp"), "relay", Some("/.well-known/masque/udp/192.0.2.1/53/"));
        let Route::Tunnel(t) = route(&udp, &s, false) else { panic!() };
        assert_eq!((t.kind, t.target_host.as_str(), t.target_port), (Kind::Udp, "192.0.2.1", 53));
        let mut bound =
            req("CONNECT", Some("connect-udp"), "relay", Some("/.well-known/masque/udp/%2A/%2A/"));
        bound.connect_udp_bind = Some("?1".into());
        let Route::Tunnel(t) = route(&bound, &s, false) else { panic!() };
        assert_eq!((t.kind, t.target_host.as_str(), t.fallback), (Kind::Bound, "*", None));
        let mut fallback =
            req("CONNECT", Some("connect-udp"), "relay", Some("/.well-known/masque/udp/192.0.2.1/53/"));
        fallback.connect_udp_bind = Some("?1".into());
        let Route::Tunnel(t) = route(&fallback, &s, false) else { panic!() };
        assert_eq!(t.fallback, Some("192.0.2.1:53".parse().unwrap()));
        let mut named =
            req("CONNECT", Some("connect-udp"), "relay", Some("/.well-known/masque/udp/example.com/53/"));
        named.connect_udp_bind = Some("?1".into());
        assert_eq!(status(route(&named, &s, false)), 400);
        // Without bind served, the field is ignored: a '*' target is 400.
        let no_bind = Served { bind: false, ..served() };
        assert_eq!(status(route(&bound, &no_bind, false)), 400);
    }

    #[test]
    fn refusals_are_the_same_for_every_carrier() {
        let s = served();
        let ip = req("CONNECT", Some("connect-ip"), "relay", Some("/x"));
        assert_eq!(status(route(&ip, &s, true)), 501);
        assert_eq!(status(route(&req("CONNECT", Some("websocket"), "relay", Some("/x")), &s, true)), 501);
        let off = Served { connect_udp: false, ..served() };
        let udp = req("CONNECT", Some("connect-udp"), "relay", Some("/.well-known/masque/udp/192.0.2.1/53/"));
        assert_eq!(status(route(&udp, &off, false)), 501);
        assert_eq!(status(route(&req("CONNECT", None, "example.com", None), &s, true)), 400);
        assert_eq!(status(route(&req("POST", None, "relay", Some("/")), &s, true)), 405);
        assert_eq!(status(route(&req("GET", None, "relay", Some("/")), &s, false)), 405);
    }

    #[test]
    fn webtransport_requests() {
        let h3 = req("CONNECT", Some("webtransport-h3"), "app.example", Some("/game"));
        let on = Served { webtransport: true, ..served() };
        let Route::Tunnel(t) = route(&h3, &on, false) else { panic!("webtransport-h3 is a session") };
        assert_eq!(t.kind, Kind::WebTransport);
        assert_eq!(status(route(&h3, &served(), false)), 501, "not served: 501 whatever the token");
        let mut wt = req("CONNECT", Some("webtransport"), "app.example", Some("/game?room=1"));
        wt.websocket.origin = Some("https://app.example".into());
        wt.wt_available_protocols = Some("\"v2\", \"v1\"".into());
        // Not served (no webtransport route): 501 like any unknown
        // :protocol.
        assert_eq!(status(route(&wt, &served(), false)), 501);
        let on = Served { webtransport: true, ..served() };
        let Route::Tunnel(t) = route(&wt, &on, false) else { panic!() };
        assert_eq!(
            (t.kind, t.authority.as_str(), t.path.as_str(), t.target_port),
            (Kind::WebTransport, "app.example", "/game?room=1", 0)
        );
        assert_eq!(t.kind.protocol(), TunnelProtocol::WebTransport);
        assert!(t.kind.byte_stream() && !t.kind.capsules());
        let f = t.webtransport.unwrap();
        assert_eq!(f.origin.as_deref(), Some("https://app.example"));
        assert_eq!(f.protocols.as_deref(), Some("\"v2\", \"v1\""));
        // Section 3.2: the scheme is https.
        wt.scheme = Some("http".into());
        assert_eq!(status(route(&wt, &on, false)), 400);
    }

    #[test]
    fn websocket_requests() {
        let mut ws = req("CONNECT", Some("websocket"), "chat.example", Some("/chat?x=1"));
        ws.websocket.version = Some("13".into());
        ws.websocket.protocol = Some("chat".into());
        // Not served: 501 like any unknown :protocol.
        assert_eq!(status(route(&ws, &served(), false)), 501);
        let on = Served { websocket: true, ..served() };
        let Route::Tunnel(t) = route(&ws, &on, false) else { panic!() };
        assert_eq!(
            (t.kind, t.authority.as_str(), t.path.as_str()),
            (Kind::WebSocket, "chat.example", "/chat?x=1")
        );
        assert_eq!((t.target_host.as_str(), t.target_port), ("", 0));
        let h = t.websocket.unwrap();
        assert_eq!((h.protocols.as_deref(), h.key.as_deref()), (Some("chat"), None));
        // A missing version: 400 with the version field on extended CONNECT.
        let mut old = ws.clone();
        old.websocket.version = Some("8".into());
        let Route::Refuse(r) = route(&old, &on, false) else { panic!() };
        assert_eq!(r.status, 400);
        assert!(r.fields.contains(&("sec-websocket-version", "13".to_string())));
        // HTTP/1.1: 426 with Upgrade, and the key is required.
        old.http1_upgrade = true;
        let Route::Refuse(r) = route(&old, &on, false) else { panic!() };
        assert_eq!(r.status, 426);
        assert!(r.fields.contains(&("upgrade", "websocket".to_string())));
        let mut h1 = ws.clone();
        h1.http1_upgrade = true;
        assert_eq!(status(route(&h1, &on, false)), 400);
        h1.websocket.key = Some("dGhlIHNhbXBsZSBub25jZQ==".into());
        let Route::Tunnel(t) = route(&h1, &on, false) else { panic!() };
        assert_eq!(t.websocket.unwrap().key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        let mut scheme = ws.clone();
        scheme.scheme = Some("ftp".into());
        assert_eq!(status(route(&scheme, &on, false)), 400);
    }

    #[test]
    fn status_endpoint() {
        let s = served();
        assert_eq!(
            route(&req("GET", None, "relay", Some("/")), &s, true),
            Route::Status { head_only: false }
        );
        assert_eq!(
            route(&req("HEAD", None, "relay", Some("/.well-known/masque-relay/status?x=1")), &s, true),
            Route::Status { head_only: true }
        );
        assert_eq!(status(route(&req("GET", None, "relay", Some("/nope")), &s, true)), 404);
    }
}

//! What a request asks for, whatever HTTP version carried it (sans-IO):
//! one classification for HTTP/3, HTTP/2 and HTTP/1.1, so every request
//! gets the same answer on every version (RFC 9298, RFC 9484,
//! draft-ietf-masque-connect-udp-listen, RFC 9110 section 9.3.6).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use relay_proto::channel::record::TunnelProtocol;
use relay_proto::request::{self, Request};
use relay_proto::target::TargetHost;

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
}

impl Kind {
    /// The protocol as the ask to control names it.
    pub fn protocol(self) -> TunnelProtocol {
        match self {
            Kind::Udp => TunnelProtocol::ConnectUdp,
            Kind::Ip => TunnelProtocol::ConnectIp,
            Kind::Bound => TunnelProtocol::ConnectUdpBind,
            Kind::Tcp => TunnelProtocol::ConnectTcp,
        }
    }

    /// Whether the tunnel runs on the Capsule Protocol (every kind but
    /// classic CONNECT, whose stream carries the TCP bytes).
    pub fn capsules(self) -> bool {
        self != Kind::Tcp
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
            })
        }
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

//! `[[upstreams]]` routes: which route an upstream ask (WebSocket,
//! WebTransport) takes, and the `Host` (WebTransport: `:authority`) and
//! path it is sent upstream with. Sans-IO: the policy calls
//! [`Upstreams::select`] with the ask's protocol, authority and path,
//! which come from the Internet-facing dataplane and are trusted for
//! nothing but their record validation (UTF-8, bounded length).
//!
//! A route serves the asks of its own protocol only. It matches when the
//! request's host (the authority less its port, IPv6 brackets removed,
//! ASCII lowercased) is one of its `hosts` (any when empty) and the
//! request path before `?` starts with its `path_prefix`; routes are tried
//! in file order and the first match wins. The upstream path is
//! `prefix_rewrite` plus the request path less `path_prefix`, the query
//! kept (without `prefix_rewrite`: the request path unchanged), and must be
//! a valid origin-form target
//! ([`valid_upstream_path`](relay_proto::channel::record::valid_upstream_path)).
//! A path with `.` or `..` segments (also percent-encoded) is refused
//! before any route is tried: the origin would resolve it past the prefix
//! the route is scoped to.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use relay_proto::channel::record::valid_upstream_path;
use relay_proto::target::TargetHost;

use crate::config::{UpstreamHost, UpstreamProtocol, UpstreamRoute};

/// Why an upstream ask has no upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No route matches the request's host and path (404).
    #[error("no upstream route")]
    NoRoute,
    /// The request path has `.` or `..` segments (400).
    #[error("the path has dot segments")]
    DotSegments,
    /// The upstream path would not be a valid request target (400).
    #[error("invalid upstream path")]
    InvalidPath,
}

/// The route an ask takes, and what is sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected<'a> {
    /// The first matching route.
    pub route: &'a UpstreamRoute,
    /// The `Host` to send: `host_header`, else the origin's authority.
    pub host: String,
    /// The path (and query) to request upstream.
    pub path: String,
}

/// The configured routes, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams {
    routes: Vec<UpstreamRoute>,
}

impl Upstreams {
    /// These routes (checked by the config parser), tried in this order.
    pub fn new(routes: Vec<UpstreamRoute>) -> Self {
        Self { routes }
    }

    /// The routes.
    pub fn routes(&self) -> &[UpstreamRoute] {
        &self.routes
    }

    /// Whether some route serves `protocol`.
    pub fn serves(&self, protocol: UpstreamProtocol) -> bool {
        self.routes.iter().any(|r| r.protocol == protocol)
    }

    /// The first route serving `protocol` that matches the request's
    /// `authority` and `path`, with the upstream `Host` and path.
    pub fn select(
        &self,
        protocol: UpstreamProtocol,
        authority: &str,
        path: &str,
    ) -> Result<Selected<'_>, RouteError> {
        let (before_query, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        if has_dot_segments(before_query) {
            return Err(RouteError::DotSegments);
        }
        let host = authority_host(authority);
        let route = self
            .routes
            .iter()
            .filter(|r| r.protocol == protocol)
            .find(|r| {
                before_query.starts_with(r.path_prefix.as_str())
                    && (r.hosts.is_empty()
                        || host.as_deref().is_some_and(|h| r.hosts.iter().any(|e| host_matches(e, h))))
            })
            .ok_or(RouteError::NoRoute)?;
        let upstream_path = match &route.prefix_rewrite {
            None => path.to_string(),
            Some(rewrite) => {
                // `starts_with` held, so the prefix ends on a char boundary.
                let rest = before_query.get(route.path_prefix.len()..).unwrap_or("");
                match query {
                    Some(q) => format!("{rewrite}{rest}?{q}"),
                    None => format!("{rewrite}{rest}"),
                }
            }
        };
        if !valid_upstream_path(&upstream_path) {
            return Err(RouteError::InvalidPath);
        }
        let host = route.host_header.clone().unwrap_or_else(|| route.origin.authority.clone());
        Ok(Selected { route, host, path: upstream_path })
    }
}

/// The host of a request's authority (`host`, `host:port`, `[v6]`,
/// `[v6]:port`), brackets removed and ASCII lowercased; `None` when it is
/// not one of those forms (userinfo, an unclosed bracket, a port that is
/// not digits, an empty host).
pub fn authority_host(authority: &str) -> Option<String> {
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']')?;
            let port = match after {
                "" => "",
                _ => after.strip_prefix(':')?,
            };
            (inside, port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, ""),
        },
    };
    if host.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// Whether a request's host (from [`authority_host`]) is this `hosts`
/// entry: the same address for an IP literal, the same name otherwise.
fn host_matches(entry: &UpstreamHost, host: &str) -> bool {
    match &entry.0 {
        TargetHost::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
        TargetHost::Name(name) => host == name,
    }
}

/// Whether `path` has a `.` or `..` segment (`%2e` counts as a dot;
/// backslashes separate segments too, as some servers read them).
fn has_dot_segments(path: &str) -> bool {
    path.split(['/', '\\']).any(|segment| {
        let bytes = segment.as_bytes();
        let (mut i, mut dots) = (0, 0);
        while i < bytes.len() {
            if bytes[i] == b'.' {
                i += 1;
            } else if bytes[i] == b'%'
                && bytes.get(i + 1) == Some(&b'2')
                && matches!(bytes.get(i + 2), Some(b'e' | b'E'))
            {
                i += 3;
            } else {
                return false;
            }
            dots += 1;
        }
        (1..=2).contains(&dots)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A route from its TOML keys (checked as the config file's are).
    pub(crate) fn route(keys: &str) -> UpstreamRoute {
        toml::from_str(keys).unwrap_or_else(|e| panic!("{keys}: {e}"))
    }

    fn upstreams() -> Upstreams {
        Upstreams::new(vec![
            route(
                "name = \"chat\"\nhosts = [\"chat.example\", \"192.0.2.1\", \"::1\"]\npath_prefix = \"/chat/\"\n\
                 origin = \"ws://127.0.0.1:9001\"\nprefix_rewrite = \"/\"\n",
            ),
            route(
                "name = \"api\"\npath_prefix = \"/api/\"\norigin = \"ws://api.internal\"\n\
                 host_header = \"api.example\"\n",
            ),
            route("name = \"any-chat\"\npath_prefix = \"/chat/\"\norigin = \"ws://[::1]:8080\"\n"),
        ])
    }

    #[test]
    fn the_first_route_matching_host_and_prefix_wins() {
        let u = upstreams();
        let ws = UpstreamProtocol::Websocket;
        let s = u.select(ws, "chat.example", "/chat/room1?x=1").unwrap();
        assert_eq!(
            (s.route.name.as_str(), s.host.as_str(), s.path.as_str()),
            ("chat", "127.0.0.1:9001", "/room1?x=1")
        );
        // Port ignored, ASCII case-insensitive, IP literals by address.
        for authority in ["CHAT.Example:443", "chat.example:", "192.0.2.1:8443", "[::1]", "[0::1]:443"] {
            assert_eq!(u.select(ws, authority, "/chat/").unwrap().route.name, "chat", "{authority}");
        }
        // Another host: the route without hosts, the path unchanged and the
        // origin's authority as Host.
        let s = u.select(ws, "other.example", "/chat/room1?x=1").unwrap();
        assert_eq!(
            (s.route.name.as_str(), s.host.as_str(), s.path.as_str()),
            ("any-chat", "[::1]:8080", "/chat/room1?x=1")
        );
        // host_header.
        let s = u.select(ws, "relay.example", "/api/v1").unwrap();
        assert_eq!(
            (s.route.name.as_str(), s.host.as_str(), s.path.as_str()),
            ("api", "api.example", "/api/v1")
        );
        // Authorities that name no host match only routes without hosts.
        for authority in ["", "user@chat.example", "[::1", "chat.example:x", "[::1]x", ":443"] {
            assert_eq!(u.select(ws, authority, "/chat/a").unwrap().route.name, "any-chat", "{authority:?}");
        }
    }

    #[test]
    fn no_match_is_no_route() {
        let u = upstreams();
        let ws = UpstreamProtocol::Websocket;
        for path in ["/chat", "/Chat/x", "/", "*", "", "/ap", "?/api/"] {
            assert_eq!(u.select(ws, "chat.example", path), Err(RouteError::NoRoute), "{path:?}");
        }
        // The query is not part of the match.
        assert_eq!(u.select(ws, "x", "/a?/api/"), Err(RouteError::NoRoute));
        assert_eq!(Upstreams::default().select(ws, "x", "/"), Err(RouteError::NoRoute));
        assert!(!Upstreams::default().serves(ws) && u.serves(ws));
    }

    #[test]
    fn prefix_rewrite_replaces_the_prefix_and_keeps_the_query() {
        let u = Upstreams::new(vec![
            route("name = \"a\"\npath_prefix = \"/a/\"\norigin = \"ws://h\"\nprefix_rewrite = \"/v2/\"\n"),
            route("name = \"b\"\npath_prefix = \"/b\"\norigin = \"ws://h:81\"\nprefix_rewrite = \"/\"\n"),
        ]);
        let ws = UpstreamProtocol::Websocket;
        let path = |p: &str| u.select(ws, "x", p).map(|s| s.path);
        assert_eq!(path("/a/"), Ok("/v2/".into()));
        assert_eq!(path("/a/room?k=v&q=%20"), Ok("/v2/room?k=v&q=%20".into()));
        assert_eq!(path("/a/x?"), Ok("/v2/x?".into()));
        assert_eq!(path("/bcd"), Ok("/cd".into()));
        assert_eq!(path("/b/x"), Ok("//x".into()));
        assert_eq!(u.select(ws, "x", "/b").unwrap().host, "h:81");
        // Results that are no request target: 400.
        assert_eq!(path("/a/x#frag"), Err(RouteError::InvalidPath));
        assert_eq!(path("/a/\u{e9}"), Err(RouteError::InvalidPath));
        assert_eq!(path("/a/ x"), Err(RouteError::InvalidPath));
        let long = format!("/a/{}", "x".repeat(1532));
        assert_eq!(path(&long).map(|p| p.len()), Ok(1536));
        let longer = format!("/a/{}", "x".repeat(1533));
        assert_eq!(longer.len(), 1536, "a request path the record carries");
        assert_eq!(path(&longer), Err(RouteError::InvalidPath), "past MAX_PATH once rewritten");
    }

    #[test]
    fn dot_segments_are_refused() {
        let u = upstreams();
        let ws = UpstreamProtocol::Websocket;
        for path in [
            "/chat/../admin",
            "/chat/./x",
            "/chat/..",
            "/chat/%2e%2E/admin",
            "/chat/.%2e/admin",
            "/chat/..\\admin",
            "/api/%2E",
        ] {
            assert_eq!(u.select(ws, "chat.example", path), Err(RouteError::DotSegments), "{path}");
        }
        // Dots that are not whole segments, and dots in the query, are fine.
        for path in ["/chat/...", "/chat/.x", "/chat/a..b", "/chat/x?p=../y", "/chat/%2e%2e%2e"] {
            assert!(u.select(ws, "chat.example", path).is_ok(), "{path}");
        }
    }

    #[test]
    fn routes_serve_the_asks_of_their_own_protocol_only() {
        let u = Upstreams::new(vec![
            route(
                "name = \"ws\"\nhosts = [\"a.example\"]\npath_prefix = \"/x/\"\norigin = \"wss://ws.internal\"\n",
            ),
            route(
                "name = \"wt\"\nprotocol = \"webtransport\"\nhosts = [\"a.example\"]\npath_prefix = \"/x/\"\n\
                 origin = \"https://wt.internal:4433\"\nprefix_rewrite = \"/\"\n",
            ),
            route(
                "name = \"wt-any\"\nprotocol = \"webtransport\"\npath_prefix = \"/\"\n\
                 origin = \"https://[::1]\"\nhost_header = \"wt.example\"\n",
            ),
        ]);
        let (ws, wt) = (UpstreamProtocol::Websocket, UpstreamProtocol::Webtransport);
        assert!(u.serves(ws) && u.serves(wt));
        // The same host and path: each protocol its own route, the first
        // of that protocol in file order.
        let s = u.select(wt, "a.example:443", "/x/session?k=v").unwrap();
        assert_eq!(
            (s.route.name.as_str(), s.host.as_str(), s.path.as_str()),
            ("wt", "wt.internal:4433", "/session?k=v")
        );
        assert_eq!(u.select(ws, "a.example", "/x/session").unwrap().route.name, "ws");
        // A webtransport route never serves a WebSocket ask: outside the
        // websocket route's scope there is no route, even though wt-any
        // takes every path.
        assert_eq!(u.select(ws, "b.example", "/x/"), Err(RouteError::NoRoute));
        assert_eq!(u.select(ws, "a.example", "/y"), Err(RouteError::NoRoute));
        let s = u.select(wt, "b.example", "/y").unwrap();
        assert_eq!((s.route.name.as_str(), s.host.as_str(), s.path.as_str()), ("wt-any", "wt.example", "/y"));
        // Dot segments are refused for WebTransport too.
        assert_eq!(u.select(wt, "a.example", "/x/../y"), Err(RouteError::DotSegments));
        // Only websocket routes: no webtransport is served, and no
        // WebTransport ask matches.
        let only_ws = upstreams();
        assert!(!only_ws.serves(wt));
        assert_eq!(only_ws.select(wt, "chat.example", "/chat/"), Err(RouteError::NoRoute));
    }

    #[test]
    fn authority_hosts() {
        assert_eq!(authority_host("Example.COM:443").as_deref(), Some("example.com"));
        assert_eq!(authority_host("[2001:DB8::1]:8443").as_deref(), Some("2001:db8::1"));
        assert_eq!(authority_host("10.0.0.1").as_deref(), Some("10.0.0.1"));
        for bad in ["", "a@b", "[::1", "[::1]:x", "::1", "h:1:2", ":80", "[]"] {
            assert_eq!(authority_host(bad), None, "{bad:?}");
        }
    }
}

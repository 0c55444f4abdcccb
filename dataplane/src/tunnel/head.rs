//! Response heads, whatever HTTP version sends them (sans-IO).
//!
//! Every answer the relay gives a request is built here once: the 2xx that
//! opens a tunnel and every refusal, with Proxy-Status (RFC 9209), the
//! `Proxy-Authenticate` challenge on 407 (RFC 9110 section 11.7.1), `Allow`
//! on 405 (RFC 9110 section 15.5.6) and `Retry-After` on a quota's 429
//! (RFC 9110 section 10.2.3). HTTP/3 ([`crate::h3`]) and the TCP front's
//! sessions ([`crate::front`]) only render a [`Head`] in their framing.
#![forbid(unsafe_code)]

use relay_proto::proxy_status::{self, ProxyError};

pub use crate::context::Names;

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Fields (lowercase names), without `:status`.
    pub fields: Vec<(&'static str, String)>,
    /// A 2xx that turns the stream into a tunnel (no body length; the
    /// stream stays open).
    pub tunnel: bool,
    /// The body's length when it is not sent (HEAD).
    pub head_only_len: Option<usize>,
}

/// Why a request gets no tunnel: the status, the Proxy-Status error when
/// the refusal concerns the proxying, and details for Proxy-Status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// Proxy-Status error type.
    pub proxy_error: Option<ProxyError>,
    /// Details (Proxy-Status `details`, logs).
    pub details: String,
    /// `Retry-After` seconds (a rate or byte quota's 429).
    pub retry_after: Option<u32>,
    /// A 407's `Proxy-Authenticate` values, as control built them (checked
    /// by the record decoder: visible ASCII and spaces); empty: the
    /// relay's `Bearer realm` challenge.
    pub challenges: Vec<String>,
    /// The status the next hop answered (Proxy-Status `received-status`,
    /// RFC 9209 section 2.1.2), e.g. an upstream origin's refusal.
    pub received_status: Option<u16>,
    /// More fields of the answer (e.g. `Sec-WebSocket-Version` on a
    /// WebSocket version mismatch, RFC 6455 section 4.4).
    pub fields: Vec<(&'static str, String)>,
}

impl Refusal {
    /// A refusal without `Retry-After`.
    pub fn new(status: u16, proxy_error: Option<ProxyError>, details: impl Into<String>) -> Self {
        Self {
            status,
            proxy_error,
            details: details.into(),
            retry_after: None,
            challenges: Vec::new(),
            received_status: None,
            fields: Vec::new(),
        }
    }
}

impl From<relay_proto::request::Refusal> for Refusal {
    fn from(r: relay_proto::request::Refusal) -> Self {
        Self::new(r.status, r.proxy_error, r.reason)
    }
}

impl Head {
    /// The 2xx that opens a tunnel: capsule tunnels carry
    /// `capsule-protocol: ?1` (RFC 9297 section 3.4, RFC 9298 section 3.5,
    /// RFC 9484 section 4.5); a classic CONNECT's carries nothing (RFC 9110
    /// section 9.3.6).
    pub fn tunnel_open(capsules: bool) -> Self {
        let fields = if capsules { vec![("capsule-protocol", "?1".to_string())] } else { Vec::new() };
        Self { status: 200, fields, tunnel: true, head_only_len: None }
    }

    /// The 2xx (HTTP/2, HTTP/3; the HTTP/1.1 carrier renders it as 101)
    /// that opens a WebSocket relayed to an origin: the subprotocol and
    /// extensions the origin chose (RFC 6455 section 4.2.2, RFC 8441
    /// section 5), and on HTTP/1.1 the client's `Sec-WebSocket-Accept`.
    pub fn websocket_open(
        accept: Option<String>,
        protocol: Option<String>,
        extensions: Option<String>,
    ) -> Self {
        let mut fields = Vec::new();
        if let Some(a) = accept {
            fields.push(("sec-websocket-accept", a));
        }
        if let Some(p) = protocol {
            fields.push(("sec-websocket-protocol", p));
        }
        if let Some(e) = extensions {
            fields.push(("sec-websocket-extensions", e));
        }
        Self { status: 200, fields, tunnel: true, head_only_len: None }
    }

    /// The 200 that opens a WebTransport session relayed to an origin,
    /// with the application protocol the origin chose (`wt-protocol`,
    /// draft-ietf-webtrans-http3 section 3.3).
    pub fn webtransport_open(protocol: Option<String>) -> Self {
        let fields = protocol.map(|p| vec![("wt-protocol", p)]).unwrap_or_default();
        Self { status: 200, fields, tunnel: true, head_only_len: None }
    }

    /// The answer to a refused request. `allow` is the `Allow` value of a
    /// 405: the methods the carrier serves.
    pub fn refusal(r: &Refusal, names: &Names, allow: &'static str) -> Self {
        let mut fields = Vec::new();
        if let Some(e) = r.proxy_error {
            let details = (!r.details.is_empty()).then_some(r.details.as_str());
            fields.push((
                "proxy-status",
                proxy_status::format_received(&names.proxy, e, r.received_status, details),
            ));
        }
        if r.status == 407 && r.challenges.is_empty() {
            let realm: String =
                names.realm.chars().filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c)).collect();
            fields.push(("proxy-authenticate", format!("Bearer realm=\"{realm}\"")));
        } else if r.status == 407 {
            // One field per challenge (RFC 9110 section 11.7.1 allows
            // several, in one field or many; separate fields keep each
            // value whole for clients that read only one).
            fields.extend(r.challenges.iter().map(|c| ("proxy-authenticate", c.clone())));
        }
        if r.status == 405 {
            fields.push(("allow", allow.to_string()));
        }
        if let Some(secs) = r.retry_after {
            fields.push(("retry-after", secs.to_string()));
        }
        fields.extend(r.fields.iter().cloned());
        Self { status: r.status, fields, tunnel: false, head_only_len: None }
    }

    /// The value of field `name`, if present.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names { proxy: "relay".into(), realm: "re\"alm".into() }
    }

    #[test]
    fn refusals_carry_the_right_fields() {
        let r = Refusal::new(407, Some(ProxyError::HttpRequestDenied), "invalid credentials");
        let h = Head::refusal(&r, &names(), "CONNECT");
        assert_eq!(h.status, 407);
        assert!(!h.tunnel);
        assert_eq!(h.field("proxy-authenticate"), Some("Bearer realm=\"realm\""));
        assert_eq!(
            h.field("proxy-status"),
            Some("relay; error=http_request_denied; details=\"invalid credentials\"")
        );
        assert!(Head::refusal(&Refusal::new(404, None, "x"), &names(), "CONNECT").fields.is_empty());
        assert_eq!(
            Head::refusal(&Refusal::new(405, None, ""), &names(), "GET, HEAD, CONNECT").field("allow"),
            Some("GET, HEAD, CONNECT")
        );
        let mut quota = Refusal::new(429, Some(ProxyError::HttpRequestDenied), "quota");
        quota.retry_after = Some(3);
        assert_eq!(Head::refusal(&quota, &names(), "CONNECT").field("retry-after"), Some("3"));
    }

    #[test]
    fn a_407_carries_controls_challenges_one_field_each() {
        let mut r = Refusal::new(407, Some(ProxyError::HttpRequestDenied), "token replayed");
        r.challenges = vec![
            "Bearer realm=\"relay\"".into(),
            "PrivateToken challenge=\"AAIA\", token-key=\"MIIB\", max-age=10".into(),
        ];
        let h = Head::refusal(&r, &names(), "CONNECT");
        let values: Vec<&str> =
            h.fields.iter().filter(|(n, _)| *n == "proxy-authenticate").map(|(_, v)| v.as_str()).collect();
        assert_eq!(values, [r.challenges[0].as_str(), r.challenges[1].as_str()]);
        assert_eq!(
            h.field("proxy-status"),
            Some("relay; error=http_request_denied; details=\"token replayed\"")
        );
    }

    #[test]
    fn upstream_refusals_name_the_received_status() {
        let mut r =
            Refusal::new(502, Some(ProxyError::HttpUpgradeFailed), "the origin answered 403 instead of 101");
        r.received_status = Some(403);
        r.fields.push(("sec-websocket-version", "13".into()));
        let h = Head::refusal(&r, &names(), "CONNECT");
        assert_eq!(
            h.field("proxy-status"),
            Some(
                "relay; error=http_upgrade_failed; received-status=403; details=\"the origin answered 403 instead of 101\""
            )
        );
        assert_eq!(h.field("sec-websocket-version"), Some("13"));
        let open = Head::websocket_open(Some("acc".into()), Some("chat".into()), None);
        assert_eq!((open.status, open.tunnel), (200, true));
        assert_eq!(open.field("sec-websocket-accept"), Some("acc"));
        assert_eq!(open.field("sec-websocket-protocol"), Some("chat"));
        assert_eq!(open.field("sec-websocket-extensions"), None);
    }

    #[test]
    fn tunnel_heads() {
        let h = Head::tunnel_open(true);
        assert_eq!((h.status, h.tunnel, h.field("capsule-protocol")), (200, true, Some("?1")));
        assert!(Head::tunnel_open(false).fields.is_empty());
    }
}

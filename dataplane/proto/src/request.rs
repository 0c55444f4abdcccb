//! Validation of HTTP/3 request header sections and classification of
//! connect-udp and connect-ip requests.
//!
//! Two layers, matching the two kinds of refusal:
//! 1. [`parse_request`] enforces the message rules of RFC 9114 sections
//!    4.1.2, 4.2 and 4.3 and RFC 9220 section 3. A violation makes the request
//!    *malformed*: a stream error of type H3_MESSAGE_ERROR, no response.
//! 2. [`classify_connect_udp`] applies RFC 9298, [`classify_connect_udp_bind`]
//!    bound UDP (draft-ietf-masque-connect-udp-listen-13), and
//!    [`classify_connect_ip`] RFC 9484, to a well-formed request and pick the
//!    HTTP status for anything the relay will not serve. The caller chooses
//!    the classifier by `:protocol` and, for connect-udp,
//!    [`request_wants_bind`].
#![forbid(unsafe_code)]

use crate::bind::bind_requested;
use crate::ip::packet::is_extension_header;
use crate::ip::scope::{self, IpProto, IpTarget, ScopeError};
use crate::proxy_status::ProxyError;
use crate::target::{self, TargetHost};
use crate::template::{IpUriTemplate, MatchError, UriTemplate};

/// Longest header value kept from a request (authority, credentials).
pub const MAX_FIELD_VALUE_LEN: usize = 4096;

/// Connection-specific fields that RFC 9114 section 4.2 forbids.
const CONNECTION_SPECIFIC: [&[u8]; 5] =
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"];

/// Why a request is malformed (RFC 9114 section 4.1.2): the stream is reset
/// with H3_MESSAGE_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A field name is empty, has an uppercase letter or a character outside
    /// `tchar` (RFC 9114 section 4.2).
    #[error("invalid field name")]
    InvalidFieldName,
    /// A field value holds NUL, CR or LF, or starts or ends with whitespace
    /// (RFC 9114 section 4.2, RFC 9110 section 5.5).
    #[error("invalid field value")]
    InvalidFieldValue,
    /// A connection-specific field is present (RFC 9114 section 4.2).
    #[error("connection-specific header field")]
    ConnectionSpecificField,
    /// `te` holds something other than "trailers" (RFC 9114 section 4.2).
    #[error("te field other than trailers")]
    BadTe,
    /// A pseudo-header this relay does not know, or a response
    /// pseudo-header in a request (RFC 9114 section 4.3).
    #[error("unknown or response pseudo-header")]
    UnknownPseudoHeader,
    /// A pseudo-header follows a regular field (RFC 9114 section 4.3).
    #[error("pseudo-header after a regular field")]
    PseudoHeaderAfterField,
    /// A pseudo-header appears twice (RFC 9114 section 4.3.1).
    #[error("duplicate pseudo-header")]
    DuplicatePseudoHeader,
    /// A required pseudo-header is missing or empty (RFC 9114 sections 4.3.1
    /// and 4.4, RFC 9220 section 3).
    #[error("missing or empty required pseudo-header")]
    MissingPseudoHeader,
    /// Plain CONNECT carries `:scheme` or `:path` (RFC 9114 section 4.4).
    #[error("CONNECT must not carry :scheme or :path")]
    ConnectWithSchemeOrPath,
    /// `:protocol` on a non-CONNECT request, or without our
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 9220 section 3, RFC 8441
    /// section 4).
    #[error(":protocol not allowed here")]
    UnexpectedProtocol,
    /// `:authority` holds userinfo, or `host` disagrees with it (RFC 9114
    /// section 4.3.1).
    #[error("invalid :authority or host")]
    BadAuthority,
    /// A request for a capsule-protocol tunnel carries `content-length` or
    /// `content-type` (RFC 9297 section 3.2: "MUST treat the HTTP message
    /// as malformed").
    #[error("content-length or content-type on a capsule-protocol request")]
    ContentWithCapsules,
}

/// A well-formed request's control data and the fields the relay uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `:method`.
    pub method: String,
    /// `:scheme`, absent for plain CONNECT.
    pub scheme: Option<String>,
    /// `:authority`.
    pub authority: Option<String>,
    /// `:path`, absent for plain CONNECT.
    pub path: Option<String>,
    /// `:protocol` of an extended CONNECT.
    pub protocol: Option<String>,
    /// `proxy-authorization`, or `authorization` when the former is absent.
    pub authorization: Option<String>,
    /// Value of `capsule-protocol`, if present.
    pub capsule_protocol: Option<String>,
    /// Value of `connect-udp-bind`, if present; repeated fields are joined
    /// with ", " (an sf-list, which [`request_wants_bind`] reads as absent).
    pub connect_udp_bind: Option<String>,
    /// WebSocket's handshake fields (RFC 6455 section 11.3), when present.
    pub websocket: WebSocketFields,
    /// `wt-available-protocols` (draft-ietf-webtrans-http3 section 3.3: the
    /// application protocols a WebTransport client offers), passed to the
    /// upstream origin; repeated lines joined with ", ".
    pub wt_available_protocols: Option<String>,
    /// The request came as an HTTP/1.1 Upgrade ([`crate::http1::to_extended_connect`]),
    /// not as an extended CONNECT.
    pub http1_upgrade: bool,
}

/// WebSocket's request fields (RFC 6455 section 11.3, RFC 8441 section 5),
/// as the request carried them; [`crate::websocket`] checks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebSocketFields {
    /// `sec-websocket-version`; repeated lines joined with ", ".
    pub version: Option<String>,
    /// `sec-websocket-key` (HTTP/1.1 only: RFC 8441 section 5 leaves it out
    /// of extended CONNECT, so HTTP/2 and HTTP/3 requests never fill it);
    /// repeated lines joined with ", " (then invalid).
    pub key: Option<String>,
    /// `sec-websocket-protocol`; repeated lines joined with ", ".
    pub protocol: Option<String>,
    /// `sec-websocket-extensions`; repeated lines joined with ", ".
    pub extensions: Option<String>,
    /// `origin` (RFC 6454), passed to the upstream origin.
    pub origin: Option<String>,
}

/// Appends a field line's value to `slot` as RFC 9110 section 5.3 combines
/// repeated lines (", "), bounded by [`MAX_FIELD_VALUE_LEN`]: a value past
/// the bound makes the request malformed.
pub fn combine_field(slot: &mut Option<String>, value: String) -> Result<(), Malformed> {
    match slot {
        None => *slot = Some(value),
        Some(prev) if prev.len() + 2 + value.len() <= MAX_FIELD_VALUE_LEN => {
            prev.push_str(", ");
            prev.push_str(&value);
        }
        Some(_) => return Err(Malformed::InvalidFieldValue),
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn valid_value(v: &[u8]) -> bool {
    !v.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'))
        && !v.first().is_some_and(|b| matches!(b, b' ' | b'\t'))
        && !v.last().is_some_and(|b| matches!(b, b' ' | b'\t'))
}

fn to_string(v: &[u8]) -> Result<String, Malformed> {
    if v.len() > MAX_FIELD_VALUE_LEN {
        return Err(Malformed::InvalidFieldValue);
    }
    String::from_utf8(v.to_vec()).map_err(|_| Malformed::InvalidFieldValue)
}

/// Validates a request header section.
///
/// `extended_connect_enabled` is whether this server sent
/// SETTINGS_ENABLE_CONNECT_PROTOCOL=1: RFC 9220 section 3 makes `:protocol`
/// malformed otherwise.
pub fn parse_request<'a>(
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    extended_connect_enabled: bool,
) -> Result<Request, Malformed> {
    let mut method: Option<String> = None;
    let mut req = Request::default();
    let mut seen_regular = false;
    let mut host: Option<String> = None;
    let mut authorization: Option<String> = None;
    let mut has_content_fields = false;
    for (name, value) in fields {
        if !valid_value(value) {
            return Err(Malformed::InvalidFieldValue);
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if seen_regular {
                return Err(Malformed::PseudoHeaderAfterField);
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut req.scheme,
                b"authority" => &mut req.authority,
                b"path" => &mut req.path,
                b"protocol" => &mut req.protocol,
                _ => return Err(Malformed::UnknownPseudoHeader),
            };
            if slot.replace(to_string(value)?).is_some() {
                return Err(Malformed::DuplicatePseudoHeader);
            }
            continue;
        }
        seen_regular = true;
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(Malformed::InvalidFieldName);
        }
        if CONNECTION_SPECIFIC.contains(&name) {
            return Err(Malformed::ConnectionSpecificField);
        }
        match name {
            b"te" if value != b"trailers" => return Err(Malformed::BadTe),
            b"host" => host = Some(to_string(value)?),
            b"proxy-authorization" => req.authorization = Some(to_string(value)?),
            b"authorization" => authorization = Some(to_string(value)?),
            b"capsule-protocol" => req.capsule_protocol = Some(to_string(value)?),
            b"connect-udp-bind" => {
                let value = to_string(value)?;
                match &mut req.connect_udp_bind {
                    None => req.connect_udp_bind = Some(value),
                    // Joined as RFC 9110 section 5.3 combines field lines,
                    // bounded: any repeat reads as "absent" anyway.
                    Some(prev) if prev.len() + 2 + value.len() <= MAX_FIELD_VALUE_LEN => {
                        prev.push_str(", ");
                        prev.push_str(&value);
                    }
                    Some(prev) => {
                        if !prev.ends_with(", ") {
                            prev.push_str(", ");
                        }
                    }
                }
            }
            b"sec-websocket-version" => combine_field(&mut req.websocket.version, to_string(value)?)?,
            b"sec-websocket-protocol" => combine_field(&mut req.websocket.protocol, to_string(value)?)?,
            b"sec-websocket-extensions" => combine_field(&mut req.websocket.extensions, to_string(value)?)?,
            b"origin" => combine_field(&mut req.websocket.origin, to_string(value)?)?,
            b"wt-available-protocols" => combine_field(&mut req.wt_available_protocols, to_string(value)?)?,
            b"content-length" | b"content-type" => has_content_fields = true,
            _ => {}
        }
    }
    if req.authorization.is_none() {
        req.authorization = authorization;
    }
    let non_empty = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
    req.method = method.filter(|m| !m.is_empty()).ok_or(Malformed::MissingPseudoHeader)?;
    let is_connect = req.method == "CONNECT";
    if req.protocol.is_some() && (!is_connect || !extended_connect_enabled) {
        return Err(Malformed::UnexpectedProtocol);
    }
    if is_connect && req.protocol.is_none() {
        // RFC 9114 section 4.4: plain CONNECT has only :method and :authority.
        if req.scheme.is_some() || req.path.is_some() {
            return Err(Malformed::ConnectWithSchemeOrPath);
        }
        if !non_empty(&req.authority) {
            return Err(Malformed::MissingPseudoHeader);
        }
    } else {
        // RFC 9114 section 4.3.1 (all requests but CONNECT) and RFC 9220
        // section 3 / RFC 8441 section 4 (extended CONNECT): :scheme and
        // :path are required and non-empty.
        if !non_empty(&req.scheme) || !non_empty(&req.path) {
            return Err(Malformed::MissingPseudoHeader);
        }
        // Extended CONNECT also needs :authority; other methods may use
        // host instead.
        if req.protocol.is_some() && !non_empty(&req.authority) {
            return Err(Malformed::MissingPseudoHeader);
        }
    }
    if has_content_fields && matches!(req.protocol.as_deref(), Some("connect-udp" | "connect-ip")) {
        return Err(Malformed::ContentWithCapsules);
    }
    if let Some(authority) = &req.authority {
        // RFC 9114 section 4.3.1: no userinfo; host must agree.
        if authority.contains('@') || host.as_ref().is_some_and(|h| h != authority) {
            return Err(Malformed::BadAuthority);
        }
    }
    Ok(req)
}

/// A connect-udp request the relay can authorize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectUdp {
    /// `:authority` of the request (the relay's name as the client knows it).
    pub authority: String,
    /// `:path` of the request.
    pub path: String,
    /// The decoded target host.
    pub target_host: TargetHost,
    /// The target port.
    pub target_port: u16,
    /// Credentials from `proxy-authorization` (or `authorization`).
    pub authorization: Option<String>,
}

/// A well-formed request the relay will not serve, with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// Proxy-Status error, for refusals that concern the proxying.
    pub proxy_error: Option<ProxyError>,
    /// Short human-readable reason (Proxy-Status details, logs).
    pub reason: &'static str,
}

impl Refusal {
    const fn new(status: u16, proxy_error: Option<ProxyError>, reason: &'static str) -> Self {
        Self { status, proxy_error, reason }
    }
}

/// Whether a `capsule-protocol` value is the sf-boolean true (`?1`),
/// parameters allowed and ignored (RFC 9297 section 3.4).
pub fn capsule_protocol_is_true(value: &str) -> bool {
    let item = value.split(';').next().unwrap_or("").trim();
    item == "?1"
}

/// Decides what to do with a well-formed request: a connect-udp tunnel to
/// authorize, or a refusal with its status.
///
/// - not CONNECT: 405 (this server only proxies);
/// - plain CONNECT (TCP): 501 until the TCP front exists;
/// - extended CONNECT with another `:protocol`: 501;
/// - `:scheme` other than https: 400 (RFC 9298 section 3 builds the URI
///   from an https template);
/// - `:path` not matching the template: 404;
/// - invalid `target_host`/`target_port`: 400 (RFC 9298 section 2),
///   including the `*` of bound UDP, which needs
///   [`classify_connect_udp_bind`].
pub fn classify_connect_udp(req: &Request, template: &UriTemplate) -> Result<ConnectUdp, Refusal> {
    let path = check_connect_udp(req)?;
    let matched = template.match_path(&path).map_err(match_refusal)?;
    if matched.target_host == "*" || matched.target_port == "*" {
        return Err(Refusal::new(
            400,
            Some(ProxyError::HttpRequestError),
            "a '*' target needs connect-udp-bind",
        ));
    }
    let (target_host, target_port) = parse_udp_target(&matched.target_host, &matched.target_port)?;
    Ok(ConnectUdp {
        authority: req.authority.clone().unwrap_or_default(),
        path,
        target_host,
        target_port,
        authorization: req.authorization.clone(),
    })
}

/// The method, `:protocol` and `:scheme` checks shared by the connect-udp
/// classifiers; returns the `:path`.
fn check_connect_udp(req: &Request) -> Result<String, Refusal> {
    if req.method != "CONNECT" {
        return Err(Refusal::new(405, None, "only CONNECT is served"));
    }
    let Some(protocol) = req.protocol.as_deref() else {
        return Err(Refusal::new(501, None, "TCP CONNECT is not served"));
    };
    if protocol != "connect-udp" {
        return Err(Refusal::new(501, None, "unsupported :protocol"));
    }
    if req.scheme.as_deref() != Some("https") {
        return Err(Refusal::new(400, Some(ProxyError::HttpRequestError), ":scheme must be https"));
    }
    Ok(req.path.clone().unwrap_or_default())
}

fn match_refusal(e: MatchError) -> Refusal {
    match e {
        MatchError::NoMatch => Refusal::new(404, None, "path does not match the URI template"),
        MatchError::BadEncoding => {
            Refusal::new(400, Some(ProxyError::HttpRequestError), "bad percent-encoding")
        }
    }
}

fn parse_udp_target(host: &str, port: &str) -> Result<(TargetHost, u16), Refusal> {
    let bad_target = |e: target::TargetError| {
        Refusal::new(
            400,
            Some(ProxyError::HttpRequestError),
            match e {
                target::TargetError::EmptyHost => "empty target_host",
                target::TargetError::ZoneId => "IPv6 zone IDs are not supported",
                target::TargetError::InvalidHost => "invalid target_host",
                target::TargetError::InvalidPort => "invalid target_port",
            },
        )
    };
    Ok((TargetHost::parse(host).map_err(bad_target)?, target::parse_port(port).map_err(bad_target)?))
}

/// Whether the request asks for bound UDP: its `connect-udp-bind` field is
/// the sf-boolean true ([`crate::bind::bind_requested`]). A repeated field
/// is a List and "MUST be handled as if the field were not present"
/// (draft-ietf-masque-connect-udp-listen-13 section 6).
pub fn request_wants_bind(req: &Request) -> bool {
    req.connect_udp_bind.as_deref().is_some_and(bind_requested)
}

/// A bound UDP request (draft-ietf-masque-connect-udp-listen-13) the relay
/// can authorize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectUdpBind {
    /// `:authority` of the request (the relay's name as the client knows it).
    pub authority: String,
    /// `:path` of the request.
    pub path: String,
    /// The target when the request names one (it "would accept fallback to
    /// unextended UDP proxying to that target", section 2); `None` when both
    /// variables are `*`.
    pub target: Option<(TargetHost, u16)>,
    /// Credentials from `proxy-authorization` (or `authorization`).
    pub authorization: Option<String>,
}

/// Decides what to do with a well-formed connect-udp request that carries
/// `connect-udp-bind: ?1` ([`request_wants_bind`]), with the conventions of
/// [`classify_connect_udp`]. The template variables may both be `*` (sent
/// as `%2A`; a raw `*` is tolerated, see [`UriTemplate::match_bind_path`]):
/// no target. "If only one of the "target_host" and the "target_port"
/// variables is set to the '*' character, the request is malformed. The
/// recipient of such a malformed request MUST respond with an error and
/// SHOULD use the 400 (Bad Request) status code" (section 2): 400.
pub fn classify_connect_udp_bind(req: &Request, template: &UriTemplate) -> Result<ConnectUdpBind, Refusal> {
    let path = check_connect_udp(req)?;
    let matched = template.match_bind_path(&path).map_err(match_refusal)?;
    let target = match (matched.target_host == "*", matched.target_port == "*") {
        (true, true) => None,
        (false, false) => Some(parse_udp_target(&matched.target_host, &matched.target_port)?),
        _ => {
            return Err(Refusal::new(
                400,
                Some(ProxyError::HttpRequestError),
                "only one of target_host and target_port is '*'",
            ));
        }
    };
    Ok(ConnectUdpBind {
        authority: req.authority.clone().unwrap_or_default(),
        path,
        target,
        authorization: req.authorization.clone(),
    })
}

/// A connect-ip request the relay can authorize (RFC 9484 section 4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectIp {
    /// `:authority` of the request (the relay's name as the client knows it).
    pub authority: String,
    /// `:path` of the request.
    pub path: String,
    /// The requested destination scope; [`IpTarget::Host`] still has to be
    /// resolved by control before the response (section 4.1).
    pub target: IpTarget,
    /// The requested protocol scope.
    pub ipproto: IpProto,
    /// Credentials from `proxy-authorization` (or `authorization`).
    pub authorization: Option<String>,
}

impl ConnectIp {
    /// The target as an authorization ask carries it: `*`, `address/len`
    /// or the name to resolve.
    pub fn ask_target(&self) -> String {
        match &self.target {
            IpTarget::Any => "*".to_string(),
            IpTarget::Prefix(p) => format!("{}/{}", p.addr, p.len),
            IpTarget::Host(name) => name.clone(),
        }
    }

    /// The IP protocol as an ask carries it (256: any).
    pub fn ask_ipproto(&self) -> u16 {
        match self.ipproto {
            IpProto::Any => crate::channel::record::IPPROTO_ANY,
            IpProto::Number(n) => u16::from(n),
        }
    }
}

/// Decides what to do with a well-formed request for a connect-ip tunnel,
/// with the same conventions as [`classify_connect_udp`]:
///
/// - not CONNECT: 405; plain CONNECT: 501; another `:protocol`: 501;
/// - `:scheme` other than https: 400;
/// - `:path` not matching the template: 404;
/// - a `target` or `ipproto` that breaks RFC 9484 section 4.6: 400 with
///   `http_request_error`. Section 4.1 calls such a request malformed; RFC
///   9114 section 4.1.2 lets a server answer a malformed request before
///   resetting the stream, which the caller may do after sending the 400;
/// - an `ipproto` naming an IPv6 extension header: 400 (section 4.8: "IP
///   proxies MAY reject requests to scope to protocol numbers that are used
///   for extension headers"; after the extension header walk no packet could
///   match such a scope, and 0 would read as "any protocol" in a
///   ROUTE_ADVERTISEMENT).
///
/// Like [`classify_connect_udp`], the `capsule-protocol` field is not
/// required: RFC 9484 section 4.4 does not list it among the request's
/// requirements (use [`capsule_protocol_is_true`] for a stricter policy).
pub fn classify_connect_ip(req: &Request, template: &IpUriTemplate) -> Result<ConnectIp, Refusal> {
    if req.method != "CONNECT" {
        return Err(Refusal::new(405, None, "only CONNECT is served"));
    }
    let Some(protocol) = req.protocol.as_deref() else {
        return Err(Refusal::new(501, None, "TCP CONNECT is not served"));
    };
    if protocol != "connect-ip" {
        return Err(Refusal::new(501, None, "unsupported :protocol"));
    }
    if req.scheme.as_deref() != Some("https") {
        return Err(Refusal::new(400, Some(ProxyError::HttpRequestError), ":scheme must be https"));
    }
    let path = req.path.clone().unwrap_or_default();
    let matched = template.match_path(&path).map_err(|e| match e {
        MatchError::NoMatch => Refusal::new(404, None, "path does not match the URI template"),
        MatchError::BadEncoding => {
            Refusal::new(400, Some(ProxyError::HttpRequestError), "bad percent-encoding")
        }
    })?;
    let bad_scope = |e: ScopeError| {
        Refusal::new(
            400,
            Some(ProxyError::HttpRequestError),
            match e {
                ScopeError::EmptyTarget => "empty target",
                ScopeError::ZoneId => "IPv6 zone IDs are not supported",
                ScopeError::InvalidTarget => "invalid target",
                ScopeError::InvalidPrefixLength => "invalid target prefix length",
                ScopeError::HostBitsSet => "target prefix has host bits set",
                ScopeError::InvalidIpProto => "invalid ipproto",
            },
        )
    };
    let target = scope::parse_target(&matched.target).map_err(bad_scope)?;
    let ipproto = scope::parse_ipproto(&matched.ipproto).map_err(bad_scope)?;
    if let IpProto::Number(n) = ipproto
        && is_extension_header(n)
    {
        return Err(Refusal::new(
            400,
            Some(ProxyError::HttpRequestError),
            "ipproto names an IPv6 extension header",
        ));
    }
    Ok(ConnectIp {
        authority: req.authority.clone().unwrap_or_default(),
        path,
        target,
        ipproto,
        authorization: req.authorization.clone(),
    })
}

/// A classic CONNECT to a TCP target (RFC 9110 section 9.3.6, RFC 9114
/// section 4.4, RFC 9113 section 8.5): the `:authority` names the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTcp {
    /// The target host.
    pub target_host: TargetHost,
    /// The target port.
    pub target_port: u16,
    /// Credentials from `proxy-authorization` (or `authorization`).
    pub authorization: Option<String>,
}

/// Classifies a well-formed plain CONNECT (no `:protocol`): its
/// `:authority` must be `host:port` (RFC 9110 section 9.3.6: "the
/// request-target consists of only the host name and port number"), with
/// an IPv6 literal in brackets, no userinfo and a port in 1..=65535;
/// anything else is 400 with Proxy-Status `http_request_error`.
pub fn classify_connect_tcp(req: &Request) -> Result<ConnectTcp, Refusal> {
    let bad = |reason| Refusal::new(400, Some(ProxyError::HttpRequestError), reason);
    if req.method != "CONNECT" || req.protocol.is_some() {
        return Err(bad("not a plain CONNECT"));
    }
    let authority = req.authority.as_deref().unwrap_or("");
    let (host, port) = split_authority(authority).ok_or(bad("CONNECT needs host:port"))?;
    let (target_host, target_port) = parse_udp_target(host, port)?;
    Ok(ConnectTcp { target_host, target_port, authorization: req.authorization.clone() })
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals); the host keeps its
/// brackets for [`TargetHost::parse`].
pub fn split_authority(authority: &str) -> Option<(&str, &str)> {
    if authority.contains('@') {
        return None;
    }
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let rest = authority[end + 1..].strip_prefix(':')?;
        return Some((&authority[..=end], rest));
    }
    let (host, port) = authority.rsplit_once(':')?;
    (!host.contains(':')).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fields: &[(&str, &str)]) -> Result<Request, Malformed> {
        parse_request(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())), true)
    }

    const GOOD: &[(&str, &str)] = &[
        (":method", "CONNECT"),
        (":protocol", "connect-udp"),
        (":scheme", "https"),
        (":authority", "relay.example:443"),
        (":path", "/.well-known/masque/udp/192.0.2.6/443/"),
        ("capsule-protocol", "?1"),
        ("proxy-authorization", "Bearer abc"),
    ];

    fn with(replace: &str, value: Option<&str>) -> Vec<(&'static str, String)> {
        GOOD.iter()
            .filter_map(|(n, v)| {
                if *n == replace { value.map(|v| (*n, v.to_string())) } else { Some((*n, v.to_string())) }
            })
            .collect()
    }

    fn parse_owned(fields: &[(&str, String)]) -> Result<Request, Malformed> {
        parse_request(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())), true)
    }

    fn template() -> UriTemplate {
        UriTemplate::parse("/.well-known/masque/udp/{target_host}/{target_port}/").unwrap()
    }

    #[test]
    fn good_connect_udp() {
        let req = parse(GOOD).unwrap();
        assert!(capsule_protocol_is_true(req.capsule_protocol.as_deref().unwrap()));
        let c = classify_connect_udp(&req, &template()).unwrap();
        assert_eq!(c.target_port, 443);
        assert_eq!(c.target_host, TargetHost::Ip("192.0.2.6".parse().unwrap()));
        assert_eq!(c.authorization.as_deref(), Some("Bearer abc"));
    }

    #[test]
    fn missing_pseudo_headers_are_malformed() {
        for name in [":method", ":scheme", ":authority", ":path"] {
            assert_eq!(parse_owned(&with(name, None)), Err(Malformed::MissingPseudoHeader), "{name}");
            assert!(parse_owned(&with(name, Some(""))).is_err(), "empty {name}");
        }
    }

    #[test]
    fn websocket_fields_are_kept_and_a_key_ignored() {
        let mut f = with("x", None);
        for (n, v) in [
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat"),
            ("sec-websocket-protocol", "superchat"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("origin", "https://app.example"),
        ] {
            f.push((n, v.into()));
        }
        let r = parse_owned(&f).unwrap();
        assert_eq!(r.websocket.version.as_deref(), Some("13"));
        assert_eq!(r.websocket.protocol.as_deref(), Some("chat, superchat"));
        assert_eq!(r.websocket.extensions.as_deref(), Some("permessage-deflate"));
        assert_eq!(r.websocket.origin.as_deref(), Some("https://app.example"));
        // RFC 8441 section 5: extended CONNECT does not use the key.
        assert_eq!(r.websocket.key, None);
        // Repeated lines stay bounded.
        let mut f = with("x", None);
        let long = "p".repeat(MAX_FIELD_VALUE_LEN);
        f.push(("sec-websocket-protocol", long.clone()));
        f.push(("sec-websocket-protocol", long));
        assert_eq!(parse_owned(&f), Err(Malformed::InvalidFieldValue));
    }

    #[test]
    fn field_rules() {
        let mut f = with("x", None);
        f.push(("X-Upper", "1".into()));
        assert_eq!(parse_owned(&f), Err(Malformed::InvalidFieldName));
        let mut f = with("x", None);
        f.push((":foo", "1".into()));
        assert_eq!(parse_owned(&f), Err(Malformed::PseudoHeaderAfterField));
        let mut f = vec![(":foo", "1".to_string())];
        f.extend(with("x", None));
        assert_eq!(parse_owned(&f), Err(Malformed::UnknownPseudoHeader));
        let mut f = vec![(":status", "200".to_string())];
        f.extend(with("x", None));
        assert_eq!(parse_owned(&f), Err(Malformed::UnknownPseudoHeader));
        let mut f = vec![(":path", "/".to_string())];
        f.extend(with("x", None));
        assert_eq!(parse_owned(&f), Err(Malformed::DuplicatePseudoHeader));
        for (n, v) in [("connection", "close"), ("upgrade", "x"), ("transfer-encoding", "chunked")] {
            let mut f = with("x", None);
            f.push((n, v.into()));
            assert_eq!(parse_owned(&f), Err(Malformed::ConnectionSpecificField), "{n}");
        }
        for n in ["content-length", "content-type"] {
            let mut f = with("x", None);
            f.push((n, "0".into()));
            assert_eq!(parse_owned(&f), Err(Malformed::ContentWithCapsules), "{n}");
        }
        let mut f = with("x", None);
        f.push(("te", "gzip".into()));
        assert_eq!(parse_owned(&f), Err(Malformed::BadTe));
        let mut f = with("x", None);
        f.push(("x-a", "a\r\nb".into()));
        assert_eq!(parse_owned(&f), Err(Malformed::InvalidFieldValue));
        let mut f = with("x", None);
        f.push(("host", "other".into()));
        assert_eq!(parse_owned(&f), Err(Malformed::BadAuthority));
        assert_eq!(parse_owned(&with(":authority", Some("u@relay"))), Err(Malformed::BadAuthority));
    }

    #[test]
    fn protocol_rules() {
        let fields: Vec<_> = GOOD.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect();
        assert_eq!(parse_request(fields, false), Err(Malformed::UnexpectedProtocol));
        assert_eq!(parse_owned(&with(":method", Some("GET"))), Err(Malformed::UnexpectedProtocol));
        // Plain CONNECT: only :method and :authority.
        assert_eq!(
            parse(&[(":method", "CONNECT"), (":authority", "a:1"), (":path", "/")]),
            Err(Malformed::ConnectWithSchemeOrPath)
        );
        let plain = parse(&[(":method", "CONNECT"), (":authority", "a:1")]).unwrap();
        assert_eq!(classify_connect_udp(&plain, &template()).unwrap_err().status, 501);
    }

    #[test]
    fn refusal_statuses() {
        let status = |f: Vec<(&str, String)>| {
            classify_connect_udp(&parse_owned(&f).unwrap(), &template()).unwrap_err().status
        };
        assert_eq!(status(with(":protocol", Some("connect-ip"))), 501);
        assert_eq!(status(with(":scheme", Some("http"))), 400);
        assert_eq!(status(with(":path", Some("/nope"))), 404);
        assert_eq!(status(with(":path", Some("/.well-known/masque/udp/192.0.2.6/0/"))), 400);
        assert_eq!(status(with(":path", Some("/.well-known/masque/udp/192.0.2.6/70000/"))), 400);
        assert_eq!(status(with(":path", Some("/.well-known/masque/udp/fe80%3A%3A1%25eth0/53/"))), 400);
        let get =
            parse(&[(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/")]).unwrap();
        assert_eq!(classify_connect_udp(&get, &template()).unwrap_err().status, 405);
    }

    #[test]
    fn capsule_protocol_values() {
        assert!(capsule_protocol_is_true("?1"));
        assert!(capsule_protocol_is_true("?1;a=b"));
        assert!(!capsule_protocol_is_true("?0"));
        assert!(!capsule_protocol_is_true("1"));
    }

    fn udp_request(path: &str, bind: &[&str]) -> Request {
        let mut f = with(":path", Some(path));
        // Keep pseudo-headers first.
        f.sort_by_key(|(n, _)| !n.starts_with(':'));
        for b in bind {
            f.push(("connect-udp-bind", b.to_string()));
        }
        parse_owned(&f).unwrap()
    }

    #[test]
    fn bind_header() {
        let p = "/.well-known/masque/udp/%2A/%2A/";
        assert!(!request_wants_bind(&udp_request(p, &[])));
        assert!(request_wants_bind(&udp_request(p, &["?1"])));
        assert!(request_wants_bind(&udp_request(p, &["?1;future=1"])));
        assert!(!request_wants_bind(&udp_request(p, &["?0"])));
        assert!(!request_wants_bind(&udp_request(p, &["true"])));
        // Section 6: a repeated field is a List, handled as absent.
        let twice = udp_request(p, &["?1", "?1"]);
        assert_eq!(twice.connect_udp_bind.as_deref(), Some("?1, ?1"));
        assert!(!request_wants_bind(&twice));
        // Joining stays bounded.
        let long = "?1;a=\"".to_string() + &"x".repeat(MAX_FIELD_VALUE_LEN - 8) + "\"";
        let many = udp_request(p, &[long.as_str(), long.as_str(), long.as_str()]);
        assert!(many.connect_udp_bind.as_ref().unwrap().len() <= MAX_FIELD_VALUE_LEN + 2);
        assert!(!request_wants_bind(&many));
    }

    #[test]
    fn connect_tcp_authorities() {
        let req = |authority: &str| Request {
            method: "CONNECT".into(),
            authority: Some(authority.into()),
            authorization: Some("Bearer t".into()),
            ..Request::default()
        };
        let c = classify_connect_tcp(&req("example.com:443")).unwrap();
        assert_eq!(c.target_host, TargetHost::Name("example.com".into()));
        assert_eq!(c.target_port, 443);
        assert_eq!(c.authorization.as_deref(), Some("Bearer t"));
        let c = classify_connect_tcp(&req("[2001:db8::1]:8443")).unwrap();
        assert_eq!(c.target_host, TargetHost::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(classify_connect_tcp(&req("192.0.2.1:22")).unwrap().target_port, 22);
        for bad in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "2001:db8::1:443",
            "[2001:db8::1]",
            "[fe80::1%eth0]:80",
            "user@example.com:443",
            ":443",
            "exa mple.com:443",
            "example.com:+443",
        ] {
            let r = classify_connect_tcp(&req(bad)).unwrap_err();
            assert_eq!(r.status, 400, "{bad}");
            assert_eq!(r.proxy_error, Some(ProxyError::HttpRequestError), "{bad}");
        }
        let mut extended = req("example.com:443");
        extended.protocol = Some("connect-udp".into());
        assert_eq!(classify_connect_tcp(&extended).unwrap_err().status, 400);
    }

    #[test]
    fn bind_classification() {
        let classify = |path: &str| classify_connect_udp_bind(&udp_request(path, &["?1"]), &template());
        // Appendix A.
        let c = classify("/.well-known/masque/udp/%2A/%2A/").unwrap();
        assert_eq!(c.target, None);
        assert_eq!(c.authority, "relay.example:443");
        assert_eq!(c.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(c.path, "/.well-known/masque/udp/%2A/%2A/");
        assert_eq!(classify("/.well-known/masque/udp/%2a/%2a/").unwrap().target, None);
        assert_eq!(classify("/.well-known/masque/udp/*/*/").unwrap().target, None);
        // Section 2: a real target asks for bind with fallback.
        let c = classify("/.well-known/masque/udp/192.0.2.6/443/").unwrap();
        assert_eq!(c.target, Some((TargetHost::Ip("192.0.2.6".parse().unwrap()), 443)));
        let c = classify("/.well-known/masque/udp/Example.com/53/").unwrap();
        assert_eq!(c.target, Some((TargetHost::Name("example.com".into()), 53)));
        let bad = (400, Some(ProxyError::HttpRequestError));
        let refusal = |path: &str| {
            let r = classify(path).unwrap_err();
            (r.status, r.proxy_error)
        };
        // Section 2: exactly one '*' is malformed: 400.
        assert_eq!(refusal("/.well-known/masque/udp/%2A/443/"), bad);
        assert_eq!(refusal("/.well-known/masque/udp/192.0.2.6/%2A/"), bad);
        assert_eq!(refusal("/.well-known/masque/udp/*/443/"), bad);
        assert_eq!(refusal("/.well-known/masque/udp/%2A%2A/%2A/"), bad);
        assert_eq!(refusal("/.well-known/masque/udp/192.0.2.6/0/"), bad);
        assert_eq!(refusal("/.well-known/masque/udp/%zz/1/"), bad);
        assert_eq!(refusal("/nope"), (404, None));
        // Query-form templates carry '*' too.
        let q = UriTemplate::parse("/masque{?target_host,target_port}").unwrap();
        let r = udp_request("/masque?target_host=%2A&target_port=%2A", &["?1"]);
        assert_eq!(classify_connect_udp_bind(&r, &q).unwrap().target, None);
        // The shared checks.
        let mut r = udp_request("/.well-known/masque/udp/%2A/%2A/", &["?1"]);
        r.scheme = Some("http".into());
        assert_eq!(classify_connect_udp_bind(&r, &template()).unwrap_err().status, 400);
        r.protocol = Some("connect-ip".into());
        assert_eq!(classify_connect_udp_bind(&r, &template()).unwrap_err().status, 501);
        r.method = "GET".into();
        assert_eq!(classify_connect_udp_bind(&r, &template()).unwrap_err().status, 405);
    }

    #[test]
    fn unbound_connect_udp_refuses_wildcards() {
        let status =
            |path: &str| classify_connect_udp(&udp_request(path, &[]), &template()).unwrap_err().status;
        assert_eq!(status("/.well-known/masque/udp/%2A/%2A/"), 400);
        assert_eq!(status("/.well-known/masque/udp/%2A/443/"), 400);
        assert_eq!(status("/.well-known/masque/udp/*/*/"), 404);
    }

    fn ip_template() -> IpUriTemplate {
        IpUriTemplate::parse("/.well-known/masque/ip/{target}/{ipproto}/").unwrap()
    }

    fn ip_request(path: &str) -> Request {
        let mut f = with(":protocol", Some("connect-ip"));
        for (n, v) in &mut f {
            if *n == ":path" {
                *v = path.to_string();
            }
        }
        parse_owned(&f).unwrap()
    }

    #[test]
    fn good_connect_ip() {
        // RFC 9484 Figure 4.
        let c = classify_connect_ip(&ip_request("/.well-known/masque/ip/*/*/"), &ip_template()).unwrap();
        assert_eq!((c.target, c.ipproto), (IpTarget::Any, IpProto::Any));
        assert_eq!(c.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(c.authority, "relay.example:443");
        let c = classify_connect_ip(
            &ip_request("/.well-known/masque/ip/2001%3Adb8%3A%3A%2F32/132/"),
            &ip_template(),
        )
        .unwrap();
        assert_eq!(c.target, scope::parse_target("2001:db8::/32").unwrap());
        assert_eq!(c.ipproto, IpProto::Number(132));
        let c = classify_connect_ip(&ip_request("/.well-known/masque/ip/Example.com/17/"), &ip_template())
            .unwrap();
        assert_eq!(c.target, IpTarget::Host("example.com".into()));
        // RFC 9484 section 8.1: a template without variables.
        let vpn = IpUriTemplate::parse("/vpn").unwrap();
        let c = classify_connect_ip(&ip_request("/vpn"), &vpn).unwrap();
        assert_eq!((c.target, c.ipproto), (IpTarget::Any, IpProto::Any));
    }

    #[test]
    fn connect_ip_refusals() {
        let status = |path: &str| {
            let r = classify_connect_ip(&ip_request(path), &ip_template()).unwrap_err();
            (r.status, r.proxy_error)
        };
        let bad = (400, Some(ProxyError::HttpRequestError));
        assert_eq!(status("/nope"), (404, None));
        assert_eq!(status("/.well-known/masque/ip/*/*"), (404, None));
        assert_eq!(status("/.well-known/masque/ip/192.0.2.1%2F24/*/"), bad);
        assert_eq!(status("/.well-known/masque/ip/192.0.2.0%2F33/*/"), bad);
        assert_eq!(status("/.well-known/masque/ip/fe80%3A%3A1%25eth0/*/"), bad);
        assert_eq!(status("/.well-known/masque/ip//*/"), bad);
        assert_eq!(status("/.well-known/masque/ip/*//"), bad);
        assert_eq!(status("/.well-known/masque/ip/*/256/"), bad);
        assert_eq!(status("/.well-known/masque/ip/*/44/"), bad);
        assert_eq!(status("/.well-known/masque/ip/*/0/"), bad);
        assert_eq!(status("/.well-known/masque/ip/%ff/*/"), bad);
        let udp = parse(GOOD).unwrap();
        assert_eq!(classify_connect_ip(&udp, &ip_template()).unwrap_err().status, 501);
        let mut http = ip_request("/.well-known/masque/ip/*/*/");
        http.scheme = Some("http".into());
        assert_eq!(classify_connect_ip(&http, &ip_template()).unwrap_err().status, 400);
        let plain = parse(&[(":method", "CONNECT"), (":authority", "a:1")]).unwrap();
        assert_eq!(classify_connect_ip(&plain, &ip_template()).unwrap_err().status, 501);
        let get =
            parse(&[(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/")]).unwrap();
        assert_eq!(classify_connect_ip(&get, &ip_template()).unwrap_err().status, 405);
        // A connect-ip request with content fields is malformed before
        // classification (RFC 9297 section 3.2).
        let mut f = with(":protocol", Some("connect-ip"));
        f.push(("content-length", "0".into()));
        assert_eq!(parse_owned(&f), Err(Malformed::ContentWithCapsules));
    }
}

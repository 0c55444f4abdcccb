//! HTTP/1.1 request heads for the TCP front: parsing (RFC 9112), message
//! framing (RFC 9112 section 6), classification into the requests the relay
//! serves (CONNECT, the connect-udp / connect-ip Upgrade of RFC 9298 section
//! 3.2 and RFC 9484 section 4.2, WebSocket's of RFC 6455 section 4.2.1, the
//! h2c Upgrade of RFC 7540 section 3.2) and response heads.
//!
//! Sans-IO: the caller accumulates bytes and calls [`parse_request_head`]
//! again until it answers [`Parse::Complete`]; every function here is pure.
//! Line syntax is checked by `httparse` (the parser hyper uses); the rules it
//! leaves to its caller are checked here.
//!
//! Choices where the RFCs leave one:
//! - a single LF is accepted as a line terminator (RFC 9112 section 2.2: "a
//!   recipient MAY recognize a single LF as a line terminator"); a bare CR is
//!   refused (same section: "MUST consider that element to be invalid");
//! - field values must be UTF-8 (obs-text that is not UTF-8 is refused with
//!   400 rather than decoded as ISO-8859-1);
//! - HTTP/1.2 and later minor versions are answered with 505, not processed
//!   as HTTP/1.1 (RFC 9110 section 2.5 says SHOULD process);
//! - the request-target must be visible ASCII without a fragment; other URI
//!   characters are not policed here (the URI template matcher decides);
//! - absolute-form targets must use the http or https scheme;
//! - upgrade tokens (`connect-udp`, `connect-ip`, `websocket`, `h2c`) are matched ASCII
//!   case-insensitively, like the Connection options that name them (RFC 9110
//!   section 7.6.1); a token with a version (`connect-udp/1`) is another
//!   protocol.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::IpAddr;

use crate::request::{Request, WebSocketFields, capsule_protocol_is_true};
use crate::target::{self, TargetError, TargetHost};

/// Bounds on what a request head may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest head, request line to the final empty line included (and the
    /// empty lines tolerated before the request line); longer is 431.
    pub max_head_bytes: usize,
    /// Most field lines; more is 431.
    pub max_fields: usize,
    /// Longest request-target; longer is 414.
    pub max_target_len: usize,
}

impl Default for Limits {
    /// 16 KiB head, 64 fields, 8 KiB request-target.
    fn default() -> Self {
        Self { max_head_bytes: 16 * 1024, max_fields: 64, max_target_len: 8 * 1024 }
    }
}

/// Why a request head is refused, with the status to answer
/// ([`HeadError::status`]). The message is short printable ASCII, fit for
/// Proxy-Status details and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HeadError {
    /// The head did not end within `max_head_bytes` (431).
    #[error("request head too large")]
    HeadTooLarge,
    /// More than `max_fields` field lines (431).
    #[error("too many header fields")]
    TooManyFields,
    /// The request-target is longer than `max_target_len` (414).
    #[error("request-target too long")]
    TargetTooLong,
    /// The method is not a token (RFC 9110 section 9.1) (400).
    #[error("invalid method token")]
    InvalidMethod,
    /// The request-target holds a character outside visible ASCII or a
    /// fragment, or is not a valid absolute URI (RFC 9112 section 3.2) (400).
    #[error("invalid request-target")]
    InvalidTarget,
    /// An absolute-form target with a scheme other than http or https (400).
    #[error("request-target scheme is not http or https")]
    UnsupportedScheme,
    /// An absolute-form target with userinfo (RFC 9110 section 4.2.4: "treat
    /// its presence as an error") (400).
    #[error("userinfo in the request-target")]
    TargetUserinfo,
    /// The request line is not `method SP request-target SP HTTP-version`
    /// (RFC 9112 section 3) (400).
    #[error("malformed request line")]
    MalformedRequestLine,
    /// A well-formed HTTP-version other than 1.0 and 1.1 (505).
    #[error("HTTP version not supported")]
    UnsupportedVersion,
    /// A CR not followed by LF (RFC 9112 section 2.2) (400).
    #[error("bare CR in the request head")]
    BareCr,
    /// A field line starting with whitespace: obs-fold, which RFC 9112
    /// section 5.2 lets a server reject with 400 (400).
    #[error("obsolete line folding")]
    ObsFold,
    /// Whitespace between a field name and its colon (RFC 9112 section 5.1:
    /// "MUST reject ... with a response status code of 400") (400).
    #[error("whitespace before a field colon")]
    WhitespaceBeforeColon,
    /// A field name that is not a token, or a field line without a colon
    /// (400).
    #[error("invalid field name")]
    InvalidFieldName,
    /// A field value with NUL or another control character (RFC 9110
    /// section 5.5) (400).
    #[error("control character in a field value")]
    InvalidFieldValue,
    /// A field value that is not UTF-8 (400).
    #[error("field value is not UTF-8")]
    NonUtf8FieldValue,
    /// Transfer-Encoding and Content-Length together (RFC 9112 section 6.1:
    /// a server "MAY reject such a request") (400).
    #[error("Transfer-Encoding with Content-Length")]
    TransferEncodingWithContentLength,
    /// Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1: the
    /// framing is faulty) (400).
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingOnHttp10,
    /// Transfer-Encoding that is not a list of codings (400).
    #[error("invalid Transfer-Encoding")]
    InvalidTransferEncoding,
    /// chunked is not the final coding, or appears twice (RFC 9112 section
    /// 6.3: the server "MUST respond with the 400 (Bad Request) status code
    /// and then close the connection") (400).
    #[error("chunked is not the final transfer coding")]
    ChunkedNotFinal,
    /// A transfer coding this relay does not know (RFC 9112 section 6.1:
    /// "SHOULD respond with the 501 (Not Implemented) status code") (501).
    #[error("unknown transfer coding")]
    UnknownTransferCoding,
    /// A Content-Length that is not a decimal number (400).
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// Several Content-Length values that differ (RFC 9112 section 6.3)
    /// (400).
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    /// An HTTP/1.1 request without Host (RFC 9112 section 3.2) (400).
    #[error("missing Host")]
    MissingHost,
    /// More than one Host field line (RFC 9112 section 3.2) (400).
    #[error("more than one Host")]
    DuplicateHost,
    /// A Host value that is not `uri-host [ ":" port ]` (RFC 9112 section
    /// 3.2) (400).
    #[error("invalid Host")]
    InvalidHost,
    /// `*` as the target of a method other than OPTIONS (RFC 9112 section
    /// 3.2.4) (400).
    #[error("'*' request-target is only for OPTIONS")]
    AsteriskNotOptions,
    /// An authority-form target on a method other than CONNECT (RFC 9112
    /// section 3.2.3) (400).
    #[error("authority-form request-target is only for CONNECT")]
    AuthorityFormNotConnect,
    /// A CONNECT target that is not `host:port` (RFC 9112 section 3.2.3, RFC
    /// 9110 section 9.3.6: "a client MUST send a port number") (400).
    #[error("CONNECT target is not host:port")]
    ConnectTargetNotAuthority,
    /// A CONNECT target host that is neither a DNS name nor an IP literal
    /// (400).
    #[error("CONNECT target host is not a DNS name or IP literal")]
    ConnectTargetHost,
    /// A CONNECT target port outside 1..=65535 (400).
    #[error("CONNECT target port is not in 1..=65535")]
    ConnectTargetPort,
    /// An IPv6 CONNECT target with a zone identifier (400).
    #[error("IPv6 zone identifiers are not supported")]
    ConnectTargetZoneId,
    /// A CONNECT request with content (RFC 9110 section 9.3.6: "A CONNECT
    /// request message does not have content") (400).
    #[error("CONNECT request with content")]
    ConnectWithContent,
    /// An upgrade to a capsule tunnel with a method other than GET (RFC 9298
    /// section 3.2, RFC 9484 section 4.2: "the method SHALL be GET") (400).
    #[error("{0} upgrade needs method GET")]
    TunnelNotGet(UpgradeProtocol),
    /// An upgrade to a capsule tunnel whose target is not a path (400).
    #[error("{0} upgrade needs an origin-form or absolute-form target")]
    TunnelTargetNotPath(UpgradeProtocol),
    /// An upgrade to a capsule tunnel without `Connection: upgrade` (RFC 9298
    /// section 3.2) (400).
    #[error("{0} upgrade without Connection: upgrade")]
    TunnelWithoutConnectionUpgrade(UpgradeProtocol),
    /// An upgrade to a capsule tunnel with Content-Length, Content-Type or
    /// Transfer-Encoding (RFC 9297 section 3.2: "MUST treat the HTTP message
    /// as malformed") (400).
    #[error("{0} upgrade with content framing fields")]
    TunnelWithContent(UpgradeProtocol),
    /// Capsule-Protocol present but not the sf-boolean true (RFC 9297 section
    /// 3.4) (400).
    #[error("{0} upgrade with Capsule-Protocol other than ?1")]
    BadCapsuleProtocol(UpgradeProtocol),
}

impl HeadError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::HeadTooLarge | HeadError::TooManyFields => 431,
            HeadError::TargetTooLong => 414,
            HeadError::UnsupportedVersion => 505,
            HeadError::UnknownTransferCoding => 501,
            _ => 400,
        }
    }
}

/// The outcome of [`parse_request_head`] on the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// The head is incomplete: read more and call again with all the bytes.
    Partial,
    /// A complete head and its length in bytes: any empty lines before the
    /// request line, the request line, the field lines and the final empty
    /// line. What follows is the body or the upgraded protocol.
    Complete(RequestHead, usize),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method (case-sensitive, RFC 9110 section 9.1).
    pub method: String,
    /// The raw request-target.
    pub target: String,
    /// The minor HTTP version: 0 or 1.
    pub minor_version: u8,
    /// Field lines in order: names lowercased, values with surrounding
    /// whitespace trimmed.
    pub fields: Vec<(String, String)>,
}

/// How the request's body is framed (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Neither Transfer-Encoding nor Content-Length: no body.
    None,
    /// Content-Length (which may be 0).
    Length(u64),
    /// Transfer-Encoding ending in chunked.
    Chunked,
}

/// The upgrade tokens this relay serves: the capsule-protocol tunnels and
/// WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpgradeProtocol {
    /// `connect-udp` (RFC 9298).
    ConnectUdp,
    /// `connect-ip` (RFC 9484).
    ConnectIp,
    /// `websocket` (RFC 6455 section 4.2.1), relayed to an upstream origin.
    WebSocket,
}

impl UpgradeProtocol {
    /// The upgrade token, also the `:protocol` of the extended CONNECT.
    pub fn token(&self) -> &'static str {
        match self {
            UpgradeProtocol::ConnectUdp => "connect-udp",
            UpgradeProtocol::ConnectIp => "connect-ip",
            UpgradeProtocol::WebSocket => "websocket",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        [UpgradeProtocol::ConnectUdp, UpgradeProtocol::ConnectIp, UpgradeProtocol::WebSocket]
            .into_iter()
            .find(|p| token.eq_ignore_ascii_case(p.token()))
    }
}

impl fmt::Display for UpgradeProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

/// What a well-formed request asks for ([`classify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Classic CONNECT to a TCP target, authority-form (RFC 9112 section
    /// 3.2.3).
    Connect {
        /// The target host: a lowercased DNS name or an IP literal, IPv6
        /// without brackets.
        host: String,
        /// The target port, 1..=65535.
        port: u16,
    },
    /// RFC 9298 section 3.2 / RFC 9484 section 4.2 upgrade to a capsule
    /// tunnel.
    Tunnel {
        /// Which tunnel.
        protocol: UpgradeProtocol,
        /// The path (and query) of the request, starting with '/'.
        path: String,
        /// The Host value, or the authority of an absolute-form target.
        authority: String,
    },
    /// RFC 7540 section 3.2 h2c upgrade (the request itself is then answered
    /// over HTTP/2 on stream 1).
    H2cUpgrade {
        /// The raw HTTP2-Settings value (base64url SETTINGS payload).
        settings: String,
        /// The path (and query) of the request, or `*` for OPTIONS.
        path: String,
        /// The Host value, or the authority of an absolute-form target.
        authority: String,
    },
    /// Any other request (e.g. GET / for a status page).
    Plain {
        /// The path (and query) of the request, or `*` for OPTIONS.
        path: String,
        /// The Host value, or the authority of an absolute-form target;
        /// empty for an HTTP/1.0 request without Host.
        authority: String,
    },
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// Parses a request head from the bytes received so far.
///
/// Only the first `max_head_bytes` bytes are looked at: a head that has not
/// ended there is [`HeadError::HeadTooLarge`] once more bytes are present,
/// [`Parse::Partial`] until then. Empty lines before the request line are
/// skipped (RFC 9112 section 2.2: a server "SHOULD ignore at least one empty
/// line (CRLF) received prior to the request-line") and counted in the
/// returned length.
pub fn parse_request_head(buf: &[u8], limits: &Limits) -> Result<Parse, HeadError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    // A field line takes at least 3 bytes ("a:\n"): no more slots than the
    // window can fill, whatever the configured limit.
    let slots = limits.max_fields.min(window.len() / 3 + 1);
    let mut headers = vec![httparse::EMPTY_HEADER; slots];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return partial(buf, window, limits),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyFields),
        Err(httparse::Error::Version) => {
            return match version_verdict(window) {
                Some(e) => Err(e),
                None => partial(buf, window, limits),
            };
        }
        Err(e) => return Err(diagnose(window, e)),
    };
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version) else {
        // httparse fills all three before it answers Complete.
        return Err(HeadError::MalformedRequestLine);
    };
    if !is_token(method) {
        return Err(HeadError::InvalidMethod);
    }
    if target.len() > limits.max_target_len {
        return Err(HeadError::TargetTooLong);
    }
    // RFC 9112 section 3.2: a request-target is a URI form, which has no
    // fragment and only ASCII (httparse lets obs-text through).
    if !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(HeadError::InvalidTarget);
    }
    let mut fields = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        if !is_token(h.name) {
            return Err(HeadError::InvalidFieldName);
        }
        // RFC 9110 section 5.5: NUL, CR, LF and other controls are invalid
        // (httparse refuses them already; kept here as the contract).
        if h.value.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
            return Err(HeadError::InvalidFieldValue);
        }
        let value = std::str::from_utf8(h.value).map_err(|_| HeadError::NonUtf8FieldValue)?;
        fields.push((h.name.to_ascii_lowercase(), value.trim_matches([' ', '\t']).to_string()));
    }
    Ok(Parse::Complete(
        RequestHead { method: method.to_string(), target: target.to_string(), minor_version, fields },
        len,
    ))
}

/// An incomplete head: still Partial, unless the request-target received so
/// far is already too long or the head has outgrown its limit.
fn partial(buf: &[u8], window: &[u8], limits: &Limits) -> Result<Parse, HeadError> {
    let line = request_line(window);
    if let Some(sp) = line.iter().position(|&b| b == b' ') {
        let rest = &line[sp + 1..];
        let target_len = rest.iter().position(|&b| matches!(b, b' ' | b'\r' | b'\n')).unwrap_or(rest.len());
        if target_len > limits.max_target_len {
            return Err(HeadError::TargetTooLong);
        }
    }
    if buf.len() > limits.max_head_bytes { Err(HeadError::HeadTooLarge) } else { Ok(Parse::Partial) }
}

/// The request line (possibly incomplete, without its line ending) after the
/// tolerated empty lines.
fn request_line(window: &[u8]) -> &[u8] {
    let start = window.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(window.len());
    let rest = &window[start..];
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = &rest[..end];
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// httparse refused the HTTP-version: 505 for a well-formed other version
/// (RFC 9112 section 2.3: `HTTP-name "/" DIGIT "." DIGIT`), 400 for
/// anything else, `None` (Partial) while the line is incomplete and could
/// still become a well-formed version.
fn version_verdict(window: &[u8]) -> Option<HeadError> {
    let start = window.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(window.len());
    let rest = &window[start..];
    let terminated = rest.contains(&b'\n');
    let line = request_line(window);
    if line.contains(&b'\r') {
        return Some(HeadError::BareCr);
    }
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(_), Some(_), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Some(HeadError::MalformedRequestLine);
    };
    const SHAPE: &[u8] = b"HTTP/d.d";
    let fits =
        |i: usize, b: u8| SHAPE.get(i).is_some_and(|&s| if s == b'd' { b.is_ascii_digit() } else { s == b });
    let prefix_ok = version.iter().enumerate().all(|(i, &b)| fits(i, b));
    if !terminated {
        return if prefix_ok && version.len() < SHAPE.len() {
            None
        } else if prefix_ok {
            // The whole version is here; only its line ending is missing.
            Some(HeadError::UnsupportedVersion)
        } else {
            Some(HeadError::MalformedRequestLine)
        };
    }
    if prefix_ok && version.len() == SHAPE.len() {
        Some(HeadError::UnsupportedVersion)
    } else {
        Some(HeadError::MalformedRequestLine)
    }
}

/// Whether a CR is followed by something other than LF (a CR at the very
/// end may still get its LF).
fn has_bare_cr(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n')
}

/// Names the reason for an httparse syntax error by looking at the head, up
/// to its first empty line.
fn diagnose(window: &[u8], e: httparse::Error) -> HeadError {
    let start = window.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(window.len());
    let (leading, rest) = window.split_at(start);
    let end = (0..rest.len())
        .find(|&i| {
            rest[i] == b'\n' && (rest[i + 1..].starts_with(b"\n") || rest[i + 1..].starts_with(b"\r\n"))
        })
        .map_or(rest.len(), |i| i + 1);
    let head = &rest[..end];
    if has_bare_cr(&window[..leading.len() + end]) {
        return HeadError::BareCr;
    }
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    if matches!(e, httparse::Error::Token | httparse::Error::NewLine) {
        let mut parts = request_line.split(|&b| b == b' ');
        let method = parts.next().unwrap_or_default();
        if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
            return HeadError::InvalidMethod;
        }
        if let Some(target) = parts.next()
            && !target.is_empty()
            && !target.iter().all(u8::is_ascii_graphic)
        {
            return HeadError::InvalidTarget;
        }
        if e == httparse::Error::Token || !head.contains(&b'\n') {
            return HeadError::MalformedRequestLine;
        }
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return HeadError::ObsFold;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return HeadError::InvalidFieldName;
        };
        let name = &line[..colon];
        if name.last().is_some_and(|&b| b == b' ' || b == b'\t') {
            return HeadError::WhitespaceBeforeColon;
        }
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return HeadError::InvalidFieldName;
        }
        if line[colon + 1..].iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
            return HeadError::InvalidFieldValue;
        }
    }
    match e {
        httparse::Error::HeaderName => HeadError::InvalidFieldName,
        httparse::Error::HeaderValue => HeadError::InvalidFieldValue,
        httparse::Error::Token => HeadError::InvalidTarget,
        _ => HeadError::MalformedRequestLine,
    }
}

/// The elements of a comma-separated list field (RFC 9110 section 5.6.1),
/// across its field lines, OWS trimmed, empty elements skipped.
fn list_elements<'a>(head: &'a RequestHead, name: &'a str) -> impl Iterator<Item = &'a str> {
    head.fields_named(name)
        .flat_map(|v| v.split(','))
        .map(|e| e.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty())
}

/// Transfer codings that are registered (RFC 9112 section 7, RFC 9110
/// section 8.4.1). The relay only needs to undo chunked to frame a body; the
/// others are accepted before it and left in the content.
const KNOWN_CODINGS: [&str; 6] = ["chunked", "compress", "deflate", "gzip", "x-compress", "x-gzip"];

impl RequestHead {
    /// The first field line with that name (matched case-insensitively).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every field line with that name (matched case-insensitively), in
    /// order.
    pub fn fields_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.fields.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated list field (Connection, Upgrade) holds the
    /// token, in any of its field lines; tokens are compared
    /// case-insensitively (RFC 9110 section 7.6.1: "Connection options are
    /// case-insensitive").
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        list_elements(self, name).any(|e| e.eq_ignore_ascii_case(token))
    }

    /// Whether the connection persists after this request (RFC 9112 section
    /// 9.3): `close` ends it on any version; HTTP/1.1 persists otherwise,
    /// HTTP/1.0 only with `keep-alive`. A framing error ([`Self::body`])
    /// closes the connection whatever this says.
    pub fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.has_token("connection", "keep-alive")
    }

    /// How the body is framed (RFC 9112 section 6):
    /// - Transfer-Encoding on HTTP/1.0, or with Content-Length: 400 (section
    ///   6.1 allows rejecting the latter; accepting it is how requests are
    ///   smuggled);
    /// - Transfer-Encoding whose final coding is not chunked, or with chunked
    ///   twice: 400 (section 6.3); an unregistered coding: 501 (section 6.1);
    /// - Content-Length: each element 1*DIGIT (a u64), repeated values
    ///   identical (`42, 42` is accepted, RFC 9110 section 8.6), else 400.
    pub fn body(&self) -> Result<Body, HeadError> {
        let has_te = self.field("transfer-encoding").is_some();
        let has_cl = self.field("content-length").is_some();
        if has_te {
            if self.minor_version == 0 {
                return Err(HeadError::TransferEncodingOnHttp10);
            }
            if has_cl {
                return Err(HeadError::TransferEncodingWithContentLength);
            }
            let mut codings = Vec::new();
            for element in list_elements(self, "transfer-encoding") {
                // transfer-coding = token *( OWS ";" OWS transfer-parameter )
                let name = element.split(';').next().unwrap_or("").trim_matches([' ', '\t']);
                if !is_token(name) {
                    return Err(HeadError::InvalidTransferEncoding);
                }
                codings.push(name);
            }
            let Some((last, rest)) = codings.split_last() else {
                return Err(HeadError::InvalidTransferEncoding);
            };
            if !last.eq_ignore_ascii_case("chunked") || rest.iter().any(|c| c.eq_ignore_ascii_case("chunked"))
            {
                return Err(HeadError::ChunkedNotFinal);
            }
            if rest.iter().any(|c| !KNOWN_CODINGS.iter().any(|k| c.eq_ignore_ascii_case(k))) {
                return Err(HeadError::UnknownTransferCoding);
            }
            return Ok(Body::Chunked);
        }
        if !has_cl {
            return Ok(Body::None);
        }
        let mut length = None;
        for value in self.fields_named("content-length") {
            for element in value.split(',') {
                let element = element.trim_matches([' ', '\t']);
                if element.is_empty() || !element.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HeadError::InvalidContentLength);
                }
                let n: u64 = element.parse().map_err(|_| HeadError::InvalidContentLength)?;
                if length.replace(n).is_some_and(|prev| prev != n) {
                    return Err(HeadError::ConflictingContentLength);
                }
            }
        }
        length.map(Body::Length).ok_or(HeadError::InvalidContentLength)
    }

    /// Credentials: `proxy-authorization`, else `authorization`.
    pub fn authorization(&self) -> Option<&str> {
        self.field("proxy-authorization").or_else(|| self.field("authorization"))
    }

    /// A list field's values joined as RFC 9110 section 5.3 combines field
    /// lines; `None` when absent.
    fn combined(&self, name: &str) -> Option<String> {
        let mut values = self.fields_named(name).peekable();
        values.peek()?;
        Some(values.collect::<Vec<_>>().join(", "))
    }
}

/// Whether a Host value is `uri-host [ ":" port ]` (RFC 9112 section 3.2,
/// RFC 3986 section 3.2); an empty value is allowed (a target without
/// authority). IPvFuture literals are refused.
fn valid_host(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let (host_ok, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else { return false };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
        };
        (literal.parse::<std::net::Ipv6Addr>().is_ok(), port)
    } else {
        let (host, port) = match value.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        };
        (!host.is_empty() && valid_reg_name(host), port)
    };
    host_ok && port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// RFC 3986 reg-name: unreserved, pct-encoded and sub-delims.
fn valid_reg_name(host: &str) -> bool {
    let b = host.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            c if c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&c) => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// The request-target forms of RFC 9112 section 3.2, for methods other than
/// CONNECT.
enum Form {
    /// origin-form: the path and query as sent.
    Origin,
    /// absolute-form: the authority and the path (and query) of the URI.
    Absolute { authority: String, path: String },
    /// asterisk-form.
    Asterisk,
    /// Anything else that is not an absolute URI: authority-form.
    Authority,
}

fn target_form(target: &str) -> Result<Form, HeadError> {
    if target.starts_with('/') {
        return Ok(Form::Origin);
    }
    if target == "*" {
        return Ok(Form::Asterisk);
    }
    // absolute-URI = scheme ":" hier-part [ "?" query ]; scheme = ALPHA
    // *( ALPHA / DIGIT / "+" / "-" / "." ).
    let scheme_end = target.find(':');
    let is_scheme = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    let Some(colon) = scheme_end.filter(|&c| is_scheme(&target[..c])) else {
        return Ok(Form::Authority);
    };
    let scheme = &target[..colon];
    let rest = &target[colon + 1..];
    let Some(rest) = rest.strip_prefix("//") else {
        // `host:port` parses as scheme "host" with a path; an http URI
        // without "//" has no authority and is invalid.
        if rest.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Form::Authority);
        }
        return Err(if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
            HeadError::InvalidTarget
        } else {
            HeadError::UnsupportedScheme
        });
    };
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return Err(HeadError::UnsupportedScheme);
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(HeadError::TargetUserinfo);
    }
    // RFC 9110 section 4.2.1: an http URI with an empty host "MUST" be
    // rejected as invalid.
    if authority.is_empty() || authority.starts_with(':') || !valid_host(authority) {
        return Err(HeadError::InvalidTarget);
    }
    // RFC 9112 section 3.2.1: an empty path is sent as "/".
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Ok(Form::Absolute { authority: authority.to_string(), path })
}

/// Splits and validates a CONNECT target (RFC 9112 section 3.2.3:
/// `authority-form = uri-host ":" port`), reusing [`TargetHost::parse`] for
/// the host.
fn connect_target(target: &str) -> Result<(String, u16), HeadError> {
    if target.contains(['@', '/', '?']) {
        return Err(HeadError::ConnectTargetNotAuthority);
    }
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let end = rest.find(']').ok_or(HeadError::ConnectTargetNotAuthority)?;
        let port = rest[end + 1..].strip_prefix(':').ok_or(HeadError::ConnectTargetNotAuthority)?;
        (&target[..end + 2], port)
    } else {
        let (host, port) = target.rsplit_once(':').ok_or(HeadError::ConnectTargetNotAuthority)?;
        if host.contains(':') {
            // An IPv6 literal without brackets.
            return Err(HeadError::ConnectTargetNotAuthority);
        }
        (host, port)
    };
    let port = target::parse_port(port).map_err(|_| HeadError::ConnectTargetPort)?;
    let host = TargetHost::parse(host).map_err(|e| match e {
        TargetError::ZoneId => HeadError::ConnectTargetZoneId,
        TargetError::EmptyHost | TargetError::InvalidHost | TargetError::InvalidPort => {
            HeadError::ConnectTargetHost
        }
    })?;
    let host = match host {
        TargetHost::Ip(IpAddr::V6(v6)) => v6.to_string(),
        TargetHost::Ip(IpAddr::V4(v4)) => v4.to_string(),
        TargetHost::Name(name) => name,
    };
    Ok((host, port))
}

/// Whether a value is base64url without padding (RFC 7540 section 3.2.1:
/// `HTTP2-Settings = token68`, "base64url ... with any trailing '='
/// characters omitted").
fn is_base64url(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decides what a parsed request asks for.
///
/// Checked on every request: the body framing ([`RequestHead::body`]), and
/// Host (RFC 9112 section 3.2: an HTTP/1.1 request needs exactly one; no
/// request may have two; the value must be `uri-host [ ":" port ]`). For an
/// absolute-form target the authority comes from the target and Host is
/// otherwise ignored (section 3.2.2).
///
/// Then, in this order:
/// 1. CONNECT is [`RequestKind::Connect`] to its authority-form target;
///    Upgrade is ignored on CONNECT; content (a non-zero Content-Length or
///    Transfer-Encoding) is 400.
/// 2. On HTTP/1.1 only (RFC 9110 section 7.8: "A server MUST ignore an
///    Upgrade header field that is received in an HTTP/1.0 request"), the
///    first of `connect-udp` / `connect-ip` / `websocket` listed in Upgrade,
///    whatever else is listed beside it (section 7.8 lets the server pick; a
///    client listing several gets the one it listed first), makes a
///    [`RequestKind::Tunnel`], which RFC 9298 section 3.2, RFC 9484 section
///    4.2 and RFC 6455 section 4.1 require to be a GET
///    with `Connection: upgrade`, a path target, no Content-Length,
///    Content-Type or Transfer-Encoding (RFC 9297 section 3.2), and a
///    Capsule-Protocol, if present, that is `?1` (parameters ignored);
///    breaking one of these is a 400 ("malformed", RFC 9298 section 3.2).
///    This wins over an h2c also listed: the client asked for the tunnel,
///    which an HTTP/2 answer to a GET could not give.
/// 3. On HTTP/1.1, `h2c` in Upgrade (an `h2` token is ignored, RFC 7540
///    section 3.2) with exactly one HTTP2-Settings of base64url, Connection
///    holding both `upgrade` and `http2-settings` and no body is
///    [`RequestKind::H2cUpgrade`]. If any of these fails the request is
///    Plain, not an error: RFC 7540 section 3.2.1 says a server "MUST NOT
///    upgrade" without the one HTTP2-Settings, and a server may always
///    ignore Upgrade (RFC 9110 section 7.8); with a body the relay declines
///    to read it before switching.
/// 4. Everything else, including an Upgrade naming only protocols the relay
///    does not know, is [`RequestKind::Plain`]: origin-form, absolute-form,
///    or `*` for OPTIONS only (RFC 9112 section 3.2.4).
pub fn classify(head: &RequestHead) -> Result<RequestKind, HeadError> {
    let body = head.body()?;
    let mut hosts = head.fields_named("host");
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HeadError::DuplicateHost);
    }
    if host.is_none() && head.minor_version >= 1 {
        return Err(HeadError::MissingHost);
    }
    if host.is_some_and(|h| !valid_host(h)) {
        return Err(HeadError::InvalidHost);
    }
    let no_content = matches!(body, Body::None | Body::Length(0));
    if head.method == "CONNECT" {
        if !no_content {
            return Err(HeadError::ConnectWithContent);
        }
        let (host, port) = connect_target(&head.target)?;
        return Ok(RequestKind::Connect { host, port });
    }
    let form = target_form(&head.target)?;
    let host = host.unwrap_or("");
    let (path, authority) = match &form {
        Form::Origin => (Some(head.target.as_str()), host),
        Form::Absolute { authority, path } => (Some(path.as_str()), authority.as_str()),
        Form::Asterisk | Form::Authority => (None, host),
    };
    if head.minor_version >= 1
        && let Some(protocol) = list_elements(head, "upgrade").find_map(UpgradeProtocol::from_token)
    {
        return tunnel(head, protocol, path, authority);
    }
    let path = match form {
        Form::Origin | Form::Absolute { .. } => path.unwrap_or("/"),
        Form::Asterisk if head.method == "OPTIONS" => "*",
        Form::Asterisk => return Err(HeadError::AsteriskNotOptions),
        Form::Authority => return Err(HeadError::AuthorityFormNotConnect),
    };
    if head.minor_version >= 1
        && no_content
        && head.has_token("upgrade", "h2c")
        && head.has_token("connection", "upgrade")
        && head.has_token("connection", "http2-settings")
    {
        let mut settings = head.fields_named("http2-settings");
        if let (Some(s), None) = (settings.next(), settings.next())
            && is_base64url(s)
        {
            return Ok(RequestKind::H2cUpgrade {
                settings: s.to_string(),
                path: path.to_string(),
                authority: authority.to_string(),
            });
        }
    }
    Ok(RequestKind::Plain { path: path.to_string(), authority: authority.to_string() })
}

/// The checks of RFC 9298 section 3.2 / RFC 9484 section 4.2 on a request
/// whose Upgrade names a capsule tunnel.
fn tunnel(
    head: &RequestHead,
    protocol: UpgradeProtocol,
    path: Option<&str>,
    authority: &str,
) -> Result<RequestKind, HeadError> {
    if head.method != "GET" {
        return Err(HeadError::TunnelNotGet(protocol));
    }
    let path = path.ok_or(HeadError::TunnelTargetNotPath(protocol))?;
    // "the request SHALL include a Connection header field with value
    // "Upgrade" (note that this requirement is case-insensitive ...)".
    if !head.has_token("connection", "upgrade") {
        return Err(HeadError::TunnelWithoutConnectionUpgrade(protocol));
    }
    if ["content-length", "content-type", "transfer-encoding"].iter().any(|n| head.field(n).is_some()) {
        return Err(HeadError::TunnelWithContent(protocol));
    }
    // Repeated field lines combine into a list, which is no sf-boolean.
    if head.combined("capsule-protocol").is_some_and(|v| !capsule_protocol_is_true(&v)) {
        return Err(HeadError::BadCapsuleProtocol(protocol));
    }
    Ok(RequestKind::Tunnel { protocol, path: path.to_string(), authority: authority.to_string() })
}

/// Converts an upgrade tunnel request into the same [`Request`] the HTTP/3
/// path classifies (method "CONNECT", scheme "https", `authority`, `path`,
/// protocol = the token, authorization ([`RequestHead::authorization`]),
/// capsule_protocol and connect_udp_bind from their fields, repeated lines
/// joined with ", "), so that [`crate::request::classify_connect_udp`],
/// [`crate::request::classify_connect_udp_bind`] and
/// [`crate::request::classify_connect_ip`] apply the URI template and target
/// rules unchanged.
pub fn to_extended_connect(
    head: &RequestHead,
    protocol: UpgradeProtocol,
    path: &str,
    authority: &str,
) -> Request {
    Request {
        method: "CONNECT".to_string(),
        scheme: Some("https".to_string()),
        authority: Some(authority.to_string()),
        path: Some(path.to_string()),
        protocol: Some(protocol.token().to_string()),
        authorization: head.authorization().map(str::to_string),
        capsule_protocol: head.combined("capsule-protocol"),
        connect_udp_bind: head.combined("connect-udp-bind"),
        websocket: WebSocketFields {
            version: head.combined("sec-websocket-version"),
            key: head.combined("sec-websocket-key"),
            protocol: head.combined("sec-websocket-protocol"),
            extensions: head.combined("sec-websocket-extensions"),
            origin: head.combined("origin"),
        },
        // WebTransport is not an HTTP/1.1 upgrade token.
        wt_available_protocols: None,
        http1_upgrade: true,
    }
}

/// Writes a response head: `HTTP/1.1 <status> <reason>\r\n`, each field
/// `name: value\r\n`, then `\r\n`.
///
/// Names are the caller's constants and must be tokens; a field whose name
/// is not is skipped. CR, LF and NUL in a value are replaced by SP (RFC 9110
/// section 5.5 allows that replacement), so no value can inject a line.
pub fn write_response_head(out: &mut Vec<u8>, status: u16, fields: &[(&str, &str)]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in fields {
        debug_assert!(is_token(name), "invalid response field name {name:?}");
        if !is_token(name) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend(value.bytes().map(|b| if matches!(b, b'\r' | b'\n' | 0) { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase for a status code (RFC 9110 section 15, plus RFC 6585,
/// RFC 8297, RFC 8470 and RFC 7725 for the codes they define); "" for codes
/// without one.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        511 => "Network Authentication Required",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{classify_connect_ip, classify_connect_udp, classify_connect_udp_bind};
    use crate::template::{IpUriTemplate, UriTemplate};

    const UDP: &str = "GET /.well-known/masque/udp/192.0.2.6/443/ HTTP/1.1\r\n\
        Host: relay.example:443\r\n\
        Connection: Upgrade\r\n\
        Upgrade: connect-udp\r\n\
        Capsule-Protocol: ?1\r\n\
        Proxy-Authorization: Bearer abc\r\n\
        \r\n";

    fn parse(s: &str) -> Result<Parse, HeadError> {
        parse_request_head(s.as_bytes(), &Limits::default())
    }

    fn head(s: &str) -> RequestHead {
        match parse(s) {
            Ok(Parse::Complete(h, n)) => {
                assert_eq!(n, s.len(), "{s:?}");
                h
            }
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn err(s: &str) -> HeadError {
        match parse(s) {
            Err(e) => e,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    /// A request with the given request line and field lines.
    fn req(line: &str, fields: &[&str]) -> String {
        let mut s = format!("{line}\r\n");
        for f in fields {
            s.push_str(f);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s
    }

    fn kind(line: &str, fields: &[&str]) -> Result<RequestKind, HeadError> {
        classify(&head(&req(line, fields)))
    }

    #[test]
    fn parses_a_head() {
        let s = "GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Mixed-Case:  v 1 \t\r\nx-empty:\r\nHost2: y\r\n\r\nBODY";
        let Ok(Parse::Complete(h, n)) = parse(s) else { panic!() };
        assert_eq!(&s[n..], "BODY");
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/a?b=c");
        assert_eq!(h.minor_version, 1);
        assert_eq!(
            h.fields,
            [("host", "x"), ("x-mixed-case", "v 1"), ("x-empty", ""), ("host2", "y")]
                .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(h.field("X-MIXED-CASE"), Some("v 1"));
        assert_eq!(h.field("nope"), None);
        assert_eq!(head("GET / HTTP/1.0\r\n\r\n").minor_version, 0);
        // RFC 9112 section 2.2: a single LF may end a line.
        assert_eq!(head("GET / HTTP/1.1\nHost: x\n\n").field("host"), Some("x"));
        // UTF-8 beyond ASCII is kept.
        assert_eq!(head("GET / HTTP/1.1\r\nX: caf\u{e9}\r\n\r\n").field("x"), Some("caf\u{e9}"));
    }

    #[test]
    fn every_prefix_is_partial() {
        for s in [UDP, "GET / HTTP/1.1\nHost: x\n\n", "\r\n\r\nCONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n"] {
            for i in 0..s.len() {
                assert_eq!(parse(&s[..i]), Ok(Parse::Partial), "{:?}", &s[..i]);
            }
            head(s);
        }
    }

    #[test]
    fn leading_empty_lines_are_counted() {
        let s = "\r\n\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let h = head(s);
        assert_eq!(h.target, "/");
        let Ok(Parse::Complete(_, n)) = parse(&format!("{s}rest")) else { panic!() };
        assert_eq!(n, s.len());
        assert_eq!(err("\r\rGET / HTTP/1.1\r\n\r\n"), HeadError::BareCr);
        assert_eq!(err("\rGET / HTTP/1.1\r\n\r\n"), HeadError::BareCr);
        assert_eq!(err("\n\rGET / HTTP/1.1\r\n\r\n"), HeadError::BareCr);
    }

    #[test]
    fn head_size_limit() {
        let limits = Limits { max_head_bytes: 64, ..Limits::default() };
        let s = req("GET / HTTP/1.1", &["Host: x", &format!("X: {}", "a".repeat(30))]);
        assert!(s.len() <= 64);
        assert!(matches!(parse_request_head(s.as_bytes(), &limits), Ok(Parse::Complete(..))));
        let big = req("GET / HTTP/1.1", &["Host: x", &format!("X: {}", "a".repeat(60))]);
        // Partial while no more than the limit has arrived, 431 after.
        assert_eq!(parse_request_head(&big.as_bytes()[..64], &limits), Ok(Parse::Partial));
        assert_eq!(parse_request_head(&big.as_bytes()[..65], &limits), Err(HeadError::HeadTooLarge));
        // A complete head longer than the limit is too large as well.
        assert_eq!(parse_request_head(big.as_bytes(), &limits), Err(HeadError::HeadTooLarge));
        // Empty lines count towards it.
        assert_eq!(parse_request_head(&[b'\n'; 65], &limits), Err(HeadError::HeadTooLarge));
        assert_eq!(HeadError::HeadTooLarge.status(), 431);
        let none = Limits { max_head_bytes: 0, ..Limits::default() };
        assert_eq!(parse_request_head(b"", &none), Ok(Parse::Partial));
        assert_eq!(parse_request_head(b"G", &none), Err(HeadError::HeadTooLarge));
    }

    #[test]
    fn field_count_limit() {
        let fields: Vec<String> = (0..64).map(|i| format!("x-{i}: {i}")).collect();
        let refs: Vec<&str> = fields.iter().map(String::as_str).collect();
        assert_eq!(head(&req("GET / HTTP/1.1", &refs)).fields.len(), 64);
        let mut more = refs.clone();
        more.push("host: x");
        let s = req("GET / HTTP/1.1", &more);
        assert_eq!(err(&s), HeadError::TooManyFields);
        assert_eq!(HeadError::TooManyFields.status(), 431);
        // Known as soon as the 65th line is there.
        let cut = s.find("host").unwrap() + "host: x\r\n".len();
        assert_eq!(err(&s[..cut]), HeadError::TooManyFields);
        let limits = Limits { max_fields: 0, ..Limits::default() };
        assert!(matches!(parse_request_head(b"GET / HTTP/1.0\r\n\r\n", &limits), Ok(Parse::Complete(..))));
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.0\r\nA: b\r\n\r\n", &limits),
            Err(HeadError::TooManyFields)
        );
    }

    #[test]
    fn target_length_limit() {
        let limits = Limits { max_target_len: 10, ..Limits::default() };
        let at = |s: &str| parse_request_head(s.as_bytes(), &limits);
        assert!(matches!(at("GET /123456789 HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(Parse::Complete(..))));
        assert_eq!(at("GET /1234567890 HTTP/1.1\r\nHost: x\r\n\r\n"), Err(HeadError::TargetTooLong));
        // Known before the head is complete.
        assert_eq!(at("GET /1234567890"), Err(HeadError::TargetTooLong));
        assert_eq!(at("GET /123456789"), Ok(Parse::Partial));
        assert_eq!(HeadError::TargetTooLong.status(), 414);
    }

    #[test]
    fn syntax_errors() {
        let cases = [
            // RFC 9112 section 5.2: obs-fold.
            ("GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", HeadError::ObsFold),
            ("GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n\tb\r\n\r\n", HeadError::ObsFold),
            ("GET / HTTP/1.1\r\n Host: x\r\n\r\n", HeadError::ObsFold),
            // RFC 9112 section 5.1: no whitespace before the colon.
            ("GET / HTTP/1.1\r\nHost : x\r\n\r\n", HeadError::WhitespaceBeforeColon),
            ("GET / HTTP/1.1\r\nHost\t: x\r\n\r\n", HeadError::WhitespaceBeforeColon),
            ("GET / HTTP/1.1\r\nHo(st: x\r\n\r\n", HeadError::InvalidFieldName),
            ("GET / HTTP/1.1\r\nHost x\r\n\r\n", HeadError::InvalidFieldName),
            ("GET / HTTP/1.1\r\n: x\r\n\r\n", HeadError::InvalidFieldName),
            // RFC 9112 section 2.2: bare CR.
            ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", HeadError::BareCr),
            ("GET / HTTP/1.1\rHost: x\r\n\r\n", HeadError::BareCr),
            ("GET /\r HTTP/1.1\r\n\r\n", HeadError::BareCr),
            ("GET / HTTP/1.1\r\nX: a\r\n\rY: b\r\n\r\n", HeadError::BareCr),
            // RFC 9110 section 5.5: NUL and other controls.
            ("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", HeadError::InvalidFieldValue),
            ("GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", HeadError::InvalidFieldValue),
            ("GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", HeadError::InvalidFieldValue),
            ("G(ET / HTTP/1.1\r\n\r\n", HeadError::InvalidMethod),
            (" GET / HTTP/1.1\r\n\r\n", HeadError::InvalidMethod),
            ("GET /a\x01 HTTP/1.1\r\n\r\n", HeadError::InvalidTarget),
            ("GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n", HeadError::InvalidTarget),
            ("GET  / HTTP/1.1\r\n\r\n", HeadError::MalformedRequestLine),
            ("GET / HTTP/1.1 \r\n\r\n", HeadError::MalformedRequestLine),
            ("GET /\r\n\r\n", HeadError::MalformedRequestLine),
            ("GET / http/1.1\r\n\r\n", HeadError::MalformedRequestLine),
            ("GET / HTTP/1.10\r\n\r\n", HeadError::MalformedRequestLine),
            ("GET / HTTP/x\r\n\r\n", HeadError::MalformedRequestLine),
            // RFC 9112 section 2.3 shape, but not a version served: 505.
            ("GET / HTTP/2.0\r\n\r\n", HeadError::UnsupportedVersion),
            ("GET / HTTP/1.2\r\n\r\n", HeadError::UnsupportedVersion),
            ("GET / HTTP/0.9\r\n\r\n", HeadError::UnsupportedVersion),
        ];
        for (s, want) in cases {
            assert_eq!(err(s), want, "{s:?}");
            assert_eq!(want.status(), if want == HeadError::UnsupportedVersion { 505 } else { 400 });
        }
        let non_utf8 = b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n";
        assert_eq!(parse_request_head(non_utf8, &Limits::default()), Err(HeadError::NonUtf8FieldValue));
        let high = b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n";
        assert_eq!(parse_request_head(high, &Limits::default()), Err(HeadError::InvalidTarget));
        let invalid_utf8 = b"GET /\xff HTTP/1.1\r\n\r\n";
        assert_eq!(parse_request_head(invalid_utf8, &Limits::default()), Err(HeadError::InvalidTarget));
        // A version that may still become well-formed waits for more bytes.
        assert_eq!(parse("GET / HTTP/2"), Ok(Parse::Partial));
        assert_eq!(parse("GET / HTTP/2."), Ok(Parse::Partial));
        assert_eq!(parse("GET / HTTP/2.0"), Err(HeadError::UnsupportedVersion));
        assert_eq!(parse("GET / HTTP/2x"), Err(HeadError::MalformedRequestLine));
    }

    #[test]
    fn tokens_and_keep_alive() {
        let h = head(&req(
            "GET / HTTP/1.1",
            &["Connection: keep-alive, Upgrade", "connection: ,HTTP2-Settings,"],
        ));
        assert!(h.has_token("connection", "upgrade"));
        assert!(h.has_token("Connection", "http2-settings"));
        assert!(h.has_token("connection", "KEEP-ALIVE"));
        assert!(!h.has_token("connection", "close"));
        assert!(!h.has_token("connection", "upgrade, http2-settings"));
        assert!(!h.has_token("upgrade", "upgrade"));
        assert_eq!(h.fields_named("connection").count(), 2);
        let ka = |line: &str, fields: &[&str]| head(&req(line, fields)).keep_alive();
        assert!(ka("GET / HTTP/1.1", &[]));
        assert!(!ka("GET / HTTP/1.1", &["Connection: close"]));
        assert!(!ka("GET / HTTP/1.1", &["Connection: keep-alive", "Connection: Close"]));
        assert!(!ka("GET / HTTP/1.0", &[]));
        assert!(ka("GET / HTTP/1.0", &["Connection: Keep-Alive"]));
        assert!(!ka("GET / HTTP/1.0", &["Connection: keep-alive, close"]));
    }

    #[test]
    fn authorization_prefers_proxy_authorization() {
        let h = head(&req("GET / HTTP/1.1", &["Authorization: a", "Proxy-Authorization: p"]));
        assert_eq!(h.authorization(), Some("p"));
        assert_eq!(head(&req("GET / HTTP/1.1", &["Authorization: a"])).authorization(), Some("a"));
        assert_eq!(head(&req("GET / HTTP/1.1", &[])).authorization(), None);
    }

    #[test]
    fn body_framing() {
        let body = |line: &str, fields: &[&str]| head(&req(line, fields)).body();
        let p11 = "POST / HTTP/1.1";
        assert_eq!(body(p11, &[]), Ok(Body::None));
        assert_eq!(body(p11, &["Content-Length: 0"]), Ok(Body::Length(0)));
        assert_eq!(body(p11, &["Content-Length: 42"]), Ok(Body::Length(42)));
        assert_eq!(body(p11, &["Content-Length: 42, 42"]), Ok(Body::Length(42)));
        assert_eq!(body(p11, &["Content-Length: 42", "Content-Length: 42"]), Ok(Body::Length(42)));
        assert_eq!(body(p11, &["Content-Length: 18446744073709551615"]), Ok(Body::Length(u64::MAX)));
        assert_eq!(body(p11, &["Content-Length: 42, 43"]), Err(HeadError::ConflictingContentLength));
        assert_eq!(
            body(p11, &["Content-Length: 1", "Content-Length: 2"]),
            Err(HeadError::ConflictingContentLength)
        );
        for bad in ["", "abc", "-1", "+5", "4 2", "0x10", "42,", "18446744073709551616", "1.0"] {
            let f = format!("Content-Length: {bad}");
            assert_eq!(body(p11, &[&f]), Err(HeadError::InvalidContentLength), "{bad:?}");
        }
        assert_eq!(body(p11, &["Transfer-Encoding: chunked"]), Ok(Body::Chunked));
        assert_eq!(body(p11, &["Transfer-Encoding: Chunked"]), Ok(Body::Chunked));
        assert_eq!(body(p11, &["Transfer-Encoding: gzip, chunked"]), Ok(Body::Chunked));
        assert_eq!(body(p11, &["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"]), Ok(Body::Chunked));
        assert_eq!(
            body(p11, &["Transfer-Encoding: chunked", "Content-Length: 5"]),
            Err(HeadError::TransferEncodingWithContentLength)
        );
        assert_eq!(body(p11, &["Transfer-Encoding: gzip"]), Err(HeadError::ChunkedNotFinal));
        assert_eq!(body(p11, &["Transfer-Encoding: chunked, gzip"]), Err(HeadError::ChunkedNotFinal));
        assert_eq!(body(p11, &["Transfer-Encoding: chunked, chunked"]), Err(HeadError::ChunkedNotFinal));
        assert_eq!(body(p11, &["Transfer-Encoding: foo"]), Err(HeadError::ChunkedNotFinal));
        assert_eq!(body(p11, &["Transfer-Encoding: foo, chunked"]), Err(HeadError::UnknownTransferCoding));
        assert_eq!(HeadError::UnknownTransferCoding.status(), 501);
        assert_eq!(body(p11, &["Transfer-Encoding:"]), Err(HeadError::InvalidTransferEncoding));
        assert_eq!(body(p11, &["Transfer-Encoding: ch(unked"]), Err(HeadError::InvalidTransferEncoding));
        assert_eq!(
            body("POST / HTTP/1.0", &["Transfer-Encoding: chunked"]),
            Err(HeadError::TransferEncodingOnHttp10)
        );
        assert_eq!(body("POST / HTTP/1.0", &["Content-Length: 3"]), Ok(Body::Length(3)));
    }

    #[test]
    fn host_rules() {
        assert_eq!(kind("GET / HTTP/1.1", &[]), Err(HeadError::MissingHost));
        assert_eq!(kind("GET / HTTP/1.1", &["Host: a", "Host: a"]), Err(HeadError::DuplicateHost));
        assert_eq!(kind("GET / HTTP/1.0", &["Host: a", "Host: b"]), Err(HeadError::DuplicateHost));
        for bad in ["a b", "a/b", "[::1", "[::1]x", "[v1.x]", "a:b", ":80", "a@b", "%zz"] {
            let f = format!("Host: {bad}");
            assert_eq!(kind("GET / HTTP/1.1", &[&f]), Err(HeadError::InvalidHost), "{bad:?}");
        }
        let plain = |path: &str, authority: &str| {
            Ok(RequestKind::Plain { path: path.to_string(), authority: authority.to_string() })
        };
        for good in ["", "relay.example", "relay.example:443", "[2001:db8::1]:8443", "192.0.2.1", "a:"] {
            let f = format!("Host: {good}");
            assert_eq!(kind("GET / HTTP/1.1", &[&f]), plain("/", good), "{good:?}");
        }
        assert_eq!(kind("GET /status HTTP/1.0", &[]), plain("/status", ""));
        // Section 3.2.2: absolute-form takes its authority from the target;
        // Host is still required on HTTP/1.1.
        assert_eq!(
            kind("GET http://a.example:8080/p?q HTTP/1.1", &["Host: b"]),
            plain("/p?q", "a.example:8080")
        );
        assert_eq!(kind("GET HTTPS://a.example?q HTTP/1.1", &["Host: a"]), plain("/?q", "a.example"));
        assert_eq!(kind("GET http://a.example HTTP/1.0", &[]), plain("/", "a.example"));
        assert_eq!(kind("GET http://a.example/ HTTP/1.1", &[]), Err(HeadError::MissingHost));
    }

    #[test]
    fn target_forms() {
        let h = ["Host: a"];
        assert_eq!(
            kind("OPTIONS * HTTP/1.1", &h),
            Ok(RequestKind::Plain { path: "*".into(), authority: "a".into() })
        );
        assert_eq!(kind("GET * HTTP/1.1", &h), Err(HeadError::AsteriskNotOptions));
        assert_eq!(kind("GET a:443 HTTP/1.1", &h), Err(HeadError::AuthorityFormNotConnect));
        assert_eq!(kind("GET [::1]:443 HTTP/1.1", &h), Err(HeadError::AuthorityFormNotConnect));
        assert_eq!(kind("GET ftp://a/ HTTP/1.1", &h), Err(HeadError::UnsupportedScheme));
        assert_eq!(kind("GET urn:x HTTP/1.1", &h), Err(HeadError::UnsupportedScheme));
        assert_eq!(kind("GET http://u@a/ HTTP/1.1", &h), Err(HeadError::TargetUserinfo));
        assert_eq!(kind("GET http:///p HTTP/1.1", &h), Err(HeadError::InvalidTarget));
        assert_eq!(kind("GET http:/p HTTP/1.1", &h), Err(HeadError::InvalidTarget));
        assert_eq!(err("GET http://a b/ HTTP/1.1\r\nHost: a\r\n\r\n"), HeadError::MalformedRequestLine);
    }

    #[test]
    fn connect_targets() {
        let connect = |target: &str| kind(&format!("CONNECT {target} HTTP/1.1"), &["Host: proxy.example"]);
        let ok = |host: &str, port: u16| Ok(RequestKind::Connect { host: host.to_string(), port });
        assert_eq!(connect("example.com:443"), ok("example.com", 443));
        assert_eq!(connect("Example.COM.:443"), ok("example.com", 443));
        assert_eq!(connect("192.0.2.1:22"), ok("192.0.2.1", 22));
        assert_eq!(connect("[2001:db8::1]:8443"), ok("2001:db8::1", 8443));
        assert_eq!(connect("[2001:DB8:0::1]:1"), ok("2001:db8::1", 1));
        assert_eq!(connect("example.com:65535"), ok("example.com", 65535));
        let not_authority = [
            "example.com",
            "[2001:db8::1]",
            "2001:db8::1:443",
            "user@example.com:443",
            "/path",
            "http://example.com:443/",
            "[2001:db8::1]443",
        ];
        for bad in not_authority {
            assert_eq!(connect(bad), Err(HeadError::ConnectTargetNotAuthority), "{bad}");
        }
        for bad in ["example.com:", "example.com:0", "example.com:65536", "example.com:+443", "a:44x"] {
            assert_eq!(connect(bad), Err(HeadError::ConnectTargetPort), "{bad}");
        }
        for bad in [":443", "exa_mple..com:443", "[1.2.3.4]:443", "[v1.x]:443", "127.1:80", "a%41:80"] {
            assert_eq!(connect(bad), Err(HeadError::ConnectTargetHost), "{bad}");
        }
        assert_eq!(connect("[fe80::1%25eth0]:80"), Err(HeadError::ConnectTargetZoneId));
        // Upgrade is ignored on CONNECT.
        assert_eq!(
            kind(
                "CONNECT a.example:1 HTTP/1.1",
                &["Host: a.example:1", "Connection: upgrade", "Upgrade: connect-udp"]
            ),
            ok("a.example", 1)
        );
        // HTTP/1.0 CONNECT without Host.
        assert_eq!(kind("CONNECT a.example:1 HTTP/1.0", &[]), ok("a.example", 1));
        assert_eq!(kind("CONNECT a.example:1 HTTP/1.1", &[]), Err(HeadError::MissingHost));
        // No content on CONNECT (RFC 9110 section 9.3.6).
        assert_eq!(
            kind("CONNECT a.example:1 HTTP/1.1", &["Host: a", "Content-Length: 0"]),
            ok("a.example", 1)
        );
        assert_eq!(
            kind("CONNECT a.example:1 HTTP/1.1", &["Host: a", "Content-Length: 5"]),
            Err(HeadError::ConnectWithContent)
        );
        assert_eq!(
            kind("CONNECT a.example:1 HTTP/1.1", &["Host: a", "Transfer-Encoding: chunked"]),
            Err(HeadError::ConnectWithContent)
        );
    }

    const UDP_LINE: &str = "GET /.well-known/masque/udp/192.0.2.6/443/ HTTP/1.1";
    const UDP_FIELDS: [&str; 3] = ["Host: relay.example", "Connection: Upgrade", "Upgrade: connect-udp"];

    fn udp_with(extra: &[&str]) -> Result<RequestKind, HeadError> {
        let mut f = UDP_FIELDS.to_vec();
        f.extend_from_slice(extra);
        kind(UDP_LINE, &f)
    }

    fn tunnel(protocol: UpgradeProtocol, path: &str, authority: &str) -> Result<RequestKind, HeadError> {
        Ok(RequestKind::Tunnel { protocol, path: path.to_string(), authority: authority.to_string() })
    }

    const UDP_PATH: &str = "/.well-known/masque/udp/192.0.2.6/443/";

    #[test]
    fn connect_udp_upgrade() {
        use UpgradeProtocol::*;
        assert_eq!(classify(&head(UDP)), tunnel(ConnectUdp, UDP_PATH, "relay.example:443"));
        assert_eq!(udp_with(&[]), tunnel(ConnectUdp, UDP_PATH, "relay.example"));
        // RFC 9297 section 3.4: parameters are ignored.
        assert_eq!(udp_with(&["Capsule-Protocol: ?1;x=y"]), tunnel(ConnectUdp, UDP_PATH, "relay.example"));
        for bad in ["?0", "1", "?1, ?1", "true", ""] {
            let f = format!("Capsule-Protocol: {bad}");
            assert_eq!(udp_with(&[&f]), Err(HeadError::BadCapsuleProtocol(ConnectUdp)), "{bad:?}");
        }
        assert_eq!(
            udp_with(&["Capsule-Protocol: ?1", "Capsule-Protocol: ?1"]),
            Err(HeadError::BadCapsuleProtocol(ConnectUdp))
        );
        // Tokens are case-insensitive; the one we serve is picked from a list.
        let f = ["Host: r", "Connection: keep-alive, UPGRADE", "Upgrade: foo, Connect-UDP"];
        assert_eq!(kind(UDP_LINE, &f), tunnel(ConnectUdp, UDP_PATH, "r"));
        let f = ["Host: r", "Connection: upgrade", "Upgrade: foo", "Upgrade: connect-udp"];
        assert_eq!(kind(UDP_LINE, &f), tunnel(ConnectUdp, UDP_PATH, "r"));
        // WebSocket listed first is the one picked.
        let f = ["Host: r", "Connection: upgrade", "Upgrade: WebSocket, connect-udp"];
        assert_eq!(kind(UDP_LINE, &f), tunnel(WebSocket, UDP_PATH, "r"));
        // Both capsule protocols: the first listed.
        let f = ["Host: r", "Connection: upgrade", "Upgrade: connect-ip, connect-udp"];
        assert_eq!(kind(UDP_LINE, &f), tunnel(ConnectIp, UDP_PATH, "r"));
        // Absolute-form (RFC 9298's own example) takes the target's authority.
        let f = ["Host: relay.example", "Connection: Upgrade", "Upgrade: connect-udp"];
        assert_eq!(
            kind(&format!("GET https://relay.example:4443{UDP_PATH} HTTP/1.1"), &f),
            tunnel(ConnectUdp, UDP_PATH, "relay.example:4443")
        );
        // RFC 9298 section 3.2: the method SHALL be GET.
        for m in ["POST", "PUT", "get", "OPTIONS"] {
            let line = format!("{m} {UDP_PATH} HTTP/1.1");
            let e = kind(&line, &UDP_FIELDS).unwrap_err();
            assert_eq!(e, HeadError::TunnelNotGet(ConnectUdp), "{m}");
            assert_eq!(e.status(), 400);
            assert_eq!(e.to_string(), "connect-udp upgrade needs method GET");
        }
        assert_eq!(kind("GET * HTTP/1.1", &UDP_FIELDS), Err(HeadError::TunnelTargetNotPath(ConnectUdp)));
        assert_eq!(kind("GET a:1 HTTP/1.1", &UDP_FIELDS), Err(HeadError::TunnelTargetNotPath(ConnectUdp)));
        assert_eq!(
            kind(UDP_LINE, &["Host: r", "Upgrade: connect-udp"]),
            Err(HeadError::TunnelWithoutConnectionUpgrade(ConnectUdp))
        );
        assert_eq!(
            kind(UDP_LINE, &["Host: r", "Connection: keep-alive", "Upgrade: connect-udp"]),
            Err(HeadError::TunnelWithoutConnectionUpgrade(ConnectUdp))
        );
        // RFC 9297 section 3.2: no content framing fields at all.
        for f in ["Content-Length: 0", "Content-Length: 4", "Transfer-Encoding: chunked", "Content-Type: a/b"]
        {
            assert_eq!(udp_with(&[f]), Err(HeadError::TunnelWithContent(ConnectUdp)), "{f}");
        }
        // Framing errors come first.
        assert_eq!(
            udp_with(&["Content-Length: 1", "Transfer-Encoding: chunked"]),
            Err(HeadError::TransferEncodingWithContentLength)
        );
        // A versioned token is another protocol: the Upgrade is ignored.
        let f = ["Host: r", "Connection: upgrade", "Upgrade: connect-udp/1"];
        assert_eq!(
            kind(UDP_LINE, &f),
            Ok(RequestKind::Plain { path: UDP_PATH.into(), authority: "r".into() })
        );
        // RFC 9110 section 7.8: Upgrade is ignored on HTTP/1.0, even with POST.
        let line = format!("POST {UDP_PATH} HTTP/1.0");
        assert_eq!(
            kind(&line, &UDP_FIELDS),
            Ok(RequestKind::Plain { path: UDP_PATH.into(), authority: "relay.example".into() })
        );
        // Missing Host on HTTP/1.1 is still 400.
        assert_eq!(
            kind(UDP_LINE, &["Connection: upgrade", "Upgrade: connect-udp"]),
            Err(HeadError::MissingHost)
        );
    }

    #[test]
    fn connect_ip_upgrade() {
        use UpgradeProtocol::*;
        let line = "GET /.well-known/masque/ip/*/*/ HTTP/1.1";
        let f = ["Host: relay.example", "Connection: Upgrade", "Upgrade: connect-ip", "Capsule-Protocol: ?1"];
        assert_eq!(kind(line, &f), tunnel(ConnectIp, "/.well-known/masque/ip/*/*/", "relay.example"));
        assert_eq!(kind("POST /vpn HTTP/1.1", &f), Err(HeadError::TunnelNotGet(ConnectIp)));
        let f = ["Host: relay.example", "Connection: Upgrade", "Upgrade: connect-ip", "Capsule-Protocol: ?0"];
        assert_eq!(kind(line, &f), Err(HeadError::BadCapsuleProtocol(ConnectIp)));
        assert_eq!(ConnectIp.token(), "connect-ip");
        assert_eq!(ConnectUdp.token(), "connect-udp");
    }

    const SETTINGS: &str = "AAMAAABkAAQCAAAAAAIAAAAA";

    #[test]
    fn h2c_upgrade() {
        let s = format!("HTTP2-Settings: {SETTINGS}");
        let base = ["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", s.as_str()];
        let h2c = |path: &str| {
            Ok(RequestKind::H2cUpgrade {
                settings: SETTINGS.into(),
                path: path.into(),
                authority: "a".into(),
            })
        };
        let plain = |path: &str| Ok(RequestKind::Plain { path: path.into(), authority: "a".into() });
        assert_eq!(kind("GET /x HTTP/1.1", &base), h2c("/x"));
        assert_eq!(kind("OPTIONS * HTTP/1.1", &base), h2c("*"));
        assert_eq!(kind("POST /x HTTP/1.1", &[&base[..], &["Content-Length: 0"]].concat()), h2c("/x"));
        // An empty SETTINGS payload is valid.
        let f = ["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings:"];
        assert!(matches!(kind("GET / HTTP/1.1", &f), Ok(RequestKind::H2cUpgrade { .. })));
        // h2c among other tokens.
        let f = ["Host: a", "Connection: upgrade", "Connection: http2-settings", "Upgrade: foo, H2C", &s];
        assert!(matches!(kind("GET / HTTP/1.1", &f), Ok(RequestKind::H2cUpgrade { .. })));
        // Unmet conditions leave a plain request (RFC 7540 section 3.2.1: no
        // upgrade without exactly one HTTP2-Settings).
        let cases: [&[&str]; 8] = [
            &["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c"],
            &["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", &s, &s],
            &["Host: a", "Connection: Upgrade", "Upgrade: h2c", &s],
            &["Host: a", "Connection: HTTP2-Settings", "Upgrade: h2c", &s],
            // "A server MUST ignore an "h2" token in an Upgrade header field".
            &["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2", &s],
            &["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", &s, "Content-Length: 3"],
            &[
                "Host: a",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                &s,
                "Transfer-Encoding: chunked",
            ],
            &["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: a+b/c="],
        ];
        for f in cases {
            assert_eq!(kind("POST /x HTTP/1.1", f), plain("/x"), "{f:?}");
        }
        // Not on HTTP/1.0.
        assert_eq!(kind("GET /x HTTP/1.0", &base), plain("/x"));
        assert_eq!(kind("GET * HTTP/1.1", &base), Err(HeadError::AsteriskNotOptions));
        // connect-udp wins over h2c listed beside it.
        let f = ["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c, connect-udp", &s];
        assert_eq!(kind(UDP_LINE, &f), tunnel(UpgradeProtocol::ConnectUdp, UDP_PATH, "a"));
        let f = ["Host: a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: connect-udp, h2c", &s];
        assert_eq!(kind("POST /x HTTP/1.1", &f), Err(HeadError::TunnelNotGet(UpgradeProtocol::ConnectUdp)));
    }

    #[test]
    fn plain_requests() {
        let plain = |path: &str| Ok(RequestKind::Plain { path: path.into(), authority: "a".into() });
        assert_eq!(kind("GET / HTTP/1.1", &["Host: a"]), plain("/"));
        assert_eq!(
            kind("GET /ws HTTP/1.1", &["Host: a", "Connection: upgrade", "Upgrade: websocket2"]),
            plain("/ws")
        );
        // WebSocket is an upgrade the relay serves (to its upstreams); its
        // fields are carried into the extended-CONNECT form.
        let ws = [
            "Host: a",
            "Connection: upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol: a",
            "Sec-WebSocket-Protocol: b",
            "Origin: https://o.example",
        ];
        assert_eq!(
            kind("GET /ws HTTP/1.1", &ws),
            Ok(RequestKind::Tunnel {
                protocol: UpgradeProtocol::WebSocket,
                path: "/ws".into(),
                authority: "a".into()
            })
        );
        let r =
            to_extended_connect(&head(&req("GET /ws HTTP/1.1", &ws)), UpgradeProtocol::WebSocket, "/ws", "a");
        assert_eq!(r.protocol.as_deref(), Some("websocket"));
        assert_eq!(r.websocket.version.as_deref(), Some("13"));
        assert_eq!(r.websocket.key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(r.websocket.protocol.as_deref(), Some("a, b"));
        assert_eq!(r.websocket.origin.as_deref(), Some("https://o.example"));
        assert_eq!(kind("POST /ws HTTP/1.1", &ws), Err(HeadError::TunnelNotGet(UpgradeProtocol::WebSocket)));
        assert_eq!(kind("POST /x HTTP/1.1", &["Host: a", "Transfer-Encoding: chunked"]), plain("/x"));
        assert_eq!(
            kind("POST /x HTTP/1.1", &["Host: a", "Transfer-Encoding: x, chunked"]),
            Err(HeadError::UnknownTransferCoding)
        );
    }

    #[test]
    fn extended_connect_conversion() {
        let h = head(UDP);
        let RequestKind::Tunnel { protocol, path, authority } = classify(&h).unwrap() else { panic!() };
        let r = to_extended_connect(&h, protocol, &path, &authority);
        assert_eq!(r.method, "CONNECT");
        assert_eq!(r.scheme.as_deref(), Some("https"));
        assert_eq!(r.protocol.as_deref(), Some("connect-udp"));
        assert_eq!(r.authority.as_deref(), Some("relay.example:443"));
        assert_eq!(r.capsule_protocol.as_deref(), Some("?1"));
        assert_eq!(r.connect_udp_bind, None);
        let template = UriTemplate::parse("/.well-known/masque/udp/{target_host}/{target_port}/").unwrap();
        let c = classify_connect_udp(&r, &template).unwrap();
        assert_eq!(c.target_port, 443);
        assert_eq!(c.target_host, TargetHost::Ip("192.0.2.6".parse().unwrap()));
        assert_eq!(c.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(c.authority, "relay.example:443");

        // Bound UDP keeps its field.
        let f = [&UDP_FIELDS[..], &["Connect-UDP-Bind: ?1", "Authorization: Basic x"]].concat();
        let h = head(&req("GET /.well-known/masque/udp/%2A/%2A/ HTTP/1.1", &f));
        let RequestKind::Tunnel { protocol, path, authority } = classify(&h).unwrap() else { panic!() };
        let r = to_extended_connect(&h, protocol, &path, &authority);
        assert!(crate::request::request_wants_bind(&r));
        let b = classify_connect_udp_bind(&r, &template).unwrap();
        assert_eq!(b.target, None);
        assert_eq!(b.authorization.as_deref(), Some("Basic x"));
        assert_eq!(r.capsule_protocol, None);

        // connect-ip.
        let f = ["Host: r", "Connection: upgrade", "Upgrade: connect-ip"];
        let h = head(&req("GET /.well-known/masque/ip/*/*/ HTTP/1.1", &f));
        let RequestKind::Tunnel { protocol, path, authority } = classify(&h).unwrap() else { panic!() };
        let r = to_extended_connect(&h, protocol, &path, &authority);
        let ip = IpUriTemplate::parse("/.well-known/masque/ip/{target}/{ipproto}/").unwrap();
        let c = classify_connect_ip(&r, &ip).unwrap();
        assert_eq!(c.authority, "r");
        // The template rules apply unchanged: a path off the template is 404.
        let r = to_extended_connect(&h, UpgradeProtocol::ConnectIp, "/nope", "r");
        assert_eq!(classify_connect_ip(&r, &ip).unwrap_err().status, 404);
    }

    #[test]
    fn response_heads() {
        let mut out = Vec::new();
        write_response_head(&mut out, 101, &[("Connection", "Upgrade"), ("Upgrade", "connect-udp")]);
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n"
        );
        out.clear();
        write_response_head(&mut out, 599, &[]);
        assert_eq!(out, b"HTTP/1.1 599 \r\n\r\n");
        out.clear();
        write_response_head(&mut out, 400, &[("Proxy-Status", "r; details=\"a\r\nX: y\0\"")]);
        assert_eq!(out, b"HTTP/1.1 400 Bad Request\r\nProxy-Status: r; details=\"a  X: y \"\r\n\r\n");
        // Every error's status has a reason phrase.
        for status in [400, 414, 431, 501, 505, 200, 407, 403, 502, 503, 504] {
            assert!(!reason_phrase(status).is_empty(), "{status}");
        }
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(299), "");
        // And parses back as a head of its own kind.
        out.clear();
        write_response_head(&mut out, 200, &[("Content-Length", "0")]);
        let mut fields = [httparse::EMPTY_HEADER; 4];
        let mut resp = httparse::Response::new(&mut fields);
        assert_eq!(resp.parse(&out), Ok(httparse::Status::Complete(out.len())));
        assert_eq!(resp.code, Some(200));
    }

    #[test]
    fn error_messages_are_printable() {
        let all = [
            HeadError::HeadTooLarge,
            HeadError::TunnelNotGet(UpgradeProtocol::ConnectIp),
            HeadError::BadCapsuleProtocol(UpgradeProtocol::ConnectUdp),
            HeadError::AsteriskNotOptions,
        ];
        for e in all {
            let m = e.to_string();
            assert!(!m.is_empty() && m.bytes().all(|b| (0x20..0x7f).contains(&b)), "{m}");
        }
    }
}

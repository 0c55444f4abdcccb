//! WebSocket's opening handshake as a relay in the middle sees it
//! (sans-IO): the client's side (RFC 6455 section 4.2.1 over HTTP/1.1,
//! extended CONNECT over HTTP/2 and HTTP/3: RFC 8441 section 5, RFC 9220
//! section 3) and the upstream side, where the relay is an RFC 6455 client
//! (section 4.1): the Upgrade request it writes and the checks on the
//! answer.
//!
//! Frames are never parsed here: once both handshakes are done the relay
//! moves the bytes unchanged, so extensions and subprotocols negotiated
//! between the client and the origin stay theirs.
//!
//! SHA-1 (for `Sec-WebSocket-Accept`) is the caller's: this crate holds
//! no cryptography. [`accept_input`] gives the bytes to hash and
//! [`accept_value`] encodes the digest.
#![forbid(unsafe_code)]

use crate::base64url::{base64_decode, base64_encode};
use crate::proxy_status::ProxyError;
use crate::request::WebSocketFields;

/// The only protocol version (RFC 6455 section 4.1, item 9).
pub const VERSION: &str = "13";

/// The GUID `Sec-WebSocket-Accept` hashes with the key (RFC 6455 section
/// 1.3).
pub const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest upstream response head read before giving up.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Most fields in an upstream response head.
const MAX_RESPONSE_FIELDS: usize = 64;

/// Which side of the handshake carried a client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// HTTP/1.1 `GET` with `Upgrade: websocket` (RFC 6455 section 4.1).
    Http1,
    /// Extended CONNECT with `:protocol websocket` (RFC 8441, RFC 9220).
    ExtendedConnect,
}

/// A client's handshake, checked: what the relay passes upstream and, on
/// HTTP/1.1, the key its `101` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandshake {
    /// `Sec-WebSocket-Protocol` as offered (a list of tokens).
    pub protocols: Option<String>,
    /// `Sec-WebSocket-Extensions` as offered.
    pub extensions: Option<String>,
    /// `Origin`, passed on for the origin's own checks.
    pub origin: Option<String>,
    /// HTTP/1.1's `Sec-WebSocket-Key` (its `101` carries the matching
    /// `Sec-WebSocket-Accept`); `None` on extended CONNECT.
    pub key: Option<String>,
}

/// Why a client's handshake is refused, with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No `Sec-WebSocket-Version`, or one other than 13 (RFC 6455 section
    /// 4.2.2 item 4 and section 4.4: 426 with `Sec-WebSocket-Version: 13`
    /// on HTTP/1.1; extended CONNECT has no Upgrade to require, so 400
    /// with the same field).
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    /// HTTP/1.1 without a `Sec-WebSocket-Key` of 16 bytes in base64 (RFC
    /// 6455 section 4.2.1 item 5).
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    Key,
    /// `Sec-WebSocket-Protocol` that is not a list of tokens (RFC 6455
    /// section 4.1 item 10).
    #[error("Sec-WebSocket-Protocol must be a list of tokens")]
    Protocols,
}

impl ClientError {
    /// The status to answer on `carrier`.
    pub fn status(self, carrier: Carrier) -> u16 {
        match (self, carrier) {
            (ClientError::Version, Carrier::Http1) => 426,
            _ => 400,
        }
    }

    /// Whether the answer carries `Sec-WebSocket-Version: 13`.
    pub fn names_version(self) -> bool {
        self == ClientError::Version
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// The elements of a comma-separated list field, trimmed, empty ones
/// skipped (RFC 9110 section 5.6.1).
fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|e| e.trim_matches([' ', '\t'])).filter(|e| !e.is_empty())
}

/// Checks a client's WebSocket fields (the method, `Upgrade`/`Connection`
/// or `:protocol` were checked by the carrier's classification).
pub fn check_client(fields: &WebSocketFields, carrier: Carrier) -> Result<ClientHandshake, ClientError> {
    if fields.version.as_deref().map(|v| v.trim_matches([' ', '\t'])) != Some(VERSION) {
        return Err(ClientError::Version);
    }
    let key = match carrier {
        Carrier::Http1 => {
            let key = fields.key.as_deref().map(|k| k.trim_matches([' ', '\t']));
            match key.and_then(base64_decode) {
                Some(raw) if raw.len() == 16 => key.map(str::to_string),
                _ => return Err(ClientError::Key),
            }
        }
        Carrier::ExtendedConnect => None,
    };
    if let Some(p) = fields.protocol.as_deref()
        && (list(p).next().is_none() || !list(p).all(is_token))
    {
        return Err(ClientError::Protocols);
    }
    Ok(ClientHandshake {
        protocols: fields.protocol.clone(),
        extensions: fields.extensions.clone(),
        origin: fields.origin.clone(),
        key,
    })
}

/// The bytes whose SHA-1 is `Sec-WebSocket-Accept` for `key` (RFC 6455
/// section 4.2.2 item 5.4).
pub fn accept_input(key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(key.len() + ACCEPT_GUID.len());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(ACCEPT_GUID.as_bytes());
    v
}

/// `Sec-WebSocket-Accept` from the SHA-1 of [`accept_input`].
pub fn accept_value(sha1: &[u8; 20]) -> String {
    base64_encode(sha1)
}

/// A fresh `Sec-WebSocket-Key` from 16 random bytes (RFC 6455 section 4.1
/// item 7: "randomly selected").
pub fn key_from_nonce(nonce: &[u8; 16]) -> String {
    base64_encode(nonce)
}

/// Writes the Upgrade request the relay sends upstream (RFC 6455 section
/// 4.1): `GET path`, `Host`, `Upgrade`, `Connection`, the relay's own
/// `Sec-WebSocket-Key`, version 13, and the client's protocols, extensions
/// and Origin. `host` and `path` were checked by the channel's record
/// decoder (visible ASCII); client values passed the carrier's field
/// validation (no CR, LF or NUL).
pub fn write_upgrade_request(out: &mut Vec<u8>, host: &str, path: &str, key: &str, client: &ClientHandshake) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &str, value: &str| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend(value.bytes().map(|b| if matches!(b, b'\r' | b'\n' | 0) { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    };
    line("Host", host);
    line("Upgrade", "websocket");
    line("Connection", "Upgrade");
    line("Sec-WebSocket-Key", key);
    line("Sec-WebSocket-Version", VERSION);
    if let Some(p) = &client.protocols {
        line("Sec-WebSocket-Protocol", p);
    }
    if let Some(e) = &client.extensions {
        line("Sec-WebSocket-Extensions", e);
    }
    if let Some(o) = &client.origin {
        line("Origin", o);
    }
    out.extend_from_slice(b"\r\n");
}

/// What the origin agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    /// Bytes of the response head: what follows is WebSocket data.
    pub head_len: usize,
    /// The subprotocol the origin chose (one the client offered).
    pub protocol: Option<String>,
    /// The extensions the origin accepted (of those offered).
    pub extensions: Option<String>,
}

/// Why the upstream handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The origin answered with another status than 101.
    #[error("the origin answered {0} instead of 101")]
    Refused(u16),
    /// The response head is not HTTP/1.1 (or is larger than
    /// [`MAX_RESPONSE_HEAD`]).
    #[error("malformed response from the origin")]
    Malformed,
    /// A 101 without `Upgrade: websocket` or `Connection: upgrade` (RFC
    /// 6455 section 4.1, items 2 and 3 of the client's checks).
    #[error("the origin's 101 is not a WebSocket upgrade")]
    NotWebSocket,
    /// `Sec-WebSocket-Accept` missing or not the key's (item 4).
    #[error("the origin's Sec-WebSocket-Accept does not match")]
    BadAccept,
    /// An extension the client did not offer (item 5).
    #[error("the origin accepted an extension that was not offered")]
    UnofferedExtension,
    /// A subprotocol the client did not offer (item 6).
    #[error("the origin chose a subprotocol that was not offered")]
    UnofferedProtocol,
    /// An HTTP/2 origin answered the extended CONNECT with a status other
    /// than 2xx (RFC 8441 section 5).
    #[error("the origin answered {0} to the extended CONNECT")]
    RefusedConnect(u16),
    /// An HTTP/2 origin whose SETTINGS do not enable extended CONNECT: the
    /// relay must not send one (RFC 8441 section 3).
    #[error("the origin's HTTP/2 SETTINGS do not enable extended CONNECT (RFC 8441 section 3)")]
    NoExtendedConnect,
    /// The route asks for HTTP/2 and the origin's TLS handshake selected
    /// another protocol (ALPN).
    #[error("the origin did not select h2 by ALPN")]
    NotHttp2,
    /// The HTTP/2 connection or stream to the origin failed before the
    /// answer (a protocol error, a reset, GOAWAY).
    #[error("the origin's HTTP/2 connection failed before the answer")]
    Http2Failed,
    /// The connection ended before the response head did.
    #[error("the origin closed before its response was complete")]
    Incomplete,
    /// No response head in time.
    #[error("the origin did not answer in time")]
    Timeout,
}

impl UpstreamError {
    /// The client's answer: status, Proxy-Status error and the
    /// `received-status` (RFC 9209 section 2.1.2) when the origin sent one.
    pub fn answer(self) -> (u16, ProxyError, Option<u16>) {
        match self {
            UpstreamError::Refused(status) | UpstreamError::RefusedConnect(status) => {
                (502, ProxyError::HttpUpgradeFailed, Some(status))
            }
            UpstreamError::NoExtendedConnect | UpstreamError::NotHttp2 => {
                (502, ProxyError::HttpUpgradeFailed, None)
            }
            UpstreamError::Http2Failed => (502, ProxyError::HttpProtocolError, None),
            UpstreamError::Malformed => (502, ProxyError::HttpProtocolError, None),
            UpstreamError::NotWebSocket
            | UpstreamError::BadAccept
            | UpstreamError::UnofferedExtension
            | UpstreamError::UnofferedProtocol => (502, ProxyError::HttpUpgradeFailed, Some(101)),
            UpstreamError::Incomplete => (502, ProxyError::HttpResponseIncomplete, None),
            UpstreamError::Timeout => (504, ProxyError::HttpResponseTimeout, None),
        }
    }
}

/// Reads the origin's answer to [`write_upgrade_request`] from `buf` (the
/// bytes so far): `Ok(None)` while the head is incomplete. `accept` is the
/// expected `Sec-WebSocket-Accept`, `offered` what the client offered.
pub fn parse_upgrade_response(
    buf: &[u8],
    accept: &str,
    offered: &ClientHandshake,
) -> Result<Option<Upgraded>, UpstreamError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_FIELDS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) | Err(_) => return Err(UpstreamError::Malformed),
    };
    if head_len > MAX_RESPONSE_HEAD || resp.version != Some(1) {
        return Err(UpstreamError::Malformed);
    }
    let status = resp.code.ok_or(UpstreamError::Malformed)?;
    if status != 101 {
        return Err(UpstreamError::Refused(status));
    }
    let values = |name: &str| -> Result<Option<String>, UpstreamError> {
        let mut out: Option<String> = None;
        for h in resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
            let v = std::str::from_utf8(h.value).map_err(|_| UpstreamError::Malformed)?;
            if v.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
                return Err(UpstreamError::Malformed);
            }
            match &mut out {
                None => out = Some(v.to_string()),
                Some(prev) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
            }
        }
        Ok(out)
    };
    let has = |v: &Option<String>, token: &str| {
        v.as_deref().is_some_and(|v| list(v).any(|e| e.eq_ignore_ascii_case(token)))
    };
    let (upgrade, connection) = (values("upgrade")?, values("connection")?);
    if !has(&upgrade, "websocket") || !has(&connection, "upgrade") {
        return Err(UpstreamError::NotWebSocket);
    }
    match values("sec-websocket-accept")? {
        Some(a) if a.trim_matches([' ', '\t']) == accept => {}
        _ => return Err(UpstreamError::BadAccept),
    }
    let (protocol, extensions) =
        check_choice(values("sec-websocket-protocol")?, values("sec-websocket-extensions")?, offered)?;
    Ok(Some(Upgraded { head_len, protocol, extensions }))
}

/// Checks what the origin chose against what the client offered (RFC 6455
/// section 4.1, items 5 and 6; the same rules hold over extended CONNECT,
/// RFC 8441 section 5): every accepted extension was offered, the
/// subprotocol is one of those offered. Gives the subprotocol trimmed and
/// the extensions as written.
fn check_choice(
    protocol: Option<String>,
    extensions: Option<String>,
    offered: &ClientHandshake,
) -> Result<(Option<String>, Option<String>), UpstreamError> {
    if let Some(accepted) = &extensions {
        let offered_names: Vec<&str> =
            offered.extensions.as_deref().map(|o| list(o).map(extension_name).collect()).unwrap_or_default();
        if !list(accepted).all(|e| offered_names.iter().any(|o| o.eq_ignore_ascii_case(extension_name(e)))) {
            return Err(UpstreamError::UnofferedExtension);
        }
    }
    let protocol = protocol.map(|p| p.trim_matches([' ', '\t']).to_string());
    if let Some(chosen) = &protocol {
        let offered_one = offered.protocols.as_deref().is_some_and(|o| list(o).any(|p| p == chosen));
        if !offered_one {
            return Err(UpstreamError::UnofferedProtocol);
        }
    }
    Ok((protocol, extensions))
}

/// The fields of the extended CONNECT the relay sends an HTTP/2 origin
/// (RFC 8441 section 5), besides the pseudo-header fields: version 13 and
/// the client's protocols, extensions and Origin. No `Sec-WebSocket-Key`:
/// extended CONNECT does not use it. Values passed the carrier's field
/// validation (no CR, LF or NUL).
pub fn connect_request_fields(client: &ClientHandshake) -> Vec<(&'static str, &str)> {
    let mut out = vec![("sec-websocket-version", VERSION)];
    if let Some(p) = &client.protocols {
        out.push(("sec-websocket-protocol", p));
    }
    if let Some(e) = &client.extensions {
        out.push(("sec-websocket-extensions", e));
    }
    if let Some(o) = &client.origin {
        out.push(("origin", o));
    }
    out
}

/// Checks an HTTP/2 origin's answer to the extended CONNECT (RFC 8441
/// section 5; RFC 9110 section 9.3.6: any 2xx opens the tunnel). `fields`
/// are the response's (name lower-case, value); repeated ones are joined.
pub fn check_connect_response<'a>(
    status: u16,
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
    offered: &ClientHandshake,
) -> Result<Upgraded, UpstreamError> {
    if !(200..300).contains(&status) {
        return Err(UpstreamError::RefusedConnect(status));
    }
    let (mut protocol, mut extensions): (Option<String>, Option<String>) = (None, None);
    for (name, value) in fields {
        let slot = match name {
            "sec-websocket-protocol" => &mut protocol,
            "sec-websocket-extensions" => &mut extensions,
            _ => continue,
        };
        let v = std::str::from_utf8(value).map_err(|_| UpstreamError::Malformed)?;
        if v.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(UpstreamError::Malformed);
        }
        match slot {
            None => *slot = Some(v.to_string()),
            Some(prev) => {
                prev.push_str(", ");
                prev.push_str(v);
            }
        }
    }
    let (protocol, extensions) = check_choice(protocol, extensions, offered)?;
    Ok(Upgraded { head_len: 0, protocol, extensions })
}

/// An extension's name: what precedes its parameters.
fn extension_name(e: &str) -> &str {
    e.split(';').next().unwrap_or("").trim_matches([' ', '\t'])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 section 1.3's example key and its accept value, with the
    /// SHA-1 computed outside (the digest of key + GUID).
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn fields(version: Option<&str>, key: Option<&str>) -> WebSocketFields {
        WebSocketFields {
            version: version.map(str::to_string),
            key: key.map(str::to_string),
            ..WebSocketFields::default()
        }
    }

    fn offered(protocols: Option<&str>, extensions: Option<&str>) -> ClientHandshake {
        ClientHandshake {
            protocols: protocols.map(str::to_string),
            extensions: extensions.map(str::to_string),
            origin: None,
            key: None,
        }
    }

    #[test]
    fn the_accept_value_encodes_the_digest() {
        // SHA-1("dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11").
        let digest = [
            0xb3, 0x7a, 0x4f, 0x2c, 0xc0, 0x62, 0x4f, 0x16, 0x90, 0xf6, 0x46, 0x06, 0xcf, 0x38, 0x59, 0x45,
            0xb2, 0xbe, 0xc4, 0xea,
        ];
        assert_eq!(accept_value(&digest), ACCEPT);
        assert_eq!(accept_input(KEY), format!("{KEY}{ACCEPT_GUID}").into_bytes());
        assert_eq!(key_from_nonce(b"the sample nonce"), KEY);
    }

    #[test]
    fn client_checks() {
        let h1 = check_client(&fields(Some("13"), Some(KEY)), Carrier::Http1).unwrap();
        assert_eq!(h1.key.as_deref(), Some(KEY));
        let ext = check_client(&fields(Some("13"), Some(KEY)), Carrier::ExtendedConnect).unwrap();
        assert_eq!(ext.key, None, "extended CONNECT uses no key (RFC 8441 section 5)");
        for (f, carrier, err) in [
            (fields(None, Some(KEY)), Carrier::Http1, ClientError::Version),
            (fields(Some("8"), Some(KEY)), Carrier::Http1, ClientError::Version),
            (fields(Some("13, 8"), Some(KEY)), Carrier::Http1, ClientError::Version),
            (fields(None, None), Carrier::ExtendedConnect, ClientError::Version),
            (fields(Some("13"), None), Carrier::Http1, ClientError::Key),
            (fields(Some("13"), Some("c2hvcnQ=")), Carrier::Http1, ClientError::Key),
            (fields(Some("13"), Some("not base64!")), Carrier::Http1, ClientError::Key),
        ] {
            assert_eq!(check_client(&f, carrier), Err(err), "{f:?}");
        }
        assert_eq!(ClientError::Version.status(Carrier::Http1), 426);
        assert_eq!(ClientError::Version.status(Carrier::ExtendedConnect), 400);
        assert_eq!(ClientError::Key.status(Carrier::Http1), 400);
        let mut f = fields(Some("13"), None);
        f.protocol = Some("chat, superchat".into());
        assert_eq!(
            check_client(&f, Carrier::ExtendedConnect).unwrap().protocols.as_deref(),
            Some("chat, superchat")
        );
        f.protocol = Some("chat, \"quoted\"".into());
        assert_eq!(check_client(&f, Carrier::ExtendedConnect), Err(ClientError::Protocols));
        f.protocol = Some(" , ".into());
        assert_eq!(check_client(&f, Carrier::ExtendedConnect), Err(ClientError::Protocols));
    }

    #[test]
    fn the_upgrade_request_carries_the_clients_offer() {
        let mut c = offered(Some("chat"), Some("permessage-deflate"));
        c.origin = Some("https://app.example".into());
        let mut out = Vec::new();
        write_upgrade_request(&mut out, "origin.example:8080", "/chat?room=1", KEY, &c);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "GET /chat?room=1 HTTP/1.1\r\nHost: origin.example:8080\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\nOrigin: https://app.example\r\n\r\n"
        );
        // The request parses as one head that asks for exactly this.
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(text.as_bytes()), Ok(httparse::Status::Complete(n)) if n == text.len()));
    }

    fn response(lines: &[&str]) -> Vec<u8> {
        let mut s = String::new();
        for l in lines {
            s.push_str(l);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }

    #[test]
    fn a_good_101_is_accepted_with_what_follows_it() {
        let accept = format!("Sec-WebSocket-Accept: {ACCEPT}");
        let mut buf = response(&[
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: WebSocket",
            "Connection: keep-alive, Upgrade",
            &accept,
            "Sec-WebSocket-Protocol: chat",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=10",
        ]);
        let head = buf.len();
        buf.extend_from_slice(b"\x81\x02hi");
        let c = offered(Some("superchat, chat"), Some("permessage-deflate; client_max_window_bits"));
        let up = parse_upgrade_response(&buf, ACCEPT, &c).unwrap().unwrap();
        assert_eq!(up.head_len, head);
        assert_eq!(up.protocol.as_deref(), Some("chat"));
        assert_eq!(up.extensions.as_deref(), Some("permessage-deflate; client_max_window_bits=10"));
        // Every prefix of the head is incomplete, not an error.
        for n in 0..head {
            assert_eq!(parse_upgrade_response(&buf[..n], ACCEPT, &c), Ok(None), "{n}");
        }
    }

    #[test]
    fn bad_answers_are_refused_with_their_reason() {
        let accept = format!("Sec-WebSocket-Accept: {ACCEPT}");
        let c = offered(Some("chat"), None);
        let check = |lines: &[&str]| parse_upgrade_response(&response(lines), ACCEPT, &c);
        assert_eq!(check(&["HTTP/1.1 403 Forbidden", "Content-Length: 0"]), Err(UpstreamError::Refused(403)));
        assert_eq!(UpstreamError::Refused(403).answer(), (502, ProxyError::HttpUpgradeFailed, Some(403)));
        assert_eq!(
            check(&["HTTP/1.1 101 OK", "Connection: upgrade", &accept]),
            Err(UpstreamError::NotWebSocket)
        );
        assert_eq!(
            check(&["HTTP/1.1 101 OK", "Upgrade: websocket", &accept]),
            Err(UpstreamError::NotWebSocket)
        );
        assert_eq!(
            check(&["HTTP/1.1 101 OK", "Upgrade: websocket", "Connection: upgrade"]),
            Err(UpstreamError::BadAccept)
        );
        assert_eq!(
            check(&[
                "HTTP/1.1 101 OK",
                "Upgrade: websocket",
                "Connection: upgrade",
                "Sec-WebSocket-Accept: x"
            ]),
            Err(UpstreamError::BadAccept)
        );
        let base = ["HTTP/1.1 101 OK", "Upgrade: websocket", "Connection: upgrade", accept.as_str()];
        let with = |extra: &str| {
            let mut l = base.to_vec();
            l.push(extra);
            check(&l)
        };
        assert_eq!(with("Sec-WebSocket-Protocol: other"), Err(UpstreamError::UnofferedProtocol));
        assert_eq!(
            with("Sec-WebSocket-Extensions: permessage-deflate"),
            Err(UpstreamError::UnofferedExtension)
        );
        assert!(with("Sec-WebSocket-Protocol: chat").unwrap().is_some());
        assert_eq!(check(&["HTTP/1.0 101 OK"]), Err(UpstreamError::Malformed));
        assert_eq!(parse_upgrade_response(b"garbage\r\n\r\n", ACCEPT, &c), Err(UpstreamError::Malformed));
        let huge = vec![b'a'; MAX_RESPONSE_HEAD];
        let mut long = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        long.extend_from_slice(&huge);
        assert_eq!(parse_upgrade_response(&long, ACCEPT, &c), Err(UpstreamError::Malformed));
    }

    #[test]
    fn extended_connect_requests_carry_the_clients_choices_and_no_key() {
        let mut c = offered(Some("chat, superchat"), Some("permessage-deflate"));
        c.origin = Some("https://app.example".into());
        c.key = Some(KEY.into());
        let fields = connect_request_fields(&c);
        assert_eq!(
            fields,
            vec![
                ("sec-websocket-version", "13"),
                ("sec-websocket-protocol", "chat, superchat"),
                ("sec-websocket-extensions", "permessage-deflate"),
                ("origin", "https://app.example"),
            ]
        );
        assert!(connect_request_fields(&offered(None, None)) == vec![("sec-websocket-version", "13")]);
    }

    #[test]
    fn extended_connect_answers_are_checked_like_upgrades() {
        let c = offered(Some("chat, superchat"), Some("permessage-deflate; client_max_window_bits"));
        let check = |status: u16, fields: &[(&'static str, &'static str)]| {
            check_connect_response(status, fields.iter().map(|(n, v)| (*n, v.as_bytes())), &c)
        };
        let up = check(200, &[("sec-websocket-protocol", " superchat "), ("server", "x")]).unwrap();
        assert_eq!((up.head_len, up.protocol.as_deref(), up.extensions), (0, Some("superchat"), None));
        let up = check(204, &[("sec-websocket-extensions", "permessage-deflate")]).unwrap();
        assert_eq!(up.extensions.as_deref(), Some("permessage-deflate"));
        assert_eq!(check(403, &[]), Err(UpstreamError::RefusedConnect(403)));
        assert_eq!(check(101, &[]), Err(UpstreamError::RefusedConnect(101)));
        assert_eq!(check(200, &[("sec-websocket-protocol", "other")]), Err(UpstreamError::UnofferedProtocol));
        assert_eq!(
            check(200, &[("sec-websocket-extensions", "x-zip")]),
            Err(UpstreamError::UnofferedExtension)
        );
        let bad = check_connect_response(200, [("sec-websocket-protocol", &b"\xff"[..])].into_iter(), &c);
        assert_eq!(bad, Err(UpstreamError::Malformed));
        // Repeated fields are one list: each value is checked.
        let two = check(
            200,
            &[("sec-websocket-extensions", "permessage-deflate"), ("sec-websocket-extensions", "x")],
        );
        assert_eq!(two, Err(UpstreamError::UnofferedExtension));
        assert_eq!(
            UpstreamError::RefusedConnect(403).answer(),
            (502, ProxyError::HttpUpgradeFailed, Some(403))
        );
        assert_eq!(UpstreamError::NoExtendedConnect.answer(), (502, ProxyError::HttpUpgradeFailed, None));
        assert_eq!(UpstreamError::Http2Failed.answer(), (502, ProxyError::HttpProtocolError, None));
    }
}

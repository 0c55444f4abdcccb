//! Frame-level shims for the HTTP/2 cleartext ("h2c") Upgrade of RFC 7540
//! section 3.2, deprecated by RFC 9113 section 3.1 but still sent by old
//! clients, plus the cleartext listener's first-bytes sniffing.
//!
//! The relay's HTTP/2 server (the `h2` crate) has no Upgrade support, so the
//! dataplane answers the 101, starts an `h2` server connection on the byte
//! stream and puts these shims around it:
//! - [`encode_response`] builds the relay's own answer to the upgraded
//!   request (stream 1, RFC 7540 section 3.2: "the server ... sends the
//!   response to the request on stream 1");
//! - [`ServerFrameSplice`] puts that answer into the server's output right
//!   after `h2`'s SETTINGS frame, which must be the first frame of the server
//!   connection preface (RFC 9113 section 3.4);
//! - [`ClientFrameFilter`] removes from the client's bytes the frames about
//!   stream 1 that `h2` would reject (it knows nothing of stream 1 and would
//!   treat it as idle, RFC 9113 section 5.1), and takes the connection-level
//!   flow-control window the relay's DATA used out of the client's stream-0
//!   WINDOW_UPDATE increments.
//!
//! [`decode_http2_settings`] reads the HTTP2-Settings field (RFC 7540
//! section 3.2.1), whose values govern stream 1 before any SETTINGS frame.
//! [`sniff`] tells apart prior-knowledge HTTP/2 (RFC 9113 section 3.3), HTTP/1
//! and a TLS client on the cleartext port.
//!
//! Choices where the RFCs leave one:
//! - HTTP2-Settings with trailing `=` padding is refused: RFC 7540 section
//!   3.2.1 says the padding is omitted, and [`crate::http1::classify`] already
//!   refuses such a value, so both layers agree;
//! - the header block is encoded with "literal header field without
//!   indexing, new name" only (RFC 7541 section 6.2.2), never Huffman: it
//!   leaves the peer's dynamic table untouched (that section: "does not add
//!   to the dynamic table"), so `h2`'s own HPACK encoder, which did not see
//!   this block, stays in step with the client's decoder;
//! - a response refuses fields RFC 9113 section 8.2 forbids (connection-
//!   specific fields, pseudo-headers besides `:status`, CR/LF/NUL or edge
//!   whitespace in values) and a field section larger than the peer's
//!   SETTINGS_MAX_HEADER_LIST_SIZE (advisory in section 6.5.2, respected here);
//! - the filter drops RST_STREAM and PRIORITY on stream 1 only when they have
//!   their fixed lengths (4 and 5, RFC 9113 sections 6.4 and 6.3); other
//!   lengths pass, so `h2` answers the FRAME_SIZE_ERROR those sections ask;
//! - inside a header block (after HEADERS or PUSH_PROMISE without
//!   END_HEADERS), the filter passes every frame unchanged: any frame but a
//!   CONTINUATION there is a connection error (RFC 9113 section 6.10) that
//!   `h2` must get to see;
//! - a stream-0 WINDOW_UPDATE whose increment is already 0 passes unchanged
//!   (`h2` answers the PROTOCOL_ERROR of RFC 9113 section 6.9); only one
//!   that the debt brings to 0 is dropped.
#![forbid(unsafe_code)]

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest HTTP2-Settings value [`decode_http2_settings`] reads: 1 KiB of
/// base64url is 128 settings, far more than the 7 defined.
pub const MAX_HTTP2_SETTINGS_LEN: usize = 1024;

/// Length of an HTTP/2 frame header (RFC 9113 section 4.1).
const FRAME_HEADER_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// The reserved bit of stream identifiers and window increments (RFC 9113
/// sections 4.1 and 6.9).
const RESERVED_BIT: u32 = 0x8000_0000;

/// Largest stream-level and connection-level window (RFC 9113 section 6.9.1).
const MAX_WINDOW: u32 = 0x7fff_ffff;

/// SETTINGS_MAX_FRAME_SIZE bounds (RFC 9113 section 6.5.2).
const MIN_MAX_FRAME_SIZE: u32 = 1 << 14;
const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// Initial connection-level window, not changeable by SETTINGS (RFC 9113
/// section 6.9.2).
const INITIAL_CONNECTION_WINDOW: u32 = 65_535;

/// What the first bytes on a cleartext connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sniff {
    /// Not enough bytes to tell yet.
    NeedMore,
    /// The full client connection preface: HTTP/2 with prior knowledge
    /// (RFC 9113 section 3.3).
    H2PriorKnowledge,
    /// Anything else: handed to the HTTP/1.1 parser (which may still find an
    /// h2c Upgrade in it).
    Http1,
    /// A TLS record (handshake content type 0x16, version major 3): a client
    /// speaking TLS to the cleartext port.
    Tls,
}

/// Classifies the first bytes of a cleartext connection.
///
/// [`Sniff::NeedMore`] for empty input, a lone 0x16, or a proper prefix of
/// [`PREFACE`]; [`Sniff::H2PriorKnowledge`] once all 24 bytes of the preface
/// match; [`Sniff::Tls`] for 0x16 followed by 0x03; [`Sniff::Http1`] as soon as
/// a byte differs from the preface otherwise.
pub fn sniff(prefix: &[u8]) -> Sniff {
    match prefix {
        [] | [0x16] => return Sniff::NeedMore,
        [0x16, 0x03, ..] => return Sniff::Tls,
        _ => {}
    }
    let n = prefix.len().min(PREFACE.len());
    if prefix[..n] != PREFACE[..n] {
        Sniff::Http1
    } else if n == PREFACE.len() {
        Sniff::H2PriorKnowledge
    } else {
        Sniff::NeedMore
    }
}

/// SETTINGS values a peer announced (RFC 9113 section 6.5.2), with the
/// protocol defaults for unset ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerSettings {
    /// SETTINGS_HEADER_TABLE_SIZE (0x1), default 4096.
    pub header_table_size: u32,
    /// SETTINGS_ENABLE_PUSH (0x2), default true.
    pub enable_push: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (0x3), default unlimited.
    pub max_concurrent_streams: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE (0x4), default 65535, at most 2^31-1.
    pub initial_window_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE (0x5), default 16384, within
    /// 16384..=16777215.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (0x6), default unlimited.
    pub max_header_list_size: Option<u32>,
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL (0x8, RFC 8441 section 3), default
    /// false.
    pub enable_connect_protocol: bool,
}

impl Default for PeerSettings {
    /// The initial values of RFC 9113 section 6.5.2 (and RFC 8441 section 3).
    fn default() -> Self {
        Self {
            header_table_size: 4096,
            enable_push: true,
            max_concurrent_streams: None,
            initial_window_size: 65_535,
            max_frame_size: MIN_MAX_FRAME_SIZE,
            max_header_list_size: None,
            enable_connect_protocol: false,
        }
    }
}

/// Why an HTTP2-Settings value is refused. Per RFC 7540 section 3.2 the
/// server then does not upgrade (it answers the request over HTTP/1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SettingsError {
    /// Longer than [`MAX_HTTP2_SETTINGS_LEN`] characters.
    #[error("HTTP2-Settings longer than {MAX_HTTP2_SETTINGS_LEN} characters")]
    TooLong,
    /// A character outside the base64url alphabet (RFC 4648 section 5),
    /// whitespace included.
    #[error("HTTP2-Settings has a character outside base64url")]
    InvalidCharacter,
    /// Trailing `=` padding, which RFC 7540 section 3.2.1 says is omitted.
    #[error("HTTP2-Settings has '=' padding")]
    Padding,
    /// A length of 4n+1 characters, which no byte string encodes to.
    #[error("HTTP2-Settings is truncated base64url")]
    Truncated,
    /// The decoded payload is not a whole number of 6-octet settings (RFC
    /// 9113 section 6.5: FRAME_SIZE_ERROR).
    #[error("HTTP2-Settings payload of {0} octets is not a multiple of 6")]
    PayloadLength(usize),
    /// SETTINGS_ENABLE_PUSH other than 0 or 1.
    #[error("SETTINGS_ENABLE_PUSH {0} is not 0 or 1")]
    EnablePush(u32),
    /// SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1.
    #[error("SETTINGS_INITIAL_WINDOW_SIZE {0} exceeds 2^31-1")]
    InitialWindowSize(u32),
    /// SETTINGS_MAX_FRAME_SIZE outside 16384..=16777215.
    #[error("SETTINGS_MAX_FRAME_SIZE {0} outside 16384..=16777215")]
    MaxFrameSize(u32),
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL other than 0 or 1.
    #[error("SETTINGS_ENABLE_CONNECT_PROTOCOL {0} is not 0 or 1")]
    EnableConnectProtocol(u32),
}

/// Decodes an HTTP2-Settings field value: base64url (RFC 4648 section 5)
/// of a SETTINGS frame payload, padding omitted (RFC 7540 section 3.2.1).
///
/// The empty value is an empty payload: all defaults. Unknown identifiers
/// are ignored (RFC 9113 section 6.5.2); a repeated one takes its last
/// value (section 6.5: "the value of a SETTINGS parameter is the last value
/// that is seen"), every occurrence being checked.
pub fn decode_http2_settings(value: &str) -> Result<PeerSettings, SettingsError> {
    if value.len() > MAX_HTTP2_SETTINGS_LEN {
        return Err(SettingsError::TooLong);
    }
    let payload = decode_base64url(value.as_bytes())?;
    decode_settings_payload(&payload)
}

/// Decodes a SETTINGS frame's payload (RFC 9113 section 6.5): whole
/// 6-octet settings, each value in its range, unknown identifiers ignored,
/// a repeated one taking its last value.
pub fn decode_settings_payload(payload: &[u8]) -> Result<PeerSettings, SettingsError> {
    if !payload.len().is_multiple_of(6) {
        return Err(SettingsError::PayloadLength(payload.len()));
    }
    let mut s = PeerSettings::default();
    for setting in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([setting[0], setting[1]]);
        let v = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
        match id {
            0x1 => s.header_table_size = v,
            0x2 => {
                s.enable_push = match v {
                    0 => false,
                    1 => true,
                    _ => return Err(SettingsError::EnablePush(v)),
                }
            }
            0x3 => s.max_concurrent_streams = Some(v),
            0x4 if v > MAX_WINDOW => return Err(SettingsError::InitialWindowSize(v)),
            0x4 => s.initial_window_size = v,
            0x5 if !(MIN_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&v) => {
                return Err(SettingsError::MaxFrameSize(v));
            }
            0x5 => s.max_frame_size = v,
            0x6 => s.max_header_list_size = Some(v),
            0x8 => {
                s.enable_connect_protocol = match v {
                    0 => false,
                    1 => true,
                    _ => return Err(SettingsError::EnableConnectProtocol(v)),
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

/// Why an HTTP/2 server's first frame is not its connection preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PrefaceError {
    /// The first frame is not a SETTINGS frame (RFC 9113 section 3.4: the
    /// server's preface is one, and it comes first).
    #[error("the server's first frame is of type {0:#x}, not SETTINGS")]
    NotSettings(u8),
    /// A SETTINGS frame with the ACK flag, on a stream, or longer than
    /// the client's maximum frame size (section 6.5).
    #[error("the server's first SETTINGS frame is malformed")]
    Malformed,
    /// Its values are out of range.
    #[error("the server's SETTINGS: {0}")]
    Settings(#[from] SettingsError),
}

/// Reads an HTTP/2 server's connection preface from the first bytes it
/// sent (RFC 9113 section 3.4): `Ok(None)` while the first frame is
/// incomplete, else its settings and the frame's length. The client's own
/// maximum frame size is the default, 16384 octets.
pub fn server_preface(bytes: &[u8]) -> Result<Option<(PeerSettings, usize)>, PrefaceError> {
    let Some(header) = bytes.get(..9) else { return Ok(None) };
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    if header[3] != 0x4 {
        return Err(PrefaceError::NotSettings(header[3]));
    }
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    if header[4] & 0x1 != 0 || stream != 0 || len > MIN_MAX_FRAME_SIZE as usize {
        return Err(PrefaceError::Malformed);
    }
    let Some(payload) = bytes.get(9..9 + len) else { return Ok(None) };
    Ok(Some((decode_settings_payload(payload)?, 9 + len)))
}

/// base64url without padding. Leftover bits of a partial last group are
/// not checked: a settings payload (6n octets) has no partial group, and a
/// value with one fails the length check anyway.
fn decode_base64url(s: &[u8]) -> Result<Vec<u8>, SettingsError> {
    if let Some(i) = s.iter().position(|&c| c == b'=') {
        return Err(if s[i..].iter().all(|&c| c == b'=') {
            SettingsError::Padding
        } else {
            SettingsError::InvalidCharacter
        });
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return Err(SettingsError::InvalidCharacter),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if s.len() % 4 == 1 {
        return Err(SettingsError::Truncated);
    }
    Ok(out)
}

/// Why [`encode_response`] refused to encode a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum EncodeError {
    /// Stream identifier 0 or above 2^31-1 (RFC 9113 section 5.1.1).
    #[error("stream identifier {0} is not 1..=2^31-1")]
    StreamId(u32),
    /// A status outside 200..=599: this encodes a complete (final) response,
    /// and 101 is not allowed in HTTP/2 (RFC 9113 section 8.6).
    #[error("status {0} is not a final status code")]
    Status(u16),
    /// A field with an empty name.
    #[error("empty field name")]
    EmptyName,
    /// A field name with an uppercase letter (RFC 9113 section 8.2.1: a
    /// field name with uppercase characters is malformed).
    #[error("uppercase field name")]
    UppercaseName,
    /// A field name starting with ':': the only response pseudo-header is
    /// `:status`, written by the encoder (RFC 9113 section 8.3.2).
    #[error("pseudo-header field in the fields")]
    PseudoHeader,
    /// A field name with a character that is not a token character (RFC 9110
    /// section 5.1).
    #[error("field name is not a token")]
    InvalidName,
    /// A connection-specific field (Connection, Keep-Alive,
    /// Proxy-Connection, Transfer-Encoding, Upgrade), which an HTTP/2
    /// endpoint must not generate (RFC 9113 section 8.2.2).
    #[error("connection-specific field in an HTTP/2 response")]
    ConnectionSpecific,
    /// A field value with a control character other than HTAB (CR, LF and NUL
    /// among them, RFC 9113 section 8.2.1) or with leading or trailing
    /// whitespace.
    #[error("invalid field value")]
    InvalidValue,
    /// The field section is larger than the peer's
    /// SETTINGS_MAX_HEADER_LIST_SIZE (sizes as RFC 9113 section 6.5.2
    /// counts them: name, value and 32 octets per field).
    #[error("field section of {size} octets exceeds the peer's limit of {limit}")]
    HeaderListTooLarge {
        /// The field section's size.
        size: usize,
        /// The peer's SETTINGS_MAX_HEADER_LIST_SIZE.
        limit: u32,
    },
    /// The body does not fit the flow-control window of a new stream.
    #[error("body of {len} octets exceeds the {window}-octet flow-control window")]
    BodyTooLarge {
        /// The body's length.
        len: usize,
        /// min(peer's SETTINGS_INITIAL_WINDOW_SIZE, 65535).
        window: u32,
    },
}

/// Encodes a complete response on `stream_id`.
///
/// One HEADERS frame (followed by CONTINUATION frames when the header block
/// exceeds `peer.max_frame_size`, RFC 9113 section 6.10) holding `:status`
/// then `fields` in order (names must be lowercase tokens), then the body in
/// DATA frames of at most `peer.max_frame_size` octets. END_STREAM is on the
/// last DATA frame, or on the HEADERS frame when the body is empty (never on a
/// CONTINUATION: section 6.2 puts it on HEADERS, section 6.10 gives
/// CONTINUATION no such flag); END_HEADERS is on the block's last frame.
///
/// The body must fit both windows the peer granted: the stream's
/// (SETTINGS_INITIAL_WINDOW_SIZE) and the connection's (65535, which SETTINGS
/// does not change, RFC 9113 section 6.9.2). Otherwise
/// [`EncodeError::BodyTooLarge`], and the caller answers without a body. The
/// DATA sent here uses connection window that `h2` does not know about:
/// give `body.len()` as the debt of [`ClientFrameFilter::new`].
pub fn encode_response(
    stream_id: u32,
    status: u16,
    fields: &[(&str, &str)],
    body: &[u8],
    peer: &PeerSettings,
) -> Result<Vec<u8>, EncodeError> {
    if stream_id == 0 || stream_id > MAX_WINDOW {
        return Err(EncodeError::StreamId(stream_id));
    }
    if !(200..=599).contains(&status) {
        return Err(EncodeError::Status(status));
    }
    let window = peer.initial_window_size.min(INITIAL_CONNECTION_WINDOW);
    if body.len() > window as usize {
        return Err(EncodeError::BodyTooLarge { len: body.len(), window });
    }

    let status = status.to_string();
    let mut block = Vec::new();
    encode_literal(&mut block, b":status", status.as_bytes());
    let mut list_size = ":status".len() + status.len() + 32;
    for &(name, value) in fields {
        check_field(name, value)?;
        encode_literal(&mut block, name.as_bytes(), value.as_bytes());
        list_size += name.len() + value.len() + 32;
    }
    if let Some(limit) = peer.max_header_list_size
        && list_size > limit as usize
    {
        return Err(EncodeError::HeaderListTooLarge { size: list_size, limit });
    }

    // The fields are public: clamp to the range a valid SETTINGS allows.
    let max_frame = peer.max_frame_size.clamp(MIN_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE) as usize;
    let frames = block.len().div_ceil(max_frame) + body.len().div_ceil(max_frame);
    let mut out = Vec::with_capacity(block.len() + body.len() + frames * FRAME_HEADER_LEN);
    let block_frames = block.len().div_ceil(max_frame);
    for (i, chunk) in block.chunks(max_frame).enumerate() {
        let (kind, mut flags) = match i {
            0 if body.is_empty() => (HEADERS, END_STREAM),
            0 => (HEADERS, 0),
            _ => (CONTINUATION, 0),
        };
        if i + 1 == block_frames {
            flags |= END_HEADERS;
        }
        frame_header(&mut out, chunk.len(), kind, flags, stream_id);
        out.extend_from_slice(chunk);
    }
    let data_frames = body.len().div_ceil(max_frame);
    for (i, chunk) in body.chunks(max_frame).enumerate() {
        let flags = if i + 1 == data_frames { END_STREAM } else { 0 };
        frame_header(&mut out, chunk.len(), DATA, flags, stream_id);
        out.extend_from_slice(chunk);
    }
    Ok(out)
}

/// The field rules of RFC 9113 section 8.2 for a field the relay generates.
fn check_field(name: &str, value: &str) -> Result<(), EncodeError> {
    if name.is_empty() {
        return Err(EncodeError::EmptyName);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(EncodeError::UppercaseName);
    }
    if name.starts_with(':') {
        return Err(EncodeError::PseudoHeader);
    }
    if !name.bytes().all(is_tchar) {
        return Err(EncodeError::InvalidName);
    }
    if matches!(name, "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade") {
        return Err(EncodeError::ConnectionSpecific);
    }
    let bytes = value.as_bytes();
    let edge_ws = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if bytes.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        || edge_ws(bytes.first())
        || edge_ws(bytes.last())
    {
        return Err(EncodeError::InvalidValue);
    }
    Ok(())
}

/// `tchar` of RFC 9110 section 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// "Literal Header Field without Indexing -- New Name" (RFC 7541 section
/// 6.2.2): the octet 0x00 (pattern 0000, index 0), then the name and the
/// value as string literals (section 5.2) without Huffman coding (H = 0).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer(out, 7, 0x00, s.len());
        out.extend_from_slice(s);
    }
}

/// An integer with an N-bit prefix (RFC 7541 section 5.1); `first` holds the
/// bits above the prefix.
fn encode_integer(out: &mut Vec<u8>, prefix_bits: u32, first: u8, mut value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A frame header (RFC 9113 section 4.1); `len` is at most 2^24-1 here.
fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&(stream_id & !RESERVED_BIT).to_be_bytes());
}

/// Why [`ClientFrameFilter::push`] gave up; the caller closes the connection.
/// Once returned, every later push returns the same error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum FilterError {
    /// The bytes do not start with the client connection preface (RFC 9113
    /// section 3.4: a connection error).
    #[error("client connection preface mismatch")]
    BadPreface,
    /// A WINDOW_UPDATE frame whose length is not 4 (RFC 9113 section 6.9:
    /// connection error FRAME_SIZE_ERROR).
    #[error("WINDOW_UPDATE frame of length {0}, not 4")]
    WindowUpdateLength(u32),
}

/// Where the filter is inside the current frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Between frames: collecting the next frame header.
    Header,
    /// This many payload octets still to pass through.
    Pass(u32),
    /// This many payload octets still to drop.
    Skip(u32),
    /// Collecting a stream-0 WINDOW_UPDATE's 4-octet payload to rewrite.
    Window { buf: [u8; 4], got: usize },
}

/// Streams the client's bytes (starting with its connection preface) to
/// `h2`, minus what concerns the stream the relay answered itself, and
/// minus `debt` octets of connection-level window.
///
/// Frames kept are passed through byte-identical, except stream-0
/// WINDOW_UPDATE increments reduced by the debt. Nothing is held back
/// beyond one frame header (9 octets) and a WINDOW_UPDATE payload (4 octets):
/// other payloads stream through as they arrive. The output is never longer
/// than the input.
#[derive(Debug, Clone)]
pub struct ClientFrameFilter {
    answered: u32,
    debt: u32,
    preface_seen: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload: Payload,
    /// Inside a header block: the last HEADERS, PUSH_PROMISE or CONTINUATION
    /// lacked END_HEADERS.
    in_header_block: bool,
    failed: Option<FilterError>,
    /// Connection-level window the client granted (stream-0 WINDOW_UPDATE
    /// increments as sent, before the debt came off) and not yet taken.
    credit: u64,
}

impl ClientFrameFilter {
    /// A filter for a connection whose stream `answered_stream` the relay
    /// answered itself (1 after an h2c Upgrade; 0 drops nothing by stream),
    /// having sent `debt` octets of DATA on it.
    pub fn new(answered_stream: u32, debt: u32) -> Self {
        Self {
            answered: answered_stream & !RESERVED_BIT,
            debt,
            preface_seen: 0,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload: Payload::Header,
            in_header_block: false,
            failed: None,
            credit: 0,
        }
    }

    /// The connection-level window still owed.
    pub fn debt(&self) -> u32 {
        self.debt
    }

    /// Connection-level window the client granted since the last call, as
    /// it sent it (the debt not taken off): what the client can really
    /// receive more of ([`DataGate::credit`]).
    pub fn take_credit(&mut self) -> u64 {
        std::mem::take(&mut self.credit)
    }

    /// Appends to `out` what `h2` should see of `input`, which may arrive in
    /// pieces of any size: the output does not depend on how the input is cut.
    ///
    /// Frames on the answered stream of type WINDOW_UPDATE, RST_STREAM (of
    /// length 4) and PRIORITY (of length 5) are dropped; every other frame
    /// passes (`h2` reports the errors the RFC wants for them). A WINDOW_UPDATE
    /// on stream 0 while debt remains has its increment (31 bits, reserved bit
    /// preserved) reduced by min(debt, increment); one reduced to 0 is dropped
    /// (an increment of 0 is a PROTOCOL_ERROR, RFC 9113 section 6.9).
    ///
    /// Errors: the preface does not match; a WINDOW_UPDATE of length other
    /// than 4. Bytes before the offending point may already be in `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), FilterError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.run(input, out);
        if let Err(e) = result {
            self.failed = Some(e);
        }
        result
    }

    fn run(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), FilterError> {
        if self.preface_seen < PREFACE.len() {
            let want = &PREFACE[self.preface_seen..];
            let n = want.len().min(input.len());
            let matched = input[..n].iter().zip(want).take_while(|(a, b)| a == b).count();
            out.extend_from_slice(&input[..matched]);
            if matched < n {
                return Err(FilterError::BadPreface);
            }
            self.preface_seen += n;
            input = &input[n..];
        }
        while !input.is_empty() {
            match &mut self.payload {
                Payload::Header => {
                    let take = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
                    self.header_len += take;
                    input = &input[take..];
                    if self.header_len == FRAME_HEADER_LEN {
                        self.header_len = 0;
                        self.begin_frame(out)?;
                    }
                }
                Payload::Pass(left) => {
                    let n = input.len().min(*left as usize);
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n as u32;
                    if *left == 0 {
                        self.payload = Payload::Header;
                    }
                }
                Payload::Skip(left) => {
                    let n = input.len().min(*left as usize);
                    input = &input[n..];
                    *left -= n as u32;
                    if *left == 0 {
                        self.payload = Payload::Header;
                    }
                }
                Payload::Window { buf, got } => {
                    let n = input.len().min(4 - *got);
                    buf[*got..*got + n].copy_from_slice(&input[..n]);
                    *got += n;
                    input = &input[n..];
                    if *got == 4 {
                        let buf = *buf;
                        self.payload = Payload::Header;
                        self.finish_window_update(buf, out);
                    }
                }
            }
        }
        Ok(())
    }

    /// Decides what to do with the frame whose header is in `self.header`.
    fn begin_frame(&mut self, out: &mut Vec<u8>) -> Result<(), FilterError> {
        let h = self.header;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let (kind, flags) = (h[3], h[4]);
        // The reserved bit "MUST be ignored when receiving" (RFC 9113
        // section 4.1).
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & !RESERVED_BIT;
        if kind == WINDOW_UPDATE && len != 4 {
            return Err(FilterError::WindowUpdateLength(len));
        }
        let in_block = self.in_header_block;
        self.in_header_block =
            matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION) && flags & END_HEADERS == 0;

        self.payload = if in_block {
            // Only a CONTINUATION may follow; anything else is h2's
            // PROTOCOL_ERROR to find (RFC 9113 section 6.10).
            self.pass(out, len)
        } else if self.answered != 0
            && stream == self.answered
            && matches!((kind, len), (WINDOW_UPDATE, 4) | (RST_STREAM, 4) | (PRIORITY, 5))
        {
            Payload::Skip(len)
        } else if kind == WINDOW_UPDATE && stream == 0 && self.debt > 0 {
            Payload::Window { buf: [0; 4], got: 0 }
        } else {
            self.pass(out, len)
        };
        Ok(())
    }

    fn pass(&self, out: &mut Vec<u8>, len: u32) -> Payload {
        out.extend_from_slice(&self.header);
        if len == 0 { Payload::Header } else { Payload::Pass(len) }
    }

    fn finish_window_update(&mut self, payload: [u8; 4], out: &mut Vec<u8>) {
        let raw = u32::from_be_bytes(payload);
        let increment = raw & !RESERVED_BIT;
        self.credit += u64::from(increment);
        if increment == 0 {
            // Already invalid: let h2 answer the PROTOCOL_ERROR.
            out.extend_from_slice(&self.header);
            out.extend_from_slice(&payload);
            return;
        }
        let absorbed = increment.min(self.debt);
        self.debt -= absorbed;
        let left = increment - absorbed;
        if left > 0 {
            out.extend_from_slice(&self.header);
            out.extend_from_slice(&((raw & RESERVED_BIT) | left).to_be_bytes());
        }
    }
}

/// Holds back the server's DATA frames that the client's connection window
/// cannot take yet, while the window an h2c Upgrade's answer used is still
/// owed.
///
/// After an h2c Upgrade the relay answers stream 1 itself ([`encode_response`])
/// with DATA `h2` does not know about, so until the client's connection
/// WINDOW_UPDATEs have covered that debt (see [`ClientFrameFilter`]) `h2`
/// believes the client can take `debt` octets more than it can. The gate
/// keeps the true window: the client's initial connection window less the
/// debt, plus the increments the client sent ([`Self::credit`]), less the
/// DATA passed. A DATA frame that does not fit, and every octet after it
/// (frames keep their order), waits until the client grants more. Other
/// frames pass. The caller stops taking `h2`'s output while the gate holds
/// ([`Self::holding`]), which bounds what it holds.
#[derive(Debug, Clone)]
pub struct DataGate {
    window: i64,
    /// Octets not yet passed, from the next frame boundary (or the rest of
    /// a frame being passed).
    buf: Vec<u8>,
    /// Payload octets of an admitted frame still to pass.
    pass_left: usize,
    holding: bool,
}

impl DataGate {
    /// A gate for a client whose connection window, once the relay's own
    /// answer is counted, is `initial - debt`.
    pub fn new(debt: u32) -> Self {
        Self {
            window: i64::from(INITIAL_CONNECTION_WINDOW) - i64::from(debt),
            buf: Vec::new(),
            pass_left: 0,
            holding: false,
        }
    }

    /// Passes the server's output to `out`, holding back from the first
    /// DATA frame the client's window cannot take.
    pub fn push(&mut self, server_output: &[u8], out: &mut Vec<u8>) {
        self.buf.extend_from_slice(server_output);
        self.drive(out);
    }

    /// The client granted `increment` octets of connection window (raw,
    /// [`ClientFrameFilter::take_credit`]): held frames that now fit pass.
    pub fn credit(&mut self, increment: u64, out: &mut Vec<u8>) {
        self.window = self.window.saturating_add(increment.min(i64::MAX as u64) as i64);
        self.drive(out);
    }

    /// Whether a DATA frame waits for window.
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Octets held back.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    fn drive(&mut self, out: &mut Vec<u8>) {
        let mut at = 0;
        loop {
            if self.pass_left > 0 {
                let n = self.pass_left.min(self.buf.len() - at);
                out.extend_from_slice(&self.buf[at..at + n]);
                at += n;
                self.pass_left -= n;
                if self.pass_left > 0 {
                    break;
                }
                continue;
            }
            let Some(h) = self.buf.get(at..at + FRAME_HEADER_LEN) else {
                self.holding = false;
                break;
            };
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if h[3] == DATA {
                if len as i64 > self.window {
                    self.holding = true;
                    break;
                }
                self.window -= len as i64;
            }
            out.extend_from_slice(h);
            at += FRAME_HEADER_LEN;
            self.pass_left = len;
        }
        self.buf.drain(..at);
    }
}

/// Inserts bytes into the server's output right after its first complete
/// frame (the SETTINGS frame of the server connection preface, RFC 9113
/// section 3.4), then passes everything through unchanged.
///
/// The first frame's octets are passed on as they come (its header is
/// copied aside only to read its length); the frame's type is not checked.
#[derive(Debug, Clone)]
pub struct ServerFrameSplice {
    insert: Option<Vec<u8>>,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload octets of the first frame still to pass, once its header is
    /// complete.
    left: u32,
}

impl ServerFrameSplice {
    /// A splice that will put `insert` after the server's first frame.
    pub fn new(insert: Vec<u8>) -> Self {
        Self { insert: Some(insert), header: [0; FRAME_HEADER_LEN], header_len: 0, left: 0 }
    }

    /// Appends `server_output` to `out`, with the insert after the first
    /// frame once that frame is complete.
    pub fn push(&mut self, mut server_output: &[u8], out: &mut Vec<u8>) {
        if self.insert.is_some() {
            if self.header_len < FRAME_HEADER_LEN {
                let take = (FRAME_HEADER_LEN - self.header_len).min(server_output.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&server_output[..take]);
                self.header_len += take;
                out.extend_from_slice(&server_output[..take]);
                server_output = &server_output[take..];
                if self.header_len == FRAME_HEADER_LEN {
                    self.left = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]]);
                }
            }
            if self.header_len == FRAME_HEADER_LEN {
                let n = server_output.len().min(self.left as usize);
                out.extend_from_slice(&server_output[..n]);
                server_output = &server_output[n..];
                self.left -= n as u32;
                if self.left == 0
                    && let Some(insert) = self.insert.take()
                {
                    out.extend_from_slice(&insert);
                }
            }
        }
        out.extend_from_slice(server_output);
    }

    /// Whether the insert has gone out.
    pub fn done(&self) -> bool {
        self.insert.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_frame(stream: u32, len: usize) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[DATA, 0]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0xab, len));
        f
    }

    fn ping_frame() -> Vec<u8> {
        let mut f = vec![0, 0, 8, 0x6, 0, 0, 0, 0, 0];
        f.extend_from_slice(&[7; 8]);
        f
    }

    #[test]
    fn the_gate_holds_data_past_the_true_window_until_the_client_grants_more() {
        let debt = 130;
        let mut gate = DataGate::new(debt);
        let mut out = Vec::new();
        // h2 believes in 65,535 octets: four 16 KiB DATA frames and a tail.
        let mut server = Vec::new();
        for _ in 0..3 {
            server.extend(data_frame(3, 16_384));
        }
        server.extend(ping_frame());
        // 49,152 passed; 16,253 left of the true window, 16,383 of h2's.
        server.extend(data_frame(5, 16_300));
        server.extend(ping_frame());
        // Cut into awkward pieces: the result does not depend on the cuts.
        for piece in server.chunks(1000) {
            gate.push(piece, &mut out);
        }
        let passed: usize = frames(&out).iter().filter(|f| f.kind == DATA).map(|f| f.payload.len()).sum();
        assert_eq!(passed, 3 * 16_384, "never past the client's true window (65,405)");
        assert!(gate.holding(), "the frame that does not fit waits");
        assert_eq!(frames(&out).len(), 4, "the PING before it passed, the one behind it waits (order kept)");
        gate.credit(40, &mut out);
        assert!(gate.holding(), "still 7 octets short");
        // The client's WINDOW_UPDATE lets everything through.
        gate.credit(100_000, &mut out);
        assert!(!gate.holding());
        assert_eq!(gate.held(), 0);
        assert_eq!(out, server, "byte-identical once released");
    }

    #[test]
    fn the_filter_reports_the_credit_the_client_sent() {
        let mut f = ClientFrameFilter::new(1, 100);
        let mut out = Vec::new();
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0, 0, 4, WINDOW_UPDATE, 0, 0, 0, 0, 0]);
        input.extend_from_slice(&300u32.to_be_bytes());
        f.push(&input, &mut out).unwrap();
        assert_eq!(f.take_credit(), 300, "as sent");
        assert_eq!(f.debt(), 0);
        assert_eq!(f.take_credit(), 0);
    }

    // ---- test-only frame and HPACK decoding ----

    #[derive(Debug, PartialEq, Eq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn frames(mut b: &[u8]) -> Vec<Frame> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert!(b.len() >= 9, "truncated frame header");
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            assert!(b.len() >= 9 + len, "truncated frame payload");
            v.push(Frame { kind: b[3], flags: b[4], stream, payload: b[9..9 + len].to_vec() });
            b = &b[9 + len..];
        }
        v
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        frame_header(&mut v, payload.len(), kind, flags, stream);
        v.extend_from_slice(payload);
        v
    }

    fn window_update(stream: u32, raw: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, stream, &raw.to_be_bytes())
    }

    fn decode_integer(b: &mut &[u8], prefix_bits: u32) -> usize {
        let max = (1usize << prefix_bits) - 1;
        let mut v = usize::from(b[0]) & max;
        *b = &b[1..];
        if v < max {
            return v;
        }
        let mut shift = 0;
        loop {
            let c = b[0];
            *b = &b[1..];
            v += usize::from(c & 0x7f) << shift;
            shift += 7;
            if c & 0x80 == 0 {
                return v;
            }
        }
    }

    fn decode_string(b: &mut &[u8]) -> String {
        assert_eq!(b[0] & 0x80, 0, "Huffman");
        let len = decode_integer(b, 7);
        let s = String::from_utf8(b[..len].to_vec()).expect("utf-8");
        *b = &b[len..];
        s
    }

    /// Decodes a block made only of literal-without-indexing-new-name fields.
    fn decode_block(mut b: &[u8]) -> Vec<(String, String)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[0], 0x00, "not a literal without indexing, new name");
            b = &b[1..];
            let name = decode_string(&mut b);
            let value = decode_string(&mut b);
            v.push((name, value));
        }
        v
    }

    fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut s = String::new();
        for c in data.chunks(3) {
            let n = c.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
            for i in 0..=c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        s
    }

    fn settings(pairs: &[(u16, u32)]) -> String {
        let mut p = Vec::new();
        for &(id, v) in pairs {
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&v.to_be_bytes());
        }
        b64url(&p)
    }

    // ---- sniff ----

    #[test]
    fn h2c_sniff() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"P"), Sniff::NeedMore);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniff::NeedMore);
        assert_eq!(sniff(&PREFACE[..23]), Sniff::NeedMore);
        assert_eq!(sniff(PREFACE), Sniff::H2PriorKnowledge);
        assert_eq!(sniff(&[&PREFACE[..], b"\0\0\0\x04"].concat()), Sniff::H2PriorKnowledge);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"), Sniff::Http1);
        assert_eq!(sniff(b"PUT / HTTP/1.1"), Sniff::Http1);
        assert_eq!(sniff(b"G"), Sniff::Http1);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(&[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x03]), Sniff::Tls);
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]), Sniff::Tls);
        assert_eq!(sniff(&[0x16, 0x02]), Sniff::Http1);
        assert_eq!(sniff(&[0x03]), Sniff::Http1);
    }

    // ---- HTTP2-Settings ----

    #[test]
    fn h2c_settings_from_curl() {
        // AAMAAABk AAQCAAAA AAIAAAAA is, by hand:
        //   00 03 00 00 00 64  MAX_CONCURRENT_STREAMS = 100
        //   00 04 02 00 00 00  INITIAL_WINDOW_SIZE = 0x0200_0000 = 33554432
        //   00 02 00 00 00 00  ENABLE_PUSH = 0
        let s = decode_http2_settings("AAMAAABkAAQCAAAAAAIAAAAA").unwrap();
        assert_eq!(
            s,
            PeerSettings {
                max_concurrent_streams: Some(100),
                initial_window_size: 33_554_432,
                enable_push: false,
                ..PeerSettings::default()
            }
        );
        assert_eq!(settings(&[(3, 100), (4, 0x0200_0000), (2, 0)]), "AAMAAABkAAQCAAAAAAIAAAAA");
    }

    #[test]
    fn h2c_settings_defaults_and_all_known() {
        let d = PeerSettings::default();
        assert_eq!(
            d,
            PeerSettings {
                header_table_size: 4096,
                enable_push: true,
                max_concurrent_streams: None,
                initial_window_size: 65535,
                max_frame_size: 16384,
                max_header_list_size: None,
                enable_connect_protocol: false,
            }
        );
        assert_eq!(decode_http2_settings(""), Ok(d));
        let v = settings(&[(1, 0), (2, 1), (3, 0), (4, 0x7fff_ffff), (5, 16_777_215), (6, 8192), (8, 1)]);
        assert_eq!(
            decode_http2_settings(&v),
            Ok(PeerSettings {
                header_table_size: 0,
                enable_push: true,
                max_concurrent_streams: Some(0),
                initial_window_size: 0x7fff_ffff,
                max_frame_size: 16_777_215,
                max_header_list_size: Some(8192),
                enable_connect_protocol: true,
            })
        );
        // Unknown identifiers (0, 7, 9, 0xffff) are ignored whatever their value;
        // the last occurrence wins.
        let v = settings(&[(0, 9), (7, 9), (9, 9), (0xffff, 9), (5, 20000), (5, 30000)]);
        assert_eq!(decode_http2_settings(&v).unwrap().max_frame_size, 30000);
        // Every occurrence is checked, even one overridden later.
        let v = settings(&[(2, 7), (2, 0)]);
        assert_eq!(decode_http2_settings(&v), Err(SettingsError::EnablePush(7)));
    }

    #[test]
    fn h2c_settings_value_ranges() {
        let one = |id, v| decode_http2_settings(&settings(&[(id, v)]));
        assert_eq!(one(2, 2), Err(SettingsError::EnablePush(2)));
        assert_eq!(one(4, 0x8000_0000), Err(SettingsError::InitialWindowSize(0x8000_0000)));
        assert_eq!(one(4, 0).unwrap().initial_window_size, 0);
        assert_eq!(one(5, 16383), Err(SettingsError::MaxFrameSize(16383)));
        assert_eq!(one(5, 16_777_216), Err(SettingsError::MaxFrameSize(16_777_216)));
        assert_eq!(one(5, 16384).unwrap().max_frame_size, 16384);
        assert_eq!(one(8, 2), Err(SettingsError::EnableConnectProtocol(2)));
        assert!(!one(8, 0).unwrap().enable_connect_protocol);
        assert_eq!(one(3, u32::MAX).unwrap().max_concurrent_streams, Some(u32::MAX));
    }

    #[test]
    fn h2c_settings_encoding_errors() {
        use SettingsError::*;
        assert_eq!(decode_http2_settings("AAMAAABkAAQCAAAAAAIAAAAA="), Err(Padding));
        assert_eq!(decode_http2_settings("AAMAAA=="), Err(Padding));
        assert_eq!(decode_http2_settings("AA=MAAAB"), Err(InvalidCharacter));
        assert_eq!(decode_http2_settings(" AAMAAABk"), Err(InvalidCharacter));
        assert_eq!(decode_http2_settings("AAMA AABk"), Err(InvalidCharacter));
        assert_eq!(decode_http2_settings("AAMAAABk\t"), Err(InvalidCharacter));
        // Standard base64's '+' and '/' are not base64url.
        assert_eq!(decode_http2_settings("AAMAAA+k"), Err(InvalidCharacter));
        assert_eq!(decode_http2_settings("AAMAAA/k"), Err(InvalidCharacter));
        assert_eq!(decode_http2_settings("é"), Err(InvalidCharacter));
        assert_eq!(decode_http2_settings("AAMAAABkA"), Err(Truncated));
        assert_eq!(decode_http2_settings("A"), Err(Truncated));
        assert_eq!(decode_http2_settings("AAMAAA"), Err(PayloadLength(4)));
        assert_eq!(decode_http2_settings("AAMAAABkAA"), Err(PayloadLength(7)));
        let long = "A".repeat(MAX_HTTP2_SETTINGS_LEN + 8);
        assert_eq!(decode_http2_settings(&long), Err(TooLong));
        // The longest accepted: 1024 characters, 768 octets, 128 settings.
        assert_eq!(decode_http2_settings(&"A".repeat(MAX_HTTP2_SETTINGS_LEN)), Ok(PeerSettings::default()));
        // '-' and '_' decode as 62 and 63: id 0xfbef is unknown, ignored.
        assert_eq!(decode_http2_settings("-_-_AAAA"), Ok(PeerSettings::default()));
        assert_eq!(decode_base64url(b"-_-_").unwrap(), [0xfb, 0xff, 0xbf]);
        for e in [TooLong, InvalidCharacter, Padding, Truncated, PayloadLength(4), EnablePush(2)] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn h2c_base64url_round_trip() {
        let data: Vec<u8> = (0..=255).collect();
        for n in 0..data.len() {
            assert_eq!(decode_base64url(b64url(&data[..n]).as_bytes()).unwrap(), &data[..n]);
        }
    }

    // ---- HPACK and response encoding ----

    #[test]
    fn h2c_hpack_integers_rfc7541_c1() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix;
        // C.1.3: 42 starting at an octet boundary.
        let mut v = Vec::new();
        encode_integer(&mut v, 5, 0, 10);
        assert_eq!(v, [0x0a]);
        v.clear();
        encode_integer(&mut v, 5, 0, 1337);
        assert_eq!(v, [0x1f, 0x9a, 0x0a]);
        v.clear();
        encode_integer(&mut v, 8, 0, 42);
        assert_eq!(v, [0x2a]);
        // The 7-bit string length prefix at its boundary.
        for (n, want) in
            [(126, &[0x7e][..]), (127, &[0x7f, 0x00]), (128, &[0x7f, 0x01]), (255, &[0x7f, 0x80, 0x01])]
        {
            v.clear();
            encode_integer(&mut v, 7, 0, n);
            assert_eq!(v, want, "{n}");
            assert_eq!(decode_integer(&mut &v[..], 7), n);
        }
    }

    #[test]
    fn h2c_hpack_literal_rfc7541_c2() {
        // C.2.1 encodes custom-key: custom-header as a literal *with* indexing,
        // new name (first octet 0x40); without indexing (6.2.2) the first
        // octet is 0x00 and the rest is the same.
        let mut v = Vec::new();
        encode_literal(&mut v, b"custom-key", b"custom-header");
        let mut want = vec![0x00, 0x0a];
        want.extend_from_slice(b"custom-key");
        want.push(0x0d);
        want.extend_from_slice(b"custom-header");
        assert_eq!(v, want);
    }

    #[test]
    fn h2c_encode_without_body() {
        let peer = PeerSettings::default();
        let out =
            encode_response(1, 404, &[("content-type", "text/plain"), ("x-a", "")], b"", &peer).unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].kind, f[0].flags, f[0].stream), (HEADERS, END_STREAM | END_HEADERS, 1));
        assert_eq!(
            decode_block(&f[0].payload),
            [(":status", "404"), ("content-type", "text/plain"), ("x-a", "")]
                .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        // Hand-checked bytes of the smallest answer.
        let out = encode_response(1, 200, &[], b"", &peer).unwrap();
        assert_eq!(out, b"\0\0\x0d\x01\x05\0\0\0\x01\x00\x07:status\x03200");
    }

    #[test]
    fn h2c_encode_with_body() {
        let peer = PeerSettings::default();
        let out = encode_response(1, 200, &[("content-length", "5")], b"hello", &peer).unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].kind, f[0].flags, f[0].stream), (HEADERS, END_HEADERS, 1));
        assert_eq!(decode_block(&f[0].payload)[1], ("content-length".into(), "5".into()));
        assert_eq!(f[1], Frame { kind: DATA, flags: END_STREAM, stream: 1, payload: b"hello".to_vec() });

        // 40000 octets: DATA of 16384, 16384, 7232 (END_STREAM on the last).
        let body: Vec<u8> = (0..40000u32).map(|i| i as u8).collect();
        let out = encode_response(3, 200, &[], &body, &peer).unwrap();
        let f = frames(&out);
        let data: Vec<_> = f[1..].iter().map(|f| (f.kind, f.flags, f.stream, f.payload.len())).collect();
        assert_eq!(data, [(DATA, 0, 3, 16384), (DATA, 0, 3, 16384), (DATA, END_STREAM, 3, 7232)]);
        assert_eq!(f[1..].iter().flat_map(|f| f.payload.clone()).collect::<Vec<_>>(), body);

        // A larger peer frame size: one DATA frame of the whole window.
        let big = PeerSettings { max_frame_size: 1 << 20, initial_window_size: 1 << 20, ..peer };
        let body = vec![7; 65535];
        let f = frames(&encode_response(1, 200, &[], &body, &big).unwrap());
        assert_eq!((f.len(), f[1].flags, f[1].payload.len()), (2, END_STREAM, 65535));
    }

    #[test]
    fn h2c_encode_body_window() {
        let peer = PeerSettings { initial_window_size: 1000, ..PeerSettings::default() };
        assert!(encode_response(1, 200, &[], &[0; 1000], &peer).is_ok());
        assert_eq!(
            encode_response(1, 200, &[], &[0; 1001], &peer),
            Err(EncodeError::BodyTooLarge { len: 1001, window: 1000 })
        );
        // The connection window (65535) bounds a larger stream window.
        let peer = PeerSettings { initial_window_size: 1 << 30, ..PeerSettings::default() };
        assert!(encode_response(1, 200, &[], &[0; 65535], &peer).is_ok());
        assert_eq!(
            encode_response(1, 200, &[], &[0; 65536], &peer),
            Err(EncodeError::BodyTooLarge { len: 65536, window: 65535 })
        );
        let peer = PeerSettings { initial_window_size: 0, ..PeerSettings::default() };
        assert!(encode_response(1, 200, &[], b"", &peer).is_ok());
        assert!(encode_response(1, 200, &[], b"x", &peer).is_err());
    }

    #[test]
    fn h2c_encode_continuation() {
        // A header block over 16384 octets: HEADERS + CONTINUATION, END_HEADERS
        // only on the last, END_STREAM on HEADERS.
        let long = "v".repeat(20000);
        let more = "w".repeat(15000);
        let fields = [("x-long", long.as_str()), ("x-more", more.as_str()), ("x-short", "s")];
        let out = encode_response(1, 503, &fields, b"", &PeerSettings::default()).unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].kind, f[0].flags, f[0].payload.len()), (HEADERS, END_STREAM, 16384));
        assert_eq!((f[1].kind, f[1].flags, f[1].payload.len()), (CONTINUATION, 0, 16384));
        assert_eq!((f[2].kind, f[2].flags), (CONTINUATION, END_HEADERS));
        assert!(f.iter().all(|f| f.stream == 1));
        let block: Vec<u8> = f.iter().flat_map(|f| f.payload.clone()).collect();
        let decoded = decode_block(&block);
        assert_eq!(decoded.len(), 4);
        assert_eq!(decoded[0], (":status".into(), "503".into()));
        assert_eq!(decoded[1], ("x-long".into(), long.clone()));
        assert_eq!(decoded[2], ("x-more".into(), more.clone()));
        assert_eq!(decoded[3], ("x-short".into(), "s".into()));

        // With a body, END_STREAM moves to the DATA frame.
        let f = frames(&encode_response(1, 200, &fields, b"b", &PeerSettings::default()).unwrap());
        let flags: Vec<_> = f.iter().map(|f| (f.kind, f.flags)).collect();
        assert_eq!(flags, [(HEADERS, 0), (CONTINUATION, 0), (CONTINUATION, END_HEADERS), (DATA, END_STREAM)]);

        // A block of exactly 16384 octets stays one frame; one more splits.
        let exact = 16384 - (1 + 1 + 7 + 1 + 3) - (1 + 1 + 3 + 3);
        let v = "a".repeat(exact);
        let f = frames(&encode_response(1, 200, &[("x-a", &v)], b"", &PeerSettings::default()).unwrap());
        assert_eq!((f.len(), f[0].payload.len()), (1, 16384));
        let v = "a".repeat(exact + 1);
        let f = frames(&encode_response(1, 200, &[("x-a", &v)], b"", &PeerSettings::default()).unwrap());
        assert_eq!((f.len(), f[1].payload.len()), (2, 1));
    }

    #[test]
    fn h2c_encode_refusals() {
        use EncodeError::*;
        let p = PeerSettings::default();
        let enc = |name: &str, value: &str| encode_response(1, 200, &[(name, value)], b"", &p).map(|_| ());
        assert_eq!(enc("", "x"), Err(EmptyName));
        assert_eq!(enc("Content-Type", "x"), Err(UppercaseName));
        assert_eq!(enc(":path", "/"), Err(PseudoHeader));
        assert_eq!(enc(":status", "200"), Err(PseudoHeader));
        assert_eq!(enc("a b", "x"), Err(InvalidName));
        assert_eq!(enc("a\"", "x"), Err(InvalidName));
        assert_eq!(enc("é", "x"), Err(InvalidName));
        for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
            assert_eq!(enc(name, "x"), Err(ConnectionSpecific), "{name}");
        }
        for value in ["a\r\nb", "a\nb", "a\0b", "\x7f", " a", "a ", "\ta", "a\t"] {
            assert_eq!(enc("x", value), Err(InvalidValue), "{value:?}");
        }
        assert_eq!(enc("x-ok!#$%&'*+-.^_`|~09", "a\tb é \"q\""), Ok(()));
        assert_eq!(encode_response(0, 200, &[], b"", &p), Err(StreamId(0)));
        assert_eq!(encode_response(0x8000_0001, 200, &[], b"", &p), Err(StreamId(0x8000_0001)));
        assert!(encode_response(0x7fff_ffff, 200, &[], b"", &p).is_ok());
        for status in [0, 101, 199, 600, 999] {
            assert_eq!(encode_response(1, status, &[], b"", &p), Err(Status(status)));
        }
        // Field section size: :status 200 is 7 + 3 + 32 = 42, x: y is 34.
        let small = PeerSettings { max_header_list_size: Some(76), ..p };
        assert!(encode_response(1, 200, &[("x", "y")], b"", &small).is_ok());
        let small = PeerSettings { max_header_list_size: Some(75), ..p };
        assert_eq!(
            encode_response(1, 200, &[("x", "y")], b"", &small),
            Err(HeaderListTooLarge { size: 76, limit: 75 })
        );
        assert!(!BodyTooLarge { len: 1, window: 0 }.to_string().is_empty());
    }

    // ---- client frame filter ----

    fn filter_all(answered: u32, debt: u32, input: &[u8]) -> (Vec<u8>, Result<(), FilterError>, u32) {
        let mut f = ClientFrameFilter::new(answered, debt);
        let mut out = Vec::new();
        let r = f.push(input, &mut out);
        (out, r, f.debt())
    }

    fn filter_bytewise(answered: u32, debt: u32, input: &[u8]) -> (Vec<u8>, Result<(), FilterError>, u32) {
        let mut f = ClientFrameFilter::new(answered, debt);
        let mut out = Vec::new();
        let mut r = Ok(());
        for b in input {
            r = f.push(std::slice::from_ref(b), &mut out);
        }
        (out, r, f.debt())
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    }

    fn client_settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100, 0, 4, 0, 0x60, 0, 0])
    }

    #[test]
    fn h2c_filter_passes_ordinary_frames() {
        let headers = frame(HEADERS, END_HEADERS, 3, b"\x82\x84\x86");
        let data = frame(DATA, END_STREAM, 3, &[9; 1000]);
        let input = with_preface(&[
            client_settings(),
            window_update(0, 1 << 20),
            headers,
            data,
            frame(0x6, 0, 0, &[1; 8]),
        ]);
        let (out, r, debt) = filter_all(1, 0, &input);
        assert_eq!((r, debt), (Ok(()), 0));
        assert_eq!(out, input);
        assert_eq!(filter_bytewise(1, 0, &input), (input.clone(), Ok(()), 0));
    }

    #[test]
    fn h2c_filter_drops_answered_stream_frames() {
        let keep = [
            window_update(3, 100),
            frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]),
            frame(PRIORITY, 0, 3, &[0, 0, 0, 0, 16]),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, b"\x82"),
        ];
        let drop = [
            window_update(1, 100),
            frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]),
            frame(PRIORITY, 0, 1, &[0, 0, 0, 3, 16]),
            // The reserved bit of the stream identifier is ignored.
            window_update(0x8000_0001, 5),
        ];
        let input = with_preface(&[
            client_settings(),
            drop[0].clone(),
            keep[0].clone(),
            drop[1].clone(),
            keep[1].clone(),
            drop[2].clone(),
            keep[2].clone(),
            drop[3].clone(),
            keep[3].clone(),
        ]);
        let want = with_preface(&[
            client_settings(),
            keep[0].clone(),
            keep[1].clone(),
            keep[2].clone(),
            keep[3].clone(),
        ]);
        assert_eq!(filter_all(1, 0, &input), (want.clone(), Ok(()), 0));
        assert_eq!(filter_bytewise(1, 0, &input), (want, Ok(()), 0));

        // Other frame types on stream 1 pass (h2 reports them).
        let other = with_preface(&[frame(DATA, 0, 1, b"x"), frame(HEADERS, END_HEADERS, 1, b"\x82")]);
        assert_eq!(filter_all(1, 0, &other).0, other);
        // RST_STREAM and PRIORITY of the wrong length pass, for h2's
        // FRAME_SIZE_ERROR.
        let bad = with_preface(&[frame(RST_STREAM, 0, 1, &[0; 5]), frame(PRIORITY, 0, 1, &[0; 4])]);
        assert_eq!(filter_all(1, 0, &bad).0, bad);
        // Answered stream 0 drops nothing by stream.
        let input = with_preface(&[frame(PRIORITY, 0, 0, &[0; 5]), window_update(0, 5)]);
        assert_eq!(filter_all(0, 0, &input).0, input);
    }

    #[test]
    fn h2c_filter_absorbs_debt() {
        // Fully, in one frame: the frame is dropped.
        let input = with_preface(&[window_update(0, 100), frame(0x6, 0, 0, &[0; 8])]);
        let want = with_preface(&[frame(0x6, 0, 0, &[0; 8])]);
        assert_eq!(filter_all(1, 100, &input), (want, Ok(()), 0));

        // Partly: 300 - 100 = 200 goes on, reserved bit preserved.
        let input = with_preface(&[window_update(0, 0x8000_0000 | 300)]);
        let want = with_preface(&[window_update(0, 0x8000_0000 | 200)]);
        assert_eq!(filter_all(1, 100, &input), (want, Ok(()), 0));

        // Across several frames; stream-3 updates are not touched.
        let input = with_preface(&[
            window_update(0, 300),
            window_update(3, 50),
            window_update(0, 300),
            window_update(0, 600),
            window_update(0, 70),
        ]);
        let want = with_preface(&[window_update(3, 50), window_update(0, 200), window_update(0, 70)]);
        assert_eq!(filter_all(1, 1000, &input), (want.clone(), Ok(()), 0));
        assert_eq!(filter_bytewise(1, 1000, &input), (want, Ok(()), 0));

        // Debt left over.
        let input = with_preface(&[window_update(0, 300)]);
        assert_eq!(filter_all(1, 1000, &input), (PREFACE.to_vec(), Ok(()), 700));

        // An increment of 0 was already a PROTOCOL_ERROR: passed for h2.
        let input = with_preface(&[window_update(0, 0), window_update(0, 0x8000_0000)]);
        assert_eq!(filter_all(1, 10, &input), (input.clone(), Ok(()), 10));
    }

    #[test]
    fn h2c_filter_header_block_passes_everything() {
        // Inside a header block (no END_HEADERS yet), a WINDOW_UPDATE on
        // stream 1 or 0 is h2's PROTOCOL_ERROR to see: passed unchanged.
        let input = with_preface(&[
            frame(HEADERS, 0, 3, b"\x82"),
            window_update(1, 5),
            frame(CONTINUATION, 0, 3, b"\x84"),
            window_update(0, 5),
        ]);
        assert_eq!(filter_all(1, 100, &input), (input.clone(), Ok(()), 100));
        // After END_HEADERS the filter acts again.
        let input = with_preface(&[
            frame(HEADERS, 0, 3, b"\x82"),
            frame(CONTINUATION, END_HEADERS, 3, b"\x84"),
            window_update(1, 5),
            window_update(0, 5),
        ]);
        let want =
            with_preface(&[frame(HEADERS, 0, 3, b"\x82"), frame(CONTINUATION, END_HEADERS, 3, b"\x84")]);
        assert_eq!(filter_all(1, 100, &input), (want, Ok(()), 95));
    }

    #[test]
    fn h2c_filter_errors() {
        let (out, r, _) = filter_all(1, 0, b"PRI * HTTP/1.1\r\n");
        assert_eq!((out.as_slice(), r), (&b"PRI * HTTP/"[..], Err(FilterError::BadPreface)));
        assert_eq!(filter_bytewise(1, 0, b"PRI * HTTP/1.1\r\n").0, b"PRI * HTTP/");
        assert_eq!(filter_all(1, 0, b"GET").1, Err(FilterError::BadPreface));

        let bad = with_preface(&[frame(WINDOW_UPDATE, 0, 3, &[0, 0, 0, 1, 0])]);
        assert_eq!(filter_all(1, 0, &bad), (PREFACE.to_vec(), Err(FilterError::WindowUpdateLength(5)), 0));
        assert_eq!(filter_bytewise(1, 0, &bad).1, Err(FilterError::WindowUpdateLength(5)));
        let bad = with_preface(&[frame(WINDOW_UPDATE, 0, 1, &[0, 0, 1])]);
        assert_eq!(filter_all(1, 0, &bad).1, Err(FilterError::WindowUpdateLength(3)));

        // Sticky.
        let mut f = ClientFrameFilter::new(1, 0);
        let mut out = Vec::new();
        assert!(f.push(b"X", &mut out).is_err());
        assert_eq!(f.push(&PREFACE[..], &mut out), Err(FilterError::BadPreface));
        assert!(out.is_empty());
        assert!(!FilterError::WindowUpdateLength(0).to_string().is_empty());
    }

    #[test]
    fn h2c_filter_streams_payloads_through() {
        let mut f = ClientFrameFilter::new(1, 50);
        let mut out = Vec::new();
        f.push(&PREFACE[..10], &mut out).unwrap();
        assert_eq!(out, &PREFACE[..10]);
        f.push(&PREFACE[10..], &mut out).unwrap();
        let data = frame(DATA, 0, 3, &[5; 100]);
        // A split header is held until complete, then the payload flows.
        f.push(&data[..4], &mut out).unwrap();
        assert_eq!(out.len(), 24);
        f.push(&data[4..20], &mut out).unwrap();
        assert_eq!(out.len(), 24 + 20);
        f.push(&data[20..], &mut out).unwrap();
        // A WINDOW_UPDATE is held until its 4 octets are in.
        let wu = window_update(0, 80);
        f.push(&wu[..11], &mut out).unwrap();
        assert_eq!(out, with_preface(std::slice::from_ref(&data)));
        f.push(&wu[11..], &mut out).unwrap();
        assert_eq!(out, with_preface(&[data, window_update(0, 30)]));
        assert_eq!(f.debt(), 0);
    }

    #[test]
    fn h2c_filter_split_anywhere() {
        let input = with_preface(&[
            client_settings(),
            window_update(1, 7),
            window_update(0, 40),
            frame(HEADERS, END_HEADERS, 3, b"\x82\x84"),
            frame(DATA, 0, 3, &[1; 33]),
            frame(DATA, 0, 3, &[]),
            window_update(0, 40),
            frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]),
            frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 1]),
            window_update(0, 40),
        ]);
        let whole = filter_all(1, 100, &input);
        assert_eq!(whole.2, 0);
        assert_eq!(filter_bytewise(1, 100, &input), whole);
        for cut in 0..=input.len() {
            let mut f = ClientFrameFilter::new(1, 100);
            let mut out = Vec::new();
            f.push(&input[..cut], &mut out).unwrap();
            f.push(&input[cut..], &mut out).unwrap();
            assert_eq!((out, Ok(()), f.debt()), whole, "cut at {cut}");
        }
    }

    // ---- server frame splice ----

    fn server_settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 200, 0, 8, 0, 0, 0, 1])
    }

    #[test]
    fn h2c_splice_after_first_frame() {
        let insert = encode_response(1, 200, &[], b"ok", &PeerSettings::default()).unwrap();
        let rest = [window_update(0, 1000), frame(0x4, 1, 0, &[])].concat();
        let server = [server_settings(), rest.clone()].concat();
        let want = [server_settings(), insert.clone(), rest].concat();

        let mut s = ServerFrameSplice::new(insert.clone());
        let mut out = Vec::new();
        assert!(!s.done());
        s.push(&server, &mut out);
        assert!(s.done());
        assert_eq!(out, want);

        for cut in 0..=server.len() {
            let mut s = ServerFrameSplice::new(insert.clone());
            let mut out = Vec::new();
            s.push(&server[..cut], &mut out);
            assert_eq!(s.done(), cut >= server_settings().len(), "cut at {cut}");
            // What has come out is the input so far (the insert once due).
            if !s.done() {
                assert_eq!(out, &server[..cut]);
            }
            s.push(&server[cut..], &mut out);
            assert_eq!(out, want, "cut at {cut}");
        }

        let mut s = ServerFrameSplice::new(insert.clone());
        let mut out = Vec::new();
        for b in &server {
            s.push(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, want);
        s.push(b"later", &mut out);
        assert!(out.ends_with(b"later"));
    }

    #[test]
    fn h2c_splice_empty_settings_and_empty_pushes() {
        let empty = frame(0x4, 0, 0, &[]);
        let mut s = ServerFrameSplice::new(b"INSERT".to_vec());
        let mut out = Vec::new();
        s.push(b"", &mut out);
        s.push(&empty[..8], &mut out);
        assert!(!s.done() && out == empty[..8]);
        s.push(&empty[8..], &mut out);
        assert!(s.done());
        assert_eq!(out, [&empty[..], b"INSERT"].concat());
        s.push(b"", &mut out);
        assert_eq!(out, [&empty[..], b"INSERT"].concat());

        let mut s = ServerFrameSplice::new(Vec::new());
        let mut out = Vec::new();
        s.push(&server_settings(), &mut out);
        assert!(s.done());
        assert_eq!(out, server_settings());
    }

    #[test]
    fn a_servers_preface_is_its_first_settings_frame() {
        let frame = |ty: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut f = vec![0, (payload.len() >> 8) as u8, payload.len() as u8, ty, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let enable = [0, 8, 0, 0, 0, 1, 0, 4, 0, 1, 0, 0];
        let f = frame(0x4, 0, 0, &enable);
        for n in 0..f.len() {
            assert_eq!(server_preface(&f[..n]), Ok(None), "{n} bytes");
        }
        let mut more = f.clone();
        more.extend_from_slice(&frame(0x8, 0, 0, &[0, 0, 0, 1]));
        let (s, len) = server_preface(&more).unwrap().unwrap();
        assert_eq!(len, f.len());
        assert!(s.enable_connect_protocol);
        assert_eq!(s.initial_window_size, 65_536);
        let (s, len) = server_preface(&frame(0x4, 0, 0, &[])).unwrap().unwrap();
        assert_eq!((s, len), (PeerSettings::default(), 9));
        assert!(!s.enable_connect_protocol, "off unless announced (RFC 8441 section 3)");
        assert_eq!(server_preface(&frame(0x0, 0, 1, b"x")), Err(PrefaceError::NotSettings(0)));
        assert_eq!(server_preface(&frame(0x4, 1, 0, &[])), Err(PrefaceError::Malformed), "ACK");
        assert_eq!(server_preface(&frame(0x4, 0, 3, &[])), Err(PrefaceError::Malformed), "on a stream");
        assert_eq!(
            server_preface(&frame(0x4, 0, 0, &[0, 8, 0, 0, 0, 2])),
            Err(PrefaceError::Settings(SettingsError::EnableConnectProtocol(2)))
        );
        assert_eq!(
            server_preface(&frame(0x4, 0, 0, &[0, 8, 0])),
            Err(PrefaceError::Settings(SettingsError::PayloadLength(3)))
        );
        let mut long = frame(0x4, 0, 0, &[]);
        long[0] = 1;
        assert_eq!(server_preface(&long), Err(PrefaceError::Malformed), "longer than 16384 octets");
    }
}

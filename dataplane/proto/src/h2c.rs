//! Cleartext HTTP/2 for the TCP front: telling the connection preface from
//! HTTP/1.1, the `HTTP2-Settings` field of an h2c Upgrade, and the two
//! frame-level shims that let an HTTP/2 server that knows nothing of the
//! upgrade (the `h2` crate) run after one.
//!
//! RFC 7540 section 3.2 (deprecated by RFC 9113, accepted for old
//! clients): after `101 Switching Protocols` the server's first frame is
//! its SETTINGS, and the upgraded request is stream 1, half-closed by the
//! client, answered by the server. Here the relay answers stream 1 itself
//! ([`encode_response`]), [`ServerFrameSplice`] puts that answer right after
//! the server's SETTINGS, and [`ClientFrameFilter`] removes the client's
//! frames about stream 1 — and the connection-level flow-control window
//! the answer used — before the server sees them, so it never meets a
//! stream it did not open nor sends more than the client allowed.
#![forbid(unsafe_code)]

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame header length (RFC 9113 section 4.1).
const FRAME_HEADER: usize = 9;
/// WINDOW_UPDATE (RFC 9113 section 6.9).
const WINDOW_UPDATE: u8 = 0x8;
/// RST_STREAM (section 6.4).
const RST_STREAM: u8 = 0x3;
/// PRIORITY (section 6.3).
const PRIORITY: u8 = 0x2;
/// HEADERS, CONTINUATION and DATA (sections 6.2, 6.10, 6.1).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// Longest HTTP2-Settings value decoded.
const MAX_SETTINGS_FIELD: usize = 1024;

/// What the first bytes on a cleartext connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A proper prefix of the preface (or nothing yet): wait.
    NeedMore,
    /// The whole preface: HTTP/2 with prior knowledge (RFC 9113 section 3.3).
    H2PriorKnowledge,
    /// Anything else: HTTP/1.1.
    Http1,
    /// A TLS record (a client speaking TLS to the cleartext port).
    Tls,
}

/// Classifies the first bytes of a cleartext connection.
pub fn sniff(prefix: &[u8]) -> Sniff {
    if prefix.len() >= 2 && prefix[0] == 0x16 && prefix[1] == 0x03 {
        return Sniff::Tls;
    }
    let n = prefix.len().min(PREFACE.len());
    if prefix[..n] != PREFACE[..n] {
        return if prefix.first() == Some(&0x16) && prefix.len() < 2 {
            Sniff::NeedMore
        } else {
            Sniff::Http1
        };
    }
    if n == PREFACE.len() { Sniff::H2PriorKnowledge } else { Sniff::NeedMore }
}

/// SETTINGS values a peer announced (RFC 9113 section 6.5.2), with the
/// protocol's defaults for those it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSettings {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub header_table_size: u32,
    /// SETTINGS_ENABLE_PUSH.
    pub enable_push: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub initial_window_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: Option<u32>,
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441).
    pub enable_connect_protocol: bool,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            header_table_size: 4096,
            enable_push: true,
            max_concurrent_streams: None,
            initial_window_size: 65_535,
            max_frame_size: 16_384,
            max_header_list_size: None,
            enable_connect_protocol: false,
        }
    }
}

/// Why an HTTP2-Settings value is refused (the server then does not
/// upgrade, RFC 7540 section 3.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Longer than this relay decodes.
    #[error("HTTP2-Settings is too long")]
    TooLong,
    /// Not base64url (RFC 4648 section 5) without padding.
    #[error("HTTP2-Settings is not base64url")]
    NotBase64Url,
    /// The payload is not a whole number of 6-byte settings.
    #[error("HTTP2-Settings payload is not a multiple of 6 bytes")]
    BadLength,
    /// A value outside its range (RFC 9113 section 6.5.2).
    #[error("HTTP2-Settings value out of range for setting {0:#x}")]
    OutOfRange(u16),
}

fn b64url_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

/// Strict base64url without padding: trailing bits must be zero, so every
/// payload has one spelling. (Padding '=' is tolerated at the end: some
/// clients send it although token68 allows it and RFC 7540 says to omit it.)
fn decode_b64url(s: &str) -> Result<Vec<u8>, SettingsError> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in s.as_bytes() {
        let v = b64url_value(c).ok_or(SettingsError::NotBase64Url)?;
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot encode a byte; leftover
    // bits must be zero.
    if bits >= 6 || acc != 0 {
        return Err(SettingsError::NotBase64Url);
    }
    Ok(out)
}

/// Decodes an HTTP2-Settings field value (RFC 7540 section 3.2.1: the
/// base64url-encoded payload of a SETTINGS frame). Unknown settings are
/// ignored (RFC 9113 section 6.5.2).
pub fn decode_http2_settings(value: &str) -> Result<PeerSettings, SettingsError> {
    if value.len() > MAX_SETTINGS_FIELD {
        return Err(SettingsError::TooLong);
    }
    let payload = decode_b64url(value)?;
    if payload.len() % 6 != 0 {
        return Err(SettingsError::BadLength);
    }
    let mut s = PeerSettings::default();
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let v = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
        match id {
            0x1 => s.header_table_size = v,
            0x2 if v <= 1 => s.enable_push = v == 1,
            0x3 => s.max_concurrent_streams = Some(v),
            0x4 if v <= i32::MAX as u32 => s.initial_window_size = v,
            0x5 if (16_384..=16_777_215).contains(&v) => s.max_frame_size = v,
            0x6 => s.max_header_list_size = Some(v),
            0x8 if v <= 1 => s.enable_connect_protocol = v == 1,
            0x2 | 0x4 | 0x5 | 0x8 => return Err(SettingsError::OutOfRange(id)),
            _ => {}
        }
    }
    Ok(s)
}

/// Why a response could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field name is empty or has an uppercase letter (RFC 9113 section
    /// 8.2.1).
    #[error("invalid field name")]
    BadName,
    /// The body is larger than the window the peer grants a new stream.
    #[error("body of {0} bytes exceeds the peer's initial window")]
    WindowTooSmall(usize),
    /// Stream 0 cannot carry a response.
    #[error("stream 0 cannot carry a response")]
    StreamZero,
}

/// HPACK integer (RFC 7541 section 5.1) with an `n`-bit prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, no Huffman coding
/// (RFC 7541 section 6.2.2): it leaves the peer's dynamic table alone.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

fn frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// Encodes a complete response on `stream_id`: HEADERS (and CONTINUATION
/// when the block exceeds the peer's frame size) with `:status` and
/// `fields`, then the body in DATA frames, END_STREAM on the last frame.
pub fn encode_response(
    stream_id: u32,
    status: u16,
    fields: &[(&str, &str)],
    body: &[u8],
    peer: &PeerSettings,
) -> Result<Vec<u8>, EncodeError> {
    if stream_id == 0 {
        return Err(EncodeError::StreamZero);
    }
    let window = peer.initial_window_size.min(65_535) as usize;
    if body.len() > window {
        return Err(EncodeError::WindowTooSmall(body.len()));
    }
    let mut block = Vec::new();
    hpack_literal(&mut block, b":status", status.to_string().as_bytes());
    for (name, value) in fields {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) || name.starts_with(':') {
            return Err(EncodeError::BadName);
        }
        hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
    }
    let max = peer.max_frame_size as usize;
    let mut out = Vec::with_capacity(block.len() + body.len() + 64);
    let mut chunks = block.chunks(max).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let ty = if first { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if first && body.is_empty() {
            flags |= END_STREAM;
        }
        frame_header(&mut out, chunk.len(), ty, flags, stream_id);
        out.extend_from_slice(chunk);
        first = false;
    }
    let mut chunks = body.chunks(max).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() { END_STREAM } else { 0 };
        frame_header(&mut out, chunk.len(), DATA, flags, stream_id);
        out.extend_from_slice(chunk);
    }
    Ok(out)
}

/// Why the client's byte stream is refused (the connection closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The connection preface is wrong.
    #[error("bad HTTP/2 connection preface")]
    BadPreface,
    /// A WINDOW_UPDATE frame whose length is not 4 (RFC 9113 section 6.9:
    /// FRAME_SIZE_ERROR).
    #[error("WINDOW_UPDATE frame of length {0}")]
    BadWindowUpdate(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterState {
    /// Matching the preface; bytes matched so far.
    Preface(usize),
    /// Collecting a frame header.
    Header,
    /// Passing `left` payload bytes through.
    Pass { left: usize },
    /// Dropping `left` payload bytes.
    Drop { left: usize },
    /// Collecting a connection WINDOW_UPDATE's 4 payload bytes to rewrite.
    Window,
}

/// Streams the client's bytes to the server, minus what concerns the stream
/// the relay answered itself and minus the connection window it used.
#[derive(Debug)]
pub struct ClientFrameFilter {
    answered: u32,
    debt: u32,
    state: FilterState,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    window: [u8; 4],
    window_len: usize,
}

impl ClientFrameFilter {
    /// A filter for a connection whose stream `answered_stream` the relay
    /// answered, owing `debt` bytes of connection window.
    pub fn new(answered_stream: u32, debt: u32) -> Self {
        Self {
            answered: answered_stream,
            debt,
            state: FilterState::Preface(0),
            header: [0; FRAME_HEADER],
            header_len: 0,
            window: [0; 4],
            window_len: 0,
        }
    }

    /// The window still owed.
    pub fn debt(&self) -> u32 {
        self.debt
    }

    /// Appends to `out` what the server should see of `input`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), FilterError> {
        while !input.is_empty() {
            match self.state {
                FilterState::Preface(done) => {
                    let take = (PREFACE.len() - done).min(input.len());
                    if input[..take] != PREFACE[done..done + take] {
                        return Err(FilterError::BadPreface);
                    }
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let done = done + take;
                    self.state =
                        if done == PREFACE.len() { FilterState::Header } else { FilterState::Preface(done) };
                }
                FilterState::Header => {
                    let take = (FRAME_HEADER - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
                    self.header_len += take;
                    input = &input[take..];
                    if self.header_len == FRAME_HEADER {
                        self.header_len = 0;
                        self.start_frame(out)?;
                    }
                }
                FilterState::Pass { left } => {
                    let take = left.min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if left == take {
                        FilterState::Header
                    } else {
                        FilterState::Pass { left: left - take }
                    };
                }
                FilterState::Drop { left } => {
                    let take = left.min(input.len());
                    input = &input[take..];
                    self.state = if left == take {
                        FilterState::Header
                    } else {
                        FilterState::Drop { left: left - take }
                    };
                }
                FilterState::Window => {
                    let take = (4 - self.window_len).min(input.len());
                    self.window[self.window_len..self.window_len + take].copy_from_slice(&input[..take]);
                    self.window_len += take;
                    input = &input[take..];
                    if self.window_len == 4 {
                        self.window_len = 0;
                        self.finish_window(out);
                        self.state = FilterState::Header;
                    }
                }
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, out: &mut Vec<u8>) -> Result<(), FilterError> {
        let h = self.header;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let ty = h[3];
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let about_answered = stream == self.answered && matches!(ty, WINDOW_UPDATE | RST_STREAM | PRIORITY);
        if about_answered {
            self.state = if len == 0 { FilterState::Header } else { FilterState::Drop { left: len } };
            return Ok(());
        }
        if ty == WINDOW_UPDATE && stream == 0 && self.debt > 0 {
            if len != 4 {
                return Err(FilterError::BadWindowUpdate(len));
            }
            self.state = FilterState::Window;
            return Ok(());
        }
        out.extend_from_slice(&h);
        self.state = if len == 0 { FilterState::Header } else { FilterState::Pass { left: len } };
        Ok(())
    }

    /// Takes what is owed out of a connection WINDOW_UPDATE; drops the
    /// frame if nothing is left of its increment (an increment of 0 is a
    /// PROTOCOL_ERROR, RFC 9113 section 6.9).
    fn finish_window(&mut self, out: &mut Vec<u8>) {
        let raw = u32::from_be_bytes(self.window);
        let reserved = raw & 0x8000_0000;
        let increment = raw & 0x7fff_ffff;
        if increment == 0 {
            // Pass it on: the server answers the protocol error.
            out.extend_from_slice(&self.header);
            out.extend_from_slice(&self.window);
            return;
        }
        let paid = self.debt.min(increment);
        self.debt -= paid;
        let left = increment - paid;
        if left == 0 {
            return;
        }
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&(reserved | left).to_be_bytes());
    }
}

/// Inserts bytes into the server's output right after its first complete
/// frame (the SETTINGS of the server preface), then passes everything on.
#[derive(Debug)]
pub struct ServerFrameSplice {
    insert: Option<Vec<u8>>,
    /// Bytes of the first frame still to pass before the insert (None
    /// until its header is complete).
    header: Vec<u8>,
    left: Option<usize>,
}

impl ServerFrameSplice {
    /// A splice that inserts `insert`.
    pub fn new(insert: Vec<u8>) -> Self {
        Self { insert: Some(insert), header: Vec::with_capacity(FRAME_HEADER), left: None }
    }

    /// Whether the insert has gone out.
    pub fn done(&self) -> bool {
        self.insert.is_none()
    }

    /// Appends `server_output` to `out`, with the insert in its place.
    pub fn push(&mut self, mut server_output: &[u8], out: &mut Vec<u8>) {
        while self.insert.is_some() && !server_output.is_empty() {
            match self.left {
                None => {
                    let take = (FRAME_HEADER - self.header.len()).min(server_output.len());
                    self.header.extend_from_slice(&server_output[..take]);
                    out.extend_from_slice(&server_output[..take]);
                    server_output = &server_output[take..];
                    if self.header.len() == FRAME_HEADER {
                        let h = &self.header;
                        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                        self.left = Some(len);
                    }
                }
                Some(left) => {
                    let take = left.min(server_output.len());
                    out.extend_from_slice(&server_output[..take]);
                    server_output = &server_output[take..];
                    self.left = Some(left - take);
                }
            }
            if self.left == Some(0)
                && let Some(insert) = self.insert.take()
            {
                out.extend_from_slice(&insert);
            }
        }
        out.extend_from_slice(server_output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(&mut out, payload.len(), ty, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn window_update(stream: u32, inc: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, stream, &inc.to_be_bytes())
    }

    #[test]
    fn sniffing_the_preface() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"PRI * HT"), Sniff::NeedMore);
        assert_eq!(sniff(PREFACE), Sniff::H2PriorKnowledge);
        assert_eq!(sniff(&[PREFACE.as_slice(), b"\0\0\0\x04"].concat()), Sniff::H2PriorKnowledge);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"PRX"), Sniff::Http1);
        assert_eq!(sniff(&[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniff::Tls);
    }

    #[test]
    fn http2_settings_values() {
        // What curl sends: 3 = MAX_CONCURRENT_STREAMS 100, 4 =
        // INITIAL_WINDOW_SIZE 33554432, 2 = ENABLE_PUSH 0.
        let s = decode_http2_settings("AAMAAABkAAQCAAAAAAIAAAAA").unwrap();
        assert_eq!(s.max_concurrent_streams, Some(100));
        assert_eq!(s.initial_window_size, 0x0200_0000);
        assert!(!s.enable_push);
        assert_eq!(s.max_frame_size, 16_384);
        assert_eq!(decode_http2_settings("").unwrap(), PeerSettings::default());
        assert_eq!(decode_http2_settings("AAMAAABk==").unwrap().max_concurrent_streams, Some(100));
        assert_eq!(decode_http2_settings("AAMAAAB"), Err(SettingsError::NotBase64Url));
        assert_eq!(
            decode_http2_settings("AAMAAAA"),
            Err(SettingsError::BadLength),
            "zero trailing bits, 5 bytes"
        );
        assert_eq!(
            decode_http2_settings("AA+AAABk"),
            Err(SettingsError::NotBase64Url),
            "'+' is base64, not url"
        );
        assert_eq!(decode_http2_settings("AAMA"), Err(SettingsError::BadLength));
        // ENABLE_PUSH = 2, MAX_FRAME_SIZE = 1, INITIAL_WINDOW_SIZE = 2^31.
        assert_eq!(decode_http2_settings("AAIAAAAC"), Err(SettingsError::OutOfRange(2)));
        assert_eq!(decode_http2_settings("AAUAAAAB"), Err(SettingsError::OutOfRange(5)));
        assert_eq!(decode_http2_settings("AASAAAAA"), Err(SettingsError::OutOfRange(4)));
        // Unknown settings are ignored.
        assert_eq!(decode_http2_settings("AP8AAAAB").unwrap(), PeerSettings::default());
        assert_eq!(decode_http2_settings(&"A".repeat(2000)), Err(SettingsError::TooLong));
    }

    /// A test-only decoder of what encode_response writes: frames, then
    /// the literal fields of the header block.
    fn decode_frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            out.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        out
    }

    fn hpack_read_int(b: &[u8], i: &mut usize, n: u8) -> usize {
        let max = (1usize << n) - 1;
        let mut v = usize::from(b[*i]) & max;
        *i += 1;
        if v < max {
            return v;
        }
        let mut m = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v += usize::from(byte & 0x7f) << m;
            m += 7;
            if byte & 0x80 == 0 {
                return v;
            }
        }
    }

    fn decode_literals(block: &[u8]) -> Vec<(String, String)> {
        let mut i = 0;
        let mut out = Vec::new();
        while i < block.len() {
            assert_eq!(block[i], 0, "literal without indexing, new name");
            i += 1;
            let n = hpack_read_int(block, &mut i, 7);
            let name = String::from_utf8(block[i..i + n].to_vec()).unwrap();
            i += n;
            let n = hpack_read_int(block, &mut i, 7);
            let value = String::from_utf8(block[i..i + n].to_vec()).unwrap();
            i += n;
            out.push((name, value));
        }
        out
    }

    #[test]
    fn responses_encode_as_headers_then_data() {
        let peer = PeerSettings::default();
        let out = encode_response(1, 200, &[("content-type", "application/json")], b"{}", &peer).unwrap();
        let frames = decode_frames(&out);
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].0, frames[0].1, frames[0].2), (HEADERS, END_HEADERS, 1));
        assert_eq!(
            decode_literals(&frames[0].3),
            vec![(":status".into(), "200".into()), ("content-type".into(), "application/json".into())]
        );
        assert_eq!((frames[1].0, frames[1].1, frames[1].3.as_slice()), (DATA, END_STREAM, &b"{}"[..]));
        // No body: END_STREAM on HEADERS.
        let frames = decode_frames(&encode_response(1, 404, &[], b"", &peer).unwrap());
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM);
        // A block over the frame size continues in CONTINUATION frames.
        let big = "x".repeat(20_000);
        let frames = decode_frames(&encode_response(1, 200, &[("x-big", &big)], b"", &peer).unwrap());
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].0, frames[0].1), (HEADERS, END_STREAM));
        assert_eq!((frames[1].0, frames[1].1), (CONTINUATION, END_HEADERS));
        let block = [frames[0].3.clone(), frames[1].3.clone()].concat();
        assert_eq!(decode_literals(&block)[1].1.len(), 20_000, "multi-byte HPACK length");
        assert_eq!(encode_response(1, 200, &[("Bad", "x")], b"", &peer), Err(EncodeError::BadName));
        assert_eq!(encode_response(0, 200, &[], b"", &peer), Err(EncodeError::StreamZero));
        let small = PeerSettings { initial_window_size: 1, ..peer };
        assert_eq!(encode_response(1, 200, &[], b"ab", &small), Err(EncodeError::WindowTooSmall(2)));
    }

    fn filtered(input: &[u8], stream: u32, debt: u32, step: usize) -> (Vec<u8>, u32) {
        let mut f = ClientFrameFilter::new(stream, debt);
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            f.push(chunk, &mut out).unwrap();
        }
        (out, f.debt())
    }

    #[test]
    fn the_filter_drops_stream_one_and_pays_the_debt() {
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let headers3 = frame(HEADERS, END_HEADERS, 3, b"\x82\x86");
        let input = [
            PREFACE.as_slice(),
            &settings,
            &window_update(1, 500),
            &frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]),
            &frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 16]),
            &window_update(0, 100),
            &window_update(0, 300),
            &headers3,
            &window_update(0, 1000),
        ]
        .concat();
        for step in [1, 3, 9, 1000] {
            let (out, debt) = filtered(&input, 1, 250, step);
            let expected =
                [PREFACE.as_slice(), &settings, &window_update(0, 150), &headers3, &window_update(0, 1000)]
                    .concat();
            assert_eq!(out, expected, "step {step}");
            assert_eq!(debt, 0);
        }
        // Stream 1's DATA and HEADERS pass: the server reports those errors.
        let data1 = frame(DATA, 0, 1, b"x");
        let (out, _) = filtered(&[PREFACE.as_slice(), &data1].concat(), 1, 0, 5);
        assert_eq!(&out[24..], data1.as_slice());
        let mut f = ClientFrameFilter::new(1, 0);
        assert_eq!(f.push(b"GET / HTTP/1.1", &mut Vec::new()), Err(FilterError::BadPreface));
        let mut f = ClientFrameFilter::new(1, 10);
        let bad = [PREFACE.as_slice(), &frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0, 1])].concat();
        assert_eq!(f.push(&bad, &mut Vec::new()), Err(FilterError::BadWindowUpdate(5)));
    }

    #[test]
    fn the_splice_goes_after_the_first_frame() {
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100, 0, 8, 0, 0, 0, 1]);
        let ping = frame(0x6, 0, 0, &[0; 8]);
        let server = [settings.as_slice(), &ping].concat();
        for step in [1, 4, 9, 10, 100] {
            let mut s = ServerFrameSplice::new(b"INSERT".to_vec());
            let mut out = Vec::new();
            for chunk in server.chunks(step) {
                s.push(chunk, &mut out);
            }
            assert!(s.done());
            assert_eq!(out, [settings.as_slice(), b"INSERT", &ping].concat(), "step {step}");
        }
        let mut s = ServerFrameSplice::new(b"X".to_vec());
        let mut out = Vec::new();
        s.push(&settings[..5], &mut out);
        assert!(!s.done());
        assert_eq!(out, &settings[..5]);
    }
}

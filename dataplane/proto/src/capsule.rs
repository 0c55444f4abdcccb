//! The Capsule Protocol (RFC 9297 section 3): a sequence of
//! `Type (i), Length (i), Value (..)` records carried in the request stream's
//! DATA frames once a tunnel is established.
//!
//! [`CapsuleDecoder`] is a bounded streaming decoder: it never holds more than
//! one capsule of at most `max_capsule_len` value bytes, and it skips unknown
//! capsule types without buffering them (RFC 9297 section 3.2: "Receivers
//! MUST silently drop unknown capsule types").

use crate::varint;

/// The DATAGRAM capsule type (RFC 9297 section 3.5).
pub const DATAGRAM: u64 = 0x00;

/// Why the capsule stream is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapsuleError {
    /// A known capsule announced a value longer than this endpoint accepts.
    #[error("capsule of type {capsule_type:#x} is {len} bytes, over the limit of {limit}")]
    TooLarge {
        /// The capsule type.
        capsule_type: u64,
        /// The announced length.
        len: u64,
        /// The configured limit.
        limit: usize,
    },
    /// The stream ended in the middle of a capsule. RFC 9297 section 3.3:
    /// the message is malformed.
    #[error("stream ended inside a capsule")]
    Truncated,
    /// More kept capsules arrived at once than the receiver holds.
    #[error("more than {limit} capsules waiting to be handled")]
    TooMany {
        /// The bound.
        limit: usize,
    },
}

/// One decoded capsule that this endpoint understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    /// A DATAGRAM capsule: an HTTP Datagram payload (context ID first).
    Datagram(Vec<u8>),
    /// A capsule of a type the decoder was told to keep
    /// ([`CapsuleDecoder::keep`]), e.g. connect-ip's ADDRESS_REQUEST.
    Other {
        /// Its type.
        capsule_type: u64,
        /// Its value.
        value: Vec<u8>,
    },
}

#[derive(Debug)]
enum State {
    /// Collecting the type and length varints in `header`.
    Header,
    /// Collecting `remaining` value bytes of a kept capsule.
    Value { capsule_type: u64, remaining: usize },
    /// Discarding `remaining` bytes of an unknown capsule.
    Skip { remaining: u64 },
}

/// A streaming, bounded capsule decoder.
#[derive(Debug)]
pub struct CapsuleDecoder {
    state: State,
    header: [u8; 16],
    header_len: usize,
    value: Vec<u8>,
    max_capsule_len: usize,
    skipped_capsules: u64,
    kept_types: &'static [u64],
}

impl CapsuleDecoder {
    /// A decoder that accepts known capsules of up to `max_capsule_len`
    /// value bytes.
    pub fn new(max_capsule_len: usize) -> Self {
        Self {
            state: State::Header,
            header: [0; 16],
            header_len: 0,
            value: Vec::new(),
            max_capsule_len,
            skipped_capsules: 0,
            kept_types: &[],
        }
    }

    /// Also keeps capsules of `types` (delivered as [`Capsule::Other`],
    /// bounded by the same length limit) instead of skipping them.
    pub fn keep(mut self, types: &'static [u64]) -> Self {
        self.kept_types = types;
        self
    }

    /// Number of unknown capsules skipped so far.
    pub fn skipped_capsules(&self) -> u64 {
        self.skipped_capsules
    }

    /// Whether the decoder sits between capsules, so that the stream may end
    /// here without truncating one.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header) && self.header_len == 0
    }

    /// Reports the end of the stream: an error if it cut a capsule short.
    pub fn finish(&self) -> Result<(), CapsuleError> {
        if self.at_boundary() { Ok(()) } else { Err(CapsuleError::Truncated) }
    }

    /// Feeds `input` and calls `on_capsule` for every complete known
    /// capsule. Bytes are consumed entirely unless an error is returned,
    /// after which the decoder must not be used again.
    pub fn feed(&mut self, input: &[u8], mut on_capsule: impl FnMut(Capsule)) -> Result<(), CapsuleError> {
        self.feed_ref(input, |capsule_type, value| {
            on_capsule(if capsule_type == DATAGRAM {
                Capsule::Datagram(value.to_vec())
            } else {
                Capsule::Other { capsule_type, value: value.to_vec() }
            })
        })
    }

    /// Like [`Self::feed`], but hands each complete known capsule's type and
    /// value as a borrowed slice: straight from `input` when the whole value
    /// is in it (no copy, no allocation), otherwise from the decoder's
    /// buffer, where a capsule split across calls was collected.
    pub fn feed_ref(
        &mut self,
        mut input: &[u8],
        mut on_capsule: impl FnMut(u64, &[u8]),
    ) -> Result<(), CapsuleError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header => {
                    let take = (self.header.len() - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
                    let avail = self.header_len + take;
                    let parsed = varint::decode(&self.header[..avail]).and_then(|(t, tl)| {
                        varint::decode(&self.header[tl..avail]).map(|(l, ll)| (t, l, tl + ll))
                    });
                    match parsed {
                        Err(varint::VarintError::Incomplete) => {
                            self.header_len = avail;
                            input = &input[take..];
                        }
                        Ok((capsule_type, len, used)) => {
                            // Bytes of `input` that belonged to the header.
                            let consumed = used - self.header_len;
                            input = &input[consumed..];
                            self.header_len = 0;
                            if capsule_type == DATAGRAM || self.kept_types.contains(&capsule_type) {
                                if len > self.max_capsule_len as u64 {
                                    return Err(CapsuleError::TooLarge {
                                        capsule_type,
                                        len,
                                        limit: self.max_capsule_len,
                                    });
                                }
                                let len = len as usize;
                                if len <= input.len() {
                                    // The whole value is here: no copy.
                                    on_capsule(capsule_type, &input[..len]);
                                    input = &input[len..];
                                } else {
                                    self.value.clear();
                                    self.state = State::Value { capsule_type, remaining: len };
                                }
                            } else {
                                self.skipped_capsules += 1;
                                self.state = State::Skip { remaining: len };
                            }
                        }
                    }
                }
                State::Value { capsule_type, remaining } => {
                    let take = (*remaining).min(input.len());
                    self.value.extend_from_slice(&input[..take]);
                    *remaining -= take;
                    input = &input[take..];
                    if *remaining == 0 {
                        let capsule_type = *capsule_type;
                        self.state = State::Header;
                        on_capsule(capsule_type, &self.value);
                    }
                }
                State::Skip { remaining } => {
                    let take = (*remaining).min(input.len() as u64);
                    *remaining -= take;
                    input = &input[take as usize..];
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        if let State::Skip { remaining: 0 } = self.state {
            self.state = State::Header;
        }
        Ok(())
    }
}

/// Appends a capsule of `capsule_type` with `value` to `out`.
pub fn encode(capsule_type: u64, value: &[u8], out: &mut Vec<u8>) {
    varint::push(capsule_type, out);
    varint::push(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// Appends a DATAGRAM capsule carrying a connect-udp payload with
/// `context_id` to `out`, without building the HTTP Datagram separately.
pub fn encode_datagram(context_id: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = varint::encoded_len(context_id) + payload.len();
    varint::push(DATAGRAM, out);
    varint::push(len as u64, out);
    varint::push(context_id, out);
    out.extend_from_slice(payload);
}

/// Longest DATAGRAM capsule header [`datagram_header`] writes: type,
/// length and context ID, each a varint of at most 8 bytes.
pub const MAX_DATAGRAM_HEADER: usize = 3 * varint::MAX_LEN;

/// Writes the header of a DATAGRAM capsule carrying `payload_len` bytes on
/// `context_id` (what [`encode_datagram`] puts before the payload) into
/// `out`; returns its length. For buffers that are not a `Vec`.
pub fn datagram_header(context_id: u64, payload_len: usize, out: &mut [u8; MAX_DATAGRAM_HEADER]) -> usize {
    let len = varint::encoded_len(context_id) + payload_len;
    let mut n = 0;
    for v in [DATAGRAM, len as u64, context_id] {
        // 24 bytes hold three varints of at most 8 bytes each.
        n += varint::encode(v, &mut out[n..]).unwrap_or(0);
    }
    n
}

/// Follows a capsule stream relayed as bytes (it is never buffered or
/// re-framed) and says where one capsule ends and the next begins, so an
/// intermediary can put a capsule of its own between two of them (a
/// WebTransport relay's WT_DRAIN_SESSION). Bounded state: at most one
/// partial header (two varints, 16 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Boundaries {
    /// The partial header of the capsule being read (type, length).
    header: Vec<u8>,
    /// Value bytes of the current capsule still to come.
    value_left: u64,
}

impl Boundaries {
    /// A stream at its start (a boundary).
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.value_left > 0 {
                let k = (self.value_left.min(bytes.len() as u64)) as usize;
                self.value_left -= k as u64;
                bytes = &bytes[k..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            let Ok((_, tlen)) = varint::decode(&self.header) else { continue };
            let Ok((len, llen)) = varint::decode(&self.header[tlen..]) else { continue };
            debug_assert_eq!(tlen + llen, self.header.len());
            self.header.clear();
            self.value_left = len;
        }
    }

    /// Whether the bytes so far end exactly after a whole capsule.
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.value_left == 0
    }
}

/// WT_DRAIN_SESSION (draft-ietf-webtrans-http3 section 4.7): type 0x78ae,
/// no value.
pub const WT_DRAIN_SESSION: u64 = 0x78ae;

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<Capsule>, CapsuleError> {
        let mut d = CapsuleDecoder::new(2048);
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            d.feed(piece, |c| got.push(c))?;
        }
        d.finish()?;
        Ok(got)
    }

    #[test]
    fn datagram_capsules_survive_any_split() {
        let mut bytes = Vec::new();
        encode_datagram(0, b"first", &mut bytes);
        encode(0x1234_5678, &[9; 300], &mut bytes); // unknown: skipped
        encode_datagram(0, &[7; 1500], &mut bytes);
        encode_datagram(0, b"", &mut bytes);
        for chunk in [1, 2, 3, 7, 64, 10_000] {
            let got = decode_all(&bytes, chunk).unwrap();
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(got[0], Capsule::Datagram([&[0u8][..], b"first"].concat()));
            assert_eq!(got[1], Capsule::Datagram([&[0u8][..], &[7; 1500]].concat()));
            assert_eq!(got[2], Capsule::Datagram(vec![0]));
        }
    }

    #[test]
    fn kept_types_are_delivered_and_others_still_skipped() {
        let mut d = CapsuleDecoder::new(64).keep(&[0x02]);
        let mut bytes = Vec::new();
        encode(0x02, &[1, 4, 0, 0, 0, 0, 32], &mut bytes);
        encode(0x29, &[9; 10], &mut bytes);
        encode_datagram(0, b"x", &mut bytes);
        let mut got = Vec::new();
        // Byte by byte: values split across reads are reassembled.
        for b in &bytes {
            d.feed(std::slice::from_ref(b), |c| got.push(c)).unwrap();
        }
        assert_eq!(
            got,
            vec![
                Capsule::Other { capsule_type: 0x02, value: vec![1, 4, 0, 0, 0, 0, 32] },
                Capsule::Datagram(vec![0, b'x']),
            ]
        );
        assert_eq!(d.skipped_capsules(), 1);
        let mut big = Vec::new();
        encode(0x02, &[0; 65], &mut big);
        assert!(matches!(
            CapsuleDecoder::new(64).keep(&[0x02]).feed(&big, |_| {}),
            Err(CapsuleError::TooLarge { capsule_type: 0x02, .. })
        ));
    }

    #[test]
    fn unknown_capsules_are_skipped_without_buffering() {
        let mut d = CapsuleDecoder::new(16);
        let mut header = Vec::new();
        varint::push(0x29, &mut header);
        varint::push(1 << 40, &mut header); // huge but unknown: fine to skip
        d.feed(&header, |_| panic!("nothing to emit")).unwrap();
        d.feed(&[0; 4096], |_| panic!("nothing to emit")).unwrap();
        assert_eq!(d.skipped_capsules(), 1);
        assert!(!d.at_boundary());
    }

    #[test]
    fn oversize_datagram_capsule_is_refused() {
        let mut bytes = Vec::new();
        encode_datagram(0, &[0; 100], &mut bytes);
        let mut d = CapsuleDecoder::new(50);
        assert!(matches!(d.feed(&bytes, |_| {}), Err(CapsuleError::TooLarge { len: 101, .. })));
    }

    #[test]
    fn borrowed_values_match_and_headers_match_the_encoder() {
        let mut bytes = Vec::new();
        encode_datagram(0, &[5; 1200], &mut bytes);
        encode(0x02, &[1, 2, 3], &mut bytes);
        encode_datagram(2, b"", &mut bytes);
        for chunk in [1, 5, 1000, 10_000] {
            let mut d = CapsuleDecoder::new(2048).keep(&[0x02]);
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                d.feed_ref(piece, |t, v| got.push((t, v.to_vec()))).unwrap();
            }
            assert!(d.at_boundary());
            let want = vec![
                (DATAGRAM, [&[0u8][..], &[5; 1200]].concat()),
                (0x02, vec![1, 2, 3]),
                (DATAGRAM, vec![2]),
            ];
            assert_eq!(got, want, "chunk {chunk}");
        }
        for (ctx, len) in [(0u64, 0usize), (0, 1200), (2, 70_000), (1 << 40, 5)] {
            let mut h = [0; MAX_DATAGRAM_HEADER];
            let n = datagram_header(ctx, len, &mut h);
            let mut full = Vec::new();
            encode_datagram(ctx, &vec![0; len], &mut full);
            assert_eq!(&h[..n], &full[..n]);
            assert_eq!(full.len(), n + len);
        }
    }

    #[test]
    fn truncation_is_detected() {
        let mut bytes = Vec::new();
        encode_datagram(0, b"abc", &mut bytes);
        for cut in 1..bytes.len() {
            assert_eq!(decode_all(&bytes[..cut], 1), Err(CapsuleError::Truncated), "cut {cut}");
        }
        assert!(decode_all(&[], 1).unwrap().is_empty());
    }

    #[test]
    fn boundaries_follow_capsules_split_anywhere() {
        let mut stream = Vec::new();
        encode(0x2843, b"\0\0\0\x2abye", &mut stream);
        encode(WT_DRAIN_SESSION, b"", &mut stream);
        encode(0x190b4d3d, &[7; 300], &mut stream);
        let ends = {
            let mut ends = Vec::new();
            let mut at = 0;
            for (t, v) in [(0x2843u64, 7usize), (WT_DRAIN_SESSION, 0), (0x190b4d3d, 300)] {
                at += varint::encoded_len(t) + varint::encoded_len(v as u64) + v;
                ends.push(at);
            }
            ends
        };
        // Byte by byte: a boundary exactly at 0 and after each capsule.
        let mut b = Boundaries::new();
        assert!(b.at_boundary());
        for (i, byte) in stream.iter().enumerate() {
            b.feed(std::slice::from_ref(byte));
            assert_eq!(b.at_boundary(), ends.contains(&(i + 1)), "after byte {i}");
        }
        // In chunks of every size, the same answer at the end of each chunk.
        for chunk in 1..stream.len() {
            let mut b = Boundaries::new();
            let mut fed = 0;
            for part in stream.chunks(chunk) {
                b.feed(part);
                fed += part.len();
                assert_eq!(b.at_boundary(), ends.contains(&fed), "chunk {chunk}, {fed} bytes");
            }
        }
    }
}

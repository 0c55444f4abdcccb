//! HTTP Datagram framing on HTTP/3 (RFC 9297 section 2.1) and the
//! connect-udp payload format (RFC 9298 section 5).
//!
//! A QUIC DATAGRAM frame payload is `Quarter Stream ID (i), HTTP Datagram
//! Payload (..)`; for connect-udp the HTTP Datagram payload is
//! `Context ID (i), UDP Proxying Payload (..)`, where context ID 0 carries a
//! whole UDP payload.

use crate::varint;

/// Context ID that carries UDP payloads (RFC 9298 section 4).
pub const UDP_PAYLOAD_CONTEXT: u64 = 0;

/// Largest quarter stream ID a datagram may carry: client-initiated
/// bidirectional stream IDs are below 2^62, so quarter IDs are below 2^60.
/// RFC 9297 section 2.1: a larger value is a connection error of type
/// H3_DATAGRAM_ERROR.
pub const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// Bytes a frame header can take at most (two 8-byte varints).
pub const MAX_HEADER_LEN: usize = 16;

/// A decoded HTTP/3 datagram carrying connect-udp data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H3Datagram<'a> {
    /// The request stream this datagram belongs to (quarter ID * 4).
    pub stream_id: u64,
    /// The context ID; only [`UDP_PAYLOAD_CONTEXT`] is defined by RFC 9298.
    pub context_id: u64,
    /// The UDP payload (for context 0) or the opaque context payload.
    pub payload: &'a [u8],
}

/// Why a QUIC DATAGRAM payload is not a valid HTTP/3 datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The frame ends inside the quarter stream ID. RFC 9297 section 2.1
    /// treats this as a connection error of type H3_DATAGRAM_ERROR.
    #[error("datagram truncated inside the quarter stream ID")]
    TruncatedQuarterStreamId,
    /// The quarter stream ID cannot belong to a client-initiated
    /// bidirectional stream (H3_DATAGRAM_ERROR).
    #[error("quarter stream ID {0} is out of range")]
    QuarterStreamIdOutOfRange(u64),
    /// The HTTP Datagram payload ends inside the context ID. RFC 9298
    /// section 5 lets the receiver drop such datagrams silently.
    #[error("datagram truncated inside the context ID")]
    TruncatedContextId,
}

impl DatagramError {
    /// Whether RFC 9297 makes this a connection error (H3_DATAGRAM_ERROR)
    /// rather than a datagram to drop.
    pub fn is_connection_error(self) -> bool {
        !matches!(self, DatagramError::TruncatedContextId)
    }
}

/// Splits a QUIC DATAGRAM frame payload into the request stream it belongs
/// to and its HTTP Datagram Payload (RFC 9297 section 2.1), whatever the
/// payload's format (connect-udp's context ID, or a WebTransport
/// session's bare payload).
pub fn split(frame: &[u8]) -> Result<(u64, &[u8]), DatagramError> {
    let (quarter, qlen) = varint::decode(frame).map_err(|_| DatagramError::TruncatedQuarterStreamId)?;
    if quarter > MAX_QUARTER_STREAM_ID {
        return Err(DatagramError::QuarterStreamIdOutOfRange(quarter));
    }
    Ok((quarter * 4, &frame[qlen..]))
}

/// Parses an HTTP Datagram Payload of connect-udp (after [`split`]).
pub fn decode_payload(stream_id: u64, rest: &[u8]) -> Result<H3Datagram<'_>, DatagramError> {
    let (context_id, clen) = varint::decode(rest).map_err(|_| DatagramError::TruncatedContextId)?;
    Ok(H3Datagram { stream_id, context_id, payload: &rest[clen..] })
}

/// Parses a QUIC DATAGRAM frame payload as an HTTP/3 datagram.
pub fn decode(frame: &[u8]) -> Result<H3Datagram<'_>, DatagramError> {
    let (stream_id, rest) = split(frame)?;
    decode_payload(stream_id, rest)
}

/// Writes the datagram header for `stream_id` and context 0 into `out` and
/// returns its length. `stream_id` must be a client-initiated bidirectional
/// stream ID (a multiple of 4).
pub fn encode_header(stream_id: u64, context_id: u64, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
    debug_assert_eq!(stream_id % 4, 0, "datagrams belong to client bidi streams");
    let q = varint::encode(stream_id / 4, out).expect("16 bytes fit two varints");
    q + varint::encode(context_id, &mut out[q..]).expect("16 bytes fit two varints")
}

/// Number of header bytes [`encode_header`] writes for `stream_id` and
/// `context_id`; the usable UDP payload is the QUIC datagram room minus this.
pub fn header_len(stream_id: u64, context_id: u64) -> usize {
    varint::encoded_len(stream_id / 4) + varint::encoded_len(context_id)
}

/// Builds a whole datagram frame payload into `out` (cleared first).
pub fn encode_into(stream_id: u64, context_id: u64, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let hlen = encode_header(stream_id, context_id, &mut header);
    out.clear();
    out.reserve(hlen + payload.len());
    out.extend_from_slice(&header[..hlen]);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        encode_into(8, 0, b"hello", &mut out);
        assert_eq!(out, [0x02, 0x00, b'h', b'e', b'l', b'l', b'o']);
        let d = decode(&out).unwrap();
        assert_eq!(d, H3Datagram { stream_id: 8, context_id: 0, payload: b"hello" });
        assert_eq!(header_len(8, 0), 2);
    }

    #[test]
    fn large_stream_and_context_ids() {
        let mut out = Vec::new();
        encode_into(4 * 100_000, 77, b"", &mut out);
        let d = decode(&out).unwrap();
        assert_eq!((d.stream_id, d.context_id, d.payload), (400_000, 77, &b""[..]));
    }

    #[test]
    fn errors() {
        assert_eq!(decode(&[]), Err(DatagramError::TruncatedQuarterStreamId));
        assert_eq!(decode(&[0x40]), Err(DatagramError::TruncatedQuarterStreamId));
        assert_eq!(decode(&[0x04]), Err(DatagramError::TruncatedContextId));
        let big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];
        assert!(matches!(decode(&big), Err(DatagramError::QuarterStreamIdOutOfRange(_))));
        assert!(DatagramError::TruncatedQuarterStreamId.is_connection_error());
        assert!(!DatagramError::TruncatedContextId.is_connection_error());
    }
}

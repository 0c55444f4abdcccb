//! QUIC variable-length integers (RFC 9000 section 16), used by HTTP/3
//! datagrams and capsules.

/// Most bytes a varint takes.
pub const MAX_LEN: usize = 8;

/// Largest value a varint can carry (2^62 - 1).
pub const MAX: u64 = (1 << 62) - 1;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    /// The buffer ends before the varint does; more bytes may complete it.
    Incomplete,
}

/// Decodes one varint from the front of `buf`, returning the value and the
/// number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<(u64, usize), VarintError> {
    let first = *buf.first().ok_or(VarintError::Incomplete)?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return Err(VarintError::Incomplete);
    }
    let mut value = u64::from(first & 0x3f);
    for byte in &buf[1..len] {
        value = (value << 8) | u64::from(*byte);
    }
    Ok((value, len))
}

/// Number of bytes needed to encode `value`.
///
/// # Panics
/// Panics if `value` exceeds [`MAX`]; callers only encode values they built.
pub const fn encoded_len(value: u64) -> usize {
    if value < 1 << 6 {
        1
    } else if value < 1 << 14 {
        2
    } else if value < 1 << 30 {
        4
    } else if value <= MAX {
        8
    } else {
        panic!("varint out of range")
    }
}

/// Encodes `value` at the front of `out` and returns the number of bytes
/// written, or `None` if `out` is too short.
pub fn encode(value: u64, out: &mut [u8]) -> Option<usize> {
    let len = encoded_len(value);
    if out.len() < len {
        return None;
    }
    let tag: u8 = match len {
        1 => 0x00,
        2 => 0x40,
        4 => 0x80,
        _ => 0xc0,
    };
    for (i, byte) in out[..len].iter_mut().enumerate() {
        *byte = (value >> (8 * (len - 1 - i))) as u8;
    }
    out[0] |= tag;
    Some(len)
}

/// Appends `value` to `out`.
pub fn push(value: u64, out: &mut Vec<u8>) {
    let mut tmp = [0u8; 8];
    let len = encode(value, &mut tmp).expect("8 bytes fit any varint");
    out.extend_from_slice(&tmp[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9000_appendix_a_examples() {
        let cases: &[(&[u8], u64)] = &[
            (&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c], 151_288_809_941_952_652),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
            (&[0x40, 0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(decode(bytes), Ok((*value, bytes.len())));
        }
    }

    #[test]
    fn round_trips_at_every_boundary() {
        for value in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, MAX] {
            let mut out = Vec::new();
            push(value, &mut out);
            assert_eq!(out.len(), encoded_len(value));
            assert_eq!(decode(&out), Ok((value, out.len())));
        }
    }

    #[test]
    fn truncated_input_is_incomplete() {
        assert_eq!(decode(&[]), Err(VarintError::Incomplete));
        assert_eq!(decode(&[0x40]), Err(VarintError::Incomplete));
        assert_eq!(decode(&[0xc2, 0x19, 0x7c]), Err(VarintError::Incomplete));
    }

    #[test]
    fn encode_refuses_short_buffer() {
        let mut out = [0u8; 1];
        assert_eq!(encode(64, &mut out), None);
    }
}

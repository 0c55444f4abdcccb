//! Base64url without padding (RFC 4648 section 5), strict on decode: one
//! encoding per byte string. Used by the relay's HMAC tokens and by
//! Privacy Pass (RFC 9577), both parsed from bytes a client chose.
#![forbid(unsafe_code)]

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Each byte's value in [`B64URL`], 0xff for bytes outside it (a table:
/// Privacy Pass tokens are about 470 characters, decoded on every CONNECT).
const B64URL_VALUES: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 64 {
        t[B64URL[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Base64url without padding (RFC 4648 section 5).
pub fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(B64URL[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Strict base64url without padding: refuses padding, other alphabets, a
/// dangling single character and non-zero unused bits, so each byte string
/// has exactly one encoding.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let value = |c: u8| match B64URL_VALUES[usize::from(c)] {
        0xff => None,
        v => Some(u32::from(v)),
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        // The bits below the last whole byte must be zero.
        if n & ((1u32 << (24 - 8 * bytes)) - 1) != 0 {
            return None;
        }
        out.extend_from_slice(&n.to_be_bytes()[1..=bytes]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length_and_refuses_non_canonical_input() {
        for n in 0..40usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 5) as u8).collect();
            let e = base64url_encode(&data);
            assert!(!e.contains('='));
            assert_eq!(base64url_decode(&e), Some(data));
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
        // Padding, the standard alphabet, a dangling character, and
        // non-zero unused bits are refused.
        for bad in ["-_8=", "+/8", "A", "AAAAA", "-_9"] {
            assert_eq!(base64url_decode(bad), None, "{bad}");
        }
    }
}

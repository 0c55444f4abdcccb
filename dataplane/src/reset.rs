//! Stateless resets (RFC 9000 section 10.3): a worker that receives a
//! short-header packet for a connection it does not know (the relay
//! restarted, the balancer moved the client to another host, the
//! connection timed out here) answers with a Stateless Reset, so the client
//! closes at once instead of waiting for its idle timeout.
//!
//! Tokens are derived from the connection ID with a static key (section
//! 10.3.2): `HMAC-SHA256(key, label || cid)`, first 16 bytes. Every worker
//! and, in a fleet, every host has the same key (control sends it in the
//! bootstrap), so any of them can reset a connection another one served.
//! Every connection ID the relay issues has the layout's fixed length, as
//! the section requires of this design.
//!
//! Sans-IO: the caller supplies the random bytes and sends the packet.
#![forbid(unsafe_code)]

use std::time::Instant;

use boring::hash::hmac_sha256;

/// Length of a stateless reset token.
pub const TOKEN_LEN: usize = 16;
/// Shortest Stateless Reset: the first byte, 4 unpredictable bytes and the
/// token (section 10.3: "Unpredictable Bits (38..)").
pub const MIN_RESET_LEN: usize = 1 + 4 + TOKEN_LEN;
/// Resets in answer to packets up to this size are one byte shorter than
/// the packet (section 10.3: "An endpoint that sends a Stateless Reset in
/// response to a packet that is 43 bytes or shorter SHOULD send a
/// Stateless Reset that is one byte shorter than the packet it responds
/// to").
const SHORT_PACKET: usize = 43;
/// Resets a worker sends per second at most, in bursts of as many.
pub const RESETS_PER_SECOND: u32 = 1000;
/// Domain separation of the token derivation.
const LABEL: &[u8] = b"masque-relay stateless reset v1";

/// The stateless reset key and the send rate limit.
pub struct ResetTokens {
    key: [u8; 32],
    tokens: f64,
    at: Option<Instant>,
}

impl std::fmt::Debug for ResetTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetTokens(..)")
    }
}

impl ResetTokens {
    /// Tokens derived with `key`.
    pub fn with_key(key: [u8; 32]) -> Self {
        Self { key, tokens: f64::from(RESETS_PER_SECOND), at: None }
    }

    /// The stateless reset token of connection ID `cid`.
    //= https://www.rfc-editor.org/rfc/rfc9000#section-10.3.2
    //# A stateless reset token MUST be difficult to guess.
    pub fn token(&self, cid: &[u8]) -> u128 {
        let mut input = Vec::with_capacity(LABEL.len() + cid.len());
        input.extend_from_slice(LABEL);
        input.extend_from_slice(cid);
        // A MAC that cannot be computed (BoringSSL failure) gives token 0,
        // which never matches a reset the peer receives from us.
        let full = hmac_sha256(&self.key, &input).unwrap_or([0; 32]);
        let mut t = [0u8; TOKEN_LEN];
        t.copy_from_slice(&full[..TOKEN_LEN]);
        u128::from_be_bytes(t)
    }

    /// The length of the Stateless Reset answering a packet of
    /// `received` bytes (given `extra`, a random byte, for the length of
    /// resets to larger packets), or None when no reset may be sent: it
    /// must be smaller than the packet that triggered it (section 10.3.3,
    /// against loops between two endpoints that both reset) and at least
    /// [`MIN_RESET_LEN`] bytes.
    pub fn reset_len(received: usize, extra: u8) -> Option<usize> {
        let len = if received <= SHORT_PACKET {
            received.checked_sub(1)?
        } else {
            // 43..=63 bytes, never larger than the packet less one.
            (SHORT_PACKET + usize::from(extra % 21)).min(received - 1)
        };
        (len >= MIN_RESET_LEN).then_some(len)
    }

    /// Builds the Stateless Reset for a short-header packet of `received`
    /// bytes to `dcid` into `out`, whose bytes are random on entry;
    /// returns its length, or None when none may be sent (too small a
    /// packet, or the rate limit at `now`).
    //= https://www.rfc-editor.org/rfc/rfc9000#section-10.3
    //# Stateless Reset {
    //#   Fixed Bits (2) = 1,
    //#   Unpredictable Bits (38..),
    //#   Stateless Reset Token (128),
    //# }
    pub fn build(&mut self, dcid: &[u8], received: usize, now: Instant, out: &mut [u8]) -> Option<usize> {
        let len = Self::reset_len(received, out.first().copied().unwrap_or(0))?;
        if out.len() < len || !self.take(now) {
            return None;
        }
        // Short header form: 0b01 then unpredictable bits.
        out[0] = 0x40 | (out[0] & 0x3f);
        out[len - TOKEN_LEN..len].copy_from_slice(&self.token(dcid).to_be_bytes());
        Some(len)
    }

    fn take(&mut self, now: Instant) -> bool {
        let rate = f64::from(RESETS_PER_SECOND);
        let elapsed = self.at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.at = Some(now);
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_depend_on_key_and_connection_id_only() {
        let a = ResetTokens::with_key([1; 32]);
        let b = ResetTokens::with_key([1; 32]);
        let other = ResetTokens::with_key([2; 32]);
        assert_eq!(a.token(b"cid-1"), b.token(b"cid-1"), "same key, same token: any host can reset");
        assert_ne!(a.token(b"cid-1"), a.token(b"cid-2"));
        assert_ne!(a.token(b"cid-1"), other.token(b"cid-1"));
    }

    #[test]
    fn resets_are_smaller_than_what_triggered_them_and_never_too_short() {
        assert_eq!(ResetTokens::reset_len(21, 0), None);
        assert_eq!(ResetTokens::reset_len(22, 0), Some(21));
        assert_eq!(ResetTokens::reset_len(43, 9), Some(42));
        assert_eq!(ResetTokens::reset_len(44, 0), Some(43));
        assert_eq!(ResetTokens::reset_len(44, 20), Some(43));
        assert_eq!(ResetTokens::reset_len(1200, 20), Some(63));
        for received in 0..2000 {
            for extra in [0u8, 7, 255] {
                if let Some(len) = ResetTokens::reset_len(received, extra) {
                    assert!(len < received && (MIN_RESET_LEN..=63).contains(&len));
                }
            }
        }
    }

    #[test]
    fn a_reset_is_a_short_header_ending_in_the_token_and_rate_limited() {
        let mut r = ResetTokens::with_key([3; 32]);
        let now = Instant::now();
        let mut out = [0xffu8; 64];
        let len = r.build(b"some-cid", 1200, now, &mut out).expect("a reset");
        assert_eq!(out[0] & 0xc0, 0x40, "fixed bits 01");
        assert_eq!(out[len - TOKEN_LEN..len], r.token(b"some-cid").to_be_bytes());
        let mut sent = 1;
        while r.build(b"some-cid", 1200, now, &mut out).is_some() {
            sent += 1;
        }
        assert_eq!(sent, RESETS_PER_SECOND, "a burst of one second's worth");
        assert!(r.build(b"some-cid", 1200, now + std::time::Duration::from_millis(10), &mut out).is_some());
    }
}

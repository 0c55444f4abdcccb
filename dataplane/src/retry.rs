//! Address validation with Retry (RFC 9000 section 8.1.2).
//!
//! Under a handshake flood a worker stops creating connection state for
//! unvalidated clients: past a threshold of handshakes in progress it answers
//! a token-less Initial with a Retry packet carrying a token, and creates the
//! connection only when the client comes back with it, which proves it
//! receives at its address. Tokens are stateless: the client's address, the
//! original destination connection ID and the issue time, authenticated with
//! HMAC-SHA256 under a key shared by the workers (any worker can check
//! any token): control's (the bootstrap's `quic_keys`, the same on every
//! host of a fleet), or one made at start. They expire after [`TOKEN_LIFETIME`].
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boring::hash::hmac_sha256;

/// How long a Retry token is accepted: long enough for one round trip from
/// anywhere, short enough that a captured token is of little use.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
/// Longest connection ID (RFC 9000).
const MAX_CID: usize = 20;

/// Mints and checks Retry tokens.
pub struct RetryTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for RetryTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryTokens")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of ours (wrong length or version).
    #[error("malformed token")]
    Malformed,
    /// The MAC does not match (forged, or for another address).
    #[error("token does not authenticate")]
    BadMac,
    /// Older than [`TOKEN_LIFETIME`] (or from the future).
    #[error("token expired")]
    Expired,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl RetryTokens {
    /// A fresh random key.
    pub fn new() -> Result<Self, boring::error::ErrorStack> {
        let mut key = [0u8; 32];
        boring::rand::rand_bytes(&mut key)?;
        Ok(Self { key })
    }

    /// Tokens under `key`: control's, the same on every host of a fleet, so
    /// a token one host minted validates on another.
    pub fn with_key(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self, issued: u64, client: SocketAddr, odcid: &[u8]) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        let ip = match client.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let mut input = Vec::with_capacity(1 + 8 + 16 + 2 + odcid.len());
        input.push(VERSION);
        input.extend_from_slice(&issued.to_be_bytes());
        input.extend_from_slice(&ip);
        input.extend_from_slice(&client.port().to_be_bytes());
        input.extend_from_slice(odcid);
        // A MAC that cannot be computed (BoringSSL failure) is all zeros and
        // matches no token minted with a working MAC.
        if let Ok(full) = hmac_sha256(&self.key, &input) {
            out.copy_from_slice(&full[..MAC_LEN]);
        }
        out
    }

    /// A token for `client` whose first Initial had destination `odcid`.
    pub fn mint(&self, client: SocketAddr, odcid: &[u8]) -> Vec<u8> {
        self.mint_at(unix_now(), client, odcid)
    }

    fn mint_at(&self, issued: u64, client: SocketAddr, odcid: &[u8]) -> Vec<u8> {
        let odcid = &odcid[..odcid.len().min(MAX_CID)];
        let mut t = Vec::with_capacity(1 + 8 + 1 + odcid.len() + MAC_LEN);
        t.push(VERSION);
        t.extend_from_slice(&issued.to_be_bytes());
        t.push(odcid.len() as u8);
        t.extend_from_slice(odcid);
        t.extend_from_slice(&self.mac(issued, client, odcid));
        t
    }

    /// Checks a token from `client`; returns the original destination
    /// connection ID it vouches for.
    pub fn validate(&self, token: &[u8], client: SocketAddr) -> Result<Vec<u8>, TokenError> {
        self.validate_at(unix_now(), token, client)
    }

    fn validate_at(&self, now: u64, token: &[u8], client: SocketAddr) -> Result<Vec<u8>, TokenError> {
        if token.len() < 1 + 8 + 1 + MAC_LEN || token[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let issued = u64::from_be_bytes(token[1..9].try_into().map_err(|_| TokenError::Malformed)?);
        let cid_len = usize::from(token[9]);
        if cid_len > MAX_CID || token.len() != 10 + cid_len + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let odcid = &token[10..10 + cid_len];
        if !constant_time_eq(&self.mac(issued, client, odcid), &token[10 + cid_len..]) {
            return Err(TokenError::BadMac);
        }
        if issued > now + 1 || now - issued > TOKEN_LIFETIME.as_secs() {
            return Err(TokenError::Expired);
        }
        Ok(odcid.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_minted_by_one_host_validates_on_another_with_the_fleet_key() {
        let (a, b) = (RetryTokens::with_key([7; 32]), RetryTokens::with_key([7; 32]));
        let client: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        let token = a.mint_at(1000, client, &[1; 8]);
        assert_eq!(b.validate_at(1001, &token, client), Ok(vec![1; 8]));
        let other = RetryTokens::with_key([8; 32]);
        assert_eq!(other.validate_at(1001, &token, client), Err(TokenError::BadMac));
    }

    #[test]
    fn a_token_validates_for_its_address_only_and_expires() {
        let t = RetryTokens::new().unwrap();
        let client: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        let odcid = [9u8; 16];
        let token = t.mint_at(1000, client, &odcid);
        assert_eq!(t.validate_at(1000, &token, client), Ok(odcid.to_vec()));
        assert_eq!(t.validate_at(1010, &token, client), Ok(odcid.to_vec()));
        assert_eq!(t.validate_at(1011, &token, client), Err(TokenError::Expired));
        assert_eq!(t.validate_at(998, &token, client), Err(TokenError::Expired), "issued in the future");
        let other_port: SocketAddr = "192.0.2.7:4434".parse().unwrap();
        assert_eq!(t.validate_at(1000, &token, other_port), Err(TokenError::BadMac));
        let v6: SocketAddr = "[2001:db8::7]:4433".parse().unwrap();
        assert_eq!(t.validate_at(1000, &token, v6), Err(TokenError::BadMac));
        let other_key = RetryTokens::new().unwrap();
        assert_eq!(other_key.validate_at(1000, &token, client), Err(TokenError::BadMac));
    }

    #[test]
    fn every_corruption_is_refused() {
        let t = RetryTokens::new().unwrap();
        let client: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        let token = t.mint_at(50, client, &[1, 2, 3, 4, 5, 6, 7, 8]);
        for i in 0..token.len() {
            let mut bad = token.clone();
            bad[i] ^= 0x01;
            assert!(t.validate_at(50, &bad, client).is_err(), "flipped byte {i}");
        }
        for cut in 0..token.len() {
            assert!(t.validate_at(50, &token[..cut], client).is_err());
        }
        let mut long = token.clone();
        long.push(0);
        assert_eq!(t.validate_at(50, &long, client), Err(TokenError::Malformed));
        assert_eq!(t.validate_at(50, &[], client), Err(TokenError::Malformed));
    }
}

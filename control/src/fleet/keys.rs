//! The keys a fleet derives from its shared secret.
//!
//! HKDF-SHA256 (RFC 5869) with a fixed salt extracts a pseudorandom key from
//! the fleet secret; each use then expands its own 32-byte key with a
//! distinct label and the fleet's name as info, so no two uses (and no two
//! fleets sharing a secret by mistake) ever share a key:
//!
//! | key | used for |
//! |---|---|
//! | signing | HMAC-SHA256 over every value written to the store |
//! | sealing | AES-256-GCM of the session ticket keys in the store |
//! | retry token | address validation tokens valid on every host (later) |
//! | stateless reset | stateless reset tokens valid on every host (later) |
//!
//! BoringSSL (the `boring` crate, already control's TLS and HMAC
//! implementation) provides HKDF, HMAC and AES-GCM alike: one audited
//! family, no second cryptography stack in the binary.
#![forbid(unsafe_code)]

use std::fmt;

use boring::hash::MessageDigest;
use boring::hkdf::HkdfSuite;

/// Shortest fleet secret accepted.
pub const MIN_SECRET_LEN: usize = 32;

const SALT: &[u8] = b"masque-relay fleet v1";
const SIGNING_LABEL: &str = "store value signing";
const SEALING_LABEL: &str = "ticket key sealing";
const RETRY_TOKEN_LABEL: &str = "retry token";
const STATELESS_RESET_LABEL: &str = "stateless reset";

/// A 32-byte derived key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DerivedKey([u8; 32]);

impl DerivedKey {
    /// The key bytes.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivedKey(<redacted>)")
    }
}

/// Why the keys could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyDerivationError {
    /// The secret is too short.
    #[error("the fleet secret is {0} bytes; at least {MIN_SECRET_LEN} are needed (`openssl rand -hex 32`)")]
    TooShort(usize),
    /// BoringSSL refused (does not happen with these lengths).
    #[error("HKDF failed: {0}")]
    Hkdf(String),
}

/// Every key derived from the fleet secret.
#[derive(Debug, Clone)]
pub struct FleetKeys {
    /// Signs store values (HMAC-SHA256).
    pub signing: DerivedKey,
    /// Seals the session ticket keys (AES-256-GCM).
    pub sealing: DerivedKey,
    /// For address validation (Retry) tokens every host accepts.
    pub retry_token_key: DerivedKey,
    /// For stateless reset tokens every host can send.
    pub stateless_reset_key: DerivedKey,
}

impl FleetKeys {
    /// Derives the keys of fleet `fleet_name` from `secret`.
    pub fn derive(secret: &[u8], fleet_name: &str) -> Result<Self, KeyDerivationError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyDerivationError::TooShort(secret.len()));
        }
        let suite = HkdfSuite::new(MessageDigest::sha256());
        let prk = suite.extract(SALT, secret).map_err(|e| KeyDerivationError::Hkdf(e.to_string()))?;
        let expand = |label: &str| -> Result<DerivedKey, KeyDerivationError> {
            let mut info = Vec::with_capacity(label.len() + 1 + fleet_name.len());
            info.extend_from_slice(label.as_bytes());
            info.push(0);
            info.extend_from_slice(fleet_name.as_bytes());
            let mut out = [0u8; 32];
            suite.expand(&prk, &info, &mut out).map_err(|e| KeyDerivationError::Hkdf(e.to_string()))?;
            Ok(DerivedKey(out))
        };
        Ok(Self {
            signing: expand(SIGNING_LABEL)?,
            sealing: expand(SEALING_LABEL)?,
            retry_token_key: expand(RETRY_TOKEN_LABEL)?,
            stateless_reset_key: expand(STATELESS_RESET_LABEL)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_deterministic_and_per_fleet() {
        let secret = [7u8; 32];
        let a = FleetKeys::derive(&secret, "eu").unwrap();
        let b = FleetKeys::derive(&secret, "eu").unwrap();
        assert_eq!(a.signing, b.signing);
        assert_eq!(a.stateless_reset_key, b.stateless_reset_key);
        let all = [&a.signing, &a.sealing, &a.retry_token_key, &a.stateless_reset_key];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x.expose(), y.expose(), "every use has its own key");
            }
        }
        let other_fleet = FleetKeys::derive(&secret, "us").unwrap();
        assert_ne!(a.signing, other_fleet.signing);
        let other_secret = FleetKeys::derive(&[8u8; 40], "eu").unwrap();
        assert_ne!(a.sealing, other_secret.sealing);
        assert_eq!(FleetKeys::derive(&[1; 31], "eu").unwrap_err(), KeyDerivationError::TooShort(31));
        assert!(format!("{a:?}").contains("redacted"));
    }

    #[test]
    fn rfc5869_test_case_1() {
        // The HKDF implementation itself, against RFC 5869 appendix A.1.
        let suite = HkdfSuite::new(MessageDigest::sha256());
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let prk = suite.extract(&salt, &ikm).unwrap();
        let mut okm = [0u8; 42];
        suite.expand(&prk, &info, &mut okm).unwrap();
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}

//! A QUIC-LB configuration as the draft defines it (section 5.3): the
//! parameters a configuration agent hands to load balancers and servers
//! alike. Validation only; encoding is [`super::codec`]'s job.
#![forbid(unsafe_code)]

use std::fmt;

use super::{CONFIG_SHIFT, LENGTH_MASK, MAX_CID_LEN, MAX_CONFIG_ID, MAX_SERVER_ID_LEN, MIN_NONCE_LEN};

/// Length of a QUIC-LB key and of an AES block.
pub const KEY_LEN: usize = 16;

/// Longest plaintext block (server ID plus nonce).
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
//# As QUIC version 1 limits connection IDs to 20 octets, the server ID and nonce
//# lengths MUST sum to 19 octets or less.
pub const MAX_BLOCK_LEN: usize = MAX_CID_LEN - 1;

/// A 16-octet QUIC-LB key (AES-128). Its `Debug` output never shows the
/// bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CidKey([u8; KEY_LEN]);

impl CidKey {
    /// The key with these bytes.
    pub const fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl From<[u8; KEY_LEN]> for CidKey {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for CidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CidKey(..)")
    }
}

/// How a configuration protects the server ID and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// No key: the server ID is on the wire in the clear.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
    //# Note that failure to define a key
    //# means that observers can determine the assigned server of any connection,
    //# significantly increasing the linkability of QUIC address migration.
    Plaintext,
    /// A key, and server ID plus nonce fill exactly one AES block: one
    /// AES-128-ECB pass (section 5.4.1).
    SinglePass,
    /// A key and any other length: the four-round Feistel network of
    /// section 5.4.2, AES-128-ECB as its round function.
    FourPass,
}

/// Why an [`LbConfig`] cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LbConfigError {
    /// The config rotation codepoint is not in 0..=6.
    #[error(
        "config rotation codepoint {0} is out of range: use 0..=6 (0b111 marks unroutable CIDs, \
         draft-ietf-quic-load-balancers section 3.1)"
    )]
    ConfigId(u8),
    /// The server ID length is not in 1..=15.
    #[error(
        "server ID length {0} is out of range: QUIC-LB server IDs are 1 to 15 octets \
         (draft-ietf-quic-load-balancers section 5.3)"
    )]
    ServerIdLen(usize),
    /// The nonce is shorter than QUIC-LB's minimum of 4 octets.
    #[error(
        "nonce of {0} bytes is too short: QUIC-LB requires at least 4 (draft-ietf-quic-load-balancers section 5.3)"
    )]
    NonceTooShort(usize),
    /// Server ID and nonce exceed 19 octets.
    #[error(
        "server ID ({server_id_len} bytes) and nonce ({nonce_len} bytes) sum to more than 19: \
         QUIC version 1 connection IDs are at most 20 bytes (draft-ietf-quic-load-balancers section 5.3)"
    )]
    TooLong {
        /// Requested server ID length.
        server_id_len: usize,
        /// Requested nonce length.
        nonce_len: usize,
    },
}

/// One QUIC-LB configuration: config rotation codepoint, server ID length,
/// nonce length and optional key (section 5.3). Validated on construction,
/// `Copy`, no allocation. `Debug` never shows the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LbConfig {
    config_id: u8,
    server_id_len: u8,
    nonce_len: u8,
    key: Option<CidKey>,
}

impl fmt::Debug for LbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LbConfig")
            .field("config_id", &self.config_id)
            .field("server_id_len", &self.server_id_len)
            .field("nonce_len", &self.nonce_len)
            .field("protection", &self.protection())
            .finish()
    }
}

impl LbConfig {
    /// The QUIC-LB view of [`super::CidLayout::single_host`]: codepoint 0,
    /// the worker byte as a 1-octet server ID, 14 random octets of nonce,
    /// no key.
    pub(crate) const SINGLE_HOST: Self =
        Self { config_id: 0, server_id_len: 1, nonce_len: super::SINGLE_HOST_NONCE_LEN as u8, key: None };

    /// A configuration with config rotation codepoint `config_id` (0..=6),
    /// `server_id_len` octets of server ID (1..=15), `nonce_len` octets of
    /// nonce (at least 4; the two sum to at most 19) and, if given, a key.
    pub fn new(
        config_id: u8,
        server_id_len: usize,
        nonce_len: usize,
        key: Option<CidKey>,
    ) -> Result<Self, LbConfigError> {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.1
        //# A configuration MUST NOT use the
        //# reserved identifier 0b111
        if config_id > MAX_CONFIG_ID {
            return Err(LbConfigError::ConfigId(config_id));
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
        //# The nonce length MUST be at least 4 octets. The server ID length MUST be at
        //# least 1 octet.
        if !(1..=MAX_SERVER_ID_LEN).contains(&server_id_len) {
            return Err(LbConfigError::ServerIdLen(server_id_len));
        }
        if nonce_len < MIN_NONCE_LEN {
            return Err(LbConfigError::NonceTooShort(nonce_len));
        }
        if server_id_len.saturating_add(nonce_len) > MAX_BLOCK_LEN {
            return Err(LbConfigError::TooLong { server_id_len, nonce_len });
        }
        // Both fit in u8: server_id_len <= 15 and nonce_len <= 18 here.
        Ok(Self { config_id, server_id_len: server_id_len as u8, nonce_len: nonce_len as u8, key })
    }

    /// The config rotation codepoint (0..=6).
    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    /// Length of the server ID (1..=15).
    pub fn server_id_len(&self) -> usize {
        usize::from(self.server_id_len)
    }

    /// Length of the nonce (4..=18).
    pub fn nonce_len(&self) -> usize {
        usize::from(self.nonce_len)
    }

    /// The key, if the configuration has one.
    pub fn key(&self) -> Option<&CidKey> {
        self.key.as_ref()
    }

    /// Server ID plus nonce: the plaintext block after the first octet.
    pub fn block_len(&self) -> usize {
        self.server_id_len() + self.nonce_len()
    }

    /// Length of every CID of this configuration: the first octet and the
    /// block (at most 20).
    pub fn cid_len(&self) -> usize {
        1 + self.block_len()
    }

    /// The first octet of every CID of this configuration: the config
    /// rotation codepoint in the top three bits and the self-described
    /// length (`cid_len() - 1`) in the low five.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.3
    //# the remaining 5 bits in the first octet of the Connection ID are
    //# reserved to express the length of the following connection ID, not including
    //# the first octet.
    pub fn first_octet(&self) -> u8 {
        // block_len() <= 19 fits five bits.
        (self.config_id << CONFIG_SHIFT) | (self.block_len() as u8 & LENGTH_MASK)
    }

    /// How the server ID and nonce are protected: by the key's presence and
    /// the block length.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.1
    //# When the nonce length and server ID length sum to exactly 16 octets, the server
    //# MUST use a single-pass encryption algorithm.
    pub fn protection(&self) -> Protection {
        match (self.key, self.block_len()) {
            (None, _) => Protection::Plaintext,
            (Some(_), KEY_LEN) => Protection::SinglePass,
            (Some(_), _) => Protection::FourPass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: CidKey = CidKey::new([7; KEY_LEN]);

    #[test]
    fn every_valid_length_pair_is_accepted_and_nothing_else() {
        for sid in 0..=20 {
            for nonce in 0..=20 {
                let r = LbConfig::new(3, sid, nonce, None);
                let valid = (1..=15).contains(&sid) && nonce >= 4 && sid + nonce <= 19;
                assert_eq!(r.is_ok(), valid, "sid {sid} nonce {nonce}: {r:?}");
                if let Ok(c) = r {
                    assert_eq!(c.cid_len(), 1 + sid + nonce);
                    assert!(c.cid_len() <= MAX_CID_LEN);
                    assert_eq!(c.first_octet(), (3 << 5) | (sid + nonce) as u8);
                }
            }
        }
    }

    #[test]
    fn the_single_host_constant_is_a_valid_configuration() {
        assert_eq!(LbConfig::new(0, 1, 14, None), Ok(LbConfig::SINGLE_HOST));
        assert_eq!(LbConfig::SINGLE_HOST.cid_len(), 16);
    }

    #[test]
    fn errors_name_the_bad_parameter() {
        assert_eq!(LbConfig::new(7, 3, 4, None), Err(LbConfigError::ConfigId(7)));
        assert_eq!(LbConfig::new(0, 0, 4, None), Err(LbConfigError::ServerIdLen(0)));
        assert_eq!(LbConfig::new(0, 16, 4, None), Err(LbConfigError::ServerIdLen(16)));
        assert_eq!(LbConfig::new(0, 3, 3, None), Err(LbConfigError::NonceTooShort(3)));
        assert_eq!(
            LbConfig::new(0, 15, 5, None),
            Err(LbConfigError::TooLong { server_id_len: 15, nonce_len: 5 })
        );
        assert!(matches!(LbConfig::new(0, 1, usize::MAX, None), Err(LbConfigError::TooLong { .. })));
        let msg = LbConfig::new(0, 10, 10, None).unwrap_err().to_string();
        assert!(msg.contains("19") && msg.contains("10 bytes"), "{msg}");
    }

    #[test]
    fn protection_follows_key_and_block_length() {
        assert_eq!(LbConfig::new(0, 3, 4, None).unwrap().protection(), Protection::Plaintext);
        assert_eq!(LbConfig::new(0, 8, 8, None).unwrap().protection(), Protection::Plaintext);
        assert_eq!(LbConfig::new(0, 8, 8, Some(KEY)).unwrap().protection(), Protection::SinglePass);
        assert_eq!(LbConfig::new(0, 1, 15, Some(KEY)).unwrap().protection(), Protection::SinglePass);
        assert_eq!(LbConfig::new(0, 3, 4, Some(KEY)).unwrap().protection(), Protection::FourPass);
        assert_eq!(LbConfig::new(0, 9, 8, Some(KEY)).unwrap().protection(), Protection::FourPass);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = LbConfig::new(1, 3, 4, Some(CidKey::new([0xab; 16]))).unwrap();
        let d = format!("{c:?} {:?}", c.key().unwrap());
        assert!(!d.contains("171") && !d.to_lowercase().contains("ab, "), "{d}");
        assert!(d.contains("FourPass") && d.contains("CidKey(..)"), "{d}");
    }
}

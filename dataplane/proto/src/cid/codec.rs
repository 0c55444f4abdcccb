//! Encoding and decoding CIDs under one QUIC-LB configuration (sections
//! 5.4 and 5.5 of draft-ietf-quic-load-balancers-21): the first octet, then
//! the server ID and nonce, encrypted when the configuration has a key.
//! Which server ID and nonce to write is the caller's business
//! ([`super::CidLayout`] for this relay, any server in tests).
#![forbid(unsafe_code)]

use std::fmt;

use super::cipher::CidCipher;
use super::config::{LbConfig, MAX_BLOCK_LEN, Protection};
use super::{CONFIG_SHIFT, Cid, MAX_CID_LEN, ServerId};

/// [`CidCodec::encode`] was given a server ID or nonce of the wrong
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The server ID does not have the configuration's length.
    #[error("server ID is {got} bytes but the QUIC-LB configuration needs exactly {expected}")]
    ServerIdLen {
        /// The configuration's server ID length.
        expected: usize,
        /// Bytes passed.
        got: usize,
    },
    /// The nonce does not have the configuration's length.
    #[error("nonce is {got} bytes but the QUIC-LB configuration needs exactly {expected}")]
    NonceLen {
        /// The configuration's nonce length.
        expected: usize,
        /// Bytes passed.
        got: usize,
    },
}

/// The plaintext of a CID: its server ID and nonce.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Plaintext {
    block: [u8; MAX_BLOCK_LEN],
    server_id_len: u8,
    len: u8,
}

impl Plaintext {
    /// The server ID.
    pub fn server_id(&self) -> ServerId {
        ServerId::from_block(&self.block[..usize::from(self.server_id_len)])
    }

    /// The nonce.
    pub fn nonce(&self) -> &[u8] {
        &self.block[usize::from(self.server_id_len)..usize::from(self.len)]
    }

    /// Server ID then nonce (only the prefix asked of
    /// [`CidCodec::open`] is certain).
    pub(crate) fn block(&self) -> &[u8] {
        &self.block[..usize::from(self.len)]
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plaintext")
            .field("server_id", &self.server_id())
            .field("nonce_len", &self.nonce().len())
            .finish()
    }
}

/// A QUIC-LB configuration with its key expanded, ready to encode and
/// decode CIDs. `Clone` copies the AES round keys; no allocation.
#[derive(Clone, Debug)]
pub struct CidCodec {
    config: LbConfig,
    cipher: Option<CidCipher>,
}

impl PartialEq for CidCodec {
    fn eq(&self, other: &Self) -> bool {
        // The cipher is a function of the configuration's key.
        self.config == other.config
    }
}

impl Eq for CidCodec {}

impl std::hash::Hash for CidCodec {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.config.hash(state);
    }
}

impl CidCodec {
    /// The codec of `config`, expanding its key if it has one.
    pub fn new(config: LbConfig) -> Self {
        let cipher = config.key().map(CidCipher::new);
        Self { config, cipher }
    }

    /// A keyless codec, usable in `const` contexts.
    pub(crate) const fn plaintext(config: LbConfig) -> Self {
        Self { config, cipher: None }
    }

    /// The configuration.
    pub fn config(&self) -> &LbConfig {
        &self.config
    }

    /// How the server ID and nonce are protected.
    pub fn protection(&self) -> Protection {
        self.config.protection()
    }

    /// The CID carrying `server_id` and `nonce`, which must have the
    /// configuration's lengths.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
    //# The server writes the first octet and its server ID into their respective
    //# fields.
    pub fn encode(&self, server_id: &[u8], nonce: &[u8]) -> Result<Cid, EncodeError> {
        let (sid, nl) = (self.config.server_id_len(), self.config.nonce_len());
        if server_id.len() != sid {
            return Err(EncodeError::ServerIdLen { expected: sid, got: server_id.len() });
        }
        if nonce.len() != nl {
            return Err(EncodeError::NonceLen { expected: nl, got: nonce.len() });
        }
        Ok(self.encode_with(|block| {
            block[..sid].copy_from_slice(server_id);
            block[sid..].copy_from_slice(nonce);
        }))
    }

    /// The CID whose plaintext block `fill_block` writes (given a zeroed
    /// slice of exactly server ID plus nonce length), encrypted if the
    /// configuration has a key.
    pub(crate) fn encode_with(&self, fill_block: impl FnOnce(&mut [u8])) -> Cid {
        let mut bytes = [0u8; MAX_CID_LEN];
        let len = self.config.cid_len();
        bytes[0] = self.config.first_octet();
        let block = &mut bytes[1..len];
        fill_block(block);
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
        //# If there is no key in the configuration, the Connection ID is complete.
        //# Otherwise, there are further steps, as described in the two following
        //# subsections.
        if let Some(cipher) = &self.cipher {
            cipher.encrypt(block);
        }
        // len <= 20.
        Cid { bytes, len: len as u8 }
    }

    /// The server ID and nonce of `cid`: `None` when it is shorter than the
    /// configuration's CIDs or its config rotation bits name another
    /// configuration. Octets past the configuration's length (which a
    /// server may append, section 5.4) and the first octet's length bits
    /// are not looked at.
    pub fn decode(&self, cid: &[u8]) -> Option<Plaintext> {
        self.open(cid, self.config.block_len())
    }

    /// As [`decode`](Self::decode), but only the first `need` octets of the
    /// plaintext block are guaranteed: the rest may be left undecrypted
    /// (three passes instead of four when `need` fits in the first half).
    pub(crate) fn open(&self, cid: &[u8], need: usize) -> Option<Plaintext> {
        let (&first, rest) = cid.split_first()?;
        if first >> CONFIG_SHIFT != self.config.config_id() {
            return None;
        }
        let len = self.config.block_len();
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5
        //# On each incoming packet, the load balancer extracts consecutive octets,
        //# beginning with the second octet.
        let ciphertext = rest.get(..len)?;
        let mut block = [0u8; MAX_BLOCK_LEN];
        block[..len].copy_from_slice(ciphertext);
        if let Some(cipher) = &self.cipher {
            cipher.decrypt_prefix(&mut block[..len], need);
        }
        // server_id_len <= 15 and len <= 19.
        Some(Plaintext { block, server_id_len: self.config.server_id_len() as u8, len: len as u8 })
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::CidKey;
    use super::*;

    const KEY: CidKey = CidKey::new([0x42; 16]);

    fn codecs() -> Vec<CidCodec> {
        let mut v = Vec::new();
        for sid in 1..=15 {
            for nonce in 4..=(19 - sid) {
                for key in [None, Some(KEY)] {
                    v.push(CidCodec::new(LbConfig::new((sid % 7) as u8, sid, nonce, key).unwrap()));
                }
            }
        }
        v
    }

    #[test]
    fn every_configuration_round_trips() {
        for codec in codecs() {
            let c = codec.config();
            let sid: Vec<u8> = (0..c.server_id_len() as u8).map(|i| i ^ 0xa5).collect();
            let nonce: Vec<u8> = (0..c.nonce_len() as u8).map(|i| i.wrapping_mul(3)).collect();
            let cid = codec.encode(&sid, &nonce).unwrap();
            assert_eq!(cid.len(), c.cid_len());
            assert_eq!(cid[0], c.first_octet());
            if c.protection() == Protection::Plaintext {
                assert_eq!(&cid[1..=sid.len()], &sid[..]);
            } else {
                assert_ne!(&cid[1..], &[&sid[..], &nonce[..]].concat()[..], "{c:?}");
            }
            let p = codec.decode(&cid).unwrap();
            assert_eq!(p.server_id().as_bytes(), &sid[..], "{c:?}");
            assert_eq!(p.nonce(), &nonce[..]);
            // Appended bytes are ignored; a short CID or another config is not decoded.
            let mut longer = cid.to_vec();
            longer.extend_from_slice(&[1, 2, 3]);
            assert_eq!(codec.decode(&longer), Some(p));
            assert_eq!(codec.decode(&cid[..cid.len() - 1]), None);
            let mut other = cid.to_vec();
            other[0] ^= 0x20;
            assert_eq!(codec.decode(&other), None);
            assert_eq!(codec.decode(&[]), None);
        }
    }

    #[test]
    fn encode_checks_lengths() {
        let codec = CidCodec::new(LbConfig::new(0, 3, 4, Some(KEY)).unwrap());
        assert_eq!(codec.encode(&[1, 2], &[0; 4]), Err(EncodeError::ServerIdLen { expected: 3, got: 2 }));
        assert_eq!(codec.encode(&[1, 2, 3], &[0; 5]), Err(EncodeError::NonceLen { expected: 4, got: 5 }));
    }

    #[test]
    fn codecs_compare_by_configuration() {
        let a = LbConfig::new(0, 3, 4, Some(KEY)).unwrap();
        let b = LbConfig::new(0, 3, 4, Some(CidKey::new([1; 16]))).unwrap();
        assert_eq!(CidCodec::new(a), CidCodec::new(a));
        assert_ne!(CidCodec::new(a), CidCodec::new(b));
    }
}

//! The relay's own CIDs under one QUIC-LB configuration: the host's server
//! ID, then a nonce whose first octet is the owning worker (see the module
//! docs of [`super`]). Generates a CID for a worker and decodes a DCID back
//! to its worker.
#![forbid(unsafe_code)]

use std::fmt;

use super::codec::CidCodec;
use super::config::{LbConfig, LbConfigError, Protection};
use super::{Cid, Decoded, MAX_CID_LEN, MAX_CONFIG_ID, MAX_HOST_ID_LEN, MIN_RANDOM_LEN, write_hex};

/// Why a [`CidLayout`] cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidLayoutError {
    /// The config rotation codepoint is not in 0..=6.
    #[error(
        "config rotation codepoint {0} is out of range: use 0..=6 (0b111 marks unroutable CIDs, \
         draft-ietf-quic-load-balancers section 3.1)"
    )]
    ConfigId(u8),
    /// The host ID leaves no room for the worker byte and four random
    /// octets.
    #[error(
        "server ID is {0} bytes, at most 14 fit: after it come the worker byte and at least 4 random \
         nonce bytes, and the server ID and nonce are at most 19 octets (draft-ietf-quic-load-balancers \
         section 5.3)"
    )]
    HostIdTooLong(usize),
    /// Fewer than four random octets follow the worker byte.
    #[error(
        "{0} random nonce bytes after the worker byte are too few: at least 4 are needed, so the QUIC-LB \
         nonce (worker byte and random bytes) is at least 5 (draft-ietf-quic-load-balancers section 5.3 \
         asks for 4 and forbids reusing a nonce)"
    )]
    NonceTooShort(usize),
    /// The CID would exceed QUIC version 1's 20 bytes.
    #[error(
        "connection ID would be {len} bytes (first octet, {host_id_len}-byte server ID, worker byte, \
         {random_len} random nonce bytes) but QUIC version 1 allows at most 20"
    )]
    TooLong {
        /// Length the CID would have.
        len: usize,
        /// Requested server ID length.
        host_id_len: usize,
        /// Requested random nonce length.
        random_len: usize,
    },
    /// The host's server ID does not have the configuration's length.
    #[error("server ID is {got} bytes but the QUIC-LB configuration's server IDs are {expected}")]
    HostIdLen {
        /// The configuration's server ID length.
        expected: usize,
        /// Bytes passed.
        got: usize,
    },
    /// The underlying QUIC-LB configuration is invalid.
    #[error(transparent)]
    Config(#[from] LbConfigError),
}

/// [`CidLayout::generate`] was given random bytes of the wrong length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("random nonce is {got} bytes but the connection ID layout needs exactly {expected}")]
pub struct NonceLenError {
    /// The layout's [`random_len`](CidLayout::random_len).
    pub expected: usize,
    /// Bytes passed.
    pub got: usize,
}

/// How this relay lays out its server connection IDs under one QUIC-LB
/// configuration: `first octet | host ID | worker | random`, the part after
/// the first octet encrypted when the configuration has a key.
///
/// Built by [`CidLayout::new`] (plaintext), [`CidLayout::from_lb_config`]
/// (plaintext or encrypted, from the configuration shared with the load
/// balancers) or [`CidLayout::single_host`] (also the `Default`). `Clone`
/// copies the AES round keys (no allocation): workers keep their own.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CidLayout {
    /// The configuration as a load balancer sees it. With a host ID its
    /// server ID is the host ID and its nonce the worker byte and the
    /// random octets; without one (a single host, plaintext only) its
    /// server ID is the worker byte.
    codec: CidCodec,
    host_id: [u8; MAX_HOST_ID_LEN],
    host_id_len: u8,
}

impl fmt::Debug for CidLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hex<'a>(&'a [u8]);
        impl fmt::Debug for Hex<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, self.0)
            }
        }
        f.debug_struct("CidLayout")
            .field("config_id", &self.config_id())
            .field("host_id", &Hex(self.host_id()))
            .field("random_len", &self.random_len())
            .field("cid_len", &self.cid_len())
            .field("protection", &self.protection())
            .finish()
    }
}

impl Default for CidLayout {
    fn default() -> Self {
        Self::single_host()
    }
}

impl CidLayout {
    /// A plaintext layout with config rotation codepoint `config_id`
    /// (0..=6), this host's `host_id` as the QUIC-LB server ID (0..=14
    /// bytes; empty for a single host), one worker byte and `random_len`
    /// random bytes (at least 4), in at most 20 bytes in all.
    ///
    /// With an empty host ID a load balancer sees the worker byte as a
    /// 1-octet server ID and the random bytes as the nonce; otherwise the
    /// host ID is the server ID and the nonce is the worker byte and the
    /// random bytes ([`lb_config`](Self::lb_config)).
    pub fn new(config_id: u8, host_id: &[u8], random_len: usize) -> Result<Self, CidLayoutError> {
        if config_id > MAX_CONFIG_ID {
            return Err(CidLayoutError::ConfigId(config_id));
        }
        let host_id_len = host_id.len();
        if host_id_len > MAX_HOST_ID_LEN {
            return Err(CidLayoutError::HostIdTooLong(host_id_len));
        }
        if random_len < MIN_RANDOM_LEN {
            return Err(CidLayoutError::NonceTooShort(random_len));
        }
        let len = (2 + host_id_len).saturating_add(random_len);
        if len > MAX_CID_LEN {
            return Err(CidLayoutError::TooLong { len, host_id_len, random_len });
        }
        let config = if host_id.is_empty() {
            LbConfig::new(config_id, 1, random_len, None)?
        } else {
            LbConfig::new(config_id, host_id_len, 1 + random_len, None)?
        };
        Ok(Self::with_host_id(CidCodec::new(config), host_id))
    }

    /// The layout for this host under `config`, the QUIC-LB configuration
    /// shared with the load balancers, plaintext or encrypted by its key:
    /// `host_id` is this host's server ID (exactly the configuration's
    /// server ID length), the worker byte is the first octet of the nonce
    /// and the other nonce octets (at least 4) are random.
    pub fn from_lb_config(config: &LbConfig, host_id: &[u8]) -> Result<Self, CidLayoutError> {
        if host_id.len() != config.server_id_len() {
            return Err(CidLayoutError::HostIdLen { expected: config.server_id_len(), got: host_id.len() });
        }
        if host_id.len() > MAX_HOST_ID_LEN {
            return Err(CidLayoutError::HostIdTooLong(host_id.len()));
        }
        let random_len = config.nonce_len() - 1;
        if random_len < MIN_RANDOM_LEN {
            return Err(CidLayoutError::NonceTooShort(random_len));
        }
        Ok(Self::with_host_id(CidCodec::new(*config), host_id))
    }

    fn with_host_id(codec: CidCodec, host_id: &[u8]) -> Self {
        let mut id = [0u8; MAX_HOST_ID_LEN];
        id[..host_id.len()].copy_from_slice(host_id);
        // At most 14, checked by both constructors.
        Self { codec, host_id: id, host_id_len: host_id.len() as u8 }
    }

    /// The layout for a relay that is the only host behind its address:
    /// config rotation codepoint 0, no host ID, 14 random bytes, plaintext,
    /// so CIDs are 16 bytes: `[0x0f, worker, random x 14]`.
    ///
    /// Why 16: 14 random bytes (112 bits) make a collision between live
    /// CIDs negligible (birthday bound near 2^56 CIDs) and leave CIDs
    /// unguessable to off-path attackers; 16 bytes compare and hash as two
    /// 64-bit words; and the 4 bytes left under QUIC's 20 let a fleet add a
    /// host ID of up to 4 bytes later without shortening the random part.
    pub const fn single_host() -> Self {
        Self {
            codec: CidCodec::plaintext(LbConfig::SINGLE_HOST),
            host_id: [0; MAX_HOST_ID_LEN],
            host_id_len: 0,
        }
    }

    /// The QUIC-LB configuration a load balancer in front of this host
    /// needs (with the key, if any): server ID and nonce lengths as the
    /// balancer sees them.
    pub fn lb_config(&self) -> &LbConfig {
        self.codec.config()
    }

    /// The config rotation codepoint (0..=6).
    pub fn config_id(&self) -> u8 {
        self.lb_config().config_id()
    }

    /// This host's ID, the QUIC-LB server ID (empty for a single host,
    /// whose balancer-visible server ID is the worker byte).
    pub fn host_id(&self) -> &[u8] {
        &self.host_id[..usize::from(self.host_id_len)]
    }

    /// Length of the QUIC-LB server ID as a load balancer sees it: the
    /// host ID, or 1 (the worker byte) for a single host.
    pub fn server_id_len(&self) -> usize {
        self.lb_config().server_id_len()
    }

    /// Length of the QUIC-LB nonce as a load balancer sees it: the worker
    /// byte and the random bytes, or only the random bytes for a single
    /// host.
    pub fn nonce_len(&self) -> usize {
        self.lb_config().nonce_len()
    }

    /// Random bytes after the worker byte (at least 4).
    pub fn random_len(&self) -> usize {
        self.lb_config().block_len() - self.host_id().len() - 1
    }

    /// Length of every CID this layout generates (at most 20).
    pub fn cid_len(&self) -> usize {
        self.lb_config().cid_len()
    }

    /// Whether the host ID and worker byte are in the clear or encrypted.
    pub fn protection(&self) -> Protection {
        self.codec.protection()
    }

    /// Offset of the worker byte in the CID's plaintext: right after the
    /// first octet and the host ID. On the wire it is there only for
    /// plaintext layouts; use [`steerable`](Self::steerable) to decide
    /// whether anything may read it there.
    pub fn worker_offset(&self) -> usize {
        1 + self.host_id().len()
    }

    /// Offset of the worker byte in every CID on the wire, if it has one:
    /// `Some` for plaintext layouts (an in-kernel program may steer by it;
    /// in a short-header packet it is at `1 + offset`), `None` when the
    /// CID is encrypted and only decryption finds the worker.
    pub fn steerable(&self) -> Option<usize> {
        (self.protection() == Protection::Plaintext).then(|| self.worker_offset())
    }

    /// The first octet of every CID this layout generates: the config
    /// rotation codepoint in the top three bits and the length of the rest
    /// of the CID (`cid_len() - 1`) in the low five.
    pub fn first_octet(&self) -> u8 {
        self.lb_config().first_octet()
    }

    /// A CID owned by `worker` with the given random bytes, which must be
    /// exactly [`random_len`](Self::random_len) bytes of fresh randomness.
    pub fn generate(&self, worker: u8, random: &[u8]) -> Result<Cid, NonceLenError> {
        if random.len() != self.random_len() {
            return Err(NonceLenError { expected: self.random_len(), got: random.len() });
        }
        Ok(self.generate_with(worker, |out| out.copy_from_slice(random)))
    }

    /// A CID owned by `worker`; `fill_random` writes the random bytes into
    /// the slice it is given (exactly [`random_len`](Self::random_len)
    /// bytes, zeroed), e.g. with the TLS library's random generator. One
    /// AES block (16-byte server ID and nonce) or four (any other length)
    /// when the layout is encrypted.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
    //# If there is no key in the configuration, the server MUST fill the Nonce field
    //# with bytes that have no observable relationship to the field in previously
    //# issued connection IDs. If there is a key, the server fills the nonce field with
    //# a nonce of its choosing.
    pub fn generate_with(&self, worker: u8, fill_random: impl FnOnce(&mut [u8])) -> Cid {
        let h = self.host_id().len();
        self.codec.encode_with(|block| {
            block[..h].copy_from_slice(self.host_id());
            block[h] = worker;
            fill_random(&mut block[h + 1..]);
        })
    }

    /// Which worker owns `dcid`, a destination connection ID: `Worker` only
    /// when it has this layout's length and first octet (config rotation
    /// bits and length self-description) and its plaintext starts with this
    /// host's ID. Anything else, including arbitrary bytes, is `Foreign`.
    /// Costs one AES block for an encrypted 16-byte server ID and nonce,
    /// three or four otherwise (three when the host ID and worker byte fit
    /// in the first half).
    pub fn decode(&self, dcid: &[u8]) -> Decoded {
        if dcid.len() != self.cid_len() {
            return Decoded::Foreign;
        }
        // One comparison checks both fields of the first octet. Our config
        // codepoint is never 0b111, so unroutable CIDs are Foreign here.
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
        //# Note: a packet with a DCID with config ID codepoint 0b111 (see
        //# {{config-failover}}) is always unroutable.
        if dcid.first() != Some(&self.first_octet()) {
            return Decoded::Foreign;
        }
        let h = self.host_id().len();
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5
        //# If there is no key, the first octets
        //# correspond to the server ID.
        let Some(plain) = self.codec.open(dcid, h + 1) else { return Decoded::Foreign };
        match plain.block().split_at_checked(h) {
            Some((host, [worker, ..])) if host == self.host_id() => Decoded::Worker(*worker),
            _ => Decoded::Foreign,
        }
    }

    /// Which worker owns a received QUIC datagram, from the destination
    /// connection ID of its first packet (RFC 8999, the version-independent
    /// header): in a short header it follows the first byte and has our
    /// length; in a long header its length is byte 5 and it starts at byte
    /// 6. Client-chosen Initial DCIDs decode as `Foreign`.
    pub fn decode_datagram(&self, datagram: &[u8]) -> Decoded {
        super::datagram_dcid(datagram, self.cid_len()).map_or(Decoded::Foreign, |d| self.decode(d))
    }
}

#[cfg(test)]
mod tests {
    use super::super::lb::LbDecoder;
    use super::super::{CidKey, MAX_SERVER_ID_LEN, SINGLE_HOST_NONCE_LEN, UNROUTABLE_CONFIG_ID};
    use super::*;

    const KEY: CidKey = CidKey::new([
        0x8f, 0x95, 0xf0, 0x92, 0x45, 0x76, 0x5f, 0x80, 0x25, 0x69, 0x34, 0xe5, 0x0c, 0x66, 0x20, 0x7f,
    ]);

    /// Deterministic random bytes, different per worker and layout.
    fn random_for(layout: &CidLayout, worker: u8) -> Vec<u8> {
        (0..layout.random_len()).map(|i| worker.wrapping_mul(31).wrapping_add(i as u8 * 7 + 1)).collect()
    }

    fn encrypted(config_id: u8, host_id: &[u8], nonce_len: usize) -> CidLayout {
        let config = LbConfig::new(config_id, host_id.len(), nonce_len, Some(KEY)).unwrap();
        CidLayout::from_lb_config(&config, host_id).unwrap()
    }

    fn plaintext_layouts() -> Vec<CidLayout> {
        vec![
            CidLayout::single_host(),
            CidLayout::new(3, &[0xab, 0xcd], 6).unwrap(),
            CidLayout::new(6, &[0x11; MAX_HOST_ID_LEN], MIN_RANDOM_LEN).unwrap(),
            CidLayout::new(1, &[], 18).unwrap(),
            CidLayout::new(0, &[0x00], 4).unwrap(),
        ]
    }

    fn encrypted_layouts() -> Vec<CidLayout> {
        vec![
            // Single pass: 3 + 13 = 16.
            encrypted(0, &[0xab, 0xcd, 0xef], 13),
            encrypted(2, &[0x01], 15),
            // Four passes, even and odd, host ID and worker in the first
            // half or not.
            encrypted(4, &[0xab, 0xcd], 6),
            encrypted(5, &[0x11; MAX_HOST_ID_LEN], 5),
            encrypted(6, &[0x5a], 18),
            encrypted(1, &[1, 2, 3, 4, 5, 6, 7], 5),
        ]
    }

    fn layouts() -> Vec<CidLayout> {
        plaintext_layouts().into_iter().chain(encrypted_layouts()).collect()
    }

    #[test]
    fn every_worker_round_trips_in_every_layout() {
        for layout in layouts() {
            let lb = LbDecoder::new(*layout.lb_config());
            for worker in 0..=255u8 {
                let random = random_for(&layout, worker);
                let cid = layout.generate(worker, &random).unwrap();
                assert_eq!(cid.len(), layout.cid_len(), "{layout:?}");
                assert_eq!(cid[0], layout.first_octet());
                assert_eq!(layout.decode(&cid), Decoded::Worker(worker), "{layout:?} {cid:?}");
                // The plaintext is host ID, worker, random.
                let plain = CidCodec::new(*layout.lb_config()).decode(&cid).unwrap();
                let want = [layout.host_id(), &[worker], &random[..]].concat();
                assert_eq!([plain.server_id().as_bytes(), plain.nonce()].concat(), want);
                if let Some(at) = layout.steerable() {
                    assert_eq!(&cid[1..], &want[..], "plaintext on the wire");
                    assert_eq!(cid[at], worker);
                } else {
                    assert_ne!(&cid[1..], &want[..], "encrypted on the wire");
                }
                // A load balancer finds the host (or, for a single host,
                // the worker byte) as the server ID.
                let sid = lb.server_id(&cid).unwrap();
                let want_sid =
                    if layout.host_id().is_empty() { vec![worker] } else { layout.host_id().to_vec() };
                assert_eq!(sid.as_bytes(), &want_sid[..], "{layout:?}");
            }
        }
    }

    #[test]
    fn every_length_combination_decodes_for_the_relay_and_the_balancer() {
        for host_len in 1..=MAX_HOST_ID_LEN {
            for nonce_len in (MIN_RANDOM_LEN + 1)..=(19 - host_len) {
                for key in [None, Some(KEY)] {
                    let host: Vec<u8> = (0..host_len as u8).map(|i| 0xc0 ^ i).collect();
                    let config = LbConfig::new((host_len % 7) as u8, host_len, nonce_len, key).unwrap();
                    let layout = CidLayout::from_lb_config(&config, &host).unwrap();
                    assert_eq!(layout.lb_config(), &config);
                    assert_eq!(layout.random_len(), nonce_len - 1);
                    let lb = LbDecoder::new(config);
                    for worker in [0, 1, 77, 255] {
                        let cid = layout.generate_with(worker, |r| r.fill(worker ^ 0x3c));
                        assert_eq!(layout.decode(&cid), Decoded::Worker(worker), "{layout:?}");
                        assert_eq!(lb.server_id(&cid).unwrap().as_bytes(), &host[..], "{layout:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn generate_with_fills_exactly_the_random_part() {
        let layout = CidLayout::new(2, &[9, 8, 7], 5).unwrap();
        let mut calls = 0;
        let cid = layout.generate_with(42, |random| {
            calls += 1;
            assert_eq!(random.len(), 5);
            assert!(random.iter().all(|&b| b == 0), "random buffer starts zeroed");
            random.copy_from_slice(&[1, 2, 3, 4, 5]);
        });
        assert_eq!(calls, 1);
        assert_eq!(cid.as_bytes(), &[layout.first_octet(), 9, 8, 7, 42, 1, 2, 3, 4, 5]);
        assert_eq!(layout.decode(&cid), Decoded::Worker(42));

        let layout = encrypted(2, &[9, 8, 7], 6);
        let cid = layout.generate_with(42, |random| {
            assert_eq!(random.len(), 5);
            random.copy_from_slice(&[1, 2, 3, 4, 5]);
        });
        assert_eq!(layout.decode(&cid), Decoded::Worker(42));
    }

    #[test]
    fn generate_refuses_random_bytes_of_the_wrong_length() {
        let layout = CidLayout::single_host();
        assert_eq!(layout.generate(1, &[0; 13]), Err(NonceLenError { expected: 14, got: 13 }));
        assert_eq!(layout.generate(1, &[0; 15]), Err(NonceLenError { expected: 14, got: 15 }));
        assert_eq!(layout.generate(1, &[]), Err(NonceLenError { expected: 14, got: 0 }));
        let layout = encrypted(0, &[1, 2], 6);
        assert_eq!(layout.generate(1, &[0; 6]), Err(NonceLenError { expected: 5, got: 6 }));
    }

    /// Section 3.4 (Format): `First Octet { Config Rotation (3), CID Len or
    /// Random Bits (5) }`. Section 3.1: "The first three bits of any
    /// connection ID MUST encode an identifier for the configuration".
    /// Section 3.3: the remaining 5 bits "express the length of the
    /// following connection ID, not including the first octet", so they
    /// hold the CID length minus one; section 4.1 says the same for long
    /// headers ("the self-encoded length is one less").
    #[test]
    fn first_octet_carries_config_rotation_and_length_minus_one() {
        // Single host: config 0, 16-byte CID -> 0b000_01111.
        let single = CidLayout::single_host();
        assert_eq!(single.cid_len(), 16);
        assert_eq!(single.first_octet(), 0x0f);
        assert_eq!(single.generate(0, &[0; 14]).unwrap()[0], 0x0f);
        // Config 5, 3-byte host ID, 10 random bytes: 15 bytes -> 0b101_01110.
        let l = CidLayout::new(5, &[1, 2, 3], 10).unwrap();
        assert_eq!(l.cid_len(), 15);
        assert_eq!(l.first_octet(), 0b101_01110);
        // Longest CID: 20 bytes -> length bits 19; config 6 -> 0b110_10011.
        let l = CidLayout::new(6, &[0; 14], 4).unwrap();
        assert_eq!(l.cid_len(), MAX_CID_LEN);
        assert_eq!(l.first_octet(), 0b110_10011);
        // The first octet is never encrypted.
        let l = encrypted(5, &[1, 2, 3], 11);
        assert_eq!(l.first_octet(), 0b101_01110);
        assert_eq!(l.generate_with(0, |_| ())[0], 0b101_01110);
        for config in 0..=MAX_CONFIG_ID {
            for random_len in MIN_RANDOM_LEN..=18 {
                let l = CidLayout::new(config, &[], random_len).unwrap();
                let cid = l.generate(7, &vec![0xff; random_len]).unwrap();
                assert_eq!(cid[0] >> 5, config);
                assert_ne!(cid[0] >> 5, UNROUTABLE_CONFIG_ID);
                assert_eq!(usize::from(cid[0] & 0x1f), cid.len() - 1);
            }
        }
    }

    #[test]
    fn the_default_is_the_single_host_layout() {
        let d = CidLayout::default();
        assert_eq!(d, CidLayout::single_host());
        assert_eq!(d.config_id(), 0);
        assert_eq!(d.host_id(), &[] as &[u8]);
        // As a QUIC-LB balancer sees it: the worker byte is the server ID.
        assert_eq!(d.server_id_len(), 1);
        assert_eq!(d.nonce_len(), SINGLE_HOST_NONCE_LEN);
        assert_eq!(d.random_len(), SINGLE_HOST_NONCE_LEN);
        assert_eq!(d.lb_config(), &LbConfig::new(0, 1, 14, None).unwrap());
        assert_eq!(d.worker_offset(), 1);
        assert_eq!(d.steerable(), Some(1));
        assert_eq!(d.protection(), Protection::Plaintext);
        assert_eq!(CidLayout::new(0, &[], 14).unwrap(), d);
    }

    #[test]
    fn only_plaintext_layouts_are_steerable() {
        assert_eq!(CidLayout::new(3, &[0xab, 0xcd], 6).unwrap().steerable(), Some(3));
        assert_eq!(CidLayout::new(3, &[0xab, 0xcd], 6).unwrap().worker_offset(), 3);
        for layout in encrypted_layouts() {
            assert_eq!(layout.steerable(), None, "{layout:?}");
            assert_ne!(layout.protection(), Protection::Plaintext);
        }
        let keyless = LbConfig::new(1, 2, 8, None).unwrap();
        assert_eq!(CidLayout::from_lb_config(&keyless, &[1, 2]).unwrap().steerable(), Some(3));
    }

    #[test]
    fn the_balancers_view_of_a_host_layout() {
        // Plaintext with a host ID: server ID = host ID, nonce = worker + random.
        let l = CidLayout::new(3, &[0xab, 0xcd], 6).unwrap();
        assert_eq!(l.lb_config(), &LbConfig::new(3, 2, 7, None).unwrap());
        assert_eq!((l.server_id_len(), l.nonce_len(), l.random_len()), (2, 7, 6));
        // Encrypted: the configuration itself.
        let config = LbConfig::new(4, 3, 13, Some(KEY)).unwrap();
        let l = CidLayout::from_lb_config(&config, &[1, 2, 3]).unwrap();
        assert_eq!(l.lb_config(), &config);
        assert_eq!(l.protection(), Protection::SinglePass);
    }

    #[test]
    fn only_the_exact_first_octet_is_ours() {
        for layout in layouts() {
            let mut cid = layout.generate(9, &random_for(&layout, 9)).unwrap().as_bytes().to_vec();
            for first in 0..=255u8 {
                cid[0] = first;
                let want = if first == layout.first_octet() { Decoded::Worker(9) } else { Decoded::Foreign };
                assert_eq!(layout.decode(&cid), want, "{layout:?} first octet {first:#04x}");
            }
        }
    }

    #[test]
    fn foreign_cids_are_foreign() {
        let layout = CidLayout::new(2, &[0xab, 0xcd], 8).unwrap();
        let good = layout.generate(4, &[7; 8]).unwrap();
        assert_eq!(layout.decode(&good), Decoded::Worker(4));

        // Another config rotation codepoint, same length bits.
        let mut other_config = good.as_bytes().to_vec();
        other_config[0] = (3 << 5) | (other_config[0] & 0x1f);
        assert_eq!(layout.decode(&other_config), Decoded::Foreign);

        // Unroutable 0b111 with a correct length self-description.
        let mut unroutable = good.as_bytes().to_vec();
        unroutable[0] = (UNROUTABLE_CONFIG_ID << 5) | (unroutable[0] & 0x1f);
        assert_eq!(layout.decode(&unroutable), Decoded::Foreign);

        // Another host: either host ID byte differs.
        for i in [1, 2] {
            let mut other_host = good.as_bytes().to_vec();
            other_host[i] ^= 0x01;
            assert_eq!(layout.decode(&other_host), Decoded::Foreign);
        }

        // Other lengths: truncated, extended, wrong length bits.
        assert_eq!(layout.decode(&good[..good.len() - 1]), Decoded::Foreign);
        let mut longer = good.as_bytes().to_vec();
        longer.push(0);
        assert_eq!(layout.decode(&longer), Decoded::Foreign);
        let mut wrong_len_bits = good.as_bytes().to_vec();
        wrong_len_bits[0] = (2 << 5) | 5;
        assert_eq!(layout.decode(&wrong_len_bits), Decoded::Foreign);

        // Short and empty DCIDs.
        for n in 0..good.len() {
            assert_eq!(layout.decode(&good[..n]), Decoded::Foreign, "{n} bytes");
        }

        // A CID of another layout with the same length.
        let other = CidLayout::new(2, &[0xab, 0xce], 8).unwrap();
        assert_eq!(layout.decode(&other.generate(4, &[7; 8]).unwrap()), Decoded::Foreign);

        // The single-host layout does not claim zero-length or all-zero DCIDs.
        let single = CidLayout::single_host();
        assert_eq!(single.decode(&[]), Decoded::Foreign);
        assert_eq!(single.decode(&[0; 16]), Decoded::Foreign);
        assert_eq!(single.decode(&[0; 8]), Decoded::Foreign);
    }

    #[test]
    fn encrypted_foreign_cids_are_foreign() {
        for (ours, theirs) in [
            (encrypted(3, &[0xab, 0xcd, 0xef], 13), encrypted(3, &[0xab, 0xcd, 0xee], 13)),
            (encrypted(3, &[0xab, 0xcd], 6), encrypted(3, &[0xab, 0xce], 6)),
            (encrypted(3, &[1, 2, 3, 4, 5, 6, 7], 5), encrypted(3, &[1, 2, 3, 4, 5, 6, 8], 5)),
        ] {
            assert_eq!(ours.cid_len(), theirs.cid_len());
            assert_eq!(ours.first_octet(), theirs.first_octet());
            for worker in 0..=255u8 {
                // Another host's CID under the same key: decrypts to its ID.
                let cid = theirs.generate_with(worker, |r| r.fill(worker));
                assert_eq!(ours.decode(&cid), Decoded::Foreign, "{ours:?} {cid:?}");
                assert_eq!(theirs.decode(&cid), Decoded::Worker(worker));
                // Any flipped ciphertext bit scrambles the host ID.
                let mut flipped = ours.generate_with(worker, |r| r.fill(worker)).as_bytes().to_vec();
                let at = 1 + usize::from(worker) % (flipped.len() - 1);
                flipped[at] ^= 1 << (worker % 8);
                assert_eq!(ours.decode(&flipped), Decoded::Foreign, "{ours:?}");
            }
        }
    }

    #[test]
    fn a_wrong_key_does_not_decode_to_our_host() {
        let ours = encrypted(0, &[0x10, 0x20], 9);
        let config = LbConfig::new(0, 2, 9, Some(CidKey::new([0x55; 16]))).unwrap();
        let wrong = CidLayout::from_lb_config(&config, &[0x10, 0x20]).unwrap();
        let lb = LbDecoder::new(config);
        for worker in 0..=255u8 {
            let cid = ours.generate_with(worker, |r| r.fill(worker.wrapping_mul(3)));
            assert_eq!(wrong.decode(&cid), Decoded::Foreign, "{cid:?}");
            assert_ne!(lb.server_id(&cid).unwrap().as_bytes(), &[0x10, 0x20]);
        }
        // And a plaintext layout with the same host ID and lengths does
        // not read an encrypted CID as ours.
        let plain = CidLayout::new(0, &[0x10, 0x20], 8).unwrap();
        assert_eq!(plain.cid_len(), ours.cid_len());
        let cid = ours.generate_with(1, |r| r.fill(1));
        assert_eq!(plain.decode(&cid), Decoded::Foreign);
    }

    /// Encrypted CIDs of one worker that differ in one random bit share no
    /// visible structure: about half of all bits differ, never fewer than a
    /// quarter.
    #[test]
    fn nearby_random_bytes_give_unrelated_encrypted_cids() {
        for layout in encrypted_layouts() {
            let base = layout.generate_with(7, |r| r.fill(0));
            let mut total = 0;
            let mut samples = 0;
            for bit in 0..layout.random_len() * 8 {
                let cid = layout.generate_with(7, |r| r[bit / 8] = 0x80 >> (bit % 8));
                assert_eq!(cid[0], base[0]);
                let differ: u32 = cid[1..].iter().zip(&base[1..]).map(|(a, b)| (a ^ b).count_ones()).sum();
                let bits = (cid.len() as u32 - 1) * 8;
                assert!(differ >= bits / 4, "{layout:?} bit {bit}: {differ} of {bits} bits differ");
                total += differ;
                samples += bits;
            }
            let share = f64::from(total) / f64::from(samples);
            assert!((0.4..0.6).contains(&share), "{layout:?}: {share}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_claims_are_exact() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let layouts = layouts();
        for _ in 0..20_000 {
            let len = (next() % 41) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias some inputs towards our first octets so the claim path runs.
            if let Some(first) = bytes.first_mut() {
                *first = layouts[(next() % layouts.len() as u64) as usize].first_octet();
            }
            for layout in &layouts {
                if let Decoded::Worker(w) = layout.decode(&bytes) {
                    assert_eq!(bytes.len(), layout.cid_len());
                    assert_eq!(bytes[0], layout.first_octet());
                    let plain = CidCodec::new(*layout.lb_config()).decode(&bytes).unwrap();
                    let block = [plain.server_id().as_bytes(), plain.nonce()].concat();
                    assert_eq!(&block[..layout.host_id().len()], layout.host_id());
                    assert_eq!(block[layout.host_id().len()], w);
                }
                let _ = layout.decode_datagram(&bytes);
            }
        }
    }

    #[test]
    fn datagrams_decode_by_their_header_form() {
        for layout in [CidLayout::new(1, &[0x5a], 6).unwrap(), encrypted(1, &[0x5a], 7)] {
            let cid = layout.generate(200, &[1, 2, 3, 4, 5, 6]).unwrap();

            // Short header: first byte, then our DCID, then protected payload.
            let mut short = vec![0x40 | 0x1b];
            short.extend_from_slice(&cid);
            short.extend_from_slice(&[0xee; 30]);
            assert_eq!(layout.decode_datagram(&short), Decoded::Worker(200));
            // Cut inside the DCID: not ours.
            assert_eq!(layout.decode_datagram(&short[..cid.len()]), Decoded::Foreign);
            assert_eq!(layout.decode_datagram(&short[..1]), Decoded::Foreign);
            assert_eq!(layout.decode_datagram(&[]), Decoded::Foreign);

            // Long header (a client's Handshake packet to our CID).
            let mut long = vec![0xe0, 0, 0, 0, 1, cid.len() as u8];
            long.extend_from_slice(&cid);
            long.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(layout.decode_datagram(&long), Decoded::Worker(200));
            // Truncated long headers.
            for n in 0..6 + cid.len() {
                assert_eq!(layout.decode_datagram(&long[..n]), Decoded::Foreign, "{n} bytes");
            }
            // A client Initial with its own random 8-byte DCID.
            let initial = [0xc0, 0, 0, 0, 1, 8, 9, 9, 9, 9, 9, 9, 9, 9, 0];
            assert_eq!(layout.decode_datagram(&initial), Decoded::Foreign);
            // A DCID length byte pointing past the end.
            let lying = [0xc0, 0, 0, 0, 1, 255, 1, 2];
            assert_eq!(layout.decode_datagram(&lying), Decoded::Foreign);
        }
    }

    #[test]
    fn layout_validation_names_the_bad_parameter() {
        assert_eq!(CidLayout::new(7, &[], 8), Err(CidLayoutError::ConfigId(7)));
        assert_eq!(CidLayout::new(255, &[], 8), Err(CidLayoutError::ConfigId(255)));
        assert_eq!(CidLayout::new(0, &[0; 15], 4), Err(CidLayoutError::HostIdTooLong(15)));
        assert_eq!(CidLayout::new(0, &[0; 40], 4), Err(CidLayoutError::HostIdTooLong(40)));
        assert_eq!(CidLayout::new(0, &[], 3), Err(CidLayoutError::NonceTooShort(3)));
        assert_eq!(CidLayout::new(0, &[], 0), Err(CidLayoutError::NonceTooShort(0)));
        assert_eq!(
            CidLayout::new(0, &[0; 14], 5),
            Err(CidLayoutError::TooLong { len: 21, host_id_len: 14, random_len: 5 })
        );
        assert_eq!(
            CidLayout::new(0, &[], 19),
            Err(CidLayoutError::TooLong { len: 21, host_id_len: 0, random_len: 19 })
        );
        assert!(matches!(CidLayout::new(0, &[], usize::MAX), Err(CidLayoutError::TooLong { .. })));
        // The boundaries themselves are fine.
        assert_eq!(CidLayout::new(0, &[0; 14], 4).unwrap().cid_len(), 20);
        assert_eq!(CidLayout::new(6, &[], 18).unwrap().cid_len(), 20);
        assert_eq!(CidLayout::new(0, &[], 4).unwrap().cid_len(), 6);

        let msg = CidLayout::new(7, &[], 8).unwrap_err().to_string();
        assert!(msg.contains("0b111") && msg.contains('7'), "{msg}");
        let msg = CidLayout::new(0, &[0; 15], 4).unwrap_err().to_string();
        assert!(msg.contains("15") && msg.contains("14"), "{msg}");
        let msg = CidLayout::new(0, &[], 2).unwrap_err().to_string();
        assert!(msg.contains("at least 4"), "{msg}");
        let msg = CidLayout::new(0, &[0; 10], 10).unwrap_err().to_string();
        assert!(msg.contains("22 bytes") && msg.contains("at most 20"), "{msg}");
    }

    #[test]
    fn lb_config_validation_for_this_relay() {
        let c = LbConfig::new(0, 3, 6, Some(KEY)).unwrap();
        assert_eq!(
            CidLayout::from_lb_config(&c, &[1, 2]),
            Err(CidLayoutError::HostIdLen { expected: 3, got: 2 })
        );
        // The draft allows a 4-octet nonce; the relay needs the worker byte
        // and 4 random octets.
        let c = LbConfig::new(0, 3, 4, Some(KEY)).unwrap();
        assert_eq!(CidLayout::from_lb_config(&c, &[1, 2, 3]), Err(CidLayoutError::NonceTooShort(3)));
        let c = LbConfig::new(0, MAX_SERVER_ID_LEN, 4, None).unwrap();
        assert_eq!(CidLayout::from_lb_config(&c, &[0; 15]), Err(CidLayoutError::HostIdTooLong(15)));
        let c = LbConfig::new(0, 14, 5, Some(KEY)).unwrap();
        assert_eq!(CidLayout::from_lb_config(&c, &[0; 14]).unwrap().cid_len(), 20);
    }

    #[test]
    fn debug_output_is_readable_and_keyless() {
        let layout = CidLayout::new(1, &[0xab], 4).unwrap();
        let cid = layout.generate(2, &[3, 4, 5, 6]).unwrap();
        assert_eq!(format!("{cid:?}"), "Cid(26ab0203040506)");
        let d = format!("{layout:?}");
        assert!(d.contains("host_id: ab") && d.contains("cid_len: 7") && d.contains("Plaintext"), "{d}");
        let d = format!("{:?}", encrypted(1, &[0xab], 6));
        assert!(d.contains("FourPass") && !d.contains("143"), "{d}");
    }
}

//! Server connection IDs that name the owning worker, in the QUIC-LB layout
//! (draft-ietf-quic-load-balancers-21, plaintext: no key).
//!
//! The relay runs one worker thread per core, each with its own
//! SO_REUSEPORT socket on the same QUIC address. The kernel spreads a new
//! client's packets by 4-tuple hash, so after a NAT rebinding a connection's
//! packets could land on another worker. Every connection ID the relay
//! issues therefore names its worker, and a classic BPF program on the
//! reuseport group (`relay_udp::steer`) reads that byte out of each
//! short-header packet and picks the owner's socket.
//!
//! # Layout
//!
//! ```text
//! QUIC-LB Connection ID {                  // §5.2
//!   First Octet {                          // §3.4
//!     Config Rotation (3),                 // §3.1: 0..=6, never 0b111
//!     CID Len (5),                         // §3.3: cid_len() - 1
//!   },
//!   Server ID {                            // §5.2: 1..=15 octets (§5.3)
//!     Host Prefix (0..=14 octets),         // this relay host in a fleet
//!     Worker (8),                          // the owning worker thread
//!   },
//!   Nonce (4..=18 octets),                 // §5.3: >= 4; random (§5.4)
//! }
//! ```
//!
//! The QUIC-LB server ID is `host prefix ++ [worker]`; a CID is at most 20
//! bytes (RFC 9000 section 17.2), so server ID and nonce sum to at most 19.
//! A QUIC-LB load balancer in front of a fleet of relays is configured with
//! that whole server ID: it maps each host's 256 server IDs (one per
//! possible worker byte) to that host's address, so a host's CIDs route to
//! it whichever worker issued them. (A balancer could instead treat the
//! worker byte as part of the nonce, as the "load balancer chains" section
//! 7.1 of the draft allows for tiers, but then its server ID length is the
//! prefix alone and that prefix must not be empty.)
//!
//! This is the draft's unencrypted configuration: the worker byte and the
//! host prefix are visible on the wire, so an observer can tell which worker
//! (and host) owns a connection. §5.3 warns that "failure to define a key
//! means that observers can determine the assigned server of any
//! connection"; with a few workers per host that is little information, and
//! the nonce keeps the CIDs of one connection unlinkable to each other.
//!
//! The module is sans-IO: the caller supplies the random nonce bytes.
#![forbid(unsafe_code)]

use std::fmt;
use std::ops::Deref;

/// Longest connection ID QUIC version 1 allows (RFC 9000 section 17.2).
pub const MAX_CID_LEN: usize = 20;

/// Shortest nonce QUIC-LB allows.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
//# The nonce length MUST be at least 4 octets.
pub const MIN_NONCE_LEN: usize = 4;

/// Longest QUIC-LB server ID: with the first octet and the shortest nonce
/// it fills a 20-byte CID.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
//# As QUIC version 1 limits connection IDs to 20 octets, the server ID and nonce
//# lengths MUST sum to 19 octets or less.
pub const MAX_SERVER_ID_LEN: usize = MAX_CID_LEN - 1 - MIN_NONCE_LEN;

/// Longest host prefix: the server ID less the worker byte.
pub const MAX_PREFIX_LEN: usize = MAX_SERVER_ID_LEN - 1;

/// Config rotation codepoint that marks a CID as unroutable; no
/// configuration may use it.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.1
//# A configuration MUST NOT use the reserved identifier 0b111
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;

/// Largest config rotation codepoint a layout may use.
pub const MAX_CONFIG_ID: u8 = UNROUTABLE_CONFIG_ID - 1;

/// Nonce length of [`CidLayout::single_host`].
pub const SINGLE_HOST_NONCE_LEN: usize = 14;

/// The config rotation bits are the three most significant bits.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.1
//# The first three bits of any connection ID MUST encode an identifier for the
//# configuration that the connection ID uses.
const CONFIG_SHIFT: u32 = 5;

/// The length self-description is the remaining five bits.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.3
//# the remaining 5 bits in the first octet of the Connection ID are
//# reserved to express the length of the following connection ID, not including
//# the first octet.
const LENGTH_MASK: u8 = 0b1_1111;

/// Why a [`CidLayout`] cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidLayoutError {
    /// The config rotation codepoint is not in 0..=6.
    #[error(
        "config rotation codepoint {0} is out of range: use 0..=6 (0b111 marks unroutable CIDs, \
         draft-ietf-quic-load-balancers section 3.1)"
    )]
    ConfigId(u8),
    /// The host prefix leaves no room for the worker byte in a 15-octet
    /// server ID.
    #[error(
        "server ID prefix is {0} bytes, at most 14 fit: the server ID (prefix plus the worker byte) \
         is at most 15 octets (draft-ietf-quic-load-balancers section 5.3)"
    )]
    PrefixTooLong(usize),
    /// The nonce is shorter than QUIC-LB's minimum of 4 octets.
    #[error(
        "nonce of {0} bytes is too short: QUIC-LB requires at least 4 (draft-ietf-quic-load-balancers section 5.3)"
    )]
    NonceTooShort(usize),
    /// The CID would exceed QUIC version 1's 20 bytes.
    #[error(
        "connection ID would be {len} bytes (first octet, {prefix_len}-byte prefix, worker byte, \
         {nonce_len}-byte nonce) but QUIC version 1 allows at most 20"
    )]
    TooLong {
        /// Length the CID would have.
        len: usize,
        /// Requested host prefix length.
        prefix_len: usize,
        /// Requested nonce length.
        nonce_len: usize,
    },
}

/// [`CidLayout::generate`] was given a nonce of the wrong length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nonce is {got} bytes but the connection ID layout needs exactly {expected}")]
pub struct NonceLenError {
    /// The layout's nonce length.
    pub expected: usize,
    /// Bytes passed.
    pub got: usize,
}

/// What a destination connection ID says about its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decoded {
    /// One of ours, issued by this worker.
    Worker(u8),
    /// Not ours: a client-chosen Initial DCID, another config rotation
    /// codepoint (including unroutable 0b111), another host's prefix, or
    /// another length.
    Foreign,
}

/// A generated connection ID (at most [`MAX_CID_LEN`] bytes, no
/// allocation). Dereferences to its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    bytes: [u8; MAX_CID_LEN],
    len: u8,
}

impl Cid {
    /// The connection ID bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Deref for Cid {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for Cid {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cid(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// How this relay lays out its server connection IDs; see the module docs.
///
/// Built by [`CidLayout::new`] (validated) or [`CidLayout::single_host`]
/// (also the `Default`). `Copy`, no allocation: workers keep their own.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CidLayout {
    config_id: u8,
    prefix: [u8; MAX_PREFIX_LEN],
    prefix_len: u8,
    nonce_len: u8,
}

impl fmt::Debug for CidLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CidLayout")
            .field("config_id", &self.config_id)
            .field("server_id_prefix", &self.server_id_prefix())
            .field("nonce_len", &self.nonce_len)
            .field("cid_len", &self.cid_len())
            .finish()
    }
}

impl Default for CidLayout {
    fn default() -> Self {
        Self::single_host()
    }
}

impl CidLayout {
    /// A layout with config rotation codepoint `config_id` (0..=6), host
    /// `server_id_prefix` (0..=14 bytes; empty for a single host), one
    /// worker byte and a `nonce_len`-byte random nonce (at least 4), in at
    /// most 20 bytes in all.
    pub fn new(config_id: u8, server_id_prefix: &[u8], nonce_len: usize) -> Result<Self, CidLayoutError> {
        if config_id > MAX_CONFIG_ID {
            return Err(CidLayoutError::ConfigId(config_id));
        }
        let prefix_len = server_id_prefix.len();
        if prefix_len > MAX_PREFIX_LEN {
            return Err(CidLayoutError::PrefixTooLong(prefix_len));
        }
        if nonce_len < MIN_NONCE_LEN {
            return Err(CidLayoutError::NonceTooShort(nonce_len));
        }
        let len = (2 + prefix_len).saturating_add(nonce_len);
        if len > MAX_CID_LEN {
            return Err(CidLayoutError::TooLong { len, prefix_len, nonce_len });
        }
        let mut prefix = [0u8; MAX_PREFIX_LEN];
        prefix[..prefix_len].copy_from_slice(server_id_prefix);
        // Both fit in u8: prefix_len <= 14 and nonce_len <= 18 here.
        Ok(Self { config_id, prefix, prefix_len: prefix_len as u8, nonce_len: nonce_len as u8 })
    }

    /// The layout for a relay that is the only host behind its address:
    /// config rotation codepoint 0, no host prefix, 14 nonce bytes, so CIDs
    /// are 16 bytes: `[0x0f, worker, nonce x 14]`.
    ///
    /// Why 16: 14 random bytes (112 bits) make a collision between live
    /// CIDs negligible (birthday bound near 2^56 CIDs) and leave CIDs
    /// unguessable to off-path attackers; 16 bytes compare and hash as two
    /// 64-bit words; and the 4 bytes left under QUIC's 20 let a fleet add a
    /// host prefix of up to 4 bytes later without shortening the nonce.
    pub const fn single_host() -> Self {
        Self {
            config_id: 0,
            prefix: [0; MAX_PREFIX_LEN],
            prefix_len: 0,
            nonce_len: SINGLE_HOST_NONCE_LEN as u8,
        }
    }

    /// The config rotation codepoint (0..=6).
    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    /// The host prefix of the server ID (may be empty).
    pub fn server_id_prefix(&self) -> &[u8] {
        &self.prefix[..usize::from(self.prefix_len)]
    }

    /// Length of the QUIC-LB server ID: the host prefix plus the worker
    /// byte.
    pub fn server_id_len(&self) -> usize {
        usize::from(self.prefix_len) + 1
    }

    /// Length of the random nonce.
    pub fn nonce_len(&self) -> usize {
        usize::from(self.nonce_len)
    }

    /// Length of every CID this layout generates (at most 20).
    pub fn cid_len(&self) -> usize {
        1 + self.server_id_len() + self.nonce_len()
    }

    /// Offset of the worker byte in the CID: right after the first octet
    /// and the host prefix. In a short-header packet it is at
    /// `1 + worker_offset()` (the DCID follows the packet's first byte).
    pub fn worker_offset(&self) -> usize {
        1 + usize::from(self.prefix_len)
    }

    /// The first octet of every CID this layout generates: the config
    /// rotation codepoint in the top three bits and the length of the rest
    /// of the CID (`cid_len() - 1`) in the low five.
    pub fn first_octet(&self) -> u8 {
        // cid_len() <= 20, so cid_len() - 1 <= 19 fits five bits.
        (self.config_id << CONFIG_SHIFT) | ((self.cid_len() - 1) as u8 & LENGTH_MASK)
    }

    /// A CID owned by `worker` with the given nonce, which must be exactly
    /// [`nonce_len`](Self::nonce_len) bytes of fresh randomness.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
    //# If there is no key in the configuration, the server MUST fill the Nonce field
    //# with bytes that have no observable relationship to the field in previously
    //# issued connection IDs.
    pub fn generate(&self, worker: u8, nonce: &[u8]) -> Result<Cid, NonceLenError> {
        if nonce.len() != self.nonce_len() {
            return Err(NonceLenError { expected: self.nonce_len(), got: nonce.len() });
        }
        Ok(self.generate_with(worker, |out| out.copy_from_slice(nonce)))
    }

    /// A CID owned by `worker`; `fill_nonce` writes the random nonce into
    /// the slice it is given (exactly [`nonce_len`](Self::nonce_len)
    /// bytes), e.g. with the TLS library's random generator.
    pub fn generate_with(&self, worker: u8, fill_nonce: impl FnOnce(&mut [u8])) -> Cid {
        let mut bytes = [0u8; MAX_CID_LEN];
        let worker_at = self.worker_offset();
        bytes[0] = self.first_octet();
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
        //# The server writes the first octet and its server ID into their respective
        //# fields.
        bytes[1..worker_at].copy_from_slice(self.server_id_prefix());
        bytes[worker_at] = worker;
        let len = self.cid_len();
        fill_nonce(&mut bytes[worker_at + 1..len]);
        // len <= 20.
        Cid { bytes, len: len as u8 }
    }

    /// Which worker owns `dcid`, a destination connection ID: `Worker` only
    /// when it has this layout's length, first octet (config rotation bits
    /// and length self-description) and host prefix. Anything else,
    /// including arbitrary bytes, is `Foreign`.
    pub fn decode(&self, dcid: &[u8]) -> Decoded {
        if dcid.len() != self.cid_len() {
            return Decoded::Foreign;
        }
        let Some((&first, rest)) = dcid.split_first() else { return Decoded::Foreign };
        // One comparison checks both fields of the first octet. Our config
        // codepoint is never 0b111, so unroutable CIDs are Foreign here.
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
        //# a packet with a DCID with config ID codepoint 0b111 (see
        //# {{config-failover}}) is always unroutable.
        if first != self.first_octet() {
            return Decoded::Foreign;
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5
        //# On each incoming packet, the load balancer extracts consecutive octets,
        //# beginning with the second octet. If there is no key, the first octets
        //# correspond to the server ID.
        let Some((prefix, after)) = rest.split_at_checked(usize::from(self.prefix_len)) else {
            return Decoded::Foreign;
        };
        if prefix != self.server_id_prefix() {
            return Decoded::Foreign;
        }
        match after.first() {
            Some(&worker) => Decoded::Worker(worker),
            None => Decoded::Foreign,
        }
    }

    /// Which worker owns a received QUIC datagram, from the destination
    /// connection ID of its first packet (RFC 8999, the version-independent
    /// header): in a short header it follows the first byte and has our
    /// length; in a long header its length is byte 5 and it starts at byte
    /// 6. Client-chosen Initial DCIDs decode as `Foreign`.
    pub fn decode_datagram(&self, datagram: &[u8]) -> Decoded {
        let Some((&first, rest)) = datagram.split_first() else { return Decoded::Foreign };
        let dcid = if first & 0x80 == 0 {
            // RFC 8999 section 5.2: Header Form (1) = 0, Version-Specific
            // Bits (7), Destination Connection ID (..).
            rest.get(..self.cid_len())
        } else {
            // RFC 8999 section 5.1: Header Form (1) = 1, Version-Specific
            // Bits (7), Version (32), Destination Connection ID Length (8),
            // Destination Connection ID (0..2040).
            rest.get(4).and_then(|&len| rest.get(5..5 + usize::from(len)))
        };
        dcid.map_or(Decoded::Foreign, |d| self.decode(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic nonce bytes, different per worker and layout.
    fn nonce_for(layout: &CidLayout, worker: u8) -> Vec<u8> {
        (0..layout.nonce_len()).map(|i| worker.wrapping_mul(31).wrapping_add(i as u8 * 7 + 1)).collect()
    }

    fn layouts() -> Vec<CidLayout> {
        vec![
            CidLayout::single_host(),
            CidLayout::new(3, &[0xab, 0xcd], 6).unwrap(),
            CidLayout::new(6, &[0x11; MAX_PREFIX_LEN], MIN_NONCE_LEN).unwrap(),
            CidLayout::new(1, &[], 18).unwrap(),
            CidLayout::new(0, &[0x00], 4).unwrap(),
        ]
    }

    #[test]
    fn every_worker_round_trips_in_every_layout() {
        for layout in layouts() {
            for worker in 0..=255u8 {
                let nonce = nonce_for(&layout, worker);
                let cid = layout.generate(worker, &nonce).unwrap();
                assert_eq!(cid.len(), layout.cid_len(), "{layout:?}");
                assert_eq!(cid[0], layout.first_octet());
                assert_eq!(&cid[1..layout.worker_offset()], layout.server_id_prefix());
                assert_eq!(cid[layout.worker_offset()], worker);
                assert_eq!(&cid[layout.worker_offset() + 1..], &nonce[..]);
                assert_eq!(layout.decode(&cid), Decoded::Worker(worker), "{layout:?} {cid:?}");
            }
        }
    }

    #[test]
    fn generate_with_fills_exactly_the_nonce() {
        let layout = CidLayout::new(2, &[9, 8, 7], 5).unwrap();
        let mut calls = 0;
        let cid = layout.generate_with(42, |nonce| {
            calls += 1;
            assert_eq!(nonce.len(), 5);
            assert!(nonce.iter().all(|&b| b == 0), "nonce buffer starts zeroed");
            nonce.copy_from_slice(&[1, 2, 3, 4, 5]);
        });
        assert_eq!(calls, 1);
        assert_eq!(cid.as_bytes(), &[layout.first_octet(), 9, 8, 7, 42, 1, 2, 3, 4, 5]);
        assert_eq!(layout.decode(&cid), Decoded::Worker(42));
    }

    #[test]
    fn generate_refuses_a_nonce_of_the_wrong_length() {
        let layout = CidLayout::single_host();
        assert_eq!(layout.generate(1, &[0; 13]), Err(NonceLenError { expected: 14, got: 13 }));
        assert_eq!(layout.generate(1, &[0; 15]), Err(NonceLenError { expected: 14, got: 15 }));
        assert_eq!(layout.generate(1, &[]), Err(NonceLenError { expected: 14, got: 0 }));
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
        // Config 5, 3-byte prefix, 10-byte nonce: 15 bytes -> 0b101_01110.
        let l = CidLayout::new(5, &[1, 2, 3], 10).unwrap();
        assert_eq!(l.cid_len(), 15);
        assert_eq!(l.first_octet(), 0b101_01110);
        // Longest CID: 20 bytes -> length bits 19; config 6 -> 0b110_10011.
        let l = CidLayout::new(6, &[0; 14], 4).unwrap();
        assert_eq!(l.cid_len(), MAX_CID_LEN);
        assert_eq!(l.first_octet(), 0b110_10011);
        for config in 0..=MAX_CONFIG_ID {
            for nonce_len in MIN_NONCE_LEN..=18 {
                let l = CidLayout::new(config, &[], nonce_len).unwrap();
                let cid = l.generate(7, &vec![0xff; nonce_len]).unwrap();
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
        assert_eq!(d.server_id_prefix(), &[] as &[u8]);
        assert_eq!(d.server_id_len(), 1);
        assert_eq!(d.nonce_len(), SINGLE_HOST_NONCE_LEN);
        assert_eq!(d.worker_offset(), 1);
        assert_eq!(CidLayout::new(0, &[], 14).unwrap(), d);
    }

    #[test]
    fn only_the_exact_first_octet_is_ours() {
        for layout in layouts() {
            let mut cid = layout.generate(9, &nonce_for(&layout, 9)).unwrap().as_bytes().to_vec();
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

        // Another host: either prefix byte differs.
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
                    assert_eq!(&bytes[1..layout.worker_offset()], layout.server_id_prefix());
                    assert_eq!(bytes[layout.worker_offset()], w);
                }
                let _ = layout.decode_datagram(&bytes);
            }
        }
    }

    #[test]
    fn datagrams_decode_by_their_header_form() {
        let layout = CidLayout::new(1, &[0x5a], 6).unwrap();
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

    #[test]
    fn layout_validation_names_the_bad_parameter() {
        assert_eq!(CidLayout::new(7, &[], 8), Err(CidLayoutError::ConfigId(7)));
        assert_eq!(CidLayout::new(255, &[], 8), Err(CidLayoutError::ConfigId(255)));
        assert_eq!(CidLayout::new(0, &[0; 15], 4), Err(CidLayoutError::PrefixTooLong(15)));
        assert_eq!(CidLayout::new(0, &[0; 40], 4), Err(CidLayoutError::PrefixTooLong(40)));
        assert_eq!(CidLayout::new(0, &[], 3), Err(CidLayoutError::NonceTooShort(3)));
        assert_eq!(CidLayout::new(0, &[], 0), Err(CidLayoutError::NonceTooShort(0)));
        assert_eq!(
            CidLayout::new(0, &[0; 14], 5),
            Err(CidLayoutError::TooLong { len: 21, prefix_len: 14, nonce_len: 5 })
        );
        assert_eq!(
            CidLayout::new(0, &[], 19),
            Err(CidLayoutError::TooLong { len: 21, prefix_len: 0, nonce_len: 19 })
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
    fn limits_match_the_draft() {
        assert_eq!(MAX_SERVER_ID_LEN, 15);
        assert_eq!(MAX_PREFIX_LEN, 14);
        assert_eq!(MAX_CONFIG_ID, 6);
    }

    #[test]
    fn debug_output_is_readable() {
        let layout = CidLayout::new(1, &[0xab], 4).unwrap();
        let cid = layout.generate(2, &[3, 4, 5, 6]).unwrap();
        assert_eq!(format!("{cid:?}"), "Cid(26ab0203040506)");
        let d = format!("{layout:?}");
        assert!(d.contains("server_id_prefix: [171]") && d.contains("cid_len: 7"), "{d}");
    }
}

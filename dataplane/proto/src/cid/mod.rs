//! Server connection IDs in the QUIC-LB format
//! (draft-ietf-quic-load-balancers-21), plaintext or encrypted, naming this
//! relay host (for a load balancer in front of a fleet) and the owning
//! worker thread (for the relay itself).
//!
//! The relay runs one worker thread per core, each with its own
//! SO_REUSEPORT socket on the same QUIC address. The kernel spreads a new
//! client's packets by 4-tuple hash, so after a NAT rebinding a connection's
//! packets could land on another worker. Every connection ID the relay
//! issues therefore names its worker: the receiving worker decodes it and
//! hands the packet to the owner, and with plaintext CIDs a classic BPF
//! program on the reuseport group (`relay_udp::steer`) reads the worker
//! byte at a fixed offset and picks the owner's socket in the kernel.
//!
//! # Layout
//!
//! ```text
//! QUIC-LB Connection ID {                  // §5.2
//!   First Octet {                          // §3.4
//!     Config Rotation (3),                 // §3.1: 0..=6, never 0b111
//!     CID Len (5),                         // §3.3: cid_len() - 1
//!   },
//!   Plaintext Block {                      // encrypted when keyed (§5.4)
//!     Server ID (8..120),                  // §5.3: this host's ID, 1..=15 octets
//!     Nonce (40..) {                       // §5.3: >= 4 octets; we use >= 5
//!       Worker (8),                        // the owning worker thread
//!       Random (32..),                     // fresh randomness per CID
//!     },
//!   },
//! }
//! ```
//!
//! The QUIC-LB server ID is the host's ID; the load balancer maps each
//! host's server ID to its address and never looks at the nonce. The
//! relay's worker byte is the first octet of the nonce: the balancer sees
//! it as nonce, the host reads it back (after decryption when keyed). The
//! rest of the nonce is random. A CID is at most 20 bytes (RFC 9000
//! section 17.2), so server ID and nonce sum to at most 19.
//!
//! A relay that is the only host behind its address needs no server ID:
//! [`CidLayout::single_host`] writes `[0x0f, worker, random x 14]`. To a
//! QUIC-LB balancer that is a 1-octet server ID (the worker byte) and a
//! 14-octet nonce ([`CidLayout::lb_config`]).
//!
//! # Plaintext or encrypted
//!
//! Without a key the server ID and the worker byte are on the wire in the
//! clear: cheap, and the kernel can steer by the worker byte at a fixed
//! offset ([`CidLayout::steerable`]). But, as section 5.3 says, "failure to
//! define a key means that observers can determine the assigned server of
//! any connection, significantly increasing the linkability of QUIC address
//! migration": an observer who sees a client's CIDs on two paths learns they
//! go to the same host and worker. With a 16-octet key the server ID and
//! nonce are encrypted together (section 5.4): one AES-128 block when they
//! fill exactly 16 octets, otherwise a four-round Feistel network with AES
//! as its round function. Every CID then looks random to observers; the
//! load balancer and the host, who hold the key, decrypt it. The worker
//! byte then has no fixed place on the wire, so steering falls back to
//! hand-offs between workers ([`CidLayout::steerable`] is `None`).
//!
//! # Pieces
//!
//! - [`LbConfig`]: one QUIC-LB configuration (codepoint, lengths, key), as
//!   shared with the load balancers; [`CidCodec`] encodes and decodes under
//!   it.
//! - [`CidLayout`]: the relay's CIDs under one configuration: generate one
//!   for a worker, decode a DCID to its worker.
//! - [`CidConfigs`]: the live configurations while the load-balancer
//!   configuration rotates (the current one generates, the previous one
//!   still decodes), and the unroutable fallback when none is loaded.
//! - [`UnroutableCids`]: CIDs with config rotation bits 0b111 (section 3.2).
//! - [`lb::LbDecoder`]: a load balancer's side, to check what the relay
//!   hands out routes to the right host.
//!
//! The module is sans-IO: callers supply the random bytes.
#![forbid(unsafe_code)]

use std::fmt;
use std::ops::Deref;

mod cipher;
mod codec;
mod config;
mod failover;
mod layout;
pub mod lb;
mod rotation;
#[cfg(test)]
mod vectors;

pub use codec::{CidCodec, EncodeError, Plaintext};
pub use config::{CidKey, KEY_LEN, LbConfig, LbConfigError, MAX_BLOCK_LEN, Protection};
pub use failover::{DEFAULT_UNROUTABLE_CID_LEN, MIN_UNROUTABLE_CID_LEN, UnroutableCids, UnroutableLenError};
pub use layout::{CidLayout, CidLayoutError, NonceLenError};
pub use rotation::{CidConfigs, RotateError};

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

/// Fewest random octets the relay puts after the worker byte (so with a
/// host ID its nonces are at least [`MIN_NONCE_LEN`] + 1 octets): one
/// worker's CIDs differ only in these, and a nonce must not repeat
/// (section 9.6: the server "MUST NOT reuse a nonce until it switches to a
/// configuration with new keys").
pub const MIN_RANDOM_LEN: usize = MIN_NONCE_LEN;

/// Longest host ID in the relay's layouts: the worker byte and
/// [`MIN_RANDOM_LEN`] random octets must still fit.
pub const MAX_HOST_ID_LEN: usize = MAX_CID_LEN - 1 - 1 - MIN_RANDOM_LEN;

/// Config rotation codepoint that marks a CID as unroutable; no
/// configuration may use it.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.1
//# A configuration MUST NOT use the
//# reserved identifier 0b111
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;

/// Largest config rotation codepoint a configuration may use.
pub const MAX_CONFIG_ID: u8 = UNROUTABLE_CONFIG_ID - 1;

/// Random octets after the worker byte in [`CidLayout::single_host`].
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

/// The config rotation codepoint of a CID's first octet (0..=7; 7 is
/// [`UNROUTABLE_CONFIG_ID`]).
pub fn config_id_of(first_octet: u8) -> u8 {
    first_octet >> CONFIG_SHIFT
}

/// The CID length a first octet self-describes: its low five bits plus
/// one (the bits count the octets after the first).
pub fn self_described_len(first_octet: u8) -> usize {
    usize::from(first_octet & LENGTH_MASK) + 1
}

/// What a destination connection ID says about its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decoded {
    /// One of ours, issued by this worker.
    Worker(u8),
    /// Not ours: a client-chosen Initial DCID, an unknown config rotation
    /// codepoint (including unroutable 0b111), another host's server ID, or
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
        write_hex(f, self.as_bytes())?;
        f.write_str(")")
    }
}

/// A QUIC-LB server ID: 1 to [`MAX_SERVER_ID_LEN`] octets, no allocation.
/// Dereferences to its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerId {
    bytes: [u8; MAX_SERVER_ID_LEN],
    len: u8,
}

impl ServerId {
    /// The server ID with these bytes: `None` unless 1..=15 of them.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (1..=MAX_SERVER_ID_LEN).contains(&bytes.len()).then(|| Self::from_block(bytes))
    }

    /// From a slice already known to be 1..=15 octets.
    fn from_block(bytes: &[u8]) -> Self {
        let mut out = [0u8; MAX_SERVER_ID_LEN];
        out[..bytes.len()].copy_from_slice(bytes);
        // At most 15.
        Self { bytes: out, len: bytes.len() as u8 }
    }

    /// The server ID bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Deref for ServerId {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerId(")?;
        write_hex(f, self.as_bytes())?;
        f.write_str(")")
    }
}

/// Where a datagram's destination connection ID is, by the header form of
/// its first packet (RFC 8999, the version-independent header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DcidField<'a> {
    /// A long header states the DCID's length: exactly these bytes.
    Long(&'a [u8]),
    /// A short header does not: the DCID starts these bytes (the rest of
    /// the packet) and its length is the receiver's to know.
    Short(&'a [u8]),
}

impl<'a> DcidField<'a> {
    /// The DCID field of `datagram`'s first packet; `None` for an empty
    /// datagram or a long header cut before the end of its DCID.
    fn of(datagram: &'a [u8]) -> Option<Self> {
        let (&first, rest) = datagram.split_first()?;
        if first & 0x80 == 0 {
            // RFC 8999 section 5.2: Header Form (1) = 0, Version-Specific
            // Bits (7), Destination Connection ID (..).
            Some(Self::Short(rest))
        } else {
            // RFC 8999 section 5.1: Header Form (1) = 1, Version-Specific
            // Bits (7), Version (32), Destination Connection ID Length (8),
            // Destination Connection ID (0..2040).
            let len = usize::from(*rest.get(4)?);
            rest.get(5..5 + len).map(Self::Long)
        }
    }

    /// The DCID itself, taking `short_len` bytes for a short header.
    fn dcid(self, short_len: usize) -> Option<&'a [u8]> {
        match self {
            Self::Long(dcid) => Some(dcid),
            Self::Short(rest) => rest.get(..short_len),
        }
    }
}

/// The DCID of `datagram`'s first packet, `short_len` bytes long if it has
/// a short header.
fn datagram_dcid(datagram: &[u8], short_len: usize) -> Option<&[u8]> {
    DcidField::of(datagram)?.dcid(short_len)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_match_the_draft() {
        assert_eq!(MAX_SERVER_ID_LEN, 15);
        assert_eq!(MAX_HOST_ID_LEN, 14);
        assert_eq!(MAX_CONFIG_ID, 6);
        assert_eq!(MAX_BLOCK_LEN, 19);
    }

    #[test]
    fn first_octet_fields() {
        assert_eq!(config_id_of(0x0f), 0);
        assert_eq!(config_id_of(0b101_01110), 5);
        assert_eq!(config_id_of(0xff), UNROUTABLE_CONFIG_ID);
        assert_eq!(self_described_len(0x0f), 16);
        assert_eq!(self_described_len(0b110_10011), 20);
        assert_eq!(self_described_len(0xe0), 1);
    }

    #[test]
    fn server_ids_are_one_to_fifteen_octets() {
        assert_eq!(ServerId::new(&[]), None);
        assert_eq!(ServerId::new(&[0; 16]), None);
        let s = ServerId::new(&[0xab, 0x01]).unwrap();
        assert_eq!(s.as_bytes(), &[0xab, 0x01]);
        assert_eq!(&*s, &[0xab, 0x01]);
        assert_eq!(format!("{s:?}"), "ServerId(ab01)");
        assert_eq!(ServerId::new(&[9; 15]).unwrap().len(), 15);
    }
}

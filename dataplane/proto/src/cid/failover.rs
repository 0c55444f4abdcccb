//! Unroutable CIDs: what a server issues while it has no QUIC-LB
//! configuration (draft-ietf-quic-load-balancers-21 section 3.2). The
//! config rotation bits are 0b111, the length is self-described, and the
//! rest is random. Load balancers route them by 4-tuple; nothing in them
//! names a host or a worker.
#![forbid(unsafe_code)]

use super::{CONFIG_SHIFT, Cid, MAX_CID_LEN, UNROUTABLE_CONFIG_ID};

/// Shortest unroutable CID generated.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.2
//# The connection ID SHOULD be of at least
//# length 8 to provide 7 bytes of entropy after the first octet with a low chance
//# of collision.
pub const MIN_UNROUTABLE_CID_LEN: usize = 8;

/// Default length of unroutable CIDs: the single-host layout's 16 bytes,
/// 15 of them random.
pub const DEFAULT_UNROUTABLE_CID_LEN: usize = 16;

/// [`UnroutableCids::new`] was given a length outside 8..=20.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "unroutable connection IDs of {0} bytes: use 8 to 20 (at least 7 random bytes after the first octet, \
     draft-ietf-quic-load-balancers section 3.2; QUIC version 1 allows at most 20)"
)]
pub struct UnroutableLenError(pub usize);

/// Generates unroutable CIDs of one length: first octet `0b111` and the
/// self-described length, then random bytes.
///
/// A server using them has no configuration, so the draft asks it to give
/// the client exactly one CID (no NEW_CONNECTION_ID frames) and to send
/// `disable_active_migration`; those are the caller's to do.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.2
//# Servers with no active configuration SHOULD provide the client exactly one CID
//# over the life of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnroutableCids {
    len: u8,
}

impl Default for UnroutableCids {
    fn default() -> Self {
        Self { len: DEFAULT_UNROUTABLE_CID_LEN as u8 }
    }
}

impl UnroutableCids {
    /// Unroutable CIDs of `len` bytes (8..=20).
    pub fn new(len: usize) -> Result<Self, UnroutableLenError> {
        if !(MIN_UNROUTABLE_CID_LEN..=MAX_CID_LEN).contains(&len) {
            return Err(UnroutableLenError(len));
        }
        // At most 20.
        Ok(Self { len: len as u8 })
    }

    /// Length of every CID generated.
    pub fn cid_len(&self) -> usize {
        usize::from(self.len)
    }

    /// The first octet of every CID generated: 0b111 and the length of the
    /// rest.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.2
    //# Servers with no active configuration MUST issue connection IDs with the reserved
    //# value of the three most significant bits set to 0b111 to signify the connection
    //# ID is unroutable. These connection IDs MUST self-encode their length (see
    //# {{length-self-description}}).
    pub fn first_octet(&self) -> u8 {
        (UNROUTABLE_CONFIG_ID << CONFIG_SHIFT) | (self.len - 1)
    }

    /// An unroutable CID; `fill_random` writes random bytes into the slice
    /// it is given (everything after the first octet, zeroed).
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.2
    //# When using codepoint 0b111, all bytes but the first SHOULD have no larger of a
    //# chance of collision as random bytes.
    pub fn generate_with(&self, fill_random: impl FnOnce(&mut [u8])) -> Cid {
        let mut bytes = [0u8; MAX_CID_LEN];
        bytes[0] = self.first_octet();
        fill_random(&mut bytes[1..self.cid_len()]);
        Cid { bytes, len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{config_id_of, self_described_len};
    use super::*;

    #[test]
    fn first_octet_is_unroutable_and_self_describes() {
        for len in MIN_UNROUTABLE_CID_LEN..=MAX_CID_LEN {
            let u = UnroutableCids::new(len).unwrap();
            let cid = u.generate_with(|r| {
                assert_eq!(r.len(), len - 1);
                assert!(r.iter().all(|&b| b == 0));
                r.fill(0xff);
            });
            assert_eq!(cid.len(), len);
            assert_eq!(config_id_of(cid[0]), UNROUTABLE_CONFIG_ID);
            assert_eq!(self_described_len(cid[0]), len);
            assert!(cid[1..].iter().all(|&b| b == 0xff));
        }
        assert_eq!(UnroutableCids::default().first_octet(), 0b111_01111);
        assert_eq!(UnroutableCids::default().cid_len(), 16);
    }

    #[test]
    fn lengths_outside_eight_to_twenty_are_refused() {
        assert_eq!(UnroutableCids::new(7), Err(UnroutableLenError(7)));
        assert_eq!(UnroutableCids::new(0), Err(UnroutableLenError(0)));
        assert_eq!(UnroutableCids::new(21), Err(UnroutableLenError(21)));
        let msg = UnroutableLenError(7).to_string();
        assert!(msg.contains("8 to 20"), "{msg}");
    }
}

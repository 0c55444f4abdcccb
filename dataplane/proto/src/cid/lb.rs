//! A QUIC-LB load balancer's side (draft-ietf-quic-load-balancers-21
//! sections 4.1 and 5.5): given its configurations, extract the server ID
//! from a packet's destination connection ID, or say why the DCID is
//! unroutable (the balancer then uses its fallback algorithm, section 4.3).
//!
//! The relay never runs this; tests use it to check that every CID the
//! relay hands out routes to the right host.
#![forbid(unsafe_code)]

use super::codec::CidCodec;
use super::config::LbConfig;
use super::{DcidField, MAX_CONFIG_ID, ServerId, UNROUTABLE_CONFIG_ID, config_id_of, self_described_len};

/// Why a DCID does not route by server ID.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
//# Those that are not routable are
//# "unroutable DCIDs" and receive similar treatment regardless of why they're
//#  unroutable
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// No DCID: an empty datagram, an empty DCID, or a long header cut
    /// before the end of its DCID.
    #[error("no destination connection ID to decode")]
    Missing,
    /// Config rotation codepoint 0b111: a server without configuration.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
    //# Note: a packet with a DCID with config ID codepoint 0b111 (see
    //# {{config-failover}}) is always unroutable.
    #[error("config rotation codepoint 0b111 marks an unroutable connection ID")]
    Reserved,
    /// No configuration for this codepoint.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
    //# The config rotation bits ({{config-rotation}}) do not correspond to an active
    //# configuration.
    #[error("no QUIC-LB configuration for config rotation codepoint {0}")]
    UnknownConfig(u8),
    /// Fewer bytes than the configuration's server ID and nonce need.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
    //# If the packet header encodes the DCID length, the DCID is not long enough for
    //# the decoder to process.
    #[error("destination connection ID of {got} bytes is shorter than the configuration's {needed}")]
    TooShort {
        /// Bytes the configuration needs (its CID length).
        needed: usize,
        /// Bytes there were.
        got: usize,
    },
    /// The first octet's self-described length is inconsistent with the
    /// long header's DCID length or too short for the configuration
    /// (checked only when every server encodes its length).
    #[error("self-described connection ID length {described} does not fit (needed {needed})")]
    LengthMismatch {
        /// Length the first octet describes.
        described: usize,
        /// Length the header states (long header) or the configuration
        /// needs (short header).
        needed: usize,
    },
}

/// A load balancer's decoder: up to seven QUIC-LB configurations, one per
/// config rotation codepoint.
#[derive(Debug, Clone)]
pub struct LbDecoder {
    codecs: [Option<CidCodec>; MAX_CONFIG_ID as usize + 1],
    check_length: bool,
}

impl Default for LbDecoder {
    fn default() -> Self {
        Self::empty()
    }
}

impl LbDecoder {
    /// A decoder without configurations: every DCID is unroutable.
    pub fn empty() -> Self {
        Self { codecs: Default::default(), check_length: false }
    }

    /// A decoder with one configuration.
    pub fn new(config: LbConfig) -> Self {
        let mut d = Self::empty();
        d.insert(config);
        d
    }

    /// Adds `config`, replacing (and returning) any configuration with its
    /// codepoint.
    pub fn insert(&mut self, config: LbConfig) -> Option<LbConfig> {
        let slot = &mut self.codecs[usize::from(config.config_id())];
        slot.replace(CidCodec::new(config)).map(|c| *c.config())
    }

    /// Removes and returns the configuration of codepoint `config_id`.
    pub fn remove(&mut self, config_id: u8) -> Option<LbConfig> {
        self.codecs.get_mut(usize::from(config_id))?.take().map(|c| *c.config())
    }

    /// The configuration of codepoint `config_id`, if any.
    pub fn config(&self, config_id: u8) -> Option<&LbConfig> {
        self.codec(config_id).map(CidCodec::config)
    }

    /// Whether to check the first octet's self-described length, for a
    /// pool whose servers all encode it (off by default).
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
    //# If the load balancer has knowledge that all servers in the pool are encoding
    //# CID length in the first octet (see {{length-self-description}}), it MAY
    //# perform additional checks based on that self-encoded length
    pub fn check_self_described_length(mut self, check: bool) -> Self {
        self.check_length = check;
        self
    }

    fn codec(&self, config_id: u8) -> Option<&CidCodec> {
        self.codecs.get(usize::from(config_id))?.as_ref()
    }

    /// The server ID in `dcid`: the DCID of a packet, or (for a short
    /// header, whose DCID length the balancer does not know) the bytes
    /// that start with it.
    pub fn server_id(&self, dcid: &[u8]) -> Result<ServerId, Unroutable> {
        self.extract(dcid, None)
    }

    /// The server ID a datagram routes to, from the DCID of its first
    /// packet (RFC 8999): a long header's DCID has the stated length, a
    /// short header's starts after the first byte.
    pub fn route_datagram(&self, datagram: &[u8]) -> Result<ServerId, Unroutable> {
        match DcidField::of(datagram) {
            Some(DcidField::Long(dcid)) => self.extract(dcid, Some(dcid.len())),
            Some(DcidField::Short(rest)) => self.extract(rest, None),
            None => Err(Unroutable::Missing),
        }
    }

    /// `stated_len` is the DCID length a long header gives.
    fn extract(&self, dcid: &[u8], stated_len: Option<usize>) -> Result<ServerId, Unroutable> {
        let &first = dcid.first().ok_or(Unroutable::Missing)?;
        let config_id = config_id_of(first);
        if config_id == UNROUTABLE_CONFIG_ID {
            return Err(Unroutable::Reserved);
        }
        let codec = self.codec(config_id).ok_or(Unroutable::UnknownConfig(config_id))?;
        let config = codec.config();
        let needed = config.cid_len();
        if self.check_length {
            let described = self_described_len(first);
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
            //# In a long header, verify that the self-encoded length is consistent with the
            //# CID length field in the header (i.e. the self-encoded length is one less)
            if let Some(stated) = stated_len
                && described != stated
            {
                return Err(Unroutable::LengthMismatch { described, needed: stated });
            }
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
            //# Verify that the self-encoded length is large enough for the decoder to process
            //# using the indicated config ID.
            if described < needed {
                return Err(Unroutable::LengthMismatch { described, needed });
            }
        }
        if dcid.len() < needed {
            return Err(Unroutable::TooShort { needed, got: dcid.len() });
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5
        //# On each incoming packet, the load balancer extracts consecutive octets,
        //# beginning with the second octet. If there is no key, the first octets
        //# correspond to the server ID.
        let plain = codec
            .open(dcid, config.server_id_len())
            .ok_or(Unroutable::TooShort { needed, got: dcid.len() })?;
        Ok(plain.server_id())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CidKey, CidLayout, UnroutableCids};
    use super::*;

    const KEY: CidKey = CidKey::new([0x33; 16]);

    #[test]
    fn unroutable_reasons() {
        let config = LbConfig::new(2, 3, 6, Some(KEY)).unwrap();
        let lb = LbDecoder::new(config);
        let cid = CidCodec::new(config).encode(&[1, 2, 3], &[4; 6]).unwrap();
        assert_eq!(lb.server_id(&cid).unwrap().as_bytes(), &[1, 2, 3]);

        assert_eq!(lb.server_id(&[]), Err(Unroutable::Missing));
        let failover = UnroutableCids::default().generate_with(|r| r.fill(1));
        assert_eq!(lb.server_id(&failover), Err(Unroutable::Reserved));
        let mut other = cid.as_bytes().to_vec();
        other[0] = (5 << 5) | (other[0] & 0x1f);
        assert_eq!(lb.server_id(&other), Err(Unroutable::UnknownConfig(5)));
        assert_eq!(lb.server_id(&cid[..9]), Err(Unroutable::TooShort { needed: 10, got: 9 }));
        assert_eq!(LbDecoder::empty().server_id(&cid), Err(Unroutable::UnknownConfig(2)));
        assert!(Unroutable::UnknownConfig(5).to_string().contains("codepoint 5"));
    }

    #[test]
    fn self_described_length_checks_are_opt_in() {
        let config = LbConfig::new(1, 2, 5, None).unwrap();
        let cid = CidCodec::new(config).encode(&[7, 8], &[0; 5]).unwrap();
        let mut lying = cid.as_bytes().to_vec();
        lying[0] = (1 << 5) | 3; // claims 4 bytes
        let lax = LbDecoder::new(config);
        let strict = LbDecoder::new(config).check_self_described_length(true);
        assert_eq!(lax.server_id(&lying).unwrap().as_bytes(), &[7, 8]);
        assert_eq!(strict.server_id(&lying), Err(Unroutable::LengthMismatch { described: 4, needed: 8 }));
        assert_eq!(strict.server_id(&cid).unwrap().as_bytes(), &[7, 8]);

        // Long header: the self-described length must match the stated one.
        let mut long = vec![0xc0, 0, 0, 0, 1, 9];
        long.extend_from_slice(&cid);
        long.push(0xaa); // a server-appended byte the first octet does not describe
        assert_eq!(lax.route_datagram(&long).unwrap().as_bytes(), &[7, 8]);
        assert_eq!(strict.route_datagram(&long), Err(Unroutable::LengthMismatch { described: 8, needed: 9 }));
        long[5] = 8;
        long.pop();
        assert_eq!(strict.route_datagram(&long).unwrap().as_bytes(), &[7, 8]);
    }

    #[test]
    fn datagrams_route_by_header_form() {
        let config = LbConfig::new(0, 4, 8, Some(KEY)).unwrap();
        let layout = CidLayout::from_lb_config(&config, &[0xde, 0xad, 0xbe, 0xef]).unwrap();
        let lb = LbDecoder::new(config).check_self_described_length(true);
        let cid = layout.generate_with(3, |r| r.fill(5));
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(lb.route_datagram(&short).unwrap().as_bytes(), &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(lb.route_datagram(&short[..5]), Err(Unroutable::TooShort { needed: 13, got: 4 }));
        assert_eq!(lb.route_datagram(&[0x40]), Err(Unroutable::Missing));
        assert_eq!(lb.route_datagram(&[]), Err(Unroutable::Missing));
        // A client Initial's random DCID is (most likely) unroutable.
        let initial = [0xc0, 0, 0, 0, 1, 8, 0xe1, 2, 3, 4, 5, 6, 7, 8, 0];
        assert_eq!(lb.route_datagram(&initial), Err(Unroutable::Reserved));
        let cut = [0xc0, 0, 0, 0, 1, 8, 1, 2];
        assert_eq!(lb.route_datagram(&cut), Err(Unroutable::Missing));
    }

    #[test]
    fn configurations_come_and_go_by_codepoint() {
        let a = LbConfig::new(3, 2, 6, None).unwrap();
        let b = LbConfig::new(3, 4, 6, Some(KEY)).unwrap();
        let mut lb = LbDecoder::new(a);
        assert_eq!(lb.config(3), Some(&a));
        assert_eq!(lb.insert(b), Some(a));
        assert_eq!(lb.config(3), Some(&b));
        assert_eq!(lb.remove(3), Some(b));
        assert_eq!(lb.remove(3), None);
        assert_eq!(lb.remove(7), None);
        assert_eq!(lb.remove(200), None);
        assert_eq!(lb.config(200), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut lb = LbDecoder::new(LbConfig::new(0, 1, 4, Some(KEY)).unwrap());
        lb.insert(LbConfig::new(1, 8, 8, Some(KEY)).unwrap());
        lb.insert(LbConfig::new(2, 15, 4, None).unwrap());
        lb.insert(LbConfig::new(3, 9, 10, Some(KEY)).unwrap());
        let strict = lb.clone().check_self_described_length(true);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 45) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            for d in [&lb, &strict] {
                if let Ok(sid) = d.server_id(&bytes) {
                    assert_eq!(sid.len(), d.config(config_id_of(bytes[0])).unwrap().server_id_len());
                }
                let _ = d.route_datagram(&bytes);
            }
        }
    }
}

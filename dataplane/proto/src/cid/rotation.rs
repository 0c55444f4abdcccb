//! The relay's live CID configurations while the QUIC-LB configuration
//! rotates (draft-ietf-quic-load-balancers-21 section 3.1): the current one
//! generates every new CID, the previous one still decodes the CIDs issued
//! under it until the caller retires it, and the config rotation bits of
//! each DCID say which applies. With no configuration loaded, CIDs are
//! unroutable (section 3.2).
#![forbid(unsafe_code)]

use super::failover::UnroutableCids;
use super::layout::CidLayout;
use super::{Cid, DcidField, Decoded, config_id_of};

/// [`CidConfigs::rotate`] was given a configuration that cannot replace the
/// current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    /// The new configuration has the current one's config rotation
    /// codepoint: both stay live during the rotation, so the codepoint
    /// could not tell their CIDs apart.
    #[error(
        "the new connection ID configuration reuses config rotation codepoint {0}, which the current one \
         still uses (draft-ietf-quic-load-balancers section 3.1)"
    )]
    SameConfigId(u8),
}

/// The live CID layouts of one relay host: at most two, told apart by their
/// config rotation codepoints, plus the unroutable fallback.
///
/// `Clone` copies the layouts (no allocation): each worker keeps its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CidConfigs {
    current: Option<CidLayout>,
    previous: Option<CidLayout>,
    unroutable: UnroutableCids,
}

impl From<CidLayout> for CidConfigs {
    fn from(current: CidLayout) -> Self {
        Self::new(current)
    }
}

impl CidConfigs {
    /// One live configuration, `current`.
    pub fn new(current: CidLayout) -> Self {
        Self { current: Some(current), previous: None, unroutable: UnroutableCids::default() }
    }

    /// No configuration loaded yet: every CID generated is unroutable.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.2
    //# Servers with no active configuration MUST issue connection IDs with the reserved
    //# value of the three most significant bits set to 0b111 to signify the connection
    //# ID is unroutable.
    pub fn unconfigured(unroutable: UnroutableCids) -> Self {
        Self { current: None, previous: None, unroutable }
    }

    /// The configuration new CIDs use, if one is loaded.
    pub fn current(&self) -> Option<&CidLayout> {
        self.current.as_ref()
    }

    /// The configuration being rotated out, still decoded.
    pub fn previous(&self) -> Option<&CidLayout> {
        self.previous.as_ref()
    }

    /// The fallback used while no configuration is loaded.
    pub fn unroutable(&self) -> &UnroutableCids {
        &self.unroutable
    }

    /// Whether new CIDs are routable (a configuration is loaded). If not,
    /// the draft asks the server to send `disable_active_migration` and no
    /// NEW_CONNECTION_ID frames.
    pub fn is_routable(&self) -> bool {
        self.current.is_some()
    }

    /// Makes `next` the configuration of new CIDs. The current one (if any)
    /// becomes the previous one and keeps decoding; the previous one before
    /// it is dropped and returned. The caller then replaces the CIDs its
    /// connections hold under the old configuration (NEW_CONNECTION_ID with
    /// Retire Prior To) and calls [`retire_previous`](Self::retire_previous)
    /// once none is in use.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.1
    //# Servers MUST NOT generate new connection IDs using an old configuration after
    //# receiving a new one from the configuration agent. Servers MUST use that QUIC
    //# version's methods to update the client with CIDs (e.g., NEW_CONNECTION_ID
    //# frames) using the new configuration and retire CIDs using the old configuration.
    pub fn rotate(&mut self, next: CidLayout) -> Result<Option<CidLayout>, RotateError> {
        if let Some(current) = &self.current
            && current.config_id() == next.config_id()
        {
            return Err(RotateError::SameConfigId(next.config_id()));
        }
        match self.current.replace(next) {
            Some(old) => Ok(self.previous.replace(old)),
            None => Ok(None),
        }
    }

    /// Stops decoding the previous configuration's CIDs and returns it.
    pub fn retire_previous(&mut self) -> Option<CidLayout> {
        self.previous.take()
    }

    /// The live layout a CID with this first octet belongs to, by its
    /// config rotation codepoint (never one for 0b111).
    pub fn layout_for(&self, first_octet: u8) -> Option<&CidLayout> {
        let id = config_id_of(first_octet);
        [self.current.as_ref(), self.previous.as_ref()].into_iter().flatten().find(|l| l.config_id() == id)
    }

    /// Length of a short-header DCID starting with this octet, if it
    /// belongs to a live layout (the length a short header leaves to the
    /// receiver to know).
    pub fn cid_len_for(&self, first_octet: u8) -> Option<usize> {
        self.layout_for(first_octet).map(CidLayout::cid_len)
    }

    /// A new CID owned by `worker` under the current configuration;
    /// `fill_random` writes random bytes into the slice it is given. With
    /// no configuration the CID is unroutable and names no worker (the
    /// slice is then everything after the first octet).
    pub fn generate_with(&self, worker: u8, fill_random: impl FnOnce(&mut [u8])) -> Cid {
        match &self.current {
            Some(layout) => layout.generate_with(worker, fill_random),
            None => self.unroutable.generate_with(fill_random),
        }
    }

    /// Which worker owns `dcid`, under whichever live configuration its
    /// config rotation bits name. Unknown codepoints, 0b111 and anything
    /// that layout does not claim are `Foreign`.
    pub fn decode(&self, dcid: &[u8]) -> Decoded {
        match dcid.first().and_then(|&first| self.layout_for(first)) {
            Some(layout) => layout.decode(dcid),
            None => Decoded::Foreign,
        }
    }

    /// Which worker owns a received QUIC datagram, from the DCID of its
    /// first packet: a long header states its length, a short header's is
    /// the length of the live layout its first octet names.
    pub fn decode_datagram(&self, datagram: &[u8]) -> Decoded {
        let dcid = match DcidField::of(datagram) {
            Some(DcidField::Long(dcid)) => Some(dcid),
            Some(DcidField::Short(rest)) => {
                rest.first().and_then(|&first| self.cid_len_for(first)).and_then(|len| rest.get(..len))
            }
            None => None,
        };
        dcid.map_or(Decoded::Foreign, |d| self.decode(d))
    }

    /// The offset of the worker byte in every CID the relay may receive, if
    /// an in-kernel program can steer by it: only when every live layout is
    /// plaintext with the worker byte at the same offset (and a
    /// configuration is loaded: unroutable CIDs name no worker).
    pub fn steerable(&self) -> Option<usize> {
        let offset = self.current.as_ref()?.steerable()?;
        match &self.previous {
            Some(previous) if previous.steerable() != Some(offset) => None,
            _ => Some(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::lb::LbDecoder;
    use super::super::{CidKey, LbConfig};
    use super::*;

    fn keyed(config_id: u8, host: &[u8], nonce_len: usize, key: u8) -> CidLayout {
        let c = LbConfig::new(config_id, host.len(), nonce_len, Some(CidKey::new([key; 16]))).unwrap();
        CidLayout::from_lb_config(&c, host).unwrap()
    }

    #[test]
    fn rotation_keeps_old_cids_decoding_until_retired() {
        let old = CidLayout::new(0, &[0xaa], 8).unwrap();
        let new = keyed(1, &[0xaa], 12, 3);
        let mut configs = CidConfigs::new(old.clone());
        let old_cid = configs.generate_with(5, |r| r.fill(1));
        assert_eq!(configs.decode(&old_cid), Decoded::Worker(5));

        assert_eq!(configs.rotate(new.clone()), Ok(None));
        assert_eq!(configs.current(), Some(&new));
        assert_eq!(configs.previous(), Some(&old));
        // New CIDs use the new configuration only; old ones still decode.
        let new_cid = configs.generate_with(6, |r| r.fill(2));
        assert_eq!(new_cid.len(), new.cid_len());
        assert_eq!(config_id_of(new_cid[0]), 1);
        assert_eq!(configs.decode(&new_cid), Decoded::Worker(6));
        assert_eq!(configs.decode(&old_cid), Decoded::Worker(5));

        assert_eq!(configs.retire_previous(), Some(old));
        assert_eq!(configs.decode(&old_cid), Decoded::Foreign);
        assert_eq!(configs.decode(&new_cid), Decoded::Worker(6));
    }

    #[test]
    fn a_load_balancer_with_both_configurations_routes_both() {
        let old = keyed(2, &[0x01, 0x02], 8, 1);
        let new = keyed(3, &[0x01, 0x02], 14, 2);
        let mut configs = CidConfigs::new(old.clone());
        let old_cid = configs.generate_with(0, |r| r.fill(9));
        configs.rotate(new.clone()).unwrap();
        let new_cid = configs.generate_with(0, |r| r.fill(9));
        let mut lb = LbDecoder::new(*old.lb_config());
        lb.insert(*new.lb_config());
        assert_eq!(lb.server_id(&old_cid).unwrap().as_bytes(), &[0x01, 0x02]);
        assert_eq!(lb.server_id(&new_cid).unwrap().as_bytes(), &[0x01, 0x02]);
    }

    #[test]
    fn a_second_rotation_drops_the_oldest() {
        let a = CidLayout::new(0, &[], 8).unwrap();
        let b = CidLayout::new(1, &[], 8).unwrap();
        let c = CidLayout::new(2, &[], 8).unwrap();
        let mut configs = CidConfigs::new(a.clone());
        let a_cid = configs.generate_with(1, |r| r.fill(1));
        assert_eq!(configs.rotate(b.clone()), Ok(None));
        assert_eq!(configs.rotate(c.clone()), Ok(Some(a)));
        assert_eq!(configs.decode(&a_cid), Decoded::Foreign);
        assert_eq!((configs.current(), configs.previous()), (Some(&c), Some(&b)));
        // The codepoint just dropped may come back.
        assert!(configs.rotate(CidLayout::new(0, &[], 9).unwrap()).is_ok());
    }

    #[test]
    fn rotating_to_the_current_codepoint_is_refused() {
        let mut configs = CidConfigs::new(CidLayout::new(4, &[], 8).unwrap());
        let before = configs.clone();
        assert_eq!(configs.rotate(keyed(4, &[1], 8, 1)), Err(RotateError::SameConfigId(4)));
        assert_eq!(configs, before);
        assert!(RotateError::SameConfigId(4).to_string().contains("codepoint 4"));
    }

    #[test]
    fn unconfigured_hosts_issue_unroutable_cids() {
        let mut configs = CidConfigs::unconfigured(UnroutableCids::new(12).unwrap());
        assert!(!configs.is_routable());
        assert_eq!(configs.steerable(), None);
        let cid = configs.generate_with(3, |r| {
            assert_eq!(r.len(), 11);
            r.fill(0x77);
        });
        assert_eq!(cid[0], 0b111_01011);
        assert_eq!(configs.decode(&cid), Decoded::Foreign);
        // Loading a configuration makes new CIDs routable; nothing to retire.
        assert_eq!(configs.rotate(CidLayout::single_host()), Ok(None));
        assert!(configs.is_routable());
        assert_eq!(configs.previous(), None);
        assert_eq!(configs.decode(&cid), Decoded::Foreign);
        assert_eq!(configs.steerable(), Some(1));
    }

    #[test]
    fn unknown_and_unroutable_codepoints_are_foreign() {
        let configs = CidConfigs::new(CidLayout::new(2, &[0xab], 8).unwrap());
        let cid = configs.generate_with(1, |r| r.fill(4));
        assert_eq!(configs.decode(&cid), Decoded::Worker(1));
        for id in [0, 1, 3, 4, 5, 6, 7] {
            let mut other = cid.as_bytes().to_vec();
            other[0] = (id << 5) | (other[0] & 0x1f);
            assert_eq!(configs.decode(&other), Decoded::Foreign, "codepoint {id}");
            assert_eq!(configs.layout_for(other[0]), None);
        }
        assert_eq!(configs.decode(&[]), Decoded::Foreign);
        assert_eq!(configs.cid_len_for(cid[0]), Some(11));
    }

    #[test]
    fn datagrams_find_their_layout_by_codepoint() {
        let old = CidLayout::new(0, &[0x5a], 6).unwrap();
        let new = keyed(1, &[0x5a], 14, 8);
        let mut configs = CidConfigs::new(old);
        let old_cid = configs.generate_with(10, |r| r.fill(1));
        configs.rotate(new).unwrap();
        let new_cid = configs.generate_with(11, |r| r.fill(2));
        assert_ne!(old_cid.len(), new_cid.len());
        for (cid, worker) in [(old_cid, 10), (new_cid, 11)] {
            let mut short = vec![0x41];
            short.extend_from_slice(&cid);
            short.extend_from_slice(&[0xee; 40]);
            assert_eq!(configs.decode_datagram(&short), Decoded::Worker(worker));
            assert_eq!(configs.decode_datagram(&short[..cid.len()]), Decoded::Foreign);
            let mut long = vec![0xe0, 0, 0, 0, 1, cid.len() as u8];
            long.extend_from_slice(&cid);
            long.push(0);
            assert_eq!(configs.decode_datagram(&long), Decoded::Worker(worker));
        }
        assert_eq!(configs.decode_datagram(&[]), Decoded::Foreign);
        assert_eq!(configs.decode_datagram(&[0x40]), Decoded::Foreign);
        assert_eq!(configs.decode_datagram(&[0x40, 0xff, 1, 2]), Decoded::Foreign);
    }

    #[test]
    fn steering_needs_every_live_layout_plaintext_at_one_offset() {
        let mut configs = CidConfigs::new(CidLayout::new(0, &[1], 8).unwrap());
        assert_eq!(configs.steerable(), Some(2));
        configs.rotate(CidLayout::new(1, &[2], 10).unwrap()).unwrap();
        assert_eq!(configs.steerable(), Some(2));
        configs.rotate(CidLayout::new(2, &[1, 2], 8).unwrap()).unwrap();
        assert_eq!(configs.steerable(), None, "offsets 3 and 2");
        configs.retire_previous();
        assert_eq!(configs.steerable(), Some(3));
        configs.rotate(keyed(3, &[1, 2], 8, 1)).unwrap();
        assert_eq!(configs.steerable(), None, "encrypted current");
        configs.retire_previous();
        assert_eq!(configs.steerable(), None);
    }
}

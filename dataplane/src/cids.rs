//! The relay's live connection ID configurations, shared by the workers:
//! control sends a new QUIC-LB configuration (a rotation, draft-ietf-quic-
//! load-balancers-21 section 3.1), the thread that follows control
//! installs it here and rings the workers, and each worker adopts it at its
//! next turn ([`CidShared::epoch`] says whether it changed) and moves its
//! connections to connection IDs of the new configuration.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use relay_proto::channel::bootstrap::CidSettings;
use relay_proto::cid::{CidConfigs, CidLayoutError, RotateError};

/// Why a new configuration was refused (the old ones stay in force).
#[derive(Debug, thiserror::Error)]
pub enum CidUpdateError {
    /// The settings do not make a valid layout.
    #[error("invalid connection ID settings: {0}")]
    Layout(#[from] CidLayoutError),
    /// The rotation is not possible (e.g. the codepoint in use).
    #[error(transparent)]
    Rotate(#[from] RotateError),
    /// The new connection IDs would have another length: quiche reads a
    /// connection's short headers at the length of its first connection
    /// ID, so every configuration of a relay's life has one length.
    #[error(
        "connection IDs of {new} bytes cannot replace those of {current}: keep server ID plus nonce the same length"
    )]
    Length {
        /// Length in force.
        current: usize,
        /// Length asked for.
        new: usize,
    },
}

/// The configurations every worker uses, and a counter of changes.
#[derive(Debug)]
pub struct CidShared {
    configs: Mutex<CidConfigs>,
    epoch: AtomicU64,
}

impl CidShared {
    /// Shared configurations starting with `configs`.
    pub fn new(configs: CidConfigs) -> Self {
        Self { configs: Mutex::new(configs), epoch: AtomicU64::new(0) }
    }

    /// Grows with every change.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The configurations in force.
    pub fn current(&self) -> CidConfigs {
        self.configs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rotates to `settings`: new connection IDs use it; those of the
    /// configuration in force until now keep decoding (the one before
    /// that is retired).
    pub fn rotate(&self, settings: &CidSettings) -> Result<(), CidUpdateError> {
        let layout = settings.layout()?;
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = configs.current()
            && current.cid_len() != layout.cid_len()
        {
            return Err(CidUpdateError::Length { current: current.cid_len(), new: layout.cid_len() });
        }
        configs.rotate(layout)?;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use relay_proto::cid::Decoded;

    use super::*;

    fn settings(config_id: u8, key: Option<[u8; 16]>) -> CidSettings {
        CidSettings { config_id, host_id: vec![0xab, 0xcd], random_len: 13, key }
    }

    #[test]
    fn a_rotation_changes_the_epoch_and_keeps_the_old_cids_decoding() {
        let shared = CidShared::new(CidConfigs::new(settings(0, None).layout().unwrap()));
        let old = shared.current().generate_with(3, |r| r.fill(7));
        assert_eq!(shared.epoch(), 0);
        shared.rotate(&settings(1, Some([9; 16]))).unwrap();
        assert_eq!(shared.epoch(), 1);
        let now = shared.current();
        let new = now.generate_with(3, |r| r.fill(8));
        assert_eq!(new[0] >> 5, 1);
        assert_eq!(now.decode(&new), Decoded::Worker(3));
        assert_eq!(now.decode(&old), Decoded::Worker(3));
        // The same codepoint again is refused and changes nothing.
        assert!(matches!(shared.rotate(&settings(1, None)), Err(CidUpdateError::Rotate(_))));
        assert_eq!(shared.epoch(), 1);
        // Another length (quiche could not parse the new IDs).
        let longer = CidSettings { random_len: 14, ..settings(2, None) };
        assert!(matches!(shared.rotate(&longer), Err(CidUpdateError::Length { current: 17, new: 18 })));
        // Invalid settings too.
        let bad = CidSettings { config_id: 7, ..settings(2, None) };
        assert!(matches!(shared.rotate(&bad), Err(CidUpdateError::Layout(_))));
    }
}

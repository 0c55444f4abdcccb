//! The policy state control changes at run time and keeps across restarts:
//! static tokens added with `relayctl token add` (as digests), revocations,
//! and quota overrides from `relayctl policy set`.
//!
//! It lives in `state_dir/policy.json` (mode 0600, written to a temporary
//! file, synced and renamed over the old one, so a crash leaves either the
//! old or the new state). A missing file is an empty state; a file that
//! does not parse stops control from starting rather than silently
//! forgetting revocations.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::AuthState;
use crate::state::{StateError, write_private};

/// The file name inside the state directory.
pub const FILE_NAME: &str = "policy.json";
/// The format version written.
pub const VERSION: u32 = 1;

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Run-time tokens and revocations.
    #[serde(default)]
    pub auth: AuthState,
    /// Quota keys set at run time (`per_identity.max_flows` -> value); they
    /// take precedence over the config file until `relayctl policy reset`.
    #[serde(default)]
    pub quota_overrides: BTreeMap<String, u64>,
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The content is not a valid state.
    #[error("{path} is not a valid policy state ({why}); fix or remove it (removing it forgets revocations)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Writing failed.
    #[error("saving the policy state: {0}")]
    Write(#[from] StateError),
}

/// The state file.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    path: PathBuf,
}

impl PolicyStore {
    /// The store in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self { path: state_dir.join(FILE_NAME) }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the state (empty if the file does not exist). A file readable
    /// by others is made private again.
    pub fn load(&self) -> Result<RuntimeState, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RuntimeState { version: VERSION, ..Default::default() });
            }
            Err(source) => return Err(StoreError::Read { path: self.path.clone(), source }),
        };
        if let Ok(meta) = fs::metadata(&self.path)
            && meta.permissions().mode() & 0o077 != 0
        {
            let _ = fs::set_permissions(&self.path, fs::Permissions::from_mode(0o600));
        }
        let invalid = |why: String| StoreError::Invalid { path: self.path.clone(), why };
        let state: RuntimeState = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if state.version != VERSION {
            return Err(invalid(format!("version {} (this control reads {VERSION})", state.version)));
        }
        state.auth.check_bounds().map_err(|e| invalid(e.to_string()))?;
        Ok(state)
    }

    /// Saves `state` atomically with mode 0600.
    pub fn save(&self, state: &RuntimeState) -> Result<(), StoreError> {
        let mut text = serde_json::to_vec_pretty(state)
            .map_err(|e| StoreError::Invalid { path: self.path.clone(), why: e.to_string() })?;
        text.push(b'\n');
        write_private(&self.path, &text)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{RevokedSubject, TokenDigest};

    #[test]
    fn round_trip_private_and_strict() {
        let dir = std::env::temp_dir().join(format!("relay-store-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        crate::state::ensure_dir(&dir).unwrap();
        let store = PolicyStore::new(&dir);
        assert_eq!(store.load().unwrap(), RuntimeState { version: VERSION, ..Default::default() });
        let mut s = RuntimeState { version: VERSION, ..Default::default() };
        s.auth.revoked_subjects.insert("alice".into(), RevokedSubject { revoked_unix: 5 });
        s.auth.static_tokens.insert(TokenDigest::of("t"), crate::auth::AddedToken { added_unix: 6 });
        s.quota_overrides.insert("per_identity.max_flows".into(), 3);
        store.save(&s).unwrap();
        assert_eq!(fs::metadata(store.path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(store.load().unwrap(), s);
        // Widened permissions are narrowed again on load.
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert_eq!(fs::metadata(store.path()).unwrap().permissions().mode() & 0o777, 0o600);
        // Corrupt or foreign content stops the load.
        fs::write(store.path(), "{not json").unwrap();
        assert!(store.load().unwrap_err().to_string().contains("not a valid policy state"));
        fs::write(store.path(), r#"{"version":2}"#).unwrap();
        assert!(store.load().unwrap_err().to_string().contains("version 2"));
        fs::write(store.path(), r#"{"version":1,"extra":true}"#).unwrap();
        assert!(store.load().is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}

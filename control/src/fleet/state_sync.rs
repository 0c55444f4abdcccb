//! The run-time state (tokens, revocations, quota overrides) kept in step
//! between this host and the store.
//!
//! The store holds one signed, versioned document ([`StateDoc`]). Writers
//! use optimistic concurrency: `WATCH` the key, read and verify it, write
//! the next version in `MULTI`/`EXEC` (with the plain version key and the
//! announcement on the events channel), and start over if another host
//! wrote first. One document rather than a hash of items because the MAC
//! then covers the whole state: an item deleted or a document mixed from
//! two versions does not verify, and a replayed older document is refused
//! by its version. Admin changes are rare and the document small, so
//! rewriting it whole costs nothing that matters.
//!
//! Locally, `policy.json` keeps the state in force (the last-known cache
//! the host serves from while the store is down, and across restarts) and
//! `fleet-synced.json` the last document known to be in the store. When
//! this host has changes the store lacks (made while it was unreachable,
//! or from before the host joined), they are merged into the store's
//! document entry by entry ([`super::merge`]).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use redis::Connection;
use serde_json::{Value, json};
use tracing::{error, info, warn};

use super::codec::{MAX_VALUE_LEN, StateDoc, ValueError};
use super::connect::StoreError;
use super::keys::DerivedKey;
use super::keyspace::{Event, Keyspace};
use super::merge::merge;
use super::reads::read_bounded;
use super::status::{StatusHandle, unix_now};
use crate::policy::Policy;
use crate::state::write_private;
use crate::store::{PolicyStore, RuntimeState};

/// The file holding the last document known to be in the store.
pub const SYNCED_FILE: &str = "fleet-synced.json";
/// Writes tried before giving up on a key other hosts keep changing.
const MAX_ATTEMPTS: usize = 5;

/// An admin change: the new state and the reply, computed from the policy
/// in force (or a refusal for the operator).
pub type Change<'a> = &'a dyn Fn(&Policy) -> Result<(RuntimeState, Value), String>;

/// What a reconciliation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do: this host has the store's version.
    Unchanged,
    /// A newer version was installed.
    Installed(u64),
    /// This host wrote a version (its changes, merged; or its state into
    /// an empty, unusable or rolled-back key).
    Written(u64),
}

/// Why an admin commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The change itself was refused (unknown token, bad quota...).
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local state file could not be written.
    #[error("{0}")]
    Local(String),
}

/// What the store holds under the state key.
enum Remote {
    Missing,
    Unusable,
    Valid(StateDoc),
}

/// Keeps the local state and the store's in step.
pub struct StateSync {
    policy: Arc<Mutex<Policy>>,
    cache: PolicyStore,
    synced_path: PathBuf,
    base: StateDoc,
    dirty: bool,
    keyspace: Keyspace,
    signing: DerivedKey,
    host: String,
    status: StatusHandle,
}

impl std::fmt::Debug for StateSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSync")
            .field("version", &self.base.version)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

/// Why the local files could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct SyncedFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub why: String,
}

fn load_synced(path: &Path) -> Result<StateDoc, SyncedFileError> {
    let err = |why: String| SyncedFileError { path: path.to_path_buf(), why };
    match std::fs::read(path) {
        Ok(bytes) => {
            let doc: StateDoc = serde_json::from_slice(&bytes)
                .map_err(|e| err(format!("not a fleet state ({e}); remove it to take the store's state")))?;
            doc.validate().map_err(|e| err(e.to_string()))?;
            Ok(doc)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateDoc::empty()),
        Err(e) => Err(err(e.to_string())),
    }
}

impl StateSync {
    /// Opens the local side in `state_dir`: the policy in force (already
    /// loaded from `policy.json`) and the last synced document. Local
    /// state that differs from it is pushed at the first reconciliation.
    pub fn open(
        policy: Arc<Mutex<Policy>>,
        state_dir: &Path,
        keyspace: Keyspace,
        signing: DerivedKey,
        host: &str,
        status: StatusHandle,
    ) -> Result<Self, SyncedFileError> {
        let synced_path = state_dir.join(SYNCED_FILE);
        let base = load_synced(&synced_path)?;
        let local = policy.lock().unwrap_or_else(|p| p.into_inner()).runtime_state();
        let dirty = local != base.state;
        if dirty {
            info!(
                version = base.version,
                "fleet: this host's run-time state differs from the last fleet state it knew; \
                 its changes will be merged into the fleet's"
            );
        }
        {
            let mut s = status.lock();
            s.state_version = base.version;
            s.pending_local_changes = dirty;
        }
        Ok(Self {
            policy,
            cache: PolicyStore::new(state_dir),
            synced_path,
            base,
            dirty,
            keyspace,
            signing,
            host: host.to_string(),
            status,
        })
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.base.version
    }

    /// Whether this host has changes the store lacks.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    fn policy(&self) -> MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_remote(&self, con: &mut Connection) -> Result<Remote, StoreError> {
        let key = self.keyspace.state();
        let raw = read_bounded(con, &key, MAX_VALUE_LEN)?.into_value();
        Ok(match raw {
            None => Remote::Missing,
            Some(bytes) => match bytes.and_then(|b| StateDoc::decode(&self.signing, &key, &b)) {
                Ok(doc) => Remote::Valid(doc),
                Err(e) => {
                    self.status.rejected(&key, &e);
                    Remote::Unusable
                }
            },
        })
    }

    /// Writes `doc` under the `WATCH` already set; false when another
    /// host wrote first.
    fn write(&self, con: &mut Connection, doc: &StateDoc) -> Result<bool, StoreError> {
        let key = self.keyspace.state();
        let value = doc.encode(&self.signing, &key)?;
        let done: Option<redis::Value> = redis::pipe()
            .atomic()
            .set(&key, value)
            .set(self.keyspace.state_version(), doc.version)
            .publish(self.keyspace.events(), Event::State(doc.version).encode())
            .query(con)?;
        Ok(done.is_some())
    }

    fn doc(&self, version: u64, state: RuntimeState) -> StateDoc {
        StateDoc { version, written_by: self.host.clone(), written_unix: unix_now(), state }
    }

    /// Installs `doc` as the state in force and the synced base, and keeps
    /// both files. Revocations are always installed; quota overrides this
    /// host's config cannot take are logged and left as they were.
    fn adopt(&mut self, doc: StateDoc) {
        {
            let mut p = self.policy();
            if let Err(e) = p.install(doc.state.clone()) {
                error!(
                    version = doc.version,
                    "fleet: quota overrides of the fleet state do not fit this host's config ({e}); installed its tokens and revocations only"
                );
                p.install_auth(doc.state.auth.clone());
            }
        }
        if let Err(e) = self.cache.save(&doc.state) {
            warn!("fleet: keeping the state in {}: {e}", self.cache.path().display());
        }
        match serde_json::to_vec_pretty(&doc) {
            Ok(bytes) => {
                if let Err(e) = write_private(&self.synced_path, &bytes) {
                    warn!("fleet: keeping {}: {e}", self.synced_path.display());
                }
            }
            Err(e) => warn!("fleet: encoding the synced state: {e}"),
        }
        self.base = doc;
        self.dirty = false;
        let mut s = self.status.lock();
        s.state_version = self.base.version;
        s.pending_local_changes = false;
        s.last_sync_unix = Some(unix_now());
    }

    /// One reconciliation; `None` when another host wrote meanwhile.
    fn reconcile_once(&mut self, con: &mut Connection) -> Result<Option<Outcome>, StoreError> {
        redis::cmd("WATCH").arg(self.keyspace.state()).exec(con)?;
        let remote = self.read_remote(con)?;
        let local = if self.dirty { self.policy().runtime_state() } else { self.base.state.clone() };
        let (version, state) = match remote {
            Remote::Valid(d) if d.version >= self.base.version && !self.dirty => {
                redis::cmd("UNWATCH").exec(con)?;
                if d.version == self.base.version && d.state == self.base.state {
                    self.status.lock().last_sync_unix = Some(unix_now());
                    return Ok(Some(Outcome::Unchanged));
                }
                let v = d.version;
                info!(version = v, written_by = d.written_by, "fleet: installed the fleet state");
                self.adopt(d);
                return Ok(Some(Outcome::Installed(v)));
            }
            Remote::Valid(d) if d.version >= self.base.version => {
                // This host's changes since base, onto the store's state.
                (d.version + 1, merge(&self.base.state, &local, &d.state))
            }
            Remote::Valid(d) => {
                self.status.rejected(
                    &self.keyspace.state(),
                    &ValueError::Invalid(format!(
                        "version {} is older than the {} this host has installed (rolled back?)",
                        d.version, self.base.version
                    )),
                );
                (self.base.version + 1, local)
            }
            Remote::Missing | Remote::Unusable => (self.base.version + 1, local),
        };
        let doc = self.doc(version, state);
        if let Err(e) = self.policy().quotas_with(&doc.state.quota_overrides) {
            // A merge of two hosts' quota values that no longer fits.
            warn!("fleet: merged quota overrides do not fit ({e}); keeping the fleet's");
        }
        if !self.write(con, &doc)? {
            return Ok(None);
        }
        info!(version, dirty = self.dirty, "fleet: wrote the fleet state");
        self.adopt(doc);
        Ok(Some(Outcome::Written(version)))
    }

    /// Brings this host and the store in step: installs a newer state,
    /// or writes this host's changes (merged), or restores the store's
    /// key when it is missing, unusable or rolled back.
    pub fn reconcile(&mut self, con: &mut Connection) -> Result<Outcome, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(outcome) = self.reconcile_once(con)? {
                return Ok(outcome);
            }
        }
        Err(StoreError::Conflict)
    }

    /// Applies an admin change through the store: the change is computed
    /// on the fleet's latest state and written as the next version, so
    /// two hosts changing at once both land.
    pub fn commit(&mut self, con: &mut Connection, change: Change<'_>) -> Result<Value, CommitError> {
        for _ in 0..MAX_ATTEMPTS {
            self.reconcile(con)?;
            redis::cmd("WATCH").arg(self.keyspace.state()).exec(con).map_err(StoreError::from)?;
            match self.read_remote(con)? {
                Remote::Valid(d) if d.version == self.base.version => {}
                _ => {
                    redis::cmd("UNWATCH").exec(con).map_err(StoreError::from)?;
                    continue;
                }
            }
            let (state, mut reply) = match change(&self.policy()) {
                Ok(r) => r,
                Err(e) => {
                    redis::cmd("UNWATCH").exec(con).map_err(StoreError::from)?;
                    return Err(CommitError::Refused(e));
                }
            };
            let doc = self.doc(self.base.version + 1, state);
            if self.write(con, &doc)? {
                reply["fleet_state_version"] = json!(doc.version);
                self.adopt(doc);
                return Ok(reply);
            }
        }
        Err(CommitError::Store(StoreError::Conflict))
    }

    /// Applies an admin change on this host only (the store is down and
    /// `on_store_failure = "open"`); it is merged into the fleet state
    /// when the store is back. Persisted before it takes effect.
    pub fn commit_local(&mut self, change: Change<'_>) -> Result<Value, CommitError> {
        let (state, reply) = change(&self.policy()).map_err(CommitError::Refused)?;
        self.cache.save(&state).map_err(|e| CommitError::Local(format!("{e}; nothing was changed")))?;
        self.policy().install(state).map_err(|e| CommitError::Refused(e.to_string()))?;
        self.dirty = true;
        self.status.lock().pending_local_changes = true;
        Ok(reply)
    }
}

//! What the fleet module reports: store connectivity, errors, rejected
//! values, the state version and ticket generation in force, the hosts
//! seen. Shared by the fleet thread (writer), the admin socket and the
//! metrics endpoint (readers).
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;
use tracing::warn;

use super::codec::{Heartbeat, ValueError};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The fleet's status on this host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetStatus {
    /// The fleet's name.
    pub fleet: String,
    /// This host's name.
    pub host: String,
    /// Whether the fleet thread holds a working connection.
    pub store_up: bool,
    /// The store address in use (or last used).
    pub store_address: Option<String>,
    /// The last store error.
    pub last_error: Option<String>,
    /// When it happened, Unix seconds.
    pub last_error_unix: Option<u64>,
    /// Store errors since start (connections lost, commands failed).
    pub store_errors_total: u64,
    /// Values read from the store and refused (bad MAC, malformed, out of
    /// bounds, rolled back).
    pub values_rejected_total: u64,
    /// The last refusal.
    pub last_rejection: Option<String>,
    /// The state version this host enforces.
    pub state_version: u64,
    /// Whether this host has run-time changes the store does not have yet.
    pub pending_local_changes: bool,
    /// When the state was last read from or written to the store.
    pub last_sync_unix: Option<u64>,
    /// The ticket key generation served (none without session tickets).
    pub ticket_generation: Option<u64>,
    /// The ticket key names (public), newest first.
    pub ticket_key_names: Vec<String>,
    /// Hosts whose heartbeat is live, as last listed.
    pub hosts: Vec<Heartbeat>,
    /// This host's QUIC-LB config ID (filled in once fleet connection IDs
    /// exist).
    pub quic_lb_config_id: Option<u8>,
}

/// The figures the metrics endpoint exposes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetFigures {
    /// 1 while the store is reachable.
    pub store_up: bool,
    /// Store errors.
    pub store_errors_total: u64,
    /// Values refused.
    pub values_rejected_total: u64,
    /// State version in force.
    pub state_version: u64,
    /// Ticket key generation in force.
    pub ticket_generation: u64,
    /// Hosts seen alive.
    pub hosts_seen: u64,
    /// Local changes waiting for the store.
    pub pending_local_changes: bool,
}

/// The shared status.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<Mutex<FleetStatus>>);

impl StatusHandle {
    /// A status for `host` in `fleet`.
    pub fn new(fleet: &str, host: &str) -> Self {
        Self(Arc::new(Mutex::new(FleetStatus {
            fleet: fleet.to_string(),
            host: host.to_string(),
            ..Default::default()
        })))
    }

    /// Locks the status.
    pub fn lock(&self) -> MutexGuard<'_, FleetStatus> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the status.
    pub fn snapshot(&self) -> FleetStatus {
        self.lock().clone()
    }

    /// The metrics figures.
    pub fn figures(&self) -> FleetFigures {
        let s = self.lock();
        FleetFigures {
            store_up: s.store_up,
            store_errors_total: s.store_errors_total,
            values_rejected_total: s.values_rejected_total,
            state_version: s.state_version,
            ticket_generation: s.ticket_generation.unwrap_or(0),
            hosts_seen: s.hosts.len() as u64,
            pending_local_changes: s.pending_local_changes,
        }
    }

    /// Records a refused value (logged, counted, otherwise ignored).
    pub fn rejected(&self, key: &str, why: &ValueError) {
        warn!(key, "fleet: refused a value from the store: {why}");
        let mut s = self.lock();
        s.values_rejected_total += 1;
        s.last_rejection = Some(format!("{key}: {why}"));
    }

    /// Records a store error.
    pub fn store_error(&self, error: &str) {
        let mut s = self.lock();
        s.store_errors_total += 1;
        s.last_error = Some(error.to_string());
        s.last_error_unix = Some(unix_now());
    }

    /// Records the connection state.
    pub fn set_up(&self, up: bool, address: Option<String>) {
        let mut s = self.lock();
        s.store_up = up;
        if address.is_some() {
            s.store_address = address;
        }
    }
}

//! Fleet mode: the control processes of several relay hosts share state
//! through a Redis (or Valkey) store.
//!
//! What is shared: the run-time policy state (static tokens added with
//! `relayctl token add`, revocations, quota overrides; [`state_sync`]),
//! the session ticket keys ([`ticket_sync`]), and heartbeats naming the
//! hosts ([`heartbeat`]). What is not: the config file (each host has its
//! own, and should have the same `[auth]`, `[quotas]` and `[targets]`),
//! quota usage, flows.
//!
//! Trust: the store is shared and writable by others, so nothing read from
//! it is trusted. Values that must not be forged are signed or sealed with
//! keys derived from the fleet secret ([`keys`], [`codec`]); a value that
//! does not verify or parse is logged, counted and ignored. Someone who can
//! write to the store but lacks the secret can delete keys or replay older
//! values: hosts refuse versions older than the one they run and write
//! their state back, so this can delay propagation but not forge a token or
//! lift a revocation. Announcements on the events channel are only hints
//! to read now.
//!
//! Threads: a fleet thread ([`worker`]) owns the store connections it
//! listens and polls on; the admin thread applies changes through the
//! store on a connection of its own (bounded timeouts); the control event
//! loop never touches the store.
//!
//! Failure: while the store is unreachable every host keeps enforcing the
//! last state it had (from memory, and from `policy.json` across a
//! restart) and the fleet thread reconnects with capped backoff. With
//! `on_store_failure = "open"` admin changes apply locally at once and are
//! merged into the fleet's state when the store is back ([`merge`]); with
//! `"closed"` they are refused.
#![forbid(unsafe_code)]

pub mod codec;
pub mod connect;
pub mod heartbeat;
pub mod keys;
pub mod keyspace;
pub mod merge;
pub mod quota_share;
pub mod reads;
pub mod settings;
pub mod state_sync;
pub mod status;
pub mod ticket_sync;
pub mod worker;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::Connection;
use serde_json::{Value, json};
use tracing::info;

use self::codec::Heartbeat;
use self::connect::{Connector, StoreError};
use self::keys::FleetKeys;
use self::keyspace::Keyspace;
use self::settings::FleetSettings;
use self::state_sync::{Change, CommitError, StateSync, SyncedFileError};
use self::status::{FleetFigures, StatusHandle, unix_now};
use self::ticket_sync::{TicketSink, TicketSync};
use crate::config::StoreFailureMode;
use crate::global_quota::{self, GlobalUsage, WallClock};
use crate::policy::Policy;

/// Connection attempts at start-up before giving up (about 3 s in all).
const STARTUP_ATTEMPTS: u32 = 5;

/// Why fleet mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetStartError {
    /// No store address answered.
    #[error("fleet {fleet}: the store at {endpoints} is unreachable after {attempts} attempts: {error}")]
    Unreachable {
        /// The fleet.
        fleet: String,
        /// Where it was looked for.
        endpoints: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// The local synced state is unreadable.
    #[error("fleet: {0}")]
    Local(#[from] SyncedFileError),
    /// The first synchronization failed.
    #[error("fleet {fleet}: first synchronization with the store failed: {error}")]
    Sync {
        /// The fleet.
        fleet: String,
        /// Why.
        error: StoreError,
    },
    /// The fleet thread could not start.
    #[error("fleet: starting the fleet thread: {0}")]
    Thread(std::io::Error),
}

/// This host's membership in a fleet: the handle the admin socket, the
/// metrics endpoint and the fleet thread share.
pub struct Fleet {
    name: String,
    host: String,
    mode: StoreFailureMode,
    keyspace: Keyspace,
    keys: FleetKeys,
    connector: Connector,
    sync: Mutex<StateSync>,
    tickets: Option<Mutex<TicketSync>>,
    status: StatusHandle,
    admin_con: Mutex<Option<Connection>>,
    started_unix: u64,
    stop: AtomicBool,
    policy: Arc<Mutex<Policy>>,
    global_quotas: bool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("name", &self.name).field("host", &self.host).finish_non_exhaustive()
    }
}

fn error(message: impl std::fmt::Display) -> Value {
    json!({ "error": message.to_string() })
}

impl Fleet {
    /// Joins the fleet: connects to the store (a few attempts over about
    /// three seconds, then an error naming the addresses), brings the
    /// policy in step with the fleet's state, loads (or makes) the ticket
    /// keys when `ticket_rotation` is set and hands them to `sink`, and
    /// starts the fleet thread.
    pub fn start(
        settings: FleetSettings,
        policy: Arc<Mutex<Policy>>,
        state_dir: &Path,
        ticket_rotation: Option<(Duration, TicketSink)>,
    ) -> Result<Arc<Self>, FleetStartError> {
        let status = StatusHandle::new(&settings.name, &settings.host);
        let connector = Connector::new(settings.endpoints.clone(), settings.credentials.clone());
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        let (mut con, addr) = loop {
            match connector.connect() {
                Ok(c) => break c,
                Err(e) if attempt >= STARTUP_ATTEMPTS => {
                    return Err(FleetStartError::Unreachable {
                        fleet: settings.name.clone(),
                        endpoints: settings.endpoints.to_string(),
                        attempts: attempt,
                        error: e.to_string(),
                    });
                }
                Err(e) => {
                    info!(attempt, "fleet: store not reachable yet: {e}");
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
            }
        };
        status.set_up(true, Some(addr.clone()));
        let sync_err = |error| FleetStartError::Sync { fleet: settings.name.clone(), error };
        if settings.global_quotas {
            let mut p = policy.lock().unwrap_or_else(|e| e.into_inner());
            p.quotas_mut().share_identities(GlobalUsage::new(WallClock::now(), global_quota::MAX_TRACKED));
        }
        let mut sync = StateSync::open(
            policy.clone(),
            state_dir,
            settings.keyspace.clone(),
            settings.keys.signing.clone(),
            &settings.host,
            status.clone(),
        )?;
        sync.reconcile(&mut con).map_err(sync_err)?;
        let tickets = match ticket_rotation {
            None => None,
            Some((rotation, sink)) => {
                let mut t = TicketSync::new(
                    settings.keyspace.clone(),
                    settings.keys.sealing.clone(),
                    &settings.host,
                    rotation,
                    sink,
                    status.clone(),
                );
                t.load(&mut con, unix_now()).map_err(sync_err)?;
                Some(Mutex::new(t))
            }
        };
        let fleet = Arc::new(Self {
            name: settings.name.clone(),
            host: settings.host.clone(),
            mode: settings.on_store_failure,
            keyspace: settings.keyspace,
            keys: settings.keys,
            connector,
            sync: Mutex::new(sync),
            tickets,
            status,
            admin_con: Mutex::new(None),
            started_unix: unix_now(),
            stop: AtomicBool::new(false),
            policy,
            global_quotas: settings.global_quotas,
        });
        fleet.beat(&mut con).map_err(sync_err)?;
        fleet.list_hosts(&mut con).map_err(sync_err)?;
        *fleet.admin_con.lock().unwrap_or_else(|p| p.into_inner()) = Some(con);
        info!(
            fleet = fleet.name,
            host = fleet.host,
            store = addr,
            state_version = fleet.lock_sync().version(),
            ticket_generation = ?fleet.status.lock().ticket_generation,
            "fleet: joined"
        );
        worker::spawn(fleet.clone()).map_err(FleetStartError::Thread)?;
        Ok(fleet)
    }

    /// Records whether the store is reachable; with fleet-wide identity
    /// quotas, a lost store means local limits only (`open`) or refusing
    /// limited identities (`closed`) until it is back.
    fn set_store_up(&self, up: bool, address: Option<String>) {
        self.status.set_up(up, address);
        if !self.global_quotas {
            return;
        }
        let mut p = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = p.quotas_mut().global_mut() {
            g.set_refuse_unshared(!up && self.mode == StoreFailureMode::Closed);
            if !up {
                g.clear_remote();
            }
        }
    }

    /// Stops the fleet thread (at its next turn, within about 100 ms).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The fleet's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The keys derived from the fleet secret (retry tokens and stateless
    /// resets are for the fleet's connection IDs).
    pub fn keys(&self) -> &FleetKeys {
        &self.keys
    }

    /// The status (shared; the metrics endpoint reads it).
    pub fn status(&self) -> &StatusHandle {
        &self.status
    }

    /// The metrics figures.
    pub fn figures(&self) -> FleetFigures {
        self.status.figures()
    }

    /// Sets this host's QUIC-LB config ID, shown in heartbeats and status.
    pub fn set_quic_lb_config_id(&self, id: Option<u8>) {
        self.status.lock().quic_lb_config_id = id;
    }

    fn lock_sync(&self) -> MutexGuard<'_, StateSync> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_tickets<'a>(&self, t: &'a Mutex<TicketSync>) -> MutexGuard<'a, TicketSync> {
        t.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the admin thread's connection, opening it (to the
    /// address that last worked) if needed; a failed connection is dropped.
    fn with_admin_con<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut slot = self.admin_con.lock().unwrap_or_else(|p| p.into_inner());
        let con = match slot.as_mut() {
            Some(con) => con,
            None => slot.insert(self.connector.reconnect_last()?),
        };
        let result = f(con);
        if result.is_err() {
            *slot = None;
        }
        result
    }

    /// Applies an admin change to the fleet's state. While the store is
    /// unreachable: applied on this host and merged later (`open`), or
    /// refused (`closed`).
    pub fn commit(&self, change: Change<'_>) -> Value {
        let mut sync = self.lock_sync();
        match self.with_admin_con(|con| sync.commit(con, change)) {
            Ok(v) => v,
            Err(CommitError::Refused(e) | CommitError::Local(e)) => error(e),
            Err(CommitError::Store(StoreError::Conflict)) => {
                error("other hosts kept changing the fleet state; nothing was changed here, try again")
            }
            Err(CommitError::Store(e)) => match self.mode {
                StoreFailureMode::Closed => error(format!(
                    "the fleet store is unreachable ({e}) and fleet.on_store_failure = \"closed\": nothing was changed"
                )),
                StoreFailureMode::Open => match sync.commit_local(change) {
                    Ok(mut v) => {
                        v["fleet_warning"] = json!(format!(
                            "the fleet store is unreachable ({e}): applied on this host only; \
                             merged into the fleet's state when the store is back"
                        ));
                        v
                    }
                    Err(e) => error(e),
                },
            },
        }
    }

    /// Rotates the session ticket keys of the whole fleet now; returns the
    /// new generation.
    pub fn rotate_tickets(&self) -> Result<u64, String> {
        let Some(t) = &self.tickets else {
            return Err("session tickets are off (tls.session_tickets = false)".into());
        };
        let mut t = self.lock_tickets(t);
        self.with_admin_con(|con| t.rotate_now(con, unix_now())).map_err(|e| match e {
            ticket_sync::RotateError::Store(s) => {
                format!("the ticket keys are the fleet's and the store is unreachable ({s}); the keys in force stay")
            }
            other => other.to_string(),
        })
    }

    /// This host's heartbeat as it is now.
    fn heartbeat(&self) -> Heartbeat {
        let s = self.status.lock();
        Heartbeat {
            host: self.host.clone(),
            pid: std::process::id(),
            started_unix: self.started_unix,
            seen_unix: unix_now(),
            state_version: s.state_version,
            ticket_generation: s.ticket_generation,
            pending_local_changes: s.pending_local_changes,
            quic_lb_config_id: s.quic_lb_config_id,
        }
    }

    fn beat(&self, con: &mut Connection) -> Result<(), StoreError> {
        heartbeat::beat(con, &self.keyspace, &self.keys.signing, &self.heartbeat())
    }

    fn list_hosts(&self, con: &mut Connection) -> Result<(), StoreError> {
        let hosts =
            heartbeat::list(con, &self.keyspace, &self.keys.signing, &self.heartbeat(), &self.status)?;
        self.status.lock().hosts = hosts;
        Ok(())
    }

    /// `relayctl fleet status`.
    pub fn status_json(&self) -> Value {
        let mut v = serde_json::to_value(self.status.snapshot()).unwrap_or(Value::Null);
        v["store_endpoints"] = json!(self.connector.endpoints().to_string());
        v["global_quotas"] = json!(self.global_quotas);
        v["on_store_failure"] = json!(match self.mode {
            StoreFailureMode::Open => "open",
            StoreFailureMode::Closed => "closed",
        });
        v
    }

    /// The fleet lines of `relayctl status`.
    pub fn summary_json(&self) -> Value {
        let s = self.status.lock();
        json!({
            "fleet": s.fleet,
            "host": s.host,
            "store_up": s.store_up,
            "store_address": s.store_address,
            "last_error": s.last_error,
            "state_version": s.state_version,
            "pending_local_changes": s.pending_local_changes,
            "ticket_generation": s.ticket_generation,
            "hosts_seen": s.hosts.len(),
            "global_quotas": self.global_quotas,
        })
    }
}

//! Session ticket keys shared by every host of the fleet.
//!
//! The store holds the key set sealed ([`TicketKeySet::seal`]) with its
//! generation. Every host loads it at start, on an announcement and on the
//! poll, and hands a new set to the server loop, which sends it to the
//! dataplane like a local rotation; so a ticket one host issued resumes on
//! any other. When the set is due, the host that takes the rotation lease
//! (`SET NX PX`) makes the next generation: a fresh sealing key, the
//! previous one kept. The write itself is guarded by `WATCH` on the key
//! set, so even two hosts that both believe they hold the lease (a lease
//! that expired mid-rotation) cannot both make a generation.
#![forbid(unsafe_code)]

use std::time::Duration;

use redis::Connection;
use tracing::{info, warn};

use super::codec::{TicketKeySet, ValueError};
use super::connect::StoreError;
use super::keys::DerivedKey;
use super::keyspace::{Event, Keyspace};
use super::reads::{Read, read_bounded};
use super::status::StatusHandle;
use crate::tickets::fresh_key;

/// Longest sealed key set read.
const MAX_SEALED_LEN: usize = 1024;
/// How long the rotation lease lasts (a rotation takes a few round trips).
pub const LEASE: Duration = Duration::from_secs(10);
const MAX_ATTEMPTS: usize = 5;

/// Where new key sets go (the server loop, through a channel and its
/// waker).
pub type TicketSink = Box<dyn Fn(TicketKeySet) + Send>;

/// Why a rotation asked for by the operator did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// Another host holds the lease.
    #[error("host {0} is rotating the ticket keys right now; try again in a few seconds")]
    LeaseHeld(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the store holds under the ticket key.
enum Remote {
    Missing,
    Unusable,
    Valid(TicketKeySet),
}

/// The fleet's ticket keys on this host.
pub struct TicketSync {
    keyspace: Keyspace,
    sealing: DerivedKey,
    host: String,
    rotation: Duration,
    current: Option<TicketKeySet>,
    sink: TicketSink,
    status: StatusHandle,
}

impl std::fmt::Debug for TicketSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSync").field("current", &self.current).finish_non_exhaustive()
    }
}

impl TicketSync {
    /// Ticket keys rotated every `rotation`, handed to `sink`.
    pub fn new(
        keyspace: Keyspace,
        sealing: DerivedKey,
        host: &str,
        rotation: Duration,
        sink: TicketSink,
        status: StatusHandle,
    ) -> Self {
        Self { keyspace, sealing, host: host.to_string(), rotation, current: None, sink, status }
    }

    /// The generation served.
    pub fn generation(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.generation)
    }

    fn install(&mut self, set: TicketKeySet) {
        {
            let mut s = self.status.lock();
            s.ticket_generation = Some(set.generation);
            s.ticket_key_names = set.names_hex();
        }
        info!(generation = set.generation, "fleet: session ticket keys installed");
        self.current = Some(set.clone());
        (self.sink)(set);
    }

    fn read(&self, con: &mut Connection) -> Result<Remote, StoreError> {
        let key = self.keyspace.tickets();
        let raw = read_bounded(con, &key, MAX_SEALED_LEN)?.into_value();
        Ok(match raw {
            None => Remote::Missing,
            Some(bytes) => match bytes.and_then(|b| TicketKeySet::open(&self.sealing, &key, &b)) {
                Ok(set) => Remote::Valid(set),
                Err(e) => {
                    self.status.rejected(&key, &e);
                    Remote::Unusable
                }
            },
        })
    }

    /// Writes `set` under the `WATCH` already set; false when another host
    /// wrote first.
    fn write(&self, con: &mut Connection, set: &TicketKeySet) -> Result<bool, StoreError> {
        let key = self.keyspace.tickets();
        let sealed = set.seal(&self.sealing, &key)?;
        let done: Option<redis::Value> = redis::pipe()
            .atomic()
            .set(&key, sealed)
            .set(self.keyspace.tickets_generation(), set.generation)
            .publish(self.keyspace.events(), Event::Tickets(set.generation).encode())
            .query(con)?;
        Ok(done.is_some())
    }

    fn load_once(&mut self, con: &mut Connection, now_unix: u64) -> Result<bool, StoreError> {
        redis::cmd("WATCH").arg(self.keyspace.tickets()).exec(con)?;
        let current_gen = self.generation();
        let to_write = match self.read(con)? {
            Remote::Valid(set) if current_gen.is_none_or(|g| set.generation >= g) => {
                redis::cmd("UNWATCH").exec(con)?;
                if self.current.as_ref() != Some(&set) {
                    self.install(set);
                }
                return Ok(true);
            }
            Remote::Valid(set) => {
                self.status.rejected(
                    &self.keyspace.tickets(),
                    &ValueError::Invalid(format!(
                        "ticket key generation {} is older than the {} this host serves (rolled back?)",
                        set.generation,
                        current_gen.unwrap_or(0)
                    )),
                );
                self.current.clone()
            }
            Remote::Missing | Remote::Unusable => self.current.clone(),
        };
        // Restore what this host serves, or make the fleet's first set.
        let set = match to_write {
            Some(set) => set,
            None => TicketKeySet {
                generation: 1,
                rotated_unix: now_unix,
                keys: vec![fresh_key().map_err(|e| ValueError::Crypto(e.to_string()))?],
            },
        };
        if !self.write(con, &set)? {
            return Ok(false);
        }
        info!(generation = set.generation, "fleet: wrote the session ticket keys");
        if self.current.as_ref() != Some(&set) {
            self.install(set);
        }
        Ok(true)
    }

    /// Loads the fleet's keys, installing a newer set; restores the store's
    /// key (or makes the first set) when it is missing, unusable or older
    /// than what this host serves.
    pub fn load(&mut self, con: &mut Connection, now_unix: u64) -> Result<(), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            if self.load_once(con, now_unix)? {
                return Ok(());
            }
        }
        Err(StoreError::Conflict)
    }

    /// Whether the set in force is due for rotation at `now_unix`.
    pub fn due(&self, now_unix: u64) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| now_unix >= c.rotated_unix.saturating_add(self.rotation.as_secs()))
    }

    /// Rotates when due and this host gets the lease; returns the new
    /// generation.
    pub fn rotate_if_due(&mut self, con: &mut Connection, now_unix: u64) -> Result<Option<u64>, StoreError> {
        if !self.due(now_unix) {
            return Ok(None);
        }
        match self.rotate(con, now_unix) {
            Ok(g) => Ok(g),
            Err(RotateError::LeaseHeld(_)) => Ok(None),
            Err(RotateError::Store(e)) => Err(e),
        }
    }

    /// Rotates now (`relayctl tickets rotate`): the next generation for
    /// every host.
    pub fn rotate_now(&mut self, con: &mut Connection, now_unix: u64) -> Result<u64, RotateError> {
        self.load(con, now_unix)?;
        self.rotate(con, now_unix)?.ok_or(RotateError::Store(StoreError::Conflict))
    }

    fn rotate(&mut self, con: &mut Connection, now_unix: u64) -> Result<Option<u64>, RotateError> {
        let lease = self.keyspace.tickets_lease();
        let took: Option<String> = redis::cmd("SET")
            .arg(&lease)
            .arg(&self.host)
            .arg("NX")
            .arg("PX")
            .arg(LEASE.as_millis() as u64)
            .query(con)
            .map_err(StoreError::from)?;
        if took.is_none() {
            let holder = match read_bounded(con, &lease, 64)? {
                Read::Value(v) => String::from_utf8(v).ok().filter(|h| crate::config::valid_fleet_word(h)),
                _ => None,
            };
            let ttl_ms: i64 = redis::cmd("PTTL").arg(&lease).query(con).map_err(StoreError::from)?;
            if holder.is_none() || ttl_ms == -1 {
                // Not a lease any host takes (no expiry, or not a host
                // name): it would stop rotations for good. Removed; the
                // next turn takes the lease.
                self.status.rejected(&lease, &ValueError::Invalid("not a rotation lease".into()));
                let _: i64 = redis::cmd("DEL").arg(&lease).query(con).map_err(StoreError::from)?;
            }
            return Err(RotateError::LeaseHeld(holder.unwrap_or_else(|| "?".into())));
        }
        let result = self.rotate_holding_lease(con, now_unix);
        if let Err(e) = self.release(con) {
            warn!("fleet: releasing the ticket rotation lease: {e} (it expires by itself)");
        }
        result.map_err(RotateError::from)
    }

    fn rotate_holding_lease(
        &mut self,
        con: &mut Connection,
        now_unix: u64,
    ) -> Result<Option<u64>, StoreError> {
        redis::cmd("WATCH").arg(self.keyspace.tickets()).exec(con)?;
        let current = match self.read(con)? {
            Remote::Valid(set) if Some(set.generation) == self.generation() => set,
            _ => {
                // Someone else rotated, or the key needs restoring: load
                // first; the next turn rotates if still due.
                redis::cmd("UNWATCH").exec(con)?;
                self.load(con, now_unix)?;
                return Ok(None);
            }
        };
        let fresh = fresh_key().map_err(|e| ValueError::Crypto(e.to_string()))?;
        let mut keys = vec![fresh];
        keys.extend(current.keys.first().cloned());
        let next = TicketKeySet { generation: current.generation + 1, rotated_unix: now_unix, keys };
        if !self.write(con, &next)? {
            self.load(con, now_unix)?;
            return Ok(None);
        }
        let generation = next.generation;
        info!(generation, "fleet: rotated the session ticket keys for the fleet");
        self.install(next);
        Ok(Some(generation))
    }

    /// Drops the lease if this host still holds it.
    fn release(&self, con: &mut Connection) -> Result<(), StoreError> {
        let lease = self.keyspace.tickets_lease();
        redis::cmd("WATCH").arg(&lease).exec(con)?;
        let holder = read_bounded(con, &lease, 64)?;
        if holder == Read::Value(self.host.clone().into_bytes()) {
            let _: Option<redis::Value> = redis::pipe().atomic().del(&lease).query(con)?;
        } else {
            redis::cmd("UNWATCH").exec(con)?;
        }
        Ok(())
    }
}

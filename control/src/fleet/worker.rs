//! The fleet thread: keeps a connection to the store (reconnecting with
//! capped exponential backoff), listens for announcements, and every
//! second polls the version keys (the safety net for a lost
//! announcement), renews this host's heartbeat and rotates the ticket keys
//! when due. Nothing here runs on the control event loop: the policy is
//! installed under its lock and ticket keys reach the server loop through
//! its channel.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Connection;
use tracing::{debug, info, warn};

use super::Fleet;
use super::connect::StoreError;
use super::keyspace::Event;
use super::quota_share;
use super::reads::{is_wrong_type, read_number};
use super::status::unix_now;

/// How long one wait for an announcement lasts (also the granularity of
/// the quota exchange).
const EVENT_WAIT: Duration = Duration::from_millis(50);
/// How often the version keys are polled and the heartbeat renewed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the hosts are listed.
const HOSTS_INTERVAL: Duration = Duration::from_secs(2);
/// First reconnection delay; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnection delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Capped exponential backoff.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST_BACKOFF }
    }
}

impl Backoff {
    /// The delay to wait now; the following one doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

/// Runs the fleet thread until the fleet is stopped.
pub fn spawn(fleet: Arc<Fleet>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("fleet".into()).spawn(move || run(&fleet))
}

fn sleep_unless_stopped(fleet: &Fleet, d: Duration) {
    let until = Instant::now() + d;
    while !fleet.stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
    }
}

fn run(fleet: &Fleet) {
    let mut backoff = Backoff::default();
    let mut last_logged: Option<String> = None;
    while !fleet.stop.load(Ordering::Relaxed) {
        let connected = fleet.connector.connect().and_then(|(cmd, addr)| {
            let (sub, _) = fleet.connector.connect()?;
            Ok((cmd, sub, addr))
        });
        let error = match connected {
            Ok((mut cmd, mut sub, addr)) => {
                info!(store = addr, "fleet: connected to the store");
                fleet.set_store_up(true, Some(addr));
                last_logged = None;
                backoff.reset();
                match run_connected(fleet, &mut cmd, &mut sub) {
                    Ok(()) => return,
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        fleet.set_store_up(false, None);
        fleet.status.store_error(&error);
        if last_logged.as_deref() != Some(error.as_str()) {
            warn!("fleet: {error}; serving the last state, reconnecting");
            last_logged = Some(error);
        } else {
            debug!("fleet: still unreachable: {error}");
        }
        sleep_unless_stopped(fleet, backoff.next_delay());
    }
}

/// Everything a turn may need to read again.
fn sync_all(fleet: &Fleet, cmd: &mut Connection) -> Result<(), StoreError> {
    fleet.lock_sync().reconcile(cmd)?;
    if let Some(t) = &fleet.tickets {
        fleet.lock_tickets(t).load(cmd, unix_now())?;
    }
    Ok(())
}

fn run_connected(fleet: &Fleet, cmd: &mut Connection, sub: &mut Connection) -> Result<(), StoreError> {
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(fleet.keyspace.events())?;
    pubsub.set_read_timeout(Some(EVENT_WAIT))?;
    // A snapshot on every (re)connect: whatever was announced while this
    // host was away.
    sync_all(fleet, cmd)?;
    fleet.beat(cmd)?;
    fleet.list_hosts(cmd)?;
    let mut last_poll = Instant::now();
    let mut last_hosts = Instant::now();
    let mut last_quotas = Instant::now();
    while !fleet.stop.load(Ordering::Relaxed) {
        match pubsub.get_message() {
            Ok(msg) => match Event::parse(msg.get_payload_bytes()) {
                Some(Event::State(v)) => {
                    let mut sync = fleet.lock_sync();
                    if v != sync.version() || sync.dirty() {
                        sync.reconcile(cmd)?;
                    }
                }
                Some(Event::Tickets(g)) => {
                    if let Some(t) = &fleet.tickets {
                        let mut t = fleet.lock_tickets(t);
                        if Some(g) != t.generation() {
                            t.load(cmd, unix_now())?;
                        }
                    }
                }
                None => sync_all(fleet, cmd)?,
            },
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e.into()),
        }
        if last_poll.elapsed() >= POLL_INTERVAL {
            last_poll = Instant::now();
            poll(fleet, cmd)?;
            fleet.beat(cmd)?;
        }
        if fleet.global_quotas && last_quotas.elapsed() >= quota_share::INTERVAL {
            last_quotas = Instant::now();
            match quota_share::exchange(fleet, cmd) {
                Ok(()) => {}
                // A quota key another writer turned into something else:
                // refused, counted; the connection is fine.
                Err(StoreError::Redis(e)) if is_wrong_type(&e) => fleet.status.rejected(
                    "quota counters",
                    &super::codec::ValueError::Format("hash (a quota key has another type)"),
                ),
                Err(e) => return Err(e),
            }
        }
        if last_hosts.elapsed() >= HOSTS_INTERVAL {
            last_hosts = Instant::now();
            fleet.list_hosts(cmd)?;
        }
    }
    Ok(())
}

/// The safety net: reads both version hints and catches up on whatever an
/// announcement did not bring; pushes local changes; rotates when due.
fn poll(fleet: &Fleet, cmd: &mut Connection) -> Result<(), StoreError> {
    let state_v = read_number(cmd, &fleet.keyspace.state_version())?;
    let tickets_g = read_number(cmd, &fleet.keyspace.tickets_generation())?;
    {
        let mut sync = fleet.lock_sync();
        if state_v != Some(sync.version()) || sync.dirty() {
            sync.reconcile(cmd)?;
        }
    }
    if let Some(t) = &fleet.tickets {
        let mut t = fleet.lock_tickets(t);
        let now = unix_now();
        if tickets_g != t.generation() {
            t.load(cmd, now)?;
        }
        t.rotate_if_due(cmd, now)?;
    }
    fleet.status.lock().last_sync_unix = Some(unix_now());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), FIRST_BACKOFF);
    }
}

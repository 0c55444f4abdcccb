//! Session ticket keys: generated here, rotated on a schedule, sent to the
//! dataplane.
//!
//! Every worker seals and opens TLS 1.3 session tickets with the same keys
//! (so a client resumes whichever worker its new connection reaches, and
//! across dataplane restarts). The newest key seals; the previous one is
//! still accepted for one more period so a ticket issued just before a
//! rotation resumes, and the dataplane renews it under the newest key.
//! Keys live only in memory (a restarted control starts with fresh keys and
//! clients fall back to a full handshake once), which keeps the forward
//! secrecy of resumed sessions bounded by two rotation periods.
//!
//! In fleet mode the keys are the fleet's ([`crate::fleet`]): one host at a
//! time rotates them for every host, and this schedule stands aside
//! ([`TicketKeys::follow_fleet`]); each new set is installed as it comes.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use relay_proto::channel::bootstrap::{MAX_TICKET_KEYS, TicketKey};

/// Keys kept: the sealing key and the previous one.
pub const KEYS_KEPT: usize = 2;
const _: () = assert!(KEYS_KEPT <= MAX_TICKET_KEYS);

/// The ticket keys and their schedule.
pub struct TicketKeys {
    keys: Vec<TicketKey>,
    rotation: Duration,
    rotated_at: Instant,
    rotations: u64,
    /// The fleet rotates the keys; the local schedule is off.
    fleet: bool,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only (they are public); never the keys.
        f.debug_struct("TicketKeys")
            .field("names", &self.keys.iter().map(|k| k.name).collect::<Vec<_>>())
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

/// A fresh random key. BoringSSL's RAND_bytes aborts the process rather
/// than return weak randomness, so it does not fail in practice.
pub fn fresh_key() -> Result<TicketKey, boring::error::ErrorStack> {
    let mut key = TicketKey { name: [0; 16], aes_key: [0; 32], hmac_key: [0; 32] };
    boring::rand::rand_bytes(&mut key.name)?;
    boring::rand::rand_bytes(&mut key.aes_key)?;
    boring::rand::rand_bytes(&mut key.hmac_key)?;
    Ok(key)
}

impl TicketKeys {
    /// One fresh key, rotated every `rotation`.
    pub fn new(rotation: Duration, now: Instant) -> Result<Self, boring::error::ErrorStack> {
        Ok(Self { keys: vec![fresh_key()?], rotation, rotated_at: now, rotations: 0, fleet: false })
    }

    /// The keys, newest (sealing) first.
    pub fn keys(&self) -> &[TicketKey] {
        &self.keys
    }

    /// How long a ticket stays acceptable at least: one rotation period
    /// (the lifetime hint clients get).
    pub fn ticket_lifetime(&self) -> Duration {
        self.rotation
    }

    /// Rotations done since start.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Whether the schedule says to rotate (never when the fleet rotates).
    pub fn due(&self, now: Instant) -> bool {
        !self.fleet && now.saturating_duration_since(self.rotated_at) >= self.rotation
    }

    /// When the next rotation is due (`None` when the fleet rotates).
    pub fn next_rotation(&self) -> Option<Instant> {
        (!self.fleet).then(|| self.rotated_at + self.rotation)
    }

    /// Hands the schedule to the fleet: from now on keys change only
    /// through [`TicketKeys::install`].
    pub fn follow_fleet(&mut self) {
        self.fleet = true;
    }

    /// Installs the fleet's keys (newest first; at most [`KEYS_KEPT`] are
    /// kept), counted as a rotation.
    pub fn install(&mut self, mut keys: Vec<TicketKey>, now: Instant) {
        if keys.is_empty() {
            return;
        }
        keys.truncate(KEYS_KEPT);
        self.keys = keys;
        self.rotated_at = now;
        self.rotations += 1;
    }

    /// A new sealing key; the oldest beyond [`KEYS_KEPT`] is dropped.
    pub fn rotate(&mut self, now: Instant) -> Result<(), boring::error::ErrorStack> {
        let key = fresh_key()?;
        self.keys.insert(0, key);
        self.keys.truncate(KEYS_KEPT);
        self.rotated_at = now;
        self.rotations += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_previous_key_only() {
        let t0 = Instant::now();
        let mut keys = TicketKeys::new(Duration::from_secs(60), t0).unwrap();
        let first = keys.keys()[0].clone();
        assert!(!keys.due(t0 + Duration::from_secs(59)));
        assert!(keys.due(t0 + Duration::from_secs(60)));
        keys.rotate(t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(keys.keys().len(), 2);
        assert_eq!(keys.keys()[1], first, "the previous key is still accepted");
        assert_ne!(keys.keys()[0].name, first.name);
        assert_ne!(keys.keys()[0].aes_key, first.aes_key);
        assert!(!keys.due(t0 + Duration::from_secs(61)));
        keys.rotate(t0 + Duration::from_secs(120)).unwrap();
        assert_eq!(keys.keys().len(), KEYS_KEPT);
        assert!(keys.keys().iter().all(|k| k.name != first.name), "the oldest key is gone");
        assert_eq!(keys.rotations(), 2);
        assert!(!format!("{keys:?}").contains(&format!("{:?}", first.aes_key)));
    }

    #[test]
    fn fleet_keys_replace_the_schedule() {
        let t0 = Instant::now();
        let mut keys = TicketKeys::new(Duration::from_secs(60), t0).unwrap();
        keys.follow_fleet();
        assert!(!keys.due(t0 + Duration::from_secs(3600)));
        assert_eq!(keys.next_rotation(), None);
        let set = vec![fresh_key().unwrap(), fresh_key().unwrap(), fresh_key().unwrap()];
        keys.install(set.clone(), t0);
        assert_eq!(keys.keys(), &set[..KEYS_KEPT]);
        keys.install(Vec::new(), t0);
        assert_eq!(keys.keys().len(), KEYS_KEPT, "an empty set changes nothing");
        assert_eq!(keys.rotations(), 1);
    }
}

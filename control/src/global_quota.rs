//! Fleet-wide per-identity quotas: this host's side of the accounting
//! (sans-IO: the caller passes the time; the fleet thread carries reports
//! to the store and other hosts' usage back, [`crate::fleet::quota_share`]).
//!
//! With `fleet.global_quotas = true` an identity's `per_identity` limits
//! hold for the whole fleet rather than for each host:
//!
//! * `max_flows`: this host's open flows plus the other hosts' (as last
//!   read) must stay under the limit;
//! * `new_flows_per_sec` with `burst`: the flows this host admitted in the
//!   last second (ten 100 ms slots) plus the other hosts' in the last
//!   second (their current and previous whole second, the previous one
//!   weighted by how much of it the last second still covers) must stay
//!   under the burst (default: the rate); each host's own token bucket
//!   still applies;
//! * `bytes_per_period`: periods are aligned to the Unix epoch (so every
//!   host means the same window); this host's bytes in the period plus the
//!   other hosts' must stay under the limit, and a new flow's budget is
//!   what is left.
//!
//! A CONNECT never waits for the store: admission uses what the fleet
//! thread last read (every [`crate::fleet::quota_share::INTERVAL`]), so a
//! burst spread over N hosts can overshoot a limit by what the other hosts
//! admit within one exchange (see docs/ARCHITECTURE.md for the bound).
//! `per_client` limits stay per host (a client address reaches one host
//! through a load balancer).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::quota::{Exceeded, QuotaLimits, Scope};

/// Width of one slot of the local sliding second.
pub const SLOT: Duration = Duration::from_millis(100);
const SLOTS: u64 = 10;
/// Most identities accounted (beyond it new identities are accounted per
/// host only).
pub const MAX_TRACKED: usize = 100_000;

/// Maps the monotonic clock to Unix milliseconds (periods and seconds in
/// the store are wall-clock aligned).
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_ms: u64,
}

impl WallClock {
    /// `at` corresponds to `unix_ms`.
    pub fn new(at: Instant, unix_ms: u64) -> Self {
        Self { at, unix_ms }
    }

    /// The clock as it is now.
    pub fn now() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self { at: Instant::now(), unix_ms }
    }

    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        self.unix_ms.saturating_add(now.saturating_duration_since(self.at).as_millis() as u64)
    }
}

/// An identity's usage on the other hosts, as last read from the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteUsage {
    /// Flows open on live hosts.
    pub flows: u64,
    /// New flows in the last second (current second plus the weighted
    /// previous one, computed by the reader).
    pub recent_new_flows: u64,
    /// Bytes in the current period.
    pub bytes: u64,
}

/// What this host has to tell the store about one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityReport {
    /// The identity (`sub:alice`, `tok:<fingerprint>`).
    pub identity: String,
    /// Flows open here now, when it changed or is due for a refresh.
    pub flows: Option<u32>,
    /// New flows admitted, by Unix second.
    pub new_flows: BTreeMap<u64, u32>,
    /// Bytes charged, by period index (Unix seconds / period).
    pub bytes: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone)]
struct Local {
    flows: u32,
    reported_flows: Option<u32>,
    reported_at: Option<Instant>,
    /// Admissions per slot; `slots[i]` counts slot number `newest - i`.
    slots: [u32; SLOTS as usize],
    newest_slot: u64,
    period: u64,
    period_bytes: u64,
    pending_new: BTreeMap<u64, u32>,
    pending_bytes: BTreeMap<u64, u64>,
    last_active: Instant,
}

impl Local {
    fn new(now: Instant) -> Self {
        Self {
            flows: 0,
            reported_flows: None,
            reported_at: None,
            slots: [0; SLOTS as usize],
            newest_slot: 0,
            period: 0,
            period_bytes: 0,
            pending_new: BTreeMap::new(),
            pending_bytes: BTreeMap::new(),
            last_active: now,
        }
    }

    /// Shifts the slots so that `slot` is the newest.
    fn roll(&mut self, slot: u64) {
        if slot <= self.newest_slot {
            return;
        }
        let shift = slot - self.newest_slot;
        if shift >= SLOTS {
            self.slots = [0; SLOTS as usize];
        } else {
            self.slots.rotate_right(shift as usize);
            self.slots[..shift as usize].fill(0);
        }
        self.newest_slot = slot;
    }

    fn recent(&self, slot: u64) -> u64 {
        if slot >= self.newest_slot + SLOTS {
            return 0;
        }
        let skip = slot.saturating_sub(self.newest_slot) as usize;
        self.slots[..(SLOTS as usize - skip)].iter().map(|n| u64::from(*n)).sum()
    }

    fn bytes_in(&self, period: u64) -> u64 {
        if self.period == period { self.period_bytes } else { 0 }
    }
}

/// This host's accounting of fleet-wide identity quotas.
#[derive(Debug)]
pub struct GlobalUsage {
    clock: WallClock,
    local: HashMap<String, Local>,
    remote: HashMap<String, RemoteUsage>,
    /// The store is down and `on_store_failure = "closed"`: limited
    /// identities are refused.
    refuse_unshared: bool,
    max_tracked: usize,
}

impl GlobalUsage {
    /// Accounting on `clock`.
    pub fn new(clock: WallClock, max_tracked: usize) -> Self {
        Self { clock, local: HashMap::new(), remote: HashMap::new(), refuse_unshared: false, max_tracked }
    }

    fn slot(&self, now: Instant) -> u64 {
        self.clock.unix_ms(now) / SLOT.as_millis() as u64
    }

    /// The period index (Unix seconds / `period_secs`) at `now`.
    pub fn period(&self, period_secs: u32, now: Instant) -> u64 {
        (self.clock.unix_ms(now) / 1000) / u64::from(period_secs.max(1))
    }

    /// Unix seconds at `now`.
    pub fn unix_secs(&self, now: Instant) -> u64 {
        self.clock.unix_ms(now) / 1000
    }

    /// Milliseconds into the current Unix second at `now`.
    pub fn millis_into_second(&self, now: Instant) -> u64 {
        self.clock.unix_ms(now) % 1000
    }

    /// Limited identities are refused while set (closed mode, store down).
    pub fn set_refuse_unshared(&mut self, refuse: bool) {
        self.refuse_unshared = refuse;
    }

    /// Whether limited identities are refused now.
    pub fn refuses_unshared(&self) -> bool {
        self.refuse_unshared
    }

    /// Installs the other hosts' usage of `identity`.
    pub fn set_remote(&mut self, identity: &str, usage: RemoteUsage) {
        if usage == RemoteUsage::default() {
            self.remote.remove(identity);
        } else if self.remote.contains_key(identity) || self.remote.len() < self.max_tracked {
            self.remote.insert(identity.to_string(), usage);
        }
    }

    /// Forgets every other host's usage (the store is gone: local limits
    /// only until it is back).
    pub fn clear_remote(&mut self) {
        self.remote.clear();
    }

    /// The other hosts' usage of `identity`, as last read.
    pub fn remote(&self, identity: &str) -> RemoteUsage {
        self.remote.get(identity).copied().unwrap_or_default()
    }

    fn used_bytes(&self, identity: &str, limits: &QuotaLimits, now: Instant) -> u64 {
        let period = self.period(limits.period_secs, now);
        let local = self.local.get(identity).map_or(0, |l| l.bytes_in(period));
        local.saturating_add(self.remote(identity).bytes)
    }

    /// Whether the fleet-wide limits admit one more flow of `identity`.
    pub fn check(&self, identity: &str, limits: &QuotaLimits, now: Instant) -> Result<(), Exceeded> {
        let limited = limits.max_flows > 0 || limits.new_flows_per_sec > 0 || limits.bytes_per_period > 0;
        if !limited {
            return Ok(());
        }
        if self.refuse_unshared {
            return Err(Exceeded::FleetStoreDown);
        }
        let remote = self.remote(identity);
        let local = self.local.get(identity);
        if limits.max_flows > 0 {
            let open = u64::from(local.map_or(0, |l| l.flows)).saturating_add(remote.flows);
            if open >= u64::from(limits.max_flows) {
                return Err(Exceeded::Flows(Scope::Identity));
            }
        }
        if limits.new_flows_per_sec > 0 {
            let capacity = u64::from(if limits.burst > 0 { limits.burst } else { limits.new_flows_per_sec });
            let recent =
                local.map_or(0, |l| l.recent(self.slot(now))).saturating_add(remote.recent_new_flows);
            if recent >= capacity {
                return Err(Exceeded::Rate(Scope::Identity));
            }
        }
        if limits.bytes_per_period > 0 && self.used_bytes(identity, limits, now) >= limits.bytes_per_period {
            return Err(Exceeded::Bytes(Scope::Identity));
        }
        Ok(())
    }

    /// What is left of `identity`'s fleet-wide byte allowance (`None`: no
    /// byte limit).
    pub fn remaining_bytes(&self, identity: &str, limits: &QuotaLimits, now: Instant) -> Option<u64> {
        (limits.bytes_per_period > 0)
            .then(|| limits.bytes_per_period.saturating_sub(self.used_bytes(identity, limits, now)))
    }

    /// How long until a refusal by `which` may lift by time alone.
    pub fn retry_after(&self, which: Exceeded, limits: &QuotaLimits, now: Instant) -> Option<Duration> {
        match which {
            Exceeded::Rate(Scope::Identity) => Some(Duration::from_secs(1)),
            Exceeded::Bytes(Scope::Identity) if limits.period_secs > 0 => {
                let period_ms = u64::from(limits.period_secs) * 1000;
                let into = self.clock.unix_ms(now) % period_ms;
                Some(Duration::from_millis(period_ms - into))
            }
            _ => None,
        }
    }

    fn entry(&mut self, identity: &str, now: Instant) -> Option<&mut Local> {
        if !self.local.contains_key(identity) {
            if self.local.len() >= self.max_tracked {
                return None;
            }
            self.local.insert(identity.to_string(), Local::new(now));
        }
        let l = self.local.get_mut(identity)?;
        l.last_active = now;
        Some(l)
    }

    /// A flow of `identity` was admitted here.
    pub fn admitted(&mut self, identity: &str, now: Instant) {
        let (slot, sec) = (self.slot(now), self.unix_secs(now));
        if let Some(l) = self.entry(identity, now) {
            l.flows = l.flows.saturating_add(1);
            l.roll(slot);
            l.slots[0] = l.slots[0].saturating_add(1);
            *l.pending_new.entry(sec).or_default() += 1;
        }
    }

    /// A flow of `identity` open here was reported by a re-attached
    /// dataplane.
    pub fn reopened(&mut self, identity: &str, now: Instant) {
        if let Some(l) = self.entry(identity, now) {
            l.flows = l.flows.saturating_add(1);
        }
    }

    /// A flow of `identity` ended after carrying `bytes`.
    pub fn closed(&mut self, identity: &str, bytes: u64, limits: &QuotaLimits, now: Instant) {
        let period = self.period(limits.period_secs, now);
        let charge = limits.bytes_per_period > 0 && bytes > 0;
        if let Some(l) = self.entry(identity, now) {
            l.flows = l.flows.saturating_sub(1);
            if charge {
                if l.period != period {
                    l.period = period;
                    l.period_bytes = 0;
                }
                l.period_bytes = l.period_bytes.saturating_add(bytes);
                *l.pending_bytes.entry(period).or_default() += bytes;
            }
        }
    }

    /// Every flow here is gone (the dataplane went away with them).
    pub fn release_all(&mut self) {
        for l in self.local.values_mut() {
            l.flows = 0;
        }
    }

    /// The identities whose other hosts' usage matters here: those with
    /// local activity.
    pub fn active(&self) -> Vec<String> {
        self.local.keys().cloned().collect()
    }

    /// What to write to the store: open-flow counts that changed (or are
    /// `refresh` old and non-zero), new flows and bytes since the last
    /// report. Identities idle for `idle` with nothing to report are
    /// forgotten.
    pub fn take_reports(&mut self, now: Instant, refresh: Duration, idle: Duration) -> Vec<IdentityReport> {
        let mut out = Vec::new();
        for (id, l) in self.local.iter_mut() {
            let stale = l.reported_at.is_none_or(|at| now.saturating_duration_since(at) >= refresh);
            let flows = (l.reported_flows != Some(l.flows) || (stale && l.flows > 0)).then_some(l.flows);
            if flows.is_none() && l.pending_new.is_empty() && l.pending_bytes.is_empty() {
                continue;
            }
            if flows.is_some() {
                l.reported_flows = flows;
                l.reported_at = Some(now);
            }
            out.push(IdentityReport {
                identity: id.clone(),
                flows,
                new_flows: std::mem::take(&mut l.pending_new),
                bytes: std::mem::take(&mut l.pending_bytes),
            });
        }
        self.local.retain(|id, l| {
            let keep = l.flows > 0
                || l.reported_flows.is_some_and(|f| f > 0)
                || now.saturating_duration_since(l.last_active) < idle;
            if !keep {
                self.remote.remove(id);
            }
            keep
        });
        out
    }

    /// Puts reports that could not be written back, to go with the next.
    pub fn requeue(&mut self, reports: Vec<IdentityReport>, now: Instant) {
        for r in reports {
            let Some(l) = self.entry(&r.identity, now) else { continue };
            if r.flows.is_some() {
                l.reported_flows = None;
            }
            for (sec, n) in r.new_flows {
                *l.pending_new.entry(sec).or_default() += n;
            }
            for (period, b) in r.bytes {
                *l.pending_bytes.entry(period).or_default() += b;
            }
        }
    }

    /// This host's open flows of `identity`.
    pub fn local_flows(&self, identity: &str) -> u32 {
        self.local.get(identity).map_or(0, |l| l.flows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIX_MS: u64 = 1_700_000_000_000;

    fn setup() -> (GlobalUsage, Instant) {
        let t0 = Instant::now();
        (GlobalUsage::new(WallClock::new(t0, UNIX_MS), 100), t0)
    }

    fn limits(max_flows: u32, rate: u32, burst: u32, bytes: u64, period: u32) -> QuotaLimits {
        QuotaLimits {
            max_flows,
            new_flows_per_sec: rate,
            burst,
            bytes_per_period: bytes,
            period_secs: period,
        }
    }

    #[test]
    fn flows_count_here_and_elsewhere() {
        let (mut g, t0) = setup();
        let l = limits(3, 0, 0, 0, 0);
        g.admitted("sub:a", t0);
        assert_eq!(g.check("sub:a", &l, t0), Ok(()));
        g.set_remote("sub:a", RemoteUsage { flows: 2, ..Default::default() });
        assert_eq!(g.check("sub:a", &l, t0), Err(Exceeded::Flows(Scope::Identity)));
        assert_eq!(g.check("sub:b", &l, t0), Ok(()), "other identities are not affected");
        g.closed("sub:a", 0, &l, t0);
        assert_eq!(g.check("sub:a", &l, t0), Ok(()));
        assert_eq!(g.check("sub:a", &QuotaLimits::default(), t0), Ok(()), "unlimited");
    }

    #[test]
    fn new_flows_over_the_last_second() {
        let (mut g, t0) = setup();
        let l = limits(0, 5, 0, 0, 0);
        for i in 0..3 {
            g.admitted("sub:a", t0 + SLOT * i);
        }
        g.set_remote("sub:a", RemoteUsage { recent_new_flows: 2, ..Default::default() });
        assert_eq!(g.check("sub:a", &l, t0 + SLOT * 3), Err(Exceeded::Rate(Scope::Identity)));
        // One second after the first admission it has left the window.
        assert_eq!(g.check("sub:a", &l, t0 + SLOT * 10), Ok(()));
        assert_eq!(g.check("sub:a", &l, t0 + Duration::from_secs(5)), Ok(()));
        // A burst above the rate counts against the burst.
        let b = limits(0, 5, 8, 0, 0);
        assert_eq!(g.check("sub:a", &b, t0 + SLOT * 3), Ok(()));
        assert_eq!(g.retry_after(Exceeded::Rate(Scope::Identity), &l, t0), Some(Duration::from_secs(1)));
    }

    #[test]
    fn bytes_in_epoch_aligned_periods() {
        let (mut g, t0) = setup();
        let l = limits(0, 0, 0, 1000, 60);
        g.admitted("sub:a", t0);
        g.closed("sub:a", 400, &l, t0);
        g.set_remote("sub:a", RemoteUsage { bytes: 500, ..Default::default() });
        assert_eq!(g.remaining_bytes("sub:a", &l, t0), Some(100));
        g.set_remote("sub:a", RemoteUsage { bytes: 600, ..Default::default() });
        assert_eq!(g.check("sub:a", &l, t0), Err(Exceeded::Bytes(Scope::Identity)));
        // 1_700_000_000 s is 20 s into a 60 s period: it ends in 40 s.
        assert_eq!(g.retry_after(Exceeded::Bytes(Scope::Identity), &l, t0), Some(Duration::from_secs(40)));
        // The next period starts afresh here (the reader resets the remote).
        g.set_remote("sub:a", RemoteUsage::default());
        assert_eq!(g.remaining_bytes("sub:a", &l, t0 + Duration::from_secs(40)), Some(1000));
        assert_eq!(g.remaining_bytes("sub:a", &limits(0, 0, 0, 0, 0), t0), None);
    }

    #[test]
    fn reports_carry_changes_once_and_can_be_requeued() {
        let (mut g, t0) = setup();
        let l = limits(9, 9, 0, 1000, 60);
        g.admitted("sub:a", t0);
        g.admitted("sub:a", t0 + SLOT * 11);
        g.closed("sub:a", 70, &l, t0 + SLOT * 11);
        let refresh = Duration::from_secs(30);
        let idle = Duration::from_secs(120);
        let r = g.take_reports(t0 + SLOT * 12, refresh, idle);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].flows, Some(1));
        assert_eq!(r[0].new_flows.values().sum::<u32>(), 2);
        assert_eq!(r[0].new_flows.len(), 2, "two Unix seconds");
        assert_eq!(r[0].bytes.values().sum::<u64>(), 70);
        assert!(g.take_reports(t0 + SLOT * 13, refresh, idle).is_empty(), "nothing new");
        // A failed write is put back and goes with the next report.
        g.requeue(r, t0 + SLOT * 13);
        let again = g.take_reports(t0 + SLOT * 14, refresh, idle);
        assert_eq!((again[0].flows, again[0].bytes.values().sum::<u64>()), (Some(1), 70));
        // Open flows are re-reported when stale (the store key expires).
        let stale = g.take_reports(t0 + refresh + SLOT * 15, refresh, idle);
        assert_eq!(stale[0].flows, Some(1));
        // Closing the last flow reports 0 once; then the identity is forgotten.
        g.closed("sub:a", 0, &l, t0 + SLOT * 16);
        assert_eq!(g.take_reports(t0 + SLOT * 17, refresh, idle)[0].flows, Some(0));
        assert!(g.take_reports(t0 + idle + SLOT * 17, refresh, idle).is_empty());
        assert!(g.active().is_empty());
    }

    #[test]
    fn closed_mode_refuses_limited_identities_while_the_store_is_down() {
        let (mut g, t0) = setup();
        g.set_refuse_unshared(true);
        assert_eq!(g.check("sub:a", &limits(5, 0, 0, 0, 0), t0), Err(Exceeded::FleetStoreDown));
        assert_eq!(g.check("sub:a", &QuotaLimits::default(), t0), Ok(()), "no limit, nothing to share");
        g.set_refuse_unshared(false);
        assert_eq!(g.check("sub:a", &limits(5, 0, 0, 0, 0), t0), Ok(()));
        g.set_remote("sub:a", RemoteUsage { flows: 5, ..Default::default() });
        g.clear_remote();
        assert_eq!(g.check("sub:a", &limits(5, 0, 0, 0, 0), t0), Ok(()), "store gone: local limits only");
    }

    #[test]
    fn tracking_is_bounded() {
        let t0 = Instant::now();
        let mut g = GlobalUsage::new(WallClock::new(t0, UNIX_MS), 2);
        for id in ["sub:a", "sub:b", "sub:c"] {
            g.admitted(id, t0);
            g.set_remote(id, RemoteUsage { flows: 1, ..Default::default() });
        }
        assert_eq!(g.active().len(), 2);
        assert_eq!(g.remote("sub:c"), RemoteUsage::default());
        assert_eq!(g.check("sub:c", &limits(1, 0, 0, 0, 0), t0), Ok(()), "untracked: per host only");
    }
}

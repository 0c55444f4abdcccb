//! Quotas per identity and per client address (sans-IO: the caller passes
//! `now`).
//!
//! Each scope (`per_identity`, `per_client`) limits
//!
//! * `max_flows`: tunnels open at once;
//! * `new_flows_per_sec` with `burst`: a token bucket of `burst` flows
//!   (default: one second's worth) refilled at `new_flows_per_sec`;
//! * `bytes_per_period` over `period_secs`: payload bytes (both directions)
//!   per fixed window, which starts at the first flow after the previous
//!   window ended.
//!
//! 0 means unlimited. A flow is admitted only if every limit of both
//! scopes allows it; a refusal consumes nothing. Concurrency is released
//! when the dataplane reports the flow closed, and the flow's byte totals
//! are charged to the window current at that moment. A new flow's byte
//! budget is the smaller remaining allowance of its two scopes: the
//! dataplane ends a flow that exceeds it, so one flow cannot overrun an
//! allowance, while flows open at once may together overrun it by at most
//! (max_flows - 1) times the remainder. Once an allowance is used up new
//! flows are refused until the window ends.
//!
//! Clients are keyed by IPv4 address, and IPv6 clients by their /64 (one
//! host usually holds a whole /64 and could otherwise rotate addresses to
//! escape a per-client limit). Flows a re-attached dataplane reports
//! (`FlowOpen`) count against their client only: the identity that opened
//! them is not in the report.
//!
//! Tables are bounded: at most `max_tracked` identities and as many
//! clients. An entry is idle once it has no flows, a full bucket, and no
//! bytes charged in a running window; idle entries are evicted when a table
//! is full and by [`Quotas::sweep`]. When a scope with limits has a table
//! full of busy entries, new keys are refused (fail closed); a scope
//! without limits simply stops tracking new keys.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::global_quota::GlobalUsage;

/// Default bound of each table (identities, clients).
pub const MAX_TRACKED: usize = 100_000;
/// Default bound of the flow table.
pub const MAX_FLOWS_TRACKED: usize = 1_000_000;
/// Largest rate accepted.
pub const MAX_RATE: u32 = 1_000_000;
/// Longest period accepted (a year).
pub const MAX_PERIOD_SECS: u32 = 366 * 24 * 3600;

const MICRO: u128 = 1_000_000;

/// The limits of one scope. 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaLimits {
    /// Tunnels open at once.
    pub max_flows: u32,
    /// New tunnels per second (token bucket refill rate).
    pub new_flows_per_sec: u32,
    /// Bucket size (default: `new_flows_per_sec`).
    pub burst: u32,
    /// Payload bytes per period, both directions.
    pub bytes_per_period: u64,
    /// Period length for `bytes_per_period`, seconds.
    pub period_secs: u32,
}

/// The quota configuration (`[quotas]`). Deserializing validates, so a
/// config file's errors carry the line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawQuotaConfig")]
pub struct QuotaConfig {
    /// Per HMAC subject or static token.
    pub per_identity: QuotaLimits,
    /// Per client address (IPv6: per /64).
    pub per_client: QuotaLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawQuotaConfig {
    per_identity: QuotaLimits,
    per_client: QuotaLimits,
}

impl TryFrom<RawQuotaConfig> for QuotaConfig {
    type Error = QuotaError;

    fn try_from(r: RawQuotaConfig) -> Result<Self, QuotaError> {
        let c = QuotaConfig { per_identity: r.per_identity, per_client: r.per_client };
        c.validate()?;
        Ok(c)
    }
}

/// Which table a limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `per_identity`.
    Identity,
    /// `per_client`.
    Client,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Identity => "per_identity",
            Scope::Client => "per_client",
        }
    }
}

/// Which limit refused a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// `max_flows`.
    Flows(Scope),
    /// `new_flows_per_sec` / `burst`.
    Rate(Scope),
    /// `bytes_per_period`.
    Bytes(Scope),
    /// The scope's table is full of busy entries.
    Tracking(Scope),
    /// Fleet-wide identity quotas cannot be checked: the fleet's store is
    /// unreachable and `fleet.on_store_failure = "closed"`.
    FleetStoreDown,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Flows(s) => write!(f, "{}.max_flows", s.name()),
            Exceeded::Rate(s) => write!(f, "{}.new_flows_per_sec", s.name()),
            Exceeded::Bytes(s) => write!(f, "{}.bytes_per_period", s.name()),
            Exceeded::Tracking(Scope::Identity) => f.write_str("too many identities tracked"),
            Exceeded::Tracking(Scope::Client) => f.write_str("too many clients tracked"),
            Exceeded::FleetStoreDown => {
                f.write_str("per_identity quotas are fleet-wide and the fleet store is unreachable")
            }
        }
    }
}

/// Why a quota setting is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The key is not a quota setting.
    #[error(
        "unknown quota key {0:?} (expected per_identity.* or per_client.* with max_flows, new_flows_per_sec, burst, bytes_per_period, period_secs)"
    )]
    UnknownKey(String),
    /// A value is out of range or inconsistent with another.
    #[error("quotas.{key}: {why}")]
    Invalid {
        /// The offending key, e.g. `per_client.period_secs`.
        key: String,
        /// What is wrong.
        why: String,
    },
}

impl QuotaLimits {
    fn limited(&self) -> bool {
        self.max_flows > 0 || self.new_flows_per_sec > 0 || self.bytes_per_period > 0
    }

    fn capacity_micro(&self) -> u128 {
        u128::from(if self.burst > 0 { self.burst } else { self.new_flows_per_sec }) * MICRO
    }

    fn validate(&self, scope: &str) -> Result<(), QuotaError> {
        let invalid = |key: &str, why: &str| {
            Err(QuotaError::Invalid { key: format!("{scope}.{key}"), why: why.to_string() })
        };
        if self.new_flows_per_sec > MAX_RATE {
            return invalid("new_flows_per_sec", &format!("at most {MAX_RATE}"));
        }
        if self.burst > 0 && self.new_flows_per_sec == 0 {
            return invalid("burst", "needs new_flows_per_sec (a bucket that never refills)");
        }
        if self.burst > MAX_RATE.saturating_mul(60) {
            return invalid("burst", "at most 60 seconds' worth of the maximum rate");
        }
        if self.bytes_per_period > 0 && self.period_secs == 0 {
            return invalid("period_secs", "must be positive when bytes_per_period is set");
        }
        if self.period_secs > MAX_PERIOD_SECS {
            return invalid("period_secs", &format!("at most {MAX_PERIOD_SECS} (a year)"));
        }
        Ok(())
    }

    fn field(&mut self, name: &str) -> Option<FieldMut<'_>> {
        Some(match name {
            "max_flows" => FieldMut::U32(&mut self.max_flows),
            "new_flows_per_sec" => FieldMut::U32(&mut self.new_flows_per_sec),
            "burst" => FieldMut::U32(&mut self.burst),
            "bytes_per_period" => FieldMut::U64(&mut self.bytes_per_period),
            "period_secs" => FieldMut::U32(&mut self.period_secs),
            _ => return None,
        })
    }
}

enum FieldMut<'a> {
    U32(&'a mut u32),
    U64(&'a mut u64),
}

impl QuotaConfig {
    /// The keys `policy set` accepts, as in the config file under
    /// `[quotas]`.
    pub const KEYS: [&'static str; 10] = [
        "per_identity.max_flows",
        "per_identity.new_flows_per_sec",
        "per_identity.burst",
        "per_identity.bytes_per_period",
        "per_identity.period_secs",
        "per_client.max_flows",
        "per_client.new_flows_per_sec",
        "per_client.burst",
        "per_client.bytes_per_period",
        "per_client.period_secs",
    ];

    /// Checks ranges and combinations; errors name the key.
    pub fn validate(&self) -> Result<(), QuotaError> {
        self.per_identity.validate("per_identity")?;
        self.per_client.validate("per_client")
    }

    /// Sets one key (`per_client.max_flows`, ...). Does not validate the
    /// whole; call [`QuotaConfig::validate`] after the last change.
    pub fn set(&mut self, key: &str, value: u64) -> Result<(), QuotaError> {
        let unknown = || QuotaError::UnknownKey(key.chars().take(64).collect());
        let (scope, name) = key.split_once('.').ok_or_else(unknown)?;
        let limits = match scope {
            "per_identity" => &mut self.per_identity,
            "per_client" => &mut self.per_client,
            _ => return Err(unknown()),
        };
        match limits.field(name).ok_or_else(unknown)? {
            FieldMut::U32(f) => {
                *f = u32::try_from(value).map_err(|_| QuotaError::Invalid {
                    key: key.to_string(),
                    why: format!("{value} does not fit 32 bits"),
                })?
            }
            FieldMut::U64(f) => *f = value,
        }
        Ok(())
    }

    /// This configuration with `overrides` (key -> value) applied, validated.
    pub fn with_overrides<'a>(
        &self,
        overrides: impl IntoIterator<Item = (&'a String, &'a u64)>,
    ) -> Result<QuotaConfig, QuotaError> {
        let mut out = *self;
        for (k, v) in overrides {
            out.set(k, *v)?;
        }
        out.validate()?;
        Ok(out)
    }
}

/// The identity limits enforced by the local table (`shared`: bytes are
/// accounted fleet-wide instead).
fn identity_limits(config: &QuotaConfig, shared: bool) -> QuotaLimits {
    let mut l = config.per_identity;
    if shared {
        l.bytes_per_period = 0;
        l.period_secs = 0;
    }
    l
}

/// The key of a client address: IPv4 (v4-mapped included) as is, IPv6 by
/// its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

#[derive(Debug, Clone)]
struct Usage {
    flows: u32,
    bucket_micro: u128,
    refilled_at: Instant,
    window_start: Instant,
    bytes: u64,
}

impl Usage {
    fn new(limits: &QuotaLimits, now: Instant) -> Self {
        Self {
            flows: 0,
            bucket_micro: limits.capacity_micro(),
            refilled_at: now,
            window_start: now,
            bytes: 0,
        }
    }

    /// Refills the bucket and rolls the byte window up to `now`.
    fn advance(&mut self, limits: &QuotaLimits, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.refilled_at = self.refilled_at.max(now);
        // rate flows/s = rate * 1e6 micro-flows per 1e9 ns.
        let refill = elapsed.as_nanos().saturating_mul(u128::from(limits.new_flows_per_sec)) / 1000;
        self.bucket_micro = self.bucket_micro.saturating_add(refill).min(limits.capacity_micro());
        if limits.period_secs > 0
            && now.saturating_duration_since(self.window_start)
                >= Duration::from_secs(u64::from(limits.period_secs))
        {
            self.window_start = now;
            self.bytes = 0;
        }
    }

    fn remaining_bytes(&self, limits: &QuotaLimits) -> Option<u64> {
        (limits.bytes_per_period > 0).then(|| limits.bytes_per_period.saturating_sub(self.bytes))
    }

    fn check(&self, limits: &QuotaLimits, scope: Scope) -> Result<(), Exceeded> {
        if limits.max_flows > 0 && self.flows >= limits.max_flows {
            return Err(Exceeded::Flows(scope));
        }
        if limits.new_flows_per_sec > 0 && self.bucket_micro < MICRO {
            return Err(Exceeded::Rate(scope));
        }
        if self.remaining_bytes(limits) == Some(0) {
            return Err(Exceeded::Bytes(scope));
        }
        Ok(())
    }

    /// How long until `which` would admit a flow again, when that is known
    /// from time alone: the token bucket refilling one flow, or the byte
    /// window rolling over. Concurrent-flow limits free up when flows end,
    /// which no clock predicts.
    fn retry_after(&self, limits: &QuotaLimits, which: Exceeded, now: Instant) -> Option<Duration> {
        let mut u = self.clone();
        u.advance(limits, now);
        match which {
            Exceeded::Rate(_) if limits.new_flows_per_sec > 0 => {
                let missing_micro = MICRO.saturating_sub(u.bucket_micro);
                // rate * 1e6 micro-flows per second: missing / rate micro-seconds.
                let micros = missing_micro.div_ceil(u128::from(limits.new_flows_per_sec));
                Some(Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX)))
            }
            Exceeded::Bytes(_) if limits.period_secs > 0 => {
                let end = u.window_start + Duration::from_secs(u64::from(limits.period_secs));
                Some(end.saturating_duration_since(now))
            }
            _ => None,
        }
    }

    fn is_idle(&self, limits: &QuotaLimits, now: Instant) -> bool {
        let mut u = self.clone();
        u.advance(limits, now);
        u.flows == 0
            && (limits.new_flows_per_sec == 0 || u.bucket_micro >= limits.capacity_micro())
            && (limits.bytes_per_period == 0 || u.bytes == 0)
    }
}

#[derive(Debug)]
struct Table<K> {
    scope: Scope,
    map: HashMap<K, Usage>,
    cap: usize,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(scope: Scope, cap: usize) -> Self {
        Self { scope, map: HashMap::new(), cap }
    }

    fn sweep(&mut self, limits: &QuotaLimits, now: Instant) -> usize {
        let before = self.map.len();
        self.map.retain(|_, u| !u.is_idle(limits, now));
        before - self.map.len()
    }

    /// The entry for `key`, created if there is room (after evicting idle
    /// entries when full). `Ok(None)`: not tracked (full, scope unlimited).
    fn entry(&mut self, key: &K, limits: &QuotaLimits, now: Instant) -> Result<Option<&mut Usage>, Exceeded> {
        if !self.map.contains_key(key) {
            if self.map.len() >= self.cap {
                self.sweep(limits, now);
            }
            if self.map.len() >= self.cap {
                return if limits.limited() { Err(Exceeded::Tracking(self.scope)) } else { Ok(None) };
            }
            self.map.insert(key.clone(), Usage::new(limits, now));
        }
        let u = self.map.get_mut(key).expect("present");
        u.advance(limits, now);
        Ok(Some(u))
    }

    fn peek(&self, key: &K, limits: &QuotaLimits, now: Instant) -> Result<(), Exceeded> {
        match self.map.get(key) {
            Some(u) => {
                let mut u = u.clone();
                u.advance(limits, now);
                u.check(limits, self.scope)
            }
            None if self.map.len() >= self.cap && limits.limited() => {
                // Only a sweep can tell; admission will.
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn release(&mut self, key: &K, bytes: u64, limits: &QuotaLimits, now: Instant) {
        if let Some(u) = self.map.get_mut(key) {
            u.advance(limits, now);
            u.flows = u.flows.saturating_sub(1);
            u.bytes = u.bytes.saturating_add(bytes);
        }
    }
}

#[derive(Debug, Clone)]
struct FlowEntry {
    identity: Option<String>,
    client: Option<IpAddr>,
}

/// Table sizes, for `policy show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaStats {
    /// Identities tracked.
    pub identities_tracked: usize,
    /// Clients tracked.
    pub clients_tracked: usize,
    /// Flows tracked.
    pub flows_tracked: usize,
    /// Bound of each of the identity and client tables.
    pub max_tracked: usize,
}

/// The usage of one identity or client, for `policy show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageInfo {
    /// Open flows.
    pub flows: u32,
    /// Bytes charged in the current window.
    pub bytes: u64,
}

/// Quota state: limits, usage per identity and client, live flows.
#[derive(Debug)]
pub struct Quotas {
    config: QuotaConfig,
    identities: Table<String>,
    clients: Table<IpAddr>,
    flows: HashMap<u64, FlowEntry>,
    max_flows_tracked: usize,
    /// Fleet mode with `global_quotas`: identity limits hold fleet-wide.
    global: Option<GlobalUsage>,
}

impl Quotas {
    /// Quotas with these limits and table bounds.
    pub fn new(config: QuotaConfig, max_tracked: usize, max_flows_tracked: usize) -> Self {
        Self {
            config,
            identities: Table::new(Scope::Identity, max_tracked),
            clients: Table::new(Scope::Client, max_tracked),
            flows: HashMap::new(),
            max_flows_tracked,
            global: None,
        }
    }

    /// Makes the `per_identity` limits fleet-wide ([`crate::global_quota`]):
    /// admission adds the other hosts' usage, bytes are counted in periods
    /// aligned to the Unix epoch.
    pub fn share_identities(&mut self, global: GlobalUsage) {
        self.global = Some(global);
    }

    /// The fleet-wide accounting, when identity limits are shared.
    pub fn global(&self) -> Option<&GlobalUsage> {
        self.global.as_ref()
    }

    /// The fleet-wide accounting, for the fleet thread.
    pub fn global_mut(&mut self) -> Option<&mut GlobalUsage> {
        self.global.as_mut()
    }

    /// The identity limits the local table enforces: with shared identity
    /// quotas, bytes are the fleet's (aligned periods) and not checked here.
    fn local_identity_limits(&self) -> QuotaLimits {
        identity_limits(&self.config, self.global.is_some())
    }

    /// The limits in force.
    pub fn config(&self) -> &QuotaConfig {
        &self.config
    }

    /// Changes the limits; usage is kept (buckets are clipped to the new
    /// burst as they refill).
    pub fn set_config(&mut self, config: QuotaConfig) {
        self.config = config;
    }

    /// Whole seconds (at least 1) a client refused by `which` should wait
    /// before trying again (the `Retry-After` field, RFC 9110 section
    /// 10.2.3), when time alone lifts the limit.
    pub fn retry_after_secs(
        &self,
        which: Exceeded,
        identity: Option<&str>,
        client: IpAddr,
        now: Instant,
    ) -> Option<u32> {
        let wait = match which {
            Exceeded::Rate(Scope::Identity) | Exceeded::Bytes(Scope::Identity) if self.global.is_some() => {
                let local = self
                    .identities
                    .map
                    .get(identity?)
                    .and_then(|u| u.retry_after(&self.local_identity_limits(), which, now));
                let global = self.global.as_ref()?.retry_after(which, &self.config.per_identity, now);
                local.into_iter().chain(global).max()?
            }
            Exceeded::Rate(Scope::Identity) | Exceeded::Bytes(Scope::Identity) => {
                let usage = self.identities.map.get(identity?)?;
                usage.retry_after(&self.config.per_identity, which, now)?
            }
            Exceeded::Rate(Scope::Client) | Exceeded::Bytes(Scope::Client) => {
                let usage = self.clients.map.get(&client_key(client))?;
                usage.retry_after(&self.config.per_client, which, now)?
            }
            Exceeded::Flows(_) | Exceeded::Tracking(_) | Exceeded::FleetStoreDown => return None,
        };
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Some(u32::try_from(secs.max(1)).unwrap_or(u32::MAX))
    }

    /// Whether a new flow would be admitted now, without admitting it (to
    /// refuse before spending a DNS resolution).
    pub fn check(&self, identity: Option<&str>, client: IpAddr, now: Instant) -> Result<(), Exceeded> {
        if let Some(id) = identity {
            self.identities.peek(&id.to_string(), &self.local_identity_limits(), now)?;
            if let Some(g) = &self.global {
                g.check(id, &self.config.per_identity, now)?;
            }
        }
        self.clients.peek(&client_key(client), &self.config.per_client, now)
    }

    /// Admits flow `flow_id` for `identity` from `client`, or says which
    /// limit refuses it (consuming nothing). On success returns the flow's
    /// byte budget (0: unlimited).
    pub fn admit(
        &mut self,
        flow_id: u64,
        identity: Option<&str>,
        client: IpAddr,
        now: Instant,
    ) -> Result<u64, Exceeded> {
        let Quotas { config, identities, clients, flows, global, .. } = self;
        let id_limits = identity_limits(config, global.is_some());
        let id_key = identity.map(str::to_string);
        let client_key = client_key(client);
        // Check both scopes before charging either.
        let id_usage = match &id_key {
            Some(k) => identities.entry(k, &id_limits, now)?.map(|u| u.clone()),
            None => None,
        };
        let client_usage = clients.entry(&client_key, &config.per_client, now)?.map(|u| u.clone());
        if let Some(u) = &id_usage {
            u.check(&id_limits, Scope::Identity)?;
        }
        if let (Some(g), Some(k)) = (global.as_ref(), &id_key) {
            g.check(k, &config.per_identity, now)?;
        }
        if let Some(u) = &client_usage {
            u.check(&config.per_client, Scope::Client)?;
        }
        let global_bytes = match (global.as_ref(), &id_key) {
            (Some(g), Some(k)) => g.remaining_bytes(k, &config.per_identity, now),
            _ => None,
        };
        let budget = [
            id_usage.as_ref().and_then(|u| u.remaining_bytes(&id_limits)),
            global_bytes,
            client_usage.as_ref().and_then(|u| u.remaining_bytes(&config.per_client)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);
        if flows.len() >= self.max_flows_tracked {
            // Not tracked; the caller's own flow table bound refuses it.
            return Ok(budget);
        }
        let mut entry = FlowEntry { identity: None, client: None };
        if let (Some(k), Some(_)) = (&id_key, &id_usage) {
            let u = identities.map.get_mut(k).expect("entry created above");
            u.flows += 1;
            u.bucket_micro = u.bucket_micro.saturating_sub(MICRO);
            entry.identity = Some(k.clone());
            if let Some(g) = global.as_mut() {
                g.admitted(k, now);
            }
        }
        if client_usage.is_some() {
            let u = clients.map.get_mut(&client_key).expect("entry created above");
            u.flows += 1;
            u.bucket_micro = u.bucket_micro.saturating_sub(MICRO);
            entry.client = Some(client_key);
        }
        flows.insert(flow_id, entry);
        Ok(budget)
    }

    /// Counts a flow that is open but was not admitted here (a re-attached
    /// dataplane reported it, with the identity the allowing control gave
    /// it): against its identity's and its client's concurrency (only its
    /// bytes from now on are charged).
    pub fn reopened(&mut self, flow_id: u64, client: IpAddr, identity: Option<&str>, now: Instant) {
        if self.flows.contains_key(&flow_id) || self.flows.len() >= self.max_flows_tracked {
            return;
        }
        let key = client_key(client);
        let client_tracked = match self.clients.entry(&key, &self.config.per_client, now) {
            Ok(Some(u)) => {
                u.flows += 1;
                true
            }
            _ => false,
        };
        let id_key = identity.map(str::to_string);
        let id_limits = self.local_identity_limits();
        let id_tracked = match &id_key {
            Some(k) => match self.identities.entry(k, &id_limits, now) {
                Ok(Some(u)) => {
                    u.flows += 1;
                    if let Some(g) = self.global.as_mut() {
                        g.reopened(k, now);
                    }
                    true
                }
                _ => false,
            },
            None => false,
        };
        self.flows.insert(
            flow_id,
            FlowEntry { identity: id_key.filter(|_| id_tracked), client: client_tracked.then_some(key) },
        );
    }

    /// A flow ended after carrying `bytes` (both directions): releases its
    /// concurrency and charges the bytes. Unknown flows are ignored.
    pub fn closed(&mut self, flow_id: u64, bytes: u64, now: Instant) {
        let Some(entry) = self.flows.remove(&flow_id) else { return };
        if let Some(k) = &entry.identity {
            self.identities.release(k, bytes, &identity_limits(&self.config, self.global.is_some()), now);
            if let Some(g) = self.global.as_mut() {
                g.closed(k, bytes, &self.config.per_identity, now);
            }
        }
        if let Some(k) = &entry.client {
            self.clients.release(k, bytes, &self.config.per_client, now);
        }
    }

    /// Forgets every flow (the dataplane went away with them).
    pub fn release_all(&mut self) {
        self.flows.clear();
        for u in self.identities.map.values_mut().chain(self.clients.map.values_mut()) {
            u.flows = 0;
        }
        if let Some(g) = self.global.as_mut() {
            g.release_all();
        }
    }

    /// Evicts idle entries; returns how many.
    pub fn sweep(&mut self, now: Instant) -> usize {
        self.identities.sweep(&self.local_identity_limits(), now)
            + self.clients.sweep(&self.config.per_client, now)
    }

    /// Table sizes.
    pub fn stats(&self) -> QuotaStats {
        QuotaStats {
            identities_tracked: self.identities.map.len(),
            clients_tracked: self.clients.map.len(),
            flows_tracked: self.flows.len(),
            max_tracked: self.identities.cap,
        }
    }

    /// An identity's usage (bytes as of `now`'s window).
    pub fn identity_usage(&self, identity: &str, now: Instant) -> Option<UsageInfo> {
        self.identities.map.get(identity).map(|u| {
            let mut u = u.clone();
            u.advance(&self.local_identity_limits(), now);
            UsageInfo { flows: u.flows, bytes: u.bytes }
        })
    }

    /// A client's usage.
    pub fn client_usage(&self, client: IpAddr, now: Instant) -> Option<UsageInfo> {
        self.clients.map.get(&client_key(client)).map(|u| {
            let mut u = u.clone();
            u.advance(&self.config.per_client, now);
            UsageInfo { flows: u.flows, bytes: u.bytes }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
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

    fn identity_only(l: QuotaLimits) -> Quotas {
        Quotas::new(QuotaConfig { per_identity: l, per_client: QuotaLimits::default() }, 100, 1000)
    }

    #[test]
    fn shared_identity_limits_add_the_other_hosts_usage() {
        use crate::global_quota::{RemoteUsage, WallClock};
        let t0 = Instant::now();
        let mut q = identity_only(limits(3, 0, 0, 1000, 60));
        q.share_identities(GlobalUsage::new(WallClock::new(t0, 1_700_000_000_000), 100));
        let c = ip("192.0.2.1");
        let g = q.global_mut().unwrap();
        g.set_remote("sub:a", RemoteUsage { flows: 2, bytes: 300, ..Default::default() });
        // The budget is what the fleet has left; one flow here reaches the limit.
        assert_eq!(q.admit(1, Some("sub:a"), c, t0), Ok(700));
        assert_eq!(q.admit(2, Some("sub:a"), c, t0), Err(Exceeded::Flows(Scope::Identity)));
        assert_eq!(q.check(Some("sub:a"), c, t0), Err(Exceeded::Flows(Scope::Identity)));
        assert_eq!(q.global().unwrap().local_flows("sub:a"), 1);
        // Bytes charged here count fleet-wide, in the aligned period.
        q.closed(1, 700, t0);
        assert_eq!(q.admit(3, Some("sub:a"), c, t0), Err(Exceeded::Bytes(Scope::Identity)));
        assert_eq!(q.retry_after_secs(Exceeded::Bytes(Scope::Identity), Some("sub:a"), c, t0), Some(40));
        assert!(q.admit(4, Some("sub:b"), c, t0).is_ok(), "another identity");
        // Store down in closed mode: limited identities are refused.
        q.global_mut().unwrap().set_refuse_unshared(true);
        assert_eq!(q.admit(5, Some("sub:c"), c, t0), Err(Exceeded::FleetStoreDown));
        assert_eq!(q.retry_after_secs(Exceeded::FleetStoreDown, Some("sub:c"), c, t0), None);
        q.release_all();
        assert_eq!(q.global().unwrap().local_flows("sub:b"), 0);
    }

    #[test]
    fn unlimited_admits_everything_with_no_budget() {
        let mut q = Quotas::new(QuotaConfig::default(), 4, 1000);
        let t0 = Instant::now();
        for f in 0..100 {
            assert_eq!(q.admit(f, Some("sub:a"), ip("10.0.0.1"), t0), Ok(0));
        }
    }

    #[test]
    fn concurrency_is_released_when_flows_close() {
        let mut q = identity_only(limits(2, 0, 0, 0, 0));
        let t0 = Instant::now();
        let c = ip("192.0.2.1");
        assert!(q.admit(1, Some("sub:a"), c, t0).is_ok());
        assert!(q.admit(2, Some("sub:a"), c, t0).is_ok());
        assert_eq!(q.admit(3, Some("sub:a"), c, t0), Err(Exceeded::Flows(Scope::Identity)));
        assert_eq!(q.check(Some("sub:a"), c, t0), Err(Exceeded::Flows(Scope::Identity)));
        assert!(q.admit(3, Some("sub:b"), c, t0).is_ok(), "another identity has its own quota");
        q.closed(1, 0, t0);
        q.closed(1, 0, t0); // a duplicate report releases nothing more
        assert!(q.check(Some("sub:a"), c, t0).is_ok());
        assert!(q.admit(4, Some("sub:a"), c, t0).is_ok());
        assert_eq!(q.admit(5, Some("sub:a"), c, t0), Err(Exceeded::Flows(Scope::Identity)));
        assert_eq!(q.identity_usage("sub:a", t0), Some(UsageInfo { flows: 2, bytes: 0 }));
        q.release_all();
        assert_eq!(q.identity_usage("sub:a", t0), Some(UsageInfo { flows: 0, bytes: 0 }));
        assert!(q.admit(6, Some("sub:a"), c, t0).is_ok());
        assert_eq!(Exceeded::Flows(Scope::Identity).to_string(), "per_identity.max_flows");
    }

    #[test]
    fn token_bucket_refills_at_the_rate() {
        // 2 per second, bursts of 4.
        let mut q = identity_only(limits(0, 2, 4, 0, 0));
        let t0 = Instant::now();
        let c = ip("192.0.2.1");
        let mut id = 0;
        let mut admit = |q: &mut Quotas, t| {
            id += 1;
            q.admit(id, Some("sub:a"), c, t)
        };
        for _ in 0..4 {
            assert!(admit(&mut q, t0).is_ok());
        }
        assert_eq!(admit(&mut q, t0), Err(Exceeded::Rate(Scope::Identity)));
        // 499 ms: not yet one token (2/s = one per 500 ms).
        assert!(admit(&mut q, t0 + Duration::from_millis(499)).is_err());
        assert!(admit(&mut q, t0 + Duration::from_millis(500)).is_ok());
        assert!(admit(&mut q, t0 + Duration::from_millis(500)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..4 {
            assert!(admit(&mut q, later).is_ok());
        }
        assert_eq!(admit(&mut q, later), Err(Exceeded::Rate(Scope::Identity)));
        // Without a burst the bucket holds one second's worth.
        let mut q = identity_only(limits(0, 3, 0, 0, 0));
        for f in 0..3 {
            assert!(q.admit(f, Some("sub:a"), c, t0).is_ok());
        }
        assert_eq!(q.admit(9, Some("sub:a"), c, t0), Err(Exceeded::Rate(Scope::Identity)));
    }

    #[test]
    fn retry_after_is_known_for_rate_and_bytes_only() {
        let c = ip("192.0.2.1");
        let t0 = Instant::now();
        let id = Some("sub:a");
        // One flow per second, no burst.
        let mut q = identity_only(limits(0, 1, 1, 0, 0));
        assert!(q.admit(1, id, c, t0).is_ok());
        let which = Exceeded::Rate(Scope::Identity);
        assert_eq!(q.admit(2, id, c, t0), Err(which));
        assert_eq!(q.retry_after_secs(which, id, c, t0), Some(1));
        assert_eq!(q.retry_after_secs(which, id, c, t0 + Duration::from_millis(999)), Some(1), "never 0");
        // Bytes: the window rolls over period_secs after it started.
        let mut q = identity_only(limits(0, 0, 0, 100, 60));
        assert!(q.admit(1, id, c, t0).is_ok());
        q.closed(1, 100, t0 + Duration::from_secs(1));
        let which = Exceeded::Bytes(Scope::Identity);
        assert_eq!(q.admit(2, id, c, t0 + Duration::from_secs(20)), Err(which));
        assert_eq!(q.retry_after_secs(which, id, c, t0 + Duration::from_secs(20)), Some(40));
        assert_eq!(
            q.retry_after_secs(which, id, c, t0 + Duration::from_millis(20_500)),
            Some(40),
            "rounded up"
        );
        // Concurrency frees up when flows end: no prediction.
        assert_eq!(q.retry_after_secs(Exceeded::Flows(Scope::Identity), id, c, t0), None);
        assert_eq!(q.retry_after_secs(which, Some("sub:unknown"), c, t0), None);
    }

    #[test]
    fn refusals_consume_nothing() {
        // The client limit refuses; the identity's bucket must stay full.
        let cfg = QuotaConfig { per_identity: limits(0, 1, 1, 0, 0), per_client: limits(1, 0, 0, 0, 0) };
        let mut q = Quotas::new(cfg, 100, 1000);
        let t0 = Instant::now();
        assert!(q.admit(1, Some("sub:a"), ip("192.0.2.1"), t0).is_ok());
        assert_eq!(q.admit(2, Some("sub:b"), ip("192.0.2.1"), t0), Err(Exceeded::Flows(Scope::Client)));
        assert!(q.admit(3, Some("sub:b"), ip("192.0.2.2"), t0).is_ok(), "sub:b's token was not spent");
    }

    #[test]
    fn bytes_are_budgeted_charged_and_reset_per_period() {
        let mut q = identity_only(limits(0, 0, 0, 1000, 60));
        let t0 = Instant::now();
        let c = ip("192.0.2.1");
        assert_eq!(q.admit(1, Some("sub:a"), c, t0), Ok(1000));
        // Concurrent flows each get the remainder as of their start.
        assert_eq!(q.admit(2, Some("sub:a"), c, t0), Ok(1000));
        q.closed(1, 300, t0 + Duration::from_secs(1));
        assert_eq!(q.admit(3, Some("sub:a"), c, t0 + Duration::from_secs(2)), Ok(700));
        q.closed(2, 700, t0 + Duration::from_secs(3));
        assert_eq!(
            q.identity_usage("sub:a", t0 + Duration::from_secs(3)),
            Some(UsageInfo { flows: 1, bytes: 1000 })
        );
        assert_eq!(
            q.admit(4, Some("sub:a"), c, t0 + Duration::from_secs(4)),
            Err(Exceeded::Bytes(Scope::Identity))
        );
        // Over-use (flows open at once) saturates, never wraps.
        q.closed(3, u64::MAX, t0 + Duration::from_secs(5));
        assert_eq!(
            q.admit(4, Some("sub:a"), c, t0 + Duration::from_secs(59)),
            Err(Exceeded::Bytes(Scope::Identity))
        );
        // The window ends 60 s after it started: a fresh allowance.
        assert_eq!(q.admit(4, Some("sub:a"), c, t0 + Duration::from_secs(60)), Ok(1000));
        // The smaller of the two scopes' remainders is the budget.
        let cfg =
            QuotaConfig { per_identity: limits(0, 0, 0, 1000, 60), per_client: limits(0, 0, 0, 400, 60) };
        let mut q = Quotas::new(cfg, 100, 1000);
        assert_eq!(q.admit(1, Some("sub:a"), c, t0), Ok(400));
        assert_eq!(q.admit(2, None, c, t0), Ok(400), "no identity: the client scope alone");
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let mut q = Quotas::new(
            QuotaConfig { per_identity: QuotaLimits::default(), per_client: limits(1, 0, 0, 0, 0) },
            100,
            1000,
        );
        let t0 = Instant::now();
        assert!(q.admit(1, None, ip("2001:db8:1:2::1"), t0).is_ok());
        assert_eq!(q.admit(2, None, ip("2001:db8:1:2:ffff::9"), t0), Err(Exceeded::Flows(Scope::Client)));
        assert!(q.admit(3, None, ip("2001:db8:1:3::1"), t0).is_ok());
        assert!(q.admit(4, None, ip("192.0.2.7"), t0).is_ok());
        assert_eq!(q.admit(5, None, ip("::ffff:192.0.2.7"), t0), Err(Exceeded::Flows(Scope::Client)));
    }

    #[test]
    fn tables_are_bounded_and_idle_entries_evicted() {
        // Unlimited scopes stop tracking when full; nothing is refused.
        let mut q = Quotas::new(QuotaConfig::default(), 3, 1000);
        let t0 = Instant::now();
        for f in 0..10u64 {
            assert!(q.admit(f, Some(&format!("sub:{f}")), ip(&format!("192.0.2.{f}")), t0).is_ok());
        }
        assert_eq!(q.stats().identities_tracked, 3);
        assert_eq!(q.stats().clients_tracked, 3);
        for f in 0..10u64 {
            q.closed(f, 10, t0);
        }
        assert_eq!(q.sweep(t0), 6, "no flows, no limits: idle");
        assert_eq!(q.stats().identities_tracked, 0);

        // A limited scope: busy entries are kept and new keys refused
        // (fail closed); idle ones make room.
        let mut q = identity_only(limits(5, 1, 1, 0, 0));
        q.identities.cap = 2;
        let c = ip("192.0.2.1");
        assert!(q.admit(1, Some("sub:a"), c, t0).is_ok());
        assert!(q.admit(2, Some("sub:b"), c, t0).is_ok());
        assert_eq!(q.admit(3, Some("sub:c"), c, t0), Err(Exceeded::Tracking(Scope::Identity)));
        assert_eq!(Exceeded::Tracking(Scope::Identity).to_string(), "too many identities tracked");
        q.closed(1, 0, t0);
        // sub:a has no flows, but its bucket is not full yet: still busy.
        assert_eq!(q.admit(3, Some("sub:c"), c, t0), Err(Exceeded::Tracking(Scope::Identity)));
        let t1 = t0 + Duration::from_secs(1);
        assert!(q.admit(3, Some("sub:c"), c, t1).is_ok(), "sub:a was idle and evicted");
        assert_eq!(q.stats().identities_tracked, 2);
        assert!(q.identity_usage("sub:a", t1).is_none());

        // Bytes charged in a running window keep an entry (evicting it
        // would forgive the usage); after the window it goes.
        let mut q = identity_only(limits(0, 0, 0, 100, 10));
        q.identities.cap = 1;
        assert_eq!(q.admit(1, Some("sub:a"), c, t0), Ok(100));
        q.closed(1, 100, t0);
        assert_eq!(q.admit(2, Some("sub:b"), c, t0), Err(Exceeded::Tracking(Scope::Identity)));
        assert_eq!(q.admit(2, Some("sub:a"), c, t0), Err(Exceeded::Bytes(Scope::Identity)));
        assert_eq!(q.admit(2, Some("sub:b"), c, t0 + Duration::from_secs(10)), Ok(100));

        // The flow table is bounded too.
        let mut q = Quotas::new(QuotaConfig::default(), 10, 2);
        for f in 0..5 {
            assert!(q.admit(f, Some("sub:a"), c, t0).is_ok());
        }
        assert_eq!(q.stats().flows_tracked, 2);
    }

    #[test]
    fn reopened_flows_count_against_their_client_and_identity() {
        let mut q = Quotas::new(
            QuotaConfig { per_identity: limits(1, 0, 0, 0, 0), per_client: limits(2, 0, 0, 0, 0) },
            10,
            100,
        );
        let t0 = Instant::now();
        let c = ip("192.0.2.1");
        q.reopened(7, c, None, t0);
        q.reopened(7, c, None, t0); // reported twice: counted once
        assert_eq!(q.client_usage(c, t0), Some(UsageInfo { flows: 1, bytes: 0 }));
        assert!(q.admit(1, Some("sub:a"), c, t0).is_ok());
        assert_eq!(q.admit(2, Some("sub:b"), c, t0), Err(Exceeded::Flows(Scope::Client)));
        q.closed(7, 50, t0);
        assert!(q.admit(2, Some("sub:b"), c, t0).is_ok());
        // With its identity, a reported flow also holds that identity's slot.
        let other = ip("192.0.2.2");
        q.reopened(8, other, Some("sub:c"), t0);
        assert_eq!(q.identity_usage("sub:c", t0), Some(UsageInfo { flows: 1, bytes: 0 }));
        assert_eq!(q.admit(3, Some("sub:c"), other, t0), Err(Exceeded::Flows(Scope::Identity)));
        q.closed(8, 10, t0);
        assert!(q.admit(3, Some("sub:c"), other, t0).is_ok(), "closing it frees the slot");
    }

    #[test]
    fn config_keys_and_validation() {
        let mut c = QuotaConfig::default();
        for k in QuotaConfig::KEYS {
            c.set(k, 1).unwrap();
        }
        assert!(c.validate().is_ok());
        assert!(matches!(c.set("per_identity.nope", 1), Err(QuotaError::UnknownKey(_))));
        assert!(matches!(c.set("max_flows", 1), Err(QuotaError::UnknownKey(_))));
        assert!(matches!(c.set("per_host.max_flows", 1), Err(QuotaError::UnknownKey(_))));
        let e = c.set("per_client.max_flows", 1 << 40).unwrap_err();
        assert!(e.to_string().contains("per_client.max_flows"), "{e}");
        c.set("per_client.burst", 1).unwrap();
        c.set("per_client.new_flows_per_sec", 0).unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "quotas.per_client.burst: needs new_flows_per_sec (a bucket that never refills)"
        );
        let mut c = QuotaConfig::default();
        c.set("per_identity.bytes_per_period", 10).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("quotas.per_identity.period_secs"));
        let overrides: std::collections::BTreeMap<String, u64> =
            [("per_identity.max_flows".to_string(), 3)].into_iter().collect();
        let eff = QuotaConfig::default().with_overrides(&overrides).unwrap();
        assert_eq!(eff.per_identity.max_flows, 3);
    }
}

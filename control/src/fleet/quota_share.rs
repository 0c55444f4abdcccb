//! Fleet-wide identity quotas: the fleet thread's exchange with the store
//! (`fleet.global_quotas = true`; the accounting is
//! [`crate::global_quota`]).
//!
//! Every [`INTERVAL`] the fleet thread takes this host's reports from the
//! policy (under its lock, briefly), writes them in one pipeline, reads the
//! other hosts' usage of every identity active here in a second pipeline,
//! and installs the sums (under the lock again). Nothing on the CONNECT path
//! waits for it.
//!
//! Keys (`P` = `<key_prefix>:<name>`, `<id>` = `sub:<subject>` or
//! `tok:<fingerprint>`), each a hash with one field per host:
//!
//! * `P:q:flows:<id>`: open flows (absolute, `HSET`; `HDEL` at zero;
//!   re-written every [`REFRESH`] while non-zero; the key expires after
//!   [`FLOWS_TTL`] without writes). Fields of hosts without a live
//!   heartbeat are ignored, so a dead host's flows stop counting within the
//!   heartbeat's TTL;
//! * `P:q:rate:<id>:<unix second>`: new flows in that second (`HINCRBY`,
//!   expires after 5 s);
//! * `P:q:bytes:<id>:<period_secs>:<period index>`: bytes charged in that
//!   epoch-aligned period (`HINCRBY`, expires a minute after the period).
//!
//! These counters are not signed (they change many times a second): a
//! writer to the store can inflate them (refusals) or zero them, but each
//! host's own limits still hold, so the worst is the per-host quotas of a
//! fleet without sharing. Values that do not parse are refused and counted.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use redis::Connection;

use super::Fleet;
use super::codec::ValueError;
use super::connect::StoreError;
use crate::global_quota::RemoteUsage;

/// How often usage is exchanged.
pub const INTERVAL: Duration = Duration::from_millis(150);
/// How often a non-zero open-flow count is written again.
pub const REFRESH: Duration = Duration::from_secs(10);
/// How long an open-flow hash lives without writes.
pub const FLOWS_TTL: Duration = Duration::from_secs(60);
/// How long a new-flows hash lives.
const RATE_TTL_SECS: u64 = 5;
/// An identity with no activity here for this long (or its byte period,
/// if longer) is no longer read.
const IDLE: Duration = Duration::from_secs(120);
/// Largest value accepted from one field.
const MAX_FIELD_VALUE: u64 = 1 << 50;

fn flows_key(p: &str, id: &str) -> String {
    format!("{p}:q:flows:{id}")
}

fn rate_key(p: &str, id: &str, sec: u64) -> String {
    format!("{p}:q:rate:{id}:{sec}")
}

fn bytes_key(p: &str, id: &str, period_secs: u32, period: u64) -> String {
    format!("{p}:q:bytes:{id}:{period_secs}:{period}")
}

/// Sums the fields of one hash that `count` accepts; values that do not
/// parse are refused (reported through `reject`).
fn sum_fields(
    fields: &HashMap<Vec<u8>, Vec<u8>>,
    count: impl Fn(&str) -> bool,
    mut reject: impl FnMut(ValueError),
) -> u64 {
    let mut total: u64 = 0;
    for (host, value) in fields {
        let Ok(host) = std::str::from_utf8(host) else { continue };
        if !count(host) {
            continue;
        }
        match std::str::from_utf8(value).ok().and_then(|v| v.parse::<i64>().ok()) {
            Some(n) if (0..=MAX_FIELD_VALUE as i64).contains(&n) => total = total.saturating_add(n as u64),
            _ => reject(ValueError::Parse(format!("quota counter of host {host:?} is not a count"))),
        }
    }
    total
}

/// One exchange: this host's reports out, the other hosts' usage in.
pub fn exchange(fleet: &Fleet, con: &mut Connection) -> Result<(), StoreError> {
    let p = fleet.keyspace.prefix();
    let me = fleet.host.as_str();
    let now = Instant::now();
    let (reports, active, limits, unix_sec, ms_into, period) = {
        let mut policy = fleet.policy.lock().unwrap_or_else(|e| e.into_inner());
        let limits = policy.quotas().config().per_identity;
        let Some(g) = policy.quotas_mut().global_mut() else { return Ok(()) };
        let idle = IDLE.max(Duration::from_secs(u64::from(limits.period_secs)));
        let reports = g.take_reports(now, REFRESH, idle);
        let period = g.period(limits.period_secs, now);
        (reports, g.active(), limits, g.unix_secs(now), g.millis_into_second(now), period)
    };
    if !reports.is_empty() {
        let mut pipe = redis::pipe();
        for r in &reports {
            let fk = flows_key(p, &r.identity);
            match r.flows {
                Some(0) => {
                    pipe.hdel(&fk, me).ignore();
                }
                Some(n) => {
                    pipe.hset(&fk, me, n).ignore().expire(&fk, FLOWS_TTL.as_secs() as i64).ignore();
                }
                None => {}
            }
            for (sec, n) in &r.new_flows {
                let k = rate_key(p, &r.identity, *sec);
                pipe.hincr(&k, me, *n).ignore().expire(&k, RATE_TTL_SECS as i64).ignore();
            }
            for (period, b) in &r.bytes {
                let k = bytes_key(p, &r.identity, limits.period_secs, *period);
                let ttl = u64::from(limits.period_secs) + 60;
                pipe.hincr(&k, me, *b).ignore().expire(&k, ttl as i64).ignore();
            }
        }
        if let Err(e) = pipe.exec(con) {
            let mut policy = fleet.policy.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(g) = policy.quotas_mut().global_mut() {
                g.requeue(reports, now);
            }
            return Err(e.into());
        }
    }
    if active.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for id in &active {
        pipe.hgetall(flows_key(p, id));
        pipe.hgetall(rate_key(p, id, unix_sec));
        pipe.hgetall(rate_key(p, id, unix_sec.saturating_sub(1)));
        pipe.hgetall(bytes_key(p, id, limits.period_secs, period));
    }
    let hashes: Vec<HashMap<Vec<u8>, Vec<u8>>> = pipe.query(con)?;
    let live: HashSet<String> = fleet.status.lock().hosts.iter().map(|h| h.host.clone()).collect();
    let others = |h: &str| h != me;
    let live_others = |h: &str| h != me && live.contains(h);
    let mut rejected = Vec::new();
    let sums: Vec<(String, RemoteUsage)> = active
        .iter()
        .zip(hashes.chunks_exact(4))
        .map(|(id, h)| {
            let mut reject = |e: ValueError| rejected.push((flows_key(p, id), e));
            let flows = sum_fields(&h[0], live_others, &mut reject);
            let current = sum_fields(&h[1], others, &mut reject);
            let previous = sum_fields(&h[2], others, &mut reject);
            let bytes = if limits.bytes_per_period > 0 { sum_fields(&h[3], others, &mut reject) } else { 0 };
            // The last second: this second so far and the part of the
            // previous one it still covers.
            let recent = current.saturating_add(previous.saturating_mul(1000 - ms_into.min(1000)) / 1000);
            (id.clone(), RemoteUsage { flows, recent_new_flows: recent, bytes })
        })
        .collect();
    for (key, e) in &rejected {
        fleet.status.rejected(key, e);
    }
    let mut policy = fleet.policy.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = policy.quotas_mut().global_mut() {
        for (id, usage) in sums {
            g.set_remote(&id, usage);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_summed_and_garbage_refused() {
        let mut h = HashMap::new();
        h.insert(b"relay-a".to_vec(), b"3".to_vec());
        h.insert(b"relay-b".to_vec(), b"4".to_vec());
        h.insert(b"relay-c".to_vec(), b"lots".to_vec());
        h.insert(b"relay-d".to_vec(), b"-5".to_vec());
        h.insert(b"relay-e".to_vec(), format!("{}", MAX_FIELD_VALUE + 1).into_bytes());
        let mut refused = 0;
        assert_eq!(sum_fields(&h, |host| host != "relay-a", |_| refused += 1), 4);
        assert_eq!(refused, 3);
        let mut refused = 0;
        assert_eq!(sum_fields(&h, |host| host == "relay-a", |_| refused += 1), 3);
        assert_eq!(refused, 0, "hosts not counted are not parsed");
        assert_eq!(flows_key("masque:eu", "sub:alice"), "masque:eu:q:flows:sub:alice");
        assert_eq!(bytes_key("m:e", "tok:ab", 60, 7), "m:e:q:bytes:tok:ab:60:7");
    }
}

//! The worker's connect-ip side: what it knows of its TUN device (the
//! backend owns the device and does its reads and writes), the map from
//! assigned addresses to tunnels, and the ICMP rate limit. Packets for the
//! device go to the turn's output queue ([`crate::io::TunOut`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use relay_channel::region::Counter;

use super::config::IpTunnel;
use crate::context::Ctx;
use crate::tun::TunInfo;
use crate::tunnel::TunnelId;

/// ICMP errors a worker sends per second at most, in bursts of as many
/// (RFC 4443 section 2.4 (f), RFC 1812 section 4.3.2.8: errors are rate
/// limited).
const ICMP_PER_SECOND: f64 = 200.0;

/// A token bucket for ICMP errors.
#[derive(Debug)]
struct IcmpLimiter {
    tokens: f64,
    at: Option<Instant>,
}

impl IcmpLimiter {
    fn new() -> Self {
        Self { tokens: ICMP_PER_SECOND, at: None }
    }

    /// Whether one more error may go out at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = self.at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.at = Some(now);
        self.tokens = (self.tokens + elapsed * ICMP_PER_SECOND).min(ICMP_PER_SECOND);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The worker's connect-ip side.
#[derive(Debug)]
pub struct IpSide {
    tun: TunInfo,
    /// Assigned address -> tunnel, looked up for every packet read from
    /// the device. The addresses are control's assignments (a client
    /// cannot choose colliding ones): a fast hasher.
    by_addr: HashMap<IpAddr, TunnelId, foldhash::fast::RandomState>,
    icmp_limit: IcmpLimiter,
    /// Where GSO packets read from the device are cut into packets.
    segment: Vec<u8>,
}

impl IpSide {
    /// The side of a worker serving connect-ip through the device `tun`.
    pub fn new(tun: TunInfo) -> Self {
        Self { tun, by_addr: HashMap::default(), icmp_limit: IcmpLimiter::new(), segment: vec![0; 65_536] }
    }

    /// The device.
    pub fn tun(&self) -> &TunInfo {
        &self.tun
    }

    /// The worker's own address of a family (the source of its ICMP errors).
    pub fn own_address(&self, v4: bool) -> Option<IpAddr> {
        self.tun.own_address(v4)
    }

    /// Registers a tunnel's addresses under `owner`.
    pub fn register(&mut self, owner: TunnelId, t: &mut IpTunnel) {
        t.owner = Some(owner);
        for p in &t.addresses {
            self.by_addr.insert(p.addr, owner);
        }
    }

    /// Adds an address granted to a registered tunnel to the address map.
    pub fn register_address(&mut self, t: &IpTunnel, addr: IpAddr) {
        if let Some(owner) = t.owner {
            self.by_addr.insert(addr, owner);
        }
    }

    /// Forgets a tunnel's addresses where they still name it.
    pub fn unregister(&mut self, t: &IpTunnel) {
        for p in &t.addresses {
            if t.owner.is_some() && self.by_addr.get(&p.addr) == t.owner.as_ref() {
                self.by_addr.remove(&p.addr);
            }
        }
    }

    /// The tunnel an address is assigned to.
    pub fn owner_of(&self, dst: IpAddr) -> Option<TunnelId> {
        self.by_addr.get(&dst).copied()
    }

    /// Whether an ICMP error may go out at `now` (rate limit).
    pub fn icmp_allowed(&mut self, now: Instant) -> bool {
        self.icmp_limit.take(now)
    }

    /// Queues a packet for the device (written at the end of the turn);
    /// counted as dropped when the turn's queue is full.
    pub fn write(&self, packet: &[u8], ctx: &mut Ctx) -> bool {
        let queued = ctx.out.tun.push(packet);
        if !queued {
            ctx.count(Counter::DropQueueFull, 1);
        }
        queued
    }

    /// Takes the buffer GSO reads are cut in (so packets can be handled
    /// while the side is borrowed again).
    pub fn take_segment(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.segment)
    }

    /// Gives the buffer back.
    pub fn put_segment(&mut self, segment: Vec<u8>) {
        self.segment = segment;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn icmp_errors_are_rate_limited() {
        let mut l = IcmpLimiter::new();
        let t0 = Instant::now();
        let sent = (0..1000).filter(|_| l.take(t0)).count();
        assert_eq!(sent, ICMP_PER_SECOND as usize, "one burst");
        assert!(!l.take(t0));
        assert!(l.take(t0 + Duration::from_millis(10)), "tokens come back with time");
    }
}

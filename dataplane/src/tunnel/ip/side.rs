//! The worker's connect-ip side: its TUN device, the map from assigned
//! addresses to tunnels, the queue of client packets for the device and
//! the ICMP rate limit.
//!
//! Client packets that pass the checks are queued for the end of the turn
//! when the device has offloads (bounded: [`QUEUE_PACKETS`] packets /
//! [`QUEUE_BYTES`] bytes, then written early), so runs of one TCP flow go
//! out as one GSO write; they leave in the turn they arrived in (RFC 9298
//! section 6 asks intermediaries not to delay datagrams).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use relay_proto::channel::region::{Counter, Counters};
use relay_proto::ip::offload;
use tracing::debug;

use super::config::IpTunnel;
use crate::tun::{Offloads, WorkerTun};
use crate::tunnel::TunnelId;

/// Client packets a turn queues for the TUN device at most (then they are
/// written before more are queued).
pub const QUEUE_PACKETS: usize = 128;
/// Bytes of client packets a turn queues for the TUN device at most.
pub const QUEUE_BYTES: usize = 256 * 1024;

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

/// Client packets waiting for the end of the turn's TUN writes.
#[derive(Debug, Default)]
struct TunQueue {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl TunQueue {
    fn fits(&self, len: usize) -> bool {
        self.ends.len() < QUEUE_PACKETS && self.bytes.len() + len <= QUEUE_BYTES
    }

    fn push(&mut self, packet: &[u8]) {
        self.bytes.extend_from_slice(packet);
        self.ends.push(self.bytes.len());
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// The worker's connect-ip side.
#[derive(Debug)]
pub struct IpSide {
    tun: WorkerTun,
    /// Assigned address -> tunnel.
    by_addr: HashMap<IpAddr, TunnelId>,
    icmp_limit: IcmpLimiter,
    /// Client packets for the device, written at the end of the turn.
    queued: TunQueue,
    /// One read from the device.
    buf: Vec<u8>,
    /// Where GSO packets read from the device are cut into packets.
    segment: Vec<u8>,
}

impl IpSide {
    /// The side of a worker serving connect-ip through `tun`.
    pub fn new(tun: WorkerTun) -> Self {
        Self {
            tun,
            by_addr: HashMap::new(),
            icmp_limit: IcmpLimiter::new(),
            queued: TunQueue::default(),
            buf: vec![0; offload::VNET_HDR_LEN + 65_536],
            segment: vec![0; 65_536],
        }
    }

    /// The device.
    pub fn tun(&self) -> &WorkerTun {
        &self.tun
    }

    /// The offloads the device has.
    pub fn offloads(&self) -> Offloads {
        self.tun.offloads()
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

    /// Writes a checked client packet to the device (queued for the end of
    /// the turn when the device has offloads).
    pub fn write(&mut self, counters: &Counters, packet: &[u8]) {
        if self.tun.offloads().vnet_header {
            if !self.queued.fits(packet.len()) {
                self.flush_writes(counters);
            }
            self.queued.push(packet);
            return;
        }
        match self.tun.write(packet) {
            Ok(()) => counters.add(Counter::TunPacketsOut, 1),
            Err(e) => {
                debug!("TUN write: {e}");
                counters.add(Counter::DropTargetSend, 1);
            }
        }
    }

    /// Writes a packet of the relay's own (an ICMP error) at once.
    pub fn write_now(&mut self, packet: &[u8]) -> bool {
        self.tun.write(packet).is_ok()
    }

    /// Writes the queued client packets, runs of one TCP flow coalesced
    /// into GSO packets. A coalesced write the kernel refuses is retried
    /// one packet at a time, so a kernel that will not take our GSO packets
    /// costs speed, not packets.
    pub fn flush_writes(&mut self, counters: &Counters) {
        if self.queued.is_empty() {
            return;
        }
        let mut packets: [&[u8]; QUEUE_PACKETS] = [&[]; QUEUE_PACKETS];
        let mut start = 0;
        for (slot, &end) in packets.iter_mut().zip(&self.queued.ends) {
            *slot = &self.queued.bytes[start..end];
            start = end;
        }
        let tun = &self.tun;
        offload::coalesce(&packets[..self.queued.ends.len()], |planned| {
            let count = planned.packets.len() as u64;
            match tun.write_planned(planned) {
                Ok(()) if count > 1 => {
                    counters.add(Counter::TunGsoWrites, 1);
                    counters.add(Counter::TunCoalescedPackets, count);
                    counters.add(Counter::TunPacketsOut, count);
                }
                Ok(()) => counters.add(Counter::TunPacketsOut, 1),
                Err(e) if count > 1 => {
                    debug!("TUN GSO write of {count} packets: {e}; writing them one by one");
                    for packet in planned.packets {
                        match tun.write(packet) {
                            Ok(()) => counters.add(Counter::TunPacketsOut, 1),
                            Err(_) => counters.add(Counter::DropTargetSend, 1),
                        }
                    }
                }
                Err(e) => {
                    debug!("TUN write: {e}");
                    counters.add(Counter::DropTargetSend, 1);
                }
            }
        });
        self.queued.clear();
    }

    /// Takes the read buffers (one read, and the GSO cutting buffer) so
    /// packets can be handled while the side is borrowed again.
    pub fn take_buffers(&mut self) -> (Vec<u8>, Vec<u8>) {
        (std::mem::take(&mut self.buf), std::mem::take(&mut self.segment))
    }

    /// Gives the read buffers back.
    pub fn put_buffers(&mut self, buf: Vec<u8>, segment: Vec<u8>) {
        self.buf = buf;
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

    #[test]
    fn the_write_queue_is_bounded() {
        let mut q = TunQueue::default();
        for _ in 0..QUEUE_PACKETS {
            assert!(q.fits(100));
            q.push(&[0; 100]);
        }
        assert!(!q.fits(1));
        q.clear();
        assert!(q.is_empty() && q.fits(QUEUE_BYTES) && !q.fits(QUEUE_BYTES + 1));
    }
}

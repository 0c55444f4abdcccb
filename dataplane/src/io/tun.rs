//! The backends' I/O on a worker's TUN device (connect-ip): reads handed
//! to the core one by one, and the core's queued packets written at the
//! end of the turn, runs of one TCP flow coalesced into GSO writes
//! ([`relay_proto::ip::offload::coalesce`]) when the device has offloads.
//! Both backends use it: the device is watched for readiness (an io_uring
//! multishot poll, or epoll) and read with plain `read` calls.

use relay_proto::ip::offload;
use tracing::debug;

use super::{Handler, IoStats, TunOut};
use crate::tun::TunDevice;

/// Reads from the device per turn at most (each up to a 64 KiB GSO packet).
pub const READ_BUDGET: usize = 64;
/// Packets coalesced per planning round (the virtio-net header's bound on
/// segments is far higher; this bounds the iovec).
const PLAN_PACKETS: usize = 128;

/// Reads the device until it is empty or the budget is spent, handing each
/// read to the core. Returns whether the budget ran out first (then the
/// device is read again next turn without a readiness event: it is
/// edge-triggered).
pub fn read<H: Handler>(dev: &TunDevice, buf: &mut [u8], h: &mut H, stats: &mut IoStats) -> bool {
    for _ in 0..READ_BUDGET {
        stats.syscalls += 1;
        match dev.read(buf) {
            Ok(Some(n)) => h.on_tun(&mut buf[..n]),
            Ok(None) => return false,
            // One packet the kernel could not hand over (it is gone): the
            // rest of the queue is still there to read.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EMSGSIZE | libc::EINVAL)) => {
                debug!("TUN read: {e}");
                stats.tun_read_errors += 1;
            }
            Err(e) => {
                debug!("TUN read: {e}");
                return false;
            }
        }
    }
    true
}

/// Writes the queued packets. A coalesced write the kernel refuses is
/// retried one packet at a time, so a kernel that will not take our GSO
/// packets costs speed, not packets.
pub fn write(dev: &TunDevice, out: &mut TunOut, stats: &mut IoStats) {
    if out.is_empty() {
        return;
    }
    if !dev.offloads().vnet_header {
        for packet in out.packets() {
            stats.syscalls += 1;
            match dev.write(packet) {
                Ok(()) => stats.tun_packets_out += 1,
                Err(e) => {
                    debug!("TUN write: {e}");
                    stats.tun_write_drops += 1;
                }
            }
        }
        out.clear();
        return;
    }
    plan_writes(dev, out, stats);
    out.clear();
}

/// Writes the queued packets of a device with offloads, coalesced.
fn plan_writes(dev: &TunDevice, out: &TunOut, stats: &mut IoStats) {
    let mut plan: [&[u8]; PLAN_PACKETS] = [&[]; PLAN_PACKETS];
    let mut packets = out.packets().peekable();
    while packets.peek().is_some() {
        let mut n = 0;
        for (slot, p) in plan.iter_mut().zip(packets.by_ref()) {
            *slot = p;
            n += 1;
        }
        offload::coalesce(&plan[..n], |planned| {
            let count = planned.packets.len() as u64;
            stats.syscalls += 1;
            match dev.write_planned(planned) {
                Ok(()) if count > 1 => {
                    stats.tun_gso_writes += 1;
                    stats.tun_coalesced_packets += count;
                    stats.tun_packets_out += count;
                }
                Ok(()) => stats.tun_packets_out += 1,
                Err(e) if count > 1 => {
                    debug!("TUN GSO write of {count} packets: {e}; writing them one by one");
                    for packet in planned.packets {
                        stats.syscalls += 1;
                        match dev.write(packet) {
                            Ok(()) => stats.tun_packets_out += 1,
                            Err(_) => stats.tun_write_drops += 1,
                        }
                    }
                }
                Err(e) => {
                    debug!("TUN write: {e}");
                    stats.tun_write_drops += 1;
                }
            }
        });
    }
}

//! A connect-ip client (RFC 9484): opens an IP tunnel through the relay,
//! applies the assigned addresses and advertised routes to a local TUN
//! device, and moves packets between the device and the tunnel.
//!
//! Used by the end-to-end tests (in network namespaces) and by operators:
//! `masque-client ip --relay localhost:4433 --ca state/cert.pem --token-file state/token --device mqc0`.
//! Creating the device needs CAP_NET_ADMIN.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use relay_dataplane::tun::{TunDevice, TunRead};
use relay_proto::ip::capsule::{self as ipcap, IpAddressRange, IpCapsule, IpPrefix, RequestedAddress};
use relay_proto::ip::offload;
use relay_proto::template::IpUriTemplate;

use crate::client::{Answer, Client};

/// The default connect-ip URI template.
pub const DEFAULT_IP_TEMPLATE: &str = "/.well-known/masque/ip/{target}/{ipproto}/";

/// What the relay configured for the tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpConfig {
    /// Addresses assigned to us.
    pub addresses: Vec<IpPrefix>,
    /// Where we may send.
    pub routes: Vec<IpAddressRange>,
}

/// An open connect-ip tunnel on a client connection.
pub struct IpTunnel {
    /// The request stream.
    pub stream_id: u64,
    /// Addresses and routes from the relay.
    pub config: IpConfig,
    /// Answers to our address requests that were rejections.
    pub rejected: Vec<u64>,
}

/// Opens a tunnel scoped to `target` (`*`, an address, a prefix or a name)
/// and `ipproto` (`*` or a number), asks for one IPv4 and one IPv6 address
/// (any), and waits for the relay's assignment and routes.
pub fn open(
    client: &mut Client,
    template: &str,
    target: &str,
    ipproto: &str,
    timeout: Duration,
) -> Result<IpTunnel> {
    let template = IpUriTemplate::parse(template).map_err(|e| anyhow!("connect-ip template: {e}"))?;
    let mut headers = client.connect_udp_headers("x", 1);
    for (name, value) in headers.iter_mut() {
        match name.as_str() {
            ":protocol" => *value = "connect-ip".into(),
            ":path" => *value = template.expand_ip(target, ipproto),
            _ => {}
        }
    }
    let stream_id = client.send_raw_request(&headers, false)?;
    // RFC 9484 section 4.7.1: an endpoint that needs an address MUST ask.
    let requests = vec![
        RequestedAddress { request_id: 1, prefix: IpPrefix::host("0.0.0.0".parse().expect("literal")) },
        RequestedAddress { request_id: 2, prefix: IpPrefix::host("::".parse().expect("literal")) },
    ];
    let mut capsule = Vec::new();
    ipcap::encode(&IpCapsule::AddressRequest(requests), &mut capsule);
    client.send_stream_bytes(stream_id, &capsule, false)?;
    match client.wait_answer(stream_id, timeout)? {
        a @ Answer::Response(_) if a.status().is_some_and(|s| (200..300).contains(&s)) => {}
        other => bail!("connect-ip refused: {}", other.describe()),
    }
    let deadline = Instant::now() + timeout;
    let mut config = IpConfig::default();
    let mut answered = Vec::new();
    let mut rejected = Vec::new();
    let mut got_routes = false;
    while answered.len() < 2 || !got_routes {
        if Instant::now() >= deadline {
            bail!("the relay sent no address assignment and routes in time (got {config:?})");
        }
        client.drive(Duration::from_millis(10))?;
        for (capsule_type, value) in client.take_control_capsules(stream_id) {
            match ipcap::decode(capsule_type, &value).context("capsule from the relay")? {
                Some(IpCapsule::AddressAssign(list)) => {
                    // Each ADDRESS_ASSIGN carries the full list.
                    config.addresses.clear();
                    for a in list {
                        if a.request_id != 0 && !answered.contains(&a.request_id) {
                            answered.push(a.request_id);
                        }
                        if a.prefix.is_unspecified() {
                            rejected.push(a.request_id);
                        } else if !config.addresses.contains(&a.prefix) {
                            config.addresses.push(a.prefix);
                        }
                    }
                }
                Some(IpCapsule::RouteAdvertisement(ranges)) => {
                    config.routes = ranges;
                    got_routes = true;
                }
                Some(IpCapsule::AddressRequest(_)) | None => {}
            }
        }
        if client.stream_finished(stream_id) {
            bail!("the relay ended the tunnel");
        }
    }
    Ok(IpTunnel { stream_id, config, rejected })
}

/// The prefixes that exactly cover `start..=end` (inclusive, one family).
pub fn range_to_prefixes(start: IpAddr, end: IpAddr) -> Vec<IpPrefix> {
    let (v4, bits) = (start.is_ipv4(), if start.is_ipv4() { 32u32 } else { 128 });
    let value = |ip: IpAddr| match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let to_ip = |x: u128| -> IpAddr {
        if v4 { std::net::Ipv4Addr::from(x as u32).into() } else { std::net::Ipv6Addr::from(x).into() }
    };
    // The last address of the 2^k block starting at `lo`, if it exists.
    let block_end = |lo: u128, k: u32| -> Option<u128> {
        if k >= 128 { (lo == 0).then_some(u128::MAX) } else { lo.checked_add((1u128 << k) - 1) }
    };
    let (mut lo, hi) = (value(start), value(end));
    let mut out = Vec::new();
    loop {
        // The largest aligned block starting at `lo` that ends within `hi`.
        let mut k = if lo == 0 { bits } else { lo.trailing_zeros().min(bits) };
        while k > 0 && block_end(lo, k).is_none_or(|e| e > hi) {
            k -= 1;
        }
        out.push(IpPrefix::new(to_ip(lo), (bits - k) as u8).expect("aligned block"));
        let end = block_end(lo, k).expect("fits");
        if end >= hi {
            return out;
        }
        lo = end + 1;
    }
}

fn ip_cmd(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A local TUN device configured from a tunnel, with the kernel's
/// offloads where it grants them (GSO reads cut into the tunnel's packets,
/// runs of one TCP flow written as one GSO packet).
pub struct ClientTun {
    dev: TunDevice,
}

impl ClientTun {
    /// Creates `device` with `mtu`, assigns the tunnel's addresses and adds
    /// routes for the advertised ranges that fall inside `only` (every
    /// advertised range when `only` is empty; never a route that would
    /// carry the relay's own address).
    pub fn create(
        device: &str,
        mtu: u32,
        config: &IpConfig,
        only: &[IpPrefix],
        relay: IpAddr,
    ) -> Result<Self> {
        let dev = TunDevice::open(device, true).context("creating the TUN device")?;
        ip_cmd(&["link", "set", "dev", device, "mtu", &mtu.to_string(), "up"])?;
        for a in &config.addresses {
            let p = format!("{}/{}", a.addr, a.len);
            if a.addr.is_ipv4() {
                ip_cmd(&["addr", "replace", &p, "dev", device])?;
            } else {
                ip_cmd(&["-6", "addr", "replace", &p, "dev", device, "nodad"])?;
            }
        }
        for r in &config.routes {
            for p in range_to_prefixes(r.start, r.end) {
                if p.contains(relay) {
                    continue;
                }
                let wanted = only.is_empty()
                    || only.iter().any(|o| {
                        o.addr.is_ipv4() == p.addr.is_ipv4() && o.contains(p.addr) && o.len <= p.len
                    });
                if wanted {
                    let dest = format!("{}/{}", p.addr, p.len);
                    let family = if p.addr.is_ipv4() { "-4" } else { "-6" };
                    ip_cmd(&[family, "route", "replace", &dest, "dev", device])?;
                }
            }
        }
        Ok(Self { dev })
    }
}

/// Traffic moved by [`pump`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    /// Packets from the device into the tunnel.
    pub up: u64,
    /// Packets from the tunnel onto the device.
    pub down: u64,
    /// Packets the tunnel had no room for.
    pub dropped: u64,
}

/// Moves packets between `tun` and the tunnel until `stop` is set,
/// `duration` has passed, or the relay ends the tunnel.
pub fn pump(
    client: &mut Client,
    tunnel: &IpTunnel,
    tun: &ClientTun,
    stop: &AtomicBool,
    duration: Option<Duration>,
) -> Result<PumpStats> {
    client.watch_fd(tun.dev.as_raw_fd())?;
    let deadline = duration.map(|d| Instant::now() + d);
    let mut stats = PumpStats::default();
    let mut buf = vec![0u8; offload::VNET_HDR_LEN + 65_536];
    let mut segment = vec![0u8; 65_536];
    let mut backlog: VecDeque<Vec<u8>> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        client.drive(Duration::from_millis(5))?;
        while backlog.len() < 1024 {
            match tun.dev.read_packets(&mut buf, &mut segment, |p| backlog.push_back(p.to_vec())) {
                Ok(TunRead::Empty) => break,
                Ok(TunRead::Packets(_)) => {}
                Ok(TunRead::Malformed(_)) => stats.dropped += 1,
                Err(e) => return Err(e).context("reading the TUN device"),
            }
        }
        while let Some(p) = backlog.front() {
            if client.max_datagram_payload(tunnel.stream_id).is_some_and(|m| p.len() + 1 > m) {
                backlog.pop_front();
                stats.dropped += 1;
                continue;
            }
            if !client.send_context_datagram(tunnel.stream_id, 0, p)? {
                break; // QUIC's queue is full: try again next turn
            }
            backlog.pop_front();
            stats.up += 1;
        }
        client.flush()?;
        let down = client.take_datagrams(tunnel.stream_id);
        if tun.dev.offloads().vnet_header {
            let packets: Vec<&[u8]> = down.iter().map(Vec::as_slice).collect();
            offload::coalesce(&packets, |planned| {
                if tun.dev.write_planned(planned).is_ok() {
                    stats.down += planned.packets.len() as u64;
                } else if planned.packets.len() > 1 {
                    // The kernel refused the GSO packet: one at a time.
                    stats.down += planned.packets.iter().filter(|p| tun.dev.write(p).is_ok()).count() as u64;
                }
            });
        } else {
            for packet in &down {
                if tun.dev.write(packet).is_ok() {
                    stats.down += 1;
                }
            }
        }
        if client.stream_finished(tunnel.stream_id) {
            break;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes(a: &str, b: &str) -> Vec<String> {
        range_to_prefixes(a.parse().unwrap(), b.parse().unwrap()).iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn ranges_become_minimal_prefix_lists() {
        assert_eq!(prefixes("10.0.0.0", "10.0.0.255"), ["10.0.0.0/24"]);
        assert_eq!(
            prefixes("10.0.0.1", "10.0.0.6"),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(prefixes("0.0.0.0", "255.255.255.255"), ["0.0.0.0/0"]);
        assert_eq!(
            prefixes("1.0.0.0", "9.255.255.255"),
            ["1.0.0.0/8", "2.0.0.0/7", "4.0.0.0/6", "8.0.0.0/7"]
        );
        assert_eq!(prefixes("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), ["::/0"]);
        assert_eq!(prefixes("2000::", "3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), ["2000::/3"]);
        assert_eq!(prefixes("fd00::1", "fd00::1"), ["fd00::1/128"]);
    }
}

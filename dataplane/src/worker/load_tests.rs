//! Steady loads through the worker core, in rounds, every datagram or
//! packet checked at the other end: connect-udp (four tunnels on one
//! connection, datagrams up to the targets and down to the client) and
//! connect-ip (one IPv4 tunnel, 1280-byte packets up to the TUN device and
//! down from it).
//!
//! As tests they check that a long run loses, reorders and corrupts
//! nothing (20 rounds by default). `cargo xtask instr` runs them for more
//! rounds (`RELAY_LOAD_ROUNDS`) under callgrind, collecting only inside
//! [`super::harness::worker_call`], to count the instructions the worker
//! spends per datagram: a figure that, unlike time on a shared machine,
//! does not move between runs of the same code.

use std::collections::HashMap;

use relay_proto::channel::bootstrap::MtuProbe;
use relay_proto::channel::record::{IpAssignment, IpRoute, TunnelProtocol, Verdict};

use super::harness::{Harness, bootstrap, ip_bootstrap};

/// Tunnels on the one connection.
const TUNNELS: u16 = 4;
/// Datagrams per tunnel per round: a round is one GRO-sized batch.
const PER_TUNNEL: usize = 10;

fn rounds() -> usize {
    std::env::var("RELAY_LOAD_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// A payload that names its tunnel, round and index, so that a lost,
/// repeated, reordered or misrouted datagram shows.
fn payload(size: usize, tunnel: usize, round: usize, i: usize) -> Vec<u8> {
    let mut p = vec![(tunnel as u8) ^ 0x5a; size];
    let tag = ((round * PER_TUNNEL + i) as u32).to_be_bytes();
    p[..4].copy_from_slice(&tag);
    p[4] = tunnel as u8;
    p
}

/// Opens the tunnels: (request stream, endpoint key) per tunnel, in
/// order.
fn open_tunnels(h: &mut Harness) -> Vec<(u64, u64)> {
    h.connect();
    let mut streams = Vec::new();
    for t in 0..TUNNELS {
        let port = 9000 + t;
        let stream = h.client.connect_udp("127.0.0.1", port);
        h.run();
        let asks = h.control.take_asks();
        assert_eq!(asks.len(), 1, "{asks:?}");
        assert_eq!(asks[0].protocol, TunnelProtocol::ConnectUdp);
        h.control.allow(&asks[0], u64::from(t) + 1, format!("127.0.0.1:{port}").parse().unwrap());
        h.run();
        assert_eq!(h.client.status(stream), Some(200));
        streams.push((stream, port));
    }
    let by_port: HashMap<u16, u64> = h.endpoints.opened.iter().map(|(k, a)| (a.port(), *k)).collect();
    streams.into_iter().map(|(s, port)| (s, by_port[&port])).collect()
}

/// `rounds()` rounds of `PER_TUNNEL` datagrams of `size` bytes from the
/// client on every tunnel; returns how many arrived.
fn upload(size: usize) -> usize {
    let mut h = Harness::new(bootstrap(1));
    let tunnels = open_tunnels(&mut h);
    let mut delivered = 0;
    for round in 0..rounds() {
        for (t, (stream, _)) in tunnels.iter().enumerate() {
            for i in 0..PER_TUNNEL {
                h.client.send_datagram(*stream, &payload(size, t, round, i));
            }
        }
        h.run();
        for (t, (_, key)) in tunnels.iter().enumerate() {
            let sent = h.endpoints.sent.remove(key).unwrap_or_default();
            let want: Vec<_> = (0..PER_TUNNEL).map(|i| payload(size, t, round, i)).collect();
            assert_eq!(sent, want, "round {round}, tunnel {t}: what the target got");
            delivered += sent.len();
        }
    }
    delivered
}

/// `rounds()` rounds of `PER_TUNNEL` datagrams of `size` bytes from every
/// tunnel's target, one receive (GRO batch) each; returns how many arrived.
fn download(size: usize) -> usize {
    let mut h = Harness::new(bootstrap(1));
    let tunnels = open_tunnels(&mut h);
    let mut delivered = 0;
    for round in 0..rounds() {
        for (t, (_, key)) in tunnels.iter().enumerate() {
            let batch: Vec<u8> = (0..PER_TUNNEL).flat_map(|i| payload(size, t, round, i)).collect();
            h.from_target_batch(*key, &batch, size);
        }
        let got = std::mem::take(&mut h.client.datagrams);
        for (t, (stream, _)) in tunnels.iter().enumerate() {
            let on_tunnel: Vec<_> =
                got.iter().filter(|(s, c, _)| s == stream && *c == 0).map(|(_, _, p)| p.clone()).collect();
            let want: Vec<_> = (0..PER_TUNNEL).map(|i| payload(size, t, round, i)).collect();
            assert_eq!(on_tunnel, want, "round {round}, tunnel {t}: what the client got");
        }
        assert_eq!(got.len(), PER_TUNNEL * tunnels.len(), "round {round}: nothing else arrived");
        delivered += got.len();
    }
    delivered
}

#[test]
fn load_upload_1200_every_datagram_reaches_its_target_in_order() {
    assert_eq!(upload(1200), rounds() * PER_TUNNEL * usize::from(TUNNELS));
}

#[test]
fn load_upload_64_every_datagram_reaches_its_target_in_order() {
    assert_eq!(upload(64), rounds() * PER_TUNNEL * usize::from(TUNNELS));
}

#[test]
fn load_download_1200_every_datagram_reaches_the_client_in_order() {
    assert_eq!(download(1200), rounds() * PER_TUNNEL * usize::from(TUNNELS));
}

#[test]
fn load_download_64_every_datagram_reaches_the_client_in_order() {
    assert_eq!(download(64), rounds() * PER_TUNNEL * usize::from(TUNNELS));
}

/// The connect-ip client's address.
const IP_CLIENT: [u8; 4] = [10, 89, 0, 2];
/// A host on the Internet side of the TUN device.
const IP_REMOTE: [u8; 4] = [93, 184, 216, 34];
/// Packets per round in the connect-ip loads.
const IP_PER_ROUND: usize = 40;
/// The TUN MTU of the harness.
const IP_PACKET: usize = 1280;

/// An IPv4 UDP packet of `IP_PACKET` bytes from `src` to `dst` whose
/// payload names its round and index; the header checksum is valid.
fn ipv4_udp(src: [u8; 4], dst: [u8; 4], round: usize, i: usize) -> Vec<u8> {
    let mut p = vec![0u8; IP_PACKET];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(IP_PACKET as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    set_header_checksum(&mut p);
    // UDP: ports, length, no checksum (zero is allowed over IPv4).
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&443u16.to_be_bytes());
    p[24..26].copy_from_slice(&((IP_PACKET - 20) as u16).to_be_bytes());
    p[28..32].copy_from_slice(&((round * IP_PER_ROUND + i) as u32).to_be_bytes());
    p
}

/// Writes the IPv4 header checksum of `p` (its field zero before).
fn set_header_checksum(p: &mut [u8]) {
    let sum = p[..20].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// What must reach the client of a packet read from the TUN device: the
/// same packet with its TTL one lower and a header checksum that matches
/// (RFC 9484 section 7.2: the hop is counted right before encapsulation;
/// packets from the client go to the TUN device as they came, the kernel
/// counts that hop).
fn forwarded(sent: &[u8]) -> Vec<u8> {
    let mut p = sent.to_vec();
    p[8] -= 1;
    p[10..12].copy_from_slice(&[0, 0]);
    set_header_checksum(&mut p);
    p
}

/// (length, TTL, sequence) of each packet: what a failed comparison
/// prints.
fn summary(packets: &[Vec<u8>]) -> Vec<(usize, u8, u32)> {
    packets
        .iter()
        .map(|p| {
            (
                p.len(),
                p.get(8).copied().unwrap_or(0),
                p.get(28..32).map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap())),
            )
        })
        .collect()
}

/// Opens a connect-ip tunnel whose client holds `IP_CLIENT`, routed
/// everywhere; returns its stream.
fn open_ip_tunnel(h: &mut Harness) -> u64 {
    h.connect();
    let stream = h.client.connect_ip("*", "*");
    h.run();
    let ask = h.control.take_asks().remove(0);
    assert_eq!(ask.protocol, TunnelProtocol::ConnectIp);
    let verdict = Verdict::AllowIp {
        flow_id: 21,
        idle_timeout_ms: 600_000,
        byte_budget: 0,
        identity: "sub:load".into(),
        addresses: vec![IpAssignment { addr: IP_CLIENT.into(), len: 32 }],
        routes: vec![IpRoute {
            start: "0.0.0.0".parse().unwrap(),
            end: "255.255.255.255".parse().unwrap(),
            protocol: 0,
        }],
    };
    h.control.answer(&ask, verdict);
    h.run();
    assert_eq!(h.client.status(stream), Some(200));
    stream
}

/// `rounds()` rounds of `IP_PER_ROUND` packets from the client to the
/// TUN device; returns how many arrived.
fn ip_upload() -> usize {
    let mut h = Harness::new(ip_bootstrap(MtuProbe::Off));
    let stream = open_ip_tunnel(&mut h);
    let mut delivered = 0;
    for round in 0..rounds() {
        let sent: Vec<_> = (0..IP_PER_ROUND).map(|i| ipv4_udp(IP_CLIENT, IP_REMOTE, round, i)).collect();
        for p in &sent {
            h.client.send_datagram(stream, p);
        }
        h.run();
        let written = std::mem::take(&mut h.tun_written);
        assert_eq!(summary(&written), summary(&sent), "round {round}: what the TUN device got");
        assert!(written == sent, "round {round}: the packets' bytes");
        delivered += written.len();
    }
    delivered
}

/// `rounds()` rounds of `IP_PER_ROUND` packets read from the TUN device
/// for the client; returns how many arrived.
fn ip_download() -> usize {
    let mut h = Harness::new(ip_bootstrap(MtuProbe::Off));
    let stream = open_ip_tunnel(&mut h);
    let mut delivered = 0;
    for round in 0..rounds() {
        let read: Vec<_> = (0..IP_PER_ROUND).map(|i| ipv4_udp(IP_REMOTE, IP_CLIENT, round, i)).collect();
        h.from_tun(&read);
        let got: Vec<_> = std::mem::take(&mut h.client.datagrams)
            .into_iter()
            .map(|(s, c, p)| {
                assert_eq!((s, c), (stream, 0), "round {round}: on the tunnel's stream, context 0");
                p
            })
            .collect();
        let want: Vec<_> = read.iter().map(|p| forwarded(p)).collect();
        assert_eq!(summary(&got), summary(&want), "round {round}: what the client got");
        assert!(got == want, "round {round}: the packets' bytes");
        delivered += got.len();
    }
    delivered
}

#[test]
fn load_ip_upload_1280_every_packet_reaches_the_tun_device_in_order() {
    assert_eq!(ip_upload(), rounds() * IP_PER_ROUND);
}

#[test]
fn load_ip_download_1280_every_packet_reaches_the_client_in_order() {
    assert_eq!(ip_download(), rounds() * IP_PER_ROUND);
}

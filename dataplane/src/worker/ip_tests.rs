//! connect-ip on the worker core: the tunnel link's IPv6 MTU check (RFC
//! 9484 section 7.2) and the link-local traffic that never leaves the link,
//! on the harness's virtual clock.

use std::net::Ipv6Addr;
use std::time::Duration;

use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::MtuProbe;
use relay_proto::channel::record::{IpAssignment, IpRoute, TunnelProtocol, Verdict};
use relay_proto::ip::echo::{self, EchoKind, TUNNEL_LINK_LOCAL};

use super::harness::{Harness, ip_bootstrap};

const CLIENT_V6: &str = "fd89::2";
const CLIENT_V4: &str = "10.89.0.2";

fn counter(h: &Harness, c: Counter) -> u64 {
    h.worker.ctx.link.counters().get(c)
}

/// A harness with an open connect-ip tunnel (flow 21) whose client holds
/// `CLIENT_V4` and, if `v6`, `CLIENT_V6`, routed everywhere. Returns the
/// stream.
fn open_ip_tunnel(h: &mut Harness, v6: bool) -> u64 {
    h.connect();
    let stream = h.client.connect_ip("*", "*");
    h.run();
    let ask = h.control.take_asks().remove(0);
    assert_eq!(ask.protocol, TunnelProtocol::ConnectIp);
    let mut addresses = vec![IpAssignment { addr: CLIENT_V4.parse().unwrap(), len: 32 }];
    let mut routes = vec![IpRoute {
        start: "0.0.0.0".parse().unwrap(),
        end: "255.255.255.255".parse().unwrap(),
        protocol: 0,
    }];
    if v6 {
        addresses.push(IpAssignment { addr: CLIENT_V6.parse().unwrap(), len: 128 });
        routes.push(IpRoute {
            start: "::".parse().unwrap(),
            end: Ipv6Addr::from(u128::MAX).into(),
            protocol: 0,
        });
    }
    let verdict = Verdict::AllowIp {
        flow_id: 21,
        idle_timeout_ms: 600_000,
        byte_budget: 0,
        identity: "sub:t".into(),
        addresses,
        routes,
    };
    h.control.answer(&ask, verdict);
    h.run();
    assert_eq!(h.client.status(stream), Some(200));
    stream
}

/// The link MTU probes the client received so far: (identifier, sequence,
/// packet).
fn probes(h: &Harness, stream: u64) -> Vec<(u16, u16, Vec<u8>)> {
    h.client
        .datagrams
        .iter()
        .filter(|(s, c, _)| *s == stream && *c == 0)
        .filter_map(|(_, _, p)| echo::parse(p).filter(|e| e.kind == EchoKind::Request).map(|e| (e, p)))
        .map(|(e, p)| {
            assert_eq!((e.src, e.dst), (TUNNEL_LINK_LOCAL, CLIENT_V6.parse().unwrap()));
            (e.identifier, e.sequence, p.clone())
        })
        .collect()
}

/// Steps the clock a second at a time, `seconds` times.
fn seconds(h: &mut Harness, seconds: u32) {
    for _ in 0..seconds {
        h.advance(Duration::from_secs(1));
        h.run();
    }
}

#[test]
fn an_ipv6_tunnel_is_probed_with_1280_byte_echoes_and_a_full_reply_keeps_it() {
    let mut h = Harness::new(ip_bootstrap(MtuProbe::Echo));
    let stream = open_ip_tunnel(&mut h, true);
    let sent = probes(&h, stream);
    assert_eq!(sent.len(), 1, "a probe at once");
    let (_, sequence, probe) = &sent[0];
    assert_eq!((*sequence, probe.len()), (1, 1280), "1232 bytes of data");
    assert_eq!(counter(&h, Counter::IpMtuProbesSent), 1);
    // The client's IP stack answers, from its address to the relay's end
    // of the link.
    let reply = echo::reply(probe, CLIENT_V6.parse().unwrap()).unwrap();
    h.client.send_datagram(stream, &reply);
    h.run();
    assert_eq!(counter(&h, Counter::IpMtuProbesConfirmed), 1);
    assert!(h.tun_written.is_empty(), "the reply stays on the link");
    seconds(&mut h, 10);
    assert_eq!(probes(&h, stream).len(), 1, "no probe after the reply");
    assert!(!h.client.reset.contains(&stream) && !h.client.finished.contains(&stream));
    assert_eq!(counter(&h, Counter::IpMtuProbeFailures), 0);
}

#[test]
fn a_tunnel_whose_link_never_answers_is_torn_down_after_the_timeout() {
    let mut h = Harness::new(ip_bootstrap(MtuProbe::Echo));
    let stream = open_ip_tunnel(&mut h, true);
    seconds(&mut h, 4);
    assert!(!h.client.reset.contains(&stream), "still probing within the timeout");
    let sent = probes(&h, stream);
    assert_eq!(sent.iter().map(|p| p.1).collect::<Vec<_>>(), [1, 2, 3, 4, 5], "one probe a second");
    // A reply that is not a full copy of a probe proves nothing.
    let mut short = echo::reply(&sent[0].2, CLIENT_V6.parse().unwrap()).unwrap();
    short.truncate(1000);
    let len = (short.len() - 40) as u16;
    short[4..6].copy_from_slice(&len.to_be_bytes());
    h.client.send_datagram(stream, &short);
    seconds(&mut h, 1);
    assert!(h.client.reset.contains(&stream), "RFC 9484 section 7.2: torn down");
    assert_eq!(h.client.reset_codes[&stream], 0x10c, "H3_REQUEST_CANCELLED");
    assert_eq!(counter(&h, Counter::IpMtuProbeFailures), 1);
    assert_eq!(counter(&h, Counter::IpMtuProbesConfirmed), 0);
    assert_eq!(h.control.closed_flows()[0].flow_id, 21);
}

#[test]
fn ipv4_only_tunnels_and_operators_who_turned_the_check_off_are_not_probed() {
    let mut h = Harness::new(ip_bootstrap(MtuProbe::Echo));
    let stream = open_ip_tunnel(&mut h, false);
    seconds(&mut h, 8);
    assert!(probes(&h, stream).is_empty());
    assert!(!h.client.reset.contains(&stream));

    let mut h = Harness::new(ip_bootstrap(MtuProbe::Off));
    let stream = open_ip_tunnel(&mut h, true);
    seconds(&mut h, 8);
    assert!(probes(&h, stream).is_empty());
    assert!(!h.client.reset.contains(&stream));
    assert_eq!(counter(&h, Counter::IpMtuProbesSent), 0);
}

#[test]
fn the_relay_answers_echoes_to_its_end_of_the_link_and_keeps_link_local_traffic_off_the_tun() {
    let mut h = Harness::new(ip_bootstrap(MtuProbe::Off));
    let stream = open_ip_tunnel(&mut h, true);
    let client: Ipv6Addr = CLIENT_V6.parse().unwrap();
    // The client's own probe, to the relay's link-local address and to
    // all nodes (RFC 9484 section 7.2: "If an endpoint does not know an
    // IPv6 address of its peer, it can send the ICMPv6 echo request to the
    // link-local all nodes multicast address").
    for (i, to) in [TUNNEL_LINK_LOCAL, echo::ALL_NODES].into_iter().enumerate() {
        let request = echo::probe(client, to, 77, i as u16 + 1);
        h.client.send_datagram(stream, &request);
        h.run();
        let (_, _, reply) = h.client.datagrams.last().expect("a reply").clone();
        let e = echo::parse(&reply).expect("an echo");
        assert_eq!((e.kind, e.src, e.dst), (EchoKind::Reply, TUNNEL_LINK_LOCAL, client));
        assert_eq!((e.identifier, e.sequence, e.total_len), (77, i as u16 + 1, 1280));
    }
    assert_eq!(counter(&h, Counter::IpEchoReplies), 2);
    // Other link-local traffic is dropped, never written to the device
    // (section 7.2), even with a route covering everything.
    let dropped = counter(&h, Counter::DropIpOutOfScope);
    let to_link_local = echo::probe(client, "fe80::1".parse().unwrap(), 1, 1);
    let to_all_routers = echo::probe(client, "ff02::2".parse().unwrap(), 1, 1);
    h.client.send_datagram(stream, &to_link_local);
    h.client.send_datagram(stream, &to_all_routers);
    h.run();
    assert_eq!(counter(&h, Counter::DropIpOutOfScope), dropped + 2);
    assert!(h.tun_written.is_empty(), "{:?}", h.tun_written.len());
    // Global traffic still goes to the device.
    let global = echo::probe(client, "2001:db8::1".parse().unwrap(), 1, 1);
    h.client.send_datagram(stream, &global);
    h.run();
    assert_eq!(h.tun_written, vec![global]);
}

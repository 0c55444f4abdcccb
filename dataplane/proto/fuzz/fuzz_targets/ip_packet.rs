//! IP packet parsing, hop limit decrement, ICMP error generation and ICMPv6
//! Echo handling on arbitrary bytes: no panics, and every ICMP error or Echo
//! Reply built is itself a valid packet.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use relay_proto::ip::echo::{self, EchoKind};
use relay_proto::ip::packet::{self, HopOutcome, IcmpError};

fuzz_target!(|data: &[u8]| {
    let parsed = packet::parse(data);
    let mut copy = data.to_vec();
    if let Ok(HopOutcome::Forward) = packet::decrement_hop_limit(&mut copy)
        && parsed.is_ok()
    {
        let after = packet::parse(&copy).expect("a decremented valid packet stays valid");
        assert_eq!(after.hop_limit, parsed.unwrap().hop_limit - 1);
    }
    let kinds = [
        IcmpError::TimeExceeded,
        IcmpError::PacketTooBig { mtu: 1280 },
        IcmpError::PacketTooBig { mtu: u32::MAX },
        IcmpError::AdminProhibited,
        IcmpError::NoRoute,
        IcmpError::SourcePolicy,
    ];
    let froms = [
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    ];
    for kind in kinds {
        for from in froms {
            if let Some(error) = packet::icmp_error(data, from, kind) {
                let info = packet::parse(&error).expect("an ICMP error parses");
                assert_eq!(info.src, from);
                assert_eq!(Some(info.dst), parsed.map(|p| p.src).ok());
                assert!(error.len() <= if from.is_ipv4() { 576 } else { 1280 });
            }
        }
    }
    if let Some(e) = echo::parse(data) {
        assert!(packet::parse(data).is_ok(), "a parsed echo is a valid packet");
        let _ = echo::is_full_probe_reply(data, &e);
        if let Some(r) = echo::reply(data, echo::TUNNEL_LINK_LOCAL) {
            let back = echo::parse(&r).expect("a reply parses");
            assert_eq!(
                (back.kind, back.dst, back.identifier, back.sequence),
                (EchoKind::Reply, e.src, e.identifier, e.sequence)
            );
            assert_eq!(r.len(), data.len());
        }
    }
});

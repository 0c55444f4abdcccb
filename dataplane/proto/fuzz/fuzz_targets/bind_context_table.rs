//! A bound tunnel's ContextTable driven by a byte script of client capsules,
//! client datagrams, peer packets and proxy closes: no panics, the limits
//! hold after every step, and the answers are consistent with the draft
//! (ACKs and CLOSEs only for IDs in play, proxy contexts odd and only while
//! the uncompressed context is open).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use relay_proto::bind::{
    self, BindCapsule, ContextTable, DropReason, Families, Filter, Inbound, Limits, OutboundError,
};

const PEERS: [&str; 8] = [
    "192.0.2.1:1000",
    "192.0.2.1:1001",
    "192.0.2.2:1000",
    "198.51.100.7:3478",
    "[2001:db8::1]:1000",
    "[2001:db8::1]:1001",
    "[::ffff:192.0.2.1]:1000",
    "[fe80::1]:5",
];

/// A small context ID from one byte: mostly low values, so IDs collide.
/// Bytes 0xf0 and up give IDs at the top of the varint range.
fn id(b: u8) -> u64 {
    if b >= 0xf0 { relay_proto::varint::MAX - u64::from(b & 0x0f) } else { u64::from(b % 24) }
}

fn peer(b: u8) -> SocketAddr {
    PEERS[usize::from(b) % PEERS.len()].parse().expect("peer")
}

fuzz_target!(|data: &[u8]| {
    let [a, b, c, script @ ..] = data else { return };
    let limits = Limits { max_contexts: usize::from(a % 9), max_peers: usize::from(b % 9) };
    let filter = if c & 1 == 0 { Filter::SentTo } else { Filter::Any };
    // The announced families: both, IPv4 only or IPv6 only.
    let families = match b >> 6 {
        1 => Families::of(&["192.0.2.1:443".parse().expect("addr")]),
        2 => Families::of(&["[2001:db8::1]:443".parse().expect("addr")]),
        _ => Families::BOTH,
    };
    let mut t = ContextTable::new(limits, filter).with_proxy_compression(c & 2 == 0).with_families(families);
    let target = (c & 4 != 0).then(|| peer(c >> 3));
    if let Some(target) = target {
        t = t.with_target(target);
    }
    // The policy refuses odd ports.
    let allowed = |p: SocketAddr| p.port() % 2 == 0;
    let mut s = script;
    while let [op, x, y, rest @ ..] = s {
        s = rest;
        let uncompressed_before = t.uncompressed_context();
        match op % 8 {
            0 | 1 => {
                let target = (y & 0x80 == 0).then(|| peer(*y));
                let capsule = BindCapsule::Assign { context_id: id(*x), target };
                if let Ok(replies) = t.on_client_capsule(capsule, allowed) {
                    let last = replies.last().expect("an ASSIGN is answered");
                    assert_eq!(last.context_id(), id(*x));
                    assert!(matches!(last, BindCapsule::Ack { .. } | BindCapsule::Close { .. }));
                    for r in &replies[..replies.len() - 1] {
                        // Only proxy contexts give way.
                        assert!(matches!(r, BindCapsule::Close { context_id } if context_id % 2 == 1));
                    }
                }
            }
            2 => {
                if let Ok(r) = t.on_client_capsule(BindCapsule::Ack { context_id: id(*x) }, allowed) {
                    assert!(r.is_empty());
                }
            }
            3 => {
                if let Ok(r) = t.on_client_capsule(BindCapsule::Close { context_id: id(*x) }, allowed) {
                    assert!(r.is_empty());
                }
            }
            4 => {
                // A datagram: an uncompressed payload for a known peer, or
                // raw bytes.
                let mut payload = Vec::new();
                if y & 1 == 0 {
                    bind::encode_uncompressed(peer(y >> 1), b"data", &mut payload);
                } else {
                    payload.extend_from_slice(&rest[..rest.len().min(usize::from(y >> 4))]);
                }
                match t.outbound(id(*x), &payload) {
                    Ok((to, _)) if id(*x) == 0 => assert_eq!(Some(to), target.map(bind::tuple)),
                    Err(OutboundError::ContextZero) => assert!(id(*x) == 0 && target.is_none()),
                    _ => {}
                }
            }
            5 => match t.inbound(peer(*x)) {
                Inbound::UncompressedAndAssign(u, BindCapsule::Assign { context_id, target: Some(_) }) => {
                    assert_eq!(Some(u), uncompressed_before);
                    assert_eq!(context_id % 2, 1);
                }
                Inbound::UncompressedAndAssign(..) => panic!("proxy ASSIGN without a target"),
                Inbound::Uncompressed(u) => assert_eq!(Some(u), uncompressed_before),
                Inbound::Compressed(0) => assert!(target.is_some()),
                Inbound::Drop(DropReason::Filtered) => assert_eq!(filter, Filter::SentTo),
                Inbound::Drop(DropReason::FamilyNotAnnounced) => assert!(!families.contains(peer(*x))),
                Inbound::Compressed(_) | Inbound::Drop(DropReason::NoContext) => {}
            },
            6 => {
                if let Some(c) = t.close(id(*x)) {
                    assert_eq!(c, BindCapsule::Close { context_id: id(*x) });
                }
            }
            _ => {
                // Raw capsule bytes through the decoder.
                let len = usize::from(y % 24).min(rest.len());
                let capsule_type = bind::COMPRESSION_ASSIGN + u64::from(x % 3);
                if let Ok(Some(c)) = bind::decode_capsule(capsule_type, &rest[..len]) {
                    let _ = t.on_client_capsule(c, allowed);
                }
                s = &rest[len..];
            }
        }
        assert!(t.open_contexts() <= limits.max_contexts);
        assert!(t.remembered_peers() <= limits.max_peers);
    }
});

//! Steady connect-udp loads through the worker core: four tunnels on one
//! connection, datagrams up (client -> targets) and down (targets ->
//! client) in rounds, every one checked at the other end.
//!
//! As tests they check that a long run loses, reorders and corrupts
//! nothing (20 rounds by default). `cargo xtask instr` runs them for more
//! rounds (`RELAY_LOAD_ROUNDS`) under callgrind, collecting only inside
//! [`super::harness::worker_call`], to count the instructions the worker
//! spends per datagram: a figure that, unlike time on a shared machine,
//! does not move between runs of the same code.

use std::collections::HashMap;

use relay_proto::channel::record::TunnelProtocol;

use super::harness::{Harness, bootstrap};

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
/// client on every tunnel; returns how many went through.
fn upload(size: usize) -> usize {
    let mut h = Harness::new(bootstrap(1));
    let tunnels = open_tunnels(&mut h);
    let rounds = rounds();
    for round in 0..rounds {
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
        }
    }
    rounds * PER_TUNNEL * tunnels.len()
}

/// `rounds()` rounds of `PER_TUNNEL` datagrams of `size` bytes from every
/// tunnel's target, one receive (GRO batch) each; returns how many went
/// through.
fn download(size: usize) -> usize {
    let mut h = Harness::new(bootstrap(1));
    let tunnels = open_tunnels(&mut h);
    let rounds = rounds();
    for round in 0..rounds {
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
    }
    rounds * PER_TUNNEL * tunnels.len()
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

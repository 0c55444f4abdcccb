//! The worker core driven by the harness: tunnels open, refuse and close,
//! deadlines fire on the virtual clock, control's kills and drains, and
//! packets for another worker are handed off. No backend, milliseconds.

use std::sync::atomic::Ordering;
use std::time::Duration;

use relay_channel::region::Counter;
use relay_proto::channel::record::{AnswerRecord, TunnelProtocol, Verdict};
use relay_proto::proxy_status::ProxyError;

use super::harness::{Harness, bootstrap};
use crate::io::Handler;

fn counter(h: &Harness, c: Counter) -> u64 {
    h.worker.ctx.link.counters().get(c)
}

/// A harness with an open connect-udp tunnel to 127.0.0.1:9 (flow 7):
/// returns the stream and the endpoint key.
fn open_tunnel(h: &mut Harness) -> (u64, u64) {
    h.connect();
    let stream = h.client.connect_udp("127.0.0.1", 9);
    h.run();
    let asks = h.control.take_asks();
    assert_eq!(asks.len(), 1, "{asks:?}");
    let ask = &asks[0];
    assert_eq!((ask.target_host.as_str(), ask.target_port), ("127.0.0.1", 9));
    assert_eq!(ask.protocol, TunnelProtocol::ConnectUdp);
    assert_eq!(ask.authorization.as_deref(), Some("Bearer test"));
    h.control.allow(ask, 7, "127.0.0.1:9".parse().unwrap());
    h.run();
    assert_eq!(h.client.status(stream), Some(200));
    assert_eq!(h.client.field(stream, "capsule-protocol"), Some("?1"));
    let (key, peer) = h.only_endpoint();
    assert_eq!(peer, "127.0.0.1:9".parse().unwrap());
    (stream, key)
}

#[test]
fn a_tunnel_opens_forwards_both_ways_and_reports_its_flow_on_close() {
    let mut h = Harness::new(bootstrap(1));
    let (stream, key) = open_tunnel(&mut h);
    assert_eq!(counter(&h, Counter::TunnelsActive), 1);
    h.client.send_datagram(stream, b"hello");
    h.client.send_datagram(stream, b"world");
    h.run();
    assert_eq!(h.endpoints.sent[&key], vec![b"hello".to_vec(), b"world".to_vec()]);
    h.from_target(key, b"reply");
    assert_eq!(h.client.datagrams, vec![(stream, 0, b"reply".to_vec())]);
    // RFC 9298 section 3: the client ending the stream ends the tunnel.
    h.client.finish(stream);
    h.run();
    assert!(h.client.finished.contains(&stream), "our FIN follows the client's");
    assert_eq!(h.endpoints.closed, vec![key]);
    let closed = h.control.closed_flows();
    assert_eq!(closed.len(), 1);
    let c = &closed[0];
    assert_eq!((c.flow_id, c.packets_up, c.bytes_up, c.packets_down, c.bytes_down), (7, 2, 10, 1, 5));
    assert_eq!(counter(&h, Counter::TunnelsActive), 0);
    assert_eq!(counter(&h, Counter::TunnelsClosed), 1);
}

#[test]
fn a_target_datagram_too_large_for_the_client_is_dropped_and_counted_and_the_next_one_goes() {
    let mut h = Harness::new(bootstrap(1));
    let (stream, key) = open_tunnel(&mut h);
    // What fits in one QUIC DATAGRAM frame after the HTTP Datagram header
    // (quarter stream ID and context ID, one byte each here).
    let room = h.worker.h3.first_datagram_room().expect("datagrams negotiated") - 2;
    h.from_target(key, &vec![0xab; room + 1]);
    assert_eq!(counter(&h, Counter::DropTooLarge), 1);
    assert!(h.client.datagrams.is_empty(), "nothing of it reached the client");
    // RFC 9298 section 5: not moved to a DATAGRAM capsule either.
    assert!(h.client.bodies.get(&stream).is_none_or(Vec::is_empty), "no capsule on the stream");
    h.from_target(key, &vec![0xcd; room]);
    assert_eq!(h.client.datagrams, vec![(stream, 0, vec![0xcd; room])], "a payload that just fits goes");
    assert_eq!(counter(&h, Counter::DropTooLarge), 1);
}

#[test]
fn a_backlogged_connection_pauses_its_tunnels_targets_until_the_client_catches_up() {
    use crate::h3::path::PAUSE_AT;
    let mut h = Harness::new(bootstrap(1));
    let (stream, key) = open_tunnel(&mut h);
    // The client stops acknowledging: the relay's congestion window fills
    // and the target's datagrams wait in the connection's DATAGRAM queue.
    h.hold = true;
    let size = 1000;
    let burst = PAUSE_AT + 64;
    h.from_target_batch(key, &vec![0x5a; burst * size], size);
    assert!(h.endpoints.paused.contains(&key), "a backlogged connection pauses its tunnel's target");
    assert_eq!(counter(&h, Counter::TargetReadsPaused), 1);
    // What the backend had already received still goes into the queue
    // (it has room), and the tunnel is not paused twice.
    h.from_target_batch(key, &vec![0xa5; 10 * size], size);
    assert_eq!(counter(&h, Counter::TargetReadsPaused), 1);
    assert_eq!(counter(&h, Counter::DropQueueFull), 0);
    // The client reads and acknowledges again: the queue drains and the
    // target is read again.
    h.hold = false;
    h.run();
    assert!(h.endpoints.paused.is_empty(), "resumed once the backlog is low");
    assert_eq!(h.endpoints.pause_log, vec![(key, true), (key, false)]);
    let got =
        h.client.datagrams.iter().filter(|(s, c, p)| *s == stream && *c == 0 && p.len() == size).count();
    assert_eq!(got, burst + 10, "every queued datagram reached the client");
}

#[test]
fn early_datagrams_wait_for_the_verdict_and_go_first() {
    let mut h = Harness::new(bootstrap(1));
    h.connect();
    let stream = h.client.connect_udp("127.0.0.1", 9);
    h.run();
    h.client.send_datagram(stream, b"early");
    h.run();
    assert!(h.endpoints.opened.is_empty(), "nothing opens before control allows");
    let ask = h.control.take_asks().remove(0);
    h.control.allow(&ask, 8, "127.0.0.1:9".parse().unwrap());
    h.run();
    let (key, _) = h.only_endpoint();
    assert_eq!(h.endpoints.sent[&key], vec![b"early".to_vec()]);
}

#[test]
fn refusals_from_routing_and_from_control_carry_status_and_proxy_status() {
    let mut h = Harness::new(bootstrap(1));
    h.connect();
    // Routing refuses without asking control: the path is not the template.
    let bad = h.client.request(
        &[
            (":method", "CONNECT"),
            (":protocol", "connect-udp"),
            (":scheme", "https"),
            (":authority", "localhost"),
            (":path", "/elsewhere"),
        ],
        false,
    );
    // Another :protocol: 501.
    let ws = h.client.request(
        &[
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":authority", "localhost"),
            (":path", "/"),
        ],
        false,
    );
    let denied = h.client.connect_udp("192.0.2.1", 53);
    h.run();
    assert_eq!(h.client.status(bad), Some(404));
    assert_eq!(h.client.status(ws), Some(501));
    assert!(h.client.finished.contains(&bad) && h.client.finished.contains(&ws));
    let asks = h.control.take_asks();
    assert_eq!(asks.len(), 1, "only the well-formed request is asked about");
    let verdict = Verdict::Deny {
        status: 429,
        proxy_error: Some(ProxyError::HttpRequestDenied),
        details: "quota exceeded".into(),
        retry_after_secs: 3,
    };
    h.control.answer(&asks[0], verdict);
    h.run();
    assert_eq!(h.client.status(denied), Some(429));
    assert_eq!(h.client.field(denied, "retry-after"), Some("3"));
    let ps = h.client.field(denied, "proxy-status").unwrap();
    assert!(ps.contains("error=http_request_denied") && ps.contains("quota exceeded"), "{ps}");
    assert_eq!(counter(&h, Counter::TunnelsRefused), 3);
    assert!(h.endpoints.opened.is_empty());
}

#[test]
fn a_407_from_control_carries_its_challenges_and_the_realm_only_without_them() {
    let mut h = Harness::new(bootstrap(1));
    h.connect();
    let with = h.client.connect_udp("192.0.2.1", 53);
    let without = h.client.connect_udp("192.0.2.1", 54);
    h.run();
    let asks = h.control.take_asks();
    assert_eq!(asks.len(), 2);
    let challenges = vec![
        "Bearer realm=\"masque\"".to_string(),
        "PrivateToken challenge=\"AAIAB2lzc3Vlcg==\", token-key=\"MIIBUjA9\", max-age=60".to_string(),
    ];
    let verdict = Verdict::Authenticate { details: "token replayed".into(), challenges: challenges.clone() };
    h.control.answer(&asks[0], verdict);
    h.control.answer(
        &asks[1],
        Verdict::Authenticate { details: "authentication required".into(), challenges: vec![] },
    );
    h.run();
    assert_eq!(h.client.status(with), Some(407));
    assert_eq!(h.client.fields(with, "proxy-authenticate"), challenges);
    assert_eq!(
        h.client.field(with, "proxy-status"),
        Some("relay; error=http_request_denied; details=\"token replayed\"")
    );
    assert_eq!(h.client.status(without), Some(407));
    assert_eq!(h.client.fields(without, "proxy-authenticate"), ["Bearer realm=\"masque\""]);
}

#[test]
fn control_that_does_not_answer_in_time_gets_503_on_the_virtual_clock() {
    let mut h = Harness::new(bootstrap(1));
    h.connect();
    let stream = h.client.connect_udp("127.0.0.1", 9);
    h.run();
    let ask = h.control.take_asks().remove(0);
    h.advance(Duration::from_millis(1999));
    h.run();
    assert_eq!(h.client.status(stream), None, "not yet");
    h.advance(Duration::from_millis(2));
    h.run();
    assert_eq!(h.client.status(stream), Some(503));
    assert_eq!(counter(&h, Counter::AsksFailed), 1);
    // The late answer's flow goes back to control unused.
    h.control.allow(&ask, 9, "127.0.0.1:9".parse().unwrap());
    h.run();
    let closed = h.control.closed_flows();
    assert_eq!(closed.len(), 1);
    assert_eq!((closed[0].flow_id, closed[0].bytes_up, closed[0].bytes_down), (9, 0, 0));
    assert!(h.endpoints.opened.is_empty());
}

#[test]
fn idle_tunnels_end_from_the_relay_side() {
    let mut h = Harness::new(bootstrap(1));
    let (stream, key) = open_tunnel(&mut h);
    h.advance(Duration::from_secs(29));
    h.run();
    assert!(h.endpoints.closed.is_empty());
    h.advance(Duration::from_secs(2));
    h.run();
    assert!(h.client.finished.contains(&stream), "FIN from the relay");
    assert_eq!(h.endpoints.closed, vec![key]);
    assert_eq!(h.control.closed_flows().len(), 1);
}

#[test]
fn an_operator_kill_resets_the_stream() {
    let mut h = Harness::new(bootstrap(1));
    let (stream, key) = open_tunnel(&mut h);
    h.control.send(AnswerRecord::KillFlow { flow_id: 7 });
    h.run();
    assert!(h.client.reset.contains(&stream), "H3_REQUEST_CANCELLED reset");
    assert_eq!(h.endpoints.closed, vec![key]);
    assert_eq!(h.control.closed_flows()[0].flow_id, 7);
}

#[test]
fn a_drain_sends_goaway_rejects_new_requests_and_stops_when_tunnels_end() {
    let mut h = Harness::new(bootstrap(1));
    let (stream, _) = open_tunnel(&mut h);
    // The GOAWAY is held back so the client still sends a request.
    h.drain.store(true, Ordering::Relaxed);
    h.hold = true;
    h.turn();
    let late = h.client.connect_udp("127.0.0.1", 9);
    h.client.send_datagram(stream, b"still");
    h.turn();
    h.hold = false;
    h.run();
    assert!(h.client.goaway, "GOAWAY");
    assert!(!h.stopped, "the open tunnel keeps the worker up");
    // RFC 9114 section 5.2: requests after GOAWAY are rejected.
    assert!(h.client.reset.contains(&late), "H3_REQUEST_REJECTED");
    assert!(h.control.take_asks().is_empty(), "nothing asked for a rejected request");
    assert_eq!(h.endpoints.sent.values().flatten().count(), 1, "tunnels keep forwarding while draining");
    h.client.finish(stream);
    h.run();
    assert!(h.stopped, "no tunnel left: the worker stops");
}

#[test]
fn packets_for_another_worker_are_handed_off() {
    let b = bootstrap(2);
    let cids = relay_proto::cid::CidLayout::new(b.cid_config_id, &b.cid_server_id, b.cid_nonce_len).unwrap();
    let mut h = Harness::worker(b, 0);
    // A short-header packet whose connection ID names worker 1.
    let cid = cids.generate_with(1, |out| out.fill(0x5a));
    let mut pkt = vec![0x40];
    pkt.extend_from_slice(cid.as_bytes());
    pkt.extend_from_slice(&[0u8; 40]);
    h.worker.begin_turn(h.now);
    h.worker.on_quic(&mut pkt, 64, "127.0.0.1:50001".parse().unwrap());
    let _ = h.worker.end_turn();
    let handed = h.inboxes[1].pop().expect("handed to worker 1");
    assert_eq!(handed.from, "127.0.0.1:50001".parse().unwrap());
    assert_eq!(handed.packet[1..1 + cid.as_bytes().len()], *cid.as_bytes());
    assert_eq!(counter(&h, Counter::HandoffsOut), 1);
    assert!(h.inboxes[0].pop().is_none());
}

/// A one-worker bootstrap serving bound UDP on 127.0.0.1, any peer.
fn bind_bootstrap() -> relay_proto::channel::bootstrap::Bootstrap {
    let mut b = bootstrap(1);
    b.bind = Some(relay_proto::channel::bootstrap::BindBootstrap {
        public_addresses: vec!["127.0.0.1".parse().unwrap()],
        inbound_filter: relay_proto::channel::bootstrap::InboundFilter::Any,
        max_contexts: 1000,
        max_peers: 100,
    });
    b
}

/// Asks for a bound tunnel on a connected harness and has control allow it
/// (peers in 127.0.0.0/8) as flow `flow_id`: returns the stream.
fn open_bound_tunnel(h: &mut Harness, flow_id: u64) -> u64 {
    let stream = h.client.connect_udp_bind();
    h.run();
    let ask = h.control.take_asks().remove(0);
    assert_eq!(ask.protocol, TunnelProtocol::ConnectUdpBind);
    let peers = vec![relay_proto::channel::record::IpRoute {
        start: "127.0.0.0".parse().unwrap(),
        end: "127.255.255.255".parse().unwrap(),
        protocol: 0,
    }];
    let verdict = Verdict::AllowBind {
        flow_id,
        idle_timeout_ms: 30_000,
        byte_budget: 0,
        identity: "sub:t".into(),
        peers,
    };
    h.control.answer(&ask, verdict);
    h.run();
    assert_eq!(h.client.status(stream), Some(200));
    stream
}

#[test]
fn a_bound_client_that_leaves_too_many_compression_answers_unread_is_aborted() {
    let mut h = Harness::new(bind_bootstrap());
    // The relay may send 160 bytes on the stream until the client reads.
    h.client = super::harness::Client::with_stream_window(160);
    h.connect();
    let stream = open_bound_tunnel(&mut h, 11);
    assert_eq!(h.client.field(stream, "connect-udp-bind"), Some("?1"));
    let public = h.client.field(stream, "proxy-public-address").unwrap().to_string();
    assert!(public.starts_with("\"127.0.0.1:"), "{public}");
    // The client stops reading and registers 200 compressed contexts: each
    // needs an answer (the draft's section 3.1), which the relay cannot
    // send; past its bound on waiting answers (section 9) it aborts.
    h.client.read_bodies = false;
    let mut capsules = Vec::new();
    for i in 0..200u16 {
        let c = relay_proto::bind::BindCapsule::Assign {
            context_id: 2 + 2 * u64::from(i),
            target: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + i))),
        };
        relay_proto::bind::encode_capsule(&c, &mut capsules);
    }
    h.client.send_body(stream, &capsules);
    h.run();
    assert!(h.client.reset.contains(&stream), "the stream is aborted");
    assert_eq!(h.client.reset_codes[&stream], 0x107, "H3_EXCESSIVE_LOAD");
    assert_eq!(h.control.closed_flows()[0].flow_id, 11);
}

#[test]
fn a_backlogged_connection_pauses_its_bound_tunnels_sockets_too() {
    use crate::h3::path::PAUSE_AT;
    let mut h = Harness::new(bind_bootstrap());
    h.connect();
    let stream = open_bound_tunnel(&mut h, 12);
    let (key, _) = h.only_endpoint();
    // The client opens the uncompressed context, which peers' datagrams
    // need (draft-ietf-masque-connect-udp-listen section 4).
    let mut capsule = Vec::new();
    relay_proto::bind::encode_capsule(
        &relay_proto::bind::BindCapsule::Assign { context_id: 2, target: None },
        &mut capsule,
    );
    h.client.send_body(stream, &capsule);
    h.run();
    // The client stops acknowledging while a peer floods the bound socket.
    h.hold = true;
    let size = 1000;
    let burst = PAUSE_AT + 64;
    let peer = Some("127.0.0.1:7000".parse().unwrap());
    h.from_peer_batch(key, peer, &vec![0x5a; burst * size], size);
    assert!(h.endpoints.paused.contains(&key), "every peer's datagrams go to the one backlogged client");
    assert_eq!(counter(&h, Counter::TargetReadsPaused), 1);
    h.hold = false;
    h.run();
    assert!(h.endpoints.paused.is_empty(), "resumed once the backlog is low");
    assert_eq!(h.endpoints.pause_log, vec![(key, true), (key, false)]);
    let got = h.client.datagrams.iter().filter(|(s, _, p)| *s == stream && p.ends_with(&[0x5a; 16])).count();
    assert_eq!(got, burst, "every queued datagram reached the client");
}

#[test]
fn a_host_that_does_not_know_a_connection_resets_it_with_the_token_its_issuer_gave() {
    let keys =
        relay_proto::channel::bootstrap::QuicKeys { retry_token_key: [5; 32], stateless_reset_key: [6; 32] };
    let mut b = bootstrap(1);
    b.quic_keys = Some(keys);
    let mut first = Harness::new(b.clone());
    first.connect();
    // The client's packets now reach another worker or host with the same
    // keys, which never saw the connection (a restart, a balancer change).
    let mut second = Harness::new(b);
    std::mem::swap(&mut first.client, &mut second.client);
    second.client.quic.send_ack_eliciting().unwrap();
    second.run();
    assert_eq!(counter(&second, Counter::StatelessResetsSent), 1);
    assert!(second.client.quic.is_closed(), "RFC 9000 section 10.3: the client recognised the reset");

    // Without the issuer's key the reset carries another token: the client
    // ignores it (and keeps waiting for its idle timeout).
    let mut first = Harness::new(bootstrap(1));
    first.connect();
    let mut stranger = Harness::new(bootstrap(1));
    std::mem::swap(&mut first.client, &mut stranger.client);
    stranger.client.quic.send_ack_eliciting().unwrap();
    stranger.run();
    assert!(counter(&stranger, Counter::StatelessResetsSent) >= 1);
    assert!(!stranger.client.quic.is_closed());
}

/// A classic CONNECT (RFC 9114 section 4.4) to a loopback listener, allowed
/// as flow 9: returns the stream and the target's end of the connection.
fn open_tcp(h: &mut Harness) -> (u64, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    h.connect();
    let authority = addr.to_string();
    let stream = h.client.request(
        &[(":method", "CONNECT"), (":authority", &authority), ("proxy-authorization", "Bearer test")],
        false,
    );
    h.run();
    let ask = h.control.take_asks().remove(0);
    assert_eq!(ask.protocol, TunnelProtocol::ConnectTcp);
    h.control.allow(&ask, 9, addr);
    h.run();
    // A loopback connect completes inside connect(2): the connection waits
    // in the backlog, and the worker learns it from the socket's readiness.
    let (target, _) = listener.accept().unwrap();
    target.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    h.ready();
    assert_eq!(h.client.status(stream), Some(200));
    (stream, target)
}

#[test]
fn classic_connect_half_closes_each_way_after_the_bytes() {
    use std::io::{Read, Write};
    let mut h = Harness::new(bootstrap(1));
    let (stream, mut target) = open_tcp(&mut h);
    // The client's bytes and its FIN arrive in one turn, with no packet
    // after them: the FIN reaches the target after the bytes all the same.
    h.client.send_body(stream, b"hello");
    h.client.finish(stream);
    h.turn();
    let mut got = Vec::new();
    target.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
    h.run();
    assert!(!h.client.finished.contains(&stream), "the target's side is still open");
    assert!(h.control.closed_flows().is_empty());
    // The target answers and ends its side: the stream's FIN follows.
    target.write_all(b"world").unwrap();
    target.shutdown(std::net::Shutdown::Write).unwrap();
    h.ready();
    assert_eq!(h.client.bodies[&stream], b"world");
    assert!(h.client.finished.contains(&stream), "the target's FIN became the stream's");
    let closed = h.control.closed_flows();
    assert_eq!(closed.len(), 1);
    assert_eq!((closed[0].flow_id, closed[0].bytes_up, closed[0].bytes_down), (9, 5, 5));
}

#[test]
fn a_client_reset_closes_the_target_connection_with_rst() {
    use std::io::Read;
    let mut h = Harness::new(bootstrap(1));
    let (stream, mut target) = open_tcp(&mut h);
    h.client.send_body(stream, b"before");
    h.run();
    let mut got = [0u8; 6];
    target.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");
    // H3_REQUEST_CANCELLED.
    h.client.quic.stream_shutdown(stream, quiche::Shutdown::Write, 0x10c).unwrap();
    h.run();
    let mut rest = Vec::new();
    let err = target.read_to_end(&mut rest).expect_err("RST, not FIN");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(h.control.closed_flows().len(), 1);
}

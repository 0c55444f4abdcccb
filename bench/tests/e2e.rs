//! End-to-end tests: a real `relay-control` and `relay-dataplane` (separate
//! processes, real shared memory), a real UDP echo target on loopback, and
//! the bench crate's quiche client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use relay_bench::client::{Answer, Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::load::{EchoLoad, run_echo};
use relay_bench::processes::{Relay, RelayOptions};
use relay_bench::wait::{PATIENCE, wait_for, wait_until};
use serde_json::Value;

const H3_MESSAGE_ERROR: u64 = 0x10e;
const T: Duration = Duration::from_secs(5);

fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn start(name: &str, opts: RelayOptions) -> Relay {
    Relay::start(&test_dir(name), &opts).expect("relay starts")
}

fn client(relay: &Relay) -> Client {
    client_with(relay, |_| {})
}

fn client_with(relay: &Relay, adjust: impl FnOnce(&mut ClientConfig)) -> Client {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    adjust(&mut cfg);
    Client::connect(cfg, T).expect("client connects")
}

fn admin(socket: &Path, cmd: &str) -> Value {
    let s = UnixStream::connect(socket).expect("admin socket");
    (&s).write_all(format!("{{\"cmd\":\"{cmd}\"}}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn counter(relay: &Relay, name: &str) -> u64 {
    let v = admin(&relay.admin_socket(), "status");
    v["workers"].as_array().unwrap().iter().map(|w| w[name].as_u64().unwrap()).sum()
}

/// Waits until the dataplane has noticed that control is gone: a CONNECT on
/// `c` is refused with 503 "control plane unavailable" (before it notices,
/// a CONNECT waits for the ask timeout instead). The flag is the
/// dataplane's, shared by every worker.
fn wait_control_down_noticed(c: &mut Client, port: u16) {
    wait_until("the dataplane to notice that control is gone", PATIENCE, || {
        let id = c.request_udp("127.0.0.1", port).unwrap();
        let a = c.wait_answer(id, T).unwrap();
        assert_eq!(a.status(), Some(503), "{a:?}");
        a.header("proxy-status").unwrap().contains("control plane unavailable")
    });
}

fn header(list: &[(String, String)], name: &str) -> Option<String> {
    list.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}

#[test]
fn eight_tunnels_ten_thousand_datagrams_each_way_byte_for_byte() {
    let relay = start("bulk", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let streams: Vec<u64> =
        (0..8).map(|_| c.open_udp("127.0.0.1", echo.addr().port(), T).expect("tunnel opens")).collect();
    let load = EchoLoad {
        count: 10_000,
        size: 1200,
        window: 24,
        capsules: false,
        stall_timeout: Duration::from_secs(5),
    };
    let r = run_echo(&mut c, &streams, &load).unwrap();
    assert_eq!(r.sent, 80_000);
    assert_eq!(r.corrupt, 0, "payloads must come back byte for byte");
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.lost, 0, "loopback loss must be 0");
    assert_eq!(r.received, 80_000);
    assert_eq!(echo.echoed(), 80_000, "the target saw every datagram");
    assert!(counter(&relay, "datagrams_up") >= 80_000);
    assert!(counter(&relay, "datagrams_down") >= 80_000);
    assert_eq!(admin(&relay.admin_socket(), "status")["flows"], 8);
    // Control saw each ask with the client's address and the resolved target.
    let flows = admin(&relay.admin_socket(), "flows");
    for f in flows["flows"].as_array().unwrap() {
        assert_eq!(f["client"].as_str().unwrap(), c.local_addr().to_string().replace("0.0.0.0", "127.0.0.1"));
        assert_eq!(f["target"].as_str().unwrap(), echo.addr().to_string());
    }
    // Closing the request streams closes the tunnels (RFC 9298 section 3).
    for s in &streams {
        c.finish_stream(*s).unwrap();
    }
    wait_until("tunnels to close and the relay to end its side too", T, || {
        let _ = c.drive(Duration::from_millis(10));
        admin(&relay.admin_socket(), "status")["flows"] == 0 && streams.iter().all(|s| c.stream_finished(*s))
    });
    assert_eq!(counter(&relay, "tunnels_active"), 0);
}

#[test]
fn capsules_when_the_client_has_no_h3_datagrams() {
    let relay = start("capsules", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client_with(&relay, |cfg| cfg.h3_datagrams = false);
    c.wait_settings(T).unwrap();
    let streams: Vec<u64> = (0..2).map(|_| c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap()).collect();
    let load =
        EchoLoad { count: 500, size: 800, window: 16, capsules: true, stall_timeout: Duration::from_secs(5) };
    let r = run_echo(&mut c, &streams, &load).unwrap();
    assert_eq!((r.received, r.lost, r.corrupt), (1000, 0, 0));
    for s in &streams {
        assert_eq!(c.capsule_datagrams(*s), 500, "answers came back as DATAGRAM capsules");
    }
}

#[test]
fn capsule_only_client_gets_capsules_even_with_h3_datagrams_on() {
    let relay = start("capsules-mirror", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let load =
        EchoLoad { count: 200, size: 100, window: 8, capsules: true, stall_timeout: Duration::from_secs(5) };
    let r = run_echo(&mut c, &[s], &load).unwrap();
    assert_eq!((r.received, r.lost), (200, 0));
    assert_eq!(c.capsule_datagrams(s), 200);
}

#[test]
fn refusals_carry_exact_statuses_and_proxy_status() {
    let relay = start("refusals", RelayOptions::default());
    let mut c = client(&relay);
    c.wait_settings(T).unwrap();
    assert!(c.extended_connect_enabled(), "SETTINGS_ENABLE_CONNECT_PROTOCOL");
    assert!(c.h3_datagrams_enabled(), "SETTINGS_H3_DATAGRAM and max_datagram_frame_size");

    type Headers = Vec<(String, String)>;
    let ask = |c: &mut Client, edit: &dyn Fn(&mut Headers)| -> Answer {
        let mut h = c.connect_udp_headers("127.0.0.1", 9);
        edit(&mut h);
        let id = c.send_raw_request(&h, false).unwrap();
        c.wait_answer(id, T).unwrap()
    };
    let set = |name: &'static str, value: &'static str| {
        move |h: &mut Vec<(String, String)>| {
            for (n, v) in h.iter_mut() {
                if n == name {
                    *v = value.to_string();
                }
            }
        }
    };
    let status_and_error = |a: &Answer| {
        let Answer::Response(h) = a else { panic!("expected a response, got {a:?}") };
        let ps = header(h, "proxy-status");
        (
            a.status().unwrap(),
            ps.and_then(|p| p.split("error=").nth(1).map(|e| e.split(';').next().unwrap().to_string())),
        )
    };

    // Credentials: 407 with a challenge.
    let a = ask(&mut c, &|h| h.retain(|(n, _)| n != "proxy-authorization"));
    assert_eq!(status_and_error(&a), (407, Some("http_request_denied".into())));
    assert_eq!(a.header("proxy-authenticate"), Some("Bearer realm=\"test\""));
    let a = ask(&mut c, &set("proxy-authorization", "Bearer wrong"));
    assert_eq!(status_and_error(&a).0, 407);
    // `authorization` is accepted too.
    let a = ask(&mut c, &|h| {
        for (n, _) in h.iter_mut() {
            if n == "proxy-authorization" {
                *n = "authorization".into();
            }
        }
    });
    assert_eq!(a.status(), Some(200));

    // Targets.
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/192.0.2.1/53/"));
    assert_eq!(status_and_error(&a), (403, Some("destination_ip_prohibited".into())));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/10.1.2.3/53/"));
    assert_eq!(status_and_error(&a), (403, Some("destination_ip_prohibited".into())));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/169.254.169.254/80/"));
    assert_eq!(status_and_error(&a), (403, Some("destination_ip_prohibited".into())));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/no-such-host.invalid/53/"));
    assert_eq!(status_and_error(&a), (502, Some("dns_error".into())));
    // A name that resolves to loopback is allowed here (loopback is allowed
    // explicitly by the test config); IPv6 literal with encoded colons too.
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/localhost/9/"));
    assert_eq!(a.status(), Some(200));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/%3A%3A1/9/"));
    assert_eq!(a.status(), Some(200));

    // Request shape.
    let a = ask(&mut c, &set(":path", "/not/the/template/"));
    assert_eq!(a.status(), Some(404));
    let a = ask(&mut c, &set(":protocol", "connect-ip"));
    assert_eq!(a.status(), Some(501));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/127.0.0.1/0/"));
    assert_eq!(status_and_error(&a), (400, Some("http_request_error".into())));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/127.0.0.1/65536/"));
    assert_eq!(a.status(), Some(400));
    let a = ask(&mut c, &set(":path", "/.well-known/masque/udp/fe80%3A%3A1%25eth0/53/"));
    assert_eq!(a.status(), Some(400));
    let a = ask(&mut c, &set(":scheme", "http"));
    assert_eq!(a.status(), Some(400));
    // Plain CONNECT is a TCP tunnel (RFC 9114 section 4.4): to a port
    // where nothing listens it is refused as the connect was
    // (RFC 9209 section 2.3.7); bench/tests/tcp_front.rs moves bytes.
    // The port stays bound, never listening, until the answer is in: no
    // other test can listen on it, and the relay's connect cannot pick it
    // as its own source port and connect to itself (a TCP simultaneous
    // open, which once made this CONNECT succeed in CI).
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    holder.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let closed = holder.local_addr().unwrap().as_socket().unwrap();
    let a = ask(&mut c, &|h| {
        h.retain(|(n, _)| n != ":protocol");
        h.retain(|(n, _)| n != ":path" && n != ":scheme");
        for (n, v) in h.iter_mut() {
            if n == ":authority" {
                *v = closed.to_string();
            }
        }
    });
    assert_eq!(
        status_and_error(&a),
        (502, Some("connection_refused".into())),
        "plain CONNECT to a closed port"
    );
    drop(holder);
    let a = ask(&mut c, &|h| {
        h.retain(|(n, _)| n != ":protocol");
        for (n, v) in h.iter_mut() {
            if n == ":method" {
                *v = "GET".into();
            }
        }
    });
    assert_eq!(a.status(), Some(405));
    assert_eq!(a.header("allow"), Some("CONNECT"));

    // Malformed requests: H3_MESSAGE_ERROR stream errors, no response.
    for name in [":authority", ":path", ":scheme", ":method"] {
        let a = ask(&mut c, &|h| h.retain(|(n, _)| n != name));
        assert_eq!(a, Answer::Reset(H3_MESSAGE_ERROR), "missing {name}");
    }
    let a = ask(&mut c, &|h| h.insert(0, (":foo".into(), "bar".into())));
    assert_eq!(a, Answer::Reset(H3_MESSAGE_ERROR), "unknown pseudo-header");
    // (Uppercase field names are covered by relay-proto's unit tests: the
    // quiche QPACK encoder lowercases names, so this client cannot send them.)
    let a = ask(&mut c, &|h| h.push((":path".into(), "/".into())));
    assert_eq!(a, Answer::Reset(H3_MESSAGE_ERROR), "pseudo-header after regular field");
    let a = ask(&mut c, &|h| h.push(("connection".into(), "keep-alive".into())));
    assert_eq!(a, Answer::Reset(H3_MESSAGE_ERROR), "connection-specific field");

    // The connection survives every refusal and still tunnels.
    assert!(c.closed().is_none());
    let refused = counter(&relay, "tunnels_refused");
    let malformed = counter(&relay, "requests_malformed");
    assert!(refused >= 13, "refusals counted: {refused}");
    assert_eq!(malformed, 7);
}

#[test]
fn unknown_context_ids_are_dropped_and_counted() {
    let relay = start("contexts", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    for i in 0..5u64 {
        assert!(c.send_context_datagram(s, 2 + 2 * i, b"not for the target").unwrap());
    }
    c.send_datagram(s, b"for the target").unwrap();
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        c.drive(Duration::from_millis(10)).unwrap();
        got.extend(c.take_datagrams(s));
    }
    assert_eq!(got, vec![b"for the target".to_vec()]);
    // The target counts a datagram after sending its echo: the client may
    // hold the echo before the count moved.
    wait_until("the target to count its echo", PATIENCE, || echo.echoed() >= 1);
    assert_eq!(echo.echoed(), 1, "only the context-0 payload reached the target");
    assert_eq!(counter(&relay, "drop_unknown_context"), 5);
}

#[test]
fn idle_tunnels_are_closed_by_the_relay() {
    let relay = start("idle", RelayOptions { flow_idle_timeout_secs: 1, ..Default::default() });
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let opened = Instant::now();
    wait_until("the idle tunnel to end", Duration::from_secs(5), || {
        let _ = c.drive(Duration::from_millis(10));
        c.stream_finished(s)
    });
    assert!(opened.elapsed() >= Duration::from_millis(900), "not before the idle timeout");
    wait_until("control to forget the flow", T, || admin(&relay.admin_socket(), "status")["flows"] == 0);
}

/// RFC 9298 section 3.1: when the OS says the target socket is unusable
/// (an ICMP Destination Unreachable: ECONNREFUSED from a closed port), the
/// relay closes the request stream.
#[test]
fn an_unreachable_target_closes_the_tunnel() {
    let relay = start("unreachable", RelayOptions::default());
    // A port with nothing behind it: the kernel answers with ICMP port
    // unreachable.
    let closed_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", closed_port, T).unwrap();
    let deadline = Instant::now() + T;
    while !c.stream_finished(s) && Instant::now() < deadline {
        c.send_datagram(s, b"anyone there?").unwrap();
        let _ = c.drive(Duration::from_millis(50));
    }
    assert!(c.stream_finished(s), "the relay ended the stream (FIN)");
    wait_until("control to forget the flow", T, || admin(&relay.admin_socket(), "status")["flows"] == 0);
    assert!(relay.counter("tunnels_target_unreachable").unwrap() >= 1);
    // The connection itself is fine: a tunnel to a live target works.
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let s2 = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    c.send_datagram(s2, b"ping").unwrap();
    wait_until("the echo", T, || {
        let _ = c.drive(Duration::from_millis(10));
        !c.take_datagrams(s2).is_empty()
    });
}

#[test]
fn control_down_or_stalled_gives_503_while_open_tunnels_keep_forwarding() {
    let mut relay = start("control-down", RelayOptions { ask_timeout_ms: 2000, ..Default::default() });
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();

    // Stalled control (SIGSTOP): the ask times out into 503 within the
    // configured bound.
    relay.pause_control();
    let started = Instant::now();
    let id = c.request_udp("127.0.0.1", echo.addr().port()).unwrap();
    let a = c.wait_answer(id, T).unwrap();
    let waited = started.elapsed();
    relay.resume_control();
    assert_eq!(a.status(), Some(503));
    assert!(a.header("proxy-status").unwrap().contains("error=proxy_internal_error"));
    // It waited for control's answer as configured before giving up (the
    // lower bound is the configured timeout; no upper bound but the
    // client's own: a busy machine may answer late).
    assert!(waited >= Duration::from_millis(1900), "waited for the ask timeout: {waited:?}");

    // Dead control (SIGKILL): once the dataplane has noticed, new CONNECTs
    // get 503 at once; the open tunnel keeps forwarding.
    relay.kill_control();
    wait_control_down_noticed(&mut c, echo.addr().port());
    let id = c.request_udp("127.0.0.1", echo.addr().port()).unwrap();
    let a = c.wait_answer(id, T).unwrap();
    assert_eq!(a.status(), Some(503));
    // Refused at once, not after the ask timeout: those details come only
    // from the dataplane's knowing control is gone (an ask that timed out
    // says "control plane did not answer in time").
    assert!(a.header("proxy-status").unwrap().contains("control plane unavailable"));
    let load = EchoLoad {
        count: 300,
        size: 200,
        window: 16,
        capsules: false,
        stall_timeout: Duration::from_secs(5),
    };
    let r = run_echo(&mut c, &[s], &load).unwrap();
    assert_eq!((r.received, r.lost, r.corrupt), (300, 0, 0));
}

#[test]
fn early_datagrams_are_buffered_until_the_tunnel_opens() {
    let relay = start("early", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let id = c.request_udp("127.0.0.1", echo.addr().port()).unwrap();
    // RFC 9298 section 5: clients MAY send before the response.
    c.send_datagram(id, b"early bird").unwrap();
    c.flush().unwrap();
    assert_eq!(c.wait_answer(id, T).unwrap().status(), Some(200));
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        c.drive(Duration::from_millis(10)).unwrap();
        got.extend(c.take_datagrams(id));
    }
    assert_eq!(got, vec![b"early bird".to_vec()]);
}

#[test]
fn two_workers_share_the_port_and_both_serve() {
    let relay = start("workers", RelayOptions { workers: 2, ..Default::default() });
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    // Connections from different source ports spread over the SO_REUSEPORT
    // group by 4-tuple hash; every one must work whichever worker it lands
    // on. With 16 connections, all landing on one worker has probability
    // 2 * 2^-16.
    for _ in 0..16 {
        let mut c = client(&relay);
        let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
        let load = EchoLoad {
            count: 100,
            size: 300,
            window: 16,
            capsules: false,
            stall_timeout: Duration::from_secs(5),
        };
        let r = run_echo(&mut c, &[s], &load).unwrap();
        assert_eq!((r.received, r.lost), (100, 0));
        c.close();
    }
    let v = admin(&relay.admin_socket(), "status");
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert!(w["connections_accepted"].as_u64().unwrap() > 0, "worker {} served nothing", w["worker"]);
        assert!(w["tunnels_opened"].as_u64().unwrap() > 0, "worker {} opened no tunnel", w["worker"]);
        // The backend the suite asked for is the one serving (CI runs the
        // suite once with RELAY_TEST_IO=io_uring and once with epoll).
        let gauge = w["io_backend"].as_u64().unwrap();
        match std::env::var("RELAY_TEST_IO").as_deref() {
            Ok("io_uring") => assert_eq!(gauge, 1, "io_uring was asked for"),
            Ok("epoll") => assert_eq!(gauge, 2, "epoll was asked for"),
            _ => assert!(gauge == 1 || gauge == 2, "a backend is reported"),
        }
    }
}

/// One echo round trip of `n` datagrams on `stream`, all of which must
/// come back.
fn echo_round(c: &mut relay_bench::client::Client, stream: u64, n: u64, what: &str) {
    let load =
        EchoLoad { count: n, size: 200, window: 8, capsules: false, stall_timeout: Duration::from_secs(5) };
    let r = run_echo(c, &[stream], &load).unwrap();
    assert_eq!((r.received, r.lost, r.corrupt), (n, 0, 0), "the tunnel keeps forwarding ({what})");
}

#[test]
fn a_client_rebound_onto_another_workers_socket_is_handed_off_and_keeps_its_tunnel() {
    // Without the steering program the kernel picks a worker's socket by
    // 4-tuple hash, so after a NAT rebinding (new source port) the client's
    // packets land on the other worker about half the time: that worker
    // must hand them to the owner (named in the connection ID), not drop
    // them.
    let relay = start(
        "rebind-handoff",
        RelayOptions {
            workers: 2,
            dataplane_extra: "[dataplane.connection_ids]\nsteering = false".into(),
            ..Default::default()
        },
    );
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    // Each rebinding lands on the other worker's socket with probability
    // 1/2. A connection survives 15 rebindings (quiche keeps 16 paths), so
    // try up to 10 per connection, on up to 3 connections: all 30 missing
    // has probability 2^-30.
    let mut handed_off = None;
    'connections: for _ in 0..3 {
        let mut c = client(&relay);
        let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
        echo_round(&mut c, s, 20, "before rebinding");
        for rebinds in 1..=10 {
            let addr = c.rebind().unwrap();
            echo_round(&mut c, s, 20, &format!("after rebinding {rebinds} to {addr}"));
            if counter(&relay, "handoffs_in") > 0 {
                handed_off = Some((c, s));
                break 'connections;
            }
        }
        c.close();
    }
    let (mut c, s) = handed_off.expect("a rebinding reached the other worker's socket");
    // Keep going on the new path: the owner keeps serving through the
    // other worker.
    echo_round(&mut c, s, 200, "after the hand-off");
    assert_eq!(counter(&relay, "drop_handoff_full"), 0);
    assert_eq!(
        counter(&relay, "tunnels_opened"),
        counter(&relay, "tunnels_closed") + 1,
        "the tunnel was never re-opened"
    );
}

#[test]
fn with_steering_a_rebound_client_reaches_its_worker_without_hand_offs() {
    let relay = start("rebind-steer", RelayOptions { workers: 2, ..Default::default() });
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut c, s, 20, "before rebinding");
    for i in 0..6 {
        let addr = c.rebind().unwrap();
        echo_round(&mut c, s, 20, &format!("after rebinding {i} to {addr}"));
    }
    // Every short-header packet went straight to its owner's socket.
    assert_eq!(counter(&relay, "handoffs_out"), 0, "the reuseport program steers by connection ID");
    assert_eq!(admin(&relay.admin_socket(), "status")["flows"], 1);
}

#[test]
fn restarted_control_is_reattached_and_learns_the_live_flows() {
    let mut relay = start("control-restart", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let flows_before = admin(&relay.admin_socket(), "flows");
    let flow_id = flows_before["flows"][0]["flow_id"].as_u64().unwrap();

    relay.kill_control();
    // Without control, CONNECTs are refused with 503.
    wait_control_down_noticed(&mut c, echo.addr().port());

    relay.start_control().unwrap();
    // The dataplane re-attaches by itself; new tunnels work again.
    let s2 = wait_for("the dataplane to re-attach", PATIENCE, || {
        let id = c.request_udp("127.0.0.1", echo.addr().port()).unwrap();
        let a = c.wait_answer(id, T).unwrap();
        if a.status() == Some(200) {
            return Some(id);
        }
        assert_eq!(a.status(), Some(503), "{a:?}");
        None
    });
    // The new control learned the tunnel opened under the old one.
    let flows = admin(&relay.admin_socket(), "flows");
    let ids: Vec<u64> =
        flows["flows"].as_array().unwrap().iter().map(|f| f["flow_id"].as_u64().unwrap()).collect();
    assert!(ids.contains(&flow_id), "old flow {flow_id} missing from {ids:?}");
    assert_eq!(ids.len(), 2);
    // Both tunnels forward.
    let load = EchoLoad {
        count: 200,
        size: 300,
        window: 16,
        capsules: false,
        stall_timeout: Duration::from_secs(5),
    };
    let r = run_echo(&mut c, &[s, s2], &load).unwrap();
    assert_eq!((r.received, r.lost, r.corrupt), (400, 0, 0));
    // Closing the old tunnel is reported to the new control.
    c.finish_stream(s).unwrap();
    wait_until("the new control to drop the old flow", T, || {
        let _ = c.drive(Duration::from_millis(10));
        let flows = admin(&relay.admin_socket(), "flows");
        !flows["flows"].as_array().unwrap().iter().any(|f| f["flow_id"].as_u64() == Some(flow_id))
    });
}

#[test]
fn sigterm_drains_gracefully_and_exits_zero() {
    let mut relay = start(
        "drain",
        // A deadline far beyond the wait below: an exit within that wait is
        // the last tunnel's end, not the deadline.
        RelayOptions { dataplane_extra: "drain_timeout_secs = 300".into(), ..Default::default() },
    );
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();

    relay.signal_dataplane(libc::SIGTERM);
    // The drain begins with GOAWAY.
    wait_until("GOAWAY after SIGTERM", PATIENCE, || {
        let _ = c.drive(Duration::from_millis(10));
        c.goaway_received
    });
    // The open tunnel keeps working during the drain.
    let load =
        EchoLoad { count: 100, size: 200, window: 8, capsules: false, stall_timeout: Duration::from_secs(5) };
    let r = run_echo(&mut c, &[s], &load).unwrap();
    assert_eq!((r.received, r.lost), (100, 0));
    // The relay sent GOAWAY: quiche's client refuses to open new requests
    // on this connection. (Requests that still arrive are reset with
    // H3_REQUEST_REJECTED, RFC 9114 section 5.2.)
    let err = c.request_udp("127.0.0.1", echo.addr().port()).unwrap_err().to_string();
    assert!(err.contains("FrameUnexpected"), "expected the client to have seen GOAWAY: {err}");
    // New connections are not accepted.
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    assert!(Client::connect(cfg, Duration::from_millis(800)).is_err());
    assert!(relay.wait_dataplane(Duration::from_millis(10)).unwrap().is_none(), "still draining");
    // When the last tunnel ends, the dataplane exits 0 well before the deadline.
    c.finish_stream(s).unwrap();
    let started = Instant::now();
    let status = loop {
        let _ = c.drive(Duration::from_millis(10));
        if let Some(st) = relay.wait_dataplane(Duration::from_millis(10)).unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the dataplane did not exit when its last tunnel ended (its drain deadline is 300 s)"
        );
    };
    assert!(status.success(), "drain exit status {status:?}");
}

#[test]
fn drain_deadline_closes_tunnels_that_do_not_end() {
    let mut relay = start(
        "drain-deadline",
        RelayOptions { dataplane_extra: "drain_timeout_secs = 1".into(), ..Default::default() },
    );
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let _s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let started = Instant::now();
    relay.signal_dataplane(libc::SIGTERM);
    let status =
        relay.wait_dataplane(Duration::from_secs(8)).unwrap().expect("the dataplane exits at the deadline");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the deadline: {:?}",
        started.elapsed()
    );
    // The client is told: the connection closes with H3_NO_ERROR.
    wait_until("the connection to close", T, || {
        let _ = c.drive(Duration::from_millis(10));
        c.closed().is_some()
    });
    assert_eq!(c.closed(), Some(Some((true, 0x100))));
}

#[test]
fn relayctl_drain_drains_the_dataplane() {
    let mut relay = start("relayctl-drain", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    // The real CLI, as an operator would run it.
    let out = std::process::Command::new(relay_bench::processes::bin_dir().unwrap().join("relayctl"))
        .args(["--json", "--socket"])
        .arg(relay.admin_socket())
        .arg("drain")
        .output()
        .unwrap();
    assert!(out.status.success(), "relayctl drain: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["draining"], true);
    assert_eq!(v["flows"], 1);
    // GOAWAY arrives: the client may not open new requests.
    wait_until("GOAWAY", T, || {
        let _ = c.drive(Duration::from_millis(10));
        c.goaway_received
    });
    assert!(c.request_udp("127.0.0.1", echo.addr().port()).is_err());
    assert!(
        relay.wait_dataplane(Duration::from_millis(10)).unwrap().is_none(),
        "the open tunnel keeps it up"
    );
    c.finish_stream(s).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let _ = c.drive(Duration::from_millis(10));
        if let Some(st) = relay.wait_dataplane(Duration::from_millis(10)).unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit after the last tunnel ended");
    };
    assert!(status.success());
    // With no dataplane attached, relayctl reports the error clearly.
    wait_until("control to notice", T, || {
        admin(&relay.admin_socket(), "status")["dataplane_attached"] == false
    });
    let out = std::process::Command::new(relay_bench::processes::bin_dir().unwrap().join("relayctl"))
        .args(["--socket"])
        .arg(relay.admin_socket())
        .arg("drain")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dataplane is attached"));
}

#[test]
fn relayctl_flows_kill_ends_one_tunnel() {
    let relay = start("relayctl-kill", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let keep = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let kill = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let relayctl = |args: &[&str]| {
        std::process::Command::new(relay_bench::processes::bin_dir().unwrap().join("relayctl"))
            .arg("--socket")
            .arg(relay.admin_socket())
            .args(args)
            .output()
            .unwrap()
    };
    let out = relayctl(&["--json", "flows"]);
    assert!(out.status.success());
    let flows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> =
        flows["flows"].as_array().unwrap().iter().map(|f| f["flow_id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    // Flow IDs are allocated in order, so the second tunnel has the larger one.
    let victim = *ids.iter().max().unwrap();
    let out = relayctl(&["flows", "kill", &victim.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the killed tunnel to be reset", T, || {
        let _ = c.drive(Duration::from_millis(10));
        c.stream_finished(kill)
    });
    assert!(!c.stream_finished(keep), "only the named flow ends");
    wait_until("control to forget it", T, || admin(&relay.admin_socket(), "status")["flows"] == 1);
    let load =
        EchoLoad { count: 50, size: 100, window: 8, capsules: false, stall_timeout: Duration::from_secs(5) };
    let r = run_echo(&mut c, &[keep], &load).unwrap();
    assert_eq!((r.received, r.lost), (50, 0));
    let out = relayctl(&["flows", "kill", "999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live flow 999"));
}

/// Keyless TLS: every handshake's signature is made by control, which
/// alone holds the private key.
#[test]
fn handshakes_are_signed_by_control() {
    let relay = start("keyless", RelayOptions::default());
    let before = counter(&relay, "signs_sent");
    let mut c = client(&relay);
    c.wait_settings(T).unwrap();
    assert!(c.extended_connect_enabled());
    assert_eq!(counter(&relay, "signs_sent"), before + 1, "one signature per handshake, asked of control");
    assert_eq!(counter(&relay, "signs_failed"), 0);
}

/// Without control there is no private key: a new handshake fails at once
/// with a TLS alert (not a hang), a stalled control fails it within the ask
/// timeout, and open tunnels keep forwarding throughout.
#[test]
fn handshakes_fail_cleanly_without_control_while_tunnels_keep_forwarding() {
    let mut relay = start("keyless-down", RelayOptions { ask_timeout_ms: 1500, ..Default::default() });
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();

    relay.pause_control();
    let started = Instant::now();
    let stalled = Client::connect(client_config(&relay), Duration::from_secs(8));
    let waited = started.elapsed();
    relay.resume_control();
    let err = stalled.err().expect("no handshake without a signature").to_string();
    assert!(err.contains("failed"), "the relay ended the handshake: {err}");
    assert!(waited >= Duration::from_millis(1400), "waited for the ask timeout: {waited:?}");

    relay.kill_control();
    wait_control_down_noticed(&mut c, echo.addr().port());
    let err =
        Client::connect(client_config(&relay), Duration::from_secs(8)).err().expect("no key, no handshake");
    assert!(err.to_string().contains("failed"), "{err}");
    // Failed at once, not after an ask timeout: the dataplane knew control
    // was gone and asked nothing.
    assert!(counter_from_dataplane_is_unavailable(&relay));
    let load = EchoLoad {
        count: 200,
        size: 200,
        window: 16,
        capsules: false,
        stall_timeout: Duration::from_secs(5),
    };
    let r = run_echo(&mut c, &[s], &load).unwrap();
    assert_eq!((r.received, r.lost, r.corrupt), (200, 0, 0), "the open tunnel is unaffected");
}

fn client_config(relay: &Relay) -> ClientConfig {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    cfg
}

/// With control killed its admin socket is gone too (counters cannot be
/// read): a sanity check that the test really runs without control.
fn counter_from_dataplane_is_unavailable(relay: &Relay) -> bool {
    UnixStream::connect(relay.admin_socket()).is_err()
}

/// Address validation (RFC 9000 section 8.1.2): with the threshold at 0
/// every new client is sent a Retry and must come back with the token; the
/// connection then works as usual and keeps the connection ID the relay
/// chose (so it still reaches its worker).
#[test]
fn clients_pass_address_validation_with_retry() {
    let relay = start(
        "retry",
        RelayOptions { workers: 2, dataplane_extra: "retry_threshold = 0".into(), ..Default::default() },
    );
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let retries_before = counter(&relay, "retries_sent");
    for _ in 0..4 {
        let mut c = client(&relay);
        let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
        echo_round(&mut c, s, 20, "after a Retry");
        c.close();
    }
    assert!(counter(&relay, "retries_sent") >= retries_before + 4, "every client was retried");
    assert_eq!(counter(&relay, "retry_tokens_invalid"), 0);
    assert_eq!(counter(&relay, "handoffs_out"), 0, "the Retry's connection ID names the accepting worker");
}

fn scrape(relay: &Relay) -> String {
    use std::io::Read;
    let addr =
        admin(&relay.admin_socket(), "status")["metrics"].as_str().expect("metrics endpoint").to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// Sum of a metric's samples (over its labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_endpoint_exposes_dataplane_counters_and_latency_histograms() {
    let relay = start("metrics", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut c, s, 100, "before scraping");
    let text = scrape(&relay);
    assert!(metric(&text, "relay_dataplane_datagrams_up_total") >= 100.0, "{text}");
    assert!(metric(&text, "relay_dataplane_datagrams_down_total") >= 100.0);
    assert_eq!(metric(&text, "relay_dataplane_tunnels_active"), 1.0);
    assert!(metric(&text, "relay_auth_allowed_total") >= 1.0);
    assert!(metric(&text, "relay_signatures_total") >= 1.0, "keyless signing is counted");
    assert!(metric(&text, "relay_auth_decision_seconds_count") >= 1.0);
    assert!(metric(&text, "relay_signing_seconds_count") >= 1.0);
    assert_eq!(metric(&text, "relay_dataplane_attached"), 1.0);
    // The exposition never names targets or clients.
    assert!(!text.contains(&echo.addr().to_string()) && !text.contains("127.0.0.1"));
}

/// Keyless TLS as deployed: the dataplane runs as an unprivileged user that
/// cannot read the private key, and handshakes still succeed because
/// control signs them.
#[test]
#[ignore = "needs root (to run the dataplane as another user): run by `cargo xtask test`"]
fn the_dataplane_runs_unprivileged_without_access_to_the_key() {
    relay_bench::needs::require(&[relay_bench::needs::Need::Root]);
    const NOBODY: u32 = 65534;
    let relay = start(
        "unprivileged",
        RelayOptions {
            relay_extra: format!("dataplane_user = \"{NOBODY}\""),
            dataplane_uid: Some(NOBODY),
            ..Default::default()
        },
    );
    let pid = relay.dataplane_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == NOBODY.to_string()), "{uid_line}");
    let key = relay.state_dir.join("key.pem");
    assert!(key.exists());
    use std::os::unix::process::CommandExt;
    let read = std::process::Command::new("cat")
        .arg(&key)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!read.success(), "the dataplane's user must not be able to read the key");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut c, s, 50, "through the unprivileged dataplane");
    assert!(counter(&relay, "signs_sent") >= 1, "control signed the handshakes");
}

/// With tls.keyless = false the dataplane signs locally (an operator
/// choice for hosts where both processes are equally trusted).
#[test]
fn local_key_mode_signs_in_the_dataplane() {
    let relay =
        start("local-key", RelayOptions { tls_extra: "keyless = false".into(), ..Default::default() });
    let mut c = client(&relay);
    c.wait_settings(T).unwrap();
    assert_eq!(counter(&relay, "signs_sent"), 0, "no signature was asked of control");
    assert!(counter(&relay, "handshakes_completed") >= 1);
}

/// kill -9 of the dataplane: control notices, releases the flows it held
/// for it, and accepts the dataplane's return (a new process attaches and
/// serves).
#[test]
fn a_killed_dataplane_is_released_by_control_and_may_return() {
    let mut relay = start("dataplane-restart", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    assert_eq!(admin(&relay.admin_socket(), "status")["flows"], 1);
    relay.kill_dataplane();
    wait_until("control to release the dead dataplane", T, || {
        let v = admin(&relay.admin_socket(), "status");
        v["dataplane_attached"] == false && v["flows"] == 0
    });
    relay.start_dataplane().unwrap();
    wait_until("the new dataplane to attach", T, || {
        admin(&relay.admin_socket(), "status")["dataplane_attached"] == true
    });
    let deadline = Instant::now() + T;
    let mut c = loop {
        match Client::connect(client_config(&relay), Duration::from_millis(500)) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "the new dataplane does not serve: {e}"),
        }
    };
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut c, s, 50, "through the new dataplane");
    assert_eq!(admin(&relay.admin_socket(), "status")["flows"], 1);
}

/// `relayctl workers` (with `--json` when asked) against the relay.
fn relayctl_workers(relay: &Relay, json: bool) -> String {
    let relayctl = relay_bench::processes::bin_dir().unwrap().join("relayctl");
    let mut cmd = std::process::Command::new(&relayctl);
    cmd.arg("--socket").arg(relay.admin_socket());
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg("workers").output().unwrap();
    assert!(out.status.success(), "relayctl workers: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Whether this kernel has batched io_uring waits (`min_wait_usec`, 6.12).
fn kernel_has_min_wait() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    matches!((parts.next(), parts.next()), (Some(major), Some(minor)) if (major, minor) >= (6, 12))
}

#[test]
fn batched_waits_forward_every_datagram_and_are_counted() {
    // A long window: the worker gathers work for up to 2 ms after a busy
    // turn. Every echoed datagram still comes back, byte for byte, and the
    // io_uring worker reports its batched waits (epoll has none).
    let relay = start(
        "batched-waits",
        RelayOptions { workers: 1, dataplane_extra: "wait_batch_us = 2000".into(), ..Default::default() },
    );
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut c, s, 500, "with batched waits");
    let rows: Value = serde_json::from_str(&relayctl_workers(&relay, true)).unwrap();
    let row = &rows.as_array().unwrap()[0];
    let share = row["batched_wait_share"].as_f64().unwrap();
    let status = admin(&relay.admin_socket(), "status");
    let batched = status["workers"][0]["waits_batched"].as_u64().unwrap();
    match row["backend"].as_str() {
        Some("io_uring") if kernel_has_min_wait() => {
            assert!(batched > 0 && share > 0.0 && share <= 1.0, "batched waits {batched}, share {share}")
        }
        backend => assert_eq!((batched, share), (0, 0.0), "{backend:?} has no batched waits"),
    }
}

#[test]
fn relayctl_workers_summarises_each_worker() {
    let relay = start("relayctl-workers", RelayOptions { workers: 2, ..Default::default() });
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut c, s, 100, "before relayctl workers");
    let run = |json: bool| relayctl_workers(&relay, json);
    let rows: Value = serde_json::from_str(&run(true)).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "one row per worker");
    let total = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    assert!(total("datagrams_up") >= 100 && total("datagrams_down") >= 100);
    assert_eq!(total("tunnels"), 1);
    for r in rows {
        assert!(matches!(r["backend"].as_str(), Some("io_uring") | Some("epoll")));
        assert!(r["syscalls_per_datagram"].as_f64().is_some());
        assert_eq!(r["batched_wait_share"].as_f64(), Some(0.0), "off unless configured");
        assert_eq!(r["target_pauses"].as_u64(), Some(0), "an echo the client keeps up with never pauses");
    }
    let busy = rows.iter().find(|r| r["tunnels"] == 1).unwrap();
    assert!(busy["quic_packets_per_receive"].as_f64().unwrap() >= 1.0);
    let table = run(false);
    assert!(
        table.starts_with("WORKER")
            && table.contains("SYSCALLS/DGRAM")
            && table.contains("BATCHED WAITS")
            && table.contains("TARGET PAUSES")
            && table.lines().count() == 3,
        "{table}"
    );
}

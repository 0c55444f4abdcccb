//! Bound connect-udp (draft-ietf-masque-connect-udp-listen) end to end:
//! the client learns its public mapping through the relay from a real STUN
//! server (coturn's `turnserver --stun-only`) in a target namespace, and
//! the mapping must equal the relay's Proxy-Public-Address; a peer in the
//! same namespace is filtered until the client has sent to it, then its
//! datagrams reach the client with its address, uncompressed first and on
//! a compressed context once the relay has registered one; a client-
//! registered compressed context carries datagrams to a peer.
//!
//! Needs root (a network namespace), ip and turnserver, and for the HTTP/2
//! and HTTP/1.1 test the interop venv: the tests are ignored by a plain
//! `cargo test`, run by `cargo xtask test` where those are present, and
//! fail naming what is missing when run elsewhere.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relay_bench::bindclient::{BoundTunnel, stun_binding_request, stun_mapped_address};
use relay_bench::client::{Client, ClientConfig};
use relay_bench::needs::{Need, require};
use relay_bench::netns::TargetNetns;
use relay_bench::processes::{Relay, RelayOptions};

const T: Duration = Duration::from_secs(10);

struct Stun(Child);

impl Drop for Stun {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_stun(ns: &str, addr: IpAddr) -> Stun {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "turnserver", "-n", "--stun-only", "--no-auth", "--no-cli"])
        .args(["-L", &addr.to_string(), "-p", "3478", "--log-file", "stdout", "--simple-log"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver starts");
    Stun(child)
}

#[test]
#[ignore = "needs root, ip and turnserver (coturn): run by `cargo xtask test`"]
fn bound_udp_learns_its_mapping_by_stun_and_reaches_filtered_peers_both_context_kinds() {
    require(&[Need::Root, Need::Ip, Need::Turnserver]);
    let pid = std::process::id();
    let n = 120 + (pid % 30) as u8;
    let target = TargetNetns::create(&format!("rbind{pid}"), n).unwrap();
    let stun_addr = SocketAddr::new(target.target_addr, 3478);
    let _stun = start_stun(&target.name, target.target_addr);
    // The relay host has two addresses towards the namespace; the kernel
    // would pick the link's own as the source. The relay announces the
    // second one and must send from it for the tunnel's whole life (draft
    // section 7: one announced tuple means one public IP and port).
    let announced: IpAddr = format!("10.251.{n}.1").parse().unwrap();
    target.add_host_address(announced).unwrap();

    let dir = std::env::temp_dir().join(format!("relay-bind-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = RelayOptions {
        allow: vec!["127.0.0.0/8".into(), format!("10.250.{n}.0/30")],
        extra_config: format!(
            "[protocols]\nbind = true\n\n[bind]\npublic_addresses = [\"{announced}\"]\ninbound_filter = \"sent_to\"\n"
        ),
        ..Default::default()
    };
    let relay = Relay::start(&dir, &opts).expect("relay starts with bind");
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    let mut c = Client::connect(cfg, T).unwrap();
    c.wait_settings(T).unwrap();
    let mut t = BoundTunnel::open(&mut c, T).expect("bound tunnel");
    assert_eq!(t.public.len(), 1, "{:?}", t.public);
    let public = t.public[0];
    assert_eq!(public.ip(), announced, "one tuple: the family's announced address (IPv4 only here)");
    assert_ne!(public.port(), 0);
    t.open_uncompressed(&mut c, T).unwrap();

    // STUN through the relay (retried while turnserver starts).
    let tx = *b"masque-bind!";
    let deadline = Instant::now() + T;
    let mapped = loop {
        assert!(Instant::now() < deadline, "no STUN answer through the bound tunnel");
        t.send_to(&mut c, stun_addr, &stun_binding_request(tx)).unwrap();
        c.flush().unwrap();
        let got = t.recv(&mut c, Duration::from_millis(200)).unwrap();
        if let Some(m) = got
            .iter()
            .filter(|(from, ..)| *from == stun_addr)
            .find_map(|(_, p, _)| stun_mapped_address(p, tx))
        {
            break m;
        }
    };
    assert_eq!(mapped, public, "the STUN server sees the address the relay announced");

    // A peer that sends first is filtered (the client never sent to it).
    let peer_addr = SocketAddr::new(target.target_addr, 5555);
    let ns = target.name.clone();
    let peer = std::thread::spawn(move || -> Vec<Vec<u8>> {
        TargetNetns::enter(&ns).unwrap();
        let s = UdpSocket::bind(peer_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.send_to(b"unsolicited", public).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        // Answer the client 20 times, then collect what it sends on its
        // compressed context.
        let (n, from) = s.recv_from(&mut buf).expect("the client's first datagram");
        assert_eq!(from, public, "datagrams come from the announced address");
        got.push(buf[..n].to_vec());
        for i in 0..20u8 {
            s.send_to(&[b'r', i], public).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
            if got.len() >= 4 {
                break;
            }
        }
        got
    });
    let filtered_deadline = Instant::now() + T;
    while relay.counter("bind_filtered").unwrap() == 0 {
        assert!(Instant::now() < filtered_deadline, "the unsolicited datagram was not filtered and counted");
        let got = t.recv(&mut c, Duration::from_millis(50)).unwrap();
        assert!(got.iter().all(|(from, ..)| *from != peer_addr), "an unsolicited peer got through: {got:?}");
        assert!(Instant::now() < filtered_deadline);
    }

    // The client sends to the peer: from now on its datagrams come in,
    // with its address; the relay registers a compressed context for it.
    t.send_to(&mut c, peer_addr, b"hello peer").unwrap();
    c.flush().unwrap();
    let mut replies = Vec::new();
    let deadline = Instant::now() + T;
    while replies.len() < 20 && Instant::now() < deadline {
        for (from, payload, compressed) in t.recv(&mut c, Duration::from_millis(20)).unwrap() {
            // Late answers to the retried STUN requests may still arrive.
            if from == stun_addr {
                continue;
            }
            assert_eq!(from, peer_addr);
            replies.push((payload, compressed));
        }
    }
    assert!(replies.len() >= 15, "the peer's replies reached the client: {}", replies.len());
    assert!(!replies[0].1, "the first reply comes uncompressed, address inline");
    assert!(
        replies.iter().any(|(_, compressed)| *compressed),
        "later replies use the relay's compressed context"
    );
    assert!(replies.iter().all(|(p, _)| p.len() == 2 && p[0] == b'r'));

    // A client-registered compressed context to a second peer port... and
    // to the first peer (already compressed by the relay: it keeps one).
    assert!(t.context_for(peer_addr).is_some_and(|(_, inline)| !inline));
    for i in 0..3u8 {
        t.send_to(&mut c, peer_addr, &[b'c', i]).unwrap();
    }
    c.flush().unwrap();
    let got = peer.join().expect("peer thread");
    assert_eq!(got[0], b"hello peer");
    assert!(got[1..].iter().all(|p| p[0] == b'c'), "compressed datagrams reached the peer: {got:?}");

    // Closing the uncompressed context: a new peer is not registered.
    t.close_uncompressed(&mut c).unwrap();
    let other: SocketAddr = SocketAddr::new(target.target_addr, 5556);
    assert!(t.context_for(other).is_none());
    assert!(t.compress(&mut c, other, T).unwrap(), "a client-registered compressed context is accepted");
    let denied: SocketAddr = "192.168.77.1:9".parse().unwrap();
    assert!(!t.compress(&mut c, denied, T).unwrap(), "a peer outside the target policy is refused (CLOSE)");
    drop(relay);
    drop(target);
}

/// Bound UDP is version-independent (the draft's section 2): over HTTP/2
/// (TLS with ALPN h2, and cleartext h2c) and over HTTP/1.1 (the Upgrade
/// form of RFC 9298 section 3.2), driven by an independent client (the
/// Python `h2` package; a plain socket for HTTP/1.1), the relay confirms
/// the extension, announces its public address, acknowledges the
/// uncompressed context, and a STUN Binding request through the tunnel
/// reaches the STUN server from exactly that address.
#[test]
#[ignore = "needs root, ip, turnserver (coturn) and the interop venv: run by `cargo xtask test`"]
fn bound_udp_over_http2_and_http1_learns_its_mapping_by_stun() {
    require(&[Need::Root, Need::Ip, Need::Turnserver, Need::InteropVenv]);
    let python = relay_bench::interop::python();
    let pid = std::process::id();
    let n = 150 + (pid % 30) as u8;
    let target = TargetNetns::create(&format!("rbindt{pid}"), n).unwrap();
    let stun_addr = SocketAddr::new(target.target_addr, 3478);
    let _stun = start_stun(&target.name, target.target_addr);

    let dir = std::env::temp_dir().join(format!("relay-bind-tcp-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = RelayOptions {
        allow: vec!["127.0.0.0/8".into(), format!("10.250.{n}.0/30")],
        extra_config: format!(
            "[protocols]\nbind = true\n\n[bind]\npublic_addresses = [\"{}\"]\n",
            target.host_addr
        ),
        tcp_cleartext: true,
        ..Default::default()
    };
    let relay = Relay::start(&dir, &opts).expect("relay starts with bind and the TCP front");
    let tls = vec![
        "--relay".to_string(),
        relay.addr.to_string(),
        "--tls".into(),
        "--ca".into(),
        relay.cert().display().to_string(),
    ];
    let clear = vec!["--relay".to_string(), relay.cleartext_addr.unwrap().to_string()];
    for (version, mut args, status) in
        [("HTTP/2 over TLS", tls, 200), ("h2c", clear.clone(), 200), ("HTTP/1.1", clear, 101)]
    {
        args.extend(["--token".into(), relay.token.clone(), "--stun".into(), stun_addr.to_string()]);
        if version == "HTTP/1.1" {
            args.push("--http1".into());
        }
        args.push("bind_stun".into());
        // Retried while turnserver starts (its first seconds).
        let deadline = Instant::now() + T;
        let r = loop {
            let results = relay_bench::interop::run_h2_client(&python, &args);
            match results {
                Ok(mut r) if r["bind_stun"]["mapped"].is_string() => break r.remove("bind_stun").unwrap(),
                other => assert!(Instant::now() < deadline, "{version}: no STUN answer: {other:?}"),
            }
        };
        assert_eq!(r["status"], status, "{version}: {r}");
        assert_eq!(r["bind"], "?1", "{version}: the relay confirms the extension: {r}");
        assert_eq!(r["acked"], true, "{version}: COMPRESSION_ACK for the uncompressed context: {r}");
        let public = r["public"].as_array().unwrap();
        assert_eq!(public.len(), 1, "{version}: {r}");
        let public: SocketAddr = public[0].as_str().unwrap().parse().unwrap();
        assert_eq!(public.ip(), target.host_addr, "{version}: {r}");
        assert_eq!(r["mapped"], public.to_string(), "{version}: the STUN server sees the announced address");
        assert_eq!(r["from"], stun_addr.to_string(), "{version}: the answer comes with the server's address");
    }
    drop(relay);
    drop(target);
}

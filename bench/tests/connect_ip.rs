//! connect-ip (RFC 9484) end to end with real kernel networking: the relay
//! runs with its TUN devices in the test's namespace, the client in a
//! client namespace (its own TUN device, assigned addresses and routes from
//! the relay), the targets in a target namespace; veth links join them.
//! ping and TCP bulk transfers over IPv4 and IPv6 must cross the tunnel;
//! packets outside the tunnel's scope or from unassigned sources are dropped,
//! counted and answered with ICMP; address requests are honoured or refused.
//!
//! Needs root (namespaces, TUN devices), /dev/net/tun, ip, ping and
//! python3: ignored by a plain `cargo test`, run by `cargo xtask test` where
//! those are present, and failing naming what is missing when run
//! elsewhere.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use relay_bench::client::{Client, ClientConfig};
use relay_bench::ipnet::IpTopology;
use relay_bench::iptunnel::{self, ClientTun, DEFAULT_IP_TEMPLATE};
use relay_bench::needs::{Need, require};
use relay_bench::netns::TargetNetns;
use relay_bench::processes::{Relay, RelayOptions};
use relay_bench::wait::PATIENCE;
use relay_proto::ip::capsule::{self as ipcap, IpCapsule, IpPrefix, RequestedAddress};
use relay_proto::ip::echo;

const T: Duration = Duration::from_secs(10);

/// Runs a command with a deadline; returns (success, output).
fn run_bounded(args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command starts");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return (status.success(), text);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            return (false, format!("timed out: {}", String::from_utf8_lossy(&out.stderr)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An IPv4 UDP packet (no UDP checksum, valid IP header checksum).
fn udp4(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else { panic!("IPv4 only") };
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    let sum = {
        let mut acc: u32 = p.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    };
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp_len = (8 + payload.len()) as u16;
    p.extend_from_slice(&4000u16.to_be_bytes());
    p.extend_from_slice(&4001u16.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Waits for an ICMP (v4) datagram on the tunnel and returns (type, code).
/// The relay's IPv6 link MTU probe on `stream` (RFC 9484 section 7.2).
fn wait_link_probe(c: &mut Client, stream: u64) -> Vec<u8> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        c.drive(Duration::from_millis(10)).unwrap();
        for p in c.take_datagrams(stream) {
            if echo::parse(&p)
                .is_some_and(|e| e.kind == echo::EchoKind::Request && e.src == echo::TUNNEL_LINK_LOCAL)
            {
                return p;
            }
        }
    }
    panic!("no link probe came through the tunnel");
}

fn wait_icmp(c: &mut Client, stream: u64) -> (u8, u8) {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        c.drive(Duration::from_millis(10)).unwrap();
        for p in c.take_datagrams(stream) {
            if p.len() >= 22 && p[0] >> 4 == 4 && p[9] == 1 {
                let ihl = usize::from(p[0] & 0xf) * 4;
                return (p[ihl], p[ihl + 1]);
            }
        }
    }
    panic!("no ICMP error came back through the tunnel");
}

const TCP_ECHO_SERVER: &str = r#"
import socket, sys
family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
s.settimeout(60)
c, _ = s.accept()
c.settimeout(60)
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)
c.close()
"#;

const TCP_BULK_CLIENT: &str = r#"
import hashlib, random, socket, sys, threading
family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
size = int(sys.argv[3])
source = (sys.argv[4], 0) if len(sys.argv) > 4 else None
data = random.Random(7).randbytes(size)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60, source_address=source)
got = bytearray()
def reader():
    while len(got) < size:
        d = s.recv(65536)
        if not d:
            break
        got.extend(d)
t = threading.Thread(target=reader)
t.start()
s.sendall(data)
t.join(60)
s.shutdown(socket.SHUT_WR)
if bytes(got) != data:
    print("MISMATCH", len(got), size)
    sys.exit(1)
print("OK", hashlib.sha256(got).hexdigest())
"#;

/// Runs `args` in namespace `ns`, or on the host when `None`.
fn in_ns(ns: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = match ns {
        Some(ns) => ["ip", "netns", "exec", ns].iter().map(|s| s.to_string()).collect(),
        None => Vec::new(),
    };
    all.extend(args.iter().map(|s| s.to_string()));
    all
}

/// Transfers `size` bytes to an echo server at `server` (in the target
/// namespace) from the client namespace, through the tunnel, byte for byte.
fn tcp_bulk(target_ns: &str, client_ns: &str, server: IpAddr, port: u16, size: usize) {
    tcp_echo_transfer(Some(target_ns), Some(client_ns), server, None, port, size);
}

/// Sends `size` bytes from a client in `client_ns` (the host if `None`,
/// from `source` if given) to an echo server at `server` in `server_ns`
/// and checks the echo byte for byte.
fn tcp_echo_transfer(
    server_ns: Option<&str>,
    client_ns: Option<&str>,
    server: IpAddr,
    source: Option<IpAddr>,
    port: u16,
    size: usize,
) {
    let addr = server.to_string();
    let port = port.to_string();
    let srv_args = in_ns(server_ns, &["python3", "-c", TCP_ECHO_SERVER, &addr, &port]);
    let mut srv = Command::new(&srv_args[0])
        .args(&srv_args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("echo server starts");
    // The server says when it listens.
    let stdout = srv.stdout.take().expect("the echo server's stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(PATIENCE);
    if ready.as_deref().map(str::trim) != Ok("listening") {
        let _ = srv.kill();
        let out = srv.wait_with_output().expect("the echo server's output");
        panic!(
            "the echo server at {addr} did not listen: {ready:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let size = size.to_string();
    let source = source.map(|s| s.to_string());
    let mut client_args = vec!["python3", "-c", TCP_BULK_CLIENT, &addr, &port, &size];
    client_args.extend(source.as_deref());
    let client_args = in_ns(client_ns, &client_args);
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let (ok, out) = run_bounded(&client_args, Duration::from_secs(90));
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(ok && out.contains("OK"), "TCP transfer to {addr} through the tunnel: {out}");
}

#[test]
#[ignore = "needs root, /dev/net/tun, ip, ping and python3: run by `cargo xtask test`"]
fn connect_ip_carries_ping_and_tcp_over_ipv4_and_ipv6_and_enforces_scope() {
    require(&[Need::Root, Need::Tun, Need::Ip, Need::Ping, Need::Python3]);
    let pid = std::process::id();
    let topo = IpTopology::create(pid % 40).expect("namespaces");
    let (target, client_ns, target_v6) = (&topo.target, &topo.client, topo.target_v6);

    let dir = std::env::temp_dir().join(format!("relay-connect-ip-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let pool = 200 + (pid % 50);
    let opts = RelayOptions {
        listen_ip: client_ns.host_addr,
        allow: vec!["127.0.0.0/8".into(), topo.target_prefixes[0].clone(), topo.target_prefixes[1].clone()],
        extra_config: format!(
            "[protocols]\nconnect_ip = true\n\n[connect_ip]\nipv4_pool = \"10.89.{pool}.0/24\"\nipv6_pool = \"fd89:{pool}::/120\"\ninterface_prefix = \"mq{pid}w\"\nmtu_probe = \"echo\"\nmtu_probe_timeout_ms = 60000\n"
        ),
        ..Default::default()
    };
    let mut relay = Relay::start(&dir, &opts).expect("relay starts with connect-ip");
    let relay_addr: SocketAddr = relay.addr;

    // The client: its own namespace, TUN device and routes, on a thread.
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let client_thread = {
        let stop = stop.clone();
        let ns = client_ns.name.clone();
        let cert = relay.cert();
        let token = relay.token.clone();
        let only: Vec<IpPrefix> = topo.target_prefixes.iter().map(|p| p.parse().unwrap()).collect();
        std::thread::spawn(move || {
            TargetNetns::enter(&ns).expect("enter the client namespace");
            let mut cfg = ClientConfig::new(relay_addr);
            cfg.ca = Some(cert);
            cfg.token = Some(token);
            let mut c = Client::connect(cfg, T).expect("client connects");
            c.wait_settings(T).unwrap();
            let tunnel = iptunnel::open(&mut c, DEFAULT_IP_TEMPLATE, "*", "*", T).expect("connect-ip tunnel");
            let tun =
                ClientTun::create("mqc0", 1280, &tunnel.config, &only, relay_addr.ip()).expect("client TUN");
            ready_tx.send(tunnel.config.clone()).unwrap();
            iptunnel::pump(&mut c, &tunnel, &tun, &stop, Some(Duration::from_secs(240))).expect("pump")
        })
    };
    let config = ready_rx.recv_timeout(T * 2).expect("the client got its addresses and routes");
    assert!(config.addresses.iter().any(|a| a.addr.is_ipv4() && a.len == 32), "{config:?}");
    assert!(config.addresses.iter().any(|a| a.addr.is_ipv6() && a.len == 128), "{config:?}");
    assert!(
        config.addresses.iter().all(|a| a.addr.to_string().starts_with(&format!("10.89.{pool}."))
            || a.addr.to_string().starts_with(&format!("fd89:{pool}::"))),
        "addresses from the pools: {config:?}"
    );
    // The routes are the scope (everything) less the denied space: the
    // target subnets are in (allowed explicitly), loopback's other ranges
    // and private space are not.
    let routed = |ip: &str| config.routes.iter().any(|r| r.contains(ip.parse().unwrap()));
    assert!(routed(&target.target_addr.to_string()) && routed(&target_v6.to_string()), "{:?}", config.routes);
    assert!(
        !routed("192.168.1.1") && !routed("169.254.169.254") && !routed("fe80::1"),
        "{:?}",
        config.routes
    );

    // ping over IPv4 and IPv6 through the tunnel.
    let tun_in_before = relay.counter("tun_packets_in").unwrap();
    let (ok, out) = run_bounded(
        &[
            "ip",
            "netns",
            "exec",
            &client_ns.name,
            "ping",
            "-c",
            "3",
            "-W",
            "3",
            &target.target_addr.to_string(),
        ],
        Duration::from_secs(30),
    );
    assert!(ok, "IPv4 ping through the tunnel: {out}");
    let (ok, out) = run_bounded(
        &["ip", "netns", "exec", &client_ns.name, "ping", "-6", "-c", "3", "-W", "3", &target_v6.to_string()],
        Duration::from_secs(30),
    );
    assert!(ok, "IPv6 ping through the tunnel: {out}");
    assert!(relay.counter("tun_packets_out").unwrap() >= 6, "the pings went through the relay's TUN devices");
    assert!(relay.counter("tun_packets_in").unwrap() >= tun_in_before + 6, "and their replies came back");

    // RFC 9484 section 7.2: the relay probed the IPv6 link with a 1280-byte
    // Echo Request from its link-local end, and the client's kernel (a real
    // IP stack behind its TUN device) answered it in full through the
    // tunnel. Bounded wait; the relay's probe timeout is far longer.
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.counter("ip_mtu_probes_confirmed").unwrap() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(relay.counter("ip_mtu_probes_confirmed").unwrap(), 1, "the client's stack answered the probe");
    assert!(relay.counter("ip_mtu_probes_sent").unwrap() >= 1);
    assert_eq!(relay.counter("ip_mtu_probe_failures").unwrap(), 0);

    // TCP bulk both ways, byte for byte, over IPv4 and IPv6. The client's
    // segments reach the relay's TUN device in runs (one QUIC receive batch
    // after another): with the offloads, runs of one flow are written as one
    // GSO packet.
    let (gso_writes, coalesced) =
        (relay.counter("tun_gso_writes").unwrap(), relay.counter("tun_coalesced_packets").unwrap());
    tcp_bulk(&target.name, &client_ns.name, target.target_addr, 5201, 4 << 20);
    tcp_bulk(&target.name, &client_ns.name, target_v6, 5202, 2 << 20);
    assert!(
        relay.counter("tun_gso_writes").unwrap() > gso_writes,
        "client segments were coalesced on TUN writes"
    );
    assert!(
        relay.counter("tun_coalesced_packets").unwrap()
            >= coalesced + 2 * (relay.counter("tun_gso_writes").unwrap() - gso_writes),
        "each coalesced write carries two packets or more"
    );

    // TCP from the relay host itself to the client's tunnel address (from
    // the host's address on the target link, which the tunnel's routes
    // include): the host's stack hands the TUN device TSO packets of up to
    // 64 KiB, which the relay cuts into the packets the tunnel carries.
    let gso_reads = relay.counter("tun_gso_reads").unwrap();
    let mine_v4 = config.addresses.iter().find(|a| a.addr.is_ipv4()).unwrap().addr;
    let mine_v6 = config.addresses.iter().find(|a| a.addr.is_ipv6()).unwrap().addr;
    tcp_echo_transfer(Some(&client_ns.name), None, mine_v4, Some(target.host_addr), 5203, 4 << 20);
    let host_v6: IpAddr = match target_v6 {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[15] = 1;
            IpAddr::from(o)
        }
        v4 => v4,
    };
    tcp_echo_transfer(Some(&client_ns.name), None, mine_v6, Some(host_v6), 5204, 2 << 20);
    assert!(
        relay.counter("tun_gso_reads").unwrap() > gso_reads,
        "GSO packets were read from the TUN device and split"
    );

    // Scope and source enforcement, with raw packets on a second tunnel.
    let mut cfg = ClientConfig::new(relay_addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    let mut c = Client::connect(cfg, T).unwrap();
    c.wait_settings(T).unwrap();
    let scoped =
        iptunnel::open(&mut c, DEFAULT_IP_TEMPLATE, &target.target_addr.to_string(), "17", T).unwrap();
    let mine = scoped.config.addresses.iter().find(|a| a.addr.is_ipv4()).unwrap().addr;
    // This client has no IP stack behind it: it answers the relay's link
    // probe itself (an Echo Reply with the probe's data, to fe80::6d:6173:7175:65).
    let probe = wait_link_probe(&mut c, scoped.stream_id);
    let IpAddr::V6(probed) = scoped.config.addresses.iter().find(|a| a.addr.is_ipv6()).unwrap().addr else {
        unreachable!()
    };
    assert_eq!(probe.len(), 1280);
    c.send_context_datagram(scoped.stream_id, 0, &echo::reply(&probe, probed).unwrap()).unwrap();
    c.flush().unwrap();
    let deadline = Instant::now() + T;
    while relay.counter("ip_mtu_probes_confirmed").unwrap() < 2 && Instant::now() < deadline {
        c.drive(Duration::from_millis(20)).unwrap();
    }
    assert_eq!(
        relay.counter("ip_mtu_probes_confirmed").unwrap(),
        2,
        "the hand-made reply confirmed the link"
    );
    assert_eq!(scoped.config.routes.len(), 1, "{:?}", scoped.config.routes);
    assert_eq!(scoped.config.routes[0].ip_protocol, 17);
    let out_before = relay.counter("drop_ip_out_of_scope").unwrap();
    c.send_context_datagram(scoped.stream_id, 0, &udp4(mine, "8.8.8.8".parse().unwrap(), b"out of scope"))
        .unwrap();
    c.flush().unwrap();
    // ICMP destination unreachable, administratively prohibited (3/13).
    assert_eq!(wait_icmp(&mut c, scoped.stream_id), (3, 13));
    assert!(relay.counter("drop_ip_out_of_scope").unwrap() > out_before, "counted");
    let bad_before = relay.counter("drop_ip_bad_source").unwrap();
    let spoofed: IpAddr = format!("10.89.{pool}.99").parse().unwrap();
    c.send_context_datagram(scoped.stream_id, 0, &udp4(spoofed, target.target_addr, b"spoofed")).unwrap();
    c.flush().unwrap();
    assert_eq!(wait_icmp(&mut c, scoped.stream_id), (3, 13), "source failed ingress policy");
    assert!(relay.counter("drop_ip_bad_source").unwrap() > bad_before, "counted");

    // ADDRESS_REQUEST per the pool (RFC 9484 section 4.7.2): our own
    // address is honoured at once; a free address in this worker's share of
    // the pool is leased by control and joins the assignment; one in the
    // other worker's share (routed to its TUN device) and a third of the
    // family are refused (all-zero).
    let octets = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.octets(),
        _ => unreachable!(),
    };
    let other_tunnel_v4 = config.addresses.iter().find(|a| a.addr.is_ipv4()).unwrap().addr;
    let half = octets(mine)[3] & 0x80;
    let free: IpAddr = (77u8..120)
        .map(|n| IpAddr::from([10, 89, pool as u8, half | n]))
        .find(|a| *a != mine && *a != other_tunnel_v4)
        .unwrap();
    let other_share: IpAddr = IpAddr::from([10, 89, pool as u8, (half ^ 0x80) | 77]);
    let request = |c: &mut Client, list: Vec<RequestedAddress>| {
        let mut capsule = Vec::new();
        ipcap::encode(&IpCapsule::AddressRequest(list), &mut capsule);
        c.send_stream_bytes(scoped.stream_id, &capsule, false).unwrap();
    };
    // Every ADDRESS_ASSIGN until each of `ids` is answered; the last full list.
    let answers_to = |c: &mut Client, ids: &[u64]| {
        let deadline = Instant::now() + T;
        let (mut answers, mut last) = (Vec::new(), Vec::new());
        while !ids
            .iter()
            .all(|id| answers.iter().any(|a: &relay_proto::ip::capsule::AssignedAddress| a.request_id == *id))
            && Instant::now() < deadline
        {
            c.drive(Duration::from_millis(10)).unwrap();
            for (t, v) in c.take_control_capsules(scoped.stream_id) {
                if let Ok(Some(IpCapsule::AddressAssign(list))) = ipcap::decode(t, &v) {
                    answers.extend(list.iter().copied());
                    last = list;
                }
            }
        }
        (answers, last)
    };
    request(
        &mut c,
        vec![
            RequestedAddress { request_id: 7, prefix: IpPrefix::host(mine) },
            RequestedAddress { request_id: 8, prefix: IpPrefix::host(free) },
            RequestedAddress { request_id: 9, prefix: IpPrefix::host(other_share) },
        ],
    );
    let (answers, last) = answers_to(&mut c, &[7, 8, 9]);
    let of = |id: u64| answers.iter().find(|a| a.request_id == id).map(|a| a.prefix);
    assert_eq!(of(7), Some(IpPrefix::host(mine)), "{answers:?}");
    assert_eq!(of(8), Some(IpPrefix::host(free)), "a free address of the pool is leased: {answers:?}");
    assert_eq!(
        of(9),
        Some(IpPrefix::host("0.0.0.0".parse().unwrap())),
        "the other worker's share: {answers:?}"
    );
    assert!(
        last.iter().any(|a| a.prefix.addr == mine) && last.iter().any(|a| a.prefix.addr == free),
        "the full list holds both addresses: {last:?}"
    );
    // The new address is the client's now: its packets pass the source check.
    let (bad_before, out_before) =
        (relay.counter("drop_ip_bad_source").unwrap(), relay.counter("tun_packets_out").unwrap());
    c.send_context_datagram(scoped.stream_id, 0, &udp4(free, target.target_addr, b"from the new address"))
        .unwrap();
    c.flush().unwrap();
    let deadline = Instant::now() + T;
    while relay.counter("tun_packets_out").unwrap() == out_before && Instant::now() < deadline {
        c.drive(Duration::from_millis(20)).unwrap();
    }
    assert!(relay.counter("tun_packets_out").unwrap() > out_before, "written to the TUN device");
    assert_eq!(relay.counter("drop_ip_bad_source").unwrap(), bad_before, "not a spoofed source");
    // Two IPv4 addresses is the most one tunnel holds.
    let next_free: IpAddr = (77u8..120)
        .map(|n| IpAddr::from([10, 89, pool as u8, half | n]))
        .find(|a| *a != mine && *a != other_tunnel_v4 && *a != free)
        .unwrap();
    request(&mut c, vec![RequestedAddress { request_id: 10, prefix: IpPrefix::host(next_free) }]);
    let (answers, _) = answers_to(&mut c, &[10]);
    let of = |id: u64| answers.iter().find(|a| a.request_id == id).map(|a| a.prefix);
    assert_eq!(of(10), Some(IpPrefix::host("0.0.0.0".parse().unwrap())), "{answers:?}");

    // A request waiting for control when control is replaced is refused:
    // the new control never saw it. (Control is paused so the ask cannot be
    // answered first, then killed and started again.)
    let mine_v6 = scoped.config.addresses.iter().find(|a| a.addr.is_ipv6()).unwrap().addr;
    let IpAddr::V6(v6) = mine_v6 else { unreachable!() };
    let mut wanted = v6.octets();
    wanted[15] = (wanted[15] & 0x80) | if wanted[15] & 0x7f == 90 { 91 } else { 90 };
    let wanted = IpAddr::from(wanted);
    relay.pause_control();
    request(&mut c, vec![RequestedAddress { request_id: 12, prefix: IpPrefix::host(wanted) }]);
    c.drive(Duration::from_millis(200)).unwrap();
    relay.kill_control();
    relay.start_control().expect("control starts again");
    let (answers, _) = answers_to(&mut c, &[12]);
    let of = |id: u64| answers.iter().find(|a| a.request_id == id).map(|a| a.prefix);
    assert_eq!(of(12), Some(IpPrefix::host("::".parse().unwrap())), "refused on relink: {answers:?}");

    stop.store(true, Ordering::Relaxed);
    let stats = client_thread.join().expect("client thread");
    assert!(stats.up > 100 && stats.down > 100, "the client pumped traffic: {stats:?}");
    drop(relay);
    drop(topo);
}

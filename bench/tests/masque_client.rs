//! `masque-client` end to end against a real relay (both processes): the
//! UDP forwarder on HTTP/3 and HTTP/2 (local peers' datagrams echoed by a
//! UDP echo target, byte for byte), the SOCKS5 server driven by independent
//! clients (curl `--socks5-hostname` for CONNECT, PySocks for UDP
//! ASSOCIATE), and connect-ip mode on a TUN device in a network namespace
//! (ping through the relay).
//!
//! The binary runs as a child process, exactly as a user runs it; every
//! wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_bench::echo::EchoServer;
use relay_bench::interop;
use relay_bench::needs::{Need, require};
use relay_bench::processes::{Relay, RelayOptions};
use relay_bench::wait::{PATIENCE, wait_until};

/// A running `masque-client`; killed on drop.
struct MasqueClient {
    child: Child,
    /// Its first stdout line (what it serves on).
    banner: String,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl MasqueClient {
    /// Starts `masque-client ARGS` (through `prefix`, e.g. `ip netns exec
    /// NS`) with `env`, and waits for its banner.
    fn start(prefix: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        let bin = env!("CARGO_BIN_EXE_masque-client");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args).env_remove("MASQUE_TOKEN").env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("masque-client starts");
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("stderr");
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let banner = match stdout.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("masque-client {args:?} printed no banner; stderr: {:?}", stderr.lock().unwrap());
            }
        };
        Self { child, banner, stdout, stderr }
    }

    /// The local address in the banner (`... on ADDR ...` or `UDP ADDR`).
    fn local_addr(&self) -> SocketAddr {
        self.banner
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in the banner {:?}", self.banner))
    }

    /// Whether a line of its stderr contains `text`.
    fn logged(&self, text: &str) -> bool {
        self.stderr.lock().unwrap().iter().any(|l| l.contains(text))
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for MasqueClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_relay(name: &str) -> (Relay, PathBuf) {
    let dir = std::env::temp_dir().join(format!("relay-masque-client-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let relay = Relay::start(&dir, &RelayOptions::default()).expect("relay starts");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{}\n", relay.token)).unwrap();
    (relay, token_file)
}

/// The relay arguments every mode shares: the relay by name (`localhost`,
/// resolved and verified as such), its certificate, the token file.
fn relay_args(relay: &Relay, token_file: &Path, http: &str) -> Vec<String> {
    vec![
        "--relay".into(),
        format!("localhost:{}", relay.addr.port()),
        "--ca".into(),
        relay.cert().display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--http".into(),
        http.into(),
    ]
}

/// Sends `payload` from `sock` to `to` until its echo comes back (at most
/// 10 tries of 2 s: the first waits for the tunnel to open).
fn echo_once(sock: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        sock.send_to(payload, to).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == to && &buf[..n] == payload => return buf[..n].to_vec(),
                Ok(_) => continue, // an echo of an earlier try
                Err(_) => break,
            }
        }
    }
    panic!("no echo of {} bytes from {to}", payload.len());
}

/// A UDP echo target on 127.0.0.1 and, on the same port, on ::1: the
/// relay resolves `localhost` to both and may pick either.
fn dual_stack_echo() -> (EchoServer, EchoServer) {
    for _ in 0..64 {
        let v4 = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        if let Ok(v6) = EchoServer::start(SocketAddr::new("::1".parse().unwrap(), v4.addr().port())) {
            return (v4, v6);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

fn strings(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn udp_forwarder_echoes_every_peers_datagrams_through_the_relay_on_http3_and_http2() {
    let (relay, token_file) = start_relay("udp");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    for http in ["3", "2"] {
        let target = echo.addr().to_string();
        let mut args = vec!["udp".to_string()];
        args.extend(relay_args(&relay, &token_file, http));
        args.extend(["--listen", "127.0.0.1:0", "--target", &target].map(String::from));
        let fwd = MasqueClient::start(&[], &strings(&args), &[]);
        assert!(fwd.banner.contains(if http == "3" { "HTTP/3" } else { "HTTP/2" }), "{}", fwd.banner);
        let local = fwd.local_addr();
        // Two local peers, each with its own tunnel; payloads of several
        // sizes, byte for byte.
        let peers = [UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap()];
        let before = echo.echoed();
        for round in 0..20u32 {
            for (p, sock) in peers.iter().enumerate() {
                let size = [1, 100, 1000, 1200][(round as usize + p) % 4];
                let payload: Vec<u8> =
                    (0..size).map(|i| (i as u32 * 7 + round * 13 + p as u32) as u8).collect();
                assert_eq!(echo_once(sock, local, &payload), payload, "HTTP/{http} peer {p} round {round}");
            }
        }
        assert!(echo.echoed() >= before + 40, "the datagrams went through the echo target");
        wait_until("two tunnels, one per peer, in the client's log", PATIENCE, || {
            fwd.stderr.lock().unwrap().iter().filter(|l| l.contains("opening a tunnel")).count() == 2
        });
    }
}

#[test]
fn udp_forwarder_reconnects_when_the_relay_restarts_on_http3_and_http2() {
    let (mut relay, token_file) = start_relay("restart");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    for http in ["3", "2"] {
        let target = echo.addr().to_string();
        let mut args = vec!["udp".to_string()];
        args.extend(relay_args(&relay, &token_file, http));
        args.extend(["--listen", "127.0.0.1:0", "--target", &target].map(String::from));
        let fwd = MasqueClient::start(&[], &strings(&args), &[]);
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(echo_once(&peer, fwd.local_addr(), b"before"), b"before");
        relay.kill_dataplane();
        relay.start_dataplane().expect("the dataplane starts again");
        // The connection is gone (a stateless reset, or the TCP
        // connection's end): the tunnel ends and the next datagram opens a
        // new one on a new connection.
        assert_eq!(echo_once(&peer, fwd.local_addr(), b"after"), b"after", "HTTP/{http}: {}", fwd.stderr());
    }
}

#[test]
fn udp_forwarder_takes_the_token_from_the_environment_and_prints_refusals() {
    let (relay, _token_file) = start_relay("token");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let relay_addr = format!("localhost:{}", relay.addr.port());
    let cert = relay.cert().display().to_string();
    let target = echo.addr().to_string();
    let args = ["udp", "--relay", &relay_addr, "--ca", &cert, "--listen", "127.0.0.1:0", "--target", &target];
    // MASQUE_TOKEN works like --token-file; the relay named by its IP
    // address is verified against the certificate's IP addresses.
    let by_ip = relay.addr.to_string();
    let mut ip_args = args;
    ip_args[2] = &by_ip;
    let fwd = MasqueClient::start(&[], &ip_args, &[("MASQUE_TOKEN", &relay.token)]);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(echo_once(&peer, fwd.local_addr(), b"from the env"), b"from the env");
    drop(fwd);
    // A name the certificate does not hold fails the handshake, saying so.
    let out = Command::new(env!("CARGO_BIN_EXE_masque-client"))
        .args([
            "udp",
            "--relay",
            &by_ip,
            "--server-name",
            "other.example",
            "--ca",
            &cert,
            "--target",
            &target,
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS alert 42 bad_certificate") && err.contains("other.example"), "{err}");
    // A wrong token: the relay's refusal is printed with its status and
    // Proxy-Status, and nothing is forwarded.
    let fwd = MasqueClient::start(&[], &args, &[("MASQUE_TOKEN", "not-the-token")]);
    peer.send_to(b"refused", fwd.local_addr()).unwrap();
    wait_until("the refusal in the client's log", PATIENCE, || fwd.logged("tunnel not opened: refused: 40"));
    assert!(fwd.logged("Proxy-Status:"), "{}", fwd.stderr());
    // A --token option does not exist: the token never goes on argv.
    let out = Command::new(env!("CARGO_BIN_EXE_masque-client"))
        .args(["udp", "--relay", &relay_addr, "--token", "x", "--target", &target])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--token'"));
    // A bad target is an error before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_masque-client"))
        .args(["udp", "--relay", &relay_addr, "--ca", &cert, "--target", "no port"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--target"), "{out:?}");
}

/// An HTTP/1.1 server answering every request with `body`, one
/// connection at a time, on 127.0.0.1 and the same port on ::1 (the relay
/// resolves `localhost` to both); its threads live as long as the test.
fn http_server(body: Vec<u8>) -> SocketAddr {
    let serve = |listener: TcpListener, body: Arc<Vec<u8>>| {
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { return };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            }
        });
    };
    let body = Arc::new(body);
    for _ in 0..64 {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = v4.local_addr().unwrap();
        if let Ok(v6) = TcpListener::bind(SocketAddr::new("::1".parse().unwrap(), addr.port())) {
            serve(v4, body.clone());
            serve(v6, body);
            return addr;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

#[test]
#[ignore = "needs curl: run by `cargo xtask test`"]
fn socks5_connect_carries_curl_through_the_relay_on_http3_and_http2() {
    require(&[Need::Curl]);
    let (relay, token_file) = start_relay("connect");
    let body = relay_bench::tcp_echo::pattern(3 << 20);
    let server = http_server(body.clone());
    for http in ["3", "2"] {
        let mut args = vec!["socks".to_string()];
        args.extend(relay_args(&relay, &token_file, http));
        args.extend(["--listen", "127.0.0.1:0"].map(String::from));
        let socks = MasqueClient::start(&[], &strings(&args), &[]);
        let proxy = socks.local_addr().to_string();
        let out_file = std::env::temp_dir().join(format!("masque-curl-{}-{http}", std::process::id()));
        // --socks5-hostname: curl sends the name, the relay resolves it.
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "--socks5-hostname", &proxy, "-o"])
            .arg(&out_file)
            .arg(format!("http://localhost:{}/big", server.port()))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl over HTTP/{http}: {out:?}\n{}", socks.stderr());
        let got = std::fs::read(&out_file).unwrap();
        let _ = std::fs::remove_file(&out_file);
        assert!(got == body, "HTTP/{http}: {} of {} bytes, intact: false", got.len(), body.len());
        assert!(socks.logged("CONNECT localhost:"), "{}", socks.stderr());
        // A target the relay's policy refuses: curl is told the CONNECT
        // was not allowed (SOCKS reply 2), and the log says why.
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--socks5-hostname", &proxy, "http://192.0.2.1:80/"])
            .output()
            .expect("curl runs");
        assert!(!out.status.success(), "{out:?}");
        wait_until("the refusal in the log", PATIENCE, || socks.logged("CONNECT 192.0.2.1:80: refused: 403"));
    }
}

/// PySocks's UDP client (socksocket with SOCK_DGRAM: UDP ASSOCIATE on a
/// TCP control connection, the SOCKS UDP header on every datagram): sends
/// to each target in turn and prints what came back from where.
const PYSOCKS_UDP: &str = r#"
import socket, sys, socks
proxy_host, proxy_port = sys.argv[1], int(sys.argv[2])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, proxy_host, proxy_port, rdns=True)
s.settimeout(2)
for target in sys.argv[3:]:
    host, port = target.rsplit(":", 1)
    for i in range(20):
        msg = ("%s #%d " % (target, i)).encode() + bytes(range(256)) * 4
        for attempt in range(10):
            s.sendto(msg, (host, int(port)))
            try:
                while True:
                    data, frm = s.recvfrom(65535)
                    if data == msg:
                        break
            except socket.timeout:
                continue
            break
        else:
            print("NO ECHO", target, i, flush=True)
            sys.exit(1)
    host = frm[0].decode() if isinstance(frm[0], bytes) else frm[0]
    print("OK", target, host, frm[1], flush=True)
s.close()
"#;

#[test]
#[ignore = "needs the interop venv (PySocks): run by `cargo xtask test`"]
fn socks5_udp_associate_from_pysocks_reaches_ip_and_named_targets_on_http3_and_http2() {
    require(&[Need::InteropVenv]);
    let python = interop::find_python().expect("the interop venv");
    let (relay, token_file) = start_relay("associate");
    let (echo, echo_v6) = dual_stack_echo();
    for http in ["3", "2"] {
        let mut args = vec!["socks".to_string()];
        args.extend(relay_args(&relay, &token_file, http));
        args.extend(["--listen", "127.0.0.1:0"].map(String::from));
        let socks = MasqueClient::start(&[], &strings(&args), &[]);
        let proxy = socks.local_addr();
        let by_ip = echo.addr().to_string();
        let by_name = format!("localhost:{}", echo.addr().port());
        let before = echo.echoed() + echo_v6.echoed();
        let out = Command::new(&python)
            .args(["-c", PYSOCKS_UDP, &proxy.ip().to_string(), &proxy.port().to_string(), &by_ip, &by_name])
            .output()
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "PySocks over HTTP/{http}: {stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            socks.stderr()
        );
        // Replies carry the destination as the client named it (ATYP 1 for
        // the address, 3 for the name).
        assert!(stdout.contains(&format!("OK {by_ip} 127.0.0.1 {}", echo.addr().port())), "{stdout}");
        assert!(stdout.contains(&format!("OK {by_name} localhost {}", echo.addr().port())), "{stdout}");
        assert!(echo.echoed() + echo_v6.echoed() >= before + 40);
        // Closing the control connection ended the association.
        wait_until("the association's end in the log", PATIENCE, || socks.logged("ended (2 destinations)"));
    }
}

#[test]
#[ignore = "needs root, /dev/net/tun, ip and ping: run by `cargo xtask test`"]
fn ip_mode_puts_the_tunnel_on_a_tun_device_and_pings_a_target_namespace() {
    require(&[Need::Root, Need::Tun, Need::Ip, Need::Ping]);
    let pid = std::process::id();
    let topo = relay_bench::ipnet::IpTopology::create((pid + 17) % 40).expect("namespaces");
    let dir = std::env::temp_dir().join(format!("relay-masque-client-ip-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let pool = 150 + (pid % 50);
    let opts = RelayOptions {
        listen_ip: topo.client.host_addr,
        allow: vec![topo.target_prefixes[0].clone(), topo.target_prefixes[1].clone()],
        extra_config: format!(
            "[protocols]\nconnect_ip = true\n\n[connect_ip]\nipv4_pool = \"10.88.{pool}.0/24\"\nipv6_pool = \"fd88:{pool}::/120\"\ninterface_prefix = \"mc{pid}w\"\n"
        ),
        ..Default::default()
    };
    let relay = Relay::start(&dir, &opts).expect("relay starts with connect-ip");
    let token_file = dir.join("token");
    std::fs::write(&token_file, &relay.token).unwrap();
    let relay_addr = relay.addr.to_string();
    let cert = relay.cert().display().to_string();
    let token = token_file.display().to_string();
    let ns = topo.client.name.clone();
    let client = MasqueClient::start(
        &["ip", "netns", "exec", &ns],
        &[
            "ip",
            "--relay",
            &relay_addr,
            "--server-name",
            "localhost",
            "--ca",
            &cert,
            "--token-file",
            &token,
            "--device",
            "mqc0",
            "--route",
            &topo.target_prefixes[0],
            "--route",
            &topo.target_prefixes[1],
        ],
        &[],
    );
    // The banner is the first assignment; the device is up after the
    // routes are printed.
    assert!(client.banner.starts_with("assigned 10.88."), "{}", client.banner);
    let deadline = Instant::now() + PATIENCE;
    let mut lines = vec![client.banner.clone()];
    while !lines.iter().any(|l| l.starts_with("tunnel up on mqc0")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.stdout.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("the tunnel did not come up: {lines:?}\n{}", client.stderr()),
        }
    }
    for (family, target) in [("-4", topo.target.target_addr), ("-6", topo.target_v6)] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "ping", family, "-c", "3", "-W", "3", &target.to_string()])
            .output()
            .expect("ping runs");
        assert!(out.status.success(), "ping {target} through the tunnel: {out:?}\n{}", client.stderr());
    }
    assert!(relay.counter("tun_packets_out").unwrap() >= 6, "the pings went through the relay's TUN devices");
    // SIGTERM: the client stops and prints what it carried.
    // SAFETY: kill(2) on our own child's process ID (`ip netns exec` execs
    // the client, so it is the client).
    unsafe {
        libc::kill(client.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + PATIENCE;
    let summary = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.stdout.recv_timeout(left) {
            Ok(l) if l.starts_with("packets up") => break l,
            Ok(_) => {}
            Err(_) => panic!("no packet summary after SIGTERM: {}", client.stderr()),
        }
    };
    let up: u64 =
        summary.split_whitespace().nth(2).and_then(|n| n.trim_end_matches(',').parse().ok()).unwrap();
    assert!(up >= 6, "{summary}");
    drop(client);
    drop(relay);
    drop(topo);
}

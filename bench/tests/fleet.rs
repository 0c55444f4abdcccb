//! Fleet mode end to end: three relay hosts (each `relay-control` and
//! `relay-dataplane` in its own network namespace) sharing one
//! `redis-server`, behind a Linux netfilter load balancer that hashes the
//! client's address and port over the hosts (nftables `jhash ... mod 3`
//! DNAT from a virtual IP), and a client in a namespace of its own
//! (relay_bench::fleet_topology draws the network).
//!
//! One test walks through what a fleet promises, each phase a function:
//! tunnels land on every host; every connection ID decodes to its host with
//! a QUIC-LB decoder; a revocation on one host is enforced on the others
//! within 1 s; a fleet-wide `max_flows` holds across hosts; a TLS session
//! ticket and a Retry token from one host are accepted by another; the
//! hosts keep serving while the store is down and re-converge when it is
//! back; a drained host leaves the others serving.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use relay_bench::client::{Answer, Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::fleet_topology::FleetTopology;
use relay_bench::needs::{Need, require};
use relay_bench::processes::{Relay, RelayOptions};
use relay_bench::redis_server::RedisServer;
use relay_bench::wait::{PATIENCE, wait_for, wait_until};
use relay_proto::channel::bootstrap::CidSettings;
use relay_proto::cid::lb::LbDecoder;
use relay_proto::cid::{CidLayout, Decoded};
use serde_json::Value;

/// The relay port on every host and on the VIP.
const PORT: u16 = 4433;
/// The store's port.
const REDIS_PORT: u16 = 6379;
/// Bound for a handshake or an answer that must come.
const T: Duration = Duration::from_secs(15);
/// Bound for a handshake that may go to the drained host and never come.
const MAYBE: Duration = Duration::from_secs(5);
/// The fleet-wide `[quotas.per_identity] max_flows`.
const MAX_FLOWS: u64 = 4;
/// The hosts' names and QUIC-LB server IDs.
const HOSTS: [(&str, u8); 3] = [("relay-a", 0x0a), ("relay-b", 0x0b), ("relay-c", 0x0c)];
/// Host indexes.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// The QUIC-LB key (16 bytes) shared by the hosts and the load balancer.
const CID_KEY_HEX: &str = "8c1f2a3b4c5d6e7f8091a2b3c4d5e6f7";
/// The fleet secret.
const FLEET_SECRET_HEX: &str = "f1ee70000000000000000000000000000000000000000000000000000000f1ee";
/// The HMAC token key every host has.
const HMAC_SECRET_HEX: &str = "5e1f0c3a9b7d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";
/// Static tokens, one identity each, for tunnels that must not share a
/// quota.
const SPREAD_TOKENS: usize = 80;
/// A target every host refuses by address (TEST-NET-1), after checking the
/// credentials: a CONNECT to it tells whether a token is accepted without
/// opening a flow.
const PROHIBITED: &str = "192.0.2.1";

/// The hosts, their store and the network, torn down on drop in field
/// order: relays, store, echo target, namespaces, files.
struct Fleet {
    hosts: Vec<Relay>,
    redis: RedisServer,
    echo: EchoServer,
    topo: FleetTopology,
    decoder: LbDecoder,
    next_spread: usize,
    _dir: TempDir,
}

/// A directory removed on drop; the relays' logs in it are printed first
/// if the test is failing.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log_tails(&self.0);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last lines of every host's logs (for a failing run).
fn print_log_tails(dir: &Path) {
    for (name, _) in HOSTS {
        for log in ["control", "dataplane"] {
            let path = dir.join(name).join("logs").join(format!("{log}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            eprintln!("--- {} (last 30 lines)\n{tail}", path.display());
        }
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn spread_token(i: usize) -> String {
    format!("fleet-spread-token-{i}")
}

/// What the hosts' QUIC-LB layout looks like to a load balancer.
fn lb_decoder() -> LbDecoder {
    LbDecoder::new(*layout(A).lb_config())
}

/// Host `i`'s connection ID layout (to read the worker byte).
fn layout(i: usize) -> CidLayout {
    let mut key = [0u8; 16];
    for (k, pair) in key.iter_mut().zip(CID_KEY_HEX.as_bytes().chunks(2)) {
        *k = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
    }
    CidSettings { config_id: 0, host_id: vec![HOSTS[i].1], random_len: 14, key: Some(key) }.layout().unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Fleet {
    /// Builds the topology, starts the store and the three hosts (the
    /// second and third with the first one's certificate), and moves this
    /// thread into the client's namespace.
    fn start() -> Self {
        let dir = TempDir(std::env::temp_dir().join(format!("relay-fleet-e2e-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).unwrap();
        let topo =
            FleetTopology::create(HOSTS.len(), PORT).expect("building the namespaces and the balancer");
        topo.enter_client().expect("entering the client namespace");
        let redis = RedisServer::start(SocketAddr::new(topo.redis_addr, REDIS_PORT), Some(&topo.redis_netns))
            .expect("redis-server starts");
        let echo = EchoServer::start(SocketAddr::new(topo.client_addr, 0)).unwrap();
        write_private(&dir.0.join("fleet-secret"), &format!("{FLEET_SECRET_HEX}\n"));
        write_private(&dir.0.join("quic-lb.key"), &format!("{CID_KEY_HEX}\n"));
        let mut hosts: Vec<Relay> = Vec::new();
        for (i, (name, _)) in HOSTS.iter().enumerate() {
            let host_dir = dir.0.join(name);
            if let Some(first) = hosts.first() {
                first.share_certificate(&host_dir.join("state")).unwrap();
            }
            let opts = host_options(&topo, &dir.0, &redis, i);
            hosts.push(Relay::start(&host_dir, &opts).unwrap_or_else(|e| panic!("{name} starts: {e:#}")));
        }
        Fleet { hosts, redis, echo, topo, decoder: lb_decoder(), next_spread: 0, _dir: dir }
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip, PORT)
    }

    fn host_addr(&self, i: usize) -> SocketAddr {
        self.hosts[i].addr
    }

    /// A static token no tunnel used yet (its own identity).
    fn fresh_token(&mut self) -> String {
        assert!(self.next_spread < SPREAD_TOKENS, "the test ran out of spread tokens");
        self.next_spread += 1;
        spread_token(self.next_spread - 1)
    }

    fn client_config(&self, to: SocketAddr, token: &str) -> ClientConfig {
        let mut cfg = ClientConfig::new(to);
        cfg.ca = Some(self.hosts[A].cert());
        cfg.token = Some(token.to_string());
        cfg
    }

    /// Connects to `to` (the VIP or one host) with `token`.
    fn connect(&self, to: SocketAddr, token: &str, timeout: Duration) -> anyhow::Result<Client> {
        let mut c = Client::connect(self.client_config(to, token), timeout)?;
        c.wait_settings(timeout)?;
        Ok(c)
    }

    /// The host a connection ID routes to, by the load balancer's decoder.
    fn host_of_cid(&self, cid: &[u8]) -> usize {
        let sid =
            self.decoder.server_id(cid).unwrap_or_else(|e| panic!("CID {} does not route: {e}", hex(cid)));
        HOSTS.iter().position(|(_, id)| sid.as_bytes() == [*id]).unwrap_or_else(|| {
            panic!("CID {} decodes to server ID {}, no host's", hex(cid), hex(sid.as_bytes()))
        })
    }

    /// Which host serves each client port: the hosts' `relayctl conns`.
    fn serving_hosts(&self) -> Vec<(u16, usize)> {
        let mut out = Vec::new();
        for (i, relay) in self.hosts.iter().enumerate() {
            let v = relayctl_json(relay, &["conns"]);
            for c in v["connections"].as_array().into_iter().flatten() {
                let client: Option<SocketAddr> = c["client"].as_str().and_then(|s| s.parse().ok());
                if let Some(addr) = client.filter(|a| a.ip() == self.topo.client_addr) {
                    out.push((addr.port(), i));
                }
            }
        }
        out
    }

    /// The host serving client port `port`, by `relayctl conns`.
    fn serving_host(&self, port: u16) -> Option<usize> {
        self.serving_hosts().into_iter().find(|(p, _)| *p == port).map(|(_, h)| h)
    }

    fn tunnels_active(&self) -> Vec<u64> {
        self.hosts.iter().map(|h| h.counter("tunnels_active").unwrap()).collect()
    }

    fn counter(&self, host: usize, name: &str) -> u64 {
        self.hosts[host].counter(name).unwrap()
    }

    /// A tunnel to the echo target on `c` that must open and echo.
    fn open_echo_tunnel(&self, c: &mut Client, what: &str) -> u64 {
        let port = self.echo.addr().port();
        let s = c
            .open_udp(&self.topo.client_addr.to_string(), port, T)
            .unwrap_or_else(|e| panic!("a tunnel opens ({what}): {e:#}"));
        echo(c, s, what);
        s
    }

    /// `identity`'s open flows as host `i` counts them: its own plus the
    /// other hosts' as it last read them.
    fn fleet_flows_seen_by(&self, i: usize, identity: &str) -> u64 {
        let v = relayctl_json(&self.hosts[i], &["policy", "usage", identity]);
        v["here"]["flows"].as_u64().unwrap_or(0) + v["other_hosts"]["flows"].as_u64().unwrap_or(0)
    }

    fn fleet_status(&self, i: usize) -> Value {
        relayctl_json(&self.hosts[i], &["fleet", "status"])
    }

    /// Mints an HMAC token on host `i` with the real relayctl.
    fn mint(&self, i: usize, subject: &str) -> String {
        let v = relayctl_json(&self.hosts[i], &["token", "mint", "--subject", subject, "--ttl", "1h"]);
        v["token"].as_str().expect("a token").to_string()
    }
}

/// Host `i`'s options: its namespace and address, the shared fleet, keys
/// and quota, its own server ID.
fn host_options(topo: &FleetTopology, dir: &Path, redis: &RedisServer, i: usize) -> RelayOptions {
    let (name, server_id) = HOSTS[i];
    let client_net = format!("{}/24", topo.client_addr);
    // relay-a sends every new client a Retry (phase 6); the others only
    // under handshake load, as by default.
    let retry = if i == A { "retry_threshold = 0\n" } else { "" };
    let dataplane_extra = format!(
        "{retry}\n[dataplane.connection_ids]\nserver_id = \"{server_id:02x}\"\nkey_file = \"{}\"\n",
        dir.join("quic-lb.key").display()
    );
    let extra_config = format!(
        "[[auth.hmac_keys]]\nid = \"k1\"\nsecret_hex = \"{HMAC_SECRET_HEX}\"\n\n\
         [quotas.per_identity]\nmax_flows = {MAX_FLOWS}\n\n\
         [fleet]\nname = \"e2e\"\nhost = \"{name}\"\nredis = [\"{url}\"]\nsecret_file = \"{secret}\"\n\
         on_store_failure = \"open\"\nglobal_quotas = true\n",
        url = redis.url(),
        secret = dir.join("fleet-secret").display(),
    );
    RelayOptions {
        token: "fleet-static-token".into(),
        extra_tokens: (0..SPREAD_TOKENS).map(spread_token).collect(),
        allow: vec![client_net],
        dataplane_extra,
        extra_config,
        listen_ip: topo.hosts[i].addr,
        netns: Some(topo.hosts[i].netns.clone()),
        port: Some(PORT),
        log_dir: Some(dir.join(name).join("logs")),
        ..Default::default()
    }
}

/// `relayctl --json ARGS`, which must succeed.
fn relayctl_json(relay: &Relay, args: &[&str]) -> Value {
    relay.relayctl_json(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Sends one datagram through tunnel `stream` and waits for the echo (sent
/// again now and then: UDP).
fn echo(c: &mut Client, stream: u64, what: &str) {
    echo_unless(c, stream, what, |_| false);
}

/// As [`echo`], but also stops when `stop` holds (the connection ended);
/// returns whether the echo came back.
fn echo_unless(c: &mut Client, stream: u64, what: &str, stop: impl Fn(&Client) -> bool) -> bool {
    let payload = format!("fleet echo: {what}").into_bytes();
    let mut polls = 0u32;
    let mut echoed = false;
    wait_until(&format!("the echo through the tunnel ({what})"), PATIENCE, || {
        if polls.is_multiple_of(50) {
            let _ = c.send_datagram(stream, &payload);
            let _ = c.flush();
        }
        polls += 1;
        let _ = c.drive(Duration::from_millis(10));
        echoed = c.take_datagrams(stream).contains(&payload);
        echoed || stop(c)
    });
    echoed
}

/// A CONNECT on `c` with `token` to `host:port`; the answer.
fn connect_as(c: &mut Client, token: &str, host: &str, port: u16) -> Answer {
    let mut h = c.connect_udp_headers(host, port);
    h.retain(|(n, _)| n != "proxy-authorization");
    h.push(("proxy-authorization".into(), format!("Bearer {token}")));
    let id = c.send_raw_request(&h, false).expect("request sent");
    c.wait_answer(id, T).expect("an answer")
}

/// Whether the host `c` talks to accepts `token`: a CONNECT to a
/// prohibited target gets 403 after the credentials pass, 407 if not; no
/// flow is opened either way.
fn token_accepted(c: &mut Client, token: &str) -> bool {
    let a = connect_as(c, token, PROHIBITED, 9);
    match a.status() {
        Some(403) => true,
        Some(407) => false,
        _ => panic!("a CONNECT to a prohibited target is answered 403 or 407, not {a:?}"),
    }
}

fn proxy_status(a: &Answer) -> String {
    a.header("proxy-status").unwrap_or_default().to_string()
}

#[test]
#[ignore = "needs root, ip, nft, redis-server: run by `cargo xtask test`"]
fn three_hosts_behind_an_l4_balancer_act_as_one_relay() {
    require(&[Need::Root, Need::Ip, Need::Nft, Need::RedisServer]);
    let mut fleet = Fleet::start();
    tunnels_land_on_every_host_and_every_cid_decodes_to_its_host(&mut fleet);
    tcp_through_the_vip_reaches_the_hosts(&fleet);
    a_rebinding_client_is_reset_by_the_host_it_lands_on(&mut fleet);
    a_revocation_on_one_host_is_enforced_on_the_others_within_1s(&fleet);
    max_flows_holds_across_hosts(&fleet);
    a_session_ticket_from_one_host_resumes_on_another(&fleet);
    a_retry_token_from_one_host_is_accepted_by_another(&mut fleet);
    the_hosts_serve_without_the_store_and_reconverge_when_it_returns(&mut fleet);
    a_drained_host_leaves_the_others_serving(&mut fleet);
}

/// Phases 1 and 2: connections through the VIP from new source ports (one
/// identity each, at most 30) until every host has tunnels; each echoes.
/// Every connection ID a client used decodes, with the load balancer's
/// QUIC-LB decoder, to the host that serves it (by `relayctl conns`): the
/// handshake's, and the ones the relay issued with NEW_CONNECTION_ID,
/// which the client switches to (RETIRE_CONNECTION_ID) and echoes over.
fn tunnels_land_on_every_host_and_every_cid_decodes_to_its_host(fleet: &mut Fleet) {
    let mut clients = Vec::new();
    for n in 0..30 {
        let token = fleet.fresh_token();
        let mut c = fleet.connect(fleet.vip(), &token, T).expect("a connection through the VIP");
        let s = fleet.open_echo_tunnel(&mut c, &format!("VIP connection {n}"));
        clients.push((c, s));
        if fleet.tunnels_active().iter().all(|t| *t > 0) {
            break;
        }
    }
    let active = fleet.tunnels_active();
    println!("{} connections through the VIP; tunnels per host: {active:?}", clients.len());
    assert!(
        active.iter().all(|t| *t > 0),
        "after {} connections from distinct source ports some host has no tunnel: {active:?}",
        clients.len()
    );
    let serving = fleet.serving_hosts();
    let mut checked = 0;
    for (n, (c, s)) in clients.iter_mut().enumerate() {
        let port = c.local_addr().port();
        let host = serving
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, h)| *h)
            .unwrap_or_else(|| panic!("no host lists the connection from port {port}"));
        let dcid = c.dcid();
        assert_eq!(fleet.host_of_cid(&dcid), host, "the handshake CID {} names its host", hex(&dcid));
        checked += 1;
        for k in 0..2 {
            wait_until("a spare connection ID from the relay", PATIENCE, || {
                let _ = c.drive(Duration::from_millis(10));
                c.spare_dcids() > 0
            });
            let next = c.switch_dcid().expect("switching to an issued connection ID");
            assert_eq!(
                fleet.host_of_cid(&next),
                host,
                "NEW_CONNECTION_ID {} names the host that issued it",
                hex(&next)
            );
            echo(c, *s, &format!("VIP connection {n} on its connection ID {}", k + 2));
            checked += 1;
        }
    }
    println!("{checked} connection IDs decoded to their hosts");
    for (c, _) in clients {
        c.close();
    }
}

/// The balancer's TCP rule: TLS-over-TCP connections to the VIP complete
/// their handshakes on the hosts.
fn tcp_through_the_vip_reaches_the_hosts(fleet: &Fleet) {
    let accepted = |f: &Fleet| -> Vec<u64> {
        (0..HOSTS.len()).map(|i| f.counter(i, "tcp_connections_accepted")).collect()
    };
    let before = accepted(fleet);
    const N: u64 = 6;
    for _ in 0..N {
        let mut b = boring::ssl::SslConnector::builder(boring::ssl::SslMethod::tls()).unwrap();
        b.set_ca_file(fleet.hosts[A].cert()).unwrap();
        b.set_alpn_protos(b"\x02h2").unwrap();
        let tcp = std::net::TcpStream::connect_timeout(&fleet.vip(), T).expect("TCP to the VIP");
        tcp.set_read_timeout(Some(T)).unwrap();
        let tls = b.build().connect("localhost", tcp).expect("a TLS handshake through the VIP");
        assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
    }
    let grown = wait_for("the hosts to count the TCP connections", PATIENCE, || {
        let now = accepted(fleet);
        let grown: Vec<u64> = now.iter().zip(&before).map(|(n, b)| n - b).collect();
        (grown.iter().sum::<u64>() == N).then_some(grown)
    });
    println!("TLS over TCP through the VIP, connections per host: {grown:?}");
}

/// A client behind a NAT that rebinds (new source port) is hashed anew by
/// the balancer; on another host, which does not know its connection, its
/// packets are answered with a stateless reset whose token (derived from
/// the fleet secret) the client recognises: its connection closes at once.
/// (The client is quiche's, which checks the token of the handshake's
/// connection ID only: it keeps that ID and was not retried, i.e. is not
/// on relay-a.)
fn a_rebinding_client_is_reset_by_the_host_it_lands_on(fleet: &mut Fleet) {
    let (mut c, first) = wait_for("a connection through the VIP on relay-b or relay-c", PATIENCE, || {
        let t = fleet.fresh_token();
        let c = fleet.connect(fleet.vip(), &t, T).expect("a connection through the VIP");
        let host = fleet.host_of_cid(&c.dcid());
        if host == A {
            c.close();
            return None;
        }
        Some((c, host))
    });
    let s = fleet.open_echo_tunnel(&mut c, "before rebinding");
    let resets = |f: &Fleet| -> u64 { (0..HOSTS.len()).map(|h| f.counter(h, "stateless_resets_sent")).sum() };
    let resets_before = resets(fleet);
    let mut rebinds = 0;
    while c.closed().is_none() {
        assert!(rebinds < 12, "12 rebindings all stayed on {}", HOSTS[first].0);
        let addr = c.rebind().unwrap();
        rebinds += 1;
        // Still on its host (the relay follows the new address) or reset.
        echo_unless(&mut c, s, &format!("after rebinding to {addr}"), |c| c.closed().is_some());
    }
    assert!(resets(fleet) > resets_before, "another host sent a stateless reset");
    println!("after {rebinds} rebindings the client landed off {} and was reset statelessly", HOSTS[first].0);
}

/// Phase 3: an HMAC token minted on A works on B and C; revoked through
/// A's relayctl, B and C refuse it within 1 s of relayctl returning.
fn a_revocation_on_one_host_is_enforced_on_the_others_within_1s(fleet: &Fleet) {
    let token = fleet.mint(A, "revoke-me");
    let mut on = [B, C]
        .map(|h| fleet.connect(fleet.host_addr(h), "fleet-static-token", T).expect("a direct connection"));
    for (c, h) in on.iter_mut().zip([B, C]) {
        assert!(token_accepted(c, &token), "a token minted on {} is accepted on {}", HOSTS[A].0, HOSTS[h].0);
    }
    let v = relayctl_json(&fleet.hosts[A], &["token", "revoke", "--token", &token]);
    let revoked = Instant::now();
    assert!(v["revoked_token"].is_string(), "{v}");
    assert!(v.get("fleet_warning").is_none(), "the store is up: {v}");
    let mut latency = [None, None];
    wait_until("B and C to refuse the revoked token", PATIENCE, || {
        for (i, c) in on.iter_mut().enumerate() {
            if latency[i].is_none() && !token_accepted(c, &token) {
                latency[i] = Some(revoked.elapsed());
            }
        }
        latency.iter().all(Option::is_some)
    });
    let [b, c] = latency.map(Option::unwrap);
    println!("revocation made on relay-a refused on relay-b after {b:?}, on relay-c after {c:?}");
    for (h, l) in [(B, b), (C, c)] {
        assert!(
            l < Duration::from_secs(1),
            "{} refused the revoked token only after {l:?} (limit 1 s)",
            HOSTS[h].0
        );
    }
    // A real tunnel request is refused the same way.
    let port = fleet.echo.addr().port();
    for (c, h) in on.iter_mut().zip([B, C]) {
        let a = connect_as(c, &token, &fleet.topo.client_addr.to_string(), port);
        assert_eq!(a.status(), Some(407), "{} refuses a tunnel with the revoked token: {a:?}", HOSTS[h].0);
        assert!(proxy_status(&a).contains("error=http_request_denied"), "{a:?}");
    }
    for c in on {
        c.close();
    }
}

/// Phase 4: one identity with `max_flows` = 4 fleet-wide holds 2 tunnels
/// on A, 1 on B and 1 on C; once every host has read the others' usage
/// (`relayctl policy usage`; exchanged every 150 ms), a fifth is refused
/// with 429 on each host and through the VIP; closing two lets one more
/// open on C.
fn max_flows_holds_across_hosts(fleet: &Fleet) {
    let token = fleet.mint(A, "quota-user");
    let identity = "sub:quota-user";
    let mut on: Vec<Client> = [A, B, C]
        .iter()
        .map(|h| fleet.connect(fleet.host_addr(*h), &token, T).expect("a direct connection"))
        .collect();
    let a_tunnels = [
        fleet.open_echo_tunnel(&mut on[A], "quota 1 on A"),
        fleet.open_echo_tunnel(&mut on[A], "quota 2 on A"),
    ];
    fleet.open_echo_tunnel(&mut on[B], "quota 3 on B");
    fleet.open_echo_tunnel(&mut on[C], "quota 4 on C");
    let started = Instant::now();
    wait_until("every host to count the identity's 4 flows fleet-wide", PATIENCE, || {
        (0..HOSTS.len()).all(|h| fleet.fleet_flows_seen_by(h, identity) == MAX_FLOWS)
    });
    println!("every host counts {MAX_FLOWS} flows of {identity} after {:?}", started.elapsed());
    let target = fleet.topo.client_addr.to_string();
    let port = fleet.echo.addr().port();
    for (h, c) in on.iter_mut().enumerate() {
        let a = connect_as(c, &token, &target, port);
        assert_eq!(
            a.status(),
            Some(429),
            "tunnel {} of the identity, on {}: {a:?}",
            MAX_FLOWS + 1,
            HOSTS[h].0
        );
        let ps = proxy_status(&a);
        assert!(
            ps.contains("error=http_request_denied")
                && ps.contains("details=\"quota exceeded: per_identity.max_flows\""),
            "{ps}"
        );
    }
    let mut via_vip = fleet.connect(fleet.vip(), &token, T).expect("a connection through the VIP");
    let a = connect_as(&mut via_vip, &token, &target, port);
    assert_eq!(a.status(), Some(429), "tunnel {} of the identity, through the VIP: {a:?}", MAX_FLOWS + 1);
    // Two flows end on A: the others see it and admit again.
    for s in a_tunnels {
        on[A].finish_stream(s).unwrap();
    }
    wait_until("every host to count 2 flows after two ended on A", PATIENCE, || {
        let _ = on[A].drive(Duration::from_millis(10));
        (0..HOSTS.len()).all(|h| fleet.fleet_flows_seen_by(h, identity) == MAX_FLOWS - 2)
    });
    fleet.open_echo_tunnel(&mut on[C], "quota: one more on C after two ended on A");
    via_vip.close();
    for c in on {
        c.close();
    }
}

/// Phase 5: a TLS session ticket from A resumes on B.
fn a_session_ticket_from_one_host_resumes_on_another(fleet: &Fleet) {
    wait_until("the same ticket key generation on every host", PATIENCE, || {
        let generations: Vec<Value> =
            (0..HOSTS.len()).map(|h| fleet.fleet_status(h)["ticket_generation"].clone()).collect();
        generations[0].is_u64() && generations.iter().all(|g| *g == generations[0])
    });
    let mut on_a = fleet.connect(fleet.host_addr(A), "fleet-static-token", T).expect("a connection to A");
    assert!(!on_a.is_resumed());
    let session = wait_for("a session ticket from relay-a", PATIENCE, || {
        let _ = on_a.drive(Duration::from_millis(10));
        on_a.session()
    });
    on_a.close();
    let resumed_before = fleet.counter(B, "handshakes_resumed");
    let mut cfg = fleet.client_config(fleet.host_addr(B), "fleet-static-token");
    cfg.session = Some(session);
    let mut on_b = Client::connect(cfg, T).expect("a connection to B with A's session");
    assert!(on_b.is_resumed(), "relay-b resumed relay-a's session");
    wait_until("relay-b to count the resumed handshake", PATIENCE, || {
        fleet.counter(B, "handshakes_resumed") > resumed_before
    });
    fleet.open_echo_tunnel(&mut on_b, "a resumed connection on B");
    on_b.close();
}

/// Phase 6: (relay-a has `retry_threshold = 0`: every new client is sent
/// a Retry) A's Retry token, carried by the retried Initial sent to B
/// instead, is accepted by B: the handshake completes with B, which
/// refused no token and keeps the connection ID A chose in its Retry.
fn a_retry_token_from_one_host_is_accepted_by_another(fleet: &mut Fleet) {
    let retries = |f: &Fleet| (f.counter(A, "retries_sent"), f.counter(B, "retries_sent"));
    let (a_before, b_before) = retries(fleet);
    let invalid_before = fleet.counter(B, "retry_tokens_invalid");
    let mut cfg = fleet.client_config(fleet.host_addr(A), "fleet-static-token");
    cfg.after_retry_send_to = Some(fleet.host_addr(B));
    let mut c = Client::connect(cfg, T).expect("the handshake completes with B on A's Retry token");
    assert!(c.retried, "relay-a answered with a Retry");
    let (a_after, b_after) = retries(fleet);
    assert!(a_after > a_before, "relay-a sent the Retry");
    assert_eq!(b_after, b_before, "relay-b accepted the token instead of sending its own Retry");
    assert_eq!(fleet.counter(B, "retry_tokens_invalid"), invalid_before, "relay-b refused no token");
    let port = c.local_addr().port();
    assert_eq!(fleet.serving_host(port), Some(B), "relay-b serves the connection");
    // The handshake's connection ID is the one A's Retry chose (quiche
    // accepts a retried connection on that ID): it names relay-a. A
    // QUIC-LB balancer would route it to A, but such a balancer also
    // sends the retried Initial to A; only a balancer that does not route
    // by connection ID (this one) sends it to B and keeps it there.
    assert_eq!(fleet.host_of_cid(&c.dcid()), A, "B adopted the connection ID of A's Retry");
    fleet.open_echo_tunnel(&mut c, "a connection B accepted on A's Retry token");
    c.close();
}

/// Phase 7: with the store killed the hosts keep serving (tunnels through
/// the VIP open); a revocation made on A meanwhile ("open": applied on A at
/// once) reaches B and C once the store is back on its port, and the hosts
/// converge on one state version.
fn the_hosts_serve_without_the_store_and_reconverge_when_it_returns(fleet: &mut Fleet) {
    let token = fleet.mint(A, "outage-user");
    fleet.redis.kill();
    wait_until("every host to see the store down", PATIENCE, || {
        (0..HOSTS.len()).all(|h| fleet.fleet_status(h)["store_up"] == false)
    });
    let mut landed = [0u32; 3];
    for n in 0..6 {
        let t = fleet.fresh_token();
        let mut c =
            fleet.connect(fleet.vip(), &t, T).expect("a connection through the VIP with the store down");
        fleet.open_echo_tunnel(&mut c, &format!("VIP connection {n} with the store down"));
        landed[fleet.host_of_cid(&c.dcid())] += 1;
        c.close();
    }
    println!("with the store down, new tunnels through the VIP per host: {landed:?}");

    let v = relayctl_json(&fleet.hosts[A], &["token", "revoke", "--token", &token]);
    let warning = v["fleet_warning"].as_str().unwrap_or_default();
    assert!(warning.contains("applied on this host only"), "relayctl says the change is local for now: {v}");
    let mut on: Vec<Client> = [A, B, C]
        .iter()
        .map(|h| fleet.connect(fleet.host_addr(*h), "fleet-static-token", T).unwrap())
        .collect();
    assert!(!token_accepted(&mut on[A], &token), "relay-a refuses the token at once");
    assert!(token_accepted(&mut on[B], &token), "relay-b cannot know yet: the store is down");

    let addr = fleet.redis.addr();
    fleet.redis = RedisServer::start(addr, Some(&fleet.topo.redis_netns)).expect("redis-server restarts");
    let back = Instant::now();
    wait_until("relay-b and relay-c to refuse the token revoked during the outage", PATIENCE, || {
        !token_accepted(&mut on[B], &token) && !token_accepted(&mut on[C], &token)
    });
    println!(
        "the outage's revocation reached relay-b and relay-c {:?} after the store came back",
        back.elapsed()
    );
    wait_until("the hosts to converge on one state", PATIENCE, || {
        let s: Vec<Value> = (0..HOSTS.len()).map(|h| fleet.fleet_status(h)).collect();
        s.iter().all(|s| s["store_up"] == true && s["pending_local_changes"] == false)
            && s.iter().all(|x| x["state_version"] == s[0]["state_version"])
    });
    for c in on {
        c.close();
    }
}

/// Phase 8: C drains (`relayctl drain`: GOAWAY, no new connections). The
/// balancer still hashes some new clients to C: those wait in vain, the
/// others are served by A and B. Taking C out of the balancer's map (what
/// an operator does when draining) serves every new client.
fn a_drained_host_leaves_the_others_serving(fleet: &mut Fleet) {
    // One connection on each of C's workers, to see both start draining.
    let mut watchers: Vec<Option<Client>> = vec![None, None];
    let layout_c = layout(C);
    wait_until("a connection on each of relay-c's workers", PATIENCE, || {
        let c = fleet.connect(fleet.host_addr(C), "fleet-static-token", T).expect("a connection to C");
        let Decoded::Worker(w) = layout_c.decode(&c.dcid()) else { panic!("relay-c's CID names a worker") };
        match watchers.get_mut(usize::from(w)) {
            Some(slot @ None) => *slot = Some(c),
            _ => c.close(),
        }
        watchers.iter().all(Option::is_some)
    });
    let v = relayctl_json(&fleet.hosts[C], &["drain"]);
    assert_eq!(v["draining"], true, "{v}");
    for (w, c) in watchers.iter_mut().enumerate() {
        let c = c.as_mut().unwrap();
        wait_until(&format!("GOAWAY from relay-c's worker {w}"), PATIENCE, || {
            let _ = c.drive(Duration::from_millis(10));
            c.goaway_received
        });
    }
    // Until two were served (each new client goes to relay-c with
    // probability 1/3; bounded).
    let mut served = [0u32; 3];
    let mut unanswered = 0;
    for n in 0..12 {
        if served.iter().sum::<u32>() >= 2 {
            break;
        }
        let t = fleet.fresh_token();
        match fleet.connect(fleet.vip(), &t, MAYBE) {
            Ok(mut c) => {
                let host = fleet.host_of_cid(&c.dcid());
                assert_ne!(host, C, "the drained host accepted a new connection");
                fleet.open_echo_tunnel(&mut c, &format!("VIP connection {n} while relay-c drains"));
                served[host] += 1;
                c.close();
            }
            Err(_) => unanswered += 1,
        }
    }
    println!(
        "relay-c draining: new VIP clients served per host {served:?}, unanswered (hashed to relay-c) {unanswered}"
    );
    assert!(
        served.iter().sum::<u32>() > 0,
        "clients hashed to relay-a or relay-b are served while relay-c drains"
    );

    fleet.topo.balance_over(&[A, B], PORT).expect("taking relay-c out of the balancer");
    for n in 0..6 {
        let t = fleet.fresh_token();
        let mut c = fleet
            .connect(fleet.vip(), &t, T)
            .expect("every new client is served once relay-c is out of the map");
        assert_ne!(fleet.host_of_cid(&c.dcid()), C);
        fleet.open_echo_tunnel(&mut c, &format!("VIP connection {n} with relay-c out of the map"));
        c.close();
    }
    for c in watchers.into_iter().flatten() {
        c.close();
    }
}

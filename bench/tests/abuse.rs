//! Abuse tests: floods and slow clients against a real relay on loopback,
//! each bounded in count and time. Throughout every one a well-behaved
//! client (the bench crate's quiche client, on its own thread) keeps doing
//! echo round trips through its tunnel, and the test asserts that none of
//! them failed (each is answered within [`ROUND_TIMEOUT`], a liveness bound
//! far above any latency); their p99 is printed, not asserted (a busy CI
//! machine stretches latency without the relay misbehaving).
//!
//! The slowloris test drives the aioquic client: it is ignored by a plain
//! `cargo test` and run by `cargo xtask test` where the interop venv is.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use relay_bench::client::{Answer, Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::interop::{self, Interop};
use relay_bench::processes::{Relay, RelayOptions};
use relay_bench::target::{Target, TargetMode};
use relay_bench::wait::wait_until;

const T: Duration = Duration::from_secs(5);
/// A round trip not answered within this counts as a failure (the client
/// was not served).
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// The abuse tests load the machine on purpose; they run one at a time so
/// one test's flood does not count against another's latency bound.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-abuse-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn start(name: &str, opts: RelayOptions) -> Relay {
    Relay::start(&test_dir(name), &opts).expect("relay starts")
}

fn client_config(relay: &Relay) -> ClientConfig {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    cfg
}

/// What the well-behaved client saw.
#[derive(Debug)]
struct ProbeReport {
    rtts: Vec<Duration>,
    failures: u64,
}

impl ProbeReport {
    fn p99(&self) -> Duration {
        let mut v = self.rtts.clone();
        v.sort();
        v.get((v.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(Duration::MAX)
    }

    /// Asserts the client was served throughout `what`.
    fn assert_served(&self, what: &str) {
        assert!(self.rtts.len() >= 10, "{what}: too few round trips measured: {self:?}");
        assert_eq!(self.failures, 0, "{what}: echo round trips failed ({} ok)", self.rtts.len());
        // Latency is reported, not asserted: a busy machine stretches it
        // without the relay misbehaving (tests check behaviour).
        let p99 = self.p99();
        eprintln!("{what}: {} round trips, p99 {p99:?}", self.rtts.len());
    }
}

/// A well-behaved client doing one echo round trip every 20 ms on its own
/// thread until stopped.
struct Probe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<ProbeReport>,
}

impl Probe {
    /// Connects, opens a tunnel to `echo` and starts the round trips; returns
    /// once the first one came back.
    fn start(cfg: ClientConfig, echo: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut c = Client::connect(cfg, T).expect("probe connects");
            let s = c.open_udp("127.0.0.1", echo.port(), T).expect("probe tunnel opens");
            let mut report = ProbeReport { rtts: Vec::new(), failures: 0 };
            let mut seq = 0u64;
            // Bounded: at most 10 minutes of 20 ms rounds.
            for _ in 0..30_000 {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                seq += 1;
                let payload = format!("probe {seq:016}").into_bytes();
                let started = Instant::now();
                let mut ok = c.send_datagram(s, &payload).unwrap_or(false);
                if ok {
                    ok = false;
                    while started.elapsed() < ROUND_TIMEOUT {
                        c.drive(Duration::from_millis(5)).expect("probe drives");
                        if c.take_datagrams(s).iter().any(|d| *d == payload) {
                            ok = true;
                            break;
                        }
                    }
                }
                if ok {
                    report.rtts.push(started.elapsed());
                } else {
                    report.failures += 1;
                }
                if seq == 1 {
                    let _ = ready_tx.send(());
                }
                let pause = Instant::now() + Duration::from_millis(20);
                while Instant::now() < pause {
                    let _ = c.drive(Duration::from_millis(5));
                    c.take_datagrams(s);
                }
            }
            c.close();
            report
        });
        ready_rx.recv_timeout(Duration::from_secs(15)).expect("probe's first round trip");
        Self { stop, handle }
    }

    fn finish(self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("probe thread")
    }
}

/// Raises the open-file soft limit to the hard limit (the idle-connection
/// test holds two descriptors per client).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

#[test]
fn handshake_flood_from_many_ports_gets_retry_past_the_threshold() {
    let _serial = serial();
    const THRESHOLD: u64 = 8;
    const FLOOD: usize = 400;
    let opts = RelayOptions {
        dataplane_extra: format!("retry_threshold = {THRESHOLD}"),
        workers: 2,
        ..Default::default()
    };
    let relay = start("handshake-flood", opts);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let probe = Probe::start(client_config(&relay), echo.addr());
    let accepted_before = relay.counter("connections_accepted").unwrap();

    // One Initial from each of FLOOD source ports; the handshakes are never
    // continued, so each one accepted stays in progress on the relay.
    let mut qc = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    qc.set_application_protos(quiche::h3::APPLICATION_PROTOCOL).unwrap();
    qc.verify_peer(false);
    let mut buf = vec![0u8; 65_536];
    let mut socks = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cid = [0u8; quiche::MAX_CONN_ID_LEN];
        cid[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        cid[8..16].copy_from_slice(&(std::process::id() as u64).to_be_bytes());
        let scid = quiche::ConnectionId::from_ref(&cid);
        let mut conn =
            quiche::connect(Some("localhost"), &scid, sock.local_addr().unwrap(), relay.addr, &mut qc)
                .unwrap();
        let (n, _) = conn.send(&mut buf).unwrap();
        sock.send_to(&buf[..n], relay.addr).unwrap();
        socks.push(sock);
        // Spread over about a second, so the probe measures during it.
        std::thread::sleep(Duration::from_micros(2500));
    }
    // What came back to each port: a Retry, or the relay's Initial (the
    // handshake it accepted).
    let (mut retries, mut initials) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pending: Vec<&UdpSocket> = socks.iter().collect();
    for s in &pending {
        s.set_nonblocking(true).unwrap();
    }
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|s| match s.recv(&mut buf) {
            Ok(n) => {
                match quiche::Header::from_slice(&mut buf[..n], quiche::MAX_CONN_ID_LEN).map(|h| h.ty) {
                    Ok(quiche::Type::Retry) => retries += 1,
                    Ok(_) => initials += 1,
                    Err(_) => {}
                }
                false
            }
            Err(_) => true,
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let accepted = relay.counter("connections_accepted").unwrap() - accepted_before;
    let retries_sent = relay.counter("retries_sent").unwrap();
    eprintln!(
        "flood: {retries} Retries, {initials} handshakes, {accepted} accepted, {retries_sent} retries_sent"
    );
    // Each worker takes at most THRESHOLD handshakes in progress; every
    // other Initial is answered with a stateless Retry (RFC 9000 8.1.2).
    assert!(accepted <= 2 * THRESHOLD, "state for at most the threshold per worker: {accepted}");
    assert!(accepted >= THRESHOLD, "handshakes below the threshold are served: {accepted}");
    assert_eq!(initials as u64, accepted, "exactly the accepted handshakes were answered with an Initial");
    assert_eq!(retries, FLOOD - initials, "every other Initial got a Retry");
    assert_eq!(retries_sent, retries as u64);
    // A real client arriving during the flood passes address validation
    // (it follows the Retry) and tunnels.
    let mut c = Client::connect(client_config(&relay), T).expect("a new client connects through Retry");
    let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    assert!(c.send_datagram(s, b"after the flood").unwrap());
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        c.drive(Duration::from_millis(10)).unwrap();
        got.extend(c.take_datagrams(s));
    }
    assert_eq!(got, vec![b"after the flood".to_vec()]);
    assert!(relay.counter("retries_sent").unwrap() > retries_sent, "the new client was sent a Retry too");
    probe.finish().assert_served("handshake flood");
}

#[test]
fn connect_flood_past_the_quota_gets_429() {
    let _serial = serial();
    const MAX_FLOWS: usize = 20;
    const FLOOD: usize = 100;
    let opts = RelayOptions {
        extra_tokens: vec!["flood-token".into()],
        extra_config: format!("[quotas.per_identity]\nmax_flows = {MAX_FLOWS}\n"),
        ..Default::default()
    };
    let relay = start("connect-flood", opts);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    // The well-behaved client is another identity (the default token).
    let probe = Probe::start(client_config(&relay), echo.addr());
    let mut cfg = client_config(&relay);
    cfg.token = Some("flood-token".into());
    let mut flood = Client::connect(cfg, T).unwrap();
    let ids: Vec<u64> =
        (0..FLOOD).map(|_| flood.request_udp("127.0.0.1", echo.addr().port()).unwrap()).collect();
    let (mut ok, mut refused) = (0, 0);
    for id in ids {
        match flood.wait_answer(id, Duration::from_secs(10)).unwrap() {
            a if a.status() == Some(200) => ok += 1,
            a @ Answer::Response(_) => {
                // The documented answer: 429 + Proxy-Status
                // http_request_denied naming the quota.
                assert_eq!(a.status(), Some(429), "{a:?}");
                let ps = a.header("proxy-status").unwrap_or_default();
                assert!(ps.contains("error=http_request_denied"), "{ps}");
                assert!(ps.contains("quota exceeded: per_identity.max_flows"), "{ps}");
                refused += 1;
            }
            a => panic!("unexpected answer {a:?}"),
        }
    }
    assert_eq!((ok, refused), (MAX_FLOWS, FLOOD - MAX_FLOWS));
    // Keep flooding for 2 s (bounded: at most 200 batches): with the
    // quota used up, every further CONNECT is refused with 429.
    let end = Instant::now() + Duration::from_secs(2);
    let mut more = 0;
    for _ in 0..200 {
        if Instant::now() >= end {
            break;
        }
        let ids: Vec<u64> =
            (0..20).map(|_| flood.request_udp("127.0.0.1", echo.addr().port()).unwrap()).collect();
        for id in ids {
            assert_eq!(flood.wait_answer(id, Duration::from_secs(10)).unwrap().status(), Some(429));
            more += 1;
        }
    }
    assert!(more >= 20, "the flood went on: {more}");
    assert!(flood.closed().is_none(), "refusals are per request; the connection stays");
    probe.finish().assert_served("CONNECT flood");
}

#[test]
fn datagram_flood_towards_a_slow_target_keeps_memory_bounded() {
    let _serial = serial();
    const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;
    let relay = start("datagram-flood", RelayOptions::default());
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let probe = Probe::start(client_config(&relay), echo.addr());
    let rss_before = relay.dataplane_rss_kib().unwrap();

    // Up: a target that never reads (small receive buffer), flooded for 3 s.
    let slow = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&slow).set_recv_buffer_size(4096);
    let mut up = Client::connect(client_config(&relay), T).unwrap();
    let s = up.open_udp("127.0.0.1", slow.local_addr().unwrap().port(), T).unwrap();
    let payload = vec![0xabu8; 1200];
    let mut sent = 0u64;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        for _ in 0..64 {
            if up.send_datagram(s, &payload).unwrap() {
                sent += 1;
            }
        }
        up.drive(Duration::ZERO).unwrap();
    }
    up.flush().unwrap();

    // Down: a source target sending as fast as it can to a client that
    // stops reading, for 3 s: the relay's per-connection datagram queue
    // fills to its pause mark, the relay stops reading the source (the
    // kernel drops the rest) and counts the pause; what it had already
    // read beyond the queue is dropped and counted.
    let source =
        Target::start("127.0.0.1:0".parse().unwrap(), TargetMode::Source { size: 1200, rate_per_peer: None })
            .unwrap();
    // Counted from before the tunnel opens: the source floods from the
    // first datagram it hears, and the pause may come while the client is
    // still reading its first replies.
    let drops_before = relay.counter("drop_queue_full").unwrap() + relay.counter("quic_send_drops").unwrap();
    let pauses_before = relay.counter("target_reads_paused").unwrap();
    let mut down = Client::connect(client_config(&relay), T).unwrap();
    let d = down.open_udp("127.0.0.1", source.addr().port(), T).unwrap();
    assert!(down.send_datagram(d, b"hello").unwrap());
    down.drive(Duration::from_millis(50)).unwrap();
    // Part of the scenario, not a wait for a result: the client does not
    // read for 3 s while the source floods it.
    std::thread::sleep(Duration::from_secs(3));
    let drops =
        relay.counter("drop_queue_full").unwrap() + relay.counter("quic_send_drops").unwrap() - drops_before;
    let pauses = relay.counter("target_reads_paused").unwrap() - pauses_before;
    let source_sent = source.stats().snapshot().2;
    drop(source);

    let rss_after = relay.dataplane_rss_kib().unwrap();
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "datagram flood: {sent} sent up, {source_sent} sent down by the source, {drops} dropped, {pauses} pauses, RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(sent > 1000, "the flood flowed: {sent}");
    assert!(relay.counter("datagrams_up").unwrap() > 1000);
    assert!(source_sent > 10_000, "the source flooded: {source_sent}");
    assert!(pauses > 0, "the relay stopped reading a source its client could not keep up with");
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "dataplane RSS grew {growth} KiB (bound {RSS_GROWTH_BOUND_KIB} KiB)"
    );
    probe.finish().assert_served("datagram flood");
    // The flooded client is still served once it reads again.
    let deadline = Instant::now() + T;
    let mut got = 0;
    while got == 0 && Instant::now() < deadline {
        down.drive(Duration::from_millis(10)).unwrap();
        got += down.take_datagrams(d).len();
    }
    assert!(got > 0, "the flooded client gets datagrams again once it reads");
    assert!(down.closed().is_none());
}

#[test]
fn thousands_of_idle_connections_up_to_the_connection_limit() {
    let _serial = serial();
    const LIMIT: usize = 2000;
    // Bounded per KiB of relay memory per idle connection (quiche's state,
    // the HTTP/3 streams, our bookkeeping).
    const KIB_PER_CONNECTION: u64 = 128;
    let nofile = raise_nofile();
    assert!(nofile as usize > 2 * LIMIT + 200, "open-file limit {nofile} too low for this test");
    let opts = RelayOptions {
        workers: 1,
        dataplane_extra: format!("max_connections_per_worker = {LIMIT}\nquic_idle_timeout_secs = 300"),
        ..Default::default()
    };
    let relay = start("idle-connections", opts);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    wait_until("the readiness check's connection to close", T, || {
        relay.counter("connections_active").unwrap() == 0
    });
    let probe = Probe::start(client_config(&relay), echo.addr());
    let rss_before = relay.dataplane_rss_kib().unwrap();
    let started = Instant::now();
    let mut qc = Client::quic_config(&client_config(&relay)).unwrap();
    qc.set_max_idle_timeout(300_000);
    let mut idle = Vec::with_capacity(LIMIT);
    // The probe holds one connection; fill the rest of the limit.
    for i in 0..LIMIT - 1 {
        let c = Client::connect_with(client_config(&relay), &mut qc, T)
            .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
        idle.push(c);
    }
    let opened_in = started.elapsed();
    assert_eq!(relay.counter("connections_active").unwrap(), LIMIT as u64);
    // Past the limit the relay keeps no state: the handshake goes unanswered.
    let refused = Client::connect_with(client_config(&relay), &mut qc, Duration::from_secs(1));
    assert!(refused.is_err(), "connection {} past the limit was accepted", LIMIT + 1);
    assert_eq!(relay.counter("connections_active").unwrap(), LIMIT as u64);
    let rss_after = relay.dataplane_rss_kib().unwrap();
    let per_conn = rss_after.saturating_sub(rss_before) / LIMIT as u64;
    eprintln!(
        "{LIMIT} idle connections in {opened_in:?}: RSS {rss_before} -> {rss_after} KiB, {per_conn} KiB each"
    );
    assert!(per_conn < KIB_PER_CONNECTION, "{per_conn} KiB per idle connection");
    probe.finish().assert_served("idle connections");
    for c in idle {
        c.close();
    }
}

#[test]
#[ignore = "needs the interop venv (aioquic, h2; `cargo xtask setup`): run by `cargo xtask test`"]
fn slowloris_partial_headers_are_bounded() {
    let python = interop::python();
    let _serial = serial();
    const TUNNELS: u64 = 16;
    const RSS_GROWTH_BOUND_KIB: u64 = 32 * 1024;
    let opts = RelayOptions {
        dataplane_extra: format!("max_tunnels_per_connection = {TUNNELS}"),
        ..Default::default()
    };
    let relay = start("slowloris", opts);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let probe = Probe::start(client_config(&relay), echo.addr());
    let rss_before = relay.dataplane_rss_kib().unwrap();
    // Four aioquic clients, each opening 200 request streams with an
    // incomplete HEADERS frame and trickling one byte per stream every
    // 200 ms for 5 s (so the connection never idles out).
    let interop = Interop::new(python, &relay, echo.addr().port()).arg("--streams", 200).arg("--hold", 5);
    let clients: Vec<_> = (0..4).map(|_| interop.spawn(&["slowloris"]).expect("client starts")).collect();
    let mut results = Vec::new();
    for mut c in clients {
        let r = c.next_object(Duration::from_secs(60)).expect("slowloris result");
        c.finish(Instant::now() + Duration::from_secs(10)).unwrap();
        results.push(r);
    }
    let rss_after = relay.dataplane_rss_kib().unwrap();
    for r in &results {
        assert!(r.get("error").is_none(), "{r}");
        // Bounded in count: the relay's MAX_STREAMS lets in at most
        // max_tunnels_per_connection + 16 request streams per connection
        // (the rest wait in the client); quiche buffers at most
        // SETTINGS_MAX_FIELD_SECTION_SIZE (16 KiB) of each header section.
        assert_eq!(r["peer_max_streams_bidi"], TUNNELS + 16, "{r}");
        assert_eq!(r["answered"], 0, "{r}");
    }
    // No partial header section ever became a request.
    assert_eq!(relay.counter("requests_received").unwrap(), 1, "only the probe's request");
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!("slowloris: RSS {rss_before} -> {rss_after} KiB");
    assert!(growth < RSS_GROWTH_BOUND_KIB, "dataplane RSS grew {growth} KiB");
    probe.finish().assert_served("slowloris");
}

//! A test harness for the worker core: no backend, no sockets on the data
//! path, a virtual clock.
//!
//! The harness plays the three parties a worker talks to:
//! * the I/O backend: it calls [`Handler`] like a backend would (one clock
//!   reading per turn, the packets that "arrived", `end_turn`) and takes
//!   the worker's [`Output`] apart: QUIC batches go to the client, target
//!   batches are recorded per endpoint, opened and closed endpoints too;
//! * control: an in-process shared-memory region, whose control side the
//!   test reads asks from and answers on;
//! * the client: a quiche client connection and HTTP/3 session, fed with
//!   the worker's packets through memory.
//!
//! Time is the harness's: [`Harness::advance`] moves the clock the worker
//! sees, so ask, connect and idle deadlines fire without waiting (quiche
//! keeps its own real-time timers, which a lossless in-memory path never
//! needs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boring::asn1::Asn1Time;
use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::PKey;
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509, X509NameBuilder};
use quiche::h3::NameValue;
use relay_channel::doorbell::Doorbell;
use relay_channel::region::{ControlChannel, Region};
use relay_proto::channel::bootstrap::{Bootstrap, IoBackend, PROTOCOL_VERSION, Protocol, TlsMaterial};
use relay_proto::channel::record::{AnswerRecord, AskRecord, AuthAnswer, AuthAsk, FlowClosed, Verdict};
use relay_proto::cid::CidConfigs;
use relay_proto::template::UriTemplate;

use super::{Flags, Worker};
use crate::context::Settings;
use crate::handoff::Inbox;
use crate::io::{Handler, Turn};
use crate::link::ControlLink;
use crate::retry::RetryTokens;
use crate::tls::TlsShared;

/// The worker's QUIC address in the harness.
pub const SERVER: &str = "127.0.0.1:4433";
/// The client's address.
pub const CLIENT: &str = "127.0.0.1:50000";

/// The worker's own IPv4 address on its TUN device (connect-ip harnesses).
pub const TUN_OWN_V4: &str = "10.89.0.1";
/// Its own IPv6 address there.
pub const TUN_OWN_V6: &str = "fd89::1";

/// A self-signed ECDSA P-256 certificate for `localhost` and its key (PEM).
fn certificate() -> (String, String) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "localhost").expect("CN");
    let name = name.build();
    let mut b = X509::builder().expect("builder");
    b.set_version(2).expect("version");
    b.set_serial_number(&BigNum::from_u32(1).expect("bn").to_asn1_integer().expect("serial"))
        .expect("serial");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(&name).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("time")).expect("not before");
    b.set_not_after(&Asn1Time::days_from_now(1).expect("time")).expect("not after");
    let san =
        SubjectAlternativeName::new().dns("localhost").build(&b.x509v3_context(None, None)).expect("san");
    b.append_extension(&san).expect("extension");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    let cert = String::from_utf8(b.build().to_pem().expect("pem")).expect("utf8");
    let key = String::from_utf8(key.private_key_to_pem_pkcs8().expect("pem")).expect("utf8");
    (cert, key)
}

/// A bootstrap for `workers` workers (the TLS key local: the harness plays
/// no signer).
pub fn bootstrap(workers: u32) -> Bootstrap {
    let (cert, key) = certificate();
    Bootstrap {
        version: PROTOCOL_VERSION,
        workers,
        listen: SERVER.parse().expect("addr"),
        tls: TlsMaterial {
            generation: 1,
            cert_chain_pem: cert,
            private_key_pem: Some(key),
            ticket_keys: Vec::new(),
            ticket_lifetime_secs: 0,
            client_auth: Default::default(),
        },
        uri_template: "/.well-known/masque/udp/{target_host}/{target_port}/".into(),
        proxy_name: "relay".into(),
        auth_realm: "masque".into(),
        ask_timeout_ms: 2000,
        quic_idle_timeout_ms: 30_000,
        max_connections_per_worker: 100,
        max_tunnels_per_connection: 8,
        pending_datagrams_per_tunnel: 16,
        max_capsule_len: 65_535,
        drain_timeout_ms: 5000,
        io_backend: IoBackend::Auto,
        pin_workers: false,
        wait_batch_us: 0,
        cid_config_id: 0,
        cid_server_id: Vec::new(),
        cid_nonce_len: 14,
        cid_steering: false,
        cid_key: None,
        protocols: vec![Protocol::ConnectUdp],
        retry_threshold: 1024,
        connect_ip: None,
        bind: None,
        tcp: None,
        quic_keys: None,
        upstreams: Vec::new(),
    }
}

/// A bootstrap for one worker serving connect-ip with `mtu_probe` (its
/// TUN device is the harness's: what the worker writes to it is recorded).
pub fn ip_bootstrap(mtu_probe: relay_proto::channel::bootstrap::MtuProbe) -> Bootstrap {
    let mut b = bootstrap(1);
    b.protocols.push(Protocol::ConnectIp);
    b.connect_ip = Some(relay_proto::channel::bootstrap::ConnectIpBootstrap {
        uri_template: "/.well-known/masque/ip/{target}/{ipproto}/".into(),
        interface_prefix: "harness".into(),
        mtu: 1280,
        offload: false,
        mtu_probe,
        mtu_probe_timeout_ms: 5000,
        worker_subnets: Vec::new(),
    });
    b
}

/// Control's side of one worker's channel.
pub struct FakeControl {
    chan: ControlChannel,
    answer_bell: Doorbell,
    /// Every record the worker sent, in order.
    pub received: Vec<AskRecord>,
}

impl FakeControl {
    /// Reads what the worker pushed since the last call.
    pub fn poll(&mut self) {
        while let Some(r) = self.chan.rx.pop().expect("the worker sends valid records") {
            self.received.push(r);
        }
    }

    /// The authorization asks received (and not yet taken).
    pub fn take_asks(&mut self) -> Vec<AuthAsk> {
        self.poll();
        let mut asks = Vec::new();
        self.received.retain(|r| match r {
            AskRecord::AuthAsk(a) => {
                asks.push(a.clone());
                false
            }
            _ => true,
        });
        asks
    }

    /// The flows reported closed.
    pub fn closed_flows(&mut self) -> Vec<FlowClosed> {
        self.poll();
        self.received
            .iter()
            .filter_map(|r| if let AskRecord::FlowClosed(c) = r { Some(*c) } else { None })
            .collect()
    }

    /// Sends a record to the worker and rings its bell.
    pub fn send(&mut self, r: AnswerRecord) {
        self.chan.tx.push(&r).expect("room in the ring");
        let _ = self.answer_bell.ring();
    }

    /// Answers `ask` with `verdict`.
    pub fn answer(&mut self, ask: &AuthAsk, verdict: Verdict) {
        self.send(AnswerRecord::AuthAnswer(AuthAnswer { ask_id: ask.ask_id, verdict }));
    }

    /// Allows `ask` as flow `flow_id` towards `target`.
    pub fn allow(&mut self, ask: &AuthAsk, flow_id: u64, target: SocketAddr) {
        let verdict = Verdict::Allow {
            flow_id,
            target,
            idle_timeout_ms: 30_000,
            byte_budget: 0,
            identity: "sub:test".into(),
        };
        self.answer(ask, verdict);
    }
}

/// What the worker did with datagram endpoints.
#[derive(Debug, Default)]
pub struct Endpoints {
    /// Opened: key -> the socket's peer (connected) or local address.
    pub opened: HashMap<u64, SocketAddr>,
    /// Payloads sent on each, in order.
    pub sent: HashMap<u64, Vec<Vec<u8>>>,
    /// Closed keys, in order.
    pub closed: Vec<u64>,
    /// Keys whose reads the worker paused and has not resumed.
    pub paused: std::collections::HashSet<u64>,
    /// Pauses and resumes asked for, in order (`true`: paused).
    pub pause_log: Vec<(u64, bool)>,
}

/// The client: a quiche connection and its HTTP/3 session.
pub struct Client {
    /// The QUIC connection.
    pub quic: quiche::Connection,
    /// The HTTP/3 session (once established).
    pub h3: Option<quiche::h3::Connection>,
    h3_config: quiche::h3::Config,
    /// Responses by stream: status and fields.
    pub responses: HashMap<u64, Vec<(String, String)>>,
    /// Streams the relay finished.
    pub finished: Vec<u64>,
    /// Streams the relay reset.
    pub reset: Vec<u64>,
    /// The code of each reset.
    pub reset_codes: HashMap<u64, u64>,
    /// Whether request stream bytes are read (a client that does not read
    /// lets the relay's answers pile up behind its flow control).
    pub read_bodies: bool,
    /// HTTP/3 datagrams received: (stream, context, payload).
    pub datagrams: Vec<(u64, u64, Vec<u8>)>,
    /// Bytes received on request streams (capsules, TCP bytes).
    pub bodies: HashMap<u64, Vec<u8>>,
    /// GOAWAY seen.
    pub goaway: bool,
}

impl Client {
    fn new() -> Self {
        Self::with_stream_window(1 << 20)
    }

    /// A client that lets the relay send at most `window` bytes on each of
    /// its request streams until it reads them.
    pub fn with_stream_window(window: u64) -> Self {
        let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("config");
        config.set_application_protos(quiche::h3::APPLICATION_PROTOCOL).expect("alpn");
        config.verify_peer(false);
        config.set_max_idle_timeout(30_000);
        config.set_initial_max_data(10 << 20);
        config.set_initial_max_stream_data_bidi_local(window);
        config.set_initial_max_stream_data_bidi_remote(1 << 20);
        config.set_initial_max_stream_data_uni(1 << 20);
        config.set_initial_max_streams_bidi(100);
        config.set_initial_max_streams_uni(100);
        config.enable_dgram(true, 1000, 1000);
        // Room for connect-ip's 1280-byte IPv6 packets in one datagram.
        config.set_max_send_udp_payload_size(1400);
        let scid = quiche::ConnectionId::from_ref(&[7; 16]);
        let quic = quiche::connect(
            Some("localhost"),
            &scid,
            CLIENT.parse().expect("addr"),
            SERVER.parse().expect("addr"),
            &mut config,
        )
        .expect("client connection");
        let mut h3_config = quiche::h3::Config::new().expect("h3 config");
        h3_config.enable_extended_connect(true);
        // Claims only 0x41/0x54 streams, which only WebTransport tests open.
        h3_config.enable_webtransport(true);
        Self {
            quic,
            h3: None,
            h3_config,
            responses: HashMap::new(),
            finished: Vec::new(),
            reset: Vec::new(),
            reset_codes: HashMap::new(),
            read_bodies: true,
            datagrams: Vec::new(),
            bodies: HashMap::new(),
            goaway: false,
        }
    }

    /// Handles what the relay sent.
    fn process(&mut self) {
        if self.h3.is_none() && self.quic.is_established() {
            self.h3 =
                Some(quiche::h3::Connection::with_transport(&mut self.quic, &self.h3_config).expect("h3"));
        }
        let Some(h3) = self.h3.as_mut() else { return };
        loop {
            match h3.poll(&mut self.quic) {
                Ok((stream, quiche::h3::Event::Headers { list, .. })) => {
                    let fields = list
                        .iter()
                        .map(|h| {
                            (
                                String::from_utf8_lossy(h.name()).into_owned(),
                                String::from_utf8_lossy(h.value()).into_owned(),
                            )
                        })
                        .collect();
                    self.responses.insert(stream, fields);
                }
                Ok((_, quiche::h3::Event::Data)) if !self.read_bodies => {}
                Ok((stream, quiche::h3::Event::Data)) => {
                    let mut buf = [0u8; 65_536];
                    while let Ok(n) = h3.recv_body(&mut self.quic, stream, &mut buf) {
                        self.bodies.entry(stream).or_default().extend_from_slice(&buf[..n]);
                    }
                }
                Ok((stream, quiche::h3::Event::Finished)) => self.finished.push(stream),
                Ok((stream, quiche::h3::Event::Reset(code))) => {
                    self.reset.push(stream);
                    self.reset_codes.insert(stream, code);
                }
                Ok((_, quiche::h3::Event::GoAway)) => self.goaway = true,
                Ok(_) => {}
                Err(quiche::h3::Error::Done) => break,
                Err(e) => panic!("client HTTP/3: {e}"),
            }
        }
        let mut buf = [0u8; 65_536];
        while let Ok(n) = self.quic.dgram_recv(&mut buf) {
            let d = relay_proto::datagram::decode(&buf[..n]).expect("relay datagrams are well formed");
            self.datagrams.push((d.stream_id, d.context_id, d.payload.to_vec()));
        }
    }

    /// The status of the response on `stream`.
    pub fn status(&self, stream: u64) -> Option<u16> {
        self.field(stream, ":status").and_then(|s| s.parse().ok())
    }

    /// A field of the response on `stream`.
    pub fn field(&self, stream: u64, name: &str) -> Option<&str> {
        self.responses.get(&stream)?.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of field `name` in the response on `stream`, in order.
    pub fn fields(&self, stream: u64, name: &str) -> Vec<&str> {
        self.responses
            .get(&stream)
            .map(|f| f.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect())
            .unwrap_or_default()
    }

    /// Sends a request; returns its stream.
    pub fn request(&mut self, fields: &[(&str, &str)], fin: bool) -> u64 {
        let headers: Vec<quiche::h3::Header> =
            fields.iter().map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes())).collect();
        let h3 = self.h3.as_mut().expect("HTTP/3 is up");
        h3.send_request(&mut self.quic, &headers, fin).expect("request sent")
    }

    /// A connect-udp request to `host:port` with the harness's token.
    pub fn connect_udp(&mut self, host: &str, port: u16) -> u64 {
        let path = format!("/.well-known/masque/udp/{host}/{port}/");
        self.request(
            &[
                (":method", "CONNECT"),
                (":protocol", "connect-udp"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", &path),
                ("capsule-protocol", "?1"),
                ("proxy-authorization", "Bearer test"),
            ],
            false,
        )
    }

    /// A connect-ip request (RFC 9484) scoped to `target` and `ipproto`
    /// with the harness's token.
    pub fn connect_ip(&mut self, target: &str, ipproto: &str) -> u64 {
        let path = format!("/.well-known/masque/ip/{target}/{ipproto}/");
        self.request(
            &[
                (":method", "CONNECT"),
                (":protocol", "connect-ip"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", &path),
                ("capsule-protocol", "?1"),
                ("proxy-authorization", "Bearer test"),
            ],
            false,
        )
    }

    /// A WebTransport session request (`:protocol webtransport`) for
    /// `path` with the harness's token.
    pub fn webtransport(&mut self, path: &str) -> u64 {
        self.request(
            &[
                (":method", "CONNECT"),
                (":protocol", "webtransport"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", path),
                ("proxy-authorization", "Bearer test"),
            ],
            false,
        )
    }

    /// Opens a WebTransport stream in `session` and writes `bytes` on it.
    pub fn open_wt_stream(&mut self, session: u64, bidi: bool, bytes: &[u8]) -> u64 {
        let h3 = self.h3.as_mut().expect("HTTP/3 is up");
        let stream = h3.open_webtransport_stream(&mut self.quic, session, bidi).expect("stream opened");
        self.quic.stream_send(stream, bytes, false).expect("bytes sent");
        stream
    }

    /// How the relay ended the client's WebTransport `stream`: the code of
    /// its RESET_STREAM (a bidirectional stream) or STOP_SENDING (a
    /// unidirectional one), if it sent one.
    pub fn wt_stream_ended(&mut self, stream: u64) -> Option<u64> {
        if stream & 0x2 == 0 {
            let mut buf = [0u8; 4096];
            loop {
                match self.quic.stream_recv(stream, &mut buf) {
                    Ok((n, _)) if n > 0 => continue,
                    Err(quiche::Error::StreamReset(code)) => return Some(code),
                    _ => return None,
                }
            }
        }
        match self.quic.stream_send(stream, b"x", false) {
            Err(quiche::Error::StreamStopped(code)) => Some(code),
            _ => None,
        }
    }

    /// Sends an HTTP/3 datagram with context 0 on `stream`.
    pub fn send_datagram(&mut self, stream: u64, payload: &[u8]) {
        let mut d = Vec::new();
        relay_proto::datagram::encode_into(stream, 0, payload, &mut d);
        self.quic.dgram_send(&d).expect("datagram queued");
    }

    /// A bound connect-udp request (`*` targets, `connect-udp-bind: ?1`).
    pub fn connect_udp_bind(&mut self) -> u64 {
        self.request(
            &[
                (":method", "CONNECT"),
                (":protocol", "connect-udp"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", "/.well-known/masque/udp/%2A/%2A/"),
                ("capsule-protocol", "?1"),
                ("connect-udp-bind", "?1"),
                ("proxy-authorization", "Bearer test"),
            ],
            false,
        )
    }

    /// Sends `bytes` on `stream` (capsules).
    pub fn send_body(&mut self, stream: u64, bytes: &[u8]) {
        let h3 = self.h3.as_mut().expect("HTTP/3 is up");
        let n = h3.send_body(&mut self.quic, stream, bytes, false).expect("body sent");
        assert_eq!(n, bytes.len(), "the client's stream window takes the whole body");
    }

    /// Ends the client's side of `stream`.
    pub fn finish(&mut self, stream: u64) {
        let h3 = self.h3.as_mut().expect("HTTP/3 is up");
        h3.send_body(&mut self.quic, stream, &[], true).expect("FIN sent");
    }
}

/// Static flags for a harness worker (leaked: a test process makes a
/// handful).
fn flags() -> (Flags, &'static AtomicBool, &'static AtomicBool) {
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let drain: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    (Flags { stop, drain }, stop, drain)
}

/// One worker under test, its control and its client.
pub struct Harness {
    /// The worker.
    pub worker: Worker,
    /// Control's side of its channel.
    pub control: FakeControl,
    /// The client.
    pub client: Client,
    /// What happened to datagram endpoints.
    pub endpoints: Endpoints,
    /// The worker's inboxes (hand-offs), one per worker of the bootstrap.
    pub inboxes: Arc<[Inbox]>,
    /// The harness's clock.
    pub now: Instant,
    /// The drain flag the worker obeys.
    pub drain: &'static AtomicBool,
    /// Set when the worker said stop.
    pub stopped: bool,
    /// Packets the worker wrote to its TUN device (connect-ip), in order.
    pub tun_written: Vec<Vec<u8>>,
    /// Descriptors the worker watches (TCP targets), by key; the test
    /// reports their readiness with [`Harness::ready`].
    pub watches: HashMap<crate::io::WatchKey, std::os::fd::RawFd>,
    /// Packets for the client are held back (not delivered) while set.
    pub hold: bool,
    held: Vec<(Vec<u8>, SocketAddr)>,
    _region: Region,
    _relink: mpsc::Sender<ControlLink>,
}

impl Harness {
    /// A harness for worker 0 of `bootstrap`.
    pub fn new(bootstrap: Bootstrap) -> Self {
        Self::worker(bootstrap, 0)
    }

    /// A harness for worker `index` of `bootstrap`.
    pub fn worker(bootstrap: Bootstrap, index: u32) -> Self {
        let (region, _fd) = Region::create(bootstrap.workers).expect("region");
        let ask_bell = Doorbell::new().expect("eventfd");
        let answer_bell = Doorbell::new().expect("eventfd");
        let control_answer_bell = Doorbell::from_fd(answer_bell.try_clone_fd().expect("dup"));
        let alive = Arc::new(AtomicBool::new(true));
        let link = ControlLink::new(region.dataplane_side(index), ask_bell, answer_bell, alive);
        let control = FakeControl {
            chan: region.control_side(index),
            answer_bell: control_answer_bell,
            received: Vec::new(),
        };
        let template = UriTemplate::parse(&bootstrap.uri_template).expect("template");
        let cids = CidConfigs::new(bootstrap.cid_settings().layout().expect("cid layout"));
        let tls = Arc::new(TlsShared::new(bootstrap.tls.clone()).expect("TLS material"));
        let inboxes: Arc<[Inbox]> =
            (0..bootstrap.workers).map(|_| Inbox::new().expect("inbox")).collect::<Vec<_>>().into();
        let ip_template = bootstrap
            .connect_ip
            .as_ref()
            .map(|ip| relay_proto::template::IpUriTemplate::parse(&ip.uri_template).expect("ip template"));
        let serves_ip = bootstrap.connect_ip.is_some();
        let origin_tls = relay_dataplane_origin_tls(&bootstrap);
        let mut settings = Settings::new(index, bootstrap, template, ip_template, cids);
        settings.origin_tls = origin_tls;
        let (relink_tx, relink_rx) = mpsc::channel();
        let (flags, _stop, drain) = flags();
        let retry = Arc::new(RetryTokens::new().expect("retry keys"));
        let mut worker = Worker::new(
            settings,
            tls,
            flags,
            SERVER.parse().expect("addr"),
            link,
            relink_rx,
            inboxes.clone(),
            retry,
        )
        .expect("worker");
        if serves_ip {
            worker.set_tun(crate::tun::TunInfo {
                name: "harness0".into(),
                own: vec![TUN_OWN_V4.parse().expect("addr"), TUN_OWN_V6.parse().expect("addr")],
                offloads: crate::tun::Offloads::default(),
            });
        }
        Self {
            worker,
            control,
            client: Client::new(),
            endpoints: Endpoints::default(),
            inboxes,
            now: Instant::now(),
            drain,
            stopped: false,
            tun_written: Vec::new(),
            watches: HashMap::new(),
            hold: false,
            held: Vec::new(),
            _region: region,
            _relink: relink_tx,
        }
    }

    /// Moves the worker's clock.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// One loop turn: the client's packets in, the worker's turn, its
    /// output taken apart. Returns whether anything moved.
    pub fn turn(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        worker_call(|| self.worker.begin_turn(now));
        let mut buf = vec![0u8; 65_536];
        let client: SocketAddr = CLIENT.parse().expect("addr");
        loop {
            match self.client.quic.send(&mut buf) {
                Ok((n, _)) => {
                    moved = true;
                    worker_call(|| self.worker.on_quic(&mut buf[..n], n, client));
                }
                Err(quiche::Error::Done) => break,
                Err(e) => panic!("client send: {e}"),
            }
        }
        self.worker.on_wake(crate::io::Wake::Answers);
        match worker_call(|| self.worker.end_turn()) {
            Turn::Stop => self.stopped = true,
            Turn::Continue { .. } => {}
        }
        moved |= self.take_output();
        self.client.process();
        moved
    }

    fn take_output(&mut self) -> bool {
        let out = self.worker.output();
        let mut moved = false;
        for e in out.opens.drain(..) {
            let addr = if e.connected { e.sock.peer_addr() } else { e.sock.local_addr() };
            self.endpoints.opened.insert(e.key, addr.expect("socket address"));
            moved = true;
        }
        for send in out.up.drain(..) {
            let seg = send.segment_size.max(1);
            let list = self.endpoints.sent.entry(send.key).or_default();
            list.extend(send.buf.chunks(seg).map(<[u8]>::to_vec));
            moved = true;
        }
        for key in out.pauses.drain(..) {
            assert!(self.endpoints.paused.insert(key), "endpoint {key} paused twice");
            self.endpoints.pause_log.push((key, true));
        }
        for key in out.resumes.drain(..) {
            assert!(self.endpoints.paused.remove(&key), "endpoint {key} resumed while reading");
            self.endpoints.pause_log.push((key, false));
        }
        self.endpoints.closed.append(&mut out.closes);
        out.finish_quic();
        let server: SocketAddr = SERVER.parse().expect("addr");
        let batches: Vec<_> = out.quic.drain(..).collect();
        for b in batches {
            for pkt in b.buf.chunks(b.segment_size.max(1)) {
                self.held.push((pkt.to_vec(), b.to));
            }
        }
        if !self.hold {
            for (mut pkt, to) in std::mem::take(&mut self.held) {
                let _ = self.client.quic.recv(&mut pkt, quiche::RecvInfo { from: server, to });
                moved = true;
            }
        }
        for w in out.watches.drain(..) {
            self.watches.insert(w.key, w.fd);
        }
        for (key, _) in out.unwatches.drain(..) {
            self.watches.remove(&key);
        }
        for packet in out.tun.packets() {
            self.tun_written.push(packet.to_vec());
            moved = true;
        }
        out.tun.clear();
        moved
    }

    /// Turns until nothing moves (bounded).
    pub fn run(&mut self) {
        for _ in 0..200 {
            if !self.turn() && !self.turn() {
                return;
            }
        }
        panic!("the worker and the client never settled");
    }

    /// Completes the client's handshake and HTTP/3 setup.
    pub fn connect(&mut self) {
        self.run();
        assert!(self.client.quic.is_established(), "handshake");
        assert!(self.client.h3.is_some(), "HTTP/3");
        self.run();
    }

    /// Delivers payloads from endpoint `key` (a target's reply).
    pub fn from_target(&mut self, key: u64, payload: &[u8]) {
        self.worker.begin_turn(self.now);
        self.worker.on_target(key, None, payload, payload.len().max(1));
        let _ = self.worker.end_turn();
        self.take_output();
        self.client.process();
        self.run();
    }

    /// Delivers `payloads` from endpoint `key` as one receive of
    /// `segment_size`-byte datagrams (a GRO batch), then runs.
    pub fn from_target_batch(&mut self, key: u64, payloads: &[u8], segment_size: usize) {
        self.from_peer_batch(key, None, payloads, segment_size);
    }

    /// Delivers `payloads` from `from` (a bound tunnel's peer; `None` on a
    /// connected endpoint) as one receive of `segment_size`-byte
    /// datagrams, then runs.
    pub fn from_peer_batch(
        &mut self,
        key: u64,
        from: Option<SocketAddr>,
        payloads: &[u8],
        segment_size: usize,
    ) {
        let now = self.now;
        worker_call(|| {
            self.worker.begin_turn(now);
            self.worker.on_target(key, from, payloads, segment_size);
            let _ = self.worker.end_turn();
        });
        self.take_output();
        self.client.process();
        self.run();
    }

    /// Delivers `packets` as reads from the TUN device (one packet per
    /// read, no offload header), all in one turn, then runs.
    pub fn from_tun(&mut self, packets: &[Vec<u8>]) {
        let mut reads = packets.to_vec();
        let now = self.now;
        worker_call(|| {
            self.worker.begin_turn(now);
            for read in &mut reads {
                self.worker.on_tun(read);
            }
            let _ = self.worker.end_turn();
        });
        self.take_output();
        self.client.process();
        self.run();
    }

    /// Reports every watched descriptor readable and writable in one turn
    /// (as an edge-triggered backend would after a change), then runs.
    pub fn ready(&mut self) {
        self.worker.begin_turn(self.now);
        let keys: Vec<_> = self.watches.keys().copied().collect();
        for key in keys {
            self.worker.on_ready(key, crate::io::Ready { readable: true, writable: true });
        }
        let _ = self.worker.end_turn();
        self.take_output();
        self.client.process();
        self.run();
    }

    /// The one endpoint opened, with its peer.
    pub fn only_endpoint(&self) -> (u64, SocketAddr) {
        assert_eq!(self.endpoints.opened.len(), 1, "{:?}", self.endpoints.opened);
        self.endpoints.opened.iter().map(|(k, a)| (*k, *a)).next().expect("one")
    }
}

/// Runs one call into the worker. Never inlined, so that an instruction
/// profiler can count the worker's side of a harness run apart from the
/// client's and the harness's (`cargo xtask instr` collects only inside
/// this function).
#[inline(never)]
pub fn worker_call<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The upstream routes' TLS settings of `bootstrap`, as the dataplane
/// builds them at attach.
fn relay_dataplane_origin_tls(bootstrap: &Bootstrap) -> std::sync::Arc<crate::origin_tls::OriginTls> {
    std::sync::Arc::new(
        crate::origin_tls::OriginTls::from_bootstrap(&bootstrap.upstreams).expect("origin TLS settings"),
    )
}

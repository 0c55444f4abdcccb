//! A connect-udp client on quiche, used by the tests, the benchmarks and
//! operators (`relay-bench udp-send`, `relay-bench tunnel-echo`).
//!
//! Single-threaded and poll-driven: [`Client::drive`] moves packets and
//! records what arrived per stream (response headers, resets, datagrams
//! from QUIC DATAGRAM frames or DATAGRAM capsules).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mio::{Events, Interest, Poll, Token};
use quiche::h3::NameValue;
use relay_proto::capsule::{self, Capsule, CapsuleDecoder};
use relay_proto::datagram;
use relay_proto::template::UriTemplate;
use relay_udp::SegmentBatcher;

/// The default connect-udp URI template.
pub const DEFAULT_TEMPLATE: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";

/// How to reach and talk to the relay.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Relay UDP address.
    pub relay: SocketAddr,
    /// TLS server name and `:authority` host.
    pub server_name: String,
    /// CA (or self-signed certificate) to verify the relay with; `None`
    /// disables verification unless [`Self::system_roots`] is set.
    pub ca: Option<PathBuf>,
    /// Without `ca`, verify the relay with the system's trust store rather
    /// than not at all.
    pub system_roots: bool,
    /// Advertise SETTINGS_H3_DATAGRAM (and QUIC DATAGRAM support). When
    /// false the relay must fall back to DATAGRAM capsules.
    pub h3_datagrams: bool,
    /// The relay's URI template.
    pub template: String,
    /// Bearer token for `proxy-authorization`.
    pub token: Option<String>,
    /// A TLS session from an earlier connection ([`Client::session`]) to
    /// resume.
    pub session: Option<Vec<u8>>,
    /// A test hook for fleets: once `relay` has answered with a Retry,
    /// send the retried Initial and everything after it to this address
    /// instead (another host of the fleet), and take what it sends as
    /// coming from `relay`. The other host must accept the first host's
    /// Retry token for the handshake to complete.
    pub after_retry_send_to: Option<SocketAddr>,
    /// A client certificate chain and its key (PEM files) to present when
    /// the relay asks for one (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ClientConfig {
    /// A config for a relay on `relay` with the default template.
    pub fn new(relay: SocketAddr) -> Self {
        Self {
            relay,
            server_name: "localhost".into(),
            ca: None,
            system_roots: false,
            h3_datagrams: true,
            template: DEFAULT_TEMPLATE.into(),
            token: None,
            session: None,
            after_retry_send_to: None,
            client_cert: None,
        }
    }
}

/// What the relay answered on a request stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Response headers (`:status` first as sent).
    Response(Vec<(String, String)>),
    /// The relay reset the stream with this HTTP/3 error code.
    Reset(u64),
}

/// Whether a certificate (DER) lists `ip` among its subject alternative
/// names.
fn certificate_names_ip(der: &[u8], ip: std::net::IpAddr) -> bool {
    let octets = match ip {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    boring::x509::X509::from_der(der)
        .ok()
        .and_then(|c| c.subject_alt_names())
        .is_some_and(|names| names.iter().any(|n| n.ipaddress() == Some(octets.as_slice())))
}

/// Why a handshake ended, as a person reads it: a TLS alert (QUIC
/// CRYPTO_ERROR, RFC 9001 section 4.8) by name, with what a certificate
/// alert on our side usually means; else the raw errors.
fn describe_close(
    local: Option<&quiche::ConnectionError>,
    peer: Option<&quiche::ConnectionError>,
    server_name: &str,
) -> String {
    let alert = |e: &quiche::ConnectionError| {
        (!e.is_app && (0x100..0x200).contains(&e.error_code)).then(|| {
            let code = (e.error_code - 0x100) as u8;
            let name = match code {
                40 => "handshake_failure",
                42 => "bad_certificate",
                43 => "unsupported_certificate",
                45 => "certificate_expired",
                46 => "certificate_unknown",
                48 => "unknown_ca",
                116 => "certificate_required",
                51 => "decrypt_error",
                80 => "internal_error",
                120 => "no_application_protocol",
                _ => "",
            };
            format!("TLS alert {code} {name}").trim_end().to_string()
        })
    };
    match (local, peer) {
        (Some(l), _) if alert(l).is_some() => format!(
            "we sent {}: the relay's certificate did not verify for the name {server_name:?} (check the CA, or name the one the certificate holds with --server-name)",
            alert(l).unwrap_or_default()
        ),
        (_, Some(p)) if alert(p).is_some() => format!("the relay sent {}", alert(p).unwrap_or_default()),
        (l, p) => format!("local {l:?}, peer {p:?}"),
    }
}

/// The relay refused a request: what was asked, the status, and the
/// refusal as [`describe_refusal`] words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} refused: {text}")]
pub struct Refused {
    /// What was asked (e.g. "connect-udp over HTTP/2").
    pub what: String,
    /// The HTTP status.
    pub status: u16,
    /// Status, reason and Proxy-Status.
    pub text: String,
}

/// A refusal as a person reads it: the status, its reason phrase, and
/// the relay's Proxy-Status (RFC 9209) when it sent one, e.g. `403
/// Forbidden (Proxy-Status: masque-relay; error=destination_ip_prohibited)`.
pub fn describe_refusal(status: u16, proxy_status: Option<&str>) -> String {
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let mut text = format!("{status} {reason}").trim_end().to_string();
    if let Some(p) = proxy_status {
        text.push_str(&format!(" (Proxy-Status: {p})"));
    }
    text
}

impl Answer {
    /// Whether the relay accepted the request (a 2xx response).
    pub fn is_success(&self) -> bool {
        self.status().is_some_and(|s| (200..300).contains(&s))
    }

    /// What the answer says, for an error message: the status with its
    /// Proxy-Status, or the HTTP/3 error code of a reset.
    pub fn describe(&self) -> String {
        match (self, self.status()) {
            (Answer::Reset(code), _) => format!("stream reset with HTTP/3 error {code:#x}"),
            (_, Some(status)) => describe_refusal(status, self.header("proxy-status")),
            (_, None) => "a response without :status".into(),
        }
    }

    /// The `:status` of a response.
    pub fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }

    /// A response header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Answer::Response(h) => h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()),
            Answer::Reset(_) => None,
        }
    }
}

#[derive(Default)]
struct StreamState {
    answer: Option<Answer>,
    finished: bool,
    decoder: Option<CapsuleDecoder>,
    datagrams: VecDeque<Vec<u8>>,
    capsule_datagrams: u64,
    /// connect-ip capsules received (type, value), bounded.
    control: VecDeque<(u64, Vec<u8>)>,
    /// Datagrams with a non-zero context ID (bound tunnels), bounded.
    other_contexts: VecDeque<(u64, Vec<u8>)>,
    /// A classic CONNECT stream: its DATA is raw bytes, kept here.
    raw: Option<Vec<u8>>,
    /// `raw` reached [`MAX_RAW`] with body bytes left unread in quiche
    /// (read on by [`Client::take_raw`]).
    raw_paused: bool,
}

/// Bytes of a CONNECT stream kept until taken; beyond, they wait in quiche
/// (and its flow control holds the relay back).
const MAX_RAW: usize = 1 << 20;

/// Datagrams with non-zero contexts kept per stream until taken.
const MAX_OTHER_CONTEXT_DATAGRAMS: usize = 4096;

/// connect-ip (RFC 9484 section 4.7) and bound UDP compression capsule
/// types the client keeps.
const IP_CAPSULES: &[u64] = &[0x01, 0x02, 0x03, 0x11, 0x12, 0x13];
/// connect-ip capsules kept per stream until taken.
const MAX_CONTROL: usize = 64;

/// A QUIC + HTTP/3 connection to the relay.
pub struct Client {
    config: ClientConfig,
    template: UriTemplate,
    poll: Poll,
    socket: mio::net::UdpSocket,
    local: SocketAddr,
    quic: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    h3_config: quiche::h3::Config,
    streams: HashMap<u64, StreamState>,
    buf: Vec<u8>,
    out: Vec<u8>,
    dgram: Vec<u8>,
    batcher: SegmentBatcher,
    /// Datagrams received for streams this client does not know.
    pub unknown_stream_datagrams: u64,
    /// UDP packets received (after GRO splitting).
    pub packets_in: u64,
    /// Receive system calls that returned data.
    pub recv_calls: u64,
    /// Whether the relay sent GOAWAY.
    pub goaway_received: bool,
    /// Whether a Retry arrived (with [`ClientConfig::after_retry_send_to`]:
    /// the connection now talks to that address).
    pub retried: bool,
    /// Sequence number of the destination connection ID in use.
    dcid_seq: u64,
    /// Single-use credentials (Privacy Pass tokens) for the next
    /// connect-udp requests, one each, before the configured token.
    authorizations: VecDeque<String>,
}

const SOCKET: Token = Token(0);

/// Reads body bytes of a CONNECT stream into `raw` until quiche has none
/// or `raw` holds [`MAX_RAW`]; returns whether it stopped at the bound.
fn read_raw(
    h3: &mut quiche::h3::Connection,
    quic: &mut quiche::Connection,
    id: u64,
    raw: &mut Vec<u8>,
    buf: &mut [u8],
) -> bool {
    while raw.len() < MAX_RAW {
        let room = (MAX_RAW - raw.len()).min(buf.len());
        match h3.recv_body(quic, id, &mut buf[..room]) {
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
    true
}

/// Whether `packet` is a Retry (RFC 9000 section 17.2.5): a long header
/// (0x80) of packet type 3 in QUIC v1.
fn is_retry(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b & 0x80 != 0 && (b >> 4) & 0x03 == 3)
}

fn random_cid() -> Result<quiche::ConnectionId<'static>> {
    let mut id = vec![0u8; quiche::MAX_CONN_ID_LEN];
    let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    io::Read::read_exact(&mut f, &mut id).context("reading /dev/urandom")?;
    Ok(quiche::ConnectionId::from_vec(id))
}

impl Client {
    /// Connects and completes the handshake within `timeout`.
    pub fn connect(config: ClientConfig, timeout: Duration) -> Result<Self> {
        let mut qc = Self::quic_config(&config)?;
        Self::connect_with(config, &mut qc, timeout)
    }

    /// The QUIC configuration [`Client::connect`] uses. Building it loads
    /// certificates (milliseconds), so callers that open many connections
    /// build it once and use [`Client::connect_with`].
    pub fn quic_config(config: &ClientConfig) -> Result<quiche::Config> {
        let mut qc = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
        qc.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)?;
        match &config.ca {
            Some(ca) => {
                qc.load_verify_locations_from_file(&ca.display().to_string())
                    .with_context(|| format!("loading CA {}", ca.display()))?;
                qc.verify_peer(true);
            }
            None => qc.verify_peer(config.system_roots),
        }
        if let Some((chain, key)) = &config.client_cert {
            qc.load_cert_chain_from_pem_file(&chain.display().to_string())
                .with_context(|| format!("loading client certificate {}", chain.display()))?;
            qc.load_priv_key_from_pem_file(&key.display().to_string())
                .with_context(|| format!("loading client key {}", key.display()))?;
        }
        qc.set_max_idle_timeout(30_000);
        qc.set_max_recv_udp_payload_size(65_527);
        qc.set_max_send_udp_payload_size(1350);
        qc.set_initial_max_data(32 << 20);
        qc.set_initial_max_stream_data_bidi_local(1 << 20);
        qc.set_initial_max_stream_data_bidi_remote(1 << 20);
        qc.set_initial_max_stream_data_uni(1 << 20);
        qc.set_initial_max_streams_bidi(100);
        qc.set_initial_max_streams_uni(100);
        if config.h3_datagrams {
            qc.enable_dgram(true, 4096, 4096);
        }
        Ok(qc)
    }

    /// Connects with a prepared QUIC configuration.
    pub fn connect_with(config: ClientConfig, qc: &mut quiche::Config, timeout: Duration) -> Result<Self> {
        let template = UriTemplate::parse(&config.template).map_err(|e| anyhow!("template: {e}"))?;
        let bind: SocketAddr = if config.relay.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let std_sock = std::net::UdpSocket::bind(bind)?;
        std_sock.set_nonblocking(true)?;
        let sock2 = socket2::SockRef::from(&std_sock);
        let _ = sock2.set_recv_buffer_size(4 << 20);
        let _ = sock2.set_send_buffer_size(4 << 20);
        // GRO is an optimisation: without kernel support packets simply
        // arrive one per receive.
        let _ = relay_udp::enable_gro(&std_sock);
        let mut socket = mio::net::UdpSocket::from_std(std_sock);
        let local = socket.local_addr()?;
        let poll = Poll::new()?;
        poll.registry().register(&mut socket, SOCKET, Interest::READABLE)?;
        let scid = random_cid()?;
        // quiche checks a server name as a DNS name only: an IP address
        // goes without SNI and is checked against the certificate's IP
        // addresses once the handshake is done (the chain is verified
        // either way).
        let ip_name: Option<std::net::IpAddr> = config.server_name.parse().ok();
        let sni = if ip_name.is_some() { None } else { Some(config.server_name.as_str()) };
        let mut quic = quiche::connect(sni, &scid, local, config.relay, qc)?;
        if let Some(session) = &config.session {
            quic.set_session(session)?;
        }
        let h3_config = quiche::h3::Config::new()?;
        let mut client = Self {
            config,
            template,
            poll,
            socket,
            local,
            quic,
            h3: None,
            h3_config,
            streams: HashMap::new(),
            buf: vec![0; 65_536],
            out: vec![0; 1350],
            dgram: Vec::with_capacity(2048),
            batcher: SegmentBatcher::new(1350),
            unknown_stream_datagrams: 0,
            packets_in: 0,
            recv_calls: 0,
            goaway_received: false,
            retried: false,
            dcid_seq: 0,
            authorizations: VecDeque::new(),
        };
        let deadline = Instant::now() + timeout;
        client.flush()?;
        while client.h3.is_none() {
            // Draining: the relay closed the connection (e.g. it could not
            // complete the handshake); its reason is in peer_error.
            if client.quic.is_closed() || client.quic.is_draining() {
                bail!(
                    "handshake with {} failed: {}",
                    client.config.relay,
                    describe_close(
                        client.quic.local_error(),
                        client.quic.peer_error(),
                        &client.config.server_name
                    )
                );
            }
            if Instant::now() >= deadline {
                bail!("handshake with {} timed out (is the relay running?)", client.config.relay);
            }
            client.drive(Duration::from_millis(20))?;
        }
        if let Some(ip) = ip_name
            && (client.config.ca.is_some() || client.config.system_roots)
            && !client.peer_certificate().is_some_and(|der| certificate_names_ip(&der, ip))
        {
            let _ = client.quic.close(false, 0x100 + 42, b"");
            let _ = client.flush();
            bail!(
                "handshake with {} failed: the relay's certificate does not name the address {ip}",
                client.config.relay
            );
        }
        Ok(client)
    }

    /// The TLS session to resume later, once the relay has sent a ticket
    /// (it does right after the handshake; drive the connection a little).
    pub fn session(&self) -> Option<Vec<u8>> {
        self.quic.session().map(<[u8]>::to_vec)
    }

    /// Whether the handshake resumed a session (no certificate sent).
    pub fn is_resumed(&self) -> bool {
        self.quic.is_resumed()
    }

    /// Also wakes [`Client::drive`] when `fd` becomes readable (edge
    /// triggered: read it until it would block).
    pub fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> Result<()> {
        self.poll.registry().register(&mut mio::unix::SourceFd(&fd), Token(1), Interest::READABLE)?;
        Ok(())
    }

    /// Datagrams with a non-zero context ID received on `stream_id`
    /// (context, payload), in order.
    pub fn take_context_datagrams(&mut self, stream_id: u64) -> VecDeque<(u64, Vec<u8>)> {
        self.streams.get_mut(&stream_id).map(|s| std::mem::take(&mut s.other_contexts)).unwrap_or_default()
    }

    /// The request headers of a bound connect-udp request (draft section
    /// 2): both template variables `*`, and `connect-udp-bind: ?1`.
    pub fn bind_headers(&self) -> Vec<(String, String)> {
        let mut h = self.connect_udp_headers("x", 1);
        let path = self.template.as_str().replace("{target_host}", "%2A").replace("{target_port}", "%2A");
        for (name, value) in h.iter_mut() {
            if name == ":path" {
                *value = path.clone();
            }
        }
        h.push(("connect-udp-bind".into(), "?1".into()));
        h
    }

    /// The connect-ip capsules received on `stream_id` (type, value), in
    /// order.
    pub fn take_control_capsules(&mut self, stream_id: u64) -> VecDeque<(u64, Vec<u8>)> {
        self.streams.get_mut(&stream_id).map(|s| std::mem::take(&mut s.control)).unwrap_or_default()
    }

    /// The relay's leaf certificate (DER); on a resumed handshake, the one
    /// the resumed session saw.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        self.quic.peer_cert().map(<[u8]>::to_vec)
    }

    /// This client's UDP address (as quiche knows it: unchanged by
    /// [`Client::rebind`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Simulates a NAT rebinding: the connection moves to a new UDP socket
    /// (a new source port) while quiche keeps its idea of the local
    /// address, exactly as when a NAT in front of the client changes the
    /// mapping. Returns the address the relay now sees.
    pub fn rebind(&mut self) -> Result<SocketAddr> {
        let bind: SocketAddr = if self.config.relay.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let std_sock = std::net::UdpSocket::bind(bind)?;
        std_sock.set_nonblocking(true)?;
        let _ = relay_udp::enable_gro(&std_sock);
        let mut socket = mio::net::UdpSocket::from_std(std_sock);
        self.poll.registry().deregister(&mut self.socket)?;
        self.poll.registry().register(&mut socket, SOCKET, Interest::READABLE)?;
        self.socket = socket;
        Ok(self.socket.local_addr()?)
    }

    /// The relay's SETTINGS enabled extended CONNECT.
    pub fn extended_connect_enabled(&self) -> bool {
        self.h3.as_ref().is_some_and(|h| h.extended_connect_enabled_by_peer())
    }

    /// The relay's SETTINGS enabled HTTP/3 datagrams.
    pub fn h3_datagrams_enabled(&self) -> bool {
        self.h3.as_ref().is_some_and(|h| h.dgram_enabled_by_peer(&self.quic))
    }

    /// Waits up to `timeout` for the relay's SETTINGS.
    pub fn wait_settings(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.h3.as_ref().is_none_or(|h| h.peer_settings_raw().is_none()) {
            if Instant::now() >= deadline {
                bail!("no SETTINGS from the relay within {timeout:?}");
            }
            self.drive(Duration::from_millis(10))?;
        }
        Ok(())
    }

    /// The standard connect-udp request headers for `host:port`.
    pub fn connect_udp_headers(&self, host: &str, port: u16) -> Vec<(String, String)> {
        let authority = format!("{}:{}", self.config.server_name, self.config.relay.port());
        let mut h = vec![
            (":method".to_string(), "CONNECT".to_string()),
            (":protocol".into(), "connect-udp".into()),
            (":scheme".into(), "https".into()),
            (":authority".into(), authority),
            (":path".into(), self.template.expand(host, port)),
            ("capsule-protocol".into(), "?1".into()),
        ];
        if let Some(t) = &self.config.token {
            h.push(("proxy-authorization".into(), format!("Bearer {t}")));
        }
        h
    }

    /// Queues single-use `proxy-authorization` values (e.g. Privacy Pass
    /// credentials): each connect-udp request this client opens takes the
    /// next one instead of the configured bearer token, until none is left.
    pub fn queue_authorizations(&mut self, values: impl IntoIterator<Item = String>) {
        self.authorizations.extend(values);
    }

    /// The connect-udp request headers for `host:port` with the next
    /// queued authorization, if any (also returned, to put it back if the
    /// request cannot be sent).
    fn next_udp_headers(&mut self, host: &str, port: u16) -> (Vec<(String, String)>, Option<String>) {
        let mut h = self.connect_udp_headers(host, port);
        let queued = self.authorizations.pop_front();
        if let Some(a) = &queued {
            h.retain(|(n, _)| n != "proxy-authorization");
            h.push(("proxy-authorization".into(), a.clone()));
        }
        (h, queued)
    }

    /// Sends a request with arbitrary headers (for conformance tests) and
    /// returns its stream ID.
    pub fn send_raw_request(&mut self, headers: &[(String, String)], fin: bool) -> Result<u64> {
        let list: Vec<quiche::h3::Header> =
            headers.iter().map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes())).collect();
        let h3 = self.h3.as_mut().ok_or_else(|| anyhow!("no HTTP/3 connection"))?;
        let id = h3.send_request(&mut self.quic, &list, fin).map_err(|e| anyhow!("send_request: {e}"))?;
        self.streams.insert(id, StreamState::default());
        self.flush()?;
        Ok(id)
    }

    /// Sends a classic CONNECT (RFC 9114 section 4.4) to `authority`
    /// (`host:port`); the stream's DATA is then the TCP byte stream
    /// ([`Self::take_raw`], [`Self::send_stream_bytes`]).
    pub fn request_tcp(&mut self, authority: &str) -> Result<u64> {
        let mut h =
            vec![(":method".to_string(), "CONNECT".to_string()), (":authority".into(), authority.into())];
        if let Some(t) = &self.config.token {
            h.push(("proxy-authorization".into(), format!("Bearer {t}")));
        }
        let id = self.send_raw_request(&h, false)?;
        if let Some(s) = self.streams.get_mut(&id) {
            s.raw = Some(Vec::new());
        }
        Ok(id)
    }

    /// Sends a request whose stream then carries a byte stream both ways,
    /// like [`Self::request_tcp`]'s: an extended CONNECT such as
    /// `:protocol websocket` (RFC 9220). The DATA it receives is read with
    /// [`Self::take_raw`].
    pub fn request_stream(&mut self, headers: &[(String, String)]) -> Result<u64> {
        let id = self.send_raw_request(headers, false)?;
        if let Some(s) = self.streams.get_mut(&id) {
            s.raw = Some(Vec::new());
        }
        Ok(id)
    }

    /// Takes the raw bytes a CONNECT stream received so far (at most
    /// 1 MiB is kept at a time; the rest waits under flow control and is
    /// read on here).
    pub fn take_raw(&mut self, stream_id: u64) -> Vec<u8> {
        let Some(s) = self.streams.get_mut(&stream_id) else { return Vec::new() };
        let taken = s.raw.as_mut().map(std::mem::take).unwrap_or_default();
        if s.raw_paused
            && let (Some(h3), Some(raw)) = (self.h3.as_mut(), s.raw.as_mut())
        {
            s.raw_paused = read_raw(h3, &mut self.quic, stream_id, raw, &mut self.buf);
        }
        taken
    }

    /// Hands the raw bytes a CONNECT stream received so far to `f`, like
    /// [`Self::take_raw`] but keeping this client's buffer (no allocation
    /// and no fresh pages per call: the bulk transfers use it).
    pub fn drain_raw(&mut self, stream_id: u64, mut f: impl FnMut(&[u8])) {
        let Some(s) = self.streams.get_mut(&stream_id) else { return };
        let Some(raw) = s.raw.as_mut() else { return };
        if !raw.is_empty() {
            f(raw);
            raw.clear();
        }
        if s.raw_paused
            && let Some(h3) = self.h3.as_mut()
        {
            s.raw_paused = read_raw(h3, &mut self.quic, stream_id, raw, &mut self.buf);
        }
    }

    /// Sends `data` and then the FIN on a CONNECT stream while reading what
    /// comes back (handed to `on_bytes` in order), until the relay ends the
    /// stream (FIN or reset). Sending and reading interleave: a client that
    /// only sent while blocked would stop reading once [`MAX_RAW`] bytes
    /// waited, and with an echoing target the relay's backpressure (bounded
    /// both ways) would then stop its sending for good. Fails after
    /// `timeout`.
    pub fn exchange_raw(
        &mut self,
        stream_id: u64,
        data: &[u8],
        timeout: Duration,
        mut on_bytes: impl FnMut(&[u8]),
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut received = 0;
        let mut off = 0;
        let mut fin_sent = false;
        loop {
            while !fin_sent {
                // quiche sets the FIN only with the last byte.
                match self.try_send_stream_bytes(stream_id, &data[off..], true)? {
                    Some(n) => {
                        off += n;
                        fin_sent = off == data.len();
                        if n == 0 && !fin_sent {
                            break;
                        }
                    }
                    None => break,
                }
            }
            self.flush()?;
            let finished = self.stream_finished(stream_id);
            self.drain_raw(stream_id, |b| {
                received += b.len();
                on_bytes(b);
            });
            if fin_sent && finished {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "CONNECT stream {stream_id}: {off} of {} bytes sent, {received} received within {timeout:?}",
                    data.len()
                );
            }
            self.drive(Duration::from_millis(1))?;
        }
    }

    /// The answer on `stream_id`, if it has arrived (without waiting).
    pub fn answer(&self, stream_id: u64) -> Option<&Answer> {
        self.streams.get(&stream_id).and_then(|s| s.answer.as_ref())
    }

    /// Forgets a stream this client is done with (its state, and whatever
    /// the relay still sends on it: quiche discards it). Later events on
    /// the stream are ignored.
    pub fn forget(&mut self, stream_id: u64) {
        if self.streams.remove(&stream_id).is_some() {
            let _ = self.quic.stream_shutdown(stream_id, quiche::Shutdown::Read, 0x100);
        }
    }

    /// Writes what fits of `bytes` on the request stream now, without
    /// waiting (`fin` applies only once every byte is written). Returns
    /// how many bytes were taken, `None` when nothing could be (flow
    /// control; an empty `bytes` with `fin` is `Some(0)` once the FIN is
    /// queued).
    pub fn try_send_stream_bytes(
        &mut self,
        stream_id: u64,
        bytes: &[u8],
        fin: bool,
    ) -> Result<Option<usize>> {
        let h3 = self.h3.as_mut().ok_or_else(|| anyhow!("no HTTP/3 connection"))?;
        match h3.send_body(&mut self.quic, stream_id, bytes, fin) {
            Ok(n) => Ok(Some(n)),
            Err(quiche::h3::Error::Done) | Err(quiche::h3::Error::StreamBlocked) => Ok(None),
            Err(e) => bail!("send_body: {e}"),
        }
    }

    /// Makes the connection send something the relay acknowledges, so an
    /// idle connection is not closed by the idle timeout.
    pub fn keepalive(&mut self) -> Result<()> {
        let _ = self.quic.send_ack_eliciting();
        self.flush()
    }

    /// Opens a connect-udp request to `host:port` (after the relay's
    /// SETTINGS, as RFC 9220 requires) and returns its stream ID.
    pub fn request_udp(&mut self, host: &str, port: u16) -> Result<u64> {
        self.wait_settings(Duration::from_secs(5))?;
        if !self.extended_connect_enabled() {
            bail!("the relay did not enable extended CONNECT");
        }
        let (headers, _) = self.next_udp_headers(host, port);
        self.send_raw_request(&headers, false)
    }

    /// Waits for the answer on `stream_id`.
    pub fn wait_answer(&mut self, stream_id: u64, timeout: Duration) -> Result<Answer> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.streams.get(&stream_id).and_then(|s| s.answer.clone()) {
                return Ok(a);
            }
            if self.quic.is_closed() {
                bail!("connection closed: {:?}", self.quic.peer_error());
            }
            if Instant::now() >= deadline {
                bail!("no answer on stream {stream_id} within {timeout:?}");
            }
            self.drive(Duration::from_millis(10))?;
        }
    }

    /// Opens a tunnel and requires a 2xx.
    pub fn open_udp(&mut self, host: &str, port: u16, timeout: Duration) -> Result<u64> {
        let id = self.request_udp(host, port)?;
        match self.wait_answer(id, timeout)? {
            a @ Answer::Response(_) if a.status().is_some_and(|s| (200..300).contains(&s)) => Ok(id),
            other => bail!("tunnel to {host}:{port} refused: {}", other.describe()),
        }
    }

    /// Sends a UDP payload as an HTTP/3 datagram. `Ok(false)` when the
    /// QUIC datagram queue is full (try again after driving).
    pub fn send_datagram(&mut self, stream_id: u64, payload: &[u8]) -> Result<bool> {
        self.send_context_datagram(stream_id, datagram::UDP_PAYLOAD_CONTEXT, payload)
    }

    /// Sends a datagram with any context ID.
    pub fn send_context_datagram(&mut self, stream_id: u64, context_id: u64, payload: &[u8]) -> Result<bool> {
        datagram::encode_into(stream_id, context_id, payload, &mut self.dgram);
        match self.quic.dgram_send(&self.dgram) {
            Ok(()) => Ok(true),
            Err(quiche::Error::Done) => Ok(false),
            Err(e) => Err(anyhow!("dgram_send: {e}")),
        }
    }

    /// Largest UDP payload an HTTP/3 datagram on `stream_id` can carry now.
    pub fn max_datagram_payload(&self, stream_id: u64) -> Option<usize> {
        self.quic.dgram_max_writable_len().map(|m| m.saturating_sub(datagram::header_len(stream_id, 0)))
    }

    /// Sends a UDP payload in a DATAGRAM capsule on the request stream.
    pub fn send_capsule(&mut self, stream_id: u64, payload: &[u8]) -> Result<()> {
        let mut bytes = Vec::new();
        capsule::encode_datagram(datagram::UDP_PAYLOAD_CONTEXT, payload, &mut bytes);
        self.send_stream_bytes(stream_id, &bytes, false)
    }

    /// Writes raw bytes on the request stream (DATA frames), driving the
    /// connection while flow control blocks, for at most 5 seconds.
    pub fn send_stream_bytes(&mut self, stream_id: u64, bytes: &[u8], fin: bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut off = 0;
        loop {
            let h3 = self.h3.as_mut().ok_or_else(|| anyhow!("no HTTP/3 connection"))?;
            match h3.send_body(&mut self.quic, stream_id, &bytes[off..], fin) {
                Ok(n) => {
                    off += n;
                    if off == bytes.len() {
                        return self.flush();
                    }
                }
                Err(quiche::h3::Error::Done) | Err(quiche::h3::Error::StreamBlocked) => {}
                Err(e) => bail!("send_body: {e}"),
            }
            if Instant::now() > deadline {
                bail!("stream {stream_id} blocked for 5 s");
            }
            self.drive(Duration::from_millis(1))?;
        }
    }

    /// Ends the request stream (closes the tunnel).
    pub fn finish_stream(&mut self, stream_id: u64) -> Result<()> {
        self.send_stream_bytes(stream_id, &[], true)
    }

    /// Takes the UDP payloads received on `stream_id` so far.
    pub fn take_datagrams(&mut self, stream_id: u64) -> VecDeque<Vec<u8>> {
        self.streams.get_mut(&stream_id).map(|s| std::mem::take(&mut s.datagrams)).unwrap_or_default()
    }

    /// How many payloads on `stream_id` arrived in capsules.
    pub fn capsule_datagrams(&self, stream_id: u64) -> u64 {
        self.streams.get(&stream_id).map_or(0, |s| s.capsule_datagrams)
    }

    /// Whether the relay ended `stream_id`.
    pub fn stream_finished(&self, stream_id: u64) -> bool {
        self.streams.get(&stream_id).is_some_and(|s| s.finished)
    }

    /// Whether the connection is closed, and the relay's error if any.
    pub fn closed(&self) -> Option<Option<(bool, u64)>> {
        if self.quic.is_closed() {
            Some(self.quic.peer_error().map(|e| (e.is_app, e.error_code)))
        } else {
            None
        }
    }

    /// The UDP socket's descriptor, for a caller waiting on several
    /// clients at once (see [`crate::loadgen`]).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.socket.as_raw_fd()
    }

    /// Time until quiche's next timer (loss detection, ACK delay, idle).
    pub fn quic_timeout(&self) -> Option<Duration> {
        self.quic.timeout()
    }

    /// One turn: wait up to `timeout` for packets, process them, send.
    pub fn drive(&mut self, timeout: Duration) -> Result<()> {
        let mut events = Events::with_capacity(8);
        let wait = self.quic.timeout().map_or(timeout, |t| t.min(timeout));
        match self.poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        self.pump().map(|_| ())
    }

    /// One turn without waiting: read what the socket has, run timers,
    /// process events, send. Returns whether any packet arrived.
    pub fn pump(&mut self) -> Result<bool> {
        let mut got = false;
        // Bounded so that a flood cannot starve sending.
        for _ in 0..256 {
            let r = match relay_udp::recv_segments(&self.socket, &mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                Err(e) => return Err(e.into()),
            };
            got = true;
            self.recv_calls += 1;
            let info = quiche::RecvInfo { from: self.peer_as_known(r.from), to: self.local };
            let mut offset = 0;
            while offset < r.len {
                let end = (offset + r.segment_size.max(1)).min(r.len);
                self.packets_in += 1;
                if is_retry(&self.buf[offset..end]) {
                    self.retried = true;
                }
                if let Err(e) = self.quic.recv(&mut self.buf[offset..end], info)
                    && e != quiche::Error::Done
                {
                    tracing::debug!("client recv: {e}");
                }
                offset = end;
            }
        }
        if self.quic.timeout_instant().is_some_and(|t| t <= Instant::now()) {
            self.quic.on_timeout();
        }
        if self.h3.is_none() && self.quic.is_established() {
            self.h3 = Some(quiche::h3::Connection::with_transport(&mut self.quic, &self.h3_config)?);
        }
        self.process_events();
        self.flush()?;
        Ok(got)
    }

    /// Opens tunnels to every target, keeping at most `window` requests in
    /// flight; fails on the first refusal (with its answer) or after
    /// `timeout`.
    pub fn open_many(
        &mut self,
        targets: &[(String, u16)],
        window: usize,
        timeout: Duration,
    ) -> Result<Vec<u64>> {
        self.wait_settings(timeout)?;
        let deadline = Instant::now() + timeout;
        let mut opened = Vec::with_capacity(targets.len());
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut next = 0;
        while opened.len() < targets.len() {
            while next < targets.len() && in_flight.len() < window.max(1) {
                let (host, port) = &targets[next];
                let (headers, queued) = self.next_udp_headers(host, *port);
                let list: Vec<quiche::h3::Header> = headers
                    .iter()
                    .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
                    .collect();
                let h3 = self.h3.as_mut().ok_or_else(|| anyhow!("no HTTP/3 connection"))?;
                match h3.send_request(&mut self.quic, &list, false) {
                    Ok(id) => {
                        self.streams.insert(id, StreamState::default());
                        in_flight.push_back(id);
                        next += 1;
                    }
                    // Stream limit or flow control: wait for credit.
                    Err(quiche::h3::Error::StreamBlocked) | Err(quiche::h3::Error::TransportError(_)) => {
                        if let Some(a) = queued {
                            self.authorizations.push_front(a);
                        }
                        break;
                    }
                    Err(e) => bail!("send_request: {e}"),
                }
            }
            self.flush()?;
            self.drive(Duration::from_millis(1))?;
            while let Some(id) = in_flight.front().copied() {
                let Some(answer) = self.streams.get(&id).and_then(|s| s.answer.clone()) else { break };
                in_flight.pop_front();
                match answer.status() {
                    Some(s) if (200..300).contains(&s) => opened.push(id),
                    _ => bail!("tunnel {} of {} refused: {answer:?}", opened.len() + 1, targets.len()),
                }
            }
            if Instant::now() > deadline {
                bail!("opened {} of {} tunnels before the {timeout:?} deadline", opened.len(), targets.len());
            }
            if self.quic.is_closed() {
                bail!("connection closed while opening tunnels: {:?}", self.quic.peer_error());
            }
        }
        Ok(opened)
    }

    fn process_events(&mut self) {
        let Some(h3) = self.h3.as_mut() else { return };
        loop {
            match h3.poll(&mut self.quic) {
                Ok((id, quiche::h3::Event::Headers { list, .. })) => {
                    let headers = list
                        .iter()
                        .map(|h| {
                            (
                                String::from_utf8_lossy(h.name()).into_owned(),
                                String::from_utf8_lossy(h.value()).into_owned(),
                            )
                        })
                        .collect();
                    // A stream this client forgot (or never opened): ignored.
                    let Some(s) = self.streams.get_mut(&id) else { continue };
                    if s.answer.is_none() {
                        s.answer = Some(Answer::Response(headers));
                    }
                }
                Ok((id, quiche::h3::Event::Data)) => {
                    let Some(s) = self.streams.get_mut(&id) else {
                        while h3.recv_body(&mut self.quic, id, &mut self.buf).is_ok() {}
                        continue;
                    };
                    if let Some(raw) = s.raw.as_mut() {
                        s.raw_paused = read_raw(h3, &mut self.quic, id, raw, &mut self.buf);
                        continue;
                    }
                    let decoder =
                        s.decoder.get_or_insert_with(|| CapsuleDecoder::new(65_535).keep(IP_CAPSULES));
                    while let Ok(n) = h3.recv_body(&mut self.quic, id, &mut self.buf) {
                        let mut got = Vec::new();
                        if decoder.feed(&self.buf[..n], |c| got.push(c)).is_err() {
                            break;
                        }
                        for c in got {
                            match c {
                                Capsule::Datagram(v) => match relay_proto::varint::decode(&v) {
                                    Ok((0, used)) => {
                                        s.datagrams.push_back(v[used..].to_vec());
                                        s.capsule_datagrams += 1;
                                    }
                                    Ok((ctx, used))
                                        if s.other_contexts.len() < MAX_OTHER_CONTEXT_DATAGRAMS =>
                                    {
                                        s.other_contexts.push_back((ctx, v[used..].to_vec()));
                                        s.capsule_datagrams += 1;
                                    }
                                    _ => {}
                                },
                                Capsule::Other { capsule_type, value } => {
                                    if s.control.len() < MAX_CONTROL {
                                        s.control.push_back((capsule_type, value));
                                    }
                                }
                            }
                        }
                    }
                }
                Ok((id, quiche::h3::Event::Finished)) => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.finished = true;
                    }
                }
                Ok((id, quiche::h3::Event::Reset(code))) => {
                    let Some(s) = self.streams.get_mut(&id) else { continue };
                    if s.answer.is_none() {
                        s.answer = Some(Answer::Reset(code));
                    }
                    s.finished = true;
                }
                Ok((_, quiche::h3::Event::GoAway)) => self.goaway_received = true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        while let Ok(n) = self.quic.dgram_recv(&mut self.buf) {
            let Ok(d) = datagram::decode(&self.buf[..n]) else { continue };
            match self.streams.get_mut(&d.stream_id) {
                Some(s) if d.context_id == 0 => s.datagrams.push_back(d.payload.to_vec()),
                Some(s) if s.other_contexts.len() < MAX_OTHER_CONTEXT_DATAGRAMS => {
                    s.other_contexts.push_back((d.context_id, d.payload.to_vec()))
                }
                _ => self.unknown_stream_datagrams += 1,
            }
        }
    }

    /// Sends everything quiche has queued, coalescing packets into GSO
    /// batches.
    pub fn flush(&mut self) -> Result<()> {
        loop {
            let (n, info) = match self.quic.send(&mut self.out) {
                Ok(v) => v,
                Err(quiche::Error::Done) => break,
                Err(e) => bail!("QUIC send: {e}"),
            };
            let to = self.send_address(info.to);
            self.batcher.push(&self.socket, to, &self.out[..n])?;
        }
        self.batcher.flush(&self.socket)?;
        Ok(())
    }

    /// Where a packet quiche addressed to `to` goes: after a Retry, to
    /// [`ClientConfig::after_retry_send_to`] if set.
    fn send_address(&self, to: SocketAddr) -> SocketAddr {
        match self.config.after_retry_send_to {
            Some(other) if self.retried && to == self.config.relay => other,
            _ => to,
        }
    }

    /// The address quiche is told a packet from `from` came from: the
    /// redirect target speaks for the relay.
    fn peer_as_known(&self, from: SocketAddr) -> SocketAddr {
        match self.config.after_retry_send_to {
            Some(other) if from == other => self.config.relay,
            _ => from,
        }
    }

    /// The destination connection ID this client sends with now (the
    /// relay's connection ID: the handshake's, or one it issued with
    /// NEW_CONNECTION_ID after [`Client::switch_dcid`]).
    pub fn dcid(&self) -> Vec<u8> {
        self.quic.destination_id().to_vec()
    }

    /// Connection IDs the relay issued (NEW_CONNECTION_ID) that this
    /// client has not used yet.
    pub fn spare_dcids(&self) -> usize {
        self.quic.available_dcids()
    }

    /// Retires the destination connection ID in use (RETIRE_CONNECTION_ID)
    /// and moves on to the next one the relay issued; returns it.
    pub fn switch_dcid(&mut self) -> Result<Vec<u8>> {
        if self.spare_dcids() == 0 {
            bail!("the relay issued no spare connection ID");
        }
        let old = self.dcid();
        self.quic.retire_dcid(self.dcid_seq).map_err(|e| anyhow!("retiring DCID {}: {e}", self.dcid_seq))?;
        self.dcid_seq += 1;
        let new = self.dcid();
        if new == old {
            bail!("retiring DCID {} did not change the DCID in use", self.dcid_seq - 1);
        }
        self.flush()?;
        Ok(new)
    }

    /// (send system calls, UDP packets sent) so far.
    pub fn send_stats(&self) -> (u64, u64) {
        (self.batcher.syscalls, self.batcher.datagrams)
    }

    /// quiche's statistics (packets, bytes, losses) and its active path's
    /// (RTT, congestion window), for reports.
    pub fn quic_stats(&self) -> (quiche::Stats, Option<quiche::PathStats>) {
        (self.quic.stats(), self.quic.path_stats().find(|p| p.active))
    }

    /// Closes the connection gracefully.
    pub fn close(mut self) {
        let _ = self.quic.close(true, 0x100, b"done");
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_server_names_are_checked_against_the_certificates_addresses() {
        let dir = std::env::temp_dir().join(format!("bench-client-san-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
        let creds = relay_control::state::self_signed(&dir, &names).unwrap();
        let pem = std::fs::read(&creds.cert).unwrap();
        let der = boring::x509::X509::from_pem(&pem).unwrap().to_der().unwrap();
        assert!(certificate_names_ip(&der, "127.0.0.1".parse().unwrap()));
        assert!(certificate_names_ip(&der, "::1".parse().unwrap()));
        assert!(!certificate_names_ip(&der, "127.0.0.2".parse().unwrap()));
        assert!(!certificate_names_ip(b"not a certificate", "127.0.0.1".parse().unwrap()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn handshake_failures_name_the_tls_alert() {
        let bad_cert = quiche::ConnectionError { is_app: false, error_code: 0x100 + 42, reason: Vec::new() };
        let text = describe_close(Some(&bad_cert), None, "relay.example");
        assert!(
            text.contains("TLS alert 42 bad_certificate") && text.contains("\"relay.example\""),
            "{text}"
        );
        let theirs = quiche::ConnectionError { is_app: false, error_code: 0x100 + 40, reason: Vec::new() };
        assert_eq!(describe_close(None, Some(&theirs), "x"), "the relay sent TLS alert 40 handshake_failure");
        let app = quiche::ConnectionError { is_app: true, error_code: 0x100, reason: Vec::new() };
        assert!(describe_close(None, Some(&app), "x").starts_with("local None, peer Some"));
    }

    #[test]
    fn refusals_read_as_status_reason_and_proxy_status() {
        assert_eq!(describe_refusal(403, None), "403 Forbidden");
        assert_eq!(
            describe_refusal(502, Some("relay; error=connection_refused")),
            "502 Bad Gateway (Proxy-Status: relay; error=connection_refused)"
        );
        assert_eq!(describe_refusal(599, None), "599");
        let a = Answer::Response(vec![(":status".into(), "429".into()), ("proxy-status".into(), "r".into())]);
        assert!(!a.is_success());
        assert_eq!(a.describe(), "429 Too Many Requests (Proxy-Status: r)");
        assert_eq!(Answer::Reset(0x10c).describe(), "stream reset with HTTP/3 error 0x10c");
    }
}

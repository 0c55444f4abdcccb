//! WebTransport over HTTP/3 (draft-ietf-webtrans-http3) relayed to an
//! upstream origin over HTTP/3.
//!
//! Control picked the origin (a `[[upstreams]]` route of protocol
//! `webtransport`) and answered `AllowUpstream` with its address, the
//! `:authority` and the path to ask for. The relay then is a WebTransport
//! client of the origin: a QUIC connection of its own (a connected UDP
//! socket served by the worker's backend like a connect-udp target's), TLS
//! verified against the route's CA file and server name, the origin's
//! SETTINGS checked for extended CONNECT, HTTP/3 datagrams and WebTransport
//! (section 3.1), and an extended CONNECT with `:protocol webtransport`
//! (section 3.2) carrying the client's `origin` and
//! `wt-available-protocols`. Only when the origin answers 2xx does the
//! client get its 200 (with the origin's `wt-protocol`); anything else is
//! 502 with Proxy-Status (RFC 9209), and no answer in [`SESSION_TIMEOUT`]
//! 504.
//!
//! From then on the session is mapped one to one:
//! * the session's own stream (the CONNECT stream) carries its capsules
//!   (CLOSE_WEBTRANSPORT_SESSION, DRAIN_WEBTRANSPORT_SESSION, ...) as
//!   bytes, both ways, like a classic CONNECT's body: a FIN on one side is
//!   a FIN on the other, a reset a reset;
//! * every stream either side opens in the session (a bidirectional stream
//!   with the signal value 0x41, a unidirectional one of type 0x54,
//!   sections 4.2 and 4.3) is opened on the other side in the other
//!   session, and its bytes are copied as the receiving side's flow control
//!   allows (nothing is read from a stream before the other side can take
//!   it: QUIC's flow control carries the backpressure end to end); a
//!   RESET_STREAM is relayed as a RESET_STREAM and a STOP_SENDING as a
//!   STOP_SENDING, with their codes unchanged (both sides use the same
//!   mapping of WebTransport codes into the HTTP/3 space, section 4.4);
//! * HTTP/3 datagrams of the session (section 4.5) are relayed with the
//!   other side's quarter stream ID.
//!
//! quiche's HTTP/3 layer claims the 0x41/0x54 streams for us with the
//! patch kept in `dataplane/vendor/quiche` (see docs/ARCHITECTURE.md,
//! "WebTransport over HTTP/3 relayed to upstream origins"): it reports each as
//! [`quiche::h3::Event::WebTransportStream`] and never reads it again.
//!
//! When the session ends (both CONNECT stream halves closed, a reset, or
//! the origin's connection gone), the streams still mapped are reset on
//! both sides with WT_SESSION_GONE (section 6) and the origin connection
//! is closed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quiche::h3::NameValue;
use relay_channel::region::Counter;
use relay_proto::capsule::{self, Boundaries, WT_DRAIN_SESSION};
use relay_proto::proxy_status::ProxyError;
use relay_proto::varint;
use tracing::debug;

use super::flow::Flow;
use super::head::{Head, Refusal};
use super::route::SessionFields;
use super::udp::UdpLeg;
use super::verdict::{hold, refuse_allowed};
use super::{Abort, End, State, TunnelId, Tunnels};
use crate::context::Ctx;
use crate::origin_tls::RouteTls;
use crate::timers::TimerTarget;

/// How long the origin may take to complete the QUIC handshake, send its
/// SETTINGS and answer the session request (504 after).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// SETTINGS_WT_ENABLED (draft-ietf-webtrans-http3-16 sections 3.1 and
/// 9.2, since -15): 1 announces WebTransport over HTTP/3 and its upgrade
/// token `webtransport-h3`; a client MUST treat a value above 1 as a
/// connection error of type H3_SETTINGS_ERROR.
pub const SETTINGS_WT_ENABLED: u64 = 0x2c7cf000;
/// SETTINGS_WT_MAX_SESSIONS (draft-ietf-webtrans-http3-14 section 9.2).
pub const SETTINGS_WT_MAX_SESSIONS: u64 = 0x14e9cd29;
/// SETTINGS_WEBTRANSPORT_MAX_SESSIONS of drafts -07 to -12, still sent by
/// deployed endpoints.
pub const SETTINGS_WT_MAX_SESSIONS_DRAFT07: u64 = 0xc671706a;
/// SETTINGS_ENABLE_WEBTRANSPORT of drafts -02 to -06 (aioquic speaks it).
pub const SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02: u64 = 0x2b603742;

/// The upgrade token of WebTransport over HTTP/3 since draft -15 (draft-16
/// section 3.2); `webtransport`, the older drafts' token (and -16's name
/// for the capsule-based variant), is what deployed browsers still send.
pub const TOKEN_H3: &str = "webtransport-h3";
/// The older drafts' upgrade token.
pub const TOKEN_LEGACY: &str = "webtransport";
/// H3_SETTINGS_ERROR (RFC 9114 section 8.1).
const H3_SETTINGS_ERROR: u64 = 0x109;

/// Whether `:protocol` names a WebTransport session (either token).
pub fn is_session_token(protocol: &str) -> bool {
    protocol == TOKEN_H3 || protocol == TOKEN_LEGACY
}

/// WT_SESSION_GONE (section 9.5): a stream of a session that is over.
pub const WT_SESSION_GONE: u64 = 0x170d7b68;
/// WT_BUFFERED_STREAM_REJECTED (section 9.5): a stream for a session that
/// does not exist (yet), or past what is buffered for one.
pub const WT_BUFFERED_STREAM_REJECTED: u64 = 0x3994bd84;

/// Streams a client may open in a session before the origin accepted it
/// (section 4.6: buffered, and rejected past the bound).
pub const MAX_EARLY_STREAMS: usize = 64;
/// Streams mapped at once per session (each side's QUIC stream limits
/// bound them too; this bounds the relay's table whatever they say).
pub const MAX_SESSION_STREAMS: usize = 1024;
/// Bytes copied per stream and direction per pass.
const COPY_CHUNK: usize = 64 * 1024;

/// The SETTINGS both sides of the relay send for WebTransport: the current
/// draft's, and the older drafts' that deployed stacks still look for
/// (aioquic only knows SETTINGS_ENABLE_WEBTRANSPORT and accepts 0 or 1).
///
/// WT_MAX_SESSIONS is 1 and no WT_INITIAL_* setting is sent, so
/// WebTransport's own flow control stays off (section 5.1: it is on only
/// when both sides declare it): the relay maps streams one to one and
/// QUIC's per-stream and per-connection flow control carries the
/// backpressure on each hop; the session-level limits and their capsules
/// (section 5.6.1 makes an intermediary consume and re-issue them) are
/// not implemented. A connection then carries one session at a time: the
/// HTTP/3 carrier resets a second one with H3_REQUEST_REJECTED.
pub fn settings() -> Vec<(u64, u64)> {
    vec![
        (SETTINGS_WT_ENABLED, 1),
        (SETTINGS_WT_MAX_SESSIONS, 1),
        (SETTINGS_WT_MAX_SESSIONS_DRAFT07, 1),
        (SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02, 1),
    ]
}

/// Whether a peer's SETTINGS say it serves WebTransport (any draft's
/// setting, non-zero).
pub fn peer_supports(raw: &[(u64, u64)]) -> bool {
    raw.iter().any(|&(id, v)| {
        v > 0
            && matches!(
                id,
                SETTINGS_WT_ENABLED
                    | SETTINGS_WT_MAX_SESSIONS
                    | SETTINGS_WT_MAX_SESSIONS_DRAFT07
                    | SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02
            )
    })
}

/// The upgrade token to ask a peer with these SETTINGS for a session:
/// `webtransport-h3` when it announced SETTINGS_WT_ENABLED = 1 (draft -15
/// and later), else the older drafts' `webtransport`. `Err(value)`: its
/// SETTINGS_WT_ENABLED is above 1, a connection error of type
/// H3_SETTINGS_ERROR for a client (draft-16 section 3.1).
pub fn token_for(raw: &[(u64, u64)]) -> Result<&'static str, u64> {
    // The last value of a setting counts (RFC 9114 section 7.2.4 forbids
    // repeats; quiche refuses them).
    match raw.iter().rev().find(|&&(id, _)| id == SETTINGS_WT_ENABLED).map(|&(_, v)| v) {
        Some(1) => Ok(TOKEN_H3),
        Some(v) if v > 1 => Err(v),
        _ => Ok(TOKEN_LEGACY),
    }
}

/// The client's HTTP/3 connection, as the relay of one of its sessions
/// uses it.
pub struct ClientSide<'a> {
    /// Its QUIC connection.
    pub quic: &'a mut crate::quic::Connection,
    /// Its HTTP/3 layer (with WebTransport streams claimed).
    pub h3: &'a mut quiche::h3::Connection,
    /// Whether the client takes HTTP/3 datagrams.
    pub datagrams: bool,
}

/// One direction of a relayed stream.
#[derive(Debug, Default)]
struct Dir {
    /// Bytes read from the source the destination has not taken yet.
    pending: Vec<u8>,
    /// The source's FIN was read (it follows `pending`).
    fin: bool,
    /// Nothing more moves this way (FIN delivered, or reset).
    done: bool,
}

impl Dir {
    fn closed() -> Self {
        Self { done: true, ..Self::default() }
    }
}

/// A stream relayed between the two sessions.
#[derive(Debug)]
struct Pair {
    /// Its ID on the client's connection.
    client: u64,
    /// Its ID on the origin's connection.
    origin: u64,
    /// The WebTransport header the relay wrote on the side it opened (the
    /// reliable size of its resets there, draft-16 section 4.4), 0 on the
    /// side the peer opened.
    client_header: u64,
    origin_header: u64,
    /// Client to origin.
    up: Dir,
    /// Origin to client.
    down: Dir,
}

/// What a copy pass did.
#[derive(Debug, Default, Clone, Copy)]
struct Moved {
    bytes: usize,
}

/// Where the upstream session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// QUIC handshake, then the origin's SETTINGS.
    Connecting,
    /// The session request went out on this stream.
    Requested(u64),
    /// The origin accepted the session on this stream.
    Open(u64),
}

/// A WebTransport tunnel's upstream side: the QUIC connection to the
/// origin and the session's streams.
pub struct SessionLeg {
    /// The origin socket (the backend's), and this turn's packets for it.
    socket: UdpLeg,
    /// The socket's local address (quiche's path is this and the origin's).
    local: SocketAddr,
    quic: crate::quic::Connection,
    h3: Option<quiche::h3::Connection>,
    h3_config: quiche::h3::Config,
    phase: Phase,
    /// The origin request's `:authority` and path.
    host: String,
    path: String,
    fields: SessionFields,
    /// Client bytes of the CONNECT stream (capsules) not taken by the
    /// origin's session stream yet; `up_fin`: the client's FIN follows.
    up: Vec<u8>,
    up_fin: bool,
    up_fin_sent: bool,
    /// The origin ended its side of the session stream.
    origin_fin: bool,
    /// Either side closed its half of the session stream (its FIN
    /// relayed): the session is terminated (section 6), its streams are
    /// reset and no new one is mapped.
    terminated: bool,
    /// Both halves of the session stream closed: the session is over and
    /// the relay closed the origin connection itself.
    over: bool,
    /// Where the origin's capsules on the session stream end (the relay's
    /// own capsule goes between two of them).
    down_capsules: Boundaries,
    /// The origin sent GOAWAY: it takes no new sessions.
    origin_goaway: bool,
    /// WT_DRAIN_SESSION went to the client.
    drain_sent: bool,
    /// Streams the client opened, waiting for their origin stream.
    from_client: VecDeque<u64>,
    /// Streams the origin opened, waiting for their client stream.
    from_origin: VecDeque<u64>,
    pairs: Vec<Pair>,
    /// Until when the session may take to open.
    deadline: Instant,
    /// The QUIC timer armed in the worker's heap.
    timer: Option<Instant>,
    /// Scratch for received packets, stream copies and datagrams.
    buf: Vec<u8>,
    /// A datagram being re-addressed to the other hop (reused).
    frame: Vec<u8>,
}

impl std::fmt::Debug for SessionLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLeg")
            .field("phase", &self.phase)
            .field("host", &self.host)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

fn is_bidi(stream: u64) -> bool {
    stream & 0x2 == 0
}

/// The WebTransport stream header the relay writes on a stream it opens in
/// `session`: the signal value 0x41 or the stream type 0x54 (two-byte
/// varints both) and the session ID.
fn header_len(session: u64) -> u64 {
    2 + varint::encoded_len(session) as u64
}

/// Whether `stream` was opened by this side of `quic`.
fn is_local(quic: &crate::quic::Connection, stream: u64) -> bool {
    (stream & 0x1 == 1) == quic.is_server()
}

/// Resets the sending side of `stream` with `code`: with RESET_STREAM_AT
/// keeping the first `header` bytes (the WebTransport header the relay
/// wrote, so the peer still learns the stream's session; draft-16 section
/// 4.4) when the peer announced reset_stream_at, else RESET_STREAM.
fn reset_send(quic: &mut crate::quic::Connection, stream: u64, code: u64, header: u64) {
    let _ = quic.stream_reset_at(stream, code, header);
}

impl SessionLeg {
    /// When the leg next needs its timer: the QUIC timer, and until the
    /// session opens its deadline.
    pub fn due(&self) -> Option<Instant> {
        let quic = self.quic.timeout_instant();
        match self.phase {
            Phase::Open(_) => quic,
            _ => Some(quic.map_or(self.deadline, |q| q.min(self.deadline))),
        }
    }

    /// Packets from the origin (a GRO batch of `segment_size` segments).
    pub fn recv(&mut self, payloads: &[u8], segment_size: usize, from: SocketAddr, local: SocketAddr) {
        let info = quiche::RecvInfo { from, to: local };
        for pkt in payloads.chunks(segment_size.max(1)) {
            // quiche decrypts in place: the packet goes through the leg's
            // scratch (a segment is at most a UDP payload, the scratch 64
            // KiB), no allocation per packet.
            let copy = &mut self.buf[..pkt.len()];
            copy.copy_from_slice(pkt);
            if let Err(e) = self.quic.recv(copy, info) {
                debug!("origin QUIC recv: {e}");
            }
        }
    }

    /// Writes what the origin connection has to send into this turn's
    /// batch for the origin socket.
    fn send(&mut self, ctx: &mut Ctx) {
        let mut packet = [0u8; 1500];
        loop {
            match self.quic.send(&mut packet) {
                Ok((n, _)) => {
                    self.socket.push(&packet[..n], ctx);
                }
                Err(quiche::Error::Done) => break,
                Err(e) => {
                    debug!("origin QUIC send: {e}");
                    break;
                }
            }
        }
        self.socket.flush(ctx);
    }

    /// Arms the worker's timer for the leg when its due time changed.
    fn arm(&mut self, ctx: &mut Ctx, id: TunnelId) {
        let due = self.due();
        if due != self.timer {
            self.timer = due;
            if let Some(at) = due {
                ctx.timers.push(at, TimerTarget::Tunnel(id));
            }
        }
    }

    /// Sends the session request once the origin's SETTINGS are in.
    /// Returns a refusal when the origin cannot serve WebTransport.
    fn request(&mut self) -> Result<(), Refusal> {
        let Some(h3) = self.h3.as_mut() else { return Ok(()) };
        let Some(raw) = h3.peer_settings_raw() else { return Ok(()) };
        let refuse = |why: &str| Refusal::new(502, Some(ProxyError::HttpProtocolError), why);
        if !h3.extended_connect_enabled_by_peer() {
            return Err(refuse(
                "the origin does not accept extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)",
            ));
        }
        if !peer_supports(raw) {
            return Err(refuse("the origin does not announce WebTransport in its SETTINGS"));
        }
        let token = match token_for(raw) {
            Ok(token) => token,
            Err(value) => {
                // Draft-16 section 3.1: a connection error for a client.
                let _ = self.quic.close(true, H3_SETTINGS_ERROR, b"SETTINGS_WT_ENABLED above 1");
                return Err(refuse(&format!(
                    "the origin's SETTINGS_WT_ENABLED is {value}, not 1 (H3_SETTINGS_ERROR, draft-ietf-webtrans-http3-16 section 3.1)"
                )));
            }
        };
        if !h3.dgram_enabled_by_peer(&self.quic) {
            return Err(refuse("the origin does not accept HTTP/3 datagrams (SETTINGS_H3_DATAGRAM)"));
        }
        let mut headers = vec![
            quiche::h3::Header::new(b":method", b"CONNECT"),
            quiche::h3::Header::new(b":protocol", token.as_bytes()),
            quiche::h3::Header::new(b":scheme", b"https"),
            quiche::h3::Header::new(b":authority", self.host.as_bytes()),
            quiche::h3::Header::new(b":path", self.path.as_bytes()),
        ];
        if let Some(o) = &self.fields.origin {
            headers.push(quiche::h3::Header::new(b"origin", o.as_bytes()));
        }
        if let Some(p) = &self.fields.protocols {
            headers.push(quiche::h3::Header::new(b"wt-available-protocols", p.as_bytes()));
        }
        match h3.send_request(&mut self.quic, &headers, false) {
            Ok(stream) => {
                self.phase = Phase::Requested(stream);
                Ok(())
            }
            Err(quiche::h3::Error::StreamBlocked) => Ok(()),
            Err(e) => Err(Refusal::new(
                502,
                Some(ProxyError::ProxyInternalError),
                format!("cannot send the session request to the origin: {e}"),
            )),
        }
    }

    /// Why the origin connection closed before the session opened, as
    /// RFC 9209 names it.
    fn closed_refusal(&self) -> Refusal {
        // TLS alerts travel as CRYPTO_ERROR 0x100 + alert (RFC 9001
        // section 4.8).
        let crypto = |e: &quiche::ConnectionError| {
            (!e.is_app && (0x100..0x200).contains(&e.error_code)).then(|| (e.error_code - 0x100) as u8)
        };
        if let Some(alert) = self.quic.local_error().and_then(crypto) {
            // Alerts we sent: the origin's certificate did not verify
            // (bad_certificate 42 .. certificate_unknown 46, unknown_ca 48).
            let error = if (42..=46).contains(&alert) || alert == 48 {
                ProxyError::TlsCertificateError
            } else {
                ProxyError::TlsProtocolError
            };
            return Refusal::new(502, Some(error), format!("TLS to the origin failed (alert {alert} sent)"));
        }
        if let Some(alert) = self.quic.peer_error().and_then(crypto) {
            return Refusal::new(
                502,
                Some(ProxyError::TlsAlertReceived),
                format!("the origin sent TLS alert {alert}"),
            );
        }
        if self.quic.is_timed_out() && !self.quic.is_established() {
            return Refusal::new(
                504,
                Some(ProxyError::ConnectionTimeout),
                "the origin did not complete the QUIC handshake in time",
            );
        }
        let details = match self.quic.peer_error() {
            Some(e) => format!("the origin closed the connection (code {:#x})", e.error_code),
            None => "the connection to the origin closed".to_string(),
        };
        Refusal::new(502, Some(ProxyError::DestinationUnavailable), details)
    }
}

/// Control allowed a WebTransport tunnel: the origin socket and QUIC
/// connection; the client's answer waits for the origin's.
#[allow(clippy::too_many_arguments)]
pub(super) fn open(
    ts: &mut Tunnels,
    ctx: &mut Ctx,
    id: TunnelId,
    flow: Flow,
    host: String,
    path: String,
    tls: Option<RouteTls>,
) {
    let fail = |ts: &mut Tunnels, ctx: &mut Ctx, why: Refusal| {
        ctx.count(Counter::WebtransportUpstreamFailures, 1);
        refuse_allowed(ts, ctx, id, flow.flow_id, why)
    };
    let Some(tls) = tls else {
        let why = Refusal::new(502, Some(ProxyError::ProxyInternalError), "the route has no TLS settings");
        return fail(ts, ctx, why);
    };
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        Refusal::new(502, Some(ProxyError::ProxyInternalError), format!("{what}: {e}"))
    };
    let mut config = match client_config(&tls) {
        Ok(c) => c,
        Err(e) => return fail(ts, ctx, internal("QUIC client configuration", &e)),
    };
    let h3_config = match h3_config(ctx) {
        Ok(c) => c,
        Err(e) => return fail(ts, ctx, internal("HTTP/3 client configuration", &e)),
    };
    let sock = match crate::socket::connected_target(flow.target) {
        Ok(s) => s,
        Err(e) => {
            debug!("origin socket: {e}");
            let why = Refusal::new(
                502,
                Some(ProxyError::DestinationUnavailable),
                "cannot open a socket to the origin",
            );
            return fail(ts, ctx, why);
        }
    };
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(e) => return fail(ts, ctx, internal("origin socket", &e)),
    };
    let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
    if boring::rand::rand_bytes(&mut scid).is_err() {
        let why =
            Refusal::new(502, Some(ProxyError::ProxyInternalError), "no randomness for a connection ID");
        return fail(ts, ctx, why);
    }
    let scid = quiche::ConnectionId::from_ref(&scid);
    let server_name =
        tls.server_name.parse::<std::net::IpAddr>().is_err().then_some(tls.server_name.as_str());
    let quic = match quiche::connect_with_buffer_factory(server_name, &scid, local, flow.target, &mut config)
    {
        Ok(c) => c,
        Err(e) => return fail(ts, ctx, internal("QUIC connect", &e)),
    };
    let endpoint = ctx.open_endpoint(sock, id, true);
    let Some(t) = ts.slab.get_mut(id) else { return };
    let fields = t.wt.take().map(|b| *b).unwrap_or_default();
    let mut leg = Box::new(SessionLeg {
        socket: UdpLeg::new(endpoint),
        local,
        quic,
        h3: None,
        h3_config,
        phase: Phase::Connecting,
        host,
        path,
        fields,
        up: std::mem::take(&mut t.early),
        up_fin: t.client_ended,
        up_fin_sent: false,
        origin_fin: false,
        terminated: false,
        over: false,
        down_capsules: Boundaries::new(),
        origin_goaway: false,
        drain_sent: false,
        from_client: t.early_streams.drain(..).collect(),
        from_origin: VecDeque::new(),
        pairs: Vec::new(),
        deadline: ctx.now + SESSION_TIMEOUT,
        timer: None,
        buf: vec![0; COPY_CHUNK],
        frame: Vec::with_capacity(1500),
    });
    leg.send(ctx);
    leg.arm(ctx, id);
    hold(ts, id, State::Session { leg, flow });
}

/// The QUIC client configuration towards an origin: TLS verified against
/// the route's CA file, ALPN h3, datagrams on.
fn client_config(tls: &RouteTls) -> Result<quiche::Config, ConfigError> {
    // The route's CAs only (read at attach: the dataplane opens no files
    // later). A DNS name is checked by quiche (the name given to `connect`:
    // SNI and X509_VERIFY_PARAM_set1_host); an IP literal gets no SNI (RFC
    // 6066 section 3) and is checked as an IP-ID (RFC 9110 section 4.3.5)
    // by the store's verify parameters.
    let mut store = boring::x509::store::X509StoreBuilder::new()?;
    for ca in tls.cas.iter() {
        store.add_cert(ca.clone())?;
    }
    if let Ok(ip) = tls.server_name.parse::<std::net::IpAddr>() {
        store.verify_param_mut().set_ip(ip)?;
    }
    let mut builder = boring::ssl::SslContextBuilder::new(boring::ssl::SslMethod::tls())?;
    builder.set_cert_store(store.build());
    let mut c = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, builder)?;
    c.verify_peer(true);
    c.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)?;
    c.set_max_idle_timeout(30_000);
    c.set_max_recv_udp_payload_size(1350);
    c.set_max_send_udp_payload_size(1350);
    c.set_initial_max_data(16 << 20);
    c.set_initial_max_stream_data_bidi_local(1 << 20);
    c.set_initial_max_stream_data_bidi_remote(1 << 20);
    c.set_initial_max_stream_data_uni(1 << 20);
    c.set_initial_max_streams_bidi(256);
    c.set_initial_max_streams_uni(256);
    c.set_disable_active_migration(true);
    c.enable_dgram(true, 1024, 1024);
    // The origin may reset its streams with RESET_STREAM_AT (their header
    // then reaches the relay; draft-ietf-webtrans-http3-16 section 4.4).
    c.enable_reset_stream_at(true);
    Ok(c)
}

/// Why the QUIC client configuration could not be built.
#[derive(Debug, thiserror::Error)]
enum ConfigError {
    /// BoringSSL refused the CA store or context.
    #[error("TLS context: {0}")]
    Tls(#[from] boring::error::ErrorStack),
    /// quiche refused a setting.
    #[error("QUIC: {0}")]
    Quic(#[from] quiche::Error),
}

/// The HTTP/3 configuration of the relay's connections to origins.
fn h3_config(ctx: &Ctx) -> Result<quiche::h3::Config, quiche::h3::Error> {
    let mut c = quiche::h3::Config::new()?;
    c.enable_extended_connect(true);
    c.enable_webtransport(true);
    c.set_max_field_section_size(16 * 1024);
    c.set_qpack_max_table_capacity(0);
    c.set_qpack_blocked_streams(0);
    let _ = ctx;
    c.set_additional_settings(settings())?;
    Ok(c)
}

/// Moves everything of WebTransport tunnel `id` that needs both
/// connections: the origin's HTTP/3 events, the session's answer, its
/// stream's bytes, the streams opened on either side, their bytes and
/// ends, and datagrams both ways. Called when the client's connection is
/// serviced (after its packets, the origin's, or a timer).
pub(super) fn pump(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, client: &mut ClientSide<'_>) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let client_session = t.place.stream;
    if matches!(t.state, State::Done) {
        // The session was refused or is over: streams the client opened in
        // it while it was being set up are rejected (section 6).
        for stream in t.early_streams.drain(..) {
            reject(client.quic, stream, WT_SESSION_GONE, 0);
        }
    }
    let State::Session { leg, .. } = &mut t.state else { return };
    // The HTTP/3 layer starts once the handshake is done.
    if leg.h3.is_none() && leg.quic.is_established() {
        match quiche::h3::Connection::with_transport(&mut leg.quic, &leg.h3_config) {
            Ok(h3) => leg.h3 = Some(h3),
            Err(e) => {
                let why = Refusal::new(
                    502,
                    Some(ProxyError::ProxyInternalError),
                    format!("HTTP/3 to the origin failed: {e}"),
                );
                return fail(ts, ctx, id, why);
            }
        }
    }
    let mut answer: Option<Result<Head, Refusal>> = None;
    let mut session_reset = false;
    if let Some(h3) = leg.h3.as_mut() {
        loop {
            match h3.poll(&mut leg.quic) {
                Ok((stream, quiche::h3::Event::Headers { list, .. })) => {
                    if leg.phase == Phase::Requested(stream) {
                        answer = Some(session_answer(&list));
                    }
                }
                Ok((stream, quiche::h3::Event::Finished)) => {
                    if matches!(leg.phase, Phase::Open(s) if s == stream) {
                        leg.origin_fin = true;
                    } else if leg.phase == Phase::Requested(stream) && answer.is_none() {
                        answer = Some(Err(Refusal::new(
                            502,
                            Some(ProxyError::HttpResponseIncomplete),
                            "the origin ended the session stream without an answer",
                        )));
                    }
                }
                Ok((stream, quiche::h3::Event::Reset(code))) => {
                    if matches!(leg.phase, Phase::Open(s) if s == stream) {
                        debug!(code, "the origin reset the session stream");
                        session_reset = true;
                    } else if leg.phase == Phase::Requested(stream) && answer.is_none() {
                        answer = Some(Err(Refusal::new(
                            502,
                            Some(ProxyError::HttpProtocolError),
                            format!("the origin reset the session request (code {code:#x})"),
                        )));
                    }
                }
                Ok((stream, quiche::h3::Event::WebTransportStream { session_id })) => {
                    let ours = matches!(leg.phase, Phase::Open(s) | Phase::Requested(s) if s == session_id);
                    if ours && leg.from_origin.len() + leg.pairs.len() < MAX_SESSION_STREAMS {
                        leg.from_origin.push_back(stream);
                    } else {
                        reject(&mut leg.quic, stream, WT_BUFFERED_STREAM_REJECTED, 0);
                    }
                }
                Ok((_, quiche::h3::Event::Data)) => {}
                Ok((_, quiche::h3::Event::GoAway)) => leg.origin_goaway = true,
                Ok((_, quiche::h3::Event::PriorityUpdate)) => {}
                Err(quiche::h3::Error::Done) => break,
                Err(e) => {
                    debug!("origin HTTP/3: {e}");
                    break;
                }
            }
        }
    }
    if leg.phase == Phase::Connecting
        && let Err(why) = leg.request()
    {
        return fail(ts, ctx, id, why);
    }
    match answer {
        Some(Ok(head)) => {
            let Phase::Requested(stream) = leg.phase else { return };
            leg.phase = Phase::Open(stream);
            ctx.count(Counter::WebtransportSessionsOpened, 1);
            t.head = Some(head);
            ts.opened(ctx, id);
        }
        Some(Err(why)) => return fail(ts, ctx, id, why),
        None => {}
    }
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Session { leg, flow } = &mut t.state else { return };
    if leg.quic.is_closed() && !leg.over {
        if !matches!(leg.phase, Phase::Open(_)) {
            let why = leg.closed_refusal();
            return fail(ts, ctx, id, why);
        }
        debug!(flow = flow.flow_id, "the origin's connection closed: ending the session");
        end_streams(leg, client);
        ts.abort(ctx, id, Abort::Connect);
        return;
    }
    if session_reset {
        end_streams(leg, client);
        leg.send(ctx);
        ts.abort(ctx, id, Abort::Cancelled);
        return;
    }
    let Phase::Open(origin_session) = leg.phase else {
        leg.send(ctx);
        leg.arm(ctx, id);
        return;
    };
    let now = ctx.now;
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    // The session stream: capsules both ways.
    if let Some(h3) = leg.h3.as_mut() {
        while !leg.up.is_empty() {
            match h3.send_body(&mut leg.quic, origin_session, &leg.up, false) {
                Ok(n) if n > 0 => {
                    leg.up.drain(..n);
                    up_bytes += n as u64;
                }
                _ => break,
            }
        }
        if leg.up.is_empty()
            && leg.up_fin
            && !leg.up_fin_sent
            && h3.send_body(&mut leg.quic, origin_session, &[], true).is_ok()
        {
            leg.up_fin_sent = true;
        }
        let limit = t.limits.stream_out_limit;
        while t.bytes_out.len() < limit {
            let room = (limit - t.bytes_out.len()).min(leg.buf.len());
            match h3.recv_body(&mut leg.quic, origin_session, &mut leg.buf[..room]) {
                Ok(n) if n > 0 => {
                    t.bytes_out.extend_from_slice(&leg.buf[..n]);
                    leg.down_capsules.feed(&leg.buf[..n]);
                    down_bytes += n as u64;
                }
                _ => break,
            }
        }
        if leg.quic.stream_finished(origin_session) && !leg.quic.stream_readable(origin_session) {
            leg.origin_fin = true;
        }
        // Section 4.7: the relay draining (its GOAWAY to the client) or the
        // origin's GOAWAY becomes WT_DRAIN_SESSION on the session, between
        // two of the origin's capsules.
        if (ctx.draining || leg.origin_goaway)
            && !leg.drain_sent
            && !leg.origin_fin
            && leg.down_capsules.at_boundary()
        {
            capsule::encode(WT_DRAIN_SESSION, &[], &mut t.bytes_out);
            leg.drain_sent = true;
        }
    }
    // Section 6: the session is terminated as soon as either side closes
    // the CONNECT stream (a FIN, which follows any WT_CLOSE_SESSION); the
    // session stream's own bytes and FIN still go through.
    leg.terminated |= leg.up_fin_sent || leg.origin_fin;
    // Streams opened on one side, opened on the other (not once the
    // session is terminated: they are reset below).
    let opened = if leg.terminated { 0 } else { open_streams(leg, client, client_session, origin_session) };
    if opened > 0 {
        ctx.count(Counter::WebtransportStreams, opened);
    }
    // Their bytes.
    let moved = copy_streams(leg, client);
    up_bytes += moved.0.bytes as u64;
    down_bytes += moved.1.bytes as u64;
    // Datagrams from the origin.
    let mut datagrams = 0;
    let frame = &mut leg.frame;
    while let Ok(n) = leg.quic.dgram_recv(&mut leg.buf) {
        let Ok((stream, payload)) = relay_proto::datagram::split(&leg.buf[..n]) else {
            ctx.count(Counter::DropMalformed, 1);
            continue;
        };
        if stream != origin_session || !client.datagrams {
            ctx.count(Counter::DropNoTunnel, 1);
            continue;
        }
        frame.clear();
        varint::push(client_session / 4, frame);
        frame.extend_from_slice(payload);
        match client.quic.dgram_send(frame) {
            Ok(()) => {
                datagrams += 1;
                down_bytes += payload.len() as u64;
            }
            Err(_) => ctx.count(Counter::DropQueueFull, 1),
        }
    }
    if datagrams > 0 {
        ctx.count(Counter::WebtransportDatagrams, datagrams);
    }
    if up_bytes + down_bytes > 0 {
        flow.stream_bytes(up_bytes, down_bytes, now);
    }
    // Upon learning that the session is terminated an endpoint resets
    // every stream of it both ways with WT_SESSION_GONE (section 6); the
    // relay does so on both hops, whichever side ended it and whatever the
    // other side then does, and refuses later streams the same way.
    if leg.terminated && !(leg.pairs.is_empty() && leg.from_client.is_empty() && leg.from_origin.is_empty()) {
        end_streams(leg, client);
    }
    // The origin ended the session stream: FIN to the client after the
    // bytes before it.
    if leg.origin_fin && matches!(t.end, End::Open) {
        t.end = End::Finish { stop_reading: false };
    }
    // Both halves of the session stream are closed: the session is over
    // (section 6), its remaining streams go with it.
    let over = leg.up_fin_sent && leg.origin_fin && t.bytes_out.is_empty();
    if over && !leg.over {
        // The origin connection closing after this is the session's end
        // going as planned, not a failure to report.
        leg.over = true;
        end_streams(leg, client);
        let _ = leg.quic.close(true, 0x100, b"session over");
    }
    leg.send(ctx);
    leg.arm(ctx, id);
    let over_budget = flow.over_budget();
    if over_budget {
        ts.end_over_budget(ctx, id);
    }
}

/// The origin's answer to the session request: 2xx opens it (the client
/// gets 200 with the protocol the origin chose), anything else is 502
/// naming the status (RFC 9209 `http_upgrade_failed` with
/// `received-status`, as for WebSocket).
fn session_answer(list: &[quiche::h3::Header]) -> Result<Head, Refusal> {
    let status = list
        .iter()
        .find(|h| h.name() == b":status")
        .and_then(|h| std::str::from_utf8(h.value()).ok())
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Err(Refusal::new(
            502,
            Some(ProxyError::HttpProtocolError),
            "the origin's answer has no :status",
        ));
    };
    if !(200..300).contains(&status) {
        let mut r = Refusal::new(
            502,
            Some(ProxyError::HttpUpgradeFailed),
            format!("the origin refused the session with {status}"),
        );
        r.received_status = Some(status);
        return Err(r);
    }
    let protocol = list
        .iter()
        .find(|h| h.name() == b"wt-protocol")
        .and_then(|h| std::str::from_utf8(h.value()).ok())
        .map(str::to_string);
    Ok(Head::webtransport_open(protocol))
}

/// Resets `stream` with `code`, each way it has: reading stopped
/// (STOP_SENDING) unless the relay opened it unidirectionally, sending
/// reset unless the peer did (keeping the relay's `header`, see
/// [`reset_send`]).
fn reject(quic: &mut crate::quic::Connection, stream: u64, code: u64, header: u64) {
    let local = is_local(quic, stream);
    if is_bidi(stream) || !local {
        let _ = quic.stream_shutdown(stream, quiche::Shutdown::Read, code);
    }
    if is_bidi(stream) || local {
        reset_send(quic, stream, code, header);
    }
}

/// Opens, on the other side, the streams waiting for a peer. Returns how
/// many pairs were made.
fn open_streams(
    leg: &mut SessionLeg,
    client: &mut ClientSide<'_>,
    client_session: u64,
    origin_session: u64,
) -> u64 {
    let mut opened = 0;
    let Some(h3) = leg.h3.as_mut() else { return 0 };
    while let Some(&stream) = leg.from_client.front() {
        let bidi = is_bidi(stream);
        match h3.open_webtransport_stream(&mut leg.quic, origin_session, bidi) {
            Ok(origin) => {
                leg.from_client.pop_front();
                let down = if bidi { Dir::default() } else { Dir::closed() };
                leg.pairs.push(Pair {
                    client: stream,
                    origin,
                    client_header: 0,
                    origin_header: header_len(origin_session),
                    up: Dir::default(),
                    down,
                });
                opened += 1;
            }
            // The origin's stream limit (or its flow control): the
            // client's stream waits unread.
            Err(_) => break,
        }
    }
    while let Some(&stream) = leg.from_origin.front() {
        let bidi = is_bidi(stream);
        match client.h3.open_webtransport_stream(client.quic, client_session, bidi) {
            Ok(client_stream) => {
                leg.from_origin.pop_front();
                let up = if bidi { Dir::default() } else { Dir::closed() };
                leg.pairs.push(Pair {
                    client: client_stream,
                    origin: stream,
                    client_header: header_len(client_session),
                    origin_header: 0,
                    up,
                    down: Dir::default(),
                });
                opened += 1;
            }
            Err(_) => break,
        }
    }
    opened
}

/// Copies every mapped stream's bytes both ways as far as the receiving
/// side takes them; pairs done both ways are forgotten.
fn copy_streams(leg: &mut SessionLeg, client: &mut ClientSide<'_>) -> (Moved, Moved) {
    let mut up = Moved::default();
    let mut down = Moved::default();
    let SessionLeg { quic, pairs, buf, .. } = leg;
    pairs.retain_mut(|p| {
        up.bytes += copy(client.quic, p.client, quic, p.origin, p.origin_header, &mut p.up, buf).bytes;
        down.bytes += copy(quic, p.origin, client.quic, p.client, p.client_header, &mut p.down, buf).bytes;
        !(p.up.done && p.down.done)
    });
    (up, down)
}

/// Moves one direction of a stream: from `src`'s stream `s` to `dst`'s
/// stream `d`, never reading more than `d` can take now. A reset of `s`
/// resets `d` with the same code; a STOP_SENDING on `d` stops `s` with
/// the same code.
fn copy(
    src: &mut crate::quic::Connection,
    s: u64,
    dst: &mut crate::quic::Connection,
    d: u64,
    d_header: u64,
    dir: &mut Dir,
    buf: &mut [u8],
) -> Moved {
    let mut moved = Moved::default();
    while !dir.done {
        if !dir.pending.is_empty() || dir.fin {
            match dst.stream_send(d, &dir.pending, dir.fin) {
                Ok(n) => {
                    dir.pending.drain(..n);
                    if dir.pending.is_empty() && dir.fin {
                        dir.done = true;
                        break;
                    }
                    if !dir.pending.is_empty() {
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(quiche::Error::StreamStopped(code)) => {
                    let _ = src.stream_shutdown(s, quiche::Shutdown::Read, code);
                    dir.done = true;
                    break;
                }
                Err(_) => {
                    let _ = src.stream_shutdown(s, quiche::Shutdown::Read, WT_SESSION_GONE);
                    dir.done = true;
                    break;
                }
            }
        }
        let room = match dst.stream_capacity(d) {
            Ok(c) => c.min(buf.len()),
            Err(quiche::Error::StreamStopped(code)) => {
                let _ = src.stream_shutdown(s, quiche::Shutdown::Read, code);
                dir.done = true;
                break;
            }
            Err(_) => 0,
        };
        if room == 0 {
            break;
        }
        match src.stream_recv(s, &mut buf[..room]) {
            Ok((n, fin)) => {
                moved.bytes += n;
                dir.fin = fin;
                dir.pending.extend_from_slice(&buf[..n]);
                if n == 0 && !fin {
                    break;
                }
            }
            Err(quiche::Error::Done) => break,
            Err(quiche::Error::StreamReset(code)) => {
                reset_send(dst, d, code, d_header);
                dir.done = true;
            }
            Err(_) => {
                reset_send(dst, d, WT_SESSION_GONE, d_header);
                dir.done = true;
            }
        }
    }
    moved
}

/// The session is over: every stream still mapped or waiting is reset on
/// both sides with WT_SESSION_GONE (section 6).
fn end_streams(leg: &mut SessionLeg, client: &mut ClientSide<'_>) {
    for p in leg.pairs.drain(..) {
        reject(client.quic, p.client, WT_SESSION_GONE, p.client_header);
        reject(&mut leg.quic, p.origin, WT_SESSION_GONE, p.origin_header);
    }
    for s in leg.from_client.drain(..) {
        reject(client.quic, s, WT_SESSION_GONE, 0);
    }
    for s in leg.from_origin.drain(..) {
        reject(&mut leg.quic, s, WT_SESSION_GONE, 0);
    }
}

/// The session did not open: the flow goes back unused and the client
/// gets `why`.
fn fail(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, why: Refusal) {
    debug!(flow = ?ts.flow_id(id), status = why.status, details = %why.details, "WebTransport upstream failed");
    ctx.count(Counter::WebtransportUpstreamFailures, 1);
    if let Some(t) = ts.slab.get_mut(id)
        && let State::Session { leg, .. } = &mut t.state
    {
        let _ = leg.quic.close(true, 0x10c, b"");
        leg.send(ctx);
        // The client's streams waiting for the session are rejected at its
        // next service ([`pump`]).
        t.early_streams.extend(leg.from_client.drain(..));
    }
    ts.release(ctx, id);
    ts.refuse(ctx, id, &why);
}

/// The session's timer: the origin connection's QUIC timer, or the
/// session's opening deadline (504).
pub(super) fn on_timer(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Session { leg, .. } = &mut t.state else { return };
    leg.timer = None;
    if leg.quic.timeout_instant().is_some_and(|at| at <= ctx.now) {
        leg.quic.on_timeout();
    }
    if !matches!(leg.phase, Phase::Open(_)) && leg.deadline <= ctx.now {
        let why = if leg.quic.is_established() {
            Refusal::new(
                504,
                Some(ProxyError::HttpResponseTimeout),
                "the origin did not answer the session in time",
            )
        } else {
            Refusal::new(
                504,
                Some(ProxyError::ConnectionTimeout),
                "the origin did not complete the QUIC handshake in time",
            )
        };
        return fail(ts, ctx, id, why);
    }
    leg.send(ctx);
    leg.arm(ctx, id);
}

/// The OS says the origin is unreachable (an ICMP error on its socket):
/// a session not open yet is refused now (502 `connection_refused`)
/// rather than at its deadline; an open one is left to QUIC (a path can
/// recover).
pub(super) fn unreachable(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId) {
    let opening = ts.slab.get(id).is_some_and(
        |t| matches!(&t.state, State::Session { leg, .. } if !matches!(leg.phase, Phase::Open(_))),
    );
    if opening {
        let why = Refusal::new(502, Some(ProxyError::ConnectionRefused), "the origin is unreachable");
        fail(ts, ctx, id, why);
    }
}

/// Packets from the origin's socket.
pub(super) fn on_packets(
    ts: &mut Tunnels,
    id: TunnelId,
    from: Option<SocketAddr>,
    payloads: &[u8],
    segment_size: usize,
) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Session { leg, flow } = &mut t.state else { return };
    let local = leg.local;
    leg.recv(payloads, segment_size, from.unwrap_or(flow.target), local);
}

/// A client datagram of the session (its HTTP Datagram Payload): to the
/// origin's session, when it is open.
pub(super) fn on_datagram(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, payload: &[u8]) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let State::Session { leg, flow } = &mut t.state else { return ctx.count(Counter::DropNoTunnel, 1) };
    let Phase::Open(origin_session) = leg.phase else { return ctx.count(Counter::DropNoTunnel, 1) };
    leg.frame.clear();
    varint::push(origin_session / 4, &mut leg.frame);
    leg.frame.extend_from_slice(payload);
    match leg.quic.dgram_send(&leg.frame) {
        Ok(()) => {
            flow.stream_bytes(payload.len() as u64, 0, ctx.now);
            ctx.count(Counter::WebtransportDatagrams, 1);
        }
        Err(_) => ctx.count(Counter::DropQueueFull, 1),
    }
}

/// A stream the client opened in session tunnel `id`. Returns false when
/// the tunnel takes no more (the caller rejects the stream).
pub(super) fn on_client_stream(ts: &mut Tunnels, id: TunnelId, stream: u64) -> bool {
    let Some(t) = ts.slab.get_mut(id) else { return false };
    match &mut t.state {
        State::Session { leg, .. } if leg.from_client.len() + leg.pairs.len() < MAX_SESSION_STREAMS => {
            leg.from_client.push_back(stream);
            true
        }
        State::Asking { .. } if t.early_streams.len() < MAX_EARLY_STREAMS => {
            t.early_streams.push(stream);
            true
        }
        // Refused or over: rejected at the next service with the others.
        State::Done if t.early_streams.len() < MAX_EARLY_STREAMS => {
            t.early_streams.push(stream);
            true
        }
        _ => false,
    }
}

/// The client ended its side of the session stream: FIN to the origin's
/// after the bytes before it.
pub(super) fn on_client_end(leg: &mut SessionLeg) {
    leg.up_fin = true;
}

/// Whether the client's FIN went to the origin's session stream.
pub(super) fn up_done(leg: &SessionLeg) -> bool {
    leg.up_fin_sent
}

/// Client bytes of the session stream the leg takes now.
pub(super) fn up_room(leg: &SessionLeg, limit: usize) -> usize {
    limit.saturating_sub(leg.up.len())
}

/// Takes client bytes of the session stream.
pub(super) fn push_up(leg: &mut SessionLeg, bytes: &[u8]) {
    leg.up.extend_from_slice(bytes);
}

/// Releases the leg: the origin connection closes (CONNECTION_CLOSE with
/// H3_NO_ERROR when it was open) and the socket after it.
pub(super) fn release(mut leg: Box<SessionLeg>, ctx: &mut Ctx) {
    if !leg.quic.is_closed() {
        let _ = leg.quic.close(true, 0x100, b"");
        let mut packet = [0u8; 1500];
        while let Ok((n, _)) = leg.quic.send(&mut packet) {
            leg.socket.push(&packet[..n], ctx);
        }
    }
    leg.socket.release(ctx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_announce_every_draft_and_are_recognised() {
        let s = settings();
        assert!(s.contains(&(SETTINGS_WT_MAX_SESSIONS, 1)));
        assert!(s.contains(&(SETTINGS_WT_ENABLED, 1)), "draft -15 and later look for it");
        assert!(peer_supports(&s));
        assert!(peer_supports(&[(SETTINGS_WT_ENABLED, 1)]));
        assert!(!peer_supports(&[(SETTINGS_WT_ENABLED, 0)]));
        assert!(peer_supports(&[(SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02, 1)]));
        assert!(!peer_supports(&[(SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02, 0)]));
        assert!(!peer_supports(&[(0x33, 1), (0x8, 1)]));
    }

    #[test]
    fn the_relays_stream_header_is_what_its_resets_keep() {
        // 0x41 or 0x54 (two bytes each) and the session ID.
        assert_eq!(header_len(0), 3);
        assert_eq!(header_len(60), 3);
        assert_eq!(header_len(64), 4);
        assert_eq!(header_len(1 << 20), 6);
    }

    #[test]
    fn the_token_follows_the_origins_draft() {
        // Draft -15 and later: SETTINGS_WT_ENABLED = 1 and `webtransport-h3`.
        assert_eq!(token_for(&[(SETTINGS_WT_ENABLED, 1)]), Ok(TOKEN_H3));
        assert_eq!(token_for(&settings()), Ok(TOKEN_H3));
        // Older drafts only: `webtransport`.
        assert_eq!(token_for(&[(SETTINGS_WT_MAX_SESSIONS, 4)]), Ok(TOKEN_LEGACY));
        assert_eq!(token_for(&[(SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02, 1)]), Ok(TOKEN_LEGACY));
        assert_eq!(token_for(&[(SETTINGS_WT_ENABLED, 0), (SETTINGS_WT_MAX_SESSIONS, 1)]), Ok(TOKEN_LEGACY));
        // Above 1: H3_SETTINGS_ERROR (draft-16 section 3.1).
        assert_eq!(token_for(&[(SETTINGS_WT_ENABLED, 2)]), Err(2));
        assert!(is_session_token("webtransport") && is_session_token("webtransport-h3"));
        assert!(!is_session_token("webtransport-h2") && !is_session_token("WebTransport"));
    }

    #[test]
    fn answers_map_to_the_client() {
        let h = |s: &str| quiche::h3::Header::new(b":status", s.as_bytes());
        let ok = session_answer(&[h("200"), quiche::h3::Header::new(b"wt-protocol", b"\"chat\"")]).unwrap();
        assert_eq!(ok.status, 200);
        assert_eq!(ok.field("wt-protocol"), Some("\"chat\""));
        let refused = session_answer(&[h("403")]).unwrap_err();
        assert_eq!((refused.status, refused.received_status), (502, Some(403)));
        assert_eq!(refused.proxy_error, Some(ProxyError::HttpUpgradeFailed));
        let broken = session_answer(&[]).unwrap_err();
        assert_eq!(broken.proxy_error, Some(ProxyError::HttpProtocolError));
    }
}

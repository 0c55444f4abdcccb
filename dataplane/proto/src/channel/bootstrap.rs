//! The attach handshake's messages, and the frame codec they travel in
//! (the socket I/O is `relay_channel::attach`'s).
//!
//! 1. The dataplane connects and sends a [`Hello`].
//! 2. Control answers with a [`Bootstrap`] carrying the dataplane's settings,
//!    with the region memfd and, per worker, the asks doorbell and the
//!    answers doorbell attached (SCM_RIGHTS), in that order.
//!
//! Frames are `u32 length (LE)` then JSON, at most [`MAX_FRAME`] bytes. The
//! socket then stays open: either side sees the other's exit as end of
//! stream, and control sends [`ControlUpdate`] frames on it when the TLS
//! material changes (certificate reload, session ticket key rotation).
//!
//! Values with a fixed set of choices are enums ([`Protocol`],
//! [`IoBackend`], [`InboundFilter`]): a value this build does not know is a
//! decode error naming it, not a setting silently ignored.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Protocol version of the attach handshake and of everything after it
/// (bootstrap frames and channel records): 7 since upstream routes say
/// which HTTP their origin is spoken ([`OriginHttp`]); 6 since asks and flows can be
/// WebTransport sessions (record format [`super::record::VERSION`] 5); 5
/// listed the upstream routes with their TLS settings (`wss://` origins);
/// 4 brought asks for WebSocket routes and answers naming upstreams
/// (record format [`super::record::VERSION`] 4). Processes of different
/// builds refuse the attach instead of each other's frames and records.
pub const PROTOCOL_VERSION: u32 = 8;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Sent by the dataplane when it attaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the dataplane.
    pub version: u32,
    /// The dataplane's process ID (for logs and status).
    pub pid: u32,
    /// Built with qlog (`relayctl qlog`); a dataplane that predates the
    /// field has none.
    #[serde(default)]
    pub qlog: bool,
}

/// Settings control gives the dataplane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// [`PROTOCOL_VERSION`] of control.
    pub version: u32,
    /// Number of workers (and of ring pairs in the region).
    pub workers: u32,
    /// UDP address the QUIC listener binds.
    pub listen: SocketAddr,
    /// The TLS material in force when the dataplane attaches.
    pub tls: TlsMaterial,
    /// The connect-udp URI template.
    pub uri_template: String,
    /// Name used in Proxy-Status fields.
    pub proxy_name: String,
    /// Realm of Proxy-Authenticate challenges.
    pub auth_realm: String,
    /// How long a CONNECT may wait for control's answer.
    pub ask_timeout_ms: u32,
    /// QUIC idle timeout.
    pub quic_idle_timeout_ms: u64,
    /// Most QUIC connections per worker.
    pub max_connections_per_worker: u32,
    /// Most concurrent tunnels (and pending requests) per connection.
    pub max_tunnels_per_connection: u32,
    /// Datagrams buffered per tunnel while waiting for the client's SETTINGS
    /// or for control's answer.
    pub pending_datagrams_per_tunnel: u32,
    /// Largest capsule value accepted on a tunnel stream.
    pub max_capsule_len: u32,
    /// How long a graceful drain (SIGTERM) lets open tunnels finish.
    pub drain_timeout_ms: u64,
    /// The workers' I/O backend.
    #[serde(default)]
    pub io_backend: IoBackend,
    /// Pin worker i to the i-th CPU of the process's affinity mask.
    #[serde(default)]
    pub pin_workers: bool,
    /// Batched waits of io_uring workers: how long (microseconds) a worker
    /// that has just finished a turn may collect completions before the
    /// next one; 0: off (every completion wakes it).
    #[serde(default)]
    pub wait_batch_us: u32,
    /// QUIC-LB config rotation codepoint of server connection IDs.
    #[serde(default)]
    pub cid_config_id: u8,
    /// This host's server ID prefix in connection IDs.
    #[serde(default)]
    pub cid_server_id: Vec<u8>,
    /// Nonce bytes in connection IDs.
    #[serde(default = "fourteen")]
    pub cid_nonce_len: usize,
    /// Attach the reuseport program that steers packets by connection ID
    /// (plaintext layouts only: an encrypted worker byte cannot be read in
    /// the kernel).
    #[serde(default)]
    pub cid_steering: bool,
    /// The QUIC-LB key the connection IDs are encrypted with (shared with
    /// the load balancers; needs a non-empty `cid_server_id`); None:
    /// plaintext.
    #[serde(default)]
    pub cid_key: Option<[u8; 16]>,
    /// Extended CONNECT protocols the relay serves (`:protocol` values);
    /// others get 501. Classic CONNECT (TCP) has no `:protocol` and is not
    /// listed: control answers a disabled one.
    #[serde(default = "connect_udp_only")]
    pub protocols: Vec<Protocol>,
    /// Handshakes in progress per worker past which clients must prove
    /// their address with a Retry round trip (0: always).
    #[serde(default = "retry_threshold")]
    pub retry_threshold: u32,
    /// connect-ip, when served.
    #[serde(default)]
    pub connect_ip: Option<ConnectIpBootstrap>,
    /// Bound connect-udp, when served.
    #[serde(default)]
    pub bind: Option<BindBootstrap>,
    /// The TCP front (HTTP/2 and HTTP/1.1 over TCP), when at least one of
    /// its listeners is on.
    #[serde(default)]
    pub tcp: Option<TcpBootstrap>,
    /// Keys for stateless QUIC functions every worker (and, in a fleet,
    /// every host) must agree on; None: each dataplane makes its own at
    /// start.
    #[serde(default)]
    pub quic_keys: Option<QuicKeys>,
    /// Every `[[upstreams]]` route by name, with its TLS settings when its
    /// origin is `wss://` (at most [`MAX_UPSTREAM_ROUTES`]; checked by
    /// [`validate_upstreams`]). An `AllowUpstream` naming a route not
    /// listed is refused (502).
    #[serde(default)]
    pub upstreams: Vec<UpstreamBootstrap>,
}

/// Most upstream routes in a [`Bootstrap`] (control's own bound on
/// `[[upstreams]]`).
pub const MAX_UPSTREAM_ROUTES: usize = 256;
/// Most distinct CA files among the upstream routes (one TLS client
/// context each).
pub const MAX_UPSTREAM_CA_FILES: usize = 32;
/// Longest CA file path.
pub const MAX_CA_FILE_PATH: usize = 1024;

/// One upstream route as the dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamBootstrap {
    /// The route's name (as `AllowUpstream` names it).
    pub route: String,
    /// TLS to the origin (`wss://`, and `https://`: WebTransport over
    /// HTTP/3, where QUIC always runs TLS); None: cleartext (`ws://`).
    pub tls: Option<UpstreamTls>,
    /// How a WebSocket route's origin is spoken to.
    #[serde(default)]
    pub origin_http: OriginHttp,
}

/// Which HTTP a WebSocket route's origin is reached with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum OriginHttp {
    /// HTTP/1.1 Upgrade (RFC 6455 section 4.1); ALPN offers `http/1.1`.
    #[default]
    #[serde(rename = "http/1.1")]
    Http1,
    /// HTTP/2 extended CONNECT (RFC 8441): a `wss://` origin is offered
    /// only `h2` by ALPN, a `ws://` one is spoken h2 with prior knowledge
    /// (RFC 9113 section 3.3). The origin must enable extended CONNECT.
    #[serde(rename = "h2")]
    H2,
    /// `wss://` only: ALPN offers `h2` and `http/1.1`; HTTP/2 extended
    /// CONNECT when the origin selects h2 and its SETTINGS enable it, HTTP/1.1
    /// Upgrade otherwise (on a second connection offering only
    /// `http/1.1` when the origin selected h2 without it).
    #[serde(rename = "auto")]
    Auto,
}

impl OriginHttp {
    /// The name in config files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginHttp::Http1 => "http/1.1",
            OriginHttp::H2 => "h2",
            OriginHttp::Auto => "auto",
        }
    }
}

/// How the relay connects to a `wss://` or `https://` origin. The CA bundle travels as a
/// path, not as PEM (a system bundle is larger than a bootstrap frame):
/// the dataplane reads it at attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent as SNI and verified in the origin's certificate: a
    /// DNS name or an IP literal (no brackets; no SNI is sent for those).
    pub server_name: String,
    /// Absolute path of the PEM file of the CAs the origin's certificate
    /// must chain to.
    pub ca_file: String,
}

/// Checks the upstream routes a peer could get wrong: the count, names
/// (valid and unique), server names (a DNS name or an IP literal) and CA
/// file paths (absolute, bounded, at most [`MAX_UPSTREAM_CA_FILES`]
/// distinct).
pub fn validate_upstreams(routes: &[UpstreamBootstrap]) -> Result<(), BootstrapError> {
    use super::record::valid_route_name;
    if routes.len() > MAX_UPSTREAM_ROUTES {
        return Err(BootstrapError::Invalid(format!("{} upstream routes", routes.len())));
    }
    let mut names = std::collections::HashSet::new();
    let mut ca_files = std::collections::HashSet::new();
    for r in routes {
        if !valid_route_name(&r.route) {
            return Err(BootstrapError::Invalid(format!("upstream route name {:?}", r.route)));
        }
        if !names.insert(r.route.as_str()) {
            return Err(BootstrapError::Invalid(format!("upstream route {:?} listed twice", r.route)));
        }
        let Some(tls) = &r.tls else {
            if r.origin_http == OriginHttp::Auto {
                return Err(BootstrapError::Invalid(format!(
                    "upstream route {:?}: origin_http auto needs TLS (ALPN)",
                    r.route
                )));
            }
            continue;
        };
        let name_ok = match crate::target::TargetHost::parse(&tls.server_name) {
            Ok(crate::target::TargetHost::Name(n)) => n == tls.server_name,
            Ok(crate::target::TargetHost::Ip(_)) => tls.server_name.parse::<std::net::IpAddr>().is_ok(),
            Err(_) => false,
        };
        if !name_ok {
            return Err(BootstrapError::Invalid(format!(
                "upstream route {:?}: server name {:?}",
                r.route, tls.server_name
            )));
        }
        if !tls.ca_file.starts_with('/') || tls.ca_file.len() > MAX_CA_FILE_PATH || tls.ca_file.contains('\0')
        {
            return Err(BootstrapError::Invalid(format!("upstream route {:?}: CA file path", r.route)));
        }
        ca_files.insert(tls.ca_file.as_str());
    }
    if ca_files.len() > MAX_UPSTREAM_CA_FILES {
        return Err(BootstrapError::Invalid(format!("{} distinct upstream CA files", ca_files.len())));
    }
    Ok(())
}

/// Keys for QUIC's stateless functions: a Retry token minted by one worker
/// or host validates on any other (RFC 9000 section 8.1.2), and a stateless
/// reset sent by any of them carries the token the client was given for
/// the connection ID (section 10.3.2). Control derives them from the fleet
/// secret, or makes them at start for a single host (so a restarted
/// dataplane still resets its old connections).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicKeys {
    /// HMAC-SHA256 key of Retry tokens.
    pub retry_token_key: [u8; 32],
    /// HMAC-SHA256 key the stateless reset token of each connection ID is
    /// derived with.
    pub stateless_reset_key: [u8; 32],
}

impl std::fmt::Debug for QuicKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuicKeys(..)")
    }
}

/// An extended CONNECT protocol the relay can serve (RFC 8441, RFC 9220),
/// named by its `:protocol` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `connect-udp` (RFC 9298).
    ConnectUdp,
    /// `connect-ip` (RFC 9484).
    ConnectIp,
    /// `connect-udp-bind`: bound connect-udp (draft-ietf-masque-connect-udp-listen).
    ConnectUdpBind,
    /// `websocket` (RFC 8441, RFC 9220; HTTP/1.1 `Upgrade: websocket`),
    /// relayed to `[[upstreams]]` origins.
    Websocket,
    /// `webtransport` (draft-ietf-webtrans-http3; HTTP/3 only), relayed to
    /// `[[upstreams]]` origins over HTTP/3.
    Webtransport,
}

/// Which I/O backend the dataplane's workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// io_uring when the kernel allows it (multishot receives, provided
    /// buffer rings), epoll otherwise.
    #[default]
    Auto,
    /// io_uring only: the dataplane fails to start without it.
    IoUring,
    /// epoll (mio) with recvmmsg/sendmmsg.
    Epoll,
}

/// Which peers may send to a bound connect-udp tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundFilter {
    /// Only peers the client has sent to (like an endpoint-dependent NAT).
    #[default]
    SentTo,
    /// Any peer the target policy allows.
    Any,
}

/// How a connect-ip tunnel's IPv6 link MTU is checked (RFC 9484 section
/// 7.2: endpoints MUST ensure the tunnel carries 1280-byte packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MtuProbe {
    /// ICMPv6 Echo Requests of 1280 bytes through each tunnel that carries
    /// IPv6 in QUIC datagrams; no full reply in time tears it down.
    #[default]
    Echo,
    /// No probe: the operator guarantees the links out of band (the
    /// section's own exception). The QUIC datagram size is still checked.
    Off,
}

/// What the dataplane needs to serve the TCP front (HTTP/2 and HTTP/1.1 over TCP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpBootstrap {
    /// TLS over TCP (ALPN h2 and http/1.1); None: off.
    pub listen_tls: Option<SocketAddr>,
    /// Cleartext HTTP/1.1 and h2c (prior knowledge or Upgrade), for relays behind a TLS-terminating balancer; None: off.
    pub listen_cleartext: Option<SocketAddr>,
    /// Alt-Svc field value sent on every response over TCP (RFC 7838); None: not sent.
    pub alt_svc: Option<String>,
    /// Most TCP connections per worker; beyond it new connections are closed at accept.
    pub max_connections_per_worker: u32,
    /// A connection must complete its TLS handshake and send its first complete request head within this long.
    pub handshake_timeout_ms: u32,
    /// A connection with no tunnel and no request in progress is closed after this long.
    pub idle_timeout_ms: u64,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (and the HTTP/1.1 pipelining bound: 1).
    pub max_streams_per_connection: u32,
    /// Bytes buffered per direction per tunnel before the relay stops reading the other side (TCP) or drops datagrams (UDP/IP).
    pub tunnel_buffer_bytes: u32,
    /// Serve the status endpoint (GET / and GET /.well-known/masque-relay/status).
    pub status_endpoint: bool,
}

/// What the dataplane needs to serve bound connect-udp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindBootstrap {
    /// Public addresses (empty: each family's primary outbound address).
    pub public_addresses: Vec<std::net::IpAddr>,
    /// Which peers may send to a bound tunnel.
    pub inbound_filter: InboundFilter,
    /// Open compression contexts per tunnel.
    pub max_contexts: u32,
    /// Distinct peers a tunnel may send to.
    pub max_peers: u32,
}

fn yes() -> bool {
    true
}

fn default_mtu_probe_timeout_ms() -> u32 {
    5000
}

/// What the dataplane needs to serve connect-ip (RFC 9484): each worker
/// owns a TUN device carrying its share of the address pools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectIpBootstrap {
    /// The URI template.
    pub uri_template: String,
    /// TUN devices are `<prefix><worker>`.
    pub interface_prefix: String,
    /// Their MTU.
    pub mtu: u32,
    /// Whether to ask for TUN offloads (virtio-net header, GSO both ways).
    #[serde(default = "yes")]
    pub offload: bool,
    /// The IPv6 link MTU check.
    #[serde(default)]
    pub mtu_probe: MtuProbe,
    /// How long after the first probe its reply may come, in milliseconds.
    #[serde(default = "default_mtu_probe_timeout_ms")]
    pub mtu_probe_timeout_ms: u32,
    /// Per worker (index = worker): its subnets as `address/length`, and
    /// its own address in each (the TUN device's address, the source of
    /// the ICMP errors it sends).
    pub worker_subnets: Vec<Vec<WorkerSubnet>>,
}

/// One of a worker's subnets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSubnet {
    /// `address/length`.
    pub prefix: String,
    /// The worker's own address in it.
    pub own: String,
}

/// A session ticket key (RFC 8446 section 4.6.1 tickets are opaque to the
/// client; the relay seals them with AES-256-CBC + HMAC-SHA256 under these
/// keys, as BoringSSL's own ticket format does). Control generates and
/// rotates them so every worker, and a restarted dataplane, accepts the
/// tickets any worker issued.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketKey {
    /// Key name, sent in the clear in each ticket to pick the key.
    pub name: [u8; 16],
    /// AES-256 key.
    pub aes_key: [u8; 32],
    /// HMAC-SHA256 key.
    pub hmac_key: [u8; 32],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The name is public (it is in every ticket); the keys are not.
        f.debug_struct("TicketKey").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Most ticket keys control sends (the current one and those still
/// accepted).
pub const MAX_TICKET_KEYS: usize = 4;

/// The TLS material the dataplane serves with. Control sends it at attach
/// time and again on every change; `generation` grows with each certificate
/// (and key) reload, and signing asks name the generation their handshake
/// started with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsMaterial {
    /// Certificate generation (1 for the first; never 0).
    pub generation: u32,
    /// The certificate chain, PEM, leaf first. The private key never leaves
    /// control: handshake signatures are asked for over the channel
    /// (keyless TLS).
    pub cert_chain_pem: String,
    /// The private key, PEM, only when the operator turned keyless TLS off
    /// (`tls.keyless = false`): the dataplane then signs locally.
    #[serde(default)]
    pub private_key_pem: Option<String>,
    /// Session ticket keys, the one to issue with first; empty: the relay
    /// issues no session tickets.
    #[serde(default)]
    pub ticket_keys: Vec<TicketKey>,
    /// Lifetime of the tickets issued, in seconds (what clients are told).
    #[serde(default)]
    pub ticket_lifetime_secs: u32,
    /// Client certificates (mutual TLS): whether they are asked for, and
    /// the CAs they are verified against.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Largest CA bundle [`ClientAuth::ca_pem`] carries (it travels in the
/// bootstrap frame beside the certificate chain).
pub const MAX_CLIENT_CA_PEM: usize = 32 * 1024;

/// Whether the dataplane asks TLS clients for a certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// No certificate is asked for (the default).
    #[default]
    Off,
    /// A certificate is asked for; a handshake without one goes on (the
    /// request then needs another credential), one that does not verify
    /// fails.
    Optional,
    /// A handshake without a certificate that verifies fails.
    Required,
}

/// Client certificate verification (`[auth.mtls]`): the CA certificates
/// are public, so control sends them and the dataplane's TLS stack
/// verifies chains and validity periods; control maps the verified
/// certificate to an identity and checks revocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// Whether certificates are asked for.
    pub mode: ClientAuthMode,
    /// The trusted CA certificates, PEM (at most [`MAX_CLIENT_CA_PEM`]
    /// bytes; not empty unless `mode` is `off`).
    #[serde(default)]
    pub ca_pem: String,
}

impl ClientAuth {
    /// Checks the bounds a peer could get wrong.
    pub fn validate(&self) -> Result<(), BootstrapError> {
        if self.ca_pem.len() > MAX_CLIENT_CA_PEM {
            return Err(BootstrapError::Invalid(format!("client CA bundle of {} bytes", self.ca_pem.len())));
        }
        if self.mode != ClientAuthMode::Off && self.ca_pem.is_empty() {
            return Err(BootstrapError::Invalid("client certificates asked for without a CA".into()));
        }
        Ok(())
    }
}

impl TlsMaterial {
    /// Checks the values a peer could get wrong.
    pub fn validate(&self) -> Result<(), BootstrapError> {
        if self.generation == 0 {
            return Err(BootstrapError::Invalid("TLS generation 0".into()));
        }
        if self.cert_chain_pem.is_empty() {
            return Err(BootstrapError::Invalid("empty certificate chain".into()));
        }
        if self.ticket_keys.len() > MAX_TICKET_KEYS {
            return Err(BootstrapError::Invalid(format!("{} ticket keys", self.ticket_keys.len())));
        }
        let mut names: Vec<_> = self.ticket_keys.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() != self.ticket_keys.len() {
            return Err(BootstrapError::Invalid("two ticket keys share a name".into()));
        }
        self.client_auth.validate()
    }
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsMaterial")
            .field("generation", &self.generation)
            .field("cert_chain_pem_len", &self.cert_chain_pem.len())
            .field("local_key", &self.private_key_pem.is_some())
            .field("ticket_keys", &self.ticket_keys)
            .field("ticket_lifetime_secs", &self.ticket_lifetime_secs)
            .field("client_auth", &self.client_auth.mode)
            .finish()
    }
}

/// A frame control sends on the attach socket after the bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ControlUpdate {
    /// New TLS material: a reloaded certificate (new generation) or rotated
    /// ticket keys (same generation).
    Tls(TlsMaterial),
    /// A new QUIC-LB configuration (draft-ietf-quic-load-balancers-21
    /// section 3.1, config rotation): new connection IDs use it, those
    /// issued under the one before keep routing until it is replaced.
    Cids(CidSettings),
    /// Start or stop writing qlog (`relayctl qlog`). A start carries the
    /// qlog directory's descriptor (SCM_RIGHTS), nothing else does.
    Qlog(QlogCommand),
}

/// Most bytes of one qlog file.
pub const MAX_QLOG_FILE_BYTES: u64 = 1 << 30;
/// Fewest bytes of one qlog file (room for the header and a few events).
pub const MIN_QLOG_FILE_BYTES: u64 = 4096;
/// Most qlog files kept in the directory.
pub const MAX_QLOG_FILES: u32 = 10_000;
/// Longest window for new connections, in seconds.
pub const MAX_QLOG_SECONDS: u32 = 86_400;

/// A qlog command of control's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum QlogCommand {
    /// Log the connections `target` names into the directory sent along.
    Start(QlogStart),
    /// Stop every qlog file and close the window.
    Stop {
        /// Control's number for this command (the workers report the
        /// last one they applied in their `qlog_session` counter).
        session: u64,
    },
}

/// What a qlog start asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QlogStart {
    /// Control's number for this command (see [`QlogCommand::Stop`]).
    pub session: u64,
    /// Which connections.
    pub target: QlogTarget,
    /// How long new connections from a matching client are logged from
    /// their first packet (a connection target matches only the open
    /// connection it names).
    pub seconds: u32,
    /// Most bytes per file (whole records only).
    pub max_file_bytes: u64,
    /// Most files kept in the directory (oldest closed ones removed).
    pub max_files: u32,
    /// Which events quiche writes.
    pub level: QlogLevel,
}

impl QlogStart {
    /// Checks the values a peer could get wrong.
    pub fn validate(&self) -> Result<(), BootstrapError> {
        let invalid = |m: String| Err(BootstrapError::Invalid(m));
        if !(MIN_QLOG_FILE_BYTES..=MAX_QLOG_FILE_BYTES).contains(&self.max_file_bytes) {
            return invalid(format!("qlog max_file_bytes {}", self.max_file_bytes));
        }
        if !(1..=MAX_QLOG_FILES).contains(&self.max_files) {
            return invalid(format!("qlog max_files {}", self.max_files));
        }
        if !(1..=MAX_QLOG_SECONDS).contains(&self.seconds) {
            return invalid(format!("qlog seconds {}", self.seconds));
        }
        Ok(())
    }
}

/// The connections a qlog start names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum QlogTarget {
    /// One open QUIC connection, as `relayctl conns` lists it.
    Conn {
        /// The worker.
        worker: u32,
        /// The worker's serial number for it.
        conn_id: u64,
    },
    /// The open connections from a client address, and new ones while
    /// the window lasts.
    Client {
        /// The client's address (IPv4-mapped IPv6 matches IPv4).
        ip: std::net::IpAddr,
        /// Its port; None: any.
        port: Option<u16>,
    },
}

/// quiche's qlog levels: which events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QlogLevel {
    /// The core events only.
    Core,
    /// Core and base events (what qvis needs for its sequence and
    /// congestion views).
    #[default]
    Base,
    /// Every event quiche has.
    Extra,
}

/// How the relay makes its connection IDs (the QUIC-LB configuration and
/// this host's server ID).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidSettings {
    /// Config rotation codepoint (0..=6).
    pub config_id: u8,
    /// This host's server ID (empty: a single host, plaintext only).
    pub host_id: Vec<u8>,
    /// Random bytes after the worker byte.
    pub random_len: usize,
    /// The QUIC-LB encryption key; None: plaintext.
    pub key: Option<[u8; 16]>,
}

impl std::fmt::Debug for CidSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CidSettings")
            .field("config_id", &self.config_id)
            .field("host_id", &self.host_id)
            .field("random_len", &self.random_len)
            .field("encrypted", &self.key.is_some())
            .finish()
    }
}

impl CidSettings {
    /// The layout these settings describe: plaintext, or encrypted under
    /// the key with the worker byte as the first nonce octet.
    pub fn layout(&self) -> Result<crate::cid::CidLayout, crate::cid::CidLayoutError> {
        use crate::cid::{CidKey, CidLayout, LbConfig};
        match self.key {
            None => CidLayout::new(self.config_id, &self.host_id, self.random_len),
            Some(key) => {
                let nonce_len = self.random_len.saturating_add(1);
                let config =
                    LbConfig::new(self.config_id, self.host_id.len(), nonce_len, Some(CidKey::new(key)))?;
                CidLayout::from_lb_config(&config, &self.host_id)
            }
        }
    }
}

impl Bootstrap {
    /// The connection ID settings the dataplane starts with.
    pub fn cid_settings(&self) -> CidSettings {
        CidSettings {
            config_id: self.cid_config_id,
            host_id: self.cid_server_id.clone(),
            random_len: self.cid_nonce_len,
            key: self.cid_key,
        }
    }
}

fn retry_threshold() -> u32 {
    1024
}

fn connect_udp_only() -> Vec<Protocol> {
    vec![Protocol::ConnectUdp]
}

fn fourteen() -> usize {
    14
}

/// Why a handshake message was refused.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A frame is too large or not valid JSON of the expected shape, or a
    /// value is out of range.
    #[error("invalid handshake frame: {0}")]
    Invalid(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    Version {
        /// Our version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
}

/// Bytes of a frame's length prefix.
pub const FRAME_PREFIX: usize = 4;

/// Encodes `value` as a frame: the length prefix, then the JSON.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, BootstrapError> {
    let json = serde_json::to_vec(value).map_err(|e| BootstrapError::Invalid(e.to_string()))?;
    if json.len() > MAX_FRAME {
        return Err(BootstrapError::Invalid("frame too large".into()));
    }
    let mut out = (json.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// The body length a frame's prefix announces, refused past [`MAX_FRAME`]
/// (before anything is allocated for it).
pub fn frame_len(prefix: [u8; FRAME_PREFIX]) -> Result<usize, BootstrapError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(BootstrapError::Invalid(format!("frame of {len} bytes")));
    }
    Ok(len)
}

/// Decodes a frame's body (the JSON after the prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, BootstrapError> {
    serde_json::from_slice(body).map_err(|e| BootstrapError::Invalid(e.to_string()))
}

/// Checks a peer's protocol version.
pub fn check_version(theirs: u32) -> Result<(), BootstrapError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(BootstrapError::Version { ours: PROTOCOL_VERSION, theirs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through the frame codec as the socket functions use it: prefix,
    /// then body.
    fn through_a_frame<T: Serialize + DeserializeOwned>(value: &T) -> Result<T, BootstrapError> {
        let bytes = encode_frame(value)?;
        let prefix: [u8; FRAME_PREFIX] = bytes[..FRAME_PREFIX].try_into().unwrap();
        assert_eq!(frame_len(prefix)?, bytes.len() - FRAME_PREFIX);
        decode_body(&bytes[FRAME_PREFIX..])
    }

    #[test]
    fn hello_round_trips_and_versions_are_checked() {
        let hello = Hello { version: PROTOCOL_VERSION, pid: 7, qlog: true };
        assert_eq!(through_a_frame(&hello).unwrap(), hello);
        // A dataplane that predates qlog sends no `qlog`: without.
        let old: Hello = decode_body(br#"{"version":2,"pid":3}"#).unwrap();
        assert!(!old.qlog);
        check_version(hello.version).unwrap();
        assert!(matches!(
            check_version(9),
            Err(BootstrapError::Version { ours: PROTOCOL_VERSION, theirs: 9 })
        ));
    }

    #[test]
    fn refuses_garbage_and_huge_frames() {
        assert!(matches!(decode_body::<Hello>(b"{x}"), Err(BootstrapError::Invalid(_))));
        assert!(matches!(frame_len(u32::MAX.to_le_bytes()), Err(BootstrapError::Invalid(_))));
        assert!(matches!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()), Err(BootstrapError::Invalid(_))));
        assert_eq!(frame_len((MAX_FRAME as u32).to_le_bytes()).unwrap(), MAX_FRAME);
        let small = Hello { version: 1, pid: 1, qlog: false };
        assert!(encode_frame(&small).is_ok());
        let too_big = "x".repeat(MAX_FRAME);
        assert!(matches!(encode_frame(&too_big), Err(BootstrapError::Invalid(_))));
    }

    #[test]
    fn qlog_commands_round_trip_and_bounds_are_checked() {
        let start = QlogStart {
            session: 3,
            target: QlogTarget::Client { ip: "2001:db8::1".parse().unwrap(), port: None },
            seconds: 60,
            max_file_bytes: 1 << 20,
            max_files: 16,
            level: QlogLevel::Extra,
        };
        for update in [
            ControlUpdate::Qlog(QlogCommand::Start(start.clone())),
            ControlUpdate::Qlog(QlogCommand::Start(QlogStart {
                target: QlogTarget::Conn { worker: 1, conn_id: 9 },
                ..start.clone()
            })),
            ControlUpdate::Qlog(QlogCommand::Stop { session: 4 }),
        ] {
            assert_eq!(through_a_frame(&update).unwrap(), update);
        }
        start.validate().unwrap();
        for bad in [
            QlogStart { max_file_bytes: MIN_QLOG_FILE_BYTES - 1, ..start.clone() },
            QlogStart { max_file_bytes: MAX_QLOG_FILE_BYTES + 1, ..start.clone() },
            QlogStart { max_files: 0, ..start.clone() },
            QlogStart { max_files: MAX_QLOG_FILES + 1, ..start.clone() },
            QlogStart { seconds: 0, ..start.clone() },
            QlogStart { seconds: MAX_QLOG_SECONDS + 1, ..start.clone() },
        ] {
            assert!(matches!(bad.validate(), Err(BootstrapError::Invalid(_))), "{bad:?}");
        }
        // A level this build does not know is a decode error.
        let json = br#"{"qlog":{"start":{"session":1,"target":{"conn":{"worker":0,"conn_id":1}},"seconds":1,"max_file_bytes":4096,"max_files":1,"level":"verbose"}}}"#;
        assert!(matches!(decode_body::<ControlUpdate>(json), Err(BootstrapError::Invalid(_))));
    }

    fn bootstrap(tcp: Option<TcpBootstrap>) -> Bootstrap {
        Bootstrap {
            version: PROTOCOL_VERSION,
            workers: 2,
            listen: "[::]:443".parse().unwrap(),
            tls: material(),
            uri_template: "https://relay.example/.well-known/masque/udp/{target_host}/{target_port}/".into(),
            proxy_name: "relay".into(),
            auth_realm: "masque".into(),
            ask_timeout_ms: 2000,
            quic_idle_timeout_ms: 30_000,
            max_connections_per_worker: 1000,
            max_tunnels_per_connection: 64,
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
            protocols: vec![Protocol::ConnectUdp, Protocol::ConnectIp],
            retry_threshold: 1024,
            connect_ip: None,
            bind: None,
            tcp,
            quic_keys: Some(QuicKeys { retry_token_key: [1; 32], stateless_reset_key: [2; 32] }),
            upstreams: vec![
                UpstreamBootstrap { route: "plain".into(), tls: None, origin_http: OriginHttp::H2 },
                UpstreamBootstrap {
                    route: "secure".into(),
                    tls: Some(UpstreamTls {
                        server_name: "chat.example".into(),
                        ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
                    }),
                    origin_http: OriginHttp::Auto,
                },
            ],
        }
    }

    #[test]
    fn upstream_routes_are_checked() {
        let good = bootstrap(None).upstreams;
        assert!(validate_upstreams(&good).is_ok());
        assert_eq!(through_a_frame(&bootstrap(None)).unwrap().upstreams, good);
        let tls = |server_name: &str, ca_file: &str| UpstreamBootstrap {
            route: "r".into(),
            tls: Some(UpstreamTls { server_name: server_name.into(), ca_file: ca_file.into() }),
            origin_http: OriginHttp::Http1,
        };
        assert!(validate_upstreams(&[tls("::1", "/ca.pem")]).is_ok());
        assert!(validate_upstreams(&[tls("192.0.2.1", "/ca.pem")]).is_ok());
        for bad in [
            vec![UpstreamBootstrap { route: "Bad".into(), tls: None, origin_http: OriginHttp::Http1 }],
            // auto picks by ALPN: cleartext has none.
            vec![UpstreamBootstrap { route: "r".into(), tls: None, origin_http: OriginHttp::Auto }],
            vec![good[0].clone(), good[0].clone()],
            vec![tls("Chat.example", "/ca.pem")],
            vec![tls("[::1]", "/ca.pem")],
            vec![tls("a b", "/ca.pem")],
            vec![tls("", "/ca.pem")],
            vec![tls("x.example", "relative.pem")],
            vec![tls("x.example", &format!("/{}", "a".repeat(MAX_CA_FILE_PATH)))],
            vec![tls("x.example", "/a\0b")],
            (0..=MAX_UPSTREAM_ROUTES)
                .map(|i| UpstreamBootstrap {
                    route: format!("r{i}"),
                    tls: None,
                    origin_http: OriginHttp::Http1,
                })
                .collect(),
            (0..=MAX_UPSTREAM_CA_FILES)
                .map(|i| UpstreamBootstrap {
                    route: format!("r{i}"),
                    tls: Some(UpstreamTls { server_name: "x".into(), ca_file: format!("/ca{i}.pem") }),
                    origin_http: OriginHttp::Http1,
                })
                .collect(),
        ] {
            assert!(matches!(validate_upstreams(&bad), Err(BootstrapError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn bootstrap_with_the_tcp_front_round_trips() {
        let tcp = TcpBootstrap {
            listen_tls: Some("[::]:443".parse().unwrap()),
            listen_cleartext: Some("127.0.0.1:8080".parse().unwrap()),
            alt_svc: Some("h3=\":443\"; ma=86400".into()),
            max_connections_per_worker: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            max_streams_per_connection: 100,
            tunnel_buffer_bytes: 262_144,
            status_endpoint: true,
        };
        for boot in [
            bootstrap(Some(tcp.clone())),
            bootstrap(Some(TcpBootstrap { listen_tls: None, alt_svc: None, status_endpoint: false, ..tcp })),
            bootstrap(None),
        ] {
            assert_eq!(through_a_frame(&boot).unwrap(), boot);
        }
        // A control that predates the TCP front sends no `tcp`: off.
        let mut json = serde_json::to_value(bootstrap(None)).unwrap();
        json.as_object_mut().unwrap().remove("tcp");
        let old: Bootstrap = serde_json::from_value(json).unwrap();
        assert_eq!(old.tcp, None);
        // Unknown fields inside `tcp` are refused, like everywhere else.
        let mut json = serde_json::to_value(bootstrap(Some(tcp_min()))).unwrap();
        json["tcp"]["surprise"] = serde_json::Value::Bool(true);
        assert!(serde_json::from_value::<Bootstrap>(json).is_err());
    }

    fn tcp_min() -> TcpBootstrap {
        TcpBootstrap {
            listen_tls: None,
            listen_cleartext: Some("127.0.0.1:8080".parse().unwrap()),
            alt_svc: None,
            max_connections_per_worker: 1,
            handshake_timeout_ms: 100,
            idle_timeout_ms: 1000,
            max_streams_per_connection: 1,
            tunnel_buffer_bytes: 16_384,
            status_endpoint: false,
        }
    }

    fn material() -> TlsMaterial {
        TlsMaterial {
            generation: 3,
            cert_chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            private_key_pem: None,
            ticket_keys: vec![
                TicketKey { name: [1; 16], aes_key: [2; 32], hmac_key: [3; 32] },
                TicketKey { name: [4; 16], aes_key: [5; 32], hmac_key: [6; 32] },
            ],
            ticket_lifetime_secs: 3600,
            client_auth: ClientAuth {
                mode: ClientAuthMode::Optional,
                ca_pem: "-----BEGIN CERTIFICATE-----".into(),
            },
        }
    }

    #[test]
    fn client_auth_is_bounded() {
        let mut m = material();
        assert!(m.validate().is_ok());
        m.client_auth.ca_pem.clear();
        assert!(m.validate().is_err(), "a mode without a CA");
        m.client_auth.mode = ClientAuthMode::Off;
        assert!(m.validate().is_ok());
        m.client_auth.ca_pem = "x".repeat(MAX_CLIENT_CA_PEM + 1);
        assert!(m.validate().is_err());
    }

    #[test]
    fn cid_rotations_round_trip_and_never_show_the_key() {
        let update = ControlUpdate::Cids(CidSettings {
            config_id: 2,
            host_id: vec![1, 2],
            random_len: 13,
            key: Some([0x5a; 16]),
        });
        assert_eq!(through_a_frame(&update).unwrap(), update);
        let ControlUpdate::Cids(s) = update else { panic!("a CID update") };
        assert!(!format!("{s:?}").contains("90"), "Debug hides the key: {s:?}");
        assert_eq!(s.layout().unwrap().cid_len(), 17);
        let mut b = bootstrap(None);
        b.cid_key = Some([0x5a; 16]);
        b.cid_server_id = vec![1, 2];
        b.cid_nonce_len = 13;
        assert!(b.cid_settings().layout().unwrap().lb_config().key().is_some());
        assert!(CidSettings { host_id: Vec::new(), ..s }.layout().is_err(), "a key needs a server ID");
    }

    #[test]
    fn tls_updates_round_trip_and_are_validated() {
        let update = ControlUpdate::Tls(material());
        let got = through_a_frame(&update).unwrap();
        assert_eq!(got, update);
        let ControlUpdate::Tls(m) = got else { panic!("a TLS update") };
        m.validate().unwrap();
        let shown = format!("{m:?}");
        assert!(!shown.contains("[2, 2") && !shown.contains("[3, 3"), "Debug hides ticket keys: {shown}");
        let mut bad = material();
        bad.generation = 0;
        assert!(bad.validate().is_err());
        let mut bad = material();
        bad.ticket_keys[1].name = [1; 16];
        assert!(bad.validate().is_err(), "duplicate names");
        let mut bad = material();
        bad.ticket_keys = vec![bad.ticket_keys[0].clone(); MAX_TICKET_KEYS + 1];
        assert!(bad.validate().is_err());
        // A short key is refused by the decoder.
        let json = br#"{"tls":{"generation":1,"cert_chain_pem":"x","ticket_keys":[{"name":[1],"aes_key":[],"hmac_key":[]}]}}"#;
        assert!(matches!(decode_body::<ControlUpdate>(json), Err(BootstrapError::Invalid(_))));
    }

    #[test]
    fn choices_have_their_wire_names_and_unknown_ones_are_refused() {
        let json = serde_json::to_value(bootstrap(None)).unwrap();
        assert_eq!(json["protocols"], serde_json::json!(["connect-udp", "connect-ip"]));
        assert_eq!(json["io_backend"], "auto");
        for (backend, name) in
            [(IoBackend::Auto, "auto"), (IoBackend::IoUring, "io_uring"), (IoBackend::Epoll, "epoll")]
        {
            assert_eq!(serde_json::to_value(backend).unwrap(), name);
        }
        for (protocol, name) in [
            (Protocol::ConnectUdp, "connect-udp"),
            (Protocol::ConnectIp, "connect-ip"),
            (Protocol::ConnectUdpBind, "connect-udp-bind"),
            (Protocol::Websocket, "websocket"),
            (Protocol::Webtransport, "webtransport"),
        ] {
            assert_eq!(serde_json::to_value(protocol).unwrap(), name);
        }
        for (filter, name) in [(InboundFilter::SentTo, "sent_to"), (InboundFilter::Any, "any")] {
            assert_eq!(serde_json::to_value(filter).unwrap(), name);
        }
        let refused = |edit: &dyn Fn(&mut serde_json::Value), needle: &str| {
            let mut json = serde_json::to_value(bootstrap(None)).unwrap();
            json["bind"] = serde_json::json!({
                "public_addresses": [], "inbound_filter": "any", "max_contexts": 1, "max_peers": 1
            });
            serde_json::from_value::<Bootstrap>(json.clone()).unwrap();
            edit(&mut json);
            let err = decode_body::<Bootstrap>(&serde_json::to_vec(&json).unwrap()).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        refused(&|j| j["protocols"] = serde_json::json!(["connect-udp", "connect-quic"]), "connect-quic");
        refused(&|j| j["io_backend"] = serde_json::json!("kqueue"), "kqueue");
        refused(&|j| j["bind"]["inbound_filter"] = serde_json::json!("everyone"), "everyone");
        // Left out, the choices take their defaults.
        let mut json = serde_json::to_value(bootstrap(None)).unwrap();
        json.as_object_mut().unwrap().remove("protocols");
        json.as_object_mut().unwrap().remove("io_backend");
        let old: Bootstrap = serde_json::from_value(json).unwrap();
        assert_eq!((old.protocols, old.io_backend), (vec![Protocol::ConnectUdp], IoBackend::Auto));
    }
}

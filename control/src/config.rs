//! The control process's configuration (TOML).
//!
//! Every key has a default, the value `default.toml` ([`DEFAULT_CONFIG`],
//! printed by `relay-control --print-default-config`) states for it, so a
//! config file holds only what it changes; a test parses the embedded file
//! and compares it with an empty one, so the two cannot drift apart.
//!
//! Parse errors name the line, column and key (the `toml` crate reports
//! them, and every value type here validates inside deserialization so that
//! its errors carry positions too). Unknown keys are errors.
//!
//! [`Config::effective_toml`] prints the configuration in force (defaults
//! merged) with every secret redacted, for `relay-control --check-config`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use relay_proto::channel::bootstrap::{InboundFilter, MtuProbe, Protocol, QlogLevel, TcpBootstrap};
use relay_proto::target::TargetHost;
use relay_proto::template::UriTemplate;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::acl::{Cidr, PortRange};
use crate::auth::{SecretString, valid_static_token};
use crate::logging::LogFormat;
use crate::quota::QuotaConfig;
use crate::token::{KeyError, Secret, TokenKeys};

/// The embedded default configuration: every key with its default value
/// and what it means (`relay-control --print-default-config`).
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The demo relay's configuration (`relay-control` without `--config`):
/// the defaults, plus loopback targets so that it can tunnel to services
/// on this machine.
pub const DEMO_CONFIG: &str = include_str!("demo.toml");

/// The whole configuration. Every section and key is optional: what a file
/// leaves out has its default ([`DEFAULT_CONFIG`]).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity and state.
    pub relay: RelaySection,
    /// Listening addresses.
    pub listen: ListenSection,
    /// Dataplane settings.
    pub dataplane: DataplaneSection,
    /// TLS credentials.
    pub tls: TlsSection,
    /// Client authentication.
    pub auth: AuthSection,
    /// Target policy.
    pub targets: TargetsSection,
    /// DNS resolution.
    pub resolver: ResolverSection,
    /// Quotas per identity and per client address (absent: unlimited).
    pub quotas: QuotaConfig,
    /// Which extended CONNECT protocols are served.
    pub protocols: ProtocolsSection,
    /// connect-ip (RFC 9484): template, address pools, TUN devices.
    pub connect_ip: ConnectIpSection,
    /// Bound connect-udp: public addresses, inbound filter, limits.
    pub bind: BindSection,
    /// The TCP front (HTTP/2 and HTTP/1.1 over TCP): Alt-Svc, limits,
    /// timeouts. Its listeners are `listen.tcp` and `listen.tcp_cleartext`.
    pub tcp: TcpSection,
    /// Routes to upstream origins (`[[upstreams]]`, WebSocket and
    /// WebTransport), tried in file order (absent: none, and neither is
    /// served).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamRoute>,
    /// Fleet mode: hosts sharing state through a Redis store (absent: this
    /// host stands alone, as without fleet mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetSection>,
    /// Log format and what log lines may say about clients and targets.
    pub log: LogSection,
    /// qlog on demand (`relayctl qlog`): file sizes, file count, window.
    pub qlog: QlogSection,
    /// Where the config came from (file name or "embedded default config").
    #[serde(skip)]
    pub origin: String,
}

/// `[relay]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// Proxy name used in Proxy-Status.
    pub name: String,
    /// Directory for generated state (relative to the working directory).
    pub state_dir: PathBuf,
    /// Unix socket the dataplane attaches to (default: state_dir/channel.sock).
    pub channel_socket: Option<PathBuf>,
    /// Unix socket relayctl talks to (default: state_dir/admin.sock).
    pub admin_socket: Option<PathBuf>,
    /// The user the dataplane runs as, when not control's: the channel
    /// socket is handed to it (mode 0600), and nothing else of control's
    /// state is (the TLS key stays unreadable to it).
    pub dataplane_user: Option<String>,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            name: default_name(),
            state_dir: PathBuf::from("state"),
            channel_socket: None,
            admin_socket: None,
            dataplane_user: None,
        }
    }
}

fn default_name() -> String {
    "masque-relay".into()
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// UDP address for QUIC.
    pub quic: SocketAddr,
    /// TCP address of the Prometheus metrics endpoint (`GET /metrics`);
    /// `None` (written `""`): no endpoint. Keep it on loopback or a
    /// management network.
    #[serde(deserialize_with = "listen_metrics", serialize_with = "address_or_off")]
    pub metrics: Option<SocketAddr>,
    /// TLS over TCP (ALPN h2 and http/1.1), as written: absent means the
    /// address of `quic` (the QUIC port number, over TCP), `""` turns it
    /// off. [`ListenSection::tcp_tls`] resolves it.
    #[serde(default, deserialize_with = "listen_tcp")]
    pub tcp: Option<Spanned<ListenAddr>>,
    /// Cleartext HTTP/1.1 and h2c, for relays behind a TLS-terminating
    /// balancer, as written: absent or `""` is off.
    /// [`ListenSection::tcp_cleartext_addr`] resolves it.
    #[serde(default, deserialize_with = "listen_tcp_cleartext")]
    pub tcp_cleartext: Option<Spanned<ListenAddr>>,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            quic: SocketAddr::from(([127, 0, 0, 1], 4433)),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            tcp: None,
            tcp_cleartext: None,
        }
    }
}

impl ListenSection {
    /// The TLS-over-TCP listener's address, `None` when it is off.
    pub fn tcp_tls(&self) -> Option<SocketAddr> {
        match &self.tcp {
            None => Some(self.quic),
            Some(addr) => addr.get_ref().0,
        }
    }

    /// The cleartext TCP listener's address, `None` when it is off.
    pub fn tcp_cleartext_addr(&self) -> Option<SocketAddr> {
        self.tcp_cleartext.as_ref().and_then(|a| a.get_ref().0)
    }
}

/// A TCP listener address in `[listen]`: `"address:port"`, or `""` for off
/// (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        address_or_off(&self.0, s)
    }
}

/// Writes an optional address as the config spells it: `""` for off.
fn address_or_off<S: serde::Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match addr {
        Some(a) => s.collect_str(a),
        None => s.serialize_str(""),
    }
}

fn listen_metrics<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Ok(listen_addr(d, "listen.metrics")?.and_then(|a| a.into_inner().0))
}

fn listen_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
    key: &str,
) -> Result<Option<Spanned<ListenAddr>>, D::Error> {
    let raw = Spanned::<String>::deserialize(d)?;
    let span = raw.span();
    let text = raw.into_inner();
    let addr = if text.is_empty() {
        None
    } else {
        Some(text.parse::<SocketAddr>().map_err(|_| {
            serde::de::Error::custom(format!(
                "{key} must be an address and port (\"0.0.0.0:443\", \"[::]:443\") or \"\" for off, not {text:?}"
            ))
        })?)
    };
    Ok(Some(Spanned::new(span, ListenAddr(addr))))
}

fn listen_tcp<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Spanned<ListenAddr>>, D::Error> {
    listen_addr(d, "listen.tcp")
}

fn listen_tcp_cleartext<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<ListenAddr>>, D::Error> {
    listen_addr(d, "listen.tcp_cleartext")
}

/// A validated URI template in the config.
#[derive(Debug, Clone)]
pub struct TemplateValue(pub UriTemplate);

impl<'de> Deserialize<'de> for TemplateValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UriTemplate::parse(&s).map(TemplateValue).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TemplateValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Longest batched wait (`dataplane.wait_batch_us`): 10 ms. Past that the
/// added latency is no longer small next to an Internet path's, and a busy
/// worker's socket buffers would have to hold that much traffic.
pub const MAX_WAIT_BATCH_US: u32 = 10_000;

/// The default connect-udp URI template.
const DEFAULT_UDP_TEMPLATE: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";

/// `[dataplane]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneSection {
    /// Worker threads: a number, or `"auto"` for one per CPU the relay may
    /// run on (its affinity mask and cgroup quota).
    pub workers: Workers,
    /// I/O backend of the workers.
    pub io: IoBackend,
    /// Pin worker i to the i-th CPU of the relay's affinity mask.
    pub pin_workers: bool,
    /// io_uring workers: how long (microseconds) a worker that has just
    /// finished a turn may collect completions before it runs the next one
    /// (fewer wake-ups and fuller batches at paced loads, for at most this
    /// much added latency per hop); 0 turns it off.
    pub wait_batch_us: u32,
    /// Connection IDs (QUIC-LB layout) and their steering.
    pub connection_ids: ConnectionIdSection,
    /// connect-udp URI template.
    pub uri_template: TemplateValue,
    /// A tunnel with no traffic either way for this long is closed.
    pub flow_idle_timeout_secs: u32,
    /// How long a CONNECT waits for control before 503.
    pub ask_timeout_ms: u32,
    /// QUIC idle timeout.
    pub quic_idle_timeout_secs: u32,
    /// Most QUIC connections per worker.
    pub max_connections_per_worker: u32,
    /// Most tunnels per QUIC connection.
    pub max_tunnels_per_connection: u32,
    /// On SIGTERM the dataplane sends GOAWAY, stops accepting, and lets open
    /// tunnels finish for at most this long before closing and exiting 0.
    pub drain_timeout_secs: u32,
    /// Handshakes in progress per worker past which new clients must prove
    /// their address with a Retry round trip (0: always).
    pub retry_threshold: u32,
}

impl Default for DataplaneSection {
    fn default() -> Self {
        Self {
            workers: Workers::Auto,
            io: IoBackend::Auto,
            pin_workers: true,
            wait_batch_us: 0,
            connection_ids: ConnectionIdSection::default(),
            uri_template: TemplateValue(
                UriTemplate::parse(DEFAULT_UDP_TEMPLATE).expect("the default template is valid"),
            ),
            flow_idle_timeout_secs: 120,
            ask_timeout_ms: 2000,
            quic_idle_timeout_secs: 30,
            max_connections_per_worker: 10_000,
            max_tunnels_per_connection: 256,
            drain_timeout_secs: 30,
            retry_threshold: 1024,
        }
    }
}

/// `dataplane.workers`: a count or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One per usable CPU.
    #[default]
    Auto,
    /// Exactly this many.
    Count(u32),
}

impl Workers {
    /// The number of workers to run on this host.
    pub fn resolve(self) -> u32 {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism()
                .map_or(1, |n| n.get() as u32)
                .min(relay_channel::region::MAX_WORKERS),
        }
    }
}

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "auto" => Ok(Workers::Auto),
            Raw::Count(n) if (1..=i64::from(relay_channel::region::MAX_WORKERS)).contains(&n) => {
                Ok(Workers::Count(n as u32))
            }
            _ => Err(serde::de::Error::custom(format!(
                "dataplane.workers must be \"auto\" or 1..={}",
                relay_channel::region::MAX_WORKERS
            ))),
        }
    }
}

/// `dataplane.io`: which I/O backend the workers use (the Bootstrap's
/// own type: `"auto"`, `"io_uring"` or `"epoll"`).
pub use relay_proto::channel::bootstrap::IoBackend;

/// `[dataplane.connection_ids]`: server connection IDs in the QUIC-LB
/// plaintext layout (draft-ietf-quic-load-balancers): config rotation bits,
/// the server ID (this host's prefix, then the worker), a random nonce.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionIdSection {
    /// Config rotation codepoint, 0..=6 (7 means unroutable).
    pub config_id: u8,
    /// This host's server ID prefix as hex (empty for a single host; a
    /// QUIC-LB balancer maps prefix + worker byte to this host).
    pub server_id: String,
    /// Random nonce bytes after the server ID.
    pub nonce_len: usize,
    /// Attach a reuseport BPF program that steers packets to the worker
    /// named in their connection ID (hand-offs between workers become rare;
    /// plaintext connection IDs only).
    pub steering: bool,
    /// A file holding the QUIC-LB key (32 hex digits, the load balancers'
    /// key too): connection IDs are encrypted (draft-ietf-quic-load-
    /// balancers-21 section 5.4), so observers cannot tell which host and
    /// worker serve a connection. Needs a `server_id`.
    pub key_file: Option<PathBuf>,
}

impl Default for ConnectionIdSection {
    fn default() -> Self {
        Self { config_id: 0, server_id: String::new(), nonce_len: 14, steering: true, key_file: None }
    }
}

impl ConnectionIdSection {
    /// The settings the dataplane gets: the key file read and the layout
    /// checked. Errors name the key.
    pub fn settings(&self) -> Result<relay_proto::channel::bootstrap::CidSettings, String> {
        let host_id = parse_hex(&self.server_id).ok_or_else(|| {
            format!("dataplane.connection_ids.server_id must be hex bytes, not {:?}", self.server_id)
        })?;
        let key = match &self.key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("dataplane.connection_ids.key_file = {}: {e}", path.display()))?;
                let bytes = parse_hex(text.trim()).filter(|b| b.len() == 16).ok_or_else(|| {
                    format!(
                        "dataplane.connection_ids.key_file = {}: must hold a 16-byte key as 32 hex digits (`openssl rand -hex 16`)",
                        path.display()
                    )
                })?;
                let mut key = [0u8; 16];
                key.copy_from_slice(&bytes);
                Some(key)
            }
        };
        let settings = relay_proto::channel::bootstrap::CidSettings {
            config_id: self.config_id,
            host_id,
            random_len: self.nonce_len,
            key,
        };
        settings.layout().map_err(|e| format!("dataplane.connection_ids: {e}"))?;
        Ok(settings)
    }
}

/// Most `[[auth.mtls.identities]]` rules.
pub const MAX_CERT_RULES: usize = 1024;

/// `[auth.mtls]` holds usable values (the files are read at start).
fn check_mtls(m: &MtlsSection) -> Result<(), String> {
    use relay_proto::channel::bootstrap::ClientAuthMode;
    if m.mode != ClientAuthMode::Off && m.ca_files.is_empty() {
        return Err("auth.mtls.mode asks for client certificates: list auth.mtls.ca_files".into());
    }
    if m.identities.len() > MAX_CERT_RULES {
        return Err(format!("auth.mtls.identities: at most {MAX_CERT_RULES} rules"));
    }
    for rule in &m.identities {
        crate::mtls::rules::check_rule(rule).map_err(|e| format!("auth.mtls.identities: {e}"))?;
    }
    Ok(())
}

/// `[auth] schemes` and `[auth.privacy_pass]` agree and hold usable values.
fn check_auth_schemes(auth: &AuthSection) -> Result<(), String> {
    use crate::privacy_pass::wire::{MAX_NAMES_LEN, valid_name};
    if auth.schemes.is_empty() {
        return Err("auth.schemes must list at least one of \"bearer\", \"private_token\"".into());
    }
    if auth.schemes.iter().enumerate().any(|(i, s)| auth.schemes[..i].contains(s)) {
        return Err("auth.schemes lists a scheme twice".into());
    }
    let private_token = auth.schemes.contains(&AuthScheme::PrivateToken);
    let Some(pp) = &auth.privacy_pass else {
        if private_token {
            return Err("auth.schemes has \"private_token\": configure [auth.privacy_pass]".into());
        }
        return Ok(());
    };
    if !private_token {
        return Err("[auth.privacy_pass] is set but auth.schemes does not list \"private_token\"".into());
    }
    if !valid_name(&pp.issuer_name) {
        return Err(format!(
            "auth.privacy_pass.issuer_name {:?} must be visible ASCII without ',' or '\"'",
            pp.issuer_name
        ));
    }
    if let Some(o) = pp.origin_info.iter().find(|o| !valid_name(o)) {
        return Err(format!(
            "auth.privacy_pass.origin_info entry {o:?} must be visible ASCII without ',' or '\"'"
        ));
    }
    let names = pp.issuer_name.len() + pp.origin_info.iter().map(|o| o.len() + 1).sum::<usize>();
    if names > MAX_NAMES_LEN {
        return Err(format!(
            "auth.privacy_pass: issuer_name and origin_info together must be at most {MAX_NAMES_LEN} bytes (challenges must fit a channel record)"
        ));
    }
    if pp.redemption_window_secs != 0 && !(60..=7 * 86_400).contains(&pp.redemption_window_secs) {
        return Err(format!(
            "auth.privacy_pass.redemption_window_secs must be 0 or 60..=604800, not {}",
            pp.redemption_window_secs
        ));
    }
    if !(1..=100_000_000).contains(&pp.max_spent_tokens) {
        return Err(format!(
            "auth.privacy_pass.max_spent_tokens must be 1..=100000000, not {}",
            pp.max_spent_tokens
        ));
    }
    if !(10..=86_400).contains(&pp.directory_refresh_secs) {
        return Err(format!(
            "auth.privacy_pass.directory_refresh_secs must be 10..=86400, not {}",
            pp.directory_refresh_secs
        ));
    }
    if pp.directory_file.is_some() && pp.directory_url.is_some() {
        return Err("auth.privacy_pass: give at most one of directory_file or directory_url".into());
    }
    if let Some(url) = &pp.directory_url
        && !url.starts_with("https://")
    {
        return Err(format!("auth.privacy_pass.directory_url must be an https:// URL, not {url:?}"));
    }
    if pp.keys.is_empty() && pp.directory_file.is_none() && pp.directory_url.is_none() {
        return Err(
            "auth.privacy_pass: give [[auth.privacy_pass.keys]], a directory_file or a directory_url".into(),
        );
    }
    if pp.keys.len() > crate::privacy_pass::MAX_KEYS {
        return Err(format!("auth.privacy_pass: at most {} keys", crate::privacy_pass::MAX_KEYS));
    }
    for (i, k) in pp.keys.iter().enumerate() {
        let name = format!("auth.privacy_pass.keys[{i}]");
        match (k.token_type, &k.public_key_file, &k.private_key_file) {
            (2, Some(_), None) | (1, None, Some(_)) => {}
            (2, _, _) => {
                return Err(format!("{name}: token_type 2 needs public_key_file (and no private_key_file)"));
            }
            (1, _, _) => {
                return Err(format!("{name}: token_type 1 needs private_key_file (and no public_key_file)"));
            }
            (t, _, _) => return Err(format!("{name}: token_type must be 1 or 2, not {t}")),
        }
        if let (Some(b), Some(a)) = (k.not_before, k.not_after)
            && b >= a
        {
            return Err(format!("{name}: not_before must be before not_after"));
        }
    }
    Ok(())
}

/// Refuses TCP listeners that would collide: the cleartext listener on the
/// TLS listener's address, or either on the metrics endpoint's. Port 0
/// (an ephemeral port for each socket) never collides.
fn check_tcp_listeners(listen: &ListenSection, text: &str) -> Result<(), String> {
    let tls = listen.tcp_tls().filter(|a| a.port() != 0);
    let tls_where = match &listen.tcp {
        Some(s) => format!("listen.tcp (line {})", line_of(text, s.span().start)),
        None => "listen.tcp (absent: the address of listen.quic)".to_string(),
    };
    let cleartext = listen.tcp_cleartext.as_ref().and_then(|s| {
        let addr = s.get_ref().0.filter(|a| a.port() != 0)?;
        Some((addr, format!("listen.tcp_cleartext (line {})", line_of(text, s.span().start))))
    });
    if let (Some(tls), Some((addr, clear_where))) = (tls, &cleartext)
        && tls == *addr
    {
        return Err(format!(
            "{clear_where} = \"{addr}\" is also {tls_where}: the cleartext listener needs an address \
             of its own (or set listen.tcp = \"\" to serve cleartext only)"
        ));
    }
    if let Some(metrics) = listen.metrics.filter(|a| a.port() != 0) {
        let tls = tls.map(|a| (a, tls_where));
        for (addr, at) in tls.iter().chain(&cleartext) {
            if *addr == metrics {
                return Err(format!("{at} = \"{addr}\" is also listen.metrics"));
            }
        }
    }
    Ok(())
}

/// The 1-based line of byte offset `pos` in `text`.
pub fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// Parses a hex string (even length).
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Names for the generated self-signed certificate.
    pub self_signed_names: Vec<String>,
    /// Keyless TLS: the private key never leaves control, which signs every
    /// handshake for the dataplane. `false` hands the key to the dataplane
    /// (it then signs locally): only for hosts where both processes are
    /// equally trusted.
    pub keyless: bool,
    /// Issue TLS 1.3 session tickets (resumed handshakes need no
    /// signature), sealed with keys control generates and rotates.
    pub session_tickets: bool,
    /// How often the ticket keys rotate (60..=604800 s). A ticket resumes
    /// for at least one period and at most two.
    pub ticket_key_rotation_secs: u32,
}

fn twelve_hours() -> u32 {
    12 * 3600
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            self_signed_names: ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec(),
            keyless: true,
            session_tickets: true,
            ticket_key_rotation_secs: twelve_hours(),
        }
    }
}

impl TlsSection {
    /// The ticket key rotation period, or `None` without session tickets.
    pub fn ticket_rotation(&self) -> Option<std::time::Duration> {
        self.session_tickets.then(|| std::time::Duration::from_secs(u64::from(self.ticket_key_rotation_secs)))
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Realm in Proxy-Authenticate challenges.
    pub realm: String,
    /// Accepted static bearer tokens. With neither tokens nor hmac_keys, a
    /// token is generated into state_dir/token.
    #[serde(serialize_with = "redacted_list")]
    pub tokens: Vec<SecretString>,
    /// Keys for HMAC-signed expiring tokens (`[[auth.hmac_keys]]`); the
    /// first one mints unless `relayctl token mint --key-id` says otherwise.
    pub hmac_keys: Vec<HmacKeyConfig>,
    /// The credential schemes accepted: `bearer` (static and HMAC tokens)
    /// and `private_token` (Privacy Pass, RFC 9577: needs
    /// `[auth.privacy_pass]`). A 407 challenges with each.
    #[serde(default = "bearer_only")]
    pub schemes: Vec<AuthScheme>,
    /// Privacy Pass (`[auth.privacy_pass]`).
    #[serde(default)]
    pub privacy_pass: Option<PrivacyPassSection>,
    /// Client certificates (mutual TLS, `[auth.mtls]`).
    pub mtls: MtlsSection,
}

/// `[auth.mtls]`: client certificates verified against CA bundles, mapped
/// to identities by rules, checked against revocation lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtlsSection {
    /// `off` (no certificate asked for), `optional` (a certificate is one
    /// more credential beside tokens) or `required` (the handshake fails
    /// without one).
    pub mode: relay_proto::channel::bootstrap::ClientAuthMode,
    /// PEM files of the CA certificates client certificates must chain to
    /// (at most 32 KiB together).
    pub ca_files: Vec<PathBuf>,
    /// Certificate revocation lists (DER, or PEM with one or more `X509
    /// CRL` blocks), each signed by one of the CAs; re-read on `relayctl
    /// reload`.
    pub crl_files: Vec<PathBuf>,
    /// Rules mapping a certificate to an identity (`[[auth.mtls.identities]]`),
    /// the first that matches wins; a certificate no rule maps is refused.
    pub identities: Vec<CertIdentityRule>,
}

/// Which name of a client certificate a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertField {
    /// The subject's common name (exact, case-sensitive).
    SubjectCn,
    /// A subjectAltName dNSName (ASCII case-insensitive).
    SanDns,
    /// A subjectAltName URI (exact, case-sensitive).
    SanUri,
}

/// One `[[auth.mtls.identities]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertIdentityRule {
    /// The identity a matching certificate gets (quotas: `cert:<name>`;
    /// `relayctl token revoke --subject <name>` refuses it), as a token
    /// subject: `[A-Za-z0-9._~-]{1,64}`.
    pub name: String,
    /// The certificate name looked at.
    pub field: CertField,
    /// The name must be exactly this.
    #[serde(default)]
    pub equals: Option<String>,
    /// The name must end with this (`.example.com` matches subdomains).
    #[serde(default)]
    pub suffix: Option<String>,
}

fn bearer_only() -> Vec<AuthScheme> {
    vec![AuthScheme::Bearer]
}

/// A credential scheme of `Proxy-Authorization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthScheme {
    /// `Bearer <token>`: static and HMAC-signed tokens.
    Bearer,
    /// `PrivateToken token=...`: Privacy Pass (RFC 9577).
    PrivateToken,
}

/// `[auth.privacy_pass]`: the issuer the relay accepts tokens of, and how.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPassSection {
    /// The issuer's name in challenges (its host name, RFC 9577 section
    /// 2.1).
    pub issuer_name: String,
    /// The relay's origin names in challenges (section 2.1); empty:
    /// tokens of the issuer for any origin.
    #[serde(default)]
    pub origin_info: Vec<String>,
    /// Challenges carry a redemption context bound to windows of this
    /// many seconds, and tokens for the current or previous window are
    /// accepted (60..=604800); 0: the empty context (tokens redeemable
    /// while their key is in force).
    #[serde(default = "one_hour")]
    pub redemption_window_secs: u64,
    /// Bound of the spent-token store (about 75 bytes each).
    #[serde(default = "million")]
    pub max_spent_tokens: usize,
    /// The issuer's directory (RFC 9578 section 4) as a file, read at start
    /// and every `directory_refresh_secs`.
    #[serde(default)]
    pub directory_file: Option<PathBuf>,
    /// The issuer's directory at an `https://` URL, fetched at start and
    /// every `directory_refresh_secs`.
    #[serde(default)]
    pub directory_url: Option<String>,
    /// PEM CA certificates to verify `directory_url` with instead of the
    /// system's trust roots.
    #[serde(default)]
    pub directory_ca_file: Option<PathBuf>,
    /// How often the directory is read again (10..=86400).
    #[serde(default = "five_minutes")]
    pub directory_refresh_secs: u64,
    /// Keys from files (`[[auth.privacy_pass.keys]]`).
    #[serde(default)]
    pub keys: Vec<PrivacyPassKeyConfig>,
}

fn one_hour() -> u64 {
    3600
}

fn million() -> usize {
    crate::privacy_pass::DEFAULT_MAX_SPENT
}

fn five_minutes() -> u64 {
    300
}

/// One `[[auth.privacy_pass.keys]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPassKeyConfig {
    /// 2 (Blind RSA, publicly verifiable) or 1 (VOPRF P-384, privately
    /// verifiable).
    pub token_type: u16,
    /// Type 2: the issuer's public key, a SubjectPublicKeyInfo with the
    /// id-RSASSA-PSS OID (RFC 9578 section 6.5), as DER, PEM or base64url
    /// text (the directory's `token-key`).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Type 1: the issuer's private key (the P-384 scalar as hex); must not
    /// be readable by every user.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// Unix seconds from which the key is in force (default: now).
    #[serde(default)]
    pub not_before: Option<u64>,
    /// Unix seconds from which its tokens are refused as expired.
    #[serde(default)]
    pub not_after: Option<u64>,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            realm: default_name(),
            tokens: Vec::new(),
            hmac_keys: Vec::new(),
            schemes: bearer_only(),
            privacy_pass: None,
            mtls: MtlsSection::default(),
        }
    }
}

/// What [`Config::effective_toml`] writes in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// Secrets are never written out: each one becomes [`REDACTED`].
fn redacted_list<S: serde::Serializer>(secrets: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(secrets.iter().map(|_| REDACTED))
}

fn redacted<S: serde::Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_none(),
    }
}

/// One `[[auth.hmac_keys]]` entry: an ID and exactly one of `secret_file`
/// (a file holding the secret as hex) or `secret_hex`. Secrets are at least
/// 32 bytes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKeyConfig {
    /// Key ID, named in tokens (`A-Z a-z 0-9 - _`, at most 32).
    pub id: Spanned<String>,
    /// File with the secret as hex (whitespace around it ignored); must not
    /// be readable by every user.
    pub secret_file: Option<PathBuf>,
    /// The secret as hex, inline.
    #[serde(serialize_with = "redacted", skip_serializing_if = "Option::is_none")]
    pub secret_hex: Option<SecretString>,
    /// The line of `id` in the config file (filled in by [`Config::parse`]).
    #[serde(skip)]
    pub line: usize,
}

/// `[protocols]`: which tunnel protocols the relay serves: the extended
/// CONNECT protocols (`:protocol` values) and classic CONNECT to TCP
/// targets. Control refuses a disabled one with 501.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, try_from = "RawProtocols")]
pub struct ProtocolsSection {
    /// connect-udp (RFC 9298).
    pub connect_udp: bool,
    /// connect-ip (RFC 9484): needs `[connect_ip]` pools.
    pub connect_ip: bool,
    /// Bound connect-udp (draft-ietf-masque-connect-udp-listen), see `[bind]`.
    pub bind: bool,
    /// Classic CONNECT to a TCP target (RFC 9110 section 9.3.6, RFC 9114
    /// section 4.4), over every HTTP version.
    pub connect_tcp: bool,
}

impl Default for ProtocolsSection {
    fn default() -> Self {
        Self { connect_udp: true, connect_ip: false, bind: false, connect_tcp: true }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProtocols {
    connect_udp: bool,
    connect_ip: bool,
    bind: bool,
    connect_tcp: bool,
}

impl Default for RawProtocols {
    fn default() -> Self {
        let d = ProtocolsSection::default();
        Self {
            connect_udp: d.connect_udp,
            connect_ip: d.connect_ip,
            bind: d.bind,
            connect_tcp: d.connect_tcp,
        }
    }
}

impl TryFrom<RawProtocols> for ProtocolsSection {
    type Error = String;

    fn try_from(r: RawProtocols) -> Result<Self, String> {
        Ok(Self {
            connect_udp: r.connect_udp,
            connect_ip: r.connect_ip,
            bind: r.bind,
            connect_tcp: r.connect_tcp,
        })
    }
}

impl ProtocolsSection {
    /// The extended CONNECT protocols served, as the dataplane's Bootstrap
    /// lists them (empty: every extended CONNECT is refused). Classic
    /// CONNECT has no `:protocol`, so `connect_tcp` is not among them:
    /// control answers a disabled one with 501.
    pub fn served(&self) -> Vec<Protocol> {
        let mut out = Vec::new();
        if self.connect_udp {
            out.push(Protocol::ConnectUdp);
        }
        if self.connect_ip {
            out.push(Protocol::ConnectIp);
        }
        if self.bind {
            out.push(Protocol::ConnectUdpBind);
        }
        out
    }
}

/// Most `[[upstreams]]` routes (an ask tries them in order).
pub const MAX_UPSTREAMS: usize = 256;

/// Longest `upstreams.idle_timeout_secs` (a day).
pub const MAX_UPSTREAM_IDLE_SECS: u32 = 86_400;

/// The protocol a `[[upstreams]]` route serves: the `:protocol` (RFC 8441,
/// RFC 9220, draft-ietf-webtrans-http3) or `Upgrade` (RFC 6455) token of
/// the requests it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// `websocket`: relayed to a `ws://` or `wss://` origin as an HTTP/1.1
    /// Upgrade.
    #[default]
    Websocket,
    /// `webtransport` (HTTP/3 only): relayed to an `https://` origin as a
    /// WebTransport session over HTTP/3 (QUIC, so always TLS).
    Webtransport,
}

impl UpstreamProtocol {
    /// The token as the config and the requests write it.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Websocket => "websocket",
            UpstreamProtocol::Webtransport => "webtransport",
        }
    }

    /// The origin forms a route of this protocol takes (for errors).
    fn origin_forms(self) -> &'static str {
        match self {
            UpstreamProtocol::Websocket => "ws://host[:port] or wss://host[:port]",
            UpstreamProtocol::Webtransport => "https://host[:port]",
        }
    }
}

/// Who may use a `[[upstreams]]` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuth {
    /// `relay`: the relay's credentials, as for tunnels (bearer tokens,
    /// Privacy Pass, client certificates; 407 with challenges).
    #[default]
    Relay,
    /// `public`: no credentials asked for; quotas count per client address.
    Public,
}

/// Where a `wss://` or `https://` origin's certificate is checked by
/// default: Debian's system bundle.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The scheme of a route's `origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OriginScheme {
    /// `ws://`: WebSocket over cleartext TCP (port 80 by default).
    Ws,
    /// `wss://`: WebSocket over TLS (port 443 by default).
    Wss,
    /// `https://`: WebTransport over HTTP/3, QUIC on UDP (port 443 by
    /// default).
    Https,
}

impl OriginScheme {
    /// The scheme as written, without `://`.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginScheme::Ws => "ws",
            OriginScheme::Wss => "wss",
            OriginScheme::Https => "https",
        }
    }

    /// The protocol whose routes take origins of this scheme.
    pub fn protocol(self) -> UpstreamProtocol {
        match self {
            OriginScheme::Ws | OriginScheme::Wss => UpstreamProtocol::Websocket,
            OriginScheme::Https => UpstreamProtocol::Webtransport,
        }
    }
}

/// A route's `origin`: `ws://host[:port]` (port 80 when not written),
/// `wss://host[:port]` (TLS to the origin, port 443 when not written) or
/// `https://host[:port]` (HTTP/3 to the origin, UDP port 443 when not
/// written), no path, query, fragment or userinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamOrigin {
    /// `ws://`, `wss://` or `https://`.
    pub scheme: OriginScheme,
    /// TLS to the origin, its certificate verified: `wss://` (over TCP)
    /// and `https://` (QUIC, always TLS).
    pub tls: bool,
    /// An IP literal or a DNS name (lowercased; resolved by control's
    /// resolver for every ask).
    pub host: TargetHost,
    /// The port: TCP for `ws://` and `wss://`, UDP for `https://`.
    pub port: u16,
    /// `host[:port]` as written: the `Host` sent upstream unless the route
    /// sets `host_header`.
    pub authority: String,
}

impl UpstreamOrigin {
    /// Parses `ws://host[:port]`, `wss://host[:port]` or
    /// `https://host[:port]`; the error says what is wrong. Which scheme
    /// a route takes is its protocol's ([`OriginScheme::protocol`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (scheme, authority) = [OriginScheme::Ws, OriginScheme::Wss, OriginScheme::Https]
            .into_iter()
            .find_map(|s| Some((s, text.strip_prefix(s.as_str())?.strip_prefix("://")?)))
            .ok_or_else(|| {
                format!("{text:?} is not ws://host[:port], wss://host[:port] or https://host[:port]")
            })?;
        let tls = scheme != OriginScheme::Ws;
        let form = match scheme {
            OriginScheme::Ws => "ws://host[:port]",
            OriginScheme::Wss => "wss://host[:port]",
            OriginScheme::Https => "https://host[:port]",
        };
        if authority.contains(['/', '?', '#']) {
            return Err(format!("{text:?} must be {form} without a path, query or fragment"));
        }
        if authority.contains('@') {
            return Err(format!("{text:?} must be {form} without userinfo"));
        }
        let (host, port) = if authority.starts_with('[') {
            let end = authority.find(']').ok_or_else(|| format!("{text:?}: unclosed '['"))?;
            let (host, after) = authority.split_at(end + 1);
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("{text:?} is not {form}")),
                },
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => relay_proto::target::parse_port(p)
                .map_err(|_| format!("{text:?}: the port must be 1..=65535"))?,
        };
        let host = TargetHost::parse(host)
            .map_err(|_| format!("{text:?}: the host must be an IP literal or a DNS name"))?;
        Ok(Self { scheme, tls, host, port, authority: authority.to_string() })
    }

    /// The name a `wss://` or `https://` origin's certificate is checked against by
    /// default: its host (an IP literal without brackets).
    pub fn default_server_name(&self) -> String {
        match &self.host {
            TargetHost::Ip(ip) => ip.to_string(),
            TargetHost::Name(name) => name.clone(),
        }
    }
}

impl std::fmt::Display for UpstreamOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority)
    }
}

impl Serialize for UpstreamOrigin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses a route's `origin_server_name`: a DNS name (lowercased, no
/// trailing dot) or an IP literal (IPv6 with or without brackets); the
/// result is what SNI and the certificate check use (IPv6 unbracketed).
pub fn parse_server_name(text: &str) -> Result<String, String> {
    match TargetHost::parse(text) {
        Ok(TargetHost::Ip(ip)) => Ok(ip.to_string()),
        Ok(TargetHost::Name(name)) if name == text => Ok(name),
        Ok(TargetHost::Name(_)) => {
            Err(format!("{text:?} must be written in lowercase, without a trailing dot"))
        }
        Err(_) => Err(format!("{text:?} is neither a DNS name nor an IP literal")),
    }
}

/// Reads a PEM file of CA certificates: at least one certificate, all of
/// them parsing; the error names the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<boring::x509::X509>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = boring::x509::X509::stack_from_pem(&pem)
        .map_err(|e| format!("{}: not PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// An entry of a route's `hosts`: a lowercase DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHost(pub TargetHost);

impl UpstreamHost {
    /// Parses an entry: an IP literal (IPv6 bare or in brackets) or a DNS
    /// name written in lowercase without a trailing dot.
    pub fn parse(text: &str) -> Result<Self, String> {
        match TargetHost::parse(text) {
            Ok(TargetHost::Name(name)) if name != text => {
                Err(format!("{text:?} must be written in lowercase, without a trailing dot"))
            }
            Ok(host) => Ok(Self(host)),
            Err(_) => Err(format!("{text:?} is neither a DNS name nor an IP literal")),
        }
    }
}

impl Serialize for UpstreamHost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// One `[[upstreams]]` route: requests for `protocol` whose host is one of
/// `hosts` (any when empty) and whose path starts with `path_prefix` are
/// relayed to `origin`. Every value is checked as it is read; errors name
/// the route and the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "RawUpstreamRoute")]
pub struct UpstreamRoute {
    /// 1..=32 bytes of `a-z 0-9 _ -`, unique among routes (shown with the
    /// route's flows).
    pub name: String,
    /// The protocol served.
    pub protocol: UpstreamProtocol,
    /// The request's host (`:authority`/`Host`, port ignored, ASCII
    /// case-insensitive) must be one of these; empty: any.
    pub hosts: Vec<UpstreamHost>,
    /// The request path (before `?`) must start with this; starts with `/`.
    pub path_prefix: String,
    /// Where the requests go.
    pub origin: UpstreamOrigin,
    /// The upstream path is this plus the request path less `path_prefix`
    /// (query kept); `None`: the request path unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// The `Host` sent upstream; `None`: the origin's authority as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_header: Option<String>,
    /// Which credentials the route asks for.
    pub auth: UpstreamAuth,
    /// The origin's addresses skip the `[targets]` policy (an application
    /// the operator runs on loopback or a private network); quotas apply.
    pub trusted_origin: bool,
    /// A flow idle this long is closed (0..=86400 s; 0: the relay's
    /// `dataplane.flow_idle_timeout_secs`).
    pub idle_timeout_secs: u32,
    /// `wss://` and `https://` only: the PEM file of the CAs the origin's
    /// certificate must chain to ([`SYSTEM_CA_FILE`] when not written);
    /// `None` for `ws://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_ca_file: Option<PathBuf>,
    /// `wss://` and `https://` only: the name sent as SNI and verified in
    /// the origin's certificate (the origin's host when not written);
    /// `None` for `ws://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_server_name: Option<String>,
    /// WebSocket routes: HTTP/1.1 Upgrade (default), HTTP/2 extended
    /// CONNECT (RFC 8441), or `auto` by ALPN (`wss://` only).
    #[serde(skip_serializing_if = "is_http1")]
    pub origin_http: relay_proto::channel::bootstrap::OriginHttp,
    /// Byte offset of `name` in the config text (to name lines in errors).
    #[serde(skip)]
    pub name_offset: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamRoute {
    name: Spanned<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    path_prefix: String,
    origin: String,
    #[serde(default)]
    prefix_rewrite: Option<String>,
    #[serde(default)]
    host_header: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    trusted_origin: bool,
    #[serde(default)]
    idle_timeout_secs: i64,
    #[serde(default)]
    origin_ca_file: Option<PathBuf>,
    #[serde(default)]
    origin_server_name: Option<String>,
    #[serde(default)]
    origin_http: Option<String>,
}

/// Whether a route's `origin_http` is the default (left out of the
/// effective config, which webtransport routes must not carry).
fn is_http1(h: &relay_proto::channel::bootstrap::OriginHttp) -> bool {
    *h == relay_proto::channel::bootstrap::OriginHttp::Http1
}

/// A route's `origin_http`: `http/1.1` (the default), `h2`, or `auto` on
/// `wss://`; WebSocket routes only (WebTransport's origins speak HTTP/3).
fn parse_origin_http(
    text: Option<&str>,
    protocol: UpstreamProtocol,
    origin: &UpstreamOrigin,
) -> Result<relay_proto::channel::bootstrap::OriginHttp, String> {
    use relay_proto::channel::bootstrap::OriginHttp;
    let Some(text) = text else { return Ok(OriginHttp::Http1) };
    if protocol != UpstreamProtocol::Websocket {
        return Err(format!(
            "origin_http applies to websocket routes only (the route's protocol is {})",
            protocol.as_str()
        ));
    }
    match text {
        "http/1.1" => Ok(OriginHttp::Http1),
        "h2" => Ok(OriginHttp::H2),
        "auto" if origin.tls => Ok(OriginHttp::Auto),
        "auto" => Err(format!(
            "origin_http \"auto\" chooses by ALPN and needs a wss:// origin (the origin is {origin}); use \"h2\" for HTTP/2 with prior knowledge"
        )),
        other => Err(format!("origin_http must be \"http/1.1\", \"h2\" or \"auto\", not {other:?}")),
    }
}

/// Why `path` cannot be a `path_prefix` or `prefix_rewrite`: it must start
/// with `/` and hold visible ASCII other than `?` and `#`.
fn route_path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        Some("must start with '/'")
    } else if !relay_proto::channel::record::valid_upstream_path(path) || path.contains('?') {
        Some("must be visible ASCII without '?' or '#', at most 1536 bytes")
    } else {
        None
    }
}

impl TryFrom<RawUpstreamRoute> for UpstreamRoute {
    type Error = String;

    fn try_from(r: RawUpstreamRoute) -> Result<Self, String> {
        use relay_proto::channel::record::{valid_route_name, valid_upstream_host};
        let name_offset = r.name.span().start;
        let name = r.name.into_inner();
        if !valid_route_name(&name) {
            return Err(format!("upstreams: name must be 1..=32 bytes of a-z 0-9 _ -, not {name:?}"));
        }
        let at = format!("upstreams route {name:?}");
        let protocol = match r.protocol.as_deref() {
            None | Some("websocket") => UpstreamProtocol::Websocket,
            Some("webtransport") => UpstreamProtocol::Webtransport,
            Some(other) => {
                return Err(format!(
                    "{at}: protocol must be \"websocket\" or \"webtransport\", not {other:?}"
                ));
            }
        };
        let auth = match r.auth.as_deref() {
            None | Some("relay") => UpstreamAuth::Relay,
            Some("public") => UpstreamAuth::Public,
            Some(other) => return Err(format!("{at}: auth must be \"relay\" or \"public\", not {other:?}")),
        };
        let hosts = r
            .hosts
            .iter()
            .map(|h| UpstreamHost::parse(h).map_err(|e| format!("{at}: hosts entry {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(why) = route_path_problem(&r.path_prefix) {
            return Err(format!("{at}: path_prefix {why}, not {:?}", r.path_prefix));
        }
        if let Some(rewrite) = &r.prefix_rewrite
            && let Some(why) = route_path_problem(rewrite)
        {
            return Err(format!("{at}: prefix_rewrite {why}, not {rewrite:?}"));
        }
        let origin = UpstreamOrigin::parse(&r.origin).map_err(|e| format!("{at}: origin {e}"))?;
        if origin.scheme.protocol() != protocol {
            let hint = match (protocol, r.protocol.is_none()) {
                (UpstreamProtocol::Websocket, true) => {
                    " (protocol is \"websocket\" when not written; set protocol = \"webtransport\" for an https:// origin)"
                }
                (UpstreamProtocol::Webtransport, _) => " (WebTransport reaches its origins over HTTP/3)",
                _ => "",
            };
            return Err(format!(
                "{at}: origin {:?}: a {} route's origin must be {}{hint}",
                r.origin,
                protocol.as_str(),
                protocol.origin_forms()
            ));
        }
        match &r.host_header {
            Some(h) if !valid_upstream_host(h) => {
                return Err(format!(
                    "{at}: host_header must be 1..=255 bytes of visible ASCII without '@', '/', '?', '#' or '\\\\', not {h:?}"
                ));
            }
            None if !valid_upstream_host(&origin.authority) => {
                return Err(format!(
                    "{at}: origin's authority {:?} cannot be sent as Host (longer than 255 bytes): set host_header",
                    origin.authority
                ));
            }
            _ => {}
        }
        let idle_timeout_secs =
            u32::try_from(r.idle_timeout_secs).ok().filter(|s| *s <= MAX_UPSTREAM_IDLE_SECS).ok_or_else(
                || format!("{at}: idle_timeout_secs must be 0..=86400, not {}", r.idle_timeout_secs),
            )?;
        let (origin_ca_file, origin_server_name) = if origin.tls {
            let ca = r.origin_ca_file.unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
            if ca.as_os_str().is_empty()
                || ca.as_os_str().len() > relay_proto::channel::bootstrap::MAX_CA_FILE_PATH
            {
                return Err(format!("{at}: origin_ca_file must be a path of 1..=1024 bytes"));
            }
            let name = match r.origin_server_name {
                Some(n) => parse_server_name(&n).map_err(|e| format!("{at}: origin_server_name {e}"))?,
                None => origin.default_server_name(),
            };
            (Some(ca), Some(name))
        } else {
            for (key, set) in [
                ("origin_ca_file", r.origin_ca_file.is_some()),
                ("origin_server_name", r.origin_server_name.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{at}: {key} applies to wss:// and https:// origins only (the origin is {origin})"
                    ));
                }
            }
            (None, None)
        };
        let origin_http = parse_origin_http(r.origin_http.as_deref(), protocol, &origin)
            .map_err(|e| format!("{at}: {e}"))?;
        Ok(Self {
            name,
            protocol,
            hosts,
            path_prefix: r.path_prefix,
            origin,
            prefix_rewrite: r.prefix_rewrite,
            host_header: r.host_header,
            auth,
            trusted_origin: r.trusted_origin,
            idle_timeout_secs,
            origin_ca_file,
            origin_server_name,
            origin_http,
            name_offset,
        })
    }
}

/// `tcp.alt_svc`: the Alt-Svc field value (RFC 7838) of responses over TCP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AltSvc {
    /// `"auto"`: `h3=":<port of listen.quic>"; ma=86400`.
    #[default]
    Auto,
    /// `""`: not sent.
    Off,
    /// Sent as given (a checked field value).
    Value(String),
}

/// Longest `tcp.alt_svc` value accepted.
pub const MAX_ALT_SVC: usize = 512;

impl AltSvc {
    /// The field value to send, for a QUIC listener on `quic_port`
    /// (`None`: not sent; `"auto"` with QUIC on port 0, an ephemeral port
    /// control cannot know, is not sent either).
    pub fn value(&self, quic_port: u16) -> Option<String> {
        match self {
            AltSvc::Auto if quic_port == 0 => None,
            AltSvc::Auto => Some(format!("h3=\":{quic_port}\"; ma=86400")),
            AltSvc::Off => None,
            AltSvc::Value(v) => Some(v.clone()),
        }
    }
}

/// Why `v` is not a field value we send: visible ASCII and spaces only,
/// no leading or trailing space (RFC 9110 section 5.5), at most
/// [`MAX_ALT_SVC`] bytes.
fn field_value_problem(v: &str) -> Option<&'static str> {
    if v.len() > MAX_ALT_SVC {
        Some("is longer than 512 bytes")
    } else if !v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        Some(
            "may hold only visible ASCII characters and spaces (no tabs, CR, LF or other control characters)",
        )
    } else if v.starts_with(' ') || v.ends_with(' ') {
        Some("must not start or end with a space")
    } else {
        None
    }
}

impl Serialize for AltSvc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AltSvc::Auto => s.serialize_str("auto"),
            AltSvc::Off => s.serialize_str(""),
            AltSvc::Value(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for AltSvc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        match v.as_str() {
            "auto" => Ok(AltSvc::Auto),
            "" => Ok(AltSvc::Off),
            _ => match field_value_problem(&v) {
                None => Ok(AltSvc::Value(v)),
                Some(why) => Err(serde::de::Error::custom(format!(
                    "tcp.alt_svc {why}: give \"auto\", \"\" (not sent) or a valid Alt-Svc field value"
                ))),
            },
        }
    }
}

/// `[tcp]`: the TCP front (HTTP/2 and HTTP/1.1 over TCP). Every value is
/// range-checked as it is read, so errors carry the key and its line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpSection {
    /// Alt-Svc field value sent on every response over TCP.
    pub alt_svc: AltSvc,
    /// Most TCP connections per worker (1..=1000000); more are closed at
    /// accept.
    #[serde(deserialize_with = "tcp_max_connections_per_worker")]
    pub max_connections_per_worker: u32,
    /// A connection must finish its TLS handshake and send a complete first
    /// request head within this long (100..=600000 ms).
    #[serde(deserialize_with = "tcp_handshake_timeout_ms")]
    pub handshake_timeout_ms: u32,
    /// A connection with no tunnel and no request in progress is closed
    /// after this long (1..=86400 s).
    #[serde(deserialize_with = "tcp_idle_timeout_secs")]
    pub idle_timeout_secs: u32,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (1..=10000).
    #[serde(deserialize_with = "tcp_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Bytes buffered per direction per tunnel (16384..=16777216).
    #[serde(deserialize_with = "tcp_tunnel_buffer_bytes")]
    pub tunnel_buffer_bytes: u32,
    /// Serve the status endpoint (`GET /`, `GET /.well-known/masque-relay/status`).
    pub status_endpoint: bool,
}

impl Default for TcpSection {
    fn default() -> Self {
        Self {
            alt_svc: AltSvc::Auto,
            max_connections_per_worker: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_secs: 120,
            max_streams_per_connection: 100,
            tunnel_buffer_bytes: 262_144,
            status_endpoint: true,
        }
    }
}

/// A TOML integer for `key`, within `range`.
fn ranged_u32<'de, D: serde::Deserializer<'de>>(
    d: D,
    key: &str,
    range: RangeInclusive<u32>,
) -> Result<u32, D::Error> {
    let v = i64::deserialize(d)?;
    u32::try_from(v).ok().filter(|v| range.contains(v)).ok_or_else(|| {
        serde::de::Error::custom(format!("{key} must be {}..={}, not {v}", range.start(), range.end()))
    })
}

macro_rules! ranged_key {
    ($($f:ident: $key:literal, $range:expr;)*) => {$(
        fn $f<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
            ranged_u32(d, $key, $range)
        }
    )*};
}

ranged_key! {
    tcp_max_connections_per_worker: "tcp.max_connections_per_worker", 1..=1_000_000;
    tcp_handshake_timeout_ms: "tcp.handshake_timeout_ms", 100..=600_000;
    tcp_idle_timeout_secs: "tcp.idle_timeout_secs", 1..=86_400;
    tcp_max_streams_per_connection: "tcp.max_streams_per_connection", 1..=10_000;
    tcp_tunnel_buffer_bytes: "tcp.tunnel_buffer_bytes", 16_384..=16_777_216;
}

/// `[bind]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BindSection {
    /// The public IP addresses bound tunnels are reachable at (the
    /// Proxy-Public-Address of each tunnel pairs them with its port);
    /// empty: the host's primary outbound address of each family.
    pub public_addresses: Vec<std::net::IpAddr>,
    /// Which peers may send to a bound tunnel: "sent_to" (only peers the
    /// client has sent to, like an endpoint-dependent NAT) or "any".
    pub inbound_filter: InboundFilter,
    /// Open compression contexts per tunnel.
    pub max_contexts: u32,
    /// Distinct peers a tunnel may send to.
    pub max_peers: u32,
}

impl Default for BindSection {
    fn default() -> Self {
        Self {
            public_addresses: Vec::new(),
            inbound_filter: InboundFilter::SentTo,
            max_contexts: 64,
            max_peers: 256,
        }
    }
}

/// `[connect_ip]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectIpSection {
    /// The connect-ip URI template (variables `target` and `ipproto`).
    pub uri_template: String,
    /// IPv4 addresses assigned to clients, cut into one subnet per worker.
    pub ipv4_pool: Option<String>,
    /// IPv6 addresses assigned to clients, cut into one subnet per worker.
    pub ipv6_pool: Option<String>,
    /// TUN devices are named `<prefix><worker>`.
    pub interface_prefix: String,
    /// MTU of the TUN devices (at least 1280, RFC 9484 section 7.2).
    pub mtu: u32,
    /// TUN offloads: a virtio-net header on every packet, GSO packets read
    /// (split into packets for the tunnels) and TCP segments coalesced into
    /// GSO packets on writes. On by default; off reads and writes one
    /// packet per system call.
    pub offload: bool,
    /// The IPv6 link MTU check of each tunnel carrying IPv6 in QUIC
    /// datagrams (RFC 9484 section 7.2): `echo` probes with 1280-byte
    /// ICMPv6 Echo Requests and tears down tunnels that never answer;
    /// `off` trusts the links (only for operators who guarantee them out
    /// of band).
    pub mtu_probe: MtuProbe,
    /// How long after its first probe a tunnel may take to answer, in
    /// milliseconds (1000..=60000).
    pub mtu_probe_timeout_ms: u32,
}

impl Default for ConnectIpSection {
    fn default() -> Self {
        Self {
            uri_template: "/.well-known/masque/ip/{target}/{ipproto}/".into(),
            ipv4_pool: None,
            ipv6_pool: None,
            interface_prefix: "masq".into(),
            mtu: 1280,
            offload: true,
            mtu_probe: MtuProbe::Echo,
            mtu_probe_timeout_ms: 5000,
        }
    }
}

impl ConnectIpSection {
    /// The pools, parsed.
    pub fn pools(&self) -> Result<(Option<crate::ippool::Prefix>, Option<crate::ippool::Prefix>), String> {
        let parse = |key: &str, v: &Option<String>| -> Result<Option<crate::ippool::Prefix>, String> {
            v.as_deref().map(|s| s.parse().map_err(|e| format!("connect_ip.{key}: {e}"))).transpose()
        };
        Ok((parse("ipv4_pool", &self.ipv4_pool)?, parse("ipv6_pool", &self.ipv6_pool)?))
    }
}

/// `[fleet]`: the control processes of one fleet share their run-time
/// state (tokens, revocations, quota overrides) and session ticket keys
/// through a Redis store ([`crate::fleet`]). Names are checked as they are
/// read, so errors carry the key and its line; which files hold the
/// secrets is checked when they are read ([`crate::fleet::settings`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// The fleet's name (part of every key and of the key derivation).
    #[serde(deserialize_with = "fleet_name")]
    pub name: String,
    /// This host's name, unique in the fleet (default: the hostname).
    #[serde(default, deserialize_with = "fleet_host")]
    pub host: Option<String>,
    /// Redis (or Valkey) URLs, tried in order: `redis://host:port[/db]` or
    /// `unix:///path`.
    #[serde(default, deserialize_with = "fleet_redis")]
    pub redis: Vec<String>,
    /// Or a Sentinel deployment that names the current primary.
    #[serde(default)]
    pub sentinel: Option<SentinelSection>,
    /// Prefix of every key (`<prefix>:<name>:...`).
    #[serde(default = "default_key_prefix", deserialize_with = "fleet_key_prefix")]
    pub key_prefix: String,
    /// File holding the store's password, or `user:password` for an ACL
    /// user.
    pub password_file: Option<PathBuf>,
    /// File holding the fleet secret (hex, at least 32 bytes), the same on
    /// every host: the keys that sign and seal what the store holds are
    /// derived from it.
    pub secret_file: PathBuf,
    /// What a host does while the store is unreachable.
    #[serde(default)]
    pub on_store_failure: StoreFailureMode,
    /// The `[quotas.per_identity]` limits hold for the whole fleet rather
    /// than for each host ([`crate::global_quota`]).
    #[serde(default)]
    pub global_quotas: bool,
}

/// `fleet.sentinel`: the Sentinel deployment that names the primary.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelSection {
    /// The monitored primary's name (`sentinel monitor <master> ...`).
    #[serde(deserialize_with = "fleet_sentinel_master")]
    pub master: String,
    /// The Sentinels' URLs (`redis://host:26379`).
    #[serde(deserialize_with = "fleet_sentinel_addresses")]
    pub addresses: Vec<String>,
}

/// `fleet.on_store_failure`: how a host behaves while the store is down.
/// Either way it keeps enforcing the last state it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFailureMode {
    /// Admin changes apply on this host at once and are merged into the
    /// fleet's state when the store is back.
    #[default]
    Open,
    /// Admin changes that need the store are refused until it is back.
    Closed,
}

fn default_key_prefix() -> String {
    "masque".into()
}

/// Whether `s` may name a fleet, a host or a key prefix: 1..=64 of
/// `A-Z a-z 0-9 . _ -` (safe in keys, logs and channel names).
pub fn valid_fleet_word(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn fleet_word<'de, D: serde::Deserializer<'de>>(d: D, key: &str) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if valid_fleet_word(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{key} must be 1..=64 characters of A-Z a-z 0-9 . _ -, not {s:?}"
        )))
    }
}

fn fleet_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    fleet_word(d, "fleet.name")
}

fn fleet_host<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    fleet_word(d, "fleet.host").map(Some)
}

fn fleet_key_prefix<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    fleet_word(d, "fleet.key_prefix")
}

fn fleet_sentinel_master<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    fleet_word(d, "fleet.sentinel.master")
}

/// Why `url` cannot name a store: only plain `redis://` and `unix://`
/// URLs without a password (the password belongs in `password_file`).
pub fn store_url_problem(url: &str) -> Option<String> {
    use redis::IntoConnectionInfo;
    let scheme_ok = ["redis://", "unix://", "redis+unix://"].iter().any(|p| url.starts_with(p));
    if url.starts_with("rediss://") {
        return Some(format!(
            "{url:?}: TLS to the store is not built in (reach it over a private network or a local TLS tunnel)"
        ));
    }
    if !scheme_ok {
        return Some(format!("{url:?} is not a redis:// or unix:// URL"));
    }
    let info = match url.into_connection_info() {
        Ok(info) => info,
        Err(e) => return Some(format!("{url:?}: {e}")),
    };
    if info.redis_settings().password().is_some() || info.redis_settings().username().is_some() {
        return Some(format!("{url:?} holds credentials: put them in fleet.password_file instead"));
    }
    None
}

fn store_urls<'de, D: serde::Deserializer<'de>>(d: D, key: &str) -> Result<Vec<String>, D::Error> {
    let urls = Vec::<String>::deserialize(d)?;
    if urls.is_empty() || urls.len() > 16 {
        return Err(serde::de::Error::custom(format!("{key} must list 1..=16 URLs")));
    }
    for url in &urls {
        if let Some(why) = store_url_problem(url) {
            return Err(serde::de::Error::custom(format!("{key}: {why}")));
        }
    }
    Ok(urls)
}

fn fleet_redis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    store_urls(d, "fleet.redis")
}

fn fleet_sentinel_addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    store_urls(d, "fleet.sentinel.addresses")
}

/// `[targets]`. By default every special-purpose range (loopback, private,
/// link-local, ...) is denied and every port allowed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetsSection {
    /// Ranges allowed even if special-purpose.
    pub allow: Vec<Cidr>,
    /// Ranges always denied.
    pub deny: Vec<Cidr>,
    /// Allowed target ports (empty: all).
    pub ports: Vec<PortRange>,
}

/// `[log]`: how log lines look and what they may say about clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `"text"` (coloured only on a terminal without `NO_COLOR`) or
    /// `"json"` (one object a line); `--log-format` overrides it.
    pub format: LogFormat,
    /// Log one line per tunnel (allowed or refused) at info level with the
    /// client's address, the target and the identity. Off by default:
    /// without it no line at the default level names a client or a target.
    pub log_targets: bool,
}

/// `[qlog]`: what `relayctl qlog start` writes into `state_dir/qlog`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QlogSection {
    /// Most bytes of one file (4096..=1073741824); a file ends at the last
    /// whole event that fit.
    #[serde(deserialize_with = "qlog_max_file_bytes")]
    pub max_file_bytes: u32,
    /// Most files kept (1..=10000); a new file removes the oldest closed
    /// ones, and a connection gets no file while all are being written.
    #[serde(deserialize_with = "qlog_max_files")]
    pub max_files: u32,
    /// How long new connections of a `--client` start are logged when it
    /// names no `--seconds` (1..=86400).
    #[serde(deserialize_with = "qlog_default_seconds")]
    pub default_seconds: u32,
    /// quiche's events: "core", "base" or "extra".
    pub level: QlogLevel,
}

impl Default for QlogSection {
    fn default() -> Self {
        Self { max_file_bytes: 16 * 1024 * 1024, max_files: 32, default_seconds: 300, level: QlogLevel::Base }
    }
}

ranged_key! {
    qlog_max_file_bytes: "qlog.max_file_bytes", 4096..=1_073_741_824;
    qlog_max_files: "qlog.max_files", 1..=10_000;
    qlog_default_seconds: "qlog.default_seconds", 1..=86_400;
}

/// `[resolver]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverSection {
    /// Resolver threads.
    pub threads: u32,
    /// Resolution timeout (answered with 504 dns_timeout).
    pub timeout_ms: u32,
    /// Most resolutions queued or running.
    pub max_pending: u32,
}

impl Default for ResolverSection {
    fn default() -> Self {
        Self { threads: 2, timeout_ms: 2000, max_pending: 1024 }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax, unknown key, or invalid value (the message has the line
    /// and key).
    #[error("{origin}: {source}")]
    Parse {
        /// File name or "embedded default".
        origin: String,
        /// The parser's error.
        source: toml::de::Error,
    },
    /// A value is valid alone but not with the rest.
    #[error("{origin}: {message}")]
    Invalid {
        /// File name or "embedded default".
        origin: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

impl Config {
    /// Parses and validates configuration text.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { origin: origin.to_string(), source })?;
        let invalid = |message: String| ConfigError::Invalid { origin: origin.to_string(), message };
        let d = &config.dataplane;
        let Some(server_id) = parse_hex(&d.connection_ids.server_id) else {
            return Err(invalid(format!(
                "dataplane.connection_ids.server_id must be hex bytes, not {:?}",
                d.connection_ids.server_id
            )));
        };
        let c = &d.connection_ids;
        if let Err(e) = relay_proto::cid::CidLayout::new(c.config_id, &server_id, c.nonce_len) {
            return Err(invalid(format!("dataplane.connection_ids: {e}")));
        }
        if d.workers.resolve() > 256 {
            return Err(invalid("dataplane.workers must be at most 256".into()));
        }
        if d.wait_batch_us > MAX_WAIT_BATCH_US {
            return Err(invalid(format!(
                "dataplane.wait_batch_us must be at most {MAX_WAIT_BATCH_US} (10 ms), not {}",
                d.wait_batch_us
            )));
        }
        if d.ask_timeout_ms == 0 || d.flow_idle_timeout_secs == 0 || d.quic_idle_timeout_secs == 0 {
            return Err(invalid("dataplane timeouts must be positive".into()));
        }
        if d.max_tunnels_per_connection == 0 || d.max_connections_per_worker == 0 {
            return Err(invalid("dataplane limits must be positive".into()));
        }
        if config.tls.cert.is_some() != config.tls.key.is_some() {
            return Err(invalid("tls.cert and tls.key must be given together".into()));
        }
        if config.tls.cert.is_none() && config.tls.self_signed_names.is_empty() {
            return Err(invalid("tls: give cert and key, or self_signed_names".into()));
        }
        if !(60..=7 * 86_400).contains(&config.tls.ticket_key_rotation_secs) {
            return Err(invalid(format!(
                "tls.ticket_key_rotation_secs must be 60..=604800 (RFC 8446 caps ticket lifetimes at 7 days), not {}",
                config.tls.ticket_key_rotation_secs
            )));
        }
        let ip = &config.connect_ip;
        let (v4_pool, v6_pool) = ip.pools().map_err(invalid)?;
        if config.protocols.connect_ip && v4_pool.is_none() && v6_pool.is_none() {
            return Err(invalid(
                "protocols.connect_ip = true needs connect_ip.ipv4_pool and/or connect_ip.ipv6_pool".into(),
            ));
        }
        if config.protocols.connect_ip {
            crate::ippool::AddressPools::new(v4_pool, v6_pool, d.workers.resolve())
                .map_err(|e| invalid(format!("connect_ip: {e}")))?;
        }
        let b = &config.bind;
        if !(1..=4096).contains(&b.max_contexts) || !(1..=65_536).contains(&b.max_peers) {
            return Err(invalid("bind.max_contexts must be 1..=4096 and bind.max_peers 1..=65536".into()));
        }
        if let Err(e) = relay_proto::template::IpUriTemplate::parse(&ip.uri_template) {
            return Err(invalid(format!("connect_ip.uri_template: {e}")));
        }
        if ip.mtu < 1280 || ip.mtu > 65_535 {
            return Err(invalid(format!("connect_ip.mtu must be 1280..=65535, not {}", ip.mtu)));
        }
        if !(1000..=60_000).contains(&ip.mtu_probe_timeout_ms) {
            return Err(invalid(format!(
                "connect_ip.mtu_probe_timeout_ms must be 1000..=60000, not {}",
                ip.mtu_probe_timeout_ms
            )));
        }
        if ip.interface_prefix.is_empty()
            || ip.interface_prefix.len() > 11
            || !ip.interface_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "connect_ip.interface_prefix must be 1..=11 letters, digits, '-' or '_' (device names are at most 15 bytes)".into(),
            ));
        }
        check_tcp_listeners(&config.listen, text).map_err(invalid)?;
        let r = &config.resolver;
        if r.threads == 0 || r.threads > 64 || r.max_pending == 0 || r.timeout_ms == 0 {
            return Err(invalid(
                "resolver.threads must be 1..=64, max_pending and timeout_ms positive".into(),
            ));
        }
        if let Some(i) = config.auth.tokens.iter().position(|t| !valid_static_token(t.expose())) {
            return Err(invalid(format!(
                "auth.tokens[{i}]: a static token must be 1..=512 printable ASCII characters without \
                 whitespace and must not start like a versioned HMAC token (v1.)"
            )));
        }
        check_auth_schemes(&config.auth).map_err(invalid)?;
        check_mtls(&config.auth.mtls).map_err(invalid)?;
        if let Some(f) = &config.fleet
            && f.redis.is_empty() == f.sentinel.is_none()
        {
            return Err(invalid(
                "fleet: give exactly one of fleet.redis (URLs tried in order) or fleet.sentinel".into(),
            ));
        }
        if config.upstreams.len() > MAX_UPSTREAMS {
            return Err(invalid(format!("upstreams: at most {MAX_UPSTREAMS} routes")));
        }
        let mut names = std::collections::HashMap::new();
        for (i, route) in config.upstreams.iter().enumerate() {
            let line = line_of(text, route.name_offset);
            if let Some((first, first_line)) = names.insert(route.name.as_str(), (i, line)) {
                return Err(invalid(format!(
                    "upstreams[{i}] (name {:?}, line {line}): the name is already used by upstreams[{first}] (line {first_line})",
                    route.name
                )));
            }
        }
        let mut config = config;
        config.origin = origin.to_string();
        let mut seen = std::collections::HashMap::new();
        for (i, key) in config.auth.hmac_keys.iter_mut().enumerate() {
            key.line = line_of(text, key.id.span().start);
            let name = format!("auth.hmac_keys[{i}] (id {:?}, line {})", key.id.get_ref(), key.line);
            if let Some(first) = seen.insert(key.id.get_ref().clone(), key.line) {
                return Err(invalid(format!("{name}: the id is already used on line {first}")));
            }
            match (&key.secret_file, &key.secret_hex) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(format!("{name}: give exactly one of secret_file or secret_hex")));
                }
                (None, Some(hex)) => {
                    let secret = parse_hex(hex.expose())
                        .ok_or_else(|| invalid(format!("{name}: secret_hex is not hex")))?;
                    TokenKeys::default()
                        .add(key.id.get_ref(), Secret::new(secret))
                        .map_err(|e| invalid(format!("{name}: {e}")))?;
                }
                (Some(_), None) => {
                    let mut keys = TokenKeys::default();
                    // Checks the ID now; the file is read by hmac_keys().
                    if let Err(e @ KeyError::BadId(_)) = keys.add(key.id.get_ref(), Secret::new(vec![0; 32]))
                    {
                        return Err(invalid(format!("{name}: {e}")));
                    }
                }
            }
        }
        Ok(config)
    }

    /// Loads the HMAC keys, reading secret files. Errors name the entry,
    /// its key ID and its line.
    pub fn hmac_keys(&self) -> Result<TokenKeys, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { origin: self.origin.clone(), message };
        let mut keys = TokenKeys::default();
        for (i, key) in self.auth.hmac_keys.iter().enumerate() {
            let name = format!("auth.hmac_keys[{i}] (id {:?}, line {})", key.id.get_ref(), key.line);
            let secret = match (&key.secret_file, &key.secret_hex) {
                (_, Some(hex)) => parse_hex(hex.expose()),
                (Some(path), None) => {
                    use std::os::unix::fs::PermissionsExt;
                    let meta = std::fs::metadata(path)
                        .map_err(|e| invalid(format!("{name}: secret_file {}: {e}", path.display())))?;
                    if meta.permissions().mode() & 0o004 != 0 {
                        return Err(invalid(format!(
                            "{name}: secret_file {} is readable by every user; chmod 600 it",
                            path.display()
                        )));
                    }
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| invalid(format!("{name}: secret_file {}: {e}", path.display())))?;
                    let secret = parse_hex(text.trim());
                    if secret.is_none() {
                        return Err(invalid(format!(
                            "{name}: secret_file {} must hold the secret as hex (e.g. `openssl rand -hex 32`)",
                            path.display()
                        )));
                    }
                    secret
                }
                (None, None) => None,
            };
            let secret = secret.ok_or_else(|| invalid(format!("{name}: no valid secret")))?;
            keys.add(key.id.get_ref(), Secret::new(secret)).map_err(|e| invalid(format!("{name}: {e}")))?;
        }
        Ok(keys)
    }

    /// The Privacy Pass verifier of `[auth.privacy_pass]` with the
    /// configured keys, reading key files; `None` when `private_token` is
    /// not among the schemes. The directory's keys are the caller's to
    /// install ([`crate::privacy_pass::source`]).
    pub fn privacy_pass(&self) -> Result<Option<crate::privacy_pass::PrivacyPass>, ConfigError> {
        use crate::privacy_pass::{KeyEntry, KeySource, PrivacyPass, Settings, keys::IssuerKey};
        let invalid = |message: String| ConfigError::Invalid { origin: self.origin.clone(), message };
        let Some(pp) =
            self.auth.privacy_pass.as_ref().filter(|_| self.auth.schemes.contains(&AuthScheme::PrivateToken))
        else {
            return Ok(None);
        };
        let mut keys = Vec::new();
        for (i, k) in pp.keys.iter().enumerate() {
            let name = format!("auth.privacy_pass.keys[{i}]");
            let key = match (k.token_type, &k.public_key_file, &k.private_key_file) {
                (2, Some(path), None) => {
                    let bytes = std::fs::read(path)
                        .map_err(|e| invalid(format!("{name}: public_key_file {}: {e}", path.display())))?;
                    let der = crate::privacy_pass::spki_from_file(&bytes)
                        .map_err(|e| invalid(format!("{name}: public_key_file {}: {e}", path.display())))?;
                    IssuerKey::blind_rsa(&der)
                        .map_err(|e| invalid(format!("{name}: public_key_file {}: {e}", path.display())))?
                }
                (1, None, Some(path)) => {
                    use std::os::unix::fs::PermissionsExt;
                    let meta = std::fs::metadata(path)
                        .map_err(|e| invalid(format!("{name}: private_key_file {}: {e}", path.display())))?;
                    if meta.permissions().mode() & 0o004 != 0 {
                        return Err(invalid(format!(
                            "{name}: private_key_file {} is readable by every user; chmod 600 it",
                            path.display()
                        )));
                    }
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| invalid(format!("{name}: private_key_file {}: {e}", path.display())))?;
                    let secret = parse_hex(text.trim()).ok_or_else(|| {
                        invalid(format!(
                            "{name}: private_key_file {} must hold the key as hex",
                            path.display()
                        ))
                    })?;
                    IssuerKey::voprf(&secret)
                        .map_err(|e| invalid(format!("{name}: private_key_file {}: {e}", path.display())))?
                }
                _ => unreachable!("checked by Config::parse"),
            };
            keys.push(KeyEntry {
                key: std::sync::Arc::new(key),
                not_before: k.not_before.unwrap_or(0),
                not_after: k.not_after,
                source: KeySource::Config,
            });
        }
        let mut verifier = PrivacyPass::new(Settings {
            issuer_name: pp.issuer_name.clone(),
            origin_info: pp.origin_info.clone(),
            window_secs: pp.redemption_window_secs,
            max_spent: pp.max_spent_tokens,
        });
        verifier
            .install(KeySource::Config, keys)
            .map_err(|e| invalid(format!("auth.privacy_pass.keys: {e}")))?;
        Ok(Some(verifier))
    }

    /// Loads a file, or the embedded demo config ([`DEMO_CONFIG`]) when
    /// `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::parse(DEMO_CONFIG, "embedded demo config"),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                Self::parse(&text, &p.display().to_string())
            }
        }
    }

    /// The configuration in force as TOML: every key, defaults merged,
    /// secrets (static tokens, inline HMAC secrets) replaced by
    /// [`REDACTED`]; the files holding secrets are named, never read.
    /// Parsing it again gives the same configuration, but for the secrets.
    pub fn effective_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// What the dataplane needs for the TCP front; `None` when both of its
    /// listeners are off.
    pub fn tcp_bootstrap(&self) -> Option<TcpBootstrap> {
        let listen_tls = self.listen.tcp_tls();
        let listen_cleartext = self.listen.tcp_cleartext_addr();
        if listen_tls.is_none() && listen_cleartext.is_none() {
            return None;
        }
        let t = &self.tcp;
        Some(TcpBootstrap {
            listen_tls,
            listen_cleartext,
            alt_svc: t.alt_svc.value(self.listen.quic.port()),
            max_connections_per_worker: t.max_connections_per_worker,
            handshake_timeout_ms: t.handshake_timeout_ms,
            idle_timeout_ms: u64::from(t.idle_timeout_secs) * 1000,
            max_streams_per_connection: t.max_streams_per_connection,
            tunnel_buffer_bytes: t.tunnel_buffer_bytes,
            status_endpoint: t.status_endpoint,
        })
    }

    /// The protocols the dataplane's Bootstrap lists: the extended CONNECT
    /// protocols of `[protocols]` ([`ProtocolsSection::served`]), then
    /// `websocket` and `webtransport` when a `[[upstreams]]` route serves
    /// them.
    pub fn served_protocols(&self) -> Vec<Protocol> {
        let mut out = self.protocols.served();
        for (upstream, served) in [
            (UpstreamProtocol::Websocket, Protocol::Websocket),
            (UpstreamProtocol::Webtransport, Protocol::Webtransport),
        ] {
            if self.upstreams.iter().any(|r| r.protocol == upstream) {
                out.push(served);
            }
        }
        out
    }

    /// The channel socket path.
    pub fn channel_socket(&self) -> PathBuf {
        self.relay.channel_socket.clone().unwrap_or_else(|| self.relay.state_dir.join("channel.sock"))
    }

    /// The admin socket path.
    pub fn admin_socket(&self) -> PathBuf {
        self.relay.admin_socket.clone().unwrap_or_else(|| self.relay.state_dir.join("admin.sock"))
    }

    /// Checks, at start, that every `wss://` and `https://` route's `origin_ca_file`
    /// exists and holds PEM certificates; the error names the route and
    /// the file.
    pub fn check_upstream_ca_files(&self) -> Result<(), String> {
        for route in &self.upstreams {
            if let Some(path) = &route.origin_ca_file {
                read_ca_file(path)
                    .map_err(|e| format!("upstreams route {:?}: origin_ca_file {e}", route.name))?;
            }
        }
        Ok(())
    }

    /// The upstream routes as the dataplane's bootstrap lists them, CA
    /// file paths made absolute (the dataplane may run elsewhere in the
    /// file system tree).
    pub fn upstream_bootstrap(
        &self,
    ) -> Result<Vec<relay_proto::channel::bootstrap::UpstreamBootstrap>, String> {
        use relay_proto::channel::bootstrap::{UpstreamBootstrap, UpstreamTls};
        self.upstreams
            .iter()
            .map(|route| {
                let tls = match (&route.origin_ca_file, &route.origin_server_name) {
                    (Some(ca), Some(server_name)) => {
                        let ca = std::path::absolute(ca)
                            .map_err(|e| format!("upstreams route {:?}: origin_ca_file: {e}", route.name))?;
                        let ca_file = ca.to_str().map(str::to_string).ok_or_else(|| {
                            format!("upstreams route {:?}: origin_ca_file must be UTF-8", route.name)
                        })?;
                        Some(UpstreamTls { server_name: server_name.clone(), ca_file })
                    }
                    _ => None,
                };
                Ok(UpstreamBootstrap { route: route.name.clone(), tls, origin_http: route.origin_http })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default config with every key written out, as the tests edit
    /// it: `listen.tcp` set (its default follows `listen.quic`) and
    /// loopback targets allowed, as in the demo.
    fn full() -> String {
        let text = DEFAULT_CONFIG
            .replacen("# tcp = \"127.0.0.1:4433\"", "tcp = \"127.0.0.1:4433\"", 1)
            .replacen("allow = []", "allow = [\"127.0.0.0/8\", \"::1/128\"]", 1);
        assert_ne!(text, DEFAULT_CONFIG);
        text
    }

    #[test]
    fn the_embedded_default_is_what_an_empty_file_gives() {
        let documented = Config::parse(DEFAULT_CONFIG, "t.toml").unwrap();
        let empty = Config::parse("", "t.toml").unwrap();
        // Debug shows every field of every section (and would show a new
        // one), so the two cannot drift apart.
        assert_eq!(format!("{documented:#?}"), format!("{empty:#?}"));
        assert_eq!(documented.effective_toml(), empty.effective_toml());
        assert!(empty.targets.allow.is_empty(), "special-purpose targets are denied by default");
        assert_eq!(empty.log, LogSection { format: LogFormat::Text, log_targets: false });
    }

    #[test]
    fn the_demo_is_the_defaults_with_loopback_targets() {
        let demo = Config::load(None).unwrap();
        assert_eq!(demo.origin, "embedded demo config");
        let allowed: Vec<String> = demo.targets.allow.iter().map(ToString::to_string).collect();
        assert_eq!(allowed, ["127.0.0.0/8", "::1/128"]);
        let mut rest = demo.clone();
        rest.targets = TargetsSection::default();
        assert_eq!(rest.effective_toml(), Config::parse("", "t.toml").unwrap().effective_toml());
    }

    /// The lines of `text`'s effective config that differ from the
    /// defaults'.
    fn changed_lines(text: &str) -> Vec<String> {
        let default = Config::parse("", "t.toml").unwrap().effective_toml();
        let config = Config::parse(text, "t.toml").unwrap_or_else(|e| panic!("{text}: {e}"));
        let effective = config.effective_toml();
        let (ours, theirs): (Vec<_>, Vec<_>) = (effective.lines().collect(), default.lines().collect());
        assert_eq!(ours.len(), theirs.len(), "{effective}");
        ours.iter().zip(&theirs).filter(|(a, b)| a != b).map(|(a, _)| a.to_string()).collect()
    }

    #[test]
    fn a_file_holds_only_what_it_changes() {
        for (text, changed) in [
            ("[dataplane]\nworkers = 2\n", "workers = 2"),
            ("[relay]\nname = \"edge-1\"\n", "name = \"edge-1\""),
            ("[listen]\nquic = \"0.0.0.0:443\"\n", "quic = \"0.0.0.0:443\""),
            ("[listen]\nmetrics = \"\"\n", "metrics = \"\""),
            ("[dataplane.connection_ids]\nserver_id = \"0a\"\n", "server_id = \"0a\""),
            ("[tls]\nsession_tickets = false\n", "session_tickets = false"),
            ("[auth]\nrealm = \"edge\"\n", "realm = \"edge\""),
            ("[targets]\nports = [\"443\"]\n", "ports = [\"443\"]"),
            ("[resolver]\nthreads = 4\n", "threads = 4"),
            ("[quotas.per_identity]\nmax_flows = 8\n", "max_flows = 8"),
            ("[protocols]\nconnect_tcp = false\n", "connect_tcp = false"),
            ("[connect_ip]\nmtu = 1400\n", "mtu = 1400"),
            ("[bind]\nmax_peers = 16\n", "max_peers = 16"),
            ("[tcp]\nidle_timeout_secs = 60\n", "idle_timeout_secs = 60"),
            ("[log]\nformat = \"json\"\n", "format = \"json\""),
            ("[log]\nlog_targets = true\n", "log_targets = true"),
        ] {
            assert_eq!(changed_lines(text), [changed], "{text}");
        }
        let c = Config::parse("[dataplane]\nworkers = 2\n", "t.toml").unwrap();
        assert_eq!(c.dataplane.workers, Workers::Count(2));
        assert_eq!(c.listen.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        let off = Config::parse("[listen]\nmetrics = \"\"\n", "t.toml").unwrap();
        assert_eq!(off.listen.metrics, None, "\"\" turns the metrics endpoint off");
        let public = Config::parse("[listen]\nquic = \"0.0.0.0:443\"\n", "t.toml").unwrap();
        assert_eq!(public.listen.tcp_tls(), Some("0.0.0.0:443".parse().unwrap()), "TCP follows QUIC");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_line_and_key() {
        let err = |text: &str| Config::parse(text, "t.toml").unwrap_err().to_string();
        for (text, line, key) in [
            ("[dataplane]\nworkers = 2\nworkerz = 3\n", 3, "unknown field `workerz`"),
            ("\n[log]\nformat = \"xml\"\n", 3, "xml"),
            ("[log]\nlog_target = true\n", 2, "unknown field `log_target`"),
            ("[dataplane]\n\nflow_idle_timeout_secs = \"long\"\n", 3, "flow_idle_timeout_secs"),
            ("[listen]\nmetrics = \"9464\"\n", 2, "listen.metrics must be"),
            ("[nonsense]\nkey = 1\n", 1, "unknown field `nonsense`"),
            ("[quotas.per_client]\nmax_flows = 1\nmax_flowz = 2\n", 3, "max_flowz"),
        ] {
            let e = err(text);
            assert!(e.contains(&format!("line {line}")) && e.contains(key), "{text}: {e}");
            assert!(e.starts_with("t.toml: "), "the file is named: {e}");
        }
    }

    #[test]
    fn the_effective_config_redacts_secrets_and_parses_back() {
        let hex64 = "ab".repeat(32);
        let text = format!(
            "[auth]\ntokens = [\"hunter2-token\"]\n[[auth.hmac_keys]]\nid = \"k1\"\nsecret_hex = \"{hex64}\"\n\
             [[auth.hmac_keys]]\nid = \"k2\"\nsecret_file = \"/etc/masque-relay/hmac-k2\"\n\
             [fleet]\nname = \"eu\"\nredis = [\"redis://10.0.0.5:6379\"]\nsecret_file = \"/etc/masque-relay/fleet-secret\"\n\
             password_file = \"/etc/masque-relay/redis-password\"\n"
        );
        let effective = Config::parse(&text, "t.toml").unwrap().effective_toml();
        assert!(!effective.contains("hunter2") && !effective.contains(&hex64), "{effective}");
        assert_eq!(effective.matches(REDACTED).count(), 2, "{effective}");
        for path in ["hmac-k2", "fleet-secret", "redis-password"] {
            assert!(effective.contains(&format!("/etc/masque-relay/{path}")), "{path}: {effective}");
        }
        // Without secrets, printing and parsing again changes nothing.
        let plain = "[dataplane]\nworkers = 3\n[listen]\ntcp = \"\"\n[targets]\nallow = [\"10.0.0.0/8\"]\n";
        let once = Config::parse(plain, "t.toml").unwrap();
        let twice = Config::parse(&once.effective_toml(), "t.toml").unwrap();
        assert_eq!(once.dataplane.workers, twice.dataplane.workers);
        assert_eq!(twice.listen.tcp_tls(), None);
        assert_eq!(once.effective_toml(), twice.effective_toml());
    }

    #[test]
    fn embedded_default_parses() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.listen.quic, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(c.dataplane.workers, Workers::Auto);
        assert!(c.dataplane.workers.resolve() >= 1);
        assert_eq!(c.dataplane.io, IoBackend::Auto);
        assert!(c.dataplane.connection_ids.steering);
        assert_eq!(c.channel_socket(), PathBuf::from("state/channel.sock"));
    }

    #[test]
    fn fleet_section() {
        let c = Config::load(None).unwrap();
        assert!(c.fleet.is_none(), "no [fleet]: a host alone");
        let base = "[fleet]\nname = \"eu-west\"\nsecret_file = \"/etc/masque-relay/fleet-secret\"\n";
        let with = |extra: &str| format!("{DEFAULT_CONFIG}\n{base}{extra}");
        let f = Config::parse(
            &with("redis = [\"redis://10.0.0.5:6379\", \"unix:///run/redis.sock\"]\n"),
            "t.toml",
        )
        .unwrap()
        .fleet
        .unwrap();
        assert_eq!((f.name.as_str(), f.host.as_deref(), f.key_prefix.as_str()), ("eu-west", None, "masque"));
        assert_eq!(f.redis.len(), 2);
        assert_eq!(f.on_store_failure, StoreFailureMode::Open);
        let f = Config::parse(
            &with(
                "host = \"relay-1\"\nkey_prefix = \"m\"\non_store_failure = \"closed\"\n\
                 sentinel = { master = \"masque\", addresses = [\"redis://10.0.0.5:26379\"] }\n",
            ),
            "t.toml",
        )
        .unwrap()
        .fleet
        .unwrap();
        assert_eq!(f.on_store_failure, StoreFailureMode::Closed);
        assert_eq!(f.sentinel.unwrap().master, "masque");
        let err = |extra: &str| Config::parse(&with(extra), "t.toml").unwrap_err().to_string();
        let line = |extra: &str, key: &str| {
            let text = with(extra);
            text.lines().position(|l| l.starts_with(key)).unwrap() + 1
        };
        for (extra, expect, key) in [
            ("redis = [\"redis://h:1\"]\nhost = \"a b\"\n", "fleet.host must be 1..=64", "host"),
            ("redis = [\"http://h:1\"]\n", "fleet.redis: \"http://h:1\" is not a redis://", "redis"),
            ("redis = [\"rediss://h:1\"]\n", "TLS to the store is not built in", "redis"),
            ("redis = [\"redis://:pw@h:1\"]\n", "fleet.password_file", "redis"),
            ("redis = []\n", "fleet.redis must list 1..=16 URLs", "redis"),
            ("redis = [\"redis://h:1\"]\non_store_failure = \"maybe\"\n", "maybe", "on_store_failure"),
            ("redis = [\"redis://h:1\"]\nkey_prefix = \"a:b\"\n", "fleet.key_prefix", "key_prefix"),
            ("redis = [\"redis://h:1\"]\ncolour = 1\n", "colour", "colour"),
        ] {
            let e = err(extra);
            assert!(e.contains(expect) && e.contains(&format!("line {}", line(extra, key))), "{extra}: {e}");
        }
        let e = err("");
        assert!(e.contains("exactly one of fleet.redis") && e.contains("fleet.sentinel"), "{e}");
        let e =
            err("redis = [\"redis://h:1\"]\nsentinel = { master = \"m\", addresses = [\"redis://h:2\"] }\n");
        assert!(e.contains("exactly one of fleet.redis"), "{e}");
        let e = Config::parse(
            &format!("{DEFAULT_CONFIG}\n[fleet]\nname = \"x\"\nredis = [\"redis://h:1\"]\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("secret_file"), "{e}");
        let e = err("sentinel = { master = \"m\", addresses = [] }\n");
        assert!(e.contains("fleet.sentinel.addresses must list"), "{e}");
        // The commented example in the default config is a valid section.
        let example: String = full()
            .lines()
            .skip_while(|l| !l.starts_with("# [fleet]"))
            .filter(|l| !l.starts_with("# sentinel") && !l.starts_with("# password_file"))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .collect::<Vec<_>>()
            .join("\n");
        let f = Config::parse(&format!("{DEFAULT_CONFIG}\n{example}\n"), "t.toml").unwrap().fleet.unwrap();
        assert_eq!(f.host.as_deref(), Some("relay-1"));
        assert!(!f.global_quotas);
        let f = Config::parse(&with("redis = [\"redis://h:1\"]\nglobal_quotas = true\n"), "t.toml").unwrap();
        assert!(f.fleet.unwrap().global_quotas);
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = full().replace("allow = [\"127.0.0.0/8\", \"::1/128\"]", "allow = [\"127.0.0.0/99\"]");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        let line = full().lines().position(|l| l.starts_with("allow =")).unwrap() + 1;
        assert!(err.contains(&format!("line {line}")), "{err}");
        assert!(err.contains("127.0.0.0/99"), "{err}");

        let text = full().replace("ask_timeout_ms = 2000", "ask_timeout_msec = 2000");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("ask_timeout_msec") && err.contains("line"), "{err}");

        let text = full().replace("{target_port}/", "");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("uri_template") || err.contains("target_port"), "{err}");

        let text = full().replace("workers = \"auto\"", "workers = 0");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("dataplane.workers"), "{err}");
        let text = full().replace("workers = \"auto\"", "workers = \"many\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("dataplane.workers"), "{err}");
        let text = full().replace("workers = \"auto\"", "workers = 3");
        assert_eq!(Config::parse(&text, "t.toml").unwrap().dataplane.workers, Workers::Count(3));

        let text = full().replace("io = \"auto\"", "io = \"kqueue\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("kqueue") && err.contains("line"), "{err}");
        let text = full().replace("io = \"auto\"", "io = \"epoll\"");
        assert_eq!(Config::parse(&text, "t.toml").unwrap().dataplane.io, IoBackend::Epoll);

        assert_eq!(Config::parse(&full(), "t.toml").unwrap().dataplane.wait_batch_us, 0, "off by default");
        let text = full().replace("wait_batch_us = 0", "wait_batch_us = 500");
        assert_eq!(Config::parse(&text, "t.toml").unwrap().dataplane.wait_batch_us, 500);
        let text = full().replace("wait_batch_us = 0", "wait_batch_us = 10001");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("dataplane.wait_batch_us") && err.contains("10001"), "{err}");
        let text = full().replace("wait_batch_us = 0", "wait_batch_us = -1");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("wait_batch_us") && err.contains("line"), "{err}");

        let text = full().replace("server_id = \"\"", "server_id = \"0g\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("server_id"), "{err}");
        let text = full().replace("config_id = 0", "config_id = 7");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("connection_ids"), "{err}");
        let text = full().replace("server_id = \"\"", "server_id = \"0a0b\"");
        assert_eq!(
            parse_hex(&Config::parse(&text, "t.toml").unwrap().dataplane.connection_ids.server_id),
            Some(vec![10, 11])
        );
    }

    fn with_auth(extra: &str) -> String {
        full().replace("tokens = []\n", &format!("tokens = []\n{extra}"))
    }

    /// `[auth]` with these `schemes`, and `section` (tables) at its end.
    fn with_privacy_pass(schemes: &str, section: &str) -> String {
        DEFAULT_CONFIG
            .replace("schemes = [\"bearer\"]\n", &format!("schemes = {schemes}\n"))
            .replace("\n[targets]\n", &format!("\n{section}\n[targets]\n"))
    }

    #[test]
    fn privacy_pass_settings_are_checked() {
        let dir = std::env::temp_dir().join(format!("relay-config-pp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spki = dir.join("issuer.spki");
        std::fs::write(&spki, crate::privacy_pass::keys::tests::vector::TOKEN_KEY).unwrap();
        let secret = dir.join("voprf.key");
        std::fs::write(&secret, format!("{}\n", "01".repeat(48))).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let keys = format!(
            "[[auth.privacy_pass.keys]]\ntoken_type = 2\npublic_key_file = \"{}\"\n\
             [[auth.privacy_pass.keys]]\ntoken_type = 1\nprivate_key_file = \"{}\"\n",
            spki.display(),
            secret.display()
        );
        let section = format!(
            "[auth.privacy_pass]\nissuer_name = \"issuer.example\"\norigin_info = [\"relay.example\"]\n{keys}"
        );
        let c = Config::parse(&with_privacy_pass("[\"private_token\"]", &section), "t.toml").unwrap();
        assert_eq!(c.auth.schemes, [AuthScheme::PrivateToken]);
        let pp = c.privacy_pass().unwrap().expect("enabled");
        assert_eq!(pp.settings().window_secs, 3600);
        assert_eq!(pp.stats(0).keys.len(), 2);
        assert_eq!(pp.challenges(1_800_000_000).len(), 2);
        // The default: bearer only, no Privacy Pass.
        let d = Config::parse(DEFAULT_CONFIG, "d").unwrap();
        assert_eq!(d.auth.schemes, [AuthScheme::Bearer]);
        assert!(d.privacy_pass().unwrap().is_none());
        // A world-readable private key is refused when read.
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = c.privacy_pass().unwrap_err().to_string();
        assert!(err.contains("auth.privacy_pass.keys[1]") && err.contains("chmod 600"), "{err}");
        // An rsaEncryption key file names the rule.
        let rsa = boring::rsa::Rsa::generate(2048).unwrap();
        std::fs::write(&spki, boring::pkey::PKey::from_rsa(rsa).unwrap().public_key_to_pem().unwrap())
            .unwrap();
        let err = c.privacy_pass().unwrap_err().to_string();
        assert!(err.contains("keys[0]") && err.contains("id-RSASSA-PSS"), "{err}");
        let pp_section =
            |extra: &str| format!("[auth.privacy_pass]\nissuer_name = \"issuer.example\"\n{extra}\n{keys}");
        for (schemes, section, want) in [
            ("[]", String::new(), "at least one"),
            ("[\"bearer\", \"bearer\"]", String::new(), "twice"),
            ("[\"private_token\"]", String::new(), "configure [auth.privacy_pass]"),
            ("[\"bearer\"]", pp_section(""), "does not list \"private_token\""),
            ("[\"private_token\"]", pp_section("redemption_window_secs = 30"), "redemption_window_secs"),
            ("[\"private_token\"]", pp_section("max_spent_tokens = 0"), "max_spent_tokens"),
            ("[\"private_token\"]", pp_section("origin_info = [\"a,b\"]"), "origin_info entry"),
            ("[\"private_token\"]", pp_section(&format!("origin_info = [\"{}\"]", "o".repeat(200))), "at most 200 bytes"),
            ("[\"private_token\"]", pp_section("directory_url = \"http://issuer.example/\""), "https://"),
            (
                "[\"private_token\"]",
                pp_section("directory_url = \"https://a/\"\ndirectory_file = \"/x\""),
                "at most one of",
            ),
            (
                "[\"private_token\"]",
                "[auth.privacy_pass]\nissuer_name = \"i\"\n".to_string(),
                "give [[auth.privacy_pass.keys]]",
            ),
            (
                "[\"private_token\"]",
                "[auth.privacy_pass]\nissuer_name = \"i\"\n[[auth.privacy_pass.keys]]\ntoken_type = 2\nprivate_key_file = \"/x\"\n".to_string(),
                "token_type 2 needs public_key_file",
            ),
            (
                "[\"private_token\"]",
                "[auth.privacy_pass]\nissuer_name = \"i\"\n[[auth.privacy_pass.keys]]\ntoken_type = 5\npublic_key_file = \"/x\"\n".to_string(),
                "token_type must be 1 or 2",
            ),
            ("[\"kerberos\"]", String::new(), "unknown variant"),
        ] {
            let err = Config::parse(&with_privacy_pass(schemes, &section), "t.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{schemes} {section}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hmac_keys_are_validated_with_key_and_line() {
        let hex64 = "ab".repeat(32);
        let text = with_auth(&format!("[[auth.hmac_keys]]\nid = \"k1\"\nsecret_hex = \"{hex64}\"\n"));
        let c = Config::parse(&text, "t.toml").unwrap();
        let keys = c.hmac_keys().unwrap();
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["k1"]);
        let id_line = text.lines().position(|l| l == "id = \"k1\"").unwrap() + 1;
        assert_eq!(c.auth.hmac_keys[0].line, id_line);
        assert!(!format!("{c:?}").contains(&hex64), "Debug hides secrets");

        // Too short: names the entry, the id and the line.
        let text =
            with_auth(&format!("[[auth.hmac_keys]]\nid = \"short\"\nsecret_hex = \"{}\"\n", "ab".repeat(31)));
        let line = text.lines().position(|l| l == "id = \"short\"").unwrap() + 1;
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("auth.hmac_keys[0]")
                && err.contains("\"short\"")
                && err.contains(&format!("line {line}")),
            "{err}"
        );
        assert!(err.contains("31 bytes") && err.contains("at least 32"), "{err}");

        for (entry, want) in [
            ("id = \"k1\"\n".to_string(), "exactly one of secret_file or secret_hex"),
            (format!("id = \"k1\"\nsecret_hex = \"{hex64}\"\nsecret_file = \"/x\"\n"), "exactly one"),
            ("id = \"k1\"\nsecret_hex = \"zz\"\n".to_string(), "secret_hex is not hex"),
            (format!("id = \"k.1\"\nsecret_hex = \"{hex64}\"\n"), "must be 1..=32 characters"),
            ("id = \"k.1\"\nsecret_file = \"/x\"\n".to_string(), "must be 1..=32 characters"),
            (format!("id = \"k1\"\nsecret = \"{hex64}\"\n"), "unknown field `secret`"),
        ] {
            let err = Config::parse(&with_auth(&format!("[[auth.hmac_keys]]\n{entry}")), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{entry}: {err}");
        }
        let dup = format!(
            "[[auth.hmac_keys]]\nid = \"k1\"\nsecret_hex = \"{hex64}\"\n[[auth.hmac_keys]]\nid = \"k1\"\nsecret_hex = \"{hex64}\"\n"
        );
        let err = Config::parse(&with_auth(&dup), "t.toml").unwrap_err().to_string();
        assert!(err.contains("auth.hmac_keys[1]") && err.contains("already used on line"), "{err}");

        // Secret files: hex, not readable by everyone, at least 32 bytes.
        let dir = std::env::temp_dir().join(format!("relay-config-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("k2");
        let load = |content: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&file, content).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let text = with_auth(&format!(
                "[[auth.hmac_keys]]\nid = \"k2\"\nsecret_file = \"{}\"\n",
                file.display()
            ));
            Config::parse(&text, "t.toml")
                .unwrap()
                .hmac_keys()
                .map(|k| k.ids().count())
                .map_err(|e| e.to_string())
        };
        assert_eq!(load(&format!("{hex64}\n"), 0o600), Ok(1));
        let err = load(&format!("{hex64}\n"), 0o644).unwrap_err();
        assert!(err.contains("auth.hmac_keys[0]") && err.contains("readable by every user"), "{err}");
        let err = load("ab\n", 0o600).unwrap_err();
        assert!(err.contains("\"k2\"") && err.contains("at least 32"), "{err}");
        let err = load("not hex", 0o600).unwrap_err();
        assert!(err.contains("as hex"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = load_missing(&file);
        assert!(err.contains("secret_file") && err.contains("No such file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn load_missing(file: &Path) -> String {
        let text =
            with_auth(&format!("[[auth.hmac_keys]]\nid = \"k2\"\nsecret_file = \"{}\"\n", file.display()));
        Config::parse(&text, "t.toml").unwrap().hmac_keys().unwrap_err().to_string()
    }

    #[test]
    fn static_tokens_are_checked() {
        let text = full().replace("tokens = []", "tokens = [\"ok-token\", \"v1.k1.looks.signed\"]");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("auth.tokens[1]"), "{err}");
        let text = full().replace("tokens = []", "tokens = [\"has space\"]");
        assert!(Config::parse(&text, "t.toml").unwrap_err().to_string().contains("auth.tokens[0]"));
        let text = full().replace("tokens = []", "tokens = [\"hunter2-token\"]");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"), "Debug hides tokens");
    }

    #[test]
    fn quotas_and_protocols() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.quotas, QuotaConfig::default(), "the demo is unlimited");
        assert_eq!(c.protocols.served(), [Protocol::ConnectUdp]);
        let line = |text: &str, key: &str| text.lines().position(|l| l.starts_with(key)).unwrap() + 1;

        let text = full().replacen("bytes_per_period = 0", "bytes_per_period = 1000", 1);
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("quotas.per_identity.period_secs") && err.contains("line"), "{err}");
        let text = full().replacen("burst = 0", "burst = 5", 2).replacen("burst = 5", "burst = 0", 1);
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("quotas.per_client.burst"), "{err}");
        let text = full().replacen("max_flows = 0", "max_flowz = 0", 1);
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("max_flowz") && err.contains(&format!("line {}", line(&text, "max_flowz"))),
            "{err}"
        );
        let text = full().replacen("max_flows = 0", "max_flows = -1", 1);
        assert!(Config::parse(&text, "t.toml").is_err());
        let text = full().replacen("max_flows = 0", "max_flows = 4", 1);
        assert_eq!(Config::parse(&text, "t.toml").unwrap().quotas.per_identity.max_flows, 4);

        let text = full().replace("connect_ip = false", "connect_ip = true");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("protocols.connect_ip") && err.contains("ipv4_pool"), "{err}");
        let with_pool = text
            .replace("# ipv4_pool = \"10.89.0.0/16\"", "ipv4_pool = \"10.89.0.0/24\"")
            .replace("# ipv6_pool = \"fd89::/64\"", "ipv6_pool = \"fd89::/112\"");
        let c = Config::parse(&with_pool, "t.toml").unwrap();
        assert_eq!(c.protocols.served(), [Protocol::ConnectUdp, Protocol::ConnectIp]);
        assert_eq!(c.connect_ip.mtu, 1280);
        let bad = with_pool.replace("10.89.0.0/24", "10.89.0.1/24");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("connect_ip.ipv4_pool"), "{err}");
        let bad = with_pool.replace("{ipproto}/\"", "{port}/\"");
        assert!(Config::parse(&bad, "t.toml").unwrap_err().to_string().contains("connect_ip.uri_template"));
        let bad = with_pool.replace("mtu = 1280", "mtu = 1000");
        assert!(Config::parse(&bad, "t.toml").unwrap_err().to_string().contains("connect_ip.mtu"));
        assert_eq!((c.connect_ip.mtu_probe, c.connect_ip.mtu_probe_timeout_ms), (MtuProbe::Echo, 5000));
        let off = with_pool.replace("mtu_probe = \"echo\"", "mtu_probe = \"off\"");
        assert_eq!(Config::parse(&off, "t.toml").unwrap().connect_ip.mtu_probe, MtuProbe::Off);
        let bad = with_pool.replace("mtu_probe = \"echo\"", "mtu_probe = \"ping\"");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("ping") && err.contains("mtu_probe"), "{err}");
        let bad = with_pool.replace("mtu_probe_timeout_ms = 5000", "mtu_probe_timeout_ms = 10");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("connect_ip.mtu_probe_timeout_ms"), "{err}");
        let text = full().replace("bind = false", "bind = true");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.protocols.served(), [Protocol::ConnectUdp, Protocol::ConnectUdpBind]);
        assert_eq!((c.bind.inbound_filter, c.bind.max_contexts), (InboundFilter::SentTo, 64));
        let bad = text.replace("inbound_filter = \"sent_to\"", "inbound_filter = \"everyone\"");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("everyone") && err.contains("inbound_filter") && err.contains("line"), "{err}");
        let text = full().replace("connect_udp = true", "connect_udp = false");
        assert!(Config::parse(&text, "t.toml").unwrap().protocols.served().is_empty());
        // Without the section: connect-udp only.
        let cut = DEFAULT_CONFIG.find("[protocols]").unwrap();
        assert_eq!(
            Config::parse(&DEFAULT_CONFIG[..cut], "t.toml").unwrap().protocols.served(),
            [Protocol::ConnectUdp]
        );
    }

    #[test]
    fn the_production_config_parses() {
        let text = include_str!("../../deploy/relay.toml");
        let c = Config::parse(text, "deploy/relay.toml").unwrap();
        assert!(c.quotas.per_identity.max_flows > 0 && c.quotas.per_client.max_flows > 0);
        assert_eq!(c.auth.hmac_keys.len(), 1);
        let tcp = c.tcp_bootstrap().unwrap();
        assert_eq!(tcp.listen_tls, Some(c.listen.quic), "TLS over TCP on the QUIC port");
        assert_eq!(tcp.listen_cleartext, None);
        assert_eq!(tcp.alt_svc.as_deref(), Some("h3=\":443\"; ma=86400"));
        assert!(c.protocols.connect_tcp);
        // It holds overrides only: every key it sets differs from the default.
        let defaults: toml::Table =
            toml::from_str(&Config::parse("", "t").unwrap().effective_toml()).unwrap();
        let production: toml::Table = toml::from_str(text).unwrap();
        let mut same = Vec::new();
        restated_defaults(&production, &defaults, "", &mut same);
        assert!(same.is_empty(), "deploy/relay.toml restates defaults: {same:?}");
    }

    /// The keys of `file` (tables walked, lists of tables skipped) whose
    /// value is the one in `defaults`.
    fn restated_defaults(file: &toml::Table, defaults: &toml::Table, at: &str, out: &mut Vec<String>) {
        for (key, value) in file {
            let path = format!("{at}{key}");
            match (value, defaults.get(key)) {
                (toml::Value::Table(t), Some(toml::Value::Table(d))) => {
                    restated_defaults(t, d, &format!("{path}."), out)
                }
                (v, Some(d)) if v == d => out.push(path),
                _ => {}
            }
        }
    }

    fn line_with(text: &str, start: &str) -> usize {
        text.lines().position(|l| l.starts_with(start)).unwrap() + 1
    }

    /// The default config with `old` replaced by `new` in its `[tcp]`
    /// section only (some of its keys end like `[dataplane]` keys).
    fn tcp_edit(edits: &[(&str, &str)]) -> String {
        let full = full();
        let at = full.find("\n[tcp]\n").unwrap();
        let (head, mut tcp) = (&full[..at], full[at..].to_string());
        for (old, new) in edits {
            assert!(tcp.contains(old), "{old}");
            tcp = tcp.replacen(old, new, 1);
        }
        format!("{head}{tcp}")
    }

    /// The line of `key` in the `[tcp]` section of `text`.
    fn tcp_line(text: &str, key: &str) -> usize {
        let from = line_with(text, "[tcp]");
        from + text.lines().skip(from).position(|l| l.starts_with(key)).unwrap() + 1
    }

    const ROUTES: &str = "[[upstreams]]\nname = \"chat\"\nprotocol = \"websocket\"\n\
        hosts = [\"chat.example\", \"192.0.2.1\", \"::1\"]\npath_prefix = \"/chat/\"\n\
        origin = \"ws://127.0.0.1:9001\"\nprefix_rewrite = \"/\"\nhost_header = \"chat.internal\"\n\
        auth = \"public\"\ntrusted_origin = true\nidle_timeout_secs = 600\norigin_http = \"h2\"\n\n\
        [[upstreams]]\nname = \"api_2\"\npath_prefix = \"/api/\"\norigin = \"ws://API.internal\"\n";

    #[test]
    fn upstream_routes_parse_with_defaults_and_serve_websocket() {
        let c = Config::parse(ROUTES, "t.toml").unwrap();
        assert_eq!(c.upstreams.len(), 2);
        let chat = &c.upstreams[0];
        assert_eq!(
            (chat.name.as_str(), chat.protocol, chat.auth),
            ("chat", UpstreamProtocol::Websocket, UpstreamAuth::Public)
        );
        let hosts: Vec<String> = chat.hosts.iter().map(|h| h.0.to_string()).collect();
        assert_eq!(hosts, ["chat.example", "192.0.2.1", "[::1]"]);
        assert_eq!(chat.origin.host, TargetHost::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!((chat.origin.port, chat.origin.authority.as_str()), (9001, "127.0.0.1:9001"));
        assert_eq!(
            (chat.prefix_rewrite.as_deref(), chat.host_header.as_deref()),
            (Some("/"), Some("chat.internal"))
        );
        assert_eq!((chat.trusted_origin, chat.idle_timeout_secs), (true, 600));
        assert_eq!(chat.origin_http, relay_proto::channel::bootstrap::OriginHttp::H2);
        assert_eq!(c.upstream_bootstrap().unwrap()[0].origin_http, chat.origin_http);
        let printed = c.effective_toml();
        assert!(printed.contains("origin_http = \"h2\""), "{printed}");
        let again = Config::parse(&printed, "t.toml").unwrap();
        assert_eq!(again.upstreams[0].origin_http, chat.origin_http);
        assert_eq!(again.upstreams[1].origin_http, relay_proto::channel::bootstrap::OriginHttp::Http1);
        // Every other key defaults.
        let api = &c.upstreams[1];
        assert_eq!(
            (api.protocol, api.auth, api.trusted_origin, api.idle_timeout_secs),
            (UpstreamProtocol::Websocket, UpstreamAuth::Relay, false, 0)
        );
        assert!(api.hosts.is_empty() && api.prefix_rewrite.is_none() && api.host_header.is_none());
        assert_eq!(api.origin_http, relay_proto::channel::bootstrap::OriginHttp::Http1);
        assert_eq!(api.origin.host, TargetHost::Name("api.internal".into()), "names are lowercased");
        assert_eq!(
            (api.origin.port, api.origin.authority.as_str()),
            (80, "API.internal"),
            "the authority as written"
        );
        // Bootstrap: websocket joins the extended CONNECT protocols.
        assert_eq!(c.served_protocols(), [Protocol::ConnectUdp, Protocol::Websocket]);
        assert_eq!(Config::parse("", "t.toml").unwrap().served_protocols(), [Protocol::ConnectUdp]);
        // The effective config prints the routes, and reads back the same.
        let printed = c.effective_toml();
        assert!(
            printed.contains("[[upstreams]]") && printed.contains("origin = \"ws://API.internal\""),
            "{printed}"
        );
        let again = Config::parse(&printed, "t.toml").unwrap();
        let strip = |c: &Config| {
            c.upstreams.iter().map(|r| UpstreamRoute { name_offset: 0, ..r.clone() }).collect::<Vec<_>>()
        };
        assert_eq!(strip(&again), strip(&c));
        // Without routes nothing is printed for them.
        assert!(!Config::parse("", "t.toml").unwrap().effective_toml().contains("upstreams"));
    }

    #[test]
    fn origins_parse() {
        let ok = |s: &str| {
            let o = UpstreamOrigin::parse(s).unwrap();
            (o.host.to_string(), o.port, o.authority)
        };
        assert_eq!(ok("ws://127.0.0.1"), ("127.0.0.1".into(), 80, "127.0.0.1".into()));
        assert_eq!(ok("ws://[::1]:9001"), ("[::1]".into(), 9001, "[::1]:9001".into()));
        assert_eq!(ok("ws://[2001:db8::1]"), ("[2001:db8::1]".into(), 80, "[2001:db8::1]".into()));
        assert_eq!(
            ok("ws://echo.internal:65535"),
            ("echo.internal".into(), 65535, "echo.internal:65535".into())
        );
        for (bad, why) in [
            ("http://x", "\"http://x\" is not ws://host[:port], wss://host[:port] or https://host[:port]"),
            ("WS://x", "is not ws://host[:port]"),
            ("HTTPS://x", "is not ws://host[:port]"),
            ("https:/x", "is not ws://host[:port]"),
            ("wt://x", "is not ws://host[:port]"),
            ("https://x/", "must be https://host[:port] without a path, query or fragment"),
            ("https://x:443/wt", "must be https://host[:port] without a path"),
            ("https://x?q", "must be https://host[:port] without a path"),
            ("https://u:p@x", "must be https://host[:port] without userinfo"),
            ("https://x:0", "the port must be 1..=65535"),
            ("https://x:65536", "the port must be 1..=65535"),
            ("https://", "the host must be"),
            ("https://[::1", "unclosed '['"),
            ("wss://x/", "must be wss://host[:port] without a path"),
            ("wss://u@x:1", "must be wss://host[:port] without userinfo"),
            ("wss://x:0", "the port must be 1..=65535"),
            ("ws://x/", "without a path"),
            ("ws://x:80/chat", "without a path"),
            ("ws://x?q", "without a path, query"),
            ("ws://x#f", "fragment"),
            ("ws://u@x", "without userinfo"),
            ("ws://", "the host must be"),
            ("ws://:80", "the host must be"),
            ("ws://x:", "the port must be 1..=65535"),
            ("ws://x:0", "the port must be 1..=65535"),
            ("ws://x:65536", "the port must be 1..=65535"),
            ("ws://x:8a", "the port must be"),
            ("ws://::1", "the port must be"),
            ("ws://[::1", "unclosed '['"),
            ("ws://[::1]x", "is not ws://host[:port]"),
            ("ws://[1.2.3.4]", "the host must be"),
            ("ws://[fe80::1%eth0]", "the host must be"),
            ("ws://bad_host!", "the host must be"),
            ("ws://a..b", "the host must be"),
        ] {
            let e = UpstreamOrigin::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn wss_origins_parse_with_port_443_and_their_tls_defaults() {
        let ok = |s: &str| {
            let o = UpstreamOrigin::parse(s).unwrap();
            (o.tls, o.host.to_string(), o.port, o.to_string())
        };
        assert_eq!(ok("wss://chat.example"), (true, "chat.example".into(), 443, "wss://chat.example".into()));
        assert_eq!(ok("wss://[::1]:9443"), (true, "[::1]".into(), 9443, "wss://[::1]:9443".into()));
        assert_eq!(ok("ws://chat.example"), (false, "chat.example".into(), 80, "ws://chat.example".into()));
        let text = "[[upstreams]]\nname = \"a\"\npath_prefix = \"/a/\"\norigin = \"wss://Chat.Example\"\n\n\
            [[upstreams]]\nname = \"b\"\npath_prefix = \"/b/\"\norigin = \"wss://[::1]:8443\"\n\
            origin_ca_file = \"ca.pem\"\norigin_server_name = \"echo.internal\"\n\n\
            [[upstreams]]\nname = \"c\"\npath_prefix = \"/c/\"\norigin = \"wss://[::1]\"\n\n\
            [[upstreams]]\nname = \"d\"\npath_prefix = \"/d/\"\norigin = \"wss://x.example\"\n\
            origin_server_name = \"[2001:db8::1]\"\n\n\
            [[upstreams]]\nname = \"e\"\npath_prefix = \"/e/\"\norigin = \"ws://x.example\"\n";
        let c = Config::parse(text, "t.toml").unwrap();
        let tls = |i: usize| {
            let r = &c.upstreams[i];
            (r.origin.port, r.origin_ca_file.clone(), r.origin_server_name.clone())
        };
        // Defaults: the system bundle, the origin's host (lowercased; an
        // IPv6 literal without brackets).
        assert_eq!(tls(0), (443, Some(PathBuf::from(SYSTEM_CA_FILE)), Some("chat.example".into())));
        assert_eq!(tls(1), (8443, Some(PathBuf::from("ca.pem")), Some("echo.internal".into())));
        assert_eq!(tls(2), (443, Some(PathBuf::from(SYSTEM_CA_FILE)), Some("::1".into())));
        assert_eq!(tls(3).2.as_deref(), Some("2001:db8::1"));
        assert_eq!(tls(4), (80, None, None), "ws:// routes have no TLS settings");
        // The bootstrap lists every route, TLS settings for wss:// only,
        // CA files absolute.
        let boot = c.upstream_bootstrap().unwrap();
        let names: Vec<&str> = boot.iter().map(|b| b.route.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        let b = boot[1].tls.as_ref().unwrap();
        assert_eq!(b.server_name, "echo.internal");
        assert!(b.ca_file.starts_with('/') && b.ca_file.ends_with("/ca.pem"), "{}", b.ca_file);
        assert_eq!(boot[0].tls.as_ref().unwrap().ca_file, SYSTEM_CA_FILE);
        assert!(boot[4].tls.is_none());
        relay_proto::channel::bootstrap::validate_upstreams(&boot).unwrap();
        // The effective config prints the resolved keys and reads back.
        let printed = c.effective_toml();
        assert!(printed.contains("origin = \"wss://Chat.Example\""), "{printed}");
        let again = Config::parse(&printed, "t.toml").unwrap();
        let strip = |c: &Config| {
            c.upstreams.iter().map(|r| UpstreamRoute { name_offset: 0, ..r.clone() }).collect::<Vec<_>>()
        };
        assert_eq!(strip(&again), strip(&c));
    }

    #[test]
    fn wss_keys_are_refused_on_ws_routes_and_checked_on_wss_routes() {
        let err = |route: &str| {
            let text = format!("[[upstreams]]\nname = \"r1\"\npath_prefix = \"/x/\"\n{route}\n");
            Config::parse(&text, "t.toml").unwrap_err().to_string()
        };
        for (route, message) in [
            (
                "origin = \"ws://127.0.0.1:9\"\norigin_ca_file = \"/ca.pem\"",
                "upstreams route \"r1\": origin_ca_file applies to wss:// and https:// origins only (the origin is ws://127.0.0.1:9)",
            ),
            (
                "origin = \"ws://127.0.0.1:9\"\norigin_server_name = \"x.example\"",
                "upstreams route \"r1\": origin_server_name applies to wss:// and https:// origins only",
            ),
            (
                "origin = \"wss://127.0.0.1\"\norigin_server_name = \"X.example\"",
                "upstreams route \"r1\": origin_server_name \"X.example\" must be written in lowercase",
            ),
            (
                "origin = \"wss://127.0.0.1\"\norigin_server_name = \"*.example\"",
                "origin_server_name \"*.example\" is neither a DNS name nor an IP literal",
            ),
            (
                "origin = \"wss://127.0.0.1\"\norigin_ca_file = \"\"",
                "upstreams route \"r1\": origin_ca_file must be",
            ),
            (
                "origin = \"ws://127.0.0.1:9\"\norigin_http = \"auto\"",
                "upstreams route \"r1\": origin_http \"auto\" chooses by ALPN and needs a wss:// origin",
            ),
            (
                "origin = \"wss://127.0.0.1\"\norigin_http = \"h3\"",
                "upstreams route \"r1\": origin_http must be \"http/1.1\", \"h2\" or \"auto\", not \"h3\"",
            ),
            (
                "protocol = \"webtransport\"\norigin = \"https://127.0.0.1\"\norigin_http = \"h2\"",
                "upstreams route \"r1\": origin_http applies to websocket routes only",
            ),
        ] {
            let e = err(route);
            assert!(e.contains(message), "{route}: {e}");
        }
    }

    #[test]
    fn webtransport_routes_take_https_origins_with_tls_settings() {
        let text = "[[upstreams]]\nname = \"chat\"\npath_prefix = \"/chat/\"\norigin = \"ws://127.0.0.1:9001\"\n\n\
            [[upstreams]]\nname = \"wt\"\nprotocol = \"webtransport\"\nhosts = [\"wt.example\"]\n\
            path_prefix = \"/wt/\"\norigin = \"https://WT.Internal\"\nprefix_rewrite = \"/\"\n\
            host_header = \"wt.example\"\nauth = \"public\"\ntrusted_origin = true\nidle_timeout_secs = 60\n\n\
            [[upstreams]]\nname = \"wt2\"\nprotocol = \"webtransport\"\npath_prefix = \"/\"\n\
            origin = \"https://[::1]:4433\"\norigin_ca_file = \"ca.pem\"\norigin_server_name = \"echo.internal\"\n";
        let c = Config::parse(text, "t.toml").unwrap();
        let wt = &c.upstreams[1];
        assert_eq!((wt.protocol, wt.protocol.as_str()), (UpstreamProtocol::Webtransport, "webtransport"));
        assert_eq!((wt.origin.scheme, wt.origin.tls), (OriginScheme::Https, true));
        assert_eq!(wt.origin.host, TargetHost::Name("wt.internal".into()));
        assert_eq!(
            (wt.origin.port, wt.origin.authority.as_str()),
            (443, "WT.Internal"),
            "UDP 443 by default"
        );
        assert_eq!(wt.origin.to_string(), "https://WT.Internal");
        // Every other key as for websocket routes.
        assert_eq!(
            (wt.prefix_rewrite.as_deref(), wt.host_header.as_deref(), wt.auth),
            (Some("/"), Some("wt.example"), UpstreamAuth::Public)
        );
        assert_eq!((wt.trusted_origin, wt.idle_timeout_secs), (true, 60));
        // TLS always: the system bundle and the origin's host by default.
        assert_eq!(
            (wt.origin_ca_file.clone(), wt.origin_server_name.as_deref()),
            (Some(PathBuf::from(SYSTEM_CA_FILE)), Some("wt.internal"))
        );
        let wt2 = &c.upstreams[2];
        assert_eq!((wt2.origin.port, wt2.origin.authority.as_str()), (4433, "[::1]:4433"));
        assert_eq!(
            (wt2.origin_ca_file.clone(), wt2.origin_server_name.as_deref()),
            (Some(PathBuf::from("ca.pem")), Some("echo.internal"))
        );
        // Served: websocket, then webtransport; each alone too.
        assert_eq!(c.served_protocols(), [Protocol::ConnectUdp, Protocol::Websocket, Protocol::Webtransport]);
        let only_wt =
            Config::parse(&text[text.find("[[upstreams]]\nname = \"wt\"").unwrap()..], "t.toml").unwrap();
        assert_eq!(only_wt.served_protocols(), [Protocol::ConnectUdp, Protocol::Webtransport]);
        // The bootstrap: TLS settings for the https:// routes, CA files
        // absolute; the dataplane's check accepts them.
        let boot = c.upstream_bootstrap().unwrap();
        assert!(boot[0].tls.is_none());
        let tls = boot[1].tls.as_ref().unwrap();
        assert_eq!((tls.server_name.as_str(), tls.ca_file.as_str()), ("wt.internal", SYSTEM_CA_FILE));
        let tls = boot[2].tls.as_ref().unwrap();
        assert_eq!(tls.server_name, "echo.internal");
        assert!(tls.ca_file.starts_with('/') && tls.ca_file.ends_with("/ca.pem"), "{}", tls.ca_file);
        relay_proto::channel::bootstrap::validate_upstreams(&boot).unwrap();
        // --check-config prints the protocol and origin, and reads back.
        let printed = c.effective_toml();
        assert!(
            printed.contains("protocol = \"webtransport\"")
                && printed.contains("origin = \"https://WT.Internal\""),
            "{printed}"
        );
        let again = Config::parse(&printed, "t.toml").unwrap();
        let strip = |c: &Config| {
            c.upstreams.iter().map(|r| UpstreamRoute { name_offset: 0, ..r.clone() }).collect::<Vec<_>>()
        };
        assert_eq!(strip(&again), strip(&c));
        // The TLS keys are checked on https:// origins as on wss:// ones.
        let err = |keys: &str| {
            let text = format!(
                "[[upstreams]]\nname = \"r1\"\nprotocol = \"webtransport\"\npath_prefix = \"/x/\"\n\
                 origin = \"https://127.0.0.1\"\n{keys}\n"
            );
            Config::parse(&text, "t.toml").unwrap_err().to_string()
        };
        let e = err("origin_server_name = \"X.example\"");
        assert!(
            e.contains(
                "upstreams route \"r1\": origin_server_name \"X.example\" must be written in lowercase"
            ),
            "{e}"
        );
        let e = err("origin_ca_file = \"\"");
        assert!(e.contains("upstreams route \"r1\": origin_ca_file must be a path of 1..=1024 bytes"), "{e}");
    }

    #[test]
    fn ca_files_are_checked_at_start_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("relay-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.pem");
        let ca = {
            use boring::ec::{EcGroup, EcKey};
            use boring::nid::Nid;
            use boring::pkey::PKey;
            let key = PKey::from_ec_key(
                EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
            )
            .unwrap();
            let mut name = boring::x509::X509NameBuilder::new().unwrap();
            name.append_entry_by_text("CN", "test CA").unwrap();
            let name = name.build();
            let mut b = boring::x509::X509::builder().unwrap();
            b.set_version(2).unwrap();
            b.set_subject_name(&name).unwrap();
            b.set_issuer_name(&name).unwrap();
            b.set_pubkey(&key).unwrap();
            b.set_not_before(&boring::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
            b.set_not_after(&boring::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
            b.sign(&key, boring::hash::MessageDigest::sha256()).unwrap();
            b.build().to_pem().unwrap()
        };
        std::fs::write(&good, &ca).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, b"not a certificate\n").unwrap();
        let missing = dir.join("missing.pem");
        let config = |ca: &Path| {
            let text = format!(
                "[[upstreams]]\nname = \"r1\"\npath_prefix = \"/x/\"\norigin = \"wss://127.0.0.1\"\n\
                 origin_ca_file = {:?}\n",
                ca.display().to_string()
            );
            Config::parse(&text, "t.toml").unwrap()
        };
        assert_eq!(config(&good).check_upstream_ca_files(), Ok(()));
        assert_eq!(read_ca_file(&good).unwrap().len(), 1);
        for bad in [&garbage, &missing] {
            let e = config(bad).check_upstream_ca_files().unwrap_err();
            assert!(
                e.contains("upstreams route \"r1\": origin_ca_file")
                    && e.contains(&bad.display().to_string()),
                "{e}"
            );
        }
        // https:// (webtransport) routes are checked the same way.
        let wt = |ca: &Path| {
            let text = format!(
                "[[upstreams]]\nname = \"wt\"\nprotocol = \"webtransport\"\npath_prefix = \"/x/\"\n\
                 origin = \"https://127.0.0.1\"\norigin_ca_file = {:?}\n",
                ca.display().to_string()
            );
            Config::parse(&text, "t.toml").unwrap()
        };
        assert_eq!(wt(&good).check_upstream_ca_files(), Ok(()));
        let e = wt(&missing).check_upstream_ca_files().unwrap_err();
        assert!(e.contains("upstreams route \"wt\": origin_ca_file") && e.contains("missing.pem"), "{e}");
        // ws:// routes have no CA file to check.
        assert_eq!(Config::parse(ROUTES, "t.toml").unwrap().check_upstream_ca_files(), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn upstream_route_errors_name_the_route_key_and_line() {
        let err = |text: &str| Config::parse(text, "t.toml").unwrap_err().to_string();
        let base = "[log]\nlog_targets = false\n\n[[upstreams]]\nname = \"r1\"\npath_prefix = \"/x/\"\norigin = \"ws://127.0.0.1:9\"\n";
        for (edit, message) in [
            (
                "protocol = \"http\"",
                "upstreams route \"r1\": protocol must be \"websocket\" or \"webtransport\", not \"http\"",
            ),
            ("protocol = \"WebSocket\"", "protocol must be \"websocket\""),
            ("protocol = \"WebTransport\"", "protocol must be \"websocket\" or \"webtransport\""),
            (
                "protocol = \"webtransport\"",
                "upstreams route \"r1\": origin \"ws://127.0.0.1:9\": a webtransport route's origin must be https://host[:port] (WebTransport reaches its origins over HTTP/3)",
            ),
            ("auth = \"none\"", "upstreams route \"r1\": auth must be \"relay\" or \"public\", not \"none\""),
            (
                "hosts = [\"Chat.example\"]",
                "upstreams route \"r1\": hosts entry \"Chat.example\" must be written in lowercase",
            ),
            (
                "hosts = [\"chat.example.\"]",
                "hosts entry \"chat.example.\" must be written in lowercase, without a trailing dot",
            ),
            ("hosts = [\"*.example\"]", "hosts entry \"*.example\" is neither a DNS name nor an IP literal"),
            ("hosts = [\"a.example:443\"]", "hosts entry"),
            (
                "prefix_rewrite = \"v2/\"",
                "upstreams route \"r1\": prefix_rewrite must start with '/', not \"v2/\"",
            ),
            ("prefix_rewrite = \"/a?b\"", "prefix_rewrite must be visible ASCII without '?' or '#'"),
            ("prefix_rewrite = \"/a b\"", "prefix_rewrite must be visible ASCII"),
            ("host_header = \"a/b\"", "upstreams route \"r1\": host_header must be"),
            ("host_header = \"\"", "host_header must be"),
            ("host_header = \"a b\"", "host_header must be"),
            ("idle_timeout_secs = -1", "upstreams route \"r1\": idle_timeout_secs must be 0..=86400, not -1"),
            ("idle_timeout_secs = 86401", "idle_timeout_secs must be 0..=86400, not 86401"),
        ] {
            let text = format!("{base}{edit}\n");
            let e = err(&text);
            assert!(e.contains(message) && e.contains("line 4"), "{edit}: {e}");
        }
        // Type errors and unknown keys: the line of the key itself.
        for (edit, message) in [
            ("trusted_origin = \"yes\"", "expected a boolean"),
            ("idle_timeout_secs = \"1\"", "idle_timeout_secs"),
            ("hosts = \"a.example\"", "expected a sequence"),
            ("colour = \"red\"", "unknown field `colour`"),
        ] {
            let e = err(&format!("{base}{edit}\n"));
            assert!(e.contains(message) && e.contains("line 8"), "{edit}: {e}");
        }
        for (from, to, message) in [
            (
                "name = \"r1\"",
                "name = \"R1\"",
                "upstreams: name must be 1..=32 bytes of a-z 0-9 _ -, not \"R1\"",
            ),
            ("name = \"r1\"", "name = \"\"", "upstreams: name must be"),
            ("name = \"r1\"", "name = \"abcdefghijklmnopqrstuvwxyz0123456\"", "upstreams: name must be"),
            (
                "path_prefix = \"/x/\"",
                "path_prefix = \"x/\"",
                "upstreams route \"r1\": path_prefix must start with '/', not \"x/\"",
            ),
            ("path_prefix = \"/x/\"", "path_prefix = \"\"", "path_prefix must start with '/'"),
            ("path_prefix = \"/x/\"", "path_prefix = \"/x#\"", "path_prefix must be visible ASCII"),
            (
                "origin = \"ws://127.0.0.1:9\"",
                "origin = \"http://h\"",
                "upstreams route \"r1\": origin \"http://h\" is not ws://host[:port], wss://host[:port] or https://host[:port]",
            ),
            (
                "origin = \"ws://127.0.0.1:9\"",
                "origin = \"https://h\"",
                "upstreams route \"r1\": origin \"https://h\": a websocket route's origin must be ws://host[:port] or wss://host[:port] (protocol is \"websocket\" when not written; set protocol = \"webtransport\" for an https:// origin)",
            ),
            (
                "origin = \"ws://127.0.0.1:9\"",
                "protocol = \"websocket\"\norigin = \"https://h\"",
                "upstreams route \"r1\": origin \"https://h\": a websocket route's origin must be ws://host[:port] or wss://host[:port]",
            ),
            (
                "origin = \"ws://127.0.0.1:9\"",
                "protocol = \"webtransport\"\norigin = \"wss://h\"",
                "upstreams route \"r1\": origin \"wss://h\": a webtransport route's origin must be https://host[:port]",
            ),
            ("path_prefix = \"/x/\"\n", "", "missing field `path_prefix`"),
            ("origin = \"ws://127.0.0.1:9\"\n", "", "missing field `origin`"),
        ] {
            let text = base.replace(from, to);
            let e = err(&text);
            assert!(e.contains(message) && e.contains("line 4"), "{to}: {e}");
        }
        let e = err(&format!("{base}host_header = \"{}\"\n", "h".repeat(256)));
        assert!(e.contains("host_header must be"), "{e}");
        // Duplicate names, with both lines.
        let dup =
            format!("{base}\n[[upstreams]]\nname = \"r1\"\npath_prefix = \"/\"\norigin = \"ws://[::1]\"\n");
        let e = err(&dup);
        assert!(
            e.contains(
                "upstreams[1] (name \"r1\", line 10): the name is already used by upstreams[0] (line 5)"
            ),
            "{e}"
        );
        // A bound on the number of routes.
        let many: String = (0..=MAX_UPSTREAMS)
            .map(|i| format!("[[upstreams]]\nname = \"r{i}\"\npath_prefix = \"/\"\norigin = \"ws://h\"\n"))
            .collect();
        assert!(err(&many).contains("upstreams: at most 256 routes"));
        // The defaults parse.
        Config::parse(base, "t.toml").unwrap();
    }

    #[test]
    fn tcp_front_defaults_and_bootstrap() {
        let c = Config::load(None).unwrap();
        assert!(c.protocols.connect_tcp);
        assert_eq!(c.protocols.served(), [Protocol::ConnectUdp], "classic CONNECT has no :protocol");
        assert_eq!(c.tcp, TcpSection::default());
        assert_eq!(
            c.tcp_bootstrap(),
            Some(TcpBootstrap {
                listen_tls: Some("127.0.0.1:4433".parse().unwrap()),
                listen_cleartext: None,
                alt_svc: Some("h3=\":4433\"; ma=86400".into()),
                max_connections_per_worker: 10_000,
                handshake_timeout_ms: 10_000,
                idle_timeout_ms: 120_000,
                max_streams_per_connection: 100,
                tunnel_buffer_bytes: 262_144,
                status_endpoint: true,
            })
        );
        // Without `listen.tcp`: the QUIC address, over TCP.
        let text = full()
            .replace("tcp = \"127.0.0.1:4433\"\n", "")
            .replace("quic = \"127.0.0.1:4433\"", "quic = \"[::1]:8443\"");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(c.listen.tcp.is_none());
        let tcp = c.tcp_bootstrap().unwrap();
        assert_eq!(tcp.listen_tls, Some("[::1]:8443".parse().unwrap()));
        assert_eq!(tcp.alt_svc.as_deref(), Some("h3=\":8443\"; ma=86400"), "auto follows listen.quic");
        // Without the [tcp] section: its defaults.
        let cut = text.find("\n[tcp]").unwrap();
        assert_eq!(Config::parse(&text[..cut], "t.toml").unwrap().tcp, TcpSection::default());
        // "" turns TLS over TCP off; with no cleartext listener the front is off.
        let off = full().replace("tcp = \"127.0.0.1:4433\"", "tcp = \"\"");
        let c = Config::parse(&off, "t.toml").unwrap();
        assert_eq!((c.listen.tcp_tls(), c.tcp_bootstrap()), (None, None));
        // Cleartext only (a TLS-terminating balancer in front).
        let clear = off.replace("# tcp_cleartext = \"127.0.0.1:8080\"", "tcp_cleartext = \"10.0.0.5:8080\"");
        let tcp = Config::parse(&clear, "t.toml").unwrap().tcp_bootstrap().unwrap();
        assert_eq!((tcp.listen_tls, tcp.listen_cleartext), (None, Some("10.0.0.5:8080".parse().unwrap())));
        let both =
            full().replace("# tcp_cleartext = \"127.0.0.1:8080\"", "tcp_cleartext = \"127.0.0.1:8080\"");
        let tcp = Config::parse(&both, "t.toml").unwrap().tcp_bootstrap().unwrap();
        assert_eq!(tcp.listen_tls, Some("127.0.0.1:4433".parse().unwrap()));
        assert_eq!(tcp.listen_cleartext, Some("127.0.0.1:8080".parse().unwrap()));
        let none = full().replace("# tcp_cleartext = \"127.0.0.1:8080\"", "tcp_cleartext = \"\"");
        assert_eq!(Config::parse(&none, "t.toml").unwrap().listen.tcp_cleartext_addr(), None);
        // Every [tcp] key lands in the bootstrap.
        let tuned = tcp_edit(&[
            ("alt_svc = \"auto\"", "alt_svc = \"h3=\\\":443\\\"; ma=3600, h3=\\\"alt.example:443\\\"\""),
            ("max_connections_per_worker = 10000", "max_connections_per_worker = 7"),
            ("handshake_timeout_ms = 10000", "handshake_timeout_ms = 100"),
            ("idle_timeout_secs = 120", "idle_timeout_secs = 86400"),
            ("max_streams_per_connection = 100", "max_streams_per_connection = 10000"),
            ("tunnel_buffer_bytes = 262144", "tunnel_buffer_bytes = 16384"),
            ("status_endpoint = true", "status_endpoint = false"),
        ]);
        let c = Config::parse(&tuned, "t.toml").unwrap();
        assert_eq!(c.dataplane.max_connections_per_worker, 10_000, "QUIC's own limit is untouched");
        assert_eq!(c.dataplane.flow_idle_timeout_secs, 120, "so is the flow idle timeout");
        let tcp = c.tcp_bootstrap().unwrap();
        assert_eq!(tcp.alt_svc.as_deref(), Some("h3=\":443\"; ma=3600, h3=\"alt.example:443\""));
        assert_eq!(
            (
                tcp.max_connections_per_worker,
                tcp.handshake_timeout_ms,
                tcp.idle_timeout_ms,
                tcp.max_streams_per_connection,
                tcp.tunnel_buffer_bytes,
                tcp.status_endpoint
            ),
            (7, 100, 86_400_000, 10_000, 16_384, false)
        );
        let quiet = tcp_edit(&[("alt_svc = \"auto\"", "alt_svc = \"\"")]);
        assert_eq!(Config::parse(&quiet, "t.toml").unwrap().tcp_bootstrap().unwrap().alt_svc, None);
        // QUIC on an ephemeral port: "auto" cannot name it, so nothing is sent.
        let ephemeral = full().replace("4433", "0");
        assert_eq!(Config::parse(&ephemeral, "t.toml").unwrap().tcp_bootstrap().unwrap().alt_svc, None);
        let text = full().replace("connect_tcp = true", "connect_tcp = false");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(!c.protocols.connect_tcp);
        assert_eq!(c.protocols.served(), [Protocol::ConnectUdp]);
    }

    #[test]
    fn tcp_listeners_are_checked_with_key_and_line() {
        let err = |text: &str| Config::parse(text, "t.toml").unwrap_err().to_string();
        for bad in ["127.0.0.1", "localhost:443", "127.0.0.1:99999", "::1:443", " 127.0.0.1:443"] {
            let text = full().replace("tcp = \"127.0.0.1:4433\"", &format!("tcp = {bad:?}"));
            let e = err(&text);
            let line = line_with(&text, "tcp = ");
            assert!(e.contains("listen.tcp must be") && e.contains(&format!("line {line}")), "{bad}: {e}");
            let text =
                full().replace("# tcp_cleartext = \"127.0.0.1:8080\"", &format!("tcp_cleartext = {bad:?}"));
            let e = err(&text);
            let line = line_with(&text, "tcp_cleartext = ");
            assert!(
                e.contains("listen.tcp_cleartext must be") && e.contains(&format!("line {line}")),
                "{bad}: {e}"
            );
        }
        assert!(err(&full().replace("tcp = \"127.0.0.1:4433\"", "tcp = 443")).contains("line"));
        // The cleartext listener on the TLS listener's address.
        let text =
            full().replace("# tcp_cleartext = \"127.0.0.1:8080\"", "tcp_cleartext = \"127.0.0.1:4433\"");
        let e = err(&text);
        let (line, tls_line) = (line_with(&text, "tcp_cleartext = "), line_with(&text, "tcp = "));
        assert!(
            e.contains(&format!("listen.tcp_cleartext (line {line}) = \"127.0.0.1:4433\""))
                && e.contains(&format!("listen.tcp (line {tls_line})")),
            "{e}"
        );
        // ... also when listen.tcp is absent and so is listen.quic's address.
        let e = err(&text.replace("tcp = \"127.0.0.1:4433\"\n", ""));
        assert!(
            e.contains("listen.tcp_cleartext (line") && e.contains("absent: the address of listen.quic"),
            "{e}"
        );
        // Fine when the TLS listener is off, or on another port.
        Config::parse(&text.replace("tcp = \"127.0.0.1:4433\"\n", "tcp = \"\"\n"), "t.toml").unwrap();
        Config::parse(&text.replace("tcp = \"127.0.0.1:4433\"\n", "tcp = \"127.0.0.1:4434\"\n"), "t.toml")
            .unwrap();
        // Either on the metrics endpoint's address.
        let e = err(&full().replace("tcp = \"127.0.0.1:4433\"", "tcp = \"127.0.0.1:9464\""));
        assert!(e.contains("listen.tcp (line") && e.contains("is also listen.metrics"), "{e}");
        let e = err(
            &full().replace("# tcp_cleartext = \"127.0.0.1:8080\"", "tcp_cleartext = \"127.0.0.1:9464\"")
        );
        assert!(e.contains("listen.tcp_cleartext (line") && e.contains("is also listen.metrics"), "{e}");
        // Port 0 is a fresh ephemeral port for every socket: no collision.
        let zero = full()
            .replace("9464", "0")
            .replace("4433", "0")
            .replace("# tcp_cleartext = \"127.0.0.1:8080\"", "tcp_cleartext = \"127.0.0.1:0\"");
        Config::parse(&zero, "t.toml").unwrap();
    }

    #[test]
    fn tcp_section_values_are_checked_with_key_and_line() {
        let err = |text: &str| Config::parse(text, "t.toml").unwrap_err().to_string();
        for (line, bad, key) in [
            (
                "max_connections_per_worker = 10000",
                "max_connections_per_worker = 0",
                "tcp.max_connections_per_worker must be 1..=1000000, not 0",
            ),
            ("max_connections_per_worker = 10000", "max_connections_per_worker = 1000001", "not 1000001"),
            (
                "handshake_timeout_ms = 10000",
                "handshake_timeout_ms = 99",
                "tcp.handshake_timeout_ms must be 100..=600000, not 99",
            ),
            ("handshake_timeout_ms = 10000", "handshake_timeout_ms = 600001", "tcp.handshake_timeout_ms"),
            (
                "idle_timeout_secs = 120",
                "idle_timeout_secs = 0",
                "tcp.idle_timeout_secs must be 1..=86400, not 0",
            ),
            ("idle_timeout_secs = 120", "idle_timeout_secs = 86401", "tcp.idle_timeout_secs"),
            (
                "max_streams_per_connection = 100",
                "max_streams_per_connection = 0",
                "tcp.max_streams_per_connection must be 1..=10000",
            ),
            (
                "max_streams_per_connection = 100",
                "max_streams_per_connection = 10001",
                "tcp.max_streams_per_connection",
            ),
            (
                "tunnel_buffer_bytes = 262144",
                "tunnel_buffer_bytes = 16383",
                "tcp.tunnel_buffer_bytes must be 16384..=16777216, not 16383",
            ),
            ("tunnel_buffer_bytes = 262144", "tunnel_buffer_bytes = 16777217", "tcp.tunnel_buffer_bytes"),
            ("tunnel_buffer_bytes = 262144", "tunnel_buffer_bytes = -1", "not -1"),
            ("tunnel_buffer_bytes = 262144", "tunnel_buffer_bytes = 99999999999", "tcp.tunnel_buffer_bytes"),
            ("tunnel_buffer_bytes = 262144", "tunnel_buffer_bytes = \"big\"", "tunnel_buffer_bytes"),
            ("status_endpoint = true", "status_endpoint = \"yes\"", "status_endpoint"),
            ("status_endpoint = true", "status_endpointz = true", "status_endpointz"),
            (
                "alt_svc = \"auto\"",
                "alt_svc = \"h3=\\\":443\\\"\\r\\nSet-Cookie: x\"",
                "tcp.alt_svc may hold only visible ASCII",
            ),
            ("alt_svc = \"auto\"", "alt_svc = \"h3=\\\":443\\\"\\n\"", "tcp.alt_svc may hold only"),
            ("alt_svc = \"auto\"", "alt_svc = \"h3=\\\":443\\\";\\tma=60\"", "tcp.alt_svc may hold only"),
            (
                "alt_svc = \"auto\"",
                "alt_svc = \"h3=\\\":443\\\"; ma=60 \"",
                "tcp.alt_svc must not start or end with a space",
            ),
            ("alt_svc = \"auto\"", "alt_svc = \"h3=\\\"é:443\\\"\"", "tcp.alt_svc may hold only"),
            ("alt_svc = \"auto\"", "alt_svc = true", "alt_svc"),
        ] {
            let text = tcp_edit(&[(line, bad)]);
            let e = err(&text);
            let key_line = tcp_line(&text, bad.split([' ', '=']).next().unwrap());
            assert!(e.contains(key) && e.contains(&format!("line {key_line}")), "{bad}: {e}");
        }
        let long = format!("alt_svc = \"h3=\\\":443\\\"; ma={}\"", "9".repeat(MAX_ALT_SVC));
        let e = err(&tcp_edit(&[("alt_svc = \"auto\"", &long)]));
        assert!(e.contains("tcp.alt_svc is longer than 512 bytes"), "{e}");
        let just = format!("h3=\":443\"; ma={}", "9".repeat(MAX_ALT_SVC - 14));
        assert_eq!(just.len(), MAX_ALT_SVC);
        let text = tcp_edit(&[("alt_svc = \"auto\"", &format!("alt_svc = {just:?}"))]);
        assert_eq!(Config::parse(&text, "t.toml").unwrap().tcp_bootstrap().unwrap().alt_svc, Some(just));
        // The bounds themselves are accepted.
        let edges = tcp_edit(&[
            ("max_connections_per_worker = 10000", "max_connections_per_worker = 1000000"),
            ("handshake_timeout_ms = 10000", "handshake_timeout_ms = 600000"),
            ("idle_timeout_secs = 120", "idle_timeout_secs = 1"),
            ("max_streams_per_connection = 100", "max_streams_per_connection = 1"),
            ("tunnel_buffer_bytes = 262144", "tunnel_buffer_bytes = 16777216"),
        ]);
        let t = Config::parse(&edges, "t.toml").unwrap().tcp;
        assert_eq!(
            (
                t.max_connections_per_worker,
                t.handshake_timeout_ms,
                t.idle_timeout_secs,
                t.max_streams_per_connection,
                t.tunnel_buffer_bytes
            ),
            (1_000_000, 600_000, 1, 1, 16_777_216)
        );
    }
}

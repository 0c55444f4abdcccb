//! The control process's configuration (TOML).
//!
//! Parse errors name the line, column and key (the `toml` crate reports
//! them, and every value type here validates inside deserialization so that
//! its errors carry positions too). Unknown keys are errors.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use relay_proto::template::UriTemplate;
use serde::Deserialize;

use crate::acl::{Cidr, PortRange};

/// The embedded default configuration (a demo relay on loopback).
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and state.
    pub relay: RelaySection,
    /// Listening addresses.
    pub listen: ListenSection,
    /// Dataplane settings.
    pub dataplane: DataplaneSection,
    /// TLS credentials.
    #[serde(default)]
    pub tls: TlsSection,
    /// Client authentication.
    pub auth: AuthSection,
    /// Target policy.
    pub targets: TargetsSection,
    /// DNS resolution.
    #[serde(default)]
    pub resolver: ResolverSection,
}

/// `[relay]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Proxy name used in Proxy-Status.
    #[serde(default = "default_name")]
    pub name: String,
    /// Directory for generated state (relative to the working directory).
    pub state_dir: PathBuf,
    /// Unix socket the dataplane attaches to (default: state_dir/channel.sock).
    pub channel_socket: Option<PathBuf>,
    /// Unix socket relayctl talks to (default: state_dir/admin.sock).
    pub admin_socket: Option<PathBuf>,
}

fn default_name() -> String {
    "masque-relay".into()
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// UDP address for QUIC.
    pub quic: SocketAddr,
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

/// `[dataplane]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    /// Worker threads: a number, or `"auto"` for one per CPU the relay may
    /// run on (its affinity mask and cgroup quota).
    #[serde(default)]
    pub workers: Workers,
    /// I/O backend of the workers.
    #[serde(default)]
    pub io: IoBackend,
    /// Pin worker i to the i-th CPU of the relay's affinity mask.
    #[serde(default = "yes")]
    pub pin_workers: bool,
    /// Connection IDs (QUIC-LB layout) and their steering.
    #[serde(default)]
    pub connection_ids: ConnectionIdSection,
    /// connect-udp URI template.
    pub uri_template: TemplateValue,
    /// A tunnel with no traffic either way for this long is closed.
    #[serde(default = "sixty")]
    pub flow_idle_timeout_secs: u32,
    /// How long a CONNECT waits for control before 503.
    #[serde(default = "two_thousand")]
    pub ask_timeout_ms: u32,
    /// QUIC idle timeout.
    #[serde(default = "thirty")]
    pub quic_idle_timeout_secs: u32,
    /// Most QUIC connections per worker.
    #[serde(default = "ten_thousand")]
    pub max_connections_per_worker: u32,
    /// Most tunnels per QUIC connection.
    #[serde(default = "two_five_six")]
    pub max_tunnels_per_connection: u32,
    /// On SIGTERM the dataplane sends GOAWAY, stops accepting, and lets open
    /// tunnels finish for at most this long before closing and exiting 0.
    #[serde(default = "thirty")]
    pub drain_timeout_secs: u32,
}

fn yes() -> bool {
    true
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
                .min(relay_proto::channel::region::MAX_WORKERS),
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
            Raw::Count(n) if (1..=i64::from(relay_proto::channel::region::MAX_WORKERS)).contains(&n) => {
                Ok(Workers::Count(n as u32))
            }
            _ => Err(serde::de::Error::custom(format!(
                "dataplane.workers must be \"auto\" or 1..={}",
                relay_proto::channel::region::MAX_WORKERS
            ))),
        }
    }
}

/// `dataplane.io`: which I/O backend the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
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

impl IoBackend {
    /// The name sent to the dataplane.
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::IoUring => "io_uring",
            IoBackend::Epoll => "epoll",
        }
    }
}

/// `[dataplane.connection_ids]`: server connection IDs in the QUIC-LB
/// plaintext layout (draft-ietf-quic-load-balancers): config rotation bits,
/// the server ID (this host's prefix, then the worker), a random nonce.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionIdSection {
    /// Config rotation codepoint, 0..=6 (7 means unroutable).
    #[serde(default)]
    pub config_id: u8,
    /// This host's server ID prefix as hex (empty for a single host; a
    /// QUIC-LB balancer maps prefix + worker byte to this host).
    #[serde(default)]
    pub server_id: String,
    /// Random nonce bytes after the server ID.
    #[serde(default = "fourteen")]
    pub nonce_len: usize,
    /// Attach a reuseport BPF program that steers packets to the worker
    /// named in their connection ID (hand-offs between workers become rare).
    #[serde(default = "yes")]
    pub steering: bool,
}

impl Default for ConnectionIdSection {
    fn default() -> Self {
        Self { config_id: 0, server_id: String::new(), nonce_len: 14, steering: true }
    }
}

fn fourteen() -> usize {
    14
}

/// Parses a hex string (even length).
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}
fn sixty() -> u32 {
    60
}
fn thirty() -> u32 {
    30
}
fn two_thousand() -> u32 {
    2000
}
fn ten_thousand() -> u32 {
    10_000
}
fn two_five_six() -> u32 {
    256
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Names for the generated self-signed certificate.
    #[serde(default)]
    pub self_signed_names: Vec<String>,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Realm in Proxy-Authenticate challenges.
    #[serde(default = "default_name")]
    pub realm: String,
    /// Accepted bearer tokens. Empty: one is generated into
    /// state_dir/token.
    #[serde(default)]
    pub tokens: Vec<String>,
}

/// `[targets]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsSection {
    /// Ranges allowed even if special-purpose.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Ranges always denied.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// Allowed target ports (empty: all).
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

/// `[resolver]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
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
        let r = &config.resolver;
        if r.threads == 0 || r.threads > 64 || r.max_pending == 0 || r.timeout_ms == 0 {
            return Err(invalid(
                "resolver.threads must be 1..=64, max_pending and timeout_ms positive".into(),
            ));
        }
        if config.auth.tokens.iter().any(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace())) {
            return Err(invalid("auth.tokens must be non-empty and without whitespace".into()));
        }
        Ok(config)
    }

    /// Loads a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::parse(DEFAULT_CONFIG, "embedded default config"),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                Self::parse(&text, &p.display().to_string())
            }
        }
    }

    /// The channel socket path.
    pub fn channel_socket(&self) -> PathBuf {
        self.relay.channel_socket.clone().unwrap_or_else(|| self.relay.state_dir.join("channel.sock"))
    }

    /// The admin socket path.
    pub fn admin_socket(&self) -> PathBuf {
        self.relay.admin_socket.clone().unwrap_or_else(|| self.relay.state_dir.join("admin.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn errors_name_line_and_key() {
        let text =
            DEFAULT_CONFIG.replace("allow = [\"127.0.0.0/8\", \"::1/128\"]", "allow = [\"127.0.0.0/99\"]");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        let line = DEFAULT_CONFIG.lines().position(|l| l.starts_with("allow =")).unwrap() + 1;
        assert!(err.contains(&format!("line {line}")), "{err}");
        assert!(err.contains("127.0.0.0/99"), "{err}");

        let text = DEFAULT_CONFIG.replace("ask_timeout_ms = 2000", "ask_timeout_msec = 2000");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("ask_timeout_msec") && err.contains("line"), "{err}");

        let text = DEFAULT_CONFIG.replace("{target_port}/", "");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("uri_template") || err.contains("target_port"), "{err}");

        let text = DEFAULT_CONFIG.replace("workers = \"auto\"", "workers = 0");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("dataplane.workers"), "{err}");
        let text = DEFAULT_CONFIG.replace("workers = \"auto\"", "workers = \"many\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("dataplane.workers"), "{err}");
        let text = DEFAULT_CONFIG.replace("workers = \"auto\"", "workers = 3");
        assert_eq!(Config::parse(&text, "t.toml").unwrap().dataplane.workers, Workers::Count(3));

        let text = DEFAULT_CONFIG.replace("io = \"auto\"", "io = \"kqueue\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("kqueue") && err.contains("line"), "{err}");
        let text = DEFAULT_CONFIG.replace("io = \"auto\"", "io = \"epoll\"");
        assert_eq!(Config::parse(&text, "t.toml").unwrap().dataplane.io, IoBackend::Epoll);

        let text = DEFAULT_CONFIG.replace("server_id = \"\"", "server_id = \"0g\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("server_id"), "{err}");
        let text = DEFAULT_CONFIG.replace("config_id = 0", "config_id = 7");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("connection_ids"), "{err}");
        let text = DEFAULT_CONFIG.replace("server_id = \"\"", "server_id = \"0a0b\"");
        assert_eq!(
            parse_hex(&Config::parse(&text, "t.toml").unwrap().dataplane.connection_ids.server_id),
            Some(vec![10, 11])
        );
    }
}

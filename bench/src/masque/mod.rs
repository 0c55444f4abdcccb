//! `masque-client`: the relay for people who just want to use it.
//!
//! - [`forward`]: a local UDP port forwarded to one target through
//!   connect-udp (one tunnel per local peer).
//! - [`socks`]: a local SOCKS5 server (RFC 1928): CONNECT through classic
//!   CONNECT, UDP ASSOCIATE through connect-udp.
//! - [`ip`]: a connect-ip tunnel on a local TUN device.
//!
//! Both [`forward`] and [`socks`] open their tunnels through a
//! [`transport::Transport`]: one connection to the relay, HTTP/3 (the quiche
//! client of [`crate::client`] on its own thread) or HTTP/2 (the h2 client
//! of [`crate::h2client`]), each tunnel a pair of bounded channels.

pub mod flows;
pub mod forward;
pub mod ip;
pub mod socks;
pub mod transport;

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::client::ClientConfig;
use crate::h2client::H2Target;

/// The environment variable that may hold the token.
pub const TOKEN_ENV: &str = "MASQUE_TOKEN";

/// Which HTTP version carries the tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http {
    /// QUIC + HTTP/3 (RFC 9298 HTTP datagrams).
    H3,
    /// TLS + HTTP/2 on the same port number over TCP (DATAGRAM capsules).
    H2,
}

/// How the relay's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// With this CA (or self-signed certificate) file.
    Ca(PathBuf),
    /// With the system's trust store.
    System,
    /// Not at all.
    Insecure,
}

/// Where the relay is and how to talk to it.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    /// The relay's address (QUIC, and TLS over TCP on the same number).
    pub relay: SocketAddr,
    /// TLS server name and `:authority` host.
    pub server_name: String,
    /// Certificate checking.
    pub trust: Trust,
    /// Bearer token (`Proxy-Authorization`).
    pub token: Option<String>,
    /// The relay's connect-udp URI template.
    pub udp_template: String,
    /// HTTP version.
    pub http: Http,
}

impl RelaySpec {
    /// The HTTP/3 client's configuration.
    pub fn h3_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.relay);
        c.server_name = self.server_name.clone();
        c.template = self.udp_template.clone();
        c.token = self.token.clone();
        match &self.trust {
            Trust::Ca(ca) => c.ca = Some(ca.clone()),
            Trust::System => c.system_roots = true,
            Trust::Insecure => {}
        }
        c
    }

    /// The HTTP/2 client's target.
    pub fn h2_target(&self) -> H2Target {
        H2Target {
            relay: self.relay,
            server_name: self.server_name.clone(),
            ca: match &self.trust {
                Trust::Ca(ca) => Some(ca.clone()),
                _ => None,
            },
            insecure: self.trust == Trust::Insecure,
            token: self.token.clone(),
            template: self.udp_template.clone(),
        }
    }
}

/// The token: the first line of `file` if given, else `$MASQUE_TOKEN`
/// (`env`), else none. Never from the command line, where other users
/// of the machine can read it.
pub fn load_token(file: Option<&Path>, env: Option<String>) -> Result<Option<String>> {
    let token = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading --token-file {}", f.display()))?;
            let line = text.lines().next().unwrap_or("").trim().to_string();
            if line.is_empty() {
                bail!("--token-file {} is empty", f.display());
            }
            line
        }
        None => match env {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => return Ok(None),
        },
    };
    if token.chars().any(|c| c.is_control() || c == ' ') {
        bail!("the token holds spaces or control characters");
    }
    Ok(Some(token))
}

/// A `host:port` a tunnel goes to: an IP literal or a DNS name (the relay
/// resolves names).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// IP literal (without brackets) or name.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`, `[v6]:port` or `v4:port`; names are checked
    /// to be DNS names.
    pub fn parse(s: &str) -> Result<Self> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::from(a));
        }
        let (host, port) = s.rsplit_once(':').with_context(|| format!("{s:?}: expected HOST:PORT"))?;
        let port: u16 = port.parse().with_context(|| format!("{s:?}: bad port"))?;
        if !is_dns_name(host) {
            bail!("{s:?}: {host:?} is neither an IP address nor a DNS name");
        }
        Ok(Self { host: host.to_string(), port })
    }

    /// The IP address, when the host is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        Self { host: a.ip().to_string(), port: a.port() }
    }
}

/// `host:port` as an authority (IPv6 literals in brackets).
impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Whether `s` is a plausible DNS name: 1 to 253 characters, labels of
/// letters, digits, `-` and `_` joined by dots.
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Resolves `--relay HOST:PORT`: the address to use and the name to
/// verify (the host as given, unless `server_name` overrides it).
pub fn resolve_relay(relay: &str, server_name: Option<&str>) -> Result<(SocketAddr, String)> {
    let target = HostPort::parse(relay).context("--relay")?;
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving the relay {relay}"))?
        // Prefer IPv4: relays often listen on one family only.
        .min_by_key(|a| a.is_ipv6())
        .with_context(|| format!("the relay {relay} resolves to no address"))?;
    Ok((addr, server_name.map(str::to_string).unwrap_or(target.host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_parse_literals_and_names_and_refuse_the_rest() {
        assert_eq!(HostPort::parse("127.0.0.1:53").unwrap(), HostPort { host: "127.0.0.1".into(), port: 53 });
        assert_eq!(HostPort::parse("[::1]:53").unwrap().host, "::1");
        assert_eq!(HostPort::parse("[::1]:53").unwrap().to_string(), "[::1]:53");
        assert_eq!(HostPort::parse("example.com:443").unwrap().to_string(), "example.com:443");
        for bad in ["example.com", "a b:1", "x:99999", ":53", "ex/ample:1", "[::1]", "a..b:1"] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_comes_from_the_file_then_the_environment() {
        let dir = std::env::temp_dir().join(format!("masque-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "abc123\n").unwrap();
        assert_eq!(load_token(Some(&f), Some("env".into())).unwrap().as_deref(), Some("abc123"));
        assert_eq!(load_token(None, Some("env\n".into())).unwrap().as_deref(), Some("env"));
        assert_eq!(load_token(None, None).unwrap(), None);
        std::fs::write(&f, "\n").unwrap();
        assert!(load_token(Some(&f), None).unwrap_err().to_string().contains("is empty"));
        let missing = dir.join("nope");
        assert!(load_token(Some(&missing), None).unwrap_err().to_string().contains("--token-file"));
        assert!(load_token(None, Some("a\u{7}b".into())).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

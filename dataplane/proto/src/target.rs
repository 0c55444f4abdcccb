//! Target host and port values of a connect-udp request (RFC 9298 section 2).
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted (RFC 1035 section 2.3.4, without the root dot).
pub const MAX_NAME_LEN: usize = 253;

/// A validated `target_host`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetHost {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name (lowercased, without a trailing dot), resolved by control.
    Name(String),
}

impl fmt::Display for TargetHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetHost::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            TargetHost::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            TargetHost::Name(n) => f.write_str(n),
        }
    }
}

/// Why a target value is invalid (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The host is empty.
    #[error("target_host is empty")]
    EmptyHost,
    /// An IPv6 literal carries a zone identifier, which RFC 9298 section 2
    /// does not support.
    #[error("IPv6 zone identifiers are not supported")]
    ZoneId,
    /// The host is neither an IP literal nor a valid DNS name.
    #[error("target_host is not an IP literal or a DNS name")]
    InvalidHost,
    /// The port is not a decimal number in 1..=65535.
    #[error("target_port is not a number in 1..=65535")]
    InvalidPort,
}

impl TargetHost {
    /// Parses a percent-decoded `target_host` value.
    ///
    /// RFC 9298 section 2: the value is an IPv6address, IPv4address or
    /// reg-name; IPv6 literals arrive with their colons percent-encoded.
    /// Brackets around an IPv6 literal are tolerated. Names that could be
    /// read as a shorthand IPv4 address by a resolver (`127.1`, `0x7f.1`) are
    /// refused, so that no name sneaks a numeric address past the ACL.
    pub fn parse(decoded: &str) -> Result<Self, TargetError> {
        if decoded.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        let unbracketed = decoded.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(decoded);
        if unbracketed.contains(':') {
            if unbracketed.contains('%') {
                return Err(TargetError::ZoneId);
            }
            return unbracketed
                .parse::<Ipv6Addr>()
                .map(|a| TargetHost::Ip(IpAddr::V6(a)))
                .map_err(|_| TargetError::InvalidHost);
        }
        if unbracketed.len() != decoded.len() {
            return Err(TargetError::InvalidHost);
        }
        if let Ok(v4) = decoded.parse::<Ipv4Addr>() {
            return Ok(TargetHost::Ip(IpAddr::V4(v4)));
        }
        validate_name(decoded).map(TargetHost::Name)
    }
}

pub(crate) fn validate_name(name: &str) -> Result<String, TargetError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(TargetError::InvalidHost);
    }
    let mut last_label = "";
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(TargetError::InvalidHost);
        }
        last_label = label;
    }
    // A numeric last label (or a hex one like 0x7f) makes resolvers parse
    // the whole name as an inet_aton-style address.
    let numeric = last_label.bytes().all(|b| b.is_ascii_digit())
        || (last_label.len() > 2
            && last_label[..2].eq_ignore_ascii_case("0x")
            && last_label[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(TargetError::InvalidHost);
    }
    Ok(name.to_ascii_lowercase())
}

/// Parses a percent-decoded `target_port` value: decimal digits only.
pub fn parse_port(decoded: &str) -> Result<u16, TargetError> {
    if decoded.is_empty() || decoded.len() > 5 || !decoded.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::InvalidPort);
    }
    match decoded.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError::InvalidPort),
        Ok(p) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_names() {
        assert_eq!(TargetHost::parse("192.0.2.6"), Ok(TargetHost::Ip("192.0.2.6".parse().unwrap())));
        assert_eq!(TargetHost::parse("2001:db8::42"), Ok(TargetHost::Ip("2001:db8::42".parse().unwrap())));
        assert_eq!(TargetHost::parse("[2001:db8::42]"), Ok(TargetHost::Ip("2001:db8::42".parse().unwrap())));
        assert_eq!(TargetHost::parse("Example.COM."), Ok(TargetHost::Name("example.com".into())));
        assert_eq!(
            TargetHost::parse("_svc.example-1.org"),
            Ok(TargetHost::Name("_svc.example-1.org".into()))
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(TargetHost::parse(""), Err(TargetError::EmptyHost));
        assert_eq!(TargetHost::parse("fe80::1%eth0"), Err(TargetError::ZoneId));
        for bad in [
            "127.1",
            "0x7f.1",
            "01.2.3.4",
            "a..b",
            "-a.com",
            "a-.com",
            "exa mple.com",
            "[1.2.3.4]",
            "a/b",
            "2001:db8::zz",
        ] {
            assert!(TargetHost::parse(bad).is_err(), "{bad}");
        }
        assert!(TargetHost::parse(&"a".repeat(64)).is_err());
        assert!(TargetHost::parse(&["a"; 130].join(".")).is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("443"), Ok(443));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in ["", "0", "65536", "+1", "-1", " 1", "1a", "000443"] {
            assert_eq!(parse_port(bad), Err(TargetError::InvalidPort), "{bad}");
        }
    }

    #[test]
    fn display_brackets_v6() {
        assert_eq!(TargetHost::parse("::1").unwrap().to_string(), "[::1]");
    }
}

//! The scope of a connect-ip request (RFC 9484 section 4.6): the `target`
//! and `ipproto` template variables, and what they let through.
//!
//! Figure 6 of RFC 9484:
//!
//! ```text
//! target = IPv6prefix / IPv4prefix / reg-name / "*"
//! IPv6prefix = IPv6address ["%2F" 1*3DIGIT]
//! IPv4prefix = IPv4address ["%2F" 1*2DIGIT]
//! ipproto = 1*3DIGIT / "*"
//! ```
//!
//! The parsers here take the percent-decoded values, so the `%2F` is a `/`
//! and the IPv6 colons are plain.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::capsule::{IpAddressRange, IpPrefix, ranges_for};
use super::packet::{PROTO_ICMP, PROTO_ICMPV6};

/// A decoded `target` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpTarget {
    /// `*` (or no `target` variable): any allowable host.
    Any,
    /// An IPv4 or IPv6 prefix; an address without a length is a /32 or
    /// /128.
    Prefix(IpPrefix),
    /// A DNS name (lowercased, without a trailing dot), resolved by control
    /// before the response (RFC 9484 section 4.1).
    Host(String),
}

/// A decoded `ipproto` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpProto {
    /// `*` (or no `ipproto` variable): any protocol.
    Any,
    /// One Internet Protocol Number.
    Number(u8),
}

/// Why a `target` or `ipproto` value does not meet RFC 9484 section 4.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// An empty value: "their values MUST NOT be empty" (section 3).
    #[error("target is empty (RFC 9484 section 3)")]
    EmptyTarget,
    /// "IPv6 scoped addressing zone identifiers are not supported"
    /// (section 4.6).
    #[error("IPv6 zone identifiers are not supported (RFC 9484 section 4.6)")]
    ZoneId,
    /// The value is not an IP literal, an IP prefix, a DNS name or `*`
    /// (Figure 6).
    #[error("target is not an IP prefix, a host name or * (RFC 9484 section 4.6)")]
    InvalidTarget,
    /// The prefix length is not 1 to 2 (IPv4) or 1 to 3 (IPv6) digits, or is
    /// larger than the address: it "MUST represent a decimal integer between
    /// 0 and the length of the IP address in bits, inclusive" (section 4.6).
    #[error("invalid prefix length in target (RFC 9484 section 4.6)")]
    InvalidPrefixLength,
    /// "the lower bits of the IP address that are not covered by the prefix
    /// length MUST all be set to 0" (section 4.6).
    #[error("target prefix has address bits set beyond its length (RFC 9484 section 4.6)")]
    HostBitsSet,
    /// "ipproto MUST represent a decimal integer between 0 and 255 inclusive
    /// or the wildcard value *" (section 4.6).
    #[error("ipproto is not * or a number in 0..=255 (RFC 9484 section 4.6)")]
    InvalidIpProto,
}

/// Parses a percent-decoded `target`: `*`, an IPv4 or IPv6 address with an
/// optional `/length`, or a DNS name.
///
/// IPv6 literals come without brackets (Figure 6 uses RFC 3986's
/// IPv6address, not IP-literal). Names follow the same rules as connect-udp's
/// `target_host` ([`crate::target::TargetHost::parse`]): LDH labels
/// (underscore allowed), at most 253 bytes, and no all-numeric or hex last
/// label that a resolver could read as an IPv4 address.
pub fn parse_target(decoded: &str) -> Result<IpTarget, ScopeError> {
    if decoded.is_empty() {
        return Err(ScopeError::EmptyTarget);
    }
    if decoded == "*" {
        return Ok(IpTarget::Any);
    }
    let (addr, len) = match decoded.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (decoded, None),
    };
    let ip = if addr.contains(':') {
        // A zone ID arrives percent-encoded as %25 and decodes to '%'.
        if addr.contains('%') {
            return Err(ScopeError::ZoneId);
        }
        IpAddr::V6(addr.parse::<Ipv6Addr>().map_err(|_| ScopeError::InvalidTarget)?)
    } else if let Ok(v4) = addr.parse::<Ipv4Addr>() {
        IpAddr::V4(v4)
    } else if len.is_none() {
        return crate::target::validate_name(decoded)
            .map(IpTarget::Host)
            .map_err(|_| ScopeError::InvalidTarget);
    } else {
        return Err(ScopeError::InvalidTarget);
    };
    let Some(len) = len else {
        return Ok(IpTarget::Prefix(IpPrefix::host(ip)));
    };
    let max_digits = if ip.is_ipv4() { 2 } else { 3 };
    if len.is_empty() || len.len() > max_digits || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ScopeError::InvalidPrefixLength);
    }
    let len: u8 = len.parse().map_err(|_| ScopeError::InvalidPrefixLength)?;
    IpPrefix::new(ip, len).map(IpTarget::Prefix).map_err(|e| match e {
        super::capsule::IpCapsuleError::HostBitsSet => ScopeError::HostBitsSet,
        _ => ScopeError::InvalidPrefixLength,
    })
}

/// Parses a percent-decoded `ipproto`: `*` or 1 to 3 decimal digits with a
/// value up to 255 (leading zeros allowed by Figure 6's `1*3DIGIT`; no sign).
pub fn parse_ipproto(decoded: &str) -> Result<IpProto, ScopeError> {
    if decoded == "*" {
        return Ok(IpProto::Any);
    }
    if decoded.is_empty() || decoded.len() > 3 || !decoded.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ScopeError::InvalidIpProto);
    }
    decoded.parse::<u8>().map(IpProto::Number).map_err(|_| ScopeError::InvalidIpProto)
}

/// What a connect-ip tunnel may carry towards the target: destination
/// prefixes and one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Allowed destination prefixes; empty means any destination.
    pub prefixes: Vec<IpPrefix>,
    /// Allowed upper-layer protocol.
    pub protocol: IpProto,
}

impl Scope {
    /// Whether a packet to `dst` with upper-layer `protocol` is within scope
    /// (ICMP 1 / ICMPv6 58 is always allowed, section 4.6).
    ///
    /// `protocol` is [`crate::ip::packet::PacketInfo::protocol`], found
    /// after the IPv6 extension header walk (section 4.8). The ICMP
    /// exemption is per family (ICMP for IPv4, ICMPv6 for IPv6) and covers
    /// the protocol only: the destination must still be in a prefix.
    pub fn allows(&self, dst: IpAddr, protocol: u8) -> bool {
        let icmp = if dst.is_ipv4() { PROTO_ICMP } else { PROTO_ICMPV6 };
        let protocol_ok = match self.protocol {
            IpProto::Any => true,
            IpProto::Number(n) => n == protocol || protocol == icmp,
        };
        protocol_ok && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| p.contains(dst)))
    }

    /// The ROUTE_ADVERTISEMENT for this scope: the prefixes (or 0.0.0.0/0 and
    /// ::/0 when any) and the protocol (0 when any).
    pub fn routes(&self) -> Vec<IpAddressRange> {
        let protocol = match self.protocol {
            IpProto::Any => 0,
            IpProto::Number(n) => n,
        };
        if self.prefixes.is_empty() {
            let all = [
                IpPrefix { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), len: 0 },
                IpPrefix { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), len: 0 },
            ];
            ranges_for(&all, protocol)
        } else {
            ranges_for(&self.prefixes, protocol)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn prefix(a: &str, len: u8) -> IpPrefix {
        IpPrefix::new(ip(a), len).unwrap()
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("*"), Ok(IpTarget::Any));
        assert_eq!(parse_target("192.0.2.0/24"), Ok(IpTarget::Prefix(prefix("192.0.2.0", 24))));
        assert_eq!(parse_target("2001:db8::/32"), Ok(IpTarget::Prefix(prefix("2001:db8::", 32))));
        assert_eq!(parse_target("192.0.2.1"), Ok(IpTarget::Prefix(prefix("192.0.2.1", 32))));
        assert_eq!(parse_target("2001:db8::42"), Ok(IpTarget::Prefix(prefix("2001:db8::42", 128))));
        assert_eq!(parse_target("0.0.0.0/0"), Ok(IpTarget::Prefix(prefix("0.0.0.0", 0))));
        assert_eq!(parse_target("::/0"), Ok(IpTarget::Prefix(prefix("::", 0))));
        assert_eq!(parse_target("2001:db8::/128"), Ok(IpTarget::Prefix(prefix("2001:db8::", 128))));
        assert_eq!(parse_target("10.0.0.0/08"), Ok(IpTarget::Prefix(prefix("10.0.0.0", 8))));
        assert_eq!(parse_target("Example.COM"), Ok(IpTarget::Host("example.com".into())));
        assert_eq!(parse_target("target.example.com."), Ok(IpTarget::Host("target.example.com".into())));
    }

    #[test]
    fn target_refusals() {
        assert_eq!(parse_target(""), Err(ScopeError::EmptyTarget));
        assert_eq!(parse_target("fe80::1%eth0"), Err(ScopeError::ZoneId));
        assert_eq!(parse_target("fe80::%eth0/64"), Err(ScopeError::ZoneId));
        assert_eq!(parse_target("192.0.2.1/24"), Err(ScopeError::HostBitsSet));
        assert_eq!(parse_target("2001:db8::1/32"), Err(ScopeError::HostBitsSet));
        for bad in [
            "192.0.2.0/33",
            "192.0.2.0/",
            "192.0.2.0/024",
            "192.0.2.0/+8",
            "::/129",
            "::/0128",
            "::/a",
            "192.0.2.0/24/8",
        ] {
            assert_eq!(parse_target(bad), Err(ScopeError::InvalidPrefixLength), "{bad}");
        }
        for bad in [
            "[2001:db8::1]",
            "example.com/24",
            "127.1",
            "01.2.3.4",
            "a..b",
            "-a.com",
            "exa mple.com",
            "**",
            "2001:db8::zz",
        ] {
            assert_eq!(parse_target(bad), Err(ScopeError::InvalidTarget), "{bad}");
        }
    }

    #[test]
    fn ipprotos() {
        assert_eq!(parse_ipproto("*"), Ok(IpProto::Any));
        assert_eq!(parse_ipproto("0"), Ok(IpProto::Number(0)));
        assert_eq!(parse_ipproto("17"), Ok(IpProto::Number(17)));
        assert_eq!(parse_ipproto("132"), Ok(IpProto::Number(132)));
        assert_eq!(parse_ipproto("255"), Ok(IpProto::Number(255)));
        assert_eq!(parse_ipproto("017"), Ok(IpProto::Number(17)));
        for bad in ["", "256", "+6", "-1", "0006", " 6", "6 ", "x", "**", "1e2"] {
            assert_eq!(parse_ipproto(bad), Err(ScopeError::InvalidIpProto), "{bad:?}");
        }
    }

    #[test]
    fn scope_allows() {
        let any = Scope { prefixes: vec![], protocol: IpProto::Any };
        assert!(any.allows(ip("198.51.100.1"), 6) && any.allows(ip("2001:db8::1"), 17));
        let sctp = Scope { prefixes: vec![prefix("2001:db8:3456::b", 128)], protocol: IpProto::Number(132) };
        assert!(sctp.allows(ip("2001:db8:3456::b"), 132));
        assert!(!sctp.allows(ip("2001:db8:3456::b"), 6));
        // ICMPv6 is always allowed, to the scoped destination.
        assert!(sctp.allows(ip("2001:db8:3456::b"), 58));
        assert!(!sctp.allows(ip("2001:db8:3456::c"), 58));
        // ICMP (1) is IPv4's; in an IPv6 packet it is just protocol 1.
        assert!(!sctp.allows(ip("2001:db8:3456::b"), 1));
        let v4 = Scope { prefixes: vec![prefix("192.0.2.0", 24)], protocol: IpProto::Number(17) };
        assert!(v4.allows(ip("192.0.2.9"), 1) && v4.allows(ip("192.0.2.9"), 17));
        assert!(!v4.allows(ip("192.0.3.9"), 17) && !v4.allows(ip("::ffff:192.0.2.9"), 17));
    }

    #[test]
    fn scope_routes() {
        let any = Scope { prefixes: vec![], protocol: IpProto::Any };
        let routes = any.routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(
            (routes[0].start, routes[0].end, routes[0].ip_protocol),
            (ip("0.0.0.0"), ip("255.255.255.255"), 0)
        );
        assert_eq!(routes[1].end, ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
        let sctp = Scope { prefixes: vec![prefix("2001:db8:3456::b", 128)], protocol: IpProto::Number(132) };
        let routes = sctp.routes();
        assert_eq!(routes.len(), 1);
        assert_eq!(
            (routes[0].start, routes[0].end, routes[0].ip_protocol),
            (ip("2001:db8:3456::b"), ip("2001:db8:3456::b"), 132)
        );
    }
}

//! Target access control: CIDR allow/deny lists, port ranges, and the
//! SSRF-safe default that refuses special-purpose address ranges.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Deserialize;

/// An IPv4 or IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// Why a CIDR or port range string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclParseError {
    /// Not `address/length` or a bare address.
    #[error("invalid CIDR {0:?}: expected an address or address/prefix-length")]
    Cidr(String),
    /// Not `port` or `first-last` with 1 <= first <= last <= 65535.
    #[error("invalid port range {0:?}: expected N or N-M within 1..=65535")]
    Ports(String),
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `ip` (v4-mapped v6 treated as v4) is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, normalize(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = AclParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AclParseError::Cidr(s.to_string());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr = normalize(addr.parse::<IpAddr>().map_err(|_| err())?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().map_err(|_| err())?
            }
            Some(_) => return Err(err()),
            None => max,
        };
        if len > max {
            return Err(err());
        }
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl FromStr for PortRange {
    type Err = AclParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AclParseError::Ports(s.to_string());
        let parse = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(err);
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if first > last {
            return Err(err());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl serde::Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Special-purpose ranges refused unless explicitly allowed: loopback,
/// private (RFC 1918, ULA), shared CGNAT space, link-local, multicast,
/// unspecified, broadcast, documentation, benchmarking, reserved, and the
/// IPv6 translation prefixes that embed IPv4 addresses.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/32",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// Why a target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The address is in a denied range.
    Address,
    /// The port is outside the allowed ranges.
    Port,
}

/// The target policy.
#[derive(Debug, Clone)]
pub struct TargetAcl {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    default_deny: Vec<Cidr>,
    ports: Vec<PortRange>,
}

impl TargetAcl {
    /// Builds the policy. Precedence: explicit `deny`, then explicit
    /// `allow`, then the special-purpose default deny; everything else is
    /// allowed. An empty `ports` list allows every port.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>, ports: Vec<PortRange>) -> Self {
        let default_deny = DEFAULT_DENY.iter().map(|s| s.parse().expect("built-in CIDR")).collect();
        Self { allow, deny, default_deny, ports }
    }

    /// Ranges allowed explicitly.
    pub fn allow(&self) -> &[Cidr] {
        &self.allow
    }

    /// Ranges denied explicitly.
    pub fn deny(&self) -> &[Cidr] {
        &self.deny
    }

    /// Allowed port ranges (empty: all).
    pub fn ports(&self) -> &[PortRange] {
        &self.ports
    }

    /// Checks one resolved target.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), Denial> {
        if !self.ports.is_empty() && !self.ports.iter().any(|r| (r.first..=r.last).contains(&port)) {
            return Err(Denial::Port);
        }
        let ip = normalize(ip);
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(Denial::Address);
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        if self.default_deny.iter().any(|c| c.contains(ip)) {
            return Err(Denial::Address);
        }
        Ok(())
    }
}

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    /// First address.
    pub start: IpAddr,
    /// Last address.
    pub end: IpAddr,
}

/// Ranges as (first, last) integers of one family, sorted and disjoint.
type Intervals = Vec<(u128, u128)>;

fn cidr_interval(c: &Cidr) -> (u128, u128) {
    let (value, bits) = match c.addr {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let host_bits = bits - u32::from(c.len);
    let span = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    let start = value & !span;
    (start, start | span)
}

/// Sorts and merges overlapping or adjacent intervals.
fn normalize_intervals(mut v: Intervals) -> Intervals {
    v.sort_unstable();
    let mut out: Intervals = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some((_, last_end)) if s <= last_end.saturating_add(1) => *last_end = (*last_end).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a` minus `b` (both normalized).
fn subtract(a: &Intervals, b: &Intervals) -> Intervals {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        let mut open = true;
        for &(bs, be) in b {
            if be < cur || bs > e {
                continue;
            }
            if bs > cur {
                out.push((cur, bs - 1));
            }
            if be >= e {
                open = false;
                break;
            }
            cur = be + 1;
        }
        if open && cur <= e {
            out.push((cur, e));
        }
    }
    out
}

fn family_intervals(cidrs: &[Cidr], v4: bool) -> Intervals {
    normalize_intervals(cidrs.iter().filter(|c| c.addr.is_ipv4() == v4).map(cidr_interval).collect())
}

impl TargetAcl {
    /// The addresses of `within` (prefixes, either family) that this policy
    /// lets a connect-ip tunnel reach: `within` minus the explicit denials,
    /// minus the special-purpose ranges not explicitly allowed. IPv4 ranges
    /// first, each family sorted and disjoint. IPv4-mapped IPv6 addresses
    /// are never reachable as IPv6.
    pub fn allowed_ranges(&self, within: &[Cidr]) -> Vec<AddrRange> {
        let mut out = Vec::new();
        for v4 in [true, false] {
            let within = family_intervals(within, v4);
            let allow = family_intervals(&self.allow, v4);
            let mut denied = family_intervals(&self.deny, v4);
            denied.extend(subtract(&family_intervals(&self.default_deny, v4), &allow));
            if !v4 {
                denied.push(cidr_interval(&Cidr { addr: "::ffff:0:0".parse().expect("literal"), len: 96 }));
            }
            let denied = normalize_intervals(denied);
            for (s, e) in subtract(&within, &denied) {
                let to_ip = |x: u128| {
                    if v4 { IpAddr::V4(Ipv4Addr::from(x as u32)) } else { IpAddr::V6(Ipv6Addr::from(x)) }
                };
                out.push(AddrRange { start: to_ip(s), end: to_ip(e) });
            }
        }
        out
    }
}

impl Cidr {
    /// A prefix from an address and length (host bits are masked off).
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then(|| {
            let (start, _) = cidr_interval(&Cidr { addr, len });
            let addr = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(start as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(start)),
            };
            Cidr { addr, len }
        })
    }

    /// The whole address space of both families.
    pub fn everything() -> [Cidr; 2] {
        [
            Cidr { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), len: 0 },
            Cidr { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), len: 0 },
        ]
    }
}

/// Addresses the RFC 6761 special names resolve to without DNS, or `None`
/// to resolve normally; `Some(Err)` for names that must never resolve.
pub fn special_name(name: &str) -> Option<Result<Vec<IpAddr>, ()>> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let tld = name.rsplit('.').next().unwrap_or("");
    if name == "localhost" || tld == "localhost" {
        return Some(Ok(vec![IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::LOCALHOST)]));
    }
    if tld == "invalid" || tld == "test" {
        return Some(Err(()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_denies_special_ranges_v4_v6_and_mapped() {
        let acl = TargetAcl::new(vec![], vec![], vec![]);
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert_eq!(acl.check(ip(denied), 53), Err(Denial::Address), "{denied}");
        }
        for allowed in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(acl.check(ip(allowed), 53), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn explicit_allow_and_deny_take_precedence() {
        let acl = TargetAcl::new(
            vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
            vec!["8.8.4.0/24".parse().unwrap(), "127.0.0.53".parse().unwrap()],
            vec!["53".parse().unwrap(), "1000-2000".parse().unwrap()],
        );
        assert_eq!(acl.check(ip("127.0.0.1"), 53), Ok(()));
        assert_eq!(acl.check(ip("::ffff:127.0.0.1"), 1500), Ok(()));
        assert_eq!(acl.check(ip("::1"), 53), Ok(()));
        assert_eq!(acl.check(ip("127.0.0.53"), 53), Err(Denial::Address));
        assert_eq!(acl.check(ip("8.8.4.4"), 53), Err(Denial::Address));
        assert_eq!(acl.check(ip("127.0.0.1"), 54), Err(Denial::Port));
        assert_eq!(acl.check(ip("127.0.0.1"), 2001), Err(Denial::Port));
    }

    #[test]
    fn parsing() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("::ffff:10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        for bad in ["10.0.0.0/33", "::/129", "x/8", "10.0.0.0/", "10.0.0.0/+8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        for bad in ["0", "70000", "5-4", "a", "1-"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains(ip("8.8.8.8")) && !c.contains(ip("::1")));
    }

    #[test]
    fn special_names() {
        assert!(special_name("LOCALHOST.").unwrap().unwrap().iter().all(|a| a.is_loopback()));
        assert!(special_name("foo.localhost").unwrap().is_ok());
        assert_eq!(special_name("nothing.invalid"), Some(Err(())));
        assert_eq!(special_name("example.com"), None);
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn r(a: &str, b: &str) -> AddrRange {
        AddrRange { start: a.parse().unwrap(), end: b.parse().unwrap() }
    }

    #[test]
    fn allowed_ranges_subtract_denials_and_respect_explicit_allows() {
        let acl = TargetAcl::new(vec![c("10.1.0.0/16")], vec![c("8.8.8.0/24")], vec![]);
        // A public /8: minus the explicit deny.
        assert_eq!(
            acl.allowed_ranges(&[c("8.0.0.0/8")]),
            vec![r("8.0.0.0", "8.8.7.255"), r("8.8.9.0", "8.255.255.255")]
        );
        // Private space is denied by default except what is allowed.
        assert_eq!(acl.allowed_ranges(&[c("10.0.0.0/8")]), vec![r("10.1.0.0", "10.1.255.255")]);
        // A host inside a denied range: nothing.
        assert!(acl.allowed_ranges(&[c("127.0.0.1/32")]).is_empty());
        // Everything: no special range survives, both families present.
        let all = acl.allowed_ranges(&Cidr::everything());
        let inside = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            all.iter().any(|x| {
                x.start.is_ipv4() == ip.is_ipv4() && {
                    let v = |a: IpAddr| match a {
                        IpAddr::V4(v4) => u128::from(u32::from(v4)),
                        IpAddr::V6(v6) => u128::from(v6),
                    };
                    v(x.start) <= v(ip) && v(ip) <= v(x.end)
                }
            })
        };
        for ok in ["1.1.1.1", "10.1.2.3", "2606:4700::1111", "9.255.255.255"] {
            assert!(inside(ok), "{ok} allowed");
        }
        for denied in
            ["10.2.0.1", "127.0.0.1", "192.168.1.1", "8.8.8.8", "::1", "fe80::1", "::ffff:1.1.1.1", "ff02::1"]
        {
            assert!(!inside(denied), "{denied} denied");
        }
        assert!(all.windows(2).all(|w| w[0].start.is_ipv4() >= w[1].start.is_ipv4()), "IPv4 first");
        assert_eq!(Cidr::new("10.1.2.3".parse().unwrap(), 16), Some(c("10.1.0.0/16")));
        assert_eq!(Cidr::new("10.1.2.3".parse().unwrap(), 33), None);
    }
}

//! The connect-ip capsules (RFC 9484 section 4.7): ADDRESS_ASSIGN,
//! ADDRESS_REQUEST and ROUTE_ADVERTISEMENT.
//!
//! [`decode`] reads the value of one capsule (the caller's capsule decoder
//! has already split the stream into `Type, Length, Value`) and applies every
//! validity rule of section 4.7; any error it returns means the capsule is
//! malformed, and RFC 9484 (sections 4.7.1 to 4.7.3) sends the receiver to
//! RFC 9297 section 3.3: the request stream is aborted. [`encode`] writes a
//! whole capsule.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::varint;

/// ADDRESS_ASSIGN capsule type (RFC 9484 section 4.7.1).
pub const ADDRESS_ASSIGN: u64 = 0x01;
/// ADDRESS_REQUEST capsule type (RFC 9484 section 4.7.2).
pub const ADDRESS_REQUEST: u64 = 0x02;
/// ROUTE_ADVERTISEMENT capsule type (RFC 9484 section 4.7.3).
pub const ROUTE_ADVERTISEMENT: u64 = 0x03;

/// Why a connect-ip capsule (or a prefix built locally) is invalid. Each
/// variant names the RFC 9484 rule it enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpCapsuleError {
    /// The value ends in the middle of an entry.
    #[error("capsule value ends inside an entry (RFC 9484 section 4.7)")]
    Truncated,
    /// "It MUST be either 4 or 6" (sections 4.7.1, 4.7.2, 4.7.3).
    #[error("IP Version {0} is neither 4 nor 6 (RFC 9484 section 4.7)")]
    BadVersion(u8),
    /// The prefix length exceeds the address length: "This MUST be less than
    /// or equal to the length of the IP Address field in bits" (sections
    /// 4.7.1, 4.7.2).
    #[error("prefix length {len} exceeds {max} bits (RFC 9484 section 4.7.1)")]
    PrefixTooLong {
        /// The prefix length found.
        len: u8,
        /// The address length in bits.
        max: u8,
    },
    /// "the lower bits of the IP Address field that are not covered by the
    /// prefix length MUST all be set to 0" (sections 4.7.1, 4.7.2).
    #[error("address bits beyond the prefix length are not zero (RFC 9484 section 4.7.1)")]
    HostBitsSet,
    /// "If an endpoint receives an ADDRESS_REQUEST capsule that contains zero
    /// Requested Addresses, it MUST abort the IP proxying request stream"
    /// (section 4.7.2).
    #[error("ADDRESS_REQUEST without any Requested Address (RFC 9484 section 4.7.2)")]
    EmptyAddressRequest,
    /// "Request IDs ... MUST NOT be zero" (section 4.7.2).
    #[error("Requested Address with Request ID 0 (RFC 9484 section 4.7.2)")]
    ZeroRequestId,
    /// "Each request from a given endpoint carries a different identifier"
    /// (section 4.7.2); checked within one capsule.
    #[error("Request ID {0} appears twice in one ADDRESS_REQUEST (RFC 9484 section 4.7.2)")]
    DuplicateRequestId(u64),
    /// "The Start IP Address MUST be less than or equal to the End IP
    /// Address" (section 4.7.3).
    #[error("range start is after its end (RFC 9484 section 4.7.3)")]
    RangeStartAfterEnd,
    /// A range built locally mixes an IPv4 and an IPv6 address; on the wire
    /// one IP Version covers both (section 4.7.3, Figure 12).
    #[error("range start and end are of different IP versions (RFC 9484 section 4.7.3)")]
    RangeFamilyMismatch,
    /// "The IP Version of A MUST be less than or equal to the IP Version of
    /// B" (section 4.7.3).
    #[error("ranges are not ordered by IP Version (RFC 9484 section 4.7.3)")]
    RangeVersionOrder,
    /// "If the IP Version of A and B are equal, the IP Protocol of A MUST be
    /// less than or equal to the IP Protocol of B" (section 4.7.3).
    #[error("ranges of one IP Version are not ordered by IP Protocol (RFC 9484 section 4.7.3)")]
    RangeProtocolOrder,
    /// "If the IP Version and IP Protocol of A and B are both equal, the End
    /// IP Address of A MUST be strictly less than the Start IP Address of B"
    /// (section 4.7.3).
    #[error("ranges of one IP Version and Protocol overlap or are unordered (RFC 9484 section 4.7.3)")]
    RangeOverlap,
    /// A protocol-0 range overlaps a range with a non-zero protocol:
    /// "Endpoints MUST NOT send" such a capsule and one that detects it "MUST
    /// abort the IP proxying request stream" (section 4.7.3).
    #[error("a protocol-0 range overlaps a range of a specific protocol (RFC 9484 section 4.7.3)")]
    WildcardOverlap,
}

/// An IP address prefix: an address and a prefix length, with the bits
/// beyond the prefix length zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// The first address of the prefix.
    pub addr: IpAddr,
    /// The prefix length in bits (at most 32 for IPv4, 128 for IPv6).
    pub len: u8,
}

/// The address as a 128-bit number and its length in bits.
fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// Mask of the low `width - len` bits of a `width`-bit address.
fn host_mask(len: u8, width: u8) -> u128 {
    let host = u32::from(width - len);
    if host == 0 { 0 } else { u128::MAX >> (128 - host) }
}

fn from_bits(value: u128, v6: bool) -> IpAddr {
    if v6 { IpAddr::V6(Ipv6Addr::from(value)) } else { IpAddr::V4(Ipv4Addr::from(value as u32)) }
}

fn version(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 4 } else { 6 }
}

impl IpPrefix {
    /// A prefix of `len` bits at `addr`: `len` must not exceed the address
    /// length and the bits beyond it must be zero (RFC 9484 sections 4.6 and
    /// 4.7.1).
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, IpCapsuleError> {
        let (value, max) = bits(addr);
        if len > max {
            return Err(IpCapsuleError::PrefixTooLong { len, max });
        }
        if value & host_mask(len, max) != 0 {
            return Err(IpCapsuleError::HostBitsSet);
        }
        Ok(Self { addr, len })
    }

    /// The single-address prefix of `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, len: bits(addr).1 }
    }

    /// Whether `ip` falls within the prefix; addresses of the other family
    /// never do.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let (start, end) = self.bounds();
        let (value, _) = bits(ip);
        (start..=end).contains(&value)
    }

    /// Whether the address is all-zero (0.0.0.0 or ::), which in an
    /// ADDRESS_REQUEST means "any address of this family" and in an
    /// ADDRESS_ASSIGN with a full-length prefix means "not assigned"
    /// (RFC 9484 section 4.7.2).
    pub fn is_unspecified(&self) -> bool {
        self.addr.is_unspecified()
    }

    /// The address length in bits: 32 or 128.
    pub fn max_len(&self) -> u8 {
        bits(self.addr).1
    }

    /// First and last address of the prefix as numbers. Host bits are
    /// ignored, so this is also right for a prefix built by hand.
    fn bounds(&self) -> (u128, u128) {
        let (value, max) = bits(self.addr);
        let mask = host_mask(self.len.min(max), max);
        (value & !mask, value | mask)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a prefix string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixParseError {
    /// Not `address` or `address/length`.
    #[error("{0:?} is not an IP address or address/length")]
    Syntax(String),
    /// The prefix breaks a rule (length, host bits).
    #[error("{0}")]
    Rule(#[from] IpCapsuleError),
}

impl std::str::FromStr for IpPrefix {
    type Err = PrefixParseError;

    /// `192.0.2.0/24`, `2001:db8::/32`, or a bare address (a host prefix).
    fn from_str(s: &str) -> Result<Self, PrefixParseError> {
        let syntax = || PrefixParseError::Syntax(s.to_string());
        match s.split_once('/') {
            None => Ok(IpPrefix::host(s.parse().map_err(|_| syntax())?)),
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
                let len: u8 = len.parse().map_err(|_| syntax())?;
                Ok(IpPrefix::new(addr, len)?)
            }
        }
    }
}

/// One Assigned Address of an ADDRESS_ASSIGN capsule (RFC 9484 section
/// 4.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignedAddress {
    /// The Request ID this answers, or 0 for an unprompted assignment.
    pub request_id: u64,
    /// The assigned prefix; 0.0.0.0/32 or ::/128 rejects the request
    /// (section 4.7.2).
    pub prefix: IpPrefix,
}

/// One Requested Address of an ADDRESS_REQUEST capsule (RFC 9484 section
/// 4.7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedAddress {
    /// The request identifier, never 0.
    pub request_id: u64,
    /// The preferred prefix; an all-zero address means no preference
    /// beyond the family and the prefix length.
    pub prefix: IpPrefix,
}

/// One IP Address Range of a ROUTE_ADVERTISEMENT capsule (RFC 9484 section
/// 4.7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpAddressRange {
    /// Inclusive start address.
    pub start: IpAddr,
    /// Inclusive end address, of the same family as `start`.
    pub end: IpAddr,
    /// The allowed upper-layer protocol, or 0 for all protocols. ICMP is
    /// always allowed.
    pub ip_protocol: u8,
}

impl IpAddressRange {
    /// A range from `start` to `end` inclusive: both of one family and
    /// `start <= end` (RFC 9484 section 4.7.3).
    pub fn new(start: IpAddr, end: IpAddr, ip_protocol: u8) -> Result<Self, IpCapsuleError> {
        if start.is_ipv4() != end.is_ipv4() {
            return Err(IpCapsuleError::RangeFamilyMismatch);
        }
        if bits(start).0 > bits(end).0 {
            return Err(IpCapsuleError::RangeStartAfterEnd);
        }
        Ok(Self { start, end, ip_protocol })
    }

    /// Whether `ip` lies in the range (same family, start to end
    /// inclusive). The protocol is not considered.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && ip.is_ipv4() == self.end.is_ipv4()
            && (bits(self.start).0..=bits(self.end).0).contains(&bits(ip).0)
    }

    /// (version, protocol, start, end): the order section 4.7.3 imposes.
    fn key(&self) -> (u8, u8, u128, u128) {
        (version(self.start), self.ip_protocol, bits(self.start).0, bits(self.end).0)
    }
}

/// A decoded connect-ip capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpCapsule {
    /// ADDRESS_ASSIGN: the full list of addresses currently assigned to the
    /// receiver; empty removes them all (section 4.7.1).
    AddressAssign(Vec<AssignedAddress>),
    /// ADDRESS_REQUEST: one or more requested addresses (section 4.7.2).
    AddressRequest(Vec<RequestedAddress>),
    /// ROUTE_ADVERTISEMENT: the full list of routes, superseding earlier
    /// ones (section 4.7.3).
    RouteAdvertisement(Vec<IpAddressRange>),
}

/// A cursor over a capsule value.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, IpCapsuleError> {
        let (value, used) = varint::decode(self.0).map_err(|_| IpCapsuleError::Truncated)?;
        self.0 = &self.0[used..];
        Ok(value)
    }

    fn u8(&mut self) -> Result<u8, IpCapsuleError> {
        let (&b, rest) = self.0.split_first().ok_or(IpCapsuleError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn version(&mut self) -> Result<u8, IpCapsuleError> {
        match self.u8()? {
            v @ (4 | 6) => Ok(v),
            v => Err(IpCapsuleError::BadVersion(v)),
        }
    }

    /// An address whose length the IP Version fixes (32 or 128 bits).
    fn addr(&mut self, version: u8) -> Result<IpAddr, IpCapsuleError> {
        let n = if version == 4 { 4 } else { 16 };
        if self.0.len() < n {
            return Err(IpCapsuleError::Truncated);
        }
        let (raw, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(match <[u8; 4]>::try_from(raw) {
            Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            Err(_) => {
                let mut v6 = [0u8; 16];
                v6.copy_from_slice(raw);
                IpAddr::V6(Ipv6Addr::from(v6))
            }
        })
    }

    /// `Request ID (i), IP Version (8), IP Address (32..128), IP Prefix
    /// Length (8)`: the common shape of Figures 8 and 10.
    fn prefix_entry(&mut self) -> Result<(u64, IpPrefix), IpCapsuleError> {
        let request_id = self.varint()?;
        let version = self.version()?;
        let addr = self.addr(version)?;
        let len = self.u8()?;
        Ok((request_id, IpPrefix::new(addr, len)?))
    }

    /// `IP Version (8), Start (32..128), End (32..128), IP Protocol (8)`
    /// (Figure 12).
    fn range(&mut self) -> Result<IpAddressRange, IpCapsuleError> {
        let version = self.version()?;
        let start = self.addr(version)?;
        let end = self.addr(version)?;
        let ip_protocol = self.u8()?;
        IpAddressRange::new(start, end, ip_protocol)
    }
}

/// Decodes the value of a capsule of `capsule_type`; Ok(None) for types that
/// are not connect-ip's (the caller skips them).
pub fn decode(capsule_type: u64, value: &[u8]) -> Result<Option<IpCapsule>, IpCapsuleError> {
    let mut r = Reader(value);
    let capsule = match capsule_type {
        ADDRESS_ASSIGN => {
            let mut list = Vec::new();
            while !r.0.is_empty() {
                let (request_id, prefix) = r.prefix_entry()?;
                list.push(AssignedAddress { request_id, prefix });
            }
            IpCapsule::AddressAssign(list)
        }
        ADDRESS_REQUEST => {
            let mut list = Vec::new();
            while !r.0.is_empty() {
                let (request_id, prefix) = r.prefix_entry()?;
                if request_id == 0 {
                    return Err(IpCapsuleError::ZeroRequestId);
                }
                list.push(RequestedAddress { request_id, prefix });
            }
            if list.is_empty() {
                return Err(IpCapsuleError::EmptyAddressRequest);
            }
            let mut ids: Vec<u64> = list.iter().map(|a| a.request_id).collect();
            ids.sort_unstable();
            if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                return Err(IpCapsuleError::DuplicateRequestId(w[0]));
            }
            IpCapsule::AddressRequest(list)
        }
        ROUTE_ADVERTISEMENT => {
            let mut list = Vec::new();
            while !r.0.is_empty() {
                list.push(r.range()?);
            }
            check_route_order(&list)?;
            IpCapsule::RouteAdvertisement(list)
        }
        _ => return Ok(None),
    };
    Ok(Some(capsule))
}

/// Applies the ordering requirements of RFC 9484 section 4.7.3 to
/// consecutive ranges, then the optional protocol-0 overlap check.
fn check_route_order(ranges: &[IpAddressRange]) -> Result<(), IpCapsuleError> {
    for pair in ranges.windows(2) {
        let (va, pa, _, end_a) = pair[0].key();
        let (vb, pb, start_b, _) = pair[1].key();
        if va > vb {
            return Err(IpCapsuleError::RangeVersionOrder);
        }
        if va == vb && pa > pb {
            return Err(IpCapsuleError::RangeProtocolOrder);
        }
        if va == vb && pa == pb && end_a >= start_b {
            return Err(IpCapsuleError::RangeOverlap);
        }
    }
    // "Validating this requirement is OPTIONAL, but if an endpoint detects
    // the violation, it MUST abort the IP proxying request stream." The
    // order above puts each version's protocol-0 ranges first, sorted and
    // disjoint, so a binary search finds the one that could overlap.
    let mut i = 0;
    while i < ranges.len() {
        let v = version(ranges[i].start);
        let group_len = ranges[i..].iter().take_while(|r| version(r.start) == v).count();
        let group = &ranges[i..i + group_len];
        let zeros = group.iter().take_while(|r| r.ip_protocol == 0).count();
        let (wild, specific) = group.split_at(zeros);
        for r in specific {
            let (_, _, start, end) = r.key();
            let after = wild.partition_point(|w| w.key().2 <= end);
            if after > 0 && wild[after - 1].key().3 >= start {
                return Err(IpCapsuleError::WildcardOverlap);
            }
        }
        i += group_len;
    }
    Ok(())
}

fn push_addr(addr: IpAddr, out: &mut Vec<u8>) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn push_prefix_entry(request_id: u64, prefix: &IpPrefix, out: &mut Vec<u8>) {
    varint::push(request_id, out);
    out.push(version(prefix.addr));
    push_addr(prefix.addr, out);
    out.push(prefix.len);
}

/// Appends the whole capsule (type, length, value) to `out`.
///
/// The entries are written as given: build them with [`IpPrefix::new`],
/// [`IpAddressRange::new`] and [`ranges_for`] so that they are valid. A range
/// whose start and end are of different families cannot be represented on
/// the wire and is left out.
///
/// # Panics
/// Panics if a request ID exceeds [`varint::MAX`] (decoded IDs never do).
pub fn encode(capsule: &IpCapsule, out: &mut Vec<u8>) {
    let mut value = Vec::new();
    let capsule_type = match capsule {
        IpCapsule::AddressAssign(list) => {
            for a in list {
                push_prefix_entry(a.request_id, &a.prefix, &mut value);
            }
            ADDRESS_ASSIGN
        }
        IpCapsule::AddressRequest(list) => {
            for a in list {
                push_prefix_entry(a.request_id, &a.prefix, &mut value);
            }
            ADDRESS_REQUEST
        }
        IpCapsule::RouteAdvertisement(list) => {
            for r in list.iter().filter(|r| r.start.is_ipv4() == r.end.is_ipv4()) {
                value.push(version(r.start));
                push_addr(r.start, &mut value);
                push_addr(r.end, &mut value);
                value.push(r.ip_protocol);
            }
            ROUTE_ADVERTISEMENT
        }
    };
    crate::capsule::encode(capsule_type, &value, out);
}

/// The ROUTE_ADVERTISEMENT ranges for a set of prefixes and one protocol
/// (0 = any), sorted and merged so they meet section 4.7.3's ordering rules:
/// IPv4 before IPv6, and within a family strictly increasing, disjoint
/// ranges (overlapping or adjacent prefixes are merged).
pub fn ranges_for(prefixes: &[IpPrefix], ip_protocol: u8) -> Vec<IpAddressRange> {
    let mut spans: Vec<(bool, u128, u128)> = prefixes
        .iter()
        .map(|p| {
            let (start, end) = p.bounds();
            (p.addr.is_ipv6(), start, end)
        })
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(bool, u128, u128)> = Vec::with_capacity(spans.len());
    for (v6, start, end) in spans {
        match merged.last_mut() {
            Some((last_v6, _, last_end))
                if *last_v6 == v6 && last_end.checked_add(1).is_none_or(|next| next >= start) =>
            {
                *last_end = (*last_end).max(end);
            }
            _ => merged.push((v6, start, end)),
        }
    }
    merged
        .into_iter()
        .map(|(v6, start, end)| IpAddressRange {
            start: from_bits(start, v6),
            end: from_bits(end, v6),
            ip_protocol,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn prefix(s: &str) -> IpPrefix {
        let (a, l) = s.split_once('/').unwrap();
        IpPrefix::new(ip(a), l.parse().unwrap()).unwrap()
    }

    fn range(start: &str, end: &str, proto: u8) -> IpAddressRange {
        IpAddressRange::new(ip(start), ip(end), proto).unwrap()
    }

    /// Encodes, checks the capsule header, and returns the value.
    fn value_of(capsule: &IpCapsule) -> (u64, Vec<u8>) {
        let mut out = Vec::new();
        encode(capsule, &mut out);
        let (t, tl) = varint::decode(&out).unwrap();
        let (len, ll) = varint::decode(&out[tl..]).unwrap();
        let value = out[tl + ll..].to_vec();
        assert_eq!(value.len() as u64, len);
        (t, value)
    }

    fn round_trip(capsule: IpCapsule) {
        let (t, value) = value_of(&capsule);
        assert_eq!(decode(t, &value), Ok(Some(capsule)));
    }

    #[test]
    fn prefixes_parse_from_text() {
        assert_eq!(
            "10.0.0.0/8".parse::<IpPrefix>().unwrap(),
            IpPrefix::new("10.0.0.0".parse().unwrap(), 8).unwrap()
        );
        assert_eq!("fd00::1".parse::<IpPrefix>().unwrap().len, 128);
        assert!(matches!("10.0.0.1/8".parse::<IpPrefix>(), Err(PrefixParseError::Rule(_))));
        assert!(matches!("10.0.0.0/x".parse::<IpPrefix>(), Err(PrefixParseError::Syntax(_))));
        assert!("nonsense".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn prefix_rules() {
        assert_eq!(prefix("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(IpPrefix::host(ip("192.0.2.1")).to_string(), "192.0.2.1/32");
        assert_eq!(IpPrefix::host(ip("2001:db8::1")).to_string(), "2001:db8::1/128");
        assert_eq!(
            IpPrefix::new(ip("192.0.2.1"), 33),
            Err(IpCapsuleError::PrefixTooLong { len: 33, max: 32 })
        );
        assert_eq!(IpPrefix::new(ip("192.0.2.1"), 24), Err(IpCapsuleError::HostBitsSet));
        assert_eq!(IpPrefix::new(ip("2001:db8::1"), 64), Err(IpCapsuleError::HostBitsSet));
        assert!(IpPrefix::new(ip("::"), 0).is_ok());
        assert!(IpPrefix::new(ip("0.0.0.0"), 0).is_ok());
        assert!(IpPrefix::new(ip("::1"), 129).is_err());
        let p = prefix("192.0.2.0/24");
        assert!(p.contains(ip("192.0.2.255")) && p.contains(ip("192.0.2.0")));
        assert!(!p.contains(ip("192.0.3.0")) && !p.contains(ip("::ffff:192.0.2.1")));
        assert!(prefix("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(prefix("::/0").contains(ip("ffff::1")) && !prefix("::/0").contains(ip("1.2.3.4")));
        assert!(prefix("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(prefix("0.0.0.0/32").is_unspecified() && !p.is_unspecified());
        assert_eq!((p.max_len(), prefix("::/0").max_len()), (32, 128));
    }

    #[test]
    fn rfc9484_figure15_exchange_round_trips() {
        // Section 8.1: ADDRESS_REQUEST 0.0.0.0/32, ADDRESS_ASSIGN
        // 192.0.2.11/32, ROUTE_ADVERTISEMENT 0.0.0.0-255.255.255.255.
        let req =
            IpCapsule::AddressRequest(vec![RequestedAddress { request_id: 1, prefix: prefix("0.0.0.0/32") }]);
        let (t, value) = value_of(&req);
        assert_eq!(t, ADDRESS_REQUEST);
        assert_eq!(value, [1, 4, 0, 0, 0, 0, 32]);
        round_trip(req);
        round_trip(IpCapsule::AddressAssign(vec![AssignedAddress {
            request_id: 1,
            prefix: prefix("192.0.2.11/32"),
        }]));
        let route = IpCapsule::RouteAdvertisement(vec![range("0.0.0.0", "255.255.255.255", 0)]);
        assert_eq!(value_of(&route).1, [4, 0, 0, 0, 0, 255, 255, 255, 255, 0]);
        round_trip(route);
    }

    #[test]
    fn mixed_families_round_trip() {
        round_trip(IpCapsule::AddressAssign(vec![]));
        round_trip(IpCapsule::AddressAssign(vec![
            AssignedAddress { request_id: 0, prefix: prefix("203.0.113.100/32") },
            AssignedAddress { request_id: 16_384, prefix: prefix("2001:db8:1234::/48") },
            AssignedAddress { request_id: 7, prefix: prefix("::/128") },
        ]));
        round_trip(IpCapsule::AddressRequest(vec![
            RequestedAddress { request_id: 1, prefix: prefix("::/64") },
            RequestedAddress { request_id: varint::MAX, prefix: prefix("0.0.0.0/32") },
        ]));
        round_trip(IpCapsule::RouteAdvertisement(vec![]));
        // Figure 16 and section 8.3 together.
        round_trip(IpCapsule::RouteAdvertisement(vec![
            range("192.0.2.0", "192.0.2.41", 0),
            range("192.0.2.43", "192.0.2.255", 0),
            range("2001:db8:3456::b", "2001:db8:3456::b", 132),
        ]));
    }

    #[test]
    fn unknown_types_are_not_ours() {
        assert_eq!(decode(0x00, b"anything"), Ok(None));
        assert_eq!(decode(0x04, &[]), Ok(None));
        assert_eq!(decode(0x1234, &[0xff]), Ok(None));
    }

    #[test]
    fn prefix_entry_errors() {
        for t in [ADDRESS_ASSIGN, ADDRESS_REQUEST] {
            assert_eq!(decode(t, &[1, 5, 0, 0, 0, 0, 32]), Err(IpCapsuleError::BadVersion(5)), "{t}");
            assert_eq!(decode(t, &[1, 4, 0, 0, 0, 0]), Err(IpCapsuleError::Truncated));
            assert_eq!(decode(t, &[1, 6, 0, 0, 0, 0, 32]), Err(IpCapsuleError::Truncated));
            assert_eq!(decode(t, &[0x40]), Err(IpCapsuleError::Truncated));
            assert_eq!(
                decode(t, &[1, 4, 192, 0, 2, 1, 33]),
                Err(IpCapsuleError::PrefixTooLong { len: 33, max: 32 })
            );
            assert_eq!(decode(t, &[1, 4, 192, 0, 2, 1, 24]), Err(IpCapsuleError::HostBitsSet));
            let mut v6 = vec![1, 6];
            v6.extend_from_slice(&[0x20, 1, 0x0d, 0xb8]);
            v6.extend_from_slice(&[0; 11]);
            v6.push(1);
            v6.push(64);
            assert_eq!(decode(t, &v6), Err(IpCapsuleError::HostBitsSet));
        }
    }

    #[test]
    fn address_request_rules() {
        // Section 4.7.2: zero entries MUST abort; IDs MUST NOT be zero.
        assert_eq!(decode(ADDRESS_REQUEST, &[]), Err(IpCapsuleError::EmptyAddressRequest));
        assert_eq!(decode(ADDRESS_REQUEST, &[0, 4, 0, 0, 0, 0, 32]), Err(IpCapsuleError::ZeroRequestId));
        let dup = [[9, 4, 0, 0, 0, 0, 32], [9, 4, 0, 0, 0, 0, 24]].concat();
        assert_eq!(decode(ADDRESS_REQUEST, &dup), Err(IpCapsuleError::DuplicateRequestId(9)));
        // ADDRESS_ASSIGN may be empty and may repeat ID 0.
        assert_eq!(decode(ADDRESS_ASSIGN, &[]), Ok(Some(IpCapsule::AddressAssign(vec![]))));
        let two = [[0, 4, 192, 0, 2, 1, 32], [0, 4, 192, 0, 2, 2, 32]].concat();
        assert!(decode(ADDRESS_ASSIGN, &two).is_ok());
    }

    fn route_value(ranges: &[(u8, &str, &str, u8)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (version, start, end, proto) in ranges {
            v.push(*version);
            push_addr(ip(start), &mut v);
            push_addr(ip(end), &mut v);
            v.push(*proto);
        }
        v
    }

    #[test]
    fn route_advertisement_rules() {
        let bad = |ranges: &[(u8, &str, &str, u8)]| decode(ROUTE_ADVERTISEMENT, &route_value(ranges));
        assert_eq!(bad(&[(4, "10.0.0.2", "10.0.0.1", 0)]), Err(IpCapsuleError::RangeStartAfterEnd));
        assert_eq!(bad(&[(4, "10.0.0.2", "10.0.0.1", 0)]), Err(IpCapsuleError::RangeStartAfterEnd));
        assert_eq!(
            bad(&[(6, "::1", "::1", 0), (4, "10.0.0.1", "10.0.0.1", 0)]),
            Err(IpCapsuleError::RangeVersionOrder)
        );
        assert_eq!(
            bad(&[(4, "10.0.0.1", "10.0.0.1", 17), (4, "10.0.0.9", "10.0.0.9", 6)]),
            Err(IpCapsuleError::RangeProtocolOrder)
        );
        // Same version and protocol: end of A strictly below start of B.
        assert_eq!(
            bad(&[(4, "10.0.0.0", "10.0.0.9", 6), (4, "10.0.0.9", "10.0.0.20", 6)]),
            Err(IpCapsuleError::RangeOverlap)
        );
        assert_eq!(
            bad(&[(4, "10.0.0.5", "10.0.0.9", 6), (4, "10.0.0.0", "10.0.0.1", 6)]),
            Err(IpCapsuleError::RangeOverlap)
        );
        assert!(bad(&[(4, "10.0.0.0", "10.0.0.9", 6), (4, "10.0.0.10", "10.0.0.20", 6)]).is_ok());
        // The same addresses under different protocols are fine...
        assert!(bad(&[(4, "10.0.0.0", "10.0.0.9", 6), (4, "10.0.0.0", "10.0.0.9", 17)]).is_ok());
        // ...but not under protocol 0 and a specific one.
        assert_eq!(
            bad(&[
                (4, "10.0.0.0", "10.0.0.9", 0),
                (4, "10.0.1.0", "10.0.1.9", 0),
                (4, "10.0.1.9", "10.0.1.9", 17),
            ]),
            Err(IpCapsuleError::WildcardOverlap)
        );
        assert!(
            bad(&[
                (4, "10.0.0.0", "10.0.0.9", 0),
                (4, "10.0.1.0", "10.0.1.9", 0),
                (4, "10.0.0.10", "10.0.0.255", 17),
                (6, "::", "::ffff", 6),
            ])
            .is_ok()
        );
        // Protocol-0 overlap is per version.
        assert!(bad(&[(4, "0.0.0.0", "255.255.255.255", 0), (6, "::", "::ffff:ffff", 6)]).is_ok());
        assert_eq!(bad(&[(7, "0.0.0.0", "0.0.0.0", 0)]), Err(IpCapsuleError::BadVersion(7)));
        let mut truncated = route_value(&[(4, "10.0.0.0", "10.0.0.9", 0)]);
        truncated.pop();
        assert_eq!(decode(ROUTE_ADVERTISEMENT, &truncated), Err(IpCapsuleError::Truncated));
    }

    #[test]
    fn range_constructor() {
        assert_eq!(
            IpAddressRange::new(ip("10.0.0.1"), ip("::1"), 0),
            Err(IpCapsuleError::RangeFamilyMismatch)
        );
        let r = range("10.0.0.1", "10.0.0.3", 0);
        assert!(r.contains(ip("10.0.0.2")) && !r.contains(ip("10.0.0.4")) && !r.contains(ip("::a00:2")));
    }

    #[test]
    fn ranges_for_sorts_and_merges() {
        let got = ranges_for(
            &[
                prefix("2001:db8::/32"),
                prefix("192.0.2.128/25"),
                prefix("192.0.2.0/25"),
                prefix("10.0.0.0/8"),
                prefix("10.1.0.0/16"),
                prefix("::/0"),
            ],
            17,
        );
        assert_eq!(
            got,
            vec![
                range("10.0.0.0", "10.255.255.255", 17),
                range("192.0.2.0", "192.0.2.255", 17),
                range("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 17),
            ]
        );
        let capsule = IpCapsule::RouteAdvertisement(got);
        round_trip(capsule);
        assert_eq!(
            ranges_for(&[prefix("0.0.0.0/0"), prefix("255.255.255.255/32")], 0),
            vec![range("0.0.0.0", "255.255.255.255", 0)]
        );
        assert!(ranges_for(&[], 0).is_empty());
    }
}

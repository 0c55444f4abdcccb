//! Bound UDP proxying (draft-ietf-masque-connect-udp-listen-13): one
//! connect-udp tunnel that sends to and receives from many peers.
//!
//! The pieces, all sans-IO:
//!
//! - the three registration capsules, COMPRESSION_ASSIGN, COMPRESSION_ACK and
//!   COMPRESSION_CLOSE (section 3): [`decode_capsule`] reads one capsule's
//!   value (the caller's [`crate::capsule::CapsuleDecoder`] keeps
//!   [`BIND_CAPSULES`]) and applies every rule that does not need state;
//!   [`encode_capsule`] writes a whole capsule;
//! - the uncompressed datagram payload (section 4): [`decode_uncompressed`],
//!   [`encode_uncompressed`];
//! - the `Connect-UDP-Bind` (section 6) and `Proxy-Public-Address`
//!   (section 7) fields: [`bind_requested`], [`proxy_public_address`],
//!   [`parse_proxy_public_address`];
//! - [`ContextTable`], the proxy's per-tunnel registration state machine:
//!   client capsules in, capsules to send back out; datagrams from the client
//!   mapped to a peer; packets from a peer mapped to a context ID.
//!
//! Every error of [`decode_capsule`] and of
//! [`ContextTable::on_client_capsule`] means the capsule is malformed:
//! section 3.1 sends the receiver to RFC 9297 section 3.3, so the caller
//! aborts the request stream (H3_MESSAGE_ERROR).
//!
//! Everything is bounded by [`Limits`]: open contexts, remembered peers, and
//! the record of context IDs the client has used.
//!
//! Non-goals: buffering (section 8 lets the proxy drop what it cannot
//! deliver), timers (the caller closes idle contexts with
//! [`ContextTable::close`]), and the limit on compression responses waiting
//! for stream credit (section 9), which belongs to whoever owns the stream's
//! send buffer.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use crate::{capsule, varint};

/// COMPRESSION_ASSIGN capsule type (section 3.1).
pub const COMPRESSION_ASSIGN: u64 = 0x11;
/// COMPRESSION_ACK capsule type (section 3.2).
pub const COMPRESSION_ACK: u64 = 0x12;
/// COMPRESSION_CLOSE capsule type (section 3.3).
pub const COMPRESSION_CLOSE: u64 = 0x13;
/// The capsule types a bound tunnel's decoder keeps.
pub const BIND_CAPSULES: &[u64] = &[COMPRESSION_ASSIGN, COMPRESSION_ACK, COMPRESSION_CLOSE];

/// The `Connect-UDP-Bind` field name (section 6), lowercase as HTTP/3 sends it.
pub const CONNECT_UDP_BIND: &str = "connect-udp-bind";
/// The `Proxy-Public-Address` field name (section 7), lowercase.
pub const PROXY_PUBLIC_ADDRESS: &str = "proxy-public-address";

/// A registration capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindCapsule {
    /// COMPRESSION_ASSIGN (section 3.1). `target: None` = IP version 0 (an
    /// uncompressed context).
    Assign {
        /// The context ID being registered.
        context_id: u64,
        /// The compressed tuple, or `None` for the uncompressed context.
        target: Option<SocketAddr>,
    },
    /// COMPRESSION_ACK (section 3.2): the registration was accepted.
    Ack {
        /// The context ID of the accepted COMPRESSION_ASSIGN.
        context_id: u64,
    },
    /// COMPRESSION_CLOSE (section 3.3): a refusal or a closure.
    Close {
        /// The context ID refused or closed.
        context_id: u64,
    },
}

impl BindCapsule {
    /// The context ID the capsule is about.
    pub fn context_id(&self) -> u64 {
        match *self {
            BindCapsule::Assign { context_id, .. }
            | BindCapsule::Ack { context_id }
            | BindCapsule::Close { context_id } => context_id,
        }
    }

    /// The capsule type it is sent as.
    pub fn capsule_type(&self) -> u64 {
        match self {
            BindCapsule::Assign { .. } => COMPRESSION_ASSIGN,
            BindCapsule::Ack { .. } => COMPRESSION_ACK,
            BindCapsule::Close { .. } => COMPRESSION_CLOSE,
        }
    }
}

/// Why a bound-UDP capsule, payload or field is invalid. For capsules every
/// variant means "malformed": abort the request stream (RFC 9297 section
/// 3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The capsule value or datagram payload ends inside a field.
    #[error("value ends inside a field")]
    Truncated,
    /// A capsule value carries bytes after its last field (the formats of
    /// section 3 have no room for more).
    #[error("capsule value has {0} bytes after its last field")]
    TrailingBytes(usize),
    /// COMPRESSION_ASSIGN's IP Version "MUST be 0, 4 or 6" (section 3.1); an
    /// uncompressed payload's "MUST be 4 or 6" (section 4).
    #[error("IP Version {0} is not allowed here")]
    BadIpVersion(u8),
    /// COMPRESSION_ASSIGN or COMPRESSION_CLOSE with Context ID 0: "the
    /// Context ID value of COMPRESSION_ASSIGN can never be zero" (section
    /// 3.1); "a COMPRESSION_CLOSE capsule with Context ID set to zero is
    /// malformed" (section 3.3).
    #[error("context ID 0 in a registration capsule")]
    ZeroContextId,
    /// A COMPRESSION_ASSIGN from the client with an odd Context ID: clients
    /// allocate even ones (section 3, RFC 9298 section 4).
    #[error("client registered odd context ID {0}")]
    WrongParity(u64),
    /// "If a recipient detects a repeated Context ID, it MUST treat the
    /// capsule as malformed" (section 3.1); IDs are never reused (section
    /// 3.3), so this includes IDs closed earlier.
    #[error("context ID {0} registered twice")]
    RepeatedContextId(u64),
    /// "If a server receives a request to open an uncompressed Context ID
    /// and it already has one open, then the server MUST treat the second
    /// capsule as malformed" (section 4).
    #[error("uncompressed context {new} requested while {open} is open")]
    SecondUncompressed {
        /// The uncompressed context already open.
        open: u64,
        /// The one requested.
        new: u64,
    },
    /// "If an endpoint receives a COMPRESSION_ASSIGN capsule whose tuple
    /// matches another open Context ID that was opened by its peer, it MUST
    /// treat the capsule as malformed" (section 3.1).
    #[error("context {new} registers a tuple the peer already registered as {open}")]
    DuplicateTuple {
        /// The peer's context already open for the tuple.
        open: u64,
        /// The one requested.
        new: u64,
    },
    /// "If an endpoint receives COMPRESSION_ACK capsule for a Context ID it
    /// did not attempt to register via COMPRESSION_ASSIGN, that capsule is
    /// considered malformed" (section 3.2).
    #[error("COMPRESSION_ACK for context {0}, which was never assigned")]
    AckNotAssigned(u64),
    /// "If a client receives a COMPRESSION_ASSIGN capsule with the IP
    /// Version set to 0, it MUST treat it as malformed" (section 4); also a
    /// COMPRESSION_ASSIGN from the proxy with an even Context ID.
    #[error("the proxy may not register context {0} this way")]
    ProxyAssign(u64),
    /// A Proxy-Public-Address value that is not a non-empty sf-list of
    /// sf-strings holding `IPv4address:port` or `[IPv6address]:port`
    /// (section 7).
    #[error("invalid Proxy-Public-Address: {0}")]
    BadPublicAddress(&'static str),
}

/// Why [`ContextTable::outbound`] has no destination for a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// No open context has this ID (never registered, refused or closed):
    /// drop and count. Section 3.1 lets peers send on IDs not yet
    /// acknowledged, "knowing that those HTTP Datagrams can be dropped".
    #[error("no open context {0}")]
    UnknownContext(u64),
    /// Context ID 0 in a request whose target variables were both `*`:
    /// "Context ID 0 MUST NOT be used in HTTP Datagrams. If one is received,
    /// the recipient MUST abort the request stream" (section 3).
    #[error("context ID 0 in a bound tunnel without a target")]
    ContextZero,
    /// The uncompressed payload is malformed (section 4): drop and count.
    #[error("malformed uncompressed payload: {0}")]
    Malformed(BindError),
    /// The peer's address family is not one the proxy announced: "the
    /// proxy will drop those datagrams" (section 7).
    #[error("{0}: an address family the proxy did not announce")]
    FamilyNotAnnounced(SocketAddr),
}

/// Why [`ContextTable::inbound`] drops a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// [`Filter::SentTo`] and the client never sent to this peer.
    Filtered,
    /// No compressed context for the peer and no uncompressed context open
    /// (section 8: "the proxy will either drop the datagram or temporarily
    /// buffer it").
    NoContext,
    /// The peer's address family is not one the proxy announced.
    FamilyNotAnnounced,
}

fn read_addr(version: u8, buf: &[u8]) -> Result<(SocketAddr, usize), BindError> {
    let ip_len = match version {
        4 => 4,
        6 => 16,
        v => return Err(BindError::BadIpVersion(v)),
    };
    let field = buf.get(..ip_len + 2).ok_or(BindError::Truncated)?;
    let ip = if version == 4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&field[..4]).expect("4 bytes")))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&field[..16]).expect("16 bytes")))
    };
    let port = u16::from_be_bytes([field[ip_len], field[ip_len + 1]]);
    Ok((SocketAddr::new(ip, port), ip_len + 2))
}

fn write_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn read_context_id(value: &[u8]) -> Result<(u64, usize), BindError> {
    varint::decode(value).map_err(|_| BindError::Truncated)
}

fn only_context_id(value: &[u8]) -> Result<u64, BindError> {
    let (id, used) = read_context_id(value)?;
    match value.len() - used {
        0 => Ok(id),
        extra => Err(BindError::TrailingBytes(extra)),
    }
}

/// Decodes the value of a capsule of `capsule_type`: `Ok(None)` when the
/// type is not one of [`BIND_CAPSULES`] (leave it to other handlers).
///
/// Applies the stateless rules: the exact field layout of Figures 1 to 3
/// (no trailing bytes), IP Version 0, 4 or 6, and no Context ID 0 in
/// COMPRESSION_ASSIGN or COMPRESSION_CLOSE. A COMPRESSION_ACK of 0 decodes;
/// it can never match an assignment, which [`ContextTable`] reports.
pub fn decode_capsule(capsule_type: u64, value: &[u8]) -> Result<Option<BindCapsule>, BindError> {
    let capsule = match capsule_type {
        COMPRESSION_ASSIGN => {
            let (context_id, used) = read_context_id(value)?;
            let rest = &value[used..];
            let (&version, rest) = rest.split_first().ok_or(BindError::Truncated)?;
            let (target, rest) = if version == 0 {
                (None, rest)
            } else {
                let (addr, n) = read_addr(version, rest)?;
                (Some(addr), &rest[n..])
            };
            if !rest.is_empty() {
                return Err(BindError::TrailingBytes(rest.len()));
            }
            BindCapsule::Assign { context_id, target }
        }
        COMPRESSION_ACK => BindCapsule::Ack { context_id: only_context_id(value)? },
        COMPRESSION_CLOSE => BindCapsule::Close { context_id: only_context_id(value)? },
        _ => return Ok(None),
    };
    if capsule.context_id() == 0 && !matches!(capsule, BindCapsule::Ack { .. }) {
        return Err(BindError::ZeroContextId);
    }
    Ok(Some(capsule))
}

/// Appends the whole capsule (type, length, value) to `out`. An IPv6
/// target's flow info and scope ID are not carried.
///
/// # Panics
/// Panics if the context ID exceeds [`varint::MAX`]; callers only encode IDs
/// they allocated or decoded.
pub fn encode_capsule(c: &BindCapsule, out: &mut Vec<u8>) {
    let mut value = Vec::with_capacity(varint::MAX_LEN + 19);
    varint::push(c.context_id(), &mut value);
    if let BindCapsule::Assign { target, .. } = c {
        match target {
            None => value.push(0),
            Some(addr) => write_addr(*addr, &mut value),
        }
    }
    capsule::encode(c.capsule_type(), &value, out);
}

/// Uncompressed payload (section 4): IP version, address, port, UDP payload.
/// `payload` follows the context ID; the peer and the UDP payload are
/// returned. IP Version "MUST be 4 or 6".
pub fn decode_uncompressed(payload: &[u8]) -> Result<(SocketAddr, &[u8]), BindError> {
    let (&version, rest) = payload.split_first().ok_or(BindError::Truncated)?;
    let (addr, used) = read_addr(version, rest)?;
    Ok((addr, &rest[used..]))
}

/// Appends the uncompressed payload for `peer` and `udp_payload` (section 4,
/// Figure 4) to `out`; the caller writes the context ID before it.
pub fn encode_uncompressed(peer: SocketAddr, udp_payload: &[u8], out: &mut Vec<u8>) {
    write_addr(peer, out);
    out.extend_from_slice(udp_payload);
}

// --- Structured Fields (RFC 9651), just what sections 6 and 7 need. ---

fn is_lcalpha(b: u8) -> bool {
    b.is_ascii_lowercase()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Length of the run of bytes at the front of `s` that satisfy `f`.
fn run(s: &[u8], f: impl Fn(u8) -> bool) -> usize {
    s.iter().position(|b| !f(*b)).unwrap_or(s.len())
}

/// Parses an sf-string (RFC 9651 section 4.2.5) at the front of `s`:
/// its unescaped content and the rest.
fn sf_string(s: &[u8]) -> Option<(String, &[u8])> {
    let mut rest = s.strip_prefix(b"\"")?;
    let mut out = String::new();
    loop {
        let (&b, r) = rest.split_first()?;
        rest = r;
        match b {
            b'"' => return Some((out, rest)),
            b'\\' => {
                let (&e, r) = rest.split_first()?;
                if e != b'"' && e != b'\\' {
                    return None;
                }
                out.push(e as char);
                rest = r;
            }
            0x20..=0x7e => out.push(b as char),
            _ => return None,
        }
    }
}

/// Integer or Decimal (RFC 9651 sections 4.2.4).
fn sf_number(s: &[u8]) -> Option<&[u8]> {
    let s = s.strip_prefix(b"-").unwrap_or(s);
    let int = run(s, |b| b.is_ascii_digit());
    if int == 0 || int > 15 {
        return None;
    }
    let rest = &s[int..];
    match rest.strip_prefix(b".") {
        None => Some(rest),
        Some(frac) => {
            let n = run(frac, |b| b.is_ascii_digit());
            (int <= 12 && (1..=3).contains(&n)).then_some(&frac[n..])
        }
    }
}

/// Skips one bare item (RFC 9651 section 4.2.3.1) at the front of `s`.
fn sf_bare_item(s: &[u8]) -> Option<&[u8]> {
    match *s.first()? {
        b'-' | b'0'..=b'9' => sf_number(s),
        b'"' => sf_string(s).map(|(_, r)| r),
        b'*' | b'a'..=b'z' | b'A'..=b'Z' => {
            Some(&s[1 + run(&s[1..], |b| is_tchar(b) || b == b':' || b == b'/')..])
        }
        b':' => {
            let body = &s[1..];
            let n = run(body, |b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            body[n..].strip_prefix(b":")
        }
        b'?' => match s.get(1)? {
            b'0' | b'1' => Some(&s[2..]),
            _ => None,
        },
        b'@' => {
            let r = sf_number(&s[1..])?;
            // A Date is an Integer: no fractional part.
            (!s[1..s.len() - r.len()].contains(&b'.')).then_some(r)
        }
        b'%' => {
            let mut rest = s[1..].strip_prefix(b"\"")?;
            loop {
                let (&b, r) = rest.split_first()?;
                rest = r;
                match b {
                    b'"' => return Some(rest),
                    b'%' => {
                        let hex = rest.get(..2)?;
                        if !hex.iter().all(|h| h.is_ascii_digit() || (b'a'..=b'f').contains(h)) {
                            return None;
                        }
                        rest = &rest[2..];
                    }
                    0x20..=0x7e => {}
                    _ => return None,
                }
            }
        }
        _ => None,
    }
}

/// Skips parameters (RFC 9651 section 4.2.3.2) at the front of `s`.
fn sf_parameters(mut s: &[u8]) -> Option<&[u8]> {
    while let Some(r) = s.strip_prefix(b";") {
        let r = &r[run(r, |b| b == b' ')..];
        let first = *r.first()?;
        if !(is_lcalpha(first) || first == b'*') {
            return None;
        }
        let r = &r[1 + run(&r[1..], |b| is_lcalpha(b) || b.is_ascii_digit() || b"_-.*".contains(&b))..];
        s = match r.strip_prefix(b"=") {
            Some(v) => sf_bare_item(v)?,
            None => r,
        };
    }
    Some(s)
}

/// Whether a `connect-udp-bind` field value means "true" (section 6: an
/// sf-boolean `?1`, parameters ignored; anything else — including a list
/// from a repeated field, which the caller passes joined with ", " — means
/// absent).
///
/// The value is parsed as an RFC 9651 Item: surrounding spaces are
/// discarded, parameters must be well-formed (their values are ignored,
/// "Receivers MUST ignore unknown parameters"), and nothing may follow.
pub fn bind_requested(value: &str) -> bool {
    let v = value.trim_matches(' ').as_bytes();
    v.strip_prefix(b"?1").and_then(sf_parameters).is_some_and(<[u8]>::is_empty)
}

/// The Proxy-Public-Address value (section 7): an sf-list of sf-strings
/// "ip:port", IPv6 in brackets, e.g.
/// `"192.0.2.45:54321", "[2001:db8::1234]:54321"`. Scope IDs are not
/// written (they have no meaning off-link).
pub fn proxy_public_address(addrs: &[SocketAddr]) -> String {
    let mut out = String::new();
    for (i, addr) in addrs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match addr.ip() {
            IpAddr::V4(ip) => out.push_str(&format!("\"{ip}:{}\"", addr.port())),
            IpAddr::V6(ip) => out.push_str(&format!("\"[{ip}]:{}\"", addr.port())),
        }
    }
    out
}

/// Parses one `ip-port-tuple` (section 7, Figure 6) without its quotes.
fn parse_tuple(s: &str) -> Result<SocketAddr, BindError> {
    let (ip, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest.split_once(']').ok_or(BindError::BadPublicAddress("unclosed '['"))?;
        // IP-literal also allows IPvFuture ("v1.x"), which no socket speaks.
        let ip: Ipv6Addr = ip.parse().map_err(|_| BindError::BadPublicAddress("bad IPv6 address"))?;
        (IpAddr::V6(ip), port)
    } else {
        let (ip, port) = s.split_at(s.find(':').ok_or(BindError::BadPublicAddress("no port"))?);
        // Rust's parser is RFC 3986's IPv4address: no leading zeros.
        let ip: Ipv4Addr = ip.parse().map_err(|_| BindError::BadPublicAddress("bad IPv4 address"))?;
        (IpAddr::V4(ip), port)
    };
    let port = port.strip_prefix(':').ok_or(BindError::BadPublicAddress("no port"))?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BindError::BadPublicAddress("bad port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(SocketAddr::new(ip, p)),
        _ => Err(BindError::BadPublicAddress("bad port")),
    }
}

/// Parses a Proxy-Public-Address value back (for clients and tests): an
/// RFC 9651 List whose members are all Strings holding an `ip-port-tuple`.
/// Member parameters are ignored. An empty list is an error: "the proxy MUST
/// select at least one public IP address" (section 7).
pub fn parse_proxy_public_address(value: &str) -> Result<Vec<SocketAddr>, BindError> {
    let bad = BindError::BadPublicAddress;
    let mut s = value.trim_matches(' ').as_bytes();
    let mut addrs = Vec::new();
    while !s.is_empty() {
        let (text, rest) = sf_string(s).ok_or(bad("a member is not a String"))?;
        addrs.push(parse_tuple(&text)?);
        let rest = sf_parameters(rest).ok_or(bad("bad parameters"))?;
        let rest = &rest[run(rest, |b| b == b' ' || b == b'\t')..];
        if rest.is_empty() {
            break;
        }
        let rest = rest.strip_prefix(b",").ok_or(bad("members must be separated by ','"))?;
        s = &rest[run(rest, |b| b == b' ' || b == b'\t')..];
        if s.is_empty() {
            return Err(bad("trailing ','"));
        }
    }
    if addrs.is_empty() {
        return Err(bad("empty list"));
    }
    Ok(addrs)
}

// --- The proxy's registration state machine. ---

/// Per-tunnel bounds of a [`ContextTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open contexts per tunnel, whoever opened them (section 9: "endpoints
    /// MUST place a limit on how many Context IDs can be open
    /// simultaneously and reject registrations beyond the limit").
    pub max_contexts: usize,
    /// Distinct peers the tunnel has sent to (for [`Filter::SentTo`]); past
    /// it the least recently used peer is forgotten.
    pub max_peers: usize,
}

impl Default for Limits {
    /// 64 contexts, 256 peers.
    fn default() -> Self {
        Self { max_contexts: 64, max_peers: 256 }
    }
}

/// Which peers may reach the client through the uncompressed context or a
/// context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Only peers the client has sent to (endpoint-dependent filtering, like
    /// an EDF NAT). The request's own target, if any, always passes; a
    /// compressed context the client registered does not by itself open
    /// the filter (sending on it does).
    SentTo,
    /// Any peer.
    Any,
}

/// How [`ContextTable::inbound`] delivers a packet from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Send with this context ID, payload as is.
    Compressed(u64),
    /// Send with the uncompressed context ID, peer address inline
    /// ([`encode_uncompressed`]).
    Uncompressed(u64),
    /// As Uncompressed, and first send this COMPRESSION_ASSIGN capsule (a new
    /// proxy context for the peer).
    UncompressedAndAssign(u64, BindCapsule),
    /// Drop (counted by the caller): filtered or no way to deliver.
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    Client,
    /// Opened by the proxy; `acked` once the client's COMPRESSION_ACK came.
    Proxy {
        acked: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Context {
    /// `None` for the uncompressed context.
    target: Option<SocketAddr>,
    opener: Opener,
}

/// Context IDs the client has registered, as ranges of `id / 2`: a client
/// that allocates in order needs one range. Bounded by `cap` ranges.
#[derive(Debug)]
struct IdSet {
    ranges: BTreeMap<u64, u64>,
    cap: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Insert {
    New,
    Full,
}

impl IdSet {
    fn contains(&self, k: u64) -> bool {
        self.ranges.range(..=k).next_back().is_some_and(|(_, &end)| end >= k)
    }

    /// Records `k`, which must not be present.
    fn insert(&mut self, k: u64) -> Insert {
        let prev = self.ranges.range(..k).next_back().map(|(&s, &e)| (s, e)).filter(|&(_, e)| e + 1 == k);
        let next = k.checked_add(1).and_then(|n| self.ranges.get(&n).map(|&e| (n, e)));
        match (prev, next) {
            (Some((start, _)), Some((n, end))) => {
                self.ranges.remove(&n);
                self.ranges.insert(start, end);
            }
            (Some((start, _)), None) => {
                self.ranges.insert(start, k);
            }
            (None, Some((n, end))) => {
                self.ranges.remove(&n);
                self.ranges.insert(k, end);
            }
            (None, None) => {
                if self.ranges.len() >= self.cap {
                    return Insert::Full;
                }
                self.ranges.insert(k, k);
            }
        }
        Insert::New
    }
}

/// Drops what makes two equal tuples compare unequal: an IPv6 flow label and
/// scope ID, and the IPv4-mapped IPv6 form of an IPv4 address (one peer is
/// one tuple, section 3.1: "Only one Context ID can be used per IP-port
/// tuple"; and a mapped address is an IPv4 peer as far as the announced
/// families go, section 7).
pub fn tuple(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => SocketAddr::V6(SocketAddrV6::new(*a.ip(), a.port(), 0, 0)),
        },
        v4 => v4,
    }
}

/// The address families a proxy announced in Proxy-Public-Address: "If the
/// proxy only shares IP addresses from a single address family, that
/// indicates that the proxy only supports that family" (section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    /// IPv4 was announced.
    pub v4: bool,
    /// IPv6 was announced.
    pub v6: bool,
}

impl Families {
    /// Both families.
    pub const BOTH: Families = Families { v4: true, v6: true };

    /// The families of `announced`.
    pub fn of(announced: &[SocketAddr]) -> Self {
        Self {
            v4: announced.iter().any(|a| tuple(*a).is_ipv4()),
            v6: announced.iter().any(|a| tuple(*a).is_ipv6()),
        }
    }

    /// Whether `addr`'s family (an IPv4-mapped address counts as IPv4) was
    /// announced.
    pub fn contains(self, addr: SocketAddr) -> bool {
        if tuple(addr).is_ipv4() { self.v4 } else { self.v6 }
    }
}

/// The proxy's registration state for one bound tunnel, sans-IO.
///
/// Drive it with every capsule from the client ([`Self::on_client_capsule`],
/// send what it returns, in order), every datagram from the client
/// ([`Self::outbound`]) and every UDP packet from a peer ([`Self::inbound`]).
///
/// Peers are compared as IP and port only (no IPv6 flow label or scope ID),
/// and an IPv4-mapped IPv6 address is the IPv4 peer it maps: whatever form
/// the client or the socket uses, one peer is one tuple.
///
/// Context ID 0 belongs to the request's target when there is one
/// ([`Self::with_target`]): it then works like a compressed context for that
/// target (section 3: "the same semantics as in unextended UDP proxying").
#[derive(Debug)]
pub struct ContextTable {
    limits: Limits,
    filter: Filter,
    families: Families,
    proxy_compression: bool,
    target: Option<SocketAddr>,
    contexts: HashMap<u64, Context>,
    by_target: HashMap<SocketAddr, u64>,
    uncompressed: Option<u64>,
    /// Open contexts the proxy opened, oldest first.
    proxy_open: BTreeSet<u64>,
    next_proxy_id: u64,
    client_ids: IdSet,
    /// Peers the client sent to, with the tick of the last send.
    sent_to: HashMap<SocketAddr, u64>,
    tick: u64,
    /// Peers whose compressed context the client closed or refused: the
    /// proxy does not register them again. Bounded by `max_contexts`.
    declined: HashSet<SocketAddr>,
    declined_order: VecDeque<SocketAddr>,
}

impl ContextTable {
    /// An empty table for a tunnel whose target variables were both `*`.
    pub fn new(limits: Limits, filter: Filter) -> Self {
        Self {
            limits,
            filter,
            families: Families::BOTH,
            proxy_compression: true,
            target: None,
            contexts: HashMap::new(),
            by_target: HashMap::new(),
            uncompressed: None,
            proxy_open: BTreeSet::new(),
            next_proxy_id: 1,
            client_ids: IdSet { ranges: BTreeMap::new(), cap: limits.max_contexts.saturating_mul(2).max(16) },
            sent_to: HashMap::new(),
            tick: 0,
            declined: HashSet::new(),
            declined_order: VecDeque::new(),
        }
    }

    /// For a fallback-capable request (section 2: a real target): context 0
    /// carries payloads to and from `target` (resolved by the caller), which
    /// always passes the filter.
    pub fn with_target(mut self, target: SocketAddr) -> Self {
        self.target = Some(tuple(target));
        self
    }

    /// Only the address `families` the proxy announced are served: other
    /// registrations are refused (COMPRESSION_CLOSE) and other datagrams
    /// dropped (section 7).
    pub fn with_families(mut self, families: Families) -> Self {
        self.families = families;
        self
    }

    /// Whether the proxy registers compressed contexts for new peers on its
    /// own (default on; section 10: compression "SHOULD" be requested "as
    /// early as possible").
    pub fn with_proxy_compression(mut self, on: bool) -> Self {
        self.proxy_compression = on;
        self
    }

    /// Number of open contexts (either side's, the uncompressed one
    /// included); never above `max_contexts`.
    pub fn open_contexts(&self) -> usize {
        self.contexts.len()
    }

    /// Number of peers remembered for [`Filter::SentTo`]; never above
    /// `max_peers`.
    pub fn remembered_peers(&self) -> usize {
        self.sent_to.len()
    }

    /// The open uncompressed context, if any.
    pub fn uncompressed_context(&self) -> Option<u64> {
        self.uncompressed
    }

    /// The open compressed context for `peer`, if any, and whether it is
    /// usable (opened by the client, or opened by the proxy and ACKed).
    pub fn context_for(&self, peer: SocketAddr) -> Option<(u64, bool)> {
        let id = *self.by_target.get(&tuple(peer))?;
        let ready = !matches!(self.contexts.get(&id)?.opener, Opener::Proxy { acked: false });
        Some((id, ready))
    }

    /// A capsule from the client. Returns the capsules to send back, in
    /// order (COMPRESSION_ACK; COMPRESSION_CLOSE for a refusal or for a proxy
    /// context that gives way), or an error when the capsule is malformed per
    /// the draft: the caller aborts the stream with H3_MESSAGE_ERROR (RFC
    /// 9297 section 3.3). On error the table is unchanged.
    ///
    /// A registration is refused (COMPRESSION_CLOSE) when `allowed(target)`
    /// is false for a compressed target (section 9: the proxy "needs to
    /// perform checks on the IP address and port of received
    /// COMPRESSION_ASSIGN capsules"), or when `max_contexts` are open and
    /// none of them was opened by the proxy; otherwise the oldest proxy
    /// context is closed to make room (section 3.3: "Endpoints MAY close any
    /// Context ID regardless of which endpoint registered it").
    pub fn on_client_capsule(
        &mut self,
        c: BindCapsule,
        allowed: impl Fn(SocketAddr) -> bool,
    ) -> Result<Vec<BindCapsule>, BindError> {
        match c {
            BindCapsule::Assign { context_id, target } => self.client_assign(context_id, target, allowed),
            BindCapsule::Ack { context_id } => {
                // Section 3.2: an ACK must answer one of our ASSIGNs. Proxy
                // IDs are the odd ones below `next_proxy_id`.
                if context_id % 2 == 0 || context_id >= self.next_proxy_id {
                    return Err(BindError::AckNotAssigned(context_id));
                }
                // A context closed since (conflict, eviction) stays closed.
                if let Some(ctx) = self.contexts.get_mut(&context_id) {
                    ctx.opener = Opener::Proxy { acked: true };
                }
                Ok(Vec::new())
            }
            BindCapsule::Close { context_id } => {
                if context_id == 0 {
                    return Err(BindError::ZeroContextId);
                }
                // Unknown or already closed: nothing to do.
                if let Some(ctx) = self.remove(context_id)
                    && let Some(t) = ctx.target
                {
                    self.decline(t);
                }
                Ok(Vec::new())
            }
        }
    }

    fn client_assign(
        &mut self,
        id: u64,
        target: Option<SocketAddr>,
        allowed: impl Fn(SocketAddr) -> bool,
    ) -> Result<Vec<BindCapsule>, BindError> {
        // Section 3.1: "the Context ID value of COMPRESSION_ASSIGN can never
        // be zero"; clients "can only allocate even Context IDs".
        if id == 0 {
            return Err(BindError::ZeroContextId);
        }
        if id % 2 == 1 {
            return Err(BindError::WrongParity(id));
        }
        // Section 3.1: "If a recipient detects a repeated Context ID, it
        // MUST treat the capsule as malformed"; section 3.3: "Once a Context
        // ID has been closed, that ID cannot be reused".
        if self.client_ids.contains(id / 2) {
            return Err(BindError::RepeatedContextId(id));
        }
        let target = target.map(tuple);
        let mut out = Vec::new();
        match target {
            None => {
                // Section 4: a second uncompressed context is malformed.
                if let Some(open) = self.uncompressed {
                    return Err(BindError::SecondUncompressed { open, new: id });
                }
            }
            Some(t) => {
                if let Some(&open) = self.by_target.get(&t) {
                    if self.contexts[&open].opener == Opener::Client {
                        // Section 3.1: "whose tuple matches another open
                        // Context ID that was opened by its peer, it MUST
                        // treat the capsule as malformed".
                        return Err(BindError::DuplicateTuple { open, new: id });
                    }
                    // Section 3.1: "If an endpoint detects that both it and
                    // its peer have opened a Context ID for the same tuple,
                    // the endpoint MUST close the Context ID that was opened
                    // by the proxy."
                    self.remove(open);
                    out.push(BindCapsule::Close { context_id: open });
                }
            }
        }
        if self.client_ids.insert(id / 2) == Insert::Full {
            // Too sparse a history to remember: refuse without recording
            // (a repeat of this ID will be refused again, harmlessly).
            out.push(BindCapsule::Close { context_id: id });
            return Ok(out);
        }
        // Section 7: registrations for a family the proxy did not announce
        // are rejected; section 9: so are targets the policy denies.
        if target.is_some_and(|t| !self.families.contains(t) || !allowed(t)) {
            out.push(BindCapsule::Close { context_id: id });
            return Ok(out);
        }
        if self.contexts.len() >= self.limits.max_contexts {
            match self.proxy_open.first().copied() {
                Some(oldest) => {
                    self.remove(oldest);
                    out.push(BindCapsule::Close { context_id: oldest });
                }
                None => {
                    out.push(BindCapsule::Close { context_id: id });
                    return Ok(out);
                }
            }
        }
        self.contexts.insert(id, Context { target, opener: Opener::Client });
        match target {
            None => self.uncompressed = Some(id),
            Some(t) => {
                self.by_target.insert(t, id);
            }
        }
        out.push(BindCapsule::Ack { context_id: id });
        Ok(out)
    }

    /// Closes an open context, whoever opened it (section 3.3), e.g. after
    /// it sat idle: returns the COMPRESSION_CLOSE to send, or `None` if
    /// `context_id` is not open. Closing the uncompressed context also stops
    /// the proxy from opening new contexts (section 3.1).
    pub fn close(&mut self, context_id: u64) -> Option<BindCapsule> {
        self.remove(context_id).map(|_| BindCapsule::Close { context_id })
    }

    fn remove(&mut self, id: u64) -> Option<Context> {
        let ctx = self.contexts.remove(&id)?;
        match ctx.target {
            None => self.uncompressed = None,
            Some(t) => {
                if self.by_target.get(&t) == Some(&id) {
                    self.by_target.remove(&t);
                }
            }
        }
        self.proxy_open.remove(&id);
        Some(ctx)
    }

    fn decline(&mut self, peer: SocketAddr) {
        let cap = self.limits.max_contexts;
        if cap == 0 || !self.declined.insert(peer) {
            return;
        }
        self.declined_order.push_back(peer);
        if self.declined_order.len() > cap
            && let Some(old) = self.declined_order.pop_front()
        {
            self.declined.remove(&old);
        }
    }

    fn record_sent_to(&mut self, peer: SocketAddr) {
        if self.filter == Filter::Any || Some(peer) == self.target {
            return;
        }
        self.tick += 1;
        if let Some(t) = self.sent_to.get_mut(&peer) {
            *t = self.tick;
            return;
        }
        if self.limits.max_peers == 0 {
            return;
        }
        if self.sent_to.len() >= self.limits.max_peers {
            // Forget the least recently used peer, as a NAT expires its
            // oldest mapping. O(max_peers), only for a new peer.
            if let Some(oldest) = self.sent_to.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                self.sent_to.remove(&oldest);
            }
        }
        self.sent_to.insert(peer, self.tick);
    }

    /// A datagram from the client with `context_id`: where to send its UDP
    /// payload. Records the peer as "sent to" for filtering (bounded by
    /// `max_peers`).
    ///
    /// Context 0 goes to the request's target ([`Self::with_target`]), or
    /// is [`OutboundError::ContextZero`] without one (abort the stream).
    /// Datagrams on a proxy context the client has not ACKed yet are
    /// accepted: the client may use it early (section 3.1). The caller still
    /// checks its policy on the peers of uncompressed datagrams (section 9).
    pub fn outbound<'a>(
        &mut self,
        context_id: u64,
        payload: &'a [u8],
    ) -> Result<(SocketAddr, &'a [u8]), OutboundError> {
        if context_id == 0 {
            return self.target.map(|t| (t, payload)).ok_or(OutboundError::ContextZero);
        }
        let ctx = self.contexts.get(&context_id).ok_or(OutboundError::UnknownContext(context_id))?;
        let (peer, udp) = match ctx.target {
            Some(t) => (t, payload),
            None => {
                let (peer, udp) = decode_uncompressed(payload).map_err(OutboundError::Malformed)?;
                (tuple(peer), udp)
            }
        };
        if !self.families.contains(peer) {
            return Err(OutboundError::FamilyNotAnnounced(peer));
        }
        self.record_sent_to(peer);
        Ok((peer, udp))
    }

    /// A UDP packet from `peer`: how to deliver it to the client.
    ///
    /// In order: [`Filter::SentTo`] drops peers the client never sent to
    /// (the request's target passes); a usable compressed context is used; a
    /// proxy context not yet ACKed makes way for the uncompressed context
    /// (or is used early if there is none, section 3.1); the request's
    /// target uses context 0; otherwise the uncompressed context, if open,
    /// and the proxy registers a new odd context for the peer when there is
    /// room and the client has not closed one for it before. With no
    /// uncompressed context the proxy opens nothing (section 3.1: "If the
    /// uncompressed Context ID is closed, the proxy MUST NOT open new
    /// compressed Context IDs").
    pub fn inbound(&mut self, peer: SocketAddr) -> Inbound {
        let peer = tuple(peer);
        if !self.families.contains(peer) {
            return Inbound::Drop(DropReason::FamilyNotAnnounced);
        }
        let is_target = Some(peer) == self.target;
        if self.filter == Filter::SentTo && !is_target && !self.sent_to.contains_key(&peer) {
            return Inbound::Drop(DropReason::Filtered);
        }
        if let Some(&id) = self.by_target.get(&peer) {
            let pending = matches!(self.contexts[&id].opener, Opener::Proxy { acked: false });
            return match (pending, self.uncompressed) {
                (true, Some(u)) => Inbound::Uncompressed(u),
                _ => Inbound::Compressed(id),
            };
        }
        if is_target {
            return Inbound::Compressed(0);
        }
        let Some(u) = self.uncompressed else {
            return Inbound::Drop(DropReason::NoContext);
        };
        if self.proxy_compression
            && self.contexts.len() < self.limits.max_contexts
            && self.next_proxy_id <= varint::MAX
            && !self.declined.contains(&peer)
        {
            let id = self.next_proxy_id;
            self.next_proxy_id += 2;
            self.contexts.insert(id, Context { target: Some(peer), opener: Opener::Proxy { acked: false } });
            self.by_target.insert(peer, id);
            self.proxy_open.insert(id);
            return Inbound::UncompressedAndAssign(
                u,
                BindCapsule::Assign { context_id: id, target: Some(peer) },
            );
        }
        Inbound::Uncompressed(u)
    }
}

/// The client side of registration, for tests, fuzzing and the bench
/// client: allocates even context IDs and answers the proxy's capsules.
#[derive(Debug, Default)]
pub struct ClientContexts {
    next_id: u64,
    /// Context ID -> tuple (`None`: uncompressed), with "ACKed" for ours.
    contexts: HashMap<u64, (Option<SocketAddr>, bool)>,
    by_target: HashMap<SocketAddr, u64>,
    uncompressed: Option<u64>,
}

impl ClientContexts {
    /// No contexts yet; the first ID allocated is 2.
    pub fn new() -> Self {
        Self { next_id: 2, ..Self::default() }
    }

    fn allocate(&mut self, target: Option<SocketAddr>) -> BindCapsule {
        let context_id = self.next_id;
        self.next_id += 2;
        self.contexts.insert(context_id, (target, false));
        match target {
            None => self.uncompressed = Some(context_id),
            Some(t) => {
                self.by_target.insert(t, context_id);
            }
        }
        BindCapsule::Assign { context_id, target }
    }

    /// Registers the uncompressed context (section 4), or `None` if one is
    /// already open.
    pub fn assign_uncompressed(&mut self) -> Option<BindCapsule> {
        self.uncompressed.is_none().then(|| self.allocate(None))
    }

    /// Registers a compressed context for `target`, or `None` if a context
    /// for it is already open (section 3.1: "Endpoints MUST NOT register a
    /// Context ID for a tuple for which there is already an existing Context
    /// ID").
    pub fn assign(&mut self, target: SocketAddr) -> Option<BindCapsule> {
        let target = tuple(target);
        (!self.by_target.contains_key(&target)).then(|| self.allocate(Some(target)))
    }

    /// Closes one of the open contexts: the capsule to send.
    pub fn close(&mut self, context_id: u64) -> Option<BindCapsule> {
        let (target, _) = self.contexts.remove(&context_id)?;
        match target {
            None => self.uncompressed = None,
            Some(t) => {
                self.by_target.remove(&t);
            }
        }
        Some(BindCapsule::Close { context_id })
    }

    /// The context to send to `peer` on and whether it is compressed:
    /// a compressed context if one is open, else the uncompressed one.
    pub fn context_for(&self, peer: SocketAddr) -> Option<(u64, bool)> {
        match self.by_target.get(&tuple(peer)) {
            Some(id) => Some((*id, true)),
            None => self.uncompressed.map(|u| (u, false)),
        }
    }

    /// Whether `context_id` is open (ours or the proxy's).
    pub fn is_open(&self, context_id: u64) -> bool {
        self.contexts.contains_key(&context_id)
    }

    /// A capsule from the proxy: the capsules to send back. The proxy's
    /// ASSIGNs are accepted unless they collide with one of ours, in which
    /// case the proxy's is closed (section 3.1). Unlike [`ContextTable`],
    /// this helper only detects repeats of IDs that are still open.
    pub fn on_proxy_capsule(&mut self, c: BindCapsule) -> Result<Vec<BindCapsule>, BindError> {
        match c {
            BindCapsule::Assign { context_id, target } => {
                let Some(t) = target.filter(|_| context_id % 2 == 1) else {
                    return Err(BindError::ProxyAssign(context_id));
                };
                if self.contexts.contains_key(&context_id) {
                    return Err(BindError::RepeatedContextId(context_id));
                }
                let t = tuple(t);
                if let Some(&mine) = self.by_target.get(&t) {
                    if mine % 2 == 1 {
                        return Err(BindError::DuplicateTuple { open: mine, new: context_id });
                    }
                    return Ok(vec![BindCapsule::Close { context_id }]);
                }
                self.contexts.insert(context_id, (Some(t), true));
                self.by_target.insert(t, context_id);
                Ok(vec![BindCapsule::Ack { context_id }])
            }
            BindCapsule::Ack { context_id } => {
                if context_id == 0 || context_id % 2 == 1 || context_id >= self.next_id {
                    return Err(BindError::AckNotAssigned(context_id));
                }
                if let Some(entry) = self.contexts.get_mut(&context_id) {
                    entry.1 = true;
                }
                Ok(Vec::new())
            }
            BindCapsule::Close { context_id } => {
                if context_id == 0 {
                    return Err(BindError::ZeroContextId);
                }
                self.close(context_id);
                Ok(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn encoded(c: &BindCapsule) -> Vec<u8> {
        let mut out = Vec::new();
        encode_capsule(c, &mut out);
        out
    }

    /// Splits a whole capsule into type and value.
    fn split(bytes: &[u8]) -> (u64, &[u8]) {
        let (t, tl) = varint::decode(bytes).unwrap();
        let (len, ll) = varint::decode(&bytes[tl..]).unwrap();
        assert_eq!(len as usize, bytes.len() - tl - ll);
        (t, &bytes[tl + ll..])
    }

    #[test]
    fn capsule_wire_format() {
        // Appendix A: register context 2 uncompressed.
        let c = BindCapsule::Assign { context_id: 2, target: None };
        assert_eq!(encoded(&c), [0x11, 0x02, 0x02, 0x00]);
        let c = BindCapsule::Assign { context_id: 4, target: Some(sa("203.0.113.11:60000")) };
        assert_eq!(encoded(&c), [0x11, 0x08, 0x04, 0x04, 203, 0, 113, 11, 0xea, 0x60]);
        let c = BindCapsule::Assign { context_id: 65, target: Some(sa("[2001:db8::1]:443")) };
        let bytes = encoded(&c);
        assert_eq!(&bytes[..5], [0x11, 0x15, 0x40, 0x41, 0x06]);
        assert_eq!(bytes.len(), 2 + 2 + 1 + 16 + 2);
        assert_eq!(encoded(&BindCapsule::Ack { context_id: 2 }), [0x12, 0x01, 0x02]);
        assert_eq!(encoded(&BindCapsule::Close { context_id: 2 }), [0x13, 0x01, 0x02]);
        for c in [
            BindCapsule::Assign { context_id: 2, target: None },
            BindCapsule::Assign { context_id: 4, target: Some(sa("203.0.113.11:60000")) },
            BindCapsule::Assign { context_id: 65, target: Some(sa("[2001:db8::1]:443")) },
            BindCapsule::Ack { context_id: varint::MAX },
            BindCapsule::Close { context_id: 7 },
        ] {
            let bytes = encoded(&c);
            let (t, v) = split(&bytes);
            assert_eq!(decode_capsule(t, v), Ok(Some(c)));
        }
    }

    #[test]
    fn capsule_validation() {
        assert_eq!(decode_capsule(0x01, &[1]), Ok(None));
        assert_eq!(decode_capsule(0x00, &[]), Ok(None));
        let assign = |v: &[u8]| decode_capsule(COMPRESSION_ASSIGN, v);
        assert_eq!(assign(&[]), Err(BindError::Truncated));
        assert_eq!(assign(&[0x40]), Err(BindError::Truncated));
        assert_eq!(assign(&[2]), Err(BindError::Truncated));
        assert_eq!(assign(&[2, 4, 1, 2, 3, 4, 0]), Err(BindError::Truncated));
        assert_eq!(assign(&[2, 6, 0, 0]), Err(BindError::Truncated));
        assert_eq!(assign(&[2, 5]), Err(BindError::BadIpVersion(5)));
        assert_eq!(assign(&[2, 0, 0]), Err(BindError::TrailingBytes(1)));
        assert_eq!(assign(&[2, 4, 1, 2, 3, 4, 0, 1, 9, 9]), Err(BindError::TrailingBytes(2)));
        assert_eq!(assign(&[0, 0]), Err(BindError::ZeroContextId));
        assert_eq!(assign(&[0x40, 0x00, 0]), Err(BindError::ZeroContextId));
        assert_eq!(decode_capsule(COMPRESSION_CLOSE, &[0]), Err(BindError::ZeroContextId));
        assert_eq!(decode_capsule(COMPRESSION_CLOSE, &[]), Err(BindError::Truncated));
        assert_eq!(decode_capsule(COMPRESSION_CLOSE, &[1, 0]), Err(BindError::TrailingBytes(1)));
        assert_eq!(decode_capsule(COMPRESSION_ACK, &[2, 2]), Err(BindError::TrailingBytes(1)));
        // An ACK of 0 decodes; no assignment can match it.
        assert_eq!(decode_capsule(COMPRESSION_ACK, &[0]), Ok(Some(BindCapsule::Ack { context_id: 0 })));
        // Non-minimal varints are allowed by RFC 9000.
        assert_eq!(
            decode_capsule(COMPRESSION_CLOSE, &[0x40, 0x03]),
            Ok(Some(BindCapsule::Close { context_id: 3 }))
        );
    }

    #[test]
    fn capsules_through_the_stream_decoder() {
        let mut stream = Vec::new();
        let sent = [
            BindCapsule::Assign { context_id: 2, target: None },
            BindCapsule::Assign { context_id: 4, target: Some(sa("203.0.113.11:60000")) },
            BindCapsule::Close { context_id: 2 },
        ];
        for c in &sent {
            encode_capsule(c, &mut stream);
        }
        let mut got = Vec::new();
        let mut dec = capsule::CapsuleDecoder::new(64).keep(BIND_CAPSULES);
        for byte in stream.chunks(1) {
            dec.feed(byte, |c| match c {
                capsule::Capsule::Other { capsule_type, value } => {
                    got.push(decode_capsule(capsule_type, &value).unwrap().unwrap())
                }
                other => panic!("unexpected {other:?}"),
            })
            .unwrap();
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn uncompressed_payload() {
        let mut out = Vec::new();
        encode_uncompressed(sa("192.0.2.42:50000"), b"hello", &mut out);
        assert_eq!(out, [4, 192, 0, 2, 42, 0xc3, 0x50, b'h', b'e', b'l', b'l', b'o']);
        assert_eq!(decode_uncompressed(&out), Ok((sa("192.0.2.42:50000"), &b"hello"[..])));
        let mut out = Vec::new();
        encode_uncompressed(sa("[2001:db8::1234]:1"), b"", &mut out);
        assert_eq!(out.len(), 19);
        assert_eq!(decode_uncompressed(&out), Ok((sa("[2001:db8::1234]:1"), &b""[..])));
        assert_eq!(decode_uncompressed(&[]), Err(BindError::Truncated));
        assert_eq!(decode_uncompressed(&[4, 1, 2, 3, 4, 0]), Err(BindError::Truncated));
        assert_eq!(decode_uncompressed(&[6; 18]), Err(BindError::Truncated));
        // Section 4: "MUST be 4 or 6" (0 is only for the capsule).
        assert_eq!(decode_uncompressed(&[0, 1, 2, 3]), Err(BindError::BadIpVersion(0)));
        assert_eq!(decode_uncompressed(&[5; 20]), Err(BindError::BadIpVersion(5)));
        // Scope IDs do not travel.
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 7, 3));
        let mut out = Vec::new();
        encode_uncompressed(scoped, b"x", &mut out);
        assert_eq!(decode_uncompressed(&out).unwrap().0, sa("[fe80::1]:9"));
    }

    #[test]
    fn connect_udp_bind_values() {
        for yes in ["?1", " ?1 ", "?1;a", "?1;a=1;b=?0", "?1; key=\"v\\\"x\"", "?1;a=tok/en:1;b=:AQ==:;c=1.5"]
        {
            assert!(bind_requested(yes), "{yes}");
        }
        for no in [
            "",
            "?0",
            "1",
            "true",
            "?1, ?1",
            "?1,?1",
            "?10",
            "?1;",
            "?1;A=1",
            "?1;a=",
            "?1;a=\"x",
            "?1 ;a",
            "(?1)",
            "?1;a=1.2345",
            "\"?1\"",
        ] {
            assert!(!bind_requested(no), "{no}");
        }
        assert!(bind_requested("?1;a=@1700000000;b=%\"caf%c3%a9\""));
        assert!(!bind_requested("?1;a=@1.5"));
    }

    #[test]
    fn proxy_public_address_round_trip() {
        // Appendix A.
        let addrs = [sa("192.0.2.45:54321"), sa("[2001:db8::1234]:54321")];
        let v = proxy_public_address(&addrs);
        assert_eq!(v, "\"192.0.2.45:54321\", \"[2001:db8::1234]:54321\"");
        assert_eq!(parse_proxy_public_address(&v), Ok(addrs.to_vec()));
        assert_eq!(
            parse_proxy_public_address("\"192.0.2.45:1\";x=1,\t\"[::1]:2\""),
            Ok(vec![sa("192.0.2.45:1"), sa("[::1]:2")])
        );
        for bad in [
            "",
            "192.0.2.45:1",
            "\"192.0.2.45\"",
            "\"192.0.2.45:\"",
            "\"192.0.2.45:0\"",
            "\"192.0.2.45:65536\"",
            "\"01.0.2.45:1\"",
            "\"::1:1\"",
            "\"[::1]\"",
            "\"[::1]1\"",
            "\"[fe80::1%eth0]:1\"",
            "\"[v1.x]:1\"",
            "\"a.example:1\"",
            "\"192.0.2.45:1\",",
            "\"192.0.2.45:1\" \"[::1]:2\"",
            "(\"192.0.2.45:1\")",
        ] {
            assert!(parse_proxy_public_address(bad).is_err(), "{bad}");
        }
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 0, 3));
        assert_eq!(proxy_public_address(&[scoped]), "\"[fe80::1]:9\"");
    }

    const ALLOW: fn(SocketAddr) -> bool = |_| true;

    fn table(max_contexts: usize, filter: Filter) -> ContextTable {
        ContextTable::new(Limits { max_contexts, max_peers: 4 }, filter)
    }

    fn assign(id: u64, target: Option<&str>) -> BindCapsule {
        BindCapsule::Assign { context_id: id, target: target.map(sa) }
    }

    fn ack(id: u64) -> BindCapsule {
        BindCapsule::Ack { context_id: id }
    }

    fn close(id: u64) -> BindCapsule {
        BindCapsule::Close { context_id: id }
    }

    #[test]
    fn appendix_a_flow() {
        let mut t = table(8, Filter::Any).with_proxy_compression(false);
        assert_eq!(t.on_client_capsule(assign(2, None), ALLOW), Ok(vec![ack(2)]));
        let peer = sa("192.0.2.42:50000");
        assert_eq!(t.inbound(peer), Inbound::Uncompressed(2));
        let mut dgram = Vec::new();
        encode_uncompressed(peer, b"hi", &mut dgram);
        assert_eq!(t.outbound(2, &dgram), Ok((peer, &b"hi"[..])));
        let other = sa("203.0.113.11:60000");
        assert_eq!(t.on_client_capsule(assign(4, Some("203.0.113.11:60000")), ALLOW), Ok(vec![ack(4)]));
        assert_eq!(t.outbound(4, b"x"), Ok((other, &b"x"[..])));
        assert_eq!(t.inbound(other), Inbound::Compressed(4));
        assert_eq!(t.on_client_capsule(close(2), ALLOW), Ok(vec![]));
        assert_eq!(t.inbound(other), Inbound::Compressed(4));
        assert_eq!(t.inbound(peer), Inbound::Drop(DropReason::NoContext));
        assert_eq!(t.outbound(2, &dgram), Err(OutboundError::UnknownContext(2)));
        assert_eq!(t.open_contexts(), 1);
    }

    #[test]
    fn client_assign_rules() {
        let mut t = table(8, Filter::Any);
        assert_eq!(t.on_client_capsule(assign(0, None), ALLOW), Err(BindError::ZeroContextId));
        assert_eq!(t.on_client_capsule(assign(3, None), ALLOW), Err(BindError::WrongParity(3)));
        assert_eq!(t.on_client_capsule(assign(2, None), ALLOW), Ok(vec![ack(2)]));
        assert_eq!(t.on_client_capsule(assign(2, None), ALLOW), Err(BindError::RepeatedContextId(2)));
        assert_eq!(
            t.on_client_capsule(assign(4, None), ALLOW),
            Err(BindError::SecondUncompressed { open: 2, new: 4 })
        );
        // Closing and reopening the uncompressed context with a new ID is
        // fine (section 4); the old ID stays burnt (section 3.3).
        assert_eq!(t.on_client_capsule(close(2), ALLOW), Ok(vec![]));
        assert_eq!(t.on_client_capsule(assign(2, None), ALLOW), Err(BindError::RepeatedContextId(2)));
        assert_eq!(t.on_client_capsule(assign(6, None), ALLOW), Ok(vec![ack(6)]));
        assert_eq!(t.on_client_capsule(assign(8, Some("192.0.2.1:1")), ALLOW), Ok(vec![ack(8)]));
        assert_eq!(
            t.on_client_capsule(assign(10, Some("192.0.2.1:1")), ALLOW),
            Err(BindError::DuplicateTuple { open: 8, new: 10 })
        );
        // A refused ID is burnt too.
        let deny: fn(SocketAddr) -> bool = |_| false;
        assert_eq!(t.on_client_capsule(assign(12, Some("192.0.2.2:1")), deny), Ok(vec![close(12)]));
        assert_eq!(
            t.on_client_capsule(assign(12, Some("192.0.2.2:1")), ALLOW),
            Err(BindError::RepeatedContextId(12))
        );
        // The uncompressed context is not subject to the target policy.
        assert_eq!(t.on_client_capsule(close(6), ALLOW), Ok(vec![]));
        assert_eq!(t.on_client_capsule(assign(14, None), deny), Ok(vec![ack(14)]));
        // Errors leave the table as it was.
        assert_eq!(t.open_contexts(), 2);
    }

    #[test]
    fn ack_and_close_rules() {
        let mut t = table(8, Filter::Any);
        for id in [0, 1, 2, 3] {
            assert_eq!(t.on_client_capsule(ack(id), ALLOW), Err(BindError::AckNotAssigned(id)), "{id}");
        }
        assert_eq!(t.on_client_capsule(close(0), ALLOW), Err(BindError::ZeroContextId));
        for id in [1, 2, 99] {
            assert_eq!(t.on_client_capsule(close(id), ALLOW), Ok(vec![]), "unknown {id}");
        }
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        let Inbound::UncompressedAndAssign(2, a) = t.inbound(sa("192.0.2.9:9")) else { panic!() };
        assert_eq!(a, assign(1, Some("192.0.2.9:9")));
        assert_eq!(t.on_client_capsule(ack(1), ALLOW), Ok(vec![]));
        // A repeated ACK is harmless; an ACK for an ID never sent is not.
        assert_eq!(t.on_client_capsule(ack(1), ALLOW), Ok(vec![]));
        assert_eq!(t.on_client_capsule(ack(3), ALLOW), Err(BindError::AckNotAssigned(3)));
        // Closing twice: the second is ignored.
        assert_eq!(t.on_client_capsule(close(1), ALLOW), Ok(vec![]));
        assert_eq!(t.on_client_capsule(close(1), ALLOW), Ok(vec![]));
        // An ACK for a context closed since is ignored.
        assert_eq!(t.on_client_capsule(ack(1), ALLOW), Ok(vec![]));
        assert_eq!(t.open_contexts(), 1);
    }

    #[test]
    fn proxy_contexts() {
        let mut t = table(3, Filter::Any);
        let p1 = sa("192.0.2.1:1000");
        // Nothing open: nothing to deliver, nothing to open (section 3.1).
        assert_eq!(t.inbound(p1), Inbound::Drop(DropReason::NoContext));
        assert_eq!(t.open_contexts(), 0);
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        assert_eq!(t.inbound(p1), Inbound::UncompressedAndAssign(2, assign(1, Some("192.0.2.1:1000"))));
        // Until the ACK, the uncompressed context carries the peer's packets.
        assert_eq!(t.inbound(p1), Inbound::Uncompressed(2));
        assert_eq!(t.context_for(p1), Some((1, false)));
        // The client may use the proxy's context before its ACK arrives.
        assert_eq!(t.outbound(1, b"early"), Ok((p1, &b"early"[..])));
        t.on_client_capsule(ack(1), ALLOW).unwrap();
        assert_eq!(t.inbound(p1), Inbound::Compressed(1));
        let p2 = sa("[2001:db8::2]:2000");
        assert_eq!(t.inbound(p2), Inbound::UncompressedAndAssign(2, assign(3, Some("[2001:db8::2]:2000"))));
        // Full (3 contexts): later peers stay uncompressed.
        let p3 = sa("192.0.2.3:3000");
        assert_eq!(t.inbound(p3), Inbound::Uncompressed(2));
        assert_eq!(t.open_contexts(), 3);
        // A client registration evicts the oldest proxy context.
        assert_eq!(t.on_client_capsule(assign(4, Some("192.0.2.3:3000")), ALLOW), Ok(vec![close(1), ack(4)]));
        assert_eq!(t.inbound(p1), Inbound::Uncompressed(2));
        assert_eq!(t.inbound(p3), Inbound::Compressed(4));
        // Closing the uncompressed context stops new proxy contexts, but
        // the pending one is used early rather than dropping.
        assert_eq!(t.on_client_capsule(close(2), ALLOW), Ok(vec![]));
        assert_eq!(t.inbound(p2), Inbound::Compressed(3));
        assert_eq!(t.inbound(p1), Inbound::Drop(DropReason::NoContext));
        assert_eq!(t.open_contexts(), 2);
    }

    #[test]
    fn same_tuple_from_both_sides() {
        let mut t = table(8, Filter::Any);
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        let p = sa("192.0.2.1:1000");
        assert!(matches!(t.inbound(p), Inbound::UncompressedAndAssign(2, _)));
        // Section 3.1: the proxy's context gives way.
        assert_eq!(t.on_client_capsule(assign(4, Some("192.0.2.1:1000")), ALLOW), Ok(vec![close(1), ack(4)]));
        assert_eq!(t.inbound(p), Inbound::Compressed(4));
        // The client's own CLOSE of 1 (it saw the conflict too) is ignored,
        // as is its late ACK.
        assert_eq!(t.on_client_capsule(close(1), ALLOW), Ok(vec![]));
        assert_eq!(t.on_client_capsule(ack(1), ALLOW), Ok(vec![]));
        assert_eq!(t.inbound(p), Inbound::Compressed(4));
        assert_eq!(t.outbound(1, b""), Err(OutboundError::UnknownContext(1)));
    }

    #[test]
    fn client_declines_are_remembered() {
        let mut t = table(8, Filter::Any);
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        let p = sa("192.0.2.1:1000");
        assert!(matches!(t.inbound(p), Inbound::UncompressedAndAssign(2, _)));
        // The client refuses the proxy's registration.
        t.on_client_capsule(close(1), ALLOW).unwrap();
        assert_eq!(t.inbound(p), Inbound::Uncompressed(2));
        assert_eq!(t.open_contexts(), 1);
    }

    #[test]
    fn limits_refuse_client_registrations() {
        let mut t = table(2, Filter::Any);
        assert_eq!(t.on_client_capsule(assign(2, None), ALLOW), Ok(vec![ack(2)]));
        assert_eq!(t.on_client_capsule(assign(4, Some("192.0.2.1:1")), ALLOW), Ok(vec![ack(4)]));
        assert_eq!(t.on_client_capsule(assign(6, Some("192.0.2.2:1")), ALLOW), Ok(vec![close(6)]));
        assert_eq!(t.inbound(sa("192.0.2.3:1")), Inbound::Uncompressed(2));
        assert_eq!(t.open_contexts(), 2);
        let mut zero = table(0, Filter::Any);
        assert_eq!(zero.on_client_capsule(assign(2, None), ALLOW), Ok(vec![close(2)]));
    }

    #[test]
    fn sparse_ids_are_bounded() {
        let mut t = table(1, Filter::Any);
        // cap = max(2 * 1, 16) ranges.
        for i in 0..16u64 {
            let id = 2 + i * 4;
            assert_eq!(t.on_client_capsule(assign(id, Some("192.0.2.1:1")), |_| false), Ok(vec![close(id)]));
        }
        assert_eq!(t.client_ids.ranges.len(), 16);
        // A new isolated ID is refused without being recorded...
        assert_eq!(t.on_client_capsule(assign(1000, None), ALLOW), Ok(vec![close(1000)]));
        assert_eq!(t.client_ids.ranges.len(), 16);
        // ...but filling a gap merges ranges and is accepted.
        assert_eq!(t.on_client_capsule(assign(4, None), ALLOW), Ok(vec![ack(4)]));
        assert_eq!(t.client_ids.ranges.len(), 15);
        assert_eq!(t.on_client_capsule(assign(2, None), ALLOW), Err(BindError::RepeatedContextId(2)));
    }

    #[test]
    fn id_set_merges() {
        let mut s = IdSet { ranges: BTreeMap::new(), cap: 4 };
        for k in [1, 3, 2, 5, 6, 4] {
            assert!(!s.contains(k));
            assert_eq!(s.insert(k), Insert::New);
            assert!(s.contains(k));
        }
        assert_eq!(s.ranges.iter().collect::<Vec<_>>(), [(&1, &6)]);
        assert!(!s.contains(0) && !s.contains(7));
    }

    #[test]
    fn filtering() {
        let mut t = table(8, Filter::SentTo);
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        let p = sa("192.0.2.1:1000");
        assert_eq!(t.inbound(p), Inbound::Drop(DropReason::Filtered));
        let mut d = Vec::new();
        encode_uncompressed(p, b"stun", &mut d);
        t.outbound(2, &d).unwrap();
        assert!(matches!(t.inbound(p), Inbound::UncompressedAndAssign(2, _)));
        // Only the address and port matter, not the IPv6 scope.
        let v6 = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 5, 0, 2));
        let mut d = Vec::new();
        encode_uncompressed(v6, b"", &mut d);
        t.outbound(2, &d).unwrap();
        assert!(matches!(t.inbound(v6), Inbound::UncompressedAndAssign(2, _)));
        // max_peers = 4: the least recently used is forgotten.
        for port in 1..=3 {
            let mut d = Vec::new();
            encode_uncompressed(SocketAddr::new(p.ip(), port), b"", &mut d);
            t.outbound(2, &d).unwrap();
        }
        assert_eq!(t.remembered_peers(), 4);
        assert!(matches!(t.inbound(sa("192.0.2.1:1")), Inbound::UncompressedAndAssign(2, _)));
        // The scoped peer's proxy context 3 is still pending.
        assert_eq!(t.inbound(sa("[fe80::1]:5")), Inbound::Uncompressed(2));
        // p was the least recently used: forgotten, so filtered again even
        // though a proxy context exists for it.
        assert_eq!(t.inbound(p), Inbound::Drop(DropReason::Filtered));
    }

    #[test]
    fn unannounced_families_are_refused_and_dropped() {
        let v6_only = Families::of(&[sa("[2001:db8::1]:4000")]);
        assert!(!v6_only.v4 && v6_only.v6);
        let mut t = ContextTable::new(Limits::default(), Filter::Any).with_families(v6_only);
        // The uncompressed context itself is accepted (it has no target).
        assert_eq!(t.on_client_capsule(assign(2, None), |_| true).unwrap(), vec![ack(2)]);
        // A compressed registration for IPv4 (or its mapped form) is refused.
        let refused = t.on_client_capsule(assign(4, Some("192.0.2.1:53")), |_| true).unwrap();
        assert_eq!(refused, vec![BindCapsule::Close { context_id: 4 }]);
        let refused = t.on_client_capsule(assign(6, Some("[::ffff:192.0.2.1]:53")), |_| true).unwrap();
        assert_eq!(refused, vec![BindCapsule::Close { context_id: 6 }]);
        assert_eq!(t.on_client_capsule(assign(8, Some("[2001:db8::7]:53")), |_| true).unwrap(), vec![ack(8)]);
        // Uncompressed datagrams towards IPv4 are dropped; IPv6 go.
        let mut v4 = Vec::new();
        encode_uncompressed(sa("192.0.2.1:53"), b"x", &mut v4);
        assert!(matches!(t.outbound(2, &v4), Err(OutboundError::FamilyNotAnnounced(_))));
        let mut v6 = Vec::new();
        encode_uncompressed(sa("[2001:db8::7]:9"), b"y", &mut v6);
        assert_eq!(t.outbound(2, &v6).unwrap(), (sa("[2001:db8::7]:9"), &b"y"[..]));
        assert_eq!(t.inbound(sa("192.0.2.1:53")), Inbound::Drop(DropReason::FamilyNotAnnounced));
    }

    #[test]
    fn a_mapped_address_is_the_ipv4_peer_it_maps() {
        let mut t = ContextTable::new(Limits::default(), Filter::SentTo);
        t.on_client_capsule(assign(2, None), |_| true).unwrap();
        let mut mapped = Vec::new();
        encode_uncompressed(sa("[::ffff:192.0.2.1]:53"), b"x", &mut mapped);
        assert_eq!(t.outbound(2, &mapped).unwrap().0, sa("192.0.2.1:53"));
        // The filter opened for the IPv4 form the socket reports.
        assert!(!matches!(t.inbound(sa("192.0.2.1:53")), Inbound::Drop(_)));
        // A registration in either form is one tuple: the second is malformed.
        t.on_client_capsule(assign(4, Some("192.0.2.9:1")), |_| true).unwrap();
        assert!(matches!(
            t.on_client_capsule(assign(6, Some("[::ffff:192.0.2.9]:1")), |_| true),
            Err(BindError::DuplicateTuple { open: 4, new: 6 })
        ));
    }

    #[test]
    fn context_zero() {
        let mut t = table(8, Filter::SentTo);
        assert_eq!(t.outbound(0, b"x"), Err(OutboundError::ContextZero));
        let target = sa("192.0.2.7:443");
        let mut t = table(8, Filter::SentTo).with_target(target);
        assert_eq!(t.outbound(0, b"x"), Ok((target, &b"x"[..])));
        // The target passes the filter and uses context 0...
        assert_eq!(t.inbound(target), Inbound::Compressed(0));
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        // ...and the proxy never opens a context for it.
        assert_eq!(t.inbound(target), Inbound::Compressed(0));
        // A client registration for it takes over.
        t.on_client_capsule(assign(4, Some("192.0.2.7:443")), ALLOW).unwrap();
        assert_eq!(t.inbound(target), Inbound::Compressed(4));
    }

    #[test]
    fn outbound_errors() {
        let mut t = table(8, Filter::Any);
        assert_eq!(t.outbound(2, b""), Err(OutboundError::UnknownContext(2)));
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        assert_eq!(t.outbound(2, &[4, 1]), Err(OutboundError::Malformed(BindError::Truncated)));
        assert_eq!(t.outbound(2, &[0; 8]), Err(OutboundError::Malformed(BindError::BadIpVersion(0))));
    }

    #[test]
    fn closing_from_the_proxy() {
        let mut t = table(8, Filter::Any);
        t.on_client_capsule(assign(2, None), ALLOW).unwrap();
        t.on_client_capsule(assign(4, Some("192.0.2.1:1")), ALLOW).unwrap();
        assert_eq!(t.close(4), Some(close(4)));
        assert_eq!(t.close(4), None);
        assert_eq!(t.close(2), Some(close(2)));
        assert_eq!(t.uncompressed_context(), None);
        assert_eq!(t.inbound(sa("192.0.2.1:1")), Inbound::Drop(DropReason::NoContext));
    }

    #[test]
    fn client_and_proxy_together() {
        let mut proxy = table(4, Filter::SentTo);
        let mut client = ClientContexts::new();
        let u = client.assign_uncompressed().unwrap();
        assert_eq!(client.assign_uncompressed(), None);
        for reply in proxy.on_client_capsule(u, ALLOW).unwrap() {
            assert_eq!(client.on_proxy_capsule(reply), Ok(vec![]));
        }
        let peer = sa("198.51.100.1:3478");
        let (ctx, compressed) = client.context_for(peer).unwrap();
        assert!(!compressed);
        let mut d = Vec::new();
        encode_uncompressed(peer, b"binding request", &mut d);
        assert_eq!(proxy.outbound(ctx, &d), Ok((peer, &b"binding request"[..])));
        let Inbound::UncompressedAndAssign(u_id, a) = proxy.inbound(peer) else { panic!() };
        assert_eq!(u_id, ctx);
        let replies = client.on_proxy_capsule(a).unwrap();
        assert_eq!(replies, vec![ack(1)]);
        for r in replies {
            assert_eq!(proxy.on_client_capsule(r, ALLOW), Ok(vec![]));
        }
        assert_eq!(proxy.inbound(peer), Inbound::Compressed(1));
        assert_eq!(client.context_for(peer), Some((1, true)));
        // The client may not get a version-0 or even-ID ASSIGN from the proxy.
        assert_eq!(client.on_proxy_capsule(assign(3, None)), Err(BindError::ProxyAssign(3)));
        assert_eq!(client.on_proxy_capsule(assign(4, Some("192.0.2.1:1"))), Err(BindError::ProxyAssign(4)));
        // A simultaneous registration of one tuple: the client closes the
        // proxy's; the proxy closes its own when the client's arrives.
        let other = sa("198.51.100.2:1");
        let mine = client.assign(other).unwrap();
        assert_eq!(client.on_proxy_capsule(assign(5, Some("198.51.100.2:1"))), Ok(vec![close(5)]));
        assert_eq!(client.assign(other), None);
        let mut d = Vec::new();
        encode_uncompressed(other, b"", &mut d);
        proxy.outbound(ctx, &d).unwrap();
        assert!(matches!(proxy.inbound(other), Inbound::UncompressedAndAssign(_, _)));
        let replies = proxy.on_client_capsule(mine, ALLOW).unwrap();
        assert_eq!(replies, vec![close(3), ack(4)]);
        for r in replies {
            assert_eq!(client.on_proxy_capsule(r), Ok(vec![]));
        }
        assert_eq!(proxy.inbound(other), Inbound::Compressed(4));
        assert_eq!(client.context_for(other), Some((4, true)));
    }
}

//! Fixed-size, versioned records exchanged over the shared-memory rings.
//!
//! Layout (little endian): `version u8, kind u8, payload_len u16, reserved
//! u32`, then `payload_len` bytes of payload. Decoders check every length
//! and value; nothing read from the ring is trusted.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::RECORD_SIZE;
use crate::proxy_status::ProxyError;

/// Record format version this build speaks.
pub const VERSION: u8 = 2;
const HEADER_LEN: usize = 8;
/// Largest payload a record can carry.
pub const MAX_PAYLOAD: usize = RECORD_SIZE - HEADER_LEN;

/// Longest `:authority` carried in an ask.
pub const MAX_AUTHORITY: usize = 255;
/// Longest target host carried in an ask.
pub const MAX_TARGET_HOST: usize = 255;
/// Longest `:path` carried in an ask (longer requests get 414).
pub const MAX_PATH: usize = 1536;
/// Longest credentials carried in an ask (longer requests get 431).
pub const MAX_AUTHORIZATION: usize = 1920;
/// Longest deny details carried in an answer.
pub const MAX_DETAILS: usize = 512;
/// Longest input a signing ask carries (a TLS 1.3 CertificateVerify input
/// is 64 + 34 + 1 + at most 64 bytes; ample room for other uses).
pub const MAX_SIGN_INPUT: usize = 2048;
/// Longest signature carried in an answer (RSA-8192 is 1024 bytes).
pub const MAX_SIGNATURE: usize = 1024;
/// Longest identity (quota key, e.g. `sub:alice`) carried with a flow.
pub const MAX_IDENTITY: usize = 128;

const KIND_AUTH_ASK: u8 = 1;
const KIND_AUTH_ANSWER: u8 = 2;
const KIND_FLOW_CLOSED: u8 = 3;
const KIND_FLOW_OPEN: u8 = 4;
const KIND_DRAIN: u8 = 5;
const KIND_KILL_FLOW: u8 = 6;
const KIND_SIGN_ASK: u8 = 7;
const KIND_SIGN_ANSWER: u8 = 8;
const KIND_LIST_CONNS: u8 = 9;
const KIND_CONN_INFO: u8 = 10;
const KIND_CONN_LIST_END: u8 = 11;
const KIND_ADDRESS_ASK: u8 = 12;
const KIND_ADDRESS_ANSWER: u8 = 13;

/// `AuthAsk::protocol`: connect-udp (RFC 9298).
pub const PROTOCOL_CONNECT_UDP: u8 = 0;
/// `AuthAsk::protocol`: connect-ip (RFC 9484). `target_host` is the scope
/// target (`*`, an address or prefix, or a name) and `target_port` the IP
/// protocol (0..=255, or [`IPPROTO_ANY`]).
pub const PROTOCOL_CONNECT_IP: u8 = 1;
/// `AuthAsk::protocol`: bound connect-udp (draft-ietf-masque-connect-udp-
/// listen). `target_host`/`target_port` are the fallback target, or `*`/0.
pub const PROTOCOL_CONNECT_UDP_BIND: u8 = 2;
/// `AuthAsk::protocol`: classic CONNECT to a TCP target (RFC 9110 section
/// 9.3.6, RFC 9114 section 4.4). `target_host`/`target_port` are the
/// target as for connect-udp, and the answer is [`Verdict::Allow`] with the
/// resolved, policy-checked address.
pub const PROTOCOL_CONNECT_TCP: u8 = 3;
/// The largest `AuthAsk::protocol` value a record may carry.
const PROTOCOL_MAX: u8 = PROTOCOL_CONNECT_TCP;
/// `AuthAsk::target_port` of a connect-ip ask whose scope allows every IP
/// protocol.
pub const IPPROTO_ANY: u16 = 256;
/// Most addresses a connect-ip allow assigns.
pub const MAX_IP_ASSIGNMENTS: usize = 4;
/// Addresses of one family a connect-ip flow holds at most: the one
/// assigned with it and one more its client asked for by address (so one
/// tunnel cannot drain a pool). Two families of two fit in a FlowOpen's
/// [`MAX_IP_ASSIGNMENTS`].
pub const MAX_ADDRESSES_PER_FAMILY: usize = 2;
/// Most routes a connect-ip allow advertises.
pub const MAX_IP_ROUTES: usize = 64;

/// Most connections one worker lists per request.
pub const MAX_CONNS_LISTED: u32 = 10_000;

/// A worker asks control whether to open a tunnel (connect-udp, connect-ip,
/// bound connect-udp or a TCP CONNECT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAsk {
    /// Worker-chosen ID echoed in the answer.
    pub ask_id: u64,
    /// The client's UDP address as the relay sees it.
    pub client: SocketAddr,
    /// `:authority`.
    pub authority: String,
    /// `:path`.
    pub path: String,
    /// Target host as in the request (IP literal or name).
    pub target_host: String,
    /// Target port.
    pub target_port: u16,
    /// `proxy-authorization` (or `authorization`) value, if any.
    pub authorization: Option<String>,
    /// [`PROTOCOL_CONNECT_UDP`], [`PROTOCOL_CONNECT_IP`],
    /// [`PROTOCOL_CONNECT_UDP_BIND`] or [`PROTOCOL_CONNECT_TCP`].
    pub protocol: u8,
}

/// An address (or prefix) assigned to a connect-ip client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpAssignment {
    /// The address (host bits beyond `len` zero).
    pub addr: IpAddr,
    /// Prefix length (32 / 128 for one address).
    pub len: u8,
}

/// A range a connect-ip client may send to (ROUTE_ADVERTISEMENT, RFC 9484
/// section 4.7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRoute {
    /// First address.
    pub start: IpAddr,
    /// Last address (same family, not below `start`).
    pub end: IpAddr,
    /// IP protocol (0: any).
    pub protocol: u8,
}

/// Control's verdict on an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Open the tunnel.
    Allow {
        /// Control's ID for the flow (reported back in [`FlowClosed`]).
        flow_id: u64,
        /// The resolved, policy-checked target address.
        target: SocketAddr,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Payload bytes (both directions) the flow may carry before the
        /// dataplane ends it; 0 means no limit (a byte quota's remainder).
        byte_budget: u64,
        /// Who opened it, as control's quotas know them (`sub:alice`,
        /// `tok:<fingerprint>`; empty when not known). The dataplane keeps
        /// it only to report the flow to a restarted control.
        identity: String,
    },
    /// Open a connect-ip tunnel (RFC 9484).
    AllowIp {
        /// Control's ID for the flow.
        flow_id: u64,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Bytes the flow may carry (0: no limit).
        byte_budget: u64,
        /// Who opened it (quota key; empty when not known).
        identity: String,
        /// The addresses assigned to the client (from control's pools).
        addresses: Vec<IpAssignment>,
        /// Where the client may send: the scope it asked for, less what
        /// the target policy denies. Sorted as RFC 9484 section 4.7.3 wants.
        routes: Vec<IpRoute>,
    },
    /// Open a bound connect-udp tunnel: one unconnected socket that may
    /// send to, and receive from, the peers in `peers`.
    AllowBind {
        /// Control's ID for the flow.
        flow_id: u64,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Bytes the flow may carry (0: no limit).
        byte_budget: u64,
        /// Who opened it (quota key; empty when not known).
        identity: String,
        /// The addresses peers may have (everything less what the target
        /// policy denies); the dataplane checks each datagram's peer.
        peers: Vec<IpRoute>,
    },
    /// Refuse with an HTTP status and a Proxy-Status error.
    Deny {
        /// HTTP status code (400..=599).
        status: u16,
        /// Proxy-Status error type.
        proxy_error: Option<ProxyError>,
        /// Details for the Proxy-Status field.
        details: String,
        /// Seconds the client should wait before retrying (`Retry-After`,
        /// on 429 when a rate or byte quota refused); 0: not sent.
        retry_after_secs: u32,
    },
}

/// Control answers an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAnswer {
    /// The ask this answers.
    pub ask_id: u64,
    /// The verdict.
    pub verdict: Verdict,
}

/// A worker reports that a flow control allowed has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowClosed {
    /// Control's flow ID from the allow.
    pub flow_id: u64,
    /// Datagrams forwarded client -> target.
    pub packets_up: u64,
    /// Bytes forwarded client -> target (UDP payload).
    pub bytes_up: u64,
    /// Datagrams forwarded target -> client.
    pub packets_down: u64,
    /// Bytes forwarded target -> client.
    pub bytes_down: u64,
}

impl FlowClosed {
    /// The report for a flow that was allowed but never carried traffic
    /// (its request went away before the answer, or its socket failed).
    pub fn unused(flow_id: u64) -> Self {
        Self { flow_id, packets_up: 0, bytes_up: 0, packets_down: 0, bytes_down: 0 }
    }
}

/// A worker tells a (re-)attached control about a flow that is open, so a
/// restarted control learns the live flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowOpen {
    /// The flow ID the allowing control gave it.
    pub flow_id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The target address.
    pub target: SocketAddr,
    /// The identity from the allow (empty when not known).
    pub identity: String,
    /// A connect-ip flow's assigned addresses (a restarted control leases
    /// them again); empty for connect-udp.
    pub addresses: Vec<IpAssignment>,
}

/// A worker asks control to sign a TLS handshake (keyless TLS: the
/// private key never leaves control).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignAsk {
    /// Worker-chosen ID echoed in the answer.
    pub sign_id: u64,
    /// The TLS material generation the handshake started with: control
    /// signs with that generation's key (the current or the previous one).
    pub generation: u32,
    /// TLS SignatureScheme code point (RFC 8446 section 4.2.3), e.g.
    /// 0x0403 ecdsa_secp256r1_sha256, 0x0804 rsa_pss_rsae_sha256.
    pub algorithm: u16,
    /// The message to sign (not a digest).
    pub input: Vec<u8>,
}

/// The outcome of a signing ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignResult {
    /// The signature.
    Signature(Vec<u8>),
    /// Control could not sign (unsupported algorithm, no key).
    Failed(String),
}

/// Control answers a signing ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignAnswer {
    /// The ask this answers.
    pub sign_id: u64,
    /// The result.
    pub result: SignResult,
}

/// [`ConnInfo::transport`]: QUIC (HTTP/3).
pub const TRANSPORT_H3: u8 = 0;
/// [`ConnInfo::transport`]: HTTP/2 over TLS over TCP.
pub const TRANSPORT_H2: u8 = 1;
/// [`ConnInfo::transport`]: HTTP/1.1 over TLS over TCP.
pub const TRANSPORT_HTTP1: u8 = 2;
/// [`ConnInfo::transport`]: HTTP/2 over cleartext TCP (prior knowledge or
/// h2c Upgrade).
pub const TRANSPORT_H2C: u8 = 3;
/// [`ConnInfo::transport`]: HTTP/1.1 over cleartext TCP.
pub const TRANSPORT_HTTP1_CLEAR: u8 = 4;
/// [`ConnInfo::transport`]: TCP, version not chosen yet (TLS handshake, or
/// the cleartext listener still reading the first bytes).
pub const TRANSPORT_TCP_PENDING: u8 = 5;

/// One connection (QUIC, or the TCP front's), as a worker lists it for
/// `relayctl conns`. For TCP connections the packet and RTT figures are
/// the kernel's (`TCP_INFO`: segments, retransmissions, smoothed RTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The listing this answers.
    pub request_id: u64,
    /// `TRANSPORT_*`.
    pub transport: u8,
    /// The worker's serial number for the connection.
    pub conn_id: u64,
    /// The client's current address.
    pub client: SocketAddr,
    /// Milliseconds since the connection was accepted.
    pub age_ms: u64,
    /// The handshake completed.
    pub established: bool,
    /// The handshake resumed a session (no signature).
    pub resumed: bool,
    /// The TLS material generation it was accepted with.
    pub tls_generation: u32,
    /// Open tunnels (and requests waiting for control).
    pub tunnels: u32,
    /// Smoothed RTT in microseconds.
    pub rtt_us: u64,
    /// QUIC packets sent.
    pub packets_sent: u64,
    /// QUIC packets received.
    pub packets_recv: u64,
    /// QUIC packets declared lost.
    pub packets_lost: u64,
    /// Bytes sent (UDP payload).
    pub bytes_sent: u64,
    /// Bytes received (UDP payload).
    pub bytes_recv: u64,
    /// The largest tunnel payload (UDP payload or IP packet) an HTTP
    /// datagram can carry on the connection's path now: the usable inner
    /// MTU of its tunnels (0: datagrams unavailable).
    pub max_tunnel_payload: u32,
}

/// A worker asks control to lease a specific address to an open connect-ip
/// flow (the client's ADDRESS_REQUEST for it, RFC 9484 section 4.7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressAsk {
    /// The flow (from its [`Verdict::AllowIp`]).
    pub flow_id: u64,
    /// The client's request ID, echoed in the answer.
    pub request_id: u64,
    /// The address asked for.
    pub addr: IpAddr,
}

/// Control's answer to an [`AddressAsk`]: leased to the flow, or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressAnswer {
    /// The flow.
    pub flow_id: u64,
    /// The client's request ID.
    pub request_id: u64,
    /// The address asked for.
    pub addr: IpAddr,
    /// Whether it is now leased to the flow.
    pub granted: bool,
}

/// Any record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Worker -> control.
    AuthAsk(AuthAsk),
    /// Control -> worker.
    AuthAnswer(AuthAnswer),
    /// Worker -> control.
    FlowClosed(FlowClosed),
    /// Worker -> control, after attaching to a new control.
    FlowOpen(FlowOpen),
    /// Control -> worker: drain gracefully (as on SIGTERM).
    Drain,
    /// Control -> worker: end this flow's tunnel now (operator request).
    KillFlow {
        /// The flow to end.
        flow_id: u64,
    },
    /// Worker -> control: sign a handshake.
    SignAsk(SignAsk),
    /// Control -> worker: the signature.
    SignAnswer(SignAnswer),
    /// Control -> worker: list your connections (at most `limit`).
    ListConns {
        /// Echoed in the answers.
        request_id: u64,
        /// Most connections to list (1..=[`MAX_CONNS_LISTED`]).
        limit: u32,
    },
    /// Worker -> control: one listed connection.
    ConnInfo(ConnInfo),
    /// Worker -> control: the listing is complete.
    ConnListEnd {
        /// The listing.
        request_id: u64,
        /// Connections the worker has (listed or not).
        total: u32,
    },
    /// Worker -> control: lease this address to a connect-ip flow.
    AddressAsk(AddressAsk),
    /// Control -> worker: the lease's outcome.
    AddressAnswer(AddressAnswer),
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record's version is not [`VERSION`].
    #[error("unsupported record version {0}")]
    Version(u8),
    /// The record kind is unknown.
    #[error("unknown record kind {0}")]
    Kind(u8),
    /// The payload length exceeds the slot.
    #[error("payload length {0} exceeds the record size")]
    PayloadLength(usize),
    /// The payload ends before a field does.
    #[error("record truncated")]
    Truncated,
    /// The payload has bytes after the last field.
    #[error("trailing bytes in record")]
    Trailing,
    /// A string field is too long for its limit.
    #[error("field {0} too long")]
    FieldTooLong(&'static str),
    /// A string field is not UTF-8.
    #[error("field {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A field holds a value outside its range.
    #[error("field {0} has an invalid value")]
    BadValue(&'static str),
}

fn ip_value(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// A prefix length within the family, host bits zero.
fn valid_prefix(addr: IpAddr, len: u8) -> bool {
    let (value, bits) = ip_value(addr);
    if len > bits {
        return false;
    }
    let host_bits = u32::from(bits - len);
    host_bits >= 128 || value & ((1u128 << host_bits) - 1) == 0
}

/// A range of one family, start not after end.
fn valid_route(r: &IpRoute) -> bool {
    r.start.is_ipv4() == r.end.is_ipv4() && ip_value(r.start).0 <= ip_value(r.end).0
}

/// Identities are printable ASCII without spaces (quota keys).
fn valid_identity(id: &str) -> bool {
    id.bytes().all(|b| b.is_ascii_graphic())
}

struct Writer<'a> {
    buf: &'a mut [u8; RECORD_SIZE],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) -> Result<(), RecordError> {
        let end = self.pos + b.len();
        if end > RECORD_SIZE {
            return Err(RecordError::PayloadLength(end - HEADER_LEN));
        }
        self.buf[self.pos..end].copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), RecordError> {
        self.bytes(&[v])
    }
    fn u16(&mut self, v: u16) -> Result<(), RecordError> {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> Result<(), RecordError> {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), RecordError> {
        self.bytes(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str, limit: usize, name: &'static str) -> Result<(), RecordError> {
        if s.len() > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        self.u16(s.len() as u16)?;
        self.bytes(s.as_bytes())
    }
    fn blob(&mut self, b: &[u8], limit: usize, name: &'static str) -> Result<(), RecordError> {
        if b.len() > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        self.u16(b.len() as u16)?;
        self.bytes(b)
    }
    fn ip(&mut self, ip: IpAddr) -> Result<(), RecordError> {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4)?;
                self.bytes(&v4.octets())
            }
            IpAddr::V6(v6) => {
                self.u8(6)?;
                self.bytes(&v6.octets())
            }
        }
    }
    fn prefix(&mut self, addr: IpAddr, len: u8) -> Result<(), RecordError> {
        if !valid_prefix(addr, len) {
            return Err(RecordError::BadValue("prefix"));
        }
        self.ip(addr)?;
        self.u8(len)
    }
    fn route(&mut self, r: &IpRoute) -> Result<(), RecordError> {
        if !valid_route(r) {
            return Err(RecordError::BadValue("route"));
        }
        self.ip(r.start)?;
        self.ip(r.end)?;
        self.u8(r.protocol)
    }
    fn identity(&mut self, id: &str) -> Result<(), RecordError> {
        if !valid_identity(id) {
            return Err(RecordError::BadValue("identity"));
        }
        self.str(id, MAX_IDENTITY, "identity")
    }
    fn addr(&mut self, a: SocketAddr) -> Result<(), RecordError> {
        let (family, ip) = match a.ip() {
            IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => (6u8, v6.octets()),
        };
        self.u8(family)?;
        self.bytes(&ip)?;
        self.u16(a.port())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self, limit: usize, name: &'static str) -> Result<String, RecordError> {
        let len = usize::from(self.u16()?);
        if len > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::NotUtf8(name))
    }
    fn blob(&mut self, limit: usize, name: &'static str) -> Result<Vec<u8>, RecordError> {
        let len = usize::from(self.u16()?);
        if len > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        Ok(self.take(len)?.to_vec())
    }
    fn addr(&mut self, name: &'static str) -> Result<SocketAddr, RecordError> {
        let family = self.u8()?;
        let ip: [u8; 16] = self.take(16)?.try_into().expect("16 bytes");
        let port = self.u16()?;
        let v6 = Ipv6Addr::from(ip);
        let ip = match family {
            4 => IpAddr::V4(v6.to_ipv4_mapped().ok_or(RecordError::BadValue(name))?),
            6 => IpAddr::V6(v6),
            _ => return Err(RecordError::BadValue(name)),
        };
        Ok(SocketAddr::new(ip, port))
    }
    fn ip(&mut self) -> Result<IpAddr, RecordError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(<[u8; 4]>::try_from(self.take(4)?).expect("4 bytes").into())),
            6 => Ok(IpAddr::V6(<[u8; 16]>::try_from(self.take(16)?).expect("16 bytes").into())),
            _ => Err(RecordError::BadValue("ip_version")),
        }
    }
    fn prefix(&mut self) -> Result<IpAssignment, RecordError> {
        let addr = self.ip()?;
        let len = self.u8()?;
        if valid_prefix(addr, len) {
            Ok(IpAssignment { addr, len })
        } else {
            Err(RecordError::BadValue("prefix"))
        }
    }
    fn route(&mut self) -> Result<IpRoute, RecordError> {
        let r = IpRoute { start: self.ip()?, end: self.ip()?, protocol: self.u8()? };
        if valid_route(&r) { Ok(r) } else { Err(RecordError::BadValue("route")) }
    }
    fn identity(&mut self) -> Result<String, RecordError> {
        let id = self.str(MAX_IDENTITY, "identity")?;
        if valid_identity(&id) { Ok(id) } else { Err(RecordError::BadValue("identity")) }
    }
    fn end(&self) -> Result<(), RecordError> {
        if self.buf.is_empty() { Ok(()) } else { Err(RecordError::Trailing) }
    }
}

impl Record {
    /// Encodes the record into a slot-sized buffer.
    pub fn encode(&self, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError> {
        let mut w = Writer { buf, pos: HEADER_LEN };
        let kind = match self {
            Record::AuthAsk(a) => {
                w.u64(a.ask_id)?;
                w.addr(a.client)?;
                w.u16(a.target_port)?;
                w.str(&a.authority, MAX_AUTHORITY, "authority")?;
                w.str(&a.path, MAX_PATH, "path")?;
                w.str(&a.target_host, MAX_TARGET_HOST, "target_host")?;
                w.u8(u8::from(a.authorization.is_some()))?;
                w.str(a.authorization.as_deref().unwrap_or(""), MAX_AUTHORIZATION, "authorization")?;
                if a.protocol > PROTOCOL_MAX {
                    return Err(RecordError::BadValue("protocol"));
                }
                w.u8(a.protocol)?;
                KIND_AUTH_ASK
            }
            Record::AuthAnswer(a) => {
                w.u64(a.ask_id)?;
                match &a.verdict {
                    Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity } => {
                        w.u8(1)?;
                        w.u64(*flow_id)?;
                        w.addr(*target)?;
                        w.u32(*idle_timeout_ms)?;
                        w.u64(*byte_budget)?;
                        w.identity(identity)?;
                    }
                    Verdict::AllowIp {
                        flow_id,
                        idle_timeout_ms,
                        byte_budget,
                        identity,
                        addresses,
                        routes,
                    } => {
                        if addresses.len() > MAX_IP_ASSIGNMENTS || routes.len() > MAX_IP_ROUTES {
                            return Err(RecordError::BadValue("ip_config"));
                        }
                        w.u8(3)?;
                        w.u64(*flow_id)?;
                        w.u32(*idle_timeout_ms)?;
                        w.u64(*byte_budget)?;
                        w.identity(identity)?;
                        w.u8(addresses.len() as u8)?;
                        for a in addresses {
                            w.prefix(a.addr, a.len)?;
                        }
                        w.u8(routes.len() as u8)?;
                        for r in routes {
                            w.route(r)?;
                        }
                    }
                    Verdict::AllowBind { flow_id, idle_timeout_ms, byte_budget, identity, peers } => {
                        if peers.len() > MAX_IP_ROUTES {
                            return Err(RecordError::BadValue("peers"));
                        }
                        w.u8(4)?;
                        w.u64(*flow_id)?;
                        w.u32(*idle_timeout_ms)?;
                        w.u64(*byte_budget)?;
                        w.identity(identity)?;
                        w.u8(peers.len() as u8)?;
                        for r in peers {
                            w.route(r)?;
                        }
                    }
                    Verdict::Deny { status, proxy_error, details, retry_after_secs } => {
                        if !(400..=599).contains(status) {
                            return Err(RecordError::BadValue("status"));
                        }
                        w.u8(2)?;
                        w.u16(*status)?;
                        w.u8(proxy_error.map_or(0, |e| e as u8))?;
                        w.str(details, MAX_DETAILS, "details")?;
                        w.u32(*retry_after_secs)?;
                    }
                }
                KIND_AUTH_ANSWER
            }
            Record::FlowClosed(f) => {
                for v in [f.flow_id, f.packets_up, f.bytes_up, f.packets_down, f.bytes_down] {
                    w.u64(v)?;
                }
                KIND_FLOW_CLOSED
            }
            Record::FlowOpen(f) => {
                w.u64(f.flow_id)?;
                w.addr(f.client)?;
                w.addr(f.target)?;
                w.identity(&f.identity)?;
                if f.addresses.len() > MAX_IP_ASSIGNMENTS {
                    return Err(RecordError::BadValue("addresses"));
                }
                w.u8(f.addresses.len() as u8)?;
                for a in &f.addresses {
                    w.prefix(a.addr, a.len)?;
                }
                KIND_FLOW_OPEN
            }
            Record::Drain => KIND_DRAIN,
            Record::KillFlow { flow_id } => {
                w.u64(*flow_id)?;
                KIND_KILL_FLOW
            }
            Record::SignAsk(a) => {
                w.u64(a.sign_id)?;
                w.u32(a.generation)?;
                w.u16(a.algorithm)?;
                w.blob(&a.input, MAX_SIGN_INPUT, "input")?;
                KIND_SIGN_ASK
            }
            Record::SignAnswer(a) => {
                w.u64(a.sign_id)?;
                match &a.result {
                    SignResult::Signature(sig) => {
                        if sig.is_empty() {
                            return Err(RecordError::BadValue("signature"));
                        }
                        w.u8(1)?;
                        w.blob(sig, MAX_SIGNATURE, "signature")?;
                    }
                    SignResult::Failed(why) => {
                        w.u8(2)?;
                        w.str(why, MAX_DETAILS, "details")?;
                    }
                }
                KIND_SIGN_ANSWER
            }
            Record::ListConns { request_id, limit } => {
                if !(1..=MAX_CONNS_LISTED).contains(limit) {
                    return Err(RecordError::BadValue("limit"));
                }
                w.u64(*request_id)?;
                w.u32(*limit)?;
                KIND_LIST_CONNS
            }
            Record::ConnInfo(c) => {
                if c.transport > TRANSPORT_TCP_PENDING {
                    return Err(RecordError::BadValue("transport"));
                }
                w.u64(c.request_id)?;
                w.u8(c.transport)?;
                w.u64(c.conn_id)?;
                w.addr(c.client)?;
                w.u64(c.age_ms)?;
                w.u8(u8::from(c.established) | (u8::from(c.resumed) << 1))?;
                w.u32(c.tls_generation)?;
                w.u32(c.tunnels)?;
                for v in
                    [c.rtt_us, c.packets_sent, c.packets_recv, c.packets_lost, c.bytes_sent, c.bytes_recv]
                {
                    w.u64(v)?;
                }
                w.u32(c.max_tunnel_payload)?;
                KIND_CONN_INFO
            }
            Record::ConnListEnd { request_id, total } => {
                w.u64(*request_id)?;
                w.u32(*total)?;
                KIND_CONN_LIST_END
            }
            Record::AddressAsk(a) => {
                w.u64(a.flow_id)?;
                w.u64(a.request_id)?;
                w.ip(a.addr)?;
                KIND_ADDRESS_ASK
            }
            Record::AddressAnswer(a) => {
                w.u64(a.flow_id)?;
                w.u64(a.request_id)?;
                w.ip(a.addr)?;
                w.u8(u8::from(a.granted))?;
                KIND_ADDRESS_ANSWER
            }
        };
        let payload_len = w.pos - HEADER_LEN;
        buf[0] = VERSION;
        buf[1] = kind;
        buf[2..4].copy_from_slice(&(payload_len as u16).to_le_bytes());
        buf[4..8].fill(0);
        Ok(())
    }

    /// Decodes and validates a record copied out of a ring slot.
    pub fn decode(buf: &[u8]) -> Result<Record, RecordError> {
        if buf.len() < HEADER_LEN {
            return Err(RecordError::Truncated);
        }
        if buf[0] != VERSION {
            return Err(RecordError::Version(buf[0]));
        }
        let payload_len = usize::from(u16::from_le_bytes([buf[2], buf[3]]));
        if payload_len > MAX_PAYLOAD {
            return Err(RecordError::PayloadLength(payload_len));
        }
        let payload = buf.get(HEADER_LEN..HEADER_LEN + payload_len).ok_or(RecordError::Truncated)?;
        let mut r = Reader { buf: payload };
        let record = match buf[1] {
            KIND_AUTH_ASK => {
                let ask_id = r.u64()?;
                let client = r.addr("client")?;
                let target_port = r.u16()?;
                let authority = r.str(MAX_AUTHORITY, "authority")?;
                let path = r.str(MAX_PATH, "path")?;
                let target_host = r.str(MAX_TARGET_HOST, "target_host")?;
                let has_auth = r.u8()?;
                let auth = r.str(MAX_AUTHORIZATION, "authorization")?;
                let authorization = match has_auth {
                    0 if auth.is_empty() => None,
                    1 => Some(auth),
                    _ => return Err(RecordError::BadValue("authorization")),
                };
                let protocol = r.u8()?;
                if protocol > PROTOCOL_MAX {
                    return Err(RecordError::BadValue("protocol"));
                }
                Record::AuthAsk(AuthAsk {
                    protocol,
                    ask_id,
                    client,
                    authority,
                    path,
                    target_host,
                    target_port,
                    authorization,
                })
            }
            KIND_AUTH_ANSWER => {
                let ask_id = r.u64()?;
                let verdict = match r.u8()? {
                    1 => Verdict::Allow {
                        flow_id: r.u64()?,
                        target: r.addr("target")?,
                        idle_timeout_ms: r.u32()?,
                        byte_budget: r.u64()?,
                        identity: r.identity()?,
                    },
                    2 => {
                        let status = r.u16()?;
                        if !(400..=599).contains(&status) {
                            return Err(RecordError::BadValue("status"));
                        }
                        let proxy_error = match r.u8()? {
                            0 => None,
                            code => {
                                Some(ProxyError::from_u8(code).ok_or(RecordError::BadValue("proxy_error"))?)
                            }
                        };
                        Verdict::Deny {
                            status,
                            proxy_error,
                            details: r.str(MAX_DETAILS, "details")?,
                            retry_after_secs: r.u32()?,
                        }
                    }
                    3 => {
                        let flow_id = r.u64()?;
                        let idle_timeout_ms = r.u32()?;
                        let byte_budget = r.u64()?;
                        let identity = r.identity()?;
                        let n = usize::from(r.u8()?);
                        if n > MAX_IP_ASSIGNMENTS {
                            return Err(RecordError::BadValue("addresses"));
                        }
                        let addresses = (0..n).map(|_| r.prefix()).collect::<Result<_, _>>()?;
                        let n = usize::from(r.u8()?);
                        if n > MAX_IP_ROUTES {
                            return Err(RecordError::BadValue("routes"));
                        }
                        let routes = (0..n).map(|_| r.route()).collect::<Result<_, _>>()?;
                        Verdict::AllowIp {
                            flow_id,
                            idle_timeout_ms,
                            byte_budget,
                            identity,
                            addresses,
                            routes,
                        }
                    }
                    4 => {
                        let flow_id = r.u64()?;
                        let idle_timeout_ms = r.u32()?;
                        let byte_budget = r.u64()?;
                        let identity = r.identity()?;
                        let n = usize::from(r.u8()?);
                        if n > MAX_IP_ROUTES {
                            return Err(RecordError::BadValue("peers"));
                        }
                        let peers = (0..n).map(|_| r.route()).collect::<Result<_, _>>()?;
                        Verdict::AllowBind { flow_id, idle_timeout_ms, byte_budget, identity, peers }
                    }
                    _ => return Err(RecordError::BadValue("verdict")),
                };
                Record::AuthAnswer(AuthAnswer { ask_id, verdict })
            }
            KIND_FLOW_CLOSED => Record::FlowClosed(FlowClosed {
                flow_id: r.u64()?,
                packets_up: r.u64()?,
                bytes_up: r.u64()?,
                packets_down: r.u64()?,
                bytes_down: r.u64()?,
            }),
            KIND_FLOW_OPEN => {
                let flow_id = r.u64()?;
                let client = r.addr("client")?;
                let target = r.addr("target")?;
                let identity = r.identity()?;
                let n = usize::from(r.u8()?);
                if n > MAX_IP_ASSIGNMENTS {
                    return Err(RecordError::BadValue("addresses"));
                }
                let addresses = (0..n).map(|_| r.prefix()).collect::<Result<_, _>>()?;
                Record::FlowOpen(FlowOpen { flow_id, client, target, identity, addresses })
            }
            KIND_DRAIN => Record::Drain,
            KIND_KILL_FLOW => Record::KillFlow { flow_id: r.u64()? },
            KIND_SIGN_ASK => Record::SignAsk(SignAsk {
                sign_id: r.u64()?,
                generation: r.u32()?,
                algorithm: r.u16()?,
                input: r.blob(MAX_SIGN_INPUT, "input")?,
            }),
            KIND_SIGN_ANSWER => {
                let sign_id = r.u64()?;
                let result = match r.u8()? {
                    1 => {
                        let sig = r.blob(MAX_SIGNATURE, "signature")?;
                        if sig.is_empty() {
                            return Err(RecordError::BadValue("signature"));
                        }
                        SignResult::Signature(sig)
                    }
                    2 => SignResult::Failed(r.str(MAX_DETAILS, "details")?),
                    _ => return Err(RecordError::BadValue("result")),
                };
                Record::SignAnswer(SignAnswer { sign_id, result })
            }
            KIND_LIST_CONNS => {
                let request_id = r.u64()?;
                let limit = r.u32()?;
                if !(1..=MAX_CONNS_LISTED).contains(&limit) {
                    return Err(RecordError::BadValue("limit"));
                }
                Record::ListConns { request_id, limit }
            }
            KIND_CONN_INFO => {
                let request_id = r.u64()?;
                let transport = r.u8()?;
                if transport > TRANSPORT_TCP_PENDING {
                    return Err(RecordError::BadValue("transport"));
                }
                let conn_id = r.u64()?;
                let client = r.addr("client")?;
                let age_ms = r.u64()?;
                let flags = r.u8()?;
                if flags > 3 {
                    return Err(RecordError::BadValue("flags"));
                }
                Record::ConnInfo(ConnInfo {
                    request_id,
                    transport,
                    conn_id,
                    client,
                    age_ms,
                    established: flags & 1 != 0,
                    resumed: flags & 2 != 0,
                    tls_generation: r.u32()?,
                    tunnels: r.u32()?,
                    rtt_us: r.u64()?,
                    packets_sent: r.u64()?,
                    packets_recv: r.u64()?,
                    packets_lost: r.u64()?,
                    bytes_sent: r.u64()?,
                    bytes_recv: r.u64()?,
                    max_tunnel_payload: r.u32()?,
                })
            }
            KIND_CONN_LIST_END => Record::ConnListEnd { request_id: r.u64()?, total: r.u32()? },
            KIND_ADDRESS_ASK => {
                Record::AddressAsk(AddressAsk { flow_id: r.u64()?, request_id: r.u64()?, addr: r.ip()? })
            }
            KIND_ADDRESS_ANSWER => Record::AddressAnswer(AddressAnswer {
                flow_id: r.u64()?,
                request_id: r.u64()?,
                addr: r.ip()?,
                granted: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(RecordError::BadValue("granted")),
                },
            }),
            other => return Err(RecordError::Kind(other)),
        };
        r.end()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::AuthAsk(AuthAsk {
                ask_id: 7,
                client: "[2001:db8::1]:5555".parse().unwrap(),
                authority: "relay:443".into(),
                path: "/.well-known/masque/udp/a/1/".into(),
                target_host: "example.com".into(),
                target_port: 53,
                authorization: Some("Bearer t".into()),
                protocol: PROTOCOL_CONNECT_UDP,
            }),
            Record::AuthAsk(AuthAsk {
                ask_id: u64::MAX,
                client: "192.0.2.1:1".parse().unwrap(),
                authority: "a".repeat(MAX_AUTHORITY),
                path: "/".repeat(MAX_PATH),
                target_host: "h".repeat(MAX_TARGET_HOST),
                target_port: 65535,
                authorization: Some("x".repeat(MAX_AUTHORIZATION)),
                protocol: PROTOCOL_CONNECT_IP,
            }),
            Record::AuthAsk(AuthAsk {
                ask_id: 11,
                client: "198.51.100.7:40000".parse().unwrap(),
                authority: "example.com:443".into(),
                path: String::new(),
                target_host: "example.com".into(),
                target_port: 443,
                authorization: None,
                protocol: PROTOCOL_CONNECT_TCP,
            }),
            Record::AuthAnswer(AuthAnswer {
                ask_id: 10,
                verdict: Verdict::AllowIp {
                    flow_id: 11,
                    idle_timeout_ms: 60_000,
                    byte_budget: 0,
                    identity: "sub:bob".into(),
                    addresses: vec![
                        IpAssignment { addr: "10.89.0.2".parse().unwrap(), len: 32 },
                        IpAssignment { addr: "fd89::2".parse().unwrap(), len: 128 },
                    ],
                    routes: vec![
                        IpRoute {
                            start: "1.0.0.0".parse().unwrap(),
                            end: "9.255.255.255".parse().unwrap(),
                            protocol: 0,
                        },
                        IpRoute {
                            start: "2000::".parse().unwrap(),
                            end: "2fff::".parse().unwrap(),
                            protocol: 17,
                        },
                    ],
                },
            }),
            Record::AuthAnswer(AuthAnswer {
                ask_id: 7,
                verdict: Verdict::Allow {
                    flow_id: 9,
                    target: "127.0.0.1:9".parse().unwrap(),
                    idle_timeout_ms: 30_000,
                    byte_budget: 1 << 30,
                    identity: "sub:alice".into(),
                },
            }),
            Record::AuthAnswer(AuthAnswer {
                ask_id: 8,
                verdict: Verdict::Deny {
                    status: 403,
                    proxy_error: Some(ProxyError::DestinationIpProhibited),
                    details: "loopback".into(),
                    retry_after_secs: 0,
                },
            }),
            Record::AuthAnswer(AuthAnswer {
                ask_id: 9,
                verdict: Verdict::Deny {
                    status: 429,
                    proxy_error: Some(ProxyError::HttpRequestDenied),
                    details: "quota exceeded: per_client.new_flows_per_sec".into(),
                    retry_after_secs: 1,
                },
            }),
            Record::FlowClosed(FlowClosed {
                flow_id: 1,
                packets_up: 2,
                bytes_up: 3,
                packets_down: 4,
                bytes_down: 5,
            }),
            Record::Drain,
            Record::KillFlow { flow_id: 42 },
            Record::FlowOpen(FlowOpen {
                flow_id: 1 << 40,
                client: "192.0.2.1:5".parse().unwrap(),
                target: "[2001:db8::2]:53".parse().unwrap(),
                identity: "tok:0123456789abcdef".into(),
                addresses: vec![IpAssignment { addr: "10.89.0.9".parse().unwrap(), len: 32 }],
            }),
            Record::FlowOpen(FlowOpen {
                flow_id: 2,
                client: "192.0.2.1:6".parse().unwrap(),
                target: "192.0.2.9:53".parse().unwrap(),
                identity: String::new(),
                addresses: Vec::new(),
            }),
            Record::SignAsk(SignAsk { sign_id: 3, generation: 1, algorithm: 0x0403, input: vec![0x20; 130] }),
            Record::SignAsk(SignAsk {
                sign_id: u64::MAX,
                generation: u32::MAX,
                algorithm: 0x0804,
                input: vec![7; MAX_SIGN_INPUT],
            }),
            Record::SignAnswer(SignAnswer {
                sign_id: 3,
                result: SignResult::Signature(vec![1; MAX_SIGNATURE]),
            }),
            Record::SignAnswer(SignAnswer {
                sign_id: 4,
                result: SignResult::Failed("unsupported algorithm".into()),
            }),
            Record::ListConns { request_id: 5, limit: MAX_CONNS_LISTED },
            Record::ConnInfo(ConnInfo {
                request_id: 5,
                transport: TRANSPORT_H2,
                conn_id: 77,
                client: "[2001:db8::9]:443".parse().unwrap(),
                age_ms: 12_345,
                established: true,
                resumed: true,
                tls_generation: 2,
                tunnels: 3,
                rtt_us: 250,
                packets_sent: 10,
                packets_recv: 11,
                packets_lost: 1,
                bytes_sent: 12_000,
                bytes_recv: 13_000,
                max_tunnel_payload: 1_290,
            }),
            Record::ConnListEnd { request_id: 5, total: 1 },
            Record::AuthAnswer(AuthAnswer {
                ask_id: 12,
                verdict: Verdict::AllowBind {
                    flow_id: 13,
                    idle_timeout_ms: 120_000,
                    byte_budget: 5,
                    identity: "sub:carol".into(),
                    peers: vec![IpRoute {
                        start: "1.0.0.0".parse().unwrap(),
                        end: "9.255.255.255".parse().unwrap(),
                        protocol: 17,
                    }],
                },
            }),
            Record::AddressAsk(AddressAsk {
                flow_id: 14,
                request_id: 7,
                addr: "10.89.0.77".parse().unwrap(),
            }),
            Record::AddressAnswer(AddressAnswer {
                flow_id: 14,
                request_id: u64::MAX >> 2,
                addr: "fd89::9".parse().unwrap(),
                granted: true,
            }),
        ]
    }

    #[test]
    fn round_trips() {
        for rec in samples() {
            let mut buf = [0u8; RECORD_SIZE];
            rec.encode(&mut buf).unwrap();
            assert_eq!(Record::decode(&buf).unwrap(), rec);
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        for rec in samples() {
            let mut buf = [0u8; RECORD_SIZE];
            rec.encode(&mut buf).unwrap();
            let len = 8 + usize::from(u16::from_le_bytes([buf[2], buf[3]]));
            for cut in 0..len.min(64) {
                let mut b = buf;
                b[2..4].copy_from_slice(&(cut as u16).to_le_bytes());
                if cut + 8 < len {
                    assert!(Record::decode(&b).is_err());
                }
            }
            for i in 0..len.min(200) {
                let mut b = buf;
                b[i] ^= 0xff;
                let _ = Record::decode(&b);
            }
        }
    }

    #[test]
    fn header_checks() {
        let mut buf = [0u8; RECORD_SIZE];
        let flow_closed = samples().into_iter().find(|r| matches!(r, Record::FlowClosed(_))).unwrap();
        flow_closed.encode(&mut buf).unwrap();
        let mut b = buf;
        b[0] = VERSION + 1;
        assert_eq!(Record::decode(&b), Err(RecordError::Version(VERSION + 1)));
        b[0] = 1;
        assert_eq!(Record::decode(&b), Err(RecordError::Version(1)), "the layout before signing generations");
        let mut b = buf;
        b[1] = 99;
        assert_eq!(Record::decode(&b), Err(RecordError::Kind(99)));
        let mut b = buf;
        b[2..4].copy_from_slice(&5000u16.to_le_bytes());
        assert_eq!(Record::decode(&b), Err(RecordError::PayloadLength(5000)));
        let mut b = buf;
        b[2..4].copy_from_slice(&41u16.to_le_bytes());
        assert_eq!(Record::decode(&b), Err(RecordError::Trailing));
    }

    #[test]
    fn encode_refuses_oversize_fields_and_bad_status() {
        let mut buf = [0u8; RECORD_SIZE];
        let Record::AuthAsk(mut ask) = samples()[0].clone() else { unreachable!() };
        ask.path = "/".repeat(MAX_PATH + 1);
        assert_eq!(Record::AuthAsk(ask).encode(&mut buf), Err(RecordError::FieldTooLong("path")));
        let deny = Record::AuthAnswer(AuthAnswer {
            ask_id: 1,
            verdict: Verdict::Deny {
                status: 200,
                proxy_error: None,
                details: String::new(),
                retry_after_secs: 0,
            },
        });
        assert_eq!(deny.encode(&mut buf), Err(RecordError::BadValue("status")));
        let big = Record::SignAsk(SignAsk {
            sign_id: 1,
            generation: 1,
            algorithm: 0x0403,
            input: vec![0; MAX_SIGN_INPUT + 1],
        });
        assert_eq!(big.encode(&mut buf), Err(RecordError::FieldTooLong("input")));
        let empty = Record::SignAnswer(SignAnswer { sign_id: 1, result: SignResult::Signature(vec![]) });
        assert_eq!(empty.encode(&mut buf), Err(RecordError::BadValue("signature")));
        for limit in [0, MAX_CONNS_LISTED + 1] {
            let list = Record::ListConns { request_id: 1, limit };
            assert_eq!(list.encode(&mut buf), Err(RecordError::BadValue("limit")));
        }
    }

    #[test]
    fn ip_allows_refuse_bad_prefixes_routes_and_counts() {
        let mut buf = [0u8; RECORD_SIZE];
        let allow = |addresses: Vec<IpAssignment>, routes: Vec<IpRoute>| {
            Record::AuthAnswer(AuthAnswer {
                ask_id: 1,
                verdict: Verdict::AllowIp {
                    flow_id: 1,
                    idle_timeout_ms: 1,
                    byte_budget: 0,
                    identity: String::new(),
                    addresses,
                    routes,
                },
            })
        };
        let host_bits = IpAssignment { addr: "10.0.0.1".parse().unwrap(), len: 24 };
        assert_eq!(allow(vec![host_bits], vec![]).encode(&mut buf), Err(RecordError::BadValue("prefix")));
        let too_long = IpAssignment { addr: "10.0.0.0".parse().unwrap(), len: 33 };
        assert_eq!(allow(vec![too_long], vec![]).encode(&mut buf), Err(RecordError::BadValue("prefix")));
        let backwards =
            IpRoute { start: "10.0.0.9".parse().unwrap(), end: "10.0.0.1".parse().unwrap(), protocol: 0 };
        assert_eq!(allow(vec![], vec![backwards]).encode(&mut buf), Err(RecordError::BadValue("route")));
        let mixed = IpRoute { start: "10.0.0.1".parse().unwrap(), end: "::1".parse().unwrap(), protocol: 0 };
        assert_eq!(allow(vec![], vec![mixed]).encode(&mut buf), Err(RecordError::BadValue("route")));
        let ok = IpAssignment { addr: "10.0.0.0".parse().unwrap(), len: 24 };
        assert_eq!(
            allow(vec![ok; MAX_IP_ASSIGNMENTS + 1], vec![]).encode(&mut buf),
            Err(RecordError::BadValue("ip_config"))
        );
        // A bad IP version byte on the wire.
        allow(vec![ok], vec![]).encode(&mut buf).unwrap();
        let at = HEADER_LEN + 8 + 1 + 8 + 4 + 8 + 2 + 1;
        assert_eq!(buf[at], 4);
        buf[at] = 5;
        assert_eq!(Record::decode(&buf), Err(RecordError::BadValue("ip_version")));
    }

    #[test]
    fn ask_protocols_up_to_connect_tcp_are_accepted_and_beyond_refused() {
        let Record::AuthAsk(base) = samples()[0].clone() else { unreachable!() };
        let mut buf = [0u8; RECORD_SIZE];
        for protocol in
            [PROTOCOL_CONNECT_UDP, PROTOCOL_CONNECT_IP, PROTOCOL_CONNECT_UDP_BIND, PROTOCOL_CONNECT_TCP]
        {
            let rec = Record::AuthAsk(AuthAsk { protocol, ..base.clone() });
            rec.encode(&mut buf).unwrap();
            assert_eq!(Record::decode(&buf).unwrap(), rec);
        }
        let bad = Record::AuthAsk(AuthAsk { protocol: PROTOCOL_CONNECT_TCP + 1, ..base.clone() });
        assert_eq!(bad.encode(&mut buf), Err(RecordError::BadValue("protocol")));
        // The protocol is the ask's last byte: corrupt it on the wire.
        Record::AuthAsk(AuthAsk { protocol: PROTOCOL_CONNECT_TCP, ..base }).encode(&mut buf).unwrap();
        let last = HEADER_LEN + usize::from(u16::from_le_bytes([buf[2], buf[3]])) - 1;
        assert_eq!(buf[last], PROTOCOL_CONNECT_TCP);
        for protocol in [PROTOCOL_CONNECT_TCP + 1, u8::MAX] {
            buf[last] = protocol;
            assert_eq!(Record::decode(&buf), Err(RecordError::BadValue("protocol")));
        }
    }

    #[test]
    fn tcp_connect_allow_round_trips_with_its_target() {
        let mut buf = [0u8; RECORD_SIZE];
        let allow = Record::AuthAnswer(AuthAnswer {
            ask_id: 11,
            verdict: Verdict::Allow {
                flow_id: 12,
                target: "[2001:db8::80]:443".parse().unwrap(),
                idle_timeout_ms: 120_000,
                byte_budget: 0,
                identity: "tok:0123456789abcdef".into(),
            },
        });
        allow.encode(&mut buf).unwrap();
        assert_eq!(Record::decode(&buf).unwrap(), allow);
    }

    #[test]
    fn listing_records_refuse_bad_values_on_decode() {
        let mut buf = [0u8; RECORD_SIZE];
        Record::ListConns { request_id: 1, limit: 1 }.encode(&mut buf).unwrap();
        buf[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Record::decode(&buf), Err(RecordError::BadValue("limit")));
        let info = samples().into_iter().find(|r| matches!(r, Record::ConnInfo(_))).unwrap();
        info.encode(&mut buf).unwrap();
        // request_id, transport, conn_id, client (1 + 16 + 2), age_ms, then
        // flags.
        let transport_at = HEADER_LEN + 8;
        assert_eq!(buf[transport_at], TRANSPORT_H2);
        buf[transport_at] = TRANSPORT_TCP_PENDING + 1;
        assert_eq!(Record::decode(&buf), Err(RecordError::BadValue("transport")));
        buf[transport_at] = TRANSPORT_H2;
        let flags_at = HEADER_LEN + 8 + 1 + 8 + 19 + 8;
        assert_eq!(buf[flags_at], 3);
        buf[flags_at] = 4;
        assert_eq!(Record::decode(&buf), Err(RecordError::BadValue("flags")));
    }
}

//! Fixed-size, versioned records exchanged over the shared-memory rings.
//!
//! Layout (little endian): `version u8, kind u8, payload_len u16, reserved
//! u32`, then `payload_len` bytes of payload. Decoders check every length
//! and value; nothing read from the ring is trusted.
//!
//! Each ring carries one direction, and so does each record type:
//! [`AskRecord`] (worker -> control, the asks ring) and [`AnswerRecord`]
//! (control -> worker, the answers ring). A record of one direction cannot
//! be built as the other, and a kind of the other direction found in a ring
//! is refused as [`RecordError::WrongDirection`].
//!
//! - [`ask`]: the payloads a worker sends.
//! - [`answer`]: the payloads control sends.
//! - [`cert`]: a verified client certificate's facts (in an ask).
//! - `wire`: the header and field codecs.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use super::RECORD_SIZE;

pub mod answer;
pub mod ask;
pub mod cert;
mod wire;

pub use answer::{
    AddressAnswer, AuthAnswer, SignAnswer, SignResult, Verdict, valid_challenge, valid_route_name,
    valid_upstream_host, valid_upstream_path,
};
pub use ask::{
    AddressAsk, AuthAsk, ConnInfo, FlowClosed, FlowOpen, IPPROTO_ANY, SignAsk, Transport, TunnelProtocol,
};
pub use cert::{
    ClientCert, MAX_CERT_CN, MAX_CERT_NAME_LEN, MAX_CERT_NAMES, MAX_CERT_SERIAL, valid_cert_name,
};
use wire::{HEADER_LEN, Reader, Writer};

/// Record format version this build speaks (3: asks carry a client
/// certificate; 4: WebSocket asks and `AllowUpstream` answers; 5:
/// WebTransport asks).
pub const VERSION: u8 = 5;
/// Largest payload a record can carry.
pub const MAX_PAYLOAD: usize = RECORD_SIZE - HEADER_LEN;

/// Longest `:authority` carried in an ask.
pub const MAX_AUTHORITY: usize = 255;
/// Longest target host carried in an ask.
pub const MAX_TARGET_HOST: usize = 255;
/// Longest `:path` carried in an ask (longer requests get 414).
pub const MAX_PATH: usize = 1536;
/// Longest `[[upstreams]]` route name in an
/// [`AllowUpstream`](Verdict::AllowUpstream) verdict.
pub const MAX_ROUTE_NAME: usize = 32;
/// Longest credentials carried in an ask (longer requests get 431).
pub const MAX_AUTHORIZATION: usize = 1920;
/// Longest deny details carried in an answer.
pub const MAX_DETAILS: usize = 512;
/// Most `Proxy-Authenticate` challenges a 407 answer carries (a Bearer
/// challenge and Privacy Pass challenges of both token types, with room
/// for one more).
pub const MAX_CHALLENGES: usize = 4;
/// Longest `Proxy-Authenticate` challenge carried in an answer: a Privacy
/// Pass type 2 challenge is about 460 bytes of `token-key` (the 2048-bit
/// key's SPKI, base64url) plus the TokenChallenge's encoding; four of
/// these and the details fit a record.
pub const MAX_CHALLENGE_LEN: usize = 850;
/// Longest input a signing ask carries (a TLS 1.3 CertificateVerify input
/// is 64 + 34 + 1 + at most 64 bytes; ample room for other uses).
pub const MAX_SIGN_INPUT: usize = 2048;
/// Longest signature carried in an answer (RSA-8192 is 1024 bytes).
pub const MAX_SIGNATURE: usize = 1024;
/// Longest identity (quota key, e.g. `sub:alice`) carried with a flow.
pub const MAX_IDENTITY: usize = 128;

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

// Record kinds. Asks (worker -> control): 1, 3, 4, 7, 10, 11, 12; answers
// (control -> worker): 2, 5, 6, 8, 9, 13.
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

/// A record a worker sends to control (the asks ring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskRecord {
    /// May this tunnel open?
    AuthAsk(AuthAsk),
    /// Sign a TLS handshake (keyless TLS).
    SignAsk(SignAsk),
    /// Lease this address to a connect-ip flow.
    AddressAsk(AddressAsk),
    /// A flow control allowed has ended.
    FlowClosed(FlowClosed),
    /// A flow is open (reported after attaching to a new control).
    FlowOpen(FlowOpen),
    /// One listed connection.
    ConnInfo(ConnInfo),
    /// The listing is complete.
    ConnListEnd {
        /// The listing.
        request_id: u64,
        /// Connections the worker has (listed or not).
        total: u32,
    },
}

/// A record control sends to a worker (the answers ring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerRecord {
    /// The verdict on an [`AuthAsk`].
    AuthAnswer(AuthAnswer),
    /// The signature a [`SignAsk`] asked for.
    SignAnswer(SignAnswer),
    /// The outcome of an [`AddressAsk`].
    AddressAnswer(AddressAnswer),
    /// Drain gracefully (as on SIGTERM).
    Drain,
    /// End this flow's tunnel now (operator request).
    KillFlow {
        /// The flow to end.
        flow_id: u64,
    },
    /// List your connections (at most `limit`).
    ListConns {
        /// Echoed in the answers.
        request_id: u64,
        /// Most connections to list (1..=[`MAX_CONNS_LISTED`]).
        limit: u32,
    },
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
    /// The record kind belongs to the other direction (an answer in the
    /// asks ring, or an ask in the answers ring).
    #[error("record kind {0} does not travel in this direction")]
    WrongDirection(u8),
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

/// The records of one direction of the channel: what a typed ring end
/// encodes into its slots or decodes out of them.
pub trait ChannelRecord: Sized {
    /// Encodes the record into a slot image.
    fn encode(&self, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError>;

    /// Decodes and validates a slot image (a private copy, never the
    /// shared slot itself).
    fn decode(buf: &[u8]) -> Result<Self, RecordError>;

    /// Whether the record can be encoded (every field within its limits),
    /// without keeping the bytes: callers that queue a record check it
    /// before queueing.
    fn check(&self) -> Result<(), RecordError> {
        let mut scratch = [0u8; RECORD_SIZE];
        self.encode(&mut scratch)
    }
}

impl AskRecord {
    /// Encodes the record into a slot image.
    pub fn encode(&self, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError> {
        let mut w = Writer::new(buf);
        let kind = match self {
            AskRecord::AuthAsk(a) => {
                a.write(&mut w)?;
                KIND_AUTH_ASK
            }
            AskRecord::SignAsk(a) => {
                a.write(&mut w)?;
                KIND_SIGN_ASK
            }
            AskRecord::AddressAsk(a) => {
                a.write(&mut w)?;
                KIND_ADDRESS_ASK
            }
            AskRecord::FlowClosed(f) => {
                f.write(&mut w)?;
                KIND_FLOW_CLOSED
            }
            AskRecord::FlowOpen(f) => {
                f.write(&mut w)?;
                KIND_FLOW_OPEN
            }
            AskRecord::ConnInfo(c) => {
                c.write(&mut w)?;
                KIND_CONN_INFO
            }
            AskRecord::ConnListEnd { request_id, total } => {
                w.u64(*request_id)?;
                w.u32(*total)?;
                KIND_CONN_LIST_END
            }
        };
        w.finish(kind);
        Ok(())
    }

    /// Decodes and validates a record copied out of an asks ring slot.
    pub fn decode(buf: &[u8]) -> Result<Self, RecordError> {
        let (kind, mut r) = Reader::open(buf)?;
        let record = match kind {
            KIND_AUTH_ASK => AskRecord::AuthAsk(AuthAsk::read(&mut r)?),
            KIND_SIGN_ASK => AskRecord::SignAsk(SignAsk::read(&mut r)?),
            KIND_ADDRESS_ASK => AskRecord::AddressAsk(AddressAsk::read(&mut r)?),
            KIND_FLOW_CLOSED => AskRecord::FlowClosed(FlowClosed::read(&mut r)?),
            KIND_FLOW_OPEN => AskRecord::FlowOpen(FlowOpen::read(&mut r)?),
            KIND_CONN_INFO => AskRecord::ConnInfo(ConnInfo::read(&mut r)?),
            KIND_CONN_LIST_END => AskRecord::ConnListEnd { request_id: r.u64()?, total: r.u32()? },
            KIND_AUTH_ANSWER | KIND_DRAIN | KIND_KILL_FLOW | KIND_SIGN_ANSWER | KIND_LIST_CONNS
            | KIND_ADDRESS_ANSWER => return Err(RecordError::WrongDirection(kind)),
            other => return Err(RecordError::Kind(other)),
        };
        r.end()?;
        Ok(record)
    }
}

impl AnswerRecord {
    /// Encodes the record into a slot image.
    pub fn encode(&self, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError> {
        let mut w = Writer::new(buf);
        let kind = match self {
            AnswerRecord::AuthAnswer(a) => {
                a.write(&mut w)?;
                KIND_AUTH_ANSWER
            }
            AnswerRecord::SignAnswer(a) => {
                a.write(&mut w)?;
                KIND_SIGN_ANSWER
            }
            AnswerRecord::AddressAnswer(a) => {
                a.write(&mut w)?;
                KIND_ADDRESS_ANSWER
            }
            AnswerRecord::Drain => KIND_DRAIN,
            AnswerRecord::KillFlow { flow_id } => {
                w.u64(*flow_id)?;
                KIND_KILL_FLOW
            }
            AnswerRecord::ListConns { request_id, limit } => {
                if !(1..=MAX_CONNS_LISTED).contains(limit) {
                    return Err(RecordError::BadValue("limit"));
                }
                w.u64(*request_id)?;
                w.u32(*limit)?;
                KIND_LIST_CONNS
            }
        };
        w.finish(kind);
        Ok(())
    }

    /// Decodes and validates a record copied out of an answers ring slot.
    pub fn decode(buf: &[u8]) -> Result<Self, RecordError> {
        let (kind, mut r) = Reader::open(buf)?;
        let record = match kind {
            KIND_AUTH_ANSWER => AnswerRecord::AuthAnswer(AuthAnswer::read(&mut r)?),
            KIND_SIGN_ANSWER => AnswerRecord::SignAnswer(SignAnswer::read(&mut r)?),
            KIND_ADDRESS_ANSWER => AnswerRecord::AddressAnswer(AddressAnswer::read(&mut r)?),
            KIND_DRAIN => AnswerRecord::Drain,
            KIND_KILL_FLOW => AnswerRecord::KillFlow { flow_id: r.u64()? },
            KIND_LIST_CONNS => {
                let request_id = r.u64()?;
                let limit = r.u32()?;
                if !(1..=MAX_CONNS_LISTED).contains(&limit) {
                    return Err(RecordError::BadValue("limit"));
                }
                AnswerRecord::ListConns { request_id, limit }
            }
            KIND_AUTH_ASK | KIND_FLOW_CLOSED | KIND_FLOW_OPEN | KIND_SIGN_ASK | KIND_CONN_INFO
            | KIND_CONN_LIST_END | KIND_ADDRESS_ASK => return Err(RecordError::WrongDirection(kind)),
            other => return Err(RecordError::Kind(other)),
        };
        r.end()?;
        Ok(record)
    }
}

impl ChannelRecord for AskRecord {
    fn encode(&self, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError> {
        AskRecord::encode(self, buf)
    }
    fn decode(buf: &[u8]) -> Result<Self, RecordError> {
        AskRecord::decode(buf)
    }
}

impl ChannelRecord for AnswerRecord {
    fn encode(&self, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError> {
        AnswerRecord::encode(self, buf)
    }
    fn decode(buf: &[u8]) -> Result<Self, RecordError> {
        AnswerRecord::decode(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_status::ProxyError;

    fn ask_samples() -> Vec<AskRecord> {
        vec![
            AskRecord::AuthAsk(AuthAsk {
                ask_id: 7,
                client: "[2001:db8::1]:5555".parse().unwrap(),
                authority: "relay:443".into(),
                path: "/.well-known/masque/udp/a/1/".into(),
                target_host: "example.com".into(),
                target_port: 53,
                authorization: Some("Bearer t".into()),
                protocol: TunnelProtocol::ConnectUdp,
                client_cert: None,
            }),
            AskRecord::AuthAsk(AuthAsk {
                ask_id: u64::MAX,
                client: "192.0.2.1:1".parse().unwrap(),
                authority: "a".repeat(MAX_AUTHORITY),
                path: "/".repeat(MAX_PATH),
                target_host: "h".repeat(MAX_TARGET_HOST),
                target_port: 65535,
                authorization: Some("x".repeat(MAX_AUTHORIZATION)),
                protocol: TunnelProtocol::ConnectIp,
                client_cert: None,
            }),
            AskRecord::AuthAsk(AuthAsk {
                ask_id: 11,
                client: "198.51.100.7:40000".parse().unwrap(),
                authority: "example.com:443".into(),
                path: String::new(),
                target_host: "example.com".into(),
                target_port: 443,
                authorization: None,
                protocol: TunnelProtocol::ConnectTcp,
                client_cert: Some(ClientCert {
                    serial: vec![0x7f; MAX_CERT_SERIAL],
                    issuer_digest: [9; 32],
                    subject_cn: Some("c".repeat(MAX_CERT_CN)),
                    dns_names: vec!["d".repeat(MAX_CERT_NAME_LEN); MAX_CERT_NAMES],
                    uris: vec!["u".repeat(MAX_CERT_NAME_LEN); MAX_CERT_NAMES],
                }),
            }),
            AskRecord::FlowClosed(FlowClosed {
                flow_id: 1,
                packets_up: 2,
                bytes_up: 3,
                packets_down: 4,
                bytes_down: 5,
            }),
            AskRecord::FlowOpen(FlowOpen {
                flow_id: 1 << 40,
                client: "192.0.2.1:5".parse().unwrap(),
                target: "[2001:db8::2]:53".parse().unwrap(),
                identity: "tok:0123456789abcdef".into(),
                addresses: vec![IpAssignment { addr: "10.89.0.9".parse().unwrap(), len: 32 }],
                protocol: TunnelProtocol::ConnectIp,
                route: String::new(),
            }),
            AskRecord::FlowOpen(FlowOpen {
                flow_id: 2,
                client: "192.0.2.1:6".parse().unwrap(),
                target: "192.0.2.9:53".parse().unwrap(),
                identity: String::new(),
                addresses: Vec::new(),
                protocol: TunnelProtocol::WebSocket,
                route: "r".repeat(MAX_ROUTE_NAME),
            }),
            AskRecord::SignAsk(SignAsk {
                sign_id: 3,
                generation: 1,
                algorithm: 0x0403,
                input: vec![0x20; 130],
            }),
            AskRecord::SignAsk(SignAsk {
                sign_id: u64::MAX,
                generation: u32::MAX,
                algorithm: 0x0804,
                input: vec![7; MAX_SIGN_INPUT],
            }),
            AskRecord::ConnInfo(ConnInfo {
                request_id: 5,
                transport: Transport::H2,
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
            AskRecord::ConnListEnd { request_id: 5, total: 1 },
            AskRecord::AddressAsk(AddressAsk {
                flow_id: 14,
                request_id: 7,
                addr: "10.89.0.77".parse().unwrap(),
            }),
        ]
    }

    fn answer_samples() -> Vec<AnswerRecord> {
        vec![
            AnswerRecord::AuthAnswer(AuthAnswer {
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
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 7,
                verdict: Verdict::Allow {
                    flow_id: 9,
                    target: "127.0.0.1:9".parse().unwrap(),
                    idle_timeout_ms: 30_000,
                    byte_budget: 1 << 30,
                    identity: "sub:alice".into(),
                },
            }),
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 8,
                verdict: Verdict::Deny {
                    status: 403,
                    proxy_error: Some(ProxyError::DestinationIpProhibited),
                    details: "loopback".into(),
                    retry_after_secs: 0,
                },
            }),
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 9,
                verdict: Verdict::Deny {
                    status: 429,
                    proxy_error: Some(ProxyError::HttpRequestDenied),
                    details: "quota exceeded: per_client.new_flows_per_sec".into(),
                    retry_after_secs: 1,
                },
            }),
            AnswerRecord::AuthAnswer(AuthAnswer {
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
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 14,
                verdict: Verdict::Authenticate {
                    details: "x".repeat(MAX_DETAILS),
                    challenges: vec!["c".repeat(MAX_CHALLENGE_LEN); MAX_CHALLENGES],
                },
            }),
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 15,
                verdict: Verdict::Authenticate { details: String::new(), challenges: Vec::new() },
            }),
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 16,
                verdict: Verdict::AllowUpstream {
                    flow_id: 9,
                    target: "[2001:db8::1]:8080".parse().unwrap(),
                    idle_timeout_ms: 300_000,
                    byte_budget: 0,
                    identity: "i".repeat(MAX_IDENTITY),
                    route: "r".repeat(MAX_ROUTE_NAME),
                    host: "h".repeat(MAX_AUTHORITY),
                    path: format!("/{}", "p".repeat(MAX_PATH - 1)),
                },
            }),
            AnswerRecord::Drain,
            AnswerRecord::KillFlow { flow_id: 42 },
            AnswerRecord::SignAnswer(SignAnswer {
                sign_id: 3,
                result: SignResult::Signature(vec![1; MAX_SIGNATURE]),
            }),
            AnswerRecord::SignAnswer(SignAnswer {
                sign_id: 4,
                result: SignResult::Failed("unsupported algorithm".into()),
            }),
            AnswerRecord::ListConns { request_id: 5, limit: MAX_CONNS_LISTED },
            AnswerRecord::AddressAnswer(AddressAnswer {
                flow_id: 14,
                request_id: u64::MAX >> 2,
                addr: "fd89::9".parse().unwrap(),
                granted: true,
            }),
        ]
    }

    fn encoded(record: &impl ChannelRecord) -> [u8; RECORD_SIZE] {
        let mut buf = [0u8; RECORD_SIZE];
        record.encode(&mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trips() {
        for rec in ask_samples() {
            assert_eq!(AskRecord::decode(&encoded(&rec)).unwrap(), rec);
        }
        for rec in answer_samples() {
            assert_eq!(AnswerRecord::decode(&encoded(&rec)).unwrap(), rec);
        }
    }

    /// The kind bytes and the layout are the wire format both processes
    /// (of possibly different builds) speak: unchanged by the split into
    /// two directions.
    #[test]
    fn kinds_and_layout_are_the_wire_format() {
        let kind = |buf: [u8; RECORD_SIZE]| buf[1];
        let ask_kinds: Vec<u8> = ask_samples().iter().map(|r| kind(encoded(r))).collect();
        assert_eq!(ask_kinds, [1, 1, 1, 3, 4, 4, 7, 7, 10, 11, 12]);
        let answer_kinds: Vec<u8> = answer_samples().iter().map(|r| kind(encoded(r))).collect();
        assert_eq!(answer_kinds, [2, 2, 2, 2, 2, 2, 2, 2, 5, 6, 8, 8, 9, 13]);
        let closed = encoded(&AskRecord::FlowClosed(FlowClosed {
            flow_id: 1,
            packets_up: 2,
            bytes_up: 3,
            packets_down: 4,
            bytes_down: 5,
        }));
        assert_eq!(closed[..8], [VERSION, 3, 40, 0, 0, 0, 0, 0]);
        assert_eq!(closed[8..16], 1u64.to_le_bytes());
        assert_eq!(closed[40..48], 5u64.to_le_bytes());
    }

    #[test]
    fn a_record_of_the_other_direction_is_refused() {
        for rec in ask_samples() {
            let buf = encoded(&rec);
            assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::WrongDirection(buf[1])), "{rec:?}");
        }
        for rec in answer_samples() {
            let buf = encoded(&rec);
            assert_eq!(AskRecord::decode(&buf), Err(RecordError::WrongDirection(buf[1])), "{rec:?}");
        }
        let mut buf = encoded(&AnswerRecord::Drain);
        for unknown in [0, 14, 99, u8::MAX] {
            buf[1] = unknown;
            assert_eq!(AskRecord::decode(&buf), Err(RecordError::Kind(unknown)));
            assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::Kind(unknown)));
        }
    }

    fn mangle<R: ChannelRecord>(buf: [u8; RECORD_SIZE]) {
        let len = 8 + usize::from(u16::from_le_bytes([buf[2], buf[3]]));
        for cut in 0..len.min(64) {
            let mut b = buf;
            b[2..4].copy_from_slice(&(cut as u16).to_le_bytes());
            if cut + 8 < len {
                assert!(R::decode(&b).is_err());
            }
        }
        for i in 0..len.min(200) {
            let mut b = buf;
            b[i] ^= 0xff;
            let _ = R::decode(&b);
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        for rec in ask_samples() {
            mangle::<AskRecord>(encoded(&rec));
        }
        for rec in answer_samples() {
            mangle::<AnswerRecord>(encoded(&rec));
        }
    }

    #[test]
    fn header_checks() {
        let buf = encoded(&AskRecord::FlowClosed(FlowClosed::unused(1)));
        let mut b = buf;
        b[0] = VERSION + 1;
        assert_eq!(AskRecord::decode(&b), Err(RecordError::Version(VERSION + 1)));
        b[0] = 1;
        assert_eq!(
            AskRecord::decode(&b),
            Err(RecordError::Version(1)),
            "the layout before signing generations"
        );
        let mut b = buf;
        b[1] = 99;
        assert_eq!(AskRecord::decode(&b), Err(RecordError::Kind(99)));
        let mut b = buf;
        b[2..4].copy_from_slice(&5000u16.to_le_bytes());
        assert_eq!(AskRecord::decode(&b), Err(RecordError::PayloadLength(5000)));
        let mut b = buf;
        b[2..4].copy_from_slice(&41u16.to_le_bytes());
        assert_eq!(AskRecord::decode(&b), Err(RecordError::Trailing));
        assert_eq!(AskRecord::decode(&buf[..7]), Err(RecordError::Truncated));
    }

    #[test]
    fn encode_refuses_oversize_fields_and_bad_status() {
        let mut buf = [0u8; RECORD_SIZE];
        let AskRecord::AuthAsk(mut ask) = ask_samples()[0].clone() else { unreachable!() };
        ask.path = "/".repeat(MAX_PATH + 1);
        let ask = AskRecord::AuthAsk(ask);
        assert_eq!(ask.encode(&mut buf), Err(RecordError::FieldTooLong("path")));
        assert_eq!(ask.check(), Err(RecordError::FieldTooLong("path")));
        let deny = AnswerRecord::AuthAnswer(AuthAnswer {
            ask_id: 1,
            verdict: Verdict::Deny {
                status: 200,
                proxy_error: None,
                details: String::new(),
                retry_after_secs: 0,
            },
        });
        assert_eq!(deny.encode(&mut buf), Err(RecordError::BadValue("status")));
        let big = AskRecord::SignAsk(SignAsk {
            sign_id: 1,
            generation: 1,
            algorithm: 0x0403,
            input: vec![0; MAX_SIGN_INPUT + 1],
        });
        assert_eq!(big.encode(&mut buf), Err(RecordError::FieldTooLong("input")));
        let empty =
            AnswerRecord::SignAnswer(SignAnswer { sign_id: 1, result: SignResult::Signature(vec![]) });
        assert_eq!(empty.encode(&mut buf), Err(RecordError::BadValue("signature")));
        for limit in [0, MAX_CONNS_LISTED + 1] {
            let list = AnswerRecord::ListConns { request_id: 1, limit };
            assert_eq!(list.encode(&mut buf), Err(RecordError::BadValue("limit")));
        }
        assert_eq!(AnswerRecord::Drain.check(), Ok(()));
    }

    #[test]
    fn challenges_must_be_header_safe_and_bounded_both_ways() {
        let mut buf = [0u8; RECORD_SIZE];
        let auth = |challenges: Vec<String>| {
            AnswerRecord::AuthAnswer(AuthAnswer {
                ask_id: 1,
                verdict: Verdict::Authenticate { details: "d".into(), challenges },
            })
        };
        let ok = "PrivateToken challenge=\"AAIA\", token-key=\"MIIB\"".to_string();
        assert_eq!(auth(vec![ok.clone(), "Bearer realm=\"r\"".into()]).check(), Ok(()));
        for bad in [
            String::new(),
            "Bearer realm=\"r\"\r\nX-Injected: 1".to_string(),
            "Bearer\trealm=r".to_string(),
            " Bearer".to_string(),
            "Bearer ".to_string(),
            "Bearer r\u{e9}alm".to_string(),
            "c".repeat(MAX_CHALLENGE_LEN + 1),
        ] {
            assert!(!valid_challenge(&bad), "{bad:?}");
            assert_eq!(auth(vec![bad.clone()]).encode(&mut buf), Err(RecordError::BadValue("challenges")));
        }
        assert_eq!(
            auth(vec![ok.clone(); MAX_CHALLENGES + 1]).encode(&mut buf),
            Err(RecordError::BadValue("challenges"))
        );
        // A peer that writes a bad challenge anyway: the decoder refuses it.
        auth(vec!["abc".into()]).encode(&mut buf).unwrap();
        let at = buf.windows(3).position(|w| w == b"abc").unwrap();
        buf[at + 1] = b'\n';
        assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::BadValue("challenge")));
        buf[at + 1] = b'b';
        // And a count beyond the bound.
        buf[at - 3] = (MAX_CHALLENGES + 1) as u8;
        assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::BadValue("challenges")));
    }

    #[test]
    fn ip_allows_refuse_bad_prefixes_routes_and_counts() {
        let mut buf = [0u8; RECORD_SIZE];
        let allow = |addresses: Vec<IpAssignment>, routes: Vec<IpRoute>| {
            AnswerRecord::AuthAnswer(AuthAnswer {
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
        assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::BadValue("ip_version")));
    }

    #[test]
    fn upstream_verdicts_are_checked_both_ways() {
        let ok = Verdict::AllowUpstream {
            flow_id: 1,
            target: "127.0.0.1:80".parse().unwrap(),
            idle_timeout_ms: 1,
            byte_budget: 0,
            identity: String::new(),
            route: "chat-1".into(),
            host: "chat.example:8080".into(),
            path: "/ws?room=1".into(),
        };
        let rec = AnswerRecord::AuthAnswer(AuthAnswer { ask_id: 1, verdict: ok.clone() });
        assert_eq!(AnswerRecord::decode(&encoded(&rec)).unwrap(), rec);
        let bad = |f: &dyn Fn(&mut Verdict)| {
            let mut v = ok.clone();
            f(&mut v);
            let rec = AnswerRecord::AuthAnswer(AuthAnswer { ask_id: 1, verdict: v });
            let mut buf = [0u8; RECORD_SIZE];
            assert_eq!(rec.encode(&mut buf), Err(RecordError::BadValue("upstream")));
        };
        let set = |route: &str, host: &str, path: &str| {
            let (route, host, path) = (route.to_string(), host.to_string(), path.to_string());
            move |v: &mut Verdict| {
                if let Verdict::AllowUpstream { route: r, host: h, path: p, .. } = v {
                    (*r, *h, *p) = (route.clone(), host.clone(), path.clone());
                }
            }
        };
        bad(&set("Chat", "h", "/"));
        bad(&set("", "h", "/"));
        bad(&set("c", "h\r\nx: y", "/"));
        bad(&set("c", "user@h", "/"));
        bad(&set("c", "", "/"));
        bad(&set("c", "h", "x"));
        bad(&set("c", "h", "/a b"));
        bad(&set("c", "h", "/a#f"));
        // A peer writing a bad value is refused on decode too.
        let mut buf = encoded(&rec);
        let end = HEADER_LEN + usize::from(u16::from_le_bytes([buf[2], buf[3]]));
        buf[end - 1] = b' ';
        assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::BadValue("upstream")));
    }

    #[test]
    fn ask_protocols_have_their_wire_values_and_others_are_refused() {
        let AskRecord::AuthAsk(base) = ask_samples()[0].clone() else { unreachable!() };
        let protocols = [
            (TunnelProtocol::ConnectUdp, 0),
            (TunnelProtocol::ConnectIp, 1),
            (TunnelProtocol::ConnectUdpBind, 2),
            (TunnelProtocol::ConnectTcp, 3),
            (TunnelProtocol::WebSocket, 4),
            (TunnelProtocol::WebTransport, 5),
        ];
        for (protocol, wire) in protocols {
            let rec = AskRecord::AuthAsk(AuthAsk { protocol, ..base.clone() });
            let buf = encoded(&rec);
            // The protocol is the byte before the (absent) certificate's flag.
            let last = HEADER_LEN + usize::from(u16::from_le_bytes([buf[2], buf[3]])) - 2;
            assert_eq!(buf[last], wire);
            assert_eq!(TunnelProtocol::from_u8(wire), Some(protocol));
            assert_eq!(AskRecord::decode(&buf).unwrap(), rec);
        }
        let mut buf = encoded(&AskRecord::AuthAsk(base));
        let last = HEADER_LEN + usize::from(u16::from_le_bytes([buf[2], buf[3]])) - 1;
        buf[last] = 2;
        assert_eq!(AskRecord::decode(&buf), Err(RecordError::BadValue("client_cert")));
        buf[last] = 0;
        for protocol in [6, u8::MAX] {
            buf[last - 1] = protocol;
            assert_eq!(AskRecord::decode(&buf), Err(RecordError::BadValue("protocol")));
        }
    }

    #[test]
    fn tcp_connect_allow_round_trips_with_its_target() {
        let allow = AnswerRecord::AuthAnswer(AuthAnswer {
            ask_id: 11,
            verdict: Verdict::Allow {
                flow_id: 12,
                target: "[2001:db8::80]:443".parse().unwrap(),
                idle_timeout_ms: 120_000,
                byte_budget: 0,
                identity: "tok:0123456789abcdef".into(),
            },
        });
        assert_eq!(AnswerRecord::decode(&encoded(&allow)).unwrap(), allow);
    }

    #[test]
    fn listing_records_refuse_bad_values_on_decode() {
        let mut buf = encoded(&AnswerRecord::ListConns { request_id: 1, limit: 1 });
        buf[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(AnswerRecord::decode(&buf), Err(RecordError::BadValue("limit")));
        let info = ask_samples().into_iter().find(|r| matches!(r, AskRecord::ConnInfo(_))).unwrap();
        let mut buf = encoded(&info);
        // request_id, transport, conn_id, client (1 + 16 + 2), age_ms, then
        // flags.
        let transport_at = HEADER_LEN + 8;
        assert_eq!(buf[transport_at], Transport::H2 as u8);
        for (wire, transport) in [(0, Transport::H3), (4, Transport::Http1Clear), (5, Transport::TcpPending)]
        {
            buf[transport_at] = wire;
            let AskRecord::ConnInfo(c) = AskRecord::decode(&buf).unwrap() else { unreachable!() };
            assert_eq!(c.transport, transport);
        }
        buf[transport_at] = 6;
        assert_eq!(AskRecord::decode(&buf), Err(RecordError::BadValue("transport")));
        buf[transport_at] = Transport::H2 as u8;
        let flags_at = HEADER_LEN + 8 + 1 + 8 + 19 + 8;
        assert_eq!(buf[flags_at], 3);
        buf[flags_at] = 4;
        assert_eq!(AskRecord::decode(&buf), Err(RecordError::BadValue("flags")));
    }
}

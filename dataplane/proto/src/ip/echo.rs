//! ICMPv6 Echo (RFC 4443 section 4) on the tunnel link, for the link MTU
//! check of RFC 9484 section 7.2: "IP proxying endpoints can also send
//! ICMPv6 echo requests with 1232 bytes of data to ascertain the link MTU
//! and tear down the tunnel if they do not receive a response. Unless
//! endpoints have an out-of-band means of guaranteeing that the previous
//! techniques are sufficient, they MUST use this method."
//!
//! The relay's end of each tunnel link has the link-local address
//! [`TUNNEL_LINK_LOCAL`]: its probes come from it, so the client's answer
//! comes back through the tunnel whatever routes the client has (a reply to
//! a link-local source leaves by the interface the request came in on), and
//! a client may probe it (or `ff02::1`, which the section suggests when the
//! peer's address is unknown). Sans-IO.
#![forbid(unsafe_code)]

use std::net::Ipv6Addr;

use super::packet::{PROTO_ICMPV6, finish, sum16};

/// The relay's link-local address on every tunnel link (`fe80::` followed
/// by "masque" in ASCII: unlikely to be any client's own link-local).
pub const TUNNEL_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x6d, 0x6173, 0x7175, 0x65);
/// The link-local all-nodes multicast address (RFC 4291 section 2.7.1).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// The IPv6 minimum link MTU (RFC 8200 section 5).
pub const IPV6_MIN_MTU: usize = 1280;
/// Echo data of the probe: 1280 bytes less the IPv6 header (40) and the
/// ICMPv6 Echo header (8) (RFC 9484 section 7.2: "1232 bytes of data").
pub const PROBE_DATA_LEN: usize = IPV6_MIN_MTU - IPV6_HEADER - ECHO_HEADER;

const IPV6_HEADER: usize = 40;
const ECHO_HEADER: usize = 8;
/// ICMPv6 Echo Request (RFC 4443 section 4.1).
const ECHO_REQUEST: u8 = 128;
/// ICMPv6 Echo Reply (RFC 4443 section 4.2).
const ECHO_REPLY: u8 = 129;
/// Hop limit of the probes: 255, as for messages that never leave a link.
const LINK_HOP_LIMIT: u8 = 255;

/// Which Echo message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    /// Echo Request (type 128).
    Request,
    /// Echo Reply (type 129).
    Reply,
}

/// A valid ICMPv6 Echo message, as [`parse`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    /// Request or reply.
    pub kind: EchoKind,
    /// The IPv6 source.
    pub src: Ipv6Addr,
    /// The IPv6 destination.
    pub dst: Ipv6Addr,
    /// The Identifier field.
    pub identifier: u16,
    /// The Sequence Number field.
    pub sequence: u16,
    /// Length of the whole packet.
    pub total_len: usize,
}

/// Finds an ICMPv6 Echo message in `packet`: an IPv6 packet whose Next
/// Header is ICMPv6 (no extension headers), whose Payload Length matches
/// the packet, with type 128 or 129, code 0 and a valid checksum (RFC 4443
/// section 2.4 (a): a message with a bad checksum is discarded). None for
/// anything else.
pub fn parse(packet: &[u8]) -> Option<Echo> {
    if packet.len() < IPV6_HEADER + ECHO_HEADER || packet[0] >> 4 != 6 || packet[6] != PROTO_ICMPV6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    if payload_len + IPV6_HEADER != packet.len() {
        return None;
    }
    let kind = match (packet[IPV6_HEADER], packet[IPV6_HEADER + 1]) {
        (ECHO_REQUEST, 0) => EchoKind::Request,
        (ECHO_REPLY, 0) => EchoKind::Reply,
        _ => return None,
    };
    if checksum(packet) != 0 {
        return None;
    }
    let at = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
    Some(Echo {
        kind,
        src: v6_at(packet, 8),
        dst: v6_at(packet, 24),
        identifier: at(IPV6_HEADER + 4),
        sequence: at(IPV6_HEADER + 6),
        total_len: packet.len(),
    })
}

/// The MTU probe: an Echo Request of exactly 1280 bytes from `from` to
/// `to`, whose data is a pattern of `identifier` and `sequence` (so a
/// reply that is not a full copy can be told apart).
pub fn probe(from: Ipv6Addr, to: Ipv6Addr, identifier: u16, sequence: u16) -> Vec<u8> {
    let data: Vec<u8> = (0..PROBE_DATA_LEN).map(|i| pattern_byte(identifier, sequence, i)).collect();
    build(from, to, EchoKind::Request, identifier, sequence, &data)
}

/// Whether `packet`, a valid Echo Reply, carries the full data of the probe
/// with its identifier and sequence number.
pub fn is_full_probe_reply(packet: &[u8], echo: &Echo) -> bool {
    echo.kind == EchoKind::Reply
        && echo.total_len == IPV6_MIN_MTU
        && packet[IPV6_HEADER + ECHO_HEADER..]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(echo.identifier, echo.sequence, i))
}

/// The Echo Reply to `request` (a valid Echo Request), from `from`: the
/// same identifier, sequence number and data (RFC 4443 section 4.2), to the
/// request's source. None when the request is not a valid Echo Request or
/// its source cannot be answered (unspecified or multicast).
pub fn reply(request: &[u8], from: Ipv6Addr) -> Option<Vec<u8>> {
    let echo = parse(request)?;
    if echo.kind != EchoKind::Request || echo.src.is_unspecified() || echo.src.is_multicast() {
        return None;
    }
    let data = &request[IPV6_HEADER + ECHO_HEADER..];
    Some(build(from, echo.src, EchoKind::Reply, echo.identifier, echo.sequence, data))
}

fn pattern_byte(identifier: u16, sequence: u16, i: usize) -> u8 {
    let seed = u32::from(identifier) << 16 | u32::from(sequence);
    (seed.rotate_left((i % 32) as u32) as u8) ^ (i as u8)
}

fn build(
    from: Ipv6Addr,
    to: Ipv6Addr,
    kind: EchoKind,
    identifier: u16,
    sequence: u16,
    data: &[u8],
) -> Vec<u8> {
    let icmp_len = ECHO_HEADER + data.len();
    let mut p = Vec::with_capacity(IPV6_HEADER + icmp_len);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(icmp_len as u16).to_be_bytes());
    p.push(PROTO_ICMPV6);
    p.push(LINK_HOP_LIMIT);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to.octets());
    let icmp_type = match kind {
        EchoKind::Request => ECHO_REQUEST,
        EchoKind::Reply => ECHO_REPLY,
    };
    p.extend_from_slice(&[icmp_type, 0, 0, 0]);
    p.extend_from_slice(&identifier.to_be_bytes());
    p.extend_from_slice(&sequence.to_be_bytes());
    p.extend_from_slice(data);
    let sum = checksum(&p);
    p[IPV6_HEADER + 2..IPV6_HEADER + 4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The ICMPv6 checksum over the packet with the RFC 8200 section 8.1
/// pseudo-header: 0 for a packet whose checksum field is right, the value
/// to store for one whose field is zero.
fn checksum(p: &[u8]) -> u16 {
    let icmp_len = (p.len() - IPV6_HEADER) as u32;
    let mut acc = sum16(&p[8..40], 0);
    acc = sum16(&icmp_len.to_be_bytes(), acc);
    acc = sum16(&[0, 0, 0, PROTO_ICMPV6], acc);
    acc = sum16(&p[IPV6_HEADER..], acc);
    finish(acc)
}

fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ip::packet;

    fn client() -> Ipv6Addr {
        "fd89::2".parse().unwrap()
    }

    #[test]
    fn the_probe_is_1280_bytes_with_1232_of_data_and_parses() {
        let p = probe(TUNNEL_LINK_LOCAL, client(), 0xbeef, 3);
        assert_eq!(p.len(), 1280);
        assert_eq!(PROBE_DATA_LEN, 1232);
        let info = packet::parse(&p).expect("a valid IPv6 packet");
        assert_eq!(info.protocol, 58);
        let echo = parse(&p).expect("an echo");
        assert_eq!(
            echo,
            Echo {
                kind: EchoKind::Request,
                src: TUNNEL_LINK_LOCAL,
                dst: client(),
                identifier: 0xbeef,
                sequence: 3,
                total_len: 1280
            }
        );
    }

    #[test]
    fn a_reply_echoes_identifier_sequence_and_data_to_the_source() {
        let request = probe(TUNNEL_LINK_LOCAL, client(), 7, 1);
        let r = reply(&request, client()).expect("a reply");
        let echo = parse(&r).expect("parses");
        assert_eq!((echo.kind, echo.src, echo.dst), (EchoKind::Reply, client(), TUNNEL_LINK_LOCAL));
        assert_eq!((echo.identifier, echo.sequence), (7, 1));
        assert!(is_full_probe_reply(&r, &echo));
        // A reply is not answered.
        assert!(reply(&r, client()).is_none());
    }

    #[test]
    fn a_short_or_altered_reply_does_not_prove_the_mtu() {
        let request = probe(TUNNEL_LINK_LOCAL, client(), 7, 1);
        let full = reply(&request, client()).unwrap();
        // The same reply cut to 1000 bytes of data (a valid, smaller echo).
        let short = build(client(), TUNNEL_LINK_LOCAL, EchoKind::Reply, 7, 1, &full[48..1048]);
        let echo = parse(&short).expect("valid");
        assert!(!is_full_probe_reply(&short, &echo));
        // Full length, other data.
        let other = build(client(), TUNNEL_LINK_LOCAL, EchoKind::Reply, 7, 1, &[0u8; PROBE_DATA_LEN]);
        let echo = parse(&other).expect("valid");
        assert!(!is_full_probe_reply(&other, &echo));
    }

    #[test]
    fn malformed_echoes_are_not_parsed() {
        let good = probe(TUNNEL_LINK_LOCAL, client(), 1, 1);
        let mut bad_sum = good.clone();
        bad_sum[100] ^= 1;
        assert!(parse(&bad_sum).is_none(), "checksum");
        let mut bad_len = good.clone();
        bad_len.pop();
        assert!(parse(&bad_len).is_none(), "payload length");
        let mut bad_code = good.clone();
        bad_code[41] = 1;
        assert!(parse(&bad_code).is_none(), "code");
        let mut not_icmp = good.clone();
        not_icmp[6] = 17;
        assert!(parse(&not_icmp).is_none(), "next header");
        assert!(parse(&good[..47]).is_none(), "truncated");
        assert!(parse(&[]).is_none());
        let mut v4 = good;
        v4[0] = 0x45;
        assert!(parse(&v4).is_none(), "version");
    }

    #[test]
    fn requests_from_unanswerable_sources_get_no_reply() {
        let from_multicast = build(ALL_NODES, client(), EchoKind::Request, 1, 1, b"x");
        assert!(reply(&from_multicast, TUNNEL_LINK_LOCAL).is_none());
        let from_nowhere = build(Ipv6Addr::UNSPECIFIED, client(), EchoKind::Request, 1, 1, b"x");
        assert!(reply(&from_nowhere, TUNNEL_LINK_LOCAL).is_none());
    }

    #[test]
    fn the_tunnel_address_is_link_local() {
        assert!(TUNNEL_LINK_LOCAL.is_unicast_link_local());
        assert_eq!(TUNNEL_LINK_LOCAL.to_string(), "fe80::6d:6173:7175:65");
    }
}

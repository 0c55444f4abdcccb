//! IP packet handling for a connect-ip endpoint acting as a router (RFC 9484
//! section 7): header checks (RFC 791, RFC 8200), the IPv6 extension header
//! walk (RFC 9484 section 4.8), TTL / hop limit decrement (section 7.2) and
//! ICMP error generation (section 7.2.1, RFC 792, RFC 4443, RFC 1812).
//!
//! Everything works on a single packet in a caller-owned buffer; nothing here
//! allocates except [`icmp_error`], which builds a new packet. Rate limiting
//! ICMP errors (RFC 4443 section 2.4 (f), RFC 1812 section 4.3.2.8) is the
//! caller's job.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of ICMP (RFC 792).
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6 (RFC 4443).
pub const PROTO_ICMPV6: u8 = 58;

/// Length of an IPv4 header without options.
const IPV4_HEADER: usize = 20;
/// Length of the fixed IPv6 header.
const IPV6_HEADER: usize = 40;
/// Largest ICMPv4 error datagram: RFC 1812 section 4.3.2.3 ("the ICMP
/// datagram SHOULD contain as much of the original datagram as possible
/// without the length of the ICMP datagram exceeding 576 bytes").
const ICMPV4_ERROR_MAX: usize = 576;
/// Largest ICMPv6 error packet: RFC 4443 section 2.4 (c), "without making
/// the error message packet exceed the minimum IPv6 MTU" (1280 bytes).
const ICMPV6_ERROR_MAX: usize = 1280;
/// TTL / hop limit of the ICMP errors this endpoint originates.
const ORIGINATED_HOP_LIMIT: u8 = 64;

/// What [`parse`] found in a valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// 4 or 6.
    pub version: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The upper-layer protocol: the IPv4 Protocol field, or for IPv6 the
    /// first Next Header value that is not an extension header (RFC 9484
    /// section 4.8). For a non-first fragment this is the Fragment header's
    /// Next Header, since the upper-layer header is in another fragment.
    pub protocol: u8,
    /// TTL (IPv4) or Hop Limit (IPv6).
    pub hop_limit: u8,
    /// Length of the whole packet, equal to the slice length.
    pub total_len: usize,
    /// Offset of the upper-layer header: the IPv4 header length with
    /// options, or 40 plus the extension headers walked.
    pub header_len: usize,
}

/// Why a packet is not a valid IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The packet is empty or shorter than its fixed header.
    #[error("packet shorter than its IP header")]
    Truncated,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version {0} is neither 4 nor 6")]
    BadVersion(u8),
    /// IPv4 IHL below 5 or beyond the packet (RFC 791 section 3.1).
    #[error("IPv4 header length is invalid (RFC 791 section 3.1)")]
    BadHeaderLength,
    /// IPv4 Total Length or IPv6 40 + Payload Length differs from the
    /// packet's length (RFC 791 section 3.1, RFC 8200 section 3).
    #[error("IP length field {declared} differs from the packet length {actual}")]
    LengthMismatch {
        /// Length the header declares.
        declared: usize,
        /// Bytes actually present.
        actual: usize,
    },
    /// The IPv4 header checksum is wrong (RFC 791 section 3.1).
    #[error("IPv4 header checksum is wrong (RFC 791 section 3.1)")]
    BadChecksum,
    /// An IPv6 extension header runs past the end of the packet.
    #[error("IPv6 extension header chain runs past the packet (RFC 8200 section 4)")]
    TruncatedExtension,
    /// A Hop-by-Hop Options header not right after the IPv6 header: "The
    /// Hop-by-Hop Options header, when present, MUST immediately follow the
    /// IPv6 header" (RFC 8200 section 4.1).
    #[error("Hop-by-Hop Options header not first (RFC 8200 section 4.1)")]
    MisplacedHopByHop,
}

/// IPv6 extension headers the walk steps over (RFC 8200 section 4, IANA
/// "IPv6 Extension Header Types"), except ESP (50), whose payload is
/// encrypted and is therefore treated as the upper layer.
pub fn is_extension_header(protocol: u8) -> bool {
    matches!(protocol, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn v4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last
/// byte is padded with zero), added to `acc` (RFC 1071).
///
/// Eight bytes at a time: the sum is taken over native-endian 32-bit words
/// in a 64-bit accumulator (no carry to wrap until 2^31 words, far beyond
/// a 64 KiB packet), folded to 16 bits, and byte-swapped on little-endian
/// hosts, since a one's-complement sum of byte-swapped words is the
/// byte-swapped sum (RFC 1071 section 2 (B)). The straightforward loop
/// over 16-bit words, with a fold per word, was 14% of a worker's CPU when
/// it checked every TCP segment before coalescing TUN writes.
pub(crate) fn sum16(data: &[u8], acc: u32) -> u32 {
    let mut wide: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        wide += (v & 0xffff_ffff) + (v >> 32);
    }
    // The tail (under 8 bytes, starting at an even offset) padded with
    // zeros: an odd last byte becomes its word's high byte, as RFC 1071
    // pads it.
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let v = u64::from_ne_bytes(tail);
    wide += (v & 0xffff_ffff) + (v >> 32);
    while wide > 0xffff {
        wide = (wide & 0xffff) + (wide >> 16);
    }
    let native = wide as u16;
    let big_endian = if cfg!(target_endian = "little") { native.swap_bytes() } else { native };
    acc.wrapping_add(u32::from(big_endian))
}

/// Folds a sum to 16 bits and complements it: the Internet checksum.
pub(crate) fn finish(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// [`PacketInfo`] plus whether the packet is a fragment other than the
/// first, which the ICMP rules need.
struct Parsed {
    info: PacketInfo,
    later_fragment: bool,
}

/// Checks a packet's IP header and finds its upper-layer protocol.
///
/// IPv4: version, IHL >= 5 within the packet, Total Length equal to the
/// packet length, header checksum. IPv6: Payload Length + 40 equal to the
/// packet length (so jumbograms are refused), then the walk over Hop-by-Hop
/// (0, first only), Routing (43), Fragment (44), Destination Options (60),
/// AH (51), Mobility (135), HIP (139), Shim6 (140) and the experimental
/// 253/254, each bounds-checked; a chain that runs past the packet is an
/// error.
pub fn parse(packet: &[u8]) -> Result<PacketInfo, PacketError> {
    parse_inner(packet).map(|p| p.info)
}

fn parse_inner(packet: &[u8]) -> Result<Parsed, PacketError> {
    let first = *packet.first().ok_or(PacketError::Truncated)?;
    match first >> 4 {
        4 => parse_v4(packet),
        6 => parse_v6(packet),
        v => Err(PacketError::BadVersion(v)),
    }
}

fn parse_v4(b: &[u8]) -> Result<Parsed, PacketError> {
    if b.len() < IPV4_HEADER {
        return Err(PacketError::Truncated);
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < IPV4_HEADER || ihl > b.len() {
        return Err(PacketError::BadHeaderLength);
    }
    let declared = usize::from(be16(b, 2));
    if declared != b.len() {
        return Err(PacketError::LengthMismatch { declared, actual: b.len() });
    }
    // RFC 791 section 3.1: the checksum field holds the one's complement of
    // the one's complement sum of the header, so the sum over the whole
    // header, checksum included, is all ones.
    if finish(sum16(&b[..ihl], 0)) != 0 {
        return Err(PacketError::BadChecksum);
    }
    let fragment_offset = be16(b, 6) & 0x1fff;
    Ok(Parsed {
        info: PacketInfo {
            version: 4,
            src: IpAddr::V4(v4_at(b, 12)),
            dst: IpAddr::V4(v4_at(b, 16)),
            protocol: b[9],
            hop_limit: b[8],
            total_len: b.len(),
            header_len: ihl,
        },
        later_fragment: fragment_offset != 0,
    })
}

fn parse_v6(b: &[u8]) -> Result<Parsed, PacketError> {
    if b.len() < IPV6_HEADER {
        return Err(PacketError::Truncated);
    }
    let declared = IPV6_HEADER + usize::from(be16(b, 4));
    if declared != b.len() {
        return Err(PacketError::LengthMismatch { declared, actual: b.len() });
    }
    let mut next = b[6];
    let mut off = IPV6_HEADER;
    let mut later_fragment = false;
    while is_extension_header(next) {
        if next == 0 && off != IPV6_HEADER {
            return Err(PacketError::MisplacedHopByHop);
        }
        let header = b.get(off..off + 2).ok_or(PacketError::TruncatedExtension)?;
        let len = match next {
            // RFC 8200 section 4.5: the Fragment header is 8 bytes; its
            // second byte is reserved, not a length.
            44 => 8,
            // RFC 4302 section 2.2: AH's Payload Len is in 4-byte units,
            // minus 2.
            51 => (usize::from(header[1]) + 2) * 4,
            // RFC 8200 section 4 (and RFC 6564 for 135/139/140/253/254):
            // Hdr Ext Len in 8-byte units, not counting the first 8.
            _ => (usize::from(header[1]) + 1) * 8,
        };
        if off + len > b.len() {
            return Err(PacketError::TruncatedExtension);
        }
        let is_fragment = next == 44;
        next = header[0];
        if is_fragment && be16(b, off + 2) >> 3 != 0 {
            // A non-first fragment: what follows the Fragment header is the
            // middle of the original payload, not a header.
            later_fragment = true;
            off += len;
            break;
        }
        off += len;
    }
    Ok(Parsed {
        info: PacketInfo {
            version: 6,
            src: IpAddr::V6(v6_at(b, 8)),
            dst: IpAddr::V6(v6_at(b, 24)),
            protocol: next,
            hop_limit: b[7],
            total_len: b.len(),
            header_len: off,
        },
        later_fragment,
    })
}

/// Result of [`decrement_hop_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopOutcome {
    /// The TTL / hop limit was decremented; forward the packet.
    Forward,
    /// The TTL / hop limit would reach 0: drop the packet (and answer with
    /// [`IcmpError::TimeExceeded`]). The packet is left untouched.
    Expired,
}

/// Decrements TTL / hop limit in place (IPv4 checksum updated incrementally,
/// RFC 1624); Expired when it would reach 0 (packet untouched).
///
/// RFC 9484 section 7.2 decrements "right before an IP packet is transmitted
/// in an HTTP Datagram", not on decapsulation. Only the version and the
/// fixed header length are checked here: call [`parse`] first.
pub fn decrement_hop_limit(packet: &mut [u8]) -> Result<HopOutcome, PacketError> {
    let first = *packet.first().ok_or(PacketError::Truncated)?;
    let (at, min) = match first >> 4 {
        4 => (8, IPV4_HEADER),
        6 => (7, IPV6_HEADER),
        v => return Err(PacketError::BadVersion(v)),
    };
    if packet.len() < min {
        return Err(PacketError::Truncated);
    }
    let old = packet[at];
    if old <= 1 {
        return Ok(HopOutcome::Expired);
    }
    packet[at] = old - 1;
    if min == IPV4_HEADER {
        // RFC 1624 equation 3: HC' = ~(~HC + ~m + m'), where m is the 16-bit
        // word holding TTL and Protocol.
        let protocol = u16::from(packet[9]);
        let m = (u16::from(old) << 8) | protocol;
        let m_new = (u16::from(old - 1) << 8) | protocol;
        let hc = be16(packet, 10);
        let acc = u32::from(!hc) + u32::from(!m) + u32::from(m_new);
        packet[10..12].copy_from_slice(&finish(acc).to_be_bytes());
    }
    Ok(HopOutcome::Forward)
}

/// The forwarding errors a connect-ip endpoint reports (RFC 9484 section
/// 7.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// TTL / hop limit exceeded in transit: ICMP 11/0, ICMPv6 3/0.
    TimeExceeded,
    /// The packet does not fit the next link: ICMP 3/4 with the next-hop MTU
    /// (RFC 1191), ICMPv6 Packet Too Big 2/0.
    PacketTooBig {
        /// MTU of the next hop (capped at 65535 for IPv4).
        mtu: u32,
    },
    /// Destination prohibited by policy: ICMP 3/13, ICMPv6 1/1.
    AdminProhibited,
    /// No route to the destination: ICMP 3/0, ICMPv6 1/0.
    NoRoute,
    /// Source address failed ingress policy: ICMP 3/13, ICMPv6 1/5.
    SourcePolicy,
}

impl IcmpError {
    /// (type, code) for ICMPv4 (RFC 792, RFC 1812 section 5.2.7.1).
    fn v4(self) -> (u8, u8) {
        match self {
            IcmpError::TimeExceeded => (11, 0),
            IcmpError::PacketTooBig { .. } => (3, 4),
            IcmpError::AdminProhibited | IcmpError::SourcePolicy => (3, 13),
            IcmpError::NoRoute => (3, 0),
        }
    }

    /// (type, code) for ICMPv6 (RFC 4443 sections 3.1 to 3.3).
    fn v6(self) -> (u8, u8) {
        match self {
            IcmpError::TimeExceeded => (3, 0),
            IcmpError::PacketTooBig { .. } => (2, 0),
            IcmpError::AdminProhibited => (1, 1),
            IcmpError::NoRoute => (1, 0),
            IcmpError::SourcePolicy => (1, 5),
        }
    }
}

/// ICMPv4 types that are error messages (RFC 792, RFC 1812 section
/// 4.3.2.7: no error about "an ICMP error message").
fn is_icmpv4_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// RFC 1812 section 4.3.2.7: no ICMP error about a datagram "whose source
/// address does not define a single host -- e.g., a zero address, a
/// loopback address, a broadcast address, a multicast address, or a Class E
/// address", nor one "destined to an IP broadcast or IP multicast address".
fn v4_may_answer(src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let class_e = src.octets()[0] >= 240;
    let single_host_source = !src.is_unspecified() && !src.is_loopback() && !src.is_multicast() && !class_e;
    single_host_source && !dst.is_broadcast() && !dst.is_multicast()
}

/// Builds an ICMP (v4) or ICMPv6 error about `original`, from `from` to the
/// original's source, quoting as much of the original as keeps the result
/// within 576 bytes (v4) / 1280 bytes (v6); correct checksums (ICMPv6 with
/// the pseudo-header). Returns None when no error must be sent (RFC 1812/4443:
/// never about ICMP errors, about packets whose source is
/// unspecified/multicast/broadcast, or fragments other than the first).
///
/// Also None when `original` does not [`parse`] (RFC 1812 section 5.2.2
/// drops such packets silently) or `from` is of the other IP version. For
/// IPv4 the precise rules are RFC 1812 section 4.3.2.7 (also no errors about
/// loopback or Class E sources, or broadcast or multicast destinations);
/// for IPv6, RFC 4443 section 2.4 (e) (also none about Redirects, nor about
/// packets to a multicast destination except Packet Too Big). Non-first
/// IPv6 fragments are refused too: RFC 4443 does not forbid them, but the
/// upper-layer header that tells an ICMPv6 error apart is not in them.
pub fn icmp_error(original: &[u8], from: IpAddr, kind: IcmpError) -> Option<Vec<u8>> {
    let parsed = parse_inner(original).ok()?;
    if parsed.later_fragment {
        return None;
    }
    let info = parsed.info;
    let upper_type = original.get(info.header_len).copied();
    match (info.src, info.dst, from) {
        (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(from)) => {
            if !v4_may_answer(src, dst) {
                return None;
            }
            if info.protocol == PROTO_ICMP && upper_type.is_none_or(is_icmpv4_error) {
                return None;
            }
            Some(build_v4(original, from, src, kind))
        }
        (IpAddr::V6(src), IpAddr::V6(dst), IpAddr::V6(from)) => {
            // RFC 4443 section 2.4 (e.6): the source must identify a single
            // node.
            if src.is_unspecified() || src.is_multicast() {
                return None;
            }
            // (e.3): not to a multicast destination, except Packet Too Big.
            if dst.is_multicast() && !matches!(kind, IcmpError::PacketTooBig { .. }) {
                return None;
            }
            // (e.1), (e.2): not about an ICMPv6 error (types 0-127) or a
            // Redirect (137).
            if info.protocol == PROTO_ICMPV6 && upper_type.is_none_or(|t| t < 128 || t == 137) {
                return None;
            }
            Some(build_v6(original, from, src, kind))
        }
        _ => None,
    }
}

fn build_v4(original: &[u8], from: Ipv4Addr, to: Ipv4Addr, kind: IcmpError) -> Vec<u8> {
    let quoted = &original[..original.len().min(ICMPV4_ERROR_MAX - IPV4_HEADER - 8)];
    let total = IPV4_HEADER + 8 + quoted.len();
    let mut p = Vec::with_capacity(total);
    p.push(0x45);
    // RFC 1812 section 4.3.2.5: ICMP errors SHOULD have precedence 6
    // (internetwork control).
    p.push(0xc0);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]); // identification, flags, fragment offset
    p.push(ORIGINATED_HOP_LIMIT);
    p.push(PROTO_ICMP);
    p.extend_from_slice(&[0, 0]); // header checksum, below
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to.octets());
    let header_sum = finish(sum16(&p[..IPV4_HEADER], 0));
    p[10..12].copy_from_slice(&header_sum.to_be_bytes());
    let (icmp_type, code) = kind.v4();
    p.extend_from_slice(&[icmp_type, code, 0, 0]);
    match kind {
        // RFC 1191 section 4: unused (16 bits), Next-Hop MTU (16 bits).
        IcmpError::PacketTooBig { mtu } => {
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&(mtu.min(u32::from(u16::MAX)) as u16).to_be_bytes());
        }
        _ => p.extend_from_slice(&[0; 4]),
    }
    p.extend_from_slice(quoted);
    let icmp_sum = finish(sum16(&p[IPV4_HEADER..], 0));
    p[IPV4_HEADER + 2..IPV4_HEADER + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    p
}

fn build_v6(original: &[u8], from: Ipv6Addr, to: Ipv6Addr, kind: IcmpError) -> Vec<u8> {
    let quoted = &original[..original.len().min(ICMPV6_ERROR_MAX - IPV6_HEADER - 8)];
    let icmp_len = 8 + quoted.len();
    let mut p = Vec::with_capacity(IPV6_HEADER + icmp_len);
    p.extend_from_slice(&[0x60, 0, 0, 0]); // version, traffic class, flow label
    p.extend_from_slice(&(icmp_len as u16).to_be_bytes());
    p.push(PROTO_ICMPV6);
    p.push(ORIGINATED_HOP_LIMIT);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to.octets());
    let (icmp_type, code) = kind.v6();
    p.extend_from_slice(&[icmp_type, code, 0, 0]);
    match kind {
        // RFC 4443 section 3.2: the MTU field.
        IcmpError::PacketTooBig { mtu } => p.extend_from_slice(&mtu.to_be_bytes()),
        _ => p.extend_from_slice(&[0; 4]),
    }
    p.extend_from_slice(quoted);
    // RFC 4443 section 2.3 with the RFC 8200 section 8.1 pseudo-header:
    // source, destination, upper-layer length (32 bits), 3 zero bytes, Next
    // Header.
    let mut acc = sum16(&p[8..40], 0);
    acc = sum16(&(icmp_len as u32).to_be_bytes(), acc);
    acc = sum16(&[0, 0, 0, PROTO_ICMPV6], acc);
    acc = sum16(&p[IPV6_HEADER..], acc);
    let sum = finish(acc);
    p[IPV6_HEADER + 2..IPV6_HEADER + 4].copy_from_slice(&sum.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random bytes (xorshift), so the test needs no dependency.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn sum16_matches_the_word_by_word_checksum_at_every_length_and_alignment() {
        let data = noise(4096 + 16, 0x9e37_79b9_7f4a_7c15);
        for offset in 0..8 {
            for len in (0..=300).chain([1279, 1280, 1500, 4095, 4096]) {
                let slice = &data[offset..offset + len];
                assert_eq!(
                    finish(sum16(slice, 0)),
                    reference_checksum(&[slice]),
                    "offset {offset}, len {len}"
                );
            }
        }
    }

    #[test]
    fn sum16_chains_like_one_sum_over_the_concatenation() {
        // A pseudo-header then a segment, as the transport checksums chain
        // it: even-length pieces, the last one of any length.
        let data = noise(2000, 7);
        for split in [0, 2, 12, 40, 1000] {
            for end in [split, split + 1, split + 7, 1999, 2000] {
                let (a, b) = (&data[..split], &data[split..end]);
                assert_eq!(
                    finish(sum16(b, sum16(a, 0))),
                    reference_checksum(&[a, b]),
                    "split {split}, end {end}"
                );
            }
        }
    }

    #[test]
    fn sum16_carries_at_the_extremes() {
        // All ones: every addition carries; 64 KiB, the largest packet.
        for len in [1, 2, 3, 8, 9, 65_535, 65_536] {
            let ones = vec![0xffu8; len];
            assert_eq!(finish(sum16(&ones, 0)), reference_checksum(&[&ones]), "len {len}");
        }
        let zeros = vec![0u8; 1500];
        assert_eq!(finish(sum16(&zeros, 0)), 0xffff);
    }

    /// A straightforward Internet checksum, written independently of the
    /// module's: sum every 16-bit word in a u64, fold at the end.
    fn reference_checksum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut total: u64 = 0;
        for i in (0..bytes.len()).step_by(2) {
            let hi = u64::from(bytes[i]) << 8;
            let lo = bytes.get(i + 1).map_or(0, |b| u64::from(*b));
            total += hi | lo;
        }
        while total >> 16 != 0 {
            total = (total & 0xffff) + (total >> 16);
        }
        !(total as u16)
    }

    fn ipv4(proto: u8, ttl: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
        p.extend_from_slice(&[ttl, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let sum = reference_checksum(&[&p]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn udp_payload(len: usize) -> Vec<u8> {
        // Source port 5353, destination 53, length, checksum 0 (not checked).
        let mut u = vec![0x14, 0xe9, 0, 53];
        u.extend_from_slice(&((8 + len) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend((0..len).map(|i| i as u8));
        u
    }

    fn ipv6(next: u8, hop: u8, src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.push(next);
        p.push(hop);
        p.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(payload);
        p
    }

    /// Fragment header (first fragment, M set) then Destination Options
    /// with one PadN option, then UDP.
    fn v6_fragment_dstopts_udp(fragment_offset: u16) -> Vec<u8> {
        let mut chain = vec![60, 0];
        chain.extend_from_slice(&((fragment_offset << 3) | 1).to_be_bytes());
        chain.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // identification
        chain.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]); // dest opts, PadN
        chain.extend_from_slice(&udp_payload(12));
        ipv6(44, 64, "2001:db8::1", "2001:db8::2", &chain)
    }

    fn icmpv4_echo() -> Vec<u8> {
        let mut echo = vec![8, 0, 0, 0, 0, 1, 0, 1];
        echo.extend_from_slice(b"ping");
        let sum = reference_checksum(&[&echo]);
        echo[2..4].copy_from_slice(&sum.to_be_bytes());
        ipv4(1, 64, [192, 0, 2, 1], [198, 51, 100, 7], &echo)
    }

    /// Checks an ICMPv6 message's checksum with the pseudo-header.
    fn icmpv6_checksum_ok(p: &[u8]) -> bool {
        let len = ((p.len() - 40) as u32).to_be_bytes();
        reference_checksum(&[&p[8..40], &len, &[0, 0, 0, 58], &p[40..]]) == 0
    }

    #[test]
    fn parses_ipv4_udp() {
        let p = ipv4(17, 64, [192, 0, 2, 1], [198, 51, 100, 7], &udp_payload(20));
        let info = parse(&p).unwrap();
        assert_eq!(
            info,
            PacketInfo {
                version: 4,
                src: "192.0.2.1".parse().unwrap(),
                dst: "198.51.100.7".parse().unwrap(),
                protocol: 17,
                hop_limit: 64,
                total_len: 48,
                header_len: 20,
            }
        );
    }

    #[test]
    fn ipv4_header_errors() {
        let p = ipv4(17, 64, [192, 0, 2, 1], [198, 51, 100, 7], &udp_payload(4));
        assert_eq!(parse(&[]), Err(PacketError::Truncated));
        assert_eq!(parse(&p[..19]), Err(PacketError::Truncated));
        assert_eq!(parse(&p[..27]), Err(PacketError::LengthMismatch { declared: 32, actual: 27 }));
        let mut longer = p.clone();
        longer.push(0);
        assert!(matches!(parse(&longer), Err(PacketError::LengthMismatch { .. })));
        let mut bad_sum = p.clone();
        bad_sum[12] ^= 1;
        assert_eq!(parse(&bad_sum), Err(PacketError::BadChecksum));
        let mut ihl = p.clone();
        ihl[0] = 0x44;
        assert_eq!(parse(&ihl), Err(PacketError::BadHeaderLength));
        ihl[0] = 0x4f; // 60 bytes > 32
        assert_eq!(parse(&ihl), Err(PacketError::BadHeaderLength));
        let mut v = p.clone();
        v[0] = 0x55;
        assert_eq!(parse(&v), Err(PacketError::BadVersion(5)));
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let mut p = ipv4(17, 64, [192, 0, 2, 1], [198, 51, 100, 7], &[]);
        p[0] = 0x46;
        p.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        p.extend_from_slice(&udp_payload(0));
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let sum = reference_checksum(&[&p[..24]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let info = parse(&p).unwrap();
        assert_eq!((info.header_len, info.protocol), (24, 17));
    }

    #[test]
    fn parses_ipv6_fragment_and_destination_options_chain() {
        let p = v6_fragment_dstopts_udp(0);
        let info = parse(&p).unwrap();
        assert_eq!((info.version, info.protocol, info.header_len, info.hop_limit), (6, 17, 56, 64));
        assert_eq!(info.dst, "2001:db8::2".parse::<IpAddr>().unwrap());
        // A later fragment: the walk stops at the Fragment header.
        let later = v6_fragment_dstopts_udp(100);
        let info = parse(&later).unwrap();
        assert_eq!((info.protocol, info.header_len), (60, 48));
    }

    #[test]
    fn ipv6_chain_errors() {
        let p = v6_fragment_dstopts_udp(0);
        assert_eq!(parse(&p[..39]), Err(PacketError::Truncated));
        // Cut inside the Destination Options header, lengths kept consistent.
        let cut = ipv6(44, 64, "::1", "::2", &p[40..52]);
        assert_eq!(parse(&cut), Err(PacketError::TruncatedExtension));
        let cut = ipv6(44, 64, "::1", "::2", &p[40..48]);
        assert_eq!(parse(&cut), Err(PacketError::TruncatedExtension));
        // Hop-by-hop after another extension header.
        let hbh_late = ipv6(60, 64, "::1", "::2", &[0, 0, 1, 4, 0, 0, 0, 0, 59, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(parse(&hbh_late), Err(PacketError::MisplacedHopByHop));
        let hbh_first = ipv6(0, 64, "::1", "::2", &[59, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(parse(&hbh_first).unwrap().protocol, 59);
        // AH: Payload Len in 4-byte units minus 2 (12-byte header here).
        let mut ah = vec![6, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        ah.extend_from_slice(&[0; 20]);
        let info = parse(&ipv6(51, 64, "::1", "::2", &ah)).unwrap();
        assert_eq!((info.protocol, info.header_len), (6, 52));
        let mut wrong_len = ipv6(17, 64, "::1", "::2", &udp_payload(0));
        wrong_len[5] = 9;
        assert!(matches!(parse(&wrong_len), Err(PacketError::LengthMismatch { .. })));
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut p = ipv4(17, 64, [192, 0, 2, 1], [198, 51, 100, 7], &udp_payload(3));
        assert_eq!(decrement_hop_limit(&mut p), Ok(HopOutcome::Forward));
        assert_eq!(p[8], 63);
        assert_eq!(reference_checksum(&[&p[..20]]), 0);
        assert_eq!(parse(&p).unwrap().hop_limit, 63);
        // Every TTL, including ones whose checksum update carries.
        for ttl in 2..=255u8 {
            let mut p = ipv4(6, ttl, [10, 0, 0, 1], [255, 255, 255, 254], &[]);
            assert_eq!(decrement_hop_limit(&mut p), Ok(HopOutcome::Forward));
            assert!(parse(&p).is_ok(), "ttl {ttl}");
        }
    }

    #[test]
    fn expired_packets_are_untouched() {
        for ttl in [0, 1] {
            let mut p = ipv4(17, ttl, [192, 0, 2, 1], [198, 51, 100, 7], &[]);
            let before = p.clone();
            assert_eq!(decrement_hop_limit(&mut p), Ok(HopOutcome::Expired));
            assert_eq!(p, before);
        }
        let mut v6 = ipv6(17, 1, "::1", "::2", &udp_payload(0));
        assert_eq!(decrement_hop_limit(&mut v6), Ok(HopOutcome::Expired));
        let mut v6 = ipv6(17, 2, "::1", "::2", &udp_payload(0));
        assert_eq!(decrement_hop_limit(&mut v6), Ok(HopOutcome::Forward));
        assert_eq!(v6[7], 1);
        assert_eq!(decrement_hop_limit(&mut [0x45; 10]), Err(PacketError::Truncated));
        assert_eq!(decrement_hop_limit(&mut []), Err(PacketError::Truncated));
        assert_eq!(decrement_hop_limit(&mut [0x75; 40]), Err(PacketError::BadVersion(7)));
    }

    #[test]
    fn icmpv4_time_exceeded_about_udp() {
        let original = ipv4(17, 1, [192, 0, 2, 1], [198, 51, 100, 7], &udp_payload(20));
        let from: IpAddr = "203.0.113.1".parse().unwrap();
        let e = icmp_error(&original, from, IcmpError::TimeExceeded).unwrap();
        let info = parse(&e).unwrap();
        assert_eq!((info.protocol, info.src, info.dst), (1, from, "192.0.2.1".parse().unwrap()));
        assert_eq!(&e[20..22], &[11, 0]);
        assert_eq!(reference_checksum(&[&e[20..]]), 0);
        assert_eq!(&e[28..], &original[..]);
    }

    #[test]
    fn icmpv4_codes_and_quote_limit() {
        let original = ipv4(6, 64, [192, 0, 2, 1], [198, 51, 100, 7], &[0xab; 1400]);
        let from: IpAddr = "192.0.2.254".parse().unwrap();
        for (kind, tc) in [
            (IcmpError::PacketTooBig { mtu: 1280 }, [3, 4]),
            (IcmpError::AdminProhibited, [3, 13]),
            (IcmpError::NoRoute, [3, 0]),
            (IcmpError::SourcePolicy, [3, 13]),
            (IcmpError::TimeExceeded, [11, 0]),
        ] {
            let e = icmp_error(&original, from, kind).unwrap();
            assert_eq!(e.len(), 576, "{kind:?}");
            assert_eq!(&e[20..22], &tc);
            assert_eq!(reference_checksum(&[&e[20..]]), 0);
            assert_eq!(&e[28..], &original[..548]);
        }
        let e = icmp_error(&original, from, IcmpError::PacketTooBig { mtu: 1280 }).unwrap();
        assert_eq!(&e[24..28], &[0, 0, 0x05, 0x00]);
        let e = icmp_error(&original, from, IcmpError::PacketTooBig { mtu: 100_000 }).unwrap();
        assert_eq!(&e[26..28], &[0xff, 0xff]);
    }

    #[test]
    fn icmpv6_errors_with_pseudo_header_checksum() {
        let original = v6_fragment_dstopts_udp(0);
        let from: IpAddr = "2001:db8::ffff".parse().unwrap();
        for (kind, tc) in [
            (IcmpError::TimeExceeded, [3, 0]),
            (IcmpError::PacketTooBig { mtu: 1280 }, [2, 0]),
            (IcmpError::AdminProhibited, [1, 1]),
            (IcmpError::NoRoute, [1, 0]),
            (IcmpError::SourcePolicy, [1, 5]),
        ] {
            let e = icmp_error(&original, from, kind).unwrap();
            let info = parse(&e).unwrap();
            assert_eq!((info.protocol, info.src), (58, from));
            assert_eq!(info.dst, "2001:db8::1".parse::<IpAddr>().unwrap());
            assert_eq!(&e[40..42], &tc, "{kind:?}");
            assert!(icmpv6_checksum_ok(&e), "{kind:?}");
            assert_eq!(&e[48..], &original[..]);
        }
        let e = icmp_error(&original, from, IcmpError::PacketTooBig { mtu: 1400 }).unwrap();
        assert_eq!(&e[44..48], &1400u32.to_be_bytes());
        // A big original is cut so the error fits in 1280 bytes.
        let big = ipv6(17, 64, "2001:db8::1", "2001:db8::2", &udp_payload(3000));
        let e = icmp_error(&big, from, IcmpError::PacketTooBig { mtu: 1280 }).unwrap();
        assert_eq!(e.len(), 1280);
        assert!(icmpv6_checksum_ok(&e));
        assert_eq!(&e[48..], &big[..1232]);
    }

    #[test]
    fn no_icmp_errors_about_errors_or_odd_sources() {
        let v4from: IpAddr = "203.0.113.1".parse().unwrap();
        let v6from: IpAddr = "2001:db8::ffff".parse().unwrap();
        // An ICMP echo gets an error, an ICMP error does not.
        let echo = icmpv4_echo();
        assert!(parse(&echo).is_ok());
        assert!(icmp_error(&echo, v4from, IcmpError::TimeExceeded).is_some());
        let first_error = icmp_error(&echo, v4from, IcmpError::NoRoute).unwrap();
        assert_eq!(icmp_error(&first_error, v4from, IcmpError::TimeExceeded), None);
        let v6_error = icmp_error(&v6_fragment_dstopts_udp(0), v6from, IcmpError::NoRoute).unwrap();
        assert_eq!(icmp_error(&v6_error, v6from, IcmpError::TimeExceeded), None);
        let v6_echo = ipv6(58, 64, "2001:db8::1", "2001:db8::2", &[128, 0, 0, 0, 0, 1, 0, 1]);
        assert!(icmp_error(&v6_echo, v6from, IcmpError::TimeExceeded).is_some());
        let redirect = ipv6(58, 64, "2001:db8::1", "2001:db8::2", &[137, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(icmp_error(&redirect, v6from, IcmpError::TimeExceeded), None);
        // Sources that are not a single host, and broadcast/multicast
        // destinations (IPv4).
        for (src, dst) in [
            ([0, 0, 0, 0], [198, 51, 100, 7]),
            ([224, 0, 0, 1], [198, 51, 100, 7]),
            ([255, 255, 255, 255], [198, 51, 100, 7]),
            ([127, 0, 0, 1], [198, 51, 100, 7]),
            ([192, 0, 2, 1], [255, 255, 255, 255]),
            ([192, 0, 2, 1], [239, 1, 2, 3]),
        ] {
            let p = ipv4(17, 1, src, dst, &udp_payload(0));
            assert_eq!(icmp_error(&p, v4from, IcmpError::TimeExceeded), None, "{src:?} -> {dst:?}");
        }
        for src in ["::", "ff02::1"] {
            let p = ipv6(17, 1, src, "2001:db8::2", &udp_payload(0));
            assert_eq!(icmp_error(&p, v6from, IcmpError::TimeExceeded), None, "{src}");
        }
        // IPv6 multicast destination: only Packet Too Big.
        let mc = ipv6(17, 1, "2001:db8::1", "ff0e::1", &udp_payload(0));
        assert_eq!(icmp_error(&mc, v6from, IcmpError::NoRoute), None);
        assert!(icmp_error(&mc, v6from, IcmpError::PacketTooBig { mtu: 1280 }).is_some());
        // Non-first fragments, both versions.
        let mut frag4 = ipv4(17, 64, [192, 0, 2, 1], [198, 51, 100, 7], &[0; 16]);
        frag4[6..8].copy_from_slice(&[0x00, 0x10]);
        frag4[10..12].copy_from_slice(&[0, 0]);
        let sum = reference_checksum(&[&frag4[..20]]);
        frag4[10..12].copy_from_slice(&sum.to_be_bytes());
        assert!(parse(&frag4).is_ok());
        assert_eq!(icmp_error(&frag4, v4from, IcmpError::NoRoute), None);
        assert_eq!(icmp_error(&v6_fragment_dstopts_udp(100), v6from, IcmpError::NoRoute), None);
        // Family mismatch and unparseable input.
        assert_eq!(icmp_error(&echo, v6from, IcmpError::NoRoute), None);
        assert_eq!(icmp_error(&echo[..30], v4from, IcmpError::NoRoute), None);
    }
}

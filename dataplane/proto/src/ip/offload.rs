//! TUN offloads: the virtio-net header a TUN device opened with
//! `IFF_VNET_HDR` puts before every packet (`struct virtio_net_hdr`,
//! linux/virtio_net.h; virtio 1.x section 5.1.6), the segmentation of the
//! GSO packets such a device hands over once `TUNSETOFFLOAD` enabled TSO/USO
//! (one read carries up to 64 KiB of one flow), and the inverse for writes:
//! consecutive TCP segments of one flow coalesced into one GSO packet the
//! kernel segments again (what its own GRO does on a NIC).
//!
//! Both directions are exact inverses of the kernel's software
//! segmentation (`tcp_gso_segment`, `__udp_gso_segment`, `inet_gso_segment`):
//! every segment keeps the first one's headers except for the fields
//! segmentation rewrites (IPv4 Total Length, Identification + i, header
//! checksum; IPv6 Payload Length; TCP Sequence Number, checksum, PSH and
//! FIN only on the last segment; UDP Length and checksum). [`coalesce`]
//! only merges packets for which that holds, so splitting its output gives
//! back the same bytes; the round trip is a unit test and a fuzz target.
//!
//! Multi-byte fields are little-endian: the kernel uses the host's order
//! for legacy virtio-net headers unless told otherwise, and the dataplane
//! enables the offloads on little-endian hosts only.
#![forbid(unsafe_code)]

use super::packet::{finish, sum16};

/// Bytes of the header (`struct virtio_net_hdr`, without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds only the pseudo-header sum; the rest is to be added.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was already verified.
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO: IP fragmentation; never enabled here).
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO: one UDP datagram per segment).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: TCP with ECN (CWR on the first segment only).
pub const GSO_ECN: u8 = 0x80;

/// Most packets [`coalesce`] merges into one GSO packet.
pub const MAX_COALESCED: usize = 64;

/// Largest GSO packet [`coalesce`] builds (the IPv4 Total Length and IPv6
/// Payload Length fields are 16 bits; the kernel caps GSO at 64 KiB unless
/// BIG TCP is configured).
pub const MAX_GSO_BYTES: usize = 65_535;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// A virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHeader {
    /// `F_*` bits.
    pub flags: u8,
    /// `GSO_*`, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers every segment repeats (a hint; recomputed).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// The header of a plain packet: no offload, checksums complete.
    pub const PLAIN: Self =
        Self { flags: 0, gso_type: GSO_NONE, hdr_len: 0, gso_size: 0, csum_start: 0, csum_offset: 0 };

    /// Reads the header at the front of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, OffloadError> {
        let b = bytes.get(..VNET_HDR_LEN).ok_or(OffloadError::ShortHeader)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Why a packet read with a virtio-net header cannot be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The read was shorter than the header.
    #[error("read shorter than the virtio-net header")]
    ShortHeader,
    /// A GSO type this code does not know (or UFO, which is never enabled).
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    /// `csum_start + csum_offset` does not leave room for the checksum.
    #[error("checksum at {start}+{offset} is outside the {len}-byte packet")]
    ChecksumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The packet length.
        len: usize,
    },
    /// A GSO packet with a segment size of 0.
    #[error("GSO packet with segment size 0")]
    ZeroSegmentSize,
    /// The IP or transport header of a GSO packet is not what its GSO type
    /// says.
    #[error("GSO packet headers: {0}")]
    Headers(&'static str),
    /// A segment would not fit the output buffer.
    #[error("GSO segment of {0} bytes exceeds the output buffer")]
    SegmentTooLarge(usize),
}

/// The offset and length of a GSO packet's transport header.
struct Layout {
    v6: bool,
    l4: usize,
    l4_len: usize,
}

fn layout(hdr: &VnetHeader, packet: &[u8], protocol: u8) -> Result<Layout, OffloadError> {
    let version = packet.first().map(|b| b >> 4).ok_or(OffloadError::Headers("empty packet"))?;
    let l4 = match version {
        4 => {
            if packet.len() < 20 {
                return Err(OffloadError::Headers("IPv4 header truncated"));
            }
            if packet[9] != protocol {
                return Err(OffloadError::Headers("IPv4 protocol does not match the GSO type"));
            }
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
                return Err(OffloadError::Headers("IPv4 fragment"));
            }
            usize::from(packet[0] & 0x0f) * 4
        }
        6 => {
            // The kernel points csum_start past any extension headers; a
            // GSO packet without it must have the transport header next.
            if hdr.flags & F_NEEDS_CSUM != 0 {
                usize::from(hdr.csum_start)
            } else if packet.len() >= 40 && packet[6] == protocol {
                40
            } else {
                return Err(OffloadError::Headers("IPv6 transport header not found"));
            }
        }
        _ => return Err(OffloadError::Headers("not IPv4 or IPv6")),
    };
    if l4 < if version == 4 { 20 } else { 40 } {
        return Err(OffloadError::Headers("transport header inside the IP header"));
    }
    if hdr.flags & F_NEEDS_CSUM != 0 && usize::from(hdr.csum_start) != l4 {
        return Err(OffloadError::Headers("csum_start is not the transport header"));
    }
    let l4_len = if protocol == TCP {
        let doff = packet.get(l4 + 12).ok_or(OffloadError::Headers("TCP header truncated"))? >> 4;
        usize::from(doff) * 4
    } else {
        8
    };
    if l4_len < 8 || l4 + l4_len > packet.len() {
        return Err(OffloadError::Headers("transport header truncated"));
    }
    if protocol == TCP && l4_len < 20 {
        return Err(OffloadError::Headers("TCP data offset under 5"));
    }
    Ok(Layout { v6: version == 6, l4, l4_len })
}

/// The pseudo-header sum (RFC 793 / RFC 8200 section 8.1) of a transport
/// segment of `l4_len` bytes, unfolded.
fn pseudo_sum(packet: &[u8], v6: bool, protocol: u8, l4_len: usize) -> u32 {
    let acc = if v6 { sum16(&packet[8..40], 0) } else { sum16(&packet[12..20], 0) };
    let acc = sum16(&(l4_len as u32).to_be_bytes(), acc);
    sum16(&[0, protocol], acc)
}

/// Computes the transport checksum of `packet` (IP header, then the
/// transport segment at `l4`) and stores it at `l4 + at`. UDP's all-zero
/// result is sent as all ones (RFC 768).
fn store_l4_checksum(packet: &mut [u8], v6: bool, protocol: u8, l4: usize, at: usize) {
    packet[l4 + at..l4 + at + 2].fill(0);
    let acc = pseudo_sum(packet, v6, protocol, packet.len() - l4);
    let sum = match finish(sum16(&packet[l4..], acc)) {
        0 if protocol == UDP => 0xffff,
        s => s,
    };
    packet[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
}

fn store_ipv4_checksum(packet: &mut [u8]) {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    packet[10..12].fill(0);
    let sum = finish(sum16(&packet[..ihl], 0));
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Completes a checksum the kernel left partial (`F_NEEDS_CSUM` without
/// GSO): the field holds the pseudo-header sum, the rest of the segment
/// from `csum_start` is added (virtio 1.x section 5.1.6.2; the kernel's
/// `skb_checksum_help`, which also sends 0 as 0xffff).
fn complete_checksum(hdr: &VnetHeader, packet: &mut [u8]) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(OffloadError::ChecksumOutside {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len: packet.len(),
        });
    }
    let sum = match finish(sum16(&packet[start..], 0)) {
        0 => 0xffff,
        s => s,
    };
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Splits what a TUN read returned after its header into the IP packets it
/// stands for and hands each to `emit`, in order: a plain packet (its
/// checksum completed if the kernel left it partial) in place, GSO
/// segments built one at a time in `out`. Returns how many packets were
/// emitted.
pub fn split(
    hdr: &VnetHeader,
    packet: &mut [u8],
    out: &mut [u8],
    mut emit: impl FnMut(&mut [u8]),
) -> Result<usize, OffloadError> {
    let (protocol, v4_type) = match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(hdr, packet)?;
            }
            emit(packet);
            return Ok(1);
        }
        GSO_TCPV4 => (TCP, Some(true)),
        GSO_TCPV6 => (TCP, Some(false)),
        GSO_UDP_L4 => (UDP, None),
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    let gso = usize::from(hdr.gso_size);
    if gso == 0 {
        return Err(OffloadError::ZeroSegmentSize);
    }
    let lay = layout(hdr, packet, protocol)?;
    if v4_type.is_some_and(|v4| v4 == lay.v6) {
        return Err(OffloadError::Headers("IP version does not match the GSO type"));
    }
    let head = lay.l4 + lay.l4_len;
    let payload = packet.len() - head;
    if payload <= gso {
        // One segment: only the checksum (and lengths, already right).
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(hdr, packet)?;
        }
        emit(packet);
        return Ok(1);
    }
    if head + gso > out.len() {
        return Err(OffloadError::SegmentTooLarge(head + gso));
    }
    let segments = payload.div_ceil(gso);
    let (id0, seq0) = (
        u16::from_be_bytes([packet[4], packet[5]]),
        if protocol == TCP {
            u32::from_be_bytes(packet[lay.l4 + 4..lay.l4 + 8].try_into().expect("4 bytes"))
        } else {
            0
        },
    );
    for i in 0..segments {
        let chunk = &packet[head + i * gso..(head + (i + 1) * gso).min(packet.len())];
        let len = head + chunk.len();
        let seg = &mut out[..len];
        seg[..head].copy_from_slice(&packet[..head]);
        seg[head..].copy_from_slice(chunk);
        if lay.v6 {
            seg[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            store_ipv4_checksum(seg);
        }
        let l4 = lay.l4;
        if protocol == TCP {
            let seq = seq0.wrapping_add((i * gso) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < segments {
                seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[l4 + 13] &= !TCP_CWR;
            }
            store_l4_checksum(seg, lay.v6, TCP, l4, 16);
        } else {
            seg[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
            store_l4_checksum(seg, lay.v6, UDP, l4, 6);
        }
        emit(seg);
    }
    Ok(segments)
}

/// What [`coalesce`] needs to know of a TCP segment.
#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    /// IP header length (IPv4 without options: 20; IPv6: 40).
    ip_len: usize,
    /// TCP header length with options.
    tcp_len: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    id: u16,
}

impl Segment {
    fn head(&self) -> usize {
        self.ip_len + self.tcp_len
    }
}

/// A TCP segment [`coalesce`] may merge: IPv4 without options and not
/// fragmented or IPv6 without extension headers, lengths that match the
/// packet, valid checksums (the kernel would not check them again: the
/// merged packet's checksum is completed by the segmentation), payload,
/// and no SYN, RST, URG or CWR.
fn mergeable(packet: &[u8]) -> Option<Segment> {
    let v6 = match packet.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let ip_len = if v6 { 40 } else { 20 };
    if packet.len() < ip_len + 20 {
        return None;
    }
    if v6 {
        if packet[6] != TCP || usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 40 != packet.len() {
            return None;
        }
    } else if packet[0] & 0x0f != 5
        || packet[9] != TCP
        || usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len()
        || u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0
        || finish(sum16(&packet[..20], 0)) != 0
    {
        return None;
    }
    let tcp_len = usize::from(packet[ip_len + 12] >> 4) * 4;
    let flags = packet[ip_len + 13];
    if tcp_len < 20
        || ip_len + tcp_len >= packet.len()
        || flags & (TCP_SYN | TCP_RST | TCP_URG | TCP_CWR) != 0
    {
        return None;
    }
    let l4 = &packet[ip_len..];
    if finish(sum16(l4, pseudo_sum(packet, v6, TCP, l4.len()))) != 0 {
        return None;
    }
    Some(Segment {
        v6,
        ip_len,
        tcp_len,
        payload: packet.len() - ip_len - tcp_len,
        seq: u32::from_be_bytes(l4[4..8].try_into().ok()?),
        flags,
        id: u16::from_be_bytes([packet[4], packet[5]]),
    })
}

/// Whether `next` can follow `last` in a group opened by `first`: same
/// flow and headers but for what segmentation rewrites, the next sequence
/// number, the IPv4 Identification + 1, and a payload no larger than the
/// group's segment size.
fn continues(first: &[u8], f: &Segment, last: &Segment, next: &[u8], n: &Segment) -> bool {
    if n.v6 != f.v6 || n.tcp_len != f.tcp_len || n.payload > f.payload {
        return false;
    }
    // The group's segments but the last carry exactly the segment size and
    // neither PSH nor FIN.
    if last.payload != f.payload || last.flags & (TCP_PSH | TCP_FIN) != 0 {
        return false;
    }
    if n.seq != last.seq.wrapping_add(last.payload as u32) {
        return false;
    }
    if (n.flags & !(TCP_PSH | TCP_FIN)) != (f.flags & !(TCP_PSH | TCP_FIN)) {
        return false;
    }
    let same_ip = if f.v6 {
        first[..4] == next[..4] && first[6..40] == next[6..40]
    } else {
        first[..2] == next[..2]
            && first[6..10] == next[6..10]
            && first[12..20] == next[12..20]
            && n.id == last.id.wrapping_add(1)
    };
    let t = f.ip_len;
    // Ports, acknowledgment, data offset, window, urgent pointer, options.
    same_ip
        && first[t..t + 4] == next[t..t + 4]
        && first[t + 8..t + 13] == next[t + 8..t + 13]
        && first[t + 14..t + 16] == next[t + 14..t + 16]
        && first[t + 18..t + f.tcp_len] == next[t + 18..t + f.tcp_len]
}

/// The headers of a GSO packet merging `count` segments of `total_payload`
/// bytes that start like `first`, written into `head`; returns its
/// virtio-net header. The TCP checksum holds the pseudo-header sum, as
/// `F_NEEDS_CSUM` wants.
fn merged_head(
    first: &[u8],
    f: &Segment,
    total_payload: usize,
    last_flags: u8,
    head: &mut [u8],
) -> VnetHeader {
    let h = f.head();
    head[..h].copy_from_slice(&first[..h]);
    let len = h + total_payload;
    if f.v6 {
        head[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        store_ipv4_checksum(&mut head[..20]);
    }
    head[f.ip_len + 13] |= last_flags & (TCP_PSH | TCP_FIN);
    let l4_len = len - f.ip_len;
    let psum = pseudo_sum(head, f.v6, TCP, l4_len);
    let folded = !finish(psum);
    head[f.ip_len + 16..f.ip_len + 18].copy_from_slice(&folded.to_be_bytes());
    VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: if f.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: h as u16,
        gso_size: f.payload as u16,
        csum_start: f.ip_len as u16,
        csum_offset: 16,
    }
}

/// Room [`coalesce`] needs for the rewritten headers of one GSO packet
/// (IPv6 40 + TCP with options 60).
pub const HEAD_ROOM: usize = 100;

/// One TUN write planned by [`coalesce`]: the virtio-net header, then
/// `head` (rewritten headers; empty for a packet sent as it is), then each
/// of `packets` from byte `skip` on.
#[derive(Debug, Clone, Copy)]
pub struct TunWrite<'a> {
    /// The virtio-net header to send first.
    pub header: VnetHeader,
    /// The merged packet's headers (empty when `packets` is one packet sent
    /// whole).
    pub head: &'a [u8],
    /// The packets this write carries.
    pub packets: &'a [&'a [u8]],
    /// Bytes of each packet replaced by `head` (its own headers).
    pub skip: usize,
}

impl<'a> TunWrite<'a> {
    /// The pieces of the packet after the virtio-net header, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        std::iter::once(self.head)
            .filter(|h| !h.is_empty())
            .chain(self.packets.iter().map(|p| &p[self.skip..]))
    }
}

/// Writes `packets` (in order) as few TUN writes as the kernel's GRO rules
/// allow: runs of consecutive TCP segments of one flow become one GSO
/// packet (headers rewritten in a scratch buffer, payloads referenced in
/// place), everything else goes as it is; `write` gets each.
pub fn coalesce<'a>(packets: &'a [&'a [u8]], mut write: impl FnMut(&TunWrite<'_>)) {
    let mut head = [0u8; HEAD_ROOM];
    let plain =
        |at: usize| TunWrite { header: VnetHeader::PLAIN, head: &[], packets: &packets[at..at + 1], skip: 0 };
    let mut i = 0;
    while i < packets.len() {
        let first = packets[i];
        let Some(f) = mergeable(first) else {
            write(&plain(i));
            i += 1;
            continue;
        };
        let (mut last, mut end, mut total) = (f, i + 1, f.payload);
        while end < packets.len() && end - i < MAX_COALESCED {
            let next = packets[end];
            let Some(n) = mergeable(next) else { break };
            if f.head() + total + n.payload > MAX_GSO_BYTES || !continues(first, &f, &last, next, &n) {
                break;
            }
            total += n.payload;
            last = n;
            end += 1;
        }
        if end == i + 1 {
            write(&plain(i));
        } else {
            let header = merged_head(first, &f, total, last.flags, &mut head);
            write(&TunWrite { header, head: &head[..f.head()], packets: &packets[i..end], skip: f.head() });
        }
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP segment with valid checksums.
    fn tcp(v6: bool, id: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let tcp_len = 32; // with 12 bytes of options (timestamps)
        let len = ip_len + tcp_len + payload.len();
        let mut p = vec![0u8; len];
        if v6 {
            p[0] = 0x60;
            p[1] = 0x01; // flow label bits
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p[24..40].copy_from_slice(&"fd01::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = TCP;
            p[12..16].copy_from_slice(&[10, 0, 0, 2]);
            p[16..20].copy_from_slice(&[10, 1, 0, 9]);
            store_ipv4_checksum(&mut p);
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p[t + 32..].copy_from_slice(payload);
        store_l4_checksum(&mut p, v6, TCP, t, 16);
        p
    }

    fn flow(v6: bool, sizes: &[usize], last_flags: u8) -> Vec<Vec<u8>> {
        let mut seq = 1000u32;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let payload: Vec<u8> = (0..n).map(|b| (b + i * 7) as u8).collect();
                let flags = if i + 1 == sizes.len() { 0x10 | last_flags } else { 0x10 };
                let p = tcp(v6, 300 + i as u16, seq, flags, &payload);
                seq = seq.wrapping_add(n as u32);
                p
            })
            .collect()
    }

    /// Coalesces, then splits every write again as the kernel would.
    fn round_trip(packets: &[Vec<u8>]) -> (Vec<Vec<u8>>, usize) {
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        let mut writes = 0;
        coalesce(&refs, |w| {
            writes += 1;
            let count = w.packets.len();
            let mut whole: Vec<u8> = w.pieces().collect::<Vec<_>>().concat();
            let hdr = VnetHeader::decode(&w.header.encode()).unwrap();
            let mut seg = vec![0u8; 65_536];
            let mut got = 0;
            split(&hdr, &mut whole, &mut seg, |p| {
                out.push(p.to_vec());
                got += 1;
            })
            .unwrap();
            assert_eq!(got, count);
        });
        (out, writes)
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = VnetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 1208,
            csum_start: 40,
            csum_offset: 16,
        };
        let b = h.encode();
        assert_eq!(&b[2..4], &[0x02, 0x01]);
        assert_eq!(VnetHeader::decode(&b).unwrap(), h);
        assert_eq!(VnetHeader::decode(&b[..9]), Err(OffloadError::ShortHeader));
    }

    #[test]
    fn a_flow_becomes_one_write_and_splits_back_byte_for_byte() {
        for v6 in [false, true] {
            let packets = flow(v6, &[1200, 1200, 1200, 700], TCP_PSH);
            let (out, writes) = round_trip(&packets);
            assert_eq!(writes, 1, "v6={v6}");
            assert_eq!(out, packets, "v6={v6}");
        }
    }

    #[test]
    fn runs_end_where_the_rules_say() {
        // A short segment ends a run; the next full one starts another.
        let mut p = flow(false, &[1000, 1000, 500], 0);
        p.extend(flow(false, &[1000, 1000], 0).into_iter().map(|mut q| {
            // Another flow (ports differ): fix the checksum after the edit.
            q[20] = 0x9d;
            store_l4_checksum(&mut q, false, TCP, 20, 16);
            q
        }));
        let (out, writes) = round_trip(&p);
        assert_eq!(out, p);
        assert_eq!(writes, 2);

        // PSH in the middle ends the run after it.
        let mut p = flow(true, &[800, 800, 800, 800], 0);
        p[1][40 + 13] |= TCP_PSH;
        store_l4_checksum(&mut p[1], true, TCP, 40, 16);
        let (out, writes) = round_trip(&p);
        assert_eq!((out.as_slice(), writes), (p.as_slice(), 2));
    }

    #[test]
    fn gaps_bad_checksums_and_odd_packets_go_alone() {
        // A sequence gap.
        let mut p = flow(false, &[900, 900, 900], 0);
        p[2] = tcp(false, 302, 1000 + 900 * 2 + 1, 0x10, &[5; 900]);
        assert_eq!(round_trip(&p).1, 2);
        // A bad TCP checksum is never merged (the kernel would fix it).
        let mut p = flow(false, &[900, 900, 900], 0);
        p[1][60] ^= 0xff;
        let (out, writes) = round_trip(&p);
        assert_eq!((out, writes), (p.clone(), 3));
        // IPv4 Identification not consecutive.
        let mut p = flow(false, &[900, 900], 0);
        p[1][5] = p[1][5].wrapping_add(3);
        store_ipv4_checksum(&mut p[1]);
        assert_eq!(round_trip(&p).1, 2);
        // SYN, pure ACKs (no payload), UDP and garbage pass through untouched.
        let syn = tcp(false, 1, 1, TCP_SYN, &[]);
        let ack = tcp(true, 1, 1, 0x10, &[]);
        let junk = vec![0x45, 0, 0];
        let p = vec![syn, ack.clone(), ack, junk];
        let (out, writes) = round_trip_plain(&p);
        assert_eq!((out, writes), (p, 4));
    }

    /// Like round_trip, for inputs split cannot parse (garbage).
    fn round_trip_plain(packets: &[Vec<u8>]) -> (Vec<Vec<u8>>, usize) {
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        coalesce(&refs, |w| {
            assert_eq!((w.header, w.packets.len()), (VnetHeader::PLAIN, 1));
            out.push(w.pieces().collect::<Vec<_>>().concat());
        });
        let n = out.len();
        (out, n)
    }

    #[test]
    fn groups_are_bounded() {
        let p = flow(false, &[1200; 100], 0);
        let (out, writes) = round_trip(&p);
        assert_eq!(out, p);
        // 54 payloads of 1200 bytes fit under 64 KiB, 55 do not.
        assert_eq!(writes, 2);
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        coalesce(&refs, |w| {
            assert!(w.packets.len() <= MAX_COALESCED);
            assert!(w.pieces().map(<[u8]>::len).sum::<usize>() <= MAX_GSO_BYTES);
        });
        let small = flow(true, &[100; 200], 0);
        let refs: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
        let mut counts = Vec::new();
        coalesce(&refs, |w| counts.push(w.packets.len()));
        assert_eq!(counts, vec![64, 64, 64, 8]);
    }

    #[test]
    fn partial_checksums_are_completed() {
        let mut p = tcp(false, 9, 5, 0x18, b"hello world");
        let want = p.clone();
        // What the kernel hands over with NEEDS_CSUM: the pseudo-header sum.
        let psum = !finish(pseudo_sum(&p, false, TCP, p.len() - 20));
        p[36..38].copy_from_slice(&psum.to_be_bytes());
        let hdr = VnetHeader { flags: F_NEEDS_CSUM, csum_start: 20, csum_offset: 16, ..VnetHeader::PLAIN };
        let mut got = Vec::new();
        assert_eq!(split(&hdr, &mut p, &mut [], |x| got.push(x.to_vec())), Ok(1));
        assert_eq!(got, vec![want]);
        let bad = VnetHeader { csum_offset: 60, ..hdr };
        assert!(matches!(split(&bad, &mut p, &mut [], |_| {}), Err(OffloadError::ChecksumOutside { .. })));
    }

    #[test]
    fn udp_segmentation_gives_one_datagram_per_segment() {
        // A UDP GSO packet of three 500-byte datagrams over IPv6.
        let payload: Vec<u8> = (0..1300u32).map(|b| b as u8).collect();
        let len = 48 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = UDP;
        p[7] = 64;
        p[23] = 1;
        p[39] = 2;
        p[40..42].copy_from_slice(&4000u16.to_be_bytes());
        p[42..44].copy_from_slice(&53u16.to_be_bytes());
        p[48..].copy_from_slice(&payload);
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 48,
            gso_size: 500,
            csum_start: 40,
            csum_offset: 6,
        };
        let mut seg = vec![0u8; 2048];
        let mut got = Vec::new();
        assert_eq!(split(&hdr, &mut p, &mut seg, |x| got.push(x.to_vec())), Ok(3));
        let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![548, 548, 348]);
        for (i, d) in got.iter().enumerate() {
            let info = crate::ip::packet::parse(d).unwrap();
            assert_eq!(info.total_len, d.len());
            assert_eq!(usize::from(u16::from_be_bytes([d[44], d[45]])), d.len() - 40);
            assert_eq!(&d[48..], &payload[i * 500..(i * 500 + 500).min(1300)]);
            let l4 = &d[40..];
            assert_eq!(finish(sum16(l4, pseudo_sum(d, true, UDP, l4.len()))), 0, "segment {i} checksum");
        }
    }

    #[test]
    fn malformed_gso_packets_are_refused_not_panics() {
        let p = tcp(false, 1, 1, 0x10, &[0; 3000]);
        let base = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut seg = vec![0u8; 1100];
        let cases = [
            (VnetHeader { gso_size: 0, ..base }, OffloadError::ZeroSegmentSize),
            (VnetHeader { gso_type: GSO_UDP, ..base }, OffloadError::UnsupportedGso(GSO_UDP)),
            (
                VnetHeader { gso_type: GSO_TCPV6, ..base },
                OffloadError::Headers("IP version does not match the GSO type"),
            ),
            (
                VnetHeader { csum_start: 24, ..base },
                OffloadError::Headers("csum_start is not the transport header"),
            ),
            (
                VnetHeader { gso_type: GSO_UDP_L4, ..base },
                OffloadError::Headers("IPv4 protocol does not match the GSO type"),
            ),
            (VnetHeader { gso_size: 2000, ..base }, OffloadError::SegmentTooLarge(2052)),
        ];
        for (hdr, want) in cases {
            let mut q = p.clone();
            assert_eq!(split(&hdr, &mut q, &mut seg, |_| {}), Err(want), "{hdr:?}");
        }
        // Truncated reads: headers cut short are refused; with the headers
        // whole, one segment or two.
        for cut in 0..=p.len() {
            let mut q = p[..cut].to_vec();
            let got = split(&base, &mut q, &mut seg, |_| {});
            match cut {
                0..52 => assert!(got.is_err(), "cut {cut}: {got:?}"),
                52..=1052 => assert_eq!(got, Ok(1), "cut {cut}"),
                1053..=2052 => assert_eq!(got, Ok(2), "cut {cut}"),
                _ => assert_eq!(got, Ok(3), "cut {cut}"),
            }
        }
    }

    #[test]
    fn segmentation_rewrites_what_the_kernel_rewrites() {
        // One TCP GSO packet as the kernel would hand it over (PSH|FIN on
        // the super-packet): PSH and FIN only on the last segment.
        let packets = flow(false, &[1000, 1000, 1000], TCP_PSH | TCP_FIN);
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut writes = Vec::new();
        coalesce(&refs, |w| writes.push((w.header, w.pieces().collect::<Vec<_>>().concat())));
        // FIN on the last packet: merged as the group's end.
        assert_eq!(writes.len(), 1);
        let (hdr, whole) = &writes[0];
        assert_eq!(whole[20 + 13], 0x10 | TCP_PSH | TCP_FIN);
        assert_eq!((hdr.gso_type, hdr.gso_size, hdr.csum_start), (GSO_TCPV4, 1000, 20));
        let mut seg = vec![0u8; 1100];
        let mut flags = Vec::new();
        split(hdr, &mut whole.clone(), &mut seg, |p| flags.push(p[33])).unwrap();
        assert_eq!(flags, vec![0x10, 0x10, 0x10 | TCP_PSH | TCP_FIN]);
    }
}

//! TUN offloads on arbitrary bytes. Mode 0: a TUN read (virtio-net header
//! and packet) is split without panics, into segments no larger than the
//! header plus the segment size. Mode 1: length-prefixed packets are
//! coalesced and every planned write splits back into exactly the packets
//! it carries (checksums compared as numbers: 0x0000 and 0xffff are the
//! same one's-complement zero).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::ip::offload::{self, VNET_HDR_LEN, VnetHeader};

fn canonical(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    let fix = |p: &mut Vec<u8>, at: usize| {
        if p.get(at..at + 2) == Some(&[0xff, 0xff]) {
            p[at] = 0;
            p[at + 1] = 0;
        }
    };
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            fix(&mut p, 10);
            fix(&mut p, 20 + 16);
        }
        Some(6) => fix(&mut p, 40 + 16),
        _ => {}
    }
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let mut out = vec![0u8; 65_536];
    if mode & 1 == 0 {
        let Ok(hdr) = VnetHeader::decode(data) else { return };
        let mut packet = data[VNET_HDR_LEN..].to_vec();
        let limit = packet.len().max(usize::from(hdr.gso_size) + 160);
        let mut count = 0;
        if let Ok(n) = offload::split(&hdr, &mut packet, &mut out, |seg| {
            assert!(seg.len() <= limit);
            count += 1;
        }) {
            assert_eq!(n, count);
        }
        return;
    }
    let mut packets = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && packets.len() < 200 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]) % 2048);
        rest = &rest[2..];
        let take = len.min(rest.len());
        packets.push(&rest[..take]);
        rest = &rest[take..];
    }
    let mut seen = 0;
    offload::coalesce(&packets, |w| {
        assert!(w.packets.len() <= offload::MAX_COALESCED);
        let mut whole: Vec<u8> = w.pieces().flat_map(|p| p.iter().copied()).collect();
        assert!(whole.len() <= offload::MAX_GSO_BYTES || w.packets.len() == 1);
        if w.header == VnetHeader::PLAIN {
            assert_eq!(w.packets.len(), 1);
            assert_eq!(whole, w.packets[0]);
        } else {
            let mut got = Vec::new();
            let n = offload::split(&w.header, &mut whole, &mut out, |seg| got.push(canonical(seg)))
                .expect("a coalesced write splits");
            assert_eq!(n, w.packets.len());
            let want: Vec<Vec<u8>> = w.packets.iter().map(|p| canonical(p)).collect();
            assert_eq!(got, want);
        }
        seen += w.packets.len();
    });
    assert_eq!(seen, packets.len());
});

//! QUIC-LB connection IDs: decoding arbitrary bytes as a DCID or a whole
//! datagram never panics, a `Worker` claim is only made for bytes that are
//! exactly a CID of that layout, generate-then-decode returns the worker,
//! and layout validation on arbitrary parameters never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::cid::{CidLayout, Decoded, MAX_CID_LEN};

fn check(layout: &CidLayout, data: &[u8]) {
    if let Decoded::Worker(worker) = layout.decode(data) {
        assert_eq!(data.len(), layout.cid_len());
        assert_eq!(data[0], layout.first_octet());
        assert_eq!(&data[1..layout.worker_offset()], layout.server_id_prefix());
        assert_eq!(data[layout.worker_offset()], worker);
        // The claimed CID is what the layout generates for that nonce.
        let again = layout.generate(worker, &data[layout.worker_offset() + 1..]).expect("nonce length");
        assert_eq!(again.as_bytes(), data);
    }
    let _ = layout.decode_datagram(data);

    // Round trip with the input as worker byte and nonce material.
    let (worker, rest) = data.split_first().map_or((0, &[][..]), |(w, r)| (*w, r));
    let nonce: Vec<u8> = (0..layout.nonce_len()).map(|i| rest.get(i).copied().unwrap_or(0)).collect();
    let cid = layout.generate(worker, &nonce).expect("nonce of the layout's length");
    assert!(cid.len() <= MAX_CID_LEN);
    assert_eq!(layout.decode(&cid), Decoded::Worker(worker));
    let mut short = vec![0x40];
    short.extend_from_slice(&cid);
    short.extend_from_slice(rest);
    assert_eq!(layout.decode_datagram(&short), Decoded::Worker(worker));
}

fuzz_target!(|data: &[u8]| {
    let layouts = [
        CidLayout::single_host(),
        CidLayout::new(3, &[0xab, 0xcd], 6).expect("valid"),
        CidLayout::new(6, &[0x11; 14], 4).expect("valid"),
        CidLayout::new(1, &[], 18).expect("valid"),
    ];
    for layout in &layouts {
        check(layout, data);
    }
    // Layout parameters from the input: config id, prefix length, nonce
    // length, then the prefix bytes and the CID to decode.
    if let [config_id, prefix_len, nonce_len, rest @ ..] = data {
        let (prefix, tail) = rest.split_at(usize::from(*prefix_len).min(rest.len()));
        if let Ok(layout) = CidLayout::new(*config_id, prefix, usize::from(*nonce_len)) {
            assert!(layout.config_id() <= 6);
            assert!(layout.cid_len() <= MAX_CID_LEN);
            assert!(layout.nonce_len() >= 4);
            check(&layout, tail);
        }
    }
});

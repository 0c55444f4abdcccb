//! QUIC-LB connection IDs, the relay's side: decoding arbitrary bytes as a
//! DCID or a whole datagram never panics under plaintext, single-pass and
//! four-pass layouts, nor under a rotating set of configurations; a
//! `Worker` claim is only made for bytes that are exactly a CID of that
//! layout whose plaintext starts with the host ID; generate-then-decode
//! returns the worker; layout and configuration validation on arbitrary
//! parameters never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::cid::{
    CidCodec, CidConfigs, CidKey, CidLayout, Decoded, LbConfig, MAX_CID_LEN, UnroutableCids,
};

const KEY: CidKey = CidKey::new([
    0x8f, 0x95, 0xf0, 0x92, 0x45, 0x76, 0x5f, 0x80, 0x25, 0x69, 0x34, 0xe5, 0x0c, 0x66, 0x20, 0x7f,
]);

fn encrypted(config_id: u8, host_id: &[u8], nonce_len: usize) -> CidLayout {
    let config = LbConfig::new(config_id, host_id.len(), nonce_len, Some(KEY)).expect("valid");
    CidLayout::from_lb_config(&config, host_id).expect("valid")
}

fn check(layout: &CidLayout, data: &[u8]) {
    if let Decoded::Worker(worker) = layout.decode(data) {
        assert_eq!(data.len(), layout.cid_len());
        assert_eq!(data[0], layout.first_octet());
        // The claimed CID's plaintext is host ID, worker, random, and the
        // layout generates exactly it from that random part.
        let plain = CidCodec::new(*layout.lb_config()).decode(data).expect("claimed CIDs decode");
        let block = [plain.server_id().as_bytes(), plain.nonce()].concat();
        let h = layout.host_id().len();
        assert_eq!(&block[..h], layout.host_id());
        assert_eq!(block[h], worker);
        let again = layout.generate(worker, &block[h + 1..]).expect("random length");
        assert_eq!(again.as_bytes(), data);
    }
    let _ = layout.decode_datagram(data);

    // Round trip with the input as worker byte and random material.
    let (worker, rest) = data.split_first().map_or((0, &[][..]), |(w, r)| (*w, r));
    let random: Vec<u8> = (0..layout.random_len()).map(|i| rest.get(i).copied().unwrap_or(0)).collect();
    let cid = layout.generate(worker, &random).expect("random of the layout's length");
    assert!(cid.len() <= MAX_CID_LEN);
    assert_eq!(layout.decode(&cid), Decoded::Worker(worker));
    if let Some(at) = layout.steerable() {
        assert_eq!(cid[at], worker);
    }
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
        encrypted(0, &[0xab, 0xcd, 0xef], 13),
        encrypted(2, &[0xab, 0xcd], 6),
        encrypted(5, &[0x5a], 18),
        encrypted(4, &[1, 2, 3, 4, 5, 6, 7], 5),
    ];
    for layout in &layouts {
        check(layout, data);
    }

    // A rotating pair of configurations, then none.
    let mut configs = CidConfigs::new(layouts[1].clone());
    let _ = configs.decode(data);
    let _ = configs.decode_datagram(data);
    configs.rotate(layouts[5].clone()).expect("codepoints differ");
    if let Decoded::Worker(_) = configs.decode(data) {
        let layout = configs.layout_for(data[0]).expect("a live layout claimed it");
        assert_eq!(data.len(), layout.cid_len());
    }
    let _ = configs.decode_datagram(data);
    let unconfigured = CidConfigs::unconfigured(UnroutableCids::default());
    assert_eq!(unconfigured.decode(data), Decoded::Foreign);
    assert_eq!(unconfigured.decode_datagram(data), Decoded::Foreign);

    // Layout parameters from the input: config id, host ID length, nonce
    // length, keyed or not, then the host ID and the CID to decode.
    if let [config_id, host_len, nonce_len, keyed, rest @ ..] = data {
        let (host, tail) = rest.split_at(usize::from(*host_len).min(rest.len()));
        if let Ok(layout) = CidLayout::new(*config_id, host, usize::from(*nonce_len)) {
            assert!(layout.config_id() <= 6);
            assert!(layout.cid_len() <= MAX_CID_LEN);
            assert!(layout.random_len() >= 4);
            check(&layout, tail);
        }
        let key = (keyed & 1 == 1).then_some(KEY);
        if let Ok(config) = LbConfig::new(*config_id, host.len(), usize::from(*nonce_len), key) {
            if let Ok(layout) = CidLayout::from_lb_config(&config, host) {
                assert_eq!(layout.lb_config(), &config);
                check(&layout, tail);
            }
        }
    }
});

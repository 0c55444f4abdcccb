//! QUIC-LB connection IDs, the load balancer's side: with configurations
//! (lengths, codepoint and key) taken from the input, extracting the server
//! ID from arbitrary bytes as a DCID or a datagram never panics and any
//! server ID found has the configuration's length; encoding the input's
//! server ID and nonce then decoding returns them, for the balancer and the
//! codec alike.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::cid::lb::LbDecoder;
use relay_proto::cid::{CidCodec, CidKey, KEY_LEN, LbConfig, config_id_of};

fuzz_target!(|data: &[u8]| {
    // Parameters: config id, server ID length, nonce length, keyed, key,
    // then the bytes to decode.
    let [config_id, sid_len, nonce_len, keyed, rest @ ..] = data else { return };
    let (key, tail) = if keyed & 1 == 1 && rest.len() >= KEY_LEN {
        let (k, t) = rest.split_at(KEY_LEN);
        (Some(CidKey::new(k.try_into().expect("16 bytes"))), t)
    } else {
        (None, rest)
    };
    let Ok(config) =
        LbConfig::new(config_id % 8, usize::from(sid_len % 17), usize::from(nonce_len % 20), key)
    else {
        return;
    };
    let mut lb = LbDecoder::new(config);
    // A second, fixed configuration on another codepoint.
    let other =
        LbConfig::new((config.config_id() + 1) % 7, 8, 8, Some(CidKey::new([0x42; KEY_LEN]))).expect("valid");
    lb.insert(other);
    let strict = lb.clone().check_self_described_length(true);
    for d in [&lb, &strict] {
        if let Ok(sid) = d.server_id(tail) {
            let c = d.config(config_id_of(tail[0])).expect("a configuration decoded it");
            assert_eq!(sid.len(), c.server_id_len());
            assert!(tail.len() >= c.cid_len());
        }
        let _ = d.route_datagram(tail);
    }

    // Round trip with the input as server ID and nonce.
    let codec = CidCodec::new(config);
    let sid: Vec<u8> = (0..config.server_id_len()).map(|i| tail.get(i).copied().unwrap_or(1)).collect();
    let nonce: Vec<u8> =
        (0..config.nonce_len()).map(|i| tail.get(config.server_id_len() + i).copied().unwrap_or(0)).collect();
    let cid = codec.encode(&sid, &nonce).expect("lengths of the configuration");
    assert_eq!(cid.len(), config.cid_len());
    assert_eq!(cid[0], config.first_octet());
    for d in [&lb, &strict] {
        assert_eq!(d.server_id(&cid).expect("routable").as_bytes(), &sid[..]);
    }
    let plain = codec.decode(&cid).expect("decodes");
    assert_eq!(plain.server_id().as_bytes(), &sid[..]);
    assert_eq!(plain.nonce(), &nonce[..]);
});

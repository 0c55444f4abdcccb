//! Uncompressed bound-UDP datagram payloads: decoding never panics, and a
//! decoded payload re-encodes to the very same bytes (the format has one
//! encoding per value).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::bind;

fuzz_target!(|data: &[u8]| {
    let Ok((peer, udp)) = bind::decode_uncompressed(data) else { return };
    let mut out = Vec::new();
    bind::encode_uncompressed(peer, udp, &mut out);
    assert_eq!(out, data);
    assert_eq!(bind::decode_uncompressed(&out), Ok((peer, udp)));
});

//! HTTP/3 datagram framing: decoding never panics, and a decoded datagram
//! re-encodes to a frame that decodes to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::{datagram, varint};

fuzz_target!(|data: &[u8]| {
    let _ = varint::decode(data);
    if let Ok(d) = datagram::decode(data) {
        let mut out = Vec::new();
        datagram::encode_into(d.stream_id, d.context_id, d.payload, &mut out);
        let again = datagram::decode(&out).expect("re-encoded datagram decodes");
        assert_eq!(
            (again.stream_id, again.context_id, again.payload),
            (d.stream_id, d.context_id, d.payload)
        );
    }
});

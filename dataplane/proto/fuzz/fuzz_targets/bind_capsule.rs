//! Bound-UDP capsule values (COMPRESSION_ASSIGN, _ACK, _CLOSE and their
//! neighbours): decoding never panics, other types are left alone, and
//! whatever decodes encodes back to a capsule that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::bind::{self, BIND_CAPSULES};
use relay_proto::varint;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, value)) = data.split_first() else { return };
    // 0x10..=0x14: the three bind types and one on either side.
    let capsule_type = 0x10 + u64::from(selector % 5);
    let decoded = match bind::decode_capsule(capsule_type, value) {
        Ok(Some(c)) => c,
        Ok(None) => {
            assert!(!BIND_CAPSULES.contains(&capsule_type));
            return;
        }
        Err(_) => return,
    };
    assert!(BIND_CAPSULES.contains(&capsule_type));
    let mut out = Vec::new();
    bind::encode_capsule(&decoded, &mut out);
    let (t, tl) = varint::decode(&out).expect("type varint");
    let (len, ll) = varint::decode(&out[tl..]).expect("length varint");
    assert_eq!(t, capsule_type);
    assert_eq!(len as usize, out.len() - tl - ll);
    let again = bind::decode_capsule(t, &out[tl + ll..]).expect("re-encoded capsule decodes");
    assert_eq!(again, Some(decoded));
});

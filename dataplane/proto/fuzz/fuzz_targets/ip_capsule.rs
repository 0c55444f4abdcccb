//! connect-ip capsule values of every type: decoding never panics, and
//! whatever decodes encodes back to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::ip::capsule::{self, IpCapsule};
use relay_proto::varint;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, value)) = data.split_first() else { return };
    // 1..=3 are connect-ip's; anything else must be left to the caller.
    let capsule_type = u64::from(selector % 5);
    let Ok(Some(decoded)) = capsule::decode(capsule_type, value) else { return };
    let mut out = Vec::new();
    capsule::encode(&decoded, &mut out);
    let (t, tl) = varint::decode(&out).expect("type varint");
    let (len, ll) = varint::decode(&out[tl..]).expect("length varint");
    assert_eq!(t, capsule_type);
    assert_eq!(len as usize, out.len() - tl - ll);
    let again: Option<IpCapsule> = capsule::decode(t, &out[tl + ll..]).expect("re-encoded capsule decodes");
    assert_eq!(again, Some(decoded));
});

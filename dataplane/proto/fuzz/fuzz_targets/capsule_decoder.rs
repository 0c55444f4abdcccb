//! The capsule decoder must never panic, and splitting the same bytes at
//! any points must not change what it decodes. The same holds for the
//! boundary tracker a WebTransport relay follows the origin's capsules
//! with (`Boundaries`): never a panic, the same answer however the bytes
//! are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::capsule::{Boundaries, Capsule, CapsuleDecoder};

fn decode(chunks: &[&[u8]]) -> (Vec<Capsule>, Result<(), relay_proto::capsule::CapsuleError>) {
    let mut d = CapsuleDecoder::new(1024);
    let mut out = Vec::new();
    for c in chunks {
        if let Err(e) = d.feed(c, |cap| out.push(cap)) {
            return (out, Err(e));
        }
    }
    let end = d.finish();
    (out, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let whole = decode(&[bytes]);
    let step = usize::from(split).max(1);
    let pieces: Vec<&[u8]> = bytes.chunks(step).collect();
    let chunked = decode(&pieces);
    assert_eq!(whole, chunked, "chunking changed the decoding");
    let mut one = Boundaries::new();
    one.feed(bytes);
    let mut split_up = Boundaries::new();
    for p in &pieces {
        split_up.feed(p);
    }
    assert_eq!(one, split_up, "chunking changed the boundaries");
});

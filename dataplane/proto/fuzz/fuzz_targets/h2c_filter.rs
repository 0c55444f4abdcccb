//! The h2c shims on arbitrary bytes: the client frame filter gives the same
//! output and result whether its input comes at once or split at a
//! fuzzer-chosen point, never emits more than it was given (it only drops
//! frames or shrinks increments), and never pays more debt than it had;
//! the server splice passes everything through plus its insert exactly
//! once; sniffing never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::h2c::{ClientFrameFilter, PREFACE, ServerFrameSplice, sniff};

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data);
    if data.len() < 6 {
        return;
    }
    let split = usize::from(data[0]) * data.len() / 256;
    let stream = u32::from(data[1] & 7);
    let debt = u32::from_be_bytes([0, data[2], data[3], data[4]]);
    // Half the inputs start with a real preface so the frame parser runs.
    let input: Vec<u8> =
        if data[5] & 1 == 0 { [PREFACE.as_slice(), &data[6..]].concat() } else { data[6..].to_vec() };
    let split = split.min(input.len());

    let mut whole = ClientFrameFilter::new(stream, debt);
    let mut out_whole = Vec::new();
    let r_whole = whole.push(&input, &mut out_whole);
    let mut parts = ClientFrameFilter::new(stream, debt);
    let mut out_parts = Vec::new();
    let r_parts = parts.push(&input[..split], &mut out_parts).and_then(|_| parts.push(&input[split..], &mut out_parts));
    assert_eq!(r_whole, r_parts);
    if r_whole.is_ok() {
        assert_eq!(out_whole, out_parts);
        assert_eq!(whole.debt(), parts.debt());
    }
    assert!(out_whole.len() <= input.len());
    assert!(whole.debt() <= debt);

    let insert = data[6..].iter().take(32).copied().collect::<Vec<u8>>();
    let mut splice = ServerFrameSplice::new(insert.clone());
    let mut out = Vec::new();
    splice.push(&input[..split], &mut out);
    splice.push(&input[split..], &mut out);
    if splice.done() {
        assert_eq!(out.len(), input.len() + insert.len());
    } else {
        assert_eq!(out, input);
    }
});

//! The h2c shims on arbitrary bytes: the client frame filter gives the same
//! output, result and remaining debt whether its input comes at once, split
//! at a fuzzer-chosen point or one byte at a time (errors included: they are
//! sticky, and what came out before one does not depend on the cut), never
//! emits more than it was given (it only drops frames or shrinks
//! increments), and never pays more debt than it had; the server splice
//! passes everything through plus its insert exactly once, right after the
//! first frame; sniffing never panics and agrees with the filter's preface
//! check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::h2c::{ClientFrameFilter, FilterError, PREFACE, ServerFrameSplice, Sniff, sniff};

fn run(stream: u32, debt: u32, pieces: &[&[u8]]) -> (Vec<u8>, Result<(), FilterError>, u32) {
    let mut f = ClientFrameFilter::new(stream, debt);
    let mut out = Vec::new();
    let mut r = Ok(());
    for p in pieces {
        r = f.push(p, &mut out);
    }
    (out, r, f.debt())
}

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

    let whole = run(stream, debt, &[&input]);
    let parts = run(stream, debt, &[&input[..split], &input[split..]]);
    assert_eq!(whole, parts, "split at {split}");
    if input.len() <= 512 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(whole, run(stream, debt, &bytes), "byte at a time");
    }
    let (out, r, left) = whole;
    assert!(out.len() <= input.len());
    assert!(left <= debt);
    match sniff(&input) {
        Sniff::Http1 | Sniff::Tls => assert_eq!(r, Err(FilterError::BadPreface)),
        Sniff::H2PriorKnowledge => assert!(out.starts_with(PREFACE)),
        Sniff::NeedMore => assert!(input.len() < PREFACE.len()),
    }

    let insert = data[6..].iter().take(32).copied().collect::<Vec<u8>>();
    let mut splice = ServerFrameSplice::new(insert.clone());
    let mut out = Vec::new();
    splice.push(&input[..split], &mut out);
    splice.push(&input[split..], &mut out);
    let first = input
        .get(..3)
        .map(|h| 9 + (usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2])))
        .filter(|&n| input.len() >= 9 && n <= input.len());
    match first {
        Some(n) => {
            assert!(splice.done());
            assert_eq!(out, [&input[..n], &insert, &input[n..]].concat());
        }
        None => {
            assert!(!splice.done());
            assert_eq!(out, input);
        }
    }
});

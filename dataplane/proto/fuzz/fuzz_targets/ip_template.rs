//! connect-ip template matching and target / ipproto parsing on arbitrary
//! input: no panics, and a matched path's values expand back to a path that
//! yields the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::ip::scope::{parse_ipproto, parse_target};
use relay_proto::template::{DEFAULT_IP_TEMPLATE, IpUriTemplate, MAX_PATH_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (template, path) = text.split_once('\n').unwrap_or((DEFAULT_IP_TEMPLATE, text));
    let _ = parse_target(path);
    let _ = parse_ipproto(path);
    let Ok(t) = IpUriTemplate::parse(template) else { return };
    let Ok(m) = t.match_path(path) else { return };
    let _ = parse_target(&m.target);
    let _ = parse_ipproto(&m.ipproto);
    let expanded = t.expand_ip(&m.target, &m.ipproto);
    if expanded.len() > MAX_PATH_LEN {
        // Percent-encoding may grow a raw query value past the matcher's cap.
        return;
    }
    let again = t.match_path(&expanded).expect("an expanded path matches its template");
    // A variable the template lacks reads as "*" on both sides.
    assert_eq!(again, m);
});

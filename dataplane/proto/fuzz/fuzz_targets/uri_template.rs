//! URI template parsing and path matching on arbitrary input: no panics,
//! and whatever a path yields expands back to a path that yields the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::target::{TargetHost, parse_port};
use relay_proto::template::UriTemplate;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (template, path) =
        text.split_once('\n').unwrap_or(("/.well-known/masque/udp/{target_host}/{target_port}/", text));
    let Ok(t) = UriTemplate::parse(template) else { return };
    if let Ok(m) = t.match_path(path) {
        let _ = TargetHost::parse(&m.target_host);
        if let Ok(port) = parse_port(&m.target_port) {
            let expanded = t.expand(&m.target_host, port);
            let again = t.match_path(&expanded).expect("an expanded path matches its template");
            assert_eq!(again.target_host, m.target_host);
            assert_eq!(parse_port(&again.target_port), Ok(port));
        }
    }
});

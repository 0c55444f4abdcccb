//! Request validation on arbitrary header lists (name NUL value NUL ...):
//! no panics, and anything accepted as connect-udp (bound or not) has a
//! valid target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::request::{
    classify_connect_udp, classify_connect_udp_bind, parse_request, request_wants_bind,
};
use relay_proto::template::UriTemplate;

fuzz_target!(|data: &[u8]| {
    let fields: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let pairs: Vec<(&[u8], &[u8])> = fields.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    let template =
        UriTemplate::parse("/.well-known/masque/udp/{target_host}/{target_port}/").expect("default template");
    for extended in [true, false] {
        if let Ok(req) = parse_request(pairs.iter().copied(), extended) {
            if let Ok(c) = classify_connect_udp(&req, &template) {
                assert!(c.target_port > 0);
                assert_eq!(req.method, "CONNECT");
            }
            let _ = request_wants_bind(&req);
            if let Ok(b) = classify_connect_udp_bind(&req, &template) {
                assert!(b.target.is_none_or(|(_, port)| port > 0));
                assert_eq!(req.method, "CONNECT");
            }
        }
    }
});

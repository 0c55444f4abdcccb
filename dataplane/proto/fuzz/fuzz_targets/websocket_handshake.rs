//! WebSocket's handshakes (RFC 6455 section 4): the origin's answer, read
//! from bytes an upstream chose, never panics; a head it accepts ends
//! inside the input and names only a subprotocol the client offered; the
//! client checks and standard base64 take any field values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::base64url::{base64_decode, base64_encode};
use relay_proto::request::WebSocketFields;
use relay_proto::websocket::{Carrier, ClientHandshake, check_client, parse_upgrade_response};

fuzz_target!(|data: &[u8]| {
    let offered = ClientHandshake {
        protocols: Some("chat, superchat".into()),
        extensions: Some("permessage-deflate".into()),
        origin: None,
        key: None,
    };
    if let Ok(Some(up)) = parse_upgrade_response(data, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", &offered) {
        assert!(up.head_len <= data.len());
        assert!(up.protocol.as_deref().is_none_or(|p| p == "chat" || p == "superchat"));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(bytes) = base64_decode(text) {
            assert_eq!(base64_encode(&bytes), text, "strict base64 has one encoding");
        }
        let mut parts = text.splitn(3, '\n');
        let fields = WebSocketFields {
            version: parts.next().map(str::to_string),
            key: parts.next().map(str::to_string),
            protocol: parts.next().map(str::to_string),
            ..WebSocketFields::default()
        };
        for carrier in [Carrier::Http1, Carrier::ExtendedConnect] {
            if let Ok(h) = check_client(&fields, carrier) {
                assert_eq!(h.key.is_some(), carrier == Carrier::Http1);
            }
        }
    }
});

//! HTTP/1.1 request heads from arbitrary bytes, under the default limits
//! and under small ones: no panics; a complete head is self-delimiting (its
//! bytes alone parse to the same head, one byte less is Partial) and fits
//! the input; classification, framing, keep-alive and the extended CONNECT
//! conversion never panic, and what they accept keeps their promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::http1::{
    self, Limits, Parse, RequestKind, UpgradeProtocol, classify, parse_request_head, to_extended_connect,
};
use relay_proto::request::{classify_connect_ip, classify_connect_udp};
use relay_proto::template::{IpUriTemplate, UriTemplate};

const SMALL: Limits = Limits { max_head_bytes: 256, max_fields: 4, max_target_len: 32 };

fuzz_target!(|data: &[u8]| {
    let udp =
        UriTemplate::parse("/.well-known/masque/udp/{target_host}/{target_port}/").expect("udp template");
    let ip = IpUriTemplate::parse("/.well-known/masque/ip/{target}/{ipproto}/").expect("ip template");
    for limits in [Limits::default(), SMALL] {
        let (head, n) = match parse_request_head(data, &limits) {
            Ok(Parse::Complete(head, n)) => (head, n),
            Ok(Parse::Partial) => {
                assert!(data.len() <= limits.max_head_bytes);
                continue;
            }
            Err(e) => {
                assert!(matches!(e.status(), 400 | 414 | 431 | 501 | 505), "{e:?}");
                continue;
            }
        };
        assert!(n > 0 && n <= data.len() && n <= limits.max_head_bytes);
        assert_eq!(parse_request_head(&data[..n], &limits), Ok(Parse::Complete(head.clone(), n)));
        assert_eq!(parse_request_head(&data[..n - 1], &limits), Ok(Parse::Partial));
        assert!(head.minor_version <= 1);
        assert!(head.target.len() <= limits.max_target_len);
        assert!(head.fields.len() <= limits.max_fields);
        assert!(
            head.fields
                .iter()
                .all(|(name, _)| !name.is_empty() && !name.bytes().any(|b| b.is_ascii_uppercase()))
        );

        let body = head.body();
        let _ = head.keep_alive();
        let _ = head.authorization();
        for protocol in [UpgradeProtocol::ConnectUdp, UpgradeProtocol::ConnectIp] {
            let req = to_extended_connect(&head, protocol, &head.target, "");
            assert_eq!(req.protocol.as_deref(), Some(protocol.token()));
        }
        match classify(&head) {
            Ok(RequestKind::Connect { host, port }) => {
                assert!(body.is_ok());
                assert_eq!(head.method, "CONNECT");
                assert!(port > 0 && !host.is_empty() && !host.starts_with('['));
            }
            Ok(RequestKind::Tunnel { protocol, path, authority }) => {
                assert_eq!(body, Ok(http1::Body::None));
                assert_eq!((head.method.as_str(), head.minor_version), ("GET", 1));
                assert!(path.starts_with('/'));
                let req = to_extended_connect(&head, protocol, &path, &authority);
                match protocol {
                    UpgradeProtocol::ConnectUdp => {
                        if let Ok(c) = classify_connect_udp(&req, &udp) {
                            assert!(c.target_port > 0);
                        }
                    }
                    UpgradeProtocol::ConnectIp => {
                        let _ = classify_connect_ip(&req, &ip);
                    }
                    UpgradeProtocol::WebSocket => {
                        assert!(req.http1_upgrade);
                        if let Ok(h) = relay_proto::websocket::check_client(
                            &req.websocket,
                            relay_proto::websocket::Carrier::Http1,
                        ) {
                            assert!(h.key.is_some(), "an HTTP/1.1 handshake has its key");
                        }
                    }
                }
            }
            Ok(RequestKind::H2cUpgrade { settings, path, .. }) => {
                assert!(matches!(body, Ok(http1::Body::None | http1::Body::Length(0))));
                assert_eq!(head.minor_version, 1);
                assert!(path.starts_with('/') || path == "*");
                assert!(!settings.contains(','));
            }
            Ok(RequestKind::Plain { path, .. }) => {
                assert!(body.is_ok());
                assert!(path.starts_with('/') || (path == "*" && head.method == "OPTIONS"));
            }
            Err(e) => {
                assert!(matches!(e.status(), 400 | 501), "{e:?}");
                let mut out = Vec::new();
                http1::write_response_head(&mut out, e.status(), &[("Proxy-Status", &e.to_string())]);
                assert!(out.ends_with(b"\r\n\r\n"));
            }
        }
    }
});

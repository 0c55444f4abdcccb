//! WebTransport sessions on the worker core, driven by the harness: the
//! streams a client opens in a session that does not exist, that control
//! has not answered yet, or that is refused (draft-ietf-webtrans-http3
//! sections 4.6 and 6). The relaying itself runs against real origins in
//! bench/tests/webtransport.rs.

use relay_proto::channel::bootstrap::Protocol;
use relay_proto::channel::record::{TunnelProtocol, Verdict};
use relay_proto::proxy_status::ProxyError;

use super::harness::{Harness, bootstrap};
use crate::tunnel::webtransport::{MAX_EARLY_STREAMS, WT_BUFFERED_STREAM_REJECTED, WT_SESSION_GONE};

/// Control's 403 for a session.
fn forbidden() -> Verdict {
    Verdict::Deny {
        status: 403,
        proxy_error: Some(ProxyError::HttpRequestDenied),
        details: "not for you".into(),
        retry_after_secs: 0,
    }
}

fn serving_webtransport() -> Harness {
    let mut b = bootstrap(1);
    b.protocols.push(Protocol::Webtransport);
    let mut h = Harness::new(b);
    h.connect();
    h
}

#[test]
fn streams_for_no_session_are_rejected() {
    let mut h = serving_webtransport();
    // Session 0 was never requested on this connection.
    let bidi = h.client.open_wt_stream(0, true, b"hello");
    let uni = h.client.open_wt_stream(0, false, b"hello");
    h.run();
    assert_eq!(h.client.wt_stream_ended(bidi), Some(WT_BUFFERED_STREAM_REJECTED));
    assert_eq!(h.client.wt_stream_ended(uni), Some(WT_BUFFERED_STREAM_REJECTED));
}

#[test]
fn streams_opened_before_a_refusal_end_with_the_session() {
    let mut h = serving_webtransport();
    let session = h.client.webtransport("/game");
    h.run();
    let asks = h.control.take_asks();
    assert_eq!(asks.len(), 1);
    assert_eq!(asks[0].protocol, TunnelProtocol::WebTransport);
    assert_eq!((asks[0].authority.as_str(), asks[0].path.as_str()), ("localhost", "/game"));
    // Streams the client opens while control decides wait (section 4.6).
    let bidi = h.client.open_wt_stream(session, true, b"early");
    let uni = h.client.open_wt_stream(session, false, b"early");
    h.run();
    assert_eq!(h.client.wt_stream_ended(bidi), None, "held while control decides");
    let verdict = forbidden();
    h.control.answer(&asks[0], verdict);
    h.run();
    assert_eq!(h.client.status(session), Some(403));
    // The session never existed: its streams go with it (section 6).
    assert_eq!(h.client.wt_stream_ended(bidi), Some(WT_SESSION_GONE));
    assert_eq!(h.client.wt_stream_ended(uni), Some(WT_SESSION_GONE));
}

#[test]
fn early_streams_past_the_bound_are_rejected() {
    let mut h = serving_webtransport();
    let session = h.client.webtransport("/game");
    h.run();
    let streams: Vec<u64> =
        (0..=MAX_EARLY_STREAMS).map(|_| h.client.open_wt_stream(session, false, b"x")).collect();
    h.run();
    let (held, past) = streams.split_at(MAX_EARLY_STREAMS);
    assert_eq!(h.client.wt_stream_ended(past[0]), Some(WT_BUFFERED_STREAM_REJECTED));
    for &s in held {
        assert_eq!(h.client.wt_stream_ended(s), None, "stream {s} is held");
    }
}

#[test]
fn webtransport_is_not_served_without_a_route() {
    // No webtransport route: the :protocol is unknown (501), nothing asked.
    let mut h = Harness::new(bootstrap(1));
    h.connect();
    let session = h.client.webtransport("/game");
    h.run();
    assert_eq!(h.client.status(session), Some(501));
    assert!(h.control.take_asks().is_empty());
}

#[test]
fn a_second_session_on_a_connection_is_rejected_while_one_is_open() {
    let mut h = serving_webtransport();
    let first = h.client.webtransport("/game");
    h.run();
    let asks = h.control.take_asks();
    assert_eq!(asks.len(), 1);
    // Section 5.1: without flow control, one session per connection; the
    // relay announced WT_MAX_SESSIONS = 1.
    let second = h.client.webtransport("/chat");
    h.run();
    assert_eq!(h.client.reset_codes.get(&second), Some(&crate::h3::path::code::REQUEST_REJECTED));
    assert!(h.control.take_asks().is_empty(), "the second session is not asked about");
    // Other tunnels on the connection are not affected.
    let udp = h.client.connect_udp("127.0.0.1", 9);
    h.run();
    assert_eq!(h.control.take_asks().len(), 1);
    // Once the first session is over, a new one is served.
    let verdict = forbidden();
    h.control.answer(&asks[0], verdict);
    h.run();
    assert_eq!(h.client.status(first), Some(403));
    let third = h.client.webtransport("/game");
    h.run();
    assert!(!h.client.reset_codes.contains_key(&third), "{:?}", h.client.reset_codes);
    assert_eq!(h.control.take_asks().len(), 1);
    let _ = udp;
}

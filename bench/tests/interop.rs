//! Interop suite: an independent client (aioquic, driven at the
//! `QuicConnection` / `H3Connection` level by `bench/interop/masque_client.py`)
//! against a real relay (`relay-control` + `relay-dataplane`) and a real UDP
//! echo target on loopback. Each test asserts the exact status, stream error
//! code or connection error code RFC 9114 / 9220 / 9297 / 9298 call for.
//!
//! The client lives in the venv `cargo xtask setup` creates: the tests are
//! ignored by a plain `cargo test` and run by `cargo xtask test` (or
//! `cargo test -- --ignored`), failing with the command that creates the
//! venv when it is missing.

use std::time::{Duration, Instant};

use relay_bench::echo::EchoServer;
use relay_bench::interop::{self, Interop};
use relay_bench::processes::{Relay, RelayOptions};
use serde_json::{Value, json};

/// H3_NO_ERROR (RFC 9114 section 8.1).
const H3_NO_ERROR: u64 = 0x100;
/// H3_EXCESSIVE_LOAD.
const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// H3_REQUEST_REJECTED.
const H3_REQUEST_REJECTED: u64 = 0x10b;
/// H3_MESSAGE_ERROR.
const H3_MESSAGE_ERROR: u64 = 0x10e;
/// H3_DATAGRAM_ERROR (RFC 9297 section 5.2).
const H3_DATAGRAM_ERROR: u64 = 0x33;
/// Longest any one client run may take.
const RUN: Duration = Duration::from_secs(60);

fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-interop-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A relay, an echo target and the aioquic client (the test fails naming
/// the missing venv and how to create it).
#[track_caller]
fn setup(name: &str, opts: RelayOptions) -> (Relay, EchoServer, Interop) {
    let python = interop::python();
    let relay = Relay::start(&test_dir(name), &opts).expect("relay starts");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let interop = Interop::new(python, &relay, echo.addr().port());
    (relay, echo, interop)
}

/// Runs `cases` and returns their results, failing on any case that could
/// not run.
fn run(interop: &Interop, cases: &[&str]) -> std::collections::HashMap<String, Value> {
    let results = interop.run(cases, RUN).expect("interop client runs");
    for case in cases {
        let r = results.get(*case).unwrap_or_else(|| panic!("no result for {case}: {results:?}"));
        assert!(r.get("error").is_none(), "{case} could not run: {r}");
    }
    results
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn connect_udp_with_h3_datagrams_both_ways_byte_for_byte() {
    let (relay, echo, interop) = setup("datagrams", RelayOptions::default());
    let r = run(&interop.arg("--count", 1000), &["datagrams_both_ways"]);
    let r = &r["datagrams_both_ways"];
    assert_eq!(r["status"], 200);
    // RFC 9297 section 3.4: the 2xx of a capsule-protocol tunnel says so.
    assert_eq!(r["capsule_protocol"], "?1");
    // Loopback loses nothing; every payload (1 to 1200 bytes) comes back
    // byte for byte, as an HTTP/3 datagram with context ID 0 (RFC 9298
    // section 5), never as a capsule since the client enabled datagrams.
    assert_eq!((r["sent"].as_u64(), r["matched"].as_u64()), (Some(1000), Some(1000)), "{r}");
    assert_eq!(r["mismatched"], 0);
    assert_eq!(r["other_contexts"], 0);
    assert_eq!(r["capsules_down"], 0);
    assert_eq!(echo.echoed(), 1000, "the target saw every payload once");
    assert!(relay.counter("datagrams_up").unwrap() >= 1000);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn datagram_capsules_both_ways_when_the_client_has_no_h3_datagrams() {
    let (relay, echo, interop) = setup("capsules", RelayOptions::default());
    let r = run(&interop.arg("--count", 300), &["capsules_both_ways"]);
    let r = &r["capsules_both_ways"];
    // The relay advertises SETTINGS_H3_DATAGRAM=1 (RFC 9297 section 2.1.1)
    // but must not send QUIC DATAGRAM frames to a client that did not:
    // answers come back as DATAGRAM capsules (section 3.5).
    assert_eq!(r["relay_h3_datagram_setting"], 1);
    assert_eq!((r["sent"].as_u64(), r["matched"].as_u64()), (Some(300), Some(300)), "{r}");
    assert_eq!(r["mismatched"], 0);
    assert_eq!(r["h3_datagrams_down"], 0);
    assert_eq!(echo.echoed(), 300);
    assert!(relay.counter("datagrams_down").unwrap() >= 300);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn malformed_requests_are_reset_with_h3_message_error() {
    let (relay, _echo, interop) = setup("malformed", RelayOptions::default());
    // RFC 9114 section 4.1.2: a malformed request is a stream error of type
    // H3_MESSAGE_ERROR. Missing :protocol leaves a CONNECT with :scheme and
    // :path (section 4.4), missing :scheme/:path an extended CONNECT without
    // them (RFC 9220 section 3 / RFC 8441 section 4), missing :authority
    // (RFC 9114 section 4.4), an unknown pseudo-header (section 4.3),
    // uppercase field names (section 4.2) and an uppercase pseudo-header.
    let cases = [
        "missing_protocol",
        "missing_scheme",
        "missing_authority",
        "missing_path",
        "unknown_pseudo_header",
        "uppercase_field_name",
        "uppercase_pseudo_header",
    ];
    let results = run(&interop, &cases);
    for case in cases {
        let r = &results[case];
        assert_eq!(r["answer"], "reset", "{case}: no response before the reset: {r}");
        assert_eq!(r["code"], H3_MESSAGE_ERROR, "{case}: {r}");
        assert_eq!(r["stop_sending"], H3_MESSAGE_ERROR, "{case}: both directions: {r}");
        // A stream error, not a connection error: the same connection
        // then opens a tunnel and gets an echo.
        assert_eq!(r["connection_ok"], true, "{case}: {r}");
        assert_eq!(r["conn_error"], Value::Null, "{case}");
    }
    assert_eq!(relay.counter("requests_malformed").unwrap(), cases.len() as u64);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn refusals_carry_exact_statuses() {
    let (relay, _echo, interop) = setup("refusals", RelayOptions::default());
    let expect = [
        // RFC 9298 section 3.4 / 2: a path the template does not match.
        ("wrong_template", 404, None),
        // Section 3.4: target_port must be 1..65535 (a decimal integer).
        ("bad_port_zero", 400, Some("http_request_error")),
        ("bad_port_too_large", 400, Some("http_request_error")),
        ("bad_port_not_a_number", 400, Some("http_request_error")),
    ];
    let cases: Vec<&str> = expect.iter().map(|e| e.0).collect();
    let results = run(&interop, &cases);
    for (case, status, error) in expect {
        let r = &results[case];
        assert_eq!(r["answer"], "response", "{case}: {r}");
        assert_eq!(r["status"], status, "{case}: {r}");
        let proxy_status = r["headers"]["proxy-status"].as_str();
        match error {
            Some(e) => assert!(
                proxy_status.is_some_and(|p| p.contains(&format!("error={e}"))),
                "{case}: Proxy-Status {proxy_status:?}"
            ),
            None => assert_eq!(proxy_status, None, "{case}"),
        }
        // RFC 9297 section 3.4: no Capsule-Protocol on a non-2xx.
        assert_eq!(r["headers"]["capsule-protocol"], Value::Null, "{case}");
        // RFC 9114 section 4.1: the rest of the request is not needed;
        // reading stops with H3_NO_ERROR.
        assert_eq!(r["stop_sending"], H3_NO_ERROR, "{case}: {r}");
        assert_eq!(r["connection_ok"], true, "{case}: {r}");
    }
    assert_eq!(relay.counter("requests_malformed").unwrap(), 0);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn protocol_sent_before_the_relays_settings_is_served() {
    // RFC 8441 section 3 (applied to HTTP/3 by RFC 9220 section 3): a client
    // must not use :protocol before it has received
    // SETTINGS_ENABLE_CONNECT_PROTOCOL, because "a non-supporting peer
    // would detect a malformed request". The relay supports it and sends
    // the setting on its control stream as soon as the connection is up;
    // it cannot know whether the client had read it, so the request is
    // well-formed and served. (A relay that did not send the setting would
    // reset it with H3_MESSAGE_ERROR: relay_proto::request::tests::protocol_rules.)
    let (_relay, _echo, interop) = setup("early-protocol", RelayOptions::default());
    let r = run(&interop, &["protocol_before_settings"]);
    let r = &r["protocol_before_settings"];
    assert_eq!(r["settings_seen_when_sent"], false, "the request went out before the SETTINGS were read");
    assert_eq!(r["relay_enable_connect_protocol"], 1);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["echo"], "tunnel works");
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn unknown_context_ids_and_foreign_streams_are_dropped_and_counted() {
    let (relay, echo, interop) = setup("contexts", RelayOptions::default());
    let r = run(&interop, &["unknown_context"]);
    let r = &r["unknown_context"];
    // RFC 9298 section 4: contexts the relay never registered are dropped
    // (four datagrams, one DATAGRAM capsule); RFC 9297 section 2.1: a
    // datagram for a stream that is no tunnel is dropped. The tunnel and
    // the connection carry on: only the context-0 payload is echoed.
    assert_eq!(r["echoed"], json!(["for the target"]), "{r}");
    assert_eq!(r["reset"], Value::Null);
    assert_eq!(r["conn_error"], Value::Null);
    assert_eq!(echo.echoed(), 1);
    assert_eq!(relay.counter("drop_unknown_context").unwrap(), 5);
    assert_eq!(relay.counter("drop_no_tunnel").unwrap(), 1);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn malformed_quarter_stream_ids_close_the_connection_with_h3_datagram_error() {
    let (relay, _echo, interop) = setup("quarter", RelayOptions::default());
    // RFC 9297 section 2.1: a datagram whose quarter stream ID is truncated
    // or exceeds 2^60-1 is a connection error of type H3_DATAGRAM_ERROR.
    let cases = ["truncated_quarter_stream_id", "quarter_stream_id_too_large"];
    let results = run(&interop, &cases);
    for case in cases {
        let r = &results[case];
        assert_eq!(r["conn_error"], H3_DATAGRAM_ERROR, "{case}: {r}");
        assert_eq!(
            r["application_close"], true,
            "{case}: an HTTP/3 error, so an application CONNECTION_CLOSE"
        );
    }
    assert_eq!(relay.counter("drop_malformed").unwrap(), 2);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn capsule_truncated_by_fin_aborts_the_tunnel_with_h3_message_error() {
    let (_relay, _echo, interop) = setup("truncated-capsule", RelayOptions::default());
    // RFC 9297 section 3.3: a stream that ends inside a capsule makes the
    // message malformed: stream error H3_MESSAGE_ERROR (RFC 9114 4.1.2).
    let r = run(&interop, &["capsule_truncated_by_fin"]);
    let r = &r["capsule_truncated_by_fin"];
    assert_eq!(r["reset"], H3_MESSAGE_ERROR, "{r}");
    assert_eq!(r["conn_error"], Value::Null);
    assert_eq!(r["next_tunnel_echo"], "next tunnel", "the connection keeps serving");
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn oversize_capsules_abort_the_tunnel() {
    let (relay, echo, interop) = setup("oversize", RelayOptions::default());
    let results = run(&interop, &["oversize_capsule", "oversize_udp_payload_capsule"]);
    // A DATAGRAM capsule announcing 70000 bytes (over the relay's 65535
    // limit) is refused from its header, before its value is buffered
    // (RFC 9297 section 3.5 SHOULD): the message is malformed.
    let r = &results["oversize_capsule"];
    assert_eq!(r["reset"], H3_MESSAGE_ERROR, "{r}");
    assert_eq!(r["stop_sending"], H3_MESSAGE_ERROR, "{r}");
    assert_eq!(r["next_tunnel_echo"], "next tunnel");
    // RFC 9298 section 5: a context-0 payload over 65527 bytes MUST abort
    // the stream; the relay uses H3_DATAGRAM_ERROR. (A QUIC DATAGRAM frame
    // cannot carry one: the relay's max_udp_payload_size is 65527.)
    let r = &results["oversize_udp_payload_capsule"];
    assert_eq!(r["reset"], H3_DATAGRAM_ERROR, "{r}");
    assert_eq!(r["stop_sending"], H3_DATAGRAM_ERROR, "{r}");
    assert_eq!(r["next_tunnel_echo"], "next tunnel");
    assert_eq!(echo.echoed(), 2, "only the two follow-up echoes reached the target");
    assert_eq!(relay.counter("drop_too_large").unwrap(), 1);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn oversize_header_section_closes_the_connection_with_h3_excessive_load() {
    let (_relay, _echo, interop) = setup("big-headers", RelayOptions::default());
    // The relay sends SETTINGS_MAX_FIELD_SECTION_SIZE = 16 KiB; a HEADERS
    // frame announcing 1 MiB is not buffered: quiche closes the connection
    // with H3_EXCESSIVE_LOAD (RFC 9114 section 7.1 lets an endpoint treat a
    // frame that exceeds its limits so).
    let r = run(&interop, &["oversize_headers"]);
    let r = &r["oversize_headers"];
    assert_eq!(r["max_field_section_size"], 16384);
    assert_eq!(r["conn_error"], H3_EXCESSIVE_LOAD, "{r}");
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn requests_after_goaway_are_rejected_while_open_tunnels_keep_forwarding() {
    let opts = RelayOptions { dataplane_extra: "drain_timeout_secs = 10".into(), ..Default::default() };
    let (relay, _echo, interop) = setup("goaway", opts);
    let mut client = interop.spawn(&["goaway"]).expect("client starts");
    let ready = client.next_object(Duration::from_secs(20)).expect("client ready");
    assert_eq!(ready["ready"], true, "{ready}");
    // Drain (SIGTERM): GOAWAY on every connection, open tunnels finish.
    relay.signal_dataplane(libc::SIGTERM);
    client.say("go").unwrap();
    let r = client.next_object(Duration::from_secs(30)).expect("goaway result");
    assert!(r.get("error").is_none(), "{r}");
    // RFC 9114 section 5.2: GOAWAY names the first request stream the relay
    // will not process (stream 0 was the tunnel, so 4); a client that sends
    // one anyway gets it reset with H3_REQUEST_REJECTED, no response.
    assert_eq!(r["tunnel_stream"], 0);
    assert_eq!(r["goaway_id"], 4, "{r}");
    assert_eq!(r["late_stream"], 4);
    assert_eq!(r["late_answer"], "reset", "{r}");
    assert_eq!(r["late_code"], H3_REQUEST_REJECTED, "{r}");
    assert_eq!(r["tunnel_echo"], "after goaway", "the open tunnel keeps forwarding");
    client.finish(Instant::now() + Duration::from_secs(10)).expect("client exits cleanly");
}

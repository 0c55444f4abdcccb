//! WebSocket relaying end to end (issue #19): a real relay (control +
//! dataplane) with `[[upstreams]]` routes to WebSocket origins on
//! loopback, driven over HTTP/1.1 Upgrade (cleartext and TLS), HTTP/2
//! extended CONNECT (RFC 8441, cleartext and TLS) and HTTP/3 extended
//! CONNECT (RFC 9220).
//!
//! The origins and clients are independent implementations in the interop
//! venv (`bench/interop/ws_origin.py` on the `websockets` asyncio server;
//! `bench/interop/ws_client.py`: the `websockets` client, `h2`, aioquic,
//! with the `websockets` sans-I/O framing on HTTP/2 and HTTP/3): those
//! tests are ignored by a plain `cargo test` and run by `cargo xtask test`
//! (or `cargo test -p relay-bench --test websocket -- --ignored`). The
//! last two tests use the Rust origin and clients of `relay_bench::wsecho`
//! (tungstenite) and need nothing from the machine.
//!
//! The HTTP/2 origin tests (`origin_http`) use `bench/interop/ws_h2_origin.py`
//! (the Python `h2` package with the `websockets` sans-I/O framing) as the
//! RFC 8441 origin.
//!
//! Every test asserts behaviour (statuses, Proxy-Status fields, payloads,
//! close codes, what the origin received), never rates or times.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use relay_bench::processes::{Relay, RelayOptions, free_tcp_port};
use relay_bench::wait::{PATIENCE, wait_until};
use relay_bench::wsecho::{self, Opened, Through, Tls, WsEcho};
use relay_bench::wsinterop::{self, Http, PyOrigin, WsClient};
use serde_json::Value;
use tungstenite::Message;

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-ws-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The routes every test's relay serves. `echo`, `hosted`, `shared`,
/// `rewritten` and `public` go to the echo origin (which picks "chat.v1"
/// when offered); `refused` to an origin that answers 403; `down` to a
/// port where nothing listens; `closer` to an origin that closes with
/// 4000 "bye" right after the handshake.
fn routes(echo: u16, refuser: u16, down: u16, closer: u16) -> String {
    format!(
        r#"
[[upstreams]]
name = "echo"
protocol = "websocket"
path_prefix = "/echo/"
origin = "ws://127.0.0.1:{echo}"

[[upstreams]]
name = "hosted"
protocol = "websocket"
hosts = ["chat.example"]
path_prefix = "/shared/"
origin = "ws://127.0.0.1:{echo}"
prefix_rewrite = "/from-hosted/"

[[upstreams]]
name = "shared"
protocol = "websocket"
path_prefix = "/shared/"
origin = "ws://127.0.0.1:{echo}"
prefix_rewrite = "/from-any/"

[[upstreams]]
name = "rewritten"
protocol = "websocket"
path_prefix = "/app/v1/"
origin = "ws://127.0.0.1:{echo}"
prefix_rewrite = "/"
host_header = "backend.internal"

[[upstreams]]
name = "public"
protocol = "websocket"
path_prefix = "/public/"
origin = "ws://127.0.0.1:{echo}"
auth = "public"

[[upstreams]]
name = "refused"
protocol = "websocket"
path_prefix = "/refused/"
origin = "ws://127.0.0.1:{refuser}"

[[upstreams]]
name = "down"
protocol = "websocket"
path_prefix = "/down/"
origin = "ws://127.0.0.1:{down}"

[[upstreams]]
name = "closer"
protocol = "websocket"
path_prefix = "/closer/"
origin = "ws://127.0.0.1:{closer}"
"#
    )
}

/// A relay (QUIC, TLS over TCP and the cleartext listener; loopback
/// allowed as a target, so the origins pass the ACL) with [`routes`], and
/// its Python origins.
struct Setup {
    relay: Relay,
    python: PathBuf,
    echo: PyOrigin,
    _refuser: PyOrigin,
    _closer: PyOrigin,
}

impl Setup {
    #[track_caller]
    fn start(name: &str) -> Self {
        let python = wsinterop::python();
        let echo = PyOrigin::start(&python, &["--subprotocol", "chat.v1"]).expect("echo origin");
        let refuser = PyOrigin::start(&python, &["--refuse", "403"]).expect("refusing origin");
        let closer =
            PyOrigin::start(&python, &["--close", "4000", "--close-reason", "bye"]).expect("closing origin");
        let down = free_tcp_port().unwrap();
        let opts = RelayOptions {
            tcp_cleartext: true,
            extra_config: routes(echo.port(), refuser.port(), down, closer.port()),
            ..RelayOptions::default()
        };
        let relay = Relay::start(&test_dir(name), &opts).expect("relay starts");
        Self { relay, python, echo, _refuser: refuser, _closer: closer }
    }

    fn client(&self, http: Http) -> WsClient {
        WsClient::new(&self.python, &self.relay, http)
    }

    /// Live flows, as `relayctl status` counts them.
    fn flows(&self) -> u64 {
        self.relay.relayctl_json(&["status"]).expect("relayctl status")["flows"].as_u64().unwrap_or(u64::MAX)
    }
}

/// Runs `cases` and fails on any that could not run.
#[track_caller]
fn run(client: &WsClient, http: Http, cases: &[&str]) -> HashMap<String, Value> {
    client.run(cases).unwrap_or_else(|e| panic!("{http:?}: ws_client.py: {e}"))
}

/// The checks of a session that opened, echoed and closed cleanly.
#[track_caller]
fn assert_opened(http: Http, case: &str, r: &Value) {
    assert_eq!(r["status"], http.opened(), "{http:?} {case}: {r}");
    assert_eq!(r["opened"], true, "{http:?} {case}: {r}");
    if !http.is_h1() {
        // RFC 8441 section 3 / RFC 9220 section 3.
        assert_eq!(r["connect_protocol"], true, "{http:?} {case}: SETTINGS_ENABLE_CONNECT_PROTOCOL=1: {r}");
    }
}

#[track_caller]
fn assert_echoed(http: Http, case: &str, r: &Value) {
    assert_opened(http, case, r);
    assert!(r["sent"].as_u64().unwrap_or(0) > 0, "{http:?} {case}: {r}");
    assert_eq!(r["matched"], r["sent"], "{http:?} {case}: every message back identical: {r}");
    assert_eq!(r["wrong_type"], 0, "{http:?} {case}: text stays text, binary stays binary: {r}");
    assert_eq!(r["changed"], 0, "{http:?} {case}: {r}");
}

/// The client's close (1000) was answered by the origin's Close frame, and
/// the stream (the TCP connection on HTTP/1.1) ended after it.
#[track_caller]
fn assert_closed_cleanly(http: Http, case: &str, r: &Value) {
    assert_eq!(r["close_reply"], 1000, "{http:?} {case}: the origin's close reply came through: {r}");
    assert_eq!(r["ended"], true, "{http:?} {case}: the stream ended after the closing handshake: {r}");
    if !http.is_h1() {
        assert_eq!(r["reset"], Value::Null, "{http:?} {case}: ended, not reset: {r}");
    }
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn websocket_echoes_text_binary_and_a_megabyte_on_every_http_version() {
    let s = Setup::start("echo");
    for http in Http::ALL {
        let r = run(&s.client(http), http, &["echo_text", "echo_binary", "large"]);
        for case in ["echo_text", "echo_binary"] {
            assert_echoed(http, case, &r[case]);
            assert_closed_cleanly(http, case, &r[case]);
        }
        // 1 MiB one way while reading the other: flow control and the
        // relay's buffers push back both ways, nothing is lost or changed.
        let l = &r["large"];
        assert_opened(http, "large", l);
        assert_eq!(l["received"], 1 << 20, "{http:?}: {l}");
        assert_eq!(
            (&l["binary"], &l["identical"]),
            (&Value::Bool(true), &Value::Bool(true)),
            "{http:?}: {l}"
        );
        assert_eq!(l["after"], true, "{http:?}: the session still echoes after it: {l}");
        assert_closed_cleanly(http, "large", l);
    }
    // Every session ended: none is left open in the relay.
    wait_until("the relay's flows to end", PATIENCE, || s.flows() == 0);
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn subprotocol_extensions_and_request_fields_reach_the_origin_and_its_answer_comes_back() {
    let s = Setup::start("fields");
    let host = format!("127.0.0.1:{}", s.echo.port());
    for http in Http::ALL {
        let client = s.client(http).arg("--origin-header", "https://app.example");
        let cases = ["subprotocol", "headers@/echo/room?x=1", "headers@/app/v1/room?x=1", "deflate"];
        let r = run(&client, http, &cases);
        // The client offered "chat.v2, chat.v1"; the origin chose chat.v1,
        // and the relay's answer carries its choice.
        let p = &r["subprotocol"];
        assert_echoed(http, "subprotocol", p);
        assert_eq!(p["chosen"], "chat.v1", "{http:?}: {p}");
        assert_eq!(
            p["origin_saw_offer"], "chat.v2, chat.v1",
            "{http:?}: the offer went upstream as sent: {p}"
        );
        // The upstream request: the path unchanged with its query, Host the
        // origin's authority as written, the client's Origin, a version 13
        // Upgrade, and no credentials meant for the relay.
        let h = &r["headers@/echo/room?x=1"];
        assert_opened(http, "headers", h);
        let seen = &h["origin"];
        assert_eq!(seen["path"], "/echo/room?x=1", "{http:?}: {seen}");
        let fields = &seen["headers"];
        assert_eq!(fields["host"], host.as_str(), "{http:?}: {seen}");
        assert_eq!(fields["origin"], "https://app.example", "{http:?}: {seen}");
        assert_eq!(fields["sec-websocket-version"], "13", "{http:?}: {seen}");
        assert_eq!(
            fields["upgrade"].as_str().map(str::to_ascii_lowercase).as_deref(),
            Some("websocket"),
            "{seen}"
        );
        assert!(fields["sec-websocket-key"].is_string(), "{http:?}: a key of the relay's own: {seen}");
        assert!(
            fields.get("proxy-authorization").is_none(),
            "{http:?}: the relay's credentials stay at the relay: {seen}"
        );
        // prefix_rewrite "/" and host_header.
        let h = &r["headers@/app/v1/room?x=1"];
        assert_opened(http, "rewritten headers", h);
        assert_eq!(h["origin"]["path"], "/room?x=1", "{http:?}: {h}");
        assert_eq!(h["origin"]["headers"]["host"], "backend.internal", "{http:?}: {h}");
        // permessage-deflate negotiated end to end: the relay passed the
        // offer up and the origin's parameters down, and compressed
        // messages echo.
        let d = &r["deflate"];
        assert_echoed(http, "deflate", d);
        assert!(
            d["extensions"].as_str().is_some_and(|e| e.starts_with("permessage-deflate")),
            "{http:?}: {d}"
        );
    }
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn routes_match_the_host_then_the_path_prefix_in_file_order() {
    let s = Setup::start("hosts");
    // `hosted` (hosts = chat.example) comes before `shared`, both on
    // /shared/: the request's host picks, its port ignored.
    for http in [Http::H1Clear, Http::H2Clear, Http::H3] {
        let r = run(&s.client(http), http, &["headers@/shared/x"]);
        assert_eq!(r["headers@/shared/x"]["origin"]["path"], "/from-any/x", "{http:?}: {r:?}");
        let hosted = s.client(http).arg("--authority", "chat.example:8443");
        let r = run(&hosted, http, &["headers@/shared/x"]);
        assert_eq!(r["headers@/shared/x"]["origin"]["path"], "/from-hosted/x", "{http:?}: {r:?}");
        let hosted = s.client(http).arg("--authority", "CHAT.Example");
        let r = run(&hosted, http, &["headers@/shared/x"]);
        assert_eq!(
            r["headers@/shared/x"]["origin"]["path"], "/from-hosted/x",
            "{http:?}: case-insensitive: {r:?}"
        );
    }
}

/// A `wss://` origin (`ws_origin.py` with a certificate for `echo.test`
/// and 127.0.0.1 from a test CA) and a relay whose routes reach it: by
/// name with that CA (`/echo/`), by address with the default name
/// (`/byip/`), with another CA (`/otherca/`) and with a name the
/// certificate does not hold (`/wrongname/`).
struct WssSetup {
    relay: Relay,
    python: PathBuf,
    _origin: PyOrigin,
    _pki: PathBuf,
}

impl WssSetup {
    #[track_caller]
    fn start(name: &str) -> Self {
        use relay_bench::pki::TestCa;
        let pki = test_dir(&format!("{name}-pki"));
        std::fs::create_dir_all(&pki).unwrap();
        let ca = TestCa::new("wss origin CA").unwrap();
        ca.write_pem(&pki.join("ca.pem")).unwrap();
        TestCa::new("another CA").unwrap().write_pem(&pki.join("other.pem")).unwrap();
        let files = ca.issue_server(&pki, "origin", 2, "echo.test", "127.0.0.1".parse().unwrap()).unwrap();
        let python = wsinterop::python();
        let (cert, key) = (files.cert.display().to_string(), files.key.display().to_string());
        let origin =
            PyOrigin::start(&python, &["--subprotocol", "chat.v1", "--tls-cert", &cert, "--tls-key", &key])
                .expect("wss origin");
        let port = origin.port();
        let (ca, other) =
            (pki.join("ca.pem").display().to_string(), pki.join("other.pem").display().to_string());
        let routes = format!(
            r#"
[[upstreams]]
name = "echo"
path_prefix = "/echo/"
origin = "wss://127.0.0.1:{port}"
origin_ca_file = "{ca}"
origin_server_name = "echo.test"

[[upstreams]]
name = "byip"
path_prefix = "/byip/"
origin = "wss://127.0.0.1:{port}"
origin_ca_file = "{ca}"

[[upstreams]]
name = "otherca"
path_prefix = "/otherca/"
origin = "wss://127.0.0.1:{port}"
origin_ca_file = "{other}"
origin_server_name = "echo.test"

[[upstreams]]
name = "wrongname"
path_prefix = "/wrongname/"
origin = "wss://127.0.0.1:{port}"
origin_ca_file = "{ca}"
origin_server_name = "wrong.test"
"#
        );
        let opts = RelayOptions { tcp_cleartext: true, extra_config: routes, ..RelayOptions::default() };
        let relay = Relay::start(&test_dir(name), &opts).expect("relay starts");
        Self { relay, python, _origin: origin, _pki: pki }
    }
}

impl Drop for WssSetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._pki);
    }
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn wss_origins_are_verified_and_echo_on_every_http_version() {
    let s = WssSetup::start("wss");
    for http in Http::ALL {
        let client = WsClient::new(&s.python, &s.relay, http);
        let cases = [
            "echo_text@/echo/x",
            "echo_binary@/byip/x",
            "large@/echo/big",
            "handshake@/otherca/x",
            "handshake@/wrongname/x",
        ];
        let r = run(&client, http, &cases);
        // Through TLS to the origin: frames, a megabyte with backpressure,
        // and the closing handshake (close_notify and FIN) come through.
        for case in ["echo_text@/echo/x", "echo_binary@/byip/x"] {
            assert_echoed(http, case, &r[case]);
            assert_closed_cleanly(http, case, &r[case]);
        }
        let l = &r["large@/echo/big"];
        assert_opened(http, "large", l);
        assert_eq!(l["received"], 1 << 20, "{http:?}: {l}");
        assert_eq!(l["identical"], true, "{http:?}: {l}");
        assert_closed_cleanly(http, "large", l);
        // A certificate from a CA the route does not trust, and one that
        // does not name the route's server name: refused before any byte
        // of the Upgrade went out (RFC 9209 section 2.3.14).
        for (case, why) in [
            ("handshake@/otherca/x", "unable to get local issuer certificate"),
            ("handshake@/wrongname/x", "Hostname mismatch"),
        ] {
            let x = &r[case];
            assert_eq!(x["status"], 502, "{http:?} {case}: {x}");
            let ps = x["headers"]["proxy-status"].as_str().unwrap_or_default();
            assert!(ps.contains("error=tls_certificate_error"), "{http:?} {case}: {x}");
            assert!(ps.contains(why), "{http:?} {case}: {x}");
        }
    }
    wait_until("the relay's wss flows to end", PATIENCE, || {
        s.relay.relayctl_json(&["status"]).is_ok_and(|v| v["flows"].as_u64() == Some(0))
    });
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn refusals_carry_exact_statuses_and_proxy_status() {
    let s = Setup::start("refusals");
    for http in Http::ALL {
        let cases = [
            "handshake@/nope/",
            "handshake@/refused/x",
            "handshake@/down/x",
            "wrong_protocol@/echo/",
            "bad_version@/echo/",
        ];
        let r = run(&s.client(http), http, &cases);
        // No route for the path.
        assert_eq!(r["handshake@/nope/"]["status"], 404, "{http:?}: {r:?}");
        // The origin answered 403 instead of 101.
        let x = &r["handshake@/refused/x"];
        assert_eq!(x["status"], 502, "{http:?}: {x}");
        let ps = x["headers"]["proxy-status"].as_str().unwrap_or_default();
        assert!(ps.contains("error=http_upgrade_failed"), "{http:?}: {x}");
        assert!(ps.contains("received-status=403"), "{http:?}: {x}");
        // Nothing listens at the origin's address.
        let x = &r["handshake@/down/x"];
        assert_eq!(x["status"], 502, "{http:?}: {x}");
        assert!(
            x["headers"]["proxy-status"].as_str().unwrap_or_default().contains("error=connection_refused"),
            "{http:?}: {x}"
        );
        let w = &r["wrong_protocol@/echo/"];
        let v = &r["bad_version@/echo/"];
        if http.is_h1() {
            // The design names no status for an unknown Upgrade token on
            // HTTP/1.1: it must not be a WebSocket.
            assert_ne!(w["status"], 101, "{http:?}: {w}");
            // RFC 6455 section 4.4.
            assert_eq!(v["status"], 426, "{http:?}: {v}");
            assert_eq!(v["headers"]["sec-websocket-version"], "13", "{http:?}: {v}");
        } else {
            // :protocol websocket2 is not served; the refusal is the
            // stream's, the connection then opens a WebSocket.
            assert_eq!(w["status"], 501, "{http:?}: {w}");
            assert_eq!(w["next_status"], 200, "{http:?}: {w}");
            assert_eq!(w["next_matched"], 1, "{http:?}: {w}");
            assert_eq!(w["conn_error"], Value::Null, "{http:?}: {w}");
            assert_eq!(v["status"], 400, "{http:?}: {v}");
        }
    }
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn a_client_reset_mid_message_closes_the_origin_side_and_the_relay_keeps_serving() {
    let s = Setup::start("reset");
    for http in Http::ALL {
        let r = run(&s.client(http), http, &["reset"]);
        let r = &r["reset"];
        assert_echoed(http, "reset", r);
        // The client sent 64 KiB of a 1 MiB frame, then RST_STREAM /
        // RESET_STREAM+STOP_SENDING / a TCP RST: the relay closed the
        // origin's connection (the origin's record says closed).
        let o = &r["origin_record"];
        assert_eq!((&o["found"], &o["opened"]), (&Value::Bool(true), &Value::Bool(true)), "{http:?}: {r}");
        assert_eq!(o["closed"], true, "{http:?}: the origin saw its connection end: {r}");
        // A new session (on the same connection for HTTP/2 and HTTP/3)
        // echoes.
        assert_eq!(r["next_status"], http.opened(), "{http:?}: {r}");
        assert_eq!(r["next_matched"], 1, "{http:?}: {r}");
        if !http.is_h1() {
            assert_eq!(r["conn_error"], Value::Null, "{http:?}: a stream's reset, not the connection's: {r}");
        }
    }
    wait_until("the relay's flows to end", PATIENCE, || s.flows() == 0);
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn the_origins_close_code_and_reason_reach_the_client_then_the_stream_ends() {
    let s = Setup::start("close");
    for http in Http::ALL {
        // `closer` closes right after the handshake; the echo origin closes
        // when asked ("close?4000 bye").
        let r = run(&s.client(http), http, &["upstream_close@/closer/x", "close_request@/echo/x"]);
        for (case, c) in &r {
            assert_opened(http, case, c);
            assert_eq!(c["close_code"], 4000, "{http:?} {case}: {c}");
            assert_eq!(c["close_reason"], "bye", "{http:?} {case}: {c}");
            assert_eq!(c["ended"], true, "{http:?} {case}: END_STREAM / FIN / TCP close after it: {c}");
            if !http.is_h1() {
                assert_eq!(c["reset"], Value::Null, "{http:?} {case}: ended, not reset: {c}");
            }
        }
    }
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn relay_routes_ask_for_credentials_and_public_routes_do_not() {
    let s = Setup::start("auth");
    for http in Http::ALL {
        let anonymous = s.client(http).without_token();
        let r = run(&anonymous, http, &["handshake@/echo/x", "echo_text@/public/x"]);
        let x = &r["handshake@/echo/x"];
        assert_eq!(x["status"], 407, "{http:?}: auth = \"relay\" (the default) without credentials: {x}");
        assert!(x["headers"]["proxy-authenticate"].is_string(), "{http:?}: with a challenge: {x}");
        assert_echoed(http, "public", &r["echo_text@/public/x"]);
        let r = run(&s.client(http), http, &["handshake@/echo/x"]);
        assert_opened(http, "with the token", &r["handshake@/echo/x"]);
    }
}

// -- Origins over HTTP/2 extended CONNECT (RFC 8441) -------------------------

/// HTTP/2 origins (`ws_h2_origin.py`: the Python `h2` package with the
/// `websockets` sans-I/O framing; it also answers HTTP/1.1 Upgrades when
/// ALPN or the first bytes say so) and a relay whose routes reach them:
///
/// * `/h2c/`: `ws://`, `origin_http = "h2"`: prior knowledge.
/// * `/h2tls/`: `wss://`, `"h2"`: ALPN offers only h2.
/// * `/auto/`: `wss://`, `"auto"` to an origin that selects h2 and enables
///   extended CONNECT.
/// * `/fallback/`: `"auto"` to an origin that selects h2 without enabling
///   it: the relay comes back with HTTP/1.1.
/// * `/strict/`: `"h2"` to that same origin: 502.
/// * `/h1only/`: `"h2"` to an origin whose ALPN is http/1.1 only: 502.
/// * `/refused/`: `"h2"` to an origin answering 403; `/closer/`: to one
///   closing with 4000 "bye" right after the handshake.
struct H2Setup {
    relay: Relay,
    python: PathBuf,
    _origins: Vec<PyOrigin>,
    _pki: PathBuf,
}

impl H2Setup {
    #[track_caller]
    fn start(name: &str) -> Self {
        use relay_bench::pki::TestCa;
        let pki = test_dir(&format!("{name}-pki"));
        std::fs::create_dir_all(&pki).unwrap();
        let ca = TestCa::new("h2 origin CA").unwrap();
        ca.write_pem(&pki.join("ca.pem")).unwrap();
        let files = ca.issue_server(&pki, "origin", 2, "echo.test", "127.0.0.1".parse().unwrap()).unwrap();
        let (cert, key) = (files.cert.display().to_string(), files.key.display().to_string());
        let python = wsinterop::python();
        let script = wsinterop::interop_dir().join("ws_h2_origin.py");
        let start = |args: &[&str]| PyOrigin::start_script(&python, &script, args).expect("HTTP/2 origin");
        let tls = |alpn: &'static str, more: &[&'static str]| {
            let mut a =
                vec!["--subprotocol", "chat.v1", "--tls-cert", &cert, "--tls-key", &key, "--alpn", alpn];
            a.extend_from_slice(more);
            start(&a)
        };
        let h2c = start(&["--subprotocol", "chat.v1"]);
        let both = tls("h2,http/1.1", &[]);
        let no_connect = tls("h2,http/1.1", &["--no-connect-protocol"]);
        let h1only = tls("http/1.1", &[]);
        let refuser = start(&["--refuse", "403"]);
        let closer = start(&["--close", "4000", "--close-reason", "bye"]);
        let ca = pki.join("ca.pem").display().to_string();
        let route = |name: &str, origin: String, http: &str| {
            let tls = if origin.starts_with("wss") {
                format!("origin_ca_file = \"{ca}\"\norigin_server_name = \"echo.test\"\n")
            } else {
                String::new()
            };
            format!(
                "[[upstreams]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\norigin = \"{origin}\"\norigin_http = \"{http}\"\n{tls}\n"
            )
        };
        let wss = |o: &PyOrigin| format!("wss://127.0.0.1:{}", o.port());
        let routes = [
            route("h2c", h2c.origin(), "h2"),
            route("h2tls", wss(&both), "h2"),
            route("auto", wss(&both), "auto"),
            route("fallback", wss(&no_connect), "auto"),
            route("strict", wss(&no_connect), "h2"),
            route("h1only", wss(&h1only), "h2"),
            route("refused", refuser.origin(), "h2"),
            route("closer", closer.origin(), "h2"),
        ]
        .concat();
        let opts = RelayOptions { tcp_cleartext: true, extra_config: routes, ..RelayOptions::default() };
        let relay = Relay::start(&test_dir(name), &opts).expect("relay starts");
        Self { relay, python, _origins: vec![h2c, both, no_connect, h1only, refuser, closer], _pki: pki }
    }

    fn client(&self, http: Http) -> WsClient {
        WsClient::new(&self.python, &self.relay, http)
    }
}

impl Drop for H2Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._pki);
    }
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn http2_origins_get_extended_connect_and_echo_on_every_http_version() {
    let s = H2Setup::start("h2origins");
    for http in Http::ALL {
        let cases = [
            "echo_text@/h2c/x",
            "echo_binary@/h2tls/x",
            "large@/h2c/big",
            "large@/h2tls/big",
            "subprotocol@/h2c/x",
            "headers@/h2c/room?x=1",
            "headers@/h2tls/y",
            "headers@/auto/z",
            "headers@/fallback/w",
        ];
        let r = run(&s.client(http).arg("--origin-header", "https://app.example"), http, &cases);
        for case in ["echo_text@/h2c/x", "echo_binary@/h2tls/x"] {
            assert_echoed(http, case, &r[case]);
            assert_closed_cleanly(http, case, &r[case]);
        }
        // A megabyte with HTTP/2 flow control on the origin's side too.
        for case in ["large@/h2c/big", "large@/h2tls/big"] {
            let l = &r[case];
            assert_opened(http, case, l);
            assert_eq!(l["received"], 1 << 20, "{http:?} {case}: {l}");
            assert_eq!(l["identical"], true, "{http:?} {case}: {l}");
            assert_eq!(l["after"], true, "{http:?} {case}: {l}");
            assert_closed_cleanly(http, case, l);
        }
        let p = &r["subprotocol@/h2c/x"];
        assert_echoed(http, "subprotocol", p);
        assert_eq!(p["chosen"], "chat.v1", "{http:?}: the origin's choice in its 200 came back: {p}");
        // The extended CONNECT the origin received (RFC 8441 sections 4
        // and 5): pseudo-header fields, version 13, the client's Origin,
        // no key; the relay's credentials stay at the relay.
        for (case, scheme) in [("headers@/h2c/room?x=1", "http"), ("headers@/h2tls/y", "https")] {
            let h = &r[case];
            assert_opened(http, case, h);
            let seen = &h["origin"];
            assert_eq!(seen["http"], "h2", "{http:?} {case}: {seen}");
            let f = &seen["headers"];
            assert_eq!(f[":method"], "CONNECT", "{http:?} {case}: {seen}");
            assert_eq!(f[":protocol"], "websocket", "{http:?} {case}: {seen}");
            assert_eq!(f[":scheme"], scheme, "{http:?} {case}: {seen}");
            assert_eq!(f["sec-websocket-version"], "13", "{http:?} {case}: {seen}");
            assert_eq!(f["origin"], "https://app.example", "{http:?} {case}: {seen}");
            assert!(f.get("sec-websocket-key").is_none(), "{http:?} {case}: {seen}");
            assert!(f.get("proxy-authorization").is_none(), "{http:?} {case}: {seen}");
        }
        let h = &r["headers@/h2c/room?x=1"]["origin"]["headers"];
        assert_eq!(h[":path"], "/h2c/room?x=1", "{http:?}: {h}");
        assert_eq!(h[":authority"], format!("127.0.0.1:{}", s._origins[0].port()), "{http:?}: {h}");
        // auto: h2 where the origin enables extended CONNECT, HTTP/1.1 (a
        // second connection, with a key of the relay's own) where not.
        assert_eq!(r["headers@/auto/z"]["origin"]["http"], "h2", "{http:?}: {r:?}");
        let f = &r["headers@/fallback/w"];
        assert_opened(http, "fallback", f);
        assert_eq!(f["origin"]["http"], "http/1.1", "{http:?}: {f}");
        assert!(f["origin"]["headers"]["sec-websocket-key"].is_string(), "{http:?}: {f}");
    }
    wait_until("the relay's flows to end", PATIENCE, || {
        s.relay.relayctl_json(&["status"]).is_ok_and(|v| v["flows"].as_u64() == Some(0))
    });
}

#[test]
#[ignore = "needs the interop venv (Python websockets, h2, aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn http2_origins_refusals_closes_and_resets_map_end_to_end() {
    let s = H2Setup::start("h2refusals");
    for http in Http::ALL {
        let cases = [
            "handshake@/strict/x",
            "handshake@/h1only/x",
            "handshake@/refused/x",
            "upstream_close@/closer/x",
            "close_request@/h2c/x",
            "origin_reset@/h2c/x",
            "reset@/h2c/x",
        ];
        let r = run(&s.client(http), http, &cases);
        // RFC 8441 section 3: no extended CONNECT to an origin whose
        // SETTINGS do not enable it.
        for (case, details) in [
            ("handshake@/strict/x", "do not enable extended CONNECT"),
            ("handshake@/h1only/x", "did not select h2"),
        ] {
            let x = &r[case];
            assert_eq!(x["status"], 502, "{http:?} {case}: {x}");
            let ps = x["headers"]["proxy-status"].as_str().unwrap_or_default();
            assert!(ps.contains("error=http_upgrade_failed"), "{http:?} {case}: {x}");
            assert!(ps.contains(details), "{http:?} {case}: {x}");
        }
        let x = &r["handshake@/refused/x"];
        assert_eq!(x["status"], 502, "{http:?}: {x}");
        let ps = x["headers"]["proxy-status"].as_str().unwrap_or_default();
        assert!(
            ps.contains("error=http_upgrade_failed") && ps.contains("received-status=403"),
            "{http:?}: {x}"
        );
        for case in ["upstream_close@/closer/x", "close_request@/h2c/x"] {
            let c = &r[case];
            assert_opened(http, case, c);
            assert_eq!(
                (c["close_code"].as_u64(), c["close_reason"].as_str()),
                (Some(4000), Some("bye")),
                "{http:?} {case}: {c}"
            );
            assert_eq!(c["ended"], true, "{http:?} {case}: END_STREAM became the client's end: {c}");
            if !http.is_h1() {
                assert_eq!(c["reset"], Value::Null, "{http:?} {case}: ended, not reset: {c}");
            }
        }
        // The origin's RST_STREAM resets the client's stream (RFC 8441
        // section 5): CONNECT_ERROR, H3_CONNECT_ERROR; a TCP RST on HTTP/1.1.
        let o = &r["origin_reset@/h2c/x"];
        assert_echoed(http, "origin_reset", o);
        assert!(
            o["close_reason"].is_null() && o["unexpected_message"].is_null(),
            "{http:?}: no Close frame: {o}"
        );
        match http.is_h1() {
            true => assert!(o["timed_out"].is_null(), "{http:?}: the connection ended: {o}"),
            false => {
                let want = if matches!(http, Http::H3) { 0x10f } else { 0xa };
                assert_eq!(o["reset"], want, "{http:?}: {o}");
                assert_eq!(o["conn_error"], Value::Null, "{http:?}: {o}");
            }
        }
        // The client's reset mid-message ends the origin's side.
        let x = &r["reset@/h2c/x"];
        assert_echoed(http, "reset", x);
        assert_eq!(x["origin_record"]["closed"], true, "{http:?}: {x}");
        assert_eq!(x["next_matched"], 1, "{http:?}: {x}");
    }
    wait_until("the relay's flows to end", PATIENCE, || {
        s.relay.relayctl_json(&["status"]).is_ok_and(|v| v["flows"].as_u64() == Some(0))
    });
}

// -- Rust peers (tungstenite): no venv needed ------------------------------

/// A relay with one route, `echo` on /echo/, to a Rust origin.
fn rust_setup(name: &str) -> (Relay, WsEcho) {
    let origin = WsEcho::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let opts = RelayOptions {
        tcp_cleartext: true,
        extra_config: format!(
            "[[upstreams]]\nname = \"echo\"\nprotocol = \"websocket\"\npath_prefix = \"/echo/\"\norigin = \"{}\"\n",
            origin.origin()
        ),
        ..RelayOptions::default()
    };
    (Relay::start(&test_dir(name), &opts).expect("relay starts"), origin)
}

fn tls_through(relay: &Relay) -> Through {
    Through {
        addr: relay.addr,
        tls: Some(Tls { ca: relay.cert(), server_name: "localhost".into() }),
        authority: format!("localhost:{}", relay.addr.port()),
        token: Some(relay.token.clone()),
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// One of `wsecho`'s ways to open a WebSocket.
type Connect = fn(&Through, &str, Duration) -> anyhow::Result<Opened>;

#[test]
fn rust_clients_echo_through_the_relay_over_http1_http2_and_http3() {
    let (relay, origin) = rust_setup("rust-echo");
    let tls = tls_through(&relay);
    let clear = Through { addr: relay.cleartext_addr.unwrap(), tls: None, ..tls.clone() };
    let ways: [(&str, &Through, Connect); 4] = [
        ("HTTP/1.1 cleartext", &clear, wsecho::connect_h1),
        ("HTTP/1.1 over TLS", &tls, wsecho::connect_h1),
        ("HTTP/2 over TLS", &tls, wsecho::connect_h2),
        ("HTTP/3", &tls, wsecho::connect_h3),
    ];
    for (name, through, connect) in ways {
        let (mut ws, answer) = connect(through, "/echo/rust", TIMEOUT).unwrap().open().unwrap();
        assert_eq!(answer.status, if name.starts_with("HTTP/1.1") { 101 } else { 200 }, "{name}");
        for size in [0usize, 1, 125, 126, 65535, 65536, 300_000] {
            let payload = bytes::Bytes::from(relay_bench::tcp_echo::pattern(size));
            let back = wsecho::round_trip(&mut ws, Message::Binary(payload.clone())).unwrap();
            assert_eq!(back, Message::Binary(payload), "{name}: {size} bytes");
        }
        let back = wsecho::round_trip(&mut ws, Message::text("héllo")).unwrap();
        assert_eq!(back, Message::text("héllo"), "{name}");
        ws.close(None).unwrap();
        // The close reply, then the end of the stream (bounded).
        let mut ended = false;
        for _ in 0..16 {
            if ws.read().is_err() {
                ended = true;
                break;
            }
        }
        assert!(ended, "{name}: the stream ended after the closing handshake");
    }
    assert_eq!(origin.accepted(), 4);
    assert_eq!(origin.echoed(), 4 * 8);
    // Without credentials the route (auth "relay" by default) asks for them.
    let anonymous = Through { token: None, ..clear };
    match wsecho::connect_h1(&anonymous, "/echo/rust", TIMEOUT).unwrap() {
        Opened::Refused(a) => {
            assert_eq!(a.status, 407, "{a:?}");
            assert!(a.header("proxy-authenticate").is_some(), "{a:?}");
        }
        Opened::Open(..) => panic!("opened without credentials"),
    }
}

#[test]
fn relayctl_flows_lists_an_open_websocket_session_with_its_route() {
    let (relay, origin) = rust_setup("flows");
    let clear = Through {
        addr: relay.cleartext_addr.unwrap(),
        tls: None,
        authority: format!("localhost:{}", relay.addr.port()),
        token: Some(relay.token.clone()),
    };
    let (mut ws, _) = wsecho::connect_h1(&clear, "/echo/flows", TIMEOUT).unwrap().open().unwrap();
    wsecho::round_trip(&mut ws, Message::text("open")).unwrap();
    // `protocol` and `route` are the fields control adds to each flow of
    // `relayctl flows` for WebSocket sessions.
    let flows = relay.relayctl_json(&["flows"]).unwrap();
    let list = flows["flows"].as_array().unwrap_or_else(|| panic!("{flows}"));
    let ws_flows: Vec<&Value> = list.iter().filter(|f| f["protocol"] == "websocket").collect();
    assert_eq!(ws_flows.len(), 1, "one WebSocket session: {flows}");
    let f = ws_flows[0];
    assert_eq!(f["route"], "echo", "{flows}");
    assert_eq!(f["target"], origin.addr().to_string(), "the origin's address: {flows}");
    assert!(
        f["identity"].as_str().is_some_and(|i| i.starts_with("tok:")),
        "the bearer token's identity: {flows}"
    );
    ws.close(None).unwrap();
    for _ in 0..16 {
        if ws.read().is_err() {
            break;
        }
    }
    // RFC 6455 section 7.1.1: after the closing handshake the client
    // closes its TCP connection too; the relay then has both ends.
    drop(ws);
    wait_until("the WebSocket flow to end", PATIENCE, || {
        relay.relayctl_json(&["flows"]).unwrap()["flows"]
            .as_array()
            .is_some_and(|l| l.iter().all(|f| f["protocol"] != "websocket"))
    });
}

/// A raw TCP origin that reads the Upgrade request, then behaves as
/// `answer` says: hang up mid-head, send a head that is not HTTP, or keep
/// silent. Bounded: it serves `conns` connections, each held at most 15 s.
fn bad_origin(answer: &'static [u8], hang_up: bool, conns: usize) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for _ in 0..conns {
            let Ok((mut s, _)) = listener.accept() else { return };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer);
                if !hang_up {
                    // Silent (or done talking): wait for the relay to go.
                    let _ = s.read(&mut buf);
                }
            });
        }
    });
    addr
}

#[test]
fn origins_that_hang_up_answer_garbage_or_stay_silent_get_502_or_504_with_proxy_status() {
    let cut = bad_origin(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n", true, 1);
    let garbage = bad_origin(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", false, 1);
    let silent = bad_origin(b"", false, 1);
    let route = |name: &str, addr: std::net::SocketAddr| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\norigin = \"ws://{addr}\"\nauth = \"public\"\n"
        )
    };
    let opts = RelayOptions {
        tcp_cleartext: true,
        extra_config: [route("cut", cut), route("garbage", garbage), route("silent", silent)].concat(),
        ..RelayOptions::default()
    };
    let relay = Relay::start(&test_dir("bad-origins"), &opts).expect("relay starts");
    let clear = Through {
        addr: relay.cleartext_addr.unwrap(),
        tls: None,
        authority: format!("localhost:{}", relay.addr.port()),
        token: None,
    };
    // The relay's own answer deadline is 10 s: wait longer for the silent one.
    for (path, status, error) in [
        ("/cut/x", 502, "error=http_response_incomplete"),
        ("/garbage/x", 502, "error=http_protocol_error"),
        ("/silent/x", 504, "error=http_response_timeout"),
    ] {
        match wsecho::connect_h1(&clear, path, Duration::from_secs(30)).unwrap() {
            Opened::Refused(a) => {
                assert_eq!(a.status, status, "{path}: {a:?}");
                let ps = a.header("proxy-status").unwrap_or_default();
                assert!(ps.contains(error), "{path}: {a:?}");
            }
            Opened::Open(..) => panic!("{path}: opened"),
        }
    }
    assert_eq!(relay.counter("websocket_upstream_failures").unwrap(), 3);
    assert_eq!(relay.counter("websockets_opened").unwrap(), 0);
}

//! WebTransport over HTTP/3 relayed end to end (issue #19): a real relay
//! (control + dataplane) with `[[upstreams]]` routes of protocol
//! `webtransport` to WebTransport origins on loopback, driven by an
//! independent client.
//!
//! The origin (`bench/interop/wt_origin.py`) and the client
//! (`bench/interop/wt_client.py`) are aioquic's HTTP/3 with WebTransport,
//! in the interop venv: these tests are ignored by a plain `cargo test`
//! and run by `cargo xtask test` (or `cargo test -p relay-bench --test
//! webtransport -- --ignored`).
//!
//! Every test asserts behaviour (statuses, Proxy-Status fields, payloads,
//! stream and session ends with their codes, what the origin received),
//! never rates or times.

use std::path::PathBuf;

use relay_bench::pki::TestCa;
use relay_bench::processes::{Relay, RelayOptions, free_udp_port};
use relay_bench::wait::{PATIENCE, wait_until};
use relay_bench::wsinterop::PyOrigin;
use relay_bench::wtinterop::{self, WtClient};
use serde_json::Value;

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-wt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A relay whose routes reach WebTransport origins on loopback: `/echo`
/// (the origin's echo sessions), `/hosted` (only for the authority
/// `app.example`, rewritten to `/echo`, with its own `:authority`
/// upstream), `/public` (no credentials asked), `/refuse` (the origin
/// answers 403), `/plain` (an origin whose SETTINGS announce no
/// WebTransport), `/otherca` (a CA the origin's certificate does not
/// chain to), `/wrongname` (a name the certificate does not hold) and
/// `/down` (a port where nothing listens). The origin keys its records by
/// the `tag` query parameter.
struct Setup {
    relay: Relay,
    python: PathBuf,
    _echo: PyOrigin,
    _plain: PyOrigin,
    _draft16: PyOrigin,
    _bad16: PyOrigin,
    _keeper: PyOrigin,
    pki: PathBuf,
}

impl Setup {
    #[track_caller]
    fn start(name: &str) -> Self {
        Self::start_with(name, "")
    }

    /// [`Setup::start`] with `dataplane_extra` in the relay's `[dataplane]`
    /// section.
    #[track_caller]
    fn start_with(name: &str, dataplane_extra: &str) -> Self {
        let pki = test_dir(&format!("{name}-pki"));
        std::fs::create_dir_all(&pki).unwrap();
        let ca = TestCa::new("wt origin CA").unwrap();
        ca.write_pem(&pki.join("ca.pem")).unwrap();
        TestCa::new("another CA").unwrap().write_pem(&pki.join("other.pem")).unwrap();
        let files = ca.issue_server(&pki, "origin", 2, "echo.test", "127.0.0.1".parse().unwrap()).unwrap();
        let python = wtinterop::python();
        let echo = wtinterop::start_origin(&python, &files.cert, &files.key, &[]).expect("origin");
        let plain = wtinterop::start_origin(&python, &files.cert, &files.key, &["--wt-settings", "none"])
            .expect("origin without WebTransport settings");
        // Draft-16 origins: SETTINGS_WT_ENABLED only, and `webtransport-h3`
        // only; one announcing the invalid value 2.
        let draft16 =
            wtinterop::start_origin(&python, &files.cert, &files.key, &["--wt-settings", "draft16"])
                .expect("draft-16 origin");
        let bad16 = wtinterop::start_origin(
            &python,
            &files.cert,
            &files.key,
            &["--wt-settings", "draft16", "--wt-enabled", "2"],
        )
        .expect("origin with SETTINGS_WT_ENABLED = 2");
        // An origin that leaves its streams to the relay when a session ends.
        let keeper = wtinterop::start_origin(&python, &files.cert, &files.key, &["--keep-streams-on-close"])
            .expect("origin");
        let (port, plain_port) = (echo.port(), plain.port());
        let down = free_udp_port().unwrap();
        let (ca, other) =
            (pki.join("ca.pem").display().to_string(), pki.join("other.pem").display().to_string());
        let route = |name: &str, prefix: &str, port: u16, ca: &str, server: &str, extra: &str| {
            format!(
                "\n[[upstreams]]\nname = \"{name}\"\nprotocol = \"webtransport\"\npath_prefix = \"{prefix}\"\n\
                 origin = \"https://127.0.0.1:{port}\"\norigin_ca_file = \"{ca}\"\n\
                 origin_server_name = \"{server}\"\n{extra}"
            )
        };
        let routes = [
            route("echo", "/echo", port, &ca, "echo.test", ""),
            route(
                "hosted",
                "/hosted",
                port,
                &ca,
                "echo.test",
                "hosts = [\"app.example\"]\nprefix_rewrite = \"/echo\"\nhost_header = \"backend.internal\"\n",
            ),
            route(
                "public",
                "/public",
                port,
                &ca,
                "echo.test",
                "prefix_rewrite = \"/echo\"\nauth = \"public\"\n",
            ),
            route("refuse", "/refuse", port, &ca, "echo.test", ""),
            route("plain", "/plain", plain_port, &ca, "echo.test", "prefix_rewrite = \"/echo\"\n"),
            route("otherca", "/otherca", port, &other, "echo.test", "prefix_rewrite = \"/echo\"\n"),
            route("wrongname", "/wrongname", port, &ca, "wrong.test", "prefix_rewrite = \"/echo\"\n"),
            route("down", "/down", down, &ca, "echo.test", "prefix_rewrite = \"/echo\"\n"),
            // The origin's address as the name (an IP-ID, no SNI).
            route("byip", "/byip", port, &ca, "127.0.0.1", "prefix_rewrite = \"/echo\"\n"),
            route("wrongip", "/wrongip", port, &ca, "127.0.0.2", "prefix_rewrite = \"/echo\"\n"),
            route("d16", "/d16", draft16.port(), &ca, "echo.test", "prefix_rewrite = \"/echo\"\n"),
            route("bad16", "/bad16", bad16.port(), &ca, "echo.test", "prefix_rewrite = \"/echo\"\n"),
            route("keep", "/keep", keeper.port(), &ca, "echo.test", "prefix_rewrite = \"/echo\"\n"),
        ]
        .concat();
        let opts = RelayOptions {
            tcp_cleartext: true,
            extra_config: routes,
            dataplane_extra: dataplane_extra.into(),
            ..RelayOptions::default()
        };
        let relay = Relay::start(&test_dir(name), &opts).expect("relay starts");
        Self {
            relay,
            python,
            _echo: echo,
            _plain: plain,
            _draft16: draft16,
            _bad16: bad16,
            _keeper: keeper,
            pki,
        }
    }

    fn client(&self) -> WtClient {
        WtClient::new(&self.python, &self.relay).arg("--authority", "relay.example")
    }

    /// Live flows, as `relayctl status` counts them.
    fn flows(&self) -> u64 {
        self.relay.relayctl_json(&["status"]).expect("relayctl status")["flows"].as_u64().unwrap_or(u64::MAX)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki);
    }
}

#[track_caller]
fn ok(case: &str, v: &Value) {
    assert_eq!(v["ok"], true, "{case}: {v}");
    assert_eq!(v["status"], 200, "{case}: {v}");
}

#[track_caller]
fn refused(case: &str, v: &Value, status: u16, error: &str) -> String {
    assert_eq!(v["status"], status, "{case}: {v}");
    let ps = v["proxy_status"].as_str().unwrap_or_default().to_string();
    assert!(ps.contains(&format!("error={error}")), "{case}: {v}");
    ps
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn sessions_relay_streams_datagrams_and_their_ends() {
    let s = Setup::start("relay");
    let client = s.client();
    // Bidirectional and unidirectional streams both ways, byte-exact with
    // their FINs; a server-initiated bidirectional stream; datagrams.
    for case in ["echo-bidi", "echo-uni", "server-bidi", "datagram"] {
        let v = client.run(case, "/echo").unwrap();
        ok(case, &v);
    }
    // An origin named by its address: its certificate's IP-ID is checked.
    ok("byip", &client.run("echo-bidi", "/byip").unwrap());
    // Several MiB on one stream: flow control holds each hop and nothing
    // is lost or reordered.
    let v = client.clone().arg("--size", 4 << 20).run("large", "/echo?big").unwrap();
    ok("large", &v);
    // The session's end with its code and reason, either way
    // (WT_CLOSE_SESSION on the CONNECT stream, then FIN).
    let v = client
        .clone()
        .arg("--close-code", 42)
        .arg("--close-reason", "bye")
        .run("close-from-origin", "/echo")
        .unwrap();
    ok("close-from-origin", &v);
    let v = client
        .clone()
        .arg("--close-code", 7)
        .arg("--close-reason", "done here")
        .arg("--tag", "closing")
        .run("close-from-client", "/echo?tag=closing")
        .unwrap();
    ok("close-from-client", &v);
    // A stream still open when the session ends is reset with
    // WT_SESSION_GONE (section 6): by the relay, since this origin leaves
    // its streams alone; whichever side ends the session.
    for side in ["origin", "client"] {
        let v = client.clone().arg("--close-side", side).run("session-gone", "/keep").unwrap();
        ok("session-gone", &v);
        assert_eq!(v["h3_code"], 0x170d7b68, "{side}: {v}");
    }
    // Stream resets keep their code across the relay both ways.
    let v = client.clone().arg("--reset-code", 7).run("reset", "/echo").unwrap();
    ok("reset", &v);
    let v = client
        .clone()
        .arg("--reset-code", 9)
        .arg("--tag", "resets")
        .run("client-reset", "/echo?tag=resets")
        .unwrap();
    ok("client-reset", &v);
    // What the origin received: the rewritten path, the route's
    // :authority, and no credentials of the client.
    let v = client
        .clone()
        .arg("--authority", "app.example")
        .arg("--origin", "https://app.example")
        .arg("--tag", "hosted")
        .run("record", "/hosted?tag=hosted")
        .unwrap();
    ok("record", &v);
    let record = &v["record"];
    assert_eq!(record["authority"], "backend.internal", "{v}");
    assert_eq!(record["path"], "/echo?tag=hosted", "{v}");
    assert_eq!(record["protocol"], "webtransport", "{v}");
    assert_eq!(record["headers"]["origin"], "https://app.example", "{v}");
    assert!(record["headers"].get("proxy-authorization").is_none(), "{v}");
    assert!(record["headers"].get("authorization").is_none(), "{v}");
    // The relay's counters saw the sessions; every flow ends.
    assert!(s.relay.counter("webtransport_sessions_opened").unwrap() >= 12);
    assert!(s.relay.counter("webtransport_streams").unwrap() > 0);
    assert!(s.relay.counter("webtransport_datagrams").unwrap() > 0);
    wait_until("the sessions' flows to end", PATIENCE, || s.flows() == 0);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn draft16_settings_and_token_on_both_hops() {
    let s = Setup::start("draft16");
    // A draft-16 client: it sends only SETTINGS_WT_ENABLED, requires it
    // (or an older draft's setting) from the relay, and asks with
    // `webtransport-h3` (draft-16 sections 3.1 and 3.2).
    let client = s.client().arg("--wt-settings", "draft16").arg("--protocol", "webtransport-h3");
    for case in ["echo-bidi", "datagram"] {
        let v = client.run(case, "/echo").unwrap();
        ok(case, &v);
        assert_eq!(v["peer_settings"]["0x2c7cf000"], 1, "the relay announces SETTINGS_WT_ENABLED = 1: {v}");
    }
    // Towards a draft-16 origin (WT_ENABLED only, `webtransport-h3` only)
    // the relay asks with draft-16's token whatever the client used; an
    // older origin gets `webtransport` (the `record` case of
    // sessions_relay_streams_datagrams_and_their_ends).
    for protocol in ["webtransport", "webtransport-h3"] {
        let tag = format!("d16-{protocol}");
        let v = s
            .client()
            .arg("--protocol", protocol)
            .arg("--tag", &tag)
            .run("record", &format!("/d16?tag={tag}"))
            .unwrap();
        ok("record", &v);
        assert_eq!(v["record"]["protocol"], "webtransport-h3", "{v}");
        ok("echo-bidi", &s.client().arg("--protocol", protocol).run("echo-bidi", "/d16").unwrap());
    }
    // An origin announcing SETTINGS_WT_ENABLED = 2: the relay's client
    // side treats it as H3_SETTINGS_ERROR and the client gets 502.
    let v = s.client().run("status", "/bad16").unwrap();
    let ps = refused("bad16", &v, 502, "http_protocol_error");
    assert!(ps.contains("SETTINGS_WT_ENABLED is 2"), "{v}");
    wait_until("the sessions' flows to end", PATIENCE, || s.flows() == 0);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn refusals_carry_exact_statuses_and_proxy_status() {
    let s = Setup::start("refusals");
    let status = |client: WtClient, path: &str| client.run("status", path).unwrap();
    // No route for the path (or the route's host does not match).
    assert_eq!(status(s.client(), "/nowhere")["status"], 404);
    assert_eq!(status(s.client(), "/hosted")["status"], 404);
    // No credentials: 407 with the challenge; a public route asks none.
    assert_eq!(status(s.client().without_token(), "/echo")["status"], 407);
    let v = s.client().without_token().run("echo-bidi", "/public").unwrap();
    ok("public", &v);
    // The origin refused the session.
    let v = status(s.client(), "/refuse");
    let ps = refused("refuse", &v, 502, "http_upgrade_failed");
    assert!(ps.contains("received-status=403"), "{v}");
    // The origin does not announce WebTransport in its SETTINGS.
    let v = status(s.client(), "/plain");
    let ps = refused("plain", &v, 502, "http_protocol_error");
    assert!(ps.contains("WebTransport"), "{v}");
    // The origin's certificate does not verify.
    for path in ["/otherca", "/wrongname", "/wrongip"] {
        refused(path, &status(s.client(), path), 502, "tls_certificate_error");
    }
    // Nothing listens at the origin's address.
    let v = status(s.client(), "/down");
    assert!(
        v["status"] == 502
            && v["proxy_status"].as_str().unwrap_or_default().contains("error=connection_refused")
            || v["status"] == 504,
        "{v}"
    );
    // WebTransport over HTTP/2 is another draft: the TCP front answers 501
    // (RFC 8441 section 4, an unsupported :protocol).
    assert_eq!(h2_webtransport_status(&s.relay), 501);
    assert!(s.relay.counter("webtransport_upstream_failures").unwrap() >= 5);
    wait_until("the refused flows to end", PATIENCE, || s.flows() == 0);
}

/// The status of an extended CONNECT with `:protocol webtransport` sent
/// over HTTP/2 (TLS) to the relay.
fn h2_webtransport_status(relay: &Relay) -> u16 {
    use relay_bench::h2client;
    let t = h2client::default_target(relay.addr, &relay.cert(), Some(relay.token.clone()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = h2client::connect(&t).await.unwrap();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://localhost:{}/echo", t.relay.port()))
            .header("proxy-authorization", format!("Bearer {}", relay.token))
            .extension(h2::ext::Protocol::from_static("webtransport"))
            .body(())
            .unwrap();
        let (resp, _send) = client.send_request(req, false).unwrap();
        resp.await.unwrap().status().as_u16()
    })
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn sessions_show_in_relayctl_flows_with_their_kind() {
    let s = Setup::start("flows");
    // A long transfer keeps a session open while the listing is read.
    let client = s.client().arg("--size", 16 << 20).arg("--timeout", 60);
    let transfer = std::thread::spawn(move || client.run("large", "/echo?listed"));
    let mut seen = Value::Null;
    wait_until("the session in relayctl flows", PATIENCE, || {
        let flows = s.relay.relayctl_json(&["flows"]).unwrap();
        let found =
            flows["flows"].as_array().and_then(|l| l.iter().find(|f| f["protocol"] == "webtransport"));
        if let Some(f) = found {
            seen = f.clone();
        }
        found.is_some()
    });
    assert_eq!(seen["route"], "echo", "{seen}");
    assert!(seen["target"].as_str().is_some_and(|t| t.starts_with("127.0.0.1:")), "{seen}");
    let v = transfer.join().unwrap().unwrap();
    ok("large", &v);
    wait_until("the flow to end", PATIENCE, || s.flows() == 0);
}

#[test]
#[ignore = "needs the interop venv (aioquic; `cargo xtask setup`): run by `cargo xtask test`"]
fn a_draining_relay_sends_wt_drain_session_and_keeps_serving_the_session() {
    let s = Setup::start_with("drain", "drain_timeout_secs = 30");
    let client = s.client().arg("--timeout", 30);
    let session = std::thread::spawn(move || client.run("drain", "/echo"));
    wait_until("the session in relayctl flows", PATIENCE, || {
        s.relay.relayctl_json(&["flows"]).is_ok_and(|f| {
            f["flows"].as_array().is_some_and(|l| l.iter().any(|f| f["protocol"] == "webtransport"))
        })
    });
    // Drain (SIGTERM): GOAWAY on the connection, and section 4.7's
    // WT_DRAIN_SESSION on the session, which keeps working until the client
    // ends it.
    s.relay.signal_dataplane(libc::SIGTERM);
    let v = session.join().unwrap().unwrap();
    ok("drain", &v);
    assert_eq!(v["peer_fin"], true, "the relay ended the session with FIN after the client's close: {v}");
}

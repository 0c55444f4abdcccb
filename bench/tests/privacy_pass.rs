//! Privacy Pass end to end (RFC 9577, RFC 9578): a real relay challenges
//! with `Proxy-Authenticate: PrivateToken ...`, an independent client and
//! test issuer (`bench/privacypass/pp.mjs` on Cloudflare's
//! `@cloudflare/privacypass-ts`) reads the challenge, runs the issuance
//! protocol and produces the token, and the request is retried with it:
//! over HTTP/3 (the bench's quiche client), HTTP/2 (the Python `h2`
//! package) and HTTP/1.1 (a plain socket), for connect-udp, bound UDP and
//! classic CONNECT. Every refusal is checked with its exact Proxy-Status.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use relay_bench::client::{Answer, Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::needs::{Need, require};
use relay_bench::privacypass::{Issuer, TokenType};
use relay_bench::processes::{Relay, RelayOptions};
use relay_bench::tcp_echo::TcpEcho;
use relay_bench::wait::{PATIENCE, wait_until};

const T: Duration = Duration::from_secs(5);

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-pp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A relay accepting bearer tokens and Privacy Pass tokens of `issuer`
/// (type 2 by its public key, type 1 by its private key), plus an
/// `expired` type 2 key whose `not_after` has passed.
fn start(dir: &std::path::Path, issuer: &Issuer, expired: &Issuer, extra: &str) -> Relay {
    let opts = RelayOptions {
        tcp_cleartext: true,
        auth_extra: "schemes = [\"bearer\", \"private_token\"]\n".into(),
        extra_config: format!(
            r#"[protocols]
bind = true

[auth.privacy_pass]
issuer_name = "issuer.example"
origin_info = ["relay.example"]
redemption_window_secs = 3600

[[auth.privacy_pass.keys]]
token_type = 2
public_key_file = "{}"

[[auth.privacy_pass.keys]]
token_type = 1
private_key_file = "{}"

[[auth.privacy_pass.keys]]
token_type = 2
public_key_file = "{}"
not_before = 1000
not_after = 2000
{extra}
"#,
            issuer.blind_rsa_public_key().display(),
            issuer.voprf_private_key().display(),
            expired.blind_rsa_public_key().display(),
        ),
        ..RelayOptions::default()
    };
    Relay::start(dir, &opts).expect("relay starts with Privacy Pass")
}

fn client(relay: &Relay) -> Client {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    let mut c = Client::connect(cfg, T).expect("QUIC connects");
    c.wait_settings(T).unwrap();
    c
}

fn all(a: &Answer, name: &str) -> Vec<String> {
    match a {
        Answer::Response(h) => h.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect(),
        Answer::Reset(_) => Vec::new(),
    }
}

/// connect-udp to `target` with `authorization` (none: no credentials).
fn ask(c: &mut Client, target: std::net::SocketAddr, authorization: Option<&str>) -> (u64, Answer) {
    let mut h = c.connect_udp_headers(&target.ip().to_string(), target.port());
    if let Some(a) = authorization {
        h.push(("proxy-authorization".into(), a.to_string()));
    }
    let id = c.send_raw_request(&h, false).unwrap();
    (id, c.wait_answer(id, T).unwrap())
}

/// A 407 with `details`; returns its challenges.
#[track_caller]
fn refused(a: &Answer, details: &str) -> Vec<String> {
    assert_eq!(a.status(), Some(407), "{a:?}");
    assert_eq!(
        a.header("proxy-status"),
        Some(format!("test-relay; error=http_request_denied; details=\"{details}\"").as_str()),
        "{a:?}"
    );
    all(a, "proxy-authenticate")
}

fn echo_once(c: &mut Client, id: u64, payload: &[u8]) {
    assert!(c.send_datagram(id, payload).unwrap());
    let mut got = Vec::new();
    wait_until("the echo through the tunnel", PATIENCE, || {
        c.drive(Duration::from_millis(10)).unwrap();
        got.extend(c.take_datagrams(id));
        !got.is_empty()
    });
    assert_eq!(got[0], payload);
}

#[test]
#[ignore = "needs node and the Privacy Pass client (`cargo xtask setup`): run by `cargo xtask test`"]
fn privacy_pass_tokens_from_an_independent_issuer_open_tunnels_once_each_and_refusals_are_exact() {
    require(&[Need::PrivacyPassClient]);
    let dir = test_dir("h3");
    let issuer = Issuer::generate(&dir.join("issuer")).unwrap();
    let other = Issuer::generate(&dir.join("other")).unwrap();
    let expired = Issuer::generate(&dir.join("expired")).unwrap();
    let relay = start(&dir, &issuer, &expired, "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = echo.addr();
    let mut c = client(&relay);

    // No credentials: 407, challenged for every accepted scheme and type.
    let (_, a) = ask(&mut c, target, None);
    let challenges = refused(&a, "authentication required");
    assert_eq!(challenges.len(), 3, "{challenges:?}");
    assert_eq!(challenges[0], "Bearer realm=\"test\"");
    assert!(challenges[1..].iter().all(|c| c.starts_with("PrivateToken challenge=\"")), "{challenges:?}");
    assert!(challenges[1..].iter().all(|c| c.contains(", token-key=\"") && c.contains(", max-age=")));

    // A type 2 token for the challenge opens a tunnel that carries UDP.
    let tokens = issuer.tokens(TokenType::BlindRsa, &challenges, 2).unwrap();
    assert!(tokens[0].starts_with("PrivateToken token="), "{tokens:?}");
    let (id, a) = ask(&mut c, target, Some(&tokens[0]));
    assert_eq!(a.status(), Some(200), "{a:?}");
    echo_once(&mut c, id, b"privately passed");
    // The same token again: refused, whatever the tunnel kind.
    let (_, a) = ask(&mut c, target, Some(&tokens[0]));
    let again = refused(&a, "token replayed");
    assert_eq!(again.len(), 3, "a refused token is challenged again: {again:?}");
    // A second token of the batch is good once.
    let (_, a) = ask(&mut c, target, Some(&tokens[1]));
    assert_eq!(a.status(), Some(200), "{a:?}");

    // Type 1 (VOPRF): verified by control with the issuer's private key.
    let t1 = issuer.token(TokenType::Voprf, &challenges).unwrap();
    let (id, a) = ask(&mut c, target, Some(&t1));
    assert_eq!(a.status(), Some(200), "{a:?}");
    echo_once(&mut c, id, b"type 1");
    let (_, a) = ask(&mut c, target, Some(&t1));
    refused(&a, "token replayed");

    // A token for another origin's challenge.
    let foreign = issuer.token_for_origin(TokenType::BlindRsa, &challenges, "other.example").unwrap();
    let (_, a) = ask(&mut c, target, Some(&foreign));
    refused(&a, "token for another challenge");
    // A key the relay never had.
    let unknown = other.token_any_key(TokenType::BlindRsa, &challenges).unwrap();
    let (_, a) = ask(&mut c, target, Some(&unknown));
    refused(&a, "unknown token key");
    // A key past its not_after.
    let old = expired.token_any_key(TokenType::BlindRsa, &challenges).unwrap();
    let (_, a) = ask(&mut c, target, Some(&old));
    refused(&a, "token key expired");
    // Garbage: 407, never a crash (the relay answers the next request).
    for garbage in [
        "PrivateToken",
        "PrivateToken token=",
        "PrivateToken token=!!!!",
        "PrivateToken token=\"AAIA\"",
        "PrivateToken token=AAMAAAAA",
        "PrivateToken token=\"unterminated",
        "privatetoken token=QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB",
    ] {
        let (_, a) = ask(&mut c, target, Some(garbage));
        refused(&a, "malformed token");
    }
    // A forged authenticator.
    let fresh = issuer.token(TokenType::BlindRsa, &challenges).unwrap();
    let mut forged = fresh.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let (_, a) = ask(&mut c, target, Some(&forged));
    refused(&a, "invalid token");
    // ... which spent nothing: the genuine token still works.
    let (_, a) = ask(&mut c, target, Some(&fresh));
    assert_eq!(a.status(), Some(200), "{a:?}");
    // Bearer tokens still work beside Privacy Pass.
    let (_, a) = ask(&mut c, target, Some(&format!("Bearer {}", relay.token)));
    assert_eq!(a.status(), Some(200), "{a:?}");

    // Bound UDP with a token.
    let mut h = c.bind_headers();
    h.push(("proxy-authorization".into(), issuer.token(TokenType::BlindRsa, &challenges).unwrap()));
    let id = c.send_raw_request(&h, false).unwrap();
    let a = c.wait_answer(id, T).unwrap();
    assert_eq!(a.status(), Some(200), "bound UDP: {a:?}");
    assert_eq!(a.header("connect-udp-bind"), Some("?1"));

    // Classic CONNECT over HTTP/3 with a token.
    let tcp = TcpEcho::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let token = issuer.token(TokenType::BlindRsa, &challenges).unwrap();
    let h = vec![
        (":method".to_string(), "CONNECT".to_string()),
        (":authority".into(), tcp.addr().to_string()),
        ("proxy-authorization".into(), token),
    ];
    let id = c.send_raw_request(&h, false).unwrap();
    assert_eq!(c.wait_answer(id, T).unwrap().status(), Some(200));

    // The quota key of a token is its issuer key: shown in the flow list.
    let flows = relay.admin(r#"{"cmd":"flows"}"#).unwrap();
    assert!(flows.to_string().contains("pp:blind-rsa:"), "flows name the issuer key: {flows}");
    assert!(flows.to_string().contains("pp:voprf:"), "{flows}");
}

#[test]
#[ignore = "needs node, the Privacy Pass client and the interop venv: run by `cargo xtask test`"]
fn privacy_pass_tokens_over_http2_and_http1() {
    require(&[Need::PrivacyPassClient, Need::InteropVenv]);
    let python = relay_bench::interop::python();
    let dir = test_dir("tcp");
    let issuer = Issuer::generate(&dir.join("issuer")).unwrap();
    let expired = Issuer::generate(&dir.join("expired")).unwrap();
    let relay = start(&dir, &issuer, &expired, "");
    let tcp = TcpEcho::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = tcp.addr();

    // HTTP/1.1 (cleartext, a plain socket): the challenge, then the token.
    let connect = |authorization: Option<&str>| -> (String, TcpStream) {
        let mut s = TcpStream::connect(relay.cleartext_addr.unwrap()).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let auth = authorization.map(|a| format!("Proxy-Authorization: {a}\r\n")).unwrap_or_default();
        write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("a response head");
            head.push(b[0]);
        }
        (String::from_utf8_lossy(&head).into_owned(), s)
    };
    let (head, _) = connect(None);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    let challenges: Vec<String> = head
        .lines()
        .filter_map(|l| {
            l.strip_prefix("proxy-authenticate: ").or_else(|| l.strip_prefix("Proxy-Authenticate: "))
        })
        .map(str::to_string)
        .collect();
    assert_eq!(challenges.len(), 3, "{head}");
    let token = issuer.token(TokenType::BlindRsa, &challenges).unwrap();
    let (head, mut s) = connect(Some(&token));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"over http/1.1").unwrap();
    let mut back = [0u8; 13];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over http/1.1");
    let (head, _) = connect(Some(&token));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(head.contains("details=\"token replayed\""), "{head}");

    // HTTP/2 (the Python h2 client), TLS: a classic CONNECT and a refusal.
    let t1 = issuer.token(TokenType::Voprf, &challenges).unwrap();
    let args = |auth: &str| {
        vec![
            "--relay".to_string(),
            relay.addr.to_string(),
            "--tls".into(),
            "--ca".into(),
            relay.cert().display().to_string(),
            "--authorization".into(),
            auth.to_string(),
            "--target-port".into(),
            target.port().to_string(),
            "--bytes".into(),
            "65536".into(),
            "tcp_connect".into(),
        ]
    };
    let r = &relay_bench::interop::run_h2_client(&python, &args(&t1)).unwrap()["tcp_connect"];
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["identical"], true, "{r}");
    let r = &relay_bench::interop::run_h2_client(&python, &args(&t1)).unwrap()["tcp_connect"];
    assert_eq!(r["status"], 407, "{r}");
    assert_eq!(
        r["headers"]["proxy-status"], "test-relay; error=http_request_denied; details=\"token replayed\"",
        "{r}"
    );
}

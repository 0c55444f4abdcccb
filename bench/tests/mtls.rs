//! Mutual TLS end to end (`[auth.mtls]`): a real relay (control +
//! dataplane) with a CA bundle, a revocation list and an identity rule,
//! and clients presenting certificates of a test PKI
//! ([`relay_bench::pki`]): over HTTP/3 with the quiche client, and over the
//! TCP front with Debian's curl (`--proxy-cert`, classic CONNECT).
//!
//! What each certificate gets:
//! * from the right CA, mapped by a rule: the tunnel opens (200);
//! * from another CA: the handshake fails with TLS alert 48 `unknown_ca`;
//! * expired: TLS alert 45 `certificate_expired`;
//! * revoked by the CRL (also after `relayctl reload` picked a new one
//!   up): 407, `Proxy-Status: ...; error=http_request_denied;
//!   details="client certificate revoked"`;
//! * from the right CA but no rule maps it: 407, `details="client
//!   certificate not authorized"`;
//! * none, with `mode = "required"`: TLS alert 116 `certificate_required`.
//!
//! The curl test is ignored by a plain `cargo test` and run by `cargo
//! xtask test` where curl is present.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use relay_bench::client::{Answer, Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::needs::{Need, require};
use relay_bench::pki::{ClientFiles, TestCa};
use relay_bench::processes::{Relay, RelayOptions, bin_dir};
use relay_bench::tcp_echo::TcpEcho;
use relay_bench::wait::PATIENCE;

/// Serials of the test PKI's client certificates.
const GOOD: u32 = 2;
const REVOKED: u32 = 3;
const EXPIRED: u32 = 4;
const UNMAPPED: u32 = 5;

/// The PKI and a relay that trusts its CA.
struct Setup {
    dir: PathBuf,
    ca: TestCa,
    relay: Relay,
    good: ClientFiles,
    revoked: ClientFiles,
    expired: ClientFiles,
    unmapped: ClientFiles,
    stranger: ClientFiles,
}

fn setup(name: &str) -> Setup {
    setup_with(name, "optional")
}

fn setup_with(name: &str, mode: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("relay-mtls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = TestCa::new("Relay Clients CA").unwrap();
    ca.write_pem(&pki.join("ca.pem")).unwrap();
    std::fs::write(pki.join("crl.der"), ca.crl(&[REVOKED]).unwrap()).unwrap();
    let good = ca.issue_valid(&pki, "good", GOOD, "ingress.example").unwrap();
    let revoked = ca.issue_valid(&pki, "revoked", REVOKED, "ingress.example").unwrap();
    let expired = ca.issue_expired(&pki, "expired", EXPIRED, "ingress.example").unwrap();
    let unmapped = ca.issue_valid(&pki, "unmapped", UNMAPPED, "nobody.example").unwrap();
    let other = TestCa::new("Stranger CA").unwrap();
    let stranger = other.issue_valid(&pki, "stranger", GOOD, "ingress.example").unwrap();
    let extra_config = format!(
        "[auth.mtls]\nmode = \"{mode}\"\nca_files = [\"{ca}\"]\ncrl_files = [\"{crl}\"]\n\
         [[auth.mtls.identities]]\nname = \"ingress\"\nfield = \"san_dns\"\nequals = \"ingress.example\"\n",
        ca = pki.join("ca.pem").display(),
        crl = pki.join("crl.der").display(),
    );
    let opts = RelayOptions { extra_config, ..RelayOptions::default() };
    let relay = Relay::start(&dir.join("relay"), &opts).expect("relay starts");
    Setup { dir: pki, ca, relay, good, revoked, expired, unmapped, stranger }
}

fn config(relay: &Relay, cert: Option<&ClientFiles>) -> ClientConfig {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.client_cert = cert.map(|c| (c.cert.clone(), c.key.clone()));
    cfg
}

/// Opens a connect-udp tunnel towards `echo` and returns the answer.
fn ask(cfg: ClientConfig, echo: &EchoServer) -> Answer {
    let mut c = Client::connect(cfg, PATIENCE).expect("handshake");
    let stream = c.request_udp("127.0.0.1", echo.addr().port()).expect("request sent");
    c.wait_answer(stream, PATIENCE).expect("an answer")
}

/// The TLS alert the relay closed the handshake with. In TLS 1.3 the client
/// finishes its side before the relay has checked its certificate, so the
/// alert may come as the handshake's failure or as the connection's close
/// right after it (a request sent meanwhile is never answered).
fn alert(cfg: ClientConfig) -> String {
    let mut c = match Client::connect(cfg, PATIENCE) {
        Err(e) => return e.to_string(),
        Ok(c) => c,
    };
    let _ = c.request_udp("127.0.0.1", 9);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(err) = c.closed() {
            return match err {
                Some((false, code)) if (0x100..0x200).contains(&code) => {
                    format!("TLS alert {}", code - 0x100)
                }
                other => format!("closed without a TLS alert: {other:?}"),
            };
        }
        assert!(Instant::now() < deadline, "the relay did not close the connection");
        c.drive(Duration::from_millis(20)).unwrap();
    }
}

fn proxy_status(a: &Answer) -> String {
    a.header("proxy-status").unwrap_or_default().to_string()
}

#[track_caller]
fn assert_refused(a: &Answer, details: &str) {
    assert_eq!(a.status(), Some(407), "{a:?}");
    let ps = proxy_status(a);
    assert!(ps.contains("error=http_request_denied"), "{ps}");
    assert!(ps.contains(&format!("details=\"{details}\"")), "{ps}");
}

fn relayctl_reload(relay: &Relay) -> String {
    let out = Command::new(bin_dir().unwrap().join("relayctl"))
        .arg("--socket")
        .arg(relay.admin_socket())
        .arg("reload")
        .output()
        .expect("relayctl runs");
    assert!(out.status.success(), "relayctl reload: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn client_certificates_over_http3_get_in_or_the_documented_refusal() {
    let s = setup("h3");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let relay = &s.relay;

    // The right CA, mapped by the rule, no token: in.
    let a = ask(config(relay, Some(&s.good)), &echo);
    assert_eq!(a.status(), Some(200), "{a:?}");
    // Optional mode: no certificate, a token as ever; neither: 407.
    let mut with_token = config(relay, None);
    with_token.token = Some(relay.token.clone());
    assert_eq!(ask(with_token, &echo).status(), Some(200));
    assert_refused(&ask(config(relay, None), &echo), "authentication required");

    // Revoked by the CRL, even with a valid token beside it.
    let mut revoked = config(relay, Some(&s.revoked));
    revoked.token = Some(relay.token.clone());
    assert_refused(&ask(revoked, &echo), "client certificate revoked");
    // The right CA, no rule for it.
    assert_refused(&ask(config(relay, Some(&s.unmapped)), &echo), "client certificate not authorized");

    // Another CA, and an expired certificate: the handshake's alert.
    let wrong = alert(config(relay, Some(&s.stranger)));
    assert!(wrong.contains("TLS alert 48"), "another CA: {wrong}");
    let expired = alert(config(relay, Some(&s.expired)));
    assert!(expired.contains("TLS alert 45"), "expired: {expired}");

    // A new CRL revokes the good certificate once `relayctl reload` reads it.
    std::fs::write(s.dir.join("crl.der"), s.ca.crl(&[REVOKED, GOOD]).unwrap()).unwrap();
    let out = relayctl_reload(relay);
    assert!(out.contains("revocation lists: 1 in force, 2 revoked"), "{out}");
    assert_refused(&ask(config(relay, Some(&s.good)), &echo), "client certificate revoked");
    let show = Command::new(bin_dir().unwrap().join("relayctl"))
        .arg("--socket")
        .arg(relay.admin_socket())
        .args(["--json", "policy", "show"])
        .output()
        .unwrap();
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).expect("policy show JSON");
    assert_eq!(show["mtls"]["identities"], serde_json::json!(["ingress"]));
    assert_eq!(show["mtls"]["crls"]["revoked"], 2);
    assert!(show["refusals"]["auth"]["cert_revoked"].as_u64().unwrap_or(0) >= 2, "{show}");
    // A list that does not load keeps the one in force, and reload says so.
    std::fs::write(s.dir.join("crl.der"), b"not a CRL").unwrap();
    let out = Command::new(bin_dir().unwrap().join("relayctl"))
        .arg("--socket")
        .arg(relay.admin_socket())
        .arg("reload")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revocation lists not reloaded"));
    assert_refused(&ask(config(relay, Some(&s.good)), &echo), "client certificate revoked");
}

#[test]
fn required_mode_refuses_handshakes_without_a_certificate() {
    let s = setup_with("required", "required");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let relay = &s.relay;
    assert_eq!(ask(config(relay, Some(&s.good)), &echo).status(), Some(200));
    let mut token_only = config(relay, None);
    token_only.token = Some(relay.token.clone());
    let refused = alert(token_only);
    assert!(refused.contains("TLS alert 116"), "no certificate: {refused}");
}

/// curl through the TCP front (HTTP/1.1 CONNECT over TLS): returns the
/// CONNECT's status (0 when there was none) and curl's stderr.
fn curl_connect(relay: &Relay, cert: &ClientFiles, target: std::net::SocketAddr) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_connect}"])
        .arg("--proxy")
        .arg(format!("https://localhost:{}", relay.addr.port()))
        .arg("--proxy-cacert")
        .arg(relay.cert())
        .arg("--proxy-cert")
        .arg(&cert.cert)
        .arg("--proxy-key")
        .arg(&cert.key)
        .arg("--proxytunnel")
        .arg(format!("http://{target}/"))
        .output()
        .expect("curl runs");
    let code = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    (code, String::from_utf8_lossy(&out.stderr).to_ascii_lowercase())
}

#[test]
#[ignore = "needs curl: run by `cargo xtask test`"]
fn client_certificates_over_the_tcp_front_get_in_or_the_documented_refusal() {
    require(&[Need::Curl]);
    let s = setup("tcp");
    let target = TcpEcho::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let relay = &s.relay;
    let (code, err) = curl_connect(relay, &s.good, target.addr());
    assert_eq!(code, 200, "{err}");
    let (code, err) = curl_connect(relay, &s.revoked, target.addr());
    assert_eq!(code, 407, "{err}");
    let (code, err) = curl_connect(relay, &s.unmapped, target.addr());
    assert_eq!(code, 407, "{err}");
    let (code, err) = curl_connect(relay, &s.stranger, target.addr());
    assert!(code == 0 && err.contains("unknown ca"), "another CA: {code} {err}");
    let (code, err) = curl_connect(relay, &s.expired, target.addr());
    assert!(code == 0 && err.contains("certificate expired"), "expired: {code} {err}");
}

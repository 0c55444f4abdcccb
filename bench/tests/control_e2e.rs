//! End-to-end tests of the control plane's policy: HMAC tokens minted with
//! the real `relayctl`, revocation, expiry, quotas, run-time policy changes
//! and the admin socket's access checks, against a real `relay-control`
//! and `relay-dataplane`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use relay_bench::client::{Answer, Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::load::{EchoLoad, run_echo};
use relay_bench::processes::{Relay, RelayOptions, bin_dir};
use relay_bench::wait::{PATIENCE, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(5);
const HMAC_SECRET_HEX: &str = "5e1f0c3a9b7d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-ctl-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A relay with HMAC key `k1` (from a 0600 secret file) and `k2` (inline),
/// plus `extra` config.
fn start(name: &str, extra: &str) -> Relay {
    start_with_tls(name, extra, "")
}

/// As [`start`], with `tls_extra` in the `[tls]` section.
fn start_with_tls(name: &str, extra: &str, tls_extra: &str) -> Relay {
    let dir = test_dir(name);
    let secret = dir.join("hmac-k1");
    std::fs::write(&secret, format!("{HMAC_SECRET_HEX}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra_config = format!(
        "[[auth.hmac_keys]]\nid = \"k1\"\nsecret_file = \"{}\"\n\n[[auth.hmac_keys]]\nid = \"k2\"\nsecret_hex = \"{}\"\n\n{extra}\n",
        secret.display(),
        "42".repeat(32),
    );
    let opts = RelayOptions { extra_config, tls_extra: tls_extra.to_string(), ..Default::default() };
    Relay::start(&dir, &opts).expect("relay starts")
}

fn relayctl_as(socket: &Path, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(bin_dir().unwrap().join("relayctl"));
    cmd.arg("--socket").arg(socket).args(args);
    adjust(&mut cmd);
    cmd.output().expect("relayctl runs")
}

fn relayctl(relay: &Relay, args: &[&str]) -> Output {
    relayctl_as(&relay.admin_socket(), args, |_| {})
}

/// Runs `relayctl --json ARGS`, requires success, parses the output.
fn relayctl_json(relay: &Relay, args: &[&str]) -> Value {
    relay.relayctl_json(args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn mint(relay: &Relay, subject: &str, ttl: &str) -> (String, u64) {
    let v = relayctl_json(relay, &["token", "mint", "--subject", subject, "--ttl", ttl]);
    (v["token"].as_str().unwrap().to_string(), v["expires_unix"].as_u64().unwrap())
}

fn client(relay: &Relay, token: &str) -> Client {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(token.to_string());
    let mut c = Client::connect(cfg, T).expect("client connects");
    c.wait_settings(T).unwrap();
    c
}

/// One CONNECT on `c` with `token` in Proxy-Authorization.
fn connect_as(c: &mut Client, token: &str, port: u16) -> (u64, Answer) {
    let mut h = c.connect_udp_headers("127.0.0.1", port);
    h.retain(|(n, _)| n != "proxy-authorization");
    h.push(("proxy-authorization".into(), format!("Bearer {token}")));
    let id = c.send_raw_request(&h, false).unwrap();
    (id, c.wait_answer(id, T).unwrap())
}

fn proxy_status(a: &Answer) -> String {
    a.header("proxy-status").unwrap_or_default().to_string()
}

fn assert_407(a: &Answer, what: &str) {
    assert_eq!(a.status(), Some(407), "{what}: {a:?}");
    let ps = proxy_status(a);
    assert!(ps.contains("error=http_request_denied"), "{what}: {ps}");
    // Every bad credential looks the same to the client.
    assert!(ps.contains("details=\"invalid credentials\""), "{what}: {ps}");
    assert!(a.header("proxy-authenticate").is_some(), "{what}: a challenge");
}

fn assert_429(a: &Answer, which: &str) {
    assert_eq!(a.status(), Some(429), "{which}: {a:?}");
    let ps = proxy_status(a);
    assert!(ps.contains("error=http_request_denied"), "{ps}");
    assert!(ps.contains(&format!("details=\"quota exceeded: {which}\"")), "{ps}");
}

fn echo_round(c: &mut Client, stream: u64, n: u64, size: usize, what: &str) {
    let load = EchoLoad { count: n, size, window: 8, capsules: false, stall_timeout: T };
    let r = run_echo(c, &[stream], &load).unwrap();
    assert_eq!((r.received, r.lost, r.corrupt), (n, 0, 0), "the tunnel forwards ({what})");
}

fn live_flows(relay: &Relay) -> u64 {
    relayctl_json(relay, &["status"])["flows"].as_u64().unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn minted_token_opens_a_tunnel_and_revocation_refuses_new_connects_only() {
    let mut relay = start("revoke", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let (alice, expires) = mint(&relay, "alice", "1h");
    assert!(alice.starts_with("v1.k1.") && alice.contains(".alice."), "{alice}");
    assert!((unix_now() + 3590..=unix_now() + 3600).contains(&expires));
    // The human form prints the token alone on stdout.
    let out = relayctl(&relay, &["token", "mint", "--subject", "bob", "--ttl", "10m", "--key-id", "k2"]);
    assert!(out.status.success());
    let bob = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(bob.starts_with("v1.k2.") && bob.contains(".bob."), "{bob}");

    let mut c = client(&relay, &alice);
    let alice_stream = c.open_udp("127.0.0.1", port, T).expect("an HMAC token opens a tunnel");
    echo_round(&mut c, alice_stream, 20, 200, "alice before revocation");
    let (bob_stream, a) = connect_as(&mut c, &bob, port);
    assert_eq!(a.status(), Some(200), "a token of the second key");
    let flows = relayctl_json(&relay, &["flows"]);
    let identities: Vec<&str> =
        flows["flows"].as_array().unwrap().iter().map(|f| f["identity"].as_str().unwrap()).collect();
    assert!(identities.contains(&"sub:alice") && identities.contains(&"sub:bob"), "{identities:?}");

    // Revoke alice's exact token: new CONNECTs with it get 407 ...
    let v = relayctl_json(&relay, &["token", "revoke", "--token", &alice]);
    assert!(v["revoked_token"].is_string(), "{v}");
    let (_, a) = connect_as(&mut c, &alice, port);
    assert_407(&a, "revoked token");
    // ... while the tunnel it opened keeps forwarding.
    echo_round(&mut c, alice_stream, 20, 200, "alice's open tunnel after revocation");
    // Another token for alice still works (only that token was revoked).
    // Minted with another lifetime: tokens for one subject, key and expiry
    // are the same token.
    let (alice2, _) = mint(&relay, "alice", "2h");
    assert_ne!(alice2, alice);
    assert_eq!(connect_as(&mut c, &alice2, port).1.status(), Some(200));

    // Revoking the subject refuses every token of it, and minting for it.
    relayctl_json(&relay, &["token", "revoke", "--subject", "bob"]);
    assert_407(&connect_as(&mut c, &bob, port).1, "revoked subject");
    echo_round(&mut c, bob_stream, 10, 100, "bob's open tunnel after revocation");
    let out = relayctl(&relay, &["token", "mint", "--subject", "bob", "--ttl", "1h"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));

    // Tampered and unknown-key tokens: the same 407.
    let mut forged = alice2.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    assert_407(&connect_as(&mut c, &String::from_utf8(forged).unwrap(), port).1, "tampered MAC");
    assert_407(&connect_as(&mut c, &alice2.replacen("v1.k1.", "v1.k9.", 1), port).1, "unknown key");
    assert_407(&connect_as(&mut c, "v1.garbage", port).1, "malformed");

    // token list: fingerprints and revocations, never a token.
    let list = relayctl_json(&relay, &["token", "list"]);
    let text = list.to_string();
    assert!(!text.contains(&alice) && !text.contains(&bob) && !text.contains(&relay.token));
    assert_eq!(list["revoked_subjects"][0]["subject"], "bob");
    assert_eq!(list["revoked_tokens"][0]["subject"], "alice");
    assert_eq!(list["static_tokens"].as_array().unwrap().len(), 1);
    assert_eq!(list["hmac_keys"].as_array().unwrap().len(), 2);
    let human = relayctl(&relay, &["token", "list"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("FINGERPRINT") && human.contains("bob") && !human.contains(&alice), "{human}");
    let counts = relayctl_json(&relay, &["policy", "show"])["refusals"]["auth"].clone();
    for reason in ["revoked_token", "revoked_subject", "bad_mac", "unknown_key", "malformed"] {
        assert!(counts[reason].as_u64().unwrap_or(0) >= 1, "{reason} counted: {counts}");
    }

    // The revocations are on disk (0600) and survive a control restart.
    let state = relay.state_dir.join("policy.json");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!std::fs::read_to_string(&state).unwrap().contains(&alice));
    relay.kill_control();
    relay.start_control().unwrap();
    wait_until("the dataplane to re-attach", Duration::from_secs(10), || {
        relayctl(&relay, &["--json", "status"]).status.success()
            && relayctl_json(&relay, &["status"])["dataplane_attached"] == true
    });
    let mut c2 = client(&relay, &alice2);
    assert_407(&connect_as(&mut c2, &alice, port).1, "revoked token after a control restart");
    assert_407(&connect_as(&mut c2, &bob, port).1, "revoked subject after a control restart");
    assert_eq!(connect_as(&mut c2, &alice2, port).1.status(), Some(200));
    // Lifting the subject's revocation lets bob in again.
    relayctl_json(&relay, &["token", "unrevoke", "--subject", "bob"]);
    assert_eq!(connect_as(&mut c2, &bob, port).1.status(), Some(200));
}

#[test]
fn expired_tokens_get_407() {
    let relay = start("expiry", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let (token, expires) = mint(&relay, "shortlived", "2s");
    let mut c = client(&relay, &token);
    let s = c.open_udp("127.0.0.1", port, T).expect("valid before its expiry");
    // Wait (bounded: at most ~3 s) until the clock is past the expiry.
    // Control reads the same clock when it decides the CONNECT below, so
    // it sees the token expired too.
    wait_until("the token to expire", Duration::from_secs(5), || unix_now() >= expires);
    assert_407(&connect_as(&mut c, &token, port).1, "expired token");
    echo_round(&mut c, s, 10, 100, "the tunnel opened before the expiry");
    let reasons = relayctl_json(&relay, &["policy", "show"])["refusals"]["auth"].clone();
    assert_eq!(reasons["expired"], 1, "{reasons}");
    // Revoking an expired token is pointless and refused clearly.
    let out = relayctl(&relay, &["token", "revoke", "--token", &token]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired"));
}

#[test]
fn quotas_refuse_with_429_and_closing_a_flow_frees_the_quota() {
    let relay = start(
        "quota",
        "[quotas.per_identity]\nmax_flows = 2\nbytes_per_period = 20000\nperiod_secs = 3600\n",
    );
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let (alice, _) = mint(&relay, "alice", "1h");
    let mut c = client(&relay, &alice);
    let s1 = c.open_udp("127.0.0.1", port, T).unwrap();
    let s2 = c.open_udp("127.0.0.1", port, T).unwrap();
    let (_, a) = connect_as(&mut c, &alice, port);
    assert_429(&a, "per_identity.max_flows");
    assert_eq!(a.header("retry-after"), None, "no clock predicts when a flow ends");
    // Another identity from the same client has its own quota.
    let (other, a) = connect_as(&mut c, &relay.token.clone(), port);
    assert_eq!(a.status(), Some(200), "the static token is another identity");
    // Releasing a flow frees the quota.
    c.finish_stream(s1).unwrap();
    wait_until("the relay to close the tunnel", T, || {
        let _ = c.drive(Duration::from_millis(10));
        live_flows(&relay) == 2
    });
    let (s3, a) = connect_as(&mut c, &alice, port);
    assert_eq!(a.status(), Some(200), "a closed flow gives its slot back");

    // Bytes: alice may move 20000 payload bytes (both directions) per
    // hour. 5 x 1000 bytes echoed is 10000.
    echo_round(&mut c, s2, 5, 1000, "within the byte allowance");
    c.finish_stream(s2).unwrap();
    wait_until("the relay to close the tunnel", T, || {
        let _ = c.drive(Duration::from_millis(10));
        live_flows(&relay) == 2
    });
    // s3 was allowed while nothing was charged yet, so its byte budget is
    // the whole 20000: past it the dataplane ends the tunnel, and the
    // totals of s2 and s3 use the allowance up.
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.stream_finished(s3) && Instant::now() < deadline && sent < 100 {
        if c.send_datagram(s3, &[7u8; 1000]).unwrap() {
            sent += 1;
        }
        c.drive(Duration::from_millis(5)).unwrap();
    }
    wait_until("the over-budget tunnel to be closed by the relay", T, || {
        let _ = c.drive(Duration::from_millis(10));
        live_flows(&relay) == 1
    });
    assert!(sent < 100, "the relay ended the tunnel at its byte budget");
    let (_, a) = connect_as(&mut c, &alice, port);
    assert_429(&a, "per_identity.bytes_per_period");
    // The byte window rolls over within the hour: Retry-After says when.
    let wait: u64 = a.header("retry-after").expect("Retry-After on a byte quota").parse().unwrap();
    assert!((3500..=3600).contains(&wait), "{wait}");
    c.finish_stream(other).unwrap();
    let show = relayctl_json(&relay, &["policy", "show"]);
    assert_eq!(show["quotas"]["per_identity"]["max_flows"], 2);
    assert!(show["refusals"]["quota"]["per_identity.max_flows"].as_u64().unwrap() >= 1, "{show}");
}

#[test]
fn policy_set_changes_quotas_at_run_time_and_policy_show_reflects_it() {
    let relay = start("policy-set", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let show = relayctl_json(&relay, &["policy", "show"]);
    assert_eq!(show["quotas"]["per_client"]["max_flows"], 0, "unlimited by default");
    assert_eq!(show["protocols"]["connect_udp"], true);
    assert_eq!(show["acl"]["allow"][0], "127.0.0.0/8");
    assert_eq!(show["tokens"]["hmac_keys"], serde_json::json!(["k1", "k2"]));
    assert_eq!(show["tokens"]["default_key"], "k1");
    assert!(!show.to_string().contains(&relay.token) && !show.to_string().contains(HMAC_SECRET_HEX));

    let v = relayctl_json(
        &relay,
        &["policy", "set", "per_client.max_flows=1", "per_client.new_flows_per_sec=50"],
    );
    assert_eq!(v["quotas"]["per_client"]["max_flows"], 1);
    let show = relayctl_json(&relay, &["policy", "show"]);
    assert_eq!(show["quotas"]["per_client"]["max_flows"], 1);
    assert_eq!(show["quotas"]["per_client"]["new_flows_per_sec"], 50);
    assert_eq!(show["quotas_config_file"]["per_client"]["max_flows"], 0);
    assert_eq!(show["quota_overrides"]["per_client.max_flows"], 1);
    let human = String::from_utf8(relayctl(&relay, &["policy", "show"]).stdout).unwrap();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("per_client.max_flows") && l.contains(" 1 ") && l.ends_with("relayctl")),
        "{human}"
    );
    // Persisted for the next start.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(relay.state_dir.join("policy.json")).unwrap()).unwrap();
    assert_eq!(state["quota_overrides"]["per_client.max_flows"], 1);

    // Enforced: one tunnel per client address.
    let mut c = client(&relay, &relay.token.clone());
    let _s = c.open_udp("127.0.0.1", port, T).unwrap();
    let (_, a) = connect_as(&mut c, &relay.token.clone(), port);
    assert_429(&a, "per_client.max_flows");

    // Invalid values are refused with the key named; nothing changes.
    for (pair, want) in [
        ("per_identity.burst=5", "quotas.per_identity.burst: needs new_flows_per_sec"),
        ("per_client.nope=1", "unknown quota key \"per_client.nope\""),
        ("per_identity.bytes_per_period=100", "quotas.per_identity.period_secs"),
    ] {
        let out = relayctl(&relay, &["policy", "set", pair]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{pair}: {err}");
    }
    let out = relayctl(&relay, &["policy", "set", "per_client.max_flows=lots"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("non-negative integer"));
    assert_eq!(relayctl_json(&relay, &["policy", "show"])["quotas"]["per_client"]["max_flows"], 1);

    // Reset goes back to the file's values.
    relayctl_json(&relay, &["policy", "reset", "per_client.max_flows"]);
    let show = relayctl_json(&relay, &["policy", "show"]);
    assert_eq!(show["quotas"]["per_client"]["max_flows"], 0);
    assert_eq!(show["quotas"]["per_client"]["new_flows_per_sec"], 50, "the other override stays");
    assert_eq!(connect_as(&mut c, &relay.token.clone(), port).1.status(), Some(200));
}

#[test]
fn static_tokens_added_at_run_time_work_until_removed() {
    let relay = start("static-runtime", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let mut c = client(&relay, &relay.token.clone());
    let new_token = "added-at-runtime-0123456789";
    assert_407(&connect_as(&mut c, new_token, port).1, "not yet added");
    // From stdin, so it never appears in a process list.
    let mut child = Command::new(bin_dir().unwrap().join("relayctl"))
        .arg("--socket")
        .arg(relay.admin_socket())
        .args(["--json", "token", "add", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{new_token}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let fp = serde_json::from_slice::<Value>(&out.stdout).unwrap()["added"].as_str().unwrap().to_string();
    assert_eq!(connect_as(&mut c, new_token, port).1.status(), Some(200));
    let stored = std::fs::read_to_string(relay.state_dir.join("policy.json")).unwrap();
    assert!(!stored.contains(new_token), "persisted as a digest only");
    // The config's token cannot be removed at run time; the added one can.
    let out = relayctl(&relay, &["token", "remove", "--token", &relay.token]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("config file"));
    relayctl_json(&relay, &["token", "remove", "--fingerprint", &fp]);
    assert_407(&connect_as(&mut c, new_token, port).1, "removed");
}

#[test]
fn disabled_connect_udp_is_refused_with_501() {
    let relay = start("protocols", "[protocols]\nconnect_udp = false\n");
    let mut c = client(&relay, &relay.token.clone());
    let (_, a) = connect_as(&mut c, &relay.token.clone(), 9);
    assert_eq!(a.status(), Some(501), "{a:?}");
    assert_eq!(relayctl_json(&relay, &["policy", "show"])["protocols"]["connect_udp"], false);
}

#[test]
fn relayctl_errors_are_clear() {
    let relay = start("admin-missing", "");
    let missing = relay.state_dir.join("nope.sock");
    let out = relayctl_as(&missing, &["status"], |_| {});
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no admin socket at"), "{out:?}");
}

#[test]
#[ignore = "needs root (to run relayctl as another user): run by `cargo xtask test`"]
fn other_users_are_refused_by_the_admin_socket() {
    relay_bench::needs::require(&[relay_bench::needs::Need::Root]);
    let relay = start("admin-access", "");
    let nobody = |cmd: &mut Command| {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    };
    // The state directory (0700) keeps other users out at connect time...
    let out = relayctl_as(&relay.admin_socket(), &["status"], nobody);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied on"), "{err}");
    // ... and if the socket is opened up by mistake, the peer check still
    // refuses them.
    std::fs::set_permissions(&relay.state_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(relay.admin_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = relayctl_as(&relay.admin_socket(), &["token", "mint", "--subject", "x", "--ttl", "1h"], nobody);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied: uid 65534 may not use the admin socket"), "{err}");
    assert!(out.stdout.is_empty(), "no token was minted");
    // Root still may.
    assert!(relayctl(&relay, &["status"]).status.success());
}

/// A fresh self-signed pair for the names the test relay serves, written
/// over the relay's certificate and key files (what an operator's renewal
/// does before `relayctl reload`).
fn install_new_certificate(relay: &Relay, label: &str) -> Vec<u8> {
    let dir = relay.state_dir.join(format!("renewal-{label}"));
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    relay_control::state::ensure_dir(&dir).unwrap();
    let pair = relay_control::state::self_signed(&dir, &names).expect("certificate generated");
    std::fs::copy(&pair.cert, relay.cert()).unwrap();
    std::fs::copy(&pair.key, relay.state_dir.join("key.pem")).unwrap();
    let pem = std::fs::read(&pair.cert).unwrap();
    boring_der(&pem)
}

/// The DER of the first certificate in a PEM file.
fn boring_der(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64_decode(&body)
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | value(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A client that trusts `ca` (and resumes `session` if given).
fn client_trusting(relay: &Relay, ca: &Path, token: &str, session: Option<Vec<u8>>) -> Client {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(ca.to_path_buf());
    cfg.token = Some(token.to_string());
    cfg.session = session;
    let mut c = Client::connect(cfg, T).expect("client connects");
    c.wait_settings(T).unwrap();
    c
}

fn tls_generation_of_workers(relay: &Relay) -> Vec<u64> {
    let v = relayctl_json(relay, &["status"]);
    v["workers"].as_array().unwrap().iter().map(|w| w["tls_generation"].as_u64().unwrap()).collect()
}

#[test]
fn certificate_reload_serves_new_connections_and_keeps_open_ones() {
    let relay = start("reload", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let (token, _) = mint(&relay, "alice", "1h");
    let first_der = boring_der(&std::fs::read(relay.cert()).unwrap());
    let first_ca = relay.state_dir.join("first-ca.pem");
    std::fs::copy(relay.cert(), &first_ca).unwrap();
    let mut old = client_trusting(&relay, &first_ca, &token, None);
    assert_eq!(old.peer_certificate().as_deref(), Some(&first_der[..]));
    let old_stream = old.open_udp("127.0.0.1", port, T).unwrap();
    echo_round(&mut old, old_stream, 20, 300, "before the reload");
    let status = relayctl_json(&relay, &["status"]);
    assert_eq!(status["tls"]["certificate"]["generation"], 1, "{status}");
    assert!(tls_generation_of_workers(&relay).iter().all(|g| *g == 1));

    // Renewal: new files, then `relayctl reload`.
    let second_der = install_new_certificate(&relay, "2");
    let v = relayctl_json(&relay, &["reload"]);
    assert_eq!(v["certificate"]["generation"], 2, "{v}");
    assert_eq!(v["previous_generation"], 1, "{v}");
    assert_eq!(v["workers_serving"], v["workers"], "every worker serves it when relayctl returns: {v}");
    assert!(tls_generation_of_workers(&relay).iter().all(|g| *g == 2));
    let second_ca = relay.state_dir.join("second-ca.pem");
    std::fs::copy(relay.cert(), &second_ca).unwrap();
    // New connections (several, so both workers' configurations are used)
    // get the new certificate, signed by control with the new key.
    for _ in 0..4 {
        let mut c = client_trusting(&relay, &second_ca, &token, None);
        assert_eq!(c.peer_certificate().as_deref(), Some(&second_der[..]), "the new certificate is served");
        let s = c.open_udp("127.0.0.1", port, T).unwrap();
        echo_round(&mut c, s, 5, 100, "a connection after the reload");
    }
    // The TCP front's TLS (HTTP/2, HTTP/1.1) serves it too, from the same
    // reload, signed through control.
    for _ in 0..4 {
        assert_eq!(tcp_tls_certificate(relay.addr, &second_ca), second_der, "TLS over TCP after the reload");
    }
    // A client that only trusts the old certificate is now refused by its
    // own verification; the connection opened before keeps forwarding.
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(first_ca.clone());
    assert!(Client::connect(cfg, T).is_err(), "the old certificate is no longer served");
    echo_round(&mut old, old_stream, 20, 300, "the connection opened before the reload");

    // A key that does not match: refused, nothing changes.
    let good_key = std::fs::read(relay.state_dir.join("key.pem")).unwrap();
    install_new_certificate(&relay, "mismatch");
    std::fs::copy(&second_ca, relay.cert()).unwrap();
    let out = relayctl(&relay, &["reload"]);
    assert!(!out.status.success(), "a mismatched pair is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match") && err.contains("still serving generation 2"), "{err}");
    std::fs::write(relay.state_dir.join("key.pem"), &good_key).unwrap();
    let mut c = client_trusting(&relay, &second_ca, &token, None);
    assert_eq!(c.peer_certificate().as_deref(), Some(&second_der[..]));
    let s = c.open_udp("127.0.0.1", port, T).unwrap();
    echo_round(&mut c, s, 5, 100, "after a refused reload");

    // SIGHUP does the same as `relayctl reload`.
    let third_der = install_new_certificate(&relay, "3");
    let pid = relay.control_pid().expect("control runs");
    // SAFETY: sending SIGHUP to the control process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    wait_until("every worker serves generation 3", T, || {
        tls_generation_of_workers(&relay).iter().all(|g| *g == 3)
    });
    let third_ca = relay.state_dir.join("third-ca.pem");
    std::fs::copy(relay.cert(), &third_ca).unwrap();
    let c = client_trusting(&relay, &third_ca, &token, None);
    assert_eq!(c.peer_certificate().as_deref(), Some(&third_der[..]));
    assert_eq!(relayctl_json(&relay, &["status"])["tls"]["certificate"]["generation"], 3);
}

/// The certificate (DER) the relay's TLS-over-TCP listener presents to a
/// client trusting `ca`.
fn tcp_tls_certificate(addr: std::net::SocketAddr, ca: &std::path::Path) -> Vec<u8> {
    let mut b = boring::ssl::SslConnector::builder(boring::ssl::SslMethod::tls()).unwrap();
    b.set_ca_file(ca).unwrap();
    b.set_alpn_protos(b"\x08http/1.1").unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    let tls = b.build().connect("localhost", tcp).expect("TLS over TCP verifies with this CA");
    tls.ssl().peer_certificate().expect("a certificate").to_der().unwrap()
}

/// Connects, waits for the relay's session ticket and returns the session.
fn session_from(relay: &Relay, token: &str) -> Vec<u8> {
    let mut c = client_trusting(relay, &relay.cert(), token, None);
    assert!(!c.is_resumed());
    let deadline = Instant::now() + T;
    loop {
        if let Some(s) = c.session() {
            return s;
        }
        assert!(Instant::now() < deadline, "the relay sent no session ticket");
        c.drive(Duration::from_millis(20)).unwrap();
    }
}

/// The name of the key that sealed the ticket in a quiche session: quiche
/// stores the session as a length (u64, big-endian) and BoringSSL's DER
/// encoding of the SSL_SESSION, whose `[10]` field holds the ticket; a
/// ticket starts with the 16-byte name of the key that sealed it.
fn ticket_key_name(session: &[u8]) -> [u8; 16] {
    /// One DER element: (tag, contents, what follows).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            let len = rest.get(..n)?.iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b));
            (len, &rest[n..])
        };
        Some((tag, rest.get(..len)?, &rest[len..]))
    }
    let len = u64::from_be_bytes(session[..8].try_into().unwrap()) as usize;
    let (tag, mut fields, _) = tlv(&session[8..8 + len]).expect("a DER session");
    assert_eq!(tag, 0x30, "the session is a SEQUENCE");
    while let Some((tag, value, rest)) = tlv(fields) {
        // [10], constructed and context-specific: the ticket.
        if tag == 0xaa {
            let (tag, ticket, _) = tlv(value).expect("the ticket's OCTET STRING");
            assert_eq!(tag, 0x04);
            return ticket[..16].try_into().unwrap();
        }
        fields = rest;
    }
    panic!("the session holds no ticket");
}

fn signatures(relay: &Relay) -> u64 {
    relayctl_json(relay, &["status"])["signatures"].as_u64().unwrap()
}

#[test]
fn session_tickets_resume_without_signing_and_follow_rotation() {
    let relay = start("tickets", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let (token, _) = mint(&relay, "alice", "1h");
    let session = session_from(&relay, &token);
    let signed = signatures(&relay);
    // Resumptions from any worker (the ticket keys are control's, shared by
    // all workers) need no signature from control.
    for i in 0..4 {
        let mut c = client_trusting(&relay, &relay.cert(), &token, Some(session.clone()));
        assert!(c.is_resumed(), "resumption {i}");
        let s = c.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
        echo_round(&mut c, s, 5, 100, "a resumed connection");
    }
    assert_eq!(signatures(&relay), signed, "resumed handshakes are not signed");
    let status = relayctl_json(&relay, &["status"]);
    let resumed: u64 =
        status["workers"].as_array().unwrap().iter().map(|w| w["handshakes_resumed"].as_u64().unwrap()).sum();
    assert_eq!(resumed, 4, "{status}");

    // One rotation: the ticket's key is now the previous one, still accepted.
    let first_key = ticket_key_name(&session);
    assert_eq!(
        ticket_key_name(&session_from(&relay, &token)),
        first_key,
        "one key seals every ticket until a rotation"
    );
    let v = relayctl_json(&relay, &["tickets", "rotate"]);
    assert_eq!(v["rotations"], 1, "{v}");
    // The new keys travel to the dataplane on its attach socket; once it
    // has them, new tickets are sealed with another key.
    wait_until("the dataplane to seal new tickets with the rotated key", PATIENCE, || {
        ticket_key_name(&session_from(&relay, &token)) != first_key
    });
    let c = client_trusting(&relay, &relay.cert(), &token, Some(session.clone()));
    assert!(c.is_resumed(), "a ticket sealed with the previous key still resumes");
    // Two rotations: its key is gone; a full (signed) handshake follows
    // once the dataplane has the new keys (they travel on the attach
    // socket, so allow a moment).
    relayctl_json(&relay, &["tickets", "rotate"]);
    wait_until("a ticket older than two rotations to stop resuming", T, || {
        !client_trusting(&relay, &relay.cert(), &token, Some(session.clone())).is_resumed()
    });
    assert!(signatures(&relay) > signed, "the full handshake was signed by control");
}

#[test]
fn disabled_session_tickets_mean_full_handshakes() {
    let relay = start_with_tls("no-tickets", "", "session_tickets = false\n");
    let (token, _) = mint(&relay, "alice", "1h");
    let mut c = client_trusting(&relay, &relay.cert(), &token, None);
    c.drive(Duration::from_millis(300)).unwrap();
    assert!(c.session().is_none(), "no ticket is issued");
    let out = relayctl(&relay, &["tickets", "rotate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("session tickets are off"));
}

#[test]
fn relayctl_conns_lists_every_workers_connections() {
    let relay = start("conns", "");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let (token, _) = mint(&relay, "alice", "1h");
    let session = session_from(&relay, &token);
    let mut plain = client_trusting(&relay, &relay.cert(), &token, None);
    let s1 = plain.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    let s2 = plain.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut plain, s1, 5, 100, "first tunnel");
    echo_round(&mut plain, s2, 5, 100, "second tunnel");
    let mut resumed = client_trusting(&relay, &relay.cert(), &token, Some(session));
    assert!(resumed.is_resumed());
    let s3 = resumed.open_udp("127.0.0.1", echo.addr().port(), T).unwrap();
    echo_round(&mut resumed, s3, 5, 100, "resumed connection's tunnel");
    // TCP front connections: one through its TLS handshake on HTTP/1.1
    // (Python's ssl, ALPN http/1.1), one that has sent nothing yet.
    let tls_client = "import socket, ssl, sys, time\n\
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
        c.check_hostname = False\n\
        c.verify_mode = ssl.CERT_NONE\n\
        c.set_alpn_protocols(['http/1.1'])\n\
        s = c.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[1]))))\n\
        print(s.getsockname()[1], s.selected_alpn_protocol(), flush=True)\n\
        time.sleep(30)\n";
    let mut tls_peer = std::process::Command::new("python3")
        .args(["-c", tls_client, &relay.addr.port().to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(tls_peer.stdout.take().unwrap()), &mut line)
        .unwrap();
    let (tls_port, alpn) = line.trim().split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
    assert_eq!(alpn, "http/1.1");
    let idle_tcp = std::net::TcpStream::connect(("127.0.0.1", relay.addr.port())).unwrap();

    let v = relayctl_json(&relay, &["conns"]);
    assert_eq!(v["complete"], true, "{v}");
    let conns = v["connections"].as_array().unwrap();
    // The client binds the wildcard address: match on its port.
    let find = |addr: std::net::SocketAddr| {
        let want = format!("127.0.0.1:{}", addr.port());
        conns.iter().find(|c| c["client"] == want.as_str()).unwrap_or_else(|| panic!("{want} in {v}"))
    };
    let p = find(plain.local_addr());
    assert_eq!((p["established"].as_bool(), p["resumed"].as_bool()), (Some(true), Some(false)), "{p}");
    assert_eq!(p["tunnels"], 2, "{p}");
    assert_eq!(p["tls_generation"], 1);
    assert!(p["packets_recv"].as_u64().unwrap() >= 10 && p["rtt_us"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(p["protocol"], "h3", "{p}");
    let r = find(resumed.local_addr());
    assert_eq!((r["resumed"].as_bool(), r["tunnels"].as_u64()), (Some(true), Some(1)), "{r}");
    let t = find(format!("127.0.0.1:{tls_port}").parse().unwrap());
    assert_eq!((t["protocol"].as_str(), t["established"].as_bool()), (Some("http/1.1"), Some(true)), "{t}");
    assert_eq!(t["tls_generation"], 1, "signed through control: {t}");
    assert!(t["bytes_recv"].as_u64().unwrap() > 0 && t["packets_recv"].as_u64().unwrap() > 0, "{t}");
    let i = find(idle_tcp.local_addr().unwrap());
    assert_eq!((i["protocol"].as_str(), i["established"].as_bool()), (Some("tcp"), Some(false)), "{i}");
    // The session's first connection may still be closing; at least ours.
    assert!(v["total"].as_u64().unwrap() >= 4 && v["listed"] == v["total"], "{v}");
    let limited = relayctl_json(&relay, &["conns", "--limit", "1"]);
    assert!(limited["listed"].as_u64().unwrap() <= limited["workers"].as_u64().unwrap(), "{limited}");
    // The human table.
    let out = relayctl(&relay, &["conns"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("WORKER")
            && text.contains("resumed")
            && text.contains("http/1.1")
            && text.contains("connections,"),
        "{text}"
    );
    assert!(!relayctl(&relay, &["conns", "--limit", "0"]).status.success(), "limit 0 is refused");
    let _ = tls_peer.kill();
    let _ = tls_peer.wait();
}

#[test]
fn a_restarted_control_counts_live_flows_against_their_identity() {
    let mut relay = start("restart-quota", "[quotas.per_identity]\nmax_flows = 1\n");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = echo.addr().port();
    let (alice, _) = mint(&relay, "alice", "1h");
    let mut c = client(&relay, &alice);
    let s = c.open_udp("127.0.0.1", port, T).unwrap();
    echo_round(&mut c, s, 5, 100, "before the control restart");
    relay.kill_control();
    relay.start_control().unwrap();
    wait_until("the dataplane to re-attach and report its flow", Duration::from_secs(10), || {
        relayctl(&relay, &["--json", "status"]).status.success() && live_flows(&relay) == 1
    });
    let flows = relayctl_json(&relay, &["flows"]);
    assert_eq!(flows["flows"][0]["identity"], "sub:alice", "the reported flow keeps its identity: {flows}");
    // The new control counts it: alice's one slot is taken.
    let mut c2 = client(&relay, &alice);
    assert_429(&connect_as(&mut c2, &alice, port).1, "per_identity.max_flows");
    echo_round(&mut c, s, 5, 100, "the flow kept forwarding");
    c.finish_stream(s).unwrap();
    wait_until("the flow to close", T, || {
        let _ = c.drive(Duration::from_millis(10));
        live_flows(&relay) == 0
    });
    assert_eq!(connect_as(&mut c2, &alice, port).1.status(), Some(200), "closing it freed the slot");
}

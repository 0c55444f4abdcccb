//! What an operator sees: a config file holding only its overrides starts
//! a serving relay, and the relay's logs suit files and log shippers (no
//! escape bytes off a terminal, JSON one object a line, no client or
//! target address unless `[log] log_targets` asks for them, and IDs that
//! join a line with `relayctl flows`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use relay_bench::client::{Client, ClientConfig};
use relay_bench::echo::EchoServer;
use relay_bench::load::{EchoLoad, run_echo};
use relay_bench::processes::{Relay, RelayOptions, bin_dir, free_port_pair};
use relay_bench::wait::{PATIENCE, wait_for, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(5);

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-operator-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Processes killed when the test ends, however it ends.
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn relay_binary(name: &str) -> PathBuf {
    bin_dir().unwrap().join(name)
}

/// Opens a tunnel to the echo server and echoes a few datagrams through it.
fn echo_through(c: &mut Client, echo: &EchoServer) {
    let stream = c.open_udp("127.0.0.1", echo.addr().port(), T).expect("tunnel opens");
    let load = EchoLoad { count: 20, size: 100, window: 4, capsules: false, stall_timeout: T };
    let r = run_echo(c, &[stream], &load).unwrap();
    assert_eq!((r.received, r.lost), (20, 0));
}

fn client(relay: &Relay) -> Client {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    Client::connect(cfg, T).expect("client connects")
}

/// The client's address as the relay sees it (its socket is bound to the
/// unspecified address).
fn seen_from_relay(c: &Client) -> String {
    format!("127.0.0.1:{}", c.local_addr().port())
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap()
}

/// The relay on a file of one section, `[listen]`: its address, and the
/// metrics endpoint off so that tests may run side by side (its default
/// port is fixed). Everything else is a default: the state in `./state`,
/// a generated certificate and token, the target policy that refuses
/// loopback.
#[test]
fn a_config_file_of_only_the_listen_section_starts_a_serving_relay() {
    let dir = test_dir("listen-only");
    let port = free_port_pair([127, 0, 0, 1].into()).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(&config, format!("[listen]\nquic = \"127.0.0.1:{port}\"\nmetrics = \"\"\n")).unwrap();
    let checked =
        Command::new(relay_binary("relay-control")).arg("--check-config").arg(&config).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let effective = String::from_utf8(checked.stdout).unwrap();
    assert!(effective.contains(&format!("quic = \"127.0.0.1:{port}\"")), "{effective}");
    assert!(effective.contains("workers = \"auto\"") && effective.contains("allow = []"), "{effective}");

    // Both processes log into pipes, as under a supervisor that collects
    // stderr: no escape bytes there.
    let mut control = Command::new(relay_binary("relay-control"))
        .arg("--config")
        .arg(&config)
        .current_dir(&dir)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = vec![drain(control.stderr.take().unwrap())];
    let mut running = Running(vec![control]);
    let state = dir.join("state");
    wait_until("control's channel socket", PATIENCE, || state.join("channel.sock").exists());
    let mut dataplane = Command::new(relay_binary("relay-dataplane"))
        .arg("--control-socket")
        .arg(state.join("channel.sock"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    logs.push(drain(dataplane.stderr.take().unwrap()));
    running.0.push(dataplane);

    let token = std::fs::read_to_string(state.join("token")).unwrap().trim().to_string();
    let mut c = wait_for("the relay to answer a handshake", PATIENCE, || {
        let mut cfg = ClientConfig::new(([127, 0, 0, 1], port).into());
        cfg.ca = Some(state.join("cert.pem"));
        cfg.token = Some(token.clone());
        Client::connect(cfg, Duration::from_millis(500)).ok()
    });
    // Served with the default policy: loopback targets are refused.
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let stream = c.request_udp("127.0.0.1", echo.addr().port()).unwrap();
    let answer = c.wait_answer(stream, T).unwrap();
    assert_eq!(answer.status(), Some(403), "{answer:?}");
    assert!(
        answer.header("proxy-status").is_some_and(|p| p.contains("destination_ip_prohibited")),
        "{answer:?}"
    );
    drop(running);
    for (process, log) in ["control", "dataplane"].into_iter().zip(logs) {
        let text = log.join().unwrap();
        assert!(text.contains(" INFO "), "{process} logged no info line into its pipe:\n{text}");
        assert!(!text.contains('\x1b'), "{process} wrote escape bytes into a pipe:\n{text:?}");
    }
}

/// Reads a child's pipe to its end on a thread (so the child never blocks
/// on a full pipe).
fn drain(mut pipe: std::process::ChildStderr) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut text).unwrap();
        text
    })
}

/// JSON logs at the default level: every line of both processes is one
/// JSON object; worker lines name their worker; and no line names the
/// client's address or the target's.
#[test]
fn json_logs_parse_line_by_line_and_name_no_client_or_target_by_default() {
    let dir = test_dir("json-logs");
    let logs = dir.join("logs");
    let opts = RelayOptions {
        log_dir: Some(logs.clone()),
        log_filter: Some("info".into()),
        log_format: Some("json".into()),
        ..Default::default()
    };
    let relay = Relay::start(&dir, &opts).expect("relay starts");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    echo_through(&mut c, &echo);
    let client_addr = seen_from_relay(&c);
    c.close();
    wait_until("control to see the tunnel end", PATIENCE, || {
        relay.status().is_ok_and(|s| s["flows"].as_u64() == Some(0))
    });
    drop(relay);

    for process in ["control", "dataplane"] {
        let text = read_log(&logs, process);
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{process}: not JSON ({e}): {l}")))
            .collect();
        assert!(lines.len() >= 3, "{process}: {text}");
        for line in &lines {
            assert!(line["message"].is_string() && line["level"].is_string(), "{process}: {line}");
        }
        for addr in [&client_addr, &echo.addr().to_string()] {
            assert!(!text.contains(addr.as_str()), "{process} logs {addr} at the default level:\n{text}");
        }
        if process == "dataplane" {
            let serving = lines.iter().find(|l| l["message"] == "worker serving").expect("worker serving");
            assert!(serving["span"]["worker"].is_u64(), "{serving}");
        }
    }
}

/// Text logs into a file carry no escape bytes; with `[log] log_targets`
/// control logs each tunnel with its client and target, under the flow ID
/// and worker `relayctl flows` shows.
#[test]
fn text_logs_have_no_escape_bytes_and_log_targets_joins_relayctl_flows() {
    let dir = test_dir("text-logs");
    let logs = dir.join("logs");
    let opts = RelayOptions {
        log_dir: Some(logs.clone()),
        log_filter: Some("info".into()),
        extra_config: "[log]\nlog_targets = true\n".into(),
        ..Default::default()
    };
    let relay = Relay::start(&dir, &opts).expect("relay starts");
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = client(&relay);
    echo_through(&mut c, &echo);
    let flows = Command::new(relay_binary("relayctl"))
        .arg("--socket")
        .arg(relay.admin_socket())
        .args(["--json", "flows"])
        .output()
        .unwrap();
    assert!(flows.status.success());
    let flows: Value = serde_json::from_slice(&flows.stdout).unwrap();
    let row = &flows["flows"][0];
    let (flow, worker) = (row["flow_id"].as_u64().unwrap(), row["worker"].as_u64().unwrap());

    let control = read_log(&logs, "control");
    let line = control
        .lines()
        .find(|l| l.contains("tunnel allowed") && l.contains(&format!("flow={flow} ")))
        .unwrap_or_else(|| panic!("no access line for flow {flow}:\n{control}"));
    assert!(line.contains(&format!("worker={worker} ")), "{line}");
    assert!(line.contains(&format!("client={}", seen_from_relay(&c))), "{line}");
    assert!(line.contains(&format!("resolved={}", echo.addr())), "{line}");
    c.close();
    drop(relay);
    for process in ["control", "dataplane"] {
        let text = read_log(&logs, process);
        assert!(!text.is_empty(), "{process} logged nothing");
        assert!(!text.contains('\x1b'), "{process} wrote escape bytes into a file:\n{text:?}");
    }
}

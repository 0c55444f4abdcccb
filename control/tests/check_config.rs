//! `relay-control --check-config FILE`: the configuration in force (defaults
//! merged, secrets redacted) and exit 0, or the error naming line and key
//! and exit 1, without starting anything.

use std::path::PathBuf;
use std::process::{Command, Output};

fn check(name: &str, text: &str) -> Output {
    let dir = std::env::temp_dir().join(format!("relay-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file: PathBuf = dir.join(name);
    std::fs::write(&file, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_relay-control")).arg("--check-config").arg(&file).output().unwrap()
}

#[test]
fn a_valid_file_prints_the_configuration_in_force_with_secrets_redacted() {
    let hex = "ab".repeat(32);
    let out = check(
        "valid.toml",
        &format!(
            "[dataplane]\nworkers = 2\n\n[auth]\ntokens = [\"hunter2-token\"]\n\n[[auth.hmac_keys]]\nid = \"k1\"\n\
             secret_hex = \"{hex}\"\n\n[[auth.hmac_keys]]\nid = \"k2\"\nsecret_file = \"/etc/masque-relay/hmac-k2\"\n"
        ),
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("valid.toml: valid"), "{text}");
    // The override and the defaults around it.
    assert!(text.contains("workers = 2") && text.contains("quic = \"127.0.0.1:4433\""), "{text}");
    assert!(text.contains("retry_threshold = 1024") && text.contains("[log]"), "{text}");
    // Secrets never; the files holding them by name.
    assert!(!text.contains("hunter2") && !text.contains(&hex), "{text}");
    assert!(text.contains("<redacted>") && text.contains("/etc/masque-relay/hmac-k2"), "{text}");
}

#[test]
fn webtransport_routes_are_printed_with_their_tls_settings() {
    let out = check(
        "wt-valid.toml",
        "[[upstreams]]\nname = \"wt\"\nprotocol = \"webtransport\"\npath_prefix = \"/wt/\"\n\
         origin = \"https://wt.example:4433\"\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "protocol = \"webtransport\"",
        "origin = \"https://wt.example:4433\"",
        "origin_ca_file = \"/etc/ssl/certs/ca-certificates.crt\"",
        "origin_server_name = \"wt.example\"",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
}

#[test]
fn an_invalid_file_prints_the_error_with_line_and_key_and_exits_1() {
    for (name, text, line, key) in [
        ("unknown.toml", "[dataplane]\nworkers = 2\nworkerz = 3\n", 3, "workerz"),
        ("value.toml", "[tcp]\n\nidle_timeout_secs = 0\n", 3, "tcp.idle_timeout_secs must be 1..=86400"),
        ("type.toml", "[log]\nformat = \"xml\"\n", 2, "xml"),
        (
            "route.toml",
            "[log]\nformat = \"text\"\n\n[[upstreams]]\nname = \"chat\"\npath_prefix = \"chat/\"\norigin = \"ws://h\"\n",
            4,
            "upstreams route \"chat\": path_prefix must start with '/'",
        ),
        (
            "wt.toml",
            "[log]\nformat = \"text\"\n\n[[upstreams]]\nname = \"wt\"\nprotocol = \"webtransport\"\npath_prefix = \"/\"\n\
             origin = \"wss://h\"\n",
            4,
            "upstreams route \"wt\": origin \"wss://h\": a webtransport route's origin must be https://host[:port]",
        ),
    ] {
        let out = check(name, text);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(name) && err.contains(&format!("line {line}")) && err.contains(key), "{err}");
        assert!(out.stdout.is_empty(), "{name}: no configuration printed");
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_relay-control"))
        .args(["--check-config", "/nonexistent/relay.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/relay.toml"));
}

//! The container image and Kubernetes manifests in deploy/, checked
//! offline: the embedded relay configuration parses and validates like a
//! file would, every path it names is mounted where the right container
//! sees it (the TLS key and the fleet secret in the control container only:
//! keyless TLS), the two containers share the channel socket's directory,
//! the dataplane runs unprivileged with only the capabilities it needs, and
//! the image builds the binaries the manifests run.

use std::path::{Path, PathBuf};

use relay_control::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("control lives in the workspace").to_path_buf()
}

fn documents() -> Vec<Yaml> {
    let path = repo().join("deploy/kubernetes/masque-relay.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"))
}

fn container<'a>(pod: &'a Yaml, name: &str) -> &'a Yaml {
    pod["containers"]
        .as_vec()
        .expect("containers")
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {name} container"))
}

/// `(mount path, volume name)` of a container's mounts.
fn mounts(c: &Yaml) -> Vec<(String, String)> {
    c["volumeMounts"]
        .as_vec()
        .map(|v| {
            v.iter()
                .map(|m| {
                    (
                        m["mountPath"].as_str().expect("mountPath").to_string(),
                        m["name"].as_str().expect("name").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `path` lies under one of `c`'s mounts of a volume in `volumes`.
fn sees(c: &Yaml, path: &Path, volumes: &[&str]) -> bool {
    mounts(c).iter().any(|(at, name)| path.starts_with(at) && volumes.contains(&name.as_str()))
}

/// The words of a container's command and arguments.
fn command_line(c: &Yaml) -> String {
    let words = |key: &str| -> Vec<String> {
        c[key]
            .as_vec()
            .map(|v| v.iter().filter_map(|w| w.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    [words("command"), words("args")].concat().join(" ")
}

fn capabilities(c: &Yaml) -> Vec<String> {
    c["securityContext"]["capabilities"]["add"]
        .as_vec()
        .map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[test]
fn the_kubernetes_manifests_run_one_relay_per_node_with_the_keys_in_control_only() {
    let docs = documents();
    let config_map = of_kind(&docs, "ConfigMap");
    let text = config_map["data"]["relay.toml"].as_str().expect("relay.toml in the ConfigMap");
    let config = Config::parse(text, "masque-relay.yaml ConfigMap")
        .unwrap_or_else(|e| panic!("the embedded configuration does not validate: {e}"));
    let fleet = config.fleet.as_ref().expect("a [fleet] section");

    let ds = of_kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"].as_bool(),
        Some(true),
        "QUIC sees client addresses only on the host network"
    );
    assert_eq!(
        pod["dnsPolicy"].as_str(),
        Some("ClusterFirstWithHostNet"),
        "the store's service name resolves"
    );
    let control = container(pod, "control");
    let dataplane = container(pod, "dataplane");
    assert_eq!(control["image"], dataplane["image"], "one image for both processes");

    // The control container reads the ConfigMap's file and every secret
    // the configuration names; the dataplane sees none of them.
    let control_cmd = command_line(control);
    let config_path = "/etc/masque-relay/relay.toml";
    assert!(control_cmd.contains(&format!("--config {config_path}")), "{control_cmd}");
    assert!(sees(control, Path::new(config_path), &["config"]));
    let secrets: Vec<PathBuf> = [
        config.tls.cert.clone(),
        config.tls.key.clone(),
        Some(fleet.secret_file.clone()),
        fleet.password_file.clone(),
        config.dataplane.connection_ids.key_file.clone(),
    ]
    .into_iter()
    .flatten()
    .chain(config.auth.hmac_keys.iter().filter_map(|k| k.secret_file.clone()))
    .collect();
    assert!(secrets.len() >= 6, "TLS pair, fleet secret, store password, QUIC-LB key, HMAC key: {secrets:?}");
    for path in &secrets {
        assert!(sees(control, path, &["secrets"]), "control cannot read {}", path.display());
        assert!(
            !sees(dataplane, path, &["secrets", "config"]),
            "the dataplane must not see {}",
            path.display()
        );
    }
    assert!(config.tls.keyless, "keyless TLS: the key stays in control");
    // Each host's QUIC-LB server ID comes from its node address.
    assert!(control_cmd.contains("--server-id"), "{control_cmd}");
    assert!(config.dataplane.connection_ids.server_id.is_empty(), "not one server ID for every node");
    let env = control["env"].as_vec().expect("env");
    assert!(env.iter().any(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("status.hostIP")));

    // Both see the channel socket's directory, and state persists.
    let channel = config.relay.channel_socket.clone().expect("relay.channel_socket");
    let admin = config.relay.admin_socket.clone().expect("relay.admin_socket");
    assert!(sees(control, &channel, &["run"]) && sees(dataplane, &channel, &["run"]));
    assert!(sees(control, &admin, &["run"]));
    let dp_cmd = command_line(dataplane);
    assert!(dp_cmd.contains(&format!("--control-socket {}", channel.display())), "{dp_cmd}");
    assert!(sees(control, &config.relay.state_dir, &["state"]));

    // The dataplane runs as the configured unprivileged user with only
    // what it needs; control hands it the channel socket.
    let dp_sc = &dataplane["securityContext"];
    assert_eq!(dp_sc["runAsUser"].as_i64(), Some(10001));
    assert_eq!(config.relay.dataplane_user.as_deref(), Some("masque-dp"));
    let mut caps = capabilities(dataplane);
    caps.sort();
    assert_eq!(caps, ["NET_ADMIN", "NET_BIND_SERVICE"]);
    assert_eq!(dp_sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert!(sees(dataplane, Path::new("/dev/net/tun"), &["tun"]), "connect-ip's TUN devices");
    for c in [control, dataplane] {
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    }
    // A drain (GOAWAY, then the tunnels' end) fits the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().expect("grace period");
    assert!(grace > i64::from(config.dataplane.drain_timeout_secs), "{grace}");
}

#[test]
fn the_container_image_builds_every_binary_the_manifests_run() {
    let path = repo().join("deploy/container/Containerfile");
    let containerfile = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = documents();
    let pod = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    for name in ["control", "dataplane"] {
        let cmd = command_line(container(pod, name));
        let binary = cmd
            .split_whitespace()
            .find_map(|w| w.strip_prefix("/usr/local/bin/"))
            .unwrap_or_else(|| panic!("{name} runs no /usr/local/bin binary: {cmd}"));
        assert!(containerfile.contains(&format!("target/release/{binary}")), "the image lacks {binary}");
        assert!(repo().join(format!("control/src/bin/{binary}.rs")).exists() || binary == "relay-dataplane");
    }
    assert!(
        containerfile.contains("useradd") && containerfile.contains("--uid 10001"),
        "the dataplane's user"
    );
    assert!(containerfile.contains("--locked"), "reproducible: the lock file's versions");
}

//! `cargo xtask`: the project's entry points.
//!
//! - `setup`: installs the system packages the build needs (BoringSSL for
//!   quiche needs cmake and libclang); as root it runs apt-get, otherwise it
//!   prints the exact command and fails. Then it creates the interop suite's
//!   Python venv (`target/interop-venv`, aioquic pinned in
//!   `bench/interop/requirements.txt`), and installs the Privacy Pass
//!   tests' Node client (`npm ci` in `bench/privacypass`).
//! - `build`: setup, then builds every binary.
//! - `run [--config FILE] [--debug]`: installs the system packages, builds
//!   (release) and runs the relay — relay-control on its embedded demo
//!   config or on FILE, then relay-dataplane — until Ctrl-C ([`run`]).
//! - `test`: setup, formatting and lint checks, then every test. The tests
//!   marked `#[ignore = "needs ..."]` (root, /dev/net/tun, ip, curl,
//!   turnserver, nft, redis-server, the interop venv, node with the Privacy
//!   Pass client: `IGNORED` below) run where the machine has
//!   what they need and count as skipped elsewhere; under CI a missing need
//!   is an error. The last line is `summary: N passed, M failed, K skipped`.
//! - `bench`: the benchmark suite on release binaries (`--update-docs`
//!   writes the results into docs/BENCHMARKS.md).
//! - `fuzz`: every cargo-fuzz target (relay-proto's and relay-channel's) for
//!   `--seconds N` each.
//! - `instr`: instructions the worker spends per datagram, counted with
//!   callgrind on the dataplane's steady-load tests ([`instr`]).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

mod instr;
mod run;

/// Debian packages the build needs, with a file that proves each present.
const PACKAGES: &[(&str, &str)] = &[
    ("cmake", "/usr/bin/cmake"),
    ("libclang-dev", ""),
    ("pkg-config", "/usr/bin/pkg-config"),
    ("g++", "/usr/bin/g++"),
    ("make", "/usr/bin/make"),
    ("iproute2", "/usr/sbin/ip"),
    // The connect-ip namespace test pings through the tunnel.
    ("iputils-ping", "/usr/bin/ping"),
    // The bound UDP test's STUN server (coturn's turnserver, --stun-only).
    ("coturn", "/usr/bin/turnserver"),
    // The TCP front's tests speak HTTP/2 (h2c, prior knowledge, ALPN) and
    // HTTP/1.1 to it with curl (Debian's, built with nghttp2).
    ("curl", "/usr/bin/curl"),
    // The interop suite's independent client (aioquic) runs in a venv.
    ("python3", "/usr/bin/python3"),
    ("python3-venv", ""),
    // Fleet mode's store, for control's fleet tests and the multi-host test.
    ("redis-server", "/usr/bin/redis-server"),
    // The multi-host fleet test's load balancer (an nftables DNAT map).
    ("nftables", "/usr/sbin/nft"),
    // The Privacy Pass tests' independent client and issuer
    // (@cloudflare/privacypass-ts, `bench/privacypass`) run on Node 20 or
    // later. npm comes with NodeSource's nodejs and is Debian's `npm`
    // otherwise; `setup_privacypass` checks for it on PATH.
    ("nodejs", "/usr/bin/node"),
];

fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn libclang_present() -> bool {
    let out = Command::new("ldconfig").arg("-p").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).contains("libclang")).unwrap_or(false)
}

fn missing_packages() -> Vec<&'static str> {
    let have_dpkg = Command::new("dpkg-query").arg("--version").output().is_ok();
    PACKAGES
        .iter()
        .filter(|(pkg, proof)| {
            if have_dpkg {
                !dpkg_installed(pkg)
            } else if pkg.contains("libclang") {
                !libclang_present()
            } else {
                !Path::new(proof).exists()
            }
        })
        .map(|(pkg, _)| *pkg)
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn setup() -> Result<()> {
    setup_packages()?;
    setup_interop_venv()?;
    setup_privacypass()
}

/// Installs the Privacy Pass client's packages (`bench/privacypass`,
/// pinned by its package-lock.json) with `npm ci`, unless node_modules
/// already holds exactly that lock (npm keeps a copy of it there).
fn setup_privacypass() -> Result<()> {
    let dir = root().join("bench/privacypass");
    let lock = std::fs::read_to_string(dir.join("package-lock.json"))
        .context("bench/privacypass/package-lock.json")?;
    let installed = dir.join("node_modules/.package-lock.json");
    let stamp = dir.join("node_modules/.relay-installed-lock");
    if installed.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == lock) {
        return Ok(());
    }
    if !on_path("npm") {
        bail!(
            "npm is not on PATH (the Privacy Pass tests' client): apt-get install npm, or NodeSource's nodejs"
        );
    }
    run_checked(
        Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&dir),
    )?;
    std::fs::write(&stamp, lock)?;
    Ok(())
}

fn setup_packages() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!("apt-get update && apt-get install -y --no-install-recommends {}", missing.join(" "));
    if !is_root() {
        bail!("missing system packages: {}\nrun as root:\n  sudo sh -c '{cmd}'", missing.join(", "));
    }
    eprintln!("xtask: installing system packages ({}) with apt-get", missing.join(", "));
    run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages();
    if !still.is_empty() {
        bail!("still missing after apt-get: {}", still.join(", "));
    }
    // coturn is installed for the tests' own STUN server (started in a
    // namespace) and redis-server for the fleet tests' own stores: the
    // packages' system services are not wanted.
    for service in ["coturn", "redis-server"] {
        if missing.contains(&service) && Path::new("/usr/bin/systemctl").exists() {
            let _ = Command::new("systemctl").args(["disable", "--now", service]).output();
        }
    }
    Ok(())
}

/// The interop suite's Python environment: `target/interop-venv` with the
/// pinned packages of `bench/interop/requirements.txt` (aioquic). The
/// interop tests look for it there (or at `$RELAY_INTEROP_VENV`).
fn interop_venv() -> PathBuf {
    std::env::var_os("RELAY_INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/interop-venv"))
}

/// Creates the interop venv and installs the pinned requirements, unless
/// the venv already holds exactly them (a stamp file keeps a copy of the
/// requirements it was built from).
fn setup_interop_venv() -> Result<()> {
    let venv = interop_venv();
    let requirements = root().join("bench/interop/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let stamp = venv.join("requirements.installed");
    let python = venv.join("bin/python3");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    // A system python3 (Debian's, with python3-venv); a pyenv shim works too.
    let system_python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p).args(["-c", "import venv, ensurepip"]).output().is_ok_and(|o| o.status.success())
        })
        .context("no python3 with the venv and ensurepip modules (apt-get install python3-venv)")?;
    eprintln!(
        "xtask: creating the interop tests' Python venv (aioquic, h2, PySocks, websockets) in {}",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    run_checked(Command::new(system_python).args(["-m", "venv"]).arg(&venv))?;
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", "-r"])
            .arg(&requirements),
    )?;
    run_checked(
        Command::new(&python)
            .args(["-c", "import aioquic.h3.connection, h2.connection, socks, websockets.sync.client"]),
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

fn build(release: bool) -> Result<()> {
    setup()?;
    build_bins(release)
}

/// Builds every binary (the relay's, relayctl, relay-bench), saying so
/// first: cargo prints little while a first build compiles BoringSSL.
fn build_bins(release: bool) -> Result<()> {
    if release {
        eprintln!("xtask: building the relay (release; the first build takes a few minutes)");
    } else {
        eprintln!("xtask: building the relay (debug)");
    }
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    run_checked(&mut c)
}

/// Whether this run is CI's (`CI` set to anything but "", "false" or "0").
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Something a test marked `#[ignore = "needs ..."]` needs from the
/// machine (the tests check the same in `relay_bench::needs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Root,
    Tun,
    Ip,
    Ping,
    Python3,
    Curl,
    Turnserver,
    Nft,
    RedisServer,
    InteropVenv,
    PrivacyPassClient,
}

impl Need {
    const ALL: [Need; 11] = [
        Need::Root,
        Need::Tun,
        Need::Ip,
        Need::Ping,
        Need::Python3,
        Need::Curl,
        Need::Turnserver,
        Need::Nft,
        Need::RedisServer,
        Need::InteropVenv,
        Need::PrivacyPassClient,
    ];

    /// What is missing and how to get it, or `None` when present.
    fn missing(self) -> Option<String> {
        let program = |name: &str, package: &str| {
            (!on_path(name))
                .then(|| format!("{name} (`cargo xtask setup` as root, or apt-get install {package})"))
        };
        match self {
            Need::Root => (!is_root()).then(|| "root (run `cargo xtask test` as root)".to_string()),
            Need::Tun => (!Path::new("/dev/net/tun").exists())
                .then(|| "/dev/net/tun (`modprobe tun` as root)".to_string()),
            Need::Ip => program("ip", "iproute2"),
            Need::Ping => program("ping", "iputils-ping"),
            Need::Python3 => program("python3", "python3"),
            Need::Curl => program("curl", "curl"),
            Need::Turnserver => program("turnserver", "coturn"),
            Need::Nft => program("nft", "nftables"),
            Need::RedisServer => program("redis-server", "redis-server"),
            Need::PrivacyPassClient => {
                let installed =
                    root().join("bench/privacypass/node_modules/@cloudflare/privacypass-ts/package.json");
                (!(on_path("node") && installed.exists()))
                    .then(|| "node and the Privacy Pass client's packages (`cargo xtask setup`)".to_string())
            }
            Need::InteropVenv => {
                let python = interop_venv().join("bin/python3");
                let ok = Command::new(&python)
                    .args([
                        "-c",
                        "import aioquic.h3.connection, h2.connection, socks, websockets.sync.client",
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success());
                (!ok).then(|| {
                    format!(
                        "the interop venv ({} with aioquic, h2, PySocks and websockets: `cargo xtask setup`)",
                        python.display()
                    )
                })
            }
        }
    }
}

/// Whether an executable file `name` is in a directory of `$PATH`.
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The tests marked `#[ignore = "needs ..."]` (in relay-bench's and
/// relay-control's test binaries): package, test binary, test names, what
/// they need. A plain `cargo test`
/// lists them as ignored; `cargo xtask test` runs those whose needs the
/// machine meets and counts the others as skipped (under CI every need must
/// be met). Every ignored test must be listed here, and everything listed
/// must be an ignored test: `cargo xtask test` checks both.
const IGNORED: &[(&str, &str, &[&str], &[Need])] = {
    use Need::*;
    &[
        (BENCH, "abuse", &["slowloris_partial_headers_are_bounded"], &[InteropVenv]),
        (
            BENCH,
            "bind",
            &["bound_udp_learns_its_mapping_by_stun_and_reaches_filtered_peers_both_context_kinds"],
            &[Root, Ip, Turnserver],
        ),
        (
            BENCH,
            "bind",
            &["bound_udp_over_http2_and_http1_learns_its_mapping_by_stun"],
            &[Root, Ip, Turnserver, InteropVenv],
        ),
        (
            BENCH,
            "connect_ip",
            &["connect_ip_carries_ping_and_tcp_over_ipv4_and_ipv6_and_enforces_scope"],
            &[Root, Tun, Ip, Ping, Python3],
        ),
        (BENCH, "control_e2e", &["other_users_are_refused_by_the_admin_socket"], &[Root]),
        (
            BENCH,
            "masque_client",
            &["socks5_connect_carries_curl_through_the_relay_on_http3_and_http2"],
            &[Curl],
        ),
        (
            BENCH,
            "masque_client",
            &["socks5_udp_associate_from_pysocks_reaches_ip_and_named_targets_on_http3_and_http2"],
            &[InteropVenv],
        ),
        (
            BENCH,
            "masque_client",
            &["ip_mode_puts_the_tunnel_on_a_tun_device_and_pings_a_target_namespace"],
            &[Root, Tun, Ip, Ping],
        ),
        (BENCH, "e2e", &["the_dataplane_runs_unprivileged_without_access_to_the_key"], &[Root]),
        (BENCH, "qlog", &["an_unprivileged_dataplane_writes_qlog_into_controls_state_directory"], &[Root]),
        (
            BENCH,
            "interop",
            &[
                "connect_udp_with_h3_datagrams_both_ways_byte_for_byte",
                "datagram_capsules_both_ways_when_the_client_has_no_h3_datagrams",
                "malformed_requests_are_reset_with_h3_message_error",
                "refusals_carry_exact_statuses",
                "protocol_sent_before_the_relays_settings_is_served",
                "unknown_context_ids_and_foreign_streams_are_dropped_and_counted",
                "malformed_quarter_stream_ids_close_the_connection_with_h3_datagram_error",
                "capsule_truncated_by_fin_aborts_the_tunnel_with_h3_message_error",
                "oversize_capsules_abort_the_tunnel",
                "oversize_header_section_closes_the_connection_with_h3_excessive_load",
                "requests_after_goaway_are_rejected_while_open_tunnels_keep_forwarding",
            ],
            &[InteropVenv],
        ),
        (
            BENCH,
            "websocket",
            &[
                "websocket_echoes_text_binary_and_a_megabyte_on_every_http_version",
                "subprotocol_extensions_and_request_fields_reach_the_origin_and_its_answer_comes_back",
                "routes_match_the_host_then_the_path_prefix_in_file_order",
                "refusals_carry_exact_statuses_and_proxy_status",
                "a_client_reset_mid_message_closes_the_origin_side_and_the_relay_keeps_serving",
                "the_origins_close_code_and_reason_reach_the_client_then_the_stream_ends",
                "relay_routes_ask_for_credentials_and_public_routes_do_not",
                "wss_origins_are_verified_and_echo_on_every_http_version",
                "http2_origins_get_extended_connect_and_echo_on_every_http_version",
                "http2_origins_refusals_closes_and_resets_map_end_to_end",
            ],
            &[InteropVenv],
        ),
        (
            BENCH,
            "webtransport",
            &[
                "sessions_relay_streams_datagrams_and_their_ends",
                "draft16_settings_and_token_on_both_hops",
                "refusals_carry_exact_statuses_and_proxy_status",
                "sessions_show_in_relayctl_flows_with_their_kind",
                "a_draining_relay_sends_wt_drain_session_and_keeps_serving_the_session",
            ],
            &[InteropVenv],
        ),
        (
            BENCH,
            "mtls",
            &["client_certificates_over_the_tcp_front_get_in_or_the_documented_refusal"],
            &[Curl],
        ),
        (BENCH, "smoke", &["smoke_suite_with_targets_in_a_network_namespace"], &[Root, Ip]),
        (BENCH, "smoke", &["ip_bench_measures_every_path"], &[Root, Tun, Ip]),
        (BENCH, "tcp_front", &["curl_negotiates_every_version_and_every_response_carries_alt_svc"], &[Curl]),
        (
            BENCH,
            "tcp_front",
            &[
                "http2_extended_connect_udp_tunnels_carry_capsules_both_ways",
                "tcp_connect_over_each_http_version_moves_megabytes_byte_for_byte",
                "h2c_upgrade_never_overshoots_the_clients_connection_window",
                "refusals_carry_status_and_proxy_status_on_every_version",
            ],
            &[InteropVenv],
        ),
        (
            BENCH,
            "tcp_front",
            &["connect_ip_over_http2_and_http1_pings_a_target_namespace_through_the_tun_device"],
            &[Root, Tun, Ip, InteropVenv],
        ),
        (
            BENCH,
            "privacy_pass",
            &["privacy_pass_tokens_from_an_independent_issuer_open_tunnels_once_each_and_refusals_are_exact"],
            &[PrivacyPassClient],
        ),
        (
            BENCH,
            "privacy_pass",
            &["privacy_pass_tokens_over_http2_and_http1"],
            &[PrivacyPassClient, InteropVenv],
        ),
        (
            BENCH,
            "fleet",
            &["three_hosts_behind_an_l4_balancer_act_as_one_relay"],
            &[Root, Ip, Nft, RedisServer],
        ),
        (
            CONTROL,
            "fleet",
            &[
                "fleet_revocation_on_one_host_is_enforced_on_another_within_1s",
                "fleet_tampered_store_values_are_rejected_and_counted",
                "fleet_store_outage_keeps_state_and_reconverges_after_restart",
                "fleet_ticket_keys_are_the_same_on_every_host_after_a_rotation",
                "fleet_poll_catches_a_change_whose_announcement_was_lost",
                "fleet_global_identity_quotas_count_every_hosts_usage",
            ],
            &[RedisServer],
        ),
    ]
};

/// relay-bench: the end-to-end tests.
const BENCH: &str = "relay-bench";
/// relay-control: control's own integration tests (fleet mode).
const CONTROL: &str = "relay-control";

/// The relay-bench test binaries whose tests run a second time on the
/// epoll backend (their ignored ones too, where the machine allows).
const EPOLL_AGAIN: &[&str] = &["e2e", "connect_ip", "bind"];

/// Totals over every `cargo test` run of `cargo xtask test`.
#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
}

impl Totals {
    /// The closing line CI reads.
    fn summary(&self) -> String {
        format!("summary: {} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped)
    }

    /// Runs `cmd` (a `cargo test`) and adds its counts; a failed run ends
    /// `cargo xtask test` with the summary so far.
    fn run(&mut self, cmd: &mut Command) -> Result<TestRun> {
        let run = run_counting_tests(cmd)?;
        self.passed += run.passed;
        self.failed += run.failed;
        if !run.success {
            println!(
                "summary: {} passed, {} failed, {} skipped",
                self.passed,
                self.failed.max(1),
                self.skipped
            );
            bail!("{cmd:?} failed");
        }
        Ok(run)
    }
}

fn test(args: &[String]) -> Result<()> {
    let no_lint = args.iter().any(|a| a == "--no-lint");
    setup()?;
    // What the ignored tests need, before anything long runs: under CI all
    // of it must be there.
    let missing: Vec<(Need, String)> =
        Need::ALL.iter().filter_map(|n| n.missing().map(|m| (*n, m))).collect();
    let runnable = |needs: &[Need]| needs.iter().all(|n| !missing.iter().any(|(m, _)| m == n));
    let unrunnable: Vec<&str> = IGNORED
        .iter()
        .filter(|(_, _, _, needs)| !runnable(needs))
        .flat_map(|(_, _, names, _)| names.iter().copied())
        .collect();
    let lacking = missing.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("\n  ");
    if !missing.is_empty() {
        if in_ci() {
            bail!("under CI every test runs, but this machine lacks:\n  {lacking}");
        }
        eprintln!(
            "xtask: this machine lacks:\n  {lacking}\nxtask: the {} tests that need it will be skipped: {}",
            unrunnable.len(),
            unrunnable.join(", ")
        );
    }
    if !no_lint {
        run_checked(cargo().args(["fmt", "--all", "--check"]))?;
        run_checked(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The end-to-end tests start the relay binaries as real processes.
    run_checked(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    let mut totals = Totals::default();
    // Every test, with the relay on its default backend (io_uring); in CI
    // io_uring is required, so a kernel or sandbox that refuses it fails
    // the run instead of silently testing epoll twice.
    let io = if in_ci() { Some("io_uring") } else { None };
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--locked"]).env("RUST_BACKTRACE", "1");
    if let Some(io) = io {
        cmd.env("RELAY_TEST_IO", io);
    }
    let main = totals.run(&mut cmd)?;
    check_ignored_list(&main.ignored)?;
    run_ignored(&mut totals, &main, |_, _| true, io, &runnable)?;
    // The end-to-end suite once more on the epoll backend.
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "-p", "relay-bench"]);
    for t in EPOLL_AGAIN {
        cmd.args(["--test", t]);
    }
    cmd.env("RUST_BACKTRACE", "1").env("RELAY_TEST_IO", "epoll");
    let epoll = totals.run(&mut cmd)?;
    run_ignored(
        &mut totals,
        &epoll,
        |package, bin| package == BENCH && EPOLL_AGAIN.contains(&bin),
        Some("epoll"),
        &runnable,
    )?;
    // The shared-memory ring's loom model (relay-channel): every
    // interleaving of producer and consumer through the ring's own push/pop
    // code. Its own target directory, so `--cfg loom` does not rebuild the
    // main one.
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "--release", "-p", "relay-channel", "--lib", "loom"])
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", root().join("target").join("loom"));
    let loom = totals.run(&mut cmd)?;
    if loom.passed == 0 {
        bail!("the loom model test did not run");
    }
    totals.skipped += loom.ignored.len() as u64;
    if !unrunnable.is_empty() {
        eprintln!("xtask: skipped, for lack of:\n  {lacking}\nxtask: tests: {}", unrunnable.join(", "));
    }
    println!("{}", totals.summary());
    if totals.failed > 0 || totals.passed == 0 {
        bail!("{} tests failed, {} passed", totals.failed, totals.passed);
    }
    Ok(())
}

/// Checks that the tests the main run reported as ignored are exactly the
/// ones in [`IGNORED`], so that none is left out of `cargo xtask test`.
fn check_ignored_list(ignored: &[String]) -> Result<()> {
    let listed: Vec<&str> = IGNORED.iter().flat_map(|(_, _, names, _)| names.iter().copied()).collect();
    let unlisted: Vec<&str> = ignored.iter().map(String::as_str).filter(|n| !listed.contains(n)).collect();
    let stale: Vec<&str> = listed.iter().copied().filter(|n| !ignored.iter().any(|i| i == n)).collect();
    if !unlisted.is_empty() {
        bail!(
            "ignored tests missing from IGNORED in xtask/src/main.rs (cargo xtask test would never run them): {}",
            unlisted.join(", ")
        );
    }
    if !stale.is_empty() {
        bail!("IGNORED in xtask/src/main.rs lists tests that are not ignored tests: {}", stale.join(", "));
    }
    Ok(())
}

/// After a run that reported `regular.ignored`, runs (`--ignored`) those
/// of [`IGNORED`] in the (package, binary) pairs `include` selects whose
/// needs are met, on the `io` backend, one `cargo test` per package; the
/// ignored tests left unrun count as skipped.
fn run_ignored(
    totals: &mut Totals,
    regular: &TestRun,
    include: impl Fn(&str, &str) -> bool,
    io: Option<&str>,
    runnable: &dyn Fn(&[Need]) -> bool,
) -> Result<()> {
    let rows: Vec<_> = IGNORED
        .iter()
        .filter(|(package, bin, names, needs)| {
            include(package, bin)
                && runnable(needs)
                && names.iter().all(|n| regular.ignored.iter().any(|i| i == n))
        })
        .collect();
    let count: usize = rows.iter().map(|(_, _, names, _)| names.len()).sum();
    totals.skipped += regular.ignored.len() as u64 - count as u64;
    let mut packages: Vec<&str> = rows.iter().map(|(package, _, _, _)| *package).collect();
    packages.sort_unstable();
    packages.dedup();
    for package in packages {
        let mine: Vec<_> = rows.iter().filter(|(p, _, _, _)| *p == package).collect();
        let names: Vec<&str> = mine.iter().flat_map(|(_, _, names, _)| names.iter().copied()).collect();
        let mut bins: Vec<&str> = mine.iter().map(|(_, bin, _, _)| *bin).collect();
        bins.dedup();
        let mut cmd = cargo();
        cmd.args(["test", "--locked", "-p", package]);
        for bin in &bins {
            cmd.args(["--test", bin]);
        }
        cmd.args(["--", "--ignored", "--exact"]).args(&names).env("RUST_BACKTRACE", "1");
        if let Some(io) = io {
            cmd.env("RELAY_TEST_IO", io);
        }
        let run = totals.run(&mut cmd)?;
        if run.passed + run.failed != names.len() as u64 {
            bail!(
                "{} ignored tests of {package} were to run, libtest ran {}",
                names.len(),
                run.passed + run.failed
            );
        }
    }
    Ok(())
}

/// What one `cargo test` reported.
#[derive(Debug)]
struct TestRun {
    passed: u64,
    failed: u64,
    /// The tests reported as ignored (not run).
    ignored: Vec<String>,
    /// Whether cargo exited successfully.
    success: bool,
}

/// Runs `cargo test`, echoing its output, and totals its `test result:`
/// lines (`test result: ok. N passed; M failed; K ignored; ...`) and its
/// `test NAME ... ignored` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<TestRun> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("test output")?;
    let (mut passed, mut failed, mut ignored_total) = (0u64, 0u64, 0u64);
    let mut ignored = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let number_before = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| n.trim().rsplit(' ').next().unwrap_or(""))
                    })
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += number_before(" passed");
            failed += number_before(" failed");
            ignored_total += number_before(" ignored");
        } else if let Some((name, outcome)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... "))
            && (outcome == "ignored" || outcome.starts_with("ignored,"))
        {
            ignored.push(name.to_string());
        }
    }
    let status = child.wait()?;
    if status.success() && ignored.len() as u64 != ignored_total {
        bail!("{cmd:?}: libtest counted {ignored_total} ignored tests but named {}", ignored.len());
    }
    Ok(TestRun { passed, failed, ignored, success: status.success() })
}

/// Runs the benchmark suite on release binaries. With `--update-docs`, the
/// markdown table and plots go into docs/BENCHMARKS.md and docs/bench/.
fn bench(args: &[String]) -> Result<()> {
    build(true)?;
    let out = root().join("results").join("latest");
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = Command::new(root().join("target/release/relay-bench"));
    cmd.current_dir(root())
        .arg("suite")
        .arg("--out")
        .arg(&out)
        .arg("--bin-dir")
        .arg(root().join("target/release"));
    for a in args.iter().filter(|a| *a == "--smoke" || *a == "--no-pin") {
        cmd.arg(a);
    }
    run_checked(&mut cmd)?;
    if args.iter().any(|a| a == "--update-docs") {
        update_docs(&out)?;
    }
    Ok(())
}

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

fn update_docs(out: &Path) -> Result<()> {
    let docs = root().join("docs");
    let plots = docs.join("bench");
    std::fs::create_dir_all(&plots)?;
    for f in ["throughput.svg", "latency_cdf.svg", "setup.svg", "report.json"] {
        std::fs::copy(out.join(f), plots.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let table = std::fs::read_to_string(out.join("report.md"))?;
    let path = docs.join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path)?;
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!("{} lacks the {BEGIN} / {END} markers", path.display());
    };
    let body = format!(
        "{BEGIN}\n{table}\n![throughput](bench/throughput.svg)\n![latency](bench/latency_cdf.svg)\n![setup](bench/setup.svg)\n"
    );
    let updated = format!("{}{body}{}", &doc[..b], &doc[e..]);
    std::fs::write(&path, updated)?;
    eprintln!("xtask: updated {} and {}", path.display(), plots.display());
    Ok(())
}

/// The cargo-fuzz projects: relay-proto's decoders and relay-channel's
/// ring readers (each in `<crate>/fuzz`, with its corpora under
/// `fuzz/corpus/<target>`).
fn fuzz_dirs() -> [PathBuf; 2] {
    [root().join("dataplane/proto"), root().join("dataplane/channel")]
}

/// Runs every fuzz target of every project for `--seconds N` (default 60)
/// each, on the stable toolchain (no sanitizer), with the committed corpora.
fn fuzz(args: &[String]) -> Result<()> {
    let seconds: u64 = match args.iter().position(|a| a == "--seconds") {
        Some(i) => args
            .get(i + 1)
            .context("--seconds needs a value")?
            .parse()
            .context("--seconds must be a number")?,
        None => 60,
    };
    let only = args.iter().position(|a| a == "--target").and_then(|i| args.get(i + 1)).cloned();
    let have_fuzz = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_fuzz {
        run_checked(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let mut targets: Vec<(PathBuf, String)> = Vec::new();
    for dir in fuzz_dirs() {
        let list = cargo().current_dir(&dir).args(["fuzz", "list"]).output().context("cargo fuzz list")?;
        if !list.status.success() {
            bail!("cargo fuzz list in {} failed: {}", dir.display(), String::from_utf8_lossy(&list.stderr));
        }
        targets.extend(
            String::from_utf8_lossy(&list.stdout)
                .lines()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .filter(|t| only.as_deref().is_none_or(|o| o == *t))
                .map(|t| (dir.clone(), t.to_string())),
        );
    }
    if targets.is_empty() {
        bail!("no fuzz targets found");
    }
    for (dir, t) in &targets {
        std::fs::create_dir_all(dir.join("fuzz/corpus").join(t))?;
        run_checked(
            cargo()
                .current_dir(dir)
                .args(["fuzz", "run", t, "--sanitizer", "none", "--"])
                .arg(format!("-max_total_time={seconds}"))
                // libFuzzer would otherwise replace committed seeds by
                // smaller inputs with the same features, deleting them from
                // the working tree.
                .arg("-reduce_inputs=0"),
        )?;
    }
    println!("fuzz: {} targets ran {seconds} s each without a crash", targets.len());
    Ok(())
}

fn usage() -> &'static str {
    "usage: cargo xtask <setup | build [--release] | run [--config FILE] [--debug] | test [--no-lint] | bench [--smoke] [--no-pin] [--update-docs] | fuzz [--seconds N] [--target NAME] | instr [--rounds A,B] [--top N] [--only WORD]>"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build") => build(rest.iter().any(|a| a == "--release")),
        Some("run") => run::run_relay(rest),
        Some("test") => test(rest),
        Some("bench") => bench(rest),
        Some("fuzz") => fuzz(rest),
        Some("instr") => instr::instr(rest),
        _ => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `cargo xtask run [--config FILE] [--debug]`: installs the system
//! packages, builds, and runs relay-control (on its embedded demo config,
//! or on FILE after checking it) and relay-dataplane until Ctrl-C, saying
//! what it does before each step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{build_bins, root, setup_packages};

/// What `cargo xtask run` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RunArgs {
    /// A debug build instead of release.
    debug: bool,
    /// The operator's config file; `None` runs the demo.
    config: Option<PathBuf>,
}

impl RunArgs {
    fn parse(args: &[String]) -> Result<Self> {
        let mut parsed = RunArgs { debug: false, config: None };
        let mut words = args.iter();
        while let Some(word) = words.next() {
            match word.as_str() {
                "--debug" => parsed.debug = true,
                "--config" => {
                    parsed.config = Some(PathBuf::from(words.next().context("--config needs a file")?));
                }
                other => match other.strip_prefix("--config=") {
                    Some(file) => parsed.config = Some(PathBuf::from(file)),
                    None => {
                        bail!("cargo xtask run: unknown argument {other:?} (run [--config FILE] [--debug])")
                    }
                },
            }
        }
        Ok(parsed)
    }
}

/// Where the relay about to run keeps its sockets and state, and where
/// clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    /// `--config FILE` for relay-control (absolute); `None` for the demo.
    config: Option<PathBuf>,
    state_dir: PathBuf,
    channel_socket: PathBuf,
    admin_socket: PathBuf,
    /// `listen.quic`.
    quic: String,
}

impl Layout {
    /// The demo: the embedded config, its state in `<workspace>/state`.
    fn demo(workspace: &Path) -> Self {
        let state_dir = workspace.join("state");
        Layout {
            config: None,
            channel_socket: state_dir.join("channel.sock"),
            admin_socket: state_dir.join("admin.sock"),
            state_dir,
            quic: "127.0.0.1:4433".into(),
        }
    }

    /// From the configuration in force that `relay-control --check-config`
    /// printed for `config`; relative paths are relative to `workspace`,
    /// where the relay runs.
    fn from_effective(config: PathBuf, effective: &str, workspace: &Path) -> Result<Self> {
        let table: toml::Table = toml::from_str(effective).context("reading relay-control --check-config")?;
        let text = |section: &str, key: &str| {
            table.get(section).and_then(|s| s.get(key)).and_then(|v| v.as_str()).map(str::to_string)
        };
        let state_dir = workspace.join(text("relay", "state_dir").context("no relay.state_dir")?);
        let socket = |key: &str, file: &str| {
            text("relay", key).map_or_else(|| state_dir.join(file), |p| workspace.join(p))
        };
        Ok(Layout {
            channel_socket: socket("channel_socket", "channel.sock"),
            admin_socket: socket("admin_socket", "admin.sock"),
            quic: text("listen", "quic").context("no listen.quic")?,
            config: Some(config),
            state_dir,
        })
    }
}

/// Checks the operator's config with relay-control itself and learns the
/// relay's paths from the configuration in force.
fn check_config(control: &Path, file: &Path) -> Result<Layout> {
    let file = std::fs::canonicalize(file).with_context(|| format!("--config {}", file.display()))?;
    eprintln!("xtask: checking {} (relay-control --check-config)", file.display());
    let out = Command::new(control).arg("--check-config").arg(&file).current_dir(root()).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Layout::from_effective(file, &String::from_utf8_lossy(&out.stdout), &root())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn terminate(child: &mut Child) {
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `cargo xtask run`.
pub fn run_relay(args: &[String]) -> Result<()> {
    let args = RunArgs::parse(args)?;
    setup_packages()?;
    build_bins(!args.debug)?;
    let profile = if args.debug { "debug" } else { "release" };
    let bin = root().join("target").join(profile);
    let layout = match &args.config {
        None => Layout::demo(&root()),
        Some(file) => check_config(&bin.join("relay-control"), file)?,
    };
    let _ = std::fs::remove_file(&layout.channel_socket);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing an async-signal-safe handler that only stores
        // to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    eprintln!("xtask: starting relay-control and relay-dataplane ...");
    let mut control = Command::new(bin.join("relay-control"));
    match &layout.config {
        Some(file) => control.arg("--config").arg(file),
        None => control.arg("--state-dir").arg(&layout.state_dir),
    };
    // The token is printed below; control's stdout would repeat it.
    let mut control =
        control.current_dir(root()).stdout(Stdio::null()).spawn().context("starting relay-control")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !layout.channel_socket.exists() {
        if let Some(status) = control.try_wait()? {
            bail!("relay-control exited: {status}");
        }
        if Instant::now() > deadline {
            terminate(&mut control);
            bail!("relay-control did not open {}", layout.channel_socket.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dataplane = Command::new(bin.join("relay-dataplane"))
        .arg("--control-socket")
        .arg(&layout.channel_socket)
        .current_dir(root())
        .spawn()
        .context("starting relay-dataplane")?;
    print_banner(&layout);
    let result = loop {
        if STOP.load(Ordering::Relaxed) {
            break Ok(());
        }
        if let Some(status) = dataplane.try_wait()? {
            break if status.success() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("relay-dataplane exited: {status}"))
            };
        }
        if let Some(status) = control.try_wait()? {
            break if status.success() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("relay-control exited: {status}"))
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    terminate(&mut dataplane);
    terminate(&mut control);
    result
}

/// What is running and how to try it.
fn print_banner(layout: &Layout) {
    let token =
        std::fs::read_to_string(layout.state_dir.join("token")).unwrap_or_default().trim().to_string();
    let admin = layout.admin_socket.strip_prefix(root()).unwrap_or(&layout.admin_socket);
    println!();
    match &layout.config {
        None => {
            println!(
                "MASQUE relay running: QUIC on 127.0.0.1:4433 (connect-udp, template /.well-known/masque/udp/{{target_host}}/{{target_port}}/, and CONNECT)"
            );
            println!(
                "  TCP:      TLS on 127.0.0.1:4433 (HTTP/2 and HTTP/1.1, ALPN), e.g. curl --cacert state/cert.pem https://127.0.0.1:4433/"
            );
        }
        Some(file) => println!("MASQUE relay running on {}: QUIC on {}", file.display(), layout.quic),
    }
    println!("  state:    {}", layout.state_dir.display());
    if !token.is_empty() {
        println!("  token:    {token}");
    }
    println!(
        "  status:   cargo run -q -p relay-control --bin relayctl -- --socket {} status",
        admin.display()
    );
    if layout.config.is_none() {
        println!("  try it (in another terminal, from {}):", root().display());
        println!(
            "    cargo run -q --release -p relay-bench -- tunnel-echo --ca state/cert.pem --token {token} --flows 4 --count 1000"
        );
        println!("  use it (a SOCKS5 server for any application; README, \"The client\"):");
        println!(
            "    cargo run -q --release -p relay-bench --bin masque-client -- socks --relay localhost:4433 --ca state/cert.pem --token-file state/token --listen 127.0.0.1:1080"
        );
    }
    println!("  Ctrl-C stops the relay.");
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(RunArgs::parse(&[]).unwrap(), RunArgs { debug: false, config: None });
        let both = RunArgs { debug: true, config: Some("my.toml".into()) };
        assert_eq!(RunArgs::parse(&words("--config my.toml --debug")).unwrap(), both);
        assert_eq!(RunArgs::parse(&words("--debug --config=my.toml")).unwrap(), both);
        assert!(RunArgs::parse(&words("--config")).unwrap_err().to_string().contains("needs a file"));
        assert!(RunArgs::parse(&words("--confg x")).unwrap_err().to_string().contains("--confg"));
    }

    #[test]
    fn the_layout_follows_the_configuration_in_force() {
        let workspace = Path::new("/w");
        let effective = "# /w/my.toml: valid.\n\n[relay]\nname = \"masque-relay\"\nstate_dir = \"run\"\n\
                         admin_socket = \"/tmp/admin.sock\"\n\n[listen]\nquic = \"127.0.0.1:8443\"\n";
        let layout = Layout::from_effective("/w/my.toml".into(), effective, workspace).unwrap();
        assert_eq!(
            layout,
            Layout {
                config: Some("/w/my.toml".into()),
                state_dir: "/w/run".into(),
                channel_socket: "/w/run/channel.sock".into(),
                admin_socket: "/tmp/admin.sock".into(),
                quic: "127.0.0.1:8443".into(),
            }
        );
        assert_eq!(Layout::demo(workspace).channel_socket, Path::new("/w/state/channel.sock"));
        assert!(Layout::from_effective("/w/x.toml".into(), "[listen]\n", workspace).is_err());
    }
}

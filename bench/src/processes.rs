//! Starts a real relay — `relay-control` and `relay-dataplane` as separate
//! processes — for end-to-end tests and benchmarks.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the relay binaries are: `$RELAY_BIN_DIR`, else the cargo target
/// directory this test or tool runs from.
pub fn bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("RELAY_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

fn binary(dir: Option<&Path>, name: &str) -> Result<PathBuf> {
    let path = match dir {
        Some(d) => d.join(name),
        None => bin_dir()?.join(name),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --workspace --bins) or set RELAY_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port free a moment ago for both UDP and TCP on `ip` (the relay's QUIC
/// and TLS-over-TCP listeners share the number).
pub fn free_port_pair(ip: std::net::IpAddr) -> Result<u16> {
    for _ in 0..64 {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP")
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether this process runs as root (the namespace and other-user tests
/// need it; CI runs as root).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Options for a test relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Workers.
    pub workers: u32,
    /// Bearer token accepted.
    pub token: String,
    /// More static tokens accepted (separate identities for quota tests).
    pub extra_tokens: Vec<String>,
    /// CIDRs allowed as targets (tests allow loopback explicitly).
    pub allow: Vec<String>,
    /// Ask timeout in milliseconds.
    pub ask_timeout_ms: u32,
    /// Tunnel idle timeout in seconds.
    pub flow_idle_timeout_secs: u32,
    /// I/O backend (`dataplane.io`): default from `RELAY_TEST_IO`, else
    /// "auto". CI runs the end-to-end suite once per backend this way.
    pub io: String,
    /// Extra TOML appended to the `[dataplane]` section.
    pub dataplane_extra: String,
    /// Extra TOML appended at the end of the config (new sections such as
    /// `[quotas.per_identity]` or `[[auth.hmac_keys]]`).
    pub extra_config: String,
    /// Extra TOML appended to the `[relay]` section.
    pub relay_extra: String,
    /// Extra TOML appended to the `[tls]` section.
    pub tls_extra: String,
    /// Extra TOML appended to the `[auth]` section (e.g. `schemes`).
    pub auth_extra: String,
    /// Run the dataplane as this uid (and gid); needs root. The channel
    /// socket then lives outside the (0700) state directory.
    pub dataplane_uid: Option<u32>,
    /// Address the QUIC listener binds (default 127.0.0.1), e.g. the host
    /// side of a test namespace's link.
    pub listen_ip: std::net::IpAddr,
    /// Directory of the relay binaries (default: [`bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// Where the relay processes' logs go (`control.log`,
    /// `dataplane.log`; default: the test's stderr).
    pub log_dir: Option<PathBuf>,
    /// `RUST_LOG` of both processes (default: `$RELAY_LOG`, else "warn").
    pub log_filter: Option<String>,
    /// `--log-format` of both processes ("text" or "json"; default: theirs).
    pub log_format: Option<String>,
    /// Also listen for cleartext HTTP/1.1 and h2c (`listen.tcp_cleartext`).
    pub tcp_cleartext: bool,
    /// Extra TOML for the `[tcp]` section.
    pub tcp_extra: String,
    /// Run both processes in this network namespace (`ip netns` name):
    /// a relay host of a multi-host test topology
    /// ([`crate::fleet_topology`]).
    pub netns: Option<String>,
    /// The QUIC and TLS-over-TCP port (default: one free on `listen_ip`
    /// in the caller's namespace). Needed with `netns`, where the caller
    /// cannot look for a free port.
    pub port: Option<u16>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            workers: std::env::var("RELAY_TEST_WORKERS").ok().and_then(|w| w.parse().ok()).unwrap_or(2),
            token: "e2e-test-token".into(),
            extra_tokens: Vec::new(),
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            ask_timeout_ms: 1500,
            flow_idle_timeout_secs: 120,
            io: std::env::var("RELAY_TEST_IO").unwrap_or_else(|_| "auto".into()),
            dataplane_extra: String::new(),
            extra_config: String::new(),
            relay_extra: String::new(),
            tls_extra: String::new(),
            auth_extra: String::new(),
            dataplane_uid: None,
            listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            bin_dir: None,
            log_dir: None,
            log_filter: None,
            log_format: None,
            tcp_cleartext: false,
            tcp_extra: String::new(),
            netns: None,
            port: None,
        }
    }
}

/// How a relay process logs: its `RUST_LOG` and `--log-format`.
#[derive(Debug, Clone, Default)]
pub struct LogArgs {
    /// `RUST_LOG` (default: `$RELAY_LOG`, else "warn").
    pub filter: Option<String>,
    /// `--log-format` (default: the process's own).
    pub format: Option<String>,
}

impl LogArgs {
    /// Sets them on the command of a relay process.
    pub fn apply(&self, cmd: &mut Command) {
        let filter = self.filter.clone().or_else(|| std::env::var("RELAY_LOG").ok());
        cmd.env("RUST_LOG", filter.unwrap_or_else(|| "warn".into())).env_remove("RELAY_LOG_FORMAT");
        if let Some(format) = &self.format {
            cmd.arg("--log-format").arg(format);
        }
    }
}

/// A running relay; both processes are killed on drop.
pub struct Relay {
    /// The QUIC address (and the TLS-over-TCP listener's).
    pub addr: SocketAddr,
    /// The cleartext TCP listener, when asked for.
    pub cleartext_addr: Option<SocketAddr>,
    /// The state directory (certificate, sockets).
    pub state_dir: PathBuf,
    /// The config file.
    pub config_path: PathBuf,
    /// The token clients use.
    pub token: String,
    bin_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    log_args: LogArgs,
    dataplane_uid: Option<u32>,
    netns: Option<String>,
    channel_socket: PathBuf,
    control: Option<Child>,
    dataplane: Option<Child>,
}

impl Relay {
    /// Writes a config under `dir` and starts both processes; returns once
    /// the dataplane answers a QUIC handshake.
    pub fn start(dir: &Path, opts: &RelayOptions) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = match opts.port {
            Some(port) => port,
            None => free_port_pair(opts.listen_ip)?,
        };
        let cleartext_addr =
            if opts.tcp_cleartext { Some(SocketAddr::new(opts.listen_ip, free_tcp_port()?)) } else { None };
        let cleartext_line = cleartext_addr.map(|a| format!("tcp_cleartext = \"{a}\"")).unwrap_or_default();
        let state_dir = dir.join("state");
        let channel_socket = if opts.dataplane_uid.is_some() {
            dir.join("channel.sock")
        } else {
            state_dir.join("channel.sock")
        };
        let allow: Vec<String> = opts.allow.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            r#"[relay]
name = "test-relay"
state_dir = "{state}"
channel_socket = "{channel}"
{relay_extra}

[listen]
quic = "{listen}"
metrics = "127.0.0.1:0"
{cleartext_line}

[dataplane]
workers = {workers}
io = "{io}"
uri_template = "/.well-known/masque/udp/{{target_host}}/{{target_port}}/"
flow_idle_timeout_secs = {idle}
ask_timeout_ms = {ask}
{extra}

[tls]
self_signed_names = ["localhost", "127.0.0.1"]
{tls_extra}

[auth]
realm = "test"
tokens = [{tokens}]
{auth_extra}

[targets]
allow = [{allow}]

[resolver]
threads = 2
timeout_ms = 1000
max_pending = 64

[tcp]
{tcp_extra}

{extra_config}
"#,
            state = state_dir.display(),
            workers = opts.workers,
            io = opts.io,
            idle = opts.flow_idle_timeout_secs,
            ask = opts.ask_timeout_ms,
            extra = opts.dataplane_extra,
            tokens = std::iter::once(&opts.token)
                .chain(&opts.extra_tokens)
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", "),
            allow = allow.join(", "),
            extra_config = opts.extra_config,
            relay_extra = opts.relay_extra,
            channel = channel_socket.display(),
            tls_extra = opts.tls_extra,
            listen = SocketAddr::new(opts.listen_ip, port),
            tcp_extra = opts.tcp_extra,
            auth_extra = opts.auth_extra,
        );
        let config_path = dir.join("relay.toml");
        std::fs::write(&config_path, config)?;
        let mut relay = Self {
            addr: SocketAddr::new(opts.listen_ip, port),
            cleartext_addr,
            state_dir,
            config_path,
            token: opts.token.clone(),
            bin_dir: opts.bin_dir.clone(),
            log_dir: opts.log_dir.clone(),
            log_args: LogArgs { filter: opts.log_filter.clone(), format: opts.log_format.clone() },
            dataplane_uid: opts.dataplane_uid,
            netns: opts.netns.clone(),
            channel_socket,
            control: None,
            dataplane: None,
        };
        relay.start_control()?;
        relay.start_dataplane()?;
        relay.wait_ready(Duration::from_secs(20))?;
        Ok(relay)
    }

    /// The relay's self-signed certificate (to verify it).
    pub fn cert(&self) -> PathBuf {
        self.state_dir.join("cert.pem")
    }

    /// Gives the state directory `state` of a relay not started yet this
    /// relay's certificate and key (the hosts of a fleet serve one name
    /// with one certificate).
    pub fn share_certificate(&self, state: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))?;
        for file in ["cert.pem", "key.pem"] {
            let to = state.join(file);
            std::fs::copy(self.state_dir.join(file), &to).with_context(|| format!("copying {file}"))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }

    /// Runs `relayctl ARGS` against this relay's admin socket.
    pub fn relayctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(binary(self.bin_dir.as_deref(), "relayctl")?)
            .arg("--socket")
            .arg(self.admin_socket())
            .args(args)
            .output()
            .context("running relayctl")
    }

    /// Runs `relayctl --json ARGS`, which must succeed, and parses what it
    /// prints.
    pub fn relayctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.relayctl(&all)?;
        if !out.status.success() {
            bail!(
                "relayctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("relayctl --json prints JSON")
    }

    /// The admin socket's `status` answer.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.admin(r#"{"cmd":"status"}"#)
    }

    /// The admin socket's answer to `request` (one JSON line).
    pub fn admin(&self, request: &str) -> Result<serde_json::Value> {
        use std::io::{BufRead, BufReader, Write};
        let socket = self.admin_socket();
        let s = std::os::unix::net::UnixStream::connect(&socket)
            .with_context(|| format!("admin socket {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        (&s).write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }

    /// A dataplane counter (`relayctl status` name), summed over workers.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let v = self.status()?;
        let workers = v["workers"].as_array().context("status without workers")?;
        Ok(workers.iter().map(|w| w[name].as_u64().unwrap_or(0)).sum())
    }

    /// The dataplane's resident set size in KiB (`VmRSS`).
    pub fn dataplane_rss_kib(&self) -> Result<u64> {
        let pid = self.dataplane_pid().context("no dataplane")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        crate::stats::parse_status_rss_kib(&status).context("no VmRSS")
    }

    /// Starts (or restarts) relay-control and waits for its channel socket.
    pub fn start_control(&mut self) -> Result<()> {
        let sock = self.channel_socket.clone();
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(binary(self.bin_dir.as_deref(), "relay-control")?);
        self.log_args.apply(&mut cmd);
        let _netns = self.enter_netns_on_exec(&mut cmd)?;
        let child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .stdout(Stdio::null())
            .stderr(self.log("control")?)
            .spawn()
            .context("starting relay-control")?;
        self.control = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!("relay-control did not create {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts relay-dataplane against the control socket.
    pub fn start_dataplane(&mut self) -> Result<()> {
        let mut cmd = Command::new(binary(self.bin_dir.as_deref(), "relay-dataplane")?);
        if let Some(uid) = self.dataplane_uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        self.log_args.apply(&mut cmd);
        let _netns = self.enter_netns_on_exec(&mut cmd)?;
        let child = cmd
            .arg("--control-socket")
            .arg(&self.channel_socket)
            .stdout(Stdio::null())
            .stderr(self.log("dataplane")?)
            .spawn()
            .context("starting relay-dataplane")?;
        self.dataplane = Some(child);
        Ok(())
    }

    /// Makes `cmd` start in the relay's network namespace, if it has one;
    /// the returned handle must live until `cmd` is spawned.
    fn enter_netns_on_exec(&self, cmd: &mut Command) -> Result<Option<std::fs::File>> {
        self.netns.as_deref().map(|ns| crate::netns::spawn_in(cmd, ns)).transpose()
    }

    fn log(&self, name: &str) -> Result<Stdio> {
        Ok(match &self.log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                Stdio::from(std::fs::File::create(dir.join(format!("{name}.log")))?)
            }
            None => Stdio::inherit(),
        })
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut cfg = crate::client::ClientConfig::new(self.addr);
            cfg.ca = Some(self.cert());
            match crate::client::Client::connect(cfg, Duration::from_millis(500)) {
                Ok(c) => {
                    c.close();
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => bail!("relay not ready: {e}"),
                Err(_) => {}
            }
            if let Some(dp) = self.dataplane.as_mut()
                && let Some(status) = dp.try_wait()?
            {
                bail!("relay-dataplane exited early: {status}");
            }
        }
    }

    /// Kills relay-control with SIGKILL.
    pub fn kill_control(&mut self) {
        if let Some(mut c) = self.control.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops relay-control (SIGSTOP): alive but answering nothing, until
    /// [`Relay::resume_control`].
    pub fn pause_control(&self) {
        self.signal_control(libc::SIGSTOP);
    }

    /// Lets a paused relay-control run again (SIGCONT).
    pub fn resume_control(&self) {
        self.signal_control(libc::SIGCONT);
    }

    fn signal_control(&self, signal: i32) {
        if let Some(pid) = self.control_pid() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Kills relay-dataplane with SIGKILL.
    pub fn kill_dataplane(&mut self) {
        if let Some(mut c) = self.dataplane.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The control process's PID.
    pub fn control_pid(&self) -> Option<u32> {
        self.control.as_ref().map(Child::id)
    }

    /// Sends `signal` to the dataplane.
    pub fn signal_dataplane(&self, signal: i32) {
        if let Some(pid) = self.dataplane_pid() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits up to `timeout` for the dataplane to exit and returns its
    /// status, or `None` if it is still running.
    pub fn wait_dataplane(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let Some(dp) = self.dataplane.as_mut() else { return Ok(None) };
        loop {
            if let Some(status) = dp.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The dataplane process's PID.
    pub fn dataplane_pid(&self) -> Option<u32> {
        self.dataplane.as_ref().map(Child::id)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for child in [self.dataplane.take(), self.control.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! Drives the WebSocket tests' independent Python peers
//! (bench/tests/websocket.rs): the origin `bench/interop/ws_origin.py` (the
//! `websockets` package's asyncio server) and the clients of
//! `bench/interop/ws_client.py` (HTTP/1.1 with the `websockets` client,
//! HTTP/2 with `h2`, HTTP/3 with aioquic). They run in the interop venv
//! ([`crate::interop`]); every run has a deadline after which the child
//! is killed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::interop::InteropError;
use crate::processes::Relay;

/// Longest one client run may take.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// Where the Python peers live (bench/interop).
pub fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// The venv's interpreter for a test that needs it, checked to run
/// `imports` (a Python import statement); a missing or broken venv fails
/// the test with the command that creates it.
#[track_caller]
pub fn checked_python(imports: &str, packages: &str) -> PathBuf {
    let python = crate::interop::python();
    let ok = Command::new(&python).args(["-c", imports]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs the interop venv with {packages} ({}): run `cargo xtask setup` (bench/interop/requirements.txt)",
        python.display()
    );
    python
}

/// Runs a client command to its end, killing it past [`CLIENT_LIMIT`].
pub fn output_within_limit(cmd: &mut Command) -> Result<std::process::Output, InteropError> {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLIENT_LIMIT) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: signalling our own child, which has not been reaped
            // (its waiter has not returned).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            Err(InteropError::Timeout(CLIENT_LIMIT, Vec::new()))
        }
    }
}

/// The origin script.
pub fn origin_script() -> PathBuf {
    interop_dir().join("ws_origin.py")
}

/// The client script.
pub fn client_script() -> PathBuf {
    interop_dir().join("ws_client.py")
}

/// The venv's interpreter for a test that needs it, checked to import the
/// `websockets` package too; a missing or broken venv fails the test with
/// the command that creates it.
#[track_caller]
pub fn python() -> PathBuf {
    checked_python("import websockets.sync.client, websockets.asyncio.server", "the websockets package")
}

/// A running `ws_origin.py`; killed on drop.
pub struct PyOrigin {
    child: Child,
    port: u16,
}

impl PyOrigin {
    /// Starts the origin on 127.0.0.1 with `args` (`--subprotocol chat.v1`,
    /// `--refuse 403`, `--close 4000 --close-reason bye`) and waits for the
    /// port it prints.
    pub fn start(python: &Path, args: &[&str]) -> Result<Self, InteropError> {
        Self::start_script(python, &origin_script(), args)
    }

    /// Starts another origin `script` that prints `{"port": N}` first
    /// (`wt_origin.py`), with `args`.
    pub fn start_script(python: &Path, script: &Path, args: &[&str]) -> Result<Self, InteropError> {
        let mut child = Command::new(python)
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Whatever else it prints is read and dropped, so it never
            // blocks on a full pipe.
            let mut rest = String::new();
            while reader.read_line(&mut rest).is_ok_and(|n| n > 0) {
                rest.clear();
            }
        });
        let limit = Duration::from_secs(30);
        let line = match rx.recv_timeout(limit) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(InteropError::Timeout(limit, Vec::new()));
            }
        };
        let port = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok());
        match port {
            Some(port) => Ok(Self { child, port }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(InteropError::BadOutput(line))
            }
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its `ws://` URL, for a route's `origin`.
    pub fn origin(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}

impl Drop for PyOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a client reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http {
    /// HTTP/1.1 Upgrade on the cleartext listener.
    H1Clear,
    /// HTTP/1.1 Upgrade over TLS (ALPN http/1.1) on the TCP front.
    H1Tls,
    /// HTTP/2 (prior knowledge) on the cleartext listener, RFC 8441.
    H2Clear,
    /// HTTP/2 over TLS (ALPN h2), RFC 8441.
    H2Tls,
    /// HTTP/3, RFC 9220.
    H3,
}

impl Http {
    /// Every way.
    pub const ALL: [Http; 5] = [Http::H1Clear, Http::H1Tls, Http::H2Clear, Http::H2Tls, Http::H3];

    /// The status of a handshake that opened: 101 on HTTP/1.1, 200 on
    /// HTTP/2 and HTTP/3.
    pub fn opened(self) -> u64 {
        match self {
            Http::H1Clear | Http::H1Tls => 101,
            _ => 200,
        }
    }

    /// Whether this is HTTP/1.1.
    pub fn is_h1(self) -> bool {
        matches!(self, Http::H1Clear | Http::H1Tls)
    }
}

/// `ws_client.py` for one relay and one way of reaching it.
#[derive(Debug, Clone)]
pub struct WsClient {
    python: PathBuf,
    args: Vec<String>,
    token: Option<String>,
}

impl WsClient {
    /// A client of `relay` over `http`, sending the relay's token (the
    /// relay must have its cleartext listener for the cleartext ways).
    pub fn new(python: &Path, relay: &Relay, http: Http) -> Self {
        let clear = || relay.cleartext_addr.expect("the relay has a cleartext listener").to_string();
        let (version, addr, tls) = match http {
            Http::H1Clear => ("1", clear(), false),
            Http::H1Tls => ("1", relay.addr.to_string(), true),
            Http::H2Clear => ("2", clear(), false),
            Http::H2Tls => ("2", relay.addr.to_string(), true),
            Http::H3 => ("3", relay.addr.to_string(), false),
        };
        let mut args = vec!["--http".to_string(), version.into(), "--relay".into(), addr];
        args.extend(["--ca".to_string(), relay.cert().display().to_string()]);
        if tls {
            args.push("--tls".into());
        }
        Self { python: python.to_path_buf(), args, token: Some(relay.token.clone()) }
    }

    /// Sends no credentials.
    pub fn without_token(mut self) -> Self {
        self.token = None;
        self
    }

    /// Adds an option (`--authority chat.example`, `--subprotocol chat.v1`).
    pub fn arg(mut self, name: &str, value: impl ToString) -> Self {
        self.args.push(name.to_string());
        self.args.push(value.to_string());
        self
    }

    /// Runs `cases` (`CASE` or `CASE@PATH`) and returns each one's result
    /// by the name given; a case that could not run, or a client that
    /// fails or outlives [`CLIENT_LIMIT`], is an error.
    pub fn run(&self, cases: &[&str]) -> Result<HashMap<String, Value>, InteropError> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(client_script()).args(&self.args);
        if let Some(token) = &self.token {
            cmd.args(["--token", token]);
        }
        let out = output_within_limit(cmd.args(cases))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(InteropError::Failed { status: out.status, stderr });
        }
        let mut results = HashMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value =
                serde_json::from_str(line).map_err(|_| InteropError::BadOutput(line.to_string()))?;
            let case =
                v["case"].as_str().ok_or_else(|| InteropError::BadOutput(line.to_string()))?.to_string();
            if v.get("error").is_some() {
                return Err(InteropError::BadOutput(format!("{case} could not run: {v}")));
            }
            results.insert(case, v);
        }
        for case in cases {
            if !results.contains_key(*case) {
                return Err(InteropError::BadOutput(format!("no result for {case}")));
            }
        }
        Ok(results)
    }
}

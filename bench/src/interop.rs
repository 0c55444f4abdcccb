//! Drives the independent aioquic client (`bench/interop/masque_client.py`)
//! for the interop and abuse suites (`bench/tests/interop.rs`, `abuse.rs`).
//!
//! The client runs in the Python venv that `cargo xtask setup` creates
//! (`target/interop-venv`, aioquic pinned in `bench/interop/requirements.txt`)
//! or the one `$RELAY_INTEROP_VENV` names. Each case prints one JSON object
//! on one line; [`Interop::run`] collects them by case name. Every run has
//! a deadline after which the child is killed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::processes::Relay;

/// Why the interop client could not be run.
#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    /// The venv or aioquic in it is missing.
    #[error(
        "the interop venv is missing or broken ({python}: {why}); run `cargo xtask setup` (it creates target/interop-venv with bench/interop/requirements.txt) or set RELAY_INTEROP_VENV"
    )]
    VenvMissing {
        /// The interpreter looked for.
        python: String,
        /// What went wrong.
        why: String,
    },
    /// The client could not be started or talked to.
    #[error("interop client I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client did not finish in time (it was killed).
    #[error("interop client timed out after {0:?}; output so far: {1:?}")]
    Timeout(Duration, Vec<String>),
    /// The client printed a line that is not a JSON object.
    #[error("interop client printed {0:?}")]
    BadOutput(String),
    /// The client exited with a failure.
    #[error("interop client failed ({status}): {stderr}")]
    Failed {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its standard error.
        stderr: String,
    },
}

/// The workspace root (bench's parent directory).
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// The client script.
pub fn script() -> PathBuf {
    workspace().join("bench/interop/masque_client.py")
}

/// The venv's interpreter: `$RELAY_INTEROP_VENV/bin/python3`, else
/// `target/interop-venv/bin/python3` in the workspace.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("RELAY_INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/interop-venv"));
    venv.join("bin/python3")
}

/// Checks that the venv's interpreter imports aioquic, h2 (the TCP
/// front's client) and PySocks (masque-client's SOCKS5 tests).
pub fn find_python() -> Result<PathBuf, InteropError> {
    let python = venv_python();
    let missing = |why: String| InteropError::VenvMissing { python: python.display().to_string(), why };
    if !python.exists() {
        return Err(missing("no such file".into()));
    }
    let out = Command::new(&python)
        .args(["-c", "import aioquic, aioquic.h3.connection, h2.connection, socks"])
        .output()
        .map_err(|e| missing(e.to_string()))?;
    if !out.status.success() {
        return Err(missing(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(python)
}

/// The venv's interpreter for a test that needs it (marked
/// `#[ignore = "needs the interop venv ..."]`, see [`crate::needs`]); a
/// missing or broken venv fails the test with the command that creates it.
#[track_caller]
pub fn python() -> PathBuf {
    match find_python() {
        Ok(python) => python,
        Err(e) => panic!("this test needs the interop venv: {e}"),
    }
}

/// Runs the aioquic client against one relay.
pub struct Interop {
    python: PathBuf,
    relay: String,
    ca: PathBuf,
    token: String,
    echo_port: u16,
    extra: Vec<String>,
}

/// A client started with [`Interop::spawn`] for a case that talks to the
/// driver (prints `{"ready": true}`, then waits for a line on stdin).
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Interop {
    /// A client for `relay`, with `echo_port` as the UDP echo target on
    /// 127.0.0.1.
    pub fn new(python: PathBuf, relay: &Relay, echo_port: u16) -> Self {
        Self {
            python,
            relay: relay.addr.to_string(),
            ca: relay.cert(),
            token: relay.token.clone(),
            echo_port,
            extra: Vec::new(),
        }
    }

    /// Adds a command-line option (`--count 1000`, `--streams 300`).
    pub fn arg(mut self, name: &str, value: impl ToString) -> Self {
        self.extra.push(name.to_string());
        self.extra.push(value.to_string());
        self
    }

    fn command(&self, cases: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(script())
            .args(["--relay", &self.relay, "--ca"])
            .arg(&self.ca)
            .args(["--token", &self.token, "--echo-port", &self.echo_port.to_string()])
            .args(&self.extra)
            .args(cases)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `cases` (each on its own connection) and returns each case's
    /// result object by name; kills the client after `timeout`.
    pub fn run(&self, cases: &[&str], timeout: Duration) -> Result<HashMap<String, Value>, InteropError> {
        let mut running = self.spawn(cases)?;
        let mut results = HashMap::new();
        let deadline = Instant::now() + timeout;
        while results.len() < cases.len() {
            let Some(line) = running.next_line(deadline.saturating_duration_since(Instant::now()))? else {
                break;
            };
            let v = parse(&line)?;
            if let Some(name) = v["case"].as_str() {
                results.insert(name.to_string(), v);
            }
        }
        running.finish(deadline)?;
        Ok(results)
    }

    /// Starts `cases` and returns the running client.
    pub fn spawn(&self, cases: &[&str]) -> Result<Running, InteropError> {
        let mut child = self.command(cases).spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Running { child, stdin, lines, seen: Vec::new() })
    }
}

fn parse(line: &str) -> Result<Value, InteropError> {
    match serde_json::from_str::<Value>(line) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(InteropError::BadOutput(line.to_string())),
    }
}

impl Running {
    /// The next line the client printed, `None` at its end of output;
    /// kills it after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<String>, InteropError> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(Some(line))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(InteropError::Timeout(timeout, self.seen.clone()))
            }
        }
    }

    /// The next JSON object the client printed.
    pub fn next_object(&mut self, timeout: Duration) -> Result<Value, InteropError> {
        match self.next_line(timeout)? {
            Some(line) => parse(&line),
            None => Err(InteropError::BadOutput("<end of output>".into())),
        }
    }

    /// Writes one line to the client's stdin.
    pub fn say(&mut self, line: &str) -> Result<(), InteropError> {
        if let Some(stdin) = self.stdin.as_mut() {
            writeln!(stdin, "{line}")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// Waits for the client to exit (killing it at `deadline`) and fails if
    /// it failed.
    pub fn finish(mut self, deadline: Instant) -> Result<(), InteropError> {
        drop(self.stdin.take());
        loop {
            if let Some(status) = self.child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                return Err(InteropError::Failed { status, stderr });
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(InteropError::Timeout(Duration::ZERO, std::mem::take(&mut self.seen)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The independent HTTP/2 (and HTTP/1.1) client for the TCP front.
pub fn h2_script() -> PathBuf {
    workspace().join("bench/interop/h2_client.py")
}

/// Runs the HTTP/2 client (`bench/interop/h2_client.py`, the Python `h2`
/// package) with `args` (relay, credentials, cases) and returns each case's
/// JSON object by name; a case that could not run, or a client that fails
/// or outlives two minutes, is an error.
pub fn run_h2_client(
    python: &std::path::Path,
    args: &[String],
) -> Result<HashMap<String, Value>, InteropError> {
    let mut child = Command::new(python)
        .arg(h2_script())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let limit = Duration::from_secs(120);
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(InteropError::Timeout(limit, Vec::new()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        return Err(InteropError::Failed { status: out.status, stderr });
    }
    let mut results = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).map_err(|_| InteropError::BadOutput(line.to_string()))?;
        let case = v["case"].as_str().ok_or_else(|| InteropError::BadOutput(line.to_string()))?.to_string();
        if v.get("error").is_some() {
            return Err(InteropError::BadOutput(format!("{case} could not run: {v}")));
        }
        results.insert(case, v);
    }
    Ok(results)
}

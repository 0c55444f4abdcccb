//! Drives the WebTransport tests' independent Python peers
//! (bench/tests/webtransport.rs): the origin `bench/interop/wt_origin.py`
//! and the client `bench/interop/wt_client.py`, both on aioquic's HTTP/3
//! with WebTransport. They run in the interop venv ([`crate::interop`]);
//! every client run has a deadline after which it is killed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::interop::InteropError;
use crate::processes::Relay;
use crate::wsinterop::{PyOrigin, checked_python, interop_dir, output_within_limit};

/// The origin script.
pub fn origin_script() -> PathBuf {
    interop_dir().join("wt_origin.py")
}

/// The client script.
pub fn client_script() -> PathBuf {
    interop_dir().join("wt_client.py")
}

/// The venv's interpreter for a test that needs it, checked to import
/// aioquic's HTTP/3 layer.
#[track_caller]
pub fn python() -> PathBuf {
    checked_python("import aioquic.h3.connection, aioquic.asyncio", "aioquic")
}

/// Starts `wt_origin.py` on 127.0.0.1 with its certificate and key and
/// `args` (`--wt-settings none`).
pub fn start_origin(python: &Path, cert: &Path, key: &Path, args: &[&str]) -> Result<PyOrigin, InteropError> {
    let cert = cert.display().to_string();
    let key = key.display().to_string();
    let mut all = vec!["--listen", "127.0.0.1:0", "--cert", &cert, "--key", &key];
    all.extend_from_slice(args);
    PyOrigin::start_script(python, &origin_script(), &all)
}

/// `wt_client.py` against one relay (HTTP/3).
#[derive(Debug, Clone)]
pub struct WtClient {
    python: PathBuf,
    args: Vec<String>,
}

impl WtClient {
    /// A client of `relay`'s QUIC listener, verifying its certificate and
    /// sending its token.
    pub fn new(python: &Path, relay: &Relay) -> Self {
        let args = vec![
            "--connect".to_string(),
            relay.addr.to_string(),
            "--ca".into(),
            relay.cert().display().to_string(),
            "--server-name".into(),
            "localhost".into(),
            "--token".into(),
            relay.token.clone(),
        ];
        Self { python: python.to_path_buf(), args }
    }

    /// Sends no credentials.
    pub fn without_token(mut self) -> Self {
        if let Some(i) = self.args.iter().position(|a| a == "--token") {
            self.args.drain(i..i + 2);
        }
        self
    }

    /// Adds an option (`--authority app.example`, `--close-code 42`).
    pub fn arg(mut self, name: &str, value: impl ToString) -> Self {
        self.args.push(name.to_string());
        self.args.push(value.to_string());
        self
    }

    /// Runs `case` on `path` and returns its result line, whether the case
    /// passed or not (`ok`, `error`); a client that could not run or
    /// outlives [`crate::wsinterop::CLIENT_LIMIT`] is an error.
    pub fn run(&self, case: &str, path: &str) -> Result<Value, InteropError> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(client_script()).args(&self.args).args(["--case", case, "--path", path]);
        let out = output_within_limit(&mut cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')) else {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(InteropError::Failed { status: out.status, stderr });
        };
        serde_json::from_str(line).map_err(|_| InteropError::BadOutput(line.to_string()))
    }
}

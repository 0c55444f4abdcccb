//! A throwaway `redis-server` for the fleet tests: bound to one address
//! (optionally inside a network namespace of a test topology), no
//! persistence, its own temporary directory, killed when dropped.
//!
//! control/tests/support/redis_server.rs is the same idea for control's
//! in-process fleet tests (on loopback, readiness checked with the redis
//! crate); this one speaks just enough RESP (`PING`) to know the server is
//! up, so relay-bench needs no Redis client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What to install when the server is missing.
pub const INSTALL_HINT: &str =
    "redis-server is needed for the fleet tests: apt-get install redis-server (cargo xtask test runs them)";

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    addr: SocketAddr,
    netns: Option<String>,
    dir: PathBuf,
}

fn binary() -> Result<PathBuf> {
    let default = Path::new("/usr/bin/redis-server");
    if default.exists() {
        return Ok(default.to_path_buf());
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("redis-server")).find(|p| p.exists()))
        .context(INSTALL_HINT)
}

impl RedisServer {
    /// Starts a server on `addr`, inside network namespace `netns` if
    /// given (the caller must be able to reach `addr` from where it runs,
    /// to see the server come up). Restarting one where it was is calling
    /// this again with the same address.
    pub fn start(addr: SocketAddr, netns: Option<&str>) -> Result<Self> {
        // Its own directory each time: a server restarted on the address of
        // one not dropped yet must not share (and lose) it.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("relay-bench-redis-{}-{n}-{addr}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the redis directory")?;
        let mut cmd = Command::new(binary()?);
        cmd.args(["--port", &addr.port().to_string(), "--bind", &addr.ip().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning", "--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let _handle = netns.map(|ns| crate::netns::spawn_in(&mut cmd, ns)).transpose()?;
        let child = cmd.spawn().with_context(|| format!("starting redis-server; {INSTALL_HINT}"))?;
        let server = Self { child: Some(child), addr, netns: netns.map(str::to_string), dir };
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    /// Whether it answers `PING`.
    pub fn answers(&self) -> bool {
        ping(self.addr).is_ok()
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            match ping(self.addr) {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() > timeout => {
                    bail!("redis-server on {} did not come up within {timeout:?}: {e}", self.addr)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL (for `fleet.redis`).
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Kills it now (SIGKILL, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `PING` (RESP inline command) and expects `+PONG`.
fn ping(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    if &buf != b"+PONG\r\n" {
        bail!("unexpected answer to PING: {:?}", String::from_utf8_lossy(&buf));
    }
    Ok(())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! What the tests marked `#[ignore = "needs ...: run by `cargo xtask test`"]`
//! need from the machine: root, /dev/net/tun, programs (ip, ping, python3,
//! curl, turnserver, nft, redis-server) and the interop venv.
//!
//! A plain `cargo test` lists those tests as ignored. `cargo xtask test`
//! checks the machine for each need (its own copy of these checks, in
//! xtask) and runs, with `--ignored`, the tests whose needs are met; the
//! others are counted as skipped, and under CI a missing need is an error.
//! A test run on a machine that lacks what it needs fails at once, naming
//! what is missing and how to get it: it never passes without having
//! tested anything.

use std::path::Path;

use crate::interop;

/// Something an ignored test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Root (network namespaces, TUN devices, other users).
    Root,
    /// The TUN device (`/dev/net/tun`).
    Tun,
    /// `ip` (iproute2): network namespaces and veth links.
    Ip,
    /// `ping` (iputils-ping).
    Ping,
    /// A system `python3` (scripts run inside network namespaces).
    Python3,
    /// `curl` (Debian's, built with nghttp2).
    Curl,
    /// coturn's `turnserver` (a STUN server).
    Turnserver,
    /// `nft` (nftables): the fleet test's load balancer.
    Nft,
    /// `redis-server`: the fleet's store.
    RedisServer,
    /// The interop venv with aioquic and h2 ([`interop::find_python`]).
    InteropVenv,
}

impl Need {
    /// What is missing and how to get it, or `None` when present.
    pub fn missing(self) -> Option<String> {
        match self {
            Need::Root => (!crate::processes::running_as_root())
                .then(|| "root: run the test as root (CI does), e.g. `sudo -E cargo xtask test`".to_string()),
            Need::Tun => (!Path::new("/dev/net/tun").exists())
                .then(|| "/dev/net/tun is missing: `modprobe tun` (as root)".to_string()),
            Need::Ip => missing_program("ip", "iproute2"),
            Need::Ping => missing_program("ping", "iputils-ping"),
            Need::Python3 => missing_program("python3", "python3"),
            Need::Curl => missing_program("curl", "curl"),
            Need::Turnserver => missing_program("turnserver", "coturn"),
            Need::Nft => missing_program("nft", "nftables"),
            Need::RedisServer => missing_program("redis-server", "redis-server"),
            Need::InteropVenv => interop::find_python().err().map(|e| e.to_string()),
        }
    }
}

/// `None` if `name` is on PATH, else how to install `package`.
fn missing_program(name: &str, package: &str) -> Option<String> {
    (!on_path(name)).then(|| {
        format!("{name} is not on PATH: install it with `cargo xtask setup` (as root) or `apt-get install {package}`")
    })
}

/// Whether an executable file `name` is in a directory of `$PATH`.
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Fails the calling test, naming every missing need and how to get it,
/// unless the machine has all of `needs`.
#[track_caller]
pub fn require(needs: &[Need]) {
    fail_if_missing(needs.iter().filter_map(|n| n.missing()).collect());
}

#[track_caller]
fn fail_if_missing(missing: Vec<String>) {
    assert!(
        missing.is_empty(),
        "this test needs what the machine lacks (`cargo xtask test` runs it only where it can):\n  {}",
        missing.join("\n  ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        // sh is on every PATH a test runs with.
        assert_eq!(missing_program("sh", "dash"), None);
        let m = missing_program("no-such-program-anywhere", "some-package").expect("missing");
        assert!(m.contains("no-such-program-anywhere is not on PATH"), "{m}");
        assert!(m.contains("apt-get install some-package") && m.contains("cargo xtask setup"), "{m}");
    }

    #[test]
    fn nothing_missing_passes() {
        fail_if_missing(Vec::new());
    }

    #[test]
    #[should_panic(
        expected = "needs what the machine lacks (`cargo xtask test` runs it only where it can):\n  curl is not on PATH"
    )]
    fn a_missing_need_fails_the_test_naming_it() {
        fail_if_missing(vec![
            missing_program("curl-that-is-not-there", "curl").unwrap().replace("-that-is-not-there", ""),
        ]);
    }
}

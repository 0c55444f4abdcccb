//! The network a connect-ip test or benchmark runs in: a client namespace
//! and a target namespace, each joined to the host (where the relay and its
//! TUN devices live) by a veth link, IPv4 and IPv6, with forwarding on.
//!
//! ```text
//!  client ns                host (relay)                   target ns
//!  10.250.C.2 ---veth--- 10.250.C.1   10.250.T.1 ---veth--- 10.250.T.2
//!                                     fd00:250:T::1          fd00:250:T::2
//!                                                            10.252.T.2 (direct path)
//! ```
//!
//! The target's default routes point at the host, so replies to the
//! relay's pool addresses come back to its TUN devices. `10.252.T.2` is a
//! second target address the client reaches *without* the tunnel (routed
//! through the host), for direct-path comparisons. Everything is removed
//! and the sysctls restored on drop. Needs root.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::netns::TargetNetns;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A sysctl set for the topology's life.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn set(key: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let old = std::fs::read_to_string(&path).with_context(|| format!("reading {key}"))?;
        std::fs::write(&path, value).with_context(|| format!("setting {key}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.old.trim());
    }
}

/// The client and target namespaces.
pub struct IpTopology {
    /// The target namespace (servers run here).
    pub target: TargetNetns,
    /// The client namespace (the connect-ip client and its TUN device).
    pub client: TargetNetns,
    /// The target's IPv6 address.
    pub target_v6: IpAddr,
    /// A target address reached without the tunnel.
    pub direct_target: IpAddr,
    /// The target subnets (IPv4, IPv6), as the relay's allow list and the
    /// client's routes name them.
    pub target_prefixes: [String; 2],
    _sysctls: Vec<Sysctl>,
    /// Held for the topology's life (dropped last): topologies in other
    /// processes wait, so one's sysctl restore cannot switch forwarding
    /// off under another.
    _lock: HostLock,
}

/// An exclusive lock on the host's forwarding settings, across processes.
struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    fn take() -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/relay-test-ipnet.lock")
            .context("opening /run/relay-test-ipnet.lock")?;
        // SAFETY: flock on a descriptor we own; it blocks until the other
        // holder closes its descriptor (the lock dies with the process).
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        if rc != 0 {
            bail!("locking the host's forwarding settings: {}", std::io::Error::last_os_error());
        }
        Ok(Self { _file: f })
    }
}

impl IpTopology {
    /// Builds the network; `tag` keeps names apart between concurrent runs
    /// (0..=40).
    pub fn create(tag: u32) -> Result<Self> {
        let lock = HostLock::take()?;
        let nt = 160 + (tag % 40) as u8 * 2;
        let nc = nt + 1;
        let pid = std::process::id();
        let target = TargetNetns::create(&format!("rip-t{pid}"), nt)?;
        let client = TargetNetns::create(&format!("rip-c{pid}"), nc)?;
        let host_if = format!("rbh{nt}");
        let target_if = format!("rbt{nt}");
        let target_v6: IpAddr = format!("fd00:250:{nt}::2").parse()?;
        let direct_target: IpAddr = format!("10.252.{nt}.2").parse()?;
        ip(&["-6", "addr", "add", &format!("fd00:250:{nt}::1/64"), "dev", &host_if, "nodad"])?;
        ip(&[
            "-n",
            &target.name,
            "-6",
            "addr",
            "add",
            &format!("{target_v6}/64"),
            "dev",
            &target_if,
            "nodad",
        ])?;
        ip(&["-n", &target.name, "addr", "add", &format!("{direct_target}/32"), "dev", &target_if])?;
        ip(&["-n", &target.name, "route", "add", "default", "via", &target.host_addr.to_string()])?;
        ip(&["-n", &target.name, "-6", "route", "add", "default", "via", &format!("fd00:250:{nt}::1")])?;
        // The direct path: client ns -> host -> target ns, no tunnel.
        ip(&["route", "replace", &format!("{direct_target}/32"), "via", &target.target_addr.to_string()])?;
        ip(&[
            "-n",
            &client.name,
            "route",
            "add",
            &format!("{direct_target}/32"),
            "via",
            &client.host_addr.to_string(),
        ])?;
        let sysctls =
            vec![Sysctl::set("net.ipv4.ip_forward", "1")?, Sysctl::set("net.ipv6.conf.all.forwarding", "1")?];
        Ok(Self {
            target_prefixes: [format!("10.250.{nt}.0/30"), format!("fd00:250:{nt}::/64")],
            target,
            client,
            target_v6,
            direct_target,
            _sysctls: sysctls,
            _lock: lock,
        })
    }
}

impl Drop for IpTopology {
    fn drop(&mut self) {
        let _ = ip(&["route", "del", &format!("{}/32", self.direct_target)]);
    }
}

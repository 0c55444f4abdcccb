//! A target network namespace for benchmarks: `ip netns` plus a veth pair,
//! so the target lives behind a real (virtual) link instead of loopback.
//!
//! The namespace and its link are created by [`TargetNetns::create`] and
//! deleted on drop. Targets enter it per thread with `setns`, so the
//! benchmark process itself stays in the host namespace.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A namespace with one veth link to the host.
pub struct TargetNetns {
    /// Namespace name (under /run/netns).
    pub name: String,
    /// Host-side address of the link.
    pub host_addr: IpAddr,
    /// Address inside the namespace (where targets bind).
    pub target_addr: IpAddr,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl TargetNetns {
    /// Creates namespace `name` with a /30 link: host side `10.250.<n>.1`,
    /// target side `10.250.<n>.2`. Needs root (CAP_NET_ADMIN).
    pub fn create(name: &str, n: u8) -> Result<Self> {
        let host_if = format!("rbh{n}");
        let ns_if = format!("rbt{n}");
        // Leftovers from an interrupted run.
        let _ = ip(&["netns", "del", name]);
        let _ = ip(&["link", "del", &host_if]);
        ip(&["netns", "add", name])?;
        let me = Self {
            name: name.to_string(),
            host_addr: format!("10.250.{n}.1").parse()?,
            target_addr: format!("10.250.{n}.2").parse()?,
            host_if: host_if.clone(),
        };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", name])?;
        ip(&["addr", "add", &format!("{}/30", me.host_addr), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", name, "addr", "add", &format!("{}/30", me.target_addr), "dev", &ns_if])?;
        ip(&["-n", name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// Gives the host side of the link a second address, `addr`/32, which
    /// the namespace reaches over the link (a host route). The kernel keeps
    /// choosing the link's first address as the source towards the
    /// namespace; a socket bound to `addr` sends from `addr`.
    pub fn add_host_address(&self, addr: IpAddr) -> Result<()> {
        let (host, route) =
            if addr.is_ipv4() { (format!("{addr}/32"), "route") } else { (format!("{addr}/128"), "-6") };
        ip(&["addr", "add", &host, "dev", &self.host_if])?;
        let ns_if = self.host_if.replacen("rbh", "rbt", 1);
        if route == "route" {
            ip(&["-n", &self.name, "route", "add", &host, "dev", &ns_if])
        } else {
            ip(&["-n", &self.name, "-6", "route", "add", &host, "dev", &ns_if])
        }
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(name: &str) -> std::io::Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{name}"))?;
        // SAFETY: setns on a descriptor we hold open; it only changes the
        // calling thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
}

/// Makes `cmd` start in network namespace `name` (`ip netns` name): the
/// child enters it with `setns` between fork and exec, so the parent stays
/// where it is. Returns the namespace's handle, which must stay open until
/// `cmd` is spawned (it is close-on-exec: the child does not keep it).
pub fn spawn_in(cmd: &mut Command, name: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let handle = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("network namespace {name}"))?;
    let fd = handle.as_raw_fd();
    // SAFETY: the hook runs in the forked child before exec and only makes
    // the setns system call (async-signal-safe) on a descriptor the parent
    // keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(handle)
}

impl Drop for TargetNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

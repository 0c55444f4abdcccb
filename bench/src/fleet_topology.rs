//! A multi-host test topology for fleet mode: relay hosts, a store and a
//! client, each in its own network namespace, behind a Linux netfilter
//! load balancer holding a virtual IP (VIP).
//!
//! ```text
//!  client ns              lb ns (router + balancer)             host/redis ns
//!  10.252.0.2 ── eth0 ═ eth1 10.252.0.1, VIP 10.252.0.10
//!                             br0 10.251.0.1 ═ vh0 ── eth0 10.251.0.11 (host 0)
//!                                            ═ vh1 ── eth0 10.251.0.12 (host 1)
//!                                            ═ vh2 ── eth0 10.251.0.13 (host 2)
//!                                            ═ vrd ── eth0 10.251.0.5  (redis)
//! ```
//!
//! The balancer is nftables in the lb namespace: UDP and TCP to the VIP's
//! relay port are DNATed to a host chosen by `jhash ip saddr . sport mod N`
//! (an L4 balancer hashing the client's address and port), which keeps the
//! port. Replies flow back through it because every host and the store
//! route the client subnet via the lb namespace (10.251.0.1): conntrack
//! there undoes the DNAT, so the client sees the VIP answer. This is
//! chosen over SNAT on the balancer because the relays then see the
//! clients' real addresses (as with a direct-server-return or routed
//! balancer), which the tests use to find the host serving a connection
//! (`relayctl conns`). The client reaches the hosts' own addresses too
//! (routed by the lb namespace, not balanced): tests use that to talk to
//! one host directly.
//!
//! Every name is unique to the process (`rfl<pid>-...`), nothing is created
//! in the caller's namespace, and dropping the topology deletes the
//! balancer's table and every namespace (their links go with them); a
//! topology left by a killed process is removed by the next one.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

/// The nftables table of the balancer (in the lb namespace).
const LB_TABLE: &str = "relay_fleet_lb";
/// Backend network: hosts, store, the balancer's inside address.
const BACKEND_NET: &str = "10.251.0";
/// Client network: the client, the balancer's outside address and the VIP.
const CLIENT_NET: &str = "10.252.0";

/// One relay host's place in the topology.
#[derive(Debug, Clone)]
pub struct HostNet {
    /// Its network namespace.
    pub netns: String,
    /// Its address on the backend network.
    pub addr: IpAddr,
}

/// The namespaces, links, routes and balancer; removed on drop.
pub struct FleetTopology {
    /// The relay hosts.
    pub hosts: Vec<HostNet>,
    /// The balancer's (and router's) namespace.
    pub lb_netns: String,
    /// The client's namespace.
    pub client_netns: String,
    /// The store's namespace.
    pub redis_netns: String,
    /// The virtual IP clients connect to.
    pub vip: IpAddr,
    /// The client's address.
    pub client_addr: IpAddr,
    /// The store's address.
    pub redis_addr: IpAddr,
    /// Namespaces made so far (deleted on drop, last first).
    made: Vec<String>,
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<()> {
    run("ip", args, None)
}

/// Runs `program ARGS` (with `stdin` fed to it), failing with its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `program ARGS` inside namespace `ns` (`ip netns exec`).
fn in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all, stdin)
}

/// Deletes the namespaces of earlier runs whose process is gone (a test
/// killed before its drop ran).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("rfl").and_then(|r| r.split('-').next()) else { continue };
        let alive = pid.parse::<u32>().is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl FleetTopology {
    /// Builds the topology with `hosts` relay hosts (1..=9) and the
    /// balancer spreading over all of them on `port`. Needs root, `ip` and
    /// `nft`.
    pub fn create(hosts: usize, port: u16) -> Result<Self> {
        if !(1..=9).contains(&hosts) {
            bail!("1 to 9 hosts, not {hosts}");
        }
        remove_stale_namespaces();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("rfl{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut t = Self {
            hosts: Vec::new(),
            lb_netns: format!("{prefix}-lb"),
            client_netns: format!("{prefix}-client"),
            redis_netns: format!("{prefix}-redis"),
            vip: format!("{CLIENT_NET}.10").parse()?,
            client_addr: format!("{CLIENT_NET}.2").parse()?,
            redis_addr: format!("{BACKEND_NET}.5").parse()?,
            made: Vec::new(),
        };
        t.build_router()?;
        t.build_client()?;
        let redis_ns = t.redis_netns.clone();
        t.attach_backend(&redis_ns, "vrd", t.redis_addr)?;
        for i in 0..hosts {
            let host = HostNet {
                netns: format!("{prefix}-h{i}"),
                addr: format!("{BACKEND_NET}.{}", 11 + i).parse()?,
            };
            t.attach_backend(&host.netns, &format!("vh{i}"), host.addr)?;
            t.hosts.push(host);
        }
        t.balance_over(&(0..hosts).collect::<Vec<_>>(), port)?;
        Ok(t)
    }

    /// Adds namespace `name` (loopback up), remembered for the drop.
    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// The lb namespace: the backend bridge, IP forwarding.
    fn build_router(&mut self) -> Result<()> {
        let lb = self.lb_netns.clone();
        self.add_netns(&lb)?;
        ip(&["-n", &lb, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lb, "addr", "add", &format!("{BACKEND_NET}.1/24"), "dev", "br0"])?;
        ip(&["-n", &lb, "link", "set", "br0", "up"])?;
        in_ns(&lb, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"], None)
    }

    /// The client namespace, linked to the lb namespace, which holds the
    /// VIP on that link and is the client's default route.
    fn build_client(&mut self) -> Result<()> {
        let (lb, client) = (self.lb_netns.clone(), self.client_netns.clone());
        self.add_netns(&client)?;
        ip(&["link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "eth1", "netns", &lb])?;
        ip(&["-n", &lb, "addr", "add", &format!("{CLIENT_NET}.1/24"), "dev", "eth1"])?;
        ip(&["-n", &lb, "addr", "add", &format!("{}/32", self.vip), "dev", "eth1"])?;
        ip(&["-n", &lb, "link", "set", "eth1", "up"])?;
        ip(&["-n", &client, "addr", "add", &format!("{}/24", self.client_addr), "dev", "eth0"])?;
        ip(&["-n", &client, "link", "set", "eth0", "up"])?;
        ip(&["-n", &client, "route", "add", "default", "via", &format!("{CLIENT_NET}.1")])
    }

    /// A namespace on the backend bridge (port `bridge_port` in the lb
    /// namespace) with `addr`, routing the client network via the lb
    /// namespace so replies pass the balancer.
    fn attach_backend(&mut self, ns: &str, bridge_port: &str, addr: IpAddr) -> Result<()> {
        let lb = self.lb_netns.clone();
        self.add_netns(ns)?;
        ip(&["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", bridge_port, "netns", &lb])?;
        ip(&["-n", &lb, "link", "set", bridge_port, "master", "br0"])?;
        ip(&["-n", &lb, "link", "set", bridge_port, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", &format!("{CLIENT_NET}.0/24"), "via", &format!("{BACKEND_NET}.1")])
    }

    /// (Re)writes the balancer, atomically: UDP and TCP to the VIP's `port`
    /// go to `hosts` (indexes into [`Self::hosts`]) by
    /// `jhash ip saddr . sport mod len`. Connections already tracked keep
    /// their host (conntrack); new ones hash over the new list. This is
    /// what an operator does to take a host out of rotation.
    pub fn balance_over(&self, hosts: &[usize], port: u16) -> Result<()> {
        let script = self.nft_script(hosts, port)?;
        in_ns(&self.lb_netns, "nft", &["-f", "-"], Some(&script))
    }

    /// The nftables script of [`Self::balance_over`].
    fn nft_script(&self, hosts: &[usize], port: u16) -> Result<String> {
        if hosts.is_empty() {
            bail!("the balancer needs at least one host");
        }
        let mut map = Vec::new();
        for (slot, &h) in hosts.iter().enumerate() {
            let host = self.hosts.get(h).with_context(|| format!("no host {h}"))?;
            map.push(format!("{slot} : {}", host.addr));
        }
        let map = map.join(", ");
        let n = hosts.len();
        let vip = self.vip;
        // Declaring the table first makes the flush valid on the first run.
        Ok(format!(
            "table ip {LB_TABLE}\n\
             flush table ip {LB_TABLE}\n\
             table ip {LB_TABLE} {{\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tip daddr {vip} udp dport {port} dnat to jhash ip saddr . udp sport mod {n} map {{ {map} }}\n\
             \t\tip daddr {vip} tcp dport {port} dnat to jhash ip saddr . tcp sport mod {n} map {{ {map} }}\n\
             \t}}\n\
             }}\n"
        ))
    }

    /// Moves the calling thread into the client namespace: its sockets
    /// (clients, echo targets) are the client's from then on.
    pub fn enter_client(&self) -> std::io::Result<()> {
        crate::netns::TargetNetns::enter(&self.client_netns)
    }
}

impl Drop for FleetTopology {
    fn drop(&mut self) {
        let _ = in_ns(&self.lb_netns, "nft", &["delete", "table", "ip", LB_TABLE], None);
        for ns in self.made.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

//! connect-ip throughput: TCP bulk transfers between a client namespace and
//! a target namespace, through a connect-ip tunnel (client TUN → QUIC →
//! relay → relay TUN → kernel routing), both ways (upload: the client
//! sends; download: a target sends to the client's tunnel address), once
//! with the relay's TUN offloads on (its default) and once with them off,
//! and on the direct path (kernel routing through the same host and links),
//! in one run.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::client::{Client, ClientConfig};
use crate::ipnet::IpTopology;
use crate::iptunnel::{self, ClientTun, DEFAULT_IP_TEMPLATE, PumpStats};
use crate::netns::TargetNetns;
use crate::processes::{Relay, RelayOptions};

/// One measured path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathResult {
    /// Bytes the receiver got.
    pub bytes: u64,
    /// Seconds from connect to the receiver's end of stream.
    pub seconds: f64,
}

impl PathResult {
    /// Megabits per second.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e6
    }
}

/// The benchmark's results.
#[derive(Debug, Clone, Copy)]
pub struct IpBenchResult {
    /// Through the tunnel, relay TUN offloads on.
    pub offload: TunnelResult,
    /// Through the tunnel, relay TUN offloads off.
    pub plain: TunnelResult,
    /// Direct (no tunnel).
    pub direct: PathResult,
}

/// What the relay's dataplane spent on one tunnel path: its CPU time (all
/// threads, the process CPU clock) and its workers' I/O system calls,
/// between the path's start and end.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RelayCost {
    /// Dataplane CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// The workers' I/O system calls (`io_syscalls`).
    pub syscalls: u64,
}

impl RelayCost {
    /// Milliseconds of relay CPU per MB (10^6 bytes) the path moved.
    pub fn cpu_ms_per_mb(&self, p: &PathResult) -> f64 {
        if p.bytes == 0 { 0.0 } else { self.cpu_ns as f64 / 1e6 / (p.bytes as f64 / 1e6) }
    }

    /// Relay system calls per MB the path moved.
    pub fn syscalls_per_mb(&self, p: &PathResult) -> f64 {
        if p.bytes == 0 { 0.0 } else { self.syscalls as f64 / (p.bytes as f64 / 1e6) }
    }
}

/// One tunnel path: what it moved and what the relay spent on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TunnelPath {
    /// What the receiver got.
    pub result: PathResult,
    /// The relay's cost meanwhile.
    pub cost: RelayCost,
}

/// The tunnel paths measured against one relay.
#[derive(Debug, Clone, Copy)]
pub struct TunnelResult {
    /// TCP over IPv4, client to target.
    pub v4_up: TunnelPath,
    /// TCP over IPv6, client to target.
    pub v6_up: TunnelPath,
    /// TCP over IPv4, target to client.
    pub v4_down: TunnelPath,
    /// TCP over IPv6, target to client.
    pub v6_down: TunnelPath,
    /// Packets the client moved.
    pub pump: PumpStats,
    /// The relay's coalesced TUN writes (GSO packets) and the packets they
    /// carried.
    pub gso_writes: u64,
    /// Packets the relay wrote to its TUN devices.
    pub tun_packets_out: u64,
    /// Of which inside coalesced writes.
    pub coalesced_packets: u64,
    /// Reads from the relay's TUN devices that carried a GSO packet.
    pub gso_reads: u64,
    /// Packets the relay read from its TUN devices (GSO packets counted
    /// by the packets they stand for).
    pub tun_packets_in: u64,
}

impl TunnelResult {
    /// Every path with its name.
    pub fn paths(&self) -> [(&'static str, &TunnelPath); 4] {
        [
            ("TCP over IPv4, client to target", &self.v4_up),
            ("TCP over IPv6, client to target", &self.v6_up),
            ("TCP over IPv4, target to client", &self.v4_down),
            ("TCP over IPv6, target to client", &self.v6_down),
        ]
    }
}

/// A sink in namespace `ns`: accepts one connection, reads to the end,
/// reports what it got and how long it took.
fn sink(ns: &str, addr: SocketAddr) -> Result<std::thread::JoinHandle<Result<PathResult>>> {
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || -> Result<PathResult> {
        TargetNetns::enter(&ns).with_context(|| format!("entering namespace {ns}"))?;
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let _ = ready_tx.send(());
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let started = Instant::now();
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => break,
                n => bytes += n as u64,
            }
        }
        Ok(PathResult { bytes, seconds: started.elapsed().as_secs_f64() })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow!("the sink did not start"))?;
    Ok(handle)
}

/// Sends for `duration` from namespace `ns` to `addr`.
fn send(ns: &str, addr: SocketAddr, duration: Duration) -> Result<()> {
    let ns = ns.to_string();
    std::thread::spawn(move || -> Result<()> {
        TargetNetns::enter(&ns)?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            s.write_all(&chunk)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("sender panicked"))?
}

/// Sends for `duration` from namespace `from` to a sink on `addr` in
/// namespace `to`.
fn measure(from: &str, to: &str, addr: SocketAddr, duration: Duration) -> Result<PathResult> {
    let receiver = sink(to, addr)?;
    send(from, addr, duration)?;
    receiver.join().map_err(|_| anyhow!("sink panicked"))?
}

/// Runs the benchmark with the relay binaries in `bin_dir`, `workers`
/// workers, each path for `duration`.
pub fn run(bin_dir: &Path, workers: u32, duration: Duration) -> Result<IpBenchResult> {
    let topo = IpTopology::create(std::process::id() % 40)?;
    let offload = through_tunnel(&topo, bin_dir, workers, duration, true)?;
    let plain = through_tunnel(&topo, bin_dir, workers, duration, false)?;
    let direct =
        measure(&topo.client.name, &topo.target.name, SocketAddr::new(topo.direct_target, 5303), duration)?;
    Ok(IpBenchResult { offload, plain, direct })
}

/// Starts a relay (TUN offloads on or off) and a connect-ip client, and
/// measures TCP over IPv4 and IPv6 through the tunnel.
fn through_tunnel(
    topo: &IpTopology,
    bin_dir: &Path,
    workers: u32,
    duration: Duration,
    offload: bool,
) -> Result<TunnelResult> {
    let dir = std::env::temp_dir().join(format!("relay-ip-bench-{}-{offload}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Each relay its own device names: the previous one's may still be
    // going away.
    let prefix = if offload { "mqbgso" } else { "mqbplain" };
    let opts = RelayOptions {
        workers,
        listen_ip: topo.client.host_addr,
        allow: topo.target_prefixes.to_vec(),
        bin_dir: Some(bin_dir.to_path_buf()),
        extra_config: format!(
            "[protocols]\nconnect_ip = true\n\n[connect_ip]\nipv4_pool = \"10.89.250.0/24\"\nipv6_pool = \"fd89:250::/120\"\ninterface_prefix = \"{prefix}\"\noffload = {offload}\n"
        ),
        ..Default::default()
    };
    let relay = Relay::start(&dir, &opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let pump = {
        let stop = stop.clone();
        let ns = topo.client.name.clone();
        let (relay_addr, cert, token) = (relay.addr, relay.cert(), relay.token.clone());
        let only = topo.target_prefixes.iter().map(|p| p.parse()).collect::<Result<Vec<_>, _>>()?;
        std::thread::spawn(move || -> Result<PumpStats> {
            TargetNetns::enter(&ns)?;
            let mut cfg = ClientConfig::new(relay_addr);
            cfg.ca = Some(cert);
            cfg.token = Some(token);
            let mut c = Client::connect(cfg, Duration::from_secs(10))?;
            c.wait_settings(Duration::from_secs(10))?;
            let tunnel = iptunnel::open(&mut c, DEFAULT_IP_TEMPLATE, "*", "*", Duration::from_secs(10))?;
            let tun = ClientTun::create("mqcb0", 1280, &tunnel.config, &only, relay_addr.ip())?;
            let _ = ready_tx.send(tunnel.config.addresses.iter().map(|p| p.addr).collect::<Vec<IpAddr>>());
            iptunnel::pump(&mut c, &tunnel, &tun, &stop, None)
        })
    };
    let assigned = ready_rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| anyhow!("the connect-ip client did not come up"))?;
    let client_v4 = assigned.iter().copied().find(IpAddr::is_ipv4).context("no IPv4 address assigned")?;
    let client_v6 = assigned.iter().copied().find(IpAddr::is_ipv6).context("no IPv6 address assigned")?;
    let (client_ns, target_ns) = (topo.client.name.as_str(), topo.target.name.as_str());
    let path = |from: &str, to: &str, addr: IpAddr, port: u16| {
        measured_with_cost(&relay, || measure(from, to, SocketAddr::new(addr, port), duration))
    };
    let v4_up = path(client_ns, target_ns, topo.target.target_addr, 5301)?;
    let v6_up = path(client_ns, target_ns, topo.target_v6, 5302)?;
    let v4_down = path(target_ns, client_ns, client_v4, 5304)?;
    let v6_down = path(target_ns, client_ns, client_v6, 5305)?;
    stop.store(true, Ordering::Relaxed);
    let pump = pump.join().map_err(|_| anyhow!("pump panicked"))??;
    let counter = |name: &str| relay.counter(name).unwrap_or(0);
    let result = TunnelResult {
        v4_up,
        v6_up,
        v4_down,
        v6_down,
        pump,
        gso_writes: counter("tun_gso_writes"),
        tun_packets_out: counter("tun_packets_out"),
        coalesced_packets: counter("tun_coalesced_packets"),
        gso_reads: counter("tun_gso_reads"),
        tun_packets_in: counter("tun_packets_in"),
    };
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

/// Runs `path` and reads what the relay spent meanwhile.
fn measured_with_cost(relay: &Relay, path: impl FnOnce() -> Result<PathResult>) -> Result<TunnelPath> {
    let pid = relay.dataplane_pid().context("no dataplane")?;
    let sample =
        || -> Result<(u64, u64)> { Ok((crate::stats::process_cpu_ns(pid)?, relay.counter("io_syscalls")?)) };
    let (cpu0, sys0) = sample()?;
    let result = path()?;
    let (cpu1, sys1) = sample()?;
    Ok(TunnelPath {
        result,
        cost: RelayCost { cpu_ns: cpu1.saturating_sub(cpu0), syscalls: sys1.saturating_sub(sys0) },
    })
}

/// The results as a markdown table.
pub fn table(r: &IpBenchResult) -> String {
    let row = |name: &str, p: &PathResult, cost: Option<&RelayCost>| {
        let (cpu, syscalls) = match cost {
            Some(c) => (format!("{:.2}", c.cpu_ms_per_mb(p)), format!("{:.0}", c.syscalls_per_mb(p))),
            None => ("-".into(), "-".into()),
        };
        format!(
            "| {name} | {:.0} | {:.1} | {:.2} | {cpu} | {syscalls} |\n",
            p.mbps(),
            p.bytes as f64 / 1e6,
            p.mbps() / r.direct.mbps()
        )
    };
    let mut out = String::from(
        "| path | Mbit/s | MB moved | vs direct | relay CPU ms/MB | relay syscalls/MB |\n|---|---|---|---|---|---|\n",
    );
    out.push_str(&row("direct (kernel routing, no tunnel)", &r.direct, None));
    for (tunnel, offloads) in [(&r.offload, "TUN offloads"), (&r.plain, "no offloads")] {
        for (name, p) in tunnel.paths() {
            out.push_str(&row(&format!("connect-ip, {name}, {offloads}"), &p.result, Some(&p.cost)));
        }
    }
    let share = |t: &TunnelResult| {
        let per_write =
            if t.gso_writes == 0 { 0.0 } else { t.coalesced_packets as f64 / t.gso_writes as f64 };
        format!(
            "{} of {} packets in {} coalesced writes ({per_write:.1} per write)",
            t.coalesced_packets, t.tun_packets_out, t.gso_writes
        )
    };
    out.push_str(&format!(
        "\nRelay TUN writes with offloads: {}; without: {}.\n",
        share(&r.offload),
        share(&r.plain)
    ));
    let reads = |t: &TunnelResult| format!("{} packets in {} GSO reads", t.tun_packets_in, t.gso_reads);
    out.push_str(&format!(
        "Relay TUN reads with offloads: {}; without: {}.\n",
        reads(&r.offload),
        reads(&r.plain)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_cost_is_per_megabyte_moved() {
        let p = PathResult { bytes: 2_000_000, seconds: 1.0 };
        let c = RelayCost { cpu_ns: 30_000_000, syscalls: 500 };
        assert_eq!(c.cpu_ms_per_mb(&p), 15.0);
        assert_eq!(c.syscalls_per_mb(&p), 250.0);
        let nothing = PathResult { bytes: 0, seconds: 1.0 };
        assert_eq!((c.cpu_ms_per_mb(&nothing), c.syscalls_per_mb(&nothing)), (0.0, 0.0));
    }
}

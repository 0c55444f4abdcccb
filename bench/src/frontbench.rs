//! `relay-bench front-bench`: the TCP front next to HTTP/3 in one run, on
//! one relay. connect-udp echo loads (the same windowed, byte-checked load)
//! over HTTP/3 datagrams and over HTTP/2 capsules on TLS, and TCP CONNECT
//! echo transfers over HTTP/3, HTTP/2 and HTTP/1.1 next to the direct path.
//! It prints a markdown report (docs/BENCHMARKS.md keeps the latest).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{Answer, Client, ClientConfig};
use crate::echo::EchoServer;
use crate::h2client;
use crate::load::{EchoLoad, EchoReport, run_echo};
use crate::processes::{Relay, RelayOptions};
use crate::stats::{clock_ticks_per_sec, sample_process};
use crate::tcp_echo::TcpEcho;

/// What to run.
#[derive(Debug, Clone)]
pub struct FrontBench {
    /// Directory of the relay binaries.
    pub bin_dir: Option<PathBuf>,
    /// Relay workers.
    pub workers: u32,
    /// Tunnels per echo load.
    pub flows: usize,
    /// Datagrams per tunnel.
    pub count: u64,
    /// Datagrams in flight per tunnel.
    pub window: u64,
    /// Bytes per TCP CONNECT transfer.
    pub tcp_bytes: usize,
    /// Transfers per path (the median is reported).
    pub repeats: usize,
    /// Which parts to run.
    pub only: Only,
}

/// The parts of the front bench to run (`--only`), to iterate on one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Only {
    /// The connect-udp echo loads and the TCP CONNECT transfers.
    #[default]
    All,
    /// The connect-udp echo loads.
    Udp,
    /// The TCP CONNECT transfers (every path, for the ratios).
    Connect,
    /// The direct path and the HTTP/3 CONNECT transfer (for profiling).
    H3Connect,
}

fn h3_client(relay: &Relay) -> Result<Client> {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    let mut c = Client::connect(cfg, Duration::from_secs(5))?;
    c.wait_settings(Duration::from_secs(5))?;
    Ok(c)
}

fn h3_udp_echo(relay: &Relay, target: SocketAddr, flows: usize, load: &EchoLoad) -> Result<EchoReport> {
    let mut c = h3_client(relay)?;
    let mut streams = Vec::new();
    for _ in 0..flows {
        streams.push(c.open_udp(&target.ip().to_string(), target.port(), Duration::from_secs(5))?);
    }
    let r = run_echo(&mut c, &streams, load)?;
    c.close();
    Ok(r)
}

fn h3_tcp_echo(relay: &Relay, target: SocketAddr, bytes: usize) -> Result<Duration> {
    let mut c = h3_client(relay)?;
    let sid = c.request_tcp(&target.to_string())?;
    match c.wait_answer(sid, Duration::from_secs(5))? {
        a @ Answer::Response(_) if a.status() == Some(200) => {}
        other => bail!("CONNECT over HTTP/3 refused: {other:?}"),
    }
    let data = crate::tcp_echo::pattern(bytes);
    let start = Instant::now();
    let mut got = Vec::with_capacity(bytes);
    c.exchange_raw(sid, &data, Duration::from_secs(30), |b| got.extend_from_slice(b))?;
    let elapsed = start.elapsed();
    if got != data {
        bail!("CONNECT over HTTP/3: {} of {bytes} bytes back, or changed", got.len());
    }
    if std::env::var_os("FRONT_BENCH_STATS").is_some() {
        eprintln!("{:?}", c.quic_stats());
    }
    c.close();
    Ok(elapsed)
}

/// One TCP CONNECT transfer: its time, and the CPU (clock ticks) the
/// relay's dataplane and this process (the client and the echo target)
/// spent during it.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    elapsed: Duration,
    relay_ticks: u64,
    bench_ticks: u64,
}

struct UdpRow {
    path: &'static str,
    size: usize,
    report: EchoReport,
}

/// Runs the comparison; returns the markdown report.
pub fn run(cfg: &FrontBench) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("relay-front-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = RelayOptions { workers: cfg.workers, bin_dir: cfg.bin_dir.clone(), ..RelayOptions::default() };
    let relay = Relay::start(&dir, &opts)?;
    let udp = EchoServer::start("127.0.0.1:0".parse()?)?;
    let tcp = TcpEcho::start("127.0.0.1:0".parse()?)?;
    let h2 = crate::h2client::default_target(relay.addr, &relay.cert(), Some(relay.token.clone()));
    let mut rows = Vec::new();
    let sizes: &[usize] = if matches!(cfg.only, Only::All | Only::Udp) { &[1200, 64] } else { &[] };
    for &size in sizes {
        let load = EchoLoad {
            count: cfg.count,
            size,
            window: cfg.window,
            capsules: false,
            stall_timeout: Duration::from_secs(2),
        };
        rows.push(UdpRow {
            path: "HTTP/3 (QUIC DATAGRAM frames)",
            size,
            report: h3_udp_echo(&relay, udp.addr(), cfg.flows, &load)?,
        });
        rows.push(UdpRow {
            path: "HTTP/2 over TLS (DATAGRAM capsules)",
            size,
            report: h2client::udp_echo(&h2, udp.addr(), cfg.flows, &load)?,
        });
    }
    let mut tcp_rows: Vec<(&str, Transfer)> = Vec::new();
    let dataplane = relay.dataplane_pid().context("the relay's dataplane is not running")?;
    let times = |f: &dyn Fn() -> Result<Duration>| -> Result<Transfer> {
        let mut v = Vec::new();
        for _ in 0..cfg.repeats.max(1) {
            let (relay0, bench0) = (sample_process(dataplane)?, sample_process(std::process::id())?);
            let elapsed = f()?;
            let (relay1, bench1) = (sample_process(dataplane)?, sample_process(std::process::id())?);
            v.push(Transfer {
                elapsed,
                relay_ticks: relay1.cpu_ticks - relay0.cpu_ticks,
                bench_ticks: bench1.cpu_ticks - bench0.cpu_ticks,
            });
        }
        v.sort_by_key(|t| t.elapsed);
        Ok(v[v.len() / 2])
    };
    let target = tcp.addr();
    let b = cfg.tcp_bytes;
    if cfg.only != Only::Udp {
        tcp_rows.push(("direct (no relay)", times(&|| h2client::tcp_echo_direct(target, b))?));
        tcp_rows.push(("HTTP/3 CONNECT", times(&|| h3_tcp_echo(&relay, target, b))?));
    }
    if cfg.only == Only::All || cfg.only == Only::Connect {
        tcp_rows.push((
            "HTTP/2 CONNECT over TLS",
            times(&|| h2client::tcp_echo(&h2, target, b).context("HTTP/2 CONNECT"))?,
        ));
        tcp_rows.push((
            "HTTP/1.1 CONNECT over TLS",
            times(&|| h2client::tcp_echo_h1(&h2, target, b).context("HTTP/1.1 CONNECT"))?,
        ));
    }

    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&format!(
            "connect-udp echo: {} tunnels on one connection, {} datagrams each, window {} per tunnel, loopback UDP echo target, relay with {} workers.\n\n",
            cfg.flows, cfg.count, cfg.window, cfg.workers
        ));
        out.push_str("| path | payload | echoes/s | MB/s each way | RTT p50 | RTT p99 | lost |\n|---|---|---|---|---|---|---|\n");
    }
    for r in &rows {
        let secs = r.report.elapsed.as_secs_f64().max(1e-9);
        let rate = r.report.received as f64 / secs;
        out.push_str(&format!(
            "| {} | {} B | {:.0} | {:.1} | {} us | {} us | {} |\n",
            r.path,
            r.size,
            rate,
            rate * r.size as f64 / 1e6,
            r.report.rtt_us.value_at_quantile(0.5),
            r.report.rtt_us.value_at_quantile(0.99),
            r.report.lost
        ));
    }
    if tcp_rows.is_empty() {
        drop(relay);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(out);
    }
    out.push_str(&format!(
        "\nTCP CONNECT: {} MiB echoed through one tunnel (sent and received concurrently), median of {} runs.\n\n",
        b >> 20,
        cfg.repeats.max(1)
    ));
    out.push_str(
        "| path | seconds | Mbit/s each way | vs direct | relay CPU ms/MiB | client+target CPU ms/MiB |\n|---|---|---|---|---|---|\n",
    );
    let direct = tcp_rows[0].1.elapsed.as_secs_f64();
    let ms_per_mib =
        |ticks: u64| ticks as f64 * 1000.0 / clock_ticks_per_sec() as f64 / (b as f64 / (1 << 20) as f64);
    for (path, t) in &tcp_rows {
        let s = t.elapsed.as_secs_f64().max(1e-9);
        let relay_cpu = if path.starts_with("direct") {
            "-".to_string()
        } else {
            format!("{:.1}", ms_per_mib(t.relay_ticks))
        };
        out.push_str(&format!(
            "| {path} | {s:.3} | {:.0} | {:.2} | {relay_cpu} | {:.1} |\n",
            b as f64 * 8.0 / s / 1e6,
            direct / s,
            ms_per_mib(t.bench_ticks)
        ));
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

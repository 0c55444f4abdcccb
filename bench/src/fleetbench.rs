//! `relay-bench fleet`: what fleet mode costs, measured in one run.
//!
//! 1. **Setup cost** (loopback, no privileges): two relays side by side,
//!    one without `[fleet]` and one in a fleet with fleet-wide identity
//!    quotas on a local `redis-server`, both with the same per-identity
//!    `max_flows`. Rounds alternate which relay goes first; each round
//!    measures CONNECT -> 200 one tunnel at a time (pooled into one
//!    histogram per relay) and the rate of pipelined tunnel setups (median
//!    over rounds).
//! 2. **Aggregate throughput** (root, network namespaces, nftables): three
//!    fleet hosts behind the nftables balancer of the multi-host test
//!    ([`crate::fleet_topology`]), loaded through the VIP, against the
//!    same load sent to one of the hosts directly, alternating. On a small
//!    machine every host shares the same cores, so this shows the fleet's
//!    overhead (balancer, spread), not scale.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::client::ClientConfig;
use crate::fleet_topology::FleetTopology;
use crate::loadgen::{self, Direction, LoadSpec};
use crate::processes::{Relay, RelayOptions, free_tcp_port};
use crate::redis_server::RedisServer;
use crate::setup_cost::{self, Samples, SetupFigures, ratio, round_order};
use crate::stats;
use crate::target::{Target, TargetMode};

/// The fleet secret of the benchmark's fleets (32 bytes, hex).
const FLEET_SECRET_HEX: &str = "be7c0000000000000000000000000000000000000000000000000000000be7c0";
/// The per-identity `max_flows` of every relay: high enough never to
/// refuse, so the quota path runs without deciding anything.
const MAX_FLOWS: u64 = 1_000_000;
/// The relay port on every host of the aggregate run.
const PORT: u16 = 4433;

/// What to run.
#[derive(Debug, Clone)]
pub struct FleetBenchConfig {
    /// Where the relays' state, logs and `fleet-report.json` go.
    pub out_dir: PathBuf,
    /// Directory of the relay binaries (default: next to this one).
    pub bin_dir: Option<PathBuf>,
    /// Rounds of the setup comparison (each runs both relays).
    pub rounds: usize,
    /// CONNECT -> 200 samples per relay and round.
    pub connect_samples: usize,
    /// Pipelined tunnel setups per relay and round.
    pub setup_flows: usize,
    /// Run the aggregate throughput comparison (root, netns, nftables).
    pub aggregate: bool,
    /// Rounds of the aggregate comparison.
    pub aggregate_rounds: usize,
    /// QUIC connections of each aggregate load run.
    pub connections: usize,
    /// Tunnels per connection.
    pub flows_per_connection: usize,
    /// Datagram size of the aggregate runs.
    pub size: usize,
    /// Warm-up and measurement window of each aggregate run.
    pub warmup: Duration,
    /// Measurement window of each aggregate run.
    pub duration: Duration,
}

impl FleetBenchConfig {
    /// The defaults of `relay-bench fleet`.
    pub fn standard(out_dir: PathBuf) -> Self {
        Self {
            out_dir,
            bin_dir: None,
            rounds: 5,
            connect_samples: 400,
            setup_flows: 2000,
            aggregate: true,
            aggregate_rounds: 3,
            connections: 6,
            flows_per_connection: 2,
            size: 1200,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(3),
        }
    }
}

/// One aggregate configuration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateFigures {
    /// "one host" or "three hosts via the balancer".
    pub path: String,
    /// Delivered datagrams per second, one per round.
    pub datagrams_per_sec: Vec<f64>,
    /// Their median.
    pub datagrams_per_sec_median: f64,
    /// Connections each host accepted over all rounds (the balancer's
    /// spread).
    pub connections_per_host: Vec<u64>,
}

/// The run's figures (`fleet-report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Without `[fleet]`, then with it.
    pub setup: Vec<SetupFigures>,
    /// Fleet p50 over single-host p50.
    pub connect_p50_ratio: f64,
    /// Fleet p99 over single-host p99.
    pub connect_p99_ratio: f64,
    /// Fleet setups/s over single-host setups/s (medians).
    pub setups_ratio: f64,
    /// One host, then three through the balancer (empty when not run).
    pub aggregate: Vec<AggregateFigures>,
    /// CPUs of this machine (every host shares them).
    pub cpus: usize,
}

/// The `[fleet]` section of host `host` with fleet-wide identity quotas.
fn fleet_section(redis: &RedisServer, secret: &Path, host: &str) -> String {
    format!(
        "[quotas.per_identity]\nmax_flows = {MAX_FLOWS}\n\n\
         [fleet]\nname = \"bench\"\nhost = \"{host}\"\nredis = [\"{url}\"]\nsecret_file = \"{secret}\"\n\
         on_store_failure = \"open\"\nglobal_quotas = true\n",
        url = redis.url(),
        secret = secret.display(),
    )
}

fn write_secret(dir: &Path) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("fleet-secret");
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    writeln!(f, "{FLEET_SECRET_HEX}")?;
    Ok(path)
}

fn client_config(relay: &Relay, to: SocketAddr) -> ClientConfig {
    let mut cfg = ClientConfig::new(to);
    cfg.ca = Some(relay.cert());
    cfg.token = Some(relay.token.clone());
    cfg
}

/// Part 1: single host against fleet member, alternating.
fn setup_comparison(cfg: &FleetBenchConfig) -> Result<Vec<SetupFigures>> {
    let dir = cfg.out_dir.join("setup");
    std::fs::create_dir_all(&dir)?;
    let redis = RedisServer::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_tcp_port()?), None)
        .context("starting redis-server")?;
    let secret = write_secret(&dir)?;
    let base = RelayOptions {
        workers: 1,
        flow_idle_timeout_secs: 600,
        ask_timeout_ms: 5000,
        dataplane_extra: "max_tunnels_per_connection = 25000".into(),
        bin_dir: cfg.bin_dir.clone(),
        ..RelayOptions::default()
    };
    let single = Relay::start(
        &dir.join("single"),
        &RelayOptions {
            extra_config: format!("[quotas.per_identity]\nmax_flows = {MAX_FLOWS}\n"),
            log_dir: Some(dir.join("logs-single")),
            ..base.clone()
        },
    )
    .context("starting the single-host relay")?;
    let fleet = Relay::start(
        &dir.join("fleet"),
        &RelayOptions {
            extra_config: fleet_section(&redis, &secret, "bench-a"),
            log_dir: Some(dir.join("logs-fleet")),
            ..base
        },
    )
    .context("starting the fleet relay")?;
    let target = Target::start("127.0.0.1:0".parse()?, TargetMode::Sink)?;
    let relays = [&single, &fleet];
    let mut samples = [Samples::new("single host"), Samples::new("fleet (global quotas, redis)")];
    for round in 0..cfg.rounds {
        for i in round_order(round) {
            let ccfg = client_config(relays[i], relays[i].addr);
            eprintln!("bench fleet: round {}/{}: {}", round + 1, cfg.rounds, samples[i].name());
            samples[i].connect_latency(&ccfg, &target, cfg.connect_samples, Vec::new())?;
            samples[i].setup_rate(&ccfg, &target, cfg.setup_flows, Vec::new())?;
        }
    }
    // The figures are a fleet member's only if it was one the whole time.
    let status = fleet.status()?;
    if status["fleet"]["store_up"] != serde_json::Value::Bool(true)
        || status["fleet"]["global_quotas"] != serde_json::Value::Bool(true)
    {
        bail!("the fleet relay was not in its fleet with global quotas: {}", status["fleet"]);
    }
    Ok(samples.iter().map(Samples::figures).collect())
}

/// Connections accepted per host so far.
fn accepted(hosts: &[Relay]) -> Result<Vec<u64>> {
    hosts.iter().map(|h| h.counter("connections_accepted")).collect()
}

/// Part 2: one host directly against three through the balancer.
fn aggregate_comparison(cfg: &FleetBenchConfig) -> Result<Vec<AggregateFigures>> {
    let dir = cfg.out_dir.join("aggregate");
    std::fs::create_dir_all(&dir)?;
    let topo = FleetTopology::create(3, PORT).context("building the namespaces and the balancer")?;
    // Every thread made from here on (the load generator's) is in the
    // client's namespace.
    topo.enter_client().context("entering the client namespace")?;
    let redis = RedisServer::start(SocketAddr::new(topo.redis_addr, 6379), Some(&topo.redis_netns))
        .context("starting redis-server")?;
    let secret = write_secret(&dir)?;
    let mut hosts: Vec<Relay> = Vec::new();
    for (i, host) in topo.hosts.iter().enumerate() {
        let name = format!("host-{i}");
        if let Some(first) = hosts.first() {
            first.share_certificate(&dir.join(&name).join("state"))?;
        }
        let opts = RelayOptions {
            workers: 1,
            flow_idle_timeout_secs: 600,
            allow: vec![format!("{}/24", topo.client_addr)],
            dataplane_extra: format!("[dataplane.connection_ids]\nserver_id = \"{:02x}\"\n", 0x0a + i),
            extra_config: fleet_section(&redis, &secret, &name),
            listen_ip: host.addr,
            netns: Some(host.netns.clone()),
            port: Some(PORT),
            bin_dir: cfg.bin_dir.clone(),
            log_dir: Some(dir.join(&name).join("logs")),
            ..RelayOptions::default()
        };
        hosts.push(Relay::start(&dir.join(&name), &opts).with_context(|| format!("starting {name}"))?);
    }
    let target = Target::start(SocketAddr::new(topo.client_addr, 0), TargetMode::Sink)?;
    let spec = LoadSpec {
        connections: cfg.connections,
        flows_per_connection: cfg.flows_per_connection,
        size: cfg.size,
        direction: Direction::Upload,
        rate: None,
        warmup: cfg.warmup,
        duration: cfg.duration,
    };
    let paths = [
        ("one host", SocketAddr::new(topo.hosts[0].addr, PORT)),
        ("three hosts via the balancer", SocketAddr::new(topo.vip, PORT)),
    ];
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut spread = [vec![0u64; hosts.len()], vec![0u64; hosts.len()]];
    for round in 0..cfg.aggregate_rounds {
        for i in round_order(round) {
            let (name, to) = paths[i];
            eprintln!("bench fleet: aggregate round {}/{}: {name}", round + 1, cfg.aggregate_rounds);
            let before = accepted(&hosts)?;
            let ccfg = client_config(&hosts[0], to);
            let (mut clients, tunnels) = loadgen::connect(&ccfg, &spec, &target)?;
            let r = loadgen::run(&mut clients, &tunnels, &target, &spec);
            for c in clients {
                c.close();
            }
            rates[i].push(r?.delivered_rate.datagrams_per_sec);
            for (h, (after, before)) in accepted(&hosts)?.into_iter().zip(before).enumerate() {
                spread[i][h] += after - before;
            }
        }
    }
    Ok(paths
        .iter()
        .zip(rates.into_iter().zip(spread))
        .map(|((name, _), (r, s))| AggregateFigures {
            path: (*name).to_string(),
            datagrams_per_sec_median: stats::median(&mut r.clone()).unwrap_or(0.0),
            datagrams_per_sec: r,
            connections_per_host: s,
        })
        .collect())
}

/// Runs the comparison and writes `fleet-report.json` and
/// `fleet-report.md` into `cfg.out_dir`.
pub fn run(cfg: &FleetBenchConfig) -> Result<FleetReport> {
    std::fs::create_dir_all(&cfg.out_dir)?;
    let setup = setup_comparison(cfg)?;
    let aggregate = if cfg.aggregate { aggregate_comparison(cfg)? } else { Vec::new() };
    let (s, f) = (&setup[0], &setup[1]);
    let report = FleetReport {
        connect_p50_ratio: ratio(f.connect_latency.p50_us as f64, s.connect_latency.p50_us as f64),
        connect_p99_ratio: ratio(f.connect_latency.p99_us as f64, s.connect_latency.p99_us as f64),
        setups_ratio: ratio(f.setups_per_sec_median, s.setups_per_sec_median),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        setup,
        aggregate,
    };
    std::fs::write(cfg.out_dir.join("fleet-report.json"), serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(cfg.out_dir.join("fleet-report.md"), &md)?;
    print!("{md}");
    Ok(report)
}

/// The report as Markdown tables.
pub fn markdown(r: &FleetReport) -> String {
    let mut s = setup_cost::markdown("relay", &r.setup);
    s += &format!(
        "\nfleet / single host: p50 {:.2}x, p99 {:.2}x, setups/s {:.2}x\n",
        r.connect_p50_ratio, r.connect_p99_ratio, r.setups_ratio
    );
    if !r.aggregate.is_empty() {
        s += &format!(
            "\n| path ({} CPUs shared by every host) | datagrams/s (median) | rounds | connections per host |\n|---|---|---|---|\n",
            r.cpus
        );
        for a in &r.aggregate {
            s += &format!(
                "| {} | {:.0} | {} | {:?} |\n",
                a.path,
                a.datagrams_per_sec_median,
                a.datagrams_per_sec.len(),
                a.connections_per_host
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    fn p(p50: u64, p99: u64) -> Percentiles {
        Percentiles { count: 10, p50_us: p50, p90_us: p99, p99_us: p99, p999_us: p99, max_us: p99 }
    }

    #[test]
    fn the_markdown_names_both_relays_and_the_ratios() {
        let r = FleetReport {
            setup: vec![
                SetupFigures {
                    name: "single host".into(),
                    connect_latency: p(100, 200),
                    setups_per_sec: vec![1000.0],
                    setups_per_sec_median: 1000.0,
                },
                SetupFigures {
                    name: "fleet".into(),
                    connect_latency: p(110, 260),
                    setups_per_sec: vec![900.0],
                    setups_per_sec_median: 900.0,
                },
            ],
            connect_p50_ratio: 1.1,
            connect_p99_ratio: 1.3,
            setups_ratio: 0.9,
            aggregate: Vec::new(),
            cpus: 2,
        };
        let md = markdown(&r);
        assert!(md.contains("| single host | 100 | 200 | 10 | 1000 |"), "{md}");
        assert!(md.contains("p50 1.10x, p99 1.30x, setups/s 0.90x"), "{md}");
        assert!(!md.contains("datagrams/s"), "{md}");
    }
}

//! `relay-bench`: clients, UDP targets and load generation for the relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use relay_bench::client::{Client, ClientConfig, DEFAULT_TEMPLATE};
use relay_bench::echo::EchoServer;
use relay_bench::load::{EchoLoad, run_echo};
use relay_bench::loadgen::{self, Direction, LoadSpec};
use relay_bench::suite::{self, SuiteConfig};
use relay_bench::target::{Target, TargetMode};

/// Clients and load generation for the MASQUE relay.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs, Debug, Clone)]
struct RelayArgs {
    /// The relay's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    relay: SocketAddr,
    /// TLS server name (and :authority host).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Certificate or CA to verify the relay with.
    #[arg(long, conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Skip certificate verification.
    #[arg(long)]
    insecure: bool,
    /// Bearer token.
    #[arg(long, env = "RELAY_TOKEN")]
    token: Option<String>,
    /// The relay's connect-udp URI template.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    template: String,
    /// Do not advertise HTTP/3 datagrams: the relay answers with capsules.
    #[arg(long)]
    no_h3_datagrams: bool,
}

impl RelayArgs {
    fn config(&self) -> Result<ClientConfig> {
        if self.ca.is_none() && !self.insecure {
            bail!("give --ca CERT (e.g. state/cert.pem) or --insecure");
        }
        Ok(ClientConfig {
            relay: self.relay,
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            system_roots: false,
            h3_datagrams: !self.no_h3_datagrams,
            template: self.template.clone(),
            token: self.token.clone(),
            session: None,
            after_retry_send_to: None,
            client_cert: None,
        })
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DirectionArg {
    Upload,
    Download,
    Echo,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnlyArg {
    All,
    Udp,
    Connect,
    H3Connect,
    H2Udp,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the standard benchmark suite against freshly started relay
    /// processes (release binaries next to this one) and write JSON,
    /// markdown and SVG results.
    Suite {
        /// Results directory.
        #[arg(long, default_value = "results/latest")]
        out: PathBuf,
        /// A seconds-long run of every stage (pipeline check, not numbers).
        #[arg(long)]
        smoke: bool,
        /// Directory of relay-control and relay-dataplane.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Do not pin relay and load generator to different cores.
        #[arg(long)]
        no_pin: bool,
        /// Run the targets in a network namespace behind a veth link (root).
        #[arg(long)]
        netns: bool,
        /// The relay's I/O backend for the main runs: auto, io_uring or epoll.
        #[arg(long, default_value = "auto")]
        io: String,
        /// Record a perf profile of the dataplane during every cost run into
        /// this directory (perf.data, the hottest symbols, and a flame graph
        /// when inferno-flamegraph is installed: `cargo install inferno`).
        #[arg(long)]
        perf: Option<PathBuf>,
        /// Extra `[dataplane]` config lines for every relay of the run
        /// (e.g. `wait_batch_us = 500`).
        #[arg(long, default_value = "")]
        dataplane: String,
    },
    /// Relay CPU per datagram of two builds at the same paced loads, in one
    /// run, alternating (`before` then `after` each round): the A/B rows of
    /// a fast-path change (docs/BENCHMARKS.md).
    PacedAb {
        /// Results directory.
        #[arg(long, default_value = "results/paced-ab")]
        out: PathBuf,
        /// Directory of the old relay-control and relay-dataplane.
        #[arg(long)]
        before: PathBuf,
        /// Directory of the new ones.
        #[arg(long)]
        after: PathBuf,
        /// Extra `[dataplane]` config lines for the `before` relays.
        #[arg(long, default_value = "")]
        before_dataplane: String,
        /// Extra `[dataplane]` config lines for the `after` relays (e.g.
        /// `wait_batch_us = 500`, with `--before` and `--after` the same).
        #[arg(long, default_value = "")]
        after_dataplane: String,
        /// Offered datagrams/s, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "20000,40000")]
        rates: Vec<f64>,
        /// Payload bytes.
        #[arg(long, default_value_t = 1200)]
        size: usize,
        /// Rounds (the table shows medians).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// What fleet mode costs, in one run: CONNECT -> 200 and setups/s of a
    /// single host against a fleet member (fleet-wide quotas on a local
    /// redis-server), then (root) one host against three behind the
    /// nftables balancer of the multi-host test.
    Fleet {
        /// Results directory.
        #[arg(long, default_value = "results/fleet")]
        out: PathBuf,
        /// Directory of relay-control and relay-dataplane.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Rounds of the setup comparison.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// CONNECT -> 200 samples per relay and round.
        #[arg(long, default_value_t = 400)]
        connect_samples: usize,
        /// Skip the three-host aggregate run (needs root and nftables).
        #[arg(long)]
        no_aggregate: bool,
    },
    /// What Privacy Pass type 2 verification costs at CONNECT: CONNECT ->
    /// 200 p50/p99 and pipelined setups/s with a fresh token per request,
    /// against bearer tokens, on one relay in one run.
    PrivacyPass {
        /// Results directory.
        #[arg(long, default_value = "results/privacy-pass")]
        out: PathBuf,
        /// Directory of relay-control and relay-dataplane.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Rounds (each runs both credentials).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// CONNECT -> 200 samples per credential and round.
        #[arg(long, default_value_t = 400)]
        connect_samples: usize,
        /// Pipelined setups per credential and round.
        #[arg(long, default_value_t = 2000)]
        setup_flows: usize,
    },
    /// Generate one load through a running relay to a target this command
    /// starts on loopback, and print what was delivered.
    Load {
        #[command(flatten)]
        relay: RelayArgs,
        /// Direction of the payload.
        #[arg(long, value_enum, default_value = "upload")]
        direction: DirectionArg,
        /// QUIC connections.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Tunnels per connection.
        #[arg(long, default_value_t = 4)]
        flows: usize,
        /// UDP payload size.
        #[arg(long, default_value_t = 1200)]
        size: usize,
        /// Offered datagrams/s over all tunnels (default: as fast as QUIC allows).
        #[arg(long)]
        rate: Option<f64>,
        /// Warm-up in seconds.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Measurement window in seconds.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// Run a UDP echo server.
    EchoServer {
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1:7777")]
        listen: SocketAddr,
    },
    /// Send one UDP message through the relay and print the replies.
    UdpSend {
        #[command(flatten)]
        relay: RelayArgs,
        /// Target host:port (host may be a name or an IP literal).
        #[arg(long)]
        target: String,
        /// The message.
        #[arg(long)]
        message: String,
        /// How long to wait for replies, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        wait_ms: u64,
    },
    /// Start a local echo target and send verified datagrams to it through
    /// the relay; print loss and round-trip times.
    TunnelEcho {
        #[command(flatten)]
        relay: RelayArgs,
        /// Concurrent tunnels.
        #[arg(long, default_value_t = 4)]
        flows: u32,
        /// Datagrams per tunnel.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Payload size.
        #[arg(long, default_value_t = 1200)]
        size: usize,
        /// In-flight datagrams per tunnel.
        #[arg(long, default_value_t = 32)]
        window: u64,
        /// Use DATAGRAM capsules instead of QUIC datagrams.
        #[arg(long)]
        capsules: bool,
    },
    /// Open a bound connect-udp tunnel, print its Proxy-Public-Address, ask
    /// a STUN server for the mapping through it, and print what peers send
    /// for a while (they reach the client once it has sent to them, unless
    /// the relay's inbound filter is "any").
    BindStun {
        #[command(flatten)]
        relay: RelayArgs,
        /// The STUN server (IP:port).
        #[arg(long)]
        stun: SocketAddr,
        /// Listen for peers this many seconds after the STUN answer.
        #[arg(long, default_value_t = 0)]
        listen_seconds: u64,
    },
    /// Measure TCP throughput through a connect-ip tunnel and on the direct
    /// path, in network namespaces this command creates (root).
    IpBench {
        /// Directory of relay-control and relay-dataplane.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Relay workers.
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Seconds per path.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// WebSocket echo messages/s and round-trip p50/p99 through the relay
    /// (HTTP/1.1 Upgrade and HTTP/2 extended CONNECT over TLS on the TCP
    /// front, to a `[[upstreams]]` route) next to the direct path to the
    /// same Rust origin, in one run; prints a markdown table.
    Websocket {
        /// Directory of relay-control and relay-dataplane.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Relay workers.
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// WebSocket connections per path (one thread each).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Timed messages per connection.
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        /// Untimed messages per connection first.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// Message sizes in bytes (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "64,16384")]
        sizes: Vec<usize>,
        /// Measure only the direct path (no relay).
        #[arg(long)]
        direct_only: bool,
    },
    /// One WebSocket client (tungstenite): opens a WebSocket to PATH
    /// through the relay's TCP front (or straight to an origin) and echoes
    /// COUNT binary messages, checking each.
    WebsocketEcho {
        /// TCP address: the relay's TLS or cleartext listener, or an origin.
        #[arg(long)]
        to: SocketAddr,
        /// 1: HTTP/1.1 Upgrade; 2: HTTP/2 extended CONNECT (needs --ca).
        #[arg(long, default_value_t = 1)]
        http: u8,
        /// Certificate to verify TLS with; cleartext without it.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// TLS server name.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// Host / :authority (default: SERVER_NAME:PORT).
        #[arg(long)]
        authority: Option<String>,
        /// Bearer token (Proxy-Authorization).
        #[arg(long, env = "RELAY_TOKEN")]
        token: Option<String>,
        /// Request path.
        #[arg(long, default_value = "/echo/")]
        path: String,
        /// Messages to echo.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// connect-udp over HTTP/2 (the TCP front) next to HTTP/3, and TCP
    /// CONNECT over HTTP/3, HTTP/2 and HTTP/1.1 next to the direct path, on
    /// a freshly started relay; prints a markdown report.
    FrontBench {
        /// Directory of relay-control and relay-dataplane.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Relay workers.
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Tunnels per echo load.
        #[arg(long, default_value_t = 4)]
        flows: usize,
        /// Datagrams per tunnel.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// Datagrams in flight per tunnel.
        #[arg(long, default_value_t = 64)]
        window: u64,
        /// MiB per TCP CONNECT transfer.
        #[arg(long, default_value_t = 64)]
        tcp_mib: usize,
        /// Transfers per TCP path (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Run only one part: `udp` (the connect-udp echo loads), `connect`
        /// (the TCP CONNECT transfers), `h3-connect` (the direct path and
        /// HTTP/3 CONNECT, for profiling), `h2-udp` (the connect-udp echo
        /// loads over HTTP/2 only, for profiling).
        #[arg(long, value_enum, default_value_t = OnlyArg::All)]
        only: OnlyArg,
    },
}

fn split_target(target: &str) -> Result<(String, u16)> {
    let (host, port) = target.rsplit_once(':').context("target must be host:port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), port.parse().context("bad target port")?))
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Command::BindStun { relay, stun, listen_seconds } => {
            use relay_bench::bindclient::{BoundTunnel, stun_binding_request, stun_mapped_address};
            let mut c = Client::connect(relay.config()?, Duration::from_secs(10))?;
            c.wait_settings(Duration::from_secs(10))?;
            let mut t = BoundTunnel::open(&mut c, Duration::from_secs(10))?;
            println!("proxy public address: {:?}", t.public);
            t.open_uncompressed(&mut c, Duration::from_secs(10))?;
            let tx: [u8; 12] = *b"relay-bench!";
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut mapped = None;
            while mapped.is_none() && Instant::now() < deadline {
                t.send_to(&mut c, stun, &stun_binding_request(tx))?;
                c.flush()?;
                for (from, payload, _) in t.recv(&mut c, Duration::from_millis(300))? {
                    if from == stun {
                        mapped = mapped.or(stun_mapped_address(&payload, tx));
                    }
                }
            }
            let mapped = mapped.context("no STUN answer through the bound tunnel")?;
            println!("STUN mapped address: {mapped}");
            let listen_until = Instant::now() + Duration::from_secs(listen_seconds);
            while Instant::now() < listen_until {
                for (from, payload, compressed) in t.recv(&mut c, Duration::from_millis(100))? {
                    let how = if compressed { "compressed" } else { "uncompressed" };
                    println!("{from}: {} bytes ({how})", payload.len());
                }
            }
            Ok(())
        }
        Command::IpBench { bin_dir, workers, seconds } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => relay_bench::processes::bin_dir()?,
            };
            let r = relay_bench::ipbench::run(&bin_dir, workers, Duration::from_secs(seconds))?;
            print!("{}", relay_bench::ipbench::table(&r));
            for (name, t) in [("offloads", &r.offload), ("no offloads", &r.plain)] {
                let p = &t.pump;
                println!("client packets ({name}): up {}, down {}, dropped {}", p.up, p.down, p.dropped);
            }
            Ok(())
        }
        Command::FrontBench { bin_dir, workers, flows, count, window, tcp_mib, repeats, only } => {
            use relay_bench::frontbench::Only;
            let cfg = relay_bench::frontbench::FrontBench {
                bin_dir,
                workers,
                flows,
                count,
                window,
                tcp_bytes: tcp_mib << 20,
                repeats,
                only: match only {
                    OnlyArg::All => Only::All,
                    OnlyArg::Udp => Only::Udp,
                    OnlyArg::Connect => Only::Connect,
                    OnlyArg::H3Connect => Only::H3Connect,
                    OnlyArg::H2Udp => Only::H2Udp,
                },
            };
            print!("{}", relay_bench::frontbench::run(&cfg)?);
            Ok(())
        }
        Command::Websocket { bin_dir, workers, connections, messages, warmup, sizes, direct_only } => {
            let cfg = relay_bench::wsbench::WsBench {
                bin_dir,
                workers,
                connections,
                messages,
                warmup,
                sizes,
                direct_only,
            };
            print!("{}", relay_bench::wsbench::run(&cfg)?);
            Ok(())
        }
        Command::WebsocketEcho { to, http, ca, server_name, authority, token, path, count, size } => {
            use relay_bench::wsecho::{self, Opened, Through, Tls};
            let through = Through {
                addr: to,
                authority: authority.unwrap_or_else(|| format!("{server_name}:{}", to.port())),
                tls: ca.map(|ca| Tls { ca, server_name }),
                token,
            };
            let timeout = Duration::from_secs(10);
            let opened = match http {
                1 => wsecho::connect_h1(&through, &path, timeout)?,
                2 => wsecho::connect_h2(&through, &path, timeout)?,
                other => bail!("--http {other}: 1 or 2"),
            };
            let (mut ws, answer) = match opened {
                Opened::Open(ws, answer) => (*ws, answer),
                Opened::Refused(answer) => bail!("refused: {} {:?}", answer.status, answer.headers),
            };
            println!("opened: {} {:?}", answer.status, answer.headers);
            let payload = bytes::Bytes::from(relay_bench::tcp_echo::pattern(size));
            let start = Instant::now();
            for i in 0..count {
                match wsecho::round_trip(&mut ws, tungstenite::Message::Binary(payload.clone()))? {
                    tungstenite::Message::Binary(b) if b == payload => {}
                    other => bail!("message {i} came back changed ({} bytes)", other.len()),
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{count} messages of {size} B echoed in {secs:.3} s ({:.0}/s)",
                count as f64 / secs.max(1e-9)
            );
            ws.close(None)?;
            for _ in 0..16 {
                if ws.read().is_err() {
                    break;
                }
            }
            Ok(())
        }
        Command::Fleet { out, bin_dir, rounds, connect_samples, no_aggregate } => {
            let mut cfg = relay_bench::fleetbench::FleetBenchConfig::standard(out.clone());
            cfg.bin_dir = bin_dir;
            cfg.rounds = rounds;
            cfg.connect_samples = connect_samples;
            cfg.aggregate = !no_aggregate;
            relay_bench::fleetbench::run(&cfg)?;
            println!("\nresults written to {}", out.display());
            Ok(())
        }
        Command::PrivacyPass { out, bin_dir, rounds, connect_samples, setup_flows } => {
            let mut cfg = relay_bench::ppbench::PpBenchConfig::standard(out.clone());
            cfg.bin_dir = bin_dir;
            cfg.rounds = rounds;
            cfg.connect_samples = connect_samples;
            cfg.setup_flows = setup_flows;
            relay_bench::ppbench::run(&cfg)?;
            println!("\nresults written to {}", out.display());
            Ok(())
        }
        Command::PacedAb { out, before, after, before_dataplane, after_dataplane, rates, size, rounds } => {
            let cfg = SuiteConfig::standard(out.clone());
            let rows = suite::paced_ab(
                &cfg,
                (before, before_dataplane),
                (after, after_dataplane),
                &rates,
                size,
                rounds,
            )?;
            let median = |v: &[f64]| relay_bench::stats::median(&mut v.to_vec()).unwrap_or(f64::NAN);
            let median_u = |v: &[u64]| {
                relay_bench::stats::median(&mut v.iter().map(|&x| x as f64).collect::<Vec<_>>())
                    .map_or("-".to_string(), |m| format!("{m:.0}"))
            };
            println!(
                "| binaries | direction | offered dgram/s | relay CPU us/dgram (median) | user us | CPU clock us/dgram | QUIC packets in / dgram | QUIC packets out / dgram | RTT p50 / p99 us | rounds (us/dgram) |"
            );
            println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
            for r in &rows {
                let each: Vec<String> = r.us_per_datagram.iter().map(|v| format!("{v:.2}")).collect();
                println!(
                    "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} / {} | {} |",
                    r.binaries,
                    r.direction,
                    r.offered,
                    median(&r.us_per_datagram),
                    median(&r.user_us_per_datagram),
                    median(&r.exact_us_per_datagram),
                    median(&r.quic_packets_per_datagram),
                    median(&r.quic_packets_out_per_datagram),
                    median_u(&r.rtt_p50_us),
                    median_u(&r.rtt_p99_us),
                    each.join(" ")
                );
            }
            println!("\nresults written to {}", out.display());
            Ok(())
        }
        Command::Suite { out, smoke, bin_dir, no_pin, netns, io, perf, dataplane } => {
            let mut cfg =
                if smoke { SuiteConfig::smoke(out.clone()) } else { SuiteConfig::standard(out.clone()) };
            cfg.bin_dir = bin_dir;
            cfg.pin &= !no_pin;
            cfg.netns = netns;
            cfg.io = io;
            cfg.perf_dir = perf;
            cfg.dataplane_extra = dataplane;
            let report = suite::run(&cfg)?;
            print!("{}", relay_bench::report::markdown(&report));
            println!("\nresults written to {}", out.display());
            Ok(())
        }
        Command::Load { relay, direction, connections, flows, size, rate, warmup, duration } => {
            let direction = match direction {
                DirectionArg::Upload => Direction::Upload,
                DirectionArg::Download => Direction::Download,
                DirectionArg::Echo => Direction::Echo,
            };
            let mode = match direction {
                Direction::Upload => TargetMode::Sink,
                // The source paces each tunnel at its share of `--rate`
                // (the client sends nothing to pace in this direction).
                Direction::Download => match rate {
                    Some(r) => TargetMode::paced_source(size, r, connections * flows),
                    None => TargetMode::Source { size, rate_per_peer: None },
                },
                Direction::Echo => TargetMode::Echo,
            };
            let spec = LoadSpec {
                connections,
                flows_per_connection: flows,
                size,
                direction,
                rate,
                warmup: Duration::from_secs_f64(warmup),
                duration: Duration::from_secs_f64(duration),
            };
            let target = Target::start("127.0.0.1:0".parse()?, mode)?;
            let (mut clients, tunnels) = loadgen::connect(&relay.config()?, &spec, &target)?;
            let r = loadgen::run(&mut clients, &tunnels, &target, &spec)?;
            for c in clients {
                c.close();
            }
            println!("{}", serde_json::to_string_pretty(&r)?);
            if let Some(offered) = rate
                && !relay_bench::stats::reached(offered, r.send_rate.datagrams_per_sec, 0.05)
            {
                bail!(
                    "the load generator reached only {:.0} of {offered:.0} datagrams/s",
                    r.send_rate.datagrams_per_sec
                );
            }
            Ok(())
        }
        Command::EchoServer { listen } => {
            let server = EchoServer::start(listen)?;
            println!("echoing UDP on {}", server.addr());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Command::UdpSend { relay, target, message, wait_ms } => {
            let (host, port) = split_target(&target)?;
            let mut client = Client::connect(relay.config()?, Duration::from_secs(5))?;
            let stream = client.open_udp(&host, port, Duration::from_secs(5))?;
            client.send_datagram(stream, message.as_bytes())?;
            client.flush()?;
            let deadline = Instant::now() + Duration::from_millis(wait_ms);
            let mut replies = 0;
            while Instant::now() < deadline {
                client.drive(Duration::from_millis(20))?;
                for reply in client.take_datagrams(stream) {
                    replies += 1;
                    println!("reply: {}", String::from_utf8_lossy(&reply));
                }
            }
            client.close();
            if replies == 0 {
                bail!("no reply from {target} within {wait_ms} ms");
            }
            Ok(())
        }
        Command::TunnelEcho { relay, flows, count, size, window, capsules } => {
            let echo = EchoServer::start("127.0.0.1:0".parse()?)?;
            let mut client = Client::connect(relay.config()?, Duration::from_secs(5))?;
            let mut streams = Vec::new();
            for _ in 0..flows {
                streams.push(client.open_udp("127.0.0.1", echo.addr().port(), Duration::from_secs(5))?);
            }
            let load = EchoLoad { count, size, window, capsules, stall_timeout: Duration::from_secs(3) };
            let r = run_echo(&mut client, &streams, &load)?;
            client.close();
            let secs = r.elapsed.as_secs_f64();
            println!(
                "tunnels {flows}, sent {}, received {}, lost {}, corrupt {}, duplicates {}",
                r.sent, r.received, r.lost, r.corrupt, r.duplicates
            );
            println!(
                "rtt us: p50 {} p90 {} p99 {} max {}; {:.0} datagrams/s echoed in {:.2} s",
                r.rtt_us.value_at_quantile(0.5),
                r.rtt_us.value_at_quantile(0.9),
                r.rtt_us.value_at_quantile(0.99),
                r.rtt_us.max(),
                r.received as f64 / secs,
                secs
            );
            if r.lost > 0 || r.corrupt > 0 {
                bail!("{} lost and {} corrupt datagrams", r.lost, r.corrupt);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    relay_bench::tool_main("relay-bench", "warn", || run(Args::parse()))
}

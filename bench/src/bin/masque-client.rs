//! `masque-client`: use the relay from applications that know nothing of
//! MASQUE.
//!
//! - `udp`: forwards a local UDP port to one target through connect-udp.
//! - `socks`: a local SOCKS5 server (CONNECT and UDP ASSOCIATE).
//! - `ip`: a connect-ip tunnel on a local TUN device.
//!
//! The token comes from `--token-file` or `$MASQUE_TOKEN`, never from the
//! command line (which other users of the machine can read).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use relay_bench::client::DEFAULT_TEMPLATE;
use relay_bench::iptunnel::DEFAULT_IP_TEMPLATE;
use relay_bench::masque::transport::Transport;
use relay_bench::masque::{self, HostPort, Http, RelaySpec, TOKEN_ENV, Trust, forward, ip, socks};

/// Use a MASQUE relay: forward a UDP port, run a SOCKS5 server, or open
/// an IP tunnel on a TUN device.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "The token is read from --token-file or the MASQUE_TOKEN environment variable."
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HttpArg {
    /// HTTP/3 over QUIC.
    #[value(name = "3")]
    H3,
    /// HTTP/2 over TLS over TCP (where UDP is blocked).
    #[value(name = "2")]
    H2,
}

#[derive(ClapArgs, Debug, Clone)]
struct RelayArgs {
    /// The relay, HOST:PORT (QUIC; HTTP/2 uses TCP on the same port).
    #[arg(long)]
    relay: String,
    /// TLS server name (default: the host of --relay).
    #[arg(long)]
    server_name: Option<String>,
    /// Verify the relay with this CA or certificate file (default: the
    /// system's trust store).
    #[arg(long, conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Do not verify the relay's certificate.
    #[arg(long)]
    insecure: bool,
    /// A file whose first line is the bearer token (else $MASQUE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// HTTP version: 3, or 2 where UDP is blocked.
    #[arg(long, value_enum, default_value = "3")]
    http: HttpArg,
    /// The relay's connect-udp URI template.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    template: String,
}

impl RelayArgs {
    fn spec(&self) -> Result<RelaySpec> {
        let (relay, server_name) = masque::resolve_relay(&self.relay, self.server_name.as_deref())?;
        let trust = match (&self.ca, self.insecure) {
            (Some(ca), _) => Trust::Ca(ca.clone()),
            (None, true) => Trust::Insecure,
            (None, false) => Trust::System,
        };
        Ok(RelaySpec {
            relay,
            server_name,
            trust,
            token: masque::load_token(self.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?,
            udp_template: self.template.clone(),
            http: match self.http {
                HttpArg::H3 => Http::H3,
                HttpArg::H2 => Http::H2,
            },
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Forward a local UDP port to TARGET through connect-udp: each local
    /// peer gets its own tunnel.
    Udp {
        #[command(flatten)]
        relay: RelayArgs,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: SocketAddr,
        /// Where the datagrams go, HOST:PORT (the relay resolves names).
        #[arg(long)]
        target: String,
        /// Local peers served at once.
        #[arg(long, default_value_t = 256)]
        max_peers: usize,
        /// Seconds without a datagram after which a peer's tunnel closes.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
    },
    /// Run a SOCKS5 server (no authentication): CONNECT through classic
    /// CONNECT, UDP ASSOCIATE through connect-udp.
    Socks {
        #[command(flatten)]
        relay: RelayArgs,
        /// Local address to listen on (TCP; UDP associations bind it too).
        #[arg(long, default_value = "127.0.0.1:1080")]
        listen: SocketAddr,
        /// SOCKS clients served at once.
        #[arg(long, default_value_t = 256)]
        max_clients: usize,
        /// Destinations per UDP association.
        #[arg(long, default_value_t = 64)]
        max_destinations: usize,
        /// Seconds without a datagram after which a destination's tunnel closes.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
    },
    /// Open a connect-ip tunnel (RFC 9484, HTTP/3), put the assigned
    /// addresses and advertised routes on a local TUN device and carry
    /// packets until interrupted (needs CAP_NET_ADMIN).
    Ip {
        #[command(flatten)]
        relay: RelayArgs,
        /// The connect-ip URI template.
        #[arg(long, default_value = DEFAULT_IP_TEMPLATE)]
        ip_template: String,
        /// Scope: `*`, an address, a prefix or a name.
        #[arg(long, default_value = "*")]
        scope_target: String,
        /// Scope: `*` or an IP protocol number.
        #[arg(long, default_value = "*")]
        ipproto: String,
        /// The local TUN device.
        #[arg(long, default_value = "mqc0")]
        device: String,
        /// Its MTU.
        #[arg(long, default_value_t = 1280)]
        mtu: u32,
        /// Install routes only for advertised ranges inside these prefixes
        /// (repeatable; default: every advertised range, except the relay).
        #[arg(long = "route")]
        routes: Vec<String>,
        /// Stop after this many seconds (default: until interrupted).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn announce(what: std::fmt::Arguments<'_>) {
    // Scripts and tests wait for this line.
    println!("{what}");
    let _ = std::io::stdout().flush();
}

fn version(http: Http) -> &'static str {
    match http {
        Http::H3 => "HTTP/3",
        Http::H2 => "HTTP/2",
    }
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Udp { relay, listen, target, max_peers, idle_secs } => {
            let spec = relay.spec()?;
            let target = HostPort::parse(&target).map_err(|e| e.context("--target"))?;
            if max_peers == 0 {
                bail!("--max-peers must be at least 1");
            }
            let cfg = forward::ForwardConfig {
                listen,
                target,
                max_peers,
                idle: Duration::from_secs(idle_secs.max(1)),
            };
            runtime()?.block_on(async {
                let socket = forward::bind(&cfg).await?;
                let transport = Arc::new(Transport::connect(&spec).await?);
                announce(format_args!(
                    "forwarding UDP {} to {} through {} ({})",
                    socket.local_addr()?,
                    cfg.target,
                    spec.relay,
                    version(spec.http)
                ));
                forward::serve(transport, socket, cfg).await
            })
        }
        Command::Socks { relay, listen, max_clients, max_destinations, idle_secs } => {
            let spec = relay.spec()?;
            if max_clients == 0 || max_destinations == 0 {
                bail!("--max-clients and --max-destinations must be at least 1");
            }
            let cfg = socks::SocksConfig {
                listen,
                max_connections: max_clients,
                max_destinations,
                idle: Duration::from_secs(idle_secs.max(1)),
            };
            runtime()?.block_on(async {
                let listener = socks::bind(&cfg).await?;
                let transport = Arc::new(Transport::connect(&spec).await?);
                announce(format_args!(
                    "SOCKS5 on {} through {} ({})",
                    listener.local_addr()?,
                    spec.relay,
                    version(spec.http)
                ));
                socks::serve(transport, listener, cfg).await
            })
        }
        Command::Ip { relay, ip_template, scope_target, ipproto, device, mtu, routes, seconds } => {
            let spec = relay.spec()?;
            let routes = routes
                .iter()
                .map(|r| r.parse().map_err(|e| anyhow::anyhow!("--route {r}: {e}")))
                .collect::<Result<Vec<_>>>()?;
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: installing an async-signal-safe handler that only
                // stores to an atomic.
                unsafe {
                    libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
                }
            }
            let cfg = ip::IpConfig {
                template: ip_template,
                scope_target,
                ipproto,
                device,
                mtu,
                routes,
                duration: seconds.map(Duration::from_secs),
            };
            ip::run(&spec, &cfg, &STOP).map(|_| ())
        }
    }
}

fn main() -> ExitCode {
    relay_bench::tool_main("masque-client", "info", || run(Args::parse()))
}

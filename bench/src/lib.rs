//! Clients, UDP targets and load generation for the MASQUE relay.
//!
//! - [`client`]: a connect-udp client on quiche.
//! - [`echo`], [`target`]: UDP echo, sink and source targets with GSO/GRO.
//! - [`stats`]: rate math, histograms, /proc CPU and RSS accounting.
//! - [`load`]: a bounded echo load with byte-for-byte checks.
//! - [`interop`]: runs the independent aioquic client of the interop and
//!   abuse suites.
//! - [`h2client`], [`frontbench`]: an HTTP/2 client for the TCP front and
//!   the HTTP/2-next-to-HTTP/3 benchmark.
//! - [`tcp_echo`]: a TCP echo target for the TCP CONNECT tests.
//! - [`masque`]: the `masque-client` binary's UDP forwarder, SOCKS5 server
//!   and connect-ip tunnel.
//! - [`processes`]: starting a real relay (control + dataplane) for tests
//!   and benchmarks.
//! - [`fleet_topology`], [`redis_server`]: relay hosts in network
//!   namespaces behind an nftables load balancer, and their store, for the
//!   fleet's multi-host test; [`fleetbench`]: what fleet mode costs
//!   (`relay-bench fleet`).
//! - [`wsecho`], [`wsbench`], [`wsinterop`]: a WebSocket echo origin and
//!   clients in Rust (tungstenite), the WebSocket benchmark
//!   (`relay-bench websocket`), and the driver of the WebSocket tests'
//!   Python peers (`bench/interop/ws_origin.py`, `ws_client.py`).
//! - [`wtinterop`]: the driver of the WebTransport tests' aioquic peers
//!   (`bench/interop/wt_origin.py`, `wt_client.py`).
//! - [`needs`]: what the tests that are ignored by default need from the
//!   machine, checked when they run.
//! - [`wait`]: bounded waits on a condition for the tests (instead of
//!   fixed sleeps).

pub mod bindclient;
pub mod client;
pub mod direct;
pub mod echo;
pub mod fleet_topology;
pub mod fleetbench;
pub mod frontbench;
pub mod h2client;
pub mod interop;
pub mod ipbench;
pub mod ipnet;
pub mod iptunnel;
pub mod load;
pub mod loadgen;
pub mod masque;
pub mod needs;
pub mod netns;
pub mod pki;
pub mod ppbench;
pub mod privacypass;
pub mod processes;
pub mod profile;
pub mod redis_server;
pub mod report;
pub mod setup_cost;
pub mod stats;
pub mod suite;
pub mod svg;
pub mod target;
pub mod tcp_echo;
pub mod wait;
pub mod wsbench;
pub mod wsecho;
pub mod wsinterop;
pub mod wtinterop;

/// Runs a command-line tool's `run` with logging to stderr (`RUST_LOG`,
/// else `default_log`) and turns its error into a message and exit status
/// 1: the `main` of `relay-bench` and `masque-client`.
pub fn tool_main(
    name: &str,
    default_log: &str,
    run: impl FnOnce() -> anyhow::Result<()>,
) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

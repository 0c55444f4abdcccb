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
//! - [`needs`]: what the tests that are ignored by default need from the
//!   machine, checked when they run.
//! - [`wait`]: bounded waits on a condition for the tests (instead of
//!   fixed sleeps).

pub mod bindclient;
pub mod client;
pub mod direct;
pub mod echo;
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
pub mod processes;
pub mod report;
pub mod stats;
pub mod suite;
pub mod svg;
pub mod target;
pub mod tcp_echo;
pub mod wait;

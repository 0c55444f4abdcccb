//! The MASQUE relay's dataplane.
//!
//! The dataplane terminates QUIC + HTTP/3 (quiche), validates extended
//! CONNECT requests, asks control to authorize each tunnel over the
//! shared-memory channel, and forwards connect-udp payloads between HTTP
//! Datagrams (or DATAGRAM capsules) and per-tunnel connected UDP sockets.
//!
//! It never holds policy, never resolves names and never blocks on control:
//! a request waits at most `ask_timeout_ms` for its answer, and if control is
//! gone new requests fail closed with 503 while open tunnels keep
//! forwarding.
//!
//! Modules: [`tunnel`], [`response`], [`upbatch`], [`timers`] and
//! [`slab`] are sans-IO; [`worker`] is a worker's protocol core, driven by
//! one of the I/O backends in [`io`] (io_uring or epoll); [`handoff`]
//! carries packets between workers; [`front`] is the TCP front (HTTP/2
//! and HTTP/1.1 over TLS or cleartext) and [`tcp_target`] a connection to a
//! classic CONNECT target; [`link`] is the worker's end of the
//! channel; [`attach`] performs the handshake with control; [`cpu`] pins
//! workers.

pub mod attach;
pub mod cpu;
pub mod front;
pub mod handoff;
pub mod io;
pub mod keyless;
pub mod link;
pub mod quic;
pub mod response;
pub mod retry;
pub mod slab;
pub mod socket;
pub mod tcp_target;
pub mod tickets;
pub mod timers;
pub mod tls;
pub mod tun;
pub mod tunnel;
pub mod upbatch;
pub mod worker;

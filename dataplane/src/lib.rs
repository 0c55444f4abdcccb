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
//! Modules: [`tunnel`] and [`response`] are sans-IO; [`worker`] is the
//! epoll (mio) driver; [`link`] is the worker's end of the channel;
//! [`attach`] performs the handshake with control.

pub mod attach;
pub mod link;
pub mod quic;
pub mod response;
pub mod socket;
pub mod tunnel;
pub mod upbatch;
pub mod worker;

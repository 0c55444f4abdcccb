//! The MASQUE relay's dataplane.
//!
//! The dataplane terminates QUIC + HTTP/3 (quiche) and HTTP/2 / HTTP/1.1
//! over TCP, validates extended CONNECT and CONNECT requests, asks control
//! to authorize each tunnel over the shared-memory channel, and forwards
//! connect-udp, connect-ip, bound UDP and classic CONNECT tunnels.
//!
//! It never holds policy, never resolves names and never blocks on control:
//! a request waits at most `ask_timeout_ms` for its answer, and if control is
//! gone new requests fail closed with 503 while open tunnels keep
//! forwarding.
//!
//! Map: [`worker`] drives one thread's turns and dispatches what the I/O
//! backend ([`io`]: io_uring or epoll) reports to its owner
//! ([`registry`], kept in the shared [`context`]); [`h3`] is the HTTP/3
//! side and [`front`] the TCP front (HTTP/2, HTTP/1.1), both carriers of
//! the one [`tunnel`] layer (routing, control's verdicts, every tunnel
//! kind's forwarding). [`link`] is the worker's end of the channel to
//! control, [`attach`] the handshake with it, [`handoff`] moves packets
//! between workers, [`tun`] and [`tcp_target`] are a connect-ip TUN device
//! and a classic CONNECT's TCP connection; [`keyless`], [`tickets`] and
//! [`tls`] are TLS with the key in control; [`qlog`] writes quiche's qlog
//! of the connections `relayctl qlog` names.

pub mod attach;
pub mod cids;
pub mod client_cert;
pub mod context;
pub mod cpu;
pub mod dgram_buf;
pub mod front;
pub mod h3;
pub mod handoff;
pub mod io;
pub mod keyless;
pub mod link;
pub mod origin_h2;
pub mod origin_tls;
pub mod qlog;
pub mod quic;
pub mod registry;
pub mod reset;
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

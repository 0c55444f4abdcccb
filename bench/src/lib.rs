//! Clients, UDP targets and load generation for the MASQUE relay.
//!
//! - [`client`]: a connect-udp client on quiche.
//! - [`echo`]: a UDP echo target.
//! - [`load`]: a bounded echo load with byte-for-byte checks.
//! - [`processes`]: starting a real relay (control + dataplane) for tests
//!   and benchmarks.

pub mod client;
pub mod echo;
pub mod load;
pub mod processes;

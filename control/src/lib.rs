//! The control process of the MASQUE relay.
//!
//! Control is cold and trusted: it owns the configuration, the TLS
//! credentials, client authentication, the target policy and DNS
//! resolution. It creates the shared-memory channel, hands it to the
//! dataplane when the dataplane attaches, answers every CONNECT's
//! authorization ask, and serves `relayctl` on the admin socket.
//!
//! Non-goals here: forwarding packets (the dataplane does), and blocking the
//! dataplane (every answer is bounded in time; the dataplane fails closed on
//! its own if control is slow or gone).

pub mod acl;
pub mod admin;
pub mod auth;
pub mod config;
pub mod credentials;
pub mod fleet;
pub mod global_quota;
pub mod ippool;
pub mod logging;
pub mod metrics;
pub mod mtls;
pub mod policy;
pub mod privacy_pass;
pub mod qlog;
pub mod quota;
pub mod resolver;
pub mod server;
pub mod signer;
pub mod state;
pub mod store;
pub mod tickets;
pub mod token;
pub mod upstreams;

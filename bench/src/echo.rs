//! A UDP echo target (a [`Target`] in echo mode).

use std::io;
use std::net::SocketAddr;

use crate::target::{Target, TargetMode};

/// A running echo server; stops when dropped.
pub struct EchoServer {
    target: Target,
}

impl EchoServer {
    /// Binds `addr` (port 0 for any) and echoes every datagram.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self { target: Target::start(addr, TargetMode::Echo)? })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.target.addr()
    }

    /// Datagrams echoed so far.
    pub fn echoed(&self) -> u64 {
        self.target.stats().snapshot().2
    }
}

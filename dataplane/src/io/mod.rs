//! The boundary between a worker's protocol core and its I/O backend.
//!
//! The core ([`crate::worker::Worker`]) never touches a socket after it is
//! created: a backend delivers what arrived through [`Handler`] and, at the
//! end of every loop turn, performs what the core queued in its
//! [`Output`]: target sockets to watch or forget, GSO batches of QUIC
//! packets, and GSO batches of payloads for targets. Two backends implement
//! the loop: [`uring`] (io_uring, the default) and [`epoll`] (mio, for hosts
//! where io_uring is not allowed).

#[cfg(test)]
mod busy_core;
pub mod epoll;
pub mod output;
#[cfg(test)]
mod pause_core;
pub mod tun;
pub mod uring;

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Instant;

pub use output::{Endpoint, IoStats, Output, QuicBatch, TunOut, UpSend, Watch};

/// Names a target socket: chosen by the core, unique for the worker's life.
pub type TargetKey = u64;

/// Names a descriptor the core services itself (e.g. a bound UDP
/// socket): chosen by the core, unique for the worker's life, below 2^55.
pub type WatchKey = u64;

/// What a watched descriptor is ready for (edge-triggered: the core reads
/// or writes until the call would block, or remembers that it stopped
/// early).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    /// Readable, or at end of stream, or in error.
    pub readable: bool,
    /// Writable (a connect in progress completed), or in error.
    pub writable: bool,
}

/// Which doorbell rang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Control pushed records (answers, drain, kill).
    Answers,
    /// The worker's own bell: hand-offs from other workers, a new control
    /// link, or control going away.
    Worker,
}

/// What the loop does after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Wait for I/O until `deadline` (or not at all if it has passed).
    Continue {
        /// The core's next timer.
        deadline: Instant,
    },
    /// Perform the output one last time and return.
    Stop,
}

/// The protocol core as a backend sees it.
pub trait Handler {
    /// A loop turn starts: the one clock read of the turn.
    fn begin_turn(&mut self, now: Instant);
    /// QUIC packets arrived: `packets` holds `segment_size`-byte packets back
    /// to back (GRO; the last may be shorter). Decrypted in place.
    fn on_quic(&mut self, packets: &mut [u8], segment_size: usize, from: SocketAddr);
    /// Datagrams on an endpoint: `segment_size`-byte payloads back to back,
    /// from `from` (unconnected endpoints; `None` on connected ones).
    fn on_target(&mut self, key: TargetKey, from: Option<SocketAddr>, payloads: &[u8], segment_size: usize);
    /// The OS reported a target socket unusable (`errno` is ECONNREFUSED,
    /// EHOSTUNREACH or ENETUNREACH, from an ICMP Destination Unreachable).
    fn on_target_unreachable(&mut self, key: TargetKey, errno: i32) {
        let _ = (key, errno);
    }
    /// One read from the worker's TUN device (connect-ip): an IP packet,
    /// behind a virtio-net header when the device has offloads (then it
    /// may be a GSO packet standing for many).
    fn on_tun(&mut self, read: &mut [u8]) {
        let _ = read;
    }
    /// A watched descriptor ([`Output::watches`]) became ready.
    fn on_ready(&mut self, key: WatchKey, ready: Ready) {
        let _ = (key, ready);
    }
    /// A doorbell rang.
    fn on_wake(&mut self, wake: Wake);
    /// End of the turn: timers, connection output. Returns what to do next.
    fn end_turn(&mut self) -> Turn;
    /// What the core wants performed.
    fn output(&mut self) -> &mut Output;
    /// The doorbell control rings, and the link epoch it belongs to (the
    /// epoch changes when control is replaced; the descriptor number alone
    /// may be reused).
    fn answer_bell(&self) -> (RawFd, u64);
    /// The worker's own doorbell (never changes).
    fn worker_bell(&self) -> RawFd;
}

/// Which backend a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring: multishot receives into provided buffer rings, GSO sends
    /// as submissions, one `io_uring_enter` per turn.
    Uring,
    /// epoll (mio): GRO `recvmmsg`, GSO `sendmmsg`.
    Epoll,
}

impl BackendKind {
    /// The name used in config and logs.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Epoll => "epoll",
        }
    }

    /// The value of the `io_backend` gauge counter.
    pub fn gauge(self) -> u64 {
        match self {
            BackendKind::Uring => 1,
            BackendKind::Epoll => 2,
        }
    }
}

/// Whether `errno` on a connected UDP socket means the target is
/// unreachable (an ICMP Destination Unreachable), not a passing condition.
pub fn is_unreachable(errno: i32) -> bool {
    matches!(errno, libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
}

/// Largest number of receive operations (each up to 64 GRO segments) a
/// backend processes per socket per turn, so one busy socket cannot starve
/// the others, the timers or control's records.
pub const RECV_BUDGET: usize = 64;

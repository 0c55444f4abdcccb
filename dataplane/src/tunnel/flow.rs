//! A flow control allowed: its ID and identity for control, its target, and
//! the accounting every tunnel kind shares (traffic totals, idle timeout,
//! byte budget). Sans-IO.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_proto::channel::record::FlowClosed;

/// Per-flow traffic totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Datagrams (or packets) client -> target; 0 for byte streams.
    pub packets_up: u64,
    /// Payload bytes client -> target.
    pub bytes_up: u64,
    /// Datagrams target -> client; 0 for byte streams.
    pub packets_down: u64,
    /// Payload bytes target -> client.
    pub bytes_down: u64,
}

/// What control granted, and what the flow has carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Control's flow ID.
    pub flow_id: u64,
    /// Who opened it (control's quota key), reported to a restarted control.
    pub identity: String,
    /// The target address (unspecified for connect-ip and bound UDP).
    pub target: SocketAddr,
    /// Payload bytes (both ways) the flow may carry; 0: no limit.
    pub byte_budget: u64,
    idle_timeout: Duration,
    last_activity: Instant,
    /// What it carried.
    pub totals: Totals,
    /// An upstream flow's route name (empty for tunnels), reported to a
    /// restarted control.
    pub route: String,
}

impl Flow {
    /// A flow allowed at `now`.
    pub fn new(
        flow_id: u64,
        identity: String,
        target: SocketAddr,
        idle_timeout: Duration,
        byte_budget: u64,
        now: Instant,
    ) -> Self {
        Self {
            flow_id,
            identity,
            target,
            byte_budget,
            idle_timeout,
            last_activity: now,
            totals: Totals::default(),
            route: String::new(),
        }
    }

    /// One datagram of `len` bytes went to the target.
    pub fn up(&mut self, len: usize, now: Instant) {
        self.totals.packets_up += 1;
        self.totals.bytes_up += len as u64;
        self.last_activity = now;
    }

    /// One datagram of `len` bytes went to the client.
    pub fn down(&mut self, len: usize, now: Instant) {
        self.totals.packets_down += 1;
        self.totals.bytes_down += len as u64;
        self.last_activity = now;
    }

    /// A byte stream (classic CONNECT) moved `up` and `down` bytes.
    pub fn stream_bytes(&mut self, up: u64, down: u64, now: Instant) {
        self.totals.bytes_up += up;
        self.totals.bytes_down += down;
        self.last_activity = now;
    }

    /// Whether the flow has carried at least its byte budget (never when
    /// it has none).
    pub fn over_budget(&self) -> bool {
        self.byte_budget != 0 && self.totals.bytes_up + self.totals.bytes_down >= self.byte_budget
    }

    /// When the flow idles out if nothing moves.
    pub fn idle_deadline(&self) -> Instant {
        self.last_activity + self.idle_timeout
    }

    /// The report of the flow ending with its totals.
    pub fn closed(&self) -> FlowClosed {
        FlowClosed {
            flow_id: self.flow_id,
            packets_up: self.totals.packets_up,
            bytes_up: self.totals.bytes_up,
            packets_down: self.totals.packets_down,
            bytes_down: self.totals.bytes_down,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(budget: u64, now: Instant) -> Flow {
        Flow::new(7, "sub:a".into(), "127.0.0.1:9".parse().unwrap(), Duration::from_secs(30), budget, now)
    }

    #[test]
    fn byte_budget_counts_both_directions() {
        let now = Instant::now();
        let mut f = flow(1000, now);
        f.up(600, now);
        assert!(!f.over_budget());
        f.down(400, now);
        assert!(f.over_budget(), "600 up + 400 down reaches 1000");
        let mut unlimited = flow(0, now);
        unlimited.stream_bytes(1 << 40, 1 << 40, now);
        assert!(!unlimited.over_budget());
        let c = f.closed();
        assert_eq!((c.flow_id, c.packets_up, c.bytes_up, c.packets_down, c.bytes_down), (7, 1, 600, 1, 400));
    }

    #[test]
    fn activity_moves_the_idle_deadline() {
        let now = Instant::now();
        let mut f = flow(0, now);
        assert_eq!(f.idle_deadline(), now + Duration::from_secs(30));
        let later = now + Duration::from_secs(20);
        f.down(10, later);
        assert_eq!(f.idle_deadline(), later + Duration::from_secs(30));
    }
}

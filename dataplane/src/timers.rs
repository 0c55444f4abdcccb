//! A worker's timers: one min-heap for QUIC connection timeouts, TCP front
//! connection deadlines, tunnel deadlines (ask, connect, idle) and
//! signature deadlines, with lazy deletion.
//!
//! An entry is only a hint: when it comes due the worker checks whether the
//! connection's armed timeout or the tunnel's deadline still says so, and
//! ignores stale entries. Each connection keeps at most one armed entry
//! that counts (re-armed when quiche's timeout moves), each tunnel one; the
//! heap is compacted when stale entries pile up, so it stays proportional
//! to the live connections and tunnels.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// What a timer entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerTarget {
    /// An HTTP/3 connection's QUIC timeout (its key).
    H3Conn(u64),
    /// A TCP front connection's deadlines (handshake, idle, signature).
    FrontConn(u64),
    /// A tunnel's deadline (ask, connect or idle timeout).
    Tunnel(u64),
    /// A QUIC handshake signature's deadline (sign ID).
    Sign(u64),
}

/// The heap.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerTarget)>>,
}

impl Timers {
    /// An empty heap.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry.
    pub fn push(&mut self, at: Instant, target: TimerTarget) {
        self.heap.push(Reverse((at, target)));
    }

    /// The earliest entry's time.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Pops an entry due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerTarget)> {
        if self.next()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| e)
    }

    /// Entries (live and stale).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Drops the entries `keep` rejects (compaction of stale entries).
    pub fn retain(&mut self, mut keep: impl FnMut(Instant, TimerTarget) -> bool) {
        self.heap.retain(|Reverse((at, t))| keep(*at, *t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_time_order_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.push(t0 + Duration::from_millis(30), TimerTarget::H3Conn(3));
        t.push(t0 + Duration::from_millis(10), TimerTarget::Tunnel(4));
        t.push(t0 + Duration::from_millis(20), TimerTarget::H3Conn(2));
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(t.pop_due(t0), None);
        let due = t0 + Duration::from_millis(25);
        assert_eq!(t.pop_due(due).map(|e| e.1), Some(TimerTarget::Tunnel(4)));
        assert_eq!(t.pop_due(due).map(|e| e.1), Some(TimerTarget::H3Conn(2)));
        assert_eq!(t.pop_due(due), None);
        assert_eq!(t.len(), 1);
        t.retain(|_, target| target != TimerTarget::H3Conn(3));
        assert!(t.is_empty());
    }
}

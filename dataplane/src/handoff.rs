//! Cross-worker hand-off of QUIC packets.
//!
//! Every worker owns its connections. A packet that the kernel delivered to
//! another worker's socket (the client's NAT rebound, or the reuseport
//! steering program could not route it) is copied into the owner's bounded
//! inbox, and the owner's doorbell is rung once per turn. A full inbox drops
//! the packet (counted): QUIC recovers it like any loss.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crossbeam_queue::ArrayQueue;
use relay_channel::doorbell::Doorbell;

/// Packets waiting in one worker's inbox at most.
pub const INBOX_CAPACITY: usize = 4096;

/// A packet for another worker.
#[derive(Debug)]
pub struct Handoff {
    /// The QUIC packet as received.
    pub packet: Vec<u8>,
    /// The client address it came from.
    pub from: SocketAddr,
}

/// A worker's inbox: hand-offs from the other workers, and the worker's own
/// doorbell (also rung when control is replaced or goes away).
#[derive(Debug)]
pub struct Inbox {
    queue: ArrayQueue<Handoff>,
    /// Rung after pushing.
    pub bell: Doorbell,
}

impl Inbox {
    /// An empty inbox with a fresh doorbell.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { queue: ArrayQueue::new(INBOX_CAPACITY), bell: Doorbell::new()? })
    }

    /// Queues a packet; `false` if the inbox is full (the packet is dropped).
    /// The caller rings [`Inbox::bell`] once it has queued its batch.
    pub fn push(&self, handoff: Handoff) -> bool {
        self.queue.push(handoff).is_ok()
    }

    /// Takes the oldest packet.
    pub fn pop(&self) -> Option<Handoff> {
        self.queue.pop()
    }

    /// Whether packets are waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo() {
        let inbox = Inbox::new().unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for i in 0..INBOX_CAPACITY {
            assert!(inbox.push(Handoff { packet: vec![i as u8], from }));
        }
        assert!(!inbox.push(Handoff { packet: vec![0], from }), "full inbox refuses");
        assert_eq!(inbox.pop().unwrap().packet, vec![0]);
        assert_eq!(inbox.pop().unwrap().packet, vec![1]);
    }
}

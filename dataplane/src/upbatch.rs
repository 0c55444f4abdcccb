//! Payloads bound for one target, collected during one loop turn and sent
//! with a single GSO `sendmsg` (UDP_SEGMENT) on the tunnel's connected
//! socket.
//!
//! Nothing waits for a batch to fill: every batch is sent at the end of the
//! turn that filled it, so batching adds no queueing delay (RFC 9298
//! section 6: proxies "SHOULD NOT queue packets in order to increase
//! batching"); it only shares the system call among datagrams that are
//! already in hand.

use std::io;
use std::os::fd::AsRawFd;

use relay_udp::{GSO_ENABLED, MAX_GSO_BYTES, MAX_SEGMENTS};

/// A batch of equal-size payloads (the last may be shorter).
#[derive(Debug)]
pub struct UpBatch {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
}

/// What a send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub datagrams: u64,
    /// Datagrams refused (full buffer, unreachable, too big): dropped.
    pub dropped: u64,
    /// System calls made.
    pub syscalls: u64,
    /// Payload bytes the kernel took.
    pub bytes: u64,
}

impl UpBatch {
    /// An empty batch writing into `buf` (reused across turns).
    pub fn new(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self { buf, segment: 0, count: 0, closed: false }
    }

    /// Whether `len` bytes can join this batch.
    pub fn fits(&self, len: usize) -> bool {
        self.count == 0
            || (!self.closed
                && self.count < MAX_SEGMENTS
                && len <= self.segment
                && self.buf.len() + len <= MAX_GSO_BYTES
                && GSO_ENABLED.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Adds a payload; the caller checked [`UpBatch::fits`].
    pub fn push(&mut self, payload: &[u8]) {
        if self.count == 0 {
            self.segment = payload.len().max(1);
        } else if payload.len() < self.segment {
            self.closed = true; // a short segment must be the last
        }
        self.buf.extend_from_slice(payload);
        self.count += 1;
    }

    /// Number of payloads waiting.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sends everything on the connected `sock` and empties the batch.
    pub fn send(&mut self, sock: &impl AsRawFd) -> Sent {
        let mut sent = Sent::default();
        if self.count == 0 {
            return sent;
        }
        let single = self.count == 1 || self.segment == 0;
        let seg = if single { self.buf.len() } else { self.segment };
        sent.syscalls += 1;
        match relay_udp::send_segments(sock, &self.buf, seg, None) {
            Ok(_) => {
                sent.datagrams = self.count as u64;
                sent.bytes = self.buf.len() as u64;
            }
            Err(e) if !single && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                // The device cannot segment: never try again, send singly.
                GSO_ENABLED.store(false, std::sync::atomic::Ordering::Relaxed);
                for chunk in self.buf.chunks(self.segment) {
                    sent.syscalls += 1;
                    match relay_udp::send_segments(sock, chunk, chunk.len(), None) {
                        Ok(_) => {
                            sent.datagrams += 1;
                            sent.bytes += chunk.len() as u64;
                        }
                        Err(_) => sent.dropped += 1,
                    }
                }
            }
            // UDP semantics: a full buffer, an ICMP error from an earlier
            // datagram or an oversize payload (DF set) drops the datagrams.
            Err(e) if is_drop(&e) => sent.dropped = self.count as u64,
            Err(_) => sent.dropped = self.count as u64,
        }
        self.buf.clear();
        self.count = 0;
        self.segment = 0;
        self.closed = false;
        sent
    }

    /// Gives the buffer back for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

fn is_drop(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
        || matches!(e.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::ECONNREFUSED) | Some(libc::EMSGSIZE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn a_turns_payloads_leave_in_one_send_and_arrive_separately() {
        let target = UdpSocket::bind("127.0.0.1:0").unwrap();
        target.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(target.local_addr().unwrap()).unwrap();
        let mut b = UpBatch::new(Vec::new());
        for i in 0..10u8 {
            assert!(b.fits(100));
            b.push(&[i; 100]);
        }
        assert!(b.fits(40));
        b.push(&[99; 40]);
        assert!(!b.fits(40), "nothing may follow a short segment");
        let sent = b.send(&sock);
        assert_eq!(sent, Sent { datagrams: 11, dropped: 0, syscalls: 1, bytes: 1040 });
        assert!(b.is_empty());
        let mut buf = [0u8; 200];
        for i in 0..10u8 {
            let n = target.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 100][..]);
        }
        assert_eq!(target.recv(&mut buf).unwrap(), 40);
    }

    #[test]
    fn limits() {
        let mut b = UpBatch::new(Vec::new());
        b.push(&[0; 1000]);
        assert!(!b.fits(1001), "larger than the segment");
        for _ in 1..MAX_SEGMENTS.min(65) {
            if b.fits(1000) {
                b.push(&[0; 1000]);
            }
        }
        assert!(b.len() <= MAX_SEGMENTS && b.len() * 1000 <= MAX_GSO_BYTES);
        assert!(!b.fits(1000));
    }
}

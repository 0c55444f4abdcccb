//! Payloads bound for one target, collected during one loop turn and sent
//! by the I/O backend as one GSO send (UDP_SEGMENT) on the tunnel's
//! connected socket.
//!
//! Nothing waits for a batch to fill: every batch is sent at the end of the
//! turn that filled it, so batching adds no queueing delay (RFC 9298
//! section 6: proxies "SHOULD NOT queue packets in order to increase
//! batching"); it only shares the system call among datagrams that are
//! already in hand.

use relay_udp::{MAX_GSO_BYTES, MAX_SEGMENTS};

/// A batch of equal-size payloads (the last may be shorter).
#[derive(Debug)]
pub struct UpBatch {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl UpBatch {
    /// An empty batch writing into `buf` (reused across turns).
    pub fn new(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self { buf, segment: 0, count: 0, closed: false }
    }

    /// Whether `len` bytes can join this batch; `gso` says whether the
    /// kernel segments batches (without it every payload is its own send).
    pub fn fits(&self, len: usize, gso: bool) -> bool {
        // Empty payloads travel alone: a GSO segment cannot be empty.
        self.count == 0
            || (gso
                && len > 0
                && self.segment > 0
                && !self.closed
                && self.count < MAX_SEGMENTS
                && len <= self.segment
                && self.buf.len() + len <= MAX_GSO_BYTES)
    }

    /// Adds a payload; the caller checked [`UpBatch::fits`].
    pub fn push(&mut self, payload: &[u8]) {
        if self.count == 0 {
            self.segment = payload.len();
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

    /// The payloads back to back, the segment size, and their number.
    pub fn into_parts(self) -> (Vec<u8>, usize, usize) {
        let segment = if self.count <= 1 { self.buf.len() } else { self.segment };
        (self.buf, segment, self.count)
    }

    /// Gives the buffer back for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turns_payloads_share_one_batch() {
        let mut b = UpBatch::new(Vec::new());
        for i in 0..10u8 {
            assert!(b.fits(100, true));
            b.push(&[i; 100]);
        }
        assert!(b.fits(40, true));
        b.push(&[99; 40]);
        assert!(!b.fits(40, true), "nothing may follow a short segment");
        assert_eq!(b.len(), 11);
        let (buf, segment, count) = b.into_parts();
        assert_eq!((buf.len(), segment, count), (1040, 100, 11));
        assert_eq!(&buf[..100], &[0; 100][..]);
        let mut single = UpBatch::new(Vec::new());
        single.push(&[1; 7]);
        assert!(!single.fits(7, false), "without GSO a batch holds one payload");
        assert_eq!(single.into_parts().1, 7);
        let mut empty = UpBatch::new(Vec::new());
        empty.push(&[]);
        assert!(!empty.fits(0, true) && !empty.fits(5, true), "an empty payload travels alone");
        assert_eq!(empty.into_parts(), (Vec::new(), 0, 1));
    }

    #[test]
    fn limits() {
        let mut b = UpBatch::new(Vec::new());
        b.push(&[0; 1000]);
        assert!(!b.fits(1001, true), "larger than the segment");
        for _ in 1..MAX_SEGMENTS.min(65) {
            if b.fits(1000, true) {
                b.push(&[0; 1000]);
            }
        }
        assert!(b.len() <= MAX_SEGMENTS && b.len() * 1000 <= MAX_GSO_BYTES);
        assert!(!b.fits(1000, true));
    }
}

//! Buffers for QUIC DATAGRAM frames, recycled per worker thread.
//!
//! Every downloaded HTTP datagram becomes one DATAGRAM frame that quiche
//! queues as an owned buffer and drops once the frame is in a packet. A
//! frame of a 1200-byte payload is larger than what glibc's per-thread
//! cache serves (1,032 bytes), so each one cost a trip through the
//! allocator's bins, about 500 instructions allocated and freed
//! (`cargo xtask instr`, docs/BENCHMARKS.md "Instructions per datagram").
//! [`RelayBufs`] gives quiche [`DgramBuf`]s instead: a buffer of
//! [`CAPACITY`] bytes goes back to this thread's free list when quiche
//! drops it, and [`take`] hands it out again. The list holds at most
//! [`FREE_LIMIT`] buffers; past that, and for buffers of any other size
//! (frames quiche parsed from the client, of their exact length), dropping
//! frees as before.

use std::cell::RefCell;

use crate::quic::{DGRAM_QUEUE, MAX_SEND_UDP_PAYLOAD};

/// Capacity of a recycled buffer: room for any DATAGRAM frame the relay
/// sends (a frame fits in one of its QUIC packets).
pub const CAPACITY: usize = MAX_SEND_UDP_PAYLOAD;
/// Most buffers one thread keeps for reuse (one connection's DATAGRAM
/// queue; about 5.5 MB).
pub const FREE_LIMIT: usize = DGRAM_QUEUE;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for `len` bytes: a recycled one when `len`
/// fits [`CAPACITY`] and the thread has one.
pub fn take(len: usize) -> Vec<u8> {
    if len > CAPACITY {
        return Vec::with_capacity(len);
    }
    FREE.try_with(|free| free.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(CAPACITY))
}

/// Keeps `buf` for [`take`] if it is one of ours and the list has room
/// (and still exists: a buffer dropped while the thread tears down its
/// locals is simply freed).
fn recycle(mut buf: Vec<u8>) {
    if buf.capacity() != CAPACITY {
        return;
    }
    let _ = FREE.try_with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < FREE_LIMIT {
            buf.clear();
            free.push(buf);
        }
    });
}

/// Buffers on this thread's free list (tests, metrics).
pub fn free_buffers() -> usize {
    FREE.try_with(|free| free.borrow().len()).unwrap_or(0)
}

/// A DATAGRAM frame's bytes as quiche holds them; recycled when dropped.
#[derive(Debug, Default)]
pub struct DgramBuf(Vec<u8>);

impl AsRef<[u8]> for DgramBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for DgramBuf {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl Drop for DgramBuf {
    fn drop(&mut self) {
        // Frames quiche parsed from the client have their exact length:
        // they are freed as any Vec, without a look at the list.
        if self.0.capacity() == CAPACITY {
            recycle(std::mem::take(&mut self.0));
        }
    }
}

/// quiche's buffer factory for the relay's connections: stream data as
/// quiche's default keeps it (shared immutable buffers, here `Bytes`),
/// DATAGRAM frames in [`DgramBuf`]s.
#[derive(Debug, Clone, Default)]
pub struct RelayBufs;

impl quiche::BufFactory for RelayBufs {
    type Buf = bytes::Bytes;
    type DgramBuf = DgramBuf;

    fn buf_from_slice(buf: &[u8]) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(buf)
    }

    fn dgram_buf_from_slice(buf: &[u8]) -> DgramBuf {
        let mut v = take(buf.len());
        v.extend_from_slice(buf);
        DgramBuf(v)
    }
}

#[cfg(test)]
mod tests {
    use quiche::BufFactory;

    use super::*;

    /// Empties this thread's list (tests share threads with other tests).
    fn drain() {
        FREE.with(|free| free.borrow_mut().clear());
    }

    #[test]
    fn a_dropped_frame_buffer_is_handed_out_again_empty() {
        drain();
        let mut v = take(1210);
        assert_eq!(v.capacity(), CAPACITY);
        v.extend_from_slice(&[7; 1210]);
        let ptr = v.as_ptr();
        drop(DgramBuf::from(v));
        assert_eq!(free_buffers(), 1);
        let again = take(100);
        assert_eq!(again.as_ptr(), ptr, "the same allocation");
        assert!(again.is_empty());
        assert_eq!(free_buffers(), 0);
    }

    #[test]
    fn buffers_of_other_sizes_are_freed_not_kept() {
        drain();
        drop(DgramBuf::from(vec![1u8; 64]));
        drop(DgramBuf::from(Vec::with_capacity(CAPACITY * 2)));
        assert_eq!(free_buffers(), 0);
        let big = take(CAPACITY + 1);
        assert!(big.capacity() > CAPACITY);
        drop(DgramBuf::from(big));
        assert_eq!(free_buffers(), 0);
    }

    #[test]
    fn the_free_list_is_bounded() {
        drain();
        let bufs: Vec<_> = (0..FREE_LIMIT + 10).map(|_| DgramBuf::from(take(CAPACITY))).collect();
        drop(bufs);
        assert_eq!(free_buffers(), FREE_LIMIT);
        drain();
    }

    #[test]
    fn quiche_copies_a_slice_into_a_recycled_buffer() {
        drain();
        let b = RelayBufs::dgram_buf_from_slice(b"payload");
        assert_eq!(b.as_ref(), b"payload");
        drop(b);
        assert_eq!(free_buffers(), 1);
        assert_eq!(RelayBufs::buf_from_slice(b"stream").as_ref(), b"stream");
        drain();
    }
}

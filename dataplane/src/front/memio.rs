//! The byte pipe an HTTP/2 connection (the `h2` crate) runs on, and the
//! waker it is polled with: no async runtime, no socket.
//!
//! The front hands the connection's plaintext input in ([`MemIo::feed`]),
//! polls the h2 state machine, and takes its output
//! ([`MemIo::take_output`]). Reading an empty pipe is `Pending` and writing
//! past the output bound is `Pending`: h2 then simply stops, and the front
//! polls again when it has fed more input or drained the output. The
//! waker only records that h2 asked to be polled again ([`FlagWaker`]);
//! everything runs on the worker's thread, so the front checks the flag
//! after each round of polls.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug, Default)]
struct Pipe {
    input: Vec<u8>,
    read: usize,
    eof: bool,
    output: Vec<u8>,
    output_limit: usize,
}

/// One connection's pipe (cheap to clone: both ends share it).
#[derive(Debug, Clone)]
pub struct MemIo {
    pipe: Arc<Mutex<Pipe>>,
}

impl MemIo {
    /// A pipe whose output holds at most `output_limit` bytes before
    /// writes wait.
    pub fn new(output_limit: usize) -> Self {
        Self { pipe: Arc::new(Mutex::new(Pipe { output_limit, ..Pipe::default() })) }
    }

    fn lock(&self) -> MutexGuard<'_, Pipe> {
        // Only this worker's thread uses the pipe: a poisoned lock means a
        // panic elsewhere in this thread, and the data is still plain bytes.
        self.pipe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands in plaintext from the client.
    pub fn feed(&self, data: &[u8]) {
        let mut p = self.lock();
        if p.read == p.input.len() {
            p.input.clear();
            p.read = 0;
        }
        p.input.extend_from_slice(data);
    }

    /// Hands in plaintext from the client by taking `data`'s buffer when
    /// h2 has read everything before (no copy; `data` is left empty with
    /// the pipe's old buffer), by appending it otherwise.
    pub fn feed_vec(&self, data: &mut Vec<u8>) {
        let mut p = self.lock();
        if p.read == p.input.len() {
            p.input.clear();
            p.read = 0;
            std::mem::swap(&mut p.input, data);
        } else {
            p.input.extend_from_slice(data);
            data.clear();
        }
    }

    /// The client's stream ended.
    pub fn feed_eof(&self) {
        self.lock().eof = true;
    }

    /// Input not yet read by h2.
    pub fn input_backlog(&self) -> usize {
        let p = self.lock();
        p.input.len() - p.read
    }

    /// Takes what h2 wrote.
    pub fn take_output(&self, into: &mut Vec<u8>) {
        let mut p = self.lock();
        if into.is_empty() {
            std::mem::swap(into, &mut p.output);
        } else {
            into.extend_from_slice(&p.output);
            p.output.clear();
        }
    }

    /// Whether h2 wrote anything not yet taken.
    pub fn has_output(&self) -> bool {
        !self.lock().output.is_empty()
    }
}

impl AsyncRead for MemIo {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut p = self.lock();
        let start = p.read;
        let left = p.input.len() - start;
        if left == 0 {
            // End of stream reads as zero bytes; otherwise wait (the front
            // polls again after feeding).
            return if p.eof { Poll::Ready(Ok(())) } else { Poll::Pending };
        }
        let n = left.min(buf.remaining());
        buf.put_slice(&p.input[start..start + n]);
        p.read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MemIo {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut p = self.lock();
        let room = p.output_limit.saturating_sub(p.output.len());
        if room == 0 {
            return Poll::Pending;
        }
        let n = room.min(data.len());
        p.output.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A waker that only raises a flag.
#[derive(Debug, Default)]
pub struct FlagWaker {
    woken: AtomicBool,
}

impl FlagWaker {
    /// A waker and its flag.
    pub fn new() -> (Arc<Self>, Waker) {
        let flag = Arc::new(Self::default());
        let waker = Waker::from(flag.clone());
        (flag, waker)
    }

    /// Whether a wake came since the last call (and clears it).
    pub fn take(&self) -> bool {
        self.woken.swap(false, Ordering::Relaxed)
    }
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.woken.store(true, Ordering::Relaxed);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wait_for_input_and_writes_for_room() {
        let io = MemIo::new(4);
        let (flag, waker) = FlagWaker::new();
        let mut cx = Context::from_waker(&waker);
        let mut storage = [0u8; 8];
        let mut buf = ReadBuf::new(&mut storage);
        let mut r = io.clone();
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut buf).is_pending());
        io.feed(b"abc");
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut buf).is_ready());
        assert_eq!(buf.filled(), b"abc");
        assert_eq!(io.input_backlog(), 0);
        let mut w = io.clone();
        assert!(matches!(Pin::new(&mut w).poll_write(&mut cx, b"123456"), Poll::Ready(Ok(4))));
        assert!(Pin::new(&mut w).poll_write(&mut cx, b"7").is_pending());
        let mut out = Vec::new();
        io.take_output(&mut out);
        assert_eq!(out, b"1234");
        assert!(!io.has_output());
        io.feed_eof();
        let mut buf = ReadBuf::new(&mut storage);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut buf).is_ready());
        assert!(buf.filled().is_empty(), "end of stream reads as zero bytes");
        assert!(!flag.take());
        waker.wake_by_ref();
        assert!(flag.take());
        assert!(!flag.take());
    }
}

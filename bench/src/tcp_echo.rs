//! A TCP echo target for the TCP CONNECT tests: every connection gets its
//! bytes back, and the server's FIN after the client's (a half-close
//! passed on through the relay comes back as one).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections served at once at most (each has a thread).
const MAX_CONNECTIONS: u64 = 256;

/// A deterministic byte pattern of `n` bytes for transfers checked byte for
/// byte.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

/// A running TCP echo server; stops when dropped.
pub struct TcpEcho {
    acceptor: Acceptor,
    echoed: Arc<AtomicU64>,
}

/// A thread accepting TCP connections, each served on a thread of its own
/// (at most [`MAX_CONNECTIONS`] at once; more are dropped), until dropped.
/// The servers of the bench's TCP and WebSocket echoes run on it.
pub struct Acceptor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Binds `addr` (port 0 for any) and hands every connection to
    /// `serve` with the stop flag, which a server polls to end when the
    /// acceptor is dropped.
    pub fn start<F>(addr: SocketAddr, serve: F) -> io::Result<Self>
    where
        F: Fn(TcpStream, &AtomicBool) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (st, acc, serve) = (stop.clone(), accepted.clone(), Arc::new(serve));
        let thread = std::thread::spawn(move || {
            let live = Arc::new(AtomicU64::new(0));
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) if live.load(Ordering::Relaxed) < MAX_CONNECTIONS => {
                        let _ = s.set_nonblocking(false);
                        acc.fetch_add(1, Ordering::Relaxed);
                        live.fetch_add(1, Ordering::Relaxed);
                        let (l, st2, serve) = (live.clone(), st.clone(), serve.clone());
                        std::thread::spawn(move || {
                            serve(s, &st2);
                            l.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Ok(_) => {} // over the bound: dropped
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Self { addr, stop, accepted, thread: Some(thread) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: TcpStream, echoed: &AtomicU64, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                echoed.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

impl TcpEcho {
    /// Binds `addr` (port 0 for any) and echoes.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        let echoed = Arc::new(AtomicU64::new(0));
        let counter = echoed.clone();
        let acceptor = Acceptor::start(addr, move |s, stop| serve(s, &counter, stop))?;
        Ok(Self { acceptor, echoed })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.acceptor.accepted()
    }

    /// Bytes echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

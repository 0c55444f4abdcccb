//! UDP targets for tests and benchmarks, on real sockets with GRO receives
//! and GSO sends so the target is never the bottleneck.
//!
//! * `Echo`: every datagram goes back to its sender.
//! * `Sink`: datagrams are counted and dropped.
//! * `Source`: every peer that sends a datagram (the relay's per-tunnel
//!   socket, or a direct client) is registered, and the target then sends
//!   it datagrams of a fixed size, as fast as the socket takes them or at a
//!   fixed rate per peer, until stopped.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use relay_udp::{MAX_GRO_BUFFER, SegmentBatcher};

/// Most peers a source target serves.
pub const MAX_SOURCE_PEERS: usize = 4096;

/// What a target does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetMode {
    /// Echo every datagram.
    Echo,
    /// Count and drop.
    Sink,
    /// Send `size`-byte datagrams to every peer that said hello, at
    /// `rate_per_peer` datagrams/s (or as fast as possible when `None`).
    Source {
        /// Payload size.
        size: usize,
        /// Per-peer rate.
        rate_per_peer: Option<f64>,
    },
}

impl TargetMode {
    /// A source sending `size`-byte datagrams at `rate` datagrams/s in
    /// total, shared evenly by `tunnels` tunnels (each says hello from its
    /// own relay socket, so each is a peer).
    pub fn paced_source(size: usize, rate: f64, tunnels: usize) -> Self {
        TargetMode::Source { size, rate_per_peer: Some(rate / tunnels.max(1) as f64) }
    }
}

/// Live counters of a target.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Payload bytes received.
    pub received_bytes: AtomicU64,
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Payload bytes sent.
    pub sent_bytes: AtomicU64,
    /// Receive system calls that returned data.
    pub recv_calls: AtomicU64,
    /// Datagrams the kernel refused to send (full buffer): dropped.
    pub send_drops: AtomicU64,
}

impl TargetStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot: (received, received_bytes, sent, sent_bytes).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.received_bytes.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
            self.sent_bytes.load(Ordering::Relaxed),
        )
    }
}

/// A running target; stops when dropped.
pub struct Target {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    stats: Arc<TargetStats>,
    handle: Option<JoinHandle<()>>,
}

fn socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    let s2 = socket2::SockRef::from(&sock);
    let _ = s2.set_recv_buffer_size(8 << 20);
    let _ = s2.set_send_buffer_size(8 << 20);
    let _ = relay_udp::enable_gro(&sock);
    Ok(sock)
}

impl Target {
    /// Binds `addr` and runs `mode` on a background thread.
    pub fn start(addr: SocketAddr, mode: TargetMode) -> io::Result<Self> {
        Self::start_in(None, addr, mode)
    }

    /// Like [`Target::start`], with the socket created inside network
    /// namespace `netns` (see [`crate::netns`]).
    pub fn start_in(netns: Option<&str>, addr: SocketAddr, mode: TargetMode) -> io::Result<Self> {
        let sock = match netns {
            None => socket(addr)?,
            Some(ns) => {
                // Create the socket on a helper thread that enters the
                // namespace; the socket stays in it for its lifetime.
                let ns = ns.to_string();
                std::thread::spawn(move || {
                    crate::netns::TargetNetns::enter(&ns)?;
                    socket(addr)
                })
                .join()
                .map_err(|_| io::Error::other("namespace thread panicked"))??
            }
        };
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(TargetStats::default());
        let (stop2, paused2, stats2) = (stop.clone(), paused.clone(), stats.clone());
        let handle = std::thread::Builder::new().name(format!("udp-target-{mode:?}")).spawn(move || {
            let r = match mode {
                TargetMode::Echo | TargetMode::Sink => {
                    receive_loop(&sock, mode == TargetMode::Echo, &stop2, &stats2)
                }
                TargetMode::Source { size, rate_per_peer } => {
                    source_loop(&sock, size, rate_per_peer, &stop2, &paused2, &stats2)
                }
            };
            if let Err(e) = r {
                eprintln!("udp target stopped: {e}");
            }
        })?;
        Ok(Self { addr, stop, paused, stats, handle: Some(handle) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Live counters.
    pub fn stats(&self) -> &TargetStats {
        &self.stats
    }

    /// Pauses or resumes a source (registered peers are kept).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn receive_loop(sock: &UdpSocket, echo: bool, stop: &AtomicBool, stats: &TargetStats) -> io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut buf = vec![0u8; MAX_GRO_BUFFER];
    let mut batch = SegmentBatcher::new(65_535);
    while !stop.load(Ordering::Relaxed) {
        let r = match relay_udp::recv_segments(sock, &mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
            Err(e) => return Err(e),
        };
        TargetStats::add(&stats.recv_calls, 1);
        TargetStats::add(&stats.received, r.segments() as u64);
        TargetStats::add(&stats.received_bytes, r.len as u64);
        if echo {
            let before = (batch.datagrams, batch.dropped);
            for d in relay_udp::split(&buf[..r.len], r.segment_size) {
                batch.push(sock, r.from, d)?;
            }
            batch.flush(sock)?;
            TargetStats::add(&stats.sent, batch.datagrams - before.0);
            TargetStats::add(&stats.sent_bytes, r.len as u64);
            TargetStats::add(&stats.send_drops, batch.dropped - before.1);
        }
    }
    Ok(())
}

fn source_loop(
    sock: &UdpSocket,
    size: usize,
    rate_per_peer: Option<f64>,
    stop: &AtomicBool,
    paused: &AtomicBool,
    stats: &TargetStats,
) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    let mut buf = vec![0u8; MAX_GRO_BUFFER];
    let payload = vec![0x5au8; size];
    let mut peers: Vec<(SocketAddr, Instant, u64)> = Vec::new();
    let mut batch = SegmentBatcher::new(size.max(1));
    while !stop.load(Ordering::Relaxed) {
        // Register new peers.
        loop {
            match relay_udp::recv_segments(sock, &mut buf) {
                Ok(r) => {
                    TargetStats::add(&stats.received, r.segments() as u64);
                    TargetStats::add(&stats.received_bytes, r.len as u64);
                    if peers.len() < MAX_SOURCE_PEERS && !peers.iter().any(|p| p.0 == r.from) {
                        peers.push((r.from, Instant::now(), 0));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => break,
                Err(e) => return Err(e),
            }
        }
        if peers.is_empty() || paused.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut sent_any = false;
        for (peer, started, sent) in peers.iter_mut() {
            let due = match rate_per_peer {
                Some(r) => crate::stats::paced_budget(r, started.elapsed()).saturating_sub(*sent).min(64),
                None => 64,
            };
            let before = (batch.datagrams, batch.dropped);
            for _ in 0..due {
                batch.push(sock, *peer, &payload)?;
            }
            batch.flush(sock)?;
            let ok = batch.datagrams - before.0;
            *sent += ok + (batch.dropped - before.1);
            TargetStats::add(&stats.sent, ok);
            TargetStats::add(&stats.sent_bytes, ok * size as u64);
            TargetStats::add(&stats.send_drops, batch.dropped - before.1);
            sent_any |= due > 0;
        }
        if rate_per_peer.is_some() {
            // Paced: send what is due once per tick, as one GSO batch per
            // peer. Checking continuously sent one or two datagrams per
            // system call and cost the source ~2 us per datagram on the
            // core it shares with the QUIC client, which then limited
            // every paced download probe.
            std::thread::sleep(SOURCE_TICK);
        } else if !sent_any {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(())
}

/// How often a paced source sends what is due (plus the timer's slack).
const SOURCE_TICK: Duration = Duration::from_micros(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_sink_and_source() {
        let echo = Target::start("127.0.0.1:0".parse().unwrap(), TargetMode::Echo).unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.send_to(b"ping", echo.addr()).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");

        let sink = Target::start("127.0.0.1:0".parse().unwrap(), TargetMode::Sink).unwrap();
        for _ in 0..10 {
            c.send_to(&[0; 100], sink.addr()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while sink.stats().snapshot().0 < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.stats().snapshot().0, 10);
        assert_eq!(sink.stats().snapshot().1, 1000);

        let source = Target::start(
            "127.0.0.1:0".parse().unwrap(),
            TargetMode::Source { size: 200, rate_per_peer: Some(1000.0) },
        )
        .unwrap();
        c.send_to(b"hello", source.addr()).unwrap();
        let mut got = 0;
        let start = Instant::now();
        while got < 50 {
            let (n, from) = c.recv_from(&mut buf[..]).map(|(n, f)| (n.min(64), f)).unwrap();
            assert_eq!(from, source.addr());
            assert!(n > 0);
            got += 1;
        }
        // 50 datagrams at 1000/s take about 50 ms: pacing works.
        assert!(start.elapsed() >= Duration::from_millis(30), "{:?}", start.elapsed());
    }
}

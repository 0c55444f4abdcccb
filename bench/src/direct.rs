//! The baseline: the same load straight from UDP sockets to the target,
//! without the relay. It is the ceiling the relay is compared with.

use std::io;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use relay_udp::{MAX_GRO_BUFFER, SegmentBatcher};

use crate::loadgen::{self, CpuMark, Direction, LoadResult, LoadSpec, RunCounts};
use crate::stats;
use crate::target::Target;

struct Flow {
    sock: UdpSocket,
    sent: u64,
}

/// Runs `spec` from `connections * flows_per_connection` plain UDP sockets
/// to `target`.
pub fn run(target: &Target, spec: &LoadSpec) -> Result<LoadResult> {
    let n = spec.connections * spec.flows_per_connection;
    if n == 0 || spec.size < 20 {
        bail!("need at least one flow and 20-byte payloads");
    }
    let mut flows = Vec::with_capacity(n);
    for _ in 0..n {
        let any: std::net::SocketAddr =
            if target.addr().is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let sock = UdpSocket::bind(any)?;
        sock.set_nonblocking(true)?;
        let s2 = socket2::SockRef::from(&sock);
        let _ = s2.set_recv_buffer_size(8 << 20);
        let _ = s2.set_send_buffer_size(8 << 20);
        let _ = relay_udp::enable_gro(&sock);
        flows.push(Flow { sock, sent: 0 });
    }
    let dest = target.addr();
    let per_flow_rate = spec.rate.map(|r| r / n as f64);
    let mut payload = vec![0u8; spec.size];
    let mut buf = vec![0u8; MAX_GRO_BUFFER];
    let mut batch = SegmentBatcher::new(spec.size);
    let mut hist = stats::latency_histogram();
    let (t_recv0, _, t_sent0, _) = target.stats().snapshot();
    let start = Instant::now();
    let window_start = start + spec.warmup;
    let window_end = window_start + spec.duration;
    let mut received = 0u64;
    let mut cpu_start: Option<CpuMark> = None;
    let mut snap: Option<(u64, u64, u64, Instant)> = None;
    if spec.direction == Direction::Download {
        for f in &flows {
            f.sock.send_to(b"hello", dest)?;
        }
    }
    let delivered_now = |received: u64, target: &Target| match spec.direction {
        Direction::Upload => target.stats().snapshot().0 - t_recv0,
        _ => received,
    };
    loop {
        let now = Instant::now();
        // As in the relay's load generator: the window closes only once it
        // has opened, however late a turn on a busy machine ends.
        if now >= window_end && snap.is_some() {
            break;
        }
        for f in flows.iter_mut() {
            if spec.direction != Direction::Download {
                let budget = match per_flow_rate {
                    Some(r) => stats::paced_budget(r, now - start).saturating_sub(f.sent).min(64),
                    None => 64,
                };
                let before = batch.datagrams + batch.dropped;
                for i in 0..budget {
                    payload[..8].copy_from_slice(&(f.sent + i).to_be_bytes());
                    payload[8..16].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
                    batch.push(&f.sock, dest, &payload)?;
                }
                batch.flush(&f.sock)?;
                f.sent += batch.datagrams + batch.dropped - before;
            }
            loop {
                match relay_udp::recv_segments(&f.sock, &mut buf) {
                    Ok(r) => {
                        let in_window = Instant::now() >= window_start;
                        for d in relay_udp::split(&buf[..r.len], r.segment_size) {
                            received += 1;
                            if spec.direction == Direction::Echo && in_window && d.len() >= 16 {
                                let t = u64::from_be_bytes(d[8..16].try_into().expect("8 bytes"));
                                let rtt = (start.elapsed().as_nanos() as u64).saturating_sub(t) / 1000;
                                let _ = hist.record(rtt.max(1));
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if snap.is_none() && Instant::now() >= window_start {
            let sent = flows.iter().map(|f| f.sent).sum();
            snap = Some((sent, delivered_now(received, target), target.stats().snapshot().2, Instant::now()));
            cpu_start = Some(CpuMark::now(&[]));
        }
    }
    let cpu = cpu_start.map(|s| s.shares(&CpuMark::now(&[]), loadgen::bench_cores())).unwrap_or_default();
    let end = (
        flows.iter().map(|f| f.sent).sum::<u64>(),
        delivered_now(received, target),
        target.stats().snapshot().2,
        Instant::now(),
    );
    let Some((s0, d0, ts0, at0)) = snap else { bail!("the measurement window never started") };
    let w_sent = if spec.direction == Direction::Download { end.2 - ts0 } else { end.0 - s0 };
    let (w_delivered, w_elapsed) = (end.1 - d0, end.3 - at0);
    if spec.direction == Direction::Download {
        target.set_paused(true);
    }
    // Drain.
    let drain_end = Instant::now() + Duration::from_millis(200);
    while Instant::now() < drain_end {
        for f in &flows {
            while let Ok(r) = relay_udp::recv_segments(&f.sock, &mut buf) {
                received += r.segments() as u64;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (t_recv, _, t_sent, _) = target.stats().snapshot();
    let (sent, delivered) = match spec.direction {
        Direction::Upload => (flows.iter().map(|f| f.sent).sum::<u64>(), t_recv - t_recv0),
        Direction::Echo => (flows.iter().map(|f| f.sent).sum::<u64>(), received),
        Direction::Download => (t_sent - t_sent0, received),
    };
    let counts = RunCounts {
        sent,
        delivered,
        window_sent: w_sent,
        window_delivered: w_delivered,
        window: w_elapsed,
        packets_per_send: stats::ratio(batch.datagrams, batch.syscalls),
        // The direct path's receive batching is not measured.
        packets_per_recv: 0.0,
        cpu,
    };
    LoadResult::from_counts(spec, counts, hist)
}

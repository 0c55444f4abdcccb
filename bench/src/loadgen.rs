//! The connect-udp load generator: N connections x M tunnels, a payload
//! size, an offered rate (or as fast as QUIC allows), a warm-up and a
//! measurement window, in one of three directions.
//!
//! Counts come from both ends: what the client handed to QUIC and what the
//! target received (upload); what the source target sent and what the
//! client received (download); round trips (echo). Loss is computed from
//! run totals after a drain period, rates over the measurement window.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Client, ClientConfig};
use crate::stats::{self, Percentiles, Rate};
use crate::target::Target;

/// Which way the payload flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client -> target (sink).
    Upload,
    /// Source target -> client.
    Download,
    /// Client -> echo target -> client, with round-trip times.
    Echo,
}

/// A load to generate.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSpec {
    /// QUIC connections.
    pub connections: usize,
    /// Tunnels per connection.
    pub flows_per_connection: usize,
    /// UDP payload size.
    pub size: usize,
    /// Direction.
    pub direction: Direction,
    /// Offered datagrams/s over all tunnels; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Warm-up before measuring.
    pub warmup: Duration,
    /// Measurement window.
    pub duration: Duration,
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// The load.
    pub spec: LoadSpec,
    /// Datagrams handed to the path by the sending side, whole run.
    pub sent: u64,
    /// Datagrams that arrived at the receiving side, whole run.
    pub delivered: u64,
    /// Fraction lost (whole run, after draining).
    pub loss: f64,
    /// Delivered rate over the measurement window.
    pub delivered_rate: Rate,
    /// Offered rate actually achieved by the sender in the window.
    pub send_rate: Rate,
    /// Round-trip times in the window (echo).
    pub rtt: Option<Percentiles>,
    /// CDF points of the round-trip times (echo).
    pub rtt_cdf: Vec<(u64, f64)>,
    /// Length of the measurement window.
    pub window_secs: f64,
    /// Load generator I/O: UDP packets per send system call (GSO), whole run.
    pub client_packets_per_send: f64,
    /// Load generator I/O: UDP packets per receive system call (GRO).
    pub client_packets_per_recv: f64,
    /// Who used the CPU in the measurement window, and which side that
    /// says limited the run.
    pub cpu: CpuShares,
    #[serde(skip)]
    /// Raw RTT histogram (echo).
    pub rtt_histogram: Option<Histogram<u64>>,
}

/// CPU used in a run's measurement window, in cores (1.0: one core busy
/// for the whole window; user and system time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuShares {
    /// The load generator's thread (the QUIC or UDP clients).
    pub load_generator: f64,
    /// The bench's other threads: the targets (sink, source, echo).
    pub targets: f64,
    /// Both relay processes; `None` on the direct path.
    pub relay: Option<f64>,
    /// The side whose CPU limited the run.
    pub limit: Limit,
}

/// Which side limited a run, read from [`CpuShares`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The relay used a whole core (its one worker is the bottleneck).
    Relay,
    /// The bench's side used a whole core: the load generator and the
    /// targets, which share one core when the suite pins.
    LoadGenerator,
    /// Both sides used a whole core.
    Both,
    /// Neither side is CPU-bound: the path (congestion control, loss,
    /// pacing) set the rate.
    #[default]
    Neither,
}

/// A side counts as CPU-bound from this share of a core.
pub const SATURATED: f64 = 0.9;

impl Limit {
    /// The limit the shares say (`bench_cores`: the cores the bench's
    /// threads share, 1 when pinned).
    pub fn from_shares(load_generator: f64, targets: f64, relay: Option<f64>, bench_cores: f64) -> Self {
        let bench =
            (load_generator + targets) / bench_cores.max(1.0) >= SATURATED || load_generator >= SATURATED;
        let relay = relay.is_some_and(|r| r >= SATURATED);
        match (relay, bench) {
            (true, true) => Limit::Both,
            (true, false) => Limit::Relay,
            (false, true) => Limit::LoadGenerator,
            (false, false) => Limit::Neither,
        }
    }

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Relay => "relay",
            Limit::LoadGenerator => "load generator",
            Limit::Both => "both",
            Limit::Neither => "neither (path)",
        }
    }
}

/// A reading of the CPU clocks a [`CpuShares`] is computed from.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    thread: Duration,
    process: Duration,
    relay_ticks: Option<u64>,
}

impl CpuMark {
    /// Reads the clocks now: this thread's, this process's and (when
    /// `relay_pids` is not empty) the relay processes'.
    pub fn now(relay_pids: &[u32]) -> Self {
        let relay_ticks = (!relay_pids.is_empty()).then(|| {
            relay_pids.iter().filter_map(|&p| stats::sample_process(p).ok()).map(|s| s.cpu_ticks).sum()
        });
        Self { at: Instant::now(), thread: stats::thread_cpu(), process: stats::process_cpu(), relay_ticks }
    }

    /// The shares from `self` to `end`; `bench_cores`: the cores the
    /// bench's threads may use.
    pub fn shares(&self, end: &CpuMark, bench_cores: f64) -> CpuShares {
        let wall = end.at.saturating_duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return CpuShares::default();
        }
        let load_generator = end.thread.saturating_sub(self.thread).as_secs_f64() / wall;
        let all = end.process.saturating_sub(self.process).as_secs_f64() / wall;
        let targets = (all - load_generator).max(0.0);
        let relay = match (self.relay_ticks, end.relay_ticks) {
            (Some(a), Some(b)) => {
                Some(b.saturating_sub(a) as f64 / stats::clock_ticks_per_sec() as f64 / wall)
            }
            _ => None,
        };
        CpuShares {
            load_generator,
            targets,
            relay,
            limit: Limit::from_shares(load_generator, targets, relay, bench_cores),
        }
    }
}

/// The raw counts of a run, from which [`LoadResult::from_counts`] derives
/// every rate and ratio (the relay path and the direct path share it).
#[derive(Debug, Clone, Copy)]
pub struct RunCounts {
    /// Datagrams sent, whole run.
    pub sent: u64,
    /// Datagrams delivered, whole run (after draining).
    pub delivered: u64,
    /// Datagrams sent in the measurement window.
    pub window_sent: u64,
    /// Datagrams delivered in the measurement window.
    pub window_delivered: u64,
    /// Length of the measurement window.
    pub window: Duration,
    /// Sender's UDP packets per send system call.
    pub packets_per_send: f64,
    /// Receiver's UDP packets per receive system call.
    pub packets_per_recv: f64,
    /// CPU in the measurement window.
    pub cpu: CpuShares,
}

impl LoadResult {
    /// Builds the result of a run; a run that delivered nothing is an error,
    /// never a zero-valued result.
    pub fn from_counts(spec: &LoadSpec, c: RunCounts, hist: Histogram<u64>) -> Result<Self> {
        if c.delivered == 0 {
            bail!("nothing was delivered ({} datagrams sent): the path is broken", c.sent);
        }
        let bytes = |n: u64| n * spec.size as u64;
        let rtt = (spec.direction == Direction::Echo && !hist.is_empty()).then(|| stats::percentiles(&hist));
        Ok(LoadResult {
            spec: spec.clone(),
            sent: c.sent,
            delivered: c.delivered,
            loss: stats::ratio(c.sent.saturating_sub(c.delivered), c.sent),
            delivered_rate: stats::rate(c.window_delivered, bytes(c.window_delivered), c.window),
            send_rate: stats::rate(c.window_sent, bytes(c.window_sent), c.window),
            rtt,
            rtt_cdf: if rtt.is_some() { stats::cdf(&hist, 50) } else { Vec::new() },
            window_secs: c.window.as_secs_f64(),
            client_packets_per_send: c.packets_per_send,
            client_packets_per_recv: c.packets_per_recv,
            cpu: c.cpu,
            rtt_histogram: rtt.map(|_| hist),
        })
    }
}

const HEADER: usize = 20;

fn write_header(buf: &mut [u8], flow: u32, seq: u64, t_ns: u64) {
    buf[..4].copy_from_slice(&flow.to_be_bytes());
    buf[4..12].copy_from_slice(&seq.to_be_bytes());
    buf[12..20].copy_from_slice(&t_ns.to_be_bytes());
}

fn read_header(buf: &[u8]) -> Option<(u32, u64, u64)> {
    if buf.len() < HEADER {
        return None;
    }
    Some((
        u32::from_be_bytes(buf[..4].try_into().ok()?),
        u64::from_be_bytes(buf[4..12].try_into().ok()?),
        u64::from_be_bytes(buf[12..20].try_into().ok()?),
    ))
}

struct Flow {
    client: usize,
    stream: u64,
    sent: u64,
}

/// A tunnel: (index of its client, request stream ID).
pub type Tunnel = (usize, u64);

/// Opens the connections and tunnels for `spec` to `target`.
pub fn connect(
    config: &ClientConfig,
    spec: &LoadSpec,
    target: &Target,
) -> Result<(Vec<Client>, Vec<Tunnel>)> {
    let mut clients = Vec::new();
    let mut flows = Vec::new();
    for c in 0..spec.connections {
        let mut client = Client::connect(config.clone(), Duration::from_secs(5))?;
        let targets: Vec<(String, u16)> = (0..spec.flows_per_connection)
            .map(|_| (target.addr().ip().to_string(), target.addr().port()))
            .collect();
        for s in client.open_many(&targets, 256, Duration::from_secs(30))? {
            flows.push((c, s));
        }
        clients.push(client);
    }
    Ok((clients, flows))
}

/// Runs `spec` over already-open tunnels. `target` is the sink, source or
/// echo server the tunnels lead to.
pub fn run(
    clients: &mut [Client],
    tunnels: &[(usize, u64)],
    target: &Target,
    spec: &LoadSpec,
) -> Result<LoadResult> {
    run_observed(clients, tunnels, target, spec, &[], bench_cores())
}

/// The cores the bench's threads may run on (1 when the suite pinned the
/// process).
pub fn bench_cores() -> f64 {
    // SAFETY: an all-zero cpu_set_t is a valid empty set, and
    // sched_getaffinity writes at most its size into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size is the set's.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return 1.0;
    }
    // SAFETY: CPU_COUNT reads the set sched_getaffinity filled.
    (unsafe { libc::CPU_COUNT(&set) }).max(1) as f64
}

/// [`run`], also reading the CPU of the relay processes `relay_pids`
/// over the measurement window, so the result says which side was
/// CPU-bound ([`CpuShares`]).
pub fn run_observed(
    clients: &mut [Client],
    tunnels: &[(usize, u64)],
    target: &Target,
    spec: &LoadSpec,
    relay_pids: &[u32],
    bench_cores: f64,
) -> Result<LoadResult> {
    if spec.size < HEADER {
        bail!("payload size must be at least {HEADER} bytes");
    }
    if tunnels.is_empty() {
        bail!("no tunnels to load");
    }
    let mut flows: Vec<Flow> =
        tunnels.iter().map(|(c, s)| Flow { client: *c, stream: *s, sent: 0 }).collect();
    let io0 = io_totals(clients);
    let per_flow_rate = spec.rate.map(|r| r / flows.len() as f64);
    let mut payload = vec![0u8; spec.size];
    let mut hist = stats::latency_histogram();
    let start = Instant::now();
    let window_start = start + spec.warmup;
    let window_end = window_start + spec.duration;
    let (t_recv0, _, t_sent0, _) = target.stats().snapshot();
    let mut received_client = 0u64;
    let mut window_snap: Option<(u64, u64, u64, Instant)> = None; // (sent, delivered, target sent, at)
    let mut cpu_start: Option<CpuMark> = None;
    let mut window_result: Option<(u64, u64, Duration)> = None; // (sent, delivered) deltas
    let sending = spec.direction != Direction::Download;
    // The clients' sockets, polled when a download loop turn got nothing.
    let mut idle_poll: Vec<libc::pollfd> = clients
        .iter()
        .map(|c| libc::pollfd { fd: c.socket_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    if spec.direction == Direction::Download {
        // Say hello on every tunnel so the source registers the relay's
        // socket for it, then let it send.
        for f in &flows {
            clients[f.client].send_datagram(f.stream, b"hello")?;
        }
    }
    loop {
        let now = Instant::now();
        // The window closes only once it has opened: on a machine busy
        // enough that one turn outlasts the whole window, it is one turn
        // long rather than missing (the rates are then rough, the counts
        // still right).
        if now >= window_end && window_snap.is_some() {
            break;
        }
        if sending {
            for f in flows.iter_mut() {
                let budget = match per_flow_rate {
                    Some(r) => stats::paced_budget(r, now - start).saturating_sub(f.sent).min(64),
                    None => 64,
                };
                let client = &mut clients[f.client];
                for _ in 0..budget {
                    let t_ns = start.elapsed().as_nanos() as u64;
                    write_header(&mut payload, f.client as u32, f.sent, t_ns);
                    if !client.send_datagram(f.stream, &payload)? {
                        break; // QUIC queue full: the path is the limit
                    }
                    f.sent += 1;
                }
            }
        }
        let mut got = false;
        for client in clients.iter_mut() {
            got |= client.pump()?;
        }
        let in_window = Instant::now() >= window_start;
        for f in &flows {
            for d in clients[f.client].take_datagrams(f.stream) {
                received_client += 1;
                if spec.direction == Direction::Echo
                    && in_window
                    && let Some((_, _, t_ns)) = read_header(&d)
                {
                    let rtt_us = (start.elapsed().as_nanos() as u64).saturating_sub(t_ns) / 1000;
                    let _ = hist.record(rtt_us.max(1));
                }
            }
        }
        if in_window && window_snap.is_none() {
            let sent: u64 = flows.iter().map(|f| f.sent).sum();
            let (t_recv, _, t_sent, _) = target.stats().snapshot();
            let delivered = match spec.direction {
                Direction::Upload => t_recv - t_recv0,
                Direction::Download | Direction::Echo => received_client,
            };
            window_snap = Some((sent, delivered, t_sent - t_sent0, Instant::now()));
            cpu_start = Some(CpuMark::now(relay_pids));
        }
        for (i, client) in clients.iter().enumerate() {
            if let Some(err) = client.closed() {
                bail!("connection {i} closed during the run: {err:?}");
            }
        }
        // A download with nothing arrived: sleep until a packet arrives
        // instead of spinning. A spinning generator took half of the
        // bench's core from the download source that shares it (and
        // showed a full core of "work" whatever the load). Loads that
        // send keep spinning, so paced datagrams leave on time and echo
        // round trips carry no wake-up of the generator.
        if !sending && !got {
            let wait = clients.iter().filter_map(Client::quic_timeout).fold(MAX_IDLE_WAIT, Duration::min);
            poll_readable(&mut idle_poll, wait)?;
        }
    }
    // Close the window.
    let cpu = cpu_start.map(|s| s.shares(&CpuMark::now(relay_pids), bench_cores)).unwrap_or_default();
    let snap_end = {
        let sent: u64 = flows.iter().map(|f| f.sent).sum();
        let (t_recv, _, t_sent, _) = target.stats().snapshot();
        let delivered = match spec.direction {
            Direction::Upload => t_recv - t_recv0,
            Direction::Download | Direction::Echo => received_client,
        };
        (sent, delivered, t_sent - t_sent0, Instant::now())
    };
    if let Some((s0, d0, ts0, at0)) = window_snap {
        let sent = if spec.direction == Direction::Download { snap_end.2 - ts0 } else { snap_end.0 - s0 };
        window_result = Some((sent, snap_end.1 - d0, snap_end.3 - at0));
    }
    // Drain: stop sending, keep receiving until nothing moves.
    if spec.direction == Direction::Download {
        target.set_paused(true);
    }
    let drain_deadline = Instant::now() + Duration::from_millis(500);
    let mut quiet_since = Instant::now();
    while Instant::now() < drain_deadline && quiet_since.elapsed() < Duration::from_millis(100) {
        let mut any = false;
        for client in clients.iter_mut() {
            any |= client.pump()?;
        }
        for f in &flows {
            let n = clients[f.client].take_datagrams(f.stream).len() as u64;
            received_client += n;
        }
        if any {
            quiet_since = Instant::now();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let (t_recv, _, t_sent, _) = target.stats().snapshot();
    let (sent, delivered) = match spec.direction {
        Direction::Upload => (flows.iter().map(|f| f.sent).sum::<u64>(), t_recv - t_recv0),
        Direction::Echo => (flows.iter().map(|f| f.sent).sum::<u64>(), received_client),
        // The hello datagrams are not part of the load.
        Direction::Download => (t_sent - t_sent0, received_client),
    };
    let Some((w_sent, w_delivered, w_elapsed)) = window_result else {
        bail!("the measurement window never started");
    };
    let io1 = io_totals(clients);
    let counts = RunCounts {
        sent,
        delivered,
        window_sent: w_sent,
        window_delivered: w_delivered,
        window: w_elapsed,
        packets_per_send: stats::ratio(io1.1 - io0.1, io1.0 - io0.0),
        packets_per_recv: stats::ratio(io1.3 - io0.3, io1.2 - io0.2),
        cpu,
    };
    LoadResult::from_counts(spec, counts, hist)
}

/// Longest idle wait of the download loop: bounds how late the
/// measurement window's edges are noticed.
const MAX_IDLE_WAIT: Duration = Duration::from_millis(1);

/// Waits up to `wait` for any of `polled`'s descriptors to be readable
/// (`POLLIN` asked for each); returns whether one is (`false` after the
/// timeout or a signal).
fn poll_readable(polled: &mut [libc::pollfd], wait: Duration) -> std::io::Result<bool> {
    if wait.is_zero() || polled.is_empty() {
        return Ok(false);
    }
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `polled` is a live, initialised, exclusively borrowed array
    // of `polled.len()` pollfd structs for the call's duration; `ts`
    // outlives it; a null signal mask keeps the thread's own.
    let rc = unsafe { libc::ppoll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(rc > 0)
}

/// (send calls, packets sent, receive calls, packets received) over all
/// clients.
fn io_totals(clients: &[Client]) -> (u64, u64, u64, u64) {
    clients.iter().fold((0, 0, 0, 0), |acc, c| {
        let (calls, pkts) = c.send_stats();
        (acc.0 + calls, acc.1 + pkts, acc.2 + c.recv_calls, acc.3 + c.packets_in)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let mut b = vec![0u8; 64];
        write_header(&mut b, 3, 99, 123_456);
        assert_eq!(read_header(&b), Some((3, 99, 123_456)));
        assert_eq!(read_header(&b[..10]), None);
    }

    #[test]
    fn idle_waits_end_with_a_packet_or_the_timeout() {
        use std::os::fd::AsRawFd;
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut fds =
            [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        // Nothing queued: the wait times out and says so.
        assert!(!poll_readable(&mut fds, Duration::from_millis(1)).unwrap());
        assert!(!poll_readable(&mut fds, Duration::ZERO).unwrap());
        assert!(!poll_readable(&mut [], Duration::from_millis(1)).unwrap());
        // A datagram on the second socket ends the wait (the timeout is
        // far beyond any test's patience, so a missed wake-up hangs
        // visibly instead of passing).
        a.send_to(b"x", b.local_addr().unwrap()).unwrap();
        assert!(poll_readable(&mut fds, Duration::from_secs(60)).unwrap());
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn the_saturated_side_is_named() {
        // Pinned: the load generator and the targets share one core.
        assert_eq!(Limit::from_shares(0.95, 0.02, Some(0.40), 1.0), Limit::LoadGenerator);
        assert_eq!(Limit::from_shares(0.60, 0.35, Some(0.40), 1.0), Limit::LoadGenerator);
        assert_eq!(Limit::from_shares(0.30, 0.10, Some(0.97), 1.0), Limit::Relay);
        assert_eq!(Limit::from_shares(0.92, 0.05, Some(0.93), 1.0), Limit::Both);
        assert_eq!(Limit::from_shares(0.30, 0.10, Some(0.40), 1.0), Limit::Neither);
        // Unpinned on two cores: the client's thread alone saturating
        // still counts; the two together below two cores do not.
        assert_eq!(Limit::from_shares(0.60, 0.35, None, 2.0), Limit::Neither);
        assert_eq!(Limit::from_shares(0.99, 0.35, None, 2.0), Limit::LoadGenerator);
    }

    #[test]
    fn a_busy_thread_shows_in_its_share() {
        let start = CpuMark::now(&[]);
        let spin_until = Instant::now() + Duration::from_millis(200);
        let mut x = 0u64;
        while Instant::now() < spin_until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let shares = start.shares(&CpuMark::now(&[]), 1.0);
        // A spinning thread's CPU time shows (how much of the wall time
        // depends on how busy the machine is), never more than its wall
        // time; no relay was observed.
        assert!(shares.load_generator > 0.0, "{shares:?}");
        assert!(shares.load_generator <= 1.05, "{shares:?}");
        assert_eq!(shares.relay, None);
    }
}

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
    #[serde(skip)]
    /// Raw RTT histogram (echo).
    pub rtt_histogram: Option<Histogram<u64>>,
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
    let mut window_result: Option<(u64, u64, Duration)> = None; // (sent, delivered) deltas
    let sending = spec.direction != Direction::Download;
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
        for client in clients.iter_mut() {
            client.pump()?;
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
        }
        for (i, client) in clients.iter().enumerate() {
            if let Some(err) = client.closed() {
                bail!("connection {i} closed during the run: {err:?}");
            }
        }
    }
    // Close the window.
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
    };
    LoadResult::from_counts(spec, counts, hist)
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
}

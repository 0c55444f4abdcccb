//! A bounded, windowed echo load through connect-udp tunnels, with
//! byte-for-byte payload checks. Used by the end-to-end tests and by
//! `relay-bench tunnel-echo`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;

use crate::client::Client;

/// Parameters of an echo run.
#[derive(Debug, Clone)]
pub struct EchoLoad {
    /// Datagrams per flow.
    pub count: u64,
    /// UDP payload size in bytes (at least 16).
    pub size: usize,
    /// Most datagrams in flight per flow.
    pub window: u64,
    /// Use DATAGRAM capsules instead of QUIC datagrams.
    pub capsules: bool,
    /// Give up on missing echoes after this long without progress.
    pub stall_timeout: Duration,
}

/// Results of an echo run.
#[derive(Debug)]
pub struct EchoReport {
    /// Datagrams sent (all flows).
    pub sent: u64,
    /// Echoes received and verified.
    pub received: u64,
    /// Echoes never received.
    pub lost: u64,
    /// Echoes whose bytes did not match what was sent.
    pub corrupt: u64,
    /// Echoes received twice.
    pub duplicates: u64,
    /// Round-trip times in microseconds.
    pub rtt_us: Histogram<u64>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// The payload for (`flow`, `seq`): a header, then bytes derived from both
/// so that any corruption or mix-up is caught.
pub fn payload(flow: u32, seq: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&flow.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(size as u32).to_be_bytes());
    let header = out.len();
    out.resize(size.max(header), 0);
    // A word of xorshift per 8 bytes: a byte per step was ~12% of the echo
    // clients' CPU at 1200 B (a payload is generated twice per echo: to
    // send, and to check the echo).
    let mut x = (u64::from(flow) << 40) ^ seq ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out[header..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out.truncate(size);
}

fn header(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < 16 {
        return None;
    }
    Some((u32::from_be_bytes(p[..4].try_into().ok()?), u64::from_be_bytes(p[4..12].try_into().ok()?)))
}

struct FlowState {
    flow: u32,
    next_seq: u64,
    in_flight: HashMap<u64, Instant>,
    done: Vec<bool>,
}

/// Runs `load` over the open tunnels `streams` of `client`.
pub fn run_echo(client: &mut Client, streams: &[u64], load: &EchoLoad) -> Result<EchoReport> {
    if load.size < 16 {
        bail!("payload size must be at least 16 bytes");
    }
    let mut flows: HashMap<u64, FlowState> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                *s,
                FlowState {
                    flow: i as u32,
                    next_seq: 0,
                    in_flight: HashMap::new(),
                    done: vec![false; load.count as usize],
                },
            )
        })
        .collect();
    let mut report = EchoReport {
        sent: 0,
        received: 0,
        lost: 0,
        corrupt: 0,
        duplicates: 0,
        rtt_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
    };
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut buf = Vec::with_capacity(load.size);
    let mut expected = Vec::with_capacity(load.size);
    loop {
        // Send up to the window on every flow.
        for (stream, f) in flows.iter_mut() {
            while f.next_seq < load.count && (f.in_flight.len() as u64) < load.window {
                payload(f.flow, f.next_seq, load.size, &mut buf);
                if load.capsules {
                    client.send_capsule(*stream, &buf)?;
                } else if !client.send_datagram(*stream, &buf)? {
                    break; // QUIC datagram queue full: drive, then retry
                }
                f.in_flight.insert(f.next_seq, Instant::now());
                f.next_seq += 1;
                report.sent += 1;
            }
        }
        client.flush()?;
        client.drive(Duration::from_millis(2))?;
        for (stream, f) in flows.iter_mut() {
            for echo in client.take_datagrams(*stream) {
                let Some((flow, seq)) = header(&echo) else {
                    report.corrupt += 1;
                    continue;
                };
                if flow != f.flow || seq >= load.count {
                    report.corrupt += 1;
                    continue;
                }
                payload(flow, seq, load.size, &mut expected);
                if echo != expected {
                    report.corrupt += 1;
                    continue;
                }
                if f.done[seq as usize] {
                    report.duplicates += 1;
                    continue;
                }
                f.done[seq as usize] = true;
                if let Some(sent_at) = f.in_flight.remove(&seq) {
                    let _ = report.rtt_us.record(sent_at.elapsed().as_micros().max(1) as u64);
                }
                report.received += 1;
                last_progress = Instant::now();
            }
        }
        let all_sent = flows.values().all(|f| f.next_seq == load.count);
        let none_in_flight = flows.values().all(|f| f.in_flight.is_empty());
        if all_sent && none_in_flight {
            break;
        }
        if last_progress.elapsed() > load.stall_timeout {
            // Whatever is still in flight is lost; the window would
            // otherwise block the rest, which is lost too.
            break;
        }
        if let Some(err) = client.closed() {
            bail!("connection closed during the run: {err:?}");
        }
    }
    report.lost = report.sent.saturating_sub(report.received)
        + flows.values().map(|f| load.count - f.next_seq).sum::<u64>();
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_distinct_and_carry_their_ids() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        payload(1, 2, 100, &mut a);
        payload(1, 3, 100, &mut b);
        assert_eq!(a.len(), 100);
        assert_ne!(a, b);
        assert_eq!(header(&a), Some((1, 2)));
        payload(2, 2, 100, &mut b);
        assert_ne!(a[16..], b[16..]);
    }

    #[test]
    fn payloads_fill_every_size_and_change_in_every_word() {
        let mut p = Vec::new();
        for size in [0, 5, 16, 17, 23, 24, 64, 1200, 1201] {
            payload(7, 9, size, &mut p);
            assert_eq!(p.len(), size);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        payload(7, 9, 1200, &mut a);
        payload(7, 10, 1200, &mut b);
        // Any two payloads differ in every 8-byte word of the body, so a
        // mix-up is caught wherever the echo is cut or spliced.
        for (wa, wb) in a[16..].chunks(8).zip(b[16..].chunks(8)) {
            assert_ne!(wa, wb);
        }
        let mut again = Vec::new();
        payload(7, 9, 1200, &mut again);
        assert_eq!(a, again);
    }
}

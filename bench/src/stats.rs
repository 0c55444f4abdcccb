//! The harness's own statistics: rates, histogram merging, and process
//! CPU/RSS accounting from /proc. Pure functions where possible, so they
//! are tested without running any load.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Bytes per gigabyte (decimal, as network rates are quoted).
pub const GB: f64 = 1e9;

/// A count over a time span, expressed as rates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    /// Datagrams per second.
    pub datagrams_per_sec: f64,
    /// Payload bits per second, in Gbit/s.
    pub gbit_per_sec: f64,
}

/// Rates for `datagrams` of `payload_bytes` total over `elapsed`.
/// A zero span yields zero rates (never NaN or infinity).
pub fn rate(datagrams: u64, payload_bytes: u64, elapsed: Duration) -> Rate {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return Rate { datagrams_per_sec: 0.0, gbit_per_sec: 0.0 };
    }
    Rate { datagrams_per_sec: datagrams as f64 / secs, gbit_per_sec: payload_bytes as f64 * 8.0 / secs / GB }
}

/// `n / d`, or 0 when `d` is 0 (per-syscall and per-datagram ratios).
pub fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

/// Microseconds between datagrams for an offered rate, or `None` for "as
/// fast as possible".
pub fn interval_for_rate(datagrams_per_sec: f64) -> Option<Duration> {
    if datagrams_per_sec.is_finite() && datagrams_per_sec > 0.0 {
        Some(Duration::from_secs_f64(1.0 / datagrams_per_sec))
    } else {
        None
    }
}

/// How many datagrams a paced sender may have sent `since_start` into a run
/// at `datagrams_per_sec` (token-bucket schedule, no burst credit).
pub fn paced_budget(datagrams_per_sec: f64, since_start: Duration) -> u64 {
    (datagrams_per_sec * since_start.as_secs_f64()).floor() as u64
}

/// Whether an achieved rate reached the offered one within `tolerance`
/// (e.g. 0.05 for 5%).
pub fn reached(offered: f64, achieved: f64, tolerance: f64) -> bool {
    achieved >= offered * (1.0 - tolerance)
}

/// A new latency histogram in microseconds, 1 us to 60 s, 3 digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// Merges per-thread histograms into one.
pub fn merge(parts: &[Histogram<u64>]) -> Histogram<u64> {
    let mut all = latency_histogram();
    for p in parts {
        all.add(p).expect("same bounds");
    }
    all
}

/// Percentiles reported for latency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median, microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
}

/// Summarizes a histogram.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    Percentiles {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

/// CDF points (latency us, cumulative fraction) for plotting.
pub fn cdf(h: &Histogram<u64>, points: usize) -> Vec<(u64, f64)> {
    (0..=points)
        .map(|i| {
            let q = i as f64 / points as f64;
            let q = q.min(0.9999);
            (h.value_at_quantile(q), q)
        })
        .collect()
}

/// CPU time and memory of one process, read from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ProcSample {
    /// User + system CPU time in clock ticks.
    pub cpu_ticks: u64,
    /// User CPU time alone (the relay's own code; system time includes the
    /// kernel's UDP and loopback delivery work done on its behalf).
    pub user_ticks: u64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// CPU time to the nanosecond: the scheduler's own account of every
    /// thread's run time (the process CPU clock), where the tick counts
    /// above are samples taken 4 ms apart (HZ=250), which a process that
    /// sleeps and wakes thousands of times a second can skew.
    pub cpu_ns: u64,
}

/// Parses `/proc/<pid>/stat` text: utime and stime are fields 14 and 15,
/// counted after the parenthesised command name (which may hold spaces).
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    parse_stat_times(stat).map(|(user, system)| user + system)
}

/// (utime, stime) from `/proc/<pid>/stat` text, in clock ticks.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')' the first field is the state (field 3); utime is field 14.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// Parses `VmRSS:` from `/proc/<pid>/status` text.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples a live process.
pub fn sample_process(pid: u32) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected /proc format");
    let (user, system) = parse_stat_times(&stat).ok_or_else(bad)?;
    Ok(ProcSample {
        cpu_ticks: user + system,
        user_ticks: user,
        rss_kib: parse_status_rss_kib(&status).ok_or_else(bad)?,
        cpu_ns: process_cpu_ns(pid)?,
    })
}

/// A live process's CPU time in nanoseconds, from its POSIX CPU clock
/// (`clock_getcpuclockid`: the scheduler's summed run time of its threads).
pub fn process_cpu_ns(pid: u32) -> std::io::Result<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// CPU cost of forwarding: microseconds of relay CPU per datagram and CPU
/// seconds per GB of payload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    /// Relay CPU seconds spent (all relay processes).
    pub cpu_seconds: f64,
    /// Microseconds of CPU per forwarded datagram.
    pub us_per_datagram: f64,
    /// CPU seconds per GB of forwarded payload.
    pub cpu_sec_per_gb: f64,
}

/// Computes the cost of forwarding `datagrams` carrying `payload_bytes`
/// from CPU tick deltas.
pub fn cost(cpu_ticks: u64, ticks_per_sec: u64, datagrams: u64, payload_bytes: u64) -> Option<Cost> {
    if datagrams == 0 || payload_bytes == 0 || ticks_per_sec == 0 {
        return None;
    }
    let cpu_seconds = cpu_ticks as f64 / ticks_per_sec as f64;
    Some(Cost {
        cpu_seconds,
        us_per_datagram: cpu_seconds * 1e6 / datagrams as f64,
        cpu_sec_per_gb: cpu_seconds / (payload_bytes as f64 / GB),
    })
}

/// Median of a non-empty slice.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// CPU time (user + system) used so far by `who` (`RUSAGE_THREAD`: the
/// calling thread; `RUSAGE_SELF`: the whole process).
fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct we own; `who` is one of
    // the two values the callers pass.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time used so far by the calling thread.
pub fn thread_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_THREAD)
}

/// CPU time used so far by this process (every thread).
pub fn process_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_math() {
        let r = rate(1_000_000, 1_200_000_000, Duration::from_secs(2));
        assert_eq!(r.datagrams_per_sec, 500_000.0);
        assert!((r.gbit_per_sec - 4.8).abs() < 1e-9);
        assert_eq!(rate(5, 5, Duration::ZERO), Rate { datagrams_per_sec: 0.0, gbit_per_sec: 0.0 });
        assert_eq!(interval_for_rate(1000.0), Some(Duration::from_millis(1)));
        assert_eq!(interval_for_rate(0.0), None);
        assert_eq!(interval_for_rate(f64::INFINITY), None);
        assert_eq!(paced_budget(1000.0, Duration::from_millis(2500)), 2500);
        assert_eq!(paced_budget(3.0, Duration::from_millis(999)), 2);
        assert!(reached(1000.0, 960.0, 0.05));
        assert!(!reached(1000.0, 940.0, 0.05));
        assert_eq!(ratio(3, 2), 1.5);
        assert_eq!(ratio(3, 0), 0.0);
    }

    #[test]
    fn histogram_merge_keeps_every_sample() {
        let mut a = latency_histogram();
        let mut b = latency_histogram();
        for v in 1..=1000 {
            a.record(v).unwrap();
        }
        for v in 1001..=2000 {
            b.record(v).unwrap();
        }
        let m = merge(&[a, b]);
        let p = percentiles(&m);
        assert_eq!(p.count, 2000);
        assert!((999..=1001).contains(&p.p50_us), "{p:?}");
        assert!((1798..=1802).contains(&p.p90_us), "{p:?}");
        assert!(p.max_us >= 1999);
        let c = cdf(&m, 10);
        assert_eq!(c.len(), 11);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn proc_parsing() {
        let stat = "1234 (relay worker) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 1000000 500 \\
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        assert_eq!(parse_stat_times(stat).map(|(u, s)| u + s), Some(300));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let status = "Name:\trelay\nVmPeak:\t 9999 kB\nVmRSS:\t    5120 kB\n";
        assert_eq!(parse_status_rss_kib(status), Some(5120));
        let me = sample_process(std::process::id()).unwrap();
        assert!(me.rss_kib > 0);
    }

    #[test]
    fn cost_math() {
        let c = cost(100, 100, 1_000_000, 1_200_000_000).unwrap();
        assert!((c.cpu_seconds - 1.0).abs() < 1e-12);
        assert!((c.us_per_datagram - 1.0).abs() < 1e-12);
        assert!((c.cpu_sec_per_gb - 1.0 / 1.2).abs() < 1e-12);
        assert_eq!(cost(1, 100, 0, 0), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}

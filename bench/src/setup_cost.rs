//! The cost of opening tunnels on one relay configuration: CONNECT -> 200
//! one tunnel at a time (pooled into a histogram) and the rate of
//! pipelined setups, over rounds that alternate the configurations
//! compared. Shared by `relay-bench fleet` and `relay-bench privacy-pass`.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Client, ClientConfig};
use crate::stats::{self, Percentiles};
use crate::target::Target;

/// Bound for one handshake or answer.
const T: Duration = Duration::from_secs(10);

/// One configuration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SetupFigures {
    /// What was measured (a relay or a credential scheme).
    pub name: String,
    /// CONNECT -> 200, every round's samples.
    pub connect_latency: Percentiles,
    /// Pipelined setups per second, one per round.
    pub setups_per_sec: Vec<f64>,
    /// Their median.
    pub setups_per_sec_median: f64,
}

/// What rounds of a comparison collect for one configuration.
pub struct Samples {
    name: String,
    hist: Histogram<u64>,
    rates: Vec<f64>,
}

impl Samples {
    /// Empty samples for `name`.
    pub fn new(name: &str) -> Self {
        Self { name: name.to_string(), hist: stats::latency_histogram(), rates: Vec::new() }
    }

    /// The configuration's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records CONNECT -> 200 for `samples` tunnels opened one at a time,
    /// each with the next of `authorizations` (`proxy-authorization`
    /// values; none: the client's token).
    pub fn connect_latency(
        &mut self,
        cfg: &ClientConfig,
        target: &Target,
        samples: usize,
        authorizations: Vec<String>,
    ) -> Result<()> {
        let t = target.addr();
        let mut c = Client::connect(cfg.clone(), T)?;
        c.wait_settings(T)?;
        c.queue_authorizations(authorizations);
        for _ in 0..samples {
            let t0 = Instant::now();
            let id = c.open_udp(&t.ip().to_string(), t.port(), T)?;
            self.hist.record(t0.elapsed().as_micros().max(1) as u64)?;
            c.finish_stream(id)?;
        }
        c.close();
        Ok(())
    }

    /// Records the rate of `n` tunnels opened pipelined (256 outstanding)
    /// on one connection, with `authorizations` as above.
    pub fn setup_rate(
        &mut self,
        cfg: &ClientConfig,
        target: &Target,
        n: usize,
        authorizations: Vec<String>,
    ) -> Result<()> {
        let t = (target.addr().ip().to_string(), target.addr().port());
        let mut c = Client::connect(cfg.clone(), T)?;
        c.wait_settings(T)?;
        c.queue_authorizations(authorizations);
        let start = Instant::now();
        let opened = c.open_many(&vec![t; n], 256, Duration::from_secs(60))?.len();
        let secs = start.elapsed().as_secs_f64();
        c.close();
        if opened != n {
            bail!("only {opened} of {n} tunnels opened");
        }
        self.rates.push(n as f64 / secs);
        Ok(())
    }

    /// The figures.
    pub fn figures(&self) -> SetupFigures {
        SetupFigures {
            name: self.name.clone(),
            connect_latency: stats::percentiles(&self.hist),
            setups_per_sec_median: stats::median(&mut self.rates.clone()).unwrap_or(0.0),
            setups_per_sec: self.rates.clone(),
        }
    }
}

/// The order of a round's two configurations: alternating, so neither
/// always runs on a warmer (or busier) machine.
pub fn round_order(round: usize) -> [usize; 2] {
    if round.is_multiple_of(2) { [0, 1] } else { [1, 0] }
}

/// `a / b`, 0 when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The figures as a Markdown table whose first column is headed `what`.
pub fn markdown(what: &str, rows: &[SetupFigures]) -> String {
    let mut s = format!(
        "| {what} | CONNECT->200 p50 (us) | p99 (us) | samples | setups/s (median) |\n|---|---|---|---|---|\n"
    );
    for f in rows {
        s += &format!(
            "| {} | {} | {} | {} | {:.0} |\n",
            f.name,
            f.connect_latency.p50_us,
            f.connect_latency.p99_us,
            f.connect_latency.count,
            f.setups_per_sec_median
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_configuration_and_rounds_alternate() {
        let p = Percentiles { count: 10, p50_us: 100, p90_us: 150, p99_us: 200, p999_us: 210, max_us: 220 };
        let rows = [SetupFigures {
            name: "bearer".into(),
            connect_latency: p,
            setups_per_sec: vec![900.0, 1100.0, 1000.0],
            setups_per_sec_median: 1000.0,
        }];
        let md = markdown("credential", &rows);
        assert!(md.starts_with("| credential | CONNECT->200"), "{md}");
        assert!(md.contains("| bearer | 100 | 200 | 10 | 1000 |"), "{md}");
        assert_eq!((round_order(0), round_order(1), round_order(2)), ([0, 1], [1, 0], [0, 1]));
        assert_eq!((ratio(5.0, 0.0), ratio(5.0, 2.0)), (0.0, 2.5));
    }

    #[test]
    fn figures_take_the_median_rate() {
        let mut s = Samples::new("x");
        s.rates = vec![3.0, 1.0, 2.0];
        s.hist.record(50).unwrap();
        let f = s.figures();
        assert_eq!((f.name.as_str(), f.setups_per_sec_median, f.connect_latency.count), ("x", 2.0, 1));
    }
}

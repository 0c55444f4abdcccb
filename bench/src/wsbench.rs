//! `relay-bench websocket`: WebSocket echo through the relay next to the
//! direct path, in one run. A Rust origin ([`WsEcho`], tungstenite on
//! threads) serves a `[[upstreams]]` route of a freshly started relay;
//! Rust clients (tungstenite) send binary messages one at a time per
//! connection, on several connections at once, and time each round trip:
//! straight to the origin, then through the relay's TCP front with an
//! HTTP/1.1 Upgrade over TLS, and with HTTP/2 extended CONNECT (RFC 8441)
//! over TLS. It prints a markdown table: messages/s, round-trip p50 and
//! p99, and the rate against the direct path.
//!
//! Every count is bounded (`connections` x `messages` per path and size);
//! everything runs on loopback.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use tungstenite::Message;

use crate::processes::{Relay, RelayOptions};
use crate::wsecho::{self, Through, Tls, Ws, WsEcho};

/// What to run.
#[derive(Debug, Clone)]
pub struct WsBench {
    /// Directory of the relay binaries.
    pub bin_dir: Option<PathBuf>,
    /// Relay workers.
    pub workers: u32,
    /// WebSocket connections per path, each on its own thread.
    pub connections: usize,
    /// Timed messages per connection (after `warmup` untimed ones).
    pub messages: usize,
    /// Untimed messages per connection first.
    pub warmup: usize,
    /// Message sizes in bytes.
    pub sizes: Vec<usize>,
    /// Only the direct path (no relay started).
    pub direct_only: bool,
}

/// Path names in the report.
const H1_TLS: &str = "relay, HTTP/1.1 Upgrade over TLS";
const H2_TLS: &str = "relay, HTTP/2 extended CONNECT over TLS";
const H3: &str = "relay, HTTP/3 extended CONNECT";

/// The route the benchmark's relay serves.
pub const ROUTE_PREFIX: &str = "/bench/";

/// One path's result for one size.
#[derive(Debug)]
pub struct Row {
    /// Path name.
    pub path: &'static str,
    /// Message size.
    pub size: usize,
    /// Messages echoed (all connections).
    pub messages: u64,
    /// Wall time of the timed part.
    pub elapsed: Duration,
    /// Round trips in microseconds.
    pub rtt_us: Histogram<u64>,
}

impl Row {
    /// Echoed messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A `[[upstreams]]` route for `origin` under [`ROUTE_PREFIX`].
pub fn route(name: &str, origin: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\nprotocol = \"websocket\"\npath_prefix = \"{ROUTE_PREFIX}\"\norigin = \"{origin}\"\n"
    )
}

/// Runs `messages` round trips of `size` bytes on one connection; returns
/// the round trips in microseconds.
fn ping_pong(ws: &mut Ws, size: usize, warmup: usize, messages: usize) -> Result<Histogram<u64>> {
    let payload = bytes::Bytes::from(crate::tcp_echo::pattern(size));
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..warmup + messages {
        let start = Instant::now();
        let back = wsecho::round_trip(ws, Message::Binary(payload.clone()))?;
        let us = start.elapsed().as_micros() as u64;
        match back {
            Message::Binary(b) if b == payload => {}
            other => bail!("message {i} came back changed ({} bytes)", other.len()),
        }
        if i >= warmup {
            h.record(us.max(1))?;
        }
    }
    let _ = ws.close(None);
    // Bounded: the close reply, then the end of the stream.
    for _ in 0..16 {
        if ws.read().is_err() {
            break;
        }
    }
    Ok(h)
}

/// Opens `connections` WebSockets with `open`, then runs them at once.
fn measure(
    path: &'static str,
    cfg: &WsBench,
    size: usize,
    open: &(dyn Fn() -> Result<Ws> + Sync),
) -> Result<Row> {
    let mut sockets = Vec::new();
    for _ in 0..cfg.connections.max(1) {
        sockets.push(open()?);
    }
    let start = Instant::now();
    let results: Vec<Result<Histogram<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = sockets
            .into_iter()
            .map(|mut ws| s.spawn(move || ping_pong(&mut ws, size, cfg.warmup, cfg.messages)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("a client thread panicked"))).collect()
    });
    let elapsed = start.elapsed();
    let mut rtt_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for r in results {
        rtt_us.add(r?)?;
    }
    let messages = (cfg.connections.max(1) * cfg.messages) as u64;
    Ok(Row { path, size, messages, elapsed, rtt_us })
}

/// Runs the comparison; returns the markdown report. A relay path that
/// fails is reported in the table and makes the run fail after printing.
pub fn run(cfg: &WsBench) -> Result<String> {
    let origin = WsEcho::start("127.0.0.1:0".parse()?)?;
    let timeout = Duration::from_secs(10);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let addr = origin.addr();
    for &size in &cfg.sizes {
        let path = format!("{ROUTE_PREFIX}echo");
        rows.push(measure("direct (no relay)", cfg, size, &|| wsecho::connect_direct(addr, &path, timeout))?);
    }
    let dir = std::env::temp_dir().join(format!("relay-ws-bench-{}", std::process::id()));
    let relay = if cfg.direct_only {
        None
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        let opts = RelayOptions {
            workers: cfg.workers,
            bin_dir: cfg.bin_dir.clone(),
            extra_config: route("bench", &origin.origin()),
            ..RelayOptions::default()
        };
        match Relay::start(&dir, &opts) {
            Ok(relay) => Some(relay),
            Err(e) => {
                failures.push(("relay", None, format!("did not start: {e:#}")));
                None
            }
        }
    };
    if let Some(relay) = &relay {
        let through = Through {
            addr: relay.addr,
            tls: Some(Tls { ca: relay.cert(), server_name: "localhost".into() }),
            authority: format!("localhost:{}", relay.addr.port()),
            token: Some(relay.token.clone()),
        };
        let path = format!("{ROUTE_PREFIX}echo");
        type Open<'a> = &'a (dyn Fn() -> Result<Ws> + Sync);
        let h1: Open = &|| Ok(wsecho::connect_h1(&through, &path, timeout)?.open()?.0);
        let h2: Open = &|| Ok(wsecho::connect_h2(&through, &path, timeout)?.open()?.0);
        let h3: Open = &|| Ok(wsecho::connect_h3(&through, &path, timeout)?.open()?.0);
        for &size in &cfg.sizes {
            for (name, open) in [(H1_TLS, h1), (H2_TLS, h2), (H3, h3)] {
                match measure(name, cfg, size, open) {
                    Ok(row) => rows.push(row),
                    Err(e) => failures.push((name, Some(size), format!("{e:#}"))),
                }
            }
        }
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = format!(
        "WebSocket echo: {} connections per path, {} binary messages each ({} untimed first), one in flight per connection; tungstenite client and origin on loopback{}.\n\n",
        cfg.connections.max(1),
        cfg.messages,
        cfg.warmup,
        if cfg.direct_only {
            "; direct path only".to_string()
        } else {
            format!(", relay with {} workers", cfg.workers)
        }
    );
    out.push_str(
        "| path | payload | messages/s | RTT p50 | RTT p99 | vs direct |\n|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let direct = rows.iter().find(|d| d.size == r.size).map(Row::rate).unwrap_or(0.0);
        out.push_str(&format!(
            "| {} | {} B | {:.0} | {} us | {} us | {:.2} |\n",
            r.path,
            r.size,
            r.rate(),
            r.rtt_us.value_at_quantile(0.5),
            r.rtt_us.value_at_quantile(0.99),
            r.rate() / direct.max(1e-9)
        ));
    }
    for (name, size, e) in &failures {
        let size = size.map(|s| format!("{s} B")).unwrap_or_else(|| "-".into());
        out.push_str(&format!("| {name} | {size} | failed: {} | | | |\n", e.replace('|', "/")));
    }
    if !failures.is_empty() {
        print!("{out}");
        bail!("{} relay path(s) failed", failures.len());
    }
    Ok(out)
}

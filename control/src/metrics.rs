//! Prometheus metrics: a text exposition endpoint on control (loopback by
//! default) with the dataplane's per-worker counters, control's own
//! counters, and latency histograms.
//!
//! The dataplane's counters live in the shared region (one single-writer
//! slot per counter and worker); control reads them when scraped, so the
//! endpoint costs the dataplane nothing. Histograms are kept by control for
//! what it times itself: the authorization decision (ask received to answer
//! queued) and handshake signing.
//!
//! The HTTP side is deliberately tiny: one thread, one request per
//! connection, `GET /metrics` only, requests bounded in size and time.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use relay_channel::region::{Counter, Region};

use crate::fleet::status::FleetFigures;
use crate::server::{TUNNEL_PROTOCOLS, protocol_name};

/// Upper bounds (seconds) of the latency histogram buckets.
pub const BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A cumulative latency histogram in the Prometheus model, safe to update
/// from one thread and read from another.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ =
                writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", self.buckets[i].load(Ordering::Relaxed));
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Control's own figures at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlFigures {
    /// A dataplane is attached.
    pub dataplane_attached: bool,
    /// Live flows control knows.
    pub flows: u64,
    /// Asks allowed.
    pub asks_allowed: u64,
    /// Asks denied.
    pub asks_denied: u64,
    /// Flows allowed, by protocol (in [`TUNNEL_PROTOCOLS`] order).
    pub tunnels_allowed: [u64; TUNNEL_PROTOCOLS.len()],
    /// Invalid records from the dataplane.
    pub channel_errors: u64,
    /// Handshake signatures made.
    pub signatures: u64,
    /// Signing asks that failed.
    pub signatures_failed: u64,
    /// Fleet mode's figures (`None`: a host alone).
    pub fleet: Option<FleetFigures>,
    /// Privacy Pass figures (`None`: `private_token` not accepted).
    pub privacy_pass: Option<PrivacyPassFigures>,
}

/// Privacy Pass figures at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrivacyPassFigures {
    /// Tokens accepted.
    pub redeemed: u64,
    /// Nonces held in the spent-token store.
    pub spent_held: u64,
    /// The store's bound.
    pub spent_max: u64,
    /// Issuer keys in force.
    pub keys_in_force: u64,
}

/// Histograms control keeps.
#[derive(Debug, Default)]
pub struct Histograms {
    /// Authorization decisions: ask received to answer queued (includes DNS).
    pub auth_decision: LatencyHistogram,
    /// Handshake signing (keyless TLS).
    pub signing: LatencyHistogram,
}

/// Whether a counter is a gauge (a level, not a running total).
fn is_gauge(c: Counter) -> bool {
    matches!(
        c,
        Counter::TunnelsActive
            | Counter::ConnectionsActive
            | Counter::IoBackend
            | Counter::TlsGeneration
            | Counter::QlogSession
            | Counter::QlogMatched
            | Counter::QlogConnections
    )
}

/// Renders the exposition text.
pub fn render(region: Option<&Region>, control: &ControlFigures, histograms: &Histograms) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    gauge(
        &mut out,
        "relay_dataplane_attached",
        "Whether a dataplane is attached to control.",
        u64::from(control.dataplane_attached),
    );
    gauge(&mut out, "relay_flows", "Live flows (tunnels) control knows.", control.flows);
    counter(&mut out, "relay_auth_allowed_total", "Authorization asks allowed.", control.asks_allowed);
    counter(&mut out, "relay_auth_denied_total", "Authorization asks denied.", control.asks_denied);
    let _ = writeln!(
        out,
        "# HELP relay_tunnels_allowed_total Flows allowed, by protocol.\n# TYPE relay_tunnels_allowed_total counter"
    );
    for (protocol, n) in TUNNEL_PROTOCOLS.iter().zip(control.tunnels_allowed) {
        let _ = writeln!(out, "relay_tunnels_allowed_total{{protocol=\"{}\"}} {n}", protocol_name(*protocol));
    }
    counter(
        &mut out,
        "relay_channel_errors_total",
        "Invalid records read from the dataplane.",
        control.channel_errors,
    );
    counter(
        &mut out,
        "relay_signatures_total",
        "Handshake signatures made for the dataplane (keyless TLS).",
        control.signatures,
    );
    counter(
        &mut out,
        "relay_signatures_failed_total",
        "Signing asks control refused.",
        control.signatures_failed,
    );
    if let Some(f) = &control.fleet {
        gauge(
            &mut out,
            "relay_fleet_store_up",
            "Whether the fleet's store is reachable.",
            u64::from(f.store_up),
        );
        counter(
            &mut out,
            "relay_fleet_store_errors_total",
            "Fleet store errors (connections lost or refused, commands failed).",
            f.store_errors_total,
        );
        counter(
            &mut out,
            "relay_fleet_values_rejected_total",
            "Values read from the fleet store and refused (bad MAC or seal, malformed, out of bounds, rolled back).",
            f.values_rejected_total,
        );
        gauge(
            &mut out,
            "relay_fleet_state_version",
            "The fleet state version this host enforces.",
            f.state_version,
        );
        gauge(
            &mut out,
            "relay_fleet_pending_local_changes",
            "Whether this host has run-time changes the fleet store does not have yet.",
            u64::from(f.pending_local_changes),
        );
        gauge(
            &mut out,
            "relay_fleet_ticket_generation",
            "The fleet's session ticket key generation served (0: none).",
            f.ticket_generation,
        );
        gauge(&mut out, "relay_fleet_hosts_seen", "Hosts of the fleet with a live heartbeat.", f.hosts_seen);
    }
    if let Some(p) = &control.privacy_pass {
        counter(&mut out, "relay_privacy_pass_redeemed_total", "Privacy Pass tokens accepted.", p.redeemed);
        gauge(
            &mut out,
            "relay_privacy_pass_spent_tokens",
            "Token nonces held to refuse double spending.",
            p.spent_held,
        );
        gauge(
            &mut out,
            "relay_privacy_pass_spent_tokens_max",
            "Bound of the spent-token store (max_spent_tokens); full, new tokens get 503.",
            p.spent_max,
        );
        gauge(
            &mut out,
            "relay_privacy_pass_keys_in_force",
            "Privacy Pass issuer keys in force.",
            p.keys_in_force,
        );
    }
    histograms.auth_decision.render(
        &mut out,
        "relay_auth_decision_seconds",
        "Time from an authorization ask's arrival to its answer (includes DNS).",
    );
    histograms.signing.render(
        &mut out,
        "relay_signing_seconds",
        "Time to sign a handshake for the dataplane.",
    );
    if let Some(region) = region {
        for c in Counter::ALL {
            let (kind, suffix) = if is_gauge(*c) { ("gauge", "") } else { ("counter", "_total") };
            let name = format!("relay_dataplane_{}{suffix}", c.name());
            let _ = writeln!(out, "# HELP {name} Dataplane counter {} per worker.", c.name());
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for w in 0..region.workers() {
                let _ = writeln!(out, "{name}{{worker=\"{w}\"}} {}", region.counters(w).get(*c));
            }
        }
    }
    out
}

/// Largest request accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// Answers one HTTP/1.x request on `stream` with `body` for `GET /metrics`.
fn serve_one(mut stream: TcpStream, body: impl FnOnce() -> String) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            );
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body())
        }
        (Some("GET"), _) => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n"),
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "GET only\n"),
    }
}

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves the endpoint on `addr` from a background thread; `body` renders
/// the exposition for each scrape. Returns the bound address.
pub fn spawn(addr: SocketAddr, body: impl Fn() -> String + Send + 'static) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            // One at a time: a scraper is one client; a slow one is cut off
            // by the timeouts.
            let _ = serve_one(stream, &body);
        }
    })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(30)); // <= 50 us
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(2)); // only +Inf
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.000025\"} 0"));
        assert!(out.contains("x_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 2"));
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 2"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(out.contains("x_seconds_count 3"));
        assert!(out.contains("# TYPE x_seconds histogram"));
    }

    #[test]
    fn dataplane_counters_are_exposed_per_worker() {
        let (region, _fd) = Region::create(2).unwrap();
        let c = region.counters(1);
        c.add(Counter::DatagramsUp, 42);
        c.add(Counter::TunnelsActive, 3);
        let figures = ControlFigures {
            dataplane_attached: true,
            flows: 3,
            asks_allowed: 5,
            tunnels_allowed: [2, 0, 0, 1, 2, 3],
            ..Default::default()
        };
        let text = render(Some(&region), &figures, &Histograms::default());
        assert!(text.contains(
            "# TYPE relay_tunnels_allowed_total counter\nrelay_tunnels_allowed_total{protocol=\"connect-udp\"} 2\n\
             relay_tunnels_allowed_total{protocol=\"connect-ip\"} 0\nrelay_tunnels_allowed_total{protocol=\"bind\"} 0\n\
             relay_tunnels_allowed_total{protocol=\"connect-tcp\"} 1\nrelay_tunnels_allowed_total{protocol=\"websocket\"} 2\n\
             relay_tunnels_allowed_total{protocol=\"webtransport\"} 3\n"
        ));
        assert!(text.contains("relay_dataplane_datagrams_up_total{worker=\"1\"} 42"));
        assert!(text.contains("relay_dataplane_datagrams_up_total{worker=\"0\"} 0"));
        assert!(text.contains("# TYPE relay_dataplane_tunnels_active gauge"));
        assert!(text.contains("relay_dataplane_tunnels_active{worker=\"1\"} 3"));
        assert!(text.contains("relay_auth_allowed_total 5"));
        assert!(text.contains("relay_dataplane_attached 1"));
        assert!(!text.contains("relay_fleet_"), "no fleet metrics for a host alone");
        let fleet =
            FleetFigures { store_up: true, values_rejected_total: 2, state_version: 9, ..Default::default() };
        let text = render(None, &ControlFigures { fleet: Some(fleet), ..figures }, &Histograms::default());
        assert!(text.contains("relay_fleet_store_up 1"));
        assert!(text.contains("relay_fleet_values_rejected_total 2"));
        assert!(text.contains("# TYPE relay_fleet_state_version gauge\nrelay_fleet_state_version 9"));
        assert!(!text.contains("relay_privacy_pass_"), "no Privacy Pass metrics without it");
        let pp = PrivacyPassFigures { redeemed: 7, spent_held: 5, spent_max: 10, keys_in_force: 2 };
        let text =
            render(None, &ControlFigures { privacy_pass: Some(pp), ..figures }, &Histograms::default());
        assert!(text.contains(
            "# TYPE relay_privacy_pass_redeemed_total counter\nrelay_privacy_pass_redeemed_total 7"
        ));
        assert!(text.contains("relay_privacy_pass_spent_tokens 5\n"));
        assert!(text.contains("relay_privacy_pass_keys_in_force 2"));
        // Every sample line is "name{labels} value" or "name value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
        }
    }

    #[test]
    fn the_endpoint_serves_metrics_and_nothing_else() {
        let addr = spawn("127.0.0.1:0".parse().unwrap(), || "relay_up 1\n".to_string()).unwrap();
        let ok = get(addr, "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("relay_up 1\n"));
        assert!(get(addr, "/").starts_with("HTTP/1.1 404"));
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 405"));
        // An endless header is cut off (its 431 may be lost to the reset of
        // the unread bytes), and the endpoint still serves the next scrape.
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&[b'a'; MAX_REQUEST + 10]);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(!out.contains("200 OK"), "an oversize request is never served");
        assert!(get(addr, "/metrics").starts_with("HTTP/1.1 200"));
    }
}

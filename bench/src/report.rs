//! Writes a suite [`Report`] as JSON, a markdown table and SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::suite::{CostPoint, Report, Throughput};
use crate::svg::{Series, line_chart};

fn ratio(relay: f64, direct: f64) -> String {
    if direct > 0.0 { format!("{:.2}", relay / direct) } else { "-".into() }
}

fn pair(list: &[Throughput], size: usize) -> Option<(&Throughput, &Throughput)> {
    let relay = list.iter().find(|t| t.path == "relay" && t.result.spec.size == size)?;
    let direct = list.iter().find(|t| t.path == "direct" && t.result.spec.size == size)?;
    Some((relay, direct))
}

fn throughput_rows(out: &mut String, name: &str, list: &[Throughput]) {
    let mut sizes: Vec<usize> = list.iter().map(|t| t.result.spec.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for size in sizes {
        let Some((r, d)) = pair(list, size) else { continue };
        let _ = writeln!(
            out,
            "| {name} | {size} | {:.0} | {:.3} | {:.2}% | {:.0} | {:.3} | {:.2}% | {} |",
            r.result.delivered_rate.datagrams_per_sec,
            r.result.delivered_rate.gbit_per_sec,
            r.result.loss * 100.0,
            d.result.delivered_rate.datagrams_per_sec,
            d.result.delivered_rate.gbit_per_sec,
            d.result.loss * 100.0,
            ratio(r.result.delivered_rate.datagrams_per_sec, d.result.delivered_rate.datagrams_per_sec),
        );
    }
}

/// The markdown summary.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "Machine: {} ({} logical CPUs), Linux {}; relay and load generator {}; targets on {}.\n",
        m.cpu_model,
        m.cores,
        m.kernel,
        if m.pinned { "pinned to different cores" } else { "not pinned" },
        m.target_placement
    );
    let _ = writeln!(
        out,
        "Throughput ({} connection(s) x {} tunnels, {:.1} s windows after {:.1} s warm-up; as fast as QUIC \
         congestion control allows on the relay path, as fast as the sockets take it on the direct path):\n",
        r.config.connections,
        r.config.flows_per_connection,
        r.config.duration.as_secs_f64(),
        r.config.warmup.as_secs_f64()
    );
    out += "| scenario | payload B | relay dgram/s | relay Gbit/s | relay loss | direct dgram/s | direct Gbit/s | direct loss | relay/direct |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    throughput_rows(&mut out, "upload", &r.upload);
    throughput_rows(&mut out, "download", &r.download);
    throughput_rows(&mut out, "echo", &r.echo);
    let upload_max = r
        .upload
        .iter()
        .filter(|t| t.path == "relay")
        .max_by_key(|t| t.result.spec.size)
        .map(|t| t.result.delivered_rate.datagrams_per_sec);
    match (&r.sustainable_download, upload_max) {
        (Some(d), Some(up)) => {
            let c = &d.cpu;
            let _ = writeln!(
                out,
                "\nDownload, highest paced rate losing at most {:.0}% (probed down from the upload max in 10% \
                 steps; the as-fast-as-possible row above overloads the path): {:.0} datagrams/s of {} B, \
                 {:.2}x the upload max ({up:.0}/s); load generator {:.2}, targets {:.2}, relay {} cores: \
                 limited by {}.",
                r.config.max_paced_loss * 100.0,
                d.delivered_rate.datagrams_per_sec,
                d.spec.size,
                d.delivered_rate.datagrams_per_sec / up.max(1.0),
                c.load_generator,
                c.targets,
                c.relay.map_or("-".to_string(), |v| format!("{v:.2}")),
                c.limit.name()
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "\nDownload: no paced rate from the upload max down lost at most {:.0}%.",
                r.config.max_paced_loss * 100.0
            );
        }
    }
    out += "\nWhich side limited each run: CPU in the measurement window, in cores (1.00: one core busy \
            the whole window), and the side at 90% of a core or more (the load generator and the targets \
            share one core when pinned):\n\n";
    out += "| scenario | payload B | path | load generator | targets | relay | limited by |\n|---|---:|---|---:|---:|---:|---|\n";
    for (name, list) in [("upload", &r.upload), ("download", &r.download), ("echo", &r.echo)] {
        for t in list {
            let c = &t.result.cpu;
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {:.2} | {:.2} | {} | {} |",
                t.result.spec.size,
                t.path,
                c.load_generator,
                c.targets,
                c.relay.map_or("-".to_string(), |r| format!("{r:.2}")),
                c.limit.name()
            );
        }
    }
    out += "\nLoad generator I/O on the relay path (UDP packets per system call):\n\n";
    out += "| scenario | payload B | packets per send (GSO) | packets per receive (GRO) |\n|---|---:|---:|---:|\n";
    for (name, list) in [("upload", &r.upload), ("download", &r.download), ("echo", &r.echo)] {
        for t in list.iter().filter(|t| t.path == "relay") {
            let _ = writeln!(
                out,
                "| {name} | {} | {:.1} | {:.1} |",
                t.result.spec.size, t.result.client_packets_per_send, t.result.client_packets_per_recv
            );
        }
    }
    let _ = writeln!(
        out,
        "\nEcho round-trip times (microseconds) at fractions of the relay's highest sustainable echo rate \
         ({:.0} datagrams/s with at most {:.0}% loss), same offered load on both paths:\n",
        r.sustainable_echo_rate,
        r.config.max_paced_loss * 100.0
    );
    out += "| load | offered dgram/s | relay p50 | p90 | p99 | p99.9 | loss | direct p50 | p90 | p99 | p99.9 | loss |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for l in &r.latency {
        let _ = writeln!(
            out,
            "| {:.0}% | {:.0} | {} | {} | {} | {} | {:.2}% | {} | {} | {} | {} | {:.2}% |",
            l.load_fraction * 100.0,
            l.offered,
            l.relay.p50_us,
            l.relay.p90_us,
            l.relay.p99_us,
            l.relay.p999_us,
            l.relay_loss * 100.0,
            l.direct.p50_us,
            l.direct.p90_us,
            l.direct.p99_us,
            l.direct.p999_us,
            l.direct_loss * 100.0
        );
    }
    let _ = writeln!(
        out,
        "\nRelay CPU cost (dataplane + control, from /proc) at {:.0}% of the relay's max upload rate:\n",
        r.config.cost_fraction * 100.0
    );
    let with_direction = || {
        COST_HEADER.replacen("| payload B |", "| direction | payload B |", 1).replacen(
            "|---:|",
            "|---|---:|",
            1,
        )
    };
    out += &with_direction();
    for c in &r.cost {
        cost_row(&mut out, &format!("{} | ", c.direction), c);
    }
    if !r.paced.is_empty() {
        out += "\nRelay CPU cost at fixed paced loads (each tunnel's datagrams evenly spaced, so most loop turns \
                carry one or two packets: the cost of a wake-up at the loads a relay host sees per core):\n\n";
        out += &with_direction();
        for c in &r.paced {
            cost_row(&mut out, &format!("{} | ", c.direction), c);
        }
    }
    if !r.backends.is_empty() {
        out += "\nI/O backends, each on its own one-worker relay in this run: upload as fast as QUIC allows, then relay CPU and \
                I/O per forwarded datagram at one common offered load (the same for both):\n\n";
        out += "| backend | upload dgram/s | upload Gbit/s | loss | relay packets / receive (GRO) | target datagrams / send (GSO) | relay syscalls / datagram |\n|---|---:|---:|---:|---:|---:|---:|\n";
        for b in &r.backends {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.3} | {:.2}% | {:.2} | {:.2} | {:.3} |",
                b.backend,
                b.upload.delivered_rate.datagrams_per_sec,
                b.upload.delivered_rate.gbit_per_sec,
                b.upload.loss * 100.0,
                b.upload_io.quic_packets_per_receive,
                b.upload_io.target_datagrams_per_send,
                b.upload_io.syscalls_per_datagram
            );
        }
        out += "\n";
        out += &COST_HEADER.replacen("| payload B |", "| backend | direction | payload B |", 1).replacen(
            "|---:|",
            "|---|---|---:|",
            1,
        );
        for b in &r.backends {
            for c in [&b.upload_cost, &b.download_cost] {
                cost_row(&mut out, &format!("{} | {} | ", b.backend, c.direction), c);
            }
        }
    }
    let _ = writeln!(
        out,
        "\nSetup: {} tunnels at {:.0} tunnels/s (CONNECT, control authorization, 200); {} handshakes at {:.0} connections/s with keyless signing (control signs each) against {:.0}/s with the key in the dataplane (same run). CONNECT -> 200 one tunnel at a time ({} samples): p50 {} us, p99 {} us.\n",
        r.rates.flows,
        r.rates.flows_per_sec,
        r.rates.connections,
        r.rates.connections_per_sec,
        r.rates.local_key_connections_per_sec,
        r.rates.connect_latency.count,
        r.rates.connect_latency.p50_us,
        r.rates.connect_latency.p99_us
    );
    out +=
        "| idle tunnels | relay RSS before (MiB) | after (MiB) | bytes per tunnel |\n|---:|---:|---:|---:|\n";
    for i in &r.idle {
        if let Some(why) = &i.not_measured {
            let _ = writeln!(out, "| {} | not measured: {why} | | |", i.flows);
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.0} |",
            i.flows,
            i.rss_before_kib as f64 / 1024.0,
            i.rss_after_kib as f64 / 1024.0,
            i.bytes_per_flow
        );
    }
    out
}

const COST_HEADER: &str = "| payload B | offered dgram/s | forwarded | CPU us / datagram | of which user | CPU s / GB | QUIC packets in / datagram | relay packets / receive (GRO) | relay packets / send (GSO) | target datagrams / send (GSO) | target datagrams / receive (GRO) | relay syscalls / datagram |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

fn cost_row(out: &mut String, prefix: &str, c: &CostPoint) {
    let _ = writeln!(
        out,
        "| {prefix}{} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |",
        c.size,
        c.offered,
        c.delivered,
        c.cost.us_per_datagram,
        c.user_us_per_datagram,
        c.cost.cpu_sec_per_gb,
        c.quic_packets_per_datagram,
        c.relay_packets_per_receive,
        c.relay_packets_per_send,
        c.relay_target_datagrams_per_send,
        c.relay_target_datagrams_per_receive,
        c.relay_syscalls_per_datagram
    );
}

/// Writes report.json, report.md, throughput.svg, latency_cdf.svg and
/// setup.svg into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> Result<()> {
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    let series = |path: &str| Series {
        name: format!("{path} upload"),
        points: r
            .upload
            .iter()
            .filter(|t| t.path == path)
            .map(|t| (t.result.spec.size as f64, t.result.delivered_rate.gbit_per_sec))
            .collect(),
    };
    std::fs::write(
        dir.join("throughput.svg"),
        line_chart(
            "Upload throughput vs payload size",
            "UDP payload (bytes)",
            "Gbit/s",
            &[series("relay"), series("direct")],
            true,
        ),
    )?;
    let mut cdfs = Vec::new();
    for l in &r.latency {
        let pct = l.load_fraction * 100.0;
        cdfs.push(Series {
            name: format!("relay {pct:.0}%"),
            points: l.relay_cdf.iter().map(|(us, q)| (*us as f64, *q)).collect(),
        });
        cdfs.push(Series {
            name: format!("direct {pct:.0}%"),
            points: l.direct_cdf.iter().map(|(us, q)| (*us as f64, *q)).collect(),
        });
    }
    std::fs::write(
        dir.join("latency_cdf.svg"),
        line_chart("Echo RTT CDF", "RTT (us, log)", "fraction", &cdfs, true),
    )?;
    std::fs::write(
        dir.join("setup.svg"),
        line_chart(
            "Tunnel setup",
            "seconds",
            "tunnels opened",
            &[Series { name: "relay".into(), points: r.rates.setup_curve.clone() }],
            false,
        ),
    )?;
    Ok(())
}

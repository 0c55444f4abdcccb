//! The benchmark pipeline end to end, tiny and fast: every stage of the
//! suite runs against real relay processes and writes its outputs. This
//! checks the pipeline, not the speed; no number is asserted beyond "it
//! measured something", and a paced run that falls short of its offered
//! rate on a busy machine is reported, not failed
//! (`SuiteConfig::fail_on_shortfall` is off in the smoke configuration).

use std::sync::Mutex;

use relay_bench::needs::{Need, require};
use relay_bench::suite::{self, SuiteConfig};

/// The smoke suites load the machine; running them one at a time keeps
/// each one's measurements about the relay rather than about the other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn smoke_suite_produces_every_output() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("relay-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = SuiteConfig::smoke(dir.clone());
    assert!(!cfg.fail_on_shortfall, "the smoke suite does not fail on the machine's speed");
    let report = suite::run(&cfg).expect("the smoke suite runs");

    for t in report.upload.iter().chain(&report.download).chain(&report.echo) {
        assert!(t.result.delivered > 0, "{} {:?} delivered nothing", t.path, t.result.spec.direction);
        assert!(t.result.delivered_rate.datagrams_per_sec > 0.0);
        assert!(
            t.result.delivered <= t.result.sent,
            "{} {:?}: more delivered than sent",
            t.path,
            t.result.spec.direction
        );
    }
    assert_eq!(report.upload.len(), 2 * report.config.sizes.len());
    assert_eq!(report.latency.len(), report.config.latency_loads.len());
    for l in &report.latency {
        assert!(l.relay.count > 0 && l.direct.count > 0);
        assert!(l.relay.p50_us <= l.relay.p99_us);
    }
    // Upload at the smallest and the largest size, and the download
    // direction at the largest.
    let directions: Vec<&str> = report.cost.iter().map(|c| c.direction.as_str()).collect();
    assert_eq!(directions, vec!["upload", "upload", "download"]);
    assert!(report.cost.iter().all(|c| c.cost.us_per_datagram > 0.0));
    // The paced rows: every rate both ways.
    assert_eq!(report.paced.len(), 2 * report.config.paced_rates.len());
    assert!(report.paced.iter().all(|c| c.delivered > 0 && c.cost.us_per_datagram > 0.0));
    // Every run says who used the CPU: the relay's processes only on the
    // relay path.
    for t in report.upload.iter().chain(&report.download).chain(&report.echo) {
        assert_eq!(t.result.cpu.relay.is_some(), t.path == "relay", "{t:?}");
        assert!(t.result.cpu.load_generator > 0.0, "{t:?}");
    }
    assert!(report.cost.iter().all(|c| c.relay_syscalls_per_datagram > 0.0), "I/O system calls are counted");
    // Both backends measured, each with its upload and download cost runs.
    let backends: Vec<&str> = report.backends.iter().map(|b| b.backend.as_str()).collect();
    assert_eq!(backends, vec!["io_uring", "epoll"]);
    for b in &report.backends {
        assert!(b.upload.delivered > 0, "{} forwarded nothing", b.backend);
        assert_eq!(b.upload_cost.offered, b.download_cost.offered, "one common offered load");
        assert!(b.download_cost.relay_target_datagrams_per_receive >= 1.0);
        assert!(b.upload_cost.relay_target_datagrams_per_send >= 1.0);
    }
    assert!(report.rates.flows_per_sec > 0.0 && report.rates.connections_per_sec > 0.0);
    assert!(report.rates.local_key_connections_per_sec > 0.0, "the local-key relay was measured");
    assert_eq!(report.rates.connect_latency.count as usize, report.config.connect_samples);
    assert_eq!(report.idle.len(), 1);
    assert!(report.idle[0].not_measured.is_none() && report.idle[0].rss_after_kib > 0);

    for file in ["report.json", "report.md", "throughput.svg", "latency_cdf.svg", "setup.svg"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.len() > 100, "{file} is nearly empty");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| upload | 64 |") && md.contains("tunnels/s"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root and ip (a network namespace): run by `cargo xtask test`"]
fn smoke_suite_with_targets_in_a_network_namespace() {
    require(&[Need::Root, Need::Ip]);
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("relay-bench-smoke-ns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = SuiteConfig::smoke(dir.clone());
    // The loopback smoke test covers the backend comparison.
    cfg.compare_backends = false;
    cfg.netns = true;
    cfg.sizes = vec![1200];
    cfg.latency_loads = vec![0.2];
    let report = suite::run(&cfg).expect("the namespace smoke suite runs");
    assert_eq!(report.machine.target_placement, "network namespace (veth)");
    for t in report.upload.iter().chain(&report.echo) {
        assert!(t.result.delivered > 0, "{} delivered nothing through the veth link", t.path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn front_bench_measures_every_path() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = relay_bench::frontbench::FrontBench {
        bin_dir: None,
        workers: 2,
        flows: 2,
        count: 300,
        window: 16,
        tcp_bytes: 1 << 20,
        repeats: 1,
        only: relay_bench::frontbench::Only::All,
    };
    // Every transfer is checked byte for byte inside the run (an error
    // otherwise); the report names every path.
    let report = relay_bench::frontbench::run(&cfg).expect("the front bench runs");
    for path in [
        "HTTP/3 (QUIC DATAGRAM frames)",
        "HTTP/2 over TLS (DATAGRAM capsules)",
        "HTTP/3 CONNECT",
        "HTTP/2 CONNECT over TLS",
        "HTTP/1.1 CONNECT over TLS",
        "direct (no relay)",
    ] {
        assert!(report.contains(path), "{path} missing:\n{report}");
    }
}

#[test]
#[ignore = "needs root, /dev/net/tun and ip: run by `cargo xtask test`"]
fn ip_bench_measures_every_path() {
    require(&[Need::Root, Need::Tun, Need::Ip]);
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let bin_dir = relay_bench::processes::bin_dir().unwrap();
    let r = relay_bench::ipbench::run(&bin_dir, 2, std::time::Duration::from_secs(1)).expect("ip-bench runs");
    assert!(r.direct.bytes > 0 && r.direct.mbps() > 0.0, "direct moved nothing: {:?}", r.direct);
    // Every tunnel path moved bytes, both ways, and the relay's cost was
    // read around it: it forwarded the bytes, so it ran and made system
    // calls.
    for (offloads, t) in [("with offloads", &r.offload), ("without offloads", &r.plain)] {
        for (name, p) in t.paths() {
            assert!(p.result.bytes > 0 && p.result.mbps() > 0.0, "{name} {offloads} moved nothing: {p:?}");
            assert!(p.cost.cpu_ns > 0 && p.cost.syscalls > 0, "{name} {offloads}: {p:?}");
        }
    }
    // The offloaded relay coalesced its TUN writes; the other wrote one
    // packet per write.
    assert!(
        r.offload.gso_writes > 0 && r.offload.coalesced_packets >= 2 * r.offload.gso_writes,
        "{:?}",
        r.offload
    );
    assert_eq!((r.plain.gso_writes, r.plain.coalesced_packets), (0, 0), "{:?}", r.plain);
    // Downloads reach the offloaded relay's TUN device as GSO packets (the
    // target's TCP segments stay whole through the forwarding); the other
    // reads one packet at a time.
    assert!(r.offload.gso_reads > 0 && r.offload.tun_packets_in > r.offload.gso_reads, "{:?}", r.offload);
    assert_eq!(r.plain.gso_reads, 0, "{:?}", r.plain);
    let table = relay_bench::ipbench::table(&r);
    assert!(table.contains("TUN offloads") && table.contains("no offloads"), "{table}");
    assert!(table.contains("relay CPU ms/MB") && table.contains("target to client"), "{table}");
}

//! `cargo xtask instr`: instructions the worker spends per datagram.
//!
//! Time per datagram on a shared 2-vCPU machine moves by 5-30% between
//! runs of the same code, which hides changes of a few percent. Counted
//! instructions do not move: this runs the dataplane's steady-load tests
//! (`worker::load_tests`: four connect-udp tunnels on one connection, or a
//! connect-ip tunnel; the sans-IO worker core driven by the test harness,
//! no sockets, no TUN device) under
//! callgrind, collecting only inside `worker::harness::worker_call` (the
//! worker's side; the quiche client and the harness are not counted), at
//! two round counts. The difference, divided by the datagrams of the extra
//! rounds, is the steady-state cost per datagram without the handshake and
//! setup; per function and per component too. Runs of one binary agree
//! within about 1% (the client skips packet numbers at random, which moves
//! the 1200-byte upload most).
//!
//! Instructions are not time (a copy of 1200 bytes is a few instructions
//! and many cycles; valgrind's CPU has no AVX-512, so BoringSSL takes its
//! AVX2 paths), so a change this shows is then checked for time with the
//! load bench; what it adds is a reading that resolves small changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One steady load of `worker::load_tests`.
struct Case {
    /// What the table calls it.
    name: &'static str,
    /// The test's name.
    test: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "upload 1200 B",
        test: "worker::load_tests::load_upload_1200_every_datagram_reaches_its_target_in_order",
    },
    Case {
        name: "upload 64 B",
        test: "worker::load_tests::load_upload_64_every_datagram_reaches_its_target_in_order",
    },
    Case {
        name: "download 1200 B",
        test: "worker::load_tests::load_download_1200_every_datagram_reaches_the_client_in_order",
    },
    Case {
        name: "download 64 B",
        test: "worker::load_tests::load_download_64_every_datagram_reaches_the_client_in_order",
    },
    Case {
        name: "connect-ip upload 1280 B",
        test: "worker::load_tests::load_ip_upload_1280_every_packet_reaches_the_tun_device_in_order",
    },
    Case {
        name: "connect-ip download 1280 B",
        test: "worker::load_tests::load_ip_download_1280_every_packet_reaches_the_client_in_order",
    },
];

/// Datagrams (or IP packets) per round of every load test: 4 tunnels x
/// 10 datagrams, or 40 packets of the connect-ip tunnel.
const DATAGRAMS_PER_ROUND: u64 = 40;

/// The component a function's instructions count towards, from its
/// source file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
enum Component {
    /// The relay's own code (`dataplane/`, its protocol crates).
    Relay,
    /// The vendored quiche.
    Quiche,
    /// BoringSSL: AES-GCM, header protection.
    Crypto,
    /// libc's allocator.
    Allocator,
    /// libc's memcpy, memmove, memset, memcmp.
    MemoryOps,
    /// Rust's standard library and other crates (hash maps, B-trees,
    /// octets), where not inlined into quiche's or the relay's functions.
    StdAndCrates,
    /// Anything else.
    Other,
}

impl Component {
    /// By the function's crate where its name says (code inlined from
    /// std counts towards the function it was inlined into), else by its
    /// source file.
    fn of(file: &str, function: &str) -> Self {
        let name = function.trim_start_matches('<');
        if name.starts_with("quiche::") {
            Component::Quiche
        } else if name.starts_with("relay_") {
            Component::Relay
        } else if file.contains("boringssl") || file.contains("boring-sys") {
            Component::Crypto
        } else if file.contains("/malloc/") {
            Component::Allocator
        } else if file.contains("/string/") || function.starts_with("__mem") {
            Component::MemoryOps
        } else if file.contains("vendor/quiche") {
            Component::Quiche
        } else if file.starts_with("dataplane/") || file.contains("/dataplane/") {
            Component::Relay
        } else if file.starts_with("/rustc/")
            || file.contains("/.cargo/registry/")
            || file.starts_with("/rust/")
        {
            Component::StdAndCrates
        } else {
            Component::Other
        }
    }

    fn label(self) -> &'static str {
        match self {
            Component::Relay => "relay code",
            Component::Quiche => "quiche",
            Component::Crypto => "BoringSSL (AEAD, header protection)",
            Component::Allocator => "malloc/free",
            Component::MemoryOps => "memcpy/memmove/memset/memcmp",
            Component::StdAndCrates => "std and other crates",
            Component::Other => "other",
        }
    }
}

/// One callgrind run's instruction counts.
#[derive(Default)]
struct Profile {
    total: u64,
    by_function: HashMap<String, u64>,
    by_component: HashMap<Component, u64>,
}

/// Options of `cargo xtask instr`.
struct Options {
    rounds: (u64, u64),
    top: usize,
    only: Option<String>,
}

fn options(args: &[String]) -> Result<Options> {
    let mut o = Options { rounds: (40, 120), top: 12, only: None };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = |it: &mut std::slice::Iter<String>| -> Result<String> {
            it.next().cloned().with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--rounds" => {
                let v = value(&mut it)?;
                let (a, b) = v.split_once(',').context("--rounds takes two counts: A,B")?;
                let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
                if a == 0 || b <= a {
                    bail!("--rounds A,B needs 0 < A < B, got {v}");
                }
                o.rounds = (a, b);
            }
            "--top" => o.top = value(&mut it)?.parse()?,
            "--only" => o.only = Some(value(&mut it)?),
            other => {
                bail!("unknown option {other} (--rounds A,B | --top N | --only upload|download|64|1200)")
            }
        }
    }
    Ok(o)
}

/// Builds the dataplane's unit tests (release profile) and returns the
/// test executable.
fn test_binary(root: &Path) -> Result<PathBuf> {
    let out = super::cargo()
        .args(["test", "--release", "-p", "relay-dataplane", "--lib", "--no-run", "--message-format=json"])
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the dataplane's tests failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines().filter(|l| l.contains("\"name\":\"relay_dataplane\"")) {
        if let Some(start) = line.find("\"executable\":\"") {
            let rest = &line[start + "\"executable\":\"".len()..];
            if let Some(end) = rest.find('"') {
                return Ok(root.join(&rest[..end]));
            }
        }
    }
    bail!("cargo did not name the relay-dataplane test executable")
}

/// Whether `program` runs (callgrind_annotate answers `--help` with an
/// error status, so only starting it counts).
fn have(program: &str) -> bool {
    Command::new(program).arg("--help").output().is_ok()
}

/// Runs `test` for `rounds` rounds under callgrind and reads its counts.
fn profile(binary: &Path, test: &str, rounds: u64, dir: &Path) -> Result<Profile> {
    let out_file = dir.join(format!("callgrind.{}.{rounds}", test.rsplit("::").next().unwrap_or(test)));
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--toggle-collect=relay_dataplane::worker::harness::worker_call*"])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(binary)
        .args(["--exact", test, "--test-threads", "1", "--quiet"])
        .env("RELAY_LOAD_ROUNDS", rounds.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("valgrind")?;
    if !status.success() {
        bail!("{test} failed under valgrind at {rounds} rounds ({status})");
    }
    let annotated = Command::new("callgrind_annotate")
        .args(["--threshold=100", "--inclusive=no", "--auto=no"])
        .arg(&out_file)
        .output()
        .context("callgrind_annotate")?;
    if !annotated.status.success() {
        bail!("callgrind_annotate failed: {}", String::from_utf8_lossy(&annotated.stderr));
    }
    Ok(parse(&String::from_utf8_lossy(&annotated.stdout)))
}

/// Reads `callgrind_annotate`'s listing: the program total, then the
/// table of one line per file:function (`1,234 (0.5%)
/// /src/file.rs:crate::function [object]`) up to the next rule (what
/// follows, annotated source or call lists, is not read).
fn parse(listing: &str) -> Profile {
    let mut p = Profile::default();
    let mut in_table = false;
    for line in listing.lines() {
        let line = line.trim();
        if line.ends_with("file:function") {
            in_table = true;
            continue;
        }
        if in_table && line.starts_with("----") {
            if p.by_function.is_empty() {
                continue;
            }
            break;
        }
        let Some((count, rest)) = line.split_once(' ') else { continue };
        let Ok(count) = count.replace(',', "").parse::<u64>() else { continue };
        let rest = rest.trim_start();
        let rest = rest.split_once(')').map_or(rest, |(_, r)| r).trim();
        if rest.starts_with("PROGRAM TOTALS") {
            p.total = count;
            continue;
        }
        if !in_table {
            continue;
        }
        let rest = rest.rsplit_once(" [").map_or(rest, |(r, _)| r);
        let (file, function) = rest.split_once(':').unwrap_or(("", rest));
        *p.by_function.entry(function.to_string()).or_default() += count;
        *p.by_component.entry(Component::of(file, function)).or_default() += count;
    }
    p
}

fn per_datagram(more: u64, less: u64, datagrams: u64) -> f64 {
    (more as f64 - less as f64) / datagrams as f64
}

/// `cargo xtask instr [--rounds A,B] [--top N] [--only WORD]`.
pub fn instr(args: &[String]) -> Result<()> {
    let o = options(args)?;
    for program in ["valgrind", "callgrind_annotate"] {
        if !have(program) {
            bail!("{program} is missing (Debian: apt-get install valgrind)");
        }
    }
    let root = super::root();
    let binary = test_binary(&root)?;
    let dir = root.join("target/instr");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let datagrams = (o.rounds.1 - o.rounds.0) * DATAGRAMS_PER_ROUND;
    let cases: Vec<&Case> =
        CASES.iter().filter(|c| o.only.as_deref().is_none_or(|w| c.name.contains(w))).collect();
    if cases.is_empty() {
        bail!("--only matched no case");
    }
    let mut summary = Vec::new();
    for case in cases {
        eprintln!("xtask: {} at {} and {} rounds under callgrind", case.name, o.rounds.0, o.rounds.1);
        let less = profile(&binary, case.test, o.rounds.0, &dir)?;
        let more = profile(&binary, case.test, o.rounds.1, &dir)?;
        let total = per_datagram(more.total, less.total, datagrams);
        println!("\n### {}: {total:.0} instructions per datagram\n", case.name);
        println!("| component | instructions per datagram | share |");
        println!("|---|---:|---:|");
        let mut components: Vec<_> = more
            .by_component
            .iter()
            .map(|(c, n)| (*c, per_datagram(*n, less.by_component.get(c).copied().unwrap_or(0), datagrams)))
            .collect();
        components.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (c, n) in components.iter().filter(|(_, n)| n.abs() >= 0.5) {
            println!("| {} | {n:.0} | {:.1}% |", c.label(), 100.0 * n / total);
        }
        println!("\n| function (self, inlined callees included) | instructions per datagram |");
        println!("|---|---:|");
        let mut functions: Vec<_> = more
            .by_function
            .iter()
            .map(|(f, n)| {
                (f.as_str(), per_datagram(*n, less.by_function.get(f).copied().unwrap_or(0), datagrams))
            })
            .collect();
        functions.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (f, n) in functions.iter().take(o.top) {
            println!("| `{}` | {n:.0} |", f.replace('|', "\\|"));
        }
        summary.push((case.name, total));
    }
    println!("\n| load (worker side, steady state) | instructions per datagram |");
    println!("|---|---:|");
    for (name, total) in summary {
        println!("| {name} | {total:.0} |");
    }
    println!(
        "\n(`cargo xtask instr --rounds {},{}`; callgrind files in {})",
        o.rounds.0,
        o.rounds.1,
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
44,037,419 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
10,333,254 (23.46%)  /t/boringssl/gen/bcm/aesni-gcm-x86_64-linux.S:_aesni_ctr32_ghash_6x [/t/bin]
 2,052,938 ( 4.66%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:__memcpy_avx_unaligned_erms [/usr/lib/libc.so.6]
 1,133,160 ( 2.57%)  dataplane/vendor/quiche/src/lib.rs:quiche::Connection<F>::recv_single [/t/bin]
   233,281 ( 0.53%)  /rustc/abc/library/core/src/result.rs:quiche::Connection<F>::recv_single
 1,030,437 ( 2.34%)  ./malloc/./malloc/malloc.c:_int_free [/usr/lib/libc.so.6]
   405,586 ( 0.92%)  dataplane/src/h3/conn.rs:relay_dataplane::h3::H3::on_packet

--------------------------------------------------------------------------------
-- Auto-annotated source: /work/main/dataplane/src/h3/conn.rs
--------------------------------------------------------------------------------
    12 ( 0.01%)  => /work/main/dataplane/src/h3/mod.rs:relay_dataplane::h3::H3::flush (3x)
";

    #[test]
    fn the_listing_is_read_per_function_and_per_component() {
        let p = parse(LISTING);
        assert_eq!(p.total, 44_037_419);
        assert_eq!(p.by_function["quiche::Connection<F>::recv_single"], 1_133_160 + 233_281);
        assert_eq!(p.by_component[&Component::Crypto], 10_333_254);
        assert_eq!(p.by_component[&Component::MemoryOps], 2_052_938);
        assert_eq!(p.by_component[&Component::Quiche], 1_133_160 + 233_281);
        assert!(!p.by_component.contains_key(&Component::StdAndCrates));
        assert_eq!(p.by_component[&Component::Allocator], 1_030_437);
        assert_eq!(p.by_component[&Component::Relay], 405_586);
        assert_eq!(p.by_function.len(), 5);
    }

    #[test]
    fn rounds_must_grow() {
        assert!(options(&["--rounds".into(), "40,40".into()]).is_err());
        assert!(options(&["--rounds".into(), "0,10".into()]).is_err());
        assert!(options(&["--rounds".into(), "10".into()]).is_err());
        assert_eq!(options(&["--rounds".into(), "10,30".into()]).unwrap().rounds, (10, 30));
        assert!(options(&["--bogus".into()]).is_err());
    }

    #[test]
    fn the_difference_of_two_runs_is_divided_by_the_extra_datagrams() {
        assert_eq!(per_datagram(3_000, 1_000, 400), 5.0);
        assert_eq!(per_datagram(1_000, 1_200, 100), -2.0);
    }
}

//! `perf` profiles of the dataplane while the bench loads it, and what is
//! made of them: the hottest symbols as text and, when inferno is
//! installed (`cargo install inferno`), a flame graph.
//!
//! `perf record` follows the dataplane's process with DWARF call graphs
//! (release builds keep no frame pointers) at a modest frequency, so the
//! profile costs the relay little and the data stays small.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Samples per second per CPU.
const FREQUENCY: &str = "499";

/// A `perf record` of one process, running.
pub struct Recording {
    child: Child,
    data: PathBuf,
    stem: PathBuf,
}

impl Recording {
    /// Starts recording process `pid` into `dir/<name>.perf.data`.
    pub fn start(dir: &Path, name: &str, pid: u32) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stem = dir.join(name);
        let data = stem.with_extension("perf.data");
        let child = Command::new("perf")
            .args(["record", "-q", "-F", FREQUENCY, "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (Debian: apt install linux-perf)")?;
        // perf attaches asynchronously; give it a moment so the run's start
        // is in the profile.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child, data, stem })
    }

    /// Stops the recording and writes `<name>.top.txt` (the symbols with
    /// the most samples, self time) and, with inferno, `<name>.svg`.
    pub fn finish(mut self) -> Result<()> {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let status = self.child.wait()?;
        if !status.success() && !self.data.exists() {
            bail!("perf record failed: {status}");
        }
        let top = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,symbol",
                "--percent-limit",
                "0.5",
                "-i",
            ])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf report")?;
        std::fs::write(self.stem.with_extension("top.txt"), &top.stdout)?;
        if which("inferno-collapse-perf") && which("inferno-flamegraph") {
            let folded = self.stem.with_extension("folded");
            let script = Command::new("perf")
                .args(["script", "-i"])
                .arg(&self.data)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("perf script")?;
            let collapsed = Command::new("inferno-collapse-perf")
                .stdin(script.stdout.context("perf script output")?)
                .stdout(File::create(&folded)?)
                .status()?;
            if collapsed.success() {
                Command::new("inferno-flamegraph")
                    .args([
                        "--title",
                        &self.stem.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    ])
                    .stdin(File::open(&folded)?)
                    .stdout(File::create(self.stem.with_extension("svg"))?)
                    .status()?;
            }
        } else {
            eprintln!(
                "bench: no inferno-flamegraph on PATH: profile kept as {} (cargo install inferno)",
                self.data.display()
            );
        }
        Ok(())
    }
}

/// Whether `program` is on PATH.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

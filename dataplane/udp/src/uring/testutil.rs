//! Test helpers: the probe gate and bounded waiting.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode};

use super::{UringSupport, probe};

/// The probe, once per test binary. `None` (after saying why) when io_uring
/// cannot run the fast path here; under `CI` that is a failure, never a
/// silent skip.
pub(crate) fn require_uring() -> Option<UringSupport> {
    static SUPPORT: OnceLock<UringSupport> = OnceLock::new();
    let support = SUPPORT.get_or_init(probe).clone();
    if support.is_usable() {
        return Some(support);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "CI must run the io_uring tests: {support}");
    eprintln!("skipping io_uring test: {support}");
    None
}

pub(crate) fn ring(entries: u32) -> IoUring {
    IoUring::new(entries).expect("io_uring_setup")
}

/// A completion, copied out of the ring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cqe {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Cqe {
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// Submits what is queued and collects completions until there are at
/// least `min` or `timeout` passed.
pub(crate) fn wait(ring: &mut IoUring, min: usize, timeout: Duration) -> Vec<Cqe> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        out.extend(ring.completion().map(|c| Cqe {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
        let now = Instant::now();
        if out.len() >= min || now >= deadline {
            return out;
        }
        let left = (deadline - now).min(Duration::from_millis(100));
        let ts = Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(min - out.len(), &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
    }
}

/// Pushes `entry` (whose memory the caller keeps alive) and submits it.
pub(crate) fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) {
    // SAFETY: callers keep the memory the entry points to alive until its
    // final completion.
    unsafe { ring.submission().push(entry).expect("submission queue full") };
    ring.submit().expect("io_uring_enter");
}

/// Cancels the multishot request `user_data` and waits (bounded) for its
/// final completion; returns every completion seen meanwhile.
pub(crate) fn cancel(ring: &mut IoUring, user_data: u64) -> Vec<Cqe> {
    push(ring, &opcode::AsyncCancel::new(user_data).build().user_data(u64::MAX));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let got = wait(ring, 1, Duration::from_millis(200));
        let done = got.iter().any(|c| {
            (c.user_data == user_data && !c.more()) || (c.user_data == u64::MAX && c.result == -libc::ENOENT)
        });
        seen.extend(got);
        if done {
            return seen;
        }
    }
    panic!("multishot {user_data} did not end after cancel: {seen:?}");
}

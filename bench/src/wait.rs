//! Bounded waits for the tests: rather than sleeping a fixed time and
//! hoping that something has happened by then, a test polls the condition
//! it is about to assert until it holds, and fails with a message naming
//! it if it does not within a generous bound. A fast machine goes on as
//! soon as the condition holds; a slow, busy one gets all the time it
//! needs up to the bound.

use std::time::{Duration, Instant};

/// The bound for waits on things that normally take milliseconds (a
/// process noticing a socket close, a counter being published): generous,
/// because CI machines are small and busy, and free when the condition
/// holds early.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns true; panics naming `what` if `timeout`
/// passes first.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()))
}

/// Polls `probe` until it returns `Some` and returns the value; panics
/// naming `what` if `timeout` passes first.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut calls = 0;
        let v = wait_for("the third call", PATIENCE, || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!((v, calls), (30, 3));
    }

    #[test]
    #[should_panic(expected = "waiting for something that never happens")]
    fn fails_naming_the_condition_past_the_bound() {
        wait_until("something that never happens", Duration::from_millis(50), || false);
    }
}

//! A worker core for the backends' tests: every turn asks for another at
//! once (a connection with work left) while one end of a socket pair is
//! watched and the other end is written once the watch is armed. A backend
//! must still deliver the readiness although its turns never wait (the
//! io_uring backend once did not: its busy turns entered without
//! GETEVENTS).

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::{Handler, Output, Ready, TargetKey, Turn, Wake, Watch, WatchKey};

/// A core whose every turn asks for another one at once (a connection
/// with work left), watching one end of a socket pair; the other end is
/// written once the watch is armed.
pub(crate) struct BusyCore {
    out: Output,
    watched: UnixStream,
    peer: UnixStream,
    bells: TestBells,
    now: Instant,
    turns: u32,
    written_at: Option<u32>,
    readied_at: Option<u32>,
}

const KEY: WatchKey = 7;

impl Handler for BusyCore {
    fn begin_turn(&mut self, now: Instant) {
        self.now = now;
        self.turns += 1;
    }
    fn on_quic(&mut self, _: &mut [u8], _: usize, _: SocketAddr) {}
    fn on_target(&mut self, _: TargetKey, _: Option<SocketAddr>, _: &[u8], _: usize) {}
    fn on_ready(&mut self, key: WatchKey, ready: Ready) {
        if key == KEY && ready.readable && self.written_at.is_some() {
            self.readied_at.get_or_insert(self.turns);
        }
    }
    fn on_wake(&mut self, _: Wake) {}
    fn end_turn(&mut self) -> Turn {
        match self.turns {
            1 => self.out.watches.push(Watch { key: KEY, fd: self.watched.as_raw_fd(), writable: false }),
            // The poll went in with turn 2's enter: the byte arrives
            // while it waits, so its completion is task work.
            3 => {
                self.peer.write_all(b"x").expect("write to the watched socket");
                self.written_at = Some(self.turns);
            }
            _ => {}
        }
        if self.readied_at.is_some() || self.turns >= 100 {
            return Turn::Stop;
        }
        Turn::Continue { deadline: self.now }
    }
    fn output(&mut self) -> &mut Output {
        &mut self.out
    }
    fn answer_bell(&self) -> (RawFd, u64) {
        self.bells.answer()
    }
    fn worker_bell(&self) -> RawFd {
        self.bells.worker()
    }
}

impl BusyCore {
    /// A core with its socket pairs.
    pub(crate) fn new() -> Self {
        let (watched, peer) = UnixStream::pair().expect("socket pair");
        Self {
            out: Output::new(),
            watched,
            peer,
            bells: TestBells::new(),
            now: Instant::now(),
            turns: 0,
            written_at: None,
            readied_at: None,
        }
    }

    /// Checks that the readiness written at the end of turn 3 reached the
    /// core by turn `by`.
    pub(crate) fn assert_readied_within(&self, by: u32) {
        assert_eq!(self.written_at, Some(3));
        let readied =
            self.readied_at.expect("the watched socket's readiness never came while turns were busy");
        assert!(readied <= by, "readiness came only in turn {readied}");
    }
}

/// The two doorbells a test core hands its backend (control's answers,
/// the worker's own), with their other ends kept open: a closed peer
/// would ring them.
pub(crate) struct TestBells {
    answer: (UnixStream, UnixStream),
    worker: (UnixStream, UnixStream),
}

impl TestBells {
    /// Two fresh socket pairs.
    pub(crate) fn new() -> Self {
        Self {
            answer: UnixStream::pair().expect("socket pair"),
            worker: UnixStream::pair().expect("socket pair"),
        }
    }

    /// The answer doorbell and its link epoch.
    pub(crate) fn answer(&self) -> (RawFd, u64) {
        (self.answer.0.as_raw_fd(), 1)
    }

    /// The worker's doorbell.
    pub(crate) fn worker(&self) -> RawFd {
        self.worker.0.as_raw_fd()
    }
}

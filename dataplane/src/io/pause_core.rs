//! A worker core for the backends' tests of paused target reads: it opens
//! one connected endpoint, reads a datagram from it, pauses it, has the
//! target send more while paused, and resumes it some turns later. A
//! backend must deliver nothing from a paused endpoint and, once resumed,
//! what the target sent meanwhile (the kernel kept it in the socket).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::busy_core::TestBells;
use super::{Endpoint, Handler, Output, TargetKey, Turn, Wake};

const KEY: TargetKey = 3;
/// Datagrams the target sends while the endpoint is paused.
const WHILE_PAUSED: usize = 3;
/// Turns the endpoint stays paused after the target sent.
const PAUSED_TURNS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first datagram.
    Reading,
    /// The pause was asked for at the end of this turn.
    PauseAsked(u32),
    /// The target sent its datagrams at the end of this turn.
    SentWhilePaused(u32),
    /// The resume was asked for at the end of this turn.
    Resumed(u32),
}

pub(crate) struct PauseCore {
    out: Output,
    bells: TestBells,
    /// The target's side: connected to the endpoint.
    target: UdpSocket,
    /// The endpoint, until it is handed over.
    endpoint: Option<UdpSocket>,
    now: Instant,
    turns: u32,
    phase: Phase,
    /// Payloads received, with the phase they arrived in.
    received: Vec<(Vec<u8>, Phase)>,
}

impl PauseCore {
    /// A core with its target and endpoint sockets on loopback.
    pub(crate) fn new() -> Self {
        let target = UdpSocket::bind("127.0.0.1:0").expect("bind target");
        let endpoint = UdpSocket::bind("127.0.0.1:0").expect("bind endpoint");
        endpoint.connect(target.local_addr().expect("addr")).expect("connect endpoint");
        target.connect(endpoint.local_addr().expect("addr")).expect("connect target");
        Self {
            out: Output::new(),
            bells: TestBells::new(),
            target,
            endpoint: Some(endpoint),
            now: Instant::now(),
            turns: 0,
            phase: Phase::Reading,
            received: Vec::new(),
        }
    }

    /// Checks that nothing came while paused and everything after.
    pub(crate) fn assert_paused_then_resumed(&self) {
        let mut expected = vec![b"before".to_vec()];
        expected.extend((0..WHILE_PAUSED).map(|i| format!("paused {i}").into_bytes()));
        let payloads: Vec<_> = self.received.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(payloads, expected, "phases: {:?}", self.received);
        for (payload, phase) in &self.received[1..] {
            assert!(
                matches!(phase, Phase::Resumed(_)),
                "{:?} arrived while paused ({phase:?})",
                String::from_utf8_lossy(payload)
            );
        }
    }
}

impl Handler for PauseCore {
    fn begin_turn(&mut self, now: Instant) {
        self.now = now;
        self.turns += 1;
    }
    fn on_quic(&mut self, _: &mut [u8], _: usize, _: SocketAddr) {}
    fn on_target(&mut self, key: TargetKey, _: Option<SocketAddr>, payloads: &[u8], segment_size: usize) {
        assert_eq!(key, KEY);
        for p in payloads.chunks(segment_size.max(1)) {
            self.received.push((p.to_vec(), self.phase));
        }
    }
    fn on_wake(&mut self, _: Wake) {}
    fn end_turn(&mut self) -> Turn {
        if let Some(sock) = self.endpoint.take() {
            self.out.opens.push(Endpoint { key: KEY, sock, connected: true });
        } else if self.turns == 2 {
            // The endpoint's receive went in with this turn's enter.
            self.target.send(b"before").expect("send");
        }
        match self.phase {
            Phase::Reading if !self.received.is_empty() => {
                self.out.pauses.push(KEY);
                self.phase = Phase::PauseAsked(self.turns);
            }
            // Two turns later: the pause (and, on io_uring, the
            // cancellation of the receive) is in the kernel.
            Phase::PauseAsked(t) if self.turns >= t + 2 => {
                for i in 0..WHILE_PAUSED {
                    self.target.send(format!("paused {i}").as_bytes()).expect("send");
                }
                self.phase = Phase::SentWhilePaused(self.turns);
            }
            Phase::SentWhilePaused(t) if self.turns >= t + PAUSED_TURNS => {
                self.out.resumes.push(KEY);
                self.phase = Phase::Resumed(self.turns);
            }
            _ => {}
        }
        if self.received.len() > WHILE_PAUSED || self.turns >= 200 {
            return Turn::Stop;
        }
        Turn::Continue { deadline: self.now + Duration::from_millis(5) }
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

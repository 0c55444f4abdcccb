//! The IPv6 link MTU check of a connect-ip tunnel (RFC 9484 section 7.2):
//! "IP proxying endpoints that operate as routers and support IPv6 MUST
//! ensure that the IP tunnel link MTU is at least 1280 bytes", by sending
//! "ICMPv6 echo requests with 1232 bytes of data" and tearing the tunnel
//! down "if they do not receive a response".
//!
//! [`MtuProbe`] is the schedule: a probe at once, another every
//! [`PROBE_INTERVAL`] until a full reply arrives or the timeout after the
//! first one passes. Only tunnels whose packets travel in QUIC DATAGRAM
//! frames need it: DATAGRAM capsules on a stream carry packets of any size
//! (the caller decides, [`MtuProbe::not_needed`]). Sans-IO.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Time between probes.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Where a tunnel's link check stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MtuProbe {
    /// Nothing to check: no IPv6 address, the check is off, or the link
    /// is a stream that carries any size.
    Off,
    /// Probing.
    Probing {
        /// The Identifier of the probes (sequence numbers count up from 1).
        identifier: u16,
        /// Probes sent.
        sent: u16,
        /// When the next probe is due.
        next: Instant,
        /// When the tunnel fails the check (set by the first probe sent).
        deadline: Option<Instant>,
        /// How long after the first probe a reply may come.
        timeout: Duration,
    },
    /// A full reply came back: the link carries 1280-byte packets.
    Confirmed,
}

/// What the tunnel does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTick {
    /// Nothing yet.
    Wait,
    /// Send the probe with this sequence number.
    Send {
        /// Identifier field.
        identifier: u16,
        /// Sequence Number field.
        sequence: u16,
    },
    /// No reply in time: tear the tunnel down.
    Failed,
}

impl MtuProbe {
    /// A check starting now; replies are awaited `timeout` after the first
    /// probe.
    pub fn start(now: Instant, identifier: u16, timeout: Duration) -> Self {
        MtuProbe::Probing { identifier, sent: 0, next: now, deadline: None, timeout }
    }

    /// When the check next needs the tunnel's timer.
    pub fn due(&self) -> Option<Instant> {
        match self {
            MtuProbe::Probing { next, deadline, .. } => Some(deadline.map_or(*next, |d| (*next).min(d))),
            MtuProbe::Off | MtuProbe::Confirmed => None,
        }
    }

    /// What to do at `now`.
    pub fn tick(&self, now: Instant) -> ProbeTick {
        match self {
            MtuProbe::Probing { deadline: Some(d), .. } if now >= *d => ProbeTick::Failed,
            MtuProbe::Probing { identifier, sent, next, .. } if now >= *next => {
                ProbeTick::Send { identifier: *identifier, sequence: sent.wrapping_add(1) }
            }
            _ => ProbeTick::Wait,
        }
    }

    /// The probe [`tick`](Self::tick) asked for went out at `now`.
    pub fn sent(&mut self, now: Instant) {
        if let MtuProbe::Probing { sent, next, deadline, timeout, .. } = self {
            *sent = sent.wrapping_add(1);
            *next = now + PROBE_INTERVAL;
            deadline.get_or_insert(now + *timeout);
        }
    }

    /// The probe could not go out yet (the client's SETTINGS, which say
    /// whether it takes datagrams, have not arrived): try again later, the
    /// clock not started.
    pub fn postpone(&mut self, now: Instant) {
        if let MtuProbe::Probing { next, .. } = self {
            *next = now + PROBE_INTERVAL;
        }
    }

    /// The client's SETTINGS arrived: a check that has not sent its first
    /// probe sends it now.
    pub fn resume(&mut self, now: Instant) {
        if let MtuProbe::Probing { sent: 0, next, .. } = self {
            *next = now;
        }
    }

    /// The link carries any size: no check.
    pub fn not_needed(&mut self) {
        *self = MtuProbe::Off;
    }

    /// A full Echo Reply with `identifier` and `sequence` came back.
    /// Returns whether it answered one of this check's probes.
    pub fn on_reply(&mut self, identifier: u16, sequence: u16) -> bool {
        match self {
            MtuProbe::Probing { identifier: id, sent, .. }
                if *id == identifier && sequence != 0 && sequence <= *sent =>
            {
                *self = MtuProbe::Confirmed;
                true
            }
            _ => false,
        }
    }

    /// Whether the check is waiting for a reply.
    pub fn probing(&self) -> bool {
        matches!(self, MtuProbe::Probing { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn probes_go_out_each_interval_until_the_timeout_after_the_first() {
        let t0 = Instant::now();
        let mut p = MtuProbe::start(t0, 9, TIMEOUT);
        assert_eq!(p.due(), Some(t0));
        let mut sent = Vec::new();
        let mut now = t0;
        loop {
            match p.tick(now) {
                ProbeTick::Send { identifier, sequence } => {
                    assert_eq!(identifier, 9);
                    sent.push(sequence);
                    p.sent(now);
                }
                ProbeTick::Wait => {}
                ProbeTick::Failed => break,
            }
            now = p.due().expect("still probing");
        }
        assert_eq!(sent, [1, 2, 3, 4, 5]);
        assert_eq!(now, t0 + TIMEOUT, "fails at the timeout after the first probe");
    }

    #[test]
    fn a_reply_to_any_probe_sent_confirms_and_stops_the_probes() {
        let t0 = Instant::now();
        let mut p = MtuProbe::start(t0, 9, TIMEOUT);
        p.sent(t0);
        p.sent(t0 + PROBE_INTERVAL);
        assert!(!p.on_reply(8, 1), "another identifier");
        assert!(!p.on_reply(9, 3), "a probe never sent");
        assert!(!p.on_reply(9, 0));
        assert!(p.probing());
        assert!(p.on_reply(9, 1), "a late reply to the first probe counts");
        assert_eq!(p, MtuProbe::Confirmed);
        assert_eq!(p.due(), None);
        assert_eq!(p.tick(t0 + TIMEOUT * 10), ProbeTick::Wait);
        assert!(!p.on_reply(9, 1), "only once");
    }

    #[test]
    fn postponing_does_not_start_the_clock() {
        let t0 = Instant::now();
        let mut p = MtuProbe::start(t0, 1, TIMEOUT);
        for i in 0..10 {
            let now = t0 + PROBE_INTERVAL * i;
            assert!(matches!(p.tick(now), ProbeTick::Send { sequence: 1, .. }));
            p.postpone(now);
        }
        let now = t0 + PROBE_INTERVAL * 10;
        assert!(matches!(p.tick(now), ProbeTick::Send { sequence: 1, .. }));
        p.sent(now);
        assert_eq!(
            p.tick(now + TIMEOUT - Duration::from_millis(1)),
            ProbeTick::Send { identifier: 1, sequence: 2 }
        );
        assert_eq!(p.tick(now + TIMEOUT), ProbeTick::Failed);
    }

    #[test]
    fn a_link_that_carries_any_size_needs_no_check() {
        let t0 = Instant::now();
        let mut p = MtuProbe::start(t0, 1, TIMEOUT);
        p.not_needed();
        assert_eq!(p.due(), None);
        assert_eq!(p.tick(t0 + TIMEOUT), ProbeTick::Wait);
        assert!(!p.on_reply(1, 1));
    }
}

//! One connect-udp tunnel's state machine (sans-IO).
//!
//! A tunnel is born when a valid request is sent to control for
//! authorization (`Pending`), becomes `Open` when control allows it and the
//! 2xx is sent, and ends when its stream ends or resets, it idles out, or
//! its connection closes. The worker feeds it client payloads (from QUIC
//! datagrams or DATAGRAM capsules) and target payloads, and asks it which
//! path to use towards the client; it never touches a socket.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_proto::capsule::{self, Capsule, CapsuleDecoder, CapsuleError};
use relay_proto::datagram::UDP_PAYLOAD_CONTEXT;
use relay_proto::varint;

/// Where a tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for control's answer to `ask_id`.
    Pending {
        /// The ask in flight.
        ask_id: u64,
        /// When to give up and answer 503.
        deadline: Instant,
    },
    /// Forwarding.
    Open {
        /// Control's flow ID.
        flow_id: u64,
        /// The target address.
        target: SocketAddr,
    },
}

/// How the relay sends target payloads to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownPath {
    /// As HTTP/3 datagrams in QUIC DATAGRAM frames.
    QuicDatagram,
    /// As DATAGRAM capsules on the request stream.
    Capsule,
    /// Not known yet (the client's SETTINGS have not arrived): queue.
    Wait,
}

/// What happened to a client payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpOutcome {
    /// Forward to the target now.
    Forward,
    /// Buffered until the tunnel opens.
    Buffered,
    /// Dropped: the bounded buffer is full.
    DroppedQueueFull,
    /// Dropped: unknown context ID (RFC 9298 section 4).
    DroppedUnknownContext,
    /// A context-0 payload longer than 65527 bytes: RFC 9298 section 5
    /// says the receiver "MUST abort the corresponding stream".
    AbortTooLarge,
}

/// Longest UDP payload a context-0 datagram may carry (RFC 9298 section 5).
pub const MAX_UDP_PAYLOAD: usize = 65_527;

/// Per-tunnel traffic totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Datagrams client -> target.
    pub packets_up: u64,
    /// Payload bytes client -> target.
    pub bytes_up: u64,
    /// Datagrams target -> client.
    pub packets_down: u64,
    /// Payload bytes target -> client.
    pub bytes_down: u64,
}

impl Totals {
    /// The report of flow `flow_id` ending with these totals.
    pub fn closed(&self, flow_id: u64) -> relay_proto::channel::record::FlowClosed {
        relay_proto::channel::record::FlowClosed {
            flow_id,
            packets_up: self.packets_up,
            bytes_up: self.bytes_up,
            packets_down: self.packets_down,
            bytes_down: self.bytes_down,
        }
    }
}

/// A connect-udp tunnel.
#[derive(Debug)]
pub struct Tunnel {
    /// The request stream.
    pub stream_id: u64,
    /// Current phase.
    pub phase: Phase,
    /// Traffic totals.
    pub totals: Totals,
    decoder: CapsuleDecoder,
    early_up: VecDeque<Vec<u8>>,
    waiting_down: VecDeque<Vec<u8>>,
    max_queued: usize,
    stream_out: Vec<u8>,
    stream_out_limit: usize,
    last_activity: Instant,
    idle_timeout: Duration,
    client_used_capsules: bool,
    client_used_datagrams: bool,
    byte_budget: u64,
    /// A connect-ip tunnel (RFC 9484): payloads are IP packets, and the
    /// address and route capsules are kept for the worker.
    ip: bool,
    /// connect-ip capsules received and not yet handled (type, value).
    control_in: VecDeque<(u64, Vec<u8>)>,
    /// A bound connect-udp tunnel: every context is the worker's to
    /// interpret (its context table), so payloads queue here with theirs.
    bind: bool,
    /// Bound-tunnel datagrams received and not yet handled (context, payload).
    bind_in: VecDeque<(u64, Vec<u8>)>,
}

/// The connect-ip capsule types a tunnel keeps (RFC 9484 section 4.7).
const IP_CAPSULES: &[u64] = &[0x01, 0x02, 0x03];
/// connect-ip capsules a tunnel holds before the worker handles them.
const MAX_CONTROL_IN: usize = 256;
/// Largest IP packet a context-0 datagram of a connect-ip tunnel carries.
pub const MAX_IP_PACKET: usize = 65_535;

impl Tunnel {
    /// A tunnel waiting for control's answer.
    pub fn pending(stream_id: u64, ask_id: u64, now: Instant, ask_timeout: Duration, limits: Limits) -> Self {
        Self {
            stream_id,
            phase: Phase::Pending { ask_id, deadline: now + ask_timeout },
            totals: Totals::default(),
            decoder: CapsuleDecoder::new(limits.max_capsule_len),
            early_up: VecDeque::new(),
            waiting_down: VecDeque::new(),
            max_queued: limits.max_queued_datagrams,
            stream_out: Vec::new(),
            stream_out_limit: limits.stream_out_limit,
            last_activity: now,
            idle_timeout: ask_timeout,
            client_used_capsules: false,
            client_used_datagrams: false,
            byte_budget: 0,
            ip: false,
            control_in: VecDeque::new(),
            bind: false,
            bind_in: VecDeque::new(),
        }
    }

    /// A bound connect-udp tunnel waiting for control's answer; its
    /// decoder keeps `kept` capsule types (the compression capsules).
    pub fn pending_bind(
        stream_id: u64,
        ask_id: u64,
        now: Instant,
        ask_timeout: Duration,
        limits: Limits,
        kept: &'static [u64],
    ) -> Self {
        let mut t = Self::pending(stream_id, ask_id, now, ask_timeout, limits);
        t.decoder = CapsuleDecoder::new(limits.max_capsule_len).keep(kept);
        t.bind = true;
        t
    }

    /// Whether this is a bound tunnel.
    pub fn is_bind(&self) -> bool {
        self.bind
    }

    /// Takes the bound-tunnel datagrams received (context, payload).
    pub fn take_bind_datagrams(&mut self) -> VecDeque<(u64, Vec<u8>)> {
        std::mem::take(&mut self.bind_in)
    }

    /// A connect-ip tunnel waiting for control's answer.
    pub fn pending_ip(
        stream_id: u64,
        ask_id: u64,
        now: Instant,
        ask_timeout: Duration,
        limits: Limits,
    ) -> Self {
        let mut t = Self::pending(stream_id, ask_id, now, ask_timeout, limits);
        t.decoder = CapsuleDecoder::new(limits.max_capsule_len).keep(IP_CAPSULES);
        t.ip = true;
        t
    }

    /// Whether this is a connect-ip tunnel.
    pub fn is_ip(&self) -> bool {
        self.ip
    }

    /// Takes the connect-ip capsules received (type, value), in order.
    pub fn take_control(&mut self) -> VecDeque<(u64, Vec<u8>)> {
        std::mem::take(&mut self.control_in)
    }

    /// Control allowed the tunnel: it is open, and may carry `byte_budget`
    /// payload bytes both ways (0: no limit). Returns the payloads the
    /// client sent early, to forward now in order.
    pub fn open(
        &mut self,
        flow_id: u64,
        target: SocketAddr,
        idle_timeout: Duration,
        byte_budget: u64,
        now: Instant,
    ) -> Vec<Vec<u8>> {
        self.phase = Phase::Open { flow_id, target };
        self.idle_timeout = idle_timeout;
        self.byte_budget = byte_budget;
        self.last_activity = now;
        self.early_up.drain(..).collect()
    }

    /// Replaces the idle timeout (a TCP tunnel runs with its connect
    /// timeout until the target is up).
    pub fn set_idle_timeout(&mut self, idle_timeout: Duration) {
        self.idle_timeout = idle_timeout;
    }

    /// Records activity now (the idle timeout starts again).
    pub fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// Accounts bytes of a byte-stream tunnel (TCP CONNECT) both ways.
    pub fn add_stream_bytes(&mut self, up: u64, down: u64, now: Instant) {
        self.totals.bytes_up += up;
        self.totals.bytes_down += down;
        self.last_activity = now;
    }

    /// The flow ID if open.
    pub fn flow_id(&self) -> Option<u64> {
        match self.phase {
            Phase::Open { flow_id, .. } => Some(flow_id),
            Phase::Pending { .. } => None,
        }
    }

    /// A client payload arrived as an HTTP/3 datagram (already split into
    /// context ID and payload).
    pub fn on_quic_datagram(&mut self, context_id: u64, payload: &[u8], now: Instant) -> UpOutcome {
        self.client_used_datagrams = true;
        self.on_payload(context_id, payload, now)
    }

    fn on_payload(&mut self, context_id: u64, payload: &[u8], now: Instant) -> UpOutcome {
        if self.bind {
            // Every context is the context table's; bounded like early
            // payloads (the worker drains the queue every turn).
            if self.bind_in.len() >= self.max_queued.max(1) * 4 {
                return UpOutcome::DroppedQueueFull;
            }
            if matches!(self.phase, Phase::Open { .. }) {
                self.last_activity = now;
                self.totals.packets_up += 1;
                self.totals.bytes_up += payload.len() as u64;
            }
            self.bind_in.push_back((context_id, payload.to_vec()));
            return UpOutcome::Buffered;
        }
        if context_id != UDP_PAYLOAD_CONTEXT {
            // RFC 9298 section 5: we register no other contexts, so the
            // datagram is dropped silently (and counted).
            return UpOutcome::DroppedUnknownContext;
        }
        let limit = if self.ip { MAX_IP_PACKET } else { MAX_UDP_PAYLOAD };
        if payload.len() > limit {
            return UpOutcome::AbortTooLarge;
        }
        match self.phase {
            Phase::Open { .. } => {
                self.last_activity = now;
                self.totals.packets_up += 1;
                self.totals.bytes_up += payload.len() as u64;
                UpOutcome::Forward
            }
            Phase::Pending { .. } => {
                if self.early_up.len() >= self.max_queued {
                    UpOutcome::DroppedQueueFull
                } else {
                    self.early_up.push_back(payload.to_vec());
                    UpOutcome::Buffered
                }
            }
        }
    }

    /// Request stream bytes arrived (the capsule protocol). Calls `forward`
    /// with each UDP payload to send to the target now, and `count` with
    /// each payload's outcome.
    pub fn on_stream_bytes(
        &mut self,
        bytes: &[u8],
        now: Instant,
        mut on_payload: impl FnMut(UpOutcome, &[u8]),
    ) -> Result<(), CapsuleError> {
        let mut capsules = Vec::new();
        self.decoder.feed(bytes, |c| capsules.push(c))?;
        let mut datagrams = Vec::new();
        let mut overflow = false;
        for c in capsules {
            match c {
                Capsule::Datagram(value) => datagrams.push(value),
                Capsule::Other { capsule_type, value } => {
                    // Bounded: address requests and compression capsules
                    // each need an answer, so none may be dropped silently;
                    // a client that sends more at once than the worker
                    // holds has its stream aborted (below).
                    if self.control_in.len() < MAX_CONTROL_IN {
                        self.control_in.push_back((capsule_type, value));
                    } else {
                        overflow = true;
                    }
                }
            }
        }
        if overflow {
            return Err(CapsuleError::TooMany { limit: MAX_CONTROL_IN });
        }
        for value in datagrams {
            self.client_used_capsules = true;
            // RFC 9298 section 5: a datagram whose context ID cannot be
            // parsed is dropped.
            let Ok((context_id, used)) = varint::decode(&value) else {
                on_payload(UpOutcome::DroppedUnknownContext, &[]);
                continue;
            };
            let payload = &value[used..];
            let outcome = self.on_payload(context_id, payload, now);
            on_payload(outcome, payload);
        }
        Ok(())
    }

    /// The client ended its side of the stream: an error if it cut a
    /// capsule short.
    pub fn on_stream_end(&self) -> Result<(), CapsuleError> {
        self.decoder.finish()
    }

    /// Chooses the path for target payloads. `peer_settings_known` and
    /// `peer_h3_datagrams` describe the client's SETTINGS. A client that
    /// speaks to us only in DATAGRAM capsules gets capsules back.
    pub fn down_path(&self, peer_settings_known: bool, peer_h3_datagrams: bool) -> DownPath {
        if self.client_used_capsules && !self.client_used_datagrams {
            return DownPath::Capsule;
        }
        match (peer_settings_known, peer_h3_datagrams) {
            (false, _) => DownPath::Wait,
            (true, true) => DownPath::QuicDatagram,
            (true, false) => DownPath::Capsule,
        }
    }

    /// Accounts a target payload sent to the client.
    pub fn on_down(&mut self, len: usize, now: Instant) {
        self.last_activity = now;
        self.totals.packets_down += 1;
        self.totals.bytes_down += len as u64;
    }

    /// Queues a target payload until the down path is known; `false` if the
    /// bounded queue is full (the payload is dropped).
    pub fn queue_down(&mut self, payload: &[u8]) -> bool {
        if self.waiting_down.len() >= self.max_queued {
            return false;
        }
        self.waiting_down.push_back(payload.to_vec());
        true
    }

    /// Takes the payloads queued while the down path was unknown.
    pub fn take_waiting_down(&mut self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut self.waiting_down)
    }

    /// Appends a DATAGRAM capsule for `payload` to the stream output buffer;
    /// `false` if the bounded buffer has no room (the payload is dropped).
    pub fn push_capsule(&mut self, payload: &[u8]) -> bool {
        self.push_capsule_ctx(UDP_PAYLOAD_CONTEXT, payload)
    }

    /// As [`Self::push_capsule`], with `context_id` (bound tunnels).
    pub fn push_capsule_ctx(&mut self, context_id: u64, payload: &[u8]) -> bool {
        let needed = payload.len() + 3 * varint::MAX_LEN;
        if self.stream_out.len() + needed > self.stream_out_limit {
            return false;
        }
        capsule::encode_datagram(context_id, payload, &mut self.stream_out);
        true
    }

    /// Appends an encoded capsule (connect-ip's address and route capsules)
    /// to the stream output; `false` if the bounded buffer has no room.
    pub fn push_raw_capsule(&mut self, capsule: &[u8]) -> bool {
        if self.stream_out.len() + capsule.len() > self.stream_out_limit {
            return false;
        }
        self.stream_out.extend_from_slice(capsule);
        true
    }

    /// Bytes waiting to be written on the request stream.
    pub fn stream_out(&self) -> &[u8] {
        &self.stream_out
    }

    /// Marks `n` bytes of [`Self::stream_out`] as written.
    pub fn consume_stream_out(&mut self, n: usize) {
        self.stream_out.drain(..n.min(self.stream_out.len()));
    }

    /// Whether the tunnel has carried at least its byte budget (never when
    /// it has none).
    pub fn over_budget(&self) -> bool {
        self.byte_budget != 0 && self.totals.bytes_up + self.totals.bytes_down >= self.byte_budget
    }

    /// Whether an open tunnel has idled out, or a pending one timed out.
    pub fn expired(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Pending { deadline, .. } => now >= deadline,
            Phase::Open { .. } => now.saturating_duration_since(self.last_activity) >= self.idle_timeout,
        }
    }

    /// When [`Self::expired`] will next become true.
    pub fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Pending { deadline, .. } => deadline,
            Phase::Open { .. } => self.last_activity + self.idle_timeout,
        }
    }
}

/// Bounds applied to every tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest capsule value accepted.
    pub max_capsule_len: usize,
    /// Datagrams buffered each way while the tunnel is pending or the down
    /// path is unknown.
    pub max_queued_datagrams: usize,
    /// Bytes of capsules buffered for the request stream.
    pub stream_out_limit: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_capsule_len: 2048, max_queued_datagrams: 2, stream_out_limit: 4096 };

    fn tunnel(now: Instant) -> Tunnel {
        Tunnel::pending(4, 9, now, Duration::from_secs(2), LIMITS)
    }

    #[test]
    fn early_payloads_are_bounded_then_released_in_order() {
        let now = Instant::now();
        let mut t = tunnel(now);
        assert_eq!(t.on_quic_datagram(0, b"a", now), UpOutcome::Buffered);
        assert_eq!(t.on_quic_datagram(0, b"b", now), UpOutcome::Buffered);
        assert_eq!(t.on_quic_datagram(0, b"c", now), UpOutcome::DroppedQueueFull);
        assert_eq!(t.on_quic_datagram(5, b"d", now), UpOutcome::DroppedUnknownContext);
        let early = t.open(1, "127.0.0.1:9".parse().unwrap(), Duration::from_secs(30), 0, now);
        assert_eq!(early, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(t.on_quic_datagram(0, b"e", now), UpOutcome::Forward);
        assert_eq!(t.on_quic_datagram(0, &[0; MAX_UDP_PAYLOAD + 1], now), UpOutcome::AbortTooLarge);
        assert_eq!(t.totals.packets_up, 1);
        assert_eq!(t.flow_id(), Some(1));
    }

    #[test]
    fn capsule_payloads_and_unknown_contexts() {
        let now = Instant::now();
        let mut t = tunnel(now);
        t.open(1, "127.0.0.1:9".parse().unwrap(), Duration::from_secs(30), 0, now);
        let mut bytes = Vec::new();
        capsule::encode_datagram(0, b"hello", &mut bytes);
        capsule::encode_datagram(7, b"ctx7", &mut bytes);
        capsule::encode(0x2a, b"unknown capsule", &mut bytes);
        capsule::encode(capsule::DATAGRAM, &[], &mut bytes); // no context ID
        let mut seen = Vec::new();
        t.on_stream_bytes(&bytes, now, |o, p| seen.push((o, p.to_vec()))).unwrap();
        assert_eq!(
            seen,
            vec![
                (UpOutcome::Forward, b"hello".to_vec()),
                (UpOutcome::DroppedUnknownContext, b"ctx7".to_vec()),
                (UpOutcome::DroppedUnknownContext, vec![]),
            ]
        );
        assert!(t.on_stream_end().is_ok());
        t.on_stream_bytes(&[0x00], now, |_, _| {}).unwrap();
        assert!(t.on_stream_end().is_err());
    }

    #[test]
    fn down_path_choice() {
        let now = Instant::now();
        let mut t = tunnel(now);
        assert_eq!(t.down_path(false, false), DownPath::Wait);
        assert_eq!(t.down_path(true, true), DownPath::QuicDatagram);
        assert_eq!(t.down_path(true, false), DownPath::Capsule);
        let mut bytes = Vec::new();
        capsule::encode_datagram(0, b"x", &mut bytes);
        t.on_stream_bytes(&bytes, now, |_, _| {}).unwrap();
        // Capsule-only clients get capsules even when datagrams are on.
        assert_eq!(t.down_path(true, true), DownPath::Capsule);
        t.on_quic_datagram(0, b"y", now);
        assert_eq!(t.down_path(true, true), DownPath::QuicDatagram);
    }

    #[test]
    fn stream_output_is_bounded() {
        let now = Instant::now();
        let mut t = tunnel(now);
        assert!(t.push_capsule(&[1; 2000]));
        assert!(t.push_capsule(&[2; 2000]));
        assert!(!t.push_capsule(&[3; 2000]));
        let len = t.stream_out().len();
        t.consume_stream_out(len - 10);
        assert_eq!(t.stream_out().len(), 10);
        assert!(t.queue_down(b"1") && t.queue_down(b"2") && !t.queue_down(b"3"));
        assert_eq!(t.take_waiting_down().len(), 2);
    }

    #[test]
    fn idle_and_ask_deadlines() {
        let now = Instant::now();
        let mut t = tunnel(now);
        assert!(!t.expired(now + Duration::from_millis(1999)));
        assert!(t.expired(now + Duration::from_secs(2)));
        t.open(1, "127.0.0.1:9".parse().unwrap(), Duration::from_secs(30), 0, now);
        let later = now + Duration::from_secs(20);
        t.on_down(10, later);
        assert!(!t.expired(later + Duration::from_secs(29)));
        assert!(t.expired(later + Duration::from_secs(30)));
        assert_eq!(t.deadline(), later + Duration::from_secs(30));
    }

    #[test]
    fn byte_budget_counts_both_directions() {
        let now = Instant::now();
        let mut t = tunnel(now);
        t.open(1, "127.0.0.1:9".parse().unwrap(), Duration::from_secs(30), 1000, now);
        assert!(!t.over_budget());
        assert_eq!(t.on_quic_datagram(0, &[0; 600], now), UpOutcome::Forward);
        assert!(!t.over_budget());
        t.on_down(400, now);
        assert!(t.over_budget(), "600 up + 400 down reaches 1000");
        let mut unlimited = tunnel(now);
        unlimited.open(2, "127.0.0.1:9".parse().unwrap(), Duration::from_secs(30), 0, now);
        unlimited.on_down(1 << 40, now);
        assert!(!unlimited.over_budget());
    }
}

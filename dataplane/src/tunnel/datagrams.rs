//! The HTTP Datagram side of a capsule tunnel (connect-udp, connect-ip,
//! bound UDP), whatever HTTP version carries it (sans-IO).
//!
//! Client payloads arrive as HTTP/3 datagrams (already split into context
//! ID and payload) or as DATAGRAM capsules on the request stream (RFC 9297
//! sections 2 and 3.5); both end up here and are classified: forwarded,
//! buffered until the tunnel opens, or dropped. Towards the client, payloads
//! go as HTTP/3 datagrams when the client's SETTINGS enabled them, or as
//! DATAGRAM capsules in the bounded stream output. The codec never touches
//! a socket and keeps no lifecycle: [`super::Tunnel`] owns that.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use relay_proto::capsule::{self, CapsuleDecoder, CapsuleError};
use relay_proto::datagram::UDP_PAYLOAD_CONTEXT;
use relay_proto::varint;

/// How the relay sends payloads to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownPath {
    /// As HTTP/3 datagrams in QUIC DATAGRAM frames.
    QuicDatagram,
    /// As DATAGRAM capsules on the request stream.
    Capsule,
    /// Not known yet (the client's SETTINGS have not arrived): queue.
    Wait,
}

/// What the carrier says about HTTP Datagrams outside the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramSupport {
    /// The client's SETTINGS have not arrived yet.
    Unknown,
    /// The client accepts HTTP/3 datagrams (SETTINGS_H3_DATAGRAM).
    Enabled,
    /// Only capsules: HTTP/3 without SETTINGS_H3_DATAGRAM, or HTTP/2 and
    /// HTTP/1.1, which have no datagrams outside the stream.
    Disabled,
}

/// What happened to a client payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpOutcome {
    /// Forward to the target now.
    Forward,
    /// Buffered until the tunnel opens (or, for bound tunnels, queued for
    /// the context table).
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
/// Largest IP packet a context-0 datagram of a connect-ip tunnel carries.
pub const MAX_IP_PACKET: usize = 65_535;
/// Bytes of the stream output that only control capsules (address and
/// compression responses) may use, so DATAGRAM capsules, which may be
/// dropped, never crowd out answers the client must get.
const CONTROL_RESERVE: usize = 16 * 1024;
/// Control capsules that may wait in the stream output at once: the bind
/// draft's section 9 "upper limit on how many compression responses the
/// endpoint is willing to buffer" (RFC 9484's address responses share it).
/// Past it the tunnel aborts its stream.
pub const MAX_PENDING_CONTROL: usize = 64;
/// Kept capsules (address requests, compression capsules) a tunnel holds
/// before they are handled; a client that sends more at once has its
/// stream aborted (each needs an answer, so none may be dropped silently).
const MAX_CONTROL_IN: usize = 256;

/// What the payloads of a tunnel are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payloads {
    /// UDP payloads on context 0 (connect-udp).
    Udp,
    /// IP packets on context 0 (connect-ip); the address and route
    /// capsules are kept.
    Ip,
    /// Bound UDP: every context is the context table's, and the
    /// compression capsules are kept.
    Bound,
}

/// Bounds applied to every capsule tunnel.
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

/// A capsule tunnel's datagram codec.
#[derive(Debug)]
pub struct Datagrams {
    payloads: Payloads,
    decoder: CapsuleDecoder,
    /// Payloads are forwarded (false until control allows the tunnel).
    open: bool,
    early_up: VecDeque<Vec<u8>>,
    waiting_down: VecDeque<Vec<u8>>,
    max_queued: usize,
    /// Capsules for the request stream; the carrier takes them as one
    /// `Bytes` per send ([`Self::take_stream_out`]), without a copy.
    stream_out: BytesMut,
    stream_out_limit: usize,
    /// Bytes appended to, and taken from, the stream output so far.
    pushed: u64,
    written: u64,
    /// Where each control capsule waiting in the stream output ends.
    control_ends: VecDeque<u64>,
    client_used_capsules: bool,
    client_used_datagrams: bool,
    /// Kept capsules received and not yet handled (type, value).
    control_in: VecDeque<(u64, Vec<u8>)>,
    /// Bound-tunnel datagrams received and not yet handled (context, payload).
    bound_in: VecDeque<(u64, Vec<u8>)>,
}

/// The connect-ip capsule types a tunnel keeps (RFC 9484 section 4.7).
const IP_CAPSULES: &[u64] = &[0x01, 0x02, 0x03];

impl Datagrams {
    /// A codec for a tunnel that is not open yet.
    pub fn new(payloads: Payloads, limits: Limits) -> Self {
        let kept: &'static [u64] = match payloads {
            Payloads::Udp => &[],
            Payloads::Ip => IP_CAPSULES,
            Payloads::Bound => relay_proto::bind::BIND_CAPSULES,
        };
        Self {
            payloads,
            decoder: CapsuleDecoder::new(limits.max_capsule_len).keep(kept),
            open: false,
            early_up: VecDeque::new(),
            waiting_down: VecDeque::new(),
            max_queued: limits.max_queued_datagrams,
            stream_out: BytesMut::new(),
            stream_out_limit: limits.stream_out_limit,
            pushed: 0,
            written: 0,
            control_ends: VecDeque::new(),
            client_used_capsules: false,
            client_used_datagrams: false,
            control_in: VecDeque::new(),
            bound_in: VecDeque::new(),
        }
    }

    /// What the payloads are.
    pub fn payloads(&self) -> Payloads {
        self.payloads
    }

    /// Control allowed the tunnel: payloads are forwarded from now on.
    /// Returns the payloads the client sent early, to forward now in order.
    pub fn open(&mut self) -> Vec<Vec<u8>> {
        self.open = true;
        self.early_up.drain(..).collect()
    }

    /// Whether the tunnel forwards payloads.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// A client payload arrived as an HTTP/3 datagram (already split into
    /// context ID and payload).
    pub fn on_quic_datagram(&mut self, context_id: u64, payload: &[u8]) -> UpOutcome {
        self.client_used_datagrams = true;
        self.on_payload(context_id, payload)
    }

    fn on_payload(&mut self, context_id: u64, payload: &[u8]) -> UpOutcome {
        if self.payloads == Payloads::Bound {
            // Every context is the context table's; bounded like early
            // payloads (the tunnel drains the queue as it feeds it).
            if self.bound_in.len() >= self.max_queued.max(1) * 4 {
                return UpOutcome::DroppedQueueFull;
            }
            self.bound_in.push_back((context_id, payload.to_vec()));
            return UpOutcome::Buffered;
        }
        if context_id != UDP_PAYLOAD_CONTEXT {
            // RFC 9298 section 5, RFC 9484 section 6: we register no other
            // contexts, so the datagram is dropped silently (and counted).
            return UpOutcome::DroppedUnknownContext;
        }
        let limit = if self.payloads == Payloads::Ip { MAX_IP_PACKET } else { MAX_UDP_PAYLOAD };
        if payload.len() > limit {
            return UpOutcome::AbortTooLarge;
        }
        if self.open {
            return UpOutcome::Forward;
        }
        if self.early_up.len() >= self.max_queued {
            UpOutcome::DroppedQueueFull
        } else {
            self.early_up.push_back(payload.to_vec());
            UpOutcome::Buffered
        }
    }

    /// Request stream bytes arrived (the Capsule Protocol). Calls
    /// `on_payload` with each DATAGRAM capsule's outcome and payload.
    pub fn on_stream_bytes(
        &mut self,
        bytes: &[u8],
        mut on_payload: impl FnMut(UpOutcome, &[u8]),
    ) -> Result<(), CapsuleError> {
        // Values are borrowed from `bytes` (or the decoder's buffer for a
        // capsule split across calls): no copy or allocation per capsule.
        // The decoder is moved out for the call so the callback may use the
        // rest of `self`; an empty one costs no allocation.
        let mut decoder = std::mem::replace(&mut self.decoder, CapsuleDecoder::new(0));
        let mut overflow = false;
        let result = decoder.feed_ref(bytes, |capsule_type, value| {
            if capsule_type == capsule::DATAGRAM {
                self.client_used_capsules = true;
                // RFC 9298 section 5: a datagram whose context ID cannot be
                // parsed is dropped.
                let Ok((context_id, used)) = varint::decode(value) else {
                    on_payload(UpOutcome::DroppedUnknownContext, &[]);
                    return;
                };
                let payload = &value[used..];
                let outcome = self.on_payload(context_id, payload);
                on_payload(outcome, payload);
            } else if self.control_in.len() < MAX_CONTROL_IN {
                self.control_in.push_back((capsule_type, value.to_vec()));
            } else {
                overflow = true;
            }
        });
        self.decoder = decoder;
        result?;
        if overflow {
            return Err(CapsuleError::TooMany { limit: MAX_CONTROL_IN });
        }
        Ok(())
    }

    /// The client ended its side of the stream: an error if it cut a
    /// capsule short (RFC 9297 section 3.3).
    pub fn on_stream_end(&self) -> Result<(), CapsuleError> {
        self.decoder.finish()
    }

    /// Takes the kept capsules received (type, value), in order.
    pub fn take_control(&mut self) -> VecDeque<(u64, Vec<u8>)> {
        std::mem::take(&mut self.control_in)
    }

    /// Takes the bound-tunnel datagrams received (context, payload).
    pub fn take_bound(&mut self) -> VecDeque<(u64, Vec<u8>)> {
        std::mem::take(&mut self.bound_in)
    }

    /// Chooses the path for payloads towards the client. A client that
    /// speaks to us only in DATAGRAM capsules gets capsules back.
    pub fn down_path(&self, support: DatagramSupport) -> DownPath {
        if self.client_used_capsules && !self.client_used_datagrams {
            return DownPath::Capsule;
        }
        match support {
            DatagramSupport::Unknown => DownPath::Wait,
            DatagramSupport::Enabled => DownPath::QuicDatagram,
            DatagramSupport::Disabled => DownPath::Capsule,
        }
    }

    /// Queues a payload until the down path is known; `false` if the
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

    /// Appends a DATAGRAM capsule with `context_id` and `payload` to the
    /// stream output; `false` if the bounded buffer has no room (the
    /// payload is dropped).
    pub fn push_capsule(&mut self, context_id: u64, payload: &[u8]) -> bool {
        let needed = payload.len() + 3 * varint::MAX_LEN;
        let reserve = CONTROL_RESERVE.min(self.stream_out_limit / 2);
        if self.stream_out.len() + needed > self.stream_out_limit - reserve {
            return false;
        }
        let mut header = [0; capsule::MAX_DATAGRAM_HEADER];
        let n = capsule::datagram_header(context_id, payload.len(), &mut header);
        self.stream_out.reserve(n + payload.len());
        self.stream_out.extend_from_slice(&header[..n]);
        self.stream_out.extend_from_slice(payload);
        self.pushed += (n + payload.len()) as u64;
        true
    }

    /// Appends encoded control capsules (connect-ip's address and route
    /// capsules, bound UDP's compression capsules) to the stream output,
    /// which keeps room for them that DATAGRAM capsules cannot take;
    /// `false` when [`MAX_PENDING_CONTROL`] of them already wait, or the
    /// buffer is full: the caller aborts the stream (it must not drop an
    /// answer the client waits for).
    pub fn push_control(&mut self, capsule: &[u8]) -> bool {
        if self.control_ends.len() >= MAX_PENDING_CONTROL
            || self.stream_out.len() + capsule.len() > self.stream_out_limit
        {
            return false;
        }
        self.stream_out.extend_from_slice(capsule);
        self.pushed += capsule.len() as u64;
        self.control_ends.push_back(self.pushed);
        true
    }

    /// Control capsules waiting in the stream output.
    pub fn pending_control(&self) -> usize {
        self.control_ends.len()
    }

    /// Bytes waiting to be written on the request stream.
    pub fn stream_out(&self) -> &[u8] {
        &self.stream_out
    }

    /// Marks `n` bytes of [`Self::stream_out`] as written.
    pub fn consume_stream_out(&mut self, n: usize) {
        let n = n.min(self.stream_out.len());
        self.stream_out.advance(n);
        self.written_up_to(n);
    }

    /// Takes the first `n` bytes of [`Self::stream_out`] (written by the
    /// carrier) as one buffer, without copying them.
    pub fn take_stream_out(&mut self, n: usize) -> Bytes {
        let n = n.min(self.stream_out.len());
        let taken = self.stream_out.split_to(n).freeze();
        self.written_up_to(n);
        taken
    }

    fn written_up_to(&mut self, n: usize) {
        self.written += n as u64;
        while self.control_ends.front().is_some_and(|end| *end <= self.written) {
            self.control_ends.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_capsule_len: 2048, max_queued_datagrams: 2, stream_out_limit: 4096 };

    #[test]
    fn early_payloads_are_bounded_then_released_in_order() {
        let mut t = Datagrams::new(Payloads::Udp, LIMITS);
        assert_eq!(t.on_quic_datagram(0, b"a"), UpOutcome::Buffered);
        assert_eq!(t.on_quic_datagram(0, b"b"), UpOutcome::Buffered);
        assert_eq!(t.on_quic_datagram(0, b"c"), UpOutcome::DroppedQueueFull);
        assert_eq!(t.on_quic_datagram(5, b"d"), UpOutcome::DroppedUnknownContext);
        assert_eq!(t.open(), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(t.on_quic_datagram(0, b"e"), UpOutcome::Forward);
        assert_eq!(t.on_quic_datagram(0, &[0; MAX_UDP_PAYLOAD + 1]), UpOutcome::AbortTooLarge);
        let mut ip = Datagrams::new(Payloads::Ip, LIMITS);
        ip.open();
        assert_eq!(ip.on_quic_datagram(0, &[0; MAX_UDP_PAYLOAD + 1]), UpOutcome::Forward);
        assert_eq!(ip.on_quic_datagram(0, &[0; MAX_IP_PACKET + 1]), UpOutcome::AbortTooLarge);
    }

    #[test]
    fn capsule_payloads_and_unknown_contexts() {
        let mut t = Datagrams::new(Payloads::Udp, LIMITS);
        t.open();
        let mut bytes = Vec::new();
        capsule::encode_datagram(0, b"hello", &mut bytes);
        capsule::encode_datagram(7, b"ctx7", &mut bytes);
        capsule::encode(0x2a, b"unknown capsule", &mut bytes);
        capsule::encode(capsule::DATAGRAM, &[], &mut bytes); // no context ID
        let mut seen = Vec::new();
        t.on_stream_bytes(&bytes, |o, p| seen.push((o, p.to_vec()))).unwrap();
        assert_eq!(
            seen,
            vec![
                (UpOutcome::Forward, b"hello".to_vec()),
                (UpOutcome::DroppedUnknownContext, b"ctx7".to_vec()),
                (UpOutcome::DroppedUnknownContext, vec![]),
            ]
        );
        assert!(t.on_stream_end().is_ok());
        t.on_stream_bytes(&[0x00], |_, _| {}).unwrap();
        assert!(t.on_stream_end().is_err());
    }

    #[test]
    fn kept_capsules_are_bounded() {
        let mut t = Datagrams::new(Payloads::Ip, LIMITS);
        let mut bytes = Vec::new();
        for _ in 0..MAX_CONTROL_IN {
            capsule::encode(0x02, &[1, 2], &mut bytes);
        }
        t.on_stream_bytes(&bytes, |_, _| {}).unwrap();
        assert_eq!(t.take_control().len(), MAX_CONTROL_IN);
        bytes.clear();
        for _ in 0..=MAX_CONTROL_IN {
            capsule::encode(0x02, &[1, 2], &mut bytes);
        }
        assert!(matches!(t.on_stream_bytes(&bytes, |_, _| {}), Err(CapsuleError::TooMany { .. })));
    }

    #[test]
    fn bound_tunnels_queue_every_context() {
        let mut t = Datagrams::new(Payloads::Bound, LIMITS);
        assert_eq!(t.on_quic_datagram(2, b"x"), UpOutcome::Buffered);
        assert_eq!(t.on_quic_datagram(0, b"y"), UpOutcome::Buffered);
        assert_eq!(t.take_bound(), vec![(2, b"x".to_vec()), (0, b"y".to_vec())]);
        for _ in 0..8 {
            t.on_quic_datagram(4, b"z");
        }
        assert_eq!(t.on_quic_datagram(4, b"z"), UpOutcome::DroppedQueueFull);
    }

    #[test]
    fn down_path_choice() {
        let mut t = Datagrams::new(Payloads::Udp, LIMITS);
        assert_eq!(t.down_path(DatagramSupport::Unknown), DownPath::Wait);
        assert_eq!(t.down_path(DatagramSupport::Enabled), DownPath::QuicDatagram);
        assert_eq!(t.down_path(DatagramSupport::Disabled), DownPath::Capsule);
        let mut bytes = Vec::new();
        capsule::encode_datagram(0, b"x", &mut bytes);
        t.on_stream_bytes(&bytes, |_, _| {}).unwrap();
        // Capsule-only clients get capsules even when datagrams are on.
        assert_eq!(t.down_path(DatagramSupport::Enabled), DownPath::Capsule);
        t.on_quic_datagram(0, b"y");
        assert_eq!(t.down_path(DatagramSupport::Enabled), DownPath::QuicDatagram);
    }

    #[test]
    fn control_capsules_have_room_datagrams_cannot_take_and_a_bound_of_their_own() {
        let limits = Limits { stream_out_limit: 64 * 1024, ..LIMITS };
        let mut t = Datagrams::new(Payloads::Bound, limits);
        while t.push_capsule(2, &[0; 1000]) {}
        assert!(t.stream_out().len() <= 64 * 1024 - CONTROL_RESERVE, "datagrams leave the reserve alone");
        for _ in 0..MAX_PENDING_CONTROL {
            assert!(t.push_control(&[0x12, 0x01, 0x02]), "responses fit in the reserve");
        }
        assert!(!t.push_control(&[0x12, 0x01, 0x04]), "past the bound the caller aborts");
        assert_eq!(t.pending_control(), MAX_PENDING_CONTROL);
        // Sending the datagrams and the first responses frees their places.
        let datagram_bytes = t.stream_out().len() - 3 * MAX_PENDING_CONTROL;
        t.consume_stream_out(datagram_bytes + 3 * 10);
        assert_eq!(t.pending_control(), MAX_PENDING_CONTROL - 10);
        assert!(t.push_control(&[0x12, 0x01, 0x04]));
    }

    #[test]
    fn stream_output_is_bounded() {
        let mut t = Datagrams::new(Payloads::Udp, LIMITS);
        assert!(t.push_capsule(0, &[1; 1000]));
        assert!(!t.push_capsule(0, &[3; 2000]), "half of a small buffer is kept for control capsules");
        assert!(t.push_control(&[9; 1000]));
        let len = t.stream_out().len();
        let first = t.take_stream_out(5);
        assert_eq!(&first[..3], &[0x00, 0x43, 0xe9][..], "a DATAGRAM capsule of 1001 bytes leads");
        t.consume_stream_out(len - 15);
        assert_eq!(t.stream_out().len(), 10);
        assert_eq!(&t.take_stream_out(100)[..], &[9; 10][..]);
        assert!(t.stream_out().is_empty());
        assert_eq!(t.pending_control(), 0);
        assert!(t.queue_down(b"1") && t.queue_down(b"2") && !t.queue_down(b"3"));
        assert_eq!(t.take_waiting_down().len(), 2);
    }
}

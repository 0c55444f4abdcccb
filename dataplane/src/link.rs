//! A worker's end of the shared-memory channel to control.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use relay_channel::doorbell::Doorbell;
use relay_channel::ends::ChannelError;
use relay_channel::region::{Counter, Counters, DataplaneChannel};
use relay_channel::ring::RingError;
use relay_proto::channel::record::{
    AddressAnswer, AddressAsk, AnswerRecord, AskRecord, AuthAnswer, AuthAsk, ChannelRecord, ClientCert,
    ConnInfo, FlowClosed, FlowOpen, RecordError, SignAnswer, SignAsk, TunnelProtocol,
};
use relay_proto::proxy_status::ProxyError;

/// Why an ask could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// Control has gone away.
    #[error("control plane unavailable")]
    ControlDown,
    /// The ring is full: control is not keeping up.
    #[error("control plane overloaded")]
    Full,
    /// A field does not fit the record (caller answers 414/431/400).
    #[error("request too large for the channel: {0}")]
    TooLarge(RecordError),
}

impl AskError {
    /// The refusal a request whose ask could not be sent gets: status,
    /// Proxy-Status error and details (the same on every HTTP version).
    pub fn refusal(&self) -> (u16, Option<ProxyError>, &'static str) {
        match self {
            AskError::ControlDown => (503, Some(ProxyError::ProxyInternalError), "control plane unavailable"),
            AskError::Full => (503, Some(ProxyError::ProxyInternalError), "control plane overloaded"),
            AskError::TooLarge(RecordError::FieldTooLong("path")) => (414, None, "path too long"),
            AskError::TooLarge(RecordError::FieldTooLong("authorization")) => {
                (431, None, "credentials too long")
            }
            AskError::TooLarge(_) => (400, Some(ProxyError::HttpRequestError), "request too large"),
        }
    }

    /// Whether control, not the request, is at fault (counted as a failed
    /// ask).
    pub fn is_control_failure(&self) -> bool {
        matches!(self, AskError::ControlDown | AskError::Full)
    }
}

/// What a worker asks control about a request: may this tunnel open?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// The client's address as the relay sees it.
    pub client: SocketAddr,
    /// `:authority`.
    pub authority: String,
    /// `:path`.
    pub path: String,
    /// Target host as in the request (IP literal or name).
    pub target_host: String,
    /// Target port (connect-ip: the IP protocol).
    pub target_port: u16,
    /// `proxy-authorization` (or `authorization`) value, if any.
    pub authorization: Option<String>,
    /// The kind of tunnel asked for.
    pub protocol: TunnelProtocol,
    /// The client certificate the connection's handshake verified.
    pub client_cert: Option<ClientCert>,
}

/// An answer from control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To an authorization ask.
    Auth(AuthAnswer),
    /// To a signing ask.
    Sign(SignAnswer),
    /// To an address ask.
    Address(AddressAnswer),
}

/// Asks kept in the worker while the ring is full, before requests are
/// refused with 503.
pub const MAX_QUEUED_ASKS: usize = 16_384;

/// The worker's channel end.
pub struct ControlLink {
    queued: VecDeque<AskRecord>,
    chan: DataplaneChannel,
    ask_bell: Doorbell,
    answer_bell: Doorbell,
    control_alive: Arc<AtomicBool>,
    next_ask_id: u64,
    broken: bool,
    drain_requested: bool,
    kill_requests: Vec<u64>,
    /// Connection listings control asked for: (request ID, limit).
    list_requests: Vec<(u64, u32)>,
}

/// Listings a worker keeps waiting at once (operators ask one at a time).
const MAX_LIST_REQUESTS: usize = 8;

impl ControlLink {
    /// Wraps the worker's channel, its doorbells and the liveness flag the
    /// main thread clears when control's socket closes.
    pub fn new(
        chan: DataplaneChannel,
        ask_bell: Doorbell,
        answer_bell: Doorbell,
        control_alive: Arc<AtomicBool>,
    ) -> Self {
        Self {
            queued: VecDeque::new(),
            chan,
            ask_bell,
            answer_bell,
            control_alive,
            next_ask_id: 1,
            broken: false,
            drain_requested: false,
            kill_requests: Vec::new(),
            list_requests: Vec::new(),
        }
    }

    /// The worker's counters.
    pub fn counters(&self) -> &Counters {
        &self.chan.counters
    }

    /// The doorbell control rings after answering (registered in the
    /// worker's poll).
    pub fn answer_bell(&self) -> &Doorbell {
        &self.answer_bell
    }

    /// Whether control can answer.
    pub fn is_up(&self) -> bool {
        !self.broken && self.control_alive.load(Ordering::Acquire)
    }

    /// Sends an authorization ask; returns its ID.
    pub fn ask(&mut self, request: AuthRequest) -> Result<u64, AskError> {
        if !self.is_up() {
            return Err(AskError::ControlDown);
        }
        let ask_id = self.next_ask_id;
        let AuthRequest {
            client,
            authority,
            path,
            target_host,
            target_port,
            authorization,
            protocol,
            client_cert,
        } = request;
        let ask = AskRecord::AuthAsk(AuthAsk {
            ask_id,
            client,
            authority,
            path,
            target_host,
            target_port,
            authorization,
            protocol,
            client_cert,
        });
        self.send_or_queue(ask)?;
        self.next_ask_id += 1;
        self.chan.counters.add(Counter::AsksSent, 1);
        Ok(ask_id)
    }

    /// Moves queued records into the ring as it drains (called every turn).
    pub fn flush_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        while let Some(record) = self.queued.front() {
            match self.chan.tx.push(record) {
                Ok(()) => {
                    let _ = self.ask_bell.ring();
                    self.queued.pop_front();
                }
                // Checked before it was queued; never sent all the same.
                Err(ChannelError::Record(_)) => {
                    self.queued.pop_front();
                }
                Err(ChannelError::Ring(e)) => {
                    self.ring_failed(e);
                    return;
                }
            }
        }
    }

    /// Forgets a queued ask whose request went away.
    pub fn cancel(&mut self, ask_id: u64) {
        self.queued.retain(|r| !matches!(r, AskRecord::AuthAsk(a) if a.ask_id == ask_id));
    }

    /// Reports a record to control in order with the asks (queued while the
    /// ring is full; dropped only past the queue bound, as control resyncs
    /// on its next attach).
    fn report(&mut self, record: AskRecord) {
        self.flush_queued();
        if self.queued.is_empty() && self.push(&record).is_ok() {
            return;
        }
        if self.queued.len() < MAX_QUEUED_ASKS && record.check().is_ok() {
            self.queued.push_back(record);
        }
    }

    /// Asks control to sign a TLS handshake (keyless TLS), in order with the
    /// authorization asks.
    pub fn sign(
        &mut self,
        sign_id: u64,
        generation: u32,
        algorithm: u16,
        input: Vec<u8>,
    ) -> Result<(), AskError> {
        if !self.is_up() {
            return Err(AskError::ControlDown);
        }
        self.send_or_queue(AskRecord::SignAsk(SignAsk { sign_id, generation, algorithm, input }))
    }

    /// Asks control to lease a specific address to a connect-ip flow (a
    /// client's ADDRESS_REQUEST); the answer comes as [`Answer::Address`].
    pub fn address_ask(&mut self, ask: AddressAsk) -> Result<(), AskError> {
        if !self.is_up() {
            return Err(AskError::ControlDown);
        }
        self.send_or_queue(AskRecord::AddressAsk(ask))
    }

    /// Sends `record` now, or queues it (bounded) behind earlier ones. A
    /// record that does not fit is refused at once, queued or not.
    fn send_or_queue(&mut self, record: AskRecord) -> Result<(), AskError> {
        record.check().map_err(AskError::TooLarge)?;
        self.flush_queued();
        if self.queued.is_empty() {
            match self.push(&record) {
                Ok(()) => return Ok(()),
                Err(AskError::Full) => {}
                Err(e) => return Err(e),
            }
        }
        if self.queued.len() >= MAX_QUEUED_ASKS {
            return Err(AskError::Full);
        }
        self.queued.push_back(record);
        Ok(())
    }

    /// Reports a closed flow.
    pub fn flow_closed(&mut self, closed: FlowClosed) {
        self.report(AskRecord::FlowClosed(closed));
    }

    /// Reports a live flow (after attaching to a new control).
    pub fn flow_open(&mut self, open: FlowOpen) {
        self.report(AskRecord::FlowOpen(open));
    }

    /// Whether control asked for a drain since the last call.
    pub fn take_drain_request(&mut self) -> bool {
        std::mem::take(&mut self.drain_requested)
    }

    /// Records the link can still queue before it starts dropping them.
    pub fn queue_room(&self) -> usize {
        MAX_QUEUED_ASKS.saturating_sub(self.queued.len())
    }

    /// Connection listings control asked for since the last call.
    pub fn take_list_requests(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.list_requests)
    }

    /// Reports one connection of a listing.
    pub fn conn_info(&mut self, info: ConnInfo) {
        self.report(AskRecord::ConnInfo(info));
    }

    /// Ends a listing: `total` connections on this worker.
    pub fn conn_list_end(&mut self, request_id: u64, total: u32) {
        self.report(AskRecord::ConnListEnd { request_id, total });
    }

    /// Flows control asked to end since the last call.
    pub fn take_kill_requests(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.kill_requests)
    }

    /// The ID the next ask will get.
    pub fn next_ask_id(&self) -> u64 {
        self.next_ask_id
    }

    /// Continues ask IDs from a previous link, so answers meant for asks of
    /// a dead control can never match new asks.
    pub fn continue_ask_ids(&mut self, next: u64) {
        self.next_ask_id = self.next_ask_id.max(next);
    }

    fn push(&mut self, record: &AskRecord) -> Result<(), AskError> {
        match self.chan.tx.push(record) {
            Ok(()) => {
                let _ = self.ask_bell.ring();
                Ok(())
            }
            Err(ChannelError::Record(e)) => Err(AskError::TooLarge(e)),
            Err(ChannelError::Ring(e)) => Err(self.ring_failed(e)),
        }
    }

    /// A full ring waits; a corrupt one breaks the link for good (counted).
    fn ring_failed(&mut self, e: RingError) -> AskError {
        match e {
            RingError::Full => AskError::Full,
            RingError::Corrupt => {
                self.broken = true;
                self.chan.counters.add(Counter::ChannelErrors, 1);
                AskError::ControlDown
            }
        }
    }

    /// Reads pending answers, at most 4096 per call. Invalid records are
    /// counted and skipped. Returns whether more may be waiting (the caller
    /// calls again next turn without waiting for the doorbell).
    pub fn poll_answers(&mut self, mut on_answer: impl FnMut(Answer)) -> bool {
        self.answer_bell.drain();
        self.flush_queued();
        if self.broken {
            return false;
        }
        // Bounded per turn; the rest waits for the next turn.
        for _ in 0..4096 {
            match self.chan.rx.pop() {
                Ok(Some(AnswerRecord::AuthAnswer(a))) => on_answer(Answer::Auth(a)),
                Ok(Some(AnswerRecord::SignAnswer(a))) => on_answer(Answer::Sign(a)),
                Ok(Some(AnswerRecord::AddressAnswer(a))) => on_answer(Answer::Address(a)),
                Ok(Some(AnswerRecord::Drain)) => self.drain_requested = true,
                Ok(Some(AnswerRecord::KillFlow { flow_id })) => {
                    // Bounded: an operator kills flows one at a time.
                    if self.kill_requests.len() < 4096 {
                        self.kill_requests.push(flow_id);
                    }
                }
                Ok(Some(AnswerRecord::ListConns { request_id, limit })) => {
                    if self.list_requests.len() < MAX_LIST_REQUESTS {
                        self.list_requests.push((request_id, limit));
                    }
                }
                // Invalid (or another direction's) record: counted, skipped.
                Err(ChannelError::Record(_)) => self.chan.counters.add(Counter::ChannelErrors, 1),
                Ok(None) => return false,
                Err(ChannelError::Ring(_)) => {
                    self.broken = true;
                    self.chan.counters.add(Counter::ChannelErrors, 1);
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use relay_channel::region::{ControlChannel, RING_HEADER, Region, answers_ring_offset};
    use relay_proto::channel::RECORD_SIZE;
    use relay_proto::channel::record::{MAX_PATH, Verdict};

    use super::*;

    fn link() -> (ControlLink, ControlChannel, File) {
        let (region, fd) = Region::create(1).unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        let link = ControlLink::new(
            region.dataplane_side(0),
            Doorbell::new().unwrap(),
            Doorbell::new().unwrap(),
            alive,
        );
        (link, region.control_side(0), File::from(fd))
    }

    fn request(path: String) -> AuthRequest {
        AuthRequest {
            client: "192.0.2.1:4433".parse().unwrap(),
            authority: "relay.example".into(),
            path,
            target_host: "example.com".into(),
            target_port: 53,
            authorization: Some("Bearer t".into()),
            protocol: TunnelProtocol::ConnectUdp,
            client_cert: None,
        }
    }

    #[test]
    fn an_ask_reaches_control_whole_and_oversize_ones_are_refused_at_once() {
        let (mut link, mut control, _peer) = link();
        let id = link.ask(request("/x".into())).unwrap();
        let Some(AskRecord::AuthAsk(ask)) = control.rx.pop().unwrap() else { panic!("no ask") };
        assert_eq!(ask.ask_id, id);
        assert_eq!(
            (ask.path.as_str(), ask.target_port, ask.protocol),
            ("/x", 53, TunnelProtocol::ConnectUdp)
        );
        assert_eq!(ask.authorization.as_deref(), Some("Bearer t"));
        let e = link.ask(request("/".repeat(MAX_PATH + 1))).unwrap_err();
        assert_eq!(e, AskError::TooLarge(RecordError::FieldTooLong("path")));
        assert_eq!(e.refusal().0, 414);
        assert_eq!(link.next_ask_id(), id + 1, "a refused ask takes no ID");
        assert_eq!(control.rx.pop().unwrap(), None);
        assert_eq!(link.counters().get(Counter::AsksSent), 1);
    }

    #[test]
    fn answers_are_delivered_and_invalid_records_counted_and_skipped() {
        let (mut link, mut control, peer) = link();
        let denied = AuthAnswer {
            ask_id: 1,
            verdict: Verdict::Deny {
                status: 403,
                proxy_error: None,
                details: String::new(),
                retry_after_secs: 0,
            },
        };
        control.tx.push(&AnswerRecord::AuthAnswer(denied.clone())).unwrap();
        control.tx.push(&AnswerRecord::Drain).unwrap();
        control.tx.push(&AnswerRecord::KillFlow { flow_id: 9 }).unwrap();
        // Control (or whoever writes the region) turns the drain into an
        // ask kind: refused as the wrong direction, counted, skipped.
        let drain_slot = answers_ring_offset(0) + RING_HEADER + RECORD_SIZE;
        peer.write_all_at(&[2, 3], drain_slot as u64).unwrap();
        let mut answers = Vec::new();
        assert!(!link.poll_answers(|a| answers.push(a)));
        assert_eq!(answers, [Answer::Auth(denied)]);
        assert!(!link.take_drain_request(), "the garbled drain was not taken");
        assert_eq!(link.take_kill_requests(), [9]);
        assert_eq!(link.counters().get(Counter::ChannelErrors), 1);
        assert!(link.is_up());
    }
}

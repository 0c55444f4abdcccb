//! A worker's end of the shared-memory channel to control.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use relay_proto::channel::RECORD_SIZE;
use relay_proto::channel::doorbell::Doorbell;
use relay_proto::channel::record::{
    AddressAnswer, AddressAsk, AuthAnswer, AuthAsk, ConnInfo, FlowClosed, FlowOpen, Record, RecordError,
    SignAnswer, SignAsk,
};
use relay_proto::channel::region::{Counter, Counters, WorkerChannel};
use relay_proto::channel::ring::{Consumer, Producer, RingError};
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
    queued: VecDeque<Record>,
    chan: WorkerChannel<Producer, Consumer>,
    ask_bell: Doorbell,
    answer_bell: Doorbell,
    control_alive: Arc<AtomicBool>,
    record: Box<[u8; RECORD_SIZE]>,
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
        chan: WorkerChannel<Producer, Consumer>,
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
            record: Box::new([0; RECORD_SIZE]),
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
    #[allow(clippy::too_many_arguments)]
    pub fn ask(
        &mut self,
        client: SocketAddr,
        authority: &str,
        path: &str,
        target_host: &str,
        target_port: u16,
        authorization: Option<&str>,
        protocol: u8,
    ) -> Result<u64, AskError> {
        if !self.is_up() {
            return Err(AskError::ControlDown);
        }
        let ask_id = self.next_ask_id;
        let ask = AuthAsk {
            ask_id,
            client,
            authority: authority.to_string(),
            path: path.to_string(),
            target_host: target_host.to_string(),
            target_port,
            authorization: authorization.map(str::to_string),
            protocol,
        };
        // Validate the size now, so an oversize request is refused at once.
        Record::AuthAsk(ask.clone()).encode(&mut self.record).map_err(AskError::TooLarge)?;
        self.flush_queued();
        if self.queued.is_empty() {
            match self.push() {
                Ok(()) => {}
                Err(AskError::Full) => self.queued.push_back(Record::AuthAsk(ask)),
                Err(e) => return Err(e),
            }
        } else if self.queued.len() < MAX_QUEUED_ASKS {
            self.queued.push_back(Record::AuthAsk(ask));
        } else {
            return Err(AskError::Full);
        }
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
            if record.encode(&mut self.record).is_err() {
                self.queued.pop_front();
                continue;
            }
            match self.push() {
                Ok(()) => {
                    self.queued.pop_front();
                }
                Err(_) => return,
            }
        }
    }

    /// Forgets a queued ask whose request went away.
    pub fn cancel(&mut self, ask_id: u64) {
        self.queued.retain(|r| !matches!(r, Record::AuthAsk(a) if a.ask_id == ask_id));
    }

    /// Reports a record to control in order with the asks (queued while the
    /// ring is full; dropped only past the queue bound, as control resyncs
    /// on its next attach).
    fn report(&mut self, record: Record) {
        self.flush_queued();
        if self.queued.is_empty() && record.encode(&mut self.record).is_ok() && self.push().is_ok() {
            return;
        }
        if self.queued.len() < MAX_QUEUED_ASKS {
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
        self.send_or_queue(Record::SignAsk(SignAsk { sign_id, generation, algorithm, input }))
    }

    /// Asks control to lease a specific address to a connect-ip flow (a
    /// client's ADDRESS_REQUEST); the answer comes as [`Answer::Address`].
    pub fn address_ask(&mut self, ask: AddressAsk) -> Result<(), AskError> {
        if !self.is_up() {
            return Err(AskError::ControlDown);
        }
        self.send_or_queue(Record::AddressAsk(ask))
    }

    /// Sends `record` now, or queues it (bounded) behind earlier ones.
    fn send_or_queue(&mut self, record: Record) -> Result<(), AskError> {
        record.encode(&mut self.record).map_err(AskError::TooLarge)?;
        self.flush_queued();
        if self.queued.is_empty() {
            match self.push() {
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
        self.report(Record::FlowClosed(closed));
    }

    /// Reports a live flow (after attaching to a new control).
    pub fn flow_open(&mut self, open: FlowOpen) {
        self.report(Record::FlowOpen(open));
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
        self.report(Record::ConnInfo(info));
    }

    /// Ends a listing: `total` connections on this worker.
    pub fn conn_list_end(&mut self, request_id: u64, total: u32) {
        self.report(Record::ConnListEnd { request_id, total });
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

    fn push(&mut self) -> Result<(), AskError> {
        match self.chan.tx.push(&self.record) {
            Ok(()) => {
                let _ = self.ask_bell.ring();
                Ok(())
            }
            Err(RingError::Full) => Err(AskError::Full),
            Err(RingError::Corrupt) => {
                self.broken = true;
                self.chan.counters.add(Counter::ChannelErrors, 1);
                Err(AskError::ControlDown)
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
            match self.chan.rx.pop(&mut self.record) {
                Ok(true) => match Record::decode(&self.record[..]) {
                    Ok(Record::AuthAnswer(a)) => on_answer(Answer::Auth(a)),
                    Ok(Record::SignAnswer(a)) => on_answer(Answer::Sign(a)),
                    Ok(Record::AddressAnswer(a)) => on_answer(Answer::Address(a)),
                    Ok(Record::Drain) => self.drain_requested = true,
                    Ok(Record::KillFlow { flow_id }) => {
                        // Bounded: an operator kills flows one at a time.
                        if self.kill_requests.len() < 4096 {
                            self.kill_requests.push(flow_id);
                        }
                    }
                    Ok(Record::ListConns { request_id, limit }) => {
                        if self.list_requests.len() < MAX_LIST_REQUESTS {
                            self.list_requests.push((request_id, limit));
                        }
                    }
                    Ok(_) | Err(_) => self.chan.counters.add(Counter::ChannelErrors, 1),
                },
                Ok(false) => return false,
                Err(_) => {
                    self.broken = true;
                    self.chan.counters.add(Counter::ChannelErrors, 1);
                    return false;
                }
            }
        }
        true
    }
}

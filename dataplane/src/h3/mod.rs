//! The HTTP/3 side of a worker: QUIC connections (quiche), their accept
//! (version negotiation, Retry, connection IDs naming the worker),
//! hand-offs of packets that reached the wrong worker, keyless handshake
//! signatures, and each connection's output. The tunnels its requests
//! open live in [`crate::tunnel`]; [`conn`] translates between the two.

pub mod conn;
pub mod path;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use relay_channel::region::Counter;
use relay_proto::channel::record::{ConnInfo, SignResult};
use relay_proto::cid::{CidConfigs, Decoded};
use tracing::{debug, error, info, warn};

use crate::cids::CidShared;
use crate::context::Ctx;
use crate::handoff::{Handoff, Inbox};
use crate::keyless;
use crate::qlog::{QlogShared, Window};
use crate::quic;
use crate::reset::ResetTokens;
use crate::retry::{RetryTokens, TokenError};
use crate::slab::{Key as ConnKey, Slab};
use crate::timers::TimerTarget;
use crate::tls::TlsShared;
use crate::tunnel::{Backlog, Carrier, Tunnels};
use conn::{Conn, Scratch};
use path::{H3Path, code};

/// Hand-offs taken from the inbox per turn.
const HANDOFF_BUDGET: usize = 1024;

/// Random connection ID nonces. BoringSSL's RAND_bytes does not fail (it
/// aborts the process if the system cannot provide entropy), so the result
/// is always filled.
fn fill_random(out: &mut [u8]) {
    let filled = boring::rand::rand_bytes(out);
    debug_assert!(filled.is_ok());
}

/// Connection IDs of ours a client holds at most (the handshake's and the
/// spares issued with NEW_CONNECTION_ID).
const MAX_ISSUED_CIDS: usize = 4;

/// The DCID length of a short-header packet: the length of the live layout
/// its first octet names, or the current layout's (a foreign CID then
/// parses at our length, which is what a stateless reset answers).
fn short_dcid_len(cids: &CidConfigs, pkt: &[u8]) -> usize {
    let named = pkt.get(1).and_then(|&first| cids.cid_len_for(first));
    named.or_else(|| cids.current().map(|l| l.cid_len())).unwrap_or(relay_proto::cid::MAX_CID_LEN)
}

/// A worker's HTTP/3 side.
pub struct H3 {
    local: SocketAddr,
    quic_config: quiche::Config,
    h3_config: quiche::h3::Config,
    tls: Arc<TlsShared>,
    /// The `TlsShared` epoch `quic_config` was built from.
    tls_epoch: u64,
    /// Its generation (reported in the counters).
    tls_generation: u32,
    conns: Slab<Box<Conn>>,
    /// Connections by the connection IDs this worker issued (random or
    /// QUIC-LB encrypted), looked up for every QUIC packet. A client cannot
    /// choose colliding keys, hence a fast hasher.
    by_cid: HashMap<quiche::ConnectionId<'static>, ConnKey, foldhash::fast::RandomState>,
    /// Connections by the original destination connection ID their client
    /// chose, used until the client switches to ours (Initial and 0-RTT
    /// packets). Client-chosen keys, up to one per connection: SipHash,
    /// so that no one can line up colliding IDs.
    by_odcid: HashMap<quiche::ConnectionId<'static>, ConnKey>,
    retry: Arc<RetryTokens>,
    /// Stateless reset tokens of our connection IDs, and the resets sent.
    resets: ResetTokens,
    /// Where rotated connection ID configurations come from, and the
    /// epoch adopted.
    cid_updates: Option<Arc<CidShared>>,
    cid_epoch: u64,
    /// Where qlog commands come from, and the epoch adopted.
    qlog: Option<Arc<QlogShared>>,
    qlog_epoch: u64,
    /// The qlog window new connections are checked against; None (the
    /// default) costs a new connection one branch.
    qlog_window: Option<Arc<Window>>,
    /// Connections accepted whose handshake has not completed.
    handshaking: usize,
    inboxes: Arc<[Inbox]>,
    /// Workers whose bell must ring at the end of this turn.
    bells_due: Vec<usize>,
    /// Hand-offs may be waiting in this worker's inbox.
    pub handoffs_due: bool,
    /// Connections touched this turn.
    dirty: Vec<ConnKey>,
    next_serial: u64,
    scratch: Scratch,
}

/// Why the HTTP/3 side could not start.
#[derive(Debug, thiserror::Error)]
pub enum H3Error {
    /// TLS or QUIC configuration failed (e.g. an invalid certificate chain).
    #[error(transparent)]
    Quic(#[from] quic::QuicConfigError),
    /// HTTP/3 configuration failed.
    #[error("HTTP/3 configuration: {0}")]
    H3(#[from] quiche::h3::Error),
}

impl H3 {
    /// The HTTP/3 side of a worker whose QUIC socket is bound to `local`.
    pub fn new(
        ctx: &Ctx,
        local: SocketAddr,
        tls: Arc<TlsShared>,
        inboxes: Arc<[Inbox]>,
        retry: Arc<RetryTokens>,
    ) -> Result<Self, H3Error> {
        let tls_epoch = tls.epoch();
        let material = tls.current();
        let quic_config = quic::transport_config(&ctx.settings.bootstrap, &material, tls.tickets())?;
        let reset_key = match &ctx.settings.bootstrap.quic_keys {
            Some(keys) => keys.stateless_reset_key,
            None => {
                let mut key = [0u8; 32];
                fill_random(&mut key);
                key
            }
        };
        Ok(Self {
            local,
            quic_config,
            h3_config: quic::h3_config(ctx.settings.served.webtransport)?,
            tls_epoch,
            tls_generation: material.generation,
            tls,
            conns: Slab::new(),
            by_cid: HashMap::default(),
            by_odcid: HashMap::new(),
            retry,
            resets: ResetTokens::with_key(reset_key),
            cid_updates: None,
            cid_epoch: 0,
            qlog: None,
            qlog_epoch: 0,
            qlog_window: None,
            handshaking: 0,
            inboxes,
            bells_due: Vec::new(),
            handoffs_due: true,
            dirty: Vec::new(),
            next_serial: 1,
            scratch: Scratch::default(),
        })
    }

    /// The TLS generation new connections are accepted with.
    pub fn tls_generation(&self) -> u32 {
        self.tls_generation
    }

    /// The connection IDs each open connection can be reached at (ours,
    /// not retired), for tests.
    #[cfg(test)]
    pub fn source_ids(&self) -> Vec<Vec<u8>> {
        self.conns
            .iter()
            .flat_map(|(_, c)| c.quic.source_ids().map(|id| id.to_vec()).collect::<Vec<_>>())
            .collect()
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Puts a connection back and on this turn's dirty list: it may have
    /// packets to send.
    fn put(&mut self, key: ConnKey, mut conn: Box<Conn>) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        self.conns.put(key, conn);
    }

    /// Runs `f` with connection `key`'s datagram path (a tunnel of the
    /// connection is served by the worker); the connection then sends.
    pub fn with_path<R>(&mut self, key: ConnKey, f: impl FnOnce(&mut H3Path<'_>) -> R) -> Option<R> {
        let mut conn = self.conns.take(key)?;
        let r = f(&mut conn.path());
        self.put(key, conn);
        Some(r)
    }

    /// The largest DATAGRAM frame payload the first connection may send
    /// (tests).
    #[cfg(test)]
    pub fn first_datagram_room(&self) -> Option<usize> {
        self.conns.iter().next().and_then(|(_, conn)| conn.quic.dgram_max_writable_len())
    }

    /// How full connection `key`'s DATAGRAM queue is (`None`: no such
    /// connection). The connection is not marked for a flush.
    pub fn backlog(&self, key: ConnKey) -> Option<Backlog> {
        self.conns.get(key).map(|conn| path::backlog_of(conn.quic.dgram_send_queue_len()))
    }

    /// Marks connection `key` for this turn's flush.
    pub fn wake(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(key)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }

    /// QUIC packets from `from` (a GRO batch is split by the caller).
    pub fn on_packet(&mut self, pkt: &mut [u8], from: SocketAddr, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        let hdr = match quiche::Header::from_slice(pkt, short_dcid_len(&ctx.settings.cids, pkt)) {
            Ok(h) => h,
            Err(_) => return ctx.count(Counter::DropNoConnection, 1),
        };
        let key = match self.by_cid.get(&hdr.dcid).or_else(|| self.by_odcid.get(&hdr.dcid)) {
            Some(k) => *k,
            None => {
                if hdr.ty != quiche::Type::Initial {
                    // Not ours: maybe another worker's (the client's address
                    // changed and the kernel picked our socket).
                    if let Decoded::Worker(w) = ctx.settings.cids.decode(&hdr.dcid) {
                        let w = usize::from(w);
                        if w != ctx.settings.index as usize && w < self.inboxes.len() {
                            return self.hand_off(w, pkt, from, ctx);
                        }
                    }
                    ctx.count(Counter::DropNoConnection, 1);
                    if hdr.ty == quiche::Type::Short {
                        self.send_stateless_reset(&hdr.dcid, pkt.len(), from, ctx);
                    }
                    return;
                }
                match self.accept(&hdr, from, ctx) {
                    Some(k) => k,
                    None => return,
                }
            }
        };
        let Some(mut conn) = self.conns.take(key) else { return };
        let info = quiche::RecvInfo { from, to: self.local };
        match conn.quic.recv(pkt, info) {
            Ok(_) => {
                let progress = conn.process(key, &self.h3_config, &mut self.scratch, tunnels, ctx);
                if progress.established {
                    self.handshaking = self.handshaking.saturating_sub(1);
                    ctx.count(Counter::HandshakesCompleted, 1);
                    if conn.quic.is_resumed() {
                        ctx.count(Counter::HandshakesResumed, 1);
                    }
                }
            }
            Err(e) => debug!("QUIC recv: {e}"),
        }
        self.ask_signatures(key, &mut conn, ctx);
        self.manage_cids(key, &mut conn, ctx, false);
        self.put(key, conn);
    }

    /// Keeps connection `key`'s connection IDs: once established, the
    /// client gets spare connection IDs of this worker (NEW_CONNECTION_ID,
    /// RFC 9000 section 5.1.1: "An endpoint SHOULD ensure that its peer has
    /// a sufficient number of available and unused connection IDs"), each
    /// with its stateless reset token, up to the limit both sides allow and
    /// at most [`MAX_ISSUED_CIDS`]; IDs the client retired are forgotten.
    ///
    /// `rotate` (a new configuration was adopted) starts moving the
    /// connection off the older configuration's IDs: one replacement at a
    /// time is issued with Retire Prior To covering the oldest, and the
    /// next when the client has retired it, until none is left.
    fn manage_cids(&mut self, key: ConnKey, conn: &mut Conn, ctx: &Ctx, rotate: bool) {
        let mut retired_now = false;
        while let Some(retired) = conn.quic.retired_scid_next() {
            self.by_cid.remove(&retired);
            self.by_odcid.remove(&retired);
            conn.cids.retain(|c| *c != retired);
            retired_now = true;
        }
        conn.rotating |= rotate;
        if !conn.established || conn.quic.is_closed() {
            return;
        }
        if conn.rotating {
            let current = ctx.settings.cids.current().map(|l| l.first_octet());
            let stale =
                conn.quic.source_ids().filter(|c| current.is_some_and(|f| c.first() != Some(&f))).count();
            if stale == 0 {
                conn.rotating = false;
            } else if rotate || retired_now {
                self.issue_cid(key, conn, ctx, true);
            }
        }
        while conn.quic.scids_left() > 0
            && conn.quic.active_scids() < MAX_ISSUED_CIDS
            && self.issue_cid(key, conn, ctx, false)
        {}
    }

    /// Issues one connection ID of this worker under the configuration in
    /// force to connection `key`; `retire_oldest` retires the oldest one
    /// the client holds. Returns whether one was issued.
    fn issue_cid(&mut self, key: ConnKey, conn: &mut Conn, ctx: &Ctx, retire_oldest: bool) -> bool {
        if conn.cids.len() > 2 * MAX_ISSUED_CIDS {
            return false;
        }
        let cid = ctx.settings.cids.generate_with(ctx.settings.index as u8, fill_random);
        let cid = quiche::ConnectionId::from_vec(cid.as_bytes().to_vec());
        if self.by_cid.contains_key(&cid) || self.by_odcid.contains_key(&cid) {
            return false;
        }
        match conn.quic.new_scid(&cid, self.resets.token(&cid), retire_oldest) {
            Ok(_) => {
                self.by_cid.insert(cid.clone(), key);
                conn.cids.push(cid);
                ctx.count(Counter::ConnectionIdsIssued, 1);
                true
            }
            Err(e) => {
                debug!("no new connection ID: {e}");
                false
            }
        }
    }

    fn accept(&mut self, hdr: &quiche::Header<'_>, from: SocketAddr, ctx: &mut Ctx) -> Option<ConnKey> {
        if !quiche::version_is_supported(hdr.version) {
            let space = ctx.out.quic_space();
            if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, space) {
                ctx.out.quic_commit(n, from, relay_udp::gso_enabled());
                ctx.out.finish_quic();
            }
            return None;
        }
        let b = &ctx.settings.bootstrap;
        if self.conns.len() >= b.max_connections_per_worker as usize || ctx.draining {
            return None;
        }
        let worker = ctx.settings.index as u8;
        let token = hdr.token.as_deref().unwrap_or(&[]);
        // RFC 9000 section 8.1.2: with a valid Retry token the client has
        // proven its address; the connection keeps the connection ID we
        // chose in the Retry (it names this worker) and reports the
        // original one in its transport parameters.
        let (scid, retried_odcid) = match self.retry.validate(token, from) {
            Ok(odcid) => (hdr.dcid.clone().into_owned(), Some(quiche::ConnectionId::from_vec(odcid))),
            Err(TokenError::BadMac) => {
                // Forged, or minted for another address: no state for it.
                ctx.count(Counter::RetryTokensInvalid, 1);
                return None;
            }
            // No token (or an expired or foreign one: treated as none,
            // section 8.1.3): Retry when many handshakes are in progress.
            Err(_) if self.handshaking >= b.retry_threshold as usize => {
                self.send_retry(hdr, from, ctx);
                return None;
            }
            Err(_) => {
                let scid = ctx.settings.cids.generate_with(worker, fill_random);
                (quiche::ConnectionId::from_vec(scid.as_bytes().to_vec()), None)
            }
        };
        let odcid = match &retried_odcid {
            Some(original) => original.clone(),
            None => hdr.dcid.clone().into_owned(),
        };
        // RFC 9000 section 18.2: the token of the connection ID chosen in
        // the handshake travels in the transport parameters.
        self.quic_config.set_stateless_reset_token(Some(self.resets.token(&scid)));
        // After a Retry the transport parameters carry three connection IDs
        // (the client's original one, up to 20 bytes, and ours twice, as
        // retry and initial source) beside the reset token: the vendored
        // quiche encodes them into 256 bytes (its own 128 overflowed;
        // dataplane/vendor/README.md), so the handshake's ID has its token
        // whatever the ID lengths.
        let accepted = quiche::accept_with_buf_factory(
            &scid,
            retried_odcid.as_ref(),
            self.local,
            from,
            &mut self.quic_config,
        );
        let quic = match accepted {
            Ok(c) => c,
            Err(e) => {
                debug!("accept failed: {e}");
                return None;
            }
        };
        let cids = vec![scid.clone(), odcid.clone()];
        let mut conn = Conn::new(quic, from, cids, self.next_serial, ctx.now, self.tls_generation);
        if self.qlog_window.is_some() {
            self.qlog_new_conn(&mut conn, ctx);
        }
        let key = self.conns.insert(Box::new(conn));
        self.next_serial += 1;
        self.by_cid.insert(scid, key);
        self.by_odcid.insert(odcid, key);
        self.handshaking += 1;
        ctx.count(Counter::ConnectionsAccepted, 1);
        ctx.count(Counter::ConnectionsActive, 1);
        Some(key)
    }

    /// Answers a short-header packet for a connection nobody here knows
    /// with a Stateless Reset (RFC 9000 section 10.3), whose token is the
    /// one the client was given for `dcid` by whichever worker or fleet
    /// host issued it.
    fn send_stateless_reset(&mut self, dcid: &[u8], received: usize, from: SocketAddr, ctx: &mut Ctx) {
        let space = ctx.out.quic_space();
        let Some(head) = space.get_mut(..64) else { return };
        fill_random(head);
        if let Some(n) = self.resets.build(dcid, received, ctx.now, head) {
            ctx.out.quic_commit(n, from, relay_udp::gso_enabled());
            ctx.out.finish_quic();
            ctx.count(Counter::StatelessResetsSent, 1);
        }
    }

    /// Answers a token-less Initial with a Retry carrying a token and a
    /// connection ID of this worker.
    fn send_retry(&mut self, hdr: &quiche::Header<'_>, from: SocketAddr, ctx: &mut Ctx) {
        let new_scid = ctx.settings.cids.generate_with(ctx.settings.index as u8, fill_random);
        let new_scid = quiche::ConnectionId::from_ref(new_scid.as_bytes());
        let token = self.retry.mint(from, &hdr.dcid);
        let space = ctx.out.quic_space();
        match quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, space) {
            Ok(n) => {
                ctx.out.quic_commit(n, from, relay_udp::gso_enabled());
                ctx.out.finish_quic();
                ctx.count(Counter::RetriesSent, 1);
            }
            Err(e) => debug!("cannot build a Retry: {e}"),
        }
    }

    /// Sends the signing asks the connection's handshake made (keyless
    /// TLS). Returns whether one failed at once, so the handshake must be
    /// driven again to fail cleanly.
    fn ask_signatures(&mut self, key: ConnKey, conn: &mut Conn, ctx: &mut Ctx) -> bool {
        // Only handshakes sign: established connections skip the
        // thread-local lookup on their per-packet path.
        if conn.established {
            return false;
        }
        let mut failed = false;
        for req in keyless::take_requests() {
            let id = req.sign_id;
            if let Some(old) = conn.signing.replace(id) {
                // A handshake signs once; a second ask replaces the first.
                ctx.signs.remove(old);
                keyless::forget(old);
            }
            match ctx.link.sign(id, req.generation, req.algorithm, req.input) {
                Ok(()) => {
                    ctx.signs.insert(id, Carrier::H3(key));
                    ctx.timers.push(ctx.now + ctx.settings.ask_timeout, TimerTarget::Sign(id));
                    ctx.count(Counter::SignsSent, 1);
                }
                Err(e) => {
                    debug!("handshake signature not asked: {e}");
                    conn.signing = None;
                    keyless::deliver(id, None);
                    ctx.count(Counter::SignsFailed, 1);
                    failed = true;
                }
            }
        }
        failed
    }

    /// Control's answer to connection `key`'s signing ask: the handshake
    /// resumes when the connection sends (this turn).
    pub fn on_signed(&mut self, key: ConnKey, sign_id: u64, result: SignResult, ctx: &Ctx) {
        let signature = match result {
            SignResult::Signature(sig) => Some(sig),
            SignResult::Failed(why) => {
                let conn = self.conns.get(key).map(|c| c.serial);
                warn!(conn, "control could not sign a handshake: {why}");
                ctx.count(Counter::SignsFailed, 1);
                None
            }
        };
        keyless::deliver(sign_id, signature);
        if let Some(mut conn) = self.conns.take(key) {
            if conn.signing == Some(sign_id) {
                conn.signing = None;
            }
            self.put(key, conn);
        }
    }

    /// Fails connection `key`'s signing ask (no answer in time, or control
    /// replaced): the handshake ends with an alert instead of hanging.
    pub fn fail_sign(&mut self, key: ConnKey, sign_id: u64, ctx: &Ctx) {
        keyless::deliver(sign_id, None);
        ctx.count(Counter::SignsFailed, 1);
        if let Some(mut conn) = self.conns.take(key) {
            conn.signing = None;
            self.put(key, conn);
        }
    }

    /// Copies a packet into the owning worker's inbox.
    fn hand_off(&mut self, worker: usize, pkt: &[u8], from: SocketAddr, ctx: &Ctx) {
        if self.inboxes[worker].push(Handoff { packet: pkt.to_vec(), from }) {
            ctx.count(Counter::HandoffsOut, 1);
            if !self.bells_due.contains(&worker) {
                self.bells_due.push(worker);
            }
        } else {
            ctx.count(Counter::DropHandoffFull, 1);
        }
    }

    /// Handles packets other workers handed over (bounded per turn).
    pub fn take_handoffs(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        let me = ctx.settings.index as usize;
        for _ in 0..HANDOFF_BUDGET {
            let Some(mut h) = self.inboxes[me].pop() else {
                self.handoffs_due = false;
                return;
            };
            ctx.count(Counter::HandoffsIn, 1);
            self.on_packet(&mut h.packet, h.from, tunnels, ctx);
        }
        self.handoffs_due = !self.inboxes[me].is_empty();
    }

    /// Rings the bells of the workers this turn handed packets to.
    pub fn ring_bells(&mut self) {
        for w in self.bells_due.drain(..) {
            let _ = self.inboxes[w].bell.ring();
        }
    }

    /// Connection `key`'s QUIC timeout (armed for `at`) may be due.
    pub fn on_timer(&mut self, key: ConnKey, at: Instant) {
        if !self.timer_live(key, at) {
            return; // stale: the connection re-armed or closed
        }
        let Some(mut conn) = self.conns.take(key) else { return };
        conn.timer = None;
        conn.quic.on_timeout();
        self.put(key, conn);
    }

    /// Whether a timer entry for connection `key` at `at` is live
    /// (compaction).
    pub fn timer_live(&self, key: ConnKey, at: Instant) -> bool {
        self.conns.get(key).is_some_and(|c| c.timer == Some(at))
    }

    /// Lets every connection touched this turn, and only those, write what
    /// it has.
    pub fn flush(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            let Some(mut conn) = self.conns.take(key) else { continue };
            conn.dirty = false;
            // While control signs, nothing of the handshake leaves: were the
            // ServerHello out, the client would drop its Initial keys and
            // could not read a CONNECTION_CLOSE if signing then fails
            // (quiche sends it in an Initial packet; RFC 9000 section
            // 10.2.3). The whole flight goes out once the signature is in.
            if conn.signing.is_none() {
                conn.service_streams(&mut self.scratch, tunnels, ctx);
                send_packets(&mut conn, ctx);
                if self.ask_signatures(key, &mut conn, ctx) {
                    // Signing failed at once (control gone): let the
                    // handshake fail now, with its CONNECTION_CLOSE.
                    send_packets(&mut conn, ctx);
                }
            }
            if conn.quic.is_closed() {
                self.conns.release(key);
                self.drop_conn(conn, tunnels, ctx);
                continue;
            }
            let timeout = conn.quic.timeout_instant();
            if timeout != conn.timer {
                conn.timer = timeout;
                if let Some(at) = timeout {
                    ctx.timers.push(at, TimerTarget::H3Conn(key));
                }
            }
            self.conns.put(key, conn);
        }
        // Work done while flushing never re-dirties a connection flushed
        // before it in this loop, but tunnels of a later one may: keep
        // those for the next flush.
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Whether connections wait for a flush.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn drop_conn(&mut self, mut conn: Box<Conn>, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        for cid in &conn.cids {
            self.by_cid.remove(cid);
            self.by_odcid.remove(cid);
        }
        if let Some(sign_id) = conn.signing.take() {
            ctx.signs.remove(sign_id);
            keyless::forget(sign_id);
        }
        if !conn.established {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        if conn.qlog {
            ctx.link.counters().sub(Counter::QlogConnections, 1);
        }
        conn.close_tunnels(tunnels, ctx);
        ctx.count(Counter::ConnectionsClosed, 1);
        ctx.link.counters().sub(Counter::ConnectionsActive, 1);
    }

    /// Graceful drain: GOAWAY on every connection; new connections and
    /// requests are refused (the caller set `ctx.draining`).
    pub fn start_drain(&mut self) {
        for key in self.conns.keys() {
            if let Some(mut conn) = self.conns.take(key) {
                conn.send_goaway();
                self.put(key, conn);
            }
        }
    }

    /// Closes every connection (the last turn).
    pub fn shutdown(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        for key in self.conns.keys() {
            if let Some(mut conn) = self.conns.take(key) {
                let _ = conn.quic.close(true, code::NO_ERROR, b"relay shutting down");
                send_packets(&mut conn, ctx);
                self.conns.release(key);
                self.drop_conn(conn, tunnels, ctx);
            }
        }
    }

    /// Up to `limit` connections as `relayctl conns` lists them, and how
    /// many there are.
    pub fn list(&self, request_id: u64, limit: usize, now: Instant) -> (Vec<ConnInfo>, usize) {
        let listed = self.conns.iter().take(limit).map(|(_, c)| c.info(request_id, now)).collect();
        (listed, self.conns.len())
    }

    /// Follows the connection ID configurations of `shared` (rotations
    /// control sends).
    pub fn set_cid_updates(&mut self, shared: Arc<CidShared>) {
        self.cid_epoch = shared.epoch();
        self.cid_updates = Some(shared);
    }

    /// Adopts a rotated connection ID configuration: new connection IDs
    /// use it, and every connection's IDs of the older one are replaced
    /// (NEW_CONNECTION_ID with Retire Prior To; draft-ietf-quic-load-
    /// balancers-21 section 3.1: the old configuration keeps routing until
    /// they are gone).
    pub fn adopt_cids(&mut self, ctx: &mut Ctx) {
        let Some(shared) = self.cid_updates.as_ref() else { return };
        let epoch = shared.epoch();
        if epoch == self.cid_epoch {
            return;
        }
        self.cid_epoch = epoch;
        ctx.settings.cids = shared.current();
        info!(worker = ctx.settings.index, config = ?ctx.settings.cids.current().map(|l| l.config_id()), "new connection ID configuration");
        for key in self.conns.keys() {
            if let Some(mut conn) = self.conns.take(key) {
                self.manage_cids(key, &mut conn, ctx, true);
                self.put(key, conn);
            }
        }
    }

    /// Follows the qlog commands applied to `shared` (`relayctl qlog`).
    pub fn set_qlog(&mut self, shared: Arc<QlogShared>) {
        self.qlog_epoch = shared.epoch();
        self.qlog = Some(shared);
    }

    /// Adopts the last qlog command: a start logs the open connections it
    /// matches and keeps its window for new ones; a stop finishes every
    /// connection's log. Reports the command in the counters.
    pub fn adopt_qlog(&mut self, ctx: &Ctx) {
        let Some(shared) = self.qlog.as_ref() else { return };
        let epoch = shared.epoch();
        if epoch == self.qlog_epoch {
            return;
        }
        self.qlog_epoch = epoch;
        let (session, window) = shared.current();
        let worker = ctx.settings.index;
        let mut matched = 0;
        for key in self.conns.keys() {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            match &window {
                Some(w) if w.matches_existing(worker, conn.serial, conn.client()) => {
                    matched += 1;
                    if !conn.qlog {
                        start_qlog(w, conn, ctx);
                    }
                }
                Some(_) => {}
                None if conn.qlog => {
                    // The writer stopped already; this spares quiche the
                    // serializing of the events the file would not get.
                    crate::qlog::finish(&mut conn.quic);
                    conn.qlog = false;
                    ctx.link.counters().sub(Counter::QlogConnections, 1);
                }
                None => {}
            }
        }
        info!(worker, session, matched, on = window.is_some(), "qlog command applied");
        self.qlog_window = window;
        let c = ctx.link.counters();
        c.set(Counter::QlogMatched, matched);
        c.set(Counter::QlogSession, session);
    }

    /// The qlog gauges, for a new region (they start at zero).
    pub fn restore_qlog_gauges(&self, ctx: &Ctx) {
        let logging = self.conns.iter().filter(|(_, c)| c.qlog).count() as u64;
        let c = ctx.link.counters();
        c.set(Counter::QlogConnections, logging);
        c.set(Counter::QlogSession, self.qlog.as_ref().map_or(0, |q| q.current().0));
    }

    /// A connection just accepted, while a qlog window is open: logged
    /// from its first packet if the window admits its client.
    fn qlog_new_conn(&mut self, conn: &mut Conn, ctx: &Ctx) {
        let Some(window) = self.qlog_window.as_ref() else { return };
        if window.expired(ctx.now) {
            self.qlog_window = None;
            return;
        }
        if window.admits_new(conn.peer, ctx.now) {
            ctx.count(Counter::QlogMatched, 1);
            start_qlog(window, conn, ctx);
        }
    }

    /// Builds the QUIC configuration for new connections from the TLS
    /// material control sent (a reloaded certificate) when it changed.
    /// Open connections keep theirs.
    pub fn adopt_tls(&mut self, ctx: &Ctx) {
        if self.tls.epoch() == self.tls_epoch {
            return;
        }
        self.tls_epoch = self.tls.epoch();
        let material = self.tls.current();
        match quic::transport_config(&ctx.settings.bootstrap, &material, self.tls.tickets()) {
            Ok(config) => {
                self.quic_config = config;
                self.tls_generation = material.generation;
                ctx.link.counters().set(Counter::TlsGeneration, u64::from(material.generation));
                info!(
                    worker = ctx.settings.index,
                    generation = material.generation,
                    "serving a new certificate"
                );
            }
            // Checked once before it was published; keep serving the old one.
            Err(e) => error!(worker = ctx.settings.index, "new TLS material refused: {e}"),
        }
    }
}

/// Starts connection `conn`'s qlog in `window`'s directory.
fn start_qlog(window: &Window, conn: &mut Conn, ctx: &Ctx) {
    let worker = ctx.settings.index;
    let client = conn.client();
    match window.attach(&mut conn.quic, worker, conn.serial, client) {
        Ok(file) => {
            info!(conn = conn.serial, file, "qlog started");
            conn.qlog = true;
            ctx.count(Counter::QlogFiles, 1);
            ctx.count(Counter::QlogConnections, 1);
        }
        Err(e) => {
            warn!(conn = conn.serial, "no qlog for this connection: {e}");
            ctx.count(Counter::QlogRefused, 1);
        }
    }
}

/// Writes what quiche has for `conn` into GSO batches.
fn send_packets(conn: &mut Conn, ctx: &mut Ctx) {
    let gso = relay_udp::gso_enabled();
    let mut failed = false;
    loop {
        let space = ctx.out.quic_space();
        let (n, info) = match conn.quic.send(space) {
            Ok(v) => v,
            Err(quiche::Error::Done) => break,
            Err(e) if !failed => {
                // A failed handshake (e.g. no signature from control)
                // leaves quiche with its TLS alert to send; anything else
                // closes with INTERNAL_ERROR. Either way the
                // CONNECTION_CLOSE goes out now, not at the next timer.
                debug!("QUIC send: {e}");
                failed = true;
                let _ = conn.quic.close(false, 0x1, b"internal error");
                continue;
            }
            Err(e) => {
                debug!("QUIC send after close: {e}");
                break;
            }
        };
        ctx.out.quic_commit(n, info.to, gso);
    }
    ctx.out.finish_quic();
}

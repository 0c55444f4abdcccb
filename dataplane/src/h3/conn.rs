//! One HTTP/3 connection: quiche's connection and HTTP/3 session, and the
//! translation between HTTP/3 framing and the tunnel layer. Requests are
//! validated (RFC 9114 sections 4.1.2, 4.2, 4.3; RFC 9220 section 3) and
//! handed to [`Tunnels::start`]; request stream DATA and HTTP/3 datagrams
//! go in, response heads, stream bytes and stream ends come out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use quiche::h3::NameValue;
use relay_channel::region::Counter;
use relay_proto::channel::record::{ClientCert, ConnInfo, Transport};
use relay_proto::datagram;
use relay_proto::request;
use tracing::debug;

use super::path::{self, H3Path, code};
use crate::context::Ctx;
use crate::slab::Key as ConnKey;
use crate::tunnel::datagrams::{DatagramSupport, Limits};
use crate::tunnel::route::Kind;
use crate::tunnel::webtransport::ClientSide;
use crate::tunnel::{Carrier, End, Opening, Place, Start, TunnelId, Tunnels};

/// Bytes of capsules (or TCP bytes) buffered per tunnel towards the client.
pub const STREAM_OUT_LIMIT: usize = 256 * 1024;
/// Rounds of moving one stream's bytes per flush (a classic CONNECT whose
/// target keeps the stream busy continues at the next flush).
const SERVICE_ROUNDS: usize = 16;

/// Buffers the HTTP/3 side lends a connection for a call.
#[derive(Debug)]
pub struct Scratch {
    /// Request stream bytes (64 KiB).
    pub body: Vec<u8>,
    /// A received datagram (64 KiB).
    pub dgram_in: Vec<u8>,
    /// The streams of the connection being serviced.
    streams: Vec<(u64, TunnelId)>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self { body: vec![0; 65_536], dgram_in: vec![0; 65_536], streams: Vec::new() }
    }
}

/// An HTTP/3 connection.
pub struct Conn {
    /// The QUIC connection.
    pub quic: crate::quic::Connection,
    /// The client's address when the connection was accepted.
    pub peer: SocketAddr,
    /// Lowest request stream ID not seen yet (for GOAWAY).
    next_request_id: u64,
    /// Whether GOAWAY went out on this connection.
    goaway_sent: bool,
    h3: Option<quiche::h3::Connection>,
    /// The HTTP/3 layer may hold an event that no readable stream shows:
    /// a `Finished` that `recv_body` queued when it read a stream's last
    /// bytes outside the poll loop (see [`Self::may_have_h3_events`]).
    h3_event_queued: bool,
    /// HTTP datagrams were found enabled: the client's SETTINGS said so
    /// (they come once) and quiche has room for DATAGRAM frames (the
    /// client's transport parameter and the 1-RTT keys, both fixed once
    /// there). Asking quiche measures the room (path MTU, connection IDs)
    /// on every packet and datagram; once enabled it stays enabled.
    datagrams_enabled: std::cell::Cell<bool>,
    /// Its connection IDs (ours and the client's original).
    pub cids: Vec<quiche::ConnectionId<'static>>,
    /// Moving off the IDs of an older connection ID configuration.
    pub rotating: bool,
    /// Request streams carrying tunnels, looked up for every HTTP
    /// datagram. Keyed by client-chosen stream IDs, but at most
    /// `max_tunnels_per_connection` of them, and the hasher is seeded per
    /// map: a crafted collision costs a scan of that many entries at worst.
    streams: HashMap<u64, TunnelId, foldhash::fast::RandomState>,
    settings_known: bool,
    /// The handshake completed (and was counted).
    pub established: bool,
    /// On the dirty list of this turn.
    pub dirty: bool,
    /// The QUIC timeout armed in the timer heap.
    pub timer: Option<Instant>,
    /// The handshake signature asked of control, if one is outstanding.
    pub signing: Option<u64>,
    /// This worker's serial number for it (`relayctl conns`).
    pub serial: u64,
    /// When it was accepted.
    pub accepted_at: Instant,
    /// The TLS material generation it was accepted with.
    pub tls_generation: u32,
    /// quiche writes its qlog (`relayctl qlog`).
    pub qlog: bool,
    /// The client certificate the handshake verified, described once
    /// (the outer `None`: not read yet).
    client_cert: Option<Option<ClientCert>>,
}

/// What processing a connection's input found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// The handshake completed now.
    pub established: bool,
}

impl Conn {
    /// A connection just accepted.
    pub fn new(
        quic: crate::quic::Connection,
        peer: SocketAddr,
        cids: Vec<quiche::ConnectionId<'static>>,
        serial: u64,
        now: Instant,
        tls_generation: u32,
    ) -> Self {
        Self {
            quic,
            peer,
            next_request_id: 0,
            goaway_sent: false,
            h3: None,
            h3_event_queued: false,
            datagrams_enabled: std::cell::Cell::new(false),
            cids,
            rotating: false,
            streams: HashMap::default(),
            settings_known: false,
            established: false,
            dirty: false,
            timer: None,
            signing: None,
            serial,
            accepted_at: now,
            tls_generation,
            qlog: false,
            client_cert: None,
        }
    }

    /// The client's address now (its active path's), as `relayctl conns`
    /// shows it.
    pub fn client(&self) -> SocketAddr {
        self.quic.path_stats().find(|p| p.active).map_or(self.peer, |p| p.peer_addr)
    }

    /// What the client's SETTINGS say about HTTP/3 datagrams.
    pub fn support(&self) -> DatagramSupport {
        if self.datagrams_enabled.get() {
            return DatagramSupport::Enabled;
        }
        match (&self.h3, self.settings_known) {
            (Some(h3), true) if h3.dgram_enabled_by_peer(&self.quic) => {
                self.datagrams_enabled.set(true);
                DatagramSupport::Enabled
            }
            (Some(_), true) => DatagramSupport::Disabled,
            _ => DatagramSupport::Unknown,
        }
    }

    /// The connection's datagram path.
    pub fn path(&mut self) -> H3Path<'_> {
        let support = self.support();
        H3Path { quic: &mut self.quic, support }
    }

    /// Tunnels carried.
    pub fn tunnels(&self) -> usize {
        self.streams.len()
    }

    /// Handles what quiche received: the handshake, HTTP/3 events, and
    /// datagrams.
    pub fn process(
        &mut self,
        key: ConnKey,
        h3_config: &quiche::h3::Config,
        scratch: &mut Scratch,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
    ) -> Progress {
        let mut progress = Progress::default();
        // Path events (a client's address changed) need no action: quiche
        // validates and migrates by itself. Drain them so they cannot pile
        // up.
        while self.quic.path_event_next().is_some() {}
        if self.quic.is_established() && !self.established {
            self.established = true;
            progress.established = true;
        }
        if self.h3.is_none() && (self.quic.is_established() || self.quic.is_in_early_data()) {
            match quiche::h3::Connection::with_transport(&mut self.quic, h3_config) {
                Ok(h3) => {
                    self.h3 = Some(h3);
                    self.h3_event_queued = true;
                }
                Err(e) => {
                    tracing::warn!(conn = self.serial, "HTTP/3 setup failed: {e}");
                    let _ = self.quic.close(true, code::INTERNAL_ERROR, b"h3 setup");
                    return progress;
                }
            }
        }
        if self.h3.is_none() {
            return progress;
        }
        if ctx.draining {
            self.send_goaway();
        }
        while self.may_have_h3_events() {
            let event = match self.h3.as_mut().map(|h3| h3.poll(&mut self.quic)) {
                Some(Ok(ev)) => ev,
                Some(Err(quiche::h3::Error::Done)) | None => {
                    self.h3_event_queued = false;
                    break;
                }
                Some(Err(e)) => {
                    debug!("HTTP/3 error: {e}");
                    break;
                }
            };
            match event {
                (stream, quiche::h3::Event::Headers { list, more_frames }) => {
                    self.on_request(key, stream, &list, more_frames, tunnels, ctx)
                }
                (stream, quiche::h3::Event::Data) => self.on_data(stream, scratch, tunnels, ctx),
                (stream, quiche::h3::Event::Finished) => {
                    if let Some(&id) = self.streams.get(&stream) {
                        tunnels.on_client_end(ctx, id);
                    }
                }
                (stream, quiche::h3::Event::Reset(_)) => {
                    if let Some(id) = self.streams.remove(&stream) {
                        let _ = self.quic.stream_shutdown(
                            stream,
                            quiche::Shutdown::Write,
                            code::REQUEST_CANCELLED,
                        );
                        tunnels.remove(ctx, id);
                    }
                }
                (_, quiche::h3::Event::PriorityUpdate) | (_, quiche::h3::Event::GoAway) => {}
                // A stream of a WebTransport session (claimed by quiche's
                // HTTP/3 layer, draft-ietf-webtrans-http3 sections 4.2,
                // 4.3): the session's tunnel relays it; a stream for no
                // session, or past what the session buffers, is rejected
                // (section 4.6).
                (stream, quiche::h3::Event::WebTransportStream { session_id }) => {
                    let taken = self
                        .streams
                        .get(&session_id)
                        .is_some_and(|&id| tunnels.on_session_stream(id, stream));
                    if !taken {
                        ctx.count(Counter::DropNoTunnel, 1);
                        let code = crate::tunnel::webtransport::WT_BUFFERED_STREAM_REJECTED;
                        let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Read, code);
                        if stream & 0x2 == 0 {
                            let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Write, code);
                        }
                    }
                }
            }
        }
        if !self.settings_known && self.h3.as_ref().is_some_and(|h| h.peer_settings_raw().is_some()) {
            self.settings_known = true;
            let ids: Vec<TunnelId> = self.streams.values().copied().collect();
            for id in ids {
                let mut path = self.path();
                tunnels.on_datagrams_known(ctx, id, &mut path);
            }
        }
        self.read_datagrams(scratch, tunnels, ctx);
        progress
    }

    /// Whether polling the HTTP/3 layer can return an event. Every event
    /// comes from a readable QUIC stream (a request's HEADERS, DATA, FIN
    /// or reset, the control and QPACK streams, WebTransport streams being
    /// claimed), except the `Finished` that `recv_body` queues when it
    /// reads a stream's last bytes: [`Self::read_body`] notes that. Most
    /// packets of a busy tunnel carry only DATAGRAM frames, and a poll
    /// that finds nothing checks the control streams and the finished list
    /// first (about 250 instructions a packet, `cargo xtask instr`).
    fn may_have_h3_events(&self) -> bool {
        self.h3_event_queued || self.quic.readable().len() > 0
    }

    fn on_request(
        &mut self,
        key: ConnKey,
        stream: u64,
        list: &[quiche::h3::Header],
        more_frames: bool,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
    ) {
        if self.streams.contains_key(&stream) {
            return; // trailers on a tunnel stream: nothing to do
        }
        self.next_request_id = self.next_request_id.max(stream + 4);
        if ctx.draining {
            // RFC 9114 section 5.2: after GOAWAY, requests are rejected with
            // H3_REQUEST_REJECTED (the client may retry them elsewhere).
            ctx.count(Counter::TunnelsRefused, 1);
            return self.reset(stream, code::REQUEST_REJECTED);
        }
        ctx.count(Counter::RequestsReceived, 1);
        let req = match request::parse_request(list.iter().map(|h| (h.name(), h.value())), true) {
            Ok(r) => r,
            Err(why) => {
                // RFC 9114 section 4.1.2: a malformed request is a stream
                // error of type H3_MESSAGE_ERROR.
                debug!(stream, "malformed request: {why}");
                ctx.count(Counter::RequestsMalformed, 1);
                return self.reset(stream, code::MESSAGE_ERROR);
            }
        };
        if ctx.settings.served.webtransport
            && req.method == "CONNECT"
            && req.protocol.as_deref().is_some_and(crate::tunnel::webtransport::is_session_token)
            && self.streams.values().any(|&id| tunnels.kind(id) == Some(Kind::WebTransport))
        {
            // The relay announces SETTINGS_WT_MAX_SESSIONS = 1 and no
            // WebTransport flow control (draft-ietf-webtrans-http3 section
            // 5.1): a second session while one is open or being set up is
            // rejected with H3_REQUEST_REJECTED, which lets the client
            // retry it on another connection.
            debug!(stream, "a second WebTransport session on the connection");
            ctx.count(Counter::TunnelsRefused, 1);
            return self.reset(stream, code::REQUEST_REJECTED);
        }
        let max = ctx.settings.bootstrap.max_tunnels_per_connection as usize;
        let quic = &self.quic;
        let client_cert = self
            .client_cert
            .get_or_insert_with(|| quic.peer_cert().and_then(crate::client_cert::describe_der));
        let opening = Opening {
            place: Place { carrier: Carrier::H3(key), stream, peer: self.peer },
            request: &req,
            ended: !more_frames,
            status_endpoint: false,
            at_capacity: self.streams.len() >= max,
            limits: limits(ctx),
            client_cert: client_cert.as_ref(),
        };
        match tunnels.start(ctx, opening) {
            Start::Tunnel(id) => {
                self.streams.insert(stream, id);
            }
            Start::Refused(head) => self.refuse(stream, &head),
            // Not served over HTTP/3 (status_endpoint is false).
            Start::Status { .. } => self.reset(stream, code::REQUEST_REJECTED),
        }
    }

    /// Sends a complete refusal and stops reading the request: RFC 9114
    /// section 4.1, a server that does not need the rest of the request
    /// aborts reading with H3_NO_ERROR.
    fn refuse(&mut self, stream: u64, head: &crate::tunnel::head::Head) {
        let Some(h3) = self.h3.as_mut() else { return };
        if h3.send_response(&mut self.quic, stream, &path::headers(head), true).is_err() {
            let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Write, code::INTERNAL_ERROR);
        }
        let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Read, code::NO_ERROR);
    }

    /// Resets both directions of `stream` with `code`.
    fn reset(&mut self, stream: u64, code: u64) {
        let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Read, code);
        let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Write, code);
    }

    /// Request stream DATA: what the tunnel takes now. A byte stream
    /// (classic CONNECT, WebSocket) is read later, when the connection is
    /// flushed at the end of the turn ([`Self::service_streams`]): then the
    /// bytes of every packet of the turn go to the target in one write,
    /// not one write per packet, and only as far as the target has room
    /// (the rest stays in quiche, whose flow control holds the client). A
    /// refused request's body is discarded.
    fn on_data(&mut self, stream: u64, scratch: &mut Scratch, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        let Some(&id) = self.streams.get(&stream) else {
            while let Some(h3) = self.h3.as_mut() {
                match h3.recv_body(&mut self.quic, stream, &mut scratch.body) {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            }
            return;
        };
        if tunnels.kind(id).is_some_and(crate::tunnel::route::Kind::byte_stream) {
            return;
        }
        self.read_body(stream, id, scratch, tunnels, ctx);
    }

    /// Reads request stream bytes into tunnel `id` while it takes them.
    fn read_body(
        &mut self,
        stream: u64,
        id: TunnelId,
        scratch: &mut Scratch,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
    ) {
        let Scratch { body, .. } = scratch;
        // Reading may consume a FIN, for which the HTTP/3 layer queues a
        // `Finished` event that the next poll returns.
        self.h3_event_queued = true;
        loop {
            let room = tunnels.up_room(id).min(body.len());
            if room == 0 || !matches!(tunnels.end(id), End::Open | End::Finish { stop_reading: false }) {
                return;
            }
            let Some(h3) = self.h3.as_mut() else { return };
            let n = match h3.recv_body(&mut self.quic, stream, &mut body[..room]) {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            let support = self.support();
            let mut path = H3Path { quic: &mut self.quic, support };
            tunnels.on_stream_bytes(ctx, id, &body[..n], &mut path);
        }
    }

    fn read_datagrams(&mut self, scratch: &mut Scratch, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        let support = self.support();
        let Scratch { dgram_in, .. } = scratch;
        while let Ok(len) = self.quic.dgram_recv(dgram_in) {
            let (stream_id, rest) = match datagram::split(&dgram_in[..len]) {
                Ok(d) => d,
                Err(_) => {
                    // RFC 9297 section 2.1: H3_DATAGRAM_ERROR.
                    ctx.count(Counter::DropMalformed, 1);
                    let _ = self.quic.close(true, code::DATAGRAM_ERROR, b"malformed HTTP datagram");
                    break;
                }
            };
            let Some(&id) = self.streams.get(&stream_id) else {
                // RFC 9297 section 2.1: datagrams for streams that are not
                // (or no longer) tunnels are dropped.
                ctx.count(Counter::DropNoTunnel, 1);
                continue;
            };
            if tunnels.kind(id) == Some(Kind::WebTransport) {
                // A WebTransport datagram's payload has no context ID
                // (draft-ietf-webtrans-http3 section 4.5).
                tunnels.on_session_datagram(ctx, id, rest);
                continue;
            }
            let d = match datagram::decode_payload(stream_id, rest) {
                Ok(d) => d,
                Err(_) => {
                    // RFC 9298 section 5: dropped.
                    ctx.count(Counter::DropMalformed, 1);
                    continue;
                }
            };
            let mut path = H3Path { quic: &mut self.quic, support };
            tunnels.on_datagram(ctx, id, d.context_id, d.payload, &mut path);
        }
    }

    /// Moves every tunnel stream's output: response heads, stream bytes,
    /// FIN or reset; a classic CONNECT's waiting request bytes go in as its
    /// target takes them. Finished tunnels are removed.
    pub fn service_streams(&mut self, scratch: &mut Scratch, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        if self.streams.is_empty() || self.h3.is_none() {
            return;
        }
        let mut streams = std::mem::take(&mut scratch.streams);
        streams.extend(
            self.streams.iter().filter(|(_, id)| tunnels.needs_service(**id)).map(|(s, id)| (*s, *id)),
        );
        for (stream, id) in streams.drain(..) {
            if self.service(stream, id, scratch, tunnels, ctx) {
                self.streams.remove(&stream);
                tunnels.remove(ctx, id);
            }
        }
        scratch.streams = streams;
    }

    /// Moves one tunnel stream; returns whether the tunnel is complete.
    fn service(
        &mut self,
        stream: u64,
        id: TunnelId,
        scratch: &mut Scratch,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
    ) -> bool {
        let session = tunnels.kind(id) == Some(Kind::WebTransport);
        if session {
            self.pump_session(id, tunnels, ctx);
        }
        let complete = self.service_rounds(stream, id, scratch, tunnels, ctx);
        if session && !complete {
            // What the rounds read from the client's session stream goes
            // to the origin now, not at the next event.
            self.pump_session(id, tunnels, ctx);
        }
        complete
    }

    /// A WebTransport session's turn with this connection.
    fn pump_session(&mut self, id: TunnelId, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        let datagrams = self.support() == DatagramSupport::Enabled;
        let Some(h3) = self.h3.as_mut() else { return };
        let mut client = ClientSide { quic: &mut self.quic, h3, datagrams };
        tunnels.pump_session(ctx, id, &mut client);
    }

    /// The service rounds of one tunnel stream.
    fn service_rounds(
        &mut self,
        stream: u64,
        id: TunnelId,
        scratch: &mut Scratch,
        tunnels: &mut Tunnels,
        ctx: &mut Ctx,
    ) -> bool {
        for _ in 0..SERVICE_ROUNDS {
            let mut moved = false;
            if let Some(head) = tunnels.take_head(id) {
                let fin = !head.tunnel && tunnels.out(id).is_empty();
                let Some(h3) = self.h3.as_mut() else { return false };
                match h3.send_response(&mut self.quic, stream, &path::headers(&head), fin) {
                    Ok(()) if fin => self.fin_sent(stream, id, tunnels),
                    Ok(()) => {}
                    Err(quiche::h3::Error::StreamBlocked) => {
                        tunnels.restore_head(id, head);
                        return false;
                    }
                    Err(e) => {
                        debug!(stream, "HTTP/3 response: {e}");
                        let _ =
                            self.quic.stream_shutdown(stream, quiche::Shutdown::Write, code::INTERNAL_ERROR);
                        return true;
                    }
                }
                moved = true;
            }
            let out = tunnels.out(id);
            if !out.is_empty() {
                let Some(h3) = self.h3.as_mut() else { return false };
                if let Ok(n) = h3.send_body(&mut self.quic, stream, out, false)
                    && n > 0
                {
                    tunnels.consume(ctx, id, n);
                    moved = true;
                }
            }
            // A byte stream's request bytes wait in quiche until the
            // flush, and then until its target has room. Reading the last
            // of them consumes the client's FIN, which quiche's HTTP/3
            // layer reports only at its next poll (the next packet): the
            // end is taken here. (A reset leaves the stream readable until
            // that poll reports it: no FIN for it.)
            if tunnels.up_room(id) > 0
                && tunnels.kind(id).is_some_and(crate::tunnel::route::Kind::byte_stream)
            {
                self.read_body(stream, id, scratch, tunnels, ctx);
                if self.quic.stream_finished(stream) && !self.quic.stream_readable(stream) {
                    tunnels.on_client_end(ctx, id);
                }
            }
            match tunnels.end(id) {
                End::Open => {}
                End::Abort(a) => {
                    self.reset(stream, path::abort_code(a));
                    return true;
                }
                End::Finish { .. } => {
                    if tunnels.wants_fin(id)
                        && let Some(h3) = self.h3.as_mut()
                        && h3.send_body(&mut self.quic, stream, &[], true).is_ok()
                    {
                        self.fin_sent(stream, id, tunnels);
                        moved = true;
                    }
                }
            }
            if tunnels.complete(id) {
                return true;
            }
            if !moved {
                return false;
            }
        }
        false
    }

    /// Our side of `stream` ended: a tunnel that does not need the client's
    /// side any more stops reading it (RFC 9114 section 4.1: STOP_SENDING
    /// with H3_NO_ERROR).
    fn fin_sent(&mut self, stream: u64, id: TunnelId, tunnels: &mut Tunnels) {
        tunnels.fin_sent(id);
        if matches!(tunnels.end(id), End::Finish { stop_reading: true }) {
            let _ = self.quic.stream_shutdown(stream, quiche::Shutdown::Read, code::NO_ERROR);
        }
    }

    /// Sends GOAWAY once, naming the first request stream that will not be
    /// processed (RFC 9114 section 5.2).
    pub fn send_goaway(&mut self) {
        if self.goaway_sent {
            return;
        }
        if let Some(h3) = self.h3.as_mut()
            && h3.send_goaway(&mut self.quic, self.next_request_id).is_ok()
        {
            self.goaway_sent = true;
        }
    }

    /// Releases every tunnel (the connection is gone).
    pub fn close_tunnels(&mut self, tunnels: &mut Tunnels, ctx: &mut Ctx) {
        for (_, id) in self.streams.drain() {
            tunnels.remove(ctx, id);
        }
    }

    /// The connection as `relayctl conns` lists it.
    pub fn info(&self, request_id: u64, now: Instant) -> ConnInfo {
        let stats = self.quic.stats();
        let path = self.quic.path_stats().find(|p| p.active);
        ConnInfo {
            request_id,
            transport: Transport::H3,
            conn_id: self.serial,
            client: path.as_ref().map_or(self.peer, |p| p.peer_addr),
            age_ms: now.saturating_duration_since(self.accepted_at).as_millis() as u64,
            established: self.quic.is_established(),
            resumed: self.quic.is_resumed(),
            tls_generation: self.tls_generation,
            tunnels: self.streams.len() as u32,
            rtt_us: path.as_ref().map_or(0, |p| p.rtt.as_micros() as u64),
            packets_sent: stats.sent as u64,
            packets_recv: stats.recv as u64,
            packets_lost: stats.lost as u64,
            bytes_sent: stats.sent_bytes,
            bytes_recv: stats.recv_bytes,
            max_tunnel_payload: self
                .quic
                .dgram_max_writable_len()
                .map_or(0, |m| m.saturating_sub(path::DATAGRAM_HEADER_MAX))
                as u32,
        }
    }
}

/// The bounds of HTTP/3 tunnels.
fn limits(ctx: &Ctx) -> Limits {
    let b = &ctx.settings.bootstrap;
    Limits {
        max_capsule_len: b.max_capsule_len as usize,
        max_queued_datagrams: b.pending_datagrams_per_tunnel as usize,
        stream_out_limit: STREAM_OUT_LIMIT,
    }
}

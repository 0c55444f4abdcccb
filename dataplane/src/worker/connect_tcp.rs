//! Classic CONNECT over HTTP/3 (RFC 9114 section 4.4): a request with
//! only `:method CONNECT` and `:authority host:port`; once control allows
//! it and the TCP connection to the target is up, the 2xx goes out and the
//! request stream's DATA carries the TCP bytes both ways.
//!
//! * Backpressure both ways: client DATA is read from quiche only while
//!   the target's buffer has room (quiche's stream flow control then holds
//!   the client), and the target is read only while the bytes waiting for
//!   the stream stay under the tunnel's bound.
//! * Half-close: the client's FIN becomes a FIN towards the target once
//!   the buffered bytes are written; the target's FIN becomes the stream's
//!   FIN. The tunnel ends when both directions have ended.
//! * Errors (section 4.4): a TCP error (a reset, a failed write) resets
//!   the stream with H3_CONNECT_ERROR; a client that resets the stream gets
//!   its TCP connection closed with RST.

use std::time::Duration;

use relay_proto::channel::record::{FlowClosed, TunnelProtocol};
use relay_proto::request::{self, Request};
use tracing::debug;

use super::{Conn, ConnKey, Counter, TunnelAsk, Worker};
use crate::io::{Ready, Watch, WatchKey};
use crate::tcp_target::{TargetRead, TargetState, TcpTarget, connect_failure};

/// H3_CONNECT_ERROR (RFC 9114 section 8.1).
pub(super) const CONNECT_ERROR: u64 = 0x10f;

/// Bytes buffered each way per TCP tunnel.
const TUNNEL_BUFFER: usize = 256 * 1024;

/// How long a TCP connect may take before the request is answered 504.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP CONNECT tunnel's state beside its [`crate::tunnel::Tunnel`].
#[derive(Debug)]
pub(super) struct TcpTunnel {
    pub(super) target: TcpTarget,
    pub(super) watch: WatchKey,
    /// The flow's idle timeout (the tunnel runs with the connect timeout
    /// until the target is up).
    idle_timeout: Duration,
    /// Target bytes not yet taken by the stream.
    down: Vec<u8>,
    /// Client DATA is waiting in quiche because the target's buffer was full.
    up_blocked: bool,
    /// The client sent FIN.
    up_fin: bool,
    /// Our FIN went out on the stream.
    down_fin_sent: bool,
    /// Totals already added to the tunnel's.
    counted: (u64, u64),
}

impl TcpTunnel {
    /// Whether the connect is still in progress.
    pub(super) fn connecting(&self) -> bool {
        self.target.state() == TargetState::Connecting
    }
}

impl Worker {
    /// A plain CONNECT on an HTTP/3 stream.
    pub(super) fn on_connect_tcp_request(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        stream_id: u64,
        req: &Request,
        more_frames: bool,
    ) {
        let connect = match request::classify_connect_tcp(req) {
            Ok(c) => c,
            Err(refusal) => {
                return self.refuse(conn, stream_id, refusal.status, refusal.proxy_error, refusal.reason);
            }
        };
        let target_host = match &connect.target_host {
            relay_proto::target::TargetHost::Ip(ip) => ip.to_string(),
            relay_proto::target::TargetHost::Name(n) => n.clone(),
        };
        let authority = req.authority.clone().unwrap_or_default();
        let ask = TunnelAsk {
            authority: &authority,
            path: "",
            target_host: &target_host,
            target_port: connect.target_port,
            authorization: connect.authorization.as_deref(),
            protocol: TunnelProtocol::ConnectTcp,
        };
        self.start_tunnel(key, conn, stream_id, more_frames, ask);
    }

    /// Control allowed a TCP CONNECT: connect to the target; the 2xx waits
    /// for the connection.
    pub(super) fn open_tcp(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        stream_id: u64,
        allow: (u64, std::net::SocketAddr, u32, u64, String),
    ) {
        let (flow_id, target, idle_timeout_ms, byte_budget, identity) = allow;
        let t = match TcpTarget::connect(target, TUNNEL_BUFFER) {
            Ok(t) => t,
            Err(e) => {
                debug!("TCP target socket: {e}");
                conn.tunnels.remove(&stream_id);
                self.link.flow_closed(FlowClosed::unused(flow_id));
                self.count(Counter::TcpConnectFailures, 1);
                let (status, error, reason) = connect_failure(e.raw_os_error().unwrap_or(0));
                return self.refuse(conn, stream_id, status, Some(error), reason);
            }
        };
        let watch = self.next_watch;
        self.next_watch += 1;
        self.watched.insert(watch, (key, stream_id));
        self.out.watches.push(Watch { key: watch, fd: t.fd(), writable: true });
        let now = self.now;
        let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return };
        // Until the target is up the tunnel's deadline is the connect's.
        let _ = entry.tunnel.open(flow_id, target, CONNECT_TIMEOUT, byte_budget, now);
        entry.identity = identity;
        entry.tcp = Some(Box::new(TcpTunnel {
            target: t,
            watch,
            idle_timeout: Duration::from_millis(u64::from(idle_timeout_ms)),
            down: Vec::new(),
            up_blocked: false,
            up_fin: false,
            down_fin_sent: false,
            counted: (0, 0),
        }));
        self.tunnels_open += 1;
        self.tcp_tunnels += 1;
        self.count(Counter::TunnelsActive, 1);
        self.timers.push(entry.tunnel.deadline(), super::TimerTarget::Tunnel(key, stream_id));
    }

    /// A TCP target's socket is ready (`watch` names it).
    pub(super) fn tcp_ready(&mut self, watch: WatchKey, ready: Ready) {
        let Some(&(key, stream_id)) = self.watched.get(&watch) else { return };
        let Some(mut conn) = self.take_conn(key) else { return };
        if let Some(tcp) = conn.tunnels.get_mut(&stream_id).and_then(|e| e.tcp.as_mut()) {
            let was_connecting = tcp.connecting();
            tcp.target.on_ready(ready);
            if was_connecting {
                match tcp.target.state() {
                    TargetState::Connecting => {}
                    TargetState::Connected => self.tcp_connected(&mut conn, stream_id),
                    TargetState::Failed(errno) => self.tcp_connect_failed(&mut conn, stream_id, errno),
                }
            }
        }
        self.pump_tcp(key, &mut conn, stream_id);
        self.put_conn(key, conn);
    }

    fn tcp_connected(&mut self, conn: &mut Conn, stream_id: u64) {
        let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return };
        let Some(tcp) = entry.tcp.as_mut() else { return };
        entry.tunnel.set_idle_timeout(tcp.idle_timeout);
        entry.tunnel.touch(self.now);
        self.count(Counter::TunnelsOpened, 1);
        // RFC 9110 section 9.3.6: a 2xx to CONNECT carries no content and
        // no capsule protocol: the stream is the TCP byte stream.
        let headers = vec![quiche::h3::Header::new(b":status", b"200")];
        let sent = conn.h3.as_mut().map(|h3| h3.send_response(&mut conn.quic, stream_id, &headers, false));
        if !matches!(sent, Some(Ok(()))) {
            entry.response_pending = Some(headers);
        }
    }

    /// The connect failed: 502 (refused, unreachable) with Proxy-Status.
    pub(super) fn tcp_connect_failed(&mut self, conn: &mut Conn, stream_id: u64, errno: i32) {
        let Some(mut entry) = conn.tunnels.remove(&stream_id) else { return };
        debug!(stream_id, errno, "TCP target connect failed");
        self.count(Counter::TcpConnectFailures, 1);
        // Allowed but never carried anything: reported with zero totals.
        entry.tunnel.totals = Default::default();
        self.close_tunnel(entry);
        let (status, error, reason) = connect_failure(errno);
        self.refuse(conn, stream_id, status, Some(error), reason);
    }

    /// Moves bytes between the stream and the target as far as both
    /// allow; ends or aborts the tunnel when it is over.
    pub(super) fn pump_tcp(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64) {
        let now = self.now;
        for _ in 0..16 {
            let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return };
            let Some(tcp) = entry.tcp.as_mut() else { return };
            if tcp.target.state() != TargetState::Connected || entry.response_pending.is_some() {
                return;
            }
            let mut progress = false;
            // Client bytes waiting in quiche.
            if tcp.up_blocked || !tcp.up_fin {
                let room = tcp.target.room();
                if room > 0 {
                    tcp.up_blocked = false;
                    if let Some(h3) = conn.h3.as_mut() {
                        let want = room.min(self.buf.len());
                        match h3.recv_body(&mut conn.quic, stream_id, &mut self.buf[..want]) {
                            Ok(n) if n > 0 => {
                                tcp.target.push(&self.buf[..n]);
                                progress = true;
                            }
                            _ => {}
                        }
                    }
                } else {
                    tcp.up_blocked = true;
                }
            }
            tcp.target.flush();
            // Target bytes towards the stream.
            let room = TUNNEL_BUFFER.saturating_sub(tcp.down.len());
            if room > 0 && tcp.target.may_read() {
                match tcp.target.read_into(&mut tcp.down, room.min(64 * 1024)) {
                    TargetRead::Data(_) => progress = true,
                    TargetRead::Blocked | TargetRead::Eof => {}
                }
            }
            if !tcp.down.is_empty()
                && let Some(h3) = conn.h3.as_mut()
                && let Ok(n) = h3.send_body(&mut conn.quic, stream_id, &tcp.down, false)
                && n > 0
            {
                tcp.down.drain(..n);
                progress = true;
            }
            if tcp.target.eof()
                && tcp.down.is_empty()
                && !tcp.down_fin_sent
                && let Some(h3) = conn.h3.as_mut()
                && h3.send_body(&mut conn.quic, stream_id, &[], true).is_ok()
            {
                tcp.down_fin_sent = true;
                progress = true;
            }
            // Accounting: bytes actually written to / read from the target.
            let (up, down) = tcp.target.totals();
            let (du, dd) = (up - tcp.counted.0, down - tcp.counted.1);
            if du + dd > 0 {
                tcp.counted = (up, down);
                entry.tunnel.add_stream_bytes(du, dd, now);
                self.link.counters().add(Counter::TcpBytesUp, du);
                self.link.counters().add(Counter::TcpBytesDown, dd);
                if entry.tunnel.over_budget() {
                    self.note_over_budget(key, stream_id);
                }
            }
            let failed = matches!(tcp.target.state(), TargetState::Failed(_));
            let done = tcp.down_fin_sent && tcp.up_fin && tcp.target.write_closed();
            if failed {
                debug!(stream_id, "TCP target connection failed: H3_CONNECT_ERROR");
                self.abort_tunnel(conn, stream_id, CONNECT_ERROR);
                return;
            }
            if done {
                if let Some(entry) = conn.tunnels.remove(&stream_id) {
                    self.close_tunnel(entry);
                }
                return;
            }
            if !progress {
                return;
            }
        }
        // More than one call's work: continue at the next flush.
    }

    /// The client's FIN on a TCP tunnel: a half-close towards the target.
    pub(super) fn tcp_client_fin(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64) {
        if let Some(tcp) = conn.tunnels.get_mut(&stream_id).and_then(|e| e.tcp.as_mut()) {
            tcp.up_fin = true;
            tcp.target.finish();
            tcp.target.flush();
        }
        self.pump_tcp(key, conn, stream_id);
    }

    /// Releases a TCP tunnel's socket: RST unless both directions ended
    /// (RFC 9114 section 4.4: a reset stream closes the TCP connection
    /// with RST).
    pub(super) fn release_tcp(&mut self, mut tcp: TcpTunnel) {
        self.tcp_tunnels = self.tcp_tunnels.saturating_sub(1);
        if !(tcp.up_fin && tcp.down_fin_sent) {
            tcp.target.abort();
        }
        self.watched.remove(&tcp.watch);
        let stream = tcp.target.into_stream();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        if let Some(i) = self.out.watches.iter().position(|w| w.key == tcp.watch) {
            self.out.watches.swap_remove(i);
        } else {
            self.out.unwatches.push((tcp.watch, fd));
        }
        self.closing_tcp.push(stream);
    }

    /// Whether `watch` is a TCP tunnel's target socket.
    pub(super) fn is_tcp_watch(&self, watch: WatchKey) -> bool {
        self.watched
            .get(&watch)
            .and_then(|(k, s)| self.conns.get(*k).and_then(|c| c.tunnels.get(s)))
            .is_some_and(|e| e.tcp.is_some())
    }

    /// Keeps moving the bytes of a connection's TCP tunnels (after the
    /// stream took some, or quiche granted credit).
    pub(super) fn pump_conn_tcp(&mut self, key: ConnKey, conn: &mut Conn) {
        if self.tcp_tunnels == 0 {
            return; // the common case: no TCP tunnel on this worker
        }
        let ids: Vec<u64> = conn.tunnels.iter().filter(|(_, e)| e.tcp.is_some()).map(|(id, _)| *id).collect();
        for id in ids {
            self.pump_tcp(key, conn, id);
        }
    }

    /// Ends a TCP tunnel that is connecting with 504 (the connect timed
    /// out); returns whether it was one.
    pub(super) fn tcp_connect_timeout(&mut self, conn: &mut Conn, stream_id: u64) -> bool {
        let connecting =
            conn.tunnels.get(&stream_id).and_then(|e| e.tcp.as_ref()).is_some_and(|t| t.connecting());
        if connecting {
            self.tcp_connect_failed(conn, stream_id, libc::ETIMEDOUT);
        }
        connecting
    }
}

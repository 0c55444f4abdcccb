//! Bound connect-udp (draft-ietf-masque-connect-udp-listen) in the worker:
//! one unconnected UDP socket per tunnel, its own ephemeral port, sending
//! to any peer the client names and delivering what any (allowed, and
//! unfiltered) peer sends, with the peer's address.
//!
//! The compression contexts (COMPRESSION_ASSIGN / ACK / CLOSE, the
//! uncompressed context, proxy-allocated odd contexts for new peers) are
//! `relay_proto::bind::ContextTable`'s; this module moves datagrams between
//! it, the socket and the client, and applies control's peer policy to
//! every datagram both ways (draft section 9). The socket is serviced by
//! readiness (the backend's watch list) with plain `recvfrom` / `sendto`:
//! bound tunnels carry signalling-rate traffic (STUN, ICE, WebRTC media for
//! one client), not the relay's bulk path.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use std::time::Duration;

use relay_proto::bind::{self, ContextTable, Inbound, OutboundError};
use relay_proto::channel::bootstrap::InboundFilter;
use relay_proto::channel::record::{FlowClosed, IpRoute, TunnelProtocol};
use relay_proto::proxy_status::ProxyError;
use relay_proto::request::{self, Request};
use relay_proto::target::TargetHost;
use tracing::debug;

use super::{Conn, ConnKey, Counter, TunnelAsk, Worker, h3_code};
use crate::io::WatchKey;
use crate::response;

/// Packets read from one bound socket per readiness event.
const RECV_BUDGET: usize = 64;

/// A bound tunnel's state.
pub(super) struct BoundTunnel {
    pub(super) socket: UdpSocket,
    pub(super) watch: WatchKey,
    pub(super) table: ContextTable,
    /// Where peers may be (control's policy), sorted ranges.
    peers: Vec<IpRoute>,
}

fn ip_value(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (true, u128::from(u32::from(a))),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (true, u128::from(u32::from(v4))),
            None => (false, u128::from(a)),
        },
    }
}

/// The socket's view of a peer: IPv4 peers appear v4-mapped on the
/// dual-stack socket; the client sees plain IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

impl BoundTunnel {
    /// A dual-stack unconnected socket on an ephemeral port.
    pub(super) fn open(watch: WatchKey, table: ContextTable, peers: Vec<IpRoute>) -> io::Result<Self> {
        let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
        sock.set_only_v6(false)?;
        sock.set_nonblocking(true)?;
        sock.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).into())?;
        Ok(Self { socket: sock.into(), watch, table, peers })
    }

    /// The port peers reach the tunnel at.
    pub(super) fn port(&self) -> u16 {
        self.socket.local_addr().map_or(0, |a| a.port())
    }

    /// Whether control's policy lets the tunnel talk to `peer`.
    pub(super) fn peer_allowed(&self, peer: SocketAddr) -> bool {
        peer_in(&self.peers, peer)
    }
}

/// Whether `peer` lies in `ranges` (port 0 never does).
fn peer_in(ranges: &[IpRoute], peer: SocketAddr) -> bool {
    let (v4, value) = ip_value(peer.ip());
    peer.port() != 0
        && ranges.iter().any(|r| {
            let (sv4, start) = ip_value(r.start);
            let (_, end) = ip_value(r.end);
            sv4 == v4 && (start..=end).contains(&value)
        })
}

/// The addresses of a tunnel's Proxy-Public-Address (draft section 7): the
/// configured public addresses, or each family's primary outbound address
/// (the source the kernel picks towards a global address; nothing is sent).
pub(super) fn public_addresses(configured: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    let ips: Vec<IpAddr> = if configured.is_empty() {
        ["192.0.2.1:9", "[2001:db8::1]:9"]
            .iter()
            .filter_map(|probe| {
                let probe: SocketAddr = probe.parse().ok()?;
                let bind: SocketAddr = if probe.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
                let s = UdpSocket::bind(bind).ok()?;
                s.connect(probe).ok()?;
                s.local_addr().ok().map(|a| a.ip())
            })
            .collect()
    } else {
        configured.to_vec()
    };
    ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect()
}

/// What control granted a bound tunnel.
pub(super) struct BindGrant {
    pub(super) flow_id: u64,
    pub(super) idle_timeout_ms: u32,
    pub(super) byte_budget: u64,
    pub(super) identity: String,
    pub(super) peers: Vec<IpRoute>,
    /// The request's fallback target, if any.
    pub(super) target: Option<SocketAddr>,
}

impl Worker {
    /// A connect-udp request with `connect-udp-bind: ?1` (draft section 2).
    pub(super) fn on_bind_request(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        stream_id: u64,
        req: &Request,
        more_frames: bool,
    ) {
        let connect = match request::classify_connect_udp_bind(req, &self.settings.template) {
            Ok(c) => c,
            Err(refusal) => {
                return self.refuse(conn, stream_id, refusal.status, refusal.proxy_error, refusal.reason);
            }
        };
        let (target_host, target_port, target) = match &connect.target {
            None => ("*".to_string(), 0, None),
            Some((TargetHost::Ip(ip), port)) => (ip.to_string(), *port, Some(SocketAddr::new(*ip, *port))),
            Some((TargetHost::Name(_), _)) => {
                return self.refuse(
                    conn,
                    stream_id,
                    400,
                    Some(ProxyError::HttpRequestError),
                    "a bound request's fallback target must be an IP address (or both '*')",
                );
            }
        };
        let ask = TunnelAsk {
            authority: &connect.authority,
            path: &connect.path,
            target_host: &target_host,
            target_port,
            authorization: connect.authorization.as_deref(),
            protocol: TunnelProtocol::ConnectUdpBind,
        };
        self.start_tunnel(key, conn, stream_id, more_frames, ask);
        if let Some(entry) = conn.tunnels.get_mut(&stream_id) {
            entry.bind_target = target;
        }
    }

    /// Control allowed a bound tunnel: open its socket and answer with the
    /// public address (draft sections 6 and 7).
    pub(super) fn open_bound(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64, grant: BindGrant) {
        let Some(cfg) = self.settings.bootstrap.bind.clone() else {
            conn.tunnels.remove(&stream_id);
            self.link.flow_closed(FlowClosed::unused(grant.flow_id));
            return self.refuse(conn, stream_id, 501, None, "bound connect-udp is not served");
        };
        let limits =
            bind::Limits { max_contexts: cfg.max_contexts as usize, max_peers: cfg.max_peers as usize };
        let filter = match cfg.inbound_filter {
            InboundFilter::Any => bind::Filter::Any,
            InboundFilter::SentTo => bind::Filter::SentTo,
        };
        let mut table = ContextTable::new(limits, filter);
        if let Some(t) = grant.target {
            table = table.with_target(t);
        }
        let watch = self.next_watch;
        let b = match BoundTunnel::open(watch, table, grant.peers) {
            Ok(b) => b,
            Err(e) => {
                debug!("bound socket: {e}");
                conn.tunnels.remove(&stream_id);
                self.link.flow_closed(FlowClosed::unused(grant.flow_id));
                let reason = "cannot open a bound socket";
                return self.refuse(conn, stream_id, 502, Some(ProxyError::ProxyInternalError), reason);
            }
        };
        self.next_watch += 1;
        let public = public_addresses(&cfg.public_addresses, b.port());
        if public.is_empty() {
            // Draft section 7: the proxy MUST announce at least one address.
            conn.tunnels.remove(&stream_id);
            self.link.flow_closed(FlowClosed::unused(grant.flow_id));
            let reason = "no public address to announce (set bind.public_addresses)";
            return self.refuse(conn, stream_id, 502, Some(ProxyError::ProxyInternalError), reason);
        }
        self.watched.insert(watch, (key, stream_id));
        self.out.watches.push(crate::io::Watch { key: watch, fd: b.as_raw_fd(), writable: false });
        let now = self.now;
        let unspecified = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
        let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return };
        let _early = entry.tunnel.open(
            grant.flow_id,
            unspecified,
            Duration::from_millis(u64::from(grant.idle_timeout_ms)),
            grant.byte_budget,
            now,
        );
        entry.identity = grant.identity;
        entry.bind = Some(Box::new(b));
        self.tunnels_open += 1;
        self.count(Counter::TunnelsOpened, 1);
        self.count(Counter::TunnelsActive, 1);
        let mut headers = response::tunnel_open();
        headers.push(quiche::h3::Header::new(b"connect-udp-bind", b"?1"));
        headers.push(quiche::h3::Header::new(
            b"proxy-public-address",
            bind::proxy_public_address(&public).as_bytes(),
        ));
        let sent = conn.h3.as_mut().map(|h3| h3.send_response(&mut conn.quic, stream_id, &headers, false));
        if !matches!(sent, Some(Ok(()))) {
            entry.response_pending = Some(headers);
        }
        // Capsules and datagrams that came before the allow.
        if let Some(code) = self.bind_from_client(key, conn, stream_id) {
            self.abort_tunnel(conn, stream_id, code);
        }
    }

    /// Handles the bound tunnel's queued datagrams and capsules from the
    /// client. Returns an H3 error code when the stream must be aborted.
    pub(super) fn bind_from_client(&mut self, key: ConnKey, conn: &mut Conn, stream_id: u64) -> Option<u64> {
        let entry = conn.tunnels.get_mut(&stream_id)?;
        let b = entry.bind.as_mut()?;
        let mut replies = Vec::new();
        for (capsule_type, value) in entry.tunnel.take_control() {
            let capsule = match bind::decode_capsule(capsule_type, &value) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    debug!(stream_id, "malformed bind capsule: {e}");
                    return Some(h3_code::MESSAGE_ERROR);
                }
            };
            let BoundTunnel { table, peers, .. } = &mut **b;
            match table.on_client_capsule(capsule, |peer| peer_in(peers, peer)) {
                Ok(out) => replies.extend(out),
                Err(e) => {
                    debug!(stream_id, "bind capsule refused as malformed: {e}");
                    return Some(h3_code::MESSAGE_ERROR);
                }
            }
        }
        let mut out = Vec::new();
        for r in &replies {
            bind::encode_capsule(r, &mut out);
        }
        if !out.is_empty() && !entry.tunnel.push_raw_capsule(&out) {
            self.count(Counter::DropQueueFull, 1);
        }
        let datagrams: VecDeque<(u64, Vec<u8>)> = entry.tunnel.take_bind_datagrams();
        for (context_id, payload) in datagrams {
            let Some(b) = entry.bind.as_mut() else { break };
            match b.table.outbound(context_id, &payload) {
                Ok((peer, udp)) => {
                    if !b.peer_allowed(peer) {
                        self.link.counters().add(Counter::BindPeerDenied, 1);
                        continue;
                    }
                    match b.socket.send_to(udp, mapped(peer)) {
                        Ok(_) => {
                            self.count(Counter::DatagramsUp, 1);
                            self.count(Counter::BytesUp, udp.len() as u64);
                        }
                        Err(e) => {
                            debug!("bound send to {peer}: {e}");
                            self.out.stats.drop_target_send += 1;
                        }
                    }
                }
                Err(OutboundError::ContextZero) => return Some(h3_code::DATAGRAM_ERROR),
                Err(OutboundError::UnknownContext(_)) => self.count(Counter::DropUnknownContext, 1),
                Err(OutboundError::Malformed(_)) => self.count(Counter::DropMalformed, 1),
            }
        }
        // The upload side of the byte quota (the download side is checked
        // where datagrams go to the client).
        if conn.tunnels.get(&stream_id).is_some_and(|e| e.tunnel.over_budget()) {
            self.note_over_budget(key, stream_id);
        }
        None
    }

    /// A bound socket is readable: deliver what peers sent.
    pub(super) fn bind_readable(&mut self, watch: WatchKey) {
        let Some(&(key, stream_id)) = self.watched.get(&watch) else { return };
        let Some(mut conn) = self.take_conn(key) else { return };
        let mut buf = std::mem::take(&mut self.buf);
        let mut drained = false;
        let mut errors = 0;
        for _ in 0..RECV_BUDGET {
            let Some(b) = conn.tunnels.get_mut(&stream_id).and_then(|e| e.bind.as_mut()) else {
                drained = true;
                break;
            };
            let (n, from) = match b.socket.recv_from(&mut buf) {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                // ICMP errors from earlier sends (a peer's port closed) and
                // the like: the socket stays usable for the other peers.
                Err(e) => {
                    debug!("bound receive: {e}");
                    errors += 1;
                    if errors > 4 {
                        drained = true;
                        break;
                    }
                    continue;
                }
            };
            self.count(Counter::TargetPacketsIn, 1);
            let peer = unmap(from);
            if !b.peer_allowed(peer) {
                self.link.counters().add(Counter::BindPeerDenied, 1);
                continue;
            }
            match b.table.inbound(peer) {
                Inbound::Compressed(ctx) => self.send_down_ctx(&mut conn, stream_id, ctx, &buf[..n]),
                Inbound::Uncompressed(ctx) => {
                    let mut encoded = Vec::with_capacity(n + 19);
                    bind::encode_uncompressed(peer, &buf[..n], &mut encoded);
                    self.send_down_ctx(&mut conn, stream_id, ctx, &encoded);
                }
                Inbound::UncompressedAndAssign(ctx, capsule) => {
                    let mut c = Vec::new();
                    bind::encode_capsule(&capsule, &mut c);
                    if let Some(entry) = conn.tunnels.get_mut(&stream_id)
                        && !entry.tunnel.push_raw_capsule(&c)
                    {
                        self.count(Counter::DropQueueFull, 1);
                    }
                    let mut encoded = Vec::with_capacity(n + 19);
                    bind::encode_uncompressed(peer, &buf[..n], &mut encoded);
                    self.send_down_ctx(&mut conn, stream_id, ctx, &encoded);
                }
                Inbound::Drop(reason) => {
                    debug!(?reason, "bound datagram dropped");
                    self.link.counters().add(Counter::BindFiltered, 1);
                }
            }
        }
        self.buf = buf;
        // Readiness is edge-triggered: what is left is read next turn.
        if !drained && !self.bind_due.contains(&watch) {
            self.bind_due.push(watch);
        }
        self.put_conn(key, conn);
    }
}

impl AsRawFd for BoundTunnel {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

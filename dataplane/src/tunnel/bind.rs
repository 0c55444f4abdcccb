//! Bound connect-udp (draft-ietf-masque-connect-udp-listen): one
//! unconnected UDP socket per tunnel on its own ephemeral port, sending to
//! any peer the client names and delivering what any (allowed, and
//! unfiltered) peer sends, with the peer's address.
//!
//! The compression contexts (COMPRESSION_ASSIGN / ACK / CLOSE, the
//! uncompressed context, proxy-allocated odd contexts for new peers) are
//! [`relay_proto::bind::ContextTable`]'s; this module moves datagrams
//! between it, the sockets (datagram endpoints of the backend, like a
//! connect-udp target's, but unconnected) and the client, and applies
//! control's peer policy to every datagram both ways (draft section 9).
//!
//! One socket per announced address family, bound to the announced address
//! itself: "When a single IP-Port tuple is provided in the
//! Proxy-Public-Address field, the proxy MUST use the same public IP and
//! Port for the lifetime of the tunnel" (section 7), which a socket bound
//! to the wildcard address cannot promise on a host with several addresses
//! (the kernel picks a source per destination). A family the proxy does not
//! announce is not served: registrations are refused, datagrams dropped.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};

use relay_channel::region::Counter;
use relay_proto::bind::{self, ContextTable, Families, Inbound, OutboundError};
use relay_proto::channel::bootstrap::InboundFilter;
use relay_proto::channel::record::IpRoute;
use relay_proto::proxy_status::ProxyError;
use tracing::debug;

use super::backpressure::ReadPause;
use super::datagrams::Datagrams;
use super::flow::Flow;
use super::head::{Head, Refusal};
use super::verdict::{hold, refuse_allowed};
use super::{Abort, Backlog, DatagramPath, State, TunnelId, Tunnels, deliver};
use crate::context::Ctx;
use crate::io::{TargetKey, UpSend};
use crate::upbatch::UpBatch;

/// A bound tunnel's socket side.
#[derive(Debug)]
pub struct BoundLeg {
    /// One endpoint per announced family: (IPv4, key).
    endpoints: Vec<(bool, TargetKey)>,
    table: ContextTable,
    /// Where peers may be (control's policy), sorted ranges.
    peers: Vec<IpRoute>,
    /// Datagrams for one peer collected this turn.
    batch: Option<(SocketAddr, UpBatch)>,
    /// Whether its sockets are being read.
    reads: ReadPause,
}

impl BoundLeg {
    fn peer_allowed(&self, peer: SocketAddr) -> bool {
        peer_in(&self.peers, peer)
    }

    /// The socket of `peer`'s family.
    fn endpoint_for(&self, peer: SocketAddr) -> Option<TargetKey> {
        self.endpoints.iter().find(|(v4, _)| *v4 == peer.is_ipv4()).map(|(_, k)| *k)
    }

    /// Whether its sockets' reads are paused.
    pub fn paused(&self) -> bool {
        self.reads.is_paused()
    }

    /// Stops reading its sockets while `backlog` is high (every peer's
    /// datagrams go to the one client); returns whether this paused them.
    pub fn pause_if_backlogged(&mut self, backlog: Backlog, ctx: &mut Ctx) -> bool {
        self.reads.pause_if_backlogged(backlog, self.endpoints.iter().map(|(_, key)| *key), ctx)
    }

    /// Reads its sockets again once `backlog` is low; returns whether they
    /// are still paused.
    pub fn resume_if_drained(&mut self, backlog: Backlog, ctx: &mut Ctx) -> bool {
        self.reads.resume_if_drained(backlog, self.endpoints.iter().map(|(_, key)| *key), ctx)
    }

    /// Queues this turn's batch.
    pub fn flush(&mut self, ctx: &mut Ctx) {
        if let Some((to, batch)) = self.batch.take() {
            match self.endpoint_for(to) {
                Some(key) => queue(key, to, batch, ctx),
                None => ctx.out.recycle(batch.into_buffer()),
            }
        }
    }

    /// Sends what is batched and closes the sockets after it.
    pub fn release(mut self, ctx: &mut Ctx) {
        self.flush(ctx);
        for (_, key) in &self.endpoints {
            ctx.close_endpoint(*key);
        }
    }

    /// Adds a datagram for `to` to this turn's batch; returns whether the
    /// batch is new.
    fn push(&mut self, to: SocketAddr, payload: &[u8], ctx: &mut Ctx) -> bool {
        let gso = relay_udp::gso_enabled();
        if self.batch.as_ref().is_some_and(|(dest, b)| *dest != to || !b.fits(payload.len(), gso)) {
            self.flush(ctx);
        }
        let new = self.batch.is_none();
        let (_, batch) = self.batch.get_or_insert_with(|| (to, UpBatch::new(ctx.out.buffer())));
        batch.push(payload);
        new
    }
}

fn queue(key: TargetKey, to: SocketAddr, batch: UpBatch, ctx: &mut Ctx) {
    if batch.is_empty() {
        return ctx.out.recycle(batch.into_buffer());
    }
    let (buf, segment_size, segments) = batch.into_parts();
    ctx.out.up.push(UpSend { key, buf, segment_size, segments, to: Some(to) });
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

/// A peer as the client sees it: plain IPv4, never v4-mapped.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
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

/// An unconnected socket of `ip`'s family on an ephemeral port, bound to
/// `ip` itself so every datagram leaves from the announced address. An
/// address that is not the host's (a 1:1 NAT's public side) cannot be
/// bound: the socket then takes the family's wildcard, and the operator's
/// NAT keeps the source stable.
fn bound_socket(ip: IpAddr) -> io::Result<UdpSocket> {
    let domain = if ip.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    if ip.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    match sock.bind(&SocketAddr::new(ip, 0).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let any: IpAddr = if ip.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            debug!(%ip, "the announced address is not the host's: binding the wildcard");
            sock.bind(&SocketAddr::new(any, 0).into())?;
        }
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// The addresses a bound tunnel announces and sends from (draft section
/// 7): the configured public addresses, or each family's primary outbound
/// address (the source the kernel picks towards a global address; nothing
/// is sent); the first of each family.
pub fn public_addresses(configured: &[IpAddr]) -> Vec<IpAddr> {
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
    let v4 = ips.iter().copied().find(IpAddr::is_ipv4);
    let v6 = ips.iter().copied().find(IpAddr::is_ipv6);
    v4.into_iter().chain(v6).collect()
}

/// Control allowed a bound tunnel: open its socket and answer with the
/// public address (draft sections 6 and 7); then the capsules and
/// datagrams that came before the allow.
pub(super) fn open(
    ts: &mut Tunnels,
    ctx: &mut Ctx,
    id: TunnelId,
    flow: Flow,
    peers: Vec<IpRoute>,
    path: &mut dyn DatagramPath,
) {
    let Some(cfg) = ctx.settings.bootstrap.bind.clone() else {
        let why = Refusal::new(501, None, "bound connect-udp is not served");
        return refuse_allowed(ts, ctx, id, flow.flow_id, why);
    };
    let limits = bind::Limits { max_contexts: cfg.max_contexts as usize, max_peers: cfg.max_peers as usize };
    let filter = match cfg.inbound_filter {
        InboundFilter::Any => bind::Filter::Any,
        InboundFilter::SentTo => bind::Filter::SentTo,
    };
    let addresses = public_addresses(&cfg.public_addresses);
    if addresses.is_empty() {
        // Draft section 7: the proxy MUST announce at least one address.
        let why = Refusal::new(
            502,
            Some(ProxyError::ProxyInternalError),
            "no public address to announce (set bind.public_addresses)",
        );
        return refuse_allowed(ts, ctx, id, flow.flow_id, why);
    }
    let mut sockets = Vec::new();
    for ip in addresses {
        match bound_socket(ip) {
            Ok(s) => sockets.push((SocketAddr::new(ip, s.local_addr().map_or(0, |a| a.port())), s)),
            Err(e) => {
                debug!(%ip, "bound socket: {e}");
                let why =
                    Refusal::new(502, Some(ProxyError::ProxyInternalError), "cannot open a bound socket");
                return refuse_allowed(ts, ctx, id, flow.flow_id, why);
            }
        }
    }
    let public: Vec<SocketAddr> = sockets.iter().map(|(a, _)| *a).collect();
    let mut table = ContextTable::new(limits, filter).with_families(Families::of(&public));
    if let Some(target) = ts.slab.get(id).and_then(|t| t.fallback) {
        table = table.with_target(target);
    }
    let endpoints =
        sockets.into_iter().map(|(a, s)| (a.is_ipv4(), ctx.open_endpoint(s, id, false))).collect();
    let Some(t) = ts.slab.get_mut(id) else { return };
    if let Some(dg) = t.dg.as_mut() {
        // Every payload waits in the codec's bound queue, not as early.
        let _ = dg.open();
    }
    let mut head = Head::tunnel_open(true);
    head.fields.push(("connect-udp-bind", "?1".into()));
    head.fields.push(("proxy-public-address", bind::proxy_public_address(&public)));
    t.head = Some(head);
    let leg = Box::new(BoundLeg { endpoints, table, peers, batch: None, reads: ReadPause::default() });
    hold(ts, id, State::Bound { leg, flow });
    ts.opened(ctx, id);
    ts.after_capsules(ctx, id, path);
}

/// Handles the tunnel's queued compression capsules and datagrams from
/// the client. Returns whether a new batch for a peer was started (the
/// caller flushes it at the end of the turn), or why the stream must be
/// aborted.
pub(super) fn from_client(
    leg: &mut BoundLeg,
    flow: &mut Flow,
    dg: &mut Datagrams,
    ctx: &mut Ctx,
) -> Result<bool, Abort> {
    let mut replies = Vec::new();
    for (capsule_type, value) in dg.take_control() {
        let capsule = match bind::decode_capsule(capsule_type, &value) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                debug!("malformed bind capsule: {e}");
                return Err(Abort::Message);
            }
        };
        let peers = &leg.peers;
        match leg.table.on_client_capsule(capsule, |peer| peer_in(peers, peer)) {
            Ok(out) => replies.extend(out),
            Err(e) => {
                debug!("bind capsule refused as malformed: {e}");
                return Err(Abort::Message);
            }
        }
    }
    // Section 9: the responses the client must get are never dropped;
    // past the bound on those waiting unsent the stream is aborted.
    let mut out = Vec::new();
    for r in &replies {
        out.clear();
        bind::encode_capsule(r, &mut out);
        if !dg.push_control(&out) {
            return Err(Abort::ExcessiveLoad);
        }
    }
    let mut batched = false;
    for (context_id, payload) in dg.take_bound() {
        match leg.table.outbound(context_id, &payload) {
            Ok((peer, udp)) => {
                if !leg.peer_allowed(peer) {
                    ctx.count(Counter::BindPeerDenied, 1);
                    continue;
                }
                flow.up(udp.len(), ctx.now);
                let udp = udp.to_vec();
                batched |= leg.push(peer, &udp, ctx);
            }
            Err(OutboundError::ContextZero) => return Err(Abort::Datagram),
            // Section 7: "the proxy will drop those datagrams".
            Err(OutboundError::FamilyNotAnnounced(_)) => ctx.count(Counter::BindPeerDenied, 1),
            Err(OutboundError::UnknownContext(_)) => ctx.count(Counter::DropUnknownContext, 1),
            Err(OutboundError::Malformed(_)) => ctx.count(Counter::DropMalformed, 1),
        }
    }
    Ok(batched)
}

/// Datagrams from a peer on a bound tunnel's socket: delivered to the
/// client with the peer's address (a compressed context, or the
/// uncompressed one and, the first time, a context assignment).
pub(super) fn from_peer(
    ts: &mut Tunnels,
    ctx: &mut Ctx,
    id: TunnelId,
    from: SocketAddr,
    payloads: &[u8],
    segment_size: usize,
    path: &mut dyn DatagramPath,
) {
    let Some(t) = ts.slab.get_mut(id) else { return };
    let stream = t.place.stream;
    let (Some(dg), State::Bound { leg, flow }) = (t.dg.as_mut(), &mut t.state) else { return };
    let peer = unmap(from);
    if !leg.peer_allowed(peer) {
        return ctx.count(Counter::BindPeerDenied, 1);
    }
    let mut encoded = std::mem::take(&mut ts.scratch);
    for payload in payloads.chunks(segment_size.max(1)) {
        match leg.table.inbound(peer) {
            Inbound::Compressed(c) => deliver(dg, flow, stream, c, payload, path, ctx),
            Inbound::Uncompressed(c) => {
                encoded.clear();
                bind::encode_uncompressed(peer, payload, &mut encoded);
                deliver(dg, flow, stream, c, &encoded, path, ctx);
            }
            Inbound::UncompressedAndAssign(c, capsule) => {
                let mut raw = Vec::new();
                bind::encode_capsule(&capsule, &mut raw);
                if !dg.push_control(&raw) {
                    // Not a response: the proxy forgets the context it could
                    // not announce (the client never hears of it).
                    leg.table.close(capsule.context_id());
                    ctx.count(Counter::DropQueueFull, 1);
                }
                encoded.clear();
                bind::encode_uncompressed(peer, payload, &mut encoded);
                deliver(dg, flow, stream, c, &encoded, path, ctx);
            }
            Inbound::Drop(reason) => {
                debug!(?reason, "bound datagram dropped");
                ctx.count(Counter::BindFiltered, 1);
            }
        }
    }
    ts.scratch = encoded;
    // Backpressure, as for connect-udp (`Tunnels::on_target`).
    if leg.pause_if_backlogged(path.backlog(), ctx) {
        ts.paused.push(id);
    }
    ts.check_budget(ctx, id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_checked_against_control_ranges_in_either_form() {
        let ranges =
            [IpRoute { start: "10.0.0.0".parse().unwrap(), end: "10.0.0.255".parse().unwrap(), protocol: 0 }];
        assert!(peer_in(&ranges, "10.0.0.7:5".parse().unwrap()));
        assert!(peer_in(&ranges, "[::ffff:10.0.0.7]:5".parse().unwrap()), "v4-mapped counts as IPv4");
        assert!(!peer_in(&ranges, "10.0.0.7:0".parse().unwrap()), "port 0 never");
        assert!(!peer_in(&ranges, "10.0.1.7:5".parse().unwrap()));
        assert_eq!(unmap("[::ffff:192.0.2.1]:9".parse().unwrap()), "192.0.2.1:9".parse().unwrap());
        assert_eq!(unmap("[2001:db8::1]:9".parse().unwrap()), "[2001:db8::1]:9".parse().unwrap());
    }

    #[test]
    fn one_announced_address_per_family_and_sockets_bound_to_it() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let listed = public_addresses(&[v4, "127.0.0.2".parse().unwrap(), "::1".parse().unwrap()]);
        assert_eq!(listed, vec![v4, "::1".parse().unwrap()], "the first of each family");
        let s = bound_socket(v4).unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), v4, "bound to the announced address, not the wildcard");
        // An address the host does not have (behind a 1:1 NAT): the wildcard.
        let s = bound_socket("192.0.2.77".parse().unwrap()).unwrap();
        assert!(s.local_addr().unwrap().ip().is_unspecified());
    }
}

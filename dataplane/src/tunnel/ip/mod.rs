//! connect-ip (RFC 9484): tunnels whose payloads are whole IP packets,
//! exchanged with the worker's TUN device ([`IpSide`]).
//!
//! * Up (client -> TUN): the packet's source must be one of the tunnel's
//!   assigned addresses and its destination and protocol inside the routes
//!   control allowed (the client's scope less the target policy). Failures
//!   are forwarding errors, not protocol errors (section 7.2): the packet
//!   is dropped, counted, and answered with an ICMP error (section 7.2.1).
//! * Down (TUN -> client): the destination names the tunnel (the address
//!   map), the source must lie in the tunnel's routes, the hop limit is
//!   decremented "right before an IP packet is transmitted in an HTTP
//!   Datagram" (section 7.2) with Time Exceeded when it runs out, and a
//!   packet larger than the tunnel can carry gets Packet Too Big so inner
//!   TCP never stalls silently.
//! * Address and route capsules (section 4.7): ADDRESS_ASSIGN (request ID 0)
//!   and ROUTE_ADVERTISEMENT follow the 2xx; ADDRESS_REQUESTs are planned
//!   by [`IpTunnel::plan_requests`] (a specific address is asked of
//!   control); the client's own ADDRESS_ASSIGN and ROUTE_ADVERTISEMENT are
//!   validated and ignored.
//! * The tunnel link (section 7.2): the relay's end is
//!   [`echo::TUNNEL_LINK_LOCAL`]; link-local traffic is never forwarded
//!   beyond it. Echo Requests to it (or to ff02::1) are answered, and a
//!   tunnel carrying IPv6 in QUIC datagrams is probed with 1280-byte Echo
//!   Requests from it ([`probe`]) and torn down if no full reply comes.

pub mod config;
pub mod probe;
pub mod side;

pub use config::IpTunnel;
pub use side::IpSide;

use std::net::IpAddr;
use std::time::Duration;

use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::MtuProbe as ProbeMode;
use relay_proto::channel::record::{AddressAnswer, AddressAsk, IpAssignment, IpRoute};
use relay_proto::ip::capsule::{self as ipcap, IpCapsule};
use relay_proto::ip::echo::{self, EchoKind, IPV6_MIN_MTU, TUNNEL_LINK_LOCAL};
use relay_proto::ip::packet::{self, HopOutcome, IcmpError};
use relay_proto::proxy_status::ProxyError;
use tracing::debug;

use self::probe::{MtuProbe, ProbeTick};
use super::datagrams::{Datagrams, DownPath};
use super::flow::Flow;
use super::head::{Head, Refusal};
use super::verdict::{hold, refuse_allowed};
use super::{Abort, DatagramPath, State, TunnelId, Tunnels};
use crate::context::Ctx;
use crate::timers::TimerTarget;

/// Control allowed a connect-ip tunnel: its addresses join the worker's
/// address map, the 2xx and the address and route capsules go out, and
/// the packets and address requests the client sent early are handled.
#[allow(clippy::too_many_arguments)]
pub(super) fn open(
    ts: &mut Tunnels,
    ctx: &mut Ctx,
    id: TunnelId,
    flow: Flow,
    addresses: &[IpAssignment],
    routes: &[IpRoute],
    path: &mut dyn DatagramPath,
) {
    let config = IpTunnel::from_allow(addresses, routes);
    let (Some(mut config), true) = (config, ts.ip.is_some()) else {
        let why = Refusal::new(
            503,
            Some(ProxyError::ProxyInternalError),
            "connect-ip is not available on this worker",
        );
        return refuse_allowed(ts, ctx, id, flow.flow_id, why);
    };
    // RFC 9484 section 7.2: an IPv6 tunnel must carry 1280-byte packets;
    // if the path's datagrams cannot, the request fails.
    let v6 = config.addresses.iter().any(|p| p.addr.is_ipv6());
    if v6 && path.room().is_some_and(|r| r < 1280) {
        debug!(flow = flow.flow_id, room = ?path.room(), "QUIC path too small for IPv6's minimum MTU");
        let why = Refusal::new(
            502,
            Some(ProxyError::ProxyInternalError),
            "the QUIC path cannot carry 1280-byte IPv6 packets",
        );
        return refuse_allowed(ts, ctx, id, flow.flow_id, why);
    }
    if let Some(side) = ts.ip.as_mut() {
        side.register(id, &mut config);
    }
    if let Some(ip) = ctx.settings.bootstrap.connect_ip.as_ref()
        && v6
        && ip.mtu_probe == ProbeMode::Echo
    {
        let timeout = Duration::from_millis(u64::from(ip.mtu_probe_timeout_ms));
        config.probe = MtuProbe::start(ctx.now, flow.flow_id as u16, timeout);
    }
    let Some(t) = ts.slab.get_mut(id) else { return };
    let Some(dg) = t.dg.as_mut() else { return };
    let early = dg.open();
    // An empty stream output always has room for these.
    let _ = dg.push_control(&config.opening_capsules());
    t.head = Some(Head::tunnel_open(true));
    hold(ts, id, State::Ip { leg: config, flow });
    ts.opened(ctx, id);
    for packet in early {
        ts.forward_up(ctx, id, &packet, path);
    }
    // Address requests that came before the allow.
    ts.after_capsules(ctx, id, path);
    probe_tick(ts, ctx, id, path);
}

/// Runs tunnel `id`'s IPv6 link check at `ctx.now` (RFC 9484 section
/// 7.2): the next probe goes out, or the tunnel that never answered is
/// torn down. A tunnel whose packets travel as DATAGRAM capsules needs no
/// check (a stream carries any size); one whose QUIC datagrams cannot hold
/// 1280 bytes is aborted ("it MUST abort the IP proxying request stream").
pub(super) fn probe_tick(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, path: &mut dyn DatagramPath) {
    let flow = ts.flow_id(id);
    let Some(t) = ts.slab.get_mut(id) else { return };
    let stream = t.place.stream;
    let (State::Ip { leg, .. }, Some(dg)) = (&mut t.state, t.dg.as_ref()) else { return };
    let failed = match leg.probe.tick(ctx.now) {
        ProbeTick::Wait => false,
        ProbeTick::Failed => {
            debug!(flow, "no reply to the IPv6 link MTU probes");
            true
        }
        ProbeTick::Send { identifier, sequence } => match dg.down_path(path.support()) {
            DownPath::Capsule => {
                leg.probe.not_needed();
                false
            }
            DownPath::Wait => {
                leg.probe.postpone(ctx.now);
                false
            }
            DownPath::QuicDatagram if path.room().is_some_and(|r| r < IPV6_MIN_MTU) => {
                debug!(flow, room = ?path.room(), "QUIC datagrams too small for IPv6's minimum MTU");
                true
            }
            DownPath::QuicDatagram => {
                let Some(to) = leg.ipv6_address() else {
                    leg.probe.not_needed();
                    return;
                };
                let probe = echo::probe(TUNNEL_LINK_LOCAL, to, identifier, sequence);
                // A probe the connection's queue refused is a probe lost
                // on the link: the next one follows.
                let _ = path.send(stream, 0, &probe);
                leg.probe.sent(ctx.now);
                ctx.count(Counter::IpMtuProbesSent, 1);
                false
            }
        },
    };
    if failed {
        ctx.count(Counter::IpMtuProbeFailures, 1);
        return ts.abort(ctx, id, Abort::Cancelled);
    }
    if let Some(at) = leg.probe.due() {
        ctx.timers.push(at, TimerTarget::Tunnel(id));
    }
}

/// Whether a packet to `dst` stays on the tunnel link, never forwarded
/// beyond it (RFC 9484 section 7.2): IPv6 unicast link-local (fe80::/10)
/// and multicast of interface-local or link-local scope (RFC 4291 section
/// 2.7), IPv4 link-local (169.254.0.0/16, RFC 3927) and the local network
/// control block (224.0.0.0/24, RFC 5771).
pub fn stays_on_link(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V6(a) => {
            a.is_unicast_link_local() || (a.is_multicast() && matches!(a.segments()[0] & 0xf, 1 | 2))
        }
        IpAddr::V4(a) => a.is_link_local() || a.octets()[..3] == [224, 0, 0],
    }
}

/// A client's packet for the tunnel link itself: an Echo Request to the
/// relay's end (or to all nodes) gets its Echo Reply (returned, for the
/// tunnel), a full reply to one of the link check's probes confirms the
/// link; anything else is dropped.
fn on_link(t: &mut IpTunnel, packet: &[u8], ctx: &Ctx) -> Option<Vec<u8>> {
    let for_us = |e: &echo::Echo| e.dst == TUNNEL_LINK_LOCAL || e.dst == echo::ALL_NODES;
    match echo::parse(packet).filter(for_us) {
        Some(e) if e.kind == EchoKind::Request => {
            // RFC 4443 section 4.2: from a unicast address of the
            // interface, also when the request went to a multicast group.
            let reply = echo::reply(packet, TUNNEL_LINK_LOCAL);
            if reply.is_some() {
                ctx.count(Counter::IpEchoReplies, 1);
            }
            reply
        }
        Some(e) if e.dst == TUNNEL_LINK_LOCAL && echo::is_full_probe_reply(packet, &e) => {
            if t.probe.on_reply(e.identifier, e.sequence) {
                debug!(tunnel = ?t.owner, "the tunnel link carries 1280-byte packets");
                ctx.count(Counter::IpMtuProbesConfirmed, 1);
            }
            None
        }
        _ => {
            ctx.count(Counter::DropIpOutOfScope, 1);
            None
        }
    }
}

/// A client's packet (context 0) on an open tunnel: checked and written to
/// the TUN device, or refused with the ICMP error to send back inside the
/// tunnel (RFC 9484 section 7.2); a packet for the tunnel link is handled
/// here and may get an Echo Reply. Returns the packet for the client.
pub(super) fn up(
    t: &mut IpTunnel,
    packet: &[u8],
    side: Option<&mut IpSide>,
    ctx: &mut Ctx,
) -> Option<Vec<u8>> {
    let Some(side) = side else {
        ctx.count(Counter::DropTargetSend, 1);
        return None;
    };
    let Ok(info) = packet::parse(packet) else {
        ctx.count(Counter::DropMalformed, 1);
        return None;
    };
    if stays_on_link(info.dst) {
        return on_link(t, packet, ctx);
    }
    let refusal = if !t.source_allowed(info.src) {
        ctx.count(Counter::DropIpBadSource, 1);
        Some(IcmpError::SourcePolicy)
    } else if !t.routed(info.dst, info.protocol) {
        ctx.count(Counter::DropIpOutOfScope, 1);
        Some(IcmpError::AdminProhibited)
    } else {
        None
    };
    let Some(kind) = refusal else {
        side.write(packet, ctx);
        return None;
    };
    if !side.icmp_allowed(ctx.now) {
        return None;
    }
    let error = side.own_address(info.src.is_ipv4()).and_then(|from| packet::icmp_error(packet, from, kind));
    if error.is_some() {
        ctx.count(Counter::IcmpErrorsSent, 1);
    }
    error
}

/// Handles a connect-ip tunnel's kept capsules: ADDRESS_REQUESTs are
/// answered (RFC 9484 section 4.7.2; specific addresses are asked of
/// control), the client's own assignments and routes are validated and
/// unused. A malformed capsule aborts the stream (RFC 9297 section 3.3).
pub(super) fn capsules(
    t: &mut IpTunnel,
    flow: &Flow,
    dg: &mut Datagrams,
    ctx: &mut Ctx,
) -> Result<(), Abort> {
    for (capsule_type, value) in dg.take_control() {
        match ipcap::decode(capsule_type, &value) {
            Ok(Some(IpCapsule::AddressRequest(requests))) => {
                let (now, asks) = t.plan_requests(&requests);
                let mut capsules = vec![now];
                for (request_id, addr) in asks {
                    let ask = AddressAsk { flow_id: flow.flow_id, request_id, addr };
                    if ctx.link.address_ask(ask).is_err() {
                        capsules.push(t.on_address_answer(request_id, addr, false));
                    }
                }
                for capsule in capsules.iter().filter(|c| !c.is_empty()) {
                    // RFC 9484 section 4.7.2: every request gets an answer;
                    // a client that lets too many wait unread is cut off.
                    if !dg.push_control(capsule) {
                        return Err(Abort::ExcessiveLoad);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                debug!("malformed connect-ip capsule: {e}");
                return Err(Abort::Message);
            }
        }
    }
    Ok(())
}

/// Control's answer to one of the tunnel's address asks: the new
/// assignment (or the refusal) goes out on the stream. An error when it
/// cannot be queued (too many answers unread: the stream is aborted).
pub(super) fn address_answer(
    t: &mut IpTunnel,
    dg: &mut Datagrams,
    a: &AddressAnswer,
    side: Option<&mut IpSide>,
) -> Result<(), Abort> {
    let capsule = t.on_address_answer(a.request_id, a.addr, a.granted);
    if t.source_allowed(a.addr)
        && let Some(side) = side
    {
        side.register_address(t, a.addr);
    }
    if !capsule.is_empty() && !dg.push_control(&capsule) {
        return Err(Abort::ExcessiveLoad);
    }
    Ok(())
}

/// Refuses the address requests the tunnel still waits on control for
/// (control was replaced and will never answer them). Returns whether
/// there were any, or an error when the refusals cannot be queued.
pub(super) fn refuse_pending(t: &mut IpTunnel, dg: &mut Datagrams) -> Result<bool, Abort> {
    let Some(capsule) = t.refuse_pending() else { return Ok(false) };
    if !dg.push_control(&capsule) {
        return Err(Abort::ExcessiveLoad);
    }
    Ok(true)
}

/// Prepares a packet from the device for a tunnel: the hop limit is
/// decremented (Time Exceeded back through the device when it runs out),
/// and a packet over `room` bytes gets Packet Too Big (RFC 9484 section
/// 7.2.1: not a silent drop). Returns whether the packet goes on.
pub(super) fn prepare_down(packet: &mut [u8], room: Option<usize>, side: &mut IpSide, ctx: &mut Ctx) -> bool {
    match packet::decrement_hop_limit(packet) {
        Ok(HopOutcome::Forward) => {}
        Ok(HopOutcome::Expired) => {
            icmp_into_tun(side, ctx, packet, IcmpError::TimeExceeded);
            return false;
        }
        Err(_) => {
            ctx.count(Counter::DropMalformed, 1);
            return false;
        }
    }
    if let Some(room) = room
        && packet.len() > room
    {
        icmp_into_tun(side, ctx, packet, IcmpError::PacketTooBig { mtu: room as u32 });
        ctx.count(Counter::DropTooLarge, 1);
        return false;
    }
    true
}

/// Sends an ICMP error about `original` back to its sender through the
/// kernel.
fn icmp_into_tun(side: &mut IpSide, ctx: &mut Ctx, original: &[u8], kind: IcmpError) {
    if !side.icmp_allowed(ctx.now) {
        return;
    }
    let own = side.own_address(original.first().is_some_and(|b| b >> 4 == 4));
    let Some(icmp) = own.and_then(|from| packet::icmp_error(original, from, kind)) else { return };
    if side.write(&icmp, ctx) {
        ctx.count(Counter::IcmpErrorsSent, 1);
    }
}

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

pub mod config;
pub mod side;

pub use config::IpTunnel;
pub use side::IpSide;

use relay_channel::region::Counter;
use relay_proto::channel::record::{AddressAnswer, AddressAsk, IpAssignment, IpRoute};
use relay_proto::ip::capsule::{self as ipcap, IpCapsule};
use relay_proto::ip::packet::{self, HopOutcome, IcmpError};
use relay_proto::proxy_status::ProxyError;
use tracing::debug;

use super::datagrams::Datagrams;
use super::flow::Flow;
use super::head::{Head, Refusal};
use super::verdict::{hold, refuse_allowed};
use super::{Abort, DatagramPath, State, TunnelId, Tunnels};
use crate::context::Ctx;

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
        debug!(tunnel = id, room = ?path.room(), "QUIC path too small for IPv6's minimum MTU");
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
}

/// A client's packet (context 0) on an open tunnel: checked and written to
/// the TUN device, or refused with the ICMP error to send back inside the
/// tunnel (RFC 9484 section 7.2).
pub(super) fn up(t: &IpTunnel, packet: &[u8], side: Option<&mut IpSide>, ctx: &mut Ctx) -> Option<Vec<u8>> {
    let Some(side) = side else {
        ctx.count(Counter::DropTargetSend, 1);
        return None;
    };
    let Ok(info) = packet::parse(packet) else {
        ctx.count(Counter::DropMalformed, 1);
        return None;
    };
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
    side.own_address(info.src.is_ipv4()).and_then(|from| packet::icmp_error(packet, from, kind))
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

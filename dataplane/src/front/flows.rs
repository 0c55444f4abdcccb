//! An exchange's dealings with control and its targets, the same for
//! HTTP/1.1 and HTTP/2: asking for a tunnel, applying the verdict (a TCP
//! connect, a UDP socket, or a refusal), forwarding UDP payloads, and
//! releasing everything when the exchange ends.

use std::net::SocketAddr;
use std::time::Duration;

use relay_channel::region::Counter;
use relay_proto::channel::record::{
    AddressAnswer, AddressAsk, FlowClosed, FlowOpen, TunnelProtocol, Verdict,
};
use relay_proto::proxy_status::ProxyError;
use tracing::debug;

use super::exchange::{Exchange, Flow, Head, Route, State, TunnelKind, refusal_head};
use super::{Ctx, Owner, Shared};
use crate::io::UpSend;
use crate::slab::Key as ConnKey;
use crate::tcp_target::{TargetState, TcpTarget, connect_failure};

use crate::tunnel::{Tunnel, UpOutcome};
use crate::upbatch::UpBatch;

/// Who an exchange belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    /// The connection.
    pub conn: ConnKey,
    /// The stream (HTTP/2) or request number (HTTP/1.1).
    pub stream: u32,
    /// The client's address.
    pub peer: SocketAddr,
}

/// The answer to a refused request.
pub fn refused(sh: &Shared, status: u16, proxy_error: Option<ProxyError>, details: &str) -> Exchange {
    refused_with(sh, status, proxy_error, details, None)
}

fn refused_with(
    sh: &Shared,
    status: u16,
    proxy_error: Option<ProxyError>,
    details: &str,
    retry_after: Option<u32>,
) -> Exchange {
    let s = &sh.settings;
    Exchange::answer(
        refusal_head(status, proxy_error, details, &s.proxy_name, &s.realm, retry_after),
        Vec::new(),
    )
}

/// How the client reached us, for the status endpoint: the HTTP version's
/// label and whether TLS carries it.
#[derive(Debug, Clone, Copy)]
pub struct Via {
    /// "HTTP/1.1" or "HTTP/2".
    pub protocol: &'static str,
    /// Over TLS.
    pub secure: bool,
}

/// Starts the exchange for a routed request; `authority` is the request's,
/// for the ask.
pub fn start(
    route: Route,
    authority: &str,
    place: Place,
    via: Via,
    sh: &mut Shared,
    ctx: &mut Ctx<'_>,
) -> Exchange {
    let (kind, host, port, authorization, path) = match route {
        Route::Refuse(r) => {
            debug!(status = r.status, reason = r.reason, "TCP front request refused");
            ctx.link.counters().add(Counter::TunnelsRefused, 1);
            return refused(sh, r.status, r.proxy_error, r.reason);
        }
        Route::Status { head_only } => {
            let body = super::h1::status_body(&sh.settings.proxy_name, via.protocol, via.secure, sh);
            let fields = vec![
                ("content-type", "application/json".to_string()),
                ("cache-control", "no-store".to_string()),
            ];
            let len = body.len();
            let (body, head_only_len) = if head_only { (Vec::new(), Some(len)) } else { (body, None) };
            return Exchange::answer(Head { status: 200, fields, tunnel: false, head_only_len }, body);
        }
        Route::Tcp { host, port, authorization } => {
            (TunnelKind::Tcp, host, port, authorization, String::new())
        }
        Route::Udp { host, port, authorization, path } => (TunnelKind::Udp, host, port, authorization, path),
        Route::Ip { target, ipproto, authorization, path } => {
            (TunnelKind::Ip, target, ipproto, authorization, path)
        }
    };
    if ctx.draining {
        ctx.link.counters().add(Counter::TunnelsRefused, 1);
        return refused(sh, 503, Some(ProxyError::ProxyInternalError), "relay draining");
    }
    let protocol = match kind {
        TunnelKind::Tcp => TunnelProtocol::ConnectTcp,
        TunnelKind::Udp => TunnelProtocol::ConnectUdp,
        TunnelKind::Ip => TunnelProtocol::ConnectIp,
    };
    let asked = ctx.link.ask(crate::link::AuthRequest {
        client: place.peer,
        authority: authority.to_string(),
        path,
        target_host: host,
        target_port: port,
        authorization,
        protocol,
    });
    let ask_id = match asked {
        Ok(id) => id,
        Err(e) => {
            let (status, proxy_error, reason) = e.refusal();
            if e.is_control_failure() {
                ctx.link.counters().add(Counter::AsksFailed, 1);
            }
            ctx.link.counters().add(Counter::TunnelsRefused, 1);
            return refused(sh, status, proxy_error, reason);
        }
    };
    let s = &sh.settings;
    let deadline = ctx.now + s.ask_timeout;
    let tunnel = match kind {
        TunnelKind::Tcp => None,
        TunnelKind::Udp => {
            Some(Tunnel::pending(u64::from(place.stream), ask_id, ctx.now, s.ask_timeout, s.limits))
        }
        TunnelKind::Ip => {
            Some(Tunnel::pending_ip(u64::from(place.stream), ask_id, ctx.now, s.ask_timeout, s.limits))
        }
    };
    sh.asks.insert(ask_id, (place.conn, place.stream));
    Exchange::asking(ask_id, kind, deadline, tunnel, s.tcp.tunnel_buffer_bytes as usize)
}

/// Applies control's verdict to an exchange that asked.
pub fn apply_verdict(ex: &mut Exchange, verdict: Verdict, place: Place, sh: &mut Shared, ctx: &mut Ctx<'_>) {
    let State::Asking { kind, .. } = &ex.state else {
        if let Some(flow_id) = super::allowed_flow(&verdict) {
            ctx.link.flow_closed(FlowClosed::unused(flow_id));
        }
        return;
    };
    let kind = *kind;
    match (verdict, kind) {
        (Verdict::Deny { status, proxy_error, details, retry_after_secs }, _) => {
            ctx.link.counters().add(Counter::TunnelsRefused, 1);
            let retry = (retry_after_secs > 0).then_some(retry_after_secs);
            let up_fin = ex.up_fin;
            *ex = refused_with(sh, status, proxy_error, &details, retry);
            ex.up_fin = up_fin;
        }
        (Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity }, TunnelKind::Tcp) => {
            let flow = Flow {
                flow_id,
                identity,
                byte_budget,
                idle_timeout: Duration::from_millis(u64::from(idle_timeout_ms)),
                target,
            };
            let limit = sh.settings.tcp.tunnel_buffer_bytes as usize;
            match TcpTarget::connect(target, limit) {
                Ok(t) => {
                    let watch = sh.watch(ctx.out, t.fd(), Owner::Target(place.conn, place.stream));
                    let deadline =
                        ctx.now + Duration::from_millis(u64::from(sh.settings.tcp.handshake_timeout_ms));
                    ex.state = State::Connecting { target: t, watch, flow, deadline };
                }
                Err(e) => {
                    debug!("TCP target socket: {e}");
                    ctx.link.counters().add(Counter::TcpConnectFailures, 1);
                    let (status, error, reason) = connect_failure(e.raw_os_error().unwrap_or(0));
                    refuse_allowed(ex, flow_id, (status, Some(error), reason), sh, ctx);
                }
            }
        }
        (Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity }, TunnelKind::Udp) => {
            let sock = match crate::socket::connected_target(target) {
                Ok(s) => s,
                Err(e) => {
                    debug!("target socket: {e}");
                    let why =
                        (502, Some(ProxyError::DestinationUnavailable), "cannot open a socket to the target");
                    return refuse_allowed(ex, flow_id, why, sh, ctx);
                }
            };
            let State::Asking { tunnel: Some(mut tunnel), .. } =
                std::mem::replace(&mut ex.state, State::Done)
            else {
                return;
            };
            let key = *ctx.next_target;
            *ctx.next_target += 1;
            ctx.out.opens.push((key, sock));
            sh.udp_targets.insert(key, (place.conn, place.stream));
            let idle = Duration::from_millis(u64::from(idle_timeout_ms));
            let early = tunnel.open(flow_id, target, idle, byte_budget, ctx.now);
            let flow = Flow { flow_id, identity, byte_budget, idle_timeout: idle, target };
            ex.state = State::Udp { tunnel, key, flow, batch: None };
            ex.head = Some(tunnel_head(true));
            opened(sh, ctx);
            for payload in early {
                forward_udp(ex, place, &payload, sh, ctx);
            }
        }
        (
            Verdict::AllowIp { flow_id, idle_timeout_ms, byte_budget, identity, addresses, routes },
            TunnelKind::Ip,
        ) => {
            let config = crate::worker::IpTunnel::from_allow(&addresses, &routes);
            let (Some(mut config), Some(ip)) = (config, ctx.ip.as_deref_mut()) else {
                let why =
                    (503, Some(ProxyError::ProxyInternalError), "connect-ip is not available on this worker");
                return refuse_allowed(ex, flow_id, why, sh, ctx);
            };
            let State::Asking { tunnel: Some(mut tunnel), .. } =
                std::mem::replace(&mut ex.state, State::Done)
            else {
                return;
            };
            ip.register((place.conn | crate::worker::ip::FRONT_OWNER, u64::from(place.stream)), &mut config);
            let idle = Duration::from_millis(u64::from(idle_timeout_ms));
            let unspecified = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0);
            let early = tunnel.open(flow_id, unspecified, idle, byte_budget, ctx.now);
            if !tunnel.push_raw_capsule(&config.opening_capsules()) {
                ctx.link.counters().add(Counter::DropQueueFull, 1);
            }
            let flow = Flow { flow_id, identity, byte_budget, idle_timeout: idle, target: unspecified };
            ex.state = State::Ip { tunnel, ip: config, flow };
            ex.head = Some(tunnel_head(true));
            opened(sh, ctx);
            for packet in early {
                ip_up(ex, &packet, ctx);
            }
            // Address requests that came before the allow.
            if let Err(why) = ip_capsules(ex, ctx) {
                ex.abort.get_or_insert(why);
            }
        }
        (verdict, _) => {
            // An allow of another kind than asked: control and dataplane
            // disagree.
            if let Some(flow_id) = super::allowed_flow(&verdict) {
                ctx.link.flow_closed(FlowClosed::unused(flow_id));
            }
            let head = refused(sh, 501, None, "this tunnel kind is not served over HTTP/2 or HTTP/1.1");
            ex.refuse(head.head.expect("refusals have a head"));
        }
    }
}

/// Refuses a request control allowed but the worker cannot serve: the
/// flow goes back to control unused, the client gets `why` (status,
/// Proxy-Status error, details).
fn refuse_allowed(
    ex: &mut Exchange,
    flow_id: u64,
    why: (u16, Option<ProxyError>, &str),
    sh: &mut Shared,
    ctx: &mut Ctx<'_>,
) {
    ctx.link.flow_closed(FlowClosed::unused(flow_id));
    let (status, proxy_error, details) = why;
    ex.refuse(refused(sh, status, proxy_error, details).head.expect("refusals have a head"));
}

/// The 2xx that opens a tunnel: capsule tunnels carry
/// `capsule-protocol: ?1` (RFC 9297 section 3.4, RFC 9298 section 3.5).
pub fn tunnel_head(capsules: bool) -> Head {
    let fields = if capsules { vec![("capsule-protocol", "?1".to_string())] } else { Vec::new() };
    Head { status: 200, fields, tunnel: true, head_only_len: None }
}

fn opened(sh: &mut Shared, ctx: &mut Ctx<'_>) {
    sh.tunnels_open += 1;
    ctx.link.counters().add(Counter::TunnelsOpened, 1);
    ctx.link.counters().add(Counter::TunnelsActive, 1);
}

/// A TCP target became ready: a connect completes (the 2xx goes out, the
/// held bytes follow) or fails (502/504 with Proxy-Status).
pub fn target_ready(ex: &mut Exchange, ready: crate::io::Ready, sh: &mut Shared, ctx: &mut Ctx<'_>) {
    match &mut ex.state {
        State::Tcp { target, .. } => target.on_ready(ready),
        State::Connecting { target, .. } => {
            target.on_ready(ready);
            match target.state() {
                TargetState::Connecting => {}
                TargetState::Connected => {
                    let State::Connecting { mut target, watch, flow, .. } =
                        std::mem::replace(&mut ex.state, State::Done)
                    else {
                        return;
                    };
                    let early = ex.take_early();
                    target.push(&early);
                    if ex.up_fin {
                        target.finish();
                    }
                    target.flush();
                    ex.state = State::Tcp { target, watch, flow, last_activity: ctx.now };
                    ex.head = Some(tunnel_head(false));
                    opened(sh, ctx);
                }
                TargetState::Failed(errno) => connect_failed(ex, errno, sh, ctx),
            }
        }
        _ => {}
    }
}

/// A TCP connect failed or timed out: the flow is released unused and the
/// request refused.
pub fn connect_failed(ex: &mut Exchange, errno: i32, sh: &mut Shared, ctx: &mut Ctx<'_>) {
    let State::Connecting { target, watch, flow, .. } = std::mem::replace(&mut ex.state, State::Done) else {
        return;
    };
    debug!(errno, "TCP target connect failed");
    sh.unwatch(ctx.out, watch, target.into_stream());
    ctx.link.flow_closed(FlowClosed::unused(flow.flow_id));
    ctx.link.counters().add(Counter::TcpConnectFailures, 1);
    ctx.link.counters().add(Counter::TunnelsRefused, 1);
    let (status, error, reason) = connect_failure(errno);
    let head = refused(sh, status, Some(error), reason);
    ex.refuse(head.head.expect("refusals have a head"));
}

/// Client bytes for a capsule tunnel: DATAGRAM capsules become payloads
/// for the target. Returns an error when the capsule stream is malformed
/// (RFC 9297 section 3.3) or a payload is too large (RFC 9298 section 5):
/// the stream is aborted.
pub fn up_capsules(
    ex: &mut Exchange,
    data: &[u8],
    place: Place,
    sh: &mut Shared,
    ctx: &mut Ctx<'_>,
) -> Result<(), &'static str> {
    let tunnel = match &mut ex.state {
        State::Udp { tunnel, .. } | State::Ip { tunnel, .. } | State::Asking { tunnel: Some(tunnel), .. } => {
            tunnel
        }
        _ => return Ok(()),
    };
    let mut payloads: Vec<(UpOutcome, Vec<u8>)> = Vec::new();
    let result =
        tunnel.on_stream_bytes(data, ctx.now, |outcome, payload| payloads.push((outcome, payload.to_vec())));
    let mut too_large = false;
    for (outcome, payload) in payloads {
        match outcome {
            UpOutcome::Forward if matches!(ex.state, State::Ip { .. }) => ip_up(ex, &payload, ctx),
            UpOutcome::Forward => forward_udp(ex, place, &payload, sh, ctx),
            UpOutcome::Buffered => {}
            UpOutcome::DroppedQueueFull => ctx.link.counters().add(Counter::DropQueueFull, 1),
            UpOutcome::DroppedUnknownContext => ctx.link.counters().add(Counter::DropUnknownContext, 1),
            UpOutcome::AbortTooLarge => {
                ctx.link.counters().add(Counter::DropTooLarge, 1);
                too_large = true;
            }
        }
    }
    if too_large {
        return Err("UDP payload over 65527 bytes");
    }
    result.map_err(|_| "malformed capsule")?;
    ip_capsules(ex, ctx)
}

/// A client's IP packet: checked and written to the TUN device, or
/// answered with the ICMP error inside the tunnel (RFC 9484 section 7.2).
fn ip_up(ex: &mut Exchange, packet: &[u8], ctx: &mut Ctx<'_>) {
    let State::Ip { tunnel, ip, .. } = &mut ex.state else { return };
    tunnel.totals.packets_up += 1;
    tunnel.totals.bytes_up += packet.len() as u64;
    let Some(side) = ctx.ip.as_deref_mut() else { return };
    if let crate::worker::ip::UpResult::Icmp(icmp) = side.up(ctx.link.counters(), ip, packet) {
        if tunnel.push_capsule(&icmp) {
            ctx.link.counters().add(Counter::IcmpErrorsSent, 1);
        } else {
            ctx.link.counters().add(Counter::DropQueueFull, 1);
        }
    }
}

/// Answers a connect-ip tunnel's address requests (RFC 9484 section
/// 4.7.2; requests for specific addresses are asked of control, as on
/// HTTP/3); the client's own assignments and routes are validated and
/// unused. A malformed capsule aborts the stream.
fn ip_capsules(ex: &mut Exchange, ctx: &mut Ctx<'_>) -> Result<(), &'static str> {
    let State::Ip { tunnel, ip, flow } = &mut ex.state else { return Ok(()) };
    for (capsule_type, value) in tunnel.take_control() {
        match relay_proto::ip::capsule::decode(capsule_type, &value) {
            Ok(Some(relay_proto::ip::capsule::IpCapsule::AddressRequest(requests))) => {
                let (now, asks) = ip.plan_requests(&requests);
                let mut capsules = vec![now];
                for (request_id, addr) in asks {
                    let ask = AddressAsk { flow_id: flow.flow_id, request_id, addr };
                    if ctx.link.address_ask(ask).is_err() {
                        capsules.push(ip.on_address_answer(request_id, addr, false));
                    }
                }
                for capsule in capsules.iter().filter(|c| !c.is_empty()) {
                    if !tunnel.push_raw_capsule(capsule) {
                        ctx.link.counters().add(Counter::DropQueueFull, 1);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return Err("malformed connect-ip capsule"),
        }
    }
    Ok(())
}

/// Control's answer to one of this connect-ip tunnel's address asks: the
/// new assignment goes out on the stream. Returns whether the exchange
/// holds the flow.
pub fn address_answer(ex: &mut Exchange, a: &AddressAnswer, ctx: &mut Ctx<'_>) -> bool {
    let State::Ip { tunnel, ip, flow } = &mut ex.state else { return false };
    if flow.flow_id != a.flow_id {
        return false;
    }
    let capsule = ip.on_address_answer(a.request_id, a.addr, a.granted);
    if ip.source_allowed(a.addr)
        && let Some(side) = ctx.ip.as_deref_mut()
    {
        side.register_address(ip, a.addr);
    }
    if !capsule.is_empty() && !tunnel.push_raw_capsule(&capsule) {
        ctx.link.counters().add(Counter::DropQueueFull, 1);
    }
    true
}

/// Refuses the address requests this connect-ip tunnel still waits on
/// control for (control was replaced and will never answer them).
pub fn refuse_pending_addresses(ex: &mut Exchange, ctx: &mut Ctx<'_>) {
    let State::Ip { tunnel, ip, .. } = &mut ex.state else { return };
    if let Some(capsule) = ip.refuse_pending()
        && !tunnel.push_raw_capsule(&capsule)
    {
        ctx.link.counters().add(Counter::DropQueueFull, 1);
    }
}

/// A packet from the TUN device for a connect-ip tunnel (already checked
/// against its routes): a DATAGRAM capsule, dropped when the stream's
/// output is full.
pub fn down_ip(ex: &mut Exchange, packet: &[u8], ctx: &mut Ctx<'_>) {
    let State::Ip { tunnel, .. } = &mut ex.state else { return };
    if tunnel.push_capsule(packet) {
        tunnel.on_down(packet.len(), ctx.now);
        ctx.link.counters().add(Counter::DatagramsDown, 1);
        ctx.link.counters().add(Counter::BytesDown, packet.len() as u64);
    } else {
        ctx.link.counters().add(Counter::DropQueueFull, 1);
    }
}

/// Queues one payload for the UDP target in this turn's batch.
fn forward_udp(ex: &mut Exchange, place: Place, payload: &[u8], sh: &mut Shared, ctx: &mut Ctx<'_>) {
    let State::Udp { tunnel, key, batch, .. } = &mut ex.state else { return };
    tunnel.totals.packets_up += 1;
    tunnel.totals.bytes_up += payload.len() as u64;
    let gso = relay_udp::gso_enabled();
    if batch.as_ref().is_some_and(|b| !b.fits(payload.len(), gso)) {
        let full = batch.take().expect("checked");
        queue_batch(*key, full, ctx);
    }
    let b = match batch {
        Some(b) => b,
        None => {
            sh.dirty_up.push((place.conn, place.stream));
            batch.insert(UpBatch::new(ctx.out.buffer()))
        }
    };
    b.push(payload);
}

fn queue_batch(key: crate::io::TargetKey, batch: UpBatch, ctx: &mut Ctx<'_>) {
    if batch.is_empty() {
        return ctx.out.recycle(batch.into_buffer());
    }
    let (buf, segment_size, segments) = batch.into_parts();
    ctx.out.up.push(UpSend { key, buf, segment_size, segments });
}

/// Sends this turn's batch of a UDP tunnel.
pub fn flush_udp(ex: &mut Exchange, ctx: &mut Ctx<'_>) {
    if let State::Udp { key, batch, .. } = &mut ex.state
        && let Some(b) = batch.take()
    {
        queue_batch(*key, b, ctx);
    }
}

/// Payloads from the UDP target: DATAGRAM capsules for the client, dropped
/// (counted) when the stream's bounded output is full.
pub fn down_udp(ex: &mut Exchange, payloads: &[u8], segment_size: usize, ctx: &mut Ctx<'_>) {
    let State::Udp { tunnel, .. } = &mut ex.state else { return };
    for payload in payloads.chunks(segment_size.max(1)) {
        if tunnel.push_capsule(payload) {
            tunnel.on_down(payload.len(), ctx.now);
            ctx.link.counters().add(Counter::DatagramsDown, 1);
            ctx.link.counters().add(Counter::BytesDown, payload.len() as u64);
        } else {
            ctx.link.counters().add(Counter::DropQueueFull, 1);
        }
    }
}

/// Releases what an exchange holds: its ask, its target, its flow.
pub fn release(ex: &mut Exchange, sh: &mut Shared, ctx: &mut Ctx<'_>) {
    match std::mem::replace(&mut ex.state, State::Done) {
        State::Asking { ask_id, .. } => {
            sh.asks.remove(&ask_id);
            ctx.link.cancel(ask_id);
        }
        State::Connecting { target, watch, flow, .. } => {
            sh.unwatch(ctx.out, watch, target.into_stream());
            ctx.link.flow_closed(FlowClosed::unused(flow.flow_id));
        }
        State::Tcp { mut target, watch, flow, .. } => {
            if ex.abort.is_some() {
                target.abort();
            }
            let (up, down) = target.totals();
            sh.unwatch(ctx.out, watch, target.into_stream());
            sh.flow_closed(
                ctx.link,
                FlowClosed {
                    flow_id: flow.flow_id,
                    packets_up: 0,
                    bytes_up: up,
                    packets_down: 0,
                    bytes_down: down,
                },
            );
        }
        State::Udp { tunnel, key, batch, .. } => {
            if let Some(b) = batch {
                queue_batch(key, b, ctx);
            }
            sh.udp_targets.remove(&key);
            ctx.out.closes.push(key);
            if let Some(flow_id) = tunnel.flow_id() {
                sh.flow_closed(ctx.link, tunnel.totals.closed(flow_id));
            }
        }
        State::Ip { tunnel, ip, .. } => {
            if let Some(side) = ctx.ip.as_deref_mut() {
                side.unregister(&ip);
            }
            if let Some(flow_id) = tunnel.flow_id() {
                sh.flow_closed(ctx.link, tunnel.totals.closed(flow_id));
            }
        }
        State::Answer | State::Done => {}
    }
}

/// The flow of an open tunnel, for a re-attached control.
pub fn open_flow(ex: &Exchange, peer: SocketAddr) -> Option<FlowOpen> {
    let (flow, addresses) = match &ex.state {
        State::Tcp { flow, .. } | State::Udp { flow, .. } => (flow, Vec::new()),
        State::Ip { flow, ip, .. } => (
            flow,
            ip.addresses
                .iter()
                .map(|p| relay_proto::channel::record::IpAssignment { addr: p.addr, len: p.len })
                .collect(),
        ),
        _ => return None,
    };
    Some(FlowOpen {
        flow_id: flow.flow_id,
        client: peer,
        target: flow.target,
        identity: flow.identity.clone(),
        addresses,
    })
}

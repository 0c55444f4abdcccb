//! Control's verdict on a tunnel's ask, applied once for every kind and
//! every HTTP version: a refusal, or the kind's own opening.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use relay_proto::channel::record::{FlowClosed, Verdict};
use relay_proto::proxy_status::ProxyError;

use super::flow::Flow;
use super::head::Refusal;
use super::route::Kind;
use super::{DatagramPath, State, TunnelId, Tunnels, bind, ip, tcp, udp, webtransport};
use crate::context::Ctx;

/// The flow ID of an allowing verdict.
pub fn allowed_flow(v: &Verdict) -> Option<u64> {
    match v {
        Verdict::Allow { flow_id, .. }
        | Verdict::AllowIp { flow_id, .. }
        | Verdict::AllowBind { flow_id, .. }
        | Verdict::AllowUpstream { flow_id, .. } => Some(*flow_id),
        Verdict::Deny { .. } | Verdict::Authenticate { .. } => None,
    }
}

/// Applies `verdict` to tunnel `id` (which asked).
pub(super) fn apply(
    ts: &mut Tunnels,
    ctx: &mut Ctx,
    id: TunnelId,
    verdict: Verdict,
    path: &mut dyn DatagramPath,
) {
    let asking = ts.slab.get(id).is_some_and(|t| matches!(t.state, State::Asking { .. }));
    if !asking {
        // The request is gone (timed out, reset, connection closed): the
        // flow goes back unused.
        if let Some(flow_id) = allowed_flow(&verdict) {
            ctx.link.flow_closed(FlowClosed::unused(flow_id));
        }
        return;
    }
    let Some(t) = ts.slab.get_mut(id) else { return };
    if let State::Asking { ask_id, .. } = std::mem::replace(&mut t.state, State::Done) {
        ctx.asks.remove(ask_id);
    }
    let kind = t.kind;
    let now = ctx.now;
    let unspecified = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
    let idle = |ms: u32| Duration::from_millis(u64::from(ms));
    match (verdict, kind) {
        (Verdict::Deny { status, proxy_error, details, retry_after_secs }, _) => {
            let mut refusal = Refusal::new(status, proxy_error, details);
            refusal.retry_after = (retry_after_secs > 0).then_some(retry_after_secs);
            ts.refuse(ctx, id, &refusal);
        }
        (Verdict::Authenticate { details, challenges }, _) => {
            let mut refusal = Refusal::new(407, Some(ProxyError::HttpRequestDenied), details);
            refusal.challenges = challenges;
            ts.refuse(ctx, id, &refusal);
        }
        (Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity }, Kind::Tcp) => {
            let flow = Flow::new(flow_id, identity, target, idle(idle_timeout_ms), byte_budget, now);
            tcp::open(ts, ctx, id, flow);
        }
        (
            Verdict::AllowUpstream {
                flow_id,
                target,
                idle_timeout_ms,
                byte_budget,
                identity,
                route,
                host,
                path,
            },
            upstream @ (Kind::WebSocket | Kind::WebTransport),
        ) => {
            tracing::debug!(
                flow = flow_id,
                route = route.as_str(),
                kind = upstream.name(),
                "allowed to its upstream"
            );
            // The route's TLS settings came with the bootstrap; a route
            // this dataplane was not told about (a control restarted with
            // other routes) cannot be served safely.
            let Some(tls) = ctx.settings.origin_tls.route(&route).map(|t| t.cloned()) else {
                let why = Refusal::new(
                    502,
                    Some(ProxyError::ProxyInternalError),
                    "the upstream route is unknown to the dataplane",
                );
                return refuse_allowed(ts, ctx, id, flow_id, why);
            };
            let route_name = route.clone();
            let mut flow = Flow::new(flow_id, identity, target, idle(idle_timeout_ms), byte_budget, now);
            flow.route = route;
            if upstream == Kind::WebTransport {
                return webtransport::open(ts, ctx, id, flow, host, path, tls);
            }
            if let Some(ws) = ts.slab.get_mut(id).and_then(|t| t.ws.as_mut()) {
                ws.set_upstream(host, path, tls, ctx.settings.origin_tls.http(&route_name));
            }
            tcp::open(ts, ctx, id, flow);
        }
        (Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity }, Kind::Udp) => {
            let flow = Flow::new(flow_id, identity, target, idle(idle_timeout_ms), byte_budget, now);
            udp::open(ts, ctx, id, flow, path);
        }
        (
            Verdict::AllowIp { flow_id, idle_timeout_ms, byte_budget, identity, addresses, routes },
            Kind::Ip,
        ) => {
            let flow = Flow::new(flow_id, identity, unspecified, idle(idle_timeout_ms), byte_budget, now);
            ip::open(ts, ctx, id, flow, &addresses, &routes, path);
        }
        (Verdict::AllowBind { flow_id, idle_timeout_ms, byte_budget, identity, peers }, Kind::Bound) => {
            let flow = Flow::new(flow_id, identity, unspecified, idle(idle_timeout_ms), byte_budget, now);
            bind::open(ts, ctx, id, flow, peers, path);
        }
        (verdict, _) => {
            // An allow of another kind than asked: control and dataplane
            // disagree.
            let flow_id = allowed_flow(&verdict).unwrap_or_default();
            let why = Refusal::new(
                502,
                Some(ProxyError::ProxyInternalError),
                "control allowed another tunnel kind",
            );
            refuse_allowed(ts, ctx, id, flow_id, why);
        }
    }
}

/// Refuses a request control allowed but the worker cannot serve: the
/// flow goes back to control unused, the client gets `why`.
pub(super) fn refuse_allowed(ts: &mut Tunnels, ctx: &mut Ctx, id: TunnelId, flow_id: u64, why: Refusal) {
    ctx.link.flow_closed(FlowClosed::unused(flow_id));
    ts.refuse(ctx, id, &why);
}

/// Puts an allowed tunnel in its open state and counts its flow as held.
pub(super) fn hold(ts: &mut Tunnels, id: TunnelId, state: State) {
    if let Some(t) = ts.slab.get_mut(id) {
        t.state = state;
        ts.held += 1;
    }
}

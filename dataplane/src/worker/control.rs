//! The worker's side of the channel to control: answers to its asks go to
//! the tunnel or connection that asked (the registries say which), and
//! control's own requests (kill a flow, list the connections, drain) are
//! carried out; a control that replaced a dead one learns the live flows.

use relay_channel::region::Counter;
use relay_proto::channel::record::{FlowClosed, SignResult};
use tracing::info;

use super::Worker;
use crate::link::Answer;
use crate::tunnel::Carrier;
use crate::tunnel::verdict::allowed_flow;

impl Worker {
    /// Reads control's records (bounded per turn).
    pub(super) fn read_answers(&mut self) {
        let mut answers = Vec::new();
        self.answers_due = self.ctx.link.poll_answers(|a| answers.push(a));
        for a in answers {
            match a {
                Answer::Auth(a) => match self.ctx.asks.remove(a.ask_id) {
                    Some(id) => {
                        self.with_path(id, |tunnels, ctx, path| tunnels.on_verdict(ctx, id, a.verdict, path));
                    }
                    None => {
                        // The request is gone (timed out, reset, connection
                        // closed): the flow goes back unused.
                        if let Some(flow_id) = allowed_flow(&a.verdict) {
                            self.ctx.link.flow_closed(FlowClosed::unused(flow_id));
                        }
                    }
                },
                Answer::Sign(a) => self.on_sign_answer(a.sign_id, a.result),
                Answer::Address(a) => {
                    if let Some(carrier) = self.tunnels.on_address_answer(&mut self.ctx, &a) {
                        self.wake(carrier);
                    }
                }
            }
        }
    }

    fn on_sign_answer(&mut self, sign_id: u64, result: SignResult) {
        match self.ctx.signs.remove(sign_id) {
            Some(Carrier::H3(key)) => self.h3.on_signed(key, sign_id, result, &self.ctx),
            Some(Carrier::Front(key)) => {
                if let Some(front) = self.front.as_mut() {
                    front.on_signed(key, sign_id, result, &mut self.tunnels, &mut self.ctx);
                }
            }
            None => {} // the connection is gone, or the ask timed out
        }
    }

    /// Ends the tunnels control was asked to kill.
    pub(super) fn kill_requested_flows(&mut self) {
        let kills = self.ctx.link.take_kill_requests();
        if kills.is_empty() {
            return;
        }
        for carrier in self.tunnels.kill(&mut self.ctx, &kills) {
            self.wake(carrier);
        }
    }

    /// Lists this worker's connections for control (`relayctl conns`).
    pub(super) fn answer_conn_listings(&mut self) {
        for (request_id, limit) in self.ctx.link.take_list_requests() {
            // A listing never takes more than half the room left in the
            // link's queue, so flow reports are never crowded out.
            let limit = (limit as usize).min(self.ctx.link.queue_room() / 2);
            let now = self.ctx.now;
            let (mut listed, mut total) = self.h3.list(request_id, limit, now);
            if let Some(front) = self.front.as_ref() {
                let (more, front_total) =
                    front.list(request_id, limit.saturating_sub(listed.len()), now, &self.tunnels);
                listed.extend(more);
                total += front_total;
            }
            for info in listed {
                self.ctx.link.conn_info(info);
            }
            self.ctx.link.conn_list_end(request_id, total as u32);
        }
    }

    /// Switches to the channel of a control that attached after the
    /// previous one went away: asks and signatures sent to the dead
    /// control are failed now, and every open tunnel is reported so the new
    /// control learns the live flows.
    pub(super) fn check_relink(&mut self) {
        let Ok(mut new) = self.relink.try_recv() else { return };
        new.continue_ask_ids(self.ctx.link.next_ask_id());
        self.ctx.link = new;
        self.link_epoch += 1;
        self.answers_due = true;
        // Signatures asked of the dead control will never come.
        let signs: Vec<(u64, Carrier)> = self.ctx.signs.iter().collect();
        for (sign_id, carrier) in signs {
            self.ctx.signs.remove(sign_id);
            match carrier {
                Carrier::H3(key) => self.h3.fail_sign(key, sign_id, &self.ctx),
                Carrier::Front(key) => {
                    if let Some(front) = self.front.as_mut() {
                        front.fail_sign(key, sign_id, &mut self.tunnels, &mut self.ctx);
                    }
                }
            }
        }
        for carrier in self.tunnels.on_control_replaced(&mut self.ctx) {
            self.wake(carrier);
        }
        let open = self.tunnels.open_flows();
        // The new region's counters start at zero: restore the gauges.
        let c = self.ctx.link.counters();
        c.set(Counter::ConnectionsActive, self.h3.connections() as u64);
        if let Some(f) = self.front.as_ref() {
            c.set(Counter::TcpConnectionsActive, f.connections() as u64);
        }
        c.set(Counter::TunnelsActive, self.tunnels.active() as u64);
        self.restore_gauges();
        let flows = open.len();
        for f in open {
            self.ctx.link.flow_open(f);
        }
        info!(worker = self.index(), flows, "attached to a new control; live flows reported");
    }
}

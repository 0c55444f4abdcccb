//! A dataplane worker: the turn driver of one thread.
//!
//! The worker owns the parts of a worker and the order of a turn, nothing
//! else: the shared context ([`Ctx`]: settings, channel to control,
//! output queue, timers, registries), the tunnel layer ([`Tunnels`]), the
//! HTTP/3 side ([`H3`]) and the TCP front ([`Front`]). An I/O backend
//! ([`crate::io::uring`] or [`crate::io::epoll`]) drives it through
//! [`Handler`]; every completion goes to the owner the registries name,
//! and the core itself performs no I/O on datagram sockets (the backend
//! does, from the [`crate::io::Output`] queue).
//!
//! Per turn: the backend reads the clock once ([`Handler::begin_turn`]),
//! delivers what arrived, then [`Handler::end_turn`] takes hand-offs and
//! control's records, fires due timers, lets the TCP front and every HTTP/3
//! connection touched this turn (and only those) write, and queues the
//! turn's datagram batches.

mod control;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use relay_channel::region::Counter;
use relay_proto::ip::packet;
use tracing::{debug, info};

use crate::context::{Ctx, Settings, WatchOwner};
use crate::front::Front;
use crate::h3::{H3, H3Error};
use crate::handoff::Inbox;
use crate::io::{Handler, Output, Ready, TargetKey, Turn, Wake, WatchKey};
use crate::link::ControlLink;
use crate::retry::RetryTokens;
use crate::timers::TimerTarget;
use crate::tls::TlsShared;
use crate::tun::{self, TunInfo, TunRead};
use crate::tunnel::ip::IpSide;
use crate::tunnel::{Backlog, Carrier, DatagramPath, NoDatagrams, TunnelId, Tunnels};

/// The longest a backend waits without a turn, so stop requests (signals)
/// are seen promptly even when idle.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Process-wide flags the worker obeys.
pub struct Flags {
    /// Stop at once.
    pub stop: &'static AtomicBool,
    /// Drain gracefully.
    pub drain: &'static AtomicBool,
}

/// A worker's core.
pub struct Worker {
    ctx: Ctx,
    tunnels: Tunnels,
    h3: H3,
    front: Option<Front>,
    flags: Flags,
    inboxes: Arc<[Inbox]>,
    relink: std::sync::mpsc::Receiver<ControlLink>,
    /// Incremented when control is replaced.
    link_epoch: u64,
    answers_due: bool,
    /// When a graceful drain must end.
    drain_deadline: Option<Instant>,
    stopped: bool,
    backend_gauge: u64,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The HTTP/3 side (TLS, QUIC or HTTP/3 configuration).
    #[error(transparent)]
    H3(#[from] H3Error),
}

impl Worker {
    /// Prepares a worker serving QUIC on `local` (its socket is already
    /// bound, and owned by the backend).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        tls: Arc<TlsShared>,
        flags: Flags,
        local: SocketAddr,
        link: ControlLink,
        relink: std::sync::mpsc::Receiver<ControlLink>,
        inboxes: Arc<[Inbox]>,
        retry: Arc<RetryTokens>,
    ) -> Result<Self, WorkerError> {
        let ctx = Ctx::new(settings, link, Instant::now());
        let h3 = H3::new(&ctx, local, tls, inboxes.clone(), retry)?;
        Ok(Self {
            ctx,
            tunnels: Tunnels::new(),
            h3,
            front: None,
            flags,
            inboxes,
            relink,
            link_epoch: 0,
            answers_due: true,
            drain_deadline: None,
            stopped: false,
            backend_gauge: 0,
        })
    }

    /// The worker's index.
    pub fn index(&self) -> u32 {
        self.ctx.settings.index
    }

    /// Serves connect-ip through the worker's TUN device `tun` (the
    /// backend owns the device and does its I/O).
    pub fn set_tun(&mut self, tun: TunInfo) {
        self.tunnels.set_ip(IpSide::new(tun));
    }

    /// Follows connection ID rotations published in `shared`.
    pub fn set_cid_updates(&mut self, shared: Arc<crate::cids::CidShared>) {
        self.h3.set_cid_updates(shared);
    }

    /// Follows the qlog commands applied to `shared` (`relayctl qlog`).
    pub fn set_qlog(&mut self, shared: Arc<crate::qlog::QlogShared>) {
        self.h3.set_qlog(shared);
    }

    /// Serves the TCP front too: its listeners are watched from the first
    /// turn.
    pub fn set_front(&mut self, mut front: Front) {
        front.start(&mut self.ctx);
        self.front = Some(front);
    }

    /// Records which backend serves this worker (a gauge in the counters,
    /// restored when control is replaced).
    pub fn set_backend_gauge(&mut self, value: u64) {
        self.backend_gauge = value;
        self.restore_gauges();
    }

    /// Runs `f` on tunnel `id` with its carrier's datagram path (an HTTP/3
    /// connection's, or none for the TCP front), then lets the carrier
    /// move what the tunnel has for the client.
    fn with_path<R>(
        &mut self,
        id: TunnelId,
        f: impl FnOnce(&mut Tunnels, &mut Ctx, &mut dyn DatagramPath) -> R,
    ) -> R {
        let (tunnels, ctx) = (&mut self.tunnels, &mut self.ctx);
        match tunnels.place(id).map(|p| p.carrier) {
            Some(Carrier::H3(conn)) => {
                let mut f = Some(f);
                let done =
                    self.h3.with_path(conn, |path| (f.take().expect("called once"))(tunnels, ctx, path));
                match done {
                    Some(r) => r,
                    None => (f.take().expect("not called"))(tunnels, ctx, &mut NoDatagrams),
                }
            }
            Some(Carrier::Front(conn)) => {
                let r = f(tunnels, ctx, &mut NoDatagrams);
                if let Some(front) = self.front.as_mut() {
                    front.wake(conn);
                }
                r
            }
            None => f(tunnels, ctx, &mut NoDatagrams),
        }
    }

    /// Reads again from the targets of paused tunnels whose connections
    /// sent enough of their backlog (after the turn's flush).
    fn resume_drained(&mut self) {
        // Looked at, not touched: a connection marked for a flush here
        // would keep the loop from waiting while its tunnel is paused.
        let h3 = &self.h3;
        self.tunnels.resume_drained(&mut self.ctx, |carrier| match carrier {
            Carrier::H3(conn) => h3.backlog(conn).unwrap_or(Backlog::Low),
            Carrier::Front(_) => Backlog::Low,
        });
    }

    /// Lets a carrier move what its tunnels have for the client.
    fn wake(&mut self, carrier: Carrier) {
        match carrier {
            Carrier::H3(conn) => self.h3.wake(conn),
            Carrier::Front(conn) => {
                if let Some(front) = self.front.as_mut() {
                    front.wake(conn);
                }
            }
        }
    }

    fn wake_tunnel(&mut self, id: TunnelId) {
        if let Some(p) = self.tunnels.place(id) {
            self.wake(p.carrier);
        }
    }

    /// Fires the timers due now: QUIC timeouts, TCP front deadlines,
    /// tunnel deadlines, signature deadlines.
    fn fire_timers(&mut self) {
        let now = self.ctx.now;
        while let Some((at, target)) = self.ctx.timers.pop_due(now) {
            match target {
                TimerTarget::H3Conn(key) => self.h3.on_timer(key, at),
                TimerTarget::FrontConn(key) => {
                    if let Some(front) = self.front.as_mut() {
                        front.on_timer(key, at, &mut self.tunnels, &mut self.ctx);
                    }
                }
                TimerTarget::Tunnel(id) => {
                    self.with_path(id, |tunnels, ctx, path| tunnels.on_timer(ctx, id, path));
                    self.wake_tunnel(id);
                }
                TimerTarget::Sign(sign_id) => {
                    if let Some(Carrier::H3(key)) = self.ctx.signs.get(sign_id) {
                        debug!(sign_id, "control did not sign in time");
                        self.ctx.signs.remove(sign_id);
                        self.h3.fail_sign(key, sign_id, &self.ctx);
                    }
                }
            }
        }
        let live = self.h3.connections()
            + self.tunnels.len()
            + self.ctx.asks.len()
            + self.ctx.signs.len()
            + self.front.as_ref().map_or(0, Front::connections);
        if self.ctx.timers.len() > 4 * live + 4096 {
            self.compact_timers();
        }
    }

    /// Drops stale timer entries.
    fn compact_timers(&mut self) {
        let Ctx { timers, signs, .. } = &mut self.ctx;
        let (h3, front, tunnels) = (&self.h3, self.front.as_ref(), &self.tunnels);
        timers.retain(|at, target| match target {
            TimerTarget::H3Conn(key) => h3.timer_live(key, at),
            TimerTarget::FrontConn(key) => front.is_some_and(|f| f.timer_live(key, at)),
            TimerTarget::Tunnel(id) => tunnels.has_deadline(id),
            TimerTarget::Sign(id) => signs.contains(id),
        });
    }

    /// One packet from the TUN device: to the tunnel its destination is
    /// assigned to.
    fn on_tun_packet(&mut self, packet: &mut [u8]) {
        let Ok(info) = packet::parse(packet) else {
            return self.ctx.count(Counter::DropMalformed, 1);
        };
        let Some(id) = self.tunnels.ip().and_then(|ip| ip.owner_of(info.dst)) else {
            // An assigned address whose tunnel is gone.
            return self.ctx.count(Counter::DropNoTunnel, 1);
        };
        self.with_path(id, |tunnels, ctx, path| tunnels.on_tun_packet(ctx, id, packet, &info, path));
    }

    /// Graceful drain: GOAWAY on every connection, no new connections or
    /// requests; open tunnels run until they end or the deadline passes.
    fn start_drain(&mut self) {
        let timeout = Duration::from_millis(self.ctx.settings.bootstrap.drain_timeout_ms);
        self.drain_deadline = Some(self.ctx.now + timeout);
        self.ctx.draining = true;
        self.h3.start_drain();
        if let Some(front) = self.front.as_mut() {
            front.start_drain(&mut self.tunnels, &mut self.ctx);
        }
        info!(worker = self.index(), tunnels = self.tunnels.held(), ?timeout, "draining");
    }

    /// Closes everything (the last turn).
    fn shutdown(&mut self) {
        self.h3.shutdown(&mut self.tunnels, &mut self.ctx);
        if let Some(front) = self.front.as_mut() {
            front.shutdown(&mut self.tunnels, &mut self.ctx);
        }
        self.tunnels.flush_up(&mut self.ctx);
        info!(worker = self.index(), "worker stopped");
    }

    /// The gauges a new region's counters must show (they start at zero).
    fn restore_gauges(&self) {
        let c = self.ctx.link.counters();
        c.set(Counter::IoBackend, self.backend_gauge);
        c.set(Counter::TlsGeneration, u64::from(self.h3.tls_generation()));
        self.h3.restore_qlog_gauges(&self.ctx);
    }
}

impl Handler for Worker {
    fn begin_turn(&mut self, now: Instant) {
        self.ctx.begin_turn(now);
        self.ctx.out.stats.turns += 1;
    }

    fn on_quic(&mut self, packets: &mut [u8], segment_size: usize, from: SocketAddr) {
        let stride = segment_size.max(1);
        for pkt in packets.chunks_mut(stride) {
            self.h3.on_packet(pkt, from, &mut self.tunnels, &mut self.ctx);
        }
    }

    fn on_tun(&mut self, read: &mut [u8]) {
        let Some(ip) = self.tunnels.ip_mut() else { return };
        let vnet = ip.tun().offloads.vnet_header;
        let mut segment = ip.take_segment();
        let split = tun::split_read(vnet, read, &mut segment, |packet| {
            self.ctx.count(Counter::TunPacketsIn, 1);
            self.on_tun_packet(packet);
        });
        match split {
            TunRead::Packets(count) if count > 1 => self.ctx.count(Counter::TunGsoReads, 1),
            TunRead::Malformed(e) => {
                debug!("TUN read: {e}");
                self.ctx.count(Counter::DropMalformed, 1);
            }
            _ => {}
        }
        if let Some(ip) = self.tunnels.ip_mut() {
            ip.put_segment(segment);
        }
    }

    fn on_target(&mut self, key: TargetKey, from: Option<SocketAddr>, payloads: &[u8], segment_size: usize) {
        let Some(id) = self.ctx.endpoints.get(key) else { return };
        self.with_path(id, |tunnels, ctx, path| {
            tunnels.on_target(ctx, id, from, payloads, segment_size, path)
        });
    }

    fn on_target_unreachable(&mut self, key: TargetKey, errno: i32) {
        let Some(id) = self.ctx.endpoints.get(key) else { return };
        debug!(flow = ?self.tunnels.flow_id(id), errno, "target unreachable");
        self.tunnels.on_target_unreachable(&mut self.ctx, id);
        self.wake_tunnel(id);
    }

    fn on_ready(&mut self, key: WatchKey, ready: Ready) {
        match self.ctx.watches.get(key) {
            Some(WatchOwner::Listener(i)) => {
                if let Some(front) = self.front.as_mut() {
                    front.on_listener(i, &mut self.tunnels, &mut self.ctx);
                }
            }
            Some(WatchOwner::FrontConn(conn)) => {
                if let Some(front) = self.front.as_mut() {
                    front.on_ready(conn, ready, &mut self.tunnels, &mut self.ctx);
                }
            }
            Some(WatchOwner::Tunnel(id)) => {
                self.tunnels.on_ready(&mut self.ctx, id, ready);
                self.wake_tunnel(id);
            }
            None => {}
        }
    }

    fn on_wake(&mut self, wake: Wake) {
        match wake {
            Wake::Answers => self.answers_due = true,
            Wake::Worker => {
                self.inboxes[self.index() as usize].bell.drain();
                self.check_relink();
                self.h3.handoffs_due = true;
            }
        }
    }

    fn end_turn(&mut self) -> Turn {
        if self.stopped {
            return Turn::Stop;
        }
        self.h3.adopt_tls(&self.ctx);
        self.h3.adopt_cids(&mut self.ctx);
        self.h3.adopt_qlog(&self.ctx);
        if self.h3.handoffs_due {
            self.h3.take_handoffs(&mut self.tunnels, &mut self.ctx);
        }
        if self.answers_due {
            self.read_answers();
        } else {
            self.ctx.link.flush_queued();
        }
        self.kill_requested_flows();
        self.answer_conn_listings();
        let requested = self.ctx.link.take_drain_request();
        if (requested || self.flags.drain.load(Ordering::Relaxed)) && self.drain_deadline.is_none() {
            self.start_drain();
        }
        let stop = self.flags.stop.load(Ordering::Relaxed);
        let drained = self.drain_deadline.is_some_and(|deadline| {
            let done = self.tunnels.held() == 0 || self.ctx.now >= deadline;
            if done {
                info!(worker = self.index(), tunnels_left = self.tunnels.held(), "drain finished");
            }
            done
        });
        self.fire_timers();
        if let Some(front) = self.front.as_mut() {
            front.end_turn(&mut self.tunnels, &mut self.ctx);
        }
        self.tunnels.flush_up(&mut self.ctx);
        self.h3.flush(&mut self.tunnels, &mut self.ctx);
        if self.tunnels.has_paused() {
            self.resume_drained();
        }
        self.tunnels.flush_up(&mut self.ctx);
        self.h3.ring_bells();
        if stop || drained {
            self.stopped = true;
            self.shutdown();
            self.ctx.out.stats.flush_into(self.ctx.link.counters());
            return Turn::Stop;
        }
        self.ctx.out.stats.flush_into(self.ctx.link.counters());
        let busy = self.h3.handoffs_due
            || self.answers_due
            || self.h3.has_dirty()
            || self.front.as_ref().is_some_and(Front::busy);
        let deadline = if busy {
            self.ctx.now
        } else {
            let cap = self.ctx.now + MAX_WAIT;
            self.ctx.timers.next().map_or(cap, |t| t.min(cap))
        };
        Turn::Continue { deadline }
    }

    fn output(&mut self) -> &mut Output {
        &mut self.ctx.out
    }

    fn answer_bell(&self) -> (RawFd, u64) {
        (self.ctx.link.answer_bell().as_raw_fd(), self.link_epoch)
    }

    fn worker_bell(&self) -> RawFd {
        self.inboxes[self.index() as usize].bell.as_raw_fd()
    }
}

#[cfg(test)]
mod cid_tests;
#[cfg(test)]
pub mod harness;
#[cfg(test)]
mod ip_tests;
#[cfg(test)]
mod load_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wt_tests;

//! connect-ip (RFC 9484) in the worker: tunnels whose payloads are whole IP
//! packets, exchanged with the worker's TUN device.
//!
//! * Up (client → TUN): the packet's source must be one of the tunnel's
//!   assigned addresses and its destination and protocol inside the routes
//!   control allowed (the client's scope less the target policy). Failures
//!   are forwarding errors, not protocol errors (section 7.2): the packet
//!   is dropped, counted, and answered with an ICMP error (section 7.2.1).
//!   The kernel routes what is written to the TUN device and decrements the
//!   TTL then.
//! * Down (TUN → client): the destination names the tunnel (the worker's
//!   address map), the source must lie in the tunnel's routes, the hop
//!   limit is decremented "right before an IP packet is transmitted in an
//!   HTTP Datagram" (section 7.2) with Time Exceeded when it runs out, and
//!   a packet larger than the tunnel can carry gets Packet Too Big so inner
//!   TCP never stalls silently.
//! * Address and route capsules (section 4.7): ADDRESS_ASSIGN (request ID 0)
//!   and ROUTE_ADVERTISEMENT are sent with the 2xx; ADDRESS_REQUEST is
//!   answered with the assigned address of the family (or the all-zero
//!   rejection, section 4.7.2); the client's ADDRESS_ASSIGN and
//!   ROUTE_ADVERTISEMENT are validated and ignored (the relay routes
//!   nothing towards clients but their assigned addresses).

use std::collections::HashMap;
use std::net::IpAddr;

use relay_proto::channel::record::{
    AddressAnswer, AddressAsk, IpAssignment, IpRoute, MAX_ADDRESSES_PER_FAMILY, TunnelProtocol,
};
use relay_proto::ip::capsule::{self as ipcap, AssignedAddress, IpAddressRange, IpCapsule, IpPrefix};
use relay_proto::ip::offload;
use relay_proto::ip::packet::{self, HopOutcome, IcmpError};
use relay_proto::request::{self, Request};
use relay_proto::template::IpUriTemplate;
use tracing::debug;

use super::{Conn, ConnKey, Counter, TunnelAsk, Worker};
use crate::tun::{self, TunRead, WorkerTun};

/// ICMP (1) and ICMPv6 (58) are always allowed (RFC 9484 section 4.6).
fn is_icmp(protocol: u8) -> bool {
    protocol == 1 || protocol == 58
}

/// Bytes of a QUIC DATAGRAM frame's HTTP Datagram header at most: quarter
/// stream ID (8) and context ID 0 (1).
const DATAGRAM_HEADER_MAX: usize = 9;

/// Most packets read from the TUN device per turn.
const TUN_BUDGET: usize = 256;

/// ICMP errors a worker sends per second at most, in bursts of as many
/// (RFC 4443 section 2.4 (f), RFC 1812 section 4.3.2.8: errors are rate
/// limited).
const ICMP_PER_SECOND: f64 = 200.0;

/// A token bucket for ICMP errors.
struct IcmpLimiter {
    tokens: f64,
    at: std::time::Instant,
}

impl IcmpLimiter {
    fn new() -> Self {
        Self { tokens: ICMP_PER_SECOND, at: std::time::Instant::now() }
    }

    /// Whether one more error may go out now.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * ICMP_PER_SECOND).min(ICMP_PER_SECOND);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Client packets a turn queues for the TUN device at most (then they are
/// written before more are queued).
const QUEUE_PACKETS: usize = 128;
/// Bytes of client packets a turn queues for the TUN device at most.
const QUEUE_BYTES: usize = 256 * 1024;

/// Client packets waiting for the end of the turn's TUN writes (offloads
/// on), so runs of one TCP flow go out as one GSO write. They leave in the
/// same loop turn they arrived in: nothing waits for more to come (RFC 9298
/// section 6 asks intermediaries not to delay datagrams).
#[derive(Default)]
struct TunQueue {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl TunQueue {
    fn fits(&self, len: usize) -> bool {
        self.ends.len() < QUEUE_PACKETS && self.bytes.len() + len <= QUEUE_BYTES
    }

    fn push(&mut self, packet: &[u8]) {
        self.bytes.extend_from_slice(packet);
        self.ends.push(self.bytes.len());
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// Tunnels of the TCP front carry this bit in their address map owner
/// (their connection key; QUIC connections' keys never have it).
pub const FRONT_OWNER: u64 = 1 << 63;

/// What became of a client's packet.
pub enum UpResult {
    /// Written to the TUN device.
    Written,
    /// Refused: this ICMP error goes back to the client.
    Icmp(Vec<u8>),
    /// Dropped (malformed, rate limit, TUN error; counted).
    Dropped,
}

/// The worker's connect-ip side.
pub struct IpSide {
    pub(super) tun: WorkerTun,
    template: IpUriTemplate,
    /// Assigned address → tunnel.
    by_addr: HashMap<IpAddr, (ConnKey, u64)>,
    /// The device has more to read.
    pub(super) due: bool,
    /// ICMP errors for clients, sent at the end of the turn.
    icmp_down: Vec<(ConnKey, u64, Vec<u8>)>,
    icmp_limit: IcmpLimiter,
    buf: Vec<u8>,
    /// Client packets for the device, written at the end of the turn.
    queued: TunQueue,
    /// Where GSO packets read from the device are cut into packets.
    segment: Vec<u8>,
}

impl IpSide {
    /// Registers a tunnel's addresses under `owner`.
    pub fn register(&mut self, owner: (ConnKey, u64), t: &mut IpTunnel) {
        t.owner = Some(owner);
        for p in &t.addresses {
            self.by_addr.insert(p.addr, owner);
        }
    }

    /// Adds an address granted to a registered tunnel to the address map.
    pub fn register_address(&mut self, t: &IpTunnel, addr: IpAddr) {
        if let Some(owner) = t.owner {
            self.by_addr.insert(addr, owner);
        }
    }

    /// Forgets a tunnel's addresses where they still name it.
    pub fn unregister(&mut self, t: &IpTunnel) {
        for p in &t.addresses {
            if t.owner.is_some() && self.by_addr.get(&p.addr) == t.owner.as_ref() {
                self.by_addr.remove(&p.addr);
            }
        }
    }

    /// Checks a client's packet against the tunnel (RFC 9484 section 7.2:
    /// source assigned, destination and protocol routed) and writes it to
    /// the TUN device, or gives the ICMP error for the client.
    pub fn up(
        &mut self,
        counters: &relay_channel::region::Counters,
        t: &IpTunnel,
        packet: &[u8],
    ) -> UpResult {
        let info = match packet::parse(packet) {
            Ok(i) => i,
            Err(_) => {
                counters.add(Counter::DropMalformed, 1);
                return UpResult::Dropped;
            }
        };
        let refusal = if !t.source_allowed(info.src) {
            counters.add(Counter::DropIpBadSource, 1);
            Some(IcmpError::SourcePolicy)
        } else if !t.routed(info.dst, info.protocol) {
            counters.add(Counter::DropIpOutOfScope, 1);
            Some(IcmpError::AdminProhibited)
        } else {
            None
        };
        if let Some(kind) = refusal {
            if !self.icmp_limit.take() {
                return UpResult::Dropped;
            }
            let from = self.tun.own_address(info.src.is_ipv4());
            return match from.and_then(|from| packet::icmp_error(packet, from, kind)) {
                Some(icmp) => UpResult::Icmp(icmp),
                None => UpResult::Dropped,
            };
        }
        if self.tun.offloads().vnet_header {
            if !self.queued.fits(packet.len()) {
                self.flush_writes(counters);
            }
            self.queued.push(packet);
            return UpResult::Written;
        }
        match self.tun.write(packet) {
            Ok(()) => {
                counters.add(Counter::TunPacketsOut, 1);
                UpResult::Written
            }
            Err(e) => {
                debug!("TUN write: {e}");
                counters.add(Counter::DropTargetSend, 1);
                UpResult::Dropped
            }
        }
    }

    /// Writes the queued client packets, runs of one TCP flow coalesced
    /// into GSO packets. A coalesced write the kernel refuses is retried
    /// one packet at a time, so a kernel that will not take our GSO packets
    /// costs speed, not packets.
    fn flush_writes(&mut self, counters: &relay_channel::region::Counters) {
        if self.queued.is_empty() {
            return;
        }
        let mut packets: [&[u8]; QUEUE_PACKETS] = [&[]; QUEUE_PACKETS];
        let mut start = 0;
        for (slot, &end) in packets.iter_mut().zip(&self.queued.ends) {
            *slot = &self.queued.bytes[start..end];
            start = end;
        }
        let tun = &self.tun;
        offload::coalesce(&packets[..self.queued.ends.len()], |planned| {
            let count = planned.packets.len() as u64;
            match tun.write_planned(planned) {
                Ok(()) if count > 1 => {
                    counters.add(Counter::TunGsoWrites, 1);
                    counters.add(Counter::TunCoalescedPackets, count);
                    counters.add(Counter::TunPacketsOut, count);
                }
                Ok(()) => counters.add(Counter::TunPacketsOut, 1),
                Err(e) if count > 1 => {
                    debug!("TUN GSO write of {count} packets: {e}; writing them one by one");
                    for packet in planned.packets {
                        match tun.write(packet) {
                            Ok(()) => counters.add(Counter::TunPacketsOut, 1),
                            Err(_) => counters.add(Counter::DropTargetSend, 1),
                        }
                    }
                }
                Err(e) => {
                    debug!("TUN write: {e}");
                    counters.add(Counter::DropTargetSend, 1);
                }
            }
        });
        self.queued.clear();
    }

    /// The tunnel a packet from the device is for, and whether its source
    /// may reach the client through it is the owner's to check.
    pub fn owner_of(&self, dst: IpAddr) -> Option<(ConnKey, u64)> {
        self.by_addr.get(&dst).copied()
    }

    /// Prepares a packet from the device for a tunnel: the hop limit is
    /// decremented (Time Exceeded back through the device when it runs
    /// out), and a packet over `room` bytes gets Packet Too Big. Returns
    /// whether the packet goes on.
    pub fn prepare_down(
        &mut self,
        counters: &relay_channel::region::Counters,
        packet: &mut [u8],
        room: Option<usize>,
    ) -> bool {
        let own = self.tun.own_address(packet.first().is_some_and(|b| b >> 4 == 4));
        match packet::decrement_hop_limit(packet) {
            Ok(HopOutcome::Forward) => {}
            Ok(HopOutcome::Expired) => {
                self.icmp_into_tun(counters, own, packet, IcmpError::TimeExceeded);
                return false;
            }
            Err(_) => {
                counters.add(Counter::DropMalformed, 1);
                return false;
            }
        }
        // RFC 9484 section 7.2.1: a packet the tunnel cannot carry gets
        // Packet Too Big, not a silent drop.
        if let Some(room) = room
            && packet.len() > room
        {
            let mtu = room as u32;
            self.icmp_into_tun(counters, own, packet, IcmpError::PacketTooBig { mtu });
            counters.add(Counter::DropTooLarge, 1);
            return false;
        }
        true
    }

    /// Sends an ICMP error about `original` back to its sender through the
    /// kernel.
    fn icmp_into_tun(
        &mut self,
        counters: &relay_channel::region::Counters,
        own: Option<IpAddr>,
        original: &[u8],
        kind: IcmpError,
    ) {
        if !self.icmp_limit.take() {
            return;
        }
        let Some(icmp) = own.and_then(|from| packet::icmp_error(original, from, kind)) else { return };
        if self.tun.write(&icmp).is_ok() {
            counters.add(Counter::IcmpErrorsSent, 1);
        }
    }

    pub(super) fn new(tun: WorkerTun, template: IpUriTemplate) -> Self {
        Self {
            tun,
            template,
            by_addr: HashMap::new(),
            due: true,
            icmp_down: Vec::new(),
            icmp_limit: IcmpLimiter::new(),
            buf: vec![0; offload::VNET_HDR_LEN + 65_536],
            queued: TunQueue::default(),
            segment: vec![0; 65_536],
        }
    }
}

/// A connect-ip tunnel's configuration.
#[derive(Debug, Clone)]
pub struct IpTunnel {
    /// Assigned to the client.
    pub addresses: Vec<IpPrefix>,
    /// The ADDRESS_REQUEST each address answered (0: assigned with the
    /// tunnel), parallel to `addresses` (RFC 9484 section 4.7.1: an
    /// assignment in response to a request carries its ID).
    request_ids: Vec<u64>,
    /// Where the client may send.
    pub routes: Vec<IpAddressRange>,
    /// The tunnel's place in the address map, once registered.
    owner: Option<(ConnKey, u64)>,
    /// Requests for specific addresses waiting for control (request ID,
    /// address).
    pending: Vec<(u64, IpAddr)>,
}

/// Requests for specific addresses a tunnel may have waiting for control;
/// more are refused at once.
const MAX_PENDING_ADDRESS_ASKS: usize = 4;

impl IpTunnel {
    /// The tunnel control allowed (None if a value is out of range).
    pub fn from_allow(addresses: &[IpAssignment], routes: &[IpRoute]) -> Option<Self> {
        let addresses =
            addresses.iter().map(|a| IpPrefix::new(a.addr, a.len).ok()).collect::<Option<Vec<_>>>()?;
        let routes = routes
            .iter()
            .map(|r| IpAddressRange::new(r.start, r.end, r.protocol).ok())
            .collect::<Option<Vec<_>>>()?;
        let request_ids = vec![0; addresses.len()];
        Some(Self { addresses, request_ids, routes, owner: None, pending: Vec::new() })
    }

    /// Whether `src` is one of the client's assigned addresses.
    pub fn source_allowed(&self, src: IpAddr) -> bool {
        self.addresses.iter().any(|p| p.contains(src))
    }

    /// Whether `addr` with `protocol` is inside an advertised route.
    pub fn routed(&self, addr: IpAddr, protocol: u8) -> bool {
        self.routes.iter().any(|r| {
            r.contains(addr) && (r.ip_protocol == 0 || r.ip_protocol == protocol || is_icmp(protocol))
        })
    }

    /// The capsules sent with the 2xx: the assignment and the routes.
    pub fn opening_capsules(&self) -> Vec<u8> {
        let mut out = self.assign_capsule(&[]);
        ipcap::encode(&IpCapsule::RouteAdvertisement(self.routes.clone()), &mut out);
        out
    }

    /// ADDRESS_ASSIGN with every current assignment (the full list, RFC
    /// 9484 section 4.7.1), then `answers`.
    fn assign_capsule(&self, answers: &[AssignedAddress]) -> Vec<u8> {
        let mut list: Vec<AssignedAddress> = self
            .addresses
            .iter()
            .zip(&self.request_ids)
            .map(|(p, &request_id)| AssignedAddress { request_id, prefix: *p })
            .collect();
        for a in answers {
            if !list.contains(a) {
                list.push(*a);
            }
        }
        let mut out = Vec::new();
        ipcap::encode(&IpCapsule::AddressAssign(list), &mut out);
        out
    }

    fn rejection(request_id: u64, v4: bool) -> AssignedAddress {
        let zero: IpAddr =
            if v4 { std::net::Ipv4Addr::UNSPECIFIED.into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
        AssignedAddress { request_id, prefix: IpPrefix::host(zero) }
    }

    /// Plans the answers to ADDRESS_REQUESTs (RFC 9484 section 4.7.2). A
    /// request for any address of a family, or for one the tunnel holds,
    /// is answered now with it. A request for another single address is
    /// for control to decide (it leases it from the worker's share of the
    /// pool if it is free): it is returned for the caller to ask, while
    /// the tunnel has room for one more address of the family and fewer
    /// than a few asks waiting. Anything else gets the all-zero rejection
    /// now. Returns the ADDRESS_ASSIGN to send now (empty when every
    /// request waits for control) and the asks.
    pub fn plan_requests(&mut self, requests: &[ipcap::RequestedAddress]) -> (Vec<u8>, Vec<(u64, IpAddr)>) {
        let mut now = Vec::new();
        let mut asks = Vec::new();
        for r in requests {
            let v4 = r.prefix.addr.is_ipv4();
            let of_family = || self.addresses.iter().filter(|p| p.addr.is_ipv4() == v4);
            if let Some(p) = of_family().find(|p| r.prefix.is_unspecified() || r.prefix.addr == p.addr) {
                now.push(AssignedAddress { request_id: r.request_id, prefix: *p });
                continue;
            }
            let single = r.prefix.len == if v4 { 32 } else { 128 };
            let room = of_family().count() < MAX_ADDRESSES_PER_FAMILY
                && of_family().count() > 0
                && self.pending.len() + asks.len() < MAX_PENDING_ADDRESS_ASKS;
            if single && room && !r.prefix.is_unspecified() {
                asks.push((r.request_id, r.prefix.addr));
            } else {
                now.push(Self::rejection(r.request_id, v4));
            }
        }
        self.pending.extend(asks.iter().copied());
        let capsule = if now.is_empty() { Vec::new() } else { self.assign_capsule(&now) };
        (capsule, asks)
    }

    /// Control's answer to an ask from [`Self::plan_requests`] (or a
    /// refusal when it could not be asked): a granted address joins the
    /// assignment. Returns the ADDRESS_ASSIGN to send: the full list, with
    /// the request's entry or its all-zero rejection.
    pub fn on_address_answer(&mut self, request_id: u64, addr: IpAddr, granted: bool) -> Vec<u8> {
        let Some(at) = self.pending.iter().position(|p| *p == (request_id, addr)) else {
            // Not asked, or already answered (refused when control was
            // replaced): nothing to tell the client.
            return Vec::new();
        };
        self.pending.swap_remove(at);
        let known = self.addresses.iter().any(|p| p.addr == addr);
        if granted && !known {
            self.addresses.push(IpPrefix::host(addr));
            self.request_ids.push(request_id);
            return self.assign_capsule(&[]);
        }
        if granted {
            return self.assign_capsule(&[]);
        }
        self.assign_capsule(&[Self::rejection(request_id, addr.is_ipv4())])
    }

    /// Refuses every request still waiting for control (a replaced control
    /// never answers them): the ADDRESS_ASSIGN to send, if any waited.
    pub fn refuse_pending(&mut self) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            return None;
        }
        let refusals: Vec<AssignedAddress> =
            self.pending.drain(..).map(|(id, addr)| Self::rejection(id, addr.is_ipv4())).collect();
        Some(self.assign_capsule(&refusals))
    }

    /// The tunnel's place in the address map, once registered.
    pub fn owner(&self) -> Option<(ConnKey, u64)> {
        self.owner
    }
}

impl Worker {
    /// A request with `:protocol = connect-ip` (RFC 9484 section 4.4).
    pub(super) fn on_connect_ip_request(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        stream_id: u64,
        req: &Request,
        more_frames: bool,
    ) {
        let Some(ip) = self.ip.as_ref() else {
            // RFC 8441 section 4: an unsupported :protocol SHOULD get 501.
            return self.refuse(conn, stream_id, 501, None, "connect-ip is not enabled on this relay");
        };
        let connect = match request::classify_connect_ip(req, &ip.template) {
            Ok(c) => c,
            Err(refusal) => {
                return self.refuse(conn, stream_id, refusal.status, refusal.proxy_error, refusal.reason);
            }
        };
        let target_host = connect.ask_target();
        let target_port = connect.ask_ipproto();
        let ask = TunnelAsk {
            authority: &connect.authority,
            path: &connect.path,
            target_host: &target_host,
            target_port,
            authorization: connect.authorization.as_deref(),
            protocol: TunnelProtocol::ConnectIp,
        };
        self.start_tunnel(key, conn, stream_id, more_frames, ask);
    }

    /// Registers an opened IP tunnel's addresses for the TUN demultiplexer.
    pub(super) fn ip_register(&mut self, key: ConnKey, stream_id: u64, t: &mut IpTunnel) {
        if let Some(ip) = self.ip.as_mut() {
            ip.register((key, stream_id), t);
        }
    }

    /// Forgets a closed IP tunnel's addresses (only where they still name
    /// this tunnel).
    pub(super) fn ip_unregister(&mut self, t: &IpTunnel) {
        if let Some(ip) = self.ip.as_mut() {
            ip.unregister(t);
        }
    }

    /// Handles the connect-ip capsules a tunnel received. Returns false
    /// when one is malformed: the caller aborts the stream (RFC 9297
    /// section 3.3, RFC 9484 sections 4.7.2 and 4.7.3).
    pub(super) fn ip_capsules(&mut self, conn: &mut Conn, stream_id: u64) -> bool {
        let Some(entry) = conn.tunnels.get_mut(&stream_id) else { return true };
        if entry.ip.is_none() {
            // Not open yet: the capsules wait (bounded) for the allow.
            return true;
        }
        for (capsule_type, value) in entry.tunnel.take_control() {
            match ipcap::decode(capsule_type, &value) {
                Ok(Some(IpCapsule::AddressRequest(requests))) => {
                    let flow_id = entry.tunnel.flow_id();
                    let Some(t) = entry.ip.as_mut() else { continue };
                    let mut capsules = vec![];
                    let (now, asks) = t.plan_requests(&requests);
                    capsules.push(now);
                    for (request_id, addr) in asks {
                        let asked = flow_id.is_some_and(|flow_id| {
                            self.link.address_ask(AddressAsk { flow_id, request_id, addr }).is_ok()
                        });
                        if !asked {
                            capsules.push(t.on_address_answer(request_id, addr, false));
                        }
                    }
                    for capsule in capsules.iter().filter(|c| !c.is_empty()) {
                        if !entry.tunnel.push_raw_capsule(capsule) {
                            self.count(Counter::DropQueueFull, 1);
                        }
                    }
                }
                // The client's own assignments and routes: valid, unused.
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => {
                    debug!(stream_id, "malformed connect-ip capsule: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Control's answer to an address ask: the tunnel with the flow (a
    /// QUIC one, or one of the TCP front's) sends its new assignment. A
    /// flow that ended meanwhile needs nothing: its FlowClosed, sent after
    /// the ask, releases the lease.
    pub(super) fn on_address_answer(&mut self, a: AddressAnswer) {
        let found = self.conns.iter().find_map(|(key, conn)| {
            conn.tunnels.iter().find(|(_, e)| e.tunnel.flow_id() == Some(a.flow_id)).map(|(s, _)| (key, *s))
        });
        let Some((key, stream_id)) = found else {
            self.with_front(|f, ctx| f.address_answer(ctx, a));
            return;
        };
        let Some(mut conn) = self.take_conn(key) else { return };
        if let Some(entry) = conn.tunnels.get_mut(&stream_id)
            && let Some(t) = entry.ip.as_mut()
        {
            let capsule = t.on_address_answer(a.request_id, a.addr, a.granted);
            if t.source_allowed(a.addr)
                && let Some(ip) = self.ip.as_mut()
            {
                ip.register_address(t, a.addr);
            }
            if !capsule.is_empty() && !entry.tunnel.push_raw_capsule(&capsule) {
                self.count(Counter::DropQueueFull, 1);
            }
        }
        self.put_conn(key, conn);
    }

    /// Control was replaced: the address requests asked of the old one are
    /// refused (it will never answer them).
    pub(super) fn refuse_pending_addresses(&mut self) {
        let waiting: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.tunnels.values().any(|e| e.ip.as_ref().is_some_and(|t| !t.pending.is_empty())))
            .map(|(key, _)| key)
            .collect();
        for key in waiting {
            let Some(mut conn) = self.take_conn(key) else { continue };
            for entry in conn.tunnels.values_mut() {
                if let Some(capsule) = entry.ip.as_mut().and_then(IpTunnel::refuse_pending)
                    && !entry.tunnel.push_raw_capsule(&capsule)
                {
                    self.count(Counter::DropQueueFull, 1);
                }
            }
            self.put_conn(key, conn);
        }
    }

    /// A client's IP packet (context 0) on an open tunnel.
    pub(super) fn ip_up(&mut self, key: ConnKey, stream_id: u64, t: &IpTunnel, packet: &[u8]) {
        let Some(ip) = self.ip.as_mut() else { return };
        if let UpResult::Icmp(icmp) = ip.up(self.link.counters(), t, packet) {
            ip.icmp_down.push((key, stream_id, icmp));
        }
    }

    /// Reads the TUN device (bounded: at most [`TUN_BUDGET`] packets a
    /// turn) and sends each packet down its tunnel; a GSO packet is first
    /// cut into the packets it stands for.
    pub(super) fn read_tun(&mut self) {
        let Some(mut ip) = self.ip.take() else { return };
        let mut buf = std::mem::take(&mut ip.buf);
        let mut segment = std::mem::take(&mut ip.segment);
        let vnet = ip.tun.offloads().vnet_header;
        let (mut drained, mut packets) = (false, 0);
        while packets < TUN_BUDGET {
            let read = ip.tun.read(&mut buf).map(|n| match n {
                None => TunRead::Empty,
                Some(n) => tun::split_read(vnet, &mut buf[..n], &mut segment, |packet| {
                    self.count(Counter::TunPacketsIn, 1);
                    self.ip_down(&mut ip, packet);
                }),
            });
            match read {
                Ok(TunRead::Packets(count)) => {
                    packets += count;
                    if count > 1 {
                        self.count(Counter::TunGsoReads, 1);
                    }
                }
                Ok(TunRead::Malformed(e)) => {
                    debug!("TUN read: {e}");
                    packets += 1;
                    self.count(Counter::DropMalformed, 1);
                }
                Ok(TunRead::Empty) => {
                    drained = true;
                    break;
                }
                // One packet the kernel could not hand over (it is gone):
                // the rest of the queue is still there to read.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EMSGSIZE | libc::EINVAL)) => {
                    debug!("TUN read: {e}");
                    packets += 1;
                    self.count(Counter::DropMalformed, 1);
                }
                Err(e) => {
                    debug!("TUN read: {e}");
                    drained = true;
                    break;
                }
            }
        }
        // Wake-ups are edge-triggered: when the budget ran out, what is
        // still queued is read next turn without one.
        ip.due = !drained;
        ip.buf = buf;
        ip.segment = segment;
        self.ip = Some(ip);
    }

    /// Writes the client packets queued for the TUN device this turn.
    pub(super) fn flush_tun_writes(&mut self) {
        if let Some(ip) = self.ip.as_mut() {
            ip.flush_writes(self.link.counters());
        }
    }

    /// Sends the ICMP errors for clients queued this turn.
    pub(super) fn flush_ip_icmp(&mut self) {
        let Some(ip) = self.ip.as_mut() else { return };
        if ip.icmp_down.is_empty() {
            return;
        }
        let icmp = std::mem::take(&mut ip.icmp_down);
        for (key, stream_id, packet) in icmp {
            if let Some(mut conn) = self.take_conn(key) {
                self.send_down(&mut conn, stream_id, &packet);
                self.count(Counter::IcmpErrorsSent, 1);
                self.put_conn(key, conn);
            }
        }
    }

    /// One packet from the TUN device.
    fn ip_down(&mut self, ip: &mut IpSide, packet: &mut [u8]) {
        let Ok(info) = packet::parse(packet) else {
            self.count(Counter::DropMalformed, 1);
            return;
        };
        let Some(&(key, stream_id)) = ip.by_addr.get(&info.dst) else {
            // An assigned address whose tunnel is gone.
            self.count(Counter::DropNoTunnel, 1);
            return;
        };
        if key & FRONT_OWNER != 0 {
            let conn = key & !FRONT_OWNER;
            let allowed = self.front.as_ref().and_then(|f| f.ip_routes_allow(conn, stream_id as u32, &info));
            match allowed {
                None => {}
                Some(false) => self.link.counters().add(Counter::DropIpOutOfScope, 1),
                // Capsules carry any IP packet (65535 bytes at most).
                Some(true) if ip.prepare_down(self.link.counters(), packet, None) => {
                    let packet: &[u8] = packet;
                    self.with_front(|f, ctx| f.ip_down(ctx, conn, stream_id as u32, packet));
                }
                Some(true) => {}
            }
            return;
        }
        let Some(mut conn) = self.take_conn(key) else { return };
        let allowed = conn
            .tunnels
            .get(&stream_id)
            .and_then(|e| e.ip.as_ref())
            .map(|t| t.routed(info.src, info.protocol));
        match allowed {
            None => {}
            Some(false) => self.link.counters().add(Counter::DropIpOutOfScope, 1),
            Some(true) => self.ip_down_checked(ip, &mut conn, stream_id, packet),
        }
        self.put_conn(key, conn);
    }

    fn ip_down_checked(&mut self, ip: &mut IpSide, conn: &mut Conn, stream_id: u64, packet: &mut [u8]) {
        let room = conn.quic.dgram_max_writable_len().map(|max| max.saturating_sub(DATAGRAM_HEADER_MAX));
        if ip.prepare_down(self.link.counters(), packet, room) {
            self.send_down(conn, stream_id, packet);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::ip::capsule::RequestedAddress;

    fn tunnel() -> IpTunnel {
        let addresses = [
            IpAssignment { addr: "10.89.0.5".parse().unwrap(), len: 32 },
            IpAssignment { addr: "fd89::5".parse().unwrap(), len: 128 },
        ];
        let routes = [IpRoute {
            start: "0.0.0.0".parse().unwrap(),
            end: "255.255.255.255".parse().unwrap(),
            protocol: 0,
        }];
        IpTunnel::from_allow(&addresses, &routes).unwrap()
    }

    fn assigned(capsule: &[u8]) -> Vec<(u64, String)> {
        use relay_proto::capsule::{Capsule, CapsuleDecoder};
        let mut d = CapsuleDecoder::new(4096).keep(&[1, 2, 3]);
        let mut out = Vec::new();
        d.feed(capsule, |c| {
            if let Capsule::Other { capsule_type, value } = c
                && let Ok(Some(IpCapsule::AddressAssign(list))) = ipcap::decode(capsule_type, &value)
            {
                out.extend(list.iter().map(|a| (a.request_id, a.prefix.to_string())));
            }
        })
        .unwrap();
        d.finish().unwrap();
        out
    }

    fn request(id: u64, prefix: &str) -> RequestedAddress {
        RequestedAddress { request_id: id, prefix: prefix.parse().unwrap() }
    }

    #[test]
    fn requests_for_held_or_any_addresses_are_answered_at_once() {
        let mut t = tunnel();
        let (now, asks) =
            t.plan_requests(&[request(1, "0.0.0.0/32"), request(2, "fd89::5/128"), request(3, "::/0")]);
        assert!(asks.is_empty());
        assert_eq!(
            assigned(&now),
            vec![
                (0, "10.89.0.5/32".into()),
                (0, "fd89::5/128".into()),
                (1, "10.89.0.5/32".into()),
                (2, "fd89::5/128".into()),
                (3, "fd89::5/128".into()),
            ]
        );
    }

    #[test]
    fn specific_addresses_are_asked_then_join_the_full_list() {
        let mut t = tunnel();
        let (now, asks) = t.plan_requests(&[request(7, "10.89.0.77/32"), request(8, "10.89.0.0/24")]);
        // A prefix the relay does not hold is refused at once (it assigns
        // single addresses only); the single address goes to control.
        assert_eq!(asks, vec![(7, "10.89.0.77".parse().unwrap())]);
        assert!(assigned(&now).contains(&(8, "0.0.0.0/32".into())), "{:?}", assigned(&now));
        let granted = t.on_address_answer(7, "10.89.0.77".parse().unwrap(), true);
        assert_eq!(
            assigned(&granted),
            vec![(0, "10.89.0.5/32".into()), (0, "fd89::5/128".into()), (7, "10.89.0.77/32".into())]
        );
        assert!(t.source_allowed("10.89.0.77".parse().unwrap()));
        // The family is full now: another specific address is refused at
        // once, one held is still answered.
        let (now, asks) = t.plan_requests(&[request(9, "10.89.0.78/32"), request(10, "10.89.0.77/32")]);
        assert!(asks.is_empty());
        let got = assigned(&now);
        assert!(
            got.contains(&(9, "0.0.0.0/32".into())) && got.contains(&(10, "10.89.0.77/32".into())),
            "{got:?}"
        );
    }

    #[test]
    fn refusals_are_all_zero_and_asks_are_bounded() {
        let mut t = tunnel();
        let requests: Vec<_> = (1..=6).map(|i| request(i, &format!("fd89::{}/128", 100 + i))).collect();
        let (now, asks) = t.plan_requests(&requests);
        assert_eq!(asks.len(), MAX_PENDING_ADDRESS_ASKS);
        let got = assigned(&now);
        assert!(got.contains(&(5, "::/128".into())) && got.contains(&(6, "::/128".into())), "{got:?}");
        let refused = t.on_address_answer(1, "fd89::101".parse().unwrap(), false);
        assert!(assigned(&refused).contains(&(1, "::/128".into())));
        assert!(!t.source_allowed("fd89::101".parse().unwrap()));
        // An answer to nothing asked (or asked again) changes nothing.
        assert!(t.on_address_answer(1, "fd89::101".parse().unwrap(), true).is_empty());
        assert!(t.on_address_answer(99, "fd89::199".parse().unwrap(), true).is_empty());
        assert!(!t.source_allowed("fd89::199".parse().unwrap()));
        // One ask answered: room for one more.
        let (_, asks) = t.plan_requests(&[request(11, "fd89::200/128")]);
        assert_eq!(asks.len(), 1);
        // Control replaced: every waiting request is refused at once.
        let refusals = assigned(&t.refuse_pending().unwrap());
        for id in [2, 3, 4, 11] {
            assert!(refusals.contains(&(id, "::/128".into())), "{id}: {refusals:?}");
        }
        assert!(t.refuse_pending().is_none());
    }
}

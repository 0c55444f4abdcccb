//! A connect-ip tunnel's configuration (RFC 9484): the addresses assigned
//! to the client, the routes it may use, and the planning of its
//! ADDRESS_REQUESTs (section 4.7.2). Sans-IO.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use relay_proto::channel::record::{IpAssignment, IpRoute, MAX_ADDRESSES_PER_FAMILY};
use relay_proto::ip::capsule::{self as ipcap, AssignedAddress, IpAddressRange, IpCapsule, IpPrefix};

use super::probe::MtuProbe;
use crate::tunnel::TunnelId;

/// ICMP (1) and ICMPv6 (58) are always allowed (RFC 9484 section 4.6).
fn is_icmp(protocol: u8) -> bool {
    protocol == 1 || protocol == 58
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
    /// The tunnel in the address map, once registered.
    pub(super) owner: Option<TunnelId>,
    /// Requests for specific addresses waiting for control (request ID,
    /// address).
    pub(super) pending: Vec<(u64, IpAddr)>,
    /// The IPv6 link MTU check (RFC 9484 section 7.2).
    pub(in crate::tunnel) probe: MtuProbe,
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
        Some(Self { addresses, request_ids, routes, owner: None, pending: Vec::new(), probe: MtuProbe::Off })
    }

    /// The client's first IPv6 address, if it has one.
    pub fn ipv6_address(&self) -> Option<std::net::Ipv6Addr> {
        self.addresses.iter().find_map(|p| match p.addr {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
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
    pub fn owner(&self) -> Option<TunnelId> {
        self.owner
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

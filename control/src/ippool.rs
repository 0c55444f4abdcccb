//! Address pools for connect-ip tunnels (RFC 9484 section 4.7.1).
//!
//! Control owns the pools (`[connect_ip] ipv4_pool`, `ipv6_pool`) and
//! decides every assignment. Each dataplane worker serves its own TUN
//! device, and the kernel routes a worker's share of each pool to it, so a
//! pool is cut into equal per-worker subnets (the pool prefix extended by
//! enough bits to number the workers) and a tunnel on worker `w` gets its
//! addresses from subnet `w`. In each subnet the first address is not
//! assigned (IPv4 network address, IPv6 subnet-router anycast), nor the
//! second (the worker's own address on its TUN device, the source of the
//! ICMP errors it sends), nor, for IPv4, the last (broadcast).
//!
//! Leases are kept per flow and returned when the flow closes; a flow
//! reported by a dataplane that outlived a restarted control re-reserves
//! its addresses.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a pool could not be built or an address not assigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The pool prefix is malformed.
    #[error("{0}")]
    BadPrefix(String),
    /// The pool is too small to give each worker a subnet with assignable
    /// addresses.
    #[error("pool {pool} is too small for {workers} workers (each needs a subnet of at least 4 addresses)")]
    TooSmall {
        /// The pool.
        pool: String,
        /// Workers.
        workers: u32,
    },
    /// Every address of the worker's subnet is leased.
    #[error("the {family} pool of worker {worker} is exhausted")]
    Exhausted {
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The worker.
        worker: u32,
    },
    /// The requested address is outside the worker's subnet, reserved, or
    /// leased to another flow.
    #[error("{0} is not available")]
    Unavailable(IpAddr),
    /// No pool of that family is configured.
    #[error("no {0} pool is configured")]
    NoPool(&'static str),
}

/// A prefix as the pools use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    /// The first address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = PoolError;

    /// Parses `192.0.2.0/24` or `fd00::/64`; host bits must be zero.
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let bad = |why: &str| PoolError::BadPrefix(format!("{s:?}: {why}"));
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("expected ADDRESS/LENGTH"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let len: u8 = len.parse().map_err(|_| bad("the length is not a number"))?;
        let bits = family_bits(addr);
        if len > bits {
            return Err(bad("the length exceeds the address"));
        }
        let value = to_u128(addr);
        if value & !mask(len, bits) != 0 {
            return Err(bad("bits beyond the prefix length must be zero"));
        }
        Ok(Prefix { addr, len })
    }
}

fn family_bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 { IpAddr::V4(Ipv4Addr::from(value as u32)) } else { IpAddr::V6(Ipv6Addr::from(value)) }
}

/// The network mask of a `len`-bit prefix in a `bits`-bit family, as a
/// right-aligned u128.
fn mask(len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let all = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    (all >> (bits - len)) << (bits - len)
}

/// One family's pool, cut into per-worker subnets.
#[derive(Debug)]
struct FamilyPool {
    v4: bool,
    pool: Prefix,
    /// Length of each worker's subnet.
    subnet_len: u8,
    /// Per worker: the next offset to try (allocation is round-robin so a
    /// released address is not handed out again at once).
    cursor: Vec<u128>,
    leased: HashSet<u128>,
}

impl FamilyPool {
    fn new(pool: Prefix, workers: u32) -> Result<Self, PoolError> {
        let bits = family_bits(pool.addr);
        let worker_bits = u32::BITS - workers.saturating_sub(1).leading_zeros();
        let subnet_len = u32::from(pool.len) + worker_bits;
        // At least 4 addresses: 2 reserved, 1 broadcast (IPv4), 1 usable.
        if subnet_len + 2 > u32::from(bits) {
            return Err(PoolError::TooSmall { pool: pool.to_string(), workers });
        }
        Ok(Self {
            v4: bits == 32,
            pool,
            subnet_len: subnet_len as u8,
            cursor: vec![0; workers as usize],
            leased: HashSet::new(),
        })
    }

    fn family(&self) -> &'static str {
        if self.v4 { "IPv4" } else { "IPv6" }
    }

    fn subnet(&self, worker: u32) -> Prefix {
        let bits = family_bits(self.pool.addr);
        let base = to_u128(self.pool.addr) | (u128::from(worker) << (bits - self.subnet_len));
        Prefix { addr: from_u128(base, self.v4), len: self.subnet_len }
    }

    /// Host addresses a subnet holds (capped: IPv6 subnets are huge).
    fn subnet_size(&self) -> u128 {
        let host_bits = family_bits(self.pool.addr) - self.subnet_len;
        if host_bits >= 127 { u128::MAX } else { 1u128 << host_bits }
    }

    /// Whether offset `o` of a subnet may be assigned.
    fn assignable(&self, offset: u128) -> bool {
        offset >= 2 && !(self.v4 && offset == self.subnet_size() - 1) && offset < self.subnet_size()
    }

    fn allocate(&mut self, worker: u32) -> Result<IpAddr, PoolError> {
        let base = to_u128(self.subnet(worker).addr);
        let size = self.subnet_size();
        // Bounded scan: at most as many tries as leases + reserved + 1.
        let tries = (self.leased.len() as u128 + 4).min(size);
        let mut offset = self.cursor[worker as usize];
        for _ in 0..tries {
            if !self.assignable(offset) {
                offset = 2;
            }
            let candidate = base + offset;
            offset += 1;
            if !self.leased.contains(&candidate) {
                self.cursor[worker as usize] = offset;
                self.leased.insert(candidate);
                return Ok(from_u128(candidate, self.v4));
            }
        }
        Err(PoolError::Exhausted { family: self.family(), worker })
    }

    fn claim(&mut self, worker: u32, addr: IpAddr) -> Result<(), PoolError> {
        let subnet = self.subnet(worker);
        let value = to_u128(addr);
        let base = to_u128(subnet.addr);
        let inside = value & mask(subnet.len, family_bits(addr)) == base;
        if !inside || !self.assignable(value - base) || !self.leased.insert(value) {
            return Err(PoolError::Unavailable(addr));
        }
        Ok(())
    }

    fn release(&mut self, addr: IpAddr) {
        self.leased.remove(&to_u128(addr));
    }
}

/// The connect-ip address pools.
#[derive(Debug)]
pub struct AddressPools {
    v4: Option<FamilyPool>,
    v6: Option<FamilyPool>,
    leases: HashMap<u64, Vec<IpAddr>>,
}

impl AddressPools {
    /// Pools for `workers` workers; either family may be absent.
    pub fn new(v4: Option<Prefix>, v6: Option<Prefix>, workers: u32) -> Result<Self, PoolError> {
        if v4.is_some_and(|p| !p.addr.is_ipv4()) || v6.is_some_and(|p| !p.addr.is_ipv6()) {
            return Err(PoolError::BadPrefix("ipv4_pool must be IPv4 and ipv6_pool IPv6".into()));
        }
        let workers = workers.max(1);
        Ok(Self {
            v4: v4.map(|p| FamilyPool::new(p, workers)).transpose()?,
            v6: v6.map(|p| FamilyPool::new(p, workers)).transpose()?,
            leases: HashMap::new(),
        })
    }

    /// Worker `w`'s subnets (the routes its TUN device carries) and its own
    /// address in each.
    pub fn worker_subnets(&self, worker: u32) -> Vec<(Prefix, IpAddr)> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .map(|p| {
                let subnet = p.subnet(worker);
                (subnet, from_u128(to_u128(subnet.addr) + 1, p.v4))
            })
            .collect()
    }

    /// Whether any pool is configured.
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }

    /// Leases one address of each configured family to `flow_id` on
    /// `worker`. All or nothing.
    pub fn assign(&mut self, flow_id: u64, worker: u32) -> Result<Vec<IpAddr>, PoolError> {
        let mut got = Vec::new();
        let mut failed = None;
        for pool in [&mut self.v4, &mut self.v6].into_iter().flatten() {
            match pool.allocate(worker) {
                Ok(a) => got.push(a),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for a in got {
                self.release_addr(a);
            }
            return Err(e);
        }
        self.leases.entry(flow_id).or_default().extend(got.iter().copied());
        Ok(got)
    }

    /// Leases `addr` to `flow_id` (a client's ADDRESS_REQUEST for a
    /// specific address, or a reported flow after a control restart).
    pub fn claim(&mut self, flow_id: u64, worker: u32, addr: IpAddr) -> Result<(), PoolError> {
        let pool = if addr.is_ipv4() { &mut self.v4 } else { &mut self.v6 };
        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
        pool.as_mut().ok_or(PoolError::NoPool(family))?.claim(worker, addr)?;
        self.leases.entry(flow_id).or_default().push(addr);
        Ok(())
    }

    /// The addresses leased to `flow_id`.
    pub fn leased_to(&self, flow_id: u64) -> Vec<IpAddr> {
        self.leases.get(&flow_id).cloned().unwrap_or_default()
    }

    /// Gives `addr` back (a lease replaced by a claimed address).
    pub fn release_one(&mut self, flow_id: u64, addr: IpAddr) {
        if let Some(list) = self.leases.get_mut(&flow_id)
            && let Some(i) = list.iter().position(|a| *a == addr)
        {
            list.swap_remove(i);
            self.release_addr(addr);
        }
    }

    /// Returns every address of `flow_id`.
    pub fn release(&mut self, flow_id: u64) {
        for a in self.leases.remove(&flow_id).unwrap_or_default() {
            self.release_addr(a);
        }
    }

    /// Forgets every lease (the dataplane went away with its tunnels).
    pub fn release_all(&mut self) {
        let flows: Vec<u64> = self.leases.keys().copied().collect();
        for f in flows {
            self.release(f);
        }
    }

    /// Leased addresses.
    pub fn leased(&self) -> usize {
        self.leases.values().map(Vec::len).sum()
    }

    fn release_addr(&mut self, addr: IpAddr) {
        let pool = if addr.is_ipv4() { &mut self.v4 } else { &mut self.v6 };
        if let Some(p) = pool {
            p.release(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_parse_strictly() {
        assert_eq!(p("10.89.0.0/24"), Prefix { addr: ip("10.89.0.0"), len: 24 });
        assert!("10.89.0.1/24".parse::<Prefix>().is_err(), "host bits set");
        assert!("10.89.0.0/33".parse::<Prefix>().is_err());
        assert!("10.89.0.0".parse::<Prefix>().is_err());
        assert!("fd89::/64".parse::<Prefix>().is_ok());
        assert!("fd89::1/64".parse::<Prefix>().is_err());
        assert_eq!(mask(24, 32), 0xffff_ff00);
        assert_eq!(mask(0, 32), 0);
        assert_eq!(mask(128, 128), u128::MAX);
        assert_eq!(mask(64, 128), u128::MAX << 64);
    }

    #[test]
    fn workers_get_disjoint_subnets_without_reserved_addresses() {
        let mut pools = AddressPools::new(Some(p("10.89.0.0/24")), Some(p("fd89::/120")), 2).unwrap();
        assert_eq!(
            pools.worker_subnets(1),
            vec![(p("10.89.0.128/25"), ip("10.89.0.129")), (p("fd89::80/121"), ip("fd89::81"))]
        );
        assert_eq!(pools.assign(1, 0).unwrap(), vec![ip("10.89.0.2"), ip("fd89::2")]);
        assert_eq!(pools.assign(2, 1).unwrap(), vec![ip("10.89.0.130"), ip("fd89::82")]);
        // Worker 0's IPv4 subnet has .2 ..= .126 (125 addresses): exhaust it.
        for f in 3..(3 + 124) {
            pools.assign(f, 0).unwrap();
        }
        let err = pools.assign(999, 0).unwrap_err();
        assert_eq!(err, PoolError::Exhausted { family: "IPv4", worker: 0 });
        assert_eq!(pools.leased(), 2 * 126, "a failed assignment leases nothing");
        // Releasing makes room; the broadcast address is never handed out.
        pools.release(1);
        let again = pools.assign(1000, 0).unwrap();
        assert_eq!(again[0], ip("10.89.0.2"));
        assert!(!pools.leases.values().flatten().any(|a| *a == ip("10.89.0.127")));
    }

    #[test]
    fn specific_addresses_are_claimed_only_when_free_and_in_the_subnet() {
        let mut pools = AddressPools::new(Some(p("10.89.0.0/24")), None, 2).unwrap();
        pools.claim(1, 0, ip("10.89.0.50")).unwrap();
        assert_eq!(pools.claim(2, 0, ip("10.89.0.50")), Err(PoolError::Unavailable(ip("10.89.0.50"))));
        assert!(pools.claim(2, 0, ip("10.89.0.200")).is_err(), "worker 1's subnet");
        assert!(pools.claim(2, 0, ip("10.89.0.1")).is_err(), "the worker's own address");
        assert!(pools.claim(2, 0, ip("10.89.0.0")).is_err());
        assert_eq!(pools.claim(2, 0, ip("fd89::5")), Err(PoolError::NoPool("IPv6")));
        pools.release_one(1, ip("10.89.0.50"));
        pools.claim(2, 0, ip("10.89.0.50")).unwrap();
        pools.release_all();
        assert_eq!(pools.leased(), 0);
    }

    #[test]
    fn pools_too_small_or_of_the_wrong_family_are_refused() {
        assert!(matches!(
            AddressPools::new(Some(p("10.0.0.0/30")), None, 2),
            Err(PoolError::TooSmall { .. })
        ));
        assert!(AddressPools::new(Some(p("10.0.0.0/29")), None, 2).is_ok());
        assert!(AddressPools::new(Some(p("fd00::/64")), None, 1).is_err());
        // Three workers round up to four subnets.
        let pools = AddressPools::new(Some(p("10.0.0.0/24")), None, 3).unwrap();
        assert_eq!(pools.worker_subnets(2)[0].0, p("10.0.0.128/26"));
    }
}

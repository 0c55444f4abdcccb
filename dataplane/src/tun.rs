//! A worker's TUN device (connect-ip, RFC 9484).
//!
//! Each worker owns one TUN device, `<prefix><worker>`, holding the worker's
//! own address in each of its pool subnets: the kernel then routes the
//! subnet (the addresses control assigns to this worker's clients) to it,
//! so packets for a tunnel reach the worker that serves it without any
//! hand-off. The device is created when the dataplane starts and vanishes
//! when it exits (it is not persistent). Packets are read and written
//! whole, one per system call, without the packet-information header.
//!
//! Creating the device and its addresses needs CAP_NET_ADMIN; the host's
//! forwarding and NAT for the pools are the operator's (deploy/).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::process::Command;

use relay_proto::channel::bootstrap::WorkerSubnet;
use tun_tap::{Iface, Mode};

/// Why a TUN device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The device could not be created (no CAP_NET_ADMIN, no /dev/net/tun).
    #[error(
        "creating TUN device {name}: {source} (the dataplane needs CAP_NET_ADMIN and /dev/net/tun for connect-ip)"
    )]
    Open {
        /// The device name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// Configuring it with `ip` failed.
    #[error("configuring TUN device {name}: `ip {args}` failed: {why}")]
    Configure {
        /// The device name.
        name: String,
        /// The arguments.
        args: String,
        /// What went wrong.
        why: String,
    },
    /// A subnet from control is malformed.
    #[error("invalid subnet {0:?} from control")]
    Subnet(String),
}

/// A worker's TUN device.
#[derive(Debug)]
pub struct WorkerTun {
    iface: Iface,
    name: String,
    own: Vec<IpAddr>,
}

fn ip_command(name: &str, args: &[&str]) -> Result<(), TunError> {
    let shown = args.join(" ");
    let out = Command::new("ip").args(args).output().map_err(|e| TunError::Configure {
        name: name.to_string(),
        args: shown.clone(),
        why: format!("{e} (is iproute2 installed?)"),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunError::Configure {
            name: name.to_string(),
            args: shown,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl WorkerTun {
    /// Creates `name` with MTU `mtu`, its own address in each subnet, and
    /// brings it up.
    pub fn create(name: &str, subnets: &[WorkerSubnet], mtu: u32) -> Result<Self, TunError> {
        let iface = Iface::without_packet_info(name, Mode::Tun)
            .map_err(|source| TunError::Open { name: name.to_string(), source })?;
        iface.set_non_blocking().map_err(|source| TunError::Open { name: name.to_string(), source })?;
        let mtu = mtu.to_string();
        ip_command(name, &["link", "set", "dev", name, "mtu", &mtu, "up"])?;
        let mut own = Vec::new();
        for s in subnets {
            let (_, len) = s.prefix.split_once('/').ok_or_else(|| TunError::Subnet(s.prefix.clone()))?;
            let addr: IpAddr = s.own.parse().map_err(|_| TunError::Subnet(s.own.clone()))?;
            let with_len = format!("{addr}/{len}");
            if addr.is_ipv4() {
                ip_command(name, &["addr", "replace", &with_len, "dev", name])?;
            } else {
                // No duplicate address detection: the link is ours alone.
                ip_command(name, &["-6", "addr", "replace", &with_len, "dev", name, "nodad"])?;
            }
            own.push(addr);
        }
        Ok(Self { iface, name: name.to_string(), own })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The worker's own address of `ip`'s family (the source of its ICMP
    /// errors).
    pub fn own_address(&self, v4: bool) -> Option<IpAddr> {
        self.own.iter().copied().find(|a| a.is_ipv4() == v4)
    }

    /// Reads one packet; `None` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.iface.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one packet towards the kernel (which routes it on).
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        self.iface.send(packet).map(|_| ())
    }
}

impl AsRawFd for WorkerTun {
    fn as_raw_fd(&self) -> RawFd {
        self.iface.as_raw_fd()
    }
}

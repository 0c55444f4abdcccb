//! A worker's TUN device (connect-ip, RFC 9484).
//!
//! Each worker owns one TUN device, `<prefix><worker>`, holding the worker's
//! own address in each of its pool subnets: the kernel then routes the
//! subnet (the addresses control assigns to this worker's clients) to it,
//! so packets for a tunnel reach the worker that serves it without any
//! hand-off. The device is created when the dataplane starts and vanishes
//! when it exits (it is not persistent).
//!
//! With offloads on (the default, little-endian hosts), the device is
//! opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (checksum, TSO for IPv4
//! and IPv6, and USO where the kernel has it, 6.2+): every packet carries a
//! virtio-net header, one read can carry a GSO packet of up to 64 KiB that
//! [`relay_proto::ip::offload::split`] cuts into the packets it stands
//! for, and one write can carry a run of TCP segments coalesced by
//! [`relay_proto::ip::offload::coalesce`]. Without them, packets are read
//! and written whole, one per system call. Either way there is no
//! packet-information header. The device is set up with our own ioctls
//! because `tun-tap` cannot ask for `IFF_VNET_HDR`.
//!
//! Creating the device and its addresses needs CAP_NET_ADMIN; the host's
//! forwarding and NAT for the pools are the operator's (deploy/).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

use relay_proto::channel::bootstrap::WorkerSubnet;
use relay_proto::ip::offload::{self, OffloadError, TunWrite, VNET_HDR_LEN, VnetHeader};
use tracing::info;

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

/// The offloads a device was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    /// Packets carry a virtio-net header.
    pub vnet_header: bool,
    /// The kernel may hand over TCP GSO packets (TUN_F_TSO4/6) and partial
    /// checksums (TUN_F_CSUM).
    pub tso: bool,
    /// The kernel may hand over UDP GSO packets (TUN_F_USO4/6).
    pub uso: bool,
}

impl std::fmt::Display for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.vnet_header, self.tso, self.uso) {
            (false, ..) => f.write_str("none"),
            (true, false, _) => f.write_str("vnet header only"),
            (true, true, false) => f.write_str("csum,tso4,tso6"),
            (true, true, true) => f.write_str("csum,tso4,tso6,uso4,uso6"),
        }
    }
}

/// An open TUN device (non-blocking, no packet information), with the
/// offloads the kernel granted. The dataplane's workers and the bench's
/// connect-ip client both use it.
#[derive(Debug)]
pub struct TunDevice {
    fd: OwnedFd,
    offloads: Offloads,
}

/// What one [`TunDevice::read_packets`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunRead {
    /// Nothing was waiting.
    Empty,
    /// This many packets were handed over (more than one: a GSO packet).
    Packets(usize),
    /// A read the offload code could not split (dropped).
    Malformed(OffloadError),
}

/// A worker's TUN device.
#[derive(Debug)]
pub struct WorkerTun {
    dev: TunDevice,
    name: String,
    own: Vec<IpAddr>,
}

/// What the worker's core knows of its TUN device (the backend owns the
/// device itself and does its I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunInfo {
    /// The device name.
    pub name: String,
    /// The worker's own addresses on it (the sources of its ICMP errors).
    pub own: Vec<IpAddr>,
    /// The offloads it was opened with.
    pub offloads: Offloads,
}

impl TunInfo {
    /// The worker's own address of a family.
    pub fn own_address(&self, v4: bool) -> Option<IpAddr> {
        self.own.iter().copied().find(|a| a.is_ipv4() == v4)
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to the TUN device `name` (created
/// if missing), non-blocking, without packet information, with the
/// virtio-net header if `vnet_header`.
fn open_device(name: &str, vnet_header: bool) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "device names are 1..=15 bytes"));
    }
    // SAFETY: the path is a NUL-terminated C string literal; open has no
    // other preconditions.
    let raw =
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReqFlags { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet_header {
        flags |= libc::IFF_VNET_HDR;
    }
    req.flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its
    // layout (16-byte name, then the flags in a 24-byte union) and lives
    // across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReqFlags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Asks for the offloads on a device opened with the virtio-net header:
/// the header size (10 bytes, without `num_buffers`), then checksum + TSO
/// + USO, or checksum + TSO on kernels without USO.
fn enable_offloads(fd: &OwnedFd) -> io::Result<Offloads> {
    let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which
    // points to `size` for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(tso | uso)) } == 0 {
        return Ok(Offloads { vnet_header: true, tso: true, uso: true });
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(tso)) } == 0 {
        return Ok(Offloads { vnet_header: true, tso: true, uso: false });
    }
    Ok(Offloads { vnet_header: true, tso: false, uso: false })
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
    /// brings it up; with the offloads the kernel grants if `offload`.
    pub fn create(name: &str, subnets: &[WorkerSubnet], mtu: u32, offload: bool) -> Result<Self, TunError> {
        let dev = TunDevice::open(name, offload)
            .map_err(|source| TunError::Open { name: name.to_string(), source })?;
        info!(device = name, offloads = %dev.offloads(), "TUN offloads");
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
        Ok(Self { dev, name: name.to_string(), own })
    }

    /// The device.
    pub fn device(&self) -> &TunDevice {
        &self.dev
    }

    /// The device (for the backend) and what the core needs to know of it.
    pub fn into_parts(self) -> (TunDevice, TunInfo) {
        let info = TunInfo { name: self.name, own: self.own, offloads: self.dev.offloads };
        (self.dev, info)
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

    /// The offloads in use.
    pub fn offloads(&self) -> Offloads {
        self.dev.offloads
    }

    /// See [`TunDevice::write`].
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        self.dev.write(packet)
    }

    /// See [`TunDevice::write_planned`].
    pub fn write_planned(&self, planned: &TunWrite<'_>) -> io::Result<()> {
        self.dev.write_planned(planned)
    }

    /// See [`TunDevice::read`].
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.dev.read(buf)
    }
}

impl TunDevice {
    /// Attaches to TUN device `name` (created if missing); with the
    /// offloads the kernel grants if `offload` (little-endian hosts only:
    /// the legacy virtio-net header is in the host's byte order).
    pub fn open(name: &str, offload: bool) -> io::Result<Self> {
        if offload && cfg!(target_endian = "little") {
            let fd = open_device(name, true)?;
            let offloads = enable_offloads(&fd)?;
            Ok(Self { fd, offloads })
        } else {
            Ok(Self { fd: open_device(name, false)?, offloads: Offloads::default() })
        }
    }

    /// Reads once and hands each IP packet the read carried to `emit`, in
    /// order: the packet itself, or with the virtio-net header the packets
    /// a GSO packet stands for (cut in `segment`, 64 KiB). `buf` takes one
    /// read (64 KiB and the header).
    pub fn read_packets(
        &self,
        buf: &mut [u8],
        segment: &mut [u8],
        mut emit: impl FnMut(&mut [u8]),
    ) -> io::Result<TunRead> {
        let Some(n) = self.read(buf)? else { return Ok(TunRead::Empty) };
        Ok(split_read(self.offloads.vnet_header, &mut buf[..n], segment, &mut emit))
    }

    /// The offloads in use.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Reads one packet (after its virtio-net header when the device has
    /// one); `None` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            e => Err(e),
        }
    }

    /// Writes one packet towards the kernel (which routes it on), behind a
    /// plain virtio-net header when the device has one.
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        if !self.offloads.vnet_header {
            // SAFETY: `packet` is valid for reads of its length.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            return if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
        }
        let header = VnetHeader::PLAIN.encode();
        self.writev(&[&header, packet])
    }

    /// Writes what [`relay_proto::ip::offload::coalesce`] planned (only on
    /// a device with the virtio-net header).
    pub fn write_planned(&self, planned: &TunWrite<'_>) -> io::Result<()> {
        debug_assert!(self.offloads.vnet_header);
        let header = planned.header.encode();
        let mut pieces: [&[u8]; MAX_PIECES] = [&[]; MAX_PIECES];
        pieces[0] = &header;
        let mut n = 1;
        for piece in planned.pieces() {
            if n == MAX_PIECES {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many pieces for one TUN write"));
            }
            pieces[n] = piece;
            n += 1;
        }
        self.writev(&pieces[..n])
    }

    fn writev(&self, pieces: &[&[u8]]) -> io::Result<()> {
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_PIECES];
        for (v, p) in iov.iter_mut().zip(pieces) {
            *v = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() };
        }
        let count = pieces.len().min(MAX_PIECES);
        // SAFETY: the first `count` iovecs point into slices that outlive
        // the call; writev only reads through them.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count as libc::c_int) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// Hands each IP packet one TUN read carried to `emit` (see
/// [`TunDevice::read_packets`]); `vnet_header` says whether the device has
/// the virtio-net header.
pub fn split_read(
    vnet_header: bool,
    read: &mut [u8],
    segment: &mut [u8],
    mut emit: impl FnMut(&mut [u8]),
) -> TunRead {
    if !vnet_header {
        emit(read);
        return TunRead::Packets(1);
    }
    let split = VnetHeader::decode(read)
        .and_then(|header| offload::split(&header, &mut read[VNET_HDR_LEN..], segment, &mut emit));
    match split {
        Ok(count) => TunRead::Packets(count),
        Err(e) => TunRead::Malformed(e),
    }
}

/// Pieces of one TUN write at most: the virtio-net header, the rewritten
/// headers and one payload per coalesced packet.
const MAX_PIECES: usize = relay_proto::ip::offload::MAX_COALESCED + 2;

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for WorkerTun {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

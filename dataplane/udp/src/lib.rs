//! UDP segmentation offload (Linux).
//!
//! * **GSO** (`UDP_SEGMENT`): one `sendmsg` carries up to [`MAX_SEGMENTS`]
//!   datagrams of equal size (the last may be shorter) to one destination;
//!   the kernel splits them. Following quinn-udp, the segment size is set
//!   per send by a control message, only when the buffer holds more than
//!   one segment, and a send that fails with `EIO` or `EINVAL` (a device
//!   without checksum offload) disables GSO and is retried one datagram at
//!   a time.
//! * **GRO** (`UDP_GRO`): one `recvmsg` may return several datagrams from
//!   the same sender glued together; the control message gives the stride
//!   to split them by.
//!
//! [`SegmentBatcher`] coalesces consecutive datagrams to the same
//! destination into GSO batches.
#![allow(unsafe_code)]

pub mod mmsg;
pub mod steer;
pub mod uring;

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::SockAddr;

/// Most segments the kernel accepts in one GSO send (UDP_MAX_SEGMENTS).
pub const MAX_SEGMENTS: usize = 64;
/// Largest buffer a GRO receive can fill.
pub const MAX_GRO_BUFFER: usize = 65_535;
/// Most payload bytes one GSO send may carry: the whole batch is one UDP
/// datagram to the kernel, so it is bound by the IPv4 limit (65535 minus
/// 20 bytes of IP and 8 of UDP header); more fails with EMSGSIZE.
pub const MAX_GSO_BYTES: usize = 65_507;

pub(crate) const SOL_UDP: libc::c_int = 17;
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
pub(crate) const UDP_GRO: libc::c_int = 104;

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Whether the kernel supports UDP_SEGMENT on this socket's family.
pub fn gso_supported(sock: &impl AsRawFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live int with its exact size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            SOL_UDP,
            UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0
}

/// Turns on GRO for `sock`; `Ok(false)` if the kernel does not support it.
pub fn enable_gro(sock: &impl AsRawFd) -> io::Result<bool> {
    match setsockopt_int(sock.as_raw_fd(), SOL_UDP, UDP_GRO, 1) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT) | Some(libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sends `buf` as datagrams of `segment_size` bytes (the last may be
/// shorter) in one system call. `dest` is `None` on a connected socket.
/// With `segment_size >= buf.len()` this is a plain send.
pub fn send_segments(
    sock: &impl AsRawFd,
    buf: &[u8],
    segment_size: usize,
    dest: Option<&SockAddr>,
) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
    // SAFETY: msghdr is plain old data; zeroed is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(d) = dest {
        msg.msg_name = d.as_ptr() as *mut _;
        msg.msg_namelen = d.len();
    }
    let mut control = [0u64; 4];
    if segment_size < buf.len() {
        let seg = u16::try_from(segment_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is 32 aligned bytes, enough for one
        // cmsghdr with a u16 payload (space computed above).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg);
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One GRO receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes received.
    pub len: usize,
    /// The sender.
    pub from: SocketAddr,
    /// Stride of the glued datagrams (`len` when there is one).
    pub segment_size: usize,
}

impl Received {
    /// Number of datagrams in the buffer.
    pub fn segments(&self) -> usize {
        if self.segment_size == 0 { 1 } else { self.len.div_ceil(self.segment_size) }
    }
}

/// Receives one (possibly GRO-coalesced) buffer.
pub fn recv_segments(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut addr = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain old data; zeroed is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_name = addr.as_mut_ptr().cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: msg points at live, writable buffers for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut segment_size = n;
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros stay within it, and a UDP_GRO payload is an int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let stride = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if stride > 0 {
                    segment_size = stride as usize;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // SAFETY: the storage was zero-initialised and the kernel wrote the
    // sender's address into it.
    let storage = unsafe { addr.assume_init() };
    let from = sockaddr_to_std(&storage)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP sender"))?;
    Ok(Received { len: n, from, segment_size })
}

/// Converts a kernel socket address to a `SocketAddr`.
fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // is smaller than sockaddr_storage and has compatible alignment.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Coalesces datagrams into GSO sends: consecutive datagrams to the same
/// destination with the same size (the last may be shorter) share one
/// system call.
pub struct SegmentBatcher {
    buf: Vec<u8>,
    dest: Option<SocketAddr>,
    segment_size: usize,
    segments: usize,
    closed: bool,
    gso: &'static AtomicBool,
    /// System calls made.
    pub syscalls: u64,
    /// Datagrams sent.
    pub datagrams: u64,
    /// Datagrams the kernel refused (e.g. full buffer): dropped.
    pub dropped: u64,
}

/// Process-wide GSO switch: cleared the first time the kernel or device
/// refuses a segmented send.
pub static GSO_ENABLED: AtomicBool = AtomicBool::new(true);

impl SegmentBatcher {
    /// A batcher with room for [`MAX_SEGMENTS`] datagrams of up to
    /// `max_datagram` bytes.
    pub fn new(max_datagram: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max_datagram * MAX_SEGMENTS),
            dest: None,
            segment_size: 0,
            segments: 0,
            closed: false,
            gso: &GSO_ENABLED,
            syscalls: 0,
            datagrams: 0,
            dropped: 0,
        }
    }

    /// Adds a datagram for `dest`, flushing first if it cannot join the
    /// current batch. Errors other than a full socket buffer are returned.
    pub fn push(&mut self, sock: &impl AsRawFd, dest: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        let fits = self.dest == Some(dest)
            && !self.closed
            && self.segments < MAX_SEGMENTS
            && datagram.len() <= self.segment_size
            && self.buf.len() + datagram.len() <= MAX_GSO_BYTES
            && self.gso.load(Ordering::Relaxed);
        if !fits {
            self.flush(sock)?;
            self.dest = Some(dest);
            self.segment_size = datagram.len();
        }
        self.buf.extend_from_slice(datagram);
        self.segments += 1;
        // A shorter datagram ends the batch: GSO allows it only last.
        if datagram.len() < self.segment_size {
            self.closed = true;
        }
        Ok(())
    }

    /// Sends what is batched.
    pub fn flush(&mut self, sock: &impl AsRawFd) -> io::Result<()> {
        let Some(dest) = self.dest.take() else { return Ok(()) };
        let addr = SockAddr::from(dest);
        let result = if self.segments > 1 {
            self.syscalls += 1;
            match send_segments(sock, &self.buf, self.segment_size, Some(&addr)) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                    self.gso.store(false, Ordering::Relaxed);
                    self.send_one_by_one(sock, &addr)
                }
                other => other.map(|_| ()),
            }
        } else {
            self.syscalls += 1;
            send_segments(sock, &self.buf, self.buf.len(), Some(&addr)).map(|_| ())
        };
        let segments = self.segments as u64;
        self.buf.clear();
        self.segments = 0;
        self.closed = false;
        match result {
            Ok(()) => {
                self.datagrams += segments;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS) => {
                self.dropped += segments;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn send_one_by_one(&mut self, sock: &impl AsRawFd, addr: &SockAddr) -> io::Result<()> {
        for chunk in self.buf.chunks(self.segment_size) {
            self.syscalls += 1;
            send_segments(sock, chunk, chunk.len(), Some(addr))?;
        }
        Ok(())
    }
}

/// Splits a GRO buffer into its datagrams.
pub fn split(buf: &[u8], segment_size: usize) -> impl Iterator<Item = &[u8]> {
    buf.chunks(segment_size.max(1))
}

// Atomic use is process-wide; `Ordering` is re-exported for callers that
// want to read the switch.
#[doc(hidden)]
pub fn gso_enabled() -> bool {
    GSO_ENABLED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (a, b)
    }

    /// GSO and GRO are kernel features; on loopback both have existed since
    /// Linux 5.0. This test fails, not skips, if they are missing, so CI
    /// notices a kernel that cannot run the fast path.
    #[test]
    fn gso_send_is_split_by_the_kernel_and_gro_glues_it_back() {
        let (a, b) = pair();
        assert!(gso_supported(&a), "kernel lacks UDP_SEGMENT");
        assert!(enable_gro(&b).unwrap(), "kernel lacks UDP_GRO");
        let mut buf = Vec::new();
        for i in 0..10u8 {
            buf.extend(std::iter::repeat_n(i, 1000));
        }
        buf.extend(std::iter::repeat_n(99u8, 300)); // short last segment
        let dest = SockAddr::from(b.local_addr().unwrap());
        assert_eq!(send_segments(&a, &buf, 1000, Some(&dest)).unwrap(), buf.len());
        let mut got = Vec::new();
        let mut rbuf = vec![0u8; MAX_GRO_BUFFER];
        let mut coalesced = 0;
        while got.len() < 11 {
            let r = recv_segments(&b, &mut rbuf).unwrap();
            assert_eq!(r.from, a.local_addr().unwrap());
            if r.segments() > 1 {
                coalesced += 1;
            }
            got.extend(split(&rbuf[..r.len], r.segment_size).map(<[u8]>::to_vec));
        }
        assert_eq!(got.len(), 11);
        for (i, d) in got.iter().take(10).enumerate() {
            assert_eq!(d, &vec![i as u8; 1000]);
        }
        assert_eq!(got[10], vec![99u8; 300]);
        assert!(coalesced > 0, "GRO coalesced nothing: segments did not really travel as a batch");
    }

    #[test]
    fn batcher_splits_at_the_size_limit_and_counts_everything() {
        let (a, b) = pair();
        let mut batch = SegmentBatcher::new(1200);
        let dest = b.local_addr().unwrap();
        for _ in 0..100 {
            batch.push(&a, dest, &[7u8; 1200]).unwrap();
        }
        batch.flush(&a).unwrap();
        // 65507 / 1200 = 54 segments fit one send: 54 + 46.
        assert_eq!(batch.datagrams + batch.dropped, 100);
        assert_eq!(batch.syscalls, 2);
        let mut rbuf = [0u8; 2048];
        let mut got = 0;
        while got < batch.datagrams {
            b.recv_from(&mut rbuf).unwrap();
            got += 1;
        }
    }

    /// 48 full QUIC packets (64800 bytes) plus a short one that still fits
    /// 65535 but not the 65507-byte UDP limit: the batcher must split it
    /// rather than hand the kernel an oversize send (EMSGSIZE).
    #[test]
    fn batcher_respects_the_udp_size_limit() {
        let (a, b) = pair();
        let mut batch = SegmentBatcher::new(1350);
        let dest = b.local_addr().unwrap();
        for _ in 0..48 {
            batch.push(&a, dest, &[1u8; 1350]).unwrap();
        }
        batch.push(&a, dest, &[2u8; 720]).unwrap();
        batch.flush(&a).expect("no EMSGSIZE");
        assert_eq!(batch.datagrams + batch.dropped, 49);
        assert_eq!(batch.syscalls, 2);
    }

    #[test]
    fn batcher_coalesces_per_destination() {
        let (a, b) = pair();
        let (_, c) = pair();
        let mut batch = SegmentBatcher::new(1500);
        let (db, dc) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        for _ in 0..5 {
            batch.push(&a, db, &[1u8; 500]).unwrap();
        }
        batch.push(&a, db, &[2u8; 100]).unwrap(); // short: closes the batch
        batch.push(&a, db, &[3u8; 500]).unwrap(); // new batch
        batch.push(&a, dc, &[4u8; 500]).unwrap(); // new destination
        batch.flush(&a).unwrap();
        assert_eq!(batch.datagrams, 8);
        assert_eq!(batch.syscalls, 3);
        let mut rbuf = [0u8; 2048];
        let mut sizes = Vec::new();
        for _ in 0..7 {
            let (n, _) = b.recv_from(&mut rbuf).unwrap();
            sizes.push(n);
        }
        assert_eq!(sizes, vec![500, 500, 500, 500, 500, 100, 500]);
        let (n, _) = c.recv_from(&mut rbuf).unwrap();
        assert_eq!(n, 500);
    }
}

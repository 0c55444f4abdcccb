//! Batched system calls for the epoll backend: `recvmmsg` of several GRO
//! buffers at once, and `sendmmsg` of several GSO batches to different
//! destinations at once.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use socket2::SockAddr;

use crate::{
    GSO_ENABLED, MAX_GRO_BUFFER, Received, SOL_UDP, UDP_GRO, UDP_SEGMENT, send_segments, sockaddr_to_std,
};

/// GRO buffers filled by one `recvmmsg`.
pub const RECV_MESSAGES: usize = 8;
/// Batches sent by one `sendmmsg`.
pub const SEND_MESSAGES: usize = 16;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    len: usize,
    controllen: usize,
    flags: i32,
}

/// Buffers for [`RecvBatch::recv`]: [`RECV_MESSAGES`] GRO buffers with
/// their sender addresses and control messages. Holds no pointers between
/// calls (the message headers are built on the stack for each call), so it
/// can move to the worker thread that uses it.
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 8]>,
    slots: [Slot; RECV_MESSAGES],
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// One received message of a [`RecvBatch`].
pub enum Message<'a> {
    /// Datagrams (GRO: `segment_size`-byte datagrams back to back).
    Data(Received, &'a mut [u8]),
    /// The datagram did not fit the buffer (MSG_TRUNC): dropped.
    Truncated,
}

impl RecvBatch {
    /// Allocates the buffers.
    pub fn new() -> Self {
        // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![0; RECV_MESSAGES * MAX_GRO_BUFFER],
            addrs: vec![zero_addr; RECV_MESSAGES],
            controls: vec![[0; 8]; RECV_MESSAGES],
            slots: [Slot::default(); RECV_MESSAGES],
            count: 0,
        }
    }

    /// One `recvmmsg` without blocking; returns the number of messages
    /// (`WouldBlock` when there are none).
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        // SAFETY: mmsghdr and iovec are plain old data; zeroed is valid.
        let mut hdrs: [libc::mmsghdr; RECV_MESSAGES] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; RECV_MESSAGES] = unsafe { std::mem::zeroed() };
        for i in 0..RECV_MESSAGES {
            iovs[i].iov_base = self.bufs[i * MAX_GRO_BUFFER..].as_mut_ptr().cast();
            iovs[i].iov_len = MAX_GRO_BUFFER;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_control = self.controls[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<[u64; 8]>();
        }
        let n = loop {
            // SAFETY: every header points at live buffers owned by `self`
            // or by this stack frame, sized as declared, for the call.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    RECV_MESSAGES as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                self.count = 0;
                return Err(e);
            }
        };
        for (slot, h) in self.slots.iter_mut().zip(hdrs.iter()).take(n) {
            *slot = Slot {
                len: h.msg_len as usize,
                controllen: h.msg_hdr.msg_controllen,
                flags: h.msg_hdr.msg_flags,
            };
        }
        self.count = n;
        Ok(n)
    }

    /// Message `i` of the last [`RecvBatch::recv`] (`i` < its result).
    pub fn message(&mut self, i: usize) -> Option<Message<'_>> {
        if i >= self.count {
            return None;
        }
        let slot = self.slots[i];
        if slot.flags & libc::MSG_TRUNC != 0 {
            return Some(Message::Truncated);
        }
        let len = slot.len.min(MAX_GRO_BUFFER);
        let segment_size = gro_stride(&mut self.controls[i], slot.controllen).unwrap_or(len);
        let from = sockaddr_to_std(&self.addrs[i]).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let buf = &mut self.bufs[i * MAX_GRO_BUFFER..i * MAX_GRO_BUFFER + len];
        Some(Message::Data(Received { len, from, segment_size }, buf))
    }
}

/// Reads the UDP_GRO stride from a control buffer the kernel filled.
fn gro_stride(control: &mut [u64; 8], controllen: usize) -> Option<usize> {
    // SAFETY: msghdr is plain old data; zeroed is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = controllen.min(std::mem::size_of::<[u64; 8]>());
    let mut stride = None;
    // SAFETY: the CMSG macros only walk within msg_control/msg_controllen,
    // which the kernel filled; a UDP_GRO payload is an int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if v > 0 {
                    stride = Some(v as usize);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    stride
}

/// A GSO batch for [`send_batches`].
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Datagrams back to back.
    pub buf: &'a [u8],
    /// Destination.
    pub to: SocketAddr,
    /// Size of every datagram but the last.
    pub segment_size: usize,
    /// Number of datagrams.
    pub segments: usize,
}

/// What [`send_batches`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// System calls made.
    pub syscalls: u64,
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams refused (full buffer, unreachable, too big): dropped.
    pub dropped: u64,
    /// The error of the last refused send, if any (e.g. ECONNREFUSED on a
    /// connected socket after an ICMP Destination Unreachable).
    pub last_errno: Option<i32>,
}

/// Whether a failed GSO send means the device cannot segment (quinn-udp:
/// EIO or EINVAL): GSO is switched off for good and the batch is resent
/// one datagram at a time.
pub fn is_gso_refusal(e: &io::Error, segments: usize) -> bool {
    segments > 1 && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
}

/// Sends a batch one datagram at a time (after a GSO refusal).
pub fn send_singly(
    sock: &impl AsRawFd,
    buf: &[u8],
    segment_size: usize,
    to: Option<&SockAddr>,
) -> SendReport {
    let mut report = SendReport::default();
    for chunk in buf.chunks(segment_size.max(1)) {
        report.syscalls += 1;
        match send_segments(sock, chunk, chunk.len(), to) {
            Ok(_) => report.sent += 1,
            Err(e) => {
                report.dropped += 1;
                report.last_errno = e.raw_os_error();
            }
        }
    }
    report
}

/// Sends one GSO batch on a connected socket, falling back to single
/// datagrams if the device refuses segmentation.
pub fn send_connected(sock: &impl AsRawFd, buf: &[u8], segment_size: usize, segments: usize) -> SendReport {
    let seg = if segments > 1 { segment_size } else { buf.len() };
    match send_segments(sock, buf, seg.max(1), None) {
        Ok(_) => SendReport { syscalls: 1, sent: segments as u64, dropped: 0, last_errno: None },
        Err(e) if is_gso_refusal(&e, segments) => {
            GSO_ENABLED.store(false, Ordering::Relaxed);
            let mut r = send_singly(sock, buf, segment_size, None);
            r.syscalls += 1;
            r
        }
        Err(e) => SendReport { syscalls: 1, sent: 0, dropped: segments as u64, last_errno: e.raw_os_error() },
    }
}

/// Sends GSO batches to their destinations with as few `sendmmsg` calls as
/// possible ([`SEND_MESSAGES`] batches each). A batch the kernel refuses is
/// dropped (counted) and the rest still go out.
pub fn send_batches(sock: &impl AsRawFd, batches: &[Batch<'_>]) -> SendReport {
    let mut report = SendReport::default();
    let mut next = 0;
    while next < batches.len() {
        let chunk = &batches[next..batches.len().min(next + SEND_MESSAGES)];
        let (sent, err) = sendmmsg_once(sock, chunk);
        report.syscalls += 1;
        for b in &chunk[..sent] {
            report.sent += b.segments as u64;
        }
        next += sent;
        if let Some(e) = err {
            // The batch at `next` failed: handle it alone and go on.
            let b = batches[next];
            if is_gso_refusal(&e, b.segments) {
                GSO_ENABLED.store(false, Ordering::Relaxed);
                let r = send_singly(sock, b.buf, b.segment_size, Some(&SockAddr::from(b.to)));
                report.syscalls += r.syscalls;
                report.sent += r.sent;
                report.dropped += r.dropped;
            } else {
                report.dropped += b.segments as u64;
            }
            next += 1;
        }
    }
    report
}

/// One `sendmmsg`: returns how many batches the kernel took and, if it
/// took none, the error of the first batch. (When it stops early after
/// taking some, the caller's next call starts at the batch it stopped at
/// and learns that batch's error.)
fn sendmmsg_once(sock: &impl AsRawFd, batches: &[Batch<'_>]) -> (usize, Option<io::Error>) {
    let n = batches.len().min(SEND_MESSAGES);
    // SAFETY: plain old data; zeroed is valid.
    let mut hdrs: [libc::mmsghdr; SEND_MESSAGES] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; SEND_MESSAGES] = unsafe { std::mem::zeroed() };
    let mut controls = [[0u64; 4]; SEND_MESSAGES];
    let addrs: [SockAddr; SEND_MESSAGES] = std::array::from_fn(|i| {
        SockAddr::from(batches.get(i).map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |b| b.to))
    });
    for i in 0..n {
        let b = &batches[i];
        iovs[i].iov_base = b.buf.as_ptr() as *mut _;
        iovs[i].iov_len = b.buf.len();
        let h = &mut hdrs[i].msg_hdr;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_name = addrs[i].as_ptr() as *mut _;
        h.msg_namelen = addrs[i].len();
        if b.segments > 1 {
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
            h.msg_control = controls[i].as_mut_ptr().cast();
            h.msg_controllen = space;
            let seg = b.segment_size.min(usize::from(u16::MAX)) as u16;
            // SAFETY: the control buffer is 32 aligned bytes, enough for one
            // cmsghdr with a u16 payload (space computed above).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(h);
                (*cmsg).cmsg_level = SOL_UDP;
                (*cmsg).cmsg_type = UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg);
            }
        }
    }
    loop {
        // SAFETY: every header points at buffers, addresses and control
        // messages that outlive the call.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), n as u32, 0) };
        if r > 0 {
            return (r as usize, None);
        }
        if r == 0 {
            return (0, Some(io::Error::from(io::ErrorKind::WriteZero)));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return (0, Some(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    #[test]
    fn recvmmsg_splits_gro_buffers_and_reports_senders() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(crate::enable_gro(&rx).unwrap(), "kernel lacks UDP_GRO");
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = SockAddr::from(rx.local_addr().unwrap());
        let mut batch = Vec::new();
        for i in 0..8u8 {
            batch.extend(std::iter::repeat_n(i, 500));
        }
        send_segments(&a, &batch, 500, Some(&dest)).unwrap();
        b.send_to(&[42; 77], rx.local_addr().unwrap()).unwrap();
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut rb = RecvBatch::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while got.len() < 9 {
            assert!(std::time::Instant::now() < deadline, "datagrams did not arrive");
            let n = match rb.recv(&rx) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("recvmmsg: {e}"),
            };
            for i in 0..n {
                match rb.message(i).unwrap() {
                    Message::Data(r, buf) => {
                        for d in buf.chunks(r.segment_size) {
                            got.push((r.from, d.to_vec()));
                        }
                    }
                    Message::Truncated => panic!("nothing here is larger than the buffer"),
                }
            }
        }
        let from_a: Vec<_> = got.iter().filter(|(f, _)| *f == a.local_addr().unwrap()).collect();
        assert_eq!(from_a.len(), 8);
        for (i, (_, d)) in from_a.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 500]);
        }
        assert!(got.iter().any(|(f, d)| *f == b.local_addr().unwrap() && d == &vec![42u8; 77]));
    }

    #[test]
    fn sendmmsg_sends_batches_to_several_destinations() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        for r in [&r1, &r2] {
            r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let one = vec![1u8; 3000]; // 3 x 1000
        let two = vec![2u8; 1100]; // 2 x 600, the last 500
        let batches: Vec<Batch<'_>> = (0..20)
            .map(|i| {
                if i % 2 == 0 {
                    Batch { buf: &one, to: r1.local_addr().unwrap(), segment_size: 1000, segments: 3 }
                } else {
                    Batch { buf: &two, to: r2.local_addr().unwrap(), segment_size: 600, segments: 2 }
                }
            })
            .collect();
        let report = send_batches(&tx, &batches);
        assert_eq!(report.sent + report.dropped, 50);
        assert_eq!(report.dropped, 0);
        assert_eq!(report.syscalls, 2, "20 batches in two sendmmsg calls");
        let mut buf = [0u8; 2048];
        for _ in 0..30 {
            assert_eq!(r1.recv(&mut buf).unwrap(), 1000);
        }
        let mut sizes = Vec::new();
        for _ in 0..20 {
            sizes.push(r2.recv(&mut buf).unwrap());
        }
        assert_eq!(sizes.iter().filter(|s| **s == 600).count(), 10);
        assert_eq!(sizes.iter().filter(|s| **s == 500).count(), 10);
    }

    #[test]
    fn a_refused_batch_is_dropped_and_the_rest_still_go() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let ok = vec![5u8; 100];
        let too_big = vec![6u8; 70_000]; // over the UDP limit: EMSGSIZE
        let to = r.local_addr().unwrap();
        let batches = [
            Batch { buf: &ok, to, segment_size: 100, segments: 1 },
            Batch { buf: &too_big, to, segment_size: 70_000, segments: 1 },
            Batch { buf: &ok, to, segment_size: 100, segments: 1 },
        ];
        let report = send_batches(&tx, &batches);
        assert_eq!((report.sent, report.dropped), (2, 1));
        let mut buf = [0u8; 256];
        assert_eq!(r.recv(&mut buf).unwrap(), 100);
        assert_eq!(r.recv(&mut buf).unwrap(), 100);
    }
}

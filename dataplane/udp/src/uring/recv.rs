//! Multishot `recvmsg` (Linux 6.0) into a provided buffer ring.
//!
//! One armed request completes once per received (possibly GRO-coalesced)
//! datagram. The kernel writes each into a buffer it picks from the group,
//! laid out as `struct io_uring_recvmsg_out` (16 bytes), then `msg_namelen`
//! bytes of sender address, then `msg_controllen` bytes of control
//! messages, then the payload; the completion's result is the number of
//! bytes written. The name and control areas have the fixed sizes of the
//! msghdr template, whatever the datagram carries.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use io_uring::types::{Fd, RecvMsgOut};
use io_uring::{opcode, squeue};

use crate::{SOL_UDP, UDP_GRO};

/// Control area reserved per receive: room for the `UDP_GRO` message (24
/// bytes) and headroom for one or two more (e.g. `IP_PKTINFO`). A datagram
/// with more control data is flagged as truncated.
pub const RECV_CONTROL_LEN: usize = 64;
/// `sizeof(struct io_uring_recvmsg_out)`: four `u32`.
const RECVMSG_OUT_LEN: usize = 16;
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();

/// The msghdr the kernel reads when the request is issued. In multishot
/// mode it only uses `msg_namelen` and `msg_controllen` (the data go to the
/// selected buffer); the name and control areas exist so no pointer in the
/// template is ever dangling.
struct Template {
    msg: libc::msghdr,
    name: libc::sockaddr_storage,
    control: [u64; RECV_CONTROL_LEN / 8],
}

/// A multishot `recvmsg` request: the heap-pinned msghdr template, the SQE
/// that arms it, and the parser for its completions.
///
/// Keep it alive while the request is armed (the kernel reads the template
/// when it issues the request).
pub struct MultishotRecv {
    t: Box<Template>,
}

impl std::fmt::Debug for MultishotRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultishotRecv")
            .field("namelen", &self.t.msg.msg_namelen)
            .field("controllen", &self.t.msg.msg_controllen)
            .finish()
    }
}

impl MultishotRecv {
    /// A template for an unconnected socket: each completion carries the
    /// sender's address.
    pub fn unconnected() -> Self {
        Self::new(true)
    }

    /// A template for a connected socket: no address area (`from` is
    /// `None`).
    pub fn connected() -> Self {
        Self::new(false)
    }

    fn new(with_source: bool) -> Self {
        // SAFETY: msghdr, sockaddr_storage and u64 arrays are plain old
        // data; all zeroes is a valid value for each.
        let mut t: Box<Template> = Box::new(unsafe { std::mem::zeroed() });
        t.msg.msg_name = (&raw mut t.name).cast();
        t.msg.msg_namelen = if with_source { NAME_LEN as libc::socklen_t } else { 0 };
        t.msg.msg_control = t.control.as_mut_ptr().cast();
        t.msg.msg_controllen = RECV_CONTROL_LEN as _;
        Self { t }
    }

    /// Bytes of each buffer taken before the payload.
    pub fn header_len(&self) -> usize {
        RECVMSG_OUT_LEN + self.t.msg.msg_namelen as usize + RECV_CONTROL_LEN
    }

    /// The buffer size that holds a payload of `payload` bytes, e.g.
    /// [`MAX_GRO_BUFFER`](crate::MAX_GRO_BUFFER) for a full GRO
    /// super-packet. A larger payload is truncated (and flagged).
    pub fn buffer_size_for(&self, payload: usize) -> usize {
        self.header_len() + payload
    }

    /// The SQE arming (or re-arming) the request on `fd` with buffers from
    /// group `bgid`. Every completion carries `user_data`.
    pub fn entry(&self, fd: RawFd, bgid: u16, user_data: u64) -> squeue::Entry {
        opcode::RecvMsgMulti::new(Fd(fd), &raw const self.t.msg, bgid).build().user_data(user_data)
    }

    /// Parses the bytes a completion wrote: the first `result` bytes of its
    /// buffer. Nothing in `buf` is trusted: lengths are checked and a
    /// malformed control message is ignored.
    pub fn parse<'a>(&self, buf: &'a [u8]) -> Result<RecvMsg<'a>, RecvError> {
        let out = RecvMsgOut::parse(buf, &self.t.msg).map_err(|()| RecvError::Short)?;
        // `RecvMsgOut` lends its slices only for its own lifetime: take the
        // payload from `buf` directly (it starts after the fixed areas).
        let rest = buf.get(self.header_len()..).ok_or(RecvError::Short)?;
        let payload = &rest[..rest.len().min(out.incoming_payload_len() as usize)];
        let truncated = out.is_payload_truncated()
            || out.is_control_data_truncated()
            || out.is_name_data_truncated()
            || out.incoming_payload_len() as usize > payload.len();
        let from = if self.t.msg.msg_namelen == 0 {
            None
        } else {
            Some(sockaddr_from_bytes(out.name_data()).ok_or(RecvError::BadAddress)?)
        };
        let segment_size = gro_stride(out.control_data()).unwrap_or(payload.len());
        Ok(RecvMsg { from, segment_size, payload, truncated })
    }
}

/// Why a receive completion could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// The bytes are shorter than the header, name and control areas.
    Short,
    /// The sender address is not a complete IPv4 or IPv6 address.
    BadAddress,
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Short => "receive completion shorter than its header",
            Self::BadAddress => "receive completion with a non-IP sender address",
        })
    }
}

impl std::error::Error for RecvError {}

/// One receive completion, borrowed from its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMsg<'a> {
    /// The sender; `None` on a connected socket. v4-mapped IPv6 senders on a
    /// dual-stack socket stay IPv6, as the kernel reports them.
    pub from: Option<SocketAddr>,
    /// Stride of the coalesced datagrams (the `UDP_GRO` control message);
    /// `payload.len()` when there is none.
    pub segment_size: usize,
    /// The payload: one datagram, or several of `segment_size` bytes back
    /// to back (the last may be shorter).
    pub payload: &'a [u8],
    /// The payload, the control data or the address did not fit: drop the
    /// message (and count it).
    pub truncated: bool,
}

impl<'a> RecvMsg<'a> {
    /// Number of datagrams in the payload (an empty datagram counts as one).
    pub fn segments(&self) -> usize {
        if self.payload.is_empty() { 1 } else { self.payload.len().div_ceil(self.segment_size.max(1)) }
    }

    /// The datagrams, split by `segment_size`.
    pub fn datagrams(&self) -> Datagrams<'a> {
        Datagrams { rest: self.payload, stride: self.segment_size.max(1), first: true }
    }
}

/// Iterator over the datagrams of a [`RecvMsg`].
#[derive(Debug, Clone)]
pub struct Datagrams<'a> {
    rest: &'a [u8],
    stride: usize,
    first: bool,
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let first = std::mem::take(&mut self.first);
        if self.rest.is_empty() {
            // A zero-length datagram is still a datagram.
            return first.then_some(self.rest);
        }
        let (datagram, rest) = self.rest.split_at(self.stride.min(self.rest.len()));
        self.rest = rest;
        Some(datagram)
    }
}

/// A sender address in the kernel's `sockaddr_in` / `sockaddr_in6` layout.
fn sockaddr_from_bytes(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match libc::c_int::from(family) {
        libc::AF_INET if name.len() >= std::mem::size_of::<libc::sockaddr_in>() => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 if name.len() >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // Flow info is kept as stored, like `sockaddr_to_std` and std.
            let flowinfo = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope)))
        }
        _ => None,
    }
}

/// The `UDP_GRO` stride in a control area, walked as the kernel lays it out
/// (`struct cmsghdr { size_t len; int level; int type; }`, entries aligned
/// to `size_t`). Stops at the first malformed entry.
fn gro_stride(control: &[u8]) -> Option<usize> {
    const WORD: usize = std::mem::size_of::<usize>();
    const HDR: usize = (WORD + 8).next_multiple_of(WORD);
    let mut off = 0usize;
    while control.len().checked_sub(off)? >= HDR {
        let len = usize::from_ne_bytes(control.get(off..off + WORD)?.try_into().ok()?);
        let level = i32::from_ne_bytes(control.get(off + WORD..off + WORD + 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(control.get(off + WORD + 4..off + WORD + 8)?.try_into().ok()?);
        if len < HDR || len > control.len() - off {
            return None;
        }
        if level == SOL_UDP && kind == UDP_GRO && len >= HDR + 4 {
            let stride = i32::from_ne_bytes(control.get(off + HDR..off + HDR + 4)?.try_into().ok()?);
            return usize::try_from(stride).ok().filter(|&s| s > 0);
        }
        off = off.checked_add(len.checked_next_multiple_of(WORD)?)?;
    }
    None
}

#[cfg(test)]
mod tests;

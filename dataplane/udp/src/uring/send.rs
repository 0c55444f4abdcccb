//! A bounded pool of `IORING_OP_SENDMSG` requests with optional GSO.
//!
//! Each slot owns everything the kernel reads for one send at a stable heap
//! address: the data, its iovec, the msghdr, the destination address and a
//! `UDP_SEGMENT` control message. The kernel only reads these, so a slot
//! released too early can at worst send wrong bytes, never corrupt memory;
//! slots still in flight when the pool is dropped are leaked anyway.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use io_uring::types::Fd;
use io_uring::{opcode, squeue};

use crate::{MAX_GSO_BYTES, MAX_SEGMENTS, SOL_UDP, UDP_SEGMENT};

/// A slot of a [`SendSlots`] pool; small enough to pack into `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Acquired,
    InFlight,
}

struct Slot {
    data: Vec<u8>,
    iov: libc::iovec,
    msg: libc::msghdr,
    addr: libc::sockaddr_storage,
    /// One `UDP_SEGMENT` message: `CMSG_SPACE(2)` is 24 bytes.
    control: [u64; 4],
    state: State,
    prepared: PreparedSend,
}

/// What a prepared send carries, for interpreting its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreparedSend {
    /// Destination, `None` on a connected socket.
    pub dest: Option<SocketAddr>,
    /// Bytes per datagram (the last may be shorter).
    pub segment_size: usize,
    /// Datagrams in the send.
    pub segments: usize,
}

/// Why [`SendSlots::prepare`] refused a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareError {
    /// The slot is not acquired (free, unknown, or already in flight).
    NotAcquired,
    /// More than [`MAX_SEGMENTS`] datagrams.
    TooManySegments,
    /// A segment size that does not fit the `u16` of `UDP_SEGMENT`.
    SegmentTooLarge,
    /// A segmented send of more than [`MAX_GSO_BYTES`].
    TooLarge,
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotAcquired => "send slot not acquired",
            Self::TooManySegments => "more than 64 segments in one send",
            Self::SegmentTooLarge => "segment size above 65535",
            Self::TooLarge => "segmented send above 65507 bytes",
        })
    }
}

impl std::error::Error for PrepareError {}

/// What a send completion means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Sent this many bytes.
    Sent(usize),
    /// `EIO`/`EINVAL` on a segmented send: the device cannot do GSO. Turn
    /// GSO off and resend the datagrams one by one.
    GsoRefused,
    /// The datagrams were dropped for a reason of the moment or of the
    /// destination (`EAGAIN`, `ENOBUFS`, `ECONNREFUSED`, `EMSGSIZE`, an
    /// unreachable network, a firewall, cancellation); count them.
    Dropped(i32),
    /// Any other error (the errno): a bug or a broken socket.
    Failed(i32),
}

/// Whether a send completion `res` for `segments` datagrams means the
/// device refused GSO (quinn-udp's rule: `EIO` or `EINVAL` with more than
/// one segment).
pub fn is_gso_refusal(res: i32, segments: usize) -> bool {
    segments > 1 && (res == -libc::EIO || res == -libc::EINVAL)
}

/// Interprets a send completion `res` for `segments` datagrams.
pub fn send_outcome(res: i32, segments: usize) -> SendOutcome {
    if let Ok(n) = usize::try_from(res) {
        return SendOutcome::Sent(n);
    }
    if is_gso_refusal(res, segments) {
        return SendOutcome::GsoRefused;
    }
    let errno = res.saturating_neg();
    match errno {
        libc::EAGAIN
        | libc::ENOBUFS
        | libc::ENOMEM
        | libc::ECONNREFUSED
        | libc::EMSGSIZE
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EHOSTDOWN
        | libc::ENETDOWN
        | libc::EPERM
        | libc::EACCES
        | libc::ECANCELED => SendOutcome::Dropped(errno),
        _ => SendOutcome::Failed(errno),
    }
}

/// A bounded pool of send slots. Not `Send`: it belongs to the thread that
/// owns the ring.
pub struct SendSlots {
    /// Boxed so that a slot never moves while the kernel may read it, even
    /// if this vector did.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    free: Vec<u32>,
    in_flight: usize,
}

impl std::fmt::Debug for SendSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendSlots")
            .field("capacity", &self.slots.len())
            .field("free", &self.free.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl SendSlots {
    /// A pool of `capacity` slots (capped at `u32::MAX`). Data buffers are
    /// allocated on a slot's first use, with room for [`MAX_GSO_BYTES`].
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(u32::MAX as usize);
        let slots = (0..capacity)
            .map(|_| {
                Box::new(Slot {
                    data: Vec::new(),
                    iov: libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
                    // SAFETY: msghdr and sockaddr_storage are plain old data;
                    // all zeroes is a valid value.
                    msg: unsafe { std::mem::zeroed() },
                    // SAFETY: as above.
                    addr: unsafe { std::mem::zeroed() },
                    control: [0; 4],
                    state: State::Free,
                    prepared: PreparedSend::default(),
                })
            })
            .collect();
        // Pop from the end: hand out low ids first.
        let free = (0..capacity as u32).rev().collect();
        Self { slots, free, in_flight: 0 }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots prepared and not yet released.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Slots neither acquired nor in flight.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    fn slot(&self, id: SlotId, state: State) -> Option<&Slot> {
        self.slots.get(id.0 as usize).map(|s| &**s).filter(|s| s.state == state)
    }

    fn slot_mut(&mut self, id: SlotId, state: State) -> Option<&mut Slot> {
        self.slots.get_mut(id.0 as usize).map(|s| &mut **s).filter(|s| s.state == state)
    }

    /// A free slot with an empty buffer; `None` when all are taken.
    pub fn acquire(&mut self) -> Option<SlotId> {
        let id = self.free.pop()?;
        let slot = &mut self.slots[id as usize];
        slot.state = State::Acquired;
        if slot.data.capacity() == 0 {
            slot.data.reserve_exact(MAX_GSO_BYTES);
        }
        Some(SlotId(id))
    }

    /// The data buffer of an acquired slot: write the datagrams back to
    /// back, all of the segment size but the last, which may be shorter.
    /// `None` unless the slot is acquired and not in flight.
    pub fn buffer(&mut self, id: SlotId) -> Option<&mut Vec<u8>> {
        self.slot_mut(id, State::Acquired).map(|s| &mut s.data)
    }

    /// Fills the slot's msghdr for `fd` (to `dest`, or the connected peer
    /// when `None`) and returns the SQE. A `UDP_SEGMENT` message is attached
    /// only when the buffer holds more than one segment of `segment_size`
    /// (0 means one datagram). The slot is in flight from here until
    /// [`release`](Self::release): push the entry, or release the slot.
    pub fn prepare(
        &mut self,
        id: SlotId,
        fd: RawFd,
        dest: Option<SocketAddr>,
        segment_size: usize,
        user_data: u64,
    ) -> Result<squeue::Entry, PrepareError> {
        let slot = self.slot_mut(id, State::Acquired).ok_or(PrepareError::NotAcquired)?;
        let len = slot.data.len();
        let segmented = segment_size > 0 && segment_size < len;
        let (segment_size, segments) =
            if segmented { (segment_size, len.div_ceil(segment_size)) } else { (len, 1) };
        if segmented {
            if segments > MAX_SEGMENTS {
                return Err(PrepareError::TooManySegments);
            }
            if segment_size > usize::from(u16::MAX) {
                return Err(PrepareError::SegmentTooLarge);
            }
            if len > MAX_GSO_BYTES {
                return Err(PrepareError::TooLarge);
            }
        }
        slot.iov = libc::iovec { iov_base: slot.data.as_mut_ptr().cast(), iov_len: len };
        // SAFETY: plain old data; all zeroes is a valid value.
        slot.msg = unsafe { std::mem::zeroed() };
        slot.msg.msg_iov = &raw mut slot.iov;
        slot.msg.msg_iovlen = 1;
        if let Some(dest) = dest {
            slot.msg.msg_name = (&raw mut slot.addr).cast();
            slot.msg.msg_namelen = write_sockaddr(dest, &mut slot.addr);
        }
        if segmented {
            // SAFETY: CMSG_SPACE and CMSG_LEN are pure size computations.
            let (space, cmsg_len) = unsafe {
                (libc::CMSG_SPACE(size_of::<u16>() as u32), libc::CMSG_LEN(size_of::<u16>() as u32))
            };
            slot.control = [0; 4];
            slot.msg.msg_control = slot.control.as_mut_ptr().cast();
            slot.msg.msg_controllen = space as _;
            // SAFETY: the control area is 32 bytes aligned for cmsghdr and
            // msg_controllen says 24, room for one header and a u16, so
            // CMSG_FIRSTHDR is non-null and the writes stay inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&slot.msg);
                (*cmsg).cmsg_level = SOL_UDP;
                (*cmsg).cmsg_type = UDP_SEGMENT;
                (*cmsg).cmsg_len = cmsg_len as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment_size as u16);
            }
        }
        slot.prepared = PreparedSend { dest, segment_size, segments };
        slot.state = State::InFlight;
        let entry = opcode::SendMsg::new(Fd(fd), &raw const slot.msg).build().user_data(user_data);
        self.in_flight += 1;
        Ok(entry)
    }

    /// What the in-flight slot `id` sends.
    pub fn prepared(&self, id: SlotId) -> Option<PreparedSend> {
        self.slot(id, State::InFlight).map(|s| s.prepared)
    }

    /// The bytes of in-flight slot `id`, e.g. to resend them one datagram
    /// at a time after [`SendOutcome::GsoRefused`].
    pub fn data(&self, id: SlotId) -> Option<&[u8]> {
        self.slot(id, State::InFlight).map(|s| s.data.as_slice())
    }

    /// Interprets the completion result `res` of in-flight slot `id`.
    pub fn outcome(&self, id: SlotId, res: i32) -> SendOutcome {
        send_outcome(res, self.prepared(id).map_or(1, |p| p.segments))
    }

    /// Returns slot `id` to the pool after its completion (or an acquired
    /// slot that was never prepared), keeping its buffer's allocation.
    /// `false` if the slot was already free or does not exist.
    pub fn release(&mut self, id: SlotId) -> bool {
        let Some(slot) = self.slots.get_mut(id.0 as usize) else { return false };
        match slot.state {
            State::Free => return false,
            State::InFlight => self.in_flight -= 1,
            State::Acquired => {}
        }
        slot.state = State::Free;
        slot.data.clear();
        slot.prepared = PreparedSend::default();
        self.free.push(id.0);
        true
    }
}

impl Drop for SendSlots {
    fn drop(&mut self) {
        for slot in self.slots.drain(..) {
            if slot.state == State::InFlight {
                // The kernel may still read it.
                std::mem::forget(slot);
            }
        }
    }
}

/// Writes `addr` in the kernel layout into `storage`; returns its length.
fn write_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every
            // socket address type.
            unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests;

//! io_uring building blocks for the UDP fast path (Linux).
//!
//! These pieces only move bytes; the dataplane's driver owns the ring, the
//! sockets and the loop. What is here:
//!
//! * [`probe`]: can this process create a ring, and does the kernel have
//!   what the fast path needs (multishot `IORING_OP_RECVMSG`, provided
//!   buffer rings, `IORING_OP_SENDMSG`, `IORING_FEAT_EXT_ARG`)? When not,
//!   [`UringSupport`] says why, for the log line before falling back to
//!   epoll.
//! * [`BufRing`]: a provided buffer ring (`IORING_REGISTER_PBUF_RING`) the
//!   kernel picks receive buffers from.
//! * [`MultishotRecv`]: one armed `recvmsg` that keeps completing, one
//!   (possibly GRO-coalesced) datagram per buffer, and the parser that turns
//!   a completed buffer into a [`RecvMsg`].
//! * [`SendSlots`]: a bounded pool of `sendmsg` requests, each with its own
//!   buffer, address and `UDP_SEGMENT` control message at a stable address.
//!
//! # Drive order
//!
//! 1. At startup call [`probe`]; if [`UringSupport::is_usable`] is false,
//!    log it and use the epoll path.
//! 2. Per worker: create the ring, a [`BufRing`] whose buffers hold a GRO
//!    super-packet ([`MultishotRecv::buffer_size_for`] of
//!    [`MAX_GRO_BUFFER`](crate::MAX_GRO_BUFFER)), and arm
//!    [`MultishotRecv::entry`] on each socket.
//! 3. A receive completion with `result >= 0` carries a buffer: take it with
//!    [`BufRing::take`], read [`BufRing::buffer`]`(bid, result)`, parse it
//!    with [`MultishotRecv::parse`], and [`BufRing::recycle`] the buffer
//!    once nothing refers to it any more (for a zero-copy forward: after the
//!    forwarding send completed). When the completion lacks
//!    `IORING_CQE_F_MORE` the request has ended (`-ENOBUFS` when the ring
//!    ran dry): recycle what you can and push the same entry again. The
//!    kernel picks a buffer before it looks at the socket, so the request
//!    ends as soon as the ring is empty, even with no datagram waiting:
//!    give the ring more buffers than the worker ever holds at once.
//! 4. Sends: [`SendSlots::acquire`], write into [`SendSlots::buffer`],
//!    push [`SendSlots::prepare`]'s entry; on its completion read
//!    [`SendSlots::outcome`] and [`SendSlots::release`] the slot.
//!
//! # Teardown order
//!
//! The kernel writes into [`BufRing`]'s memory, so it must not be unmapped
//! while a request can still select from it: cancel the multishot receives
//! and wait for their final completion (no `IORING_CQE_F_MORE`), then
//! [`BufRing::unregister`], then drop the `BufRing`, then the ring. A
//! `BufRing` dropped while still registered leaks its memory rather than
//! risk a write into freed pages. [`SendSlots`] is only read by the kernel;
//! slots still in flight when it is dropped are leaked for the same reason.
//!
//! # Non-goals
//!
//! No driver loop, no timers, no fixed files or registered buffers, no
//! zero-copy send (`IORING_OP_SEND_ZC`): on loopback and for datagrams of
//! QUIC size the copy is cheaper than the notification round trip.
//!
//! All these types hold raw pointers the kernel uses and are `!Send`: each
//! belongs to the worker thread that owns its ring.

mod buf_ring;
mod probe;
mod recv;
mod send;
#[cfg(test)]
mod testutil;

pub use buf_ring::{BufRing, MAX_BUF_RING_ENTRIES};
pub use probe::{Unavailable, UringSupport, probe};
pub use recv::{Datagrams, MultishotRecv, RECV_CONTROL_LEN, RecvError, RecvMsg};
pub use send::{PrepareError, PreparedSend, SendOutcome, SendSlots, SlotId, is_gso_refusal, send_outcome};

/// These types hand the kernel pointers into themselves and belong to the
/// thread that owns the ring: none of them may be `Send`.
#[allow(dead_code)]
fn assert_not_send() {
    trait AmbiguousIfSend<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    // Each line fails to compile (ambiguous impl) if the type is `Send`.
    <BufRing as AmbiguousIfSend<_>>::check();
    <MultishotRecv as AmbiguousIfSend<_>>::check();
    <SendSlots as AmbiguousIfSend<_>>::check();
}

//! Provided buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19).
//!
//! The ring is an array of `count` 16-byte entries `{addr, len, bid, resv}`
//! shared with the kernel; the `resv` field of the first entry is the tail,
//! written only by the application. The kernel keeps the head privately and
//! takes buffers from `head` to `tail`. Returning a buffer writes its entry
//! at `tail & mask` and publishes `tail + 1` with a release store, as
//! liburing's `io_uring_buf_ring_add` and `io_uring_buf_ring_advance` do.
//!
//! The ring never holds more than `count` entries because only a buffer the
//! application took from a completion ([`BufRing::take`]) can be returned,
//! and only once.

use std::io;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;
use io_uring::cqueue;
use io_uring::types::BufRingEntry;

/// Most entries a buffer ring may have (a kernel limit).
pub const MAX_BUF_RING_ENTRIES: u16 = 1 << 15;

/// The kernel's `struct io_uring_buf`; written field by field so that no
/// Rust reference ever covers the tail the kernel reads concurrently.
#[repr(C)]
struct RawEntry {
    addr: u64,
    len: u32,
    bid: u16,
    /// The tail in entry 0; never written through this type.
    #[allow(dead_code)]
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<BufRingEntry>() == std::mem::size_of::<RawEntry>());
const _: () = assert!(std::mem::size_of::<RawEntry>() == 16);

/// An anonymous, page-aligned private mapping.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    fn anonymous(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choice; it aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `anonymous` with this length and
        // is unmapped once; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A provided buffer ring: `count` buffers of `size` bytes for buffer group
/// `bgid`, all handed to the kernel at creation.
///
/// See the [module docs](super) for the teardown order.
pub struct BufRing {
    entries: ManuallyDrop<Mmap>,
    buffers: ManuallyDrop<Mmap>,
    count: u16,
    size: u32,
    bgid: u16,
    /// Our copy of the tail; the shared one is only ever written from it.
    tail: u16,
    /// One bit per buffer: set while the application holds it.
    taken: Vec<u64>,
    with_app: usize,
    registered: bool,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("bgid", &self.bgid)
            .field("count", &self.count)
            .field("size", &self.size)
            .field("with_app", &self.with_app)
            .field("registered", &self.registered)
            .finish()
    }
}

impl BufRing {
    /// Maps and registers a ring of `count` buffers (a power of two, at most
    /// [`MAX_BUF_RING_ENTRIES`]) of `size` bytes for group `bgid`.
    ///
    /// Fails with `InvalidInput` on a bad geometry, with the kernel's error
    /// when registering fails (`EINVAL` before Linux 5.19, `EEXIST` when the
    /// group is taken).
    pub fn new(submitter: &Submitter<'_>, bgid: u16, count: u16, size: u32) -> io::Result<Self> {
        if !count.is_power_of_two() || count > MAX_BUF_RING_ENTRIES || size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring needs a power-of-two count <= 32768 and a non-zero size",
            ));
        }
        let total = usize::from(count)
            .checked_mul(size as usize)
            .filter(|&t| t <= isize::MAX as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffer ring too large"))?;
        let entries = Mmap::anonymous(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mmap::anonymous(total)?;
        let mut ring = Self {
            entries: ManuallyDrop::new(entries),
            buffers: ManuallyDrop::new(buffers),
            count,
            size,
            bgid,
            tail: 0,
            taken: vec![u64::MAX; usize::from(count).div_ceil(64)],
            with_app: usize::from(count),
            registered: false,
        };
        // Provide every buffer: `recycle` accepts them because all start
        // marked as taken.
        for bid in 0..count {
            ring.recycle(bid);
        }
        debug_assert_eq!(ring.with_app, 0);
        // SAFETY: the entries mapping is page aligned, holds `count`
        // entries, and stays mapped until the group is unregistered (Drop
        // leaks it otherwise).
        unsafe {
            submitter.register_buf_ring_with_flags(ring.entries.ptr.as_ptr() as u64, count, bgid, 0)?;
        }
        ring.registered = true;
        Ok(ring)
    }

    /// The buffer group id to pass to receive requests.
    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Number of buffers.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Size of each buffer in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Buffers the application holds (taken and not yet recycled).
    pub fn with_app(&self) -> usize {
        self.with_app
    }

    /// Whether the group is still registered with the kernel.
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    fn is_taken(&self, bid: u16) -> bool {
        self.taken.get(usize::from(bid) / 64).is_some_and(|w| w & (1 << (bid % 64)) != 0)
    }

    fn set_taken(&mut self, bid: u16, taken: bool) {
        if let Some(w) = self.taken.get_mut(usize::from(bid) / 64) {
            if taken {
                *w |= 1 << (bid % 64);
            } else {
                *w &= !(1 << (bid % 64));
            }
        }
    }

    /// Takes the buffer a completion selected (`IORING_CQE_F_BUFFER` in
    /// `cqe_flags`) into the application's hands and returns its id.
    ///
    /// `None` when the completion carries no buffer, or names one that is
    /// out of range or already taken (a kernel or caller bug; count it).
    pub fn take(&mut self, cqe_flags: u32) -> Option<u16> {
        let bid = cqueue::buffer_select(cqe_flags)?;
        if bid >= self.count || self.is_taken(bid) {
            return None;
        }
        self.set_taken(bid, true);
        self.with_app += 1;
        Some(bid)
    }

    /// The first `len` bytes of taken buffer `bid` (the completion's
    /// result). `None` if `bid` is not held by the application or `len`
    /// exceeds the buffer.
    pub fn buffer(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count || !self.is_taken(bid) || len > self.size as usize {
            return None;
        }
        let offset = usize::from(bid) * self.size as usize;
        // SAFETY: `offset + len` is within the buffers mapping (bid < count,
        // len <= size). The buffer is taken, so the kernel does not write it
        // until `recycle`, which needs `&mut self` and so ends this borrow.
        Some(unsafe { std::slice::from_raw_parts(self.buffers.ptr.as_ptr().add(offset), len) })
    }

    /// The first `len` bytes of taken buffer `bid`, writable (QUIC packets
    /// are decrypted in place). Same conditions as [`BufRing::buffer`].
    pub fn buffer_mut(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        if bid >= self.count || !self.is_taken(bid) || len > self.size as usize {
            return None;
        }
        let offset = usize::from(bid) * self.size as usize;
        // SAFETY: as in `buffer`: the range is inside the mapping and the
        // kernel does not touch a taken buffer; `&mut self` makes this the
        // only borrow until it ends.
        Some(unsafe { std::slice::from_raw_parts_mut(self.buffers.ptr.as_ptr().add(offset), len) })
    }

    /// Returns taken buffer `bid` to the kernel. `false` (and nothing done)
    /// if the application does not hold it.
    pub fn recycle(&mut self, bid: u16) -> bool {
        if bid >= self.count || !self.is_taken(bid) {
            return false;
        }
        self.set_taken(bid, false);
        self.with_app -= 1;
        let mask = self.count - 1;
        let base = self.entries.ptr.as_ptr().cast::<BufRingEntry>();
        let addr = self.buffers.ptr.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `tail & mask < count`, so the entry is inside the mapping.
        // Only this ring writes entries; the kernel reads the entry between
        // head and tail, and this slot is outside that range until the tail
        // store below publishes it (at most `count` buffers are ever
        // provided, see `take`). The kernel never writes the ring.
        unsafe {
            let entry = base.add(usize::from(self.tail & mask)).cast::<RawEntry>();
            (&raw mut (*entry).addr).write(addr);
            (&raw mut (*entry).len).write(self.size);
            (&raw mut (*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: `base` is the page-aligned first entry of the ring, whose
        // `resv` field is the tail; it is suitably aligned for an AtomicU16
        // and only accessed atomically by the kernel and by this store.
        unsafe {
            let tail = BufRingEntry::tail(base).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
        true
    }

    /// Unregisters the group. Call it once no request can select from it:
    /// after the final completion (without `IORING_CQE_F_MORE`) of every
    /// receive armed with this group. Idempotent.
    pub fn unregister(&mut self, submitter: &Submitter<'_>) -> io::Result<()> {
        if self.registered {
            submitter.unregister_buf_ring(self.bgid)?;
            self.registered = false;
        }
        Ok(())
    }

    /// Marks the group unregistered without telling the kernel, so that
    /// Drop unmaps the memory.
    ///
    /// # Safety
    ///
    /// The ring the group was registered with must be gone (dropped) and no
    /// request on it may still be running, e.g. after the multishot receives
    /// ended and the ring was dropped.
    pub unsafe fn forget_registration(&mut self) {
        self.registered = false;
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // The kernel may still write into these pages: leak them.
            return;
        }
        // SAFETY: both fields are dropped exactly once, here, and the kernel
        // no longer knows the group.
        unsafe {
            ManuallyDrop::drop(&mut self.entries);
            ManuallyDrop::drop(&mut self.buffers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::testutil::{require_uring, ring};

    #[test]
    fn geometry_is_validated() {
        let Some(_) = require_uring() else { return };
        let ring = ring(8);
        let s = ring.submitter();
        for (count, size) in [(0, 64), (3, 64), (4, 0), (u16::MAX, 64)] {
            let e = BufRing::new(&s, 1, count, size).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "count {count} size {size}");
        }
    }

    #[test]
    fn take_and_recycle_keep_the_books() {
        let Some(_) = require_uring() else { return };
        let ring = ring(8);
        let s = ring.submitter();
        let mut br = BufRing::new(&s, 3, 4, 128).unwrap();
        assert_eq!(br.with_app(), 0);
        // Nothing is taken yet: no buffer is readable or recyclable.
        assert!(br.buffer(0, 1).is_none());
        assert!(!br.recycle(0));
        // A completion without IORING_CQE_F_BUFFER carries nothing.
        assert_eq!(br.take(0), None);
        // Fake completions (IORING_CQE_F_BUFFER | bid << 16). Nothing is
        // armed on this group, so handing back a buffer the kernel still
        // holds only overfills a ring nobody reads before unregistering.
        let flags_for = |bid: u32| 1 | (bid << 16);
        assert_eq!(br.take(flags_for(2)), Some(2));
        assert_eq!(br.take(flags_for(2)), None, "taken twice");
        assert_eq!(br.take(flags_for(4)), None, "out of range");
        assert_eq!(br.with_app(), 1);
        assert_eq!(br.buffer(2, 128).map(<[u8]>::len), Some(128));
        assert!(br.buffer(2, 129).is_none());
        assert!(br.recycle(2));
        assert!(!br.recycle(2), "recycled twice");
        assert_eq!(br.with_app(), 0);
        // A second group id is a second ring; the same one is refused.
        let e = BufRing::new(&s, 3, 4, 128).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        br.unregister(&s).unwrap();
        br.unregister(&s).unwrap();
        assert!(!br.is_registered());
    }
}

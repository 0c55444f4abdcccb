//! An `mmap`ed view of the shared region, and the only ways this process
//! touches it: atomics at checked offsets, and word-wise atomic copies in
//! and out of private buffers.
//!
//! The other process can write any byte of the mapping at any time. So no
//! `&[u8]` or `&mut [u8]` to the mapping is ever made (the compiler could
//! assume it stable), and every access is an atomic load or store: a slot is
//! copied into private memory one `u64` at a time with relaxed loads, and
//! whatever the peer did meanwhile shows up as bytes in the copy, which the
//! caller validates. Offsets come from the region's own layout; one that is
//! out of bounds or misaligned is a bug in this crate and panics.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const WORD: usize = std::mem::size_of::<u64>();

/// A shared mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that this process only ever
// accesses through atomics (`atomic_u32`, `atomic_u64`, the word copies);
// no thread-affine state is attached to it.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only hands out atomics and copies through
// atomics, which are safe to use from many threads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file`, shared, read and write.
    pub(crate) fn map(file: &File, len: usize) -> io::Result<Self> {
        assert!(len > 0, "an empty mapping");
        // SAFETY: mapping a descriptor we hold with a non-zero length; the
        // result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len })
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A pointer to `size` bytes at `offset`, aligned to `size`.
    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        assert!(
            offset.is_multiple_of(size) && offset.checked_add(size).is_some_and(|end| end <= self.len),
            "offset {offset} (+{size}) aligned and inside the {}-byte mapping",
            self.len
        );
        // SAFETY: `offset + size <= len`, so the result stays inside the
        // mapping (mmap returns page-aligned memory, so `offset`'s alignment
        // is the pointer's).
        unsafe { self.ptr.add(offset) }
    }

    /// The `AtomicU32` at `offset` (4-byte aligned, inside the mapping).
    pub(crate) fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: aligned and in bounds (checked by `at`); the memory lives
        // as long as `self`, and this process only accesses it atomically.
        unsafe { AtomicU32::from_ptr(self.at(offset, 4).cast()) }
    }

    /// The `AtomicU64` at `offset` (8-byte aligned, inside the mapping).
    pub(crate) fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: as for `atomic_u32`.
        unsafe { AtomicU64::from_ptr(self.at(offset, WORD).cast()) }
    }

    /// Copies `out.len()` bytes at `offset` into `out`, one relaxed atomic
    /// `u64` load at a time (`offset` and the length multiples of 8). The
    /// ordering with the peer comes from the ring indices, not from here.
    pub(crate) fn load_words(&self, offset: usize, out: &mut [u8]) {
        assert!(out.len().is_multiple_of(WORD), "whole words");
        for (i, chunk) in out.chunks_exact_mut(WORD).enumerate() {
            let word = self.atomic_u64(offset + i * WORD).load(Ordering::Relaxed);
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
    }

    /// Copies `src` to `offset`, one relaxed atomic `u64` store at a time.
    pub(crate) fn store_words(&self, offset: usize, src: &[u8]) {
        assert!(src.len().is_multiple_of(WORD), "whole words");
        for (i, chunk) in src.chunks_exact(WORD).enumerate() {
            let word = u64::from_ne_bytes(chunk.try_into().expect("a whole word"));
            self.atomic_u64(offset + i * WORD).store(word, Ordering::Relaxed);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and are unmapped once;
        // every reference handed out borrows `self`, so none outlives this.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> File {
        let f = crate::memfd::create(c"mapping-test", libc::MFD_CLOEXEC).unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn word_copies_round_trip_and_atomics_see_them() {
        let f = file(8192);
        let a = Mapping::map(&f, 8192).unwrap();
        let b = Mapping::map(&f, 8192).unwrap();
        assert_eq!(a.len(), 8192);
        let src: Vec<u8> = (0..64u8).collect();
        a.store_words(4096, &src);
        let mut out = [0u8; 64];
        b.load_words(4096, &mut out);
        assert_eq!(out[..], src[..]);
        assert_eq!(
            b.atomic_u64(4096).load(Ordering::Relaxed),
            u64::from_ne_bytes(src[..8].try_into().unwrap())
        );
        b.atomic_u32(8188).store(7, Ordering::Relaxed);
        assert_eq!(a.atomic_u32(8188).load(Ordering::Relaxed), 7);
    }

    #[test]
    #[should_panic(expected = "inside the")]
    fn an_offset_past_the_end_panics_instead_of_reading_it() {
        let f = file(4096);
        let m = Mapping::map(&f, 4096).unwrap();
        let mut out = [0u8; 16];
        m.load_words(4088, &mut out);
    }

    #[test]
    #[should_panic(expected = "aligned")]
    fn a_misaligned_atomic_panics() {
        let f = file(4096);
        Mapping::map(&f, 4096).unwrap().atomic_u64(4);
    }
}

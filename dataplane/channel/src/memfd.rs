//! memfd creation and file seals (`memfd_create(2)`, `fcntl(2)` F_ADD_SEALS
//! and F_GET_SEALS).
//!
//! A shared region that the peer could `ftruncate` would crash this process
//! with SIGBUS on its next access past the new end. Seals are properties of
//! the file, not of a descriptor, and cannot be removed: once control has
//! sealed the region against shrinking and growing (and against further
//! seals), no holder of any descriptor to it can change its size.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The seals a channel region must carry: it can neither shrink nor grow,
/// and no other seal can be added (F_SEAL_SEAL), so a peer cannot, for
/// instance, forbid writes (F_SEAL_FUTURE_WRITE) to the region it shares.
pub(crate) const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Creates an empty memfd named `name` with `flags` (`MFD_*`).
pub(crate) fn create(name: &CStr, flags: libc::c_uint) -> io::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is
    // checked before use.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
}

/// Adds `seals` (`F_SEAL_*`) to `file`.
pub(crate) fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals on `file` (EINVAL for a file that does not support sealing).
pub(crate) fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a descriptor we hold, without an argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// Creates a close-on-exec memfd of `len` bytes sealed with
/// [`REQUIRED_SEALS`].
pub(crate) fn create_sealed(name: &CStr, len: u64) -> io::Result<File> {
    let file = create(name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)?;
    file.set_len(len)?;
    add_seals(&file, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
    add_seals(&file, libc::F_SEAL_SEAL)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfds_keep_their_size() {
        let file = create_sealed(c"memfd-test", 8192).unwrap();
        assert_eq!(seals(&file).unwrap() & REQUIRED_SEALS, REQUIRED_SEALS);
        for len in [0, 4096, 16384] {
            let e = file.set_len(len).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "resizing to {len}");
        }
        assert_eq!(file.metadata().unwrap().len(), 8192);
        let e = add_seals(&file, libc::F_SEAL_WRITE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "F_SEAL_SEAL forbids new seals");
    }

    #[test]
    fn without_allow_sealing_a_memfd_is_sealed_shut() {
        // memfd_create without MFD_ALLOW_SEALING starts with F_SEAL_SEAL
        // alone: it can be resized, which is why the region is created
        // with sealing allowed and then sealed.
        let file = create(c"memfd-test", libc::MFD_CLOEXEC).unwrap();
        assert_eq!(seals(&file).unwrap(), libc::F_SEAL_SEAL);
        file.set_len(4096).unwrap();
    }
}

//! What the kernel and the sandbox allow.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode};

use super::{BufRing, MultishotRecv};

/// Why no io_uring could be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The error kind of `io_uring_setup`.
    pub kind: io::ErrorKind,
    /// Its errno, when it had one.
    pub errno: Option<i32>,
    /// A readable reason with the likely cause.
    pub reason: String,
}

/// What the io_uring fast path needs, as found by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringSupport {
    /// Set when `io_uring_setup` failed; every feature is then `false`.
    pub unavailable: Option<Unavailable>,
    /// Multishot `IORING_OP_RECVMSG` (Linux 6.0), checked by arming one on
    /// a loopback socket.
    pub recvmsg_multishot: bool,
    /// Provided buffer rings (`IORING_REGISTER_PBUF_RING`, Linux 5.19),
    /// checked by registering a one-buffer ring.
    pub buf_ring: bool,
    /// `IORING_OP_SENDMSG` (Linux 5.3).
    pub sendmsg: bool,
    /// `IORING_FEAT_EXT_ARG`: waiting with a timeout (Linux 5.11).
    pub ext_arg: bool,
}

impl UringSupport {
    /// Whether the fast path can run.
    pub fn is_usable(&self) -> bool {
        self.unavailable.is_none() && self.missing().is_empty()
    }

    /// What is missing, one short name each; empty when usable. When no
    /// ring could be created it names only that (see `unavailable`).
    pub fn missing(&self) -> Vec<&'static str> {
        if self.unavailable.is_some() {
            return vec!["io_uring_setup"];
        }
        let mut missing = Vec::new();
        if !self.recvmsg_multishot {
            missing.push("multishot IORING_OP_RECVMSG (Linux 6.0)");
        }
        if !self.buf_ring {
            missing.push("IORING_REGISTER_PBUF_RING (Linux 5.19)");
        }
        if !self.sendmsg {
            missing.push("IORING_OP_SENDMSG (Linux 5.3)");
        }
        if !self.ext_arg {
            missing.push("IORING_FEAT_EXT_ARG (Linux 5.11)");
        }
        missing
    }
}

impl std::fmt::Display for UringSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(u) = &self.unavailable {
            write!(f, "io_uring unavailable: {}", u.reason)
        } else if self.is_usable() {
            f.write_str("io_uring: usable")
        } else {
            write!(f, "io_uring lacks: {}", self.missing().join(", "))
        }
    }
}

fn unavailable(e: &io::Error) -> Unavailable {
    let hint = match e.raw_os_error() {
        Some(libc::ENOSYS) => "ENOSYS: kernel without io_uring, or blocked by a seccomp filter",
        Some(libc::EPERM) => "EPERM: kernel.io_uring_disabled sysctl, or a seccomp filter",
        Some(libc::ENOMEM) => "ENOMEM: RLIMIT_MEMLOCK too low (kernels before 5.12)",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors",
        _ => "",
    };
    let reason = if hint.is_empty() {
        format!("io_uring_setup failed: {e}")
    } else {
        format!("io_uring_setup failed: {e} ({hint})")
    };
    Unavailable { kind: e.kind(), errno: e.raw_os_error(), reason }
}

/// Buffer group the probe registers on its private ring.
const PROBE_BGID: u16 = 0;
const PROBE_USER_DATA: u64 = 1;
const CANCEL_USER_DATA: u64 = 2;

/// Probes io_uring support with a private ring. Takes well under a second
/// (one loopback datagram); call it once at startup.
pub fn probe() -> UringSupport {
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => {
            return UringSupport {
                unavailable: Some(unavailable(&e)),
                recvmsg_multishot: false,
                buf_ring: false,
                sendmsg: false,
                ext_arg: false,
            };
        }
    };
    let mut ops = Probe::new();
    let ops_known = ring.submitter().register_probe(&mut ops).is_ok();
    let sendmsg = ops_known && ops.is_supported(opcode::SendMsg::CODE);
    let recvmsg = ops_known && ops.is_supported(opcode::RecvMsg::CODE);
    let ext_arg = ring.params().is_feature_ext_arg();
    let recv = MultishotRecv::unconnected();
    let size = recv.buffer_size_for(64) as u32;
    let mut buf_ring = None;
    if let Ok(br) = BufRing::new(&ring.submitter(), PROBE_BGID, 1, size) {
        buf_ring = Some(br);
    }
    let has_buf_ring = buf_ring.is_some();
    let recvmsg_multishot = match buf_ring.as_mut() {
        Some(br) if recvmsg && ext_arg => {
            // Loopback can be missing in odd sandboxes; the opcode added in
            // the same release (6.0) then stands in for the real check.
            let multishot = multishot_works(&mut ring, &recv, br)
                .unwrap_or_else(|| ops_known && ops.is_supported(opcode::SendZc::CODE));
            // With the request ended or cancelled nothing selects from the
            // group; if unregistering fails Drop leaks the two mappings.
            let _ = br.unregister(&ring.submitter());
            multishot
        }
        _ => false,
    };
    if let Some(mut br) = buf_ring {
        let _ = br.unregister(&ring.submitter());
    }
    UringSupport { unavailable: None, recvmsg_multishot, buf_ring: has_buf_ring, sendmsg, ext_arg }
}

/// Arms a multishot recvmsg on a loopback socket holding one datagram.
/// `Some(true)` if the completion says the request stays armed, `None` if
/// the check could not run.
fn multishot_works(ring: &mut IoUring, recv: &MultishotRecv, br: &mut BufRing) -> Option<bool> {
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.send_to(&[0], sock.local_addr().ok()?).ok()?;
    let entry = recv.entry(sock.as_raw_fd(), br.bgid(), PROBE_USER_DATA);
    // SAFETY: the template in `recv` and the buffer ring outlive the
    // request: it is cancelled below, and `probe` unregisters the group
    // before either is dropped.
    unsafe { ring.submission().push(&entry).ok()? };
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut verdict = None;
    let mut armed = false;
    let mut cancelled = false;
    while Instant::now() < deadline {
        let ts = Timespec::new().nsec(100_000_000);
        let args = SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(_) => break,
        }
        for cqe in ring.completion() {
            if cqe.user_data() != PROBE_USER_DATA {
                continue;
            }
            if let Some(bid) = br.take(cqe.flags()) {
                br.recycle(bid);
            }
            armed = cqueue::more(cqe.flags());
            if verdict.is_none() {
                verdict = Some(cqe.result() >= 0 && armed);
            }
        }
        if !armed && verdict.is_some() {
            break;
        }
        if armed && !cancelled {
            let cancel = opcode::AsyncCancel::new(PROBE_USER_DATA).build().user_data(CANCEL_USER_DATA);
            // SAFETY: cancelling refers to no memory.
            cancelled = unsafe { ring.submission().push(&cancel).is_ok() };
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_is_probed() {
        let started = Instant::now();
        let support = probe();
        eprintln!("{support} ({:?}): {support:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(3));
        // Linux 6.18 in CI: everything is there unless a sandbox forbids
        // io_uring, which the gate turns into a failure under CI.
        if crate::uring::testutil::require_uring().is_some() {
            assert!(support.missing().is_empty());
            assert_eq!(support.to_string(), "io_uring: usable");
        }
    }

    #[test]
    fn what_is_missing_is_named() {
        let old = UringSupport {
            unavailable: None,
            recvmsg_multishot: false,
            buf_ring: true,
            sendmsg: true,
            ext_arg: true,
        };
        assert!(!old.is_usable());
        assert_eq!(old.missing(), vec!["multishot IORING_OP_RECVMSG (Linux 6.0)"]);
        assert_eq!(old.to_string(), "io_uring lacks: multishot IORING_OP_RECVMSG (Linux 6.0)");
        let blocked = UringSupport {
            unavailable: Some(unavailable(&io::Error::from_raw_os_error(libc::EPERM))),
            recvmsg_multishot: false,
            buf_ring: false,
            sendmsg: false,
            ext_arg: false,
        };
        assert!(!blocked.is_usable());
        assert_eq!(blocked.missing(), vec!["io_uring_setup"]);
        let u = blocked.unavailable.as_ref().unwrap();
        assert_eq!((u.kind, u.errno), (io::ErrorKind::PermissionDenied, Some(libc::EPERM)));
        assert!(blocked.to_string().contains("seccomp"), "{blocked}");
        let nosys = unavailable(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert_eq!(nosys.kind, io::ErrorKind::Unsupported);
        assert!(nosys.reason.contains("ENOSYS"));
    }
}

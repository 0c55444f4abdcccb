//! Steering QUIC short-header packets to the worker named in their
//! destination connection ID, with a classic BPF program on the
//! SO_REUSEPORT group (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5+).
//!
//! Each worker binds its own socket to the QUIC address with SO_REUSEPORT;
//! the sockets form one reuseport group. Without a program the kernel picks
//! a socket by 4-tuple hash, so a connection whose client address changes
//! (NAT rebinding, migration) lands on a random worker. Server connection
//! IDs name their worker in a byte at a fixed offset (`relay_proto::cid`),
//! and [`reuseport_cbpf_program`] returns that byte as the socket index.
//!
//! How the kernel runs it (net/core/sock_reuseport.c, `run_bpf_filter`):
//! the UDP header is pulled first ("temporarily advance data past protocol
//! header"), so offset 0 is the first byte of the UDP payload, i.e. the
//! QUIC packet; the program's return value indexes the group's sockets, and
//! an index at or past the group size makes `reuseport_select_sock` fall
//! back to the 4-tuple hash. No packet is ever dropped by the program.
//!
//! Operational notes:
//!
//! * Socket index = bind order: the group's array grows as sockets bind, so
//!   worker `i` must bind `i`-th. Closing a socket moves the last one into
//!   its slot (`reuseport_detach_sock`), which renumbers the group: after a
//!   worker's socket closes, rebuild the group rather than patch it.
//! * Attach once the socket is bound (any member; the program belongs to
//!   the group). A program attached to an unbound socket that then joins an
//!   existing group is discarded with that socket's private group.
//! * Only short headers are steered. Long headers (Initial, 0-RTT,
//!   Handshake, Retry, Version Negotiation) use the hash: an Initial's DCID
//!   is client-chosen, the DCID sits at another offset, and during the
//!   handshake the 4-tuple, and so the hash, is stable.
//! * A GRO-coalesced batch is steered by its first datagram; datagrams of
//!   one 4-tuple normally share a DCID.
//! * A short-header packet with a foreign DCID (another host's CID, a CID
//!   of an older layout) still carries some byte at the worker offset and
//!   may be steered to that worker; the relay hands mis-steered packets to
//!   the owner (`relay_proto::cid::CidLayout::decode_datagram`), as it must
//!   anyway for hash-routed ones.

use std::io;
use std::os::fd::AsRawFd;

/// Return value that no reuseport group can have as an index: the kernel
/// falls back to its 4-tuple hash.
pub const HASH_FALLBACK: u32 = u32::MAX;

/// QUIC header form bit (RFC 8999 section 5): set for long headers.
const LONG_HEADER_BIT: u32 = 0x80;

const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

const fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt, jf, k }
}

/// The classic BPF program that returns the worker byte of a short-header
/// packet's destination connection ID as the reuseport socket index.
///
/// `worker_offset_in_cid` is the worker byte's offset in the CID
/// (`CidLayout::worker_offset()`: 1 plus the host prefix length); in the
/// packet it is one byte further, after the QUIC first byte. `workers` is
/// the number of worker sockets; worker bytes at or above it use the hash.
///
/// ```text
/// 0: ld   #len                 ; A = UDP payload length
/// 1: jge  #(2 + offset), 2, 7  ; holds the worker byte? else hash
/// 2: ldb  [0]                  ; A = QUIC first byte
/// 3: jset #0x80, 7, 4          ; long header? then hash
/// 4: ldb  [1 + offset]         ; A = worker byte
/// 5: jge  #workers, 7, 6       ; no such worker? then hash
/// 6: ret  a                    ; socket index = worker
/// 7: ret  #0xffffffff          ; hash fallback
/// ```
///
/// The length check matters: a classic BPF load past the end of the packet
/// aborts the program with return value 0, which would send every tiny or
/// empty datagram to socket 0; with the check they are hashed like any
/// other unroutable packet. Any arguments give a valid program: an offset
/// no datagram can reach (beyond `i32::MAX - 2`, which the kernel cannot
/// load from) gives `ret #0xffffffff` alone, and `workers == 0` steers
/// nothing. QUIC version 1 CIDs are at most 20 bytes, so real offsets are
/// below 20.
pub fn reuseport_cbpf_program(worker_offset_in_cid: usize, workers: u8) -> Vec<libc::sock_filter> {
    // The shortest packet holding the worker byte. Absolute loads take a
    // non-negative `int` offset (negative ones are the kernel's ancillary
    // data, and the checker refuses unknown ones), so an offset past that
    // gets the program that hashes everything, as no datagram reaches it.
    let Some(min_len) = worker_offset_in_cid.checked_add(2).and_then(|n| i32::try_from(n).ok()) else {
        return vec![stmt(libc::BPF_RET | libc::BPF_K, HASH_FALLBACK)];
    };
    let min_len = min_len as u32;
    let worker_at = min_len - 1;
    vec![
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_LEN, 0),
        jump(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, min_len, 0, 5),
        stmt(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0),
        jump(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, LONG_HEADER_BIT, 3, 0),
        stmt(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, worker_at),
        jump(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, u32::from(workers), 1, 0),
        stmt(libc::BPF_RET | libc::BPF_A, 0),
        stmt(libc::BPF_RET | libc::BPF_K, HASH_FALLBACK),
    ]
}

/// Attaches a classic BPF socket-selection program to the SO_REUSEPORT
/// group `sock` belongs to (`setsockopt(SOL_SOCKET,
/// SO_ATTACH_REUSEPORT_CBPF)`), replacing any previous one. `sock` must
/// have SO_REUSEPORT set and should already be bound (see the module docs).
/// The kernel validates the program (EINVAL if it is malformed).
pub fn attach_reuseport_cbpf(sock: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .ok()
        .filter(|&n| n > 0 && i32::from(n) <= libc::BPF_MAXINSNS)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "BPF program must have 1..=4096 instructions")
        })?;
    let fprog = libc::sock_fprog { len, filter: program.as_ptr().cast_mut() };
    // SAFETY: setsockopt reads a sock_fprog of the exact size given, whose
    // filter pointer and length describe the live `program` slice; the
    // kernel copies the instructions during the call and never writes
    // through the pointer.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::{SocketAddr, UdpSocket};
    use std::time::{Duration, Instant};

    /// The worker byte's offset in the relay's single-host CIDs
    /// (`[first octet, worker, nonce...]`).
    const SINGLE_HOST_WORKER_OFFSET: usize = 1;
    /// With a 3-byte host prefix: `[first octet, prefix x 3, worker, ...]`.
    const PREFIXED_WORKER_OFFSET: usize = 4;

    /// `n` UDP sockets in one SO_REUSEPORT group on a fresh 127.0.0.1
    /// port, bound in index order, nonblocking.
    fn group(n: usize) -> (Vec<UdpSocket>, SocketAddr) {
        let first = reuseport_socket();
        first.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let mut socks = vec![UdpSocket::from(first)];
        for _ in 1..n {
            let s = reuseport_socket();
            s.bind(&addr.into()).unwrap();
            socks.push(s.into());
        }
        (socks, addr)
    }

    fn reuseport_socket() -> Socket {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_reuse_port(true).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// A short-header packet whose DCID names `worker` at `offset`.
    fn short_header(offset: usize, worker: u8, tag: u16) -> Vec<u8> {
        let mut p = vec![0x40 | (tag as u8 & 0x3f)];
        let mut cid = vec![0x0f; 16 + offset];
        cid[1..offset].fill(0xab);
        cid[offset] = worker;
        p.extend_from_slice(&cid);
        p.extend_from_slice(&tag.to_be_bytes()); // identifies the datagram
        p.extend_from_slice(&[0xee; 24]);
        p
    }

    /// Sends each datagram from its own client socket (a fresh source
    /// port each) and returns, per datagram, the indices of the group
    /// sockets that received it. Datagrams must be distinct. Receives are
    /// nonblocking and bounded by a deadline, so a lost datagram shows up
    /// as an empty entry rather than a hang.
    fn deliver(socks: &[UdpSocket], addr: SocketAddr, datagrams: &[Vec<u8>]) -> Vec<Vec<usize>> {
        let clients: Vec<UdpSocket> = datagrams
            .iter()
            .map(|d| {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                assert_eq!(c.send_to(d, addr).unwrap(), d.len());
                c
            })
            .collect();
        let mut got: Vec<Vec<usize>> = vec![Vec::new(); datagrams.len()];
        let mut buf = [0u8; 2048];
        let which =
            |bytes: &[u8]| datagrams.iter().position(|d| d[..] == *bytes).expect("a datagram we sent");
        let mut received = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while received < datagrams.len() && Instant::now() < deadline {
            let mut idle = true;
            for (i, s) in socks.iter().enumerate() {
                match s.recv(&mut buf) {
                    Ok(n) => {
                        idle = false;
                        got[which(&buf[..n])].push(i);
                        received += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("recv: {e}"),
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Anything still queued would be a duplicate: drain once more.
        std::thread::sleep(Duration::from_millis(20));
        for (i, s) in socks.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                got[which(&buf[..n])].push(i);
            }
        }
        drop(clients);
        got
    }

    fn assert_steered(workers: u8, offset: usize) {
        let (socks, addr) = group(usize::from(workers));
        attach_reuseport_cbpf(&socks[0], &reuseport_cbpf_program(offset, workers))
            .expect("SO_ATTACH_REUSEPORT_CBPF (Linux 4.5+)");
        let datagrams: Vec<Vec<u8>> =
            (0..64u16).map(|i| short_header(offset, (i % u16::from(workers)) as u8, i)).collect();
        let got = deliver(&socks, addr, &datagrams);
        for (i, d) in datagrams.iter().enumerate() {
            let worker = usize::from(d[1 + offset]);
            assert_eq!(got[i], vec![worker], "datagram {i} for worker {worker} landed on {:?}", got[i]);
        }
    }

    #[test]
    fn short_headers_reach_the_named_worker_of_two() {
        assert_steered(2, SINGLE_HOST_WORKER_OFFSET);
    }

    #[test]
    fn short_headers_reach_the_named_worker_of_three() {
        assert_steered(3, SINGLE_HOST_WORKER_OFFSET);
    }

    #[test]
    fn steering_follows_the_worker_offset() {
        assert_steered(3, PREFIXED_WORKER_OFFSET);
    }

    /// Control for the tests above: without the program the kernel hashes
    /// the 4-tuple and some datagrams land on another socket than the one
    /// their CID names (all 64 matching by chance has odds of 2^-64), so
    /// the steering tests would catch a program that did nothing.
    #[test]
    fn without_the_program_the_hash_ignores_the_cid() {
        let (socks, addr) = group(2);
        let datagrams: Vec<Vec<u8>> =
            (0..64u16).map(|i| short_header(SINGLE_HOST_WORKER_OFFSET, (i % 2) as u8, i)).collect();
        let got = deliver(&socks, addr, &datagrams);
        assert!(got.iter().all(|g| g.len() == 1), "every datagram once: {got:?}");
        let mismatched = datagrams.iter().zip(&got).filter(|(d, g)| g[0] != usize::from(d[1])).count();
        assert!(mismatched > 0, "hash placed all 64 datagrams on their named socket");
    }

    /// Long headers, worker bytes past the group, and datagrams too short
    /// to hold the worker byte (including an empty one) all fall back to
    /// the hash: each arrives exactly once, none is lost.
    #[test]
    fn unsteerable_datagrams_fall_back_without_loss() {
        let workers = 3u8;
        let offset = PREFIXED_WORKER_OFFSET;
        let (socks, addr) = group(usize::from(workers));
        // Any member can attach the group's program.
        attach_reuseport_cbpf(&socks[1], &reuseport_cbpf_program(offset, workers)).unwrap();
        let mut datagrams = Vec::new();
        for i in 0..32u16 {
            // Long header (Initial-shaped) whose byte at the short-header
            // worker position would name worker 0.
            let mut long = vec![0xc0 | (i as u8 & 0x0f), 0, 0, 0, 1, 8];
            long.extend_from_slice(&[0; 8]);
            long.extend_from_slice(&i.to_be_bytes());
            datagrams.push(long);
            // Worker bytes 255 down to 224 name no socket.
            datagrams.push(short_header(offset, 255 - i as u8, i));
        }
        // Short datagrams: empty, every length below the worker byte, and
        // 32 distinct ones that end just before it.
        let first_short = datagrams.len();
        for len in 0..=offset {
            datagrams.push(vec![0x40; len]);
        }
        for i in 0..32u8 {
            let mut d = vec![0x40 | (i & 0x3f); offset + 1];
            d[1] = i;
            datagrams.push(d);
        }
        let got = deliver(&socks, addr, &datagrams);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.len(), 1, "datagram {i} ({:02x?}) received {} times", datagrams[i], g.len());
        }
        // The short ones were hashed, not all sent to socket 0 as an
        // unguarded load past the end (which returns 0) would do; all 37
        // from distinct ports hashing to socket 0 has odds of 3^-37.
        assert!(
            got[first_short..].iter().any(|g| g[0] != 0),
            "every too-short datagram went to socket 0: the length guard is not working"
        );
    }

    /// Programs for which every packet is too short (huge offsets) still
    /// load and hash everything; `workers == 0` steers nothing.
    #[test]
    fn degenerate_programs_are_valid_and_hash_everything() {
        let largest = i32::MAX as usize - 2;
        for (offset, workers) in [(usize::MAX, 2u8), (1 << 40, 2), (largest + 1, 2), (largest, 2), (1, 0)] {
            let (socks, addr) = group(2);
            attach_reuseport_cbpf(&socks[0], &reuseport_cbpf_program(offset, workers)).unwrap();
            let datagrams: Vec<Vec<u8>> = (0..8u16).map(|i| short_header(1, 1, i)).collect();
            let got = deliver(&socks, addr, &datagrams);
            assert!(got.iter().all(|g| g.len() == 1), "{offset} {workers}: {got:?}");
        }
    }

    #[test]
    fn attach_rejects_empty_and_malformed_programs() {
        let (socks, _) = group(1);
        let empty = attach_reuseport_cbpf(&socks[0], &[]).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::InvalidInput);
        // No return instruction: the kernel's checker refuses it.
        let no_ret = [stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_LEN, 0)];
        let e = attach_reuseport_cbpf(&socks[0], &no_ret).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }

    #[test]
    fn attach_needs_so_reuseport() {
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = attach_reuseport_cbpf(&plain, &reuseport_cbpf_program(1, 2)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }

    fn fields(f: &libc::sock_filter) -> (u16, u8, u8, u32) {
        (f.code, f.jt, f.jf, f.k)
    }

    #[test]
    fn program_listing() {
        let p: Vec<_> = reuseport_cbpf_program(5, 4).iter().map(fields).collect();
        assert_eq!(
            p,
            vec![
                (0x80, 0, 0, 0),           // ld #len
                (0x35, 0, 5, 7),           // jge #7 (1 + 5 + 1), next, ret hash
                (0x30, 0, 0, 0),           // ldb [0]
                (0x45, 3, 0, 0x80),        // jset #0x80, ret hash, next
                (0x30, 0, 0, 6),           // ldb [6]
                (0x35, 1, 0, 4),           // jge #4, ret hash, next
                (0x16, 0, 0, 0),           // ret a
                (0x06, 0, 0, 0xffff_ffff), // ret #0xffffffff
            ]
        );
        // Every jump lands inside the program and it ends in a return.
        for (i, (code, jt, jf, _)) in p.iter().enumerate() {
            if u32::from(*code) & 0x07 == libc::BPF_JMP {
                assert!(i + 1 + usize::from(*jt.max(jf)) < p.len());
            }
        }
        // The largest offset the kernel can load from, and one past it.
        let p = reuseport_cbpf_program(i32::MAX as usize - 2, 4);
        assert_eq!((p.len(), p[1].k, p[4].k), (8, i32::MAX as u32, i32::MAX as u32 - 1));
        for offset in [i32::MAX as usize - 1, usize::MAX] {
            let p: Vec<_> = reuseport_cbpf_program(offset, 4).iter().map(fields).collect();
            assert_eq!(p, vec![(0x06, 0, 0, HASH_FALLBACK)]);
        }
    }

    /// Interprets the program the way the kernel does for an skb, for the
    /// shape of every packet length and first byte: a short header returns
    /// its worker byte when below `workers`, anything else the fallback,
    /// and no load ever runs past the packet.
    #[test]
    fn program_semantics_match_the_contract() {
        fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
            let (mut a, mut pc) = (0u32, 0usize);
            loop {
                let f = &prog[pc];
                let code = u32::from(f.code);
                match code {
                    c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_LEN => a = pkt.len() as u32,
                    c if c == libc::BPF_LD | libc::BPF_B | libc::BPF_ABS => match pkt.get(f.k as usize) {
                        Some(&b) => a = u32::from(b),
                        None => panic!("load past the packet end at {} (len {})", f.k, pkt.len()),
                    },
                    c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => {
                        pc += usize::from(if a >= f.k { f.jt } else { f.jf });
                    }
                    c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                        pc += usize::from(if a & f.k != 0 { f.jt } else { f.jf });
                    }
                    c if c == libc::BPF_RET | libc::BPF_A => return a,
                    c if c == libc::BPF_RET | libc::BPF_K => return f.k,
                    _ => panic!("unexpected opcode {code:#x}"),
                }
                pc += 1;
            }
        }
        for offset in [1usize, 4, 15] {
            for workers in [0u8, 1, 2, 3, 255] {
                let prog = reuseport_cbpf_program(offset, workers);
                for len in 0..offset + 4 {
                    for first in [0x00u8, 0x40, 0x7f, 0x80, 0xc0, 0xff] {
                        for worker in [0u8, 1, 2, 3, 254, 255] {
                            let mut pkt = vec![0u8; len];
                            if let Some(b) = pkt.first_mut() {
                                *b = first;
                            }
                            if let Some(b) = pkt.get_mut(1 + offset) {
                                *b = worker;
                            }
                            let want = if len >= offset + 2 && first & 0x80 == 0 && worker < workers {
                                u32::from(worker)
                            } else {
                                HASH_FALLBACK
                            };
                            assert_eq!(
                                run(&prog, &pkt),
                                want,
                                "offset {offset} workers {workers} {pkt:02x?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

use std::collections::HashSet;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use socket2::SockAddr;

use super::*;
use crate::uring::BufRing;
use crate::uring::testutil::{Cqe, cancel, push, require_uring, ring, wait};
use crate::{MAX_GRO_BUFFER, enable_gro, send_segments, setsockopt_int};

// ---- synthetic completions: the parser alone ----

/// A completion as the kernel lays it out for template `recv`.
fn completion(recv: &MultishotRecv, name: &[u8], control: &[u8], payload: &[u8], flags: u32) -> Vec<u8> {
    let namelen = recv.t.msg.msg_namelen as usize;
    let mut b = Vec::new();
    b.extend((name.len() as u32).to_ne_bytes());
    b.extend((control.len() as u32).to_ne_bytes());
    b.extend((payload.len() as u32).to_ne_bytes());
    b.extend(flags.to_ne_bytes());
    let mut area = name.to_vec();
    area.resize(namelen, 0);
    b.extend(area);
    let mut area = control.to_vec();
    area.resize(RECV_CONTROL_LEN, 0);
    b.extend(area);
    b.extend(payload);
    b
}

fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
    let len = 16 + data.len();
    let mut c = Vec::new();
    c.extend(len.to_ne_bytes());
    c.extend(level.to_ne_bytes());
    c.extend(kind.to_ne_bytes());
    c.extend(data);
    c.resize(len.next_multiple_of(8), 0);
    c
}

fn gro(stride: i32) -> Vec<u8> {
    cmsg(SOL_UDP, UDP_GRO, &stride.to_ne_bytes())
}

fn sockaddr_bytes(addr: SocketAddr) -> Vec<u8> {
    let sa = SockAddr::from(addr);
    // SAFETY: `as_ptr` points at `len` initialised bytes of the address.
    unsafe { std::slice::from_raw_parts(sa.as_ptr().cast::<u8>(), sa.len() as usize) }.to_vec()
}

#[test]
fn parser_splits_by_the_gro_stride_and_reads_every_family() {
    let recv = MultishotRecv::unconnected();
    let payload: Vec<u8> = (0..250u8).collect();
    let mut control = cmsg(libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &[0; 16]);
    control.extend(gro(100));
    for from in ["192.0.2.7:443", "[2001:db8::1]:8443", "[::ffff:192.0.2.7]:53"] {
        let from: SocketAddr = from.parse().unwrap();
        let buf = completion(&recv, &sockaddr_bytes(from), &control, &payload, 0);
        let msg = recv.parse(&buf).unwrap();
        assert_eq!(msg.from, Some(from), "v4-mapped stays v6");
        assert!(!msg.truncated);
        assert_eq!(msg.segment_size, 100);
        assert_eq!(msg.segments(), 3);
        let parts: Vec<&[u8]> = msg.datagrams().collect();
        assert_eq!(parts, vec![&payload[..100], &payload[100..200], &payload[200..]]);
    }
    // Without a GRO message the payload is one datagram.
    let buf = completion(&recv, &sockaddr_bytes("10.0.0.1:1".parse().unwrap()), &[], &payload, 0);
    let msg = recv.parse(&buf).unwrap();
    assert_eq!((msg.segment_size, msg.segments()), (250, 1));
    // A zero-length datagram is one (empty) datagram.
    let buf = completion(&recv, &sockaddr_bytes("10.0.0.1:1".parse().unwrap()), &[], &[], 0);
    let msg = recv.parse(&buf).unwrap();
    assert_eq!(msg.datagrams().collect::<Vec<_>>(), vec![&[][..]]);
    assert_eq!(msg.segments(), 1);
}

#[test]
fn parser_flags_truncation_and_rejects_bad_input() {
    let recv = MultishotRecv::unconnected();
    let name = sockaddr_bytes("10.0.0.1:1".parse().unwrap());
    for flags in [libc::MSG_TRUNC as u32, libc::MSG_CTRUNC as u32] {
        let buf = completion(&recv, &name, &[], b"abc", flags);
        assert!(recv.parse(&buf).unwrap().truncated, "flags {flags:#x}");
    }
    // The header claims more payload than the completion holds.
    let mut buf = completion(&recv, &name, &[], b"abcdef", 0);
    buf.truncate(buf.len() - 2);
    let msg = recv.parse(&buf).unwrap();
    assert!(msg.truncated);
    assert_eq!(msg.payload, b"abcd");
    // Shorter than header + name + control areas.
    assert_eq!(recv.parse(&buf[..recv.header_len() - 1]), Err(RecvError::Short));
    assert_eq!(recv.parse(&[]), Err(RecvError::Short));
    // Not an IP address, or an address cut short.
    let unix = 1u16.to_ne_bytes();
    assert_eq!(recv.parse(&completion(&recv, &unix, &[], b"x", 0)), Err(RecvError::BadAddress));
    assert_eq!(recv.parse(&completion(&recv, &name[..8], &[], b"x", 0)), Err(RecvError::BadAddress));
    // A connected template has no name area.
    let connected = MultishotRecv::connected();
    let buf = completion(&connected, &[], &gro(2), b"abcde", 0);
    let msg = connected.parse(&buf).unwrap();
    assert_eq!((msg.from, msg.segment_size, msg.segments()), (None, 2, 3));
}

#[test]
fn malformed_control_messages_are_ignored_without_panicking() {
    let recv = MultishotRecv::connected();
    // Zero, short and oversize lengths; a GRO message with a bad stride.
    let mut cases: Vec<Vec<u8>> = vec![
        cmsg(SOL_UDP, UDP_GRO, &[]),
        gro(0),
        gro(-5),
        {
            let mut c = gro(100);
            c[..8].copy_from_slice(&0usize.to_ne_bytes());
            c
        },
        {
            let mut c = gro(100);
            c[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
            c
        },
        {
            let mut c = gro(100);
            c[..8].copy_from_slice(&(RECV_CONTROL_LEN + 8).to_ne_bytes());
            c
        },
    ];
    // Every single-byte corruption of a valid two-message area.
    let mut valid = cmsg(libc::SOL_IP, libc::IP_TOS, &[0]);
    valid.extend(gro(7));
    for i in 0..valid.len() {
        for v in [0u8, 1, 0x7f, 0xff] {
            let mut c = valid.clone();
            c[i] = v;
            cases.push(c);
        }
    }
    for control in cases {
        let payload = [5u8; 30];
        let buf = completion(&recv, &[], &control, &payload, 0);
        let msg = recv.parse(&buf).unwrap();
        assert!(msg.segment_size > 0);
        assert_eq!(msg.datagrams().map(<[u8]>::len).sum::<usize>(), 30);
        // And every prefix of the completion.
        for n in 0..buf.len() {
            let _ = recv.parse(&buf[..n]);
        }
    }
}

// ---- the kernel ----

const RX: u64 = 0x5245_4356;

fn pair() -> (UdpSocket, UdpSocket) {
    (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap())
}

/// Takes the completion's buffer, checks its bookkeeping and parses it into
/// owned datagrams; recycles it unless `keep`.
fn read(
    br: &mut BufRing,
    recv: &MultishotRecv,
    c: &Cqe,
    keep: bool,
) -> (u16, Option<SocketAddr>, bool, Vec<Vec<u8>>) {
    assert!(c.result >= 0, "receive failed: {c:?}");
    let bid = br.take(c.flags).expect("completion without a valid buffer");
    let msg = recv.parse(br.buffer(bid, c.result as usize).expect("result fits the buffer")).unwrap();
    let datagrams = msg.datagrams().map(<[u8]>::to_vec).collect();
    let out = (bid, msg.from, msg.truncated, datagrams);
    if !keep {
        assert!(br.recycle(bid));
    }
    out
}

/// Ends the request if still armed, then unregisters the group.
fn teardown(ring: &mut IoUring, br: &mut BufRing, armed: bool) {
    if armed {
        cancel(ring, RX);
    }
    br.unregister(&ring.submitter()).unwrap();
}

fn datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut d = seq.to_le_bytes().to_vec();
    d.resize(len, seq as u8);
    d
}

/// 2000 datagrams in GSO batches of 1 to 40 (a third end with a short
/// one) through a multishot recvmsg on a GRO socket with 8 buffers: every
/// datagram comes back exactly, in order, from the right sender, and the
/// buffers are recycled and reused.
#[test]
fn multishot_gro_receive_splits_super_packets_and_recycles_buffers() {
    let Some(_) = require_uring() else { return };
    let mut ring = ring(64);
    let (a, b) = pair();
    assert!(enable_gro(&b).unwrap(), "kernel lacks UDP_GRO");
    let recv = MultishotRecv::unconnected();
    let size = recv.buffer_size_for(MAX_GRO_BUFFER) as u32;
    let mut br = BufRing::new(&ring.submitter(), 1, 8, size).unwrap();
    let entry = recv.entry(b.as_raw_fd(), br.bgid(), RX);
    push(&mut ring, &entry);
    let (mut armed, mut rearms, mut enobufs) = (true, 0, 0);
    let (mut completions, mut coalesced) = (0usize, 0usize);
    let mut bids = HashSet::new();
    let mut lens = Vec::new();
    let mut next = 0usize;
    let dest = SockAddr::from(b.local_addr().unwrap());
    let from = a.local_addr().unwrap();
    for batch in 0usize.. {
        if lens.len() == 2000 {
            break;
        }
        let n = (1 + batch * 7 % 40).min(2000 - lens.len());
        let mut buf = Vec::new();
        for k in 0..n {
            let len = if batch % 3 == 0 && k == n - 1 { 100 + batch % 200 } else { 1000 };
            buf.extend(datagram(lens.len() as u32, len));
            lens.push(len);
        }
        assert_eq!(send_segments(&a, &buf, 1000, Some(&dest)).unwrap(), buf.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        while next < lens.len() {
            assert!(Instant::now() < deadline, "stuck at datagram {next} of {}", lens.len());
            if !armed {
                push(&mut ring, &entry);
                (armed, rearms) = (true, rearms + 1);
            }
            for c in wait(&mut ring, 1, Duration::from_millis(200)) {
                assert_eq!(c.user_data, RX);
                armed &= c.more();
                if c.result == -libc::ENOBUFS && !c.more() {
                    enobufs += 1;
                    continue;
                }
                let (bid, sender, truncated, datagrams) = read(&mut br, &recv, &c, false);
                assert!(c.more(), "a data completion ended the request: {c:?}");
                assert!(!truncated);
                assert_eq!(sender, Some(from));
                bids.insert(bid);
                completions += 1;
                coalesced += usize::from(datagrams.len() > 1);
                for d in datagrams {
                    assert!(next < lens.len(), "more datagrams than sent");
                    assert_eq!(d, datagram(next as u32, lens[next]), "datagram {next}");
                    next += 1;
                }
            }
        }
    }
    eprintln!(
        "2000 datagrams: {completions} completions, {coalesced} coalesced, {rearms} re-arms ({enobufs} ENOBUFS)"
    );
    assert_eq!(br.with_app(), 0);
    assert!(coalesced > 0, "GRO coalesced nothing");
    assert_eq!(bids.len(), 8, "every buffer was used");
    assert!(completions > 8, "buffers were reused");
    teardown(&mut ring, &mut br, armed);
}

/// With two buffers and no recycling the third arrival ends the request
/// with -ENOBUFS (no F_MORE, no buffer); the datagrams stay queued, and
/// after recycling the same entry re-armed picks them up. An empty ring
/// ends the request even when no datagram is waiting.
#[test]
fn exhausted_buffer_ring_ends_the_multishot_and_rearming_resumes() {
    let Some(_) = require_uring() else { return };
    let mut ring = ring(16);
    let (a, b) = pair();
    let to = b.local_addr().unwrap();
    for i in 0..4u8 {
        a.send_to(&[i; 10], to).unwrap();
    }
    let recv = MultishotRecv::unconnected();
    let mut br = BufRing::new(&ring.submitter(), 2, 2, recv.buffer_size_for(64) as u32).unwrap();
    let entry = recv.entry(b.as_raw_fd(), br.bgid(), RX);
    push(&mut ring, &entry);
    let got = wait(&mut ring, 3, Duration::from_secs(2));
    assert_eq!(got.len(), 3, "{got:?}");
    let mut held = Vec::new();
    for (i, c) in got[..2].iter().enumerate() {
        assert!(c.more(), "{c:?}");
        let (bid, _, _, d) = read(&mut br, &recv, c, true);
        assert_eq!(d, vec![vec![i as u8; 10]]);
        held.push(bid);
    }
    assert_eq!(got[2].result, -libc::ENOBUFS, "{got:?}");
    assert!(!got[2].more());
    assert_eq!(io_uring::cqueue::buffer_select(got[2].flags), None);
    assert!(wait(&mut ring, 1, Duration::from_millis(100)).is_empty(), "the request has ended");

    for bid in held {
        assert!(br.recycle(bid));
    }
    push(&mut ring, &entry);
    // The two queued datagrams take both buffers; the ring is then empty
    // and the request ends again, although no datagram is waiting: the
    // kernel selects a buffer before it looks at the socket.
    let got = wait(&mut ring, 3, Duration::from_secs(2));
    assert_eq!(got.len(), 3, "{got:?}");
    let mut held = Vec::new();
    for (i, c) in got[..2].iter().enumerate() {
        assert!(c.more());
        let (bid, _, _, d) = read(&mut br, &recv, c, true);
        assert_eq!(d, vec![vec![i as u8 + 2; 10]]);
        held.push(bid);
    }
    assert_eq!((got[2].result, got[2].more()), (-libc::ENOBUFS, false), "{got:?}");
    for bid in held {
        assert!(br.recycle(bid));
    }
    push(&mut ring, &entry);
    assert!(wait(&mut ring, 1, Duration::from_millis(100)).is_empty(), "armed and idle");
    a.send_to(&[4; 10], to).unwrap();
    let got = wait(&mut ring, 1, Duration::from_secs(2));
    assert_eq!(read(&mut br, &recv, &got[0], false).3, vec![vec![4u8; 10]]);
    teardown(&mut ring, &mut br, got[0].more());
}

/// A connected socket's template has no name area: `from` is None.
#[test]
fn connected_socket_has_no_sender() {
    let Some(_) = require_uring() else { return };
    let mut ring = ring(8);
    let (a, b) = pair();
    b.connect(a.local_addr().unwrap()).unwrap();
    let recv = MultishotRecv::connected();
    assert_eq!(recv.header_len(), 16 + RECV_CONTROL_LEN);
    let mut br = BufRing::new(&ring.submitter(), 3, 4, recv.buffer_size_for(2048) as u32).unwrap();
    push(&mut ring, &recv.entry(b.as_raw_fd(), br.bgid(), RX));
    a.send_to(b"ping", b.local_addr().unwrap()).unwrap();
    let got = wait(&mut ring, 1, Duration::from_secs(2));
    let c = got.first().expect("a completion");
    let bid = br.take(c.flags).unwrap();
    let msg = recv.parse(br.buffer(bid, c.result as usize).unwrap()).unwrap();
    assert_eq!((msg.from, msg.payload, msg.segment_size, msg.truncated), (None, &b"ping"[..], 4, false));
    br.recycle(bid);
    teardown(&mut ring, &mut br, c.more());
}

/// A payload larger than the buffer and control data larger than the
/// control area are both flagged; the request stays armed.
#[test]
fn truncated_payload_and_control_are_flagged() {
    let Some(_) = require_uring() else { return };
    let mut ring = ring(8);
    let (a, b) = pair();
    let to = b.local_addr().unwrap();
    let recv = MultishotRecv::unconnected();
    let mut br = BufRing::new(&ring.submitter(), 4, 4, recv.buffer_size_for(100) as u32).unwrap();
    push(&mut ring, &recv.entry(b.as_raw_fd(), br.bgid(), RX));
    let mut one = |len: usize| {
        a.send_to(&vec![0xab; len], to).unwrap();
        let got = wait(&mut ring, 1, Duration::from_secs(2));
        let c = *got.first().expect("a completion");
        assert!(c.more());
        let bid = br.take(c.flags).unwrap();
        let msg = recv.parse(br.buffer(bid, c.result as usize).unwrap()).unwrap();
        let out = (msg.truncated, msg.payload.len());
        br.recycle(bid);
        out
    };
    assert_eq!(one(500), (true, 100), "MSG_TRUNC");
    assert_eq!(one(50), (false, 50));
    // 88+ bytes of control messages do not fit 64: MSG_CTRUNC.
    let fd = b.as_raw_fd();
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1).unwrap();
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).unwrap();
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1).unwrap();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).unwrap();
    assert_eq!(one(60), (true, 60), "MSG_CTRUNC");
    teardown(&mut ring, &mut br, true);
}

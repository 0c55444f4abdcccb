//! UDP socket setup shared by the QUIC listener and target sockets.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel buffer size requested for every UDP socket.
pub const SOCKET_BUFFER: usize = 4 << 20;

fn new_udp(family_of: &SocketAddr) -> io::Result<Socket> {
    let domain = if family_of.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max (see
    // deploy/sysctl.conf).
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    Ok(s)
}

/// The QUIC listening socket of a worker (SO_REUSEPORT so every worker
/// binds the same address; the kernel adds the sockets to the reuseport
/// group in bind order, which the steering program relies on).
pub fn quic_listener(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = new_udp(&addr)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    // GRO lets one receive carry many packets from a sender; without kernel
    // support packets simply arrive one by one.
    if !relay_udp::enable_gro(&s)? {
        tracing::warn!("the kernel lacks UDP_GRO: one datagram per receive");
    }
    Ok(s.into())
}

/// A target socket connected to `target`, on an ephemeral port, with GRO
/// on (a busy target's replies arrive many per receive).
pub fn connected_target(target: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = new_udp(&target)?;
    let any: SocketAddr =
        if target.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    s.bind(&any.into())?;
    forbid_fragmentation(&s, target.is_ipv4())?;
    s.connect(&target.into())?;
    relay_udp::enable_gro(&s)?;
    Ok(s.into())
}

/// RFC 9298 section 3.1: "UDP proxies MUST NOT introduce fragmentation at
/// the IP layer ... In IPv4, the Don't Fragment (DF) bit MUST be set". An
/// oversize payload then fails with EMSGSIZE and is dropped (counted).
fn forbid_fragmentation(s: &Socket, v4: bool) -> io::Result<()> {
    let (level, name, value) = if v4 {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    };
    set_int_option(s, level, name, value)
}

#[allow(unsafe_code)]
fn set_int_option(s: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a live socket with a pointer to an int and its
    // exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn get_int_option(s: &impl std::os::fd::AsRawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a live int with its exact size.
        let rc = unsafe {
            libc::getsockopt(s.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len)
        };
        assert_eq!(rc, 0);
        value
    }

    #[test]
    fn target_sockets_are_connected_and_refuse_fragmentation() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sock = connected_target(echo.local_addr().unwrap()).unwrap();
        sock.send(b"ping").unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = echo.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, sock.local_addr().unwrap());
        assert_eq!(get_int_option(&sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER), libc::IP_PMTUDISC_DO);
    }
}

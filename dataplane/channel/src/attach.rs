//! The attach handshake's socket I/O: frames of
//! [`relay_proto::channel::bootstrap`] over control's Unix socket, with
//! descriptors attached (SCM_RIGHTS).
//!
//! A frame's length prefix is checked against
//! [`MAX_FRAME`](relay_proto::channel::bootstrap::MAX_FRAME) before its body
//! is allocated or read, and [`recv_before`] bounds the whole frame by one
//! deadline, so a peer that sends slowly cannot hold the reader longer
//! than that.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use relay_proto::channel::bootstrap::{self, BootstrapError, FRAME_PREFIX};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fdpass;

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket I/O failed (a deadline that passed is `TimedOut`).
    #[error("channel socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the socket.
    #[error("peer closed the channel socket")]
    Closed,
    /// The frame or its content was refused.
    #[error(transparent)]
    Frame(#[from] BootstrapError),
}

/// Sends `value` as one frame with `fds` attached.
pub fn send<T: Serialize>(sock: &UnixStream, value: &T, fds: &[&dyn AsRawFd]) -> Result<(), HandshakeError> {
    let bytes = bootstrap::encode_frame(value)?;
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if raw.is_empty() {
        (&*sock).write_all(&bytes)?;
    } else {
        fdpass::send_with_fds(sock, &bytes, &raw)?;
    }
    Ok(())
}

/// Receives one frame and the descriptors attached to it, waiting as long
/// as the socket's own read timeout allows for each read.
pub fn recv<T: DeserializeOwned>(sock: &UnixStream) -> Result<(T, Vec<OwnedFd>), HandshakeError> {
    recv_frame(sock, None)
}

/// Receives one frame and its descriptors, all of it by `deadline`
/// (`TimedOut` after it). Leaves the socket's read timeout set.
pub fn recv_before<T: DeserializeOwned>(
    sock: &UnixStream,
    deadline: Instant,
) -> Result<(T, Vec<OwnedFd>), HandshakeError> {
    recv_frame(sock, Some(deadline))
}

/// Sets the socket's read timeout to what is left before `deadline`.
fn arm(sock: &UnixStream, deadline: Option<Instant>) -> io::Result<()> {
    let Some(deadline) = deadline else { return Ok(()) };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake frame not complete in time"));
    }
    sock.set_read_timeout(Some(left))
}

/// A read timeout shows as EAGAIN; say what it is.
fn timed_out(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock => HandshakeError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake frame not complete in time",
        )),
        _ => HandshakeError::Io(e),
    }
}

/// Fills `buf` from the socket; end of stream is [`HandshakeError::Closed`].
fn read_full(sock: &UnixStream, buf: &mut [u8], deadline: Option<Instant>) -> Result<(), HandshakeError> {
    let mut got = 0;
    while got < buf.len() {
        arm(sock, deadline)?;
        match (&*sock).read(&mut buf[got..]) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    Ok(())
}

fn recv_frame<T: DeserializeOwned>(
    sock: &UnixStream,
    deadline: Option<Instant>,
) -> Result<(T, Vec<OwnedFd>), HandshakeError> {
    let mut prefix = [0u8; FRAME_PREFIX];
    // The descriptors arrive with the frame's first bytes.
    arm(sock, deadline)?;
    let (n, fds) = fdpass::recv_with_fds(sock, &mut prefix).map_err(timed_out)?;
    if n == 0 {
        return Err(HandshakeError::Closed);
    }
    read_full(sock, &mut prefix[n..], deadline)?;
    let len = bootstrap::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    read_full(sock, &mut body, deadline)?;
    Ok((bootstrap::decode_body(&body)?, fds))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use relay_proto::channel::bootstrap::{Hello, PROTOCOL_VERSION};

    use super::*;
    use crate::doorbell::Doorbell;

    #[test]
    fn hello_with_and_without_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, &Hello { version: PROTOCOL_VERSION, pid: 7, qlog: false }, &[]).unwrap();
        let (hello, fds): (Hello, _) = recv(&b).unwrap();
        assert_eq!(hello.pid, 7);
        assert!(fds.is_empty());
        let bell = Doorbell::new().unwrap();
        send(&b, &Hello { version: 9, pid: 1, qlog: false }, &[&bell]).unwrap();
        let (hello, fds): (Hello, _) = recv(&a).unwrap();
        assert_eq!(fds.len(), 1);
        assert!(bootstrap::check_version(hello.version).is_err());
        drop(b);
        assert!(matches!(recv::<Hello>(&a), Err(HandshakeError::Closed)));
    }

    #[test]
    fn refuses_garbage_huge_and_cut_frames() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&3u32.to_le_bytes()).unwrap();
        (&a).write_all(b"{x}").unwrap();
        assert!(matches!(recv::<Hello>(&b), Err(HandshakeError::Frame(BootstrapError::Invalid(_)))));
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(recv::<Hello>(&b), Err(HandshakeError::Frame(BootstrapError::Invalid(_)))));
        // A prefix promising more than ever comes.
        (&a).write_all(&100u32.to_le_bytes()).unwrap();
        (&a).write_all(b"{\"version\":").unwrap();
        drop(a);
        assert!(matches!(recv::<Hello>(&b), Err(HandshakeError::Closed)));
    }

    /// A peer that trickles a frame byte by byte cannot hold the reader
    /// past the deadline, however often it sends.
    #[test]
    fn a_trickled_frame_times_out_at_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let frame =
            bootstrap::encode_frame(&Hello { version: PROTOCOL_VERSION, pid: 1, qlog: false }).unwrap();
        let trickle = std::thread::spawn(move || {
            for byte in frame {
                if (&a).write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        let got = recv_before::<Hello>(&b, started + Duration::from_millis(200));
        let waited = started.elapsed();
        match got {
            Err(HandshakeError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("{other:?}"),
        }
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
        drop(b);
        trickle.join().unwrap();
        // In time, the same frame is read whole.
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, &Hello { version: PROTOCOL_VERSION, pid: 2, qlog: false }, &[]).unwrap();
        let (hello, _) = recv_before::<Hello>(&b, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(hello.pid, 2);
    }
}

//! The relay's reliable-stream-reset patch on quiche
//! (dataplane/vendor/README.md): with `Config::enable_reset_stream_at`
//! quiche announces the empty `reset_stream_at` transport parameter and
//! accepts RESET_STREAM_AT frames (draft-ietf-quic-reliable-stream-reset):
//! the stream's data up to the reliable size is delivered, then the reset.
//! WebTransport over HTTP/3 needs it (draft-ietf-webtrans-http3-16 sections
//! 3.1 and 4.4: a reset must not lose a stream's header).
//!
//! quiche's test pipe (its `internal` feature) connects a client and a
//! server in memory and sends the frames quiche does not send itself.

mod common;

use quiche::test_utils::Pipe;

/// A self-signed certificate (both ends of the pipe share the
/// configuration).
fn tls() -> boring::ssl::SslContextBuilder {
    common::self_signed_tls("quic.tech")
}

/// An established pipe; both ends announce reset_stream_at when `on`.
fn pipe(on: bool) -> Pipe {
    let mut c = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, tls()).expect("config");
    c.set_application_protos(&[b"test"]).expect("alpn");
    c.verify_peer(false);
    c.set_initial_max_data(1 << 20);
    c.set_initial_max_stream_data_bidi_local(1 << 16);
    c.set_initial_max_stream_data_bidi_remote(1 << 16);
    c.set_initial_max_streams_bidi(10);
    c.enable_reset_stream_at(on);
    let mut p = Pipe::with_config(&mut c).expect("pipe");
    p.handshake().expect("handshake");
    p
}

const BODY: &[u8] = &[7; 100];

#[test]
fn the_transport_parameter_is_announced_only_when_enabled() {
    let p = pipe(true);
    assert!(p.client.peer_transport_params().expect("server's parameters").reset_stream_at);
    assert!(p.server.peer_transport_params().expect("client's parameters").reset_stream_at);
    let p = pipe(false);
    assert!(!p.client.peer_transport_params().expect("server's parameters").reset_stream_at);
}

#[test]
fn the_reliable_prefix_is_delivered_then_the_reset() {
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    let mut buf = [0u8; 1000];
    p.send_reset_stream_at_to_server(0, 7, 100, 10, &mut buf).unwrap();
    let mut out = [0u8; 1000];
    // The 90 bytes past the reliable size are gone; the 10 before it come.
    assert_eq!(p.server.stream_recv(0, &mut out), Ok((10, false)));
    assert_eq!(&out[..10], &BODY[..10]);
    assert!(p.server.stream_readable(0), "the reset is still to be read");
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::StreamReset(7)));
}

#[test]
fn reliable_data_arriving_after_the_frame_is_still_delivered() {
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    // The client's packet with the data is held back...
    let mut held = [0u8; 1500];
    let (len, _) = p.client.send(&mut held).unwrap();
    // ...and the reset overtakes it.
    let mut buf = [0u8; 1000];
    p.send_reset_stream_at_to_server(0, 9, 100, 40, &mut buf).unwrap();
    let mut out = [0u8; 1000];
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::Done), "nothing to read yet");
    let info = quiche::RecvInfo { from: Pipe::client_addr(), to: Pipe::server_addr() };
    p.server.recv(&mut held[..len], info).unwrap();
    assert_eq!(p.server.stream_recv(0, &mut out), Ok((40, false)));
    assert_eq!(&out[..40], &BODY[..40]);
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::StreamReset(9)));
}

#[test]
fn a_reliable_size_already_read_is_a_plain_reset_and_a_later_frame_only_lowers_it() {
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    let mut out = [0u8; 30];
    assert_eq!(p.server.stream_recv(0, &mut out), Ok((30, false)));
    let mut buf = [0u8; 1000];
    // Reliable 50, then 20 (below what was read): the reset is at once.
    p.send_reset_stream_at_to_server(0, 3, 100, 50, &mut buf).unwrap();
    p.send_reset_stream_at_to_server(0, 3, 100, 20, &mut buf).unwrap();
    let mut out = [0u8; 1000];
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::StreamReset(3)));
}

#[test]
fn frames_the_peer_may_not_send_are_connection_errors() {
    // Not announced: RESET_STREAM_AT is not a frame of this connection.
    let mut p = pipe(false);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    let mut buf = [0u8; 1000];
    assert_eq!(p.send_reset_stream_at_to_server(0, 1, 100, 10, &mut buf), Err(quiche::Error::InvalidFrame));
    // A reliable size above the final size (FRAME_ENCODING_ERROR).
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    assert_eq!(p.send_reset_stream_at_to_server(0, 1, 100, 101, &mut buf), Err(quiche::Error::InvalidFrame));
    // A final size below the data received.
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    assert_eq!(p.send_reset_stream_at_to_server(0, 1, 50, 10, &mut buf), Err(quiche::Error::FinalSize));
}

#[test]
fn a_reset_at_sent_delivers_the_reliable_bytes_then_the_reset() {
    // Nothing sent yet: the first 10 bytes still go, the rest never does.
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    p.client.stream_reset_at(0, 5, 10).unwrap();
    p.advance().unwrap();
    let mut out = [0u8; 1000];
    assert_eq!(p.server.stream_recv(0, &mut out), Ok((10, false)));
    assert_eq!(&out[..10], &BODY[..10]);
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::StreamReset(5)));
    // Everything already sent: the final size is what was sent, the
    // reliable part is read before the reset.
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    p.client.stream_reset_at(0, 6, 40).unwrap();
    p.advance().unwrap();
    assert_eq!(p.server.stream_recv(0, &mut out), Ok((40, false)));
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::StreamReset(6)));
    // No more writes after it.
    assert!(p.client.stream_send(0, b"more", false).is_err());
}

#[test]
fn lost_reliable_bytes_are_sent_again_after_the_reset() {
    let mut p = pipe(true);
    p.client.stream_send(0, BODY, false).unwrap();
    // The packet with the data is lost.
    let mut lost = [0u8; 1500];
    p.client.send(&mut lost).unwrap();
    p.client.stream_reset_at(0, 8, 30).unwrap();
    p.advance().unwrap();
    let mut out = [0u8; 1000];
    // Bounded: the client's loss detection (a few probe timeouts on a pipe)
    // sends the 30 reliable bytes again.
    let mut read = Vec::new();
    for _ in 0..200 {
        match p.server.stream_recv(0, &mut out) {
            Ok((n, _)) => read.extend_from_slice(&out[..n]),
            Err(quiche::Error::StreamReset(code)) => {
                assert_eq!(code, 8);
                break;
            }
            Err(_) => {
                if let Some(t) = p.client.timeout() {
                    std::thread::sleep(t.min(std::time::Duration::from_millis(50)));
                }
                p.client.on_timeout();
                p.advance().unwrap();
            }
        }
    }
    assert_eq!(read, &BODY[..30], "the reliable bytes, then the reset");
}

#[test]
fn without_the_peers_parameter_a_reset_at_is_a_plain_reset() {
    let mut p = pipe(false);
    p.client.stream_send(0, BODY, false).unwrap();
    p.advance().unwrap();
    p.client.stream_reset_at(0, 4, 10).unwrap();
    p.advance().unwrap();
    let mut out = [0u8; 1000];
    // RESET_STREAM: the buffered data is gone with it.
    assert_eq!(p.server.stream_recv(0, &mut out), Err(quiche::Error::StreamReset(4)));
}

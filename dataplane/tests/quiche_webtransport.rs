//! The relay's WebTransport patch on quiche's HTTP/3 layer
//! (dataplane/vendor/README.md): with `h3::Config::enable_webtransport`,
//! a peer's unidirectional stream of type 0x54 and a peer's bidirectional
//! stream that starts with the signal value 0x41 are claimed after their
//! session ID (draft-ietf-webtrans-http3-14), reported once as
//! `Event::WebTransportStream`, and left to the application's
//! `stream_recv`/`stream_send`; `open_webtransport_stream` opens them.
//!
//! A quiche client and server connection pair exchange packets in memory.

mod common;

use std::net::SocketAddr;

use quiche::h3::{self, Event, Header};

const CLIENT: &str = "127.0.0.1:50000";
const SERVER: &str = "127.0.0.1:4433";

/// The varint encoding of the 0x41 signal value (two bytes: 0x41 > 63).
const SIGNAL: [u8; 2] = [0x40, 0x41];
/// The varint encoding of the 0x54 stream type.
const UNI_TYPE: [u8; 2] = [0x40, 0x54];

/// A self-signed certificate for `localhost`, in a server TLS context.
fn server_tls() -> boring::ssl::SslContextBuilder {
    common::self_signed_tls("localhost")
}

/// The QUIC configuration both sides share; `server_bidi` is how many
/// server-initiated bidirectional streams the client allows.
fn quic_config(mut c: quiche::Config, server_bidi: u64) -> quiche::Config {
    c.set_application_protos(h3::APPLICATION_PROTOCOL).expect("alpn");
    c.set_max_idle_timeout(30_000);
    c.set_initial_max_data(10 << 20);
    c.set_initial_max_stream_data_bidi_local(1 << 20);
    c.set_initial_max_stream_data_bidi_remote(1 << 20);
    c.set_initial_max_stream_data_uni(1 << 20);
    c.set_initial_max_streams_bidi(server_bidi);
    c.set_initial_max_streams_uni(100);
    c.enable_dgram(true, 1000, 1000);
    c
}

/// A client and a server connection, HTTP/3 on both once established.
struct Pair {
    client: quiche::Connection,
    server: quiche::Connection,
    ch3: h3::Connection,
    sh3: h3::Connection,
}

impl Pair {
    /// A pair with WebTransport claiming on both sides (or neither).
    fn new(webtransport: bool) -> Self {
        Self::with(webtransport, 100)
    }

    fn with(webtransport: bool, client_allows_server_bidi: u64) -> Self {
        let mut cc = quic_config(
            quiche::Config::new(quiche::PROTOCOL_VERSION).expect("config"),
            client_allows_server_bidi,
        );
        cc.verify_peer(false);
        let mut sc = quic_config(
            quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, server_tls())
                .expect("server config"),
            100,
        );
        let client_addr: SocketAddr = CLIENT.parse().expect("addr");
        let server_addr: SocketAddr = SERVER.parse().expect("addr");
        let client = quiche::connect(
            Some("localhost"),
            &quiche::ConnectionId::from_ref(&[1; 16]),
            client_addr,
            server_addr,
            &mut cc,
        )
        .expect("client");
        let server = quiche::accept(
            &quiche::ConnectionId::from_ref(&[2; 16]),
            None,
            server_addr,
            client_addr,
            &mut sc,
        )
        .expect("server");
        let mut h3c = h3::Config::new().expect("h3 config");
        h3c.enable_extended_connect(true);
        h3c.enable_webtransport(webtransport);
        let mut client = client;
        let mut server = server;
        for _ in 0..20 {
            exchange(&mut client, &mut server);
            if client.is_established() && server.is_established() {
                break;
            }
        }
        assert!(client.is_established() && server.is_established(), "handshake");
        let ch3 = h3::Connection::with_transport(&mut client, &h3c).expect("client h3");
        let sh3 = h3::Connection::with_transport(&mut server, &h3c).expect("server h3");
        let mut pair = Pair { client, server, ch3, sh3 };
        pair.exchange();
        // Both sides take in the other's control and QPACK streams.
        assert_eq!(pair.server_events(), vec![]);
        assert_eq!(pair.client_events(), vec![]);
        assert!(pair.ch3.peer_settings_raw().is_some() && pair.sh3.peer_settings_raw().is_some());
        pair
    }

    fn exchange(&mut self) {
        exchange(&mut self.client, &mut self.server);
    }

    /// Every event the server's HTTP/3 layer has now; panics on an error.
    fn server_events(&mut self) -> Vec<(u64, Event)> {
        events(&mut self.sh3, &mut self.server)
    }

    fn client_events(&mut self) -> Vec<(u64, Event)> {
        events(&mut self.ch3, &mut self.client)
    }

    /// An extended CONNECT for a WebTransport session from the client,
    /// answered 200 by the server: the session ID.
    fn session(&mut self) -> u64 {
        let session = self.ch3.send_request(&mut self.client, &connect_headers(), false).expect("CONNECT");
        self.exchange();
        let ev = self.server_events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(matches!(&ev[0], (s, Event::Headers { .. }) if *s == session), "{ev:?}");
        self.sh3
            .send_response(&mut self.server, session, &[Header::new(b":status", b"200")], false)
            .expect("200");
        self.exchange();
        let ev = self.client_events();
        assert!(matches!(&ev[..], [(s, Event::Headers { .. })] if *s == session), "{ev:?}");
        session
    }
}

/// Sends the packets of each side to the other until neither has any.
fn exchange(client: &mut quiche::Connection, server: &mut quiche::Connection) {
    loop {
        let a = flush(client, server);
        let b = flush(server, client);
        if !a && !b {
            break;
        }
    }
}

fn flush(from: &mut quiche::Connection, to: &mut quiche::Connection) -> bool {
    let mut buf = [0u8; 65_535];
    let mut sent = false;
    loop {
        match from.send(&mut buf) {
            Ok((n, info)) => {
                to.recv(&mut buf[..n], quiche::RecvInfo { from: info.from, to: info.to }).expect("recv");
                sent = true;
            }
            Err(quiche::Error::Done) => return sent,
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// Polls until `Done`; at most 100 events, so that a poll that never ends
/// fails the test instead of hanging it.
fn events(h3: &mut h3::Connection, quic: &mut quiche::Connection) -> Vec<(u64, Event)> {
    let mut out = Vec::new();
    loop {
        match h3.poll(quic) {
            Ok(ev) => out.push(ev),
            Err(h3::Error::Done) => return out,
            Err(e) => panic!("poll: {e:?} after {out:?}"),
        }
        assert!(out.len() < 100, "poll does not end: {out:?}");
    }
}

/// The first error `poll` returns.
fn poll_error(h3: &mut h3::Connection, quic: &mut quiche::Connection) -> h3::Error {
    for _ in 0..100 {
        match h3.poll(quic) {
            Ok(_) => {}
            Err(e) => return e,
        }
    }
    panic!("poll does not end");
}

fn connect_headers() -> Vec<Header> {
    vec![
        Header::new(b":method", b"CONNECT"),
        Header::new(b":protocol", b"webtransport"),
        Header::new(b":scheme", b"https"),
        Header::new(b":authority", b"localhost"),
        Header::new(b":path", b"/wt"),
    ]
}

/// Everything readable on a stream now: the bytes and whether FIN came.
fn read_all(quic: &mut quiche::Connection, stream: u64) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut fin = false;
    loop {
        match quic.stream_recv(stream, &mut buf) {
            Ok((n, f)) => {
                out.extend_from_slice(&buf[..n]);
                fin |= f;
                if f {
                    break;
                }
            }
            Err(quiche::Error::Done) => break,
            Err(e) => panic!("stream_recv {stream}: {e}"),
        }
    }
    (out, fin)
}

/// Application bytes that would be HTTP/3 frames (and a 0x41) if the
/// HTTP/3 layer parsed them.
const APP: &[u8] = &[0x00, 0x01, 0x40, 0x41, 0x00, 0x54, b'h', b'e', b'l', b'l', b'o'];

fn header(signal: [u8; 2], session: u64) -> Vec<u8> {
    let mut h = signal.to_vec();
    match session {
        0..=63 => h.push(session as u8),
        64..=16383 => h.extend_from_slice(&(0x4000 | session as u16).to_be_bytes()),
        _ => unreachable!("sessions of the tests fit two bytes"),
    }
    h
}

#[test]
fn client_bidi_stream_header_and_data_in_one_write() {
    let mut p = Pair::new(true);
    let session = p.session();
    // The client's next bidirectional stream, written raw: header and
    // application bytes in one write, so in one STREAM frame.
    let stream = session + 4;
    let mut bytes = header(SIGNAL, session);
    bytes.extend_from_slice(APP);
    assert_eq!(p.client.stream_send(stream, &bytes, true).expect("send"), bytes.len());
    p.exchange();
    assert_eq!(p.server_events(), vec![(stream, Event::WebTransportStream { session_id: session })]);
    assert_eq!(read_all(&mut p.server, stream), (APP.to_vec(), true));
    // The FIN came through stream_recv: no Finished (or anything) later.
    p.exchange();
    assert_eq!(p.server_events(), vec![]);
    // The server answers on the stream with the QUIC API; the client's
    // HTTP/3 layer never knew the stream (raw) and does not parse it here,
    // the test reads it directly.
    p.server.stream_send(stream, b"back", true).expect("send back");
    p.exchange();
    assert_eq!(read_all(&mut p.client, stream), (b"back".to_vec(), true));
}

#[test]
fn client_uni_stream_header_and_data_in_one_write() {
    let mut p = Pair::new(true);
    let session = p.session();
    // A client unidirectional stream far above the HTTP/3 layer's own.
    let stream = 2 + 4 * 50;
    let mut bytes = header(UNI_TYPE, session);
    bytes.extend_from_slice(APP);
    p.client.stream_send(stream, &bytes, true).expect("send");
    p.exchange();
    assert_eq!(p.server_events(), vec![(stream, Event::WebTransportStream { session_id: session })]);
    assert_eq!(read_all(&mut p.server, stream), (APP.to_vec(), true));
    assert_eq!(p.server_events(), vec![]);
}

#[test]
fn open_webtransport_stream_both_directions() {
    let mut p = Pair::new(true);
    let session = p.session();
    // Client: bidirectional (shares send_request's counter) and
    // unidirectional.
    let bidi = p.ch3.open_webtransport_stream(&mut p.client, session, true).expect("client bidi");
    assert_eq!(bidi, session + 4);
    let uni = p.ch3.open_webtransport_stream(&mut p.client, session, false).expect("client uni");
    assert_eq!(uni % 4, 2);
    p.client.stream_send(bidi, APP, false).expect("send");
    p.client.stream_send(uni, APP, true).expect("send");
    p.exchange();
    let mut ev = p.server_events();
    ev.sort_by_key(|(s, _)| *s);
    let mut want = vec![
        (bidi, Event::WebTransportStream { session_id: session }),
        (uni, Event::WebTransportStream { session_id: session }),
    ];
    want.sort_by_key(|(s, _)| *s);
    assert_eq!(ev, want);
    assert_eq!(read_all(&mut p.server, bidi), (APP.to_vec(), false));
    assert_eq!(read_all(&mut p.server, uni), (APP.to_vec(), true));
    // The server answers on the bidirectional stream; the client's HTTP/3
    // layer claimed the stream when it opened it: no event, no parsing.
    p.server.stream_send(bidi, APP, true).expect("send back");
    p.exchange();
    assert_eq!(p.client_events(), vec![]);
    assert_eq!(read_all(&mut p.client, bidi), (APP.to_vec(), true));

    // Server: bidirectional streams are server-initiated 1, 5, ...
    let s1 = p.sh3.open_webtransport_stream(&mut p.server, session, true).expect("server bidi");
    assert_eq!(s1, 1);
    let s5 = p.sh3.open_webtransport_stream(&mut p.server, session, true).expect("server bidi");
    assert_eq!(s5, 5);
    let su = p.sh3.open_webtransport_stream(&mut p.server, session, false).expect("server uni");
    assert_eq!(su % 4, 3);
    for s in [s1, s5, su] {
        p.server.stream_send(s, APP, true).expect("send");
    }
    p.exchange();
    let mut ev = p.client_events();
    ev.sort_by_key(|(s, _)| *s);
    let mut want: Vec<_> =
        [s1, s5, su].iter().map(|s| (*s, Event::WebTransportStream { session_id: session })).collect();
    want.sort_by_key(|(s, _)| *s);
    assert_eq!(ev, want);
    for s in [s1, s5, su] {
        assert_eq!(read_all(&mut p.client, s), (APP.to_vec(), true));
    }
    // The client answers on a server-initiated stream; the server's HTTP/3
    // layer claimed it: no event.
    p.client.stream_send(s1, b"reply", true).expect("reply");
    p.exchange();
    assert_eq!(p.server_events(), vec![]);
    assert_eq!(read_all(&mut p.server, s1), (b"reply".to_vec(), true));
}

#[test]
fn header_varints_split_across_packets() {
    let mut p = Pair::new(true);
    let session = p.session();
    // Session 400 needs a two-byte varint: four header bytes, each written
    // and delivered alone.
    let big_session = 400;
    for (stream, signal) in [(session + 4, SIGNAL), (2 + 4 * 50, UNI_TYPE)] {
        let h = header(signal, big_session);
        assert_eq!(h.len(), 4);
        for b in &h {
            p.client.stream_send(stream, std::slice::from_ref(b), false).expect("send");
            p.exchange();
            // Nothing until the session ID is complete.
            if b != h.last().expect("byte") {
                assert_eq!(p.server_events(), vec![]);
            }
        }
        assert_eq!(p.server_events(), vec![(stream, Event::WebTransportStream { session_id: big_session })]);
        // Nothing of the header is left for the application, nothing more is
        // taken from it.
        assert_eq!(read_all(&mut p.server, stream), (vec![], false));
        p.client.stream_send(stream, &APP[..3], false).expect("send");
        p.exchange();
        p.client.stream_send(stream, &APP[3..], true).expect("send");
        p.exchange();
        assert_eq!(p.server_events(), vec![]);
        assert_eq!(read_all(&mut p.server, stream), (APP.to_vec(), true));
    }
}

#[test]
fn requests_still_work_alongside_webtransport_streams() {
    let mut p = Pair::new(true);
    let session = p.session();
    let wt = p.ch3.open_webtransport_stream(&mut p.client, session, true).expect("wt");
    p.client.stream_send(wt, APP, false).expect("send");
    let get = vec![
        Header::new(b":method", b"GET"),
        Header::new(b":scheme", b"https"),
        Header::new(b":authority", b"localhost"),
        Header::new(b":path", b"/"),
    ];
    let req = p.ch3.send_request(&mut p.client, &get, true).expect("GET");
    assert_eq!(req, wt + 4, "send_request continues after the WebTransport stream's ID");
    p.exchange();
    let ev = p.server_events();
    assert!(ev.contains(&(wt, Event::WebTransportStream { session_id: session })), "{ev:?}");
    assert!(ev.iter().any(|(s, e)| *s == req && matches!(e, Event::Headers { more_frames: false, .. })));
    assert!(ev.contains(&(req, Event::Finished)), "{ev:?}");
    assert_eq!(ev.len(), 3, "{ev:?}");
    p.sh3.send_response(&mut p.server, req, &[Header::new(b":status", b"200")], false).expect("response");
    p.sh3.send_body(&mut p.server, req, b"body", true).expect("body");
    // No HEADERS on a WebTransport stream.
    assert_eq!(
        p.sh3.send_response(&mut p.server, wt, &[Header::new(b":status", b"200")], false),
        Err(h3::Error::FrameUnexpected)
    );
    p.server.stream_send(wt, b"wt back", false).expect("wt back");
    p.exchange();
    let ev = p.client_events();
    assert!(ev.iter().any(|(s, e)| *s == req && matches!(e, Event::Headers { .. })), "{ev:?}");
    assert!(ev.contains(&(req, Event::Data)), "{ev:?}");
    let mut buf = [0u8; 100];
    assert_eq!(p.ch3.recv_body(&mut p.client, req, &mut buf), Ok(4));
    assert_eq!(&buf[..4], b"body");
    assert!(ev.iter().all(|(s, _)| *s == req), "nothing for the WebTransport stream: {ev:?}");
    assert_eq!(p.client_events(), vec![(req, Event::Finished)]);
    assert_eq!(read_all(&mut p.client, wt), (b"wt back".to_vec(), false));
    assert_eq!(read_all(&mut p.server, wt), (APP.to_vec(), false));
}

#[test]
fn disabled_keeps_quiches_behaviour() {
    let mut p = Pair::new(false);
    let session = p.session();
    assert_eq!(p.ch3.open_webtransport_stream(&mut p.client, session, true), Err(h3::Error::FrameUnexpected));
    assert_eq!(
        p.sh3.open_webtransport_stream(&mut p.server, session, false),
        Err(h3::Error::FrameUnexpected)
    );
    // A 0x54 stream is an unknown stream type: ignored and drained.
    let stream = 2 + 4 * 50;
    let mut bytes = header(UNI_TYPE, session);
    bytes.extend_from_slice(APP);
    p.client.stream_send(stream, &bytes, false).expect("send");
    p.exchange();
    assert_eq!(p.server_events(), vec![]);
    assert!(!p.server.readable().any(|s| s == stream), "drained by the HTTP/3 layer");
    assert!(p.server.stream_recv(stream, &mut [0; 10]).is_err());
}

#[test]
fn unread_data_does_not_spin_poll() {
    let mut p = Pair::new(true);
    let session = p.session();
    let wt = p.ch3.open_webtransport_stream(&mut p.client, session, true).expect("wt");
    p.client.stream_send(wt, APP, false).expect("send");
    p.exchange();
    assert_eq!(p.server_events(), vec![(wt, Event::WebTransportStream { session_id: session })]);
    // The application leaves the data unread: the stream stays readable,
    // and poll reports nothing for it, however often it is called.
    for _ in 0..10 {
        assert!(p.server.readable().any(|s| s == wt));
        assert_eq!(p.sh3.poll(&mut p.server), Err(h3::Error::Done));
    }
    // More data on it, and a request behind it: only the request's events.
    p.client.stream_send(wt, APP, false).expect("send");
    let req = p.ch3.send_request(&mut p.client, &connect_headers(), false).expect("request");
    p.exchange();
    let ev = p.server_events();
    assert!(matches!(&ev[..], [(s, Event::Headers { .. })] if *s == req), "{ev:?}");
    assert_eq!(p.sh3.poll(&mut p.server), Err(h3::Error::Done));
    let mut both = APP.to_vec();
    both.extend_from_slice(APP);
    assert_eq!(read_all(&mut p.server, wt), (both, false));
}

#[test]
fn peer_stream_limit_consumes_no_stream_id() {
    // The client allows the server one bidirectional stream at a time.
    let mut p = Pair::with(true, 1);
    let session = p.session();
    let s1 = p.sh3.open_webtransport_stream(&mut p.server, session, true).expect("first");
    assert_eq!(s1, 1);
    for _ in 0..2 {
        assert_eq!(
            p.sh3.open_webtransport_stream(&mut p.server, session, true),
            Err(h3::Error::TransportError(quiche::Error::StreamLimit))
        );
    }
    // Stream 1 completes both ways; the client grants another stream.
    p.server.stream_send(s1, b"x", true).expect("send");
    p.exchange();
    assert_eq!(p.client_events(), vec![(s1, Event::WebTransportStream { session_id: session })]);
    assert_eq!(read_all(&mut p.client, s1), (b"x".to_vec(), true));
    p.client.stream_send(s1, b"y", true).expect("send");
    p.exchange();
    assert_eq!(read_all(&mut p.server, s1), (b"y".to_vec(), true));
    p.exchange();
    // The failed calls took no ID: the next is 5, not 9 or 13.
    assert_eq!(p.sh3.open_webtransport_stream(&mut p.server, session, true), Ok(5));
}

#[test]
fn fin_and_reset_reach_the_application_not_poll() {
    let mut p = Pair::new(true);
    let session = p.session();
    let uni = p.ch3.open_webtransport_stream(&mut p.client, session, false).expect("uni");
    let bidi = p.ch3.open_webtransport_stream(&mut p.client, session, true).expect("bidi");
    p.client.stream_send(uni, APP, false).expect("send");
    p.client.stream_send(bidi, APP, false).expect("send");
    p.exchange();
    assert_eq!(p.server_events().len(), 2);
    assert_eq!(read_all(&mut p.server, uni), (APP.to_vec(), false));
    assert_eq!(read_all(&mut p.server, bidi), (APP.to_vec(), false));
    // FIN on the unidirectional stream, RESET_STREAM on the bidirectional.
    p.client.stream_send(uni, b"", true).expect("fin");
    p.client.stream_shutdown(bidi, quiche::Shutdown::Write, 0x1234).expect("reset");
    p.exchange();
    assert_eq!(p.server_events(), vec![], "no Finished or Reset from the HTTP/3 layer");
    assert_eq!(p.server.stream_recv(uni, &mut [0; 10]), Ok((0, true)));
    assert_eq!(p.server.stream_recv(bidi, &mut [0; 10]), Err(quiche::Error::StreamReset(0x1234)));
    assert_eq!(p.server_events(), vec![]);
    // The other way: the server resets its side of the bidirectional stream.
    p.server.stream_shutdown(bidi, quiche::Shutdown::Write, 0x99).expect("reset");
    p.exchange();
    assert_eq!(p.client_events(), vec![]);
    assert_eq!(p.client.stream_recv(bidi, &mut [0; 10]), Err(quiche::Error::StreamReset(0x99)));
}

#[test]
fn state_of_finished_claimed_streams_is_removed() {
    let mut p = Pair::new(true);
    let session = p.session();
    for i in 0..60 {
        let uni = p.ch3.open_webtransport_stream(&mut p.client, session, false).expect("uni");
        p.client.stream_send(uni, APP, true).expect("send");
        p.exchange();
        assert_eq!(p.server_events(), vec![(uni, Event::WebTransportStream { session_id: session })]);
        assert_eq!(read_all(&mut p.server, uni), (APP.to_vec(), true), "stream {i}");
        p.exchange();
    }
    // Without the sweep both sides would hold 60.
    let (server, client) = (p.sh3.webtransport_streams_held(), p.ch3.webtransport_streams_held());
    assert!((1..=16).contains(&server), "server holds {server}");
    assert!((1..=16).contains(&client), "client holds {client}");
}

#[test]
fn signal_value_elsewhere_is_a_frame_error() {
    let mut p = Pair::new(true);
    let session = p.session();
    // 0x41 after the HEADERS of the session's request stream.
    p.client.stream_send(session, &header(SIGNAL, session), false).expect("send");
    p.exchange();
    assert_eq!(poll_error(&mut p.sh3, &mut p.server), h3::Error::FrameError);
    p.exchange();
    assert!(matches!(p.client.peer_error(), Some(e) if e.error_code == 0x106), "{:?}", p.client.peer_error());
}

#[test]
fn session_id_of_a_wrong_stream_kind_is_an_id_error() {
    let mut p = Pair::new(true);
    p.session();
    // Session ID 2: a client-initiated unidirectional stream ID.
    p.client.stream_send(2 + 4 * 50, &header(UNI_TYPE, 2), false).expect("send");
    p.exchange();
    assert_eq!(poll_error(&mut p.sh3, &mut p.server), h3::Error::IdError);
    p.exchange();
    assert!(matches!(p.client.peer_error(), Some(e) if e.error_code == 0x108), "{:?}", p.client.peer_error());
}

#[test]
fn fin_right_after_the_header_shows_as_stream_finished() {
    let mut p = Pair::new(true);
    let session = p.session();
    for stream in [session + 4, 2 + 4 * 50] {
        let signal = if stream % 4 == 0 { SIGNAL } else { UNI_TYPE };
        p.client.stream_send(stream, &header(signal, session), true).expect("send");
        p.exchange();
        assert_eq!(p.server_events(), vec![(stream, Event::WebTransportStream { session_id: session })]);
        // The FIN went with the header: nothing to read, the stream is
        // finished, and poll says nothing more.
        assert!(p.server.stream_finished(stream));
        assert!(p.server.stream_recv(stream, &mut [0; 10]).is_err());
        assert_eq!(p.server_events(), vec![]);
    }
}

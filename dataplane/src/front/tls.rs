//! TLS over TCP for the front (BoringSSL through the `boring` crate), run
//! on in-memory buffers: the connection hands in the ciphertext it read and
//! takes out the ciphertext to write, so no TLS code ever touches a socket.
//!
//! The context is built from the same TLS material and keyless private key
//! method as QUIC's ([`crate::keyless::ssl_context`]): the handshake's
//! signature is asked of control, which alone holds the key. A handshake
//! that needs it stops with [`Progress::WantSignature`]; the worker sends
//! the [`crate::keyless::take_requests`] to control and drives the
//! handshake again when the answer is in. ALPN offers `h2` then `http/1.1`
//! (RFC 7301; NPN is not offered: it is obsolete and absent from TLS 1.3).

use std::io::{self, Read, Write};
use std::sync::Arc;

use boring::ssl::{
    AlpnError, ErrorCode, HandshakeError, MidHandshakeSslStream, Ssl, SslContext, SslStream,
    SslStreamBuilder, SslVersion,
};
use relay_proto::channel::bootstrap::TlsMaterial;

use crate::keyless::{self, TlsContextError};
use crate::tickets::TicketKeyring;

/// The ALPN protocols served, in order of preference (RFC 7301 wire form).
const ALPN: &[u8] = b"\x02h2\x08http/1.1";

/// TLS 1.2 suites: forward-secret ECDHE with AEADs only (RFC 9113 section
/// 9.2.2 forbids the rest for HTTP/2; RSA key exchange would need a
/// decryption by the private key, which keyless signing does not offer).
/// TLS 1.3's suites are fixed by BoringSSL.
const TLS12_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

/// The front's TLS context for `material` (certificate chain, keyless
/// signing or the local key, session tickets).
pub fn context(material: &TlsMaterial, tickets: &Arc<TicketKeyring>) -> Result<SslContext, TlsContextError> {
    let mut builder = keyless::ssl_context(material, tickets)?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder.set_cipher_list(TLS12_CIPHERS)?;
    builder.set_alpn_select_callback(|_, client| {
        // No overlap: refuse rather than guess (RFC 7301 section 3.2
        // lets the server send no_application_protocol).
        boring::ssl::select_next_proto(ALPN, client).ok_or(AlpnError::ALERT_FATAL)
    });
    Ok(builder.build())
}

/// Ciphertext in both directions: the in-memory transport a BoringSSL
/// session runs on (server side here, client side in
/// [`crate::origin_tls`]).
#[derive(Debug, Default)]
pub(crate) struct Wire {
    /// Ciphertext handed in, read from `read`.
    pub(crate) input: Vec<u8>,
    pub(crate) read: usize,
    /// The TCP stream ended: reads past `input` give end of file.
    pub(crate) eof: bool,
    /// Ciphertext BoringSSL wrote, for the socket.
    pub(crate) output: Vec<u8>,
}

impl Wire {
    /// Ciphertext handed in and not yet read by BoringSSL.
    pub(crate) fn input_backlog(&self) -> usize {
        self.input.len() - self.read
    }
}

/// Decrypts into `out`, at most `max` more bytes (`max` > 0): what an
/// open session's `ssl_read` gave, for either side.
pub(crate) fn read_plain(
    s: &mut SslStream<Wire>,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<Plain, boring::ssl::Error> {
    // Decrypt straight into the vector's spare capacity: no zeroing of
    // `max` bytes per call (a call that finds no record used to clear
    // 64 KiB for nothing).
    out.reserve(max);
    let start = out.len();
    let r = s.ssl_read_uninit(&mut out.spare_capacity_mut()[..max]);
    match r {
        Ok(0) => Ok(Plain::Closed),
        Ok(n) => {
            // SAFETY: BoringSSL wrote (initialised) the first `n` bytes of
            // the spare capacity, `n <= max <= capacity - start`.
            unsafe { out.set_len(start + n) };
            Ok(Plain::Data(n))
        }
        Err(e) => match e.code() {
            ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => Ok(Plain::Blocked),
            ErrorCode::ZERO_RETURN => Ok(Plain::Closed),
            // A TCP FIN without close_notify: treated as a close
            // (the tunnelled protocols frame their own ends).
            ErrorCode::SYSCALL if s.get_ref().eof => Ok(Plain::Closed),
            _ => Err(e),
        },
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.input[self.read..];
        if left.is_empty() {
            if self.eof {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.read += n;
        if self.read == self.input.len() {
            self.input.clear();
            self.read = 0;
        }
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a TLS session on in-memory buffers is, server side or client
/// side ([`crate::origin_tls`]), with the ciphertext accessors both share.
pub(crate) enum State {
    /// The handshake runs.
    Handshaking(MidHandshakeSslStream<Wire>),
    /// Application data flows.
    Open(SslStream<Wire>),
    /// Failed: only the alert BoringSSL wrote (if any) is left to send.
    Dead(Vec<u8>),
}

impl State {
    fn wire(&mut self) -> Option<&mut Wire> {
        match self {
            State::Handshaking(m) => Some(m.get_mut()),
            State::Open(s) => Some(s.get_mut()),
            State::Dead(_) => None,
        }
    }

    /// Hands in ciphertext read from the socket.
    pub(crate) fn feed(&mut self, ciphertext: &[u8]) {
        if let Some(w) = self.wire() {
            w.input.extend_from_slice(ciphertext);
        }
    }

    /// The TCP stream ended (no more ciphertext will come).
    pub(crate) fn feed_eof(&mut self) {
        if let Some(w) = self.wire() {
            w.eof = true;
        }
    }

    /// Ciphertext waiting to be written: the caller drains it.
    pub(crate) fn output(&mut self) -> &mut Vec<u8> {
        match self {
            State::Handshaking(m) => &mut m.get_mut().output,
            State::Open(s) => &mut s.get_mut().output,
            State::Dead(alert) => alert,
        }
    }

    /// Ciphertext received and not yet processed.
    pub(crate) fn input_backlog(&self) -> usize {
        match self {
            State::Handshaking(m) => m.get_ref().input_backlog(),
            State::Open(s) => s.get_ref().input_backlog(),
            State::Dead(_) => 0,
        }
    }
}

/// How the handshake stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More bytes from the client are needed.
    WantInput,
    /// The handshake waits for control's signature.
    WantSignature,
    /// Done: application data flows.
    Done,
    /// Failed (the alert, if any, is in the output).
    Failed(String),
}

/// What reading plaintext gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    /// This many bytes were appended.
    Data(usize),
    /// No more until more ciphertext arrives.
    Blocked,
    /// The client sent close_notify (or the TCP stream ended).
    Closed,
}

/// One TLS server connection.
pub struct TlsSession {
    state: State,
}

impl TlsSession {
    /// Starts a server-side session.
    pub fn new(ctx: &SslContext) -> Result<Self, boring::error::ErrorStack> {
        let ssl = Ssl::new(ctx)?;
        let mut builder = SslStreamBuilder::new(ssl, Wire::default());
        builder.set_accept_state();
        Ok(Self { state: State::Handshaking(builder.setup_accept()) })
    }

    /// Hands in ciphertext read from the socket.
    pub fn feed(&mut self, ciphertext: &[u8]) {
        self.state.feed(ciphertext);
    }

    /// The TCP stream ended (no more ciphertext will come).
    pub fn feed_eof(&mut self) {
        self.state.feed_eof();
    }

    /// Ciphertext that is waiting to be written: the caller drains it.
    pub fn output(&mut self) -> &mut Vec<u8> {
        self.state.output()
    }

    /// Ciphertext received and not yet processed.
    pub fn input_backlog(&self) -> usize {
        self.state.input_backlog()
    }

    /// Whether the handshake has completed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Drives the handshake as far as the input allows.
    pub fn handshake(&mut self) -> Progress {
        let state = std::mem::replace(&mut self.state, State::Dead(Vec::new()));
        let mid = match state {
            State::Handshaking(m) => m,
            State::Open(s) => {
                self.state = State::Open(s);
                return Progress::Done;
            }
            State::Dead(alert) => {
                self.state = State::Dead(alert);
                return Progress::Failed("closed".into());
            }
        };
        match mid.handshake() {
            Ok(stream) => {
                self.state = State::Open(stream);
                Progress::Done
            }
            Err(HandshakeError::WouldBlock(mid)) => {
                let code = mid.error().code();
                self.state = State::Handshaking(mid);
                if code == ErrorCode::WANT_PRIVATE_KEY_OPERATION {
                    Progress::WantSignature
                } else {
                    Progress::WantInput
                }
            }
            Err(HandshakeError::Failure(mid)) => {
                let (error, wire) = mid.into_parts();
                // The alert BoringSSL wrote still leaves.
                self.state = State::Dead(wire.output);
                Progress::Failed(error.to_string())
            }
            Err(e) => Progress::Failed(e.to_string()),
        }
    }

    /// The protocol ALPN picked (`h2` or `http/1.1`), once open.
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.state {
            State::Open(s) => s.ssl().selected_alpn_protocol(),
            _ => None,
        }
    }

    /// The client certificate the handshake verified, once open (mutual
    /// TLS; also after a resumption, which brings the session's back).
    pub fn peer_certificate(&self) -> Option<boring::x509::X509> {
        match &self.state {
            State::Open(s) => s.ssl().peer_certificate(),
            _ => None,
        }
    }

    /// Whether the session resumed from a ticket (no signature was asked).
    pub fn resumed(&self) -> bool {
        match &self.state {
            State::Open(s) => s.ssl().session_reused(),
            _ => false,
        }
    }

    /// Decrypts into `out`, at most `max` more bytes.
    pub fn read(&mut self, out: &mut Vec<u8>, max: usize) -> Result<Plain, String> {
        let State::Open(s) = &mut self.state else { return Ok(Plain::Blocked) };
        if max == 0 {
            return Ok(Plain::Blocked);
        }
        read_plain(s, out, max).map_err(|e| e.to_string())
    }

    /// Encrypts all of `data` into the output.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), String> {
        let State::Open(s) = &mut self.state else { return Err("TLS session not open".into()) };
        while !data.is_empty() {
            match s.ssl_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Sends close_notify.
    pub fn close(&mut self) {
        if let State::Open(s) = &mut self.state {
            let _ = s.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boring::ssl::{SslConnector, SslMethod, SslVerifyMode};

    /// A self-signed ECDSA P-256 certificate and its key, made for the test.
    fn material() -> TlsMaterial {
        use boring::ec::{EcGroup, EcKey};
        use boring::nid::Nid;
        use boring::pkey::PKey;
        use boring::x509::{X509, X509NameBuilder};
        let key = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "localhost").unwrap();
        let name = name.build();
        let mut cert = X509::builder().unwrap();
        cert.set_version(2).unwrap();
        cert.set_subject_name(&name).unwrap();
        cert.set_issuer_name(&name).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&boring::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
        cert.set_not_after(&boring::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
        cert.sign(&key, boring::hash::MessageDigest::sha256()).unwrap();
        TlsMaterial {
            generation: 1,
            cert_chain_pem: String::from_utf8(cert.build().to_pem().unwrap()).unwrap(),
            private_key_pem: Some(String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap()),
            ticket_keys: Vec::new(),
            ticket_lifetime_secs: 0,
            client_auth: Default::default(),
        }
    }

    /// A client on in-memory pipes, driven by hand against the session.
    struct Pipe {
        to_server: Vec<u8>,
        to_client: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.to_client.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.to_client.len());
            buf[..n].copy_from_slice(&self.to_client[..n]);
            self.to_client.drain(..n);
            Ok(n)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.to_server.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn client(alpn: &[u8]) -> MidHandshakeSslStream<Pipe> {
        let mut c = SslConnector::builder(SslMethod::tls()).unwrap();
        c.set_verify(SslVerifyMode::NONE);
        c.set_alpn_protos(alpn).unwrap();
        let c = c.build();
        let cfg = c.configure().unwrap();
        match cfg.connect("localhost", Pipe { to_server: Vec::new(), to_client: Vec::new() }) {
            Err(HandshakeError::WouldBlock(m)) => m,
            _ => panic!("client handshake should wait for the server"),
        }
    }

    #[test]
    fn handshake_negotiates_h2_and_carries_data_both_ways() {
        let ctx = context(&material(), &Arc::new(TicketKeyring::default())).unwrap();
        let mut server = TlsSession::new(&ctx).unwrap();
        let mut c = client(b"\x02h2\x08http/1.1");
        let mut stream = None;
        for _ in 0..20 {
            let out = std::mem::take(&mut c.get_mut().to_server);
            server.feed(&out);
            let progress = server.handshake();
            assert!(matches!(progress, Progress::WantInput | Progress::Done), "{progress:?}");
            let back = std::mem::take(server.output());
            c.get_mut().to_client.extend_from_slice(&back);
            match c.handshake() {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(HandshakeError::WouldBlock(m)) => c = m,
                Err(e) => panic!("client handshake failed: {e}"),
            }
        }
        let mut stream = stream.expect("handshake completes");
        // The client's Finished may still be in flight.
        let out = std::mem::take(&mut stream.get_mut().to_server);
        server.feed(&out);
        assert_eq!(server.handshake(), Progress::Done);
        assert_eq!(server.alpn(), Some(&b"h2"[..]));
        stream.write_all(b"ping").unwrap();
        let out = std::mem::take(&mut stream.get_mut().to_server);
        server.feed(&out);
        let mut plain = Vec::new();
        assert_eq!(server.read(&mut plain, 100).unwrap(), Plain::Data(4));
        assert_eq!(plain, b"ping");
        assert_eq!(server.read(&mut plain, 100).unwrap(), Plain::Blocked);
        server.write(b"pong").unwrap();
        let back = std::mem::take(server.output());
        stream.get_mut().to_client.extend_from_slice(&back);
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        stream.shutdown().unwrap();
        let out = std::mem::take(&mut stream.get_mut().to_server);
        server.feed(&out);
        assert_eq!(server.read(&mut plain, 100).unwrap(), Plain::Closed);
    }

    #[test]
    fn no_common_protocol_fails_the_handshake_with_an_alert() {
        let ctx = context(&material(), &Arc::new(TicketKeyring::default())).unwrap();
        let mut server = TlsSession::new(&ctx).unwrap();
        let mut c = client(b"\x06spdy/1");
        let out = std::mem::take(&mut c.get_mut().to_server);
        server.feed(&out);
        assert!(matches!(server.handshake(), Progress::Failed(_)));
        assert!(!server.output().is_empty(), "the alert is left to send");
    }

    #[test]
    fn garbage_fails_the_handshake() {
        let ctx = context(&material(), &Arc::new(TicketKeyring::default())).unwrap();
        let mut server = TlsSession::new(&ctx).unwrap();
        server.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(server.handshake(), Progress::Failed(_)));
    }
}

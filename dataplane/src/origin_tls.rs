//! TLS from the relay to `wss://` origins (RFC 6455 section 4.1: a
//! secure WebSocket connection is TLS with SNI; RFC 9110 section 4.3.4:
//! the origin's certificate must be valid for its name).
//!
//! At attach the dataplane builds one BoringSSL client context per
//! distinct CA file the bootstrap names ([`OriginTls::from_bootstrap`]):
//! the file is read here (the bootstrap frame carries its path: a system
//! bundle is larger than a frame), its certificates become the context's
//! only trust store. Each `wss://` tunnel then runs a [`ClientSession`] on
//! in-memory buffers (the [`Wire`] the front's server sessions use), which
//! [`crate::tcp_target::TcpTarget`] puts between its socket and its
//! plaintext: no TLS code ever touches a socket.
//!
//! The session verifies the chain (`SSL_VERIFY_PEER`) and the name
//! (`X509_VERIFY_PARAM` host or IP, no partial wildcards, by the `boring`
//! connector), sends SNI for DNS names, offers ALPN `http/1.1` and speaks
//! TLS 1.2 or 1.3. A failed handshake says why in RFC 9209 terms
//! ([`TlsFailure`]): the certificate (`tls_certificate_error`), an alert
//! from the origin (`tls_alert_received`), or anything else
//! (`tls_protocol_error`).

use std::collections::HashMap;
use std::sync::Arc;

use boring::ssl::{ErrorCode, HandshakeError, SslConnector, SslMethod, SslVersion};
use boring::x509::X509;
use boring::x509::store::X509StoreBuilder;
use relay_proto::channel::bootstrap::{OriginHttp, UpstreamBootstrap, validate_upstreams};
use relay_proto::proxy_status::ProxyError;

use crate::front::tls::{Plain, State, Wire, read_plain};

/// ALPN offered to an origin (RFC 7301 wire forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// `http/1.1`: the Upgrade.
    Http1,
    /// `h2`: extended CONNECT (RFC 8441).
    H2,
    /// `h2`, then `http/1.1`: the origin picks.
    H2OrHttp1,
}

impl Alpn {
    fn wire(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"\x08http/1.1",
            Alpn::H2 => b"\x02h2",
            Alpn::H2OrHttp1 => b"\x02h2\x08http/1.1",
        }
    }

    /// What a route's first connection offers.
    pub fn for_route(http: OriginHttp) -> Self {
        match http {
            OriginHttp::Http1 => Alpn::Http1,
            OriginHttp::H2 => Alpn::H2,
            OriginHttp::Auto => Alpn::H2OrHttp1,
        }
    }
}

/// Largest CA file read (a system bundle is about 200 KiB).
pub const MAX_CA_FILE_BYTES: u64 = 16 << 20;

/// Why the upstream TLS settings cannot be used (the attach fails).
#[derive(Debug, thiserror::Error)]
pub enum OriginTlsError {
    /// The bootstrap's list is out of bounds.
    #[error("upstream routes: {0}")]
    Invalid(#[from] relay_proto::channel::bootstrap::BootstrapError),
    /// A CA file cannot be read.
    #[error("origin CA file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A CA file holds no PEM certificate, or one that does not parse.
    #[error("origin CA file {path}: {why}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// BoringSSL refused to build the context.
    #[error("origin TLS context: {0}")]
    Context(#[from] boring::error::ErrorStack),
}

/// How one `wss://` route connects: the name to send and verify, and the
/// client context of its CA file.
#[derive(Clone)]
pub struct RouteTls {
    /// SNI (for DNS names) and the name the certificate must hold.
    pub server_name: String,
    /// The context of the route's first connection (its ALPN offer).
    connector: SslConnector,
    /// `origin_http = "auto"`: the context offering only `http/1.1`, for
    /// the second connection to an origin that selected h2 without
    /// enabling extended CONNECT.
    fallback: Option<SslConnector>,
    /// The route's CA certificates (read at attach), for the QUIC client
    /// of `https://` origins (WebTransport).
    pub cas: std::sync::Arc<Vec<X509>>,
}

impl std::fmt::Debug for RouteTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Every upstream route the bootstrap listed, with its TLS settings when
/// its origin is `wss://`.
#[derive(Debug, Clone, Default)]
pub struct OriginTls {
    routes: HashMap<String, (Option<RouteTls>, OriginHttp)>,
}

impl OriginTls {
    /// Validates the bootstrap's routes and builds one client context per
    /// distinct CA file (read now: an unreadable file fails the attach).
    pub fn from_bootstrap(routes: &[UpstreamBootstrap]) -> Result<Self, OriginTlsError> {
        validate_upstreams(routes)?;
        let mut cas_by_file: HashMap<&str, std::sync::Arc<Vec<X509>>> = HashMap::new();
        let mut contexts: HashMap<(&str, Alpn), SslConnector> = HashMap::new();
        let mut out = HashMap::new();
        for r in routes {
            let tls = match &r.tls {
                None => None,
                Some(t) => {
                    let cas = match cas_by_file.get(t.ca_file.as_str()) {
                        Some(c) => c.clone(),
                        None => {
                            let cas = std::sync::Arc::new(read_ca_file(&t.ca_file)?);
                            cas_by_file.insert(t.ca_file.as_str(), cas.clone());
                            cas
                        }
                    };
                    let mut context = |alpn: Alpn| -> Result<SslConnector, OriginTlsError> {
                        if let Some(c) = contexts.get(&(t.ca_file.as_str(), alpn)) {
                            return Ok(c.clone());
                        }
                        let c = connector(&cas, alpn)?;
                        contexts.insert((t.ca_file.as_str(), alpn), c.clone());
                        Ok(c)
                    };
                    let connector = context(Alpn::for_route(r.origin_http))?;
                    let fallback =
                        if r.origin_http == OriginHttp::Auto { Some(context(Alpn::Http1)?) } else { None };
                    Some(RouteTls { server_name: t.server_name.clone(), connector, fallback, cas })
                }
            };
            out.insert(r.route.clone(), (tls, r.origin_http));
        }
        Ok(Self { routes: out })
    }

    /// A route's TLS settings: `None` when the route is unknown,
    /// `Some(None)` for a `ws://` route.
    pub fn route(&self, name: &str) -> Option<Option<&RouteTls>> {
        self.routes.get(name).map(|(tls, _)| tls.as_ref())
    }

    /// Which HTTP a route's origin is spoken (HTTP/1.1 for unknown routes,
    /// which are refused anyway).
    pub fn http(&self, name: &str) -> OriginHttp {
        self.routes.get(name).map_or(OriginHttp::Http1, |(_, http)| *http)
    }
}

/// Reads a PEM file of CA certificates (at least one, all parsing).
pub fn read_ca_file(path: &str) -> Result<Vec<X509>, OriginTlsError> {
    use std::io::Read;
    let read_err = |source| OriginTlsError::Read { path: path.to_string(), source };
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE_BYTES + 1).read_to_end(&mut pem))
        .map_err(read_err)?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(OriginTlsError::Parse { path: path.into(), why: "larger than 16 MiB".into() });
    }
    let certs = X509::stack_from_pem(&pem).map_err(|e| OriginTlsError::Parse {
        path: path.into(),
        why: format!("not PEM certificates ({e})"),
    })?;
    if certs.is_empty() {
        return Err(OriginTlsError::Parse { path: path.into(), why: "no PEM certificate in it".into() });
    }
    Ok(certs)
}

/// A client context trusting `cas` only: peer verification, TLS 1.2+,
/// offering `alpn`.
pub fn connector(cas: &[X509], alpn: Alpn) -> Result<SslConnector, boring::error::ErrorStack> {
    let mut store = X509StoreBuilder::new()?;
    for ca in cas {
        store.add_cert(ca.clone())?;
    }
    // The builder verifies peers (SSL_VERIFY_PEER) and starts from the
    // default paths; the store replaces those with the route's CAs.
    let mut builder = SslConnector::builder(SslMethod::tls())?;
    builder.set_cert_store(store.build());
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder.set_alpn_protos(alpn.wire())?;
    Ok(builder.build())
}

/// Why a TLS session with an origin failed, as Proxy-Status says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure {
    /// `tls_certificate_error`, `tls_alert_received` or
    /// `tls_protocol_error`.
    pub error: ProxyError,
    /// What went wrong (the verification error, the alert, BoringSSL's
    /// reason).
    pub details: String,
}

impl TlsFailure {
    fn protocol(details: impl Into<String>) -> Self {
        Self { error: ProxyError::TlsProtocolError, details: details.into() }
    }
}

/// BoringSSL's reason codes for a received alert are this plus the alert
/// (`SSL_AD_REASON_OFFSET`).
const ALERT_REASON_OFFSET: i32 = 1000;

/// Classifies a failed session: a certificate that did not verify, an
/// alert the origin sent, or another protocol failure.
fn classify(ssl: &boring::ssl::SslRef, error: &boring::ssl::Error) -> TlsFailure {
    // Before any certificate was checked the result is INVALID_CALL.
    if let Err(v) = ssl.verify_result()
        && v != boring::x509::X509VerifyError::INVALID_CALL
    {
        return TlsFailure {
            error: ProxyError::TlsCertificateError,
            details: format!("the origin's certificate did not verify: {}", v.error_string()),
        };
    }
    if let Some(stack) = error.ssl_error() {
        for e in stack.errors() {
            let Some(reason) = e.library_reason(boring_sys::ERR_LIB_SSL) else { continue };
            if (ALERT_REASON_OFFSET..ALERT_REASON_OFFSET + 256).contains(&reason) {
                let alert = reason - ALERT_REASON_OFFSET;
                let name = e.reason().unwrap_or("").to_ascii_lowercase();
                let name = name.trim_start_matches("sslv3_alert_").trim_start_matches("tlsv1_alert_");
                return TlsFailure {
                    error: ProxyError::TlsAlertReceived,
                    details: format!("the origin sent alert {alert} ({name})"),
                };
            }
        }
    }
    if error.code() == ErrorCode::SYSCALL {
        return TlsFailure::protocol("the origin closed the connection during the TLS handshake");
    }
    TlsFailure::protocol(format!("TLS with the origin failed: {error}"))
}

/// How a client handshake stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More bytes from the origin are needed.
    WantInput,
    /// Done: application data flows.
    Done,
    /// Failed (the alert, if any, is in the output).
    Failed(TlsFailure),
}

/// One TLS client session to an origin, on in-memory buffers.
pub struct ClientSession {
    state: State,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Handshaking(_) => "handshaking",
            State::Open(_) => "open",
            State::Dead(_) => "dead",
        };
        f.debug_struct("ClientSession").field("state", &state).finish()
    }
}

impl ClientSession {
    /// Starts a session for `route`: SNI (DNS names) and the name checked
    /// are its `server_name`. The ClientHello is written by the first
    /// [`Self::handshake`].
    pub fn new(route: &RouteTls) -> Result<Self, boring::error::ErrorStack> {
        Self::with(route, &route.connector)
    }

    /// A session for a route's second connection, offering only
    /// `http/1.1` (`origin_http = "auto"`, after the origin selected h2
    /// without enabling extended CONNECT).
    pub fn http1_fallback(route: &RouteTls) -> Result<Self, boring::error::ErrorStack> {
        Self::with(route, route.fallback.as_ref().unwrap_or(&route.connector))
    }

    fn with(route: &RouteTls, connector: &SslConnector) -> Result<Self, boring::error::ErrorStack> {
        let config = connector.configure()?.use_server_name_indication(true).verify_hostname(true);
        let mid = config.setup_connect(&route.server_name, Wire::default())?;
        Ok(Self { state: State::Handshaking(mid) })
    }

    /// Hands in ciphertext read from the socket.
    pub fn feed(&mut self, ciphertext: &[u8]) {
        self.state.feed(ciphertext);
    }

    /// The TCP stream ended (no more ciphertext will come).
    pub fn feed_eof(&mut self) {
        self.state.feed_eof();
    }

    /// Ciphertext waiting to be written: the caller drains it.
    pub fn output(&mut self) -> &mut Vec<u8> {
        self.state.output()
    }

    /// Whether no ciphertext waits to be written.
    pub fn output_is_empty(&self) -> bool {
        match &self.state {
            State::Handshaking(m) => m.get_ref().output.is_empty(),
            State::Open(s) => s.get_ref().output.is_empty(),
            State::Dead(alert) => alert.is_empty(),
        }
    }

    /// Whether bytes received may give plaintext without reading the
    /// socket: ciphertext handed in and not processed, or plaintext
    /// BoringSSL decrypted and holds.
    pub fn has_buffered(&self) -> bool {
        match &self.state {
            State::Handshaking(m) => m.get_ref().input_backlog() > 0,
            State::Open(s) => s.get_ref().input_backlog() > 0 || s.ssl().pending() > 0,
            State::Dead(_) => false,
        }
    }

    /// Whether the handshake has completed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// The protocol ALPN picked, once open (`http/1.1` or `h2`, or none
    /// when the origin does not do ALPN).
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.state {
            State::Open(s) => s.ssl().selected_alpn_protocol(),
            _ => None,
        }
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
                return Progress::Failed(TlsFailure::protocol("the TLS session already failed"));
            }
        };
        match mid.handshake() {
            Ok(stream) => {
                if stream.ssl().selected_alpn_protocol().is_some_and(|p| p != b"http/1.1" && p != b"h2") {
                    // RFC 7301 section 3.2: only a protocol offered may be
                    // picked; BoringSSL already refuses others, this keeps
                    // the promise visible.
                    self.state = State::Dead(Vec::new());
                    return Progress::Failed(TlsFailure::protocol("the origin picked another ALPN protocol"));
                }
                self.state = State::Open(stream);
                Progress::Done
            }
            Err(HandshakeError::WouldBlock(mid)) => {
                self.state = State::Handshaking(mid);
                Progress::WantInput
            }
            Err(HandshakeError::Failure(mid)) => {
                let failure = classify(mid.ssl(), mid.error());
                let (_, wire) = mid.into_parts();
                // The alert BoringSSL wrote still leaves.
                self.state = State::Dead(wire.output);
                Progress::Failed(failure)
            }
            Err(e) => Progress::Failed(TlsFailure::protocol(e.to_string())),
        }
    }

    /// Decrypts into `out`, at most `max` more bytes.
    pub fn read(&mut self, out: &mut Vec<u8>, max: usize) -> Result<Plain, TlsFailure> {
        let State::Open(s) = &mut self.state else { return Ok(Plain::Blocked) };
        if max == 0 {
            return Ok(Plain::Blocked);
        }
        read_plain(s, out, max).map_err(|e| classify(s.ssl(), &e))
    }

    /// Encrypts all of `data` into the output (the caller bounds it).
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), TlsFailure> {
        let State::Open(s) = &mut self.state else {
            return Err(TlsFailure::protocol("the TLS session is not open"));
        };
        while !data.is_empty() {
            match s.ssl_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) => return Err(classify(s.ssl(), &e)),
            }
        }
        Ok(())
    }

    /// Sends close_notify (our side ends; the origin's may go on).
    pub fn close(&mut self) {
        if let State::Open(s) = &mut self.state {
            let _ = s.shutdown();
        }
    }
}

/// Shared, immutable upstream TLS settings for every worker.
pub type SharedOriginTls = Arc<OriginTls>;

#[cfg(test)]
mod tests {
    use super::*;
    use boring::asn1::Asn1Time;
    use boring::bn::BigNum;
    use boring::ec::{EcGroup, EcKey};
    use boring::hash::MessageDigest;
    use boring::nid::Nid;
    use boring::pkey::{PKey, Private};
    use boring::ssl::{AlpnError, MidHandshakeSslStream, Ssl, SslContextBuilder, SslStream};
    use boring::x509::extension::{BasicConstraints, ExtendedKeyUsage, SubjectAlternativeName};
    use boring::x509::{X509NameBuilder, X509Ref};

    fn key() -> PKey<Private> {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap())
            .unwrap()
    }

    /// A certificate for `cn`: a CA (self-signed when `issuer` is None) or
    /// a server certificate for `dns` and 127.0.0.1 signed by `issuer`.
    fn cert(cn: &str, issuer: Option<(&X509Ref, &PKey<Private>)>, key: &PKey<Private>) -> X509 {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&BigNum::from_u32(7).unwrap().to_asn1_integer().unwrap()).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name())).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
        match issuer {
            None => {
                b.append_extension(&BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
                b.sign(key, MessageDigest::sha256()).unwrap();
            }
            Some((ca, ca_key)) => {
                let san = SubjectAlternativeName::new()
                    .dns(cn)
                    .ip("127.0.0.1")
                    .build(&b.x509v3_context(Some(ca), None))
                    .unwrap();
                b.append_extension(&san).unwrap();
                b.append_extension(&ExtendedKeyUsage::new().server_auth().build().unwrap()).unwrap();
                b.sign(ca_key, MessageDigest::sha256()).unwrap();
            }
        }
        b.build()
    }

    struct Pki {
        ca: X509,
        other_ca: X509,
        server: SslContextBuilderParts,
    }

    struct SslContextBuilderParts {
        cert: X509,
        key: PKey<Private>,
    }

    fn pki() -> Pki {
        let ca_key = key();
        let ca = cert("test CA", None, &ca_key);
        let other_ca = cert("another CA", None, &key());
        let server_key = key();
        let server = cert("echo.test", Some((&ca, &ca_key)), &server_key);
        Pki { ca, other_ca, server: SslContextBuilderParts { cert: server, key: server_key } }
    }

    /// A BoringSSL server on in-memory buffers with `parts` (and ALPN
    /// `http/1.1` when the client offers it).
    fn server(parts: &SslContextBuilderParts) -> MidHandshakeSslStream<Wire> {
        let mut b = SslContextBuilder::new(SslMethod::tls()).unwrap();
        b.set_certificate(&parts.cert).unwrap();
        b.set_private_key(&parts.key).unwrap();
        b.set_alpn_select_callback(|_, client| {
            boring::ssl::select_next_proto(b"\x08http/1.1", client).ok_or(AlpnError::NOACK)
        });
        let ssl = Ssl::new(&b.build()).unwrap();
        match ssl.accept(Wire::default()) {
            Err(HandshakeError::WouldBlock(m)) => m,
            _ => panic!("the server waits for the ClientHello"),
        }
    }

    fn route(ca: &X509, server_name: &str) -> RouteTls {
        RouteTls {
            server_name: server_name.into(),
            connector: connector(std::slice::from_ref(ca), Alpn::Http1).unwrap(),
            fallback: None,
            cas: std::sync::Arc::new(vec![ca.clone()]),
        }
    }

    enum Server {
        Mid(MidHandshakeSslStream<Wire>),
        Open(SslStream<Wire>),
        Failed,
    }

    /// Runs both handshakes against each other; the client's outcome and
    /// the server.
    fn handshake(client: &mut ClientSession, mut srv: Server) -> (Progress, Server) {
        for _ in 0..20 {
            let progress = client.handshake();
            let to_server = std::mem::take(client.output());
            let mut alert = Vec::new();
            srv = match srv {
                Server::Mid(mut m) => {
                    m.get_mut().input.extend_from_slice(&to_server);
                    match m.handshake() {
                        Ok(s) => Server::Open(s),
                        Err(HandshakeError::WouldBlock(m)) => Server::Mid(m),
                        Err(HandshakeError::Failure(m)) => {
                            alert = m.into_parts().1.output;
                            Server::Failed
                        }
                        Err(_) => Server::Failed,
                    }
                }
                Server::Open(mut s) => {
                    s.get_mut().input.extend_from_slice(&to_server);
                    Server::Open(s)
                }
                Server::Failed => Server::Failed,
            };
            let to_client = match &mut srv {
                Server::Mid(m) => std::mem::take(&mut m.get_mut().output),
                Server::Open(s) => std::mem::take(&mut s.get_mut().output),
                Server::Failed => alert,
            };
            if !matches!(progress, Progress::WantInput) {
                return (progress, srv);
            }
            if to_client.is_empty() && to_server.is_empty() {
                return (client.handshake(), srv);
            }
            client.feed(&to_client);
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn a_verified_handshake_carries_bytes_both_ways_and_closes() {
        let p = pki();
        let mut client = ClientSession::new(&route(&p.ca, "echo.test")).unwrap();
        let (progress, srv) = handshake(&mut client, Server::Mid(server(&p.server)));
        assert_eq!(progress, Progress::Done);
        assert!(client.is_open());
        assert_eq!(client.alpn(), Some(&b"http/1.1"[..]));
        let Server::Open(mut srv) = srv else { panic!("the server finished too") };
        // SNI carried the name.
        assert_eq!(srv.ssl().servername(boring::ssl::NameType::HOST_NAME), Some("echo.test"));
        client.write(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        srv.get_mut().input.extend_from_slice(&std::mem::take(client.output()));
        let mut got = Vec::new();
        assert_eq!(read_plain(&mut srv, &mut got, 100).unwrap(), Plain::Data(18));
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
        srv.ssl_write(b"HTTP/1.1 101 x\r\n\r\n").unwrap();
        client.feed(&std::mem::take(&mut srv.get_mut().output));
        let mut plain = Vec::new();
        // A bounded read leaves the rest buffered.
        assert_eq!(client.read(&mut plain, 4).unwrap(), Plain::Data(4));
        assert!(client.has_buffered());
        assert_eq!(client.read(&mut plain, 100).unwrap(), Plain::Data(14));
        assert_eq!(plain, b"HTTP/1.1 101 x\r\n\r\n");
        assert_eq!(client.read(&mut plain, 100).unwrap(), Plain::Blocked);
        // close_notify both ways.
        client.close();
        srv.get_mut().input.extend_from_slice(&std::mem::take(client.output()));
        assert_eq!(read_plain(&mut srv, &mut got, 100).unwrap(), Plain::Closed);
        let _ = srv.shutdown();
        client.feed(&std::mem::take(&mut srv.get_mut().output));
        assert_eq!(client.read(&mut plain, 100).unwrap(), Plain::Closed);
        // An IP literal is verified against the IP SAN (no SNI sent).
        let mut client = ClientSession::new(&route(&p.ca, "127.0.0.1")).unwrap();
        assert_eq!(handshake(&mut client, Server::Mid(server(&p.server))).0, Progress::Done);
    }

    #[test]
    fn a_wrong_name_or_an_unknown_ca_is_a_certificate_error() {
        let p = pki();
        for (ca, name, why) in [
            (&p.ca, "other.test", "Hostname mismatch"),
            (&p.ca, "127.0.0.2", "IP address mismatch"),
            (&p.other_ca, "echo.test", "unable to get local issuer certificate"),
        ] {
            let mut client = ClientSession::new(&route(ca, name)).unwrap();
            let (progress, srv) = handshake(&mut client, Server::Mid(server(&p.server)));
            let Progress::Failed(f) = progress else { panic!("{name}: {progress:?}") };
            assert_eq!(f.error, ProxyError::TlsCertificateError, "{name}: {f:?}");
            assert!(f.details.contains(why), "{name}: {f:?}");
            assert!(!client.is_open());
            assert!(matches!(srv, Server::Failed), "{name}: the server got the client's alert");
        }
    }

    #[test]
    fn an_alert_from_the_origin_and_garbage_are_told_apart() {
        let p = pki();
        // The origin refuses the ClientHello: no common protocol version.
        let mut b = SslContextBuilder::new(SslMethod::tls()).unwrap();
        b.set_certificate(&p.server.cert).unwrap();
        b.set_private_key(&p.server.key).unwrap();
        b.set_max_proto_version(Some(SslVersion::TLS1_1)).unwrap();
        b.set_min_proto_version(Some(SslVersion::TLS1)).unwrap();
        let mid = match Ssl::new(&b.build()).unwrap().accept(Wire::default()) {
            Err(HandshakeError::WouldBlock(m)) => m,
            _ => panic!("the server waits"),
        };
        let mut client = ClientSession::new(&route(&p.ca, "echo.test")).unwrap();
        let (progress, _) = handshake(&mut client, Server::Mid(mid));
        let Progress::Failed(f) = progress else { panic!("{progress:?}") };
        assert_eq!(f.error, ProxyError::TlsAlertReceived, "{f:?}");
        assert!(f.details.contains("alert 70") && f.details.contains("protocol_version"), "{f:?}");
        // Not TLS at all (an HTTP server on the port).
        let mut client = ClientSession::new(&route(&p.ca, "echo.test")).unwrap();
        assert_eq!(client.handshake(), Progress::WantInput);
        client.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let Progress::Failed(f) = client.handshake() else { panic!("garbage must fail") };
        assert_eq!(f.error, ProxyError::TlsProtocolError, "{f:?}");
    }

    #[test]
    fn settings_come_from_the_bootstrap_with_one_context_per_ca_file() {
        use relay_proto::channel::bootstrap::UpstreamTls;
        let p = pki();
        let dir = std::env::temp_dir().join(format!("relay-origin-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, p.ca.to_pem().unwrap()).unwrap();
        let ca = ca_file.to_str().unwrap().to_string();
        let tls = |name: &str, ca: &str| Some(UpstreamTls { server_name: name.into(), ca_file: ca.into() });
        let routes = vec![
            UpstreamBootstrap { route: "plain".into(), tls: None, origin_http: OriginHttp::H2 },
            UpstreamBootstrap {
                route: "a".into(),
                tls: tls("echo.test", &ca),
                origin_http: OriginHttp::Http1,
            },
            UpstreamBootstrap {
                route: "b".into(),
                tls: tls("127.0.0.1", &ca),
                origin_http: OriginHttp::Auto,
            },
        ];
        let o = OriginTls::from_bootstrap(&routes).unwrap();
        assert!(o.route("nope").is_none(), "unknown route");
        assert!(matches!(o.route("plain"), Some(None)));
        assert_eq!(
            (o.http("plain"), o.http("b"), o.http("nope")),
            (OriginHttp::H2, OriginHttp::Auto, OriginHttp::Http1)
        );
        assert!(
            o.route("b").unwrap().unwrap().fallback.is_some()
                && o.route("a").unwrap().unwrap().fallback.is_none()
        );
        let a = o.route("a").unwrap().unwrap();
        assert_eq!(a.server_name, "echo.test");
        let mut client = ClientSession::new(a).unwrap();
        assert_eq!(handshake(&mut client, Server::Mid(server(&p.server))).0, Progress::Done);
        // Unreadable or unparsable CA files fail, naming the file.
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, b"nothing here").unwrap();
        for bad in [dir.join("missing.pem"), garbage] {
            let bad = bad.to_str().unwrap().to_string();
            let routes = vec![UpstreamBootstrap {
                route: "a".into(),
                tls: tls("echo.test", &bad),
                origin_http: OriginHttp::Http1,
            }];
            let e = OriginTls::from_bootstrap(&routes).unwrap_err().to_string();
            assert!(e.contains(&bad), "{e}");
        }
        // The bootstrap's bounds are checked.
        let routes = vec![UpstreamBootstrap {
            route: "a".into(),
            tls: tls("echo.test", "relative.pem"),
            origin_http: OriginHttp::Http1,
        }];
        assert!(matches!(OriginTls::from_bootstrap(&routes), Err(OriginTlsError::Invalid(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

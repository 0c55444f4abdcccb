//! A WebSocket echo origin and WebSocket clients in Rust (the `tungstenite`
//! crate, synchronous), for `relay-bench websocket` ([`crate::wsbench`]) and
//! the WebSocket tests that need no Python peer.
//!
//! - [`WsEcho`]: an origin on threads (one per connection, bounded) that
//!   sends every message back as it came.
//! - [`connect_direct`]: a client straight to an origin.
//! - [`connect_h1`]: a client through the relay's TCP front with an
//!   HTTP/1.1 Upgrade (cleartext, or TLS with ALPN http/1.1 on BoringSSL).
//! - [`connect_h2`]: a client through the relay over HTTP/2 extended
//!   CONNECT (RFC 8441; the `h2` crate on a current-thread tokio runtime
//!   behind a blocking `Read + Write`, the stream tungstenite frames on).
//! - [`connect_h3`]: a client through the relay over HTTP/3 extended
//!   CONNECT (RFC 9220; the bench's quiche client, [`crate::client`],
//!   behind a blocking `Read + Write`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use boring::ssl::{SslConnector, SslMethod};
use bytes::Bytes;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::Role;
use tungstenite::{HandshakeError, Message, WebSocket};

use crate::tcp_echo::Acceptor;

/// A byte stream a WebSocket runs on.
pub trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// A WebSocket on any stream.
pub type Ws = WebSocket<Box<dyn Io>>;

/// A running WebSocket echo origin; stops when dropped.
pub struct WsEcho {
    acceptor: Acceptor,
    messages: Arc<AtomicU64>,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn serve(s: TcpStream, messages: &AtomicU64, stop: &AtomicBool) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut ws) = tungstenite::accept(s) else { return };
    // Short reads from here on, to notice the stop flag.
    let _ = ws.get_mut().set_read_timeout(Some(Duration::from_millis(200)));
    loop {
        match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(m).is_err() {
                    return;
                }
                messages.fetch_add(1, Ordering::Relaxed);
            }
            // Pings are answered and closes replied to by tungstenite.
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl WsEcho {
    /// Binds `addr` (port 0 for any) and echoes.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        let messages = Arc::new(AtomicU64::new(0));
        let counter = messages.clone();
        let acceptor = Acceptor::start(addr, move |s, stop| serve(s, &counter, stop))?;
        Ok(Self { acceptor, messages })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// `ws://` URL of the origin (for a `[[upstreams]]` route).
    pub fn origin(&self) -> String {
        format!("ws://{}", self.acceptor.addr())
    }

    /// WebSocket handshakes begun so far (TCP connections accepted).
    pub fn accepted(&self) -> u64 {
        self.acceptor.accepted()
    }

    /// Messages echoed so far.
    pub fn echoed(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// How the relay answered a WebSocket handshake.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status (101 on HTTP/1.1, 200 on HTTP/2 when it opened).
    pub status: u16,
    /// Its header fields, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Answer {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn of(status: u16, headers: &http::HeaderMap) -> Self {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        Self { status, headers }
    }
}

/// A WebSocket, or the relay's refusal.
pub enum Opened {
    /// The handshake succeeded.
    Open(Box<Ws>, Answer),
    /// The relay (or the origin) answered something else.
    Refused(Answer),
}

impl Opened {
    /// The WebSocket, or an error naming the refusal.
    pub fn open(self) -> Result<(Ws, Answer)> {
        match self {
            Opened::Open(ws, a) => Ok((*ws, a)),
            Opened::Refused(a) => bail!("WebSocket refused with {}: {:?}", a.status, a.headers),
        }
    }
}

/// TLS to the relay's TCP front.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Certificate or CA that verifies the relay (`Relay::cert()`).
    pub ca: PathBuf,
    /// TLS server name.
    pub server_name: String,
}

/// Where a client sends its handshake.
#[derive(Debug, Clone)]
pub struct Through {
    /// The TCP address to connect to: an origin, or the relay's TCP front
    /// (TLS or cleartext listener).
    pub addr: SocketAddr,
    /// TLS, or cleartext when `None`.
    pub tls: Option<Tls>,
    /// The `Host` / `:authority` of the request.
    pub authority: String,
    /// Bearer token sent as `Proxy-Authorization`.
    pub token: Option<String>,
}

fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("TCP connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Opens a WebSocket to `path` with an HTTP/1.1 Upgrade (RFC 6455 section
/// 4) over `through`: straight to an origin, or through the relay's TCP
/// front. Every read has `timeout` as its deadline.
pub fn connect_h1(through: &Through, path: &str, timeout: Duration) -> Result<Opened> {
    let s = tcp(through.addr, timeout)?;
    let stream: Box<dyn Io> = match &through.tls {
        None => Box::new(s),
        Some(tls) => {
            let mut b = SslConnector::builder(SslMethod::tls())?;
            b.set_ca_file(&tls.ca).with_context(|| format!("CA {}", tls.ca.display()))?;
            b.set_alpn_protos(b"\x08http/1.1")?;
            let ssl = b.build().connect(&tls.server_name, s).map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            Box::new(ssl)
        }
    };
    let scheme = if through.tls.is_some() { "wss" } else { "ws" };
    let mut req = format!("{scheme}://{}{path}", through.authority).into_client_request()?;
    if let Some(token) = &through.token {
        req.headers_mut().insert("proxy-authorization", format!("Bearer {token}").parse()?);
    }
    match tungstenite::client::client(req, stream) {
        Ok((ws, resp)) => {
            let answer = Answer::of(resp.status().as_u16(), resp.headers());
            Ok(Opened::Open(Box::new(ws), answer))
        }
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Ok(Opened::Refused(Answer::of(resp.status().as_u16(), resp.headers())))
        }
        Err(HandshakeError::Failure(e)) => bail!("WebSocket handshake: {e}"),
        Err(HandshakeError::Interrupted(_)) => bail!("WebSocket handshake timed out"),
    }
}

/// Opens a WebSocket straight to an origin at `addr`.
pub fn connect_direct(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Ws> {
    let through = Through { addr, tls: None, authority: addr.to_string(), token: None };
    Ok(connect_h1(&through, path, timeout)?.open()?.0)
}

/// One HTTP/2 stream as a blocking byte stream: reads wait for DATA (and
/// give the window back), writes wait for flow-control capacity. The
/// connection's task runs on the current-thread runtime while a read or a
/// write waits.
struct H2Io {
    rt: tokio::runtime::Runtime,
    // Keeps the connection open with the stream.
    _client: h2::client::SendRequest<Bytes>,
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buf: Bytes,
    eof: bool,
    timeout: Duration,
}

impl Read for H2Io {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            if self.eof {
                return Ok(0);
            }
            let (recv, timeout) = (&mut self.recv, self.timeout);
            let next = self.rt.block_on(async { tokio::time::timeout(timeout, recv.data()).await });
            match next {
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no DATA in time")),
                Ok(Some(Ok(b))) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    self.buf = b;
                }
                Ok(Some(Err(e))) => return Err(io::Error::other(e)),
                Ok(None) => self.eof = true,
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

impl Write for H2Io {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.send.reserve_capacity(data.len());
        let (send, timeout) = (&mut self.send, self.timeout);
        let cap = self.rt.block_on(async {
            tokio::time::timeout(timeout, std::future::poll_fn(|cx| send.poll_capacity(cx))).await
        });
        let n = match cap {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 window in time")),
            Ok(Some(Ok(n))) => n.min(data.len()),
            Ok(Some(Err(e))) => return Err(io::Error::other(e)),
            Ok(None) => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        };
        self.send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens a WebSocket to `path` through the relay over HTTP/2 with TLS
/// (ALPN h2): extended CONNECT with `:protocol websocket` (RFC 8441
/// section 4), frames in DATA.
pub fn connect_h2(through: &Through, path: &str, timeout: Duration) -> Result<Opened> {
    let tls = through.tls.as_ref().context("HTTP/2 here is over TLS")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let target = crate::h2client::H2Target {
        relay: through.addr,
        server_name: tls.server_name.clone(),
        ca: Some(tls.ca.clone()),
        insecure: false,
        token: through.token.clone(),
        template: String::new(),
    };
    let mut client = rt
        .block_on(async { tokio::time::timeout(timeout, crate::h2client::connect(&target)).await })
        .context("HTTP/2 connection timed out")??;
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://{}{path}", through.authority))
        .header("sec-websocket-version", "13")
        .extension(h2::ext::Protocol::from_static("websocket"));
    if let Some(token) = &through.token {
        req = req.header("proxy-authorization", format!("Bearer {token}"));
    }
    let (resp, send) = client.send_request(req.body(())?, false)?;
    let resp = rt
        .block_on(async { tokio::time::timeout(timeout, resp).await })
        .context("no answer to the extended CONNECT in time")??;
    let answer = Answer::of(resp.status().as_u16(), resp.headers());
    if resp.status() != http::StatusCode::OK {
        return Ok(Opened::Refused(answer));
    }
    let io =
        H2Io { rt, _client: client, send, recv: resp.into_body(), buf: Bytes::new(), eof: false, timeout };
    let ws = WebSocket::from_raw_socket(Box::new(io) as Box<dyn Io>, Role::Client, None);
    Ok(Opened::Open(Box::new(ws), answer))
}

/// One HTTP/3 request stream as a blocking byte stream: reads drive the
/// quiche client until DATA (or the end) arrives, writes until flow
/// control takes the bytes.
struct H3Io {
    client: crate::client::Client,
    stream: u64,
    buf: Vec<u8>,
    pos: usize,
    timeout: Duration,
}

impl Read for H3Io {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let deadline = std::time::Instant::now() + self.timeout;
        while self.pos == self.buf.len() {
            let raw = self.client.take_raw(self.stream);
            if !raw.is_empty() {
                (self.buf, self.pos) = (raw, 0);
                break;
            }
            if self.client.stream_finished(self.stream) {
                return Ok(0);
            }
            if std::time::Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no DATA in time"));
            }
            self.client.drive(Duration::from_millis(5)).map_err(io::Error::other)?;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for H3Io {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.client.send_stream_bytes(self.stream, data, false).map_err(io::Error::other)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens a WebSocket to `path` through the relay over HTTP/3: extended
/// CONNECT with `:protocol websocket` (RFC 9220 section 3), frames in
/// DATA. `through.addr` is the relay's QUIC address.
pub fn connect_h3(through: &Through, path: &str, timeout: Duration) -> Result<Opened> {
    let tls = through.tls.as_ref().context("HTTP/3 needs the relay's certificate")?;
    let mut cfg = crate::client::ClientConfig::new(through.addr);
    cfg.server_name = tls.server_name.clone();
    cfg.ca = Some(tls.ca.clone());
    cfg.token = through.token.clone();
    let mut client = crate::client::Client::connect(cfg, timeout)?;
    client.wait_settings(timeout)?;
    if !client.extended_connect_enabled() {
        bail!("the relay did not send SETTINGS_ENABLE_CONNECT_PROTOCOL");
    }
    let mut headers: Vec<(String, String)> = [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", through.authority.as_str()),
        (":path", path),
        ("sec-websocket-version", "13"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    if let Some(token) = &through.token {
        headers.push(("proxy-authorization".into(), format!("Bearer {token}")));
    }
    let stream = client.request_stream(&headers)?;
    let answer = match client.wait_answer(stream, timeout)? {
        crate::client::Answer::Response(fields) => {
            let status = fields
                .iter()
                .find(|(n, _)| n == ":status")
                .and_then(|(_, v)| v.parse().ok())
                .context("no :status")?;
            Answer { status, headers: fields.into_iter().filter(|(n, _)| !n.starts_with(':')).collect() }
        }
        crate::client::Answer::Reset(code) => bail!("the relay reset the stream with {code:#x}"),
    };
    if answer.status != 200 {
        return Ok(Opened::Refused(answer));
    }
    let io = H3Io { client, stream, buf: Vec::new(), pos: 0, timeout };
    let ws = WebSocket::from_raw_socket(Box::new(io) as Box<dyn Io>, Role::Client, None);
    Ok(Opened::Open(Box::new(ws), answer))
}

/// Sends `msg` and reads until its echo (answering pings on the way);
/// fails on anything else.
pub fn round_trip(ws: &mut Ws, msg: Message) -> Result<Message> {
    ws.send(msg)?;
    // Bounded: a peer that only pings cannot keep this loop going.
    for _ in 0..64 {
        match ws.read()? {
            m @ (Message::Text(_) | Message::Binary(_)) => return Ok(m),
            Message::Close(c) => bail!("the peer closed: {c:?}"),
            _ => {}
        }
    }
    bail!("no echo among 64 control frames")
}

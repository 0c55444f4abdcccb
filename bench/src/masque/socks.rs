//! A local SOCKS5 server (RFC 1928) in front of the relay, so unmodified
//! applications can use it: CONNECT becomes a classic CONNECT through the
//! relay, UDP ASSOCIATE a local UDP relay socket whose datagrams go
//! through connect-udp, one tunnel per destination. Only the no
//! authentication method is offered (the server listens on loopback by
//! default); BIND is refused.
//!
//! The codec ([`parse_greeting`], [`parse_request`], [`parse_udp`],
//! [`encode_udp`], [`reply`]) is sans-IO and never panics on its input.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::flows::{FlowTable, run_flow};
use super::transport::{Kind, OpenError, Transport};
use super::{HostPort, is_dns_name};

/// The protocol version byte.
pub const VERSION: u8 = 5;
/// The "no authentication required" method.
pub const NO_AUTH: u8 = 0x00;
/// "No acceptable methods".
pub const NO_ACCEPTABLE: u8 = 0xff;

/// Reply codes (RFC 1928 section 6).
pub mod rep {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired.
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Request commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (TCP).
    Connect,
    /// BIND (not served).
    Bind,
    /// UDP ASSOCIATE.
    UdpAssociate,
}

/// A SOCKS address: an IP address or a domain name, with a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SocksAddr {
    /// ATYP 1 or 4.
    Ip(SocketAddr),
    /// ATYP 3 (checked to be a DNS name).
    Domain(String, u16),
}

impl SocksAddr {
    /// The tunnel target it names.
    pub fn target(&self) -> HostPort {
        match self {
            SocksAddr::Ip(a) => HostPort::from(*a),
            SocksAddr::Domain(d, p) => HostPort { host: d.clone(), port: *p },
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            SocksAddr::Ip(a) => a.port(),
            SocksAddr::Domain(_, p) => *p,
        }
    }

    /// Appends ATYP, address and port.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            SocksAddr::Ip(SocketAddr::V4(a)) => {
                out.push(1);
                out.extend_from_slice(&a.ip().octets());
            }
            SocksAddr::Ip(SocketAddr::V6(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
            }
            SocksAddr::Domain(d, _) => {
                out.push(3);
                out.push(d.len() as u8);
                out.extend_from_slice(d.as_bytes());
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }
}

impl std::fmt::Display for SocksAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.target())
    }
}

/// What is wrong with a SOCKS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    /// Not SOCKS version 5.
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    /// A greeting that offers no method.
    #[error("the greeting offers no authentication method")]
    NoMethods,
    /// An unknown command.
    #[error("unknown command {0}")]
    Command(u8),
    /// An unknown address type.
    #[error("unknown address type {0}")]
    AddressType(u8),
    /// A domain that is not a DNS name.
    #[error("the domain is not a DNS name")]
    Domain,
    /// A non-zero reserved field.
    #[error("reserved field is not zero")]
    Reserved,
    /// A fragment (FRAG != 0): fragmentation is not supported.
    #[error("fragment {0}: fragmentation is not supported")]
    Fragment(u8),
    /// A UDP datagram shorter than its header.
    #[error("datagram shorter than its header")]
    Truncated,
}

impl SocksError {
    /// The reply code that answers a request with this error.
    pub fn reply_code(&self) -> u8 {
        match self {
            SocksError::Command(_) => rep::COMMAND_NOT_SUPPORTED,
            SocksError::AddressType(_) => rep::ADDRESS_TYPE_NOT_SUPPORTED,
            _ => rep::GENERAL_FAILURE,
        }
    }
}

/// Parses `ATYP ADDR PORT` at the start of `buf`: the address and the
/// bytes used, `None` when more bytes are needed.
fn parse_addr(buf: &[u8]) -> Result<Option<(SocksAddr, usize)>, SocksError> {
    let Some(&atyp) = buf.first() else { return Ok(None) };
    let (addr_len, start) = match atyp {
        1 => (4, 1),
        4 => (16, 1),
        3 => match buf.get(1) {
            Some(0) => return Err(SocksError::Domain),
            Some(&n) => (usize::from(n), 2),
            None => return Ok(None),
        },
        other => return Err(SocksError::AddressType(other)),
    };
    let end = start + addr_len + 2;
    let Some(bytes) = buf.get(start..end) else { return Ok(None) };
    let (addr, port) = bytes.split_at(addr_len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let addr = match atyp {
        1 => {
            SocksAddr::Ip(SocketAddr::new(IpAddr::from(<[u8; 4]>::try_from(addr).unwrap_or_default()), port))
        }
        4 => {
            SocksAddr::Ip(SocketAddr::new(IpAddr::from(<[u8; 16]>::try_from(addr).unwrap_or_default()), port))
        }
        _ => {
            let name = std::str::from_utf8(addr).map_err(|_| SocksError::Domain)?;
            // An IP literal sent as a name is the address.
            match name.parse::<IpAddr>() {
                Ok(ip) => SocksAddr::Ip(SocketAddr::new(ip, port)),
                Err(_) if is_dns_name(name) => SocksAddr::Domain(name.to_string(), port),
                Err(_) => return Err(SocksError::Domain),
            }
        }
    };
    Ok(Some((addr, end)))
}

/// Parses the method-selection message: the methods offered and the
/// bytes used, `None` when more bytes are needed.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, SocksError> {
    let (Some(&ver), Some(&n)) = (buf.first(), buf.get(1)) else { return Ok(None) };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let end = 2 + usize::from(n);
    Ok(buf.get(2..end).map(|m| (m.to_vec(), end)))
}

/// Parses a request (`VER CMD RSV ATYP DST.ADDR DST.PORT`): the command,
/// the address and the bytes used, `None` when more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Command, SocksAddr, usize)>, SocksError> {
    let Some(head) = buf.get(..3) else {
        return match buf.first() {
            Some(&v) if v != VERSION => Err(SocksError::Version(v)),
            _ => Ok(None),
        };
    };
    if head[0] != VERSION {
        return Err(SocksError::Version(head[0]));
    }
    let command = match head[1] {
        1 => Command::Connect,
        2 => Command::Bind,
        3 => Command::UdpAssociate,
        other => return Err(SocksError::Command(other)),
    };
    if head[2] != 0 {
        return Err(SocksError::Reserved);
    }
    Ok(parse_addr(&buf[3..])?.map(|(addr, used)| (command, addr, 3 + used)))
}

/// Builds a reply: `VER REP RSV ATYP BND.ADDR BND.PORT`.
pub fn reply(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code, 0];
    SocksAddr::Ip(bound).encode(&mut out);
    out
}

/// Parses a UDP request header (`RSV(2) FRAG ATYP DST.ADDR DST.PORT`):
/// the destination and the payload.
pub fn parse_udp(datagram: &[u8]) -> Result<(SocksAddr, &[u8]), SocksError> {
    let Some(head) = datagram.get(..3) else { return Err(SocksError::Truncated) };
    if head[0] != 0 || head[1] != 0 {
        return Err(SocksError::Reserved);
    }
    if head[2] != 0 {
        return Err(SocksError::Fragment(head[2]));
    }
    match parse_addr(&datagram[3..])? {
        Some((addr, used)) => Ok((addr, &datagram[3 + used..])),
        None => Err(SocksError::Truncated),
    }
}

/// Wraps a payload from `from` in the UDP header.
pub fn encode_udp(from: &SocksAddr, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0]);
    from.encode(out);
    out.extend_from_slice(payload);
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct SocksConfig {
    /// Where to listen (TCP; UDP relay sockets bind the same address).
    pub listen: SocketAddr,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Destinations per UDP association.
    pub max_destinations: usize,
    /// A destination's tunnel closes after this long without a datagram.
    pub idle: Duration,
}

/// How long a client has for its greeting and request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The greeting and request fit in this (a request is at most 262 bytes).
const MAX_HANDSHAKE: usize = 1024;

/// Binds the listener; [`serve`] then accepts.
pub async fn bind(cfg: &SocksConfig) -> Result<TcpListener> {
    TcpListener::bind(cfg.listen).await.with_context(|| format!("binding --listen {}", cfg.listen))
}

/// Accepts clients until the process ends.
pub async fn serve(transport: Arc<Transport>, listener: TcpListener, cfg: SocksConfig) -> Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // Out of descriptors and the like: wait a little, go on.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if live.load(Ordering::Relaxed) >= cfg.max_connections {
            tracing::warn!("{} SOCKS clients are served already: {peer} refused", cfg.max_connections);
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let (transport, cfg, live) = (transport.clone(), cfg.clone(), live.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_client(&transport, stream, peer, &cfg).await {
                tracing::warn!("SOCKS client {peer}: {e:#}");
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Reads into `buf` until `parse` finds a whole message.
async fn read_message<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<T>, SocksError>,
) -> Result<std::result::Result<T, SocksError>> {
    loop {
        match parse(buf) {
            Ok(Some(v)) => return Ok(Ok(v)),
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        if buf.len() >= MAX_HANDSHAKE {
            bail!("handshake longer than {MAX_HANDSHAKE} bytes");
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed during the handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_client(
    transport: &Arc<Transport>,
    mut stream: TcpStream,
    peer: SocketAddr,
    cfg: &SocksConfig,
) -> Result<()> {
    let mut buf = Vec::new();
    let handshake = async {
        let (methods, used) = match read_message(&mut stream, &mut buf, parse_greeting).await? {
            Ok(v) => v,
            Err(e) => bail!("bad greeting: {e}"),
        };
        buf.drain(..used);
        if !methods.contains(&NO_AUTH) {
            stream.write_all(&[VERSION, NO_ACCEPTABLE]).await?;
            bail!("the client offers no method we accept (only \"no authentication\")");
        }
        stream.write_all(&[VERSION, NO_AUTH]).await?;
        match read_message(&mut stream, &mut buf, parse_request).await? {
            Ok((command, addr, used)) => {
                buf.drain(..used);
                Ok((command, addr))
            }
            Err(e) => {
                let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
                stream.write_all(&reply(e.reply_code(), unspecified)).await?;
                bail!("bad request: {e}")
            }
        }
    };
    let (command, addr) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| anyhow::anyhow!("no complete request within {HANDSHAKE_TIMEOUT:?}"))??;
    match command {
        Command::Connect => connect(transport, stream, buf, addr).await,
        Command::UdpAssociate => associate(transport, stream, peer, addr, cfg).await,
        Command::Bind => {
            let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
            stream.write_all(&reply(rep::COMMAND_NOT_SUPPORTED, unspecified)).await?;
            bail!("BIND is not supported")
        }
    }
}

/// The reply code for a tunnel the relay did not open.
fn open_error_code(e: &OpenError) -> u8 {
    match e {
        OpenError::Refused { status: 401 | 403 | 407, .. } => rep::NOT_ALLOWED,
        OpenError::Refused { text, .. } if text.contains("connection_refused") => rep::CONNECTION_REFUSED,
        OpenError::Refused { text, .. } if text.contains("timeout") => rep::TTL_EXPIRED,
        OpenError::Refused { status: 502 | 504, .. } => rep::HOST_UNREACHABLE,
        OpenError::Refused { status: 400 | 404, .. } => rep::NETWORK_UNREACHABLE,
        _ => rep::GENERAL_FAILURE,
    }
}

/// CONNECT: a classic CONNECT tunnel, bytes relayed both ways; each side's
/// end of stream is passed on as a half-close.
async fn connect(transport: &Transport, stream: TcpStream, early: Vec<u8>, addr: SocksAddr) -> Result<()> {
    let target = addr.target();
    let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
    let (mut rd, mut wr) = stream.into_split();
    let tunnel = match transport.open(Kind::Tcp, &target).await {
        Ok(t) => t,
        Err(e) => {
            wr.write_all(&reply(open_error_code(&e), unspecified)).await?;
            bail!("CONNECT {target}: {e}");
        }
    };
    wr.write_all(&reply(rep::SUCCEEDED, unspecified)).await?;
    tracing::info!("CONNECT {target}: tunnel open");
    let (tx, mut rx) = (tunnel.tx, tunnel.rx);
    let up = tokio::spawn(async move {
        if !early.is_empty() && !tx.send(early).await {
            return;
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping tx sends the FIN
                Ok(n) => {
                    if !tx.send(buf[..n].to_vec()).await {
                        return;
                    }
                }
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        if wr.write_all(&chunk).await.is_err() {
            up.abort();
            return Ok(());
        }
    }
    let _ = wr.shutdown().await;
    let _ = up.await;
    Ok(())
}

/// UDP ASSOCIATE: a UDP relay socket on the listener's address; datagrams
/// from the client (the control connection's address; the port it named,
/// or the first one it sends from) go through one connect-udp tunnel per
/// destination, replies come back wrapped in the header. Ends when the
/// control connection closes.
async fn associate(
    transport: &Arc<Transport>,
    mut control: TcpStream,
    peer: SocketAddr,
    requested: SocksAddr,
    cfg: &SocksConfig,
) -> Result<()> {
    let local_ip = control.local_addr()?.ip();
    let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
    let socket = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            control.write_all(&reply(rep::GENERAL_FAILURE, unspecified)).await?;
            bail!("binding the UDP relay socket: {e}");
        }
    };
    control.write_all(&reply(rep::SUCCEEDED, socket.local_addr()?)).await?;
    // RFC 1928 section 7: datagrams from any other source are dropped.
    let mut client: Option<SocketAddr> = match requested {
        SocksAddr::Ip(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
        _ => None,
    };
    let wanted_port = requested.port();
    tracing::info!("UDP ASSOCIATE for {peer}: relaying on {}", socket.local_addr()?);
    let mut flows: FlowTable<SocksAddr> = FlowTable::new(cfg.max_destinations);
    let mut buf = vec![0u8; 65_536];
    let mut scratch = [0u8; 256];
    enum Event {
        Control(std::io::Result<usize>),
        Datagram(std::io::Result<(usize, SocketAddr)>),
    }
    loop {
        let event = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut scratch);
            if let Poll::Ready(r) = std::pin::Pin::new(&mut control).poll_read(cx, &mut rb) {
                return Poll::Ready(Event::Control(r.map(|()| rb.filled().len())));
            }
            let mut rb = ReadBuf::new(&mut buf);
            socket.poll_recv_from(cx, &mut rb).map(|r| Event::Datagram(r.map(|a| (rb.filled().len(), a))))
        })
        .await;
        match event {
            Event::Control(Ok(0)) | Event::Control(Err(_)) => break,
            Event::Control(Ok(_)) => {} // nothing is expected; ignored
            Event::Datagram(Err(_)) => continue,
            Event::Datagram(Ok((n, from))) => {
                let accepted = match client {
                    Some(c) => from == c,
                    None => from.ip() == peer.ip() && (wanted_port == 0 || from.port() == wanted_port),
                };
                if !accepted {
                    tracing::debug!("UDP ASSOCIATE for {peer}: datagram from {from} dropped");
                    continue;
                }
                client = Some(from);
                let (dest, payload) = match parse_udp(&buf[..n]) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!("UDP ASSOCIATE for {peer}: datagram dropped: {e}");
                        continue;
                    }
                };
                let (transport, socket, idle, reply_from) =
                    (transport.clone(), socket.clone(), cfg.idle, dest.clone());
                flows.route(dest, payload.to_vec(), move |rx| async move {
                    let target = reply_from.target();
                    let mut out = Vec::new();
                    run_flow(&transport, &target, rx, idle, |d| {
                        encode_udp(&reply_from, &d, &mut out);
                        // A full socket buffer drops the reply, as the network would.
                        let _ = socket.try_send_to(&out, from);
                    })
                    .await
                });
            }
        }
    }
    tracing::info!("UDP ASSOCIATE for {peer}: ended ({} destinations)", flows.len());
    drop(flows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_parse_whole_or_ask_for_more() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0, 2, 9]), Ok(Some((vec![0, 2], 4))));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(SocksError::NoMethods));
    }

    #[test]
    fn requests_parse_every_address_type() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90];
        assert_eq!(
            parse_request(&v4),
            Ok(Some((Command::Connect, SocksAddr::Ip("127.0.0.1:8080".parse().unwrap()), 10)))
        );
        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&"::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 53]);
        assert_eq!(
            parse_request(&v6),
            Ok(Some((Command::UdpAssociate, SocksAddr::Ip("[::1]:53".parse().unwrap()), 22)))
        );
        let mut name = vec![5, 1, 0, 3, 11];
        name.extend_from_slice(b"example.com");
        name.extend_from_slice(&[1, 187, 0xAA]);
        assert_eq!(
            parse_request(&name),
            Ok(Some((Command::Connect, SocksAddr::Domain("example.com".into(), 443), 18))),
            "trailing bytes are left for the caller"
        );
        // An IP literal sent as a name is the address.
        let mut lit = vec![5, 1, 0, 3, 9];
        lit.extend_from_slice(b"127.0.0.1");
        lit.extend_from_slice(&[0, 80]);
        assert_eq!(parse_request(&lit).unwrap().unwrap().1, SocksAddr::Ip("127.0.0.1:80".parse().unwrap()));
        // Every proper prefix asks for more.
        for msg in [&v4[..], &v6[..], &name[..18]] {
            for n in 0..msg.len() {
                assert_eq!(parse_request(&msg[..n]), Ok(None), "{msg:?}[..{n}]");
            }
        }
    }

    #[test]
    fn bad_requests_are_named_and_answered_with_the_right_code() {
        assert_eq!(parse_request(&[4]), Err(SocksError::Version(4)));
        assert_eq!(parse_request(&[5, 9, 0, 1]), Err(SocksError::Command(9)));
        assert_eq!(parse_request(&[5, 1, 1, 1]), Err(SocksError::Reserved));
        assert_eq!(parse_request(&[5, 1, 0, 7, 0]), Err(SocksError::AddressType(7)));
        assert_eq!(parse_request(&[5, 1, 0, 3, 0, 0, 80]), Err(SocksError::Domain));
        let mut bad = vec![5, 1, 0, 3, 5];
        bad.extend_from_slice(b"a/b:c");
        bad.extend_from_slice(&[0, 80]);
        assert_eq!(parse_request(&bad), Err(SocksError::Domain));
        let mut bad = vec![5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80];
        assert_eq!(parse_request(&bad), Err(SocksError::Domain), "not UTF-8");
        bad[1] = 2;
        assert_eq!(parse_request(&bad).unwrap_err().reply_code(), rep::GENERAL_FAILURE);
        assert_eq!(SocksError::Command(9).reply_code(), rep::COMMAND_NOT_SUPPORTED);
        assert_eq!(SocksError::AddressType(7).reply_code(), rep::ADDRESS_TYPE_NOT_SUPPORTED);
    }

    #[test]
    fn udp_headers_round_trip_and_bad_ones_are_refused() {
        let mut out = Vec::new();
        for addr in [
            SocksAddr::Ip("10.0.0.1:53".parse().unwrap()),
            SocksAddr::Ip("[2001:db8::1]:5353".parse().unwrap()),
            SocksAddr::Domain("dns.example".into(), 53),
        ] {
            encode_udp(&addr, b"payload", &mut out);
            assert_eq!(parse_udp(&out), Ok((addr.clone(), &b"payload"[..])));
            // Truncated anywhere inside the header.
            let header = out.len() - b"payload".len();
            for n in 0..header {
                assert!(parse_udp(&out[..n]).is_err(), "{addr} cut at {n}");
            }
            // An empty payload is a datagram too.
            encode_udp(&addr, b"", &mut out);
            assert_eq!(parse_udp(&out), Ok((addr, &b""[..])));
        }
        assert_eq!(parse_udp(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 53]), Err(SocksError::Fragment(1)));
        assert_eq!(parse_udp(&[0, 1, 0, 1, 1, 2, 3, 4, 0, 53]), Err(SocksError::Reserved));
        assert_eq!(parse_udp(&[0, 0, 0, 5, 1, 2, 3, 4, 0, 53]), Err(SocksError::AddressType(5)));
        assert_eq!(parse_udp(&[0, 0]), Err(SocksError::Truncated));
    }

    #[test]
    fn replies_carry_the_bound_address() {
        assert_eq!(
            reply(rep::SUCCEEDED, "127.0.0.1:1080".parse().unwrap()),
            [5, 0, 0, 1, 127, 0, 0, 1, 4, 56]
        );
        let r = reply(rep::NOT_ALLOWED, "[::1]:1".parse().unwrap());
        assert_eq!((r.len(), r[1], r[3]), (22, 2, 4));
    }

    #[test]
    fn refusals_map_to_reply_codes() {
        let refused = |status, text: &str| OpenError::Refused { status, text: text.into() };
        assert_eq!(open_error_code(&refused(403, "403 Forbidden")), rep::NOT_ALLOWED);
        assert_eq!(
            open_error_code(&refused(502, "502 Bad Gateway (Proxy-Status: r; error=connection_refused)")),
            rep::CONNECTION_REFUSED
        );
        assert_eq!(open_error_code(&refused(502, "502 Bad Gateway")), rep::HOST_UNREACHABLE);
        assert_eq!(open_error_code(&OpenError::Other(anyhow::anyhow!("x"))), rep::GENERAL_FAILURE);
    }

    /// Arbitrary bytes never panic any parser (a small deterministic fuzz).
    #[test]
    fn arbitrary_input_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias towards plausible messages so the deeper paths run.
            if let Some(v) = b.first_mut() {
                *v = [0, 5, 5, 5][(next() % 4) as usize];
            }
            if b.len() > 3 {
                b[3] = [1, 3, 4, 0][(next() % 4) as usize];
            }
            let _ = parse_greeting(&b);
            let _ = parse_request(&b);
            let _ = parse_udp(&b);
        }
    }
}

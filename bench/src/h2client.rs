//! An HTTP/2 client for the relay's TCP front (TLS with ALPN `h2`):
//! connect-udp tunnels as DATAGRAM capsules (RFC 8441 extended CONNECT, RFC
//! 9297), with the same windowed, byte-checked echo load as the HTTP/3
//! client ([`crate::load`]), and TCP CONNECT bulk transfers. The `h2` crate on
//! a tokio current-thread runtime with tokio-boring: a client tool, so a
//! runtime is fine here (the relay itself runs none).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use boring::ssl::{SslConnector, SslMethod};
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use hdrhistogram::Histogram;
use relay_proto::capsule::{self, CapsuleDecoder};

use crate::load::{EchoLoad, EchoReport, payload};

/// Where and how to reach the relay over HTTP/2.
#[derive(Debug, Clone)]
pub struct H2Target {
    /// The relay's TLS-over-TCP listener.
    pub relay: SocketAddr,
    /// TLS server name (and `:authority` host).
    pub server_name: String,
    /// CA certificate; `None`: the system's trust store.
    pub ca: Option<std::path::PathBuf>,
    /// Do not verify the relay's certificate at all.
    pub insecure: bool,
    /// Bearer token.
    pub token: Option<String>,
    /// connect-udp URI template.
    pub template: String,
}

type Tls = tokio_boring::SslStream<tokio::net::TcpStream>;

/// TLS to the relay's TCP front with `alpn` (wire format), verified as
/// `t` says.
async fn tls_connect(t: &H2Target, alpn: &[u8]) -> Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(t.relay)
        .await
        .with_context(|| format!("TCP connect to {} (is the relay running?)", t.relay))?;
    tcp.set_nodelay(true)?;
    let mut b = SslConnector::builder(SslMethod::tls())?;
    if let Some(ca) = &t.ca {
        b.set_ca_file(ca).with_context(|| format!("CA {}", ca.display()))?;
    }
    if t.insecure {
        b.set_verify(boring::ssl::SslVerifyMode::NONE);
    }
    b.set_alpn_protos(alpn)?;
    let mut cfg = b.build().configure()?;
    if t.insecure {
        cfg.set_verify_hostname(false);
    }
    tokio_boring::connect(cfg, &t.server_name, tcp)
        .await
        .map_err(|e| anyhow::anyhow!("TLS with {}: {e}", t.relay))
}

/// An HTTP/2 connection to the relay (TLS, ALPN `h2`) once the relay's
/// SETTINGS enabled extended CONNECT.
pub async fn connect(t: &H2Target) -> Result<SendRequest<Bytes>> {
    let tls = tls_connect(t, b"\x02h2").await?;
    if tls.ssl().selected_alpn_protocol() != Some(b"h2") {
        bail!("the relay did not pick h2");
    }
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await?;
    // Extended CONNECT needs the relay's SETTINGS (RFC 8441 section 3).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_extended_connect_protocol_enabled() {
        if Instant::now() > deadline {
            bail!("the relay did not enable extended CONNECT");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        client = client.ready().await?;
    }
    Ok(client)
}

fn auth(t: &H2Target, b: http::request::Builder) -> http::request::Builder {
    match &t.token {
        Some(tok) => b.header("proxy-authorization", format!("Bearer {tok}")),
        None => b,
    }
}

/// Opens a connect-udp tunnel to `host:port` (its payloads travel as
/// DATAGRAM capsules on the stream); a refusal is an error naming the
/// status and the relay's Proxy-Status.
pub async fn open_udp(
    client: &mut SendRequest<Bytes>,
    t: &H2Target,
    host: &str,
    port: u16,
) -> Result<(SendStream<Bytes>, RecvStream)> {
    let template = relay_proto::template::UriTemplate::parse(&t.template)?;
    let path = template.expand(host, port);
    let uri = format!("https://{}:{}{path}", t.server_name, t.relay.port());
    let req = auth(t, http::Request::builder().method("CONNECT").uri(uri))
        .header("capsule-protocol", "?1")
        .extension(h2::ext::Protocol::from_static("connect-udp"))
        .body(())?;
    let (resp, send) = client.send_request(req, false)?;
    let resp = resp.await?;
    check_answer(&resp, "connect-udp over HTTP/2")?;
    Ok((send, resp.into_body()))
}

/// Opens a classic CONNECT tunnel to `authority` (`host:port`): the
/// stream's DATA is the TCP byte stream.
pub async fn open_tcp(
    client: &mut SendRequest<Bytes>,
    t: &H2Target,
    authority: &str,
) -> Result<(SendStream<Bytes>, RecvStream)> {
    let req = auth(t, http::Request::builder().method("CONNECT").uri(authority)).body(())?;
    let (resp, send) = client.send_request(req, false)?;
    let resp = resp.await?;
    check_answer(&resp, "CONNECT over HTTP/2")?;
    Ok((send, resp.into_body()))
}

/// Fails unless `resp` is a 2xx, naming the status and Proxy-Status.
fn check_answer<T>(resp: &http::Response<T>, what: &str) -> Result<()> {
    if resp.status().is_success() {
        return Ok(());
    }
    let proxy_status = resp.headers().get("proxy-status").and_then(|v| v.to_str().ok());
    let status = resp.status().as_u16();
    let text = crate::client::describe_refusal(status, proxy_status);
    Err(crate::client::Refused { what: what.into(), status, text }.into())
}

struct FlowResult {
    sent: u64,
    received: u64,
    corrupt: u64,
    rtt: Histogram<u64>,
}

async fn flow_echo(
    flow: u32,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    load: EchoLoad,
) -> Result<FlowResult> {
    let mut r =
        FlowResult { sent: 0, received: 0, corrupt: 0, rtt: Histogram::new_with_bounds(1, 60_000_000, 3)? };
    let mut sent_at = vec![None::<Instant>; load.count as usize];
    let mut in_flight = 0u64;
    let mut next = 0u64;
    let mut decoder = CapsuleDecoder::new(65_535);
    let (mut buf, mut expected) = (Vec::new(), Vec::new());
    let mut capsules = Vec::new();
    loop {
        // Every capsule the window allows goes out in one send (one DATA
        // frame, or as many as the relay's frame size needs), as a client
        // writes what it has in hand: one TLS record and TCP send for the
        // burst instead of one per capsule.
        while next < load.count && in_flight < load.window {
            payload(flow, next, load.size, &mut buf);
            capsule::encode_datagram(0, &buf, &mut capsules);
            sent_at[next as usize] = Some(Instant::now());
            next += 1;
            in_flight += 1;
            r.sent += 1;
        }
        if !capsules.is_empty() {
            // Handed over, not copied; the next burst gets a buffer of the
            // same size.
            let capacity = capsules.capacity();
            let burst = std::mem::replace(&mut capsules, Vec::with_capacity(capacity));
            send.send_data(Bytes::from(burst), false)?;
        }
        if in_flight == 0 {
            break;
        }
        let chunk = match tokio::time::timeout(load.stall_timeout, recv.data()).await {
            Ok(Some(Ok(c))) => c,
            Ok(Some(Err(e))) => bail!("tunnel stream: {e}"),
            Ok(None) => break,
            Err(_) => break, // stalled: the rest is lost
        };
        let _ = recv.flow_control().release_capacity(chunk.len());
        decoder
            .feed_ref(&chunk, |capsule_type, value| {
                if capsule_type != capsule::DATAGRAM {
                    return;
                }
                let Some(p) = value.strip_prefix(&[0u8]) else { return };
                if p.len() < 16 {
                    r.corrupt += 1;
                    return;
                }
                let seq = u64::from_be_bytes(p[4..12].try_into().unwrap_or_default());
                payload(flow, seq, load.size, &mut expected);
                match sent_at.get_mut(seq as usize).and_then(Option::take) {
                    Some(at) if p == expected.as_slice() => {
                        let _ = r.rtt.record(at.elapsed().as_micros().max(1) as u64);
                        r.received += 1;
                        in_flight -= 1;
                    }
                    _ => r.corrupt += 1,
                }
            })
            .map_err(|e| anyhow::anyhow!("capsules: {e}"))?;
    }
    let _ = send.send_data(Bytes::new(), true);
    Ok(r)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Opens `flows` connect-udp tunnels to `target` on one HTTP/2 connection
/// and runs the echo `load` on each, like [`crate::load::run_echo`].
pub fn udp_echo(t: &H2Target, target: SocketAddr, flows: usize, load: &EchoLoad) -> Result<EchoReport> {
    if load.size < 16 {
        bail!("payload size must be at least 16 bytes");
    }
    runtime()?.block_on(async {
        let mut client = connect(t).await?;
        let mut streams = Vec::new();
        for _ in 0..flows {
            streams.push(open_udp(&mut client, t, &target.ip().to_string(), target.port()).await?);
        }
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (i, (send, recv)) in streams.into_iter().enumerate() {
            tasks.push(tokio::spawn(flow_echo(i as u32, send, recv, load.clone())));
        }
        let mut report = EchoReport {
            sent: 0,
            received: 0,
            lost: 0,
            corrupt: 0,
            duplicates: 0,
            rtt_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            elapsed: Duration::ZERO,
        };
        for task in tasks {
            let r = task.await??;
            report.sent += r.sent;
            report.received += r.received;
            report.corrupt += r.corrupt;
            report.rtt_us.add(&r.rtt)?;
        }
        report.elapsed = start.elapsed();
        report.lost = (flows as u64 * load.count).saturating_sub(report.received);
        Ok(report)
    })
}

/// A TCP CONNECT through the relay over HTTP/2 to an echo server at
/// `target`: sends `bytes` and reads them back; returns the wall time.
pub fn tcp_echo(t: &H2Target, target: SocketAddr, bytes: usize) -> Result<Duration> {
    runtime()?.block_on(async {
        let mut client = connect(t).await?;
        let (mut send, mut recv) = open_tcp(&mut client, t, &target.to_string()).await?;
        let data = Bytes::from(crate::tcp_echo::pattern(bytes));
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            let chunk = 64 * 1024;
            let mut off = 0;
            while off < data.len() {
                let end = (off + chunk).min(data.len());
                send.reserve_capacity(end - off);
                let _ = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                send.send_data(data.slice(off..end), end == data.len())?;
                off = end;
            }
            Ok::<_, h2::Error>(())
        });
        let mut got = 0usize;
        let expected = crate::tcp_echo::pattern(bytes);
        let mut ok = true;
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), recv.data()).await? {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            ok &= expected.get(got..got + chunk.len()) == Some(&chunk[..]);
            got += chunk.len();
        }
        sender.await??;
        if got != bytes || !ok {
            bail!("CONNECT over HTTP/2: {got} of {bytes} bytes back, intact: {ok}");
        }
        Ok(start.elapsed())
    })
}

/// A TCP CONNECT through the relay over HTTP/1.1 (TLS) to an echo server.
pub fn tcp_echo_h1(t: &H2Target, target: SocketAddr, bytes: usize) -> Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    runtime()?.block_on(async {
        let tls = tls_connect(t, b"\x08http/1.1").await?;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let token = t.token.as_deref().unwrap_or("");
        wr.write_all(
            format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            rd.read_exact(&mut byte).await?;
            head.push(byte[0]);
            if head.len() > 16384 {
                bail!("response head too long");
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            bail!("CONNECT over HTTP/1.1 refused: {}", String::from_utf8_lossy(&head));
        }
        let data = crate::tcp_echo::pattern(bytes);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            wr.write_all(&data).await?;
            wr.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let mut back = Vec::with_capacity(bytes);
        tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut back)).await??;
        sender.await??;
        if back != crate::tcp_echo::pattern(bytes) {
            bail!("CONNECT over HTTP/1.1: {} of {bytes} bytes back", back.len());
        }
        Ok(start.elapsed())
    })
}

/// The same transfer on the direct path (no relay), for comparison.
pub fn tcp_echo_direct(target: SocketAddr, bytes: usize) -> Result<Duration> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(target)?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let data = crate::tcp_echo::pattern(bytes);
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&data)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::with_capacity(bytes);
    s.read_to_end(&mut back)?;
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    if back.len() != bytes {
        bail!("direct: {} of {bytes} bytes back", back.len());
    }
    Ok(start.elapsed())
}

/// The relay at `relay` under its default name and template.
pub fn default_target(relay: SocketAddr, ca: &Path, token: Option<String>) -> H2Target {
    H2Target {
        relay,
        server_name: "localhost".into(),
        ca: Some(ca.to_path_buf()),
        insecure: false,
        token,
        template: crate::client::DEFAULT_TEMPLATE.into(),
    }
}

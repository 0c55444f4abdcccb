//! One connection to the relay and the tunnels opened on it, each a pair
//! of bounded channels: what the SOCKS server and the UDP forwarder use,
//! whatever the HTTP version.
//!
//! HTTP/3: the quiche client ([`crate::client::Client`]) runs on its own
//! thread, which takes open requests from a channel and moves each
//! tunnel's bytes between quiche and the tunnel's channels; a socket pair
//! wakes it when the application sends. A connection the relay closed is
//! replaced at the next open. HTTP/2: the h2 client
//! ([`crate::h2client`]), a task per direction of each tunnel, on the
//! caller's tokio runtime.
//!
//! A [`Tunnel`] ends towards the relay when the application drops its
//! sending half (the stream's FIN), and its receiving half ends when the
//! relay ends the stream.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use h2::client::SendRequest;
use relay_proto::capsule::{self, Capsule, CapsuleDecoder};
use tokio::sync::{mpsc, oneshot};

use super::{HostPort, Http, RelaySpec};
use crate::client::Client;
use crate::h2client::{self, H2Target};

/// What a tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UDP payloads (connect-udp, RFC 9298): each message one datagram.
    Udp,
    /// A TCP byte stream (classic CONNECT): messages are chunks.
    Tcp,
}

/// How long the relay has to answer a tunnel request.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnels open on one connection at most.
pub const MAX_TUNNELS: usize = 4096;
/// Messages queued in each direction of a UDP tunnel.
const UDP_QUEUE: usize = 256;
/// Chunks queued in each direction of a TCP tunnel.
const TCP_QUEUE: usize = 8;
/// An idle HTTP/3 connection sends a PING this often (the client's QUIC
/// idle timeout is 30 s).
const KEEPALIVE: Duration = Duration::from_secs(10);

/// The application's sending half of a tunnel.
pub struct TunnelTx {
    tx: mpsc::Sender<Vec<u8>>,
    wake: Option<Arc<UnixDatagram>>,
}

impl TunnelTx {
    fn wake(&self) {
        if let Some(w) = &self.wake {
            // A full socket already holds a wake-up.
            let _ = w.send(&[1]);
        }
    }

    /// Queues a message unless the queue is full (UDP: the datagram is
    /// dropped, as a congested path would). Returns whether it was queued.
    pub fn try_send(&self, data: Vec<u8>) -> bool {
        let ok = self.tx.try_send(data).is_ok();
        self.wake();
        ok
    }

    /// Queues a message, waiting for room (TCP). `false`: the tunnel is gone.
    pub async fn send(&self, data: Vec<u8>) -> bool {
        let ok = self.tx.send(data).await.is_ok();
        self.wake();
        ok
    }
}

impl Drop for TunnelTx {
    fn drop(&mut self) {
        // The backend notices the closed channel at its next turn.
        self.wake();
    }
}

/// An open tunnel.
pub struct Tunnel {
    /// Towards the relay.
    pub tx: TunnelTx,
    /// From the relay; `None` once the relay ended the tunnel.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

impl Tunnel {
    /// Polls for the next message from the relay.
    pub fn poll_recv(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Vec<u8>>> {
        self.rx.poll_recv(cx)
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The relay answered with a refusal.
    #[error("refused: {text}")]
    Refused {
        /// The HTTP status (0 for a reset stream).
        status: u16,
        /// Status, reason and Proxy-Status, as printed.
        text: String,
    },
    /// Anything else (connection, timeout, bad input).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// A connection to the relay that opens tunnels.
pub struct Transport {
    inner: Inner,
}

enum Inner {
    H3 { cmds: std_mpsc::Sender<Cmd>, wake: Arc<UnixDatagram> },
    H2 { target: H2Target, conn: tokio::sync::Mutex<Option<SendRequest<Bytes>>> },
}

struct Cmd {
    kind: Kind,
    target: HostPort,
    reply: oneshot::Sender<Result<Tunnel, OpenError>>,
}

impl Transport {
    /// Connects to the relay (so that a wrong address, certificate or
    /// version shows at once) over the version `spec` names.
    pub async fn connect(spec: &RelaySpec) -> Result<Self> {
        match spec.http {
            Http::H3 => {
                let (wake, wake_rx) = UnixDatagram::pair().context("socket pair")?;
                wake.set_nonblocking(true)?;
                wake_rx.set_nonblocking(true)?;
                let wake = Arc::new(wake);
                let (cmds, cmd_rx) = std_mpsc::channel();
                let (ready_tx, ready_rx) = oneshot::channel();
                let backend = H3Backend {
                    spec: spec.clone(),
                    wake_rx,
                    wake_tx: wake.clone(),
                    tunnels: HashMap::new(),
                    pending: HashMap::new(),
                    oversize_warned: false,
                    last_ping: Instant::now(),
                };
                std::thread::Builder::new()
                    .name("masque-h3".into())
                    .spawn(move || backend.run(cmd_rx, ready_tx))
                    .context("starting the HTTP/3 thread")?;
                ready_rx.await.map_err(|_| anyhow!("the HTTP/3 thread ended"))??;
                Ok(Self { inner: Inner::H3 { cmds, wake } })
            }
            Http::H2 => {
                let target = spec.h2_target();
                let conn = h2client::connect(&target).await?;
                Ok(Self { inner: Inner::H2 { target, conn: tokio::sync::Mutex::new(Some(conn)) } })
            }
        }
    }

    /// Opens a tunnel of `kind` to `target` and waits for the relay's
    /// answer (at most [`OPEN_TIMEOUT`]).
    pub async fn open(&self, kind: Kind, target: &HostPort) -> Result<Tunnel, OpenError> {
        match &self.inner {
            Inner::H3 { cmds, wake } => {
                let (reply, answer) = oneshot::channel();
                cmds.send(Cmd { kind, target: target.clone(), reply })
                    .map_err(|_| anyhow!("the HTTP/3 thread ended"))?;
                let _ = wake.send(&[1]);
                answer.await.map_err(|_| anyhow!("the HTTP/3 thread ended"))?
            }
            Inner::H2 { target: t, conn } => {
                let fut = open_h2(t, conn, kind, target);
                tokio::time::timeout(OPEN_TIMEOUT, fut)
                    .await
                    .map_err(|_| anyhow!("the relay did not answer within {OPEN_TIMEOUT:?}"))?
            }
        }
    }
}

/// A refusal from an h2client error, else any error.
fn h2_open_error(e: anyhow::Error) -> OpenError {
    match e.downcast_ref::<crate::client::Refused>() {
        Some(r) => OpenError::Refused { status: r.status, text: r.text.clone() },
        None => OpenError::Other(e),
    }
}

async fn open_h2(
    t: &H2Target,
    conn: &tokio::sync::Mutex<Option<SendRequest<Bytes>>>,
    kind: Kind,
    target: &HostPort,
) -> Result<Tunnel, OpenError> {
    // The connection, ready for a new stream; a dead one is replaced once.
    let mut client = None;
    for _ in 0..2 {
        let mut guard = conn.lock().await;
        let c = match guard.take() {
            Some(c) => c,
            None => h2client::connect(t).await?,
        };
        match c.clone().ready().await {
            Ok(ready) => {
                *guard = Some(c);
                client = Some(ready);
                break;
            }
            Err(e) => tracing::warn!("the HTTP/2 connection to the relay ended ({e}); reconnecting"),
        }
    }
    let mut client = client.ok_or_else(|| anyhow!("no HTTP/2 connection to the relay"))?;
    let (send, recv) = match kind {
        Kind::Udp => h2client::open_udp(&mut client, t, &target.host, target.port).await,
        Kind::Tcp => h2client::open_tcp(&mut client, t, &target.to_string()).await,
    }
    .map_err(h2_open_error)?;
    let queue = if kind == Kind::Udp { UDP_QUEUE } else { TCP_QUEUE };
    let (up_tx, up_rx) = mpsc::channel(queue);
    let (down_tx, down_rx) = mpsc::channel(queue);
    tokio::spawn(h2_up(kind, send, up_rx));
    tokio::spawn(h2_down(kind, recv, down_tx));
    Ok(Tunnel { tx: TunnelTx { tx: up_tx, wake: None }, rx: down_rx })
}

/// Application → relay on an HTTP/2 stream, within its flow control; FIN
/// when the application is done.
async fn h2_up(kind: Kind, mut send: h2::SendStream<Bytes>, mut up: mpsc::Receiver<Vec<u8>>) {
    let mut framed = Vec::new();
    while let Some(d) = up.recv().await {
        let data = match kind {
            Kind::Udp => {
                framed.clear();
                capsule::encode_datagram(relay_proto::datagram::UDP_PAYLOAD_CONTEXT, &d, &mut framed);
                Bytes::copy_from_slice(&framed)
            }
            Kind::Tcp => Bytes::from(d),
        };
        let mut off = 0;
        while off < data.len() {
            send.reserve_capacity(data.len() - off);
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(cap)) if cap > 0 => cap,
                Some(Ok(_)) => continue,
                _ => return, // the stream is gone
            };
            let end = (off + cap).min(data.len());
            if send.send_data(data.slice(off..end), false).is_err() {
                return;
            }
            off = end;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// Relay → application on an HTTP/2 stream: DATAGRAM capsules (context 0)
/// or raw bytes; flow control credit is returned once the application's
/// queue took the bytes.
async fn h2_down(kind: Kind, mut recv: h2::RecvStream, down: mpsc::Sender<Vec<u8>>) {
    let mut decoder = CapsuleDecoder::new(65_535);
    while let Some(Ok(chunk)) = recv.data().await {
        let n = chunk.len();
        match kind {
            Kind::Tcp => {
                if down.send(chunk.to_vec()).await.is_err() {
                    return;
                }
            }
            Kind::Udp => {
                let mut payloads = Vec::new();
                if decoder.feed(&chunk, |c| payloads.push(c)).is_err() {
                    tracing::warn!("malformed capsules from the relay; tunnel closed");
                    return;
                }
                for c in payloads {
                    if let Capsule::Datagram(v) = c
                        && let Some(p) = v.strip_prefix(&[0u8])
                        && down.try_send(p.to_vec()).is_err()
                        && down.is_closed()
                    {
                        return;
                    }
                }
            }
        }
        let _ = recv.flow_control().release_capacity(n);
    }
}

/// One tunnel on the HTTP/3 thread.
struct H3Tunnel {
    kind: Kind,
    up: mpsc::Receiver<Vec<u8>>,
    /// `None` once the application's receiving half is closed.
    down: Option<mpsc::Sender<Vec<u8>>>,
    /// TCP: a chunk quiche has not taken all of yet.
    up_buf: Vec<u8>,
    up_off: usize,
    /// The application dropped its sending half.
    up_closed: bool,
    /// The FIN is queued (the tunnel's sending side is done).
    fin_sent: bool,
    /// Relay bytes the application's queue had no room for.
    down_pending: Option<Vec<u8>>,
}

struct PendingOpen {
    kind: Kind,
    target: HostPort,
    reply: oneshot::Sender<Result<Tunnel, OpenError>>,
    deadline: Instant,
}

struct H3Backend {
    spec: RelaySpec,
    /// Readable when the application sent something (drained each turn).
    wake_rx: UnixDatagram,
    /// Handed to every tunnel's sending half.
    wake_tx: Arc<UnixDatagram>,
    tunnels: HashMap<u64, H3Tunnel>,
    pending: HashMap<u64, PendingOpen>,
    oversize_warned: bool,
    last_ping: Instant,
}

impl H3Backend {
    fn connect(&self) -> Result<Client> {
        let mut c = Client::connect(self.spec.h3_config(), OPEN_TIMEOUT)?;
        c.wait_settings(OPEN_TIMEOUT)?;
        if !c.extended_connect_enabled() {
            bail!("the relay did not enable extended CONNECT");
        }
        c.watch_fd(std::os::fd::AsRawFd::as_raw_fd(&self.wake_rx))?;
        Ok(c)
    }

    /// The thread: connects, serves open requests and tunnels, reconnects
    /// (at the next open request) when the relay closed the connection;
    /// ends when the [`Transport`] is dropped.
    fn run(mut self, cmds: std_mpsc::Receiver<Cmd>, ready: oneshot::Sender<Result<()>>) {
        let mut client = match self.connect() {
            Ok(c) => {
                let _ = ready.send(Ok(()));
                Some(c)
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        loop {
            let Some(c) = client.as_mut() else {
                // No connection: wait for the next request, then connect.
                let Ok(cmd) = cmds.recv() else { return };
                match self.connect() {
                    Ok(c) => {
                        client = Some(c);
                        if let Some(c) = client.as_mut() {
                            self.open(c, cmd);
                        }
                    }
                    Err(e) => {
                        let _ = cmd.reply.send(Err(OpenError::Other(e.context("reconnecting to the relay"))));
                    }
                }
                continue;
            };
            match self.turn(c, &cmds) {
                Ok(true) => {}
                Ok(false) => {
                    if let Some(c) = client.take() {
                        c.close();
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("the HTTP/3 connection to the relay ended: {e:#}");
                    self.fail_all(&format!("{e:#}"));
                    client = None;
                }
            }
        }
    }

    /// Ends every tunnel and open request (the connection is gone).
    fn fail_all(&mut self, why: &str) {
        self.tunnels.clear();
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(OpenError::Other(anyhow!("connection to the relay lost: {why}"))));
        }
    }

    fn open(&mut self, c: &mut Client, cmd: Cmd) {
        let Cmd { kind, target, reply } = cmd;
        if self.tunnels.len() + self.pending.len() >= MAX_TUNNELS {
            let _ = reply.send(Err(OpenError::Other(anyhow!("{MAX_TUNNELS} tunnels are open already"))));
            return;
        }
        let sent = match kind {
            Kind::Udp => c.request_udp(&target.host, target.port),
            Kind::Tcp => c.request_tcp(&target.to_string()),
        };
        match sent {
            Ok(id) => {
                let deadline = Instant::now() + OPEN_TIMEOUT;
                self.pending.insert(id, PendingOpen { kind, target, reply, deadline });
            }
            Err(e) => {
                let _ = reply.send(Err(OpenError::Other(e)));
            }
        }
    }

    /// One turn; `Ok(false)` when the application is gone, an error when
    /// the connection is.
    fn turn(&mut self, c: &mut Client, cmds: &std_mpsc::Receiver<Cmd>) -> Result<bool> {
        let busy = self.tunnels.values().any(|t| t.down_pending.is_some());
        c.drive(if busy { Duration::from_millis(2) } else { Duration::from_millis(200) })?;
        let mut drain = [0u8; 64];
        while self.wake_rx.recv(&mut drain).is_ok() {}
        loop {
            match cmds.try_recv() {
                Ok(cmd) => self.open(c, cmd),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => return Ok(false),
            }
        }
        self.answers(c);
        let ids: Vec<u64> = self.tunnels.keys().copied().collect();
        for id in ids {
            let Some(t) = self.tunnels.get_mut(&id) else { continue };
            let done = match t.kind {
                Kind::Udp => service_udp(c, id, t, &mut self.oversize_warned),
                Kind::Tcp => service_tcp(c, id, t),
            };
            if done {
                self.tunnels.remove(&id);
                c.forget(id);
            }
        }
        c.flush()?;
        if self.last_ping.elapsed() >= KEEPALIVE {
            c.keepalive()?;
            self.last_ping = Instant::now();
        }
        if let Some(err) = c.closed() {
            bail!("closed (relay error {err:?})");
        }
        Ok(true)
    }

    /// Answers waiting requests: a 2xx becomes a tunnel, anything else (or
    /// no answer in time) an error for the requester.
    fn answers(&mut self, c: &mut Client) {
        let now = Instant::now();
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            let answer = c.answer(id).cloned();
            let expired = self.pending.get(&id).is_some_and(|p| p.deadline <= now);
            if answer.is_none() && !expired {
                continue;
            }
            let Some(p) = self.pending.remove(&id) else { continue };
            let result = match answer {
                Some(a) if a.is_success() => {
                    let queue = if p.kind == Kind::Udp { UDP_QUEUE } else { TCP_QUEUE };
                    let (up_tx, up_rx) = mpsc::channel(queue);
                    let (down_tx, down_rx) = mpsc::channel(queue);
                    self.tunnels.insert(
                        id,
                        H3Tunnel {
                            kind: p.kind,
                            up: up_rx,
                            down: Some(down_tx),
                            up_buf: Vec::new(),
                            up_off: 0,
                            up_closed: false,
                            fin_sent: false,
                            down_pending: None,
                        },
                    );
                    Ok(Tunnel { tx: TunnelTx { tx: up_tx, wake: Some(self.wake_tx.clone()) }, rx: down_rx })
                }
                Some(a) => {
                    c.forget(id);
                    Err(OpenError::Refused { status: a.status().unwrap_or(0), text: a.describe() })
                }
                None => {
                    c.forget(id);
                    Err(OpenError::Other(anyhow!(
                        "no answer from the relay within {OPEN_TIMEOUT:?} for {}",
                        p.target
                    )))
                }
            };
            // A requester that gave up drops the tunnel; its closed
            // channels end it at the next turn.
            let _ = p.reply.send(result);
        }
    }
}

/// Moves one UDP tunnel's datagrams; returns whether it is over.
fn service_udp(c: &mut Client, id: u64, t: &mut H3Tunnel, oversize_warned: &mut bool) -> bool {
    for _ in 0..UDP_QUEUE {
        match t.up.try_recv() {
            Ok(d) => {
                if c.max_datagram_payload(id).is_some_and(|m| d.len() > m) {
                    if !*oversize_warned {
                        tracing::warn!(
                            "a {}-byte datagram does not fit in an HTTP/3 datagram (at most {:?}); dropped",
                            d.len(),
                            c.max_datagram_payload(id)
                        );
                        *oversize_warned = true;
                    }
                    continue;
                }
                // A full QUIC queue drops the datagram, as a congested path would.
                if c.send_datagram(id, &d).is_err() {
                    return true;
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                let _ = c.try_send_stream_bytes(id, &[], true);
                return true;
            }
        }
    }
    for d in c.take_datagrams(id) {
        if let Some(down) = &t.down
            && let Err(mpsc::error::TrySendError::Closed(_)) = down.try_send(d)
        {
            t.down = None;
        }
    }
    if c.stream_finished(id) {
        t.down = None;
    }
    false
}

/// Moves one TCP tunnel's bytes within both sides' flow control; returns
/// whether it is over.
fn service_tcp(c: &mut Client, id: u64, t: &mut H3Tunnel) -> bool {
    // Application → relay.
    for _ in 0..TCP_QUEUE {
        if t.up_off < t.up_buf.len() {
            match c.try_send_stream_bytes(id, &t.up_buf[t.up_off..], false) {
                Ok(Some(n)) => t.up_off += n,
                Ok(None) => break,
                Err(_) => return true, // the relay reset the stream
            }
            if t.up_off < t.up_buf.len() {
                break;
            }
        }
        if t.up_closed {
            if !t.fin_sent {
                match c.try_send_stream_bytes(id, &[], true) {
                    Ok(Some(_)) => t.fin_sent = true,
                    Ok(None) => {}
                    Err(_) => return true,
                }
            }
            break;
        }
        match t.up.try_recv() {
            Ok(d) => {
                t.up_buf = d;
                t.up_off = 0;
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => t.up_closed = true,
        }
    }
    // Relay → application.
    while let Some(down) = &t.down {
        let chunk = match t.down_pending.take() {
            Some(p) => p,
            None => {
                let raw = c.take_raw(id);
                if raw.is_empty() {
                    break;
                }
                raw
            }
        };
        match down.try_send(chunk) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(chunk)) => {
                t.down_pending = Some(chunk);
                break;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => t.down = None,
        }
    }
    if t.down_pending.is_none() && c.stream_finished(id) {
        t.down = None;
    }
    // Over once both sides are: our FIN sent and the relay's side ended
    // (or the application stopped reading it).
    t.down.is_none() && t.fin_sent
}

//! The control process's event loop: dataplane attachment, the asks rings,
//! resolver results and timeouts.
//!
//! One thread, one `mio::Poll`. Every wait is bounded: asks are answered
//! from memory or handed to the resolver pool, whose results come back
//! through a waker. Answers that do not fit a full ring wait in a bounded
//! per-worker backlog.
//!
//! TLS material changes (a certificate reload, a ticket key rotation) are
//! sent to the attached dataplane on the attach socket as
//! [`ControlUpdate`] frames.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use relay_channel::attach::{self as handshake, HandshakeError};
use relay_channel::doorbell::Doorbell;
use relay_channel::ends::ChannelError;
use relay_channel::region::{ControlChannel, Region};
use relay_channel::ring::RingError;
use relay_proto::channel::bootstrap::{self, Bootstrap, ControlUpdate, Hello, TlsMaterial};
use relay_proto::channel::record::{
    AddressAnswer, AddressAsk, AnswerRecord, AskRecord, AuthAnswer, AuthAsk, ChannelRecord, IpAssignment,
    MAX_ADDRESSES_PER_FAMILY, MAX_DETAILS, SignAnswer, SignAsk, SignResult, Transport, TunnelProtocol,
    Verdict,
};
use relay_proto::proxy_status::ProxyError;
use tracing::{debug, error, info, warn};

use crate::auth::Identity;
use crate::credentials::Credentials;
use crate::fleet::codec::TicketKeySet;
use crate::ippool::{AddressPools, Prefix};
use crate::metrics::Histograms;
use crate::policy::{Decision, Policy, Requester, ResolveFailure, UpstreamTarget};
use crate::resolver::{Resolved, Resolver};
use crate::tickets::TicketKeys;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const DATAPLANE: Token = Token(2);
const ASK_BELL_BASE: usize = 16;

/// Answers kept per worker while its ring is full.
const MAX_BACKLOG: usize = 4096;
/// Most live flows control tracks.
pub const MAX_FLOWS: usize = 1_000_000;
/// How long an attaching dataplane has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often idle quota entries are evicted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Settings the server needs beyond the policy.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Socket the dataplane attaches to.
    pub channel_socket: PathBuf,
    /// What the dataplane is told at attach time (workers, listen, TLS…).
    pub bootstrap: Bootstrap,
    /// Resolver threads.
    pub resolver_threads: u32,
    /// Resolver queue bound.
    pub resolver_max_pending: u32,
    /// Resolution timeout.
    pub resolver_timeout: Duration,
    /// (uid, gid) of the dataplane's user, when not control's: the channel
    /// socket is handed to it.
    pub dataplane_owner: Option<(u32, u32)>,
    /// Keyless TLS (the key never leaves control); `false` sends the key.
    pub keyless: bool,
    /// Client certificates (`[auth.mtls]`): the mode and the CAs the
    /// dataplane verifies them against (read at start).
    pub client_auth: relay_proto::channel::bootstrap::ClientAuth,
    /// Session ticket key rotation period; `None`: no session tickets.
    pub ticket_rotation: Option<Duration>,
    /// connect-ip address pools (IPv4, IPv6); both `None` without connect-ip.
    pub ip_pools: (Option<Prefix>, Option<Prefix>),
    /// `[log] log_targets`: one info line per tunnel decision with the
    /// client's address, the target and the identity. Off, no line at the
    /// default level names a client or a target.
    pub log_targets: bool,
}

/// Every tunnel protocol, in the order of [`Shared::tunnels_allowed`].
pub const TUNNEL_PROTOCOLS: [TunnelProtocol; 6] = [
    TunnelProtocol::ConnectUdp,
    TunnelProtocol::ConnectIp,
    TunnelProtocol::ConnectUdpBind,
    TunnelProtocol::ConnectTcp,
    TunnelProtocol::WebSocket,
    TunnelProtocol::WebTransport,
];

/// How `relayctl flows`, the metrics and the logs name a tunnel protocol.
pub fn protocol_name(protocol: TunnelProtocol) -> &'static str {
    match protocol {
        TunnelProtocol::ConnectUdp => "connect-udp",
        TunnelProtocol::ConnectIp => "connect-ip",
        TunnelProtocol::ConnectUdpBind => "bind",
        TunnelProtocol::ConnectTcp => "connect-tcp",
        TunnelProtocol::WebSocket => "websocket",
        TunnelProtocol::WebTransport => "webtransport",
    }
}

/// A live flow as control knows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowInfo {
    /// Control's flow ID.
    pub flow_id: u64,
    /// Worker serving it.
    pub worker: u32,
    /// What kind of flow: `connect-udp`, `connect-ip`, `bind`,
    /// `connect-tcp`, `websocket` or `webtransport` ([`protocol_name`]); `-` when not
    /// known (flows a re-attached dataplane reported).
    pub protocol: &'static str,
    /// The `[[upstreams]]` route of an upstream flow (WebSocket,
    /// WebTransport); `None`
    /// for tunnels, and for flows a re-attached dataplane reported.
    pub route: Option<String>,
    /// Client address.
    pub client: SocketAddr,
    /// Target address (an upstream flow's: its origin's).
    pub target: SocketAddr,
    /// Seconds since the Unix epoch when it was allowed.
    pub started_unix: u64,
    /// Who opened it (`sub:<subject>`, `tok:<fingerprint>`, or `-` when
    /// not known: flows a re-attached dataplane reported).
    pub identity: String,
}

/// How `relayctl conns` names a [`ConnInfo`](relay_proto::channel::record::ConnInfo)'s transport.
fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::H3 => "h3",
        Transport::H2 => "h2",
        Transport::Http1 => "http/1.1",
        Transport::H2c => "h2c",
        Transport::Http1Clear => "http/1.1-cleartext",
        Transport::TcpPending => "tcp",
    }
}

/// A connection as `relayctl conns` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnRow {
    /// Worker serving it.
    pub worker: u32,
    /// "h3" (QUIC), "h2" / "http/1.1" (TLS over TCP), "h2c" /
    /// "http/1.1-cleartext" (the cleartext listener), or "tcp" (version not
    /// chosen yet).
    pub protocol: &'static str,
    /// The worker's serial number for it.
    pub conn_id: u64,
    /// The client's current address.
    pub client: SocketAddr,
    /// Milliseconds since it was accepted.
    pub age_ms: u64,
    /// Handshake complete.
    pub established: bool,
    /// Resumed from a session ticket.
    pub resumed: bool,
    /// TLS material generation it was accepted with.
    pub tls_generation: u32,
    /// Open tunnels.
    pub tunnels: u32,
    /// Smoothed RTT, microseconds.
    pub rtt_us: u64,
    /// QUIC packets sent.
    pub packets_sent: u64,
    /// QUIC packets received.
    pub packets_recv: u64,
    /// QUIC packets lost.
    pub packets_lost: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_recv: u64,
    /// Usable inner MTU of its tunnels (largest datagram payload; 0:
    /// datagrams unavailable).
    pub max_tunnel_payload: u32,
}

/// A connection listing in progress (asked by the admin socket, answered
/// by every worker over the rings).
#[derive(Debug, Clone, Default)]
pub struct ConnListing {
    /// Echoed by the workers.
    pub request_id: u64,
    /// Most connections each worker lists.
    pub limit: u32,
    /// Whether the workers were asked.
    pub sent: bool,
    /// Workers that finished.
    pub workers_done: u32,
    /// Connections the workers have (listed or not).
    pub total: u64,
    /// The connections listed so far.
    pub rows: Vec<ConnRow>,
}

/// State shared with the admin socket thread.
#[derive(Debug, Default)]
pub struct Shared {
    /// The attached dataplane's PID.
    pub dataplane_pid: Option<u32>,
    /// The current region, for counters.
    pub region: Option<Region>,
    /// Live flows.
    pub flows: HashMap<u64, FlowInfo>,
    /// Asks answered, by outcome.
    pub asks_allowed: u64,
    /// Asks denied.
    pub asks_denied: u64,
    /// Flows allowed, by protocol (in [`TUNNEL_PROTOCOLS`] order).
    pub tunnels_allowed: [u64; TUNNEL_PROTOCOLS.len()],
    /// Invalid records received.
    pub channel_errors: u64,
    /// Set by the admin socket: tell every worker to drain.
    pub drain_requested: bool,
    /// Set by the admin socket: (worker, flow) to end.
    pub kill_requests: Vec<(u32, u64)>,
    /// Handshake signatures made for the dataplane (keyless TLS).
    pub signatures: u64,
    /// Signing asks that failed (unsupported scheme, no key).
    pub signatures_failed: u64,
    /// Latency histograms for the metrics endpoint.
    pub histograms: Arc<Histograms>,
    /// Where the metrics endpoint listens, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Set by the admin socket after a certificate reload: send the new
    /// material to the dataplane.
    pub tls_reloaded: bool,
    /// Set by the admin socket: rotate the session ticket keys now.
    pub rotate_tickets_requested: bool,
    /// The connection ID settings in force (the QUIC-LB configuration).
    pub cid_settings: Option<relay_proto::channel::bootstrap::CidSettings>,
    /// Set by the admin socket: a rotated QUIC-LB configuration to send
    /// the dataplane.
    pub cid_update: Option<relay_proto::channel::bootstrap::CidSettings>,
    /// Ticket key rotations done (scheduled or requested).
    pub ticket_rotations: u64,
    /// Fleet mode: the fleet's ticket key generation in force.
    pub ticket_generation: Option<u64>,
    /// TLS updates sent to the dataplane.
    pub tls_updates_sent: u64,
    /// Wakes the server loop (set once it runs).
    pub waker: Option<Arc<Waker>>,
    /// Whether the relay issues session tickets.
    pub tickets_enabled: bool,
    /// The connection listing in progress, if any.
    pub conn_listing: Option<ConnListing>,
    /// The attached dataplane's uid and gid (its channel socket peer's).
    pub dataplane_owner: Option<(u32, u32)>,
    /// The attached dataplane was built with qlog.
    pub dataplane_qlog: bool,
    /// Set by the admin socket: a qlog command to send the dataplane, with
    /// the qlog directory's descriptor for a start.
    pub qlog_command: Option<(relay_proto::channel::bootstrap::QlogCommand, Option<OwnedFd>)>,
    /// The last qlog session number given out.
    pub qlog_session: u64,
}

impl Shared {
    /// Wakes the server loop so it acts on a request at once.
    pub fn wake_server(&self) {
        if let Some(w) = &self.waker {
            let _ = w.wake();
        }
    }
}

struct WorkerEnd {
    chan: ControlChannel,
    ask_bell: Doorbell,
    answer_bell: Doorbell,
    /// Answers waiting for room in the ring, each checked to encode.
    backlog: VecDeque<AnswerRecord>,
}

struct Attached {
    stream: UnixStream,
    workers: Vec<WorkerEnd>,
}

struct PendingResolution {
    worker: u32,
    ask: AuthAsk,
    requester: Requester,
    /// The port to admit the resolved addresses with (an upstream ask's:
    /// its route's origin's).
    port: u16,
    /// An upstream ask (WebSocket, WebTransport): what its allow carries.
    upstream: Option<UpstreamTarget>,
    deadline: Instant,
    received: Instant,
}

/// The control server.
pub struct Server {
    settings: ServerSettings,
    policy: Arc<Mutex<Policy>>,
    last_sweep: Instant,
    credentials: Arc<Credentials>,
    tickets: Option<TicketKeys>,
    /// Fleet mode: the fleet's ticket keys, from the fleet thread.
    fleet_tickets: Option<Receiver<TicketKeySet>>,
    pools: AddressPools,
    shared: Arc<Mutex<Shared>>,
    /// The same histograms as `shared.histograms`, without taking its lock.
    histograms: Arc<Histograms>,
    poll: Poll,
    listener: UnixListener,
    attached: Option<Attached>,
    resolver: Resolver,
    resolved: Receiver<Resolved>,
    pending: HashMap<u64, PendingResolution>,
    next_job: u64,
}

/// The TLS material for `credentials`' current generation: the chain, the
/// key only when keyless TLS is off, the ticket keys, and the client
/// certificate settings.
pub fn tls_material(
    credentials: &Credentials,
    keyless: bool,
    tickets: Option<&TicketKeys>,
    client_auth: &relay_proto::channel::bootstrap::ClientAuth,
) -> TlsMaterial {
    let (generation, cert_chain_pem, key_pem) = credentials.current_pem();
    TlsMaterial {
        generation,
        cert_chain_pem,
        private_key_pem: (!keyless).then_some(key_pem),
        ticket_keys: tickets.map(|t| t.keys().to_vec()).unwrap_or_default(),
        ticket_lifetime_secs: tickets
            .map_or(0, |t| t.ticket_lifetime().as_secs().min(u64::from(u32::MAX)) as u32),
        client_auth: client_auth.clone(),
    }
}

/// Looks up a user by name (or a numeric uid) in the system's user
/// database; returns (uid, primary gid).
pub fn lookup_user(name: &str) -> io::Result<(u32, u32)> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok((uid, uid));
    }
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data; zeroed is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pwd` and the buffer we own (with its
    // exact length) and sets `result` to `&pwd` or null; nothing is kept
    // past the call but the two integers read below.
    let rc = unsafe {
        libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result)
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no user named {name:?}")));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// Binds a Unix socket at `path` with mode 0600, replacing a stale one.
pub fn bind_private_socket(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl Server {
    /// Binds the channel socket and starts the resolver pool. The policy
    /// is shared with the admin socket, which changes tokens, revocations
    /// and quotas at run time.
    pub fn new(
        settings: ServerSettings,
        policy: Arc<Mutex<Policy>>,
        credentials: Arc<Credentials>,
        shared: Arc<Mutex<Shared>>,
    ) -> io::Result<Self> {
        let pools = AddressPools::new(settings.ip_pools.0, settings.ip_pools.1, settings.bootstrap.workers)
            .map_err(io::Error::other)?;
        let tickets = match settings.ticket_rotation {
            Some(period) => Some(TicketKeys::new(period, Instant::now()).map_err(io::Error::other)?),
            None => None,
        };
        let poll = Poll::new()?;
        let listener = bind_private_socket(&settings.channel_socket)?;
        if let Some((uid, gid)) = settings.dataplane_owner {
            // Still 0600: only that user (and root) may attach.
            std::os::unix::fs::chown(&settings.channel_socket, Some(uid), Some(gid))?;
        }
        listener.set_nonblocking(true)?;
        poll.registry().register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let resolver_waker = waker.clone();
        let (resolver, resolved) =
            Resolver::start(settings.resolver_threads, settings.resolver_max_pending, move || {
                let _ = resolver_waker.wake();
            })?;
        let histograms = {
            let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
            s.waker = Some(waker);
            s.tickets_enabled = settings.ticket_rotation.is_some();
            s.histograms.clone()
        };
        Ok(Self {
            settings,
            policy,
            last_sweep: Instant::now(),
            credentials,
            tickets,
            fleet_tickets: None,
            pools,
            shared,
            histograms,
            poll,
            listener,
            attached: None,
            resolver,
            resolved,
            pending: HashMap::new(),
            next_job: 1,
        })
    }

    /// Fleet mode: the ticket keys are the fleet's, rotated by whichever
    /// host holds the lease; each set the fleet thread sends on `keys` (it
    /// wakes this loop) is installed and sent to the dataplane. The local
    /// schedule stands aside; sets already waiting are installed now.
    pub fn with_fleet_tickets(mut self, keys: Receiver<TicketKeySet>) -> Self {
        if let Some(t) = self.tickets.as_mut() {
            t.follow_fleet();
        }
        self.fleet_tickets = Some(keys);
        self.install_fleet_tickets();
        self
    }

    /// Installs the newest set the fleet thread sent, if any; true when
    /// the keys changed.
    fn install_fleet_tickets(&mut self) -> bool {
        let Some(set) = self.fleet_tickets.as_ref().and_then(|rx| rx.try_iter().last()) else {
            return false;
        };
        let Some(t) = self.tickets.as_mut() else { return false };
        t.install(set.keys, Instant::now());
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.ticket_rotations = t.rotations();
        s.ticket_generation = Some(set.generation);
        info!(generation = set.generation, "session ticket keys of the fleet installed");
        true
    }

    /// SIGHUP: re-reads `[auth.mtls] crl_files` (the lists in force stay
    /// when one does not load).
    fn reload_crls(&mut self) {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut policy = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mtls) = policy.mtls_mut() else { return };
        match mtls.reload_crls(now as i64) {
            Ok(s) => info!(
                lists = s.lists,
                revoked = s.revoked,
                stale = s.stale,
                "SIGHUP: revocation lists reloaded"
            ),
            Err(e) => error!("SIGHUP: revocation lists not reloaded, the previous ones stay: {e}"),
        }
    }

    /// The TLS material to serve now: the current certificate generation
    /// and the ticket keys.
    pub fn tls_material(&self) -> TlsMaterial {
        tls_material(
            &self.credentials,
            self.settings.keyless,
            self.tickets.as_ref(),
            &self.settings.client_auth,
        )
    }

    /// Runs until `stop` returns true (checked at least every second).
    /// `take_reload` returning true (SIGHUP) reloads the certificate and
    /// key from their files.
    pub fn run(&mut self, stop: impl Fn() -> bool, take_reload: impl Fn() -> bool) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !stop() {
            let timeout = self
                .pending
                .values()
                .map(|p| p.deadline.saturating_duration_since(Instant::now()))
                .chain(
                    self.tickets
                        .as_ref()
                        .and_then(TicketKeys::next_rotation)
                        .map(|at| at.saturating_duration_since(Instant::now())),
                )
                .min()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_dataplanes(),
                    DATAPLANE => self.check_dataplane_alive(),
                    WAKER => {}
                    Token(t) if t >= ASK_BELL_BASE => {
                        if let Some(w) = self.attached.as_ref().and_then(|a| a.workers.get(t - ASK_BELL_BASE))
                        {
                            w.ask_bell.drain();
                        }
                    }
                    _ => {}
                }
            }
            if take_reload() {
                self.reload_crls();
                match self.credentials.reload() {
                    Ok(info) => {
                        info!(generation = info.generation, subject = %info.subject, not_after = %info.not_after, "SIGHUP: certificate reloaded");
                        self.push_tls();
                    }
                    Err(e) => {
                        error!("SIGHUP: certificate reload failed, still serving the previous one: {e}")
                    }
                }
            }
            self.tls_housekeeping();
            self.push_cids();
            self.push_qlog();
            // Always sweep: cheap, and robust against missed wake-ups.
            self.forward_drain_request();
            self.forward_conn_listing();
            self.drain_asks();
            self.drain_resolved();
            self.expire_resolutions();
            self.flush_backlogs();
            if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                self.last_sweep = Instant::now();
                self.policy().sweep(self.last_sweep);
            }
        }
        Ok(())
    }

    fn accept_dataplanes(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.attached.is_some() {
                        warn!("a second dataplane tried to attach; refused (one dataplane per control)");
                        continue;
                    }
                    if let Err(e) = self.attach(stream) {
                        warn!("dataplane attach failed: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    error!("accept on channel socket: {e}");
                    return;
                }
            }
        }
    }

    fn attach(&mut self, stream: UnixStream) -> Result<(), Box<dyn std::error::Error>> {
        stream.set_nonblocking(false)?;
        // One deadline for the whole frame: a peer trickling bytes cannot
        // hold this loop longer. Descriptors sent with a hello are closed.
        let (hello, _fds): (Hello, Vec<OwnedFd>) =
            handshake::recv_before(&stream, Instant::now() + HELLO_TIMEOUT)?;
        bootstrap::check_version(hello.version)?;
        let workers = self.settings.bootstrap.workers;
        let (region, memfd) = Region::create(workers)?;
        let mut ends = Vec::new();
        let mut fds: Vec<OwnedFd> = vec![memfd];
        for w in 0..workers {
            let ask_bell = Doorbell::new()?;
            let answer_bell = Doorbell::new()?;
            fds.push(ask_bell.try_clone_fd()?);
            fds.push(answer_bell.try_clone_fd()?);
            ends.push(WorkerEnd {
                chan: region.control_side(w),
                ask_bell,
                answer_bell,
                backlog: VecDeque::new(),
            });
        }
        let fd_refs: Vec<&dyn AsRawFd> = fds.iter().map(|f| f as &dyn AsRawFd).collect();
        let mut boot = self.settings.bootstrap.clone();
        boot.tls = self.tls_material();
        handshake::send(&stream, &boot, &fd_refs)?;
        stream.set_nonblocking(true)?;
        let registry = self.poll.registry();
        registry.register(&mut SourceFd(&stream.as_raw_fd()), DATAPLANE, Interest::READABLE)?;
        for (i, w) in ends.iter().enumerate() {
            registry.register(
                &mut SourceFd(&w.ask_bell.as_raw_fd()),
                Token(ASK_BELL_BASE + i),
                Interest::READABLE,
            )?;
        }
        // Who the dataplane runs as: the qlog directory is handed to it.
        let owner = crate::admin::peer_cred(&stream).ok().map(|c| (c.uid, c.gid));
        {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.dataplane_pid = Some(hello.pid);
            shared.dataplane_owner = owner;
            shared.dataplane_qlog = hello.qlog;
            shared.region = Some(region);
            shared.flows.clear();
        }
        info!(pid = hello.pid, workers, "dataplane attached");
        self.attached = Some(Attached { stream, workers: ends });
        Ok(())
    }

    /// Rotates the ticket keys when due or asked, and sends the dataplane
    /// whatever changed.
    fn tls_housekeeping(&mut self) {
        let (reloaded, rotate_now) = {
            let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut s.tls_reloaded), std::mem::take(&mut s.rotate_tickets_requested))
        };
        let now = Instant::now();
        let mut rotated = self.install_fleet_tickets();
        if let Some(t) = self.tickets.as_mut()
            && ((rotate_now && self.fleet_tickets.is_none()) || t.due(now))
        {
            match t.rotate(now) {
                Ok(()) => {
                    rotated = true;
                    self.shared.lock().unwrap_or_else(|p| p.into_inner()).ticket_rotations = t.rotations();
                    info!(rotations = t.rotations(), "session ticket keys rotated");
                }
                Err(e) => error!("session ticket key rotation failed: {e}"),
            }
        }
        if reloaded || rotated {
            self.push_tls();
        }
    }

    /// Sends a rotated QUIC-LB configuration to the dataplane; a dataplane
    /// that attaches later starts with it.
    fn push_cids(&mut self) {
        let Some(update) = self.shared.lock().unwrap_or_else(|p| p.into_inner()).cid_update.take() else {
            return;
        };
        let b = &mut self.settings.bootstrap;
        b.cid_config_id = update.config_id;
        b.cid_server_id = update.host_id.clone();
        b.cid_nonce_len = update.random_len;
        b.cid_key = update.key;
        let Some(a) = &self.attached else { return };
        let sent = a
            .stream
            .set_nonblocking(false)
            .and_then(|()| a.stream.set_write_timeout(Some(Duration::from_secs(2))))
            .map_err(HandshakeError::Io)
            .and_then(|()| handshake::send(&a.stream, &ControlUpdate::Cids(update), &[]))
            .and_then(|()| a.stream.set_nonblocking(true).map_err(HandshakeError::Io));
        if let Err(e) = sent {
            self.detach(&format!("sending the connection ID configuration: {e}"));
        }
    }

    /// Sends a qlog command of the admin socket's to the dataplane (with
    /// the directory's descriptor for a start). Without a dataplane it is
    /// dropped: the admin socket then sees no worker apply it.
    fn push_qlog(&mut self) {
        let Some((command, fd)) = self.shared.lock().unwrap_or_else(|p| p.into_inner()).qlog_command.take()
        else {
            return;
        };
        let Some(a) = &self.attached else { return };
        let fds: Vec<&dyn AsRawFd> = fd.iter().map(|f| f as &dyn AsRawFd).collect();
        let sent = a
            .stream
            .set_nonblocking(false)
            .and_then(|()| a.stream.set_write_timeout(Some(Duration::from_secs(2))))
            .map_err(HandshakeError::Io)
            .and_then(|()| handshake::send(&a.stream, &ControlUpdate::Qlog(command), &fds))
            .and_then(|()| a.stream.set_nonblocking(true).map_err(HandshakeError::Io));
        if let Err(e) = sent {
            self.detach(&format!("sending a qlog command: {e}"));
        }
    }

    /// Sends the current TLS material to the attached dataplane.
    fn push_tls(&mut self) {
        let material = self.tls_material();
        let Some(a) = &self.attached else { return };
        let sent = a
            .stream
            .set_nonblocking(false)
            .and_then(|()| a.stream.set_write_timeout(Some(Duration::from_secs(2))))
            .map_err(HandshakeError::Io)
            .and_then(|()| handshake::send(&a.stream, &ControlUpdate::Tls(material), &[]))
            .and_then(|()| a.stream.set_nonblocking(true).map_err(HandshakeError::Io));
        match sent {
            Ok(()) => self.shared.lock().unwrap_or_else(|p| p.into_inner()).tls_updates_sent += 1,
            Err(e) => self.detach(&format!("sending TLS material: {e}")),
        }
    }

    /// Asks every worker for its connections when the admin socket wants
    /// a listing.
    fn forward_conn_listing(&mut self) {
        let ask = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            match shared.conn_listing.as_mut().filter(|l| !l.sent) {
                Some(l) => {
                    l.sent = true;
                    AnswerRecord::ListConns { request_id: l.request_id, limit: l.limit }
                }
                None => return,
            }
        };
        if let Err(e) = ask.check() {
            error!("cannot encode a connection listing request: {e}");
            return;
        }
        let Some(a) = &mut self.attached else { return };
        for end in a.workers.iter_mut() {
            if end.backlog.len() < MAX_BACKLOG {
                end.backlog.push_back(ask.clone());
            }
        }
        self.flush_backlogs();
    }

    fn forward_drain_request(&mut self) {
        let kills = std::mem::take(&mut self.shared.lock().unwrap_or_else(|p| p.into_inner()).kill_requests);
        if let Some(a) = &mut self.attached {
            for (worker, flow_id) in kills {
                if let Some(end) = a.workers.get_mut(worker as usize) {
                    end.backlog.push_back(AnswerRecord::KillFlow { flow_id });
                }
            }
            self.flush_backlogs();
        }
        let requested =
            std::mem::take(&mut self.shared.lock().unwrap_or_else(|p| p.into_inner()).drain_requested);
        if !requested {
            return;
        }
        let Some(a) = &mut self.attached else { return };
        for end in a.workers.iter_mut() {
            end.backlog.push_back(AnswerRecord::Drain);
        }
        info!("drain requested by the admin socket; told every worker");
        self.flush_backlogs();
    }

    fn check_dataplane_alive(&mut self) {
        let Some(a) = &self.attached else { return };
        let mut buf = [0u8; 64];
        loop {
            match (&a.stream).read(&mut buf) {
                Ok(0) => return self.detach("dataplane closed the channel"),
                // Nothing is expected after attach: a dataplane that writes
                // is misbehaving, and reading on would let it keep this
                // loop busy.
                Ok(_) => return self.detach("dataplane sent bytes on the channel socket after attaching"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.detach(&format!("channel socket error: {e}")),
            }
        }
    }

    fn detach(&mut self, why: &str) {
        let Some(a) = self.attached.take() else { return };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&a.stream.as_raw_fd()));
        for w in &a.workers {
            let _ = registry.deregister(&mut SourceFd(&w.ask_bell.as_raw_fd()));
        }
        self.pending.clear();
        self.policy().release_all_flows();
        self.pools.release_all();
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let released = shared.flows.len();
        shared.flows.clear();
        shared.dataplane_pid = None;
        shared.dataplane_owner = None;
        shared.region = None;
        warn!(released_flows = released, "dataplane detached: {why}; waiting for it to return");
    }

    fn drain_asks(&mut self) {
        let Some(a) = &mut self.attached else { return };
        let a_workers = a.workers.len();
        let mut asks = Vec::new();
        let mut corrupt = None;
        for (w, end) in a.workers.iter_mut().enumerate() {
            // Bounded per sweep so one worker cannot starve the others.
            for _ in 0..1024 {
                match end.chan.rx.pop() {
                    Ok(Some(r)) => asks.push((w as u32, r)),
                    Ok(None) => break,
                    // Invalid, torn or an answer kind: counted, skipped.
                    Err(ChannelError::Record(e)) => {
                        warn!(worker = w, "invalid record from dataplane: {e}");
                        self.shared.lock().unwrap_or_else(|p| p.into_inner()).channel_errors += 1;
                    }
                    Err(ChannelError::Ring(_)) => {
                        corrupt = Some(w);
                        break;
                    }
                }
            }
        }
        if let Some(w) = corrupt {
            return self.detach(&format!("worker {w} asks ring is corrupt"));
        }
        for (worker, record) in asks {
            match record {
                AskRecord::AuthAsk(ask) => self.on_ask(worker, ask),
                AskRecord::SignAsk(ask) => self.on_sign_ask(worker, ask),
                AskRecord::AddressAsk(ask) => self.on_address_ask(worker, ask),
                AskRecord::FlowClosed(closed) => {
                    let bytes = closed.bytes_up.saturating_add(closed.bytes_down);
                    self.policy().flow_closed(closed.flow_id, bytes, Instant::now());
                    self.pools.release(closed.flow_id);
                    let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                    if shared.flows.remove(&closed.flow_id).is_some() {
                        debug!(
                            flow = closed.flow_id,
                            up = closed.bytes_up,
                            down = closed.bytes_down,
                            "flow closed"
                        );
                    }
                }
                AskRecord::FlowOpen(open) => {
                    // A dataplane that outlived a previous control reports its
                    // live flows after attaching, each with the identity the
                    // allowing control gave it: they count against that
                    // identity's and their client's quotas again.
                    let identity = (!open.identity.is_empty()).then_some(open.identity.as_str());
                    self.policy().flow_reopened(open.flow_id, open.client.ip(), identity, Instant::now());
                    // A connect-ip flow keeps its addresses: lease them again.
                    for a in &open.addresses {
                        if let Err(e) = self.pools.claim(open.flow_id, worker, a.addr) {
                            warn!(
                                flow = open.flow_id,
                                "a reported connect-ip address could not be leased again: {e}"
                            );
                        }
                    }
                    let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                    if shared.flows.len() < MAX_FLOWS {
                        let started_unix = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        shared.flows.entry(open.flow_id).or_insert(FlowInfo {
                            flow_id: open.flow_id,
                            worker,
                            protocol: protocol_name(open.protocol),
                            route: (!open.route.is_empty()).then(|| open.route.clone()),
                            client: open.client,
                            target: open.target,
                            started_unix,
                            identity: identity.map_or_else(|| Identity::Unknown.to_string(), str::to_string),
                        });
                    }
                }
                AskRecord::ConnInfo(c) => {
                    let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(l) = shared.conn_listing.as_mut().filter(|l| l.request_id == c.request_id)
                        && l.rows.len() < (l.limit as usize).saturating_mul(a_workers)
                    {
                        l.rows.push(ConnRow {
                            worker,
                            protocol: transport_name(c.transport),
                            conn_id: c.conn_id,
                            client: c.client,
                            age_ms: c.age_ms,
                            established: c.established,
                            resumed: c.resumed,
                            tls_generation: c.tls_generation,
                            tunnels: c.tunnels,
                            rtt_us: c.rtt_us,
                            packets_sent: c.packets_sent,
                            packets_recv: c.packets_recv,
                            packets_lost: c.packets_lost,
                            bytes_sent: c.bytes_sent,
                            bytes_recv: c.bytes_recv,
                            max_tunnel_payload: c.max_tunnel_payload,
                        });
                    }
                }
                AskRecord::ConnListEnd { request_id, total } => {
                    let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(l) = shared.conn_listing.as_mut().filter(|l| l.request_id == request_id) {
                        l.workers_done += 1;
                        l.total += u64::from(total);
                    }
                }
            }
        }
    }

    /// The policy, shared with the admin socket (never held across a
    /// lock of `shared`).
    fn policy(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_ask(&mut self, worker: u32, ask: AuthAsk) {
        let received = Instant::now();
        let now_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (decision, identity) = self.policy().decide(&ask, received, now_unix);
        match decision {
            Decision::Answer(verdict) => {
                self.answer(worker, &ask, &identity, verdict);
                self.observe_decision(received);
            }
            Decision::Resolve { name, port, requester, upstream } => {
                let id = self.next_job;
                self.next_job += 1;
                match self.resolver.submit(id, name) {
                    Ok(()) => {
                        let deadline = Instant::now() + self.settings.resolver_timeout;
                        self.pending.insert(
                            id,
                            PendingResolution { worker, ask, requester, port, upstream, deadline, received },
                        );
                    }
                    Err(failure) => {
                        let verdict = self.after_resolution(
                            &requester,
                            port,
                            upstream.as_ref(),
                            Err(failure),
                            Instant::now(),
                        );
                        self.answer(worker, &ask, &requester.identity, verdict);
                        self.observe_decision(received);
                    }
                }
            }
        }
    }

    /// The policy's verdict once a name resolved (or failed to): a
    /// tunnel's, or with `upstream` an upstream route's.
    fn after_resolution(
        &self,
        requester: &Requester,
        port: u16,
        upstream: Option<&UpstreamTarget>,
        result: Result<Vec<std::net::IpAddr>, ResolveFailure>,
        now: Instant,
    ) -> Verdict {
        let mut policy = self.policy();
        match upstream {
            Some(u) => policy.after_upstream_resolution(requester, port, u, result, now),
            None => policy.after_resolution(requester, port, result, now),
        }
    }

    /// Records how long an authorization decision took (metrics).
    fn observe_decision(&self, received: Instant) {
        self.histograms.auth_decision.observe(received.elapsed());
    }

    fn drain_resolved(&mut self) {
        while let Ok(done) = self.resolved.try_recv() {
            // A missing entry timed out already and was answered.
            if let Some(p) = self.pending.remove(&done.id) {
                let verdict = self.after_resolution(
                    &p.requester,
                    p.port,
                    p.upstream.as_ref(),
                    done.result,
                    Instant::now(),
                );
                self.answer(p.worker, &p.ask, &p.requester.identity, verdict);
                self.observe_decision(p.received);
            }
        }
    }

    fn expire_resolutions(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let verdict = self.after_resolution(
                    &p.requester,
                    p.port,
                    p.upstream.as_ref(),
                    Err(ResolveFailure::Timeout),
                    now,
                );
                self.answer(p.worker, &p.ask, &p.requester.identity, verdict);
                self.observe_decision(p.received);
            }
        }
    }

    fn answer(&mut self, worker: u32, ask: &AuthAsk, identity: &Identity, mut verdict: Verdict) {
        let mut unused_allow = None;
        // connect-ip: the addresses come from this worker's pool subnets.
        if let Verdict::AllowIp { flow_id, addresses, .. } = &mut verdict {
            match self.pools.assign(*flow_id, worker) {
                Ok(assigned) => {
                    addresses.extend(
                        assigned
                            .into_iter()
                            .map(|addr| IpAssignment { addr, len: if addr.is_ipv4() { 32 } else { 128 } }),
                    );
                }
                Err(e) => {
                    warn!(flow = *flow_id, worker, "connect-ip refused: {e}");
                    unused_allow = Some(*flow_id);
                    verdict = Verdict::Deny {
                        status: 503,
                        proxy_error: Some(ProxyError::ProxyInternalError),
                        details: "address pool exhausted".into(),
                        retry_after_secs: 0,
                    };
                }
            }
        }
        {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            let allowed = match &verdict {
                Verdict::Allow { flow_id, target, .. } => Some((*flow_id, *target, None)),
                Verdict::AllowUpstream { flow_id, target, route, .. } => {
                    Some((*flow_id, *target, Some(route.clone())))
                }
                // An IP or bound flow has no single target: shown as the
                // unspecified address.
                Verdict::AllowIp { flow_id, .. } | Verdict::AllowBind { flow_id, .. } => {
                    Some((*flow_id, SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0), None))
                }
                Verdict::Deny { .. } | Verdict::Authenticate { .. } => None,
            };
            if let Some((flow_id, target, route)) = allowed {
                let (flow_id, target) = (&flow_id, &target);
                if shared.flows.len() >= MAX_FLOWS {
                    unused_allow = Some(*flow_id);
                    verdict = Verdict::Deny {
                        status: 503,
                        proxy_error: Some(ProxyError::ProxyInternalError),
                        details: "flow table full".into(),
                        retry_after_secs: 0,
                    };
                    shared.asks_denied += 1;
                } else {
                    let started_unix =
                        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    shared.flows.insert(
                        *flow_id,
                        FlowInfo {
                            flow_id: *flow_id,
                            worker,
                            protocol: protocol_name(ask.protocol),
                            route,
                            client: ask.client,
                            target: *target,
                            started_unix,
                            identity: identity.to_string(),
                        },
                    );
                    shared.asks_allowed += 1;
                    if let Some(i) = TUNNEL_PROTOCOLS.iter().position(|p| *p == ask.protocol) {
                        shared.tunnels_allowed[i] += 1;
                    }
                }
            } else {
                shared.asks_denied += 1;
            }
        }
        if let Some(flow_id) = unused_allow {
            // The quota admitted it; give the admission back.
            self.policy().flow_closed(flow_id, 0, Instant::now());
            self.pools.release(flow_id);
        }
        if let Verdict::Deny { status, details, .. } = &verdict {
            debug!(worker, ask = ask.ask_id, status, details = details.as_str(), "ask denied");
        }
        if self.settings.log_targets {
            log_tunnel(worker, ask, identity, &verdict);
        }
        if let Verdict::Authenticate { details, .. } = &verdict {
            debug!(ask = ask.ask_id, status = 407, details = details.as_str(), "ask denied");
        }
        let allowed = match &verdict {
            Verdict::Allow { flow_id, .. }
            | Verdict::AllowIp { flow_id, .. }
            | Verdict::AllowBind { flow_id, .. }
            | Verdict::AllowUpstream { flow_id, .. } => Some(*flow_id),
            Verdict::Deny { .. } | Verdict::Authenticate { .. } => None,
        };
        let sent =
            self.send_to_worker(worker, AnswerRecord::AuthAnswer(AuthAnswer { ask_id: ask.ask_id, verdict }));
        if !sent && let Some(flow_id) = allowed {
            // The dataplane will never hear of this flow: release what the
            // allow took (quota admission, addresses, the flow entry).
            self.policy().flow_closed(flow_id, 0, Instant::now());
            self.pools.release(flow_id);
            self.shared.lock().unwrap_or_else(|p| p.into_inner()).flows.remove(&flow_id);
        }
    }

    /// Keyless TLS: signs a handshake for a worker with the key only control
    /// holds, and answers at once.
    fn on_sign_ask(&mut self, worker: u32, ask: SignAsk) {
        let started = Instant::now();
        let signed = self.credentials.sign(ask.generation, ask.algorithm, &ask.input);
        self.histograms.signing.observe(started.elapsed());
        let result = match signed {
            Ok(signature) => SignResult::Signature(signature),
            Err(e) => {
                warn!(worker, scheme = ask.algorithm, "cannot sign for the dataplane: {e}");
                SignResult::Failed(e.to_string().chars().take(MAX_DETAILS).collect())
            }
        };
        {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                SignResult::Signature(_) => shared.signatures += 1,
                SignResult::Failed(_) => shared.signatures_failed += 1,
            }
        }
        // A dropped answer fails the handshake by the dataplane's timeout.
        let _ = self
            .send_to_worker(worker, AnswerRecord::SignAnswer(SignAnswer { sign_id: ask.sign_id, result }));
    }

    /// connect-ip: a client asked for a specific address (RFC 9484 section
    /// 4.7.2). It is leased to the flow when the flow is a live connect-ip
    /// flow of that worker, holds fewer than
    /// [`MAX_ADDRESSES_PER_FAMILY`] addresses of the family, and the
    /// address is free in the worker's share of the pool (which is what
    /// the kernel routes to that worker's TUN device); otherwise refused.
    fn on_address_ask(&mut self, worker: u32, ask: AddressAsk) {
        let live = {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.flows.get(&ask.flow_id).is_some_and(|f| f.worker == worker)
        };
        let held = self.pools.leased_to(ask.flow_id);
        let of_family = held.iter().filter(|a| a.is_ipv4() == ask.addr.is_ipv4()).count();
        let granted = if !live || held.is_empty() {
            debug!(flow = ask.flow_id, "address request for a flow that is not a live connect-ip flow");
            false
        } else if held.contains(&ask.addr) {
            true
        } else if of_family >= MAX_ADDRESSES_PER_FAMILY {
            false
        } else {
            match self.pools.claim(ask.flow_id, worker, ask.addr) {
                Ok(()) => true,
                Err(e) => {
                    debug!(flow = ask.flow_id, "address request refused: {e}");
                    false
                }
            }
        };
        let answer =
            AddressAnswer { flow_id: ask.flow_id, request_id: ask.request_id, addr: ask.addr, granted };
        if !self.send_to_worker(worker, AnswerRecord::AddressAnswer(answer))
            && granted
            && !held.contains(&ask.addr)
        {
            // The client never hears of it: give it back.
            self.pools.release_one(ask.flow_id, ask.addr);
        }
    }

    /// Queues a record for a worker (in order, behind its backlog);
    /// false when it could not be queued.
    fn send_to_worker(&mut self, worker: u32, record: AnswerRecord) -> bool {
        if let Err(e) = record.check() {
            error!("cannot encode a record for worker {worker}: {e}");
            return false;
        }
        let Some(a) = &mut self.attached else { return false };
        let Some(end) = a.workers.get_mut(worker as usize) else { return false };
        if end.backlog.len() >= MAX_BACKLOG {
            warn!(worker, "answer backlog full; the dataplane will time the ask out");
            return false;
        }
        end.backlog.push_back(record);
        self.flush_backlogs();
        true
    }

    fn flush_backlogs(&mut self) {
        let Some(a) = &mut self.attached else { return };
        let mut corrupt = None;
        for (w, end) in a.workers.iter_mut().enumerate() {
            let mut pushed = false;
            while let Some(front) = end.backlog.front() {
                match end.chan.tx.push(front) {
                    Ok(()) => {
                        end.backlog.pop_front();
                        pushed = true;
                    }
                    Err(ChannelError::Record(e)) => {
                        // Checked when queued; dropped all the same.
                        error!(worker = w, "cannot encode an answer: {e}");
                        end.backlog.pop_front();
                    }
                    Err(ChannelError::Ring(RingError::Full)) => break,
                    Err(ChannelError::Ring(RingError::Corrupt)) => {
                        corrupt = Some(w);
                        break;
                    }
                }
            }
            if pushed && let Err(e) = end.answer_bell.ring() {
                warn!(worker = w, "ringing the answer doorbell: {e}");
            }
        }
        if let Some(w) = corrupt {
            self.detach(&format!("worker {w} answers ring is corrupt"));
        }
    }
}

/// The access log line of one tunnel decision (`[log] log_targets = true`):
/// the IDs `relayctl flows` shows (flow, worker), the protocol, the client's
/// address, the target as asked (`destination`; `target` is taken by the
/// module's name in JSON lines; a WebSocket or WebTransport ask's is the
/// request's authority) and as resolved, the route of an upstream flow,
/// and the identity. A WebSocket or WebTransport request's path is not
/// logged (queries may hold secrets).
fn log_tunnel(worker: u32, ask: &AuthAsk, identity: &Identity, verdict: &Verdict) {
    let protocol = ask.protocol;
    let destination = match ask.protocol {
        TunnelProtocol::WebSocket | TunnelProtocol::WebTransport => format!("{:?}", ask.authority),
        _ => format!("{}:{}", ask.target_host, ask.target_port),
    };
    match verdict {
        Verdict::Allow { flow_id, target: resolved, .. } => info!(
            flow = flow_id, worker, ?protocol, client = %ask.client, %destination, %resolved, %identity,
            "tunnel allowed"
        ),
        Verdict::AllowUpstream { flow_id, target: resolved, route, .. } => info!(
            flow = flow_id, worker, ?protocol, client = %ask.client, %destination, %resolved,
            route = route.as_str(), %identity, "tunnel allowed"
        ),
        Verdict::AllowIp { flow_id, .. } | Verdict::AllowBind { flow_id, .. } => info!(
            flow = flow_id, worker, ?protocol, client = %ask.client, %destination, %identity,
            "tunnel allowed"
        ),
        Verdict::Deny { status, details, .. } => info!(
            worker, ?protocol, client = %ask.client, %destination, %identity, status, details = details.as_str(),
            "tunnel refused"
        ),
        Verdict::Authenticate { details, .. } => info!(
            worker, ?protocol, client = %ask.client, %destination, %identity, status = 407u16,
            details = details.as_str(), "tunnel refused: credentials asked for"
        ),
    }
}

//! `relay-dataplane`: the MASQUE relay's forwarding process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use clap::Parser;
use relay_channel::attach::{self as handshake, HandshakeError};
use relay_dataplane::attach::attach;
use relay_dataplane::cids::CidShared;
use relay_dataplane::context::Settings;
use relay_dataplane::handoff::Inbox;
use relay_dataplane::io::BackendKind;
use relay_dataplane::io::epoll::EpollBackend;
use relay_dataplane::io::uring::{UringBackend, UringSettings, WaitBatching};
use relay_dataplane::link::ControlLink;
use relay_dataplane::qlog::QlogShared;
use relay_dataplane::retry::RetryTokens;
use relay_dataplane::tls::{TlsChange, TlsShared};
use relay_dataplane::tun::TunDevice;
use relay_dataplane::worker::{Flags, Worker};
use relay_dataplane::{cpu, socket};
use relay_proto::channel::bootstrap::{Bootstrap, ControlUpdate, IoBackend};
use relay_proto::cid::CidConfigs;
use relay_proto::template::UriTemplate;
use tracing::{error, info, warn};

// The log set-up relay-control uses too (this binary does not link control).
#[path = "../../control/src/logging.rs"]
mod logging;

/// The MASQUE relay's dataplane: attaches to relay-control, then serves
/// QUIC + HTTP/3 (and HTTP/2 and HTTP/1.1 over TCP) and forwards
/// connect-udp, connect-ip, bound UDP and classic CONNECT tunnels.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Control's channel socket.
    #[arg(long, default_value = "state/channel.sock")]
    control_socket: PathBuf,
    /// How long to wait for control's socket to appear, in seconds.
    #[arg(long, default_value_t = 30)]
    attach_timeout: u64,
    /// Log lines as "text" (coloured only on a terminal without NO_COLOR)
    /// or "json" (one object per line).
    #[arg(long, value_enum, env = "RELAY_LOG_FORMAT", default_value = "text")]
    log_format: logging::LogFormat,
}

static STOP: AtomicBool = AtomicBool::new(false);
static DRAIN: AtomicBool = AtomicBool::new(false);

/// SIGTERM drains gracefully (a second SIGTERM stops at once); SIGINT stops.
extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGTERM && !DRAIN.load(Ordering::Relaxed) {
        DRAIN.store(true, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

/// Raises the open-file limit: every tunnel holds a socket. With
/// CAP_SYS_RESOURCE (root) up to the kernel's `fs.nr_open`, otherwise up to
/// the hard limit. Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let want = libc::rlimit { rlim_cur: nr_open.max(lim.rlim_max), rlim_max: nr_open.max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return want.rlim_cur;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// Watches the control socket: applies the updates control sends on it
/// (reloaded certificates, rotated ticket keys, connection ID
/// configurations, qlog commands); when control goes away,
/// fails new requests closed (503) and re-attaches as soon as a control is
/// back, handing each worker its new channel.
struct ControlWatch {
    socket_path: PathBuf,
    stream: std::os::unix::net::UnixStream,
    alive: Arc<AtomicBool>,
    inboxes: Arc<[Inbox]>,
    relinks: Vec<mpsc::Sender<ControlLink>>,
    workers: u32,
    /// The upstream routes the workers were started with.
    upstreams: Vec<relay_proto::channel::bootstrap::UpstreamBootstrap>,
    tls: Arc<TlsShared>,
    cids: Arc<CidShared>,
    qlog: Arc<QlogShared>,
}

impl ControlWatch {
    /// Reads control's updates until the socket ends (control is gone) or
    /// carries something invalid (the stream cannot be trusted after it).
    fn follow_updates(&self) {
        loop {
            match handshake::recv::<ControlUpdate>(&self.stream) {
                Ok((ControlUpdate::Tls(material), _)) => {
                    let generation = material.generation;
                    match self.tls.update(material) {
                        Ok(TlsChange::Certificate) => info!(generation, "control sent a new certificate"),
                        Ok(TlsChange::TicketKeys) => {
                            info!(generation, "control rotated the session ticket keys")
                        }
                        Err(e) => error!("TLS update refused, still serving the previous material: {e}"),
                    }
                    for inbox in self.inboxes.iter() {
                        let _ = inbox.bell.ring();
                    }
                }
                Ok((ControlUpdate::Cids(settings), _)) => {
                    match self.cids.rotate(&settings) {
                        Ok(()) => info!(?settings, "control rotated the connection ID configuration"),
                        Err(e) => {
                            error!("connection ID rotation refused, keeping the configuration in force: {e}")
                        }
                    }
                    for inbox in self.inboxes.iter() {
                        let _ = inbox.bell.ring();
                    }
                }
                Ok((ControlUpdate::Qlog(command), fds)) => {
                    match self.qlog.apply(command, fds, std::time::Instant::now()) {
                        Ok(()) => {
                            for inbox in self.inboxes.iter() {
                                let _ = inbox.bell.ring();
                            }
                        }
                        Err(e) => error!("qlog command refused: {e}"),
                    }
                }
                Err(HandshakeError::Closed) => return,
                Err(e) => {
                    error!("control's socket carried an invalid update ({e}); re-attaching");
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }

    fn run(mut self) {
        loop {
            self.follow_updates();
            self.alive.store(false, Ordering::Release);
            warn!("control went away: new requests get 503 until it is back; open tunnels keep forwarding");
            for inbox in self.inboxes.iter() {
                let _ = inbox.bell.ring();
            }
            loop {
                if STOP.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
                match attach(&self.socket_path, Duration::ZERO) {
                    Ok(att) if att.bootstrap.workers == self.workers => {
                        if self.adopt(att).is_ok() {
                            break;
                        }
                    }
                    Ok(att) => warn!(
                        theirs = att.bootstrap.workers,
                        ours = self.workers,
                        "control offers a different worker count; restart the dataplane to apply it"
                    ),
                    Err(_) => {}
                }
            }
        }
    }

    fn adopt(&mut self, att: relay_dataplane::attach::Attachment) -> std::io::Result<()> {
        if att.bootstrap.upstreams != self.upstreams {
            warn!(
                "the new control has other upstream routes or origin TLS settings; restart the dataplane to apply them (requests for routes it does not know get 502)"
            );
        }
        // A new control starts its certificate generations over.
        if let Err(e) = self.tls.replace(att.bootstrap.tls.clone()) {
            error!("the new control's TLS material is unusable ({e}); keeping the previous one");
        }
        let alive = Arc::new(AtomicBool::new(true));
        for (i, (ask_bell, answer_bell)) in att.doorbells.into_iter().enumerate() {
            let link =
                ControlLink::new(att.region.dataplane_side(i as u32), ask_bell, answer_bell, alive.clone());
            if self.relinks[i].send(link).is_err() {
                return Err(std::io::Error::other("worker gone"));
            }
            // The worker picks the new link up when its own bell rings.
            let _ = self.inboxes[i].bell.ring();
        }
        self.alive = alive;
        self.stream = att.stream;
        info!("re-attached to control");
        Ok(())
    }
}

/// The backend the workers run, after probing the kernel.
fn choose_backend(b: &Bootstrap) -> Result<BackendKind, String> {
    let support = relay_udp::uring::probe();
    info!(
        multishot_recvmsg = support.recvmsg_multishot,
        buffer_rings = support.buf_ring,
        sendmsg = support.sendmsg,
        "{support}"
    );
    match b.io_backend {
        IoBackend::Epoll => Ok(BackendKind::Epoll),
        IoBackend::IoUring if support.is_usable() => Ok(BackendKind::Uring),
        IoBackend::IoUring => {
            Err(format!("io_uring was asked for but is not usable: {}", support.missing().join(", ")))
        }
        IoBackend::Auto if support.is_usable() => Ok(BackendKind::Uring),
        IoBackend::Auto => {
            warn!(missing = %support.missing().join(", "), "io_uring is not usable here; using epoll");
            Ok(BackendKind::Epoll)
        }
    }
}

/// The io_uring workers' batched waits (`dataplane.wait_batch_us`).
fn wait_batching(b: &Bootstrap) -> Option<WaitBatching> {
    (b.wait_batch_us > 0).then(|| WaitBatching {
        // Enough that under a paced load the window, not the count, ends a
        // wait; a worker with this much work runs at once.
        completions: 32,
        window: Duration::from_micros(u64::from(b.wait_batch_us)),
    })
}

/// One worker thread's I/O loop.
enum Backend {
    Uring(Box<UringBackend>),
    Epoll(Box<EpollBackend>),
}

impl Backend {
    /// Builds the backend on the worker's own thread (an io_uring is tied
    /// to the thread that submits to it). With `auto`, a ring that cannot
    /// be set up falls back to epoll.
    fn build(
        kind: BackendKind,
        auto: bool,
        settings: UringSettings,
        sock: std::net::UdpSocket,
        tun: Option<TunDevice>,
    ) -> std::io::Result<(Self, BackendKind)> {
        match kind {
            BackendKind::Epoll => {
                Ok((Backend::Epoll(Box::new(EpollBackend::new(sock)?.with_tun(tun))), kind))
            }
            BackendKind::Uring => {
                let fallback = sock.try_clone()?;
                match UringBackend::new(sock, settings) {
                    Ok(b) => Ok((Backend::Uring(Box::new(b.with_tun(tun))), kind)),
                    Err(e) if auto => {
                        warn!("io_uring setup failed ({e}); using epoll");
                        let epoll = EpollBackend::new(fallback)?.with_tun(tun);
                        Ok((Backend::Epoll(Box::new(epoll)), BackendKind::Epoll))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn run(&mut self, worker: &mut Worker) -> std::io::Result<()> {
        match self {
            Backend::Uring(b) => b.run(worker),
            Backend::Epoll(b) => b.run(worker),
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let fd_limit = raise_fd_limit();
    let att = attach(&args.control_socket, Duration::from_secs(args.attach_timeout))?;
    let b = att.bootstrap.clone();
    let template = UriTemplate::parse(&b.uri_template)?;
    let ip_template = match &b.connect_ip {
        Some(ip) => Some(relay_proto::template::IpUriTemplate::parse(&ip.uri_template)?),
        None => None,
    };
    let cids = CidConfigs::new(b.cid_settings().layout()?);
    let cid_shared = Arc::new(CidShared::new(cids.clone()));
    let qlog = Arc::new(QlogShared::new());
    let kind = choose_backend(&b)?;
    if b.wait_batch_us > 0 && kind == BackendKind::Epoll {
        warn!(
            wait_batch_us = b.wait_batch_us,
            "batched waits are an io_uring feature: the epoll workers wake for each event"
        );
    }
    let cpus = cpu::allowed_cpus();
    info!(
        workers = b.workers,
        listen = %b.listen,
        fd_limit,
        backend = kind.name(),
        pinned = b.pin_workers,
        cpus = ?cpus,
        "attached to control"
    );
    let control_alive = Arc::new(AtomicBool::new(true));
    let retry = Arc::new(match &b.quic_keys {
        Some(keys) => RetryTokens::with_key(keys.retry_token_key),
        None => RetryTokens::new()?,
    });
    let tls = Arc::new(TlsShared::new(b.tls.clone())?);
    // One client context per CA file of the wss:// routes, read now: a
    // file the dataplane cannot read fails the attach.
    let origin_tls = Arc::new(relay_dataplane::origin_tls::OriginTls::from_bootstrap(&b.upstreams)?);
    let inboxes: Arc<[Inbox]> =
        (0..b.workers).map(|_| Inbox::new()).collect::<std::io::Result<Vec<_>>>()?.into();
    let mut handles = Vec::new();
    let mut relinks = Vec::new();
    for (i, (ask_bell, answer_bell)) in att.doorbells.into_iter().enumerate() {
        let i = i as u32;
        let link =
            ControlLink::new(att.region.dataplane_side(i), ask_bell, answer_bell, control_alive.clone());
        let mut settings = Settings::new(i, b.clone(), template.clone(), ip_template.clone(), cids.clone());
        settings.origin_tls = origin_tls.clone();
        let (relink_tx, relink_rx) = mpsc::channel();
        relinks.push(relink_tx);
        // Bind in this thread, in worker order, so a bad address fails
        // start-up and socket i is index i of the reuseport group.
        let sock = socket::quic_listener(b.listen)?;
        let local = sock.local_addr()?;
        if i == 0 && !relay_udp::gso_supported(&sock) {
            // Probe once: without UDP_SEGMENT every datagram is its own send.
            relay_udp::GSO_ENABLED.store(false, Ordering::Relaxed);
            warn!("the kernel lacks UDP_SEGMENT (GSO): sending one datagram per system call");
        }
        if i == 0 && b.cid_steering && b.workers > 1 {
            match cids.steerable() {
                Some(offset) => steer(&sock, offset, b.workers),
                None => info!(
                    "encrypted connection IDs: no in-kernel steering; migrated connections reach their worker by hand-off"
                ),
            }
        }
        let flags = Flags { stop: &STOP, drain: &DRAIN };
        let mut worker = Worker::new(
            settings,
            tls.clone(),
            flags,
            local,
            link,
            relink_rx,
            inboxes.clone(),
            retry.clone(),
        )?;
        worker.set_cid_updates(cid_shared.clone());
        worker.set_qlog(qlog.clone());
        let mut tun_device = None;
        if let Some(ip) = &b.connect_ip {
            let name = format!("{}{i}", ip.interface_prefix);
            let subnets = ip.worker_subnets.get(i as usize).map(Vec::as_slice).unwrap_or_default();
            let tun = relay_dataplane::tun::WorkerTun::create(&name, subnets, ip.mtu, ip.offload)?;
            info!(worker = i, device = %name, mtu = ip.mtu, "connect-ip TUN device ready");
            let (device, info) = tun.into_parts();
            worker.set_tun(info);
            tun_device = Some(device);
        }
        if let Some(tcp) = &b.tcp {
            let settings = relay_dataplane::front::FrontSettings {
                tcp: tcp.clone(),
                limits: relay_dataplane::tunnel::datagrams::Limits {
                    max_capsule_len: b.max_capsule_len as usize,
                    max_queued_datagrams: b.pending_datagrams_per_tunnel as usize,
                    stream_out_limit: tcp.tunnel_buffer_bytes as usize,
                },
            };
            let front = relay_dataplane::front::Front::new(settings, tls.clone())?;
            if i == 0 {
                info!(listeners = ?front.local_addrs(), alt_svc = ?tcp.alt_svc, "TCP front (HTTP/2, HTTP/1.1) listening");
            }
            worker.set_front(front);
        }
        let cpu = (b.pin_workers && !cpus.is_empty()).then(|| cpus[i as usize % cpus.len()]);
        let auto = b.io_backend == IoBackend::Auto;
        let uring_settings = UringSettings { wait_batching: wait_batching(&b), ..UringSettings::default() };
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        handles.push(std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
            // Every line this worker logs names it, as relayctl's rows do.
            let _span = tracing::info_span!("worker", worker = i).entered();
            if let Some(cpu) = cpu
                && let Err(e) = cpu::pin_current_thread(cpu)
            {
                warn!(worker = i, cpu, "pinning failed: {e}");
            }
            let (mut backend, kind) = match Backend::build(kind, auto, uring_settings, sock, tun_device) {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("worker {i}: {} backend: {e}", kind.name())));
                    return;
                }
            };
            worker.set_backend_gauge(kind.gauge());
            let _ = ready_tx.send(Ok(()));
            info!(worker = i, addr = %local, backend = kind.name(), ?cpu, "worker serving");
            if let Err(e) = backend.run(&mut worker) {
                error!(worker = i, "worker failed: {e}");
            }
        })?);
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(format!("worker {i} exited during start-up").into()),
        }
    }
    let watch = ControlWatch {
        socket_path: args.control_socket.clone(),
        stream: att.stream,
        alive: control_alive,
        inboxes,
        relinks,
        workers: b.workers,
        upstreams: b.upstreams.clone(),
        tls,
        cids: cid_shared,
        qlog,
    };
    std::thread::Builder::new().name("control-watch".into()).spawn(move || watch.run())?;
    info!(gso = relay_udp::gso_enabled(), "UDP segmentation offload");
    println!("relay-dataplane: serving QUIC on {} ({} workers, {})", b.listen, b.workers, kind.name());
    for h in handles {
        let _ = h.join();
    }
    info!("dataplane stopped");
    Ok(())
}

/// Attaches the reuseport program that sends short-header packets to the
/// worker named in their connection ID. Without it (old kernel, no
/// permission) packets still reach their worker through hand-offs.
fn steer(sock: &std::net::UdpSocket, worker_offset: usize, workers: u32) {
    let workers = workers.min(255) as u8;
    let program = relay_udp::steer::reuseport_cbpf_program(worker_offset, workers);
    match relay_udp::steer::attach_reuseport_cbpf(sock, &program) {
        Ok(()) => info!("reuseport steering by connection ID attached"),
        Err(e) => warn!("reuseport steering unavailable ({e}); packets reach their worker by hand-off"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing an async-signal-safe handler that only stores
        // to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-dataplane: {e}");
            ExitCode::FAILURE
        }
    }
}

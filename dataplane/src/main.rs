//! `relay-dataplane`: the MASQUE relay's forwarding process.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use clap::Parser;
use relay_dataplane::attach::attach;
use relay_dataplane::link::ControlLink;
use relay_dataplane::worker::{Worker, WorkerSettings};
use relay_proto::channel::doorbell::Doorbell;
use relay_proto::template::UriTemplate;
use tracing::{error, info, warn};

/// The MASQUE relay's dataplane: attaches to relay-control, then serves
/// QUIC + HTTP/3 and forwards connect-udp tunnels.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Control's channel socket.
    #[arg(long, default_value = "state/channel.sock")]
    control_socket: PathBuf,
    /// How long to wait for control's socket to appear, in seconds.
    #[arg(long, default_value_t = 30)]
    attach_timeout: u64,
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

/// Watches the control socket; when control goes away, fails new requests
/// closed (503) and re-attaches as soon as a control is back, handing each
/// worker its new channel.
struct ControlWatch {
    socket_path: PathBuf,
    stream: std::os::unix::net::UnixStream,
    alive: Arc<AtomicBool>,
    wake_bells: Vec<Doorbell>,
    relinks: Vec<mpsc::Sender<ControlLink>>,
    workers: u32,
}

impl ControlWatch {
    fn run(mut self) {
        loop {
            let mut buf = [0u8; 64];
            loop {
                match (&self.stream).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            self.alive.store(false, Ordering::Release);
            warn!("control went away: new requests get 503 until it is back; open tunnels keep forwarding");
            for bell in &self.wake_bells {
                let _ = bell.ring();
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
        let alive = Arc::new(AtomicBool::new(true));
        let mut bells = Vec::new();
        for (i, (ask_bell, answer_bell)) in att.doorbells.into_iter().enumerate() {
            bells.push(Doorbell::from_fd(answer_bell.try_clone_fd()?));
            let link =
                ControlLink::new(att.region.dataplane_side(i as u32), ask_bell, answer_bell, alive.clone());
            if self.relinks[i].send(link).is_err() {
                return Err(std::io::Error::other("worker gone"));
            }
            // Wake the worker on the doorbell it still polls.
            let _ = self.wake_bells[i].ring();
        }
        self.wake_bells = bells;
        self.alive = alive;
        self.stream = att.stream;
        info!("re-attached to control");
        Ok(())
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let fd_limit = raise_fd_limit();
    let att = attach(&args.control_socket, Duration::from_secs(args.attach_timeout))?;
    let template = UriTemplate::parse(&att.bootstrap.uri_template)?;
    info!(workers = att.bootstrap.workers, listen = %att.bootstrap.listen, fd_limit, "attached to control");
    let control_alive = Arc::new(AtomicBool::new(true));
    let mut handles = Vec::new();
    let mut wake_bells = Vec::new();
    let mut relinks = Vec::new();
    for (i, (ask_bell, answer_bell)) in att.doorbells.into_iter().enumerate() {
        let i = i as u32;
        wake_bells.push(Doorbell::from_fd(answer_bell.try_clone_fd()?));
        let link =
            ControlLink::new(att.region.dataplane_side(i), ask_bell, answer_bell, control_alive.clone());
        let settings =
            WorkerSettings { index: i, bootstrap: att.bootstrap.clone(), template: template.clone() };
        let (relink_tx, relink_rx) = mpsc::channel();
        relinks.push(relink_tx);
        // Bind in this thread so a bad address fails start-up, not a worker.
        let mut worker = Worker::new(settings, link, relink_rx)?;
        handles.push(std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
            if let Err(e) = worker.run(&STOP, &DRAIN) {
                error!(worker = i, "worker failed: {e}");
            }
        })?);
    }
    let watch = ControlWatch {
        socket_path: args.control_socket.clone(),
        stream: att.stream,
        alive: control_alive,
        wake_bells,
        relinks,
        workers: att.bootstrap.workers,
    };
    std::thread::Builder::new().name("control-watch".into()).spawn(move || watch.run())?;
    println!("relay-dataplane: serving QUIC on {}", att.bootstrap.listen);
    for h in handles {
        let _ = h.join();
    }
    info!("dataplane stopped");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing an async-signal-safe handler that only stores
        // to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-dataplane: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The io_uring backend (the default).
//!
//! One ring per worker. Every socket has a multishot `recvmsg` armed on it
//! that completes once per (GRO-coalesced) datagram into a provided buffer
//! ring: one ring of buffers for the QUIC socket, one shared by the target
//! sockets. The doorbells are watched by multishot polls. Sends are
//! `sendmsg` submissions from a bounded pool of slots, each a whole GSO
//! batch. A turn is: one `io_uring_enter` that submits the previous turn's
//! work and waits for completions (or the core's next timer), then every
//! completion handed to the core, then the core's output queued as
//! submissions. Under load that is one system call for many datagrams.
//!
//! Buffers go back to the kernel as soon as the core has processed their
//! completion (the core copies what it keeps), so the rings only run dry
//! when more completions pile up than there are buffers; then the receive
//! ends with `-ENOBUFS` (counted) and is re-armed at the end of the turn.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::types::Timespec;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use relay_udp::uring::{BufRing, MultishotRecv, SendOutcome, SendSlots, SlotId};
use relay_udp::{GSO_ENABLED, MAX_GRO_BUFFER, mmsg};
use tracing::{debug, warn};

use super::{Handler, IoStats, Output, Ready, TargetKey, Turn, Wake, WatchKey};
use crate::tun::TunDevice;

/// Sizes of a worker's ring and pools.
#[derive(Debug, Clone, Copy)]
pub struct UringSettings {
    /// Submission queue entries (the completion queue is 8 times larger).
    pub entries: u32,
    /// Receive buffers for the QUIC socket (64 KiB each: a GRO super-packet).
    pub quic_buffers: u16,
    /// Receive buffers shared by the target sockets.
    pub target_buffers: u16,
    /// Send slots (GSO batches in flight).
    pub send_slots: usize,
    /// Batched waits (off when `None`), see [`WaitBatching`].
    pub wait_batching: Option<WaitBatching>,
}

/// Batched waits: a worker that has just finished a turn waits up to
/// `window` for `completions` completions before it runs the next one,
/// instead of waking for the first; once `window` has passed it runs as
/// soon as one completion is there (the kernel's `min_wait_usec`, Linux
/// 6.12). A datagram that arrives within `window` of the end of a turn
/// waits at most `window` longer; one that arrives later (an idle worker)
/// is not delayed at all. Fewer, fuller turns: fewer wake-ups, fewer
/// acknowledgements, larger GSO batches to each target, at the price of
/// that added latency.
///
/// The count is of completions the kernel would post: what one socket
/// receives while the worker sleeps is one piece of deferred task work, so
/// it counts once however many datagrams it holds. Under load from one
/// QUIC socket the window, not the count, ends the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitBatching {
    /// How many completions end the wait before `window` has passed.
    pub completions: u32,
    /// How long a wait may collect completions.
    pub window: Duration,
}

/// When to batch a wait: while work arrives more often than every two
/// windows (a batched wait then gathers more than one arrival; on sparser
/// loads it gathers nothing, and cost more CPU per datagram than it saved:
/// measured 1.7 times at 2,000 datagrams/s with 500 us), and while the
/// worker's thread is at most half busy with batching on. A busier
/// worker's turns fill by themselves, and every window it sleeps stretches
/// its cycle to window / (1 - load): batching at any load put the echo p99
/// at 62 ms at 90% of the sustainable rate (docs/BENCHMARKS.md). Batching
/// roughly halves the load it is turned on at, so it is turned on below
/// three quarters busy (unbatched) and kept below one half (batched): with
/// one limit for both, a worker 56% busy at 40k datagrams/s never tried it,
/// though batched it ran 23% busy. The load is the thread's CPU time over
/// wall time, so the kernel's work inside `io_uring_enter` (the sends,
/// their loopback delivery) counts as busy.
#[derive(Debug, Clone, Copy)]
struct WaitBatcher {
    settings: WaitBatching,
    /// Moving average of the thread's CPU time over wall time, per cycle.
    load: f64,
    /// The next wait is batched.
    next: bool,
    /// The thread's CPU clock and the wall clock at the end of the last
    /// wait.
    last: Option<(Duration, Instant)>,
}

impl WaitBatcher {
    /// A moving average over about this many cycles.
    const SMOOTHING: f64 = 8.0;
    /// Batching stops above this load (measured with batching on).
    const STAY_BELOW: f64 = 0.5;
    /// Batching starts below this load (measured with batching off).
    const START_BELOW: f64 = 0.75;

    fn new(settings: WaitBatching) -> Self {
        Self { settings, load: 0.0, next: true, last: None }
    }

    /// A wait that began at `started` (`None`: the turn did not wait) has
    /// ended: reads the clocks and decides about the next one.
    fn after_wait(&mut self, started: Option<Instant>) {
        let (cpu, wall) = (thread_cpu_time(), Instant::now());
        let waited = started.map_or(Duration::ZERO, |s| wall.saturating_duration_since(s));
        if let Some((last_cpu, last_wall)) = self.last {
            self.after_cycle(cpu.saturating_sub(last_cpu), wall.saturating_duration_since(last_wall), waited);
        }
        self.last = Some((cpu, wall));
    }

    /// One cycle (a turn and the wait after it) took `wall`, of which the
    /// thread ran `cpu`, and its wait lasted `waited`.
    fn after_cycle(&mut self, cpu: Duration, wall: Duration, waited: Duration) {
        let share = if wall.is_zero() { 1.0 } else { (cpu.as_secs_f64() / wall.as_secs_f64()).min(1.0) };
        self.load += (share - self.load) / Self::SMOOTHING;
        let limit = if self.next { Self::STAY_BELOW } else { Self::START_BELOW };
        self.next = waited < self.settings.window * 2 && self.load <= limit;
    }
}

/// A relative timeout for the kernel.
fn timespec(d: Duration) -> Timespec {
    Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos())
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into; the clock id is a
    // constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Default for UringSettings {
    fn default() -> Self {
        Self { entries: 1024, quic_buffers: 64, target_buffers: 128, send_slots: 128, wait_batching: None }
    }
}

const QUIC_BGID: u16 = 0;
const TARGET_BGID: u16 = 1;

/// What a completion is for: the top byte of its user data.
const KIND_QUIC_RECV: u64 = 1;
const KIND_TARGET_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_ANSWER_BELL: u64 = 4;
const KIND_WORKER_BELL: u64 = 5;
const KIND_CANCEL: u64 = 6;
const KIND_TIMER: u64 = 7;
const KIND_TUN: u64 = 8;
const KIND_WATCH: u64 = 9;
const KIND_SHIFT: u32 = 56;
const VALUE_MASK: u64 = (1 << KIND_SHIFT) - 1;

fn user_data(kind: u64, value: u64) -> u64 {
    (kind << KIND_SHIFT) | (value & VALUE_MASK)
}

/// `io_uring_enter` flag: collect completions, running the ring's deferred
/// task work first (include/uapi/linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;

/// Completions handled per turn at most (the rest wait for the next turn).
const CQE_BUDGET: usize = 4 * 1024;

#[derive(Debug, Clone, Copy)]
enum SendKind {
    Quic,
    Target(TargetKey),
}

/// A GSO batch to queue.
struct Send {
    buf: Vec<u8>,
    fd: RawFd,
    dest: Option<SocketAddr>,
    segment_size: usize,
    segments: usize,
    kind: SendKind,
}

#[derive(Debug, Clone, Copy)]
struct Cqe {
    user_data: u64,
    result: i32,
    flags: u32,
}

struct Target {
    sock: UdpSocket,
    /// Connected to one target (else a bound tunnel's socket: receives
    /// carry the sender).
    connected: bool,
    /// Its multishot receive is armed.
    armed: bool,
    /// The core paused its reads: its receive is cancelled and not
    /// re-armed until the core resumes it.
    paused: bool,
}

/// A worker's io_uring loop.
pub struct UringBackend {
    ring: IoUring,
    socket: UdpSocket,
    quic_recv: MultishotRecv,
    target_recv: MultishotRecv,
    /// The receive template of unconnected endpoints (bound tunnels).
    bound_recv: MultishotRecv,
    quic_bufs: BufRing,
    target_bufs: BufRing,
    slots: SendSlots,
    /// What each slot in flight sends.
    slot_kind: Vec<SendKind>,
    targets: HashMap<TargetKey, Target>,
    /// Closed target sockets, dropped after the submission that cancels
    /// their receive (so no queued entry names a reused descriptor).
    closing: Vec<UdpSocket>,
    quic_armed: bool,
    /// Targets whose receive ended and must be re-armed.
    rearm: Vec<TargetKey>,
    worker_bell_armed: bool,
    /// The worker's TUN device (connect-ip), its read buffer, and whether
    /// its poll is armed and it may have packets.
    tun: Option<(TunDevice, Vec<u8>)>,
    tun_armed: bool,
    tun_ready: bool,
    /// Target sends the OS refused as unreachable, for the core.
    unreachable: Vec<(TargetKey, i32)>,
    /// Descriptors the core services itself: key -> (fd, poll mask, poll armed).
    watched: HashMap<WatchKey, (RawFd, u32, bool)>,
    pending_watch_polls: Vec<squeue::Entry>,
    answer_bell: Option<(RawFd, u64)>,
    answer_bell_armed: bool,
    /// Completions taken while waiting for a send slot, handled next turn.
    deferred: VecDeque<Cqe>,
    cqes: Vec<Cqe>,
    stats: IoStats,
    /// The wait's timeout (read by the kernel when the entry is submitted).
    timer_ts: Box<Timespec>,
    timer_generation: u64,
    /// The armed timeout request: its generation and when it fires.
    timer: Option<(u64, Instant)>,
    /// The wait's whole timeout when waits are batched (the kernel needs
    /// one to go on waiting for a single completion after the window).
    wait_ts: Timespec,
    /// Batched waits, when asked for and the kernel has them.
    batcher: Option<WaitBatcher>,
}

fn ring_with(entries: u32) -> io::Result<IoUring> {
    // One thread submits and reaps (SINGLE_ISSUER), and completions are
    // only run when it enters the kernel (DEFER_TASKRUN, 6.1): no
    // interrupts of the worker by task work. Older kernels take the plain
    // ring.
    let tuned = IoUring::builder()
        .setup_cqsize(entries * 8)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries);
    match tuned {
        Ok(r) => Ok(r),
        Err(_) => IoUring::builder().setup_cqsize(entries * 8).build(entries),
    }
}

impl UringBackend {
    /// Creates the ring, its buffer rings and send slots for the worker's
    /// bound QUIC socket. Must run on the worker's thread (the ring is
    /// single-issuer).
    pub fn new(socket: UdpSocket, s: UringSettings) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let ring = ring_with(s.entries)?;
        let quic_recv = MultishotRecv::unconnected();
        let target_recv = MultishotRecv::connected();
        let bound_recv = MultishotRecv::unconnected();
        let quic_size = quic_recv.buffer_size_for(MAX_GRO_BUFFER) as u32;
        // One buffer group for both kinds of endpoints: sized for the
        // larger header (the unconnected one's sender address).
        let target_size = target_recv
            .buffer_size_for(MAX_GRO_BUFFER)
            .max(bound_recv.buffer_size_for(MAX_GRO_BUFFER)) as u32;
        let quic_bufs = BufRing::new(&ring.submitter(), QUIC_BGID, s.quic_buffers, quic_size)?;
        let target_bufs = BufRing::new(&ring.submitter(), TARGET_BGID, s.target_buffers, target_size)?;
        let wait_batching = match s.wait_batching {
            Some(b) if !ring.params().is_feature_min_timeout() => {
                warn!(
                    ?b,
                    "batched waits need Linux 6.12 (IORING_FEAT_MIN_TIMEOUT); waiting for each completion"
                );
                None
            }
            other => other,
        };
        Ok(Self {
            ring,
            socket,
            quic_recv,
            target_recv,
            bound_recv,
            quic_bufs,
            target_bufs,
            slots: SendSlots::new(s.send_slots),
            slot_kind: vec![SendKind::Quic; s.send_slots],
            targets: HashMap::new(),
            closing: Vec::new(),
            quic_armed: false,
            rearm: Vec::new(),
            worker_bell_armed: false,
            tun: None,
            tun_armed: false,
            tun_ready: false,
            unreachable: Vec::new(),
            watched: HashMap::new(),
            pending_watch_polls: Vec::new(),
            answer_bell: None,
            answer_bell_armed: false,
            deferred: VecDeque::new(),
            cqes: Vec::with_capacity(CQE_BUDGET),
            stats: IoStats::default(),
            timer_ts: Box::new(Timespec::new()),
            timer_generation: 0,
            timer: None,
            wait_ts: Timespec::new(),
            batcher: wait_batching.map(WaitBatcher::new),
        })
    }

    /// Serves the worker's TUN device too (connect-ip).
    pub fn with_tun(mut self, dev: Option<TunDevice>) -> Self {
        self.tun = dev.map(|d| (d, vec![0; relay_proto::ip::offload::VNET_HDR_LEN + 65_536]));
        self.tun_ready = self.tun.is_some();
        self
    }

    /// Queues an entry, submitting first if the queue is full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry we build points at memory that outlives
            // the request: the multishot templates and buffer rings live as
            // long as the backend, the send slots until their completion,
            // the polled eventfds until their poll is cancelled.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            self.stats.syscalls += 1;
            if let Err(e) = self.ring.submit() {
                warn!("io_uring submit: {e}");
                if e.raw_os_error() != Some(libc::EBUSY) && e.kind() != io::ErrorKind::Interrupted {
                    return;
                }
            }
        }
    }

    /// Runs the loop until the handler says stop.
    pub fn run<H: Handler>(&mut self, h: &mut H) -> io::Result<()> {
        let mut deadline = Instant::now();
        let mut turn_start = deadline;
        loop {
            self.arm(h);
            let pending = !self.deferred.is_empty() || !self.ring.completion().is_empty() || self.tun_ready;
            self.enter(turn_start, if pending { turn_start } else { deadline })?;
            self.drop_closed();
            turn_start = Instant::now();
            h.begin_turn(turn_start);
            for (key, errno) in std::mem::take(&mut self.unreachable) {
                h.on_target_unreachable(key, errno);
            }
            self.collect();
            let cqes = std::mem::take(&mut self.cqes);
            for cqe in &cqes {
                self.complete(h, *cqe);
            }
            self.cqes = cqes;
            self.cqes.clear();
            if self.tun_ready
                && let Some((dev, buf)) = self.tun.as_mut()
            {
                self.tun_ready = super::tun::read(dev, buf, h, &mut self.stats);
            }
            let turn = h.end_turn();
            self.perform(h.output());
            h.output().stats += std::mem::take(&mut self.stats);
            match turn {
                Turn::Stop => {
                    self.finish();
                    return Ok(());
                }
                Turn::Continue { deadline: d } => deadline = d,
            }
        }
    }

    /// Submits what is queued and waits until a completion arrives or
    /// `deadline` passes (`deadline <= now`: no waiting).
    ///
    /// The wait's end is a timeout request, not the `IORING_ENTER_EXT_ARG`
    /// timespec: on the 6.18 kernels we run on, a thread waiting with the
    /// latter sometimes never returned although its timer kept firing (seen
    /// in the end-to-end tests). A timeout request is the older, plainer
    /// mechanism; it is re-armed only when the deadline moves earlier, so
    /// idle turns cost one system call and no extra completions.
    fn enter(&mut self, now: Instant, deadline: Instant) -> io::Result<()> {
        self.stats.syscalls += 1;
        if deadline <= now {
            // A turn that does not wait must still collect. On a
            // DEFER_TASKRUN ring the completions of readiness and receives
            // (multishot polls, multishot recvmsg) are posted by deferred
            // task work, which the kernel runs only in an enter carrying
            // GETEVENTS; a plain submit (`submit_and_wait(0)`) carries none.
            // A worker whose turns stayed busy (a TCP front connection with
            // work left every turn) then never saw another socket event: not
            // its target becoming readable or writable, not a QUIC datagram,
            // and waited for them for ever. GETEVENTS with no minimum runs
            // that work and returns at once.
            if let Some(b) = self.batcher.as_mut() {
                b.after_wait(None);
            }
            let to_submit = self.ring.submission().len() as u32;
            // SAFETY: no argument is passed; the queued entries point at
            // memory that outlives their requests (see `push`).
            let entered = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)
            };
            return match entered {
                Ok(_) => Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
                Err(e) => Err(e),
            };
        }
        let rearm = match self.timer {
            None => true,
            // A timer that fires a little early only costs an idle turn.
            Some((_, armed)) => deadline + Duration::from_millis(1) < armed,
        };
        if rearm {
            if let Some((generation, _)) = self.timer.take() {
                let remove = opcode::TimeoutRemove::new(user_data(KIND_TIMER, generation))
                    .build()
                    .user_data(user_data(KIND_CANCEL, 0));
                self.push(remove);
            }
            self.timer_generation += 1;
            *self.timer_ts = timespec(deadline - now);
            let timeout = opcode::Timeout::new(&*self.timer_ts)
                .build()
                .user_data(user_data(KIND_TIMER, self.timer_generation));
            self.push(timeout);
            self.timer = Some((self.timer_generation, deadline));
        }
        let batching = self.batcher.filter(|b| b.next).map(|b| b.settings);
        let started = self.batcher.is_some().then(Instant::now);
        let waited = match batching {
            Some(b) => {
                self.stats.waits_batched += 1;
                // The timeout request above stays armed: it ends the wait at
                // the deadline whatever happens to this one.
                self.wait_ts = timespec(deadline - now);
                let usec = u32::try_from(b.window.as_micros()).unwrap_or(u32::MAX).max(1);
                let args = types::SubmitArgs::new().min_wait_usec(usec).timespec(&self.wait_ts);
                self.ring.submitter().submit_with_args(b.completions.max(1) as usize, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        if let Some(b) = self.batcher.as_mut() {
            b.after_wait(started);
        }
        match waited {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves completions out of the queue: deferred ones first, then up to
    /// the turn's budget.
    fn collect(&mut self) {
        while self.cqes.len() < CQE_BUDGET {
            match self.deferred.pop_front() {
                Some(c) => self.cqes.push(c),
                None => break,
            }
        }
        let room = CQE_BUDGET.saturating_sub(self.cqes.len());
        let cq = self.ring.completion();
        self.cqes.extend(cq.take(room).map(|c| Cqe {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
    }

    /// (Re-)arms the receives and polls that are not armed.
    fn arm<H: Handler>(&mut self, h: &H) {
        if !self.quic_armed {
            let e = self.quic_recv.entry(self.socket.as_raw_fd(), QUIC_BGID, user_data(KIND_QUIC_RECV, 0));
            self.push(e);
            self.quic_armed = true;
        }
        let mut rearm = std::mem::take(&mut self.rearm);
        for key in rearm.drain(..) {
            let Some(t) = self.targets.get_mut(&key).filter(|t| !t.armed && !t.paused) else { continue };
            t.armed = true;
            let template = if t.connected { &self.target_recv } else { &self.bound_recv };
            let e = template.entry(t.sock.as_raw_fd(), TARGET_BGID, user_data(KIND_TARGET_RECV, key));
            self.push(e);
        }
        // Keep the allocation for the next turn.
        self.rearm = rearm;
        if !self.worker_bell_armed {
            let poll = opcode::PollAdd::new(types::Fd(h.worker_bell()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(KIND_WORKER_BELL, 0));
            self.push(poll);
            self.worker_bell_armed = true;
        }
        for (key, (fd, mask, armed)) in self.watched.iter_mut() {
            if !*armed {
                let poll = opcode::PollAdd::new(types::Fd(*fd), *mask)
                    .multi(true)
                    .build()
                    .user_data(user_data(KIND_WATCH, *key));
                *armed = true;
                self.pending_watch_polls.push(poll);
            }
        }
        for poll in std::mem::take(&mut self.pending_watch_polls) {
            self.push(poll);
        }
        if !self.tun_armed
            && let Some((dev, _)) = self.tun.as_ref()
        {
            let poll = opcode::PollAdd::new(types::Fd(dev.as_raw_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(KIND_TUN, 0));
            self.push(poll);
            self.tun_armed = true;
        }
        let current = h.answer_bell();
        if self.answer_bell != Some(current) {
            if let Some((_, epoch)) = self.answer_bell.take()
                && self.answer_bell_armed
            {
                let cancel = opcode::AsyncCancel::new(user_data(KIND_ANSWER_BELL, epoch))
                    .build()
                    .user_data(user_data(KIND_CANCEL, 0));
                self.push(cancel);
            }
            self.answer_bell = Some(current);
            self.answer_bell_armed = false;
        }
        if !self.answer_bell_armed
            && let Some((fd, epoch)) = self.answer_bell
        {
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(KIND_ANSWER_BELL, epoch));
            self.push(poll);
            self.answer_bell_armed = true;
        }
    }

    fn complete<H: Handler>(&mut self, h: &mut H, c: Cqe) {
        let value = c.user_data & VALUE_MASK;
        match c.user_data >> KIND_SHIFT {
            KIND_QUIC_RECV => self.quic_received(h, c),
            KIND_TARGET_RECV => self.target_received(h, value, c),
            KIND_SEND => self.sent(SlotId(value as u32), c.result),
            KIND_WORKER_BELL => {
                if !cqueue::more(c.flags) {
                    self.worker_bell_armed = false;
                }
                if c.result >= 0 {
                    h.on_wake(Wake::Worker);
                }
            }
            KIND_WATCH => {
                if let Some((_, _, armed)) = self.watched.get_mut(&value)
                    && !cqueue::more(c.flags)
                {
                    *armed = false;
                }
                if c.result >= 0 && self.watched.contains_key(&value) {
                    h.on_ready(value, ready_from_revents(c.result));
                }
            }
            KIND_TUN => {
                if !cqueue::more(c.flags) {
                    self.tun_armed = false;
                }
                if c.result >= 0 {
                    self.tun_ready = true;
                }
            }
            KIND_ANSWER_BELL => {
                let current = self.answer_bell.is_some_and(|(_, epoch)| epoch == value);
                if current && !cqueue::more(c.flags) {
                    self.answer_bell_armed = false;
                }
                if current && c.result >= 0 {
                    h.on_wake(Wake::Answers);
                }
            }
            KIND_TIMER if self.timer.is_some_and(|(generation, _)| generation == value) => self.timer = None,
            _ => {} // cancellations
        }
    }

    fn quic_received<H: Handler>(&mut self, h: &mut H, c: Cqe) {
        if !cqueue::more(c.flags) {
            self.quic_armed = false;
        }
        let Some(bid) = self.quic_bufs.take(c.flags) else {
            if c.result == -libc::ENOBUFS {
                self.stats.recv_no_buffers += 1;
            } else if c.result < 0 {
                debug!("QUIC receive: {}", io::Error::from_raw_os_error(-c.result));
            }
            return;
        };
        let len = c.result.max(0) as usize;
        let header = self.quic_recv.header_len();
        let parsed = self.quic_bufs.buffer(bid, len).map(|buf| {
            self.quic_recv
                .parse(buf)
                .map(|m| (m.from, m.segment_size, m.payload.len(), m.truncated, m.segments()))
        });
        match parsed {
            Some(Ok((Some(from), segment_size, payload_len, false, segments))) => {
                self.stats.quic_receives += 1;
                self.stats.quic_packets_in += segments as u64;
                if let Some(buf) = self.quic_bufs.buffer_mut(bid, len) {
                    h.on_quic(&mut buf[header..header + payload_len], segment_size, from);
                }
            }
            Some(Ok((_, _, _, true, _))) => self.stats.recv_truncated += 1,
            _ => debug!("unparsable QUIC receive completion"),
        }
        self.quic_bufs.recycle(bid);
    }

    fn target_received<H: Handler>(&mut self, h: &mut H, key: TargetKey, c: Cqe) {
        if !cqueue::more(c.flags)
            && let Some(t) = self.targets.get_mut(&key)
        {
            t.armed = false;
            if !t.paused {
                self.rearm.push(key);
            }
        }
        let Some(bid) = self.target_bufs.take(c.flags) else {
            if c.result == -libc::ENOBUFS {
                self.stats.recv_no_buffers += 1;
            }
            // ECONNREFUSED and the like after an ICMP error: the target is
            // unreachable (RFC 9298 section 3.1 closes the tunnel). Others
            // (ECANCELED after a close): nothing to deliver.
            if c.result < 0 && super::is_unreachable(-c.result) && self.targets.contains_key(&key) {
                h.on_target_unreachable(key, -c.result);
            }
            return;
        };
        let len = c.result.max(0) as usize;
        let template = match self.targets.get(&key) {
            Some(t) if t.connected => Some(&self.target_recv),
            Some(_) => Some(&self.bound_recv),
            None => None,
        };
        if let Some(template) = template
            && let Some(Ok(m)) = self.target_bufs.buffer(bid, len).map(|b| template.parse(b))
        {
            if m.truncated {
                self.stats.recv_truncated += 1;
            } else {
                self.stats.target_receives += 1;
                self.stats.target_packets_in += m.segments() as u64;
                h.on_target(key, m.from, m.payload, m.segment_size);
            }
        }
        self.target_bufs.recycle(bid);
    }

    /// A send completed: account it and free its slot.
    fn sent(&mut self, id: SlotId, result: i32) {
        let Some(prepared) = self.slots.prepared(id) else { return };
        let kind = self.slot_kind.get(id.0 as usize).copied().unwrap_or(SendKind::Quic);
        let segments = prepared.segments as u64;
        let (sent, dropped, bytes) = match self.slots.outcome(id, result) {
            SendOutcome::Sent(n) => (segments, 0, n as u64),
            SendOutcome::GsoRefused => {
                // quinn-udp's rule: the device cannot segment. Never again;
                // resend this batch one datagram at a time.
                GSO_ENABLED.store(false, Ordering::Relaxed);
                warn!("the network device refused GSO; sending datagrams one by one from now on");
                self.resend_singly(id, kind)
            }
            SendOutcome::Dropped(errno) => {
                if let SendKind::Target(key) = kind
                    && super::is_unreachable(errno)
                {
                    self.unreachable.push((key, errno));
                }
                (0, segments, 0)
            }
            SendOutcome::Failed(errno) => {
                debug!("send failed: {}", io::Error::from_raw_os_error(errno));
                (0, segments, 0)
            }
        };
        match kind {
            SendKind::Quic => {
                self.stats.quic_sends += 1;
                self.stats.quic_packets_out += sent;
                self.stats.quic_send_drops += dropped;
            }
            SendKind::Target(_) => {
                self.stats.target_sends += 1;
                self.stats.datagrams_up += sent;
                self.stats.bytes_up += bytes;
                self.stats.drop_target_send += dropped;
            }
        }
        self.slots.release(id);
    }

    /// Resends a refused GSO batch synchronously, one datagram per call
    /// (a rare path: once per process at most).
    fn resend_singly(&mut self, id: SlotId, kind: SendKind) -> (u64, u64, u64) {
        let (Some(data), Some(p)) = (self.slots.data(id), self.slots.prepared(id)) else { return (0, 0, 0) };
        let report = match kind {
            SendKind::Quic => {
                let to = p.dest.map(socket2::SockAddr::from);
                mmsg::send_singly(&self.socket, data, p.segment_size, to.as_ref())
            }
            SendKind::Target(key) => match self.targets.get(&key) {
                Some(t) => {
                    let to = p.dest.map(socket2::SockAddr::from);
                    mmsg::send_singly(&t.sock, data, p.segment_size, to.as_ref())
                }
                None => {
                    mmsg::SendReport { syscalls: 0, sent: 0, dropped: p.segments as u64, last_errno: None }
                }
            },
        };
        self.stats.syscalls += report.syscalls;
        let bytes = (report.sent as usize * p.segment_size).min(data.len()) as u64;
        (report.sent, report.dropped, bytes)
    }

    /// A free send slot, waiting for completions if all are in flight.
    fn acquire_slot(&mut self) -> Option<SlotId> {
        for _ in 0..64 {
            if let Some(id) = self.slots.acquire() {
                return Some(id);
            }
            // Wait for at least one completion; sends are freed at once,
            // the rest are handled next turn.
            self.stats.syscalls += 1;
            let _ = self.ring.submit_and_wait(1);
            self.complete_sends(true);
        }
        None
    }

    /// Takes every completion now in the queue: send completions free their
    /// slots at once; the others are kept for the next turn when `defer`,
    /// else dropped (the last turn).
    fn complete_sends(&mut self, defer: bool) {
        let cq: Vec<Cqe> = self
            .ring
            .completion()
            .map(|c| Cqe { user_data: c.user_data(), result: c.result(), flags: c.flags() })
            .collect();
        for c in cq {
            if c.user_data >> KIND_SHIFT == KIND_SEND {
                self.sent(SlotId((c.user_data & VALUE_MASK) as u32), c.result);
            } else if defer {
                self.deferred.push_back(c);
            }
        }
    }

    /// Queues one batch (its buffer is swapped into a slot: no copy).
    fn queue_send(&mut self, out: &mut Output, send: Send) -> bool {
        let Some(id) = self.acquire_slot() else {
            out.recycle(send.buf);
            return false;
        };
        let mut buf = send.buf;
        if let Some(slot_buf) = self.slots.buffer(id) {
            std::mem::swap(slot_buf, &mut buf);
        }
        out.recycle(buf);
        let segment = if send.segments > 1 { send.segment_size } else { 0 };
        match self.slots.prepare(id, send.fd, send.dest, segment, user_data(KIND_SEND, u64::from(id.0))) {
            Ok(entry) => {
                self.slot_kind[id.0 as usize] = send.kind;
                self.push(entry);
                true
            }
            Err(e) => {
                debug!("send not prepared: {e}");
                self.slots.release(id);
                false
            }
        }
    }

    /// Queues the core's output: new targets, target batches, QUIC
    /// batches, closed targets, in that order.
    fn perform(&mut self, out: &mut Output) {
        if let Some((dev, _)) = self.tun.as_ref() {
            super::tun::write(dev, &mut out.tun, &mut self.stats);
        }
        for e in out.opens.drain(..) {
            if let Err(err) = e.sock.set_nonblocking(true) {
                warn!("target socket: {err}");
            }
            self.targets
                .insert(e.key, Target { sock: e.sock, connected: e.connected, armed: false, paused: false });
            self.rearm.push(e.key);
        }
        // Watches first: a descriptor watched and forgotten in one turn is
        // then never armed.
        for w in out.watches.drain(..) {
            let mut mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
            if w.writable {
                mask |= libc::POLLOUT as u32;
            }
            self.watched.insert(w.key, (w.fd, mask, false));
        }
        for (key, _) in out.unwatches.drain(..) {
            if let Some((_, _, true)) = self.watched.remove(&key) {
                let cancel = opcode::AsyncCancel::new(user_data(KIND_WATCH, key))
                    .build()
                    .user_data(user_data(KIND_CANCEL, 0));
                self.push(cancel);
            }
        }
        for send in std::mem::take(&mut out.up) {
            let Some(fd) = self.targets.get(&send.key).map(|t| t.sock.as_raw_fd()) else {
                self.stats.drop_target_send += send.segments as u64;
                out.recycle(send.buf);
                continue;
            };
            let segments = send.segments;
            let kind = SendKind::Target(send.key);
            let send =
                Send { buf: send.buf, fd, dest: send.to, segment_size: send.segment_size, segments, kind };
            if !self.queue_send(out, send) {
                self.stats.drop_target_send += segments as u64;
            }
        }
        out.finish_quic();
        let fd = self.socket.as_raw_fd();
        for q in std::mem::take(&mut out.quic) {
            let segments = q.segments;
            let send = Send {
                buf: q.buf,
                fd,
                dest: Some(q.to),
                segment_size: q.segment_size,
                segments,
                kind: SendKind::Quic,
            };
            if !self.queue_send(out, send) {
                self.stats.quic_send_drops += segments as u64;
            }
        }
        // A receive cancelled here still delivers what it had posted; the
        // final completion then leaves it unarmed until resumed.
        for key in out.pauses.drain(..) {
            let Some(t) = self.targets.get_mut(&key).filter(|t| !t.paused) else { continue };
            t.paused = true;
            if t.armed {
                let cancel = opcode::AsyncCancel::new(user_data(KIND_TARGET_RECV, key))
                    .build()
                    .user_data(user_data(KIND_CANCEL, 0));
                self.push(cancel);
            }
        }
        for key in out.resumes.drain(..) {
            let Some(t) = self.targets.get_mut(&key).filter(|t| t.paused) else { continue };
            t.paused = false;
            if !t.armed {
                self.rearm.push(key);
            }
        }
        for key in out.closes.drain(..) {
            let Some(t) = self.targets.remove(&key) else { continue };
            if t.armed {
                let cancel = opcode::AsyncCancel::new(user_data(KIND_TARGET_RECV, key))
                    .build()
                    .user_data(user_data(KIND_CANCEL, 0));
                self.push(cancel);
            }
            self.closing.push(t.sock);
        }
    }

    /// Closes the target sockets whose cancellation has been submitted.
    fn drop_closed(&mut self) {
        self.closing.clear();
    }

    /// The last turn: submit what is queued and give the final sends a
    /// bounded time to complete.
    fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let _ = self.ring.submit();
        while self.slots.in_flight() > 0 && Instant::now() < deadline {
            let now = Instant::now();
            let _ = self.enter(now, now + Duration::from_millis(50));
            self.complete_sends(false);
        }
        self.closing.clear();
    }
}

/// What a poll completion's event mask says a watched descriptor is ready
/// for (errors and hang-ups wake both directions, so the core sees them).
fn ready_from_revents(revents: i32) -> Ready {
    let has = |bits: i16| revents & i32::from(bits) != 0;
    let failed = has(libc::POLLERR | libc::POLLHUP);
    Ready { readable: failed || has(libc::POLLIN | libc::POLLRDHUP), writable: failed || has(libc::POLLOUT) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::busy_core::{BusyCore, TestBells};

    fn under_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
    }

    /// A backend on a fresh loopback socket, or `None` (a skip, never under
    /// CI) where io_uring (or, with `batching`, its batched waits) is
    /// missing.
    fn backend(settings: UringSettings) -> Option<UringBackend> {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        match UringBackend::new(sock, settings) {
            Ok(b) if settings.wait_batching.is_some() && b.batcher.is_none() => {
                assert!(!under_ci(), "CI must run the batched-wait tests (Linux 6.12 or later)");
                eprintln!("batched io_uring waits not available here: skipped");
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                // Under CI a missing io_uring is a failure, never a silent
                // skip (as relay-udp's io_uring tests do).
                assert!(!under_ci(), "CI must run the io_uring backend's tests: {e}");
                eprintln!("io_uring not available here ({e}): skipped");
                None
            }
        }
    }

    /// A core that counts the QUIC datagrams each turn received and stops
    /// once it has seen `expect` of them; its turns wait up to a minute.
    struct CountingCore {
        out: Output,
        bells: TestBells,
        now: Instant,
        expect: usize,
        /// Datagrams received in each turn so far.
        per_turn: Vec<usize>,
    }

    impl CountingCore {
        fn new(expect: usize) -> Self {
            Self {
                out: Output::new(),
                bells: TestBells::new(),
                now: Instant::now(),
                expect,
                per_turn: Vec::new(),
            }
        }

        fn seen(&self) -> usize {
            self.per_turn.iter().sum()
        }
    }

    impl Handler for CountingCore {
        fn begin_turn(&mut self, now: Instant) {
            self.now = now;
            self.per_turn.push(0);
        }
        fn on_quic(&mut self, packets: &mut [u8], segment_size: usize, _: SocketAddr) {
            let n = packets.len().div_ceil(segment_size.max(1));
            *self.per_turn.last_mut().expect("in a turn") += n;
        }
        fn on_target(&mut self, _: TargetKey, _: Option<SocketAddr>, _: &[u8], _: usize) {}
        fn on_wake(&mut self, _: Wake) {}
        fn end_turn(&mut self) -> Turn {
            if self.seen() >= self.expect || self.per_turn.len() >= 50 {
                return Turn::Stop;
            }
            Turn::Continue { deadline: self.now + Duration::from_secs(60) }
        }
        fn output(&mut self) -> &mut Output {
            &mut self.out
        }
        fn answer_bell(&self) -> (RawFd, u64) {
            self.bells.answer()
        }
        fn worker_bell(&self) -> RawFd {
            self.bells.worker()
        }
    }

    /// Sends `count` datagrams to `to`, `gap` apart, after `first`.
    fn send_spaced(
        to: SocketAddr,
        count: usize,
        first: Duration,
        gap: Duration,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
            std::thread::sleep(first);
            for i in 0..count {
                if i > 0 {
                    std::thread::sleep(gap);
                }
                sock.send_to(&[i as u8; 100], to).expect("send");
            }
        })
    }

    #[test]
    fn batching_is_on_for_dense_light_loads_only() {
        let us = Duration::from_micros;
        let mut b = WaitBatcher::new(WaitBatching { completions: 32, window: us(500) });
        assert!(b.next, "a fresh worker batches its first wait");
        // Paced load: short turns, each batched wait ended by its window.
        for _ in 0..50 {
            b.after_cycle(us(60), us(580), us(520));
            assert!(b.next);
        }
        // Nothing for two windows: too sparse to gather, off at once...
        b.after_cycle(us(60), us(1060), us(1000));
        assert!(!b.next);
        // ...and on again when work comes soon after a turn.
        b.after_cycle(us(60), us(360), us(300));
        assert!(b.next);
        // Between the limits: kept on (batched, 40% busy)...
        for _ in 0..50 {
            b.after_cycle(us(400), us(1000), us(600));
            assert!(b.next);
        }
        // ...turned on from unbatched at 60% busy (sparse until now, then
        // a short wait)...
        for _ in 0..50 {
            b.after_cycle(us(1320), us(2200), us(1000));
            assert!(!b.next);
        }
        b.after_cycle(us(60), us(100), us(40));
        assert!(b.next, "load {}", b.load);
        // ...and off again if batched it stays above one half.
        b.after_cycle(us(600), us(1000), us(500));
        assert!(!b.next, "load {}", b.load);
        b.after_cycle(us(60), us(100), us(40));
        assert!(b.next);
        // A worker busy most of the time (here its CPU time is mostly in the
        // kernel during the enter, so its waits look long) stops batching
        // within a few cycles...
        let mut cycles = 0;
        while b.next {
            b.after_cycle(us(900), us(1000), us(600));
            cycles += 1;
            assert!(cycles < 20, "still batching at 90% load");
        }
        // ...and does not start again while it stays busy, nor when its
        // turns go on without waiting.
        for _ in 0..50 {
            b.after_cycle(us(900), us(1000), us(100));
            b.after_cycle(us(200), us(200), Duration::ZERO);
            assert!(!b.next);
        }
        // Load falls: batching comes back.
        for _ in 0..50 {
            b.after_cycle(us(60), us(580), us(520));
        }
        assert!(b.next);
    }

    #[test]
    fn the_thread_cpu_clock_advances_with_work() {
        // Spin (bounded by the wall clock, so a broken clock fails rather
        // than hangs); the thread's CPU clock must have moved.
        let (before, start) = (thread_cpu_time(), Instant::now());
        let mut x = 0u64;
        while thread_cpu_time() == before && start.elapsed() < Duration::from_secs(5) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(thread_cpu_time() > before, "the thread CPU clock did not move ({x})");
    }

    #[test]
    fn batched_wait_takes_datagrams_arriving_within_the_window_in_one_turn() {
        // Three datagrams 30 ms apart, all well inside the window, are one
        // turn's work, where an unbatched wait returns for the first. (The
        // count cannot end this wait: a socket's receives that arrive while
        // the worker sleeps are one piece of deferred task work, which the
        // kernel counts once.)
        let batching = WaitBatching { completions: 3, window: Duration::from_secs(3) };
        let Some(mut backend) =
            backend(UringSettings { wait_batching: Some(batching), ..Default::default() })
        else {
            return;
        };
        let to = backend.socket.local_addr().expect("addr");
        let mut core = CountingCore::new(3);
        let sender = send_spaced(to, 3, Duration::from_millis(100), Duration::from_millis(30));
        backend.run(&mut core).expect("loop");
        sender.join().expect("sender");
        assert_eq!(core.seen(), 3, "turns: {:?}", core.per_turn);
        // Turn 1 did not wait (the loop's first turn arms the receives).
        assert_eq!(core.per_turn.iter().filter(|&&n| n > 0).count(), 1, "turns: {:?}", core.per_turn);
        assert_eq!(core.out.stats.waits_batched, 1);
    }

    #[test]
    fn batched_wait_past_its_window_sleeps_until_the_first_completion() {
        // The window passes with nothing arrived: the worker keeps sleeping
        // (no empty turn at the window's end) and the first datagram ends
        // the wait at once, without waiting for the other completions.
        let batching = WaitBatching { completions: 8, window: Duration::from_millis(10) };
        let Some(mut backend) =
            backend(UringSettings { wait_batching: Some(batching), ..Default::default() })
        else {
            return;
        };
        let to = backend.socket.local_addr().expect("addr");
        let mut core = CountingCore::new(1);
        let sender = send_spaced(to, 1, Duration::from_millis(300), Duration::ZERO);
        backend.run(&mut core).expect("loop");
        sender.join().expect("sender");
        assert_eq!(core.per_turn, vec![0, 1], "one empty first turn, then the datagram's");
        assert_eq!(core.out.stats.waits_batched, 1);
    }

    #[test]
    fn busy_turns_still_deliver_readiness() {
        let Some(mut backend) = backend(UringSettings::default()) else {
            return;
        };
        let mut core = BusyCore::new();
        backend.run(&mut core).expect("loop");
        // Written at the end of turn 3: the next turn's enter runs the
        // poll's task work, so the turn after sees it at the latest.
        core.assert_readied_within(5);
    }

    #[test]
    fn a_paused_target_is_not_read_until_resumed() {
        let Some(mut backend) = backend(UringSettings::default()) else {
            return;
        };
        let mut core = crate::io::pause_core::PauseCore::new();
        backend.run(&mut core).expect("loop");
        core.assert_paused_then_resumed();
    }
}

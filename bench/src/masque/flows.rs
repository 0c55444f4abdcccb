//! UDP flows: each key (a local peer for the forwarder, a destination for
//! a SOCKS UDP association) gets its own connect-udp tunnel, opened at its
//! first datagram, ended after an idle period. The table is bounded:
//! datagrams for a new key past the bound are dropped (and counted).

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::HostPort;
use super::transport::{Kind, OpenError, Transport};

/// Datagrams queued for a flow while its tunnel opens (then dropped).
const FLOW_QUEUE: usize = 64;

/// How a flow ended.
#[derive(Debug)]
pub enum FlowEnd {
    /// No datagram either way for the idle timeout.
    Idle,
    /// The relay ended the tunnel.
    RelayEnded,
    /// The tunnel could not be opened.
    Open(OpenError),
}

/// Carries datagrams between a local endpoint and `target` through one
/// tunnel until `idle` passes without traffic, the relay ends the tunnel
/// or `up` closes. Datagrams from the relay go to `deliver`.
pub async fn run_flow(
    transport: &Transport,
    target: &HostPort,
    mut up: mpsc::Receiver<Vec<u8>>,
    idle: Duration,
    mut deliver: impl FnMut(Vec<u8>),
) -> FlowEnd {
    let mut tunnel = match transport.open(Kind::Udp, target).await {
        Ok(t) => t,
        Err(e) => return FlowEnd::Open(e),
    };
    enum Event {
        Up(Option<Vec<u8>>),
        Down(Option<Vec<u8>>),
    }
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(d) = up.poll_recv(cx) {
                return Poll::Ready(Event::Up(d));
            }
            tunnel.poll_recv(cx).map(Event::Down)
        });
        match tokio::time::timeout(idle, event).await {
            Err(_) | Ok(Event::Up(None)) => return FlowEnd::Idle,
            Ok(Event::Up(Some(d))) => {
                // A full queue drops the datagram.
                tunnel.tx.try_send(d);
            }
            Ok(Event::Down(Some(d))) => deliver(d),
            Ok(Event::Down(None)) => return FlowEnd::RelayEnded,
        }
    }
}

struct Entry {
    tx: mpsc::Sender<Vec<u8>>,
    generation: u64,
    task: AbortHandle,
}

/// What [`FlowTable::route`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Queued on the key's flow.
    Queued,
    /// A new flow was started for the key.
    Started,
    /// Dropped: the flow's queue is full.
    QueueFull,
    /// Dropped: the table is full.
    TableFull,
}

/// The live flows by key, at most `max`. Dropping the table ends them all.
pub struct FlowTable<K> {
    flows: Arc<Mutex<HashMap<K, Entry>>>,
    max: usize,
    generation: u64,
    /// Datagrams dropped because the table or a flow's queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl<K: Hash + Eq + Clone + Display + Send + 'static> FlowTable<K> {
    /// An empty table of at most `max` flows.
    pub fn new(max: usize) -> Self {
        Self { flows: Arc::default(), max, generation: 0, dropped: Arc::default() }
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.flows.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Whether no flow is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `datagram` on `key`'s flow, starting one with `start` (given
    /// the flow's queue; its future is the flow) when there is none.
    pub fn route<F>(
        &mut self,
        key: K,
        datagram: Vec<u8>,
        start: impl FnOnce(mpsc::Receiver<Vec<u8>>) -> F,
    ) -> Routed
    where
        F: Future<Output = FlowEnd> + Send + 'static,
    {
        let Ok(mut flows) = self.flows.lock() else { return Routed::TableFull };
        if let Some(e) = flows.get(&key) {
            if e.tx.try_send(datagram).is_ok() {
                return Routed::Queued;
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Routed::QueueFull;
        }
        if flows.len() >= self.max {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Routed::TableFull;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(datagram);
        self.generation += 1;
        let generation = self.generation;
        let fut = start(rx);
        let table = self.flows.clone();
        let name = key.clone();
        let task = tokio::spawn(async move {
            match fut.await {
                FlowEnd::Idle => tracing::info!("flow {name}: idle, tunnel closed"),
                FlowEnd::RelayEnded => tracing::warn!("flow {name}: the relay ended the tunnel"),
                FlowEnd::Open(e) => tracing::warn!("flow {name}: tunnel not opened: {e}"),
            }
            if let Ok(mut flows) = table.lock()
                && flows.get(&name).is_some_and(|e| e.generation == generation)
            {
                flows.remove(&name);
            }
        });
        flows.insert(key, Entry { tx, generation, task: task.abort_handle() });
        Routed::Started
    }
}

impl<K> Drop for FlowTable<K> {
    fn drop(&mut self) {
        if let Ok(flows) = self.flows.lock() {
            for e in flows.values() {
                e.task.abort();
            }
        }
    }
}

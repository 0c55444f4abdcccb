//! DNS resolution off the hot path: a small pool of threads running the
//! system resolver (getaddrinfo), with a bounded queue. Results come back
//! through a channel and a wake-up callback; the caller enforces timeouts.
#![forbid(unsafe_code)]

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::acl::special_name;
use crate::policy::ResolveFailure;

/// A resolution request.
#[derive(Debug)]
struct Job {
    id: u64,
    name: String,
}

/// A finished resolution.
#[derive(Debug)]
pub struct Resolved {
    /// The job ID given to [`Resolver::submit`].
    pub id: u64,
    /// Addresses, in resolver order, or why there are none.
    pub result: Result<Vec<IpAddr>, ResolveFailure>,
}

/// The resolver pool.
pub struct Resolver {
    jobs: SyncSender<Job>,
}

/// Resolves one name with the system resolver, honouring RFC 6761 names.
pub fn resolve_blocking(name: &str) -> Result<Vec<IpAddr>, ResolveFailure> {
    if let Some(special) = special_name(name) {
        return special.map_err(|()| ResolveFailure::NotFound("special-use name".into()));
    }
    match (name, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let mut out: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !out.contains(&a.ip()) {
                    out.push(a.ip());
                }
            }
            if out.is_empty() { Err(ResolveFailure::NotFound("no addresses".into())) } else { Ok(out) }
        }
        Err(e) => Err(ResolveFailure::NotFound(e.to_string())),
    }
}

impl Resolver {
    /// Starts `threads` resolver threads with room for `max_pending` queued
    /// jobs. `wake` is called after each result is sent.
    pub fn start(
        threads: u32,
        max_pending: u32,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<(Self, Receiver<Resolved>)> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(max_pending as usize);
        let (done_tx, done_rx) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let wake = Arc::new(wake);
        for i in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let wake = wake.clone();
            std::thread::Builder::new().name(format!("resolver-{i}")).spawn(move || {
                loop {
                    let job = {
                        let rx = job_rx.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    let Ok(job) = job else { return };
                    let result = resolve_blocking(&job.name);
                    if done_tx.send(Resolved { id: job.id, result }).is_err() {
                        return;
                    }
                    wake();
                }
            })?;
        }
        Ok((Self { jobs }, done_rx))
    }

    /// Queues a resolution; `Err(Busy)` if the queue is full.
    pub fn submit(&self, id: u64, name: String) -> Result<(), ResolveFailure> {
        match self.jobs.try_send(Job { id, name }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(ResolveFailure::Busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn resolves_special_names_without_dns() {
        assert!(resolve_blocking("localhost").unwrap().iter().all(|a| a.is_loopback()));
        assert!(matches!(resolve_blocking("x.invalid"), Err(ResolveFailure::NotFound(_))));
    }

    #[test]
    fn pool_answers_and_bounds_its_queue() {
        let (r, rx) = Resolver::start(1, 1, || {}).unwrap();
        r.submit(1, "localhost".into()).unwrap();
        let done = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(done.id, 1);
        assert!(done.result.is_ok());
        // Flood: with one slot, some submissions must be refused as Busy.
        let refused = (0..1000).filter(|i| r.submit(*i, "x.invalid".into()).is_err()).count();
        assert!(refused > 0);
    }
}

//! The admin socket: one JSON request line in, one JSON response line out.
//!
//! Requests are `{"cmd":"status"}`, `{"cmd":"flows"}`, `{"cmd":"drain"}`,
//! `{"cmd":"kill_flow","flow_id":N}`, `{"cmd":"reload"}` (certificate and
//! key from their files), `{"cmd":"tickets_rotate"}`, the token commands (`token_mint`,
//! `token_add`, `token_remove`, `token_revoke`, `token_unrevoke`,
//! `token_list`) and the policy commands (`policy_show`, `policy_set`,
//! `policy_reset`), `qlog_start` and `qlog_stop`; see [`AdminRequest`].
//! Errors come back as
//! `{"error":"..."}`.
//!
//! The socket is created with mode 0600, and every connection's peer
//! credentials (SO_PEERCRED) are checked as well: only root and the user
//! control runs as may talk to it, whatever the socket's mode or directory
//! later become. Changes to tokens, revocations and quotas are persisted
//! ([`crate::store`]) before they take effect, and apply to new CONNECTs;
//! open tunnels are not touched. In fleet mode they go through the fleet's
//! store ([`crate::fleet`]) and reach every host; so does `tickets_rotate`,
//! and `fleet_status` reports the fleet.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::{MAX_QLOG_SECONDS, QlogCommand, QlogStart, QlogTarget};
use relay_proto::channel::record::MAX_CONNS_LISTED;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::auth::{SecretString, TokenSelector};
use crate::credentials::Credentials;
use crate::fleet::Fleet;
use crate::policy::Policy;
use crate::qlog::QlogSettings;
use crate::quota::QuotaConfig;
use crate::server::{ConnListing, Shared};
use crate::store::{PolicyStore, RuntimeState};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// An admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Process and dataplane status with per-worker counters.
    Status,
    /// Live flows.
    Flows,
    /// Drain the dataplane gracefully (GOAWAY, finish tunnels, exit).
    Drain,
    /// End one flow's tunnel now.
    KillFlow {
        /// The flow ID (from `flows`).
        flow_id: u64,
    },
    /// Mint an HMAC token (control signs; the caller never sees a key).
    TokenMint {
        /// The token's subject.
        subject: String,
        /// Lifetime in seconds.
        ttl_secs: u64,
        /// Key to sign with (default: the first configured key).
        #[serde(default)]
        key_id: Option<String>,
    },
    /// Accept a static token from now on (persisted as a digest).
    TokenAdd {
        /// The token.
        token: SecretString,
    },
    /// Stop accepting a static token added at run time.
    TokenRemove {
        /// The token itself...
        #[serde(default)]
        token: Option<SecretString>,
        /// ...or its fingerprint.
        #[serde(default)]
        fingerprint: Option<String>,
    },
    /// Revoke every HMAC token of a subject, or one exact token.
    TokenRevoke {
        /// A subject...
        #[serde(default)]
        subject: Option<String>,
        /// ...or a token (static or HMAC).
        #[serde(default)]
        token: Option<SecretString>,
    },
    /// Lift a revocation.
    TokenUnrevoke {
        /// A subject...
        #[serde(default)]
        subject: Option<String>,
        /// ...or a token...
        #[serde(default)]
        token: Option<SecretString>,
        /// ...or a revoked token's fingerprint.
        #[serde(default)]
        fingerprint: Option<String>,
    },
    /// Static tokens (fingerprints only), HMAC key IDs, revocations.
    TokenList,
    /// Reload the TLS certificate chain and key from their files; new
    /// connections get the new certificate once every worker has it.
    Reload,
    /// Rotate the session ticket keys now (tickets sealed with the
    /// previous key still resume, older ones do not).
    TicketsRotate,
    /// The dataplane's QUIC connections (each worker lists at most
    /// `limit`, default 1000).
    Conns {
        /// Most connections per worker.
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The policy in force: ACL, quotas, protocols, token summary.
    PolicyShow,
    /// Set quota keys at run time (they win over the config file).
    PolicySet {
        /// `per_identity.max_flows` -> value, ...
        set: BTreeMap<String, u64>,
    },
    /// Drop run-time quota overrides (all of them when `keys` is empty).
    PolicyReset {
        /// Keys to reset.
        #[serde(default)]
        keys: Vec<String>,
    },
    /// One identity's quota usage as this host sees it: its own open flows
    /// and, with fleet-wide identity quotas, the other hosts' usage as last
    /// read from the store (what admission adds up).
    QuotaUsage {
        /// The identity: `sub:<subject>` or `tok:<fingerprint>` (as in
        /// `flows`).
        identity: String,
    },
    /// Fleet mode: the fleet, this host, the hosts seen, the store.
    FleetStatus,
    /// Write qlog of one open QUIC connection (`worker` and `conn_id`, as
    /// `conns` lists them), or of a client's connections (`client`: an IP
    /// address, or IP:PORT), open ones and new ones for `seconds`.
    QlogStart {
        /// The worker of `conn_id`.
        #[serde(default)]
        worker: Option<u32>,
        /// The connection.
        #[serde(default)]
        conn_id: Option<u64>,
        /// The client address.
        #[serde(default)]
        client: Option<String>,
        /// The window for new connections (default `qlog.default_seconds`).
        #[serde(default)]
        seconds: Option<u32>,
    },
    /// Stop writing qlog.
    QlogStop,
}

/// Parses a duration such as `90`, `90s`, `15m`, `12h` or `7d` into
/// seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 =
        digits.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 15m, 1h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("duration {s:?} is too long"))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn error(message: impl std::fmt::Display) -> Value {
    json!({ "error": message.to_string() })
}

/// Builds the response to a status/flows/drain/kill request from the
/// shared state; `None` for the token and policy requests.
pub fn respond(req: &AdminRequest, shared: &mut Shared) -> Option<Value> {
    Some(match req {
        AdminRequest::KillFlow { flow_id } => {
            let Some(worker) = shared.flows.get(flow_id).map(|f| f.worker) else {
                return Some(error(format!("no live flow {flow_id}")));
            };
            shared.kill_requests.push((worker, *flow_id));
            json!({ "killed": flow_id, "worker": worker })
        }
        AdminRequest::Drain => {
            if shared.dataplane_pid.is_none() {
                return Some(error("no dataplane is attached"));
            }
            shared.drain_requested = true;
            json!({ "draining": true, "dataplane_pid": shared.dataplane_pid, "flows": shared.flows.len() })
        }
        AdminRequest::Status => {
            let workers: Vec<Value> = match &shared.region {
                None => vec![],
                Some(region) => (0..region.workers())
                    .map(|w| {
                        let c = region.counters(w);
                        let mut m = serde_json::Map::new();
                        m.insert("worker".into(), json!(w));
                        for counter in Counter::ALL {
                            m.insert(counter.name().into(), json!(c.get(*counter)));
                        }
                        Value::Object(m)
                    })
                    .collect(),
            };
            json!({
                "control_pid": std::process::id(),
                "dataplane_attached": shared.dataplane_pid.is_some(),
                "dataplane_pid": shared.dataplane_pid,
                "flows": shared.flows.len(),
                "asks_allowed": shared.asks_allowed,
                "asks_denied": shared.asks_denied,
                "channel_errors": shared.channel_errors,
                "signatures": shared.signatures,
                "signatures_failed": shared.signatures_failed,
                "metrics": shared.metrics_addr.map(|a| a.to_string()),
                "workers": workers,
            })
        }
        AdminRequest::Flows => {
            let mut flows: Vec<_> = shared.flows.values().cloned().collect();
            flows.sort_by_key(|f| f.flow_id);
            json!({ "flows": flows })
        }
        _ => return None,
    })
}

fn selector(token: &Option<SecretString>, fingerprint: &Option<String>) -> Result<TokenSelector, String> {
    match (token, fingerprint) {
        (Some(t), None) => Ok(TokenSelector::Token(t.clone())),
        (None, Some(f)) => Ok(TokenSelector::Fingerprint(f.clone())),
        _ => Err("give exactly one of token or fingerprint".into()),
    }
}

/// What the admin socket serves: the shared status, the policy and where
/// the policy's run-time state is persisted.
#[derive(Debug, Clone)]
pub struct Admin {
    shared: Arc<Mutex<Shared>>,
    policy: Arc<Mutex<Policy>>,
    store: PolicyStore,
    credentials: Option<Arc<Credentials>>,
    fleet: Option<Arc<Fleet>>,
    /// The config file `reload` re-reads `[dataplane.connection_ids]` from,
    /// and the command line's server ID that overrides the file's.
    config_path: Option<(std::path::PathBuf, Option<String>)>,
    /// Where and how `qlog_start` writes.
    qlog: Option<QlogSettings>,
}

/// What the workers reported after a qlog command.
#[derive(Debug, Default)]
struct QlogApplied {
    /// Workers that applied it.
    applied: u32,
    /// All workers.
    workers: u32,
    /// Connections it matched on those workers.
    matched: u64,
}

/// How long `reload` and `tickets_rotate` wait for the dataplane to apply
/// the change before answering.
const APPLY_WAIT: Duration = Duration::from_secs(5);

impl Admin {
    /// An admin endpoint over these.
    pub fn new(shared: Arc<Mutex<Shared>>, policy: Arc<Mutex<Policy>>, store: PolicyStore) -> Self {
        Self { shared, policy, store, credentials: None, fleet: None, config_path: None, qlog: None }
    }

    /// `reload` also re-reads `[dataplane.connection_ids]` from `path`: a
    /// new QUIC-LB configuration rotates the dataplane's connection IDs.
    pub fn with_config_path(mut self, path: std::path::PathBuf, server_id: Option<String>) -> Self {
        self.config_path = Some((path, server_id));
        self
    }

    /// Serves `qlog_start` and `qlog_stop` with these settings.
    pub fn with_qlog(mut self, settings: QlogSettings) -> Self {
        self.qlog = Some(settings);
        self
    }

    /// Fleet mode: changes go through the fleet's store.
    pub fn with_fleet(mut self, fleet: Arc<Fleet>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Serves `reload` and the TLS part of `status` from `credentials`.
    pub fn with_credentials(mut self, credentials: Arc<Credentials>) -> Self {
        self.credentials = Some(credentials);
        self
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TLS credentials and session ticket state, for `status`.
    fn tls_status(&self) -> Value {
        let Some(creds) = &self.credentials else { return Value::Null };
        let s = self.shared();
        json!({
            "certificate": creds.info(),
            "previous_generation": creds.previous_info().map(|i| i.generation),
            "session_tickets": s.tickets_enabled,
            "ticket_rotations": s.ticket_rotations,
            "updates_sent": s.tls_updates_sent,
        })
    }

    /// Workers serving `generation` for new connections, and all workers
    /// (0, 0 without a dataplane).
    fn workers_serving(&self, generation: u32) -> (u32, u32) {
        let s = self.shared();
        let Some(region) = &s.region else { return (0, 0) };
        let serving = (0..region.workers())
            .filter(|w| region.counters(*w).get(Counter::TlsGeneration) == u64::from(generation))
            .count() as u32;
        (serving, region.workers())
    }

    /// Reloads the certificate and key, has the server send them to the
    /// dataplane, and waits (bounded) until every worker serves them.
    fn reload(&self) -> Value {
        let cids = self.reload_connection_ids();
        let crls = self.reload_crls();
        let mut reply = self.reload_tls();
        if let (Some(cids), Some(obj)) = (cids, reply.as_object_mut()) {
            obj.insert("connection_ids".into(), cids);
        }
        if let (Some(crls), Some(obj)) = (crls, reply.as_object_mut()) {
            obj.insert("crls".into(), crls);
        }
        reply
    }

    /// Re-reads `[auth.mtls] crl_files` (None when mutual TLS is off); a
    /// list that does not load keeps the lists in force and says why.
    fn reload_crls(&self) -> Option<Value> {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut policy = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        let mtls = policy.mtls_mut()?;
        Some(match mtls.reload_crls(now as i64) {
            Ok(summary) => {
                info!(
                    lists = summary.lists,
                    revoked = summary.revoked,
                    stale = summary.stale,
                    "revocation lists reloaded"
                );
                json!(summary)
            }
            Err(e) => {
                warn!("admin: revocation lists not reloaded, the previous ones stay: {e}");
                json!({ "error": e.to_string(), "in_force": mtls.summary() })
            }
        })
    }

    /// Re-reads `[dataplane.connection_ids]`: a changed configuration is
    /// sent to the dataplane (a QUIC-LB rotation). None without a config
    /// file.
    fn reload_connection_ids(&self) -> Option<Value> {
        let (path, server_id) = self.config_path.as_ref()?;
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| {
                crate::config::Config::parse(&text, &path.display().to_string()).map_err(|e| e.to_string())
            })
            .and_then(|c| {
                let mut section = c.dataplane.connection_ids;
                if let Some(id) = server_id {
                    section.server_id = id.clone();
                }
                section.settings()
            });
        let new = match parsed {
            Ok(s) => s,
            Err(e) => {
                warn!("admin: connection ID configuration not reloaded: {e}");
                return Some(json!({ "error": e }));
            }
        };
        let mut s = self.shared();
        let Some(current) = s.cid_settings.clone() else { return Some(json!({ "changed": false })) };
        if current == new {
            return Some(json!({ "changed": false, "config_id": current.config_id }));
        }
        let lengths = (current.layout().map(|l| l.cid_len()), new.layout().map(|l| l.cid_len()));
        if let (Ok(old_len), Ok(new_len)) = lengths
            && old_len != new_len
        {
            return Some(json!({ "error": format!(
                "the new connection IDs would be {new_len} bytes, those in use are {old_len}: keep server_id + nonce_len the same length"
            ) }));
        }
        if new.config_id == current.config_id {
            return Some(json!({ "error": format!(
                "a new QUIC-LB configuration needs another config_id than {} (draft-ietf-quic-load-balancers-21 section 3.1)",
                current.config_id
            ) }));
        }
        info!(
            from = current.config_id,
            to = new.config_id,
            encrypted = new.key.is_some(),
            "QUIC-LB configuration rotated"
        );
        if let Some(f) = &self.fleet {
            f.set_quic_lb_config_id(Some(new.config_id));
        }
        s.cid_settings = Some(new.clone());
        s.cid_update = Some(new.clone());
        s.wake_server();
        Some(json!({ "changed": true, "config_id": new.config_id, "previous_config_id": current.config_id }))
    }

    fn reload_tls(&self) -> Value {
        let Some(creds) = &self.credentials else { return error("no TLS credentials to reload") };
        let info = match creds.reload() {
            Ok(info) => info,
            Err(e) => {
                warn!("admin: certificate reload failed: {e}");
                return error(format!("{e}; still serving generation {}", creds.info().generation));
            }
        };
        info!(generation = info.generation, subject = %info.subject, not_after = %info.not_after, "certificate reloaded");
        {
            let mut s = self.shared();
            s.tls_reloaded = true;
            s.wake_server();
        }
        let deadline = Instant::now() + APPLY_WAIT;
        let (mut serving, mut workers) = self.workers_serving(info.generation);
        while serving < workers && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            (serving, workers) = self.workers_serving(info.generation);
        }
        json!({
            "reloaded": true,
            "certificate": info,
            "previous_generation": creds.previous_info().map(|i| i.generation),
            "workers_serving": serving,
            "workers": workers,
        })
    }

    /// Asks every worker for its connections (through the server loop and
    /// the rings) and waits, bounded, for all of them to answer.
    fn conns(&self, limit: Option<u32>) -> Value {
        let limit = limit.unwrap_or(1000);
        if !(1..=MAX_CONNS_LISTED).contains(&limit) {
            return error(format!("limit must be 1..={MAX_CONNS_LISTED}"));
        }
        let request_id = {
            let mut s = self.shared();
            if s.dataplane_pid.is_none() {
                return error("no dataplane is attached");
            }
            let request_id = s.conn_listing.as_ref().map_or(1, |l| l.request_id + 1);
            s.conn_listing = Some(ConnListing { request_id, limit, ..Default::default() });
            s.wake_server();
            request_id
        };
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let mut s = self.shared();
            let workers = s.region.as_ref().map_or(0, |r| r.workers());
            let done = s
                .conn_listing
                .as_ref()
                .is_some_and(|l| l.request_id == request_id && l.workers_done >= workers);
            if done || Instant::now() >= deadline {
                let mut l = s.conn_listing.clone().unwrap_or_default();
                s.conn_listing = Some(ConnListing { rows: Vec::new(), ..l.clone() });
                drop(s);
                l.rows.sort_by_key(|r| (r.worker, r.conn_id));
                return json!({
                    "complete": done,
                    "workers": workers,
                    "workers_answered": l.workers_done,
                    "total": l.total,
                    "listed": l.rows.len(),
                    "connections": l.rows,
                });
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts qlog: the target checked, the directory made ready for the
    /// dataplane's user and opened, the command sent (through the server
    /// loop) and applied by every worker (bounded wait).
    fn qlog_start(
        &self,
        worker: Option<u32>,
        conn_id: Option<u64>,
        client: Option<&str>,
        seconds: Option<u32>,
    ) -> Value {
        let Some(q) = &self.qlog else { return error("qlog is not available") };
        let target = match (worker, conn_id, client) {
            (Some(worker), Some(conn_id), None) => QlogTarget::Conn { worker, conn_id },
            (None, None, Some(client)) => match crate::qlog::parse_client(client) {
                Ok(t) => t,
                Err(e) => return error(e),
            },
            _ => return error("name one connection (worker and conn_id) or a client address"),
        };
        let seconds = seconds.unwrap_or(q.default_seconds);
        if !(1..=MAX_QLOG_SECONDS).contains(&seconds) {
            return error(format!("seconds must be 1..={MAX_QLOG_SECONDS}"));
        }
        let owner = {
            let s = self.shared();
            if s.dataplane_pid.is_none() {
                return error("no dataplane is attached");
            }
            if !s.dataplane_qlog {
                return error(
                    "the dataplane was built without qlog (relay-dataplane's cargo feature `qlog`)",
                );
            }
            s.dataplane_owner
        };
        // Handed over only when the dataplane runs as another user.
        let owner = owner.filter(|(uid, _)| *uid != own_uid());
        let fd = match crate::qlog::prepare_dir(&q.dir, owner) {
            Ok(fd) => fd,
            Err(e) => return error(e),
        };
        let session = self.next_qlog_session();
        let start = QlogStart {
            session,
            target,
            seconds,
            max_file_bytes: q.max_file_bytes,
            max_files: q.max_files,
            level: q.level,
        };
        if let Err(e) = start.validate() {
            return error(e);
        }
        self.send_qlog(QlogCommand::Start(start), Some(fd));
        let applied = self.wait_qlog(session);
        let connections = applied.matched;
        if applied.applied < applied.workers {
            return error(format!(
                "{} of {} workers applied the qlog start in time; see the dataplane's log",
                applied.applied, applied.workers
            ));
        }
        if let QlogTarget::Conn { worker, conn_id } = target
            && connections == 0
        {
            return error(format!(
                "no QUIC connection {conn_id} on worker {worker} (relayctl conns lists them)"
            ));
        }
        info!(session, ?target, seconds, connections, "qlog started");
        json!({
            "session": session,
            "dir": q.dir.display().to_string(),
            "target": target,
            "seconds": matches!(target, QlogTarget::Client { .. }).then_some(seconds),
            "connections": connections,
            "max_file_bytes": q.max_file_bytes,
            "max_files": q.max_files,
            "workers_applied": applied.applied,
            "workers": applied.workers,
        })
    }

    /// Stops qlog on every worker (bounded wait).
    fn qlog_stop(&self) -> Value {
        if self.shared().dataplane_pid.is_none() {
            return error("no dataplane is attached");
        }
        let session = self.next_qlog_session();
        self.send_qlog(QlogCommand::Stop { session }, None);
        let applied = self.wait_qlog(session);
        info!(session, "qlog stopped");
        json!({
            "stopped": applied.applied == applied.workers,
            "session": session,
            "workers_applied": applied.applied,
            "workers": applied.workers,
        })
    }

    /// A number no earlier qlog command of this control had, and unlikely
    /// one of an earlier control's (the time in milliseconds).
    fn next_qlog_session(&self) -> u64 {
        let mut s = self.shared();
        let now_ms =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        s.qlog_session = now_ms.max(s.qlog_session + 1);
        s.qlog_session
    }

    fn send_qlog(&self, command: QlogCommand, fd: Option<std::os::fd::OwnedFd>) {
        let mut s = self.shared();
        s.qlog_command = Some((command, fd));
        s.wake_server();
    }

    /// Waits (bounded) until every worker reports `session` applied.
    fn wait_qlog(&self, session: u64) -> QlogApplied {
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let done = {
                let s = self.shared();
                let Some(region) = &s.region else { return QlogApplied::default() };
                let workers = region.workers();
                let applied: Vec<u32> = (0..workers)
                    .filter(|w| region.counters(*w).get(Counter::QlogSession) == session)
                    .collect();
                let sum = |c: Counter| applied.iter().map(|w| region.counters(*w).get(c)).sum::<u64>();
                let result = QlogApplied {
                    applied: applied.len() as u32,
                    workers,
                    matched: sum(Counter::QlogMatched),
                };
                (result.applied == workers || Instant::now() >= deadline).then_some(result)
            };
            if let Some(result) = done {
                return result;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Rotates the ticket keys (in the server loop, or fleet-wide in fleet
    /// mode) and waits until the new keys have been sent.
    fn rotate_tickets(&self) -> Value {
        if let Some(fleet) = &self.fleet {
            return self.rotate_fleet_tickets(fleet);
        }
        let before = {
            let mut s = self.shared();
            if !s.tickets_enabled {
                return error("session tickets are off (tls.session_tickets = false)");
            }
            s.rotate_tickets_requested = true;
            s.wake_server();
            s.tls_updates_sent
        };
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let s = self.shared();
            if !s.rotate_tickets_requested && (s.tls_updates_sent > before || s.dataplane_pid.is_none()) {
                return json!({ "rotations": s.ticket_rotations, "sent": s.tls_updates_sent > before });
            }
            drop(s);
            if Instant::now() >= deadline {
                return error("the server loop did not rotate the keys in time");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fleet mode: a new generation for every host, then (bounded) until
    /// this host's server loop has it and has sent it to the dataplane.
    fn rotate_fleet_tickets(&self, fleet: &Fleet) -> Value {
        let before = {
            let s = self.shared();
            if !s.tickets_enabled {
                return error("session tickets are off (tls.session_tickets = false)");
            }
            s.tls_updates_sent
        };
        let generation = match fleet.rotate_tickets() {
            Ok(g) => g,
            Err(e) => return error(e),
        };
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let s = self.shared();
            let installed = s.ticket_generation.is_some_and(|g| g >= generation);
            if installed && (s.tls_updates_sent > before || s.dataplane_pid.is_none()) {
                return json!({
                    "rotations": s.ticket_rotations,
                    "sent": s.tls_updates_sent > before,
                    "fleet_generation": generation,
                });
            }
            drop(s);
            if Instant::now() >= deadline {
                return error(format!(
                    "generation {generation} is the fleet's, but this host's server loop did not send it in time"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn policy(&self) -> MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persists a new run-time state computed from the policy, then
    /// installs it. The state is computed under the policy lock; the file
    /// is written without it (only this thread changes the state). In fleet
    /// mode the fleet applies it through the store.
    fn commit(&self, change: impl Fn(&Policy) -> Result<(RuntimeState, Value), String>) -> Value {
        if let Some(fleet) = &self.fleet {
            return fleet.commit(&change);
        }
        let (state, reply) = match change(&self.policy()) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        if let Err(e) = self.store.save(&state) {
            warn!("admin: {e}");
            return error(format!("{e}; nothing was changed"));
        }
        if let Err(e) = self.policy().install(state) {
            return error(e);
        }
        reply
    }

    /// Handles one request at `now_unix`.
    pub fn handle(&self, req: &AdminRequest, now_unix: u64) -> Value {
        let answered = respond(req, &mut self.shared());
        if let Some(mut v) = answered {
            if *req == AdminRequest::Status {
                v["tls"] = self.tls_status();
                v["fleet"] = self.fleet.as_ref().map_or(Value::Null, |f| f.summary_json());
            }
            return v;
        }
        match req {
            AdminRequest::Reload => self.reload(),
            AdminRequest::Conns { limit } => self.conns(*limit),
            AdminRequest::TicketsRotate => self.rotate_tickets(),
            AdminRequest::QlogStart { worker, conn_id, client, seconds } => {
                self.qlog_start(*worker, *conn_id, client.as_deref(), *seconds)
            }
            AdminRequest::QlogStop => self.qlog_stop(),
            AdminRequest::TokenMint { subject, ttl_secs, key_id } => {
                let p = self.policy();
                if p.auth().state().revoked_subjects.contains_key(subject) {
                    return error(format!(
                        "subject {subject} is revoked; lift it with `relayctl token unrevoke --subject {subject}` first"
                    ));
                }
                match p.auth().keys().mint(key_id.as_deref(), subject, now_unix, *ttl_secs) {
                    Ok(m) => {
                        info!(
                            subject,
                            key = m.claims.key_id,
                            expires = m.claims.expires_unix,
                            "admin: minted a token"
                        );
                        json!({
                            "token": m.token,
                            "subject": m.claims.subject,
                            "key_id": m.claims.key_id,
                            "expires_unix": m.claims.expires_unix,
                        })
                    }
                    Err(e) => error(e),
                }
            }
            AdminRequest::TokenAdd { token } => self.commit(|p| {
                let (auth, digest) =
                    p.auth().add_token(token.expose(), now_unix).map_err(|e| e.to_string())?;
                info!(fingerprint = digest.fingerprint(), "admin: static token added");
                Ok((RuntimeState { auth, ..p.runtime_state() }, json!({ "added": digest.fingerprint() })))
            }),
            AdminRequest::TokenRemove { token, fingerprint } => self.commit(|p| {
                let sel = selector(token, fingerprint)?;
                let (auth, digest) = p.auth().remove_token(&sel).map_err(|e| e.to_string())?;
                info!(fingerprint = digest.fingerprint(), "admin: static token removed");
                Ok((RuntimeState { auth, ..p.runtime_state() }, json!({ "removed": digest.fingerprint() })))
            }),
            AdminRequest::TokenRevoke { subject, token } => self.commit(|p| match (subject, token) {
                (Some(s), None) => {
                    let auth = p.auth().revoke_subject(s, now_unix).map_err(|e| e.to_string())?;
                    info!(subject = s, "admin: subject revoked");
                    Ok((RuntimeState { auth, ..p.runtime_state() }, json!({ "revoked_subject": s })))
                }
                (None, Some(t)) => {
                    let (auth, digest) =
                        p.auth().revoke_token(t.expose(), now_unix).map_err(|e| e.to_string())?;
                    info!(fingerprint = digest.fingerprint(), "admin: token revoked");
                    Ok((
                        RuntimeState { auth, ..p.runtime_state() },
                        json!({ "revoked_token": digest.fingerprint() }),
                    ))
                }
                _ => Err("give exactly one of subject or token".into()),
            }),
            AdminRequest::TokenUnrevoke { subject, token, fingerprint } => self.commit(|p| {
                if let Some(s) = subject {
                    if token.is_some() || fingerprint.is_some() {
                        return Err("give exactly one of subject, token or fingerprint".into());
                    }
                    let auth = p.auth().unrevoke_subject(s).map_err(|e| e.to_string())?;
                    info!(subject = s, "admin: subject revocation lifted");
                    return Ok((
                        RuntimeState { auth, ..p.runtime_state() },
                        json!({ "unrevoked_subject": s }),
                    ));
                }
                let sel = selector(token, fingerprint)?;
                let (auth, digest) = p.auth().unrevoke_token(&sel).map_err(|e| e.to_string())?;
                info!(fingerprint = digest.fingerprint(), "admin: token revocation lifted");
                Ok((
                    RuntimeState { auth, ..p.runtime_state() },
                    json!({ "unrevoked_token": digest.fingerprint() }),
                ))
            }),
            AdminRequest::TokenList => self.token_list(),
            AdminRequest::FleetStatus => match &self.fleet {
                Some(f) => f.status_json(),
                None => error("this relay runs alone (no [fleet] section in its config)"),
            },
            AdminRequest::PolicyShow => self.policy_show(),
            AdminRequest::QuotaUsage { identity } => self.quota_usage(identity),
            AdminRequest::PolicySet { set } => self.commit(|p| {
                if set.is_empty() {
                    return Err("nothing to set: give KEY=VALUE pairs".into());
                }
                let mut overrides = p.quota_overrides().clone();
                overrides.extend(set.iter().map(|(k, v)| (k.clone(), *v)));
                let effective = p.quotas_with(&overrides).map_err(|e| e.to_string())?;
                info!(?set, "admin: quotas set");
                Ok((
                    RuntimeState { quota_overrides: overrides.clone(), ..p.runtime_state() },
                    json!({ "quotas": effective, "quota_overrides": overrides }),
                ))
            }),
            AdminRequest::PolicyReset { keys } => self.commit(|p| {
                let mut overrides = p.quota_overrides().clone();
                if keys.is_empty() {
                    overrides.clear();
                } else {
                    for k in keys {
                        if !QuotaConfig::KEYS.contains(&k.as_str()) {
                            return Err(format!("unknown quota key {k:?}"));
                        }
                        overrides.remove(k);
                    }
                }
                let effective = p.quotas_with(&overrides).map_err(|e| e.to_string())?;
                info!(?keys, "admin: quota overrides reset");
                Ok((
                    RuntimeState { quota_overrides: overrides.clone(), ..p.runtime_state() },
                    json!({ "quotas": effective, "quota_overrides": overrides }),
                ))
            }),
            AdminRequest::Status
            | AdminRequest::Flows
            | AdminRequest::Drain
            | AdminRequest::KillFlow { .. } => error("unreachable: answered from the shared state"),
        }
    }

    fn token_list(&self) -> Value {
        let p = self.policy();
        let auth = p.auth();
        let keys: Vec<Value> = auth
            .keys()
            .ids()
            .map(|id| json!({ "key_id": id, "default": auth.keys().default_id() == Some(id) }))
            .collect();
        let subjects: Vec<Value> = auth
            .state()
            .revoked_subjects
            .iter()
            .map(|(s, r)| json!({ "subject": s, "revoked_unix": r.revoked_unix }))
            .collect();
        let tokens: Vec<Value> = auth
            .state()
            .revoked_tokens
            .iter()
            .map(|(d, r)| {
                json!({
                    "fingerprint": d.fingerprint(),
                    "subject": r.subject,
                    "expires_unix": r.expires_unix,
                    "revoked_unix": r.revoked_unix,
                })
            })
            .collect();
        json!({
            "static_tokens": auth.static_tokens(),
            "hmac_keys": keys,
            "revoked_subjects": subjects,
            "revoked_tokens": tokens,
        })
    }

    /// `identity`'s usage here and, with fleet-wide identity quotas, on the
    /// other hosts as last read (`null` without them).
    fn quota_usage(&self, identity: &str) -> Value {
        let p = self.policy();
        let quotas = p.quotas();
        let here = quotas.identity_usage(identity, Instant::now());
        let others = quotas.global().map(|g| {
            let r = g.remote(identity);
            json!({ "flows": r.flows, "recent_new_flows": r.recent_new_flows, "bytes": r.bytes })
        });
        json!({
            "identity": identity,
            "limits": quotas.config().per_identity,
            "here": here.map(|u| json!({ "flows": u.flows, "bytes": u.bytes })),
            "fleet_wide": others.is_some(),
            "other_hosts": others,
        })
    }

    fn policy_show(&self) -> Value {
        let p = self.policy();
        let acl = p.acl();
        let strings =
            |v: &[_]| -> Vec<String> { v.iter().map(|c: &crate::acl::Cidr| c.to_string()).collect() };
        let statics = p.auth().static_tokens();
        json!({
            "protocols": {
                "connect_udp": p.protocols().connect_udp,
                "connect_ip": p.protocols().connect_ip,
                "bind": p.protocols().bind,
                "connect_tcp": p.protocols().connect_tcp,
                "websocket": p.upstreams().serves(crate::config::UpstreamProtocol::Websocket),
                "webtransport": p.upstreams().serves(crate::config::UpstreamProtocol::Webtransport),
            },
            "acl": {
                "allow": strings(acl.allow()),
                "deny": strings(acl.deny()),
                "ports": acl.ports().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "default_deny": crate::acl::DEFAULT_DENY,
            },
            "quotas": p.quotas().config(),
            "quotas_config_file": p.base_quotas(),
            "quota_overrides": p.quota_overrides(),
            "quota_tables": p.quotas().stats(),
            "tokens": {
                "static_config": statics.iter().filter(|t| t.source == "config").count(),
                "static_runtime": statics.iter().filter(|t| t.source == "runtime").count(),
                "hmac_keys": p.auth().keys().ids().collect::<Vec<_>>(),
                "default_key": p.auth().keys().default_id(),
                "revoked_subjects": p.auth().state().revoked_subjects.len(),
                "revoked_tokens": p.auth().state().revoked_tokens.len(),
            },
            "refusals": p.refusals(),
            "mtls": p.mtls().map(|m| {
                json!({
                    "mode": m.mode(),
                    "cas": m.ca_subjects(),
                    "identities": m.identities(),
                    "crls": m.summary(),
                })
            }),
            "privacy_pass": p.privacy_pass().map(|pp| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                json!({
                    "issuer_name": pp.settings().issuer_name,
                    "origin_info": pp.settings().origin_info,
                    "redemption_window_secs": pp.settings().window_secs,
                    "stats": pp.stats(now),
                    "redeemed": pp.stats(now).redeemed,
                })
            }),
        })
    }
}

/// A connecting process's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process ID.
    pub pid: i32,
    /// Effective user ID.
    pub uid: u32,
    /// Effective group ID.
    pub gid: u32,
}

/// The peer credentials of a connected Unix socket (SO_PEERCRED: the
/// credentials the peer had when it connected).
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is a live socket owned by `stream`; `cred` and
    // `len` are valid for writes and `len` holds `cred`'s size, which is
    // what SO_PEERCRED writes at most.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// This process's effective user ID.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer with `peer_uid` may use the admin socket of a control
/// running as `own_uid`: root, or the same user.
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

fn serve_one(stream: UnixStream, admin: &Admin) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let peer = peer_cred(&stream)?;
    let mut line = String::new();
    // Read the request even from a refused peer, so that it gets the
    // refusal rather than a broken pipe.
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let response = if !peer_allowed(peer.uid, own_uid()) {
        warn!(
            peer_pid = peer.pid,
            peer_uid = peer.uid,
            "admin socket: refused a peer that is neither root nor our user"
        );
        error(format!(
            "permission denied: uid {} may not use the admin socket (only root and uid {}, which relay-control runs as)",
            peer.uid,
            own_uid()
        ))
    } else {
        match serde_json::from_str::<AdminRequest>(line.trim()) {
            Ok(req) => admin.handle(&req, unix_now()),
            Err(e) => error(format!("bad request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    (&stream).write_all(&out)
}

/// Serves the admin socket on a background thread, one connection at a
/// time (so changes to the persisted state are serialized).
pub fn spawn(listener: UnixListener, admin: Admin) -> io::Result<()> {
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    let started = Instant::now();
                    if let Err(e) = serve_one(s, &admin) {
                        warn!("admin request failed after {:?}: {e}", started.elapsed());
                    }
                }
                Err(e) => warn!("admin accept: {e}"),
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::TargetAcl;
    use crate::auth::{AuthState, Authenticator};
    use crate::token::{Secret, TokenKeys};

    fn admin(dir: &std::path::Path) -> Admin {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![1; 32])).unwrap();
        let policy = Policy::new(
            Authenticator::new(["config-token"], keys, AuthState::default()),
            TargetAcl::new(vec![], vec![], vec![]),
            1000,
        );
        crate::state::ensure_dir(dir).unwrap();
        Admin::new(
            Arc::new(Mutex::new(Shared::default())),
            Arc::new(Mutex::new(policy)),
            PolicyStore::new(dir),
        )
    }

    fn req(json: &str) -> AdminRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn request_json_shapes() {
        assert_eq!(
            serde_json::from_str::<AdminRequest>(r#"{"cmd":"status"}"#).unwrap(),
            AdminRequest::Status
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(
            serde_json::from_str::<AdminRequest>(r#"{"cmd":"token_revoke","subject":"a","x":1}"#).is_err()
        );
        let v = respond(&AdminRequest::Status, &mut Shared::default()).unwrap();
        assert!(respond(&AdminRequest::Drain, &mut Shared::default()).unwrap()["error"].is_string());
        assert_eq!(v["dataplane_attached"], json!(false));
        assert_eq!(v["flows"], json!(0));
        let add = req(r#"{"cmd":"token_add","token":"hunter2hunter2"}"#);
        assert!(!format!("{add:?}").contains("hunter2"), "Debug hides tokens");
    }

    #[test]
    fn flows_name_their_protocol_and_route() {
        let mut shared = Shared::default();
        let flow = |flow_id, protocol, route: Option<&str>| crate::server::FlowInfo {
            flow_id,
            worker: 0,
            protocol,
            route: route.map(str::to_string),
            client: "192.0.2.1:5000".parse().unwrap(),
            target: "127.0.0.1:9001".parse().unwrap(),
            started_unix: 1,
            identity: "public".into(),
        };
        shared.flows.insert(2, flow(2, "websocket", Some("chat")));
        shared.flows.insert(1, flow(1, "connect-udp", None));
        let wt = crate::server::protocol_name(relay_proto::channel::record::TunnelProtocol::WebTransport);
        shared.flows.insert(3, flow(3, wt, Some("game")));
        let v = respond(&AdminRequest::Flows, &mut shared).unwrap();
        assert_eq!(v["flows"][0]["protocol"], json!("connect-udp"));
        assert_eq!(v["flows"][0]["route"], Value::Null);
        assert_eq!(v["flows"][1]["protocol"], json!("websocket"));
        assert_eq!(v["flows"][1]["route"], json!("chat"));
        assert_eq!(v["flows"][1]["identity"], json!("public"));
        assert_eq!(v["flows"][2]["protocol"], json!("webtransport"));
        assert_eq!(v["flows"][2]["route"], json!("game"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("15m"), Ok(900));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert!(parse_duration_secs("1w").is_err());
        assert!(parse_duration_secs("h").is_err());
        assert!(parse_duration_secs("-1s").is_err());
        assert!(parse_duration_secs("99999999999999999999d").is_err());
    }

    #[test]
    fn token_and_policy_commands_persist() {
        let dir = std::env::temp_dir().join(format!("relay-admin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = admin(&dir);
        let now = 1_700_000_000;
        let minted = a.handle(&req(r#"{"cmd":"token_mint","subject":"alice","ttl_secs":60}"#), now);
        let token = minted["token"].as_str().unwrap().to_string();
        assert_eq!(minted["expires_unix"], json!(now + 60));
        assert_eq!(minted["key_id"], json!("k1"));
        assert!(
            a.handle(&req(r#"{"cmd":"token_mint","subject":"a b","ttl_secs":60}"#), now)["error"].is_string()
        );
        assert!(
            a.handle(&req(r#"{"cmd":"token_mint","subject":"a","ttl_secs":60,"key_id":"k7"}"#), now)["error"]
                .as_str()
                .unwrap()
                .contains("k7")
        );

        let v = a.handle(
            &AdminRequest::TokenRevoke { subject: None, token: Some(SecretString::new(&token)) },
            now,
        );
        assert!(v["revoked_token"].is_string(), "{v}");
        let v = a.handle(&req(r#"{"cmd":"token_revoke","subject":"bob"}"#), now);
        assert_eq!(v["revoked_subject"], json!("bob"));
        let v = a.handle(&req(r#"{"cmd":"token_mint","subject":"bob","ttl_secs":60}"#), now);
        assert!(v["error"].as_str().unwrap().contains("revoked"), "{v}");
        let v = a.handle(&req(r#"{"cmd":"token_revoke"}"#), now);
        assert!(v["error"].is_string());
        let v = a.handle(&req(r#"{"cmd":"token_add","token":"runtime-token-1"}"#), now);
        let fp = v["added"].as_str().unwrap().to_string();
        let v = a.handle(&req(r#"{"cmd":"policy_set","set":{"per_identity.max_flows":2}}"#), now);
        assert_eq!(v["quotas"]["per_identity"]["max_flows"], json!(2), "{v}");
        let v = a.handle(&req(r#"{"cmd":"policy_set","set":{"per_identity.burst":2}}"#), now);
        assert!(v["error"].as_str().unwrap().contains("per_identity.burst"), "{v}");
        let v = a.handle(&req(r#"{"cmd":"policy_set","set":{"per_nobody.max_flows":2}}"#), now);
        assert!(v["error"].as_str().unwrap().contains("per_nobody"), "{v}");

        // The list shows fingerprints, never tokens.
        let list = a.handle(&AdminRequest::TokenList, now);
        let text = list.to_string();
        assert!(
            !text.contains(&token) && !text.contains("runtime-token-1") && !text.contains("config-token")
        );
        assert!(text.contains(&fp));
        assert_eq!(list["revoked_subjects"][0]["subject"], json!("bob"));
        assert_eq!(list["revoked_tokens"][0]["subject"], json!("alice"));
        assert_eq!(list["static_tokens"].as_array().unwrap().len(), 2);
        // Without a fleet an identity's usage is this host's alone.
        let usage = a.handle(&req(r#"{"cmd":"quota_usage","identity":"sub:alice"}"#), now);
        assert_eq!((usage["fleet_wide"].clone(), usage["other_hosts"].clone()), (json!(false), Value::Null));
        assert_eq!((usage["here"].clone(), usage["limits"]["max_flows"].clone()), (Value::Null, json!(2)));
        let show = a.handle(&AdminRequest::PolicyShow, now);
        assert_eq!(show["quotas"]["per_identity"]["max_flows"], json!(2));
        assert_eq!(show["quotas_config_file"]["per_identity"]["max_flows"], json!(0));
        assert_eq!(show["tokens"]["revoked_subjects"], json!(1));
        assert_eq!(show["protocols"]["connect_udp"], json!(true));
        assert_eq!(show["protocols"]["connect_tcp"], json!(true));
        // No [[upstreams]] route: neither upstream protocol is served.
        assert_eq!(show["protocols"]["websocket"], json!(false));
        assert_eq!(show["protocols"]["webtransport"], json!(false));
        assert!(!show.to_string().contains("config-token"));

        // All of it is on disk, and a fresh control gets it back.
        let state = PolicyStore::new(&dir).load().unwrap();
        assert_eq!(state.quota_overrides.get("per_identity.max_flows"), Some(&2));
        assert_eq!(state.auth.revoked_subjects.len(), 1);
        assert_eq!(state.auth.revoked_tokens.len(), 1);
        assert_eq!(state.auth.static_tokens.len(), 1);
        let b = admin(&dir);
        b.policy().install(state).unwrap();
        assert_eq!(b.handle(&AdminRequest::PolicyShow, now)["quotas"]["per_identity"]["max_flows"], json!(2));

        // Reset and removal.
        let v = a.handle(&req(r#"{"cmd":"policy_reset"}"#), now);
        assert_eq!(v["quota_overrides"], json!({}));
        let v = a.handle(&AdminRequest::TokenRemove { token: None, fingerprint: Some(fp.clone()) }, now);
        assert_eq!(v["removed"], json!(fp));
        let v = a.handle(&req(r#"{"cmd":"token_unrevoke","subject":"bob"}"#), now);
        assert_eq!(v["unrevoked_subject"], json!("bob"));
        let state = PolicyStore::new(&dir).load().unwrap();
        assert!(state.quota_overrides.is_empty() && state.auth.static_tokens.is_empty());
        assert!(state.auth.revoked_subjects.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_save_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("relay-admin-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = admin(&dir);
        // A directory where the file should be makes the rename fail.
        std::fs::create_dir_all(dir.join(crate::store::FILE_NAME)).unwrap();
        let v = a.handle(&req(r#"{"cmd":"token_revoke","subject":"carol"}"#), 1);
        assert!(v["error"].as_str().unwrap().contains("nothing was changed"), "{v}");
        assert!(a.policy().auth().state().revoked_subjects.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peer_credentials() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.uid, own_uid());
        assert_eq!(cred.pid, std::process::id() as i32);
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0) && !peer_allowed(65534, 0));
    }
}

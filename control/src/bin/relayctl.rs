//! `relayctl`: inspect and steer a running relay through control's admin
//! socket: status, flows, drain, certificate reload, session ticket keys,
//! tokens, revocations, quotas and the fleet.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};
use relay_control::admin::{AdminRequest, parse_duration_secs};
use relay_control::auth::SecretString;
use serde_json::Value;

/// Inspect a running MASQUE relay.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Control's admin socket.
    #[arg(long, default_value = "state/admin.sock", global = true)]
    socket: PathBuf,
    /// Print raw JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Control and dataplane status, with per-worker counters.
    Status,
    /// One line per dataplane worker: backend, load, I/O batching
    /// (packets per receive/send), system calls per datagram, hand-offs.
    Workers,
    /// The dataplane's QUIC connections: client, age, handshake, TLS
    /// generation, tunnels, RTT, packets and loss.
    Conns {
        /// Most connections listed per worker.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Live flows (`flows kill ID` ends one).
    Flows {
        #[command(subcommand)]
        action: Option<FlowsAction>,
    },
    /// Drain the dataplane: GOAWAY, no new tunnels, exit when tunnels end.
    Drain,
    /// Re-read the TLS certificate chain and key from their files (as
    /// SIGHUP does). New connections get the new certificate; open ones
    /// are untouched. A bad pair is refused and the old one stays.
    Reload,
    /// Session ticket keys (TLS 1.3 resumption).
    Tickets {
        #[command(subcommand)]
        action: TicketsAction,
    },
    /// Tokens: mint HMAC tokens, add or remove static ones, revoke.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// The authorization policy: show it, change quotas at run time.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Fleet mode: the hosts sharing state through the store.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// qlog (quiche's QUIC event log, JSON-SEQ for qvis) of chosen
    /// connections, into state_dir/qlog/.
    Qlog {
        #[command(subcommand)]
        action: QlogAction,
    },
}

#[derive(Subcommand, Debug)]
enum QlogAction {
    /// Log one open connection (`--worker W --conn N`, as `relayctl conns`
    /// lists it), or a client's (`--client ADDR`: its open connections,
    /// and new ones for `--seconds`). One file per connection, bounded by
    /// [qlog] max_file_bytes and max_files.
    #[command(group(ArgGroup::new("which").required(true).args(["conn", "client"])))]
    Start {
        /// The connection's worker (WORKER in `relayctl conns`).
        #[arg(long, requires = "conn")]
        worker: Option<u32>,
        /// The connection (CONN in `relayctl conns`); needs --worker.
        #[arg(long, requires = "worker")]
        conn: Option<u64>,
        /// A client address: IP (any port) or IP:PORT.
        #[arg(long, conflicts_with_all = ["worker", "conn"])]
        client: Option<String>,
        /// How long new connections from the client are logged (default
        /// [qlog] default_seconds).
        #[arg(long, requires = "client")]
        seconds: Option<u32>,
    },
    /// Stop: every file ends, no new connection is logged.
    Stop,
}

#[derive(Subcommand, Debug)]
enum FleetAction {
    /// The fleet, this host, the hosts seen (live heartbeats), the store's
    /// connectivity and last error, the state version and ticket key
    /// generation in force.
    Status,
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Mint an HMAC-signed token (control signs it; relayctl never sees a key).
    Mint {
        /// Who the token is for (A-Z a-z 0-9 - _ . ~, at most 64).
        #[arg(long)]
        subject: String,
        /// Lifetime: 90s, 15m, 12h, 7d (at most 366d).
        #[arg(long)]
        ttl: String,
        /// Key to sign with (default: the first in [[auth.hmac_keys]]).
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Accept a static token from now on ("-" reads it from stdin, which
    /// keeps it out of the process list).
    Add {
        /// The token, or "-".
        token: SecretString,
    },
    /// Stop accepting a static token that was added at run time.
    #[command(group(ArgGroup::new("which").required(true)))]
    Remove {
        /// The token ("-": read from stdin).
        #[arg(long, group = "which")]
        token: Option<SecretString>,
        /// Its fingerprint, as `token list` shows it.
        #[arg(long, group = "which")]
        fingerprint: Option<String>,
    },
    /// Revoke every token of a subject, or one exact token. New CONNECTs
    /// with it get 407; open tunnels are not touched.
    #[command(group(ArgGroup::new("which").required(true)))]
    Revoke {
        /// A subject: all its HMAC tokens, present and future.
        #[arg(long, group = "which")]
        subject: Option<String>,
        /// One token, static or HMAC ("-": read from stdin).
        #[arg(long, group = "which")]
        token: Option<SecretString>,
    },
    /// Lift a revocation.
    #[command(group(ArgGroup::new("which").required(true)))]
    Unrevoke {
        /// A revoked subject.
        #[arg(long, group = "which")]
        subject: Option<String>,
        /// A revoked token ("-": read from stdin).
        #[arg(long, group = "which")]
        token: Option<SecretString>,
        /// A revoked token's fingerprint.
        #[arg(long, group = "which")]
        fingerprint: Option<String>,
    },
    /// Static tokens (as fingerprints), HMAC key IDs and revocations.
    List,
}

#[derive(Subcommand, Debug)]
enum TicketsAction {
    /// Rotate now: tickets sealed with the key being replaced still resume
    /// (once), older ones fall back to a full handshake.
    Rotate,
}

#[derive(Subcommand, Debug)]
enum PolicyAction {
    /// Target ACL, quotas, protocols, token summary (no secrets).
    Show,
    /// Set quotas at run time: KEY=VALUE with keys as in the config's
    /// quotas section, e.g. per_identity.max_flows=4
    /// per_client.bytes_per_period=1000000000 (0 = unlimited). Persisted;
    /// they win over the config file until `policy reset`.
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Drop run-time quota values (all, or the keys named), going back to
    /// the config file's.
    Reset {
        /// Keys to reset (none: all).
        keys: Vec<String>,
    },
    /// One identity's usage as this host sees it: its open flows here and,
    /// with fleet-wide identity quotas, the other hosts' as last read.
    Usage {
        /// `sub:<subject>` or `tok:<fingerprint>` (as `relayctl flows`
        /// shows).
        identity: String,
    },
}

/// Reads a secret given as "-" from stdin.
fn secret(s: SecretString) -> Result<SecretString, String> {
    if s.expose() != "-" {
        return Ok(s);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| format!("reading the token from stdin: {e}"))?;
    let t = line.trim();
    if t.is_empty() {
        return Err("no token on stdin".into());
    }
    Ok(SecretString::new(t))
}

fn request(command: Command) -> Result<AdminRequest, String> {
    Ok(match command {
        Command::Status | Command::Workers => AdminRequest::Status,
        Command::Flows { action: None } => AdminRequest::Flows,
        Command::Flows { action: Some(FlowsAction::Kill { flow_id }) } => AdminRequest::KillFlow { flow_id },
        Command::Drain => AdminRequest::Drain,
        Command::Reload => AdminRequest::Reload,
        Command::Conns { limit } => AdminRequest::Conns { limit: Some(limit) },
        Command::Tickets { action: TicketsAction::Rotate } => AdminRequest::TicketsRotate,
        Command::Fleet { action: FleetAction::Status } => AdminRequest::FleetStatus,
        Command::Qlog { action: QlogAction::Start { worker, conn, client, seconds } } => {
            AdminRequest::QlogStart { worker, conn_id: conn, client, seconds }
        }
        Command::Qlog { action: QlogAction::Stop } => AdminRequest::QlogStop,
        Command::Token { action } => match action {
            TokenAction::Mint { subject, ttl, key_id } => {
                AdminRequest::TokenMint { subject, ttl_secs: parse_duration_secs(&ttl)?, key_id }
            }
            TokenAction::Add { token } => AdminRequest::TokenAdd { token: secret(token)? },
            TokenAction::Remove { token, fingerprint } => {
                AdminRequest::TokenRemove { token: token.map(secret).transpose()?, fingerprint }
            }
            TokenAction::Revoke { subject, token } => {
                AdminRequest::TokenRevoke { subject, token: token.map(secret).transpose()? }
            }
            TokenAction::Unrevoke { subject, token, fingerprint } => {
                AdminRequest::TokenUnrevoke { subject, token: token.map(secret).transpose()?, fingerprint }
            }
            TokenAction::List => AdminRequest::TokenList,
        },
        Command::Policy { action } => match action {
            PolicyAction::Show => AdminRequest::PolicyShow,
            PolicyAction::Set { pairs } => {
                let mut set = std::collections::BTreeMap::new();
                for p in pairs {
                    let (k, v) = p.split_once('=').ok_or_else(|| format!("{p:?}: expected KEY=VALUE"))?;
                    let v: u64 = v.trim().parse().map_err(|_| {
                        format!("{p:?}: the value must be a non-negative integer (0 = unlimited)")
                    })?;
                    set.insert(k.trim().to_string(), v);
                }
                AdminRequest::PolicySet { set }
            }
            PolicyAction::Reset { keys } => AdminRequest::PolicyReset { keys },
            PolicyAction::Usage { identity } => AdminRequest::QuotaUsage { identity },
        },
    })
}

#[derive(Subcommand, Debug)]
enum FlowsAction {
    /// End a flow's tunnel now (its stream is reset with H3_REQUEST_CANCELLED).
    Kill {
        /// The flow ID, as `relayctl flows` lists it.
        flow_id: u64,
    },
}

fn ask(socket: &PathBuf, req: &AdminRequest) -> Result<Value, String> {
    if let Ok(meta) = std::fs::metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("{} is not a socket (use --socket)", socket.display()));
        }
    }
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("no admin socket at {} (is relay-control running? use --socket)", socket.display())
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("permission denied on {} (run as the relay's user or root)", socket.display())
        }
        std::io::ErrorKind::ConnectionRefused => {
            format!("{} exists but nothing listens (relay-control is not running)", socket.display())
        }
        _ => format!("{}: {e}", socket.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // A peer control refuses still gets its answer; read it even if the
    // write failed.
    let sent = (&stream).write_all(&line);
    let mut response = String::new();
    if let Err(e) = BufReader::new(&stream).read_line(&mut response) {
        return Err(match sent {
            Err(w) => format!("sending request: {w}"),
            Ok(()) => format!("reading response: {e}"),
        });
    }
    if response.is_empty() {
        return Err(match sent {
            Err(w) => format!("sending request: {w}"),
            Ok(()) => "control closed the connection without answering".into(),
        });
    }
    let v: Value = serde_json::from_str(&response).map_err(|e| format!("bad response: {e}"))?;
    if let Some(err) = v.get("error") {
        let err = err.as_str().map_or_else(|| err.to_string(), str::to_string);
        return Err(format!("control refused the request: {err}"));
    }
    Ok(v)
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn unix_time(v: &Value) -> String {
    match v.as_u64() {
        Some(secs) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let (delta, word) = if secs > now { (secs - now, "in ") } else { (now - secs, "") };
            let ago = if secs > now { "" } else { " ago" };
            let human = match delta {
                d if d < 120 => format!("{d}s"),
                d if d < 7200 => format!("{}m", d / 60),
                d if d < 172_800 => format!("{}h", d / 3600),
                d => format!("{}d", d / 86_400),
            };
            format!("{secs} ({word}{human}{ago})")
        }
        None => "-".into(),
    }
}

fn print_token_list(v: &Value) {
    let rows: Vec<Vec<String>> = v["static_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    vec![
                        show(&t["fingerprint"]),
                        show(&t["source"]),
                        unix_time(&t["added_unix"]),
                        if t["revoked"] == Value::Bool(true) { "yes".into() } else { "no".into() },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!("static tokens");
    print!("{}", table(&["FINGERPRINT", "SOURCE", "ADDED", "REVOKED"], &rows));
    let keys: Vec<Vec<String>> = v["hmac_keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| {
                    vec![
                        show(&k["key_id"]),
                        if k["default"] == Value::Bool(true) { "yes".into() } else { "".into() },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!("\nhmac keys");
    print!("{}", table(&["KEY_ID", "MINTS"], &keys));
    let subjects: Vec<Vec<String>> = v["revoked_subjects"]
        .as_array()
        .map(|a| a.iter().map(|s| vec![show(&s["subject"]), unix_time(&s["revoked_unix"])]).collect())
        .unwrap_or_default();
    println!("\nrevoked subjects");
    print!("{}", table(&["SUBJECT", "REVOKED"], &subjects));
    let tokens: Vec<Vec<String>> = v["revoked_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    vec![
                        show(&t["fingerprint"]),
                        show(&t["subject"]),
                        unix_time(&t["expires_unix"]),
                        unix_time(&t["revoked_unix"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!("\nrevoked tokens");
    print!("{}", table(&["FINGERPRINT", "SUBJECT", "EXPIRES", "REVOKED"], &tokens));
}

const QUOTA_FIELDS: [&str; 5] =
    ["max_flows", "new_flows_per_sec", "burst", "bytes_per_period", "period_secs"];

fn print_quotas(v: &Value) {
    let overrides = &v["quota_overrides"];
    let mut rows = Vec::new();
    for scope in ["per_identity", "per_client"] {
        for f in QUOTA_FIELDS {
            let key = format!("{scope}.{f}");
            let value = &v["quotas"][scope][f];
            let shown = match (f, value.as_u64()) {
                ("burst", Some(0)) => "= rate".to_string(),
                ("period_secs", Some(0)) => "-".to_string(),
                (_, Some(0)) => "unlimited".to_string(),
                _ => show(value),
            };
            let source = if overrides.get(&key).is_some() { "relayctl" } else { "config" };
            rows.push(vec![key, shown, source.to_string()]);
        }
    }
    print!("{}", table(&["QUOTA", "VALUE", "SET BY"], &rows));
}

fn print_usage(v: &Value) {
    let here = &v["here"];
    let others = &v["other_hosts"];
    let mut rows =
        vec![vec!["this host".to_string(), show(&here["flows"]), show(&here["bytes"]), "-".into()]];
    if v["fleet_wide"] == true {
        rows.push(vec![
            "other hosts (last read)".into(),
            show(&others["flows"]),
            show(&others["bytes"]),
            show(&others["recent_new_flows"]),
        ]);
    }
    println!("identity {}", show(&v["identity"]));
    print!("{}", table(&["WHERE", "OPEN FLOWS", "BYTES", "NEW FLOWS (1 s)"], &rows));
    if v["fleet_wide"] != true {
        println!("(identity limits are per host: no fleet-wide usage)");
    }
}

fn print_policy(v: &Value) {
    let p = &v["protocols"];
    let rows: Vec<Vec<String>> =
        ["connect_udp", "connect_ip", "bind", "connect_tcp", "websocket", "webtransport"]
            .iter()
            .map(|k| vec![k.to_string(), show(&p[*k])])
            .collect();
    print!("{}", table(&["PROTOCOL", "ENABLED"], &rows));
    println!();
    let list = |x: &Value| {
        let items: Vec<String> = x.as_array().map(|a| a.iter().map(show).collect()).unwrap_or_default();
        if items.is_empty() { "-".to_string() } else { items.join(", ") }
    };
    let acl = &v["acl"];
    let rows = vec![
        vec!["allow".to_string(), list(&acl["allow"])],
        vec!["deny".to_string(), list(&acl["deny"])],
        vec![
            "ports".to_string(),
            if list(&acl["ports"]) == "-" { "all".into() } else { list(&acl["ports"]) },
        ],
        vec![
            "default_deny".to_string(),
            format!("{} special-purpose ranges", acl["default_deny"].as_array().map_or(0, Vec::len)),
        ],
    ];
    print!("{}", table(&["ACL", "VALUE"], &rows));
    println!();
    print_quotas(v);
    println!();
    let t = &v["tokens"];
    let q = &v["quota_tables"];
    let rows: Vec<Vec<String>> = vec![
        vec!["static tokens (config)".into(), show(&t["static_config"])],
        vec!["static tokens (relayctl)".into(), show(&t["static_runtime"])],
        vec!["hmac keys".into(), list(&t["hmac_keys"])],
        vec!["minting key".into(), show(&t["default_key"])],
        vec!["revoked subjects".into(), show(&t["revoked_subjects"])],
        vec!["revoked tokens".into(), show(&t["revoked_tokens"])],
        vec![
            "identities tracked".into(),
            format!("{} / {}", show(&q["identities_tracked"]), show(&q["max_tracked"])),
        ],
        vec![
            "clients tracked".into(),
            format!("{} / {}", show(&q["clients_tracked"]), show(&q["max_tracked"])),
        ],
    ];
    print!("{}", table(&["AUTH", "VALUE"], &rows));
    let m = &v["mtls"];
    if !m.is_null() {
        let c = &m["crls"];
        let rows: Vec<Vec<String>> = vec![
            vec!["mode".into(), show(&m["mode"])],
            vec!["CAs".into(), list(&m["cas"])],
            vec!["identities".into(), list(&m["identities"])],
            vec![
                "revocation lists".into(),
                format!(
                    "{} ({} revoked, {} past nextUpdate)",
                    show(&c["lists"]),
                    show(&c["revoked"]),
                    show(&c["stale"])
                ),
            ],
        ];
        println!();
        print!("{}", table(&["MTLS", "VALUE"], &rows));
    }
    let mut refusals: Vec<Vec<String>> = Vec::new();
    for kind in ["auth", "quota"] {
        if let Some(m) = v["refusals"][kind].as_object() {
            refusals.extend(m.iter().map(|(k, n)| vec![format!("{kind}: {k}"), show(n)]));
        }
    }
    if !refusals.is_empty() {
        println!();
        print!("{}", table(&["REFUSED", "COUNT"], &refusals));
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 { 0.0 } else { num as f64 / den as f64 }
}

/// Per-worker summaries derived from `status` (counters since start).
fn worker_rows(status: &Value) -> Vec<Value> {
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    workers
        .iter()
        .map(|w| {
            let n = |k: &str| w[k].as_u64().unwrap_or(0);
            let forwarded = n("datagrams_up") + n("datagrams_down");
            let backend = match n("io_backend") {
                1 => "io_uring",
                2 => "epoll",
                _ => "unknown",
            };
            serde_json::json!({
                "worker": n("worker"),
                "backend": backend,
                "connections": n("connections_active"),
                "tunnels": n("tunnels_active"),
                "datagrams_up": n("datagrams_up"),
                "datagrams_down": n("datagrams_down"),
                "quic_packets_per_receive": ratio(n("quic_packets_in"), n("quic_receives")),
                "quic_packets_per_send": ratio(n("quic_packets_out"), n("quic_sends")),
                "target_datagrams_per_send": ratio(n("datagrams_up"), n("target_sends")),
                "target_datagrams_per_receive": ratio(n("target_packets_in"), n("target_receives")),
                "syscalls_per_datagram": ratio(n("io_syscalls"), forwarded),
                "batched_wait_share": ratio(n("waits_batched"), n("loop_turns")),
                "handoffs_in": n("handoffs_in"),
                "handoffs_out": n("handoffs_out"),
                "target_pauses": n("target_reads_paused"),
                "drops": n("drop_queue_full") + n("drop_target_send") + n("drop_too_large") + n("quic_send_drops")
                    + n("drop_handoff_full") + n("recv_no_buffers") + n("recv_truncated"),
            })
        })
        .collect()
}

/// The `conns` table and its summary line.
fn print_conns(v: &Value) {
    let rows: Vec<Vec<String>> = v["connections"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let state = match (c["established"].as_bool(), c["resumed"].as_bool()) {
                        (Some(true), Some(true)) => "resumed",
                        (Some(true), _) => "established",
                        _ => "handshake",
                    };
                    vec![
                        show(&c["worker"]),
                        show(&c["conn_id"]),
                        show(&c["protocol"]),
                        show(&c["client"]),
                        format!("{:.1}s", c["age_ms"].as_u64().unwrap_or(0) as f64 / 1000.0),
                        state.to_string(),
                        show(&c["tls_generation"]),
                        show(&c["tunnels"]),
                        format!("{:.2}ms", c["rtt_us"].as_u64().unwrap_or(0) as f64 / 1000.0),
                        show(&c["packets_sent"]),
                        show(&c["packets_recv"]),
                        show(&c["packets_lost"]),
                        show(&c["max_tunnel_payload"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let headers = [
        "WORKER",
        "CONN",
        "PROTO",
        "CLIENT",
        "AGE",
        "STATE",
        "TLS GEN",
        "TUNNELS",
        "RTT",
        "PKTS SENT",
        "PKTS RECV",
        "LOST",
        "INNER MTU",
    ];
    print!("{}", table(&headers, &rows));
    println!("{} connections, {} listed", show(&v["total"]), show(&v["listed"]));
    if v["complete"] != Value::Bool(true) {
        eprintln!(
            "relayctl: only {} of {} workers answered in time",
            show(&v["workers_answered"]),
            show(&v["workers"])
        );
    }
}

/// The TLS lines of `status`.
fn tls_rows(tls: &Value) -> Vec<Vec<String>> {
    if tls.is_null() {
        return Vec::new();
    }
    let c = &tls["certificate"];
    vec![
        vec!["tls_generation".into(), show(&c["generation"])],
        vec!["certificate".into(), show(&c["subject"])],
        vec!["certificate_expires".into(), show(&c["not_after"])],
        vec!["certificate_sha256".into(), show(&c["sha256"])],
        vec!["session_tickets".into(), show(&tls["session_tickets"])],
        vec!["ticket_key_rotations".into(), show(&tls["ticket_rotations"])],
    ]
}

/// The fleet lines of `status` (none for a host alone).
fn fleet_rows(fleet: &Value) -> Vec<Vec<String>> {
    if fleet.is_null() {
        return Vec::new();
    }
    let store = match fleet["store_up"].as_bool() {
        Some(true) => format!("up ({})", show(&fleet["store_address"])),
        _ => format!("DOWN ({})", show(&fleet["last_error"])),
    };
    vec![
        vec!["fleet".into(), format!("{} (this host: {})", show(&fleet["fleet"]), show(&fleet["host"]))],
        vec!["fleet_store".into(), store],
        vec!["fleet_state_version".into(), show(&fleet["state_version"])],
        vec!["fleet_pending_local_changes".into(), show(&fleet["pending_local_changes"])],
        vec!["fleet_hosts_seen".into(), show(&fleet["hosts_seen"])],
    ]
}

/// `fleet status`.
fn print_fleet(v: &Value) {
    let store = if v["store_up"] == Value::Bool(true) { "up" } else { "DOWN" };
    let rows: Vec<Vec<String>> = vec![
        vec!["fleet".into(), show(&v["fleet"])],
        vec!["host".into(), show(&v["host"])],
        vec!["store".into(), format!("{store} ({})", show(&v["store_address"]))],
        vec!["store_endpoints".into(), show(&v["store_endpoints"])],
        vec!["on_store_failure".into(), show(&v["on_store_failure"])],
        vec!["last_error".into(), format!("{} {}", show(&v["last_error"]), unix_time(&v["last_error_unix"]))],
        vec!["store_errors".into(), show(&v["store_errors_total"])],
        vec!["values_rejected".into(), show(&v["values_rejected_total"])],
        vec!["last_rejection".into(), show(&v["last_rejection"])],
        vec!["state_version".into(), show(&v["state_version"])],
        vec!["pending_local_changes".into(), show(&v["pending_local_changes"])],
        vec!["last_sync".into(), unix_time(&v["last_sync_unix"])],
        vec!["ticket_generation".into(), show(&v["ticket_generation"])],
        vec!["quic_lb_config_id".into(), show(&v["quic_lb_config_id"])],
    ];
    print!("{}", table(&["FIELD", "VALUE"], &rows));
    let hosts: Vec<Vec<String>> = v["hosts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    vec![
                        show(&h["host"]),
                        show(&h["pid"]),
                        unix_time(&h["started_unix"]),
                        unix_time(&h["seen_unix"]),
                        show(&h["state_version"]),
                        show(&h["ticket_generation"]),
                        show(&h["pending_local_changes"]),
                        show(&h["quic_lb_config_id"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!("\nhosts seen");
    print!(
        "{}",
        table(&["HOST", "PID", "STARTED", "SEEN", "STATE", "TICKETS", "PENDING", "QUIC-LB ID"], &hosts)
    );
}

fn workers_table(rows: &[Value]) -> String {
    let headers = [
        "WORKER",
        "BACKEND",
        "CONNS",
        "TUNNELS",
        "DGRAMS UP",
        "DGRAMS DOWN",
        "QUIC PKT/RECV",
        "QUIC PKT/SEND",
        "TGT DGRAM/SEND",
        "TGT DGRAM/RECV",
        "SYSCALLS/DGRAM",
        "BATCHED WAITS",
        "HANDOFFS IN",
        "HANDOFFS OUT",
        "TARGET PAUSES",
        "DROPS",
    ];
    let keys = [
        "worker",
        "backend",
        "connections",
        "tunnels",
        "datagrams_up",
        "datagrams_down",
        "quic_packets_per_receive",
        "quic_packets_per_send",
        "target_datagrams_per_send",
        "target_datagrams_per_receive",
        "syscalls_per_datagram",
        "batched_wait_share",
        "handoffs_in",
        "handoffs_out",
        "target_pauses",
        "drops",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            keys.iter()
                .map(|k| match &r[*k] {
                    Value::Number(x) if x.is_f64() => format!("{:.2}", x.as_f64().unwrap_or(0.0)),
                    other => show(other),
                })
                .collect()
        })
        .collect();
    table(&headers, &body)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let workers_view = matches!(args.command, Command::Workers);
    let req = match request(args.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relayctl: {e}");
            return ExitCode::from(2);
        }
    };
    let v = match ask(&args.socket, &req) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("relayctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if workers_view {
        let rows = worker_rows(&v);
        if args.json {
            println!("{}", Value::Array(rows));
        } else {
            print!("{}", workers_table(&rows));
        }
        return ExitCode::SUCCESS;
    }
    // A reload is done when every worker serves the new certificate (and
    // the revocation lists, with mutual TLS, loaded).
    let reload_incomplete = req == AdminRequest::Reload
        && (v["workers_serving"].as_u64().unwrap_or(0) < v["workers"].as_u64().unwrap_or(0)
            || !v["crls"]["error"].is_null());
    if args.json {
        println!("{v}");
        return if reload_incomplete { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    }
    match req {
        AdminRequest::Reload => {
            let c = &v["certificate"];
            println!(
                "certificate generation {} ({}, expires {}, sha256 {}) served by {}/{} workers",
                show(&c["generation"]),
                show(&c["subject"]),
                show(&c["not_after"]),
                show(&c["sha256"]),
                show(&v["workers_serving"]),
                show(&v["workers"])
            );
            let crls = &v["crls"];
            if !crls["error"].is_null() {
                eprintln!(
                    "relayctl: revocation lists not reloaded (the previous ones stay): {}",
                    show(&crls["error"])
                );
                return ExitCode::FAILURE;
            } else if !crls.is_null() {
                println!(
                    "revocation lists: {} in force, {} revoked certificates, {} past nextUpdate",
                    show(&crls["lists"]),
                    show(&crls["revoked"]),
                    show(&crls["stale"])
                );
            }
            if reload_incomplete {
                eprintln!(
                    "relayctl: not every worker took the new certificate in time; see the dataplane's log"
                );
                return ExitCode::FAILURE;
            }
        }
        AdminRequest::Conns { .. } => print_conns(&v),
        AdminRequest::QlogStart { .. } => {
            let window = match v["seconds"].as_u64() {
                Some(s) => format!(", and new ones for {s}s"),
                None => String::new(),
            };
            println!(
                "qlog on for {} open connection(s){window}, into {} (session {})",
                show(&v["connections"]),
                show(&v["dir"]),
                show(&v["session"])
            );
        }
        AdminRequest::QlogStop => {
            println!("qlog stopped on {}/{} workers", show(&v["workers_applied"]), show(&v["workers"]));
            if v["stopped"] != Value::Bool(true) {
                eprintln!("relayctl: not every worker applied the stop in time; see the dataplane's log");
                return ExitCode::FAILURE;
            }
        }
        AdminRequest::TicketsRotate => match v.get("fleet_generation") {
            Some(g) => println!("session ticket keys rotated for the whole fleet (generation {})", show(g)),
            None => println!(
                "session ticket keys rotated ({} rotations since control started)",
                show(&v["rotations"])
            ),
        },
        AdminRequest::Status => {
            let rows: Vec<Vec<String>> = [
                "control_pid",
                "dataplane_attached",
                "dataplane_pid",
                "flows",
                "asks_allowed",
                "asks_denied",
                "channel_errors",
            ]
            .iter()
            .map(|k| vec![k.to_string(), show(&v[*k])])
            .chain(tls_rows(&v["tls"]))
            .chain(fleet_rows(&v["fleet"]))
            .collect();
            print!("{}", table(&["FIELD", "VALUE"], &rows));
            let workers = v["workers"].as_array().cloned().unwrap_or_default();
            if let Some(first) = workers.first().and_then(Value::as_object) {
                let names: Vec<&String> = first.keys().filter(|k| *k != "worker").collect();
                let mut headers = vec!["COUNTER"];
                let labels: Vec<String> =
                    workers.iter().map(|w| format!("W{}", show(&w["worker"]))).collect();
                headers.extend(labels.iter().map(String::as_str));
                let rows: Vec<Vec<String>> = names
                    .iter()
                    .map(|n| {
                        let mut r = vec![n.to_string()];
                        r.extend(workers.iter().map(|w| show(&w[n.as_str()])));
                        r
                    })
                    .collect();
                println!();
                print!("{}", table(&headers, &rows));
            }
        }
        AdminRequest::KillFlow { flow_id } => {
            println!("flow {flow_id} ended (worker {})", show(&v["worker"]))
        }
        AdminRequest::Drain => {
            println!(
                "dataplane {} is draining; {} tunnels still open",
                show(&v["dataplane_pid"]),
                show(&v["flows"])
            );
        }
        AdminRequest::Flows => {
            let rows: Vec<Vec<String>> = v["flows"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|f| {
                            [
                                "flow_id",
                                "worker",
                                "protocol",
                                "route",
                                "client",
                                "target",
                                "identity",
                                "started_unix",
                            ]
                            .iter()
                            .map(|k| show(&f[*k]))
                            .collect()
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!(
                "{}",
                table(
                    &["FLOW", "WORKER", "PROTOCOL", "ROUTE", "CLIENT", "TARGET", "IDENTITY", "STARTED"],
                    &rows
                )
            );
        }
        AdminRequest::TokenMint { .. } => {
            // The token alone on stdout (scripts: `T=$(relayctl token mint ...)`);
            // what it says on stderr.
            println!("{}", show(&v["token"]));
            eprintln!(
                "subject {}, key {}, expires {}",
                show(&v["subject"]),
                show(&v["key_id"]),
                unix_time(&v["expires_unix"])
            );
        }
        AdminRequest::TokenAdd { .. } => println!("static token {} added", show(&v["added"])),
        AdminRequest::TokenRemove { .. } => println!("static token {} removed", show(&v["removed"])),
        AdminRequest::TokenRevoke { .. } => match v.get("revoked_subject") {
            Some(s) => println!("subject {} revoked: new CONNECTs with its tokens get 407", show(s)),
            None => println!("token {} revoked: new CONNECTs with it get 407", show(&v["revoked_token"])),
        },
        AdminRequest::TokenUnrevoke { .. } => match v.get("unrevoked_subject") {
            Some(s) => println!("subject {} is no longer revoked", show(s)),
            None => println!("token {} is no longer revoked", show(&v["unrevoked_token"])),
        },
        AdminRequest::TokenList => print_token_list(&v),
        AdminRequest::FleetStatus => print_fleet(&v),
        AdminRequest::PolicyShow => print_policy(&v),
        AdminRequest::PolicySet { .. } | AdminRequest::PolicyReset { .. } => print_quotas(&v),
        AdminRequest::QuotaUsage { .. } => print_usage(&v),
    }
    // Fleet mode with the store down: the change holds on this host only.
    if let Some(Value::String(note)) = v.get("fleet_warning") {
        eprintln!("relayctl: {note}");
    }
    ExitCode::SUCCESS
}

//! `relayctl`: inspect a running relay through control's admin socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use relay_control::admin::AdminRequest;
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
    /// Live flows (`flows kill ID` ends one).
    Flows {
        #[command(subcommand)]
        action: Option<FlowsAction>,
    },
    /// Drain the dataplane: GOAWAY, no new tunnels, exit when tunnels end.
    Drain,
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
    (&stream).write_all(&line).map_err(|e| format!("sending request: {e}"))?;
    let mut response = String::new();
    BufReader::new(&stream).read_line(&mut response).map_err(|e| format!("reading response: {e}"))?;
    let v: Value = serde_json::from_str(&response).map_err(|e| format!("bad response: {e}"))?;
    if let Some(err) = v.get("error") {
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

fn main() -> ExitCode {
    let args = Args::parse();
    let req = match args.command {
        Command::Status => AdminRequest::Status,
        Command::Flows { action: None } => AdminRequest::Flows,
        Command::Flows { action: Some(FlowsAction::Kill { flow_id }) } => AdminRequest::KillFlow { flow_id },
        Command::Drain => AdminRequest::Drain,
    };
    let v = match ask(&args.socket, &req) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("relayctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    match req {
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
                            ["flow_id", "worker", "client", "target", "started_unix"]
                                .iter()
                                .map(|k| show(&f[*k]))
                                .collect()
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!("{}", table(&["FLOW", "WORKER", "CLIENT", "TARGET", "STARTED"], &rows));
        }
    }
    ExitCode::SUCCESS
}

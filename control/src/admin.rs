//! The admin socket: one JSON request line in, one JSON response line out.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"flows"}`. Errors come back as
//! `{"error":"..."}`. The socket is created with mode 0600.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_proto::channel::region::Counter;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::warn;

use crate::server::Shared;

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
}

/// Builds the response to `req` from the shared state.
pub fn respond(req: &AdminRequest, shared: &mut Shared) -> Value {
    match req {
        AdminRequest::KillFlow { flow_id } => {
            let Some(worker) = shared.flows.get(flow_id).map(|f| f.worker) else {
                return json!({ "error": format!("no live flow {flow_id}") });
            };
            shared.kill_requests.push((worker, *flow_id));
            json!({ "killed": flow_id, "worker": worker })
        }
        AdminRequest::Drain => {
            if shared.dataplane_pid.is_none() {
                return json!({ "error": "no dataplane is attached" });
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
                "workers": workers,
            })
        }
        AdminRequest::Flows => {
            let mut flows: Vec<_> = shared.flows.values().cloned().collect();
            flows.sort_by_key(|f| f.flow_id);
            json!({ "flows": flows })
        }
    }
}

fn serve_one(stream: UnixStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let response = match serde_json::from_str::<AdminRequest>(line.trim()) {
        Ok(req) => respond(&req, &mut shared.lock().unwrap_or_else(|p| p.into_inner())),
        Err(e) => json!({ "error": format!("bad request: {e}") }),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    (&stream).write_all(&out)
}

use std::io::Read;

/// Serves the admin socket on a background thread.
pub fn spawn(listener: UnixListener, shared: Arc<Mutex<Shared>>) -> std::io::Result<()> {
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    if let Err(e) = serve_one(s, &shared) {
                        warn!("admin request failed: {e}");
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

    #[test]
    fn request_json_shapes() {
        assert_eq!(
            serde_json::from_str::<AdminRequest>(r#"{"cmd":"status"}"#).unwrap(),
            AdminRequest::Status
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"reboot"}"#).is_err());
        let v = respond(&AdminRequest::Status, &mut Shared::default());
        assert!(respond(&AdminRequest::Drain, &mut Shared::default())["error"].is_string());
        assert_eq!(v["dataplane_attached"], json!(false));
        assert_eq!(v["flows"], json!(0));
    }
}

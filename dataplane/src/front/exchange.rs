//! One request on the TCP front, whatever HTTP version carries it: an
//! answer the session sends itself (a refusal, the status endpoint), or a
//! tunnel of the worker's tunnel layer, whose framing the session carries.

use relay_proto::request::Request;

use super::Fx;
use crate::tunnel::head::Head;
use crate::tunnel::{Carrier, Opening, Place, Start, TunnelId};

/// How the client reached us, for the status endpoint: the HTTP version's
/// label and whether TLS carries it.
#[derive(Debug, Clone, Copy)]
pub struct Via {
    /// "HTTP/1.1" or "HTTP/2".
    pub protocol: &'static str,
    /// Over TLS.
    pub secure: bool,
}

/// What a front stream carries.
#[derive(Debug)]
pub enum Exchange {
    /// An answer without a tunnel: its head (until sent) and body.
    Answer {
        /// The head, until sent.
        head: Option<Head>,
        /// The body not yet sent.
        body: Vec<u8>,
    },
    /// A tunnel.
    Tunnel(TunnelId),
}

impl Exchange {
    /// An answer with an empty body.
    pub fn refusal(head: Head) -> Self {
        Exchange::Answer { head: Some(head), body: Vec::new() }
    }

    /// The tunnel, if the exchange is one.
    pub fn tunnel(&self) -> Option<TunnelId> {
        match self {
            Exchange::Tunnel(id) => Some(*id),
            Exchange::Answer { .. } => None,
        }
    }
}

/// Starts the exchange for a parsed request on stream `stream` of
/// connection `conn`: a tunnel, or the answer (the same for every version:
/// [`crate::tunnel::Tunnels::start`] routes and refuses).
pub fn start(
    req: &Request,
    stream: u64,
    ended: bool,
    via: Via,
    io: &super::conn::ConnIo,
    fx: &mut Fx<'_>,
) -> Exchange {
    let opening = Opening {
        place: Place { carrier: Carrier::Front(io.key), stream, peer: io.peer },
        request: req,
        ended,
        status_endpoint: fx.sh.settings.tcp.status_endpoint,
        at_capacity: false,
        limits: fx.sh.settings.limits,
        client_cert: io.client_cert.as_ref(),
    };
    match fx.tunnels.start(fx.ctx, opening) {
        Start::Tunnel(id) => Exchange::Tunnel(id),
        Start::Refused(head) => Exchange::refusal(head),
        Start::Status { head_only } => {
            let body = status_body(via, fx);
            let fields = vec![
                ("content-type", "application/json".to_string()),
                ("cache-control", "no-store".to_string()),
            ];
            let len = body.len();
            let (body, head_only_len) = if head_only { (Vec::new(), Some(len)) } else { (body, None) };
            Exchange::Answer { head: Some(Head { status: 200, fields, tunnel: false, head_only_len }), body }
        }
    }
}

/// The status endpoint's JSON body: plain clients can see which protocol
/// they negotiated.
pub fn status_body(via: Via, fx: &Fx<'_>) -> Vec<u8> {
    let body = serde_json::json!({
        "status": "ok",
        "relay": fx.ctx.settings.names.proxy,
        "protocol": via.protocol,
        "transport": if via.secure { "tls" } else { "cleartext" },
        "alt_svc": fx.sh.settings.tcp.alt_svc,
        "worker": fx.ctx.settings.index,
    });
    let mut out = body.to_string().into_bytes();
    out.push(b'\n');
    out
}

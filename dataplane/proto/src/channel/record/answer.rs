//! Records control sends to a worker (the answers ring), and their payload
//! codecs.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use super::wire::{Reader, Writer};
use super::{
    IpAssignment, IpRoute, MAX_AUTHORITY, MAX_CHALLENGE_LEN, MAX_CHALLENGES, MAX_DETAILS, MAX_IP_ASSIGNMENTS,
    MAX_IP_ROUTES, MAX_PATH, MAX_ROUTE_NAME, MAX_SIGNATURE, RecordError,
};
use crate::proxy_status::ProxyError;

/// Control's verdict on an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Open the tunnel.
    Allow {
        /// Control's ID for the flow (reported back in
        /// [`FlowClosed`](super::FlowClosed)).
        flow_id: u64,
        /// The resolved, policy-checked target address.
        target: SocketAddr,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Payload bytes (both directions) the flow may carry before the
        /// dataplane ends it; 0 means no limit (a byte quota's remainder).
        byte_budget: u64,
        /// Who opened it, as control's quotas know them (`sub:alice`,
        /// `tok:<fingerprint>`; empty when not known). The dataplane keeps
        /// it only to report the flow to a restarted control.
        identity: String,
    },
    /// Open a connect-ip tunnel (RFC 9484).
    AllowIp {
        /// Control's ID for the flow.
        flow_id: u64,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Bytes the flow may carry (0: no limit).
        byte_budget: u64,
        /// Who opened it (quota key; empty when not known).
        identity: String,
        /// The addresses assigned to the client (from control's pools).
        addresses: Vec<IpAssignment>,
        /// Where the client may send: the scope it asked for, less what
        /// the target policy denies. Sorted as RFC 9484 section 4.7.3 wants.
        routes: Vec<IpRoute>,
    },
    /// Open a bound connect-udp tunnel: one unconnected socket that may
    /// send to, and receive from, the peers in `peers`.
    AllowBind {
        /// Control's ID for the flow.
        flow_id: u64,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Bytes the flow may carry (0: no limit).
        byte_budget: u64,
        /// Who opened it (quota key; empty when not known).
        identity: String,
        /// The addresses peers may have (everything less what the target
        /// policy denies); the dataplane checks each datagram's peer.
        peers: Vec<IpRoute>,
    },
    /// Relay to an upstream origin (a `[[upstreams]]` route): connect to
    /// `target` and open the upstream side with `host` and `path`.
    AllowUpstream {
        /// Control's ID for the flow.
        flow_id: u64,
        /// The resolved, policy-checked address of the upstream origin.
        target: SocketAddr,
        /// Idle timeout for the flow, in milliseconds.
        idle_timeout_ms: u32,
        /// Bytes the flow may carry (0: no limit).
        byte_budget: u64,
        /// Who opened it (quota key; empty when not known).
        identity: String,
        /// The route's name (at most [`MAX_ROUTE_NAME`] bytes of
        /// `[a-z0-9_-]`), shown with the flow.
        route: String,
        /// The `Host` (HTTP/1.1) or `:authority` to send upstream (at most
        /// [`MAX_AUTHORITY`] bytes).
        host: String,
        /// The path (and query) to request upstream, starting with `/` (at
        /// most [`MAX_PATH`] bytes).
        path: String,
    },
    /// Refuse with an HTTP status and a Proxy-Status error.
    Deny {
        /// HTTP status code (400..=599).
        status: u16,
        /// Proxy-Status error type.
        proxy_error: Option<ProxyError>,
        /// Details for the Proxy-Status field.
        details: String,
        /// Seconds the client should wait before retrying (`Retry-After`,
        /// on 429 when a rate or byte quota refused); 0: not sent.
        retry_after_secs: u32,
    },
    /// Refuse with 407 (no or refused credentials): Proxy-Status
    /// `http_request_denied` with `details`, and one `Proxy-Authenticate`
    /// field per challenge (RFC 9110 section 11.7.1), e.g. `Bearer
    /// realm="relay"` or a Privacy Pass `PrivateToken challenge=...,
    /// token-key=...` (RFC 9577 section 2.1). Control builds the
    /// challenges, which change with its keys and redemption windows.
    Authenticate {
        /// Details for the Proxy-Status field.
        details: String,
        /// The `Proxy-Authenticate` field values, in order (at most
        /// [`MAX_CHALLENGES`], each at most [`MAX_CHALLENGE_LEN`] bytes of
        /// visible ASCII and spaces; see [`valid_challenge`]).
        challenges: Vec<String>,
    },
}

/// Whether `v` may be sent as a `Proxy-Authenticate` field value: 1 to
/// [`MAX_CHALLENGE_LEN`] bytes of visible ASCII and inner spaces (RFC 9110
/// section 5.5 field-value without obs-text or tabs; no leading or
/// trailing space). The dataplane puts it in a response head unchanged,
/// so control's word is checked here rather than trusted.
pub fn valid_challenge(v: &str) -> bool {
    (1..=MAX_CHALLENGE_LEN).contains(&v.len())
        && v.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
        && !v.starts_with(' ')
        && !v.ends_with(' ')
}

/// Whether `v` is a route name: 1 to [`MAX_ROUTE_NAME`] bytes of
/// lowercase ASCII letters, digits, `-` and `_`.
pub fn valid_route_name(v: &str) -> bool {
    (1..=MAX_ROUTE_NAME).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `v` may be sent upstream as `Host`/`:authority`: 1 to
/// [`MAX_AUTHORITY`] bytes of visible ASCII other than `@`, `/`, `?`, `#`
/// (a `uri-host [":" port]`, RFC 9110 section 7.2; the dataplane writes it
/// into a request head unchanged, so control's word is checked here).
pub fn valid_upstream_host(v: &str) -> bool {
    (1..=MAX_AUTHORITY).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'@' | b'/' | b'?' | b'#' | b'\\'))
}

/// Whether `v` may be sent upstream as a request path: `/` then at most
/// [`MAX_PATH`] bytes of visible ASCII without `#` (origin-form, RFC 9112
/// section 3.2.1).
pub fn valid_upstream_path(v: &str) -> bool {
    v.starts_with('/') && v.len() <= MAX_PATH && v.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
}

/// Control answers an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAnswer {
    /// The ask this answers.
    pub ask_id: u64,
    /// The verdict.
    pub verdict: Verdict,
}

impl AuthAnswer {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.ask_id)?;
        match &self.verdict {
            Verdict::Allow { flow_id, target, idle_timeout_ms, byte_budget, identity } => {
                w.u8(1)?;
                w.u64(*flow_id)?;
                w.addr(*target)?;
                w.u32(*idle_timeout_ms)?;
                w.u64(*byte_budget)?;
                w.identity(identity)
            }
            Verdict::AllowIp { flow_id, idle_timeout_ms, byte_budget, identity, addresses, routes } => {
                if addresses.len() > MAX_IP_ASSIGNMENTS || routes.len() > MAX_IP_ROUTES {
                    return Err(RecordError::BadValue("ip_config"));
                }
                w.u8(3)?;
                w.u64(*flow_id)?;
                w.u32(*idle_timeout_ms)?;
                w.u64(*byte_budget)?;
                w.identity(identity)?;
                w.u8(addresses.len() as u8)?;
                addresses.iter().try_for_each(|a| w.prefix(a))?;
                w.u8(routes.len() as u8)?;
                routes.iter().try_for_each(|r| w.route(r))
            }
            Verdict::AllowBind { flow_id, idle_timeout_ms, byte_budget, identity, peers } => {
                if peers.len() > MAX_IP_ROUTES {
                    return Err(RecordError::BadValue("peers"));
                }
                w.u8(4)?;
                w.u64(*flow_id)?;
                w.u32(*idle_timeout_ms)?;
                w.u64(*byte_budget)?;
                w.identity(identity)?;
                w.u8(peers.len() as u8)?;
                peers.iter().try_for_each(|r| w.route(r))
            }
            Verdict::AllowUpstream {
                flow_id,
                target,
                idle_timeout_ms,
                byte_budget,
                identity,
                route,
                host,
                path,
            } => {
                if !valid_route_name(route) || !valid_upstream_host(host) || !valid_upstream_path(path) {
                    return Err(RecordError::BadValue("upstream"));
                }
                w.u8(6)?;
                w.u64(*flow_id)?;
                w.addr(*target)?;
                w.u32(*idle_timeout_ms)?;
                w.u64(*byte_budget)?;
                w.identity(identity)?;
                w.str(route, MAX_ROUTE_NAME, "route")?;
                w.str(host, MAX_AUTHORITY, "host")?;
                w.str(path, MAX_PATH, "path")
            }
            Verdict::Deny { status, proxy_error, details, retry_after_secs } => {
                if !(400..=599).contains(status) {
                    return Err(RecordError::BadValue("status"));
                }
                w.u8(2)?;
                w.u16(*status)?;
                w.u8(proxy_error.map_or(0, |e| e as u8))?;
                w.str(details, MAX_DETAILS, "details")?;
                w.u32(*retry_after_secs)
            }
            Verdict::Authenticate { details, challenges } => {
                if challenges.len() > MAX_CHALLENGES || !challenges.iter().all(|c| valid_challenge(c)) {
                    return Err(RecordError::BadValue("challenges"));
                }
                w.u8(5)?;
                w.str(details, MAX_DETAILS, "details")?;
                w.u8(challenges.len() as u8)?;
                challenges.iter().try_for_each(|c| w.str(c, MAX_CHALLENGE_LEN, "challenge"))
            }
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let ask_id = r.u64()?;
        let verdict = match r.u8()? {
            1 => Verdict::Allow {
                flow_id: r.u64()?,
                target: r.addr("target")?,
                idle_timeout_ms: r.u32()?,
                byte_budget: r.u64()?,
                identity: r.identity()?,
            },
            2 => {
                let status = r.u16()?;
                if !(400..=599).contains(&status) {
                    return Err(RecordError::BadValue("status"));
                }
                let proxy_error = match r.u8()? {
                    0 => None,
                    code => Some(ProxyError::from_u8(code).ok_or(RecordError::BadValue("proxy_error"))?),
                };
                Verdict::Deny {
                    status,
                    proxy_error,
                    details: r.str(MAX_DETAILS, "details")?,
                    retry_after_secs: r.u32()?,
                }
            }
            3 => {
                let flow_id = r.u64()?;
                let idle_timeout_ms = r.u32()?;
                let byte_budget = r.u64()?;
                let identity = r.identity()?;
                let n = usize::from(r.u8()?);
                if n > MAX_IP_ASSIGNMENTS {
                    return Err(RecordError::BadValue("addresses"));
                }
                let addresses = (0..n).map(|_| r.prefix()).collect::<Result<_, _>>()?;
                let n = usize::from(r.u8()?);
                if n > MAX_IP_ROUTES {
                    return Err(RecordError::BadValue("routes"));
                }
                let routes = (0..n).map(|_| r.route()).collect::<Result<_, _>>()?;
                Verdict::AllowIp { flow_id, idle_timeout_ms, byte_budget, identity, addresses, routes }
            }
            4 => {
                let flow_id = r.u64()?;
                let idle_timeout_ms = r.u32()?;
                let byte_budget = r.u64()?;
                let identity = r.identity()?;
                let n = usize::from(r.u8()?);
                if n > MAX_IP_ROUTES {
                    return Err(RecordError::BadValue("peers"));
                }
                let peers = (0..n).map(|_| r.route()).collect::<Result<_, _>>()?;
                Verdict::AllowBind { flow_id, idle_timeout_ms, byte_budget, identity, peers }
            }
            5 => {
                let details = r.str(MAX_DETAILS, "details")?;
                let n = usize::from(r.u8()?);
                if n > MAX_CHALLENGES {
                    return Err(RecordError::BadValue("challenges"));
                }
                let challenges: Vec<String> =
                    (0..n).map(|_| r.str(MAX_CHALLENGE_LEN, "challenge")).collect::<Result<_, _>>()?;
                if !challenges.iter().all(|c| valid_challenge(c)) {
                    return Err(RecordError::BadValue("challenge"));
                }
                Verdict::Authenticate { details, challenges }
            }
            6 => {
                let flow_id = r.u64()?;
                let target = r.addr("target")?;
                let idle_timeout_ms = r.u32()?;
                let byte_budget = r.u64()?;
                let identity = r.identity()?;
                let route = r.str(MAX_ROUTE_NAME, "route")?;
                let host = r.str(MAX_AUTHORITY, "host")?;
                let path = r.str(MAX_PATH, "path")?;
                if !valid_route_name(&route) || !valid_upstream_host(&host) || !valid_upstream_path(&path) {
                    return Err(RecordError::BadValue("upstream"));
                }
                Verdict::AllowUpstream {
                    flow_id,
                    target,
                    idle_timeout_ms,
                    byte_budget,
                    identity,
                    route,
                    host,
                    path,
                }
            }
            _ => return Err(RecordError::BadValue("verdict")),
        };
        Ok(Self { ask_id, verdict })
    }
}

/// The outcome of a signing ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignResult {
    /// The signature.
    Signature(Vec<u8>),
    /// Control could not sign (unsupported algorithm, no key).
    Failed(String),
}

/// Control answers a signing ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignAnswer {
    /// The ask this answers.
    pub sign_id: u64,
    /// The result.
    pub result: SignResult,
}

impl SignAnswer {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.sign_id)?;
        match &self.result {
            SignResult::Signature(sig) => {
                if sig.is_empty() {
                    return Err(RecordError::BadValue("signature"));
                }
                w.u8(1)?;
                w.blob(sig, MAX_SIGNATURE, "signature")
            }
            SignResult::Failed(why) => {
                w.u8(2)?;
                w.str(why, MAX_DETAILS, "details")
            }
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let sign_id = r.u64()?;
        let result = match r.u8()? {
            1 => {
                let sig = r.blob(MAX_SIGNATURE, "signature")?;
                if sig.is_empty() {
                    return Err(RecordError::BadValue("signature"));
                }
                SignResult::Signature(sig)
            }
            2 => SignResult::Failed(r.str(MAX_DETAILS, "details")?),
            _ => return Err(RecordError::BadValue("result")),
        };
        Ok(Self { sign_id, result })
    }
}

/// Control's answer to an [`AddressAsk`](super::AddressAsk): leased to the
/// flow, or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressAnswer {
    /// The flow.
    pub flow_id: u64,
    /// The client's request ID.
    pub request_id: u64,
    /// The address asked for.
    pub addr: IpAddr,
    /// Whether it is now leased to the flow.
    pub granted: bool,
}

impl AddressAnswer {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.flow_id)?;
        w.u64(self.request_id)?;
        w.ip(self.addr)?;
        w.u8(u8::from(self.granted))
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        Ok(Self { flow_id: r.u64()?, request_id: r.u64()?, addr: r.ip()?, granted: r.bool("granted")? })
    }
}

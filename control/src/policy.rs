//! Authorization decisions for tunnel asks: connect-udp, connect-ip, bound
//! connect-udp and classic CONNECT to TCP targets, and WebSocket and
//! WebTransport asks for `[[upstreams]]` routes (sans-IO: the caller passes the time). A TCP
//! CONNECT is decided exactly like connect-udp (credentials, quotas, name
//! resolution, target address and port policy); only its enablement flag is
//! its own.
//!
//! A WebSocket ask is served when some route serves `websocket`, a
//! WebTransport ask when some route serves `webtransport` (the two are
//! decided alike; a route serves the asks of its own protocol only). Its
//! route is the first of its protocol matching the request's host and path
//! ([`crate::upstreams`]);
//! the route's `auth` says whether the relay's credentials are asked for
//! (`relay`, as for tunnels) or not (`public`: [`Identity::Public`], quotas
//! per client address); the route's origin is then admitted like a tunnel
//! target (the `[targets]` policy unless the route has `trusted_origin`,
//! the quotas, a DNS name resolved first), and the allow is
//! [`Verdict::AllowUpstream`] with the upstream `Host` (WebTransport: the
//! `:authority`) and path, its target the origin's address (TCP for
//! WebSocket, UDP for WebTransport).
//!
//! [`Policy::decide`] answers immediately when it can (bad credentials,
//! quota, IP literal targets) and otherwise asks the caller to resolve a
//! name, after which [`Policy::after_resolution`] finishes the decision.
//! An allow is admitted by the quotas ([`crate::quota`]) at the moment it
//! is made, and its byte budget is the identity's and client's remaining
//! allowance; the caller reports flows ending with [`Policy::flow_closed`].
//! Denials carry the status and Proxy-Status error the dataplane sends:
//!
//! | case | status | Proxy-Status |
//! |---|---|---|
//! | connect-udp disabled (`protocols.connect_udp = false`) | 501 | - |
//! | TCP CONNECT disabled (`protocols.connect_tcp = false`) | 501 | -, details `TCP CONNECT is disabled` |
//! | WebSocket with no route serving it | 501 | -, details `websocket is disabled` |
//! | WebTransport with no route serving it | 501 | -, details `webtransport is disabled` |
//! | WebSocket, WebTransport: no route of its protocol matches the host and path | 404 | -, details `no upstream route` |
//! | WebSocket, WebTransport: a path with `.`/`..` segments, or an upstream path that is no valid target | 400 | http_request_error |
//! | no credentials / refused credentials (bearer or Privacy Pass) | 407 + one `Proxy-Authenticate` per accepted scheme and token type | http_request_denied |
//! | Privacy Pass spent-token store full | 503 | proxy_internal_error |
//! | a quota is exhausted | 429 | http_request_denied, details `quota exceeded: <key>` |
//! | fleet-wide identity quota, store down, `on_store_failure = "closed"` | 503 | proxy_internal_error |
//! | target address or port denied | 403 | destination_ip_prohibited |
//! | name does not resolve | 502 | dns_error |
//! | resolution timed out | 504 | dns_timeout |
//! | resolver overloaded | 503 | proxy_internal_error |
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use relay_proto::channel::record::{AuthAsk, IPPROTO_ANY, IpRoute, MAX_IP_ROUTES, TunnelProtocol, Verdict};
use relay_proto::proxy_status::ProxyError;
use relay_proto::target::TargetHost;
use tracing::debug;

use crate::acl::{Cidr, Denial, TargetAcl};
use crate::auth::{AuthState, Authenticator, Identity, Refusal};
use crate::config::{ProtocolsSection, UpstreamAuth, UpstreamProtocol};
use crate::mtls::{CertRefusal, Mtls};
use crate::privacy_pass::PrivacyPass;
use crate::quota::{Exceeded, QuotaConfig, QuotaError, Quotas};
use crate::store::{self, RuntimeState};
use crate::upstreams::{RouteError, Upstreams};

/// What to do with an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer now.
    Answer(Verdict),
    /// Resolve this name, then call [`Policy::after_resolution`] (or, with
    /// an `upstream`, [`Policy::after_upstream_resolution`]).
    Resolve {
        /// DNS name.
        name: String,
        /// Target port.
        port: u16,
        /// Who asked (for the quota admission after resolution).
        requester: Requester,
        /// An upstream ask (WebSocket, WebTransport): the route's origin
        /// is the name, and this is
        /// what the allow carries.
        upstream: Option<UpstreamTarget>,
    },
}

/// What an allow for an upstream route carries beside the origin's
/// address: [`Verdict::AllowUpstream`]'s route, `Host` and path, and how
/// the origin is admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// The route's name.
    pub route: String,
    /// The `Host` to send upstream (WebTransport: the `:authority`).
    pub host: String,
    /// The path (and query) to request upstream.
    pub path: String,
    /// The origin's addresses skip the target policy (`trusted_origin`).
    pub trusted_origin: bool,
    /// The flow's idle timeout (the route's, else the relay's).
    pub idle_timeout_ms: u32,
}

/// An authenticated requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// Who.
    pub identity: Identity,
    /// From where.
    pub client: IpAddr,
    /// connect-ip: the IP protocol of the scope (0..=255, or
    /// [`IPPROTO_ANY`]); `None` for connect-udp and TCP CONNECT.
    pub ip_protocol: Option<u16>,
}

/// Why resolution produced no addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveFailure {
    /// The name does not exist or has no addresses.
    NotFound(String),
    /// The resolver did not answer in time.
    Timeout,
    /// Too many resolutions are pending.
    Busy,
}

/// Refusal counters by reason, for `policy show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RefusalCounts {
    /// 407s by [`crate::auth::Refusal::reason`].
    pub auth: BTreeMap<&'static str, u64>,
    /// 429s by the limit that refused.
    pub quota: BTreeMap<String, u64>,
}

/// The authorization policy.
#[derive(Debug)]
pub struct Policy {
    auth: Authenticator,
    acl: TargetAcl,
    quotas: Quotas,
    base_quotas: QuotaConfig,
    quota_overrides: BTreeMap<String, u64>,
    protocols: ProtocolsSection,
    upstreams: Upstreams,
    idle_timeout_ms: u32,
    next_flow_id: u64,
    refusals: RefusalCounts,
    schemes: Schemes,
    privacy_pass: Option<PrivacyPass>,
    mtls: Option<Mtls>,
}

/// The credential schemes accepted and how a 407 challenges for bearer
/// tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schemes {
    /// `Bearer` tokens (static and HMAC) are accepted.
    pub bearer: bool,
    /// The `Bearer` challenge's realm.
    pub realm: String,
}

impl Default for Schemes {
    fn default() -> Self {
        Self { bearer: true, realm: "masque".into() }
    }
}

fn deny(status: u16, proxy_error: ProxyError, details: &str) -> Verdict {
    Verdict::Deny {
        status,
        proxy_error: Some(proxy_error),
        details: details.to_string(),
        retry_after_secs: 0,
    }
}

/// Port restrictions (`[targets] ports`) are enforced when a connect-udp
/// tunnel opens; bound and IP tunnels reach many ports over their life, so
/// they are refused while any port restriction is configured.
const PORTS_NOT_ENFORCEABLE: &str =
    "the relay restricts target ports, which bound and IP tunnels cannot honour";

fn quota_denial(which: Exceeded, retry_after_secs: Option<u32>) -> Verdict {
    if which == Exceeded::FleetStoreDown {
        // Not the client's doing: the relay cannot check a fleet-wide quota.
        return Verdict::Deny {
            status: 503,
            proxy_error: Some(ProxyError::ProxyInternalError),
            details: which.to_string(),
            retry_after_secs: 0,
        };
    }
    Verdict::Deny {
        status: 429,
        proxy_error: Some(ProxyError::HttpRequestDenied),
        details: format!("quota exceeded: {which}"),
        retry_after_secs: retry_after_secs.unwrap_or(0),
    }
}

impl Policy {
    /// A policy with this authenticator, target ACL and flow idle timeout;
    /// no quotas, connect-udp enabled.
    pub fn new(auth: Authenticator, acl: TargetAcl, idle_timeout_ms: u32) -> Self {
        // Flow IDs carry a per-start epoch in the top bits, so flows that a
        // dataplane kept across a control restart never collide with new
        // ones.
        let mut epoch = [0u8; 3];
        let _ = boring::rand::rand_bytes(&mut epoch);
        let epoch = u64::from(u32::from_le_bytes([epoch[0], epoch[1], epoch[2], 0]));
        Self {
            auth,
            acl,
            quotas: Quotas::new(
                QuotaConfig::default(),
                crate::quota::MAX_TRACKED,
                crate::quota::MAX_FLOWS_TRACKED,
            ),
            base_quotas: QuotaConfig::default(),
            quota_overrides: BTreeMap::new(),
            protocols: ProtocolsSection::default(),
            upstreams: Upstreams::default(),
            idle_timeout_ms,
            next_flow_id: (epoch << 40) | 1,
            refusals: RefusalCounts::default(),
            schemes: Schemes::default(),
            privacy_pass: None,
            mtls: None,
        }
    }

    /// Sets which credential schemes are accepted (bearer, and the realm
    /// of its challenge).
    pub fn with_schemes(mut self, schemes: Schemes) -> Self {
        self.schemes = schemes;
        self
    }

    /// Accepts Privacy Pass tokens (`PrivateToken`) with this verifier.
    pub fn with_privacy_pass(mut self, privacy_pass: PrivacyPass) -> Self {
        self.privacy_pass = Some(privacy_pass);
        self
    }

    /// Accepts client certificates (mutual TLS) with these CAs, lists and
    /// rules.
    pub fn with_mtls(mut self, mtls: Mtls) -> Self {
        self.mtls = Some(mtls);
        self
    }

    /// The mutual TLS settings, when `[auth.mtls]` is on.
    pub fn mtls(&self) -> Option<&Mtls> {
        self.mtls.as_ref()
    }

    /// The mutual TLS settings, when `[auth.mtls]` is on (to reload the
    /// revocation lists).
    pub fn mtls_mut(&mut self) -> Option<&mut Mtls> {
        self.mtls.as_mut()
    }

    /// The Privacy Pass verifier, if `PrivateToken` is accepted.
    pub fn privacy_pass(&self) -> Option<&PrivacyPass> {
        self.privacy_pass.as_ref()
    }

    /// The Privacy Pass verifier, to install keys (directory refreshes).
    pub fn privacy_pass_mut(&mut self) -> Option<&mut PrivacyPass> {
        self.privacy_pass.as_mut()
    }

    /// Checks the credentials of an ask: a verified client certificate
    /// when mutual TLS is on and the connection has one (it then decides
    /// alone, tokens or not), else `Proxy-Authorization` by its scheme.
    fn authenticate(&mut self, ask: &AuthAsk, now_unix: u64) -> Result<Identity, Refusal> {
        if let Some(mtls) = &self.mtls {
            match &ask.client_cert {
                Some(cert) => {
                    let name = mtls.check(cert).map_err(Refusal::Certificate)?;
                    if self.auth.subject_revoked(&name) {
                        return Err(Refusal::Certificate(CertRefusal::IdentityRevoked));
                    }
                    return Ok(Identity::Certificate(name));
                }
                None if mtls.required() => return Err(Refusal::Certificate(CertRefusal::Required)),
                None => {}
            }
        }
        self.authenticate_header(ask.authorization.as_deref(), now_unix)
    }

    /// Checks `Proxy-Authorization` by its scheme: `Bearer` (static and
    /// HMAC tokens) and `PrivateToken` (Privacy Pass), each when enabled.
    fn authenticate_header(
        &mut self,
        authorization: Option<&str>,
        now_unix: u64,
    ) -> Result<Identity, Refusal> {
        let Some(value) = authorization else {
            return Err(Refusal::Missing);
        };
        let scheme = value.trim_start_matches([' ', '\t']).split([' ', '\t']).next().unwrap_or("");
        if scheme.eq_ignore_ascii_case(crate::privacy_pass::wire::SCHEME) {
            let Some(pp) = self.privacy_pass.as_mut() else {
                return Err(Refusal::Scheme);
            };
            return pp
                .redeem(value, now_unix)
                .map(|r| Identity::PrivacyPass(r.quota_key()))
                .map_err(Refusal::PrivacyPass);
        }
        if !self.schemes.bearer {
            return Err(Refusal::Scheme);
        }
        self.auth.check(Some(value), now_unix)
    }

    /// The `Proxy-Authenticate` challenges of a 407 now: `Bearer` when
    /// bearer tokens are accepted, then one `PrivateToken` challenge per
    /// token type with a key in force.
    pub fn challenges(&self, now_unix: u64) -> Vec<String> {
        let mut out = Vec::new();
        if self.schemes.bearer {
            let realm: String = self
                .schemes
                .realm
                .chars()
                .filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c))
                .collect();
            out.push(format!("Bearer realm=\"{realm}\""));
        }
        if let Some(pp) = &self.privacy_pass {
            out.extend(pp.challenges(now_unix));
        }
        out.truncate(relay_proto::channel::record::MAX_CHALLENGES);
        out
    }

    /// Sets the config file's quotas (run-time overrides still apply).
    pub fn with_quotas(mut self, config: QuotaConfig) -> Self {
        self.base_quotas = config;
        let effective = config.with_overrides(&self.quota_overrides).unwrap_or(config);
        self.quotas.set_config(effective);
        self
    }

    /// Sets the protocols served.
    pub fn with_protocols(mut self, protocols: ProtocolsSection) -> Self {
        self.protocols = protocols;
        self
    }

    /// Sets the `[[upstreams]]` routes (WebSocket is served when one
    /// serves it).
    pub fn with_upstreams(mut self, upstreams: Upstreams) -> Self {
        self.upstreams = upstreams;
        self
    }

    /// The `[[upstreams]]` routes.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The authenticator (keys, tokens, revocations).
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The target ACL.
    pub fn acl(&self) -> &TargetAcl {
        &self.acl
    }

    /// The quota state.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The quota state, for the fleet thread's exchange of fleet-wide
    /// identity usage.
    pub fn quotas_mut(&mut self) -> &mut Quotas {
        &mut self.quotas
    }

    /// The config file's quotas (before run-time overrides).
    pub fn base_quotas(&self) -> &QuotaConfig {
        &self.base_quotas
    }

    /// Run-time quota overrides.
    pub fn quota_overrides(&self) -> &BTreeMap<String, u64> {
        &self.quota_overrides
    }

    /// The protocols served.
    pub fn protocols(&self) -> ProtocolsSection {
        self.protocols
    }

    /// Refusal counters.
    pub fn refusals(&self) -> &RefusalCounts {
        &self.refusals
    }

    /// The persisted run-time state as it is now.
    pub fn runtime_state(&self) -> RuntimeState {
        RuntimeState {
            version: store::VERSION,
            auth: self.auth.state().clone(),
            quota_overrides: self.quota_overrides.clone(),
        }
    }

    /// The quotas `overrides` would give, validated (errors name the key).
    pub fn quotas_with(&self, overrides: &BTreeMap<String, u64>) -> Result<QuotaConfig, QuotaError> {
        self.base_quotas.with_overrides(overrides)
    }

    /// Installs a run-time state (loaded at start, or just persisted by an
    /// admin request). Validates the quota overrides first.
    pub fn install(&mut self, state: RuntimeState) -> Result<(), QuotaError> {
        let effective = self.quotas_with(&state.quota_overrides)?;
        self.quotas.set_config(effective);
        self.quota_overrides = state.quota_overrides;
        self.auth.set_state(state.auth);
        Ok(())
    }

    /// Replaces only the authentication state.
    pub fn install_auth(&mut self, state: AuthState) {
        self.auth.set_state(state);
    }

    /// First step of a decision, at `now` (monotonic, for quotas) and
    /// `now_unix` (wall clock, for token expiry). Also returns who asked
    /// ([`Identity::Unknown`] when credentials were refused).
    pub fn decide(&mut self, ask: &AuthAsk, now: Instant, now_unix: u64) -> (Decision, Identity) {
        let connect_ip = ask.protocol == TunnelProtocol::ConnectIp;
        let bind = ask.protocol == TunnelProtocol::ConnectUdpBind;
        // connect-udp and TCP CONNECT share everything below but this flag.
        // (The record decoder refuses protocol values no build sends.)
        let (enabled, name) = match ask.protocol {
            TunnelProtocol::ConnectUdp => (self.protocols.connect_udp, "connect-udp"),
            TunnelProtocol::ConnectIp => (self.protocols.connect_ip, "connect-ip"),
            TunnelProtocol::ConnectUdpBind => (self.protocols.bind, "bound connect-udp"),
            TunnelProtocol::ConnectTcp => (self.protocols.connect_tcp, "TCP CONNECT"),
            TunnelProtocol::WebSocket => (self.upstreams.serves(UpstreamProtocol::Websocket), "websocket"),
            TunnelProtocol::WebTransport => {
                (self.upstreams.serves(UpstreamProtocol::Webtransport), "webtransport")
            }
        };
        if !enabled {
            let details = format!("{name} is disabled");
            let verdict = Verdict::Deny { status: 501, proxy_error: None, details, retry_after_secs: 0 };
            return (Decision::Answer(verdict), Identity::Unknown);
        }
        match ask.protocol {
            TunnelProtocol::WebSocket => {
                return self.decide_upstream(ask, UpstreamProtocol::Websocket, now, now_unix);
            }
            TunnelProtocol::WebTransport => {
                return self.decide_upstream(ask, UpstreamProtocol::Webtransport, now, now_unix);
            }
            _ => {}
        }
        let identity = match self.authenticate(ask, now_unix) {
            Ok(identity) => identity,
            Err(refusal) => {
                return (
                    Decision::Answer(self.credentials_refused(ask, &refusal, now_unix)),
                    Identity::Unknown,
                );
            }
        };
        let ip_protocol = connect_ip.then_some(ask.target_port);
        let requester = Requester { identity: identity.clone(), client: ask.client.ip(), ip_protocol };
        if connect_ip {
            return (self.decide_ip(ask, requester, now), identity);
        }
        if bind {
            return (Decision::Answer(self.admit_bind(&requester, now)), identity);
        }
        // connect-udp or TCP CONNECT. The dataplane validated the host
        // already; re-validate anyway, as nothing read from the channel is
        // trusted.
        let decision = match TargetHost::parse(&ask.target_host) {
            Ok(host) => self.admit_host(requester, host, ask.target_port, None, now),
            Err(_) => Decision::Answer(deny(400, ProxyError::HttpRequestError, "invalid target")),
        };
        (decision, identity)
    }

    /// The answer to refused credentials: 407 with the challenges, or 503
    /// when the refusal is not the client's doing.
    fn credentials_refused(&mut self, ask: &AuthAsk, refusal: &Refusal, now_unix: u64) -> Verdict {
        // The reason is for the operator; a bearer client gets one answer
        // for every bad token.
        debug!(ask = ask.ask_id, client = %ask.client, reason = refusal.reason(), "credentials refused");
        *self.refusals.auth.entry(refusal.reason()).or_default() += 1;
        if *refusal == Refusal::PrivacyPass(crate::privacy_pass::Refusal::StoreFull) {
            // Not the client's doing: no token can be checked for double
            // spending now.
            deny(503, ProxyError::ProxyInternalError, refusal.client_details())
        } else {
            Verdict::Authenticate {
                details: refusal.client_details().to_string(),
                challenges: self.challenges(now_unix),
            }
        }
    }

    /// Admits a flow to `host`:`port`: an IP literal now, a name after
    /// resolution (refused first when a quota is exhausted, so that no
    /// resolution is spent on it).
    fn admit_host(
        &mut self,
        requester: Requester,
        host: TargetHost,
        port: u16,
        upstream: Option<UpstreamTarget>,
        now: Instant,
    ) -> Decision {
        match host {
            TargetHost::Ip(ip) => {
                Decision::Answer(self.check_addresses(&requester, &[ip], port, upstream.as_ref(), now))
            }
            TargetHost::Name(name) => {
                match self.quotas.check(requester.identity.quota_key().as_deref(), requester.client, now) {
                    Ok(()) => Decision::Resolve { name, port, requester, upstream },
                    Err(which) => Decision::Answer(self.quota_refused(&requester, which, now)),
                }
            }
        }
    }

    /// An ask for an upstream route (WebSocket, WebTransport): the first
    /// route of `protocol` matching the request's host and path, the
    /// credentials it asks for, then its origin admitted like a tunnel
    /// target.
    fn decide_upstream(
        &mut self,
        ask: &AuthAsk,
        protocol: UpstreamProtocol,
        now: Instant,
        now_unix: u64,
    ) -> (Decision, Identity) {
        let (upstream, auth, origin, port) = match self.upstreams.select(protocol, &ask.authority, &ask.path)
        {
            Ok(selected) => {
                let route = selected.route;
                let idle_timeout_ms = match route.idle_timeout_secs {
                    0 => self.idle_timeout_ms,
                    secs => secs.saturating_mul(1000),
                };
                let upstream = UpstreamTarget {
                    route: route.name.clone(),
                    host: selected.host,
                    path: selected.path,
                    trusted_origin: route.trusted_origin,
                    idle_timeout_ms,
                };
                (upstream, route.auth, route.origin.host.clone(), route.origin.port)
            }
            Err(RouteError::NoRoute) => {
                let verdict = Verdict::Deny {
                    status: 404,
                    proxy_error: None,
                    details: RouteError::NoRoute.to_string(),
                    retry_after_secs: 0,
                };
                return (Decision::Answer(verdict), Identity::Unknown);
            }
            Err(e @ (RouteError::DotSegments | RouteError::InvalidPath)) => {
                let verdict = deny(400, ProxyError::HttpRequestError, &e.to_string());
                return (Decision::Answer(verdict), Identity::Unknown);
            }
        };
        let identity = match auth {
            UpstreamAuth::Public => Identity::Public,
            UpstreamAuth::Relay => match self.authenticate(ask, now_unix) {
                Ok(identity) => identity,
                Err(refusal) => {
                    let verdict = self.credentials_refused(ask, &refusal, now_unix);
                    return (Decision::Answer(verdict), Identity::Unknown);
                }
            },
        };
        let requester = Requester { identity: identity.clone(), client: ask.client.ip(), ip_protocol: None };
        (self.admit_host(requester, origin, port, Some(upstream), now), identity)
    }

    /// Finishes a decision after resolution.
    pub fn after_resolution(
        &mut self,
        requester: &Requester,
        port: u16,
        result: Result<Vec<IpAddr>, ResolveFailure>,
        now: Instant,
    ) -> Verdict {
        self.resolved(requester, port, None, result, now)
    }

    /// Finishes the decision of an upstream ask (the `upstream` of its
    /// [`Decision::Resolve`]) after resolution: the first admitted address
    /// of the origin gets a [`Verdict::AllowUpstream`].
    pub fn after_upstream_resolution(
        &mut self,
        requester: &Requester,
        port: u16,
        upstream: &UpstreamTarget,
        result: Result<Vec<IpAddr>, ResolveFailure>,
        now: Instant,
    ) -> Verdict {
        self.resolved(requester, port, Some(upstream), result, now)
    }

    fn resolved(
        &mut self,
        requester: &Requester,
        port: u16,
        upstream: Option<&UpstreamTarget>,
        result: Result<Vec<IpAddr>, ResolveFailure>,
        now: Instant,
    ) -> Verdict {
        match result {
            Ok(addrs) if !addrs.is_empty() && requester.ip_protocol.is_some() => {
                // connect-ip to a name: the scope is its addresses.
                let hosts: Vec<Cidr> =
                    addrs.iter().filter_map(|a| Cidr::new(*a, if a.is_ipv4() { 32 } else { 128 })).collect();
                self.admit_ip_scope(requester, &hosts, now)
            }
            Ok(addrs) if !addrs.is_empty() => self.check_addresses(requester, &addrs, port, upstream, now),
            Ok(_) => deny(502, ProxyError::DnsError, "no addresses"),
            Err(ResolveFailure::NotFound(why)) => deny(502, ProxyError::DnsError, &why),
            Err(ResolveFailure::Timeout) => deny(504, ProxyError::DnsTimeout, "resolution timed out"),
            Err(ResolveFailure::Busy) => deny(503, ProxyError::ProxyInternalError, "resolver overloaded"),
        }
    }

    /// A connect-ip ask: the scope target is `*`, an address, a prefix
    /// (RFC 9484 section 4.6) or a name to resolve first.
    fn decide_ip(&mut self, ask: &AuthAsk, requester: Requester, now: Instant) -> Decision {
        if ask.target_port > IPPROTO_ANY {
            return Decision::Answer(deny(400, ProxyError::HttpRequestError, "invalid ipproto"));
        }
        let target = ask.target_host.as_str();
        let within: Vec<Cidr> = if target == "*" {
            Cidr::everything().to_vec()
        } else if let Some((addr, len)) = target.split_once('/') {
            let parsed = addr.parse::<IpAddr>().ok().zip(len.parse::<u8>().ok());
            match parsed.and_then(|(a, l)| Cidr::new(a, l).filter(|c| c.to_string() == format!("{a}/{l}"))) {
                Some(c) => vec![c],
                None => {
                    return Decision::Answer(deny(
                        400,
                        ProxyError::HttpRequestError,
                        "invalid target prefix",
                    ));
                }
            }
        } else if let Ok(ip) = target.parse::<IpAddr>() {
            vec![Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix")]
        } else {
            return match TargetHost::parse(target) {
                Ok(TargetHost::Name(name)) => {
                    match self.quotas.check(requester.identity.quota_key().as_deref(), requester.client, now)
                    {
                        Ok(()) => {
                            Decision::Resolve { name, port: ask.target_port, requester, upstream: None }
                        }
                        Err(which) => Decision::Answer(self.quota_refused(&requester, which, now)),
                    }
                }
                _ => Decision::Answer(deny(400, ProxyError::HttpRequestError, "invalid target")),
            };
        };
        Decision::Answer(self.admit_ip_scope(&requester, &within, now))
    }

    /// Admits a connect-ip flow whose scope is `within`: the routes it may
    /// use are the scope less what the target policy denies; control's
    /// server adds the addresses.
    fn admit_ip_scope(&mut self, requester: &Requester, within: &[Cidr], now: Instant) -> Verdict {
        let protocol = match requester.ip_protocol {
            Some(p) if p < IPPROTO_ANY => p as u8,
            _ => 0,
        };
        if !self.acl.ports().is_empty() {
            return deny(403, ProxyError::DestinationIpProhibited, PORTS_NOT_ENFORCEABLE);
        }
        let ranges = self.acl.allowed_ranges(within);
        if ranges.is_empty() {
            return deny(403, ProxyError::DestinationIpProhibited, "the scope holds no allowed destination");
        }
        if ranges.len() > MAX_IP_ROUTES {
            return deny(
                403,
                ProxyError::DestinationIpProhibited,
                "the allowed part of the scope is too fragmented",
            );
        }
        let flow_id = self.next_flow_id;
        self.next_flow_id += 1;
        let key = requester.identity.quota_key();
        match self.quotas.admit(flow_id, key.as_deref(), requester.client, now) {
            Ok(byte_budget) => Verdict::AllowIp {
                flow_id,
                idle_timeout_ms: self.idle_timeout_ms,
                byte_budget,
                identity: key.unwrap_or_default(),
                addresses: Vec::new(),
                routes: ranges.iter().map(|r| IpRoute { start: r.start, end: r.end, protocol }).collect(),
            },
            Err(which) => self.quota_refused(requester, which, now),
        }
    }

    /// A bound connect-udp tunnel: its peers may be any address the target
    /// policy allows (checked by the dataplane on every datagram, both
    /// ways); a fallback target in the request does not narrow that.
    fn admit_bind(&mut self, requester: &Requester, now: Instant) -> Verdict {
        if !self.acl.ports().is_empty() {
            return deny(403, ProxyError::DestinationIpProhibited, PORTS_NOT_ENFORCEABLE);
        }
        let ranges = self.acl.allowed_ranges(&Cidr::everything());
        if ranges.is_empty() || ranges.len() > MAX_IP_ROUTES {
            return deny(
                403,
                ProxyError::DestinationIpProhibited,
                "the target policy leaves no usable peers",
            );
        }
        let flow_id = self.next_flow_id;
        self.next_flow_id += 1;
        let key = requester.identity.quota_key();
        match self.quotas.admit(flow_id, key.as_deref(), requester.client, now) {
            Ok(byte_budget) => Verdict::AllowBind {
                flow_id,
                idle_timeout_ms: self.idle_timeout_ms,
                byte_budget,
                identity: key.unwrap_or_default(),
                peers: ranges.iter().map(|r| IpRoute { start: r.start, end: r.end, protocol: 17 }).collect(),
            },
            Err(which) => self.quota_refused(requester, which, now),
        }
    }

    fn quota_refused(&mut self, requester: &Requester, which: Exceeded, now: Instant) -> Verdict {
        debug!(identity = %requester.identity, client = %requester.client, limit = %which, "quota exceeded");
        *self.refusals.quota.entry(which.to_string()).or_default() += 1;
        let key = requester.identity.quota_key();
        let retry_after = self.quotas.retry_after_secs(which, key.as_deref(), requester.client, now);
        quota_denial(which, retry_after)
    }

    /// Picks the first allowed address and admits the flow: a tunnel
    /// ([`Verdict::Allow`]), or with `upstream` an upstream route's flow
    /// ([`Verdict::AllowUpstream`]; a `trusted_origin` skips the target
    /// policy, not the quotas).
    fn check_addresses(
        &mut self,
        requester: &Requester,
        addrs: &[IpAddr],
        port: u16,
        upstream: Option<&UpstreamTarget>,
        now: Instant,
    ) -> Verdict {
        let trusted = upstream.is_some_and(|u| u.trusted_origin);
        let mut port_denied = false;
        for ip in addrs {
            let checked = if trusted { Ok(()) } else { self.acl.check(*ip, port) };
            match checked {
                Ok(()) => {
                    let flow_id = self.next_flow_id;
                    self.next_flow_id += 1;
                    let key = requester.identity.quota_key();
                    let byte_budget = match self.quotas.admit(flow_id, key.as_deref(), requester.client, now)
                    {
                        Ok(budget) => budget,
                        Err(which) => return self.quota_refused(requester, which, now),
                    };
                    let (identity, target) = (key.unwrap_or_default(), SocketAddr::new(*ip, port));
                    return match upstream {
                        None => Verdict::Allow {
                            identity,
                            flow_id,
                            target,
                            idle_timeout_ms: self.idle_timeout_ms,
                            byte_budget,
                        },
                        Some(u) => Verdict::AllowUpstream {
                            flow_id,
                            target,
                            idle_timeout_ms: u.idle_timeout_ms,
                            byte_budget,
                            identity,
                            route: u.route.clone(),
                            host: u.host.clone(),
                            path: u.path.clone(),
                        },
                    };
                }
                Err(Denial::Port) => port_denied = true,
                Err(Denial::Address) => {}
            }
        }
        if port_denied {
            deny(403, ProxyError::DestinationIpProhibited, "target port not allowed")
        } else {
            deny(403, ProxyError::DestinationIpProhibited, "target address not allowed")
        }
    }

    /// A flow ended (the dataplane's `FlowClosed`, or an allow that was not
    /// used): releases its quota and charges its bytes.
    pub fn flow_closed(&mut self, flow_id: u64, bytes: u64, now: Instant) {
        self.quotas.closed(flow_id, bytes, now);
    }

    /// A re-attached dataplane reported an open flow.
    pub fn flow_reopened(&mut self, flow_id: u64, client: IpAddr, identity: Option<&str>, now: Instant) {
        self.quotas.reopened(flow_id, client, identity, now);
    }

    /// The dataplane went away with every flow.
    pub fn release_all_flows(&mut self) {
        self.quotas.release_all();
    }

    /// Periodic upkeep: evicts idle quota entries.
    pub fn sweep(&mut self, now: Instant) -> usize {
        self.quotas.sweep(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::QuotaLimits;
    use crate::token::{Secret, TokenKeys};
    use boring::x509::X509Ref;

    const NOW_UNIX: u64 = 1_700_000_000;

    fn ask(host: &str, auth: Option<&str>) -> AuthAsk {
        AuthAsk {
            ask_id: 1,
            client: "127.0.0.1:1".parse().unwrap(),
            authority: "relay".into(),
            path: "/".into(),
            target_host: host.into(),
            target_port: 53,
            authorization: auth.map(str::to_string),
            protocol: TunnelProtocol::ConnectUdp,
            client_cert: None,
        }
    }

    #[test]
    fn a_client_certificate_decides_alone_when_mtls_is_on() {
        use crate::config::{CertField, CertIdentityRule, MtlsSection};
        use crate::mtls::tests::Ca;
        use relay_proto::channel::bootstrap::ClientAuthMode;
        let dir = std::env::temp_dir().join(format!("mtls-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("Policy CA");
        std::fs::write(dir.join("ca.pem"), ca.cert.to_pem().unwrap()).unwrap();
        std::fs::write(dir.join("crl.der"), ca.crl(&[9])).unwrap();
        let mut section = MtlsSection {
            mode: ClientAuthMode::Optional,
            ca_files: vec![dir.join("ca.pem")],
            crl_files: vec![dir.join("crl.der")],
            identities: vec![CertIdentityRule {
                name: "ingress".into(),
                field: CertField::SanDns,
                equals: Some("ingress.example".into()),
                suffix: None,
            }],
        };
        let mtls = crate::mtls::Mtls::load(&section, 0).unwrap().unwrap();
        let mut p = policy().with_mtls(mtls);
        let with = |cert: &X509Ref, auth: Option<&str>| AuthAsk {
            client_cert: Some(crate::mtls::tests::describe(cert)),
            ..ask("127.0.0.1", auth)
        };
        let good = ca.issue(2, "x", "ingress.example");
        let (d, identity) = p.decide(&with(&good, None), Instant::now(), NOW_UNIX);
        assert!(matches!(d, Decision::Answer(Verdict::Allow { .. })), "{d:?}");
        assert_eq!(identity.quota_key().as_deref(), Some("cert:ingress"));
        let details = |d: Decision| match d {
            Decision::Answer(Verdict::Authenticate { details, .. }) => details,
            other => panic!("{other:?}"),
        };
        // Revoked by the list: a valid token does not help.
        let revoked = ca.issue(9, "x", "ingress.example");
        assert_eq!(details(decide(&mut p, &with(&revoked, Some("Bearer t")))), "client certificate revoked");
        let stranger = ca.issue(3, "x", "other.example");
        assert_eq!(details(decide(&mut p, &with(&stranger, None))), "client certificate not authorized");
        // Optional: no certificate, tokens as ever.
        assert_eq!(status(&decide(&mut p, &ask("127.0.0.1", None))), 407);
        assert!(matches!(
            decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))),
            Decision::Answer(Verdict::Allow { .. })
        ));
        // The identity revoked like a token subject.
        let state = p.auth().revoke_subject("ingress", NOW_UNIX).unwrap();
        p.install_auth(state);
        assert_eq!(details(decide(&mut p, &with(&good, None))), "client certificate revoked");
        // Required: no certificate is refused even with a token.
        section.mode = ClientAuthMode::Required;
        let mut p = policy().with_mtls(crate::mtls::Mtls::load(&section, 0).unwrap().unwrap());
        assert_eq!(
            details(decide(&mut p, &ask("127.0.0.1", Some("Bearer t")))),
            "client certificate required"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn policy() -> Policy {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![3; 32])).unwrap();
        Policy::new(
            Authenticator::new(["t"], keys, AuthState::default()),
            TargetAcl::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec![]),
            5000,
        )
    }

    fn status(d: &Decision) -> u16 {
        match d {
            Decision::Answer(Verdict::Deny { status, .. }) => *status,
            Decision::Answer(Verdict::Authenticate { .. }) => 407,
            other => panic!("not a denial: {other:?}"),
        }
    }

    fn decide(p: &mut Policy, a: &AuthAsk) -> Decision {
        p.decide(a, Instant::now(), NOW_UNIX).0
    }

    fn ip_ask(target: &str, ipproto: u16) -> AuthAsk {
        AuthAsk {
            target_host: target.into(),
            target_port: ipproto,
            protocol: TunnelProtocol::ConnectIp,
            ..ask(target, Some("Bearer t"))
        }
    }

    #[test]
    fn connect_ip_scopes_become_routes_less_the_denied_space() {
        let mut p = policy();
        assert_eq!(status(&decide(&mut p, &ip_ask("*", IPPROTO_ANY))), 501, "connect-ip off by default");
        let mut p = policy().with_protocols(ProtocolsSection { connect_ip: true, ..Default::default() });
        let routes = |d: Decision| match d {
            Decision::Answer(Verdict::AllowIp { routes, addresses, .. }) => {
                assert!(addresses.is_empty(), "control's server assigns addresses");
                routes
            }
            other => panic!("{other:?}"),
        };
        // 192.0.2.0/24 is documentation space: denied by default.
        assert_eq!(status(&decide(&mut p, &ip_ask("192.0.2.128/25", 17))), 403);
        let r = routes(decide(&mut p, &ip_ask("8.8.8.0/24", 6)));
        assert_eq!(
            r,
            vec![IpRoute {
                start: "8.8.8.0".parse().unwrap(),
                end: "8.8.8.255".parse().unwrap(),
                protocol: 6
            }]
        );
        // Loopback is allowed explicitly by this policy.
        let r = routes(decide(&mut p, &ip_ask("127.0.0.1", IPPROTO_ANY)));
        assert_eq!(r[0].start, r[0].end);
        let all = routes(decide(&mut p, &ip_ask("*", IPPROTO_ANY)));
        assert!(all.len() > 10 && all.len() <= MAX_IP_ROUTES && all.iter().all(|x| x.protocol == 0));
        assert!(all.iter().any(|x| x.start.is_ipv6()) && all[0].start.is_ipv4());
        assert_eq!(status(&decide(&mut p, &ip_ask("10.0.0.1/8", 0))), 400, "host bits set");
        assert_eq!(status(&decide(&mut p, &ip_ask("8.8.8.0/24", 300))), 400);
        assert!(matches!(decide(&mut p, &ip_ask("example.com", 6)), Decision::Resolve { .. }));
        let requester = Requester {
            identity: Identity::Unknown,
            client: "127.0.0.1".parse().unwrap(),
            ip_protocol: Some(6),
        };
        let v = p.after_resolution(&requester, 6, Ok(vec!["1.1.1.1".parse().unwrap()]), Instant::now());
        assert!(
            matches!(v, Verdict::AllowIp { ref routes, .. } if routes.len() == 1 && routes[0].protocol == 6),
            "{v:?}"
        );
    }

    #[test]
    fn port_restrictions_refuse_bound_and_ip_tunnels() {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![3; 32])).unwrap();
        let mut p = Policy::new(
            Authenticator::new(["t"], keys, AuthState::default()),
            TargetAcl::new(vec![], vec![], vec!["443".parse().unwrap()]),
            5000,
        )
        .with_protocols(ProtocolsSection { connect_ip: true, bind: true, ..Default::default() });
        assert_eq!(status(&decide(&mut p, &ip_ask("8.8.8.0/24", 6))), 403);
        let bind = AuthAsk { protocol: TunnelProtocol::ConnectUdpBind, ..ask("*", Some("Bearer t")) };
        assert_eq!(status(&decide(&mut p, &bind)), 403);
    }

    #[test]
    fn decisions() {
        let mut p = policy();
        assert_eq!(status(&decide(&mut p, &ask("127.0.0.1", None))), 407);
        assert_eq!(status(&decide(&mut p, &ask("127.0.0.1", Some("Bearer x")))), 407);
        assert_eq!(status(&decide(&mut p, &ask("10.0.0.1", Some("Bearer t")))), 403);
        match decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))) {
            Decision::Answer(Verdict::Allow {
                flow_id,
                target,
                idle_timeout_ms: 5000,
                byte_budget: 0,
                identity,
            }) => {
                assert_eq!(flow_id & ((1 << 40) - 1), 1, "first flow of this control start");
                assert_eq!(target, "127.0.0.1:53".parse().unwrap());
                let fp = crate::auth::TokenDigest::of("t").fingerprint();
                assert_eq!(identity, format!("tok:{fp}"), "the allow names the identity");
            }
            other => panic!("{other:?}"),
        }
        let fp = crate::auth::TokenDigest::of("t").fingerprint();
        assert_eq!(
            decide(&mut p, &ask("example.com", Some("Bearer t"))),
            Decision::Resolve {
                name: "example.com".into(),
                port: 53,
                requester: Requester {
                    identity: Identity::StaticToken(fp),
                    client: "127.0.0.1".parse().unwrap(),
                    ip_protocol: None,
                },
                upstream: None,
            }
        );
        assert_eq!(status(&decide(&mut p, &ask("bad host", Some("Bearer t")))), 400);
        assert_eq!(p.refusals().auth.get("missing"), Some(&1));
        assert_eq!(p.refusals().auth.get("unknown_static_token"), Some(&1));
    }

    #[test]
    fn schemes_are_dispatched_and_a_407_challenges_for_each_accepted_one() {
        use crate::privacy_pass::tests::{token_for, verifier_and_token};
        let now = Instant::now();
        let (pp, token) = verifier_and_token(2, NOW_UNIX, 1);
        let mut p = policy().with_privacy_pass(pp);
        let (d, id) = p.decide(&ask("127.0.0.1", Some(&token)), now, NOW_UNIX);
        assert!(matches!(d, Decision::Answer(Verdict::Allow { .. })), "{d:?}");
        let Identity::PrivacyPass(key) = &id else { panic!("{id:?}") };
        assert!(key.starts_with("pp:blind-rsa:") && key.len() == "pp:blind-rsa:".len() + 16, "{key}");
        // A replay: 407, its details, both schemes challenged.
        let (d, _) = p.decide(&ask("127.0.0.1", Some(&token)), now, NOW_UNIX);
        let Decision::Answer(Verdict::Authenticate { details, challenges }) = d else { panic!("{d:?}") };
        assert_eq!(details, "token replayed");
        assert_eq!(challenges.len(), 2);
        assert_eq!(challenges[0], "Bearer realm=\"masque\"");
        assert!(challenges[1].starts_with("PrivateToken challenge="));
        assert_eq!(p.refusals().auth.get("pp_replayed"), Some(&1));
        // Bearer still works; with bearer off it is an unsupported scheme
        // and the 407 challenges for Privacy Pass only.
        assert!(matches!(
            decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))),
            Decision::Answer(Verdict::Allow { .. })
        ));
        let mut p = p.with_schemes(Schemes { bearer: false, realm: "r".into() });
        let d = decide(&mut p, &ask("127.0.0.1", Some("Bearer t")));
        let Decision::Answer(Verdict::Authenticate { details, challenges }) = d else { panic!("{d:?}") };
        assert_eq!(details, "unsupported authentication scheme");
        assert_eq!(challenges.len(), 1);
        // A full spent-token store: 503, not the client's doing.
        let second = token_for(p.privacy_pass().unwrap(), NOW_UNIX, 2);
        assert!(matches!(
            decide(&mut p, &ask("127.0.0.1", Some(&second))),
            Decision::Answer(Verdict::Allow { .. })
        ));
        let third = token_for(p.privacy_pass().unwrap(), NOW_UNIX, 3);
        let d = decide(&mut p, &ask("127.0.0.1", Some(&third)));
        assert_eq!(
            d,
            Decision::Answer(Verdict::Deny {
                status: 503,
                proxy_error: Some(ProxyError::ProxyInternalError),
                details: "spent-token store full".into(),
                retry_after_secs: 0,
            })
        );
        // Every tunnel kind takes a token: connect-ip, bound UDP, TCP CONNECT.
        let (pp, first) = verifier_and_token(10, NOW_UNIX, 10);
        let mut every = policy()
            .with_protocols(ProtocolsSection { connect_ip: true, bind: true, ..Default::default() })
            .with_privacy_pass(pp);
        let second = token_for(every.privacy_pass().unwrap(), NOW_UNIX, 11);
        let third = token_for(every.privacy_pass().unwrap(), NOW_UNIX, 12);
        let ip = AuthAsk { authorization: Some(first), ..ip_ask("127.0.0.1", 17) };
        assert!(matches!(decide(&mut every, &ip), Decision::Answer(Verdict::AllowIp { .. })));
        let bind = AuthAsk { protocol: TunnelProtocol::ConnectUdpBind, ..ask("*", Some(&second)) };
        assert!(matches!(decide(&mut every, &bind), Decision::Answer(Verdict::AllowBind { .. })));
        let tcp = tcp_ask("127.0.0.1", 443, Some(&third));
        assert!(matches!(decide(&mut every, &tcp), Decision::Answer(Verdict::Allow { .. })));
        // Without Privacy Pass a PrivateToken credential is an unsupported
        // scheme, and the 407 is the bearer challenge alone.
        let mut plain = policy();
        let d = decide(&mut plain, &ask("127.0.0.1", Some(&token)));
        let Decision::Answer(Verdict::Authenticate { details, challenges }) = d else { panic!("{d:?}") };
        assert_eq!((details.as_str(), challenges.len()), ("unsupported authentication scheme", 1));
    }

    #[test]
    fn hmac_tokens_name_the_identity() {
        let mut p = policy();
        let token = p.auth().keys().mint(None, "alice", NOW_UNIX, 60).unwrap().token;
        let (d, id) = p.decide(&ask("127.0.0.1", Some(&format!("Bearer {token}"))), Instant::now(), NOW_UNIX);
        assert!(matches!(d, Decision::Answer(Verdict::Allow { .. })));
        assert_eq!(id, Identity::Subject("alice".into()));
        // Expired: the same 407 as any bad credential, a distinct counter.
        let (d, id) =
            p.decide(&ask("127.0.0.1", Some(&format!("Bearer {token}"))), Instant::now(), NOW_UNIX + 60);
        assert_eq!(
            d,
            Decision::Answer(Verdict::Authenticate {
                details: "invalid credentials".into(),
                challenges: vec!["Bearer realm=\"masque\"".into()],
            })
        );
        assert_eq!(id, Identity::Unknown);
        assert_eq!(p.refusals().auth.get("expired"), Some(&1));
    }

    #[test]
    fn quotas_refuse_with_429_and_release_on_close() {
        let limits =
            QuotaLimits { max_flows: 1, bytes_per_period: 1000, period_secs: 60, ..Default::default() };
        let mut p = policy().with_quotas(QuotaConfig { per_identity: limits, ..Default::default() });
        let now = Instant::now();
        let a = ask("127.0.0.1", Some("Bearer t"));
        let (d, _) = p.decide(&a, now, NOW_UNIX);
        let Decision::Answer(Verdict::Allow { flow_id, byte_budget, .. }) = d else { panic!("{d:?}") };
        assert_eq!(byte_budget, 1000);
        let (d, _) = p.decide(&a, now, NOW_UNIX);
        assert_eq!(
            d,
            Decision::Answer(Verdict::Deny {
                status: 429,
                proxy_error: Some(ProxyError::HttpRequestDenied),
                details: "quota exceeded: per_identity.max_flows".into(),
                retry_after_secs: 0,
            })
        );
        // Names are refused before resolution too.
        assert_eq!(status(&p.decide(&ask("example.com", Some("Bearer t")), now, NOW_UNIX).0), 429);
        p.flow_closed(flow_id, 400, now);
        let (d, _) = p.decide(&a, now, NOW_UNIX);
        let Decision::Answer(Verdict::Allow { flow_id, byte_budget: 600, .. }) = d else { panic!("{d:?}") };
        p.flow_closed(flow_id, 600, now);
        let (d, _) = p.decide(&a, now, NOW_UNIX);
        assert!(
            matches!(d, Decision::Answer(Verdict::Deny { status: 429, ref details, .. }) if details == "quota exceeded: per_identity.bytes_per_period")
        );
        assert_eq!(p.refusals().quota.get("per_identity.max_flows"), Some(&2));
        // A run-time override wins over the file's value.
        let mut state = p.runtime_state();
        state.quota_overrides.insert("per_identity.bytes_per_period".into(), 0);
        p.install(state).unwrap();
        assert!(matches!(
            p.decide(&a, now, NOW_UNIX).0,
            Decision::Answer(Verdict::Allow { byte_budget: 0, .. })
        ));
        let mut bad = p.runtime_state();
        bad.quota_overrides.insert("per_identity.burst".into(), 5);
        assert!(p.install(bad).unwrap_err().to_string().contains("per_identity.burst"));
    }

    #[test]
    fn disabled_connect_udp_is_refused() {
        let mut p = policy().with_protocols(ProtocolsSection { connect_udp: false, ..Default::default() });
        assert_eq!(status(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t")))), 501);
    }

    fn tcp_ask(host: &str, port: u16, auth: Option<&str>) -> AuthAsk {
        AuthAsk {
            target_port: port,
            path: String::new(),
            authority: format!("{host}:{port}"),
            protocol: TunnelProtocol::ConnectTcp,
            ..ask(host, auth)
        }
    }

    fn allowed_target(d: &Decision) -> SocketAddr {
        match d {
            Decision::Answer(Verdict::Allow { target, .. }) => *target,
            other => panic!("not an allow: {other:?}"),
        }
    }

    fn denial(d: &Decision) -> (u16, Option<ProxyError>, &str) {
        match d {
            Decision::Answer(Verdict::Deny { status, proxy_error, details, .. }) => {
                (*status, *proxy_error, details.as_str())
            }
            other => panic!("not a denial: {other:?}"),
        }
    }

    #[test]
    fn tcp_connect_to_an_allowed_ip_is_an_allow_with_that_target() {
        let mut p = policy();
        assert!(p.protocols().connect_tcp, "TCP CONNECT is on by default");
        let d = decide(&mut p, &tcp_ask("8.8.8.8", 443, Some("Bearer t")));
        assert_eq!(allowed_target(&d), "8.8.8.8:443".parse().unwrap());
        let Decision::Answer(Verdict::Allow { idle_timeout_ms, byte_budget, identity, .. }) = d else {
            unreachable!()
        };
        let fp = crate::auth::TokenDigest::of("t").fingerprint();
        assert_eq!((idle_timeout_ms, byte_budget, identity), (5000, 0, format!("tok:{fp}")));
        // IPv6 literals, and loopback, which this policy allows explicitly.
        let d = decide(&mut p, &tcp_ask("2001:4860:4860::8888", 853, Some("Bearer t")));
        assert_eq!(allowed_target(&d), "[2001:4860:4860::8888]:853".parse().unwrap());
        let d = decide(&mut p, &tcp_ask("127.0.0.1", 22, Some("Bearer t")));
        assert_eq!(allowed_target(&d), "127.0.0.1:22".parse().unwrap());
        // Credentials as for connect-udp.
        assert_eq!(status(&decide(&mut p, &tcp_ask("8.8.8.8", 443, None))), 407);
        assert_eq!(status(&decide(&mut p, &tcp_ask("8.8.8.8", 443, Some("Bearer x")))), 407);
        assert_eq!(status(&decide(&mut p, &tcp_ask("bad host", 443, Some("Bearer t")))), 400);
    }

    #[test]
    fn tcp_connect_to_special_purpose_targets_is_denied_unless_allowed() {
        let mut p = policy();
        for host in [
            "10.0.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            let d = decide(&mut p, &tcp_ask(host, 443, Some("Bearer t")));
            assert_eq!(
                denial(&d),
                (403, Some(ProxyError::DestinationIpProhibited), "target address not allowed"),
                "{host}"
            );
        }
        // `[targets] deny` wins for TCP too.
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![3; 32])).unwrap();
        let mut p = Policy::new(
            Authenticator::new(["t"], keys, AuthState::default()),
            TargetAcl::new(vec!["10.1.0.0/16".parse().unwrap()], vec!["8.8.8.0/24".parse().unwrap()], vec![]),
            5000,
        );
        assert_eq!(status(&decide(&mut p, &tcp_ask("8.8.8.8", 443, Some("Bearer t")))), 403);
        let d = decide(&mut p, &tcp_ask("10.1.2.3", 5432, Some("Bearer t")));
        assert_eq!(allowed_target(&d), "10.1.2.3:5432".parse().unwrap(), "allowed explicitly");
    }

    #[test]
    fn tcp_connect_to_a_name_resolves_then_checks_the_addresses() {
        let mut p = policy();
        let d = decide(&mut p, &tcp_ask("example.com", 443, Some("Bearer t")));
        let Decision::Resolve { name, port, requester, upstream: None } = d else { panic!("{d:?}") };
        assert_eq!((name.as_str(), port), ("example.com", 443));
        assert_eq!(requester.ip_protocol, None, "resolved like connect-udp, not connect-ip");
        let now = Instant::now();
        // The first allowed address wins; private ones are skipped.
        let v = p.after_resolution(
            &requester,
            port,
            Ok(vec!["10.0.0.1".parse().unwrap(), "93.184.216.34".parse().unwrap()]),
            now,
        );
        assert!(matches!(v, Verdict::Allow { target, .. } if target == "93.184.216.34:443".parse().unwrap()));
        let v = p.after_resolution(&requester, port, Ok(vec!["192.168.0.7".parse().unwrap()]), now);
        assert!(matches!(
            v,
            Verdict::Deny { status: 403, proxy_error: Some(ProxyError::DestinationIpProhibited), .. }
        ));
        let v = p.after_resolution(&requester, port, Err(ResolveFailure::NotFound("NXDOMAIN".into())), now);
        assert!(matches!(v, Verdict::Deny { status: 502, proxy_error: Some(ProxyError::DnsError), .. }));
        // A used-up quota refuses before resolution, and TCP and UDP flows
        // count against the same quotas.
        let limits = QuotaLimits { max_flows: 1, ..Default::default() };
        let mut p = policy().with_quotas(QuotaConfig { per_identity: limits, ..Default::default() });
        allowed_target(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))));
        let d = decide(&mut p, &tcp_ask("example.com", 443, Some("Bearer t")));
        assert_eq!(
            denial(&d),
            (429, Some(ProxyError::HttpRequestDenied), "quota exceeded: per_identity.max_flows")
        );
        assert_eq!(status(&decide(&mut p, &tcp_ask("8.8.8.8", 443, Some("Bearer t")))), 429);
    }

    #[test]
    fn disabled_tcp_connect_is_refused_with_501_and_nothing_else_is() {
        let mut p = policy().with_protocols(ProtocolsSection { connect_tcp: false, ..Default::default() });
        for auth in [Some("Bearer t"), None] {
            let d = decide(&mut p, &tcp_ask("8.8.8.8", 443, auth));
            assert_eq!(denial(&d), (501, None, "TCP CONNECT is disabled"));
        }
        assert_eq!(denial(&decide(&mut p, &tcp_ask("example.com", 443, Some("Bearer t")))).0, 501);
        allowed_target(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))));
        // And connect-udp's flag does not turn TCP off.
        let mut p = policy().with_protocols(ProtocolsSection { connect_udp: false, ..Default::default() });
        allowed_target(&decide(&mut p, &tcp_ask("8.8.8.8", 443, Some("Bearer t"))));
        assert_eq!(
            denial(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t")))),
            (501, None, "connect-udp is disabled")
        );
    }

    #[test]
    fn tcp_connect_honours_port_restrictions() {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![3; 32])).unwrap();
        let mut p = Policy::new(
            Authenticator::new(["t"], keys, AuthState::default()),
            TargetAcl::new(vec![], vec![], vec!["443".parse().unwrap(), "8000-8080".parse().unwrap()]),
            5000,
        );
        // Unlike bound and IP tunnels, a TCP tunnel has one port: enforced.
        for port in [443, 8000, 8080] {
            let d = decide(&mut p, &tcp_ask("8.8.8.8", port, Some("Bearer t")));
            assert_eq!(allowed_target(&d).port(), port);
        }
        for port in [80, 7999, 8081, 25] {
            let d = decide(&mut p, &tcp_ask("8.8.8.8", port, Some("Bearer t")));
            assert_eq!(
                denial(&d),
                (403, Some(ProxyError::DestinationIpProhibited), "target port not allowed"),
                "{port}"
            );
        }
        // After resolution too.
        let d = decide(&mut p, &tcp_ask("example.com", 25, Some("Bearer t")));
        let Decision::Resolve { port, requester, .. } = d else { panic!("{d:?}") };
        let v =
            p.after_resolution(&requester, port, Ok(vec!["93.184.216.34".parse().unwrap()]), Instant::now());
        assert!(
            matches!(v, Verdict::Deny { status: 403, ref details, .. } if details == "target port not allowed")
        );
    }

    fn ws_ask(authority: &str, path: &str, auth: Option<&str>) -> AuthAsk {
        AuthAsk {
            authority: authority.into(),
            path: path.into(),
            target_host: String::new(),
            target_port: 0,
            protocol: TunnelProtocol::WebSocket,
            ..ask("", auth)
        }
    }

    /// A policy with these `[[upstreams]]` routes (each its TOML keys).
    fn with_routes(p: Policy, routes: &[&str]) -> Policy {
        let routes = routes.iter().map(|r| crate::upstreams::tests::route(r)).collect();
        p.with_upstreams(Upstreams::new(routes))
    }

    const CHAT: &str = "name = \"chat\"\nhosts = [\"chat.example\"]\npath_prefix = \"/chat/\"\n\
                        origin = \"ws://127.0.0.1:9001\"\nprefix_rewrite = \"/\"\n";
    const PUBLIC: &str = "name = \"pub\"\npath_prefix = \"/public/\"\norigin = \"ws://127.0.0.2:9002\"\n\
                          auth = \"public\"\nhost_header = \"pub.internal\"\nidle_timeout_secs = 30\n";

    fn upstream_allow(d: &Decision) -> (SocketAddr, u32, &str, &str, &str, &str) {
        match d {
            Decision::Answer(Verdict::AllowUpstream {
                target,
                idle_timeout_ms,
                identity,
                route,
                host,
                path,
                ..
            }) => (*target, *idle_timeout_ms, identity, route, host, path),
            other => panic!("not an upstream allow: {other:?}"),
        }
    }

    #[test]
    fn websocket_is_refused_with_501_without_a_route() {
        let mut p = policy();
        for auth in [Some("Bearer t"), None] {
            let d = decide(&mut p, &ws_ask("chat.example", "/chat/", auth));
            assert_eq!(denial(&d), (501, None, "websocket is disabled"));
        }
    }

    #[test]
    fn websocket_asks_take_the_first_matching_route_or_get_404() {
        let mut p = with_routes(policy(), &[CHAT, PUBLIC]);
        let d = decide(&mut p, &ws_ask("Chat.Example:443", "/chat/room?x=1", Some("Bearer t")));
        let fp = crate::auth::TokenDigest::of("t").fingerprint();
        let tok = format!("tok:{fp}");
        assert_eq!(
            upstream_allow(&d),
            ("127.0.0.1:9001".parse().unwrap(), 5000, tok.as_str(), "chat", "127.0.0.1:9001", "/room?x=1")
        );
        // Not one of the route's hosts, or not under its prefix: 404.
        for (authority, path) in
            [("other.example", "/chat/room"), ("chat.example", "/chat"), ("chat.example", "/")]
        {
            let d = decide(&mut p, &ws_ask(authority, path, Some("Bearer t")));
            assert_eq!(denial(&d), (404, None, "no upstream route"), "{authority} {path}");
        }
        // Even without credentials: the route decides whether any are asked.
        assert_eq!(denial(&decide(&mut p, &ws_ask("chat.example", "/x/", None))).0, 404);
        // Paths that would leave the prefix, or make no request target: 400.
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/../admin", Some("Bearer t")));
        assert_eq!(denial(&d), (400, Some(ProxyError::HttpRequestError), "the path has dot segments"));
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/a b", Some("Bearer t")));
        assert_eq!(denial(&d), (400, Some(ProxyError::HttpRequestError), "invalid upstream path"));
        // Other protocols are untouched by the routes.
        allowed_target(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))));
    }

    #[test]
    fn relay_routes_ask_for_credentials_and_public_routes_do_not() {
        let mut p = with_routes(policy(), &[CHAT, PUBLIC]);
        assert_eq!(status(&decide(&mut p, &ws_ask("chat.example", "/chat/", None))), 407);
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/", Some("Bearer wrong")));
        let Decision::Answer(Verdict::Authenticate { details, challenges }) = d else { panic!("{d:?}") };
        assert_eq!(
            (details.as_str(), challenges),
            ("invalid credentials", vec!["Bearer realm=\"masque\"".to_string()])
        );
        // Public: no credentials needed (and any sent are not looked at).
        for auth in [None, Some("Bearer wrong")] {
            let (d, identity) =
                p.decide(&ws_ask("anything.example", "/public/x?y", auth), Instant::now(), NOW_UNIX);
            assert_eq!(identity, Identity::Public);
            assert_eq!(
                upstream_allow(&d),
                ("127.0.0.2:9002".parse().unwrap(), 30_000, "", "pub", "pub.internal", "/public/x?y")
            );
        }
        assert_eq!(p.refusals().auth.get("missing"), Some(&1));
    }

    #[test]
    fn public_routes_count_quotas_per_client_address() {
        let one = QuotaLimits { max_flows: 1, ..Default::default() };
        let mut p = with_routes(policy(), &[PUBLIC])
            .with_quotas(QuotaConfig { per_identity: one, ..Default::default() });
        // No identity: the per-identity limit does not bind them.
        for _ in 0..3 {
            upstream_allow(&decide(&mut p, &ws_ask("x", "/public/", None)));
        }
        let mut p = with_routes(policy(), &[PUBLIC])
            .with_quotas(QuotaConfig { per_client: one, ..Default::default() });
        let d = decide(&mut p, &ws_ask("x", "/public/", None));
        let Decision::Answer(Verdict::AllowUpstream { flow_id, .. }) = d else { panic!("{d:?}") };
        let d = decide(&mut p, &ws_ask("x", "/public/", None));
        assert_eq!(
            denial(&d),
            (429, Some(ProxyError::HttpRequestDenied), "quota exceeded: per_client.max_flows")
        );
        // Tunnels from that address count against the same limit.
        assert_eq!(status(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t")))), 429);
        p.flow_closed(flow_id, 0, Instant::now());
        upstream_allow(&decide(&mut p, &ws_ask("x", "/public/", None)));
    }

    #[test]
    fn origins_are_checked_by_the_target_policy_unless_trusted() {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![3; 32])).unwrap();
        // Loopback is denied, as by default.
        let strict = || {
            Policy::new(
                Authenticator::new(["t"], keys.clone(), AuthState::default()),
                TargetAcl::new(vec![], vec![], vec![]),
                5000,
            )
        };
        let mut p = with_routes(strict(), &[CHAT]);
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(
            denial(&d),
            (403, Some(ProxyError::DestinationIpProhibited), "target address not allowed")
        );
        let trusted = format!("{CHAT}trusted_origin = true\n");
        let mut p = with_routes(strict(), &[&trusted]);
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(upstream_allow(&d).0, "127.0.0.1:9001".parse().unwrap());
        // Credentials are still asked for on a trusted origin.
        assert_eq!(status(&decide(&mut p, &ws_ask("chat.example", "/chat/", None))), 407);
        // Port restrictions are part of the target policy.
        let ports = Policy::new(
            Authenticator::new(["t"], keys.clone(), AuthState::default()),
            TargetAcl::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec!["443".parse().unwrap()]),
            5000,
        );
        let mut p = with_routes(ports, &[CHAT]);
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(denial(&d), (403, Some(ProxyError::DestinationIpProhibited), "target port not allowed"));
    }

    #[test]
    fn named_origins_are_resolved_then_answered_with_an_upstream_allow() {
        let echo = "name = \"echo\"\npath_prefix = \"/\"\norigin = \"ws://Echo.Internal:9001\"\n";
        let mut p = with_routes(policy(), &[echo]);
        let d = decide(&mut p, &ws_ask("relay.example", "/socket?room=1", Some("Bearer t")));
        let Decision::Resolve { name, port, requester, upstream: Some(upstream) } = d else {
            panic!("{d:?}")
        };
        assert_eq!((name.as_str(), port, requester.ip_protocol), ("echo.internal", 9001, None));
        assert_eq!(
            upstream,
            UpstreamTarget {
                route: "echo".into(),
                host: "Echo.Internal:9001".into(),
                path: "/socket?room=1".into(),
                trusted_origin: false,
                idle_timeout_ms: 5000,
            }
        );
        let now = Instant::now();
        // The first allowed address wins; private ones are skipped.
        let addrs = || Ok(vec!["10.0.0.1".parse().unwrap(), "93.184.216.34".parse().unwrap()]);
        let v = p.after_upstream_resolution(&requester, port, &upstream, addrs(), now);
        let Verdict::AllowUpstream { target, route, host, path, .. } = &v else { panic!("{v:?}") };
        assert_eq!(*target, "93.184.216.34:9001".parse().unwrap());
        assert_eq!(
            (route.as_str(), host.as_str(), path.as_str()),
            ("echo", "Echo.Internal:9001", "/socket?room=1")
        );
        let v = p.after_upstream_resolution(
            &requester,
            port,
            &upstream,
            Ok(vec!["10.0.0.1".parse().unwrap()]),
            now,
        );
        assert!(matches!(
            v,
            Verdict::Deny { status: 403, proxy_error: Some(ProxyError::DestinationIpProhibited), .. }
        ));
        // A trusted origin resolving to a private address.
        let trusted = UpstreamTarget { trusted_origin: true, ..upstream.clone() };
        let v = p.after_upstream_resolution(
            &requester,
            port,
            &trusted,
            Ok(vec!["10.0.0.1".parse().unwrap()]),
            now,
        );
        assert!(
            matches!(v, Verdict::AllowUpstream { target, .. } if target == "10.0.0.1:9001".parse().unwrap())
        );
        // DNS failures as for tunnels.
        let v = p.after_upstream_resolution(
            &requester,
            port,
            &upstream,
            Err(ResolveFailure::NotFound("NXDOMAIN".into())),
            now,
        );
        assert!(matches!(v, Verdict::Deny { status: 502, proxy_error: Some(ProxyError::DnsError), .. }));
        let v = p.after_upstream_resolution(&requester, port, &upstream, Err(ResolveFailure::Timeout), now);
        assert!(matches!(v, Verdict::Deny { status: 504, proxy_error: Some(ProxyError::DnsTimeout), .. }));
        // An exhausted quota refuses before resolution.
        let one = QuotaLimits { max_flows: 1, ..Default::default() };
        let mut p = with_routes(policy(), &[echo])
            .with_quotas(QuotaConfig { per_identity: one, ..Default::default() });
        allowed_target(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))));
        let d = decide(&mut p, &ws_ask("relay.example", "/", Some("Bearer t")));
        assert_eq!(
            denial(&d),
            (429, Some(ProxyError::HttpRequestDenied), "quota exceeded: per_identity.max_flows")
        );
    }

    fn wt_ask(authority: &str, path: &str, auth: Option<&str>) -> AuthAsk {
        AuthAsk { protocol: TunnelProtocol::WebTransport, ..ws_ask(authority, path, auth) }
    }

    const WT: &str = "name = \"wt\"\nprotocol = \"webtransport\"\nhosts = [\"chat.example\"]\n\
                      path_prefix = \"/chat/\"\norigin = \"https://127.0.0.3:4443\"\nprefix_rewrite = \"/wt/\"\n";

    #[test]
    fn webtransport_is_refused_with_501_without_a_webtransport_route() {
        // No route at all, or only websocket routes.
        for mut p in [policy(), with_routes(policy(), &[CHAT, PUBLIC])] {
            for auth in [Some("Bearer t"), None] {
                let d = decide(&mut p, &wt_ask("chat.example", "/chat/", auth));
                assert_eq!(denial(&d), (501, None, "webtransport is disabled"));
            }
        }
        // Only a webtransport route: WebSocket is the one disabled.
        let mut p = with_routes(policy(), &[WT]);
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(denial(&d), (501, None, "websocket is disabled"));
    }

    #[test]
    fn webtransport_asks_take_webtransport_routes_only() {
        // The websocket route CHAT comes first and matches the same host
        // and path: a WebTransport ask skips it, and a WebSocket ask
        // never takes WT.
        let mut p = with_routes(policy(), &[CHAT, WT]);
        let fp = crate::auth::TokenDigest::of("t").fingerprint();
        let tok = format!("tok:{fp}");
        let (d, identity) = p.decide(
            &wt_ask("Chat.Example:443", "/chat/room?x=1", Some("Bearer t")),
            Instant::now(),
            NOW_UNIX,
        );
        assert_eq!(identity.to_string(), tok);
        assert_eq!(
            upstream_allow(&d),
            ("127.0.0.3:4443".parse().unwrap(), 5000, tok.as_str(), "wt", "127.0.0.3:4443", "/wt/room?x=1")
        );
        let d = decide(&mut p, &ws_ask("chat.example", "/chat/room", Some("Bearer t")));
        assert_eq!(upstream_allow(&d).3, "chat");
        // PUBLIC serves websocket only: 404 for WebTransport under its
        // prefix.
        let mut p = with_routes(policy(), &[PUBLIC, WT]);
        let d = decide(&mut p, &wt_ask("x", "/public/", None));
        assert_eq!(denial(&d), (404, None, "no upstream route"));
        upstream_allow(&decide(&mut p, &ws_ask("x", "/public/", None)));
        // Not one of the route's hosts, or not under its prefix: 404; bad
        // paths 400; credentials asked for (auth relay by default).
        for (authority, path) in [("other.example", "/chat/room"), ("chat.example", "/chat")] {
            let d = decide(&mut p, &wt_ask(authority, path, Some("Bearer t")));
            assert_eq!(denial(&d), (404, None, "no upstream route"), "{authority} {path}");
        }
        let d = decide(&mut p, &wt_ask("chat.example", "/chat/%2e%2e/admin", Some("Bearer t")));
        assert_eq!(denial(&d), (400, Some(ProxyError::HttpRequestError), "the path has dot segments"));
        assert_eq!(status(&decide(&mut p, &wt_ask("chat.example", "/chat/", None))), 407);
        // Public webtransport routes, host_header, idle timeout.
        let public = "name = \"wtpub\"\nprotocol = \"webtransport\"\npath_prefix = \"/\"\n\
                      origin = \"https://127.0.0.4\"\nauth = \"public\"\nhost_header = \"wt.internal\"\n\
                      idle_timeout_secs = 7\n";
        let mut p = with_routes(policy(), &[public]);
        let (d, identity) = p.decide(&wt_ask("relay.example", "/echo", None), Instant::now(), NOW_UNIX);
        assert_eq!(identity, Identity::Public);
        assert_eq!(
            upstream_allow(&d),
            ("127.0.0.4:443".parse().unwrap(), 7000, "", "wtpub", "wt.internal", "/echo")
        );
    }

    #[test]
    fn webtransport_origins_are_checked_resolved_and_counted_like_websocket_ones() {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![3; 32])).unwrap();
        let strict = || {
            Policy::new(
                Authenticator::new(["t"], keys.clone(), AuthState::default()),
                TargetAcl::new(vec![], vec![], vec![]),
                5000,
            )
        };
        // Loopback denied by the target policy unless trusted.
        let mut p = with_routes(strict(), &[WT]);
        let d = decide(&mut p, &wt_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(
            denial(&d),
            (403, Some(ProxyError::DestinationIpProhibited), "target address not allowed")
        );
        let trusted = format!("{WT}trusted_origin = true\n");
        let mut p = with_routes(strict(), &[&trusted]);
        let d = decide(&mut p, &wt_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(upstream_allow(&d).0, "127.0.0.3:4443".parse().unwrap());
        // A named origin: resolved, then the first allowed address (the
        // UDP port of the origin; 443 when not written).
        let named = "name = \"wtn\"\nprotocol = \"webtransport\"\npath_prefix = \"/\"\n\
                     origin = \"https://WT.Example\"\n";
        let mut p = with_routes(policy(), &[named]);
        let d = decide(&mut p, &wt_ask("relay.example", "/s?k=v", Some("Bearer t")));
        let Decision::Resolve { name, port, requester, upstream: Some(upstream) } = d else {
            panic!("{d:?}")
        };
        assert_eq!((name.as_str(), port), ("wt.example", 443));
        let v = p.after_upstream_resolution(
            &requester,
            port,
            &upstream,
            Ok(vec!["10.0.0.1".parse().unwrap(), "93.184.216.34".parse().unwrap()]),
            Instant::now(),
        );
        let Verdict::AllowUpstream { target, route, host, path, .. } = &v else { panic!("{v:?}") };
        assert_eq!(*target, "93.184.216.34:443".parse().unwrap());
        assert_eq!((route.as_str(), host.as_str(), path.as_str()), ("wtn", "WT.Example", "/s?k=v"));
        // Quotas: WebTransport flows count with the others.
        let one = QuotaLimits { max_flows: 1, ..Default::default() };
        let mut p =
            with_routes(policy(), &[WT]).with_quotas(QuotaConfig { per_identity: one, ..Default::default() });
        allowed_target(&decide(&mut p, &ask("127.0.0.1", Some("Bearer t"))));
        let d = decide(&mut p, &wt_ask("chat.example", "/chat/", Some("Bearer t")));
        assert_eq!(
            denial(&d),
            (429, Some(ProxyError::HttpRequestDenied), "quota exceeded: per_identity.max_flows")
        );
    }

    #[test]
    fn resolution_outcomes() {
        let mut p = policy();
        let r = Requester {
            identity: Identity::Subject("a".into()),
            client: "127.0.0.1".parse().unwrap(),
            ip_protocol: None,
        };
        let now = Instant::now();
        let v = p.after_resolution(
            &r,
            53,
            Ok(vec!["10.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()]),
            now,
        );
        assert!(matches!(v, Verdict::Allow { target, .. } if target.ip().to_string() == "127.0.0.2"));
        let v = p.after_resolution(&r, 53, Ok(vec!["10.0.0.1".parse().unwrap()]), now);
        assert!(matches!(
            v,
            Verdict::Deny { status: 403, proxy_error: Some(ProxyError::DestinationIpProhibited), .. }
        ));
        let v = p.after_resolution(&r, 53, Err(ResolveFailure::NotFound("NXDOMAIN".into())), now);
        assert!(matches!(v, Verdict::Deny { status: 502, proxy_error: Some(ProxyError::DnsError), .. }));
        let v = p.after_resolution(&r, 53, Err(ResolveFailure::Timeout), now);
        assert!(matches!(v, Verdict::Deny { status: 504, proxy_error: Some(ProxyError::DnsTimeout), .. }));
        let v = p.after_resolution(&r, 53, Err(ResolveFailure::Busy), now);
        assert!(matches!(v, Verdict::Deny { status: 503, .. }));
    }
}

//! Records a worker sends to control (the asks ring), and their payload
//! codecs.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use super::cert::ClientCert;
use super::wire::{Reader, Writer};
use super::{
    IpAssignment, MAX_AUTHORITY, MAX_AUTHORIZATION, MAX_IP_ASSIGNMENTS, MAX_PATH, MAX_SIGN_INPUT,
    MAX_TARGET_HOST, RecordError,
};

/// What kind of tunnel an [`AuthAsk`] is for. The wire value is the ask's
/// last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TunnelProtocol {
    /// connect-udp (RFC 9298).
    ConnectUdp = 0,
    /// connect-ip (RFC 9484). `target_host` is the scope target (`*`, an
    /// address or prefix, or a name) and `target_port` the IP protocol
    /// (0..=255, or [`IPPROTO_ANY`]).
    ConnectIp = 1,
    /// Bound connect-udp (draft-ietf-masque-connect-udp-listen).
    /// `target_host`/`target_port` are the fallback target, or `*`/0.
    ConnectUdpBind = 2,
    /// Classic CONNECT to a TCP target (RFC 9110 section 9.3.6, RFC 9114
    /// section 4.4). `target_host`/`target_port` are the target as for
    /// connect-udp, and the answer is [`Verdict::Allow`](super::Verdict::Allow)
    /// with the resolved, policy-checked address.
    ConnectTcp = 3,
    /// WebSocket relayed to an upstream origin (RFC 6455 over HTTP/1.1
    /// Upgrade, RFC 8441, RFC 9220). `authority`/`path` are the request's;
    /// `target_host` is empty and `target_port` 0: control picks the
    /// upstream by its `[[upstreams]]` routes and answers
    /// [`Verdict::AllowUpstream`](super::Verdict::AllowUpstream).
    WebSocket = 4,
    /// WebTransport over HTTP/3 (draft-ietf-webtrans-http3) relayed to an
    /// upstream origin over HTTP/3. Asked like [`Self::WebSocket`]:
    /// `authority`/`path` are the request's, control picks the
    /// `[[upstreams]]` route of protocol `webtransport` and answers
    /// [`Verdict::AllowUpstream`](super::Verdict::AllowUpstream).
    WebTransport = 5,
}

impl TunnelProtocol {
    /// The protocol a wire value names; `None` for values no build sends.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::ConnectUdp),
            1 => Some(Self::ConnectIp),
            2 => Some(Self::ConnectUdpBind),
            3 => Some(Self::ConnectTcp),
            4 => Some(Self::WebSocket),
            5 => Some(Self::WebTransport),
            _ => None,
        }
    }
}

/// `AuthAsk::target_port` of a connect-ip ask whose scope allows every IP
/// protocol.
pub const IPPROTO_ANY: u16 = 256;

/// A worker asks control whether to open a tunnel (connect-udp, connect-ip,
/// bound connect-udp or a TCP CONNECT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAsk {
    /// Worker-chosen ID echoed in the answer.
    pub ask_id: u64,
    /// The client's UDP address as the relay sees it.
    pub client: SocketAddr,
    /// `:authority`.
    pub authority: String,
    /// `:path`.
    pub path: String,
    /// Target host as in the request (IP literal or name).
    pub target_host: String,
    /// Target port.
    pub target_port: u16,
    /// `proxy-authorization` (or `authorization`) value, if any.
    pub authorization: Option<String>,
    /// The kind of tunnel asked for.
    pub protocol: TunnelProtocol,
    /// The client certificate the connection's TLS handshake verified
    /// (mutual TLS), if any.
    pub client_cert: Option<ClientCert>,
}

impl AuthAsk {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.ask_id)?;
        w.addr(self.client)?;
        w.u16(self.target_port)?;
        w.str(&self.authority, MAX_AUTHORITY, "authority")?;
        w.str(&self.path, MAX_PATH, "path")?;
        w.str(&self.target_host, MAX_TARGET_HOST, "target_host")?;
        w.u8(u8::from(self.authorization.is_some()))?;
        w.str(self.authorization.as_deref().unwrap_or(""), MAX_AUTHORIZATION, "authorization")?;
        w.u8(self.protocol as u8)?;
        w.u8(u8::from(self.client_cert.is_some()))?;
        match &self.client_cert {
            Some(cert) => cert.write(w),
            None => Ok(()),
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let ask_id = r.u64()?;
        let client = r.addr("client")?;
        let target_port = r.u16()?;
        let authority = r.str(MAX_AUTHORITY, "authority")?;
        let path = r.str(MAX_PATH, "path")?;
        let target_host = r.str(MAX_TARGET_HOST, "target_host")?;
        let has_auth = r.u8()?;
        let auth = r.str(MAX_AUTHORIZATION, "authorization")?;
        let authorization = match has_auth {
            0 if auth.is_empty() => None,
            1 => Some(auth),
            _ => return Err(RecordError::BadValue("authorization")),
        };
        let protocol = TunnelProtocol::from_u8(r.u8()?).ok_or(RecordError::BadValue("protocol"))?;
        let client_cert = if r.bool("client_cert")? { Some(ClientCert::read(r)?) } else { None };
        Ok(Self {
            ask_id,
            client,
            authority,
            path,
            target_host,
            target_port,
            authorization,
            protocol,
            client_cert,
        })
    }
}

/// A worker reports that a flow control allowed has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowClosed {
    /// Control's flow ID from the allow.
    pub flow_id: u64,
    /// Datagrams forwarded client -> target.
    pub packets_up: u64,
    /// Bytes forwarded client -> target (UDP payload).
    pub bytes_up: u64,
    /// Datagrams forwarded target -> client.
    pub packets_down: u64,
    /// Bytes forwarded target -> client.
    pub bytes_down: u64,
}

impl FlowClosed {
    /// The report for a flow that was allowed but never carried traffic
    /// (its request went away before the answer, or its socket failed).
    pub fn unused(flow_id: u64) -> Self {
        Self { flow_id, packets_up: 0, bytes_up: 0, packets_down: 0, bytes_down: 0 }
    }

    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        for v in [self.flow_id, self.packets_up, self.bytes_up, self.packets_down, self.bytes_down] {
            w.u64(v)?;
        }
        Ok(())
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        Ok(Self {
            flow_id: r.u64()?,
            packets_up: r.u64()?,
            bytes_up: r.u64()?,
            packets_down: r.u64()?,
            bytes_down: r.u64()?,
        })
    }
}

/// A worker tells a (re-)attached control about a flow that is open, so a
/// restarted control learns the live flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowOpen {
    /// The flow ID the allowing control gave it.
    pub flow_id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The target address.
    pub target: SocketAddr,
    /// The identity from the allow (empty when not known).
    pub identity: String,
    /// A connect-ip flow's assigned addresses (a restarted control leases
    /// them again); empty for connect-udp.
    pub addresses: Vec<IpAssignment>,
    /// The kind of tunnel.
    pub protocol: TunnelProtocol,
    /// An upstream flow's route name (empty for tunnels; else checked
    /// like [`AllowUpstream`](super::Verdict::AllowUpstream)'s).
    pub route: String,
}

impl FlowOpen {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.flow_id)?;
        w.addr(self.client)?;
        w.addr(self.target)?;
        w.identity(&self.identity)?;
        if self.addresses.len() > MAX_IP_ASSIGNMENTS {
            return Err(RecordError::BadValue("addresses"));
        }
        w.u8(self.addresses.len() as u8)?;
        self.addresses.iter().try_for_each(|a| w.prefix(a))?;
        w.u8(self.protocol as u8)?;
        if !self.route.is_empty() && !super::valid_route_name(&self.route) {
            return Err(RecordError::BadValue("route"));
        }
        w.str(&self.route, super::MAX_ROUTE_NAME, "route")
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let flow_id = r.u64()?;
        let client = r.addr("client")?;
        let target = r.addr("target")?;
        let identity = r.identity()?;
        let n = usize::from(r.u8()?);
        if n > MAX_IP_ASSIGNMENTS {
            return Err(RecordError::BadValue("addresses"));
        }
        let addresses = (0..n).map(|_| r.prefix()).collect::<Result<_, _>>()?;
        let protocol = TunnelProtocol::from_u8(r.u8()?).ok_or(RecordError::BadValue("protocol"))?;
        let route = r.str(super::MAX_ROUTE_NAME, "route")?;
        if !route.is_empty() && !super::valid_route_name(&route) {
            return Err(RecordError::BadValue("route"));
        }
        Ok(Self { flow_id, client, target, identity, addresses, protocol, route })
    }
}

/// A worker asks control to sign a TLS handshake (keyless TLS: the
/// private key never leaves control).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignAsk {
    /// Worker-chosen ID echoed in the answer.
    pub sign_id: u64,
    /// The TLS material generation the handshake started with: control
    /// signs with that generation's key (the current or the previous one).
    pub generation: u32,
    /// TLS SignatureScheme code point (RFC 8446 section 4.2.3), e.g.
    /// 0x0403 ecdsa_secp256r1_sha256, 0x0804 rsa_pss_rsae_sha256.
    pub algorithm: u16,
    /// The message to sign (not a digest).
    pub input: Vec<u8>,
}

impl SignAsk {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.sign_id)?;
        w.u32(self.generation)?;
        w.u16(self.algorithm)?;
        w.blob(&self.input, MAX_SIGN_INPUT, "input")
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        Ok(Self {
            sign_id: r.u64()?,
            generation: r.u32()?,
            algorithm: r.u16()?,
            input: r.blob(MAX_SIGN_INPUT, "input")?,
        })
    }
}

/// How a listed connection reaches the relay ([`ConnInfo::transport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Transport {
    /// QUIC (HTTP/3).
    H3 = 0,
    /// HTTP/2 over TLS over TCP.
    H2 = 1,
    /// HTTP/1.1 over TLS over TCP.
    Http1 = 2,
    /// HTTP/2 over cleartext TCP (prior knowledge or h2c Upgrade).
    H2c = 3,
    /// HTTP/1.1 over cleartext TCP.
    Http1Clear = 4,
    /// TCP, version not chosen yet (TLS handshake, or the cleartext
    /// listener still reading the first bytes).
    TcpPending = 5,
}

impl Transport {
    /// The transport a wire value names; `None` for values no build sends.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::H3),
            1 => Some(Self::H2),
            2 => Some(Self::Http1),
            3 => Some(Self::H2c),
            4 => Some(Self::Http1Clear),
            5 => Some(Self::TcpPending),
            _ => None,
        }
    }
}

/// One connection (QUIC, or the TCP front's), as a worker lists it for
/// `relayctl conns`. For TCP connections the packet and RTT figures are
/// the kernel's (`TCP_INFO`: segments, retransmissions, smoothed RTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The listing this answers.
    pub request_id: u64,
    /// How the connection reaches the relay.
    pub transport: Transport,
    /// The worker's serial number for the connection.
    pub conn_id: u64,
    /// The client's current address.
    pub client: SocketAddr,
    /// Milliseconds since the connection was accepted.
    pub age_ms: u64,
    /// The handshake completed.
    pub established: bool,
    /// The handshake resumed a session (no signature).
    pub resumed: bool,
    /// The TLS material generation it was accepted with.
    pub tls_generation: u32,
    /// Open tunnels (and requests waiting for control).
    pub tunnels: u32,
    /// Smoothed RTT in microseconds.
    pub rtt_us: u64,
    /// QUIC packets sent.
    pub packets_sent: u64,
    /// QUIC packets received.
    pub packets_recv: u64,
    /// QUIC packets declared lost.
    pub packets_lost: u64,
    /// Bytes sent (UDP payload).
    pub bytes_sent: u64,
    /// Bytes received (UDP payload).
    pub bytes_recv: u64,
    /// The largest tunnel payload (UDP payload or IP packet) an HTTP
    /// datagram can carry on the connection's path now: the usable inner
    /// MTU of its tunnels (0: datagrams unavailable).
    pub max_tunnel_payload: u32,
}

impl ConnInfo {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.request_id)?;
        w.u8(self.transport as u8)?;
        w.u64(self.conn_id)?;
        w.addr(self.client)?;
        w.u64(self.age_ms)?;
        w.u8(u8::from(self.established) | (u8::from(self.resumed) << 1))?;
        w.u32(self.tls_generation)?;
        w.u32(self.tunnels)?;
        for v in [
            self.rtt_us,
            self.packets_sent,
            self.packets_recv,
            self.packets_lost,
            self.bytes_sent,
            self.bytes_recv,
        ] {
            w.u64(v)?;
        }
        w.u32(self.max_tunnel_payload)
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let request_id = r.u64()?;
        let transport = Transport::from_u8(r.u8()?).ok_or(RecordError::BadValue("transport"))?;
        let conn_id = r.u64()?;
        let client = r.addr("client")?;
        let age_ms = r.u64()?;
        let flags = r.u8()?;
        if flags > 3 {
            return Err(RecordError::BadValue("flags"));
        }
        Ok(Self {
            request_id,
            transport,
            conn_id,
            client,
            age_ms,
            established: flags & 1 != 0,
            resumed: flags & 2 != 0,
            tls_generation: r.u32()?,
            tunnels: r.u32()?,
            rtt_us: r.u64()?,
            packets_sent: r.u64()?,
            packets_recv: r.u64()?,
            packets_lost: r.u64()?,
            bytes_sent: r.u64()?,
            bytes_recv: r.u64()?,
            max_tunnel_payload: r.u32()?,
        })
    }
}

/// A worker asks control to lease a specific address to an open connect-ip
/// flow (the client's ADDRESS_REQUEST for it, RFC 9484 section 4.7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressAsk {
    /// The flow (from its [`Verdict::AllowIp`](super::Verdict::AllowIp)).
    pub flow_id: u64,
    /// The client's request ID, echoed in the answer.
    pub request_id: u64,
    /// The address asked for.
    pub addr: IpAddr,
}

impl AddressAsk {
    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        w.u64(self.flow_id)?;
        w.u64(self.request_id)?;
        w.ip(self.addr)
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        Ok(Self { flow_id: r.u64()?, request_id: r.u64()?, addr: r.ip()? })
    }
}

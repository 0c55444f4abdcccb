//! A bound connect-udp client (draft-ietf-masque-connect-udp-listen): one
//! tunnel, many peers. Opens the tunnel, registers the uncompressed context
//! and compressed contexts (even IDs), sends to any peer and receives from
//! any peer with its address, following the proxy's own registrations (odd
//! IDs) as they come.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use relay_proto::bind::{self, BindCapsule};

use crate::client::{Answer, Client};

/// An open bound tunnel.
pub struct BoundTunnel {
    /// The request stream.
    pub stream_id: u64,
    /// Where peers reach us (Proxy-Public-Address).
    pub public: Vec<SocketAddr>,
    next_context: u64,
    uncompressed: Option<u64>,
    /// Peer -> context, ours (once ACKed) or the proxy's.
    compressed: HashMap<SocketAddr, u64>,
    /// Context -> peer, for received compressed datagrams.
    by_context: HashMap<u64, SocketAddr>,
    /// Our registrations waiting for an ACK: context -> peer (None:
    /// uncompressed).
    pending: HashMap<u64, Option<SocketAddr>>,
}

impl BoundTunnel {
    /// Opens a bound tunnel (both target variables `*`).
    pub fn open(client: &mut Client, timeout: Duration) -> Result<Self> {
        let headers = client.bind_headers();
        let stream_id = client.send_raw_request(&headers, false)?;
        let answer = client.wait_answer(stream_id, timeout)?;
        match &answer {
            a @ Answer::Response(_) if a.status().is_some_and(|s| (200..300).contains(&s)) => {}
            other => bail!("bound connect-udp refused: {other:?}"),
        }
        if !answer.header("connect-udp-bind").is_some_and(bind::bind_requested) {
            bail!("the relay did not confirm bound UDP (no connect-udp-bind: ?1): {answer:?}");
        }
        let public = bind::parse_proxy_public_address(
            answer.header("proxy-public-address").context("no Proxy-Public-Address")?,
        )
        .map_err(|e| anyhow!("Proxy-Public-Address: {e}"))?;
        Ok(Self {
            stream_id,
            public,
            next_context: 2,
            uncompressed: None,
            compressed: HashMap::new(),
            by_context: HashMap::new(),
            pending: HashMap::new(),
        })
    }

    fn allocate(&mut self) -> u64 {
        let id = self.next_context;
        self.next_context += 2;
        id
    }

    /// Registers a context (uncompressed when `peer` is None) and waits
    /// for the relay's COMPRESSION_ACK; false if it refused (CLOSE).
    fn register(&mut self, client: &mut Client, peer: Option<SocketAddr>, timeout: Duration) -> Result<bool> {
        let context_id = self.allocate();
        let mut capsule = Vec::new();
        bind::encode_capsule(&BindCapsule::Assign { context_id, target: peer }, &mut capsule);
        client.send_stream_bytes(self.stream_id, &capsule, false)?;
        self.pending.insert(context_id, peer);
        let deadline = Instant::now() + timeout;
        while self.pending.contains_key(&context_id) {
            if Instant::now() >= deadline {
                bail!("no COMPRESSION_ACK for context {context_id}");
            }
            client.drive(Duration::from_millis(10))?;
            self.handle_capsules(client)?;
        }
        Ok(match peer {
            None => self.uncompressed == Some(context_id),
            Some(p) => self.compressed.get(&p) == Some(&context_id),
        })
    }

    /// Opens the uncompressed context (any peer, address in each datagram).
    pub fn open_uncompressed(&mut self, client: &mut Client, timeout: Duration) -> Result<()> {
        if !self.register(client, None, timeout)? {
            bail!("the relay refused the uncompressed context");
        }
        Ok(())
    }

    /// Registers a compressed context for `peer`; false if refused.
    pub fn compress(&mut self, client: &mut Client, peer: SocketAddr, timeout: Duration) -> Result<bool> {
        self.register(client, Some(peer), timeout)
    }

    /// Closes the uncompressed context (only registered peers get through
    /// afterwards, draft section 8.1).
    pub fn close_uncompressed(&mut self, client: &mut Client) -> Result<()> {
        let Some(id) = self.uncompressed.take() else { return Ok(()) };
        let mut capsule = Vec::new();
        bind::encode_capsule(&BindCapsule::Close { context_id: id }, &mut capsule);
        client.send_stream_bytes(self.stream_id, &capsule, false)
    }

    /// The context a datagram to `peer` goes on, and whether it carries the
    /// address inline.
    pub fn context_for(&self, peer: SocketAddr) -> Option<(u64, bool)> {
        match self.compressed.get(&peer) {
            Some(id) => Some((*id, false)),
            None => self.uncompressed.map(|id| (id, true)),
        }
    }

    /// Sends `payload` to `peer` through the relay.
    pub fn send_to(&mut self, client: &mut Client, peer: SocketAddr, payload: &[u8]) -> Result<bool> {
        let (id, inline) = self.context_for(peer).context("no context for this peer")?;
        if inline {
            let mut out = Vec::with_capacity(payload.len() + 19);
            bind::encode_uncompressed(peer, payload, &mut out);
            client.send_context_datagram(self.stream_id, id, &out)
        } else {
            client.send_context_datagram(self.stream_id, id, payload)
        }
    }

    /// Reads the relay's compression capsules: ACKs of ours, its own
    /// registrations (which we accept), closes.
    fn handle_capsules(&mut self, client: &mut Client) -> Result<()> {
        let mut replies = Vec::new();
        for (t, v) in client.take_control_capsules(self.stream_id) {
            match bind::decode_capsule(t, &v).map_err(|e| anyhow!("capsule from the relay: {e}"))? {
                Some(BindCapsule::Ack { context_id }) => match self.pending.remove(&context_id) {
                    Some(None) => self.uncompressed = Some(context_id),
                    Some(Some(peer)) => {
                        self.compressed.insert(peer, context_id);
                        self.by_context.insert(context_id, peer);
                    }
                    None => bail!("COMPRESSION_ACK for context {context_id} we did not register"),
                },
                Some(BindCapsule::Assign { context_id, target: Some(peer) }) => {
                    // The relay's own registration for a peer (odd ID).
                    self.compressed.entry(peer).or_insert(context_id);
                    self.by_context.insert(context_id, peer);
                    replies.push(BindCapsule::Ack { context_id });
                }
                Some(BindCapsule::Assign { target: None, .. }) => {
                    bail!("the relay registered an uncompressed context (section 4: malformed)")
                }
                Some(BindCapsule::Close { context_id }) => {
                    self.pending.remove(&context_id);
                    if let Some(peer) = self.by_context.remove(&context_id) {
                        self.compressed.remove(&peer);
                    }
                    if self.uncompressed == Some(context_id) {
                        self.uncompressed = None;
                    }
                }
                None => {}
            }
        }
        if !replies.is_empty() {
            let mut out = Vec::new();
            for r in &replies {
                bind::encode_capsule(r, &mut out);
            }
            client.send_stream_bytes(self.stream_id, &out, false)?;
        }
        Ok(())
    }

    /// Drives the connection for up to `wait` and returns what peers sent
    /// (peer, payload, whether it came on a compressed context).
    pub fn recv(&mut self, client: &mut Client, wait: Duration) -> Result<Vec<(SocketAddr, Vec<u8>, bool)>> {
        client.drive(wait)?;
        self.handle_capsules(client)?;
        let mut out = Vec::new();
        for (ctx, payload) in client.take_context_datagrams(self.stream_id) {
            if Some(ctx) == self.uncompressed {
                if let Ok((peer, udp)) = bind::decode_uncompressed(&payload) {
                    out.push((peer, udp.to_vec(), false));
                }
            } else if let Some(peer) = self.by_context.get(&ctx) {
                out.push((*peer, payload, true));
            }
        }
        Ok(out)
    }
}

/// A STUN Binding Request (RFC 8489 section 5) with `transaction`.
pub fn stun_binding_request(transaction: [u8; 12]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&transaction);
    m
}

/// The XOR-MAPPED-ADDRESS of a STUN Binding success response for
/// `transaction` (RFC 8489 section 14.2).
pub fn stun_mapped_address(response: &[u8], transaction: [u8; 12]) -> Option<SocketAddr> {
    const COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    if response.len() < 20
        || response[0..2] != [0x01, 0x01]
        || response[4..8] != COOKIE
        || response[8..20] != transaction
    {
        return None;
    }
    let mut at = 20;
    while at + 4 <= response.len() {
        let kind = u16::from_be_bytes([response[at], response[at + 1]]);
        let len = usize::from(u16::from_be_bytes([response[at + 2], response[at + 3]]));
        let value = response.get(at + 4..at + 4 + len)?;
        if kind == 0x0020 && value.len() >= 8 {
            let port = u16::from_be_bytes([value[2], value[3]]) ^ 0x2112;
            return match value[1] {
                1 => {
                    let ip: [u8; 4] = std::array::from_fn(|i| value[4 + i] ^ COOKIE[i]);
                    Some(SocketAddr::from((ip, port)))
                }
                2 if value.len() >= 20 => {
                    let mut key = [0u8; 16];
                    key[..4].copy_from_slice(&COOKIE);
                    key[4..].copy_from_slice(&transaction);
                    let ip: [u8; 16] = std::array::from_fn(|i| value[4 + i] ^ key[i]);
                    Some(SocketAddr::from((ip, port)))
                }
                _ => None,
            };
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_requests_and_mapped_addresses() {
        let tx = [7u8; 12];
        let req = stun_binding_request(tx);
        assert_eq!(req.len(), 20);
        // A success response with XOR-MAPPED-ADDRESS 192.0.2.1:32853 (RFC
        // 5769 section 2.2's values).
        let mut resp = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        resp.extend_from_slice(&tx);
        resp.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
        assert_eq!(stun_mapped_address(&resp, tx), Some("192.0.2.1:32853".parse().unwrap()));
        assert_eq!(stun_mapped_address(&resp, [8u8; 12]), None, "another transaction");
        assert_eq!(stun_mapped_address(&resp[..20], tx), None);
    }
}

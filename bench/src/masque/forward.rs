//! The UDP forwarder (`masque-client udp`): a local UDP socket whose every
//! peer address gets its own connect-udp tunnel to one target, like
//! `h2o-httpclient -X`. Replies go back to the peer that the tunnel is
//! for. Peers are bounded; a peer's tunnel closes after an idle period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;

use super::HostPort;
use super::flows::{FlowTable, Routed, run_flow};
use super::transport::Transport;

/// The forwarder's settings.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// The local address to listen on.
    pub listen: SocketAddr,
    /// Where every peer's datagrams go.
    pub target: HostPort,
    /// Peers served at once.
    pub max_peers: usize,
    /// A peer's tunnel closes after this long without a datagram.
    pub idle: Duration,
}

/// Binds the local socket; [`serve`] then forwards.
pub async fn bind(cfg: &ForwardConfig) -> Result<UdpSocket> {
    UdpSocket::bind(cfg.listen).await.with_context(|| format!("binding --listen {}", cfg.listen))
}

/// Forwards until the process ends.
pub async fn serve(transport: Arc<Transport>, socket: UdpSocket, cfg: ForwardConfig) -> Result<()> {
    let socket = Arc::new(socket);
    let mut peers: FlowTable<SocketAddr> = FlowTable::new(cfg.max_peers);
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(v) => v,
            // ICMP errors from earlier sends to a peer that went away.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e).context("receiving on the local socket"),
        };
        let routed = peers.route(peer, buf[..n].to_vec(), |rx| {
            let (transport, socket, target, idle) =
                (transport.clone(), socket.clone(), cfg.target.clone(), cfg.idle);
            async move {
                tracing::info!("peer {peer}: opening a tunnel to {target}");
                run_flow(&transport, &target, rx, idle, |d| {
                    // A full socket buffer drops the reply, as the network would.
                    let _ = socket.try_send_to(&d, peer);
                })
                .await
            }
        });
        if routed == Routed::TableFull && peers.dropped.load(Ordering::Relaxed) % 1000 == 1 {
            tracing::warn!("{} peers are served already: datagrams from {peer} dropped", cfg.max_peers);
        }
    }
}

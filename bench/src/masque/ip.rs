//! connect-ip mode (`masque-client ip`): one connect-ip tunnel (RFC 9484)
//! on HTTP/3, its assigned addresses and advertised routes put on a local
//! TUN device, packets carried until interrupted ([`crate::iptunnel`]).
//! Creating the device needs CAP_NET_ADMIN.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Result, bail};
use relay_proto::ip::capsule::IpPrefix;

use super::{Http, RelaySpec};
use crate::client::Client;
use crate::iptunnel::{self, ClientTun, PumpStats};

/// The tunnel's settings.
#[derive(Debug, Clone)]
pub struct IpConfig {
    /// The connect-ip URI template.
    pub template: String,
    /// Scope: `*`, an address, a prefix or a name.
    pub scope_target: String,
    /// Scope: `*` or an IP protocol number.
    pub ipproto: String,
    /// The local TUN device.
    pub device: String,
    /// Its MTU.
    pub mtu: u32,
    /// Install routes only for advertised ranges inside these (empty:
    /// every advertised range, except the one holding the relay).
    pub routes: Vec<IpPrefix>,
    /// Stop after this long (default: when `stop` is set).
    pub duration: Option<Duration>,
}

/// Opens the tunnel, configures the device and carries packets until
/// `stop` is set, the time is up or the relay ends the tunnel; prints the
/// assignment and, at the end, the packet counts.
pub fn run(spec: &RelaySpec, cfg: &IpConfig, stop: &AtomicBool) -> Result<PumpStats> {
    if spec.http != Http::H3 {
        bail!("masque-client ip runs on HTTP/3 only (drop --http 2)");
    }
    let timeout = Duration::from_secs(10);
    let mut c = Client::connect(spec.h3_config(), timeout)?;
    c.wait_settings(timeout)?;
    let tunnel = iptunnel::open(&mut c, &cfg.template, &cfg.scope_target, &cfg.ipproto, timeout)?;
    let tun = ClientTun::create(&cfg.device, cfg.mtu, &tunnel.config, &cfg.routes, spec.relay.ip())?;
    for a in &tunnel.config.addresses {
        println!("assigned {a}");
    }
    for r in &tunnel.config.routes {
        println!("route {}-{} protocol {}", r.start, r.end, r.ip_protocol);
    }
    println!("tunnel up on {}; Ctrl-C to stop", cfg.device);
    let stats = iptunnel::pump(&mut c, &tunnel, &tun, stop, cfg.duration)?;
    println!("packets up {}, down {}, dropped {}", stats.up, stats.down, stats.dropped);
    c.close();
    Ok(stats)
}

//! `relay-control`: the MASQUE relay's control process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use relay_control::acl::TargetAcl;
use relay_control::admin::{self, Admin};
use relay_control::auth::Authenticator;
use relay_control::config::{AuthScheme, Config};
use relay_control::credentials::Credentials;
use relay_control::fleet::Fleet;
use relay_control::fleet::settings::FleetSettings;
use relay_control::fleet::ticket_sync::TicketSink;
use relay_control::logging::{self, LogFormat};
use relay_control::metrics::{self, ControlFigures, PrivacyPassFigures};
use relay_control::mtls::Mtls;
use relay_control::policy::{Policy, Schemes};
use relay_control::privacy_pass::KeySource;
use relay_control::privacy_pass::source::DirectorySource;
use relay_control::server::{self, Server, ServerSettings, Shared};
use relay_control::state;
use relay_control::store::PolicyStore;
use relay_proto::channel::bootstrap::{Bootstrap, PROTOCOL_VERSION};
use tracing::{error, info, warn};

/// The MASQUE relay's control process: credentials, policy, DNS, and the
/// shared-memory channel the dataplane attaches to.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML configuration file, holding only what differs from the
    /// defaults (`--print-default-config`); without it the demo config
    /// runs: the defaults (QUIC on 127.0.0.1:4433) plus loopback targets.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides relay.state_dir.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides `[dataplane.connection_ids] server_id` (hex): each host of
    /// a fleet has its own, e.g. derived from its address by the unit or
    /// container that starts it.
    #[arg(long)]
    server_id: Option<String>,
    /// Prints the embedded default configuration and exits.
    #[arg(long)]
    print_default_config: bool,
    /// Checks FILE without starting: prints the configuration in force
    /// (defaults merged, secrets redacted) and exits 0, or prints the error
    /// (line and key) and exits 1. The files it names are not read.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log lines as "text" (coloured only on a terminal without NO_COLOR)
    /// or "json" (one object per line); default: `[log] format`.
    #[arg(long, value_enum, env = "RELAY_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

/// SIGHUP reloads the certificate and key; SIGINT and SIGTERM stop.
extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing an async-signal-safe handler that only stores
        // to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn run(args: Args, mut config: Config) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = args.state_dir {
        config.relay.state_dir = dir;
    }
    let state_dir = config.relay.state_dir.clone();
    state::ensure_dir(&state_dir)?;
    let (cert, key) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let creds = state::self_signed(&state_dir, &config.tls.self_signed_names)?;
            if creds.generated {
                info!(cert = %creds.cert.display(), "generated a self-signed certificate");
            }
            (creds.cert, creds.key)
        }
    };
    // The dataplane reads these at attach; a missing or broken one is the
    // operator's to fix before anything starts.
    config.check_upstream_ca_files()?;
    let hmac_keys = config.hmac_keys()?;
    let bearer = config.auth.schemes.contains(&AuthScheme::Bearer);
    // The demo token only when bearer tokens are accepted and none at all
    // are configured.
    let tokens: Vec<String> = if bearer && config.auth.tokens.is_empty() && hmac_keys.is_empty() {
        let (token, generated) = state::demo_token(&state_dir)?;
        let path = state_dir.join("token");
        if generated {
            info!(path = %path.display(), "generated an auth token");
        }
        println!("auth token (from {}): {token}", path.display());
        vec![token]
    } else {
        config.auth.tokens.iter().map(|t| t.expose().to_string()).collect()
    };
    // Keyless TLS: the key is loaded here and only here; the dataplane gets
    // the certificate chain and asks control for every handshake signature.
    let credentials = Arc::new(Credentials::load(&cert, &key)?);
    let certificate = credentials.info();
    info!(subject = %certificate.subject, not_after = %certificate.not_after, sha256 = %certificate.sha256, "TLS certificate loaded");
    if !config.tls.keyless {
        warn!("tls.keyless = false: the dataplane gets the private key and signs locally");
    }
    let d = &config.dataplane;
    let mut cid_section = d.connection_ids.clone();
    if let Some(id) = &args.server_id {
        cid_section.server_id = id.clone();
    }
    let cid_settings = cid_section.settings().map_err(|e| format!("{}: {e}", config.origin))?;
    if cid_settings.key.is_some() {
        info!(config_id = cid_settings.config_id, "QUIC-LB: encrypted connection IDs");
    }
    let bootstrap = Bootstrap {
        version: PROTOCOL_VERSION,
        workers: d.workers.resolve(),
        listen: config.listen.quic,
        // The server sends the material in force when the dataplane attaches.
        tls: server::tls_material(&credentials, config.tls.keyless, None, &Default::default()),
        uri_template: d.uri_template.0.as_str().to_string(),
        proxy_name: config.relay.name.clone(),
        auth_realm: config.auth.realm.clone(),
        ask_timeout_ms: d.ask_timeout_ms,
        quic_idle_timeout_ms: u64::from(d.quic_idle_timeout_secs) * 1000,
        max_connections_per_worker: d.max_connections_per_worker,
        max_tunnels_per_connection: d.max_tunnels_per_connection,
        pending_datagrams_per_tunnel: 64,
        max_capsule_len: 65_535,
        drain_timeout_ms: u64::from(d.drain_timeout_secs) * 1000,
        io_backend: d.io,
        pin_workers: d.pin_workers,
        wait_batch_us: d.wait_batch_us,
        cid_config_id: cid_settings.config_id,
        cid_server_id: cid_settings.host_id.clone(),
        cid_nonce_len: cid_settings.random_len,
        cid_steering: d.connection_ids.steering,
        cid_key: cid_settings.key,
        protocols: config.served_protocols(),
        retry_threshold: d.retry_threshold,
        connect_ip: None,
        bind: config.protocols.bind.then(|| relay_proto::channel::bootstrap::BindBootstrap {
            public_addresses: config.bind.public_addresses.clone(),
            inbound_filter: config.bind.inbound_filter,
            max_contexts: config.bind.max_contexts,
            max_peers: config.bind.max_peers,
        }),
        tcp: config.tcp_bootstrap(),
        // Made once per control process: a dataplane that restarts and
        // re-attaches keeps validating its Retry tokens and resetting its
        // old connections.
        quic_keys: Some(random_quic_keys()?),
        upstreams: config.upstream_bootstrap()?,
    };
    let ip_pools = config.connect_ip.pools()?;
    let mut bootstrap = bootstrap;
    if config.protocols.connect_ip {
        let pools = relay_control::ippool::AddressPools::new(ip_pools.0, ip_pools.1, bootstrap.workers)?;
        let ip = &config.connect_ip;
        bootstrap.connect_ip = Some(relay_proto::channel::bootstrap::ConnectIpBootstrap {
            uri_template: ip.uri_template.clone(),
            interface_prefix: ip.interface_prefix.clone(),
            mtu: ip.mtu,
            offload: ip.offload,
            mtu_probe: ip.mtu_probe,
            mtu_probe_timeout_ms: ip.mtu_probe_timeout_ms,
            worker_subnets: (0..bootstrap.workers)
                .map(|w| {
                    pools
                        .worker_subnets(w)
                        .into_iter()
                        .map(|(prefix, own)| relay_proto::channel::bootstrap::WorkerSubnet {
                            prefix: prefix.to_string(),
                            own: own.to_string(),
                        })
                        .collect()
                })
                .collect(),
        });
    }
    let acl = TargetAcl::new(
        config.targets.allow.clone(),
        config.targets.deny.clone(),
        config.targets.ports.clone(),
    );
    // Run-time changes (tokens added, revocations, quota overrides) survive
    // restarts; a run-time quota value wins over the config file's.
    let store = PolicyStore::new(&state_dir);
    let mut runtime = store.load()?;
    let pruned = runtime.auth.prune(
        std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    let auth = Authenticator::new(tokens.iter().map(String::as_str), hmac_keys, Default::default());
    let mut policy = Policy::new(auth, acl, d.flow_idle_timeout_secs.saturating_mul(1000))
        .with_quotas(config.quotas)
        .with_protocols(config.protocols)
        .with_upstreams(relay_control::upstreams::Upstreams::new(config.upstreams.clone()))
        .with_schemes(Schemes { bearer, realm: config.auth.realm.clone() });
    // Privacy Pass: the configured keys, then the issuer directory's (read
    // now: a directory that cannot be read stops the start).
    let mut directory = None;
    if let Some(mut pp) = config.privacy_pass()? {
        let section = config.auth.privacy_pass.as_ref().expect("privacy_pass() checked it");
        let source = match (&section.directory_file, &section.directory_url) {
            (Some(f), _) => Some(DirectorySource::File(f.clone())),
            (None, Some(u)) => {
                Some(DirectorySource::Url { url: u.clone(), ca_file: section.directory_ca_file.clone() })
            }
            (None, None) => None,
        };
        if let Some(source) = source {
            let dir = source.load().map_err(|e| format!("auth.privacy_pass: {e}"))?;
            info!(source = %source, keys = dir.keys.len(), skipped = dir.skipped, "Privacy Pass issuer directory read");
            pp.install(KeySource::Directory, dir.keys)
                .map_err(|e| format!("auth.privacy_pass: {source}: {e}"))?;
            directory = Some((source, Duration::from_secs(section.directory_refresh_secs)));
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let stats = pp.stats(now);
        info!(
            issuer = %section.issuer_name,
            keys = stats.keys.len(),
            window_secs = section.redemption_window_secs,
            max_spent = stats.spent_max,
            "Privacy Pass tokens accepted (PrivateToken)"
        );
        policy = policy.with_privacy_pass(pp);
    }
    // Mutual TLS: the CAs go to the dataplane, the revocation lists and the
    // identity rules stay here.
    let now_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let mut client_auth = relay_proto::channel::bootstrap::ClientAuth::default();
    if let Some(mtls) = Mtls::load(&config.auth.mtls, now_unix).map_err(|e| format!("auth.mtls: {e}"))? {
        let crls = mtls.summary();
        info!(
            mode = ?config.auth.mtls.mode,
            identities = config.auth.mtls.identities.len(),
            crls = crls.lists,
            revoked = crls.revoked,
            "client certificates accepted (mutual TLS)"
        );
        if crls.stale > 0 {
            warn!(stale = crls.stale, "auth.mtls: revocation lists past their nextUpdate");
        }
        client_auth = mtls.client_auth();
        policy = policy.with_mtls(mtls);
    }
    if !runtime.quota_overrides.is_empty() {
        info!(overrides = ?runtime.quota_overrides, "quota values set with relayctl override the config file");
    }
    policy.install(runtime).map_err(|e| format!("{}: {e}", store.path().display()))?;
    if pruned > 0 {
        info!(pruned, "dropped revocations of tokens that have expired");
    }
    let policy = Arc::new(Mutex::new(policy));
    if let Some((source, every)) = directory {
        relay_control::privacy_pass::source::spawn_refresh(source, every, policy.clone())?;
    }
    let shared = Arc::new(Mutex::new(Shared::default()));
    // Fleet mode: join the fleet before serving (the store must be
    // reachable now); the fleet's state replaces or merges with the local one.
    let mut fleet_tickets = None;
    let fleet = match &config.fleet {
        None => None,
        Some(section) => {
            let settings = FleetSettings::load(section).map_err(|e| format!("{}: {e}", config.origin))?;
            let ticket_rotation = config.tls.ticket_rotation().map(|period| {
                let (tx, rx) = std::sync::mpsc::channel();
                fleet_tickets = Some(rx);
                let wake = shared.clone();
                let sink: TicketSink = Box::new(move |set| {
                    let _ = tx.send(set);
                    wake.lock().unwrap_or_else(|p| p.into_inner()).wake_server();
                });
                (period, sink)
            });
            Some(Fleet::start(settings, policy.clone(), &state_dir, ticket_rotation)?)
        }
    };
    if let Some(f) = &fleet {
        // Every host of the fleet validates the others' Retry tokens and
        // resets the connections they served.
        let keys = f.keys();
        bootstrap.quic_keys = Some(relay_proto::channel::bootstrap::QuicKeys {
            retry_token_key: *keys.retry_token_key.expose(),
            stateless_reset_key: *keys.stateless_reset_key.expose(),
        });
        f.set_quic_lb_config_id(Some(cid_settings.config_id));
    }
    shared.lock().unwrap_or_else(|p| p.into_inner()).cid_settings = Some(cid_settings.clone());
    let admin_listener = server::bind_private_socket(&config.admin_socket())?;
    let mut admin_endpoint =
        Admin::new(shared.clone(), policy.clone(), store).with_credentials(credentials.clone());
    if let Some(path) = &args.config {
        admin_endpoint = admin_endpoint.with_config_path(path.clone(), args.server_id.clone());
    }
    if let Some(f) = &fleet {
        admin_endpoint = admin_endpoint.with_fleet(f.clone());
    }
    admin_endpoint =
        admin_endpoint.with_qlog(relay_control::qlog::QlogSettings::new(&state_dir, &config.qlog));
    admin::spawn(admin_listener, admin_endpoint)?;
    let dataplane_owner = match &config.relay.dataplane_user {
        Some(user) => {
            Some(server::lookup_user(user).map_err(|e| format!("relay.dataplane_user = {user:?}: {e}"))?)
        }
        None => None,
    };
    if let Some(addr) = config.listen.metrics {
        let scrape = shared.clone();
        let histograms = shared.lock().unwrap_or_else(|p| p.into_inner()).histograms.clone();
        let fleet_status = fleet.as_ref().map(|f| f.status().clone());
        let scrape_policy = policy.clone();
        let bound = metrics::spawn(addr, move || {
            // The policy lock first, alone: the event loop takes it without
            // holding the shared state's.
            let privacy_pass =
                scrape_policy.lock().unwrap_or_else(|p| p.into_inner()).privacy_pass().map(|pp| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let stats = pp.stats(now);
                    PrivacyPassFigures {
                        redeemed: stats.redeemed,
                        spent_held: stats.spent_held as u64,
                        spent_max: stats.spent_max as u64,
                        keys_in_force: stats.keys.iter().filter(|k| k.in_force).count() as u64,
                    }
                });
            let s = scrape.lock().unwrap_or_else(|p| p.into_inner());
            let figures = ControlFigures {
                dataplane_attached: s.dataplane_pid.is_some(),
                flows: s.flows.len() as u64,
                asks_allowed: s.asks_allowed,
                asks_denied: s.asks_denied,
                tunnels_allowed: s.tunnels_allowed,
                channel_errors: s.channel_errors,
                signatures: s.signatures,
                signatures_failed: s.signatures_failed,
                fleet: fleet_status.as_ref().map(|f| f.figures()),
                privacy_pass,
            };
            metrics::render(s.region.as_ref(), &figures, &histograms)
        })
        .map_err(|e| format!("listen.metrics = {addr}: {e}"))?;
        shared.lock().unwrap_or_else(|p| p.into_inner()).metrics_addr = Some(bound);
        info!(%bound, "metrics endpoint (GET /metrics)");
    }
    let settings = ServerSettings {
        dataplane_owner,
        channel_socket: config.channel_socket(),
        bootstrap,
        resolver_threads: config.resolver.threads,
        resolver_max_pending: config.resolver.max_pending,
        resolver_timeout: Duration::from_millis(u64::from(config.resolver.timeout_ms)),
        keyless: config.tls.keyless,
        client_auth,
        ticket_rotation: config.tls.ticket_rotation(),
        ip_pools: if config.protocols.connect_ip { ip_pools } else { (None, None) },
        log_targets: config.log.log_targets,
    };
    let mut server = Server::new(settings, policy, credentials, shared)?;
    if let Some(rx) = fleet_tickets {
        server = server.with_fleet_tickets(rx);
    }
    install_signal_handlers();
    info!(
        channel = %config.channel_socket().display(),
        admin = %config.admin_socket().display(),
        quic = %config.listen.quic,
        tcp_tls = ?config.listen.tcp_tls(),
        tcp_cleartext = ?config.listen.tcp_cleartext_addr(),
        "control ready; waiting for the dataplane"
    );
    server.run(|| STOP.load(Ordering::Relaxed), || RELOAD.swap(false, Ordering::Relaxed))?;
    info!("control stopping");
    if let Some(f) = &fleet {
        f.stop();
    }
    let _ = std::fs::remove_file(config.channel_socket());
    let _ = std::fs::remove_file(config.admin_socket());
    Ok(())
}

/// `--check-config FILE`: the configuration in force, or the error.
fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(Some(path)) {
        Ok(config) => {
            println!(
                "# {}: valid. The configuration in force (defaults merged, secrets redacted):\n",
                path.display()
            );
            print!("{}", config.effective_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-control: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", relay_control::config::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &args.check_config {
        return check_config(path);
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("relay-control: {e}");
            return ExitCode::FAILURE;
        }
    };
    logging::init(args.log_format.unwrap_or(config.log.format));
    match run(args, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("relay-control: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Fresh random keys for QUIC's stateless functions (a single host).
fn random_quic_keys() -> Result<relay_proto::channel::bootstrap::QuicKeys, boring::error::ErrorStack> {
    let mut keys =
        relay_proto::channel::bootstrap::QuicKeys { retry_token_key: [0; 32], stateless_reset_key: [0; 32] };
    boring::rand::rand_bytes(&mut keys.retry_token_key)?;
    boring::rand::rand_bytes(&mut keys.stateless_reset_key)?;
    Ok(keys)
}

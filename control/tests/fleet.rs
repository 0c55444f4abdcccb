//! Fleet mode against a real `redis-server`: two (or three) hosts in one
//! process, each with its own policy, admin endpoint, state directory and
//! fleet thread, sharing one store.
//!
//! The tests that need `redis-server` are ignored by a plain `cargo test`
//! (they say why); `cargo xtask test` runs them, and they fail with an
//! install hint when the server is missing.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use relay_control::acl::TargetAcl;
use relay_control::admin::{Admin, AdminRequest};
use relay_control::auth::{AuthState, Authenticator, Refusal};
use relay_control::config::{FleetSection, StoreFailureMode};
use relay_control::fleet::codec::{StateDoc, TicketKeySet};
use relay_control::fleet::keys::FleetKeys;
use relay_control::fleet::settings::FleetSettings;
use relay_control::fleet::{Fleet, FleetStartError};
use relay_control::policy::Policy;
use relay_control::quota::{Exceeded, QuotaConfig, QuotaLimits, Scope};
use relay_control::server::Shared;
use relay_control::store::PolicyStore;
use relay_control::token::{Secret, TokenKeys};
use serde_json::Value;
use support::redis_server::{RedisServer, free_port};

const SECRET_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn temp_dir(name: &str) -> PathBuf {
    // Tests run in parallel in one process: every host its own directory.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("relay-fleet-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    relay_control::state::ensure_dir(&dir).unwrap();
    dir
}

fn write_secret(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fleet-secret");
    std::fs::write(&path, format!("{SECRET_HEX}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// One host: what relay-control builds, minus the server loop and sockets.
struct Host {
    dir: PathBuf,
    policy: Arc<Mutex<Policy>>,
    admin: Admin,
    fleet: Arc<Fleet>,
    tickets: Receiver<TicketKeySet>,
    last_tickets: Option<TicketKeySet>,
}

fn section(
    name: &str,
    url: &str,
    secret: &Path,
    mode: StoreFailureMode,
    global_quotas: bool,
) -> FleetSection {
    FleetSection {
        name: "test".into(),
        host: Some(name.into()),
        redis: vec![url.into()],
        sentinel: None,
        key_prefix: "masque".into(),
        password_file: None,
        secret_file: secret.to_path_buf(),
        on_store_failure: mode,
        global_quotas,
    }
}

fn policy(dir: &Path, quotas: QuotaConfig) -> Arc<Mutex<Policy>> {
    let mut keys = TokenKeys::default();
    keys.add("k1", Secret::new(vec![1; 32])).unwrap();
    let mut policy = Policy::new(
        Authenticator::new(["config-token"], keys, AuthState::default()),
        TargetAcl::new(vec![], vec![], vec![]),
        1000,
    )
    .with_quotas(quotas);
    policy.install(PolicyStore::new(dir).load().unwrap()).unwrap();
    Arc::new(Mutex::new(policy))
}

fn start(name: &str, url: &str, mode: StoreFailureMode) -> Result<Host, FleetStartError> {
    start_with(name, url, mode, None)
}

/// `global_quotas`: these identity limits, fleet-wide.
fn start_with(
    name: &str,
    url: &str,
    mode: StoreFailureMode,
    global_quotas: Option<QuotaConfig>,
) -> Result<Host, FleetStartError> {
    let dir = temp_dir(name);
    let secret = write_secret(&dir);
    let policy = policy(&dir, global_quotas.unwrap_or_default());
    let settings = FleetSettings::load(&section(name, url, &secret, mode, global_quotas.is_some())).unwrap();
    let (tx, rx) = channel();
    let sink = Box::new(move |set| {
        let _ = tx.send(set);
    });
    let fleet = Fleet::start(settings, policy.clone(), &dir, Some((Duration::from_secs(3600), sink)))?;
    let shared = Shared { tickets_enabled: true, ..Default::default() };
    let admin = Admin::new(Arc::new(Mutex::new(shared)), policy.clone(), PolicyStore::new(&dir))
        .with_fleet(fleet.clone());
    Ok(Host { dir, policy, admin, fleet, tickets: rx, last_tickets: None })
}

fn host(name: &str, redis: &RedisServer) -> Host {
    start(name, &redis.url(), StoreFailureMode::Open).expect("joining the fleet")
}

impl Host {
    fn check(&self, token: &str) -> Result<(), Refusal> {
        self.policy.lock().unwrap().auth().check(Some(&format!("Bearer {token}")), unix_now()).map(|_| ())
    }

    fn handle(&self, json: &str) -> Value {
        let req: AdminRequest = serde_json::from_str(json).unwrap();
        self.admin.handle(&req, unix_now())
    }

    fn mint(&self, subject: &str) -> String {
        let v = self.handle(&format!(r#"{{"cmd":"token_mint","subject":"{subject}","ttl_secs":600}}"#));
        v["token"].as_str().unwrap_or_else(|| panic!("mint: {v}")).to_string()
    }

    fn fleet_status(&self) -> Value {
        self.handle(r#"{"cmd":"fleet_status"}"#)
    }

    /// The newest ticket key set the fleet handed this host.
    fn tickets(&mut self) -> Option<&TicketKeySet> {
        if let Some(set) = self.tickets.try_iter().last() {
            self.last_tickets = Some(set);
        }
        self.last_tickets.as_ref()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.fleet.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until `cond` holds; returns how long it took.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
#[ignore = "needs redis-server (apt-get install redis-server); run by cargo xtask test"]
fn fleet_revocation_on_one_host_is_enforced_on_another_within_1s() {
    let redis = RedisServer::start();
    let a = host("relay-a", &redis);
    let b = host("relay-b", &redis);
    let token = a.mint("alice");
    assert_eq!(b.check(&token), Ok(()), "an HMAC token verifies on every host holding the key");

    let v = a.handle(r#"{"cmd":"token_revoke","subject":"alice"}"#);
    assert_eq!(v["revoked_subject"], "alice", "{v}");
    let version = v["fleet_state_version"].as_u64().expect("written through the store");
    let latency = wait_for("the revocation on host b", Duration::from_secs(5), || {
        b.check(&token) == Err(Refusal::RevokedSubject)
    });
    println!("revocation made on host a enforced on host b after {latency:?}");
    assert!(latency < Duration::from_secs(1), "the requirement is 1 s; took {latency:?}");
    assert_eq!(a.check(&token), Err(Refusal::RevokedSubject));
    wait_for("b reports the version", Duration::from_secs(5), || {
        b.fleet_status()["state_version"] == version
    });

    // A static token added on b is accepted on a; quota values travel too.
    let v = b.handle(r#"{"cmd":"token_add","token":"fleet-static-token"}"#);
    assert!(v["added"].is_string(), "{v}");
    wait_for("the static token on host a", Duration::from_secs(5), || a.check("fleet-static-token").is_ok());
    b.handle(r#"{"cmd":"policy_set","set":{"per_identity.max_flows":3}}"#);
    wait_for("the quota on host a", Duration::from_secs(5), || {
        a.policy.lock().unwrap().quotas().config().per_identity.max_flows == 3
    });
    // Both hosts changing at once: both changes land.
    let (ra, rb) = std::thread::scope(|s| {
        let (admin_a, admin_b) = (&a.admin, &b.admin);
        let revoke = |admin: &Admin, who: &str| {
            let req = AdminRequest::TokenRevoke { subject: Some(who.into()), token: None };
            admin.handle(&req, unix_now())
        };
        let ta = s.spawn(move || revoke(admin_a, "carol"));
        let tb = s.spawn(move || revoke(admin_b, "dave"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert!(ra["revoked_subject"].is_string() && rb["revoked_subject"].is_string(), "{ra} {rb}");
    wait_for("both revocations on both hosts", Duration::from_secs(5), || {
        [&a, &b].iter().all(|h| {
            let p = h.policy.lock().unwrap();
            let s = &p.auth().state().revoked_subjects;
            s.contains_key("carol") && s.contains_key("dave")
        })
    });
    // The local cache file holds the fleet's state.
    let cached = PolicyStore::new(&b.dir).load().unwrap();
    assert!(cached.auth.revoked_subjects.contains_key("alice"));
    // Each host sees the other's heartbeat.
    wait_for("both hosts listed", Duration::from_secs(5), || {
        a.fleet_status()["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });
    let st = a.fleet_status();
    assert_eq!(st["store_up"], true);
    assert_eq!(st["host"], "relay-a");
    assert_eq!(st["fleet"], "test");
    assert!(st["quic_lb_config_id"].is_null());
    let status = a.handle(r#"{"cmd":"status"}"#);
    assert_eq!(status["fleet"]["store_up"], true, "{status}");
}

#[test]
#[ignore = "needs redis-server (apt-get install redis-server); run by cargo xtask test"]
fn fleet_tampered_store_values_are_rejected_and_counted() {
    let redis = RedisServer::start();
    let a = host("relay-a", &redis);
    let b = host("relay-b", &redis);
    let token = a.mint("mallory");
    a.handle(r#"{"cmd":"token_revoke","subject":"mallory"}"#);
    wait_for("the revocation on b", Duration::from_secs(5), || b.check(&token).is_err());
    let mut con = redis.connection();
    let key = "masque:test:state";
    let good: Vec<u8> = redis::cmd("GET").arg(key).query(&mut con).unwrap();
    // Whichever host reads a bad value first refuses it and writes its
    // state back, so the other may never see it: count both.
    let count = |h: &Host| h.fleet_status()["values_rejected_total"].as_u64().unwrap();
    let rejected = |_: &Host| count(&a) + count(&b);
    let before = rejected(&b);

    // Someone with write access to the store lifts the revocation by hand.
    let text = String::from_utf8(good.clone()).unwrap();
    let forged = text.replace("\"mallory\"", "\"nobody\"");
    assert_ne!(forged, text);
    let _: () = redis::cmd("SET").arg(key).arg(&forged).query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg("masque:test:state_version").arg(999).query(&mut con).unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg("masque:test:events").arg("state 999").query(&mut con).unwrap();
    wait_for("the forged state refused on b", Duration::from_secs(5), || rejected(&b) > before);
    assert_eq!(b.check(&token), Err(Refusal::RevokedSubject), "the revocation holds");
    assert_eq!(a.check(&token), Err(Refusal::RevokedSubject));
    let why = [&a, &b].map(|h| h.fleet_status()["last_rejection"].as_str().unwrap_or("").to_string());
    assert!(why.iter().any(|w| w.contains("MAC")), "{why:?}");

    // Truncated and garbage values, and a tampered ticket key set.
    for bad in [&good[..good.len() / 2], b"garbage", b""] {
        let n = rejected(&b);
        let _: () = redis::cmd("SET").arg(key).arg(bad).query(&mut con).unwrap();
        let _: i64 =
            redis::cmd("PUBLISH").arg("masque:test:events").arg("state 1000").query(&mut con).unwrap();
        wait_for("a bad state refused on b", Duration::from_secs(5), || rejected(&b) > n);
        assert_eq!(b.check(&token), Err(Refusal::RevokedSubject));
    }
    let tickets: Vec<u8> = redis::cmd("GET").arg("masque:test:tickets").query(&mut con).unwrap();
    let mut tampered = tickets.clone();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let n = rejected(&b);
    let _: () = redis::cmd("SET").arg("masque:test:tickets").arg(&tampered).query(&mut con).unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg("masque:test:events").arg("tickets 77").query(&mut con).unwrap();
    wait_for("the tampered ticket keys refused", Duration::from_secs(5), || rejected(&b) > n);

    // The hosts restore what they hold: the store verifies again.
    let keys = FleetKeys::derive(&relay_control::config::parse_hex(SECRET_HEX).unwrap(), "test").unwrap();
    wait_for("the state restored in the store", Duration::from_secs(5), || {
        let v: Vec<u8> = redis::cmd("GET").arg(key).query(&mut con).unwrap_or_default();
        StateDoc::decode(&keys.signing, key, &v)
            .is_ok_and(|d| d.state.auth.revoked_subjects.contains_key("mallory"))
    });
    wait_for("the ticket keys restored in the store", Duration::from_secs(5), || {
        let v: Vec<u8> = redis::cmd("GET").arg("masque:test:tickets").query(&mut con).unwrap_or_default();
        TicketKeySet::open(&keys.sealing, "masque:test:tickets", &v).is_ok()
    });
    // Keys turned into other types, or huge, or binary hints: refused or
    // rebuilt, and the connection stays up.
    let n = rejected(&b);
    let _: () = redis::cmd("DEL").arg(key).query(&mut con).unwrap();
    let _: () = redis::cmd("HSET").arg(key).arg("f").arg("v").query(&mut con).unwrap();
    let _: () =
        redis::cmd("SET").arg("masque:test:state_version").arg(&[0xffu8, 0xfe][..]).query(&mut con).unwrap();
    let _: () = redis::cmd("DEL").arg("masque:test:hosts").query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg("masque:test:hosts").arg("not a set").query(&mut con).unwrap();
    wait_for("the hash refused", Duration::from_secs(5), || rejected(&b) > n);
    let huge = vec![b'm'; relay_control::fleet::codec::MAX_HEARTBEAT_LEN * 4];
    let _: () = redis::cmd("SET").arg("masque:test:host:relay-z").arg(&huge).query(&mut con).unwrap();
    let _: () = redis::cmd("SADD").arg("masque:test:hosts").arg("relay-z").query(&mut con).unwrap_or(());
    wait_for("the state restored over the hash", Duration::from_secs(5), || {
        let v: Vec<u8> = redis::cmd("GET").arg(key).query(&mut con).unwrap_or_default();
        StateDoc::decode(&keys.signing, key, &v).is_ok()
    });
    wait_for("the host set rebuilt", Duration::from_secs(5), || {
        let t: String = redis::cmd("TYPE").arg("masque:test:hosts").query(&mut con).unwrap();
        t == "set"
    });
    wait_for("both hosts listed again, not the huge heartbeat", Duration::from_secs(10), || {
        [&a, &b].iter().all(|h| {
            let st = h.fleet_status();
            st["store_up"] == true && st["hosts"].as_array().is_some_and(|l| l.len() == 2)
        })
    });
    // A lease without expiry (it would stop rotations for good) is removed.
    let _: () = redis::cmd("SET").arg("masque:test:tickets_lease").arg("relay-z").query(&mut con).unwrap();
    assert!(a.fleet.rotate_tickets().is_err(), "held");
    assert!(a.fleet.rotate_tickets().is_ok(), "removed, then taken");
    // A rolled-back (older, validly signed) state is refused too.
    let old = good.clone();
    a.handle(r#"{"cmd":"token_revoke","subject":"trudy"}"#);
    wait_for("trudy on b", Duration::from_secs(5), || {
        b.policy.lock().unwrap().auth().state().revoked_subjects.contains_key("trudy")
    });
    let n = rejected(&b);
    let _: () = redis::cmd("SET").arg(key).arg(&old).query(&mut con).unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg("masque:test:events").arg("state 1").query(&mut con).unwrap();
    wait_for("the rollback refused", Duration::from_secs(5), || rejected(&b) > n);
    assert!(b.policy.lock().unwrap().auth().state().revoked_subjects.contains_key("trudy"));
}

#[test]
#[ignore = "needs redis-server (apt-get install redis-server); run by cargo xtask test"]
fn fleet_store_outage_keeps_state_and_reconverges_after_restart() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    let mut a = host("relay-a", &redis);
    let mut b = host("relay-b", &redis);
    let closed = start("relay-c", &redis.url(), StoreFailureMode::Closed).unwrap();
    let alice = a.mint("alice");
    let bob = a.mint("bob");
    a.handle(r#"{"cmd":"token_revoke","subject":"alice"}"#);
    wait_for("alice on b and c", Duration::from_secs(5), || {
        b.check(&alice).is_err() && closed.check(&alice).is_err()
    });
    wait_for("the same ticket keys", Duration::from_secs(5), || {
        let (ta, tb) = (a.tickets().cloned(), b.tickets().cloned());
        ta.is_some() && ta == tb
    });
    let generation = a.tickets().unwrap().generation;

    redis.kill();
    wait_for("both hosts see the store down", Duration::from_secs(10), || {
        [&a, &b, &closed].iter().all(|h| h.fleet_status()["store_up"] == false)
    });
    // Every host keeps enforcing what it had.
    assert_eq!(b.check(&alice), Err(Refusal::RevokedSubject));
    assert_eq!(closed.check(&alice), Err(Refusal::RevokedSubject));
    assert_eq!(b.check(&bob), Ok(()));
    // "open": applied here at once, merged later; "closed": refused.
    let v = a.handle(r#"{"cmd":"token_revoke","subject":"bob"}"#);
    assert_eq!(v["revoked_subject"], "bob", "{v}");
    assert!(v["fleet_warning"].as_str().unwrap().contains("applied on this host only"), "{v}");
    assert_eq!(a.check(&bob), Err(Refusal::RevokedSubject));
    assert_eq!(a.fleet_status()["pending_local_changes"], true);
    let v = closed.handle(r#"{"cmd":"token_revoke","subject":"carol"}"#);
    assert!(v["error"].as_str().unwrap().contains("\"closed\": nothing was changed"), "{v}");
    let v = b.handle(r#"{"cmd":"tickets_rotate"}"#);
    assert!(v["error"].as_str().unwrap().contains("store is unreachable"), "{v}");
    assert!(a.fleet_status()["store_errors_total"].as_u64().unwrap() >= 1);
    // b changes something else meanwhile (also open).
    b.handle(r#"{"cmd":"token_revoke","subject":"erin"}"#);

    // The store comes back empty (no persistence): the hosts restore it
    // and merge what each changed during the outage.
    let redis = RedisServer::start_on(port);
    let latency = wait_for("every host converged", Duration::from_secs(20), || {
        let versions: Vec<Value> =
            [&a, &b, &closed].iter().map(|h| h.fleet_status()["state_version"].clone()).collect();
        versions.windows(2).all(|w| w[0] == w[1])
            && [&a, &b, &closed].iter().all(|h| {
                let s = h.fleet_status();
                let p = h.policy.lock().unwrap();
                let revoked = &p.auth().state().revoked_subjects;
                s["store_up"] == true
                    && s["pending_local_changes"] == false
                    && ["alice", "bob", "erin"].iter().all(|x| revoked.contains_key(*x))
            })
    });
    println!("re-converged {latency:?} after the store came back");
    assert_eq!(b.check(&bob), Err(Refusal::RevokedSubject), "the outage's change reached b");
    // The ticket keys are the same generation as before the outage.
    wait_for("the ticket keys restored", Duration::from_secs(5), || {
        let mut con = redis.connection();
        redis::cmd("GET").arg("masque:test:tickets_generation").query::<Option<u64>>(&mut con).ok().flatten()
            == Some(generation)
    });
    assert_eq!(a.tickets().map(|t| t.generation), Some(generation));
    assert_eq!(a.tickets().cloned(), b.tickets().cloned());
    let v = closed.handle(r#"{"cmd":"token_revoke","subject":"carol"}"#);
    assert_eq!(v["revoked_subject"], "carol", "closed mode works again: {v}");
}

#[test]
#[ignore = "needs redis-server (apt-get install redis-server); run by cargo xtask test"]
fn fleet_ticket_keys_are_the_same_on_every_host_after_a_rotation() {
    let redis = RedisServer::start();
    let mut a = host("relay-a", &redis);
    let mut b = host("relay-b", &redis);
    let first = a.tickets().cloned().expect("keys at start");
    assert_eq!(first.generation, 1, "the first host makes generation 1");
    assert_eq!(b.tickets().cloned(), Some(first.clone()), "the second host loads the same set");
    let generation = a.fleet.rotate_tickets().unwrap();
    assert_eq!(generation, 2);
    let latency = wait_for("b has generation 2", Duration::from_secs(5), || {
        b.tickets().is_some_and(|t| t.generation == 2)
    });
    println!("ticket rotation on a reached b after {latency:?}");
    let (ta, tb) = (a.tickets().cloned().unwrap(), b.tickets().cloned().unwrap());
    assert_eq!(ta, tb, "the same keys, not just the same generation");
    assert_eq!(ta.keys.len(), 2);
    assert_eq!(ta.keys[1], first.keys[0], "the previous key still opens tickets");
    // b rotates next: generation 3 everywhere.
    assert_eq!(b.fleet.rotate_tickets().unwrap(), 3);
    wait_for("a has generation 3", Duration::from_secs(5), || a.tickets().is_some_and(|t| t.generation == 3));
    assert_eq!(a.tickets().cloned(), b.tickets().cloned());
    assert_eq!(
        a.fleet_status()["ticket_key_names"],
        b.fleet_status()["ticket_key_names"],
        "status shows the same key names"
    );
    // The store never holds a key in clear.
    let mut con = redis.connection();
    let stored: String = redis::cmd("GET").arg("masque:test:tickets").query(&mut con).unwrap();
    let aes_hex: String = ta.keys[0].aes_key.iter().map(|b| format!("{b:02x}")).collect();
    assert!(stored.starts_with("a1:3:") && !stored.contains(&aes_hex));
    // A host joining later gets the current set.
    let mut c = host("relay-c", &redis);
    assert_eq!(c.tickets().map(|t| t.generation), Some(3));
}

#[test]
fn fleet_unreachable_store_at_start_is_an_error_naming_it() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = start("relay-x", &url, StoreFailureMode::Open).err().expect("no store, no start").to_string();
    assert!(err.contains(&url) && err.contains("unreachable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "bounded: {:?}", started.elapsed());
}

#[test]
#[ignore = "needs redis-server (apt-get install redis-server); run by cargo xtask test"]
fn fleet_poll_catches_a_change_whose_announcement_was_lost() {
    let redis = RedisServer::start();
    let b = host("relay-b", &redis);
    // A valid state written straight into the store, announced nowhere.
    let keys = FleetKeys::derive(&relay_control::config::parse_hex(SECRET_HEX).unwrap(), "test").unwrap();
    let mut doc =
        StateDoc { version: 40, written_by: "relay-z".into(), written_unix: unix_now(), ..StateDoc::empty() };
    doc.state
        .auth
        .revoked_subjects
        .insert("quiet".into(), relay_control::auth::RevokedSubject { revoked_unix: unix_now() });
    let key = "masque:test:state";
    let mut con = redis.connection();
    let _: () =
        redis::cmd("SET").arg(key).arg(doc.encode(&keys.signing, key).unwrap()).query(&mut con).unwrap();
    let started = Instant::now();
    wait_for("the poll installs it", Duration::from_secs(5), || {
        b.policy.lock().unwrap().auth().state().revoked_subjects.contains_key("quiet")
    });
    println!("installed by the 1 s poll after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());
    wait_for("b reports version 40", Duration::from_secs(5), || b.fleet_status()["state_version"] == 40);
}

#[test]
#[ignore = "needs redis-server (apt-get install redis-server); run by cargo xtask test"]
fn fleet_global_identity_quotas_count_every_hosts_usage() {
    let mut redis = RedisServer::start();
    let limits = QuotaLimits {
        max_flows: 2,
        new_flows_per_sec: 0,
        burst: 0,
        bytes_per_period: 1000,
        period_secs: 3600,
    };
    let quotas = QuotaConfig { per_identity: limits, per_client: QuotaLimits::default() };
    let a = start_with("relay-a", &redis.url(), StoreFailureMode::Open, Some(quotas)).unwrap();
    let b = start_with("relay-b", &redis.url(), StoreFailureMode::Closed, Some(quotas)).unwrap();
    wait_for("both hosts listed", Duration::from_secs(5), || {
        b.fleet_status()["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });
    let client: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let admit = |h: &Host, flow: u64| {
        h.policy.lock().unwrap().quotas_mut().admit(flow, Some("sub:x"), client, Instant::now())
    };
    let close = |h: &Host, flow: u64, bytes: u64| {
        h.policy.lock().unwrap().quotas_mut().closed(flow, bytes, Instant::now())
    };
    // b knows the identity (one flow open, then closed), so it reads the others' usage.
    assert!(admit(&b, 100).is_ok());
    close(&b, 100, 0);
    // Two flows on a: the identity's fleet-wide limit.
    assert!(admit(&a, 1).is_ok() && admit(&a, 2).is_ok());
    assert_eq!(admit(&a, 3), Err(Exceeded::Flows(Scope::Identity)));
    let latency = wait_for("b counts a's flows", Duration::from_secs(5), || match admit(&b, 101) {
        Err(e) => e == Exceeded::Flows(Scope::Identity),
        Ok(_) => {
            close(&b, 101, 0);
            false
        }
    });
    println!("a's flows counted on b after {latency:?}");
    // What b adds up, as `relayctl policy usage` shows it.
    let usage = b.handle(r#"{"cmd":"quota_usage","identity":"sub:x"}"#);
    assert_eq!(
        (usage["fleet_wide"].as_bool(), usage["other_hosts"]["flows"].as_u64()),
        (Some(true), Some(2)),
        "{usage}"
    );
    assert_eq!(usage["here"]["flows"].as_u64().unwrap_or(0), 0, "{usage}");
    assert_eq!(usage["limits"]["max_flows"], 2, "{usage}");
    // One of a's flows ends after 900 bytes: b may open one flow, with what
    // the fleet has left of the byte allowance as its budget.
    close(&a, 1, 900);
    wait_for("b sees the flow end and the bytes", Duration::from_secs(5), || match admit(&b, 102) {
        Ok(budget) => {
            budget == 100 || {
                close(&b, 102, 0);
                false
            }
        }
        Err(_) => false,
    });
    assert_eq!(admit(&b, 103), Err(Exceeded::Flows(Scope::Identity)), "a: 1, b: 1");
    close(&b, 102, 100);
    let mut next = 4;
    wait_for("a sees the allowance used up", Duration::from_secs(5), || {
        next += 1;
        match admit(&a, next) {
            Err(e) => e == Exceeded::Bytes(Scope::Identity),
            Ok(_) => {
                close(&a, next, 0);
                false
            }
        }
    });
    // The store goes away: "closed" (b) refuses the limited identity with
    // 503, "open" (a) falls back to its own limits.
    redis.kill();
    wait_for("b refuses while the store is down", Duration::from_secs(10), || {
        admit(&b, 104) == Err(Exceeded::FleetStoreDown)
    });
    assert_ne!(admit(&a, 5), Err(Exceeded::FleetStoreDown));
    let store = b.fleet_status();
    assert_eq!(store["global_quotas"], true, "{store}");
}

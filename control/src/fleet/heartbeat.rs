//! Heartbeats: every host writes a signed note about itself under its own
//! key with a TTL, and lists the others' (`relayctl fleet status`). A host
//! whose heartbeat expired is gone.
#![forbid(unsafe_code)]

use std::time::Duration;

use redis::Connection;
use tracing::warn;

use super::codec::{Heartbeat, MAX_HEARTBEAT_LEN};
use super::connect::StoreError;
use super::keys::DerivedKey;
use super::keyspace::Keyspace;
use super::reads::{is_wrong_type, read_bounded};
use super::status::StatusHandle;

/// How long a heartbeat lives unless renewed (renewed every second).
pub const TTL: Duration = Duration::from_secs(5);
/// Most hosts listed.
pub const MAX_HOSTS: usize = 1024;

/// Writes this host's heartbeat.
pub fn beat(
    con: &mut Connection,
    keyspace: &Keyspace,
    signing: &DerivedKey,
    hb: &Heartbeat,
) -> Result<(), StoreError> {
    let key = keyspace.host(&hb.host);
    let value = hb.encode(signing, &key)?;
    match write(con, keyspace, &key, &value, &hb.host) {
        // The host set turned into another type by another writer: it is
        // only an index, so it is rebuilt.
        Err(StoreError::Redis(e)) if is_wrong_type(&e) => {
            let _: i64 = redis::cmd("DEL").arg(keyspace.hosts()).query(con)?;
            write(con, keyspace, &key, &value, &hb.host)
        }
        other => other,
    }
}

fn write(
    con: &mut Connection,
    keyspace: &Keyspace,
    key: &str,
    value: &[u8],
    host: &str,
) -> Result<(), StoreError> {
    redis::pipe()
        .cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(TTL.as_millis() as u64)
        .ignore()
        .sadd(keyspace.hosts(), host)
        .ignore()
        .exec(con)?;
    Ok(())
}

/// The hosts whose heartbeat is live, sorted by name. Names whose
/// heartbeat expired are dropped from the set; heartbeats that do not
/// verify are refused (counted) and not listed. `me` is this host's own
/// heartbeat: another process writing under the same name is reported.
pub fn list(
    con: &mut Connection,
    keyspace: &Keyspace,
    signing: &DerivedKey,
    me: &Heartbeat,
    status: &StatusHandle,
) -> Result<Vec<Heartbeat>, StoreError> {
    let members: Vec<Vec<u8>> = match redis::cmd("SMEMBERS").arg(keyspace.hosts()).query(con) {
        Ok(m) => m,
        Err(e) if is_wrong_type(&e) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut names: Vec<String> = members
        .into_iter()
        .filter_map(|m| String::from_utf8(m).ok())
        .filter(|n| crate::config::valid_fleet_word(n))
        .collect();
    names.sort();
    names.truncate(MAX_HOSTS);
    let mut out = Vec::new();
    for name in &names {
        let key = keyspace.host(name);
        let bytes = match read_bounded(con, &key, MAX_HEARTBEAT_LEN)?.into_value() {
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                status.rejected(&key, &e);
                continue;
            }
            None => {
                // Expired: forget the name (a host that comes back adds it again).
                let _: i64 = redis::cmd("SREM").arg(keyspace.hosts()).arg(name).query(con)?;
                continue;
            }
        };
        match Heartbeat::decode(signing, &key, &bytes) {
            Ok(hb) if hb.host == *name => {
                if hb.host == me.host && (hb.pid, hb.started_unix) != (me.pid, me.started_unix) {
                    warn!(
                        host = hb.host,
                        pid = hb.pid,
                        "fleet: another control process uses this host's name"
                    );
                    status.store_error(&format!(
                        "another control process (pid {}) writes heartbeats as host {}: fleet.host must be unique",
                        hb.pid, hb.host
                    ));
                }
                out.push(hb);
            }
            Ok(_) => status.rejected(&key, &super::codec::ValueError::Invalid("host name mismatch".into())),
            Err(e) => status.rejected(&key, &e),
        }
    }
    Ok(out)
}

//! Connections to the store: the configured URLs in order (the first
//! reachable primary), or the primary a Sentinel names; every connection
//! with bounded connect, read and write timeouts.
//!
//! The fleet thread finds the store (and follows a failover); the admin
//! thread reconnects only to the address that last worked, so an admin
//! request never waits on a Sentinel round or a list of dead addresses.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::Duration;

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, Connection, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use super::codec::ValueError;
use super::settings::{Endpoints, StoreCredentials};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command may wait for its answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No configured address answered as a primary.
    #[error("store unreachable ({0})")]
    Unreachable(String),
    /// A command failed (connection lost, timeout, refused).
    #[error("store: {0}")]
    Redis(#[from] redis::RedisError),
    /// A value could not be written (encoding, sealing).
    #[error("{0}")]
    Value(#[from] ValueError),
    /// Another host wrote the same key first, every attempt.
    #[error("another host kept writing the same key; try again")]
    Conflict,
}

/// Opens connections to the store.
#[derive(Debug)]
pub struct Connector {
    endpoints: Endpoints,
    credentials: Option<StoreCredentials>,
    last_good: Mutex<Option<ConnectionInfo>>,
}

impl Connector {
    /// A connector for `endpoints` with `credentials`.
    pub fn new(endpoints: Endpoints, credentials: Option<StoreCredentials>) -> Self {
        Self { endpoints, credentials, last_good: Mutex::new(None) }
    }

    fn redis_settings(&self, base: &RedisConnectionInfo) -> RedisConnectionInfo {
        let mut settings = base.clone().set_skip_set_lib_name();
        if let Some(c) = &self.credentials {
            settings = settings.set_password(&c.password);
            if let Some(user) = &c.username {
                settings = settings.set_username(user);
            }
        }
        settings
    }

    /// Connects to the store (the first address that answers as a primary,
    /// or the primary the Sentinels name) and remembers where.
    pub fn connect(&self) -> Result<(Connection, String), StoreError> {
        let mut errors = Vec::new();
        let candidates: Vec<ConnectionInfo> = match &self.endpoints {
            Endpoints::Direct(urls) => urls
                .iter()
                .filter_map(|u| match u.as_str().into_connection_info() {
                    Ok(info) => {
                        let settings = self.redis_settings(info.redis_settings());
                        Some(info.set_redis_settings(settings))
                    }
                    Err(e) => {
                        errors.push(format!("{u}: {e}"));
                        None
                    }
                })
                .collect(),
            Endpoints::Sentinel { master, addresses } => {
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(self.redis_settings(&RedisConnectionInfo::default()));
                let found = SentinelClient::build(
                    addresses.clone(),
                    master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .and_then(|mut s| s.get_client());
                match found {
                    Ok(client) => vec![client.get_connection_info().clone()],
                    Err(e) => {
                        return Err(StoreError::Unreachable(format!("{}: {e}", self.endpoints)));
                    }
                }
            }
        };
        for info in candidates {
            let addr = info.addr().to_string();
            match open(&info) {
                Ok(con) => {
                    *self.last_good.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                    return Ok((con, addr));
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(StoreError::Unreachable(errors.join("; ")))
    }

    /// Connects again to the address that last worked (bounded by
    /// [`CONNECT_TIMEOUT`]); for the admin thread.
    pub fn reconnect_last(&self) -> Result<Connection, StoreError> {
        let info = self.last_good.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match info {
            Some(info) => open(&info),
            None => Err(StoreError::Unreachable(format!("no connection to {} yet", self.endpoints))),
        }
    }

    /// What the connector was configured with, for messages.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }
}

/// Opens one connection with timeouts and checks that the node is a
/// primary (a replica would refuse every write).
fn open(info: &ConnectionInfo) -> Result<Connection, StoreError> {
    let client = Client::open(info.clone())?;
    let mut con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut con)?;
    match role.first() {
        Some(redis::Value::BulkString(b)) if b.as_slice() == b"master" => Ok(con),
        Some(redis::Value::SimpleString(s)) if s == "master" => Ok(con),
        _ => Err(StoreError::Unreachable(format!("{} is not a primary", info.addr()))),
    }
}

//! The `[fleet]` section resolved for use: the host's name, the store's
//! addresses and credentials, and the keys derived from the fleet secret.
#![forbid(unsafe_code)]

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::keys::{FleetKeys, KeyDerivationError};
use super::keyspace::Keyspace;
use crate::config::{FleetSection, StoreFailureMode, parse_hex, valid_fleet_word};

/// Where the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// These URLs, tried in order (the first reachable primary wins).
    Direct(Vec<String>),
    /// The primary these Sentinels name.
    Sentinel {
        /// The monitored primary's name.
        master: String,
        /// The Sentinels' URLs.
        addresses: Vec<String>,
    },
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoints::Direct(urls) => f.write_str(&urls.join(", ")),
            Endpoints::Sentinel { master, addresses } => {
                write!(f, "primary {master:?} of Sentinels {}", addresses.join(", "))
            }
        }
    }
}

/// The store's credentials (`password_file`).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreCredentials {
    /// An ACL user, when the file said `user:password`.
    pub username: Option<String>,
    /// The password.
    pub password: String,
}

impl fmt::Debug for StoreCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl StoreCredentials {
    /// Parses a password file's text: `password`, or `user:password` (a
    /// password holding `:` needs the user, e.g. `default:pa:ss`).
    pub fn parse(text: &str) -> Option<Self> {
        let line = text.trim_end_matches(['\n', '\r']);
        if line.is_empty() || line.contains('\n') {
            return None;
        }
        Some(match line.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Self { username: Some(user.to_string()), password: password.to_string() }
            }
            Some(_) => return None,
            None => Self { username: None, password: line.to_string() },
        })
    }
}

/// Why the `[fleet]` section cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FleetConfigError {
    /// A file named by the section is unusable.
    #[error("fleet.{key} {path}: {why}")]
    File {
        /// `secret_file` or `password_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No host name.
    #[error(
        "fleet.host is not set and the hostname {0:?} is not a usable host name \
         (1..=64 of A-Z a-z 0-9 . _ -): set fleet.host"
    )]
    Hostname(String),
    /// The secret is too short.
    #[error("fleet.secret_file {path}: {source}")]
    Keys {
        /// The file.
        path: PathBuf,
        /// Why.
        source: KeyDerivationError,
    },
}

/// The fleet settings in force.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// The fleet's name.
    pub name: String,
    /// This host's name.
    pub host: String,
    /// Where the store is.
    pub endpoints: Endpoints,
    /// The store's credentials.
    pub credentials: Option<StoreCredentials>,
    /// The keys' names.
    pub keyspace: Keyspace,
    /// The keys derived from the fleet secret.
    pub keys: FleetKeys,
    /// What to do while the store is unreachable.
    pub on_store_failure: StoreFailureMode,
    /// Identity quotas are fleet-wide.
    pub global_quotas: bool,
}

/// Reads a secret file, refusing one every user may read.
fn read_private(key: &'static str, path: &Path) -> Result<String, FleetConfigError> {
    let err = |why: String| FleetConfigError::File { key, path: path.to_path_buf(), why };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(err("is readable by every user; chmod 600 it".into()));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

/// The machine's host name (the kernel's UTS name).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

impl FleetSettings {
    /// Resolves `section`: reads the secret and password files, derives the
    /// keys, names the host. Errors name the key.
    pub fn load(section: &FleetSection) -> Result<Self, FleetConfigError> {
        let host = match &section.host {
            Some(h) => h.clone(),
            None => {
                let h = hostname();
                if !valid_fleet_word(&h) {
                    return Err(FleetConfigError::Hostname(h));
                }
                h
            }
        };
        let secret_text = read_private("secret_file", &section.secret_file)?;
        let secret = parse_hex(secret_text.trim()).ok_or_else(|| FleetConfigError::File {
            key: "secret_file",
            path: section.secret_file.clone(),
            why: "must hold the fleet secret as hex (`openssl rand -hex 32`)".into(),
        })?;
        let keys = FleetKeys::derive(&secret, &section.name)
            .map_err(|source| FleetConfigError::Keys { path: section.secret_file.clone(), source })?;
        let credentials = match &section.password_file {
            None => None,
            Some(path) => {
                Some(StoreCredentials::parse(&read_private("password_file", path)?).ok_or_else(|| {
                    FleetConfigError::File {
                        key: "password_file",
                        path: path.clone(),
                        why: "must hold one line: the password, or user:password".into(),
                    }
                })?)
            }
        };
        let endpoints = match &section.sentinel {
            Some(s) => Endpoints::Sentinel { master: s.master.clone(), addresses: s.addresses.clone() },
            None => Endpoints::Direct(section.redis.clone()),
        };
        Ok(Self {
            name: section.name.clone(),
            host,
            endpoints,
            credentials,
            keyspace: Keyspace::new(&section.key_prefix, &section.name),
            keys,
            on_store_failure: section.on_store_failure,
            global_quotas: section.global_quotas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(dir: &Path) -> FleetSection {
        FleetSection {
            name: "eu".into(),
            host: Some("relay-1".into()),
            redis: vec!["redis://127.0.0.1:6379".into()],
            sentinel: None,
            key_prefix: "masque".into(),
            password_file: None,
            secret_file: dir.join("secret"),
            on_store_failure: StoreFailureMode::Open,
            global_quotas: false,
        }
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn files_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("relay-fleet-settings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = section(&dir);
        let err = FleetSettings::load(&s).unwrap_err().to_string();
        assert!(err.starts_with("fleet.secret_file") && err.contains("secret"), "{err}");
        write(&s.secret_file, &"ab".repeat(32), 0o644);
        assert!(FleetSettings::load(&s).unwrap_err().to_string().contains("chmod 600"));
        write(&s.secret_file, "not hex\n", 0o600);
        assert!(FleetSettings::load(&s).unwrap_err().to_string().contains("as hex"));
        write(&s.secret_file, &"ab".repeat(31), 0o600);
        let err = FleetSettings::load(&s).unwrap_err().to_string();
        assert!(err.contains("fleet.secret_file") && err.contains("31 bytes"), "{err}");
        write(&s.secret_file, &format!("{}\n", "ab".repeat(32)), 0o600);
        let ok = FleetSettings::load(&s).unwrap();
        assert_eq!((ok.host.as_str(), ok.credentials.clone()), ("relay-1", None));
        assert_eq!(ok.keyspace.state(), "masque:eu:state");
        s.password_file = Some(dir.join("password"));
        write(&dir.join("password"), "relay:s3cret:x\n", 0o600);
        let creds = FleetSettings::load(&s).unwrap().credentials.unwrap();
        assert_eq!((creds.username.as_deref(), creds.password.as_str()), (Some("relay"), "s3cret:x"));
        assert!(!format!("{creds:?}").contains("s3cret"));
        write(&dir.join("password"), "\n", 0o600);
        assert!(FleetSettings::load(&s).unwrap_err().to_string().contains("fleet.password_file"));
        assert_eq!(StoreCredentials::parse("pw").unwrap().username, None);
        assert_eq!(StoreCredentials::parse(":pw"), None);
        assert_eq!(StoreCredentials::parse("a\nb"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

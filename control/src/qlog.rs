//! qlog on demand, control's side (`relayctl qlog start|stop`): the
//! settings (`[qlog]`), the request's target, and the directory the
//! dataplane writes into.
//!
//! The directory is `state_dir/qlog`. Control creates it (mode 0700), hands
//! it to the dataplane's user when the dataplane runs as another one (the
//! uid and gid its channel socket peer had), and sends the dataplane an
//! open descriptor of it with the start command: the dataplane creates its
//! files relative to that descriptor, so it needs neither a path to nor
//! access to the state directory above it (mode 0700, control's).

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use relay_proto::channel::bootstrap::{QlogLevel, QlogTarget};

use crate::config::QlogSection;

/// What `relayctl qlog start` uses that the request does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QlogSettings {
    /// `state_dir/qlog`.
    pub dir: PathBuf,
    /// Most bytes per file.
    pub max_file_bytes: u64,
    /// Most files kept.
    pub max_files: u32,
    /// The window for new connections when the request names none.
    pub default_seconds: u32,
    /// Which events quiche writes.
    pub level: QlogLevel,
}

impl QlogSettings {
    /// The settings of `section`, writing into `state_dir/qlog`.
    pub fn new(state_dir: &Path, section: &QlogSection) -> Self {
        Self {
            dir: state_dir.join("qlog"),
            max_file_bytes: u64::from(section.max_file_bytes),
            max_files: section.max_files,
            default_seconds: section.default_seconds,
            level: section.level,
        }
    }
}

/// Why the qlog directory could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum QlogDirError {
    /// It could not be created or inspected.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Something else (a file, a symbolic link) has its name.
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    /// It could not be given to the dataplane's user.
    #[error(
        "cannot give {path} to the dataplane's user (uid {uid}): {source}; run relay-control as root, or the dataplane as control's user"
    )]
    Chown {
        /// The directory.
        path: PathBuf,
        /// The dataplane's uid.
        uid: u32,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Creates `dir` (mode 0700) if needed, gives it to `owner` (uid, gid)
/// when given, and opens it: the descriptor the dataplane writes through.
pub fn prepare_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<OwnedFd, QlogDirError> {
    let io_err = |source| QlogDirError::Io { path: dir.to_path_buf(), source };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    // Not followed: a link planted in its place is refused.
    let meta = std::fs::symlink_metadata(dir).map_err(io_err)?;
    if !meta.is_dir() {
        return Err(QlogDirError::NotADirectory(dir.to_path_buf()));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|source| QlogDirError::Chown {
            path: dir.to_path_buf(),
            uid,
            source,
        })?;
    }
    Ok(File::open(dir).map_err(io_err)?.into())
}

/// The target of `--client ADDR`: an IP address (any port) or a socket
/// address (`192.0.2.1:4433`, `[2001:db8::1]:4433`).
pub fn parse_client(s: &str) -> Result<QlogTarget, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(QlogTarget::Client { ip, port: None });
    }
    match s.parse::<SocketAddr>() {
        Ok(addr) => Ok(QlogTarget::Client { ip: addr.ip(), port: Some(addr.port()) }),
        Err(_) => Err(format!("{s:?} is neither an IP address nor IP:PORT")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn client_targets_are_an_address_with_or_without_a_port() {
        assert_eq!(
            parse_client("192.0.2.1").unwrap(),
            QlogTarget::Client { ip: "192.0.2.1".parse().unwrap(), port: None }
        );
        assert_eq!(
            parse_client(" 192.0.2.1:4433 ").unwrap(),
            QlogTarget::Client { ip: "192.0.2.1".parse().unwrap(), port: Some(4433) }
        );
        assert_eq!(
            parse_client("[2001:db8::1]:9").unwrap(),
            QlogTarget::Client { ip: "2001:db8::1".parse().unwrap(), port: Some(9) }
        );
        assert_eq!(
            parse_client("2001:db8::1").unwrap(),
            QlogTarget::Client { ip: "2001:db8::1".parse().unwrap(), port: None }
        );
        for bad in ["", "relay.example", "192.0.2.1:", "192.0.2.1:70000", "[2001:db8::1]"] {
            assert!(parse_client(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_directory_is_made_private_and_opened() {
        let base = std::env::temp_dir().join(format!("relay-control-qlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("qlog");
        let fd = prepare_dir(&dir, None).unwrap();
        let meta = File::from(fd).metadata().unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o777, 0o700);
        // Again, with looser permissions meanwhile: tightened.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&dir, None).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // Given to its owner (chown to oneself needs no privilege).
        let (uid, gid) = (meta.uid(), meta.gid());
        prepare_dir(&dir, Some((uid, gid))).unwrap();
        // A file or a link in its place is refused.
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(prepare_dir(&file, None), Err(QlogDirError::NotADirectory(_))));
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(prepare_dir(&link, None), Err(QlogDirError::NotADirectory(_))));
    }
}

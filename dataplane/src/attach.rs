//! Attaching to control: connect to its channel socket, say hello, receive
//! the settings, the region and the doorbells.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use relay_channel::attach::{self as handshake, HandshakeError};
use relay_channel::doorbell::Doorbell;
use relay_channel::region::{Region, RegionError};
use relay_proto::channel::bootstrap::{self, Bootstrap, Hello, PROTOCOL_VERSION};

/// What the dataplane gets from control.
pub struct Attachment {
    /// The socket to control (its end of stream means control is gone).
    pub stream: UnixStream,
    /// Settings.
    pub bootstrap: Bootstrap,
    /// The shared region.
    pub region: Region,
    /// Per worker: (asks doorbell, answers doorbell).
    pub doorbells: Vec<(Doorbell, Doorbell)>,
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Control's socket could not be reached in time.
    #[error("cannot reach control at {path}: {source} (is relay-control running?)")]
    Connect {
        /// The socket path.
        path: String,
        /// The last error.
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("handshake with control: {0}")]
    Handshake(#[from] HandshakeError),
    /// The region is unusable.
    #[error("shared region: {0}")]
    Region(#[from] RegionError),
    /// Control sent the wrong number of descriptors.
    #[error("control sent {got} descriptors, expected {expected}")]
    Descriptors {
        /// Received.
        got: usize,
        /// Expected.
        expected: usize,
    },
}

/// Connects to control, retrying until `wait` has passed.
pub fn attach(path: &Path, wait: Duration) -> Result<Attachment, AttachError> {
    let deadline = Instant::now() + wait;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => return Err(AttachError::Connect { path: path.display().to_string(), source }),
        }
    };
    handshake::send(
        &stream,
        &Hello { version: PROTOCOL_VERSION, pid: std::process::id(), qlog: crate::qlog::BUILT },
        &[],
    )?;
    let (boot, fds): (Bootstrap, Vec<OwnedFd>) =
        handshake::recv_before(&stream, Instant::now() + Duration::from_secs(10))?;
    bootstrap::check_version(boot.version).map_err(HandshakeError::from)?;
    boot.tls.validate().map_err(HandshakeError::from)?;
    let expected = 1 + 2 * boot.workers as usize;
    if fds.len() != expected {
        return Err(AttachError::Descriptors { got: fds.len(), expected });
    }
    let mut fds = fds.into_iter();
    let region = Region::attach(fds.next().expect("counted"))?;
    if region.workers() != boot.workers {
        return Err(AttachError::Region(RegionError::Incompatible("worker count differs from settings")));
    }
    let mut doorbells = Vec::new();
    while let (Some(ask), Some(answer)) = (fds.next(), fds.next()) {
        doorbells.push((Doorbell::from_fd(ask), Doorbell::from_fd(answer)));
    }
    stream.set_read_timeout(None).map_err(HandshakeError::Io)?;
    Ok(Attachment { stream, bootstrap: boot, region, doorbells })
}

//! qlog on demand (`relayctl qlog start|stop`): quiche's JSON-SEQ event
//! log of chosen QUIC connections, for qvis and other qlog tools.
//!
//! Control sends a [`QlogCommand`] on the attach socket; a start carries
//! the qlog directory's descriptor (SCM_RIGHTS), which control created in
//! its state directory and handed to the dataplane's user. The dataplane
//! creates its files relative to that descriptor (`openat`), so it needs
//! no path to, and no access to, control's state directory: the directory
//! may sit in a tree the dataplane cannot even traverse (mode 0700, or a
//! read-only mount for the dataplane as under systemd's
//! `ProtectSystem=strict`).
//!
//! The thread that follows control applies the command to [`QlogShared`]
//! and rings the workers; each worker adopts it at its next turn: a start
//! attaches a [`QlogWriter`] to the connections that match it now (a
//! connection by worker and serial, or every connection from a client
//! address), and the [`Window`] stays open for `seconds` for new
//! connections from a matching client; a stop finishes every connection's
//! log. quiche takes a connection's writer once and for good
//! (`set_qlog_with_level`), so a connection logs from the moment it is
//! matched (for a new connection: from its first packet).
//!
//! Bounds ([`QlogDir`]): a file holds whole JSON-SEQ records only and at
//! most `max_file_bytes`: the first record that would pass it closes the
//! file, which then ends at the last event that fit. At most `max_files`
//! files are kept in the directory (those of earlier sessions and relay
//! runs count): a new file first removes the oldest closed ones; when
//! every file is still being written, the connection gets no qlog
//! (counted, `qlog_refused`). The disk used is therefore at most
//! `max_files` x `max_file_bytes`.
//!
//! Off (no window, the default), a new connection costs one branch
//! (`H3::accept` tests whether a window is open) and established
//! connections nothing of ours; quiche compiled with its `qlog` feature
//! tests per event whether the connection has a writer.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use relay_proto::channel::bootstrap::{QlogCommand, QlogLevel, QlogStart, QlogTarget};
use tracing::{info, warn};

/// The suffix of qlog files (JSON-SEQ, what qvis opens).
pub const SUFFIX: &str = ".sqlog";

/// Why qlog could not be started or a file not created.
#[derive(Debug, thiserror::Error)]
pub enum QlogError {
    /// This dataplane was built without qlog (the `qlog` cargo feature).
    #[error("this dataplane was built without qlog (cargo feature `qlog` of relay-dataplane)")]
    NotBuilt,
    /// A start came with no directory descriptor, or more than one.
    #[error("a qlog start needs exactly one directory descriptor, {0} came")]
    Descriptors(usize),
    /// The descriptor is not a directory.
    #[error("the qlog descriptor is not a directory")]
    NotADirectory,
    /// The start's values are out of bounds.
    #[error("invalid qlog start: {0}")]
    Invalid(String),
    /// The directory could not be read.
    #[error("qlog directory: {0}")]
    Directory(#[source] io::Error),
    /// Every file the directory may hold is still being written.
    #[error("all {0} qlog files are still being written (qlog.max_files)")]
    AllOpen(usize),
    /// A file could not be created.
    #[error("cannot create qlog file {name}: {source}")]
    Create {
        /// The file's name in the directory.
        name: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// One file of the directory, oldest first in [`Files::entries`].
#[derive(Debug)]
struct Entry {
    name: String,
    /// A writer still writes it (closed files may be removed).
    open: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Files {
    entries: VecDeque<Entry>,
    max_files: usize,
}

/// The qlog directory: its descriptor, the files in it (oldest first) and
/// the generation that stops every writer at once.
#[derive(Debug)]
pub struct QlogDir {
    dir: File,
    /// (device, inode): a later start naming the same directory keeps
    /// this one, and its list of files.
    identity: (u64, u64),
    files: Mutex<Files>,
    stop_generation: AtomicU64,
}

impl QlogDir {
    /// The directory `fd` refers to, keeping at most `max_files` files;
    /// the `.sqlog` files already in it are listed, oldest first.
    pub fn new(fd: OwnedFd, max_files: usize) -> Result<Self, QlogError> {
        let dir = File::from(fd);
        let meta = dir.metadata().map_err(QlogError::Directory)?;
        if !meta.is_dir() {
            return Err(QlogError::NotADirectory);
        }
        let entries = existing_files(&dir)
            .into_iter()
            .map(|name| Entry { name, open: Arc::new(AtomicBool::new(false)) })
            .collect();
        Ok(Self {
            dir,
            identity: (meta.dev(), meta.ino()),
            files: Mutex::new(Files { entries, max_files }),
            stop_generation: AtomicU64::new(0),
        })
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `fd` is this directory.
    fn is(&self, fd: &File) -> bool {
        fd.metadata().is_ok_and(|m| (m.dev(), m.ino()) == self.identity)
    }

    /// Stops every writer of this directory (at its next write or flush).
    pub fn stop_all(&self) {
        self.stop_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The files kept, oldest first.
    pub fn names(&self) -> Vec<String> {
        self.files().entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Creates file `name` written by a writer that stops at `cap` bytes,
    /// first removing the oldest closed files beyond `max_files - 1`.
    pub fn create(self: &Arc<Self>, name: &str, cap: u64) -> Result<QlogWriter, QlogError> {
        let create_err = |source| QlogError::Create { name: name.to_string(), source };
        let mut files = self.files();
        while files.entries.len() >= files.max_files {
            let Some(oldest) = files.entries.iter().position(|e| !e.open.load(Ordering::Acquire)) else {
                return Err(QlogError::AllOpen(files.max_files));
            };
            if let Some(e) = files.entries.remove(oldest)
                && let Err(err) = self.unlink(&e.name)
                && err.kind() != io::ErrorKind::NotFound
            {
                warn!(file = e.name, "cannot remove an old qlog file: {err}");
            }
        }
        let file = self.open_new(name).map_err(create_err)?;
        let open = Arc::new(AtomicBool::new(true));
        files.entries.push_back(Entry { name: name.to_string(), open: open.clone() });
        Ok(QlogWriter {
            file: Some(file),
            written: 0,
            cap,
            record: Vec::new(),
            open,
            dir: self.clone(),
            generation: self.stop_generation.load(Ordering::Acquire),
            name: name.to_string(),
        })
    }

    /// `openat(dir, name, O_CREAT | O_EXCL | O_NOFOLLOW, 0600)`.
    fn open_new(&self, name: &str) -> io::Result<File> {
        let cname = file_name_c(name)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: the directory descriptor is live (owned by `self.dir`)
        // and `cname` a NUL-terminated string that outlives the call.
        let fd = unsafe { libc::openat(self.dir.as_raw_fd(), cname.as_ptr(), flags, 0o600 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `unlinkat(dir, name, 0)`.
    fn unlink(&self, name: &str) -> io::Result<()> {
        let cname = file_name_c(name)?;
        // SAFETY: as in `open_new`: a live directory descriptor and a
        // NUL-terminated name.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), cname.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A file name as a C string: one path component, no NUL.
fn file_name_c(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a file name"));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

/// The `.sqlog` files in `dir`, oldest first (by modification time, then
/// name). Read through `/proc/self/fd`, the directory's own descriptor:
/// no path to it is needed.
fn existing_files(dir: &File) -> Vec<String> {
    let listing = match std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot list the qlog directory ({e}): its older files are not counted");
            return Vec::new();
        }
    };
    let mut files: Vec<(i64, String)> = listing
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let meta = e.metadata().ok()?;
            (name.ends_with(SUFFIX) && meta.is_file()).then(|| (meta.mtime(), name))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, name)| name).collect()
}

/// What quiche writes a connection's qlog through: whole JSON-SEQ records
/// (RS, JSON text, LF; quiche writes each in several pieces) go to the
/// file, up to `cap` bytes.
#[derive(Debug)]
pub struct QlogWriter {
    /// None once closed: the cap was reached, a write failed, or qlog was
    /// stopped.
    file: Option<File>,
    written: u64,
    cap: u64,
    /// The record being written.
    record: Vec<u8>,
    open: Arc<AtomicBool>,
    dir: Arc<QlogDir>,
    /// The directory's stop generation when the file was created.
    generation: u64,
    name: String,
}

impl QlogWriter {
    /// Bytes written to the file.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn close(&mut self) {
        self.file = None;
        self.record = Vec::new();
        self.open.store(false, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.dir.stop_generation.load(Ordering::Acquire) != self.generation
    }

    /// Writes the record collected so far, credentials redacted, if it
    /// fits under the cap.
    fn commit(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            return Err(closed());
        }
        if !redact(&mut self.record) {
            // It names a credential header but is not JSON: not written.
            warn!(file = self.name, "a qlog record that could not be redacted was dropped");
            self.record.clear();
            return Ok(());
        }
        let len = self.record.len() as u64;
        let Some(file) = self.file.as_mut() else { return Err(closed()) };
        if self.written + len > self.cap {
            info!(
                file = self.name,
                cap = self.cap,
                "qlog file full (qlog.max_file_bytes): later events are not written"
            );
            self.close();
            return Err(closed());
        }
        if let Err(e) = file.write_all(&self.record) {
            warn!(file = self.name, "qlog write failed, file closed: {e}");
            self.close();
            return Err(e);
        }
        self.written += len;
        self.record.clear();
        Ok(())
    }
}

/// Header fields whose values never reach a qlog file: the client's
/// credentials (quiche logs every header field of every HEADERS frame, and
/// a relay token is a bearer secret).
const SECRET_HEADERS: [&str; 3] = ["proxy-authorization", "authorization", "cookie"];

/// What a credential's value becomes.
pub const REDACTED: &str = "<redacted>";

/// Replaces the values of credential header fields in `record` (RS, JSON
/// text, LF) with [`REDACTED`]; records that name none are left as they
/// are. False when one is named but the record is not JSON (it must not
/// be written then).
fn redact(record: &mut Vec<u8>) -> bool {
    let named =
        SECRET_HEADERS.iter().any(|h| record.windows(h.len()).any(|w| w.eq_ignore_ascii_case(h.as_bytes())));
    if !named {
        return true;
    }
    let Some(json) = record.get(1..record.len().saturating_sub(1)) else { return false };
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(json) else { return false };
    redact_value(&mut value);
    let Ok(text) = serde_json::to_vec(&value) else { return false };
    record.clear();
    record.push(0x1e);
    record.extend_from_slice(&text);
    record.push(b'\n');
    true
}

/// Redacts every `{"name": <credential header>, "value": ...}` in `value`.
fn redact_value(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let secret = map
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| SECRET_HEADERS.iter().any(|h| n.eq_ignore_ascii_case(h)));
            if secret {
                map.insert("value".into(), Value::String(REDACTED.into()));
                map.remove("value_bytes");
            }
            map.values_mut().for_each(redact_value);
        }
        Value::Array(items) => items.iter_mut().for_each(redact_value),
        _ => {}
    }
}

fn closed() -> io::Error {
    io::Error::other("qlog file closed")
}

impl Write for QlogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_some() && self.stopped() {
            self.close();
        }
        if self.file.is_none() {
            // An error makes quiche's serializer give up on the event.
            return Err(closed());
        }
        if self.written + (self.record.len() + buf.len()) as u64 > self.cap {
            // This record cannot fit any more: the file ends here.
            self.record.extend_from_slice(buf);
            return self.commit().map(|()| buf.len());
        }
        self.record.extend_from_slice(buf);
        // JSON text never holds a raw LF (serde_json escapes it in
        // strings), so a piece ending in LF ends the record.
        if buf.last() == Some(&b'\n') {
            self.commit()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.file.is_some() && self.stopped() {
            self.close();
        }
        Ok(())
    }
}

impl Drop for QlogWriter {
    fn drop(&mut self) {
        self.open.store(false, Ordering::Release);
    }
}

/// A qlog session in force: what it matches, until when new connections
/// may match, and where and how much it writes.
#[derive(Debug)]
pub struct Window {
    /// Control's number for the session (`qlog_session` counter).
    pub session: u64,
    target: QlogTarget,
    until: Instant,
    cap: u64,
    level: QlogLevel,
    dir: Arc<QlogDir>,
}

impl Window {
    /// Whether an open connection (this worker's `worker`, serial `conn`,
    /// client now at `client`) is one the session asks for.
    pub fn matches_existing(&self, worker: u32, conn: u64, client: SocketAddr) -> bool {
        match self.target {
            QlogTarget::Conn { worker: w, conn_id } => w == worker && conn_id == conn,
            QlogTarget::Client { .. } => self.matches_client(client),
        }
    }

    /// Whether a connection accepted now from `client` is to be logged:
    /// the session names clients, and its window is still open.
    pub fn admits_new(&self, client: SocketAddr, now: Instant) -> bool {
        now < self.until && self.matches_client(client)
    }

    /// Whether the window for new connections has closed.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }

    fn matches_client(&self, client: SocketAddr) -> bool {
        match self.target {
            QlogTarget::Client { ip, port } => {
                ip.to_canonical() == client.ip().to_canonical() && port.is_none_or(|p| p == client.port())
            }
            QlogTarget::Conn { .. } => false,
        }
    }

    /// Starts connection `conn`'s qlog into a new file named after it.
    pub fn attach(
        &self,
        quic: &mut crate::quic::Connection,
        worker: u32,
        conn: u64,
        client: SocketAddr,
    ) -> Result<String, QlogError> {
        if !BUILT {
            return Err(QlogError::NotBuilt);
        }
        let name = file_name(worker, conn, SystemTime::now());
        let writer = self.dir.create(&name, self.cap)?;
        set_qlog(
            quic,
            writer,
            format!("masque-relay worker {worker} conn {conn}"),
            format!("client {client}"),
            self.level,
        );
        Ok(name)
    }
}

/// Whether this dataplane was built with qlog (the `qlog` feature).
pub const BUILT: bool = cfg!(feature = "qlog");

#[cfg(feature = "qlog")]
fn set_qlog(
    quic: &mut crate::quic::Connection,
    writer: QlogWriter,
    title: String,
    description: String,
    level: QlogLevel,
) {
    let level = match level {
        QlogLevel::Core => quiche::QlogLevel::Core,
        QlogLevel::Base => quiche::QlogLevel::Base,
        QlogLevel::Extra => quiche::QlogLevel::Extra,
    };
    quic.set_qlog_with_level(Box::new(writer), title, description, level);
}

#[cfg(not(feature = "qlog"))]
fn set_qlog(_: &mut crate::quic::Connection, _: QlogWriter, _: String, _: String, _: QlogLevel) {}

/// Finishes `quic`'s qlog: quiche serializes nothing more for it.
pub fn finish(quic: &mut crate::quic::Connection) {
    #[cfg(feature = "qlog")]
    if let Some(streamer) = quic.qlog_streamer() {
        let _ = streamer.finish_log();
    }
    #[cfg(not(feature = "qlog"))]
    let _ = quic;
}

impl Window {}

/// `w<worker>-conn<serial>-<unix ms>.sqlog`: the worker and connection
/// `relayctl conns` shows, and when it started (serials restart with the
/// dataplane).
pub fn file_name(worker: u32, conn: u64, at: SystemTime) -> String {
    let ms = at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    format!("w{worker}-conn{conn}-{ms}{SUFFIX}")
}

#[derive(Debug, Default)]
struct Inner {
    session: u64,
    window: Option<Arc<Window>>,
    dir: Option<Arc<QlogDir>>,
}

/// The qlog session every worker follows: control's commands are applied
/// here (by the thread that follows control), and each worker adopts the
/// result at its next turn ([`QlogShared::epoch`] says whether it changed).
#[derive(Debug, Default)]
pub struct QlogShared {
    inner: Mutex<Inner>,
    epoch: AtomicU64,
}

impl QlogShared {
    /// No session.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grows with every command applied.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The last session's number, and its window if it is a start.
    pub fn current(&self) -> (u64, Option<Arc<Window>>) {
        let inner = self.inner();
        (inner.session, inner.window.clone())
    }

    /// Applies control's command at `now`; `fds` came with it. A start
    /// naming the directory in use keeps its list of files (and the
    /// writers of earlier sessions go on); another directory stops the
    /// old one's writers. A stop stops every writer and closes the window.
    pub fn apply(&self, command: QlogCommand, mut fds: Vec<OwnedFd>, now: Instant) -> Result<(), QlogError> {
        let mut inner = self.inner();
        match command {
            QlogCommand::Start(start) => {
                if !BUILT {
                    return Err(QlogError::NotBuilt);
                }
                start.validate().map_err(|e| QlogError::Invalid(e.to_string()))?;
                if fds.len() != 1 {
                    return Err(QlogError::Descriptors(fds.len()));
                }
                let fd = fds.pop().ok_or(QlogError::Descriptors(0))?;
                let dir = self.directory(&mut inner, fd, &start)?;
                inner.session = start.session;
                inner.window = Some(Arc::new(Window {
                    session: start.session,
                    target: start.target,
                    until: now + Duration::from_secs(u64::from(start.seconds)),
                    cap: start.max_file_bytes,
                    level: start.level,
                    dir,
                }));
            }
            QlogCommand::Stop { session } => {
                if let Some(dir) = &inner.dir {
                    dir.stop_all();
                }
                inner.session = session;
                inner.window = None;
            }
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn directory(
        &self,
        inner: &mut Inner,
        fd: OwnedFd,
        start: &QlogStart,
    ) -> Result<Arc<QlogDir>, QlogError> {
        let max_files = start.max_files as usize;
        let file = File::from(fd);
        if let Some(dir) = &inner.dir
            && dir.is(&file)
        {
            dir.files().max_files = max_files;
            return Ok(dir.clone());
        }
        let dir = Arc::new(QlogDir::new(file.into(), max_files)?);
        if let Some(old) = inner.dir.replace(dir.clone()) {
            old.stop_all();
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-qlog-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn open_dir(path: &Path, max_files: usize) -> Arc<QlogDir> {
        Arc::new(QlogDir::new(File::open(path).unwrap().into(), max_files).unwrap())
    }

    /// Writes one JSON-SEQ record the way quiche's streamer does: RS, the
    /// JSON in pieces, LF.
    fn record(w: &mut QlogWriter, json: &str) -> io::Result<()> {
        w.write_all(b"\x1e")?;
        for piece in json.as_bytes().chunks(7) {
            w.write_all(piece)?;
        }
        w.write_all(b"\n")
    }

    #[test]
    fn whole_records_only_and_never_past_the_cap() {
        let path = temp_dir("cap");
        let dir = open_dir(&path, 4);
        let mut w = dir.create("a.sqlog", 100).unwrap();
        let event = r#"{"time":1.5,"name":"transport:packet_sent"}"#;
        let one = event.len() as u64 + 2; // RS and LF: 45 bytes
        record(&mut w, event).unwrap();
        record(&mut w, event).unwrap();
        assert_eq!(w.written(), 2 * one);
        // A third would pass 100 bytes: refused, and the file is closed.
        assert!(record(&mut w, event).is_err());
        assert!(record(&mut w, r#"{"x":1}"#).is_err(), "closed for good");
        let text = std::fs::read(path.join("a.sqlog")).unwrap();
        assert_eq!(text.len() as u64, 2 * one);
        let records: Vec<&[u8]> = text.split(|b| *b == 0x1e).skip(1).collect();
        assert_eq!(records.len(), 2);
        for r in records {
            let v: serde_json::Value = serde_json::from_slice(r).unwrap();
            assert_eq!(v["name"], "transport:packet_sent");
        }
    }

    #[test]
    fn credentials_in_header_fields_are_redacted() {
        let path = temp_dir("redact");
        let dir = open_dir(&path, 4);
        let mut w = dir.create("a.sqlog", 10_000).unwrap();
        let headers = r#"{"time":2.0,"name":"http3:frame_parsed","data":{"stream_id":0,"frame":{"frame_type":"headers","headers":[{"name":":method","value":"CONNECT"},{"name":"proxy-authorization","value":"Bearer s3cret"},{"name":"Authorization","value":"Basic czNjcmV0","value_bytes":"ab"},{"name":"cookie","value":"id=s3cret"}]}}}"#;
        record(&mut w, headers).unwrap();
        record(&mut w, r#"{"time":3.0,"name":"transport:packet_sent"}"#).unwrap();
        let text = std::fs::read(path.join("a.sqlog")).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            !text.contains("s3cret") && !text.contains("czNjcmV0") && !text.contains("value_bytes"),
            "{text}"
        );
        let records: Vec<serde_json::Value> =
            text.split('\x1e').skip(1).map(|r| serde_json::from_str(r).unwrap()).collect();
        let fields = &records[0]["data"]["frame"]["headers"];
        assert_eq!(fields[0]["value"], "CONNECT", "other fields are kept");
        for i in 1..=3 {
            assert_eq!(fields[i]["value"], REDACTED, "{}", fields[i]);
        }
        assert_eq!(records[1]["name"], "transport:packet_sent");
        // A record naming a credential that is not JSON is not written.
        let before = w.written();
        w.write_all(b"\x1e{\"name\":\"proxy-authorization\",\"value\":\"s3cret\"\n").unwrap();
        assert_eq!(w.written(), before);
    }

    #[test]
    fn a_partial_record_is_not_written_until_it_ends() {
        let path = temp_dir("partial");
        let dir = open_dir(&path, 4);
        let mut w = dir.create("a.sqlog", 1000).unwrap();
        w.write_all(b"\x1e{\"time\":").unwrap();
        assert_eq!(std::fs::read(path.join("a.sqlog")).unwrap().len(), 0);
        w.write_all(b"1}\n").unwrap();
        assert_eq!(std::fs::read(path.join("a.sqlog")).unwrap(), b"\x1e{\"time\":1}\n");
    }

    #[test]
    fn oldest_closed_files_go_first_and_open_ones_are_kept() {
        let path = temp_dir("rotate");
        std::fs::write(path.join("old.sqlog"), b"").unwrap();
        std::fs::write(path.join("notes.txt"), b"").unwrap();
        let dir = open_dir(&path, 2);
        assert_eq!(dir.names(), ["old.sqlog"]);
        let a = dir.create("a.sqlog", 100).unwrap();
        // Full: the old file (closed) makes room for b.
        let b = dir.create("b.sqlog", 100).unwrap();
        assert_eq!(dir.names(), ["a.sqlog", "b.sqlog"]);
        assert!(!path.join("old.sqlog").exists() && path.join("notes.txt").exists());
        // Both open: no third file.
        assert!(matches!(dir.create("c.sqlog", 100), Err(QlogError::AllOpen(2))));
        assert!(!path.join("c.sqlog").exists());
        // a's connection ends: a makes room.
        drop(a);
        let _c = dir.create("c.sqlog", 100).unwrap();
        assert_eq!(dir.names(), ["b.sqlog", "c.sqlog"]);
        assert!(!path.join("a.sqlog").exists());
        drop(b);
        // An existing name is never overwritten.
        assert!(matches!(dir.create("c.sqlog", 100), Err(QlogError::Create { .. })));
    }

    #[test]
    fn stop_closes_every_writer_at_its_next_write() {
        let path = temp_dir("stop");
        let dir = open_dir(&path, 4);
        let mut w = dir.create("a.sqlog", 1000).unwrap();
        record(&mut w, r#"{"n":1}"#).unwrap();
        dir.stop_all();
        assert!(record(&mut w, r#"{"n":2}"#).is_err());
        assert_eq!(std::fs::read(path.join("a.sqlog")).unwrap(), b"\x1e{\"n\":1}\n");
        // Closed: it no longer holds its place.
        let _b = dir.create("b.sqlog", 1000).unwrap();
        assert!(dir.files().entries.iter().all(|e| e.name != "a.sqlog" || !e.open.load(Ordering::Acquire)));
    }

    fn start(target: QlogTarget, seconds: u32) -> QlogCommand {
        QlogCommand::Start(QlogStart {
            session: 7,
            target,
            seconds,
            max_file_bytes: 1 << 20,
            max_files: 8,
            level: QlogLevel::Base,
        })
    }

    #[test]
    #[cfg(not(feature = "qlog"))]
    fn without_the_feature_a_start_is_refused() {
        let path = temp_dir("not-built");
        let shared = QlogShared::new();
        let fd: OwnedFd = File::open(&path).unwrap().into();
        let target = QlogTarget::Conn { worker: 0, conn_id: 1 };
        assert!(matches!(shared.apply(start(target, 1), vec![fd], Instant::now()), Err(QlogError::NotBuilt)));
        assert_eq!(shared.epoch(), 0);
    }

    #[test]
    #[cfg(feature = "qlog")]
    fn windows_match_a_connection_or_a_client_for_their_time() {
        let path = temp_dir("window");
        let shared = QlogShared::new();
        let now = Instant::now();
        let client: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:4000".parse().unwrap();

        let fd: OwnedFd = File::open(&path).unwrap().into();
        shared.apply(start(QlogTarget::Conn { worker: 1, conn_id: 3 }, 60), vec![fd], now).unwrap();
        assert_eq!(shared.epoch(), 1);
        let (session, w) = shared.current();
        let w = w.unwrap();
        assert_eq!(session, 7);
        assert!(w.matches_existing(1, 3, client) && !w.matches_existing(0, 3, client));
        assert!(!w.admits_new(client, now), "a connection target admits no new connection");

        let any_port = QlogTarget::Client { ip: "192.0.2.1".parse().unwrap(), port: None };
        let fd: OwnedFd = File::open(&path).unwrap().into();
        shared.apply(start(any_port, 10), vec![fd], now).unwrap();
        let w = shared.current().1.unwrap();
        assert!(w.matches_existing(0, 99, client) && !w.matches_existing(0, 99, other));
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5".parse().unwrap();
        assert!(w.admits_new(mapped, now + Duration::from_secs(9)));
        assert!(
            !w.admits_new(client, now + Duration::from_secs(10)) && w.expired(now + Duration::from_secs(10))
        );

        let one_port = QlogTarget::Client { ip: "192.0.2.1".parse().unwrap(), port: Some(4001) };
        let fd: OwnedFd = File::open(&path).unwrap().into();
        shared.apply(start(one_port, 10), vec![fd], now).unwrap();
        assert!(!shared.current().1.unwrap().admits_new(client, now));

        shared.apply(QlogCommand::Stop { session: 8 }, vec![], now).unwrap();
        assert_eq!((shared.current().0, shared.current().1.is_none(), shared.epoch()), (8, true, 4));
    }

    #[test]
    #[cfg(feature = "qlog")]
    fn a_start_needs_one_directory_descriptor() {
        let path = temp_dir("fds");
        let shared = QlogShared::new();
        let now = Instant::now();
        let target = QlogTarget::Conn { worker: 0, conn_id: 1 };
        assert!(matches!(shared.apply(start(target, 1), vec![], now), Err(QlogError::Descriptors(0))));
        std::fs::write(path.join("f"), b"").unwrap();
        let file: OwnedFd = File::open(path.join("f")).unwrap().into();
        assert!(matches!(shared.apply(start(target, 1), vec![file], now), Err(QlogError::NotADirectory)));
        assert_eq!(shared.epoch(), 0, "nothing applied");
    }
}

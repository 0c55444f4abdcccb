//! Where the issuer directory comes from, and its refresh thread.
//!
//! Control reads the directory (a file, or an `https://` URL) at start,
//! where a failure stops the start with the reason, and then every
//! `directory_refresh_secs` on a thread of its own (never the event loop);
//! a refresh that fails keeps the keys in force and is logged and counted.
//! A key the issuer stops listing is retired: its tokens are refused as
//! expired from the next refresh on.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use super::KeySource;
use super::directory::{self, Directory, MAX_DIRECTORY_BYTES};
use crate::policy::Policy;

/// How long a fetch may take to connect, and each read or write.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A directory's location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectorySource {
    /// A file.
    File(PathBuf),
    /// An `https://` URL.
    Url(String),
}

impl std::fmt::Display for DirectorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectorySource::File(p) => write!(f, "{}", p.display()),
            DirectorySource::Url(u) => f.write_str(u),
        }
    }
}

impl DirectorySource {
    /// Reads and parses the directory.
    pub fn load(&self) -> Result<Directory, String> {
        let bytes = match self {
            DirectorySource::File(path) => {
                let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut buf = Vec::new();
                Read::by_ref(&mut f)
                    .take(MAX_DIRECTORY_BYTES as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                buf
            }
            DirectorySource::Url(url) => fetch(url).map_err(|e| format!("{url}: {e}"))?,
        };
        directory::parse(&bytes).map_err(|e| format!("{self}: {e}"))
    }
}

/// GET `url` over HTTPS (the system's trust roots, the host name checked)
/// as HTTP/1.0, so the answer is the body up to the end of the stream
/// (no chunked coding to undo); at most [`MAX_DIRECTORY_BYTES`] of body,
/// 2xx only, no redirects.
fn fetch(url: &str) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("https://").ok_or("not an https:// URL")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    if authority.contains('@') || authority.is_empty() {
        return Err("the URL must name a host (and no user info)".into());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connecting to {addr}: {e}"))?;
    tcp.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let mut builder =
        boring::ssl::SslConnector::builder(boring::ssl::SslMethod::tls()).map_err(|e| e.to_string())?;
    if let Ok(ca) = std::env::var("RELAY_PRIVACY_PASS_CA_FILE") {
        // Tests: a private CA for a local issuer.
        builder.set_ca_file(&ca).map_err(|e| format!("{ca}: {e}"))?;
    }
    let connector = builder.build();
    let mut tls = connector.connect(host, tcp).map_err(|e| format!("TLS with {host}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/private-token-issuer-directory\r\n\
         User-Agent: masque-relay\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // The head is bounded by the same cap as the body, plus 16 KiB.
    Read::by_ref(&mut tls)
        .take((MAX_DIRECTORY_BYTES + 16 * 1024) as u64 + 1)
        .read_to_end(&mut response)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&response).map_err(|e| format!("bad answer: {e}"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err("the answer ended in its head".into()),
    };
    let code = parsed.code.unwrap_or(0);
    if !(200..300).contains(&code) {
        return Err(format!("the issuer answered {code}"));
    }
    let body = response.split_off(head_len);
    if body.len() > MAX_DIRECTORY_BYTES {
        return Err(format!("the directory is larger than {MAX_DIRECTORY_BYTES} bytes"));
    }
    Ok(body)
}

/// Installs `dir`'s keys as the directory's.
pub fn install(policy: &Mutex<Policy>, dir: Directory) -> Result<usize, String> {
    let mut p = policy.lock().unwrap_or_else(|e| e.into_inner());
    let pp = p.privacy_pass_mut().ok_or("Privacy Pass is not enabled")?;
    let n = dir.keys.len();
    pp.install(KeySource::Directory, dir.keys).map_err(|e| e.to_string())?;
    Ok(n)
}

/// Refreshes the directory every `every` on a thread named `pp-directory`.
pub fn spawn_refresh(
    source: DirectorySource,
    every: Duration,
    policy: Arc<Mutex<Policy>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("pp-directory".into()).spawn(move || {
        loop {
            std::thread::sleep(every);
            match source.load().and_then(|d| install(&policy, d)) {
                Ok(keys) => debug!(source = %source, keys, "Privacy Pass issuer directory refreshed"),
                Err(e) => warn!("Privacy Pass issuer directory not refreshed (the keys in force stay): {e}"),
            }
        }
    })
}

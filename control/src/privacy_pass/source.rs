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
    /// An `https://` URL, verified with the system's trust roots or, when
    /// given, only this CA file (an issuer with a private CA).
    Url {
        /// The URL.
        url: String,
        /// PEM CA certificates to verify the issuer with instead.
        ca_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for DirectorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectorySource::File(p) => write!(f, "{}", p.display()),
            DirectorySource::Url { url, .. } => f.write_str(url),
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
            DirectorySource::Url { url, ca_file } => {
                fetch(url, ca_file.as_deref()).map_err(|e| format!("{url}: {e}"))?
            }
        };
        directory::parse(&bytes).map_err(|e| format!("{self}: {e}"))
    }
}

/// GET `url` over HTTPS (the system's trust roots, the host name checked)
/// as HTTP/1.0, so the answer is the body up to the end of the stream
/// (no chunked coding to undo); at most [`MAX_DIRECTORY_BYTES`] of body,
/// 2xx only, no redirects.
fn fetch(url: &str, ca_file: Option<&std::path::Path>) -> Result<Vec<u8>, String> {
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
    if let Some(ca) = ca_file {
        let store = boring::x509::store::X509StoreBuilder::new().map_err(|e| e.to_string())?;
        let mut store = store;
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        for cert in boring::x509::X509::stack_from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))? {
            store.add_cert(cert).map_err(|e| e.to_string())?;
        }
        builder.set_verify_cert_store(store.build()).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use boring::ssl::{SslAcceptor, SslFiletype, SslMethod};

    use super::*;
    use crate::acl::TargetAcl;
    use crate::auth::Authenticator;
    use crate::privacy_pass::keys::tests::vector;
    use crate::privacy_pass::{PrivacyPass, Settings};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-pp-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn doc(keys: &[&str]) -> String {
        let entries: Vec<String> =
            keys.iter().map(|k| format!(r#"{{"token-type":2,"token-key":"{k}","not-before":0}}"#)).collect();
        format!(r#"{{"issuer-request-uri":"https://issuer.example/","token-keys":[{}]}}"#, entries.join(","))
    }

    /// An HTTPS server on loopback answering every connection with `answer`.
    fn serve(dir: &std::path::Path, answer: Vec<u8>) -> u16 {
        let creds = crate::state::self_signed(dir, &["localhost".to_string()]).unwrap();
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_certificate_chain_file(&creds.cert).unwrap();
        acceptor.set_private_key_file(&creds.key, SslFiletype::PEM).unwrap();
        let acceptor = acceptor.build();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(mut tls) = acceptor.accept(stream) {
                    let mut buf = [0u8; 4096];
                    let _ = tls.read(&mut buf);
                    let _ = tls.write_all(&answer);
                    let _ = tls.shutdown();
                }
            }
        });
        port
    }

    #[test]
    fn a_directory_is_fetched_over_https_from_a_verified_issuer_only() {
        let dir = temp_dir("https");
        let body = doc(&[vector::TOKEN_KEY]);
        let port = serve(
            &dir,
            format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}").into_bytes(),
        );
        let url = format!("https://localhost:{port}/.well-known/private-token-issuer-directory");
        let ca = Some(dir.join("cert.pem"));
        let d = DirectorySource::Url { url: url.clone(), ca_file: ca.clone() }.load().unwrap();
        assert_eq!(d.keys.len(), 1);
        // Without the issuer's CA the certificate is not trusted.
        let err = DirectorySource::Url { url, ca_file: None }.load().unwrap_err();
        assert!(err.contains("TLS with localhost"), "{err}");
        // A refusal, and a body past the bound.
        let dir404 = temp_dir("https404");
        let port = serve(&dir404, b"HTTP/1.0 404 Not Found\r\n\r\n".to_vec());
        let err = DirectorySource::Url {
            url: format!("https://localhost:{port}/"),
            ca_file: Some(dir404.join("cert.pem")),
        }
        .load()
        .unwrap_err();
        assert!(err.contains("answered 404"), "{err}");
        let big = format!("HTTP/1.0 200 OK\r\n\r\n{}", " ".repeat(MAX_DIRECTORY_BYTES + 1)).into_bytes();
        let bigdir = temp_dir("httpsbig");
        let port = serve(&bigdir, big);
        let err = DirectorySource::Url {
            url: format!("https://localhost:{port}/"),
            ca_file: Some(bigdir.join("cert.pem")),
        }
        .load()
        .unwrap_err();
        assert!(err.contains("larger than"), "{err}");
        for d in [dir, dir404, bigdir] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_refreshed_directory_rotates_keys_and_retires_the_old_ones() {
        let dir = temp_dir("file");
        let file = dir.join("directory.json");
        let policy = Mutex::new(
            Policy::new(Authenticator::default(), TargetAcl::new(vec![], vec![], vec![]), 1000)
                .with_privacy_pass(PrivacyPass::new(Settings {
                    issuer_name: "issuer.example".into(),
                    origin_info: vec![],
                    window_secs: 3600,
                    max_spent: 10,
                })),
        );
        let source = DirectorySource::File(file.clone());
        std::fs::write(&file, doc(&[vector::TOKEN_KEY])).unwrap();
        assert_eq!(install(&policy, source.load().unwrap()), Ok(1));
        let key_id = |p: &Mutex<Policy>| -> Vec<(String, bool)> {
            let p = p.lock().unwrap();
            p.privacy_pass().unwrap().stats(0).keys.iter().map(|k| (k.key_id.clone(), k.advertised)).collect()
        };
        let first = key_id(&policy);
        assert_eq!(first.len(), 1);
        // A new key in, the old one out: the old one is retired.
        let rsa = boring::rsa::Rsa::generate(2048).unwrap();
        let other = crate::privacy_pass::wire::base64url_padded(&crate::privacy_pass::tests::pss_spki(&rsa));
        std::fs::write(&file, doc(&[&other])).unwrap();
        assert_eq!(install(&policy, source.load().unwrap()), Ok(1));
        let second = key_id(&policy);
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].0, second[0].0);
        // A bad document changes nothing.
        std::fs::write(&file, "{").unwrap();
        assert!(source.load().unwrap_err().contains("not an issuer directory"));
        assert_eq!(key_id(&policy), second);
        std::fs::remove_file(&file).unwrap();
        assert!(source.load().unwrap_err().contains("directory.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

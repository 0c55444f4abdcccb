//! The TLS certificate and private key control serves with, reloadable
//! without a restart (`relayctl reload`, SIGHUP).
//!
//! Each successful load is a *generation*. The dataplane receives the new
//! chain and serves it to new connections; handshakes name the generation
//! they started with when they ask for a signature, so control keeps the
//! previous generation's key until the next reload and handshakes in
//! flight during a reload still complete. A reload that fails (unreadable
//! file, a key that does not match the certificate, an expired or
//! malformed certificate) changes nothing and says why.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use boring::asn1::Asn1Time;
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::x509::X509;
use serde::Serialize;

use crate::signer::{Signer, SignerError};

/// Why credentials could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The private key is unusable.
    #[error(transparent)]
    Key(#[from] SignerError),
    /// The certificate chain is unusable.
    #[error("the certificate chain {path} is invalid: {reason}")]
    BadChain {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the leaf certificate.
    #[error("the private key {key} does not match the certificate {cert}")]
    Mismatch {
        /// The key file.
        key: String,
        /// The certificate file.
        cert: String,
    },
}

/// What operators see of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateInfo {
    /// The generation (1 for the credentials loaded at start).
    pub generation: u32,
    /// The leaf's subject common name (or the whole subject).
    pub subject: String,
    /// The leaf's notAfter, as BoringSSL prints it.
    pub not_after: String,
    /// SHA-256 of the leaf certificate (DER), hex.
    pub sha256: String,
    /// Certificates in the chain.
    pub chain_len: usize,
}

/// One loaded certificate chain and its key.
struct Generation {
    info: CertificateInfo,
    chain_pem: String,
    key_pem: String,
    signer: Signer,
}

struct Generations {
    current: Arc<Generation>,
    previous: Option<Arc<Generation>>,
}

/// The credentials in force and the previous generation.
pub struct Credentials {
    cert_path: PathBuf,
    key_path: PathBuf,
    inner: RwLock<Generations>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Credentials").field("current", &self.info()).finish_non_exhaustive()
    }
}

fn load(cert_path: &Path, key_path: &Path, generation: u32) -> Result<Generation, CredentialError> {
    let shown = |p: &Path| p.display().to_string();
    let chain_pem = std::fs::read_to_string(cert_path)
        .map_err(|source| CredentialError::Read { path: shown(cert_path), source })?;
    let key_pem = std::fs::read_to_string(key_path)
        .map_err(|source| CredentialError::Read { path: shown(key_path), source })?;
    let signer = Signer::from_pem(key_pem.as_bytes())
        .map_err(|reason| SignerError::BadKey { path: shown(key_path), reason })?;
    let bad = |reason: String| CredentialError::BadChain { path: shown(cert_path), reason };
    let chain = X509::stack_from_pem(chain_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| bad("no certificate in the file".into()))?;
    let public = leaf.public_key().map_err(|e| bad(e.to_string()))?;
    if !signer.matches(&public) {
        return Err(CredentialError::Mismatch { key: shown(key_path), cert: shown(cert_path) });
    }
    let now = Asn1Time::days_from_now(0).map_err(|e| bad(e.to_string()))?;
    if leaf.not_after() < now {
        return Err(bad(format!("the leaf certificate expired on {}", leaf.not_after())));
    }
    let subject = leaf
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
        .unwrap_or_else(|| format!("{:?}", leaf.subject_name()));
    let digest = leaf.digest(MessageDigest::sha256()).map_err(|e| bad(e.to_string()))?;
    let info = CertificateInfo {
        generation,
        subject,
        not_after: leaf.not_after().to_string(),
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        chain_len: chain.len(),
    };
    Ok(Generation { info, chain_pem, key_pem, signer })
}

impl Credentials {
    /// Loads generation 1 from the certificate chain and key files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CredentialError> {
        let current = Arc::new(load(cert_path, key_path, 1)?);
        Ok(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            inner: RwLock::new(Generations { current, previous: None }),
        })
    }

    /// Reads the files again. On success the new generation is served to
    /// new connections and the one it replaces still signs for handshakes
    /// that began with it; on failure nothing changes.
    pub fn reload(&self) -> Result<CertificateInfo, CredentialError> {
        let next = self.info().generation.wrapping_add(1).max(1);
        let loaded = Arc::new(load(&self.cert_path, &self.key_path, next)?);
        let info = loaded.info.clone();
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(&mut g.current, loaded);
        g.previous = Some(old);
        Ok(info)
    }

    /// The generation in force.
    pub fn info(&self) -> CertificateInfo {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).current.info.clone()
    }

    /// The previous generation, if a reload happened.
    pub fn previous_info(&self) -> Option<CertificateInfo> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).previous.as_ref().map(|g| g.info.clone())
    }

    /// The current generation's number, chain and key (PEM).
    pub fn current_pem(&self) -> (u32, String, String) {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        (g.current.info.generation, g.current.chain_pem.clone(), g.current.key_pem.clone())
    }

    /// Signs a handshake of `generation` (the current or the previous one).
    pub fn sign(&self, generation: u32, scheme: u16, input: &[u8]) -> Result<Vec<u8>, SignError> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let signer = if g.current.info.generation == generation {
            &g.current.signer
        } else if let Some(prev) = g.previous.as_ref().filter(|p| p.info.generation == generation) {
            &prev.signer
        } else {
            return Err(SignError::Retired(generation));
        };
        Ok(signer.sign(scheme, input)?)
    }
}

/// Why a handshake could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The handshake began with credentials two or more reloads old.
    #[error("certificate generation {0} has been retired")]
    Retired(u32),
    /// The key cannot sign this way.
    #[error(transparent)]
    Signer(#[from] SignerError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::scheme;

    fn write_pair(dir: &Path, names: &[&str]) {
        let sub = dir.join("gen");
        let _ = std::fs::remove_dir_all(&sub);
        std::fs::create_dir_all(&sub).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let c = crate::state::self_signed(&sub, &names).unwrap();
        std::fs::copy(&c.cert, dir.join("cert.pem")).unwrap();
        std::fs::copy(&c.key, dir.join("key.pem")).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-creds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reload_makes_a_new_generation_and_keeps_the_previous_key() {
        let dir = temp_dir("reload");
        write_pair(&dir, &["first.example"]);
        let creds = Credentials::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        let first = creds.info();
        assert_eq!(first.generation, 1);
        assert_eq!(first.subject, "first.example");
        assert_eq!(first.sha256.len(), 64);
        write_pair(&dir, &["second.example"]);
        let second = creds.reload().unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(second.subject, "second.example");
        assert_eq!(creds.previous_info().unwrap().sha256, first.sha256);
        let s = scheme::ECDSA_SECP256R1_SHA256;
        assert!(creds.sign(2, s, b"x").is_ok());
        assert!(creds.sign(1, s, b"x").is_ok(), "a handshake begun before the reload still signs");
        write_pair(&dir, &["third.example"]);
        assert_eq!(creds.reload().unwrap().generation, 3);
        assert!(matches!(creds.sign(1, s, b"x"), Err(SignError::Retired(1))));
        assert!(creds.sign(2, s, b"x").is_ok());
        assert!(!format!("{creds:?}").contains("BEGIN"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_reload_changes_nothing() {
        let dir = temp_dir("bad");
        write_pair(&dir, &["good.example"]);
        let creds = Credentials::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        let before = creds.info();
        // A key from another pair.
        let good_key = std::fs::read(dir.join("key.pem")).unwrap();
        write_pair(&dir, &["other.example"]);
        let other_cert = std::fs::read(dir.join("cert.pem")).unwrap();
        std::fs::write(dir.join("key.pem"), &good_key).unwrap();
        let err = creds.reload().unwrap_err();
        assert!(matches!(err, CredentialError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
        std::fs::write(dir.join("cert.pem"), b"not a certificate").unwrap();
        assert!(matches!(creds.reload(), Err(CredentialError::BadChain { .. })));
        std::fs::write(dir.join("cert.pem"), &other_cert).unwrap();
        std::fs::remove_file(dir.join("key.pem")).unwrap();
        let err = creds.reload().unwrap_err().to_string();
        assert!(err.contains("key.pem"), "{err}");
        assert_eq!(creds.info(), before);
        assert!(creds.previous_info().is_none());
        assert!(creds.sign(1, scheme::ECDSA_SECP256R1_SHA256, b"x").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

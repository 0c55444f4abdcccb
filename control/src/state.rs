//! The control process's state directory: TLS credentials and the demo
//! token, generated on first run with restrictive permissions.
#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use boring::asn1::Asn1Time;
use boring::bn::{BigNum, MsbOption};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::PKey;
use boring::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use boring::x509::{X509, X509NameBuilder};

/// Why the state directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating the self-signed certificate: {0}")]
    Crypto(#[from] boring::error::ErrorStack),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// Creates `dir` (mode 0700) if needed.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Writes `data` to `path` atomically (temporary file, sync, rename) with
/// mode 0600.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Paths of the credentials in use.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Whether they were generated just now.
    pub generated: bool,
}

/// Returns the self-signed credentials in `dir`, generating an ECDSA P-256
/// key and a one-year certificate for `names` if they do not exist yet.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<Credentials, StateError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok(Credentials { cert, key, generated: false });
    }
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let pkey = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, names.first().map_or("masque-relay", |s| s.as_str()))?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&pkey)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(365)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    // Clients pin this certificate as their trust anchor, so it is marked
    // as a CA that can only sign itself (pathlen 0); a KeyUsage without
    // keyCertSign would make verifiers reject it as its own issuer.
    let constraints = BasicConstraints::new().critical().ca().pathlen(0).build()?;
    let key_usage = KeyUsage::new().critical().digital_signature().key_cert_sign().build()?;
    let ext_key_usage = ExtendedKeyUsage::new().server_auth().build()?;
    b.append_extension(&constraints)?;
    b.append_extension(&key_usage)?;
    b.append_extension(&ext_key_usage)?;
    let mut san = SubjectAlternativeName::new();
    for n in names {
        if n.parse::<IpAddr>().is_ok() {
            san.ip(n);
        } else {
            san.dns(n);
        }
    }
    let san = san.build(&b.x509v3_context(None, None))?;
    b.append_extension(&san)?;
    b.sign(&pkey, MessageDigest::sha256())?;
    let x509 = b.build();
    write_private(&key, &pkey.private_key_to_pem_pkcs8()?)?;
    write_private(&cert, &x509.to_pem()?)?;
    fs::set_permissions(&cert, fs::Permissions::from_mode(0o644)).map_err(io_err(&cert))?;
    Ok(Credentials { cert, key, generated: true })
}

/// Returns the demo token stored in `dir/token`, generating 32 random bytes
/// (hex) on first use.
pub fn demo_token(dir: &Path) -> Result<(String, bool), StateError> {
    let path = dir.join("token");
    if let Ok(existing) = fs::read_to_string(&path) {
        let t = existing.trim().to_string();
        if !t.is_empty() {
            return Ok((t, false));
        }
    }
    let mut bytes = [0u8; 32];
    boring::rand::rand_bytes(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, format!("{token}\n").as_bytes())?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_with_private_permissions() {
        let dir = std::env::temp_dir().join(format!("relay-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        ensure_dir(&dir).unwrap();
        let c = self_signed(&dir, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(c.generated);
        let mode = fs::metadata(&c.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = fs::read(&c.cert).unwrap();
        let x = X509::from_pem(&pem).unwrap();
        let sans: Vec<_> =
            x.subject_alt_names().unwrap().iter().filter_map(|n| n.dnsname().map(str::to_string)).collect();
        assert_eq!(sans, ["localhost"]);
        assert!(!self_signed(&dir, &["localhost".into()]).unwrap().generated);
        let (t1, new1) = demo_token(&dir).unwrap();
        let (t2, new2) = demo_token(&dir).unwrap();
        assert!(new1 && !new2);
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! A small test PKI for the mutual TLS tests: CAs, client certificates
//! (valid or expired) and revocation lists, made with BoringSSL (already
//! linked; no `rcgen` or `openssl` CLI needed). The CRL's DER is laid out
//! here because the `boring` crate has no CRL builder; it is signed with
//! BoringSSL, and the relay parses and verifies it with BoringSSL.

use std::path::{Path, PathBuf};

use anyhow::Result;
use boring::asn1::Asn1Time;
use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509, X509NameBuilder, X509NameRef};

/// A certificate authority.
pub struct TestCa {
    /// Its self-signed certificate.
    pub cert: X509,
    key: PKey<Private>,
}

/// A client certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

fn new_key() -> Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn name(cn: &str) -> Result<boring::x509::X509Name> {
    let mut b = X509NameBuilder::new()?;
    b.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(b.build())
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl TestCa {
    /// A CA named `cn`, valid for 30 days.
    pub fn new(cn: &str) -> Result<Self> {
        let key = new_key()?;
        let subject = name(cn)?;
        let mut b = X509::builder()?;
        b.set_version(2)?;
        let serial = BigNum::from_u32(1)?.to_asn1_integer()?;
        b.set_serial_number(&serial)?;
        b.set_subject_name(&subject)?;
        b.set_issuer_name(&subject)?;
        b.set_pubkey(&key)?;
        let (from, to) = (Asn1Time::from_unix(now_unix() - 86_400)?, Asn1Time::days_from_now(30)?);
        b.set_not_before(&from)?;
        b.set_not_after(&to)?;
        let bc = boring::x509::extension::BasicConstraints::new().critical().ca().build()?;
        b.append_extension(&bc)?;
        b.sign(&key, MessageDigest::sha256())?;
        Ok(Self { cert: b.build(), key })
    }

    /// Writes the CA certificate to `path` (PEM).
    pub fn write_pem(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.cert.to_pem()?)?;
        Ok(())
    }

    /// Issues a client certificate (`serial`, subject CN and one DNS name),
    /// valid from `not_before` to `not_after` (Unix seconds), and writes it
    /// and its key under `dir` as `<stem>.pem` and `<stem>.key`.
    pub fn issue(
        &self,
        dir: &Path,
        stem: &str,
        serial: u32,
        dns: &str,
        validity: (i64, i64),
    ) -> Result<ClientFiles> {
        self.issue_for(dir, stem, serial, dns, None, validity)
    }

    /// Issues a server certificate (extended key usage serverAuth) for the
    /// DNS name `dns` and the address `ip`, valid from yesterday for a
    /// week, written like [`Self::issue`]'s: an origin's certificate for
    /// `wss://` tests.
    pub fn issue_server(
        &self,
        dir: &Path,
        stem: &str,
        serial: u32,
        dns: &str,
        ip: std::net::IpAddr,
    ) -> Result<ClientFiles> {
        let now = now_unix();
        self.issue_for(dir, stem, serial, dns, Some(ip), (now - 86_400, now + 7 * 86_400))
    }

    /// A client certificate, or with `server_ip` a server certificate
    /// naming that address too.
    fn issue_for(
        &self,
        dir: &Path,
        stem: &str,
        serial: u32,
        dns: &str,
        server_ip: Option<std::net::IpAddr>,
        validity: (i64, i64),
    ) -> Result<ClientFiles> {
        let key = new_key()?;
        let mut b = X509::builder()?;
        b.set_version(2)?;
        let serial = BigNum::from_u32(serial)?.to_asn1_integer()?;
        b.set_serial_number(&serial)?;
        let subject = name(dns)?;
        b.set_subject_name(&subject)?;
        b.set_issuer_name(self.cert.subject_name())?;
        b.set_pubkey(&key)?;
        let (from, to) = (Asn1Time::from_unix(validity.0)?, Asn1Time::from_unix(validity.1)?);
        b.set_not_before(&from)?;
        b.set_not_after(&to)?;
        let mut san = SubjectAlternativeName::new();
        san.dns(dns);
        if let Some(ip) = server_ip {
            san.ip(&ip.to_string());
        }
        let san = san.build(&b.x509v3_context(Some(&self.cert), None))?;
        b.append_extension(&san)?;
        let mut eku = boring::x509::extension::ExtendedKeyUsage::new();
        if server_ip.is_some() {
            eku.server_auth();
        } else {
            eku.client_auth();
        }
        let eku = eku.build()?;
        b.append_extension(&eku)?;
        b.sign(&self.key, MessageDigest::sha256())?;
        let files =
            ClientFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
        std::fs::write(&files.cert, b.build().to_pem()?)?;
        std::fs::write(&files.key, key.private_key_to_pem_pkcs8()?)?;
        Ok(files)
    }

    /// A client certificate valid from yesterday for a week.
    pub fn issue_valid(&self, dir: &Path, stem: &str, serial: u32, dns: &str) -> Result<ClientFiles> {
        let now = now_unix();
        self.issue(dir, stem, serial, dns, (now - 86_400, now + 7 * 86_400))
    }

    /// A client certificate that expired yesterday.
    pub fn issue_expired(&self, dir: &Path, stem: &str, serial: u32, dns: &str) -> Result<ClientFiles> {
        let now = now_unix();
        self.issue(dir, stem, serial, dns, (now - 10 * 86_400, now - 86_400))
    }

    /// A v2 CRL (ecdsa-with-SHA256) revoking `serials`, DER, good for a
    /// week.
    pub fn crl(&self, serials: &[u32]) -> Result<Vec<u8>> {
        crl_der(&self.key, self.cert.subject_name(), serials)
    }
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match body.len() {
        n @ 0..=127 => out.push(n as u8),
        n @ 128..=255 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend(body);
    out
}

fn integer(be: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
    if v.first().is_none_or(|b| b & 0x80 != 0) {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

fn utc_time(unix: i64) -> Vec<u8> {
    let t = Asn1Time::from_unix(unix).expect("a time");
    // Asn1Time prints as "Mon DD HH:MM:SS YYYY GMT"; lay it out again.
    let s = t.to_string();
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let parts: Vec<&str> = s.split_whitespace().collect();
    let month = months.iter().position(|m| *m == parts[0]).expect("a month") + 1;
    let day: u32 = parts[1].parse().expect("a day");
    let hms = parts[2].replace(':', "");
    let year: u32 = parts[3].parse().expect("a year");
    der(0x17, format!("{:02}{month:02}{day:02}{hms}Z", year % 100).as_bytes())
}

fn crl_der(key: &PKey<Private>, issuer: &X509NameRef, serials: &[u32]) -> Result<Vec<u8>> {
    let alg = der(0x30, &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
    let now = now_unix();
    let mut revoked = Vec::new();
    for s in serials {
        let mut entry = integer(&s.to_be_bytes());
        entry.extend(utc_time(now - 3600));
        revoked.extend(der(0x30, &entry));
    }
    let mut tbs = integer(&[1]);
    tbs.extend(&alg);
    tbs.extend(issuer.to_der()?);
    tbs.extend(utc_time(now - 3600));
    tbs.extend(utc_time(now + 7 * 86_400));
    if !revoked.is_empty() {
        tbs.extend(der(0x30, &revoked));
    }
    let tbs = der(0x30, &tbs);
    let mut signer = boring::sign::Signer::new(MessageDigest::sha256(), key)?;
    let sig = signer.sign_oneshot_to_vec(&tbs)?;
    let mut bits = vec![0];
    bits.extend(sig);
    let mut list = tbs;
    list.extend(alg);
    list.extend(der(0x03, &bits));
    Ok(der(0x30, &list))
}

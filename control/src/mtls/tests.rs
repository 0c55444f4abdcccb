//! Tests of `[auth.mtls]`: CAs, revocation lists and mapping together.
//! Certificates and CRLs are made here with BoringSSL (the CRL's DER by
//! hand: the `boring` crate has no CRL builder; only test data is built
//! this way, parsing and verification are BoringSSL's).

use boring::asn1::Asn1Time;
use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey};
use boring::hash::{MessageDigest, hash};
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509, X509NameBuilder};

use super::crl::{self, CrlError};
use super::*;
use crate::config::CertField;

/// A CA: its certificate and key.
pub(crate) struct Ca {
    pub cert: X509,
    pub key: PKey<Private>,
}

fn key() -> PKey<Private> {
    PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap())
        .unwrap()
}

impl Ca {
    pub fn new(cn: &str) -> Self {
        let key = key();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap()).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap()).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        Self { cert: b.build(), key }
    }

    /// A leaf with this serial, CN and DNS name.
    pub fn issue(&self, serial: u32, cn: &str, dns: &str) -> X509 {
        let key = key();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&BigNum::from_u32(serial).unwrap().to_asn1_integer().unwrap()).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        let san =
            SubjectAlternativeName::new().dns(dns).build(&b.x509v3_context(Some(&self.cert), None)).unwrap();
        b.append_extension(&san).unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    /// A v2 CRL (ecdsa-with-SHA256) revoking `serials`, DER.
    pub fn crl(&self, serials: &[u32]) -> Vec<u8> {
        let alg = der(0x30, &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
        let time = |t: &str| der(0x17, t.as_bytes());
        let mut revoked = Vec::new();
        for s in serials {
            let mut entry = integer(&s.to_be_bytes());
            entry.extend(time("250101000000Z"));
            revoked.extend(der(0x30, &entry));
        }
        let mut tbs = integer(&[1]);
        tbs.extend(&alg);
        tbs.extend(self.cert.subject_name().to_der().unwrap());
        tbs.extend(time("250101000000Z"));
        tbs.extend(time("491231000000Z"));
        if !revoked.is_empty() {
            tbs.extend(der(0x30, &revoked));
        }
        let tbs = der(0x30, &tbs);
        let mut signer = boring::sign::Signer::new(MessageDigest::sha256(), &self.key).unwrap();
        let sig = signer.sign_oneshot_to_vec(&tbs).unwrap();
        let mut bits = vec![0];
        bits.extend(sig);
        let mut list = tbs;
        list.extend(alg);
        list.extend(der(0x03, &bits));
        der(0x30, &list)
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

pub(crate) fn describe(cert: &boring::x509::X509Ref) -> ClientCert {
    let digest = hash(MessageDigest::sha256(), &cert.issuer_name().to_der().unwrap()).unwrap();
    ClientCert {
        serial: cert.serial_number().to_bn().unwrap().to_vec(),
        issuer_digest: digest[..].try_into().unwrap(),
        subject_cn: cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .map(|e| e.data().as_utf8().unwrap().to_string()),
        dns_names: cert
            .subject_alt_names()
            .map(|names| names.iter().filter_map(|n| n.dnsname().map(str::to_string)).collect())
            .unwrap_or_default(),
        uris: vec![],
    }
}

fn pem(c: &X509) -> String {
    String::from_utf8(c.to_pem().unwrap()).unwrap()
}

#[test]
fn crls_parse_verify_and_list_serials() {
    let ca = Ca::new("Test CA");
    let other = Ca::new("Other CA");
    let lists = crl::parse(&ca.crl(&[5, 0x80, 7]), std::slice::from_ref(&ca.cert), 0, 10).unwrap();
    assert_eq!(lists.len(), 1);
    let expected: std::collections::HashSet<Vec<u8>> = [vec![5], vec![0x80], vec![7]].into();
    assert_eq!(lists[0].serials, expected);
    assert!(!lists[0].stale);
    assert!(lists[0].issuer.contains("Test CA"));
    // PEM, two blocks.
    let b64 = |d: &[u8]| boring::base64::encode_block(d);
    let two = format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        b64(&ca.crl(&[1])),
        b64(&other.crl(&[])),
    );
    let both = [ca.cert.clone(), other.cert.clone()];
    assert_eq!(crl::parse(two.as_bytes(), &both, 0, 10).unwrap().len(), 2);
    // Stale after its nextUpdate (2049).
    assert!(crl::parse(&ca.crl(&[]), std::slice::from_ref(&ca.cert), 2_600_000_000, 10).unwrap()[0].stale);
    // An issuer that is not a configured CA.
    assert!(matches!(
        crl::parse(&other.crl(&[1]), std::slice::from_ref(&ca.cert), 0, 10),
        Err(CrlError::UnknownIssuer(_))
    ));
    // Signed by another key under the CA's name.
    let forged = Ca { cert: ca.cert.clone(), key: other.key };
    assert!(matches!(
        crl::parse(&forged.crl(&[1]), std::slice::from_ref(&ca.cert), 0, 10),
        Err(CrlError::BadSignature(_))
    ));
    // Garbage, trailing bytes, and the bound on serials.
    assert!(matches!(crl::parse(b"nothing", &both, 0, 10), Err(CrlError::Parse)));
    let mut trailing = ca.crl(&[1]);
    trailing.push(0);
    assert!(matches!(crl::parse(&trailing, &both, 0, 10), Err(CrlError::Parse)));
    assert!(matches!(crl::parse(&ca.crl(&[1, 2, 3]), &both, 0, 2), Err(CrlError::TooMany)));
}

#[test]
fn certificates_map_and_revoke_and_crls_reload() {
    let dir = std::env::temp_dir().join(format!("mtls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new("Relay Clients CA");
    std::fs::write(dir.join("ca.pem"), pem(&ca.cert)).unwrap();
    std::fs::write(dir.join("crl.der"), ca.crl(&[3])).unwrap();
    let section = MtlsSection {
        mode: ClientAuthMode::Optional,
        ca_files: vec![dir.join("ca.pem")],
        crl_files: vec![dir.join("crl.der")],
        identities: vec![CertIdentityRule {
            name: "ingress".into(),
            field: CertField::SubjectCn,
            equals: None,
            suffix: Some(".example".into()),
        }],
    };
    let mut m = Mtls::load(&section, 0).unwrap().expect("on");
    assert_eq!(m.client_auth().mode, ClientAuthMode::Optional);
    assert!(m.client_auth().ca_pem.contains("BEGIN CERTIFICATE"));
    let good = describe(&ca.issue(2, "ingress.example", "ingress.example"));
    assert_eq!(m.check(&good).as_deref(), Ok("ingress"));
    let revoked = describe(&ca.issue(3, "ingress.example", "ingress.example"));
    assert_eq!(m.check(&revoked), Err(CertRefusal::Revoked));
    let stranger = describe(&ca.issue(4, "someone.else", "someone.else"));
    assert_eq!(m.check(&stranger), Err(CertRefusal::Unmapped));
    // Another CA's serial 3 is not this CA's.
    let other = describe(&Ca::new("Other").issue(3, "ingress.example", "x"));
    assert_eq!(m.check(&other).as_deref(), Ok("ingress"));
    let mut long = good.clone();
    long.serial.clear();
    assert_eq!(m.check(&long), Err(CertRefusal::SerialTooLong));
    // Reload: serial 2 revoked now; a bad file keeps the lists in force.
    std::fs::write(dir.join("crl.der"), ca.crl(&[2, 3])).unwrap();
    assert_eq!(m.reload_crls(0).unwrap(), CrlSummary { lists: 1, revoked: 2, stale: 0 });
    assert_eq!(m.check(&good), Err(CertRefusal::Revoked));
    std::fs::write(dir.join("crl.der"), b"garbage").unwrap();
    assert!(m.reload_crls(0).is_err());
    assert_eq!(m.summary().revoked, 2);
    // Off: nothing loaded; no CA: refused.
    assert!(Mtls::load(&MtlsSection::default(), 0).unwrap().is_none());
    let no_ca = MtlsSection { ca_files: vec![], ..section };
    assert!(Mtls::load(&no_ca, 0).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

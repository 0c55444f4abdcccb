//! Test support shared by the dataplane's integration tests (each test
//! file is its own crate and includes this module).

use boring::asn1::Asn1Time;
use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::PKey;
use boring::ssl::{SslContextBuilder, SslMethod};
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509, X509NameBuilder};

/// A TLS context with a fresh self-signed ECDSA P-256 certificate for
/// `name` (CN and DNS SAN), valid for a day.
pub fn self_signed_tls(name: &str) -> SslContextBuilder {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey");
    let mut subject = X509NameBuilder::new().expect("name");
    subject.append_entry_by_text("CN", name).expect("CN");
    let subject = subject.build();
    let mut b = X509::builder().expect("builder");
    b.set_version(2).expect("version");
    b.set_serial_number(&BigNum::from_u32(1).expect("bn").to_asn1_integer().expect("serial"))
        .expect("serial");
    b.set_subject_name(&subject).expect("subject");
    b.set_issuer_name(&subject).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("time")).expect("not before");
    b.set_not_after(&Asn1Time::days_from_now(1).expect("time")).expect("not after");
    let san = SubjectAlternativeName::new().dns(name).build(&b.x509v3_context(None, None)).expect("san");
    b.append_extension(&san).expect("extension");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    let cert = b.build();
    let mut ctx = SslContextBuilder::new(SslMethod::tls()).expect("ssl context");
    ctx.set_certificate(&cert).expect("certificate");
    ctx.set_private_key(&key).expect("private key");
    ctx
}

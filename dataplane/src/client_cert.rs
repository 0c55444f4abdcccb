//! Client certificates (mutual TLS, `[auth.mtls]`): the TLS context asks
//! for them and verifies them against the CA bundle control sent (chain and
//! validity period, by BoringSSL), and a verified certificate is described
//! to control in every ask of its connection ([`ClientCert`]), which maps it
//! to an identity and checks its revocation lists.
//!
//! A certificate that does not verify fails the handshake with the alert
//! BoringSSL picks for the verification error: `unknown_ca` (48) for an
//! issuer not in the bundle, `certificate_expired` (45) for a certificate
//! past its notAfter (or before its notBefore: `bad_certificate`, 42), and
//! with `mode = "required"`, no certificate at all: `certificate_required`
//! (116) in TLS 1.3, `handshake_failure` (40) in TLS 1.2.

use boring::hash::{MessageDigest, hash};
use boring::nid::Nid;
use boring::ssl::{SslContextBuilder, SslVerifyMode};
use boring::x509::{X509, X509Ref};
use relay_proto::channel::bootstrap::{ClientAuth, ClientAuthMode};
use relay_proto::channel::record::{
    ClientCert, MAX_CERT_CN, MAX_CERT_NAMES, MAX_CERT_SERIAL, valid_cert_name,
};

use crate::keyless::TlsContextError;

/// Sets the context up to ask for and verify client certificates as `auth`
/// says (nothing with mode `off`).
pub fn install(builder: &mut SslContextBuilder, auth: &ClientAuth) -> Result<(), TlsContextError> {
    let mode = match auth.mode {
        ClientAuthMode::Off => return Ok(()),
        ClientAuthMode::Optional => SslVerifyMode::PEER,
        ClientAuthMode::Required => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
    };
    let cas = X509::stack_from_pem(auth.ca_pem.as_bytes())?;
    if cas.is_empty() {
        return Err(TlsContextError::NoClientCa);
    }
    for ca in &cas {
        builder.cert_store_mut().add_cert(ca)?;
        // The CertificateRequest names the acceptable CAs (RFC 8446
        // section 4.2.4), so a client holding several picks the right one.
        builder.add_client_ca(ca)?;
    }
    builder.set_verify(mode);
    // Sessions resume only under the same client CA configuration: a
    // ticket sealed while another bundle was in force does not bring its
    // certificate back (at most 32 bytes: SSL_MAX_SID_CTX_LENGTH).
    let mut ctx_input = format!("{:?}\n", auth.mode).into_bytes();
    ctx_input.extend_from_slice(auth.ca_pem.as_bytes());
    let digest = hash(MessageDigest::sha256(), &ctx_input)?;
    builder.set_session_id_context(&digest)?;
    Ok(())
}

/// Describes a verified certificate (DER, the connection's leaf) for
/// control; `None` if it does not parse (it parsed during the handshake,
/// so this does not happen).
pub fn describe_der(der: &[u8]) -> Option<ClientCert> {
    X509::from_der(der).ok().map(|c| describe(&c))
}

/// Describes a verified certificate for control: its serial (empty when
/// longer than RFC 5280 allows), its issuer name's SHA-256, its last
/// common name and its first DNS and URI names, each within the record's
/// bounds (names out of bounds are left out).
pub fn describe(cert: &X509Ref) -> ClientCert {
    let serial = cert.serial_number().to_bn().map(|bn| bn.to_vec()).unwrap_or_default();
    let serial = if serial.len() > MAX_CERT_SERIAL { Vec::new() } else { serial };
    let issuer_digest = cert
        .issuer_name()
        .to_der()
        .ok()
        .and_then(|der| hash(MessageDigest::sha256(), &der).ok())
        .and_then(|d| <[u8; 32]>::try_from(&d[..]).ok())
        .unwrap_or([0; 32]);
    let subject_cn = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .last()
        .and_then(|e| e.data().as_utf8().ok())
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty() && s.len() <= MAX_CERT_CN && !s.chars().any(char::is_control));
    let mut dns_names = Vec::new();
    let mut uris = Vec::new();
    if let Some(names) = cert.subject_alt_names() {
        for name in &names {
            if let Some(dns) = name.dnsname().filter(|n| valid_cert_name(n)) {
                if dns_names.len() < MAX_CERT_NAMES {
                    dns_names.push(dns.to_string());
                }
            } else if let Some(uri) = name.uri().filter(|n| valid_cert_name(n))
                && uris.len() < MAX_CERT_NAMES
            {
                uris.push(uri.to_string());
            }
        }
    }
    ClientCert { serial, issuer_digest, subject_cn, dns_names, uris }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boring::asn1::Asn1Time;
    use boring::bn::BigNum;
    use boring::ec::{EcGroup, EcKey};
    use boring::pkey::PKey;
    use boring::ssl::SslMethod;
    use boring::x509::X509NameBuilder;
    use boring::x509::extension::SubjectAlternativeName;

    fn cert(serial: &[u8], cn: &str) -> X509 {
        let key = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&BigNum::from_slice(serial).unwrap().to_asn1_integer().unwrap()).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        let san = SubjectAlternativeName::new()
            .dns("ingress.example")
            .uri("spiffe://example/ingress")
            .dns("a.example")
            .build(&b.x509v3_context(None, None))
            .unwrap();
        b.append_extension(&san).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    #[test]
    fn a_certificate_is_described_within_bounds() {
        let c = cert(&[0x01, 0x02], "ingress.example");
        let d = describe_der(&c.to_der().unwrap()).unwrap();
        assert_eq!(d.serial, [1, 2]);
        assert_eq!(d.subject_cn.as_deref(), Some("ingress.example"));
        assert_eq!(d.dns_names, ["ingress.example", "a.example"]);
        assert_eq!(d.uris, ["spiffe://example/ingress"]);
        let issuer = hash(MessageDigest::sha256(), &c.issuer_name().to_der().unwrap()).unwrap();
        assert_eq!(d.issuer_digest[..], issuer[..]);
        assert_eq!(d.check(), Ok(()));
        // A serial longer than RFC 5280 allows is described as none.
        // (BoringSSL itself refuses CNs past 64 bytes when building names.)
        let long = cert(&[0x11; MAX_CERT_SERIAL + 1], &"c".repeat(MAX_CERT_CN));
        let d = describe(&long);
        assert!(d.serial.is_empty());
        assert_eq!(d.subject_cn.as_ref().map(String::len), Some(MAX_CERT_CN));
        assert_eq!(d.check(), Ok(()));
    }

    #[test]
    fn install_needs_a_ca_unless_off() {
        let mut b = SslContextBuilder::new(SslMethod::tls()).unwrap();
        assert!(install(&mut b, &ClientAuth::default()).is_ok());
        let bad = ClientAuth { mode: ClientAuthMode::Required, ca_pem: "nothing".into() };
        assert!(install(&mut b, &bad).is_err());
        let pem = String::from_utf8(cert(&[1], "ca").to_pem().unwrap()).unwrap();
        let good = ClientAuth { mode: ClientAuthMode::Required, ca_pem: pem };
        assert!(install(&mut b, &good).is_ok());
    }
}

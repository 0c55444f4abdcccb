//! The facts about a verified TLS client certificate that an [`AuthAsk`]
//! carries (mutual TLS): what control maps to an identity and checks
//! against its certificate revocation lists.
//!
//! The dataplane's TLS stack verified the chain against the configured CA
//! bundle (and its validity period) before these facts exist; control
//! trusts them no further than that: a compromised dataplane could claim
//! any certificate, as it could replay any token it saw.
//!
//! [`AuthAsk`]: super::AuthAsk
#![forbid(unsafe_code)]

use super::RecordError;
use super::wire::{Reader, Writer};

/// Longest certificate serial number carried, in bytes (RFC 5280 section
/// 4.1.2.2: conforming CAs use at most 20 octets).
pub const MAX_CERT_SERIAL: usize = 20;
/// Longest subject common name carried (X.520 `ub-common-name`).
pub const MAX_CERT_CN: usize = 64;
/// Most names of each kind (DNS, URI) carried from the subjectAltName.
pub const MAX_CERT_NAMES: usize = 4;
/// Longest subjectAltName entry carried.
pub const MAX_CERT_NAME_LEN: usize = 255;

/// A verified client certificate, as the dataplane describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The serial number's magnitude, big endian, without leading zero
    /// bytes; empty when the certificate's serial is longer than
    /// [`MAX_CERT_SERIAL`] (control then refuses it: it cannot be checked
    /// against a revocation list).
    pub serial: Vec<u8>,
    /// SHA-256 of the DER encoding of the certificate's issuer name (which
    /// CA's revocation list applies).
    pub issuer_digest: [u8; 32],
    /// The subject's (last) common name, when it is UTF-8 of at most
    /// [`MAX_CERT_CN`] bytes.
    pub subject_cn: Option<String>,
    /// The first [`MAX_CERT_NAMES`] dNSName entries of at most
    /// [`MAX_CERT_NAME_LEN`] printable ASCII bytes.
    pub dns_names: Vec<String>,
    /// The first [`MAX_CERT_NAMES`] uniformResourceIdentifier entries, with
    /// the same bounds.
    pub uris: Vec<String>,
}

/// Whether `name` may travel as a subjectAltName entry: 1..=255 bytes of
/// visible ASCII (what dNSName and URI entries are; anything else is left
/// out by the dataplane and refused by the decoder).
pub fn valid_cert_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CERT_NAME_LEN && name.bytes().all(|b| b.is_ascii_graphic())
}

fn valid_cn(cn: &str) -> bool {
    !cn.is_empty() && cn.len() <= MAX_CERT_CN && !cn.chars().any(char::is_control)
}

impl ClientCert {
    /// Checks every bound (the encoder and the decoder both do).
    pub fn check(&self) -> Result<(), RecordError> {
        if self.serial.len() > MAX_CERT_SERIAL || self.serial.first() == Some(&0) {
            return Err(RecordError::BadValue("cert serial"));
        }
        if self.subject_cn.as_deref().is_some_and(|cn| !valid_cn(cn)) {
            return Err(RecordError::BadValue("cert subject_cn"));
        }
        for (names, field) in [(&self.dns_names, "cert dns_names"), (&self.uris, "cert uris")] {
            if names.len() > MAX_CERT_NAMES || !names.iter().all(|n| valid_cert_name(n)) {
                return Err(RecordError::BadValue(field));
            }
        }
        Ok(())
    }

    pub(super) fn write(&self, w: &mut Writer<'_>) -> Result<(), RecordError> {
        self.check()?;
        w.blob(&self.serial, MAX_CERT_SERIAL, "cert serial")?;
        w.bytes(&self.issuer_digest)?;
        w.u8(u8::from(self.subject_cn.is_some()))?;
        w.str(self.subject_cn.as_deref().unwrap_or(""), MAX_CERT_CN, "cert subject_cn")?;
        for names in [&self.dns_names, &self.uris] {
            w.u8(names.len() as u8)?;
            for n in names {
                w.str(n, MAX_CERT_NAME_LEN, "cert name")?;
            }
        }
        Ok(())
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let serial = r.blob(MAX_CERT_SERIAL, "cert serial")?;
        let issuer_digest = r.array32()?;
        let has_cn = r.bool("cert subject_cn")?;
        let cn = r.str(MAX_CERT_CN, "cert subject_cn")?;
        if !has_cn && !cn.is_empty() {
            return Err(RecordError::BadValue("cert subject_cn"));
        }
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = usize::from(r.u8()?);
            if n > MAX_CERT_NAMES {
                return Err(RecordError::BadValue("cert names"));
            }
            for _ in 0..n {
                list.push(r.str(MAX_CERT_NAME_LEN, "cert name")?);
            }
        }
        let [dns_names, uris] = lists;
        let cert = Self { serial, issuer_digest, subject_cn: has_cn.then_some(cn), dns_names, uris };
        cert.check()?;
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> ClientCert {
        ClientCert {
            serial: vec![1, 2, 3],
            issuer_digest: [7; 32],
            subject_cn: Some("ingress.example".into()),
            dns_names: vec!["ingress.example".into(), "a.example".into()],
            uris: vec!["spiffe://example/ingress".into()],
        }
    }

    #[test]
    fn bounds_are_checked() {
        assert_eq!(cert().check(), Ok(()));
        let mut c = cert();
        c.serial = vec![0, 1];
        assert!(c.check().is_err(), "leading zero: two spellings of one serial");
        let mut c = cert();
        c.serial = vec![1; MAX_CERT_SERIAL + 1];
        assert!(c.check().is_err());
        let mut c = cert();
        c.subject_cn = Some("x".repeat(MAX_CERT_CN + 1));
        assert!(c.check().is_err());
        let mut c = cert();
        c.dns_names = vec!["a".into(); MAX_CERT_NAMES + 1];
        assert!(c.check().is_err());
        let mut c = cert();
        c.uris = vec!["has space".into()];
        assert!(c.check().is_err());
        let mut c = cert();
        c.subject_cn = Some(String::new());
        assert!(c.check().is_err());
    }
}

//! Keyless TLS, control's side: the private key lives here and nowhere else.
//!
//! The dataplane terminates TLS with only the certificate chain; when a
//! handshake needs the server's CertificateVerify signature, a worker sends a
//! `SignAsk` (the TLS SignatureScheme and the message to sign) and control
//! answers with the signature. This module loads the key and signs exactly
//! as BoringSSL's own `SSL_sign` would for each scheme (RFC 8446 section
//! 4.2.3): ECDSA with the scheme's curve and hash, RSASSA-PSS with salt
//! length equal to the hash length and MGF1 with the same hash, PKCS#1 v1.5
//! (TLS 1.2 clients only; QUIC never asks for it), and Ed25519.
#![forbid(unsafe_code)]

use std::path::Path;

use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{Id, PKey, PKeyRef, Private, Public};
use boring::rsa::Padding;
use boring::sign::{RsaPssSaltlen, Signer as BoringSigner};

/// TLS SignatureScheme code points (RFC 8446 section 4.2.3).
pub mod scheme {
    /// rsa_pkcs1_sha256.
    pub const RSA_PKCS1_SHA256: u16 = 0x0401;
    /// rsa_pkcs1_sha384.
    pub const RSA_PKCS1_SHA384: u16 = 0x0501;
    /// rsa_pkcs1_sha512.
    pub const RSA_PKCS1_SHA512: u16 = 0x0601;
    /// ecdsa_secp256r1_sha256.
    pub const ECDSA_SECP256R1_SHA256: u16 = 0x0403;
    /// ecdsa_secp384r1_sha384.
    pub const ECDSA_SECP384R1_SHA384: u16 = 0x0503;
    /// ecdsa_secp521r1_sha512.
    pub const ECDSA_SECP521R1_SHA512: u16 = 0x0603;
    /// rsa_pss_rsae_sha256.
    pub const RSA_PSS_RSAE_SHA256: u16 = 0x0804;
    /// rsa_pss_rsae_sha384.
    pub const RSA_PSS_RSAE_SHA384: u16 = 0x0805;
    /// rsa_pss_rsae_sha512.
    pub const RSA_PSS_RSAE_SHA512: u16 = 0x0806;
    /// ed25519.
    pub const ED25519: u16 = 0x0807;
}

/// Why a key could not be loaded or a signature made.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The key file could not be read.
    #[error("reading the private key {path}: {source}")]
    Read {
        /// The key file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key is not a PEM private key of a supported type.
    #[error("the private key {path} is not a PEM RSA, ECDSA (P-256/384/521) or Ed25519 key: {reason}")]
    BadKey {
        /// The key file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The scheme does not fit the key (or is unknown).
    #[error("signature scheme {0:#06x} does not fit the key")]
    Unsupported(u16),
    /// BoringSSL failed to sign.
    #[error("signing failed: {0}")]
    Crypto(#[from] boring::error::ErrorStack),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    Ec(Nid),
    Ed25519,
}

/// A loaded private key.
pub struct Signer {
    key: PKey<Private>,
    kind: KeyKind,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer").field("kind", &self.kind).finish()
    }
}

impl Signer {
    /// Loads a PEM private key (PKCS#8, or traditional RSA / EC).
    pub fn from_pem_file(path: &Path) -> Result<Self, SignerError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| SignerError::Read { path: shown.clone(), source })?;
        Self::from_pem(&pem).map_err(|reason| SignerError::BadKey { path: shown, reason })
    }

    /// Loads a PEM private key from memory.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let key = PKey::private_key_from_pem(pem).map_err(|e| e.to_string())?;
        let kind = match key.id() {
            Id::RSA => KeyKind::Rsa,
            Id::EC => {
                let ec = key.ec_key().map_err(|e| e.to_string())?;
                match ec.group().curve_name() {
                    Some(n @ (Nid::X9_62_PRIME256V1 | Nid::SECP384R1 | Nid::SECP521R1)) => KeyKind::Ec(n),
                    other => return Err(format!("unsupported curve {other:?}")),
                }
            }
            Id::ED25519 => KeyKind::Ed25519,
            other => return Err(format!("unsupported key type {other:?}")),
        };
        Ok(Self { key, kind })
    }

    /// Whether `public` is this key's public half (a certificate's key
    /// must be).
    pub fn matches(&self, public: &PKeyRef<Public>) -> bool {
        self.key.public_eq(public)
    }

    /// The schemes this key can sign, most preferred first.
    pub fn schemes(&self) -> &'static [u16] {
        use scheme::*;
        match self.kind {
            KeyKind::Rsa => &[
                RSA_PSS_RSAE_SHA256,
                RSA_PSS_RSAE_SHA384,
                RSA_PSS_RSAE_SHA512,
                RSA_PKCS1_SHA256,
                RSA_PKCS1_SHA384,
                RSA_PKCS1_SHA512,
            ],
            KeyKind::Ec(Nid::X9_62_PRIME256V1) => &[ECDSA_SECP256R1_SHA256],
            KeyKind::Ec(Nid::SECP384R1) => &[ECDSA_SECP384R1_SHA384],
            KeyKind::Ec(_) => &[ECDSA_SECP521R1_SHA512],
            KeyKind::Ed25519 => &[ED25519],
        }
    }

    /// Signs `input` with `scheme`.
    pub fn sign(&self, scheme: u16, input: &[u8]) -> Result<Vec<u8>, SignerError> {
        use scheme::*;
        if !self.schemes().contains(&scheme) {
            return Err(SignerError::Unsupported(scheme));
        }
        if self.kind == KeyKind::Ed25519 {
            let mut s = BoringSigner::new_without_digest(&self.key)?;
            return Ok(s.sign_oneshot_to_vec(input)?);
        }
        let digest = match scheme {
            RSA_PKCS1_SHA256 | ECDSA_SECP256R1_SHA256 | RSA_PSS_RSAE_SHA256 => MessageDigest::sha256(),
            RSA_PKCS1_SHA384 | ECDSA_SECP384R1_SHA384 | RSA_PSS_RSAE_SHA384 => MessageDigest::sha384(),
            RSA_PKCS1_SHA512 | ECDSA_SECP521R1_SHA512 | RSA_PSS_RSAE_SHA512 => MessageDigest::sha512(),
            other => return Err(SignerError::Unsupported(other)),
        };
        let mut s = BoringSigner::new(digest, &self.key)?;
        if matches!(scheme, RSA_PSS_RSAE_SHA256 | RSA_PSS_RSAE_SHA384 | RSA_PSS_RSAE_SHA512) {
            s.set_rsa_padding(Padding::PKCS1_PSS)?;
            s.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
            s.set_rsa_mgf1_md(digest)?;
        }
        s.update(input)?;
        Ok(s.sign_to_vec()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boring::ec::{EcGroup, EcKey};
    use boring::rsa::Rsa;
    use boring::sign::Verifier;

    fn ec_key(nid: Nid) -> PKey<Private> {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(nid).unwrap()).unwrap()).unwrap()
    }

    fn signer(key: &PKey<Private>) -> Signer {
        Signer::from_pem(&key.private_key_to_pem_pkcs8().unwrap()).unwrap()
    }

    fn verifies(key: &PKey<Private>, scheme: u16, input: &[u8], sig: &[u8]) -> bool {
        let public = PKey::public_key_from_pem(&key.public_key_to_pem().unwrap()).unwrap();
        let (digest, pss) = match scheme {
            scheme::ECDSA_SECP256R1_SHA256 | scheme::RSA_PKCS1_SHA256 => (MessageDigest::sha256(), false),
            scheme::ECDSA_SECP384R1_SHA384 => (MessageDigest::sha384(), false),
            scheme::RSA_PSS_RSAE_SHA256 => (MessageDigest::sha256(), true),
            scheme::RSA_PSS_RSAE_SHA512 => (MessageDigest::sha512(), true),
            _ => unreachable!(),
        };
        let mut v = Verifier::new(digest, &public).unwrap();
        if pss {
            v.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
            v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).unwrap();
            v.set_rsa_mgf1_md(digest).unwrap();
        }
        v.update(input).unwrap();
        v.verify(sig).unwrap()
    }

    #[test]
    fn ecdsa_signatures_verify_with_the_public_key() {
        let input = [0x20u8; 130];
        for (nid, scheme) in [
            (Nid::X9_62_PRIME256V1, scheme::ECDSA_SECP256R1_SHA256),
            (Nid::SECP384R1, scheme::ECDSA_SECP384R1_SHA384),
        ] {
            let key = ec_key(nid);
            let s = signer(&key);
            assert_eq!(s.schemes(), &[scheme]);
            let sig = s.sign(scheme, &input).unwrap();
            assert!(verifies(&key, scheme, &input, &sig));
            assert!(!verifies(&key, scheme, &[0x21u8; 130], &sig), "a signature over other bytes fails");
            assert!(matches!(
                s.sign(scheme::RSA_PSS_RSAE_SHA256, &input),
                Err(SignerError::Unsupported(0x0804))
            ));
        }
    }

    #[test]
    fn rsa_pss_and_pkcs1_signatures_verify() {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let s = signer(&key);
        let input = b"TLS 1.3, server CertificateVerify";
        for scheme in [scheme::RSA_PSS_RSAE_SHA256, scheme::RSA_PSS_RSAE_SHA512, scheme::RSA_PKCS1_SHA256] {
            let sig = s.sign(scheme, input).unwrap();
            assert_eq!(sig.len(), 256);
            assert!(verifies(&key, scheme, input, &sig), "scheme {scheme:#06x}");
        }
        assert!(s.sign(scheme::ECDSA_SECP256R1_SHA256, input).is_err());
        assert!(s.sign(0x9999, input).is_err());
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        assert!(Signer::from_pem(b"not a key").is_err());
        let err = Signer::from_pem_file(Path::new("/nonexistent/key.pem")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/key.pem"), "{err}");
        let key = ec_key(Nid::X9_62_PRIME256V1);
        let s = signer(&key);
        let public = PKey::public_key_from_pem(&key.public_key_to_pem().unwrap()).unwrap();
        assert!(s.matches(&public));
        let other = ec_key(Nid::X9_62_PRIME256V1);
        let other_public = PKey::public_key_from_pem(&other.public_key_to_pem().unwrap()).unwrap();
        assert!(!s.matches(&other_public), "another key's public half does not match");
        assert!(!format!("{s:?}").contains("BEGIN"), "Debug never shows key material");
    }
}

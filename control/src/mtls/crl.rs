//! Certificate revocation lists (RFC 5280 section 5) for client
//! certificates: parsed and signature-checked by BoringSSL against the CA
//! that issued them, kept as the set of revoked serial numbers of that
//! CA's issuer name.
//!
//! The `boring` crate does not wrap `X509_CRL`, so this module calls
//! `boring-sys` directly; every pointer it touches is owned by a
//! [`CrlHandle`] or borrowed from one for the duration of a call.

use std::collections::HashSet;
use std::ptr;

use boring::asn1::Asn1IntegerRef;
use boring::hash::{MessageDigest, hash};
use boring::x509::{X509, X509NameRef};
use boring_sys as ffi;
use foreign_types::ForeignTypeRef;

/// Largest CRL file read.
pub const MAX_CRL_FILE: usize = 16 * 1024 * 1024;
/// Most revoked serials kept over all lists.
pub const MAX_REVOKED: usize = 1_000_000;

/// Why a revocation list was refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    /// Not a DER or PEM (`X509 CRL`) revocation list.
    #[error("not a certificate revocation list (DER or PEM)")]
    Parse,
    /// No configured CA has the list's issuer name.
    #[error("issued by {0}, which is none of auth.mtls.ca_files")]
    UnknownIssuer(String),
    /// The signature does not verify with the issuer's key.
    #[error("signature does not verify with the key of {0}")]
    BadSignature(String),
    /// More serials than [`MAX_REVOKED`].
    #[error("more than {MAX_REVOKED} revoked certificates")]
    TooMany,
    /// BoringSSL failed otherwise.
    #[error(transparent)]
    Boring(#[from] boring::error::ErrorStack),
}

/// One CA's revoked certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// SHA-256 of the DER issuer name (what the dataplane sends).
    pub issuer_digest: [u8; 32],
    /// The issuer, one line, for operators.
    pub issuer: String,
    /// Revoked serial numbers (magnitude, big endian, no leading zeros).
    pub serials: HashSet<Vec<u8>>,
    /// The list's nextUpdate has passed (still used: an old list beats
    /// none; control logs it).
    pub stale: bool,
}

/// Owns a parsed `X509_CRL`.
struct CrlHandle(*mut ffi::X509_CRL);

impl Drop for CrlHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from d2i_X509_CRL, is not null, and is
        // freed exactly once, here.
        unsafe { ffi::X509_CRL_free(self.0) }
    }
}

impl CrlHandle {
    fn from_der(der: &[u8]) -> Result<Self, CrlError> {
        let len = std::ffi::c_long::try_from(der.len()).map_err(|_| CrlError::Parse)?;
        let mut p = der.as_ptr();
        // SAFETY: `p` points to `len` readable bytes that outlive the
        // call; d2i_X509_CRL reads at most that many, advances `p` within
        // them, and returns a new object (or null) that we own.
        let crl = unsafe { ffi::d2i_X509_CRL(ptr::null_mut(), &mut p, len) };
        if crl.is_null() {
            return Err(CrlError::Parse);
        }
        let handle = Self(crl);
        // SAFETY: d2i advanced `p` within the buffer it was given.
        let used = unsafe { p.offset_from(der.as_ptr()) };
        if usize::try_from(used).ok() != Some(der.len()) {
            return Err(CrlError::Parse);
        }
        Ok(handle)
    }

    fn issuer(&self) -> &X509NameRef {
        // SAFETY: the name is owned by the CRL, which `self` keeps alive for
        // the borrow's lifetime; it is never null for a parsed CRL.
        unsafe { X509NameRef::from_ptr(ffi::X509_CRL_get_issuer(self.0)) }
    }

    fn verify(&self, ca: &X509) -> Result<bool, CrlError> {
        let key = ca.public_key()?;
        // SAFETY: both objects are valid for the call and only read.
        Ok(unsafe { ffi::X509_CRL_verify(self.0, key.as_ptr()) } == 1)
    }

    fn stale(&self, now_unix: i64) -> bool {
        // SAFETY: the time is owned by the CRL (or null when absent).
        let next = unsafe { ffi::X509_CRL_get0_nextUpdate(self.0) };
        // SAFETY: `next` is a valid ASN1_TIME when not null.
        !next.is_null() && unsafe { ffi::X509_cmp_time_posix(next, now_unix) } < 0
    }

    fn serials(&self, limit: usize) -> Result<HashSet<Vec<u8>>, CrlError> {
        // SAFETY: the stack is owned by the CRL (null when none is listed).
        let stack = unsafe { ffi::X509_CRL_get_REVOKED(self.0) };
        let mut out = HashSet::new();
        if stack.is_null() {
            return Ok(out);
        }
        // SAFETY: a STACK_OF(X509_REVOKED) is an OPENSSL_STACK.
        let n = unsafe { ffi::OPENSSL_sk_num(stack.cast()) };
        if n > limit {
            return Err(CrlError::TooMany);
        }
        for i in 0..n {
            // SAFETY: i < n; the entry and its serial are owned by the CRL.
            let serial = unsafe {
                let revoked = ffi::OPENSSL_sk_value(stack.cast(), i) as *const ffi::X509_REVOKED;
                Asn1IntegerRef::from_ptr(ffi::X509_REVOKED_get0_serialNumber(revoked) as *mut _)
            };
            out.insert(serial.to_bn()?.to_vec());
        }
        Ok(out)
    }
}

/// The DER blocks of `bytes`: each `X509 CRL` PEM block, or the bytes
/// themselves when they are not PEM.
fn der_blocks(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CrlError> {
    const BEGIN: &str = "-----BEGIN X509 CRL-----";
    const END: &str = "-----END X509 CRL-----";
    let Ok(text) = std::str::from_utf8(bytes) else { return Ok(vec![bytes.to_vec()]) };
    if !text.contains(BEGIN) {
        return Ok(vec![bytes.to_vec()]);
    }
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let body = &rest[start + BEGIN.len()..];
        let end = body.find(END).ok_or(CrlError::Parse)?;
        let b64: String = body[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        out.push(boring::base64::decode_block(&b64).map_err(|_| CrlError::Parse)?);
        rest = &body[end + END.len()..];
    }
    Ok(out)
}

/// The one-line form of a name, for messages.
pub fn one_line(name: &X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().as_utf8().map(|s| s.to_string()).unwrap_or_default();
            format!("{key}={value}")
        })
        .collect();
    parts.join(", ")
}

/// Parses the revocation lists in `bytes` (DER, or one or more PEM
/// blocks), each verified with the key of the CA in `cas` whose subject is
/// its issuer; at most `limit` serials in all.
pub fn parse(bytes: &[u8], cas: &[X509], now_unix: i64, limit: usize) -> Result<Vec<Crl>, CrlError> {
    let mut out = Vec::new();
    let mut left = limit;
    for der in der_blocks(bytes)? {
        let crl = CrlHandle::from_der(&der)?;
        let issuer_der = crl.issuer().to_der()?;
        let issuer = one_line(crl.issuer());
        let ca = cas
            .iter()
            .find(|ca| ca.subject_name().to_der().is_ok_and(|d| d == issuer_der))
            .ok_or_else(|| CrlError::UnknownIssuer(issuer.clone()))?;
        if !crl.verify(ca)? {
            return Err(CrlError::BadSignature(issuer));
        }
        let serials = crl.serials(left)?;
        left -= serials.len();
        let digest = hash(MessageDigest::sha256(), &issuer_der)?;
        let mut issuer_digest = [0u8; 32];
        issuer_digest.copy_from_slice(&digest);
        out.push(Crl { issuer_digest, issuer, serials, stale: crl.stale(now_unix) });
    }
    Ok(out)
}

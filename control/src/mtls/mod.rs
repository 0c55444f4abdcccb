//! Mutual TLS (`[auth.mtls]`): client certificates as credentials.
//!
//! The dataplane's TLS stack verifies a client certificate's chain against
//! the CA bundle control sends it ([`Mtls::client_auth`]) and its validity
//! period; what reaches control is the verified certificate's description
//! ([`ClientCert`]) in each ask. Control maps it to an identity by the
//! configured rules ([`rules`]) and refuses it when a revocation list of its
//! issuer names its serial ([`crl`]), or when its identity is revoked like
//! a token subject.
//!
//! Trust: control believes the description only as far as "the dataplane's
//! TLS stack verified a certificate saying this". A compromised dataplane
//! could claim any certificate, as it could replay any token it saw.

pub mod crl;
pub mod rules;

use std::path::{Path, PathBuf};

use boring::x509::X509;
use relay_proto::channel::bootstrap::{ClientAuth, ClientAuthMode, MAX_CLIENT_CA_PEM};
use relay_proto::channel::record::ClientCert;

use crate::config::{CertIdentityRule, MtlsSection};
use crl::{Crl, CrlError, MAX_CRL_FILE, MAX_REVOKED};

/// Why `[auth.mtls]` could not be loaded (at start or reload).
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is larger than allowed.
    #[error("{0} is too large")]
    TooLarge(PathBuf),
    /// The CA files hold no certificate, or do not parse.
    #[error("auth.mtls.ca_files: {0}")]
    Ca(String),
    /// A revocation list was refused.
    #[error("{path}: {source}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// Why.
        source: CrlError,
    },
}

/// Why a client certificate was refused (all answered 407).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRefusal {
    /// A revocation list of its issuer names its serial.
    Revoked,
    /// Its identity is revoked (`relayctl token revoke --subject`).
    IdentityRevoked,
    /// No `[[auth.mtls.identities]]` rule maps it.
    Unmapped,
    /// Its serial is longer than RFC 5280 allows: it cannot be checked
    /// against a revocation list.
    SerialTooLong,
    /// `mode = "required"` and the request came without one: over the
    /// cleartext listener (no TLS at all), or on a connection from before
    /// a control restart changed the mode (TLS handshakes without one
    /// fail already).
    Required,
}

impl CertRefusal {
    /// A short, stable reason for logs and counters.
    pub fn reason(&self) -> &'static str {
        match self {
            CertRefusal::Revoked => "cert_revoked",
            CertRefusal::IdentityRevoked => "cert_identity_revoked",
            CertRefusal::Unmapped => "cert_unmapped",
            CertRefusal::SerialTooLong => "cert_serial_too_long",
            CertRefusal::Required => "cert_required",
        }
    }

    /// What the client is told (Proxy-Status details): the holder of a
    /// certificate learns nothing secret from why it was refused.
    pub fn client_details(&self) -> &'static str {
        match self {
            CertRefusal::Revoked | CertRefusal::IdentityRevoked => "client certificate revoked",
            CertRefusal::Unmapped => "client certificate not authorized",
            CertRefusal::SerialTooLong => "client certificate serial too long",
            CertRefusal::Required => "client certificate required",
        }
    }
}

/// What `relayctl reload` reports about the revocation lists.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CrlSummary {
    /// Lists in force.
    pub lists: usize,
    /// Revoked serials over all lists.
    pub revoked: usize,
    /// Lists whose nextUpdate has passed.
    pub stale: usize,
}

/// The loaded `[auth.mtls]` configuration.
#[derive(Debug, Clone)]
pub struct Mtls {
    mode: ClientAuthMode,
    ca_pem: String,
    cas: Vec<X509>,
    crl_files: Vec<PathBuf>,
    crls: Vec<Crl>,
    rules: Vec<CertIdentityRule>,
}

fn read_bounded(path: &Path, limit: usize) -> Result<Vec<u8>, MtlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| MtlsError::Read { path: path.into(), source })?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| MtlsError::Read { path: path.into(), source })?;
    if bytes.len() > limit {
        return Err(MtlsError::TooLarge(path.into()));
    }
    Ok(bytes)
}

impl Mtls {
    /// Reads the CA and revocation list files of `section`; `None` with
    /// mode `off`.
    pub fn load(section: &MtlsSection, now_unix: i64) -> Result<Option<Self>, MtlsError> {
        if section.mode == ClientAuthMode::Off {
            return Ok(None);
        }
        let mut ca_pem = String::new();
        for path in &section.ca_files {
            let bytes = read_bounded(path, MAX_CLIENT_CA_PEM)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| MtlsError::Ca(format!("{} is not PEM", path.display())))?;
            ca_pem.push_str(text.trim_end());
            ca_pem.push('\n');
        }
        if ca_pem.len() > MAX_CLIENT_CA_PEM {
            return Err(MtlsError::Ca(format!("more than {MAX_CLIENT_CA_PEM} bytes of PEM")));
        }
        let cas = X509::stack_from_pem(ca_pem.as_bytes()).map_err(|e| MtlsError::Ca(e.to_string()))?;
        if cas.is_empty() {
            return Err(MtlsError::Ca("no certificate".into()));
        }
        let mut mtls = Self {
            mode: section.mode,
            ca_pem,
            cas,
            crl_files: section.crl_files.clone(),
            crls: Vec::new(),
            rules: section.identities.clone(),
        };
        mtls.crls = mtls.read_crls(now_unix)?;
        Ok(Some(mtls))
    }

    fn read_crls(&self, now_unix: i64) -> Result<Vec<Crl>, MtlsError> {
        let mut out = Vec::new();
        for path in &self.crl_files {
            let bytes = read_bounded(path, MAX_CRL_FILE)?;
            let left = MAX_REVOKED.saturating_sub(out.iter().map(|c: &Crl| c.serials.len()).sum());
            let lists = crl::parse(&bytes, &self.cas, now_unix, left)
                .map_err(|source| MtlsError::Crl { path: path.clone(), source })?;
            out.extend(lists);
        }
        Ok(out)
    }

    /// Re-reads the revocation lists (`relayctl reload`, SIGHUP); on an
    /// error the lists in force stay.
    pub fn reload_crls(&mut self, now_unix: i64) -> Result<CrlSummary, MtlsError> {
        self.crls = self.read_crls(now_unix)?;
        Ok(self.summary())
    }

    /// The lists in force.
    pub fn summary(&self) -> CrlSummary {
        CrlSummary {
            lists: self.crls.len(),
            revoked: self.crls.iter().map(|c| c.serials.len()).sum(),
            stale: self.crls.iter().filter(|c| c.stale).count(),
        }
    }

    /// What the dataplane's TLS contexts need: the mode and the CAs.
    pub fn client_auth(&self) -> ClientAuth {
        ClientAuth { mode: self.mode, ca_pem: self.ca_pem.clone() }
    }

    /// The mode in force (`optional` or `required`).
    pub fn mode(&self) -> ClientAuthMode {
        self.mode
    }

    /// The CAs' subjects, one line each (`relayctl policy show`).
    pub fn ca_subjects(&self) -> Vec<String> {
        self.cas.iter().map(|c| crl::one_line(c.subject_name())).collect()
    }

    /// The identity names the rules give, in rule order.
    pub fn identities(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }

    /// Whether a connection without a certificate is refused.
    pub fn required(&self) -> bool {
        self.mode == ClientAuthMode::Required
    }

    /// The identity name of a verified certificate, unless it is revoked
    /// by a list of its issuer or no rule maps it (the caller checks
    /// revoked identities).
    pub fn check(&self, cert: &ClientCert) -> Result<String, CertRefusal> {
        if cert.serial.is_empty() {
            return Err(CertRefusal::SerialTooLong);
        }
        let revoked = self
            .crls
            .iter()
            .any(|c| c.issuer_digest == cert.issuer_digest && c.serials.contains(&cert.serial));
        if revoked {
            return Err(CertRefusal::Revoked);
        }
        rules::map(&self.rules, cert).map(str::to_string).ok_or(CertRefusal::Unmapped)
    }
}

#[cfg(test)]
pub(crate) mod tests;

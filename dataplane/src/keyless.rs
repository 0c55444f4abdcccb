//! Keyless TLS, the dataplane's side: handshakes run here with only the
//! certificate chain; the CertificateVerify signature is asked of control,
//! which alone holds the private key.
//!
//! BoringSSL calls [`KeylessMethod::sign`] in the middle of a handshake
//! (inside quiche's `recv` or `send`). The method records a [`SignRequest`]
//! in the worker thread's pending list and answers "retry": BoringSSL
//! returns `SSL_ERROR_WANT_PRIVATE_KEY_OPERATION`, which quiche treats as
//! "not done yet". The worker takes the requests after the quiche call,
//! sends them to control, and when the answer arrives it stores the result
//! with [`deliver`] and lets the connection send again: quiche's `send`
//! resumes the handshake, BoringSSL calls [`KeylessMethod::complete`], which
//! hands over the signature (or fails the handshake cleanly with an alert).
//!
//! Every worker thread owns its connections and its quiche configuration,
//! so the pending requests and results live in thread-local storage; a
//! request's ID is stored on the TLS connection (SSL ex data) so `complete`
//! finds its result.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use boring::error::ErrorStack;
use boring::ex_data::Index;
use boring::ssl::{
    PrivateKeyMethod, PrivateKeyMethodError, Ssl, SslContextBuilder, SslMethod, SslRef, SslSignatureAlgorithm,
};
use boring::x509::X509;
use relay_proto::channel::bootstrap::TlsMaterial;

use crate::tickets::{self, TicketKeyring};

/// TLS SignatureScheme code points BoringSSL may ask for (RFC 8446
/// section 4.2.3).
const SCHEMES: &[u16] = &[0x0401, 0x0501, 0x0601, 0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0807];

/// Most signing requests a worker keeps waiting for control at once (one
/// per handshake in progress); beyond it handshakes fail at once.
pub const MAX_PENDING: usize = 65_536;

/// A signature to ask control for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// ID echoed by control.
    pub sign_id: u64,
    /// The TLS material generation whose key must sign.
    pub generation: u32,
    /// TLS SignatureScheme.
    pub algorithm: u16,
    /// The message to sign.
    pub input: Vec<u8>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Made by `sign`, not yet taken by the worker.
    requests: Vec<SignRequest>,
    /// Requests sent and not yet completed.
    outstanding: usize,
    /// Results waiting for `complete`: a signature, or `None` for failure.
    results: HashMap<u64, Option<Vec<u8>>>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn sign_id_index() -> Index<Ssl, u64> {
    static INDEX: OnceLock<Index<Ssl, u64>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("BoringSSL ex data index"))
}

/// The private key method that forwards signing to control, for the
/// certificate of one TLS material generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeylessMethod {
    /// The generation whose key signs (control keeps the previous one
    /// while handshakes that started with it finish).
    pub generation: u32,
}

impl PrivateKeyMethod for KeylessMethod {
    fn sign(
        &self,
        ssl: &mut SslRef,
        input: &[u8],
        signature_algorithm: SslSignatureAlgorithm,
        _output: &mut [u8],
    ) -> Result<usize, PrivateKeyMethodError> {
        let Some(algorithm) =
            SCHEMES.iter().copied().find(|code| SslSignatureAlgorithm::from(*code) == signature_algorithm)
        else {
            return Err(PrivateKeyMethodError::FAILURE);
        };
        let sign_id = STATE.with(|s| {
            let mut s = s.borrow_mut();
            if s.outstanding + s.requests.len() >= MAX_PENDING {
                return None;
            }
            s.next_id += 1;
            let sign_id = s.next_id;
            s.requests.push(SignRequest {
                sign_id,
                generation: self.generation,
                algorithm,
                input: input.to_vec(),
            });
            Some(sign_id)
        });
        let Some(sign_id) = sign_id else { return Err(PrivateKeyMethodError::FAILURE) };
        ssl.replace_ex_data(sign_id_index(), sign_id);
        Err(PrivateKeyMethodError::RETRY)
    }

    fn decrypt(
        &self,
        _ssl: &mut SslRef,
        _input: &[u8],
        _output: &mut [u8],
    ) -> Result<usize, PrivateKeyMethodError> {
        // RSA key exchange does not exist in TLS 1.3 (QUIC's only version).
        Err(PrivateKeyMethodError::FAILURE)
    }

    fn complete(&self, ssl: &mut SslRef, output: &mut [u8]) -> Result<usize, PrivateKeyMethodError> {
        let Some(&sign_id) = ssl.ex_data(sign_id_index()) else {
            return Err(PrivateKeyMethodError::FAILURE);
        };
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            match s.results.remove(&sign_id) {
                None => Err(PrivateKeyMethodError::RETRY),
                Some(None) => Err(PrivateKeyMethodError::FAILURE),
                Some(Some(signature)) if signature.len() <= output.len() => {
                    output[..signature.len()].copy_from_slice(&signature);
                    Ok(signature.len())
                }
                Some(Some(_)) => Err(PrivateKeyMethodError::FAILURE),
            }
        })
    }
}

/// Takes the requests made since the last call (by handshakes on this
/// thread); they count as outstanding until [`deliver`] or [`forget`].
pub fn take_requests() -> Vec<SignRequest> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let taken = std::mem::take(&mut s.requests);
        s.outstanding += taken.len();
        taken
    })
}

/// Stores the outcome of request `sign_id` for `complete` to pick up:
/// `Some(signature)`, or `None` to fail the handshake.
pub fn deliver(sign_id: u64, signature: Option<Vec<u8>>) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.outstanding = s.outstanding.saturating_sub(1);
        s.results.insert(sign_id, signature);
    })
}

/// Drops whatever is kept for `sign_id` (its connection is gone).
pub fn forget(sign_id: u64) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.results.remove(&sign_id).is_none() {
            s.outstanding = s.outstanding.saturating_sub(1);
        }
    })
}

/// Why the TLS context could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsContextError {
    /// The chain holds no certificate.
    #[error("the certificate chain from control holds no certificate")]
    NoCertificate,
    /// BoringSSL refused the chain.
    #[error("the certificate chain from control is invalid: {0}")]
    Invalid(#[from] ErrorStack),
    /// Client certificates are asked for, but the CA bundle holds none.
    #[error("the client CA bundle from control holds no certificate")]
    NoClientCa,
}

/// A TLS context for `material`: it presents the certificate chain (leaf
/// first) and signs through control, or with the local key when the
/// operator turned keyless TLS off; session tickets are sealed with the
/// keys in `tickets` when control sent any, otherwise none are issued.
pub fn ssl_context(
    material: &TlsMaterial,
    tickets: &Arc<TicketKeyring>,
) -> Result<SslContextBuilder, TlsContextError> {
    let chain = X509::stack_from_pem(material.cert_chain_pem.as_bytes())?;
    let (leaf, intermediates) = chain.split_first().ok_or(TlsContextError::NoCertificate)?;
    let mut builder = SslContextBuilder::new(SslMethod::tls())?;
    builder.set_certificate(leaf)?;
    for cert in intermediates {
        builder.add_extra_chain_cert(cert.clone())?;
    }
    match &material.private_key_pem {
        None => builder.set_private_key_method(KeylessMethod { generation: material.generation }),
        Some(pem) => {
            let key = boring::pkey::PKey::private_key_from_pem(pem.as_bytes())?;
            builder.set_private_key(&key)?;
            builder.check_private_key()?;
        }
    }
    if material.ticket_keys.is_empty() {
        builder.set_options(boring::ssl::SslOptions::NO_TICKET);
    } else {
        tickets::install(&mut builder, tickets.clone(), material.ticket_lifetime_secs);
    }
    crate::client_cert::install(&mut builder, &material.client_auth)?;
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_taken_once_and_results_delivered_once() {
        // Runs on its own test thread: the state is thread-local.
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.next_id += 1;
            let id = s.next_id;
            s.requests.push(SignRequest { sign_id: id, generation: 1, algorithm: 0x0403, input: vec![1, 2] });
        });
        let taken = take_requests();
        assert_eq!(taken.len(), 1);
        assert!(take_requests().is_empty());
        let id = taken[0].sign_id;
        deliver(id, Some(vec![9; 64]));
        STATE.with(|s| {
            let s = s.borrow();
            assert_eq!(s.outstanding, 0);
            assert_eq!(s.results.get(&id), Some(&Some(vec![9; 64])));
        });
        forget(id);
        STATE.with(|s| assert!(s.borrow().results.is_empty()));
    }

    #[test]
    fn every_scheme_maps_back_to_its_code() {
        for code in SCHEMES {
            let alg = SslSignatureAlgorithm::from(*code);
            assert_eq!(SCHEMES.iter().find(|c| SslSignatureAlgorithm::from(**c) == alg), Some(code));
        }
    }

    fn material(chain: &str) -> TlsMaterial {
        TlsMaterial {
            generation: 1,
            cert_chain_pem: chain.into(),
            private_key_pem: None,
            ticket_keys: Vec::new(),
            ticket_lifetime_secs: 0,
            client_auth: Default::default(),
        }
    }

    #[test]
    fn a_chain_without_certificates_is_refused() {
        let ring = Arc::new(TicketKeyring::default());
        assert!(matches!(
            ssl_context(&material(""), &ring),
            Err(TlsContextError::NoCertificate) | Err(TlsContextError::Invalid(_))
        ));
        let garbage = material("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        assert!(ssl_context(&garbage, &ring).is_err());
    }
}

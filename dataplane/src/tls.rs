//! The TLS material every worker serves with, replaceable while the relay
//! runs: control sends a new certificate chain on `relayctl reload` (or
//! SIGHUP) and new session ticket keys when it rotates them.
//!
//! The control-watch thread checks each update once (the chain must build
//! a TLS context) and publishes it; each worker notices the new epoch at
//! its next turn and builds a fresh quiche configuration from it, which new
//! connections use. Connections already open keep the TLS context they
//! started with (quiche holds a reference to it), so reloads never break
//! them; handshakes in progress still sign with their own generation's key,
//! which control keeps until they are done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use relay_proto::channel::bootstrap::{BootstrapError, TlsMaterial};

use crate::keyless::{self, TlsContextError};
use crate::tickets::TicketKeyring;

/// Why an update was not applied (the material in force stays).
#[derive(Debug, thiserror::Error)]
pub enum TlsUpdateError {
    /// A field is out of range.
    #[error("invalid TLS material: {0}")]
    Invalid(#[from] BootstrapError),
    /// The update is older than the material in force.
    #[error("stale TLS material: generation {got}, serving {serving}")]
    Stale {
        /// The update's generation.
        got: u32,
        /// The generation in force.
        serving: u32,
    },
    /// Same generation, different certificate: control must bump it.
    #[error("generation {0} arrived with a different certificate chain")]
    ChainChanged(u32),
    /// The chain does not build a TLS context.
    #[error(transparent)]
    Context(#[from] TlsContextError),
}

/// What an applied update changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsChange {
    /// A new certificate (and with it, a new generation).
    Certificate,
    /// Only the session ticket keys.
    TicketKeys,
}

/// The material in force, shared by the workers.
#[derive(Debug)]
pub struct TlsShared {
    /// Bumped on every certificate change (also when a restarted control
    /// starts its generations over).
    epoch: AtomicU64,
    material: Mutex<Arc<TlsMaterial>>,
    tickets: Arc<TicketKeyring>,
}

impl TlsShared {
    /// Starts with the material control sent at attach time.
    pub fn new(material: TlsMaterial) -> Result<Self, TlsUpdateError> {
        material.validate()?;
        let tickets = Arc::new(TicketKeyring::new(material.ticket_keys.clone()));
        keyless::ssl_context(&material, &tickets)?;
        Ok(Self { epoch: AtomicU64::new(1), material: Mutex::new(Arc::new(material)), tickets })
    }

    /// Changes whenever the certificate does; workers compare it each turn.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The material in force.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.material.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The session ticket keys every worker's TLS context uses.
    pub fn tickets(&self) -> &Arc<TicketKeyring> {
        &self.tickets
    }

    /// Applies an update from the control the dataplane is attached to:
    /// a newer generation replaces the certificate; the same generation
    /// only replaces the ticket keys.
    pub fn update(&self, material: TlsMaterial) -> Result<TlsChange, TlsUpdateError> {
        material.validate()?;
        let serving = self.current();
        if material.generation < serving.generation {
            return Err(TlsUpdateError::Stale { got: material.generation, serving: serving.generation });
        }
        if material.generation == serving.generation {
            if material.cert_chain_pem != serving.cert_chain_pem
                || material.private_key_pem != serving.private_key_pem
            {
                return Err(TlsUpdateError::ChainChanged(material.generation));
            }
            self.tickets.replace(material.ticket_keys.clone());
            *self.material.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
            return Ok(TlsChange::TicketKeys);
        }
        self.replace(material)?;
        Ok(TlsChange::Certificate)
    }

    /// Installs the material of a control that (re-)attached: its
    /// generations start over, so any material replaces ours.
    pub fn replace(&self, material: TlsMaterial) -> Result<(), TlsUpdateError> {
        material.validate()?;
        keyless::ssl_context(&material, &self.tickets)?;
        self.tickets.replace(material.ticket_keys.clone());
        *self.material.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boring::asn1::Asn1Time;
    use boring::ec::{EcGroup, EcKey};
    use boring::hash::MessageDigest;
    use boring::nid::Nid;
    use boring::pkey::PKey;
    use boring::x509::{X509, X509NameBuilder};
    use relay_proto::channel::bootstrap::TicketKey;

    fn self_signed(cn: &str) -> String {
        let key = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        String::from_utf8(b.build().to_pem().unwrap()).unwrap()
    }

    fn material(generation: u32, chain: &str, tickets: u8) -> TlsMaterial {
        TlsMaterial {
            generation,
            cert_chain_pem: chain.into(),
            private_key_pem: None,
            ticket_keys: (1..=tickets)
                .map(|n| TicketKey { name: [n; 16], aes_key: [n; 32], hmac_key: [n; 32] })
                .collect(),
            ticket_lifetime_secs: 3600,
            client_auth: Default::default(),
        }
    }

    #[test]
    fn newer_certificates_bump_the_epoch_and_ticket_rotations_do_not() {
        let a = self_signed("a");
        let b = self_signed("b");
        let shared = TlsShared::new(material(1, &a, 1)).unwrap();
        let epoch = shared.epoch();
        assert_eq!(shared.update(material(1, &a, 2)).unwrap(), TlsChange::TicketKeys);
        assert_eq!(shared.epoch(), epoch, "ticket rotation needs no new configuration");
        assert!(
            matches!(shared.tickets().opening_key(&[2; 16]), crate::tickets::KeyChoice::Use { .. }),
            "the rotated keys are in force"
        );
        assert_eq!(shared.update(material(2, &b, 2)).unwrap(), TlsChange::Certificate);
        assert_eq!(shared.epoch(), epoch + 1);
        assert_eq!(shared.current().cert_chain_pem, b);
    }

    #[test]
    fn bad_updates_change_nothing() {
        let a = self_signed("a");
        let shared = TlsShared::new(material(2, &a, 1)).unwrap();
        let epoch = shared.epoch();
        assert!(matches!(
            shared.update(material(1, &a, 1)),
            Err(TlsUpdateError::Stale { got: 1, serving: 2 })
        ));
        assert!(matches!(
            shared.update(material(2, &self_signed("b"), 1)),
            Err(TlsUpdateError::ChainChanged(2))
        ));
        assert!(matches!(shared.update(material(3, "garbage", 1)), Err(TlsUpdateError::Context(_))));
        assert!(matches!(shared.update(material(0, &a, 1)), Err(TlsUpdateError::Invalid(_))));
        assert_eq!(shared.epoch(), epoch);
        assert_eq!(shared.current().generation, 2);
        // A re-attached control starts over at generation 1.
        shared.replace(material(1, &a, 1)).unwrap();
        assert_eq!(shared.epoch(), epoch + 1);
        assert_eq!(shared.current().generation, 1);
    }
}

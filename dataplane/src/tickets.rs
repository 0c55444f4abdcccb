//! Session tickets sealed with keys control generates and rotates.
//!
//! TLS 1.3 resumption (RFC 8446 section 2.2) lets a returning client skip
//! the certificate and its signature: the server hands out an opaque
//! ticket after the handshake and accepts it later. The ticket is sealed
//! with a key the server keeps; for every worker (and a restarted
//! dataplane) to accept the tickets any worker issued, the keys come from
//! control, which rotates them (`tls.ticket_key_rotation_secs`) and keeps
//! the previous ones for a while so tickets issued just before a rotation
//! still resume.
//!
//! BoringSSL's ticket key callback (`SSL_CTX_set_tlsext_ticket_key_cb`)
//! sets up AES-256-CBC and HMAC-SHA256 with the key named in the ticket:
//! the newest key seals, any key in the ring opens; a ticket opened with an
//! older key is renewed (the client gets a fresh one sealed with the newest
//! key). An unknown name means a full handshake, never a failure.

use std::sync::{Arc, RwLock};

use boring::hash::MessageDigest;
use boring::ssl::{SslContextBuilder, TicketKeyCallbackResult};
use boring::symm::Cipher;
use relay_proto::channel::bootstrap::TicketKey;

/// The ticket keys in force, shared by every worker's TLS context; control's
/// updates replace them in place.
#[derive(Debug, Default)]
pub struct TicketKeyring {
    keys: RwLock<Vec<TicketKey>>,
}

/// What sealing or opening a ticket needs from the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChoice {
    /// Seal or open with this key; `renew` asks BoringSSL to issue a
    /// fresh ticket under the newest key.
    Use {
        /// The key.
        key: TicketKey,
        /// Whether the ticket was sealed with a key that is no longer the
        /// newest.
        renew: bool,
    },
    /// No such key (expired, or never ours): full handshake.
    Unknown,
}

impl TicketKeyring {
    /// A ring holding `keys` (newest first).
    pub fn new(keys: Vec<TicketKey>) -> Self {
        Self { keys: RwLock::new(keys) }
    }

    /// Replaces the keys (newest first).
    pub fn replace(&self, keys: Vec<TicketKey>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Whether the ring has a key to seal tickets with.
    pub fn is_empty(&self) -> bool {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// The key to seal a new ticket with.
    pub fn sealing_key(&self) -> Option<TicketKey> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).first().cloned()
    }

    /// The key a ticket named `name` was sealed with.
    pub fn opening_key(&self, name: &[u8; 16]) -> KeyChoice {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        match keys.iter().position(|k| &k.name == name) {
            Some(i) => KeyChoice::Use { key: keys[i].clone(), renew: i > 0 },
            None => KeyChoice::Unknown,
        }
    }
}

/// Makes the TLS context seal and open session tickets with `ring`'s keys,
/// and tells clients tickets live `lifetime_secs`.
pub fn install(builder: &mut SslContextBuilder, ring: Arc<TicketKeyring>, lifetime_secs: u32) {
    if lifetime_secs > 0 {
        // The lifetime hint clients get (RFC 8446 section 4.6.1: at most
        // seven days); BoringSSL also refuses tickets older than this.
        let lifetime = lifetime_secs.min(7 * 86_400);
        // SAFETY: the context pointer is valid for the builder's life; the
        // call only stores a number in it.
        unsafe { boring_sys::SSL_CTX_set_session_psk_dhe_timeout(builder.as_ptr(), lifetime) };
    }
    let callback = move |_ssl: &boring::ssl::SslRef,
                         name: &mut [u8; 16],
                         iv: &mut [u8; 16],
                         cipher: &mut boring::symm::CipherCtxRef,
                         hmac: &mut boring::hmac::HmacCtxRef,
                         encrypt: bool| {
        let (key, result) = if encrypt {
            let Some(key) = ring.sealing_key() else {
                // No keys: issue no ticket (BoringSSL writes nothing).
                return TicketKeyCallbackResult::Noop;
            };
            if boring::rand::rand_bytes(iv).is_err() {
                return TicketKeyCallbackResult::Error;
            }
            *name = key.name;
            (key, TicketKeyCallbackResult::Success)
        } else {
            match ring.opening_key(name) {
                KeyChoice::Use { key, renew: false } => (key, TicketKeyCallbackResult::Success),
                KeyChoice::Use { key, renew: true } => (key, TicketKeyCallbackResult::DecryptSuccessRenew),
                KeyChoice::Unknown => return TicketKeyCallbackResult::Noop,
            }
        };
        let cipher_ready = if encrypt {
            cipher.init_encrypt(&Cipher::aes_256_cbc(), &key.aes_key, iv)
        } else {
            cipher.init_decrypt(&Cipher::aes_256_cbc(), &key.aes_key, iv)
        };
        if cipher_ready.is_err() || hmac.init(&key.hmac_key, &MessageDigest::sha256()).is_err() {
            return TicketKeyCallbackResult::Error;
        }
        result
    };
    // SAFETY: the callback fills exactly what SSL_CTX_set_tlsext_ticket_key_cb
    // requires: in sealing mode the 16-byte key name and a random 16-byte
    // IV (AES-CBC's IV length), and in both modes it initialises the
    // cipher context with AES-256-CBC and a 32-byte key and the HMAC
    // context with SHA-256, or returns Error/Noop before touching them.
    unsafe { builder.set_ticket_key_callback(callback) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> TicketKey {
        TicketKey { name: [n; 16], aes_key: [n; 32], hmac_key: [n.wrapping_add(1); 32] }
    }

    #[test]
    fn newest_seals_any_opens_and_old_ones_renew() {
        let ring = TicketKeyring::new(vec![key(2), key(1)]);
        assert_eq!(ring.sealing_key(), Some(key(2)));
        assert_eq!(ring.opening_key(&[2; 16]), KeyChoice::Use { key: key(2), renew: false });
        assert_eq!(ring.opening_key(&[1; 16]), KeyChoice::Use { key: key(1), renew: true });
        assert_eq!(ring.opening_key(&[9; 16]), KeyChoice::Unknown);
        ring.replace(vec![key(3), key(2)]);
        assert_eq!(ring.opening_key(&[1; 16]), KeyChoice::Unknown, "a retired key opens nothing");
        assert_eq!(ring.sealing_key(), Some(key(3)));
        ring.replace(Vec::new());
        assert!(ring.is_empty());
        assert_eq!(ring.sealing_key(), None);
    }
}

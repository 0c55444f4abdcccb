//! What the fleet keeps in the store, and how it is encoded, parsed and
//! verified (pure: no I/O).
//!
//! The store is shared and writable by others, so every value read is
//! untrusted input: it is bounded in size, authenticated, parsed strictly
//! and checked against the same bounds as a local state file. A value that
//! fails any step is an error here; callers log it, count it and ignore
//! it.
//!
//! * **Signed values** (the run-time state, heartbeats):
//!   `m1:<hex HMAC-SHA256>:<payload>`, the MAC taken with the fleet's
//!   signing key over the key name, the field and the payload (each
//!   length-prefixed), so a value cannot be moved to another key, another
//!   field or another fleet.
//! * **Sealed values** (the session ticket keys):
//!   `a1:<generation>:<rotated_unix>:<hex nonce>:<hex ciphertext and tag>`,
//!   AES-256-GCM with the fleet's sealing key and a random 96-bit nonce;
//!   the key name, field, generation and rotation time are the additional
//!   data. The store (and its persistence files) never see a ticket key in
//!   plain text.
#![forbid(unsafe_code)]

use std::fmt;

use boring::hash::MessageDigest;
use boring::hmac::Hmac;
use boring::symm::{Cipher, decrypt_aead, encrypt_aead};
use relay_proto::channel::bootstrap::TicketKey;
use serde::{Deserialize, Serialize};

use super::keys::DerivedKey;
use crate::config::{parse_hex, valid_fleet_word};
use crate::quota::QuotaConfig;
use crate::store::{self, RuntimeState};
use crate::tickets::KEYS_KEPT;
use crate::token::valid_subject;

/// Longest value read from the store (a full state at every bound is
/// about 40 MB of JSON).
pub const MAX_VALUE_LEN: usize = 64 << 20;
/// Longest heartbeat.
pub const MAX_HEARTBEAT_LEN: usize = 4096;
/// The field name of the run-time state.
pub const STATE_FIELD: &str = "state";
/// The field name of a heartbeat.
pub const HEARTBEAT_FIELD: &str = "heartbeat";
/// The field name of the ticket keys.
pub const TICKETS_FIELD: &str = "tickets";

const SIGNED_PREFIX: &str = "m1:";
const SEALED_PREFIX: &str = "a1:";
const MAC_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes of one ticket key in the sealed plaintext: name, AES key, HMAC key.
const TICKET_KEY_LEN: usize = 16 + 32 + 32;

/// Why a value read from the store is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Longer than accepted.
    #[error("{0} bytes, more than the {1} accepted")]
    TooLong(usize, usize),
    /// Not a format this build writes.
    #[error("not a {0} value")]
    Format(&'static str),
    /// Parts are missing or malformed.
    #[error("truncated or malformed envelope")]
    Truncated,
    /// The MAC does not match.
    #[error("the MAC does not verify (tampered, or signed with another fleet secret)")]
    BadMac,
    /// Authenticated decryption failed.
    #[error("does not decrypt (tampered, or sealed with another fleet secret)")]
    BadSeal,
    /// The authenticated payload does not parse.
    #[error("does not parse: {0}")]
    Parse(String),
    /// It parses but breaks a bound or a rule.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The cryptography library failed (not caused by the value).
    #[error("crypto: {0}")]
    Crypto(String),
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Length-prefixed concatenation: no two lists of parts give the same
/// bytes.
fn framed(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn mac(key: &DerivedKey, key_name: &str, field: &str, payload: &[u8]) -> Result<[u8; MAC_LEN], ValueError> {
    let crypto = |e: boring::error::ErrorStack| ValueError::Crypto(e.to_string());
    let mut h = Hmac::init(key.expose(), &MessageDigest::sha256()).map_err(crypto)?;
    h.update(&framed(&[key_name.as_bytes(), field.as_bytes()])).map_err(crypto)?;
    h.update(&(payload.len() as u64).to_be_bytes()).map_err(crypto)?;
    h.update(payload).map_err(crypto)?;
    let out = h.finalize().map_err(crypto)?;
    <[u8; MAC_LEN]>::try_from(&out[..]).map_err(|_| ValueError::Crypto("short HMAC".into()))
}

/// Signs `payload` for `field` of `key_name`.
pub fn sign(key: &DerivedKey, key_name: &str, field: &str, payload: &[u8]) -> Result<Vec<u8>, ValueError> {
    let tag = mac(key, key_name, field, payload)?;
    let mut out = Vec::with_capacity(SIGNED_PREFIX.len() + 2 * MAC_LEN + 1 + payload.len());
    out.extend_from_slice(SIGNED_PREFIX.as_bytes());
    out.extend_from_slice(to_hex(&tag).as_bytes());
    out.push(b':');
    out.extend_from_slice(payload);
    Ok(out)
}

/// Verifies a signed value of `field` of `key_name` and returns its
/// payload.
pub fn verify<'v>(
    key: &DerivedKey,
    key_name: &str,
    field: &str,
    value: &'v [u8],
    max_len: usize,
) -> Result<&'v [u8], ValueError> {
    if value.len() > max_len {
        return Err(ValueError::TooLong(value.len(), max_len));
    }
    let rest = value.strip_prefix(SIGNED_PREFIX.as_bytes()).ok_or(ValueError::Format("signed"))?;
    if rest.len() < 2 * MAC_LEN + 1 || rest[2 * MAC_LEN] != b':' {
        return Err(ValueError::Truncated);
    }
    let (hex, payload) = (&rest[..2 * MAC_LEN], &rest[2 * MAC_LEN + 1..]);
    let claimed = std::str::from_utf8(hex).ok().and_then(parse_hex).ok_or(ValueError::Truncated)?;
    let expected = mac(key, key_name, field, payload)?;
    if !boring::memcmp::eq(&claimed, &expected) {
        return Err(ValueError::BadMac);
    }
    Ok(payload)
}

/// The fleet's run-time state as the store holds it: the same
/// [`RuntimeState`] a host keeps in `policy.json`, with a version that
/// every write increases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDoc {
    /// Increases with every write; hosts never install a lower one.
    pub version: u64,
    /// The host that wrote it.
    pub written_by: String,
    /// When, Unix seconds.
    pub written_unix: u64,
    /// Tokens, revocations, quota overrides.
    pub state: RuntimeState,
}

impl StateDoc {
    /// Version 0: nothing known from the store yet.
    pub fn empty() -> Self {
        Self {
            version: 0,
            written_by: String::new(),
            written_unix: 0,
            state: RuntimeState { version: store::VERSION, ..Default::default() },
        }
    }

    /// Checks what deserialization cannot: the state's format version and
    /// bounds, subjects, quota keys, the writer's name.
    pub fn validate(&self) -> Result<(), ValueError> {
        let invalid = |why: String| Err(ValueError::Invalid(why));
        if self.state.version != store::VERSION {
            return invalid(format!(
                "state format {} (this control reads {})",
                self.state.version,
                store::VERSION
            ));
        }
        if !self.written_by.is_empty() && !valid_fleet_word(&self.written_by) {
            return invalid("written_by is not a host name".into());
        }
        self.state.auth.check_bounds().map_err(|e| ValueError::Invalid(e.to_string()))?;
        if let Some(s) = self.state.auth.revoked_subjects.keys().find(|s| !valid_subject(s)) {
            return invalid(format!(
                "revoked subject {:?} is not a valid subject",
                s.chars().take(80).collect::<String>()
            ));
        }
        let bad_token_subject = self
            .state
            .auth
            .revoked_tokens
            .values()
            .filter_map(|r| r.subject.as_deref())
            .any(|s| !valid_subject(s));
        if bad_token_subject {
            return invalid("a revoked token names an invalid subject".into());
        }
        if let Some(k) = self.state.quota_overrides.keys().find(|k| !QuotaConfig::KEYS.contains(&k.as_str()))
        {
            return invalid(format!("unknown quota key {:?}", k.chars().take(80).collect::<String>()));
        }
        Ok(())
    }

    /// The signed value for `key_name`.
    pub fn encode(&self, key: &DerivedKey, key_name: &str) -> Result<Vec<u8>, ValueError> {
        let json = serde_json::to_vec(self).map_err(|e| ValueError::Parse(e.to_string()))?;
        sign(key, key_name, STATE_FIELD, &json)
    }

    /// Verifies, parses and validates a value read from `key_name`.
    pub fn decode(key: &DerivedKey, key_name: &str, value: &[u8]) -> Result<Self, ValueError> {
        let payload = verify(key, key_name, STATE_FIELD, value, MAX_VALUE_LEN)?;
        let doc: StateDoc = serde_json::from_slice(payload).map_err(|e| ValueError::Parse(e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }
}

/// What a host says about itself every second (`relayctl fleet status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The host's name.
    pub host: String,
    /// Its control process.
    pub pid: u32,
    /// When that process started, Unix seconds.
    pub started_unix: u64,
    /// When it wrote this, Unix seconds.
    pub seen_unix: u64,
    /// The state version it enforces.
    pub state_version: u64,
    /// The ticket key generation it serves (none without session tickets).
    pub ticket_generation: Option<u64>,
    /// Whether it has run-time changes the store does not have yet.
    pub pending_local_changes: bool,
    /// Its QUIC-LB config rotation codepoint, once fleet connection IDs
    /// exist.
    pub quic_lb_config_id: Option<u8>,
}

impl Heartbeat {
    /// The signed value for `key_name`.
    pub fn encode(&self, key: &DerivedKey, key_name: &str) -> Result<Vec<u8>, ValueError> {
        let json = serde_json::to_vec(self).map_err(|e| ValueError::Parse(e.to_string()))?;
        sign(key, key_name, HEARTBEAT_FIELD, &json)
    }

    /// Verifies and parses a heartbeat read from `key_name`.
    pub fn decode(key: &DerivedKey, key_name: &str, value: &[u8]) -> Result<Self, ValueError> {
        let payload = verify(key, key_name, HEARTBEAT_FIELD, value, MAX_HEARTBEAT_LEN)?;
        let hb: Heartbeat = serde_json::from_slice(payload).map_err(|e| ValueError::Parse(e.to_string()))?;
        if !valid_fleet_word(&hb.host) {
            return Err(ValueError::Invalid("host is not a host name".into()));
        }
        Ok(hb)
    }
}

/// The fleet's session ticket keys: newest (sealing) first, at most
/// [`KEYS_KEPT`], with the generation every rotation increases.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKeySet {
    /// Increases with every rotation.
    pub generation: u64,
    /// When the newest key was made, Unix seconds (the schedule).
    pub rotated_unix: u64,
    /// The keys, newest first.
    pub keys: Vec<TicketKey>,
}

impl fmt::Debug for TicketKeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only (they are public); never the keys.
        f.debug_struct("TicketKeySet")
            .field("generation", &self.generation)
            .field("rotated_unix", &self.rotated_unix)
            .field("names", &self.names_hex())
            .finish()
    }
}

fn canonical_u64(s: &str) -> Option<u64> {
    let n: u64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

impl TicketKeySet {
    /// The key names as hex (public: they travel in every ticket).
    pub fn names_hex(&self) -> Vec<String> {
        self.keys.iter().map(|k| to_hex(&k.name)).collect()
    }

    fn aad(key_name: &str, generation: &str, rotated: &str) -> Vec<u8> {
        framed(&[key_name.as_bytes(), TICKETS_FIELD.as_bytes(), generation.as_bytes(), rotated.as_bytes()])
    }

    fn check(&self) -> Result<(), ValueError> {
        if self.keys.is_empty() || self.keys.len() > KEYS_KEPT {
            return Err(ValueError::Invalid(format!("{} ticket keys (1..={KEYS_KEPT})", self.keys.len())));
        }
        if self.keys.len() == 2 && self.keys[0].name == self.keys[1].name {
            return Err(ValueError::Invalid("two ticket keys share a name".into()));
        }
        if self.generation == 0 {
            return Err(ValueError::Invalid("generation 0".into()));
        }
        Ok(())
    }

    /// The sealed value for `key_name`.
    pub fn seal(&self, key: &DerivedKey, key_name: &str) -> Result<Vec<u8>, ValueError> {
        self.check()?;
        let crypto = |e: boring::error::ErrorStack| ValueError::Crypto(e.to_string());
        let mut plain = Vec::with_capacity(self.keys.len() * TICKET_KEY_LEN);
        for k in &self.keys {
            plain.extend_from_slice(&k.name);
            plain.extend_from_slice(&k.aes_key);
            plain.extend_from_slice(&k.hmac_key);
        }
        let mut nonce = [0u8; NONCE_LEN];
        boring::rand::rand_bytes(&mut nonce).map_err(crypto)?;
        let (generation, rotated) = (self.generation.to_string(), self.rotated_unix.to_string());
        let aad = Self::aad(key_name, &generation, &rotated);
        let mut tag = [0u8; TAG_LEN];
        let mut sealed =
            encrypt_aead(Cipher::aes_256_gcm(), key.expose(), Some(&nonce), &aad, &plain, &mut tag)
                .map_err(crypto)?;
        sealed.extend_from_slice(&tag);
        let text = format!("{SEALED_PREFIX}{generation}:{rotated}:{}:{}", to_hex(&nonce), to_hex(&sealed));
        Ok(text.into_bytes())
    }

    /// Opens a sealed value read from `key_name`.
    pub fn open(key: &DerivedKey, key_name: &str, value: &[u8]) -> Result<Self, ValueError> {
        let max = SEALED_PREFIX.len() + 64 + 2 * (NONCE_LEN + TAG_LEN + KEYS_KEPT * TICKET_KEY_LEN);
        if value.len() > max {
            return Err(ValueError::TooLong(value.len(), max));
        }
        let text = std::str::from_utf8(value).map_err(|_| ValueError::Format("sealed"))?;
        let rest = text.strip_prefix(SEALED_PREFIX).ok_or(ValueError::Format("sealed"))?;
        let mut parts = rest.split(':');
        let (Some(generation), Some(rotated), Some(nonce), Some(sealed), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ValueError::Truncated);
        };
        let gen_n = canonical_u64(generation).ok_or(ValueError::Truncated)?;
        let rotated_n = canonical_u64(rotated).ok_or(ValueError::Truncated)?;
        let nonce = parse_hex(nonce).filter(|n| n.len() == NONCE_LEN).ok_or(ValueError::Truncated)?;
        let sealed = parse_hex(sealed).filter(|s| s.len() >= TAG_LEN).ok_or(ValueError::Truncated)?;
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let aad = Self::aad(key_name, generation, rotated);
        let plain = decrypt_aead(Cipher::aes_256_gcm(), key.expose(), Some(&nonce), &aad, ciphertext, tag)
            .map_err(|_| ValueError::BadSeal)?;
        if plain.is_empty() || !plain.len().is_multiple_of(TICKET_KEY_LEN) {
            return Err(ValueError::Invalid(format!("{} bytes of ticket keys", plain.len())));
        }
        let keys = plain
            .chunks_exact(TICKET_KEY_LEN)
            .map(|c| {
                let mut k = TicketKey { name: [0; 16], aes_key: [0; 32], hmac_key: [0; 32] };
                k.name.copy_from_slice(&c[..16]);
                k.aes_key.copy_from_slice(&c[16..48]);
                k.hmac_key.copy_from_slice(&c[48..]);
                k
            })
            .collect();
        let set = Self { generation: gen_n, rotated_unix: rotated_n, keys };
        set.check()?;
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{RevokedSubject, RevokedToken, TokenDigest};
    use crate::fleet::keys::FleetKeys;

    const KEY_NAME: &str = "masque:eu:state";

    fn keys() -> FleetKeys {
        FleetKeys::derive(&[3u8; 32], "eu").unwrap()
    }

    fn doc() -> StateDoc {
        let mut d = StateDoc {
            version: 7,
            written_by: "relay-1".into(),
            written_unix: 1_700_000_000,
            ..StateDoc::empty()
        };
        d.state.auth.revoked_subjects.insert("alice".into(), RevokedSubject { revoked_unix: 5 });
        d.state.auth.revoked_tokens.insert(
            TokenDigest::of("t"),
            RevokedToken { revoked_unix: 5, expires_unix: Some(9), subject: Some("bob".into()) },
        );
        d.state.quota_overrides.insert("per_identity.max_flows".into(), 3);
        d
    }

    #[test]
    fn state_round_trip() {
        let k = keys();
        let value = doc().encode(&k.signing, KEY_NAME).unwrap();
        assert!(value.starts_with(b"m1:"));
        assert_eq!(StateDoc::decode(&k.signing, KEY_NAME, &value).unwrap(), doc());
    }

    #[test]
    fn tampered_truncated_and_garbage_states_are_refused() {
        let k = keys();
        let value = doc().encode(&k.signing, KEY_NAME).unwrap();
        let decode = |v: &[u8]| StateDoc::decode(&k.signing, KEY_NAME, v);
        // One flipped byte anywhere in the payload or the MAC.
        for at in [3, 10, 70, value.len() / 2, value.len() - 2] {
            let mut t = value.clone();
            t[at] ^= 0x01;
            assert!(decode(&t).is_err(), "flipped byte {at} accepted");
        }
        // Revocation removed by hand: the MAC no longer matches.
        let text = String::from_utf8(value.clone()).unwrap();
        let lifted = text.replace("\"alice\"", "\"alicf\"");
        assert_eq!(decode(lifted.as_bytes()), Err(ValueError::BadMac));
        // Truncated at every length.
        for len in 0..value.len() {
            assert!(decode(&value[..len]).is_err(), "truncated to {len} accepted");
        }
        // Garbage and foreign formats.
        for g in [&b""[..], b"m1:", b"null", b"{\"version\":1}", b"m1:zz", &[0xff; 100], b"a1:1:2:3:4"] {
            assert!(decode(g).is_err());
        }
        // Moved to another key, or signed by another fleet or secret.
        assert_eq!(StateDoc::decode(&k.signing, "masque:us:state", &value), Err(ValueError::BadMac));
        let other = FleetKeys::derive(&[4u8; 32], "eu").unwrap();
        assert_eq!(StateDoc::decode(&other.signing, KEY_NAME, &value), Err(ValueError::BadMac));
        // Too long, before any MAC work.
        let huge = vec![b'm'; MAX_VALUE_LEN + 1];
        assert!(matches!(decode(&huge), Err(ValueError::TooLong(..))));
    }

    #[test]
    fn signed_but_invalid_states_are_refused() {
        let k = keys();
        let encode_raw = |json: &str| sign(&k.signing, KEY_NAME, STATE_FIELD, json.as_bytes()).unwrap();
        let decode = |v: &[u8]| StateDoc::decode(&k.signing, KEY_NAME, v);
        // Unknown fields, wrong format version, bad subject, unknown quota key.
        assert!(matches!(decode(&encode_raw("{\"version\":1}")), Err(ValueError::Parse(_))));
        let mut d = doc();
        d.state.version = 9;
        assert!(matches!(decode(&d.encode(&k.signing, KEY_NAME).unwrap()), Err(ValueError::Invalid(_))));
        let mut d = doc();
        d.state.auth.revoked_subjects.insert("has space".into(), RevokedSubject { revoked_unix: 1 });
        assert!(matches!(decode(&d.encode(&k.signing, KEY_NAME).unwrap()), Err(ValueError::Invalid(_))));
        let mut d = doc();
        d.state.quota_overrides.insert("per_nobody.max_flows".into(), 1);
        assert!(matches!(decode(&d.encode(&k.signing, KEY_NAME).unwrap()), Err(ValueError::Invalid(_))));
        let mut d = doc();
        d.written_by = "a b".into();
        assert!(matches!(decode(&d.encode(&k.signing, KEY_NAME).unwrap()), Err(ValueError::Invalid(_))));
        let json = serde_json::to_string(&doc()).unwrap().replace("\"version\":7", "\"version\":-7");
        assert!(matches!(decode(&encode_raw(&json)), Err(ValueError::Parse(_))));
    }

    #[test]
    fn heartbeats() {
        let k = keys();
        let hb = Heartbeat {
            host: "relay-1".into(),
            pid: 42,
            started_unix: 1,
            seen_unix: 2,
            state_version: 3,
            ticket_generation: Some(4),
            pending_local_changes: false,
            quic_lb_config_id: None,
        };
        let name = "masque:eu:host:relay-1";
        let v = hb.encode(&k.signing, name).unwrap();
        assert_eq!(Heartbeat::decode(&k.signing, name, &v).unwrap(), hb);
        assert_eq!(Heartbeat::decode(&k.signing, "masque:eu:host:relay-2", &v), Err(ValueError::BadMac));
        let long = vec![b'x'; MAX_HEARTBEAT_LEN + 1];
        assert!(matches!(Heartbeat::decode(&k.signing, name, &long), Err(ValueError::TooLong(..))));
    }

    fn key_set() -> TicketKeySet {
        let key = |b: u8| TicketKey { name: [b; 16], aes_key: [b + 1; 32], hmac_key: [b + 2; 32] };
        TicketKeySet { generation: 5, rotated_unix: 1_700_000_000, keys: vec![key(1), key(9)] }
    }

    #[test]
    fn ticket_keys_are_sealed() {
        let k = keys();
        let name = "masque:eu:tickets";
        let v = key_set().seal(&k.sealing, name).unwrap();
        let text = String::from_utf8(v.clone()).unwrap();
        assert!(text.starts_with("a1:5:1700000000:"));
        // No key material in clear, nor in Debug output.
        assert!(!text.contains(&to_hex(&[2u8; 32])) && !text.contains(&to_hex(&[1u8; 16])));
        assert!(!format!("{:?}", key_set()).contains(&format!("{:?}", [2u8; 32])));
        assert_eq!(TicketKeySet::open(&k.sealing, name, &v).unwrap(), key_set());
        // Two seals of the same set differ (fresh nonce).
        assert_ne!(key_set().seal(&k.sealing, name).unwrap(), v);
    }

    #[test]
    fn tampered_truncated_and_garbage_ticket_keys_are_refused() {
        let k = keys();
        let name = "masque:eu:tickets";
        let v = key_set().seal(&k.sealing, name).unwrap();
        let open = |x: &[u8]| TicketKeySet::open(&k.sealing, name, x);
        let text = String::from_utf8(v.clone()).unwrap();
        // The generation and schedule are authenticated too.
        assert_eq!(open(text.replacen("a1:5:", "a1:6:", 1).as_bytes()), Err(ValueError::BadSeal));
        assert_eq!(
            open(text.replacen(":1700000000:", ":1700000001:", 1).as_bytes()),
            Err(ValueError::BadSeal)
        );
        assert_eq!(open(text.replacen("a1:5:", "a1:05:", 1).as_bytes()), Err(ValueError::Truncated));
        for at in (3..v.len()).step_by(7) {
            let mut t = v.clone();
            t[at] = if t[at] == b'0' { b'1' } else { b'0' };
            assert!(open(&t).is_err(), "changed byte {at} accepted");
        }
        for len in 0..v.len() {
            assert!(open(&v[..len]).is_err(), "truncated to {len} accepted");
        }
        for g in [&b""[..], b"a1:", b"a1:1:2:3", b"a1:1:2:3:4:5", b"m1:00", &[0xff; 64]] {
            assert!(open(g).is_err());
        }
        assert_eq!(TicketKeySet::open(&k.sealing, "masque:us:tickets", &v), Err(ValueError::BadSeal));
        assert_eq!(TicketKeySet::open(&k.signing, name, &v), Err(ValueError::BadSeal), "wrong key");
        // Sealing refuses sets that would not open.
        let mut bad = key_set();
        bad.keys.clear();
        assert!(bad.seal(&k.sealing, name).is_err());
        let mut bad = key_set();
        bad.keys[1].name = bad.keys[0].name;
        assert!(bad.seal(&k.sealing, name).is_err());
    }
}

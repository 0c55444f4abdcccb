//! HMAC-signed, expiring bearer tokens (sans-IO).
//!
//! A token names a subject and an expiry and is signed with one of the
//! relay's HMAC keys, so any relay host holding the key verifies it without
//! shared state. The format (version 1) is
//!
//! ```text
//! token   = "v1." key-id "." expiry "." subject "." mac
//! key-id  = 1*32 ( ALPHA / DIGIT / "-" / "_" )
//! expiry  = Unix seconds, decimal, no leading zero, at most 20 digits
//! subject = 1*64 ( ALPHA / DIGIT / "-" / "_" / "." / "~" )
//! mac     = base64url without padding (43 characters) of
//!           HMAC-SHA256(key, "v1." key-id "." expiry "." subject)
//! ```
//!
//! e.g. `v1.k1.1767225600.alice.4f3Qm…` Every character is in RFC 6750's
//! `b64token` set, so the token travels as `Proxy-Authorization: Bearer …`
//! unchanged, and it is URL-safe. Key IDs and expiries contain no dot, so the
//! subject is everything between the third dot and the last one.
//!
//! Every valid token has exactly one spelling (the base64url decoder refuses
//! non-zero padding bits, the expiry has no leading zeros and the MAC covers
//! everything else), so revoking "this exact token" cannot be bypassed by
//! re-spelling it. A token is valid while `now < expiry`. The MAC is checked
//! before the expiry, so a forged token is reported as forged, not expired;
//! the comparison is constant-time (`CRYPTO_memcmp`).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

use boring::hash::MessageDigest;
use boring::hmac::Hmac;

/// The only version this relay mints and accepts.
pub const VERSION_PREFIX: &str = "v1.";
/// Shortest HMAC secret accepted (RFC 2104 recommends at least the hash
/// output length, 32 bytes for SHA-256).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest key ID.
pub const MAX_KEY_ID_LEN: usize = 32;
/// Longest subject.
pub const MAX_SUBJECT_LEN: usize = 64;
/// Longest lifetime a minted token may have (one year and a day).
pub const MAX_TTL_SECS: u64 = 366 * 24 * 3600;
/// Most HMAC keys a relay holds at once.
pub const MAX_KEYS: usize = 64;
/// Longest token accepted at all (version, ID, expiry, subject, MAC, dots).
pub const MAX_TOKEN_LEN: usize = 3 + MAX_KEY_ID_LEN + 1 + 20 + 1 + MAX_SUBJECT_LEN + 1 + MAC_B64_LEN;

const MAC_LEN: usize = 32;
const MAC_B64_LEN: usize = 43;

/// Why a token was not accepted, or could not be minted. The variants are
/// distinct for logs; clients see the same 407 for all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a version-1 token, or a field is not well formed.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// A `vN.` prefix other than `v1.`.
    #[error("unsupported token version")]
    UnsupportedVersion,
    /// No key with this ID (retired, or never configured on this host).
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// The MAC does not match: forged or altered.
    #[error("bad signature")]
    BadMac,
    /// The token was valid until its expiry, which has passed.
    #[error("token expired at {0}")]
    Expired(u64),
    /// Minting: the subject is empty, too long or has characters outside
    /// `A-Z a-z 0-9 - _ . ~`.
    #[error("invalid subject {0:?}: 1..=64 characters of A-Z a-z 0-9 - _ . ~")]
    InvalidSubject(String),
    /// Minting: the lifetime is zero or longer than [`MAX_TTL_SECS`].
    #[error("invalid lifetime {0}s: must be 1..={MAX_TTL_SECS} seconds")]
    InvalidTtl(u64),
    /// Minting: no key to sign with.
    #[error("no HMAC keys are configured ([[auth.hmac_keys]])")]
    NoKeys,
    /// The crypto library failed.
    #[error("HMAC computation failed")]
    Crypto,
}

impl TokenError {
    /// A short, stable reason for logs and counters.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::UnsupportedVersion => "unsupported_version",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::BadMac => "bad_mac",
            TokenError::Expired(_) => "expired",
            TokenError::InvalidSubject(_) | TokenError::InvalidTtl(_) | TokenError::NoKeys => {
                "invalid_request"
            }
            TokenError::Crypto => "crypto",
        }
    }
}

/// Why a key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The ID is empty, too long, or not `A-Z a-z 0-9 - _`.
    #[error("key id {0:?} must be 1..=32 characters of A-Z a-z 0-9 - _")]
    BadId(String),
    /// The secret is shorter than [`MIN_SECRET_LEN`].
    #[error("the secret of key {id:?} is {len} bytes; at least {MIN_SECRET_LEN} are required")]
    ShortSecret {
        /// The key ID.
        id: String,
        /// The secret's length.
        len: usize,
    },
    /// Two keys share an ID.
    #[error("key id {0:?} is used twice")]
    Duplicate(String),
    /// More than [`MAX_KEYS`] keys.
    #[error("at most {MAX_KEYS} HMAC keys may be configured")]
    TooMany,
}

/// An HMAC secret. Its `Debug` output never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The secret's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The key that signed it.
    pub key_id: String,
    /// Expiry, Unix seconds.
    pub expires_unix: u64,
    /// The subject (the identity quotas and revocations apply to).
    pub subject: String,
}

/// A minted token.
#[derive(Clone, PartialEq, Eq)]
pub struct Minted {
    /// The token text (a secret: hand it to the client, do not log it).
    pub token: String,
    /// What it says.
    pub claims: Claims,
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted").field("token", &"<redacted>").field("claims", &self.claims).finish()
    }
}

/// The HMAC keys by ID; the first one added mints unless told otherwise.
#[derive(Clone, Default)]
pub struct TokenKeys {
    keys: BTreeMap<String, Secret>,
    default_id: Option<String>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("default_id", &self.default_id)
            .finish()
    }
}

fn valid_key_id(id: &str) -> bool {
    (1..=MAX_KEY_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `s` is a valid token subject.
pub fn valid_subject(s: &str) -> bool {
    (1..=MAX_SUBJECT_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

fn valid_expiry(s: &str) -> Option<u64> {
    if s.is_empty()
        || s.len() > 20
        || !s.bytes().all(|b| b.is_ascii_digit())
        || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

impl TokenKeys {
    /// Adds a key. The first key added is the default minting key.
    pub fn add(&mut self, id: &str, secret: Secret) -> Result<(), KeyError> {
        if !valid_key_id(id) {
            return Err(KeyError::BadId(id.to_string()));
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::ShortSecret { id: id.to_string(), len: secret.len() });
        }
        if self.keys.contains_key(id) {
            return Err(KeyError::Duplicate(id.to_string()));
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyError::TooMany);
        }
        self.keys.insert(id.to_string(), secret);
        self.default_id.get_or_insert_with(|| id.to_string());
        Ok(())
    }

    /// The key IDs, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The ID [`TokenKeys::mint`] uses when none is given.
    pub fn default_id(&self) -> Option<&str> {
        self.default_id.as_deref()
    }

    /// Whether no keys are configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn mac(secret: &Secret, signed: &str) -> Result<[u8; MAC_LEN], TokenError> {
        let mut h = Hmac::init(&secret.0, &MessageDigest::sha256()).map_err(|_| TokenError::Crypto)?;
        h.update(signed.as_bytes()).map_err(|_| TokenError::Crypto)?;
        h.finalize().map_err(|_| TokenError::Crypto)?.try_into().map_err(|_| TokenError::Crypto)
    }

    /// Mints a token for `subject` valid for `ttl_secs` from `now_unix`,
    /// signed with `key_id` (default: the first configured key).
    pub fn mint(
        &self,
        key_id: Option<&str>,
        subject: &str,
        now_unix: u64,
        ttl_secs: u64,
    ) -> Result<Minted, TokenError> {
        if !valid_subject(subject) {
            return Err(TokenError::InvalidSubject(subject.chars().take(80).collect()));
        }
        if ttl_secs == 0 || ttl_secs > MAX_TTL_SECS {
            return Err(TokenError::InvalidTtl(ttl_secs));
        }
        let id = match key_id {
            Some(id) => id,
            None => self.default_id.as_deref().ok_or(TokenError::NoKeys)?,
        };
        let secret =
            self.keys.get(id).ok_or_else(|| TokenError::UnknownKey(id.chars().take(40).collect()))?;
        let expires_unix = now_unix.saturating_add(ttl_secs);
        let signed = format!("{VERSION_PREFIX}{id}.{expires_unix}.{subject}");
        let mac = Self::mac(secret, &signed)?;
        Ok(Minted {
            token: format!("{signed}.{}", base64url_encode(&mac)),
            claims: Claims { key_id: id.to_string(), expires_unix, subject: subject.to_string() },
        })
    }

    /// Verifies the signature of `token` and returns its claims, without
    /// looking at the expiry.
    pub fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        let parsed = parse(token)?;
        let secret =
            self.keys.get(parsed.key_id).ok_or_else(|| TokenError::UnknownKey(parsed.key_id.to_string()))?;
        let expected = Self::mac(secret, parsed.signed)?;
        if !boring::memcmp::eq(&expected, &parsed.mac) {
            return Err(TokenError::BadMac);
        }
        Ok(Claims {
            key_id: parsed.key_id.to_string(),
            expires_unix: parsed.expires_unix,
            subject: parsed.subject.to_string(),
        })
    }

    /// Verifies `token` at `now_unix`: well formed, known key, matching
    /// MAC, not expired.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, TokenError> {
        let claims = self.verify_signature(token)?;
        if now_unix >= claims.expires_unix {
            return Err(TokenError::Expired(claims.expires_unix));
        }
        Ok(claims)
    }
}

/// Whether `token` claims to be a versioned HMAC token (`v<digits>.`), as
/// opposed to a static bearer token.
pub fn looks_versioned(token: &str) -> bool {
    let Some(rest) = token.strip_prefix('v') else { return false };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && rest.as_bytes().get(digits) == Some(&b'.')
}

struct Parsed<'a> {
    signed: &'a str,
    key_id: &'a str,
    expires_unix: u64,
    subject: &'a str,
    mac: [u8; MAC_LEN],
}

fn parse(token: &str) -> Result<Parsed<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let Some(rest) = token.strip_prefix(VERSION_PREFIX) else {
        return Err(if looks_versioned(token) {
            TokenError::UnsupportedVersion
        } else {
            TokenError::Malformed("no v1. prefix")
        });
    };
    let (signed_rest, mac_b64) = rest.rsplit_once('.').ok_or(TokenError::Malformed("missing fields"))?;
    let signed = &token[..VERSION_PREFIX.len() + signed_rest.len()];
    let (key_id, rest) = signed_rest.split_once('.').ok_or(TokenError::Malformed("missing fields"))?;
    let (expiry, subject) = rest.split_once('.').ok_or(TokenError::Malformed("missing fields"))?;
    if !valid_key_id(key_id) {
        return Err(TokenError::Malformed("key id"));
    }
    let expires_unix = valid_expiry(expiry).ok_or(TokenError::Malformed("expiry"))?;
    if !valid_subject(subject) {
        return Err(TokenError::Malformed("subject"));
    }
    let mac = base64url_decode(mac_b64)
        .and_then(|m| <[u8; MAC_LEN]>::try_from(m).ok())
        .ok_or(TokenError::Malformed("mac"))?;
    Ok(Parsed { signed, key_id, expires_unix, subject, mac })
}

pub use relay_proto::base64url::{base64url_decode, base64url_encode};

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn keys() -> TokenKeys {
        let mut k = TokenKeys::default();
        k.add("k1", Secret::new(vec![7; 32])).unwrap();
        k.add("k2", Secret::new((0..48).collect())).unwrap();
        k
    }

    #[test]
    fn base64url_round_trip_and_strictness() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base64url_encode(&data);
            assert!(!enc.contains('=') && !enc.contains('+') && !enc.contains('/'));
            assert_eq!(base64url_decode(&enc).unwrap(), data, "len {len}");
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_decode("-_8").unwrap(), b"\xfb\xff");
        // Non-zero unused bits, a dangling character, padding, other alphabets.
        assert!(base64url_decode("-_9").is_none());
        assert!(base64url_decode("QUJDR").is_none());
        assert!(base64url_decode("QQ==").is_none());
        assert!(base64url_decode("a+b/").is_none());
    }

    #[test]
    fn round_trip() {
        let k = keys();
        let m = k.mint(None, "alice", NOW, 3600).unwrap();
        assert!(m.token.starts_with("v1.k1.1700003600.alice."), "{}", m.token);
        assert_eq!(m.token.len(), "v1.k1.1700003600.alice.".len() + MAC_B64_LEN);
        assert!(m.token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)));
        let c = k.verify(&m.token, NOW).unwrap();
        assert_eq!(c, Claims { key_id: "k1".into(), expires_unix: NOW + 3600, subject: "alice".into() });
        assert_eq!(c, m.claims);
        // Dots in the subject are fine: the subject ends at the last dot.
        let m = k.mint(Some("k2"), "svc.eu-1.example~x", NOW, 60).unwrap();
        assert_eq!(k.verify(&m.token, NOW).unwrap().subject, "svc.eu-1.example~x");
        assert!(!format!("{m:?}").contains(&m.token), "Debug hides the token");
        assert!(!format!("{k:?}").contains("07"), "Debug hides the secrets");
    }

    #[test]
    fn expiry_boundary() {
        let k = keys();
        let m = k.mint(None, "bob", NOW, 10).unwrap();
        assert!(k.verify(&m.token, NOW + 9).is_ok());
        assert_eq!(k.verify(&m.token, NOW + 10), Err(TokenError::Expired(NOW + 10)));
        assert_eq!(k.verify(&m.token, NOW + 11), Err(TokenError::Expired(NOW + 10)));
        assert!(k.verify_signature(&m.token).is_ok(), "the signature stays valid");
    }

    #[test]
    fn tampering_any_byte_is_refused() {
        let k = keys();
        let token = k.mint(None, "carol", NOW, 3600).unwrap().token;
        let bytes = token.as_bytes();
        for i in 0..bytes.len() {
            for replacement in [b'A', b'z', b'0', b'.', b'-', b'_', b'~', b'=', b' ', 0xff] {
                if bytes[i] == replacement {
                    continue;
                }
                let mut t = bytes.to_vec();
                t[i] = replacement;
                let t = String::from_utf8_lossy(&t).into_owned();
                let r = k.verify(&t, NOW);
                assert!(r.is_err(), "byte {i} -> {replacement:?} accepted: {t}");
            }
            // Dropping a byte or inserting one is refused too.
            let mut t = bytes.to_vec();
            t.remove(i);
            assert!(k.verify(&String::from_utf8_lossy(&t), NOW).is_err(), "without byte {i}");
            let mut t = bytes.to_vec();
            t.insert(i, b'a');
            assert!(k.verify(&String::from_utf8_lossy(&t), NOW).is_err(), "byte inserted at {i}");
        }
        // A flip in the MAC, the subject or the expiry: a bad MAC
        // specifically (well formed, wrong signature).
        let mac_start = token.rfind('.').unwrap() + 1;
        let mut t = token.clone().into_bytes();
        t[mac_start] = if t[mac_start] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.verify(&String::from_utf8(t).unwrap(), NOW), Err(TokenError::BadMac));
        let forged = token.replace(".carol.", ".carpl.");
        assert_eq!(k.verify(&forged, NOW), Err(TokenError::BadMac));
        let extended = token.replace("1700003600", "1800003600");
        assert_eq!(k.verify(&extended, NOW), Err(TokenError::BadMac));
    }

    #[test]
    fn wrong_key_id_and_rotation() {
        let k = keys();
        let t = k.mint(Some("k2"), "dave", NOW, 60).unwrap().token;
        // Claiming another key: MAC mismatch; naming an unknown key: unknown.
        assert_eq!(k.verify(&t.replacen("v1.k2.", "v1.k1.", 1), NOW), Err(TokenError::BadMac));
        assert_eq!(
            k.verify(&t.replacen("v1.k2.", "v1.k9.", 1), NOW),
            Err(TokenError::UnknownKey("k9".into()))
        );
        assert_eq!(k.mint(Some("k9"), "dave", NOW, 60).unwrap_err(), TokenError::UnknownKey("k9".into()));
        // Rotation: a host with only the new key refuses old-key tokens; a
        // host with both accepts both; the same secret under another ID is
        // a different key as far as tokens go.
        let mut only_k2 = TokenKeys::default();
        only_k2.add("k2", Secret::new((0..48).collect())).unwrap();
        let old = k.mint(Some("k1"), "erin", NOW, 60).unwrap().token;
        assert_eq!(only_k2.verify(&old, NOW), Err(TokenError::UnknownKey("k1".into())));
        assert!(only_k2.verify(&t, NOW).is_ok());
        assert_eq!(only_k2.default_id(), Some("k2"));
        let mut renamed = TokenKeys::default();
        renamed.add("k1", Secret::new((0..48).collect())).unwrap();
        assert_eq!(renamed.verify(&t, NOW), Err(TokenError::UnknownKey("k2".into())));
        assert_eq!(renamed.verify(&t.replacen("v1.k2.", "v1.k1.", 1), NOW), Err(TokenError::BadMac));
    }

    #[test]
    fn malformed_and_versions() {
        let k = keys();
        for (t, want) in [
            ("", TokenError::Malformed("no v1. prefix")),
            ("static-token", TokenError::Malformed("no v1. prefix")),
            ("v2.k1.1.a.AAAA", TokenError::UnsupportedVersion),
            ("v10.x", TokenError::UnsupportedVersion),
            ("v1.k1.1700003600.alice", TokenError::Malformed("missing fields")),
            ("v1.k1.1700003600", TokenError::Malformed("missing fields")),
            ("v1..1700003600.alice.AAAA", TokenError::Malformed("key id")),
            ("v1.k1.01700003600.alice.AAAA", TokenError::Malformed("expiry")),
            ("v1.k1.-5.alice.AAAA", TokenError::Malformed("expiry")),
            ("v1.k1.99999999999999999999.alice.AAAA", TokenError::Malformed("expiry")),
            ("v1.k1.1700003600.al ice.AAAA", TokenError::Malformed("subject")),
            ("v1.k1.1700003600..AAAA", TokenError::Malformed("subject")),
            ("v1.k1.1700003600.alice.AAAA", TokenError::Malformed("mac")),
        ] {
            assert_eq!(k.verify(t, NOW), Err(want.clone()), "{t:?}");
        }
        assert_eq!(k.verify(&"v1.".repeat(100), NOW), Err(TokenError::Malformed("too long")));
        assert!(looks_versioned("v1.x") && looks_versioned("v7.") && !looks_versioned("v.x"));
        assert!(!looks_versioned("vx1.") && !looks_versioned("abc"));
    }

    #[test]
    fn minting_and_key_rules() {
        let k = keys();
        assert!(matches!(k.mint(None, "", NOW, 60), Err(TokenError::InvalidSubject(_))));
        assert!(matches!(k.mint(None, "a b", NOW, 60), Err(TokenError::InvalidSubject(_))));
        assert!(matches!(k.mint(None, &"a".repeat(65), NOW, 60), Err(TokenError::InvalidSubject(_))));
        assert!(k.mint(None, &"a".repeat(64), NOW, 60).is_ok());
        assert_eq!(k.mint(None, "a", NOW, 0), Err(TokenError::InvalidTtl(0)));
        assert_eq!(k.mint(None, "a", NOW, MAX_TTL_SECS + 1), Err(TokenError::InvalidTtl(MAX_TTL_SECS + 1)));
        assert_eq!(TokenKeys::default().mint(None, "a", NOW, 60), Err(TokenError::NoKeys));
        let mut k = TokenKeys::default();
        assert_eq!(
            k.add("short", Secret::new(vec![1; 31])),
            Err(KeyError::ShortSecret { id: "short".into(), len: 31 })
        );
        assert!(k.add("short", Secret::new(vec![1; 31])).unwrap_err().to_string().contains("\"short\""));
        assert_eq!(k.add("bad.id", Secret::new(vec![1; 32])), Err(KeyError::BadId("bad.id".into())));
        k.add("a", Secret::new(vec![1; 32])).unwrap();
        assert_eq!(k.add("a", Secret::new(vec![2; 32])), Err(KeyError::Duplicate("a".into())));
        assert_eq!(k.ids().collect::<Vec<_>>(), ["a"]);
    }
}

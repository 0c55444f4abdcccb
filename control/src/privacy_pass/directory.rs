//! The issuer directory (RFC 9578 section 4): a JSON object with the
//! issuer's request URI and its token keys,
//!
//! ```json
//! {
//!   "issuer-request-uri": "https://issuer.example.net/request",
//!   "token-keys": [
//!     { "token-type": 2, "token-key": "MI...AB", "not-before": 1686913811 }
//!   ]
//! }
//! ```
//!
//! read from a file or an HTTPS URL by control (never by the dataplane),
//! at start and every `directory_refresh_secs`. The relay uses the type 2
//! keys (public keys, all it needs); type 1 keys verify with the private
//! key only, which comes from the config, and other types are skipped.
//! `not-before` (optional) is when a key comes into force; a key the
//! directory stops listing is retired (its tokens are refused as expired).
//! Unknown members are ignored (section 4: the directory may be extended).
//! Bounded: at most [`MAX_DIRECTORY_BYTES`] read and [`super::MAX_KEYS`]
//! keys used.
#![forbid(unsafe_code)]

use std::sync::Arc;

use serde::Deserialize;

use super::keys::IssuerKey;
use super::wire::{TokenType, base64url_lenient};
use super::{KeyEntry, KeySource, MAX_KEYS};

/// Largest directory document read.
pub const MAX_DIRECTORY_BYTES: usize = 64 * 1024;

/// Why a directory was refused (the keys in force then stay).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// Larger than [`MAX_DIRECTORY_BYTES`].
    #[error("the directory is larger than {MAX_DIRECTORY_BYTES} bytes")]
    TooLarge,
    /// Not the JSON RFC 9578 section 4 describes.
    #[error("not an issuer directory: {0}")]
    Json(String),
    /// A type 2 key that is not usable.
    #[error("token key {index}: {reason}")]
    Key {
        /// Its position in `token-keys`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// More keys than [`MAX_KEYS`].
    #[error("more than {MAX_KEYS} token keys")]
    TooMany,
    /// No type 2 key at all.
    #[error("the directory lists no type 2 (Blind RSA) token key")]
    NoKeys,
}

#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "issuer-request-uri")]
    issuer_request_uri: String,
    #[serde(rename = "token-keys")]
    token_keys: Vec<DocKey>,
}

#[derive(Deserialize)]
struct DocKey {
    #[serde(rename = "token-type")]
    token_type: u16,
    #[serde(rename = "token-key")]
    token_key: String,
    #[serde(rename = "not-before", default)]
    not_before: Option<u64>,
}

/// A parsed directory.
#[derive(Debug)]
pub struct Directory {
    /// Where clients send token requests (informational here).
    pub issuer_request_uri: String,
    /// The type 2 keys.
    pub keys: Vec<KeyEntry>,
    /// Keys of other types, skipped.
    pub skipped: usize,
}

/// Parses a directory document.
pub fn parse(doc: &[u8]) -> Result<Directory, DirectoryError> {
    if doc.len() > MAX_DIRECTORY_BYTES {
        return Err(DirectoryError::TooLarge);
    }
    let doc: Doc = serde_json::from_slice(doc).map_err(|e| DirectoryError::Json(e.to_string()))?;
    if doc.token_keys.len() > MAX_KEYS * 4 {
        return Err(DirectoryError::TooMany);
    }
    let mut keys = Vec::new();
    let mut skipped = 0;
    for (index, k) in doc.token_keys.iter().enumerate() {
        if TokenType::from_value(k.token_type) != Some(TokenType::BlindRsa) {
            skipped += 1;
            continue;
        }
        let bad = |reason: String| DirectoryError::Key { index, reason };
        let der = base64url_lenient(&k.token_key).map_err(|e| bad(e.to_string()))?;
        let key = IssuerKey::blind_rsa(&der).map_err(|e| bad(e.to_string()))?;
        if keys.iter().any(|e: &KeyEntry| e.key.key_id() == key.key_id()) {
            return Err(bad("listed twice".into()));
        }
        keys.push(KeyEntry {
            key: Arc::new(key),
            not_before: k.not_before.unwrap_or(0),
            not_after: None,
            source: KeySource::Directory,
        });
    }
    if keys.len() > MAX_KEYS {
        return Err(DirectoryError::TooMany);
    }
    if keys.is_empty() {
        return Err(DirectoryError::NoKeys);
    }
    Ok(Directory { issuer_request_uri: doc.issuer_request_uri, keys, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy_pass::keys::tests::vector;

    #[test]
    fn a_directory_gives_its_type_2_keys() {
        let doc = format!(
            r#"{{"issuer-request-uri": "https://issuer.example/token-request",
                "token-keys": [
                  {{"token-type": 2, "token-key": "{}", "not-before": 1700000000}},
                  {{"token-type": 1, "token-key": "AAAA"}},
                  {{"token-type": 5, "token-key": "AAAA", "extra": true}}
                ],
                "future-member": 1}}"#,
            vector::TOKEN_KEY
        );
        let d = parse(doc.as_bytes()).unwrap();
        assert_eq!(d.issuer_request_uri, "https://issuer.example/token-request");
        assert_eq!((d.keys.len(), d.skipped), (1, 2));
        assert_eq!(d.keys[0].not_before, 1_700_000_000);
        assert_eq!(d.keys[0].source, KeySource::Directory);
        assert_eq!(d.keys[0].key.token_key(), base64url_lenient(vector::TOKEN_KEY).unwrap());
    }

    #[test]
    fn bad_directories_are_refused_with_a_reason() {
        let key = vector::TOKEN_KEY;
        let one = |k: &str| {
            format!(r#"{{"issuer-request-uri":"u","token-keys":[{{"token-type":2,"token-key":"{k}"}}]}}"#)
        };
        assert!(matches!(parse(b"not json"), Err(DirectoryError::Json(_))));
        assert!(matches!(parse(br#"{"token-keys": []}"#), Err(DirectoryError::Json(_))));
        assert_eq!(
            parse(br#"{"issuer-request-uri":"u","token-keys":[]}"#).unwrap_err(),
            DirectoryError::NoKeys
        );
        assert!(matches!(parse(one("!!").as_bytes()), Err(DirectoryError::Key { index: 0, .. })));
        assert!(matches!(parse(one("MIIB").as_bytes()), Err(DirectoryError::Key { index: 0, .. })));
        let twice = format!(
            r#"{{"issuer-request-uri":"u","token-keys":[{{"token-type":2,"token-key":"{key}"}},{{"token-type":2,"token-key":"{key}"}}]}}"#
        );
        assert!(matches!(parse(twice.as_bytes()), Err(DirectoryError::Key { index: 1, .. })));
        assert_eq!(parse(&vec![b' '; MAX_DIRECTORY_BYTES + 1]).unwrap_err(), DirectoryError::TooLarge);
    }
}

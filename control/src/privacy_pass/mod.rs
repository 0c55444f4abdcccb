//! Privacy Pass (RFC 9576, RFC 9577, RFC 9578): `Proxy-Authorization:
//! PrivateToken token=...` as a credential for every tunnel kind.
//!
//! The relay is the *origin* of RFC 9576's architecture: it challenges
//! (407 with `Proxy-Authenticate: PrivateToken challenge=..., token-key=...`),
//! and redeems. Clients fetch tokens from the issuer (and its attester);
//! the relay never talks to either, except for reading the issuer's key
//! directory.
//!
//! * [`wire`]: the TokenChallenge, Token and header encodings.
//! * [`keys`]: issuer keys; type 2 (Blind RSA) verification with the
//!   issuer's public key, type 1 (VOPRF P-384) with its private key, which
//!   only control holds (the dataplane never sees a token key or a token's
//!   verification: it forwards the header like any credential).
//! * [`directory`]: the issuer directory (RFC 9578 section 4).
//! * [`spent`]: the double-spend store.
//!
//! **Redemption contexts.** With `redemption_window_secs` = W > 0, the
//! challenge of window k = ⌊now / W⌋ carries the redemption context
//! HMAC-SHA256(secret, label || k) (RFC 9577 section 2.1 lists
//! binding to a time window as a use of the context). A token is accepted
//! only for the current or the previous window's challenge (a client that
//! fetched its token just before a window ended can still use it), so a
//! nonce needs remembering for at most two windows: the store holds what
//! is redeemed in 2 W, and `max-age` tells clients how long a challenge
//! stays good. The secret is made at start, so a restarted control accepts
//! no token issued for its predecessor's challenges, and a restart cannot
//! be used to replay tokens the lost store had seen. With W = 0 the
//! context is empty: tokens stay redeemable while their key is in force
//! (clients may fetch them ahead of any challenge), and the store keeps a
//! key's nonces as long as the key (lost on restart: such a deployment
//! should give keys a short `not_after`).
//!
//! **Identity.** Tokens are unlinkable: the quota key of a redeemed token
//! is its issuer key (`pp:<type>:<key id>`), so per-identity quotas apply
//! to everyone holding tokens of that key, and per-client quotas as for
//! any credential.
#![forbid(unsafe_code)]

pub mod directory;
pub mod keys;
pub mod source;
pub mod spent;
pub mod wire;

use std::collections::VecDeque;
use std::sync::Arc;

use boring::hash::MessageDigest;
use boring::hmac::Hmac;
use serde::Serialize;

use self::keys::IssuerKey;
use self::spent::{SpendError, SpentNonces};
use self::wire::{ChallengeDigest, KeyId, TokenChallenge, TokenType, WireError};

/// Most issuer keys held at once (configured and from the directory).
pub const MAX_KEYS: usize = 32;
/// Retired keys remembered, so their tokens are refused as expired rather
/// than unknown.
pub const MAX_RETIRED: usize = 64;
/// Default bound of the spent-token store.
pub const DEFAULT_MAX_SPENT: usize = 1_000_000;

/// How often redemptions drop spent nonces that can no longer be redeemed.
const PRUNE_EVERY_SECS: u64 = 10;

const CONTEXT_LABEL: &[u8] = b"masque-relay privacy pass redemption context v1";

/// Why a key file could not be read as an SPKI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a public key as DER, PEM (PUBLIC KEY) or base64url text")]
pub struct KeyFileError;

/// The DER SubjectPublicKeyInfo in a key file: DER as is, PEM (`-----BEGIN
/// PUBLIC KEY-----`), or base64url text (a directory's `token-key`).
pub fn spki_from_file(bytes: &[u8]) -> Result<Vec<u8>, KeyFileError> {
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| KeyFileError)?.trim();
    if let Some(body) = text.strip_prefix("-----BEGIN PUBLIC KEY-----") {
        let body = body.trim_end().strip_suffix("-----END PUBLIC KEY-----").ok_or(KeyFileError)?;
        // PEM is base64 with the standard alphabet, in lines.
        let b64: String = body
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                '-' | '_' => '!',
                c => c,
            })
            .collect();
        return wire::base64url_lenient(&b64).map_err(|_| KeyFileError);
    }
    wire::base64url_lenient(text).map_err(|_| KeyFileError)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where a key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// `[[auth.privacy_pass.keys]]`.
    Config,
    /// The issuer directory.
    Directory,
}

/// A key and when it is in force.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// The key.
    pub key: Arc<IssuerKey>,
    /// Unix seconds from which tokens of it are accepted and it is
    /// advertised.
    pub not_before: u64,
    /// Unix seconds from which its tokens are refused as expired.
    pub not_after: Option<u64>,
    /// Where it came from.
    pub source: KeySource,
}

impl KeyEntry {
    fn in_force(&self, now_unix: u64) -> bool {
        self.not_before <= now_unix && self.not_after.is_none_or(|e| now_unix < e)
    }
}

/// What challenges say and how long they hold.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The issuer's name in challenges.
    pub issuer_name: String,
    /// The origin names in challenges (empty: none, any origin of the
    /// issuer).
    pub origin_info: Vec<String>,
    /// The redemption window (0: the empty redemption context).
    pub window_secs: u64,
    /// Bound of the spent-token store.
    pub max_spent: usize,
}

/// Why a `PrivateToken` credential was refused. Unlike bearer tokens the
/// client learns which: none of it is secret (the client holds the token)
/// and it tells a standard client what to do (fetch a token for the new
/// challenge, or refresh the issuer's keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a well-formed `PrivateToken` credential or token.
    Malformed(WireError),
    /// A token type this relay has no key for.
    UnsupportedType,
    /// No key with the token's key ID.
    UnknownKey,
    /// The token's key is no longer in force.
    ExpiredKey,
    /// The token was issued for another challenge (another issuer, origin,
    /// token type, or a redemption window no longer accepted).
    WrongChallenge,
    /// The authenticator does not verify.
    BadAuthenticator,
    /// The token was redeemed before.
    Replayed,
    /// The spent-token store is full (503, not the client's fault).
    StoreFull,
}

impl Refusal {
    /// A short, stable reason for logs and counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "pp_malformed",
            Refusal::UnsupportedType => "pp_unsupported_type",
            Refusal::UnknownKey => "pp_unknown_key",
            Refusal::ExpiredKey => "pp_expired_key",
            Refusal::WrongChallenge => "pp_wrong_challenge",
            Refusal::BadAuthenticator => "pp_bad_authenticator",
            Refusal::Replayed => "pp_replayed",
            Refusal::StoreFull => "pp_store_full",
        }
    }

    /// The Proxy-Status details the client gets.
    pub fn client_details(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed token",
            Refusal::UnsupportedType => "unsupported token type",
            Refusal::UnknownKey => "unknown token key",
            Refusal::ExpiredKey => "token key expired",
            Refusal::WrongChallenge => "token for another challenge",
            Refusal::BadAuthenticator => "invalid token",
            Refusal::Replayed => "token replayed",
            Refusal::StoreFull => "spent-token store full",
        }
    }
}

/// A redeemed token: what quotas and logs know of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Redeemed {
    /// Its type.
    pub token_type: TokenType,
    /// Its issuer key.
    pub key_id: KeyId,
}

impl Redeemed {
    /// The quota key: `pp:<type>:<first 8 bytes of the key ID, hex>`.
    pub fn quota_key(&self) -> String {
        format!("pp:{}:{}", self.token_type.name(), hex(&self.key_id[..8]))
    }
}

/// A key as `relayctl status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// `blind-rsa` or `voprf`.
    pub token_type: &'static str,
    /// The key ID, hex.
    pub key_id: String,
    /// From when.
    pub not_before: u64,
    /// Until when.
    pub not_after: Option<u64>,
    /// Config or directory.
    pub source: KeySource,
    /// In force now.
    pub in_force: bool,
    /// The key challenges of its type name now.
    pub advertised: bool,
}

/// Counters for `relayctl status` and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Tokens accepted.
    pub redeemed: u64,
    /// Nonces held in the spent-token store.
    pub spent_held: usize,
    /// Its bound.
    pub spent_max: usize,
    /// Keys held.
    pub keys: Vec<KeyInfo>,
}

/// A challenge digest accepted now: its token type and window.
type Accepted = (TokenType, u64, [u8; 32]);

/// The Privacy Pass verifier: keys, challenges and the spent-token store.
pub struct PrivacyPass {
    settings: Settings,
    context_secret: [u8; 32],
    keys: Vec<KeyEntry>,
    retired: VecDeque<KeyId>,
    spent: SpentNonces,
    redeemed: u64,
    /// When [`PrivacyPass::redeem`] next drops spent nonces that can no
    /// longer be redeemed (Unix seconds).
    next_prune: u64,
    /// Challenge digests accepted, cached for the window they were
    /// computed in.
    digests: Option<(u64, Vec<Accepted>)>,
}

impl std::fmt::Debug for PrivacyPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivacyPass")
            .field("settings", &self.settings)
            .field("keys", &self.keys)
            .field("spent", &self.spent.len())
            .finish_non_exhaustive()
    }
}

/// Why keys could not be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    /// More than [`MAX_KEYS`].
    #[error("at most {MAX_KEYS} Privacy Pass issuer keys may be held")]
    TooMany,
    /// The same key twice.
    #[error("token key {0} is listed twice")]
    Duplicate(String),
}

impl PrivacyPass {
    /// A verifier with no keys and a fresh redemption-context secret.
    pub fn new(settings: Settings) -> Self {
        let mut context_secret = [0u8; 32];
        boring::rand::rand_bytes(&mut context_secret).expect("BoringSSL's RNG");
        let spent = SpentNonces::new(settings.max_spent);
        Self {
            settings,
            context_secret,
            keys: Vec::new(),
            retired: VecDeque::new(),
            spent,
            redeemed: 0,
            next_prune: 0,
            digests: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the keys of `source` with `keys` (a directory refresh, or
    /// the config's at start). Keys that were held and are not any more
    /// are remembered as retired: their tokens are refused as expired.
    pub fn install(&mut self, source: KeySource, keys: Vec<KeyEntry>) -> Result<(), InstallError> {
        let others: Vec<KeyEntry> = self.keys.iter().filter(|k| k.source != source).cloned().collect();
        if others.len() + keys.len() > MAX_KEYS {
            return Err(InstallError::TooMany);
        }
        let mut all = others;
        for k in keys {
            if all.iter().any(|o| o.key.key_id() == k.key.key_id()) {
                return Err(InstallError::Duplicate(hex(k.key.key_id())));
            }
            all.push(k);
        }
        for old in &self.keys {
            let id = *old.key.key_id();
            if !all.iter().any(|k| *k.key.key_id() == id) && !self.retired.contains(&id) {
                if self.retired.len() == MAX_RETIRED {
                    self.retired.pop_front();
                }
                self.retired.push_back(id);
            }
        }
        self.retired.retain(|id| !all.iter().any(|k| k.key.key_id() == id));
        self.keys = all;
        Ok(())
    }

    fn window(&self, now_unix: u64) -> u64 {
        now_unix.checked_div(self.settings.window_secs).unwrap_or(0)
    }

    /// The redemption context of window `k` (none without windows).
    fn context(&self, k: u64) -> Option<[u8; 32]> {
        if self.settings.window_secs == 0 {
            return None;
        }
        let mac = || -> Result<Vec<u8>, boring::error::ErrorStack> {
            let mut h = Hmac::init(&self.context_secret, &MessageDigest::sha256())?;
            h.update(CONTEXT_LABEL)?;
            h.update(&k.to_be_bytes())?;
            h.finalize()
        };
        // HMAC-SHA256 with a 32-byte key cannot fail but for memory.
        Some(mac().expect("HMAC-SHA256").try_into().expect("32 bytes"))
    }

    fn challenge(&self, token_type: TokenType, k: u64) -> TokenChallenge {
        TokenChallenge {
            token_type,
            issuer_name: self.settings.issuer_name.clone(),
            redemption_context: self.context(k),
            origin_info: self.settings.origin_info.clone(),
        }
    }

    /// The key challenges of `token_type` name now: of the keys in force,
    /// the one that came into force last (a new key is advertised from its
    /// `not_before` while the old one's tokens stay good).
    fn advertised(&self, token_type: TokenType, now_unix: u64) -> Option<&KeyEntry> {
        self.keys
            .iter()
            .filter(|k| k.key.token_type() == token_type && k.in_force(now_unix))
            .max_by_key(|k| k.not_before)
    }

    /// The `Proxy-Authenticate` values for a 407 now: one per token type
    /// with a key in force (type 2 first).
    pub fn challenges(&self, now_unix: u64) -> Vec<String> {
        let k = self.window(now_unix);
        let max_age = (self.settings.window_secs > 0)
            .then(|| (k + 2).saturating_mul(self.settings.window_secs).saturating_sub(now_unix));
        [TokenType::BlindRsa, TokenType::Voprf]
            .into_iter()
            .filter_map(|t| {
                let key = self.advertised(t, now_unix)?;
                let age = match (max_age, key.not_after) {
                    (Some(a), Some(end)) => Some(a.min(end.saturating_sub(now_unix))),
                    (a, _) => a,
                };
                Some(wire::challenge_value(&self.challenge(t, k), key.key.token_key(), age))
            })
            .collect()
    }

    /// The challenge digests accepted now: each type's current and previous
    /// window (one empty-context challenge per type without windows).
    fn accepted_digests(&mut self, now_unix: u64) -> &[Accepted] {
        let k = self.window(now_unix);
        if self.digests.as_ref().is_none_or(|(at, _)| *at != k) {
            let windows: Vec<u64> =
                if self.settings.window_secs == 0 { vec![0] } else { vec![k, k.saturating_sub(1)] };
            let mut out = Vec::new();
            for t in [TokenType::BlindRsa, TokenType::Voprf] {
                for w in &windows {
                    out.push((t, *w, self.challenge(t, *w).digest()));
                }
            }
            out.dedup();
            self.digests = Some((k, out));
        }
        &self.digests.as_ref().expect("just set").1
    }

    /// Redeems `PrivateToken` credentials at `now_unix`: decode, key, key
    /// in force, challenge, authenticator, then spend the nonce. A token
    /// refused before the last step is not spent.
    pub fn redeem(&mut self, credentials: &str, now_unix: u64) -> Result<Redeemed, Refusal> {
        let token = wire::parse_credentials(credentials).map_err(Refusal::Malformed)?;
        let Some(entry) = self.keys.iter().find(|k| *k.key.key_id() == token.token_key_id) else {
            return Err(if self.retired.contains(&token.token_key_id) {
                Refusal::ExpiredKey
            } else if !self.keys.iter().any(|k| k.key.token_type() == token.token_type) {
                Refusal::UnsupportedType
            } else {
                Refusal::UnknownKey
            });
        };
        if entry.key.token_type() != token.token_type {
            return Err(Refusal::UnknownKey);
        }
        if !entry.in_force(now_unix) {
            return Err(if entry.not_before > now_unix { Refusal::UnknownKey } else { Refusal::ExpiredKey });
        }
        let key = Arc::clone(&entry.key);
        let window = self
            .accepted_digests(now_unix)
            .iter()
            .find(|(t, _, d)| *t == token.token_type && boring::memcmp::eq(d, &token.challenge_digest))
            .map(|(_, w, _)| *w)
            .ok_or(Refusal::WrongChallenge)?;
        if !key.verify(&token) {
            return Err(Refusal::BadAuthenticator);
        }
        // Every 10 s, and before refusing for a full store, drop what can
        // no longer be redeemed (old windows, keys out of force).
        if now_unix >= self.next_prune || self.spent.len() >= self.spent.max() {
            self.prune(now_unix);
            self.next_prune = now_unix.saturating_add(PRUNE_EVERY_SECS);
        }
        self.spent.spend(key.key_id(), window, &token.nonce).map_err(|e| match e {
            SpendError::Replayed => Refusal::Replayed,
            SpendError::Full => Refusal::StoreFull,
        })?;
        self.redeemed += 1;
        Ok(Redeemed { token_type: token.token_type, key_id: *key.key_id() })
    }

    /// Drops spent nonces no token can be redeemed against any more:
    /// windows before the previous one, keys no longer in force (with
    /// windows), keys past their `not_after` (without). Returns how many.
    pub fn prune(&mut self, now_unix: u64) -> usize {
        let k = self.window(now_unix);
        let windowed = self.settings.window_secs > 0;
        let keys = &self.keys;
        self.spent.retain(|id, w| {
            let entry = keys.iter().find(|e| e.key.key_id() == id);
            if windowed {
                w + 1 >= k && entry.is_some_and(|e| e.in_force(now_unix))
            } else {
                // Without windows a key's set may only go once the key can
                // never be in force again.
                entry.is_none_or(|e| e.not_after.is_none_or(|end| now_unix < end))
            }
        })
    }

    /// Counters and keys.
    pub fn stats(&self, now_unix: u64) -> Stats {
        let advertised: Vec<KeyId> = [TokenType::BlindRsa, TokenType::Voprf]
            .into_iter()
            .filter_map(|t| self.advertised(t, now_unix).map(|k| *k.key.key_id()))
            .collect();
        Stats {
            redeemed: self.redeemed,
            spent_held: self.spent.len(),
            spent_max: self.spent.max(),
            keys: self
                .keys
                .iter()
                .map(|k| KeyInfo {
                    token_type: k.key.token_type().name(),
                    key_id: hex(k.key.key_id()),
                    not_before: k.not_before,
                    not_after: k.not_after,
                    source: k.source,
                    in_force: k.in_force(now_unix),
                    advertised: advertised.contains(k.key.key_id()),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

//! Client authentication: static bearer tokens and HMAC-signed expiring
//! tokens ([`crate::token`]), with revocation.
//!
//! Clients send `Proxy-Authorization: Bearer <token>` (or `Authorization`,
//! which some MASQUE clients use). Missing or refused credentials are
//! answered with 407 and a `Proxy-Authenticate: Bearer` challenge: the relay
//! acts as a proxy, so RFC 9110 section 11.7's proxy authentication applies.
//! Every refusal has its own [`Refusal`] for logs, but clients see only
//! "authentication required" (nothing sent) or "invalid credentials".
//!
//! Static tokens are held as SHA-256 digests only: the config's tokens are
//! hashed at start and tokens added at run time are persisted as digests,
//! so the state directory never holds one in clear. A presented token is
//! hashed and looked up by digest; the lookup's timing can tell at most
//! something about a digest, which does not help find a token.
//!
//! The identity of a request is the HMAC token's subject, or for a static
//! token its fingerprint (the first 8 bytes of its digest, hex): quotas
//! and logs use it, and the token itself is never logged.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::token::{self, TokenError, TokenKeys};

/// Most static tokens (config and run time together).
pub const MAX_STATIC_TOKENS: usize = 10_000;
/// Most revoked subjects.
pub const MAX_REVOKED_SUBJECTS: usize = 100_000;
/// Most revoked tokens (entries of HMAC tokens are pruned once they expire).
pub const MAX_REVOKED_TOKENS: usize = 100_000;
/// Longest static token.
pub const MAX_STATIC_TOKEN_LEN: usize = 512;

/// A string that must not appear in logs or `Debug` output (a token).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl FromStr for SecretString {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// The SHA-256 digest of a token. Serialized as hex; shown as its
/// fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &str) -> Self {
        Self(boring::sha::sha256(token.as_bytes()))
    }

    /// The first 8 bytes as hex: how tokens are named in logs and lists.
    pub fn fingerprint(&self) -> String {
        hex(&self.0[..8])
    }

    /// Whether `fp` (a fingerprint or any longer hex prefix of the digest)
    /// names this digest.
    pub fn matches_fingerprint(&self, fp: &str) -> bool {
        let full = hex(&self.0);
        fp.len() >= 16 && full.starts_with(&fp.to_ascii_lowercase())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", self.fingerprint())
    }
}

impl Serialize for TokenDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for TokenDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::config::parse_hex(&s)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(TokenDigest)
            .ok_or_else(|| serde::de::Error::custom(format!("not a SHA-256 hex digest: {s:?}")))
    }
}

/// Who a request is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The subject of an HMAC token.
    Subject(String),
    /// A static token, by fingerprint.
    StaticToken(String),
    /// A Privacy Pass token: unlinkable, so named by its issuer key only
    /// (`pp:<type>:<key id>`, [`crate::privacy_pass::Redeemed::quota_key`]).
    PrivacyPass(String),
    /// A client certificate, by the name its `[[auth.mtls.identities]]`
    /// rule gives it.
    Certificate(String),
    /// No credentials asked for: an `auth = "public"` upstream route.
    /// Quotas count per client address only.
    Public,
    /// Not known (flows a re-attached dataplane reported).
    Unknown,
}

impl Identity {
    /// The key quotas track this identity under (`sub:alice`,
    /// `tok:0123456789abcdef`); `None` for [`Identity::Public`] and
    /// [`Identity::Unknown`].
    pub fn quota_key(&self) -> Option<String> {
        match self {
            Identity::Subject(s) => Some(format!("sub:{s}")),
            Identity::StaticToken(fp) => Some(format!("tok:{fp}")),
            Identity::PrivacyPass(key) => Some(key.clone()),
            Identity::Certificate(name) => Some(format!("cert:{name}")),
            Identity::Public | Identity::Unknown => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Subject(s) => write!(f, "sub:{s}"),
            Identity::StaticToken(fp) => write!(f, "tok:{fp}"),
            Identity::PrivacyPass(key) => f.write_str(key),
            Identity::Certificate(name) => write!(f, "cert:{name}"),
            Identity::Public => f.write_str("public"),
            Identity::Unknown => f.write_str("-"),
        }
    }
}

/// Why credentials were refused (all answered 407).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials were sent.
    Missing,
    /// Not `Bearer <token>`.
    NotBearer,
    /// Not a configured static token, and not a versioned HMAC token.
    UnknownToken,
    /// An HMAC token that failed verification.
    Token(TokenError),
    /// The token's subject is revoked.
    RevokedSubject,
    /// This exact token is revoked.
    RevokedToken,
    /// A scheme this relay does not accept (`auth.schemes`).
    Scheme,
    /// A Privacy Pass token that was refused.
    PrivacyPass(crate::privacy_pass::Refusal),
    /// A client certificate that was refused (mutual TLS).
    Certificate(crate::mtls::CertRefusal),
}

impl Refusal {
    /// A short, stable reason for logs and counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::NotBearer => "not_bearer",
            Refusal::UnknownToken => "unknown_static_token",
            Refusal::Token(e) => e.reason(),
            Refusal::RevokedSubject => "revoked_subject",
            Refusal::RevokedToken => "revoked_token",
            Refusal::Scheme => "scheme_not_accepted",
            Refusal::PrivacyPass(r) => r.reason(),
            Refusal::Certificate(r) => r.reason(),
        }
    }

    /// What the client is told: the same for every bad bearer
    /// credential (which of them failed would help guess tokens), the
    /// reason for a Privacy Pass token (nothing secret: the client holds
    /// the token, and the reason tells it whether to fetch a new one).
    pub fn client_details(&self) -> &'static str {
        match self {
            Refusal::Missing => "authentication required",
            Refusal::Scheme => "unsupported authentication scheme",
            Refusal::PrivacyPass(r) => r.client_details(),
            Refusal::Certificate(r) => r.client_details(),
            _ => "invalid credentials",
        }
    }
}

/// Why a token management request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A static token that is empty, too long, has whitespace or
    /// non-printable characters, or looks like a versioned HMAC token.
    #[error(
        "a static token must be 1..={MAX_STATIC_TOKEN_LEN} printable ASCII characters without spaces, \
         and must not start like a versioned token (v1.)"
    )]
    BadStaticToken,
    /// The token is already accepted.
    #[error("token {0} is already accepted")]
    AlreadyPresent(String),
    /// The token comes from the config file and cannot be removed at run time.
    #[error("token {0} comes from the config file: remove it there (or revoke it)")]
    FromConfig(String),
    /// No static token matches.
    #[error("no run-time static token matches {0}")]
    NoSuchToken(String),
    /// The fingerprint matches more than one token.
    #[error("fingerprint {0} is ambiguous; give more hex digits")]
    Ambiguous(String),
    /// Revoking a token this relay would not accept anyway.
    #[error("not a token of this relay: {0}")]
    NotOurToken(String),
    /// Revoking a token that has expired already.
    #[error("the token expired already; nothing to revoke")]
    AlreadyExpired,
    /// Already revoked.
    #[error("{0} is already revoked")]
    AlreadyRevoked(String),
    /// Not revoked.
    #[error("{0} is not revoked")]
    NotRevoked(String),
    /// An invalid subject.
    #[error("invalid subject {0:?}")]
    BadSubject(String),
    /// A list is full.
    #[error("too many {0} (limit {1})")]
    Full(&'static str, usize),
}

/// When a run-time token was added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedToken {
    /// Unix seconds.
    pub added_unix: u64,
}

/// When a subject was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSubject {
    /// Unix seconds.
    pub revoked_unix: u64,
}

/// A revoked token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedToken {
    /// Unix seconds.
    pub revoked_unix: u64,
    /// For HMAC tokens, their expiry: the entry is pruned after it.
    pub expires_unix: Option<u64>,
    /// The subject, for HMAC tokens (shown in lists).
    #[serde(default)]
    pub subject: Option<String>,
}

/// The authentication state that changes at run time and is persisted
/// (see [`crate::store`]): static tokens added at run time (digests only)
/// and revocations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthState {
    /// Static tokens added at run time, by digest.
    #[serde(default)]
    pub static_tokens: BTreeMap<TokenDigest, AddedToken>,
    /// Revoked HMAC token subjects.
    #[serde(default)]
    pub revoked_subjects: BTreeMap<String, RevokedSubject>,
    /// Revoked tokens (static or HMAC), by digest.
    #[serde(default)]
    pub revoked_tokens: BTreeMap<TokenDigest, RevokedToken>,
}

impl AuthState {
    /// Drops revocations of HMAC tokens that have expired (they are
    /// refused as expired anyway); returns how many were dropped.
    pub fn prune(&mut self, now_unix: u64) -> usize {
        let before = self.revoked_tokens.len();
        self.revoked_tokens.retain(|_, r| r.expires_unix.is_none_or(|e| e > now_unix));
        before - self.revoked_tokens.len()
    }

    /// Checks the bounds after loading.
    pub fn check_bounds(&self) -> Result<(), AuthError> {
        if self.static_tokens.len() > MAX_STATIC_TOKENS {
            return Err(AuthError::Full("static tokens", MAX_STATIC_TOKENS));
        }
        if self.revoked_subjects.len() > MAX_REVOKED_SUBJECTS {
            return Err(AuthError::Full("revoked subjects", MAX_REVOKED_SUBJECTS));
        }
        if self.revoked_tokens.len() > MAX_REVOKED_TOKENS {
            return Err(AuthError::Full("revoked tokens", MAX_REVOKED_TOKENS));
        }
        Ok(())
    }
}

/// Whether `t` may be a static token.
pub fn valid_static_token(t: &str) -> bool {
    (1..=MAX_STATIC_TOKEN_LEN).contains(&t.len())
        && t.bytes().all(|b| b.is_ascii_graphic())
        && !token::looks_versioned(t)
}

/// Checks credentials against static tokens, HMAC keys and revocations.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    config_tokens: HashSet<TokenDigest>,
    keys: TokenKeys,
    state: AuthState,
}

/// Which static token a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token itself.
    Token(SecretString),
    /// Its fingerprint (or a longer hex prefix of its digest).
    Fingerprint(String),
}

/// A static token as `token list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaticTokenInfo {
    /// Fingerprint.
    pub fingerprint: String,
    /// "config" or "runtime".
    pub source: &'static str,
    /// When it was added (run-time tokens).
    pub added_unix: Option<u64>,
    /// Whether it is revoked.
    pub revoked: bool,
}

impl Authenticator {
    /// Accepts the config's static tokens and HMAC tokens signed by `keys`,
    /// with the persisted run-time `state`.
    pub fn new<'a>(
        config_tokens: impl IntoIterator<Item = &'a str>,
        keys: TokenKeys,
        state: AuthState,
    ) -> Self {
        Self { config_tokens: config_tokens.into_iter().map(TokenDigest::of).collect(), keys, state }
    }

    /// The HMAC keys.
    pub fn keys(&self) -> &TokenKeys {
        &self.keys
    }

    /// The run-time state.
    pub fn state(&self) -> &AuthState {
        &self.state
    }

    /// Replaces the run-time state (after it was persisted).
    pub fn set_state(&mut self, state: AuthState) {
        self.state = state;
    }

    /// Checks a `Proxy-Authorization` value at `now_unix`.
    pub fn check(&self, authorization: Option<&str>, now_unix: u64) -> Result<Identity, Refusal> {
        let Some(value) = authorization else {
            return Err(Refusal::Missing);
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return Err(Refusal::NotBearer);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refusal::NotBearer);
        }
        let token = token.trim();
        if token.len() > MAX_STATIC_TOKEN_LEN.max(token::MAX_TOKEN_LEN) {
            return Err(Refusal::UnknownToken);
        }
        let digest = TokenDigest::of(token);
        let identity = if self.is_static(&digest) {
            Identity::StaticToken(digest.fingerprint())
        } else if token::looks_versioned(token) {
            let claims = self.keys.verify(token, now_unix).map_err(Refusal::Token)?;
            if self.state.revoked_subjects.contains_key(&claims.subject) {
                return Err(Refusal::RevokedSubject);
            }
            Identity::Subject(claims.subject)
        } else {
            return Err(Refusal::UnknownToken);
        };
        if self.state.revoked_tokens.contains_key(&digest) {
            return Err(Refusal::RevokedToken);
        }
        Ok(identity)
    }

    /// Whether `subject` is revoked (`relayctl token revoke --subject`):
    /// HMAC token subjects and certificate identities alike.
    pub fn subject_revoked(&self, subject: &str) -> bool {
        self.state.revoked_subjects.contains_key(subject)
    }

    fn is_static(&self, digest: &TokenDigest) -> bool {
        self.config_tokens.contains(digest) || self.state.static_tokens.contains_key(digest)
    }

    /// Every static token, by fingerprint.
    pub fn static_tokens(&self) -> Vec<StaticTokenInfo> {
        let mut out: Vec<StaticTokenInfo> = self
            .config_tokens
            .iter()
            .map(|d| StaticTokenInfo {
                fingerprint: d.fingerprint(),
                source: "config",
                added_unix: None,
                revoked: self.state.revoked_tokens.contains_key(d),
            })
            .chain(self.state.static_tokens.iter().filter(|(d, _)| !self.config_tokens.contains(d)).map(
                |(d, a)| StaticTokenInfo {
                    fingerprint: d.fingerprint(),
                    source: "runtime",
                    added_unix: Some(a.added_unix),
                    revoked: self.state.revoked_tokens.contains_key(d),
                },
            ))
            .collect();
        out.sort_by(|a, b| (a.source, &a.fingerprint).cmp(&(b.source, &b.fingerprint)));
        out
    }

    /// `state` with a static token added.
    pub fn add_token(&self, token: &str, now_unix: u64) -> Result<(AuthState, TokenDigest), AuthError> {
        if !valid_static_token(token) {
            return Err(AuthError::BadStaticToken);
        }
        let digest = TokenDigest::of(token);
        if self.is_static(&digest) {
            return Err(AuthError::AlreadyPresent(digest.fingerprint()));
        }
        if self.config_tokens.len() + self.state.static_tokens.len() >= MAX_STATIC_TOKENS {
            return Err(AuthError::Full("static tokens", MAX_STATIC_TOKENS));
        }
        let mut state = self.state.clone();
        state.static_tokens.insert(digest, AddedToken { added_unix: now_unix });
        Ok((state, digest))
    }

    fn select_runtime(&self, sel: &TokenSelector) -> Result<TokenDigest, AuthError> {
        let (found, name): (Vec<TokenDigest>, String) = match sel {
            TokenSelector::Token(t) => {
                let d = TokenDigest::of(t.expose());
                (vec![d], d.fingerprint())
            }
            TokenSelector::Fingerprint(fp) => (
                self.config_tokens
                    .iter()
                    .chain(self.state.static_tokens.keys())
                    .filter(|d| d.matches_fingerprint(fp))
                    .copied()
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect(),
                fp.clone(),
            ),
        };
        match found.as_slice() {
            [d] if self.state.static_tokens.contains_key(d) => Ok(*d),
            [d] if self.config_tokens.contains(d) => Err(AuthError::FromConfig(d.fingerprint())),
            [] | [_] => Err(AuthError::NoSuchToken(name)),
            _ => Err(AuthError::Ambiguous(name)),
        }
    }

    /// `state` with a run-time static token removed; returns its digest.
    pub fn remove_token(&self, sel: &TokenSelector) -> Result<(AuthState, TokenDigest), AuthError> {
        let d = self.select_runtime(sel)?;
        let mut state = self.state.clone();
        state.static_tokens.remove(&d);
        Ok((state, d))
    }

    /// `state` with `subject` revoked.
    pub fn revoke_subject(&self, subject: &str, now_unix: u64) -> Result<AuthState, AuthError> {
        if !token::valid_subject(subject) {
            return Err(AuthError::BadSubject(subject.chars().take(80).collect()));
        }
        if self.state.revoked_subjects.contains_key(subject) {
            return Err(AuthError::AlreadyRevoked(format!("subject {subject}")));
        }
        if self.state.revoked_subjects.len() >= MAX_REVOKED_SUBJECTS {
            return Err(AuthError::Full("revoked subjects", MAX_REVOKED_SUBJECTS));
        }
        let mut state = self.state.clone();
        state.revoked_subjects.insert(subject.to_string(), RevokedSubject { revoked_unix: now_unix });
        Ok(state)
    }

    /// `state` with this exact token revoked (a static token of this relay,
    /// or an HMAC token whose signature verifies and that has not expired).
    pub fn revoke_token(&self, token: &str, now_unix: u64) -> Result<(AuthState, TokenDigest), AuthError> {
        let digest = TokenDigest::of(token);
        let entry = if self.is_static(&digest) {
            RevokedToken { revoked_unix: now_unix, expires_unix: None, subject: None }
        } else {
            if !token::looks_versioned(token) {
                return Err(AuthError::NotOurToken("no static token matches".into()));
            }
            let claims = self
                .keys
                .verify_signature(token)
                .map_err(|e| AuthError::NotOurToken(format!("the HMAC token does not verify ({e})")))?;
            if claims.expires_unix <= now_unix {
                return Err(AuthError::AlreadyExpired);
            }
            RevokedToken {
                revoked_unix: now_unix,
                expires_unix: Some(claims.expires_unix),
                subject: Some(claims.subject),
            }
        };
        if self.state.revoked_tokens.contains_key(&digest) {
            return Err(AuthError::AlreadyRevoked(format!("token {}", digest.fingerprint())));
        }
        let mut state = self.state.clone();
        state.prune(now_unix);
        if state.revoked_tokens.len() >= MAX_REVOKED_TOKENS {
            return Err(AuthError::Full("revoked tokens", MAX_REVOKED_TOKENS));
        }
        state.revoked_tokens.insert(digest, entry);
        Ok((state, digest))
    }

    /// `state` with a subject's revocation lifted.
    pub fn unrevoke_subject(&self, subject: &str) -> Result<AuthState, AuthError> {
        let mut state = self.state.clone();
        state
            .revoked_subjects
            .remove(subject)
            .ok_or_else(|| AuthError::NotRevoked(format!("subject {subject}")))?;
        Ok(state)
    }

    /// `state` with a token's revocation lifted.
    pub fn unrevoke_token(&self, sel: &TokenSelector) -> Result<(AuthState, TokenDigest), AuthError> {
        let matches: Vec<TokenDigest> = match sel {
            TokenSelector::Token(t) => vec![TokenDigest::of(t.expose())],
            TokenSelector::Fingerprint(fp) => {
                self.state.revoked_tokens.keys().filter(|d| d.matches_fingerprint(fp)).copied().collect()
            }
        };
        let name = match sel {
            TokenSelector::Token(t) => TokenDigest::of(t.expose()).fingerprint(),
            TokenSelector::Fingerprint(fp) => fp.clone(),
        };
        let d = match matches.as_slice() {
            [d] if self.state.revoked_tokens.contains_key(d) => *d,
            [] | [_] => return Err(AuthError::NotRevoked(format!("token {name}"))),
            _ => return Err(AuthError::Ambiguous(name)),
        };
        let mut state = self.state.clone();
        state.revoked_tokens.remove(&d);
        Ok((state, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Secret;

    const NOW: u64 = 1_700_000_000;

    fn auth() -> Authenticator {
        let mut keys = TokenKeys::default();
        keys.add("k1", Secret::new(vec![9; 32])).unwrap();
        Authenticator::new(["s3cret", "other"], keys, AuthState::default())
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    #[test]
    fn static_tokens() {
        let a = auth();
        let fp = TokenDigest::of("s3cret").fingerprint();
        assert_eq!(a.check(Some("Bearer s3cret"), NOW), Ok(Identity::StaticToken(fp.clone())));
        assert_eq!(a.check(Some("bearer   other "), NOW).map(|i| i.quota_key().is_some()), Ok(true));
        assert_eq!(a.check(None, NOW), Err(Refusal::Missing));
        assert_eq!(a.check(Some("Bearer s3cre"), NOW), Err(Refusal::UnknownToken));
        assert_eq!(a.check(Some("Basic czNjcmV0"), NOW), Err(Refusal::NotBearer));
        assert_eq!(a.check(Some("s3cret"), NOW), Err(Refusal::NotBearer));
        assert_eq!(Authenticator::default().check(Some("Bearer x"), NOW), Err(Refusal::UnknownToken));
        assert_eq!(fp.len(), 16);
        assert_eq!(Identity::StaticToken(fp.clone()).to_string(), format!("tok:{fp}"));
        // A public route's clients: shown as such, counted per address only.
        assert_eq!((Identity::Public.to_string(), Identity::Public.quota_key()), ("public".into(), None));
        assert!(!format!("{:?}", SecretString::new("s3cret")).contains("s3cret"));
    }

    #[test]
    fn hmac_tokens_and_reasons() {
        let a = auth();
        let t = a.keys().mint(None, "alice", NOW, 60).unwrap().token;
        assert_eq!(a.check(Some(&bearer(&t)), NOW), Ok(Identity::Subject("alice".into())));
        let refusal = |t: &str, now| a.check(Some(&bearer(t)), now).unwrap_err();
        assert_eq!(refusal(&t, NOW + 60).reason(), "expired");
        assert_eq!(refusal(&t.replace("alice", "alicf"), NOW).reason(), "bad_mac");
        assert_eq!(refusal(&t.replace("v1.k1.", "v1.k2."), NOW).reason(), "unknown_key");
        assert_eq!(refusal("v1.k1.x", NOW).reason(), "malformed");
        assert_eq!(refusal("v3.k1.x", NOW).reason(), "unsupported_version");
        // The client sees one answer for all of them.
        for r in [refusal(&t, NOW + 60), refusal("v1.k1.x", NOW), refusal("nope", NOW)] {
            assert_eq!(r.client_details(), "invalid credentials");
        }
        assert_eq!(Refusal::Missing.client_details(), "authentication required");
    }

    #[test]
    fn revocation_by_subject_and_token() {
        let mut a = auth();
        let t1 = a.keys().mint(None, "alice", NOW, 600).unwrap().token;
        let t2 = a.keys().mint(None, "alice", NOW, 700).unwrap().token;
        let tb = a.keys().mint(None, "bob", NOW, 600).unwrap().token;
        // Exact token: only that one.
        let (s, _) = a.revoke_token(&t1, NOW).unwrap();
        a.set_state(s);
        assert_eq!(a.check(Some(&bearer(&t1)), NOW), Err(Refusal::RevokedToken));
        assert!(a.check(Some(&bearer(&t2)), NOW).is_ok());
        assert!(matches!(a.revoke_token(&t1, NOW), Err(AuthError::AlreadyRevoked(_))));
        // Subject: all of them.
        a.set_state(a.revoke_subject("alice", NOW).unwrap());
        assert_eq!(a.check(Some(&bearer(&t2)), NOW), Err(Refusal::RevokedSubject));
        assert!(a.check(Some(&bearer(&tb)), NOW).is_ok());
        assert_eq!(a.check(Some(&bearer(&t2)), NOW).unwrap_err().client_details(), "invalid credentials");
        // Static tokens can be revoked by token too.
        let (s, d) = a.revoke_token("other", NOW).unwrap();
        a.set_state(s);
        assert_eq!(a.check(Some("Bearer other"), NOW), Err(Refusal::RevokedToken));
        assert!(a.static_tokens().iter().any(|t| t.fingerprint == d.fingerprint() && t.revoked));
        // Tokens that are not ours, or expired ones, are refused.
        assert!(matches!(a.revoke_token("garbage", NOW), Err(AuthError::NotOurToken(_))));
        assert!(matches!(a.revoke_token(&tb.replace("bob", "bop"), NOW), Err(AuthError::NotOurToken(_))));
        assert_eq!(a.revoke_token(&tb, NOW + 600), Err(AuthError::AlreadyExpired));
        // Pruning drops revocations of expired HMAC tokens only.
        let mut s = a.state().clone();
        assert_eq!(s.prune(NOW + 600), 1);
        assert_eq!(s.revoked_tokens.len(), 1, "the static token's revocation stays");
        // Lifting revocations.
        a.set_state(a.unrevoke_subject("alice").unwrap());
        assert!(a.check(Some(&bearer(&t2)), NOW).is_ok());
        assert!(matches!(a.unrevoke_subject("alice"), Err(AuthError::NotRevoked(_))));
        let (s, _) = a.unrevoke_token(&TokenSelector::Fingerprint(d.fingerprint())).unwrap();
        a.set_state(s);
        assert!(a.check(Some("Bearer other"), NOW).is_ok());
        assert!(matches!(a.revoke_subject("bad subject", NOW), Err(AuthError::BadSubject(_))));
    }

    #[test]
    fn runtime_static_tokens() {
        let mut a = auth();
        let (s, d) = a.add_token("added-at-runtime", NOW).unwrap();
        a.set_state(s);
        assert_eq!(a.check(Some("Bearer added-at-runtime"), NOW), Ok(Identity::StaticToken(d.fingerprint())));
        assert!(matches!(a.add_token("added-at-runtime", NOW), Err(AuthError::AlreadyPresent(_))));
        assert!(matches!(a.add_token("s3cret", NOW), Err(AuthError::AlreadyPresent(_))));
        for bad in ["", "has space", "v1.k1.looks.versioned", "tab\t", &"x".repeat(513)] {
            assert_eq!(a.add_token(bad, NOW), Err(AuthError::BadStaticToken), "{bad:?}");
        }
        let list = a.static_tokens();
        assert_eq!(list.len(), 3);
        assert_eq!(list.iter().filter(|t| t.source == "runtime").count(), 1);
        // The persisted state holds the digest, never the token.
        let json = serde_json::to_string(a.state()).unwrap();
        assert!(!json.contains("added-at-runtime"));
        assert!(json.contains(&d.fingerprint()));
        // Config tokens cannot be removed; run-time ones can, by token or
        // fingerprint; short fingerprints are refused.
        assert!(matches!(
            a.remove_token(&TokenSelector::Token(SecretString::new("s3cret"))),
            Err(AuthError::FromConfig(_))
        ));
        assert!(matches!(
            a.remove_token(&TokenSelector::Fingerprint(d.fingerprint()[..8].to_string())),
            Err(AuthError::NoSuchToken(_))
        ));
        let (s, removed) =
            a.remove_token(&TokenSelector::Fingerprint(d.fingerprint().to_uppercase())).unwrap();
        assert_eq!(removed, d);
        a.set_state(s);
        assert_eq!(a.check(Some("Bearer added-at-runtime"), NOW), Err(Refusal::UnknownToken));
        assert!(matches!(
            a.remove_token(&TokenSelector::Token(SecretString::new("added-at-runtime"))),
            Err(AuthError::NoSuchToken(_))
        ));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut a = auth();
        let t = a.keys().mint(None, "alice", NOW, 600).unwrap().token;
        let (s, _) = a.add_token("rt-token", NOW).unwrap();
        a.set_state(s);
        a.set_state(a.revoke_subject("mallory", NOW).unwrap());
        let (s, _) = a.revoke_token(&t, NOW).unwrap();
        a.set_state(s);
        let json = serde_json::to_string(a.state()).unwrap();
        let back: AuthState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, a.state());
        assert!(serde_json::from_str::<AuthState>(r#"{"static_tokens":{"zz":{"added_unix":1}}}"#).is_err());
        assert!(serde_json::from_str::<AuthState>(r#"{"surprise":1}"#).is_err());
    }
}

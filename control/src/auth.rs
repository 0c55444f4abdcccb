//! Client authentication: bearer tokens from the config.
//!
//! Clients send `Proxy-Authorization: Bearer <token>` (or `Authorization`,
//! which some MASQUE clients use). Missing or wrong credentials are answered
//! with 407 and a `Proxy-Authenticate: Bearer` challenge: the relay acts as
//! a proxy, so RFC 9110 section 11.7's proxy authentication applies.
#![forbid(unsafe_code)]

/// Outcome of checking credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// A configured token matched.
    Accepted,
    /// No credentials were sent.
    Missing,
    /// Credentials were sent but are not valid.
    Invalid,
}

/// The set of accepted bearer tokens.
#[derive(Debug, Clone, Default)]
pub struct BearerTokens {
    tokens: Vec<Vec<u8>>,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl BearerTokens {
    /// Accepts exactly `tokens`.
    pub fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        Self { tokens: tokens.into_iter().map(String::into_bytes).collect() }
    }

    /// Checks a `Proxy-Authorization` value.
    pub fn check(&self, authorization: Option<&str>) -> AuthResult {
        let Some(value) = authorization else {
            return AuthResult::Missing;
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return AuthResult::Invalid;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return AuthResult::Invalid;
        }
        let token = token.trim().as_bytes();
        // Compare against every token so timing does not reveal which one
        // (or whether any) matched early.
        let matched = self.tokens.iter().fold(false, |m, t| m | constant_time_eq(t, token));
        if matched { AuthResult::Accepted } else { AuthResult::Invalid }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_checks() {
        let t = BearerTokens::new(["s3cret".to_string(), "other".to_string()]);
        assert_eq!(t.check(Some("Bearer s3cret")), AuthResult::Accepted);
        assert_eq!(t.check(Some("bearer   other ")), AuthResult::Accepted);
        assert_eq!(t.check(None), AuthResult::Missing);
        assert_eq!(t.check(Some("Bearer s3cre")), AuthResult::Invalid);
        assert_eq!(t.check(Some("Basic czNjcmV0")), AuthResult::Invalid);
        assert_eq!(t.check(Some("s3cret")), AuthResult::Invalid);
        assert_eq!(BearerTokens::default().check(Some("Bearer x")), AuthResult::Invalid);
    }
}

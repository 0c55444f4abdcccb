//! Privacy Pass encodings: relay-proto's (sans-IO, fuzzed there), and the
//! challenge digest, which needs SHA-256.

pub use relay_proto::privacy_pass::*;

/// SHA-256 of a challenge's encoding: the `challenge_digest` a token for
/// it carries (RFC 9577 section 2.2).
pub trait ChallengeDigest {
    /// The digest.
    fn digest(&self) -> [u8; DIGEST_LEN];
}

impl ChallengeDigest for TokenChallenge {
    fn digest(&self) -> [u8; DIGEST_LEN] {
        boring::sha::sha256(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_sha256_of_the_encoding() {
        let c = TokenChallenge {
            token_type: TokenType::BlindRsa,
            issuer_name: "issuer.example".into(),
            redemption_context: Some([7; 32]),
            origin_info: vec!["relay.example".into()],
        };
        assert_eq!(c.digest(), boring::sha::sha256(&c.encode()));
        assert_ne!(c.digest(), TokenChallenge { redemption_context: None, ..c.clone() }.digest());
    }
}

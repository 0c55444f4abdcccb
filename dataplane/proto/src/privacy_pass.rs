//! Privacy Pass encodings (sans-IO; parsed in control, which verifies,
//! and fuzzed here): the TokenChallenge (RFC 9577 section
//! 2.1), the Token (RFC 9577 section 2.2, RFC 9578 sections 5 and 6), the
//! `PrivateToken` credentials of `Proxy-Authorization` and the challenge of
//! `Proxy-Authenticate`.
//!
//! Everything here reads bytes a client chose: every length is checked
//! before it is used and every error is a [`WireError`], never a panic
//! (the tests run the parsers on every truncation and byte change of valid
//! input, and on pseudo-random input).
#![forbid(unsafe_code)]

use crate::base64url::{base64url_decode, base64url_encode};

/// The authentication scheme's name (RFC 9577 section 2; case-insensitive
/// like every scheme, RFC 9110 section 11.1).
pub const SCHEME: &str = "PrivateToken";
/// Bytes of a token's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a token's challenge digest (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// Bytes of a token key ID (SHA-256 of the key's encoding; RFC 9578
/// sections 5.5 and 6.5 set Nid = 32 for both token types).
pub const KEY_ID_LEN: usize = 32;
/// Bytes of a token before its authenticator: the authenticator input
/// `token_type || nonce || challenge_digest || token_key_id`.
pub const AUTH_INPUT_LEN: usize = 2 + NONCE_LEN + DIGEST_LEN + KEY_ID_LEN;
/// Longest issuer name plus origin info a challenge may carry here, so
/// that the `Proxy-Authenticate` value fits the channel's
/// [`crate::channel::record::MAX_CHALLENGE_LEN`].
pub const MAX_NAMES_LEN: usize = 200;

/// A token key ID.
pub type KeyId = [u8; KEY_ID_LEN];

/// The token types this relay verifies (RFC 9578 section 8.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenType {
    /// 0x0001: VOPRF(P-384, SHA-384), privately verifiable: control holds
    /// the issuer's private key (RFC 9578 section 5).
    Voprf,
    /// 0x0002: Blind RSA (2048-bit), publicly verifiable with the issuer's
    /// public key (RFC 9578 section 6).
    BlindRsa,
}

impl TokenType {
    /// The wire value.
    pub fn value(self) -> u16 {
        match self {
            TokenType::Voprf => 0x0001,
            TokenType::BlindRsa => 0x0002,
        }
    }

    /// The type with wire value `v`, if this relay knows it.
    pub fn from_value(v: u16) -> Option<Self> {
        match v {
            0x0001 => Some(TokenType::Voprf),
            0x0002 => Some(TokenType::BlindRsa),
            _ => None,
        }
    }

    /// Nk: bytes of the authenticator (RFC 9578 sections 5.5 and 6.5).
    pub fn authenticator_len(self) -> usize {
        match self {
            TokenType::Voprf => 48,
            TokenType::BlindRsa => 256,
        }
    }

    /// A short name for logs, quota keys and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TokenType::Voprf => "voprf",
            TokenType::BlindRsa => "blind-rsa",
        }
    }
}

/// Why Privacy Pass bytes or fields were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The credentials' scheme is not `PrivateToken`.
    #[error("not a PrivateToken credential")]
    NotPrivateToken,
    /// The auth-param list is not well formed (RFC 9110 section 11.2).
    #[error("malformed auth-params: {0}")]
    Params(&'static str),
    /// No `token` parameter, or more than one.
    #[error("exactly one token parameter is required")]
    TokenParam,
    /// Not base64url (RFC 4648 section 5), with or without padding.
    #[error("not base64url")]
    Base64,
    /// A token of a type this relay does not verify.
    #[error("unsupported token type {0:#06x}")]
    UnknownType(u16),
    /// Bytes too few or too many for the structure.
    #[error("wrong length for {0}")]
    Length(&'static str),
    /// A field outside its range (a redemption context neither empty nor
    /// 32 bytes, names that are not visible ASCII, too long).
    #[error("invalid {0}")]
    Field(&'static str),
}

/// A TokenChallenge (RFC 9577 section 2.1):
///
/// ```text
/// struct {
///     uint16_t token_type;
///     opaque issuer_name<1..2^16-1>;
///     opaque redemption_context<0..32>;
///     opaque origin_info<0..2^16-1>;
/// } TokenChallenge;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenChallenge {
    /// The token type asked for.
    pub token_type: TokenType,
    /// The issuer's name (an ASCII host name, RFC 9577 section 2.1).
    pub issuer_name: String,
    /// Empty, or 32 bytes binding the token to this challenge's window
    /// (section 2.1: a redemption context is either empty or 32 bytes).
    pub redemption_context: Option<[u8; 32]>,
    /// The origins the token is for, joined with `,` on the wire (section
    /// 2.1); empty: any origin of the issuer.
    pub origin_info: Vec<String>,
}

/// Whether `name` may be an issuer name or an origin info entry here:
/// visible ASCII without `,` (which separates origin info entries) or `"`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b',' && b != b'"')
}

impl TokenChallenge {
    /// The encoding whose SHA-256 is a token's `challenge_digest`.
    pub fn encode(&self) -> Vec<u8> {
        let origin = self.origin_info.join(",");
        let mut out = Vec::with_capacity(2 + 2 + self.issuer_name.len() + 1 + 32 + 2 + origin.len());
        out.extend_from_slice(&self.token_type.value().to_be_bytes());
        out.extend_from_slice(&(self.issuer_name.len() as u16).to_be_bytes());
        out.extend_from_slice(self.issuer_name.as_bytes());
        match &self.redemption_context {
            Some(c) => {
                out.push(32);
                out.extend_from_slice(c);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(origin.len() as u16).to_be_bytes());
        out.extend_from_slice(origin.as_bytes());
        out
    }

    /// Decodes a challenge (what clients do; the relay uses it in tests and
    /// the fuzz target, to check [`TokenChallenge::encode`] round-trips).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        let t = r.u16("token_type")?;
        let token_type = TokenType::from_value(t).ok_or(WireError::UnknownType(t))?;
        let name_len = usize::from(r.u16("issuer_name")?);
        let issuer_name = ascii(r.take(name_len, "issuer_name")?, "issuer_name")?;
        if !valid_name(&issuer_name) {
            return Err(WireError::Field("issuer_name"));
        }
        let redemption_context = match r.u8("redemption_context")? {
            0 => None,
            32 => Some(<[u8; 32]>::try_from(r.take(32, "redemption_context")?).expect("32 bytes")),
            _ => return Err(WireError::Field("redemption_context")),
        };
        let origin_len = usize::from(r.u16("origin_info")?);
        let origin = ascii(r.take(origin_len, "origin_info")?, "origin_info")?;
        let origin_info: Vec<String> =
            if origin.is_empty() { Vec::new() } else { origin.split(',').map(str::to_string).collect() };
        if !origin_info.iter().all(|o| valid_name(o)) {
            return Err(WireError::Field("origin_info"));
        }
        if !r.0.is_empty() {
            return Err(WireError::Length("challenge"));
        }
        Ok(Self { token_type, issuer_name, redemption_context, origin_info })
    }
}

fn ascii(b: &[u8], what: &'static str) -> Result<String, WireError> {
    if b.is_ascii() { Ok(String::from_utf8_lossy(b).into_owned()) } else { Err(WireError::Field(what)) }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Length(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// A token (RFC 9577 section 2.2):
///
/// ```text
/// struct {
///     uint16_t token_type;
///     uint8_t nonce[32];
///     uint8_t challenge_digest[32];
///     uint8_t token_key_id[Nid];
///     uint8_t authenticator[Nk];
/// } Token;
/// ```
///
/// Nid and Nk come from the token type, so the whole length does too: a
/// token of any other length is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Its type.
    pub token_type: TokenType,
    /// The client's random nonce: what makes each token single-use.
    pub nonce: [u8; NONCE_LEN],
    /// SHA-256 of the TokenChallenge it was issued for.
    pub challenge_digest: [u8; DIGEST_LEN],
    /// Which issuer key.
    pub token_key_id: KeyId,
    /// The issuer's authenticator over [`Token::auth_input`].
    pub authenticator: Vec<u8>,
    auth_input: [u8; AUTH_INPUT_LEN],
}

impl Token {
    /// Decodes a token.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() < 2 {
            return Err(WireError::Length("token"));
        }
        let t = u16::from_be_bytes([bytes[0], bytes[1]]);
        let token_type = TokenType::from_value(t).ok_or(WireError::UnknownType(t))?;
        if bytes.len() != AUTH_INPUT_LEN + token_type.authenticator_len() {
            return Err(WireError::Length("token"));
        }
        let (input, authenticator) = bytes.split_at(AUTH_INPUT_LEN);
        let field = |from: usize| -> [u8; 32] { input[from..from + 32].try_into().expect("32 bytes") };
        Ok(Self {
            token_type,
            nonce: field(2),
            challenge_digest: field(2 + NONCE_LEN),
            token_key_id: field(2 + NONCE_LEN + DIGEST_LEN),
            authenticator: authenticator.to_vec(),
            auth_input: input.try_into().expect("AUTH_INPUT_LEN bytes"),
        })
    }

    /// The bytes the authenticator covers: `token_type || nonce ||
    /// challenge_digest || token_key_id` (RFC 9578 sections 5.4 and 6.4).
    pub fn auth_input(&self) -> &[u8] {
        &self.auth_input
    }

    /// The encoding (for tests and clients).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.auth_input.to_vec();
        out.extend_from_slice(&self.authenticator);
        out
    }
}

/// Base64url (RFC 4648 section 5) with padding, as `rfc4648`-based clients
/// such as privacypass-ts expect in `challenge` and `token-key`.
pub fn base64url_padded(data: &[u8]) -> String {
    let mut s = base64url_encode(data);
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    s
}

/// Decodes base64url with or without padding (RFC 9577 leaves padding to
/// the encoder; both spellings are in use). Padding, if present, must be
/// exactly what the length needs; the unused bits must be zero.
pub fn base64url_lenient(s: &str) -> Result<Vec<u8>, WireError> {
    let unpadded = s.trim_end_matches('=');
    let pad = s.len() - unpadded.len();
    if pad > 0 && (!s.len().is_multiple_of(4) || pad > 2) {
        return Err(WireError::Base64);
    }
    base64url_decode(unpadded).ok_or(WireError::Base64)
}

/// The `Proxy-Authenticate` value of one challenge (RFC 9577 section 2.1):
/// `PrivateToken challenge="…", token-key="…", max-age=N`, the values
/// quoted because padded base64url is not a `token` (RFC 9110 section
/// 11.2).
pub fn challenge_value(challenge: &TokenChallenge, token_key: &[u8], max_age_secs: Option<u64>) -> String {
    let mut v = format!(
        "{SCHEME} challenge=\"{}\", token-key=\"{}\"",
        base64url_padded(&challenge.encode()),
        base64url_padded(token_key)
    );
    if let Some(age) = max_age_secs {
        v.push_str(&format!(", max-age={age}"));
    }
    v
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The `token` parameter of `PrivateToken` credentials (RFC 9577 section
/// 2.2): `PrivateToken token="<base64url>"`, or unquoted. Parameter names
/// are case-insensitive; unknown parameters (e.g. `extensions` of other
/// token types) are ignored; empty list elements are skipped (RFC 9110
/// section 5.6.1). A value may be a quoted-string or a run of characters
/// up to the next `,` (padded base64url is not a `token`, yet clients send
/// it unquoted).
pub fn token_param(credentials: &str) -> Result<&str, WireError> {
    let value = credentials.trim_matches([' ', '\t']);
    let (scheme, params) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Err(WireError::NotPrivateToken);
    }
    let b = params.as_bytes();
    let mut i = 0;
    let mut token = None;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i == b.len() {
            break;
        }
        if b[i] == b',' {
            i += 1;
            continue;
        }
        let name_start = i;
        while i < b.len() && is_tchar(b[i]) {
            i += 1;
        }
        if i == name_start {
            return Err(WireError::Params("parameter name"));
        }
        let name = &params[name_start..i];
        skip_ws(&mut i);
        if i == b.len() || b[i] != b'=' {
            return Err(WireError::Params("expected '='"));
        }
        i += 1;
        skip_ws(&mut i);
        let value = if i < b.len() && b[i] == b'"' {
            i += 1;
            let start = i;
            while i < b.len() && b[i] != b'"' {
                // Base64url never needs quoted-pairs; refuse them rather
                // than unescape into a copy.
                if b[i] == b'\\' || !(b[i] == b'\t' || b[i] == b' ' || b[i].is_ascii_graphic()) {
                    return Err(WireError::Params("quoted-string"));
                }
                i += 1;
            }
            if i == b.len() {
                return Err(WireError::Params("unterminated quoted-string"));
            }
            let v = &params[start..i];
            i += 1;
            v
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' && b[i] != b' ' && b[i] != b'\t' {
                if !b[i].is_ascii_graphic() || b[i] == b'"' {
                    return Err(WireError::Params("parameter value"));
                }
                i += 1;
            }
            &params[start..i]
        };
        skip_ws(&mut i);
        if i < b.len() && b[i] != b',' {
            return Err(WireError::Params("expected ','"));
        }
        if name.eq_ignore_ascii_case("token") {
            if token.is_some() {
                return Err(WireError::TokenParam);
            }
            token = Some(value);
        }
    }
    token.ok_or(WireError::TokenParam)
}

/// Decodes the token of `PrivateToken` credentials.
pub fn parse_credentials(credentials: &str) -> Result<Token, WireError> {
    Token::decode(&base64url_lenient(token_param(credentials)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge() -> TokenChallenge {
        TokenChallenge {
            token_type: TokenType::BlindRsa,
            issuer_name: "issuer.example".into(),
            redemption_context: Some([7; 32]),
            origin_info: vec!["relay.example".into(), "relay2.example".into()],
        }
    }

    fn token(t: TokenType) -> Token {
        let mut bytes = t.value().to_be_bytes().to_vec();
        bytes.extend((0..AUTH_INPUT_LEN - 2).map(|i| i as u8));
        bytes.extend(vec![0xab; t.authenticator_len()]);
        Token::decode(&bytes).unwrap()
    }

    #[test]
    fn challenge_encoding_is_the_rfc_struct_and_round_trips() {
        let c = challenge();
        let e = c.encode();
        assert_eq!(&e[..4], &[0, 2, 0, 14]);
        assert_eq!(&e[4..18], b"issuer.example");
        assert_eq!(e[18], 32);
        assert_eq!(&e[51..53], &(28u16).to_be_bytes());
        assert_eq!(&e[53..], b"relay.example,relay2.example");
        assert_eq!(TokenChallenge::decode(&e).unwrap(), c);
        let empty = TokenChallenge { redemption_context: None, origin_info: vec![], ..c.clone() };
        let e = empty.encode();
        assert_eq!(e.len(), 2 + 2 + 14 + 1 + 2);
        assert_eq!(TokenChallenge::decode(&e).unwrap(), empty);
    }

    #[test]
    fn bad_challenges_are_errors() {
        let e = challenge().encode();
        for cut in 0..e.len() {
            assert!(TokenChallenge::decode(&e[..cut]).is_err(), "cut {cut}");
        }
        let mut long = e.clone();
        long.push(0);
        assert_eq!(TokenChallenge::decode(&long), Err(WireError::Length("challenge")));
        let mut ctx = e.clone();
        ctx[18] = 16;
        assert_eq!(TokenChallenge::decode(&ctx), Err(WireError::Field("redemption_context")));
        let mut ty = e;
        ty[1] = 9;
        assert_eq!(TokenChallenge::decode(&ty), Err(WireError::UnknownType(9)));
    }

    #[test]
    fn tokens_have_one_length_per_type() {
        for t in [TokenType::Voprf, TokenType::BlindRsa] {
            let tok = token(t);
            let bytes = tok.encode();
            assert_eq!(bytes.len(), AUTH_INPUT_LEN + t.authenticator_len());
            assert_eq!(Token::decode(&bytes).unwrap(), tok);
            assert_eq!(tok.auth_input(), &bytes[..AUTH_INPUT_LEN]);
            assert_eq!(tok.nonce[0], 0);
            assert_eq!(tok.challenge_digest[0], 32);
            assert_eq!(tok.token_key_id[0], 64);
            assert_eq!(Token::decode(&bytes[..bytes.len() - 1]), Err(WireError::Length("token")));
            let mut more = bytes.clone();
            more.push(0);
            assert_eq!(Token::decode(&more), Err(WireError::Length("token")));
        }
        assert_eq!(Token::decode(&[0]), Err(WireError::Length("token")));
        assert_eq!(Token::decode(&[0, 3, 1, 2]), Err(WireError::UnknownType(3)));
    }

    #[test]
    fn credentials_quoted_unquoted_padded_and_with_other_params() {
        let tok = token(TokenType::Voprf);
        let b64 = base64url_encode(&tok.encode());
        let padded = base64url_padded(&tok.encode());
        assert_ne!(b64, padded, "146 bytes need padding");
        for header in [
            format!("PrivateToken token=\"{b64}\""),
            format!("PrivateToken token={b64}"),
            format!("privatetoken   Token = \"{padded}\" "),
            format!("PrivateToken token={padded}"),
            format!("PrivateToken extensions=\"AAAA\", token={b64}"),
            format!("PrivateToken ,token={b64},, foo=bar"),
        ] {
            assert_eq!(parse_credentials(&header), Ok(tok.clone()), "{header}");
        }
    }

    #[test]
    fn garbage_credentials_are_errors() {
        let tok = base64url_encode(&token(TokenType::BlindRsa).encode());
        let cases: Vec<(String, WireError)> = vec![
            ("Bearer abc".into(), WireError::NotPrivateToken),
            ("PrivateTokenX token=a".into(), WireError::NotPrivateToken),
            ("PrivateToken".into(), WireError::TokenParam),
            ("PrivateToken foo=bar".into(), WireError::TokenParam),
            (format!("PrivateToken token={tok}, token={tok}"), WireError::TokenParam),
            ("PrivateToken token".into(), WireError::Params("expected '='")),
            ("PrivateToken =abc".into(), WireError::Params("parameter name")),
            ("PrivateToken token=\"abc".into(), WireError::Params("unterminated quoted-string")),
            ("PrivateToken token=\"a\\\"bc\"".into(), WireError::Params("quoted-string")),
            ("PrivateToken token=a b".into(), WireError::Params("expected ','")),
            ("PrivateToken token=ab\"c".into(), WireError::Params("parameter value")),
            ("PrivateToken token=!!!!".into(), WireError::Base64),
            ("PrivateToken token=AAA===".into(), WireError::Base64),
            ("PrivateToken token=AA=".into(), WireError::Base64),
            ("PrivateToken token=".into(), WireError::Length("token")),
            ("PrivateToken token=AAIA".into(), WireError::Length("token")),
            ("PrivateToken token=AAMA".into(), WireError::UnknownType(3)),
        ];
        for (header, want) in cases {
            assert_eq!(parse_credentials(&header), Err(want), "{header}");
        }
    }

    #[test]
    fn every_truncation_and_change_and_random_input_is_an_answer_not_a_panic() {
        let valid =
            format!("PrivateToken token=\"{}\"", base64url_padded(&token(TokenType::BlindRsa).encode()));
        let challenge = challenge().encode();
        for cut in 0..valid.len() {
            let _ = parse_credentials(&valid[..cut]);
        }
        for cut in 0..challenge.len() {
            let _ = TokenChallenge::decode(&challenge[..cut]);
        }
        for i in 0..valid.len() {
            for b in [b' ', b'"', b',', b'=', b'\\', b'\t', b'A', b'/', b'-'] {
                let mut v = valid.clone().into_bytes();
                v[i] = b;
                let _ = parse_credentials(&String::from_utf8_lossy(&v));
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"PrivateTokn=\", \tAZaz09-_/+";
        for _ in 0..20_000 {
            let len = (next() % 600) as usize;
            let s: String =
                (0..len).map(|_| char::from(alphabet[(next() % alphabet.len() as u64) as usize])).collect();
            let _ = parse_credentials(&format!("PrivateToken {s}"));
            let bytes: Vec<u8> = (0..len % 300).map(|_| next() as u8).collect();
            let _ = TokenChallenge::decode(&bytes);
            let _ = Token::decode(&bytes);
        }
    }

    #[test]
    fn challenge_values_quote_padded_base64url() {
        let v = challenge_value(&challenge(), &[1, 2, 3, 4], Some(60));
        let expect = format!(
            "PrivateToken challenge=\"{}\", token-key=\"AQIDBA==\", max-age=60",
            base64url_padded(&challenge().encode())
        );
        assert_eq!(v, expect);
        assert!(crate::channel::record::valid_challenge(&v));
        assert!(!challenge_value(&challenge(), &[1], None).contains("max-age"));
    }
}

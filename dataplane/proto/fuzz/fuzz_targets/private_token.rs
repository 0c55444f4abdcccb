//! Privacy Pass (RFC 9577, RFC 9578): the `PrivateToken` credentials of a
//! `Proxy-Authorization` field, the Token and TokenChallenge structs and
//! base64url never panic on arbitrary input; whatever decodes encodes back
//! to the same bytes (one encoding per value), and a challenge value the
//! relay builds from a decoded challenge is a valid channel challenge.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::base64url::{base64url_decode, base64url_encode};
use relay_proto::privacy_pass::{
    Token, TokenChallenge, base64url_lenient, challenge_value, parse_credentials, token_param,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = parse_credentials(text) {
            assert_eq!(Token::decode(&token.encode()).expect("re-decodes"), token);
        }
        let _ = token_param(text);
        if let Ok(bytes) = base64url_lenient(text) {
            assert_eq!(base64url_lenient(&base64url_encode(&bytes)).expect("re-decodes"), bytes);
        }
        if let Some(bytes) = base64url_decode(text) {
            assert_eq!(base64url_encode(&bytes), text, "strict base64url has one encoding");
        }
    }
    if let Ok(token) = Token::decode(data) {
        assert_eq!(token.encode(), data);
        assert_eq!(token.auth_input(), &data[..token.auth_input().len()]);
    }
    if let Ok(challenge) = TokenChallenge::decode(data) {
        assert_eq!(challenge.encode(), data);
        if challenge.issuer_name.len() + challenge.origin_info.iter().map(|o| o.len() + 1).sum::<usize>()
            <= relay_proto::privacy_pass::MAX_NAMES_LEN
            && relay_proto::privacy_pass::valid_name(&challenge.issuer_name)
            && challenge.origin_info.iter().all(|o| relay_proto::privacy_pass::valid_name(o))
        {
            let value = challenge_value(&challenge, &[0x30; 300], Some(60));
            assert!(relay_proto::channel::record::valid_challenge(&value), "{value}");
        }
    }
});

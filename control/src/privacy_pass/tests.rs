//! The verifier's rules, with tokens made here: a type 2 authenticator is
//! a plain RSASSA-PSS signature over the authenticator input (blinding
//! changes nothing the verifier sees), a type 1 authenticator the PRF
//! output, which the key's holder computes directly. Tokens from an
//! independent implementation are in `keys::tests` and the end-to-end test.

use std::sync::OnceLock;

use boring::hash::MessageDigest;
use boring::pkey::{PKey, Private};
use boring::rsa::Rsa;
use boring::sign::Signer;
use voprf::VoprfServer;

use super::wire::{AUTH_INPUT_LEN, ChallengeDigest, Token, base64url_padded};
use super::*;

const T0: u64 = 1_800_000_000;
const W: u64 = 3600;
const VOPRF_SECRET: [u8; 48] = [3; 48];

/// The SPKI of an RSA key with the id-RSASSA-PSS OID and the parameters
/// RFC 9578 section 6.5 fixes (the AlgorithmIdentifier privacypass-ts
/// writes, then the RSAPublicKey).
pub(crate) fn pss_spki(rsa: &Rsa<Private>) -> Vec<u8> {
    const ALG: [u8; 63] = [
        0x30, 0x3d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30, 0x30, 0xa0, 0x0d,
        0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0xa1, 0x1a, 0x30, 0x18,
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0b, 0x06, 0x09, 0x60, 0x86,
        0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0xa2, 0x03, 0x02, 0x01, 0x30,
    ];
    let public = rsa.public_key_to_der_pkcs1().unwrap();
    assert_eq!(public.len(), 270, "a 2048-bit key with e = 65537");
    let mut out = vec![0x30, 0x82, 0x01, 0x52];
    out.extend(ALG);
    out.extend([0x03, 0x82, 0x01, 0x0f, 0x00]);
    out.extend(public);
    out
}

struct RsaIssuer {
    private: PKey<Private>,
    spki: Vec<u8>,
}

fn rsa_issuers() -> &'static [RsaIssuer; 2] {
    static KEYS: OnceLock<[RsaIssuer; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let make = || {
            let rsa = Rsa::generate(2048).unwrap();
            let spki = pss_spki(&rsa);
            RsaIssuer { private: PKey::from_rsa(rsa).unwrap(), spki }
        };
        [make(), make()]
    })
}

fn entry(key: IssuerKey, not_before: u64, not_after: Option<u64>) -> KeyEntry {
    KeyEntry { key: Arc::new(key), not_before, not_after, source: KeySource::Config }
}

fn settings(window_secs: u64) -> Settings {
    Settings {
        issuer_name: "issuer.example".into(),
        origin_info: vec!["relay.example".into()],
        window_secs,
        max_spent: 100,
    }
}

fn verifier(window_secs: u64) -> PrivacyPass {
    let mut pp = PrivacyPass::new(settings(window_secs));
    let keys = vec![
        entry(IssuerKey::blind_rsa(&rsa_issuers()[0].spki).unwrap(), 0, None),
        entry(IssuerKey::voprf(&VOPRF_SECRET).unwrap(), 0, None),
    ];
    pp.install(KeySource::Config, keys).unwrap();
    pp
}

/// Credentials for `challenge` under issuer key `rsa` (type 2) or the VOPRF
/// key (type 1), with `nonce`.
fn credentials(challenge: &TokenChallenge, rsa: Option<&RsaIssuer>, nonce: u8) -> String {
    let t = if rsa.is_some() { TokenType::BlindRsa } else { TokenType::Voprf };
    let key_id = match rsa {
        Some(r) => boring::sha::sha256(&r.spki),
        None => *IssuerKey::voprf(&VOPRF_SECRET).unwrap().key_id(),
    };
    let mut input = t.value().to_be_bytes().to_vec();
    input.extend([nonce; 32]);
    input.extend(challenge.digest());
    input.extend(key_id);
    assert_eq!(input.len(), AUTH_INPUT_LEN);
    let authenticator = match rsa {
        Some(r) => {
            let mut s = Signer::new(MessageDigest::sha384(), &r.private).unwrap();
            s.set_rsa_padding(boring::rsa::Padding::PKCS1_PSS).unwrap();
            s.set_rsa_pss_saltlen(boring::sign::RsaPssSaltlen::custom(48)).unwrap();
            s.set_rsa_mgf1_md(MessageDigest::sha384()).unwrap();
            s.update(&input).unwrap();
            s.sign_to_vec().unwrap()
        }
        None => VoprfServer::<p384::NistP384>::new_with_key(&VOPRF_SECRET)
            .unwrap()
            .evaluate(&input)
            .unwrap()
            .to_vec(),
    };
    let mut bytes = input;
    bytes.extend(authenticator);
    format!("PrivateToken token=\"{}\"", base64url_padded(&bytes))
}

/// The challenge the verifier sends now for `t`, read back from its header:
/// the challenge, the token key and max-age.
fn challenge_of(pp: &PrivacyPass, t: TokenType, now: u64) -> (TokenChallenge, Vec<u8>, Option<u64>) {
    let values = pp.challenges(now);
    for v in &values {
        let attr = |name: &str| -> Option<String> {
            let start = v.find(&format!("{name}="))? + name.len() + 1;
            let rest = &v[start..];
            let end = rest.find(',').unwrap_or(rest.len());
            Some(rest[..end].trim_matches('"').to_string())
        };
        let bytes = wire::base64url_lenient(&attr("challenge").unwrap()).unwrap();
        let challenge = TokenChallenge::decode(&bytes).unwrap();
        if challenge.token_type == t {
            let key = wire::base64url_lenient(&attr("token-key").unwrap()).unwrap();
            return (challenge, key, attr("max-age").map(|a| a.parse().unwrap()));
        }
    }
    panic!("no {t:?} challenge in {values:?}")
}

/// For other modules' tests: a verifier with a type 2 and a type 1 key
/// (at most `max_spent` spent tokens), and credentials for its current
/// type 2 challenge with `nonce`.
pub(crate) fn verifier_and_token(max_spent: usize, now: u64, nonce: u8) -> (PrivacyPass, String) {
    let mut pp = PrivacyPass::new(Settings { max_spent, ..settings(W) });
    let keys = vec![entry(IssuerKey::blind_rsa(&rsa_issuers()[0].spki).unwrap(), 0, None)];
    pp.install(KeySource::Config, keys).unwrap();
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, now);
    let cred = credentials(&c, Some(&rsa_issuers()[0]), nonce);
    (pp, cred)
}

/// Credentials for `pp`'s current type 2 challenge with `nonce`.
pub(crate) fn token_for(pp: &PrivacyPass, now: u64, nonce: u8) -> String {
    let (c, _, _) = challenge_of(pp, TokenType::BlindRsa, now);
    credentials(&c, Some(&rsa_issuers()[0]), nonce)
}

#[test]
fn challenges_name_the_issuer_origin_window_and_key_of_each_type() {
    let pp = verifier(W);
    let values = pp.challenges(T0 + 10);
    assert_eq!(values.len(), 2);
    assert!(values.iter().all(|v| v.starts_with("PrivateToken challenge=\"")));
    assert!(values.iter().all(|v| relay_proto::channel::record::valid_challenge(v)), "{values:?}");
    let (c2, key2, age) = challenge_of(&pp, TokenType::BlindRsa, T0 + 10);
    assert_eq!(c2.issuer_name, "issuer.example");
    assert_eq!(c2.origin_info, ["relay.example"]);
    assert!(c2.redemption_context.is_some());
    assert_eq!(key2, rsa_issuers()[0].spki);
    // T0 + 10 lies in window T0 / W; the challenge holds through the next.
    assert_eq!(age, Some((T0 / W + 2) * W - (T0 + 10)));
    let (c1, key1, _) = challenge_of(&pp, TokenType::Voprf, T0 + 10);
    assert_eq!(key1.len(), 49);
    assert_eq!(c1.redemption_context, c2.redemption_context, "one context per window");
    // The next window has another context; no windows: the empty context, no max-age.
    let (next, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0 + W);
    assert_ne!(next.redemption_context, c2.redemption_context);
    let (empty, _, age) = challenge_of(&verifier(0), TokenType::BlindRsa, T0);
    assert_eq!((empty.redemption_context, age), (None, None));
    // Another start, another secret: its challenges differ.
    assert_ne!(challenge_of(&verifier(W), TokenType::BlindRsa, T0 + 10).0, c2);
}

#[test]
fn a_token_is_accepted_once_and_names_its_key() {
    let mut pp = verifier(W);
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0);
    let cred = credentials(&c, Some(&rsa_issuers()[0]), 1);
    let r = pp.redeem(&cred, T0).unwrap();
    assert_eq!(r.token_type, TokenType::BlindRsa);
    assert_eq!(r.key_id, boring::sha::sha256(&rsa_issuers()[0].spki));
    assert_eq!(r.quota_key(), format!("pp:blind-rsa:{}", hex(&r.key_id[..8])));
    assert_eq!(pp.redeem(&cred, T0 + 1), Err(Refusal::Replayed));
    // Type 1, verified with the private key.
    let (c1, _, _) = challenge_of(&pp, TokenType::Voprf, T0);
    let r1 = pp.redeem(&credentials(&c1, None, 2), T0).unwrap();
    assert_eq!(r1.token_type, TokenType::Voprf);
    assert_eq!(pp.redeem(&credentials(&c1, None, 2), T0), Err(Refusal::Replayed));
    // The same nonce under another key or type is a replay too.
    assert_eq!(pp.redeem(&credentials(&c1, None, 1), T0), Err(Refusal::Replayed));
    assert_eq!(pp.stats(T0).redeemed, 2);
    assert_eq!(pp.stats(T0).spent_held, 2);
}

#[test]
fn tokens_for_other_challenges_are_refused() {
    let mut pp = verifier(W);
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0);
    let rsa = Some(&rsa_issuers()[0]);
    let other_origin = TokenChallenge { origin_info: vec!["other.example".into()], ..c.clone() };
    let other_issuer = TokenChallenge { issuer_name: "evil.example".into(), ..c.clone() };
    let no_context = TokenChallenge { redemption_context: None, ..c.clone() };
    let other_context = TokenChallenge { redemption_context: Some([1; 32]), ..c.clone() };
    for (i, wrong) in [other_origin, other_issuer, no_context, other_context].iter().enumerate() {
        assert_eq!(pp.redeem(&credentials(wrong, rsa, 10 + i as u8), T0), Err(Refusal::WrongChallenge));
    }
    // A type 2 token for the type 1 challenge (same context).
    let (c1, _, _) = challenge_of(&pp, TokenType::Voprf, T0);
    assert_eq!(pp.redeem(&credentials(&c1, rsa, 20), T0), Err(Refusal::WrongChallenge));
    // Refused tokens are not spent: the right one with a used nonce works.
    assert!(pp.redeem(&credentials(&c, rsa, 10), T0).is_ok());
    // Another verifier (another start, another secret) refuses it.
    let mut restarted = verifier(W);
    assert_eq!(restarted.redeem(&credentials(&c, rsa, 11), T0), Err(Refusal::WrongChallenge));
}

#[test]
fn windows_the_current_and_previous_are_accepted_then_pruned() {
    let mut pp = verifier(W);
    let rsa = Some(&rsa_issuers()[0]);
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0);
    assert!(pp.redeem(&credentials(&c, rsa, 1), T0).is_ok());
    // One window later it is still good, two later it is not.
    assert!(pp.redeem(&credentials(&c, rsa, 2), T0 + W).is_ok());
    assert_eq!(pp.redeem(&credentials(&c, rsa, 3), T0 + 2 * W), Err(Refusal::WrongChallenge));
    assert_eq!(pp.stats(T0).spent_held, 2);
    assert_eq!(pp.prune(T0 + W), 0, "the previous window is still redeemable");
    assert_eq!(pp.prune(T0 + 2 * W), 2);
    assert_eq!(pp.stats(T0).spent_held, 0);
}

#[test]
fn redemptions_drop_what_can_no_longer_be_redeemed_on_their_own() {
    let (mut pp, first) = verifier_and_token(2, T0, 1);
    assert!(pp.redeem(&first, T0).is_ok());
    assert!(pp.redeem(&token_for(&pp, T0, 2), T0).is_ok());
    assert_eq!(pp.redeem(&token_for(&pp, T0, 3), T0), Err(Refusal::StoreFull));
    // Two windows on, the old nonces cannot be redeemed any more (their
    // challenge is not accepted): the full store makes room by itself.
    let later = T0 + 2 * W;
    assert!(pp.redeem(&token_for(&pp, later, 3), later).is_ok());
    assert_eq!(pp.stats(later).spent_held, 1);
}

#[test]
fn unknown_expired_and_retired_keys_are_refused() {
    let mut pp = verifier(W);
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0);
    // A key the relay never had.
    assert_eq!(pp.redeem(&credentials(&c, Some(&rsa_issuers()[1]), 1), T0), Err(Refusal::UnknownKey));
    // A key with an end.
    let keys = vec![
        entry(IssuerKey::blind_rsa(&rsa_issuers()[0].spki).unwrap(), 0, Some(T0 + 5)),
        entry(IssuerKey::voprf(&VOPRF_SECRET).unwrap(), 0, None),
    ];
    pp.install(KeySource::Config, keys).unwrap();
    assert!(pp.redeem(&credentials(&c, Some(&rsa_issuers()[0]), 2), T0 + 4).is_ok());
    assert_eq!(pp.redeem(&credentials(&c, Some(&rsa_issuers()[0]), 3), T0 + 5), Err(Refusal::ExpiredKey));
    assert_eq!(pp.challenges(T0 + 5).len(), 1, "an expired key is not advertised");
    assert!(pp.challenges(T0 + 4)[0].ends_with(", max-age=1"), "max-age stops at the key's end");
    // A key taken away (a directory that dropped it): expired, not unknown.
    pp.install(KeySource::Config, vec![entry(IssuerKey::voprf(&VOPRF_SECRET).unwrap(), 0, None)]).unwrap();
    assert_eq!(pp.redeem(&credentials(&c, Some(&rsa_issuers()[0]), 4), T0), Err(Refusal::ExpiredKey));
    // No type 2 key at all now.
    assert_eq!(pp.challenges(T0).len(), 1);
}

#[test]
fn rotation_advertises_the_newest_key_and_accepts_both() {
    let mut pp = PrivacyPass::new(settings(W));
    let [old, new] = rsa_issuers();
    let directory = |key: &RsaIssuer, not_before| KeyEntry {
        source: KeySource::Directory,
        ..entry(IssuerKey::blind_rsa(&key.spki).unwrap(), not_before, None)
    };
    pp.install(KeySource::Directory, vec![directory(old, T0 - 100), directory(new, T0 + 50)]).unwrap();
    assert_eq!(challenge_of(&pp, TokenType::BlindRsa, T0).1, old.spki);
    assert_eq!(challenge_of(&pp, TokenType::BlindRsa, T0 + 50).1, new.spki);
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0 + 50);
    assert_eq!(pp.redeem(&credentials(&c, Some(new), 1), T0), Err(Refusal::UnknownKey), "not yet in force");
    assert!(pp.redeem(&credentials(&c, Some(new), 1), T0 + 50).is_ok());
    assert!(pp.redeem(&credentials(&c, Some(old), 2), T0 + 50).is_ok());
    assert_eq!(
        pp.install(KeySource::Config, vec![entry(IssuerKey::blind_rsa(&old.spki).unwrap(), 0, None)]),
        Err(InstallError::Duplicate(hex(&boring::sha::sha256(&old.spki))))
    );
}

#[test]
fn garbage_bad_authenticators_and_a_full_store() {
    let mut pp = PrivacyPass::new(Settings { max_spent: 2, ..settings(W) });
    pp.install(
        KeySource::Config,
        vec![entry(IssuerKey::blind_rsa(&rsa_issuers()[0].spki).unwrap(), 0, None)],
    )
    .unwrap();
    for garbage in
        ["", "PrivateToken", "PrivateToken token=\u{1}", "PrivateToken token=\"AAIA\"", "Basic abc"]
    {
        assert!(matches!(pp.redeem(garbage, T0), Err(Refusal::Malformed(_))), "{garbage:?}");
    }
    let (c, _, _) = challenge_of(&pp, TokenType::BlindRsa, T0);
    let (c1, _, _) = (TokenChallenge { token_type: TokenType::Voprf, ..c.clone() }, 0, 0);
    assert_eq!(pp.redeem(&credentials(&c1, None, 9), T0), Err(Refusal::UnsupportedType));
    let good = credentials(&c, Some(&rsa_issuers()[0]), 1);
    let mut bytes = wire::base64url_lenient(good.split('"').nth(1).unwrap()).unwrap();
    *bytes.last_mut().unwrap() ^= 0x55;
    let forged = format!("PrivateToken token={}", base64url_padded(&bytes));
    assert_eq!(pp.redeem(&forged, T0), Err(Refusal::BadAuthenticator));
    assert!(pp.redeem(&good, T0).is_ok(), "the forged token spent nothing");
    assert!(pp.redeem(&credentials(&c, Some(&rsa_issuers()[0]), 2), T0).is_ok());
    assert_eq!(pp.redeem(&credentials(&c, Some(&rsa_issuers()[0]), 3), T0), Err(Refusal::StoreFull));
    assert_eq!(Refusal::StoreFull.client_details(), "spent-token store full");
    let _ = Token::decode(&bytes).unwrap();
}

//! Issuer keys and token verification.
//!
//! * Type 0x0002 (Blind RSA, RFC 9578 section 6): the issuer's public key
//!   as a DER SubjectPublicKeyInfo with the id-RSASSA-PSS OID and
//!   parameters SHA-384, MGF1-SHA-384, salt 48 (section 6.5: "The SPKI
//!   object MUST use the RSASSA-PSS OID"), a 2048-bit modulus (Nk = 256).
//!   The token key ID is SHA-256 of exactly those bytes, so they are kept
//!   as given (a re-encoding could differ, e.g. in NULL hash parameters).
//!   The authenticator is an RSASSA-PSS signature (SHA-384, MGF1-SHA-384,
//!   salt 48) over the token's authenticator input (section 6.4), verified
//!   by BoringSSL.
//! * Type 0x0001 (VOPRF(P-384, SHA-384), RFC 9578 section 5): control
//!   holds the issuer's private key (the scalar, 48 bytes) and verifies by
//!   evaluating the PRF on the authenticator input (`voprf`'s
//!   `VoprfServer::evaluate`, RFC 9497's VerifyFinalize) and comparing in
//!   constant time. The token key is the public key's compressed encoding
//!   (SerializeElement, 49 bytes); its ID the SHA-256 of that.
//!
//! The ASN.1 framing is parsed by RustCrypto's `spki` and `pkcs1`; no RSA
//! or OPRF arithmetic is written here.
#![forbid(unsafe_code)]

use boring::bn::BigNum;
use boring::hash::MessageDigest;
use boring::pkey::{PKey, Public};
use boring::rsa::{Padding, Rsa};
use boring::sign::{RsaPssSaltlen, Verifier};
use p384::NistP384;
use pkcs1::der::Decode;
use spki::ObjectIdentifier;
use voprf::{Group, VoprfServer};

use super::wire::{KeyId, Token, TokenType};

/// id-RSASSA-PSS (RFC 4055 section 3.1).
const ID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
/// rsaEncryption: named in the error for the common mistake.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// id-sha384.
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
/// id-mgf1.
const ID_MGF1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.8");
/// The salt length of type 2 tokens (the SHA-384 output length).
const PSS_SALT_LEN: u8 = 48;
/// Bytes of a VOPRF(P-384) private key.
pub const VOPRF_SECRET_LEN: usize = 48;

/// Why an issuer key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a DER SubjectPublicKeyInfo.
    #[error("not a DER SubjectPublicKeyInfo: {0}")]
    Spki(String),
    /// An rsaEncryption key: RFC 9578 section 6.5 wants id-RSASSA-PSS.
    #[error(
        "the key is rsaEncryption; type 2 token keys are SPKIs with the id-RSASSA-PSS OID \
         (SHA-384, MGF1-SHA-384, salt 48), RFC 9578 section 6.5"
    )]
    RsaEncryption,
    /// Another algorithm.
    #[error("the key's algorithm {0} is not id-RSASSA-PSS")]
    Algorithm(String),
    /// PSS parameters other than SHA-384, MGF1-SHA-384, salt 48.
    #[error("RSASSA-PSS parameters must be SHA-384, MGF1-SHA-384, salt length 48: {0}")]
    PssParams(String),
    /// Not a 2048-bit RSA public key.
    #[error("type 2 token keys are 2048-bit RSA keys: {0}")]
    Rsa(String),
    /// Not a VOPRF(P-384) private key.
    #[error("not a VOPRF(P-384) private key: {0}")]
    Voprf(String),
}

/// How a key verifies tokens.
enum Verify {
    BlindRsa(PKey<Public>),
    Voprf(Box<VoprfServer<NistP384>>),
}

/// One issuer key.
pub struct IssuerKey {
    token_type: TokenType,
    key_id: KeyId,
    token_key: Vec<u8>,
    verify: Verify,
}

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The VOPRF key is a secret; the ID names the key.
        f.debug_struct("IssuerKey")
            .field("token_type", &self.token_type)
            .field("key_id", &super::hex(&self.key_id[..8]))
            .finish_non_exhaustive()
    }
}

impl IssuerKey {
    /// A type 2 key from its SPKI (DER, id-RSASSA-PSS).
    pub fn blind_rsa(spki_der: &[u8]) -> Result<Self, KeyError> {
        let spki =
            spki::SubjectPublicKeyInfoRef::from_der(spki_der).map_err(|e| KeyError::Spki(e.to_string()))?;
        if spki.algorithm.oid == RSA_ENCRYPTION {
            return Err(KeyError::RsaEncryption);
        }
        if spki.algorithm.oid != ID_RSASSA_PSS {
            return Err(KeyError::Algorithm(spki.algorithm.oid.to_string()));
        }
        let params = spki.algorithm.parameters.ok_or_else(|| KeyError::PssParams("absent".into()))?;
        let params =
            params.decode_as::<pkcs1::RsaPssParams<'_>>().map_err(|e| KeyError::PssParams(e.to_string()))?;
        let mgf_hash = params.mask_gen.parameters.as_ref().map(|p| p.oid);
        if params.hash.oid != ID_SHA384
            || params.mask_gen.oid != ID_MGF1
            || mgf_hash != Some(ID_SHA384)
            || params.salt_len != PSS_SALT_LEN
            || params.trailer_field != pkcs1::TrailerField::BC
        {
            return Err(KeyError::PssParams(format!(
                "hash {}, mgf {} with {:?}, salt {}",
                params.hash.oid, params.mask_gen.oid, mgf_hash, params.salt_len
            )));
        }
        let bits = spki.subject_public_key.as_bytes().ok_or_else(|| KeyError::Rsa("unused bits".into()))?;
        let rsa = pkcs1::RsaPublicKey::from_der(bits).map_err(|e| KeyError::Rsa(e.to_string()))?;
        let n = rsa.modulus.as_bytes();
        if n.len() != TokenType::BlindRsa.authenticator_len() || n[0] & 0x80 == 0 {
            return Err(KeyError::Rsa(format!("a {}-byte modulus", n.len())));
        }
        let bn = |b: &[u8]| BigNum::from_slice(b).map_err(|e| KeyError::Rsa(e.to_string()));
        let key = Rsa::from_public_components(bn(n)?, bn(rsa.public_exponent.as_bytes())?)
            .and_then(PKey::from_rsa)
            .map_err(|e| KeyError::Rsa(e.to_string()))?;
        Ok(Self {
            token_type: TokenType::BlindRsa,
            key_id: boring::sha::sha256(spki_der),
            token_key: spki_der.to_vec(),
            verify: Verify::BlindRsa(key),
        })
    }

    /// A type 1 key from the issuer's private key (the P-384 scalar,
    /// big-endian, 48 bytes).
    pub fn voprf(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() != VOPRF_SECRET_LEN {
            return Err(KeyError::Voprf(format!("{} bytes, not {VOPRF_SECRET_LEN}", secret.len())));
        }
        let server =
            VoprfServer::<NistP384>::new_with_key(secret).map_err(|e| KeyError::Voprf(e.to_string()))?;
        let token_key = <NistP384 as Group>::serialize_elem(server.get_public_key()).to_vec();
        Ok(Self {
            token_type: TokenType::Voprf,
            key_id: boring::sha::sha256(&token_key),
            token_key,
            verify: Verify::Voprf(Box::new(server)),
        })
    }

    /// The token type it verifies.
    pub fn token_type(&self) -> TokenType {
        self.token_type
    }

    /// The token key ID (SHA-256 of [`IssuerKey::token_key`]).
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The public key as challenges carry it in `token-key`: the SPKI
    /// (type 2) or the compressed public element (type 1).
    pub fn token_key(&self) -> &[u8] {
        &self.token_key
    }

    /// Whether `token`'s authenticator is valid under this key. The caller
    /// has matched the type and key ID.
    pub fn verify(&self, token: &Token) -> bool {
        if token.token_type != self.token_type || token.token_key_id != self.key_id {
            return false;
        }
        match &self.verify {
            Verify::BlindRsa(key) => verify_pss(key, token.auth_input(), &token.authenticator),
            Verify::Voprf(server) => match server.evaluate(token.auth_input()) {
                Ok(out) => {
                    out.len() == token.authenticator.len()
                        && boring::memcmp::eq(&out[..], &token.authenticator)
                }
                Err(_) => false,
            },
        }
    }
}

/// RSASSA-PSS verification with SHA-384, MGF1-SHA-384 and a 48-byte salt.
fn verify_pss(key: &PKey<Public>, message: &[u8], signature: &[u8]) -> bool {
    let verify = || -> Result<bool, boring::error::ErrorStack> {
        let mut v = Verifier::new(MessageDigest::sha384(), key)?;
        v.set_rsa_padding(Padding::PKCS1_PSS)?;
        v.set_rsa_pss_saltlen(RsaPssSaltlen::custom(i32::from(PSS_SALT_LEN)))?;
        v.set_rsa_mgf1_md(MessageDigest::sha384())?;
        v.verify_oneshot(signature, message)
    };
    verify().unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::privacy_pass::wire::{AUTH_INPUT_LEN, ChallengeDigest, TokenChallenge};

    /// A type 2 key pair and a token privacypass-ts 0.8.1 made for a
    /// challenge of this relay (`bench/privacypass/pp.mjs`): an
    /// independent implementation's token as a known answer.
    pub(crate) mod vector {
        include!("testdata/blind_rsa_vector.rs");
    }

    #[test]
    fn a_token_from_an_independent_issuer_verifies_and_any_change_fails() {
        let spki = crate::privacy_pass::wire::base64url_lenient(vector::TOKEN_KEY).unwrap();
        let key = IssuerKey::blind_rsa(&spki).unwrap();
        assert_eq!(key.token_type(), TokenType::BlindRsa);
        let challenge =
            TokenChallenge::decode(&crate::privacy_pass::wire::base64url_lenient(vector::CHALLENGE).unwrap())
                .unwrap();
        let token = crate::privacy_pass::wire::parse_credentials(vector::CREDENTIALS).unwrap();
        assert_eq!(&token.token_key_id, key.key_id());
        assert_eq!(token.challenge_digest, challenge.digest());
        assert!(key.verify(&token));
        for at in [2, 5, 40, 70, AUTH_INPUT_LEN + 3, AUTH_INPUT_LEN + 255] {
            let mut bytes = token.encode();
            bytes[at] ^= 1;
            let changed = Token::decode(&bytes).unwrap();
            assert!(!key.verify(&changed), "byte {at}");
        }
    }

    #[test]
    fn keys_that_are_not_rfc_9578_type_2_keys_are_refused() {
        let spki = crate::privacy_pass::wire::base64url_lenient(vector::TOKEN_KEY).unwrap();
        assert!(matches!(IssuerKey::blind_rsa(&spki[..spki.len() - 1]), Err(KeyError::Spki(_))));
        assert!(matches!(IssuerKey::blind_rsa(b"garbage"), Err(KeyError::Spki(_))));
        // The same key as rsaEncryption (what OpenSSL writes by default).
        let rsa = boring::rsa::Rsa::generate(2048).unwrap();
        let enc = PKey::from_rsa(rsa).unwrap().public_key_to_der().unwrap();
        assert_eq!(IssuerKey::blind_rsa(&enc).unwrap_err(), KeyError::RsaEncryption);
        // An EC key.
        let group = boring::ec::EcGroup::from_curve_name(boring::nid::Nid::X9_62_PRIME256V1).unwrap();
        let ec = PKey::from_ec_key(boring::ec::EcKey::generate(&group).unwrap()).unwrap();
        assert!(matches!(
            IssuerKey::blind_rsa(&ec.public_key_to_der().unwrap()),
            Err(KeyError::Algorithm(_))
        ));
        // PSS with salt 32: find the salt's INTEGER (a2 03 02 01 30) and change it.
        let at = spki.windows(5).position(|w| w == [0xa2, 0x03, 0x02, 0x01, 0x30]).unwrap();
        let mut salt = spki.clone();
        salt[at + 4] = 0x20;
        assert!(matches!(IssuerKey::blind_rsa(&salt), Err(KeyError::PssParams(_))));
    }

    #[test]
    fn voprf_keys_evaluate_and_refuse_wrong_authenticators() {
        let secret: Vec<u8> = (1..=48).collect();
        let key = IssuerKey::voprf(&secret).unwrap();
        assert_eq!(key.token_key().len(), 49);
        assert_eq!(key.key_id(), &boring::sha::sha256(key.token_key()));
        let mut bytes = TokenType::Voprf.value().to_be_bytes().to_vec();
        bytes.extend([9u8; 32]);
        bytes.extend([8u8; 32]);
        bytes.extend(key.key_id());
        let input = bytes.clone();
        let server = VoprfServer::<NistP384>::new_with_key(&secret).unwrap();
        bytes.extend(server.evaluate(&input).unwrap());
        let token = Token::decode(&bytes).unwrap();
        assert!(key.verify(&token));
        let mut wrong = bytes.clone();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(!key.verify(&Token::decode(&wrong).unwrap()));
        assert!(matches!(IssuerKey::voprf(&secret[..47]), Err(KeyError::Voprf(_))));
        assert!(matches!(IssuerKey::voprf(&[0; 48]), Err(KeyError::Voprf(_))), "zero scalar");
    }
}

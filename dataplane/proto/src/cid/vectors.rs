//! The test vectors of draft-ietf-quic-load-balancers-21, byte for byte:
//! Appendix B ("Load Balancer Test Vectors") and the encryption example of
//! section 5.4.2.4.
//!
//! Source: the draft's markdown in the QUIC working group's repository,
//! <https://github.com/quicwg/load-balancers>, file
//! `draft-ietf-quic-load-balancers.md` at the revision whose change log
//! tops out at "since draft-ietf-quic-load-balancers-20" (that is, -21);
//! the same tables are in the published -21 at
//! <https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#appendix-B>.
//! "In all cases, the server is configured to encode the CID length."
//!
//! Two rows of the draft are inconsistent as printed, and are handled as
//! follows rather than silently "fixed":
//!
//! - Unencrypted, `cr_bits` 1: `sid 350d28b420 nonce 3487d970b cid
//!   20a350d28b4203487d970b`. The nonce has nine hex digits (not whole
//!   octets), and no octet-aligned reading puts that server ID after the
//!   first octet of that CID (`0x20` would also self-describe a 1-byte CID).
//!   It cannot be checked byte for byte and is not used; the unencrypted
//!   algorithm is covered by row 0 and by round trips at every length.
//! - Encrypted, `cr_bits` 3: its CID starts `0x12`, whose config rotation
//!   bits are 0, not 3 (its length bits, 18, are right). The config
//!   rotation bits are not an input to the encryption, so the 18 encrypted
//!   octets are checked as printed, with codepoint 0 (reproducing the CID
//!   exactly) and with codepoint 3 (first octet `0x72`, same ciphertext).
#![forbid(unsafe_code)]

use super::lb::{LbDecoder, Unroutable};
use super::{CidCodec, CidKey, CidLayout, Decoded, LbConfig, Protection};

/// "The key for all of these examples is 8f95f09245765f80256934e50c66207f."
const APPENDIX_B_KEY: &str = "8f95f09245765f80256934e50c66207f";

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "{s}");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn key(s: &str) -> CidKey {
    CidKey::new(hex(s).try_into().unwrap())
}

/// One row: `cr_bits sid nonce cid`. Encodes with a [`CidCodec`] and
/// checks the CID byte for byte, then decodes it as a load balancer (with
/// and without the self-described length check) and as the codec.
fn check_row(cr_bits: u8, sid: &str, nonce: &str, key: Option<CidKey>, cid: &str) -> LbConfig {
    let (sid, nonce, cid) = (hex(sid), hex(nonce), hex(cid));
    let config = LbConfig::new(cr_bits, sid.len(), nonce.len(), key).unwrap();
    let codec = CidCodec::new(config);
    let got = codec.encode(&sid, &nonce).unwrap();
    assert_eq!(got.as_bytes(), &cid[..], "cr_bits {cr_bits}: {got:?}");
    for lb in [LbDecoder::new(config), LbDecoder::new(config).check_self_described_length(true)] {
        assert_eq!(lb.server_id(&cid).unwrap().as_bytes(), &sid[..], "cr_bits {cr_bits}");
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        assert_eq!(lb.route_datagram(&short).unwrap().as_bytes(), &sid[..]);
        let mut long = vec![0xc0, 0, 0, 0, 1, cid.len() as u8];
        long.extend_from_slice(&cid);
        assert_eq!(lb.route_datagram(&long).unwrap().as_bytes(), &sid[..]);
    }
    let plain = codec.decode(&cid).unwrap();
    assert_eq!(plain.server_id().as_bytes(), &sid[..]);
    assert_eq!(plain.nonce(), &nonce[..]);
    config
}

/// Appendix B.1, row 0.
#[test]
fn appendix_b_unencrypted() {
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#appendix-B.1
    //# cr_bits sid nonce cid
    //# 0 c4605e 4504cc4f 07c4605e4504cc4f
    let config = check_row(0, "c4605e", "4504cc4f", None, "07c4605e4504cc4f");
    assert_eq!(config.protection(), Protection::Plaintext);
}

/// Appendix B.2, row 0: a 7-octet block, four passes with the nibble split.
#[test]
fn appendix_b_encrypted_four_pass_odd() {
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#appendix-B.2
    //# 0 ed793a ee080dbf 0720b1d07b359d3c
    let config = check_row(0, "ed793a", "ee080dbf", Some(key(APPENDIX_B_KEY)), "0720b1d07b359d3c");
    assert_eq!(config.protection(), Protection::FourPass);
}

/// Appendix B.2, row 1: the server ID (10 octets) is longer than the nonce
/// (5), so a load balancer needs the fourth decryption pass.
#[test]
fn appendix_b_encrypted_four_pass_long_server_id() {
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#appendix-B.2
    //# 1 ed793a51d49b8f5fab65 ee080dbf48
    //#                          2fcc381bc74cb4fbad2823a3d1f8fed2
    let config = check_row(
        1,
        "ed793a51d49b8f5fab65",
        "ee080dbf48",
        Some(key(APPENDIX_B_KEY)),
        "2fcc381bc74cb4fbad2823a3d1f8fed2",
    );
    assert_eq!(config.protection(), Protection::FourPass);
}

/// Appendix B.2, row 2: 8 + 8 octets, the single-pass special case.
#[test]
fn appendix_b_encrypted_single_pass() {
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#appendix-B.2
    //# 2 ed793a51d49b8f5f ee080dbf48c0d1e5
    //#                          504dd2d05a7b0de9b2b9907afb5ecf8cc3
    let config = check_row(
        2,
        "ed793a51d49b8f5f",
        "ee080dbf48c0d1e5",
        Some(key(APPENDIX_B_KEY)),
        "504dd2d05a7b0de9b2b9907afb5ecf8cc3",
    );
    assert_eq!(config.protection(), Protection::SinglePass);
}

/// Appendix B.2, row 3: 9 + 9 octets, four passes on an even block. The
/// printed first octet (0x12) has config rotation bits 0 although the row
/// says 3; see the module docs.
#[test]
fn appendix_b_encrypted_four_pass_even() {
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#appendix-B.2
    //# 3 ed793a51d49b8f5fab ee080dbf48c0d1e55d
    //#                          125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc
    let (sid, nonce) = ("ed793a51d49b8f5fab", "ee080dbf48c0d1e55d");
    let printed = "125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc";
    let config = check_row(0, sid, nonce, Some(key(APPENDIX_B_KEY)), printed);
    assert_eq!(config.protection(), Protection::FourPass);
    // With codepoint 3 only the first octet differs.
    let with_3 = format!("72{}", &printed[2..]);
    let config_3 = check_row(3, sid, nonce, Some(key(APPENDIX_B_KEY)), &with_3);
    // A balancer configured for codepoint 3 finds no configuration for the
    // printed CID's codepoint 0.
    assert_eq!(LbDecoder::new(config_3).server_id(&hex(printed)), Err(Unroutable::UnknownConfig(0)));
    assert_eq!(config.first_octet(), 0x12);
}

/// The encryption example of section 5.4.2.4 as a whole CID (its steps are
/// checked one by one beside the cipher).
#[test]
fn section_5_4_2_4_encryption_example() {
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.4
    //# server_id = 0x31441a
    //# nonce = 0x9c69c275
    //# key = 0xfdf726a9893ec05c0632d3956680baf0
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.4
    //# cid = first_octet || left_2 || right_2 = 0x0767947d29be054a
    check_row(0, "31441a", "9c69c275", Some(key("fdf726a9893ec05c0632d3956680baf0")), "0767947d29be054a");
}

/// The relay's own layout, with the worker byte as the first nonce octet,
/// reproduces the vectors whose nonce leaves it four random octets: the
/// worker is `0xee`, the first octet of every vector nonce.
#[test]
fn the_relay_layout_reproduces_the_vectors_it_can_express() {
    for (cr, sid, nonce, cid) in [
        (1, "ed793a51d49b8f5fab65", "ee080dbf48", "2fcc381bc74cb4fbad2823a3d1f8fed2"),
        (2, "ed793a51d49b8f5f", "ee080dbf48c0d1e5", "504dd2d05a7b0de9b2b9907afb5ecf8cc3"),
        (0, "ed793a51d49b8f5fab", "ee080dbf48c0d1e55d", "125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"),
    ] {
        let (sid, nonce, cid) = (hex(sid), hex(nonce), hex(cid));
        let config = LbConfig::new(cr, sid.len(), nonce.len(), Some(key(APPENDIX_B_KEY))).unwrap();
        let layout = CidLayout::from_lb_config(&config, &sid).unwrap();
        let got = layout.generate(nonce[0], &nonce[1..]).unwrap();
        assert_eq!(got.as_bytes(), &cid[..], "cr_bits {cr}");
        assert_eq!(layout.decode(&cid), Decoded::Worker(0xee));
        assert_eq!(layout.steerable(), None);
    }
    // The draft's shortest nonces (4 octets) leave the relay too few random
    // octets after the worker byte.
    let config = LbConfig::new(0, 3, 4, Some(key(APPENDIX_B_KEY))).unwrap();
    assert!(CidLayout::from_lb_config(&config, &hex("ed793a")).is_err());
}

//! The QUIC-LB block encryption of draft-ietf-quic-load-balancers-21
//! section 5.4: the server ID and nonce ("the plaintext block", 5 to 19
//! octets) are encrypted in place, with one AES-128-ECB pass when they fill
//! exactly 16 octets (section 5.4.1) and otherwise with the four-round
//! Feistel network of section 5.4.2, whose round function is AES-128-ECB
//! over an expanded half. Decryption is the inverse (section 5.5).
//!
//! AES itself is RustCrypto's `aes` crate; nothing here touches the block
//! cipher's internals.
#![forbid(unsafe_code)]

use aes::Aes128;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use super::config::{CidKey, KEY_LEN, MAX_BLOCK_LEN};

/// Longest half of a four-pass block: half of 19 octets, rounded up.
const MAX_HALF: usize = MAX_BLOCK_LEN.div_ceil(2);

/// Shortest block the four-pass algorithm takes.
//= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.2
//# The 'length' argument MUST NOT exceed 19 and MUST NOT be less than 5.
const MIN_FOUR_PASS_LEN: usize = 5;

/// One half of a four-pass block (`left_n` or `right_n`); only the first
/// `half_len` octets are used.
type Half = [u8; MAX_HALF];

/// An expanded QUIC-LB key, ready to encrypt and decrypt plaintext blocks.
/// `Clone` copies the AES round keys (no allocation); `Debug` never shows
/// them.
#[derive(Clone)]
pub(crate) struct CidCipher {
    aes: Aes128,
}

impl std::fmt::Debug for CidCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CidCipher(..)")
    }
}

impl CidCipher {
    /// The cipher for `key`.
    pub(crate) fn new(key: &CidKey) -> Self {
        Self { aes: Aes128::new(&Array::from(*key.as_bytes())) }
    }

    /// Encrypts a plaintext block (server ID then nonce, 5..=19 octets) in
    /// place.
    ///
    /// # Panics
    ///
    /// If the block is not 5..=19 octets long; [`super::LbConfig`] never
    /// allows another length.
    pub(crate) fn encrypt(&self, block: &mut [u8]) {
        if let Ok(single) = <&mut [u8; KEY_LEN]>::try_from(&mut *block) {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.1
            //# All connection ID octets except the
            //# first form an AES-ECB block. This block is encrypted once, and the result forms
            //# the second through seventeenth most significant bytes of the connection ID.
            let mut b = Array::from(*single);
            self.aes.encrypt_block(&mut b);
            single.copy_from_slice(&b);
            return;
        }
        let f = Feistel::new(block.len());
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.3
        //# 2. The server splits plaintext_CID into components left_0 and right_0 of equal
        //# length half_len. If plaintext_len is odd, right_0 clears its first four bits,
        //# and left_0 clears its last four bits.
        let (mut left, mut right) = f.split(block);
        // Steps 3 to 5: right_1 = right_0 ^ truncate(AES(expand(len, 1, left_0))).
        self.round(&f, 1, &left, &mut right);
        f.clear_first_bits(&mut right);
        // Steps 6 and 7: left_1 = left_0 ^ truncate(AES(expand(len, 2, right_1))).
        self.round(&f, 2, &right, &mut left);
        f.clear_last_bits(&mut left);
        // Steps 8 and 9: right_2 = right_1 ^ truncate(AES(expand(len, 3, left_1))).
        self.round(&f, 3, &left, &mut right);
        f.clear_first_bits(&mut right);
        // Steps 10 and 11: left_2 = left_1 ^ truncate(AES(expand(len, 4, right_2))).
        self.round(&f, 4, &right, &mut left);
        f.clear_last_bits(&mut left);
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.3
        //# 12. The server concatenates left_2 with right_2 to form the ciphertext CID,
        //# which it appends to the first octet.
        f.join(&left, &right, block);
    }

    /// Decrypts a ciphertext block (5..=19 octets) in place.
    ///
    /// # Panics
    ///
    /// As [`encrypt`](Self::encrypt).
    #[cfg(test)]
    pub(crate) fn decrypt(&self, block: &mut [u8]) {
        self.decrypt_prefix(block, block.len());
    }

    /// Decrypts at least the first `need` octets of a ciphertext block in
    /// place; octets from `need` on are unspecified unless the whole block
    /// was decrypted. A load balancer needs only the server ID: when it
    /// lies within the first half, the four-pass algorithm stops after
    /// three passes.
    ///
    /// # Panics
    ///
    /// As [`encrypt`](Self::encrypt).
    pub(crate) fn decrypt_prefix(&self, block: &mut [u8], need: usize) {
        if let Ok(single) = <&mut [u8; KEY_LEN]>::try_from(&mut *block) {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5.1
            //# If server ID length and nonce length sum to exactly 16 octets, they form a
            //# ciphertext block. The load balancer decrypts the block using the AES-ECB key
            //# and extracts the server ID from the most significant bytes of the resulting
            //# plaintext.
            let mut b = Array::from(*single);
            self.aes.decrypt_block(&mut b);
            single.copy_from_slice(&b);
            return;
        }
        let f = Feistel::new(block.len());
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5.2
        //# First, split the ciphertext CID (excluding the first octet) into its equal-
        //# length components left_2 and right_2.
        let (mut left, mut right) = f.split(block);
        // left_1 = left_2 ^ truncate(AES(expand(len, 4, right_2)))
        self.round(&f, 4, &right, &mut left);
        f.clear_last_bits(&mut left);
        // right_1 = right_2 ^ truncate(AES(expand(len, 3, left_1))). The
        // draft's pseudocode clears the first bits of left_1 here, a slip:
        // the half just computed is right_1, and only clearing its first
        // four bits inverts step 9 of the encryption.
        self.round(&f, 3, &left, &mut right);
        f.clear_first_bits(&mut right);
        // left_0 = left_1 ^ truncate(AES(expand(len, 2, right_1)))
        self.round(&f, 2, &right, &mut left);
        f.clear_last_bits(&mut left);
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.5.2
        //# As the load balancer has no need for the nonce, it can conclude after 3 passes
        //# as long as the server ID is entirely contained in left_0 (i.e., the nonce is at
        //# least as large as the server ID). If the server ID is longer, a fourth pass
        //# is necessary
        if need > f.whole_left_octets() {
            // right_0 = right_1 ^ truncate(AES(expand(len, 1, left_0)))
            self.round(&f, 1, &left, &mut right);
            f.clear_first_bits(&mut right);
            f.join(&left, &right, block);
        } else {
            // Only left_0's whole octets are plaintext; the rest is zeroed
            // rather than left half-decrypted.
            let whole = f.whole_left_octets();
            block[..whole].copy_from_slice(&left[..whole]);
            block[whole..].fill(0);
        }
    }

    /// One Feistel pass: `target ^= truncate(AES(expand(len, pass,
    /// source)), half_len)`.
    fn round(&self, f: &Feistel, pass: u8, source: &Half, target: &mut Half) {
        let mut b = Array::from(f.expand(pass, source));
        self.aes.encrypt_block(&mut b);
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.2
        //# Similarly, truncate(input, n) returns the first n octets of 'input'.
        for (t, r) in target[..f.half_len].iter_mut().zip(b.iter()) {
            *t ^= r;
        }
    }
}

/// The length bookkeeping of the four-pass algorithm for one block length.
struct Feistel {
    /// `plaintext_len`: server ID plus nonce, 5..=19 and not 16.
    len: usize,
    /// `half_len`: `len / 2` rounded up.
    half_len: usize,
    /// Whether `len` is odd: the middle octet is split between the halves
    /// by nibble.
    odd: bool,
}

impl Feistel {
    fn new(len: usize) -> Self {
        assert!(
            (MIN_FOUR_PASS_LEN..=MAX_BLOCK_LEN).contains(&len) && len != KEY_LEN,
            "QUIC-LB four-pass block of {len} octets (5..=19, not 16)"
        );
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.2
        //# Let 'half_len' be equal to 'plaintext_len' / 2, rounded up.
        Self { len, half_len: len.div_ceil(2), odd: len % 2 == 1 }
    }

    /// Octets of the left half that are whole plaintext octets: all of it
    /// for an even length, all but the shared middle octet for an odd one.
    fn whole_left_octets(&self) -> usize {
        self.len / 2
    }

    /// `left_n` is the first `half_len` octets, `right_n` the last; for an
    /// odd length both hold the middle octet, left its high nibble and
    /// right its low one.
    fn split(&self, block: &[u8]) -> (Half, Half) {
        let mut left = [0u8; MAX_HALF];
        let mut right = [0u8; MAX_HALF];
        left[..self.half_len].copy_from_slice(&block[..self.half_len]);
        right[..self.half_len].copy_from_slice(&block[self.len - self.half_len..]);
        self.clear_last_bits(&mut left);
        self.clear_first_bits(&mut right);
        (left, right)
    }

    /// Writes `left || right` back, merging the nibbles of the middle octet
    /// for an odd length.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.3
    //# If plaintext_len is odd, the four
    //# least significant bits of left_2 and four most significant bits of right_2,
    //# which are all zero, are stripped off before concatenation to make the
    //# resulting ciphertext the same length as the original plaintext.
    fn join(&self, left: &Half, right: &Half, block: &mut [u8]) {
        let h = self.half_len;
        if self.odd {
            block[..h - 1].copy_from_slice(&left[..h - 1]);
            block[h - 1] = (left[h - 1] & 0xf0) | (right[0] & 0x0f);
            block[h..].copy_from_slice(&right[1..h]);
        } else {
            block[..h].copy_from_slice(&left[..h]);
            block[h..].copy_from_slice(&right[..h]);
        }
    }

    /// For an odd length, clears the last four bits of a left half.
    fn clear_last_bits(&self, left: &mut Half) {
        if self.odd {
            left[self.half_len - 1] &= 0xf0;
        }
    }

    /// For an odd length, clears the first four bits of a right half.
    fn clear_first_bits(&self, right: &mut Half) {
        if self.odd {
            right[0] &= 0x0f;
        }
    }

    /// `expand(plaintext_len, pass, half)`: the half in the most
    /// significant octets, zeros, then the length and the pass number.
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.2
    //# ExpandResult {
    //#      input_bytes(...),
    //#      ZeroPad(...),
    //#      length(8),
    //#      pass(8)
    //# }
    fn expand(&self, pass: u8, half: &Half) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        out[..self.half_len].copy_from_slice(&half[..self.half_len]);
        // len <= 19 fits the octet.
        out[KEY_LEN - 2] = self.len as u8;
        out[KEY_LEN - 1] = pass;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn key(s: &str) -> CidKey {
        CidKey::new(hex(s).try_into().unwrap())
    }

    fn half(s: &str) -> Half {
        let mut h = [0u8; MAX_HALF];
        let b = hex(s);
        h[..b.len()].copy_from_slice(&b);
        h
    }

    /// The draft's example of `expand` (section 5.4.2.2).
    #[test]
    fn expand_matches_the_drafts_example() {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.2
        //# expand(0x06, 0x02, 0xaaba3c) = 0xaaba3c00000000000000000000000602
        let f = Feistel::new(6);
        assert_eq!(f.expand(2, &half("aaba3c")).to_vec(), hex("aaba3c00000000000000000000000602"));
    }

    /// The split example of step 2 (section 5.4.2.3).
    #[test]
    fn odd_blocks_split_the_middle_octet_by_nibble() {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.3
        //# For example, 0x7040b81b55ccf3 would split
        //# into a left_0 of 0x7040b810 and right_0 of 0x0b55ccf3.
        let f = Feistel::new(7);
        let (l, r) = f.split(&hex("7040b81b55ccf3"));
        assert_eq!(&l[..4], &hex("7040b810")[..]);
        assert_eq!(&r[..4], &hex("0b55ccf3")[..]);
        let mut back = [0u8; 7];
        f.join(&l, &r, &mut back);
        assert_eq!(back.to_vec(), hex("7040b81b55ccf3"));
    }

    /// The draft's encryption example (section 5.4.2.4), step by step:
    /// every AES input and output and every half, then the whole CID.
    ///
    /// The draft's step 10 XORs left_1 with `0xb3e4357c`, a typo for the
    /// first four octets of the AES output it lists (`0xb334357c...`); its
    /// stated left_2 (`0x67947d2c`) and final CID follow from the output,
    /// and so does this test.
    #[test]
    fn four_pass_matches_the_drafts_encryption_example_step_by_step() {
        let c = CidCipher::new(&key("fdf726a9893ec05c0632d3956680baf0"));
        let f = Feistel::new(7);
        // Step 1 and 2.
        let (l0, r0) = f.split(&hex("31441a9c69c275"));
        assert_eq!(f.half_len, 4);
        assert_eq!(&l0[..4], &hex("31441a90")[..]);
        assert_eq!(&r0[..4], &hex("0c69c275")[..]);
        let aes = |input: [u8; 16]| {
            let mut b = Array::from(input);
            c.aes.encrypt_block(&mut b);
            b.to_vec()
        };
        // Step 3.
        assert_eq!(f.expand(1, &l0).to_vec(), hex("31441a90000000000000000000000701"));
        assert_eq!(aes(f.expand(1, &l0)), hex("a255dd8cdacf01948d3a848c3c7fee23"));
        // Steps 4 and 5.
        let mut r1 = r0;
        c.round(&f, 1, &l0, &mut r1);
        assert_eq!(&r1[..4], &hex("ae3c1ff9")[..]);
        f.clear_first_bits(&mut r1);
        assert_eq!(&r1[..4], &hex("0e3c1ff9")[..]);
        // Steps 6 and 7.
        assert_eq!(f.expand(2, &r1).to_vec(), hex("0e3c1ff9000000000000000000000702"));
        assert_eq!(aes(f.expand(2, &r1)), hex("e5e452cb9e1bedb0b2bf830506bf4c4e"));
        let mut l1 = l0;
        c.round(&f, 2, &r1, &mut l1);
        assert_eq!(&l1[..4], &hex("d4a0485b")[..]);
        f.clear_last_bits(&mut l1);
        assert_eq!(&l1[..4], &hex("d4a04850")[..]);
        // Steps 8 and 9.
        assert_eq!(f.expand(3, &l1).to_vec(), hex("d4a04850000000000000000000000703"));
        assert_eq!(aes(f.expand(3, &l1)), hex("b7821ab3024fed0913b6a04d18e3216f"));
        let mut r2 = r1;
        c.round(&f, 3, &l1, &mut r2);
        assert_eq!(&r2[..4], &hex("b9be054a")[..]);
        f.clear_first_bits(&mut r2);
        assert_eq!(&r2[..4], &hex("09be054a")[..]);
        // Steps 10 and 11.
        assert_eq!(f.expand(4, &r2).to_vec(), hex("09be054a000000000000000000000704"));
        assert_eq!(aes(f.expand(4, &r2)), hex("b334357cfdf81e3fafe180154eaf7378"));
        let mut l2 = l1;
        c.round(&f, 4, &r2, &mut l2);
        assert_eq!(&l2[..4], &hex("67947d2c")[..]);
        f.clear_last_bits(&mut l2);
        assert_eq!(&l2[..4], &hex("67947d20")[..]);
        // Step 12: cid = first_octet || left_2 || right_2 = 0x0767947d29be054a.
        let mut block = hex("31441a9c69c275");
        c.encrypt(&mut block);
        assert_eq!(block, hex("67947d29be054a"));
        c.decrypt(&mut block);
        assert_eq!(block, hex("31441a9c69c275"));
    }

    /// FIPS-197 appendix C.1's AES-128 vector through the single pass.
    #[test]
    fn single_pass_is_plain_aes_128() {
        let c = CidCipher::new(&key("000102030405060708090a0b0c0d0e0f"));
        let mut block = hex("00112233445566778899aabbccddeeff");
        c.encrypt(&mut block);
        assert_eq!(block, hex("69c4e0d86a7b0430d8cdb78070b4c55a"));
        c.decrypt(&mut block);
        assert_eq!(block, hex("00112233445566778899aabbccddeeff"));
    }

    #[test]
    fn every_length_round_trips_and_prefixes_decrypt_early() {
        let c = CidCipher::new(&key("8f95f09245765f80256934e50c66207f"));
        for len in 5..=19 {
            for seed in 0..64u8 {
                let plain: Vec<u8> =
                    (0..len as u8).map(|i| i.wrapping_mul(37).wrapping_add(seed.wrapping_mul(101))).collect();
                let mut block = plain.clone();
                c.encrypt(&mut block);
                assert_eq!(block.len(), len);
                assert_ne!(block, plain, "len {len}");
                let mut back = block.clone();
                c.decrypt(&mut back);
                assert_eq!(back, plain, "len {len}");
                for need in 0..=len {
                    let mut part = block.clone();
                    c.decrypt_prefix(&mut part, need);
                    assert_eq!(part[..need], plain[..need], "len {len} need {need}");
                }
            }
        }
    }

    #[test]
    fn a_one_bit_change_changes_the_server_id_octets() {
        // Both halves feed every output octet after four passes: flipping
        // any plaintext bit changes the ciphertext's leading octets.
        let c = CidCipher::new(&key("8f95f09245765f80256934e50c66207f"));
        for len in 5..=19 {
            let base = vec![0x5a; len];
            let mut enc_base = base.clone();
            c.encrypt(&mut enc_base);
            for bit in 0..len * 8 {
                let mut p = base.clone();
                p[bit / 8] ^= 0x80 >> (bit % 8);
                c.encrypt(&mut p);
                assert_ne!(p[..4], enc_base[..4], "len {len} bit {bit}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "four-pass block of 4 octets")]
    fn blocks_outside_the_drafts_lengths_are_refused() {
        let c = CidCipher::new(&key("8f95f09245765f80256934e50c66207f"));
        c.encrypt(&mut [0u8; 4]);
    }

    #[test]
    fn debug_hides_the_round_keys() {
        let c = CidCipher::new(&key("8f95f09245765f80256934e50c66207f"));
        assert_eq!(format!("{c:?}"), "CidCipher(..)");
    }
}

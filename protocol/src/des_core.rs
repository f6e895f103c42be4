//! The DES block cipher (FIPS 46-3) and TDES in EDE mode (ANSI X9.52 / NIST SP 800-67), written
//! for speed on the gateway's hot path.
//!
//! Why not the `des` crate: it computes the E expansion and the P permutation bit by bit in every
//! round; a TR-31 version B wrap needs about 23 TDES blocks, which cost ~0.65 µs each with it.
//! This core folds each S-box with P into one 64-entry table (the classic "SP" formulation), takes
//! the E expansion as eight rotations of the right half, and does IP and FP once per TDES block
//! (they cancel between the three DES stages). The tables are computed at compile time from the
//! standard's own tables below, so there are no hand-transcribed derived constants to get wrong.
//! Correctness is checked by the known-answer tests here, every TDES vector of the project (IPEK,
//! KCV, TR-31 B) and a differential property test against the `des` crate.
//!
//! Like the `des` crate, this is a table-lookup implementation: the S-box lookups are indexed by
//! key-dependent data, so it is not hardened against cache-timing attacks by a process sharing the
//! CPU. The key schedule is zeroized on drop.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Initial permutation: output bit `j` (1-based, MSB first) is input bit `IP[j - 1]`.
const IP: [u8; 64] = [
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4, //
    62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8, //
    57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3, //
    61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
];

/// Permutation P of the round function (32 bits to 32 bits).
const P: [u8; 32] = [
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10, //
    2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25,
];

/// Permuted choice 1: the 56 key bits (parity bits dropped) as C (first 28) and D (last 28).
const PC1: [u8; 56] = [
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, //
    10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36, //
    63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, //
    14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4,
];

/// Permuted choice 2: the 48-bit round key from the 56 bits of C and D.
const PC2: [u8; 48] = [
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, //
    23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2, //
    41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, //
    44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
];

/// Left rotations of C and D before each round.
const SHIFTS: [u32; 16] = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1];

/// The eight S-boxes as printed in the standard: row (outer bits b1 b6), then column (b2..b5).
const S: [[[u8; 16]; 4]; 8] = [
    [
        [14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7],
        [0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8],
        [4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0],
        [15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13],
    ],
    [
        [15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10],
        [3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5],
        [0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15],
        [13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9],
    ],
    [
        [10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8],
        [13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1],
        [13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7],
        [1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12],
    ],
    [
        [7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15],
        [13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9],
        [10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4],
        [3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14],
    ],
    [
        [2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9],
        [14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6],
        [4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14],
        [11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3],
    ],
    [
        [12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11],
        [10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8],
        [9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6],
        [4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13],
    ],
    [
        [4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1],
        [13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6],
        [1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2],
        [6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12],
    ],
    [
        [13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7],
        [1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2],
        [7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8],
        [2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11],
    ],
];

/// Bit `n` (1-based, counted from the most significant of `width` bits) of `value`.
const fn bit(value: u64, width: u32, n: u8) -> u64 {
    (value >> (width - n as u32)) & 1
}

/// Applies a permutation table: output bit `j` of `table.len()` bits is input bit `table[j - 1]`
/// of `in_width` bits. Used at compile time only.
const fn permute(value: u64, in_width: u32, table: &[u8]) -> u64 {
    let mut out = 0u64;
    let mut j = 0;
    while j < table.len() {
        out = (out << 1) | bit(value, in_width, table[j]);
        j += 1;
    }
    out
}

/// Where each output bit of an ordinary permutation goes: output bit `j` (1-based) of `N` bits
/// at bit position `N - j` of the result, that is most significant first.
const fn msb_first<const N: usize>() -> [u8; N] {
    let mut positions = [0u8; N];
    let mut j = 0;
    while j < N {
        positions[j] = (N - 1 - j) as u8;
        j += 1;
    }
    positions
}

/// Where PC-2's 48 output bits go in a round key as [`f`] consumes it: bit `j` belongs to S-box
/// group `g = (j - 1) / 6`; the even groups 0, 2, 4, 6 fill bits 29..24, 21..16, 13..8 and 5..0
/// of the high word, the odd groups 1, 3, 5, 7 the same bits of the low word.
const fn round_key_positions() -> [u8; 48] {
    let mut positions = [0u8; 48];
    let mut j = 0;
    while j < 48 {
        let group = j / 6;
        let offset = j % 6;
        let word = if group % 2 == 0 { 32 } else { 0 };
        positions[j] = (word + 24 - 8 * (group / 2) + (5 - offset)) as u8;
        j += 1;
    }
    positions
}

/// Applies a bit selection: output bit `positions[j]` is input bit `sources[j]` (1-based, most
/// significant first, of `in_width` bits). Used at compile time only.
const fn scatter(value: u64, in_width: u32, sources: &[u8], positions: &[u8]) -> u64 {
    let mut out = 0u64;
    let mut j = 0;
    while j < sources.len() {
        out |= bit(value, in_width, sources[j]) << positions[j];
        j += 1;
    }
    out
}

/// A bit selection of `in_width` bits as one lookup per input nibble: entry `[i][n]` is the
/// output for nibble value `n` at nibble position `i` (most significant first), every other
/// input bit zero. The selection of a value is the OR of its nibbles' entries. Nibbles rather
/// than bytes keep every table of this module in the L1 cache (about 10 KiB in all).
const fn nibble_tables<const NIBBLES: usize>(in_width: u32, sources: &[u8], positions: &[u8]) -> [[u64; 16]; NIBBLES] {
    let mut out = [[0u64; 16]; NIBBLES];
    let mut i = 0;
    while i < NIBBLES {
        let mut n = 0;
        while n < 16 {
            let shift = in_width - 4 * (i as u32 + 1);
            out[i][n] = scatter((n as u64) << shift, in_width, sources, positions);
            n += 1;
        }
        i += 1;
    }
    out
}

/// The inverse of IP, which is FP.
const fn inverse_ip() -> [u8; 64] {
    let mut fp = [0u8; 64];
    let mut j = 0;
    while j < 64 {
        fp[IP[j] as usize - 1] = j as u8 + 1;
        j += 1;
    }
    fp
}

const FP: [u8; 64] = inverse_ip();
static IP_TABLE: [[u64; 16]; 16] = nibble_tables::<16>(64, &IP, &msb_first::<64>());
static FP_TABLE: [[u64; 16]; 16] = nibble_tables::<16>(64, &FP, &msb_first::<64>());
static PC1_TABLE: [[u64; 16]; 16] = nibble_tables::<16>(64, &PC1, &msb_first::<56>());
static PC2_TABLE: [[u64; 16]; 14] = nibble_tables::<14>(56, &PC2, &round_key_positions());

/// `SP[i][v]`: S-box `i` applied to the 6-bit input `v` (b1 most significant), its 4-bit output
/// placed in nibble `i` of the 32-bit word, then P applied.
static SP: [[u32; 64]; 8] = {
    let mut sp = [[0u32; 64]; 8];
    let mut i = 0;
    while i < 8 {
        let mut v = 0;
        while v < 64 {
            let row = ((v >> 4) & 2) | (v & 1);
            let column = (v >> 1) & 15;
            let nibble = (S[i][row][column] as u64) << (28 - 4 * i);
            sp[i][v] = permute(nibble, 32, &P) as u32;
            v += 1;
        }
        i += 1;
    }
    sp
};

/// Applies a permutation given as nibble tables to the low `4 * NIBBLES` bits of `value`.
fn apply<const NIBBLES: usize>(tables: &[[u64; 16]; NIBBLES], value: u64) -> u64 {
    let mut out = 0;
    for (i, table) in tables.iter().enumerate() {
        out |= table[((value >> (4 * (NIBBLES - 1 - i))) & 0xF) as usize];
    }
    out
}

/// The sixteen round keys of one DES key, each laid out as [`f`] consumes it (see
/// [`round_key_positions`]).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct DesSchedule {
    rounds: [u64; 16],
}

impl DesSchedule {
    pub(crate) fn new(key: &[u8; 8]) -> Self {
        let mut cd = apply(&PC1_TABLE, u64::from_be_bytes(*key));
        let mask = (1u64 << 28) - 1;
        let mut rounds = [0u64; 16];
        for (round, shift) in rounds.iter_mut().zip(SHIFTS) {
            let (c, d) = (cd >> 28, cd & mask);
            let c = ((c << shift) | (c >> (28 - shift))) & mask;
            let d = ((d << shift) | (d >> (28 - shift))) & mask;
            cd = (c << 28) | d;
            *round = apply(&PC2_TABLE, cd);
        }
        cd.zeroize();
        Self { rounds }
    }
}

/// The round function f(R, K): E expansion, key mix, S-boxes and P. S-box group `i` of E(R) is
/// R's bits 4i .. 4i+5 (1-based, bit 0 being bit 32), which R rotated right by 27 - 4i puts in
/// the low six bits: the even groups are bytes of R rotated right by 3, the odd ones bytes of R
/// rotated left by 1.
#[inline(always)]
fn f(r: u32, k: u64) -> u32 {
    let even = r.rotate_right(3) ^ (k >> 32) as u32;
    let odd = r.rotate_left(1) ^ k as u32;
    SP[0][((even >> 24) & 0x3F) as usize]
        ^ SP[2][((even >> 16) & 0x3F) as usize]
        ^ SP[4][((even >> 8) & 0x3F) as usize]
        ^ SP[6][(even & 0x3F) as usize]
        ^ SP[1][((odd >> 24) & 0x3F) as usize]
        ^ SP[3][((odd >> 16) & 0x3F) as usize]
        ^ SP[5][((odd >> 8) & 0x3F) as usize]
        ^ SP[7][(odd & 0x3F) as usize]
}

/// The index of round `i`'s key: backwards for decryption.
#[inline(always)]
fn key_index(i: usize, reverse: bool) -> usize {
    if reverse {
        15 - i
    } else {
        i
    }
}

/// Sixteen rounds on the halves after IP; returns them swapped, as the preoutput block R16 L16.
#[inline(always)]
fn rounds((mut l, mut r): (u32, u32), keys: &[u64; 16], reverse: bool) -> (u32, u32) {
    for i in (0..16).step_by(2) {
        l ^= f(r, keys[key_index(i, reverse)]);
        r ^= f(l, keys[key_index(i + 1, reverse)]);
    }
    (r, l)
}

/// [`rounds`] on two independent blocks at once: DES is a chain of dependent table lookups, so
/// one block leaves the CPU idle most of the time; two interleaved blocks cost little more.
#[inline(always)]
fn rounds2(
    (mut l, mut r): (u32, u32),
    (mut l2, mut r2): (u32, u32),
    keys: &[u64; 16],
    keys2: &[u64; 16],
    reverse: bool,
) -> ((u32, u32), (u32, u32)) {
    for i in (0..16).step_by(2) {
        l ^= f(r, keys[key_index(i, reverse)]);
        l2 ^= f(r2, keys2[key_index(i, reverse)]);
        r ^= f(l, keys[key_index(i + 1, reverse)]);
        r2 ^= f(l2, keys2[key_index(i + 1, reverse)]);
    }
    ((r, l), (r2, l2))
}

fn ip(block: &[u8; 8]) -> (u32, u32) {
    let x = apply(&IP_TABLE, u64::from_be_bytes(*block));
    ((x >> 32) as u32, x as u32)
}

fn fp((l, r): (u32, u32)) -> [u8; 8] {
    apply(&FP_TABLE, (u64::from(l) << 32) | u64::from(r)).to_be_bytes()
}

impl DesSchedule {
    pub(crate) fn encrypt(&self, block: &mut [u8; 8]) {
        *block = fp(rounds(ip(block), &self.rounds, false));
    }

    #[cfg(test)]
    pub(crate) fn decrypt(&self, block: &mut [u8; 8]) {
        *block = fp(rounds(ip(block), &self.rounds, true));
    }
}

/// A scheduled TDES key (EDE): two-key TDES has K3 = K1.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct TdesSchedule {
    k1: DesSchedule,
    k2: DesSchedule,
    k3: DesSchedule,
}

impl TdesSchedule {
    /// Schedules a 16-byte (K1 K2) or 24-byte (K1 K2 K3) key; `None` for any other length.
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        let part = |i: usize| -> Option<DesSchedule> {
            let bytes: &[u8; 8] = key.get(8 * i..8 * i + 8)?.try_into().ok()?;
            Some(DesSchedule::new(bytes))
        };
        match key.len() {
            16 => {
                let k1 = part(0)?;
                Some(Self { k3: k1.clone(), k2: part(1)?, k1 })
            }
            24 => Some(Self { k1: part(0)?, k2: part(1)?, k3: part(2)? }),
            _ => None,
        }
    }

    /// E(K3, D(K2, E(K1, block))), with IP and FP once: FP then IP between stages cancel.
    pub(crate) fn encrypt(&self, block: &mut [u8; 8]) {
        let s = rounds(ip(block), &self.k1.rounds, false);
        let s = rounds(s, &self.k2.rounds, true);
        *block = fp(rounds(s, &self.k3.rounds, false));
    }

    /// D(K1, E(K2, D(K3, block))).
    pub(crate) fn decrypt(&self, block: &mut [u8; 8]) {
        let s = rounds(ip(block), &self.k3.rounds, true);
        let s = rounds(s, &self.k2.rounds, false);
        *block = fp(rounds(s, &self.k1.rounds, true));
    }

    /// Encrypts two independent blocks, `a` under `self` and `b` under `other`, interleaved.
    pub(crate) fn encrypt_pair(&self, a: &mut [u8; 8], other: &TdesSchedule, b: &mut [u8; 8]) {
        let (x, y) = rounds2(ip(a), ip(b), &self.k1.rounds, &other.k1.rounds, false);
        let (x, y) = rounds2(x, y, &self.k2.rounds, &other.k2.rounds, true);
        let (x, y) = rounds2(x, y, &self.k3.rounds, &other.k3.rounds, false);
        *a = fp(x);
        *b = fp(y);
    }

    /// Encrypts independent blocks (ECB), two at a time.
    pub(crate) fn encrypt_each(&self, blocks: &mut [[u8; 8]]) {
        let mut pairs = blocks.chunks_exact_mut(2);
        for pair in &mut pairs {
            if let [a, b] = pair {
                self.encrypt_pair(a, self, b);
            }
        }
        for block in pairs.into_remainder() {
            self.encrypt(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex8(s: &str) -> [u8; 8] {
        hex::decode(s).expect("hex").try_into().expect("8 bytes")
    }

    /// Known answers for single DES: the worked example of J. Orlin Grabbe's "The DES Algorithm
    /// Illustrated", and the first entries of NIST SP 800-17's variable-plaintext and
    /// variable-key tables (key 0101.. with one plaintext bit set; plaintext 0 under one key bit).
    #[test]
    fn des_known_answers() {
        let cases = [
            ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
            ("0101010101010101", "8000000000000000", "95F8A5E5DD31D900"),
            ("0101010101010101", "4000000000000000", "DD7F121CA5015619"),
            ("8001010101010101", "0000000000000000", "95A8D72813DAA94D"),
            ("4001010101010101", "0000000000000000", "0EEC1487DD8C26D5"),
            ("0E329232EA6D0D73", "8787878787878787", "0000000000000000"),
        ];
        for (key, plain, cipher) in cases {
            let schedule = DesSchedule::new(&hex8(key));
            let mut block = hex8(plain);
            schedule.encrypt(&mut block);
            assert_eq!(hex::encode_upper(block), cipher, "key {key} plaintext {plain}");
            schedule.decrypt(&mut block);
            assert_eq!(block, hex8(plain));
        }
    }

    #[test]
    fn tdes_with_three_equal_keys_is_single_des() {
        let key = hex8("133457799BBCDFF1");
        let tdes = TdesSchedule::new(&[key, key, key].concat()).expect("24 bytes");
        let mut block = hex8("0123456789ABCDEF");
        tdes.encrypt(&mut block);
        assert_eq!(hex::encode_upper(block), "85E813540F0AB405");
        tdes.decrypt(&mut block);
        assert_eq!(block, hex8("0123456789ABCDEF"));
    }

    #[test]
    fn pairs_and_batches_equal_one_block_at_a_time() {
        let a = TdesSchedule::new(&(1u8..=16).collect::<Vec<_>>()).expect("16 bytes");
        let b = TdesSchedule::new(&(40u8..64).collect::<Vec<_>>()).expect("24 bytes");
        let mut blocks: Vec<[u8; 8]> = (0u8..5).map(|i| [i; 8]).collect();
        let expected: Vec<[u8; 8]> = blocks
            .iter()
            .map(|block| {
                let mut block = *block;
                a.encrypt(&mut block);
                block
            })
            .collect();
        a.encrypt_each(&mut blocks);
        assert_eq!(blocks, expected);

        let (mut x, mut y) = (*b"pair one", *b"pair two");
        a.encrypt_pair(&mut x, &b, &mut y);
        let (mut x1, mut y1) = (*b"pair one", *b"pair two");
        a.encrypt(&mut x1);
        b.encrypt(&mut y1);
        assert_eq!((x, y), (x1, y1));
    }

    #[test]
    fn other_key_lengths_are_refused() {
        for len in [0, 8, 15, 17, 23, 25, 32] {
            assert!(TdesSchedule::new(&vec![1u8; len]).is_none(), "{len}");
        }
    }
}

#[cfg(test)]
mod differential {
    //! The same blocks through this core and through the `des` crate (the RustCrypto
    //! implementation, kept as a test oracle only).
    use super::*;
    use des::cipher::generic_array::GenericArray;
    use des::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn single_des_matches_the_des_crate(key in any::<[u8; 8]>(), block in any::<[u8; 8]>()) {
            let mut ours = block;
            DesSchedule::new(&key).encrypt(&mut ours);
            let mut theirs = block;
            des::Des::new(GenericArray::from_slice(&key)).encrypt_block(GenericArray::from_mut_slice(&mut theirs));
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn tdes_matches_the_des_crate(key in proptest::collection::vec(any::<u8>(), 24), block in any::<[u8; 8]>()) {
            for len in [16usize, 24] {
                let ours = TdesSchedule::new(&key[..len]).expect("tdes length");
                let mut a = block;
                ours.encrypt(&mut a);
                let mut b = block;
                if len == 16 {
                    let c = des::TdesEde2::new_from_slice(&key[..16]).expect("16");
                    c.encrypt_block(GenericArray::from_mut_slice(&mut b));
                    prop_assert_eq!(a, b);
                    ours.decrypt(&mut a);
                    c.decrypt_block(GenericArray::from_mut_slice(&mut b));
                } else {
                    let c = des::TdesEde3::new_from_slice(&key[..24]).expect("24");
                    c.encrypt_block(GenericArray::from_mut_slice(&mut b));
                    prop_assert_eq!(a, b);
                    ours.decrypt(&mut a);
                    c.decrypt_block(GenericArray::from_mut_slice(&mut b));
                }
                prop_assert_eq!(a, b);
                prop_assert_eq!(a, block);
            }
        }
    }
}

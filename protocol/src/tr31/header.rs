//! The TR-31 key block header (TR-31:2018 §A.2, Table 4): 16 fixed characters and the optional
//! blocks.
//!
//! | offset | length | field                                              |
//! |--------|--------|----------------------------------------------------|
//! | 0      | 1      | key block version: `A`, `B`, `C`, `D`              |
//! | 1      | 4      | key block length, decimal, the whole block         |
//! | 5      | 2      | key usage (`B1`, `K0`, `P0`, …)                     |
//! | 7      | 1      | algorithm (`T`, `A`, `D`, `H`, …)                   |
//! | 8      | 1      | mode of use (`X`, `B`, `E`, …)                      |
//! | 10     | 2      | key version number                                 |
//! | 11     | 1      | exportability: `E`, `N`, `S`                       |
//! | 12     | 2      | number of optional blocks, decimal                 |
//! | 14     | 2      | reserved, `00`                                     |
//! | 16     | …      | optional blocks: ID (2), length (2 hex), data       |
//!
//! A [`Header`] is valid by construction: [`Header::parse`] and [`HeaderBuilder::build`] run the
//! same checks, including the key usage / algorithm / mode of use table ([`USAGE_RULES`]).

use std::fmt;

use super::{Tr31Error, Version};
use crate::dukpt::{InitialKeyId, Ksn};
use crate::keys::Kcv;

/// The fixed part of the header.
pub const HEADER_FIXED_LEN: usize = 16;
/// Four decimal length digits.
pub const KEY_BLOCK_LEN_MAX: usize = 9999;
/// Two decimal count digits.
pub const OPTIONAL_BLOCKS_MAX: usize = 99;
/// The ID and the two-digit length of an optional block.
const OPTIONAL_BLOCK_SHORT_OVERHEAD: usize = 4;
/// ID, `00`, `04` and four hex length digits: the extended length form, for data over 251.
const OPTIONAL_BLOCK_EXTENDED_OVERHEAD: usize = 10;
const OPTIONAL_BLOCK_SHORT_LEN_MAX: usize = 0xFF;

/// The padding block, added by [`Header::format`] so the header is a whole number of cipher
/// blocks.
pub const PADDING_BLOCK: [u8; 2] = *b"PB";
/// TDES DUKPT initial key serial number (the KSN with its counter cleared), 20 hex digits.
pub const KSN_BLOCK: [u8; 2] = *b"KS";
/// AES DUKPT initial key ID, 16 hex digits.
pub const INITIAL_KEY_ID_BLOCK: [u8; 2] = *b"IK";
/// Key check value of the wrapped key: `00` (legacy, encrypted zeros) or `01` (CMAC), then hex.
pub const KCV_BLOCK: [u8; 2] = *b"KC";
/// Key check value of the KBPK, same format as [`KCV_BLOCK`].
pub const KBPK_KCV_BLOCK: [u8; 2] = *b"KP";

/// Key check value methods of the `KC`/`KP` optional blocks.
const KCV_METHOD_LEGACY: &str = "00";
const KCV_METHOD_CMAC: &str = "01";

/// Which algorithms and modes of use a key usage allows: our policy after TR-31:2018 Table 6
/// (key usage) and Table 7 (mode of use). A usage not listed is refused.
pub struct UsageRule {
    pub usage: [u8; 2],
    pub algorithms: &'static [u8],
    pub modes: &'static [u8],
}

const SYMMETRIC: &[u8] = b"ADT";
const DERIVATION: &[u8] = b"XN";
const WRAPPING: &[u8] = b"BDE";
const MAC: &[u8] = b"CGV";

/// The key usage table. `B*` derivation keys (`X`, or `N` as some HSMs emit), `E*` EMV master keys
/// (`X`), `K*` and `D*` and `P0` wrap/encrypt keys (`B`, `D`, `E`), `M*`, `C0`, `V*` MAC and
/// verification keys (`C`, `G`, `V`), `S*` signature keys (`S`, `V`).
pub const USAGE_RULES: &[UsageRule] = &[
    UsageRule { usage: *b"B0", algorithms: b"AT", modes: DERIVATION },
    UsageRule { usage: *b"B1", algorithms: b"AT", modes: DERIVATION },
    UsageRule { usage: *b"B2", algorithms: b"T", modes: DERIVATION },
    UsageRule { usage: *b"C0", algorithms: b"AT", modes: MAC },
    UsageRule { usage: *b"D0", algorithms: SYMMETRIC, modes: WRAPPING },
    UsageRule { usage: *b"D1", algorithms: b"ER", modes: WRAPPING },
    UsageRule { usage: *b"D2", algorithms: SYMMETRIC, modes: WRAPPING },
    UsageRule { usage: *b"E0", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"E1", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"E2", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"E3", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"E4", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"E5", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"E6", algorithms: b"AT", modes: b"X" },
    UsageRule { usage: *b"I0", algorithms: SYMMETRIC, modes: b"N" },
    UsageRule { usage: *b"K0", algorithms: SYMMETRIC, modes: WRAPPING },
    UsageRule { usage: *b"K1", algorithms: b"AT", modes: WRAPPING },
    UsageRule { usage: *b"K2", algorithms: b"R", modes: WRAPPING },
    UsageRule { usage: *b"K3", algorithms: b"ER", modes: b"BDEX" },
    UsageRule { usage: *b"M0", algorithms: b"T", modes: MAC },
    UsageRule { usage: *b"M1", algorithms: b"DT", modes: MAC },
    UsageRule { usage: *b"M2", algorithms: b"DT", modes: MAC },
    UsageRule { usage: *b"M3", algorithms: b"DT", modes: MAC },
    UsageRule { usage: *b"M4", algorithms: b"DT", modes: MAC },
    UsageRule { usage: *b"M5", algorithms: SYMMETRIC, modes: MAC },
    UsageRule { usage: *b"M6", algorithms: SYMMETRIC, modes: MAC },
    UsageRule { usage: *b"M7", algorithms: b"H", modes: MAC },
    UsageRule { usage: *b"M8", algorithms: b"DT", modes: MAC },
    UsageRule { usage: *b"P0", algorithms: SYMMETRIC, modes: WRAPPING },
    UsageRule { usage: *b"S0", algorithms: b"ERS", modes: b"SV" },
    UsageRule { usage: *b"S1", algorithms: b"ERS", modes: b"SV" },
    UsageRule { usage: *b"S2", algorithms: b"ERS", modes: b"SV" },
    UsageRule { usage: *b"V0", algorithms: SYMMETRIC, modes: MAC },
    UsageRule { usage: *b"V1", algorithms: SYMMETRIC, modes: MAC },
    UsageRule { usage: *b"V2", algorithms: SYMMETRIC, modes: MAC },
    UsageRule { usage: *b"V3", algorithms: b"AT", modes: MAC },
    UsageRule { usage: *b"V4", algorithms: b"AT", modes: MAC },
];

/// TR-31:2018 algorithms: A AES, D DEA, E elliptic curve, H HMAC, R RSA, S DSA, T TDES.
const ALGORITHMS: &[u8] = b"ADEHRST";
/// TR-31:2018 modes of use.
const MODES_OF_USE: &[u8] = b"BCDEGNSTVXY";
/// TR-31:2018 exportability: exportable under a trusted key, non-exportable, sensitive.
const EXPORTABILITY: &[u8] = b"ENS";

/// One optional block: a two-character ID and printable ASCII data.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OptionalBlock {
    id: [u8; 2],
    data: String,
}

impl OptionalBlock {
    /// A block with an alphanumeric ID and printable ASCII data; the known IDs (`KS`, `IK`, `KC`,
    /// `KP`) must hold data of their format.
    pub fn new(id: [u8; 2], data: impl Into<String>) -> Result<Self, Tr31Error> {
        let block = Self { id, data: data.into() };
        if !id.iter().all(u8::is_ascii_alphanumeric) {
            return Err(Tr31Error::OptionalBlockId { id: show(&id) });
        }
        check_block_data(&block)?;
        Ok(block)
    }

    pub fn id(&self) -> [u8; 2] {
        self.id
    }

    pub fn id_str(&self) -> &str {
        std::str::from_utf8(&self.id).unwrap_or("??")
    }

    pub fn data(&self) -> &str {
        &self.data
    }

    /// Characters this block takes in the header: the short form up to 255, then extended.
    fn encoded_len(&self) -> usize {
        let short = OPTIONAL_BLOCK_SHORT_OVERHEAD + self.data.len();
        if short <= OPTIONAL_BLOCK_SHORT_LEN_MAX {
            short
        } else {
            OPTIONAL_BLOCK_EXTENDED_OVERHEAD + self.data.len()
        }
    }

    fn write(&self, out: &mut String) {
        out.push_str(self.id_str());
        let len = self.encoded_len();
        if len <= OPTIONAL_BLOCK_SHORT_LEN_MAX {
            out.push_str(&format!("{len:02X}"));
        } else {
            out.push_str(&format!("0004{len:04X}"));
        }
        out.push_str(&self.data);
    }
}

impl fmt::Debug for OptionalBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:?}", self.id_str(), self.data)
    }
}

fn check_block_data(block: &OptionalBlock) -> Result<(), Tr31Error> {
    let data = block.data.as_bytes();
    let fail = |reason: &'static str| Tr31Error::OptionalBlockData { id: show(&block.id), reason };
    if !data.iter().all(is_printable) {
        return Err(fail("not printable ASCII"));
    }
    match block.id {
        KSN_BLOCK if !(data.len() == 20 && is_upper_hex(data)) => Err(fail("not 20 hex digits")),
        INITIAL_KEY_ID_BLOCK if !(data.len() == 16 && is_upper_hex(data)) => Err(fail("not 16 hex digits")),
        KCV_BLOCK | KBPK_KCV_BLOCK => {
            let method = data.get(..2);
            let value = data.get(2..).unwrap_or_default();
            if method != Some(KCV_METHOD_LEGACY.as_bytes()) && method != Some(KCV_METHOD_CMAC.as_bytes()) {
                return Err(fail("KCV method is not 00 or 01"));
            }
            if !(6..=32).contains(&value.len()) || value.len() % 2 != 0 || !is_upper_hex(value) {
                return Err(fail("KCV is not 3 to 16 bytes of hex"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A validated TR-31 header. The length digits are not part of it: they belong to a key block
/// and [`Header::format`] and `wrap` compute them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    version: Version,
    key_usage: [u8; 2],
    algorithm: u8,
    mode_of_use: u8,
    key_version_number: [u8; 2],
    exportability: u8,
    /// In order; a `PB` block, if any, came from a parsed block and is last.
    optional_blocks: Vec<OptionalBlock>,
}

/// A header parsed at the start of a key block.
pub(super) struct ParsedHeader {
    pub(super) header: Header,
    /// The value of the length digits.
    pub(super) declared_len: usize,
    /// Characters of header, optional blocks included: the payload starts here.
    pub(super) text_len: usize,
}

impl Header {
    pub fn builder(version: Version, key_usage: [u8; 2], algorithm: u8, mode_of_use: u8) -> HeaderBuilder {
        HeaderBuilder {
            header: Header {
                version,
                key_usage,
                algorithm,
                mode_of_use,
                key_version_number: *b"00",
                exportability: b'N',
                optional_blocks: Vec::new(),
            },
        }
    }

    /// The header we ship DUKPT initial keys with: usage `B1`, algorithm `T` (with a `KS` block
    /// holding the initial KSN: `ksn`'s counter cleared) or `A` (with an `IK` block), mode `X`,
    /// key version `00`, exportability `N`, and a `KC` block with the key's check value if
    /// given (method `00` for TDES, `01`, CMAC, for AES, as [`crate::SymmetricKey::kcv`]).
    pub fn dukpt_initial_key(version: Version, id: DukptInitialKeyId, kcv: Option<&Kcv>) -> Result<Header, Tr31Error> {
        let (algorithm, id_block, method) = match id {
            DukptInitialKeyId::Tdes(ksn) => {
                (b'T', OptionalBlock::new(KSN_BLOCK, ksn.initial().to_hex())?, KCV_METHOD_LEGACY)
            }
            DukptInitialKeyId::Aes(id) => {
                (b'A', OptionalBlock::new(INITIAL_KEY_ID_BLOCK, id.to_hex())?, KCV_METHOD_CMAC)
            }
        };
        let mut builder = Header::builder(version, *b"B1", algorithm, b'X')
            .key_version_number(*b"00")
            .exportability(b'N')
            .optional_block(id_block);
        if let Some(kcv) = kcv {
            builder = builder.optional_block(OptionalBlock::new(KCV_BLOCK, format!("{method}{}", kcv.to_hex()))?);
        }
        builder.build()
    }

    /// Parses exactly a header: the 16 fixed characters and the optional blocks they announce,
    /// nothing after. The length digits must be four decimal digits but are otherwise ignored
    /// (`D0000B1AX00E0000` is a valid template).
    pub fn parse(text: &str) -> Result<Header, Tr31Error> {
        let parsed = parse_prefix(text.as_bytes())?;
        if parsed.text_len != text.len() {
            return Err(Tr31Error::TrailingData { len: text.len() - parsed.text_len });
        }
        Ok(parsed.header)
    }

    /// The header text for a key block of `key_block_len` characters. Any parsed `PB` block is
    /// dropped and a new one of `0` characters added if needed, so that the header is a whole
    /// number of the version's cipher blocks.
    pub fn format(&self, key_block_len: usize) -> Result<String, Tr31Error> {
        if key_block_len > KEY_BLOCK_LEN_MAX {
            return Err(Tr31Error::TooLong { len: key_block_len, max: KEY_BLOCK_LEN_MAX });
        }
        let (unpadded, padding) = self.layout();
        let blocks = self.blocks_without_padding().count() + usize::from(padding.is_some());
        if blocks > OPTIONAL_BLOCKS_MAX {
            return Err(Tr31Error::TooManyOptionalBlocks { count: blocks, max: OPTIONAL_BLOCKS_MAX });
        }
        let mut out = String::with_capacity(unpadded + padding.as_ref().map_or(0, |p| p.encoded_len()));
        out.push(char::from(self.version.as_byte()));
        out.push_str(&format!("{key_block_len:04}"));
        out.push_str(self.key_usage_str());
        out.push(char::from(self.algorithm));
        out.push(char::from(self.mode_of_use));
        out.push_str(std::str::from_utf8(&self.key_version_number).unwrap_or("00"));
        out.push(char::from(self.exportability));
        out.push_str(&format!("{blocks:02}"));
        out.push_str("00");
        for block in self.blocks_without_padding() {
            block.write(&mut out);
        }
        if let Some(padding) = padding {
            padding.write(&mut out);
        }
        debug_assert_eq!(out.len() % self.version.block_len(), 0);
        Ok(out)
    }

    /// Characters of the header as [`Header::format`] writes it.
    pub fn encoded_len(&self) -> usize {
        let (unpadded, padding) = self.layout();
        unpadded + padding.map_or(0, |p| p.encoded_len())
    }

    /// The unpadded header length and the padding block it needs, if any.
    fn layout(&self) -> (usize, Option<OptionalBlock>) {
        let unpadded = HEADER_FIXED_LEN + self.blocks_without_padding().map(OptionalBlock::encoded_len).sum::<usize>();
        let block_len = self.version.block_len();
        let missing = (block_len - unpadded % block_len) % block_len;
        if missing == 0 {
            return (unpadded, None);
        }
        // A PB block is at least its 4-character ID and length: pad by one more cipher block
        // when fewer characters are missing.
        let total = if missing < OPTIONAL_BLOCK_SHORT_OVERHEAD { missing + block_len } else { missing };
        let data = "0".repeat(total - OPTIONAL_BLOCK_SHORT_OVERHEAD);
        (unpadded, Some(OptionalBlock { id: PADDING_BLOCK, data }))
    }

    fn blocks_without_padding(&self) -> impl Iterator<Item = &OptionalBlock> {
        self.optional_blocks.iter().filter(|b| b.id != PADDING_BLOCK)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn key_usage(&self) -> [u8; 2] {
        self.key_usage
    }

    pub fn key_usage_str(&self) -> &str {
        std::str::from_utf8(&self.key_usage).unwrap_or("??")
    }

    pub fn algorithm(&self) -> u8 {
        self.algorithm
    }

    pub fn mode_of_use(&self) -> u8 {
        self.mode_of_use
    }

    pub fn key_version_number(&self) -> [u8; 2] {
        self.key_version_number
    }

    pub fn exportability(&self) -> u8 {
        self.exportability
    }

    pub fn optional_blocks(&self) -> &[OptionalBlock] {
        &self.optional_blocks
    }

    /// The data of the optional block `id`, if present.
    pub fn optional_block(&self, id: [u8; 2]) -> Option<&str> {
        self.optional_blocks.iter().find(|b| b.id == id).map(OptionalBlock::data)
    }

    /// The key check value of the `KC` block, without its method prefix.
    pub fn kcv(&self) -> Option<Kcv> {
        let data = self.optional_block(KCV_BLOCK)?;
        Kcv::from_hex(data.get(2..)?)
    }

    /// The same header as another version (for wrapping one key under several KBPKs).
    pub fn with_version(&self, version: Version) -> Header {
        Header { version, ..self.clone() }
    }

    fn validate(&self) -> Result<(), Tr31Error> {
        let usage = show(&self.key_usage);
        let rule = USAGE_RULES
            .iter()
            .find(|r| r.usage == self.key_usage)
            .ok_or_else(|| Tr31Error::UnknownKeyUsage(usage.clone()))?;
        if !ALGORITHMS.contains(&self.algorithm) {
            return Err(Tr31Error::UnknownAlgorithm(char::from(self.algorithm)));
        }
        if !MODES_OF_USE.contains(&self.mode_of_use) {
            return Err(Tr31Error::UnknownModeOfUse(char::from(self.mode_of_use)));
        }
        if !rule.algorithms.contains(&self.algorithm) {
            return Err(Tr31Error::AlgorithmNotAllowed { usage, algorithm: char::from(self.algorithm) });
        }
        if !rule.modes.contains(&self.mode_of_use) {
            return Err(Tr31Error::ModeOfUseNotAllowed { usage, mode: char::from(self.mode_of_use) });
        }
        if !self.key_version_number.iter().all(u8::is_ascii_alphanumeric) {
            return Err(Tr31Error::KeyVersionNumber(show(&self.key_version_number)));
        }
        if !EXPORTABILITY.contains(&self.exportability) {
            return Err(Tr31Error::UnknownExportability(char::from(self.exportability)));
        }
        for (index, block) in self.optional_blocks.iter().enumerate() {
            if self.optional_blocks[..index].iter().any(|earlier| earlier.id == block.id) {
                return Err(Tr31Error::DuplicateOptionalBlock(show(&block.id)));
            }
            if block.id == PADDING_BLOCK && index + 1 != self.optional_blocks.len() {
                return Err(Tr31Error::PaddingBlockNotLast);
            }
        }
        Ok(())
    }
}

/// The identifier a DUKPT initial key is shipped with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DukptInitialKeyId {
    Tdes(Ksn),
    Aes(InitialKeyId),
}

/// Builds a [`Header`]; [`HeaderBuilder::build`] validates. Defaults: key version `00`,
/// exportability `N`, no optional blocks.
#[derive(Clone, Debug)]
pub struct HeaderBuilder {
    header: Header,
}

impl HeaderBuilder {
    pub fn key_version_number(mut self, number: [u8; 2]) -> Self {
        self.header.key_version_number = number;
        self
    }

    pub fn exportability(mut self, exportability: u8) -> Self {
        self.header.exportability = exportability;
        self
    }

    /// Appends an optional block. `PB` is refused at build: format adds it.
    pub fn optional_block(mut self, block: OptionalBlock) -> Self {
        self.header.optional_blocks.push(block);
        self
    }

    pub fn build(self) -> Result<Header, Tr31Error> {
        if self.header.optional_blocks.iter().any(|b| b.id == PADDING_BLOCK) {
            return Err(Tr31Error::PaddingBlockIsAutomatic);
        }
        // One count is kept for the padding block.
        let count = self.header.optional_blocks.len();
        if count >= OPTIONAL_BLOCKS_MAX {
            return Err(Tr31Error::TooManyOptionalBlocks { count, max: OPTIONAL_BLOCKS_MAX - 1 });
        }
        self.header.validate()?;
        if self.header.encoded_len() > KEY_BLOCK_LEN_MAX {
            return Err(Tr31Error::TooLong { len: self.header.encoded_len(), max: KEY_BLOCK_LEN_MAX });
        }
        Ok(self.header)
    }
}

/// Parses the header at the start of `text`. Every index is checked: `text` is attacker data.
pub(super) fn parse_prefix(text: &[u8]) -> Result<ParsedHeader, Tr31Error> {
    let mut cursor = Cursor { text, at: 0 };
    let fixed = cursor.take(HEADER_FIXED_LEN).ok_or(Tr31Error::TooShort { len: text.len(), min: HEADER_FIXED_LEN })?;
    if let Some(offset) = fixed.iter().position(|b| !is_printable(b)) {
        return Err(Tr31Error::NotPrintable { offset });
    }
    let [version, l0, l1, l2, l3, u0, u1, algorithm, mode, v0, v1, export, c0, c1, r0, r1] =
        <[u8; HEADER_FIXED_LEN]>::try_from(fixed)
            .map_err(|_| Tr31Error::TooShort { len: text.len(), min: HEADER_FIXED_LEN })?;

    let version = Version::from_byte(version).ok_or(Tr31Error::UnknownVersion(char::from(version)))?;
    let declared_len = decimal(&[l0, l1, l2, l3]).ok_or_else(|| Tr31Error::LengthDigits(show(&[l0, l1, l2, l3])))?;
    let count = decimal(&[c0, c1]).ok_or_else(|| Tr31Error::OptionalBlockCount(show(&[c0, c1])))?;
    if [r0, r1] != *b"00" {
        return Err(Tr31Error::ReservedField(show(&[r0, r1])));
    }

    let mut optional_blocks = Vec::with_capacity(count.min(OPTIONAL_BLOCKS_MAX));
    for index in 0..count {
        optional_blocks.push(parse_optional_block(&mut cursor, index)?);
    }
    let header = Header {
        version,
        key_usage: [u0, u1],
        algorithm,
        mode_of_use: mode,
        key_version_number: [v0, v1],
        exportability: export,
        optional_blocks,
    };
    header.validate()?;
    Ok(ParsedHeader { header, declared_len, text_len: cursor.at })
}

fn parse_optional_block(cursor: &mut Cursor<'_>, index: usize) -> Result<OptionalBlock, Tr31Error> {
    let start = cursor.at;
    let truncated = Tr31Error::OptionalBlockTruncated { index };
    let id = cursor.take(2).ok_or(truncated.clone())?;
    let id = [id[0], id[1]];
    if !id.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Tr31Error::OptionalBlockId { id: show(&id) });
    }
    let bad_length = || Tr31Error::OptionalBlockLength { id: show(&id) };
    let short = hex_number(cursor.take(2).ok_or(truncated.clone())?).ok_or_else(bad_length)?;
    let block_len = if short != 0 {
        short
    } else {
        // Extended length: two hex digits giving the number of length digits, then the length.
        let digits = hex_number(cursor.take(2).ok_or(truncated.clone())?).ok_or_else(bad_length)?;
        if !(1..=4).contains(&digits) {
            return Err(bad_length());
        }
        hex_number(cursor.take(digits).ok_or(truncated.clone())?).ok_or_else(bad_length)?
    };
    let consumed = cursor.at - start;
    let data_len = block_len.checked_sub(consumed).ok_or_else(bad_length)?;
    let data = cursor.take(data_len).ok_or(truncated)?;
    if let Some(offset) = data.iter().position(|b| !is_printable(b)) {
        return Err(Tr31Error::NotPrintable { offset: cursor.at - data_len + offset });
    }
    // Printable ASCII is UTF-8.
    let data = String::from_utf8(data.to_vec())
        .map_err(|_| Tr31Error::OptionalBlockData { id: show(&id), reason: "not ASCII" })?;
    let block = OptionalBlock { id, data };
    check_block_data(&block)?;
    Ok(block)
}

struct Cursor<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(len)?;
        let taken = self.text.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }
}

fn is_printable(byte: &u8) -> bool {
    (0x20..=0x7E).contains(byte)
}

/// Upper-case hex digits only: the case of a key block's hex is part of what the MAC covers.
pub(super) fn is_upper_hex(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
}

fn decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
}

fn hex_number(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || !is_upper_hex(digits) {
        return None;
    }
    let value = |d: u8| if d.is_ascii_digit() { d - b'0' } else { d - b'A' + 10 };
    Some(digits.iter().fold(0, |n, &d| n * 16 + usize::from(value(d))))
}

/// Bytes from a key block shown in an error: printable ASCII as is, anything else as `?`.
pub(super) fn show(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| if is_printable(&b) { char::from(b) } else { '?' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_template_parses_and_formats_with_computed_length() {
        let header = Header::parse("D0000B1AX00E0000").expect("header");
        assert_eq!(header.version(), Version::D);
        assert_eq!(header.key_usage_str(), "B1");
        assert_eq!(header.algorithm(), b'A');
        assert_eq!(header.mode_of_use(), b'X');
        assert_eq!(header.exportability(), b'E');
        assert_eq!(header.format(144).expect("format"), "D0144B1AX00E0000");
    }

    #[test]
    fn padding_block_makes_the_header_a_whole_number_of_cipher_blocks() {
        let ksn = Ksn::from_hex("FFFF9876543210E00003").expect("ksn");
        let header = Header::dukpt_initial_key(Version::D, DukptInitialKeyId::Tdes(ksn), None).expect("header");
        // 16 + KS (24) = 40: PB of 8 brings it to 48.
        assert_eq!(header.format(0).expect("format"), "D0000B1TX00N0200KS18FFFF9876543210E00000PB080000");
        let b = header.with_version(Version::B).format(0).expect("format");
        assert_eq!(b, "B0000B1TX00N0100KS18FFFF9876543210E00000");
    }

    #[test]
    fn padding_block_shorter_than_four_characters_takes_one_more_cipher_block() {
        // 16 + 4 + 10 = 30: two missing, so PB is 2 + 16 = 18 characters.
        let header = Header::builder(Version::D, *b"K0", b'A', b'B')
            .optional_block(OptionalBlock::new(*b"LB", "ABCDEFGHIJ").expect("block"))
            .build()
            .expect("header");
        let text = header.format(0).expect("format");
        assert_eq!(text, format!("D0000K0AB00N0200LB0EABCDEFGHIJPB12{}", "0".repeat(14)));
        let reparsed = Header::parse(&text).expect("reparse");
        assert_eq!(reparsed.optional_block(PADDING_BLOCK).map(str::len), Some(14));
        assert_eq!(reparsed.format(0).expect("format again"), text);
    }

    #[test]
    fn optional_block_longer_than_255_uses_the_extended_length() {
        let data = "X".repeat(300);
        let header = Header::builder(Version::B, *b"K0", b'T', b'B')
            .optional_block(OptionalBlock::new(*b"LB", data.clone()).expect("block"))
            .build()
            .expect("header");
        let text = header.format(0).expect("format");
        assert!(text.starts_with("B0000K0TB00N0"), "{text}");
        assert!(text[16..].starts_with("LB00040136"), "{}", &text[16..30]);
        let reparsed = Header::parse(&text).expect("reparse");
        assert_eq!(reparsed.optional_block(*b"LB"), Some(data.as_str()));
    }

    #[test]
    fn unknown_key_usage_is_refused() {
        assert_eq!(Header::parse("B0000Z9TX00N0000"), Err(Tr31Error::UnknownKeyUsage("Z9".into())));
    }

    #[test]
    fn pin_key_for_key_derivation_is_refused() {
        assert_eq!(
            Header::parse("B0000P0TX00N0000"),
            Err(Tr31Error::ModeOfUseNotAllowed { usage: "P0".into(), mode: 'X' })
        );
    }

    #[test]
    fn initial_dukpt_key_for_hmac_is_refused() {
        assert_eq!(
            Header::parse("B0000B1HX00N0000"),
            Err(Tr31Error::AlgorithmNotAllowed { usage: "B1".into(), algorithm: 'H' })
        );
    }

    #[test]
    fn reserved_field_other_than_00_is_refused() {
        assert_eq!(Header::parse("B0000B1TX00N0001"), Err(Tr31Error::ReservedField("01".into())));
    }

    #[test]
    fn optional_block_running_past_the_header_is_refused() {
        assert_eq!(Header::parse("B0000B1TX00N0100KS18FFFF"), Err(Tr31Error::OptionalBlockTruncated { index: 0 }));
        assert_eq!(Header::parse("B0000B1TX00N0100KS"), Err(Tr31Error::OptionalBlockTruncated { index: 0 }));
    }

    #[test]
    fn ksn_block_that_is_not_20_hex_digits_is_refused() {
        assert!(matches!(Header::parse("B0000B1TX00N0100KS08ABCD"), Err(Tr31Error::OptionalBlockData { .. })));
    }

    #[test]
    fn padding_block_before_another_block_is_refused() {
        assert_eq!(Header::parse("B0000B1TX00N0200PB0800001A04"), Err(Tr31Error::PaddingBlockNotLast));
    }

    #[test]
    fn caller_supplied_padding_block_is_refused() {
        let built = Header::builder(Version::B, *b"K0", b'T', b'B')
            .optional_block(OptionalBlock::new(PADDING_BLOCK, "0000").expect("block"))
            .build();
        assert_eq!(built, Err(Tr31Error::PaddingBlockIsAutomatic));
    }

    #[test]
    fn duplicate_optional_block_is_refused() {
        assert_eq!(Header::parse("B0000K0TB00N0200LB05XLB05Y"), Err(Tr31Error::DuplicateOptionalBlock("LB".into())));
    }

    #[test]
    fn trailing_text_after_a_header_is_refused() {
        assert_eq!(Header::parse("B0000K0TB00N0000AB"), Err(Tr31Error::TrailingData { len: 2 }));
    }

    #[test]
    fn dukpt_initial_key_header_carries_the_id_and_kcv() {
        let id = InitialKeyId::from_hex("1234567890123456").expect("id");
        let kcv = Kcv::from_hex("05EF45").expect("kcv");
        let header = Header::dukpt_initial_key(Version::D, DukptInitialKeyId::Aes(id), Some(&kcv)).expect("header");
        assert_eq!(header.key_usage_str(), "B1");
        assert_eq!(header.optional_block(INITIAL_KEY_ID_BLOCK), Some("1234567890123456"));
        assert_eq!(header.optional_block(KCV_BLOCK), Some("0105EF45"));
        assert_eq!(header.kcv(), Some(kcv));
        let text = header.format(0).expect("format");
        assert_eq!(Header::parse(&text).expect("reparse").kcv(), Some(kcv));
        assert_eq!(text.len() % 16, 0);
    }
}

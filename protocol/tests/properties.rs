//! Properties of TR-31 wrap and unwrap, over every version we wrap (B, D), every KBPK length and
//! every key length of the TDES and AES algorithms:
//! - what `wrap` makes, `unwrap` gives back, header and key;
//! - any single changed character or flipped payload bit is refused;
//! - no input makes `unwrap` or `Header::parse` panic.

use proptest::prelude::*;

use rki_protocol::tr31::{self, Header, OptionalBlock, Version};
use rki_protocol::{KeyAlgorithm, SecretBytes, SymmetricKey};

const CASES: u32 = 256;

fn kbpk_algorithm() -> impl Strategy<Value = KeyAlgorithm> {
    prop_oneof![
        Just(KeyAlgorithm::Tdes2),
        Just(KeyAlgorithm::Tdes3),
        Just(KeyAlgorithm::Aes128),
        Just(KeyAlgorithm::Aes192),
        Just(KeyAlgorithm::Aes256),
    ]
}

/// A header algorithm and a key length valid for it, with a usage and mode that allow it.
fn key_shape() -> impl Strategy<Value = (u8, usize, [u8; 2], u8)> {
    let tdes = (prop_oneof![Just(8usize), Just(16), Just(24)], 0usize..4).prop_map(|(len, i)| {
        let (usage, mode) = [(*b"B1", b'X'), (*b"K0", b'B'), (*b"P0", b'E'), (*b"M3", b'C')][i];
        (b'T', len, usage, mode)
    });
    let aes = (prop_oneof![Just(16usize), Just(24), Just(32)], 0usize..4).prop_map(|(len, i)| {
        let (usage, mode) = [(*b"B1", b'X'), (*b"K1", b'B'), (*b"P0", b'D'), (*b"D0", b'B')][i];
        (b'A', len, usage, mode)
    });
    prop_oneof![tdes, aes]
}

fn optional_blocks() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("[A-Z][A-Z0-9]", "[ -~]{0,40}"), 0..3)
}

#[derive(Debug)]
struct Case {
    kbpk: SymmetricKey,
    header: Header,
    key: SecretBytes,
    block: String,
}

fn make_case(
    kbpk_algorithm: KeyAlgorithm,
    kbpk_seed: u8,
    (algorithm, key_len, usage, mode): (u8, usize, [u8; 2], u8),
    key_seed: u8,
    blocks: Vec<(String, String)>,
    rng_seed: u8,
) -> Option<Case> {
    let version = if kbpk_algorithm.is_tdes() { Version::B } else { Version::D };
    let kbpk_bytes: Vec<u8> = (0..kbpk_algorithm.key_len())
        .map(|i| kbpk_seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect();
    let kbpk = SymmetricKey::new(kbpk_algorithm, SecretBytes::from_vec(kbpk_bytes)).ok()?;
    let mut builder = Header::builder(version, usage, algorithm, mode).exportability(b'E');
    for (id, data) in blocks {
        let id: [u8; 2] = id.as_bytes().try_into().ok()?;
        // Known IDs have formats of their own, and PB is automatic: keep to free-form ones.
        if [*b"KS", *b"IK", *b"KC", *b"KP", *b"PB"].contains(&id) {
            continue;
        }
        builder = builder.optional_block(OptionalBlock::new(id, data).ok()?);
    }
    // Random IDs may repeat: such headers are refused at build, which is tested elsewhere.
    let header = builder.build().ok()?;
    let key = SecretBytes::from_vec((0..key_len).map(|i| key_seed ^ (i as u8 * 7)).collect());
    let mut state = rng_seed;
    let mut rng = |buf: &mut [u8]| {
        for byte in buf {
            state = state.wrapping_mul(167).wrapping_add(13);
            *byte = state;
        }
    };
    let block = tr31::wrap(&kbpk, &header, &key, &mut rng).expect("valid inputs wrap");
    Some(Case { kbpk, header, key, block })
}

fn case() -> impl Strategy<Value = Case> {
    (kbpk_algorithm(), any::<u8>(), key_shape(), any::<u8>(), optional_blocks(), any::<u8>())
        .prop_filter_map("duplicate optional block IDs", |(a, ks, shape, k, blocks, r)| {
            make_case(a, ks, shape, k, blocks, r)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn wrapped_key_unwraps_to_the_same_header_and_key(case in case()) {
        let block_len = case.header.version().block_len();
        prop_assert_eq!(case.block.len() % 2, 0);
        let (header, key) = tr31::unwrap(&case.kbpk, &case.block).expect("own block unwraps");
        prop_assert_eq!(header.version(), case.header.version());
        prop_assert_eq!(header.key_usage(), case.header.key_usage());
        prop_assert_eq!(header.algorithm(), case.header.algorithm());
        prop_assert_eq!(header.mode_of_use(), case.header.mode_of_use());
        prop_assert_eq!(header.exportability(), case.header.exportability());
        let without_padding: Vec<&OptionalBlock> =
            header.optional_blocks().iter().filter(|b| b.id() != *b"PB").collect();
        let original: Vec<&OptionalBlock> = case.header.optional_blocks().iter().collect();
        prop_assert_eq!(without_padding, original);
        prop_assert!(key == case.key);
        prop_assert_eq!(case.header.encoded_len() % block_len, 0);
    }

    #[test]
    fn any_single_changed_character_is_refused(
        case in case(),
        position in any::<prop::sample::Index>(),
        replacement in prop::char::range(' ', '~'),
    ) {
        let at = position.index(case.block.len());
        let original = case.block.as_bytes()[at];
        prop_assume!(original != replacement as u8);
        let mut changed = case.block.clone();
        changed.replace_range(at..at + 1, &replacement.to_string());
        prop_assert!(tr31::unwrap(&case.kbpk, &changed).is_err(), "accepted change at {}", at);
    }

    #[test]
    fn any_single_flipped_payload_bit_is_refused(
        case in case(),
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let header_len = case.header.encoded_len();
        let mut payload = hex::decode(&case.block[header_len..]).expect("payload hex");
        let at = position.index(payload.len());
        payload[at] ^= 1 << bit;
        let changed = format!("{}{}", &case.block[..header_len], hex::encode_upper(&payload));
        prop_assert_eq!(
            tr31::unwrap(&case.kbpk, &changed).map(|_| ()),
            Err(tr31::Tr31Error::MacMismatch)
        );
    }

    #[test]
    fn truncated_or_extended_blocks_are_refused(
        case in case(),
        cut in any::<prop::sample::Index>(),
        extra in "[0-9A-F]{1,32}",
    ) {
        let at = cut.index(case.block.len());
        prop_assert!(tr31::unwrap(&case.kbpk, &case.block[..at]).is_err());
        let extended = format!("{}{}", case.block, extra);
        prop_assert!(tr31::unwrap(&case.kbpk, &extended).is_err());
    }

    #[test]
    fn arbitrary_text_never_panics_unwrap_or_parse(text in any::<String>(), tdes in any::<bool>()) {
        let kbpk = if tdes {
            SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210")
        } else {
            SymmetricKey::aes_from_hex("0123456789ABCDEFFEDCBA9876543210")
        }
        .expect("key");
        let _ = tr31::unwrap(&kbpk, &text);
        let _ = Header::parse(&text);
    }

    #[test]
    fn header_shaped_text_never_panics_unwrap_or_parse(
        prefix in concat!(
            "[ABCD][0-9]{4}",
            "(B1TX|B0AX|K0TB|K1AE|P0AE|D0TD|M3TC|[A-Z0-9]{2}[A-Z]{2})",
            "[0-9]{2}[ENS]0[0-3]00",
        ),
        rest in "([A-Z]{2}(00)?[0-9A-F]{2}[ -~]{0,24}){0,3}[0-9A-F]{0,160}",
    ) {
        let text = format!("{prefix}{rest}");
        let tdes = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("key");
        let aes = SymmetricKey::aes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("key");
        let _ = tr31::unwrap(&tdes, &text);
        let _ = tr31::unwrap(&aes, &text);
        if let Ok(header) = Header::parse(&text) {
            // Whatever parses formats, and the formatted header parses to the same fields.
            let formatted = header.format(0).expect("format");
            let again = Header::parse(&formatted).expect("formatted header parses");
            prop_assert_eq!(again.key_usage(), header.key_usage());
        }
    }
}

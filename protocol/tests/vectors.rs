//! Data-driven checks against the published and independently computed vectors in
//! `tests/vectors/*.json` (copied from the project's shared vector set, so a fresh clone needs
//! nothing outside the repository).
//!
//! One harness per file. Every vector must pass: they come from the standards and from
//! independent implementations, so a failure here is a bug in this crate, never in the vector.

use std::path::PathBuf;

use serde_json::Value;

use rki_protocol::dukpt::{self, AesKsn, InitialKeyId, Ksn, WorkingKeyUsage};
use rki_protocol::tr31::{self, Version};
use rki_protocol::{KcvLen, KeyAlgorithm, SecretBytes, SymmetricKey};

fn load(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value: Value = serde_json::from_str(&text).expect("vector file is JSON");
    let rows = value.as_array().expect("vector file is an array").clone();
    assert!(!rows.is_empty(), "{name} has no vectors");
    rows
}

fn field<'a>(row: &'a Value, name: &str) -> &'a str {
    row[name].as_str().unwrap_or_else(|| panic!("vector {row} has no string field {name}"))
}

fn optional<'a>(row: &'a Value, name: &str) -> Option<&'a str> {
    row.get(name).and_then(Value::as_str)
}

fn hex_of(key: &SymmetricKey) -> String {
    key.secret().to_hex_upper().to_string()
}

fn tdes(hex: &str) -> SymmetricKey {
    SymmetricKey::tdes_from_hex(hex).expect("vector TDES key")
}

fn aes(hex: &str) -> SymmetricKey {
    SymmetricKey::aes_from_hex(hex).expect("vector AES key")
}

#[test]
fn tdes_ipek_vectors_are_reproduced() {
    for row in load("dukpt_tdes_ipek.json") {
        let ksn = Ksn::from_hex(field(&row, "ksn")).expect("ksn");
        let ipek = dukpt::derive_ipek(&tdes(field(&row, "bdk")), &ksn).expect("ipek");
        assert_eq!(hex_of(&ipek), field(&row, "ipek"), "{row}");
        if let Some(kcv) = optional(&row, "kcv") {
            assert_eq!(ipek.kcv(KcvLen::Three).to_hex(), kcv, "{row}");
        }
    }
}

#[test]
fn aes_initial_key_vectors_are_reproduced() {
    for row in load("dukpt_aes_initial_key.json") {
        let bdk = aes(field(&row, "bdk"));
        let id = InitialKeyId::from_hex(field(&row, "initial_key_id")).expect("id");
        let initial = dukpt::derive_initial_key(&bdk, &id).expect("initial key");
        let expected_type = KeyAlgorithm::parse(field(&row, "key_type")).expect("key type");
        assert_eq!(initial.algorithm(), expected_type, "{row}");
        assert_eq!(hex_of(&initial), field(&row, "initial_key"), "{row}");
        if let Some(kcv) = optional(&row, "kcv") {
            assert_eq!(initial.kcv(KcvLen::Three).to_hex(), kcv, "{row}");
        }
    }
}

/// TDES rows: `transaction_key` is the terminal's key for the KSN, `pin_key` its PIN variant, and
/// the encrypted PIN block is TDES-ECB of the clear block under the PIN key.
/// AES rows: `transaction_key` is the intermediate derivation key for the KSN's counter, and
/// `pin_key` the AES-128 PIN-encryption working key derived from it.
#[test]
fn transaction_key_vectors_are_reproduced() {
    for row in load("dukpt_transaction_keys.json") {
        match field(&row, "alg") {
            "TDES" => check_tdes_transaction(&row),
            "AES128" | "AES192" | "AES256" => check_aes_transaction(&row),
            other => panic!("unknown algorithm {other} in {row}"),
        }
    }
}

fn check_tdes_transaction(row: &Value) {
    let ksn = Ksn::from_hex(field(row, "ksn")).expect("ksn");
    let ipek = dukpt::derive_ipek(&tdes(field(row, "bdk")), &ksn).expect("ipek");
    let transaction = dukpt::transaction_key(&ipek, &ksn).expect("transaction key");
    assert_eq!(hex_of(&transaction), field(row, "transaction_key"), "{row}");
    let pin = dukpt::pin_key(&transaction);
    assert_eq!(hex_of(&pin), field(row, "pin_key"), "{row}");
    if let (Some(clear), Some(encrypted)) = (optional(row, "pin_block_clear"), optional(row, "pin_block_encrypted")) {
        let mut block = [0u8; 8];
        hex::decode_to_slice(clear, &mut block).expect("clear PIN block");
        rki_protocol::tdes::encrypt_block(&pin, &mut block).expect("a PIN key is TDES");
        assert_eq!(hex::encode_upper(block), encrypted, "{row}");
    }
}

fn check_aes_transaction(row: &Value) {
    let ksn = AesKsn::from_hex(field(row, "ksn")).expect("ksn");
    let bdk = aes(field(row, "bdk"));
    let initial = dukpt::derive_initial_key(&bdk, &ksn.initial_key_id()).expect("initial key");
    let derivation = dukpt::derivation_key(&initial, &ksn).expect("derivation key");
    assert_eq!(hex_of(&derivation), field(row, "transaction_key"), "{row}");
    let pin =
        dukpt::working_key(&derivation, &ksn, WorkingKeyUsage::PinEncryption, KeyAlgorithm::Aes128).expect("PIN key");
    assert_eq!(hex_of(&pin), field(row, "pin_key"), "{row}");
}

#[test]
fn kcv_vectors_are_reproduced() {
    for row in load("kcv.json") {
        let key = match field(&row, "alg") {
            "TDES" => tdes(field(&row, "key")),
            "AES" => aes(field(&row, "key")),
            other => panic!("unknown algorithm {other} in {row}"),
        };
        let expected = field(&row, "kcv");
        let len = KcvLen::from_bytes(expected.len() / 2).expect("3 or 5 byte KCV");
        assert_eq!(key.kcv(len).to_hex(), expected, "{row}");
    }
}

#[test]
fn hmac_sha256_vectors_are_reproduced() {
    use hmac::{Hmac, Mac};
    for row in load("hmac_sha256.json") {
        let key = SecretBytes::from_hex(field(&row, "key")).expect("key");
        let message = hex::decode(field(&row, "message")).expect("message");
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key.expose_secret()).expect("any length");
        mac.update(&message);
        let tag = mac.finalize().into_bytes();
        assert_eq!(hex::encode_upper(tag), field(&row, "tag"), "{row}");
    }
}

fn kbpk_for(version: Version, hex: &str) -> SymmetricKey {
    match version {
        Version::A | Version::B | Version::C => tdes(hex),
        Version::D => aes(hex),
    }
}

fn version_of(block: &str) -> Version {
    Version::from_byte(block.as_bytes()[0]).expect("vector block version")
}

/// A fixed, visible padding source: the vectors prove the format, not the randomness.
fn counting_rng() -> impl FnMut(&mut [u8]) {
    let mut next = 0u8;
    move |buf: &mut [u8]| {
        for byte in buf {
            next = next.wrapping_add(0x3B);
            *byte = next;
        }
    }
}

/// Valid blocks unwrap to exactly the vector's key and header fields, and our own wrap of that
/// key under the same header unwraps again; invalid blocks are refused.
#[test]
fn tr31_vectors_are_unwrapped_and_rewrapped() {
    let (mut valid, mut invalid) = (0, 0);
    for row in load("tr31.json") {
        let block = field(&row, "key_block");
        let version = version_of(block);
        let kbpk = kbpk_for(version, field(&row, "kbpk"));
        if !row["valid"].as_bool().expect("valid flag") {
            invalid += 1;
            let refused = tr31::unwrap(&kbpk, block).map(|_| ());
            if optional(&row, "why").is_some_and(|why| why.contains("payload or MAC")) {
                assert_eq!(refused, Err(tr31::Tr31Error::MacMismatch), "{row}");
            } else {
                assert!(refused.is_err(), "invalid vector accepted: {row}");
            }
            continue;
        }
        valid += 1;
        let (header, key) = tr31::unwrap(&kbpk, block).unwrap_or_else(|e| panic!("{e}: {row}"));
        check_vector_fields(&row, &header, &key);

        if matches!(version, Version::B | Version::D) {
            let wrapped =
                tr31::wrap(&kbpk, &header, &key, &mut counting_rng()).unwrap_or_else(|e| panic!("wrap: {e}: {row}"));
            assert_eq!(&wrapped[..1], &block[..1], "{row}");
            assert_eq!(&wrapped[5..16], &block[5..16], "header fields kept: {row}");
            let (again, key_again) = tr31::unwrap(&kbpk, &wrapped).expect("own block unwraps");
            assert_eq!(again, header, "{row}");
            assert_eq!(key_again, key, "{row}");
        }
    }
    assert!(valid >= 10 && invalid >= 10, "{valid} valid, {invalid} invalid vectors");
}

fn check_vector_fields(row: &Value, header: &tr31::Header, key: &SecretBytes) {
    assert_eq!(key.to_hex_upper().as_str(), field(row, "key"), "{row}");
    if let Some(version) = optional(row, "version") {
        assert_eq!(header.version().to_string(), version, "{row}");
    }
    if let Some(usage) = optional(row, "key_usage") {
        assert_eq!(header.key_usage_str(), usage, "{row}");
    }
    let char_field = |name: &str, actual: u8| {
        if let Some(expected) = optional(row, name) {
            assert_eq!(char::from(actual).to_string(), expected, "{name} of {row}");
        }
    };
    char_field("algorithm", header.algorithm());
    char_field("mode_of_use", header.mode_of_use());
    char_field("exportability", header.exportability());
    if let Some(kcv) = optional(row, "kcv") {
        let typed = match header.algorithm() {
            b'T' => SymmetricKey::tdes(key.clone_secret()),
            b'A' => SymmetricKey::aes(key.clone_secret()),
            other => panic!("vector KCV for algorithm {}", char::from(other)),
        }
        .expect("key of its algorithm");
        assert_eq!(typed.kcv(KcvLen::Three).to_hex(), kcv, "{row}");
    }
    if let Some(blocks) = row.get("optional_blocks").and_then(Value::as_object) {
        for (id, data) in blocks {
            let id: [u8; 2] = id.as_bytes().try_into().expect("two-character ID");
            assert_eq!(header.optional_block(id), data.as_str(), "{row}");
        }
    }
}

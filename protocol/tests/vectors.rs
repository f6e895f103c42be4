//! Data-driven checks against the published and independently computed vectors in
//! `tests/vectors/*.json` (copied from the project's shared vector set, so a fresh clone needs
//! nothing outside the repository).
//!
//! One harness per file. Every vector must pass: they come from the standards and from
//! independent implementations, so a failure here is a bug in this crate, never in the vector.

use std::path::PathBuf;

use serde_json::Value;

use rki_protocol::dukpt::{self, AesKsn, InitialKeyId, Ksn, WorkingKeyUsage};
use rki_protocol::{KcvLen, KeyAlgorithm, SecretBytes, SymmetricKey};

fn load(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
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
    if let (Some(clear), Some(encrypted)) =
        (optional(row, "pin_block_clear"), optional(row, "pin_block_encrypted"))
    {
        let mut block = [0u8; 8];
        hex::decode_to_slice(clear, &mut block).expect("clear PIN block");
        rki_protocol::tdes::encrypt_block(&pin, &mut block);
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
        dukpt::working_key(&derivation, &ksn, WorkingKeyUsage::PinEncryption, KeyAlgorithm::Aes128)
            .expect("PIN key");
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
        let mut mac =
            <Hmac<sha2::Sha256> as Mac>::new_from_slice(key.expose_secret()).expect("any length");
        mac.update(&message);
        let tag = mac.finalize().into_bytes();
        assert_eq!(hex::encode_upper(tag), field(&row, "tag"), "{row}");
    }
}

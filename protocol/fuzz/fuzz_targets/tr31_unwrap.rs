//! Fuzzes the TR-31 decoders: `tr31::unwrap` under a TDES and an AES KBPK, and `Header::parse`.
//! Any panic is a bug: both take attacker-controlled text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rki_protocol::tr31::{self, Header};
use rki_protocol::SymmetricKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tdes) = SymmetricKey::tdes_from_hex("89E88CF7931444F334BD7547FC3F380C") else {
        return;
    };
    let Ok(aes) = SymmetricKey::aes_from_hex("8907E5FAD4FD4ABE28335E6385531868") else {
        return;
    };
    let _ = tr31::unwrap(&tdes, text);
    let _ = tr31::unwrap(&aes, text);
    if let Ok(header) = Header::parse(text) {
        // What parses must format and parse back.
        if let Ok(formatted) = header.format(0) {
            assert!(Header::parse(&formatted).is_ok(), "{formatted}");
        }
    }
});

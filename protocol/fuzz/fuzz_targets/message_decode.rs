//! Fuzzes the frame and message decoder, `frame::open`, which takes every byte a terminal or a
//! rogue MQTT client can publish. Any panic is a bug. When the bytes decode:
//! - `verify` under a fixed key must not panic (it refuses, unless the fuzzer found the tag);
//! - the decoded body, sealed again, must open to the same body and verify under that key: what
//!   the decoder accepts, the encoder can say, within the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rki_protocol::frame::{self, MacKey};
use rki_protocol::SecretBytes;

fuzz_target!(|data: &[u8]| {
    let Ok(unverified) = frame::open(data) else {
        return;
    };
    let body = unverified.peek().clone();
    let Ok(key) = MacKey::new(SecretBytes::from_slice(&[0x42; 32])) else {
        return;
    };
    let _ = unverified.verify(&key);

    // The encoder writes minimal varints, so the re-encoding is never longer than what decoded.
    let sealed = frame::seal(&key, &body).expect("a decoded body seals within the limit");
    assert!(sealed.len() <= data.len(), "re-encoding grew: {} > {}", sealed.len(), data.len());
    let reopened = frame::open(&sealed).expect("a sealed frame opens");
    assert_eq!(reopened.peek(), &body);
    let verified = reopened.verify(&key).expect("a sealed frame verifies under its key");
    assert_eq!(verified.body, body);
});

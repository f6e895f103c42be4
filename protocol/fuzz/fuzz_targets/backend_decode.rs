//! Fuzzes the backend channel's decoders: `frame::open_backend`, which takes every byte a backend
//! (or a rogue MQTT client) can publish on a request topic, `BackendRequest::check`, the topic
//! parser and the backend client id parser. Any panic is a bug. When the bytes decode:
//! - `verify` under a fixed key must not panic;
//! - the decoded body, sealed again, must open to the same body: what the decoder accepts, the
//!   encoder can say, within the backend frame limit;
//! - a request's `check` must not panic, and its digest must be that of its re-decoded self.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rki_protocol::backend::{self, BackendId};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::message::Message;
use rki_protocol::{topic, SecretBytes};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = BackendId::parse_client_id(text) {
            assert_eq!(id.client_id(), text, "a parsed client id formats back to itself");
        }
        if let Some(topic::Inbound::BackendRequest { org, name }) = topic::parse_inbound(text) {
            assert_eq!(topic::backend_request(org, name), text);
        }
    }

    let Ok(unverified) = frame::open_backend(data) else {
        return;
    };
    let body = unverified.peek().clone();
    let Ok(key) = MacKey::new(SecretBytes::from_slice(&[0x42; 32])) else {
        return;
    };
    let _ = unverified.verify(&key);

    let sealed = frame::seal(&key, &body).expect("a decoded body seals within the limit");
    assert!(sealed.len() <= data.len(), "re-encoding grew: {} > {}", sealed.len(), data.len());
    let reopened = frame::open_backend(&sealed).expect("a sealed frame opens");
    assert_eq!(reopened.peek(), &body);
    if let Message::BackendRequest(request) = &body.message {
        let _ = request.check();
        let _ = request.request.changes_state();
        let Message::BackendRequest(again) = &reopened.peek().message else {
            panic!("the same message kind");
        };
        assert_eq!(backend::request_digest(&request.request), backend::request_digest(&again.request));
    }
});

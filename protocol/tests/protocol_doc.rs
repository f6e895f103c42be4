//! The worked examples of `docs/PROTOCOL.md`, checked against the code.
//!
//! Every fenced block of the document tagged ```` ```hex ```` or ```` ```text ```` whose first
//! line is `example: NAME` is an example. This test builds each one from the values the document
//! describes (the constants below), with the crate's own encoder, signer, key agreement and TR-31
//! wrapper, and compares:
//! - the bytes of every `hex` block (text after `#` on a line is a comment) and the exact text of
//!   every `text` block;
//! - the comments too, whitespace aside, because they carry the described values;
//! - that the document has every example and no example this test does not know.
//!
//! Where the document states a formula (the tag, the GUDID hashes, the HKDF outputs), the test
//! also computes it independently with the primitive crates, so the prose cannot drift from the
//! code either.
//!
//! To regenerate the blocks after a deliberate change, run
//! `RKI_PRINT_DOC_EXAMPLES=1 cargo test -p rki-protocol --test protocol_doc -- --nocapture`
//! and paste what it prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use rki_protocol::backend::{BackendId, BackendSecret};
use rki_protocol::dukpt::{self, InitialKeyId, Ksn};
use rki_protocol::frame::{self, MacKey, FRAME_VERSION};
use rki_protocol::init::{self, Ephemeral, Gudid};
use rki_protocol::message::{
    Ack, Answer, BackendAnswer, BackendEvent, BackendRefusalCode, BackendRequest, Body, CreateKey, CreateKeyAnswer,
    DeviceRefusal, Download, Event, Hello, Message, Refusal, RefusalCode, RefusedFrame, Request, SlotStatus, TaskOrder,
    TaskTarget, Unlock,
};
use rki_protocol::terminal::{InjectionType, KeySlot, KeyType, Region, TerminalError};
use rki_protocol::tr31::{self, DukptInitialKeyId, Header, Version};
use rki_protocol::{KcvLen, SecretBytes, SymmetricKey};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"));

// ------------------------------------------------------------------ the described values

const SN: &str = "P3-0001";
const GUDID_TEXT: &str = "0F1E2D3C-4B5A6978-8796A5B4-C3D2E1F0";
const X_POS_DEVICE_ID: &str = "XPOS-0001";
/// RFC 7748 §6.1, Alice's private key: the terminal's ephemeral key in the example.
const DEVICE_X25519_PRIVATE: &str = "77076D0A7318A57D3C16C17251B26645DF4C2F87EBC0992AB177FBA51DB92C2A";
/// RFC 7748 §6.1, Bob's private key: the gateway's ephemeral key in the example.
const GATEWAY_X25519_PRIVATE: &str = "5DAB087E624A8A4B79E17F8B83800EE66F3BB1292618B6FD1C2F8B27FF88E0EB";

const CREATE_KEY_COUNTER: u64 = 1_700_000_000_000_000;
const CREATE_KEY_ANSWER_COUNTER: u64 = 1_700_000_000_250_000;
const REFUSED_REQUEST_COUNTER: u64 = 1_700_000_060_000_000;
const REFUSAL_COUNTER: u64 = 1_700_000_060_004_000;
const HELLO_COUNTER: u64 = 1_700_000_001_000_000;
const DOWNLOAD_TDES_COUNTER: u64 = 1_700_000_001_020_000;
const ACK_COUNTER: u64 = 1_700_000_001_500_000;
const DOWNLOAD_AES_COUNTER: u64 = 1_700_000_002_000_000;
const ACK_REFUSED_COUNTER: u64 = 1_700_000_002_300_000;
const UNLOCK_COUNTER: u64 = 1_700_000_003_000_000;
const BYE_COUNTER: u64 = 1_700_000_004_000_000;
const REPLAYED_DOWNLOAD_COUNTER: u64 = 1_700_000_002_500_000;
const DEVICE_REFUSAL_COUNTER: u64 = 1_700_000_003_500_000;

/// The X9.24-1-2009 Annex A test BDK and initial KSN.
const TDES_BDK: &str = "0123456789ABCDEFFEDCBA9876543210";
const TDES_KSN: &str = "FFFF9876543210E00000";
/// The X9.24-3-2017 test BDK and initial key ID.
const AES_BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
const AES_INITIAL_KEY_ID: &str = "1234567890123456";
/// The TR-31 payload padding of the examples (the gateway uses random bytes).
const PADDING_BYTE: u8 = 0x5A;

/// The backend of §12: its organization, name and secret (as the admin was shown it).
const ORG: &str = "acme";
const BACKEND_NAME: &str = "erp-1";
const BACKEND_SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const BACKEND_REQUEST_ID: u64 = 1001;
const BACKEND_REQUEST_COUNTER: u64 = 1_700_000_010_000_000;
const BACKEND_ANSWER_COUNTER: u64 = 1_700_000_010_040_000;
const BACKEND_EVENT_COUNTER: u64 = 1_700_000_010_050_000;
const BACKEND_EVENT_SEQ: u64 = 17;
const BACKEND_TASK_ID: u64 = 5;
/// When the gateway recorded the ack of execution 42 (milliseconds since the UNIX epoch).
const EXECUTION_ENDED_AT_MS: u64 = 1_700_000_001_520;

const TDES_EXECUTION_ID: u64 = 42;
const AES_EXECUTION_ID: u64 = 43;
const UNLOCK_ID: u64 = 7;

// ------------------------------------------------------------------ annotated byte layouts

/// One field of a layout: its bytes and what they are.
struct Row {
    bytes: Vec<u8>,
    comment: String,
}

/// A byte string cut into commented fields, rendered as a `hex` block.
#[derive(Default)]
struct Layout {
    rows: Vec<Row>,
}

impl Layout {
    fn push(&mut self, bytes: impl Into<Vec<u8>>, comment: impl Into<String>) -> &mut Self {
        self.rows.push(Row { bytes: bytes.into(), comment: comment.into() });
        self
    }

    /// A field encoded on its own by postcard: struct encoding is the plain concatenation of the
    /// fields, which [`Layout::check_against`] proves for every example.
    fn field<T: Serialize + ?Sized>(&mut self, value: &T, comment: impl Into<String>) -> &mut Self {
        let bytes = postcard::to_stdvec(value).expect("encodable field");
        self.push(bytes, comment)
    }

    fn string(&mut self, name: &str, value: &str) -> &mut Self {
        let comment = if value.len() <= 24 {
            format!("{name}: string, length {}, {value:?}", value.len())
        } else {
            format!("{name}: string, length {} (varint), ASCII", value.len())
        };
        self.field(value, comment)
    }

    fn bytes(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.field(value, format!("{name}: bytes, length {}", value.len()))
    }

    fn array(&mut self, name: &str, value: &[u8; 32]) -> &mut Self {
        self.field(value, format!("{name}: [u8; 32], no length prefix"))
    }

    fn u64(&mut self, name: &str, value: u64) -> &mut Self {
        self.field(&value, format!("{name}: u64 varint = {value}"))
    }

    fn slot(&mut self, name: &str, slot: KeySlot) -> &mut Self {
        self.field(&slot, format!("{name}: KeySlot, u16 varint = {}", slot.0))
    }

    fn variant(&mut self, name: &str, index: u32, label: &str) -> &mut Self {
        self.field(&index, format!("{name}: variant {index} = {label}"))
    }

    fn u16(&mut self, name: &str, value: u16) -> &mut Self {
        self.field(&value, format!("{name}: u16 varint = {value}"))
    }

    fn i32(&mut self, name: &str, value: i32) -> &mut Self {
        self.field(&value, format!("{name}: i32 zigzag varint = {value}"))
    }

    fn boolean(&mut self, name: &str, value: bool) -> &mut Self {
        self.field(&value, format!("{name}: bool = {value}"))
    }

    fn concat(&self) -> Vec<u8> {
        self.rows.iter().flat_map(|r| r.bytes.iter().copied()).collect()
    }

    /// The layout must cover exactly the bytes the code produced.
    fn check_against(&self, name: &str, encoded: &[u8]) {
        assert_eq!(hex::encode_upper(self.concat()), hex::encode_upper(encoded), "{name}: layout");
    }

    /// The block body: 16 bytes a line, the comment on a field's first line.
    fn render(&self) -> String {
        let mut out = String::new();
        for row in &self.rows {
            if row.bytes.is_empty() {
                let _ = writeln!(out, "{:48}# {}", "", row.comment);
                continue;
            }
            for (i, chunk) in row.bytes.chunks(16).enumerate() {
                let line: Vec<String> = chunk.iter().map(|b| format!("{b:02X}")).collect();
                let line = line.join(" ");
                if i == 0 {
                    let _ = writeln!(out, "{line:47} # {}", row.comment);
                } else {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        out
    }
}

fn plain(bytes: &[u8], comment: &str) -> Layout {
    let mut layout = Layout::default();
    layout.push(bytes.to_vec(), comment.to_string());
    layout
}

/// An example as the document shows it.
enum Expected {
    Hex(Layout),
    Text(String),
}

impl Expected {
    fn render(&self) -> String {
        match self {
            Expected::Hex(layout) => layout.render(),
            Expected::Text(text) => format!("{text}\n"),
        }
    }

    fn fence(&self) -> &'static str {
        match self {
            Expected::Hex(_) => "hex",
            Expected::Text(_) => "text",
        }
    }
}

// ------------------------------------------------------------------ building the examples

fn hex32(text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).expect("32 bytes of hex");
    out
}

fn mac_key(bytes: &[u8]) -> MacKey {
    MacKey::new(SecretBytes::from_slice(bytes)).expect("32-byte key")
}

/// HMAC-SHA256(key, [version] || body), with the `hmac` crate directly: the formula the
/// document states, independent of `frame`.
fn tag_by_formula(key: &MacKey, body: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret()).expect("HMAC takes any key");
    mac.update(&[FRAME_VERSION]);
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
    }
    hash.finalize().into()
}

/// The key agreement exactly as the document describes it, from the shared secret on.
struct SpecSecrets {
    signing_key: [u8; 32],
    kbpk_aes: [u8; 32],
    kbpk_tdes: [u8; 24],
    mqtt_password: String,
}

fn spec_secrets(shared: &[u8; 32], gudid_mac_key: &[u8], transcript: &[u8; 32]) -> SpecSecrets {
    let hkdf = Hkdf::<Sha256>::new(Some(gudid_mac_key), shared);
    let expand = |label: &[u8], out: &mut [u8]| {
        let info = [label, &transcript[..]].concat();
        hkdf.expand(&info, out).expect("short output");
    };
    let mut signing_key = [0u8; 32];
    expand(b"rki/v1 device signing key", &mut signing_key);
    let mut kbpk_aes = [0u8; 32];
    expand(b"rki/v1 kbpk aes256", &mut kbpk_aes);
    let mut kbpk_tdes = [0u8; 24];
    expand(b"rki/v1 kbpk tdes3", &mut kbpk_tdes);
    let mut password = [0u8; 32];
    expand(b"rki/v1 mqtt password", &mut password);
    SpecSecrets { signing_key, kbpk_aes, kbpk_tdes, mqtt_password: hex::encode_upper(password) }
}

/// `SHA-256("rki/v1 init transcript" || u32be len || CreateKey body || u32be len || answer body)`.
fn spec_transcript(create_key_body: &[u8], answer_body: &[u8]) -> [u8; 32] {
    let ck_len = (create_key_body.len() as u32).to_be_bytes();
    let an_len = (answer_body.len() as u32).to_be_bytes();
    sha256(&[b"rki/v1 init transcript", &ck_len, create_key_body, &an_len, answer_body])
}

/// Every example, by name, in document order.
struct Examples {
    items: Vec<(String, Expected)>,
}

impl Examples {
    fn hex(&mut self, name: &str, layout: Layout) {
        self.items.push((name.to_string(), Expected::Hex(layout)));
    }

    fn text(&mut self, name: &str, text: &str) {
        self.items.push((name.to_string(), Expected::Text(text.to_string())));
    }

    /// `{name}.key` is documented once per key elsewhere; this adds `.body`, `.tag` and
    /// `.frame`, after checking the code and the formula agree on every byte.
    fn message(&mut self, name: &str, key: &MacKey, body: &Body, layout: Layout) {
        let body_bytes = postcard::to_stdvec(body).expect("encode");
        layout.check_against(name, &body_bytes);
        body.validate().expect("the example is within the limits");

        let sealed = frame::seal(key, body).expect("seal");
        let tag = tag_by_formula(key, &body_bytes);
        let mut frame_layout = Layout::default();
        frame_layout
            .push(vec![FRAME_VERSION], format!("version: u8 = {FRAME_VERSION}"))
            .field(&(body_bytes.len() as u32), format!("body: length {} (varint)", body_bytes.len()))
            .push(body_bytes.clone(), format!("body: the {} bytes of {name}.body", body_bytes.len()))
            .push(tag.to_vec(), "tag: [u8; 32], HMAC-SHA256");
        frame_layout.check_against(&format!("{name}.frame"), &sealed);

        // What the receiver sees: the same body, the same bytes, a tag that verifies.
        let opened = if body.message.kind().is_backend() { frame::open_backend(&sealed) } else { frame::open(&sealed) }
            .expect("open");
        assert_eq!(opened.body_bytes(), body_bytes.as_slice(), "{name}: body bytes");
        assert_eq!(opened.peek(), body, "{name}: decoded body");
        let verified = opened.verify(key).expect("own tag verifies");
        assert_eq!(&verified.body, body);

        self.hex(&format!("{name}.body"), layout);
        self.hex(&format!("{name}.tag"), plain(&tag, "HMAC-SHA256(key, 01 || body)"));
        self.hex(&format!("{name}.frame"), frame_layout);
    }
}

fn body_head(layout: &mut Layout, body: &Body, index: u32, label: &str) {
    layout.string("party", &body.party).u64("counter", body.counter).variant("message", index, label);
}

fn create_key_layout(body: &Body, m: &CreateKey) -> Layout {
    let mut l = Layout::default();
    body_head(&mut l, body, 0, "CreateKey");
    l.array("gudid_id", &m.gudid_id)
        .string("x_pos_device_id", &m.x_pos_device_id)
        .array("device_public", &m.device_public);
    l
}

fn create_key_answer_layout(body: &Body, m: &CreateKeyAnswer) -> Layout {
    let mut l = Layout::default();
    body_head(&mut l, body, 1, "CreateKeyAnswer");
    l.array("gudid_id", &m.gudid_id)
        .u64("request_counter", m.request_counter)
        .array("gateway_public", &m.gateway_public);
    l
}

fn hello_layout(body: &Body, m: &Hello) -> Layout {
    let mut l = Layout::default();
    body_head(&mut l, body, 2, "Hello");
    l.string("model", &m.model)
        .string("rom_version", &m.rom_version)
        .string("app_version", &m.app_version)
        .variant("region", m.region as u32, &format!("{:?}", m.region))
        .boolean("debug_mode", m.debug_mode)
        .boolean("locked", m.locked)
        .field(&(m.slots.len() as u32), format!("slots: sequence, length {}", m.slots.len()));
    for (i, s) in m.slots.iter().enumerate() {
        l.slot(&format!("slots[{i}].slot"), s.slot)
            .variant(&format!("slots[{i}].key_type"), key_type_index(s.key_type), &format!("{:?}", s.key_type))
            .bytes(&format!("slots[{i}].key_id"), &s.key_id)
            .bytes(&format!("slots[{i}].kcv"), &s.kcv);
    }
    l
}

fn ack_layout(body: &Body, m: &Ack) -> Layout {
    let mut l = Layout::default();
    body_head(&mut l, body, 3, "Ack");
    l.u64("execution_id", m.execution_id)
        .field(&m.result, format!("result: i32 zigzag varint = {}", m.result))
        .slot("slot", m.slot)
        .bytes("key_id", &m.key_id)
        .bytes("kcv", &m.kcv)
        .variant("injection", m.injection as u32, &format!("{:?}", m.injection));
    l
}

fn download_layout(body: &Body, m: &Download) -> Layout {
    let mut l = Layout::default();
    body_head(&mut l, body, 5, "Download");
    l.u64("execution_id", m.execution_id)
        .slot("slot", m.slot)
        .variant("key_type", key_type_index(m.key_type), &format!("{:?}", m.key_type))
        .string("key_block", &m.key_block)
        .bytes("key_id", &m.key_id)
        .bytes("kcv", &m.kcv);
    l
}

fn key_type_index(key_type: KeyType) -> u32 {
    KeyType::ALL.iter().position(|t| *t == key_type).expect("listed") as u32
}

fn fixed_padding(buf: &mut [u8]) {
    buf.fill(PADDING_BYTE);
}

fn build() -> Examples {
    let mut ex = Examples { items: Vec::new() };

    // Initialisation: the GUDID and its two hashes.
    let gudid = Gudid::parse(GUDID_TEXT).expect("gudid");
    assert_eq!(gudid.expose_text().as_str(), GUDID_TEXT, "the text form is canonical");
    let gudid_bytes = hex::decode(GUDID_TEXT.replace('-', "")).expect("hex");
    let gudid_id = gudid.id();
    let gudid_mac = gudid.mac_key();
    assert_eq!(gudid_id, sha256(&[b"rki/v1 gudid id", &gudid_bytes]));
    assert_eq!(gudid_mac.expose_secret(), sha256(&[b"rki/v1 gudid mac", &gudid_bytes]));
    ex.text("gudid.text", GUDID_TEXT);
    ex.hex("gudid.bytes", plain(&gudid_bytes, "GUDID, 16 bytes"));
    ex.hex("gudid.id", plain(&gudid_id, "SHA-256(\"rki/v1 gudid id\" || GUDID)"));
    ex.hex("gudid.mac_key", plain(gudid_mac.expose_secret(), "SHA-256(\"rki/v1 gudid mac\" || GUDID)"));
    // The bootstrap identity's MQTT password: HMAC-SHA256 under the GUDID, of the label and the SN.
    let bootstrap_password = gudid.bootstrap_password(SN);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&gudid_bytes).expect("HMAC takes any key");
    mac.update(b"rki/v1 bootstrap password");
    mac.update(SN.as_bytes());
    let tag = mac.finalize().into_bytes();
    assert_eq!(bootstrap_password.expose_secret(), hex::encode_upper(tag).as_bytes());
    ex.text("gudid.bootstrap_password", std::str::from_utf8(bootstrap_password.expose_secret()).expect("ascii"));

    // The two ephemeral key pairs.
    let device_secret = StaticSecret::from(hex32(DEVICE_X25519_PRIVATE));
    let gateway_secret = StaticSecret::from(hex32(GATEWAY_X25519_PRIVATE));
    let device_public = PublicKey::from(&device_secret).to_bytes();
    let gateway_public = PublicKey::from(&gateway_secret).to_bytes();
    ex.hex("device.x25519_private", plain(&hex32(DEVICE_X25519_PRIVATE), "terminal's ephemeral private key"));
    ex.hex("device.x25519_public", plain(&device_public, "X25519(private, 9)"));
    ex.hex("gateway.x25519_private", plain(&hex32(GATEWAY_X25519_PRIVATE), "gateway's ephemeral private key"));
    ex.hex("gateway.x25519_public", plain(&gateway_public, "X25519(private, 9)"));

    let create_key = CreateKey { gudid_id, x_pos_device_id: X_POS_DEVICE_ID.into(), device_public };
    let create_key_body =
        Body { party: SN.into(), counter: CREATE_KEY_COUNTER, message: Message::CreateKey(create_key.clone()) };
    ex.message("create_key", &gudid_mac, &create_key_body, create_key_layout(&create_key_body, &create_key));

    let answer = CreateKeyAnswer { gudid_id, request_counter: CREATE_KEY_COUNTER, gateway_public };
    let answer_body = Body {
        party: SN.into(),
        counter: CREATE_KEY_ANSWER_COUNTER,
        message: Message::CreateKeyAnswer(answer.clone()),
    };
    ex.message("create_key_answer", &gudid_mac, &answer_body, create_key_answer_layout(&answer_body, &answer));

    // The derivation, as the document states it.
    let ck_bytes = postcard::to_stdvec(&create_key_body).expect("encode");
    let an_bytes = postcard::to_stdvec(&answer_body).expect("encode");
    let shared = device_secret.diffie_hellman(&PublicKey::from(gateway_public)).to_bytes();
    assert_eq!(shared, gateway_secret.diffie_hellman(&PublicKey::from(device_public)).to_bytes());
    let transcript = spec_transcript(&ck_bytes, &an_bytes);
    assert_eq!(transcript, init::transcript_hash(&ck_bytes, &an_bytes));
    let secrets = spec_secrets(&shared, gudid_mac.expose_secret(), &transcript);
    ex.hex("init.shared_secret", plain(&shared, "X25519(own private, peer public)"));
    ex.hex("init.transcript_hash", plain(&transcript, "SHA-256 of the transcript"));
    ex.hex(
        "device.signing_key",
        plain(&secrets.signing_key, "HKDF, info \"rki/v1 device signing key\" || transcript hash"),
    );
    ex.hex("device.kbpk_aes", plain(&secrets.kbpk_aes, "HKDF, info \"rki/v1 kbpk aes256\" || transcript hash"));
    ex.hex("device.kbpk_tdes", plain(&secrets.kbpk_tdes, "HKDF, info \"rki/v1 kbpk tdes3\" || transcript hash"));
    ex.text("device.mqtt_password", &secrets.mqtt_password);
    let password_hash = init::password_hash(secrets.mqtt_password.as_bytes());
    assert_eq!(password_hash, sha256(&[b"rki/v1 mqtt password", secrets.mqtt_password.as_bytes()]));
    ex.hex("device.mqtt_password_hash", plain(&password_hash, "SHA-256(\"rki/v1 mqtt password\" || password)"));

    let signing_key = mac_key(&secrets.signing_key);
    let kbpk_aes = SymmetricKey::aes(SecretBytes::from_slice(&secrets.kbpk_aes)).expect("aes");
    let kbpk_tdes = SymmetricKey::tdes(SecretBytes::from_slice(&secrets.kbpk_tdes)).expect("tdes");

    // A refusal of a second CreateKey with the spent GUDID.
    let refusal_key = MacKey::public_refusal_key();
    assert_eq!(refusal_key.expose_secret(), sha256(&[b"rki/v1 public refusal key"]));
    ex.hex("refusal.key", plain(refusal_key.expose_secret(), "SHA-256(\"rki/v1 public refusal key\")"));
    let refusal = Refusal { request_counter: REFUSED_REQUEST_COUNTER, code: RefusalCode::GudidUsed };
    let refusal_body = Body { party: SN.into(), counter: REFUSAL_COUNTER, message: Message::Refusal(refusal.clone()) };
    let mut l = Layout::default();
    body_head(&mut l, &refusal_body, 7, "Refusal");
    l.u64("request_counter", refusal.request_counter).variant(
        "code",
        refusal.code as u32,
        &format!("{:?}", refusal.code),
    );
    ex.message("refusal", &refusal_key, &refusal_body, l);

    // The keys of the two downloads.
    let tdes_bdk = SymmetricKey::tdes_from_hex(TDES_BDK).expect("bdk");
    let ksn = Ksn::from_hex(TDES_KSN).expect("ksn");
    let ipek = dukpt::derive_ipek(&tdes_bdk, &ksn).expect("ipek");
    let ipek_kcv = ipek.kcv(KcvLen::Three);
    let aes_bdk = SymmetricKey::aes_from_hex(AES_BDK).expect("bdk");
    let ik_id = InitialKeyId::from_hex(AES_INITIAL_KEY_ID).expect("id");
    let aes_initial = dukpt::derive_initial_key(&aes_bdk, &ik_id).expect("initial key");
    let aes_kcv = aes_initial.kcv(KcvLen::Three);

    // Hello: a development AES key already sits in slot 4.
    let hello = Hello {
        model: "P3".into(),
        rom_version: "3.0.15".into(),
        app_version: "2.1.0".into(),
        region: Region::Eu,
        debug_mode: false,
        locked: false,
        slots: vec![SlotStatus {
            slot: KeySlot::DEVELOPMENT,
            key_type: KeyType::Ipek,
            key_id: ik_id.as_bytes().to_vec(),
            kcv: aes_kcv.as_bytes().to_vec(),
        }],
    };
    let hello_body = Body { party: SN.into(), counter: HELLO_COUNTER, message: Message::Hello(hello.clone()) };
    ex.message("hello", &signing_key, &hello_body, hello_layout(&hello_body, &hello));

    // Download of a TDES DUKPT IPEK: TR-31 version B under the TDES KBPK.
    ex.hex("download_tdes.ipek", plain(ipek.expose_secret(), "IPEK = X9.24-1 IPEK(BDK, KSN)"));
    let header = Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&ipek_kcv)).expect("header");
    let block = tr31::wrap(&kbpk_tdes, &header, ipek.secret(), &mut fixed_padding).expect("wrap");
    check_block(&kbpk_tdes, &block, &ipek, b'T');
    let steps = tr31_by_steps(
        Kbpk::Tdes3(&secrets.kbpk_tdes),
        &block[..header.encoded_len()],
        ipek.expose_secret(),
        PADDING_BYTE,
    );
    assert_eq!(steps.block, block, "the documented TR-31 steps give the code's block");
    push_tr31_steps(&mut ex, "download_tdes", &steps);
    ex.text("download_tdes.key_block", &block);
    let download = Download {
        execution_id: TDES_EXECUTION_ID,
        slot: KeySlot::PRODUCTION,
        key_type: KeyType::Ipek,
        key_block: block,
        key_id: ksn.as_bytes().to_vec(),
        kcv: ipek_kcv.as_bytes().to_vec(),
    };
    let download_body =
        Body { party: SN.into(), counter: DOWNLOAD_TDES_COUNTER, message: Message::Download(download.clone()) };
    ex.message("download_tdes", &signing_key, &download_body, download_layout(&download_body, &download));

    // The terminal installs it and acknowledges.
    let ack = Ack {
        execution_id: TDES_EXECUTION_ID,
        result: 0,
        slot: KeySlot::PRODUCTION,
        key_id: ksn.as_bytes().to_vec(),
        kcv: ipek_kcv.as_bytes().to_vec(),
        injection: InjectionType::Auto,
    };
    let ack_body = Body { party: SN.into(), counter: ACK_COUNTER, message: Message::Ack(ack.clone()) };
    ex.message("ack", &signing_key, &ack_body, ack_layout(&ack_body, &ack));

    // Download of an AES DUKPT initial key: TR-31 version D under the AES KBPK.
    ex.hex("download_aes.initial_key", plain(aes_initial.expose_secret(), "X9.24-3 initial key(BDK, IK ID)"));
    let header = Header::dukpt_initial_key(Version::D, DukptInitialKeyId::Aes(ik_id), Some(&aes_kcv)).expect("header");
    let block = tr31::wrap(&kbpk_aes, &header, aes_initial.secret(), &mut fixed_padding).expect("wrap");
    check_block(&kbpk_aes, &block, &aes_initial, b'A');
    let steps = tr31_by_steps(
        Kbpk::Aes256(&secrets.kbpk_aes),
        &block[..header.encoded_len()],
        aes_initial.expose_secret(),
        PADDING_BYTE,
    );
    assert_eq!(steps.block, block, "the documented TR-31 steps give the code's block");
    push_tr31_steps(&mut ex, "download_aes", &steps);
    ex.text("download_aes.key_block", &block);
    let download = Download {
        execution_id: AES_EXECUTION_ID,
        slot: KeySlot::PRODUCTION,
        key_type: KeyType::Ipek,
        key_block: block,
        key_id: ik_id.as_bytes().to_vec(),
        kcv: aes_kcv.as_bytes().to_vec(),
    };
    let download_body =
        Body { party: SN.into(), counter: DOWNLOAD_AES_COUNTER, message: Message::Download(download.clone()) };
    ex.message("download_aes", &signing_key, &download_body, download_layout(&download_body, &download));

    // The terminal is locked by the first key: the second is refused with -11208.
    let refused = Ack {
        execution_id: AES_EXECUTION_ID,
        result: TerminalError::DeviceLocked.code(),
        slot: KeySlot::PRODUCTION,
        key_id: Vec::new(),
        kcv: Vec::new(),
        injection: InjectionType::Auto,
    };
    let refused_body = Body { party: SN.into(), counter: ACK_REFUSED_COUNTER, message: Message::Ack(refused.clone()) };
    ex.message("ack_refused", &signing_key, &refused_body, ack_layout(&refused_body, &refused));

    let unlock = Unlock { unlock_id: UNLOCK_ID };
    let unlock_body = Body { party: SN.into(), counter: UNLOCK_COUNTER, message: Message::Unlock(unlock.clone()) };
    let mut l = Layout::default();
    body_head(&mut l, &unlock_body, 6, "Unlock");
    l.u64("unlock_id", unlock.unlock_id);
    ex.message("unlock", &signing_key, &unlock_body, l);

    // A download of execution 43 whose counter is below the unlock's, which the terminal accepted.
    let device_refusal = DeviceRefusal {
        refused_counter: REPLAYED_DOWNLOAD_COUNTER,
        accepted_counter: UNLOCK_COUNTER,
        frame: RefusedFrame::Download { execution_id: AES_EXECUTION_ID },
        code: RefusalCode::Replay,
    };
    let device_refusal_body = Body {
        party: SN.into(),
        counter: DEVICE_REFUSAL_COUNTER,
        message: Message::DeviceRefusal(device_refusal.clone()),
    };
    let mut l = Layout::default();
    body_head(&mut l, &device_refusal_body, 10, "DeviceRefusal");
    l.u64("refused_counter", device_refusal.refused_counter)
        .u64("accepted_counter", device_refusal.accepted_counter)
        .variant("frame", 0, "RefusedFrame::Download")
        .u64("execution_id", AES_EXECUTION_ID)
        .variant("code", device_refusal.code as u32, &format!("{:?}", device_refusal.code));
    ex.message("device_refusal", &signing_key, &device_refusal_body, l);

    let bye_body = Body { party: SN.into(), counter: BYE_COUNTER, message: Message::Bye };
    let mut l = Layout::default();
    body_head(&mut l, &bye_body, 4, "Bye (no fields)");
    ex.message("bye", &signing_key, &bye_body, l);

    backend_examples(&mut ex, &ksn, &ipek_kcv);

    // The encoding rules, one value each.
    let mut rule = |name: &str, bytes: Vec<u8>, comment: &str| ex.hex(name, plain(&bytes, comment));
    rule("encoding.u64_300", enc(&300u64), "varint: 300 = 0b10_0101100 -> AC 02");
    rule("encoding.u64_counter", enc(&CREATE_KEY_COUNTER), "varint: 1700000000000000");
    rule("encoding.u16_9001", enc(&KeySlot::HARDWARE_CERTIFICATE), "KeySlot 9001 as u16 varint");
    rule("encoding.i32_minus_1", enc(&-1i32), "zigzag(-1) = 1");
    rule("encoding.i32_minus_11208", enc(&-11208i32), "zigzag(-11208) = 22415");
    rule("encoding.i32_minus_20003", enc(&-20003i32), "zigzag(-20003) = 40005");
    rule("encoding.string_p3", enc(&"P3"), "string: length 2, then UTF-8");
    rule("encoding.bytes_empty", enc(&Vec::<u8>::new()), "empty bytes: length 0");
    ex
}

/// `HMAC-SHA256(secret, label || org || 00 || name)`, with the `hmac` crate directly.
fn backend_derivation(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(label);
    mac.update(ORG.as_bytes());
    mac.update(&[0]);
    mac.update(BACKEND_NAME.as_bytes());
    mac.finalize().into_bytes().into()
}

/// §12: the backend `acme`/`erp-1`, its keys, and one frame of each message.
fn backend_examples(ex: &mut Examples, ksn: &Ksn, kcv: &rki_protocol::Kcv) {
    let secret = BackendSecret::parse(BACKEND_SECRET).expect("secret");
    assert_eq!(secret.expose_text().as_str(), BACKEND_SECRET, "the text form is canonical");
    let id = BackendId::new(ORG, BACKEND_NAME).expect("names");
    assert_eq!(BackendId::parse_client_id(&id.client_id()), Ok(id.clone()));
    let secret_bytes = hex::decode(BACKEND_SECRET).expect("hex");
    let password = secret.mqtt_password(&id);
    let spec_password = hex::encode(backend_derivation(&secret_bytes, b"rki/v1 backend mqtt password"));
    assert_eq!(password.expose_secret(), spec_password.as_bytes());
    let mac_key = secret.mac_key(&id);
    assert_eq!(mac_key.expose_secret(), backend_derivation(&secret_bytes, b"rki/v1 backend mac key"));
    ex.text("backend.secret", BACKEND_SECRET);
    ex.text("backend.client_id", &id.client_id());
    ex.text("backend.mqtt_password", &spec_password);
    ex.hex(
        "backend.mac_key",
        plain(mac_key.expose_secret(), "HMAC-SHA256(secret, \"rki/v1 backend mac key\" || org || 00 || name)"),
    );

    let devices = vec![SN.to_string(), "P3-0002".to_string()];
    let order = TaskOrder {
        target: TaskTarget::Devices(devices.clone()),
        key_source: "BDK-2024".into(),
        slot: KeySlot::PRODUCTION,
        expiry_days: 0,
    };
    let request = BackendRequest { request_id: BACKEND_REQUEST_ID, request: Request::CreateTask(order.clone()) };
    assert_eq!(request.check(), Ok(()));
    let body =
        Body { party: ORG.into(), counter: BACKEND_REQUEST_COUNTER, message: Message::BackendRequest(request.clone()) };
    let mut l = Layout::default();
    body_head(&mut l, &body, 8, "BackendRequest");
    l.u64("request_id", request.request_id)
        .variant("request", 0, "Request::CreateTask")
        .variant("target", 0, "TaskTarget::Devices")
        .field(&(devices.len() as u32), format!("target.devices: sequence, length {}", devices.len()));
    for (i, sn) in devices.iter().enumerate() {
        l.string(&format!("target.devices[{i}]"), sn);
    }
    l.string("key_source", &order.key_source).slot("slot", order.slot).u16("expiry_days", order.expiry_days);
    ex.message("backend_request", &mac_key, &body, l);

    let code = BackendRefusalCode::NoDeviceReady;
    let reason = "no device is ready";
    let answer = BackendAnswer { request_id: BACKEND_REQUEST_ID, answer: Answer::refused(code, reason) };
    let body =
        Body { party: ORG.into(), counter: BACKEND_ANSWER_COUNTER, message: Message::BackendAnswer(answer.clone()) };
    let mut l = Layout::default();
    body_head(&mut l, &body, 9, "BackendAnswer");
    l.u64("request_id", answer.request_id)
        .variant("answer", 7, "Answer::Refused")
        .field(&code.code(), format!("code: u16 varint = {} ({})", code.code(), code.as_str()))
        .string("reason", reason);
    ex.message("backend_answer", &mac_key, &body, l);

    let outcome = "succeeded";
    let meaning = rki_protocol::terminal::result_meaning(0);
    let event = BackendEvent {
        seq: BACKEND_EVENT_SEQ,
        event: Event::ExecutionEnded {
            task_id: BACKEND_TASK_ID,
            execution_id: TDES_EXECUTION_ID,
            sn: SN.into(),
            outcome: outcome.into(),
            error_code: 0,
            meaning: meaning.into(),
            ksn: ksn.as_bytes().to_vec(),
            kcv: kcv.as_bytes().to_vec(),
            at_ms: EXECUTION_ENDED_AT_MS,
        },
    };
    let body =
        Body { party: ORG.into(), counter: BACKEND_EVENT_COUNTER, message: Message::BackendEvent(event.clone()) };
    let mut l = Layout::default();
    body_head(&mut l, &body, 11, "BackendEvent");
    l.u64("seq", event.seq)
        .variant("event", 1, "Event::ExecutionEnded")
        .u64("task_id", BACKEND_TASK_ID)
        .u64("execution_id", TDES_EXECUTION_ID)
        .string("sn", SN)
        .string("outcome", outcome)
        .i32("error_code", 0)
        .string("meaning", meaning)
        .bytes("ksn", ksn.as_bytes())
        .bytes("kcv", kcv.as_bytes())
        .u64("at_ms", EXECUTION_ENDED_AT_MS);
    ex.message("backend_event", &mac_key, &body, l);
}

fn enc<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encodable")
}

/// The intermediate values of a TR-31 version B or D wrap, computed by the document's steps with
/// the primitive crates (`cmac`, `des`, `aes`), independently of `tr31`.
struct Tr31Steps {
    kbek: Vec<u8>,
    kbak: Vec<u8>,
    clear_payload: Vec<u8>,
    mac: Vec<u8>,
    block: String,
}

enum Kbpk<'a> {
    Tdes3(&'a [u8]),
    Aes256(&'a [u8]),
}

fn cmac_of(kbpk: &Kbpk<'_>, data: &[u8]) -> Vec<u8> {
    use cmac::digest::KeyInit;
    use cmac::Mac;
    match kbpk {
        Kbpk::Tdes3(key) => {
            let mut mac = <cmac::Cmac<des::TdesEde3> as KeyInit>::new_from_slice(key).expect("key");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        Kbpk::Aes256(key) => {
            let mut mac = <cmac::Cmac<aes::Aes256> as KeyInit>::new_from_slice(key).expect("key");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
    }
}

fn cbc_encrypt(kbek: &Kbpk<'_>, iv: &[u8], data: &mut [u8]) {
    use aes::cipher::generic_array::GenericArray;
    use aes::cipher::{BlockEncrypt, KeyInit};
    let block_len = iv.len();
    let mut chain = iv.to_vec();
    for block in data.chunks_exact_mut(block_len) {
        for (b, c) in block.iter_mut().zip(&chain) {
            *b ^= c;
        }
        match kbek {
            Kbpk::Tdes3(key) => {
                des::TdesEde3::new_from_slice(key).expect("key").encrypt_block(GenericArray::from_mut_slice(block))
            }
            Kbpk::Aes256(key) => {
                aes::Aes256::new_from_slice(key).expect("key").encrypt_block(GenericArray::from_mut_slice(block))
            }
        }
        chain.copy_from_slice(block);
    }
}

fn tr31_by_steps(kbpk: Kbpk<'_>, header: &str, key: &[u8], padding: u8) -> Tr31Steps {
    // Version B: TDES, 8-byte blocks and MAC, 3TDEA indicator 0001, 192 bits.
    // Version D: AES, 16-byte blocks and MAC, AES-256 indicator 0004, 256 bits.
    let (block_len, indicator, bits, key_len, masked_len): (usize, u8, u16, usize, usize) = match kbpk {
        Kbpk::Tdes3(_) => (8, 1, 192, 24, 24),
        Kbpk::Aes256(_) => (16, 4, 256, 32, 32),
    };
    let derive = |usage: u8| -> Vec<u8> {
        let mut out = Vec::new();
        for counter in 1u8.. {
            if out.len() >= key_len {
                break;
            }
            let [hi, lo] = bits.to_be_bytes();
            out.extend(cmac_of(&kbpk, &[counter, 0, usage, 0, 0, indicator, hi, lo]));
        }
        out.truncate(key_len);
        out
    };
    let (kbek, kbak) = (derive(0), derive(1));
    let (kbek_key, kbak_key) = match kbpk {
        Kbpk::Tdes3(_) => (Kbpk::Tdes3(&kbek), Kbpk::Tdes3(&kbak)),
        Kbpk::Aes256(_) => (Kbpk::Aes256(&kbek), Kbpk::Aes256(&kbak)),
    };
    let payload_len = (2 + masked_len.max(key.len())).div_ceil(block_len) * block_len;
    let mut clear_payload = ((key.len() * 8) as u16).to_be_bytes().to_vec();
    clear_payload.extend_from_slice(key);
    clear_payload.resize(payload_len, padding);
    let mac = cmac_of(&kbak_key, &[header.as_bytes(), &clear_payload].concat());
    let mut encrypted = clear_payload.clone();
    cbc_encrypt(&kbek_key, &mac, &mut encrypted);
    let block = format!("{header}{}{}", hex::encode_upper(&encrypted), hex::encode_upper(&mac));
    Tr31Steps { kbek, kbak, clear_payload, mac, block }
}

fn push_tr31_steps(ex: &mut Examples, name: &str, steps: &Tr31Steps) {
    ex.hex(&format!("{name}.kbek"), plain(&steps.kbek, "key block encryption key"));
    ex.hex(&format!("{name}.kbak"), plain(&steps.kbak, "key block authentication key"));
    ex.hex(&format!("{name}.clear_payload"), plain(&steps.clear_payload, "key length in bits, key, padding"));
    ex.hex(&format!("{name}.mac"), plain(&steps.mac, "CMAC(KBAK, header || clear payload)"));
}

/// What the terminal checks of a key block: it unwraps under the KBPK, the usage is B1, the
/// algorithm is the key's, and the KCV announced in the header is the key's.
fn check_block(kbpk: &SymmetricKey, block: &str, key: &SymmetricKey, algorithm: u8) {
    let (header, unwrapped) = tr31::unwrap(kbpk, block).expect("unwrap");
    assert_eq!(header.key_usage(), *b"B1");
    assert_eq!(header.algorithm(), algorithm);
    assert_eq!(header.mode_of_use(), b'X');
    assert_eq!(unwrapped.expose_secret(), key.expose_secret());
    assert_eq!(header.kcv(), Some(key.kcv(KcvLen::Three)));
}

// ------------------------------------------------------------------ reading the document

/// One example block of the document.
struct DocBlock {
    fence: String,
    /// The lines after the `example:` line.
    lines: Vec<String>,
    line_number: usize,
}

fn doc_examples(doc: &str) -> BTreeMap<String, DocBlock> {
    let mut found = BTreeMap::new();
    let mut lines = doc.lines().enumerate();
    while let Some((number, line)) = lines.next() {
        let Some(fence) = line.trim_start().strip_prefix("```") else { continue };
        let fence = fence.trim().to_string();
        let mut body = Vec::new();
        for (_, inner) in lines.by_ref() {
            if inner.trim_start().starts_with("```") {
                break;
            }
            body.push(inner.to_string());
        }
        let name = body.first().and_then(|l| l.trim().strip_prefix("example:")).map(str::trim);
        match (fence.as_str(), name) {
            (_, Some(name)) => {
                let block = DocBlock { fence: fence.clone(), lines: body[1..].to_vec(), line_number: number + 1 };
                assert!(
                    found.insert(name.to_string(), block).is_none(),
                    "example {name} appears twice (line {})",
                    number + 1
                );
            }
            ("hex", None) => panic!("line {}: a hex block without an `example:` line is unchecked", number + 1),
            _ => {}
        }
    }
    found
}

/// The bytes of a hex block: pairs of hex digits, whitespace and `#` comments ignored.
fn hex_of_block(lines: &[String]) -> Result<Vec<u8>, String> {
    let digits: String = lines
        .iter()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    hex::decode(&digits).map_err(|e| format!("not hex: {e}"))
}

/// Whitespace-insensitive form of a block, to compare the comments.
fn normalized(text: &str) -> Vec<String> {
    text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|l| !l.is_empty()).collect()
}

fn print_all(examples: &Examples) {
    for (name, expected) in &examples.items {
        println!("```{}\nexample: {name}\n{}```\n", expected.fence(), expected.render());
    }
}

// ------------------------------------------------------------------ the tests

#[test]
fn every_worked_example_in_the_protocol_document_matches_the_code() {
    let examples = build();
    if std::env::var_os("RKI_PRINT_DOC_EXAMPLES").is_some() {
        print_all(&examples);
    }
    let doc = doc_examples(DOC);
    let mut failures = Vec::new();
    for (name, expected) in &examples.items {
        let Some(block) = doc.get(name) else {
            failures.push(format!("{name}: missing from docs/PROTOCOL.md"));
            continue;
        };
        let at = block.line_number;
        if block.fence != expected.fence() {
            failures.push(format!("{name} (line {at}): fenced as {:?}, expected {:?}", block.fence, expected.fence()));
            continue;
        }
        match expected {
            Expected::Hex(layout) => match hex_of_block(&block.lines) {
                Err(e) => failures.push(format!("{name} (line {at}): {e}")),
                Ok(bytes) if bytes != layout.concat() => failures.push(format!(
                    "{name} (line {at}): bytes differ\n  doc:  {}\n  code: {}",
                    hex::encode_upper(&bytes),
                    hex::encode_upper(layout.concat())
                )),
                Ok(_) => {}
            },
            Expected::Text(text) => {
                let doc_text = block.lines.join("\n");
                if doc_text.trim() != text {
                    failures
                        .push(format!("{name} (line {at}): text differs\n  doc:  {}\n  code: {text}", doc_text.trim()));
                }
            }
        }
        if normalized(&block.lines.join("\n")) != normalized(&expected.render()) {
            failures
                .push(format!("{name} (line {at}): comments or layout differ; the code gives:\n{}", expected.render()));
        }
    }
    let known: Vec<&str> = examples.items.iter().map(|(n, _)| n.as_str()).collect();
    for (name, block) in &doc {
        if !known.contains(&name.as_str()) {
            failures.push(format!("{name} (line {}): not an example this test knows", block.line_number));
        }
    }
    assert!(failures.is_empty(), "docs/PROTOCOL.md disagrees with the code:\n{}", failures.join("\n"));
}

/// The document's key agreement, computed with the primitive crates, agrees with
/// `init::derive_device_secrets` for a random terminal key, not only for the example's.
#[test]
fn the_documented_key_agreement_derives_what_the_code_derives() {
    let gudid = Gudid::parse(GUDID_TEXT).expect("gudid");
    let gateway_secret = StaticSecret::from(hex32(GATEWAY_X25519_PRIVATE));
    let gateway_public = PublicKey::from(&gateway_secret).to_bytes();
    let device = Ephemeral::random().expect("random key");
    let device_public = device.public();
    let (ck, an) = (b"create key body".as_slice(), b"answer body".as_slice());
    let code = init::derive_device_secrets(device, &gateway_public, &gudid.mac_key(), ck, an).expect("derive");
    let shared = gateway_secret.diffie_hellman(&PublicKey::from(device_public)).to_bytes();
    let spec = spec_secrets(&shared, gudid.mac_key().expose_secret(), &spec_transcript(ck, an));
    assert_eq!(code.signing_key.expose_secret(), spec.signing_key);
    assert_eq!(code.kbpk_aes.expose_secret(), spec.kbpk_aes);
    assert_eq!(code.kbpk_tdes.expose_secret(), spec.kbpk_tdes);
    assert_eq!(code.mqtt_password.expose_secret(), spec.mqtt_password.as_bytes());
}

#[test]
fn the_document_parser_reads_hex_blocks_with_comments() {
    let doc =
        "text\n```hex\nexample: a.b\n01 02  # two\n0A0b\n```\n```text\nexample: c\nXY\n```\n```text\nplain\n```\n";
    let found = doc_examples(doc);
    assert_eq!(found.len(), 2);
    assert_eq!(hex_of_block(&found["a.b"].lines), Ok(vec![1, 2, 10, 11]));
    assert_eq!(found["c"].lines, vec!["XY".to_string()]);
}

#[test]
#[should_panic(expected = "unchecked")]
fn a_hex_block_without_an_example_name_is_refused() {
    doc_examples("```hex\n01 02\n```\n");
}

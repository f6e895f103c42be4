//! The gateway's hot path: derive an initial key, wrap it in a TR-31 block and sign the download
//! that carries it, a million times in under 10 s on two cores; the target per device is 10 µs
//! on one core. Also the other side of the exchange: the terminal's signed ack, verified.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use rki_protocol::dukpt::{self, InitialKeyId, IpekDeriver, Ksn};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::message::{Ack, Body, Download, Message};
use rki_protocol::terminal::{InjectionType, KeySlot, KeyType};
use rki_protocol::tr31::{self, DukptInitialKeyId, Header, Version};
use rki_protocol::{KcvLen, SecretBytes, SymmetricKey};

fn fixed_rng(buf: &mut [u8]) {
    buf.fill(0x5A);
}

fn derivations(c: &mut Criterion) {
    let tdes_bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
    let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
    c.bench_function("dukpt/tdes_ipek", |b| b.iter(|| dukpt::derive_ipek(black_box(&tdes_bdk), black_box(&ksn))));

    let aes_bdk = SymmetricKey::aes_from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").expect("bdk");
    let id = InitialKeyId::from_hex("1234567890123456").expect("id");
    c.bench_function("dukpt/aes128_initial_key", |b| {
        b.iter(|| dukpt::derive_initial_key(black_box(&aes_bdk), black_box(&id)))
    });
}

fn tr31_b(c: &mut Criterion) {
    let kbpk = SymmetricKey::tdes_from_hex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCC").expect("3-key KBPK");
    let bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
    let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
    let ipek = dukpt::derive_ipek(&bdk, &ksn).expect("ipek");
    let header = Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&ipek.kcv(KcvLen::Three)))
        .expect("header");
    let key = ipek.secret();
    c.bench_function("tr31/b_wrap_tdes2_under_tdes3", |b| {
        b.iter(|| tr31::wrap(black_box(&kbpk), &header, black_box(key), &mut fixed_rng))
    });
    // Two terminals' blocks at once, interleaved (what the gateway does for a task): per block,
    // half the time of one iteration.
    let kbpk_2 = SymmetricKey::tdes_from_hex("DDDDDDDDDDDDDDDDEEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFF").expect("3-key KBPK");
    c.bench_function("tr31/b_wrap_pair_tdes2_under_tdes3", |b| {
        b.iter(|| tr31::wrap_pair((black_box(&kbpk), &header, black_box(key)), (&kbpk_2, &header, key), &mut fixed_rng))
    });
    let block = tr31::wrap(&kbpk, &header, key, &mut fixed_rng).expect("wrap");
    c.bench_function("tr31/b_unwrap_tdes2_under_tdes3", |b| {
        b.iter(|| tr31::unwrap(black_box(&kbpk), black_box(&block)))
    });
}

fn tr31_d(c: &mut Criterion) {
    let kbpk = SymmetricKey::aes_from_hex("88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6")
        .expect("AES-256 KBPK");
    let key = SecretBytes::from_hex("3F419E1CB7079442AA37474C2EFBF8B8").expect("key");
    let header = Header::parse("D0000B1AX00N0000").expect("header");
    c.bench_function("tr31/d_wrap_aes128_under_aes256", |b| {
        b.iter(|| tr31::wrap(black_box(&kbpk), &header, black_box(&key), &mut fixed_rng))
    });
    let block = tr31::wrap(&kbpk, &header, &key, &mut fixed_rng).expect("wrap");
    c.bench_function("tr31/d_unwrap_aes128_under_aes256", |b| {
        b.iter(|| tr31::unwrap(black_box(&kbpk), black_box(&block)))
    });
    // The gateway opening a sealed key under its master key, the block keys derived once.
    let prepared = tr31::PreparedKbpk::new(&kbpk);
    c.bench_function("tr31/d_unwrap_aes128_under_aes256_prepared", |b| b.iter(|| prepared.unwrap(black_box(&block))));
}

/// The download frame the gateway sends for one wrapped key, signed with the device's key.
fn signed_download(signing_key: &MacKey, key_block: String, key_id: Vec<u8>, kcv: Vec<u8>) -> Vec<u8> {
    let download =
        Download { execution_id: 42, slot: KeySlot::PRODUCTION, key_type: KeyType::Ipek, key_block, key_id, kcv };
    let body = Body { party: "P30224000123".into(), counter: 7, message: Message::Download(download) };
    frame::seal(signing_key, &body).expect("seal")
}

/// The whole per-device job of the gateway: initial key, KCV, header, wrap under the device's
/// KBPK, and the signed download. The BDK is scheduled once per task (as the gateway does), the
/// device's KBPK and signing key once per device (inside the measured job).
fn gateway_job(c: &mut Criterion) {
    let kbpk_hex = "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCC";
    let bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
    let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
    let signing_key = MacKey::new(SecretBytes::from_slice(&[0x11; 32])).expect("mac key");
    let deriver = IpekDeriver::new(&bdk).expect("tdes bdk");
    c.bench_function("gateway/tdes_derive_wrap_sign", |b| {
        b.iter(|| {
            let kbpk = SymmetricKey::tdes_from_hex(kbpk_hex).expect("3-key KBPK");
            let ipek = deriver.derive(black_box(&ksn));
            let kcv = ipek.kcv(KcvLen::Three);
            let header =
                Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv)).expect("header");
            let block = tr31::wrap(&kbpk, &header, ipek.secret(), &mut fixed_rng).expect("wrap");
            signed_download(&signing_key, block, ksn.as_bytes().to_vec(), kcv.as_bytes().to_vec())
        })
    });
    // Two devices per iteration, their wraps interleaved (the gateway's key service pairs the
    // devices of a task): per device, half the time of one iteration.
    let ksn_2 = Ksn::from_hex("FFFF9876543210E00001").expect("ksn");
    c.bench_function("gateway/tdes_derive_wrap_sign_two_devices", |b| {
        b.iter(|| {
            let kbpk = SymmetricKey::tdes_from_hex(kbpk_hex).expect("3-key KBPK");
            let kbpk_2 = SymmetricKey::tdes_from_hex(kbpk_hex).expect("3-key KBPK");
            let (ipek, ipek_2) = (deriver.derive(black_box(&ksn)), deriver.derive(black_box(&ksn_2)));
            let (kcv, kcv_2) = (ipek.kcv(KcvLen::Three), ipek_2.kcv(KcvLen::Three));
            let header =
                Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv)).expect("header");
            let header_2 =
                Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn_2), Some(&kcv_2)).expect("header");
            let [block, block_2] =
                tr31::wrap_pair((&kbpk, &header, ipek.secret()), (&kbpk_2, &header_2, ipek_2.secret()), &mut fixed_rng);
            (
                signed_download(&signing_key, block.expect("wrap"), ksn.as_bytes().to_vec(), kcv.as_bytes().to_vec()),
                signed_download(
                    &signing_key,
                    block_2.expect("wrap"),
                    ksn_2.as_bytes().to_vec(),
                    kcv_2.as_bytes().to_vec(),
                ),
            )
        })
    });
    c.bench_function("gateway/tdes_derive_wrap_sign_bdk_per_device", |b| {
        b.iter(|| {
            let kbpk = SymmetricKey::tdes_from_hex(kbpk_hex).expect("3-key KBPK");
            let ipek = dukpt::derive_ipek(&bdk, black_box(&ksn)).expect("ipek");
            let kcv = ipek.kcv(KcvLen::Three);
            let header =
                Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv)).expect("header");
            let block = tr31::wrap(&kbpk, &header, ipek.secret(), &mut fixed_rng).expect("wrap");
            signed_download(&signing_key, block, ksn.as_bytes().to_vec(), kcv.as_bytes().to_vec())
        })
    });

    let aes_bdk = SymmetricKey::aes_from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").expect("bdk");
    let id = InitialKeyId::from_hex("1234567890123456").expect("id");
    c.bench_function("gateway/aes128_derive_wrap_sign", |b| {
        b.iter(|| {
            let kbpk = SymmetricKey::aes_from_hex("88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6")
                .expect("AES-256 KBPK");
            let key = dukpt::derive_initial_key(&aes_bdk, black_box(&id)).expect("initial key");
            let kcv = key.kcv(KcvLen::Three);
            let header = Header::dukpt_initial_key(Version::D, DukptInitialKeyId::Aes(id), Some(&kcv)).expect("header");
            let block = tr31::wrap(&kbpk, &header, key.secret(), &mut fixed_rng).expect("wrap");
            signed_download(&signing_key, block, id.as_bytes().to_vec(), kcv.as_bytes().to_vec())
        })
    });
}

/// The terminal's signed ack: signing it (terminal side), and opening and verifying it (gateway).
fn ack(c: &mut Criterion) {
    let signing_key = MacKey::new(SecretBytes::from_slice(&[0x11; 32])).expect("mac key");
    let ack = Ack {
        execution_id: 42,
        result: 0,
        slot: KeySlot::PRODUCTION,
        key_id: vec![0xFF, 0xFF, 0x98, 0x76, 0x54, 0x32, 0x10, 0xE0, 0x00, 0x00],
        kcv: vec![0xAF, 0x8C, 0xB1],
        injection: InjectionType::Auto,
    };
    let body = Body { party: "P30224000123".into(), counter: 9, message: Message::Ack(ack) };
    c.bench_function("frame/ack_sign", |b| b.iter(|| frame::seal(&signing_key, black_box(&body)).expect("seal")));
    let sealed = frame::seal(&signing_key, &body).expect("seal");
    c.bench_function("frame/ack_open_verify", |b| {
        b.iter(|| frame::open(black_box(&sealed)).expect("open").verify(&signing_key).expect("verify"))
    });
}

criterion_group!(benches, derivations, tr31_b, tr31_d, gateway_job, ack);
criterion_main!(benches);

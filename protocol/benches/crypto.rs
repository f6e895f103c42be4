//! The gateway's hot path: derive an initial key and wrap it in a TR-31 block, a million times in
//! under 10 s on two cores, so each derive + wrap must stay well under 20 µs on one core.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use rki_protocol::dukpt::{self, InitialKeyId, Ksn};
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
}

/// The whole per-key job of the gateway for a TDES terminal: IPEK, KCV, header, wrap.
fn gateway_job(c: &mut Criterion) {
    let kbpk = SymmetricKey::tdes_from_hex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCC").expect("3-key KBPK");
    let bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
    let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
    c.bench_function("gateway/tdes_ipek_kcv_header_wrap", |b| {
        b.iter(|| {
            let ipek = dukpt::derive_ipek(&bdk, black_box(&ksn)).expect("ipek");
            let kcv = ipek.kcv(KcvLen::Three);
            let header =
                Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv)).expect("header");
            tr31::wrap(&kbpk, &header, ipek.secret(), &mut fixed_rng).expect("wrap")
        })
    });
}

criterion_group!(benches, derivations, tr31_b, tr31_d, gateway_job);
criterion_main!(benches);

//! Device initialisation: GUDID refusals, re-initialisation, and what a full capture plus the GUDID
//! does not reveal.

mod common;

use std::time::Duration;

use hkdf::Hkdf;
use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::Gudid;
use rki_protocol::message::{Message, RefusalCode};
use rki_protocol::{tr31, SecretBytes, SymmetricKey};
use rki_tests::{
    create_task, for_group, for_sns, provision, sns, task_detail, wait, wait_task, GatewayOptions, GatewayProcess,
    RawBootstrap, RawDevice, TestResult,
};
use serde_json::json;
use sha2::{Digest, Sha256};

fn refusal(message: Message) -> TestResult<RefusalCode> {
    match message {
        Message::Refusal(r) => Ok(r.code),
        other => Err(format!("expected a refusal, got {other:?}").into()),
    }
}

fn gudid_status(gw: &GatewayProcess, sn: &str) -> TestResult<Vec<String>> {
    let v = gw.api().ok(&format!("/v1/gudids?sn={sn}"))?;
    Ok(v["gudids"]
        .as_array()
        .map(|a| a.iter().map(|g| g["status"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default())
}

#[test]
fn every_bad_gudid_is_refused_clearly_counted_and_changes_nothing() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions { adjustable_clock: true, ..Default::default() })?;
    let provisioned = provision(&gw, &sns("GUD", 2), "g")?;
    let (sn, gudid_text) = provisioned.gudids[0].clone();
    let (other_sn, other_gudid) = provisioned.gudids[1].clone();
    let gudid = Gudid::parse(&gudid_text)?;
    let mut boot = rt.block_on(RawBootstrap::connect(gw.mqtt_port, &sn, &gudid))?;

    // A GUDID for another SN.
    rt.block_on(boot.send(RawBootstrap::create_key(&sn, &Gudid::parse(&other_gudid)?)?))?;
    assert_eq!(refusal(rt.block_on(boot.next(Duration::from_secs(5)))?)?, RefusalCode::GudidWrongDevice);
    // A tampered CreateKey: one byte of the body changed after tagging.
    let mut tampered = RawBootstrap::create_key(&sn, &gudid)?;
    let n = tampered.len();
    tampered[n - 40] ^= 0x01;
    rt.block_on(boot.send(tampered))?;
    assert_eq!(refusal(rt.block_on(boot.next(Duration::from_secs(5)))?)?, RefusalCode::BadTag);
    // An unknown GUDID.
    rt.block_on(boot.send(RawBootstrap::create_key(&sn, &Gudid::random().map_err(|e| e.to_string())?)?))?;
    assert_eq!(refusal(rt.block_on(boot.next(Duration::from_secs(5)))?)?, RefusalCode::UnknownGudid);
    // Another organization's GUDID, for one of its own devices.
    let rival = rki_tests::Api::new(&gw.url(), &gw.init_org("rival")?);
    let (status, v) = gw.upload_devices("rival", "RIVAL1\n");
    assert_eq!(status, 200, "{v}");
    let rival_gudid = rival.ok_post("/v1/gudids", &json!({"sn": "RIVAL1"}))?["gudids"][0]["gudid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    rt.block_on(boot.send(RawBootstrap::create_key(&sn, &Gudid::parse(&rival_gudid)?)?))?;
    assert_eq!(refusal(rt.block_on(boot.next(Duration::from_secs(5)))?)?, RefusalCode::GudidWrongDevice);
    assert!(gw.metric("rki_gudid_refusals_total{reason=\"gudid_foreign_org\"}") >= 1.0);
    // None of that spent anything.
    assert_eq!(gudid_status(&gw, &sn)?, vec!["unused"]);
    assert_eq!(gudid_status(&gw, &other_sn)?, vec!["unused"]);

    // The real one works; replaying the same CreateKey is refused. A new CreateKey with the same
    // GUDID, before the device ever used what the first answer gave it (its answer came too
    // late, say), is answered anew (PROTOCOL.md §7.4); once the device proves its secrets, the
    // GUDID is spent for good (see `a_gudid_is_spent_for_good_once_the_device_proves_its_secrets`).
    // Each answer names the CreateKey it answers (PROTOCOL.md §7.3).
    let answered = |message: Message| match message {
        Message::CreateKeyAnswer(a) => Ok(a.request_counter),
        other => Err(format!("expected a CreateKeyAnswer, got {other:?}")),
    };
    let good = RawBootstrap::create_key(&sn, &gudid)?;
    let good_counter = frame::open(&good)?.peek().counter;
    rt.block_on(boot.send(good.clone()))?;
    assert_eq!(answered(rt.block_on(boot.next(Duration::from_secs(5)))?)?, good_counter);
    rt.block_on(boot.send(good))?;
    assert_eq!(refusal(rt.block_on(boot.next(Duration::from_secs(5)))?)?, RefusalCode::GudidUsed);
    let retry = RawBootstrap::create_key(&sn, &gudid)?;
    let retry_counter = frame::open(&retry)?.peek().counter;
    assert!(retry_counter > good_counter);
    rt.block_on(boot.send(retry))?;
    assert_eq!(answered(rt.block_on(boot.next(Duration::from_secs(5)))?)?, retry_counter);
    assert_eq!(gudid_status(&gw, &sn)?, vec!["used"]);

    // A GUDID past 72 hours, on the injected clock.
    let mut other_boot = rt.block_on(RawBootstrap::connect(gw.mqtt_port, &other_sn, &Gudid::parse(&other_gudid)?))?;
    gw.advance_days(3)?;
    let _ = gw.key_owner().post("/v1/admin/clock", &json!({"advance_seconds": 60}));
    rt.block_on(other_boot.send(RawBootstrap::create_key(&other_sn, &Gudid::parse(&other_gudid)?)?))?;
    assert_eq!(refusal(rt.block_on(other_boot.next(Duration::from_secs(5)))?)?, RefusalCode::GudidExpired);
    assert_eq!(gudid_status(&gw, &other_sn)?, vec!["expired"]);
    for reason in ["gudid_wrong_device", "bad_tag", "unknown_gudid", "gudid_used", "gudid_expired"] {
        assert!(gw.metric(&format!("rki_gudid_refusals_total{{reason=\"{reason}\"}}")) >= 1.0, "{reason} not counted");
    }
    let devices = gw.api().ok(&format!("/v1/devices/{other_sn}"))?;
    assert_eq!(devices["device"]["initialised"], false);
    Ok(())
}

#[test]
fn after_reinitialisation_the_old_key_is_refused_and_the_pending_key_comes_under_the_new_one() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("REINIT", 1), "r")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    let mut old = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &gudid))?;
    rt.block_on(old.send(RawDevice::hello(false)))?;
    gw.wait_online(&[&sn], true)?;
    let task = create_task(&api, &for_group("r"))?.task.id;
    let Message::Download(first) = rt.block_on(old.next_down(Duration::from_secs(5)))? else {
        return Err("no download".into());
    };
    // Re-initialise with a new GUDID before acking.
    let new_gudid =
        api.ok_post("/v1/gudids", &json!({"sn": sn}))?["gudids"][0]["gudid"].as_str().unwrap_or_default().to_string();
    let mut new = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &new_gudid))?;
    assert_ne!(old.secrets.signing_key, new.secrets.signing_key);
    // An ack signed with the old key is refused.
    let before = gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}");
    // (Sent over the new connection: the broker dropped the old session when the new one came.)
    let old_key = old.secrets.signing_key.clone_secret();
    rt.block_on(new.send_with(&old_key, RawDevice::ack(&first)))?;
    gw.wait_metric("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}", Duration::from_secs(5), |v| {
        v > before
    })?;
    assert_eq!(task_detail(&api, task)?.task.status, "unfinished");
    // The pending execution is re-wrapped for the new key-block protection key.
    rt.block_on(new.send(RawDevice::hello(false)))?;
    let Message::Download(second) = rt.block_on(new.next_down(Duration::from_secs(10)))? else {
        return Err("no download".into());
    };
    assert_eq!(second.execution_id, first.execution_id);
    assert_ne!(second.key_block, first.key_block);
    assert!(tr31::unwrap(&new.secrets.kbpk_tdes, &second.key_block).is_ok(), "new KBPK opens the new block");
    assert!(tr31::unwrap(&old.secrets.kbpk_tdes, &second.key_block).is_err(), "old KBPK does not");
    rt.block_on(new.send(RawDevice::ack(&second)))?;
    wait_task(&api, task, Duration::from_secs(5), |c| c.succeeded == 1)?;
    Ok(())
}

/// Everything an insider who typed the GUDID might compute from it and a full capture.
fn insider_guesses(gudid: &Gudid, capture: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let text = gudid.expose_text();
    let raw = hex::decode(text.replace('-', "")).unwrap_or_default();
    let mac = gudid.mac_key().expose_secret().to_vec();
    let mut guesses =
        vec![raw.clone(), mac.clone(), Sha256::digest(&raw).to_vec(), Sha256::digest(text.as_bytes()).to_vec()];
    let mut publics = Vec::new();
    for (_, bytes) in capture {
        if let Ok(u) = frame::open(bytes) {
            guesses.push(
                MacKey::new(SecretBytes::from_slice(&mac))
                    .map(|k| k.tag(&[u.body_bytes()]).to_vec())
                    .unwrap_or_default(),
            );
            match &u.peek().message {
                Message::CreateKey(c) => publics.push(c.device_public),
                Message::CreateKeyAnswer(a) => publics.push(a.gateway_public),
                _ => {}
            }
        }
    }
    for ikm in [raw.clone(), mac.clone()].into_iter().chain(publics.iter().map(|p| p.to_vec())) {
        for salt in [None, Some(mac.as_slice()), Some(raw.as_slice())] {
            let hk = Hkdf::<Sha256>::new(salt, &ikm);
            for label in
                ["rki/v1 device signing key", "rki/v1 kbpk aes256", "rki/v1 kbpk tdes3", "rki/v1 mqtt password", ""]
            {
                let mut out = [0u8; 32];
                let _ = hk.expand(label.as_bytes(), &mut out);
                guesses.push(out.to_vec());
                guesses.push(out[..24].to_vec());
            }
        }
    }
    if publics.len() == 2 {
        // "Shared secret" from two public keys, as someone who does not know X25519 might try.
        let mut xor = [0u8; 32];
        for i in 0..32 {
            xor[i] = publics[0][i] ^ publics[1][i];
        }
        guesses.push(xor.to_vec());
        guesses.push(Sha256::digest([publics[0], publics[1]].concat()).to_vec());
    }
    guesses
}

#[test]
fn a_full_capture_and_the_gudid_reveal_neither_device_keys_nor_the_injected_key() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("CAPT", 2), "c")?;
    let (sn, gudid_text) = provisioned.gudids[0].clone();
    let (spy_sn, spy_gudid) = provisioned.gudids[1].clone();
    // A network attacker taps every byte between the terminal and the gateway (the endpoint no
    // longer lets any client subscribe to `#`): a recording TCP relay in front of the endpoint.
    // A legitimate terminal of the same fleet, whose own keys the last check tries.
    let spy = rt.block_on(RawDevice::initialise(gw.mqtt_port, &spy_sn, &spy_gudid))?;
    let tap = Tap::start(gw.mqtt_port)?;
    let mut victim = rt.block_on(RawDevice::initialise(tap.port, &sn, &gudid_text))?;
    rt.block_on(victim.send(RawDevice::hello(false)))?;
    gw.wait_online(&[&sn], true)?;
    let task = create_task(&api, &for_sns(&[&sn]))?.task.id;
    let Message::Download(d) = rt.block_on(victim.next_down(Duration::from_secs(5)))? else {
        return Err("no download".into());
    };
    rt.block_on(victim.send(RawDevice::ack(&d)))?;
    wait_task(&api, task, Duration::from_secs(5), |c| c.succeeded == 1)?;
    // The relay records what it forwarded: wait until the capture holds every kind of frame.
    let captured = wait::poll("the tap to have recorded the whole exchange", Duration::from_secs(5), || {
        let captured = tap.publishes();
        let kinds: Vec<String> = captured
            .iter()
            .filter_map(|(_, b)| frame::open(b).ok().map(|u| u.peek().message.kind().as_str().to_string()))
            .collect();
        match ["create_key", "create_key_answer", "hello", "download", "ack"]
            .iter()
            .find(|k| !kinds.iter().any(|s| s == *k))
        {
            None => Ok(captured),
            Some(missing) => Err(format!("no {missing} in {kinds:?}")),
        }
    })?;
    // The secrets the insider is after.
    let ipek = {
        let bdk = SymmetricKey::tdes_from_hex(rki_tests::TEST_BDK)?;
        let ksn = rki_protocol::dukpt::tdes::Ksn::from_hex(&hex::encode(&d.key_id))?;
        rki_protocol::dukpt::tdes::derive_ipek(&bdk, &ksn)?
    };
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("signing key", victim.secrets.signing_key.expose_secret().to_vec()),
        ("AES KBPK", victim.secrets.kbpk_aes.expose_secret().to_vec()),
        ("TDES KBPK", victim.secrets.kbpk_tdes.expose_secret().to_vec()),
        ("MQTT password", victim.secrets.mqtt_password.expose_secret().to_vec()),
        ("IPEK", ipek.expose_secret().to_vec()),
    ];
    // 1. No secret appears in any captured byte, raw or as hex.
    for (name, secret) in &secrets {
        let hex_upper = hex::encode_upper(secret).into_bytes();
        for (topic, bytes) in &captured {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_slice()), "{name} in clear on {topic}");
            assert!(!bytes.windows(hex_upper.len()).any(|w| w == hex_upper.as_slice()), "{name} as hex on {topic}");
        }
    }
    // 2. No derivation an insider holding the GUDID could try gives any of them.
    let gudid = Gudid::parse(&gudid_text)?;
    let guesses = insider_guesses(&gudid, &captured);
    assert!(guesses.len() > 50);
    for (name, secret) in &secrets {
        for guess in &guesses {
            let same_start = guess.len() >= 16 && secret.len() >= 16 && guess[..16] == secret[..16];
            assert!(!same_start && guess != secret, "a guess gives the {name}");
        }
    }
    // 3. No guess opens the key block.
    for guess in &guesses {
        let candidates = [
            SymmetricKey::tdes(SecretBytes::from_slice(&guess[..guess.len().min(24)])),
            SymmetricKey::aes(SecretBytes::from_slice(guess)),
        ];
        for key in candidates.into_iter().flatten() {
            assert!(tr31::unwrap(&key, &d.key_block).is_err(), "a guess opened the key block");
        }
    }
    // The spy holds a valid identity, yet its view is useless: its own KBPK does not open the victim's block.
    assert!(tr31::unwrap(&spy.secrets.kbpk_tdes, &d.key_block).is_err());
    Ok(())
}

/// A TCP relay that records both directions of every connection through it.
struct Tap {
    port: u16,
    recorded: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Tap {
    fn start(upstream: u16) -> TestResult<Tap> {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let streams = recorded.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().take(16).flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { return };
                for (mut from, mut to) in [
                    (client.try_clone().ok(), server.try_clone().ok()),
                    (server.try_clone().ok(), client.try_clone().ok()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a?, b?)))
                {
                    let streams = streams.clone();
                    std::thread::spawn(move || {
                        let index = {
                            let mut all = streams.lock().expect("tap");
                            all.push(Vec::new());
                            all.len() - 1
                        };
                        let mut chunk = [0u8; 8192];
                        while let Ok(n) = from.read(&mut chunk) {
                            if n == 0 || to.write_all(&chunk[..n]).is_err() {
                                break;
                            }
                            streams.lock().expect("tap")[index].extend_from_slice(&chunk[..n]);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(Tap { port, recorded })
    }

    /// Every PUBLISH recorded, in either direction: (topic, payload).
    fn publishes(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for stream in self.recorded.lock().expect("tap").iter() {
            let mut buf = bytes::BytesMut::from(&stream[..]);
            while let Ok(packet) = rumqttc::mqttbytes::v4::Packet::read(&mut buf, 64 * 1024) {
                if let rumqttc::mqttbytes::v4::Packet::Publish(p) = packet {
                    out.push((p.topic, p.payload.to_vec()));
                }
            }
        }
        out
    }
}

//! Device initialisation against a real broker and a fake gateway: the bootstrap identity, the
//! CreateKey key agreement, refusals, re-initialisation.

mod common;

use std::time::Duration;

use common::{FakeGateway, LateAnswer, Tag, TestBroker, TestNet};
use rki_device_sim::{Device, DeviceError};
use rki_protocol::init::Gudid;
use rki_protocol::message::{Message, Unlock};

#[tokio::test]
async fn an_initialised_terminal_connects_under_its_device_identity_and_says_hello() {
    let net = TestNet::start().await;
    let device = Device::spawn(net.config(TestNet::profile("INIT0001"))).await.expect("spawn");
    let before = device.status();
    assert!(!before.initialised && !before.connected);

    let gudid = net.gateway.provision("INIT0001");
    device.initialise(&gudid).await.expect("initialise");
    let hello = net.gateway.wait_hellos("INIT0001", 1).await;

    assert_eq!(hello.model, "P3");
    assert_eq!(hello.rom_version, "3.0.15");
    assert_eq!(hello.app_version, "2.0.0");
    assert!(!hello.locked && !hello.debug_mode && hello.slots.is_empty());
    let status = device.wait_for("connected", common::WAIT, |s| s.connected).await.expect("connected");
    assert!(status.initialised);
    let connects = net.broker.connects.lock().expect("log").clone();
    let own: Vec<_> = connects.iter().filter(|(id, _, _)| id.ends_with("INIT0001")).collect();
    assert_eq!(own[0].0, "init@INIT0001", "bootstrap first");
    let bootstrap_password = rki_protocol::init::Gudid::parse(&gudid).expect("gudid").bootstrap_password("INIT0001");
    assert_eq!((own[0].1.as_str(), own[0].2.as_bytes()), ("init@INIT0001", bootstrap_password.expose_secret()));
    let device_connect = own.iter().find(|(id, _, _)| id == "INIT0001").expect("device identity");
    assert_eq!(device_connect.1, "INIT0001");
    assert_eq!(device_connect.2.len(), 64, "the password is 64 hex characters");
    assert!(device_connect.2.bytes().all(|b| b.is_ascii_hexdigit()));
    net.gateway.assert_clean_up_channel("INIT0001");
}

#[tokio::test]
async fn a_gudid_in_the_configuration_initialises_the_terminal_at_power_on() {
    let net = TestNet::start().await;
    let mut config = net.config(TestNet::profile("INIT0002"));
    config.gudid = Some(net.gateway.provision("INIT0002"));
    let device = Device::spawn(config).await.expect("spawn");
    net.gateway.wait_hellos("INIT0002", 1).await;
    assert!(device.status().initialised);
}

#[tokio::test]
async fn an_unknown_gudid_is_refused_with_its_code_and_the_terminal_stays_uninitialised() {
    let net = TestNet::start().await;
    let device = Device::spawn(net.config(TestNet::profile("INIT0003"))).await.expect("spawn");
    let never_provisioned = Gudid::random().expect("gudid").expose_text().to_string();
    match device.initialise(&never_provisioned).await {
        Err(DeviceError::InitRefused(code)) => assert_eq!(code, "unknown_gudid"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let status = device.status();
    assert!(!status.initialised && !status.connected);
    assert!(status.last_error.is_some_and(|e| e.contains("unknown_gudid")));
}

#[tokio::test]
async fn a_spent_gudid_is_refused_and_a_gudid_of_another_terminal_too() {
    let net = TestNet::start().await;
    let gudid = net.gateway.provision("INIT0004");
    let device = net.initialised_device(net.config(TestNet::profile("INIT0004"))).await;
    // The helper spent a fresh GUDID; spend this one too, then try it again.
    device.initialise(&gudid).await.expect("first use");
    match device.initialise(&gudid).await {
        Err(DeviceError::InitRefused(code)) => assert_eq!(code, "gudid_used"),
        other => panic!("expected gudid_used, got {other:?}"),
    }
    let other = Device::spawn(net.config(TestNet::profile("INIT0005"))).await.expect("spawn");
    let not_for_it = net.gateway.provision("INIT0004");
    match other.initialise(&not_for_it).await {
        Err(DeviceError::InitRefused(code)) => assert_eq!(code, "gudid_wrong_device"),
        other => panic!("expected gudid_wrong_device, got {other:?}"),
    }
    // The refused re-initialisation left the terminal working under its last secrets.
    device.wait_for("reconnected", common::WAIT, |s| s.connected).await.expect("connected");
}

#[tokio::test]
async fn re_initialisation_replaces_the_signing_key_at_once() {
    let net = TestNet::start().await;
    let sn = "INIT0006";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    // A frame prepared under the first signing key...
    let old_unlock = net.gateway.seal(sn, Message::Unlock(Unlock { unlock_id: 1 }), Tag::Device);

    // A technician retries a re-initialisation that a dropped connection interrupted, with a fresh
    // GUDID (the first may have been spent).
    let mut attempt = 0;
    loop {
        let gudid = net.gateway.provision(sn);
        match device.initialise(&gudid).await {
            Ok(()) => break,
            Err(e) if e.is_transient() && attempt < 3 => attempt += 1,
            Err(e) => panic!("re-initialise: {e:?}"),
        }
    }
    let hellos = net.gateway.hellos(sn);
    net.gateway.wait_hellos(sn, hellos.max(2)).await;

    // ...is refused under the new one.
    net.gateway.send_raw(sn, old_unlock);
    let status = device.wait_for("the old-key frame refused", common::WAIT, |s| s.rejected.bad_tag == 1).await;
    assert!(status.is_ok(), "{status:?}");
    net.gateway.assert_clean_up_channel(sn);
}

#[tokio::test]
async fn a_gudid_that_is_not_32_hex_digits_is_refused_before_anything_is_sent() {
    let net = TestNet::start().await;
    let device = Device::spawn(net.config(TestNet::profile("INIT0007"))).await.expect("spawn");
    assert!(matches!(device.initialise("1234-ABCD").await, Err(DeviceError::BadGudid)));
    assert!(!net.broker.connects.lock().expect("log").iter().any(|(id, _, _)| id.contains("INIT0007")));
}

#[tokio::test]
async fn an_initialisation_nobody_answers_times_out_with_a_clear_error() {
    // A broker without a gateway behind it.
    let lonely = TestBroker::start(Default::default(), 8);
    let mut config = rki_device_sim::DeviceConfig::new(
        TestNet::profile("INIT0008"),
        lonely.addr.clone(),
        rki_device_sim::StateStore::Memory,
    );
    config.knobs.init_timeout = Duration::from_millis(500);
    let device = Device::spawn(config).await.expect("spawn");
    let gudid = Gudid::random().expect("gudid").expose_text().to_string();
    assert!(matches!(device.initialise(&gudid).await, Err(DeviceError::InitTimeout(_))));
    assert!(!device.status().initialised);
    let _ = FakeGateway::CLIENT_ID;
}

#[tokio::test]
async fn an_initialisation_while_powered_off_is_refused() {
    let net = TestNet::start().await;
    let mut config = net.config(TestNet::profile("INIT0009"));
    config.knobs.start_powered = false;
    let device = Device::spawn(config).await.expect("spawn");
    let gudid = net.gateway.provision("INIT0009");
    assert!(matches!(device.initialise(&gudid).await, Err(DeviceError::PoweredOff)));
    device.power_on().await.expect("power on");
    device.initialise(&gudid).await.expect("initialise once powered");
}

#[tokio::test]
async fn a_gudid_in_the_configuration_is_retried_until_the_broker_can_be_reached() {
    let port = common::free_port();
    let sn = "INIT0010";
    let gudid = Gudid::random().expect("gudid").expose_text().to_string();
    let mut config = rki_device_sim::DeviceConfig::new(
        TestNet::profile(sn),
        rki_device_sim::BrokerAddr::new("127.0.0.1", port),
        rki_device_sim::StateStore::Memory,
    );
    config.gudid = Some(gudid.clone());
    config.knobs.reconnect_delay = Duration::from_millis(50);
    config.knobs.reconnect_delay_max = Duration::from_millis(200);
    let device = Device::spawn(config).await.expect("spawn");
    device
        .wait_for("a failed attempt", common::WAIT, |s| s.last_error.is_some())
        .await
        .expect("the broker is not there yet");

    let net = TestNet::start_on(port, 8).await;
    net.gateway.provision_text(sn, &gudid);
    net.gateway.wait_hellos(sn, 1).await;
    assert!(device.status().initialised);
    assert!(device.counters().snapshot().errors >= 1);
}

#[tokio::test]
async fn a_refused_gudid_in_the_configuration_is_not_retried() {
    let net = TestNet::start().await;
    let mut config = net.config(TestNet::profile("INIT0011"));
    config.gudid = Some(Gudid::random().expect("gudid").expose_text().to_string());
    config.knobs.reconnect_delay = Duration::from_millis(10);
    let device = Device::spawn(config).await.expect("spawn");
    device.wait_for("the refusal", common::WAIT, |s| s.last_error.is_some()).await.expect("refused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = net.broker.connects.lock().expect("log").iter().filter(|(id, _, _)| id == "init@INIT0011").count();
    assert_eq!(attempts, 1);
    assert_eq!(device.counters().snapshot().errors, 1);
}

/// PROTOCOL.md §7.3: the terminal gives up on its CreateKey (A) and retries (B); the gateway had
/// answered A (spending the GUDID, keeping A's secrets) and refuses B. The late answer to A,
/// which names A, reaches B's connection before or after B's refusal: the terminal derives it with
/// A's key pair and body, and connects under the secrets the gateway kept.
#[tokio::test]
async fn a_late_answer_to_an_earlier_create_key_gives_the_secrets_the_gateway_kept() {
    for (sn, order) in [
        ("LATE0001", LateAnswer::BeforeTheRefusal),
        ("LATE0002", LateAnswer::AfterTheRefusal),
        // Both answered, the first one's answer first: the store keeps the retry's secrets.
        ("LATE0004", LateAnswer::BeforeTheRetrysAnswer),
        // ... and a refusal of a duplicate of the retry between them: the wait goes on.
        ("LATE0005", LateAnswer::BeforeARefusedDuplicateOfTheRetry),
    ] {
        let net = TestNet::start().await;
        let mut config = net.config(TestNet::profile(sn));
        config.knobs.init_timeout = Duration::from_millis(700);
        let device = Device::spawn(config).await.expect("spawn");
        let gudid = net.gateway.provision(sn);
        net.gateway.answer_late(sn, order);

        assert!(matches!(device.initialise(&gudid).await, Err(DeviceError::InitTimeout(_))), "{order:?}: A unanswered");
        device
            .initialise(&gudid)
            .await
            .unwrap_or_else(|e| panic!("{order:?}: the retry ends with the answer the gateway kept: {e}"));

        // The hello verifies under the signing key the gateway kept, and the broker admitted the
        // device identity with the password the gateway kept.
        net.gateway.wait_hellos(sn, 1).await;
        device.wait_for("connected", common::WAIT, |s| s.connected).await.expect("connected");
        net.gateway.assert_clean_up_channel(sn);
        let bootstraps =
            net.broker.connects.lock().expect("log").iter().filter(|(id, _, _)| *id == format!("init@{sn}")).count();
        assert_eq!(bootstraps, 2, "{order:?}: CreateKey A, then the retry B");
        assert_eq!(device.status().rejected.unexpected, 0, "{order:?}: nothing taken for another CreateKey's");
    }
}

#[tokio::test]
async fn an_answer_naming_a_create_key_the_terminal_did_not_send_is_ignored() {
    let net = TestNet::start().await;
    let sn = "LATE0003";
    let mut config = net.config(TestNet::profile(sn));
    config.knobs.init_timeout = Duration::from_millis(700);
    let device = Device::spawn(config).await.expect("spawn");
    let gudid = net.gateway.provision(sn);
    net.gateway.misname_answers(sn);

    assert!(matches!(device.initialise(&gudid).await, Err(DeviceError::InitTimeout(_))));
    let status = device.status();
    assert!(!status.initialised && !status.connected);
    assert_eq!(status.rejected.unexpected, 1, "the answer, dropped and counted");
    assert_eq!(net.gateway.hellos(sn), 0);
}

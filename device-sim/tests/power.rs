//! Power and network: power cycles, process restarts from the state file, a crash between install
//! and ack, offline windows, flapping connectivity, delayed power-on.

mod common;

use std::time::Duration;

use common::{temporary_state_dir, Tag, TestNet, WAIT};
use rki_device_sim::{Device, DeviceConfig, Flapping, StateStore};
use rki_protocol::message::Message;
use rki_protocol::terminal::KeySlot;

fn stored_config(net: &TestNet, sn: &str, dir: &std::path::Path) -> DeviceConfig {
    DeviceConfig::new(TestNet::profile(sn), net.broker.addr.clone(), StateStore::directory(dir))
}

#[tokio::test]
async fn a_power_cycle_keeps_key_lock_and_secrets_and_the_terminal_says_hello_again() {
    let net = TestNet::start().await;
    let sn = "PWR0001";
    let dir = temporary_state_dir("power-cycle");
    let device = net.initialised_device(stored_config(&net, sn, &dir)).await;
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 1, KeySlot::PRODUCTION)), Tag::Device);
    let ack = net.gateway.wait_ack(sn, 1, 1).await;
    let slots = device.key_query();

    device.power_off().await.expect("off");
    let off = device.wait_for("offline", WAIT, |s| !s.connected && !s.powered).await.expect("off");
    assert!(off.locked);
    // The broker published the last will: a signed bye.
    net.gateway.wait_for(sn, "the last will", |r| (r.byes >= 1).then_some(())).await;

    let hellos = net.gateway.hellos(sn);
    device.power_on().await.expect("on");
    let hello = net.gateway.wait_hellos(sn, hellos + 1).await;
    assert!(hello.locked);
    assert_eq!(hello.slots, slots);
    assert_eq!(hello.slots[0].kcv, ack.kcv);
    assert_eq!(device.status().injections, 1);
    net.gateway.assert_clean_up_channel(sn);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_restarted_process_finds_the_terminal_as_it_left_it_in_the_state_file() {
    let net = TestNet::start().await;
    let sn = "PWR0002";
    let dir = temporary_state_dir("restart");
    let device = net.initialised_device(stored_config(&net, sn, &dir)).await;
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 2, KeySlot::PRODUCTION)), Tag::Device);
    net.gateway.wait_ack(sn, 2, 1).await;
    device.wait_for("ack confirmed", WAIT, |s| s.unconfirmed_acks == 0).await.expect("confirmed");
    let slots = device.key_query();
    device.shutdown().await;

    let hellos = net.gateway.hellos(sn);
    let again = Device::spawn(stored_config(&net, sn, &dir)).await.expect("respawn");
    // No GUDID needed: the secrets came back from the file, and the broker accepts the password.
    let hello = net.gateway.wait_hellos(sn, hellos + 1).await;
    assert!(hello.locked);
    assert_eq!(again.key_query(), slots);
    // A redelivery after the restart is still a duplicate.
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 2, KeySlot::PRODUCTION)), Tag::Device);
    let second = net.gateway.wait_ack(sn, 2, 2).await;
    assert_eq!(second.result, 0);
    assert_eq!(again.status().injections, 0, "nothing injected by the new process");
    net.gateway.assert_clean_up_channel(sn);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_crash_between_install_and_ack_re_acks_at_the_next_power_on_and_never_re_injects() {
    let net = TestNet::start().await;
    let sn = "PWR0003";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    device.crash_after_next_install().await.expect("knob");
    let download = net.gateway.tdes_download(sn, 3, KeySlot::PRODUCTION);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Device);

    let crashed = device.wait_for("the crash", WAIT, |s| s.crashed).await.expect("crashed");
    assert!(!crashed.powered && crashed.locked);
    assert_eq!((crashed.injections, crashed.unconfirmed_acks, crashed.acks_sent), (1, 1, 0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(net.gateway.acks_for(sn, 3).is_empty(), "nothing was sent before the crash");

    device.power_on().await.expect("on");
    let ack = net.gateway.wait_ack(sn, 3, 1).await;
    assert_eq!(ack.result, 0);
    assert_eq!(Some(ack.kcv.clone()), net.gateway.expected_kcv(3));
    // The gateway also re-delivers on the hello: the same ack, no second injection.
    net.gateway.send(sn, Message::Download(download), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 3, 2).await, ack);
    assert_eq!(device.status().injections, 1);
    net.gateway.assert_clean_up_channel(sn);
}

#[tokio::test]
async fn a_crash_that_kills_the_process_re_acks_from_the_state_file() {
    let net = TestNet::start().await;
    let sn = "PWR0004";
    let dir = temporary_state_dir("crash-file");
    let device = net.initialised_device(stored_config(&net, sn, &dir)).await;
    device.crash_after_next_install().await.expect("knob");
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 4, KeySlot::PRODUCTION)), Tag::Device);
    device.wait_for("the crash", WAIT, |s| s.crashed).await.expect("crashed");
    device.shutdown().await;

    let again = Device::spawn(stored_config(&net, sn, &dir)).await.expect("respawn");
    let ack = net.gateway.wait_ack(sn, 4, 1).await;
    assert_eq!(ack.result, 0);
    let settled = again.wait_for("confirmed", WAIT, |s| s.unconfirmed_acks == 0).await.expect("confirmed");
    assert_eq!(settled.injections, 0);
    assert!(settled.locked);
    net.gateway.assert_clean_up_channel(sn);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_download_sent_while_powered_off_is_installed_once_after_power_on() {
    let net = TestNet::start().await;
    let sn = "PWR0005";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    device.power_off().await.expect("off");
    let download = net.gateway.tdes_download(sn, 5, KeySlot::PRODUCTION);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Device);
    let hellos = net.gateway.hellos(sn);
    device.power_on().await.expect("on");
    net.gateway.wait_hellos(sn, hellos + 1).await;
    // The gateway re-delivers on hello; the persistent session may deliver the first one too.
    net.gateway.send(sn, Message::Download(download), Tag::Device);
    let ack = net.gateway.wait_ack(sn, 5, 1).await;
    assert_eq!(ack.result, 0);
    let status =
        device.wait_for("settled", WAIT, |s| s.unconfirmed_acks == 0 && s.injections == 1).await.expect("once");
    assert_eq!(status.injections, 1);
}

#[tokio::test]
async fn an_offline_window_drops_the_connection_and_the_terminal_comes_back_with_a_hello() {
    let net = TestNet::start().await;
    let sn = "PWR0006";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    device.go_offline(Duration::from_millis(500)).await.expect("offline");
    device.wait_for("offline", WAIT, |s| !s.connected).await.expect("dropped");
    net.gateway.wait_hellos(sn, 2).await;
    let status = device.wait_for("back", WAIT, |s| s.connected).await.expect("back");
    assert_eq!(status.connections, 2);
    assert!(status.powered);
}

#[tokio::test]
async fn flapping_connectivity_reconnects_and_says_hello_each_time() {
    let net = TestNet::start().await;
    let sn = "PWR0007";
    let mut config = net.config(TestNet::profile(sn));
    config.knobs.flapping = Some(Flapping { online: Duration::from_millis(300), offline: Duration::from_millis(150) });
    let device = net.initialised_device(config).await;
    net.gateway.wait_hellos(sn, 4).await;
    assert!(device.status().connections >= 4);
    net.gateway.assert_clean_up_channel(sn);
}

#[tokio::test]
async fn a_delayed_power_on_connects_only_after_the_delay() {
    let net = TestNet::start().await;
    let sn = "PWR0008";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    device.power_off().await.expect("off");
    let start = tokio::time::Instant::now();
    device.power_on_after(Duration::from_millis(600)).await.expect("scheduled");
    assert!(!device.status().powered);
    net.gateway.wait_hellos(sn, 2).await;
    assert!(start.elapsed() >= Duration::from_millis(600));
}

#[tokio::test]
async fn an_unreachable_broker_fails_the_initialisation_with_a_clear_error_and_counts_it() {
    let net = TestNet::start().await;
    let sn = "PWR0009";
    let mut config = net.config(TestNet::profile(sn));
    config.broker.port = 1;
    let gudid = net.gateway.provision(sn);
    let device = Device::spawn(config).await.expect("spawn");
    match device.initialise(&gudid).await {
        Err(rki_device_sim::DeviceError::Mqtt(reason)) => {
            assert!(reason.contains("127.0.0.1:1"), "{reason}")
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
    let status = device.status();
    assert!(status.last_error.is_some() && !status.initialised);
    assert_eq!(device.counters().snapshot().errors, 1);
}

#[tokio::test]
async fn an_initialised_terminal_without_a_broker_retries_with_a_doubling_delay() {
    let sn = "PWR0010";
    let mut config =
        DeviceConfig::new(TestNet::profile(sn), rki_device_sim::BrokerAddr::new("127.0.0.1", 1), StateStore::Memory);
    config.preset_secrets = Some(common::random_device_secrets());
    config.knobs.reconnect_delay = Duration::from_millis(10);
    config.knobs.reconnect_delay_max = Duration::from_millis(160);
    let device = Device::spawn(config).await.expect("spawn");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let errors = device.counters().snapshot().errors;
    // 10 + 20 + 40 + 80 + 160 + 160 ... ms (plus up to a quarter of jitter): about 6 in 700 ms,
    // far fewer than without a backoff.
    assert!((3..=9).contains(&errors), "{errors} connection attempts");
    assert_eq!(device.status().connections, 0);
}

//! Key injection against a real broker and a fake gateway: installs, every refusal code,
//! duplicates, replays, unlocks, refusals from the gateway, slow acks, manual injection.

mod common;

use std::time::Duration;

use common::{FakeGateway, Tag, TestNet, WAIT};
use rki_device_sim::app::ForceError;
use rki_device_sim::{DeviceError, DeviceProfile};
use rki_protocol::message::{Body, Download, Message, Refusal, RefusalCode, Unlock};
use rki_protocol::terminal::{InjectionType, KeySlot, KeyType, Region, TerminalError};

#[tokio::test]
async fn a_download_installs_the_key_locks_the_terminal_and_acks_with_its_kcv() {
    let net = TestNet::start().await;
    let sn = "INJ0001";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    let download = net.gateway.tdes_download(sn, 1, KeySlot::PRODUCTION);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Device);

    let ack = net.gateway.wait_ack(sn, 1, 1).await;
    assert_eq!(ack.result, 0);
    assert_eq!(ack.slot, KeySlot::PRODUCTION);
    assert_eq!(ack.injection, InjectionType::Auto);
    assert_eq!(Some(ack.kcv.clone()), net.gateway.expected_kcv(1));
    assert_eq!(ack.key_id, download.key_id);
    let status = device.wait_for("ack confirmed", WAIT, |s| s.unconfirmed_acks == 0).await.expect("status");
    assert!(status.locked);
    assert_eq!(status.injections, 1);
    let slots = device.key_query();
    assert_eq!(slots.len(), 1);
    assert_eq!((slots[0].slot, slots[0].key_type), (KeySlot::PRODUCTION, KeyType::Ipek));
    assert_eq!(slots[0].kcv, ack.kcv);
    net.gateway.assert_clean_up_channel(sn);
}

#[tokio::test]
async fn an_aes_key_in_a_version_d_block_installs_too() {
    let net = TestNet::start().await;
    let sn = "INJ0002";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    let download = net.gateway.aes_download(sn, 2, KeySlot::DEVELOPMENT);
    net.gateway.send(sn, Message::Download(download), Tag::Device);
    let ack = net.gateway.wait_ack(sn, 2, 1).await;
    assert_eq!((ack.result, ack.slot), (0, KeySlot::DEVELOPMENT));
    assert_eq!(Some(ack.kcv), net.gateway.expected_kcv(2));
    assert!(device.wait_for("locked", WAIT, |s| s.locked).await.is_ok());
}

/// One refusal case: how the terminal is set up, how the download is spoiled, the code expected.
struct RefusalCase {
    name: &'static str,
    profile: fn(DeviceProfile) -> DeviceProfile,
    download: fn(&FakeGateway, &str, u64) -> Download,
    code: TerminalError,
}

fn unchanged(profile: DeviceProfile) -> DeviceProfile {
    profile
}

fn good(gateway: &FakeGateway, sn: &str, id: u64) -> Download {
    gateway.tdes_download(sn, id, KeySlot::PRODUCTION)
}

#[tokio::test]
async fn every_refusal_is_acked_with_its_code_installs_nothing_and_keeps_the_download() {
    let cases = [
        RefusalCase { name: "locked", profile: |p| p.locked(true), download: good, code: TerminalError::DeviceLocked },
        RefusalCase {
            name: "debug mode",
            profile: |p| p.in_debug_mode(true),
            download: good,
            code: TerminalError::DebugKeyPresent,
        },
        RefusalCase {
            name: "debug key in slot 8",
            profile: |p| p.with_debug_key(true),
            download: good,
            code: TerminalError::DebugKeyPresent,
        },
        RefusalCase {
            name: "ROM below the model's minimum",
            profile: |p| p.with_rom("3.0.14").expect("rom"),
            download: good,
            code: TerminalError::RomTooOld,
        },
        RefusalCase {
            name: "app 1.x on the EU portal",
            profile: |p| p.with_app("1.9.9").expect("app"),
            download: good,
            code: TerminalError::AppTooOld,
        },
        RefusalCase {
            name: "reserved slot 9001",
            profile: unchanged,
            download: |g, sn, id| g.tdes_download(sn, id, KeySlot::HARDWARE_CERTIFICATE),
            code: TerminalError::SlotNotWritable,
        },
        RefusalCase {
            name: "wrong KCV",
            profile: unchanged,
            download: |g, sn, id| {
                let mut d = g.tdes_download(sn, id, KeySlot::PRODUCTION);
                d.kcv[0] ^= 1;
                d
            },
            code: TerminalError::KeyRecordNotFound,
        },
        RefusalCase {
            name: "tampered key block",
            profile: unchanged,
            download: |g, sn, id| {
                let mut d = g.tdes_download(sn, id, KeySlot::PRODUCTION);
                let last = d.key_block.pop().expect("char");
                d.key_block.push(if last == '0' { '1' } else { '0' });
                d
            },
            code: TerminalError::KeyRecordNotFound,
        },
        RefusalCase {
            name: "key usage P0 instead of B1",
            profile: unchanged,
            download: |g, sn, id| g.pin_key_download(sn, id),
            code: TerminalError::KeyRecordNotFound,
        },
        RefusalCase {
            name: "block under another terminal's KBPK",
            profile: unchanged,
            download: |g, sn, id| {
                let mut d = g.tdes_download("REF-OTHER", id, KeySlot::PRODUCTION);
                d.execution_id = id;
                let _ = sn;
                d
            },
            code: TerminalError::KeyRecordNotFound,
        },
    ];
    let net = TestNet::start().await;
    // Dropping its handle stops the terminal: only its KBPK is needed, held by the gateway.
    drop(net.initialised_device(net.config(TestNet::profile("REF-OTHER"))).await);
    let mut devices = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let sn = format!("REF{index:04}");
        let profile = (case.profile)(TestNet::profile(&sn));
        devices.push((sn.clone(), net.initialised_device(net.config(profile)).await));
    }
    for (index, (case, (sn, device))) in cases.iter().zip(&devices).enumerate() {
        let execution_id = 100 + index as u64;
        let before = device.status();
        let download = (case.download)(&net.gateway, sn, execution_id);
        net.gateway.send(sn, Message::Download(download), Tag::Device);
        let ack = net.gateway.wait_ack(sn, execution_id, 1).await;
        assert_eq!(ack.result, case.code.code(), "{}", case.name);
        assert!(ack.key_id.is_empty() && ack.kcv.is_empty(), "{}: a failure carries no key", case.name);
        let after = device.wait_for("refusal recorded", WAIT, |s| s.kept_download.is_some()).await.expect(case.name);
        assert_eq!(after.kept_download, Some(execution_id), "{}", case.name);
        assert_eq!(after.injections, 0, "{}", case.name);
        assert_eq!(after.slots, before.slots, "{}", case.name);
        assert_eq!(after.locked, before.locked, "{}", case.name);
        net.gateway.assert_clean_up_channel(sn);
    }
}

#[tokio::test]
async fn the_china_portal_takes_keys_with_app_1_x() {
    let net = TestNet::start().await;
    let sn = "INJ0003";
    let profile = TestNet::profile(sn).with_region(Region::Cn).with_app("1.0.0").expect("app");
    let _device = net.initialised_device(net.config(profile)).await;
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 3, KeySlot::PRODUCTION)), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 3, 1).await.result, 0);
}

#[tokio::test]
async fn a_duplicate_delivery_gets_the_same_ack_again_and_never_injects_twice() {
    let net = TestNet::start().await;
    let sn = "INJ0004";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    let download = net.gateway.tdes_download(sn, 4, KeySlot::PRODUCTION);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Device);
    let first = net.gateway.wait_ack(sn, 4, 1).await;
    // The gateway re-delivers (a new frame: new counter, re-signed).
    net.gateway.send(sn, Message::Download(download), Tag::Device);
    let second = net.gateway.wait_ack(sn, 4, 2).await;
    assert_eq!(first, second);
    assert_eq!(first.result, 0);
    assert_eq!(device.status().injections, 1);
    net.gateway.assert_clean_up_channel(sn);
}

#[tokio::test]
async fn a_duplicate_of_a_refused_download_gets_the_same_refusal() {
    let net = TestNet::start().await;
    let sn = "INJ0005";
    let _device = net.initialised_device(net.config(TestNet::profile(sn).locked(true))).await;
    let download = net.gateway.tdes_download(sn, 5, KeySlot::PRODUCTION);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Device);
    let first = net.gateway.wait_ack(sn, 5, 1).await;
    net.gateway.send(sn, Message::Download(download), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 5, 2).await, first);
    assert_eq!(first.result, TerminalError::DeviceLocked.code());
}

#[tokio::test]
async fn a_replayed_download_frame_is_refused_and_counted() {
    let net = TestNet::start().await;
    let sn = "INJ0006";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    let frame =
        net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 6, KeySlot::PRODUCTION)), Tag::Device);
    net.gateway.wait_ack(sn, 6, 1).await;
    net.gateway.send_raw(sn, frame);
    let status = device.wait_for("replay counted", WAIT, |s| s.rejected.replay == 1).await.expect("replay");
    assert_eq!(status.acks_sent, 1, "a replay is not answered");
    assert_eq!(status.injections, 1);
}

#[tokio::test]
async fn unsigned_forged_and_foreign_downloads_are_refused_counted_and_never_acted_on() {
    let net = TestNet::start().await;
    let sn = "INJ0007";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    let download = net.gateway.tdes_download(sn, 7, KeySlot::PRODUCTION);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Public);
    net.gateway.send(sn, Message::Download(download.clone()), Tag::Key(FakeGateway::foreign_key()));
    let foreign = Body { party: "SOMEONE-ELSE".into(), counter: u64::MAX / 2, message: Message::Download(download) };
    net.gateway.send_raw(sn, net.gateway.seal_body(sn, &foreign, Tag::Device));
    net.gateway.send_raw(sn, b"not a frame".to_vec());
    let status = device.wait_for("four rejections", WAIT, |s| s.rejected.total() == 4).await.expect("rejections");
    assert_eq!((status.rejected.bad_tag, status.rejected.foreign_party, status.rejected.malformed), (2, 1, 1));
    assert_eq!((status.injections, status.acks_sent), (0, 0));
    assert!(!status.locked);
}

#[tokio::test]
async fn a_signed_unlock_clears_the_lock_and_a_fresh_hello_confirms_it() {
    let net = TestNet::start().await;
    let sn = "INJ0008";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 8, KeySlot::PRODUCTION)), Tag::Device);
    net.gateway.wait_ack(sn, 8, 1).await;
    let hellos = net.gateway.hellos(sn);

    net.gateway.unlock(sn, Tag::Device);
    let hello = net.gateway.wait_hellos(sn, hellos + 1).await;
    assert!(!hello.locked);
    assert!(!device.status().locked);

    // Another key can go on now.
    net.gateway.send(sn, Message::Download(net.gateway.aes_download(sn, 9, KeySlot::PRODUCTION)), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 9, 1).await.result, 0);
    assert_eq!(device.wait_for("two injections", WAIT, |s| s.injections == 2).await.map(|s| s.locked).ok(), Some(true));
}

#[tokio::test]
async fn unsigned_forged_foreign_and_replayed_unlocks_are_refused_and_counted() {
    let net = TestNet::start().await;
    let sn = "INJ0009";
    let device = net.initialised_device(net.config(TestNet::profile(sn).locked(true))).await;
    net.gateway.unlock(sn, Tag::Public);
    net.gateway.unlock(sn, Tag::Key(FakeGateway::foreign_key()));
    let foreign =
        Body { party: "INJ9999".into(), counter: u64::MAX / 2, message: Message::Unlock(Unlock { unlock_id: 1 }) };
    net.gateway.send_raw(sn, net.gateway.seal_body(sn, &foreign, Tag::Device));
    let status = device.wait_for("three rejections", WAIT, |s| s.rejected.total() == 3).await.expect("rejections");
    assert_eq!((status.rejected.bad_tag, status.rejected.foreign_party), (2, 1));
    assert!(status.locked);

    // A genuine unlock is obeyed once; replaying its frame after a re-lock does nothing.
    let genuine = net.gateway.unlock(sn, Tag::Device);
    device.wait_for("unlocked", WAIT, |s| !s.locked).await.expect("unlocked");
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 10, KeySlot::PRODUCTION)), Tag::Device);
    net.gateway.wait_ack(sn, 10, 1).await;
    net.gateway.send_raw(sn, genuine);
    let status = device.wait_for("replay counted", WAIT, |s| s.rejected.replay == 1).await.expect("replay");
    assert!(status.locked);
}

#[tokio::test]
async fn a_refusal_from_the_gateway_is_counted_and_changes_nothing() {
    let net = TestNet::start().await;
    let sn = "INJ0010";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    let refusal = Message::Refusal(Refusal { request_counter: 1, code: RefusalCode::Replay });
    net.gateway.send(sn, refusal.clone(), Tag::Public);
    net.gateway.send(sn, refusal, Tag::Device);
    let status = device.wait_for("two refusals", WAIT, |s| s.refusals == 2).await.expect("refusals");
    assert_eq!(status.last_refusal, Some(RefusalCode::Replay));
    assert!(!status.locked && status.slots.is_empty() && status.rejected.total() == 0);
}

#[tokio::test]
async fn a_slow_ack_is_decided_and_persisted_first_then_sent_after_the_delay() {
    let net = TestNet::start().await;
    let sn = "INJ0011";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    device.set_ack_delay(Duration::from_millis(700)).await.expect("knob");
    let sent_at = tokio::time::Instant::now();
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 11, KeySlot::PRODUCTION)), Tag::Device);
    let installed = device.wait_for("installed", WAIT, |s| s.injections == 1).await.expect("installed");
    assert_eq!(installed.unconfirmed_acks, 1, "decided, not yet acked");
    assert!(net.gateway.acks_for(sn, 11).is_empty());
    net.gateway.wait_ack(sn, 11, 1).await;
    assert!(sent_at.elapsed() >= Duration::from_millis(700));
}

#[tokio::test]
async fn a_forced_failure_code_is_acked_whatever_the_terminal_state() {
    let net = TestNet::start().await;
    let sn = "INJ0012";
    let device = net.initialised_device(net.config(TestNet::profile(sn))).await;
    device.set_forced_failure(Some(TerminalError::SlotNotWritable)).await.expect("knob");
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 12, KeySlot::PRODUCTION)), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 12, 1).await.result, -20003);
}

#[tokio::test]
async fn a_refused_download_is_forced_manually_once_the_debug_key_is_deleted() {
    let net = TestNet::start().await;
    let sn = "INJ0013";
    let device = net.initialised_device(net.config(TestNet::profile(sn).with_debug_key(true))).await;
    assert!(matches!(device.force_manual_injection().await, Err(DeviceError::Force(ForceError::NothingToForce))));
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 13, KeySlot::PRODUCTION)), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 13, 1).await.result, -3000);

    // Still a debug key: forcing fails clearly and changes nothing.
    assert!(matches!(
        device.force_manual_injection().await,
        Err(DeviceError::Force(ForceError::Refused(TerminalError::DebugKeyPresent)))
    ));
    assert!(device.reset_slot(KeySlot::DEBUG).await.expect("reset"));
    let ack = device.force_manual_injection().await.expect("forced");
    assert_eq!((ack.result, ack.injection), (0, InjectionType::Manual));

    let manual = net.gateway.wait_ack(sn, 13, 2).await;
    assert_eq!(manual, ack);
    assert_eq!(Some(manual.kcv), net.gateway.expected_kcv(13));
    let status = device.status();
    assert!(status.locked && status.kept_download.is_none());
    assert_eq!(status.injections, 1);
    // Nothing is left to force.
    assert!(matches!(device.force_manual_injection().await, Err(DeviceError::Force(ForceError::NothingToForce))));
}

//! The SQLite store beside other processes and faults, on the real binary: the gateway keeps its
//! locks (so another process cannot delete its WAL), maintenance commands beside it are refused,
//! backups taken during a push restore to a consistent store, a full disk is answered clearly and
//! survived, and a store that is missing, empty or corrupt is refused at start.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rki_device_sim::Knobs;
use rki_tests::{
    create_task, for_group, provision, sns, task_detail, temp_dir, wait, wait_task, wait_task_done, GatewayOptions,
    GatewayProcess, TestResult,
};
use serde_json::{json, Value};

fn store(gw: &GatewayProcess) -> PathBuf {
    gw.data_dir().join("rki.sqlite")
}

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `major:minor:inode` as `/proc/locks` prints a file's identity.
fn lock_id(path: &Path) -> TestResult<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path)?;
    let dev = md.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Ok(format!("{major:02x}:{minor:02x}:{}", md.ino()))
}

/// `/proc/locks` in one `read` call: the kernel lists the table afresh at each call, so a lock
/// taken or released by another process between two calls can shift a line out of the reading
/// (the gateway's guard reads it the same way: `store::guard`).
fn lock_table() -> TestResult<String> {
    let mut table = Vec::with_capacity(64 * 1024);
    std::fs::File::open("/proc/locks")?.read_to_end(&mut table)?;
    Ok(String::from_utf8(table)?)
}

/// POSIX locks `/proc/locks` lists for process `pid` on `path`.
fn posix_locks_of(pid: u32, path: &Path) -> TestResult<usize> {
    let id = lock_id(path)?;
    let table = lock_table()?;
    Ok(table
        .lines()
        .filter(|l| !l.contains("->"))
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[1] == "POSIX" && f[4] == pid.to_string() && f[5] == id
        })
        .count())
}

/// Whether `pid` holds a POSIX lock on `path`, reading `/proc/locks` for up to 2 s, as the
/// gateway's own guard does: one reading can miss a held lock when other processes' locks
/// change meanwhile (the CI saw it once, beside the other tests' gateways).
fn holds_locks(pid: u32, path: &Path) -> TestResult {
    wait::poll(&format!("a lock of the gateway on {} in /proc/locks", path.display()), Duration::from_secs(2), || {
        match posix_locks_of(pid, path) {
            Ok(0) => Err(lock_table().unwrap_or_else(|e| e.to_string())),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
}

fn import(gw: &GatewayProcess, prefix: &str, n: usize) -> (u16, Value) {
    let csv = std::iter::once("sn,model".to_string())
        .chain((0..n).map(|i| format!("{prefix}{i:06},P3")))
        .collect::<Vec<_>>()
        .join("\n");
    gw.upload_devices("acme", &csv)
}

fn device_count(gw: &GatewayProcess) -> TestResult<i64> {
    let v = gw.api().ok("/v1/devices?limit=1")?;
    v["total"].as_i64().ok_or_else(|| format!("no total in {v}").into())
}

#[test]
fn another_process_opening_the_store_beside_the_gateway_leaves_its_wal_and_locks_and_loses_nothing() -> TestResult {
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let db = store(&gw);
    let pid = gw.pid().ok_or("no pid")?;
    // The gateway holds SQLite's shared locks on the database and on its shared memory.
    holds_locks(pid, &db)?;
    holds_locks(pid, &sidecar(&db, "-shm"))?;
    // A second process (this test) opens the store, reads, and closes it: it must not take itself
    // for the last connection, so the WAL stays.
    {
        let conn = rusqlite::Connection::open(&db)?;
        let n: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        assert!(n >= 1);
    }
    assert!(sidecar(&db, "-wal").exists(), "the other process's close deleted the gateway's WAL");
    holds_locks(pid, &db)?;
    let (status, v) = import(&gw, "LOCK", 500);
    assert_eq!(status, 200, "{v}");
    // No flush, no goodbye: every import must be in the WAL the gateway really writes.
    gw.kill()?;
    gw.start_again()?;
    assert_eq!(device_count(&gw)?, 500, "devices imported after the other process closed the store were lost");
    Ok(())
}

#[test]
fn maintenance_commands_beside_a_running_gateway_are_refused_and_change_nothing() -> TestResult {
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let orgs_before = gw.key_owner().ok("/v1/orgs")?["orgs"].as_array().map_or(0, Vec::len);
    let key_file = gw.data_dir().with_file_name("data.master.key");
    let key_before = std::fs::read(&key_file)?;
    for args in [&["init-org", "late"][..], &["init-key-owner"][..], &["rotate-master-key"][..]] {
        let out = gw.offline(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran beside the gateway");
        assert!(stderr.contains("is in use by the running gateway"), "{args:?}: {stderr}");
    }
    assert_eq!(gw.key_owner().ok("/v1/orgs")?["orgs"].as_array().map_or(0, Vec::len), orgs_before);
    assert_eq!(std::fs::read(&key_file)?, key_before, "the master key changed");
    // Stopped, the same command works.
    gw.terminate()?;
    let out = gw.offline(&["init-org", "late"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn store_files_are_private_to_the_gateways_user() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let db = store(&gw);
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&gw.data_dir())?, 0o700, "data directory");
    for file in [db.clone(), sidecar(&db, "-wal"), sidecar(&db, "-shm"), gw.data_dir().join("rki-gateway.lock")] {
        assert_eq!(mode(&file)?, 0o600, "{}", file.display());
    }
    Ok(())
}

#[test]
fn a_backup_taken_during_a_push_of_2000_terminals_restores_to_a_consistent_store() -> TestResult {
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("BACKUP", 2000), "fleet")?;
    let knobs = Knobs { ack_delay: Duration::from_millis(2000), ..Knobs::default() };
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, knobs)?,
        Duration::from_secs(120),
    ))?;
    let task = create_task(&api, &for_group("fleet"))?.task.id;
    // Back up once some acks are recorded and many are not.
    wait_task(&api, task, Duration::from_secs(60), |c| c.succeeded >= 1)?;
    let copy = gw.dir.join("backup.sqlite");
    let out = gw.offline(&["backup", copy.to_str().ok_or("path")?])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = wait_task_done(&api, task, Duration::from_secs(120))?;
    assert_eq!(done.task.counts.succeeded, 2000, "{:?}", done.task);
    drop(fleet);

    // The copy: sound, private, and a snapshot of the live store.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&copy)?.permissions().mode() & 0o777, 0o600);
    let backup = rusqlite::Connection::open(&copy)?;
    let check: String = backup.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    assert_eq!(check, "ok");
    let records = |c: &rusqlite::Connection| -> TestResult<Vec<(i64, String, String)>> {
        let mut s = c.prepare("SELECT execution_id, result, kcv FROM records ORDER BY execution_id")?;
        let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    };
    let in_backup = records(&backup)?;
    let live = records(&rusqlite::Connection::open(store(&gw))?)?;
    assert!(!in_backup.is_empty() && in_backup.len() <= 2000, "{} records in the backup", in_backup.len());
    for r in &in_backup {
        assert!(live.contains(r), "record {r:?} of the backup is not in the live store");
    }
    // Each ended execution of the copy has its record, each open one none.
    let unmatched: i64 = backup.query_row(
        "SELECT count(*) FROM executions e WHERE (e.state IN ('succeeded','failed')) != \
         EXISTS (SELECT 1 FROM records r WHERE r.execution_id = e.id)",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(unmatched, 0, "executions and records disagree in the copy");

    // Restored beside the same master key, it starts and serves the task as it stood.
    gw.terminate()?;
    let restored = temp_dir("restored");
    std::fs::create_dir_all(restored.join("data"))?;
    std::fs::copy(&copy, restored.join("data/rki.sqlite"))?;
    std::fs::copy(gw.data_dir().with_file_name("data.master.key"), restored.join("data.master.key"))?;
    let http = rki_tests::free_port();
    let mut child = Command::new(rki_tests::binary("rki-gateway"))
        .arg("--data-dir")
        .arg(restored.join("data"))
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--mqtt-addr")
        .arg(format!("127.0.0.1:{}", rki_tests::free_port()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let api = rki_tests::Api::new(&format!("http://127.0.0.1:{http}"), &gw.org_token);
    let restored_task =
        wait::poll(&format!("the restored store to serve task {task}"), Duration::from_secs(30), || {
            task_detail(&api, task).map_err(|e| e.to_string())
        });
    let _ = child.kill();
    let _ = child.wait();
    let restored_task = restored_task?;
    assert_eq!(restored_task.task.counts.succeeded, in_backup.len() as i64, "{:?}", restored_task.task);
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> TestResult<SmallDisk> {
        let path = temp_dir("smalldisk");
        let out =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).output()?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs (this test needs root, as CI has): {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(SmallDisk { path })
    }

    fn resize(&self, size: &str) -> TestResult {
        let out = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.path).output()?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
        }
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_is_answered_with_storage_full_and_survived_without_a_restart() -> TestResult {
    let disk = SmallDisk::mount("3m")?;
    let options = GatewayOptions {
        data_dir: Some(disk.path.join("data")),
        // Small enough that the imports below also meet SQLite's own "disk full".
        env: vec![("RKI_STORE_MIN_FREE_BYTES".into(), "262144".into())],
        ..GatewayOptions::default()
    };
    let gw = GatewayProcess::start(options)?;
    // Imports until the disk refuses one; every import that was answered 200 must stay.
    let mut imported = 0;
    let mut refusal = None;
    for batch in 0..40 {
        let (status, v) = import(&gw, &format!("F{batch:02}"), 5_000);
        match status {
            200 => imported += 5_000,
            _ => {
                refusal = Some((status, v));
                break;
            }
        }
    }
    let (mut status, mut v) = refusal.ok_or("a 3 MB disk took 200,000 devices")?;
    if status == 0 {
        // The gateway answered 507 before reading the whole CSV and closed the connection, which
        // the client saw as a broken pipe while still sending: ask again with a small change.
        (status, v) = gw.api().post("/v1/groups", &json!({"name": "probe"}));
    }
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["code"], "storage_full", "{v}");
    let (status, health) = gw.api().get("/healthz");
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "storage_full", "{health}");
    assert_eq!(gw.metric("rki_store_up"), 0.0);
    // Reads still work, and nothing committed is lost.
    assert_eq!(device_count(&gw)?, imported);
    // Space returns: the same gateway accepts changes again, with no restart.
    disk.resize("64m")?;
    let (status, v) = import(&gw, "AFTER", 5_000);
    assert_eq!(status, 200, "{v}");
    let (status, health) = gw.api().get("/healthz");
    assert_eq!(status, 200, "{health}");
    assert_eq!(device_count(&gw)?, imported + 5_000);
    drop(gw);
    Ok(())
}

#[test]
fn a_missing_empty_or_corrupt_store_beside_an_existing_master_key_is_refused_at_start() -> TestResult {
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    provision(&gw, &sns("CHECK", 20), "fleet")?;
    gw.terminate()?;
    let data = gw.data_dir();
    let db = store(&gw);
    let refused = |gw: &mut GatewayProcess, expected: &str| -> TestResult {
        let started = gw.start_again();
        assert!(started.is_err(), "started, where it should have refused ({expected})");
        assert!(gw.log_tail().contains(expected), "{expected}: {}", gw.log_tail());
        Ok(())
    };
    // A mis-pointed or lost data directory.
    let moved = data.with_file_name("moved");
    std::fs::rename(&data, &moved)?;
    refused(&mut gw, "is missing or empty, but the master key")?;
    std::fs::remove_dir_all(&data)?;
    std::fs::rename(&moved, &data)?;
    // An empty store file.
    let saved = db.with_extension("saved");
    std::fs::rename(&db, &saved)?;
    std::fs::write(&db, b"")?;
    refused(&mut gw, "is missing or empty, but the master key")?;
    std::fs::rename(&saved, &db)?;
    gw.start_again()?;
    gw.terminate()?;
    // A corrupt page: the devices table's root page overwritten.
    let (root, page_size): (i64, i64) = {
        let conn = rusqlite::Connection::open(&db)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let root = conn.query_row("SELECT rootpage FROM sqlite_master WHERE name = 'devices'", [], |r| r.get(0))?;
        (root, conn.query_row("PRAGMA page_size", [], |r| r.get(0))?)
    };
    let sound = std::fs::read(&db)?;
    let mut bytes = sound.clone();
    let offset = ((root - 1) * page_size) as usize;
    for b in &mut bytes[offset..offset + 64] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes)?;
    refused(&mut gw, "failed SQLite's quick check")?;
    std::fs::write(&db, &sound)?;
    // A master key file in the wrong format says what it expects.
    let key_file = data.with_file_name("data.master.key");
    std::fs::write(&key_file, [0x5Au8; 32])?;
    refused(&mut gw, "expected 64 hexadecimal digits")?;
    Ok(())
}

#[test]
fn a_new_store_beside_an_existing_master_key_starts_with_init() -> TestResult {
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    gw.terminate()?;
    std::fs::remove_dir_all(gw.data_dir())?;
    assert!(gw.start_again().is_err(), "an empty store started without --init");
    // With --init, on purpose: a new store under the existing key.
    let http = rki_tests::free_port();
    let mut child = Command::new(rki_tests::binary("rki-gateway"))
        .arg("--data-dir")
        .arg(gw.data_dir())
        .arg("--init")
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--mqtt-addr")
        .arg(format!("127.0.0.1:{}", rki_tests::free_port()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Until it answers /healthz; an exit ends the wait at once.
    let started = wait::poll("the gateway to answer /healthz on a new store", Duration::from_secs(30), || {
        if ureq::get(&format!("http://127.0.0.1:{http}/healthz")).call().is_ok() {
            return Ok(Ok(()));
        }
        match child.try_wait() {
            Ok(Some(status)) => Ok(Err(format!("it exited with {status}"))),
            Ok(None) => Err("no answer yet".to_string()),
            Err(e) => Ok(Err(e.to_string())),
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(started, Ok(Ok(()))), "--init did not start a new store: {started:?}");
    Ok(())
}

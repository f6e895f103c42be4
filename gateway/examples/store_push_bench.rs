//! The store's share of a fleet push, replayed without sockets: 19,000 initialised terminals
//! (credential columns as long as the gateway's), one task for all of them, then the writes the
//! committer sends during the push, in the batches it forms: every `Delivered` first (the
//! delivery loop queues them all at once), then each ack's counter and ending in batches of
//! about 1,200 acks (what the 19,000 push's commits held). Every other run replays what the
//! engine writes since the `Delivered` writes wait a second for the ack: no `Delivered` phase,
//! each ending carries its send ([`Ending::sends`]). Reports the time spent in `apply_batch` for
//! each phase and the bytes the process wrote (WAL frames and checkpoints).
//!
//! ```text
//! cargo run --release -p rki-gateway --example store_push_bench [-- DEVICES]
//! ```

#[path = "../tests/store_suite/harness.rs"]
mod harness;
#[path = "../../tests/src/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use rki_gateway::store::sqlite::SqliteStore;
use rki_gateway::store::*;

use harness::*;

/// Writes in one batch while the deliveries are queued (the committer's cap).
const DELIVERED_BATCH: usize = 8_192;
/// Acks per batch during the ack phase: the 19,000 push's commits held about 3,600 writes.
const ACKS_PER_BATCH: usize = 1_200;
const RUNS: usize = 3;

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes: ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

fn hex_of(len: usize, seed: usize) -> String {
    (0..len).map(|i| char::from(b"0123456789ABCDEF"[(seed * 7 + i * 13) % 16])).collect()
}

fn credentials(i: usize) -> NewCredentials {
    NewCredentials {
        signing_key: hex_of(144, i),
        kbpk_aes: hex_of(144, i + 1),
        kbpk_tdes: hex_of(112, i + 2),
        password_hash: vec![(i % 251) as u8; 32],
        counter: 1,
        x_pos_device_id: format!("XPOS{i:016}"),
        broker_password_hash: hex_of(112, i + 3),
    }
}

fn main() {
    let devices: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(19_000);
    let dir = TempDir::new("rki-store-push-bench");
    let st = SqliteStore::open(&dir.path().join("rki.sqlite")).must();
    let w = world(&st, "push", devices);
    // Initialise every device and record a hello report, as the connect phase does.
    let setup: Vec<Write> = (0..devices)
        .flat_map(|i| {
            let d = &w.devices[i];
            let gudid = st.insert_gudid(&new_gudid(&w, i, 0xC0)).must();
            [
                Write::Initialise { gudid_row: gudid.id, device_id: d.id, creds: credentials(i), at: T0 + 1 },
                Write::Report(report(d.id, false, T0 + 2)),
            ]
        })
        .collect();
    for chunk in setup.chunks(DELIVERED_BATCH) {
        st.apply_batch(chunk).must();
    }
    let all: Vec<usize> = (0..devices).collect();
    // [separate, folded]
    let mut delivered_times = [Vec::new(), Vec::new()];
    let mut ack_times = [Vec::new(), Vec::new()];
    let mut bytes = [Vec::new(), Vec::new()];
    for run in 0..2 * RUNS {
        let folded = run % 2;
        let mut new = new_task(&w, &all, T0 + 10, T0 + 30 * DAY_MS);
        for (i, e) in new.executions.iter_mut().enumerate() {
            e.key_block = format!("B0136B1TX00E0000{}", hex_of(120, i + run));
        }
        let (_, executions) = st.create_task(&new).must();
        std::thread::sleep(Duration::from_millis(300)); // the checkpointer catches up
        let before = written_bytes();
        let started = Instant::now();
        let delivered: Vec<Write> = if folded == 1 {
            Vec::new()
        } else {
            executions.iter().map(|e| Write::Delivered { execution_id: e.id, at: T0 + 20 }).collect()
        };
        for chunk in delivered.chunks(DELIVERED_BATCH) {
            st.apply_batch(chunk).must();
        }
        let delivered_time = started.elapsed();
        let started = Instant::now();
        let mut ended = 0;
        for chunk in executions.chunks(ACKS_PER_BATCH) {
            let mut writes = ack_writes(chunk, 10 + run as u64, T0 + 30);
            if folded == 1 {
                for w in &mut writes {
                    if let Write::End(ending) = w {
                        ending.sends = Some(Sends::one(T0 + 20));
                    }
                }
            }
            ended += st.apply_batch(&writes).must().ended.len();
        }
        assert_eq!(ended, devices);
        let ack_time = started.elapsed();
        bytes[folded].push(written_bytes() - before);
        delivered_times[folded].push(delivered_time);
        ack_times[folded].push(ack_time);
        println!(
            "run {run} ({}): delivered {:.1} ms, acks {:.1} ms, written {:.1} MiB",
            ["separate", "folded"][folded],
            delivered_time.as_secs_f64() * 1e3,
            ack_time.as_secs_f64() * 1e3,
            (written_bytes() - before) as f64 / (1 << 20) as f64
        );
    }
    for folded in 0..2 {
        delivered_times[folded].sort();
        ack_times[folded].sort();
        bytes[folded].sort();
        println!(
            "sqlite push of {devices}, {}: delivered median {:.1} ms, acks median {:.1} ms, written median {:.1} MiB",
            ["Delivered written apart", "sends folded into the endings"][folded],
            delivered_times[folded][RUNS / 2].as_secs_f64() * 1e3,
            ack_times[folded][RUNS / 2].as_secs_f64() * 1e3,
            bytes[folded][RUNS / 2] as f64 / (1 << 20) as f64
        );
    }
}

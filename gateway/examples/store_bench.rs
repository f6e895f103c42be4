//! Store costs on both backends: `apply_batch` with 1,000 ack endings (each ack is a counter
//! write and a successful ending that locks the device, as the committer sends them), and
//! `create_task` with 10,000 executions (including the read-back the trait does).
//!
//! ```text
//! cargo run --release -p rki-gateway --example store_bench
//! RKI_BENCH_PG_URL='host=… user=… dbname=…' cargo run --release -p rki-gateway --example store_bench
//! ```
//!
//! Without `RKI_BENCH_PG_URL`, a throwaway PostgreSQL server is started like the store test
//! suite's (Debian's `postgresql` package; fsync on, as SQLite's `synchronous = FULL`). The given
//! database must be empty.

#[path = "../tests/store_suite/harness.rs"]
mod harness;
#[path = "../../tests/src/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use rki_gateway::domain::ExecutionState;
use rki_gateway::store::postgres::PostgresStore;
use rki_gateway::store::sqlite::SqliteStore;
use rki_gateway::store::*;

use harness::*;

/// Acks per batch: the committer's batches reach this under load.
const ACKS: usize = 1_000;
/// Executions of the large task.
const TASK_EXECUTIONS: usize = 10_000;
/// Measured repetitions of each operation; the median and the best are reported (the best is
/// the figure least disturbed by other work on a shared machine).
const RUNS: usize = 9;
const PG_POOL_SIZE: usize = 4;

fn median_and_best(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[0])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1_000.0)
}

fn bench(name: &str, st: &dyn Store) {
    let w = world(st, &format!("bench-{name}"), TASK_EXECUTIONS);
    let mut batch_samples = Vec::new();
    let mut ending_only_samples = Vec::new();
    for run in 0..RUNS {
        // Fresh open executions for 1,000 devices, one task per run.
        let devices: Vec<usize> = (run * ACKS..(run + 1) * ACKS).map(|i| i % TASK_EXECUTIONS).collect();
        let (_, executions) = task(st, &w, &devices);
        let writes = ack_writes(&executions, 1_000 + run as u64, T0 + 1);
        let started = Instant::now();
        let outcome = st.apply_batch(&writes).must();
        batch_samples.push(started.elapsed());
        assert_eq!(outcome.ended.len(), ACKS);

        let (_, executions) = task(st, &w, &devices);
        let endings: Vec<Write> =
            executions.iter().map(|e| Write::End(ending(e.id, ExecutionState::Failed, T0 + 2))).collect();
        let started = Instant::now();
        let outcome = st.apply_batch(&endings).must();
        ending_only_samples.push(started.elapsed());
        assert_eq!(outcome.ended.len(), ACKS);
    }
    let mut create_samples = Vec::new();
    let all: Vec<usize> = (0..TASK_EXECUTIONS).collect();
    for _ in 0..RUNS {
        let new = new_task(&w, &all, T0, T0 + 30 * DAY_MS);
        let started = Instant::now();
        let (_, executions) = st.create_task(&new).must();
        create_samples.push(started.elapsed());
        assert_eq!(executions.len(), TASK_EXECUTIONS);
    }
    let (batch, batch_best) = median_and_best(batch_samples);
    let (endings, endings_best) = median_and_best(ending_only_samples);
    let (create, create_best) = median_and_best(create_samples);
    println!(
        "{name:<10} apply_batch {ACKS} acks (counter + ending + lock): median {} (best {}), {:.0} acks/s",
        ms(batch),
        ms(batch_best),
        ACKS as f64 / batch.as_secs_f64()
    );
    println!(
        "{name:<10} apply_batch {ACKS} endings alone:               median {} (best {})",
        ms(endings),
        ms(endings_best)
    );
    println!(
        "{name:<10} create_task {TASK_EXECUTIONS} executions (with read-back):   median {} (best {})",
        ms(create),
        ms(create_best)
    );
}

fn main() {
    let sqlite_dir = TempDir::new("rki-store-bench");
    let sqlite = SqliteStore::open(&sqlite_dir.path().join("rki.sqlite")).must();
    bench("sqlite", &sqlite);

    let server;
    let url = match std::env::var("RKI_BENCH_PG_URL") {
        Ok(url) => url,
        Err(_) => {
            server = pg::PgServer::start().unwrap_or_else(|e| panic!("{e}"));
            server.create_database("bench").unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap_or_else(|e| panic!("{e}"));
    let settings: Vec<String> = ["server_version", "fsync", "synchronous_commit", "shared_buffers", "wal_sync_method"]
        .iter()
        .map(|name| {
            let value: String =
                client.query_one(&format!("SHOW {name}"), &[]).map(|r| r.get(0)).unwrap_or_else(|e| e.to_string());
            format!("{name}={value}")
        })
        .collect();
    println!("postgres   {}", settings.join(" "));
    let postgres = PostgresStore::connect(&url, PG_POOL_SIZE).must();
    bench("postgres", &postgres);
}

//! The engine on a real SQLite store: the downlink counter across clock jumps and restarts.

use super::*;

struct NoOutbound;

impl Outbound for NoOutbound {
    fn publish(&self, _topic: String, _payload: Vec<u8>) {}
}

/// An engine on an SQLite store in `dir` (shared by the engines of one test, as by restarts).
async fn engine_in(dir: &std::path::Path, clock: Clock) -> Arc<Engine> {
    std::fs::create_dir_all(dir).expect("dir");
    let store: Arc<dyn Store> =
        Arc::new(crate::store::sqlite::SqliteStore::open(&dir.join("rki.sqlite")).expect("store"));
    let keys = Arc::new(crate::keyservice::SoftwareKeyService::new(
        crate::keyservice::MasterKey::generate().expect("master key"),
    ));
    Engine::start(store, keys, Arc::new(clock), Arc::new(NoOutbound)).await.expect("engine")
}

fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rki-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[test]
fn no_downlink_counter_is_used_above_the_durable_mark_even_across_a_clock_jump() {
    let dir = test_dir("mark");
    runtime().block_on(async {
        let clock = Clock::adjustable();
        let engine = engine_in(&dir, clock).await;
        let mark = || engine.store.mark(MARK_DOWN_COUNTER).expect("mark").expect("a mark") as u64;
        let mut last = 0;
        for _ in 0..10_000 {
            let counter = engine.next_down_counter().expect("counter");
            assert!(counter > last);
            assert!(counter <= mark(), "counter {counter} above the durable mark");
            last = counter;
        }
        // The clock jumps a day ahead: the next counter is reserved before it is used.
        engine.clock.step(86_400_000).expect("step");
        let counter = engine.next_down_counter().expect("counter");
        assert!(counter >= last + 86_400_000_000 - 1_000_000);
        assert!(counter <= mark());
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restart_with_the_clock_set_back_starts_above_every_counter_used() {
    let dir = test_dir("restart");
    let rt = runtime();
    let last = rt.block_on(async {
        let ahead = Clock::adjustable();
        ahead.step(31 * 86_400_000).expect("step");
        let engine = engine_in(&dir, ahead).await;
        let mut last = 0;
        for _ in 0..100 {
            last = engine.next_down_counter().expect("counter");
        }
        last
    });
    drop(rt);
    runtime().block_on(async {
        // Real time now, 31 days behind the previous run.
        let engine = engine_in(&dir, Clock::system()).await;
        let first = engine.next_down_counter().expect("counter");
        assert!(first > last, "counter {first} not above the previous run's {last}");
        // The wall reading does not go back either: the previous run's floor holds it.
        assert!(engine.clock.now_ms() >= (last / 1000) as i64 - CLOCK_FLOOR_AHEAD_MS);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

//! Bounded waits on a condition: the only way a test waits for something to happen.
//!
//! A test never sleeps for a fixed time hoping that the gateway is done by then: it polls the
//! condition it needs (a metric, an API answer, a file, a process state) until it holds or a
//! deadline passes, and then fails with a message that names what it was waiting for and what it
//! saw last. Every wait is bounded twice: by its deadline and by a number of attempts
//! ([`ATTEMPTS_MAX`]), so that a probe that returns at once cannot spin forever either.
//!
//! The polls start every [`FIRST_INTERVAL`] and back off by doubling to [`MAX_INTERVAL`]: a quick
//! condition is seen within milliseconds, a slow one costs little CPU on a 2-core CI machine. A
//! probe that costs more than a request (a batch of queries, a process) backs off further, to the
//! pause its caller names ([`poll_paced`]).
//!
//! A fixed sleep stays only where time passing is the point of the test ("nothing happens within
//! X", a keep-alive or CONNECT deadline), and it says so in a comment.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::TestResult;

/// The first pause between two polls.
pub const FIRST_INTERVAL: Duration = Duration::from_millis(5);
/// The longest pause between two polls.
pub const MAX_INTERVAL: Duration = Duration::from_millis(100);
/// Polls at most, whatever the deadline (10 minutes of polls at [`MAX_INTERVAL`]).
pub const ATTEMPTS_MAX: u32 = 6_000;

/// Polls `probe` until it yields `Ok`, or `timeout` passes: then the error names `what` and the
/// last `Err` the probe gave (what it saw instead).
pub fn poll<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    probe: impl FnMut() -> Result<T, E>,
) -> TestResult<T> {
    poll_paced(what, timeout, MAX_INTERVAL, probe)
}

/// Waits up to `timeout` for `child` to exit and returns its status. Past it, the child is killed
/// (and reaped), and the error names `what`.
pub fn child_exit(
    what: &str,
    timeout: Duration,
    child: &mut std::process::Child,
) -> TestResult<std::process::ExitStatus> {
    let exited = poll(what, timeout, || match child.try_wait() {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err("still running".to_string()),
        Err(e) => Err(e.to_string()),
    });
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    exited
}

/// [`poll`] whose pauses double up to `pause_max` rather than [`MAX_INTERVAL`]: for a probe that
/// costs (every panel of a dashboard queried, a command run again), polled about that often once
/// the first quick looks are over. Bounded by `timeout` and [`ATTEMPTS_MAX`] all the same.
pub fn poll_paced<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    pause_max: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> TestResult<T> {
    let started = Instant::now();
    let mut interval = FIRST_INTERVAL.min(pause_max);
    let mut last = String::from("not polled");
    for _ in 0..ATTEMPTS_MAX {
        match probe() {
            Ok(value) => return Ok(value),
            Err(seen) => last = seen.to_string(),
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(interval.min(left));
        interval = (interval * 2).min(pause_max);
    }
    Err(format!("waited {:.1?} for {what}; last seen: {last}", started.elapsed()).into())
}

/// Polls `condition` until it holds, or `timeout` passes (an error naming `what`).
pub fn until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> TestResult<Duration> {
    let started = Instant::now();
    poll(what, timeout, || if condition() { Ok(()) } else { Err("false") })?;
    Ok(started.elapsed())
}

/// [`until`] that panics with the same message: for tests that do not return a result.
#[track_caller]
pub fn must(what: &str, timeout: Duration, condition: impl FnMut() -> bool) -> Duration {
    match until(what, timeout, condition) {
        Ok(took) => took,
        Err(e) => panic!("{e}"),
    }
}

/// [`poll`] for async probes, pausing with the runtime's timer.
pub async fn poll_async<T, E, F>(what: &str, timeout: Duration, mut probe: impl FnMut() -> F) -> TestResult<T>
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut interval = FIRST_INTERVAL;
    let mut last = String::from("not polled");
    for _ in 0..ATTEMPTS_MAX {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(seen) => last = seen.to_string(),
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(interval.min(left)).await;
        interval = (interval * 2).min(MAX_INTERVAL);
    }
    Err(format!("waited {:.1?} for {what}; last seen: {last}", started.elapsed()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_returns_at_once_and_one_that_never_does_names_what_was_awaited() {
        let took = until("nothing", Duration::from_secs(5), || true).expect("holds");
        assert!(took < Duration::from_secs(1));
        let started = Instant::now();
        let mut polls = 0;
        let err = poll::<(), String>("the moon to turn blue", Duration::from_millis(200), || {
            polls += 1;
            Err(format!("grey after {polls} looks"))
        })
        .expect_err("never holds");
        assert!(started.elapsed() >= Duration::from_millis(200) && started.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(text.contains("the moon to turn blue") && text.contains("grey after"), "{text}");
        assert!(polls > 2 && polls < 100, "{polls} polls");
    }

    #[test]
    fn a_paced_poll_backs_off_beyond_the_default_pause_to_the_one_it_is_given() {
        let mut at = Vec::new();
        let pause_max = Duration::from_millis(300);
        let _ = poll_paced::<(), &str>("nothing", Duration::from_millis(1200), pause_max, || {
            at.push(Instant::now());
            Err("not yet")
        });
        let longest = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        assert!(longest >= Duration::from_millis(250), "longest pause {longest:?}, {} polls", at.len());
        assert!(at.len() > 4 && at.len() < 20, "{} polls", at.len());
    }
}

//! PostgreSQL: telling every node at once that work is due, with `NOTIFY` and `LISTEN`.
//!
//! The transaction that creates a task issues `pg_notify('rki_due', 'task:{id}')` ([`notify_due`],
//! right after the task's row); PostgreSQL delivers it to every session listening on the channel
//! when, and only if, that transaction commits. Each node listens on a connection of its own, outside the pool
//! ([`spawn_due_listener`]): a pooled connection is lent to one caller at a time, while a listener
//! must be read all the time. The notification names the task; the listener reads, on its own
//! connection, how many of its executions are open and how many nodes listen (the listening
//! sessions, by their `application_name`: a node's listener is its presence, and ends with its
//! process), so that each node can claim its share. It only wakes the node's sweep, which claims
//! in the store as it does on its tick, so a lost or duplicated notification costs a delay or an
//! empty claim, never a download sent twice.

use super::*;

/// The channel of [`notify_due`]. Not a secret and not per organization: every node sweeps every
/// organization's executions.
const DUE_CHANNEL: &str = "rki_due";
/// The `application_name` of every node's listening session, by which the nodes are counted.
const LISTENER_NAME: &str = "rki-gateway-listen";
/// The notification's payload: `task:` and the task's id.
const TASK_PAYLOAD_PREFIX: &str = "task:";
/// A task's open executions and the nodes listening, read when its notification arrives.
const DUE_COUNTS: &str =
    "SELECT (SELECT count(*) FROM executions WHERE task_id = $1 AND state IN ('queued', 'delivered')),
        (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $2)";
/// A listener that heard nothing for this long checks that its connection still answers (a
/// server gone without closing the socket would otherwise leave it deaf until the kernel gives
/// up); the TCP keepalives below end such a connection too.
const LISTEN_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// TCP keepalive of the listening connection: idle time before the first probe, and the time a
/// write may go unacknowledged, so that a dead server is noticed within about a minute.
const LISTEN_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const LISTEN_TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before listening again after a failure, doubling up to the maximum (a server down for
/// an hour is tried every half minute, not thousands of times).
const LISTEN_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Hook of `create_task_with`, in its transaction: wakes every node's sweep once the task's
/// executions are committed (PostgreSQL holds the notification until the commit, and drops it
/// on a rollback).
pub(super) fn notify_due(s: &mut Tx<'_, '_>, task_id: i64) -> Result<(), Failure> {
    let payload = format!("{TASK_PAYLOAD_PREFIX}{task_id}");
    s.execute("SELECT pg_notify($1, $2)", &[&DUE_CHANNEL, &payload])?;
    Ok(())
}

/// Listens on [`DUE_CHANNEL`] on a thread of its own until `watch` returns false (checked at
/// every notification and every [`LISTEN_CHECK_INTERVAL`]); reconnects on loss with a doubling
/// pause. The postgres client blocks, so this is a plain thread, not a task.
pub(super) fn spawn_due_listener(
    config: &::postgres::Config,
    tls: Option<super::super::pg_tls::RustlsConnect>,
    watch: DueWatch,
) -> StoreResult<()> {
    let mut config = config.clone();
    config.application_name(LISTENER_NAME);
    config.keepalives(true).keepalives_idle(LISTEN_KEEPALIVE_IDLE).tcp_user_timeout(LISTEN_TCP_USER_TIMEOUT);
    std::thread::Builder::new()
        .name("rki-due-listen".into())
        .spawn(move || listen(&config, tls.as_ref(), &watch))
        .map(|_| ())
        .map_err(|e| StoreError::Backend(format!("cannot start the PostgreSQL listener: {e}")))
}

fn listen(config: &::postgres::Config, tls: Option<&super::super::pg_tls::RustlsConnect>, watch: &DueWatch) {
    let mut backoff = LISTEN_BACKOFF_FIRST;
    loop {
        let failure = match connect_with(config, tls) {
            Ok(mut client) => match client.batch_execute(&format!("LISTEN {DUE_CHANNEL}")) {
                Ok(()) => {
                    backoff = LISTEN_BACKOFF_FIRST;
                    if !watch(DueSignal::Listening) {
                        return;
                    }
                    match hear(&mut client, watch) {
                        Heard::Stop => return,
                        Heard::Lost(reason) => reason,
                    }
                }
                Err(e) => describe(&e),
            },
            Err(e) => format!("connect to PostgreSQL: {}", with_causes(&e)),
        };
        tracing::warn!(error = %failure, retry_in_ms = backoff.as_millis() as u64,
            "not listening for new tasks from the other nodes; the sweep's tick still finds them");
        if !watch(DueSignal::Lost) {
            return;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

enum Heard {
    /// The watcher wants no more.
    Stop,
    /// The connection failed, for this reason.
    Lost(String),
}

/// Passes every notification on, until the connection fails or the watcher stops.
fn hear(client: &mut Client, watch: &DueWatch) -> Heard {
    use ::postgres::fallible_iterator::FallibleIterator;
    loop {
        let next = client.notifications().timeout_iter(LISTEN_CHECK_INTERVAL).next();
        match next {
            // Several in a row wake the sweep once or twice (the wake-ups do not queue up): the
            // shares add up.
            Ok(Some(notification)) => {
                let signal = match due_counts(client, notification.payload()) {
                    Ok((executions, nodes)) => DueSignal::Due { executions, nodes },
                    Err(e) if e.is_closed() => return Heard::Lost(describe(&e)),
                    Err(e) => {
                        tracing::warn!(error = %describe(&e), "cannot count a new task's executions; this node claims them all");
                        DueSignal::Due { executions: 0, nodes: 0 }
                    }
                };
                if !watch(signal) {
                    return Heard::Stop;
                }
            }
            // Silence (or a closed connection): is it still there, and still wanted? Notifications
            // that arrive during the check are queued for the next read.
            Ok(None) => {
                if let Err(e) = client.batch_execute("SELECT 1") {
                    return Heard::Lost(describe(&e));
                }
                if !watch(DueSignal::Quiet) {
                    return Heard::Stop;
                }
            }
            Err(e) => return Heard::Lost(describe(&e)),
        }
    }
}

/// The open executions of the notified task (0 for a payload that names none) and the nodes
/// listening.
fn due_counts(client: &mut Client, payload: &str) -> Result<(i64, i64), ::postgres::Error> {
    let Some(task_id) = payload.strip_prefix(TASK_PAYLOAD_PREFIX).and_then(|id| id.parse::<i64>().ok()) else {
        return Ok((0, 0));
    };
    let row = client.query_one(DUE_COUNTS, &[&task_id, &LISTENER_NAME])?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

//! The committer: every write of the message path goes through it, gathered into one store
//! transaction (one fsync) per batch. Metrics for an ack count only once its batch is durable.
//! A send's `Delivered` write waits a moment for an ack that would carry it in its ending.

use super::*;

/// Sends whose `Delivered` write is deferred (see [`Ending::sends`]).
#[derive(Default)]
pub(super) struct UnwrittenSends {
    /// Execution → its unwritten sends and its deadline.
    pub(super) by_execution: HashMap<i64, (Sends, Millis)>,
    /// Executions in the order of their first unwritten send, with that send's time
    /// ([`Clock::ticks_ms`]). An entry whose sends were taken meanwhile is skipped.
    pub(super) order: VecDeque<(i64, i64)>,
}

/// Which deferred sends to take.
pub(super) enum DueSends {
    /// Those first made at least this many milliseconds ago ([`Clock::ticks_ms`]).
    OlderThan(i64),
    /// Those of executions whose deadline is at or before this time (before an expiry sweep).
    DeadlineBy(Millis),
    /// All of them (before a task is stopped, and before a flush).
    All,
}

/// What an ack that became durable did, for metrics.
pub(super) struct AckDone {
    pub(super) org: Arc<str>,
    pub(super) created_at: Millis,
    pub(super) hello_at: Option<Instant>,
    pub(super) succeeded: bool,
}

/// What the committer is given.
pub(super) enum Work {
    /// A write to make durable in the next batch.
    Write(Write),
    /// Nothing to write: answered once every write queued before it is durable.
    Barrier,
}

pub(super) struct Pending {
    pub(super) work: Work,
    pub(super) ack: Option<AckDone>,
    /// The batch's outcome, shared by every write that waits for it: a batch of 500
    /// initialisations answered each with its own copy of the 500 new credentials (quadratic in
    /// the batch, in allocations as in CPU).
    pub(super) reply: Option<oneshot::Sender<Result<Arc<BatchOutcome>, StoreError>>>,
}

/// The thread that applies the committer's batches to the store, one at a time: its own, named
/// `rki-committer`, so that the store's share of a push shows in the thread's CPU (the load
/// tester reports it) instead of hiding among the blocking pool's threads.
struct BatchThread {
    batches: std::sync::mpsc::Sender<(Vec<Write>, oneshot::Sender<StoreResult<BatchOutcome>>)>,
}

impl BatchThread {
    fn start(store: Arc<dyn Store>) -> std::io::Result<Self> {
        let (batches, rx) = std::sync::mpsc::channel::<(Vec<Write>, oneshot::Sender<StoreResult<BatchOutcome>>)>();
        std::thread::Builder::new().name("rki-committer".into()).spawn(move || {
            // Ends when the committer (the only sender) does. A panic fails its batch, as a
            // blocking task's would, and the thread goes on.
            for (writes, reply) in rx {
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.apply_batch(&writes)));
                let _ =
                    reply.send(applied.unwrap_or_else(|_| Err(StoreError::Backend("a store batch panicked".into()))));
            }
        })?;
        Ok(Self { batches })
    }

    async fn apply(&self, writes: Vec<Write>) -> StoreResult<BatchOutcome> {
        let (tx, rx) = oneshot::channel();
        self.batches.send((writes, tx)).map_err(|_| StoreError::Backend("the committer thread stopped".into()))?;
        rx.await.map_err(|_| StoreError::Backend("the committer thread stopped".into()))?
    }
}

/// Gathers queued writes into batches: one transaction, one fsync per batch.
pub(super) async fn committer(engine: Arc<Engine>, mut rx: mpsc::Receiver<Pending>) {
    let thread = match BatchThread::start(engine.store.clone()) {
        Ok(thread) => thread,
        Err(e) => return error!(error = %e, "cannot start the committer thread: nothing will be written"),
    };
    let mut batch: Vec<Pending> = Vec::with_capacity(BATCH_WRITES_MAX);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        while batch.len() < BATCH_WRITES_MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let writes: Vec<Write> = batch
            .iter()
            .filter_map(|p| match &p.work {
                Work::Write(w) => Some(w.clone()),
                Work::Barrier => None,
            })
            .collect();
        let started = engine.health.commit_started();
        let n = writes.len();
        let failed_endings: Vec<i64> =
            writes.iter().filter_map(|w| if let Write::End(e) = w { Some(e.execution_id) } else { None }).collect();
        let result = thread.apply(writes).await.map(Arc::new);
        metrics::histogram!(m::STORE_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::STORE_BATCH_WRITES).record(n as f64);
        engine.health.commit_finished(started, result.as_ref().map(|_| ()));
        let ended: std::collections::HashSet<i64> = match &result {
            Ok(outcome) => outcome.ended.iter().map(|(id, _)| *id).collect(),
            Err(e) => {
                error!(error = %e, writes = n, "store batch failed");
                lock(&engine.unrecorded_endings).extend(failed_endings);
                Default::default()
            }
        };
        let now = engine.clock.now_ms();
        for p in batch.drain(..) {
            if let (Some(done), Work::Write(Write::End(ending))) = (&p.ack, &p.work) {
                if ended.contains(&ending.execution_id) {
                    let result = if done.succeeded { "succeeded" } else { "failed" };
                    metrics::counter!(m::ACKS_TOTAL, "result" => result).increment(1);
                    metrics::counter!(m::EXECUTIONS_ENDED_TOTAL, "state" => result).increment(1);
                    if done.succeeded {
                        metrics::counter!(m::KEYS_INJECTED_TOTAL, "org" => done.org.to_string()).increment(1);
                    }
                    let since_creation = ((now - done.created_at).max(0) as f64) / 1000.0;
                    metrics::histogram!(m::DELIVERY_LATENCY_SECONDS, "from" => "creation").record(since_creation);
                    if let Some(hello) = done.hello_at {
                        metrics::histogram!(m::DELIVERY_LATENCY_SECONDS, "from" => "hello")
                            .record(hello.elapsed().as_secs_f64());
                    }
                } else if result.is_ok() {
                    metrics::counter!(m::DUPLICATE_ACKS_TOTAL).increment(1);
                }
            }
            if let Some(reply) = p.reply {
                let _ = reply.send(result.clone());
            }
        }
    }
}

/// Writes the deferred `Delivered` of sends that no ack carried within the delay.
pub(super) async fn delivered_writer(engine: Arc<Engine>) {
    let mut ticker = tokio::time::interval(DELIVERED_WRITE_TICK);
    loop {
        ticker.tick().await;
        let due = engine.due_sends(DueSends::OlderThan(engine.delivered_write_delay()));
        engine.write_sends(due).await;
    }
}

impl Engine {
    /// Records a send whose `Delivered` write waits: an ack within [`DELIVERED_WRITE_DELAY_MS`]
    /// carries it in its ending (one write of the execution's row instead of two), otherwise the
    /// delivery writer writes it.
    pub(super) fn defer_delivered(&self, execution_id: i64, at: Millis, deadline: Millis) {
        let mut guard = lock(&self.unwritten);
        let unwritten = &mut *guard;
        match unwritten.by_execution.entry(execution_id) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().0.add(at),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((Sends::one(at), deadline));
                unwritten.order.push_back((self.clock.ticks_ms(), execution_id));
            }
        }
    }

    /// The execution's sends not written yet, for its ending.
    pub(super) fn take_sends(&self, execution_id: i64) -> Option<Sends> {
        lock(&self.unwritten).by_execution.remove(&execution_id).map(|(sends, _)| sends)
    }

    /// Takes the deferred sends that `which` selects.
    pub(super) fn due_sends(&self, which: DueSends) -> Vec<(i64, Sends)> {
        let mut guard = lock(&self.unwritten);
        let unwritten = &mut *guard;
        let mut due = Vec::new();
        match which {
            DueSends::OlderThan(age) => {
                let now = self.clock.ticks_ms();
                while let Some((first, id)) = unwritten.order.front().copied() {
                    if now - first < age {
                        break;
                    }
                    unwritten.order.pop_front();
                    if let Some((sends, _)) = unwritten.by_execution.remove(&id) {
                        due.push((id, sends));
                    }
                }
            }
            DueSends::DeadlineBy(at) => unwritten.by_execution.retain(|id, (sends, deadline)| {
                let keep = *deadline > at;
                if !keep {
                    due.push((*id, *sends));
                }
                keep
            }),
            DueSends::All => {
                unwritten.order.clear();
                due.extend(unwritten.by_execution.drain().map(|(id, (sends, _))| (id, sends)));
            }
        }
        if unwritten.by_execution.is_empty() {
            unwritten.order.clear();
        }
        due
    }

    /// Queues the `Delivered` writes of deferred sends: one per send, the first at its time, the
    /// others at the last one's.
    pub(super) async fn write_sends(&self, due: Vec<(i64, Sends)>) {
        for (execution_id, sends) in due {
            self.queue(Write::Delivered { execution_id, at: sends.first_at }, None).await;
            for _ in 1..sends.count {
                self.queue(Write::Delivered { execution_id, at: sends.last_at }, None).await;
            }
        }
    }

    /// How long a send's `Delivered` write waits for an ack to carry it, in milliseconds.
    pub(super) fn delivered_write_delay(&self) -> i64 {
        DELIVERED_WRITE_DELAY_MS.min(self.retry_initial_ms() / 2).max(0)
    }

    pub(super) async fn queue(&self, write: Write, ack: Option<AckDone>) {
        if self.commits.send(Pending { work: Work::Write(write), ack, reply: None }).await.is_err() {
            error!("committer stopped");
        }
    }

    /// Queues writes and waits until they are durable; returns the outcome of the batch that
    /// carried the last one.
    pub(super) async fn write_durably(&self, writes: Vec<Write>) -> EngineResult<Arc<BatchOutcome>> {
        self.commit_durably(writes.into_iter().map(Work::Write).collect()).await
    }

    /// Waits until every write queued before it is durable.
    pub(super) async fn barrier(&self) -> EngineResult<()> {
        self.commit_durably(vec![Work::Barrier]).await.map(|_| ())
    }

    async fn commit_durably(&self, work: Vec<Work>) -> EngineResult<Arc<BatchOutcome>> {
        let mut last = None;
        let n = work.len();
        for (i, work) in work.into_iter().enumerate() {
            let reply = if i + 1 == n {
                let (tx, rx) = oneshot::channel();
                last = Some(rx);
                Some(tx)
            } else {
                None
            };
            self.commits
                .send(Pending { work, ack: None, reply })
                .await
                .map_err(|_| EngineError::Internal("committer stopped".into()))?;
        }
        match last {
            Some(rx) => {
                rx.await.map_err(|_| EngineError::Internal("committer stopped".into()))?.map_err(EngineError::from)
            }
            None => Ok(Arc::default()),
        }
    }

    /// Waits until every write queued so far is durable, the deferred `Delivered` writes included.
    pub async fn flush(&self) -> EngineResult<()> {
        self.write_sends_durably(self.due_sends(DueSends::All)).await
    }

    /// Queues the `Delivered` writes of `due`, then waits until they and every write queued
    /// before them are durable.
    pub(super) async fn write_sends_durably(&self, due: Vec<(i64, Sends)>) -> EngineResult<()> {
        self.write_sends(due).await;
        self.barrier().await
    }
}

//! The durable high-water marks: the downlink counter (reserved ahead in blocks, so no counter is
//! ever used twice across restarts) and the clock's floor (a restarted gateway's wall reading
//! does not go back).

use super::*;

impl Engine {
    /// Restores the clock's floor and the downlink counter's high-water mark, and reserves the
    /// first block above both the mark and the clock.
    pub(super) async fn restore_marks(&self) -> EngineResult<()> {
        // Not in a store that several nodes share: a floor written ahead by one node would run
        // another's clock ahead of the others', and the cluster's retry claims compare times
        // that the nodes wrote.
        let floor = if self.store.is_shared() { None } else { self.blocking(|s| s.mark(MARK_CLOCK_FLOOR_MS)).await? };
        if let Some(floor) = floor {
            self.clock.raise_floor(floor);
        }
        let mark = self.blocking(|s| s.mark(MARK_DOWN_COUNTER)).await?.unwrap_or(0).max(0) as u64;
        let now_us = (self.clock.now_ms().max(0) as u64).saturating_mul(1000);
        let start = now_us.max(mark);
        self.down_counter.store(start, Ordering::Relaxed);
        let wanted = start.saturating_add(DOWN_COUNTER_BLOCK).min(i64::MAX as u64) as i64;
        let reserved = self.blocking(move |s| s.raise_mark(MARK_DOWN_COUNTER, wanted)).await?;
        self.down_mark.store(reserved.max(0) as u64, Ordering::Relaxed);
        info!(
            down_counter = start,
            down_counter_mark = reserved,
            clock_floor_ms = floor,
            "downlink counter resumes above its high-water mark"
        );
        self.persist_clock_floor().await;
        Ok(())
    }

    /// Writes the clock's floor, [`CLOCK_FLOOR_AHEAD_MS`] ahead of its reading, once less than
    /// half of the last one written is left.
    pub async fn persist_clock_floor(&self) {
        if self.store.is_shared() {
            return;
        }
        let now = self.clock.now_ms();
        if now.saturating_add(CLOCK_FLOOR_AHEAD_MS / 2) <= self.clock_floor_written.load(Ordering::Relaxed) {
            return;
        }
        let floor = now.saturating_add(CLOCK_FLOOR_AHEAD_MS);
        match self.blocking(move |s| s.raise_mark(MARK_CLOCK_FLOOR_MS, floor)).await {
            Ok(written) => {
                self.clock_floor_written.fetch_max(written, Ordering::Relaxed);
            }
            Err(e) => warn!(error = %e, "cannot write the clock's floor"),
        }
    }

    /// The next gateway → device counter: above the last, and within the durable mark. `None`
    /// when the mark cannot be raised (the store is down): nothing is sent, and the retry timer
    /// or the next hello sends it later.
    pub(super) fn next_down_counter(&self) -> Option<u64> {
        let now_us = (self.clock.now_ms().max(0) as u64).saturating_mul(1000);
        let mut last = self.down_counter.load(Ordering::Relaxed);
        let next = loop {
            let next = now_us.max(last.saturating_add(1));
            match self.down_counter.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(actual) => last = actual,
            }
        };
        let mark = self.down_mark.load(Ordering::Relaxed);
        if next > mark && !self.reserve_down_counter_now(next) {
            return None;
        }
        if next.saturating_add(DOWN_COUNTER_BLOCK / 2) > mark {
            self.reserve_down_counter_later(next);
        }
        Some(next)
    }

    /// Raises the durable mark above `counter` before it is used (a blocking store write: it
    /// happens when the clock jumped ahead of the background reservation).
    pub(super) fn reserve_down_counter_now(&self, counter: u64) -> bool {
        let wanted = counter.saturating_add(DOWN_COUNTER_BLOCK).min(i64::MAX as u64) as i64;
        let raise = || self.store.raise_mark(MARK_DOWN_COUNTER, wanted);
        let raised = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(raise)
            }
            _ => raise(),
        };
        match raised {
            Ok(mark) => {
                self.down_mark.fetch_max(mark.max(0) as u64, Ordering::Relaxed);
                counter <= mark.max(0) as u64
            }
            Err(e) => {
                error!(error = %e, "cannot reserve downlink counters; nothing is sent until the store answers");
                false
            }
        }
    }

    /// Reserves the next block in the background, once at a time.
    pub(super) fn reserve_down_counter_later(&self, counter: u64) {
        if self.down_reserving.swap(true, Ordering::AcqRel) {
            return;
        }
        let (Some(engine), Ok(runtime)) = (self.arc(), tokio::runtime::Handle::try_current()) else {
            self.down_reserving.store(false, Ordering::Release);
            return;
        };
        let wanted = counter.saturating_add(DOWN_COUNTER_BLOCK).min(i64::MAX as u64) as i64;
        runtime.spawn(async move {
            match engine.blocking(move |s| s.raise_mark(MARK_DOWN_COUNTER, wanted)).await {
                Ok(mark) => {
                    engine.down_mark.fetch_max(mark.max(0) as u64, Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "cannot reserve downlink counters ahead"),
            }
            engine.down_reserving.store(false, Ordering::Release);
        });
    }
}

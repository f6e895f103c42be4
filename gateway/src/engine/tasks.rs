//! Download tasks: resolving a target, the preview (who is ready and why not), and the creation
//! pipeline that derives and wraps one key per device in chunks inside one transaction, then
//! delivers to the devices online. Stopping a task and unlocking a device live here too.

use super::*;

/// What the chunks of a task's creation leave for after its commit.
#[derive(Default)]
pub(super) struct TaskBuild {
    /// The new open executions of devices that were hot, by SN.
    pub(super) hot: HashMap<String, OpenExecution>,
    /// Time spent deriving and wrapping.
    pub(super) derive: Duration,
    /// Time spent in the store (credentials read, executions inserted).
    pub(super) store: Duration,
    /// Why a chunk failed, when it was not the store.
    pub(super) failure: Option<EngineError>,
    /// When the last chunk was in, and how long the commit (and its check) took from there.
    pub(super) filled: Option<Instant>,
    pub(super) committed: Option<Duration>,
}

impl TaskBuild {
    /// Keeps an engine error for the caller; the store sees a failure and rolls back.
    pub(super) fn fail(&mut self, e: EngineError) -> StoreError {
        let message = e.to_string();
        self.failure = Some(e);
        StoreError::Backend(message)
    }
}

/// What every chunk of one task's creation shares.
pub(super) struct ChunkJob<'a> {
    pub(super) task: &'a NewTask,
    pub(super) sealed_bdk: &'a str,
    pub(super) algorithm: KeyAlgorithm,
    pub(super) key_set_id: &'a [u8],
    /// The serial of the task's first device (serials follow the order of the ready devices).
    pub(super) first_serial: u64,
}

/// A chunk of devices to derive for, with their key IDs.
pub(super) struct Chunk {
    pub(super) devices: Vec<DeriveTarget>,
    pub(super) key_ids: Vec<Vec<u8>>,
}

/// A chunk's executions, ready to insert, and the SNs of their devices.
pub(super) struct Derived {
    pub(super) executions: Vec<NewExecution>,
    pub(super) sns: Vec<String>,
    pub(super) took: Duration,
}

/// Waits for a chunk's derivation.
pub(super) fn join_chunk(
    handle: std::thread::ScopedJoinHandle<'_, EngineResult<Derived>>,
    build: &mut TaskBuild,
) -> StoreResult<Derived> {
    match handle.join() {
        Ok(Ok(derived)) => {
            build.derive += derived.took;
            Ok(derived)
        }
        Ok(Err(e)) => Err(build.fail(e)),
        Err(_) => Err(build.fail(EngineError::Internal("a derivation thread panicked".into()))),
    }
}

impl Engine {
    /// Resolves a target to device ids of the organization; unknown SNs are an error naming them.
    pub async fn resolve_target(&self, org_id: i64, target: &Target) -> EngineResult<Vec<i64>> {
        match target {
            Target::Group(name) => {
                let name = name.clone();
                let group = self.blocking(move |s| s.group_by_name(org_id, &name)).await?;
                self.blocking(move |s| s.group_member_ids(group.id)).await
            }
            Target::Devices(sns) => {
                if sns.is_empty() {
                    return Err(EngineError::Invalid("no device named".into()));
                }
                let sns = sns.clone();
                let found = self.blocking(move |s| s.device_ids_by_sn(org_id, &sns)).await?;
                let unknown: Vec<String> =
                    found.iter().filter(|(_, id)| id.is_none()).map(|(sn, _)| sn.clone()).collect();
                if !unknown.is_empty() {
                    return Err(EngineError::NotFound(format!("unknown SN(s): {}", unknown.join(", "))));
                }
                Ok(found.into_iter().filter_map(|(_, id)| id).collect())
            }
        }
    }

    /// Which devices are ready for a task, and why the others are not.
    pub async fn preview(&self, org_id: i64, spec: &TaskSpec) -> EngineResult<Preview> {
        if !KeySlot(spec.slot).is_writable_by_rki() {
            return Err(EngineError::Invalid(format!("slot {} cannot be written by RKI (use 1, 4 or 8)", spec.slot)));
        }
        let expiry_days = spec.expiry_days.unwrap_or(EXPIRY_DAYS_DEFAULT);
        if expiry_days == 0 || expiry_days > EXPIRY_DAYS_MAX {
            return Err(EngineError::Invalid(format!("expiry_days must be 1 to {EXPIRY_DAYS_MAX}")));
        }
        let ids = self.resolve_target(org_id, &spec.target).await?;
        if ids.len() > TASK_DEVICES_MAX {
            return Err(EngineError::Invalid(format!("a task may target at most {TASK_DEVICES_MAX} devices")));
        }
        let key_source = match &spec.key_source {
            Some(name) => {
                let name = name.clone();
                Some(self.blocking(move |s| s.key_source_by_name(org_id, &name)).await?)
            }
            None => None,
        };
        // A large target is read in two halves on two reader connections, beside the open
        // executions: for a million devices this read is most of the preview, and serial time.
        let (first, second) = if ids.len() >= PARALLEL_READ_MIN {
            let second = ids[ids.len() / 2..].to_vec();
            let mut first = ids;
            first.truncate(first.len() - second.len());
            (first, second)
        } else {
            (ids, Vec::new())
        };
        let (mut devices, rest, pending) = tokio::try_join!(
            self.blocking(move |s| s.devices_by_ids(&first)),
            self.blocking(move |s| if second.is_empty() { Ok(Vec::new()) } else { s.devices_by_ids(&second) }),
            self.blocking(move |s| s.open_execution_device_ids(org_id)),
        )?;
        devices.extend(rest);
        let pending: std::collections::HashSet<i64> = pending.into_iter().collect();
        // Without an explicit key source, the devices' common assignment is used.
        let chosen = match &key_source {
            Some(k) => Some(k.id),
            None => {
                let assigned: std::collections::BTreeSet<i64> =
                    devices.iter().filter_map(|d| d.assigned_key_source).collect();
                if assigned.len() > 1 {
                    return Err(EngineError::Invalid(
                        "the devices are assigned to different key sources; name one with key_source".into(),
                    ));
                }
                assigned.into_iter().next()
            }
        };
        let mut preview = Preview {
            key_source: None,
            slot: spec.slot,
            expiry_days,
            ready: Vec::new(),
            not_ready: Vec::new(),
            never_seen: Vec::new(),
            ready_ids: Vec::new(),
            key_source_id: chosen,
        };
        if let Some(id) = chosen {
            preview.key_source = Some(self.blocking(move |s| s.key_source(org_id, id)).await?.name);
        }
        for d in devices {
            let reasons = session::readiness(&d, chosen, pending.contains(&d.id));
            if reasons.iter().any(|r| r.blocks()) {
                preview.not_ready.push(NotReadyDevice {
                    sn: d.sn,
                    reasons: reasons.iter().map(|r| r.as_str()).collect(),
                    meanings: reasons.iter().map(|r| r.meaning()).collect(),
                });
            } else {
                if reasons.contains(&NotReady::NeverSeen) {
                    preview.never_seen.push(d.sn.clone());
                }
                preview.ready.push(d.sn);
                preview.ready_ids.push(d.id);
            }
        }
        Ok(preview)
    }

    /// Creates a task for every ready device of the preview: derives and wraps one key per
    /// device, persists the task and its executions, then delivers to the online devices.
    pub async fn create_task(&self, org_id: i64, spec: &TaskSpec, actor: &Actor) -> EngineResult<(TaskRow, Preview)> {
        if let Some(request_id) = spec.request_id {
            if let Some(task) = self.blocking(move |s| s.task_by_request_id(org_id, request_id)).await? {
                let preview = self.preview(org_id, spec).await.unwrap_or_else(|_| Preview {
                    key_source: Some(task.key_source.clone()),
                    slot: task.slot,
                    expiry_days: 0,
                    ready: vec![],
                    not_ready: vec![],
                    never_seen: vec![],
                    ready_ids: vec![],
                    key_source_id: Some(task.key_source_id),
                });
                return Ok((task, preview));
            }
        }
        let began = Instant::now();
        let mut preview = self.preview(org_id, spec).await?;
        let preview_ms = began.elapsed().as_millis();
        let Some(key_source_id) = preview.key_source_id else {
            return Err(EngineError::Conflict("no key source: assign one to the devices or name it".into()));
        };
        if preview.ready_ids.is_empty() {
            return Err(EngineError::Conflict(format!(
                "no device is ready ({} not ready); see the preview for the reasons",
                preview.not_ready.len()
            )));
        }
        let source = self.blocking(move |s| s.key_source(org_id, key_source_id)).await?;
        let algorithm = KeyAlgorithm::parse(&source.algorithm)
            .ok_or_else(|| EngineError::Internal(format!("key source algorithm {}", source.algorithm)))?;
        let count = preview.ready_ids.len() as i64;
        let first_serial = self.blocking(move |s| s.allocate_serials(key_source_id, count)).await?;
        let key_set_id = hex::decode(&source.key_set_id).map_err(|_| EngineError::Internal("key set id".into()))?;
        let engine = self.arc().ok_or_else(|| EngineError::Internal("the engine is stopping".into()))?;
        let now = self.clock.now_ms();
        let new_task = NewTask {
            org_id,
            key_source_id,
            slot: spec.slot,
            key_type: KeyType::Ipek.as_str().into(),
            created_at: now,
            expires_at: now + i64::from(preview.expiry_days) * (SECONDS_PER_DAY as i64) * 1000,
            created_by: actor.label.clone(),
            request_id: spec.request_id,
            executions: Vec::new(),
        };
        let ready_ids = std::mem::take(&mut preview.ready_ids);
        let details = serde_json::json!({"key_source": source.name, "slot": spec.slot, "request_id": spec.request_id});
        let audit = Audit::new(actor, Some(org_id), "task.create", "", details, now);
        let created = tokio::task::spawn_blocking(move || {
            let mut build = TaskBuild::default();
            let result = engine.store.create_task_with(&new_task, &audit, &mut |sink| {
                build = TaskBuild::default();
                let job = ChunkJob {
                    task: &new_task,
                    sealed_bdk: &source.sealed,
                    algorithm,
                    key_set_id: &key_set_id,
                    first_serial: first_serial as u64,
                };
                let filled = engine.fill_task(sink, &job, &ready_ids, &mut build);
                build.filled = Some(Instant::now());
                filled
            });
            build.committed = build.filled.map(|at| at.elapsed());
            (result, build, ready_ids)
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        let (result, build, ready_ids) = created;
        preview.ready_ids = ready_ids;
        let task = match (result, build.failure) {
            (Ok(task), _) => task,
            (Err(_), Some(failure)) => return Err(failure),
            (Err(e), None) => return Err(e.into()),
        };
        let (derive_ms, store_ms) = (build.derive.as_millis(), build.store.as_millis());
        let commit_ms = build.committed.unwrap_or_default().as_millis();
        let total_ms = began.elapsed().as_millis();
        info!(
            task = task.id,
            executions = task.counts.total,
            preview_ms,
            derive_ms,
            store_ms,
            commit_ms,
            total_ms,
            "download task created"
        );
        metrics::counter!(m::TASKS_CREATED_TOTAL, "org" => self.org_label(org_id).to_string()).increment(1);
        // Only devices already hot (online, or holding other open executions) get the new
        // execution in memory; the others read it from the store on their first message.
        let mut known = build.hot;
        let entries: Vec<(String, Arc<Mutex<DeviceHot>>)> =
            self.devices.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        let mut task_devices: Option<Vec<i64>> = None;
        let mut online = Vec::new();
        for (sn, hot) in entries {
            if let Some(open) = known.remove(&sn) {
                self.insert_open_execution(&sn, open);
            } else {
                // Made hot while the task was being written: its own read of the store may have
                // come before the commit.
                let device_id = lock(&hot).device_id;
                let ids = task_devices.get_or_insert_with(|| {
                    let mut ids = preview.ready_ids.clone();
                    ids.sort_unstable();
                    ids
                });
                if ids.binary_search(&device_id).is_err() {
                    continue;
                }
                self.load_open(&sn, &hot).await;
            }
            if lock(&hot).online {
                online.push((sn, hot));
            }
        }
        // Several nodes: the devices online here are a third of the fleet at best. Every node's
        // sweep, woken by the store's notification of the commit, claims its share of the new
        // executions and delivers them; delivering here too would send those twice. Without
        // the notification (this node's listener down), this node claims them all at once.
        if self.is_shared() {
            online.clear();
            if !self.due_listening.load(Ordering::Relaxed) {
                self.wake_to_claim_all();
            }
        }
        let began = Instant::now();
        let terminals = online.len();
        self.deliver_to_online(online).await;
        info!(
            task = task.id,
            terminals,
            deliver_ms = began.elapsed().as_millis(),
            "downloads sent to online terminals"
        );
        Ok((task, preview))
    }

    /// Streams a task's executions into its transaction, [`TASK_CHUNK`] devices at a time, as a
    /// pipeline: while one chunk's keys are derived and wrapped (on every core), this thread
    /// inserts the previous chunk and reads the next one's credentials.
    pub(super) fn fill_task(
        &self,
        sink: &mut dyn TaskSink,
        job: &ChunkJob<'_>,
        ready_ids: &[i64],
        build: &mut TaskBuild,
    ) -> StoreResult<()> {
        std::thread::scope(|scope| {
            let mut chunks = ready_ids.chunks(TASK_CHUNK).enumerate();
            let mut next = match chunks.next() {
                Some((c, ids)) => Some(self.read_chunk(sink, job, c, ids, build)?),
                None => None,
            };
            let mut deriving = None;
            while let Some(chunk) = next.take() {
                let handle = scope.spawn(move || self.derive_chunk(job, chunk));
                if let Some(previous) = deriving.take() {
                    self.insert_chunk(sink, job, previous, build)?;
                }
                next = match chunks.next() {
                    Some((c, ids)) => Some(self.read_chunk(sink, job, c, ids, build)?),
                    None => None,
                };
                deriving = Some(join_chunk(handle, build)?);
            }
            if let Some(last) = deriving {
                self.insert_chunk(sink, job, last, build)?;
            }
            Ok(())
        })
    }

    /// A chunk's credentials, read in the task's transaction, and each device's key ID.
    pub(super) fn read_chunk(
        &self,
        sink: &mut dyn TaskSink,
        job: &ChunkJob<'_>,
        index: usize,
        ids: &[i64],
        build: &mut TaskBuild,
    ) -> StoreResult<Chunk> {
        let read = Instant::now();
        let targets = sink.derive_targets(ids, job.algorithm.is_aes())?;
        build.store += read.elapsed();
        let mut by_id: HashMap<i64, DeriveTarget> = targets.into_iter().map(|t| (t.device_id, t)).collect();
        let mut chunk = Chunk { devices: Vec::with_capacity(ids.len()), key_ids: Vec::with_capacity(ids.len()) };
        let first_serial = job.first_serial + (index * TASK_CHUNK) as u64;
        for (i, id) in ids.iter().enumerate() {
            // A device re-initialised or removed since the preview is skipped.
            let Some(c) = by_id.remove(id) else { continue };
            let serial = first_serial + i as u64;
            let key_id = if job.algorithm.is_tdes() {
                tdes_initial_ksn(job.key_set_id, serial).map(|k| k.as_bytes().to_vec())
            } else {
                aes_initial_key_id(job.key_set_id, serial).map(|k| k.as_bytes().to_vec())
            };
            match key_id {
                Ok(key_id) => chunk.key_ids.push(key_id),
                Err(e) => return Err(build.fail(EngineError::Internal(e.to_string()))),
            }
            chunk.devices.push(c);
        }
        Ok(chunk)
    }

    /// One key derived and wrapped per device of the chunk, on every core.
    pub(super) fn derive_chunk(&self, job: &ChunkJob<'_>, chunk: Chunk) -> EngineResult<Derived> {
        let started = Instant::now();
        let requests: Vec<DeriveRequest<'_>> = chunk
            .key_ids
            .iter()
            .zip(&chunk.devices)
            .map(|(key_id, t)| DeriveRequest { key_id, sealed_kbpk: &t.sealed_kbpk })
            .collect();
        let wrapped =
            self.keys.derive_and_wrap(job.sealed_bdk, &requests).map_err(|e| EngineError::Internal(e.to_string()))?;
        drop(requests);
        let mut executions = Vec::with_capacity(wrapped.len());
        let mut sns = Vec::with_capacity(wrapped.len());
        for ((w, key_id), c) in wrapped.into_iter().zip(chunk.key_ids).zip(chunk.devices) {
            let w = w.map_err(|e| EngineError::Internal(format!("derivation failed: {e}")))?;
            debug_assert_eq!(w.key_id, key_id);
            executions.push(NewExecution {
                device_id: c.device_id,
                key_block: w.key_block,
                key_id,
                kcv: w.kcv.to_hex(),
                generation: c.generation,
            });
            sns.push(c.sn);
        }
        Ok(Derived { executions, sns, took: started.elapsed() })
    }

    /// Inserts a derived chunk; keeps the open executions of devices that are hot, for the maps
    /// after the commit.
    pub(super) fn insert_chunk(
        &self,
        sink: &mut dyn TaskSink,
        job: &ChunkJob<'_>,
        derived: Derived,
        build: &mut TaskBuild,
    ) -> StoreResult<()> {
        let insert = Instant::now();
        let execution_ids = sink.insert(&derived.executions)?;
        build.store += insert.elapsed();
        for ((e, id), sn) in derived.executions.into_iter().zip(execution_ids).zip(derived.sns) {
            if self.devices.contains_key(&sn) {
                build.hot.insert(sn, OpenExecution::new_in(job.task, id, e));
            }
        }
        Ok(())
    }

    /// Stops a task: its open executions end as terminated ("manually terminated").
    pub async fn stop_task(&self, org_id: i64, task_id: i64, audit: &Audit) -> EngineResult<usize> {
        // The deferred sends first, so that the stopped executions' rows count them.
        self.flush().await?;
        let now = self.clock.now_ms();
        let audit = audit.clone();
        let ended = self.blocking(move |s| s.stop_task(org_id, task_id, now, &audit)).await?;
        self.forget(&ended);
        metrics::counter!(m::EXECUTIONS_ENDED_TOTAL, "state" => "terminated").increment(ended.len() as u64);
        Ok(ended.len())
    }

    /// Asks a device to unlock: the signed unlock goes out now if the device is online, else on
    /// its next hello. The device confirms by reporting itself unlocked.
    pub async fn unlock(&self, org_id: i64, sn: &str, audit: &Audit) -> EngineResult<bool> {
        let device = self.device(org_id, sn).await?;
        if !device.initialised {
            return Err(EngineError::Conflict(format!("device {sn} is not initialised")));
        }
        let id = device.id;
        let audit = audit.clone();
        self.blocking(move |s| s.set_unlock_pending(id, true, Some(&audit))).await?;
        let hot = self.hot_device(sn).await.map_err(|r| EngineError::Internal(r.reason().into()))?;
        let (online, key) = {
            let mut h = lock(&hot);
            h.unlock_pending = true;
            (h.online, self.signing_key(&mut h))
        };
        if let (true, Some(key)) = (online, key) {
            self.send_unlock(sn, &key, device.id);
        }
        Ok(online)
    }
}

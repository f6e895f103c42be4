//! The hot state: per device its credentials, counters, presence and open executions, rebuilt
//! from the store at start and kept in step with it. The store is the truth; this is its cache.

use super::*;

/// One open execution, as the message path needs it.
#[derive(Debug, Clone)]
pub(super) struct OpenExecution {
    pub(super) id: i64,
    pub(super) org_id: i64,
    pub(super) key_source_id: i64,
    pub(super) slot: u16,
    pub(super) key_type: String,
    pub(super) key_block: String,
    pub(super) key_id: Vec<u8>,
    pub(super) kcv: String,
    pub(super) generation: i64,
    pub(super) created_at: Millis,
    pub(super) deadline: Millis,
    /// [`Clock::ticks_ms`] of the last publish, for the retry backoff.
    pub(super) last_sent: Option<i64>,
    pub(super) sends: u32,
    /// The hello that triggered the latest delivery, for the hello→ack latency.
    pub(super) hello_at: Option<Instant>,
}

/// The hot state of one device.
pub(super) struct DeviceHot {
    pub(super) device_id: i64,
    pub(super) sealed_signing_key: String,
    /// Unsealed on first use.
    pub(super) signing_key: Option<MacKey>,
    /// The initialisation these credentials come from. The device's sealed key-block protection
    /// keys are not kept here: they are needed only to re-wrap a download made for an older
    /// initialisation, which reads them from the store (about 350 bytes per idle terminal).
    pub(super) generation: i64,
    pub(super) last_counter: u64,
    /// The counter of the latest accepted hello: a bye below it is older than the device's
    /// presence (a will published late) and is ignored.
    pub(super) hello_counter: u64,
    pub(super) online: bool,
    /// The gateway's connection to the broker came back after this device was sent a download
    /// that is not acked yet: re-deliver it on the backoff whether or not the device is believed
    /// online, until an ack, the expiry, or a hello (presence is rebuilt from the hellos).
    pub(super) presence_unsure: bool,
    pub(super) unlock_pending: bool,
    pub(super) open: Vec<OpenExecution>,
    /// `open` holds every open execution the store had for the device when it was loaded; until
    /// then (a device made hot by its first message) [`Engine::hot_device`] reads them.
    pub(super) open_loaded: bool,
    /// The next message verified under these credentials proves them: the GUDID that gave them,
    /// if it awaits that proof, is then spent for good (`Write::ProveGudid`). Set whenever the
    /// credentials are loaded or replaced, so a restart or another node's initialisation cannot
    /// leave a GUDID re-answerable past its device's first message.
    pub(super) proof_due: bool,
}

impl DeviceHot {
    pub(super) fn from_credentials(c: &DeviceCredentials) -> Self {
        Self {
            device_id: c.device_id,
            sealed_signing_key: c.signing_key.clone(),
            signing_key: None,
            generation: c.generation,
            last_counter: c.last_counter,
            hello_counter: 0,
            online: false,
            presence_unsure: false,
            unlock_pending: c.unlock_pending,
            open: Vec::new(),
            open_loaded: false,
            proof_due: true,
        }
    }
}

impl OpenExecution {
    pub(super) fn from_row(e: &ExecutionRow) -> Self {
        Self {
            id: e.id,
            org_id: e.org_id,
            key_source_id: e.key_source_id,
            slot: e.slot,
            key_type: e.key_type.clone(),
            key_block: e.key_block.clone(),
            key_id: e.key_id.clone(),
            kcv: e.kcv.clone(),
            generation: e.generation,
            created_at: e.created_at,
            deadline: e.deadline,
            last_sent: None,
            sends: 0,
            hello_at: None,
        }
    }

    /// The open execution `id` of a task just inserted.
    pub(super) fn new_in(task: &NewTask, id: i64, e: NewExecution) -> Self {
        Self {
            id,
            org_id: task.org_id,
            key_source_id: task.key_source_id,
            slot: task.slot,
            key_type: task.key_type.clone(),
            key_block: e.key_block,
            key_id: e.key_id,
            kcv: e.kcv,
            generation: e.generation,
            created_at: task.created_at,
            deadline: task.expires_at,
            last_sent: None,
            sends: 0,
            hello_at: None,
        }
    }
}

impl Engine {
    /// Rebuilds the hot maps from the store.
    pub(super) async fn load(&self) -> EngineResult<()> {
        self.restore_marks().await?;
        let hashes = self.blocking(|s| s.all_password_hashes()).await?;
        for (sn, hash) in hashes {
            if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                self.passwords.insert(sn, hash);
            }
        }
        for org in self.blocking(|s| s.list_orgs()).await? {
            self.org_names.insert(org.id, Arc::from(org.name.as_str()));
        }
        let open = self.blocking(|s| s.open_executions()).await?;
        let ids: Vec<i64> =
            open.iter().map(|e| e.device_id).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let creds = self.blocking(move |s| s.credentials_for(&ids)).await?;
        for c in &creds {
            // Every open execution is inserted below, before any message is handled.
            let mut hot = DeviceHot::from_credentials(c);
            hot.open_loaded = true;
            self.devices.insert(c.sn.clone(), Arc::new(Mutex::new(hot)));
        }
        let count = open.len();
        for e in open {
            self.insert_open(&e);
        }
        info!(open_executions = count, devices = creds.len(), "engine state loaded");
        Ok(())
    }

    pub(super) fn insert_open(&self, e: &ExecutionRow) {
        self.insert_open_execution(&e.sn, OpenExecution::from_row(e));
    }

    /// Adds an open execution to the device's hot state, if the device is hot (a device that
    /// is not reads its open executions from the store on its first message: `hot_device`).
    pub(super) fn insert_open_execution(&self, sn: &str, open: OpenExecution) {
        let Some(hot) = self.devices.get(sn).map(|h| h.clone()) else {
            // A device without credentials cannot receive keys; its execution waits for an
            // initialisation, which loads it.
            return;
        };
        let mut hot = lock(&hot);
        if hot.open.iter().any(|o| o.id == open.id) {
            return;
        }
        self.execution_sn.insert(open.id, sn.to_string());
        hot.open.push(open);
    }

    /// Puts back into the hot state the executions whose ending failed to commit and that are
    /// still open in the store, so that they are delivered again; those that cannot be read yet
    /// are tried again at the next sweep.
    pub(super) async fn restore_unrecorded_endings(&self) {
        let ids = std::mem::take(&mut *lock(&self.unrecorded_endings));
        if ids.is_empty() {
            return;
        }
        let mut again = Vec::new();
        for id in ids {
            match self.blocking(move |s| s.execution(id)).await {
                Ok(row) if row.state.is_open() => {
                    self.insert_open(&row);
                    info!(execution = id, "an ack whose record failed to commit: the download is sent again");
                    // An online device says no new hello: send it now, and the retry timer after.
                    let Some(hot) = self.devices.get(&row.sn).map(|h| h.clone()) else { continue };
                    let key = {
                        let mut h = lock(&hot);
                        if h.online {
                            self.signing_key(&mut h)
                        } else {
                            None
                        }
                    };
                    if let Some(key) = key {
                        self.deliver_open(&row.sn, &hot, &key, None, SendReason::Retry).await;
                    }
                }
                Ok(_) | Err(EngineError::NotFound(_)) => {}
                Err(_) => again.push(id),
            }
        }
        lock(&self.unrecorded_endings).extend(again);
    }

    /// Reads the device's open executions from the store into its hot state.
    pub(super) async fn load_open(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>) {
        let device_id = lock(hot).device_id;
        match self.blocking(move |s| s.open_executions_for_device(device_id)).await {
            Ok(rows) => {
                for row in rows.iter().filter(|r| r.sn == sn) {
                    self.insert_open(row);
                }
                lock(hot).open_loaded = true;
            }
            Err(e) => warn!(sn, error = %e, "cannot read a device's open executions; next message retries"),
        }
    }

    /// The device's hot state, loaded from the store if it is not in the maps yet.
    pub(super) async fn hot_device(&self, sn: &str) -> Result<Arc<Mutex<DeviceHot>>, Rejection> {
        if let Some(hot) = self.devices.get(sn).map(|h| h.clone()) {
            if !lock(&hot).open_loaded {
                self.load_open(sn, &hot).await;
            }
            return Ok(hot);
        }
        let owned = sn.to_string();
        let creds = self.blocking(move |s| s.credentials(&owned)).await.map_err(|e| match e {
            EngineError::Store(_) => Rejection::StoreUnavailable,
            _ => Rejection::UnknownDevice,
        })?;
        let Some(creds) = creds else {
            let owned = sn.to_string();
            let known = self.blocking(move |s| s.device_org_by_sn(&owned)).await.ok().flatten().is_some();
            return Err(if known { Rejection::NotInitialised } else { Rejection::UnknownDevice });
        };
        let hot = self
            .devices
            .entry(sn.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(DeviceHot::from_credentials(&creds))))
            .clone();
        // Read after the device is in the map: an execution committed later is added to the map's
        // entry by its creator (`create_task`), one committed earlier is read here.
        if !lock(&hot).open_loaded {
            self.load_open(sn, &hot).await;
        }
        Ok(hot)
    }

    pub(super) fn signing_key(&self, hot: &mut DeviceHot) -> Option<MacKey> {
        if hot.signing_key.is_none() {
            match self.keys.open_signing_key(&hot.sealed_signing_key) {
                Ok(key) => hot.signing_key = Some(key),
                Err(e) => {
                    error!(device_id = hot.device_id, error = %e, "cannot open a device signing key");
                    return None;
                }
            }
        }
        hot.signing_key.as_ref().map(MacKey::clone_secret)
    }

    /// Several nodes: re-reads the device's credentials when another node may have
    /// re-initialised it (a MAC that does not verify, an execution of a newer generation).
    /// Returns whether the cached ones were stale and are replaced.
    pub(super) async fn refresh_credentials(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>) -> bool {
        let owned = sn.to_string();
        let Ok(Some(creds)) = self.blocking(move |s| s.credentials(&owned)).await else { return false };
        let mut h = lock(hot);
        if creds.generation == h.generation && creds.signing_key == h.sealed_signing_key {
            return false;
        }
        h.device_id = creds.device_id;
        h.sealed_signing_key = creds.signing_key;
        h.signing_key = None;
        h.generation = creds.generation;
        h.last_counter = h.last_counter.max(creds.last_counter);
        h.unlock_pending = creds.unlock_pending;
        h.proof_due = true;
        info!(sn, generation = h.generation, "credentials re-read: the device re-initialised through another node");
        true
    }

    /// Replaces the device's cached open executions with the store's, keeping the retry state of
    /// the ones already known.
    pub(super) async fn refresh_open(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>) {
        let device_id = lock(hot).device_id;
        let Ok(rows) = self.blocking(move |s| s.open_executions_for_device(device_id)).await else { return };
        let ids: std::collections::HashSet<i64> = rows.iter().map(|r| r.id).collect();
        let gone: Vec<i64> = {
            let mut h = lock(hot);
            let gone = h.open.iter().filter(|e| !ids.contains(&e.id)).map(|e| e.id).collect();
            h.open.retain(|e| ids.contains(&e.id));
            gone
        };
        for id in gone {
            self.execution_sn.remove(&id);
            self.refusals.remove(&id);
        }
        for row in rows.iter().filter(|r| r.sn == sn) {
            self.insert_open(row);
        }
    }

    /// Executions that ended without an ack (stopped, expired): out of the devices' hot state, and
    /// their downloads out of any session kept for a terminal that went away.
    pub(super) fn forget(&self, execution_ids: &[i64]) {
        for id in execution_ids {
            self.refusals.remove(id);
            if let Some((_, sn)) = self.execution_sn.remove(id) {
                if let Some(hot) = self.devices.get(&sn) {
                    lock(&hot).open.retain(|e| e.id != *id);
                }
                self.outbound.withdraw(&sn, *id);
            }
        }
    }
}

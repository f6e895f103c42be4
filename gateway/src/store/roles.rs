//! The store's roles, one trait each, and [`Store`], all of them under one object-safe trait.
//! Each backend implements every role (`sqlite/`, `postgres/`, one file per role).

use super::*;

/// The registry: organizations and their API tokens, devices with their credentials, groups.
pub trait Registry {
    /// Audited (`audit`, its organization the new one) in the same transaction.
    fn create_org(&self, name: &str, at: Millis, audit: &Audit) -> StoreResult<OrgRow>;
    fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRow>>;
    fn org(&self, id: i64) -> StoreResult<OrgRow>;
    fn list_orgs(&self) -> StoreResult<Vec<OrgRow>>;
    fn insert_token(
        &self,
        org_id: Option<i64>,
        role: Role,
        label: &str,
        hash: &[u8],
        at: Millis,
        audit: &Audit,
    ) -> StoreResult<TokenRow>;
    fn token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<TokenRow>>;
    fn has_key_owner(&self) -> StoreResult<bool>;
    /// All or nothing: on any conflict, nothing is imported and every conflicting line is named.
    /// Audited with `imported` added to the details.
    fn import_devices(&self, org_id: i64, rows: &[ImportRow], at: Millis, audit: &Audit) -> StoreResult<usize>;
    fn list_devices(&self, org_id: i64, filter: &DeviceFilter) -> StoreResult<Vec<DeviceRow>>;
    fn count_devices(&self, org_id: i64) -> StoreResult<i64>;
    fn device(&self, org_id: i64, sn: &str) -> StoreResult<DeviceRow>;
    fn device_by_id(&self, id: i64) -> StoreResult<DeviceRow>;
    fn devices_by_ids(&self, ids: &[i64]) -> StoreResult<Vec<DeviceRow>>;
    fn device_org_by_sn(&self, sn: &str) -> StoreResult<Option<(i64, i64)>>;
    /// The organization of each of `sns` that is registered, as `(sn, org_id)`, in no particular
    /// order; an SN that is not registered is left out. For the key owner's uploads only: an
    /// organization never learns of an SN it does not hold.
    fn sn_owners(&self, sns: &[String]) -> StoreResult<Vec<(String, i64)>>;
    fn credentials(&self, sn: &str) -> StoreResult<Option<DeviceCredentials>>;
    fn credentials_for(&self, device_ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>>;
    /// Every initialised device's SN and password hash (CONNECT authentication cache).
    fn all_password_hashes(&self) -> StoreResult<Vec<(String, Vec<u8>)>>;
    /// Every registered SN with its broker password hash (`None` before initialisation).
    fn broker_devices(&self) -> StoreResult<Vec<(String, Option<String>)>>;
    fn assign(&self, org_id: i64, device_ids: &[i64], key_source_id: Option<i64>, audit: &Audit) -> StoreResult<usize>;
    /// Audited when `audit` is given (an operator's unlock; the engine clears the flag unaudited).
    fn set_unlock_pending(&self, device_id: i64, pending: bool, audit: Option<&Audit>) -> StoreResult<()>;
    fn create_group(&self, org_id: i64, name: &str, description: &str, audit: &Audit) -> StoreResult<GroupRow>;
    fn list_groups(&self, org_id: i64) -> StoreResult<Vec<GroupRow>>;
    fn group_by_name(&self, org_id: i64, name: &str) -> StoreResult<GroupRow>;
    /// Audited with `added` added to the details.
    fn add_group_members(&self, group_id: i64, device_ids: &[i64], audit: &Audit) -> StoreResult<usize>;
    fn group_member_ids(&self, group_id: i64) -> StoreResult<Vec<i64>>;
    fn device_ids_by_sn(&self, org_id: i64, sns: &[String]) -> StoreResult<Vec<(String, Option<i64>)>>;
}

/// The audit log, append-only. Most actions write their entry themselves, in their own
/// transaction ([`Audit`]); this is the log read and the entries of actions outside the store.
pub trait AuditLog {
    fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    /// Newest first, `limit` entries older than the entry `before` (a page's cursor).
    fn list_audit(&self, org_id: Option<i64>, limit: i64, before: Option<i64>) -> StoreResult<Vec<AuditEntry>>;
}

/// Key sources (BDKs) and key-encryption keys, sealed under the master key.
pub trait KeySources {
    fn insert_key_source(&self, row: &KeySourceRow, audit: &Audit) -> StoreResult<KeySourceRow>;
    fn list_key_sources(&self, org_id: i64) -> StoreResult<Vec<KeySourceRow>>;
    fn key_source(&self, org_id: i64, id: i64) -> StoreResult<KeySourceRow>;
    fn key_source_by_name(&self, org_id: i64, name: &str) -> StoreResult<KeySourceRow>;
    /// Reserves `count` consecutive serials of the key source; returns the first.
    fn allocate_serials(&self, key_source_id: i64, count: i64) -> StoreResult<i64>;
    /// Stores a KEK; a name is unique per organization (`Conflict`).
    fn insert_kek(&self, row: &KekRow, audit: &Audit) -> StoreResult<KekRow>;
    /// The KEKs of one organization, or of every organization (`None`), oldest first.
    fn list_keks(&self, org_id: Option<i64>) -> StoreResult<Vec<KekRow>>;
    fn kek_by_name(&self, org_id: i64, name: &str) -> StoreResult<KekRow>;
}

/// GUDIDs: provisioning, revocation, the bootstrap identities they open, and the initialisation
/// that spends one.
pub trait Gudids {
    /// Inserts one GUDID row as given, without revoking or auditing anything: for the store
    /// specs and the load test's fleet build. The API provisions through
    /// [`Gudids::provision_gudids`].
    fn insert_gudid(&self, row: &GudidRow) -> StoreResult<GudidRow>;
    /// Provisions one GUDID per entry for the organization's devices, all or nothing: if any SN
    /// is not one of the organization's devices, nothing is written and `NotFound` names them.
    /// Each SN keeps at most one live GUDID: its live ones are revoked (`revoked_by` = the
    /// actor). Every GUDID provisioned (`gudid.provision`) and every one revoked (`gudid.revoke`)
    /// is audited in the same transaction, object `device:{SN}`.
    fn provision_gudids(
        &self,
        org_id: i64,
        gudids: &[NewGudid],
        at: Millis,
        actor: &Actor,
    ) -> StoreResult<Vec<ProvisionedGudid>>;
    /// Revokes a live GUDID of the organization, audited (`gudid.revoke`) in the same
    /// transaction. `NotFound` for another organization's or an unknown row; `Conflict` if it is
    /// no longer live (used, revoked or expired).
    fn revoke_gudid(&self, org_id: i64, id: i64, at: Millis, actor: &Actor) -> StoreResult<GudidRow>;
    fn gudid_by_id(&self, gudid_id: &[u8]) -> StoreResult<Option<GudidRow>>;
    /// The bootstrap hashes of the live GUDIDs (unrevoked, not expired at `now`, and unspent or
    /// spent after `spent_after`), of one SN or of every SN, newest first: `(sn, bootstrap_hash)`.
    /// The MQTT endpoint passes `None` (a spent GUDID opens nothing); the Mosquitto password file
    /// keeps a just-spent GUDID's identity a little longer, so that a reload cannot cut the
    /// answer off. A revoked GUDID is never kept.
    fn live_bootstrap_hashes(
        &self,
        sn: Option<&str>,
        now: Millis,
        spent_after: Option<Millis>,
    ) -> StoreResult<Vec<(String, String)>>;
    fn list_gudids(&self, org_id: i64, filter: &GudidFilter) -> StoreResult<Vec<GudidRow>>;
    /// Spends the GUDID and installs the device's new credentials, atomically. Fails with
    /// `Conflict` if the GUDID was spent or revoked meanwhile.
    fn spend_gudid(
        &self,
        gudid_row: i64,
        device_id: i64,
        creds: &NewCredentials,
        at: Millis,
    ) -> StoreResult<DeviceCredentials>;
}

/// Download tasks, their executions and records: creating, reading, stopping, billing, and the
/// counts the metrics sample.
pub trait Tasks {
    /// Creates a task with `task.executions` and returns it with its executions read back (for
    /// small tasks and tests; the engine streams through [`Tasks::create_task_with`]).
    fn create_task(&self, task: &NewTask) -> StoreResult<(TaskRow, Vec<ExecutionRow>)> {
        let audit = Audit::new(
            &Actor::named(&task.created_by),
            Some(task.org_id),
            "task.create",
            "",
            serde_json::json!({}),
            task.created_at,
        );
        let row = self.create_task_with(task, &audit, &mut |_| Ok(()))?;
        let executions = self.task_executions(row.id)?;
        Ok((row, executions))
    }
    /// Creates a task whose executions `fill` streams through the [`TaskSink`], chunk by chunk,
    /// so no caller holds a large task in memory at once; `task.executions` are inserted first.
    /// One transaction: the task exists with every execution `fill` inserted, or (if `fill` or
    /// any insert fails) not at all. `fill` may be called again from the start when a transaction
    /// is retried after a transient failure (PostgreSQL), so it must start over on each call.
    /// Returns the task as committed, without reading its executions back.
    /// Audited in the same transaction: object `task:{number}`, with `executions` added.
    fn create_task_with(
        &self,
        task: &NewTask,
        audit: &Audit,
        fill: &mut dyn FnMut(&mut dyn TaskSink) -> StoreResult<()>,
    ) -> StoreResult<TaskRow>;
    fn task_by_request_id(&self, org_id: i64, request_id: i64) -> StoreResult<Option<TaskRow>>;
    /// Newest first, `limit` tasks numbered below `before` (a page's cursor: a task number).
    fn list_tasks(
        &self,
        org_id: i64,
        unfinished: Option<bool>,
        limit: i64,
        before: Option<i64>,
    ) -> StoreResult<Vec<TaskRow>>;
    fn task(&self, org_id: i64, id: i64) -> StoreResult<TaskRow>;
    /// The store's id of the organization's task number `number` (its id in the API).
    fn task_id_by_number(&self, org_id: i64, number: i64) -> StoreResult<i64>;
    /// Every execution of a task, by ID.
    fn task_executions(&self, task_id: i64) -> StoreResult<Vec<ExecutionRow>> {
        self.task_executions_page(task_id, 0, None)
    }
    /// A task's executions by ID, from the `offset`-th, at most `limit` of them (`None`: all).
    fn task_executions_page(&self, task_id: i64, offset: i64, limit: Option<i64>) -> StoreResult<Vec<ExecutionRow>>;
    fn open_executions(&self) -> StoreResult<Vec<ExecutionRow>>;
    fn open_execution_device_ids(&self, org_id: i64) -> StoreResult<Vec<i64>>;
    /// The open executions of one device (several gateway nodes: the store, not a node's cache,
    /// says what is open).
    /// (The default reads every open execution; implementations override it with an indexed query.)
    fn open_executions_for_device(&self, device_id: i64) -> StoreResult<Vec<ExecutionRow>> {
        Ok(self.open_executions()?.into_iter().filter(|e| e.device_id == device_id).collect())
    }
    /// Which of `ids` are still open. (The default reads them one by one.)
    fn still_open(&self, ids: &[i64]) -> StoreResult<Vec<i64>> {
        let mut open = Vec::new();
        for id in ids {
            if self.execution(*id)?.state.is_open() {
                open.push(*id);
            }
        }
        Ok(open)
    }
    fn execution(&self, id: i64) -> StoreResult<ExecutionRow>;
    /// Terminates every open execution of the task, with records. Returns the ended ids.
    /// Audited with `terminated` added to the details.
    fn stop_task(&self, org_id: i64, task_id: i64, at: Millis, audit: &Audit) -> StoreResult<Vec<i64>>;
    fn list_records(&self, org_id: i64, filter: &RecordFilter) -> StoreResult<Vec<RecordRow>>;
    fn billing(&self, org_id: i64) -> StoreResult<Vec<BillingRow>>;
    fn count_records_for_execution(&self, execution_id: i64) -> StoreResult<i64>;
    fn execution_state_counts(&self) -> StoreResult<Vec<(i64, ExecutionState, i64)>>;
    fn expiring_within(&self, now: Millis, within_ms: i64) -> StoreResult<i64>;
}

/// What [`Delivery::watch_due`] tells its watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueSignal {
    /// Listening (again): whatever became due while it was not is found by a sweep now.
    Listening,
    /// A task was created, on some node: `executions` of it are open, and `nodes` nodes listen
    /// for it (this one included), so each may claim about `executions / nodes` of them. Either
    /// is 0 when it could not be read.
    Due { executions: i64, nodes: i64 },
    /// Still listening after a quiet while (the connection was checked): nothing to do.
    Quiet,
    /// The listening connection is lost; it is opened again with a doubling pause.
    Lost,
}

/// The watcher [`Delivery::watch_due`] calls; it returns false to stop watching.
pub type DueWatch = Box<dyn Fn(DueSignal) -> bool + Send + Sync>;

/// The message path: batches of acks and hellos, re-delivery claims, re-wraps, expiry, and the
/// monotonic marks in `meta` (the downlink counter's high-water mark, the clock's floor).
pub trait Delivery {
    /// Several gateway nodes: claims up to `limit` open executions due for a (re)delivery, for
    /// this node alone, and returns them. Due: not past the deadline, not claimed in the last
    /// `initial_ms`, and either never sent (created at least `first_ms` ago) or last sent
    /// `initial_ms × 2^(sends − 1)` (at most `max_ms`) ago. A claim holds the execution for
    /// `initial_ms`; the delivery write that follows restarts its backoff. Two nodes claiming at
    /// once get disjoint sets, so a retry timer fires once per execution across the cluster.
    /// Only executions whose id is above `after`, in id order: a sweep's next claim starts where
    /// its last one ended (the highest id it got), so that a large task is claimed in small
    /// chunks without each claim reading again the rows claimed before it; what it passed over
    /// (rows other nodes held at that moment) is found by its next sweep, from `after` = 0.
    /// (The default claims nothing: one node with its own store retries from its own timers.)
    fn claim_redeliveries(
        &self,
        _now: Millis,
        _first_ms: i64,
        _initial_ms: i64,
        _max_ms: i64,
        _limit: i64,
        _after: i64,
    ) -> StoreResult<Vec<ExecutionRow>> {
        Ok(Vec::new())
    }
    /// Several gateway nodes: calls `watch` from a thread of its own with [`DueSignal::Due`]
    /// whenever a task is created, on any node, when its creation commits (never before, never if
    /// it rolls back), with the task's open executions and the number of nodes watching, so that
    /// every node claims its share of them at once rather than at its next tick; with
    /// [`DueSignal::Listening`] each time it starts listening (a notification may have gone by
    /// unheard before) and [`DueSignal::Lost`] when it stops, until it listens again. A lost
    /// signal only delays: the sweep's tick still claims what is due. Returns at once; watches
    /// until `watch` returns false. (The default watches nothing: one node with its own store
    /// knows its tasks.)
    fn watch_due(&self, _watch: DueWatch) -> StoreResult<()> {
        Ok(())
    }
    /// Replaces the key block of an open execution (re-wrap after re-initialisation).
    fn rewrap_execution(&self, id: i64, key_block: &str, generation: i64) -> StoreResult<()>;
    /// Expires every open execution whose deadline is at or before `now`, with records.
    fn expire_due(&self, now: Millis) -> StoreResult<Vec<(i64, i64)>>;
    fn apply_batch(&self, writes: &[Write]) -> StoreResult<BatchOutcome>;
    /// Whether several gateway nodes may share this store (PostgreSQL). Their clocks must agree
    /// with each other, so the engine keeps no clock floor in a shared store.
    fn is_shared(&self) -> bool {
        false
    }
    /// The mark `key`, if one was ever raised.
    fn mark(&self, key: &str) -> StoreResult<Option<i64>>;
    /// Raises the mark `key` to `value` if it is below (never lowers it), durably; returns the
    /// mark after. Several nodes raising one mark at once keep the highest value.
    fn raise_mark(&self, key: &str, value: i64) -> StoreResult<i64>;
}

/// The store interface: every role under one object-safe trait, so the engine and the API hold
/// an `Arc<dyn Store>` and call any role's method on it (a `&dyn Store` reaches every supertrait's
/// methods, and upcasts to `&dyn Registry` and the others). Every method is one transaction.
/// Implemented for every type that plays all the roles.
pub trait Store: Registry + KeySources + Gudids + Tasks + Delivery + AuditLog + ChannelStore + Send + Sync {}

impl<T: Registry + KeySources + Gudids + Tasks + Delivery + AuditLog + ChannelStore + Send + Sync + ?Sized> Store
    for T
{
}

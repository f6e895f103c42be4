//! The row mappers both backends share: one function per row type, over a [`Columns`] view of a
//! result row that SQLite's and PostgreSQL's rows both give, and the `SELECT` column lists whose
//! SQL is the same in both dialects (as macros, so PostgreSQL's statement cache can `concat!` them
//! into `&'static str`s).
//!
//! A mapper reads each column with the type both schemas give it (`INTEGER`/`BIGINT` as `i64`,
//! the key slot as `i32`) and checks what a column's type cannot: a state, role, algorithm or key
//! type is one this build knows, JSON is JSON. A value that is not is corruption (a hand edit, a
//! newer gateway's value, a bad restore), reported as [`StoreError::Backend`] naming the column,
//! never read as a default.

use rki_protocol::terminal::KeyType;
use rki_protocol::KeyAlgorithm;

use super::*;

/// A value both drivers can read from a column.
pub(crate) trait ColumnValue: rusqlite::types::FromSql + for<'a> ::postgres::types::FromSql<'a> {}

impl<T: rusqlite::types::FromSql + for<'a> ::postgres::types::FromSql<'a>> ColumnValue for T {}

/// A result row, read by column index.
pub(crate) trait Columns {
    /// The value of column `i`; a value the type cannot hold is [`StoreError::Backend`].
    fn get<T: ColumnValue>(&self, i: usize) -> StoreResult<T>;
    /// The name of column `i` as the statement gave it, for error messages.
    fn name(&self, i: usize) -> String;

    /// Column `i` as text that `parse` must accept; `what` names the type in the error.
    fn parsed<T>(&self, i: usize, what: &str, parse: impl FnOnce(&str) -> Option<T>) -> StoreResult<T> {
        let text: String = self.get(i)?;
        parse(&text).ok_or_else(|| unparsable(&self.name(i), &text, what))
    }
}

/// The error of a stored value that does not parse: the store is corrupt, not the caller wrong.
pub(crate) fn unparsable(column: &str, text: &str, what: &str) -> StoreError {
    let shown: String = text.chars().take(40).collect();
    StoreError::Backend(format!("column {column}: cannot parse {shown:?} as {what}"))
}

impl Columns for rusqlite::Row<'_> {
    fn get<T: ColumnValue>(&self, i: usize) -> StoreResult<T> {
        rusqlite::Row::get(self, i).map_err(|e| StoreError::Backend(format!("column {}: {e}", self.name(i))))
    }

    fn name(&self, i: usize) -> String {
        self.as_ref().column_name(i).map_or_else(|_| format!("#{i}"), str::to_string)
    }
}

impl Columns for ::postgres::Row {
    fn get<T: ColumnValue>(&self, i: usize) -> StoreResult<T> {
        self.try_get(i).map_err(|e| StoreError::Backend(format!("column {}: {e}", self.name(i))))
    }

    fn name(&self, i: usize) -> String {
        self.columns().get(i).map_or_else(|| format!("#{i}"), |c| c.name().to_string())
    }
}

// ---------------------------------------------------------------- column lists

macro_rules! org_columns {
    () => {
        "id, name, created_at"
    };
}

macro_rules! token_columns {
    () => {
        "id, org_id, role, label"
    };
}

macro_rules! audit_columns {
    () => {
        "id, at, org_id, actor, token_id, action, object, details"
    };
}

macro_rules! key_source_columns {
    () => {
        "id, org_id, name, algorithm, kcv, sealed, key_set_id, created_at"
    };
}

macro_rules! kek_columns {
    () => {
        "id, org_id, name, algorithm, kcv, sealed, created_at"
    };
}

/// `generation > 0` is "initialised": every initialisation installs the credentials and counts
/// the generation up in one transaction, and nothing else sets either (a column of the device row,
/// so a listing of a million devices reads no second table).
macro_rules! device_columns {
    () => {
        "id, org_id, sn, model, rom_version, app_version, region, debug_mode, debug_key_present, locked, last_seen,
         assigned_key_source, generation > 0, x_pos_device_id, created_at, unlock_pending, slots"
    };
}

/// An initialised device's credentials; `WHERE` clauses name the device `d`.
macro_rules! select_credentials {
    () => {
        "SELECT d.id, d.org_id, d.sn, c.signing_key, c.kbpk_aes, c.kbpk_tdes, c.password_hash, d.last_counter,
                d.generation, d.unlock_pending
         FROM devices d JOIN device_credentials c ON c.device_id = d.id"
    };
}

/// A group with its member count; the group is `g`.
macro_rules! group_columns {
    () => {
        "g.id, g.org_id, g.name, g.description, (SELECT count(*) FROM group_members m WHERE m.group_id = g.id)"
    };
}

/// The GUDID `g` of the device `d`.
macro_rules! gudid_columns {
    () => {
        "g.id, g.org_id, g.device_id, d.sn, g.gudid_id, COALESCE(g.sealed_mac_key, ''), g.provisioned_by,
         g.provisioned_at, g.expires_at, g.used_at, g.bootstrap_hash, g.revoked_at, g.revoked_by, g.proven_at"
    };
}

/// The task `t` of the key source `k`, without its counts (read apart).
macro_rules! task_columns {
    () => {
        "t.id, t.org_id, t.key_source_id, k.name, t.slot, t.key_type, t.created_at, t.expires_at, t.created_by,
         t.stopped_at, t.request_id, t.number"
    };
}

/// The execution `e` of the device `d` and the task `t`, from [`execution_from!`].
macro_rules! execution_columns {
    () => {
        "e.id, e.task_id, e.org_id, e.device_id, d.sn, e.state, t.slot, t.key_type, e.key_block, e.key_id,
         e.kcv, e.generation, e.created_at, e.deadline, e.delivered_at, e.delivery_count, e.ended_at,
         e.result, t.key_source_id"
    };
}

macro_rules! execution_from {
    () => {
        "executions e JOIN devices d ON d.id = e.device_id JOIN tasks t ON t.id = e.task_id"
    };
}

macro_rules! record_columns {
    () => {
        "id, org_id, execution_id, task_id, sn, key_source, key_type, injection, result, error_code, at,
         key_id, kcv, (SELECT number FROM tasks WHERE tasks.id = records.task_id)"
    };
}

pub(crate) use {
    audit_columns, device_columns, execution_columns, execution_from, group_columns, gudid_columns, kek_columns,
    key_source_columns, org_columns, record_columns, select_credentials, task_columns, token_columns,
};

// ---------------------------------------------------------------- mappers

pub(crate) fn org_row<R: Columns + ?Sized>(r: &R) -> StoreResult<OrgRow> {
    Ok(OrgRow { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? })
}

pub(crate) fn token_row<R: Columns + ?Sized>(r: &R) -> StoreResult<TokenRow> {
    Ok(TokenRow { id: r.get(0)?, org_id: r.get(1)?, role: r.parsed(2, "a role", Role::parse)?, label: r.get(3)? })
}

pub(crate) fn audit_row<R: Columns + ?Sized>(r: &R) -> StoreResult<AuditEntry> {
    Ok(AuditEntry {
        id: r.get(0)?,
        at: r.get(1)?,
        org_id: r.get(2)?,
        actor: r.get(3)?,
        token_id: r.get(4)?,
        action: r.get(5)?,
        object: r.get(6)?,
        details: r.parsed(7, "JSON", |text| serde_json::from_str(text).ok())?,
    })
}

/// A key algorithm's name, checked and kept as the row's text.
fn algorithm<R: Columns + ?Sized>(r: &R, i: usize) -> StoreResult<String> {
    r.parsed(i, "a key algorithm", |text| KeyAlgorithm::parse(text).map(|_| text.to_string()))
}

/// A key type's name, checked and kept as the row's text.
fn key_type<R: Columns + ?Sized>(r: &R, i: usize) -> StoreResult<String> {
    r.parsed(i, "a key type", |text| KeyType::parse(text).map(|_| text.to_string()))
}

fn slot<R: Columns + ?Sized>(r: &R, i: usize) -> StoreResult<u16> {
    let slot: i32 = r.get(i)?;
    u16::try_from(slot).map_err(|_| unparsable(&r.name(i), &slot.to_string(), "a key slot (0 to 65535)"))
}

pub(crate) fn key_source_row<R: Columns + ?Sized>(r: &R) -> StoreResult<KeySourceRow> {
    Ok(KeySourceRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        algorithm: algorithm(r, 3)?,
        kcv: r.get(4)?,
        sealed: r.get(5)?,
        key_set_id: r.get(6)?,
        created_at: r.get(7)?,
    })
}

pub(crate) fn kek_row<R: Columns + ?Sized>(r: &R) -> StoreResult<KekRow> {
    Ok(KekRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        algorithm: algorithm(r, 3)?,
        kcv: r.get(4)?,
        sealed: r.get(5)?,
        created_at: r.get(6)?,
    })
}

pub(crate) fn device_row<R: Columns + ?Sized>(r: &R) -> StoreResult<DeviceRow> {
    Ok(DeviceRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        sn: r.get(2)?,
        model: r.get(3)?,
        rom_version: r.get(4)?,
        app_version: r.get(5)?,
        region: r.get(6)?,
        debug_mode: r.get(7)?,
        debug_key_present: r.get(8)?,
        locked: r.get(9)?,
        last_seen: r.get(10)?,
        assigned_key_source: r.get(11)?,
        initialised: r.get(12)?,
        x_pos_device_id: r.get(13)?,
        created_at: r.get(14)?,
        unlock_pending: r.get(15)?,
        // Checked, not kept parsed: the row hands the text on as it was reported.
        slots_json: r.parsed(16, "JSON", |text| {
            serde_json::from_str::<serde::de::IgnoredAny>(text).ok().map(|_| text.to_string())
        })?,
    })
}

pub(crate) fn credentials_row<R: Columns + ?Sized>(r: &R) -> StoreResult<DeviceCredentials> {
    Ok(DeviceCredentials {
        device_id: r.get(0)?,
        org_id: r.get(1)?,
        sn: r.get(2)?,
        signing_key: r.get(3)?,
        kbpk_aes: r.get(4)?,
        kbpk_tdes: r.get(5)?,
        password_hash: r.get(6)?,
        last_counter: r.get::<i64>(7)? as u64,
        generation: r.get(8)?,
        unlock_pending: r.get(9)?,
    })
}

/// `d.id, d.sn, d.generation, c.kbpk_…` of [`TaskSink::derive_targets`].
pub(crate) fn derive_target_row<R: Columns + ?Sized>(r: &R) -> StoreResult<DeriveTarget> {
    Ok(DeriveTarget { device_id: r.get(0)?, sn: r.get(1)?, generation: r.get(2)?, sealed_kbpk: r.get(3)? })
}

pub(crate) fn group_row<R: Columns + ?Sized>(r: &R) -> StoreResult<GroupRow> {
    Ok(GroupRow { id: r.get(0)?, org_id: r.get(1)?, name: r.get(2)?, description: r.get(3)?, members: r.get(4)? })
}

pub(crate) fn gudid_row<R: Columns + ?Sized>(r: &R) -> StoreResult<GudidRow> {
    Ok(GudidRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        device_id: r.get(2)?,
        sn: r.get(3)?,
        gudid_id: r.get(4)?,
        sealed_mac_key: r.get(5)?,
        provisioned_by: r.get(6)?,
        provisioned_at: r.get(7)?,
        expires_at: r.get(8)?,
        used_at: r.get(9)?,
        bootstrap_hash: r.get(10)?,
        revoked_at: r.get(11)?,
        revoked_by: r.get(12)?,
        proven_at: r.get(13)?,
    })
}

/// A task of [`task_columns!`], its counts empty (each backend reads them its own way).
pub(crate) fn task_row<R: Columns + ?Sized>(r: &R) -> StoreResult<TaskRow> {
    Ok(TaskRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        key_source_id: r.get(2)?,
        key_source: r.get(3)?,
        slot: slot(r, 4)?,
        key_type: key_type(r, 5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        created_by: r.get(8)?,
        stopped_at: r.get(9)?,
        request_id: r.get(10)?,
        number: r.get(11)?,
        counts: TaskCounts::default(),
    })
}

/// An execution state read from column `i`.
pub(crate) fn state<R: Columns + ?Sized>(r: &R, i: usize) -> StoreResult<ExecutionState> {
    r.parsed(i, "an execution state", ExecutionState::parse)
}

/// Adds `n` executions in the stored state `state` to `counts`.
pub(crate) fn count_state(counts: &mut TaskCounts, state: &str, n: i64) -> StoreResult<()> {
    let parsed = ExecutionState::parse(state).ok_or_else(|| unparsable("state", state, "an execution state"))?;
    counts.add(parsed, n);
    Ok(())
}

pub(crate) fn execution_row<R: Columns + ?Sized>(r: &R) -> StoreResult<ExecutionRow> {
    Ok(ExecutionRow {
        id: r.get(0)?,
        task_id: r.get(1)?,
        org_id: r.get(2)?,
        device_id: r.get(3)?,
        sn: r.get(4)?,
        state: state(r, 5)?,
        slot: slot(r, 6)?,
        key_type: key_type(r, 7)?,
        key_block: r.get(8)?,
        key_id: r.get(9)?,
        kcv: r.get(10)?,
        generation: r.get(11)?,
        created_at: r.get(12)?,
        deadline: r.get(13)?,
        delivered_at: r.get(14)?,
        delivery_count: r.get(15)?,
        ended_at: r.get(16)?,
        result: r.get(17)?,
        key_source_id: r.get(18)?,
    })
}

pub(crate) fn record_row<R: Columns + ?Sized>(r: &R) -> StoreResult<RecordRow> {
    Ok(RecordRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        execution_id: r.get(2)?,
        task_id: r.get(3)?,
        sn: r.get(4)?,
        key_source: r.get(5)?,
        key_type: r.get(6)?,
        injection: r.get(7)?,
        result: r.get(8)?,
        error_code: r.get(9)?,
        at: r.get(10)?,
        key_id: r.get(11)?,
        kcv: r.get(12)?,
        task_number: r.get(13)?,
    })
}

/// `key_source, month, count` of the billing query.
pub(crate) fn billing_row<R: Columns + ?Sized>(r: &R) -> StoreResult<BillingRow> {
    Ok(BillingRow { key_source: r.get(0)?, month: r.get(1)?, keys: r.get(2)? })
}

/// `org_id, state, count` of the execution state counts.
pub(crate) fn state_count_row<R: Columns + ?Sized>(r: &R) -> StoreResult<(i64, ExecutionState, i64)> {
    Ok((r.get(0)?, state(r, 1)?, r.get(2)?))
}

/// A pair of columns, as the small queries return them.
pub(crate) fn pair_row<A: ColumnValue, B: ColumnValue, R: Columns + ?Sized>(r: &R) -> StoreResult<(A, B)> {
    Ok((r.get(0)?, r.get(1)?))
}

/// The first column.
pub(crate) fn first<A: ColumnValue, R: Columns + ?Sized>(r: &R) -> StoreResult<A> {
    r.get(0)
}

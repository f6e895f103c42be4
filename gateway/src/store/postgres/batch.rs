//! PostgreSQL: the set-based statements that end executions with their records, and
//! `apply_batch`'s rounds (see the module above for why and how a batch is grouped).

use super::*;

/// The record of every execution in the `ended` CTE (which returns the ended rows with their
/// `injection`, `at` and an `ord` to keep the batch's order), written in the same statement.
macro_rules! record_ended {
    () => {
        "recorded AS (
             INSERT INTO records (org_id, execution_id, task_id, device_id, sn, key_source, key_source_id, key_type,
                                  injection, result, error_code, at, key_id, kcv)
             SELECT x.org_id, x.id, x.task_id, x.device_id, d.sn, k.name, k.id, t.key_type, x.injection, x.state,
                    NULLIF(x.result, 0), x.at, upper(encode(x.key_id, 'hex')),
                    CASE WHEN x.state = 'succeeded' THEN x.kcv ELSE '' END
             FROM ended x JOIN devices d ON d.id = x.device_id JOIN tasks t ON t.id = x.task_id
                  JOIN key_sources k ON k.id = t.key_source_id
             ORDER BY x.ord
             RETURNING execution_id
         )"
    };
}

/// Ends the given open executions (one ending per execution), with their records and the locks
/// of the devices that succeeded. Returns the ended ones as indexes into `endings`.
const END_EXECUTIONS: &str = concat!(
    "WITH input AS (
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::text[], $6::bigint[], $7::bool[],
                              $8::bigint[], $9::bigint[], $10::bigint[])
             WITH ORDINALITY AS i(execution_id, state, from_states, result, injection, at, lock_device,
                                  sent_first, sent_last, sends, ord)
     ),
     ended AS (
         UPDATE executions e SET state = i.state, ended_at = i.at, result = i.result,
             delivered_at = COALESCE(e.delivered_at, i.sent_first), delivery_count = e.delivery_count + i.sends,
             last_sent_at = GREATEST(e.last_sent_at, i.sent_last)
         FROM input i
         WHERE e.id = i.execution_id AND e.state IN ('queued', 'delivered')
           AND e.state = ANY (string_to_array(i.from_states, ','))
         RETURNING e.id, e.org_id, e.task_id, e.device_id, e.key_id, e.kcv, e.state, e.result, i.injection,
                   e.ended_at AS at, i.ord, i.lock_device
     ),
     ",
    record_ended!(),
    ",
     locked AS (
         UPDATE devices SET locked = TRUE WHERE NOT locked AND id IN (SELECT device_id FROM ended WHERE lock_device)
     )
     SELECT x.ord, (SELECT count(*) FROM recorded) FROM ended x ORDER BY x.ord"
);

fn end_executions(s: &mut Tx<'_, '_>, endings: &[&Ending]) -> Result<Vec<usize>, Failure> {
    if endings.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = endings.iter().map(|e| e.execution_id).collect();
    let states: Vec<&str> = endings.iter().map(|e| e.state.as_str()).collect();
    let from: Vec<String> = endings.iter().map(|e| states_that_can_become(e.state).join(",")).collect();
    let results: Vec<Option<i32>> = endings.iter().map(|e| e.result).collect();
    let injections: Vec<&str> = endings.iter().map(|e| e.injection.as_str()).collect();
    let ats: Vec<i64> = endings.iter().map(|e| e.at).collect();
    let locks: Vec<bool> = endings.iter().map(|e| e.lock_device).collect();
    let sent_first: Vec<Option<i64>> = endings.iter().map(|e| e.sends.map(|s| s.first_at)).collect();
    let sent_last: Vec<Option<i64>> = endings.iter().map(|e| e.sends.map(|s| s.last_at)).collect();
    let sends: Vec<i64> = endings.iter().map(|e| e.sends.map_or(0, |s| i64::from(s.count))).collect();
    let ended = s.query(
        END_EXECUTIONS,
        &[&ids, &states, &from, &results, &injections, &ats, &locks, &sent_first, &sent_last, &sends],
    )?;
    let mut out = Vec::with_capacity(ended.len());
    for row in &ended {
        let ord: i64 = row.try_get(0)?;
        let recorded: i64 = row.try_get(1)?;
        // The pair of the assertion: one record per ended execution, in the same statement.
        if recorded != ended.len() as i64 {
            return Err(corrupt(format!("{} executions ended but {recorded} records written", ended.len())));
        }
        out.push(ord as usize - 1);
    }
    Ok(out)
}

/// Ends `ended`'s open executions (a CTE of `UPDATE executions … RETURNING` the record columns)
/// with records; returns the ended ids in order.
macro_rules! end_and_record {
    ($ended:literal) => {
        concat!("WITH ", $ended, ", ", record_ended!(), " SELECT x.id, x.org_id FROM ended x ORDER BY x.id")
    };
}

pub(super) const STOP_TASK: &str = end_and_record!(
    "ended AS (
         UPDATE executions e SET state = $3, ended_at = $2, result = NULL
         WHERE e.task_id = $1 AND e.state IN ('queued', 'delivered') AND e.state = ANY ($4)
         RETURNING e.id, e.org_id, e.task_id, e.device_id, e.key_id, e.kcv, e.state, e.result,
                   'auto'::text AS injection, e.ended_at AS at, e.id AS ord
     )"
);

/// Claims the due executions with `SKIP LOCKED`: a row another node is expiring (or ending) right
/// now is left to it.
pub(super) const EXPIRE_DUE: &str = end_and_record!(
    "due AS (
         SELECT id FROM executions
         WHERE state IN ('queued', 'delivered') AND deadline <= $1 AND state = ANY ($3)
         ORDER BY id
         FOR UPDATE SKIP LOCKED
     ),
     ended AS (
         UPDATE executions e SET state = $2, ended_at = $1, result = NULL
         FROM due WHERE e.id = due.id
         RETURNING e.id, e.org_id, e.task_id, e.device_id, e.key_id, e.kcv, e.state, e.result,
                   'auto'::text AS injection, e.ended_at AS at, e.id AS ord
     )"
);

/// Claims the executions due for a re-delivery (see [`Delivery::claim_redeliveries`]): the rows are
/// locked with `SKIP LOCKED` and marked claimed in the same statement, so a row another node is
/// claiming is left to it and a row it claimed is not due any more. `$1` now, `$2` first, `$3`
/// initial, `$4` max, `$5` limit, `$6` after. `id > $6` lets the planner start an index scan in
/// id order where the sweep's last claim ended, instead of reading again the rows claimed before:
/// measured on 100,000 due executions (PostgreSQL 15, one session), all the claims took 2.0 s
/// with it and 5.6 s without at 2,000 a claim, 2.6 s and 47 s at 100 a claim.
pub(super) const CLAIM_REDELIVERIES: &str = concat!(
    "WITH due AS (
         SELECT id FROM executions
         WHERE state IN ('queued', 'delivered') AND deadline > $1 AND id > $6
           AND COALESCE(retry_claimed_until, 0) <= $1
           AND CASE WHEN last_sent_at IS NULL THEN created_at + $2 <= $1
                    ELSE last_sent_at + LEAST($3 * power(2, LEAST(GREATEST(delivery_count - 1, 0), 16))::bigint, $4) <= $1
               END
         ORDER BY id
         LIMIT $5
         FOR UPDATE SKIP LOCKED
     ),
     claimed AS (
         UPDATE executions e SET retry_claimed_until = $1 + $3 FROM due WHERE e.id = due.id RETURNING e.id
     ) ",
    execution_select!(),
    " WHERE e.id IN (SELECT id FROM claimed) ORDER BY e.id"
);

// ---------------------------------------------------------------- batches

/// The kinds of [`Write`], in the order a round applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Report,
    Seen,
    Counter,
    Delivered,
    End,
    Initialise,
    Prove,
}

const KINDS: usize = 7;

/// A row a write touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Device(i64),
    Execution(i64),
}

/// Whether writes of kinds `a` and `b` on the same row must stay in their order: one writes a
/// column the other writes or reads. Two writes of one kind on one row are merged by the kind's
/// own rule instead (see [`Round`]), so no kind conflicts with itself.
fn order_matters(a: Kind, b: Kind) -> bool {
    use Kind::*;
    matches!(
        (a.min(b), a.max(b)),
        // last_seen
        (Report, Seen)
        // locked (a success locks the device; a report says whether it is locked)
        | (Report, End)
        // unlock_pending, which the initialisation returns with the new credentials
        | (Report, Initialise)
        // last_counter
        | (Counter, Initialise)
        // the GUDID a proof spends for good is the one the initialisation before it spent
        | (Initialise, Prove)
        // state, delivered_at, delivery_count
        | (Delivered, End)
    )
}

/// Writes that one set-based statement per kind applies. Within a round, writes of one kind on
/// one row are merged exactly as applying them in order would: the last report and the last
/// `Seen` win, counters take the maximum, `Delivered` keeps the first time and counts them all,
/// the first ending wins (a later one finds the execution closed), initialisations run in order.
#[derive(Default)]
pub(super) struct Round<'w> {
    reports: BTreeMap<i64, &'w DeviceReport>,
    seen: BTreeMap<i64, Millis>,
    counters: BTreeMap<i64, i64>,
    delivered: BTreeMap<i64, (Millis, i64)>,
    /// (index in the batch, ending), first per execution, in batch order.
    ends: Vec<(usize, &'w Ending)>,
    ending: HashSet<i64>,
    /// (index in the batch, GUDID row, device, credentials, time), in batch order.
    initialise: Vec<(usize, i64, i64, &'w NewCredentials, Millis)>,
    /// Device → the newest generation it proved in this round, and when.
    proven: BTreeMap<i64, (i64, Millis)>,
}

/// Splits a batch into rounds such that applying the rounds in order, and within a round the kinds
/// in [`Kind`] order, gives what applying the writes one by one gives. A write goes in the
/// earliest round that keeps it after every earlier write it does not commute with
/// ([`order_matters`]) on a row they share: the same round if that write's kind is applied
/// earlier in a round, the next one otherwise. `device_of` maps executions to their devices,
/// needed only when a batch holds both reports and device-locking endings.
pub(super) fn plan_rounds<'w>(writes: &'w [Write], device_of: &HashMap<i64, i64>) -> Vec<Round<'w>> {
    const ALL: [Kind; KINDS] =
        [Kind::Report, Kind::Seen, Kind::Counter, Kind::Delivered, Kind::End, Kind::Initialise, Kind::Prove];
    let mut latest: HashMap<Target, [Option<usize>; KINDS]> = HashMap::new();
    let mut rounds: Vec<Round<'w>> = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        let (kind, targets): (Kind, Vec<Target>) = match write {
            Write::Report(r) => (Kind::Report, vec![Target::Device(r.device_id)]),
            Write::Seen { device_id, .. } => (Kind::Seen, vec![Target::Device(*device_id)]),
            Write::Counter { device_id, .. } => (Kind::Counter, vec![Target::Device(*device_id)]),
            Write::Delivered { execution_id, .. } => (Kind::Delivered, vec![Target::Execution(*execution_id)]),
            Write::End(e) => {
                let mut targets = vec![Target::Execution(e.execution_id)];
                if let (true, Some(device)) = (e.lock_device, device_of.get(&e.execution_id)) {
                    targets.push(Target::Device(*device));
                }
                (Kind::End, targets)
            }
            Write::Initialise { device_id, .. } => (Kind::Initialise, vec![Target::Device(*device_id)]),
            Write::ProveGudid { device_id, .. } => (Kind::Prove, vec![Target::Device(*device_id)]),
        };
        let mut round = 0;
        for target in &targets {
            let Some(seen) = latest.get(target) else { continue };
            for (other, at) in ALL.iter().zip(seen) {
                if let (Some(at), true) = (at, order_matters(*other, kind)) {
                    round = round.max(if *other < kind { *at } else { at + 1 });
                }
            }
        }
        for target in targets {
            let slot = &mut latest.entry(target).or_default()[kind as usize];
            *slot = Some(slot.map_or(round, |r| r.max(round)));
        }
        if rounds.len() <= round {
            rounds.resize_with(round + 1, Round::default);
        }
        let r = &mut rounds[round];
        match write {
            Write::Report(report) => {
                r.reports.insert(report.device_id, report);
            }
            Write::Seen { device_id, at } => {
                r.seen.insert(*device_id, *at);
            }
            Write::Counter { device_id, counter } => {
                let counter = *counter as i64;
                r.counters.entry(*device_id).and_modify(|c| *c = (*c).max(counter)).or_insert(counter);
            }
            Write::Delivered { execution_id, at } => {
                r.delivered.entry(*execution_id).and_modify(|(_, n)| *n += 1).or_insert((*at, 1));
            }
            Write::End(ending) => {
                if r.ending.insert(ending.execution_id) {
                    r.ends.push((index, ending));
                }
            }
            Write::Initialise { gudid_row, device_id, creds, at } => {
                r.initialise.push((index, *gudid_row, *device_id, creds, *at));
            }
            Write::ProveGudid { device_id, generation, at } => {
                let proof = (*generation, *at);
                r.proven.entry(*device_id).and_modify(|p| *p = (*p).max(proof)).or_insert(proof);
            }
        }
    }
    rounds
}

/// Spends for good the GUDIDs the devices proved (`gudids_device_unproven` finds them), each
/// only while its device's credentials are of the generation proved. The device rows are locked
/// first, as a spend locks them (`spend_gudid_in`): a spend committed meanwhile is waited for and
/// its new generation seen (the row is checked again after the wait), and a spend that comes
/// after waits for this batch and then finds the GUDID proven.
const APPLY_PROVEN: &str = "WITH still AS (
         SELECT d.id, i.at FROM devices d
         JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS i(device_id, generation, at) ON d.id = i.device_id
         WHERE d.generation = i.generation
         ORDER BY d.id FOR SHARE OF d)
     UPDATE gudids g SET proven_at = still.at FROM still
     WHERE g.device_id = still.id AND g.used_at IS NOT NULL AND g.proven_at IS NULL";

const APPLY_REPORTS: &str =
    "UPDATE devices d SET model = i.model, rom_version = i.rom_version, app_version = i.app_version,
        region = i.region, debug_mode = i.debug_mode, debug_key_present = i.debug_key_present, locked = i.locked,
        slots = i.slots, last_seen = i.at, unlock_pending = CASE WHEN i.locked THEN d.unlock_pending ELSE FALSE END
     FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::bool[], $8::bool[],
                 $9::text[], $10::bigint[])
          AS i(device_id, model, rom_version, app_version, region, debug_mode, debug_key_present, locked, slots, at)
     WHERE d.id = i.device_id";

const APPLY_SEEN: &str = "UPDATE devices d SET last_seen = i.at
     FROM unnest($1::bigint[], $2::bigint[]) AS i(device_id, at) WHERE d.id = i.device_id";

const APPLY_COUNTERS: &str = "UPDATE devices d SET last_counter = GREATEST(d.last_counter, i.counter)
     FROM unnest($1::bigint[], $2::bigint[]) AS i(device_id, counter)
     WHERE d.id = i.device_id AND d.last_counter < i.counter";

const APPLY_DELIVERED: &str =
    "UPDATE executions e SET state = 'delivered', delivered_at = COALESCE(e.delivered_at, i.at),
        delivery_count = e.delivery_count + i.n, last_sent_at = GREATEST(e.last_sent_at, i.at)
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS i(execution_id, at, n)
     WHERE e.id = i.execution_id AND e.state IN ('queued', 'delivered')";

type Initialised = (usize, i64, Option<DeviceCredentials>);

pub(super) fn apply_round(
    s: &mut Tx<'_, '_>,
    round: &Round<'_>,
    ended: &mut Vec<(usize, i64, ExecutionState)>,
    initialised: &mut Vec<Initialised>,
) -> Result<(), Failure> {
    if !round.reports.is_empty() {
        let r: Vec<&DeviceReport> = round.reports.values().copied().collect();
        let ids: Vec<i64> = r.iter().map(|r| r.device_id).collect();
        let models: Vec<&str> = r.iter().map(|r| r.model.as_str()).collect();
        let roms: Vec<&str> = r.iter().map(|r| r.rom_version.as_str()).collect();
        let apps: Vec<&str> = r.iter().map(|r| r.app_version.as_str()).collect();
        let regions: Vec<&str> = r.iter().map(|r| r.region.as_str()).collect();
        let debug: Vec<bool> = r.iter().map(|r| r.debug_mode).collect();
        let debug_key: Vec<bool> = r.iter().map(|r| r.debug_key_present).collect();
        let locked: Vec<bool> = r.iter().map(|r| r.locked).collect();
        let slots: Vec<&str> = r.iter().map(|r| r.slots_json.as_str()).collect();
        let ats: Vec<i64> = r.iter().map(|r| r.at).collect();
        s.execute(APPLY_REPORTS, &[&ids, &models, &roms, &apps, &regions, &debug, &debug_key, &locked, &slots, &ats])?;
    }
    if !round.seen.is_empty() {
        let (ids, ats): (Vec<i64>, Vec<i64>) = round.seen.iter().map(|(k, v)| (*k, *v)).unzip();
        s.execute(APPLY_SEEN, &[&ids, &ats])?;
    }
    if !round.counters.is_empty() {
        let (ids, counters): (Vec<i64>, Vec<i64>) = round.counters.iter().map(|(k, v)| (*k, *v)).unzip();
        s.execute(APPLY_COUNTERS, &[&ids, &counters])?;
    }
    if !round.delivered.is_empty() {
        let ids: Vec<i64> = round.delivered.keys().copied().collect();
        let ats: Vec<i64> = round.delivered.values().map(|(at, _)| *at).collect();
        let counts: Vec<i64> = round.delivered.values().map(|(_, n)| *n).collect();
        s.execute(APPLY_DELIVERED, &[&ids, &ats, &counts])?;
    }
    if !round.ends.is_empty() {
        let endings: Vec<&Ending> = round.ends.iter().map(|(_, e)| *e).collect();
        for i in end_executions(s, &endings)? {
            let (index, ending) = round.ends[i];
            ended.push((index, ending.execution_id, ending.state));
        }
    }
    for (index, gudid_row, device_id, creds, at) in &round.initialise {
        initialised.push((*index, *gudid_row, spend_gudid_in(s, *gudid_row, *device_id, creds, *at)?));
    }
    if !round.proven.is_empty() {
        let devices: Vec<i64> = round.proven.keys().copied().collect();
        let generations: Vec<i64> = round.proven.values().map(|(generation, _)| *generation).collect();
        let ats: Vec<i64> = round.proven.values().map(|(_, at)| *at).collect();
        s.execute(APPLY_PROVEN, &[&devices, &generations, &ats])?;
    }
    Ok(())
}

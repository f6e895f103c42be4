//! The store test suite: the behaviour of [`Store`], written once against `&dyn Store` and run
//! against both backends, `sqlite::…` (a file in a temporary directory) and `postgres::…` (a real
//! PostgreSQL server started for this test binary, one database per test; see `tests/src/pg.rs`, shared with the end-to-end harness).
//! A machine without PostgreSQL fails the `postgres::…` tests and names the package to install.
//!
//! Then one test across both: random batches give PostgreSQL's grouped `apply_batch` exactly the
//! results of SQLite's write-by-write one.

#[path = "store_suite/channel.rs"]
mod channel_specs;
#[path = "store_suite/harness.rs"]
mod harness;
#[path = "../../tests/src/pg.rs"]
mod pg;

use std::collections::HashSet;

use rki_gateway::clock::Millis;
use rki_gateway::domain::ExecutionState;
use rki_gateway::store::postgres::PostgresStore;
use rki_gateway::store::*;

use channel_specs::*;
use harness::*;

/// Generates `sqlite::$spec` and `postgres::$spec` for every spec function.
macro_rules! suite {
    ($($spec:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $spec() { super::$spec(&super::Subject::sqlite()); } )*
        }
        mod postgres {
            $( #[test] fn $spec() {
                if let Some(subject) = super::Subject::postgres_or_skip(stringify!($spec)) {
                    super::$spec(&subject);
                }
            } )*
        }
    };
}

suite! {
    organizations_are_unique_by_name_and_found_by_name_and_id,
    tokens_are_found_by_hash_with_their_role_and_a_hash_is_used_once,
    import_adds_new_serial_numbers_and_skips_the_organizations_own,
    import_is_all_or_nothing_and_names_every_line_registered_elsewhere,
    sn_owners_names_the_organization_of_each_registered_sn_only,
    devices_are_listed_by_sn_fragment_ignoring_case_by_group_and_by_page,
    unknown_rows_are_not_found,
    groups_are_unique_per_organization_and_count_each_member_once,
    assignment_changes_only_the_organizations_own_devices,
    key_sources_are_unique_per_organization_and_hidden_from_others,
    keks_are_unique_per_organization_listed_per_organization_or_all_and_resealed,
    serials_allocated_by_two_threads_at_once_are_disjoint_ranges,
    a_gudid_installs_credentials_once_and_a_second_spend_is_a_conflict,
    two_concurrent_spends_of_one_gudid_have_exactly_one_winner,
    a_spent_gudid_is_answered_anew_until_its_device_proves_its_secrets,
    a_proof_racing_a_newer_answer_never_strands_the_device,
    credentials_exist_only_for_initialised_devices,
    a_task_persists_one_queued_execution_per_device_with_its_counts,
    a_repeated_request_id_finds_the_task_and_cannot_create_another,
    a_devices_open_executions_and_the_still_open_ids_follow_the_endings,
    delivered_writes_count_deliveries_and_keep_the_first_time,
    an_ending_counts_the_sends_it_carries_as_delivered_writes_would,
    a_successful_ending_writes_one_record_and_locks_the_device,
    a_failed_ending_records_the_error_code_and_no_kcv,
    a_second_ending_of_one_execution_is_skipped_and_not_reported,
    two_batches_ending_one_execution_at_once_record_it_once,
    an_initialise_write_spends_its_gudid_once_within_a_batch,
    device_writes_of_a_batch_take_effect_in_batch_order,
    an_acks_counter_is_durable_with_its_ending_whether_or_not_the_ending_applies,
    rewrap_replaces_the_key_block_of_open_executions_only,
    stopping_a_task_terminates_its_open_executions_with_records_once,
    expiry_ends_only_the_executions_past_their_deadline,
    two_concurrent_expiry_sweeps_expire_each_execution_once,
    records_are_filtered_by_sn_and_task_and_billed_per_source_and_month,
    execution_state_counts_and_expiring_within_count_open_executions,
    the_audit_log_is_newest_first_per_organization_and_refuses_change,
    each_action_writes_its_audit_entry_in_its_own_transaction,
    records_refuse_update_and_delete,
    a_stored_value_that_does_not_parse_fails_the_read_naming_its_column,
    migrations_run_once_and_reopening_keeps_everything,
    meta_values_are_set_and_replaced,
    marks_only_go_up_and_two_threads_raising_one_keep_the_highest,
    reseal_all_reseals_every_key_or_none,
    provisioning_is_all_or_nothing_and_audited_in_its_transaction,
    a_new_gudid_revokes_the_live_one_of_its_sn_and_the_revocation_is_audited,
    two_provisionings_for_one_sn_at_once_leave_one_live_gudid,
    a_revoked_gudid_opens_nothing_initialises_nothing_and_is_revoked_once,
    gudids_are_listed_newest_first_live_only_and_by_page,
    clear_gudid_mac_keys_of_an_older_gateway_are_sealed_once_and_then_resealed,
    // The backend channel (store_suite/channel.rs).
    backends_are_unique_per_organization_revoked_once_and_audited,
    a_backend_counter_only_goes_up_once_per_value_and_a_revoked_backend_accepts_none,
    a_request_is_claimed_once_per_backend_and_its_answer_remembered,
    a_stop_and_an_unlock_remember_their_answer_in_their_own_transaction,
    the_broker_knows_live_backends_of_every_organization_and_no_revoked_one,
    the_broker_credentials_view_holds_exactly_the_identities_a_broker_may_admit,
    events_follow_tasks_and_endings_in_their_own_transactions_without_holes,
    two_batches_ending_one_tasks_last_executions_at_once_write_one_task_done,
    old_events_and_requests_are_pruned_and_the_oldest_kept_is_reported,
}

fn conflict<T: std::fmt::Debug>(result: StoreResult<T>) -> String {
    match result {
        Err(StoreError::Conflict(message)) => message,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn by_sn(sn: &str) -> GudidFilter {
    GudidFilter { sn: Some(sn.to_string()), ..GudidFilter::default() }
}

fn is_not_found<T>(result: StoreResult<T>) -> bool {
    matches!(result, Err(StoreError::NotFound(_)))
}

// ---------------------------------------------------------------- organizations and tokens

fn organizations_are_unique_by_name_and_found_by_name_and_id(s: &Subject) {
    let st = s.store();
    let acme = st.create_org("acme", T0, &audit("org.create")).must();
    let globex = st.create_org("globex", T0 + 1, &audit("org.create")).must();
    assert_ne!(acme.id, globex.id);
    assert_eq!(conflict(st.create_org("acme", T0 + 2, &audit("org.create"))), "organization \"acme\" exists");
    assert_eq!(st.org_by_name("globex").must().map(|o| o.id), Some(globex.id));
    assert!(st.org_by_name("initech").must().is_none());
    let found = st.org(acme.id).must();
    assert_eq!((found.name.as_str(), found.created_at), ("acme", T0));
    let names: Vec<String> = st.list_orgs().must().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["acme", "globex"]);
}

fn tokens_are_found_by_hash_with_their_role_and_a_hash_is_used_once(s: &Subject) {
    let st = s.store();
    let org = st.create_org("acme", T0, &audit("org.create")).must();
    assert!(!st.has_key_owner().must());
    let admin = st.insert_token(Some(org.id), Role::Admin, "ops", b"hash-admin", T0, &audit("token.create")).must();
    assert!(!st.has_key_owner().must(), "an admin token is not the key owner");
    let owner = st.insert_token(None, Role::KeyOwner, "owner", b"hash-owner", T0, &audit("token.create")).must();
    assert!(st.has_key_owner().must());
    let found = st.token_by_hash(b"hash-admin").must().expect("admin token found");
    assert_eq!(
        (found.id, found.org_id, found.role, found.label.as_str()),
        (admin.id, Some(org.id), Role::Admin, "ops")
    );
    let found = st.token_by_hash(b"hash-owner").must().expect("owner token found");
    assert_eq!((found.id, found.org_id, found.role), (owner.id, None, Role::KeyOwner));
    assert!(st.token_by_hash(b"hash-unknown").must().is_none());
    conflict(st.insert_token(Some(org.id), Role::Admin, "again", b"hash-admin", T0, &audit("token.create")));
}

// ---------------------------------------------------------------- devices and groups

fn import_adds_new_serial_numbers_and_skips_the_organizations_own(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let rows = vec![
        ImportRow { line: 2, sn: "acme-0000".into(), model: None },
        ImportRow { line: 3, sn: "acme-0100".into(), model: Some("A80".into()) },
        ImportRow { line: 4, sn: "acme-0100".into(), model: None },
    ];
    assert_eq!(
        st.import_devices(w.org.id, &rows, T0 + 5, &audit("devices.upload")).must(),
        1,
        "only the new SN is added, once"
    );
    assert_eq!(st.count_devices(w.org.id).must(), 3);
    let added = st.device(w.org.id, "acme-0100").must();
    assert_eq!(
        (added.model.as_deref(), added.created_at, added.locked, added.initialised),
        (Some("A80"), T0 + 5, false, false)
    );
    assert_eq!(
        st.device(w.org.id, "acme-0000").must().model.as_deref(),
        Some("A920"),
        "an existing device is unchanged"
    );
}

fn import_is_all_or_nothing_and_names_every_line_registered_elsewhere(s: &Subject) {
    let st = s.store();
    let acme = world(st, "acme", 2);
    let globex = world(st, "globex", 0);
    let rows = vec![
        ImportRow { line: 2, sn: "globex-new".into(), model: None },
        ImportRow { line: 3, sn: "acme-0001".into(), model: None },
        ImportRow { line: 4, sn: "globex-other".into(), model: None },
        ImportRow { line: 5, sn: "acme-0000".into(), model: None },
    ];
    let message = conflict(st.import_devices(globex.org.id, &rows, T0, &audit("devices.upload")));
    assert_eq!(
        message,
        "line 3: SN acme-0001 is registered to another organization; line 5: SN acme-0000 is registered to another organization"
    );
    assert_eq!(st.count_devices(globex.org.id).must(), 0, "nothing of the file is imported");
    assert_eq!(st.count_devices(acme.org.id).must(), 2);
    assert_eq!(st.device_org_by_sn("acme-0001").must(), Some((acme.devices[1].id, acme.org.id)));
    assert!(st.device_org_by_sn("globex-new").must().is_none());
}

fn sn_owners_names_the_organization_of_each_registered_sn_only(s: &Subject) {
    let st = s.store();
    let acme = world(st, "acme", 2);
    let globex = world(st, "globex", 1);
    let asked: Vec<String> = ["acme-0001", "nobody-1", "globex-0000", "acme-0000"].map(String::from).to_vec();
    let mut owners = st.sn_owners(&asked).must();
    owners.sort();
    assert_eq!(
        owners,
        vec![
            ("acme-0000".into(), acme.org.id),
            ("acme-0001".into(), acme.org.id),
            ("globex-0000".into(), globex.org.id)
        ]
    );
    assert!(st.sn_owners(&[]).must().is_empty());
}

fn devices_are_listed_by_sn_fragment_ignoring_case_by_group_and_by_page(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 5);
    let rows = vec![ImportRow { line: 2, sn: "ACME_X".into(), model: None }];
    st.import_devices(w.org.id, &rows, T0, &audit("devices.upload")).must();
    let sns =
        |f: DeviceFilter| -> Vec<String> { st.list_devices(w.org.id, &f).must().into_iter().map(|d| d.sn).collect() };
    assert_eq!(
        sns(DeviceFilter::default()),
        ["ACME_X", "acme-0000", "acme-0001", "acme-0002", "acme-0003", "acme-0004"]
    );
    assert_eq!(
        sns(DeviceFilter { sn_contains: Some("ACME-000".into()), limit: 2, offset: 1, ..Default::default() }),
        ["acme-0001", "acme-0002"]
    );
    assert_eq!(sns(DeviceFilter { sn_contains: Some("e_x".into()), ..Default::default() }), ["ACME_X"], "_ is literal");
    // Keyset pages: bytewise order, each page after the last SN of the previous one.
    assert_eq!(
        sns(DeviceFilter { after_sn: Some("acme-0001".into()), limit: 2, ..Default::default() }),
        ["acme-0002", "acme-0003"]
    );
    assert_eq!(sns(DeviceFilter { after_sn: Some("acme-0004".into()), ..Default::default() }), Vec::<String>::new());
    let group = st.create_group(w.org.id, "north", "", &audit("group.create")).must();
    st.add_group_members(group.id, &[w.devices[3].id, w.devices[1].id], &audit("group.add_devices")).must();
    assert_eq!(sns(DeviceFilter { group: Some(group.id), ..Default::default() }), ["acme-0001", "acme-0003"]);
    let by_id: Vec<String> =
        st.devices_by_ids(&[w.devices[4].id, w.devices[0].id]).must().into_iter().map(|d| d.sn).collect();
    assert_eq!(
        by_id.iter().collect::<HashSet<_>>(),
        ["acme-0000".to_string(), "acme-0004".to_string()].iter().collect()
    );
    assert_eq!(st.device_by_id(w.devices[2].id).must().sn, "acme-0002");
    let asked = vec!["acme-0002".to_string(), "nope".to_string(), "acme-0000".to_string()];
    assert_eq!(
        st.device_ids_by_sn(w.org.id, &asked).must(),
        vec![
            ("acme-0002".to_string(), Some(w.devices[2].id)),
            ("nope".to_string(), None),
            ("acme-0000".to_string(), Some(w.devices[0].id)),
        ]
    );
}

fn unknown_rows_are_not_found(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let other = world(st, "globex", 1);
    let (t, executions) = task(st, &w, &[0]);
    assert!(is_not_found(st.org(9_999)));
    assert!(is_not_found(st.device(w.org.id, "globex-0000")), "another organization's device");
    assert!(is_not_found(st.device_by_id(9_999)));
    assert!(is_not_found(st.key_source(other.org.id, w.source.id)), "another organization's key source");
    assert!(is_not_found(st.key_source_by_name(w.org.id, "bdk-9")));
    assert!(is_not_found(st.group_by_name(w.org.id, "south")));
    assert!(is_not_found(st.task(other.org.id, t.id)), "another organization's task");
    assert!(is_not_found(st.execution(executions[0].id + 1_000)));
    assert!(is_not_found(st.stop_task(other.org.id, t.id, T0, &audit("task.stop"))));
    assert!(is_not_found(st.allocate_serials(9_999, 1)));
    assert!(st.credentials("nope").must().is_none());
    assert!(st.gudid_by_id(b"nope").must().is_none());
}

fn groups_are_unique_per_organization_and_count_each_member_once(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let other = world(st, "globex", 0);
    let north = st.create_group(w.org.id, "north", "northern shops", &audit("group.create")).must();
    assert_eq!(conflict(st.create_group(w.org.id, "north", "", &audit("group.create"))), "group \"north\" exists");
    st.create_group(other.org.id, "north", "", &audit("group.create")).must();
    st.create_group(w.org.id, "east", "", &audit("group.create")).must();
    let ids = [w.devices[0].id, w.devices[2].id, w.devices[0].id];
    assert_eq!(st.add_group_members(north.id, &ids, &audit("group.add_devices")).must(), 2);
    assert_eq!(
        st.add_group_members(north.id, &[w.devices[2].id], &audit("group.add_devices")).must(),
        0,
        "already a member"
    );
    assert_eq!(st.group_member_ids(north.id).must(), [w.devices[0].id, w.devices[2].id]);
    let found = st.group_by_name(w.org.id, "north").must();
    assert_eq!((found.id, found.description.as_str(), found.members), (north.id, "northern shops", 2));
    let listed: Vec<(String, i64)> = st.list_groups(w.org.id).must().into_iter().map(|g| (g.name, g.members)).collect();
    assert_eq!(listed, [("east".to_string(), 0), ("north".to_string(), 2)]);
    conflict(st.add_group_members(north.id, &[9_999], &audit("group.add_devices")));
}

fn assignment_changes_only_the_organizations_own_devices(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let other = world(st, "globex", 1);
    let ids = [w.devices[0].id, w.devices[1].id, other.devices[0].id];
    assert_eq!(st.assign(w.org.id, &ids, Some(w.source.id), &audit("assignment.set")).must(), 2);
    assert_eq!(st.device_by_id(w.devices[1].id).must().assigned_key_source, Some(w.source.id));
    assert_eq!(st.device_by_id(w.devices[2].id).must().assigned_key_source, None);
    assert_eq!(st.device_by_id(other.devices[0].id).must().assigned_key_source, None);
    assert_eq!(st.assign(w.org.id, &[w.devices[1].id], None, &audit("assignment.set")).must(), 1);
    assert_eq!(st.device_by_id(w.devices[1].id).must().assigned_key_source, None, "unassigned");
    st.set_unlock_pending(w.devices[2].id, true, None).must();
    assert!(st.device_by_id(w.devices[2].id).must().unlock_pending);
}

fn key_sources_are_unique_per_organization_and_hidden_from_others(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 0);
    let other = world(st, "globex", 0);
    assert_eq!(
        conflict(st.insert_key_source(&w.source, &audit("key_source.authorize"))),
        "key source \"bdk-1\" exists"
    );
    let second = st
        .insert_key_source(&KeySourceRow { name: "bdk-2".into(), ..w.source.clone() }, &audit("key_source.authorize"))
        .must();
    let names: Vec<String> = st.list_key_sources(w.org.id).must().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["bdk-1", "bdk-2"]);
    let found = st.key_source_by_name(w.org.id, "bdk-2").must();
    assert_eq!((found.id, found.sealed.as_str(), found.key_set_id.as_str()), (second.id, "sealed:bdk-1", "FFFF987654"));
    assert_eq!(st.key_source(w.org.id, second.id).must().name, "bdk-2");
    assert!(is_not_found(st.key_source(other.org.id, second.id)));
    assert_eq!(st.list_key_sources(other.org.id).must().len(), 1);
}

fn keks_are_unique_per_organization_listed_per_organization_or_all_and_resealed(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 0);
    let other = world(st, "globex", 0);
    let kek = |org: &OrgRow, name: &str| KekRow {
        id: 0,
        org_id: org.id,
        name: name.into(),
        algorithm: "tdes2".into(),
        kcv: "08D7B4".into(),
        sealed: format!("sealed:{}:{name}", org.name),
        created_at: T0 + 1,
    };
    let zmk = st.insert_kek(&kek(&w.org, "zmk-1"), &audit("kek.create")).must();
    assert_eq!(conflict(st.insert_kek(&kek(&w.org, "zmk-1"), &audit("kek.create"))), "KEK \"zmk-1\" exists");
    st.insert_kek(&kek(&w.org, "zmk-2"), &audit("kek.create")).must();
    st.insert_kek(&kek(&other.org, "zmk-1"), &audit("kek.create")).must();
    let found = st.kek_by_name(w.org.id, "zmk-1").must();
    assert_eq!(
        (found.id, found.name.as_str(), found.algorithm.as_str(), found.kcv.as_str(), found.sealed.as_str()),
        (zmk.id, "zmk-1", "tdes2", "08D7B4", "sealed:acme:zmk-1")
    );
    assert_eq!(found.created_at, T0 + 1);
    assert_eq!(st.kek_by_name(other.org.id, "zmk-1").must().sealed, "sealed:globex:zmk-1");
    assert!(is_not_found(st.kek_by_name(other.org.id, "zmk-2")), "another organization's KEK is not found");
    let names = |org: Option<i64>| -> Vec<(i64, String)> {
        st.list_keks(org).must().into_iter().map(|k| (k.org_id, k.name)).collect()
    };
    assert_eq!(names(Some(w.org.id)), [(w.org.id, "zmk-1".into()), (w.org.id, "zmk-2".into())]);
    assert_eq!(names(Some(other.org.id)), [(other.org.id, "zmk-1".into())]);
    assert_eq!(names(None).len(), 3);
    // A master key rotation re-seals the KEKs with everything else.
    let count = s.opened.reseal_all(|sealed| Ok(format!("new:{sealed}")), "NEWKCV").must();
    assert_eq!(count, 2 + 3, "two BDKs and three KEKs");
    assert_eq!(st.kek_by_name(w.org.id, "zmk-2").must().sealed, "new:sealed:acme:zmk-2");
}

fn serials_allocated_by_two_threads_at_once_are_disjoint_ranges(s: &Subject) {
    const ALLOCATIONS_PER_THREAD: usize = 50;
    const COUNT: i64 = 7;
    let st = s.store();
    let w = world(st, "acme", 0);
    assert_eq!(st.allocate_serials(w.source.id, 3).must(), 0);
    let firsts: Vec<i64> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    (0..ALLOCATIONS_PER_THREAD)
                        .map(|_| st.allocate_serials(w.source.id, COUNT).must())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().expect("allocating thread")).collect()
    });
    let mut sorted = firsts.clone();
    sorted.sort();
    let expected: Vec<i64> = (0..2 * ALLOCATIONS_PER_THREAD as i64).map(|i| 3 + i * COUNT).collect();
    assert_eq!(sorted, expected, "every range starts where another ends: no overlap, no gap");
    assert_eq!(st.allocate_serials(w.source.id, 1).must(), 3 + 2 * ALLOCATIONS_PER_THREAD as i64 * COUNT);
}

// ---------------------------------------------------------------- GUDIDs and credentials

fn a_gudid_installs_credentials_once_and_a_second_spend_is_a_conflict(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let gudid = st.insert_gudid(&new_gudid(&w, 0, 1)).must();
    let found = st.gudid_by_id(&gudid.gudid_id).must().expect("GUDID found by its id");
    assert_eq!((found.id, found.sn.as_str(), found.used_at), (gudid.id, "acme-0000", None));
    assert_eq!(found.bootstrap_hash.as_deref(), Some("$7$101$salt1$hash0"), "the bootstrap hash is kept");
    let live = vec![("acme-0000".to_string(), "$7$101$salt1$hash0".to_string())];
    assert_eq!(st.live_bootstrap_hashes(Some("acme-0000"), T0, None).must(), live);
    assert_eq!(st.live_bootstrap_hashes(None, T0, None).must(), live);
    assert!(st.live_bootstrap_hashes(Some("acme-0001"), T0, None).must().is_empty());
    assert!(st.live_bootstrap_hashes(None, T0 + 30 * DAY_MS, None).must().is_empty(), "expired");
    let creds = st.spend_gudid(gudid.id, w.devices[0].id, &new_credentials("first"), T0 + 10).must();
    assert_eq!(
        (creds.device_id, creds.signing_key.as_str(), creds.last_counter, creds.generation),
        (w.devices[0].id, "sealed:sign:first", 1, 1)
    );
    assert_eq!(
        conflict(st.spend_gudid(gudid.id, w.devices[0].id, &new_credentials("second"), T0 + 11)),
        "GUDID already used"
    );
    assert_eq!(st.credentials("acme-0000").must().map(|c| c.signing_key), Some("sealed:sign:first".to_string()));
    assert_eq!(st.gudid_by_id(&gudid.gudid_id).must().and_then(|g| g.used_at), Some(T0 + 10));
    assert!(
        st.live_bootstrap_hashes(None, T0 + 20, None).must().is_empty(),
        "a spent GUDID opens no bootstrap session"
    );
    assert_eq!(st.live_bootstrap_hashes(None, T0 + 20, Some(T0 + 9)).must(), live, "spent within the grace");
    assert!(st.live_bootstrap_hashes(None, T0 + 20, Some(T0 + 10)).must().is_empty(), "spent before the grace");
    let device = st.device(w.org.id, "acme-0000").must();
    assert_eq!((device.initialised, device.x_pos_device_id.as_deref()), (true, Some("xpos-first")));
    let listed = st.list_gudids(w.org.id, &by_sn("acme-0000")).must();
    assert_eq!(listed.iter().map(|g| g.id).collect::<Vec<_>>(), [gudid.id]);
    assert!(st.list_gudids(w.org.id, &by_sn("acme-0001")).must().is_empty());
    let broker = st.broker_devices().must();
    assert_eq!(broker, [("acme-0000".to_string(), Some("$7$hash-first".to_string())), ("acme-0001".to_string(), None)]);
}

fn two_concurrent_spends_of_one_gudid_have_exactly_one_winner(s: &Subject) {
    const ROUNDS: usize = 10;
    let st = s.store();
    let w = world(st, "acme", ROUNDS);
    for device in 0..ROUNDS {
        let gudid = st.insert_gudid(&new_gudid(&w, device, 2)).must();
        let device_id = w.devices[device].id;
        let results: Vec<StoreResult<DeviceCredentials>> = std::thread::scope(|scope| {
            let spends: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|tag| scope.spawn(move || st.spend_gudid(gudid.id, device_id, &new_credentials(tag), T0)))
                .collect();
            spends.into_iter().map(|t| t.join().expect("spending thread")).collect()
        });
        let winners: Vec<&DeviceCredentials> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one spend wins: {results:?}");
        assert!(results.iter().any(|r| matches!(r, Err(StoreError::Conflict(m)) if m == "GUDID already used")));
        let installed = st.credentials(&w.devices[device].sn).must().expect("installed");
        assert_eq!((installed.signing_key.as_str(), installed.generation), (winners[0].signing_key.as_str(), 1));
    }
}

fn a_spent_gudid_is_answered_anew_until_its_device_proves_its_secrets(s: &Subject) {
    use rki_gateway::store::GUDID_PROOF_WINDOW_MS;
    let st = s.store();
    let w = world(st, "acme", 2);
    let (first, second) = (w.devices[0].id, w.devices[1].id);
    let initialise = |gudid: i64, device: i64, tag: &str, counter: u64, at: Millis| {
        let creds = NewCredentials { counter, ..new_credentials(tag) };
        let outcome = st.apply_batch(&[Write::Initialise { gudid_row: gudid, device_id: device, creds, at }]).must();
        outcome.initialised[0].1.as_ref().map(|c| c.signing_key.clone())
    };
    let gudid = st.insert_gudid(&new_gudid(&w, 0, 3)).must();
    assert_eq!(initialise(gudid.id, first, "a", 5, T0 + 10).as_deref(), Some("sealed:sign:a"));
    // The terminal's answer came too late; it asks again, with a newer counter: answered anew,
    // and the GUDID keeps its first spending time.
    assert_eq!(initialise(gudid.id, first, "b", 7, T0 + 20).as_deref(), Some("sealed:sign:b"));
    // A replay of a CreateKey (a counter not above the last one) is not.
    assert_eq!(initialise(gudid.id, first, "c", 7, T0 + 30), None, "a replayed CreateKey");
    assert_eq!(st.credentials("acme-0000").must().map(|c| c.signing_key).as_deref(), Some("sealed:sign:b"));
    let row = st.gudid_by_id(&gudid.gudid_id).must().expect("the GUDID");
    assert_eq!((row.used_at, row.proven_at), (Some(T0 + 10), None));
    assert!(row.awaits_proof(T0 + 30));
    assert_eq!(st.live_bootstrap_hashes(Some("acme-0000"), T0 + 30, Some(T0)).must().len(), 1, "it opens init@SN");
    // A message verified under the first answer's secrets (generation 1) proves nothing: the
    // store holds the second's (2), and the terminal must be able to initialise again.
    assert_eq!(st.credentials("acme-0000").must().map(|c| c.generation), Some(2));
    st.apply_batch(&[Write::ProveGudid { device_id: first, generation: 1, at: T0 + 35 }]).must();
    let row = st.gudid_by_id(&gudid.gudid_id).must().expect("the GUDID");
    assert_eq!((row.used_at, row.proven_at), (Some(T0 + 10), None), "a proof of replaced secrets");
    assert!(row.awaits_proof(T0 + 36));
    // The device's first message under its secrets proves them: spent for good.
    st.apply_batch(&[Write::ProveGudid { device_id: first, generation: 2, at: T0 + 40 }]).must();
    let row = st.gudid_by_id(&gudid.gudid_id).must().expect("the GUDID");
    assert_eq!((row.used_at, row.proven_at), (Some(T0 + 10), Some(T0 + 40)));
    assert!(!row.awaits_proof(T0 + 50));
    assert_eq!(initialise(gudid.id, first, "d", 9, T0 + 50), None, "a proven GUDID");
    assert!(st.live_bootstrap_hashes(Some("acme-0000"), T0 + 50, Some(T0)).must().is_empty(), "init@SN is closed");
    // A proof for a device with no unproven GUDID changes nothing.
    st.apply_batch(&[Write::ProveGudid { device_id: first, generation: 2, at: T0 + 60 }]).must();
    assert_eq!(st.gudid_by_id(&gudid.gudid_id).must().and_then(|g| g.proven_at), Some(T0 + 40));

    // Unproven, but past the window: spent for good.
    let late = st.insert_gudid(&new_gudid(&w, 1, 4)).must();
    assert!(initialise(late.id, second, "e", 5, T0 + 10).is_some());
    let past = T0 + 10 + GUDID_PROOF_WINDOW_MS;
    assert!(!st.gudid_by_id(&late.gudid_id).must().expect("the GUDID").awaits_proof(past));
    assert_eq!(initialise(late.id, second, "f", 7, past), None, "past the proof window");
    assert_eq!(initialise(late.id, second, "g", 7, past - 1).as_deref(), Some("sealed:sign:g"), "just within it");
}

/// A node verifies a device's message under the first answer's secrets while another node
/// answers a newer CreateKey of the same device. Whatever the order, the GUDID is spent for good
/// only if the store still holds the secrets proved; otherwise the device, refused at its next
/// CONNECT, could never initialise again (three terminals of a 19,000 run through three nodes).
fn a_proof_racing_a_newer_answer_never_strands_the_device(s: &Subject) {
    const ROUNDS: usize = 12;
    let st = s.store();
    let w = world(st, "acme", ROUNDS);
    for device in 0..ROUNDS {
        let gudid = st.insert_gudid(&new_gudid(&w, device, 2)).must();
        let device_id = w.devices[device].id;
        let first = NewCredentials { counter: 5, ..new_credentials("a") };
        let outcome =
            st.apply_batch(&[Write::Initialise { gudid_row: gudid.id, device_id, creds: first, at: T0 }]).must();
        assert!(outcome.initialised[0].1.is_some());
        let (answered, _) = std::thread::scope(|scope| {
            let answer = scope.spawn(move || {
                let creds = NewCredentials { counter: 7, ..new_credentials("b") };
                let write = Write::Initialise { gudid_row: gudid.id, device_id, creds, at: T0 + 10 };
                st.apply_batch(&[write]).must().initialised[0].1.is_some()
            });
            let prove = scope.spawn(move || {
                st.apply_batch(&[Write::ProveGudid { device_id, generation: 1, at: T0 + 10 }]).must();
            });
            (answer.join().expect("answering thread"), prove.join().expect("proving thread"))
        });
        let row = st.gudid_by_id(&gudid.gudid_id).must().expect("the GUDID");
        let held = st.credentials(&w.devices[device].sn).must().expect("initialised");
        if answered {
            assert_eq!(held.generation, 2);
            assert_eq!(row.proven_at, None, "round {device}: proven with the first secrets replaced");
        } else {
            assert_eq!((held.generation, row.proven_at), (1, Some(T0 + 10)), "round {device}");
        }
    }
}

fn credentials_exist_only_for_initialised_devices(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    initialise(st, &w, 0);
    initialise(st, &w, 2);
    assert!(st.credentials("acme-0001").must().is_none(), "never initialised");
    let ids = [w.devices[2].id, w.devices[1].id, w.devices[0].id];
    let mut found: Vec<i64> = st.credentials_for(&ids).must().into_iter().map(|c| c.device_id).collect();
    found.sort();
    assert_eq!(found, [w.devices[0].id, w.devices[2].id]);
    let mut hashes = st.all_password_hashes().must();
    hashes.sort();
    assert_eq!(
        hashes,
        [("acme-0000".to_string(), b"acme-0000".to_vec()), ("acme-0002".to_string(), b"acme-0002".to_vec())]
    );
}

// ---------------------------------------------------------------- tasks and executions

fn a_task_persists_one_queued_execution_per_device_with_its_counts(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let other = world(st, "globex", 1);
    let (t, executions) = task(st, &w, &[0, 2]);
    assert_eq!((t.org_id, t.key_source.as_str(), t.slot, t.stopped_at), (w.org.id, "bdk-1", 3, None));
    assert_eq!(t.counts, TaskCounts { total: 2, queued: 2, ..Default::default() });
    assert_eq!(executions.len(), 2);
    let e = &executions[1];
    assert_eq!(
        (e.task_id, e.device_id, e.sn.as_str(), e.state, e.kcv.as_str(), e.deadline, e.delivery_count),
        (t.id, w.devices[2].id, "acme-0002", ExecutionState::Queued, "A00002", T0 + 30 * DAY_MS, 0)
    );
    assert_eq!((e.key_block.as_str(), e.key_id.len(), e.key_source_id), ("B0096P0TE00N00000002", 8, w.source.id));
    assert_eq!(st.execution(e.id).must().sn, "acme-0002");
    // Pages by execution ID, read from the store.
    let page = |offset, limit| -> Vec<i64> {
        st.task_executions_page(t.id, offset, limit).must().into_iter().map(|e| e.id).collect()
    };
    assert_eq!(page(0, None), [executions[0].id, executions[1].id]);
    assert_eq!(page(1, None), [executions[1].id]);
    assert_eq!(page(0, Some(1)), [executions[0].id]);
    assert_eq!(page(1, Some(5)), [executions[1].id]);
    assert!(page(2, Some(5)).is_empty());
    let open: Vec<i64> = st.open_executions().must().into_iter().map(|e| e.id).collect();
    assert_eq!(open, executions.iter().map(|e| e.id).collect::<Vec<_>>());
    let mut devices = st.open_execution_device_ids(w.org.id).must();
    devices.sort();
    assert_eq!(devices, [w.devices[0].id, w.devices[2].id]);
    assert!(st.open_execution_device_ids(other.org.id).must().is_empty());
    let (done, _) = task(st, &w, &[1]);
    st.stop_task(w.org.id, done.id, T0 + 1, &audit("task.stop")).must();
    let ids = |unfinished| -> Vec<i64> {
        st.list_tasks(w.org.id, unfinished, 10, None).must().into_iter().map(|t| t.id).collect()
    };
    assert_eq!(ids(None), [done.id, t.id], "newest first");
    assert_eq!(ids(Some(true)), [t.id]);
    assert_eq!(ids(Some(false)), [done.id]);
    assert_eq!(st.list_tasks(w.org.id, None, 1, None).must().len(), 1);
    assert_eq!(st.list_tasks(w.org.id, None, -1, None).must().len(), 2, "a negative limit is no limit");
    // Numbered per organization: the other organization's first task is its number 1 as well.
    assert_eq!((t.number, done.number), (1, 2));
    let (theirs, _) = task(st, &other, &[0]);
    assert_eq!(theirs.number, 1, "numbers do not count another organization's tasks");
    assert_eq!(st.task_id_by_number(w.org.id, 2).must(), done.id);
    assert_eq!(st.task_id_by_number(other.org.id, 1).must(), theirs.id);
    assert!(matches!(st.task_id_by_number(other.org.id, 2), Err(StoreError::NotFound(_))), "not another's task");
    let after = st.list_tasks(w.org.id, None, 1, Some(done.number)).must();
    assert_eq!(after.iter().map(|t| t.id).collect::<Vec<_>>(), [t.id], "the page below the cursor");
    assert!(st.list_tasks(w.org.id, None, 1, Some(t.number)).must().is_empty());
    assert_eq!(st.task(w.org.id, done.id).must().counts, TaskCounts { total: 1, terminated: 1, ..Default::default() });
}

fn a_repeated_request_id_finds_the_task_and_cannot_create_another(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let other = world(st, "globex", 1);
    let new = NewTask { request_id: Some(42), ..new_task(&w, &[0], T0, T0 + DAY_MS) };
    let (t, _) = st.create_task(&new).must();
    assert_eq!(st.task_by_request_id(w.org.id, 42).must().map(|t| t.id), Some(t.id));
    assert!(st.task_by_request_id(w.org.id, 43).must().is_none());
    conflict(st.create_task(&new));
    assert_eq!(st.list_tasks(w.org.id, None, 10, None).must().len(), 1, "the conflicting task left nothing behind");
    assert_eq!(st.open_executions().must().len(), 1);
    st.create_task(&NewTask { request_id: Some(42), ..new_task(&other, &[0], T0, T0 + DAY_MS) }).must();
}

fn a_devices_open_executions_and_the_still_open_ids_follow_the_endings(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let (_, first) = task(st, &w, &[0, 1]);
    let (_, second) = task(st, &w, &[0]);
    let open_of = |device: usize| -> Vec<i64> {
        st.open_executions_for_device(w.devices[device].id).must().into_iter().map(|e| e.id).collect()
    };
    assert_eq!(open_of(0), [first[0].id, second[0].id]);
    assert_eq!(open_of(1), [first[1].id]);
    st.apply_batch(&[Write::End(ending(first[0].id, ExecutionState::Succeeded, T0))]).must();
    assert_eq!(open_of(0), [second[0].id]);
    let mut open = st.still_open(&[second[0].id, first[0].id, first[1].id, first[1].id + 1_000]).must();
    open.sort();
    assert_eq!(open, [first[1].id, second[0].id], "ended and unknown ids are not open");
    assert!(st.still_open(&[]).must().is_empty());
}

fn delivered_writes_count_deliveries_and_keep_the_first_time(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let (_, executions) = task(st, &w, &[0]);
    let id = executions[0].id;
    st.apply_batch(&[
        Write::Delivered { execution_id: id, at: T0 + 5 },
        Write::Delivered { execution_id: id, at: T0 + 9 },
    ])
    .must();
    st.apply_batch(&[Write::Delivered { execution_id: id, at: T0 + 20 }]).must();
    let e = st.execution(id).must();
    assert_eq!((e.state, e.delivered_at, e.delivery_count), (ExecutionState::Delivered, Some(T0 + 5), 3));
    st.apply_batch(&[Write::End(ending(id, ExecutionState::Failed, T0 + 30))]).must();
    st.apply_batch(&[Write::Delivered { execution_id: id, at: T0 + 40 }]).must();
    let e = st.execution(id).must();
    assert_eq!((e.state, e.delivery_count), (ExecutionState::Failed, 3), "an ended execution is not delivered again");
}

fn an_ending_counts_the_sends_it_carries_as_delivered_writes_would(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let (_, executions) = task(st, &w, &[0, 1, 2]);
    let (fresh, written, closed) = (executions[0].id, executions[1].id, executions[2].id);
    let sends = |first: i64, last: i64, count: u32| Some(Sends { first_at: T0 + first, last_at: T0 + last, count });
    // A queued execution acked before its send was written: the ending writes the send.
    st.apply_batch(&[Write::End(Ending { sends: sends(5, 5, 1), ..ending(fresh, ExecutionState::Succeeded, T0 + 8) })])
        .must();
    let e = st.execution(fresh).must();
    assert_eq!((e.state, e.delivered_at, e.delivery_count), (ExecutionState::Succeeded, Some(T0 + 5), 1));
    // A send already written, two more carried: the first time stays, the counts add up.
    st.apply_batch(&[Write::Delivered { execution_id: written, at: T0 + 2 }]).must();
    st.apply_batch(&[Write::End(Ending {
        sends: sends(10, 12, 2),
        ..ending(written, ExecutionState::Failed, T0 + 20)
    })])
    .must();
    let e = st.execution(written).must();
    assert_eq!((e.state, e.delivered_at, e.delivery_count), (ExecutionState::Failed, Some(T0 + 2), 3));
    // An ending that is skipped skips its sends, as `Delivered` after the end would be skipped.
    st.apply_batch(&[Write::End(ending(closed, ExecutionState::Terminated, T0 + 30))]).must();
    let outcome = st
        .apply_batch(&[Write::End(Ending {
            sends: sends(31, 31, 1),
            ..ending(closed, ExecutionState::Succeeded, T0 + 32)
        })])
        .must();
    assert!(outcome.ended.is_empty());
    let e = st.execution(closed).must();
    assert_eq!((e.state, e.delivered_at, e.delivery_count), (ExecutionState::Terminated, None, 0));
}

fn a_successful_ending_writes_one_record_and_locks_the_device(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let (t, executions) = task(st, &w, &[0, 1]);
    let outcome = st
        .apply_batch(&[
            Write::Counter { device_id: w.devices[0].id, counter: 17 },
            Write::End(ending(executions[0].id, ExecutionState::Succeeded, T0 + 100)),
        ])
        .must();
    assert_eq!(outcome.ended, [(executions[0].id, ExecutionState::Succeeded)]);
    let e = st.execution(executions[0].id).must();
    assert_eq!((e.state, e.ended_at, e.result), (ExecutionState::Succeeded, Some(T0 + 100), Some(0)));
    assert!(st.device_by_id(w.devices[0].id).must().locked);
    assert!(!st.device_by_id(w.devices[1].id).must().locked, "only the acking device is locked");
    let records = all_records(st, w.org.id);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r.execution_id, r.task_id, r.sn.as_str(), r.key_source.as_str(), r.key_type.as_str()),
        (executions[0].id, t.id, "acme-0000", "bdk-1", "IPEK")
    );
    assert_eq!(
        (r.injection.as_str(), r.result.as_str(), r.error_code, r.at, r.key_id.as_str(), r.kcv.as_str()),
        ("auto", "succeeded", None, T0 + 100, "FFFF987654000000", "A00000")
    );
    assert_eq!(st.count_records_for_execution(executions[0].id).must(), 1);
    assert_eq!(
        st.task(w.org.id, t.id).must().counts,
        TaskCounts { total: 2, queued: 1, succeeded: 1, ..Default::default() }
    );
}

fn a_failed_ending_records_the_error_code_and_no_kcv(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let (_, executions) = task(st, &w, &[0]);
    let outcome = st.apply_batch(&[Write::End(ending(executions[0].id, ExecutionState::Failed, T0 + 7))]).must();
    assert_eq!(outcome.ended, [(executions[0].id, ExecutionState::Failed)]);
    let r = &all_records(st, w.org.id)[0];
    assert_eq!((r.result.as_str(), r.error_code, r.kcv.as_str()), ("failed", Some(-11208), ""));
    assert!(!st.device_by_id(w.devices[0].id).must().locked);
}

fn a_second_ending_of_one_execution_is_skipped_and_not_reported(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let (_, executions) = task(st, &w, &[0, 1]);
    let (first, second) = (executions[0].id, executions[1].id);
    let outcome = st
        .apply_batch(&[
            Write::End(ending(first, ExecutionState::Succeeded, T0 + 1)),
            Write::End(ending(second, ExecutionState::Failed, T0 + 2)),
            Write::End(ending(first, ExecutionState::Failed, T0 + 3)),
        ])
        .must();
    assert_eq!(outcome.ended, [(first, ExecutionState::Succeeded), (second, ExecutionState::Failed)]);
    let outcome = st.apply_batch(&[Write::End(ending(second, ExecutionState::Succeeded, T0 + 4))]).must();
    assert!(outcome.ended.is_empty(), "a later batch ends nothing either");
    assert_eq!(st.execution(first).must().state, ExecutionState::Succeeded, "the first ending stands");
    assert_eq!(st.execution(second).must().state, ExecutionState::Failed);
    assert_eq!(all_records(st, w.org.id).len(), 2, "one record per execution");
    let outcome = st.apply_batch(&[Write::End(ending(first + 1_000, ExecutionState::Succeeded, T0))]).must();
    assert!(outcome.ended.is_empty(), "an unknown execution ends nothing");
}

fn two_batches_ending_one_execution_at_once_record_it_once(s: &Subject) {
    const EXECUTIONS: usize = 40;
    let st = s.store();
    let w = world(st, "acme", EXECUTIONS);
    let (_, executions) = task(st, &w, &(0..EXECUTIONS).collect::<Vec<_>>());
    // Two nodes received the same acks (a duplicate delivery); each commits its batch, the
    // second in reverse order.
    let forward: Vec<Write> =
        executions.iter().map(|e| Write::End(ending(e.id, ExecutionState::Succeeded, T0 + 1))).collect();
    let backward: Vec<Write> =
        executions.iter().rev().map(|e| Write::End(ending(e.id, ExecutionState::Failed, T0 + 2))).collect();
    let outcomes: Vec<BatchOutcome> = std::thread::scope(|scope| {
        let a = scope.spawn(|| st.apply_batch(&forward).must());
        let b = scope.spawn(|| st.apply_batch(&backward).must());
        vec![a.join().expect("first node"), b.join().expect("second node")]
    });
    let reported: Vec<i64> = outcomes.iter().flat_map(|o| o.ended.iter().map(|(id, _)| *id)).collect();
    assert_eq!(reported.len(), EXECUTIONS, "each ending reported by one batch only");
    assert_eq!(reported.iter().collect::<HashSet<_>>().len(), EXECUTIONS);
    assert_eq!(all_records(st, w.org.id).len(), EXECUTIONS);
    for e in &executions {
        assert_eq!(st.count_records_for_execution(e.id).must(), 1);
    }
}

fn an_initialise_write_spends_its_gudid_once_within_a_batch(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let gudid = st.insert_gudid(&new_gudid(&w, 0, 3)).must();
    let device_id = w.devices[0].id;
    let outcome = st
        .apply_batch(&[
            Write::Initialise { gudid_row: gudid.id, device_id, creds: new_credentials("one"), at: T0 + 1 },
            Write::Counter { device_id, counter: 99 },
            Write::Initialise { gudid_row: gudid.id, device_id, creds: new_credentials("two"), at: T0 + 2 },
        ])
        .must();
    assert_eq!(outcome.initialised.len(), 2);
    let (row, installed) = &outcome.initialised[0];
    let installed = installed.as_ref().expect("the first initialisation installs");
    assert_eq!((*row, installed.signing_key.as_str(), installed.last_counter), (gudid.id, "sealed:sign:one", 1));
    assert_eq!(outcome.initialised[1].0, gudid.id);
    assert!(outcome.initialised[1].1.is_none(), "the second finds the GUDID spent");
    let now = st.credentials("acme-0000").must().expect("initialised");
    assert_eq!((now.signing_key.as_str(), now.last_counter, now.generation), ("sealed:sign:one", 99, 1));
}

/// An ack queues its counter, then its ending: the counter is durable in the same batch whether
/// the ending locks the device, fails without locking it, or is skipped (the execution was no
/// longer open); a lower counter never lowers it; an ack of another device in between changes
/// nothing of this one's.
fn an_acks_counter_is_durable_with_its_ending_whether_or_not_the_ending_applies(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let (_, executions) = task(st, &w, &[0, 1, 2]);
    for d in 0..3 {
        initialise(st, &w, d);
    }
    let (d0, d1, d2) = (w.devices[0].id, w.devices[1].id, w.devices[2].id);
    let counter = |d: i64| st.credentials_for(&[d]).must()[0].last_counter;
    let outcome = st
        .apply_batch(&[
            Write::Counter { device_id: d0, counter: 40 },
            Write::Counter { device_id: d1, counter: 7 },
            Write::End(ending(executions[0].id, ExecutionState::Succeeded, T0 + 2)),
            Write::Counter { device_id: d2, counter: 12 },
            Write::End(ending(executions[2].id, ExecutionState::Failed, T0 + 3)),
            Write::End(ending(executions[1].id, ExecutionState::Succeeded, T0 + 4)),
            // A later, lower counter of device 0 in the same batch lowers nothing.
            Write::Counter { device_id: d0, counter: 39 },
        ])
        .must();
    assert_eq!(outcome.ended.len(), 3);
    assert_eq!((counter(d0), counter(d1), counter(d2)), (40, 7, 12));
    let locked = |d: i64| st.device_by_id(d).must().locked;
    assert_eq!((locked(d0), locked(d1), locked(d2)), (true, true, false));
    // Ended already: the ending is skipped, its counter is still written.
    let outcome = st
        .apply_batch(&[
            Write::Counter { device_id: d0, counter: 41 },
            Write::End(ending(executions[0].id, ExecutionState::Succeeded, T0 + 5)),
        ])
        .must();
    assert!(outcome.ended.is_empty());
    assert_eq!(counter(d0), 41);
}

fn device_writes_of_a_batch_take_effect_in_batch_order(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let (_, executions) = task(st, &w, &[0, 1]);
    let (d0, d1) = (w.devices[0].id, w.devices[1].id);
    st.set_unlock_pending(d1, true, None).must();
    st.apply_batch(&[
        // Device 0: hello, delivered, success (locks), then a later hello saying it is unlocked.
        Write::Counter { device_id: d0, counter: 5 },
        Write::Report(report(d0, false, T0 + 1)),
        Write::Delivered { execution_id: executions[0].id, at: T0 + 1 },
        Write::Counter { device_id: d0, counter: 3 },
        Write::End(ending(executions[0].id, ExecutionState::Succeeded, T0 + 2)),
        Write::Seen { device_id: d0, at: T0 + 3 },
        Write::Report(report(d0, false, T0 + 4)),
        // Device 1: a report, then `Seen` overrides its time; it still says locked, so the
        // pending unlock stays.
        Write::Report(report(d1, true, T0 + 10)),
        Write::Seen { device_id: d1, at: T0 + 11 },
    ])
    .must();
    let zero = st.device_by_id(d0).must();
    assert_eq!((zero.locked, zero.last_seen), (false, Some(T0 + 4)), "the last report wins over the lock before it");
    assert_eq!(st.credentials_for(&[d0]).must().len(), 0, "not initialised: no credentials");
    let one = st.device_by_id(d1).must();
    assert_eq!((one.locked, one.last_seen, one.unlock_pending), (true, Some(T0 + 11), true));
    assert_eq!(
        (one.rom_version.as_deref(), one.slots_json.as_str()),
        (Some("PayDroid_7.1.2"), "[{\"slot\":3,\"at\":1700000000010}]")
    );
    let e = st.execution(executions[0].id).must();
    assert_eq!((e.state, e.delivery_count, e.delivered_at), (ExecutionState::Succeeded, 1, Some(T0 + 1)));
    st.apply_batch(&[
        Write::Report(report(d0, true, T0 + 20)),
        Write::Seen { device_id: d0, at: T0 + 19 },
        Write::Report(report(d1, false, T0 + 21)),
    ])
    .must();
    assert_eq!(st.device_by_id(d0).must().last_seen, Some(T0 + 19), "Seen after the report wins");
    assert!(!st.device_by_id(d1).must().unlock_pending, "reported unlocked: the pending unlock is done");
}

fn rewrap_replaces_the_key_block_of_open_executions_only(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let (_, executions) = task(st, &w, &[0, 1]);
    st.apply_batch(&[Write::End(ending(executions[1].id, ExecutionState::Failed, T0))]).must();
    st.rewrap_execution(executions[0].id, "B0096-rewrapped", 2).must();
    st.rewrap_execution(executions[1].id, "B0096-rewrapped", 2).must();
    let open = st.execution(executions[0].id).must();
    assert_eq!((open.key_block.as_str(), open.generation), ("B0096-rewrapped", 2));
    let ended = st.execution(executions[1].id).must();
    assert_eq!((ended.key_block.as_str(), ended.generation), ("B0096P0TE00N00000001", 1));
}

fn stopping_a_task_terminates_its_open_executions_with_records_once(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let (t, executions) = task(st, &w, &[0, 1, 2]);
    let (kept, _) = task(st, &w, &[0]);
    st.apply_batch(&[
        Write::Delivered { execution_id: executions[1].id, at: T0 + 1 },
        Write::End(ending(executions[2].id, ExecutionState::Succeeded, T0 + 2)),
    ])
    .must();
    let mut stopped = st.stop_task(w.org.id, t.id, T0 + 10, &audit("task.stop")).must();
    stopped.sort();
    assert_eq!(stopped, [executions[0].id, executions[1].id], "the open ones, queued and delivered");
    for e in &executions[..2] {
        let e = st.execution(e.id).must();
        assert_eq!((e.state, e.ended_at), (ExecutionState::Terminated, Some(T0 + 10)));
    }
    let row = st.task(w.org.id, t.id).must();
    assert_eq!(row.stopped_at, Some(T0 + 10));
    assert_eq!(row.counts, TaskCounts { total: 3, succeeded: 1, terminated: 2, ..Default::default() });
    let terminated: Vec<(i64, String, String)> = all_records(st, w.org.id)
        .into_iter()
        .filter(|r| r.result == "terminated")
        .map(|r| (r.execution_id, r.injection, r.kcv))
        .collect();
    assert_eq!(terminated.len(), 2);
    assert!(terminated.iter().all(|(_, injection, kcv)| injection == "auto" && kcv.is_empty()));
    assert!(st.stop_task(w.org.id, t.id, T0 + 20, &audit("task.stop")).must().is_empty(), "a second stop ends nothing");
    assert_eq!(st.task(w.org.id, t.id).must().stopped_at, Some(T0 + 10), "and keeps the first stop time");
    assert_eq!(all_records(st, w.org.id).len(), 3);
    assert_eq!(st.task(w.org.id, kept.id).must().counts.open(), 1, "another task is untouched");
}

fn expiry_ends_only_the_executions_past_their_deadline(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 4);
    let (_, soon) = st.create_task(&new_task(&w, &[0, 1, 2], T0, T0 + DAY_MS)).must();
    let (_, later) = st.create_task(&new_task(&w, &[3], T0, T0 + 2 * DAY_MS)).must();
    st.apply_batch(&[
        Write::Delivered { execution_id: soon[1].id, at: T0 + 1 },
        Write::End(ending(soon[2].id, ExecutionState::Succeeded, T0 + 2)),
    ])
    .must();
    assert!(st.expire_due(T0 + DAY_MS - 1).must().is_empty(), "nothing is due a millisecond early");
    let expired = st.expire_due(T0 + DAY_MS).must();
    assert_eq!(expired, [(soon[0].id, w.org.id), (soon[1].id, w.org.id)], "queued and delivered, at the deadline");
    let e = st.execution(soon[1].id).must();
    assert_eq!((e.state, e.ended_at, e.result), (ExecutionState::Expired, Some(T0 + DAY_MS), None));
    assert_eq!(st.execution(later[0].id).must().state, ExecutionState::Queued);
    assert_eq!(st.execution(soon[2].id).must().state, ExecutionState::Succeeded);
    let expired_records = all_records(st, w.org.id).into_iter().filter(|r| r.result == "expired").count();
    assert_eq!(expired_records, 2);
    assert!(st.expire_due(T0 + DAY_MS + 1).must().is_empty(), "expired once");
}

fn two_concurrent_expiry_sweeps_expire_each_execution_once(s: &Subject) {
    const DEVICES: usize = 200;
    const SWEEPS_PER_NODE: usize = 5;
    let st = s.store();
    let w = world(st, "acme", DEVICES);
    let (_, executions) = st.create_task(&new_task(&w, &(0..DEVICES).collect::<Vec<_>>(), T0, T0 + DAY_MS)).must();
    let swept: Vec<(i64, i64)> = std::thread::scope(|scope| {
        let nodes: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| (0..SWEEPS_PER_NODE).flat_map(|_| st.expire_due(T0 + DAY_MS).must()).collect::<Vec<_>>())
            })
            .collect();
        nodes.into_iter().flat_map(|n| n.join().expect("sweeping node")).collect()
    });
    assert_eq!(swept.len(), DEVICES, "every execution reported expired by exactly one sweep");
    assert_eq!(swept.iter().map(|(id, _)| id).collect::<HashSet<_>>().len(), DEVICES);
    assert_eq!(all_records(st, w.org.id).len(), DEVICES);
    assert!(executions.iter().all(|e| st.count_records_for_execution(e.id).must() == 1));
}

// ---------------------------------------------------------------- records, metrics, audit

fn records_are_filtered_by_sn_and_task_and_billed_per_source_and_month(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let other = world(st, "globex", 1);
    let second = st
        .insert_key_source(&KeySourceRow { name: "bdk-0".into(), ..w.source.clone() }, &audit("key_source.authorize"))
        .must();
    let (t1, e1) = task(st, &w, &[0, 1, 2]);
    let (t2, e2) =
        st.create_task(&NewTask { key_source_id: second.id, ..new_task(&w, &[0], T0, T0 + 90 * DAY_MS) }).must();
    let (_, e3) = task(st, &other, &[0]);
    let december = T0 + 20 * DAY_MS; // 2023-12-04
    st.apply_batch(&[
        Write::End(ending(e1[0].id, ExecutionState::Succeeded, T0 + 1)),
        Write::End(ending(e1[1].id, ExecutionState::Succeeded, december)),
        Write::End(ending(e1[2].id, ExecutionState::Failed, T0 + 3)),
        Write::End(ending(e2[0].id, ExecutionState::Succeeded, T0 + 4)),
        Write::End(ending(e3[0].id, ExecutionState::Succeeded, T0 + 5)),
    ])
    .must();
    let ids = |f: RecordFilter| -> Vec<i64> {
        st.list_records(w.org.id, &f).must().into_iter().map(|r| r.execution_id).collect()
    };
    assert_eq!(
        ids(RecordFilter::default()),
        [e2[0].id, e1[2].id, e1[1].id, e1[0].id],
        "newest first, own organization"
    );
    assert_eq!(ids(RecordFilter { sn: Some("acme-0000".into()), ..Default::default() }), [e2[0].id, e1[0].id]);
    assert_eq!(
        ids(RecordFilter { task_id: Some(t1.id), limit: 2, offset: 1, ..Default::default() }),
        [e1[1].id, e1[0].id]
    );
    assert_eq!(ids(RecordFilter { task_id: Some(t2.id), ..Default::default() }), [e2[0].id]);
    // Keyset pages, newest first: everything older than the last record of the previous page.
    let first_page = st.list_records(w.org.id, &RecordFilter { limit: 2, ..Default::default() }).must();
    assert_eq!(first_page.iter().map(|r| r.execution_id).collect::<Vec<_>>(), [e2[0].id, e1[2].id]);
    let cursor = first_page.last().map(|r| r.id);
    assert_eq!(
        ids(RecordFilter { before_id: cursor, limit: 2, ..Default::default() }),
        [e1[1].id, e1[0].id],
        "the next page"
    );
    let billing: Vec<(String, String, i64)> =
        st.billing(w.org.id).must().into_iter().map(|b| (b.key_source, b.month, b.keys)).collect();
    assert_eq!(
        billing,
        [
            ("bdk-0".to_string(), "2023-11".to_string(), 1),
            ("bdk-1".to_string(), "2023-11".to_string(), 1),
            ("bdk-1".to_string(), "2023-12".to_string(), 1),
        ]
    );
}

fn execution_state_counts_and_expiring_within_count_open_executions(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let (_, e) = st.create_task(&new_task(&w, &[0, 1, 2], T0, T0 + DAY_MS)).must();
    st.apply_batch(&[
        Write::Delivered { execution_id: e[0].id, at: T0 },
        Write::End(ending(e[1].id, ExecutionState::Succeeded, T0)),
    ])
    .must();
    let mut counts: Vec<(i64, &str, i64)> =
        st.execution_state_counts().must().into_iter().map(|(org, state, n)| (org, state.as_str(), n)).collect();
    counts.sort();
    assert_eq!(counts, [(w.org.id, "delivered", 1), (w.org.id, "queued", 1), (w.org.id, "succeeded", 1)]);
    assert_eq!(st.expiring_within(T0, DAY_MS - 1).must(), 0);
    assert_eq!(st.expiring_within(T0, DAY_MS).must(), 2, "the open ones only");
}

fn each_action_writes_its_audit_entry_in_its_own_transaction(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let count = || st.list_audit(None, 1000, None).must().len();
    let before = count();
    let ops = Actor { label: "ops".into(), token_id: Some(7) };
    let created = Audit::new(&ops, Some(w.org.id), "group.create", "group:g1", serde_json::json!({}), T0);
    let group = st.create_group(w.org.id, "g1", "", &created).must();
    assert_eq!(count(), before + 1);
    // A refused action writes no entry: the entry is part of the action.
    assert!(matches!(st.create_group(w.org.id, "g1", "", &created), Err(StoreError::Conflict(_))));
    assert!(matches!(st.stop_task(w.org.id, 999_999, T0, &audit("task.stop")), Err(StoreError::NotFound(_))));
    assert_eq!(count(), before + 1);
    // What only the transaction knows is in the entry's details.
    let ids: Vec<i64> = w.devices.iter().map(|d| d.id).collect();
    let adding = Audit::new(&ops, Some(w.org.id), "group.add_devices", "group:g1", serde_json::json!({"sns": 2}), T0);
    assert_eq!(st.add_group_members(group.id, &ids, &adding).must(), 2);
    let newest = &st.list_audit(None, 1, None).must()[0];
    assert_eq!((newest.action.as_str(), newest.object.as_str()), ("group.add_devices", "group:g1"));
    assert_eq!((newest.actor.as_str(), newest.token_id, newest.org_id), ("ops", Some(7), Some(w.org.id)));
    assert_eq!(newest.details, serde_json::json!({"sns": 2, "added": 2}));
}

fn the_audit_log_is_newest_first_per_organization_and_refuses_change(s: &Subject) {
    let st = s.store();
    let acme = st.create_org("acme", T0, &audit("org.create")).must();
    let entry = |org_id, action: &str| AuditEntry {
        id: 0,
        at: T0,
        org_id,
        actor: "ops".into(),
        token_id: Some(1),
        action: action.into(),
        object: "device acme-0000".into(),
        details: serde_json::json!({ "reason": action, "n": 3 }),
    };
    st.append_audit(&entry(Some(acme.id), "import")).must();
    st.append_audit(&entry(None, "org.create")).must();
    st.append_audit(&entry(Some(acme.id), "assign")).must();
    let actions =
        |org, limit| -> Vec<String> { st.list_audit(org, limit, None).must().into_iter().map(|e| e.action).collect() };
    // The organization's creation wrote its own entry, in its transaction, first.
    assert_eq!(actions(Some(acme.id), 10), ["assign", "import", "org.create"]);
    assert_eq!(actions(None, 10), ["assign", "org.create", "import", "org.create"]);
    assert_eq!(actions(None, 1), ["assign"]);
    let newest = &st.list_audit(None, 1, None).must()[0];
    let older: Vec<String> = st.list_audit(None, 10, Some(newest.id)).must().into_iter().map(|e| e.action).collect();
    assert_eq!(older, ["org.create", "import", "org.create"], "the page below the cursor");
    assert_eq!(newest.details, serde_json::json!({ "reason": "assign", "n": 3 }));
    let refused = s.raw_execute("UPDATE audit SET actor = 'intruder'").expect_err("UPDATE of the audit log is refused");
    assert!(refused.contains("audit log is append-only"), "{refused}");
    let refused = s.raw_execute("DELETE FROM audit").expect_err("DELETE from the audit log is refused");
    assert!(refused.contains("audit log is append-only"), "{refused}");
    assert_eq!(st.list_audit(None, 10, None).must().len(), 4);
}

fn records_refuse_update_and_delete(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let (_, e) = task(st, &w, &[0]);
    st.apply_batch(&[Write::End(ending(e[0].id, ExecutionState::Succeeded, T0))]).must();
    let refused = s.raw_execute("UPDATE records SET result = 'failed'").expect_err("UPDATE of records is refused");
    assert!(refused.contains("records are permanent"), "{refused}");
    let refused = s.raw_execute("DELETE FROM records").expect_err("DELETE of records is refused");
    assert!(refused.contains("records are permanent"), "{refused}");
    assert_eq!(all_records(st, w.org.id)[0].result, "succeeded");
}

/// A stored value this build cannot read (a hand edit, a newer gateway's value, a bad restore) is
/// corruption: the read fails with a backend error naming the column, and never yields a default
/// (an admin role, empty details, an uncounted execution). Each case corrupts one column behind
/// the store's back, then puts it back (the append-only audit log cannot be, so it comes last).
fn a_stored_value_that_does_not_parse_fails_the_read_naming_its_column(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    let (t, executions) = task(st, &w, &[0]);
    st.insert_token(Some(w.org.id), Role::Admin, "ops", b"hash-ops", T0, &audit("token.create")).must();
    let kek = KekRow {
        id: 0,
        org_id: w.org.id,
        name: "zmk".into(),
        algorithm: "tdes2".into(),
        kcv: "123456".into(),
        sealed: "sealed:zmk".into(),
        created_at: T0,
    };
    st.insert_kek(&kek, &audit("kek.create")).must();
    type Read<'a> = Box<dyn Fn() -> StoreResult<()> + 'a>;
    let cases: Vec<(&str, Option<&str>, &str, Vec<Read<'_>>)> = vec![
        (
            "UPDATE tokens SET role = 'superuser'",
            Some("UPDATE tokens SET role = 'admin'"),
            "role",
            vec![Box::new(|| st.token_by_hash(b"hash-ops").map(drop))],
        ),
        (
            "UPDATE key_sources SET algorithm = 'rot13'",
            Some("UPDATE key_sources SET algorithm = 'tdes2'"),
            "algorithm",
            vec![Box::new(|| st.key_source(w.org.id, w.source.id).map(drop))],
        ),
        (
            "UPDATE keks SET algorithm = 'rot13'",
            Some("UPDATE keks SET algorithm = 'tdes2'"),
            "algorithm",
            vec![Box::new(|| st.list_keks(None).map(drop))],
        ),
        (
            "UPDATE devices SET slots = '[{'",
            Some("UPDATE devices SET slots = '[]'"),
            "slots",
            vec![Box::new(|| st.device(w.org.id, &w.devices[0].sn).map(drop))],
        ),
        (
            "UPDATE executions SET state = 'lost'",
            Some("UPDATE executions SET state = 'queued'"),
            "state",
            vec![
                Box::new(|| st.execution(executions[0].id).map(drop)),
                Box::new(|| st.task(w.org.id, t.id).map(drop)),
                Box::new(|| st.execution_state_counts().map(drop)),
            ],
        ),
        (
            "UPDATE tasks SET key_type = 'SESAME'",
            Some("UPDATE tasks SET key_type = 'IPEK'"),
            "key_type",
            vec![
                Box::new(|| st.list_tasks(w.org.id, None, 10, None).map(drop)),
                Box::new(|| st.open_executions().map(drop)),
            ],
        ),
        (
            "INSERT INTO audit (at, org_id, actor, token_id, action, object, details)
             VALUES (1, NULL, 'intruder', NULL, 'x', 'y', '{not json')",
            None,
            "details",
            vec![Box::new(|| st.list_audit(None, 100, None).map(drop))],
        ),
    ];
    for (corrupt, undo, column, reads) in cases {
        for read in &reads {
            read().unwrap_or_else(|e| panic!("before `{corrupt}`: {e}"));
        }
        s.raw_execute(corrupt).unwrap_or_else(|e| panic!("{corrupt}: {e}"));
        for read in &reads {
            match read() {
                Err(StoreError::Backend(message)) => {
                    assert!(message.contains(&format!("column {column}: cannot parse")), "after `{corrupt}`: {message}")
                }
                other => panic!("after `{corrupt}`: expected a backend error naming {column}, got {other:?}"),
            }
        }
        if let Some(undo) = undo {
            s.raw_execute(undo).unwrap_or_else(|e| panic!("{undo}: {e}"));
            for read in &reads {
                read().unwrap_or_else(|e| panic!("after `{undo}`: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------- migrations and inherent methods

fn migrations_run_once_and_reopening_keeps_everything(s: &Subject) {
    const MIGRATIONS: i64 = PostgresStore::SCHEMA_VERSION as i64;
    assert_eq!(s.opened.schema_version().must(), MIGRATIONS);
    let w = world(s.store(), "acme", 2);
    let again = s.reopen().must();
    let twice = s.reopen().must();
    for opened in [&again, &twice] {
        assert_eq!(opened.schema_version().must(), MIGRATIONS);
        assert_eq!(opened.store().count_devices(w.org.id).must(), 2);
    }
    twice.store().create_org("globex", T0, &audit("org.create")).must();
    assert_eq!(s.store().list_orgs().must().len(), 2, "one database behind every handle");
}

fn meta_values_are_set_and_replaced(s: &Subject) {
    assert_eq!(s.opened.meta("master_key_kcv").must(), None);
    s.opened.set_meta("master_key_kcv", "AAAAAA").must();
    s.opened.set_meta("master_key_kcv", "BBBBBB").must();
    assert_eq!(s.opened.meta("master_key_kcv").must().as_deref(), Some("BBBBBB"));
}

fn marks_only_go_up_and_two_threads_raising_one_keep_the_highest(s: &Subject) {
    let st = s.store();
    assert_eq!(st.mark(MARK_DOWN_COUNTER).must(), None);
    assert_eq!(st.raise_mark(MARK_DOWN_COUNTER, 1_700_000_000_000_000).must(), 1_700_000_000_000_000);
    assert_eq!(st.raise_mark(MARK_DOWN_COUNTER, 5).must(), 1_700_000_000_000_000, "a mark never goes down");
    assert_eq!(st.mark(MARK_DOWN_COUNTER).must(), Some(1_700_000_000_000_000));
    assert_eq!(st.mark(MARK_CLOCK_FLOOR_MS).must(), None, "marks are independent");
    std::thread::scope(|scope| {
        for t in 0..2i64 {
            scope.spawn(move || {
                for i in 0..50i64 {
                    st.raise_mark(MARK_CLOCK_FLOOR_MS, 1000 + i * 2 + t).must();
                }
            });
        }
    });
    assert_eq!(st.mark(MARK_CLOCK_FLOOR_MS).must(), Some(1000 + 49 * 2 + 1));
}

fn reseal_all_reseals_every_key_or_none(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    initialise(st, &w, 1);
    let failed = s.opened.reseal_all(
        |sealed| if sealed.contains("tdes") { Err("bad block".into()) } else { Ok(format!("new:{sealed}")) },
        "NEWKCV",
    );
    assert!(matches!(failed, Err(StoreError::Invalid(_))), "{failed:?}");
    assert_eq!(st.key_source(w.org.id, w.source.id).must().sealed, "sealed:bdk-1", "nothing re-sealed");
    assert_eq!(s.opened.meta("master_key_kcv").must(), None);
    let count = s.opened.reseal_all(|sealed| Ok(format!("new:{sealed}")), "NEWKCV").must();
    assert_eq!(count, 1 + 1 + 3, "one BDK, the GUDID's MAC key and one initialised device's three keys");
    let gudid = st.list_gudids(w.org.id, &GudidFilter::default()).must().remove(0);
    assert_eq!(gudid.sealed_mac_key, "new:sealed:gudid:192:1", "the GUDID's MAC key is re-sealed too");
    assert_eq!(st.key_source(w.org.id, w.source.id).must().sealed, "new:sealed:bdk-1");
    let creds = st.credentials("acme-0001").must().expect("initialised");
    assert_eq!(
        (creds.signing_key.as_str(), creds.kbpk_aes.as_str(), creds.kbpk_tdes.as_str()),
        ("new:sealed:sign:acme-0001", "new:sealed:aes:acme-0001", "new:sealed:tdes:acme-0001")
    );
    assert_eq!(s.opened.meta("master_key_kcv").must().as_deref(), Some("NEWKCV"));
}

// ---------------------------------------------------------------- GUDID custody and revocation

const HOUR_MS: Millis = 3_600_000;

fn ops() -> Actor {
    Actor { label: "ops".into(), token_id: Some(7) }
}

/// A GUDID as the engine hands it to the store: hashes and a sealed key only.
fn fresh(sn: &str, tag: u8) -> NewGudid {
    NewGudid {
        sn: sn.to_string(),
        gudid_id: [sn.as_bytes(), &[tag]].concat(),
        sealed_mac_key: format!("sealed:gudid:{sn}:{tag}"),
        bootstrap_hash: format!("$7$101$salt{tag}$hash-{sn}"),
        expires_at: T0 + 72 * HOUR_MS,
    }
}

fn gudid_entries(st: &dyn Store, org_id: i64) -> Vec<AuditEntry> {
    let mut entries: Vec<AuditEntry> =
        st.list_audit(Some(org_id), 100, None).must().into_iter().filter(|e| e.action.starts_with("gudid.")).collect();
    entries.reverse();
    entries
}

fn provisioning_is_all_or_nothing_and_audited_in_its_transaction(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let other = world(st, "globex", 1);
    // Two of the organization's SNs, one unknown and one of another organization: nothing at all.
    let batch = [fresh("acme-0000", 1), fresh("acme-0001", 1), fresh("nope", 1), fresh("globex-0000", 1)];
    let audited_before = st.list_audit(None, 100, None).must().len();
    match st.provision_gudids(w.org.id, &batch, T0, &ops()) {
        Err(StoreError::NotFound(message)) => {
            assert!(message.contains("2 unknown device(s): nope, globex-0000"), "{message}")
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(st.list_gudids(w.org.id, &GudidFilter::default()).must().is_empty(), "a GUDID was stored");
    assert!(st.gudid_by_id(&batch[0].gudid_id).must().is_none());
    assert!(st.live_bootstrap_hashes(None, T0, None).must().is_empty());
    assert_eq!(st.list_audit(None, 100, None).must().len(), audited_before, "a refused provisioning was audited");
    assert!(st.list_gudids(other.org.id, &GudidFilter::default()).must().is_empty());

    let done = st.provision_gudids(w.org.id, &batch[..2], T0, &ops()).must();
    assert_eq!(done.iter().map(|p| p.row.sn.as_str()).collect::<Vec<_>>(), ["acme-0000", "acme-0001"]);
    assert!(done.iter().all(|p| p.revoked.is_empty()));
    let found = st.gudid_by_id(&batch[1].gudid_id).must().expect("stored");
    assert_eq!(
        (found.id, found.device_id, found.sealed_mac_key.as_str(), found.provisioned_by.as_str()),
        (done[1].row.id, w.devices[1].id, "sealed:gudid:acme-0001:1", "ops")
    );
    assert_eq!(found.bootstrap_hash.as_deref(), Some("$7$101$salt1$hash-acme-0001"));
    assert_eq!((found.expires_at, found.used_at, found.revoked_at), (T0 + 72 * HOUR_MS, None, None));
    let entries = gudid_entries(st, w.org.id);
    assert_eq!(entries.len(), 2, "{entries:?}");
    for (entry, p) in entries.iter().zip(&done) {
        assert_eq!(
            (entry.action.as_str(), entry.object.clone(), entry.actor.as_str(), entry.token_id, entry.at),
            ("gudid.provision", format!("device:{}", p.row.sn), "ops", Some(7), T0)
        );
        assert_eq!(entry.details["gudid"], p.row.id, "{entry:?}");
        assert_eq!(entry.details["revoked"], serde_json::json!([]));
    }
}

fn a_new_gudid_revokes_the_live_one_of_its_sn_and_the_revocation_is_audited(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let first = st.provision_gudids(w.org.id, &[fresh("acme-0000", 1), fresh("acme-0001", 1)], T0, &ops()).must();
    let second = st.provision_gudids(w.org.id, &[fresh("acme-0000", 2)], T0 + 5, &ops()).must().remove(0);
    assert_eq!(second.revoked, [first[0].row.id], "the SN's live GUDID is revoked");
    let old = st.gudid_by_id(&fresh("acme-0000", 1).gudid_id).must().expect("kept");
    assert_eq!((old.revoked_at, old.revoked_by.as_deref()), (Some(T0 + 5), Some("ops")));
    assert_eq!(old.status(T0 + 5), "revoked");
    let live = st.list_gudids(w.org.id, &GudidFilter { live_at: Some(T0 + 5), ..by_sn("acme-0000") }).must();
    assert_eq!(live.iter().map(|g| g.id).collect::<Vec<_>>(), [second.row.id], "one live GUDID per SN");
    assert_eq!(
        st.live_bootstrap_hashes(Some("acme-0000"), T0 + 5, None).must(),
        [("acme-0000".to_string(), "$7$101$salt2$hash-acme-0000".to_string())],
        "only the new GUDID opens the bootstrap identity"
    );
    assert_eq!(st.live_bootstrap_hashes(Some("acme-0001"), T0 + 5, None).must().len(), 1, "another SN's stays");
    let entries = gudid_entries(st, w.org.id);
    let actions: Vec<(&str, &str)> = entries.iter().map(|e| (e.action.as_str(), e.object.as_str())).collect();
    assert_eq!(
        actions,
        [
            ("gudid.provision", "device:acme-0000"),
            ("gudid.provision", "device:acme-0001"),
            ("gudid.revoke", "device:acme-0000"),
            ("gudid.provision", "device:acme-0000"),
        ]
    );
    assert_eq!(
        entries[2].details,
        serde_json::json!({"gudid": first[0].row.id, "reason": "replaced", "replaced_by": second.row.id})
    );
    assert_eq!(entries[3].details["revoked"], serde_json::json!([first[0].row.id]));
    // The revoked GUDID initialises nothing, directly or in a batch; the new one does.
    conflict(st.spend_gudid(first[0].row.id, w.devices[0].id, &new_credentials("old"), T0 + 6));
    let outcome = st
        .apply_batch(&[Write::Initialise {
            gudid_row: first[0].row.id,
            device_id: w.devices[0].id,
            creds: new_credentials("old"),
            at: T0 + 6,
        }])
        .must();
    assert!(matches!(outcome.initialised.as_slice(), [(_, None)]), "{:?}", outcome.initialised);
    assert!(st.credentials("acme-0000").must().is_none());
    st.spend_gudid(second.row.id, w.devices[0].id, &new_credentials("new"), T0 + 7).must();
    // Neither a spent nor an expired GUDID is revoked by a newer one: they are not live.
    let third = st.provision_gudids(w.org.id, &[fresh("acme-0000", 3)], T0 + 8, &ops()).must().remove(0);
    assert!(third.revoked.is_empty(), "a spent GUDID was revoked");
    let late = T0 + 73 * HOUR_MS;
    let later = NewGudid { expires_at: late + 72 * HOUR_MS, ..fresh("acme-0000", 4) };
    let fourth = st.provision_gudids(w.org.id, &[later], late, &ops()).must().remove(0);
    assert!(fourth.revoked.is_empty(), "an expired GUDID was revoked");
    let listed = st.list_gudids(w.org.id, &by_sn("acme-0000")).must();
    let statuses: Vec<&str> = listed.iter().map(|g| g.status(late)).collect();
    assert_eq!(statuses, ["unused", "expired", "used", "revoked"]);
}

fn two_provisionings_for_one_sn_at_once_leave_one_live_gudid(s: &Subject) {
    const ROUNDS: u8 = 5;
    let st = s.store();
    let w = world(st, "acme", 1);
    for round in 0..ROUNDS {
        std::thread::scope(|scope| {
            for t in 0..2u8 {
                let org = w.org.id;
                scope.spawn(move || st.provision_gudids(org, &[fresh("acme-0000", round * 2 + t)], T0, &ops()).must());
            }
        });
        let live = st.list_gudids(w.org.id, &GudidFilter { live_at: Some(T0), ..by_sn("acme-0000") }).must();
        assert_eq!(live.len(), 1, "round {round}: {live:?}");
        assert_eq!(st.live_bootstrap_hashes(Some("acme-0000"), T0, None).must().len(), 1);
    }
    let all = st.list_gudids(w.org.id, &GudidFilter::default()).must();
    assert_eq!(all.len(), 2 * ROUNDS as usize);
    let revocations = gudid_entries(st, w.org.id).iter().filter(|e| e.action == "gudid.revoke").count();
    assert_eq!(revocations, 2 * ROUNDS as usize - 1, "every revocation audited once");
}

fn a_revoked_gudid_opens_nothing_initialises_nothing_and_is_revoked_once(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 2);
    let rival = world(st, "globex", 1);
    let done = st.provision_gudids(w.org.id, &[fresh("acme-0000", 1), fresh("acme-0001", 1)], T0, &ops()).must();
    let id = done[0].row.id;
    assert!(is_not_found(st.revoke_gudid(rival.org.id, id, T0 + 1, &ops())), "another organization's GUDID");
    assert!(is_not_found(st.revoke_gudid(w.org.id, 999_999, T0 + 1, &ops())));
    let operator = Actor { label: "night-shift".into(), token_id: Some(9) };
    let revoked = st.revoke_gudid(w.org.id, id, T0 + 1, &operator).must();
    assert_eq!(
        (revoked.id, revoked.revoked_at, revoked.revoked_by.as_deref()),
        (id, Some(T0 + 1), Some("night-shift"))
    );
    assert!(conflict(st.revoke_gudid(w.org.id, id, T0 + 2, &ops())).contains("is revoked"));
    assert!(st.live_bootstrap_hashes(Some("acme-0000"), T0 + 2, None).must().is_empty(), "opens init@SN");
    assert!(
        st.live_bootstrap_hashes(None, T0 + 2, Some(T0)).must().iter().all(|(sn, _)| sn != "acme-0000"),
        "the broker's grace for spent GUDIDs keeps a revoked one"
    );
    conflict(st.spend_gudid(id, w.devices[0].id, &new_credentials("x"), T0 + 3));
    assert!(st.credentials("acme-0000").must().is_none());
    assert_eq!(st.gudid_by_id(&fresh("acme-0000", 1).gudid_id).must().map(|g| g.status(T0 + 3)), Some("revoked"));
    // Neither a used nor an expired GUDID can be revoked.
    st.spend_gudid(done[1].row.id, w.devices[1].id, &new_credentials("y"), T0 + 4).must();
    assert!(conflict(st.revoke_gudid(w.org.id, done[1].row.id, T0 + 5, &ops())).contains("is used"));
    let late = st.provision_gudids(w.org.id, &[fresh("acme-0001", 2)], T0 + 6, &ops()).must().remove(0);
    assert!(conflict(st.revoke_gudid(w.org.id, late.row.id, T0 + 80 * HOUR_MS, &ops())).contains("is expired"));
    let entries = gudid_entries(st, w.org.id);
    let revocations: Vec<&AuditEntry> = entries.iter().filter(|e| e.action == "gudid.revoke").collect();
    assert_eq!(revocations.len(), 1, "{entries:?}");
    assert_eq!(
        (revocations[0].object.as_str(), revocations[0].actor.as_str(), revocations[0].token_id),
        ("device:acme-0000", "night-shift", Some(9))
    );
    assert_eq!(revocations[0].details, serde_json::json!({"gudid": id, "reason": "revoked"}));
}

fn gudids_are_listed_newest_first_live_only_and_by_page(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let batch: Vec<NewGudid> = (0..3).map(|i| fresh(&format!("acme-{i:04}"), 1)).collect();
    let done = st.provision_gudids(w.org.id, &batch, T0, &ops()).must();
    st.spend_gudid(done[0].row.id, w.devices[0].id, &new_credentials("a"), T0 + 1).must();
    st.revoke_gudid(w.org.id, done[1].row.id, T0 + 1, &ops()).must();
    let ids = |f: GudidFilter| st.list_gudids(w.org.id, &f).must().iter().map(|g| g.id).collect::<Vec<_>>();
    assert_eq!(ids(GudidFilter::default()), [done[2].row.id, done[1].row.id, done[0].row.id]);
    assert_eq!(ids(GudidFilter { live_at: Some(T0 + 2), ..GudidFilter::default() }), [done[2].row.id]);
    assert!(ids(GudidFilter { live_at: Some(T0 + 72 * HOUR_MS), ..GudidFilter::default() }).is_empty(), "expired");
    assert_eq!(ids(GudidFilter { limit: 2, ..GudidFilter::default() }), [done[2].row.id, done[1].row.id]);
}

fn clear_gudid_mac_keys_of_an_older_gateway_are_sealed_once_and_then_resealed(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 1);
    // A row as a schema-6 gateway wrote it, after the migration to 7: the MAC key in the clear.
    let clear: Vec<u8> = (0x40..0x60).collect();
    let hex_key = hex::encode(&clear);
    let device = w.devices[0].id;
    let org = w.org.id;
    let insert = if s.is_postgres() {
        format!(
            "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, provisioned_by, provisioned_at, expires_at)
             VALUES ({org}, {device}, '\\xAA01'::bytea, '\\x{hex_key}'::bytea, 'ops', {T0}, {})",
            T0 + DAY_MS
        )
    } else {
        format!(
            "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, provisioned_by, provisioned_at, expires_at)
             VALUES ({org}, {device}, X'AA01', X'{hex_key}', 'ops', {T0}, {})",
            T0 + DAY_MS
        )
    };
    assert_eq!(s.raw_execute(&insert).expect("legacy row"), 1);
    let in_files = |s: &Subject| s.sqlite_files().map(|b| b.windows(clear.len()).any(|w| w == clear.as_slice()));
    if let Some(found) = in_files(s) {
        assert!(found, "the test's clear key should be in the SQLite files before the re-seal");
    }
    let legacy = st.gudid_by_id(&[0xAA, 0x01]).must().expect("legacy row");
    assert_eq!(legacy.sealed_mac_key, "", "not sealed yet: refused at CreateKey, never used in the clear");
    let sealed = s.opened.seal_legacy_gudid_keys(|key| Ok(format!("sealed:{}", hex::encode(key)))).must();
    assert_eq!(sealed, 1);
    let row = st.gudid_by_id(&[0xAA, 0x01]).must().expect("kept");
    assert_eq!(row.sealed_mac_key, format!("sealed:{hex_key}"));
    let clear_left = s.raw_execute("UPDATE gudids SET provisioned_by = provisioned_by WHERE length(mac_key) > 0");
    assert_eq!(clear_left, Ok(0), "a clear MAC key is left in the store");
    if let Some(found) = in_files(s) {
        assert!(!found, "the clear key is still in the SQLite files");
    }
    assert_eq!(s.opened.seal_legacy_gudid_keys(|_| Err("must not run".into())).must(), 0, "done once");
    // A failing seal changes nothing.
    assert_eq!(s.raw_execute(&insert.replace("AA01", "AA02")).expect("second legacy row"), 1);
    assert!(s.opened.seal_legacy_gudid_keys(|_| Err("no key service".into())).is_err());
    assert_eq!(st.gudid_by_id(&[0xAA, 0x02]).must().map(|g| g.sealed_mac_key), Some(String::new()));
    s.opened.seal_legacy_gudid_keys(|key| Ok(format!("sealed:{}", hex::encode(key)))).must();
    // From then on a master key rotation re-seals them with every other key.
    s.opened.reseal_all(|sealed| Ok(format!("new:{sealed}")), "NEWKCV").must();
    assert_eq!(st.gudid_by_id(&[0xAA, 0x01]).must().map(|g| g.sealed_mac_key), Some(format!("new:sealed:{hex_key}")));
}

// ---------------------------------------------------------------- across the backends

/// A small deterministic generator (xorshift64*), so a failing batch can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// Everything the batch writes can change, in one comparable text per backend.
fn snapshot(st: &dyn Store, w: &World, tasks: &[i64], gudids: &[Vec<u8>]) -> Vec<String> {
    let mut out = Vec::new();
    for d in st.devices_by_ids(&w.devices.iter().map(|d| d.id).collect::<Vec<_>>()).must() {
        out.push(format!("{d:?}"));
    }
    for c in st.credentials_for(&w.devices.iter().map(|d| d.id).collect::<Vec<_>>()).must() {
        out.push(format!("{c:?}"));
    }
    for t in tasks {
        out.extend(st.task_executions(*t).must().iter().map(|e| format!("{e:?}")));
    }
    // Records by execution, without their ids: a batch applied in several rounds may number the
    // records of one batch in another order than SQLite does; nothing reads meaning into that.
    let mut records = all_records(st, w.org.id);
    records.sort_by_key(|r| r.execution_id);
    out.extend(records.into_iter().map(|r| format!("{:?}", RecordRow { id: 0, ..r })));
    for g in gudids {
        out.push(format!("{:?}", st.gudid_by_id(g).must().map(|g| g.used_at)));
    }
    out
}

fn random_write(rng: &mut Rng, w: &World, executions: &[ExecutionRow], gudids: &[GudidRow], at: i64) -> Write {
    let device = w.devices[rng.below(w.devices.len())].id;
    let execution = executions[rng.below(executions.len())].id;
    match rng.below(12) {
        0 | 1 => Write::Report(DeviceReport {
            debug_mode: rng.below(2) == 0,
            region: ["EU", "US", "APAC"][rng.below(3)].into(),
            ..report(device, rng.below(2) == 0, at)
        }),
        2 => Write::Seen { device_id: device, at },
        3 | 4 => Write::Counter { device_id: device, counter: rng.below(1_000) as u64 },
        5 | 6 => Write::Delivered { execution_id: execution, at },
        7..=10 => {
            // Endings end: only the final states (an "ending" to an open state is refused).
            let finals: Vec<ExecutionState> = ExecutionState::ALL.into_iter().filter(|s| !s.is_open()).collect();
            let state = finals[rng.below(finals.len())];
            // Half carry unwritten sends, as an ack that overtook its `Delivered` write does.
            let sends = (rng.below(2) == 0).then(|| Sends {
                first_at: at - 1 - rng.below(5) as i64,
                last_at: at,
                count: 1 + rng.below(3) as u32,
            });
            Write::End(Ending { lock_device: rng.below(3) != 0, sends, ..ending(execution, state, at) })
        }
        _ => {
            let gudid = &gudids[rng.below(gudids.len())];
            Write::Initialise {
                gudid_row: gudid.id,
                device_id: gudid.device_id,
                creds: NewCredentials { counter: rng.below(50) as u64, ..new_credentials(&format!("g{at}")) },
                at,
            }
        }
    }
}

type Ended = Vec<(i64, ExecutionState)>;

/// How a subject of [`random_batches_agree`] applies a batch.
type Apply = fn(&dyn Store, &[Write]) -> BatchOutcome;

/// The whole batch in one transaction.
fn whole(st: &dyn Store, writes: &[Write]) -> BatchOutcome {
    st.apply_batch(writes).must()
}

/// Each write in a batch of its own: the meaning a batch must keep.
fn one_by_one(st: &dyn Store, writes: &[Write]) -> BatchOutcome {
    let mut all = BatchOutcome::default();
    for w in writes {
        let o = st.apply_batch(std::slice::from_ref(w)).must();
        all.ended.extend(o.ended);
        all.initialised.extend(o.initialised);
    }
    all
}

/// Random batches of every kind of write, on the same world in two subjects, each applying them
/// its way: after each batch, the same outcome and the same rows.
fn random_batches_agree(subjects: [(Subject, Apply); 2]) {
    const DEVICES: usize = 6;
    const BATCHES: usize = 60;
    const WRITES_MAX: usize = 40;
    let worlds: Vec<World> = subjects.iter().map(|(s, _)| world(s.store(), "acme", DEVICES)).collect();
    let mut tasks = Vec::new();
    let mut executions = Vec::new();
    let mut gudids = Vec::new();
    for ((s, _), w) in subjects.iter().zip(&worlds) {
        let st = s.store();
        let (a, ea) = task(st, w, &(0..DEVICES).collect::<Vec<_>>());
        let (b, eb) = task(st, w, &[0, 1, 2]);
        tasks.push(vec![a.id, b.id]);
        executions.push([ea, eb].concat());
        gudids.push(
            (0..DEVICES)
                .flat_map(|d| (0..2u8).map(move |tag| (d, tag)))
                .map(|(d, tag)| st.insert_gudid(&new_gudid(w, d, tag)).must())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(tasks[0], tasks[1], "both subjects number rows alike");
    let gudid_ids: Vec<Vec<u8>> = gudids[0].iter().map(|g| g.gudid_id.clone()).collect();
    let mut rng = Rng(0x5EED_0FBA_7C4E_5EED);
    for batch in 0..BATCHES {
        let len = 1 + rng.below(WRITES_MAX);
        let writes: Vec<Write> = (0..len)
            .map(|i| random_write(&mut rng, &worlds[0], &executions[0], &gudids[0], T0 + (batch * 100 + i) as i64))
            .collect();
        let outcomes: Vec<(Ended, Vec<String>)> = subjects
            .iter()
            .map(|(s, apply)| {
                let o = apply(s.store(), &writes);
                (o.ended, o.initialised.into_iter().map(|(row, c)| format!("{row} {c:?}")).collect())
            })
            .collect();
        assert_eq!(outcomes[0], outcomes[1], "batch {batch} outcome: {writes:#?}");
        let snapshots: Vec<Vec<String>> =
            subjects.iter().zip(&worlds).map(|((s, _), w)| snapshot(s.store(), w, &tasks[0], &gudid_ids)).collect();
        for (first, second) in snapshots[0].iter().zip(&snapshots[1]) {
            assert_eq!(first, second, "after batch {batch}: {writes:#?}");
        }
        assert_eq!(snapshots[0].len(), snapshots[1].len());
    }
}

/// SQLite's batch keeps the meaning of its writes applied one by one: the reference for any
/// reordering or merging of writes inside a batch.
#[test]
fn sqlite_applies_random_batches_as_it_applies_them_write_by_write() {
    random_batches_agree([(Subject::sqlite(), one_by_one), (Subject::sqlite(), whole)]);
}

#[test]
fn postgres_applies_random_batches_exactly_as_sqlite_applies_them_write_by_write() {
    let Some(postgres) = Subject::postgres_or_skip("postgres_applies_random_batches") else { return };
    random_batches_agree([(Subject::sqlite(), one_by_one), (postgres, whole)]);
}

#[test]
fn postgres_refuses_truncate_of_the_append_only_tables() {
    let Some(s) = Subject::postgres_or_skip("postgres_refuses_truncate_of_the_append_only_tables") else { return };
    for (table, message) in [("audit", "audit log is append-only"), ("records", "records are permanent")] {
        let refused = s.raw_execute(&format!("TRUNCATE {table} CASCADE")).expect_err("TRUNCATE is refused");
        assert!(refused.contains(message), "{table}: {refused}");
    }
}

/// The cluster sweep's claims: two nodes claiming at once, in small chunks each after its last
/// one's highest id, get disjoint sets covering every due execution; a claim after an id takes
/// only the executions above it; a claim holds an execution for the initial backoff; a delivery
/// restarts its backoff, which doubles with the deliveries; ended and expired executions are
/// never claimed.
#[test]
fn postgres_redelivery_claims_fire_once_per_execution_across_nodes() {
    const DEVICES: usize = 300;
    const INITIAL: i64 = 1_000;
    const MAX: i64 = 600_000;
    let Some(s) = Subject::postgres_or_skip("postgres_redelivery_claims_fire_once_per_execution_across_nodes") else {
        return;
    };
    let st = s.store();
    let w = world(st, "acme", DEVICES);
    let (_, executions) = st.create_task(&new_task(&w, &(0..DEVICES).collect::<Vec<_>>(), T0, T0 + DAY_MS)).must();
    // Not due before `first` after creation.
    assert!(st.claim_redeliveries(T0, 10, INITIAL, MAX, 10_000, 0).must().is_empty());
    // Two nodes, small batches, at once: every execution claimed exactly once.
    let claimed: Vec<i64> = std::thread::scope(|scope| {
        let nodes: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    // As a node's sweep does: each claim after the last one's highest id.
                    let mut mine: Vec<i64> = Vec::new();
                    loop {
                        let after = mine.last().copied().unwrap_or(0);
                        let batch = st.claim_redeliveries(T0 + 10, 10, INITIAL, MAX, 7, after).must();
                        if batch.is_empty() {
                            return mine;
                        }
                        mine.extend(batch.iter().map(|e| e.id));
                    }
                })
            })
            .collect();
        nodes.into_iter().flat_map(|n| n.join().expect("claiming node")).collect()
    });
    assert_eq!(claimed.len(), DEVICES, "each execution claimed once");
    assert_eq!(claimed.iter().collect::<HashSet<_>>().len(), DEVICES);
    // Held for INITIAL; then due again if no delivery was written. A claim after an id takes
    // only the executions above it, in id order.
    assert!(st.claim_redeliveries(T0 + 10 + INITIAL - 1, 10, INITIAL, MAX, 10_000, 0).must().is_empty());
    let after = executions[DEVICES - 3].id;
    let tail: Vec<i64> =
        st.claim_redeliveries(T0 + 10 + INITIAL, 10, INITIAL, MAX, 10_000, after).must().iter().map(|e| e.id).collect();
    assert_eq!(tail, [executions[DEVICES - 2].id, executions[DEVICES - 1].id]);
    assert_eq!(st.claim_redeliveries(T0 + 10 + INITIAL, 10, INITIAL, MAX, 10_000, 0).must().len(), DEVICES - 2);
    // Deliveries restart the backoff: the first one waits INITIAL, the second 2 × INITIAL.
    let (a, b, c) = (executions[0].id, executions[1].id, executions[2].id);
    let at = T0 + 10_000;
    st.apply_batch(&[
        Write::Delivered { execution_id: a, at },
        Write::Delivered { execution_id: b, at },
        Write::Delivered { execution_id: b, at },
        Write::End(ending(c, ExecutionState::Succeeded, at)),
    ])
    .must();
    let due = |now: i64| -> Vec<i64> {
        st.claim_redeliveries(now, 10, INITIAL, MAX, 10_000, 0)
            .must()
            .into_iter()
            .map(|e| e.id)
            .filter(|id| [a, b, c].contains(id))
            .collect()
    };
    assert_eq!(due(at + INITIAL - 1), Vec::<i64>::new());
    assert_eq!(due(at + INITIAL), vec![a], "one delivery: INITIAL");
    // b after two deliveries: 2 × INITIAL; a again, its claim lapsed with no delivery written; the
    // ended one never.
    assert_eq!(due(at + 2 * INITIAL), vec![a, b]);
    // Past the deadline nothing is claimed: expiry's business.
    assert!(st.claim_redeliveries(T0 + DAY_MS, 10, INITIAL, MAX, 10_000, 0).must().is_empty());
}

/// Every node learns of a new task from the store (`watch_due`, PostgreSQL's `NOTIFY` heard on a
/// connection of its own): the watcher hears that it listens, then one `Due` when a task's creation
/// commits, with the task's open executions and the nodes listening; nothing while the creating
/// transaction is still open, and nothing from a creation that rolls back. A watcher that wants
/// no more is left alone.
#[test]
fn postgres_watchers_hear_of_a_task_when_its_creation_commits_never_before_nor_on_a_rollback() {
    use std::sync::mpsc::{channel, RecvTimeoutError};
    use std::time::Duration;
    const HEARD_WITHIN: Duration = Duration::from_secs(10);
    // How long a notification would take at most to reach a listener on this machine, had one
    // been sent: waiting for nothing to arrive is the point here.
    const SILENCE: Duration = Duration::from_millis(500);
    let Some(s) = Subject::postgres_or_skip("postgres_watchers_hear_of_a_task_when_its_creation_commits") else {
        return;
    };
    let st = s.store();
    let w = world(st, "acme", 4);
    let (heard, signals) = channel();
    st.watch_due(Box::new(move |signal| heard.send(signal).is_ok())).must();
    assert_eq!(signals.recv_timeout(HEARD_WITHIN), Ok(DueSignal::Listening), "the watcher listens");
    // A creation that fails after its executions are in: rolled back, never heard.
    let failed = st.create_task_with(&new_task(&w, &[0, 1], T0, T0 + DAY_MS), &audit("task.create"), &mut |_| {
        Err(StoreError::Invalid("a derivation failed".into()))
    });
    assert!(failed.is_err());
    // A creation that commits: nothing heard while its transaction is open (after its
    // notification was issued), then one `Due` once it commits.
    let mut silent_while_open = None;
    let created = st
        .create_task_with(&new_task(&w, &[2, 3], T0, T0 + DAY_MS), &audit("task.create"), &mut |_| {
            silent_while_open = Some(signals.recv_timeout(SILENCE));
            Ok(())
        })
        .must();
    assert_eq!(
        silent_while_open,
        Some(Err(RecvTimeoutError::Timeout)),
        "nothing heard before the commit, nor from the rolled-back creation"
    );
    assert_eq!(created.counts.total, 2);
    // Its two open executions, and one node listening: this watcher.
    let due = DueSignal::Due { executions: 2, nodes: 1 };
    assert_eq!(signals.recv_timeout(HEARD_WITHIN), Ok(due), "heard once committed");
    assert_eq!(signals.recv_timeout(SILENCE), Err(RecvTimeoutError::Timeout), "heard once");
    // The watcher goes; a later creation finds it gone and stops the listener (nothing panics).
    drop(signals);
    st.create_task_with(&new_task(&w, &[0], T0, T0 + DAY_MS), &audit("task.create"), &mut |_| Ok(())).must();
}

/// A database written by a gateway of schema version 3 (credentials in the device row): after
/// the upgrade to 4 the initialised device keeps its credentials, and the other device stays
/// uninitialised.
/// `blob_0102`: the backend's literal for the bytes 01 02.
fn credentials_survive_the_upgrade_to_schema_4(
    blob_0102: &str,
    raw: &dyn Fn(&str),
    reopen: &dyn Fn() -> Box<dyn Store>,
) {
    raw("INSERT INTO organizations (id, name, created_at) VALUES (1, 'acme', 0)");
    raw(&format!(
        "INSERT INTO devices (id, org_id, sn, created_at, last_counter, generation, x_pos_device_id, signing_key,
                              kbpk_aes, kbpk_tdes, password_hash, broker_password_hash)
         VALUES (1, 1, 'SN-A', 0, 41, 2, 'xpos-a', 'sealed:sign', 'sealed:aes', 'sealed:tdes', {blob_0102}, '$7$hash-a')"
    ));
    raw("INSERT INTO devices (id, org_id, sn, created_at) VALUES (2, 1, 'SN-B', 0)");
    let st = reopen();
    let creds = st.credentials("SN-A").must().expect("SN-A keeps its credentials");
    assert_eq!(
        (creds.signing_key.as_str(), creds.kbpk_aes.as_str(), creds.kbpk_tdes.as_str()),
        ("sealed:sign", "sealed:aes", "sealed:tdes")
    );
    assert_eq!((creds.password_hash.as_slice(), creds.last_counter, creds.generation), (&[1u8, 2][..], 41, 2));
    assert!(st.credentials("SN-B").must().is_none());
    let mut devices = st.list_devices(1, &DeviceFilter::default()).must();
    devices.sort_by_key(|d| d.id);
    let initialised: Vec<(&str, bool)> = devices.iter().map(|d| (d.sn.as_str(), d.initialised)).collect();
    assert_eq!(initialised, [("SN-A", true), ("SN-B", false)]);
    assert_eq!(st.all_password_hashes().must(), [("SN-A".to_string(), vec![1, 2])]);
    assert_eq!(
        st.broker_devices().must(),
        [("SN-A".to_string(), Some("$7$hash-a".to_string())), ("SN-B".to_string(), None)]
    );
}

/// The schema version of `store_suite/schema8_by_main.sqlite`: a store made by the gateway whose
/// migrations were still strings in its code (commit dfa6129, `rki-gateway init-org acme`),
/// vacuumed to 512-byte pages to keep the file small.
const OLD_STORE_VERSION: usize = 8;

/// SQLite's own record of a database's schema: every table, index and trigger with the text of
/// the statement that created it.
fn sqlite_schema(path: &std::path::Path) -> Vec<(String, String, Option<String>)> {
    let conn = rusqlite::Connection::open(path).expect("open");
    let mut statement = conn
        .prepare("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
        .expect("prepare");
    let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).expect("query");
    rows.collect::<Result<_, _>>().expect("schema")
}

#[test]
fn sqlite_a_store_made_before_the_migration_files_has_their_schema_and_opens_with_its_data() {
    let old = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/store_suite/schema8_by_main.sqlite");
    let dir = TempDir::new("rki-store-old");
    let path = dir.path().join("rki.sqlite");
    std::fs::copy(&old, &path).expect("copy the old store");
    let fresh = dir.path().join("fresh.sqlite");
    rki_gateway::store::sqlite::SqliteStore::migrate_to_version(&fresh, OLD_STORE_VERSION).must();
    let schema = sqlite_schema(&path);
    assert!(schema.len() >= 20, "the old store has its tables, indexes and triggers: {schema:?}");
    assert_eq!(sqlite_schema(&fresh), schema, "the migration files make the schema the old gateway made");
    let store = rki_gateway::store::sqlite::SqliteStore::open(&path).must();
    assert_eq!(store.schema_version().must(), rki_gateway::store::sqlite::SqliteStore::SCHEMA_VERSION as i64);
    let acme = store.org_by_name("acme").must().expect("the old store's organization");
    assert_eq!((acme.id, store.list_orgs().must().len()), (1, 1));
    let entries = store.list_audit(None, 10, None).must();
    assert_eq!(entries.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["token.create", "org.create"]);
}

#[test]
fn sqlite_credentials_survive_the_upgrade_to_schema_4() {
    let dir = TempDir::new("rki-store-upgrade");
    let path = dir.path().join("rki.sqlite");
    rki_gateway::store::sqlite::SqliteStore::migrate_to_version(&path, 3).must();
    let conn = rusqlite::Connection::open(&path).expect("open");
    credentials_survive_the_upgrade_to_schema_4(
        "X'0102'",
        &|sql| {
            conn.execute(sql, []).unwrap_or_else(|e| panic!("{sql}: {e}"));
        },
        &|| Box::new(rki_gateway::store::sqlite::SqliteStore::open(&path).must()),
    );
}

#[test]
fn postgres_credentials_survive_the_upgrade_to_schema_4() {
    let url = pg_server().create_database("upgrade_to_4").unwrap_or_else(|e| panic!("{e}"));
    PostgresStore::migrate_to_version(&url, 3).must();
    let client = std::cell::RefCell::new(::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect"));
    credentials_survive_the_upgrade_to_schema_4(
        "'\\x0102'::bytea",
        &|sql| {
            client.borrow_mut().execute(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
        },
        &|| Box::new(PostgresStore::connect(&url, 2).must()),
    );
}

#[test]
fn postgres_nodes_starting_together_migrate_one_database_once() {
    const NODES: usize = 4;
    let url = pg_server().create_database("nodes_starting_together").unwrap_or_else(|e| panic!("{e}"));
    let versions: Vec<i64> = std::thread::scope(|scope| {
        let nodes: Vec<_> = (0..NODES)
            .map(|_| scope.spawn(|| PostgresStore::connect(&url, 1).must().schema_version().must()))
            .collect();
        nodes.into_iter().map(|n| n.join().expect("starting node")).collect()
    });
    assert_eq!(versions, [PostgresStore::SCHEMA_VERSION as i64; NODES]);
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
    let recorded: Vec<i32> = client
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .expect("schema_migrations")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let every: Vec<i32> = (1..=PostgresStore::SCHEMA_VERSION as i32).collect();
    assert_eq!(recorded, every, "each migration recorded once");
}

#[test]
fn postgres_store_reconnects_after_the_server_ends_its_sessions() {
    let Some(s) = Subject::postgres_or_skip("postgres_store_reconnects_after_the_server_ends_its_sessions") else {
        return;
    };
    let st = s.store();
    let w = world(st, "acme", 2);
    // Every pooled connection is in use once, so the pool holds several idle sessions.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| st.list_orgs().must());
        }
    });
    let ended = s
        .raw_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .expect("terminate the store's sessions");
    assert!(ended >= 1, "the store had sessions to end");
    assert_eq!(st.count_devices(w.org.id).must(), 2, "a read after the sessions ended");
    st.create_org("globex", T0, &audit("org.create")).must();
    assert_eq!(st.list_orgs().must().len(), 2, "a write after the sessions ended");
}

#[test]
fn postgres_store_prepares_again_after_another_node_changes_a_column_type() {
    let Some(s) = Subject::postgres_or_skip("postgres_store_prepares_again_after_another_node_changes_a_column_type")
    else {
        return;
    };
    let st = s.store();
    st.create_org("acme", T0, &audit("org.create")).must();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| st.list_orgs().must());
        }
    });
    // A newer node's migration changes the type of a column the prepared statements return (as
    // such a migration must, it drops the view that reads the column first: migration 11).
    s.raw_execute("DROP VIEW rki_broker_credentials").expect("drop the view");
    s.raw_execute("ALTER TABLE organizations ALTER COLUMN name TYPE VARCHAR(200)").expect("alter");
    let names: Vec<String> = st.list_orgs().must().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["acme"]);
}

//! The backend channel's store specs (`store::channel::ChannelStore` and the event hooks inside
//! the stores' own transactions), run on both backends by the suite.

use std::collections::HashSet;

use rki_gateway::domain::ExecutionState;
use rki_gateway::store::channel::*;
use rki_gateway::store::*;
use rki_protocol::message::{Answer, Event};

use super::harness::*;

fn new_backend(world: &World, name: &str) -> NewBackend {
    NewBackend {
        org_id: world.org.id,
        name: name.into(),
        sealed_mac_key: format!("sealed:backend:{name}"),
        password_hash: format!("$7$101$salt${name}"),
        created_by: "admin".into(),
        at: T0,
    }
}

fn backend_audit(action: &'static str) -> Audit {
    Audit::new(&Actor::named("admin"), None, action, "backend:erp", serde_json::json!({}), T0)
}

/// Every event of the organization, decoded, checking that the numbers have no hole.
fn events(st: &dyn Store, org_id: i64) -> Vec<(u64, Event)> {
    let stored = st.events_after(org_id, 0, 1_000_000).must();
    let decoded: Vec<(u64, Event)> =
        stored.iter().map(|e| (e.seq, postcard::from_bytes(&e.payload).expect("an event decodes"))).collect();
    for pair in decoded.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "no hole, no repeat");
    }
    decoded
}

fn kind(e: &Event) -> &'static str {
    match e {
        Event::TaskCreated { .. } => "created",
        Event::ExecutionEnded { .. } => "ended",
        Event::TaskDone { .. } => "done",
    }
}

pub fn backends_are_unique_per_organization_revoked_once_and_audited(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 0);
    let other = world(st, "globex", 0);
    let erp = st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    assert_eq!((erp.org_id, erp.name.as_str(), erp.last_counter, erp.revoked_at), (w.org.id, "erp", 0, None));
    assert_eq!(erp.sealed_mac_key, "sealed:backend:erp");
    assert!(matches!(
        st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")),
        Err(StoreError::Conflict(_))
    ));
    st.create_backend(&new_backend(&other, "erp"), &backend_audit("backend.create")).must();
    st.create_backend(&new_backend(&w, "crm"), &backend_audit("backend.create")).must();
    let names: Vec<String> = st.list_backends(w.org.id).must().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["crm", "erp"]);
    assert!(st.backend_by_name(w.org.id, "nope").must().is_none());
    let revoked = st.revoke_backend(w.org.id, "erp", T0 + 5, &backend_audit("backend.revoke")).must();
    assert_eq!(revoked.revoked_at, Some(T0 + 5));
    assert!(matches!(
        st.revoke_backend(w.org.id, "erp", T0 + 6, &backend_audit("backend.revoke")),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        st.revoke_backend(w.org.id, "nope", T0, &backend_audit("backend.revoke")),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(st.backend_by_name(other.org.id, "erp").must().map(|b| b.revoked_at), Some(None), "another's untouched");
    assert!(
        matches!(
            st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")),
            Err(StoreError::Conflict(_))
        ),
        "a revoked name is never reused"
    );
    let actions: Vec<String> = st
        .list_audit(Some(w.org.id), 100, None)
        .must()
        .into_iter()
        .map(|e| e.action)
        .filter(|a| a.starts_with("backend"))
        .collect();
    assert_eq!(actions, ["backend.revoke", "backend.create", "backend.create"], "each step in its transaction");
}

pub fn a_backend_counter_only_goes_up_once_per_value_and_a_revoked_backend_accepts_none(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 0);
    let b = st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    assert!(st.accept_backend_counter(b.id, 5).must());
    assert!(!st.accept_backend_counter(b.id, 5).must(), "a replay");
    assert!(!st.accept_backend_counter(b.id, 4).must(), "an older one");
    assert!(st.accept_backend_counter(b.id, 1_700_000_000_000_000).must());
    assert_eq!(st.backend_by_name(w.org.id, "erp").must().map(|b| b.last_counter), Some(1_700_000_000_000_000));
    // Two nodes given the same frame at once: one accepts it.
    let accepted: Vec<bool> = std::thread::scope(|scope| {
        let threads: Vec<_> =
            (0..4).map(|_| scope.spawn(|| st.accept_backend_counter(b.id, 1_700_000_000_000_100).must())).collect();
        threads.into_iter().map(|t| t.join().expect("thread")).collect()
    });
    assert_eq!(accepted.iter().filter(|a| **a).count(), 1);
    st.revoke_backend(w.org.id, "erp", T0, &backend_audit("backend.revoke")).must();
    assert!(!st.accept_backend_counter(b.id, u64::MAX >> 1).must(), "revoked: nothing accepted");
}

pub fn a_request_is_claimed_once_per_backend_and_its_answer_remembered(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 0);
    let erp = st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    let crm = st.create_backend(&new_backend(&w, "crm"), &backend_audit("backend.create")).must();
    let claim = |backend_id: i64, request_id: u64, digest: u8| RequestClaim {
        org_id: w.org.id,
        backend_id,
        request_id,
        digest: vec![digest; 32],
        task_request_id: None,
        at: T0,
    };
    assert_eq!(st.claim_backend_request(&claim(erp.id, u64::MAX, 1)).must(), None, "claimed now");
    assert_eq!(
        st.claim_backend_request(&claim(erp.id, u64::MAX, 2)).must(),
        Some(RememberedRequest { digest: vec![1; 32], answer: None }),
        "under way, with the first request's digest"
    );
    assert_eq!(st.claim_backend_request(&claim(crm.id, u64::MAX, 3)).must(), None, "request ids are per backend");
    st.remember_backend_answer(erp.id, u64::MAX, b"first").must();
    st.remember_backend_answer(erp.id, u64::MAX, b"second").must();
    assert_eq!(
        st.claim_backend_request(&claim(erp.id, u64::MAX, 1)).must().and_then(|r| r.answer),
        Some(b"first".to_vec()),
        "the first answer stays"
    );
    // An unanswered claim can be forgotten (an outage); an answered one cannot.
    st.forget_backend_request(crm.id, u64::MAX).must();
    assert_eq!(st.claim_backend_request(&claim(crm.id, u64::MAX, 4)).must(), None);
    st.forget_backend_request(erp.id, u64::MAX).must();
    assert!(st.claim_backend_request(&claim(erp.id, u64::MAX, 1)).must().is_some());
}

pub fn events_follow_tasks_and_endings_in_their_own_transactions_without_holes(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 4);
    let quiet = world(st, "globex", 1);
    // Before the organization has a backend: no stream, no events.
    let (early, early_executions) = task(st, &w, &[3]);
    st.apply_batch(&[Write::End(ending(early_executions[0].id, ExecutionState::Succeeded, T0 + 1))]).must();
    assert_eq!(st.event_bounds(w.org.id).must(), EventBounds { last: 0, oldest: None });
    let erp = st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    // A backend's task: its claim is found by the task's request id and answered in the task's
    // transaction.
    let claim = RequestClaim {
        org_id: w.org.id,
        backend_id: erp.id,
        request_id: 1001,
        digest: vec![7; 32],
        task_request_id: Some(-77),
        at: T0,
    };
    assert_eq!(st.claim_backend_request(&claim).must(), None);
    let (t, executions) =
        st.create_task(&NewTask { request_id: Some(-77), ..new_task(&w, &[0, 1, 2], T0, T0 + DAY_MS) }).must();
    let answer = st.claim_backend_request(&claim).must().and_then(|r| r.answer).expect("answered with the task");
    assert_eq!(
        postcard::from_bytes::<Answer>(&answer).expect("answer"),
        Answer::TaskCreated { task_id: t.number as u64, executions: 3 }
    );
    st.apply_batch(&[
        Write::End(ending(executions[0].id, ExecutionState::Succeeded, T0 + 10)),
        Write::End(ending(executions[0].id, ExecutionState::Failed, T0 + 11)),
        Write::End(ending(executions[1].id, ExecutionState::Failed, T0 + 12)),
    ])
    .must();
    st.expire_due(T0 + DAY_MS).must();
    let got = events(st, w.org.id);
    let kinds: Vec<&str> = got.iter().map(|(_, e)| kind(e)).collect();
    assert_eq!(kinds, ["created", "ended", "ended", "ended", "done"], "{got:?}");
    assert_eq!(got[0].0, 1, "the stream starts at 1");
    assert_eq!(
        got[0].1,
        Event::TaskCreated { task_id: t.number as u64, backend: "erp".into(), request_id: 1001, executions: 3 }
    );
    let Event::ExecutionEnded { sn, outcome, error_code, ksn, kcv, at_ms, execution_id, .. } = &got[1].1 else {
        panic!("an ending")
    };
    assert_eq!((sn.as_str(), outcome.as_str(), *error_code, *at_ms), ("acme-0000", "succeeded", 0, (T0 + 10) as u64));
    assert_eq!((*execution_id, ksn.len(), kcv.clone()), (executions[0].id as u64, 8, vec![0xA0, 0x00, 0x00]));
    let Event::ExecutionEnded { outcome, error_code, meaning, ksn, kcv, .. } = &got[2].1 else { panic!("an ending") };
    assert_eq!(
        (outcome.as_str(), *error_code, meaning.is_empty(), ksn.len(), kcv.len()),
        ("failed", -11208, false, 0, 0)
    );
    let Event::ExecutionEnded { outcome, .. } = &got[3].1 else { panic!("an ending") };
    assert_eq!(outcome, "expired");
    assert_eq!(
        got[4].1,
        Event::TaskDone { task_id: t.number as u64, succeeded: 1, failed: 1, expired: 1, terminated: 0 }
    );
    // An operator's task, stopped: created (no backend), terminated, done.
    let (op, _) = task(st, &w, &[3]);
    st.stop_task(w.org.id, op.id, T0 + 20, &audit("task.stop")).must();
    let got = events(st, w.org.id);
    assert_eq!(got.len(), 8);
    assert_eq!(
        got[5].1,
        Event::TaskCreated { task_id: op.number as u64, backend: String::new(), request_id: 0, executions: 1 }
    );
    assert!(matches!(&got[6].1, Event::ExecutionEnded { outcome, .. } if outcome == "terminated"));
    assert!(matches!(got[7].1, Event::TaskDone { terminated: 1, .. }));
    assert_eq!(st.event_bounds(w.org.id).must(), EventBounds { last: 8, oldest: Some(1) });
    assert_eq!(st.events_after(w.org.id, 6, 1).must().iter().map(|e| e.seq).collect::<Vec<_>>(), [7], "a page");
    assert!(events(st, quiet.org.id).is_empty(), "another organization's stream is its own");
    assert!(early.number < t.number);
}

pub fn two_batches_ending_one_tasks_last_executions_at_once_write_one_task_done(s: &Subject) {
    const EXECUTIONS: usize = 60;
    let st = s.store();
    let w = world(st, "acme", EXECUTIONS);
    st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    for round in 0..3 {
        let (_, executions) = task(st, &w, &(0..EXECUTIONS).collect::<Vec<_>>());
        let writes: Vec<Vec<Write>> = executions
            .chunks(EXECUTIONS / 2)
            .map(|half| half.iter().map(|e| Write::End(ending(e.id, ExecutionState::Failed, T0 + round))).collect())
            .collect();
        std::thread::scope(|scope| {
            let nodes: Vec<_> = writes.iter().map(|w| scope.spawn(|| st.apply_batch(w).must())).collect();
            for node in nodes {
                node.join().expect("node");
            }
        });
    }
    let got = events(st, w.org.id);
    assert_eq!(got.len(), 3 * (1 + EXECUTIONS + 1), "every event once");
    assert_eq!(got.iter().filter(|(_, e)| kind(e) == "done").count(), 3, "one TaskDone per task");
    let ended: HashSet<u64> = got
        .iter()
        .filter_map(
            |(_, e)| if let Event::ExecutionEnded { execution_id, .. } = e { Some(*execution_id) } else { None },
        )
        .collect();
    assert_eq!(ended.len(), 3 * EXECUTIONS);
}

pub fn old_events_and_requests_are_pruned_and_the_oldest_kept_is_reported(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let erp = st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    for i in 0..3 {
        let (t, _) = st.create_task(&new_task(&w, &[i], T0 + i as i64 * DAY_MS, T0 + 90 * DAY_MS)).must();
        st.stop_task(w.org.id, t.id, T0 + i as i64 * DAY_MS, &audit("task.stop")).must();
    }
    assert_eq!(st.event_bounds(w.org.id).must(), EventBounds { last: 9, oldest: Some(1) });
    let claim = RequestClaim {
        org_id: w.org.id,
        backend_id: erp.id,
        request_id: 1,
        digest: vec![1; 32],
        task_request_id: None,
        at: T0,
    };
    st.claim_backend_request(&claim).must();
    st.remember_backend_answer(erp.id, 1, b"a").must();
    let keep_all = Retention { events_before: T0, events_per_org_max: 100, requests_before: T0, rows_max: 1000 };
    assert_eq!(st.prune_channel(&keep_all).must(), (0, 0));
    // The first day's events go by age, then all but the newest four by count.
    let by_age =
        Retention { events_before: T0 + DAY_MS, events_per_org_max: 100, requests_before: T0 + 1, rows_max: 1000 };
    assert_eq!(st.prune_channel(&by_age).must(), (3, 1));
    assert_eq!(st.event_bounds(w.org.id).must(), EventBounds { last: 9, oldest: Some(4) });
    let by_count = Retention { events_before: T0, events_per_org_max: 4, requests_before: T0, rows_max: 1000 };
    assert_eq!(st.prune_channel(&by_count).must().0, 2);
    assert_eq!(st.event_bounds(w.org.id).must(), EventBounds { last: 9, oldest: Some(6) });
    assert_eq!(st.claim_backend_request(&claim).must(), None, "the remembered request was forgotten");
    // A prune deletes at most `rows_max` rows per kind; the rest goes on the next ones.
    for i in 0..2 {
        let (t, _) = st.create_task(&new_task(&w, &[i], T0, T0 + 90 * DAY_MS)).must();
        st.stop_task(w.org.id, t.id, T0, &audit("task.stop")).must();
    }
    let bounded = Retention { events_before: T0 + DAY_MS, events_per_org_max: 100, requests_before: T0, rows_max: 4 };
    assert_eq!(st.prune_channel(&bounded).must().0, 4);
    assert_eq!(st.prune_channel(&bounded).must().0, 2);
    assert_eq!(st.prune_channel(&bounded).must().0, 0);
    // Numbering goes on after a prune.
    task(st, &w, &[0]);
    assert_eq!(st.event_bounds(w.org.id).must().last, 16);
}

/// A backend's `StopTask` and `Unlock` (§12.5): the answer is written by the action's own
/// transaction, on the claimed row only, and never over a first answer.
pub fn a_stop_and_an_unlock_remember_their_answer_in_their_own_transaction(s: &Subject) {
    let st = s.store();
    let w = world(st, "acme", 3);
    let erp = st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    let claim = |request_id: u64| RequestClaim {
        org_id: w.org.id,
        backend_id: erp.id,
        request_id,
        digest: vec![1; 32],
        task_request_id: None,
        at: T0,
    };
    let answering = |request_id: u64, answer: PendingAnswer| Answering { backend_id: erp.id, request_id, answer };
    let remembered = |request_id: u64| {
        st.claim_backend_request(&claim(request_id))
            .must()
            .and_then(|r| r.answer)
            .map(|bytes| postcard::from_bytes::<Answer>(&bytes).expect("an answer"))
    };
    let (t, _) = task(st, &w, &[0, 1]);
    let stopped = PendingAnswer::Stopped { task_id: t.number as u64 };
    assert_eq!(st.claim_backend_request(&claim(1)).must(), None);
    // A stop that fails writes nothing: no answer either.
    let missing =
        st.stop_task(w.org.id, t.id + 1000, T0 + 1, &audit("task.stop").answering(answering(1, stopped.clone())));
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    assert_eq!(remembered(1), None);
    st.stop_task(w.org.id, t.id, T0 + 1, &audit("task.stop").answering(answering(1, stopped.clone()))).must();
    assert_eq!(remembered(1), Some(Answer::Stopped { task_id: t.number as u64, terminated: 2 }), "counted inside");
    // The repeat stops nothing and keeps the first answer.
    st.stop_task(w.org.id, t.id, T0 + 2, &audit("task.stop").answering(answering(1, stopped))).must();
    assert_eq!(remembered(1), Some(Answer::Stopped { task_id: t.number as u64, terminated: 2 }));
    // An unlock's answer, known before its transaction, is written by it.
    let unlocked = Answer::Unlocked { unlocked: 1, unknown: vec!["NOT-MINE".into()] };
    let bytes = postcard::to_stdvec(&unlocked).expect("encode");
    assert_eq!(st.claim_backend_request(&claim(2)).must(), None);
    let unlock = audit("device.unlock").answering(answering(2, PendingAnswer::Encoded(bytes.clone())));
    st.set_unlock_pending(w.devices[2].id, true, Some(&unlock)).must();
    assert_eq!(remembered(2), Some(unlocked));
    assert!(st.device_by_id(w.devices[2].id).must().unlock_pending);
    // No claim, no answer: the claim comes first, and an action never creates one.
    let unclaimed = audit("device.unlock").answering(answering(3, PendingAnswer::Encoded(bytes)));
    st.set_unlock_pending(w.devices[1].id, true, Some(&unclaimed)).must();
    assert_eq!(st.claim_backend_request(&claim(3)).must(), None, "request 3 was not remembered");
}

/// What an external broker must know of the backends: the live ones of every organization, with
/// their organization's slug and password hash.
pub fn the_broker_knows_live_backends_of_every_organization_and_no_revoked_one(s: &Subject) {
    let st = s.store();
    let acme = world(st, "acme", 0);
    let globex = world(st, "globex", 0);
    st.create_backend(&new_backend(&acme, "erp"), &backend_audit("backend.create")).must();
    st.create_backend(&new_backend(&acme, "crm"), &backend_audit("backend.create")).must();
    st.create_backend(&new_backend(&globex, "erp"), &backend_audit("backend.create")).must();
    st.revoke_backend(acme.org.id, "crm", T0, &backend_audit("backend.revoke")).must();
    let known: Vec<(String, String, String)> =
        st.broker_backends().must().into_iter().map(|b| (b.org, b.name, b.password_hash)).collect();
    assert_eq!(
        known,
        [
            ("acme".to_string(), "erp".to_string(), "$7$101$salt$erp".to_string()),
            ("globex".to_string(), "erp".to_string(), "$7$101$salt$erp".to_string()),
        ]
    );
}

/// The view a broker reads at each CONNECT (`rki_broker_credentials`, migration 11) holds exactly
/// the identities the gateway's own rules admit, with their `$7$` hashes: initialised terminals,
/// the bootstrap identity of a live GUDID or of one spent within the proof window and not proven
/// (`live_bootstrap_hashes`, the rule of the file mode and of the MQTT endpoint), live backends.
/// The view reads the database's clock, so this spec's times are the real time's.
pub fn the_broker_credentials_view_holds_exactly_the_identities_a_broker_may_admit(s: &Subject) {
    let st = s.store();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let w = world(st, "acme", 7);
    let gudid = |device: usize, tag: u8, provisioned_at: i64| {
        let row = GudidRow { provisioned_at, expires_at: provisioned_at + 3 * DAY_MS, ..new_gudid(&w, device, tag) };
        st.insert_gudid(&row).must()
    };
    let spend = |row: &GudidRow, device: usize, at: i64| {
        st.spend_gudid(row.id, w.devices[device].id, &new_credentials(&w.devices[device].sn), at).must();
    };
    // 0: initialised long ago (its GUDID proven); 1: a live GUDID; 2: an expired one; 3: a revoked
    // one; 4: spent a second ago, not yet proven; 5: spent 11 minutes ago, never proven; 6: spent
    // and proven.
    let g0 = gudid(0, 1, now - 2 * DAY_MS);
    spend(&g0, 0, now - 2 * DAY_MS + 1);
    st.apply_batch(&[Write::ProveGudid { device_id: w.devices[0].id, generation: 1, at: now - 2 * DAY_MS + 2 }]).must();
    gudid(1, 2, now - 1000);
    gudid(2, 3, now - 3 * DAY_MS - 1);
    let g3 = gudid(3, 4, now - 1000);
    st.revoke_gudid(w.org.id, g3.id, now - 500, &Actor::named("ops")).must();
    let g4 = gudid(4, 5, now - 2000);
    spend(&g4, 4, now - 1000);
    let g5 = gudid(5, 6, now - 20 * 60 * 1000);
    spend(&g5, 5, now - GUDID_PROOF_WINDOW_MS - 60 * 1000);
    let g6 = gudid(6, 7, now - 2000);
    spend(&g6, 6, now - 1500);
    st.apply_batch(&[Write::ProveGudid { device_id: w.devices[6].id, generation: 1, at: now - 1000 }]).must();
    st.create_backend(&new_backend(&w, "erp"), &backend_audit("backend.create")).must();
    st.create_backend(&new_backend(&w, "crm"), &backend_audit("backend.create")).must();
    st.revoke_backend(w.org.id, "crm", now, &backend_audit("backend.revoke")).must();

    let mut view = s.raw_text_pairs("SELECT username, password_hash FROM rki_broker_credentials");
    view.sort();
    // Each row's kind and name (migration 12, what a broker looks up) say the same as its username.
    let mut keyed = s.raw_text_pairs(
        "SELECT CASE kind WHEN 'terminal' THEN name WHEN 'bootstrap' THEN 'init@' || name
                          WHEN 'backend' THEN 'backend@' || name END, password_hash
         FROM rki_broker_credentials",
    );
    keyed.sort();
    assert_eq!(keyed, view, "kind and name name each row's identity");
    let mut expected: Vec<(String, String)> = [0, 4, 5, 6]
        .iter()
        .map(|&i| (w.devices[i].sn.clone(), format!("$7$hash-{}", w.devices[i].sn)))
        .chain([1, 4].iter().map(|&i| {
            (format!("init@{}", w.devices[i].sn), new_gudid(&w, i, i as u8 + 1).bootstrap_hash.expect("hash"))
        }))
        .chain([("backend@acme~erp".to_string(), "$7$101$salt$erp".to_string())])
        .collect();
    expected.sort();
    assert_eq!(view, expected);
    // The same bootstrap identities as the gateway's own rule, at the same moment.
    let mut live: Vec<(String, String)> = st
        .live_bootstrap_hashes(None, now, Some(now - GUDID_PROOF_WINDOW_MS))
        .must()
        .into_iter()
        .map(|(sn, hash)| (format!("init@{sn}"), hash))
        .collect();
    live.sort();
    let from_view: Vec<(String, String)> = view.into_iter().filter(|(u, _)| u.starts_with("init@")).collect();
    assert_eq!(from_view, live);
}

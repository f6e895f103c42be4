//! The backend channel end to end (`docs/PROTOCOL.md` §12): an RKI backend creates tasks over
//! MQTT and receives every outcome exactly once, by `seq`, across its own absences and the
//! gateway's crash. Drives the real gateway binary, simulated terminals, the Python example
//! client (`docs/examples/backend.py`, paho-mqtt) and `rkictl backend watch`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use rki_device_sim::Knobs;
use rki_gateway::api::types::{Task, TaskList};
use rki_protocol::backend::{BackendId, BackendSecret};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::message::{
    Answer, BackendRefusalCode, BackendRequest, Body, Event, Message, Request, TaskOrder, TaskTarget,
};
use rki_protocol::terminal::KeySlot;
use rki_protocol::topic;
use rki_tests::{
    binary, create_task, for_group, mqtt_connect, provision, sns, wait_task, wait_task_done, GatewayOptions,
    GatewayProcess, TestResult,
};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

/// A backend credential as the API shows it once.
struct Credential {
    name: String,
    secret: String,
}

fn create_backend(gw: &GatewayProcess, name: &str) -> TestResult<Credential> {
    create_backend_in(&gw.api(), "acme", name)
}

/// A backend credential of the organization `org` whose admin `api` is.
fn create_backend_in(api: &rki_tests::Api, org: &str, name: &str) -> TestResult<Credential> {
    let v = api.ok_post("/v1/backends", &json!({ "name": name }))?;
    assert_eq!(v["client_id"], format!("backend@{org}~{name}"), "{v}");
    let secret = v["secret"].as_str().ok_or("no secret")?.to_string();
    assert_eq!(secret.len(), 64);
    assert!(v["backend"].get("password_hash").is_none() && v["backend"].get("sealed_mac_key").is_none(), "{v}");
    Ok(Credential { name: name.to_string(), secret })
}

impl Credential {
    fn id(&self, org: &str) -> TestResult<BackendId> {
        Ok(BackendId::new(org, &self.name)?)
    }

    /// Its MQTT password (§12.1).
    fn password(&self, org: &str) -> TestResult<String> {
        let secret = BackendSecret::parse(&self.secret)?;
        Ok(String::from_utf8(secret.mqtt_password(&self.id(org)?).expose_secret().to_vec())?)
    }

    /// Waits until the broker on `port` accepts this backend's CONNECT (an external broker learns
    /// it from the files node 1 rewrites, within seconds).
    async fn wait_admitted(&self, org: &str, port: u16) -> TestResult {
        let (id, password) = (self.id(org)?.client_id(), self.password(org)?);
        let what = format!("the broker to admit {id}");
        let (client, _) =
            rki_tests::wait::poll_async(&what, Duration::from_secs(20), || mqtt_connect(port, &id, &password, true))
                .await?;
        let _ = client.disconnect().await;
        Ok(())
    }
}

/// A hand-driven backend: signs what a test asks, forged or not.
struct RawBackend {
    id: BackendId,
    key: MacKey,
    client: AsyncClient,
    inbox: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    counter: u64,
}

impl RawBackend {
    async fn connect(port: u16, cred: &Credential) -> TestResult<RawBackend> {
        let id = BackendId::new("acme", &cred.name)?;
        let filters = [topic::backend_reply(id.org(), id.name()), topic::backend_events(id.org(), id.name())];
        Self::connect_subscribed(port, cred, &filters).await
    }

    /// Connected, and subscribed to `filters` only (their SUBACKs received).
    async fn connect_subscribed(port: u16, cred: &Credential, filters: &[String]) -> TestResult<RawBackend> {
        let id = BackendId::new("acme", &cred.name)?;
        let secret = BackendSecret::parse(&cred.secret)?;
        let password = String::from_utf8(secret.mqtt_password(&id).expose_secret().to_vec())?;
        let (client, inbox) =
            rki_tests::mqtt_connect_subscribed(port, &id.client_id(), &password, true, filters).await?;
        let counter = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
        Ok(RawBackend { key: secret.mac_key(&id), id, client, inbox, counter })
    }

    /// The frame of `request`, sealed under `key` with a fresh counter and `party`.
    fn frame(&mut self, key: &MacKey, party: &str, request_id: u64, request: Request) -> TestResult<Vec<u8>> {
        self.counter += 1;
        let body = Body {
            party: party.to_string(),
            counter: self.counter,
            message: Message::BackendRequest(BackendRequest { request_id, request }),
        };
        Ok(frame::seal(key, &body)?)
    }

    async fn publish(&self, bytes: Vec<u8>) -> TestResult {
        self.client
            .publish(topic::backend_request(self.id.org(), self.id.name()), QoS::AtLeastOnce, false, bytes)
            .await?;
        Ok(())
    }

    async fn send(&mut self, request_id: u64, request: Request) -> TestResult<Vec<u8>> {
        let key = self.key.clone_secret();
        let bytes = self.frame(&key, "acme", request_id, request)?;
        self.publish(bytes.clone()).await?;
        Ok(bytes)
    }

    /// The next verified message, or `None` after `quiet` without one.
    async fn next(&mut self, quiet: Duration) -> Option<Message> {
        loop {
            let (_, bytes) = tokio::time::timeout(quiet, self.inbox.recv()).await.ok()??;
            let Ok(verified) = frame::open_backend(&bytes).and_then(|u| u.verify(&self.key)) else { continue };
            if verified.body.party == "acme" {
                return Some(verified.body.message);
            }
        }
    }

    /// Whether no event arrives within `quiet` (answers to earlier requests may).
    async fn no_event_within(&mut self, quiet: Duration) -> bool {
        loop {
            match self.next(quiet).await {
                Some(Message::BackendEvent(e)) => {
                    eprintln!("unexpected event {e:?}");
                    return false;
                }
                Some(_) => {}
                None => return true,
            }
        }
    }

    async fn answer(&mut self, request_id: u64, timeout: Duration) -> TestResult<Answer> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.next(deadline.saturating_duration_since(Instant::now())).await {
                Some(Message::BackendAnswer(a)) if a.request_id == request_id => return Ok(a.answer),
                Some(_) => {}
                None => break,
            }
        }
        Err(format!("no answer to request {request_id}").into())
    }

    /// Every event from `after + 1` on, as a backend processes them (§12.6), until `stop` holds
    /// for the events so far or `timeout`: each `seq` exactly once, in order.
    async fn events(
        &mut self,
        after: u64,
        timeout: Duration,
        stop: impl Fn(&[(u64, Event)]) -> bool,
    ) -> TestResult<Vec<(u64, Event)>> {
        let deadline = Instant::now() + timeout;
        let mut processed = after;
        let mut out = Vec::new();
        let mut asked = 900_000_000 + after;
        self.send(asked, Request::Events { after: processed }).await?;
        let mut outstanding = true;
        let mut last_ack = Instant::now();
        let mut since_ack = 0usize;
        while Instant::now() < deadline && !stop(&out) {
            match self.next(Duration::from_millis(500)).await {
                Some(Message::BackendEvent(e)) if e.seq == processed + 1 => {
                    processed = e.seq;
                    out.push((e.seq, e.event));
                    since_ack += 1;
                }
                Some(Message::BackendEvent(e)) if e.seq > processed + 1 && !outstanding => {
                    asked += 1;
                    self.send(asked, Request::Events { after: processed }).await?;
                    outstanding = true;
                }
                Some(Message::BackendAnswer(a)) if a.request_id == asked => outstanding = false,
                _ => {}
            }
            if !outstanding && (last_ack.elapsed() > Duration::from_secs(1) || since_ack >= 100) {
                since_ack = 0;
                asked += 1;
                self.send(asked, Request::Events { after: processed }).await?;
                outstanding = true;
                last_ack = Instant::now();
            }
        }
        Ok(out)
    }
}

fn order(target: TaskTarget) -> TaskOrder {
    TaskOrder { target, key_source: String::new(), slot: KeySlot(1), expiry_days: 0 }
}

fn tasks(gw: &GatewayProcess) -> TestResult<Vec<Task>> {
    Ok(gw.api().ok_as::<TaskList>("/v1/tasks")?.tasks)
}

/// Checks the sequence an exactly-once backend saw for one task of `n` executions: contiguous
/// numbers, one `TaskCreated`, one ending per execution (each SN once), one `TaskDone` last.
fn check_task_events(events: &[(u64, Event)], task: u64, n: usize) -> TestResult<BTreeMap<String, String>> {
    for pair in events.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "seq numbers have a hole or a repeat");
    }
    let mine: Vec<&Event> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| match e {
            Event::TaskCreated { task_id, .. }
            | Event::ExecutionEnded { task_id, .. }
            | Event::TaskDone { task_id, .. } => *task_id == task,
        })
        .collect();
    let created = mine.iter().filter(|e| matches!(e, Event::TaskCreated { .. })).count();
    assert_eq!(created, 1, "one TaskCreated");
    let mut outcomes = BTreeMap::new();
    let mut executions = HashSet::new();
    for e in &mine {
        if let Event::ExecutionEnded { sn, outcome, execution_id, ksn, kcv, error_code, .. } = e {
            assert!(outcomes.insert(sn.clone(), outcome.clone()).is_none(), "{sn} ended twice");
            assert!(executions.insert(*execution_id));
            if outcome == "succeeded" {
                assert!(!ksn.is_empty() && kcv.len() == 3 && *error_code == 0, "{e:?}");
            }
        }
    }
    assert_eq!(outcomes.len(), n, "one ending per execution");
    match mine.last() {
        Some(Event::TaskDone { succeeded, failed, expired, terminated, .. }) => {
            assert_eq!((*succeeded + *failed + *expired + *terminated) as usize, n)
        }
        other => return Err(format!("the last event of the task is not TaskDone: {other:?}").into()),
    }
    assert_eq!(mine.iter().filter(|e| matches!(e, Event::TaskDone { .. })).count(), 1, "one TaskDone");
    Ok(outcomes)
}

fn is_done(task: u64) -> impl Fn(&[(u64, Event)]) -> bool {
    move |events| events.iter().any(|(_, e)| matches!(e, Event::TaskDone { task_id, .. } if *task_id == task))
}

#[test]
fn the_python_example_creates_a_task_for_50_terminals_and_receives_every_outcome_once() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let provisioned = provision(&gw, &sns("PYB", 50), "warehouse")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    let cred = create_backend(&gw, "erp-1")?;
    run_python_example(gw.mqtt_port, &cred, "warehouse", 1001, 50)?;
    // Through the service layer: the task and its audit entry name the backend.
    let audit = gw.api().ok("/v1/audit?limit=20")?;
    let entry = audit["audit"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["action"] == "task.create").cloned())
        .ok_or(format!("no task.create entry: {audit}"))?;
    assert_eq!(entry["actor"], "backend:erp-1", "{entry}");
    assert!(gw.metric("rki_backend_events_published_total") >= 52.0);
    rt.block_on(fleet.shutdown());
    Ok(())
}

/// Runs `docs/examples/backend.py` as the `acme` backend `cred` against the broker on `port`: it
/// creates a task for `group` as `request_id` and must print `TaskCreated` for `n` executions,
/// then every event from `seq` 1 on, once each and in order, ending with the task's `TaskDone`
/// (every execution succeeded, with the KCV the test BDK gives).
fn run_python_example(port: u16, cred: &Credential, group: &str, request_id: u64, n: usize) -> TestResult {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/backend.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--port", &port.to_string(), "--org", "acme", "--name", &cred.name, "--group", group])
        .args(["--request-id", &request_id.to_string(), "--timeout", "90"])
        .env("RKI_BACKEND_SECRET", &cred.secret)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "backend.py failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let answer = lines.iter().find(|l| l["answer"].is_string()).ok_or("no answer")?;
    assert_eq!(answer["answer"], "TaskCreated", "{answer}");
    assert_eq!(answer["executions"], n);
    let task = answer["task_id"].clone();
    let events: Vec<&Value> = lines.iter().filter(|l| l["seq"].is_u64()).collect();
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "every seq once, in order");
    let created: Vec<&&Value> = events.iter().filter(|e| e["event"] == "task_created").collect();
    assert_eq!(created.len(), 1);
    assert_eq!(
        (created[0]["backend"].as_str(), created[0]["request_id"].as_u64()),
        (Some(cred.name.as_str()), Some(request_id))
    );
    let ended: Vec<&&Value> =
        events.iter().filter(|e| e["event"] == "execution_ended" && e["task_id"] == task).collect();
    assert_eq!(ended.len(), n);
    let sns_ended: HashSet<&str> = ended.iter().filter_map(|e| e["sn"].as_str()).collect();
    assert_eq!(sns_ended.len(), n);
    for e in &ended {
        assert_eq!((e["outcome"].as_str(), e["meaning"].as_str()), (Some("succeeded"), Some("success")), "{e}");
        let ksn = e["ksn"].as_str().unwrap_or_default();
        assert_eq!(e["kcv"].as_str(), Some(rki_tests::expected_kcv(ksn)?.as_str()), "{e}");
    }
    let done = events.last().ok_or("no events")?;
    assert_eq!((done["event"].as_str(), done["succeeded"].as_u64()), (Some("task_done"), Some(n as u64)), "{done}");
    Ok(())
}

#[test]
fn a_repeated_request_id_yields_one_task_and_a_reused_one_is_refused() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let provisioned = provision(&gw, &sns("DUP", 5), "dup")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    let cred = create_backend(&gw, "erp-dup")?;
    rt.block_on(async {
        let mut b = RawBackend::connect(gw.mqtt_port, &cred).await?;
        let create = Request::CreateTask(order(TaskTarget::Group("dup".into())));
        b.send(7, create.clone()).await?;
        let first = b.answer(7, Duration::from_secs(30)).await?;
        assert!(matches!(first, Answer::TaskCreated { executions: 5, .. }), "{first:?}");
        // The same request again (a retry with a new counter): the first answer, nothing new.
        b.send(7, create.clone()).await?;
        assert_eq!(b.answer(7, Duration::from_secs(10)).await?, first);
        // The same id for another request: refused, nothing done.
        b.send(7, Request::CreateTask(order(TaskTarget::Devices(vec!["DUP-00001".into()])))).await?;
        let reused = b.answer(7, Duration::from_secs(10)).await?;
        assert!(matches!(reused, Answer::Refused { code, .. } if code == BackendRefusalCode::RequestIdReused.code()));
        // Read-only requests are answered afresh.
        let Answer::TaskCreated { task_id, .. } = first else { unreachable!() };
        b.send(8, Request::QueryTask { task_id }).await?;
        assert!(matches!(b.answer(8, Duration::from_secs(10)).await?, Answer::TaskState { .. }));
        b.send(9, Request::QueryTask { task_id: task_id + 100 }).await?;
        let missing = b.answer(9, Duration::from_secs(10)).await?;
        assert!(matches!(missing, Answer::Refused { code, .. } if code == BackendRefusalCode::NotFound.code()));
        TestResult::Ok(())
    })?;
    assert_eq!(tasks(&gw)?.len(), 1, "one task");
    // Across a restart too: the answer is durable.
    let mut gw = gw;
    gw.restart()?;
    rt.block_on(async {
        let mut b = RawBackend::connect(gw.mqtt_port, &cred).await?;
        b.send(7, Request::CreateTask(order(TaskTarget::Group("dup".into())))).await?;
        let again = b.answer(7, Duration::from_secs(10)).await?;
        assert!(matches!(again, Answer::TaskCreated { executions: 5, .. }), "{again:?}");
        TestResult::Ok(())
    })?;
    assert_eq!(tasks(&gw)?.len(), 1, "still one task after a restart");
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn forged_replayed_and_foreign_requests_are_dropped_counted_and_change_nothing() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    provision(&gw, &sns("FORGE", 3), "forge")?;
    let cred = create_backend(&gw, "erp-f")?;
    let other = create_backend(&gw, "erp-other")?;
    for reason in ["bad_mac", "replay", "party_mismatch", "unknown_backend", "bad_frame"] {
        let sample = format!("rki_backend_requests_refused_total{{reason=\"{reason}\"}}");
        let (_, text) = gw.api().get_text("/metrics");
        assert!(text.contains(&sample), "{sample} is exported from the start");
    }
    rt.block_on(async {
        let mut b = RawBackend::connect(gw.mqtt_port, &cred).await?;
        let create = || Request::CreateTask(order(TaskTarget::Group("forge".into())));
        // A tag under another backend's key (the organization's other backend).
        let other_key = BackendSecret::parse(&other.secret)?.mac_key(&BackendId::new("acme", &other.name)?);
        let forged = b.frame(&other_key, "acme", 1, create())?;
        b.publish(forged).await?;
        // A frame for another organization, under the right key.
        let key = b.key.clone_secret();
        let foreign = b.frame(&key, "globex", 2, create())?;
        b.publish(foreign).await?;
        // Garbage.
        b.publish(vec![1, 2, 3]).await?;
        assert!(b.next(Duration::from_secs(2)).await.is_none(), "no answer to a dropped frame (no oracle)");
        // A valid request, then the very same frame again: a replay.
        let valid = b.send(3, Request::QueryTask { task_id: 1 }).await?;
        let _ = b.answer(3, Duration::from_secs(10)).await?;
        b.publish(valid).await?;
        assert!(b.next(Duration::from_secs(2)).await.is_none(), "no answer to a replay");
        TestResult::Ok(())
    })?;
    assert_eq!(gw.metric("rki_backend_requests_refused_total{reason=\"bad_mac\"}"), 1.0);
    assert_eq!(gw.metric("rki_backend_requests_refused_total{reason=\"party_mismatch\"}"), 1.0);
    assert_eq!(gw.metric("rki_backend_requests_refused_total{reason=\"bad_frame\"}"), 1.0);
    assert_eq!(gw.metric("rki_backend_requests_refused_total{reason=\"replay\"}"), 1.0);
    assert!(tasks(&gw)?.is_empty(), "nothing was created");
    // A wrong password, and a revoked backend, are refused at CONNECT.
    rt.block_on(async {
        let id = BackendId::new("acme", "erp-f")?;
        assert!(mqtt_connect(gw.mqtt_port, &id.client_id(), &"0".repeat(64), true).await.is_err());
        gw.api().ok_post("/v1/backends/erp-f/revoke", &json!({}))?;
        assert!(RawBackend::connect(gw.mqtt_port, &cred).await.is_err(), "a revoked backend cannot connect");
        TestResult::Ok(())
    })?;
    let listed = gw.api().ok("/v1/backends")?;
    let revoked = listed["backends"].as_array().and_then(|a| a.iter().find(|b| b["name"] == "erp-f").cloned());
    assert!(revoked.is_some_and(|b| !b["revoked_at"].is_null()), "{listed}");
    Ok(())
}

/// On the embedded endpoint, revoking a backend closes its live connection at once (not merely at
/// its next request), counted as `revoked`; another backend of the organization keeps its own.
#[test]
fn revoking_a_backend_closes_its_live_connection_at_once() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let doomed = create_backend(&gw, "erp-doomed")?;
    let kept = create_backend(&gw, "erp-kept")?;
    rt.block_on(async {
        let mut d = RawBackend::connect(gw.mqtt_port, &doomed).await?;
        let mut k = RawBackend::connect(gw.mqtt_port, &kept).await?;
        d.send(1, Request::QueryTask { task_id: 1 }).await?;
        d.answer(1, Duration::from_secs(10)).await?;
        let revoked_at = Instant::now();
        gw.api().ok_post("/v1/backends/erp-doomed/revoke", &json!({}))?;
        // The connection ends: the client's event loop stops and its inbox closes.
        let closed =
            tokio::time::timeout(Duration::from_secs(2), async { while d.inbox.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "the revoked backend is still connected");
        eprintln!("closed {:?} after the revocation's API call began", revoked_at.elapsed());
        assert!(RawBackend::connect(gw.mqtt_port, &doomed).await.is_err(), "a revoked backend reconnects");
        k.send(1, Request::QueryTask { task_id: 1 }).await?;
        k.answer(1, Duration::from_secs(10)).await?;
        TestResult::Ok(())
    })?;
    assert_eq!(gw.metric("rki_mqtt_connections_closed_total{reason=\"revoked\"}"), 1.0);
    Ok(())
}

/// The endpoint keeps each of a backend's subscriptions on its own (§12.2): subscribed to its
/// reply topic only, a backend gets its answers and no event; once subscribed to its events topic
/// too it gets them (from the store, by asking); unsubscribed from its reply topic, it still gets
/// events but no answer.
#[test]
fn a_backend_subscribed_to_its_replies_only_is_sent_no_events() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let provisioned = provision(&gw, &sns("SUBS", 2), "subs")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    let cred = create_backend(&gw, "erp-subs")?;
    let task = create_task(&gw.api(), &for_group("subs"))?.task.id;
    wait_task_done(&gw.api(), task, Duration::from_secs(60))?;
    // TaskCreated, two endings, TaskDone.
    let last = 4;
    let (reply, events) = (topic::backend_reply("acme", "erp-subs"), topic::backend_events("acme", "erp-subs"));
    rt.block_on(async {
        let mut b = RawBackend::connect_subscribed(gw.mqtt_port, &cred, std::slice::from_ref(&reply)).await?;
        let dropped = || gw.metric("rki_mqtt_downlinks_dropped_total{reason=\"no_session\"}");
        let dropped_before = dropped();
        b.send(1, Request::Events { after: 0 }).await?;
        assert_eq!(b.answer(1, Duration::from_secs(10)).await?, Answer::Events { after: 0, last });
        assert!(b.no_event_within(Duration::from_secs(1)).await, "an event on a topic it did not subscribe to");
        assert!(dropped() >= dropped_before + last as f64, "the pushed events were dropped at the session");
        // Subscribed to its events too: asking again brings them.
        b.client.subscribe(events.clone(), QoS::AtLeastOnce).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = b.events(0, Duration::from_secs(10), |e| e.len() >= last as usize).await?;
        assert_eq!(got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
        // Unsubscribed from its replies: the events still come, the answers do not.
        b.client.unsubscribe(reply.clone()).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.send(900, Request::Events { after: 0 }).await?;
        let mut seqs = Vec::new();
        while let Some(message) = b.next(Duration::from_secs(1)).await {
            match message {
                Message::BackendEvent(e) => seqs.push(e.seq),
                Message::BackendAnswer(a) => return Err(format!("an answer after UNSUBSCRIBE: {a:?}").into()),
                _ => {}
            }
        }
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
        TestResult::Ok(())
    })?;
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn a_backend_offline_during_the_push_receives_every_event_after_it_reconnects_exactly_once() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let provisioned = provision(&gw, &sns("OFF", 30), "off")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    let cred = create_backend(&gw, "erp-off")?;
    // An operator's task, pushed while no backend is connected.
    let task = create_task(&gw.api(), &for_group("off"))?.task.id;
    wait_task_done(&gw.api(), task, Duration::from_secs(60))?;
    // `rkictl backend watch` catches up from the start, acknowledging as it goes.
    let out = Command::new(binary("rkictl"))
        .args(["backend", "watch", "--mqtt", &format!("127.0.0.1:{}", gw.mqtt_port), "--org", "acme"])
        .args(["--name", "erp-off", "--count", "32", "--idle-seconds", "30"])
        .env("RKI_BACKEND_SECRET", &cred.secret)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let seqs: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=32).collect::<Vec<_>>(), "{stdout}");
    assert_eq!(lines[0]["event"], "task_created");
    assert_eq!((lines[0]["backend"].as_str(), lines[0]["request_id"].as_u64()), (Some(""), Some(0)), "an operator's");
    assert_eq!(lines[31]["event"], "task_done");
    // A second absence: half the events processed, then gone; the rest comes once on return.
    rt.block_on(async {
        let mut b = RawBackend::connect(gw.mqtt_port, &cred).await?;
        let events = b.events(16, Duration::from_secs(20), |e| e.len() >= 16).await?;
        assert_eq!(events.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (17..=32).collect::<Vec<_>>());
        assert!(b.no_event_within(Duration::from_secs(1)).await, "nothing more, nothing twice");
        // Up to date: the answer says so and nothing follows; above the latest: a conflict.
        b.send(50, Request::Events { after: 32 }).await?;
        assert_eq!(b.answer(50, Duration::from_secs(5)).await?, Answer::Events { after: 32, last: 32 });
        b.send(51, Request::Events { after: 33 }).await?;
        let above = b.answer(51, Duration::from_secs(5)).await?;
        assert!(matches!(above, Answer::Refused { code, .. } if code == BackendRefusalCode::Conflict.code()));
        TestResult::Ok(())
    })?;
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn sigkill_mid_push_loses_no_event_and_doubles_none() -> TestResult {
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let provisioned = provision(&gw, &sns("KILLB", 300), "killb")?;
    let knobs = Knobs { ack_delay: Duration::from_millis(1500), ..Knobs::default() };
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, knobs)?,
        Duration::from_secs(90),
    ))?;
    let cred = create_backend(&gw, "erp-kill")?;
    let task = rt.block_on(async {
        let mut b = RawBackend::connect(gw.mqtt_port, &cred).await?;
        b.send(1, Request::CreateTask(order(TaskTarget::Group("killb".into())))).await?;
        match b.answer(1, Duration::from_secs(60)).await? {
            Answer::TaskCreated { task_id, executions: 300 } => TestResult::Ok(task_id),
            other => Err(format!("{other:?}").into()),
        }
    })?;
    // Killed once some acks are recorded and many are not.
    wait_task(&gw.api(), task as i64, Duration::from_secs(30), |c| c.succeeded >= 1)?;
    gw.kill()?;
    gw.restart()?;
    let done = wait_task_done(&gw.api(), task as i64, Duration::from_secs(120))?;
    assert_eq!(done.task.counts.succeeded, 300, "{:?}", done.task.counts);
    // The backend reads everything from the start: exactly the store's endings, once each.
    rt.block_on(async {
        let mut b = RawBackend::connect(gw.mqtt_port, &cred).await?;
        let events = b.events(0, Duration::from_secs(60), is_done(task)).await?;
        let outcomes = check_task_events(&events, task, 300)?;
        assert!(outcomes.values().all(|o| o == "succeeded"));
        assert!(b.no_event_within(Duration::from_secs(1)).await, "nothing twice");
        TestResult::Ok(())
    })?;
    rt.block_on(fleet.shutdown());
    Ok(())
}

/// External-broker mode, two nodes on Mosquitto and PostgreSQL: a request published once reaches
/// one node through the shared subscription and is answered once; its repeat is answered from the
/// shared store by whichever node gets it. The backend connects to Mosquitto as itself, admitted
/// by the password and ACL files node 1 writes.
#[test]
fn with_two_nodes_on_an_external_broker_a_request_is_handled_once() -> TestResult {
    let rt = common::runtime();
    let cluster = rki_tests::Cluster::start(rki_tests::ClusterOptions { nodes: 2, ..Default::default() })?;
    let cred = create_backend(&cluster.nodes[0], "erp-ext")?;
    let port = cluster.mosquitto.port;
    rt.block_on(async {
        cred.wait_admitted("acme", port).await?;
        let mut b = RawBackend::connect(port, &cred).await?;
        let unlock = Request::Unlock { sns: vec!["NOT-A-DEVICE".into()] };
        let requests = [(1, Request::QueryTask { task_id: 1 }), (2, unlock.clone()), (2, unlock)];
        let mut answers = Vec::new();
        for (request_id, request) in requests {
            b.send(request_id, request).await?;
            answers.push(b.answer(request_id, Duration::from_secs(10)).await?);
        }
        assert!(matches!(answers[0], Answer::Refused { code, .. } if code == BackendRefusalCode::NotFound.code()));
        assert_eq!(answers[1], Answer::Unlocked { unlocked: 0, unknown: vec!["NOT-A-DEVICE".into()] });
        assert_eq!(answers[2], answers[1], "the repeat gets the first answer");
        assert!(b.next(Duration::from_secs(2)).await.is_none(), "one answer each");
        TestResult::Ok(())
    })?;
    let handled = |request: &str| cluster.metric_sum(&format!("rki_backend_requests_total{{request=\"{request}\"}}"));
    assert_eq!((handled("query_task"), handled("unlock")), (1.0, 2.0), "each request handled by one node");
    assert_eq!(cluster.metric_sum("rki_backend_requests_refused_total{reason=\"replay\"}"), 0.0);
    Ok(())
}

/// External-broker mode on Mosquitto's files (two nodes, PostgreSQL): the Python example connects
/// to Mosquitto as the backend identity itself, creates a task for simulated terminals and gets
/// every execution's ending and `TaskDone` as they happen. Mosquitto confines each backend to its
/// own topics: a backend of another organization neither receives nor publishes anything of
/// `acme`'s. A revoked backend is refused at its next CONNECT.
#[test]
fn through_mosquitto_a_backend_connects_as_itself_is_confined_and_is_refused_once_revoked() -> TestResult {
    let rt = common::runtime();
    let cluster = rki_tests::Cluster::start(rki_tests::ClusterOptions { nodes: 2, ..Default::default() })?;
    let port = cluster.mosquitto.port;
    let provisioned = provision(&cluster.nodes[0], &sns("MQB", 20), "mqb")?;
    rt.block_on(rki_tests::wait_bootstrap_admitted(port, &provisioned.gudids, Duration::from_secs(15)))?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    // Created through node 2: node 1, which writes Mosquitto's files, learns it from the store.
    let cred = create_backend(&cluster.nodes[1], "erp-mq")?;
    rt.block_on(cred.wait_admitted("acme", port))?;
    run_python_example(port, &cred, "mqb", 3001, 20)?;
    assert!(cluster.metric_sum("rki_backend_events_published_total") >= 22.0);

    // Another organization's backend, on the same broker.
    let globex = rki_tests::Api::new(&cluster.nodes[0].url(), &cluster.nodes[0].init_org("globex")?);
    let other = create_backend_in(&globex, "globex", "erp-g")?;
    let other_id = other.id("globex")?;
    rt.block_on(async {
        other.wait_admitted("globex", port).await?;
        let acme = |leaf: &str| format!("rki/v1/backend/acme/erp-mq/{leaf}");
        let spying = [acme("reply"), acme("events"), "rki/v1/backend/acme/#".into(), "#".into()];
        let (spy, mut seen) =
            rki_tests::mqtt_connect_subscribed(port, &other_id.client_id(), &other.password("globex")?, true, &spying)
                .await?;
        // acme's backend asks something: its answer goes by acme's reply topic.
        let mut b = RawBackend::connect(port, &cred).await?;
        b.send(1, Request::QueryTask { task_id: 1 }).await?;
        assert!(matches!(b.answer(1, Duration::from_secs(10)).await?, Answer::TaskState { .. }));
        b.send(2, Request::Events { after: 0 }).await?;
        assert!(matches!(b.answer(2, Duration::from_secs(10)).await?, Answer::Events { after: 0, .. }));
        let leaked = tokio::time::timeout(Duration::from_secs(1), seen.recv()).await;
        assert!(leaked.is_err(), "globex's backend received acme's traffic: {leaked:?}");
        // Publishing on acme's request topic: the broker drops it, no node sees it. The same
        // bytes on its own topic reach a node (and are dropped there as a bad frame).
        let bad_frames = || cluster.metric_sum("rki_backend_requests_refused_total{reason=\"bad_frame\"}");
        let before = bad_frames();
        spy.publish(acme("req"), QoS::AtLeastOnce, false, vec![1, 2, 3]).await?;
        // Time passing is the point: nothing must arrive (there is no event to wait for).
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(bad_frames(), before, "a foreign request topic reached the gateway");
        let own = topic::backend_request("globex", "erp-g");
        spy.publish(own, QoS::AtLeastOnce, false, vec![1, 2, 3]).await?;
        rki_tests::wait::poll_async("globex's own request to reach a node", Duration::from_secs(10), || async {
            if bad_frames() > before {
                Ok(())
            } else {
                Err("not yet")
            }
        })
        .await?;
        TestResult::Ok(())
    })?;

    // Revoked through node 2; node 1 rewrites the files within its 5 s.
    cluster.api(1).ok_post("/v1/backends/erp-mq/revoke", &json!({}))?;
    let (id, password) = (cred.id("acme")?.client_id(), cred.password("acme")?);
    rt.block_on(rki_tests::wait::poll_async(
        "Mosquitto to refuse the revoked backend",
        Duration::from_secs(20),
        || {
            let (id, password) = (id.clone(), password.clone());
            async move {
                match mqtt_connect(port, &id, &password, true).await {
                    Ok(_) => Err("still admitted".to_string()),
                    Err(e) => Ok(e.to_string()),
                }
            }
        },
    ))?;
    // The other organization's backend is untouched.
    rt.block_on(other.wait_admitted("globex", port))?;
    rt.block_on(fleet.shutdown());
    Ok(())
}

//! The engine's contract, in process and without a socket: an [`Engine`] on a SQLite store in a
//! temporary directory, a recording [`Outbound`] that keeps every publish, and the adjustable
//! [`Clock`]. Terminals are played by hand with `rki-protocol`: real CreateKey frames with an
//! X25519 exchange, signed hellos and acks, forged ones too. Every key block delivered is unwrapped
//! here and its KCV checked against an IPEK derived independently from the test BDK.
//!
//! Only the engine's public face is used (`Engine::start`, `submit`, the operator actions, `flush`),
//! plus the store for the setup an operator does through the API and for reading what became
//! durable. Nothing here sleeps for a fixed time: the engine's inbound path is asynchronous, so a
//! test waits (bounded) for a publish it expects, and proves that a message changed nothing by
//! sending a *sentinel* after it on the same device: one device's messages are handled in order, so
//! once the sentinel's effect is seen, the message before it has been handled.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rki_gateway::clock::Clock;
use rki_gateway::domain::ExecutionState;
use rki_gateway::engine::{Engine, EngineOptions, InboundMessage, Outbound, Target, TaskSpec, RETRY_MAX_MS};
use rki_gateway::keyservice::{KeyService, MasterKey, SoftwareKeyService};
use rki_gateway::service::orgs;
use rki_gateway::store::sqlite::SqliteStore;
use rki_gateway::store::{
    Actor, Audit, ExecutionRow, Gudids, ImportRow, KeySourceRow, KeySources, RecordFilter, RecordRow, Registry, Store,
    Tasks,
};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::{self, DeviceSecrets, Ephemeral, Gudid};
use rki_protocol::message::{Ack, Body, CreateKey, Download, Hello, Message, RefusalCode};
use rki_protocol::terminal::{InjectionType, Region};
use rki_protocol::{topic, tr31, KcvLen, SecretBytes, SymmetricKey};

/// The ANSI X9.24-1 sample BDK, the same as the end-to-end tests'.
const TEST_BDK: &str = "0123456789ABCDEFFEDCBA9876543210";
const ORG: &str = "acme";
const KEY_SOURCE: &str = "bdk-test";
const DAY_MS: i64 = 86_400_000;
/// How long a test waits for something the engine does at once (a publish, a sweep): generous
/// for a loaded 2-core CI machine, and still a clear failure rather than a hang.
const WAIT: Duration = Duration::from_secs(20);
/// How often a bounded wait looks again.
const POLL: Duration = Duration::from_millis(5);

// ------------------------------------------------------------------------------------ the world

/// Keeps every publish of the engine, in order; plays the transport's word on presence for the
/// SNs a test marks gone (their connection ended), and says nothing for the others.
#[derive(Default)]
struct Recorder {
    published: Mutex<Vec<(String, Vec<u8>)>>,
    gone: Mutex<std::collections::HashSet<String>>,
}

impl Outbound for Recorder {
    fn publish(&self, topic: String, payload: Vec<u8>) {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).push((topic, payload));
    }

    fn device_connected(&self, sn: &str) -> Option<bool> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).contains(sn).then_some(false)
    }
}

impl Recorder {
    /// The transport says the device `sn`'s connection has ended (`true`) or says nothing.
    fn set_gone(&self, sn: &str, gone: bool) {
        let mut set = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if gone {
            set.insert(sn.to_string());
        } else {
            set.remove(sn);
        }
    }

    /// How many publishes so far: a mark to look for new ones from.
    fn mark(&self) -> usize {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The payloads published on `topic` since `mark`.
    fn since(&self, mark: usize, topic: &str) -> Vec<Vec<u8>> {
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.iter().skip(mark).filter(|(t, _)| t == topic).map(|(_, p)| p.clone()).collect()
    }
}

/// A directory removed on drop (kept when the test fails, for a look at the store).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rki-engine-suite-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The global metrics recorder, installed once for this test binary: the rejection counters are
/// how the engine says why it refused a message.
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| rki_gateway::metrics::install().expect("install the metrics recorder"))
}

/// The value of `rki_rejected_messages_total{kind, reason}` (0 if never counted).
fn rejected(kind: &str, reason: &str) -> f64 {
    let text = metrics().render();
    let (kind, reason) = (format!("kind=\"{kind}\""), format!("reason=\"{reason}\""));
    text.lines()
        .filter(|l| l.starts_with("rki_rejected_messages_total{") && l.contains(&kind) && l.contains(&reason))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// An engine on a SQLite store in its own directory, with a runtime of its own so that a test can
/// stop it (dropping the runtime ends every task the engine spawned) and start another on the
/// same store.
struct World {
    dir: TempDir,
    runtime: Option<tokio::runtime::Runtime>,
    store: Arc<SqliteStore>,
    clock: Arc<Clock>,
    out: Arc<Recorder>,
    engine: Option<Arc<Engine>>,
    org_id: i64,
}

impl World {
    /// A fresh store with the organization `acme` and the test BDK authorized for it as
    /// `bdk-test`, and an engine on it.
    fn new() -> World {
        let dir = TempDir::new();
        let store = SqliteStore::open(&dir.path().join("rki.sqlite")).expect("open the store");
        let keys = Self::keys(dir.path());
        let now = Clock::system().now_ms();
        let org =
            orgs::create_org(&store, ORG, &Actor::named("engine-suite"), now).expect("create the organization").org;
        let bdk = SymmetricKey::tdes_from_hex(TEST_BDK).expect("test BDK");
        let sealed = keys.seal_bdk(&bdk).expect("seal the BDK");
        store
            .insert_key_source(
                &KeySourceRow {
                    id: 0,
                    org_id: org.id,
                    name: KEY_SOURCE.into(),
                    algorithm: sealed.algorithm.as_str().into(),
                    kcv: sealed.kcv.to_hex(),
                    sealed: sealed.sealed,
                    key_set_id: hex::encode_upper(SecretBytes::random(5).expect("randomness").expose_secret()),
                    created_at: now,
                },
                &audit("key_source.authorize"),
            )
            .expect("authorize the BDK");
        drop(store);
        Self::start(dir, org.id)
    }

    fn keys(dir: &Path) -> SoftwareKeyService {
        let (master, _) = MasterKey::load_or_create(&dir.join("master.key")).expect("master key");
        SoftwareKeyService::new(master)
    }

    /// Opens the store in `dir` and starts an engine on it. The clock keeps its offset in `dir`,
    /// as the gateway's adjustable clock does across restarts.
    fn start(dir: TempDir, org_id: i64) -> World {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
        let store = Arc::new(SqliteStore::open(&dir.path().join("rki.sqlite")).expect("open the store"));
        let keys: Arc<dyn KeyService> = Arc::new(Self::keys(dir.path()));
        let clock = Arc::new(Clock::adjustable_persisted(dir.path()).expect("adjustable clock"));
        let out = Arc::new(Recorder::default());
        let store_dyn: Arc<dyn Store> = store.clone();
        let outbound: Arc<dyn Outbound> = out.clone();
        // No re-delivery by the retry timer while a test counts deliveries: only a hello sends.
        let options = EngineOptions { retry_initial_ms: RETRY_MAX_MS, ..EngineOptions::default() };
        let engine = runtime
            .block_on(Engine::start_with(store_dyn, keys, clock.clone(), outbound, options))
            .unwrap_or_else(|e| panic!("engine start: {e}"));
        World { dir, runtime: Some(runtime), store, clock, out, engine: Some(engine), org_id }
    }

    /// Stops the engine once everything queued is durable, and starts a new one on the same
    /// store and master key: what a gateway restart does.
    fn restart(mut self) -> World {
        self.run(|e| async move { e.flush().await.unwrap_or_else(|err| panic!("flush: {err}")) });
        self.engine = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(WAIT);
        }
        let World { dir, org_id, .. } = self;
        World::start(dir, org_id)
    }

    fn engine(&self) -> Arc<Engine> {
        self.engine.clone().expect("engine running")
    }

    /// Runs `f` on the engine, in the engine's runtime.
    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(Arc<Engine>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let engine = self.engine();
        self.runtime.as_ref().expect("runtime").block_on(f(engine))
    }

    fn submit(&self, topic: String, payload: Vec<u8>) {
        self.run(|e| async move { e.submit(InboundMessage::new(topic, payload)).await });
    }

    /// Waits until everything the engine queued so far is durable.
    fn flush(&self) {
        self.run(|e| async move { e.flush().await.unwrap_or_else(|err| panic!("flush: {err}")) });
    }

    /// The key owner uploads `sns` (P3 terminals) to the organization, which puts them in the
    /// group `shop`, assigns `bdk-test` and provisions one GUDID per SN.
    fn provision(&self, sns: &[&str]) -> Vec<Gudid> {
        let rows: Vec<ImportRow> = sns
            .iter()
            .enumerate()
            .map(|(i, sn)| ImportRow { line: i + 2, sn: sn.to_string(), model: Some("P3".into()) })
            .collect();
        let now = self.clock.now_ms();
        self.store.import_devices(self.org_id, &rows, now, &audit("devices.upload")).expect("import devices");
        let group = match self.store.group_by_name(self.org_id, "shop") {
            Ok(group) => group,
            Err(_) => self
                .store
                .create_group(self.org_id, "shop", "engine suite", &audit("group.create"))
                .expect("create group"),
        };
        let ids: Vec<i64> = sns.iter().map(|sn| self.device(sn).id).collect();
        self.store.add_group_members(group.id, &ids, &audit("group.add_devices")).expect("add to group");
        let source = self.store.key_source_by_name(self.org_id, KEY_SOURCE).expect("key source");
        self.store.assign(self.org_id, &ids, Some(source.id), &audit("assignment.set")).expect("assign");
        let owned: Vec<String> = sns.iter().map(|s| s.to_string()).collect();
        let org_id = self.org_id;
        let provisioned = self.run(|e| async move {
            e.provision_gudids(org_id, &owned, Actor { label: "engine-suite".into(), token_id: None })
                .await
                .unwrap_or_else(|err| panic!("provision GUDIDs: {err}"))
        });
        provisioned.iter().map(|(text, _)| Gudid::parse(text).expect("a provisioned GUDID parses")).collect()
    }

    /// A task for the devices `sns` from their assigned key source, slot 1, default expiry.
    fn create_task(&self, sns: &[&str]) -> i64 {
        let spec = TaskSpec {
            target: Target::Devices(sns.iter().map(|s| s.to_string()).collect()),
            key_source: None,
            slot: 1,
            expiry_days: None,
            request_id: None,
        };
        let org_id = self.org_id;
        let (task, preview) = self.run(|e| async move {
            e.create_task(org_id, &spec, &Actor::named("engine-suite"))
                .await
                .unwrap_or_else(|err| panic!("create task: {err}"))
        });
        assert_eq!(task.counts.total as usize, sns.len(), "one execution per device: {preview:?}");
        task.id
    }

    fn device(&self, sn: &str) -> rki_gateway::store::DeviceRow {
        self.store.device(self.org_id, sn).unwrap_or_else(|e| panic!("device {sn}: {e}"))
    }

    fn execution(&self, id: i64) -> ExecutionRow {
        self.store.execution(id).unwrap_or_else(|e| panic!("execution {id}: {e}"))
    }

    fn records(&self, sn: &str) -> Vec<RecordRow> {
        let filter = RecordFilter { sn: Some(sn.into()), limit: 100, ..RecordFilter::default() };
        self.store.list_records(self.org_id, &filter).expect("records")
    }

    /// Waits (bounded) until `count` payloads have been published on `topic` since `mark`.
    fn wait_published(&self, mark: usize, topic: &str, count: usize, what: &str) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.out.since(mark, topic);
            if seen.len() >= count {
                return seen;
            }
            assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}: {} of {count} published", seen.len());
            std::thread::sleep(POLL);
        }
    }

    /// Waits (bounded) until `condition` holds.
    fn wait_until(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !condition() {
            assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
            std::thread::sleep(POLL);
        }
    }

    /// A terminal initialises with `gudid`: CreateKey in, the answer out, secrets derived on both
    /// sides from the X25519 exchange.
    fn initialise(&self, sn: &str, gudid: &Gudid) -> Terminal {
        self.initialise_with(sn, gudid, 1)
    }

    /// [`World::initialise`] with a CreateKey sent under `counter`.
    fn initialise_with(&self, sn: &str, gudid: &Gudid, counter: u64) -> Terminal {
        let ephemeral = Ephemeral::random().expect("ephemeral key");
        let request = create_key_frame(sn, gudid, &ephemeral, counter);
        let mark = self.out.mark();
        self.submit(topic::init(sn), request.clone());
        let answer = self.wait_published(mark, &topic::device_down(sn), 1, "the CreateKey answer").remove(0);
        let opened = frame::open(&answer).expect("the answer is a frame");
        let answer_body = opened.body_bytes().to_vec();
        let verified = opened.verify(&gudid.mac_key()).expect("the answer is tagged under the GUDID's MAC key");
        let Message::CreateKeyAnswer(a) = verified.body.message else {
            panic!("CreateKey answered with {:?}", verified.body.message);
        };
        assert_eq!(a.gudid_id, gudid.id(), "the answer names the GUDID");
        assert_eq!(a.request_counter, counter, "the answer names the CreateKey it answers");
        let secrets = init::derive_device_secrets(
            ephemeral,
            &a.gateway_public,
            &gudid.mac_key(),
            frame::body_bytes_of(&request).expect("request body"),
            &answer_body,
        )
        .expect("derive the device secrets");
        Terminal { sn: sn.into(), secrets, counter }
    }

    /// Sends `frame` on the terminal's up topic.
    fn send(&self, t: &Terminal, frame: Vec<u8>) {
        self.submit(topic::device_up(&t.sn), frame);
    }

    /// Sends a signed hello and returns the downloads it brings (exactly `expected` of them).
    fn hello(&self, t: &mut Terminal, locked: bool, expected: usize) -> Vec<Download> {
        let mark = self.out.mark();
        let hello = t.seal(hello(locked));
        self.send(t, hello);
        let what = format!("{expected} download(s) for {} after its hello", t.sn);
        let frames = self.wait_published(mark, &topic::device_down(&t.sn), expected, &what);
        frames.iter().map(|f| t.open_download(f)).collect()
    }

    /// The terminal's messages are handled in order: sends a hello (the sentinel) and waits for
    /// the one download it re-delivers, which proves everything sent before it was handled.
    /// Returns how many downloads were published since `mark` (the sentinel's included).
    fn sentinel(&self, t: &mut Terminal, mark: usize) -> usize {
        let hello = t.seal(hello(false));
        let sentinel_mark = self.out.mark();
        self.send(t, hello);
        self.wait_published(sentinel_mark, &topic::device_down(&t.sn), 1, "the sentinel hello's download");
        self.flush();
        self.out.since(mark, &topic::device_down(&t.sn)).len()
    }
}

/// A terminal played by hand: its secrets and its up counter.
struct Terminal {
    sn: String,
    secrets: DeviceSecrets,
    counter: u64,
}

impl Terminal {
    /// Seals `message` under the signing key with the next counter.
    fn seal(&mut self, message: Message) -> Vec<u8> {
        self.counter += 1;
        let counter = self.counter;
        self.seal_with(&self.secrets.signing_key.clone_secret(), counter, message)
    }

    fn seal_with(&self, key: &MacKey, counter: u64, message: Message) -> Vec<u8> {
        frame::seal(key, &Body { party: self.sn.clone(), counter, message }).expect("seal")
    }

    /// Opens a down frame that must be a download signed for this terminal.
    fn open_download(&self, bytes: &[u8]) -> Download {
        let verified = frame::open(bytes)
            .and_then(|u| u.verify(&self.secrets.signing_key))
            .unwrap_or_else(|e| panic!("a down frame for {} does not verify under its key: {e}", self.sn));
        assert_eq!(verified.body.party, self.sn);
        match verified.body.message {
            Message::Download(d) => d,
            other => panic!("expected a download for {}, got {other:?}", self.sn),
        }
    }

    /// What the terminal does with a download: unwraps the key block under its TDES KBPK and
    /// acks with the KCV of the key it found there.
    fn install(&self, d: &Download) -> Ack {
        let (_header, key) = tr31::unwrap(&self.secrets.kbpk_tdes, &d.key_block).expect("the key block unwraps");
        let key = SymmetricKey::tdes(key).expect("a TDES key");
        ack(d, key.kcv(KcvLen::Three).as_bytes().to_vec())
    }
}

fn create_key_frame(sn: &str, gudid: &Gudid, ephemeral: &Ephemeral, counter: u64) -> Vec<u8> {
    let body = Body {
        party: sn.into(),
        counter,
        message: Message::CreateKey(CreateKey {
            gudid_id: gudid.id(),
            x_pos_device_id: format!("SUITE-{sn}"),
            device_public: ephemeral.public(),
        }),
    };
    frame::seal(&gudid.mac_key(), &body).expect("seal CreateKey")
}

/// A P3 at its minimum firmware, EU app.
fn hello(locked: bool) -> Message {
    Message::Hello(Hello {
        model: "P3".into(),
        rom_version: "3.0.15".into(),
        app_version: "2.0.0".into(),
        region: Region::Eu,
        debug_mode: false,
        locked,
        slots: vec![],
    })
}

fn ack(d: &Download, kcv: Vec<u8>) -> Ack {
    Ack {
        execution_id: d.execution_id,
        result: 0,
        slot: d.slot,
        key_id: d.key_id.clone(),
        kcv,
        injection: InjectionType::Auto,
    }
}

/// The KCV of the IPEK derived from the test BDK and `ksn`, computed here, apart from the gateway.
fn expected_kcv(ksn: &[u8]) -> Vec<u8> {
    let bdk = SymmetricKey::tdes_from_hex(TEST_BDK).expect("test BDK");
    let ksn = rki_protocol::dukpt::tdes::Ksn::from_hex(&hex::encode(ksn)).expect("a TDES KSN");
    let ipek = rki_protocol::dukpt::tdes::derive_ipek(&bdk, &ksn).expect("derive the IPEK");
    ipek.kcv(KcvLen::Three).as_bytes().to_vec()
}

/// The refusal the engine published for a CreateKey (under the public refusal key).
fn refusal_code(bytes: &[u8]) -> RefusalCode {
    let verified = frame::open(bytes)
        .and_then(|u| u.verify(&MacKey::public_refusal_key()))
        .expect("a refusal verifies under the public refusal key");
    match verified.body.message {
        Message::Refusal(r) => r.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The world with `sns` initialised, said hello once (nothing to deliver yet), and one task for
/// all of them, delivered by a second hello. Returns each terminal with its download.
fn delivered(w: &World, sns: &[&str]) -> Vec<(Terminal, Download)> {
    let gudids = w.provision(sns);
    delivered_with(w, sns, &gudids)
}

/// [`delivered`] with the GUDIDs already provisioned.
fn delivered_with(w: &World, sns: &[&str], gudids: &[Gudid]) -> Vec<(Terminal, Download)> {
    let terminals: Vec<Terminal> = sns.iter().zip(gudids).map(|(sn, g)| w.initialise(sn, g)).collect();
    w.create_task(sns);
    terminals
        .into_iter()
        .map(|mut t| {
            let mut downloads = w.hello(&mut t, false, 1);
            (t, downloads.remove(0))
        })
        .collect()
}

// ------------------------------------------------------------------------------------ the specs

#[test]
fn create_key_with_a_live_gudid_is_answered_and_spends_the_gudid() {
    let w = World::new();
    let gudid = w.provision(&["SUITE001"]).remove(0);
    assert!(!w.device("SUITE001").initialised);

    let t = w.initialise("SUITE001", &gudid);

    w.flush();
    assert!(w.device("SUITE001").initialised, "the device is initialised once its GUDID is spent");
    let row = w.store.gudid_by_id(&gudid.id()).expect("read the GUDID").expect("the GUDID row");
    assert!(row.used_at.is_some(), "the GUDID is spent");
    // The gateway holds the same signing key the terminal derived: its hello is accepted.
    let mut t = t;
    w.create_task(&["SUITE001"]);
    assert_eq!(w.hello(&mut t, false, 1).len(), 1);

    // The same GUDID again, with a fresh exchange: refused as used, and nothing is answered.
    let mark = w.out.mark();
    let again = create_key_frame("SUITE001", &gudid, &Ephemeral::random().expect("ephemeral"), 2);
    w.submit(topic::init("SUITE001"), again);
    let refusal = w.wait_published(mark, &topic::device_down("SUITE001"), 1, "the refusal of a spent GUDID");
    assert_eq!(refusal_code(&refusal[0]), RefusalCode::GudidUsed);
}

#[test]
fn a_terminal_whose_answer_came_too_late_initialises_with_the_same_gudid() {
    let w = World::new();
    let gudid = w.provision(&["SUITE003"]).remove(0);
    // The terminal gave up before this answer arrived: it never uses these secrets.
    let _late = w.initialise_with("SUITE003", &gudid, 1);
    // Its retry, with the same GUDID and a newer counter, is answered anew.
    let mut t = w.initialise_with("SUITE003", &gudid, 2);
    w.flush();
    let row = w.store.gudid_by_id(&gudid.id()).expect("read the GUDID").expect("the GUDID row");
    assert!(row.used_at.is_some() && row.proven_at.is_none(), "spent, awaiting the device's proof: {row:?}");
    // The gateway holds the secrets of the second exchange: the terminal's hello is accepted.
    w.create_task(&["SUITE003"]);
    assert_eq!(w.hello(&mut t, false, 1).len(), 1);
    w.flush();
    let row = w.store.gudid_by_id(&gudid.id()).expect("read the GUDID").expect("the GUDID row");
    assert!(row.proven_at.is_some(), "the hello proved the secrets: {row:?}");
    // Spent for good: a third CreateKey, however new, is refused and answers nothing else.
    let mark = w.out.mark();
    let again = create_key_frame("SUITE003", &gudid, &Ephemeral::random().expect("ephemeral"), t.counter + 1);
    w.submit(topic::init("SUITE003"), again);
    let refusal = w.wait_published(mark, &topic::device_down("SUITE003"), 1, "the refusal of a proven GUDID");
    assert_eq!(refusal_code(&refusal[0]), RefusalCode::GudidUsed);
}

#[test]
fn create_key_with_a_forged_tag_or_another_devices_gudid_is_refused_and_spends_nothing() {
    let w = World::new();
    let gudids = w.provision(&["SUITE011", "SUITE012"]);
    let down = topic::device_down("SUITE011");
    let cases: [(&str, Vec<u8>, RefusalCode); 3] = [
        (
            "tagged under another key",
            {
                let body = Body {
                    party: "SUITE011".into(),
                    counter: 1,
                    message: Message::CreateKey(CreateKey {
                        gudid_id: gudids[0].id(),
                        x_pos_device_id: "FORGED".into(),
                        device_public: Ephemeral::random().expect("ephemeral").public(),
                    }),
                };
                frame::seal(&MacKey::random().expect("key"), &body).expect("seal")
            },
            RefusalCode::BadTag,
        ),
        (
            "the GUDID of another device",
            create_key_frame("SUITE011", &gudids[1], &Ephemeral::random().expect("ephemeral"), 1),
            RefusalCode::GudidWrongDevice,
        ),
        (
            "an unknown GUDID",
            create_key_frame("SUITE011", &Gudid::random().expect("gudid"), &Ephemeral::random().expect("ephemeral"), 1),
            RefusalCode::UnknownGudid,
        ),
    ];
    for (case, frame, code) in cases {
        let mark = w.out.mark();
        w.submit(topic::init("SUITE011"), frame);
        let refusal = w.wait_published(mark, &down, 1, case);
        assert_eq!(refusal_code(&refusal[0]), code, "{case}");
    }
    w.flush();
    for (sn, gudid) in ["SUITE011", "SUITE012"].iter().zip(&gudids) {
        assert!(!w.device(sn).initialised, "{sn} stays uninitialised");
        let row = w.store.gudid_by_id(&gudid.id()).expect("read").expect("row");
        assert!(row.used_at.is_none(), "{sn}'s GUDID is not spent by a refused CreateKey");
    }
    // Both GUDIDs still work for their own device.
    w.initialise("SUITE011", &gudids[0]);
    w.initialise("SUITE012", &gudids[1]);
}

#[test]
fn a_hello_delivers_the_open_download_signed_and_wrapped_for_the_device() {
    let w = World::new();
    let gudid = w.provision(&["SUITE021"]).remove(0);
    let mut t = w.initialise("SUITE021", &gudid);
    // Online with nothing open: nothing is sent.
    let mark = w.out.mark();
    let first = t.seal(hello(false));
    w.send(&t, first);
    w.wait_until("the device online after its hello", || w.engine().is_online("SUITE021"));
    w.flush();
    assert!(w.out.since(mark, &topic::device_down("SUITE021")).is_empty(), "nothing to deliver before the task");

    // A task for an online device is delivered at once, and again on every hello.
    let mark = w.out.mark();
    let task = w.create_task(&["SUITE021"]);
    let d = t.open_download(&w.wait_published(mark, &topic::device_down("SUITE021"), 1, "the download")[0]);

    assert_eq!(d.slot.0, 1);
    assert_eq!(d.kcv, expected_kcv(&d.key_id), "the announced KCV is the IPEK's, derived independently");
    assert_eq!(t.install(&d).kcv, d.kcv, "the key block holds that IPEK, wrapped under the device's KBPK");
    w.flush();
    let execution = w.execution(d.execution_id as i64);
    assert_eq!(execution.task_id, task);
    assert_eq!(execution.state, ExecutionState::Delivered);
    assert_eq!(execution.delivery_count, 1);
    // Another hello delivers the same download again (the terminal answers it idempotently).
    let again = w.hello(&mut t, false, 1).remove(0);
    assert_eq!((again.execution_id, &again.key_block), (d.execution_id, &d.key_block));
}

/// A hello handled after the endpoint saw its connection end (it waited in its shard while the
/// socket closed) marks nothing online and delivers nothing: the endpoint's disconnect, already
/// handled, does not come again, so the device would stay online, with downloads queued into a
/// session nobody reads, until its next connection (two flaky end-to-end tests under load).
#[test]
fn a_hello_whose_connection_already_ended_marks_nothing_online_and_delivers_nothing() {
    let w = World::new();
    let gudid = w.provision(&["SUITE061"]).remove(0);
    let mut t = w.initialise("SUITE061", &gudid);
    w.create_task(&["SUITE061"]);
    let mark = w.out.mark();
    w.out.set_gone("SUITE061", true);
    let late = t.seal(hello(false));
    w.send(&t, late);
    // Handled once its report is durable (written before any delivery would be).
    w.wait_until("the late hello's report", || {
        w.flush();
        w.device("SUITE061").model.is_some()
    });
    w.flush();
    assert!(!w.engine().is_online("SUITE061"), "a hello of an ended connection marked the device online");
    assert!(w.out.since(mark, &topic::device_down("SUITE061")).is_empty(), "delivered to an ended connection");
    // Connected again: its hello delivers, once.
    w.out.set_gone("SUITE061", false);
    assert_eq!(w.sentinel(&mut t, mark), 1);
    assert!(w.engine().is_online("SUITE061"));
}

#[test]
fn an_ack_with_the_right_kcv_succeeds_is_recorded_once_and_locks_the_device() {
    let w = World::new();
    let (mut t, d) = delivered(&w, &["SUITE031"]).remove(0);
    assert!(!w.device("SUITE031").locked);

    let good = t.seal(Message::Ack(t.install(&d)));
    w.send(&t, good.clone());
    let id = d.execution_id as i64;
    w.wait_until("the ack to end the execution", || w.execution(id).state == ExecutionState::Succeeded);

    let records = w.records("SUITE031");
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!((r.execution_id, r.result.as_str(), r.injection.as_str()), (id, "succeeded", "auto"));
    assert_eq!((r.key_id.clone(), r.kcv.clone()), (hex::encode_upper(&d.key_id), hex::encode_upper(&d.kcv)));
    assert!(w.device("SUITE031").locked, "a success locks the device");
    // The same ack again (a terminal resending it) changes nothing, and no hello re-delivers.
    let mark = w.out.mark();
    w.send(&t, good);
    let sentinel = t.seal(hello(true));
    w.send(&t, sentinel);
    w.wait_until("the hello after the duplicate ack", || {
        w.flush();
        w.device("SUITE031").locked
            && w.store.credentials("SUITE031").ok().flatten().is_some_and(|c| c.last_counter == t.counter)
    });
    assert!(w.out.since(mark, &topic::device_down("SUITE031")).is_empty(), "nothing is re-delivered");
    assert_eq!(w.records("SUITE031").len(), 1, "recorded exactly once");
}

#[test]
fn an_unlock_is_sent_signed_and_the_devices_unlocked_hello_clears_the_lock() {
    let w = World::new();
    let (mut t, d) = delivered(&w, &["SUITE041"]).remove(0);
    let good = t.seal(Message::Ack(t.install(&d)));
    w.send(&t, good);
    w.wait_until("the device locked by its successful ack", || w.device("SUITE041").locked);

    let mark = w.out.mark();
    let org_id = w.org_id;
    let online = w.run(|e| async move {
        e.unlock(org_id, "SUITE041", &audit("device.unlock")).await.unwrap_or_else(|err| panic!("unlock: {err}"))
    });
    assert!(online, "the device said hello, so it is online and the unlock goes out now");
    let frames = w.wait_published(mark, &topic::device_down("SUITE041"), 1, "the unlock");
    let verified =
        frame::open(&frames[0]).and_then(|u| u.verify(&t.secrets.signing_key)).expect("signed for the device");
    assert!(matches!(verified.body.message, Message::Unlock(_)), "{:?}", verified.body.message);
    assert!(w.device("SUITE041").unlock_pending);

    let unlocked = t.seal(hello(false));
    w.send(&t, unlocked);
    w.wait_until("the lock cleared by the unlocked hello", || {
        let device = w.device("SUITE041");
        !device.locked && !device.unlock_pending
    });
    // Unlocked, the device is ready for another key.
    w.create_task(&["SUITE041"]);
}

#[test]
fn forged_replayed_mismatched_and_foreign_acks_are_refused_and_change_nothing() {
    let w = World::new();
    let mut fleet = delivered(&w, &["SUITE051", "SUITE052"]);
    let (mut other, other_download) = fleet.pop().expect("second terminal");
    let (mut t, d) = fleet.pop().expect("first terminal");
    let good = t.install(&d);
    let mut wrong_kcv = good.clone();
    wrong_kcv.kcv = vec![0x00, 0x11, 0x22];
    let mut wrong_key_id = good.clone();
    wrong_key_id.key_id[9] ^= 1;
    let mut wrong_slot = good.clone();
    wrong_slot.slot = rki_protocol::terminal::KeySlot(4);

    // (case, the ack as sent, the rejection reason counted), each sealed just before it is sent:
    // the sentinel after each one moves the terminal's counter on.
    type Forge = fn(&mut Terminal, &Ack, &[Ack; 3]) -> Vec<u8>;
    let cases: [(&str, Forge, &str); 5] = [
        (
            "tagged under another key",
            |t, good, _| {
                t.counter += 1;
                t.seal_with(&MacKey::random().expect("key"), t.counter, Message::Ack(good.clone()))
            },
            "bad_mac",
        ),
        // The counter of the message before: already used.
        (
            "an old counter",
            |t, good, _| t.seal_with(&t.secrets.signing_key.clone_secret(), t.counter, Message::Ack(good.clone())),
            "replay",
        ),
        ("a KCV other than the derived key's", |t, _, wrong| t.seal(Message::Ack(wrong[0].clone())), "kcv_mismatch"),
        ("another key ID", |t, _, wrong| t.seal(Message::Ack(wrong[1].clone())), "key_id_mismatch"),
        ("another slot", |t, _, wrong| t.seal(Message::Ack(wrong[2].clone())), "slot_mismatch"),
    ];
    let wrong = [wrong_kcv, wrong_key_id, wrong_slot];

    for (case, forge, reason) in cases {
        let before = rejected("ack", reason);
        let mark = w.out.mark();
        let frame = forge(&mut t, &good, &wrong);
        w.send(&t, frame);
        let downloads = w.sentinel(&mut t, mark);
        assert_eq!(downloads, 1, "{case}: only the sentinel's re-delivery was published");
        assert!(rejected("ack", reason) > before, "{case}: counted as {reason}");
        let execution = w.execution(d.execution_id as i64);
        assert_eq!(execution.state, ExecutionState::Delivered, "{case}: the execution stays open");
        assert!(w.records("SUITE051").is_empty(), "{case}: nothing recorded");
        assert!(!w.device("SUITE051").locked, "{case}: the device is not locked");
    }

    // The other terminal acks this one's execution, correctly signed under its own key.
    let before = rejected("ack", "foreign_execution");
    let mark = w.out.mark();
    let foreign = other.seal(Message::Ack(good.clone()));
    w.send(&other, foreign);
    assert_eq!(w.sentinel(&mut other, mark), 1, "a foreign ack: only the sentinel's re-delivery");
    assert!(rejected("ack", "foreign_execution") > before, "counted as foreign_execution");
    assert_eq!(w.execution(d.execution_id as i64).state, ExecutionState::Delivered);
    assert_eq!(w.execution(other_download.execution_id as i64).state, ExecutionState::Delivered);
    assert!(w.records("SUITE051").is_empty() && w.records("SUITE052").is_empty());

    // After all that, the genuine ack still succeeds.
    let genuine = t.seal(Message::Ack(good));
    w.send(&t, genuine);
    let id = d.execution_id as i64;
    w.wait_until("the genuine ack to succeed", || w.execution(id).state == ExecutionState::Succeeded);
    assert_eq!(w.records("SUITE051").len(), 1);
}

#[test]
fn an_execution_past_its_deadline_expires_is_recorded_and_never_delivered_again() {
    let w = World::new();
    let (mut t, d) = delivered(&w, &["SUITE061"]).remove(0);
    let id = d.execution_id as i64;
    w.flush();
    let deadline = w.execution(id).deadline;
    assert_eq!(deadline - w.execution(id).created_at, 30 * DAY_MS, "30 days by default");

    w.clock.advance(29 * DAY_MS).expect("advance the clock");
    w.run(|e| async move { e.expire_now().await.unwrap_or_else(|err| panic!("expire: {err}")) });
    assert_eq!(w.execution(id).state, ExecutionState::Delivered, "day 29: still open");

    // Past the deadline, the engine's own sweeper (every second) expires it.
    w.clock.advance(2 * DAY_MS).expect("advance the clock");
    w.wait_until("the sweeper to expire the execution", || w.execution(id).state == ExecutionState::Expired);
    let records = w.records("SUITE061");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].result, "expired");

    // A late ack changes nothing, and a hello delivers only what is open: a new task's download.
    let late = t.seal(Message::Ack(t.install(&d)));
    w.send(&t, late);
    let task = w.create_task(&["SUITE061"]);
    let mark = w.out.mark();
    let fresh = w.hello(&mut t, false, 1).remove(0);
    assert_ne!(fresh.execution_id, d.execution_id);
    assert_eq!(w.execution(fresh.execution_id as i64).task_id, task);
    assert_eq!(w.sentinel(&mut t, mark), 2, "two hellos, one open download each time");
    assert_eq!(w.execution(id).state, ExecutionState::Expired);
    assert_eq!(w.records("SUITE061").len(), 1, "the late ack recorded nothing");
}

#[test]
fn stopping_a_task_terminates_its_open_executions_and_nothing_is_delivered_after() {
    let w = World::new();
    let mut fleet = delivered(&w, &["SUITE071", "SUITE072"]);
    let (mut t2, d2) = fleet.pop().expect("second");
    let (t1, d1) = fleet.pop().expect("first");
    // The first one succeeds before the stop.
    let good = t1.install(&d1);
    let mut t1 = t1;
    let ack1 = t1.seal(Message::Ack(good));
    w.send(&t1, ack1);
    let id1 = d1.execution_id as i64;
    w.wait_until("the first ack", || w.execution(id1).state == ExecutionState::Succeeded);

    let task = w.execution(id1).task_id;
    let org_id = w.org_id;
    let stopped = w.run(|e| async move {
        e.stop_task(org_id, task, &audit("task.stop")).await.unwrap_or_else(|err| panic!("stop: {err}"))
    });

    assert_eq!(stopped, 1, "only the open execution is terminated");
    let id2 = d2.execution_id as i64;
    assert_eq!(w.execution(id2).state, ExecutionState::Terminated);
    assert_eq!(w.execution(id1).state, ExecutionState::Succeeded, "an ended execution stays as it ended");
    let records = w.records("SUITE072");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].result, "terminated");
    // Its late ack changes nothing; its hello brings nothing. A second task proves the hello was
    // handled: its download is the only one published.
    let late = t2.seal(Message::Ack(t2.install(&d2)));
    w.send(&t2, late);
    w.create_task(&["SUITE072"]);
    let mark = w.out.mark();
    let fresh = w.hello(&mut t2, false, 1).remove(0);
    assert_ne!(fresh.execution_id, d2.execution_id);
    assert_eq!(w.sentinel(&mut t2, mark), 2);
    assert_eq!(w.execution(id2).state, ExecutionState::Terminated);
    assert_eq!(w.records("SUITE072").len(), 1);
}

#[test]
fn a_restarted_engine_on_the_same_store_keeps_devices_tasks_records_and_counters() {
    let w = World::new();
    let gudids = w.provision(&["SUITE081", "SUITE082"]);
    let mut fleet = delivered_with(&w, &["SUITE081", "SUITE082"], &gudids);
    let (mut t2, d2) = fleet.pop().expect("second");
    let (mut t1, d1) = fleet.pop().expect("first");
    let ack1 = t1.seal(Message::Ack(t1.install(&d1)));
    w.send(&t1, ack1);
    let id1 = d1.execution_id as i64;
    w.wait_until("the first ack", || w.execution(id1).state == ExecutionState::Succeeded);
    let clock_before = w.clock.now_ms();
    w.clock.advance(DAY_MS).expect("advance the clock");

    let w = w.restart();

    assert!(w.clock.now_ms() >= clock_before + DAY_MS, "the adjustable clock resumes where it was");
    assert_eq!(w.execution(id1).state, ExecutionState::Succeeded);
    assert_eq!(w.records("SUITE081").len(), 1, "recorded exactly once");
    assert!(w.device("SUITE081").locked);
    // The second device's execution is still open, and the same download (same execution, key
    // and KCV) comes again on its hello: its signing key, KBPK and counter survived.
    let mark = w.out.mark();
    let old_counter = t2.counter;
    let replayed_hello = t2.seal_with(&t2.secrets.signing_key.clone_secret(), old_counter, hello(false));
    w.send(&t2, replayed_hello);
    let again = w.hello(&mut t2, false, 1).remove(0);
    assert_eq!((again.execution_id, &again.kcv), (d2.execution_id, &d2.kcv));
    assert_eq!(t2.install(&again).kcv, d2.kcv);
    assert_eq!(w.sentinel(&mut t2, mark), 2, "the hello with a counter used before the restart was refused");
    let ack2 = t2.seal(Message::Ack(t2.install(&again)));
    w.send(&t2, ack2);
    let id2 = d2.execution_id as i64;
    w.wait_until("the second ack after the restart", || w.execution(id2).state == ExecutionState::Succeeded);
    assert_eq!(w.records("SUITE082").len(), 1);
    // The spent GUDID stays spent.
    let mark = w.out.mark();
    let reuse = create_key_frame("SUITE081", &gudids[0], &Ephemeral::random().expect("ephemeral"), t1.counter + 1);
    w.submit(topic::init("SUITE081"), reuse);
    let refusal = w.wait_published(mark, &topic::device_down("SUITE081"), 1, "the refusal of a spent GUDID");
    assert_eq!(refusal_code(&refusal[0]), RefusalCode::GudidUsed);
    let task = w.execution(id1).task_id;
    let counts = w.store.task(w.org_id, task).expect("task").counts;
    assert_eq!((counts.total, counts.succeeded, counts.open()), (2, 2, 0), "{counts:?}");
}

/// The audit entry of an action the suite makes directly on the store or the engine.
fn audit(action: &'static str) -> Audit {
    Audit::new(&Actor::named("engine-suite"), None, action, "", serde_json::json!({}), 0)
}

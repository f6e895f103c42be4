//! Test-only scaffolding: a real MQTT broker (rumqttd, in-process) and a fake gateway that plays
//! the gateway's side of the protocol with `rki-protocol` (real key agreement, real TR-31 blocks,
//! signed frames), and records what the terminals send.
//!
//! Every test builds its own [`TestNet`]: one broker on a free port, one [`FakeGateway`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rki_device_sim::{BrokerAddr, DeviceConfig, DeviceHandle, DeviceProfile, StateStore};
use rki_protocol::dukpt::tdes::Ksn;
use rki_protocol::dukpt::{aes::InitialKeyId, derive_initial_key, derive_ipek};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::{derive_device_secrets, password_hash, DeviceSecrets, Ephemeral, Gudid};
use rki_protocol::message::{Ack, Body, CreateKeyAnswer, Download, Hello, Message, Refusal, RefusalCode, Unlock};
use rki_protocol::terminal::{KeySlot, KeyType, Model};
use rki_protocol::topic;
use rki_protocol::tr31::{self, DukptInitialKeyId, Header, Version};
use rki_protocol::{KcvLen, SecretBytes, SymmetricKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Notify;

/// How long a test waits for anything over the network before failing.
pub const WAIT: Duration = Duration::from_secs(15);

/// The MQTT passwords the fake gateway issued, by SN, as the broker's authentication checks them.
pub type CredentialBook = Arc<Mutex<HashMap<String, [u8; 32]>>>;

/// Every CONNECT the broker saw: (client ID, username, password).
pub type ConnectLog = Arc<Mutex<Vec<(String, String, String)>>>;

/// A rumqttd broker on 127.0.0.1 and a free port, running on its own threads until the process
/// ends. Its authentication accepts the bootstrap identity `init@{SN}` with a password shaped like
/// a GUDID's bootstrap password (64 upper-case hex digits; the fake gateway keeps no GUDID hashes,
/// and the initialisation test checks the exact value) and the
/// device identity `{SN}` with the password the fake gateway issued, and nothing else.
pub struct TestBroker {
    pub addr: BrokerAddr,
    pub connects: ConnectLog,
}

impl TestBroker {
    pub fn start(credentials: CredentialBook, max_connections: usize) -> Self {
        Self::start_on(free_port(), credentials, max_connections)
    }

    /// The broker on a chosen port.
    pub fn start_on(port: u16, credentials: CredentialBook, max_connections: usize) -> Self {
        let connects: ConnectLog = Arc::default();
        let log = connects.clone();
        let mut connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 64 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        connections.set_auth_handler(move |client_id: String, username: String, password: String| {
            let accepted = test_broker_accepts(&credentials, &client_id, &username, &password);
            if let Ok(mut log) = log.lock() {
                log.push((client_id, username, password));
            }
            async move { accepted }
        });
        let server = rumqttd::ServerSettings {
            name: "test-v4".to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let config = rumqttd::Config {
            router: rumqttd::RouterConfig {
                max_connections,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 * 1024,
                max_segment_count: 2,
                ..Default::default()
            },
            v4: Some(HashMap::from([("test-v4".to_string(), server)])),
            ..Default::default()
        };
        std::thread::spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        });
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { addr: BrokerAddr::new("127.0.0.1", port), connects }
    }
}

fn test_broker_accepts(credentials: &CredentialBook, client_id: &str, username: &str, password: &str) -> bool {
    if client_id != username {
        return false;
    }
    if client_id == FakeGateway::CLIENT_ID {
        return true;
    }
    if let Some(sn) = client_id.strip_prefix("init@") {
        let shaped = password.len() == 64 && password.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
        return shaped && topic::validate_name(sn).is_ok();
    }
    let Ok(book) = credentials.lock() else {
        return false;
    };
    book.get(client_id).is_some_and(|hash| *hash == password_hash(password.as_bytes()))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// What the fake gateway saw from one terminal.
#[derive(Default)]
pub struct DeviceRecord {
    pub secrets: Option<DeviceSecrets>,
    pub hellos: Vec<Hello>,
    /// Verified acks, in arrival order (duplicates included).
    pub acks: Vec<Ack>,
    pub byes: usize,
    pub last_up_counter: u64,
    /// Up frames whose counter was not above the previous one (must stay 0).
    pub up_replays: usize,
    /// Up frames whose tag did not verify (must stay 0).
    pub bad_tags: usize,
}

/// A gateway reduced to what the terminal's tests need.
#[derive(Default)]
struct Book {
    /// GUDID id → (SN it was provisioned for, its MAC key, spent).
    gudids: HashMap<[u8; 32], (String, MacKey, bool)>,
    devices: HashMap<String, DeviceRecord>,
    /// On every hello, push a download to a terminal that has not acked one yet (fleet tests).
    auto_push: bool,
    /// Executions pushed automatically, by SN, with the KCV they must come back with.
    pushed: HashMap<String, (u64, Vec<u8>)>,
    /// The KCV each execution was derived with.
    expected_kcv: HashMap<u64, Vec<u8>>,
    /// SNs whose first CreateKey is answered late ([`FakeGateway::answer_late`]), and that
    /// answer once it is held back.
    late: HashMap<String, (LateAnswer, Held)>,
    /// SNs whose answers name another CreateKey than the one answered.
    misnamed: Vec<String>,
}

/// How a held-back answer to a terminal's first CreateKey goes out when its retry comes: the
/// retry is refused (the GUDID is spent), and the late answer comes with the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateAnswer {
    BeforeTheRefusal,
    AfterTheRefusal,
    /// The retry is answered too, replacing the first answer's secrets as the gateway does until
    /// the GUDID is proven (PROTOCOL.md §7.5); the late first answer goes out just before it.
    BeforeTheRetrysAnswer,
    /// As [`LateAnswer::BeforeTheRetrysAnswer`], with a refusal of the retry between the two, as
    /// a second node sends for a duplicate of the retry (at-least-once delivery).
    BeforeARefusedDuplicateOfTheRetry,
}

/// Where a late answer is.
enum Held {
    /// The first CreateKey has not come yet.
    Waiting,
    /// Its answer, held back until the retry.
    Answer(Vec<u8>),
    /// Sent: later CreateKeys are handled as usual.
    Released,
}

/// The gateway's side of the protocol over a rumqttc client.
#[derive(Clone)]
pub struct FakeGateway {
    client: AsyncClient,
    book: Arc<Mutex<Book>>,
    credentials: CredentialBook,
    changed: Arc<Notify>,
    counter: Arc<AtomicU64>,
    next_execution: Arc<AtomicU64>,
}

/// How a test-crafted down frame is tagged.
pub enum Tag {
    /// Under the terminal's signing key (the genuine case).
    Device,
    /// Under another key (forged, or another terminal's).
    Key(MacKey),
    /// Under the public refusal key (an "unsigned" frame).
    Public,
}

impl FakeGateway {
    pub const CLIENT_ID: &'static str = "fake-gateway";

    async fn connect(broker: &BrokerAddr, credentials: CredentialBook) -> Self {
        let mut options = MqttOptions::new(Self::CLIENT_ID, broker.host.clone(), broker.port);
        options.set_credentials(Self::CLIENT_ID, "gateway").set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        let (client, mut event_loop) = AsyncClient::new(options, 10_000);
        client.subscribe(topic::FILTER_DEVICE_UP, QoS::AtLeastOnce).await.expect("subscribe up");
        client.subscribe(topic::FILTER_INIT, QoS::AtLeastOnce).await.expect("subscribe init");
        let gateway = FakeGateway {
            client,
            book: Arc::default(),
            credentials,
            changed: Arc::default(),
            counter: Arc::new(AtomicU64::new(0)),
            next_execution: Arc::new(AtomicU64::new(1000)),
        };
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let mut subacks = 0;
        let worker = gateway.clone();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == 2 {
                            if let Some(tx) = subscribed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        worker.on_publish(&publish.topic, &publish.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, subscribed_rx).await.expect("gateway subscribed").expect("gateway task");
        gateway
    }

    /// A down counter above every earlier one: microseconds since the epoch, bumped if needed.
    fn next_counter(&self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let mut last = self.counter.load(Ordering::SeqCst);
        loop {
            let next = now.max(last + 1);
            match self.counter.compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    pub fn next_execution_id(&self) -> u64 {
        self.next_execution.fetch_add(1, Ordering::SeqCst)
    }

    /// Provisions a GUDID for `sn` and returns its text form, as the operator would read it.
    pub fn provision(&self, sn: &str) -> String {
        let gudid = Gudid::random().expect("gudid");
        let mut book = self.book.lock().expect("book");
        book.gudids.insert(gudid.id(), (sn.to_string(), gudid.mac_key(), false));
        gudid.expose_text().to_string()
    }

    /// Provisions a GUDID made elsewhere (its text form) for `sn`.
    pub fn provision_text(&self, sn: &str, text: &str) {
        let gudid = Gudid::parse(text).expect("gudid");
        let mut book = self.book.lock().expect("book");
        book.gudids.insert(gudid.id(), (sn.to_string(), gudid.mac_key(), false));
    }

    /// Answers `sn`'s first CreateKey (spending the GUDID, keeping the secrets of that answer) but
    /// holds the answer back until the terminal retries; the retry is refused `GudidUsed`, and
    /// the late answer goes out beside the refusal, in `order`: what a slow gateway does to a
    /// terminal that gave up waiting (PROTOCOL.md §7.3).
    pub fn answer_late(&self, sn: &str, order: LateAnswer) {
        self.book.lock().expect("book").late.insert(sn.to_string(), (order, Held::Waiting));
    }

    /// Answers `sn`'s CreateKeys naming a counter the terminal never sent.
    pub fn misname_answers(&self, sn: &str) {
        self.book.lock().expect("book").misnamed.push(sn.to_string());
    }

    /// Pushes a download on every hello to terminals that have none pending or acked.
    pub fn set_auto_push(&self, on: bool) {
        self.book.lock().expect("book").auto_push = on;
    }

    fn on_publish(&self, topic_name: &str, payload: &[u8]) {
        match topic::parse_inbound(topic_name) {
            Some(topic::Inbound::Init { sn }) => self.on_create_key(sn, payload),
            Some(topic::Inbound::DeviceUp { sn }) => self.on_device_up(sn, payload),
            _ => {}
        }
        self.changed.notify_waiters();
    }

    fn on_create_key(&self, sn: &str, payload: &[u8]) {
        let Ok(unverified) = frame::open(payload) else {
            return;
        };
        let Message::CreateKey(request) = unverified.peek().message.clone() else {
            return;
        };
        let request_counter = unverified.peek().counter;
        let create_key_body = unverified.body_bytes().to_vec();
        let mut book = self.book.lock().expect("book");
        let answers_anew = matches!(
            book.late.get(sn),
            Some((LateAnswer::BeforeTheRetrysAnswer | LateAnswer::BeforeARefusedDuplicateOfTheRetry, Held::Answer(_)))
        );
        let refusal = match book.gudids.get(&request.gudid_id) {
            None => Some(RefusalCode::UnknownGudid),
            Some((_, _, true)) if !answers_anew => Some(RefusalCode::GudidUsed),
            Some((owner, _, _)) if owner != sn => Some(RefusalCode::GudidWrongDevice),
            Some(_) => None,
        };
        if let Some(code) = refusal {
            let body = Body {
                party: sn.to_string(),
                counter: self.next_counter(),
                message: Message::Refusal(Refusal { request_counter, code }),
            };
            let bytes = frame::seal(&MacKey::public_refusal_key(), &body).expect("seal refusal");
            let late = match book.late.get_mut(sn) {
                Some((order, held @ Held::Answer(_))) => match std::mem::replace(held, Held::Released) {
                    Held::Answer(answer) => Some((*order, answer)),
                    _ => None,
                },
                _ => None,
            };
            drop(book);
            match late {
                Some((LateAnswer::BeforeTheRefusal, answer)) => {
                    self.publish_down(sn, answer);
                    self.publish_down(sn, bytes);
                }
                Some((LateAnswer::AfterTheRefusal, answer)) => {
                    self.publish_down(sn, bytes);
                    self.publish_down(sn, answer);
                }
                Some((LateAnswer::BeforeTheRetrysAnswer | LateAnswer::BeforeARefusedDuplicateOfTheRetry, _)) | None => {
                    self.publish_down(sn, bytes)
                }
            }
            return;
        }
        let Some((_, mac_key, spent)) = book.gudids.get_mut(&request.gudid_id) else {
            return;
        };
        if unverified.verify(mac_key).is_err() {
            return;
        }
        *spent = true;
        let mac_key = mac_key.clone_secret();
        let own = Ephemeral::random().expect("ephemeral");
        let named = if book.misnamed.iter().any(|s| s == sn) { request_counter + 1 } else { request_counter };
        let body = Body {
            party: sn.to_string(),
            counter: self.next_counter(),
            message: Message::CreateKeyAnswer(CreateKeyAnswer {
                gudid_id: request.gudid_id,
                request_counter: named,
                gateway_public: own.public(),
            }),
        };
        let bytes = frame::seal(&mac_key, &body).expect("seal answer");
        let answer_body = frame::body_bytes_of(&bytes).expect("answer body").to_vec();
        let secrets = derive_device_secrets(own, &request.device_public, &mac_key, &create_key_body, &answer_body)
            .expect("gateway secrets");
        self.credentials
            .lock()
            .expect("credentials")
            .insert(sn.to_string(), password_hash(secrets.mqtt_password.expose_secret()));
        let record = book.devices.entry(sn.to_string()).or_default();
        record.secrets = Some(secrets);
        record.last_up_counter = 0;
        let late = match book.late.get_mut(sn) {
            Some((_, held @ Held::Waiting)) => {
                *held = Held::Answer(bytes);
                return;
            }
            Some((
                order @ (LateAnswer::BeforeTheRetrysAnswer | LateAnswer::BeforeARefusedDuplicateOfTheRetry),
                held @ Held::Answer(_),
            )) => {
                let order = *order;
                match std::mem::replace(held, Held::Released) {
                    Held::Answer(answer) => Some((order, answer)),
                    _ => None,
                }
            }
            _ => None,
        };
        drop(book);
        if let Some((order, answer)) = late {
            self.publish_down(sn, answer);
            if order == LateAnswer::BeforeARefusedDuplicateOfTheRetry {
                let refusal = Body {
                    party: sn.to_string(),
                    counter: self.next_counter(),
                    message: Message::Refusal(Refusal { request_counter, code: RefusalCode::GudidUsed }),
                };
                self.publish_down(sn, frame::seal(&MacKey::public_refusal_key(), &refusal).expect("seal refusal"));
            }
        }
        self.publish_down(sn, bytes);
    }

    fn on_device_up(&self, sn: &str, payload: &[u8]) {
        let mut book = self.book.lock().expect("book");
        let auto_push = book.auto_push;
        let Some(record) = book.devices.get_mut(sn) else {
            return;
        };
        let Some(secrets) = record.secrets.as_ref() else {
            return;
        };
        let Ok(unverified) = frame::open(payload) else {
            return;
        };
        let Ok(verified) = unverified.verify(&secrets.signing_key) else {
            record.bad_tags += 1;
            return;
        };
        let body = verified.body;
        if !matches!(body.message, Message::Bye) {
            if body.counter <= record.last_up_counter {
                record.up_replays += 1;
                return;
            }
            record.last_up_counter = body.counter;
        }
        match body.message {
            Message::Hello(hello) => {
                let locked = hello.locked;
                record.hellos.push(hello);
                let has_ack = !record.acks.is_empty();
                if auto_push && !locked && !has_ack && !book.pushed.contains_key(sn) {
                    let execution_id = self.next_execution_id();
                    drop(book);
                    let download = self.tdes_download(sn, execution_id, KeySlot::PRODUCTION);
                    let mut book = self.book.lock().expect("book");
                    book.pushed.insert(sn.to_string(), (execution_id, download.kcv.clone()));
                    drop(book);
                    self.send(sn, Message::Download(download), Tag::Device);
                }
            }
            Message::Ack(ack) => record.acks.push(ack),
            Message::Bye => record.byes += 1,
            _ => {}
        }
    }

    fn publish_down(&self, sn: &str, bytes: Vec<u8>) {
        self.client.try_publish(topic::device_down(sn), QoS::AtLeastOnce, false, bytes).expect("publish down");
    }

    /// Seals `message` for `sn` with a fresh counter and the chosen tag; returns the frame bytes.
    pub fn seal(&self, sn: &str, message: Message, tag: Tag) -> Vec<u8> {
        let body = Body { party: sn.to_string(), counter: self.next_counter(), message };
        self.seal_body(sn, &body, tag)
    }

    pub fn seal_body(&self, sn: &str, body: &Body, tag: Tag) -> Vec<u8> {
        match tag {
            Tag::Device => {
                let book = self.book.lock().expect("book");
                let secrets = book.devices.get(sn).and_then(|r| r.secrets.as_ref()).expect("terminal initialised");
                frame::seal(&secrets.signing_key, body).expect("seal")
            }
            Tag::Key(key) => frame::seal(&key, body).expect("seal"),
            Tag::Public => frame::seal(&MacKey::public_refusal_key(), body).expect("seal"),
        }
    }

    /// Seals and publishes a message to `sn`; returns the frame bytes (to replay them).
    pub fn send(&self, sn: &str, message: Message, tag: Tag) -> Vec<u8> {
        let bytes = self.seal(sn, message, tag);
        self.publish_down(sn, bytes.clone());
        bytes
    }

    /// Publishes raw bytes on `sn`'s down topic.
    pub fn send_raw(&self, sn: &str, bytes: Vec<u8>) {
        self.publish_down(sn, bytes);
    }

    fn with_secrets<T>(&self, sn: &str, f: impl FnOnce(&DeviceSecrets) -> T) -> T {
        let book = self.book.lock().expect("book");
        f(book.devices.get(sn).and_then(|r| r.secrets.as_ref()).expect("terminal initialised"))
    }

    /// A TDES DUKPT initial key for `sn`, derived from a test BDK, wrapped as a version B block
    /// under the terminal's TDES KBPK, with its KSN and KCV.
    pub fn tdes_download(&self, sn: &str, execution_id: u64, slot: KeySlot) -> Download {
        let bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
        let ksn = Ksn::from_hex(&format!("FFFF98765{:06X}00000", execution_id & 0xFF_FFFF)[..20]).expect("ksn");
        let ipek = derive_ipek(&bdk, &ksn).expect("ipek");
        let kcv = ipek.kcv(KcvLen::Three);
        let header = Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv)).expect("header");
        let block = self
            .with_secrets(sn, |s| {
                tr31::wrap(&s.kbpk_tdes, &header, ipek.secret(), &mut |b| getrandom::getrandom(b).expect("rng"))
            })
            .expect("wrap");
        self.book.lock().expect("book").expected_kcv.insert(execution_id, kcv.as_bytes().to_vec());
        Download {
            execution_id,
            slot,
            key_type: KeyType::Ipek,
            key_block: block,
            key_id: ksn.initial().as_bytes().to_vec(),
            kcv: kcv.as_bytes().to_vec(),
        }
    }

    /// An AES-128 DUKPT initial key for `sn`, wrapped as a version D block under the AES KBPK.
    pub fn aes_download(&self, sn: &str, execution_id: u64, slot: KeySlot) -> Download {
        let bdk = SymmetricKey::aes_from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").expect("bdk");
        let id = InitialKeyId::from_hex("1234567890123456").expect("id");
        let key = derive_initial_key(&bdk, &id).expect("initial key");
        let kcv = key.kcv(KcvLen::Three);
        let header = Header::dukpt_initial_key(Version::D, DukptInitialKeyId::Aes(id), Some(&kcv)).expect("header");
        let block = self
            .with_secrets(sn, |s| {
                tr31::wrap(&s.kbpk_aes, &header, key.secret(), &mut |b| getrandom::getrandom(b).expect("rng"))
            })
            .expect("wrap");
        self.book.lock().expect("book").expected_kcv.insert(execution_id, kcv.as_bytes().to_vec());
        Download {
            execution_id,
            slot,
            key_type: KeyType::Ipek,
            key_block: block,
            key_id: id.as_bytes().to_vec(),
            kcv: kcv.as_bytes().to_vec(),
        }
    }

    /// A key block with usage P0 (PIN encryption) instead of B1, otherwise valid.
    pub fn pin_key_download(&self, sn: &str, execution_id: u64) -> Download {
        let key = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("key");
        let kcv = key.kcv(KcvLen::Three);
        let header = Header::builder(Version::B, *b"P0", b'T', b'E').build().expect("header");
        let block = self
            .with_secrets(sn, |s| {
                tr31::wrap(&s.kbpk_tdes, &header, key.secret(), &mut |b| getrandom::getrandom(b).expect("rng"))
            })
            .expect("wrap");
        Download {
            execution_id,
            slot: KeySlot::PRODUCTION,
            key_type: KeyType::Pik,
            key_block: block,
            key_id: vec![0; 10],
            kcv: kcv.as_bytes().to_vec(),
        }
    }

    /// A signed unlock for `sn`.
    pub fn unlock(&self, sn: &str, tag: Tag) -> Vec<u8> {
        self.send(sn, Message::Unlock(Unlock { unlock_id: self.next_execution_id() }), tag)
    }

    /// The KCV the gateway derived for an execution.
    pub fn expected_kcv(&self, execution_id: u64) -> Option<Vec<u8>> {
        self.book.lock().expect("book").expected_kcv.get(&execution_id).cloned()
    }

    /// Reads the record of `sn`.
    pub fn record<T>(&self, sn: &str, f: impl FnOnce(&DeviceRecord) -> T) -> T {
        let book = self.book.lock().expect("book");
        let empty = DeviceRecord::default();
        f(book.devices.get(sn).unwrap_or(&empty))
    }

    /// The acks of `sn` for one execution.
    pub fn acks_for(&self, sn: &str, execution_id: u64) -> Vec<Ack> {
        self.record(sn, |r| r.acks.iter().filter(|a| a.execution_id == execution_id).cloned().collect())
    }

    /// Waits until `condition` holds for the record of `sn`.
    pub async fn wait_for<T>(&self, sn: &str, what: &str, mut condition: impl FnMut(&DeviceRecord) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(value) = self.record(sn, &mut condition) {
                return value;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(value) = self.record(sn, &mut condition) {
                    return value;
                }
                panic!("{sn}: timed out waiting for {what}");
            }
        }
    }

    /// Waits for the `n`th ack of an execution (1 = the first).
    pub async fn wait_ack(&self, sn: &str, execution_id: u64, n: usize) -> Ack {
        self.wait_for(sn, &format!("ack #{n} of execution {execution_id}"), |r| {
            r.acks.iter().filter(|a| a.execution_id == execution_id).nth(n - 1).cloned()
        })
        .await
    }

    /// Waits until `sn` has sent `n` hellos; returns the last.
    pub async fn wait_hellos(&self, sn: &str, n: usize) -> Hello {
        self.wait_for(sn, &format!("{n} hellos"), |r| {
            (r.hellos.len() >= n).then(|| r.hellos[r.hellos.len() - 1].clone())
        })
        .await
    }

    pub fn hellos(&self, sn: &str) -> usize {
        self.record(sn, |r| r.hellos.len())
    }

    /// Asserts the terminal never sent an up frame with a bad tag or a non-increasing counter.
    pub fn assert_clean_up_channel(&self, sn: &str) {
        let (replays, bad) = self.record(sn, |r| (r.up_replays, r.bad_tags));
        assert_eq!((replays, bad), (0, 0), "{sn}: up frames replayed / badly tagged");
    }

    /// Pushed executions and their expected KCVs (auto push).
    pub fn pushed(&self) -> HashMap<String, (u64, Vec<u8>)> {
        self.book.lock().expect("book").pushed.clone()
    }

    /// Another terminal's signing key, for forged frames.
    pub fn foreign_key() -> MacKey {
        MacKey::random().expect("key")
    }
}

/// A broker and a fake gateway, ready for terminals.
pub struct TestNet {
    pub broker: TestBroker,
    pub gateway: FakeGateway,
}

impl TestNet {
    pub async fn start() -> Self {
        Self::start_for(64).await
    }

    /// A broker sized for `devices` terminals.
    pub async fn start_for(devices: usize) -> Self {
        Self::start_on(free_port(), devices).await
    }

    /// A broker on a chosen port, sized for `devices` terminals.
    pub async fn start_on(port: u16, devices: usize) -> Self {
        let credentials: CredentialBook = Arc::default();
        let broker = TestBroker::start_on(port, credentials.clone(), devices * 2 + 16);
        let gateway = FakeGateway::connect(&broker.addr, credentials).await;
        Self { broker, gateway }
    }

    /// A P3 terminal profile with everything fine.
    pub fn profile(sn: &str) -> DeviceProfile {
        DeviceProfile::new(sn, Model::P3).expect("profile")
    }

    /// A terminal config against this net's broker, in memory.
    pub fn config(&self, profile: DeviceProfile) -> DeviceConfig {
        DeviceConfig::new(profile, self.broker.addr.clone(), StateStore::Memory)
    }

    /// Spawns a terminal, initialises it with a fresh GUDID and waits for its first hello.
    pub async fn initialised_device(&self, config: DeviceConfig) -> DeviceHandle {
        let sn = config.profile.sn().to_string();
        let device = rki_device_sim::Device::spawn(config).await.expect("spawn");
        let gudid = self.gateway.provision(&sn);
        device.initialise(&gudid).await.expect("initialise");
        self.gateway.wait_hellos(&sn, 1).await;
        device
    }
}

/// A fresh, empty directory under the system's temporary directory for one test's state files.
pub fn temporary_state_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rki-device-sim-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("state dir");
    dir
}

/// Bytes of a fresh secret, for tests that need some key.
pub fn random_secret(len: usize) -> SecretBytes {
    SecretBytes::random(len).expect("random")
}

/// Device secrets from a key agreement nobody else took part in, for terminals preset as if
/// initialised at the factory.
pub fn random_device_secrets() -> DeviceSecrets {
    let gudid = Gudid::random().expect("gudid");
    let (a, b) = (Ephemeral::random().expect("a"), Ephemeral::random().expect("b"));
    derive_device_secrets(a, &b.public(), &gudid.mac_key(), b"factory", b"preset").expect("secrets")
}

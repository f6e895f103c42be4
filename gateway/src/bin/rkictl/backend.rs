//! `rkictl backends …` (the credentials, over the admin API) and `rkictl backend watch` (a
//! backend client over MQTT that prints the organization's events as they arrive and
//! acknowledges them, `docs/PROTOCOL.md` §12.6).

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use rki_protocol::backend::{BackendId, BackendSecret};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::message::{Answer, BackendRequest, Body, Event, Message, Request};
use rki_protocol::topic;
use rumqttc::{Client as MqttClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use super::ops::{Client, Output};

#[derive(Subcommand, Debug)]
pub enum BackendsCommand {
    /// Create a backend credential; its secret is shown once.
    Create { name: String },
    /// List the organization's backends.
    List,
    /// Revoke a backend: it can no longer connect or ask anything.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BackendCommand {
    /// Connect as a backend, print each event as one JSON line as it arrives, in `seq` order,
    /// exactly once, and acknowledge them.
    Watch {
        /// The gateway's MQTT endpoint, host:port.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: String,
        /// The organization's slug.
        #[arg(long)]
        org: String,
        /// The backend's name.
        #[arg(long)]
        name: String,
        /// The backend's secret (64 hex digits); better given by the environment.
        #[arg(long, env = "RKI_BACKEND_SECRET", hide_env_values = true)]
        secret: String,
        /// The last event already processed: events after it are printed.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Exit after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Exit when no event came for this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        idle_seconds: u64,
    },
}

pub fn backends(c: &Client, cmd: BackendsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        BackendsCommand::Create { name } => {
            let v = c.post("/v1/backends", &json!({ "name": name }))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            Ok(Output::Text(format!(
                "backend {} created\nclient id: {}\nsecret (shown once): {}\n\
                 the MQTT password and the frame MAC key follow from it (docs/PROTOCOL.md §12.1)",
                v["backend"]["name"].as_str().unwrap_or_default(),
                v["client_id"].as_str().unwrap_or_default(),
                v["secret"].as_str().unwrap_or_default()
            )))
        }
        BackendsCommand::List => {
            let v = c.get("/v1/backends")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let mut out = String::from("NAME\tCREATED BY\tLAST COUNTER\tREVOKED\n");
            for b in v["backends"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{}\t{}\t{}\t{}\n",
                    b["name"].as_str().unwrap_or_default(),
                    b["created_by"].as_str().unwrap_or_default(),
                    b["last_counter"],
                    if b["revoked_at"].is_null() { "-".to_string() } else { b["revoked_at"].to_string() }
                ));
            }
            Ok(Output::Text(out.trim_end().to_string()))
        }
        BackendsCommand::Revoke { name } => {
            let v = c.post(&format!("/v1/backends/{name}/revoke"), &json!({}))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            Ok(Output::Text(format!("backend {name} revoked")))
        }
    }
}

/// Acknowledge at least this often, and after this many events (§12.6).
const ACK_INTERVAL: Duration = Duration::from_secs(10);
const ACK_EVERY_EVENTS: u64 = 100;

/// The backend's side of the channel for `watch`: its keys, counter and `processed`.
struct Watcher {
    id: BackendId,
    key: MacKey,
    counter: u64,
    request_id: u64,
    processed: u64,
    /// An `Events` request is outstanding (its request id).
    asking: Option<u64>,
}

impl Watcher {
    fn next_counter(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        self.counter = now.max(self.counter + 1);
        self.counter
    }

    fn ask_events(&mut self, mqtt: &MqttClient) -> Result<(), String> {
        self.request_id = self.next_counter();
        let body = Body {
            party: self.id.org().to_string(),
            counter: self.next_counter(),
            message: Message::BackendRequest(BackendRequest {
                request_id: self.request_id,
                request: Request::Events { after: self.processed },
            }),
        };
        let bytes = frame::seal(&self.key, &body).map_err(|e| e.to_string())?;
        mqtt.publish(topic::backend_request(self.id.org(), self.id.name()), QoS::AtLeastOnce, false, bytes)
            .map_err(|e| e.to_string())?;
        self.asking = Some(self.request_id);
        Ok(())
    }
}

pub fn watch(cmd: BackendCommand) -> Result<(), String> {
    let BackendCommand::Watch { mqtt, org, name, secret, after, count, idle_seconds } = cmd;
    let id = BackendId::new(&org, &name).map_err(|e| e.to_string())?;
    let secret = BackendSecret::parse(&secret).map_err(|e| e.to_string())?;
    let (host, port) = mqtt.rsplit_once(':').ok_or("--mqtt is host:port")?;
    let port: u16 = port.parse().map_err(|_| "--mqtt is host:port")?;
    let mut options = MqttOptions::new(id.client_id(), host, port);
    let password = secret.mqtt_password(&id);
    let password = String::from_utf8(password.expose_secret().to_vec()).map_err(|_| "password")?;
    options.set_credentials(id.client_id(), password);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut connection) = MqttClient::new(options, 64);
    let mut w = Watcher { key: secret.mac_key(&id), id, counter: 0, request_id: 0, processed: after, asking: None };
    let (reply, events) =
        (topic::backend_reply(w.id.org(), w.id.name()), topic::backend_events(w.id.org(), w.id.name()));
    let mut printed = 0u64;
    let mut since_ack = 0u64;
    let mut last_ack = Instant::now();
    let mut last_event = Instant::now();
    let mut out = std::io::stdout().lock();
    loop {
        let polled = connection.recv_timeout(Duration::from_millis(500));
        if last_ack.elapsed() >= ACK_INTERVAL || since_ack >= ACK_EVERY_EVENTS {
            if w.asking.is_none() {
                w.ask_events(&client)?;
            }
            last_ack = Instant::now();
            since_ack = 0;
        }
        if idle_seconds > 0 && last_event.elapsed() >= Duration::from_secs(idle_seconds) {
            return Ok(());
        }
        let event = match polled {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => return Err(format!("MQTT: {e}")),
            Err(_) => continue,
        };
        match event {
            MqttEvent::Incoming(Packet::ConnAck(_)) => {
                client.subscribe(reply.clone(), QoS::AtLeastOnce).map_err(|e| e.to_string())?;
                client.subscribe(events.clone(), QoS::AtLeastOnce).map_err(|e| e.to_string())?;
            }
            MqttEvent::Incoming(Packet::SubAck(_)) => {
                // After each SUBACK of the events topic (§12.6); asking twice is harmless.
                w.asking = None;
                w.ask_events(&client)?;
            }
            MqttEvent::Incoming(Packet::Publish(p)) => {
                let Ok(unverified) = frame::open_backend(&p.payload) else { continue };
                let Ok(verified) = unverified.verify(&w.key) else { continue };
                if verified.body.party != w.id.org() {
                    continue;
                }
                match verified.body.message {
                    Message::BackendAnswer(answer) if Some(answer.request_id) == w.asking => {
                        w.asking = None;
                        if let Answer::Gap { oldest, .. } = answer.answer {
                            eprintln!("rkictl: events before {oldest} are no longer kept; continuing from there");
                            w.processed = oldest.saturating_sub(1);
                            w.ask_events(&client)?;
                        } else if let Answer::Refused { code, reason } = answer.answer {
                            return Err(format!("events refused: {code} {reason}"));
                        }
                    }
                    Message::BackendEvent(e) if e.seq == w.processed + 1 => {
                        writeln!(out, "{}", event_json(e.seq, &e.event)).map_err(|e| e.to_string())?;
                        out.flush().map_err(|e| e.to_string())?;
                        w.processed = e.seq;
                        printed += 1;
                        since_ack += 1;
                        last_event = Instant::now();
                        if count > 0 && printed >= count {
                            let _ = w.ask_events(&client);
                            std::thread::sleep(Duration::from_millis(200));
                            return Ok(());
                        }
                    }
                    Message::BackendEvent(e) if e.seq > w.processed + 1 && w.asking.is_none() => {
                        w.ask_events(&client)?;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

fn event_json(seq: u64, event: &Event) -> Value {
    match event {
        Event::TaskCreated { task_id, backend, request_id, executions } => json!({
            "seq": seq, "event": "task_created", "task_id": task_id, "backend": backend,
            "request_id": request_id, "executions": executions,
        }),
        Event::ExecutionEnded { task_id, execution_id, sn, outcome, error_code, meaning, ksn, kcv, at_ms } => json!({
            "seq": seq, "event": "execution_ended", "task_id": task_id, "execution_id": execution_id, "sn": sn,
            "outcome": outcome, "error_code": error_code, "meaning": meaning, "ksn": hex::encode_upper(ksn),
            "kcv": hex::encode_upper(kcv), "at_ms": at_ms,
        }),
        Event::TaskDone { task_id, succeeded, failed, expired, terminated } => json!({
            "seq": seq, "event": "task_done", "task_id": task_id, "succeeded": succeeded, "failed": failed,
            "expired": expired, "terminated": terminated,
        }),
    }
}

//! The terminal's side of the bootstrap exchange (docs/PROTOCOL.md §7.3), pure: the `CreateKey`s
//! one initialisation has sent, and what a frame on the down topic means to it. No I/O, no clock
//! of its own (the caller passes `now`). [`crate::device`] runs the MQTT side.
//!
//! An initialisation with one GUDID may take several `CreateKey`s: a terminal that gave up waiting
//! for its answer retries with a new one (a new counter, a new ephemeral key pair), and the gateway
//! may answer the first one late, on the retry's connection. `CreateKeyAnswer::request_counter`
//! names the `CreateKey` answered, so the terminal keeps every `CreateKey` it sent (bounded in
//! number and in age) and derives with the one the answer names; an answer naming any other is
//! ignored.

use std::collections::VecDeque;
use std::time::Duration;

use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::{Ephemeral, Gudid};
use rki_protocol::message::{Message, RefusalCode};
use tokio::time::Instant;

use crate::app::Rejection;

/// `CreateKey`s one initialisation keeps: its latest and the three before. A terminal retries
/// after each answer timeout (10 s by default) and a growing pause, so four span well over the
/// time a slow gateway has been seen to take to answer (SCALE-OUT.md); an answer to an older one
/// is ignored, and the terminal is answered again on its next attempt.
pub const CREATE_KEYS_KEPT_MAX: usize = 4;

/// How long a `CreateKey` is kept after it was sent. The gateway answers a GUDID anew for 10
/// minutes after its first answer (PROTOCOL.md §7.5); an answer later than that is of no use to
/// the terminal, and the private key it would need is better erased.
pub const CREATE_KEY_KEPT_FOR: Duration = Duration::from_secs(10 * 60);

/// One `CreateKey` sent: what an answer to it is derived with.
struct SentCreateKey {
    counter: u64,
    /// Its ephemeral X25519 key pair, used for this `CreateKey` only; the private key is erased
    /// when the entry is dropped (x25519-dalek zeroizes its secrets on drop).
    ephemeral: Ephemeral,
    /// The exact body bytes sent: they enter the transcript.
    body: Vec<u8>,
    sent_at: Instant,
}

/// The `CreateKey`s of the current initialisation (one GUDID), oldest first.
#[derive(Default)]
pub struct SentCreateKeys {
    /// The GUDID they were sent with (its public id): another GUDID starts another
    /// initialisation.
    gudid_id: Option<[u8; 32]>,
    sent: VecDeque<SentCreateKey>,
}

impl std::fmt::Debug for SentCreateKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counters: Vec<u64> = self.sent.iter().map(|s| s.counter).collect();
        f.debug_struct("SentCreateKeys").field("counters", &counters).finish_non_exhaustive()
    }
}

impl SentCreateKeys {
    /// Starts, or goes on with, an initialisation with `gudid`: forgets the `CreateKey`s sent with
    /// another GUDID, and those kept longer than [`CREATE_KEY_KEPT_FOR`].
    pub fn begin(&mut self, gudid: &Gudid, now: Instant) {
        let id = gudid.id();
        if self.gudid_id != Some(id) {
            self.clear();
            self.gudid_id = Some(id);
        }
        self.sent.retain(|s| now.saturating_duration_since(s.sent_at) < CREATE_KEY_KEPT_FOR);
    }

    /// Keeps a `CreateKey` just sent (its counter is above every kept one's), forgetting the
    /// oldest beyond [`CREATE_KEYS_KEPT_MAX`].
    pub fn record(&mut self, counter: u64, ephemeral: Ephemeral, body: Vec<u8>, now: Instant) {
        debug_assert!(self.gudid_id.is_some(), "begin() before record()");
        debug_assert!(self.sent.back().is_none_or(|last| last.counter < counter), "counters increase");
        self.sent.push_back(SentCreateKey { counter, ephemeral, body, sent_at: now });
        while self.sent.len() > CREATE_KEYS_KEPT_MAX {
            self.sent.pop_front();
        }
    }

    /// Whether a `CreateKey` with this counter is kept.
    pub fn knows(&self, counter: u64) -> bool {
        self.sent.iter().any(|s| s.counter == counter)
    }

    /// Whether a `CreateKey` other than `counter` is kept, which the gateway may still answer.
    pub fn others_than(&self, counter: u64) -> bool {
        self.sent.iter().any(|s| s.counter != counter)
    }

    /// The counter of the newest `CreateKey` kept: the one whose answer the store holds once it
    /// is answered, since the gateway answers a newer `CreateKey` anew until the GUDID is proven.
    pub fn newest(&self) -> Option<u64> {
        self.sent.back().map(|s| s.counter)
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Takes out the `CreateKey` with this counter: its ephemeral key pair and body bytes.
    pub fn take(&mut self, counter: u64) -> Option<(Ephemeral, Vec<u8>)> {
        let index = self.sent.iter().position(|s| s.counter == counter)?;
        self.sent.remove(index).map(|s| (s.ephemeral, s.body))
    }

    /// The initialisation is over (secrets derived, or refused for good): forgets every
    /// `CreateKey`, erasing their private keys.
    pub fn clear(&mut self) {
        self.sent.clear();
        self.gudid_id = None;
    }
}

/// What a frame on the down topic means during an initialisation.
#[derive(Debug, PartialEq, Eq)]
pub enum InitFrame {
    /// A `CreateKeyAnswer` under the GUDID's MAC key, for this GUDID, naming a kept `CreateKey`.
    Answered { request_counter: u64, gateway_public: [u8; 32], answer_body: Vec<u8> },
    /// A `Refusal` of the `CreateKey` this connection sent.
    Refused(RefusalCode),
    /// Anything else: dropped, and counted.
    Ignored(Rejection),
}

/// Reads a frame from the down topic during an initialisation with `gudid`. `current` is the
/// counter of the `CreateKey` this connection sent, if any: a refusal names the request it
/// refuses (PROTOCOL.md §7.3), and one of an earlier attempt's `CreateKey` says nothing of this
/// one. An answer may name any kept `CreateKey`, this connection's or an earlier attempt's.
pub fn read_init_frame(
    sn: &str,
    gudid: &Gudid,
    sent: &SentCreateKeys,
    current: Option<u64>,
    bytes: &[u8],
) -> InitFrame {
    let Ok(unverified) = frame::open(bytes) else {
        return InitFrame::Ignored(Rejection::Malformed);
    };
    if unverified.peek().party != sn {
        return InitFrame::Ignored(Rejection::ForeignParty);
    }
    match &unverified.peek().message {
        Message::CreateKeyAnswer(_) => {
            let answer_body = unverified.body_bytes().to_vec();
            let Ok(verified) = unverified.verify(&gudid.mac_key()) else {
                return InitFrame::Ignored(Rejection::BadTag);
            };
            match verified.body.message {
                Message::CreateKeyAnswer(answer)
                    if answer.gudid_id == gudid.id() && sent.knows(answer.request_counter) =>
                {
                    InitFrame::Answered {
                        request_counter: answer.request_counter,
                        gateway_public: answer.gateway_public,
                        answer_body,
                    }
                }
                _ => InitFrame::Ignored(Rejection::Unexpected),
            }
        }
        Message::Refusal(_) => {
            // The gateway cannot know the GUDID it refuses: the public refusal key, or the
            // GUDID's key when it does.
            let verified = frame::open(bytes)
                .ok()
                .and_then(|u| u.verify(&gudid.mac_key()).ok())
                .or_else(|| unverified.verify(&MacKey::public_refusal_key()).ok());
            match verified.map(|v| v.body.message) {
                Some(Message::Refusal(refusal)) if Some(refusal.request_counter) == current => {
                    InitFrame::Refused(refusal.code)
                }
                Some(Message::Refusal(_)) => InitFrame::Ignored(Rejection::Unexpected),
                _ => InitFrame::Ignored(Rejection::BadTag),
            }
        }
        _ => InitFrame::Ignored(Rejection::Unexpected),
    }
}

#[cfg(test)]
mod tests {
    use rki_protocol::init::derive_device_secrets;
    use rki_protocol::message::{Body, CreateKey, CreateKeyAnswer, Refusal};

    use super::*;

    const SN: &str = "BOOT0001";

    /// A CreateKey as the terminal sends it: its ephemeral key pair and exact body bytes.
    fn create_key(gudid: &Gudid, counter: u64) -> (Ephemeral, Vec<u8>) {
        let ephemeral = Ephemeral::random().expect("ephemeral");
        let body = Body {
            party: SN.into(),
            counter,
            message: Message::CreateKey(CreateKey {
                gudid_id: gudid.id(),
                x_pos_device_id: "XPOS".into(),
                device_public: ephemeral.public(),
            }),
        };
        let frame = frame::seal(&gudid.mac_key(), &body).expect("seal");
        (ephemeral, frame::body_bytes_of(&frame).expect("body").to_vec())
    }

    fn answer(gudid: &Gudid, request_counter: u64, gateway_public: [u8; 32], key: &MacKey) -> Vec<u8> {
        let body = Body {
            party: SN.into(),
            counter: 9_000,
            message: Message::CreateKeyAnswer(CreateKeyAnswer {
                gudid_id: gudid.id(),
                request_counter,
                gateway_public,
            }),
        };
        frame::seal(key, &body).expect("seal")
    }

    fn refusal(request_counter: u64) -> Vec<u8> {
        let body = Body {
            party: SN.into(),
            counter: 9_001,
            message: Message::Refusal(Refusal { request_counter, code: RefusalCode::GudidUsed }),
        };
        frame::seal(&MacKey::public_refusal_key(), &body).expect("seal")
    }

    /// What the gateway saw of a CreateKey: its counter, public key and body bytes.
    type Seen = (u64, [u8; 32], Vec<u8>);

    /// A GUDID, and an initialisation with it that sent CreateKeys with `counters`, as the
    /// gateway saw them.
    fn sent(counters: &[u64]) -> (Gudid, SentCreateKeys, Vec<Seen>) {
        let gudid = Gudid::random().expect("gudid");
        let mut sent = SentCreateKeys::default();
        let mut seen = Vec::new();
        let now = Instant::now();
        sent.begin(&gudid, now);
        for counter in counters {
            let (ephemeral, body) = create_key(&gudid, *counter);
            seen.push((*counter, ephemeral.public(), body.clone()));
            sent.record(*counter, ephemeral, body, now);
        }
        (gudid, sent, seen)
    }

    #[test]
    fn an_answer_naming_a_counter_the_terminal_did_not_send_is_ignored() {
        let (gudid, sent, _) = sent(&[10, 20]);
        let gateway = Ephemeral::random().expect("gateway").public();
        for unknown in [0, 11, 19, 21, u64::MAX] {
            let bytes = answer(&gudid, unknown, gateway, &gudid.mac_key());
            assert_eq!(
                read_init_frame(SN, &gudid, &sent, Some(20), &bytes),
                InitFrame::Ignored(Rejection::Unexpected),
                "request_counter {unknown}"
            );
        }
        assert_eq!(sent.len(), 2, "nothing forgotten");
    }

    #[test]
    fn an_answer_to_an_earlier_create_key_is_derived_with_that_create_keys_key_and_body() {
        let (gudid, mut sent, seen) = sent(&[10, 20]);
        // The gateway answered CreateKey 10; the terminal is waiting on 20's connection.
        let (_, first_public, first_body) = &seen[0];
        let gateway = Ephemeral::random().expect("gateway");
        let gateway_public = gateway.public();
        let bytes = answer(&gudid, 10, gateway_public, &gudid.mac_key());
        let InitFrame::Answered { request_counter, gateway_public: public, answer_body } =
            read_init_frame(SN, &gudid, &sent, Some(20), &bytes)
        else {
            panic!("the answer to CreateKey 10 is accepted");
        };
        assert_eq!((request_counter, public), (10, gateway_public));
        let stored =
            derive_device_secrets(gateway, first_public, &gudid.mac_key(), first_body, &answer_body).expect("gateway");
        let (own, body) = sent.take(request_counter).expect("kept");
        assert_eq!(own.public(), *first_public, "the first CreateKey's key pair, not the retry's");
        let derived = derive_device_secrets(own, &public, &gudid.mac_key(), &body, &answer_body).expect("terminal");
        assert_eq!(derived.signing_key, stored.signing_key);
        assert_eq!(derived.mqtt_password, stored.mqtt_password);
        assert!(sent.knows(20) && !sent.knows(10));
    }

    #[test]
    fn an_answer_for_another_gudid_or_under_another_key_is_ignored() {
        let (gudid, sent, _) = sent(&[10]);
        let gateway = Ephemeral::random().expect("gateway").public();
        let other = Gudid::random().expect("other");
        let cases = [
            (answer(&gudid, 10, gateway, &other.mac_key()), Rejection::BadTag),
            (answer(&gudid, 10, gateway, &MacKey::public_refusal_key()), Rejection::BadTag),
            (answer(&other, 10, gateway, &other.mac_key()), Rejection::BadTag),
            (b"not a frame".to_vec(), Rejection::Malformed),
        ];
        for (bytes, rejection) in cases {
            assert_eq!(read_init_frame(SN, &gudid, &sent, Some(10), &bytes), InitFrame::Ignored(rejection));
        }
        // Tagged under this GUDID's key but naming another GUDID.
        let body = Body {
            party: SN.into(),
            counter: 1,
            message: Message::CreateKeyAnswer(CreateKeyAnswer {
                gudid_id: other.id(),
                request_counter: 10,
                gateway_public: gateway,
            }),
        };
        let bytes = frame::seal(&gudid.mac_key(), &body).expect("seal");
        assert_eq!(read_init_frame(SN, &gudid, &sent, Some(10), &bytes), InitFrame::Ignored(Rejection::Unexpected));
        assert_eq!(
            read_init_frame("OTHER", &gudid, &sent, Some(10), &answer(&gudid, 10, gateway, &gudid.mac_key())),
            InitFrame::Ignored(Rejection::ForeignParty)
        );
    }

    #[test]
    fn only_a_refusal_of_this_connections_create_key_refuses() {
        let (gudid, sent, _) = sent(&[10, 20]);
        assert_eq!(
            read_init_frame(SN, &gudid, &sent, Some(20), &refusal(20)),
            InitFrame::Refused(RefusalCode::GudidUsed)
        );
        for (current, refused) in [(Some(20), 10), (Some(20), 30), (None, 20)] {
            assert_eq!(
                read_init_frame(SN, &gudid, &sent, current, &refusal(refused)),
                InitFrame::Ignored(Rejection::Unexpected),
                "{current:?} {refused}"
            );
        }
        assert!(sent.others_than(20), "CreateKey 10 may still be answered");
        let (_, alone, _) = self::sent(&[20]);
        assert!(!alone.others_than(20));
    }

    #[test]
    fn create_keys_are_kept_within_bounds_and_forgotten_with_their_gudid() {
        let (gudid, mut sent, _) = sent(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(sent.len(), CREATE_KEYS_KEPT_MAX);
        assert!(!sent.knows(1) && !sent.knows(2) && sent.knows(3) && sent.knows(6), "the latest four");

        // Too old: forgotten when the initialisation goes on.
        sent.begin(&gudid, Instant::now() + CREATE_KEY_KEPT_FOR);
        assert!(sent.is_empty());

        let (ephemeral, body) = create_key(&gudid, 7);
        sent.record(7, ephemeral, body, Instant::now());
        sent.begin(&gudid, Instant::now() + CREATE_KEY_KEPT_FOR - Duration::from_secs(1));
        assert!(sent.knows(7), "same GUDID, recent: kept");
        sent.begin(&Gudid::random().expect("another"), Instant::now());
        assert!(sent.is_empty(), "another GUDID starts another initialisation");

        let (ephemeral, body) = create_key(&gudid, 8);
        sent.begin(&gudid, Instant::now());
        sent.record(8, ephemeral, body, Instant::now());
        assert!(sent.take(8).is_some() && sent.take(8).is_none(), "taken once");
        assert!(!format!("{sent:?}").is_empty());
    }
}

//! Properties of TR-31 wrap and unwrap, over every version we wrap (B, D), every KBPK length and
//! every key length of the TDES and AES algorithms:
//! - what `wrap` makes, `unwrap` gives back, header and key;
//! - any single changed character or flipped payload bit is refused;
//! - no input makes `unwrap` or `Header::parse` panic.
//!
//! And, in `frames`, properties of the signed frame around every wire message.

use proptest::prelude::*;

use rki_protocol::tr31::{self, Header, OptionalBlock, Version};
use rki_protocol::{KeyAlgorithm, SecretBytes, SymmetricKey};

const CASES: u32 = 256;

fn kbpk_algorithm() -> impl Strategy<Value = KeyAlgorithm> {
    prop_oneof![
        Just(KeyAlgorithm::Tdes2),
        Just(KeyAlgorithm::Tdes3),
        Just(KeyAlgorithm::Aes128),
        Just(KeyAlgorithm::Aes192),
        Just(KeyAlgorithm::Aes256),
    ]
}

/// A header algorithm and a key length valid for it, with a usage and mode that allow it.
fn key_shape() -> impl Strategy<Value = (u8, usize, [u8; 2], u8)> {
    let tdes = (prop_oneof![Just(8usize), Just(16), Just(24)], 0usize..4).prop_map(|(len, i)| {
        let (usage, mode) = [(*b"B1", b'X'), (*b"K0", b'B'), (*b"P0", b'E'), (*b"M3", b'C')][i];
        (b'T', len, usage, mode)
    });
    let aes = (prop_oneof![Just(16usize), Just(24), Just(32)], 0usize..4).prop_map(|(len, i)| {
        let (usage, mode) = [(*b"B1", b'X'), (*b"K1", b'B'), (*b"P0", b'D'), (*b"D0", b'B')][i];
        (b'A', len, usage, mode)
    });
    prop_oneof![tdes, aes]
}

fn optional_blocks() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("[A-Z][A-Z0-9]", "[ -~]{0,40}"), 0..3)
}

#[derive(Debug)]
struct Case {
    kbpk: SymmetricKey,
    header: Header,
    key: SecretBytes,
    block: String,
}

fn make_case(
    kbpk_algorithm: KeyAlgorithm,
    kbpk_seed: u8,
    (algorithm, key_len, usage, mode): (u8, usize, [u8; 2], u8),
    key_seed: u8,
    blocks: Vec<(String, String)>,
    rng_seed: u8,
) -> Option<Case> {
    let version = if kbpk_algorithm.is_tdes() { Version::B } else { Version::D };
    let kbpk_bytes: Vec<u8> =
        (0..kbpk_algorithm.key_len()).map(|i| kbpk_seed.wrapping_mul(31).wrapping_add(i as u8)).collect();
    let kbpk = SymmetricKey::new(kbpk_algorithm, SecretBytes::from_vec(kbpk_bytes)).ok()?;
    let mut builder = Header::builder(version, usage, algorithm, mode).exportability(b'E');
    for (id, data) in blocks {
        let id: [u8; 2] = id.as_bytes().try_into().ok()?;
        // Known IDs have formats of their own, and PB is automatic: keep to free-form ones.
        if [*b"KS", *b"IK", *b"KC", *b"KP", *b"PB"].contains(&id) {
            continue;
        }
        builder = builder.optional_block(OptionalBlock::new(id, data).ok()?);
    }
    // Random IDs may repeat: such headers are refused at build, which is tested elsewhere.
    let header = builder.build().ok()?;
    let key = SecretBytes::from_vec((0..key_len).map(|i| key_seed ^ (i as u8 * 7)).collect());
    let mut state = rng_seed;
    let mut rng = |buf: &mut [u8]| {
        for byte in buf {
            state = state.wrapping_mul(167).wrapping_add(13);
            *byte = state;
        }
    };
    let block = tr31::wrap(&kbpk, &header, &key, &mut rng).expect("valid inputs wrap");
    Some(Case { kbpk, header, key, block })
}

fn case() -> impl Strategy<Value = Case> {
    (kbpk_algorithm(), any::<u8>(), key_shape(), any::<u8>(), optional_blocks(), any::<u8>())
        .prop_filter_map("duplicate optional block IDs", |(a, ks, shape, k, blocks, r)| {
            make_case(a, ks, shape, k, blocks, r)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn wrapped_key_unwraps_to_the_same_header_and_key(case in case()) {
        let block_len = case.header.version().block_len();
        prop_assert_eq!(case.block.len() % 2, 0);
        let (header, key) = tr31::unwrap(&case.kbpk, &case.block).expect("own block unwraps");
        prop_assert_eq!(header.version(), case.header.version());
        prop_assert_eq!(header.key_usage(), case.header.key_usage());
        prop_assert_eq!(header.algorithm(), case.header.algorithm());
        prop_assert_eq!(header.mode_of_use(), case.header.mode_of_use());
        prop_assert_eq!(header.exportability(), case.header.exportability());
        let without_padding: Vec<&OptionalBlock> =
            header.optional_blocks().iter().filter(|b| b.id() != *b"PB").collect();
        let original: Vec<&OptionalBlock> = case.header.optional_blocks().iter().collect();
        prop_assert_eq!(without_padding, original);
        prop_assert!(key == case.key);
        prop_assert_eq!(case.header.encoded_len() % block_len, 0);
    }

    #[test]
    fn a_prepared_kbpk_unwraps_exactly_like_unwrap(
        case in case(),
        position in any::<prop::sample::Index>(),
        replacement in prop::char::range(' ', '~'),
        other_kbpk in kbpk_algorithm(),
    ) {
        let at = position.index(case.block.len());
        let mut changed = case.block.clone();
        changed.replace_range(at..at + 1, &replacement.to_string());
        let wrong = SymmetricKey::new(other_kbpk, SecretBytes::from_vec(vec![0x5A; other_kbpk.key_len()]))
            .expect("key of the algorithm's length");
        for kbpk in [&case.kbpk, &wrong] {
            let prepared = tr31::PreparedKbpk::new(kbpk);
            for block in [&case.block, &changed] {
                let plain = tr31::unwrap(kbpk, block);
                let fast = prepared.unwrap(block);
                match (plain, fast) {
                    (Ok((h1, k1)), Ok((h2, k2))) => {
                        prop_assert_eq!(h1, h2);
                        prop_assert!(k1 == k2);
                    }
                    (Err(e1), Err(e2)) => prop_assert_eq!(e1, e2),
                    (a, b) => prop_assert!(false, "unwrap {:?} but prepared {:?}", a.map(|_| ()), b.map(|_| ())),
                }
            }
        }
    }

    #[test]
    fn wrap_pair_gives_what_two_wraps_give(
        a in case(),
        other in case(),
        kbpk_seed in any::<u8>(),
        key_seed in any::<u8>(),
        rng_seed in any::<u8>(),
        shape in 0usize..3,
    ) {
        // 0: a second terminal of the same task (a's header and key length, its own KBPK and
        // key: the interleaved path when the KBPK is TDES); 1: an unrelated block (one by one);
        // 2: a's header under the other case's KBPK (often the wrong family: errors in turn).
        let (kbpk_b, header_b, key_b) = match shape {
            0 => {
                let algorithm = a.kbpk.algorithm();
                let bytes = (0..algorithm.key_len()).map(|i| kbpk_seed ^ (i as u8).wrapping_mul(53)).collect();
                let key = (0..a.key.len()).map(|i| key_seed.wrapping_add(i as u8 * 11)).collect();
                (SymmetricKey::new(algorithm, SecretBytes::from_vec(bytes)).expect("key"), a.header.clone(), SecretBytes::from_vec(key))
            }
            1 => (other.kbpk.clone_secret(), other.header.clone(), SecretBytes::from_slice(other.key.expose_secret())),
            _ => (other.kbpk.clone_secret(), a.header.clone(), SecretBytes::from_slice(a.key.expose_secret())),
        };
        let counter = |seed: u8| {
            let mut state = seed;
            move |buf: &mut [u8]| {
                for byte in buf {
                    state = state.wrapping_mul(167).wrapping_add(13);
                    *byte = state;
                }
            }
        };
        let mut rng = counter(rng_seed);
        let paired = tr31::wrap_pair((&a.kbpk, &a.header, &a.key), (&kbpk_b, &header_b, &key_b), &mut rng);
        let mut rng = counter(rng_seed);
        let first = tr31::wrap(&a.kbpk, &a.header, &a.key, &mut rng);
        let second = tr31::wrap(&kbpk_b, &header_b, &key_b, &mut rng);
        prop_assert_eq!(&paired[0], &first);
        prop_assert_eq!(&paired[1], &second);
        if let Ok(block) = &paired[1] {
            let (_, key) = tr31::unwrap(&kbpk_b, block).expect("the paired block unwraps");
            prop_assert!(key == key_b);
        }
    }

    #[test]
    fn any_single_changed_character_is_refused(
        case in case(),
        position in any::<prop::sample::Index>(),
        replacement in prop::char::range(' ', '~'),
    ) {
        let at = position.index(case.block.len());
        let original = case.block.as_bytes()[at];
        prop_assume!(original != replacement as u8);
        let mut changed = case.block.clone();
        changed.replace_range(at..at + 1, &replacement.to_string());
        prop_assert!(tr31::unwrap(&case.kbpk, &changed).is_err(), "accepted change at {}", at);
    }

    #[test]
    fn any_single_flipped_payload_bit_is_refused(
        case in case(),
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let header_len = case.header.encoded_len();
        let mut payload = hex::decode(&case.block[header_len..]).expect("payload hex");
        let at = position.index(payload.len());
        payload[at] ^= 1 << bit;
        let changed = format!("{}{}", &case.block[..header_len], hex::encode_upper(&payload));
        prop_assert_eq!(
            tr31::unwrap(&case.kbpk, &changed).map(|_| ()),
            Err(tr31::Tr31Error::MacMismatch)
        );
    }

    #[test]
    fn truncated_or_extended_blocks_are_refused(
        case in case(),
        cut in any::<prop::sample::Index>(),
        extra in "[0-9A-F]{1,32}",
    ) {
        let at = cut.index(case.block.len());
        prop_assert!(tr31::unwrap(&case.kbpk, &case.block[..at]).is_err());
        let extended = format!("{}{}", case.block, extra);
        prop_assert!(tr31::unwrap(&case.kbpk, &extended).is_err());
    }

    #[test]
    fn arbitrary_text_never_panics_unwrap_or_parse(text in any::<String>(), tdes in any::<bool>()) {
        let kbpk = if tdes {
            SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210")
        } else {
            SymmetricKey::aes_from_hex("0123456789ABCDEFFEDCBA9876543210")
        }
        .expect("key");
        let _ = tr31::unwrap(&kbpk, &text);
        let _ = Header::parse(&text);
    }

    #[test]
    fn header_shaped_text_never_panics_unwrap_or_parse(
        prefix in concat!(
            "[ABCD][0-9]{4}",
            "(B1TX|B0AX|K0TB|K1AE|P0AE|D0TD|M3TC|[A-Z0-9]{2}[A-Z]{2})",
            "[0-9]{2}[ENS]0[0-3]00",
        ),
        rest in "([A-Z]{2}(00)?[0-9A-F]{2}[ -~]{0,24}){0,3}[0-9A-F]{0,160}",
    ) {
        let text = format!("{prefix}{rest}");
        let tdes = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("key");
        let aes = SymmetricKey::aes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("key");
        let _ = tr31::unwrap(&tdes, &text);
        let _ = tr31::unwrap(&aes, &text);
        if let Ok(header) = Header::parse(&text) {
            // Whatever parses formats, and the formatted header parses to the same fields.
            let formatted = header.format(0).expect("format");
            let again = Header::parse(&formatted).expect("formatted header parses");
            prop_assert_eq!(again.key_usage(), header.key_usage());
        }
    }
}

// ------------------------------------------------------------------ frames and messages
//
// Properties of the signed frame around every wire message (`frame::open`, `seal`, `verify`):
// - no input makes `open` or `verify` panic;
// - any single flipped bit of a sealed frame, of every message kind, is refused;
// - every valid body (every `Message` variant, every field within `message::limits`) seals,
//   opens to itself and verifies under its key, and only under its key.

mod frames {
    use proptest::prelude::*;

    use rki_protocol::frame::{self, FrameError, MacKey, BACKEND_FRAME_LEN_MAX, FRAME_LEN_MAX};
    use rki_protocol::message::{
        limits, Ack, Answer, BackendAnswer, BackendEvent, BackendRequest, Body, CreateKey, CreateKeyAnswer,
        DeviceRefusal, Download, Event, ExecutionCounts, Hello, Message, NotReady, NotReadyReason, Refusal,
        RefusalCode, RefusedFrame, Request, SlotStatus, TaskOrder, TaskTarget, Unlock,
    };
    use rki_protocol::terminal::{InjectionType, KeySlot, KeyType, Region};
    use rki_protocol::SecretBytes;

    const CASES: u32 = 512;
    /// Message variants, for drawing one kind at a time.
    const KINDS: usize = 12;
    /// SNs (or not-ready devices) a generated backend message lists: the limit allows 1000, which
    /// `frame`'s own test seals at its longest; a few keep the property fast.
    const LIST_GENERATED_MAX: usize = 8;

    fn key(byte: u8) -> MacKey {
        MacKey::new(SecretBytes::from_slice(&[byte; 32])).expect("32-byte key")
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    /// Up to 16 characters of up to 4 bytes: at most the 64-byte limit, with non-ASCII UTF-8.
    fn short_text() -> impl Strategy<Value = String> {
        "\\PC{0,16}"
    }

    fn bytes_up_to(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..=max)
    }

    fn slot() -> impl Strategy<Value = KeySlot> {
        any::<u16>().prop_map(KeySlot)
    }

    fn key_type() -> impl Strategy<Value = KeyType> {
        prop::sample::select(KeyType::ALL.to_vec())
    }

    fn slot_status() -> impl Strategy<Value = SlotStatus> {
        (slot(), key_type(), bytes_up_to(limits::KEY_ID_LEN_MAX), bytes_up_to(limits::KCV_LEN_MAX))
            .prop_map(|(slot, key_type, key_id, kcv)| SlotStatus { slot, key_type, key_id, kcv })
    }

    fn injection() -> impl Strategy<Value = InjectionType> {
        prop_oneof![Just(InjectionType::Auto), Just(InjectionType::Manual)]
    }

    fn refusal_code() -> impl Strategy<Value = RefusalCode> {
        prop::sample::select(vec![
            RefusalCode::UnknownGudid,
            RefusalCode::GudidUsed,
            RefusalCode::GudidExpired,
            RefusalCode::GudidWrongDevice,
            RefusalCode::BadTag,
            RefusalCode::Malformed,
            RefusalCode::Replay,
            RefusalCode::UnknownDevice,
        ])
    }

    /// A message of variant `kind` (the wire index), every field within its limit.
    fn message_of_kind(kind: usize) -> BoxedStrategy<Message> {
        match kind {
            0 => (any::<[u8; 32]>(), short_text(), any::<[u8; 32]>())
                .prop_map(|(gudid_id, x_pos_device_id, device_public)| {
                    Message::CreateKey(CreateKey { gudid_id, x_pos_device_id, device_public })
                })
                .boxed(),
            1 => (any::<[u8; 32]>(), any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(gudid_id, request_counter, gateway_public)| {
                    Message::CreateKeyAnswer(CreateKeyAnswer { gudid_id, request_counter, gateway_public })
                })
                .boxed(),
            2 => (
                short_text(),
                short_text(),
                short_text(),
                prop_oneof![Just(Region::Eu), Just(Region::Cn)],
                any::<bool>(),
                any::<bool>(),
                prop::collection::vec(slot_status(), 0..=limits::SLOTS_MAX),
            )
                .prop_map(|(model, rom_version, app_version, region, debug_mode, locked, slots)| {
                    Message::Hello(Hello { model, rom_version, app_version, region, debug_mode, locked, slots })
                })
                .boxed(),
            3 => (
                any::<u64>(),
                any::<i32>(),
                slot(),
                bytes_up_to(limits::KEY_ID_LEN_MAX),
                bytes_up_to(limits::KCV_LEN_MAX),
                injection(),
            )
                .prop_map(|(execution_id, result, slot, key_id, kcv, injection)| {
                    Message::Ack(Ack { execution_id, result, slot, key_id, kcv, injection })
                })
                .boxed(),
            4 => Just(Message::Bye).boxed(),
            5 => (
                any::<u64>(),
                slot(),
                key_type(),
                "[ -~]{0,512}",
                bytes_up_to(limits::KEY_ID_LEN_MAX),
                bytes_up_to(limits::KCV_LEN_MAX),
            )
                .prop_map(|(execution_id, slot, key_type, key_block, key_id, kcv)| {
                    Message::Download(Download { execution_id, slot, key_type, key_block, key_id, kcv })
                })
                .boxed(),
            6 => any::<u64>().prop_map(|unlock_id| Message::Unlock(Unlock { unlock_id })).boxed(),
            7 => (any::<u64>(), refusal_code())
                .prop_map(|(request_counter, code)| Message::Refusal(Refusal { request_counter, code }))
                .boxed(),
            8 => (any::<u64>(), request())
                .prop_map(|(request_id, request)| Message::BackendRequest(BackendRequest { request_id, request }))
                .boxed(),
            9 => (any::<u64>(), answer())
                .prop_map(|(request_id, answer)| Message::BackendAnswer(BackendAnswer { request_id, answer }))
                .boxed(),
            10 => (
                any::<u64>(),
                any::<u64>(),
                prop_oneof![
                    any::<u64>().prop_map(|execution_id| RefusedFrame::Download { execution_id }),
                    any::<u64>().prop_map(|unlock_id| RefusedFrame::Unlock { unlock_id }),
                ],
                refusal_code(),
            )
                .prop_map(|(refused_counter, accepted_counter, frame, code)| {
                    Message::DeviceRefusal(DeviceRefusal { refused_counter, accepted_counter, frame, code })
                })
                .boxed(),
            _ => (any::<u64>(), event())
                .prop_map(|(seq, event)| Message::BackendEvent(BackendEvent { seq, event }))
                .boxed(),
        }
    }

    fn sns() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(name(), 0..=LIST_GENERATED_MAX)
    }

    fn task_order() -> impl Strategy<Value = TaskOrder> {
        (
            prop_oneof![sns().prop_map(TaskTarget::Devices), short_text().prop_map(TaskTarget::Group)],
            short_text(),
            slot(),
            any::<u16>(),
        )
            .prop_map(|(target, key_source, slot, expiry_days)| TaskOrder {
                target,
                key_source,
                slot,
                expiry_days,
            })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            task_order().prop_map(Request::CreateTask),
            task_order().prop_map(Request::Preview),
            any::<u64>().prop_map(|task_id| Request::StopTask { task_id }),
            sns().prop_map(|sns| Request::Unlock { sns }),
            any::<u64>().prop_map(|task_id| Request::QueryTask { task_id }),
            any::<u64>().prop_map(|after| Request::Events { after }),
        ]
    }

    fn not_ready() -> impl Strategy<Value = NotReady> {
        (
            name(),
            prop::collection::vec(
                prop::sample::select(NotReadyReason::ALL.to_vec()),
                0..=limits::NOT_READY_REASONS_MAX,
            ),
        )
            .prop_map(|(sn, reasons)| NotReady { sn, reasons })
    }

    fn answer() -> impl Strategy<Value = Answer> {
        let counts = any::<[u32; 6]>().prop_map(|[pending, delivered, succeeded, failed, expired, terminated]| {
            ExecutionCounts { pending, delivered, succeeded, failed, expired, terminated }
        });
        prop_oneof![
            (any::<u64>(), any::<u32>()).prop_map(|(task_id, executions)| Answer::TaskCreated { task_id, executions }),
            (any::<u32>(), any::<u32>(), prop::collection::vec(not_ready(), 0..=LIST_GENERATED_MAX))
                .prop_map(|(ready, not_ready_total, not_ready)| Answer::Preview { ready, not_ready_total, not_ready }),
            (any::<u64>(), any::<u32>()).prop_map(|(task_id, terminated)| Answer::Stopped { task_id, terminated }),
            (any::<u32>(), sns()).prop_map(|(unlocked, unknown)| Answer::Unlocked { unlocked, unknown }),
            (any::<u64>(), short_text(), counts).prop_map(|(task_id, state, counts)| Answer::TaskState {
                task_id,
                state,
                counts
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(after, last)| Answer::Events { after, last }),
            (any::<u64>(), any::<u64>()).prop_map(|(after, oldest)| Answer::Gap { after, oldest }),
            (any::<u16>(), short_text()).prop_map(|(code, reason)| Answer::Refused { code, reason }),
        ]
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (any::<u64>(), prop_oneof![Just(String::new()), name()], any::<u64>(), any::<u32>()).prop_map(
                |(task_id, backend, request_id, executions)| Event::TaskCreated {
                    task_id,
                    backend,
                    request_id,
                    executions
                }
            ),
            (
                (any::<u64>(), any::<u64>(), name(), short_text()),
                (
                    any::<i32>(),
                    short_text(),
                    bytes_up_to(limits::KEY_ID_LEN_MAX),
                    bytes_up_to(limits::KCV_LEN_MAX),
                    any::<u64>()
                ),
            )
                .prop_map(
                    |((task_id, execution_id, sn, outcome), (error_code, meaning, ksn, kcv, at_ms))| {
                        Event::ExecutionEnded {
                            task_id,
                            execution_id,
                            sn,
                            outcome,
                            error_code,
                            meaning,
                            ksn,
                            kcv,
                            at_ms,
                        }
                    }
                ),
            (any::<u64>(), any::<[u32; 4]>()).prop_map(|(task_id, [succeeded, failed, expired, terminated])| {
                Event::TaskDone { task_id, succeeded, failed, expired, terminated }
            }),
        ]
    }

    /// Opens a frame as the receiver of `body`'s channel does.
    fn open_for<'a>(body: &Body, bytes: &'a [u8]) -> Result<frame::Unverified<'a>, FrameError> {
        if body.message.kind().is_backend() {
            frame::open_backend(bytes)
        } else {
            frame::open(bytes)
        }
    }

    /// A valid body of a uniformly drawn message kind.
    fn body() -> impl Strategy<Value = Body> {
        (0..KINDS).prop_flat_map(|kind| {
            (name(), any::<u64>(), message_of_kind(kind)).prop_map(|(party, counter, message)| Body {
                party,
                counter,
                message,
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn arbitrary_bytes_never_panic_open_or_verify(bytes in prop::collection::vec(any::<u8>(), 0..FRAME_LEN_MAX + 16)) {
            if let Ok(unverified) = frame::open(&bytes) {
                let _ = unverified.verify(&key(1));
            }
            if let Ok(unverified) = frame::open_backend(&bytes) {
                let _ = unverified.verify(&key(1));
            }
        }

        #[test]
        fn backend_shaped_bytes_never_panic_open_backend_or_check(
            kind in prop_oneof![Just(8u8), Just(9), Just(11), any::<u8>()],
            variant in 0u8..10,
            body in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            // A party, a counter, a backend message index, a request id, a variant index, then
            // noise: reaches every field decoder of the backend messages.
            let mut inner = vec![4, b'a', b'c', b'm', b'e', 7, kind, 1, variant];
            inner.extend_from_slice(&body);
            let mut bytes = vec![1u8];
            bytes.extend(postcard::to_stdvec(&inner.len()).expect("varint"));
            bytes.extend_from_slice(&inner);
            bytes.extend_from_slice(&[0u8; 32]);
            if let Ok(unverified) = frame::open_backend(&bytes) {
                prop_assert_eq!(unverified.peek().validate(), Ok(()));
                if let Message::BackendRequest(request) = &unverified.peek().message {
                    let _ = request.check();
                }
                prop_assert_eq!(unverified.verify(&key(1)).err(), Some(FrameError::BadTag));
            }
        }

        #[test]
        fn frame_shaped_bytes_never_panic_open(
            version in prop_oneof![Just(1u8), any::<u8>()],
            body in prop::collection::vec(any::<u8>(), 0..600),
            kind in 0u8..13,
            tag in any::<[u8; 32]>(),
        ) {
            // A plausible frame around a random body that starts with a party and a message index.
            let mut inner = vec![4, b'S', b'N', b'-', b'1', 7, kind];
            inner.extend_from_slice(&body);
            let mut bytes = vec![version];
            bytes.extend(postcard::to_stdvec(&inner.len()).expect("varint"));
            bytes.extend_from_slice(&inner);
            bytes.extend_from_slice(&tag);
            if let Ok(unverified) = frame::open(&bytes) {
                prop_assert_eq!(unverified.body_bytes(), inner.as_slice());
                prop_assert_eq!(unverified.verify(&key(1)).err(), Some(FrameError::BadTag));
            }
        }

        #[test]
        fn every_valid_body_seals_opens_and_verifies_to_itself(body in body()) {
            prop_assert_eq!(body.validate(), Ok(()));
            let sealed = frame::seal(&key(1), &body).expect("a valid body fits a frame");
            let unverified = open_for(&body, &sealed).expect("a sealed frame opens");
            prop_assert_eq!(unverified.peek(), &body);
            let encoded = postcard::to_stdvec(&body).expect("encode");
            prop_assert_eq!(unverified.body_bytes(), encoded.as_slice());
            let verified = unverified.verify(&key(1)).expect("verifies under its key");
            prop_assert_eq!(&verified.body, &body);
            let other = open_for(&body, &sealed).expect("opens").verify(&key(2));
            prop_assert_eq!(other.err(), Some(FrameError::BadTag));
        }

        #[test]
        fn any_single_flipped_bit_of_a_sealed_frame_is_refused(
            body in body(),
            position in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let sealed = frame::seal(&key(1), &body).expect("seal");
            let mut flipped = sealed.clone();
            let at = position.index(flipped.len());
            flipped[at] ^= 1 << bit;
            let outcome = open_for(&body, &flipped).and_then(|u| u.verify(&key(1)));
            prop_assert!(outcome.is_err(), "{} with bit {} of byte {} flipped was accepted", body.message.kind().as_str(), bit, at);
        }
    }

    /// A backend message with one field drawn past its limit.
    fn over_limit_backend_message() -> impl Strategy<Value = (&'static str, Message)> {
        let long_text = "[a-z]{65,100}";
        let too_many = (limits::TASK_DEVICES_MAX + 1)..(limits::TASK_DEVICES_MAX + 8);
        let names_over = too_many.clone().prop_map(|n| (0..n).map(|i| format!("SN{i}")).collect::<Vec<_>>());
        let request = |request| Message::BackendRequest(BackendRequest { request_id: 1, request });
        let answer = |answer| Message::BackendAnswer(BackendAnswer { request_id: 1, answer });
        let order = |target, key_source| TaskOrder { target, key_source, slot: KeySlot(1), expiry_days: 0 };
        let ended = |sn: String, outcome: String, meaning: String, ksn: Vec<u8>, kcv: Vec<u8>| {
            Message::BackendEvent(BackendEvent {
                seq: 1,
                event: Event::ExecutionEnded {
                    task_id: 1,
                    execution_id: 2,
                    sn,
                    outcome,
                    error_code: 0,
                    meaning,
                    ksn,
                    kcv,
                    at_ms: 3,
                },
            })
        };
        prop_oneof![
            names_over.clone().prop_map(move |sns| (
                "devices",
                request(Request::CreateTask(order(TaskTarget::Devices(sns), String::new())))
            )),
            "[A-Za-z0-9]{0,8}[/+# :@][A-Za-z0-9]{0,8}".prop_map(move |sn| (
                "bad sn",
                request(Request::Preview(order(TaskTarget::Devices(vec![sn]), String::new())))
            )),
            long_text
                .prop_map(move |g| ("group", request(Request::Preview(order(TaskTarget::Group(g), String::new()))))),
            long_text.prop_map(move |k| (
                "key_source",
                request(Request::CreateTask(order(TaskTarget::Group("g".into()), k)))
            )),
            names_over.clone().prop_map(move |sns| ("unlock", request(Request::Unlock { sns }))),
            ((limits::NOT_READY_LISTED_MAX + 1)..(limits::NOT_READY_LISTED_MAX + 4)).prop_map(move |n| (
                "not_ready",
                answer(Answer::Preview {
                    ready: 0,
                    not_ready_total: n as u32,
                    not_ready: (0..n).map(|i| NotReady { sn: format!("SN{i}"), reasons: vec![] }).collect(),
                })
            )),
            ((limits::NOT_READY_REASONS_MAX + 1)..20).prop_map(move |n| (
                "reasons",
                answer(Answer::Preview {
                    ready: 0,
                    not_ready_total: 1,
                    not_ready: vec![NotReady { sn: "SN1".into(), reasons: vec![NotReadyReason::Locked; n] }],
                })
            )),
            names_over.prop_map(move |unknown| ("unknown", answer(Answer::Unlocked { unlocked: 0, unknown }))),
            long_text.prop_map(move |state| (
                "state",
                answer(Answer::TaskState { task_id: 1, state, counts: ExecutionCounts::default() })
            )),
            long_text.prop_map(move |reason| ("reason", answer(Answer::Refused { code: 1, reason }))),
            long_text.prop_map(move |o| ("outcome", ended("SN1".into(), o, String::new(), vec![], vec![]))),
            long_text.prop_map(move |m| ("meaning", ended("SN1".into(), "failed".into(), m, vec![], vec![]))),
            prop::collection::vec(any::<u8>(), (limits::KEY_ID_LEN_MAX + 1)..40).prop_map(move |ksn| (
                "ksn",
                ended("SN1".into(), "succeeded".into(), String::new(), ksn, vec![1, 2, 3])
            )),
            prop::collection::vec(any::<u8>(), (limits::KCV_LEN_MAX + 1)..20)
                .prop_map(move |kcv| ("kcv", ended("SN1".into(), "succeeded".into(), String::new(), vec![], kcv))),
            Just(("empty sn", ended(String::new(), "failed".into(), String::new(), vec![], vec![]))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// `seal` does not check the limits; `open_backend` does.
        #[test]
        fn a_backend_body_with_one_field_past_its_limit_is_refused_by_open_backend(
            (field, message) in over_limit_backend_message(),
            party in name(),
        ) {
            let body = Body { party, counter: 1, message };
            prop_assert!(body.validate().is_err(), "{} past its limit validated", field);
            let sealed = frame::seal(&key(1), &body).expect("seal does not check limits");
            prop_assert!(sealed.len() <= BACKEND_FRAME_LEN_MAX);
            prop_assert!(matches!(frame::open_backend(&sealed), Err(FrameError::InvalidBody(_))), "{} was accepted", field);
        }
    }

    /// `seal` does not check the limits; `open` does. A field one past its limit is refused at the
    /// receiver, whatever the sender did.
    #[test]
    fn a_body_with_one_field_past_its_limit_is_refused_by_open() {
        let slot = SlotStatus { slot: KeySlot::PRODUCTION, key_type: KeyType::Ipek, key_id: vec![], kcv: vec![] };
        let hello = |slots: Vec<SlotStatus>, model: String| {
            Message::Hello(Hello {
                model,
                rom_version: "3.0.15".into(),
                app_version: "2.0.0".into(),
                region: Region::Eu,
                debug_mode: false,
                locked: false,
                slots,
            })
        };
        let ack = |key_id: Vec<u8>, kcv: Vec<u8>| {
            Message::Ack(Ack {
                execution_id: 1,
                result: 0,
                slot: KeySlot::PRODUCTION,
                key_id,
                kcv,
                injection: InjectionType::Auto,
            })
        };
        let download = |key_block: String| {
            Message::Download(Download {
                execution_id: 1,
                slot: KeySlot::PRODUCTION,
                key_type: KeyType::Ipek,
                key_block,
                key_id: vec![],
                kcv: vec![],
            })
        };
        let cases: Vec<(&str, String, Message)> = vec![
            ("17 slots", "SN1".into(), hello(vec![slot.clone(); limits::SLOTS_MAX + 1], "P3".into())),
            ("65-byte model", "SN1".into(), hello(vec![], "M".repeat(limits::SHORT_TEXT_LEN_MAX + 1))),
            ("17-byte key id", "SN1".into(), ack(vec![0; limits::KEY_ID_LEN_MAX + 1], vec![])),
            ("6-byte kcv", "SN1".into(), ack(vec![], vec![0; limits::KCV_LEN_MAX + 1])),
            ("513-byte key block", "SN1".into(), download("B".repeat(limits::KEY_BLOCK_LEN_MAX + 1))),
            ("empty party", String::new(), Message::Bye),
            ("party with a wildcard", "SN+".into(), Message::Bye),
            ("65-byte party", "S".repeat(65), Message::Bye),
        ];
        for (name, party, message) in cases {
            let body = Body { party, counter: 1, message };
            let sealed = frame::seal(&key(1), &body).expect("seal does not check limits");
            assert!(matches!(frame::open(&sealed), Err(FrameError::InvalidBody(_))), "{name} was accepted");
        }
    }
}

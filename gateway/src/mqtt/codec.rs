//! MQTT 3.1.1 and 5.0 packets, read and written by rumqttc's `mqttbytes` codecs (the rumqtt
//! project's own packet code, both directions, both versions): this module only picks the codec
//! from the CONNECT's protocol level and translates between its packets and the few the endpoint
//! needs. No packet is parsed by hand.
//!
//! rumqttc's codecs rather than rumqttd's `protocol` module: rumqttd's `Publish` keeps `qos`,
//! `pkid` and `dup` private to its crate, so a QoS 1 downlink with a packet id and a DUP flag
//! cannot be built, nor the QoS of an uplink read, without going through its internal
//! serialisation. rumqttc's packets have public fields, and rumqttc is already the gateway's
//! client of an external broker.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;

/// Largest packet accepted (remaining length, bytes): a frame is at most 4 KiB.
pub const PACKET_LEN_MAX: usize = 8 * 1024;

/// The protocol version a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// Why bytes could not be read as a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// More bytes are needed.
    Incomplete,
    /// The packet is longer than [`PACKET_LEN_MAX`].
    TooLarge,
    /// Not MQTT, or not a packet the version allows.
    Malformed,
    /// A CONNECT with a protocol level other than 4 or 5.
    UnsupportedVersion,
}

/// A CONNECT, as the endpoint needs it.
#[derive(Debug)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub username: Option<String>,
    /// Never logged: see `rules::log_prefix` for what may be.
    pub password: Option<String>,
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5.0 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    pub will: Option<Will>,
}

#[derive(Debug)]
pub struct Will {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
}

/// A packet from a connected client.
#[derive(Debug)]
pub enum Inbound {
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
    },
    PubAck {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// QoS 2 flow packets and anything else a client has no reason to send.
    Unexpected,
}

/// What a SUBSCRIBE filter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    QoS(u8),
    NotAuthorized,
}

fn qos_of(qos: QoS) -> u8 {
    qos as u8
}

fn qos_from(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: rumqttc::v5::mqttbytes::QoS) -> u8 {
    qos as u8
}

fn v5_qos_from(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS as Q;
    match qos {
        0 => Q::AtMostOnce,
        1 => Q::AtLeastOnce,
        _ => Q::ExactlyOnce,
    }
}

/// The protocol level of a CONNECT at the head of `buf`: the byte after the protocol name
/// `00 04 "MQTT"`, which follows the fixed header (1 byte and a 1–4 byte length). `Ok(None)`
/// while too few bytes arrived.
fn connect_level(buf: &[u8]) -> Result<Option<u8>, ReadError> {
    const NAME: &[u8] = b"\x00\x04MQTT";
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != 0x10 {
        return Err(ReadError::Malformed);
    }
    for start in 2..=5 {
        if buf.len() < start + NAME.len() + 1 {
            return Ok(None);
        }
        // The length's last byte is the first below 0x80.
        if buf[start - 1] & 0x80 == 0 {
            return if &buf[start..start + NAME.len()] == NAME {
                Ok(Some(buf[start + NAME.len()]))
            } else {
                Err(ReadError::Malformed)
            };
        }
    }
    Err(ReadError::Malformed)
}

fn read_error_v4(e: rumqttc::mqttbytes::Error) -> ReadError {
    use rumqttc::mqttbytes::Error as E;
    match e {
        E::InsufficientBytes(_) => ReadError::Incomplete,
        E::PayloadSizeLimitExceeded(_) => ReadError::TooLarge,
        E::InvalidProtocolLevel(_) => ReadError::UnsupportedVersion,
        _ => ReadError::Malformed,
    }
}

fn read_error_v5(e: rumqttc::v5::mqttbytes::Error) -> ReadError {
    use rumqttc::v5::mqttbytes::Error as E;
    match e {
        E::InsufficientBytes(_) => ReadError::Incomplete,
        E::PayloadSizeLimitExceeded { .. } => ReadError::TooLarge,
        E::InvalidProtocolLevel(_) => ReadError::UnsupportedVersion,
        _ => ReadError::Malformed,
    }
}

/// Reads the CONNECT at the head of `buf` (the first packet of a connection), with the codec of
/// its protocol level.
pub fn read_connect(buf: &mut BytesMut) -> Result<Connect, ReadError> {
    let level = connect_level(buf)?.ok_or(ReadError::Incomplete)?;
    match level {
        4 => match v4::Packet::read(buf, PACKET_LEN_MAX).map_err(read_error_v4)? {
            v4::Packet::Connect(c) => Ok(Connect {
                version: Version::V4,
                username: c.login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                client_id: c.client_id,
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                session_expiry: None,
                will: c.last_will.map(|w| Will { topic: w.topic, qos: qos_of(w.qos), retain: w.retain }),
            }),
            _ => Err(ReadError::Malformed),
        },
        5 => match v5::Packet::read(buf, Some(PACKET_LEN_MAX as u32)).map_err(read_error_v5)? {
            v5::Packet::Connect(c, will, login) => Ok(Connect {
                version: Version::V5,
                username: login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                client_id: c.client_id,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry: c.properties.and_then(|p| p.session_expiry_interval),
                will: will.map(|w| Will {
                    topic: String::from_utf8_lossy(&w.topic).into_owned(),
                    qos: v5_qos(w.qos),
                    retain: w.retain,
                }),
            }),
            _ => Err(ReadError::Malformed),
        },
        _ => Err(ReadError::UnsupportedVersion),
    }
}

/// Reads the next packet at the head of `buf`, at most `len_max` bytes long.
pub fn read(version: Version, buf: &mut BytesMut, len_max: usize) -> Result<Inbound, ReadError> {
    match version {
        Version::V4 => read_v4(buf, len_max),
        Version::V5 => read_v5(buf, len_max),
    }
}

fn read_v4(buf: &mut BytesMut, len_max: usize) -> Result<Inbound, ReadError> {
    Ok(match v4::Packet::read(buf, len_max).map_err(read_error_v4)? {
        v4::Packet::Publish(p) => {
            Inbound::Publish { topic: p.topic, payload: p.payload, qos: qos_of(p.qos), pkid: p.pkid, retain: p.retain }
        }
        v4::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, qos_of(f.qos))).collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        _ => Inbound::Unexpected,
    })
}

fn read_v5(buf: &mut BytesMut, len_max: usize) -> Result<Inbound, ReadError> {
    // A DISCONNECT with reason 0 and no properties may have a remaining length of 0, which the
    // codec refuses; it is two bytes, and nothing else starts with them.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Inbound::Disconnect);
    }
    Ok(match v5::Packet::read(buf, Some(len_max as u32)).map_err(read_error_v5)? {
        v5::Packet::Publish(p) => Inbound::Publish {
            topic: String::from_utf8(p.topic.to_vec()).map_err(|_| ReadError::Malformed)?,
            payload: p.payload,
            qos: v5_qos(p.qos),
            pkid: p.pkid,
            retain: p.retain,
        },
        v5::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, v5_qos(f.qos))).collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        _ => Inbound::Unexpected,
    })
}

/// Writes packets of one version into an output buffer. Encoding a packet the endpoint built
/// itself cannot fail but for a size beyond the protocol's, which a frame never reaches; such a
/// packet is left out and the caller's `written` check sees it.
pub struct Writer<'a> {
    pub version: Version,
    pub out: &'a mut BytesMut,
}

impl Writer<'_> {
    /// A CONNACK accepting the connection. MQTT 5.0 also says what the endpoint does not offer:
    /// QoS 2, retained messages, wildcard and shared subscriptions; and its packet size limit.
    /// `packet_len_max`: the largest packet the client may send (5.0 says so in the CONNACK).
    pub fn connack_accepted(
        &mut self,
        session_present: bool,
        session_expiry: Option<u32>,
        packet_len_max: usize,
    ) -> bool {
        match self.version {
            Version::V4 => v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present).write(self.out).is_ok(),
            Version::V5 => {
                let properties = v5::ConnAckProperties {
                    session_expiry_interval: session_expiry,
                    max_qos: Some(1),
                    retain_available: Some(0),
                    max_packet_size: Some(packet_len_max as u32),
                    wildcard_subscription_available: Some(0),
                    shared_subscription_available: Some(0),
                    subscription_identifiers_available: Some(0),
                    receive_max: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                };
                v5::ConnAck { session_present, code: v5::ConnectReturnCode::Success, properties: Some(properties) }
                    .write(self.out)
                    .is_ok()
            }
        }
    }

    /// A CONNACK refusing the connection with `code` (a 3.1.1 return code or a 5.0 reason code).
    pub fn connack_refused(&mut self, v4_code: u8, v5_code: u8) -> bool {
        match self.version {
            Version::V4 => {
                let code = match v4_code {
                    1 => v4::ConnectReturnCode::RefusedProtocolVersion,
                    2 => v4::ConnectReturnCode::BadClientId,
                    3 => v4::ConnectReturnCode::ServiceUnavailable,
                    4 => v4::ConnectReturnCode::BadUserNamePassword,
                    _ => v4::ConnectReturnCode::NotAuthorized,
                };
                v4::ConnAck::new(code, false).write(self.out).is_ok()
            }
            Version::V5 => {
                use v5::ConnectReturnCode as C;
                let code = match v5_code {
                    0x84 => C::UnsupportedProtocolVersion,
                    0x85 => C::ClientIdentifierNotValid,
                    0x86 => C::BadUserNamePassword,
                    0x88 => C::ServerUnavailable,
                    0x97 => C::QuotaExceeded,
                    _ => C::NotAuthorized,
                };
                v5::ConnAck { session_present: false, code, properties: None }.write(self.out).is_ok()
            }
        }
    }

    pub fn suback(&mut self, pkid: u16, grants: &[Grant]) -> bool {
        match self.version {
            Version::V4 => {
                let codes = grants
                    .iter()
                    .map(|g| match g {
                        Grant::QoS(q) => v4::SubscribeReasonCode::Success(qos_from(*q)),
                        Grant::NotAuthorized => v4::SubscribeReasonCode::Failure,
                    })
                    .collect();
                v4::SubAck::new(pkid, codes).write(self.out).is_ok()
            }
            Version::V5 => {
                let codes = grants
                    .iter()
                    .map(|g| match g {
                        Grant::QoS(q) => v5::SubscribeReasonCode::Success(v5_qos_from(*q)),
                        Grant::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    })
                    .collect();
                v5::SubAck { pkid, return_codes: codes, properties: None }.write(self.out).is_ok()
            }
        }
    }

    pub fn unsuback(&mut self, pkid: u16, filters: usize) -> bool {
        match self.version {
            Version::V4 => v4::UnsubAck::new(pkid).write(self.out).is_ok(),
            Version::V5 => v5::UnsubAck { pkid, reasons: vec![v5::UnsubAckReason::Success; filters], properties: None }
                .write(self.out)
                .is_ok(),
        }
    }

    /// A PUBACK: success, or (5.0 only) "not authorized".
    pub fn puback(&mut self, pkid: u16, authorized: bool) -> bool {
        match self.version {
            Version::V4 => v4::PubAck::new(pkid).write(self.out).is_ok(),
            Version::V5 => {
                let reason = if authorized { v5::PubAckReason::Success } else { v5::PubAckReason::NotAuthorized };
                v5::PubAck { pkid, reason, properties: None }.write(self.out).is_ok()
            }
        }
    }

    pub fn pingresp(&mut self) -> bool {
        match self.version {
            Version::V4 => v4::PingResp.write(self.out).is_ok(),
            Version::V5 => v5::PingResp::write(self.out).is_ok(),
        }
    }

    /// A downlink at QoS 1 with packet id `pkid`; `dup` when it is sent again.
    pub fn publish(&mut self, topic: &str, payload: &Bytes, pkid: u16, dup: bool) -> bool {
        match self.version {
            Version::V4 => {
                let mut p = v4::Publish::from_bytes(topic, QoS::AtLeastOnce, payload.clone());
                p.pkid = pkid;
                p.dup = dup;
                p.write(self.out).is_ok()
            }
            Version::V5 => {
                let mut p = v5::Publish::new(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, payload.clone(), None);
                p.pkid = pkid;
                p.dup = dup;
                p.write(self.out).is_ok()
            }
        }
    }

    /// MQTT 5.0: a DISCONNECT saying why the server closes (3.1.1 has none: the socket closes).
    pub fn disconnect(&mut self, reason: Close) -> bool {
        use v5::DisconnectReasonCode as R;
        let code = match reason {
            Close::TakenOver => R::SessionTakenOver,
            Close::KeepAlive => R::KeepAliveTimeout,
            Close::TooLarge => R::PacketTooLarge,
            Close::QoS2 => R::QoSNotSupported,
            Close::Retain => R::RetainNotSupported,
            Close::NotAuthorized => R::NotAuthorized,
            Close::Malformed => R::MalformedPacket,
            Close::Protocol => R::ProtocolError,
            Close::ShuttingDown => R::ServerShuttingDown,
            Close::Revoked => R::NotAuthorized,
        };
        match self.version {
            Version::V4 => true,
            // With a Reason String (the metric's label): rumqttc 0.25 writes a reason code
            // without properties as a remaining length of 1 followed by two bytes (the code and a
            // property length of 0), a malformed packet its own reader refuses and that leaves a
            // stray byte; and empty properties lose the reason code (`E0 00`).
            Version::V5 => v5::Disconnect {
                reason_code: code,
                properties: Some(v5::DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some(reason.reason().to_string()),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            }
            .write(self.out)
            .is_ok(),
        }
    }
}

/// Why the server closes a connection it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    TakenOver,
    KeepAlive,
    TooLarge,
    QoS2,
    Retain,
    NotAuthorized,
    Malformed,
    Protocol,
    ShuttingDown,
    /// The identity's credential was revoked while it was connected.
    Revoked,
}

impl Close {
    /// The label of `rki_mqtt_connections_closed_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            Close::TakenOver => "taken_over",
            Close::KeepAlive => "keep_alive",
            Close::TooLarge => "packet_too_large",
            Close::QoS2 => "qos2",
            Close::Retain => "retain",
            Close::NotAuthorized => "foreign_publish",
            Close::Malformed => "malformed",
            Close::Protocol => "protocol_error",
            Close::ShuttingDown => "shutting_down",
            Close::Revoked => "revoked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v4(client_id: &str, login: Option<(&str, &str)>) -> BytesMut {
        let mut c = v4::Connect::new(client_id);
        if let Some((u, p)) = login {
            c.set_login(u, p);
        }
        let mut out = BytesMut::new();
        c.write(&mut out).expect("encode");
        out
    }

    #[test]
    fn a_connect_is_read_with_the_codec_of_its_level() {
        let mut buf = connect_v4("SN1", Some(("SN1", "pw")));
        let c = read_connect(&mut buf).expect("v4");
        assert_eq!((c.version, c.client_id.as_str(), c.username.as_deref()), (Version::V4, "SN1", Some("SN1")));
        assert!(buf.is_empty(), "the packet is consumed");

        let mut v5c = v5::Connect { keep_alive: 30, client_id: "SN2".into(), clean_start: false, properties: None };
        v5c.properties =
            Some(v5::ConnectProperties { session_expiry_interval: Some(60), ..v5::ConnectProperties::new() });
        let mut buf = BytesMut::new();
        v5::Packet::Connect(v5c, None, Some(v5::Login::new("SN2", "pw"))).write(&mut buf, None).expect("encode");
        let c = read_connect(&mut buf).expect("v5");
        assert_eq!((c.version, c.session_expiry, c.clean, c.keep_alive), (Version::V5, Some(60), false, 30));
    }

    #[test]
    fn partial_oversized_and_foreign_first_packets() {
        let full = connect_v4("SN1", Some(("SN1", "pw")));
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(read_connect(&mut part).err(), Some(ReadError::Incomplete), "cut at {cut}");
        }
        // A PINGREQ first, a CONNECT for MQTT 3.1 ("MQIsdp"), and level 3 under the name "MQTT".
        assert_eq!(read_connect(&mut BytesMut::from(&[0xC0, 0x00][..])).err(), Some(ReadError::Malformed));
        let mqisdp = b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c";
        assert_eq!(read_connect(&mut BytesMut::from(&mqisdp[..])).err(), Some(ReadError::Malformed));
        let level3 = b"\x10\x0a\x00\x04MQTT\x03\x02\x00\x3c";
        assert_eq!(read_connect(&mut BytesMut::from(&level3[..])).err(), Some(ReadError::UnsupportedVersion));
        let mut big = connect_v4(&"x".repeat(PACKET_LEN_MAX + 10), None);
        assert_eq!(read_connect(&mut big).err(), Some(ReadError::TooLarge));
        // The size is refused from the fixed header alone, before the body arrives.
        let mut head = BytesMut::from(&big[..20]);
        assert_eq!(read_connect(&mut head).err(), Some(ReadError::TooLarge));
    }

    /// Every packet the writer makes, in both versions, reads back whole with the same codecs a
    /// client uses: nothing left over, nothing missing.
    #[test]
    fn every_packet_written_reads_back_whole_in_both_versions() {
        fn check(version: Version, write: impl Fn(&mut Writer<'_>) -> bool, what: &str) {
            let mut out = BytesMut::new();
            assert!(write(&mut Writer { version, out: &mut out }), "{version:?} {what}: not written");
            let written = out.clone();
            let read = match version {
                Version::V4 => {
                    v4::Packet::read(&mut out, 64 * 1024).map(|p| format!("{p:?}")).map_err(|e| format!("{e:?}"))
                }
                Version::V5 => {
                    v5::Packet::read(&mut out, Some(64 * 1024)).map(|p| format!("{p:?}")).map_err(|e| format!("{e:?}"))
                }
            };
            assert!(read.is_ok(), "{version:?} {what} {written:02X?}: {read:?}");
            assert!(out.is_empty(), "{version:?} {what} {written:02X?}: {} bytes left over", out.len());
        }
        let payload = Bytes::from_static(b"frame");
        for version in [Version::V4, Version::V5] {
            check(version, |w| w.connack_accepted(true, Some(60), PACKET_LEN_MAX), "CONNACK accepted");
            check(version, |w| w.connack_accepted(false, None, PACKET_LEN_MAX), "CONNACK accepted, no expiry");
            for (v4_code, v5_code) in [(1, 0x84), (2, 0x85), (3, 0x88), (4, 0x86), (5, 0x87)] {
                check(version, |w| w.connack_refused(v4_code, v5_code), &format!("CONNACK {v4_code}/{v5_code:#x}"));
            }
            check(version, |w| w.suback(7, &[Grant::NotAuthorized, Grant::QoS(1), Grant::QoS(0)]), "SUBACK");
            check(version, |w| w.unsuback(8, 2), "UNSUBACK");
            check(version, |w| w.puback(9, true), "PUBACK");
            check(version, |w| w.puback(9, false), "PUBACK not authorized");
            check(version, |w| w.pingresp(), "PINGRESP");
            check(version, |w| w.publish("SN1/rki/v1/down", &payload, 10, true), "PUBLISH");
        }
        for close in [
            Close::TakenOver,
            Close::KeepAlive,
            Close::TooLarge,
            Close::QoS2,
            Close::Retain,
            Close::NotAuthorized,
            Close::Malformed,
            Close::Protocol,
            Close::ShuttingDown,
        ] {
            check(Version::V5, |w| w.disconnect(close), &format!("DISCONNECT {close:?}"));
        }
    }

    #[test]
    fn a_v5_disconnect_without_a_reason_is_read() {
        let mut buf = BytesMut::from(&[0xE0, 0x00][..]);
        assert!(matches!(read(Version::V5, &mut buf, PACKET_LEN_MAX), Ok(Inbound::Disconnect)));
        assert!(buf.is_empty());
    }
}

//! The MQTT endpoint over TLS (`[mqtt] tls_addr`, `tls_cert`, `tls_key`), with a CA and a server
//! certificate made here by rcgen: a terminal is served over TLS by rustls and by mosquitto_sub
//! (OpenSSL), a client that trusts another CA is refused at the handshake, and stalled handshakes
//! block no one while 100 other clients connect, until the CONNECT deadline closes them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rki_tests::mqtt::{device_online, mosquitto_client, run_bounded, tls_client_config, wait_for, Raw, Terminal};
use rki_tests::pki::{self, stranger_ca};
use rki_tests::{create_task, for_sns, free_port, provision, sns, temp_dir, wait_task, GatewayOptions, GatewayProcess};
use rki_tests::{RawDevice, TestResult};
use rumqttc::mqttbytes::{v4, QoS};

/// The CONNECT deadline of these tests (ms): long enough for 100 TLS clients on a busy machine.
const CONNECT_TIMEOUT_MS: u64 = 4000;

/// A CA, and a server certificate for `localhost` and 127.0.0.1 signed by it, written to `dir`.
/// Returns the CA's PEM and the paths of the server's certificate and key.
fn certificates(dir: &Path) -> TestResult<(String, PathBuf, PathBuf)> {
    let pki = pki::server("rki-tests CA", &["localhost", "127.0.0.1"])?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert, pki.cert_pem)?;
    std::fs::write(&key, pki.key_pem)?;
    Ok((pki.ca_pem, cert, key))
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn over_tls_a_terminal_is_served_and_stalled_handshakes_block_no_one_until_the_deadline() -> TestResult {
    let certs = temp_dir("tls-certs");
    let (ca_pem, cert, key) = certificates(&certs)?;
    let tls_port = free_port();
    let gw = GatewayProcess::start(GatewayOptions {
        config_toml: Some(format!(
            "[mqtt]\ntls_addr = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nconnect_timeout_ms = {CONNECT_TIMEOUT_MS}\n",
            cert.display(),
            key.display()
        )),
        ..Default::default()
    })?;
    let provisioned = provision(&gw, &sns("TLS", 1), "tls")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    // Initialised over the plain listener; everything after over TLS.
    let mut terminal = Terminal::initialise(gw.mqtt_port, &sn, &gudid)?;
    let config = tls_client_config(&ca_pem)?;

    // A terminal over TLS (rustls): connects, says hello, receives its download and acks it.
    let mut raw = Raw::open_tls(tls_port, config.clone(), "localhost")?;
    raw.connect_v4(&sn, Some(terminal.login()), false)?;
    assert_eq!(raw.connack_v4()?.code, v4::ConnectReturnCode::Success);
    raw.subscribe_v4_granted(1, &terminal.down())?;
    raw.publish_v4(&terminal.up(), QoS::AtLeastOnce, 2, &terminal.hello()?, false)?;
    wait_for(Duration::from_secs(5), "the device online over TLS", || device_online(&gw, &sn).unwrap_or(false))?;
    let task = create_task(&gw.api(), &for_sns(&[&sn]))?.task.id;
    let download =
        match raw.read_v4_until(Duration::from_secs(10), "the download", |p| matches!(p, v4::Packet::Publish(_)))? {
            v4::Packet::Publish(p) => {
                raw.puback_v4(p.pkid)?;
                terminal.download(&p.payload)?
            }
            _ => unreachable!("only a PUBLISH is wanted"),
        };
    let ack = terminal.seal(RawDevice::ack(&download))?;
    raw.publish_v4(&terminal.up(), QoS::AtLeastOnce, 3, &ack, false)?;
    wait_task(&gw.api(), task, Duration::from_secs(10), |c| c.succeeded == 1)?;
    raw.drop_connection();

    // mosquitto_sub (OpenSSL) trusting the CA: its own down topic granted, `#` denied. Trusting
    // another CA: the handshake fails, nothing is sent.
    let ca_file = certs.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let stranger_file = certs.join("stranger.pem");
    std::fs::write(&stranger_file, stranger_ca()?)?;
    let mosquitto_sub = |ca: &Path, topic: &str| -> TestResult<std::process::Output> {
        let mut cmd = Command::new(mosquitto_client("mosquitto_sub")?);
        cmd.args(["-h", "localhost", "-p", &tls_port.to_string(), "--cafile"]).arg(ca);
        cmd.args(["-i", &sn, "-u", &sn, "-P", &terminal.password, "-t", topic, "-q", "1", "-E", "-W", "5"]);
        run_bounded(cmd, Duration::from_secs(15))
    };
    let out = mosquitto_sub(&ca_file, &terminal.down())?;
    assert!(out.status.success(), "mosquitto_sub over TLS on its own topic: {}", text(&out));
    let out = mosquitto_sub(&ca_file, "#")?;
    assert!(text(&out).contains("denied"), "mosquitto_sub over TLS on `#`: {}", text(&out));
    let out = mosquitto_sub(&stranger_file, &terminal.down())?;
    assert!(!out.status.success(), "mosquitto_sub trusting another CA connected: {}", text(&out));
    assert!(text(&out).to_lowercase().contains("tls") || text(&out).contains("certificate"), "{}", text(&out));

    // Stalled handshakes: one connects and sends nothing, one sends a record header and stops.
    let timeouts_before = gw.metric("rki_mqtt_connections_closed_total{reason=\"connect_timeout\"}");
    let stalled_at = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", tls_port))?;
    let mut partial = TcpStream::connect(("127.0.0.1", tls_port))?;
    partial.write_all(&[0x16, 0x03, 0x01, 0x01, 0x00])?;
    // 100 clients complete their handshake and CONNECT meanwhile (20 threads of 5).
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (config, sn, password) = (config.clone(), sn.clone(), terminal.password.clone());
            std::thread::spawn(move || -> TestResult<usize> {
                let mut accepted = 0;
                for _ in 0..5 {
                    let mut raw = Raw::open_tls(tls_port, Arc::clone(&config), "localhost")?;
                    raw.connect_v4(&sn, Some((&sn, &password)), true)?;
                    if raw.connack_v4()?.code == v4::ConnectReturnCode::Success {
                        accepted += 1;
                    }
                }
                Ok(accepted)
            })
        })
        .collect();
    let mut accepted = 0;
    for thread in threads {
        accepted += thread.join().map_err(|_| "a TLS client thread panicked")??;
    }
    let served_in = stalled_at.elapsed();
    assert_eq!(accepted, 100, "TLS clients accepted");
    // They were all served before the deadline closed the stalled ones: nothing waited for them.
    assert!(served_in < Duration::from_millis(CONNECT_TIMEOUT_MS - 500), "100 TLS clients took {served_in:?}");
    for (name, socket) in [("silent", &mut silent), ("partial", &mut partial)] {
        socket.set_read_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS + 2000)))?;
        let mut chunk = [0u8; 256];
        // Whatever the server says before it closes (a TLS alert, say) is read past.
        let read = loop {
            match socket.read(&mut chunk) {
                Ok(n) if n > 0 && stalled_at.elapsed() < Duration::from_millis(CONNECT_TIMEOUT_MS + 2000) => {}
                other => break other,
            }
        };
        let closed_after = stalled_at.elapsed();
        assert!(
            matches!(&read, Ok(0)) || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{name}: not closed: {read:?}"
        );
        assert!(
            closed_after >= Duration::from_millis(CONNECT_TIMEOUT_MS - 100)
                && closed_after < Duration::from_millis(CONNECT_TIMEOUT_MS + 2000),
            "{name} stalled handshake closed after {closed_after:?}, the deadline is {CONNECT_TIMEOUT_MS} ms"
        );
    }
    wait_for(Duration::from_secs(5), "the stalled handshakes counted as time-outs", || {
        gw.metric("rki_mqtt_connections_closed_total{reason=\"connect_timeout\"}") >= timeouts_before + 2.0
    })?;
    let _ = std::fs::remove_dir_all(&certs);
    Ok(())
}

//! The gateway reaches PostgreSQL over TLS (`sslmode` and `sslrootcert` in the store URL): a
//! server whose certificate, made here by rcgen for 127.0.0.1 only, chains to the configured CA is
//! accepted with `verify-full`, and the session is encrypted (`pg_stat_ssl`); a CA that signed
//! nothing, or a host name the certificate does not carry, is refused with a clear error before
//! anything is stored; `verify-ca` does not look at the name.

mod common;

use std::path::Path;

use rki_tests::pg::PgServer;
use rki_tests::pki::{self, stranger_ca};
use rki_tests::{temp_dir, GatewayOptions, GatewayProcess, TestResult};

/// A CA and a server certificate for 127.0.0.1 (no DNS name) signed by it: (CA PEM, chain, key).
fn certificates() -> TestResult<(String, String, String)> {
    let pki = pki::server("rki-tests database CA", &["127.0.0.1"])?;
    Ok((pki.ca_pem, pki.cert_pem, pki.key_pem))
}

fn gateway(store: &str) -> TestResult<GatewayProcess> {
    let master = temp_dir("tls-master").join("master.key");
    GatewayProcess::start(GatewayOptions {
        config_toml: Some(format!("store = \"{store}\"\nmaster_key_file = \"{}\"\n", master.display())),
        ..Default::default()
    })
}

fn url(base: &str, host: &str, mode: &str, ca: &Path) -> String {
    format!("{}?sslmode={mode}&sslrootcert={}", base.replace("127.0.0.1", host), ca.display())
}

#[test]
fn the_store_over_tls_checks_the_servers_certificate() -> TestResult {
    let pg = PgServer::start()?;
    let (ca_pem, chain, key) = certificates()?;
    pg.enable_tls(&chain, &key)?;
    let dir = temp_dir("tls-ca");
    let (ca, stranger) = (dir.join("ca.pem"), dir.join("stranger.pem"));
    std::fs::write(&ca, ca_pem)?;
    std::fs::write(&stranger, stranger_ca()?)?;

    // The table stakes: the right CA and name are accepted, and the gateway's sessions are TLS.
    pg.create_database("good")?;
    let gw = gateway(&url(&pg.uri("good"), "127.0.0.1", "verify-full", &ca))?;
    assert!(gw.api().ok("/v1/devices")?.is_object());
    let mut sql = postgres::Client::connect(&pg.url("good"), postgres::NoTls)?;
    let row = sql.query_one(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'rki-gateway'",
        &[],
    )?;
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all > 0 && encrypted == all, "{encrypted} of the gateway's {all} sessions over TLS");
    drop(gw);

    // Each refusal is clear, and happens before anything is written.
    for (case, store, expected) in [
        ("a CA that signed nothing", url(&pg.uri("bad1"), "127.0.0.1", "verify-full", &stranger), "UnknownIssuer"),
        ("a name the certificate lacks", url(&pg.uri("bad2"), "localhost", "verify-full", &ca), "not valid for name"),
        ("verify-ca without a CA file", format!("{}?sslmode=verify-ca", pg.uri("bad3")), "sslrootcert"),
    ] {
        let db = store.split('/').nth(3).and_then(|s| s.split('?').next()).unwrap_or_default().to_string();
        pg.create_database(&db)?;
        let refused = gateway(&store).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains(expected), "{case}: {refused}");
        let tables: i64 = postgres::Client::connect(&pg.url(&db), postgres::NoTls)?
            .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[])?
            .get(0);
        assert_eq!(tables, 0, "{case}: the gateway wrote to a database it should not trust");
    }

    // verify-ca checks the chain, not the name.
    pg.create_database("nameless")?;
    let gw = gateway(&url(&pg.uri("nameless"), "localhost", "verify-ca", &ca))?;
    assert!(gw.api().ok("/v1/devices")?.is_object());
    Ok(())
}

//! A PostgreSQL outage under a running gateway: the API says 503 `store_unavailable` (not "500
//! internal error"), `/healthz` says so, and once the database returns the same gateway serves
//! again with nothing lost.

use std::time::{Duration, Instant};

use rki_tests::pg::PgServer;
use rki_tests::{GatewayOptions, GatewayProcess, TestResult};

fn import(gw: &GatewayProcess, prefix: &str, n: usize) -> (u16, serde_json::Value) {
    let csv = std::iter::once("sn,model".to_string())
        .chain((0..n).map(|i| format!("{prefix}{i:04},P3")))
        .collect::<Vec<_>>()
        .join("\n");
    gw.api().post_csv("/v1/devices/import", &csv)
}

#[test]
fn a_postgresql_outage_is_answered_with_503_and_survived_with_nothing_lost() -> TestResult {
    let pg = PgServer::start()?;
    pg.create_database("outage")?;
    let url = pg.uri("outage");
    let gw =
        GatewayProcess::start(GatewayOptions { env: vec![("RKI_STORE".into(), url)], ..GatewayOptions::default() })?;
    let (status, v) = import(&gw, "PGUP", 50);
    assert_eq!(status, 200, "{v}");

    pg.stop()?;
    let (status, v) = import(&gw, "PGDOWN", 50);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    let (status, v) = gw.api().get("/v1/devices");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    let (status, health) = gw.api().get("/healthz");
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "store_unavailable", "{health}");
    let (status, _) = gw.api().get("/livez");
    assert_eq!(status, 200, "the process itself is alive");

    pg.start_again()?;
    let started = Instant::now();
    loop {
        let (status, health) = gw.api().get("/healthz");
        if status == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not healthy 30 s after the database returned: {health}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = gw.api().ok("/v1/devices?limit=1")?;
    assert_eq!(v["total"], 50, "{v}");
    let (status, v) = import(&gw, "PGBACK", 50);
    assert_eq!(status, 200, "{v}");
    assert_eq!(gw.api().ok("/v1/devices?limit=1")?["total"], 100);
    Ok(())
}

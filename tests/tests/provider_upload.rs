//! Devices come from the provider: the key owner uploads each organization's SNs
//! (`POST /v1/orgs/{org}/devices/import`), all or nothing, and an organization cannot register an
//! SN itself. So no organization can claim another's terminals before they arrive, and nothing an
//! organization can ask about an SN tells it whether another organization holds it.

use std::process::Command;

use rki_gateway::api::types::TaskList;
use rki_tests::{binary, temp_dir, Api, GatewayOptions, GatewayProcess, TestResult};
use serde_json::{json, Value};

fn total(api: &Api) -> TestResult<i64> {
    let v = api.ok("/v1/devices?limit=1")?;
    v["total"].as_i64().ok_or_else(|| format!("no total in {v}").into())
}

/// `(line, sn, reason)` of each problem of a refused upload.
fn problems(v: &Value) -> Vec<(i64, String, String)> {
    v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (e["line"].as_i64().unwrap_or(-1), text("sn"), text("reason"))
        })
        .collect()
}

#[test]
fn the_key_owner_uploads_an_organizations_devices_checked_first_and_audited() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let acme = gw.api();
    let csv = "sn,model\nUP0001,P3\nUP0002,P2 LITE SE\n# a comment\n\nUP0003\n";

    // The dry run checks everything and stores nothing.
    let (status, v) = gw.key_owner().post_csv("/v1/orgs/acme/devices/import?dry_run=true", csv);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["org"], &v["valid"], &v["new"], &v["already_registered"], &v["imported"], &v["dry_run"]),
        (&json!("acme"), &json!(3), &json!(3), &json!(0), &json!(0), &json!(true)),
        "{v}"
    );
    assert_eq!(total(&acme)?, 0, "a dry run stored devices");

    let (status, v) = gw.upload_devices("acme", csv);
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["imported"], &v["already_registered"]), (&json!(3), &json!(0)), "{v}");
    assert_eq!(total(&acme)?, 3);
    let device = acme.ok("/v1/devices/UP0002")?;
    assert_eq!(device["device"]["model"], "P2 LITE SE", "{device}");

    // Uploading again adds only what is new; the organization's own SNs are counted, not doubled.
    let (status, v) = gw.upload_devices("acme", "UP0001\nUP0004\n");
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["imported"], &v["already_registered"]), (&json!(1), &json!(1)), "{v}");
    assert_eq!(total(&acme)?, 4);

    // The organization then manages what it was given: a group, by SN.
    acme.ok_post("/v1/groups", &json!({"name": "shop"}))?;
    let added = acme.ok_post("/v1/groups/shop/devices", &json!({"sns": ["UP0001", "UP0002"]}))?;
    assert_eq!(added["added"], 2, "{added}");

    // Audited, naming the organization and the count, in the key owner's log and acme's.
    for log in [gw.key_owner().ok("/v1/audit")?, acme.ok("/v1/audit")?] {
        let uploads: Vec<&Value> =
            log["audit"].as_array().into_iter().flatten().filter(|e| e["action"] == "devices.upload").collect();
        assert_eq!(uploads.len(), 2, "{log}");
        let first = uploads.iter().find(|e| e["object"] == "devices:3").ok_or(format!("no upload of 3: {log}"))?;
        assert_eq!((&first["details"]["org"], &first["details"]["imported"]), (&json!("acme"), &json!(3)), "{first}");
    }
    // A dry run is not a change: not audited.
    Ok(())
}

#[test]
fn one_bad_line_or_one_sn_held_elsewhere_refuses_the_whole_upload_line_by_line() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let acme = gw.api();
    let globex = Api::new(&gw.url(), &gw.init_org("globex")?);
    let (status, v) = gw.upload_devices("acme", "ACME0001\nACME0002\n");
    assert_eq!(status, 200, "{v}");

    // Bad lines: every one listed with its line, as problem+json; nothing stored, not even the
    // good lines.
    let bad = "sn,model\nNEW0001,P3\nbad sn,P3\nNEW0002,P99\nNEW0001,P3\na,b,c\n";
    for dry_run in [true, false] {
        let (status, v) = gw.key_owner().post_csv(&format!("/v1/orgs/acme/devices/import?dry_run={dry_run}"), bad);
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["code"], "invalid_csv", "{v}");
        let lines: Vec<i64> = problems(&v).iter().map(|p| p.0).collect();
        assert_eq!(lines, vec![3, 4, 5, 6], "{v}");
        assert!(v["detail"].as_str().unwrap_or_default().contains("nothing was uploaded"), "{v}");
    }
    assert_eq!(total(&acme)?, 2, "a refused upload stored devices");
    assert_eq!(acme.get("/v1/devices/NEW0001").0, 404);

    // An SN that another organization holds: named to the key owner with its line, and nothing of
    // the upload is stored, for the dry run and the upload alike.
    let claim = "sn\nGLX0001\nACME0002\nGLX0002\nACME0001\n";
    for dry_run in [true, false] {
        let (status, v) = gw.key_owner().post_csv(&format!("/v1/orgs/globex/devices/import?dry_run={dry_run}"), claim);
        assert_eq!(status, 422, "{v}");
        let expected = [(3, "ACME0002"), (5, "ACME0001")]
            .map(|(l, sn)| (l, sn.to_string(), "SN is held by another organization (acme)".to_string()));
        assert_eq!(problems(&v), expected, "{v}");
    }
    assert_eq!(total(&globex)?, 0, "globex got part of a refused upload");
    assert_eq!(total(&acme)?, 2, "acme lost devices");
    assert_eq!(acme.ok("/v1/devices/ACME0002")?["device"]["sn"], "ACME0002");

    // Other refusals, each clear and changing nothing.
    let owner = gw.key_owner();
    let (status, v) = owner.post_csv("/v1/orgs/nobody/devices/import", "X1\n");
    assert_eq!((status, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (status, v) = owner.post_csv("/v1/orgs/globex/devices/import", "# only a comment\n");
    assert_eq!(status, 422, "{v}");
    assert_eq!(problems(&v)[0].2, "no device in the file", "{v}");
    let (status, v) = owner.post_csv("/v1/orgs/globex/devices/import?group=shop", "GLX0001\n");
    assert_eq!(status, 400, "{v}");
    assert!(v["detail"].as_str().unwrap_or_default().contains("POST /v1/groups/{name}/devices"), "{v}");
    assert_eq!(total(&globex)?, 0);
    let audit = owner.ok("/v1/audit")?;
    let uploads = audit["audit"].as_array().into_iter().flatten().filter(|e| e["action"] == "devices.upload").count();
    assert_eq!(uploads, 1, "a refused upload was audited as done: {audit}");
    Ok(())
}

#[test]
fn an_organization_cannot_register_sns_itself() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let acme = gw.api();
    let evil = Api::new(&gw.url(), &gw.init_org("evil")?);
    for (api, path) in [
        (&acme, "/v1/devices/import"),
        (&acme, "/v1/devices/import?dry_run=true"),
        (&evil, "/v1/devices/import"),
        (&acme, "/v1/orgs/acme/devices/import"),
        (&evil, "/v1/orgs/evil/devices/import"),
        (&evil, "/v1/orgs/acme/devices/import"),
    ] {
        let (status, v) = api.post_csv(path, "sn\nCLAIM0001\n");
        assert_eq!(status, 403, "{path}: {v}");
        assert_eq!(v["status"], 403, "{path}: not problem+json: {v}");
    }
    let (_, v) = evil.post_csv("/v1/devices/import", "CLAIM0001\n");
    assert_eq!(v["code"], "uploaded_by_key_owner", "{v}");
    assert_eq!(v["detail"], "devices are uploaded by the key owner: POST /v1/orgs/{org}/devices/import", "{v}");
    assert_eq!(total(&acme)?, 0);
    assert_eq!(total(&evil)?, 0);
    // So evil could not pre-register the SN, and acme's devices arrive whole.
    let (status, v) = gw.upload_devices("acme", "sn\nCLAIM0001\n");
    assert_eq!((status, &v["imported"]), (200, &json!(1)), "{v}");
    Ok(())
}

/// What an organization's call answers, with the SN asked about replaced by `SN`: an answer that
/// differs between an SN held by another organization and one that does not exist discloses it.
fn answer(status: u16, v: &Value, sn: &str) -> String {
    format!("{status} {}", v.to_string().replace(sn, "SN"))
}

#[test]
fn another_organizations_sns_read_exactly_like_sns_that_do_not_exist() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let acme = gw.api();
    let globex = Api::new(&gw.url(), &gw.init_org("globex")?);
    let (status, v) = gw.upload_devices("acme", "ACME000001\nACME000002\n");
    assert_eq!(status, 200, "{v}");
    let (status, v) = gw.upload_devices("globex", "GLOBEX0001\n");
    assert_eq!(status, 200, "{v}");
    globex.ok_post("/v1/groups", &json!({"name": "g"}))?;
    acme.ok_post("/v1/groups", &json!({"name": "g"}))?;

    // Isolation: globex lists and finds only its own device.
    let listed = globex.ok("/v1/devices")?;
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["devices"][0]["sn"], "GLOBEX0001", "{listed}");
    assert_eq!(globex.ok("/v1/devices?sn=ACME")?["devices"], json!([]));
    assert_eq!(acme.ok("/v1/devices")?["total"], 2);

    // Every org-facing call that names an SN: (method, path, body); `{sn}` is the SN asked about.
    let calls: [(&str, &str, Value); 11] = [
        ("GET", "/v1/devices/{sn}", Value::Null),
        ("POST", "/v1/devices/{sn}/unlock", json!({})),
        ("POST", "/v1/groups/g/devices", json!({"sns": ["{sn}"]})),
        ("POST", "/v1/groups/g/devices", json!({"sns": ["GLOBEX0001", "{sn}"]})),
        ("POST", "/v1/assignments", json!({"sns": ["{sn}"]})),
        ("POST", "/v1/tasks/preview", json!({"sns": ["{sn}"]})),
        ("POST", "/v1/tasks", json!({"sns": ["GLOBEX0001", "{sn}"]})),
        ("POST", "/v1/gudids", json!({"sns": ["GLOBEX0001", "{sn}"]})),
        ("GET", "/v1/devices?sn={sn}", Value::Null),
        ("GET", "/v1/records?sn={sn}&limit=10", Value::Null),
        ("GET", "/v1/gudids?sn={sn}", Value::Null),
    ];
    let ask = |api: &Api, (method, path, body): &(&str, &str, Value), sn: &str| -> String {
        let path = path.replace("{sn}", sn);
        let (status, v) = match *method {
            "GET" => api.get(&path),
            _ => api.post(&path, &serde_json::from_str(&body.to_string().replace("{sn}", sn)).unwrap_or(Value::Null)),
        };
        answer(status, &v, sn)
    };
    for call in &calls {
        let foreign = ask(&globex, call, "ACME000001");
        let unknown = ask(&globex, call, "NOPE000001");
        assert_eq!(foreign, unknown, "{} {} tells another organization's SN from an unknown one", call.0, call.1);
        // The check can fail: the organization that holds the SN gets another answer.
        if call.1.starts_with("/v1/devices/{sn}") || call.1 == "/v1/groups/g/devices" {
            assert_ne!(ask(&acme, call, "ACME000001"), unknown, "{} {}: the holder's answer", call.0, call.1);
        }
    }
    // None of those calls changed anything: no member added, no GUDID made, no task created.
    assert_eq!(globex.ok("/v1/groups")?["groups"][0]["members"], 0);
    assert_eq!(globex.ok("/v1/gudids")?["gudids"], json!([]));
    let tasks: TaskList = globex.ok_as("/v1/tasks")?;
    assert!(tasks.tasks.is_empty(), "{tasks:?}");
    Ok(())
}

#[test]
fn rkictl_uploads_for_the_key_owner_and_lists_every_problem() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let dir = temp_dir("rkictl-upload");
    let good = dir.join("fleet.csv");
    std::fs::write(&good, "sn,model\nCLI0001,P3\nCLI0002,P3\n")?;
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "sn,model\nCLI0003,P3\nbad sn,P3\n")?;
    let rkictl = |token: &str, args: &[&str]| -> TestResult<(bool, String, String)> {
        let out =
            Command::new(binary("rkictl")).env("RKI_URL", gw.url()).env("RKI_TOKEN", token).args(args).output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    };
    let path = |p: &std::path::Path| p.display().to_string();
    let owner = gw.key_owner_token.clone();
    let checked = rkictl(&owner, &["devices", "import", "--org", "acme", &path(&good), "--dry-run"])?;
    assert_eq!(
        checked,
        (true, "2 valid, 2 new, 0 already registered to acme; nothing uploaded (dry run)".into(), String::new())
    );
    let done = rkictl(&owner, &["devices", "import", "--org", "acme", &path(&good)])?;
    assert_eq!(done, (true, "2 valid, 2 uploaded to acme, 0 already registered".into(), String::new()));
    let (ok, _, err) = rkictl(&owner, &["devices", "import", "--org", "acme", &path(&bad)])?;
    assert!(!ok && err.contains("422 invalid_csv") && err.contains("line 3: invalid SN"), "{err}");
    let (ok, _, err) = rkictl(&gw.org_token, &["devices", "import", "--org", "acme", &path(&bad)])?;
    assert!(!ok && err.contains("403 forbidden"), "{err}");
    let (ok, _, err) = rkictl(&owner, &["devices", "import", &path(&good)])?;
    assert!(!ok && err.contains("--org"), "{err}");
    assert_eq!(total(&gw.api())?, 2);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! The fleet manager's portal (`/portal/`), end to end: the real gateway binary serves it, and a
//! headless Chromium drives it through a whole push to simulated terminals.
//!
//! The browser part is `tests/browser/portal.test.mjs` (playwright-core, driving Debian's
//! `chromium`); this file starts the gateway, does the key owner's part that the portal does not
//! (authorizing key sources), runs the script with `node` (which uploads acme's devices as the
//! key owner, then acts as acme's fleet manager), then checks through the API that what the page
//! did really happened. Without Chromium or Node.js it fails and says what to install
//! (`.ci/run` installs both).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rki_gateway::api::types::TaskList;
use rki_tests::{authorize_test_bdk, binary, temp_dir, wait, GatewayOptions, GatewayProcess, TestResult, TEST_BDK};

/// The whole browser run, with the terminals' deliberate ack delays, takes well under a minute.
const BROWSER_RUN_MAX: Duration = Duration::from_secs(300);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Chromium: `$RKI_CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> TestResult<PathBuf> {
    let path = std::env::var_os("RKI_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    if path.exists() {
        return Ok(path);
    }
    Err(format!(
        "Chromium is not installed ({} does not exist): the portal's browser test needs it. Install Debian's \
         package with `apt-get install -y chromium` (.ci/run does), or point RKI_CHROMIUM at a Chromium binary.",
        path.display()
    )
    .into())
}

/// Node.js, and playwright-core installed from `tests/browser/package-lock.json` (`npm ci` if
/// `node_modules` is missing).
fn node_with_playwright() -> TestResult<()> {
    let version = Command::new("node").arg("--version").output().map_err(|e| {
        format!("Node.js is not installed (`node`: {e}): the portal's browser test needs it (apt-get install -y nodejs npm)")
    })?;
    if !version.status.success() {
        return Err("`node --version` failed".into());
    }
    let dir = browser_dir();
    if dir.join("node_modules/playwright-core/package.json").exists() {
        return Ok(());
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("npm is not installed ({e}): run `npm ci` in {}", dir.display()))?;
    if !status.success() {
        return Err(format!("`npm ci` failed in {}: playwright-core could not be installed", dir.display()).into());
    }
    Ok(())
}

/// Where the screenshots go: `$RKI_PORTAL_SCREENSHOTS` (e.g. `docs/portal` to refresh the
/// documentation's), else `target/portal-screenshots`.
fn screenshot_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    match std::env::var_os("RKI_PORTAL_SCREENSHOTS") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target/portal-screenshots"),
    }
}

#[test]
fn the_portal_is_served_by_the_gateway_itself_without_a_token() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    // `/portal` sends the browser to the page.
    let redirect = match agent.get(&format!("{}/portal", gw.url())).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.header("location"), Some("/portal/"));
    for (path, content_type) in [
        ("/portal/", "text/html; charset=utf-8"),
        ("/portal/portal.js", "text/javascript; charset=utf-8"),
        ("/portal/portal.css", "text/css; charset=utf-8"),
        ("/portal/favicon.svg", "image/svg+xml"),
    ] {
        let response = agent.get(&format!("{}{path}", gw.url())).call()?;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.header("content-type"), Some(content_type), "{path}");
        let csp = response.header("content-security-policy").unwrap_or_default().to_string();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
        assert!(!response.into_string()?.is_empty());
    }
    // The page is public; everything it shows comes from `/v1`, which still needs the token.
    let (status, _) = rki_tests::Api::new(&gw.url(), "").get("/v1/devices");
    assert_eq!(status, 401);
    let missing = agent.get(&format!("{}/portal/secrets.json", gw.url())).call();
    assert!(matches!(missing, Err(ureq::Error::Status(404, _))), "an unknown portal path is not found");
    Ok(())
}

#[test]
fn a_fleet_manager_pushes_keys_through_the_portal_in_headless_chromium() -> TestResult {
    let chromium = chromium()?;
    node_with_playwright()?;
    let device_sim = binary("rki-device-sim");
    if !device_sim.exists() {
        return Err(
            format!("{} is not built: run `cargo build --workspace --release` first", device_sim.display()).into()
        );
    }
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    // The key owner's part: a BDK for each organization (the portal only ever shows KCVs).
    let acme_source = authorize_test_bdk(&gw, "acme", "bdk-test")?;
    let kcv = acme_source["key_source"]["kcv"].as_str().ok_or("no KCV")?.to_string();
    let globex_token = gw.init_org("globex")?;
    authorize_test_bdk(&gw, "globex", "bdk-globex")?;
    // An SN held by a third organization: the page's upload of it to acme must be refused.
    let initech_token = gw.init_org("initech")?;
    let (status, v) = gw.upload_devices("initech", "HELD001\n");
    assert_eq!(status, 200, "{v}");

    let work = temp_dir("portal");
    let screenshots = screenshot_dir();
    let mut child = Command::new("node")
        .arg("portal.test.mjs")
        .current_dir(browser_dir())
        .env("PORTAL_URL", gw.url())
        .env("ORG_TOKEN", &gw.org_token)
        .env("OTHER_ORG_TOKEN", &globex_token)
        .env("OTHER_KEY_SOURCE", "bdk-globex")
        .env("KEY_OWNER_TOKEN", &gw.key_owner_token)
        .env("KEY_SOURCE", "bdk-test")
        .env("KEY_SOURCE_KCV", &kcv)
        .env("SECRET_TEXT", TEST_BDK)
        .env("CHROMIUM", &chromium)
        .env("DEVICE_SIM", &device_sim)
        .env("MQTT", format!("127.0.0.1:{}", gw.mqtt_port))
        .env("WORK_DIR", &work)
        .env("SCREENSHOT_DIR", &screenshots)
        .stdin(Stdio::null())
        .spawn()?;
    let status = wait::child_exit("the browser test to finish", BROWSER_RUN_MAX, &mut child)?;
    if !status.success() {
        return Err(format!(
            "the browser test failed ({status}); its steps are above, the failure screenshot in {}; gateway log:\n{}",
            work.display(),
            gw.log_tail()
        )
        .into());
    }
    eprintln!("portal screenshots in {}", screenshots.display());

    // What the page did, read back through the API.
    let api = gw.api();
    let tasks: TaskList = api.ok_as("/v1/tasks?status=done")?;
    let outcomes: Vec<&str> = tasks.tasks.iter().map(|t| t.outcome.as_str()).collect();
    assert_eq!(outcomes, ["manually terminated", "finished with failures"], "{tasks:?}");
    let records = api.ok("/v1/records")?;
    let mut results: Vec<(String, String)> = records["records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["sn"].as_str().unwrap_or("").to_string(), r["result"].as_str().unwrap_or("").to_string()))
        .collect();
    results.sort();
    let expected =
        [("SHOP001", "succeeded"), ("SHOP002", "succeeded"), ("SHOP003", "failed"), ("SPARE001", "terminated")];
    assert_eq!(results, expected.map(|(s, r)| (s.to_string(), r.to_string())));
    assert_eq!(api.ok("/v1/devices")?["total"], 6, "the key owner's upload through the page");
    let initech = rki_tests::Api::new(&gw.url(), &initech_token);
    assert_eq!(initech.ok("/v1/devices")?["total"], 1, "the refused upload touched initech's SN");
    let other = rki_tests::Api::new(&gw.url(), &globex_token);
    assert_eq!(other.ok("/v1/devices")?["total"], 0);
    for shot in [
        "signin",
        "provider-upload-errors",
        "provider",
        "keys",
        "devices",
        "assign",
        "task-preview",
        "tasks",
        "records",
        "gudids",
    ] {
        assert!(screenshots.join(format!("{shot}.png")).exists(), "no screenshot {shot}.png");
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

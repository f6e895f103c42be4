//! A live Prometheus for the end-to-end tests (`prometheus.rs`, `dashboards.rs`): Debian's
//! `prometheus` and `promtool`, which `.ci/run` installs. A test that cannot find them fails: CI
//! always has them, and a monitoring test that passes without running proves nothing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rki_tests::{free_port, temp_dir, wait, TestResult};
use serde_json::Value;

/// How long a value may take to reach Prometheus: the sampler's 5 s, a 1 s scrape, and slack for
/// a loaded CI machine.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// The path of an executable on `PATH`, if any.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|path| path.is_file())
}

/// `prometheus` and `promtool`, or an error saying how to install them.
pub fn prometheus_tools() -> TestResult<(PathBuf, PathBuf)> {
    match (on_path("prometheus"), on_path("promtool")) {
        (Some(server), Some(tool)) => Ok((server, tool)),
        _ => {
            Err("prometheus and promtool not found on PATH: install Debian's `prometheus` package (.ci/run does)"
                .into())
        }
    }
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs a command that must succeed; its output on failure.
pub fn run_ok(command: &mut Command) -> TestResult<String> {
    let out = command.output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("{command:?} failed:\n{text}").into());
    }
    Ok(text)
}

/// A `prometheus` child process with its own storage directory, killed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
    agent: ureq::Agent,
}

impl Prometheus {
    /// The shipped `deploy/prometheus/prometheus.yml`, with the scrape and evaluation intervals
    /// at 1 s, the target at `target`, and the rule files given instead of the shipped one.
    pub fn shipped_config(target: &str, rule_files: &[PathBuf]) -> TestResult<String> {
        let shipped = std::fs::read_to_string(deploy_dir().join("prometheus/prometheus.yml"))?;
        let rules: String = rule_files.iter().map(|p| format!("\n  - {}", p.display())).collect();
        let mut config = shipped;
        for (from, to) in [
            ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
            ("scrape_timeout: 10s", "scrape_timeout: 1s".to_string()),
            ("evaluation_interval: 15s", "evaluation_interval: 1s".to_string()),
            ("\n  - alerts.yml", rules),
            ("\"127.0.0.1:8080\"", format!("\"{target}\"")),
        ] {
            if config.matches(from).count() != 1 {
                return Err(format!("deploy/prometheus/prometheus.yml no longer has exactly one {from:?}").into());
            }
            config = config.replace(from, &to);
        }
        Ok(config)
    }

    pub fn start(server: &Path, target: &str, rule_files: &[PathBuf]) -> TestResult<Prometheus> {
        let dir = temp_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, Self::shipped_config(target, rule_files)?)?;
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(server)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut prometheus = Prometheus {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build(),
        };
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    /// Until Prometheus answers `/-/ready`; its exit ends the wait at once.
    pub fn wait_ready(&mut self) -> TestResult {
        let (child, agent) = (&mut self.child, &self.agent);
        let url = format!("{}/-/ready", self.url);
        let exited = wait::poll("prometheus to be ready", Duration::from_secs(30), || {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(Some(status.to_string())),
                Ok(None) => {}
                Err(e) => return Ok(Some(e.to_string())),
            }
            agent.get(&url).call().map(|_| None).map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{e}; log: {}", self.log()))?;
        match exited {
            Some(status) => Err(format!("prometheus exited with {status}: {}", self.log()).into()),
            None => Ok(()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/{path}`: the `data` of a successful answer, or the error Prometheus gave.
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> TestResult<Value> {
        let mut request = self.agent.get(&format!("{}/api/v1/{path}", self.url));
        for (k, v) in query {
            request = request.query(k, v);
        }
        let body: Value = match request.call() {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(_, r)) => r.into_json()?,
            Err(e) => return Err(e.into()),
        };
        if body["status"] != "success" {
            return Err(format!("{path} {query:?}: {body}").into());
        }
        Ok(body["data"].clone())
    }

    /// An instant query: its result vector.
    pub fn query(&self, promql: &str) -> TestResult<Vec<Value>> {
        let data = self.api("query", &[("query", promql)])?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query that yields one sample, `None` if it yields none.
    pub fn value(&self, promql: &str) -> TestResult<Option<f64>> {
        let result = self.query(promql)?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => {
                let text = one["value"][1].as_str().ok_or("no value")?;
                Ok(Some(text.parse()?))
            }
            more => Err(format!("{promql}: {} series, expected one: {more:?}", more.len()).into()),
        }
    }

    /// Polls until the query yields `expected`, or fails naming what it saw last.
    pub fn expect(&self, promql: &str, expected: f64) -> TestResult {
        self.poll(&format!("{promql} to be {expected} in Prometheus"), || {
            let seen = self.value(promql)?;
            Ok(if seen == Some(expected) { Ok(()) } else { Err(format!("{seen:?}")) })
        })
    }

    /// The state (`pending`, `firing`) of an alert, if it is active.
    pub fn alert_state(&self, name: &str) -> TestResult<Option<String>> {
        let data = self.api("alerts", &[])?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_string)))
    }

    pub fn expect_alert(&self, name: &str, states: &[&str]) -> TestResult {
        self.poll(&format!("alert {name} to be one of {states:?}"), || {
            let state = self.alert_state(name)?;
            Ok(if state.as_deref().is_some_and(|s| states.contains(&s)) { Ok(()) } else { Err(format!("{state:?}")) })
        })
    }

    /// Polls `look` for up to [`CONVERGE`] while it answers `Ok(Err(what it saw))`; an error of
    /// Prometheus itself (`Err`: a refused query, no answer) ends the wait at once.
    fn poll(&self, what: &str, mut look: impl FnMut() -> TestResult<Result<(), String>>) -> TestResult {
        wait::poll(what, CONVERGE, || match look() {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err(seen)) => Err(seen),
            Err(e) => Ok(Err(e)),
        })?
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("RKI_TEST_KEEP").is_some() {
            eprintln!("prometheus files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

//! `docs/QUICKSTART.md` is a checked transcript, and `deploy/rki-gateway.toml` names every option.
//!
//! The quickstart test starts the built `rki-gateway` on free ports in an empty directory, as the
//! newcomer's terminal 1 does, then runs every `$` line of the document's `console` blocks with
//! bash, in order, in that directory, with the built binaries first on `PATH`:
//! - each command must succeed, and its standard output must equal the one in the document, once
//!   the values that change on every run (tokens, GUDIDs, times, KSNs, KCVs) are replaced by their
//!   shape and runs of spaces are collapsed;
//! - `127.0.0.1:8080` and `127.0.0.1:1883` in a command become the test gateway's addresses;
//! - a command ending in `&` runs in the background until the test ends;
//! - a command with the comment `# run again until it prints this` is repeated until its output
//!   is the one in the document (as compared above).
//!
//! Environment variables persist from one command to the next, as in one shell.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rki_tests::{binary, free_port, temp_dir, wait, TestResult};

/// Longest a single command of the transcript may run (`tasks watch` waits for the push).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a `run again until` command is repeated.
const AGAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest pause between two runs of a `run again until` command (each is a process).
const AGAIN_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Hex values the document shows that do not change between runs (the test BDK's KCV and its
/// components'): compared literally.
const FIXED_HEX: &[&str] = &["08D7B4", "8CA64D"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One `$` line of the transcript and the output shown under it.
#[derive(Debug)]
struct Step {
    /// Line number in the document, for failure messages.
    line: usize,
    command: String,
    expected: Vec<String>,
    background: bool,
    /// Repeated until its output is `expected` (the comment `# run again until it prints this`).
    again: bool,
}

fn steps(doc: &str) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    let mut in_console = false;
    for (i, line) in doc.lines().enumerate() {
        if line.starts_with("```") {
            in_console = line.trim() == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            let (code, comment) = match command.split_once(" # ") {
                Some((code, comment)) => (code.trim_end(), Some(comment)),
                None => (command, None),
            };
            let again = comment.is_some_and(|c| c.contains("run again until it prints this"));
            out.push(Step {
                line: i + 1,
                command: code.strip_suffix(" &").unwrap_or(code).to_string(),
                expected: Vec::new(),
                background: code.ends_with(" &"),
                again,
            });
        } else if let Some(step) = out.last_mut() {
            step.expected.push(line.to_string());
        }
    }
    out
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn shape(s: &str, pattern: &str) -> bool {
    s.len() == pattern.len()
        && s.bytes().zip(pattern.bytes()).all(|(c, p)| match p {
            b'd' => c.is_ascii_digit(),
            b'h' => c.is_ascii_hexdigit(),
            other => c == other,
        })
}

/// A word with its run-specific value replaced by a placeholder.
fn normalize_word(word: &str) -> String {
    for prefix in ["rki_org_", "rki_keyowner_"] {
        if let Some(rest) = word.strip_prefix(prefix) {
            if rest.len() == 64 && is_hex(rest) {
                return format!("{prefix}<token>");
            }
        }
    }
    if shape(word, "hhhhhhhh-hhhhhhhh-hhhhhhhh-hhhhhhhh") {
        return "<gudid>".into();
    }
    if shape(word, "dddd-dd-dd") {
        return "<date>".into();
    }
    if shape(word, "dd:dd:dd") {
        return "<time>".into();
    }
    if shape(word, "dddd-dd") {
        return "<month>".into();
    }
    if word.len() == 20 && is_hex(word) {
        return "<ksn>".into();
    }
    if word.len() == 6 && is_hex(word) && !FIXED_HEX.contains(&word) {
        return "<kcv>".into();
    }
    word.to_string()
}

/// A line with its words normalized (also the parts of `SN,GUDID`) and its spacing collapsed.
fn normalize(line: &str) -> String {
    line.split_whitespace()
        .map(|w| w.split(',').map(normalize_word).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command's output as compared with the document: lines normalized, trailing blank lines
/// dropped (they are invisible in the document).
fn compared(out: &str) -> Vec<String> {
    compared_lines(out.lines())
}

fn compared_lines<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut lines: Vec<String> = lines.into_iter().map(|l| normalize(l.as_ref())).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

#[test]
fn the_normalization_hides_only_what_changes_between_runs() {
    assert_eq!(
        normalize("SIM000001  bdk1  IPEK   2026-11-25 12:43:50  4C28E675080000000000  9480D2  08D7B4"),
        "SIM000001 bdk1 IPEK <date> <time> <ksn> <kcv> 08D7B4"
    );
    assert_eq!(normalize("SIM000002,8D1DE940-C5E7A9CD-ACEF7D5D-23C65F06"), "SIM000002,<gudid>");
    assert_eq!(normalize("2026-11  bdk1  100"), "<month> bdk1 100");
    assert_eq!(normalize(&format!("token: rki_org_{}", "a".repeat(64))), "token: rki_org_<token>");
}

/// The newcomer's two terminals: the gateway in `work/`, and a shell whose environment is kept in
/// `env.sh` between commands.
struct Session {
    dir: PathBuf,
    work: PathBuf,
    http_port: u16,
    mqtt_port: u16,
    gateway: Option<Child>,
    background: Vec<Child>,
    /// What ran and what it printed, for failure messages.
    transcript: String,
}

impl Session {
    fn start() -> TestResult<Session> {
        let gateway_exe = binary("rki-gateway");
        if !gateway_exe.exists() {
            return Err(format!(
                "{} is not built: run `cargo build --workspace --release` first",
                gateway_exe.display()
            )
            .into());
        }
        let dir = temp_dir("quickstart");
        let work = dir.join("work");
        std::fs::create_dir_all(&work)?;
        let (http_port, mqtt_port) = (free_port(), free_port());
        let bin = gateway_exe.parent().ok_or("no binary directory")?.to_path_buf();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        std::fs::write(
            dir.join("env.sh"),
            format!("export PATH='{path}'\nexport RKI_URL='http://127.0.0.1:{http_port}'\nexport LC_ALL=C\n"),
        )?;
        Ok(Session {
            dir,
            work,
            http_port,
            mqtt_port,
            gateway: None,
            background: Vec::new(),
            transcript: String::new(),
        })
    }

    /// The transcript's `rki-gateway … &` step: the gateway in the directory, on the test's
    /// ports, until the test ends; returns once it is healthy.
    fn start_gateway(&mut self, command: &str) -> TestResult {
        let log = std::fs::File::create(self.dir.join("gateway.log"))?;
        let gateway = Command::new(binary("rki-gateway"))
            .current_dir(&self.work)
            .env("RKI_HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            .env("RKI_MQTT_ADDR", format!("127.0.0.1:{}", self.mqtt_port))
            .env_remove("RKI_CONFIG")
            .env_remove("RKI_DATA_DIR")
            .env("RKI_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.gateway = Some(gateway);
        self.transcript.push_str(&format!("$ {command} &\n"));
        self.wait_healthy()
    }

    /// Until the gateway answers `/healthz`; its exit ends the wait at once.
    fn wait_healthy(&mut self) -> TestResult {
        let url = format!("http://127.0.0.1:{}/healthz", self.http_port);
        let gateway = &mut self.gateway;
        let exited = wait::poll("the gateway to answer /healthz", Duration::from_secs(30), || {
            if ureq::get(&url).call().is_ok() {
                return Ok(None);
            }
            match gateway.as_mut().and_then(|g| g.try_wait().ok().flatten()) {
                Some(status) => Ok(Some(status)),
                None => Err("no answer yet"),
            }
        })
        .map_err(|e| format!("{e}: {}", self.log()))?;
        match exited {
            Some(status) => Err(format!("the gateway exited with {status}: {}", self.log()).into()),
            None => Ok(()),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// The command as it runs here: the document's addresses become the test gateway's.
    fn localize(&self, command: &str) -> String {
        command
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", self.http_port))
            .replace("127.0.0.1:1883", &format!("127.0.0.1:{}", self.mqtt_port))
    }

    /// Runs one command in the session's shell environment; returns its standard output.
    fn run(&mut self, command: &str) -> TestResult<String> {
        let env = self.dir.join("env.sh");
        let script = format!(
            "source '{env}'\n{command}\nstatus=$?\nexport -p > '{env}'\nexit $status\n",
            env = env.display(),
            command = self.localize(command)
        );
        let (out_path, err_path) = (self.dir.join("stdout"), self.dir.join("stderr"));
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&self.work)
            .env_clear()
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()?;
        let status = wait::child_exit(&format!("`{command}` to finish"), COMMAND_TIMEOUT, &mut child)?;
        let stdout = std::fs::read_to_string(&out_path)?;
        let stderr = std::fs::read_to_string(&err_path)?;
        self.transcript.push_str(&format!("$ {command}\n{stdout}"));
        if !status.success() {
            return Err(format!("`{command}` failed ({status}):\n{stdout}{stderr}").into());
        }
        Ok(stdout)
    }

    /// Starts a command in the background, in the session's environment, until the test ends.
    fn spawn(&mut self, command: &str) -> TestResult {
        let script = format!("source '{}'\nexec {}\n", self.dir.join("env.sh").display(), self.localize(command));
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(&self.work)
            .env_clear()
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.background.push(child);
        self.transcript.push_str(&format!("$ {command} &\n"));
        Ok(())
    }

    fn step(&mut self, step: &Step) -> TestResult<String> {
        if step.background && step.command.starts_with("rki-gateway ") {
            self.start_gateway(&step.command)?;
            return Ok(String::new());
        }
        if step.background {
            self.spawn(&step.command)?;
            return Ok(String::new());
        }
        if !step.again {
            return self.run(&step.command);
        }
        // Run again until it prints what the document shows; a run that fails ends the wait.
        let what = format!("`{}` to print what docs/QUICKSTART.md shows", step.command);
        wait::poll_paced(&what, AGAIN_TIMEOUT, AGAIN_PAUSE_MAX, || match self.run(&step.command) {
            Ok(out) if compared(&out) == compared_lines(&step.expected) => Ok(Ok(out)),
            Ok(out) => Err(out),
            Err(failed) => Ok(Err(failed)),
        })?
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for child in self.background.iter_mut().chain(self.gateway.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("RKI_TEST_KEEP").is_some() {
            eprintln!("quickstart files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn the_quickstart_transcript_runs_as_written_and_prints_what_it_shows() -> TestResult {
    let doc = std::fs::read_to_string(repo().join("docs/QUICKSTART.md"))?;
    let steps = steps(&doc);
    assert!(steps.len() >= 20, "read only {} commands from docs/QUICKSTART.md", steps.len());
    assert!(steps.iter().any(|s| s.background), "the simulator runs in the background");
    let mut session = Session::start()?;
    let mut outputs = Vec::new();
    for step in &steps {
        let out = session
            .step(step)
            .map_err(|e| format!("docs/QUICKSTART.md:{}: {e}\n\n{}", step.line, session.transcript))?;
        let actual = compared(&out);
        let expected = compared_lines(&step.expected);
        assert_eq!(
            actual, expected,
            "docs/QUICKSTART.md:{}: `{}` printed something else.\nFull output:\n{out}",
            step.line, step.command
        );
        outputs.push((step.command.clone(), out));
    }
    // The record and the terminal's own Key Query agree on the KSN and the KCV.
    let output_of =
        |prefix: &str| outputs.iter().find(|(c, _)| c.starts_with(prefix)).map(|(_, o)| o.clone()).unwrap_or_default();
    let record = output_of("rkictl records --sn SIM000001");
    let record: Vec<&str> = record.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    let query = output_of("rki-device-sim key-query");
    let slot: Vec<&str> = query.lines().find(|l| l.starts_with("1 ")).unwrap_or_default().split_whitespace().collect();
    assert_eq!(record.len(), 9, "{record:?}");
    assert_eq!(slot.get(2..4), record.get(7..9), "KSN and KCV: the record {record:?}, the terminal {slot:?}");
    Ok(())
}

/// `pub NAME:` fields of `pub struct NAME { … }` in the source.
fn struct_fields(source: &str, name: &str) -> Vec<String> {
    let Some(start) = source.find(&format!("pub struct {name} {{")) else { return Vec::new() };
    source[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with('}'))
        .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':').map(|(f, _)| f.to_string()))
        .collect()
}

#[test]
fn the_sample_config_names_every_option_and_loads_as_shipped_and_fully_uncommented() -> TestResult {
    let source = std::fs::read_to_string(repo().join("gateway/src/config.rs"))?;
    let sample = std::fs::read_to_string(repo().join("deploy/rki-gateway.toml"))?;
    let sections = [
        ("", struct_fields(&source, "Config")),
        ("[mqtt]", struct_fields(&source, "MqttConfig")),
        ("[broker]", struct_fields(&source, "ExternalBroker")),
        ("[broker.mosquitto_sync]", struct_fields(&source, "MosquittoSync")),
        ("[broker.dynsec]", struct_fields(&source, "Dynsec")),
    ];
    assert!(sections[0].1.len() >= 8, "read only {:?} from config.rs", sections[0].1);
    // Each option, in its section: `name = …`, commented out or not, with its comment above.
    let mut section = "";
    let mut found: Vec<(String, String)> = Vec::new();
    let mut uncommented = String::new();
    for line in sample.lines() {
        let bare = line.strip_prefix("# ").unwrap_or(line);
        if bare.starts_with('[') {
            section = sections.iter().map(|(s, _)| *s).find(|s| !s.is_empty() && bare.starts_with(s)).unwrap_or(bare);
            // A table is the option of its parent: `[broker.mosquitto_sync]` shows `mosquitto_sync`.
            let path = section.trim_matches(|c| c == '[' || c == ']');
            let (parent, name) =
                path.rsplit_once('.').map(|(p, n)| (format!("[{p}]"), n)).unwrap_or((String::new(), path));
            found.push((parent, name.to_string()));
            uncommented.push_str(bare);
            uncommented.push('\n');
            continue;
        }
        let Some((key, value)) = bare.split_once(" = ") else { continue };
        let known = sections.iter().any(|(s, fields)| *s == section && fields.iter().any(|f| f == key));
        assert!(known, "deploy/rki-gateway.toml names {key:?} in {section:?}, which config.rs does not have");
        // The fully uncommented variant takes each option's first example; the broker is the
        // table, not the string.
        let first = !found.iter().any(|(s, k)| s == section && k == key);
        if first && !(section.is_empty() && key == "broker") {
            uncommented.push_str(&format!("{key} = {value}\n"));
        }
        found.push((section.to_string(), key.to_string()));
    }
    for (section, fields) in &sections {
        for field in fields {
            assert!(
                found.iter().any(|(s, k)| s == section && k == field),
                "deploy/rki-gateway.toml does not show the option {field:?} (section {section:?})"
            );
        }
    }
    // Both forms load: the gateway reads the file (unknown options are refused) and validates it.
    let dir = temp_dir("sample-config");
    let variant = dir.join("uncommented.toml");
    std::fs::write(&variant, &uncommented)?;
    for (label, file) in [("as shipped", repo().join("deploy/rki-gateway.toml")), ("fully uncommented", variant)] {
        let out = Command::new(binary("rki-gateway"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join(format!("data-{}", label.len())))
            .arg("init-key-owner")
            .env_remove("RKI_CONFIG")
            .output()?;
        assert!(
            out.status.success(),
            "the sample config {label} does not load: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&file).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

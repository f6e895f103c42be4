//! A throwaway PostgreSQL server for tests (the store suite of `rki-gateway` includes this file by
//! path; the end-to-end tests and the load tester use it as `rki_tests::pg`): Debian's `postgresql` package, a data directory in a
//! temporary directory, a free loopback port, its unix socket beside the data, stopped on drop
//! (and, for a server shared by a whole test binary, by a watchdog when the process exits).
//!
//! PostgreSQL refuses to run as root; when the tests run as root (CI containers) every server
//! command runs as the `postgres` system user that the package creates (`runuser -u postgres`).
//! Some sandboxes make `/dev/null` root-only, which initdb and pg_ctl cannot live with; there the
//! server commands run in a private mount namespace with a usable `/dev/null` bound over it
//! (`unshare --mount`), which changes nothing outside those processes.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The role tests connect as (trust authentication on loopback only).
const USER: &str = "rki";
/// Attempts at starting, each on a fresh free port (another process may take the port between
/// our probe and the server's bind).
const START_TRIES_MAX: usize = 3;
/// Seconds `pg_ctl` waits for the server to accept connections.
const START_WAIT_SECONDS: &str = "60";
/// The system user that runs the server when the tests run as root.
const SYSTEM_USER: &str = "postgres";

pub struct PgServer {
    /// Temporary root: `data/` (the cluster), `server.log`, and the unix socket.
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `Some("postgres")` when we are root and must drop privileges for every server command.
    run_as: Option<&'static str>,
    /// A world-usable null device to bind over a root-only `/dev/null`, when one is needed.
    private_null: Option<PathBuf>,
    /// Stops the server if this process dies without dropping us (statics are never dropped).
    watchdog: Option<Child>,
}

fn missing() -> String {
    "PostgreSQL not found: no initdb under /usr/lib/postgresql/*/bin nor on PATH. \
     Install Debian's `postgresql` package (apt-get install -y postgresql); .ci/run installs it."
        .to_string()
}

/// The directory of `initdb`, `pg_ctl` and `postgres`: the newest Debian version, else PATH.
fn find_bindir() -> Result<PathBuf, String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
        .ok_or_else(missing)
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn id_of(flag: &str, user: &str) -> Result<u32, String> {
    let out = Command::new("id").args([flag, user]).output().map_err(|e| format!("id {flag} {user}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tests run as root, so PostgreSQL must run as the `{user}` system user, which does not exist. \
             Install Debian's `postgresql` package (apt-get install -y postgresql); it creates the user."
        ));
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("id {flag} {user}: {e}"))
}

/// Whether users other than root may read and write `/dev/null`.
fn dev_null_is_shared() -> bool {
    std::fs::metadata("/dev/null").map(|m| m.mode() & 0o006 == 0o006).unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("probe a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("probe a free port: {e}"))
}

/// Whether a test that needs a PostgreSQL server should run here. With the server's binaries
/// installed: yes. Without them, the fast tier (`cargo test`, which needs nothing but Cargo) skips
/// it with a note on stderr, while the full tier (`scripts/test`, which sets `RKI_TEST_FULL=1`
/// after installing PostgreSQL) fails it, naming the package to install: there a missing server
/// is a broken machine, not a reason to skip.
pub fn installed_or_skip(test: &str) -> bool {
    match find_bindir() {
        Ok(_) => true,
        Err(missing) if std::env::var_os(FULL_TIER_ENV).is_some() => panic!("{test}: {missing}"),
        Err(_) => {
            eprintln!("{test}: skipped, PostgreSQL is not installed (scripts/test installs it and runs this)");
            false
        }
    }
}

/// Set by `scripts/test`: every service the full tier installs must be there.
pub const FULL_TIER_ENV: &str = "RKI_TEST_FULL";

impl PgServer {
    /// Creates a cluster in a new temporary directory and starts it on a free loopback port.
    pub fn start() -> Result<Self, String> {
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let bin = find_bindir()?;
        let run_as = running_as_root().then_some(SYSTEM_USER);
        let dir = std::env::temp_dir().join(format!(
            "rki-pg-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if let Some(user) = run_as {
            let (uid, gid) = (id_of("-u", user)?, id_of("-g", user)?);
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let mut private_null = None;
        if run_as.is_some() && !dev_null_is_shared() {
            let null = dir.join("null");
            let made = Command::new("mknod").args(["-m", "666"]).arg(&null).args(["c", "1", "3"]).status();
            if !made.is_ok_and(|s| s.success()) {
                return Err(format!("/dev/null is root-only here and `mknod {}` failed", null.display()));
            }
            private_null = Some(null);
        }
        let mut server = PgServer { dir, bin, port: 0, run_as, private_null, watchdog: None };
        server.initdb()?;
        let mut last_error = String::new();
        for _ in 0..START_TRIES_MAX {
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.watchdog = server.spawn_watchdog().ok();
                    return Ok(server);
                }
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// `runuser -u postgres -- <program>` when root (inside a private mount namespace when
    /// `/dev/null` must be replaced), else `<program>`. The caller appends the arguments.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match (self.run_as, &self.private_null) {
            (Some(user), Some(null)) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(format!("mount --bind \"$0\" /dev/null && exec runuser -u {user} -- \"$@\""))
                    .arg(null)
                    .arg(program);
                c
            }
            (Some(user), None) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            (None, _) => Command::new(program),
        }
    }

    fn run(&self, what: &str, mut command: Command) -> Result<(), String> {
        let out = command.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        Err(format!(
            "{what} failed ({}):\n{}{}\n--- server log ---\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn initdb(&self) -> Result<(), String> {
        let mut c = self.command("initdb");
        c.arg("-D").arg(self.data()).args(["-U", USER, "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]);
        self.run("initdb", c)
    }

    /// Starts the server and waits until it accepts connections. Loopback only; the unix socket
    /// goes in our directory, not /var/run/postgresql.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data()).arg("-l").arg(self.log()).args(["-w", "-t", START_WAIT_SECONDS]).arg("-o").arg(
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200", self.port, self.dir.display()),
        );
        c.arg("start");
        self.run("pg_ctl start", c)
    }

    /// A shell that waits for this process to end, then stops the server and removes its
    /// directory: the cleanup for servers held in statics, which Rust never drops. SIGQUIT is
    /// the immediate shutdown (no checkpoint for a cluster about to be deleted); root may signal
    /// the server whoever runs it. The first loop lives as long as the test process (it is the
    /// point: the watchdog outlives it by a second at most); the second is bounded (30 s).
    fn spawn_watchdog(&self) -> std::io::Result<Child> {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             pg=$(head -n 1 '{data}/postmaster.pid' 2>/dev/null); \
             if [ -n \"$pg\" ]; then kill -QUIT \"$pg\"; n=0; \
             while kill -0 \"$pg\" 2>/dev/null && [ $n -lt 150 ]; do sleep 0.2; n=$((n+1)); done; fi; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            data = self.data().display(),
            dir = self.dir.display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    /// The postmaster's process id (the first line of `postmaster.pid`), for `/proc` readings;
    /// the server's other processes are its children.
    /// Turns TLS on (`ssl = on`) with this certificate chain and key (PEM), and restarts the
    /// server; plain connections stay allowed (`pg_hba` trusts loopback either way), so that a
    /// test can tell which one a client made (`pg_stat_ssl`).
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        let data = self.data();
        let write = |name: &str, text: &str| -> Result<(), String> {
            use std::os::unix::fs::PermissionsExt;
            let path = data.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(user) = self.run_as {
                let (uid, gid) = (id_of("-u", user)?, id_of("-g", user)?);
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
            Ok(())
        };
        write("server.crt", cert_pem)?;
        write("server.key", key_pem)?;
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        self.stop()?;
        self.start_again()
    }

    /// Stops the server (fast shutdown: sessions are ended, nothing committed is lost), as an
    /// outage does.
    pub fn stop(&self) -> Result<(), String> {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data()).args(["-m", "fast", "-w", "-t", START_WAIT_SECONDS, "stop"]);
        self.run("pg_ctl stop", c)
    }

    /// Starts the server again after [`PgServer::stop`], on the same port and data.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection string for database `db` over loopback TCP.
    pub fn url(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={USER} dbname={db}", self.port)
    }

    /// A `postgres://` URL for database `db`, the form the gateway's `store` setting takes.
    pub fn uri(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its connection string.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(|e| format!("connect to the test server: {e}"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .map_err(|e| format!("create database {name}: {e}"))?;
        Ok(self.url(name))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]);
        let _ = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

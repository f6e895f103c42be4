//! Guards around the SQLite store's files: one process at a time, locks that hold, private modes.
//!
//! SQLite coordinates the processes that share a database with POSIX (`fcntl`) locks. Those
//! locks belong to the process, and closing *any* descriptor of a file releases all of them: a
//! process that duplicates and closes a descriptor of the store, or opens and closes one of its
//! files, silently drops SQLite's locks. Another process that opens the store then takes itself
//! for the last connection and, on close, deletes the WAL the gateway still writes into: every
//! later commit is lost at the next crash. Three guards:
//!
//! - [`DataDirLock`]: an advisory `flock` on `rki-gateway.lock` in the data directory, held by the
//!   running gateway for its lifetime and by every maintenance command while it works, so a
//!   command cannot run beside the gateway (or a second gateway on the same directory). `flock`
//!   locks are separate from SQLite's `fcntl` locks and belong to the open file, not the process.
//! - [`check_sqlite_locks_held`]: reads `/proc/locks` (no descriptor of the store is opened) and
//!   requires this process's shared locks on the database file and on its `-shm` file, the ones
//!   SQLite holds in WAL mode for as long as a connection is open.
//! - [`make_private`]: the data directory is 0700 and every store file 0600.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE_NAME: &str = "rki-gateway.lock";

/// Who holds the data directory: the running gateway, or a maintenance command.
#[derive(Debug)]
pub struct DataDirLock {
    /// Held open for the lock's lifetime: the `flock` is released when it is closed.
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the data directory's lock without waiting. `what` says who takes it (written into
    /// the lock file with the process id, for the message another process shows).
    pub fn acquire(data_dir: &Path, what: &str) -> Result<Self, String> {
        let path = data_dir.join(LOCK_FILE_NAME);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path).map_err(|e| format!("lock file {}: {e}", path.display()))?;
        use rustix::fs::{flock, FlockOperation};
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                return Err(format!(
                    "the data directory {} is in use by {holder}. Stop it first; while the gateway runs, \
                     use its API (rkictl) for changes and `rki-gateway backup FILE` for a copy of the store",
                    data_dir.display()
                ));
            }
            Err(e) => return Err(format!("lock file {}: {e}", path.display())),
        }
        // The holder's description, for the message above; the lock is what counts.
        let _ = file.set_len(0).and_then(|_| writeln!(file, "{what} (pid {})", std::process::id()));
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Readings of `/proc/locks` that must all miss a lock before it counts as lost.
pub const LOCK_READINGS: u32 = 5;
/// The pause between two readings after a miss.
const LOCK_READING_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);
/// The buffer `/proc/locks` is read into: the kernel lists its table anew at each `read` call
/// (see [`read_lock_table`]), so one call must take what one listing gives.
const LOCK_TABLE_BUFFER: usize = 64 * 1024;

/// Requires that this process holds SQLite's shared locks on `db` and on its `-shm` file, read
/// from `/proc/locks` (which opens nothing of the store). A gateway without them would let any
/// other process that opens the store delete its WAL. A lock counts as lost only when
/// [`LOCK_READINGS`] readings in a row miss it, [`LOCK_READING_PAUSE`] apart: a reading can miss a
/// held lock (see [`read_lock_table`]), a lost lock is missed by every one. Blocks for up to
/// 80 ms when a lock is missing: call it off the async workers.
pub fn check_sqlite_locks_held(db: &Path) -> Result<(), String> {
    let mut reading = 1;
    loop {
        match check_sqlite_locks_once(db) {
            Err(e) if reading < LOCK_READINGS => {
                tracing::debug!(reading, error = %e, "a reading of /proc/locks missed the store's lock; reading again");
                std::thread::sleep(LOCK_READING_PAUSE);
                reading += 1;
            }
            result => return result,
        }
    }
}

/// [`check_sqlite_locks_held`] on a blocking thread, for the async callers (start-up, sampler).
pub async fn check_sqlite_locks_held_off_workers(db: PathBuf) -> Result<(), String> {
    tokio::task::spawn_blocking(move || check_sqlite_locks_held(&db))
        .await
        .unwrap_or_else(|e| Err(format!("the lock check: {e}")))
}

/// One reading of [`check_sqlite_locks_held`].
fn check_sqlite_locks_once(db: &Path) -> Result<(), String> {
    let table = read_lock_table()?;
    let pid = std::process::id();
    let shm = shm_path(db);
    for file in [db, shm.as_path()] {
        let id = FileId::of(file)?;
        if !holds_posix_lock(&table, pid, id) {
            return Err(format!(
                "this process no longer holds SQLite's lock on {}: another process opening the store \
                 could delete its write-ahead log. Refusing to run",
                file.display()
            ));
        }
    }
    Ok(())
}

/// The text of `/proc/locks`, read in as few calls as the kernel allows. Each `read` call lists
/// the table afresh from the line number where the previous call stopped, so a lock that
/// another process takes or releases between two calls shifts the lines, and one is skipped.
/// `std::fs::read_to_string` starts with a 32-byte read and grows its buffer: beside two
/// processes taking and releasing locks in a loop, one reading in eight missed a held lock. Read
/// into a 64 KiB buffer (std then asks for 8 KiB a call, more than the kernel's page), none did
/// (200,000 readings each). The kernel still lists at most a page
/// per call, so on a host with a larger table a reading can miss a lock: hence the readings
/// again in [`check_sqlite_locks_held`].
fn read_lock_table() -> Result<String, String> {
    use std::io::Read;
    let mut table = Vec::with_capacity(LOCK_TABLE_BUFFER);
    File::open("/proc/locks").and_then(|mut f| f.read_to_end(&mut table)).map_err(|e| format!("/proc/locks: {e}"))?;
    String::from_utf8(table).map_err(|_| "/proc/locks: not UTF-8".to_string())
}

fn shm_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-shm");
    PathBuf::from(name)
}

/// A file's device and inode, as `/proc/locks` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    major: u64,
    minor: u64,
    inode: u64,
}

impl FileId {
    fn of(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let dev = md.dev();
        // The kernel's encoding of a device number (glibc's `major`/`minor`).
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        Ok(Self { major, minor, inode: md.ino() })
    }
}

/// Whether `table` (the text of `/proc/locks`) lists a POSIX lock held by `pid` on `file`. A
/// line reads `1: POSIX  ADVISORY  READ 11508 fe:00:10011098 128 128`; lines for waiting
/// requests carry `->` and are skipped.
fn holds_posix_lock(table: &str, pid: u32, file: FileId) -> bool {
    table.lines().filter(|line| !line.contains("->")).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, kind, _, _, owner, id, ..] = fields.as_slice() else { return false };
        if *kind != "POSIX" || owner.parse::<u32>().ok() != Some(pid) {
            return false;
        }
        let mut parts = id.split(':');
        let (Some(major), Some(minor), Some(inode), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        u64::from_str_radix(major, 16).ok() == Some(file.major)
            && u64::from_str_radix(minor, 16).ok() == Some(file.minor)
            && inode.parse::<u64>().ok() == Some(file.inode)
    })
}

/// The data directory 0700, and the store's files that exist 0600: a store holds sealed keys
/// and the registry, which no other local user needs to read.
pub fn make_private(data_dir: &Path, db: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| -> Result<(), String> {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("chmod {:o} {}: {e}", mode, path.display())),
        }
    };
    set(data_dir, 0o700)?;
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    for file in [db.to_path_buf(), PathBuf::from(wal), shm_path(db), data_dir.join(LOCK_FILE_NAME)] {
        set(&file, 0o600)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "1: FLOCK  ADVISORY  WRITE 1998 fe:00:5308711 0 EOF\n\
                         2: POSIX  ADVISORY  READ 11508 fe:00:10011098 128 128\n\
                         2: -> POSIX  ADVISORY  WRITE 4242 fe:00:10011097 128 128\n\
                         3: POSIX  ADVISORY  READ 11508 fe:00:10011096 1073741826 1073742335\n";

    #[test]
    fn a_posix_lock_of_this_pid_on_the_file_is_found() {
        let db = FileId { major: 0xfe, minor: 0, inode: 10011096 };
        assert!(holds_posix_lock(TABLE, 11508, db));
    }

    #[test]
    fn another_pid_a_flock_a_waiter_or_another_inode_is_not_a_held_lock() {
        let shm = FileId { major: 0xfe, minor: 0, inode: 10011098 };
        assert!(!holds_posix_lock(TABLE, 4242, shm), "another process");
        assert!(!holds_posix_lock(TABLE, 1998, FileId { major: 0xfe, minor: 0, inode: 5308711 }), "flock");
        assert!(!holds_posix_lock(TABLE, 4242, FileId { major: 0xfe, minor: 0, inode: 10011097 }), "waiter");
        assert!(!holds_posix_lock(TABLE, 11508, FileId { major: 0xfe, minor: 1, inode: 10011098 }), "device");
        assert!(!holds_posix_lock("garbage\n\n1:\n", 11508, shm), "garbage");
    }

    /// A fresh directory `{prefix}-{pid}` with a WAL store in it, and a connection holding a read
    /// transaction open: SQLite's shared lock on the database file for certain.
    fn store_held_open(prefix: &str) -> (PathBuf, PathBuf, rusqlite::Connection) {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let db = dir.join("t.sqlite");
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE a(x); INSERT INTO a VALUES (1);").expect("wal");
        conn.execute_batch("BEGIN; SELECT x FROM a;").expect("read");
        (dir, db, conn)
    }

    #[test]
    fn a_store_open_in_this_process_holds_its_locks_and_a_closed_duplicate_drops_them() {
        let (dir, db, conn) = store_held_open("rki-guard");
        assert_eq!(check_sqlite_locks_held(&db), Ok(()));
        // The defect this guards against: a second descriptor of the file, closed.
        drop(File::open(&db).expect("open the database file"));
        let err = check_sqlite_locks_held(&db).expect_err("the close dropped the process's locks");
        assert!(err.contains("no longer holds"), "{err}");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Locks taken and released meanwhile shift the lines of `/proc/locks` between two `read`
    /// calls; read in small pieces (as `read_to_string` does), one reading in eight missed the
    /// held lock here, and the guard reported it lost.
    #[test]
    fn locks_taken_and_released_beside_the_check_never_make_a_held_lock_look_lost() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        const CHECKS: usize = 2_000;
        const CHURNERS: usize = 2;
        let (dir, db, conn) = store_held_open("rki-guard-churn");
        let done = Arc::new(AtomicBool::new(false));
        let churners: Vec<_> = (0..CHURNERS)
            .map(|t| {
                let files: Vec<File> =
                    (0..5).map(|i| File::create(dir.join(format!("churn-{t}-{i}"))).expect("churn file")).collect();
                let done = done.clone();
                std::thread::spawn(move || {
                    use rustix::fs::{flock, FlockOperation};
                    // Bounded: stops with the checks, or after 10 million rounds.
                    for _ in 0..10_000_000 {
                        if done.load(Ordering::Relaxed) {
                            break;
                        }
                        for f in &files {
                            flock(f, FlockOperation::LockExclusive).expect("flock");
                        }
                        for f in &files {
                            flock(f, FlockOperation::Unlock).expect("unlock");
                        }
                    }
                })
            })
            .collect();
        let lost = (0..CHECKS).filter(|_| check_sqlite_locks_held(&db).is_err()).count();
        done.store(true, Ordering::Relaxed);
        for c in churners {
            c.join().expect("churner");
        }
        assert_eq!(lost, 0, "{lost} of {CHECKS} checks took a held lock for lost");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_holder_of_the_data_directory_is_refused_with_the_first_ones_name() {
        let dir = std::env::temp_dir().join(format!("rki-guard-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let first = DataDirLock::acquire(&dir, "rki-gateway run").expect("first");
        let err = DataDirLock::acquire(&dir, "rki-gateway init-org").expect_err("second");
        assert!(err.contains("rki-gateway run") && err.contains("in use"), "{err}");
        drop(first);
        DataDirLock::acquire(&dir, "rki-gateway init-org").expect("free again");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

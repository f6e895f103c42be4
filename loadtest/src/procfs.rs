//! What `/proc` says about a process: resident memory, its peak, CPU seconds, per thread.
//!
//! Linux only. CPU times in `/proc/<pid>/stat` are in clock ticks; `USER_HZ` is 100 on every
//! Linux architecture this runs on (x86_64, aarch64), so the tick length is a constant here
//! rather than a `sysconf` call.

use std::collections::BTreeMap;
use std::fs;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcSample {
    /// `VmRSS`: resident now.
    pub rss_bytes: u64,
    /// `VmHWM`: the peak resident size since start (or since [`reset_peak`]).
    pub rss_peak_bytes: u64,
    /// User plus system CPU time since start.
    pub cpu_seconds: f64,
}

/// Reads `pid`'s memory and CPU; `None` if the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ProcSample { rss_bytes: kib("VmRSS:"), rss_peak_bytes: kib("VmHWM:"), cpu_seconds: cpu_of_stat(&stat)? })
}

/// User plus system seconds from the text of a `stat` file (a process's or a thread's).
fn cpu_of_stat(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is index 0 here; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// The command name of a `stat` file: the thread's name for a thread.
fn name_of_stat(stat: &str) -> Option<String> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some(stat[open + 1..close].to_string())
}

/// `pid` and its children (one level: PostgreSQL's backends and workers under the postmaster),
/// summed. CPU of children that already exited is not counted.
pub fn tree_sample(pid: u32) -> ProcSample {
    let mut total = sample(pid).unwrap_or_default();
    for child in children(pid) {
        if let Some(s) = sample(child) {
            total.rss_bytes += s.rss_bytes;
            total.rss_peak_bytes += s.rss_peak_bytes;
            total.cpu_seconds += s.cpu_seconds;
        }
    }
    total
}

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                .is_some_and(|parent| parent == pid)
        })
        .collect()
}

/// What the threads of one name spent: seconds on a CPU, and seconds runnable but waiting for
/// one (`/proc/<pid>/task/<tid>/schedstat`, 0 where the kernel does not keep it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThreadTimes {
    pub cpu: f64,
    pub waiting: f64,
}

/// The seconds a thread waited for a CPU, from its `schedstat` line (nanoseconds on a CPU,
/// nanoseconds waiting in a run queue, time slices).
fn waiting_of_schedstat(schedstat: &str) -> Option<f64> {
    schedstat.split_whitespace().nth(1)?.parse::<u64>().ok().map(|ns| ns as f64 / 1e9)
}

/// [`ThreadTimes`] of each thread of `pid`, summed by thread name (tokio's workers share one name).
pub fn threads(pid: u32) -> BTreeMap<String, ThreadTimes> {
    let mut out: BTreeMap<String, ThreadTimes> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for entry in entries.flatten() {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        if let (Some(name), Some(cpu)) = (name_of_stat(&stat), cpu_of_stat(&stat)) {
            let waiting = fs::read_to_string(entry.path().join("schedstat"))
                .ok()
                .and_then(|s| waiting_of_schedstat(&s))
                .unwrap_or(0.0);
            let t = out.entry(name).or_default();
            t.cpu += cpu;
            t.waiting += waiting;
        }
    }
    out
}

/// What each thread name spent between two [`threads`] readings, most CPU first.
pub fn thread_delta(
    before: &BTreeMap<String, ThreadTimes>,
    after: &BTreeMap<String, ThreadTimes>,
) -> Vec<(String, ThreadTimes)> {
    let mut out: Vec<(String, ThreadTimes)> = after
        .iter()
        .map(|(name, t)| {
            let b = before.get(name).copied().unwrap_or_default();
            (name.clone(), ThreadTimes { cpu: t.cpu - b.cpu, waiting: (t.waiting - b.waiting).max(0.0) })
        })
        .filter(|(_, t)| t.cpu > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.cpu.total_cmp(&a.1.cpu));
    out
}

/// Resets `pid`'s peak RSS (`VmHWM`) to its current RSS, so a later reading shows the peak of
/// one phase only. Needs the right to write `/proc/<pid>/clear_refs`; returns whether it worked.
pub fn reset_peak(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(-1.0));
    [it.next().unwrap_or(-1.0), it.next().unwrap_or(-1.0), it.next().unwrap_or(-1.0)]
}

/// A `perf record` of one process (software `cpu-clock` sampling: it works where the hardware
/// counters are "not supported", as on this virtual machine), stopped with SIGINT.
#[derive(Debug)]
pub struct Profiler(std::process::Child);

impl Profiler {
    /// Samples `pid` at `hz` with call chains into `output`; `None` if perf cannot start.
    pub fn start(pid: u32, output: &std::path::Path, hz: u32) -> Option<Profiler> {
        std::process::Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", &hz.to_string(), "-g", "-p", &pid.to_string(), "-o"])
            .arg(output)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
            .map(Profiler)
    }

    /// Stops the recording and waits until perf has written its file.
    pub fn stop(mut self) {
        let pid = self.0.id().to_string();
        let _ = std::process::Command::new("kill").args(["-INT", &pid]).status();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_in_the_name_gives_its_cpu_and_name() {
        let stat = "42 (tokio-runtime w) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 1 1";
        assert_eq!(cpu_of_stat(stat), Some(3.0));
        assert_eq!(name_of_stat(stat).as_deref(), Some("tokio-runtime w"));
    }

    #[test]
    fn a_schedstat_line_gives_the_wait_for_a_cpu() {
        assert_eq!(waiting_of_schedstat("976213 6605748 2\n"), Some(0.006605748));
        assert_eq!(waiting_of_schedstat("976213"), None);
    }

    #[test]
    fn a_busy_thread_of_this_process_shows_its_cpu_and_the_names_add_up() {
        let worker = std::thread::Builder::new()
            .name("procfs-spin".into())
            .spawn(|| {
                let started = std::time::Instant::now();
                let mut x = 0u64;
                while started.elapsed() < std::time::Duration::from_millis(300) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                std::hint::black_box(x);
                std::thread::sleep(std::time::Duration::from_millis(500));
            })
            .expect("thread");
        std::thread::sleep(std::time::Duration::from_millis(400));
        let times = threads(std::process::id());
        let spin = times.get("procfs-spin").copied().expect("the named thread is listed");
        assert!(spin.cpu >= 0.1, "it ran ~0.3 s: {spin:?}");
        assert!(spin.waiting >= 0.0);
        let delta = thread_delta(&BTreeMap::new(), &times);
        assert!(delta.windows(2).all(|w| w[0].1.cpu >= w[1].1.cpu), "most CPU first");
        worker.join().expect("join");
    }

    #[test]
    fn this_process_can_be_read() {
        let me = sample(std::process::id()).expect("own /proc");
        assert!(me.rss_bytes > 0 && me.rss_peak_bytes >= me.rss_bytes);
        assert!(!threads(std::process::id()).is_empty());
    }
}

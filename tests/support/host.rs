//! Probes of the host outside cgroups (a process's memory and
//! descriptors, the online CPUs, a daemon's pinned eBPF maps), the
//! `promtool` checker, and system users made for one test.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::daemon::BpfDir;

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// How many descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The online CPUs, from the kernel's list ("0-3,8").
pub fn online_cpus() -> Vec<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    text.trim()
        .split(',')
        .flat_map(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()
        })
        .collect()
}

/// Where each of a process's descriptors points.
pub fn fd_targets(pid: u32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .collect()
}

/// The cgroup ids in one of a daemon's pinned counter maps
/// (`NET_COUNTERS_MAP` or `CONN_COUNTERS_MAP`).
pub fn map_ids(bpf: &BpfDir, name: &str) -> std::collections::HashSet<u64> {
    use aya::maps::{Map, MapData, PerCpuHashMap};
    use cgmetric_common::{ConnCounters, NetCounters, NET_COUNTERS_MAP};
    let map = Map::PerCpuHashMap(MapData::from_pin(bpf.0.join(name)).unwrap());
    match name {
        NET_COUNTERS_MAP => PerCpuHashMap::<_, u64, NetCounters>::try_from(map)
            .unwrap()
            .keys()
            .filter_map(Result::ok)
            .collect(),
        _ => PerCpuHashMap::<_, u64, ConnCounters>::try_from(map)
            .unwrap()
            .keys()
            .filter_map(Result::ok)
            .collect(),
    }
}

/// `promtool check metrics` on an exposition: whether it passed, and what
/// it said.
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// A lock every test process takes in turn (flock on a file in the temp
/// directory), for tests of different test binaries that change one host
/// path: the mount tests link the built helper at /sbin/mount.cgmetric, and
/// the package test installs its own there. Released when dropped.
pub struct HostLock {
    _file: fs::File,
}

/// The [`host_lock`] of /sbin/mount.cgmetric.
pub const HELPER_LOCK: &str = "sbin-mount-cgmetric";

pub fn host_lock(name: &str) -> HostLock {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("cgmetric-test-{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    HostLock { _file: file }
}

/// A system user created for one test and deleted after it.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    pub fn new() -> TestUser {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "cgmt{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// Runs `program args` as this user; its output, or the error it printed.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--clear-groups", program])
            .args(args)
            .output()
            .unwrap();
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// CPU time (user + system) of a process so far.
pub fn cpu_time(pid: u32) -> Duration {
    stat_cpu_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// CPU time of a process's threads other than those named `thread`. A
/// thread that ended is not counted. From each thread's run time in
/// nanoseconds (`schedstat`): `stat`'s clock ticks lose up to a tick per
/// thread, more than a few reads cost.
pub fn cpu_time_outside(pid: u32, thread: &str) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() != thread)
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .sum()
}

fn stat_cpu_time(stat: &str) -> Duration {
    // Fields after the command (which may hold spaces), 1-based from state.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

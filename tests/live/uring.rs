//! FUSE over io_uring: where the kernel offers it (Linux 6.14+ with
//! `fuse.enable_uring=1`), each request is served by a thread bound to the
//! reader's CPU; where it does not, or the daemon is confined to some CPUs,
//! /dev/fuse serves as before. Every read is right either way.

use std::fs;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cgmetric::cgroup::Controller;

use crate::require;
use crate::support::{eventually, online_cpus, Cgroup, Daemon};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
const LIMIT: u64 = 64 << 20;
const READS: usize = 300;

/// Sets `fuse.enable_uring` for one test and restores it afterwards. The
/// tests that set it take turns; a daemon another test starts meanwhile
/// takes whichever transport is offered, and serves reads the same.
struct Param {
    before: String,
    _turn: MutexGuard<'static, ()>,
}

impl Param {
    /// `None` where this kernel has no FUSE over io_uring.
    fn set(on: bool) -> Option<Param> {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let before = fs::read_to_string(PARAM).ok()?;
        fs::write(PARAM, if on { "Y" } else { "N" }).unwrap();
        Some(Param {
            before,
            _turn: turn,
        })
    }
}

impl Drop for Param {
    fn drop(&mut self) {
        let _ = fs::write(PARAM, self.before.trim());
    }
}

/// A cgroup with a memory limit: a value known before it is read.
fn limited(test: &str) -> (Cgroup, Cgroup) {
    let parent = Cgroup::parent(test);
    let child = parent.child("box");
    if child.is_v1(Controller::Memory) {
        child.write(
            Controller::Memory,
            "memory.limit_in_bytes",
            &LIMIT.to_string(),
        );
    } else {
        child.write(Controller::Memory, "memory.max", &LIMIT.to_string());
    }
    (parent, child)
}

/// The daemon's threads whose name starts with `prefix`.
fn named(pid: u32, prefix: &str) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|task| {
            fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .map(|task| task.file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

/// The daemon's io_uring serving threads: (queue, thread id).
fn ring_threads(pid: u32) -> Vec<(usize, u32)> {
    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(rest) = comm.trim().strip_prefix("fuser-ring-") {
            let queue = rest.split('-').next().unwrap().parse().unwrap();
            let tid = task.file_name().to_str().unwrap().parse().unwrap();
            threads.push((queue, tid));
        }
    }
    threads
}

fn status_field(pid: u32, tid: u32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in status"))
        .trim()
        .to_string()
}

/// Runs `f` with the calling thread bound to `cpu`, then lets it run
/// anywhere again.
fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    // SAFETY: zeroed cpu_set_t values are valid; the calls read and write
    // only them, for this thread (pid 0).
    unsafe {
        let mut before: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut before);
        let mut only: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut only);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &only),
            0
        );
        let result = f();
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &before);
        result
    }
}

/// Reads the limit through the mount `READS` times (open, read, close).
fn read_limit(daemon: &Daemon) {
    for _ in 0..READS {
        assert_eq!(daemon.number("box/memory_limit"), LIMIT);
    }
}

/// What every transport must serve: single files, a directory, a large
/// aggregate read whole and in small pieces, and the errors.
fn serves_the_tree(daemon: &Daemon) {
    read_limit(daemon);
    let names: Vec<String> = fs::read_dir(daemon.path("box"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().any(|n| n == "memory_limit"), "{names:?}");
    let prom = daemon.read("metrics.prom");
    assert!(
        prom.lines()
            .any(|l| l.starts_with("cgmetric_memory_limit_bytes{")
                && l.ends_with(&format!(" {LIMIT}"))),
        "{prom}"
    );
    // Small reads of one open file: one snapshot, served in pieces.
    let mut file = fs::File::open(daemon.path("metric")).unwrap();
    let mut pieces = Vec::new();
    let mut buf = [0u8; 7];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        pieces.extend_from_slice(&buf[..n]);
    }
    let pieces = String::from_utf8(pieces).unwrap();
    assert!(
        pieces.contains(&format!("box_memory_limit {LIMIT}\n")),
        "{pieces}"
    );
    let missing = fs::read(daemon.path("box/no_such_file")).unwrap_err();
    assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    let write = fs::write(daemon.path("box/memory_limit"), "1").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS));
}

/// Exits on SIGTERM within a few seconds, its mount gone: ring threads
/// must not hold the session open.
fn stops_cleanly(mut daemon: Daemon) {
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the daemon did not stop:\n{}", daemon.stderr()));
    assert!(status.success(), "{status}:\n{}", daemon.stderr());
    assert!(!crate::support::is_mounted(&daemon.mountpoint));
}

/// A daemon that serves over /dev/fuse: it logs `reason` (or, told not to
/// use io_uring, nothing about it), has no ring threads, and serves the tree.
fn keeps_dev_fuse(daemon: Daemon, reason: Option<&str>) {
    let log = daemon.stderr();
    match reason {
        Some(reason) => assert!(log.contains(reason), "{log}"),
        None => assert!(!log.contains("FUSE over io_uring"), "{log}"),
    }
    assert!(ring_threads(daemon.server_pid()).is_empty());
    serves_the_tree(&daemon);
    stops_cleanly(daemon);
}

#[test]
fn reads_are_served_on_the_readers_cpu_where_the_kernel_offers_io_uring() {
    require!();
    let (parent, _child) = limited("uring");
    let glob = format!("{}/*", parent.relative);
    let Some(_param) = Param::set(true) else {
        // This kernel has no FUSE over io_uring: the daemon says so and
        // serves over /dev/fuse.
        let daemon = Daemon::start(&["--no-ebpf", "--cgroup", &glob]);
        return keeps_dev_fuse(daemon, Some("not offered by the kernel"));
    };
    // A supervised daemon does not take it: a ring's requests would wait
    // forever for a server that died.
    let daemon = Daemon::start(&["--no-ebpf", "--cgroup", &glob]);
    keeps_dev_fuse(daemon, Some("not used by a supervised daemon"));
    let daemon = Daemon::start(&["--no-ebpf", "--no-supervise", "--cgroup", &glob]);
    let threads = ring_threads(daemon.server_pid());
    let possible = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    assert!(
        daemon.stderr().contains("FUSE over io_uring: ") && !threads.is_empty(),
        "no io_uring threads (possible CPUs {possible}):\n{}",
        daemon.stderr()
    );
    // Each online CPU's threads are bound to it, and serve the reads made
    // there: each read wakes them (open, read and release).
    for cpu in online_cpus() {
        let mine: Vec<u32> = threads
            .iter()
            .filter(|(queue, _)| *queue == cpu)
            .map(|(_, tid)| *tid)
            .collect();
        assert!(!mine.is_empty(), "no thread for CPU {cpu}: {threads:?}");
        let switches = || -> u64 {
            mine.iter()
                .map(|tid| {
                    status_field(daemon.server_pid(), *tid, "voluntary_ctxt_switches:")
                        .parse::<u64>()
                        .unwrap()
                })
                .sum()
        };
        for tid in &mine {
            assert_eq!(
                status_field(daemon.server_pid(), *tid, "Cpus_allowed_list:"),
                cpu.to_string()
            );
        }
        let before = switches();
        on_cpu(cpu, || read_limit(&daemon));
        let woken = switches() - before;
        assert!(
            woken >= READS as u64,
            "CPU {cpu}: its threads woke {woken} times for {READS} reads"
        );
    }
    serves_the_tree(&daemon);
    // Threads a request starts (the sampling helpers) run on every CPU the
    // daemon may, not only on the CPU of the serving thread that started
    // them: there they would take turns with it.
    let boxes: Vec<Cgroup> = (0..64).map(|i| parent.child(&format!("b{i}"))).collect();
    assert!(eventually(Duration::from_secs(10), || daemon
        .read("metric")
        .contains(&format!("b{}_", boxes.len() - 1))));
    let _ = daemon.read("box/cpu_millicores");
    let everywhere = status_field(
        daemon.server_pid(),
        daemon.server_pid(),
        "Cpus_allowed_list:",
    );
    let started = named(daemon.server_pid(), "sample-helper");
    assert!(!started.is_empty(), "no helper thread");
    for tid in started {
        assert_eq!(
            status_field(daemon.server_pid(), tid, "Cpus_allowed_list:"),
            everywhere
        );
    }
    drop(boxes);
    stops_cleanly(daemon);
}

#[test]
fn a_daemon_confined_to_one_cpu_or_told_not_to_keeps_dev_fuse() {
    require!();
    let (parent, _child) = limited("uring-off");
    let glob = format!("{}/*", parent.relative);
    let param = Param::set(true);
    let cpus = online_cpus();
    // Confined: another CPU's queue would be served from afar.
    if param.is_some() && cpus.len() > 1 {
        let cpu = cpus[0].to_string();
        let daemon = Daemon::start_under(
            &["taskset", "-c", &cpu],
            &["--no-ebpf", "--no-supervise", "--cgroup", &glob],
        );
        keeps_dev_fuse(daemon, Some("may not run on every CPU"));
    }
    let daemon = Daemon::start(&["--no-ebpf", "--no-fuse-uring", "--cgroup", &glob]);
    keeps_dev_fuse(daemon, None);
}

#[test]
fn with_the_kernel_switch_off_the_daemon_keeps_dev_fuse() {
    require!();
    let (parent, _child) = limited("uring-n");
    let glob = format!("{}/*", parent.relative);
    let _param = Param::set(false);
    let daemon = Daemon::start(&["--no-ebpf", "--cgroup", &glob]);
    keeps_dev_fuse(daemon, Some("not offered by the kernel"));
}

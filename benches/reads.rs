//! What reading cgmetric costs, side by side with the alternatives, from one
//! run: `cargo bench --bench reads` (as root; lxcfs installed).
//!
//! - one file's open/read/close, p50 and p99: the raw cgroupfs file it comes
//!   from, cgmetric, lxcfs; reader and daemon on the same CPU and on
//!   different CPUs; one reader and 8 in parallel;
//! - `metric` and `metrics.prom` for 200, 1,000 and 10,000 containers, vs a
//!   Rust reader of the same cgroup files;
//! - the daemon idle for 30 s with 1,000 containers: CPU and RSS, and after
//!   1,000 reads of each container;
//! - the cost of being scraped: `metrics.prom` read every 15 s for a minute
//!   at 200 and 1,000 containers, the daemon's CPU against reading the same
//!   cgroup files directly as often;
//! - time from a cgroup's creation to its directory being visible.
//!
//! Absolute times on shared machines are noise; the ratios carry over.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cgmetric::cgroup::{Controller, Layout};

const SINGLE_READS: usize = 20_000;
/// Blocks in which a value file and `box/name` are timed in turn.
const BLOCKS: usize = 20;
const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("reads benchmark: needs root (it creates cgroups and mounts)");
        std::process::exit(1);
    }
    let layout = Layout::detect(Path::new("/sys/fs/cgroup")).expect("cgroup layout");
    let base = format!("cgmetric-bench-{}", std::process::id());
    let mut cleanup = Cleanup::default();
    mkcgroup(&layout, &base, &mut cleanup);

    // Counted before any pinning (see `cpus`).
    println!(
        "cgmetric read benchmark — {} CPUs, Linux {}\n",
        cpus(),
        kernel()
    );
    // `cargo bench --bench reads -- aggregates` runs one section (cargo
    // itself passes `--bench`).
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |section: &str| wanted.is_empty() || wanted.iter().any(|w| w == section);
    // An unsupervised daemon below that may run on every CPU takes io_uring
    // if the kernel has it.
    let uring = enable_uring(&mut cleanup);
    println!(
        "FUSE over io_uring: {}\n",
        if uring {
            "on for this run (fuse.enable_uring=Y); an unsupervised daemon free to run on \
             every CPU uses it (a supervised one, the default, keeps /dev/fuse)"
        } else {
            "not in this kernel; every daemon uses /dev/fuse"
        }
    );
    if run("single") {
        single_file_reads(&layout, &base, uring, &mut cleanup);
    }
    // Idle first: with the aggregates' 11,200 cgroups also on the host, the
    // daemon would be measured walking those too.
    if run("idle") {
        idle_cost(&layout, &base, &mut cleanup);
    }
    if run("scrapes") {
        scrape_cost(&layout, &base, &mut cleanup);
    }
    if run("aggregates") {
        aggregates(&layout, &base, &mut cleanup);
    }
    if run("visibility") {
        visibility(&layout, &base, &mut cleanup);
    }
}

/// Everything the benchmark created, removed when it ends (also on panic).
#[derive(Default)]
struct Cleanup {
    cgroups: Vec<(Vec<PathBuf>, PathBuf)>,
    /// lxcfs.
    processes: Vec<Child>,
    mounts: Vec<PathBuf>,
    /// `fuse.enable_uring` as it was, if the benchmark changed it.
    uring_param: Option<String>,
    /// Directories of pinned eBPF objects (bpffs).
    bpf_dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.processes {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        // lxcfs unmounts itself when it ends; this is for one that could not.
        for mount in self.mounts.iter().filter(|m| is_fuse(m)) {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
        if let Some(before) = &self.uring_param {
            let _ = fs::write(URING_PARAM, before);
        }
        for dir in &self.bpf_dirs {
            let _ = fs::remove_dir_all(dir);
        }
        // Deepest first.
        for (roots, relative) in self.cgroups.iter().rev() {
            for root in roots {
                let _ = fs::remove_dir(root.join(relative));
            }
        }
    }
}

fn mkcgroup(layout: &Layout, relative: &str, cleanup: &mut Cleanup) {
    let roots: Vec<PathBuf> = layout
        .hierarchies()
        .iter()
        .map(|p| p.to_path_buf())
        .collect();
    for root in &roots {
        fs::create_dir_all(root.join(relative)).unwrap();
    }
    cleanup.cgroups.push((roots, PathBuf::from(relative)));
}

/// A running cgmetric, stopped (and its mount gone) when dropped, so that no
/// daemon outlives its measurement: each watches every cgroup the others
/// create, and inotify watches are limited per user.
struct Daemon {
    mnt: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts cgmetric pinned to `cpu` (or free on all) and waits for its
    /// mount.
    fn start(glob: &str, cpu: Option<usize>) -> Daemon {
        Daemon::start_with(glob, cpu, &[])
    }

    /// The same, with more command-line options.
    fn start_with(glob: &str, cpu: Option<usize>, options: &[&str]) -> Daemon {
        let mnt = tempfile::tempdir().unwrap().keep();
        let mut command = Command::new("taskset");
        match cpu {
            Some(cpu) => command.args(["-c", &cpu.to_string()]),
            None => command.args(["-a", "-c", &format!("0-{}", cpus() - 1)]),
        };
        command.arg(env!("CARGO_BIN_EXE_cgmetric"));
        // Network accounting only where a section asks for it (with a
        // --bpf-dir of its own, removed by `Cleanup`).
        if !options.contains(&"--bpf-dir") {
            command.arg("--no-ebpf");
        }
        let child = command
            .args(["--cgroup", glob])
            .args(options)
            .arg(&mnt)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("taskset (util-linux) and cgmetric");
        let daemon = Daemon { mnt, child };
        wait_for(|| cgmetric::mounts::is_served(&daemon.mnt));
        daemon
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if is_fuse(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = fs::remove_dir(&self.mnt);
    }
}

fn is_fuse(dir: &Path) -> bool {
    let mounts = cgmetric::mounts::read_mount_table().unwrap();
    cgmetric::mounts::mount_at(&mounts, dir).is_some_and(|m| m.fs_type.starts_with("fuse"))
}

fn wait_for(check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pin_to(cpu: usize) {
    pin_to_any(&[cpu]);
}

/// Lets this thread run on any of `cpus` (all of them: the scheduler's
/// choice).
fn pin_to_any(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `reads` open/read/close cycles of `path`, each timed.
fn time_reads(path: &Path, reads: usize) -> Vec<Duration> {
    let mut buf = [0u8; 8192];
    let mut times = Vec::with_capacity(reads);
    for _ in 0..reads {
        let started = Instant::now();
        let mut file = fs::File::open(path).unwrap();
        while file.read(&mut buf).unwrap() > 0 {}
        drop(file);
        times.push(started.elapsed());
    }
    times
}

/// Eight readers at once, placed as the calling thread is (threads inherit
/// its CPUs): p50 and p99 of their reads.
fn parallel_reads(label: &str, path: &Path) {
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.to_path_buf();
            std::thread::spawn(move || time_reads(&path, SINGLE_READS / 8))
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    println!(
        "  {:<32} {:>9.1} {:>9.1}",
        label,
        micros(percentile(&mut all, 0.5)),
        micros(percentile(&mut all, 0.99))
    );
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort();
    times[((times.len() - 1) as f64 * p) as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn single_file_reads(layout: &Layout, base: &str, uring: bool, cleanup: &mut Cleanup) {
    mkcgroup(layout, &format!("{base}/single"), cleanup);
    mkcgroup(layout, &format!("{base}/single/box"), cleanup);
    let raw = match layout.v1(Controller::Memory) {
        Some(root) => root.join(format!("{base}/single/box/memory.usage_in_bytes")),
        None => layout
            .unified
            .as_ref()
            .unwrap()
            .join(format!("{base}/single/box/memory.current")),
    };
    let lxcfs = tempfile::tempdir().unwrap().keep();
    let lxcfs_child = Command::new("lxcfs")
        .args(["-f", "-p"])
        .arg(lxcfs.join("../lxcfs-bench.pid"))
        .arg(&lxcfs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let lxcfs_ready = match lxcfs_child {
        Ok(child) => {
            cleanup.processes.push(child);
            cleanup.mounts.push(lxcfs.clone());
            wait_for(|| lxcfs.join("proc/uptime").exists());
            true
        }
        Err(e) => {
            println!("(lxcfs not available: {e}; its rows are left out)");
            false
        }
    };
    let other_cpu = usize::from(cpus() > 1);
    println!("One file: open, read, close ({SINGLE_READS} times, µs)\n");
    println!(
        "{:<34} {:>9} {:>9} {:>12} {:>12}",
        "", "p50", "p99", "p50 / raw", "p50 / lxcfs"
    );
    let all_cpus: Vec<usize> = (0..cpus()).collect();
    // Pinned, the two cases a wake-up can take; then the reader pinned and
    // the daemon free (io_uring serves on the reader's CPU); unpinned, what
    // the scheduler makes of it (what users get), idle and with every CPU
    // busy (a noisy neighbour).
    for (placement, daemon_cpu, reader_cpu, busy) in [
        ("reader and daemon on one CPU", Some(0), Some(0), false),
        (
            "reader and daemon on two CPUs",
            Some(other_cpu),
            Some(0),
            false,
        ),
        ("reader on one CPU, daemon free", None, Some(0), false),
        ("unpinned (the scheduler's choice)", None, None, false),
        ("unpinned, every CPU busy", None, None, true),
    ] {
        match reader_cpu {
            Some(cpu) => pin_to(cpu),
            None => pin_to_any(&all_cpus),
        }
        let burners: Vec<Child> = match busy {
            true => (0..cpus()).map(|_| burn()).collect(),
            false => Vec::new(),
        };
        let mut raw_t = time_reads(&raw, SINGLE_READS);
        let raw_p50 = percentile(&mut raw_t, 0.5);
        let lxcfs_p50 = lxcfs_ready.then(|| {
            let mut t = time_reads(&lxcfs.join("proc/meminfo"), SINGLE_READS);
            (percentile(&mut t, 0.5), percentile(&mut t, 0.99))
        });
        println!("{placement}:");
        println!(
            "  {:<32} {:>9.1} {:>9.1}",
            "raw cgroupfs file",
            micros(raw_p50),
            micros(percentile(&mut raw_t, 0.99))
        );
        if let Some((p50, p99)) = lxcfs_p50 {
            println!(
                "  {:<32} {:>9.1} {:>9.1}",
                "lxcfs proc/meminfo",
                micros(p50),
                micros(p99)
            );
        }
        // A cgmetric row: p50, p99 and the p50's ratios to raw and lxcfs.
        let compared = |label: &str, times: &mut [Duration]| {
            let p50 = percentile(times, 0.5);
            println!(
                "  {:<32} {:>9.1} {:>9.1} {:>12.2} {:>12}",
                label,
                micros(p50),
                micros(percentile(times, 0.99)),
                micros(p50) / micros(raw_p50),
                lxcfs_p50.map_or("-".into(), |(l, _)| format!(
                    "{:.2}",
                    micros(p50) / micros(l)
                )),
            );
        };
        // The default (supervised, so /dev/fuse), then what each transport
        // choice gains or costs here: FUSE threads that sleep as soon as
        // the queue is empty, and io_uring, which only an unsupervised
        // daemon takes. Each daemon is measured alone.
        let mut variants: Vec<(&str, &[&str])> = vec![
            ("cgmetric memory_usage", &[]),
            ("cgmetric, --fuse-spin 0", &["--fuse-spin", "0"]),
        ];
        if uring && daemon_cpu.is_none() {
            variants.push(("cgmetric, io_uring (--no-supervise)", &["--no-supervise"]));
        }
        for (i, (label, options)) in variants.into_iter().enumerate() {
            let daemon = Daemon::start_with(&format!("{base}/single/*"), daemon_cpu, options);
            let path = daemon.mnt.join("box/memory_usage");
            let _ = time_reads(&path, 1000);
            if i == 0 {
                // A file that reads nothing from the kernel: what the FUSE
                // requests alone cost, the floor of any cgmetric read. The
                // two are timed in alternating blocks: where the scheduler
                // has put the threads so far moves an unpinned p50 by more
                // than the files differ, and timed one after the other the
                // second of the pair measured 0.5× to 1× the first.
                let name = daemon.mnt.join("box/name");
                let _ = time_reads(&name, 1000);
                let (mut value_t, mut name_t) = (Vec::new(), Vec::new());
                for _ in 0..BLOCKS {
                    value_t.extend(time_reads(&path, SINGLE_READS / BLOCKS));
                    name_t.extend(time_reads(&name, SINGLE_READS / BLOCKS));
                }
                compared(label, &mut value_t);
                compared("  box/name (FUSE alone), alternated", &mut name_t);
            } else {
                compared(label, &mut time_reads(&path, SINGLE_READS));
            }
            parallel_reads("  the same, 8 parallel readers", &path);
        }
        for mut burner in burners {
            let _ = burner.kill();
            let _ = burner.wait();
        }
    }
    println!();
}

/// A process that keeps one CPU busy until killed.
fn burn() -> Child {
    Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("sh")
}

/// Turns on `fuse.enable_uring` for this run where the kernel has it
/// (Linux 6.14+), to be restored when the benchmark ends. Returns whether
/// it is on.
fn enable_uring(cleanup: &mut Cleanup) -> bool {
    let Ok(before) = fs::read_to_string(URING_PARAM) else {
        return false;
    };
    if fs::write(URING_PARAM, "Y").is_err() {
        return false;
    }
    cleanup.uring_param = Some(before.trim().to_string());
    true
}

/// The cgroup files a full sample of one container reads on this layout.
fn source_files(layout: &Layout, relative: &str) -> Vec<PathBuf> {
    let v1 = |c: Controller, files: &[&str]| -> Vec<PathBuf> {
        layout
            .v1(c)
            .map(|root| files.iter().map(|f| root.join(relative).join(f)).collect())
            .unwrap_or_default()
    };
    let mut files = Vec::new();
    if layout.v1(Controller::Memory).is_some() {
        files.extend(v1(Controller::Cpuacct, &["cpuacct.usage", "cpuacct.stat"]));
        files.extend(v1(
            Controller::Cpu,
            &["cpu.stat", "cpu.cfs_quota_us", "cpu.cfs_period_us"],
        ));
        files.extend(v1(
            Controller::Memory,
            &[
                "memory.usage_in_bytes",
                "memory.stat",
                "memory.limit_in_bytes",
                "memory.oom_control",
                "memory.failcnt",
                "memory.max_usage_in_bytes",
            ],
        ));
        // A hybrid host's pressure files are the v2 tree's.
        if let Some(unified) = &layout.unified {
            let dir = unified.join(relative);
            for f in ["cpu.pressure", "memory.pressure", "io.pressure"] {
                files.push(dir.join(f));
            }
        }
        files.extend(v1(
            Controller::Blkio,
            &[
                "blkio.throttle.io_service_bytes_recursive",
                "blkio.throttle.io_serviced_recursive",
            ],
        ));
        files.extend(v1(Controller::Pids, &["pids.current", "pids.max"]));
    } else {
        let dir = layout.unified.as_ref().unwrap().join(relative);
        for f in [
            "cpu.stat",
            "cpu.max",
            "memory.current",
            "memory.stat",
            "memory.max",
            "memory.events",
            "io.stat",
            "pids.current",
            "pids.max",
            "memory.peak",
            "cpu.pressure",
            "memory.pressure",
            "io.pressure",
        ] {
            files.push(dir.join(f));
        }
    }
    files.into_iter().filter(|f| f.exists()).collect()
}

fn median_time(mut f: impl FnMut(), runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    percentile(&mut times, 0.5)
}

/// Creates 200, 1,000 and 10,000 containers and times reading them all: with
/// the default `--open-files`, and where that does not cover every file,
/// with every file kept open too.
/// Makes `group` with `count` children `c0`, `c1`, ... (the containers of
/// a `group/*` daemon) and returns the cgroup files behind their values.
fn container_group(
    layout: &Layout,
    group: &str,
    count: usize,
    cleanup: &mut Cleanup,
) -> Vec<PathBuf> {
    mkcgroup(layout, group, cleanup);
    for i in 0..count {
        mkcgroup(layout, &format!("{group}/c{i}"), cleanup);
    }
    (0..count)
        .flat_map(|i| source_files(layout, &format!("{group}/c{i}")))
        .collect()
}

/// One thread reading `files` directly, median of `runs` passes: the floor
/// for any reader of cgroupfs.
fn direct_reads(files: &[PathBuf], runs: usize) -> Duration {
    median_time(
        || {
            for f in files {
                let _ = fs::read(f);
            }
        },
        runs,
    )
}

fn aggregates(layout: &Layout, base: &str, cleanup: &mut Cleanup) {
    println!(
        "Everything at once: one read of the aggregate file (ms, median of 30; of 10 for 10,000)\n"
    );
    println!(
        "{:<12} {:<34} {:>9} {:>9} {:>9} {:>13} {:>8} {:>8} {:>10}",
        "containers",
        "daemon",
        "direct",
        "metric",
        "prom",
        "files kept",
        "metric/",
        "prom/",
        "slab"
    );
    let mut largest = None;
    for count in [200, 1000, 10_000] {
        let group = format!("{base}/agg{count}");
        let files = container_group(layout, &group, count, cleanup);
        // A read can land in either of two modes (both sampling threads on
        // one CPU or not), so small sets are read often enough for a steady
        // median.
        let runs = if count > 1000 { 10 } else { 30 };
        pin_to(0);
        let direct = direct_reads(&files, runs);
        let default = cgmetric::cli::DEFAULT_OPEN_FILES;
        let bpf_dir = format!("/sys/fs/bpf/{base}-agg{count}");
        cleanup.bpf_dirs.push(PathBuf::from(&bpf_dir));
        let all = files.len().to_string();
        // cgroupfs alone, at the default budget of kept files and with
        // every file kept; then with eBPF, as the daemon runs by default:
        // network accounting, without and with the cgroup walk.
        let mut daemons: Vec<(String, Vec<&str>)> =
            vec![("cgroupfs only (--no-ebpf)".into(), vec![])];
        if files.len() > default {
            daemons.push((
                format!("cgroupfs only, --open-files {all}"),
                vec!["--open-files", &all],
            ));
        }
        daemons.push((
            "network, no walk (--no-cgroup-walk)".into(),
            vec!["--bpf-dir", &bpf_dir, "--no-cgroup-walk"],
        ));
        daemons.push((
            "network and walk (the default)".into(),
            vec!["--bpf-dir", &bpf_dir],
        ));
        for (label, options) in daemons {
            let slab_before = slab_kib();
            // Not pinned: the daemon may use every CPU, as it does in service.
            let daemon = Daemon::start_with(&format!("{group}/*"), None, &options);
            let mnt = &daemon.mnt;
            let fds_before = open_fds(daemon.pid());
            // Warm up: the first read measures CPU rates over one window.
            let _ = fs::read_to_string(mnt.join("metric")).unwrap();
            let metric = median_time(|| drop(fs::read(mnt.join("metric")).unwrap()), runs);
            let prom = median_time(|| drop(fs::read(mnt.join("metrics.prom")).unwrap()), runs);
            let kept = open_fds(daemon.pid()) - fds_before;
            let slab = slab_kib().saturating_sub(slab_before) as f64 / 1024.0;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{count:<12} {label:<34} {:>9.2} {:>9.2} {:>9.2} {:>13} {:>8.2} {:>8.2} {:>6.1} MiB",
                ms(direct),
                ms(metric),
                ms(prom),
                format!("{kept}/{}", files.len()),
                ms(metric) / ms(direct),
                ms(prom) / ms(direct),
                slab
            );
        }
        if count == 10_000 {
            largest = Some(files);
        }
    }
    println!(
        "\n(direct: one thread reading the same cgroup files; files kept: descriptors the \
         daemon holds, of the cgroup files it would read; slab: the kernel's slab growth \
         while the daemon ran, mostly the kept files' buffers)\n"
    );
    if let Some(files) = largest {
        let walked_kinds = direct_by_file(&files, base, 10_000);
        walk_alone(layout, base, walked_kinds);
    }
}

/// What one walk of every hierarchy costs on its own (the 10,000
/// containers above are still there): the part of an aggregate read that
/// replaces the files the walk answers.
fn walk_alone(layout: &Layout, base: &str, files_ms: f64) {
    let walker = cgmetric::cgroup::walk::Walker::new(layout);
    let first = walker.walk().expect("the cgroup walk runs on this kernel");
    let cgroups = first.len();
    let mut times: Vec<Duration> = (0..10)
        .map(|_| {
            let started = Instant::now();
            let walked = walker.walk().unwrap();
            let took = started.elapsed();
            assert_eq!(walked.len(), cgroups);
            took
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "One walk of every hierarchy, alone: {:.2} ms for {cgroups} cgroups ({:.2} µs a cgroup; \
         median of 10), against {files_ms:.0} ms for one thread to read the files it answers: {:.3}\n",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e6 / cgroups as f64,
        median.as_secs_f64() * 1e3 / files_ms
    );
    mkdir_during_walks(layout, base, &walker);
}

/// What the walk costs the rest of the host: a cgroup iterator holds
/// `cgroup_mutex` for its whole hierarchy, and making or removing any
/// cgroup takes it too, so a container starting during a scrape can wait.
/// Times a `mkdir` and `rmdir` of a cgroup, one after the other for 2 s,
/// with nothing else running and then with walks back to back (the worst
/// case: a scrape walks once).
fn mkdir_during_walks(layout: &Layout, base: &str, walker: &cgmetric::cgroup::walk::Walker) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let root = layout
        .v1(Controller::Memory)
        .map(Path::to_path_buf)
        .or_else(|| layout.unified.clone())
        .expect("a memory hierarchy");
    let probe = root.join(base).join("mkdir-probe");
    let time = |times: &mut Vec<Duration>| {
        let begun = Instant::now();
        while begun.elapsed() < Duration::from_secs(2) {
            let started = Instant::now();
            fs::create_dir(&probe).expect("mkdir");
            fs::remove_dir(&probe).expect("rmdir");
            times.push(started.elapsed());
        }
    };
    let mut idle = Vec::new();
    time(&mut idle);
    let walking = AtomicBool::new(true);
    let mut busy = Vec::new();
    let walks = std::thread::scope(|scope| {
        let walker = scope.spawn(|| {
            let mut walks = 0;
            while walking.load(Ordering::Relaxed) {
                walker.walk().expect("walk");
                walks += 1;
            }
            walks
        });
        time(&mut busy);
        walking.store(false, Ordering::Relaxed);
        walker.join().unwrap()
    });
    let show = |times: &mut Vec<Duration>| {
        let (p50, p99) = (percentile(times, 0.5), percentile(times, 0.99));
        let max = times.iter().max().copied().unwrap_or_default();
        format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            micros(p50),
            micros(p99),
            micros(max)
        )
    };
    println!(
        "A cgroup's mkdir and rmdir for 2 s, nothing else running: {} ({} of them); with walks \
         back to back: {} ({} of them, {walks} walks meanwhile)\n",
        show(&mut idle),
        idle.len(),
        show(&mut busy),
        busy.len()
    );
}

/// What each kind of cgroup file costs to read for every container, one
/// thread, median of 3: the floor under any reader of cgroupfs, file by
/// file. With 2 CPUs, a kind whose time exceeds twice the 100 ms target
/// bounds an aggregate of cgroupfs reads on its own. Returns the time of
/// the kinds the cgroup walk answers.
fn direct_by_file(files: &[PathBuf], base: &str, count: usize) -> f64 {
    let mut kinds: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for file in files {
        // The hierarchy (the path's part before the benchmark's cgroups)
        // and the file's name: cpu.stat is in v1 cpu and in v2 alike.
        let path = file.to_string_lossy();
        let hierarchy = path.split(&format!("/{base}/")).next().unwrap_or_default();
        let kind = format!(
            "{}/{}",
            hierarchy.rsplit('/').next().unwrap_or_default(),
            file.file_name().unwrap().to_string_lossy()
        );
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, paths)) => paths.push(file.clone()),
            None => kinds.push((kind, vec![file.clone()])),
        }
    }
    println!(
        "One thread reading one kind of file for each of {count} containers (ms, median of 3)\n"
    );
    let mut total = 0.0;
    let mut rows: Vec<(String, f64)> = kinds
        .iter()
        .map(|(kind, paths)| {
            let ms = direct_reads(paths, 3).as_secs_f64() * 1e3;
            total += ms;
            (kind.clone(), ms)
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut walked = 0.0;
    for (kind, ms) in rows {
        let file = kind.rsplit('/').next().unwrap_or_default();
        let answered = cgmetric::cgroup::walk::answers(file);
        if answered {
            walked += ms;
        }
        let mark = if answered { "  (walked)" } else { "" };
        println!("  {kind:<56} {ms:>9.1} {:>6.1}%{mark}", ms / total * 100.0);
    }
    println!("  {:<56} {total:>9.1}", "all");
    println!(
        "  {:<56} {walked:>9.1} {:>6.1}%\n",
        "the kinds the cgroup walk answers",
        walked / total * 100.0
    );
    walked
}

/// CPU time of the daemon's processes (see [`family`]) to the nanosecond:
/// the sum of their threads' run times (`/proc/<tid>/schedstat`). A thread
/// that ended in between is not counted; the daemon's threads live as long
/// as it does.
fn cpu_time(pid: u32) -> Duration {
    family(pid)
        .into_iter()
        .filter_map(|pid| fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}

/// Descriptors open in the daemon's processes (see [`family`]).
fn open_fds(pid: u32) -> usize {
    family(pid)
        .into_iter()
        .filter_map(|pid| fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map(|fds| fds.count())
        .sum()
}

/// The kernel's slab memory (KiB), from /proc/meminfo.
fn slab_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// `pid` and every process below it: the daemon is a supervisor that
/// holds the mount and a server child that does the work, and a figure of
/// the supervisor alone would read zero.
fn family(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() {
        let tasks = format!("/proc/{}/task", all[next]);
        next += 1;
        for task in fs::read_dir(tasks).into_iter().flatten().flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    all
}

/// CPU time (user + system, in clock ticks) and RSS (KiB) of a process and
/// those below it (see [`family`]). A process that ended between the two
/// looks counts as nothing.
fn usage(pid: u32) -> (u64, u64) {
    family(pid).into_iter().fold((0, 0), |(ticks, rss), pid| {
        let (t, r) = process_usage(pid).unwrap_or((0, 0));
        (ticks + t, rss + r)
    })
}

fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0);
    Some((ticks, rss))
}

/// CPU share of `pid` over `seconds`, and its RSS (MiB) at the end.
fn cost_over(pid: u32, seconds: u64) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (t0, _) = usage(pid);
    std::thread::sleep(Duration::from_secs(seconds));
    let (t1, rss) = usage(pid);
    (
        (t1 - t0) as f64 / hz / seconds as f64 * 100.0,
        rss as f64 / 1024.0,
    )
}

/// A fresh daemon serving 1,000 containers of its own: idle, after reads,
/// and after a rate read (nothing may run between reads).
fn idle_cost(layout: &Layout, base: &str, cleanup: &mut Cleanup) {
    println!("The daemon with 1,000 containers (CPU over 30 s, RSS after)\n");
    let group = format!("{base}/idle");
    container_group(layout, &group, 1000, cleanup);
    let daemon = Daemon::start(&format!("{group}/*"), None);
    let pid = daemon.pid();
    let fds_idle = open_fds(pid);
    let (cpu, rss) = cost_over(pid, 30);
    println!("  {:<44} {cpu:>6.3}% of a core, RSS {rss:.1} MiB", "idle");
    let started = Instant::now();
    for _ in 0..1000 {
        for i in 0..1000 {
            let _ = fs::read(daemon.mnt.join(format!("c{i}/memory_usage")));
        }
    }
    let elapsed = started.elapsed();
    let (cpu, rss) = cost_over(pid, 30);
    println!(
        "  {:<44} {cpu:>6.3}% of a core, RSS {rss:.1} MiB, {} cgroup files kept",
        format!(
            "idle after 1,000 reads of each ({:.1} µs each)",
            micros(elapsed) / 1e6
        ),
        open_fds(pid) - fds_idle
    );
    // Rates are computed from reads: after one, nothing runs until the next.
    let _ = fs::read(daemon.mnt.join("metric"));
    let (cpu, rss) = cost_over(pid, 30);
    println!(
        "  {:<44} {cpu:>6.3}% of a core, RSS {rss:.1} MiB",
        "idle after a rate read (metric)"
    );
    println!();
}

/// How often Prometheus scrapes by default, and how long each run lasts.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(15);
const SCRAPES: u32 = 4;

/// A daemon scraped as node_exporter's textfile collector or Prometheus
/// would: `metrics.prom` every 15 s, network accounting on. Its CPU over
/// the minute is set against one thread reading the same cgroup files
/// directly at each scrape, the floor for any reader of cgroupfs; then one
/// scrape's cost per container by source, from the daemon's own
/// `cgmetric_aggregate_cpu_seconds_total`.
fn scrape_cost(layout: &Layout, base: &str, cleanup: &mut Cleanup) {
    println!(
        "Being scraped: metrics.prom every {} s for {} s (daemon CPU, % of a core)\n",
        SCRAPE_INTERVAL.as_secs(),
        SCRAPE_INTERVAL.as_secs() * SCRAPES as u64
    );
    println!(
        "{:<12} {:>10} {:>14} {:>14} {:>10} {:>10}",
        "containers", "daemon", "per scrape", "direct", "ratio", "target"
    );
    let mut splits = Vec::new();
    for count in [200, 1000] {
        let group = format!("{base}/scrape{count}");
        let files = container_group(layout, &group, count, cleanup);
        let direct = direct_reads(&files, 10);
        let bpf_dir = PathBuf::from(format!("/sys/fs/bpf/{base}-scrape{count}"));
        cleanup.bpf_dirs.push(bpf_dir.clone());
        let daemon = Daemon::start_with(
            &format!("{group}/*"),
            None,
            &["--bpf-dir", bpf_dir.to_str().unwrap()],
        );
        let pid = daemon.pid();
        let prom = daemon.mnt.join("metrics.prom");
        // The first scrape primes the rates (it waits one window); the
        // minute measured is the steady state after it.
        let first = fs::read_to_string(&prom).unwrap();
        let cpu0 = cpu_time(pid);
        let started = Instant::now();
        let mut last = first.clone();
        for n in 1..=SCRAPES {
            last = fs::read_to_string(&prom).unwrap();
            let next = SCRAPE_INTERVAL * n;
            std::thread::sleep(next.saturating_sub(started.elapsed()));
        }
        let cpu = cpu_time(pid) - cpu0;
        let share = cpu.as_secs_f64() / started.elapsed().as_secs_f64() * 100.0;
        let per_scrape = cpu.as_secs_f64() / SCRAPES as f64 * 1000.0;
        let direct_ms = direct.as_secs_f64() * 1000.0;
        println!(
            "{:<12} {:>9.3}% {:>11.2} ms {:>11.2} ms {:>10.2} {:>10}",
            count,
            share,
            per_scrape,
            direct_ms,
            per_scrape / direct_ms,
            if count == 200 { "≤ 0.5%" } else { "" }
        );
        // The last scrape's counters hold every scrape before it: the
        // first's included, the last's not, so SCRAPES reads in all.
        let (reads0, before) = spent(&first);
        let (reads1, after) = spent(&last);
        let per_container = |i: usize| {
            (after[i] - before[i]) / (reads1 - reads0).max(1) as f64 / count as f64 * 1e6
        };
        splits.push((
            count,
            per_scrape,
            direct_ms,
            [0, 1, 2, 3].map(per_container),
        ));
    }
    println!(
        "\n(per scrape: the daemon's CPU time per scrape, from the kernel's per-thread \
         run times; direct: one thread reading the same cgroup files once, median of 10)\n"
    );
    println!("One scrape's CPU per container, by source (µs; the daemon's own counters)\n");
    println!(
        "{:<12} {:>12} {:>14} {:>10} {:>10} {:>10} {:>16}",
        "containers", "cgroup walk", "cgroup files", "eBPF", "render", "the rest", "direct files"
    );
    for (count, per_scrape, direct_ms, [walk, files, ebpf, render]) in splits {
        let whole = per_scrape * 1000.0 / count as f64;
        println!(
            "{:<12} {:>12.1} {:>14.1} {:>10.1} {:>10.1} {:>10.1} {:>16.1}",
            count,
            walk,
            files,
            ebpf,
            render,
            (whole - walk - files - ebpf - render).max(0.0),
            direct_ms * 1000.0 / count as f64
        );
    }
    println!(
        "\n(the rest: FUSE requests, discovery and everything else the daemon did in \
         the minute; direct files: one thread reading the same files, per container)\n"
    );
}

/// `cgmetric_aggregate_reads_total` and the CPU seconds by source
/// (cgroup walk, cgroup files, eBPF, render) from a `metrics.prom` text.
fn spent(text: &str) -> (u64, [f64; 4]) {
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("cgmetric_aggregate_reads_total") as u64,
        ["cgroup_walk", "cgroup_files", "ebpf", "render"].map(|source| {
            value(&format!(
                "cgmetric_aggregate_cpu_seconds_total{{source=\"{source}\"}}"
            ))
        }),
    )
}

fn visibility(layout: &Layout, base: &str, cleanup: &mut Cleanup) {
    mkcgroup(layout, &format!("{base}/vis"), cleanup);
    let daemon = Daemon::start(&format!("{base}/vis/*"), None);
    let mnt = &daemon.mnt;
    let mut times = Vec::new();
    for i in 0..20 {
        let relative = format!("{base}/vis/new{i}");
        let started = Instant::now();
        mkcgroup(layout, &relative, cleanup);
        let dir = mnt.join(format!("new{i}"));
        while fs::metadata(&dir).is_err() {
            std::hint::spin_loop();
        }
        times.push(started.elapsed());
    }
    println!(
        "Creation to visible (20 cgroups): median {:.0} µs, max {:.0} µs",
        micros(percentile(&mut times, 0.5)),
        micros(*times.iter().max().unwrap())
    );
}

/// The CPUs this benchmark may use, as it started: it pins itself to one
/// CPU later, and a count taken then would pin the daemons it starts
/// unpinned to that CPU too.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

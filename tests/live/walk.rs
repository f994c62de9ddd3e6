//! The cgroup walk against cgroupfs: each file the walk answers says, to
//! the byte, what the kernel's own file says, in every hierarchy of the
//! host, for cgroups with limits and a workload and for idle and empty
//! ones; and the daemon's aggregates use it.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use cgmetric::cgroup::walk::{key_of, Answer, Walker, FILES};
use cgmetric::cgroup::{Controller, Layout, LayoutKind};

use crate::require;
use crate::support::{host_layout, rss_kib, Cgroup, Daemon};

/// The files the walk answers, by where cgroupfs has them.
const V1_FILES: [(Controller, &str); 10] = [
    (Controller::Memory, "memory.usage_in_bytes"),
    (Controller::Memory, "memory.limit_in_bytes"),
    (Controller::Memory, "memory.max_usage_in_bytes"),
    (Controller::Memory, "memory.failcnt"),
    (Controller::Memory, "memory.oom_control"),
    (Controller::Pids, "pids.current"),
    (Controller::Pids, "pids.max"),
    (Controller::Cpu, "cpu.cfs_quota_us"),
    (Controller::Cpu, "cpu.cfs_period_us"),
    (Controller::Cpu, "cpu.stat"),
];
const V2_FILES: [&str; 8] = [
    "memory.current",
    "memory.max",
    "memory.peak",
    "memory.events",
    "memory.swap.current",
    "pids.current",
    "pids.max",
    "cpu.max",
];

/// Each directory of `relative` with each file of the walk its hierarchy
/// would have.
fn files_of(layout: &Layout, relative: &str) -> Vec<(PathBuf, &'static str)> {
    let mut files = Vec::new();
    if let Some(v2) = &layout.unified {
        files.extend(V2_FILES.map(|f| (v2.join(relative), f)));
    }
    for (controller, file) in V1_FILES {
        if let Some(root) = layout.v1(controller) {
            files.push((root.join(relative), file));
        }
    }
    files
}

/// A CPU quota of half a CPU, v1 or v2.
fn limit_cpu(cgroup: &Cgroup) {
    match cgroup.is_v1(Controller::Cpu) {
        true => cgroup.write(Controller::Cpu, "cpu.cfs_quota_us", "50000"),
        false => cgroup.write(Controller::Cpu, "cpu.max", "50000 100000"),
    }
}

fn read(path: &PathBuf) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// A cgroup directory made by hand, removed on drop.
struct Removed(PathBuf);

impl Removed {
    fn make(dir: PathBuf) -> Removed {
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Removed(dir)
    }
}

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn the_walk_answers_every_file_as_cgroupfs_does() {
    require!("stress-ng");
    let layout = host_layout();
    let parent = Cgroup::parent("walk");
    let mut limited = parent.child("limited");
    limited.limit_memory(256 << 20);
    limited.write(Controller::Pids, "pids.max", "64");
    limit_cpu(&limited);
    limited.spawn_memory_holder("16M");
    let mut idle = parent.child("idle");
    idle.spawn(Command::new("sleep").arg("600"));
    let empty = parent.child("empty");
    // On v1, at its limit: its failcnt counts (a word no other cgroup here
    // moves from 0). Where the memory controller is v2's (the guests, whose
    // disk takes no O_DIRECT), a small holder under a small limit.
    let mut squeezed = parent.child("squeezed");
    squeezed.limit_memory(16 << 20);
    if squeezed.is_v1(Controller::Memory) {
        squeezed.read_through_page_cache(64);
    } else {
        squeezed.spawn_memory_holder("8M");
    }
    // Throttled for a while, then idle: its v1 cpu.stat counts, and
    // stands still.
    let mut throttled = parent.child("throttled");
    limit_cpu(&throttled);
    if throttled.is_v1(Controller::Cpu) {
        throttled.spawn_burner();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        throttled.kill_all();
    }
    // An OOM kill: dd's 64 MiB buffer in 32 MiB.
    let killed = parent.child("killed");
    killed.limit_memory(32 << 20);
    killed.oom_kill_a_dd();
    // Pure v2: a cgroup under a parent that enables io alone has a memory
    // state (io depends on memory) but no memory files.
    let io_only = parent.child("io_only");
    let hidden = (layout.kind == LayoutKind::Unified).then(|| {
        let io_only_dir = io_only.v2_dir().unwrap();
        fs::write(io_only_dir.join("cgroup.subtree_control"), "+io").unwrap();
        Removed::make(io_only_dir.join("hidden"))
    });
    // Every file the walk answers is covered here.
    for (file, _, _) in FILES {
        assert!(
            V2_FILES.contains(&file) || V1_FILES.iter().any(|(_, f)| *f == file),
            "{file} is not tested"
        );
    }

    let walker = Walker::new(&layout);
    let (mut texts, mut absent, mut failures) = (0, 0, 0);
    // Counters above 0 compared: a throttled cgroup's, an OOM kill's.
    let (mut throttles, mut kills) = (0, 0);
    let counts = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    };
    let mut relatives: Vec<String> = [&limited, &idle, &empty, &squeezed, &throttled, &killed]
        .iter()
        .map(|c| c.relative.clone())
        .collect();
    if hidden.is_some() {
        relatives.push(format!("{}/hidden", io_only.relative));
    }
    for relative in &relatives {
        for (dir, file) in files_of(&layout, relative) {
            let path = dir.join(file);
            let key = key_of(&dir).unwrap();
            // A workload's usage moves: the walk is held to two reads of
            // the file around it that agree.
            let mut tries = 0;
            let (cgroupfs, answer, text) = loop {
                let before = read(&path);
                let walked = walker.walk().unwrap_or_else(|e| panic!("{e}"));
                let after = read(&path);
                let mut out = Vec::new();
                let answer = walked.render(key, file, &mut out);
                if before == after {
                    break (before, answer, String::from_utf8(out).unwrap());
                }
                tries += 1;
                assert!(tries < 100, "{} never stood still", path.display());
            };
            match (cgroupfs, answer) {
                (Some(kernel), Answer::Text) => {
                    assert_eq!(text, kernel, "{}", path.display());
                    texts += 1;
                    if file == "memory.failcnt" && kernel != "0\n" {
                        failures += 1;
                    }
                    throttles += usize::from(file == "cpu.stat" && counts(&kernel, "nr_throttled"));
                    kills += usize::from(counts(&kernel, "oom_kill"));
                }
                // Absent, or a hierarchy without these controllers (the
                // v2 tree of a hybrid host), which is not walked at all.
                (None, Answer::Absent | Answer::ReadFile) => absent += 1,
                (kernel, answer) => panic!(
                    "{}: cgroupfs says {kernel:?}, the walk {answer:?}",
                    path.display()
                ),
            }
        }
    }
    // Four cgroups, each with every file of a v2 tree with controllers or
    // of the v1 hierarchies.
    assert!(texts >= 4 * V2_FILES.len(), "{texts} files compared");
    if layout.v1(Controller::Memory).is_some() {
        assert!(failures >= 1, "the squeezed cgroup's failcnt was compared");
    }
    if layout.v1(Controller::Cpu).is_some() {
        assert_eq!(throttles, 1, "the throttled cgroup's cpu.stat was compared");
    }
    assert_eq!(kills, 1, "the killed cgroup's OOM kill was compared");
    if let Some(hidden) = &hidden {
        assert!(!hidden.0.join("memory.current").exists());
        assert!(hidden.0.join("io.stat").exists());
    }
    eprintln!("{texts} files equal, {absent} absent in both");
}

#[test]
fn aggregates_walk_the_cgroups_unless_told_not_to() {
    require!();
    let parent = Cgroup::parent("walked");
    let mut limited = parent.child("limited");
    limited.limit_memory(256 << 20);
    limited.write(Controller::Pids, "pids.max", "64");
    limit_cpu(&limited);
    limited.spawn(Command::new("sleep").arg("600"));
    let glob = format!("{}/*", parent.relative);
    let own = |daemon: &Daemon, series: &str| -> f64 {
        let prom = daemon.read("metrics.prom");
        prom.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in {prom}"))
            .parse()
            .unwrap()
    };
    for walk in [true, false] {
        let mut args = vec!["--cgroup", &glob];
        if !walk {
            args.push("--no-cgroup-walk");
        }
        let daemon = Daemon::start(&args);
        let metric = daemon.read("metric");
        let value = |name: &str| -> String {
            metric
                .lines()
                .find_map(|l| l.strip_prefix(&format!("limited_{name} ")))
                .unwrap_or_else(|| panic!("no {name} in {metric}"))
                .to_string()
        };
        // What the kernel says, as the daemon's own single-file reads
        // (which never walk) say it too.
        for name in [
            "memory_limit",
            "pids_limit",
            "pids_current",
            "cpu_limit_millicores",
        ] {
            assert_eq!(
                value(name),
                daemon.read(&format!("limited/{name}")).trim(),
                "{name}, walk {walk}"
            );
        }
        assert_eq!(value("memory_limit"), (256u64 << 20).to_string());
        assert_eq!(value("pids_limit"), "64");
        assert_eq!(value("pids_current"), "1");
        assert_eq!(value("cpu_limit_millicores"), "500");
        // The files the walk answered (the 4 values above come from 5
        // files in v1, 4 in v2, besides the memory peak and failcnt).
        let answered = own(&daemon, "cgmetric_aggregate_walked_files_total");
        assert_eq!(
            answered >= 4.0,
            walk,
            "{answered} files walked, walk {walk}"
        );
        assert_eq!(answered == 0.0, !walk, "{answered} files walked");
        let spent = own(
            &daemon,
            "cgmetric_aggregate_cpu_seconds_total{source=\"cgroup_walk\"}",
        );
        assert_eq!(spent > 0.0, walk, "walk CPU {spent} with walk {walk}");
        // It loaded, and no walk failed.
        let log = daemon.stderr();
        assert_eq!(log.contains("hierarchies, room for"), walk, "{log}");
        for failed in [
            "every cgroup value is read from cgroupfs",
            "takes every value from cgroupfs",
        ] {
            assert!(!log.contains(failed), "{log}");
        }
        // Loading read the kernel's BTF, some 50 MiB of allocations; they
        // are given back (8 MiB was seen, against 60 before they were).
        let rss = rss_kib(daemon.server_pid());
        assert!(rss < 24 * 1024, "{rss} KiB resident after the walk {walk}");
    }
}

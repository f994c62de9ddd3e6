//! The cgroup walk against cgroupfs: each file the walk answers says, to
//! the byte, what the kernel's own file says, in every hierarchy of the
//! host, for cgroups with limits and a workload and for idle and empty
//! ones; and the daemon's aggregates use it.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use cgmetric::cgroup::walk::{key_of, Answer, Walker, FILES};
use cgmetric::cgroup::{Controller, Layout};

use crate::require;
use crate::support::{host_layout, Cgroup, Daemon};

/// The files the walk answers, by where cgroupfs has them.
const V1_FILES: [(Controller, &str); 8] = [
    (Controller::Memory, "memory.usage_in_bytes"),
    (Controller::Memory, "memory.limit_in_bytes"),
    (Controller::Memory, "memory.max_usage_in_bytes"),
    (Controller::Memory, "memory.failcnt"),
    (Controller::Pids, "pids.current"),
    (Controller::Pids, "pids.max"),
    (Controller::Cpu, "cpu.cfs_quota_us"),
    (Controller::Cpu, "cpu.cfs_period_us"),
];
const V2_FILES: [&str; 6] = [
    "memory.current",
    "memory.max",
    "memory.peak",
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
    // Every file the walk answers is covered here.
    for (file, _) in FILES {
        assert!(
            V2_FILES.contains(&file) || V1_FILES.iter().any(|(_, f)| *f == file),
            "{file} is not tested"
        );
    }

    let walker = Walker::new(&layout);
    let (mut texts, mut absent) = (0, 0);
    for cgroup in [&limited, &idle, &empty] {
        for (dir, file) in files_of(&layout, &cgroup.relative) {
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
                }
                // Absent, or a hierarchy without these controllers (the
                // v2 tree of a hybrid host) that is not walked at all.
                (None, Answer::Absent | Answer::Unseen) => absent += 1,
                (kernel, answer) => panic!(
                    "{}: cgroupfs says {kernel:?}, the walk {answer:?}",
                    path.display()
                ),
            }
        }
    }
    // Three cgroups, each with every file of a v2 tree with controllers or
    // of the v1 hierarchies.
    assert!(texts >= 3 * V2_FILES.len(), "{texts} files compared");
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
    let walk_cpu = |daemon: &Daemon| -> f64 {
        let prom = daemon.read("metrics.prom");
        prom.lines()
            .find_map(|l| {
                l.strip_prefix("cgmetric_aggregate_cpu_seconds_total{source=\"cgroup_walk\"} ")
            })
            .unwrap_or_else(|| panic!("no cgroup_walk source in {prom}"))
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
        let spent = walk_cpu(&daemon);
        assert_eq!(spent > 0.0, walk, "walk CPU {spent} with walk {walk}");
        // It loaded and walked, or was never tried.
        let log = daemon.stderr();
        assert_eq!(log.contains("cgroup walk: "), walk, "{log}");
        assert!(!log.contains("read from cgroupfs"), "{log}");
    }
}

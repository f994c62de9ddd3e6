//! Memory and processes against the kernel's own numbers.

use std::process::Command;
use std::time::Duration;

use cgmetric::cgroup::Controller;

use crate::require;
use crate::support::{eventually, online_cpus, Cgroup, Daemon};

const MIB: u64 = 1 << 20;

#[test]
fn memory_toucher_rss_agrees_with_the_kernel() {
    require!("stress-ng");
    let parent = Cgroup::parent("mem");
    let mut toucher = parent.child("toucher");
    toucher.spawn_memory_holder("64M");
    let (stat, rss_key) = match toucher.is_v1(Controller::Memory) {
        true => ("memory.stat", "total_rss"),
        false => ("memory.stat", "anon"),
    };
    assert!(
        eventually(Duration::from_secs(20), || toucher.stat(
            Controller::Memory,
            stat,
            rss_key
        ) >= 64 * MIB),
        "the toucher never reached 64 MiB"
    );
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);

    let before = toucher.stat(Controller::Memory, stat, rss_key);
    let ours = daemon.number("toucher/memory_rss");
    let after = toucher.stat(Controller::Memory, stat, rss_key);
    // memory.stat is exact only to within the updates the kernel has not
    // flushed: a read flushes only once more than one batch
    // (MEMCG_CHARGE_BATCH, 64 pages) per CPU is pending, and each CPU holds
    // up to a batch it has not reported. So a read between two equal ones
    // can still differ (seen once in the 6.1 guest: 55 pages below both).
    let cpus = online_cpus().len() as u64;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let batch = 64 * page * (2 * cpus + 1);
    assert!(
        before.min(after).saturating_sub(batch) <= ours && ours <= before.max(after) + batch,
        "memory_rss {ours}, kernel {before}..{after}, flush batch {batch}"
    );
    assert!(ours >= 64 * MIB);
    // Usage and working set from one snapshot (the working set is the usage
    // less inactive file pages, so two reads apart may disagree).
    let metrics = daemon.read("toucher/metrics");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    let (usage, working_set) = (value("memory_usage"), value("memory_working_set"));
    assert!(usage >= ours, "usage {usage} < rss {ours}");
    assert!(
        working_set <= usage && working_set >= ours / 2,
        "{working_set}"
    );
    // Page faults against the kernel's own count, read around ours (with
    // transparent huge pages, 64 MiB can take a few dozen faults).
    let fault_key = if toucher.is_v1(Controller::Memory) {
        "total_pgfault"
    } else {
        "pgfault"
    };
    let before = toucher.stat(Controller::Memory, stat, fault_key);
    let ours = daemon.number("toucher/memory_pgfault");
    let after = toucher.stat(Controller::Memory, stat, fault_key);
    assert!(
        before <= ours && ours <= after && ours > 0,
        "{before} <= {ours} <= {after}"
    );
}

#[test]
fn limits_read_max_when_unset_and_the_value_when_set() {
    require!();
    let parent = Cgroup::parent("limits");
    let free = parent.child("free");
    let capped = parent.child("capped");
    let (memory_file, pids_file) = match capped.is_v1(Controller::Memory) {
        true => ("memory.limit_in_bytes", "pids.max"),
        false => ("memory.max", "pids.max"),
    };
    capped.write(Controller::Memory, memory_file, &(128 * MIB).to_string());
    capped.write(Controller::Pids, pids_file, "42");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    assert_eq!(daemon.read("free/memory_limit"), "max\n");
    assert_eq!(daemon.read("free/pids_limit"), "max\n");
    assert_eq!(daemon.number("capped/memory_limit"), 128 * MIB);
    assert_eq!(daemon.number("capped/pids_limit"), 42);
    assert_eq!(daemon.number("capped/memory_oom_kills"), 0);
    drop(free);
}

#[test]
fn pids_current_is_exact_and_live() {
    require!();
    let parent = Cgroup::parent("pids");
    let mut sleepers = parent.child("sleepers");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    assert_eq!(daemon.number("sleepers/pids_current"), 0);
    for n in 1..=5u64 {
        sleepers.spawn(Command::new("sleep").arg("600"));
        // Each open renders anew: no stale value, whatever the page cache.
        assert_eq!(daemon.number("sleepers/pids_current"), n);
        assert_eq!(
            sleepers.read(Controller::Pids, "pids.current").trim(),
            n.to_string()
        );
    }
    sleepers.kill_all();
    assert!(eventually(Duration::from_secs(5), || daemon
        .number("sleepers/pids_current")
        == 0));
}

/// The kernel's count of `key` in the memory events it keeps: v2
/// `memory.events`; on v1, `max` is `memory.failcnt` and `oom_kill` is in
/// `memory.oom_control` (the others have no v1 source).
fn kernel_event(cg: &Cgroup, key: &str) -> u64 {
    match (cg.is_v1(Controller::Memory), key) {
        (false, _) => cg.stat(Controller::Memory, "memory.events", key),
        (true, "max") => cg
            .read(Controller::Memory, "memory.failcnt")
            .trim()
            .parse()
            .unwrap(),
        (true, "oom_kill") => cg.stat(Controller::Memory, "memory.oom_control", key),
        (true, _) => panic!("cgroup v1 keeps no {key} count"),
    }
}

/// The kernel's peak usage file, if it has one (v2 memory.peak is 5.19+).
fn kernel_peak(cg: &Cgroup) -> Option<u64> {
    let file = match cg.is_v1(Controller::Memory) {
        true => "memory.max_usage_in_bytes",
        false => "memory.peak",
    };
    let text = std::fs::read_to_string(cg.dir(Controller::Memory).join(file)).ok()?;
    Some(text.trim().parse().unwrap())
}

#[test]
fn an_oom_kill_shows_in_events_kills_and_peak() {
    require!();
    let parent = Cgroup::parent("oom");
    let oomer = parent.child("oomer");
    oomer.limit_memory(32 * MIB);
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    assert_eq!(daemon.number("oomer/memory_oom_kills"), 0);
    assert_eq!(daemon.number("oomer/memory_max_events"), 0);

    // dd fills a 64 MiB buffer in a 32 MiB cgroup.
    oomer.oom_kill_a_dd();

    // Nothing runs in the cgroup any more: the kernel's counts are still.
    let kills = kernel_event(&oomer, "oom_kill");
    assert!(kills >= 1, "the kernel counted no OOM kill");
    assert_eq!(daemon.number("oomer/memory_oom_kills"), kills);
    let max = kernel_event(&oomer, "max");
    assert!(max >= 1, "the kernel counted no charge at the limit");
    assert_eq!(daemon.number("oomer/memory_max_events"), max);
    if oomer.is_v1(Controller::Memory) {
        for file in [
            "memory_oom_events",
            "memory_high_events",
            "memory_low_events",
        ] {
            assert!(
                !daemon.path(&format!("oomer/{file}")).exists(),
                "{file} on v1"
            );
        }
    } else {
        let ooms = kernel_event(&oomer, "oom");
        assert!(ooms >= 1, "memory.events counted no oom");
        assert_eq!(daemon.number("oomer/memory_oom_events"), ooms);
        assert_eq!(daemon.number("oomer/memory_high_events"), 0);
        let events = oomer.read(Controller::Memory, "memory.events");
        match events.contains("oom_group_kill ") {
            true => assert_eq!(daemon.number("oomer/memory_oom_group_kills"), 0),
            false => assert!(!daemon.path("oomer/memory_oom_group_kills").exists()),
        }
    }
    // The peak reached the limit and stayed there.
    match kernel_peak(&oomer) {
        Some(peak) => {
            assert!((30 * MIB..=32 * MIB).contains(&peak), "kernel peak {peak}");
            assert_eq!(daemon.number("oomer/memory_peak"), peak);
        }
        None => assert!(!daemon.path("oomer/memory_peak").exists()),
    }
}

/// Pushed against its limit, a container shows the kernel's events and
/// memory pressure. On the v2 memory controller (the VM guests) that is
/// memory.high: anonymous memory over it is reclaimed and throttled, `high`
/// events and stalls without any kill. cgroup v1 has no memory.high: its
/// equivalent is the hard limit, met by a reader of page cache, which
/// reclaim frees (charges fail at the limit: failcnt, our `max`), with the
/// stalls in the v2 tree's memory.pressure (hybrid).
#[test]
fn pushed_against_its_limit_it_shows_events_and_memory_pressure() {
    require!("stress-ng");
    let parent = Cgroup::parent("press");
    let mut pushed = parent.child("pushed");
    crate::require_host!(pushed.pressure_missing());
    let v1 = pushed.is_v1(Controller::Memory);
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let stalled = |cg: &Cgroup| cg.pressure("memory.pressure", "some").unwrap();
    let event = if v1 { "max" } else { "high" };
    let file = if v1 {
        "memory_max_events"
    } else {
        "memory_high_events"
    };

    if v1 {
        pushed.limit_memory(32 * MIB);
        // Four times the limit, of clean cache.
        pushed.read_through_page_cache(128);
        assert_eq!(kernel_event(&pushed, "oom_kill"), 0);
    } else {
        pushed.write(Controller::Memory, "memory.high", &(32 * MIB).to_string());
        pushed.spawn(Command::new("stress-ng").args([
            "--vm",
            "1",
            "--vm-bytes",
            "64M",
            "--vm-keep",
        ]));
        assert!(
            eventually(Duration::from_secs(30), || kernel_event(&pushed, event) > 0
                && stalled(&pushed) > 0),
            "no high events or memory stalls: {}",
            pushed.read(Controller::Memory, "memory.events")
        );
    }
    // Read between two reads of the kernel's (still rising on v2).
    let before = (kernel_event(&pushed, event), stalled(&pushed));
    let ours = (
        daemon.number(&format!("pushed/{file}")),
        daemon.number("pushed/memory_pressure_some_usec"),
    );
    let after = (kernel_event(&pushed, event), stalled(&pushed));
    assert!(
        before.0 <= ours.0 && ours.0 <= after.0 && ours.0 > 0,
        "{file}: {} <= {} <= {}",
        before.0,
        ours.0,
        after.0
    );
    assert!(
        before.1 <= ours.1 && ours.1 <= after.1 && ours.1 > 0,
        "memory_pressure_some_usec: {} <= {} <= {}",
        before.1,
        ours.1,
        after.1
    );
    let full = daemon.number("pushed/memory_pressure_full_usec");
    assert!(full <= pushed.pressure("memory.pressure", "full").unwrap());
    assert_eq!(daemon.number("pushed/memory_oom_kills"), 0);
    if !v1 {
        // memory.high throttles, it never fails a charge: no max events.
        assert_eq!(daemon.number("pushed/memory_max_events"), 0);
        assert!(daemon.number("pushed/memory_peak") >= 32 * MIB);
    }
}

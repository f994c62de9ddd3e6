//! CPU: a busy loop reads one core, a half-core quota reads half.

use std::time::Duration;

use cgmetric::cgroup::Controller;

use crate::require;
use crate::support::{cpu_time_outside, eventually, heavy_turn, Cgroup, Daemon};

/// Lets a workload run long enough for a full window behind the read.
const WARM_UP: Duration = Duration::from_millis(2500);

fn within(value: u64, expected: u64, percent: u64) -> bool {
    value.abs_diff(expected) * 100 <= expected * percent
}

#[test]
fn one_busy_loop_is_one_core() {
    require!();
    let _turn = heavy_turn();
    let parent = Cgroup::parent("cpu");
    let mut burner = parent.child("burner");
    burner.spawn_burner();
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    std::thread::sleep(WARM_UP);

    let kernel_usec = |cg: &Cgroup| match cg.is_v1(Controller::Cpuacct) {
        true => {
            cg.read(Controller::Cpuacct, "cpuacct.usage")
                .trim()
                .parse::<u64>()
                .unwrap()
                / 1000
        }
        false => cg.stat(Controller::Cpu, "cpu.stat", "usage_usec"),
    };
    // The first rate read waits one window and measures over it; the
    // kernel's own rate over a span enclosing that window is the truth. (On
    // bare metal that is one core; a VM's vCPU loses time to its host.)
    let (started, usec_before) = (std::time::Instant::now(), kernel_usec(&burner));
    let millicores = daemon.number("burner/cpu_millicores");
    let kernel_millicores =
        (kernel_usec(&burner) - usec_before) * 1000 / started.elapsed().as_micros() as u64;
    assert!(
        kernel_millicores >= 800,
        "the busy loop ran only {kernel_millicores} millicores"
    );
    assert!(
        within(millicores, kernel_millicores, 10),
        "cpu_millicores {millicores}, the kernel's {kernel_millicores} ±10%"
    );

    // The counter agrees with the kernel's, read just before and after.
    let before = kernel_usec(&burner);
    let ours = daemon.number("burner/cpu_usage_usec");
    let after = kernel_usec(&burner);
    assert!(
        before <= ours && ours <= after,
        "{before} <= {ours} <= {after}"
    );
    let user = daemon.number("burner/cpu_user_usec");
    let system = daemon.number("burner/cpu_system_usec");
    // user + system comes from tick sampling on v1: close to usage, not equal.
    assert!(
        within(user + system, ours, 10),
        "user {user} + system {system} vs usage {ours}"
    );
    assert_eq!(daemon.read("burner/cpu_limit_millicores"), "max\n");
}

#[test]
fn half_core_quota_is_half_a_core() {
    require!();
    let _turn = heavy_turn();
    let parent = Cgroup::parent("quota");
    let mut limited = parent.child("limited");
    if limited.is_v1(Controller::Cpu) {
        limited.write(Controller::Cpu, "cpu.cfs_period_us", "100000");
        limited.write(Controller::Cpu, "cpu.cfs_quota_us", "50000");
    } else {
        limited.write(Controller::Cpu, "cpu.max", "50000 100000");
    }
    // Two busy loops: without the quota they would take two cores.
    limited.spawn_burner();
    limited.spawn_burner();
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    std::thread::sleep(WARM_UP);

    assert_eq!(daemon.number("limited/cpu_limit_millicores"), 500);
    let millicores = daemon.number("limited/cpu_millicores");
    assert!(
        within(millicores, 500, 10),
        "cpu_millicores {millicores}, expected 500 ±10%"
    );
    assert!(daemon.number("limited/cpu_nr_throttled") > 0);
    assert!(daemon.number("limited/cpu_throttled_usec") > 0);
    let periods = daemon.number("limited/cpu_nr_periods");
    assert!(periods >= 20, "{periods} CFS periods in 2.5 s");
}

#[test]
fn idle_container_reads_zero_and_rate_reads_are_fast_after_the_first() {
    require!();
    let parent = Cgroup::parent("idle");
    let mut idle = parent.child("idle");
    idle.spawn(std::process::Command::new("sleep").arg("600"));
    let glob = format!("{}/*", parent.relative);
    // A long window, so that "waited for a window" and "answered from the
    // sampler" stay apart however loaded the machine is (an emulated VM
    // running the churn test beside this one took 2 s for a plain read).
    let window = Duration::from_secs(5);
    let daemon = Daemon::start(&["--cgroup", &glob, "--window", "5s"]);
    let started = std::time::Instant::now();
    assert!(daemon.number("idle/cpu_millicores") <= 10);
    // The first read measured over the window...
    assert!(started.elapsed() >= window);
    // ...then the values it recorded are the next reads' references: no
    // read waits a window again.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        assert!(daemon.number("idle/cpu_millicores") <= 10);
        assert!(
            started.elapsed() < window,
            "a later read waited {:?}",
            started.elapsed()
        );
    }
}

/// A scrape with a deadline must not wait for containers that came since
/// the previous one: with churn, one comes before nearly every scrape.
#[test]
fn a_scrape_never_waits_for_containers_found_since_the_last() {
    require!();
    let _turn = heavy_turn();
    let parent = Cgroup::parent("scrapewait");
    let mut old = parent.child("old");
    old.spawn_burner();
    let glob = format!("{}/*", parent.relative);
    // A long window keeps "waited a window" and "did not" apart on a
    // loaded machine.
    let window = Duration::from_secs(5);
    let daemon = Daemon::start(&["--cgroup", &glob, "--window", "5s"]);
    let rate_of = |text: &str, name: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("cgmetric_cpu_usage_cores{")
                    && l.contains(&format!("name=\"{name}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    let started = std::time::Instant::now();
    let first = daemon.read("metrics.prom");
    // The first scrape is cold: it waits one window, for every container.
    assert!(started.elapsed() >= window);
    assert!(rate_of(&first, "old").is_some_and(|r| r > 0.2), "{first}");

    let mut new = parent.child("new");
    new.spawn_burner();
    assert!(
        eventually(Duration::from_secs(5), || daemon.path("new").exists()),
        "new did not appear"
    );
    let started = std::time::Instant::now();
    let second = daemon.read("metrics.prom");
    assert!(
        started.elapsed() < window,
        "a scrape waited {:?} for a newcomer",
        started.elapsed()
    );
    // The newcomer's counters are there at once, its rate on a later
    // scrape; the others' rates span the time since the first.
    assert!(
        second.contains("cgmetric_cpu_usage_seconds_total{")
            && second
                .lines()
                .any(|l| l.starts_with("cgmetric_cpu_usage_seconds_total{")
                    && l.contains("name=\"new\"")),
        "{second}"
    );
    assert_eq!(rate_of(&second, "new"), None, "{second}");
    assert!(rate_of(&second, "old").is_some_and(|r| r > 0.2), "{second}");
    std::thread::sleep(window);
    let third = daemon.read("metrics.prom");
    assert!(rate_of(&third, "new").is_some_and(|r| r > 0.2), "{third}");
    drop((old, new));
}

#[test]
fn rates_cost_nothing_between_reads() {
    require!();
    let parent = Cgroup::parent("ratecost");
    let boxes: Vec<Cgroup> = (0..200).map(|i| parent.child(&format!("r{i}"))).collect();
    let glob = format!("{}/*", parent.relative);
    // A short window: a daemon that sampled rates in the background would
    // read 200 containers' files every 50 ms.
    let daemon = Daemon::start(&["--cgroup", &glob, "--window", "100ms"]);
    let text = daemon.read("metric");
    assert!(text.contains("r199_cpu_millicores "), "{text}");
    let _ = daemon.read("metrics.prom");
    // Discovery's thread is left out: it wakes for every cgroup made on the
    // host (tests beside this one make hundreds), and a new cgroup anywhere
    // may be a runtime's container. Rates would be read on the threads that
    // serve reads, or on a thread of their own.
    let busy = || cpu_time_outside(daemon.server_pid(), "cgroup-watch");
    let before = busy();
    std::thread::sleep(Duration::from_secs(3));
    let idle = busy() - before;
    assert!(
        idle <= Duration::from_millis(20),
        "the daemon used {idle:?} of CPU in 3 s with no reads"
    );
    // The next scrape's rates span the 3 s since the last one.
    assert!(daemon.read("metric").contains("r0_cpu_millicores 0\n"));
    drop(boxes);
}

/// Two busy loops under a half-core quota wait for a CPU most of the time:
/// CPU pressure, as the kernel's cpu.pressure counts it. On a hybrid host
/// the quota is the v1 cpu controller's and the pressure file is the v2
/// tree's, which no controller is enabled in: PSI follows the tasks, so
/// the v1 throttling shows there too (measured on 6.18: some and full both
/// about 75% of the wall time, the share each task waits on its CPU).
#[test]
fn a_throttled_busy_loop_shows_cpu_pressure() {
    require!();
    let _turn = heavy_turn();
    let parent = Cgroup::parent("cpupress");
    let mut limited = parent.child("limited");
    crate::require_host!(limited.pressure_missing());
    if limited.is_v1(Controller::Cpu) {
        limited.write(Controller::Cpu, "cpu.cfs_period_us", "100000");
        limited.write(Controller::Cpu, "cpu.cfs_quota_us", "50000");
    } else {
        limited.write(Controller::Cpu, "cpu.max", "50000 100000");
    }
    limited.spawn_burner();
    limited.spawn_burner();
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let some = |cg: &Cgroup| cg.pressure("cpu.pressure", "some").unwrap();

    let (started, before) = (std::time::Instant::now(), some(&limited));
    std::thread::sleep(Duration::from_secs(2));
    let share = (some(&limited) - before) * 100 / started.elapsed().as_micros() as u64;
    // Half a core for two loops: each waits three quarters of the time.
    assert!(
        share >= 25,
        "cpu.pressure some rose by only {share}% of the wall time"
    );

    let before = some(&limited);
    let ours = daemon.number("limited/cpu_pressure_some_usec");
    let after = some(&limited);
    assert!(
        before <= ours && ours <= after,
        "cpu_pressure_some_usec: {before} <= {ours} <= {after}"
    );
    // A cgroup's CPU `full` exists since 5.13.
    match limited.pressure("cpu.pressure", "full") {
        Some(_) => {
            let ours = daemon.number("limited/cpu_pressure_full_usec");
            let after = limited.pressure("cpu.pressure", "full").unwrap();
            assert!(
                ours > 0 && ours <= after,
                "cpu_pressure_full_usec {ours}, kernel {after}"
            );
        }
        None => assert!(!daemon.path("limited/cpu_pressure_full_usec").exists()),
    }
    // The other pressure files read too, no more than the kernel's.
    for resource in ["memory", "io"] {
        for line in ["some", "full"] {
            let ours = daemon.number(&format!("limited/{resource}_pressure_{line}_usec"));
            let after = limited
                .pressure(&format!("{resource}.pressure"), line)
                .unwrap();
            assert!(ours <= after, "{resource} {line}: {ours} > {after}");
        }
    }
}

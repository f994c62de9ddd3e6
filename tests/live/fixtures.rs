//! The pure v2 and pure v1 paths, through the real FUSE mount: the daemon
//! reads the fixture trees (`--cgroup-root`) as it would a host's cgroupfs.

use std::path::Path;

use crate::require;
use crate::support::Daemon;

fn fixture_daemon(tree: &str) -> Daemon {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(tree);
    // A fixture is not cgroupfs: nothing to attach eBPF programs to.
    Daemon::start(&[
        "--cgroup-root",
        root.to_str().unwrap(),
        "--cgroup",
        "tenants/*",
        "--no-ebpf",
    ])
}

#[test]
fn pure_v2_host() {
    require!();
    let d = fixture_daemon("v2");
    assert!(d.stderr().contains("unified (cgroup v2)"), "{}", d.stderr());
    assert_eq!(d.read("alpha/cpu_usage_usec"), "2500000\n");
    assert_eq!(d.read("alpha/cpu_throttled_usec"), "350000\n");
    assert_eq!(d.read("alpha/cpu_limit_millicores"), "500\n");
    assert_eq!(d.read("alpha/memory_working_set"), "69206016\n");
    assert_eq!(d.read("alpha/memory_swap"), "1048576\n");
    assert_eq!(d.read("alpha/memory_oom_kills"), "1\n");
    assert_eq!(d.read("alpha/io_write_ops"), "1024\n");
    assert_eq!(d.read("alpha/memory_limit"), "max\n");
    assert_eq!(d.read("beta/memory_limit"), "268435456\n");
    assert!(!d.path("alpha/memory_pgpgin").exists(), "v2 has no pgpgin");
    assert_eq!(d.read("alpha/memory_peak"), "75497472\n");
    assert_eq!(d.read("alpha/memory_high_events"), "12\n");
    assert_eq!(d.read("alpha/memory_max_events"), "3\n");
    assert_eq!(d.read("alpha/memory_oom_group_kills"), "0\n");
    assert_eq!(d.read("alpha/cpu_pressure_some_usec"), "1500000\n");
    assert_eq!(d.read("alpha/memory_pressure_full_usec"), "25000\n");
    assert_eq!(d.read("alpha/io_pressure_some_usec"), "3000\n");
    // An older kernel's files: no peak, no group kills, no cgroup CPU full.
    for absent in [
        "memory_peak",
        "memory_oom_group_kills",
        "cpu_pressure_full_usec",
    ] {
        assert!(!d.path(&format!("beta/{absent}")).exists(), "{absent}");
    }
    assert_eq!(d.read("beta/cpu_pressure_some_usec"), "10\n");
    let prom = d.read("metrics.prom");
    for family in [
        "# TYPE cgmetric_cpu_pressure_some_seconds_total counter",
        "# TYPE cgmetric_memory_high_events_total counter",
        "# TYPE cgmetric_memory_peak_bytes gauge",
        "cgmetric_io_pressure_full_seconds_total{container=\"alpha\"",
    ] {
        assert!(prom.contains(family), "{family}:\n{prom}");
    }
    // Malformed pressure and peak files are EIO too.
    for file in [
        "memory_peak",
        "cpu_pressure_some_usec",
        "io_pressure_full_usec",
    ] {
        let err = std::fs::read_to_string(d.path(&format!("broken/{file}"))).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{file}");
    }
    assert!(
        !d.path("beta/cpu_nr_periods").exists(),
        "beta's cpu controller is off"
    );
    // A malformed source is EIO for its file and logged; the rest reads.
    let err = std::fs::read_to_string(d.path("broken/memory_usage")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(d.read("broken/pids_current"), "5\n");
    assert!(
        d.stderr().contains("memory.current: not a number"),
        "{}",
        d.stderr()
    );
}

#[test]
fn pure_v1_host() {
    require!();
    let d = fixture_daemon("v1");
    assert!(d.stderr().contains("legacy (cgroup v1)"), "{}", d.stderr());
    assert_eq!(d.read("alpha/cpu_usage_usec"), "2500000\n");
    assert_eq!(d.read("alpha/cpu_throttled_usec"), "350000\n");
    assert_eq!(d.read("alpha/cpu_limit_millicores"), "500\n");
    assert_eq!(d.read("alpha/memory_limit"), "max\n");
    assert_eq!(d.read("alpha/memory_pgpgin"), "20000\n");
    assert_eq!(d.read("alpha/memory_oom_kills"), "2\n");
    assert_eq!(d.read("alpha/io_read_bytes"), "1052672\n");
    assert_eq!(d.read("alpha/pids_limit"), "max\n");
    assert_eq!(d.read("alpha/memory_peak"), "75497472\n");
    assert_eq!(d.read("alpha/memory_max_events"), "3\n");
    // Every catalogue row has a v1 source, network aside, except pressure
    // (a v2 file) and the memory.events counts v1 does not keep.
    let v2_only = |file: &str| {
        file.contains("_pressure_")
            || matches!(
                file,
                "memory_low_events"
                    | "memory_high_events"
                    | "memory_oom_events"
                    | "memory_oom_group_kills"
            )
    };
    let mut alpha: Vec<String> = d
        .read("metric")
        .lines()
        .filter_map(|l| {
            l.strip_prefix("alpha_")?
                .split(' ')
                .next()
                .map(String::from)
        })
        .collect();
    alpha.sort();
    let mut cgroupfs_rows: Vec<String> = cgmetric::metrics::METRICS
        .iter()
        .filter(|m| !m.file.starts_with("net_") && !v2_only(m.file))
        .map(|m| m.file.to_string())
        .collect();
    cgroupfs_rows.sort();
    assert_eq!(alpha, cgroupfs_rows);
}

#[test]
fn hybrid_host() {
    require!();
    let d = fixture_daemon("hybrid");
    assert!(d.stderr().contains("hybrid"), "{}", d.stderr());
    // CPU and memory from the v1 controllers...
    assert_eq!(d.read("alpha/cpu_usage_usec"), "7000\n");
    assert_eq!(d.read("alpha/memory_peak"), "8192\n");
    assert_eq!(d.read("alpha/memory_max_events"), "0\n");
    assert!(!d.path("alpha/memory_high_events").exists());
    // ...pressure from the v2 tree, where no controller is enabled.
    assert_eq!(d.read("alpha/cpu_pressure_some_usec"), "2617677\n");
    assert_eq!(d.read("alpha/cpu_pressure_full_usec"), "2617677\n");
    assert_eq!(d.read("alpha/memory_pressure_some_usec"), "71447\n");
    assert_eq!(d.read("alpha/io_pressure_full_usec"), "4\n");
}

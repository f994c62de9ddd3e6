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
    // Every catalogue row has a v1 source, network aside.
    let alpha_lines = d
        .read("metric")
        .lines()
        .filter(|l| l.starts_with("alpha_"))
        .count();
    let cgroupfs_rows = cgmetric::metrics::METRICS
        .iter()
        .filter(|m| !m.file.starts_with("net_"))
        .count();
    assert_eq!(alpha_lines, cgroupfs_rows);
}

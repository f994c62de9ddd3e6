//! `metrics.prom` against the real exposition-format linter.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::require;
use crate::support::{Cgroup, Daemon};

#[test]
fn promtool_accepts_metrics_prom() {
    require!("promtool");
    let parent = Cgroup::parent("prom");
    let mut a = parent.child("alpha");
    let _b = parent.child("beta \"quoted\"");
    a.spawn(Command::new("sleep").arg("600"));
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let text = daemon.read("metrics.prom");

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
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}\n{text}"
    );

    // Every container sample carries the container label (the daemon's own
    // cgmetric_ebpf_* series describe the programs, not a container); label
    // values are escaped.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("cgmetric_ebpf_"))
    {
        assert!(line.starts_with("cgmetric_"), "{line}");
        assert!(line.contains("{container=\""), "{line}");
    }
    assert!(
        text.contains("cgmetric_pids{container=\"alpha\","),
        "{text}"
    );
    assert!(text.contains("container=\"beta \\\"quoted\\\"\""), "{text}");
    assert_eq!(text.matches("# TYPE cgmetric_pids gauge\n").count(), 1);
    assert!(text.contains("# TYPE cgmetric_cpu_usage_seconds_total counter\n"));
    assert!(
        text.contains("cgmetric_network_transmit_bytes_total{container=\"alpha\","),
        "{text}"
    );
    assert!(
        text.contains("cgmetric_ebpf_uncounted_total{reason=\"traffic_map_full\"} 0\n"),
        "{text}"
    );
}

//! `metrics.prom` against the real exposition-format linter, and through
//! node_exporter's textfile collector.

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

    let (passed, complaints) = crate::support::promtool_check(&text);
    assert!(
        passed && complaints.trim().is_empty(),
        "promtool: {complaints}\n{text}"
    );

    // Every container sample carries the container label (the daemon's own
    // cgmetric_ebpf_* and cgmetric_ledger_* series describe the programs
    // and the ledger, not a container); label values are escaped.
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && !l.starts_with("cgmetric_ebpf_")
            && !l.starts_with("cgmetric_ledger_")
    }) {
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
    assert!(
        text.contains("# TYPE cgmetric_ledger_write_errors_total counter\ncgmetric_ledger_write_errors_total 0\n"),
        "{text}"
    );
}

/// node_exporter's textfile collector pointed at the mountpoint, with no
/// glue: every container's series, and no scrape error.
#[test]
fn node_exporter_exports_every_container_from_the_mountpoint() {
    require!("prometheus-node-exporter");
    let parent = Cgroup::parent("nodeexp");
    let _a = parent.child("alpha");
    let _b = parent.child("beta");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut exporter = Command::new("prometheus-node-exporter")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--collector.textfile.directory={}",
            daemon.mountpoint.display()
        ))
        .args(["--collector.disable-defaults", "--collector.textfile"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let scrape = || -> Option<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut stream, &mut body).ok()?;
        Some(body)
    };
    let mut body = None;
    assert!(
        crate::support::eventually(std::time::Duration::from_secs(10), || {
            body = scrape();
            body.is_some()
        }),
        "node_exporter did not answer"
    );
    let _ = exporter.kill();
    let _ = exporter.wait();
    let body = body.unwrap();
    assert!(body.contains("node_textfile_scrape_error 0"), "{body}");
    for container in ["alpha", "beta"] {
        assert!(
            body.lines().any(|l| l.starts_with("cgmetric_pids{")
                && l.contains(&format!("container=\"{container}\""))),
            "{container} missing:\n{body}"
        );
    }
    assert!(
        body.contains("cgmetric_network_transmit_bytes_total{"),
        "{body}"
    );
}

#[test]
fn the_example_alert_rules_are_valid() {
    require!("promtool");
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/prometheus/cgmetric-alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");

    // The rules' own unit tests: two pods' containers of one name on one
    // node, which the joins must keep apart.
    let tests = rules.with_file_name("cgmetric-alerts.test.yml");
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("SUCCESS"), "{said}");
}

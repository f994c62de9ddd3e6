//! `metrics.prom` against the real exposition-format linter, and through
//! node_exporter's textfile collector.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cgmetric::cgroup::Controller;

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
    // cgmetric_ebpf_*, cgmetric_aggregate_* and cgmetric_ledger_* series
    // describe the programs, the reads and the ledger, not a container);
    // label values are escaped.
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && !l.starts_with("cgmetric_ebpf_")
            && !l.starts_with("cgmetric_aggregate_")
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

/// The cost of a scrape by source, as `metrics.prom` reports it: every
/// source is charged, and together they are no more than the CPU time the
/// kernel charged the serving process over the same reads.
#[test]
fn a_scrape_reports_what_reads_cost_by_source() {
    require!();
    let parent = Cgroup::parent("spent");
    let boxes: Vec<Cgroup> = (0..100).map(|i| parent.child(&format!("s{i}"))).collect();
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--window", "100ms"]);
    let spent = |text: &str| -> (u64, [f64; 4]) {
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
                .parse::<f64>()
                .unwrap()
        };
        (
            value("cgmetric_aggregate_reads_total") as u64,
            ["cgroup_walk", "cgroup_files", "ebpf", "render"].map(|source| {
                value(&format!(
                    "cgmetric_aggregate_cpu_seconds_total{{source=\"{source}\"}}"
                ))
            }),
        )
    };
    // The first read primes the rates; what is measured comes after it.
    let (reads0, before) = spent(&daemon.read("metrics.prom"));
    let cpu0 = crate::support::cpu_time_outside(daemon.server_pid(), "cgroup-watch");
    for _ in 0..20 {
        let _ = daemon.read("metric");
    }
    let (reads1, after) = spent(&daemon.read("metrics.prom"));
    let cpu1 = crate::support::cpu_time_outside(daemon.server_pid(), "cgroup-watch");
    // Each read counts once (a stat that renders is a read too).
    assert!(reads1 - reads0 >= 21, "{reads0} -> {reads1}");
    let charged: Vec<f64> = (0..4).map(|i| after[i] - before[i]).collect();
    // The walk is charged only when it ran: it is skipped when the host
    // has many more cgroups than the aggregate has containers, as it may
    // while other tests make thousands (`walk::` checks that it runs).
    assert!(charged[1..].iter().all(|c| *c > 0.0), "{charged:?}");
    // Reading 100 containers' cgroup files costs more than looking them
    // up in the eBPF maps, and more than walking them.
    assert!(
        charged[1] > charged[2] && charged[1] > charged[0],
        "{charged:?}"
    );
    let sum: f64 = charged.iter().sum();
    // Thread CPU clocks and run times agree to the nanosecond; 5 ms of
    // slack for the clock reads themselves.
    let process = (cpu1 - cpu0).as_secs_f64();
    assert!(
        sum <= process + 0.005,
        "charged {sum:.4} s by source ({charged:?}), the process used {process:.4} s"
    );
    drop(boxes);
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
    let rules = crate::support::shipped_rules();
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

/// The shipped cost and anomaly rules: valid, their own tests pass, and
/// every cgmetric family they read is one a daemon with `--net-class`
/// serves (a renamed family would leave the rules silently empty).
#[test]
fn the_cost_rules_read_families_a_daemon_serves() {
    require!("promtool");
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/prometheus/cgmetric-cost.yml");
    let tests = rules.with_file_name("cgmetric-cost.test.yml");
    for (command, file) in [("check", &rules), ("test", &tests)] {
        let out = Command::new("promtool")
            .args([command, "rules"])
            .arg(file)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && said.contains("SUCCESS"), "{said}");
    }

    let parent = Cgroup::parent("cost");
    let mut a = parent.child("alpha");
    a.spawn(Command::new("sleep").arg("600"));
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--net-class", "cluster=10.0.0.0/8"]);
    let prom = daemon.read("metrics.prom");
    let text = std::fs::read_to_string(&rules).unwrap();
    // The families read (counters); recorded names hold `:`.
    let read: std::collections::BTreeSet<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("cgmetric_") && w.ends_with("_total"))
        .collect();
    assert!(read.len() >= 2, "{read:?}");
    for family in read {
        assert!(
            prom.contains(&format!("# TYPE {family} counter")),
            "{family} is not served:\n{prom}"
        );
    }
    // The classes the prices name are the daemon's own and a configured one.
    for class in ["external", "cluster"] {
        assert!(prom.contains(&format!("class=\"{class}\"")), "{prom}");
    }
}

/// One Kubernetes container as containerd's CRI plugin leaves it: a cgroup
/// `kubepods…/pod<uid>/<id>` and an OCI bundle whose annotations name it.
struct PodContainer {
    _cgroup: crate::support::Nest,
    namespace: String,
    pod: String,
    /// Its directory in the tree: `<namespace>_<pod>_app`.
    name: String,
}

fn pod_container(
    kubepods: &Cgroup,
    containerd_state: &std::path::Path,
    namespace: &str,
    start: impl FnOnce(&mut Cgroup),
) -> PodContainer {
    let (pod, id) = (crate::support::unique("api"), crate::support::hex_id());
    let mut cgroup = crate::support::Nest::new(kubepods, &format!("pod{pod}/{id}"));
    start(cgroup.leaf());
    let bundle = containerd_state
        .join("io.containerd.runtime.v2.task/k8s.io")
        .join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    let annotations = serde_json::json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-namespace": namespace,
        "io.kubernetes.cri.sandbox-name": pod,
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": "registry.example/shop/api:2",
    });
    std::fs::write(
        bundle.join("config.json"),
        serde_json::json!({"ociVersion": "1.1.0", "annotations": annotations}).to_string(),
    )
    .unwrap();
    PodContainer {
        _cgroup: cgroup,
        namespace: namespace.to_string(),
        name: format!("{namespace}_{pod}_app"),
        pod,
    }
}

/// The series of `text` that belong to the containers named `names`:
/// (series with the labels a scrape by a `cadvisor` job adds, value), and
/// each family's type.
fn scraped(text: &str, names: &[&str]) -> (Vec<(String, f64)>, HashMap<String, String>) {
    let mut types = HashMap::new();
    let mut series = Vec::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (family, kind) = declared.split_once(' ').unwrap();
            types.insert(family.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#')
            || !names
                .iter()
                .any(|n| line.contains(&format!("name=\"{n}\"")))
        {
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        let (family, labels) = name_labels.split_once('{').unwrap();
        let value: f64 = value.parse().unwrap();
        // The input series notation has no room for infinities; the
        // cgmetric_* families that are +Inf are no rule's input.
        if value.is_finite() {
            series.push((
                format!("{family}{{instance=\"node1\",job=\"cadvisor\",{labels}"),
                value,
            ));
        }
    }
    (series, types)
}

/// `--prometheus-names cadvisor` from a real daemon: `promtool check
/// metrics` accepts it, and `promtool test rules` runs kubernetes-mixin-style
/// rules (contrib/prometheus/cadvisor-compat-rules.yml: CPU usage, working
/// set over limit, CPUThrottlingHigh) over two scrapes of it, stretched
/// along their own slope to the 20 minutes the rules look at.
#[test]
fn cadvisor_names_serve_kubernetes_mixin_rules() {
    require!("promtool");
    let _turn = crate::support::heavy_turn();
    // Under a top-level cgroup whose name starts with "kubepods", as the
    // kubelet's do, so discovery takes it for Kubernetes'.
    let kubepods = Cgroup::top(&crate::support::unique("kubepods-cgmt"));
    kubepods.enable_controllers_below();
    let state = tempfile::tempdir().unwrap();
    let namespace = crate::support::unique("shop");
    // Throttled: a busy loop under a tenth of a core, 64 MiB of memory.
    let busy = pod_container(&kubepods, state.path(), &namespace, |c| {
        if c.is_v1(Controller::Cpu) {
            c.write(Controller::Cpu, "cpu.cfs_period_us", "100000");
            c.write(Controller::Cpu, "cpu.cfs_quota_us", "10000");
        } else {
            c.write(Controller::Cpu, "cpu.max", "10000 100000");
        }
        let limit = if c.is_v1(Controller::Memory) {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        c.write(Controller::Memory, limit, "67108864");
        c.spawn_burner();
    });
    // No limits, asleep.
    let idle = pod_container(&kubepods, state.path(), &namespace, |c| {
        c.spawn(Command::new("sleep").arg("600"));
    });
    let daemon = Daemon::start(&[
        "--containerd-state",
        state.path().to_str().unwrap(),
        "--prometheus-names",
        "cadvisor",
    ]);
    assert!(
        crate::support::eventually(Duration::from_secs(5), || daemon.path(&busy.name).exists()
            && daemon.path(&idle.name).exists()),
        "{} and {} not in the tree",
        busy.name,
        idle.name
    );

    let first = daemon.read("metrics.prom");
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let second = daemon.read("metrics.prom");
    let interval = started.elapsed().as_millis();

    let (passed, complaints) = crate::support::promtool_check(&second);
    assert!(
        passed && complaints.trim().is_empty(),
        "promtool: {complaints}\n{second}"
    );
    let labels = |c: &PodContainer| {
        format!(
            "container=\"app\",namespace=\"{}\",pod=\"{}\",name=\"{}\"",
            c.namespace, c.pod, c.name
        )
    };
    for wanted in [
        "# TYPE container_cpu_usage_seconds_total counter\n".to_string(),
        "# TYPE container_memory_working_set_bytes gauge\n".to_string(),
        format!("container_spec_memory_limit_bytes{{{},", labels(&busy)),
        format!("container_network_receive_bytes_total{{{},", labels(&idle)),
        format!("container_threads{{{},", labels(&idle)),
    ] {
        assert!(second.contains(&wanted), "{wanted} not in\n{second}");
    }
    // cAdvisor writes "no limit" as 0.
    assert!(
        second.lines().any(|l| l.starts_with(&format!(
            "container_spec_memory_limit_bytes{{{},",
            labels(&idle)
        )) && l.ends_with("} 0")),
        "{second}"
    );

    let names = [busy.name.as_str(), idle.name.as_str()];
    let (before, types) = scraped(&first, &names);
    let (after, _) = scraped(&second, &names);
    // 25 minutes of samples: counters go on at the slope of the two
    // scrapes, gauges stay as the second scrape found them.
    let samples = 25 * 60 * 1000 / interval + 1;
    let mut input = String::new();
    let mut value_of = HashMap::new();
    for (series, value) in &after {
        let family = &series[..series.find('{').unwrap()];
        let slope = match types.get(family).map(String::as_str) {
            Some("counter") => {
                let start = before.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
                let start = start.unwrap_or_else(|| panic!("{series} not in the first scrape"));
                input.push_str(&format!(
                    "      - series: '{series}'\n        values: '{start}+{}x{samples}'\n",
                    value - start
                ));
                continue;
            }
            _ => 0.0,
        };
        value_of.insert(series.clone(), *value);
        input.push_str(&format!(
            "      - series: '{series}'\n        values: '{value}+{slope}x{samples}'\n"
        ));
    }
    let gauge = |family: &str, c: &PodContainer| -> f64 {
        value_of
            .iter()
            .find(|(s, _)| {
                s.starts_with(&format!("{family}{{")) && s.contains(&format!("name=\"{}\"", c.name))
            })
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {family} for {}", c.name))
    };
    let ratio = gauge("container_memory_working_set_bytes", &busy)
        / gauge("container_spec_memory_limit_bytes", &busy);
    assert!(
        ratio > 0.0 && ratio < 1.0,
        "working set over limit: {ratio}"
    );

    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/prometheus/cadvisor-compat-rules.yml");
    let k8s = |c: &PodContainer| {
        format!(
            "{{container=\"app\",namespace=\"{}\",pod=\"{}\"}}",
            c.namespace, c.pod
        )
    };
    // Written out, not with `\` line ends, which would eat the YAML's
    // indentation.
    let test = format!(
        "rule_files:
  - {rules}
evaluation_interval: {interval}ms
tests:
  - interval: {interval}ms
    input_series:
{input}    promql_expr_test:
      - expr: node_namespace_pod_container:container_cpu_usage_seconds_total:sum_rate5m > bool 0.05
        eval_time: 10m
        exp_samples:
          - labels: '{busy_labels}'
            value: 1
          - labels: '{idle_labels}'
            value: 0
      - expr: namespace_pod_container:container_memory_working_set_bytes:ratio_limit
        eval_time: 10m
        exp_samples:
          - labels: 'namespace_pod_container:container_memory_working_set_bytes:ratio_limit{busy_labels}'
            value: {ratio:?}
    alert_rule_test:
      - eval_time: 20m
        alertname: CPUThrottlingHigh
        exp_alerts:
          - exp_labels:
              severity: info
              instance: node1
              container: app
              namespace: {namespace}
              pod: {busy_pod}
            exp_annotations:
              summary: Processes experience elevated CPU throttling.
              description: {namespace}/{busy_pod}/app is throttled.
",
        rules = rules.display(),
        busy_labels = k8s(&busy),
        idle_labels = k8s(&idle),
        busy_pod = busy.pod,
    );
    let dir = tempfile::tempdir().unwrap();
    let test_file = dir.path().join("cadvisor-compat.test.yml");
    std::fs::write(&test_file, &test).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("SUCCESS"),
        "{said}\n{test}"
    );
}

//! A real Prometheus end to end: Debian's `prometheus` server on loopback
//! scrapes node_exporter, whose textfile collector reads the daemon's
//! mountpoint, every second, and evaluates the shipped alert rules
//! (`contrib/prometheus/cgmetric-alerts.yml`) every second. Containers held
//! at their CPU quota and near their memory limit make the CPU and memory
//! alerts fire; `rate()` of the network counters is the traffic sent.
//!
//! The rules are loaded from a copy whose `for:` clauses read [`HOLD`]
//! instead of minutes; every expression, ranges included, is the shipped
//! one. A `[5m]` or `[10m]` range needs no rewriting: `rate()` answers as
//! soon as the range holds two samples, a second after the first scrape.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use cgmetric::cgroup::Controller;
use serde_json::Value;

use crate::require;
use crate::support::{
    eventually, finish, finish_client, heavy_turn, sample_value, shipped_rules_holding_for,
    tcp_peer, Cgroup, Daemon, Prometheus,
};

/// How long an alert's condition must hold before it fires: several
/// evaluations (one a second), so a firing alert's condition held at each.
const HOLD: &str = "3s";

/// How long a test waits for an alert: rules fire after two scrapes and
/// [`HOLD`]; the rest is room for a loaded machine, and for the emulated
/// VM guests, whose stalled vCPUs leave some seconds of a throttled
/// container short of its quota (usage under 0.95 of the limit), so that
/// `ContainerCPUOverLimit` holds for [`HOLD`] only after a while.
const ALERT_DEADLINE: Duration = Duration::from_secs(120);

const MIB: u64 = 1 << 20;

/// The daemon over `parent`'s containers, and Prometheus over the daemon
/// with the shipped rules. Fields drop in order: Prometheus, then the
/// daemon, then the rules' directory.
struct Stack {
    prometheus: Prometheus,
    daemon: Daemon,
    _rules: tempfile::TempDir,
}

impl Stack {
    fn over(parent: &Cgroup) -> Stack {
        let glob = format!("{}/*", parent.relative);
        // A rate window well inside the one-second scrape timeout: the
        // first aggregate read waits one window (later ones never do). With
        // the default 1 s that scrape times out, and Prometheus marks every
        // series of the target stale. Rates still span the second between
        // two scrapes.
        let daemon = Daemon::start(&["--cgroup", &glob, "--window", "250ms"]);
        let rules_dir = tempfile::tempdir().unwrap();
        let rules = shipped_rules_holding_for(rules_dir.path(), HOLD);
        let prometheus = Prometheus::scraping(&daemon, &rules);
        Stack {
            prometheus,
            daemon,
            _rules: rules_dir,
        }
    }

    /// Waits until each of `alerts` fires for `container`, and returns the
    /// active alerts then. On timeout, says what Prometheus and the daemon
    /// showed.
    fn wait_firing(&self, container: &str, alerts: &[&str]) -> Vec<Value> {
        let started = Instant::now();
        let mut active = Vec::new();
        let all_firing = eventually(ALERT_DEADLINE, || {
            active = self.prometheus.alerts();
            alerts
                .iter()
                .all(|alert| state(&active, alert, container) == Some("firing"))
        });
        eprintln!(
            "{alerts:?} firing for {container} after waiting {:?}",
            started.elapsed()
        );
        assert!(
            all_firing,
            "{alerts:?} not all firing for {container} after {:?}\nactive: {active:#?}\nrules: {:#?}\n\
             metrics.prom:\n{}\n{}",
            started.elapsed(),
            self.prometheus.rules(),
            self.daemon.read("metrics.prom"),
            self.prometheus.logs()
        );
        active
    }

    /// Every loaded rule evaluates without an error, both as the rule
    /// manager last ran it and as a query now (which does not wait for the
    /// next evaluation).
    fn assert_rules_evaluate(&self) {
        let rules = self.prometheus.rules();
        assert_eq!(rules.len(), 6, "{rules:#?}");
        for rule in &rules {
            assert_eq!(rule["health"], "ok", "{rule:#}");
            let expr = rule["query"].as_str().unwrap();
            if let Err(e) = self.prometheus.try_query(expr, None) {
                panic!(
                    "{}: {e}\n{}",
                    rule["name"],
                    self.daemon.read("metrics.prom")
                );
            }
        }
    }

    /// The latest value of the one series `selector` selects, scraped in
    /// the last 10 s (a scrape that failed since does not hide it).
    fn value(&self, selector: &str) -> f64 {
        let promql = format!("last_over_time({selector}[10s])");
        let result = self.prometheus.query(&promql, None);
        assert_eq!(
            result.len(),
            1,
            "{promql}: {result:#?}\nmetrics.prom:\n{}\n{}",
            self.daemon.read("metrics.prom"),
            self.prometheus.logs()
        );
        sample_value(&result[0]["value"])
    }
}

/// The state (`pending`, `firing`) of `alert` for the container named
/// `container` (the `name` label, its directory's name), if active.
fn state<'a>(active: &'a [Value], alert: &str, container: &str) -> Option<&'a str> {
    find(active, alert, container).and_then(|a| a["state"].as_str())
}

fn find<'a>(active: &'a [Value], alert: &str, container: &str) -> Option<&'a Value> {
    active
        .iter()
        .find(|a| a["labels"]["alertname"] == alert && a["labels"]["name"] == container)
}

/// The value an active alert's expression had at its last evaluation.
fn alert_value(active: &[Value], alert: &str, container: &str) -> f64 {
    find(active, alert, container)
        .and_then(|a| a["value"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no value for {alert} on {container}: {active:#?}"))
}

fn limit_cpu(cg: &Cgroup, quota_usec: u64, period_usec: u64) {
    if cg.is_v1(Controller::Cpu) {
        cg.write(
            Controller::Cpu,
            "cpu.cfs_period_us",
            &period_usec.to_string(),
        );
        cg.write(Controller::Cpu, "cpu.cfs_quota_us", &quota_usec.to_string());
    } else {
        cg.write(
            Controller::Cpu,
            "cpu.max",
            &format!("{quota_usec} {period_usec}"),
        );
    }
}

/// Readings of the kernel's throttling counters (`nr_periods`,
/// `nr_throttled` of cpu.stat), taken every 100 ms on a thread of their own
/// until stopped.
struct ThrottleLog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Log, Log)>,
}

impl ThrottleLog {
    fn start(cg: &Cgroup) -> ThrottleLog {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stat = cg.dir(Controller::Cpu).join("cpu.stat");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut periods, mut throttled) = (Vec::new(), Vec::new());
            // One reading more once stopped: the log then reaches past
            // every sample the test asked Prometheus about before stopping
            // it, however late this thread last woke.
            loop {
                let done = stopped.load(Ordering::Relaxed);
                let before = unix_now();
                let text = std::fs::read_to_string(&stat).unwrap();
                let at = (before + unix_now()) / 2.0;
                let key = |key: &str| -> u64 {
                    text.lines()
                        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
                        .unwrap_or_else(|| panic!("no {key} in {text}"))
                };
                periods.push((at, key("nr_periods")));
                throttled.push((at, key("nr_throttled")));
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (periods, throttled)
        });
        ThrottleLog { stop, thread }
    }

    /// The periods and the throttled periods logged.
    fn stop(self) -> (Log, Log) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn cpu_alerts_fire_for_a_container_held_at_its_quota() {
    require!("prometheus", "prometheus-node-exporter");
    let _turn = heavy_turn();
    let parent = Cgroup::parent("promcpu");
    // Two busy loops under a fifth of a core: every period runs out of
    // quota, even when other work on the machine takes most of the CPUs.
    // Short periods (10 ms) make a scrape interval hold a hundred of them,
    // so usage over one is the quota to within a percent, not a tenth.
    let mut throttled = parent.child("throttled");
    limit_cpu(&throttled, 2_000, 10_000);
    throttled.spawn_burner();
    throttled.spawn_burner();
    // A sleeper with a quota: both rules see its series, neither fires.
    let mut idle = parent.child("idle");
    limit_cpu(&idle, 100_000, 100_000);
    idle.spawn(Command::new("sleep").arg("600"));
    let log = ThrottleLog::start(&throttled);

    let stack = Stack::over(&parent);
    let active = stack.wait_firing(
        "throttled",
        &["ContainerCPUThrottled", "ContainerCPUOverLimit"],
    );

    // The throttled share of periods, as the shipped expression gives it
    // now, is the kernel's between the instants of the first and last
    // samples it spans (both rates extrapolate alike, so their ratio is
    // that of the counters' increases over the samples).
    let at = unix_now();
    let rule = |name: &str| -> String {
        let rules = stack.prometheus.rules();
        let rule = rules.iter().find(|r| r["name"] == name).unwrap();
        rule["query"].as_str().unwrap().to_string()
    };
    let share = stack
        .prometheus
        .query(&rule("ContainerCPUThrottled"), Some(at))
        .iter()
        .find(|s| s["metric"]["name"] == "throttled")
        .map(|s| sample_value(&s["value"]))
        .unwrap_or_else(|| panic!("the throttling rule no longer holds"));
    let samples = stack.prometheus.query(
        "cgmetric_cpu_periods_total{name=\"throttled\"}[5m]",
        Some(at),
    );
    assert_eq!(samples.len(), 1, "{samples:#?}");
    let samples = samples[0]["values"].as_array().unwrap();
    let (first, last) = (
        samples[0][0].as_f64().unwrap(),
        samples[samples.len() - 1][0].as_f64().unwrap(),
    );
    let (periods, throttled_periods) = log.stop();
    let kernel_share = (interpolate(&throttled_periods, last)
        - interpolate(&throttled_periods, first))
        / (interpolate(&periods, last) - interpolate(&periods, first));
    // Tolerance: node_exporter reads the file a little after the instant a
    // scrape is stamped with; over the seconds spanned, at a hundred
    // periods a second, that is a few periods out of hundreds.
    assert!(
        (share - kernel_share).abs() <= 0.05,
        "throttled in {share:.3} of periods by Prometheus, {kernel_share:.3} by the kernel \
         ({} samples)",
        samples.len()
    );
    eprintln!(
        "throttled share: {share:.4} by Prometheus, {kernel_share:.4} by the kernel \
         over {} samples",
        samples.len()
    );
    // Usage over limit: above the rule's 0.95, and no further above 1 than
    // a period's quota over a scrape interval.
    let over = alert_value(&active, "ContainerCPUOverLimit", "throttled");
    eprintln!("usage over limit: {over:.4}");
    assert!(over <= 1.05, "usage at {over:.3} of the limit");

    // The sleeper's series were scraped, and no alert is active for it.
    assert_eq!(stack.value("cgmetric_cpu_limit_cores{name=\"idle\"}"), 1.0);
    let active = stack.prometheus.alerts();
    assert!(
        !active.iter().any(|a| a["labels"]["name"] == "idle"),
        "{active:#?}"
    );
    stack.assert_rules_evaluate();
}

/// The kernel's working set of `cg`: usage less inactive file pages, as
/// cgmetric computes it.
fn kernel_working_set(cg: &Cgroup) -> u64 {
    let (usage, inactive) = match cg.is_v1(Controller::Memory) {
        true => (
            cg.read(Controller::Memory, "memory.usage_in_bytes"),
            cg.stat(Controller::Memory, "memory.stat", "total_inactive_file"),
        ),
        false => (
            cg.read(Controller::Memory, "memory.current"),
            cg.stat(Controller::Memory, "memory.stat", "inactive_file"),
        ),
    };
    usage
        .trim()
        .parse::<u64>()
        .unwrap()
        .saturating_sub(inactive)
}

#[test]
fn memory_alert_fires_near_the_limit_and_survives_a_restarted_container() {
    require!("prometheus", "prometheus-node-exporter", "stress-ng");
    let parent = Cgroup::parent("prommem");
    let mut toucher = parent.child("toucher");
    toucher.spawn_memory_holder("64M");
    // Then it settles: the limit below is set from what it holds.
    let mut last = 0;
    assert!(
        eventually(Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = kernel_working_set(&toucher);
            let settled = now >= 64 * MIB && now.abs_diff(last) < 256 << 10;
            last = now;
            settled
        }),
        "the toucher never settled at 64 MiB or more (last {last})"
    );
    // The limit follows what the toucher holds: its working set is 95% of
    // it. Anything over the limit is inactive page cache, which the kernel
    // reclaims; the anonymous memory (no swap needed) stays, so no OOM.
    let page = 4096;
    let limit = (kernel_working_set(&toucher) * 100 / 95).div_ceil(page) * page;
    toucher.limit_memory(limit);
    // A sleeper with room: its series are scraped, the rule stays quiet.
    let mut roomy = parent.child("roomy");
    roomy.limit_memory(256 * MIB);
    roomy.spawn(Command::new("sleep").arg("600"));

    let stack = Stack::over(&parent);
    let active = stack.wait_firing("toucher", &["ContainerMemoryNearLimit"]);
    let ratio = alert_value(&active, "ContainerMemoryNearLimit", "toucher");
    let kernel_ratio = kernel_working_set(&toucher) as f64 / limit as f64;
    assert!(
        kernel_ratio > 0.9,
        "the setup is wrong: the kernel's working set is {kernel_ratio:.3} of the limit"
    );
    eprintln!("working set over limit: {ratio:.4} by Prometheus, {kernel_ratio:.4} by the kernel");
    // The toucher holds its pages: a few pages of drift between the last
    // evaluation and this read, nothing more.
    assert!(
        (ratio - kernel_ratio).abs() <= 0.02,
        "working set at {ratio:.3} of the limit by Prometheus, {kernel_ratio:.3} by the kernel"
    );
    assert_eq!(
        stack.value("cgmetric_memory_limit_bytes{name=\"roomy\"}"),
        (256 * MIB) as f64
    );
    assert!(
        find(
            &stack.prometheus.alerts(),
            "ContainerMemoryNearLimit",
            "roomy"
        )
        .is_none(),
        "{:#?}",
        stack.prometheus.alerts()
    );

    // The sleeper's container ends and a new one of the same name starts,
    // as a runtime restarts a container: the ended one's series stay
    // (`--keep-exited`) beside the new one's, under the same `name` (and
    // `container`). Every rule still evaluates, and the alert still fires.
    drop(roomy);
    let mut roomy = parent.child("roomy");
    roomy.limit_memory(256 * MIB);
    roomy.spawn(Command::new("sleep").arg("600"));
    assert!(
        eventually(Duration::from_secs(30), || stack
            .prometheus
            .query(
                "last_over_time(cgmetric_memory_limit_bytes{name=\"roomy\"}[5s])",
                None
            )
            .len()
            == 2),
        "the two incarnations of roomy never showed together:\n{}",
        stack.daemon.read("metrics.prom")
    );
    stack.assert_rules_evaluate();
    // Rules evaluate once a second: after two more, the rule manager has
    // run them over both incarnations too.
    std::thread::sleep(Duration::from_millis(2500));
    stack.assert_rules_evaluate();
    // Still firing (again, should a slow scrape have failed meanwhile and
    // made the series stale for an evaluation), and for nothing else.
    let active = stack.wait_firing("toucher", &["ContainerMemoryNearLimit"]);
    assert!(
        find(&active, "ContainerMemoryNearLimit", "roomy").is_none(),
        "{active:#?}"
    );
}

/// Seconds since the Unix epoch: the clock Prometheus stamps samples with.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A counter's readings: (Unix seconds, value).
type Log = Vec<(f64, u64)>;

/// A counter at `time`, linearly between the two readings of `log` around
/// it.
fn interpolate(log: &[(f64, u64)], time: f64) -> f64 {
    let after = log
        .iter()
        .position(|(t, _)| *t >= time)
        .unwrap_or_else(|| panic!("{time} is after the log"));
    assert!(after > 0, "{time} is before the log");
    let ((t0, v0), (t1, v1)) = (log[after - 1], log[after]);
    v0 as f64 + (v1 - v0) as f64 * (time - t0) / (t1 - t0)
}

#[test]
fn rate_of_network_bytes_is_the_traffic_sent() {
    require!("prometheus", "prometheus-node-exporter");
    let _turn = heavy_turn();
    let parent = Cgroup::parent("promnet");
    let server = parent.child("server");
    let client = parent.child("client");
    let stack = Stack::over(&parent);

    let (server_peer, addr) = server.serve("127.0.0.1", 1);
    // 64 KiB every 20 ms, 700 times: about 3.2 MB/s for at least 14 s.
    let writes = 700u64;
    let client_peer = client.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &(writes << 16).to_string(),
        "0",
        "20",
    ]));
    // The daemon's counters on both sides, read every 100 ms for 12 s
    // while the client sends: the truth Prometheus' samples are compared
    // with, at the very instants Prometheus stamped them.
    let (mut tx_log, mut rx_log): (Log, Log) = (Vec::new(), Vec::new());
    let started = unix_now();
    while unix_now() - started < 12.0 {
        let before = unix_now();
        let tx = stack.daemon.number("client/net_bytes_tx");
        let rx = stack.daemon.number("server/net_bytes_rx");
        let at = (before + unix_now()) / 2.0;
        tx_log.push((at, tx));
        rx_log.push((at, rx));
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = finish_client(client_peer);
    assert_eq!(finish(server_peer), writes << 16);

    // An 8 s window well inside the logged traffic (a second's margin on
    // either side for the ramp-up and the last scrape).
    let (end, window) = (started + 11.0, 8);
    for (family, container, log) in [
        ("cgmetric_network_transmit_bytes_total", "client", &tx_log),
        ("cgmetric_network_receive_bytes_total", "server", &rx_log),
    ] {
        let selector = format!("{family}{{name=\"{container}\"}}[{window}s]");
        let series = stack.prometheus.query(&selector, Some(end));
        assert_eq!(series.len(), 1, "{selector}: {series:#?}");
        let samples = series[0]["values"].as_array().unwrap();
        assert!(
            samples.len() >= window - 2,
            "{selector}: {} samples in {window} s: {samples:?}",
            samples.len()
        );
        let time = |s: &Value| s[0].as_f64().unwrap();
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        let truth = (interpolate(log, time(last)) - interpolate(log, time(first)))
            / (time(last) - time(first));
        assert!(
            truth > 1e6,
            "{container} moved only {truth:.0} B/s: the paced traffic did not flow"
        );
        let rate = stack
            .prometheus
            .query(&format!("rate({selector})"), Some(end));
        assert_eq!(rate.len(), 1, "rate({selector}): {rate:#?}");
        let rate = sample_value(&rate[0]["value"]);
        eprintln!(
            "rate({selector}) {rate:.0} B/s, the daemon's counter {truth:.0} B/s \
             ({:+.2}%, {} samples)",
            (rate / truth - 1.0) * 100.0,
            samples.len()
        );
        // The two span the same sample instants. What separates them:
        // node_exporter reads the file a little after the instant a scrape
        // is stamped with (tens of milliseconds, differing between the
        // first and last sample by well under a tenth of a second: under 2%
        // of the 5 s or more they span), and rate() extrapolating to the
        // window's edges, exactly when the edge samples are within 1.1
        // intervals of them, else by half an interval: a scrape lost at an
        // edge makes it at most (1.1 - 0.5) / 8 = 7.5% low.
        assert!(
            (rate / truth - 1.0).abs() <= 0.10,
            "rate({selector}) = {rate:.0} B/s, the daemon's counter moved {truth:.0} B/s \
             between the first and last sample ({samples:?})"
        );
    }

    // The daemon's counter, which the truth above comes from, is what the
    // kernel sent: the data (TCP_INFO bytes_sent) and IP and TCP headers
    // on each segment (20 + 20, 12 of timestamps, up to 8 more on a SYN).
    std::thread::sleep(Duration::from_millis(300));
    let tx = stack.daemon.number("client/net_bytes_tx");
    assert!(
        tx >= sent.bytes_sent + sent.segs_out * 40 && tx <= sent.bytes_sent + sent.segs_out * 60,
        "net_bytes_tx {tx} for {sent:?}"
    );
    stack.assert_rules_evaluate();
}

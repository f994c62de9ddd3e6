//! `cgmetric billing` over real traffic: every incarnation of a name is
//! billed, the running one included, exactly as the kernel counted it
//! (through the tree and the ledger), across a daemon crash, with no daemon
//! at all, and within the period asked for.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use cgmetric::ledger::{read_ledger, Record};

use crate::exited::{send, send_to};
use crate::require;
use crate::support::{eventually, BpfDir, Cgroup, Daemon};

/// The ledger's records of `name`, oldest first.
fn records_of(state: &Path, name: &str) -> Vec<Record> {
    read_ledger(state)
        .unwrap()
        .into_iter()
        .filter(|r| r.name == name)
        .collect()
}

/// Runs `cgmetric billing` on the tree at `mount` and the ledger in
/// `state`, with `args` after.
fn billing(mount: &Path, state: &Path, args: &[&str]) -> Output {
    Command::new(crate::support::binary())
        .args(["billing", "--price-per-gb", "0.5", "--mount"])
        .arg(mount)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        // Its warnings are part of what the tests check.
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// The JSON bill, which must have succeeded.
fn json_bill(mount: &Path, state: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let mut args = args.to_vec();
    args.extend(["--format", "json"]);
    let out = billing(mount, state, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "billing {args:?} failed: {stderr}");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (json, stderr)
}

/// A name's row of a JSON bill, if it has one.
fn row<'a>(bill: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    bill["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["container"] == name)
}

/// (incarnations, live, egress bytes, ingress bytes) of a name's row.
fn summary(bill: &serde_json::Value, name: &str) -> (u64, bool, u64, u64) {
    let row = row(bill, name).unwrap_or_else(|| panic!("no {name} in {bill:#}"));
    (
        row["incarnations"].as_u64().unwrap(),
        row["live"].as_bool().unwrap(),
        row["egress_bytes"].as_u64().unwrap(),
        row["ingress_bytes"].as_u64().unwrap(),
    )
}

/// (tx, rx) as a container's files show them.
fn counted(daemon: &Daemon, name: &str) -> (u64, u64) {
    (
        daemon.number(&format!("{name}/net_bytes_tx")),
        daemon.number(&format!("{name}/net_bytes_rx")),
    )
}

/// One incarnation of `name` below `parent`: sends `payload` to `server`,
/// ends, and is recorded. Returns what the tree counted before it ended,
/// which the test checks against its record.
fn run_once(
    daemon: &Daemon,
    state: &Path,
    parent: &Cgroup,
    server: &Cgroup,
    payload: u64,
) -> (u64, u64) {
    let before = records_of(state, "job").len();
    let mut job = parent.child("job");
    send(&job, server, payload);
    let (tx, rx) = counted(daemon, "job");
    // Headers on top, and resent segments when the machine is busy.
    assert!(tx > payload, "tx {tx} for {payload}");
    job.remove();
    assert!(
        eventually(Duration::from_secs(5), || records_of(state, "job").len()
            == before + 1),
        "no record of job:\n{}",
        daemon.stderr()
    );
    let record = records_of(state, "job").pop().unwrap();
    assert_eq!(
        (
            record.counters["net_bytes_tx"],
            record.counters["net_bytes_rx"]
        ),
        (tx, rx),
        "the ledger has what the tree showed"
    );
    (tx, rx)
}

fn sum(runs: &[(u64, u64)]) -> (u64, u64) {
    runs.iter().fold((0, 0), |a, r| (a.0 + r.0, a.1 + r.1))
}

#[test]
fn a_name_restarted_is_billed_for_every_incarnation() {
    require!();
    let parent = Cgroup::parent("bill-runs");
    let server = parent.child("server");
    let glob = format!("{}/*", parent.relative);
    let state = tempfile::tempdir().unwrap();
    let bpf = BpfDir::new();
    let args = [
        "--cgroup",
        &glob,
        "--bpf-dir",
        bpf.arg(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ];
    let mut daemon = Daemon::start(&args);
    let mount = daemon.mountpoint.clone();

    // Two incarnations that end, and a third that runs.
    let mut runs = vec![
        run_once(&daemon, state.path(), &parent, &server, 1 << 20),
        run_once(&daemon, state.path(), &parent, &server, 3 << 20),
    ];
    let mut job = parent.child("job");
    send(&job, &server, 2 << 20);
    runs.push(counted(&daemon, "job"));
    let (tx, rx) = sum(&runs);
    // exited/job shows the second run meanwhile: it is not billed twice.
    assert_eq!(daemon.number("exited/job/net_bytes_tx"), runs[1].0);

    let (bill, _) = json_bill(&mount, state.path(), &[]);
    assert_eq!(summary(&bill, "job"), (3, true, tx, rx), "{bill:#}");
    let server_counts = counted(&daemon, "server");
    assert_eq!(
        summary(&bill, "server"),
        (1, true, server_counts.0, server_counts.1)
    );
    // The server received what the job's incarnations sent: each side
    // counts the other's packets (less at most a TIME_WAIT ACK each).
    assert!(server_counts.1.abs_diff(tx) < 3 * 100, "{bill:#}");
    assert_eq!(bill["until"], serde_json::Value::Null);
    let cost = row(&bill, "job").unwrap()["cost"].as_f64().unwrap();
    // To millionths, as CSV prints it.
    assert_eq!(cost, (tx as f64 / 1e9 * 0.5 * 1e6).round() / 1e6);

    // The same bill as CSV and as a table.
    let out = billing(&mount, state.path(), &["--format", "csv"]);
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        csv.lines().next(),
        Some("container,egress_gb,ingress_gb,cost,incarnations,live,egress_bytes,ingress_bytes")
    );
    let job_line: Vec<&str> = csv
        .lines()
        .find(|l| l.starts_with("job,"))
        .unwrap_or_else(|| panic!("{csv}"))
        .split(',')
        .collect();
    let gb = |bytes: u64| format!("{}.{:09}", bytes / 1_000_000_000, bytes % 1_000_000_000);
    assert_eq!(job_line[1], gb(tx));
    assert_eq!(job_line[2], gb(rx));
    assert_eq!(job_line[4..].join(","), format!("3,1,{tx},{rx}"));
    let out = billing(&mount, state.path(), &[]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let cells: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("job "))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        cells[..5].join(" "),
        format!("job 3 yes {} {}", gb(tx), gb(rx))
    );
    assert!(
        table.lines().last().unwrap().starts_with("TOTAL"),
        "{table}"
    );

    // The daemon dies; the running incarnation ends meanwhile. With no
    // daemon, the ledger alone bills what ended, and says so.
    daemon.crash();
    drop(daemon);
    job.remove();
    let (bill, stderr) = json_bill(&mount, state.path(), &[]);
    let (done_tx, done_rx) = sum(&runs[..2]);
    assert_eq!(summary(&bill, "job"), (2, false, done_tx, done_rx));
    assert!(row(&bill, "server").is_none(), "{bill:#}");
    assert!(stderr.contains("billing the ledger only"), "{stderr}");

    // The next start records it from the pinned counters: all three runs
    // are billed, with every byte.
    let daemon = Daemon::start(&args);
    let (bill, _) = json_bill(&daemon.mountpoint, state.path(), &[]);
    assert_eq!(summary(&bill, "job"), (3, false, tx, rx), "{bill:#}");
    assert!(records_of(state.path(), "job")[2].recovered);
    drop(daemon);

    // Lines a crash tore or a hand mangled are skipped with a warning;
    // the bill is the same.
    let ledger = state.path().join("ledger.jsonl");
    let text = std::fs::read_to_string(&ledger).unwrap();
    let first = text.lines().next().unwrap();
    let mangled = format!(
        "{{\"name\":\"job\"}}\nnot json\n{},\n{}",
        &first[..first.len() - 1],
        &first[..first.len() / 2]
    );
    std::fs::write(&ledger, format!("{text}{mangled}")).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (bill, stderr) = json_bill(empty.path(), state.path(), &[]);
    assert_eq!(summary(&bill, "job"), (3, false, tx, rx), "{bill:#}");
    let skipped = stderr.matches("not a ledger record").count();
    assert_eq!(skipped, 4, "{stderr}");
}

/// `time` in RFC 3339 with a +01:00 offset, as an operator east of UTC
/// writes it.
fn plus_one_hour(time: SystemTime) -> String {
    let shifted = humantime::format_rfc3339_millis(time + Duration::from_secs(3600)).to_string();
    format!("{}+01:00", shifted.strip_suffix('Z').unwrap())
}

#[test]
fn since_and_until_leave_out_incarnations_outside_the_period() {
    require!();
    let parent = Cgroup::parent("bill-period");
    let server = parent.child("server");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let state = daemon.state_dir().unwrap().to_path_buf();
    let mount = daemon.mountpoint.clone();

    let first = run_once(&daemon, &state, &parent, &server, 1 << 20);
    // Records have milliseconds: the boundary lies clear of both.
    std::thread::sleep(Duration::from_millis(20));
    let boundary = SystemTime::now();
    std::thread::sleep(Duration::from_millis(20));
    let second = run_once(&daemon, &state, &parent, &server, 2 << 20);
    let records = records_of(&state, "job");
    let exited = |r: &Record| humantime::parse_rfc3339(&r.exited).unwrap();
    assert!(exited(&records[0]) < boundary && exited(&records[1]) > boundary);

    let utc = humantime::format_rfc3339_nanos(boundary).to_string();
    for since in [utc.clone(), plus_one_hour(boundary)] {
        let (bill, _) = json_bill(&mount, &state, &["--since", &since]);
        assert_eq!(
            summary(&bill, "job"),
            (1, false, second.0, second.1),
            "--since {since}: {bill:#}"
        );
        // Running containers count in a period that reaches now.
        assert!(summary(&bill, "server").1);
    }
    let (bill, _) = json_bill(&mount, &state, &["--until", &utc]);
    assert_eq!(summary(&bill, "job"), (1, false, first.0, first.1));
    // A period that ended bills no running container.
    assert!(row(&bill, "server").is_none(), "{bill:#}");
    assert_eq!(
        bill["until"],
        humantime::format_rfc3339_millis(boundary).to_string()
    );
    // A duration ago, and a period that holds both.
    let (bill, _) = json_bill(&mount, &state, &["--since", "1h"]);
    let both = sum(&[first, second]);
    assert_eq!(summary(&bill, "job"), (2, false, both.0, both.1));
    // A period after both ended, and before the first.
    let (bill, _) = json_bill(&mount, &state, &["--since", "now"]);
    assert!(row(&bill, "job").is_none(), "{bill:#}");
    let (bill, _) = json_bill(&mount, &state, &["--until", "1h"]);
    assert_eq!(bill["containers"], serde_json::json!([]));
    // An empty period and a time nobody can read are one clear line each.
    for (args, says) in [
        (
            ["--since", utc.as_str(), "--until", utc.as_str()],
            "the period is empty",
        ),
        (["--since", "last week", "--until", "now"], "RFC 3339"),
    ] {
        let out = billing(&mount, &state, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    // A period that has ended, and no ledger where one was said to be.
    let out = billing(&mount, &state.join("elsewhere"), &["--until", "1h"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no state directory"),
        "{stderr}"
    );
}

/// One bill of the name `job`: (incarnations, live, egress bytes).
type JobBill = (u64, bool, u64);

#[test]
fn bills_taken_while_a_name_restarts_count_each_incarnation_once() {
    require!();
    let parent = Cgroup::parent("bill-churn");
    let server = parent.child("server");
    let glob = format!("{}/*", parent.relative);
    // `metric` waits a window for the rates of a container it has not
    // read before: a short one keeps the bills back to back.
    let daemon = Daemon::start(&["--cgroup", &glob, "--window", "10ms"]);
    let state = daemon.state_dir().unwrap().to_path_buf();
    let mount = daemon.mountpoint.clone();

    // Bills are taken back to back from another thread while the name
    // ends and comes back: each incarnation ends while some bill reads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let biller = {
        let (stop, mount, state) = (stop.clone(), mount.clone(), state.clone());
        std::thread::spawn(move || {
            let mut bills: Vec<JobBill> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (bill, stderr) = json_bill(&mount, &state, &[]);
                // Bills resolved only by giving up would not be exact.
                assert!(stderr.is_empty(), "{stderr}");
                bills.push(match row(&bill, "job") {
                    Some(_) => {
                        let (runs, live, tx, _) = summary(&bill, "job");
                        (runs, live, tx)
                    }
                    None => (0, false, 0),
                });
            }
            bills
        })
    };
    // Each run sends less than the one before: a bill that counted an
    // ended run both running and ended shows more than its successor's
    // running share can explain.
    const RUNS: u64 = 16;
    let mut txs = Vec::new();
    for n in 0..RUNS {
        let payload = (RUNS + 4 - n) * (64 << 10);
        txs.push(run_once(&daemon, &state, &parent, &server, payload).0);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bills = biller.join().unwrap();

    let prefix: Vec<u64> = std::iter::once(0)
        .chain(txs.iter().scan(0, |total, tx| {
            *total += tx;
            Some(*total)
        }))
        .collect();
    let (final_bill, _) = json_bill(&mount, &state, &[]);
    assert_eq!(summary(&final_bill, "job").2, prefix[RUNS as usize]);
    assert!(
        bills.iter().filter(|b| b.1).count() >= RUNS as usize,
        "bills saw too few running incarnations: {bills:?}"
    );
    for (n, &(runs, live, tx)) in bills.iter().enumerate() {
        let ended = (runs - u64::from(live)) as usize;
        let context = || {
            let around = &bills[n.saturating_sub(2)..(n + 3).min(bills.len())];
            format!(
                "bill {n} {:?}: {around:?} of {} bills; runs {txs:?}",
                bills[n],
                bills.len()
            )
        };
        assert!(ended <= RUNS as usize, "{}", context());
        if live {
            // Every ended run, plus what the running one sent so far.
            assert!(
                tx >= prefix[ended] && tx <= prefix[ended] + txs[ended],
                "{}",
                context()
            );
        } else {
            assert_eq!(tx, prefix[ended], "{}", context());
        }
        if let Some(&(next_runs, _, next_tx)) = bills.get(n + 1) {
            // What has been counted never shrinks.
            assert!(next_runs >= runs && next_tx >= tx, "{}", context());
        }
    }
}

/// An address of this host's own on one end of a veth pair (this kernel
/// has no dummy devices), gone on drop: its traffic goes over loopback but
/// is not `loopback` by address.
struct LocalAddress {
    device: String,
    address: &'static str,
}

impl LocalAddress {
    fn new(address: &'static str) -> LocalAddress {
        let id = crate::support::unique("cgb");
        let suffix = id.replace('-', "");
        let device = format!("cgb{}", &suffix[suffix.len().saturating_sub(10)..]);
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {args:?}: {status}");
        };
        let peer = format!("{device}p");
        ip(&[
            "link", "add", &device, "type", "veth", "peer", "name", &peer,
        ]);
        let local = LocalAddress { device, address };
        ip(&[
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            &local.device,
        ]);
        ip(&["link", "set", &local.device, "up"]);
        local
    }
}

impl Drop for LocalAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.device])
            .status();
    }
}

/// Priced by class (`--price-per-gb lan=…,loopback=…`), a bill has each
/// class's bytes exactly as the classes' files and the ledger's records
/// counted them, over an ended incarnation and a running one, and costs
/// each class at its price; `external`, unpriced, costs nothing.
#[test]
fn a_bill_by_class_prices_each_destination() {
    require!("ip");
    let local = LocalAddress::new("169.254.91.1");
    let parent = Cgroup::parent("bill-class");
    let server = parent.child("server");
    let glob = format!("{}/*", parent.relative);
    let class = format!("lan={}/32", local.address);
    let daemon = Daemon::start(&["--cgroup", &glob, "--net-class", &class]);
    let state = daemon.state_dir().unwrap().to_path_buf();
    let by_class = |name: &str| -> [u64; 4] {
        ["tx_lan", "rx_lan", "tx_loopback", "rx_loopback"]
            .map(|f| daemon.number(&format!("{name}/net_bytes_{f}")))
    };

    // One incarnation to the LAN address and to loopback, ended.
    let mut first = parent.child("job");
    send_to(&first, &server, local.address, 1 << 20);
    send(&first, &server, 1 << 19);
    let ended = by_class("job");
    assert!(ended[0] > 1 << 20 && ended[2] > 1 << 19, "{ended:?}");
    first.remove();
    assert!(
        eventually(Duration::from_secs(5), || records_of(&state, "job").len()
            == 1),
        "{}",
        daemon.stderr()
    );
    let record = records_of(&state, "job").pop().unwrap();
    assert_eq!(record.counters["net_bytes_tx_lan"], ended[0]);
    // And one running, to the LAN address only.
    let second = parent.child("job");
    send_to(&second, &server, local.address, 1 << 18);
    let running = by_class("job");

    let out = Command::new(crate::support::binary())
        .args([
            "billing",
            "--price-per-gb",
            "lan=2,loopback=1",
            "--format",
            "json",
        ])
        .arg("--mount")
        .arg(daemon.path(""))
        .arg("--state-dir")
        .arg(&state)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let bill: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = row(&bill, "job").unwrap_or_else(|| panic!("{bill:#}"));
    assert_eq!(job["incarnations"], 2);
    let classes = &job["classes"];
    let bytes = |class: &str, way: &str| classes[class][way].as_u64().unwrap();
    assert_eq!(
        bytes("lan", "egress_bytes"),
        ended[0] + running[0],
        "{bill:#}"
    );
    assert_eq!(
        bytes("lan", "ingress_bytes"),
        ended[1] + running[1],
        "{bill:#}"
    );
    assert_eq!(
        bytes("loopback", "egress_bytes"),
        ended[2] + running[2],
        "{bill:#}"
    );
    let want = (ended[0] + running[0]) as f64 / 1e9 * 2.0 + (ended[2] + running[2]) as f64 / 1e9;
    let cost = job["cost"].as_f64().unwrap();
    assert!((cost - want).abs() < 2e-6, "cost {cost}, want {want}");
    assert_eq!(bill["price_per_gb"]["lan"].as_f64(), Some(2.0));
}

//! Churn: 10,000 containers created and removed while 8 readers loop over
//! the tree. Readers get whole values or ENOENT, never EIO or a torn value;
//! the daemon's memory, descriptors and eBPF map entries end where they
//! started.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::require;
use crate::support::{
    eventually, heavy_turn, map_ids, open_fds, rss_kib, tcp_peer, BpfDir, Cgroup, Daemon, Rng,
};

const CONTAINERS: usize = 10_000;
const BATCH: usize = 100;
const READERS: usize = 8;
/// Batches (of 100 containers) before the baseline footprint is taken.
const WARM_UP_BATCHES: usize = 10;
/// One container in this many sends traffic, so the maps churn too.
const TALKER_EVERY: usize = 25;

/// What a reader saw, summed over readers.
#[derive(Default)]
struct Seen {
    values: AtomicU64,
    vanished: AtomicU64,
    bad: Mutex<Vec<String>>,
}

impl Seen {
    fn bad(&self, what: String) {
        let mut bad = self.bad.lock().unwrap();
        if bad.len() < 20 {
            bad.push(what);
        }
    }

    /// A read's outcome: a whole value passes `valid`, a vanished container
    /// is ENOENT, anything else is a failure.
    fn check(&self, path: &Path, result: std::io::Result<String>, valid: impl Fn(&str) -> bool) {
        match result {
            Ok(text) if valid(&text) => {
                self.values.fetch_add(1, Ordering::Relaxed);
            }
            Ok(text) => self.bad(format!("{}: torn or malformed {text:?}", path.display())),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.vanished.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.bad(format!("{}: {e}", path.display())),
        }
    }
}

/// One number (or `max`) and a newline.
fn whole_number(text: &str) -> bool {
    text.strip_suffix('\n')
        .is_some_and(|v| v == "max" || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())))
}

/// Every line complete: a comment, or `name{labels} value`.
fn whole_exposition(text: &str) -> bool {
    text.ends_with('\n')
        && text.lines().all(|l| {
            l.starts_with('#')
                || l.rsplit_once(' ').is_some_and(|(series, value)| {
                    series.starts_with("cgmetric_")
                        && (value.parse::<f64>().is_ok() || value == "+Inf")
                })
        })
}

fn reader(mountpoint: &Path, stop: &AtomicBool, seen: &Seen, seed: u64) {
    let mut rng = seed;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let names: Vec<String> = match std::fs::read_dir(mountpoint) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('k'))
                .collect(),
            Err(e) => {
                seen.bad(format!("readdir: {e}"));
                continue;
            }
        };
        let _reading = crate::support::reading();
        for name in names.iter().take(4) {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let dir = mountpoint.join(name);
            for file in [
                "pids_current",
                "memory_usage",
                "cpu_usage_usec",
                "net_bytes_tx",
            ] {
                let path = dir.join(file);
                seen.check(&path, std::fs::read_to_string(&path), whole_number);
            }
            let path = dir.join("name");
            seen.check(&path, std::fs::read_to_string(&path), |t| {
                t == format!("{name}\n")
            });
        }
        if round % 20 == (seed % 20) {
            let path = mountpoint.join("metrics.prom");
            seen.check(&path, std::fs::read_to_string(&path), whole_exposition);
        }
    }
}

#[test]
fn ten_thousand_containers_come_and_go_under_eight_readers() {
    require!();
    let _turn = heavy_turn();
    let mut rng = Rng::seeded("ten_thousand_containers_come_and_go_under_eight_readers");
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("churn");
    let server_cg = parent.child("server");
    let glob = format!("{}/*", parent.relative);
    // Ended containers stay under exited/ for 2 s: the footprint is
    // measured once they expired.
    let daemon = Daemon::start(&[
        "--cgroup",
        &glob,
        "--bpf-dir",
        bpf.arg(),
        "--keep-exited",
        "2s",
    ]);
    let pid = daemon.server_pid();

    let talkers = CONTAINERS / TALKER_EVERY;
    let (server, addr) = server_cg.serve("127.0.0.1", talkers);

    let stop = AtomicBool::new(false);
    let seen = Seen::default();
    let mut baseline = None;
    let mut talker_ids = Vec::new();
    std::thread::scope(|scope| {
        for r in 0..READERS {
            let (stop, seen, mountpoint) = (&stop, &seen, &daemon.mountpoint);
            let seed = rng.below(u64::MAX) ^ r as u64;
            scope.spawn(move || reader(mountpoint, stop, seen, seed));
        }
        for batch in 0..CONTAINERS / BATCH {
            let batch_cgroups: Vec<Cgroup> = (0..BATCH)
                .map(|i| parent.child(&format!("k{batch}x{i}")))
                .collect();
            let clients: Vec<_> = batch_cgroups
                .iter()
                .enumerate()
                .filter(|(i, _)| i % TALKER_EVERY == 0)
                .map(|(_, cg)| {
                    talker_ids.push(cg.v2_id());
                    cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", "1000", "0"]))
                })
                .collect();
            for client in clients {
                assert!(client.wait_with_output().unwrap().status.success());
            }
            // Let the readers see this batch before it goes.
            std::thread::sleep(Duration::from_millis(rng.below(20)));
            drop(batch_cgroups);
            if batch == WARM_UP_BATCHES - 1 {
                // Where the daemon stands once it has seen churn and readers
                // (its tables, buffers and the allocator at working size).
                std::thread::sleep(Duration::from_secs(1));
                baseline = Some((rss_kib(pid), open_fds(pid)));
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(server.wait_with_output().unwrap().status.success());

    let bad = seen.bad.lock().unwrap();
    assert!(bad.is_empty(), "readers saw:\n{}", bad.join("\n"));
    let (values, vanished) = (
        seen.values.load(Ordering::Relaxed),
        seen.vanished.load(Ordering::Relaxed),
    );
    assert!(values > 1000, "readers read only {values} values");

    // Every churned container is gone from the tree and from the maps.
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_dir(&daemon.mountpoint)
            .unwrap()
            .filter_map(|e| e.ok())
            .all(|e| !e.file_name().to_string_lossy().starts_with('k'))
    }));
    let listed_once = std::fs::read_dir(&daemon.mountpoint).unwrap().count();
    let talkers: HashSet<u64> = talker_ids.into_iter().collect();
    let left: Vec<u64> = [
        cgmetric_common::NET_COUNTERS_MAP,
        cgmetric_common::CONN_COUNTERS_MAP,
    ]
    .iter()
    .flat_map(|m| map_ids(&bpf, m))
    .filter(|id| talkers.contains(id))
    .collect();
    assert!(
        left.is_empty(),
        "{} of {} removed talkers still in the maps",
        left.len(),
        talkers.len()
    );

    // Every incarnation is in the ledger, the talkers with their traffic.
    // (Other tests' runtime containers, which every daemon finds, too.)
    let path = daemon.state_dir().unwrap().join("ledger.jsonl");
    let ours = format!("/{}/", parent.relative);
    let records: Vec<_> = cgmetric::ledger::read_records(
        std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
        &path,
    )
    .into_iter()
    .filter(|r| r.cgroup.starts_with(&ours))
    .collect();
    let churned: HashSet<&str> = records
        .iter()
        .map(|r| r.name.as_str())
        .filter(|n| n.starts_with('k'))
        .collect();
    assert_eq!(churned.len(), CONTAINERS, "containers in the ledger");
    if records.len() != CONTAINERS {
        let mut seen = HashSet::new();
        let extra: Vec<_> = records
            .iter()
            .filter(|r| !r.name.starts_with('k') || !seen.insert(&r.name))
            .collect();
        panic!(
            "{} records for {CONTAINERS} containers; extra: {extra:#?}\n{}",
            records.len(),
            daemon.stderr()
        );
    }
    for record in records
        .iter()
        .filter(|r| talkers.contains(&r.cgroup_id.unwrap()))
    {
        assert!(record.counters["net_bytes_tx"] > 1000, "{record:?}");
    }
    // And exited/ lets them go after --keep-exited.
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_dir(daemon.path("exited")).unwrap().count() == 0
    }));

    std::thread::sleep(Duration::from_millis(500));
    let (rss0, fds0) = baseline.unwrap();
    let (rss, fds) = (rss_kib(pid), open_fds(pid));
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "churn: {values} values and {vanished} ENOENT read; daemon RSS {rss0} -> {rss} KiB, \
         fds {fds0} -> {fds}; root lists {listed_once}"
    );
    assert!(rss * 10 <= rss0 * 11, "RSS grew from {rss0} to {rss} KiB");
    assert!(
        fds * 10 <= fds0 * 11,
        "descriptors grew from {fds0} to {fds}: {:#?}",
        crate::support::fd_targets(pid)
    );
    assert!(daemon.stderr().lines().all(|l| !l.contains("ERROR")));
}

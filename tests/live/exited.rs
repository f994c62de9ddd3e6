//! Containers that end: their final values under `exited/` and in the
//! ledger, with exact network counters, across a restart of the same name
//! and across a daemon killed while a container goes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cgmetric::ledger::{read_records, Record};

use crate::require;
use crate::support::{eventually, finish, finish_client, tcp_peer, BpfDir, Cgroup, Daemon};

/// The ledger's records, oldest first.
fn ledger(state_dir: &Path) -> Vec<Record> {
    let path = state_dir.join("ledger.jsonl");
    match std::fs::File::open(&path) {
        Ok(file) => read_records(std::io::BufReader::new(file), &path),
        Err(_) => Vec::new(),
    }
}

fn records_of(state_dir: &Path, name: &str) -> Vec<Record> {
    ledger(state_dir)
        .into_iter()
        .filter(|r| r.name == name)
        .collect()
}

/// Sends `payload` bytes from `client` to a server in `server`, waits for
/// both and for TCP to finish.
pub(crate) fn send(client: &Cgroup, server: &Cgroup, payload: u64) {
    send_to(client, server, "127.0.0.1", payload)
}

/// [`send`] to a server listening on `bind`.
pub(crate) fn send_to(client: &Cgroup, server: &Cgroup, bind: &str, payload: u64) {
    let (listener, addr) = server.serve(bind, 1);
    let peer = client.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &payload.to_string(),
        "0",
    ]));
    assert_eq!(finish_client(peer).payload, payload);
    assert_eq!(finish(listener), payload);
    // The last ACKs and FINs.
    std::thread::sleep(Duration::from_millis(300));
}

/// Ends the container `name` (its cgroup) as a runtime does, and waits for
/// it under `exited/`.
fn end(daemon: &Daemon, cgroup: &mut Cgroup, name: &str) {
    // A runtime's teardown takes some milliseconds after the last process
    // left; the daemon takes the values in that time.
    std::thread::sleep(Duration::from_millis(200));
    cgroup.remove();
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .path(&format!("exited/{name}"))
            .exists()),
        "exited/{name} did not appear:\n{}",
        daemon.stderr()
    );
}

/// The network counters a container's files show.
const NET: [&str; 6] = [
    "net_bytes_tx",
    "net_bytes_rx",
    "net_packets_tx",
    "net_packets_rx",
    "net_connections_total",
    "net_connections_closed",
];

#[test]
fn an_exited_container_keeps_its_final_values() {
    require!();
    let parent = Cgroup::parent("exited");
    let server = parent.child("server");
    let mut sender = parent.child("sender");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let state = daemon.state_dir().unwrap().to_path_buf();

    send(&sender, &server, 4 << 20);
    // Its process is gone: these are its final values. Only single files
    // are read, so what exited/ shows is what the daemon took when the
    // last process left (or, for the network, from the maps at removal).
    let live: Vec<u64> = NET
        .iter()
        .map(|f| daemon.number(&format!("sender/{f}")))
        .collect();
    assert!(live[0] > 4 << 20, "tx {}", live[0]);
    let cpu = daemon.number("sender/cpu_usage_usec");
    assert!(cpu > 0);
    end(&daemon, &mut sender, "sender");
    // The kernel is told to forget the name from a thread of its own.
    assert!(eventually(Duration::from_secs(1), || !daemon
        .path("sender")
        .exists()));
    for (file, value) in NET.iter().zip(&live) {
        assert_eq!(
            daemon.number(&format!("exited/sender/{file}")),
            *value,
            "{file}"
        );
    }
    assert_eq!(daemon.number("exited/sender/cpu_usage_usec"), cpu);
    assert_eq!(daemon.number("exited/sender/cpu_millicores"), 0);
    assert_eq!(daemon.read("exited/sender/name"), "sender\n");
    assert_eq!(
        daemon.read("exited/sender/cgroup"),
        format!("/{}\n", sender.relative)
    );
    let exited_at = daemon.read("exited/sender/exited_at");
    humantime::parse_rfc3339(exited_at.trim()).expect("exited_at is RFC 3339");

    // Like the rest of the tree: listed, exact sizes, stable numbers,
    // read-only.
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(daemon.path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(names("").contains(&"exited".to_string()));
    assert_eq!(names("exited"), ["sender"]);
    let files = names("exited/sender");
    for file in ["exited_at", "metrics", "net_bytes_tx", "cpu_usage_usec"] {
        assert!(files.contains(&file.to_string()), "{file}: {files:?}");
    }
    for file in &files {
        let path = daemon.path(&format!("exited/sender/{file}"));
        let size = std::fs::metadata(&path).unwrap().len();
        let text = std::fs::read(&path).unwrap();
        assert_eq!(size, text.len() as u64, "{file}");
    }
    let ino = |p: &str| std::fs::metadata(daemon.path(p)).unwrap().ino();
    assert_eq!(
        ino("exited/sender/net_bytes_tx"),
        ino("exited/sender/net_bytes_tx")
    );
    assert_ne!(ino("exited/sender"), ino("server"));
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(daemon.path("exited/sender/net_bytes_tx"));
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert!(!daemon.read("metric").contains("sender_"));

    // Its series stay in metrics.prom, with the labels they had.
    let prom = daemon.read("metrics.prom");
    let tx_line = format!(
        "cgmetric_network_transmit_bytes_total{{container=\"sender\",name=\"sender\",id=\"{}\",runtime=\"cgroup\"}} {}",
        daemon.read("exited/sender/id").trim(),
        live[0]
    );
    assert!(prom.lines().any(|l| l == tx_line), "{tx_line}\n{prom}");
    assert!(prom.contains("cgmetric_ledger_write_errors_total 0\n"));

    // And the ledger has its bill.
    let records = records_of(&state, "sender");
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record.cgroup, format!("/{}", sender.relative));
    assert_eq!(record.runtime, "cgroup");
    assert!(!record.recovered);
    for (file, value) in NET.iter().zip(&live) {
        assert_eq!(record.counters.get(*file), Some(value), "{file}");
    }
    assert_eq!(record.counters.get("cpu_usage_usec"), Some(&cpu));
    assert!(
        !record.counters.contains_key("memory_usage"),
        "gauges are no bill"
    );
}

#[test]
fn a_name_that_comes_back_is_recorded_twice() {
    require!();
    let parent = Cgroup::parent("again");
    let server = parent.child("server");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let state = daemon.state_dir().unwrap().to_path_buf();

    let mut sent = Vec::new();
    for payload in [1u64 << 20, 3 << 20] {
        let mut job = parent.child("job");
        send(&job, &server, payload);
        let tx = daemon.number("job/net_bytes_tx");
        assert!(tx > payload && tx < payload + payload / 10, "tx {tx}");
        sent.push((job.v2_id(), tx));
        job.remove();
        // Looked up (and so cached by the kernel) after each: the name
        // shows the latest incarnation once it ended, not the cached one.
        let shown = daemon.path("exited/job/net_bytes_tx");
        assert!(
            eventually(Duration::from_secs(5), || std::fs::read_to_string(&shown)
                .is_ok_and(|v| v.trim() == tx.to_string())),
            "exited/job does not show the incarnation that sent {tx}:\n{}",
            daemon.stderr()
        );
        // An ended container shows under exited/ once its record was written.
        assert_eq!(
            records_of(&state, "job").len(),
            sent.len(),
            "{:?}",
            ledger(&state)
        );
    }
    let records = records_of(&state, "job");
    for (record, (id, tx)) in records.iter().zip(&sent) {
        assert_eq!(record.cgroup_id, Some(*id));
        assert_eq!(record.counters["net_bytes_tx"], *tx);
    }
    // exited/ shows the last incarnation.
    assert_eq!(daemon.number("exited/job/net_bytes_tx"), sent[1].1);
}

#[test]
fn a_container_removed_while_the_daemon_is_dead_is_recorded_at_the_next_start() {
    require!();
    let parent = Cgroup::parent("dead");
    let server = parent.child("server");
    let mut victim = parent.child("victim");
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
    send(&victim, &server, 2 << 20);
    let tx = daemon.number("victim/net_bytes_tx");
    let rx = daemon.number("victim/net_bytes_rx");
    daemon.crash();
    drop(daemon);

    victim.remove();
    let daemon = Daemon::start(&args);
    let records = records_of(state.path(), "victim");
    assert_eq!(records.len(), 1, "{records:?}\n{}", daemon.stderr());
    let record = &records[0];
    assert!(record.recovered);
    assert_eq!(record.counters["net_bytes_tx"], tx);
    assert_eq!(record.counters["net_bytes_rx"], rx);
    assert_eq!(record.cgroup, format!("/{}", victim.relative));
    // Recorded once: the next start does not record it again.
    drop(daemon);
    let _daemon = Daemon::start(&args);
    assert_eq!(records_of(state.path(), "victim").len(), 1);
    assert!(records_of(state.path(), "server").is_empty());
}

/// A tmpfs of `size` on a fresh directory, detached on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn new(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "cgmetric-test",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        SmallFs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        crate::support::detach(self.0.path());
    }
}

/// The value of an unlabelled series of metrics.prom.
fn prom_value(daemon: &Daemon, family: &str) -> u64 {
    let prom = daemon.read("metrics.prom");
    prom.lines()
        .find_map(|l| l.strip_prefix(family)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {family}:\n{prom}"))
}

#[test]
fn a_full_disk_keeps_the_record_pending_until_it_fits() {
    require!("mount");
    let fs = SmallFs::new("256k");
    let state = fs.path().join("state");
    let parent = Cgroup::parent("full");
    let server = parent.child("server");
    let mut job = parent.child("job");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--state-dir", state.to_str().unwrap()]);
    assert_eq!(prom_value(&daemon, "cgmetric_ledger_write_errors_total"), 0);

    send(&job, &server, 1 << 20);
    let tx = daemon.number("job/net_bytes_tx");
    // Fill the disk, once the index (rewritten at most once a second) has
    // settled: replacing it could free a page.
    std::thread::sleep(Duration::from_millis(1500));
    let filler = fs.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 512 << 10]);
    for n in 0.. {
        if std::fs::write(fs.path().join(format!("page-{n}")), [0u8; 4096]).is_err() {
            break;
        }
    }
    job.remove();
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .path("exited/job")
            .exists()),
        "{}",
        daemon.stderr()
    );
    assert!(records_of(&state, "job").is_empty());
    assert!(prom_value(&daemon, "cgmetric_ledger_write_errors_total") >= 1);
    assert!(
        daemon.stderr().contains("records stay pending"),
        "{}",
        daemon.stderr()
    );
    // The ledger holds no torn line.
    let text = std::fs::read_to_string(state.join("ledger.jsonl")).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");

    // Room again: the record is written at a later refresh (a read of an
    // aggregate here), with the values taken when the container ended.
    std::fs::remove_file(&filler).unwrap();
    for entry in std::fs::read_dir(fs.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("page-")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    let written = eventually(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(200));
        daemon.read("metric");
        !records_of(&state, "job").is_empty()
    });
    assert!(written, "{}", daemon.stderr());
    let records = records_of(&state, "job");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].counters["net_bytes_tx"], tx);
    assert!(
        daemon.stderr().contains("written again"),
        "{}",
        daemon.stderr()
    );
}

/// The inode numbers the inotify watches of the process `pid` are on.
fn watched_inodes(pid: u32) -> Vec<u64> {
    let mut inodes = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("inotify ")) {
            let ino = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("ino:"))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            inodes.extend(ino);
        }
    }
    inodes
}

#[test]
fn the_watch_of_a_containers_last_process_ends_with_it() {
    require!();
    let parent = Cgroup::parent("watches");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let layout = crate::support::host_layout();
    let Some(v2) = layout.unified.clone() else {
        return; // No v2 tree: no cgroup.events to watch.
    };
    let mut boxes: Vec<Cgroup> = (0..20).map(|n| parent.child(&format!("b{n}"))).collect();
    assert!(eventually(Duration::from_secs(5), || daemon
        .path("b19")
        .exists()));
    let files: Vec<u64> = boxes
        .iter()
        .map(|b| {
            std::fs::metadata(v2.join(&b.relative).join("cgroup.events"))
                .unwrap()
                .ino()
        })
        .collect();
    let watched = watched_inodes(daemon.server_pid());
    assert!(files.iter().all(|f| watched.contains(f)));
    boxes.iter_mut().for_each(Cgroup::remove);
    // kernfs ends no watch on a removed cgroup's file: the daemon must.
    assert!(
        eventually(Duration::from_secs(5), || {
            let watched = watched_inodes(daemon.server_pid());
            files.iter().all(|f| !watched.contains(f))
        }),
        "the cgroup.events watches of removed containers stay"
    );
}

/// With `--net-class`, an ended container's classes are kept with its
/// totals: under `exited/` and in its ledger record, summing to them.
#[test]
fn an_exited_container_keeps_its_traffic_by_class() {
    require!();
    let parent = Cgroup::parent("exited-class");
    let server = parent.child("server");
    let mut sender = parent.child("sender");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--net-class", "lan=10.0.0.0/8"]);
    let state = daemon.state_dir().unwrap().to_path_buf();
    send(&sender, &server, 1 << 20);
    let tx = daemon.number("sender/net_bytes_tx");
    assert_eq!(daemon.number("sender/net_bytes_tx_loopback"), tx);
    end(&daemon, &mut sender, "sender");
    let kept = |class: &str| daemon.number(&format!("exited/sender/net_bytes_tx_{class}"));
    assert_eq!(
        (kept("loopback"), kept("lan"), kept("external")),
        (tx, 0, 0)
    );
    let records = records_of(&state, "sender");
    assert_eq!(records.len(), 1, "{records:?}");
    let counters = &records[0].counters;
    assert_eq!(counters.get("net_bytes_tx"), Some(&tx));
    assert_eq!(counters.get("net_bytes_tx_loopback"), Some(&tx));
    assert_eq!(counters.get("net_bytes_tx_lan"), Some(&0));
    assert_eq!(counters.get("net_bytes_rx_external"), Some(&0));
}

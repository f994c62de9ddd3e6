//! Least privilege: the daemon does its whole job with exactly the
//! capabilities the README and the systemd unit name, and no others.

use std::process::Command;
use std::time::Duration;

use crate::require;
use crate::support::{eventually, map_ids, tcp_peer, BpfDir, Cgroup, Daemon};

/// CAP_DAC_READ_SEARCH (2), CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_BPF (39).
const DOCUMENTED: u64 = 1 << 2 | 1 << 12 | 1 << 21 | 1 << 39;
const BOUNDING_SET: &str = "-all,+dac_read_search,+net_admin,+sys_admin,+bpf";

fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn the_documented_capabilities_are_enough() {
    require!("setpriv");
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("caps");
    let server = parent.child("server");
    let mut client = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    // A fresh bpf dir: loading, creating and pinning maps, attaching links.
    let daemon = Daemon::start_under(
        &[
            "setpriv",
            "--bounding-set",
            BOUNDING_SET,
            "--inh-caps",
            "-all",
            "--",
        ],
        &["--cgroup", &glob, "--bpf-dir", bpf.arg()],
    );
    assert_eq!(
        effective_caps(daemon.pid()),
        DOCUMENTED,
        "the daemon runs with exactly the documented capabilities"
    );

    // Traffic is counted.
    let (listener, addr) = server.serve("127.0.0.1", 1);
    let sent = client
        .start(Command::new(tcp_peer()).args(["client", &addr, "1", "100000", "0"]))
        .wait_with_output()
        .unwrap();
    assert!(sent.status.success());
    assert!(listener.wait_with_output().unwrap().status.success());
    std::thread::sleep(Duration::from_millis(300));
    let tx = daemon.number("client/net_bytes_tx");
    assert!(tx >= 100_000, "net_bytes_tx {tx}");
    // cgroupfs values are read.
    assert_eq!(daemon.read("client/pids_current"), "0\n");
    assert!(
        daemon.number("server/memory_usage") > 0 || daemon.read("server/memory_usage") == "0\n"
    );

    // A removed cgroup is swept from the maps: resolving ids by handle
    // (CAP_DAC_READ_SEARCH) works.
    let client_id = client.v2_id();
    assert!(map_ids(&bpf, cgmetric_common::NET_COUNTERS_MAP).contains(&client_id));
    client.remove();
    assert!(
        eventually(Duration::from_secs(5), || {
            let _ = std::fs::read_dir(&daemon.mountpoint).map(|d| d.count());
            !map_ids(&bpf, cgmetric_common::NET_COUNTERS_MAP).contains(&client_id)
        }),
        "the removed cgroup's entry stayed"
    );
    // No complaint, of cgmetric's or of aya's: a healthy start warns of
    // nothing.
    let log = daemon.stderr();
    assert!(
        log.lines()
            .all(|l| !l.contains("ERROR") && !l.contains("WARN")),
        "{log}"
    );
}

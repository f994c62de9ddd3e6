//! Crashes: the daemon SIGKILLed at random moments while traffic flows, in
//! the middle of starting up as well as while serving. Every restart must
//! clear the stale mount by itself, and the pinned counters lose nothing.

use std::process::Command;
use std::time::Duration;

use crate::require;
use crate::support::{
    finish, finish_client, heavy_turn, scratch_mountpoint, tcp_peer, BpfDir, Cgroup, Daemon, Rng,
};

const KILLS: usize = 20;

#[test]
fn twenty_kills_during_traffic_lose_nothing() {
    require!();
    let _turn = heavy_turn();
    let mut rng = Rng::seeded("twenty_kills_during_traffic_lose_nothing");
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("crash");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let args = ["--cgroup", &glob, "--bpf-dir", bpf.arg()];
    let (_dir, mountpoint) = scratch_mountpoint();

    // The programs attach before the traffic starts, so all of it counts.
    let mut daemon = Daemon::spawn_at(&mountpoint, &args);
    daemon.wait_mounted();

    let (server, addr) = server_cg.serve("127.0.0.1", 1);
    // 48 MiB in 64 KiB writes 10 ms apart: about 8 s, across the kills.
    let payload: u64 = 48 << 20;
    let client = client_cg.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &payload.to_string(),
        "0",
        "10",
    ]));

    let mut seen_tx = 0;
    for kill in 0..KILLS {
        // Every other kill lands while the daemon starts (clearing the
        // previous stale mount, loading, pinning, attaching, mounting);
        // the others once it serves, after a check that it healed.
        if kill % 2 == 0 {
            daemon.wait_mounted();
            let tx = daemon.number("client/net_bytes_tx");
            assert!(
                tx >= seen_tx,
                "kill {kill}: tx went back from {seen_tx} to {tx}"
            );
            seen_tx = tx;
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        daemon.crash_and_leave_the_mount();
        daemon = Daemon::spawn_at(&mountpoint, &args);
    }

    daemon.wait_mounted();
    let sent = finish_client(client);
    assert_eq!(sent.payload, payload);
    assert_eq!(finish(server), payload);
    std::thread::sleep(Duration::from_millis(300));
    let tx = daemon.number("client/net_bytes_tx");
    let rx = daemon.number("server/net_bytes_rx");
    // What the kernel sent (retransmits included) plus headers; attaching
    // twice would double it.
    assert!(
        tx >= sent.bytes_sent && tx < sent.bytes_sent + sent.bytes_sent / 50,
        "tx {tx} for {sent:?} (seed {})",
        rng.seed
    );
    assert!(
        rx >= payload && rx <= tx + 52,
        "rx {rx} vs tx {tx} (seed {})",
        rng.seed
    );
    drop(daemon);
}

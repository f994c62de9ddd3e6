//! The supervisor keeps the FUSE connection while its serving child dies
//! and is replaced: readers never see a stale mount, and where the kernel
//! resends what a dead server held (Linux 6.9+), not one failed read.

use std::os::unix::fs::DirEntryExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::require;
use crate::support::{
    eventually, finish, finish_client, heavy_turn, is_mounted, is_running, reading,
    scratch_mountpoint, tcp_peer, BpfDir, Cgroup, Daemon, Rng,
};

/// What a read may take while servers die: a restart is one discovery walk
/// and the pinned programs' reuse, well under this.
const SLOWEST_READ: Duration = Duration::from_secs(2);

/// The rate window the daemon is given. A read that carries rates and is
/// held across a server's death waits a window in each server (a new one
/// has no earlier reading to measure from), on top of [`SLOWEST_READ`].
const WINDOW: Duration = Duration::from_millis(500);

/// The files the readers loop over: a container's values (a counter that
/// must never go back among them), its `metrics`, and the aggregates.
const FILES: [&str; 7] = [
    "client/net_bytes_tx",
    "client/pids_current",
    "client/memory_usage",
    "client/metrics",
    "server/name",
    "metric",
    "metrics.prom",
];

/// Whether `file` carries rates.
fn has_rates(file: &str) -> bool {
    file == "metric" || file == "metrics.prom" || file.ends_with("/metrics")
}

#[derive(Default)]
struct Seen {
    reads: u64,
    /// Errors other than what the kernel gives for a request a dead server
    /// held where it cannot resend (ECONNABORTED).
    failures: Vec<String>,
    aborted: u64,
    /// The slowest read (less the two windows a read with rates may wait),
    /// its file, and when it ended (since the test began).
    slowest: Duration,
    slowest_read: String,
    went_back: Vec<String>,
    /// When each reader's latest read began: the next switch waits until
    /// every reader has begun one since the last, so no read is held
    /// across two (the bound below is for one).
    began_at: Vec<Instant>,
}

#[test]
fn readers_never_fail_across_twenty_server_kills_and_five_upgrades() {
    require!();
    let _turn = heavy_turn();
    let mut rng = Rng::seeded("readers_never_fail_across_twenty_server_kills_and_five_upgrades");
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("supervise");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let (_dir, mountpoint) = scratch_mountpoint();
    let window = format!("{}ms", WINDOW.as_millis());
    let args = [
        "--cgroup",
        &glob,
        "--window",
        &window,
        "--bpf-dir",
        bpf.arg(),
    ];
    let upgrade: Vec<&str> = args.iter().copied().chain(["--takeover"]).collect();
    let mut daemon = Daemon::spawn_at(&mountpoint, &args);
    daemon.wait_mounted();
    let (server, addr) = server_cg.serve("127.0.0.1", 1);
    // 24 MiB in 64 KiB writes 20 ms apart: about 8 s of traffic.
    let payload: u64 = 24 << 20;
    let client = client_cg.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &payload.to_string(),
        "0",
        "20",
    ]));

    let began = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen {
        began_at: vec![began; 8],
        ..Seen::default()
    }));
    let readers: Vec<_> = (0..8)
        .map(|reader| {
            let root = mountpoint.clone();
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut last_tx = 0u64;
                let mut i = reader;
                while !stop.load(Ordering::Relaxed) {
                    let file = FILES[i % FILES.len()];
                    i += 1;
                    let started = Instant::now();
                    seen.lock().unwrap().began_at[reader] = started;
                    let read = {
                        // Upgrades spawn daemons from this process.
                        let _reading = reading();
                        std::fs::read_to_string(root.join(file))
                    };
                    let took = match has_rates(file) {
                        true => started.elapsed().saturating_sub(2 * WINDOW),
                        false => started.elapsed(),
                    };
                    let mut seen = seen.lock().unwrap();
                    seen.reads += 1;
                    if took > seen.slowest {
                        seen.slowest = took;
                        seen.slowest_read = format!("{file}, ended at {:?}", began.elapsed());
                    }
                    match read {
                        Ok(text) if text.is_empty() || !text.ends_with('\n') => {
                            seen.failures.push(format!("{file}: {text:?}"))
                        }
                        Ok(text) if file == "client/net_bytes_tx" => {
                            let tx: u64 = text.trim().parse().unwrap();
                            if tx < last_tx {
                                seen.went_back.push(format!("{last_tx} -> {tx}"));
                            }
                            last_tx = tx;
                        }
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => seen.aborted += 1,
                        Err(e) => seen.failures.push(format!("{file}: {e}")),
                    }
                }
            })
        })
        .collect();

    const KILLS: usize = 20;
    const UPGRADES: usize = 5;
    let mut logs = String::new();
    // The longest a switch took, from the kill (or the upgrade's start) to
    // the first read the next server answered.
    let mut slowest_switch = Duration::ZERO;
    let mut switched = None;
    for round in 0..KILLS + UPGRADES + 1 {
        // Each server serves a while before it dies: a read answered means
        // the last one serves (on a loaded machine, starting one takes about
        // a second, and a server killed before it served makes its readers
        // wait for two).
        let _ = std::fs::read_to_string(mountpoint.join("server/name"));
        if let Some(at) = switched.take() {
            slowest_switch = slowest_switch.max(Instant::elapsed(&at));
            // The reads held across this switch are answered (each reader
            // has begun another) before the next one.
            assert!(
                eventually(Duration::from_secs(20), || seen
                    .lock()
                    .unwrap()
                    .began_at
                    .iter()
                    .all(|b| *b > at)),
                "a read held across the switch at {:?} was not answered in 20 s",
                at.duration_since(began)
            );
        }
        if round == KILLS + UPGRADES {
            break;
        }
        std::thread::sleep(Duration::from_millis(1000 + rng.below(500)));
        switched = Some(Instant::now());
        if round % 5 == 4 {
            // An upgrade in place: a new daemon takes the mount over.
            let next = Daemon::spawn_at(&mountpoint, &upgrade);
            let old = std::mem::replace(&mut daemon, next);
            logs.push_str(&old.stderr());
            old.taken_over();
            eprintln!("upgraded at {:?}", began.elapsed());
            continue;
        }
        let killed = daemon.kill_server();
        eprintln!("killed {killed} at {:?}", began.elapsed());
        assert!(
            eventually(Duration::from_secs(10), || daemon.server_pid() != killed),
            "no new server:\n{}",
            daemon.stderr()
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    readers.into_iter().for_each(|r| r.join().unwrap());

    let sent = finish_client(client);
    assert_eq!(sent.payload, payload);
    assert_eq!(finish(server), payload);
    let seen = seen.lock().unwrap();
    logs.push_str(&daemon.stderr());
    let log = logs;
    assert!(seen.failures.is_empty(), "{:?}\n{log}", seen.failures);
    assert!(
        seen.went_back.is_empty(),
        "net_bytes_tx went back: {:?}",
        seen.went_back
    );
    // A read waits for a switch at most. In an emulated guest (qemu's TCG)
    // a server takes seconds to start, so the bound grows with the slowest
    // switch measured here; on a real machine that stays under a second and
    // the bound is SLOWEST_READ.
    let bound = SLOWEST_READ.max(slowest_switch * 3 / 2);
    assert!(
        seen.slowest < bound,
        "a read took {:?} ({}; seed {}), the slowest switch {slowest_switch:?}:\n{log}",
        seen.slowest,
        seen.slowest_read,
        rng.seed
    );
    if cgmetric::supervise::kernel_resends() {
        assert_eq!(seen.aborted, 0, "reads failed on a kernel that resends");
    } else {
        // At most what each server held when it died: one per FUSE thread.
        assert!(
            seen.aborted <= ((KILLS + UPGRADES) * 4) as u64,
            "{} aborted reads",
            seen.aborted
        );
    }
    assert!(seen.reads > 1000, "only {} reads", seen.reads);
    assert_eq!(
        log.matches("starting another on the same connection")
            .count(),
        KILLS
    );
    assert_eq!(log.matches("took over").count(), UPGRADES);
    eprintln!(
        "{} reads, {} aborted, slowest {:?} (switch {slowest_switch:?}), across {KILLS} server \
         kills and {UPGRADES} upgrades",
        seen.reads, seen.aborted, seen.slowest
    );
}

#[test]
fn a_read_held_by_a_server_that_dies_is_answered_by_the_next() {
    require!();
    let parent = Cgroup::parent("resend");
    let _box = parent.child("box");
    let glob = format!("{}/*", parent.relative);
    // A rate's first read waits a window inside the server: long enough to
    // kill the server while it holds the request.
    let daemon = Daemon::start(&["--cgroup", &glob, "--window", "2s"]);
    let path = daemon.path("box/net_tx_bps");
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        (std::fs::read_to_string(path), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let killed = daemon.kill_server();
    let (read, took) = reader.join().unwrap();
    assert!(eventually(Duration::from_secs(10), || daemon.server_pid() != killed));
    if cgmetric::supervise::kernel_resends() {
        let text = read.unwrap_or_else(|e| panic!("{e}\n{}", daemon.stderr()));
        assert_eq!(text, "0\n");
    } else {
        let e = read.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    }
    assert!(took < Duration::from_secs(10), "the read took {took:?}");
    assert_eq!(daemon.read("box/name"), "box\n");
}

/// A server gives each container the slot (and so the inode numbers) the
/// last one gave it, though the two may key its cgroup differently: on a
/// hybrid host runc makes the v2 directory after the v1 ones, and a
/// container found in between is keyed by a v1 directory, later by the v2
/// one. The kernel keeps names for a minute; one that led to a number the
/// new server does not know failed every read below it.
#[test]
fn a_new_server_gives_a_container_the_inode_numbers_the_kernel_holds() {
    require!();
    let parent = Cgroup::parent("rekey");
    let mut late = parent.child_v2_later("late");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    assert_eq!(daemon.read("late/name"), "late\n");
    late.add_v2_dir();
    let listed = |daemon: &Daemon| {
        std::fs::read_dir(daemon.path(""))
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == "late")
            .map(|e| e.ino())
    };
    let ino = listed(&daemon).expect("late is listed");
    // The index the next server starts from has it.
    let index = daemon.state_dir().unwrap().join("containers.json");
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&index).is_ok_and(|t| t.contains(&late.relative))
    }));
    let killed = daemon.kill_server();
    assert!(eventually(Duration::from_secs(10), || daemon.server_pid() != killed));
    // Through the name the kernel kept: the old number, asked of the new
    // server.
    assert_eq!(daemon.read("late/name"), "late\n");
    assert_eq!(daemon.read("late/pids_current"), "0\n");
    assert_eq!(listed(&daemon), Some(ino));
}

#[test]
fn a_killed_supervisor_leaves_its_server_serving_until_the_next_start_takes_over() {
    require!();
    let parent = Cgroup::parent("orphan");
    let _box = parent.child("box");
    let glob = format!("{}/*", parent.relative);
    let (_dir, mountpoint) = scratch_mountpoint();
    let args = ["--cgroup", &glob];
    let mut daemon = Daemon::spawn_at(&mountpoint, &args);
    daemon.wait_mounted();
    let orphan = daemon.server_pid();
    daemon.signal(libc::SIGKILL);
    daemon
        .wait(Duration::from_secs(5))
        .expect("SIGKILL ends it");
    // The server holds the connection too.
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("box/name")).unwrap(),
        "box\n"
    );
    // A start without --takeover refuses the live mount and says what to do.
    let mut refused = Daemon::spawn_at(&mountpoint, &args);
    refused.leave_the_mount();
    let status = refused.wait(Duration::from_secs(10)).expect("it refuses");
    assert!(!status.success());
    assert!(
        refused.stderr().contains("--takeover"),
        "{}",
        refused.stderr()
    );
    drop(refused);
    // With it, the orphan is replaced on the same connection.
    let takeover = ["--cgroup", &glob, "--takeover"];
    let mut next = Daemon::spawn_at(&mountpoint, &takeover);
    next.wait_mounted();
    assert!(eventually(Duration::from_secs(5), || !is_running(orphan)));
    assert_eq!(next.read("box/name"), "box\n");
    assert!(next.server_pid() != orphan);
    assert!(next.stderr().contains("took over"), "{}", next.stderr());
    daemon.leave_the_mount();
}

#[test]
fn with_supervisor_and_server_gone_the_next_start_heals_the_stale_mount() {
    require!();
    let parent = Cgroup::parent("bothgone");
    let _box = parent.child("box");
    let glob = format!("{}/*", parent.relative);
    let (_dir, mountpoint) = scratch_mountpoint();
    // --takeover too: with nothing live to take, it clears the stale mount.
    let args = ["--cgroup", &glob, "--takeover"];
    let mut daemon = Daemon::spawn_at(&mountpoint, &args);
    daemon.wait_mounted();
    daemon.crash_and_leave_the_mount();
    // Stale: ENOTCONN, or ECONNABORTED for a read the closing ended.
    let stale = std::fs::read_to_string(mountpoint.join("box/name"));
    assert!(
        stale
            .as_ref()
            .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))),
        "{stale:?}"
    );
    let mut next = Daemon::spawn_at(&mountpoint, &args);
    next.wait_mounted();
    assert_eq!(next.read("box/name"), "box\n");
}

#[test]
fn an_unmount_stops_supervisor_and_server() {
    require!();
    let parent = Cgroup::parent("unmounted");
    let _box = parent.child("box");
    let glob = format!("{}/*", parent.relative);
    let mut daemon = Daemon::start(&["--cgroup", &glob]);
    let server = daemon.server_pid();
    let status = Command::new("umount")
        .arg(&daemon.mountpoint)
        .status()
        .unwrap();
    assert!(status.success());
    let exited = daemon
        .wait(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the supervisor stayed:\n{}", daemon.stderr()));
    assert!(exited.success(), "{exited}:\n{}", daemon.stderr());
    assert!(eventually(Duration::from_secs(5), || {
        !crate::support::is_running(server)
    }));
    assert!(!is_mounted(&daemon.mountpoint));
}

#[test]
fn a_server_that_cannot_start_unmounts_and_fails_once() {
    require!();
    let parent = Cgroup::parent("nostart");
    let _box = parent.child("box");
    let glob = format!("{}/*", parent.relative);
    // Pins cannot live outside a BPF filesystem: the server fails at start.
    let not_bpf = tempfile::tempdir().unwrap();
    let bpf_dir = not_bpf.path().to_str().unwrap();
    let (_dir, mountpoint) = scratch_mountpoint();
    let mut daemon = Daemon::spawn_at(&mountpoint, &["--cgroup", &glob, "--bpf-dir", bpf_dir]);
    let status = daemon
        .wait(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("it kept trying:\n{}", daemon.stderr()));
    assert!(!status.success());
    let log = daemon.stderr();
    assert!(log.contains("stopped before serving"), "{log}");
    assert!(!log.contains("starting another"), "{log}");
    assert!(!is_mounted(&mountpoint));
    assert!(matches!(
        std::fs::read_dir(&mountpoint).map(|d| d.count()),
        Ok(0)
    ));
}

/// systemd's side of sd_notify(3), for a test: a datagram socket that takes
/// notifications and the descriptors sent with them.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next notification: its text and the descriptors it carried.
    fn receive(&self) -> (String, Vec<std::os::fd::OwnedFd>) {
        use std::os::fd::{AsRawFd, FromRawFd};
        let mut text = [0u8; 4096];
        let mut control = [0u8; 256];
        let mut iov = libc::iovec {
            iov_base: text.as_mut_ptr().cast(),
            iov_len: text.len(),
        };
        // SAFETY: msghdr is plain data; every pointer set below outlives
        // the recvmsg call.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = control.len();
        // SAFETY: receives into the buffers the header points at.
        let size = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut message, 0) };
        assert!(size >= 0, "{}", std::io::Error::last_os_error());
        let mut fds = Vec::new();
        // SAFETY: walks the control messages the kernel wrote.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&message);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const i32;
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..count {
                        fds.push(std::os::fd::OwnedFd::from_raw_fd(*data.add(i)));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&message, cmsg);
            }
        }
        let text = String::from_utf8_lossy(&text[..size as usize]).into_owned();
        (text, fds)
    }
}

#[test]
fn a_restart_under_systemd_keeps_the_mount_through_its_descriptor_store() {
    use std::os::fd::AsRawFd;
    require!();
    let parent = Cgroup::parent("fdstore");
    let _box = parent.child("box");
    let glob = format!("{}/*", parent.relative);
    let (_dir, mountpoint) = scratch_mountpoint();
    let notify = NotifySocket::new();
    let socket = notify.path.to_str().unwrap();
    // What systemd sets for a Type=notify unit with FileDescriptorStoreMax=1.
    let service = [("NOTIFY_SOCKET", socket), ("FDSTORE", "1")];
    let args = ["--cgroup", &glob, "--no-ebpf"];
    let mut first = Daemon::spawn_as_service(&mountpoint, &args, &service, None);
    first.wait_mounted();
    let mut stored = None;
    let mut ready = false;
    while stored.is_none() || !ready {
        let (text, mut fds) = notify.receive();
        if text.contains("FDSTORE=1") {
            assert!(text.contains("FDNAME=cgmetric-fuse"), "{text}");
            assert_eq!(fds.len(), 1, "{text}");
            stored = fds.pop();
        }
        ready |= text.lines().any(|l| l == "READY=1");
    }
    let stored = stored.unwrap();

    // A reader loops through the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop) = (mountpoint.join("box/name"), stop.clone());
        std::thread::spawn(move || {
            let (mut failures, mut slowest) = (Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match std::fs::read_to_string(&path) {
                    Ok(text) if text == "box\n" => {}
                    other => failures.push(format!("{other:?}")),
                }
                slowest = slowest.max(started.elapsed());
            }
            (failures, slowest)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // `systemctl restart`: SIGTERM, a pause, a start with what was stored.
    first.signal(libc::SIGTERM);
    let status = first.wait(Duration::from_secs(10)).expect("it stops");
    assert!(status.success(), "{status}:\n{}", first.stderr());
    assert!(
        is_mounted(&mountpoint),
        "the mount went:\n{}",
        first.stderr()
    );
    first.leave_the_mount();
    std::thread::sleep(Duration::from_millis(500));
    let mut second = Daemon::spawn_as_service(
        &mountpoint,
        &args,
        &[
            ("NOTIFY_SOCKET", socket),
            ("FDSTORE", "1"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "cgmetric-fuse"),
        ],
        Some(stored.as_raw_fd()),
    );
    second.wait_mounted();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (failures, slowest) = reader.join().unwrap();
    if cgmetric::supervise::kernel_resends() {
        assert!(failures.is_empty(), "{failures:?}\n{}", second.stderr());
    } else {
        // Before Linux 6.9 the read the stopping server held fails once.
        assert!(
            failures.len() <= 1 && failures.iter().all(|f| f.contains("ConnectionAborted")),
            "{failures:?}\n{}",
            second.stderr()
        );
    }
    // The reader waited through the pause rather than fail.
    assert!(
        slowest >= Duration::from_millis(400),
        "slowest read {slowest:?}"
    );
    assert!(
        second.stderr().contains("systemd kept the connection"),
        "{}",
        second.stderr()
    );
    drop(stored);
}

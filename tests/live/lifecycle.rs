//! The daemon's life: ready when mounted, clean stops, stale-mount healing,
//! and one clear line for every reason it refuses to start.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::require;
use crate::support::{binary, detach, is_mounted, scratch_mountpoint, Cgroup, Daemon};

/// Runs cgmetric expecting it to refuse to start: its exit status and stderr.
fn refusal(command: &mut Command) -> (i32, String) {
    let out = command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run cgmetric");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line(stderr: &str, needle: &str) {
    assert_eq!(stderr.lines().count(), 1, "expected one line:\n{stderr}");
    assert!(
        stderr.contains("ERROR") && stderr.contains(needle),
        "{stderr}"
    );
}

#[test]
fn the_tree_is_complete_when_the_mountpoint_appears() {
    require!();
    let parent = Cgroup::parent("ready");
    let _a = parent.child("a");
    let _b = parent.child("b");
    let glob = format!("{}/*", parent.relative);
    let (_dir, mountpoint) = scratch_mountpoint();
    let _daemon = Daemon::spawn_at(&mountpoint, &["--cgroup", &glob]);
    // The mount appears before the server has discovered anything; the
    // very first look after it appears waits for the tree, then shows it
    // all.
    assert!(crate::support::eventually(Duration::from_secs(15), || {
        crate::support::is_mounted(&mountpoint)
    }));
    let names: Vec<String> = std::fs::read_dir(&mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"a".into()) && names.contains(&"b".into()),
        "{names:?}"
    );
}

#[test]
fn sigterm_and_sigint_unmount_and_exit_zero() {
    require!();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut daemon = Daemon::start(&[]);
        daemon.signal(signal);
        let status = daemon
            .wait(Duration::from_secs(10))
            .expect("the daemon exits");
        assert!(
            status.success(),
            "signal {signal}: {status}\n{}",
            daemon.stderr()
        );
        assert!(!is_mounted(&daemon.mountpoint));
    }
}

#[test]
fn sigterm_with_a_reader_inside_still_unmounts() {
    require!();
    let mut daemon = Daemon::start(&[]);
    // A shell whose working directory is inside the tree keeps it busy.
    let mut shell = Command::new("sleep")
        .arg("600")
        .current_dir(&daemon.mountpoint)
        .spawn()
        .unwrap();
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("the daemon exits");
    let _ = shell.kill();
    let _ = shell.wait();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
    assert!(!is_mounted(&daemon.mountpoint));
}

#[test]
fn an_external_umount_ends_the_daemon() {
    require!();
    let mut daemon = Daemon::start(&[]);
    let status = Command::new("umount")
        .arg(&daemon.mountpoint)
        .status()
        .unwrap();
    assert!(status.success());
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("the daemon exits");
    assert!(status.success(), "{status}\n{}", daemon.stderr());
}

#[test]
fn a_stale_mount_from_a_killed_daemon_is_cleared_at_start() {
    require!();
    let parent = Cgroup::parent("stale");
    let _box1 = parent.child("box1");
    let glob = format!("{}/*", parent.relative);
    let mut first = Daemon::start(&["--cgroup", &glob]);
    first.crash();
    let err = cgmetric::mounts::statfs(&first.mountpoint).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");

    let mut second = Daemon::spawn_at(&first.mountpoint, &["--cgroup", &glob]);
    second.wait_mounted();
    assert_eq!(second.read("box1/pids_current"), "0\n");
    assert!(
        second.stderr().contains("cleared a stale cgmetric mount"),
        "{}",
        second.stderr()
    );
    drop(second);
    assert!(!is_mounted(&first.mountpoint));
}

#[test]
fn refuses_without_root() {
    require!();
    let mountpoint = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary());
    command.arg(mountpoint.path()).uid(65534).gid(65534);
    let (code, stderr) = refusal(&mut command);
    assert_ne!(code, 0);
    assert_one_line(&stderr, "must run as root");
}

#[test]
fn refuses_a_missing_mountpoint() {
    require!();
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = refusal(Command::new(binary()).arg(dir.path().join("absent")));
    assert_ne!(code, 0);
    assert_one_line(&stderr, "does not exist");
}

#[test]
fn refuses_a_mountpoint_in_use() {
    require!();
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "cgmetric-test", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, stderr) = refusal(Command::new(binary()).arg(dir.path()));
    detach(dir.path());
    assert_ne!(code, 0);
    assert_one_line(&stderr, "is in use: tmpfs is mounted there");

    // A live cgmetric is in use too: a second daemon does not steal it.
    let daemon = Daemon::start(&[]);
    let (code, stderr) = refusal(Command::new(binary()).arg(&daemon.mountpoint));
    assert_ne!(code, 0);
    assert_one_line(&stderr, "is in use: fuse.cgmetric");
    assert_eq!(daemon.read("metric"), "");
}

#[test]
fn refuses_without_a_cgroup_filesystem() {
    require!();
    let mountpoint = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (code, stderr) = refusal(
        Command::new(binary())
            .arg("--cgroup-root")
            .arg(empty.path())
            .arg(mountpoint.path()),
    );
    assert_ne!(code, 0);
    assert_one_line(&stderr, "no cgroup filesystem found");
}

#[test]
fn refuses_without_dev_fuse() {
    require!();
    let mountpoint = tempfile::tempdir().unwrap();
    // A private mount namespace whose /dev has no fuse device.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} {}",
        binary(),
        mountpoint.path().display()
    );
    let (code, stderr) = refusal(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_ne!(code, 0);
    assert_one_line(&stderr, "/dev/fuse does not exist");
}

#[test]
fn refuses_a_bad_glob() {
    require!();
    let mountpoint = tempfile::tempdir().unwrap();
    let (code, stderr) = refusal(
        Command::new(binary())
            .args(["--cgroup", "a/[b"])
            .arg(mountpoint.path()),
    );
    assert_ne!(code, 0);
    assert_one_line(&stderr, "invalid --cgroup pattern");
}

#[test]
fn rust_log_controls_logging() {
    require!();
    let (_dir, mountpoint) = scratch_mountpoint();
    // Not /var/lib/cgmetric, the package test's (tests/package).
    let state = tempfile::tempdir().unwrap();
    for (level, expect_info) in [("error", false), ("info", true)] {
        let child = Command::new(binary())
            .arg("--no-ebpf")
            .arg("--state-dir")
            .arg(state.path())
            .arg(&mountpoint)
            .env("RUST_LOG", level)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(crate::support::eventually(Duration::from_secs(10), || {
            crate::support::is_live(&mountpoint)
        }));
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains("mounted at"),
            expect_info,
            "RUST_LOG={level}: {stderr}"
        );
        assert!(!Path::new(&mountpoint).join("metric").exists());
    }
}

#[test]
fn refuses_an_unwritable_state_dir() {
    require!("unshare", "mount");
    let mountpoint = tempfile::tempdir().unwrap();
    // A path below a file.
    let file = tempfile::NamedTempFile::new().unwrap();
    let (code, stderr) = refusal(
        Command::new(binary())
            .arg("--state-dir")
            .arg(file.path().join("state"))
            .arg(mountpoint.path()),
    );
    assert_ne!(code, 0);
    assert_one_line(&stderr, "--state-dir");
    // A read-only bind mount, in a mount namespace of its own (nothing to
    // clean up on the host).
    let state = tempfile::tempdir().unwrap();
    let script = format!(
        "mount --bind -o ro {state} {state} && exec {cgmetric} --state-dir {state} {mnt}",
        state = state.path().display(),
        cgmetric = binary(),
        mnt = mountpoint.path().display()
    );
    let (code, stderr) = refusal(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_ne!(code, 0);
    assert_one_line(&stderr, "Read-only file system");
    assert!(stderr.contains("--state-dir"), "{stderr}");
}

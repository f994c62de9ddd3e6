//! `mount -t cgmetric` and fstab through the real mount(8) and umount(8).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::require;
use crate::support::{
    eventually, host_lock, is_live, workspace_binary, BpfDir, Cgroup, HostLock, HELPER_LOCK,
};

const HELPER: &str = "/sbin/mount.cgmetric";

/// mount(8) finds helpers in /sbin: the tests link the built helper there
/// while they run, one at a time, and remove the link afterwards. The
/// package test (tests/package), which installs its own helper there, takes
/// the same host-wide turn.
struct Helper {
    _turn: MutexGuard<'static, ()>,
    _host: HostLock,
}

impl Helper {
    fn install() -> Helper {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let built = workspace_binary("mount-cgmetric", "mount-cgmetric");
        let host = host_lock(HELPER_LOCK);
        let _ = std::fs::remove_file(HELPER);
        std::os::unix::fs::symlink(&built, HELPER).unwrap();
        Helper {
            _turn: turn,
            _host: host,
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(HELPER);
    }
}

fn mount(args: &[&str]) -> Output {
    Command::new("mount").args(args).output().expect("mount(8)")
}

/// Whether a cgmetric daemon serving `mountpoint` still runs.
fn daemon_running(mountpoint: &Path) -> bool {
    let needle = mountpoint.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| {
                let args: Vec<String> = c
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.first().is_some_and(|a| a.ends_with("/cgmetric")) && args.contains(&needle)
            })
            .unwrap_or(false)
    })
}

fn fresh_mountpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    (dir, mountpoint)
}

#[test]
fn mount_t_cgmetric_mounts_and_umount_ends_the_daemon() {
    require!("mount", "umount");
    let _helper = Helper::install();
    let parent = Cgroup::parent("mount");
    let _box1 = parent.child("box1");
    let bpf = BpfDir::new();
    let (_dir, mountpoint) = fresh_mountpoint();
    let state = tempfile::tempdir().unwrap();
    let options = format!(
        "cgroup={}/*,bpf_dir={},state_dir={}",
        parent.relative,
        bpf.arg(),
        state.path().display()
    );
    let out = mount(&[
        "-t",
        "cgmetric",
        "cgmetric",
        mountpoint.to_str().unwrap(),
        "-o",
        &options,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // mount returned: the tree is there, already complete.
    assert!(is_live(&mountpoint));
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("box1/pids_current")).unwrap(),
        "0\n"
    );
    assert!(mountpoint.join("box1/net_bytes_tx").exists());
    assert!(daemon_running(&mountpoint));

    let status = Command::new("umount").arg(&mountpoint).status().unwrap();
    assert!(status.success());
    assert!(
        eventually(Duration::from_secs(10), || !daemon_running(&mountpoint)),
        "umount did not end the daemon"
    );
}

#[test]
fn an_fstab_line_mounts() {
    require!("mount", "umount");
    let _helper = Helper::install();
    let parent = Cgroup::parent("fstab");
    let _box1 = parent.child("box1");
    let (dir, mountpoint) = fresh_mountpoint();
    let fstab = dir.path().join("fstab");
    // A state directory of its own: the default, /var/lib/cgmetric, is the
    // package test's (tests/package), and would outlive the test.
    let state = dir.path().join("state");
    std::fs::write(
        &fstab,
        format!(
            "cgmetric {} cgmetric cgroup={}/*,no_ebpf,state_dir={},nofail 0 0\n",
            mountpoint.display(),
            parent.relative,
            state.display()
        ),
    )
    .unwrap();
    let out = mount(&["-T", fstab.to_str().unwrap(), mountpoint.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("box1/name")).unwrap(),
        "box1\n"
    );
    assert!(
        !mountpoint.join("box1/net_bytes_tx").exists(),
        "no_ebpf was passed on"
    );
    assert!(Command::new("umount")
        .arg(&mountpoint)
        .status()
        .unwrap()
        .success());
    assert!(eventually(Duration::from_secs(10), || !daemon_running(
        &mountpoint
    )));
}

#[test]
fn unknown_words_and_daemon_refusals_are_clear_errors() {
    require!("mount");
    let _helper = Helper::install();
    let (_dir, mountpoint) = fresh_mountpoint();
    let target = mountpoint.to_str().unwrap();

    let out = mount(&["-t", "cgmetric", "cgmetric", target, "-o", "bogus=1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown option 'bogus=1'"), "{stderr}");

    // The daemon opens its ledger before it checks bpf_dir: a state
    // directory of the test's, not /var/lib/cgmetric.
    let state = tempfile::tempdir().unwrap();
    let options = format!(
        "bpf_dir=/tmp/not-bpffs,state_dir={}",
        state.path().display()
    );
    let out = mount(&["-t", "cgmetric", "cgmetric", target, "-o", &options]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not on a bpf filesystem"), "{stderr}");
    assert!(!is_live(&mountpoint));
    assert!(!daemon_running(&mountpoint));
}

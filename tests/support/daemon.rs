//! The daemon harness: a real `cgmetric` on a per-test mountpoint, its
//! pinned eBPF objects, the binaries of the workspace, and the mount table
//! checks around it. Everything is released in `Drop`.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::names::unique;
use super::timing::reading;

/// A running `cgmetric` on its own temporary mountpoint.
pub struct Daemon {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    /// The daemon's own pins, unless the test passed --bpf-dir or --no-ebpf.
    _bpf_dir: Option<BpfDir>,
    /// The daemon's own --state-dir (ledger and index), unless the test
    /// passed one: parallel daemons never share /var/lib/cgmetric.
    state_dir: Option<tempfile::TempDir>,
    leave_mount: bool,
}

impl Daemon {
    /// Starts the daemon on a fresh mountpoint and waits until it is mounted.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).unwrap();
        let mut daemon = Daemon::spawn_at(&mountpoint, args);
        daemon._dir = Some(dir);
        daemon.wait_mounted();
        daemon
    }

    /// Starts the daemon on `mountpoint` without waiting. Unless `args`
    /// choose otherwise, it pins its eBPF objects in a directory of its own.
    pub fn spawn_at(mountpoint: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn_under(&[], mountpoint, args)
    }

    /// Starts the daemon through `wrapper` (a program that execs the rest
    /// of its command line, such as setpriv) and waits until it is mounted.
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).unwrap();
        let mut daemon = Daemon::spawn_under(wrapper, &mountpoint, args);
        daemon._dir = Some(dir);
        daemon.wait_mounted();
        daemon
    }

    fn spawn_under(wrapper: &[&str], mountpoint: &Path, args: &[&str]) -> Daemon {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("stderr");
        let own_bpf_dir =
            (!args.iter().any(|a| *a == "--bpf-dir" || *a == "--no-ebpf")).then(BpfDir::new);
        let own_state_dir = (!args.contains(&"--state-dir")).then(|| tempfile::tempdir().unwrap());
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        command.args(args);
        if let Some(dir) = &own_bpf_dir {
            command.args(["--bpf-dir", dir.arg()]);
        }
        if let Some(dir) = &own_state_dir {
            command.arg("--state-dir").arg(dir.path());
        }
        let child = command
            .arg(mountpoint)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cgmetric");
        Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            _dir: None,
            log,
            _log_dir: log_dir,
            _bpf_dir: own_bpf_dir,
            state_dir: own_state_dir,
            leave_mount: false,
        }
    }

    pub fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !is_live(&self.mountpoint) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "cgmetric exited with {status} before mounting:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "cgmetric did not mount in time:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's own state directory (none if the test passed one).
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_ref().map(|d| d.path())
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(relative)
    }

    pub fn read(&self, relative: &str) -> String {
        let path = self.path(relative);
        let _reading = reading();
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.stderr()))
    }

    /// A single-number file.
    pub fn number(&self, relative: &str) -> u64 {
        let text = self.read(relative);
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{relative}: not a number: {text:?}"))
    }

    pub fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits for the daemon to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL, leaving its mount behind (stale).
    pub fn crash(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(5))
            .expect("SIGKILL ends the daemon");
    }

    /// Kills the daemon with SIGKILL and leaves its stale mount for the next
    /// daemon on the same mountpoint to clear.
    pub fn crash_and_leave_the_mount(mut self) {
        self.crash();
        self.leave_mount = true;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait(Duration::from_secs(5)).is_none() {
                self.signal(libc::SIGKILL);
                let _ = self.wait(Duration::from_secs(5));
            }
        }
        if !self.leave_mount && is_mounted(&self.mountpoint) {
            detach(&self.mountpoint);
        }
    }
}

pub use cgmetric::mounts::is_live_cgmetric as is_live;

/// Whether a cgmetric filesystem, live or stale, is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = cgmetric::mounts::read_mount_table().unwrap();
    cgmetric::mounts::mount_at(&mounts, path)
        .is_some_and(|m| m.fs_type == cgmetric::mounts::FS_TYPE)
}

pub fn detach(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// A directory for one daemon's pinned eBPF maps and links, removed (which
/// detaches the programs) on drop.
pub struct BpfDir(pub PathBuf);

impl BpfDir {
    pub fn new() -> BpfDir {
        BpfDir(PathBuf::from("/sys/fs/bpf").join(unique("cgmt")))
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cgmetric")
}

/// Set where there is no cargo (the VM matrix, `tests/vm/run`): the binaries
/// of the profile were built beforehand and are used as they are.
pub const PREBUILT_ENV: &str = "CGMETRIC_TEST_PREBUILT";

/// Runs `cargo build ARGS` in this test's profile and returns the profile's
/// target directory. `cargo test --test live` alone builds no other package,
/// and a stale helper lies.
fn cargo_build(args: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    if std::env::var_os(PREBUILT_ENV).is_some() {
        return profile_dir;
    }
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet"]).args(args);
    if profile_dir.ends_with("release") {
        cargo.arg("--release");
    }
    let status = cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "cargo build {args:?} failed");
    profile_dir
}

/// A binary of another workspace package, freshly built.
pub fn workspace_binary(package: &str, binary: &str) -> PathBuf {
    cargo_build(&["-p", package]).join(binary)
}

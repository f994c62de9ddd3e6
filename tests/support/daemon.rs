//! The daemon harness: a real `cgmetric` on a per-test mountpoint, its
//! pinned eBPF objects, the binaries of the workspace, and the mount table
//! checks around it. Everything is released in `Drop`.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::names::unique;
use super::timing::reading;

/// A running `cgmetric` on its own temporary mountpoint.
pub struct Daemon {
    /// The command line the test gave.
    args: Vec<String>,
    /// Its process group: the daemon leads one, which its servers join.
    group: i32,
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

    /// Starts the daemon on `mountpoint` as a service manager would: with
    /// `env` set and, if given, `passed` as its descriptor 3 (sd_listen_fds:
    /// `LISTEN_PID` is set to the daemon's own pid by a shell that execs it).
    pub fn spawn_as_service(
        mountpoint: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        passed: Option<i32>,
    ) -> Daemon {
        let wrapper = ["sh", "-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""];
        let configure = |command: &mut Command| {
            command.envs(env.iter().copied());
            if let Some(fd) = passed {
                // SAFETY: dup2 and fcntl are async-signal-safe; fd is open
                // in the parent for the spawn's duration.
                unsafe {
                    command.pre_exec(move || {
                        if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        };
        Daemon::spawn_with(&wrapper, mountpoint, args, configure)
    }

    fn spawn_under(wrapper: &[&str], mountpoint: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn_with(wrapper, mountpoint, args, |_| {})
    }

    fn spawn_with(
        wrapper: &[&str],
        mountpoint: &Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
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
        configure(&mut command);
        // A spawn may fork (pre_exec, a process group): not while this
        // process's threads read (see `timing::FORKING`).
        let _forking = super::timing::forking();
        let child = command
            .arg(mountpoint)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .expect("start cgmetric");
        Daemon {
            args: args.iter().map(|a| a.to_string()).collect(),
            group: child.id() as i32,
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

    /// The process started: the supervisor, unless `--no-supervise`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The process that serves the tree: the supervisor's child, or the
    /// daemon itself under `--no-supervise`. Waits for a child that a
    /// supervisor is starting.
    pub fn server_pid(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.servers().first() {
                Some(pid) => return *pid,
                None if !self.supervised() => return self.pid(),
                None => {
                    assert!(Instant::now() < deadline, "no server process started");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Kills the serving child with SIGKILL, as a crash would; the
    /// supervisor starts another. Returns the killed one's pid.
    pub fn kill_server(&self) -> u32 {
        assert!(
            self.supervised(),
            "only a supervised daemon has a server to kill"
        );
        let pid = self.server_pid();
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        pid
    }

    fn supervised(&self) -> bool {
        !self.args.iter().any(|a| a == "--no-supervise")
    }

    /// The supervisor's children (its servers; one, or none between two).
    fn servers(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let pid = child.id();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
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

    /// Kills the daemon with SIGKILL, supervisor and server at once (its
    /// process group: a server being started is in it too), leaving its
    /// mount behind (stale).
    pub fn crash(&mut self) {
        let group = self.group;
        let servers = self.servers();
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        self.wait(Duration::from_secs(5))
            .expect("SIGKILL ends the daemon");
        kill_and_reap(&servers);
        wait_group_gone(group);
    }

    /// Leaves the mount alone when dropped: another daemon's, or to be
    /// cleared by the next.
    pub fn leave_the_mount(&mut self) {
        self.leave_mount = true;
    }

    /// Waits for the daemon to be stopped by one that took its mount over,
    /// and leaves that mount to the new one.
    pub fn taken_over(mut self) {
        self.leave_mount = true;
        let status = self.wait(Duration::from_secs(10));
        assert!(
            status.is_some(),
            "a daemon taken over stayed:\n{}",
            self.stderr()
        );
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
            let servers = self.servers();
            self.signal(libc::SIGTERM);
            if self.wait(Duration::from_secs(5)).is_none() {
                self.signal(libc::SIGKILL);
                let _ = self.wait(Duration::from_secs(5));
            }
            // A supervisor that was killed leaves its server running.
            kill_and_reap(&servers);
            let group = self.group;
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            wait_group_gone(group);
        }
        if !self.leave_mount && is_mounted(&self.mountpoint) {
            detach(&self.mountpoint);
        }
    }
}

/// An empty mountpoint in a directory of its own (removed when the guard
/// drops), for tests whose daemons come and go on one mountpoint.
pub fn scratch_mountpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    (dir, mountpoint)
}

/// Kills `pids` (orphans, reaped by init) and waits until they are gone.
fn kill_and_reap(pids: &[u32]) {
    for pid in pids {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|pid| is_running(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until no process of process group `group` runs (zombies, which
/// whoever adopted them reaps in its own time, do not count).
fn wait_group_gone(group: i32) {
    let in_group = || {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                    return false;
                };
                let Some((_, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let pid = entry.file_name().to_str().and_then(|p| p.parse().ok());
                fields.len() > 2 && fields[2] == group.to_string() && pid.is_some_and(is_running)
            })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_group() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a process that has not exited: one of its threads is
/// not a zombie. (A group leader that exits first is a zombie while its
/// other threads still run, and still hold the process's files.)
pub fn is_running(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_string();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    })
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

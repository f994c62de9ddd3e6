//! The harness of the privileged tests: real cgroups in every hierarchy, a
//! real daemon on a per-test mountpoint, and cleanup that runs even when a
//! test fails (everything is released in `Drop`).

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cgmetric::cgroup::{Controller, Layout, LayoutKind};

/// Set by `.ci/run`: a test that cannot run fails instead of skipping.
pub const REQUIRE_ENV: &str = "CGMETRIC_REQUIRE_PRIVILEGED";

/// Whether the privileged tests can run here. When they cannot, says why on
/// stderr and returns false, or panics when [`REQUIRE_ENV`] is set.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse".to_string())
    } else if let Err(e) = Layout::detect(Path::new("/sys/fs/cgroup")) {
        Some(e.to_string())
    } else {
        None
    };
    skip_unless(test, missing)
}

/// Like [`privileged`], for an external program the test drives.
pub fn tool(test: &str, program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    skip_unless(
        test,
        (!found).then(|| format!("{program} is not installed")),
    )
}

fn skip_unless(test: &str, missing: Option<String>) -> bool {
    let Some(why) = missing else { return true };
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{test} cannot run: {why} ({REQUIRE_ENV}=1 makes this a failure)");
    }
    // Straight to the process's stderr: libtest captures eprintln! and would
    // hide the skip of a test that then counts as passed.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

#[macro_export]
macro_rules! require {
    ($($tool:literal),*) => {
        // The enclosing test's path, from a function nested in it.
        fn here() {}
        let name = std::any::type_name_of_val(&here);
        let test = name.strip_suffix("::here").unwrap_or(name);
        if !$crate::support::privileged(test) { return; }
        $(if !$crate::support::tool(test, $tool) { return; })*
    };
}

/// Enables, where it can, every controller cgmetric reads for the children
/// of a v2 cgroup. Failure is left to show in the test: a controller the
/// kernel lacks, or processes in `dir` (v2 allows none where children have
/// controllers).
fn enable_controllers(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids +io");
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// How many descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The online CPUs, from the kernel's list ("0-3,8").
pub fn online_cpus() -> Vec<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    text.trim()
        .split(',')
        .flat_map(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()
        })
        .collect()
}

/// Where each of a process's descriptors points.
pub fn fd_targets(pid: u32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .collect()
}

/// The cgroup ids in one of a daemon's pinned counter maps
/// (`NET_COUNTERS_MAP` or `CONN_COUNTERS_MAP`).
pub fn map_ids(bpf: &BpfDir, name: &str) -> std::collections::HashSet<u64> {
    use aya::maps::{Map, MapData, PerCpuHashMap};
    use cgmetric_common::{ConnCounters, NetCounters, NET_COUNTERS_MAP};
    let map = Map::PerCpuHashMap(MapData::from_pin(bpf.0.join(name)).unwrap());
    match name {
        NET_COUNTERS_MAP => PerCpuHashMap::<_, u64, NetCounters>::try_from(map)
            .unwrap()
            .keys()
            .filter_map(Result::ok)
            .collect(),
        _ => PerCpuHashMap::<_, u64, ConnCounters>::try_from(map)
            .unwrap()
            .keys()
            .filter_map(Result::ok)
            .collect(),
    }
}

/// `promtool check metrics` on an exposition: whether it passed, and what
/// it said.
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// `pre_exec` makes std fork() instead of vfork(). A fork while another
/// thread's direct-I/O read is in flight can land the data in the page the
/// child now owns (the read's buffer was pinned without FOLL_PIN: kernels
/// before the fuse switch to pinned pages; seen on 6.1): the reader sees its
/// buffer's previous bytes with the new length. Tests that read from many
/// threads hold [`reading`] around each read; spawning waits for them.
static FORKING: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub fn reading() -> std::sync::RwLockReadGuard<'static, ()> {
    FORKING.read().unwrap_or_else(|e| e.into_inner())
}

/// A small deterministic generator for tests that pick random moments. The
/// seed comes from CGMETRIC_TEST_SEED or the clock; failures print it.
pub struct Rng {
    pub seed: u64,
    state: u64,
}

impl Rng {
    pub fn seeded(test: &str) -> Rng {
        let seed = std::env::var("CGMETRIC_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{test}: CGMETRIC_TEST_SEED={seed}");
        Rng {
            seed,
            state: seed | 1,
        }
    }

    /// A number below `bound` (xorshift64*).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
    }
}

/// A name no other test, run or process uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn host_layout() -> Layout {
    Layout::detect(Path::new("/sys/fs/cgroup")).expect("cgroup layout")
}

/// One cgroup, created at the same relative path in every hierarchy cgmetric
/// reads. Its processes are killed and its directories removed on drop.
pub struct Cgroup {
    pub relative: String,
    layout: Layout,
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Cgroup {
    /// A fresh top-level cgroup for one test; its containers go below it.
    pub fn parent(test: &str) -> Cgroup {
        Cgroup::create(unique(&format!("cgmt-{test}")))
    }

    pub fn child(&self, name: &str) -> Cgroup {
        Cgroup::create(format!("{}/{name}", self.relative))
    }

    /// A top-level cgroup with exactly this name (make it unique).
    pub fn top(name: &str) -> Cgroup {
        Cgroup::create(name.to_string())
    }

    fn create(relative: String) -> Cgroup {
        let layout = host_layout();
        let mut dirs = Vec::new();
        for root in layout.hierarchies() {
            let dir = root.join(&relative);
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            dirs.push(dir);
        }
        if layout.kind == LayoutKind::Unified {
            // Pure v2: a cgroup has the controllers its parent enables. Only
            // ancestors enable them: a cgroup that does cannot hold
            // processes ("no internal processes"), and tests put theirs in
            // the cgroups they create.
            let mut dir = layout.unified.clone().unwrap();
            enable_controllers(&dir);
            for part in Path::new(&relative)
                .parent()
                .into_iter()
                .flat_map(|p| p.iter())
            {
                dir.push(part);
                enable_controllers(&dir);
            }
        }
        Cgroup {
            relative,
            layout,
            dirs,
            children: Vec::new(),
        }
    }

    /// Pure v2: gives the cgroups made below this one, by hand, the
    /// controllers (a no-op elsewhere). This cgroup can then hold no
    /// processes.
    pub fn enable_controllers_below(&self) {
        if self.layout.kind == LayoutKind::Unified {
            enable_controllers(&self.layout.unified.as_ref().unwrap().join(&self.relative));
        }
    }

    /// Hands the cgroup to a user, as delegation does.
    pub fn chown(&self, uid: u32, gid: u32) {
        for dir in &self.dirs {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
        }
    }

    /// The directory holding `controller`'s files: its v1 hierarchy when
    /// mounted, else the v2 tree.
    pub fn dir(&self, controller: Controller) -> PathBuf {
        match self.layout.v1(controller) {
            Some(root) => root.join(&self.relative),
            None => self.layout.unified.as_ref().unwrap().join(&self.relative),
        }
    }

    pub fn is_v1(&self, controller: Controller) -> bool {
        self.layout.v1(controller).is_some()
    }

    pub fn read(&self, controller: Controller, file: &str) -> String {
        let path = self.dir(controller).join(file);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A key of a flat keyed file, as the kernel reports it.
    pub fn stat(&self, controller: Controller, file: &str, key: &str) -> u64 {
        self.read(controller, file)
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{file} has no {key}"))
    }

    pub fn write(&self, controller: Controller, file: &str, value: &str) {
        let path = self.dir(controller).join(file);
        fs::write(&path, value).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Starts `command` inside this cgroup and hands its handle to the caller
    /// (removing the cgroup still kills it). Its stdout is piped; its stdin
    /// is the caller's to choose.
    pub fn start(&self, command: &mut Command) -> Child {
        self.enter_on_exec(command);
        let _forking = FORKING.write().unwrap_or_else(|e| e.into_inner());
        command
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"))
    }

    /// Starts a `tcp_peer` server in this cgroup on `bind` (an IPv4
    /// address) for `connections`, and returns it with the address it
    /// listens on.
    pub fn serve(&self, bind: &str, connections: usize) -> (Child, String) {
        self.serve_in(None, bind, connections)
    }

    /// [`Cgroup::serve`] inside the network namespace `netns`, if given.
    pub fn serve_in(&self, netns: Option<&str>, bind: &str, connections: usize) -> (Child, String) {
        let ports = tempfile::tempdir().unwrap();
        let port_file = ports.path().join("port");
        let mut command = match netns {
            Some(netns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns]).arg(tcp_peer());
                ip
            }
            None => Command::new(tcp_peer()),
        };
        let server = self.start(command.args([
            "server",
            &format!("{bind}:0"),
            port_file.to_str().unwrap(),
            &connections.to_string(),
        ]));
        assert!(
            eventually(Duration::from_secs(10), || port_file.exists()),
            "server did not start"
        );
        let port = fs::read_to_string(&port_file).unwrap();
        (server, format!("{bind}:{port}"))
    }

    /// Its cgroup id: the inode of its v2 directory (what eBPF reports).
    pub fn v2_id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = self.layout.unified.as_ref().unwrap().join(&self.relative);
        fs::metadata(dir).unwrap().ino()
    }

    /// Starts `command` inside this cgroup, in every hierarchy, before it
    /// executes anything.
    pub fn spawn(&mut self, command: &mut Command) -> u32 {
        self.enter_on_exec(command);
        let _forking = FORKING.write().unwrap_or_else(|e| e.into_inner());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn enter_on_exec(&self, command: &mut Command) {
        let procs: Vec<CString> = self
            .dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).unwrap())
            .collect();
        // SAFETY: the closure only calls async-signal-safe functions on
        // memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            });
        }
    }

    /// One busy loop: one core's worth of CPU.
    pub fn spawn_burner(&mut self) -> u32 {
        self.spawn(Command::new("sh").args(["-c", "while :; do :; done"]))
    }

    pub fn kill_all(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        // Anything the children started.
        for dir in &self.dirs {
            if let Ok(pids) = fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in pids.lines().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Removes the cgroup now (its directory must be empty of children).
    pub fn remove(&mut self) {
        self.kill_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.dirs.iter().any(|d| d.exists()) {
            for dir in &self.dirs {
                let _ = fs::remove_dir(dir);
            }
            if Instant::now() > deadline {
                eprintln!("warning: could not remove cgroup {}", self.relative);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
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

/// A system user created for one test and deleted after it.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    pub fn new() -> TestUser {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "cgmt{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// Runs `program args` as this user; its output, or the error it printed.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--clear-groups", program])
            .args(args)
            .output()
            .unwrap();
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A chain of nested cgroups below a parent, removed deepest first.
pub struct Nest(Vec<Cgroup>);

impl Nest {
    /// Creates `path` (slash-separated) below `parent`, one level at a time.
    pub fn new(parent: &Cgroup, path: &str) -> Nest {
        let mut chain: Vec<Cgroup> = Vec::new();
        for part in path.split('/') {
            let next = chain.last().unwrap_or(parent).child(part);
            chain.push(next);
        }
        Nest(chain)
    }

    pub fn leaf(&mut self) -> &mut Cgroup {
        self.0.last_mut().unwrap()
    }
}

impl Drop for Nest {
    fn drop(&mut self) {
        while let Some(cgroup) = self.0.pop() {
            drop(cgroup);
        }
    }
}

/// A 64-character hex id no other test uses, as runtimes name containers.
pub fn hex_id() -> String {
    use std::hash::{Hash, Hasher};
    let seed = unique("id");
    (0..4u8)
        .map(|round| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (round, &seed).hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        })
        .collect()
}

/// A running `cgmetric` on its own temporary mountpoint.
pub struct Daemon {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    /// The daemon's own pins, unless the test passed --bpf-dir or --no-ebpf.
    _bpf_dir: Option<BpfDir>,
    leave_mount: bool,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cgmetric")
}

/// Set where there is no cargo (the VM matrix, `tests/vm/run`): the binaries
/// of the profile were built beforehand and are used as they are.
pub const PREBUILT_ENV: &str = "CGMETRIC_TEST_PREBUILT";

/// Runs `cargo build ARGS` in this test's profile and returns the profile's
/// target directory. `cargo test --test live` alone builds neither examples
/// nor other packages, and a stale helper lies.
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

/// The `tcp_peer` example, built once per test run.
pub fn tcp_peer() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| cargo_build(&["--example", "tcp_peer"]).join("examples/tcp_peer"))
        .clone()
}

/// Waits for a `tcp_peer` and returns the byte count it printed first.
pub fn finish(child: Child) -> u64 {
    finish_client(child).payload
}

/// What a `tcp_peer` client reports when it is done: its payload, and what
/// the kernel's TCP_INFO says its connections sent (a server reports only
/// the payload, and the rest stays 0).
#[derive(Debug, Default)]
pub struct Sent {
    pub payload: u64,
    /// Data bytes, retransmits included.
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
    /// Segments retransmitted.
    pub total_retrans: u64,
    /// Segments sent, data or not, retransmits included.
    pub segs_out: u64,
}

/// Waits for a `tcp_peer` client and returns what it reported.
pub fn finish_client(child: Child) -> Sent {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "peer failed: {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let parse = |what: &str, value: &str| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("tcp_peer printed {what} {value:?}: {text:?}"))
    };
    let mut sent = Sent {
        payload: parse("a payload of", lines.next().unwrap_or("")),
        ..Sent::default()
    };
    for field in lines.flat_map(str::split_whitespace) {
        let (key, value) = field.split_once('=').unwrap_or((field, ""));
        let slot = match key {
            "bytes_sent" => &mut sent.bytes_sent,
            "bytes_retrans" => &mut sent.bytes_retrans,
            "total_retrans" => &mut sent.total_retrans,
            "segs_out" => &mut sent.segs_out,
            _ => panic!("tcp_peer printed {field:?}: {text:?}"),
        };
        *slot = parse(key, value);
    }
    sent
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

/// Polls `check` until it holds, at most `timeout`.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// Tests that burn CPU or push traffic take turns: on a 2-core machine a
/// busy loop starves a transfer (loopback drops, TCP retransmits) and a
/// transfer steals a busy loop's core.
static HEAVY_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn heavy_turn() -> std::sync::MutexGuard<'static, ()> {
    HEAVY_TURN.lock().unwrap_or_else(|e| e.into_inner())
}

//! Real cgroups: one per test or container, at the same relative path in
//! every hierarchy cgmetric reads, with the processes started in them;
//! everything is killed and removed on drop.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cgmetric::cgroup::{Controller, Layout, LayoutKind};

use super::names::unique;
use super::timing::forking;

/// The host's cgroup layout, as the daemon will detect it.
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

    /// A cgroup made the way runc makes one on a hybrid host: in the v1
    /// hierarchies first, its v2 directory later ([`Cgroup::add_v2_dir`]).
    /// The same as [`Cgroup::child`] where there is no v1.
    pub fn child_v2_later(&self, name: &str) -> Cgroup {
        let relative = format!("{}/{name}", self.relative);
        if self.layout.kind == LayoutKind::Unified {
            return Cgroup::create(relative);
        }
        let v2 = self.layout.unified.as_deref();
        let mut dirs = Vec::new();
        for root in self
            .layout
            .hierarchies()
            .into_iter()
            .filter(|r| Some(*r) != v2)
        {
            let dir = root.join(&relative);
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            dirs.push(dir);
        }
        Cgroup {
            relative,
            layout: self.layout.clone(),
            dirs,
            children: Vec::new(),
        }
    }

    /// Makes the v2 directory a [`Cgroup::child_v2_later`] lacks.
    pub fn add_v2_dir(&mut self) {
        let Some(dir) = self.v2_dir() else { return };
        if !self.dirs.contains(&dir) {
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            self.dirs.push(dir);
        }
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

    /// Its directory in the v2 tree, where it has one (pure v2, hybrid).
    pub fn v2_dir(&self) -> Option<PathBuf> {
        Some(self.layout.unified.as_ref()?.join(&self.relative))
    }

    /// The `total` of a line (`some`, `full`) of a pressure file
    /// (`cpu.pressure`, ...) of its v2 directory, as the kernel reports it:
    /// `None` where the kernel has no such file or line.
    /// Sets a hard memory limit: v1 `memory.limit_in_bytes`, v2 `memory.max`.
    pub fn limit_memory(&self, bytes: u64) {
        let file = match self.is_v1(Controller::Memory) {
            true => "memory.limit_in_bytes",
            false => "memory.max",
        };
        self.write(Controller::Memory, file, &bytes.to_string());
    }

    /// Starts a memory toucher here: stress-ng maps `size` (`64M`), touches
    /// every page once, then holds it.
    pub fn spawn_memory_holder(&mut self, size: &str) -> u32 {
        self.spawn(Command::new("stress-ng").args([
            "--vm",
            "1",
            "--vm-bytes",
            size,
            "--vm-keep",
            "--vm-hang",
            "0",
        ]))
    }

    /// Reads a file of `mib` MiB through the page cache inside this cgroup
    /// and waits for it: clean cache, which reclaim frees at a limit (dirty
    /// cache can end in an OOM kill on v1: seen once). The file is written
    /// around the cache on the test's real disk (the target directory; the
    /// guests' takes no O_DIRECT), then removed.
    pub fn read_through_page_cache(&self, mib: u32) {
        let name = self.relative.replace('/', "-");
        let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.dat"));
        let dd = |args: &[&str]| {
            let mut command = Command::new("dd");
            command.args(args).arg("bs=1M").arg("status=none");
            command
        };
        let of = format!("of={}", file.display());
        let count = format!("count={mib}");
        let written = dd(&["if=/dev/zero", &of, &count, "oflag=direct"])
            .status()
            .unwrap();
        assert!(written.success(), "dd: {written}");
        let iff = format!("if={}", file.display());
        let status = self.start(&mut dd(&[&iff, "of=/dev/null"])).wait().unwrap();
        let _ = fs::remove_file(&file);
        assert!(status.success(), "dd: {status}");
    }

    /// Runs `dd` with a 64 MiB buffer here and waits for the OOM killer
    /// to kill it: under a smaller limit, charges fail at the limit and
    /// reclaim finds nothing (no swap, anonymous memory).
    pub fn oom_kill_a_dd(&self) {
        use std::os::unix::process::ExitStatusExt;
        let status = self
            .start(Command::new("dd").args([
                "if=/dev/zero",
                "of=/dev/null",
                "bs=64M",
                "count=1",
                "status=none",
            ]))
            .wait()
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "dd was not killed: {status}"
        );
    }

    pub fn pressure(&self, file: &str, line: &str) -> Option<u64> {
        let text = fs::read_to_string(self.v2_dir()?.join(file)).ok()?;
        text.lines()
            .find(|l| l.split(' ').next() == Some(line))?
            .split(' ')
            .find_map(|f| f.strip_prefix("total="))?
            .parse()
            .ok()
    }

    /// Why the kernel gives this cgroup no pressure files, if it does not:
    /// no v2 tree (v1 has none), or PSI off (`psi=0`, `cgroup.pressure` 0).
    pub fn pressure_missing(&self) -> Option<String> {
        match self.v2_dir() {
            None => Some("no cgroup v2 tree: no pressure files".into()),
            Some(_) if self.pressure("cpu.pressure", "some").is_none() => {
                Some("no readable cpu.pressure: PSI is off on this kernel".into())
            }
            Some(_) => None,
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
        let _forking = forking();
        command
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"))
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
        let _forking = forking();
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

/// Enables, where it can, every controller cgmetric reads for the children
/// of a v2 cgroup. Failure is left to show in the test: a controller the
/// kernel lacks, or processes in `dir` (v2 allows none where children have
/// controllers).
fn enable_controllers(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids +io");
}

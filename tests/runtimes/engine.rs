//! The runtimes' harness: one `dockerd` shared by the tests that need it
//! (started by the first, stopped by the last), a busybox image imported
//! from a rootfs built here (no registry), and containers removed in `Drop`.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A runtime's command line: the program and the options every call takes.
#[derive(Clone, Copy)]
pub struct Cli {
    pub program: &'static str,
    pub global: &'static [&'static str],
}

/// Debian's client, which matches Debian's engine (another `docker` may sit
/// earlier on PATH).
pub const DOCKER: Cli = Cli {
    program: "/usr/bin/docker",
    global: &[],
};

/// Podman with cgroupfs: this host has no systemd to manage scopes.
pub const PODMAN: Cli = Cli {
    program: "podman",
    global: &["--cgroup-manager", "cgroupfs"],
};

/// The image every container here runs: busybox-static and nothing else.
pub const IMAGE: &str = "localhost/cgmetric-busybox:test";

/// Applets the tests call inside containers.
const APPLETS: &[&str] = &[
    "sh", "cat", "sleep", "httpd", "wget", "dd", "mkdir", "ls", "head", "true",
];

struct Engine {
    users: usize,
    /// `None` when a dockerd was already running: it is left as it was.
    dockerd: Option<Child>,
}

static ENGINE: Mutex<Engine> = Mutex::new(Engine {
    users: 0,
    dockerd: None,
});

/// A running Docker engine for as long as the guard lives.
pub struct Dockerd(());

impl Dockerd {
    pub fn acquire() -> Dockerd {
        let mut engine = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
        if engine.users == 0 && !answers() {
            engine.dockerd = Some(start_dockerd());
        }
        engine.users += 1;
        drop(engine);
        import_image(DOCKER);
        Dockerd(())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let mut engine = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
        engine.users -= 1;
        if engine.users > 0 {
            return;
        }
        if let Some(mut dockerd) = engine.dockerd.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(dockerd.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while dockerd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = dockerd.kill();
            let _ = dockerd.wait();
        }
    }
}

fn answers() -> bool {
    Command::new(DOCKER.program)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_dockerd() -> Child {
    let log = fs::File::create("/tmp/cgmetric-test-dockerd.log").unwrap();
    let child = Command::new("dockerd")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start dockerd");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers() {
        assert!(
            Instant::now() < deadline,
            "dockerd did not answer in 60 s: /tmp/cgmetric-test-dockerd.log:\n{}",
            fs::read_to_string("/tmp/cgmetric-test-dockerd.log").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// Imports [`IMAGE`] into a runtime's store (`docker` or `podman`) unless it
/// is there: a rootfs of busybox-static and its applets, as `docker import`
/// takes it from a tar stream.
pub fn import_image(runtime: Cli) {
    static IMPORTING: Mutex<()> = Mutex::new(());
    let _one = IMPORTING.lock().unwrap_or_else(|e| e.into_inner());
    let present = Command::new(runtime.program)
        .args(runtime.global)
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(root.path().join("run/cgmetric")).unwrap();
    fs::create_dir_all(root.path().join("tmp")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed");
    fs::copy(busybox, bin.join("busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new(runtime.program)
        .args(runtime.global)
        .args(["import", "-", IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the image's rootfs");
    assert!(
        out.status.success(),
        "{} import: {}",
        runtime.program,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a runtime CLI and returns its trimmed stdout; panics with its
/// stderr when it fails.
pub fn cli(runtime: Cli, args: &[&str]) -> String {
    let program = runtime.program;
    let out: Output = Command::new(program)
        .args(runtime.global)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container of a runtime CLI, removed (forcibly) when dropped.
pub struct Container {
    cli: Cli,
    /// The runtime's full id.
    pub id: String,
}

impl Container {
    /// `<cli> run -d ARGS` (image and command included in `args`).
    pub fn run(cli: Cli, args: &[&str]) -> Container {
        let mut all = vec!["run", "-d"];
        all.extend_from_slice(args);
        let id = crate::engine::cli(cli, &all);
        Container { cli, id }
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["exec", self.id.as_str()];
        all.extend_from_slice(args);
        cli(self.cli, &all)
    }

    pub fn inspect(&self, format: &str) -> String {
        cli(self.cli, &["inspect", "-f", format, &self.id])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(self.cli.program)
            .args(self.cli.global)
            .args(["rm", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A name no other test or run uses.
pub fn name(prefix: &str) -> String {
    crate::support::unique(&format!("cgmt-{prefix}"))
}

//! The Debian package as a user gets it (README, "Install"): built with
//! `cargo deb`, installed with `dpkg -i` on this host, the daemon run as the
//! packaged unit's ExecStart runs it (without systemd), the packaged mount
//! helper through mount(8), then `dpkg -r` and `dpkg --purge`, after which
//! nothing of it is left: no file, no mount, no unit, no state.
//!
//! Run as root, apart from the `live` tests: it installs into /usr. It takes
//! the host-wide turn of /sbin/mount.cgmetric that the mount tests take, and
//! refuses to touch a host where cgmetric is already installed.

#[path = "../support/mod.rs"]
// This test uses a few of the helpers.
#[allow(dead_code, unused_imports)]
mod support;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{detach, eventually, host_lock, is_live, is_mounted, BpfDir, HELPER_LOCK};

const PACKAGE: &str = "cgmetric";
const UNIT: &str = "/usr/lib/systemd/system/cgmetric.service";
/// Where deb-systemd-helper enables the unit (its [Install] WantedBy=).
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/cgmetric.service";
/// Where it masks the unit while the package is removed but not purged.
const MASKED: &str = "/etc/systemd/system/cgmetric.service";
/// The daemon's default --state-dir, the unit's StateDirectory=.
const STATE_DIR: &str = "/var/lib/cgmetric";
/// The mount helper's logs.
const HELPER_LOGS: &str = "/run/mount.cgmetric";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// dpkg's status of the package ("install ok installed", ...), or None when
/// dpkg knows nothing of it.
fn status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty() && s != "unknown ok not-installed")
}

/// Builds the package as README says and returns the .deb.
fn build(out: &Path) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let started = Instant::now();
    let cargo = |args: &[&str]| {
        let status = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(root)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "cargo {args:?}");
    };
    cargo(&["build", "--release", "--workspace", "--locked", "--quiet"]);
    cargo(&["deb", "--no-build", "--quiet", "-o", out.to_str().unwrap()]);
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "built the package in {:.1?}",
        started.elapsed()
    );
    let mut debs: Vec<PathBuf> = fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb: {debs:?}");
    debs.pop().unwrap()
}

/// The package installed; purged when dropped, whatever the test reached,
/// and the state directory the test's daemon made (there was none before)
/// removed even when the purge did not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if status().is_some() {
            let _ = run("dpkg", &["--purge", PACKAGE]);
        }
        let _ = fs::remove_dir_all(STATE_DIR);
    }
}

/// A directory moved out of the way for the test's life, then put back.
struct SetAside {
    path: PathBuf,
    aside: Option<PathBuf>,
}

impl SetAside {
    fn new(path: &Path) -> SetAside {
        let aside = path.exists().then(|| {
            let aside = path.with_extension(format!("set-aside-{}", std::process::id()));
            fs::rename(path, &aside)
                .unwrap_or_else(|e| panic!("setting {} aside: {e}", path.display()));
            aside
        });
        SetAside {
            path: path.to_path_buf(),
            aside,
        }
    }
}

impl Drop for SetAside {
    fn drop(&mut self) {
        if let Some(aside) = &self.aside {
            let _ = fs::remove_dir_all(&self.path);
            if let Err(e) = fs::rename(aside, &self.path) {
                eprintln!("putting {} back: {e}", self.path.display());
            }
        }
    }
}

/// The daemon as the unit starts it; stopped (and its mount detached) when
/// dropped.
struct Service {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl Service {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("SIGTERM did not stop the daemon:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its process group: the supervisor and its server.
            // SAFETY: kill(2) on our own child's group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            detach(&self.mountpoint);
        }
    }
}

/// The unit's settings that matter without systemd: ExecStart (program and
/// arguments), Environment= and the capability bounding set.
struct Unit {
    exec_start: Vec<String>,
    environment: Vec<(String, String)>,
    capabilities: Vec<String>,
}

impl Unit {
    fn read(path: &str) -> Unit {
        let text = fs::read_to_string(path).unwrap();
        let setting = |key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let words = |key: &str| -> Vec<String> {
            setting(key)
                .iter()
                .flat_map(|v| v.split_whitespace().map(str::to_string))
                .collect()
        };
        let exec_start = words("ExecStart");
        assert!(!exec_start.is_empty(), "{path} has an ExecStart");
        let environment = words("Environment")
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        Unit {
            exec_start,
            environment,
            capabilities: words("CapabilityBoundingSet"),
        }
    }

    /// Starts ExecStart with the default mountpoint (its last argument)
    /// replaced by `mountpoint` and the eBPF pins in `bpf`, under the unit's
    /// bounding set and NoNewPrivileges=.
    fn start(&self, mountpoint: &Path, bpf: &BpfDir, log: PathBuf) -> Service {
        let (program, args) = self.exec_start.split_first().unwrap();
        let (default_mountpoint, options) = args.split_last().unwrap();
        assert_eq!(
            default_mountpoint, "/run/cgmetric",
            "ExecStart's mountpoint"
        );
        let bounding = std::iter::once("-all".to_string())
            .chain(
                self.capabilities
                    .iter()
                    .map(|c| format!("+{}", c.strip_prefix("CAP_").unwrap().to_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new("setpriv")
            .args(["--bounding-set", &bounding, "--no-new-privs", program])
            .args(options)
            .args(["--bpf-dir", bpf.arg()])
            .arg(mountpoint)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(self.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .expect("setpriv");
        Service {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            log,
        }
    }
}

#[test]
fn the_package_installs_runs_and_is_removed_without_a_trace() {
    require!(
        "dpkg",
        "cargo-deb",
        "setpriv",
        "mount",
        "umount",
        "promtool"
    );
    let _turn = host_lock(HELPER_LOCK);
    require_host!(status().map(|s| format!("{PACKAGE} is installed here ({s}): not replacing it")));
    // A purge removes the state directory: one that is there already (a
    // daemon run from source, by default) is set aside and put back.
    let _kept = SetAside::new(Path::new(STATE_DIR));

    let work = tempfile::tempdir().unwrap();
    let deb = build(work.path());
    let installed = Installed;
    ok("dpkg", &["-i", deb.to_str().unwrap()]);
    assert_eq!(status().as_deref(), Some("install ok installed"));

    // What the package lays out, and the unit enabled as debhelper does.
    let files: Vec<String> = ok("dpkg", &["-L", PACKAGE])
        .lines()
        .map(str::to_string)
        .collect();
    for path in [
        "/usr/bin/cgmetric",
        "/usr/sbin/mount.cgmetric",
        UNIT,
        "/usr/share/cgmetric/cgmetric-alerts.yml",
        "/usr/share/doc/cgmetric/README.md",
    ] {
        assert!(files.iter().any(|f| f == path), "{path} not in {files:?}");
        assert!(Path::new(path).is_file(), "{path} not installed");
    }
    assert_eq!(
        fs::canonicalize(ENABLED).ok(),
        Some(fs::canonicalize(UNIT).unwrap()),
        "the unit is enabled: {ENABLED} links to it"
    );
    ok(
        "promtool",
        &["check", "rules", "/usr/share/cgmetric/cgmetric-alerts.yml"],
    );

    // The daemon, as the unit's ExecStart starts it.
    let unit = Unit::read(UNIT);
    assert_eq!(unit.exec_start[0], "/usr/bin/cgmetric");
    let mountpoint = work.path().join("tree");
    fs::create_dir(&mountpoint).unwrap();
    let bpf = BpfDir::new();
    let mut service = unit.start(&mountpoint, &bpf, work.path().join("daemon.log"));
    assert!(
        eventually(Duration::from_secs(15), || is_live(&mountpoint)),
        "the packaged daemon did not mount:\n{}",
        service.log()
    );
    let usage = fs::read_to_string(mountpoint.join("cgroup/memory_usage")).unwrap();
    assert!(
        usage.trim().parse::<u64>().is_ok_and(|n| n > 0),
        "cgroup/memory_usage: {usage:?}"
    );
    assert!(
        Path::new(STATE_DIR).is_dir(),
        "the daemon keeps its state in {STATE_DIR}"
    );
    let status_code = service.stop();
    assert!(
        status_code.success(),
        "SIGTERM: {status_code}\n{}",
        service.log()
    );
    assert!(!is_mounted(&mountpoint), "SIGTERM leaves the tree mounted");

    // The packaged helper, as mount(8) finds it.
    let mounted = work.path().join("mounted");
    fs::create_dir(&mounted).unwrap();
    let state = work.path().join("helper-state");
    let options = format!("no_ebpf,state_dir={}", state.display());
    let helper = run(
        "mount",
        &[
            "-t",
            "cgmetric",
            "cgmetric",
            mounted.to_str().unwrap(),
            "-o",
            &options,
        ],
    );
    let helper_mount = HelperMount(mounted.clone());
    assert!(
        helper.status.success(),
        "mount -t cgmetric: {}",
        String::from_utf8_lossy(&helper.stderr)
    );
    assert!(is_live(&mounted));
    assert!(mounted.join("cgroup/memory_usage").is_file());
    ok("umount", &[mounted.to_str().unwrap()]);
    assert!(
        eventually(Duration::from_secs(5), || !is_mounted(&mounted)),
        "umount leaves it mounted"
    );
    drop(helper_mount);

    // Removal: the files go, the unit is masked as debhelper leaves it.
    ok("dpkg", &["-r", PACKAGE]);
    assert_eq!(status().as_deref(), Some("deinstall ok config-files"));
    for file in &files {
        let path = Path::new(file);
        assert!(
            path.is_dir() || !path.exists(),
            "{file} is left after dpkg -r"
        );
    }
    for dir in [
        "/usr/share/cgmetric",
        "/usr/share/doc/cgmetric",
        HELPER_LOGS,
    ] {
        assert!(!Path::new(dir).exists(), "{dir} is left after dpkg -r");
    }
    assert!(!is_mounted(&mountpoint) && !is_mounted(&mounted));
    assert!(Path::new(STATE_DIR).is_dir(), "dpkg -r keeps the ledger");

    // Purge: no unit, no enablement, no state.
    ok("dpkg", &["--purge", PACKAGE]);
    assert_eq!(status(), None, "dpkg still knows {PACKAGE}");
    for path in [MASKED, ENABLED, STATE_DIR] {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{path} is left after dpkg --purge"
        );
    }
    for dir in [
        "/var/lib/systemd/deb-systemd-helper-enabled",
        "/var/lib/systemd/deb-systemd-helper-masked",
    ] {
        let left: Vec<_> = walk(Path::new(dir))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("cgmetric"))
            .collect();
        assert!(left.is_empty(), "left after dpkg --purge: {left:?}");
    }
    drop(installed);
}

/// A mount made through mount(8), detached when dropped if still there.
struct HelperMount(PathBuf);

impl Drop for HelperMount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            detach(&self.0);
        }
    }
}

/// Every path below `dir` (none if it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

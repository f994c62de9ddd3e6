//! `mount.cgmetric`, the helper mount(8) runs for `mount -t cgmetric`, so
//! that `mount -t cgmetric cgmetric /run/cgmetric -o cgroup=GLOB,...` and an
//! fstab line start the daemon.
//!
//! The daemon is started detached (its own session, so mount(8) returning
//! does not end it) and the helper returns once the tree is mounted, or
//! fails with the daemon's own error. `umount` ends the daemon. The daemon
//! logs to `/run/mount.cgmetric/<mountpoint>.log`.

mod options;

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// mount(8)'s exit status for bad usage, and for a mount that failed.
const USAGE: u8 = 1;
const MOUNT_FAILURE: u8 = 32;
/// How long the daemon may take to mount (it loads eBPF, walks cgroups).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_DIR: &str = "/run/mount.cgmetric";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "mount.cgmetric: mount(8) helper for cgmetric\n\n\
             usage: mount -t cgmetric cgmetric DIR [-o OPTIONS]\n\
             fstab: cgmetric /run/cgmetric cgmetric cgroup=tenants/*,nofail 0 0\n\n\
             OPTIONS mirror cgmetric's long options: cgroup=GLOB (repeatable), docker_root=DIR,\n\
             containerd_state=DIR, containers_storage=DIR, cgroup_root=DIR, bpf_dir=DIR,\n\
             state_dir=DIR, keep_exited=DURATION, net_class=NAME=CIDR[+CIDR...] (repeatable),\n\
             window=DURATION, fuse_spin=DURATION, no_fuse_uring, no_supervise, takeover, open_files=N,\n\
             prometheus_names=cgmetric|cadvisor, no_ebpf, no_cgroup_walk, private. Generic mount words (defaults, nofail, x-*) are ignored.\n\
             The daemon logs to {LOG_DIR}/<mountpoint>.log; umount ends it."
        );
        return ExitCode::SUCCESS;
    }
    let request = match options::parse(&args) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("mount.cgmetric: {e}");
            return ExitCode::from(USAGE);
        }
    };
    if request.fake {
        return ExitCode::SUCCESS;
    }
    match mount(&request) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount.cgmetric: {e}");
            ExitCode::from(MOUNT_FAILURE)
        }
    }
}

fn mount(request: &options::Request) -> Result<(), String> {
    let mountpoint = fs::canonicalize(&request.mountpoint)
        .map_err(|e| format!("mountpoint {}: {e}", request.mountpoint))?;
    let log = log_path(&mountpoint);
    fs::create_dir_all(LOG_DIR).map_err(|e| format!("{LOG_DIR}: {e}"))?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let start_of_run = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    let daemon = daemon_binary();
    if request.verbose {
        println!(
            "mount.cgmetric: {} {} {}",
            daemon.display(),
            request.daemon_args.join(" "),
            mountpoint.display()
        );
    }
    let mut command = Command::new(&daemon);
    command
        .args(&request.daemon_args)
        .arg(&mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", daemon.display()))?;
    let started = Instant::now();
    loop {
        if cgmetric::mounts::is_live_cgmetric(&mountpoint) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let said = daemon_output(&log, start_of_run);
            return Err(match said.is_empty() {
                true => format!("cgmetric exited ({status}) before mounting"),
                false => said,
            });
        }
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            return Err(format!(
                "cgmetric did not mount {} within {READY_TIMEOUT:?}",
                mountpoint.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cgmetric` beside this helper (an installation puts both in one place,
/// or `mount.cgmetric` is a link to it), else from PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("cgmetric")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("cgmetric"))
}

/// One log per mountpoint: `/run/cgmetric` logs to `run-cgmetric.log`.
fn log_path(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    Path::new(LOG_DIR).join(format!(
        "{}.log",
        if name.is_empty() { "root" } else { &name }
    ))
}

/// What the daemon wrote to its log in this run, errors first.
fn daemon_output(log: &Path, from: u64) -> String {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    // "[2026-… ERROR cgmetric] message": the message is what mount shows.
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .map(|l| l.split_once("] ").map_or(l, |(_, message)| message))
        .collect();
    match errors.is_empty() {
        true => text.trim().to_string(),
        false => errors.join("\n"),
    }
}

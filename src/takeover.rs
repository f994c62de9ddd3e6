//! Taking over a live mount (`--takeover`): an upgrade, or a restart of a
//! supervisor that was killed while its server serves on, without a new
//! mount. The connection's descriptor is copied out of the running daemon
//! with `pidfd_getfd` (Linux 5.6), the old processes are killed (SIGKILL:
//! nothing of theirs unmounts), and a new server resumes the connection.
//! Readers wait in the kernel meanwhile; what the old server held is
//! resent to the new one (Linux 6.9+, else those reads fail once with
//! ECONNABORTED).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::cli::Options;

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Occurs when no cgmetric process serves the mountpoint (the mount is
    /// someone else's, or was started in a way not recognised).
    #[error("no running cgmetric serves {0}")]
    NoDaemon(PathBuf),
    /// Occurs when the running daemon's connection cannot be copied (not
    /// root, Yama or an LSM forbids it, or a kernel before 5.6).
    #[error("cannot take the FUSE connection from process {pid}: {source}")]
    Copy { pid: i32, source: io::Error },
    /// Occurs when the old processes do not exit after SIGKILL.
    #[error("process {0} did not exit after SIGKILL")]
    Stuck(i32),
}

/// A process of the daemon that serves the mountpoint.
#[derive(Debug)]
struct Old {
    pid: i32,
    /// Its descriptor of the connection: the server's `--serve-fd`, or one
    /// found among an unsupervised daemon's open files.
    fuse_fd: Option<i32>,
}

/// Takes the connection of the daemon serving `mountpoint` and stops that
/// daemon. Returns the connection's descriptor.
pub fn take(mountpoint: &Path) -> Result<OwnedFd, TakeoverError> {
    let me = std::process::id() as i32;
    let old: Vec<Old> = daemons_of(mountpoint)
        .into_iter()
        .filter(|old| old.pid != me)
        .collect();
    let Some((pid, fd)) = old.iter().find_map(|o| Some((o.pid, o.fuse_fd?))) else {
        return Err(TakeoverError::NoDaemon(mountpoint.to_path_buf()));
    };
    let connection = copy_fd(pid, fd).map_err(|source| TakeoverError::Copy { pid, source })?;
    // Supervisors first, so that none starts a server after its server is
    // killed; all at once otherwise, so that nothing serves between.
    let (supervisors, servers): (Vec<&Old>, Vec<&Old>) =
        old.iter().partition(|o| is_supervisor(o.pid));
    for group in [supervisors, servers] {
        for old in &group {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(old.pid, libc::SIGKILL) };
        }
        for old in &group {
            wait_gone(old.pid)?;
        }
    }
    log::info!(
        "stopped the daemon that served {} (process {pid})",
        mountpoint.display()
    );
    Ok(connection)
}

/// The cgmetric daemon processes (supervisors, servers, unsupervised
/// daemons) whose command line names `mountpoint`.
fn daemons_of(mountpoint: &Path) -> Vec<Old> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let options = options_of(pid)?;
            if options.report.is_some() || mountpoint_of(pid, &options)? != mountpoint {
                return None;
            }
            let fuse_fd = options.serve_fd.or_else(|| fuse_fd_of(pid));
            Some(Old { pid, fuse_fd })
        })
        .collect()
}

/// `pid`'s command line, if it is cgmetric's.
fn options_of(pid: i32) -> Option<Options> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let own = std::fs::read_link("/proc/self/exe").ok()?;
    let name = |p: &Path| {
        p.file_name().map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        })
    };
    // An upgrade replaced the binary: same name, another file.
    if name(&exe)? != name(&own)? {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned());
    Options::try_parse_from(args).ok()
}

/// The absolute mountpoint `options` name, relative ones against `pid`'s
/// working directory.
fn mountpoint_of(pid: i32, options: &Options) -> Option<PathBuf> {
    let given = &options.mountpoint;
    let path = match given.is_absolute() {
        true => given.clone(),
        false => std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()?
            .join(given),
    };
    std::path::absolute(path).ok()
}

/// A `/dev/fuse` descriptor among `pid`'s open files.
fn fuse_fd_of(pid: i32) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// Whether `pid` supervises: a cgmetric whose child serves.
fn is_supervisor(pid: i32) -> bool {
    options_of(pid).is_some_and(|o| o.serve_fd.is_none() && !o.no_supervise)
}

fn copy_fd(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd was just opened and is ours alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd copies descriptor `fd` of the process into ours.
    let copied = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copied < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the copy is a new descriptor of ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(copied as i32) })
}

fn wait_gone(pid: i32) -> Result<(), TakeoverError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(pid) {
        if Instant::now() > deadline {
            return Err(TakeoverError::Stuck(pid));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Whether every thread of `pid` has exited. A group leader that exits
/// first is a zombie while the other threads still run; one of those could
/// be reading a request from the connection, which would then wait for an
/// answer after the resend.
fn gone(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        let state = std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()?.to_string()));
        matches!(state.as_deref(), None | Some("Z") | Some("X"))
    })
}

//! The supervisor: mounts, keeps the FUSE connection's descriptor, and runs
//! the serving code in a child that it replaces when it dies.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse`
//! descriptor. When the one process that serves also holds it, a crash
//! leaves the mount stale (every access ENOTCONN), and bind mounts of it
//! inside containers stay stale until those containers are restarted. Here
//! the descriptor stays with this small process, which serves nothing and
//! so has little to crash on; the child that serves inherits it, and a
//! child started after a death takes the same connection without a new
//! mount. Readers wait in the kernel meanwhile. What the dead child had read
//! and not answered is resent by the kernel where it can (Linux 6.9+) and
//! ended with ECONNABORTED elsewhere (`src/daemon.rs`, `serve_inherited`).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};

use crate::cli::Options;
use crate::daemon::{detach, DaemonError};

/// A child that dies sooner than this after its start waits this long
/// before the next one starts, so that a server that cannot start does not
/// spin the CPU. Readers wait in the kernel meanwhile, they do not fail.
const RESTART_PACE: Duration = Duration::from_secs(1);

/// How long a stopping server may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Mounts `mountpoint` and keeps a server on it until a signal or an
/// unmount ends it.
pub fn run(options: &Options, mountpoint: &Path) -> Result<(), DaemonError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGCHLD])
        .map_err(DaemonError::Signals)?;
    let connection = mount(mountpoint, options.private).map_err(|source| DaemonError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    let mut server = match Serving::start(&connection, false) {
        Ok(server) => server,
        Err(e) => {
            unmount(mountpoint);
            return Err(DaemonError::Spawn(e));
        }
    };
    log::info!(
        "mounted at {}; serving from process {}",
        mountpoint.display(),
        server.process.id()
    );
    let mut served = false;
    for signal in signals.forever() {
        if signal != SIGCHLD {
            log::info!("signal {signal}: unmounting {}", mountpoint.display());
            unmount(mountpoint);
            server.stop();
            return Ok(());
        }
        let Some(status) = server.exited() else {
            continue;
        };
        served |= server.was_ready();
        if connection_ended(&connection) {
            log::info!("{} was unmounted", mountpoint.display());
            return Ok(());
        }
        if !served {
            // The first server never served: its error is the daemon's.
            unmount(mountpoint);
            return Err(DaemonError::ServerFailed(status));
        }
        log::warn!(
            "the server (process {}) {}; starting another on the same connection",
            server.process.id(),
            describe(status)
        );
        if let Some(rest) = RESTART_PACE.checked_sub(server.started.elapsed()) {
            std::thread::sleep(rest);
        }
        server = loop {
            match Serving::start(&connection, true) {
                Ok(server) => break server,
                Err(e) => {
                    log::error!("cannot start a server ({e}); trying again");
                    std::thread::sleep(RESTART_PACE);
                }
            }
        };
    }
    Ok(())
}

/// A serving child.
struct Serving {
    process: std::process::Child,
    started: Instant,
    /// Read end of the pipe on which it says it serves.
    ready: std::fs::File,
    said_ready: bool,
}

impl Serving {
    /// Starts this program again as the server of `connection`, with the
    /// command line this process was given.
    fn start(connection: &OwnedFd, resume: bool) -> io::Result<Serving> {
        let (ready_read, ready_write) = pipe()?;
        let fd = connection.as_raw_fd();
        let ready_fd = ready_write.as_raw_fd();
        let mut command = Command::new("/proc/self/exe");
        if let Some(name) = std::env::args_os().next() {
            command.arg0(name);
        }
        command
            .args(std::env::args_os().skip(1))
            .args(["--serve-fd", &fd.to_string()])
            .args(["--ready-fd", &ready_fd.to_string()]);
        if resume {
            command.arg("--resume");
        }
        // SAFETY: the closure only calls fcntl, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                for inherited in [fd, ready_fd] {
                    if libc::fcntl(inherited, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let process = command.spawn()?;
        drop(ready_write);
        set_nonblocking(&ready_read)?;
        Ok(Serving {
            process,
            started: Instant::now(),
            ready: std::fs::File::from(ready_read),
            said_ready: false,
        })
    }

    /// How it ended, if it did.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// Whether it said it serves.
    fn was_ready(&mut self) -> bool {
        let mut byte = [0u8; 1];
        if !self.said_ready {
            self.said_ready = matches!(self.ready.read(&mut byte), Ok(1));
        }
        self.said_ready
    }

    /// Asks it to stop (it also stops by itself once the connection ends)
    /// and waits, killing it after a grace period.
    fn stop(&mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Tells the supervisor that this server serves: one byte on `fd`.
pub fn tell_ready(fd: i32) {
    // SAFETY: fd was passed by the supervisor for this; a failed write only
    // means it no longer listens.
    unsafe {
        libc::write(fd, [1u8].as_ptr().cast(), 1);
        libc::close(fd);
    }
}

/// Whether the kernel resends the requests a dead server had read and not
/// answered (`FUSE_NOTIFY_RESEND`, Linux 6.9).
pub fn kernel_resends() -> bool {
    kernel_version() >= (6, 9)
}

fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Opens `/dev/fuse` and mounts the tree on it: read-only, for everyone,
/// shown as `fuse.cgmetric`.
fn mount(mountpoint: &Path, private: bool) -> io::Result<OwnedFd> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,subtype=cgmetric,allow_other",
        device.as_raw_fd()
    );
    // With --private the kernel checks each directory's mode (see
    // `daemon::fuse_config`).
    if private {
        data.push_str(",default_permissions");
    }
    let target = CString::new(mountpoint.as_os_str().as_bytes())?;
    let data = CString::new(data)?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let mounted = unsafe {
        libc::mount(
            c"cgmetric".as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(device.into())
}

/// Unmounts, or detaches when something still uses the tree (a shell's
/// working directory): the connection then ends when the last descriptor
/// closes, as this process exits.
fn unmount(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: path is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount(path.as_ptr()) } != 0 {
        let e = io::Error::last_os_error();
        log::warn!("unmount failed ({e}); detaching instead");
        if let Err(e) = detach(&PathBuf::from(mountpoint)) {
            log::error!("cannot detach {}: {e}", mountpoint.display());
        }
    }
}

/// Whether the kernel ended the connection (unmounted, or aborted through
/// fusectl): the device then polls as an error.
fn connection_ended(connection: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: connection.as_fd().as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & libc::POLLERR != 0
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => status.to_string(),
    }
}

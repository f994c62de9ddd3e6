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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    let connection = mount(mountpoint, options.private).map_err(|source| DaemonError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    serve_connection(mountpoint, connection, false)
}

/// Keeps a server on `connection`, mounted at `mountpoint`, until a signal
/// or an unmount ends it; `taken` when the connection was served before
/// (taken over from another daemon), so its first server resumes it.
pub fn serve_connection(
    mountpoint: &Path,
    connection: OwnedFd,
    taken: bool,
) -> Result<(), DaemonError> {
    let wake = Wake::new().map_err(DaemonError::Signals)?;
    crate::systemd::store(&connection);
    let keep_mount = crate::systemd::keeps_descriptors();
    let mut announced = false;
    let mut server = match Serving::start(&connection, taken) {
        Ok(server) => server,
        Err(e) => {
            unmount(mountpoint);
            return Err(DaemonError::Spawn(e));
        }
    };
    log::info!(
        "{} {}; serving from process {}",
        if taken { "took over" } else { "mounted at" },
        mountpoint.display(),
        server.process.id()
    );
    // A connection taken over has readers already: if this server fails,
    // the next is tried (they wait) rather than the mount given up.
    let mut served = taken;
    // Servers that closed their files but have not finished exiting.
    let mut dying: Vec<std::process::Child> = Vec::new();
    loop {
        wake.wait(&server.life);
        dying.retain_mut(|old| old.try_wait().ok().flatten().is_none());
        if wake.stopping() {
            if keep_mount {
                // systemd keeps the connection: for a restart, the next
                // start resumes it; for a stop, systemd closes it, which
                // leaves the mount stale until the next start clears it.
                log::info!(
                    "stopping: leaving {} to the next start (systemd keeps its connection)",
                    mountpoint.display()
                );
            } else {
                log::info!("stopping: unmounting {}", mountpoint.display());
                unmount(mountpoint);
            }
            server.stop();
            return Ok(());
        }
        server.hear();
        if server.said_ready && !announced {
            crate::systemd::ready();
            announced = true;
        }
        let status = server.exited();
        if status.is_none() && !server.hung_up {
            continue;
        }
        served |= server.said_ready;
        if connection_ended(&connection) {
            log::info!("{} was unmounted", mountpoint.display());
            return Ok(());
        }
        if !served {
            // The first server never served: its error is the daemon's.
            let status = match status {
                Some(status) => status,
                None => server.process.wait().map_err(DaemonError::Spawn)?,
            };
            unmount(mountpoint);
            return Err(DaemonError::ServerFailed(status));
        }
        log::warn!(
            "the server (process {}) {}; starting another on the same connection",
            server.process.id(),
            status.map_or_else(|| "is exiting".to_string(), describe)
        );
        if let Some(rest) = RESTART_PACE.checked_sub(server.started.elapsed()) {
            std::thread::sleep(rest);
        }
        let next = loop {
            match Serving::start(&connection, true) {
                Ok(next) => break next,
                Err(e) => {
                    log::error!("cannot start a server ({e}); trying again");
                    std::thread::sleep(RESTART_PACE);
                }
            }
        };
        let old = std::mem::replace(&mut server, next);
        if status.is_none() {
            dying.push(old.process);
        }
    }
}

/// What wakes the supervisor: SIGTERM and SIGINT (stop), SIGCHLD (a server
/// exited), each noted in a flag and a byte on a pipe it polls.
struct Wake {
    stop: Arc<AtomicBool>,
    read: OwnedFd,
    _write: OwnedFd,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        let (read, write) = pipe()?;
        set_nonblocking(&read)?;
        set_nonblocking(&write)?;
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, stop.clone())?;
        }
        for signal in [SIGTERM, SIGINT, SIGCHLD] {
            signal_hook::low_level::pipe::register_raw(signal, write.as_raw_fd())?;
        }
        Ok(Wake {
            stop,
            read,
            _write: write,
        })
    }

    /// Sleeps until a signal, or until the server's life pipe has news.
    fn wait(&self, life: &std::fs::File) {
        let mut fds = [
            libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: life.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds, valid for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        let mut drain = [0u8; 64];
        // SAFETY: reads into our buffer from our non-blocking pipe.
        while unsafe { libc::read(self.read.as_raw_fd(), drain.as_mut_ptr().cast(), 64) } > 0 {}
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A serving child.
struct Serving {
    process: std::process::Child,
    started: Instant,
    /// Read end of its life pipe: one byte when it serves, the end of the
    /// pipe when it dies. The end comes as its files close, which is before
    /// it has exited: closing its inotify descriptor has been seen to keep a
    /// killed server exiting for many seconds, and readers must not wait
    /// for that.
    life: std::fs::File,
    said_ready: bool,
    hung_up: bool,
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
            life: std::fs::File::from(ready_read),
            said_ready: false,
            hung_up: false,
        })
    }

    /// How it ended, if it did.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// Takes what its life pipe says.
    fn hear(&mut self) {
        let mut bytes = [0u8; 8];
        loop {
            match self.life.read(&mut bytes) {
                Ok(0) => {
                    self.hung_up = true;
                    return;
                }
                Ok(_) => self.said_ready = true,
                Err(_) => return,
            }
        }
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

/// Tells the supervisor that this server serves: one byte on its life pipe
/// `fd`, which then stays open, at the highest number the descriptor limit
/// allows. At exit the kernel closes the last-numbered descriptors first
/// (Linux 5.19+ runs the closes last in, first out), so the supervisor hears
/// of a death before slower closes, such as an inotify instance's, finish.
pub fn tell_ready(fd: i32) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: fd was passed by the supervisor for this; a failed write only
    // means it no longer listens. getrlimit writes the struct we pass, and
    // F_DUPFD makes a descriptor of ours.
    unsafe {
        libc::write(fd, [1u8].as_ptr().cast(), 1);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let highest = limit.rlim_cur.saturating_sub(1).min(i32::MAX as u64) as i32;
        if libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, highest) >= 0 {
            libc::close(fd);
        }
    }
}

/// Whether the kernel resends the requests a dead server had read and not
/// answered (`FUSE_NOTIFY_RESEND`, Linux 6.9).
pub fn kernel_resends() -> bool {
    kernel_version() >= (6, 9)
}

/// The running kernel's major and minor version (0 for what cannot be read).
pub(crate) fn kernel_version() -> (u32, u32) {
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
pub(crate) fn connection_ended(connection: &OwnedFd) -> bool {
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

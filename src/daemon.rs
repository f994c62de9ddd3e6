//! The daemon's lifecycle: check what it needs, heal a stale mount, discover,
//! mount (the mountpoint appears only once the tree is complete), serve until
//! SIGTERM, SIGINT or an external `umount`, and unmount cleanly.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, Session, SessionACL};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cgroup::layout::LayoutError;
use crate::cgroup::Layout;
use crate::cli::{Options, DEFAULT_MOUNTPOINT};
use crate::containers::discovery::{Discovery, DiscoveryError, Globs};
use crate::containers::registry::Registry;
use crate::containers::runtime::MetadataRoots;
use crate::fs::fuse::{FuseFs, Uring};
use crate::fs::inode::RESERVED_NAMES;
use crate::fs::model::Model;
use crate::ledger::{Ledger, LedgerError};
use crate::mounts::{mount_at, read_mount_table, statfs, MountEntry, FS_TYPE};
use crate::net::class::ClassError;
use crate::net::{Classes, Net, NetError};

/// FUSE worker threads: a read of a rate may wait one window, and the others
/// must not queue behind it.
const FUSE_THREADS: usize = 4;

/// How long a FUSE thread polls for the next request before sleeping, unless
/// `--fuse-spin` says otherwise. A read is three to five requests (OPEN,
/// READ, an empty READ at the end for `read` readers, RELEASE; a GETATTR for
/// those that `fstat`), and the next one arrives a reader's wake-up after
/// the reply; a thread that slept in between would add its own wake-up to
/// every request. The spin must outlast a wake-up on a host whose idle CPUs halt
/// (tens of microseconds on VMs; docs/performance.md).
const DEFAULT_FUSE_SPIN: Duration = Duration::from_micros(50);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Occurs when the effective user is not root.
    #[error("cgmetric must run as root: it mounts a FUSE filesystem and reads every cgroup")]
    NotRoot,
    /// Occurs when the kernel offers no FUSE device.
    #[error("/dev/fuse does not exist: load the fuse module (modprobe fuse)")]
    NoFuseDevice,
    /// Occurs when a mountpoint given on the command line does not exist.
    #[error("mountpoint {0} does not exist")]
    MountpointMissing(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    MountpointNotDir(PathBuf),
    /// Occurs when something live is already mounted on the mountpoint.
    #[error(
        "mountpoint {path} is in use: {fs_type} is mounted there{}",
        takeover_hint(fs_type)
    )]
    MountpointInUse { path: PathBuf, fs_type: String },
    #[error("mountpoint {path}: {source}")]
    Mountpoint { path: PathBuf, source: io::Error },
    /// Occurs when a stale mount left by a killed daemon cannot be removed.
    #[error("cannot clear the stale cgmetric mount at {path}: {source}")]
    StaleMount { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Classes(#[from] ClassError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot mount {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("the FUSE session failed: {0}")]
    Session(io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    #[error(transparent)]
    Takeover(#[from] crate::takeover::TakeoverError),
    /// Occurs when the supervisor cannot start its serving child.
    #[error("cannot start the server process: {0}")]
    Spawn(io::Error),
    /// Occurs when the first server stops before it serves; its own error
    /// is logged above this one.
    #[error("the server process stopped before serving ({0}); unmounted")]
    ServerFailed(std::process::ExitStatus),
}

/// What to do about a live mount in the way.
fn takeover_hint(fs_type: &str) -> &'static str {
    match fs_type == FS_TYPE {
        true => " (--takeover replaces that cgmetric without unmounting)",
        false => "",
    }
}

/// Why the daemon stops.
enum Stop {
    Signal(i32),
    SessionEnded(io::Result<()>),
}

/// Runs the daemon until it is told to stop: as the supervisor that mounts
/// and keeps the connection (the default), as the server it starts
/// (`--serve-fd`), or as both in one process (`--no-supervise`).
pub fn run(options: Options) -> Result<(), DaemonError> {
    // Every precondition is checked before anything is logged or changed, so
    // a refusal is one line.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DaemonError::NotRoot);
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(DaemonError::NoFuseDevice);
    }
    if let Some(fd) = options.serve_fd {
        return serve_inherited(&options, fd);
    }
    Globs::new(&options.cgroups)?;
    if let Some(connection) = crate::systemd::stored_connection() {
        let path = absolute(&options.mountpoint).map_err(|source| DaemonError::Mountpoint {
            path: options.mountpoint.clone(),
            source,
        })?;
        // Not statfs: nothing serves the connection now, so that would wait.
        let mounted = read_mount_table()
            .ok()
            .is_some_and(|mounts| mount_at(&mounts, &path).is_some_and(|m| m.fs_type == FS_TYPE));
        if mounted && !crate::supervise::connection_ended(&connection) {
            Layout::detect(&options.cgroup_root)?;
            log::info!(
                "systemd kept the connection of {}; resuming it",
                path.display()
            );
            return crate::supervise::serve_connection(&path, connection, true);
        }
        // Ended with its mount: the mount is stale, and cleared below.
    }
    if options.takeover {
        let path = absolute(&options.mountpoint).map_err(|source| DaemonError::Mountpoint {
            path: options.mountpoint.clone(),
            source,
        })?;
        if crate::mounts::is_live_cgmetric(&path) {
            Layout::detect(&options.cgroup_root)?;
            let connection = crate::takeover::take(&path)?;
            return crate::supervise::serve_connection(&path, connection, true);
        }
    }
    let mountpoint = prepare_mountpoint(
        &options.mountpoint,
        options.mountpoint == Path::new(DEFAULT_MOUNTPOINT),
    )?;
    Layout::detect(&options.cgroup_root)?;
    // The server opens it too; a state directory that cannot be written is
    // the daemon's refusal, one line, before anything is mounted.
    Ledger::open(&options.state_dir)?;
    Classes::new(&options.net_classes)?;
    if options.no_supervise {
        serve_own_mount(&options, &mountpoint)
    } else {
        crate::supervise::run(&options, &mountpoint)
    }
}

/// What serves the tree, ready for a FUSE session.
struct Server {
    model: Arc<Model>,
    fs: FuseFs,
    /// Discovery's inotify descriptor, or why there is none.
    changes: io::Result<std::os::fd::RawFd>,
    /// Containers whose slots the last server's index did not give (new
    /// since it wrote it): a kernel that holds their names from that
    /// server is told to forget them.
    renumbered: Vec<String>,
}

impl Server {
    /// Loads the network programs, discovers the containers and builds the
    /// tree.
    fn build(options: &Options, uring: Uring) -> Result<Server, DaemonError> {
        let globs = Globs::new(&options.cgroups)?;
        let layout = Layout::detect(&options.cgroup_root)?;
        let ledger = Arc::new(Ledger::open(&options.state_dir)?);
        log::info!("cgroup layout: {}", layout.kind);
        let open_files = keep_open_files(options.open_files);

        let net = match (&layout.unified, options.no_ebpf) {
            (_, true) => None,
            (None, false) => {
                log::warn!("{}; network files are left out", NetError::NoCgroupV2);
                None
            }
            (Some(v2_root), false) => {
                warn_about_net_cls();
                let classes = Classes::new(&options.net_classes)?;
                Some(Net::start(&options.bpf_dir, v2_root, classes)?)
            }
        };
        let runtimes = MetadataRoots {
            docker_root: options.docker_root.clone(),
            containerd_state: options.containerd_state.clone(),
            containers_storage: options.containers_storage.clone(),
        };
        let registry = Arc::new(Registry::new(
            layout,
            Discovery::new(globs, Some(runtimes)),
            RESERVED_NAMES,
        ));
        registry.kept_budget().set_limit(open_files);
        // Watching starts before the first walk, so nothing created during it
        // is missed.
        let changes = registry.discovery().watch();
        if let Err(e) = &changes {
            log::warn!("cannot watch cgroups ({e}); they are walked on every read instead");
        }
        // The slots the last server gave (if any): see `refresh_resuming`.
        let remembered: HashMap<PathBuf, u64> = ledger
            .read_index()
            .into_iter()
            .filter_map(|k| Some((PathBuf::from(k.cgroup.trim_start_matches('/')), k.slot?)))
            .collect();
        registry.refresh_resuming(remembered.clone());
        let renumbered: Vec<String> = registry
            .list()
            .iter()
            .filter(|c| remembered.get(&c.cgroup) != Some(&c.slot))
            .map(|c| c.name.clone())
            .collect();
        log::info!("{} containers found", registry.list().len());
        let model = Arc::new(
            Model::new(registry, net.map(Arc::new), options.window, options.private)
                .with_prometheus_names(options.prometheus_names)
                .with_cgroup_walk(!options.no_ebpf && !options.no_cgroup_walk)
                .with_lifecycle(Some(ledger), options.keep_exited),
        );
        // Before anything is swept: what ended while no daemon (or server)
        // ran.
        model.recover();
        crate::sample::pool::remember_daemon_cpus();
        let fs = FuseFs::new(model.clone(), uring);
        Ok(Server {
            model,
            fs,
            changes,
            renumbered,
        })
    }

    /// Starts what serving needs beside the session: the kernel notices and
    /// the thread that follows cgroups as they come and go.
    fn attach(
        model: &Arc<Model>,
        changes: io::Result<std::os::fd::RawFd>,
        notifier: fuser::Notifier,
    ) -> Result<(), DaemonError> {
        model.set_kernel(Box::new(KernelNotices::new(notifier)));
        if let Ok(fd) = changes {
            let watched = model.clone();
            std::thread::Builder::new()
                .name("cgroup-watch".into())
                .spawn(move || loop {
                    let rewalk = watched.rewalk_interval();
                    if let Err(e) = crate::containers::watch::wait_readable(fd, rewalk) {
                        log::error!(
                            "waiting for cgroup changes failed ({e}); they now show at lookup"
                        );
                        return;
                    }
                    watched.refresh();
                })
                .map_err(DaemonError::Thread)?;
        }
        Ok(())
    }
}

/// The supervisor's child: serves the connection on `fd` until it ends
/// (unmounted), or until this process dies and the supervisor starts
/// another on the same descriptor.
fn serve_inherited(options: &Options, fd: i32) -> Result<(), DaemonError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // Ctrl-C reaches the whole process group; stopping is the supervisor's
    // to do (it unmounts, and this process then sees the connection end).
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(SIGINT, libc::SIG_IGN) };
    // SAFETY: the supervisor passed this descriptor, open, for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let uring = match options.no_fuse_uring {
        true => Uring::Refuse,
        false => Uring::Supervised,
    };
    let Server {
        model,
        fs,
        changes,
        renumbered,
    } = Server::build(options, uring)?;
    let resends = crate::supervise::kernel_resends();
    let mut config = fuse_config(fuse_spin(options.fuse_spin), options.private);
    // Where the kernel resends what a dead server held, every thread reads
    // the supervisor's descriptor, which outlives us and keeps those
    // requests; elsewhere each reads a clone, whose requests the kernel
    // ends (ECONNABORTED) when we die, so that no reader waits forever.
    config.clone_fd = !resends;
    config.spare_session_fd = !resends;
    let session = if options.resume {
        let session = Session::resume(fs, fd, SessionACL::All, config);
        if resends {
            if let Err(e) = session.notifier().resend() {
                log::warn!("asking the kernel to resend what the last server held: {e}");
            }
        }
        session
    } else {
        Session::from_fd(fs, fd, SessionACL::All, config).map_err(DaemonError::Session)?
    };
    Server::attach(&model, changes, session.notifier())?;
    if options.resume {
        model.forget_root_names(&renumbered);
    }
    if let Some(ready) = options.ready_fd {
        crate::supervise::tell_ready(ready);
    }
    session.run().map_err(DaemonError::Session)?;
    log::info!("the connection ended (unmounted)");
    Ok(())
}

/// Mounts and serves from this one process (`--no-supervise`).
fn serve_own_mount(options: &Options, mountpoint: &Path) -> Result<(), DaemonError> {
    let mountpoint = mountpoint.to_path_buf();
    let uring = match options.no_fuse_uring {
        true => Uring::Refuse,
        false => Uring::Take,
    };
    let Server {
        model, fs, changes, ..
    } = Server::build(options, uring)?;

    let (events, next_event) = mpsc::channel();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    let signal_events = events.clone();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = signal_events.send(Stop::Signal(signal));
        }
    });

    let mut session = Session::new(
        fs,
        &mountpoint,
        &fuse_config(fuse_spin(options.fuse_spin), options.private),
    )
    .map_err(|source| DaemonError::Mount {
        path: mountpoint.clone(),
        source,
    })?;
    let mut unmounter = session.unmount_callable();
    Server::attach(&model, changes, session.notifier())?;
    std::thread::spawn(move || {
        let _ = events.send(Stop::SessionEnded(session.run()));
    });
    log::info!("mounted at {}", mountpoint.display());

    match next_event.recv() {
        Ok(Stop::Signal(signal)) => {
            log::info!("signal {signal}: unmounting {}", mountpoint.display());
            if let Err(e) = unmounter.unmount() {
                // Busy (a shell's cwd inside): detach it; exiting closes the
                // device, which ends the session for whoever still holds it.
                log::warn!("unmount failed ({e}); detaching instead");
                detach(&mountpoint).map_err(|source| DaemonError::Mount {
                    path: mountpoint.clone(),
                    source,
                })?;
                return Ok(());
            }
            match next_event.recv_timeout(Duration::from_secs(5)) {
                Ok(Stop::SessionEnded(Err(e))) => Err(DaemonError::Session(e)),
                _ => Ok(()),
            }
        }
        Ok(Stop::SessionEnded(result)) => {
            log::info!("{} was unmounted", mountpoint.display());
            result.map_err(DaemonError::Session)
        }
        Err(mpsc::RecvError) => Ok(()),
    }
}

/// Before Linux 5.15, using the v1 net_cls or net_prio controller turned off
/// cgroup v2 socket matching, and all traffic was counted at the root.
fn warn_about_net_cls() {
    let mounted = read_mount_table().unwrap_or_default().into_iter().any(|m| {
        m.fs_type == "cgroup"
            && m.super_options
                .split(',')
                .any(|o| o == "net_cls" || o == "net_prio")
    });
    let (major, minor) = crate::supervise::kernel_version();
    if mounted && (major, minor) < (5, 15) {
        log::warn!(
            "cgroup v1 net_cls/net_prio is mounted on Linux {major}.{minor}: once used, the kernel stops \
             matching sockets to cgroup v2 and network counts land on the root cgroup"
        );
    }
}

/// The model's notices to the kernel, over the session's notification
/// channel.
struct KernelNotices {
    notifier: fuser::Notifier,
    /// Names to forget, sent from a thread of its own: the kernel takes the
    /// directory's lock for that, and a readdir in a request holds it.
    names: parking_lot::Mutex<mpsc::Sender<(u64, String)>>,
}

impl KernelNotices {
    fn new(notifier: fuser::Notifier) -> KernelNotices {
        let (names, queued) = mpsc::channel::<(u64, String)>();
        let forgetter = notifier.clone();
        std::thread::spawn(move || {
            for (parent, name) in queued {
                let _ = forgetter.inval_entry(fuser::INodeNo(parent), std::ffi::OsStr::new(&name));
            }
        });
        KernelNotices {
            notifier,
            names: parking_lot::Mutex::new(names),
        }
    }
}

impl crate::fs::model::Kernel for KernelNotices {
    fn forget_name(&self, parent: u64, name: &str) {
        let _ = self.names.lock().send((parent, name.to_string()));
    }

    /// Storing the last byte at its place grows the kernel's size to the
    /// text's length (a store never shrinks it) and takes no lock that an
    /// open in flight holds, so it is sent from within the open.
    fn raise_size(&self, ino: u64, size: u64, last: u8) {
        if let Err(e) = self.notifier.store(fuser::INodeNo(ino), size - 1, &[last]) {
            // ENOENT: the kernel has no such inode cached, and will ask.
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::debug!("raising the size of inode {ino} to {size}: {e}");
            }
        }
    }
}

/// Descriptors kept free for everything but kept cgroup files: FUSE, the
/// watches, eBPF maps and the files of reads in flight.
const RESERVED_FDS: u64 = 256;

/// Lets up to `requested` cgroup files stay open, raising the descriptor
/// limit as far as that needs: the soft limit up to the hard one, and the
/// hard one (root may) up to `fs.nr_open`. Whatever the limit allows in the
/// end is kept, with a warning when it is less. Returns that number.
fn keep_open_files(requested: usize) -> usize {
    let want = (requested as u64).saturating_add(RESERVED_FDS);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < want {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(limit.rlim_max);
        // Without CAP_SYS_RESOURCE only the soft limit can move.
        for most in [limit.rlim_max.max(nr_open.min(want)), limit.rlim_max] {
            let raised = libc::rlimit {
                rlim_cur: want.min(most),
                rlim_max: most,
            };
            // SAFETY: setrlimit reads the struct we pass.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit = raised;
                break;
            }
        }
    }
    let kept = (requested as u64).min(limit.rlim_cur.saturating_sub(RESERVED_FDS)) as usize;
    if kept < requested {
        log::warn!(
            "--open-files {requested}: the descriptor limit is {}, so at most {kept} are kept",
            limit.rlim_cur
        );
    }
    kept
}

/// The spin to use: on a machine with one online CPU the reader cannot run
/// while a FUSE thread spins, so spinning would only delay it.
fn fuse_spin(requested: Option<Duration>) -> Duration {
    requested.unwrap_or_else(|| {
        // SAFETY: sysconf reads a system value and touches no memory of ours.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        if cpus > 1 {
            DEFAULT_FUSE_SPIN
        } else {
            Duration::ZERO
        }
    })
}

pub(crate) fn fuse_config(spin: Duration, private: bool) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("cgmetric".into()),
        MountOption::CUSTOM("subtype=cgmetric".into()),
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
    ];
    // Everybody reads: every file is 0444, every directory 0555, and the
    // mount is read-only, so there is no mode to check. With `--private`
    // there is, and the kernel checks it; that costs a GETATTR before every
    // open, as a file's attributes (its size) are never cached.
    if private {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    config.acl = SessionACL::All;
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    config.receive_spin = spin;
    config
}

/// Makes the mountpoint ready: clears a stale cgmetric mount left by a killed
/// daemon, refuses a live mount, creates the default mountpoint if missing.
/// Returns the absolute path.
fn prepare_mountpoint(given: &Path, is_default: bool) -> Result<PathBuf, DaemonError> {
    let path = absolute(given).map_err(|source| DaemonError::Mountpoint {
        path: given.to_path_buf(),
        source,
    })?;
    let mounts = read_mount_table().map_err(|source| DaemonError::Mountpoint {
        path: path.clone(),
        source,
    })?;
    if let Some(mount) = mount_at(&mounts, &path) {
        if !is_stale_cgmetric(mount, &path) {
            return Err(DaemonError::MountpointInUse {
                path,
                fs_type: mount.fs_type.clone(),
            });
        }
        detach(&path).map_err(|source| DaemonError::StaleMount {
            path: path.clone(),
            source,
        })?;
        log::info!("cleared a stale cgmetric mount at {}", path.display());
        // A mount under the stale one is someone else's: check again.
        return prepare_mountpoint(&path, is_default);
    }
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => Err(DaemonError::MountpointNotDir(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && is_default => {
            std::fs::create_dir_all(&path)
                .map(|()| path.clone())
                .map_err(|source| DaemonError::Mountpoint { path, source })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DaemonError::MountpointMissing(path)),
        Err(source) => Err(DaemonError::Mountpoint { path, source }),
    }
}

/// A cgmetric mount whose daemon is gone: the kernel answers ENOTCONN.
fn is_stale_cgmetric(mount: &MountEntry, path: &Path) -> bool {
    mount.fs_type == FS_TYPE
        && statfs(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// The absolute form of `path` with its parent's symlinks resolved, without
/// touching `path` itself (a stale mount answers every access with ENOTCONN).
fn absolute(path: &Path) -> io::Result<PathBuf> {
    let path = std::path::absolute(path)?;
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => Ok(parent.join(name)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
            Err(e) => Err(e),
        },
        _ => Ok(path),
    }
}

pub(crate) fn detach(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: c_path is a valid NUL-terminated string for the call's duration.
    match unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

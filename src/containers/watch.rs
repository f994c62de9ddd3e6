//! inotify on the cgroup directories discovery walks: it turns "a cgroup was
//! created or removed" into a [`Change`], so that discovery never walks the
//! hierarchies again after its first pass. The fd is non-blocking: a reader
//! that misses a name drains pending changes itself, so a container is there
//! the moment its `mkdir` returned, whatever the watcher thread is doing.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// What happened to a cgroup directory of one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `path` (relative to the root of hierarchy `hierarchy`) now exists;
    /// cgroups below it may have been created before it was watched.
    Created {
        hierarchy: usize,
        path: PathBuf,
    },
    Removed {
        hierarchy: usize,
        path: PathBuf,
    },
    /// The `cgroup.events` of the v2 cgroup `path` changed: its last
    /// process may have left (`populated 0`).
    Events {
        path: PathBuf,
    },
    /// The kernel's queue overflowed (events were lost), or a cgroup was
    /// renamed: only a walk tells what exists.
    Lost,
}

pub struct Watcher {
    inotify: Inotify,
    /// The hierarchy and relative path of every watched directory.
    dirs: HashMap<WatchDescriptor, (usize, PathBuf)>,
    /// The same, the other way: a rewalk adds no watch twice.
    watched: HashSet<(usize, PathBuf)>,
    /// The containers' `cgroup.events` files watched, by relative path,
    /// and the other way. The kernel does not end such a watch when the
    /// cgroup goes (kernfs files send no IN_IGNORED): it must be removed.
    events_files: HashMap<WatchDescriptor, PathBuf>,
    events_watches: HashMap<PathBuf, WatchDescriptor>,
    buffer: Vec<u8>,
}

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        Ok(Watcher {
            inotify: Inotify::init()?,
            dirs: HashMap::new(),
            watched: HashSet::new(),
            events_files: HashMap::new(),
            events_watches: HashMap::new(),
            buffer: vec![0u8; 64 * 1024],
        })
    }

    /// Watches the directory `root/path` for cgroups created or removed in
    /// it. A directory that is gone already is no error (its removal is
    /// queued); the watch limit is.
    pub fn watch(&mut self, hierarchy: usize, root: &Path, path: &Path) -> io::Result<()> {
        let key = (hierarchy, path.to_path_buf());
        if self.watched.contains(&key) {
            return Ok(());
        }
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::ONLYDIR;
        match self.inotify.watches().add(root.join(path), mask) {
            Ok(wd) => {
                if let Some(old) = self.dirs.insert(wd, key.clone()) {
                    // The same directory under another name: renamed.
                    self.watched.remove(&old);
                }
                self.watched.insert(key);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Watches the `cgroup.events` file of the v2 cgroup `root/path`, which
    /// the kernel modifies when the cgroup's last process leaves. Best
    /// effort: without it, a container's final values are its last read.
    pub fn watch_events(&mut self, root: &Path, path: &Path) {
        let file = root.join(path).join("cgroup.events");
        if let Ok(wd) = self.inotify.watches().add(file, WatchMask::MODIFY) {
            self.events_files.insert(wd.clone(), path.to_path_buf());
            self.events_watches.insert(path.to_path_buf(), wd);
        }
    }

    /// Ends the watch of the `cgroup.events` file of `path`, if any: the
    /// container is going (its last process left before any of its
    /// directories could be removed).
    pub fn unwatch_events(&mut self, path: &Path) {
        if let Some(wd) = self.events_watches.remove(path) {
            self.events_files.remove(&wd);
            let _ = self.inotify.watches().remove(wd);
        }
    }

    /// Every change queued so far, without waiting.
    pub fn changes(&mut self) -> io::Result<Vec<Change>> {
        let mut changes = Vec::new();
        loop {
            let events = match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(changes),
                Err(e) => return Err(e),
            };
            let mut read = 0;
            for event in events {
                read += 1;
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    changes.push(Change::Lost);
                } else if event.mask.contains(EventMask::IGNORED) {
                    if let Some(key) = self.dirs.remove(&event.wd) {
                        self.watched.remove(&key);
                    }
                    if let Some(path) = self.events_files.remove(&event.wd) {
                        self.events_watches.remove(&path);
                    }
                } else if event.mask.contains(EventMask::MODIFY) {
                    if let Some(path) = self.events_files.get(&event.wd) {
                        changes.push(Change::Events { path: path.clone() });
                    }
                } else if event.mask.contains(EventMask::ISDIR) {
                    if let Some(change) = change(&self.dirs, &event.wd, event.mask, event.name) {
                        changes.push(change);
                    }
                }
            }
            if read == 0 {
                return Ok(changes);
            }
        }
    }

    /// The fd to wait on for changes.
    pub fn fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }

    /// How many directories are watched.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

/// Blocks until `fd` is readable, or `timeout` passed.
pub fn wait_readable(fd: RawFd, timeout: Option<std::time::Duration>) -> io::Result<()> {
    let timeout = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
        if ready >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The change an event on a watched directory's entry means.
fn change(
    dirs: &HashMap<WatchDescriptor, (usize, PathBuf)>,
    wd: &WatchDescriptor,
    mask: EventMask,
    name: Option<&OsStr>,
) -> Option<Change> {
    let (hierarchy, parent) = dirs.get(wd)?;
    let (hierarchy, path) = (*hierarchy, parent.join(name?));
    if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVED_TO) {
        // A renamed cgroup (v1 allows it) renames every watch below it:
        // rare enough to rewalk.
        Some(Change::Lost)
    } else if mask.contains(EventMask::CREATE) {
        Some(Change::Created { hierarchy, path })
    } else if mask.contains(EventMask::DELETE) {
        Some(Change::Removed { hierarchy, path })
    } else {
        None
    }
}

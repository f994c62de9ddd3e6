//! Live discovery: inotify on every directory of one cgroup hierarchy. A
//! cgroup created or removed anywhere re-runs discovery at once, so a new
//! container's directory is there, and a removed one gone (and dropped from
//! the kernel's cache), within milliseconds, with no polling.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// Watches `root` and its subtree; calls `changed` after every batch of
/// cgroup creations or removals.
pub fn spawn(root: PathBuf, changed: impl Fn() + Send + 'static) -> io::Result<()> {
    let mut inotify = Inotify::init()?;
    let mut dirs = HashMap::new();
    watch_tree(&mut inotify, &root, &mut dirs);
    std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || run(inotify, root, dirs, changed))?;
    Ok(())
}

fn run(
    mut inotify: Inotify,
    root: PathBuf,
    mut dirs: HashMap<WatchDescriptor, PathBuf>,
    changed: impl Fn(),
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let events = match inotify.read_events_blocking(&mut buffer) {
            Ok(events) => events,
            Err(e) => {
                log::error!(
                    "watching cgroups stopped ({e}); new containers now appear at lookup only"
                );
                return;
            }
        };
        let mut any = false;
        let mut created = Vec::new();
        for event in events {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // Events were lost: watch whatever exists now.
                created.push(root.clone());
                any = true;
            } else if event.mask.contains(EventMask::IGNORED) {
                dirs.remove(&event.wd);
            } else if event.mask.contains(EventMask::ISDIR) {
                any = true;
                if event.mask.contains(EventMask::CREATE) {
                    if let (Some(parent), Some(name)) = (dirs.get(&event.wd), event.name) {
                        created.push(parent.join(name));
                    }
                }
            }
        }
        for dir in created {
            watch_tree(&mut inotify, &dir, &mut dirs);
        }
        if any {
            changed();
        }
    }
}

/// Watches `dir` and every directory below it (cgroups created before the
/// watch was in place included).
fn watch_tree(inotify: &mut Inotify, dir: &Path, dirs: &mut HashMap<WatchDescriptor, PathBuf>) {
    let mask = WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR;
    match inotify.watches().add(dir, mask) {
        Ok(wd) => {
            dirs.insert(wd, dir.to_path_buf());
        }
        // Gone already, or the watch limit: the rest still resolves at lookup.
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot watch {}: {e}", dir.display());
            }
            return;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                watch_tree(inotify, &entry.path(), dirs);
            }
        }
    }
}

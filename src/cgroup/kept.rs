//! Cgroup files kept open between reads.
//!
//! Opening and closing a cgroupfs file costs more than reading it (about
//! twice as much for a container's files; docs/performance.md). A `pread`
//! at offset 0 makes the kernel render the file afresh, so values stay live.
//!
//! The price is kernel memory: an open cgroupfs file that has been read pins
//! its seq_file buffer (a few KiB of slab). One [`Budget`] for the daemon
//! (`--open-files`) bounds how many are kept; files beyond it are opened
//! for each read. A container's files close when it goes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::walk::{key_of, CgroupKey};

/// Files larger than this are not kept: a kept file must be read in one
/// `pread`, because another thread's `pread` of the same file restarts the
/// kernel's rendering. Every cgroup file cgmetric reads is far smaller.
pub const MAX_KEPT_LEN: usize = 8192;

/// How many cgroup files the process may keep open.
pub struct Budget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl Budget {
    pub const fn new(limit: usize) -> Budget {
        Budget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        }
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Files kept open now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < limit).then_some(used + 1)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One cgroup's files kept open, each under the directory it was opened in,
/// and its directories' keys in the cgroup walk.
pub struct KeptFiles {
    budget: Arc<Budget>,
    files: Mutex<Vec<Kept>>,
    keys: Mutex<Vec<(PathBuf, CgroupKey)>>,
}

struct Kept {
    dir: PathBuf,
    file: &'static str,
    fd: Arc<File>,
}

impl Kept {
    fn is(&self, dir: &Path, file: &str) -> bool {
        self.file == file && self.dir.as_os_str() == dir.as_os_str()
    }
}

impl std::fmt::Debug for KeptFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeptFiles({})", self.files.lock().len())
    }
}

impl KeptFiles {
    pub fn with_budget(budget: Arc<Budget>) -> KeptFiles {
        KeptFiles {
            budget,
            files: Mutex::new(Vec::new()),
            keys: Mutex::new(Vec::new()),
        }
    }

    /// The walk's key for `dir` (its device and inode), stat'ed once.
    pub fn cgroup_key(&self, dir: &Path) -> Option<CgroupKey> {
        let mut keys = self.keys.lock();
        if let Some((_, key)) = keys.iter().find(|(d, _)| d.as_os_str() == dir.as_os_str()) {
            return Some(*key);
        }
        let key = key_of(dir)?;
        keys.push((dir.to_path_buf(), key));
        Some(key)
    }

    /// Forgets `dir`'s key: the walk did not see it, so the directory may
    /// have been made anew (a new inode) since it was stat'ed.
    pub fn forget_key(&self, dir: &Path) {
        self.keys
            .lock()
            .retain(|(d, _)| d.as_os_str() != dir.as_os_str());
    }

    /// Appends the text of `dir/file`, read from its kept descriptor, to
    /// `out`: `None` when the file is not kept, or was removed (the caller
    /// opens it, which says whether the cgroup is gone).
    pub fn read_into(
        &self,
        dir: &Path,
        file: &'static str,
        out: &mut Vec<u8>,
    ) -> Option<std::io::Result<()>> {
        let fd = self
            .files
            .lock()
            .iter()
            .find(|k| k.is(dir, file))
            .map(|k| k.fd.clone())?;
        let mut buf = [0u8; MAX_KEPT_LEN];
        let read = loop {
            match fd.read_at(&mut buf, 0) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                result => break result,
            }
        };
        match read {
            Ok(n) if n < MAX_KEPT_LEN => {
                out.extend_from_slice(&buf[..n]);
                Some(Ok(()))
            }
            // Grown past one read, or gone with its cgroup: forget it.
            Ok(_) => {
                self.forget(dir, file);
                None
            }
            Err(e) if super::is_gone(&e) => {
                self.forget(dir, file);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Keeps `fd`, just read whole (`len` bytes), when the budget allows.
    pub fn keep(&self, dir: &Path, file: &'static str, fd: File, len: usize) {
        if len >= MAX_KEPT_LEN || !self.budget.take() {
            return;
        }
        let mut files = self.files.lock();
        // Two threads may have opened it at once: keep one.
        if files.iter().any(|k| k.is(dir, file)) {
            self.budget.give(1);
            return;
        }
        files.push(Kept {
            dir: dir.to_path_buf(),
            file,
            fd: Arc::new(fd),
        });
    }

    fn forget(&self, dir: &Path, file: &'static str) {
        let mut files = self.files.lock();
        let before = files.len();
        files.retain(|k| !k.is(dir, file));
        self.budget.give(before - files.len());
    }

    pub fn len(&self) -> usize {
        self.files.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeptFiles {
    fn drop(&mut self) {
        self.budget.give(self.files.get_mut().len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> Arc<Budget> {
        Arc::new(Budget::new(limit))
    }

    /// What a read from the kept descriptor gives, if it is kept.
    fn read(kept: &KeptFiles, dir: &Path, file: &'static str) -> Option<String> {
        let mut out = b"before ".to_vec();
        kept.read_into(dir, file, &mut out)?.unwrap();
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn kept_files_read_the_current_text() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pids.current");
        std::fs::write(&path, "3\n").unwrap();
        let kept = KeptFiles::with_budget(budget(10));
        assert_eq!(read(&kept, tmp.path(), "pids.current"), None);
        kept.keep(tmp.path(), "pids.current", File::open(&path).unwrap(), 2);
        std::fs::write(&path, "4\n").unwrap();
        assert_eq!(
            read(&kept, tmp.path(), "pids.current").as_deref(),
            Some("before 4\n")
        );
        // Same name in another directory is another file.
        assert_eq!(read(&kept, &tmp.path().join("x"), "pids.current"), None);
    }

    #[test]
    fn the_budget_bounds_what_is_kept_and_comes_back() {
        let tmp = tempfile::tempdir().unwrap();
        let budget = budget(2);
        let names = ["a", "b", "c"];
        for name in names {
            std::fs::write(tmp.path().join(name), "1\n").unwrap();
        }
        let kept = KeptFiles::with_budget(budget.clone());
        for name in names {
            let fd = File::open(tmp.path().join(name)).unwrap();
            kept.keep(tmp.path(), name, fd, 2);
        }
        assert_eq!((kept.len(), budget.used()), (2, 2));
        assert_eq!(read(&kept, tmp.path(), "c"), None);
        // A second keep of the same file is not counted twice.
        kept.keep(
            tmp.path(),
            "a",
            File::open(tmp.path().join("a")).unwrap(),
            2,
        );
        assert_eq!(budget.used(), 2);
        // A container's files close with it, and their slots come back.
        drop(kept);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn large_files_are_not_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("io.stat");
        let big = "x".repeat(MAX_KEPT_LEN);
        std::fs::write(&path, &big).unwrap();
        let kept = KeptFiles::with_budget(budget(10));
        kept.keep(tmp.path(), "io.stat", File::open(&path).unwrap(), big.len());
        assert!(kept.is_empty());
        // A kept file that grew past one read is forgotten, not torn, and
        // leaves nothing in the buffer.
        std::fs::write(&path, "small\n").unwrap();
        kept.keep(tmp.path(), "io.stat", File::open(&path).unwrap(), 6);
        std::fs::write(&path, &big).unwrap();
        let mut out = Vec::new();
        assert!(kept.read_into(tmp.path(), "io.stat", &mut out).is_none());
        assert!(out.is_empty() && kept.is_empty());
    }
}

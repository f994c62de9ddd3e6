//! Which rendering of a file a `stat` reports and the opens after it serve,
//! and what the kernel may believe the file's size is.
//!
//! Readers that copy through the page cache (`sendfile`, `splice`, `mmap`,
//! busybox `cat`, Python's `shutil`) stop at the size the kernel holds for
//! the inode, and readers that trust `st_size` (`tar`) read exactly that many
//! bytes. So every file reports the exact length of a rendering, and:
//!
//! - a stat reuses a rendering younger than [`HANDOFF`], so a reader that
//!   opens and then `fstat`s (Python, Go, Rust) sees its own text's length;
//! - the first open within [`HANDOFF`] of a stat that rendered the file
//!   serves that rendering, so `stat` then `read` (tar) reads exactly `st_size` bytes;
//! - any other open renders anew; when that text is longer than the size the
//!   kernel may hold, the caller raises the kernel's size before answering
//!   (see [`Opened::raise`]). A shorter text needs nothing: the kernel trims
//!   its size after the short page read, so the open's length is what the
//!   kernel may hold from then on, and reads need no bookkeeping.
//!
//! Direct I/O keeps the page cache from serving an old value to `read`, and
//! an open without `FOPEN_KEEP_CACHE` drops the pages a splice left behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a rendering made for a stat is what the next open serves, and
/// how long any rendering answers stats. Long enough for a reader's stat,
/// open and fstat on a loaded host; short enough that a polling loop sees
/// new values.
pub const HANDOFF: Duration = Duration::from_millis(200);

/// Inodes remembered before renderings too old to reuse are dropped (and,
/// if that is not enough, the inodes without one). The kernel's FORGET
/// drops an inode too; a dropped inode costs its next open a size raise.
const KEEP: usize = 4096;

/// A file's rendered text, shared between the snapshot table and the open
/// handles reading it.
pub type Text = Arc<Vec<u8>>;

#[derive(Default)]
pub struct Snapshots {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, Known>,
    /// The table's size at which it is pruned next: twice what pruning
    /// left, so pruning costs a constant per insertion.
    prune_at: usize,
}

struct Known {
    /// The latest rendering and when it was made, while it may be reused.
    text: Option<(Text, Instant)>,
    /// Whether `text` was made for a stat and no open has served it yet.
    for_open: bool,
    /// The smallest size the kernel may hold for the inode: what a stat
    /// answered, or the length of the latest open's text (a read to its end
    /// through the page cache trims the kernel's size to that).
    floor: u64,
}

/// What an open serves.
pub struct Opened {
    pub text: Text,
    /// The kernel's size may be below the text's length: raise it to
    /// `text.len()` before the open is answered.
    pub raise: bool,
}

impl Snapshots {
    /// The text a stat of `ino` reports the length of: a young rendering, or
    /// a new one from `render`. Opens keep rendering anew after a stat that
    /// reused an open's text: a reader that polls with open and fstat
    /// (Rust, Python, Go) would otherwise see one value for as long as it
    /// polls faster than [`HANDOFF`].
    pub fn for_stat<E>(
        &self,
        ino: u64,
        render: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Text, E> {
        if let Some(known) = self.table.lock().inodes.get_mut(&ino) {
            if let Some(text) = young(known) {
                known.floor = text.len() as u64;
                return Ok(text);
            }
        }
        let text = Arc::new(render()?);
        let mut table = self.table.lock();
        let known = table.entry(ino);
        known.text = Some((text.clone(), Instant::now()));
        known.for_open = true;
        known.floor = text.len() as u64;
        Ok(text)
    }

    /// The text an open of `ino` serves: the rendering of a stat made
    /// within [`HANDOFF`] that no open served yet, or a new one from
    /// `render`.
    pub fn for_open<E>(
        &self,
        ino: u64,
        render: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Opened, E> {
        let stat_made = self.table.lock().inodes.get_mut(&ino).and_then(|known| {
            let text = young(known).filter(|_| known.for_open)?;
            known.for_open = false;
            Some(text)
        });
        let (text, rendered) = match stat_made {
            Some(text) => (text, false),
            None => (Arc::new(render()?), true),
        };
        let mut table = self.table.lock();
        let known = table.entry(ino);
        if rendered {
            known.text = Some((text.clone(), Instant::now()));
            known.for_open = false;
        }
        let len = text.len() as u64;
        let raise = known.floor < len;
        known.floor = len;
        Ok(Opened { text, raise })
    }

    /// The kernel dropped the inode: it asks anew before it uses a size.
    pub fn forget(&self, ino: u64) {
        self.table.lock().inodes.remove(&ino);
    }
}

/// The inode's rendering, if it is young enough to reuse.
fn young(known: &Known) -> Option<Text> {
    let (text, at) = known.text.as_ref()?;
    (at.elapsed() < HANDOFF).then(|| text.clone())
}

impl Table {
    /// The inode's entry, made if new (the kernel's size unknown: 0).
    fn entry(&mut self, ino: u64) -> &mut Known {
        if !self.inodes.contains_key(&ino) && self.inodes.len() >= self.prune_at.max(KEEP) {
            self.prune();
        }
        self.inodes.entry(ino).or_insert(Known {
            text: None,
            for_open: false,
            floor: 0,
        })
    }

    /// Drops renderings too old to be reused and, past [`KEEP`], the
    /// inodes left without one.
    fn prune(&mut self) {
        for known in self.inodes.values_mut() {
            if young(known).is_none() {
                known.text = None;
            }
        }
        if self.inodes.len() >= KEEP {
            self.inodes.retain(|_, known| known.text.is_some());
        }
        self.prune_at = self.inodes.len() * 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Result<Vec<u8>, ()> {
        Ok(s.as_bytes().to_vec())
    }

    #[test]
    fn an_open_right_after_a_stat_serves_what_the_stat_measured() {
        let s = Snapshots::default();
        let stat = s.for_stat(7, || text("999\n")).unwrap();
        let open = s.for_open(7, || text("1000\n")).unwrap();
        assert_eq!(open.text, stat);
        assert!(!open.raise, "the kernel holds the stat's size");
    }

    #[test]
    fn an_open_with_no_stat_before_it_renders_anew() {
        let s = Snapshots::default();
        let first = s.for_open(7, || text("1\n")).unwrap();
        assert!(first.raise, "the kernel's size is not known");
        let second = s.for_open(7, || text("2\n")).unwrap();
        assert_eq!(*second.text, b"2\n");
        assert!(!second.raise, "same length as before");
        let longer = s.for_open(7, || text("10\n")).unwrap();
        assert!(longer.raise);
    }

    #[test]
    fn a_stat_after_an_open_reports_the_opened_text() {
        let s = Snapshots::default();
        let open = s.for_open(7, || text("12345\n")).unwrap();
        let stat = s.for_stat(7, || text("1\n")).unwrap();
        assert_eq!(stat, open.text);
    }

    #[test]
    fn a_shorter_text_lowers_what_the_kernel_may_hold() {
        let s = Snapshots::default();
        s.for_stat(7, || text("12345\n")).unwrap();
        std::thread::sleep(HANDOFF);
        let open = s.for_open(7, || text("123\n")).unwrap();
        assert!(!open.raise, "the kernel holds more");
        let open = s.for_open(7, || text("1234\n")).unwrap();
        assert!(
            open.raise,
            "reading 123 to its end trimmed the kernel's size to 4"
        );
    }

    #[test]
    fn old_renderings_are_not_served() {
        let s = Snapshots::default();
        s.for_stat(7, || text("1\n")).unwrap();
        std::thread::sleep(HANDOFF);
        let open = s.for_open(7, || text("2\n")).unwrap();
        assert_eq!(*open.text, b"2\n");
        let stat = s.for_stat(7, || text("3\n")).unwrap();
        assert_eq!(*stat, b"2\n", "the open's rendering is young");
        let open = s.for_open(7, || text("40\n")).unwrap();
        assert_eq!(*open.text, b"40\n", "an open's text is not handed on");
    }

    #[test]
    fn errors_keep_nothing() {
        let s = Snapshots::default();
        assert!(s.for_stat(7, || Err::<Vec<u8>, _>(())).is_err());
        assert!(s.for_open(7, || text("1\n")).unwrap().raise);
    }

    #[test]
    fn the_table_stays_bounded() {
        let s = Snapshots::default();
        for ino in 0..(KEEP as u64 * 3) {
            s.for_open(ino, || text("1\n")).unwrap();
        }
        std::thread::sleep(HANDOFF);
        for ino in 0..(KEEP as u64 * 3) {
            s.for_stat(ino + 1_000_000, || text("1\n")).unwrap();
        }
        assert!(s.table.lock().inodes.len() <= KEEP * 6);
        s.forget(1_000_000);
        assert!(!s.table.lock().inodes.contains_key(&1_000_000));
    }
}

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
//!   its size after the short page read.
//!
//! Direct I/O keeps the page cache from serving an old value to `read`, and
//! an open without `FOPEN_KEEP_CACHE` drops the pages a splice left behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a rendering made for a stat is what opens serve, and how long
/// any rendering answers stats. Long enough for a reader's stat, open and
/// fstat on a loaded host; short enough that a polling loop sees new values.
pub const HANDOFF: Duration = Duration::from_millis(200);

/// Inodes whose renderings are kept before old ones are dropped. Their
/// sizes are kept longer (see [`KEEP_SIZES`]); the kernel's FORGET drops
/// both.
const KEEP_TEXTS: usize = 1024;

/// Inodes whose last reported size is remembered. Past that, old entries
/// are dropped, which only costs their next open a size raise.
const KEEP_SIZES: usize = 1 << 16;

/// A file's rendered text, shared between the snapshot table and the open
/// handles reading it.
pub type Text = Arc<Vec<u8>>;

#[derive(Default)]
pub struct Snapshots {
    inodes: Mutex<HashMap<u64, Known>>,
}

struct Known {
    /// The latest rendering and when it was made, while it may be reused.
    text: Option<(Text, Instant)>,
    /// Whether `text` was made for a stat (opens may serve it).
    for_stat: bool,
    /// The smallest size the kernel may hold for the inode: set by a stat's
    /// answer or a raise, lowered by every short read (the kernel trims its
    /// size after a short page read, and a read does not say which it is).
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
    /// a new one from `render`.
    pub fn for_stat<E>(
        &self,
        ino: u64,
        render: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Text, E> {
        if let Some(text) = self.young(ino, false) {
            // Opens keep rendering anew: a reader that polls with open and
            // fstat (Rust, Python, Go) would otherwise see one value for
            // as long as it polls faster than HANDOFF.
            self.reported(ino, text.len() as u64);
            return Ok(text);
        }
        let text = Arc::new(render()?);
        self.keep(ino, &text, true);
        self.reported(ino, text.len() as u64);
        Ok(text)
    }

    /// The text an open of `ino` serves: the rendering of a stat made
    /// within [`HANDOFF`], or a new one from `render`.
    pub fn for_open<E>(
        &self,
        ino: u64,
        render: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Opened, E> {
        if let Some(text) = self.young(ino, true) {
            // Served once: the next open renders anew, so a value never
            // lags behind the reader's own previous read.
            if let Some(known) = self.inodes.lock().get_mut(&ino) {
                known.for_stat = false;
            }
            let raise = self.needs_raise(ino, text.len() as u64);
            return Ok(Opened { text, raise });
        }
        let text = Arc::new(render()?);
        self.keep(ino, &text, false);
        let raise = self.needs_raise(ino, text.len() as u64);
        Ok(Opened { text, raise })
    }

    /// A read of `ino` returned less than asked, ending at `end`.
    pub fn short_read(&self, ino: u64, end: u64) {
        if let Some(known) = self.inodes.lock().get_mut(&ino) {
            known.floor = known.floor.min(end);
        }
    }

    /// The kernel dropped the inode: it asks anew before it uses a size.
    pub fn forget(&self, ino: u64) {
        self.inodes.lock().remove(&ino);
    }

    fn young(&self, ino: u64, made_for_stat: bool) -> Option<Text> {
        let inodes = self.inodes.lock();
        let known = inodes.get(&ino)?;
        let (text, at) = known.text.as_ref()?;
        (at.elapsed() < HANDOFF && (known.for_stat || !made_for_stat)).then(|| text.clone())
    }

    fn keep(&self, ino: u64, text: &Text, for_stat: bool) {
        let mut inodes = self.inodes.lock();
        if inodes.len() >= KEEP_TEXTS && !inodes.contains_key(&ino) {
            prune(&mut inodes);
        }
        let known = inodes.entry(ino).or_insert(Known {
            text: None,
            for_stat,
            floor: 0,
        });
        known.text = Some((text.clone(), Instant::now()));
        known.for_stat = for_stat;
    }

    /// The kernel was told the inode's size.
    fn reported(&self, ino: u64, size: u64) {
        if let Some(known) = self.inodes.lock().get_mut(&ino) {
            known.floor = size;
        }
    }

    /// Whether the kernel may hold less than `len` for `ino`; if so, the
    /// caller raises it, and the floor is `len` from then on.
    fn needs_raise(&self, ino: u64, len: u64) -> bool {
        let mut inodes = self.inodes.lock();
        match inodes.get_mut(&ino) {
            Some(known) if known.floor >= len => false,
            Some(known) => {
                known.floor = len;
                true
            }
            None => len > 0,
        }
    }
}

/// Drops renderings too old to be reused, and, past [`KEEP_SIZES`], the
/// sizes of inodes with no young rendering.
fn prune(inodes: &mut HashMap<u64, Known>) {
    for known in inodes.values_mut() {
        if known
            .text
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= HANDOFF)
        {
            known.text = None;
        }
    }
    if inodes.len() >= KEEP_SIZES {
        inodes.retain(|_, known| known.text.is_some());
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
    fn a_short_read_lowers_what_the_kernel_may_hold() {
        let s = Snapshots::default();
        s.for_stat(7, || text("12345\n")).unwrap();
        s.short_read(7, 3);
        std::thread::sleep(HANDOFF);
        let open = s.for_open(7, || text("1234\n")).unwrap();
        assert!(open.raise, "the kernel may have trimmed its size to 3");
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
        for ino in 0..(KEEP_TEXTS as u64 * 3) {
            s.for_stat(ino, || text("1\n")).unwrap();
        }
        assert!(s.inodes.lock().len() <= KEEP_SIZES);
        s.forget(0);
        assert!(!s.inodes.lock().contains_key(&0));
    }
}

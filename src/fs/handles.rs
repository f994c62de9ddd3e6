//! The open files and directories: each handle holds the snapshot its open
//! took, so every read of it, at any offset, sees the same text.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::{FsError, Result};
use super::snapshots::Text;
use super::DirEntry;

/// What an open handed out, by handle number.
pub(super) struct Handles {
    open: Mutex<HashMap<u64, Handle>>,
    next: AtomicU64,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(first_number()),
        }
    }
}

/// Handles are numbered from the boot-time clock, in nanoseconds, at the
/// server's start: no server hands out more than one a nanosecond, so a
/// server that takes over from another never hands out a number that a
/// reader still holds from its predecessor.
fn first_number() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64 + 1
}

impl Handles {
    /// Takes on a handle this server did not hand out: a predecessor's,
    /// still held by a reader.
    pub(super) fn adopt(&self, number: u64, handle: Handle) {
        self.open.lock().entry(number).or_insert(handle);
    }

    pub(super) fn insert(&self, handle: Handle) -> u64 {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().insert(number, handle);
        number
    }

    /// Up to `size` bytes of a file handle's snapshot from `offset`, not
    /// copied.
    pub(super) fn read(&self, handle: u64, offset: u64, size: u32) -> Result<Chunk> {
        let content = match self.open.lock().get(&handle) {
            Some(Handle::File(content)) => content.clone(),
            _ => return Err(FsError::BadHandle),
        };
        let start = (offset as usize).min(content.len());
        let end = start.saturating_add(size as usize).min(content.len());
        Ok(Chunk {
            content,
            range: start..end,
        })
    }

    /// The listing a directory handle took.
    pub(super) fn listing(&self, handle: u64) -> Result<Arc<Vec<DirEntry>>> {
        match self.open.lock().get(&handle) {
            Some(Handle::Dir(entries)) => Ok(entries.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    pub(super) fn release(&self, handle: u64) {
        self.open.lock().remove(&handle);
    }
}

pub(super) enum Handle {
    /// The text served by this open. Not `Arc<[u8]>`: that would copy it,
    /// and an aggregate file is megabytes.
    File(Text),
    Dir(Arc<Vec<DirEntry>>),
}

/// Part of an open file's snapshot, shared with its handle.
#[derive(Debug)]
pub struct Chunk {
    content: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.content[self.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_numbers_above_its_predecessor() {
        let first = Handles::default();
        let last = (0..1000)
            .map(|_| first.insert(Handle::Dir(Arc::new(Vec::new()))))
            .max()
            .unwrap();
        let next = Handles::default();
        assert!(next.insert(Handle::Dir(Arc::new(Vec::new()))) > last);
    }
}

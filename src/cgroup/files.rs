//! The text of a cgroup's files, read once per sample: from descriptors
//! kept open where the budget allows ([`super::kept`]), else opened for the
//! read. Knows nothing of what the files mean ([`super::read`] does).

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::kept::KeptFiles;
use super::parse::ParseError;
use super::walk::{self, Answer, Walked};

/// Why a group could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Occurs when the cgroup was removed.
    #[error("{0}: cgroup no longer exists")]
    Vanished(PathBuf),
    /// Occurs when a source file exists but cannot be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Occurs when a source file's text is not in the kernel's format.
    #[error("{path}: {source}")]
    Malformed { path: PathBuf, source: ParseError },
}

type Result<T> = std::result::Result<T, SourceError>;

/// The cgroup files one sample has read: a file several groups need (v1
/// `memory.stat`, v2 `cpu.stat`) is read once per sample. With a cgroup's
/// [`KeptFiles`], its files are read from descriptors kept open; with a
/// cgroup walk ([`Files::use_walk`]), the files it answers are not read at
/// all. The texts
/// share one buffer, which [`Files::reset`] keeps for the next cgroup, so
/// that sampling many cgroups allocates next to nothing.
#[derive(Default)]
pub struct Files<'a> {
    kept: Option<&'a KeptFiles>,
    /// Files the walk can answer are read but not kept.
    unwalked_only: bool,
    walked: Option<&'a Walked>,
    /// Files the walk answered.
    answered: u64,
    read: Vec<(&'a Path, &'static str, Option<Range<usize>>)>,
    texts: Vec<u8>,
}

impl<'a> Files<'a> {
    pub fn new(kept: &'a KeptFiles) -> Files<'a> {
        Files {
            kept: Some(kept),
            ..Files::default()
        }
    }

    /// Answers the files the walk answers from it, for every cgroup from
    /// now on.
    pub fn use_walk(&mut self, walked: Option<&'a Walked>) {
        self.walked = walked;
    }

    /// Keeps no file the walk answers wherever it is: aggregates take it
    /// from the walk, or, when a walk does not pay, open it (few
    /// containers); single-file reads keep what they read.
    pub fn keep_only_unwalked(&mut self) {
        self.unwalked_only = true;
    }

    /// How many files the walk answered since the last call.
    pub fn take_answered(&mut self) -> u64 {
        std::mem::take(&mut self.answered)
    }

    /// Starts over for another cgroup, keeping the memory.
    pub fn reset(&mut self, kept: &'a KeptFiles) {
        self.kept = Some(kept);
        self.forget();
    }

    /// Forgets every text read, so that each file is read again when next
    /// asked for (what was read has gone stale).
    pub fn forget(&mut self) {
        self.read.clear();
        self.texts.clear();
    }

    pub(super) fn slice(&self, range: Range<usize>) -> &str {
        std::str::from_utf8(&self.texts[range]).expect("checked when read")
    }

    pub(super) fn range(
        &mut self,
        dir: &'a Path,
        file: &'static str,
    ) -> Result<Option<Range<usize>>> {
        let same = |(d, f, _): &&(&Path, &str, _)| *f == file && d.as_os_str() == dir.as_os_str();
        if let Some((_, _, range)) = self.read.iter().find(same) {
            return Ok(range.clone());
        }
        let start = self.texts.len();
        let found = self
            .fetch(dir, file)
            .inspect_err(|_| self.texts.truncate(start))?;
        let range = found.then_some(start..self.texts.len());
        if let Some(range) = &range {
            if let Err(e) = std::str::from_utf8(&self.texts[range.clone()]) {
                self.texts.truncate(start);
                return Err(SourceError::Io {
                    path: dir.join(file),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                });
            }
        }
        self.read.push((dir, file, range.clone()));
        Ok(range)
    }

    /// The walk's answer, when it has one: the text appended (true), or
    /// no such file (false).
    fn walk_answer(&mut self, dir: &Path, file: &str) -> Option<bool> {
        let (walked, kept) = (self.walked?, self.kept?);
        if !walk::answers(file) {
            return None;
        }
        let found = match walked.render(kept.cgroup_key(dir)?, file, &mut self.texts) {
            Answer::Text => true,
            Answer::Absent => false,
            Answer::Unseen => {
                kept.forget_key(dir);
                return None;
            }
            Answer::ReadFile => return None,
        };
        self.answered += 1;
        Some(found)
    }

    /// Appends the file's text; false when the cgroup has no such file.
    fn fetch(&mut self, dir: &Path, file: &'static str) -> Result<bool> {
        let path = || dir.join(file);
        if let Some(found) = self.walk_answer(dir, file) {
            return Ok(found);
        }
        if let Some(kept) = self.kept {
            match kept.read_into(dir, file, &mut self.texts) {
                Some(Ok(())) => return Ok(true),
                Some(Err(source)) => {
                    return Err(SourceError::Io {
                        path: path(),
                        source,
                    })
                }
                None => {}
            }
        }
        let start = self.texts.len();
        let read = std::fs::File::open(path()).and_then(|mut fd| {
            read_all(&mut fd, &mut self.texts)?;
            Ok(fd)
        });
        match read {
            Ok(fd) => {
                match self.kept {
                    Some(_) if self.unwalked_only && walk::answers_wherever(file) => {}
                    Some(kept) => kept.keep(dir, file, fd, self.texts.len() - start),
                    None => {}
                }
                Ok(true)
            }
            Err(e) if super::is_gone(&e) => {
                if !dir.is_dir() {
                    return Err(SourceError::Vanished(dir.to_path_buf()));
                }
                Ok(false)
            }
            // A file the kernel shows but cannot fill: pressure files with
            // PSI off (psi=0) on kernels that do not hide them. Recent ones
            // hide them (ENOENT above), as does `cgroup.pressure` 0.
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(source) => Err(SourceError::Io {
                path: path(),
                source,
            }),
        }
    }
}

/// EOPNOTSUPP: the host does not provide what the file would hold.
fn is_unsupported(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// Appends a cgroup file's whole text to `out`. Plain `read`s: std's
/// `read_to_end` sizes its buffer with a `statx` and an `lseek` first, two
/// syscalls per file that cgroupfs answers with a meaningless 4096.
fn read_all(file: &mut std::fs::File, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    let mut chunk = [0u8; 4096];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_is_eopnotsupp_only() {
        let os = std::io::Error::from_raw_os_error;
        assert!(is_unsupported(&os(libc::EOPNOTSUPP)));
        assert!(is_unsupported(&os(libc::ENOTSUP)));
        assert!(!is_unsupported(&os(libc::EIO)));
        assert!(!is_unsupported(&os(libc::EACCES)));
    }
}

//! Why a filesystem operation failed, and the one place that becomes an
//! error number.

use crate::cgroup::files::SourceError;

/// Why a filesystem operation failed. [`FsError::errno`] is the one place
/// these become error numbers.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Occurs for a name or inode that does not (or no longer) exist.
    #[error("no such file or directory")]
    NotFound,
    /// Occurs for every operation that would change the tree.
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    /// Occurs for readlink on anything but `self`.
    #[error("not a symbolic link")]
    NotSymlink,
    /// Occurs for a file handle the daemon did not hand out.
    #[error("bad file handle")]
    BadHandle,
    /// Occurs when a source file cannot be read or parsed.
    #[error(transparent)]
    Source(SourceError),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::BadHandle => libc::EBADF,
            FsError::Source(SourceError::Vanished(_)) => libc::ENOENT,
            FsError::Source(_) => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

//! The filesystem: a model that knows the tree ([`model`]: lookups,
//! listings, renderings), its numbering ([`inode`]), what `stat` shows
//! ([`attr`], including `--private`), the open snapshots (`handles`), the
//! renderings shared by a stat and the open after it ([`snapshots`]), the
//! containers that ended lately ([`exited`]), why
//! an operation fails ([`error`]), and the thin FUSE adapter that serves it
//! all ([`fuse`]).

pub mod attr;
pub mod error;
pub mod exited;
pub mod fuse;
mod handles;
pub mod inode;
pub mod model;
pub mod snapshots;

use inode::Kind;

/// One name of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

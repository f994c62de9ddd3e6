//! The filesystem: a model that knows the tree ([`model`], numbered by
//! [`inode`], its renderings shared by stats and opens in [`snapshots`])
//! and the thin FUSE adapter that serves it ([`fuse`]).

pub mod attr;
pub mod error;
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

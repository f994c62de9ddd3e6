//! The filesystem: a model that knows the tree ([`model`], numbered by
//! [`inode`], its renderings shared by stats and opens in [`snapshots`])
//! and the thin FUSE adapter that serves it ([`fuse`]).

pub mod fuse;
pub mod inode;
pub mod model;
pub mod snapshots;

//! cgmetric: per-container metrics as a procfs-style FUSE filesystem.
//!
//! Module map:
//! - [`cli`]: the command line and `-o` words.
//! - [`daemon`]: runs it all: mounts, starts the threads, handles signals.
//! - [`mounts`]: the mount table, and whether a path is a live cgmetric.
//! - [`containers`]: which cgroups are containers and what they are called
//!   ([`containers::runtime`], [`containers::discovery`],
//!   [`containers::watch`]), and the set the daemon knows
//!   ([`containers::registry`]).
//! - [`cgroup`]: cgroupfs: where the hierarchies are ([`cgroup::layout`]),
//!   parsing its files ([`cgroup::parse`]), the files kept open
//!   ([`cgroup::kept`]) and a container's values read from them
//!   ([`cgroup::read`]).
//! - [`net`]: the eBPF programs and their pinned maps.
//! - [`sample`]: a container's values from every source, rates on demand
//!   ([`sample::rate`]) and the helper threads an aggregate read shares
//!   ([`sample::pool`]).
//! - [`metrics`]: the catalogue, one table that drives every listing.
//! - [`render`]: values as file text and Prometheus exposition.
//! - [`fs`]: the filesystem: a model of the tree and a thin FUSE adapter.
//! - [`ledger`]: the durable state: the billing ledger and the index of
//!   known containers.
//! - [`report`]: `cgmetric top`, and the mounted tree's snapshot it reads.
//! - [`billing`]: `cgmetric billing`: the ledger and the live tree, per
//!   name, over a period.

pub mod billing;
pub mod bpf_sys;
pub mod cgroup;
pub mod cli;
pub mod containers;
pub mod daemon;
pub mod fs;
pub mod ledger;
pub mod metrics;
pub mod mounts;
pub mod net;
pub mod render;
pub mod report;
pub mod sample;
pub mod supervise;
pub mod systemd;
pub mod takeover;

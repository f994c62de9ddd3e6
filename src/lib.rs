//! cgmetric: per-container metrics as a procfs-style FUSE filesystem.
//!
//! Module map: [`cgroup`] finds and parses cgroupfs, [`discovery`] decides
//! which cgroups are containers and names them, [`metrics`] is the catalogue,
//! [`render`] turns values into files, [`rate`] measures rates on demand,
//! [`fs`] is the filesystem (a model plus a thin FUSE adapter), and
//! [`daemon`] runs it all.

pub mod cgroup;
pub mod cli;
pub mod daemon;
pub mod discovery;
pub mod fs;
pub mod helpers;
pub mod metrics;
pub mod mounts;
pub mod net;
pub mod rate;
pub mod registry;
pub mod render;
pub mod report;
pub mod runtime;
pub mod sample;
pub mod watch;

//! Everything about cgroupfs: where the hierarchies are ([`layout`]), what
//! their files say ([`parse`]), the text of a cgroup's files ([`files`]),
//! some kept open ([`kept`]), and a container's values read from them
//! ([`read`]: which file of which hierarchy holds which metric).

pub mod files;
pub mod kept;
pub mod layout;
pub mod parse;
pub mod read;
pub mod walk;

use std::path::{Path, PathBuf};

pub use layout::{Controller, Layout, LayoutKind};

/// Cgroup keys ([`CgroupDirs::key`]) are below 2^KEY_BITS.
pub const KEY_BITS: u32 = 45;

/// The directories of one cgroup (a path relative to the hierarchy roots) in
/// every hierarchy where it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupDirs {
    pub v2: Option<PathBuf>,
    v1: Vec<(Controller, PathBuf)>,
}

impl CgroupDirs {
    /// Finds `relative` in each hierarchy of `layout`.
    pub fn resolve(layout: &Layout, relative: &Path) -> CgroupDirs {
        let existing = |root: &Path| Some(root.join(relative)).filter(|dir| dir.is_dir());
        CgroupDirs {
            v2: layout.unified.as_deref().and_then(existing),
            v1: Controller::ALL
                .into_iter()
                .filter_map(|c| Some((c, layout.v1(c).and_then(existing)?)))
                .collect(),
        }
    }

    pub fn v1(&self, controller: Controller) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, p)| p.as_path())
    }

    /// Who owns the cgroup's directory (uid, gid): for a delegated or
    /// rootless container, the user it belongs to.
    pub fn owner(&self) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let dir = self
            .v2
            .as_deref()
            .or(self.v1.first().map(|(_, p)| p.as_path()))?;
        std::fs::metadata(dir).ok().map(|m| (m.uid(), m.gid()))
    }

    /// A number for this cgroup that any daemon computes alike while the
    /// cgroup lives, below 2^[`KEY_BITS`]: its v2 id, or its directory's
    /// inode in the first v1 hierarchy that has it, tagged with that
    /// hierarchy (each hierarchy numbers its inodes on its own). A server
    /// that takes over from another numbers the tree as its predecessor did.
    /// cgroupfs numbers are 32 bits of inode and a generation above that
    /// grows only when the 32 bits wrap, so the masks keep them distinct.
    pub fn key(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        if let Some(dir) = &self.v2 {
            return std::fs::metadata(dir)
                .ok()
                .map(|m| m.ino() & ((1 << (KEY_BITS - 1)) - 1));
        }
        let (controller, dir) = self.v1.first()?;
        let hierarchy = Controller::ALL.iter().position(|c| c == controller)? as u64;
        let ino = std::fs::metadata(dir).ok()?.ino();
        Some(1 << (KEY_BITS - 1) | (hierarchy & 15) << 40 | ino & ((1 << 40) - 1))
    }

    /// The cgroup's id: the inode of its directory, in the v2 tree when it has
    /// one (the number eBPF's `bpf_skb_cgroup_id` reports), else in the first
    /// v1 hierarchy.
    pub fn id(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let dir = self
            .v2
            .as_deref()
            .or(self.v1.first().map(|(_, p)| p.as_path()))?;
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }
}

/// ENOENT, or ENODEV from a cgroup removed while its file was being read.
pub(crate) fn is_gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// The cgroup of process `pid`, relative to the hierarchy roots: its v2
/// path, or on a v1-only host the memory controller's.
pub fn of_process(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path_of = |line: &str| line.splitn(3, ':').nth(2).map(str::to_string);
    let v2 = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .and_then(path_of);
    let v1 = || {
        text.lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "memory"))
            })
            .and_then(path_of)
    };
    let path = v2.filter(|p| p != "/").or_else(v1)?;
    Some(Path::new(path.trim_start_matches('/')).to_path_buf())
}

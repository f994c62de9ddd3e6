//! Inode numbers, computed from what a node is rather than stored.
//!
//! `1` is the root, `2..` the root's own files, then `self`, then `exited/`.
//! A directory of metrics owns a range of 2^16 numbers: offset 0 is the
//! directory, then its metadata files, then one number per catalogue row.
//! Containers' ranges start at 2^16 (by slot); the `cgroup/` tree's are
//! flagged by bit 62 (by node), `exited/`'s by bit 61 (by exit number).
//! Slots and nodes are their cgroups' keys (`CgroupDirs::key`, below 2^45,
//! so below both flags once shifted): a number never names two things, and
//! a server that takes the connection over from another gives every live
//! container's and cgroup's node the number the kernel already holds.
//! Exit numbers count from the server's start (`exited/` is the server's
//! own memory).

use crate::metrics::{MetricId, CLASS_METRICS};

pub const ROOT_INO: u64 = 1;
const SLOT_SHIFT: u32 = 16;
const META_BASE: u64 = 1;
const METRIC_BASE: u64 = 16;
/// Per-class files: `CLASS_BASE + metric * CLASS_STRIDE + class`.
const CLASS_BASE: u64 = 1 << 12;
const CLASS_STRIDE: u64 = 1 << 8;
const CGROUP_TREE: u64 = 1 << 62;
const EXITED_TREE: u64 = 1 << 61;

/// The daemon's own files in the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootFile {
    Metric,
    MetricsProm,
}

impl RootFile {
    pub const ALL: [RootFile; 2] = [RootFile::Metric, RootFile::MetricsProm];

    pub fn name(self) -> &'static str {
        match self {
            RootFile::Metric => "metric",
            RootFile::MetricsProm => "metrics.prom",
        }
    }
}

/// Every name the daemon owns in the root: they win over containers'.
pub const RESERVED_NAMES: &[&str] = &[
    "metric",
    "metrics.prom",
    SELF_NAME,
    CGROUP_NAME,
    EXITED_NAME,
];
pub const SELF_NAME: &str = "self";
pub const CGROUP_NAME: &str = "cgroup";
pub const EXITED_NAME: &str = "exited";

/// A directory's files that are not metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    Metrics,
    Name,
    Id,
    Cgroup,
    Runtime,
    /// Only in `exited/<name>/`: when the container ended.
    ExitedAt,
}

impl Meta {
    pub const ALL: [Meta; 6] = [
        Meta::Metrics,
        Meta::Name,
        Meta::Id,
        Meta::Cgroup,
        Meta::Runtime,
        Meta::ExitedAt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Meta::Metrics => "metrics",
            Meta::Name => "name",
            Meta::Id => "id",
            Meta::Cgroup => "cgroup",
            Meta::Runtime => "runtime",
            Meta::ExitedAt => "exited_at",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Meta(Meta),
    Metric(MetricId),
    /// A per-class file: the index of its metric in `CLASS_METRICS` and
    /// the class's among the classes' names.
    Class {
        metric: u8,
        class: u8,
    },
}

/// Whose metrics a directory shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A container, by registry slot.
    Container(u64),
    /// A cgroup of the `cgroup/` tree, by node (0 is the root cgroup).
    Cgroup(u64),
    /// A container that ended, under `exited/`, by exit number.
    Exited(u64),
}

impl Owner {
    /// Whether a directory of this owner has the file `meta`.
    pub fn has(self, meta: Meta) -> bool {
        meta != Meta::ExitedAt || matches!(self, Owner::Exited(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    RootFile(RootFile),
    /// `self`: a symlink to the reader's own container.
    SelfLink,
    /// `exited/`: the containers that ended lately.
    ExitedDir,
    Dir(Owner),
    File(Owner, Entry),
}

impl Node {
    pub fn ino(self) -> u64 {
        let base = |owner: Owner| match owner {
            Owner::Container(slot) => (slot + 1) << SLOT_SHIFT,
            Owner::Cgroup(node) => CGROUP_TREE | ((node + 1) << SLOT_SHIFT),
            Owner::Exited(exit) => EXITED_TREE | ((exit + 1) << SLOT_SHIFT),
        };
        match self {
            Node::Root => ROOT_INO,
            Node::RootFile(f) => 2 + f as u64,
            Node::SelfLink => 2 + RootFile::ALL.len() as u64,
            Node::ExitedDir => 3 + RootFile::ALL.len() as u64,
            Node::Dir(owner) => base(owner),
            Node::File(owner, Entry::Meta(m)) => base(owner) + META_BASE + m as u64,
            Node::File(owner, Entry::Metric(id)) => base(owner) + METRIC_BASE + id as u64,
            Node::File(owner, Entry::Class { metric, class }) => {
                base(owner) + CLASS_BASE + u64::from(metric) * CLASS_STRIDE + u64::from(class)
            }
        }
    }

    pub fn from_ino(ino: u64) -> Option<Node> {
        if ino == ROOT_INO {
            return Some(Node::Root);
        }
        if ino == Node::SelfLink.ino() {
            return Some(Node::SelfLink);
        }
        if ino == Node::ExitedDir.ino() {
            return Some(Node::ExitedDir);
        }
        let flags = ino & (CGROUP_TREE | EXITED_TREE);
        let index = ((ino & !flags) >> SLOT_SHIFT).checked_sub(1);
        let offset = ino & ((1 << SLOT_SHIFT) - 1);
        let owner = |index| match flags {
            0 => Some(Owner::Container(index)),
            CGROUP_TREE => Some(Owner::Cgroup(index)),
            EXITED_TREE => Some(Owner::Exited(index)),
            _ => None,
        };
        match index {
            None if flags == 0 => RootFile::ALL
                .get(ino.checked_sub(2)? as usize)
                .map(|f| Node::RootFile(*f)),
            None => None,
            Some(index) if offset == 0 => Some(Node::Dir(owner(index)?)),
            Some(index) if offset < METRIC_BASE => Meta::ALL
                .get((offset - META_BASE) as usize)
                .filter(|m| owner(index).is_some_and(|o| o.has(**m)))
                .map(|m| Node::File(owner(index).unwrap(), Entry::Meta(*m))),
            Some(index) if offset < CLASS_BASE => {
                MetricId::from_index((offset - METRIC_BASE) as usize)
                    .and_then(|id| Some(Node::File(owner(index)?, Entry::Metric(id))))
            }
            Some(index) => {
                let metric = (offset - CLASS_BASE) / CLASS_STRIDE;
                let class = (offset - CLASS_BASE) % CLASS_STRIDE;
                let entry = Entry::Class {
                    metric: u8::try_from(metric).ok()?,
                    class: class as u8,
                };
                (metric < CLASS_METRICS.len() as u64).then_some(Node::File(owner(index)?, entry))
            }
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Node::Root | Node::ExitedDir | Node::Dir(_) => Kind::Dir,
            Node::SelfLink => Kind::Symlink,
            Node::RootFile(_) | Node::File(..) => Kind::File,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::METRICS;

    #[test]
    fn every_node_round_trips() {
        let mut nodes = vec![Node::Root, Node::SelfLink, Node::ExitedDir];
        nodes.extend(RootFile::ALL.map(Node::RootFile));
        for index in [0, 1, 4096, u32::MAX as u64] {
            for owner in [
                Owner::Container(index),
                Owner::Cgroup(index),
                Owner::Exited(index),
            ] {
                nodes.push(Node::Dir(owner));
                nodes.extend(
                    Meta::ALL
                        .into_iter()
                        .filter(|m| owner.has(*m))
                        .map(|m| Node::File(owner, Entry::Meta(m))),
                );
                nodes.extend(
                    METRICS
                        .iter()
                        .map(|m| Node::File(owner, Entry::Metric(m.id))),
                );
                for metric in 0..CLASS_METRICS.len() as u8 {
                    nodes.extend(
                        [0, 1, 15, 255]
                            .map(|class| Node::File(owner, Entry::Class { metric, class })),
                    );
                }
            }
        }
        let mut inos: Vec<u64> = nodes.iter().map(|n| n.ino()).collect();
        for (node, ino) in nodes.iter().zip(&inos) {
            assert_eq!(Node::from_ino(*ino), Some(*node), "{ino:#x}");
        }
        inos.sort();
        inos.dedup();
        assert_eq!(inos.len(), nodes.len(), "inode numbers collide");
    }

    #[test]
    fn unknown_numbers_are_none() {
        assert_eq!(Node::from_ino(0), None);
        assert_eq!(Node::from_ino(Node::ExitedDir.ino() + 1), None);
        assert_eq!(
            Node::from_ino(CGROUP_TREE | EXITED_TREE | (1 << SLOT_SHIFT)),
            None
        );
        let exited_at = 1 + META_BASE + Meta::ExitedAt as u64;
        assert_eq!(Node::from_ino((1 << SLOT_SHIFT) + exited_at - 1), None);
        assert_eq!(Node::from_ino(CGROUP_TREE), None);
        assert_eq!(
            Node::from_ino((1 << SLOT_SHIFT) + METRIC_BASE + METRICS.len() as u64),
            None
        );
    }

    #[test]
    fn names_do_not_collide() {
        for f in RootFile::ALL {
            assert!(RESERVED_NAMES.contains(&f.name()));
        }
        assert!(METRIC_BASE as usize > META_BASE as usize + Meta::ALL.len());
        assert!(CLASS_BASE as usize > METRIC_BASE as usize + METRICS.len());
        assert!(CLASS_BASE + CLASS_METRICS.len() as u64 * CLASS_STRIDE <= 1 << SLOT_SHIFT);
        for m in Meta::ALL {
            assert!(METRICS.iter().all(|def| def.file != m.name()));
        }
    }
}

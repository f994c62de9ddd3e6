//! Inode numbers, computed from what a node is rather than stored.
//!
//! `1` is the root, `2..` the root's own files. A container owns the range
//! `(slot + 1) << 16`: offset 0 is its directory, then its metadata files,
//! then one number per catalogue row. Slots are never reused while the
//! daemon runs, so a number never names two things.

use crate::metrics::MetricId;
use crate::registry::Slot;

pub const ROOT_INO: u64 = 1;
const SLOT_SHIFT: u32 = 16;
const META_BASE: u64 = 1;
const METRIC_BASE: u64 = 16;

/// The daemon's own files in the root. Their names win over containers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootFile {
    Metric,
    MetricsProm,
}

impl RootFile {
    pub const ALL: [RootFile; 2] = [RootFile::Metric, RootFile::MetricsProm];
    /// The names, in the order of [`RootFile::ALL`].
    pub const NAMES: &'static [&'static str] = &["metric", "metrics.prom"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// A container's files that are not metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    Metrics,
    Name,
    Id,
    Cgroup,
    Runtime,
}

impl Meta {
    pub const ALL: [Meta; 5] = [
        Meta::Metrics,
        Meta::Name,
        Meta::Id,
        Meta::Cgroup,
        Meta::Runtime,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Meta::Metrics => "metrics",
            Meta::Name => "name",
            Meta::Id => "id",
            Meta::Cgroup => "cgroup",
            Meta::Runtime => "runtime",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Meta(Meta),
    Metric(MetricId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    RootFile(RootFile),
    Dir(Slot),
    File(Slot, Entry),
}

impl Node {
    pub fn ino(self) -> u64 {
        let base = |slot: Slot| (slot + 1) << SLOT_SHIFT;
        match self {
            Node::Root => ROOT_INO,
            Node::RootFile(f) => 2 + f as u64,
            Node::Dir(slot) => base(slot),
            Node::File(slot, Entry::Meta(m)) => base(slot) + META_BASE + m as u64,
            Node::File(slot, Entry::Metric(id)) => base(slot) + METRIC_BASE + id as u64,
        }
    }

    pub fn from_ino(ino: u64) -> Option<Node> {
        if ino == ROOT_INO {
            return Some(Node::Root);
        }
        let slot = (ino >> SLOT_SHIFT).checked_sub(1);
        let offset = ino & ((1 << SLOT_SHIFT) - 1);
        match slot {
            None => RootFile::ALL
                .get(ino.checked_sub(2)? as usize)
                .map(|f| Node::RootFile(*f)),
            Some(slot) if offset == 0 => Some(Node::Dir(slot)),
            Some(slot) if offset < METRIC_BASE => Meta::ALL
                .get((offset - META_BASE) as usize)
                .map(|m| Node::File(slot, Entry::Meta(*m))),
            Some(slot) => MetricId::from_index((offset - METRIC_BASE) as usize)
                .map(|id| Node::File(slot, Entry::Metric(id))),
        }
    }

    pub fn is_dir(self) -> bool {
        matches!(self, Node::Root | Node::Dir(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::METRICS;

    #[test]
    fn every_node_round_trips() {
        let mut nodes = vec![Node::Root];
        nodes.extend(RootFile::ALL.map(Node::RootFile));
        for slot in [0, 1, 4096, u32::MAX as u64] {
            nodes.push(Node::Dir(slot));
            nodes.extend(Meta::ALL.map(|m| Node::File(slot, Entry::Meta(m))));
            nodes.extend(
                METRICS
                    .iter()
                    .map(|m| Node::File(slot, Entry::Metric(m.id))),
            );
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
        assert_eq!(Node::from_ino(2 + RootFile::ALL.len() as u64), None);
        assert_eq!(
            Node::from_ino((1 << SLOT_SHIFT) + METRIC_BASE + METRICS.len() as u64),
            None
        );
    }

    #[test]
    fn names_do_not_collide() {
        for (i, f) in RootFile::ALL.iter().enumerate() {
            assert_eq!(f.name(), RootFile::NAMES[i]);
        }
        assert!(METRIC_BASE as usize > META_BASE as usize + Meta::ALL.len());
        for m in Meta::ALL {
            assert!(METRICS.iter().all(|def| def.file != m.name()));
        }
    }
}

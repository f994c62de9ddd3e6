//! What `stat` shows: modes and ownership, and what `--private` changes.

use super::inode::{Kind, Node, Owner};

/// What `stat` shows for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// A file's exact length: what a read from offset 0 returns if the file
    /// is opened now. Zero for directories and `self`.
    pub size: u64,
    /// Whether the node stays what it is until the daemon says otherwise
    /// (everything but the `cgroup/` tree, whose removals nobody reports,
    /// and `exited/`, whose entries expire and are replaced unannounced).
    pub lasting: bool,
}

impl Attr {
    /// Owned by root and readable by everybody; nobody writes.
    pub(super) fn of(node: Node) -> Attr {
        let kind = node.kind();
        Attr {
            ino: node.ino(),
            kind,
            perm: match kind {
                Kind::Dir => 0o555,
                Kind::File => 0o444,
                Kind::Symlink => 0o777,
            },
            uid: 0,
            gid: 0,
            size: 0,
            lasting: !matches!(
                node,
                Node::Dir(Owner::Cgroup(_) | Owner::Exited(_))
                    | Node::File(Owner::Cgroup(_) | Owner::Exited(_), _)
            ),
        }
    }
}

/// `--private`: a directory of metrics and its files belong to the owner of
/// the cgroup (`owner`: uid, gid) and only they read them; the
/// all-containers files only root.
pub(super) fn make_private(
    attr: &mut Attr,
    node: Node,
    owner: impl FnOnce() -> Option<(u32, u32)>,
) -> bool {
    match node {
        Node::RootFile(_) => attr.perm = 0o400,
        Node::Dir(_) | Node::File(..) => {
            let Some(ids) = owner() else { return false };
            (attr.uid, attr.gid) = ids;
            attr.perm = if attr.kind == Kind::Dir { 0o500 } else { 0o400 };
        }
        Node::Root | Node::SelfLink | Node::ExitedDir => {}
    }
    true
}

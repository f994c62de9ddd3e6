//! The containers the daemon knows: each has a slot (its cgroup's key, which
//! fixes its inode numbers for as long as it lives, in this server and in
//! any that takes over from it) and a unique name that is safe as a
//! directory name.
//!
//! Naming rule: a container asks for a name (discovery's); if that name is
//! one of the daemon's own root entries or already belongs to a live
//! container, it gets `-<first 12 characters of its id>` appended. The owner
//! of a name keeps it while it lives; among containers found in the same
//! pass, the smaller cgroup path comes first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use crate::cgroup::kept::{Budget, KeptFiles};
use crate::cgroup::{CgroupDirs, Layout};
use crate::containers::discovery::{Discovery, Event, Found};
use crate::containers::runtime::Identity;
use crate::metrics::MetricId;

pub type Slot = u64;

/// Longest name a directory entry may have.
const NAME_MAX: usize = 255;

/// A cgroup whose metrics are served as a directory: a container of the
/// registry, or a node of the `cgroup/` tree. Both are read and rendered by
/// the same code.
#[derive(Debug)]
pub struct Metered {
    pub slot: Slot,
    /// The directory name.
    pub name: String,
    pub id: String,
    /// Path relative to the hierarchy roots.
    pub cgroup: PathBuf,
    pub runtime: &'static str,
    /// What its runtime records besides the name: its labels in
    /// `metrics.prom`.
    pub identity: Identity,
    /// The owner (uid, gid) of the cgroup directory when it was found.
    pub owner: (u32, u32),
    pub dirs: CgroupDirs,
    /// Its cgroup files kept open between reads; closed when it goes.
    pub kept: KeptFiles,
    /// When the daemon first saw it.
    pub first_seen: SystemTime,
    /// The inode number of its v2 directory, eBPF's key: kept when the
    /// directory goes before the container does, so its counts can still
    /// be read until they are swept.
    pub net_id: Option<u64>,
    available: OnceLock<Vec<MetricId>>,
}

impl Metered {
    fn new(
        slot: Slot,
        name: String,
        id: String,
        cgroup: PathBuf,
        runtime: &'static str,
        dirs: CgroupDirs,
        kept: KeptFiles,
    ) -> Self {
        use std::os::unix::fs::MetadataExt;
        let net_id = dirs
            .v2
            .as_deref()
            .and_then(|dir| std::fs::metadata(dir).ok())
            .map(|m| m.ino());
        Metered {
            slot,
            name,
            id,
            cgroup,
            runtime,
            identity: Identity::default(),
            owner: dirs.owner().unwrap_or((0, 0)),
            dirs,
            kept,
            first_seen: SystemTime::now(),
            net_id,
            available: OnceLock::new(),
        }
    }

    /// What is left of it once it ended: its names, owner and ids, with no
    /// cgroup directories and no files kept open (they close with the
    /// container, not when it leaves `exited/`).
    pub fn ended(&self) -> Metered {
        let mut ended = Metered::new(
            self.slot,
            self.name.clone(),
            self.id.clone(),
            self.cgroup.clone(),
            self.runtime,
            CgroupDirs::default(),
            KeptFiles::with_budget(no_budget()),
        )
        .succeeding(self);
        ended.owner = self.owner;
        ended
    }

    /// The same container as `old`, found again: first seen when `old` was,
    /// with what its runtime recorded (a rename changes only the name), and
    /// with `old`'s v2 id if its v2 directory is gone now.
    fn succeeding(mut self, old: &Metered) -> Self {
        self.first_seen = old.first_seen;
        self.identity = old.identity.clone();
        self.net_id = self.net_id.or(old.net_id);
        self
    }

    /// The metrics this container has files for, computed by `compute` the
    /// first time and kept for the container's life.
    pub fn available_with(&self, compute: impl FnOnce() -> Vec<MetricId>) -> &[MetricId] {
        self.available.get_or_init(compute)
    }
}

/// What a [`Registry::refresh`] changed.
#[derive(Default)]
pub struct Refreshed {
    /// The containers that vanished, as they were last.
    pub removed: Vec<Arc<Metered>>,
    /// The old names of renamed containers.
    pub renamed: Vec<String>,
    /// Live containers whose last process left (v2 `populated 0`): their
    /// counters are final now, while their cgroups still exist.
    pub emptied: Vec<Arc<Metered>>,
    /// Whether a container was added.
    pub added: bool,
}

impl Refreshed {
    /// The names the kernel must forget: vanished and renamed containers'.
    pub fn gone_names(&self) -> impl Iterator<Item = &str> {
        self.removed
            .iter()
            .map(|c| c.name.as_str())
            .chain(self.renamed.iter().map(String::as_str))
    }
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, Arc<Metered>>,
    by_slot: HashMap<Slot, Arc<Metered>>,
    by_cgroup: HashMap<PathBuf, Slot>,
    /// Slots the last server gave containers, by cgroup: taken by those
    /// containers in [`Registry::refresh_resuming`].
    remembered: HashMap<PathBuf, Slot>,
}

pub struct Registry {
    layout: Layout,
    discovery: Discovery,
    /// Names the daemon's own root entries use.
    reserved: &'static [&'static str],
    /// How many cgroup files the containers may keep open between them:
    /// none until [`Registry::kept_budget`] is given a limit.
    budget: Arc<Budget>,
    inner: RwLock<Inner>,
    refreshing: Mutex<()>,
}

impl Registry {
    pub fn new(
        layout: Layout,
        discovery: Discovery,
        reserved: &'static [&'static str],
    ) -> Registry {
        Registry {
            layout,
            discovery,
            reserved,
            budget: Arc::new(Budget::new(0)),
            inner: RwLock::default(),
            refreshing: Mutex::new(()),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The budget of cgroup files kept open (`--open-files`).
    pub fn kept_budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// Brings the registry in line with what discovery learnt since the
    /// last call. Returns the names of the containers that vanished.
    pub fn refresh(&self) -> Refreshed {
        // One refresh at a time, so none sees discovery's changes before
        // they are applied.
        let _serial = self.refreshing.lock();
        let events = self.discovery.changes(&self.layout);
        let mut refreshed = self.apply(events);
        refreshed.renamed = self.follow_renames();
        refreshed
    }

    /// The first refresh of a server that takes over a mount: containers the
    /// last server knew get the slots it gave them (`remembered`), so the
    /// inode numbers the kernel holds (in names it keeps for a minute, and
    /// in requests it resends) still mean them. Slots are otherwise cgroup
    /// keys, which can differ between two walks: on a hybrid host a
    /// container's v2 directory may appear after its v1 ones.
    ///
    /// By cgroup alone: a `--cgroup` container's id is its cgroup's, which
    /// changes with that v2 directory; and should the cgroup be a new one
    /// by the same path, the names the kernel holds are meant for it.
    pub fn refresh_resuming(&self, remembered: HashMap<PathBuf, Slot>) -> Refreshed {
        self.inner.write().remembered = remembered;
        let refreshed = self.refresh();
        // Only for the containers found now: a later one, even in the same
        // cgroup, is another incarnation and gets a fresh slot.
        self.inner.write().remembered.clear();
        refreshed
    }

    /// Gives containers their runtime's new names (`docker rename`).
    /// Returns the old names. The slot, and so every inode number, stays.
    fn follow_renames(&self) -> Vec<String> {
        let known: Vec<_> = self
            .inner
            .read()
            .by_slot
            .values()
            .filter(|c| crate::containers::runtime::Runtime::by_name(c.runtime).is_some())
            .map(|c| (c.cgroup.clone(), c.runtime, c.id.clone()))
            .collect();
        let renames = self.discovery.renames(&known);
        let mut old_names = Vec::new();
        let mut inner = self.inner.write();
        for (cgroup, wanted) in renames {
            let Some(old) = inner
                .by_cgroup
                .get(&cgroup)
                .and_then(|slot| inner.by_slot.get(slot))
                .cloned()
            else {
                continue;
            };
            inner.by_name.remove(&old.name);
            let name = self.unique_name(&inner, &wanted, &old.id);
            if name == old.name {
                inner.by_name.insert(name, old);
                continue;
            }
            log::info!("{} container {} is now {name}", old.runtime, old.name);
            let container = Arc::new(
                Metered::new(
                    old.slot,
                    name.clone(),
                    old.id.clone(),
                    old.cgroup.clone(),
                    old.runtime,
                    old.dirs.clone(),
                    KeptFiles::with_budget(self.budget.clone()),
                )
                .succeeding(&old),
            );
            inner.by_slot.insert(old.slot, container.clone());
            inner.by_name.insert(name, container);
            old_names.push(old.name.clone());
        }
        old_names
    }

    fn apply(&self, events: Vec<Event>) -> Refreshed {
        let mut refreshed = Refreshed::default();
        if events.is_empty() {
            return refreshed;
        }
        let mut inner = self.inner.write();
        for event in events {
            match event {
                Event::Removed(cgroup) => {
                    let slot = inner.by_cgroup.get(&cgroup).copied();
                    if let Some(container) = slot.and_then(|slot| drop_slot(&mut inner, slot)) {
                        refreshed.emptied.retain(|c| c.slot != container.slot);
                        refreshed.removed.push(container);
                    }
                }
                Event::Added(found) => refreshed.added |= self.add(&mut inner, found),
                Event::Changed(cgroup) => self.reresolve(&mut inner, &cgroup),
                Event::Emptied(cgroup) => {
                    if let Some(c) = inner
                        .by_cgroup
                        .get(&cgroup)
                        .and_then(|s| inner.by_slot.get(s))
                    {
                        refreshed.emptied.push(c.clone());
                    }
                }
            }
        }
        refreshed
    }

    /// Returns whether it added a container.
    fn add(&self, inner: &mut Inner, found: Found) -> bool {
        if inner.by_cgroup.contains_key(&found.cgroup) {
            return false;
        }
        let dirs = CgroupDirs::resolve(&self.layout, &found.cgroup);
        // Gone between the walk and now: nothing to add.
        let Some(cgroup_id) = dirs.id() else {
            return false;
        };
        let id = found.id.clone().unwrap_or_else(|| cgroup_id.to_string());
        let name = self.unique_name(inner, &found.name, &id);
        let remembered = inner
            .remembered
            .remove(&found.cgroup)
            .filter(|slot| *slot < 1 << crate::cgroup::KEY_BITS);
        let Some(mut slot) = remembered.or_else(|| dirs.key()) else {
            return false;
        };
        // Keys are distinct; this only guards against masked bits that a
        // kernel might one day use, and against a remembered slot that a
        // key now takes.
        while inner.by_slot.contains_key(&slot) {
            slot = (slot + 1) % (1 << crate::cgroup::KEY_BITS);
        }
        let mut container = Metered::new(
            slot,
            name.clone(),
            id,
            found.cgroup.clone(),
            found.runtime,
            dirs,
            KeptFiles::with_budget(self.budget.clone()),
        );
        container.identity = found.identity;
        let container = Arc::new(container);
        inner.by_cgroup.insert(found.cgroup, slot);
        inner.by_slot.insert(slot, container.clone());
        inner.by_name.insert(name, container);
        true
    }

    /// The container at `cgroup` in the hierarchies that hold it now; its
    /// slot and name stay, what files it has is found again.
    fn reresolve(&self, inner: &mut Inner, cgroup: &Path) {
        let Some(old) = inner
            .by_cgroup
            .get(cgroup)
            .and_then(|s| inner.by_slot.get(s))
        else {
            return;
        };
        let dirs = CgroupDirs::resolve(&self.layout, cgroup);
        let Some(cgroup_id) = dirs.id() else { return };
        // A `--cgroup` container is known by its cgroup's id, which is the
        // v2 directory's once it exists.
        let id = match old.runtime {
            "cgroup" => cgroup_id.to_string(),
            _ => old.id.clone(),
        };
        let container = Arc::new(
            Metered::new(
                old.slot,
                old.name.clone(),
                id,
                old.cgroup.clone(),
                old.runtime,
                dirs,
                KeptFiles::with_budget(self.budget.clone()),
            )
            .succeeding(old),
        );
        inner.by_slot.insert(container.slot, container.clone());
        inner.by_name.insert(container.name.clone(), container);
    }

    fn unique_name(&self, inner: &Inner, wanted: &str, id: &str) -> String {
        let taken = |name: &str| self.reserved.contains(&name) || inner.by_name.contains_key(name);
        let id_prefix: String = id.chars().take(12).collect();
        let candidates = std::iter::once(String::new())
            .chain(std::iter::once(format!("-{id_prefix}")))
            .chain((2..).map(|n| format!("-{id_prefix}-{n}")));
        for suffix in candidates {
            let name = format!("{}{suffix}", truncate(wanted, NAME_MAX - suffix.len()));
            if !taken(&name) {
                return name;
            }
        }
        unreachable!("the suffix sequence is endless")
    }

    pub fn get(&self, slot: Slot) -> Option<Arc<Metered>> {
        self.inner.read().by_slot.get(&slot).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Metered>> {
        self.inner.read().by_name.get(name).cloned()
    }

    /// Every container, sorted by name.
    pub fn list(&self) -> Vec<Arc<Metered>> {
        self.inner.read().by_name.values().cloned().collect()
    }
}

fn drop_slot(inner: &mut Inner, slot: Slot) -> Option<Arc<Metered>> {
    let container = inner.by_slot.remove(&slot)?;
    inner.by_name.remove(&container.name);
    inner.by_cgroup.remove(&container.cgroup);
    Some(container)
}

#[cfg(test)]
impl Metered {
    /// A container of no cgroup, for tests of what is rendered.
    pub(crate) fn named(slot: Slot, name: &str, id: &str) -> Metered {
        Metered::new(
            slot,
            name.into(),
            id.into(),
            PathBuf::from("t").join(name),
            "cgroup",
            CgroupDirs::default(),
            KeptFiles::with_budget(Arc::new(Budget::new(0))),
        )
    }
}

/// The budget of ended containers, which keep no files: one for all.
fn no_budget() -> Arc<Budget> {
    static NONE: OnceLock<Arc<Budget>> = OnceLock::new();
    NONE.get_or_init(|| Arc::new(Budget::new(0))).clone()
}

/// Where the `cgroup/` tree's nodes number their slots (for rate keys), above
/// containers' slots (cgroup keys).
const CGROUP_SLOTS: Slot = 1 << (crate::cgroup::KEY_BITS + 1);

/// The `cgroup/` tree: every cgroup of the host, interned the first time it
/// is looked up, so that its directory keeps one inode number while it lives.
pub struct CgroupTree {
    layout: Layout,
    budget: Arc<Budget>,
    inner: RwLock<TreeInner>,
}

#[derive(Default)]
struct TreeInner {
    by_path: HashMap<PathBuf, u64>,
    nodes: HashMap<u64, Arc<Metered>>,
}

impl CgroupTree {
    /// A tree whose nodes keep their files open within `budget`, the
    /// registry's (one `--open-files` for the whole daemon).
    pub fn new(layout: Layout, budget: Arc<Budget>) -> CgroupTree {
        let tree = CgroupTree {
            layout,
            budget,
            inner: RwLock::default(),
        };
        tree.node(Path::new(""));
        tree
    }

    /// The node of the cgroup at `path` (relative to the hierarchy roots),
    /// interned if the cgroup exists.
    pub fn node(&self, path: &Path) -> Option<(u64, Arc<Metered>)> {
        if let Some(&node) = self.inner.read().by_path.get(path) {
            return Some((node, self.inner.read().nodes.get(&node)?.clone()));
        }
        let dirs = CgroupDirs::resolve(&self.layout, path);
        let id = dirs.id()?;
        let mut inner = self.inner.write();
        if let Some(&node) = inner.by_path.get(path) {
            return Some((node, inner.nodes.get(&node)?.clone()));
        }
        // The root is node 0; the others are numbered by their cgroups, as
        // containers are, so that a successor numbers them alike.
        let mut node = match path.as_os_str().is_empty() {
            true => 0,
            false => dirs.key()?,
        };
        while node != 0 && inner.nodes.contains_key(&node) {
            node = (node + 1) % (1 << crate::cgroup::KEY_BITS);
        }
        let name = path
            .file_name()
            .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
        let container = Arc::new(Metered::new(
            CGROUP_SLOTS + node,
            name,
            id.to_string(),
            path.to_path_buf(),
            "cgroup",
            dirs,
            KeptFiles::with_budget(self.budget.clone()),
        ));
        inner.by_path.insert(path.to_path_buf(), node);
        inner.nodes.insert(node, container.clone());
        Some((node, container))
    }

    pub fn get(&self, node: u64) -> Option<Arc<Metered>> {
        self.inner.read().nodes.get(&node).cloned()
    }

    /// Whether `slot` is the slot of a node the tree still holds.
    pub fn holds_slot(&self, slot: Slot) -> bool {
        slot.checked_sub(CGROUP_SLOTS)
            .is_some_and(|node| self.inner.read().nodes.contains_key(&node))
    }

    /// Drops a node whose cgroup was found gone (the root stays).
    pub fn forget(&self, node: u64) {
        if node == 0 {
            return;
        }
        let mut inner = self.inner.write();
        if let Some(container) = inner.nodes.remove(&node) {
            inner.by_path.remove(&container.cgroup);
        }
    }

    /// The names of the cgroups directly below `node`, in any hierarchy.
    pub fn children(&self, node: &Metered) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for root in self.layout.hierarchies() {
            let Ok(entries) = std::fs::read_dir(root.join(&node.cgroup)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names.into_iter().collect()
    }

    /// Every interned node.
    pub fn list(&self) -> Vec<Arc<Metered>> {
        self.inner.read().nodes.values().cloned().collect()
    }
}

/// The longest prefix of `name` of at most `max` bytes that ends on a
/// character boundary.
fn truncate(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn registry() -> Registry {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
        let layout = Layout::from_tree(&root).unwrap();
        let discovery =
            Discovery::new(crate::containers::discovery::Globs::new(&[]).unwrap(), None);
        Registry::new(layout, discovery, &["metric", "metrics.prom"])
    }

    fn found(cgroup: &str, name: &str) -> Event {
        Event::Added(Found {
            cgroup: cgroup.into(),
            name: name.into(),
            id: None,
            runtime: "cgroup",
            identity: Identity::default(),
        })
    }

    fn names(registry: &Registry) -> Vec<String> {
        registry.list().iter().map(|c| c.name.clone()).collect()
    }

    #[test]
    fn collisions_and_reserved_names_get_the_id_suffix() {
        let r = registry();
        r.apply(vec![
            found("tenants/alpha", "web"),
            found("tenants/beta", "web"),
            found("tenants/broken", "metric"),
        ]);
        let beta_id = r
            .list()
            .iter()
            .find(|c| c.cgroup == Path::new("tenants/beta"))
            .unwrap()
            .id
            .clone();
        let broken_id = r
            .list()
            .iter()
            .find(|c| c.cgroup == Path::new("tenants/broken"))
            .unwrap()
            .id
            .clone();
        let mut expected = vec![
            "web".to_string(),
            format!("web-{}", &beta_id[..beta_id.len().min(12)]),
            format!("metric-{}", &broken_id[..broken_id.len().min(12)]),
        ];
        expected.sort();
        assert_eq!(names(&r), expected);
        assert_eq!(r.by_name("web").unwrap().cgroup, Path::new("tenants/alpha"));
    }

    #[test]
    fn an_owner_keeps_its_name_and_slot() {
        let r = registry();
        r.apply(vec![found("tenants/beta", "web")]);
        let slot = r.by_name("web").unwrap().slot;
        // A newcomer that sorts first does not take the name.
        r.apply(vec![found("tenants/alpha", "web")]);
        assert_eq!(r.by_name("web").unwrap().slot, slot);
        // Removal frees the name and the slot is never reused.
        let refreshed = r.apply(vec![Event::Removed("tenants/beta".into())]);
        assert_eq!(refreshed.gone_names().collect::<Vec<_>>(), ["web"]);
        assert_eq!(r.list().len(), 1);
        assert!(r.get(slot).is_none());
        assert!(r.by_name("web").is_none());
    }

    #[test]
    fn slots_follow_cgroups_not_the_order_of_discovery() {
        let (one, other) = (registry(), registry());
        one.apply(vec![found("tenants/beta", "b")]);
        one.apply(vec![found("tenants/alpha", "a")]);
        other.apply(vec![
            found("tenants/alpha", "a"),
            found("tenants/beta", "b"),
        ]);
        for name in ["a", "b"] {
            assert_eq!(
                one.by_name(name).unwrap().slot,
                other.by_name(name).unwrap().slot,
                "{name}"
            );
        }
    }

    #[test]
    fn long_names_stay_within_name_max() {
        let r = registry();
        let long = "x".repeat(300);
        r.apply(vec![
            found("tenants/alpha", &long),
            found("tenants/beta", &long),
        ]);
        for name in names(&r) {
            assert!(name.len() <= NAME_MAX, "{}", name.len());
        }
        assert_eq!(r.list().len(), 2);
    }
}

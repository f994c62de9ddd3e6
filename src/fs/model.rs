//! The filesystem as a model: lookups, listings and rendered file contents,
//! with no FUSE in the loop (the adapter in [`super::fuse`] only translates).
//!
//! A file's content is rendered once, at open (or at the stat just before
//! it), and kept with its handle: every read of that handle, at any offset,
//! comes from the same snapshot, and `stat` reports its exact length
//! ([`super::snapshots`] says how the two agree).
//!
//! Directories of metrics belong to an [`Owner`]: a container (by registry
//! slot) or a cgroup of the `cgroup/` tree (by node); both are served by the
//! same code from the same kind of [`Metered`] cgroup.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::attr::{make_private, Attr};
use super::error::{FsError, Result};
use super::exited::{Ended, Exited};
use super::handles::{Chunk, Handle, Handles};
use super::inode::{
    Entry, Kind, Meta, Node, Owner, RootFile, CGROUP_NAME, EXITED_NAME, ROOT_INO, SELF_NAME,
};
use super::snapshots::Snapshots;
use super::DirEntry;
use crate::cgroup::files::SourceError;
use crate::cli::PrometheusNames;
use crate::containers::registry::{CgroupTree, Metered, Registry, Slot};
use crate::ledger::{timestamp, Incarnation, Known, Ledger, Record};
use crate::metrics::{groups_of, Group, MetricId, PromType, Sample, Value, CLASS_METRICS, METRICS};
use crate::net::Net;
use crate::render;
use crate::sample::fanout;
use crate::sample::pool::Helpers;
use crate::sample::spent::{thread_cpu, Source};
use crate::sample::Sampler;

/// What the model tells the kernel without being asked; set once mounted.
pub trait Kernel: Send + Sync {
    /// Forget a name in the directory `parent` (an inode number). The
    /// kernel takes the directory's lock for that, so this must not wait
    /// for it (a readdir holds it).
    fn forget_name(&self, parent: u64, name: &str);
    /// Raise the size the kernel holds for `ino` to at least `size`, whose
    /// last byte is `last`, before a reader copies through the page cache.
    fn raise_size(&self, ino: u64, size: u64, last: u8);
}

pub struct Model {
    /// The containers, kept in line with the host by [`Model::refresh`].
    registry: Arc<Registry>,
    /// The `cgroup/` tree.
    tree: Arc<CgroupTree>,
    /// Network accounting, swept after discovery.
    net: Option<Arc<Net>>,
    /// Shared with the helper threads that sample part of an aggregate.
    sampler: Arc<Sampler>,
    helpers: Helpers,
    /// `--private`: a directory of metrics belongs to its cgroup's owner and
    /// only they read it; the all-containers files only root.
    private: bool,
    /// `--prometheus-names`: whose families `metrics.prom` uses.
    prometheus_names: PrometheusNames,
    handles: Handles,
    snapshots: Snapshots,
    kernel: std::sync::OnceLock<Box<dyn Kernel>>,
    /// What each live container's values were when last sampled whole, or
    /// when its last process left: its final values if it goes without
    /// another chance to read them.
    finals: Mutex<HashMap<Slot, Sample>>,
    /// `exited/`.
    exited: Exited,
    /// The billing ledger and the index, with `--state-dir`.
    ledger: Option<Arc<Ledger>>,
    /// When containers the last daemon knew were first seen, by cgroup
    /// path, id and v2 id: a restart does not reset that.
    first_seen: HashMap<(PathBuf, String, Option<u64>), String>,
    /// A sweep of the eBPF maps was put off while ledger records were
    /// pending: the next refresh owes one.
    sweep_owed: AtomicBool,
    /// The index lags behind the containers, and when it was last written.
    index: Mutex<IndexState>,
    refreshing: Mutex<()>,
}

#[derive(Default)]
struct IndexState {
    dirty: bool,
    written: Option<Instant>,
}

/// The index is written at most this often: under churn, writing the
/// whole list for every container that comes or goes would cost more than
/// the containers. A container that comes and goes within this time of a
/// daemon crash, with no daemon running when it goes, is not recorded.
const INDEX_INTERVAL: Duration = Duration::from_secs(1);

impl Model {
    /// The tree of `registry`'s containers, with rates over `window` and
    /// network counters from `net` when it runs.
    pub fn new(
        registry: Arc<Registry>,
        net: Option<Arc<Net>>,
        window: Duration,
        private: bool,
    ) -> Model {
        let tree = Arc::new(CgroupTree::new(
            registry.layout().clone(),
            registry.kept_budget().clone(),
        ));
        let sampler = Sampler::new(registry.layout().clone(), window, net.clone());
        Model {
            registry,
            tree,
            net,
            sampler: Arc::new(sampler),
            helpers: Helpers::default(),
            private,
            prometheus_names: PrometheusNames::Cgmetric,
            handles: Handles::default(),
            snapshots: Snapshots::default(),
            kernel: std::sync::OnceLock::new(),
            finals: Mutex::default(),
            exited: Exited::new(Duration::ZERO),
            ledger: None,
            first_seen: HashMap::new(),
            sweep_owed: AtomicBool::new(false),
            index: Mutex::default(),
            refreshing: Mutex::new(()),
        }
    }

    /// Renders `metrics.prom` with `names`' families and labels.
    pub fn with_prometheus_names(mut self, names: PrometheusNames) -> Model {
        self.prometheus_names = names;
        self
    }

    /// Aggregate reads begin with a walk of the cgroups
    /// ([`crate::cgroup::walk`]). Before the model is shared.
    pub fn with_cgroup_walk(mut self, walk: bool) -> Model {
        if walk {
            Arc::get_mut(&mut self.sampler)
                .expect("not yet shared")
                .enable_walk();
        }
        self
    }

    /// Keeps ended containers under `exited/` for `keep`, and records each
    /// in `ledger`, whose index says when the containers the last daemon
    /// knew were first seen.
    pub fn with_lifecycle(mut self, ledger: Option<Arc<Ledger>>, keep: Duration) -> Model {
        self.exited = Exited::new(keep);
        if let Some(ledger) = &ledger {
            self.first_seen = ledger
                .read_index()
                .into_iter()
                .map(|k| {
                    let cgroup = PathBuf::from(k.cgroup.trim_start_matches('/'));
                    ((cgroup, k.id, k.cgroup_id), k.first_seen)
                })
                .collect();
        }
        self.ledger = ledger;
        self
    }

    /// Tells the kernel to forget the root's `names`: a server that resumed
    /// a connection gave these containers other slots than the kernel may
    /// hold for them.
    pub fn forget_root_names(&self, names: &[String]) {
        if let Some(kernel) = self.kernel.get() {
            names
                .iter()
                .for_each(|name| kernel.forget_name(ROOT_INO, name));
        }
    }

    /// Registers how the model reaches the kernel once mounted.
    pub fn set_kernel(&self, kernel: Box<dyn Kernel>) {
        let _ = self.kernel.set(kernel);
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn tree(&self) -> &CgroupTree {
        &self.tree
    }

    /// Discovery; the eBPF entries of removed cgroups are swept and the
    /// kernel forgets the names of vanished containers.
    ///
    /// A container that vanished is recorded first: its final values (the
    /// cgroup values taken when its last process left, or else last read;
    /// the network counters read now, before the sweep) go to `exited/`
    /// and to the ledger, and the sweep waits while the ledger cannot be
    /// written.
    pub fn refresh(&self) {
        // One at a time: a container's values taken when it emptied must be
        // kept before another refresh ends it.
        let _serial = self.refreshing.lock();
        let refreshed = self.registry.refresh();
        let kernel = self.kernel.get();
        if let Some(kernel) = kernel {
            refreshed
                .gone_names()
                .for_each(|name| kernel.forget_name(ROOT_INO, name));
        }
        for container in &refreshed.emptied {
            self.capture(container);
        }
        let now = SystemTime::now();
        let (records, ended): (Vec<Record>, Vec<Final>) =
            refreshed.removed.iter().map(|c| self.end(c, now)).unzip();
        let vanished = !refreshed.removed.is_empty();
        let mut pending = false;
        if let Some(ledger) = &self.ledger {
            let before = ledger.pending();
            pending = !ledger.record(records);
            let changed = vanished
                || refreshed.added
                || !refreshed.renamed.is_empty()
                || before != ledger.pending();
            self.update_index(ledger, changed);
        }
        // Shown once its record was written (or is pending, should the disk
        // be full): a script that sees `exited/NAME` finds its bill too.
        for (container, sample) in ended {
            self.exited.add(container, sample, now);
        }
        if let Some(net) = &self.net {
            if pending {
                self.sweep_owed.fetch_or(vanished, Ordering::Relaxed);
            } else {
                net.sweep(vanished || self.sweep_owed.swap(false, Ordering::Relaxed));
            }
        }
        if vanished {
            self.sampler.forget_rates(|slot| {
                self.registry.get(slot).is_some() || self.tree.holds_slot(slot)
            });
        }
        let expired = self.exited.expire();
        if let Some(kernel) = kernel {
            // An earlier incarnation's, or one that expired.
            let exited = refreshed.removed.iter().map(|c| &c.name).chain(&expired);
            exited.for_each(|name| kernel.forget_name(Node::ExitedDir.ino(), name));
        }
    }

    /// Takes the values of a container whose last process left: they are
    /// final, and its cgroups may be removed any moment.
    fn capture(&self, container: &Metered) {
        log::debug!(
            "{} container {}: its last process left; taking its values",
            container.runtime,
            container.name
        );
        let mut sample = Sample::default();
        let groups = groups_of(self.sampler.available(container).iter().copied());
        for group in groups {
            // Rates would wait a window; the container's are 0 from now on.
            if !matches!(group, Group::CpuRate | Group::NetRate) {
                let _ = self.sampler.read_final(container, group, &mut sample);
            }
        }
        self.keep(&mut self.finals.lock(), container.slot, &sample);
    }

    /// Merges `sample` into what is kept of the container at `slot`, if it
    /// is still live. (A sample taken while the container ended must not
    /// leave an entry that nothing removes: `end` removes a container's
    /// entry, under the same lock, after the registry dropped it.)
    fn keep(&self, finals: &mut HashMap<Slot, Sample>, slot: Slot, sample: &Sample) {
        if self.registry.get(slot).is_none() {
            return;
        }
        let kept = finals.entry(slot).or_default();
        for (def, value) in sample.iter() {
            kept.set_value(def.id, value);
        }
    }

    /// Keeps whole samples as the containers' values so far.
    fn remember(&self, samples: &[(Arc<Metered>, Sample)]) {
        if self.ledger.is_none() && self.exited.is_off() {
            return;
        }
        let mut finals = self.finals.lock();
        for (container, sample) in samples {
            self.keep(&mut finals, container.slot, sample);
        }
    }

    /// A container vanished: its ledger record, and its final values to
    /// show under `exited/`. Network counters are read from the maps, which
    /// hold them until the next sweep.
    fn end(&self, container: &Arc<Metered>, now: SystemTime) -> (Record, Final) {
        let mut sample = self
            .finals
            .lock()
            .remove(&container.slot)
            .unwrap_or_default();
        if let (Some(net), Some(id)) = (&self.net, container.net_id) {
            let mut read = Sample::default();
            let totals = net.gone_totals(id);
            let classes = Some(net.classes());
            crate::sample::net_values(&totals, classes, Group::NetTraffic, &mut read);
            crate::sample::net_values(&totals, classes, Group::NetConn, &mut read);
            // Taken at the end, from the maps: the totals are too.
            if !read.classes.is_empty() {
                sample.classes = std::mem::take(&mut read.classes);
            }
            for (def, value) in read.iter() {
                // Counters only grow: a value read before (with cgroups
                // below the container still there) is not undercut.
                let value = match (value, sample.count(def.id)) {
                    (Value::Count(now), Some(before)) if def.kind == PromType::Counter => {
                        Value::Count(now.max(before))
                    }
                    _ => value,
                };
                sample.set_value(def.id, value);
            }
        }
        // Nothing runs there any more. (By the values it has: what files it
        // had is found anew when a hierarchy goes, and may be less by now.)
        for (rate, counter) in [
            (MetricId::CpuMillicores, MetricId::CpuUsageUsec),
            (MetricId::NetTxBps, MetricId::NetBytesTx),
            (MetricId::NetRxBps, MetricId::NetBytesRx),
        ] {
            if sample.get(counter).is_some() {
                sample.set(rate, Some(0));
            }
        }
        let record = Record {
            name: container.name.clone(),
            id: container.id.clone(),
            runtime: container.runtime.to_string(),
            cgroup: format!("/{}", container.cgroup.display()),
            cgroup_id: container.net_id,
            first_seen: self.first_seen_of(container),
            exited: timestamp(now),
            recovered: false,
            counters: ledger_counters(&sample),
        };
        log::info!(
            "{} container {} ended; its final values are kept",
            container.runtime,
            container.name
        );
        (record, (Arc::new(container.ended()), sample))
    }

    fn first_seen_of(&self, container: &Metered) -> String {
        self.first_seen
            .get(&(
                container.cgroup.clone(),
                container.id.clone(),
                container.net_id,
            ))
            .cloned()
            .unwrap_or_else(|| timestamp(container.first_seen))
    }

    /// Writes the index if it lags (`changed` now, or before) and was not
    /// written within [`INDEX_INTERVAL`]; else the watcher's next wake-up
    /// ([`Model::rewalk_interval`]) writes it.
    fn update_index(&self, ledger: &Ledger, changed: bool) {
        let mut index = self.index.lock();
        index.dirty |= changed;
        if !index.dirty
            || index
                .written
                .is_some_and(|at| at.elapsed() < INDEX_INTERVAL)
        {
            return;
        }
        ledger.write_index(self.known(ledger));
        *index = IndexState {
            dirty: false,
            written: Some(Instant::now()),
        };
    }

    /// The index: every live container, and those whose records are still
    /// pending (so that a crash now leaves them to the next start).
    fn known(&self, ledger: &Ledger) -> Vec<Known> {
        let mut known: Vec<Known> = self
            .registry
            .list()
            .iter()
            .map(|c| Known {
                name: c.name.clone(),
                id: c.id.clone(),
                runtime: c.runtime.to_string(),
                cgroup: format!("/{}", c.cgroup.display()),
                cgroup_id: c.net_id,
                first_seen: self.first_seen_of(c),
                slot: Some(c.slot),
            })
            .collect();
        known.extend(ledger.pending_known());
        known
    }

    /// Records the containers the last daemon knew (its index) that ended
    /// while no daemon ran, from what the pinned eBPF maps kept. Runs once,
    /// after the first discovery and before anything is swept.
    pub fn recover(&self) {
        let Some(ledger) = &self.ledger else { return };
        let live: HashSet<(PathBuf, String)> = self
            .registry
            .list()
            .iter()
            .map(|c| (c.cgroup.clone(), c.id.clone()))
            .collect();
        let live_ids: HashSet<u64> = self
            .registry
            .list()
            .iter()
            .filter_map(|c| c.net_id)
            .collect();
        let now = timestamp(SystemTime::now());
        let mut records = Vec::new();
        // Recorded already, if the daemon died after writing the record
        // and before the index.
        let mut recorded: Option<HashSet<Incarnation>> = None;
        for known in ledger.read_index() {
            let cgroup = PathBuf::from(known.cgroup.trim_start_matches('/'));
            if live.contains(&(cgroup.clone(), known.id.clone()))
                && known.cgroup_id.is_none_or(|id| live_ids.contains(&id))
            {
                continue;
            }
            // Still there, but not a container to this daemon (other
            // --cgroup patterns): it has not ended.
            let exists = match (&self.net, known.cgroup_id) {
                (Some(net), Some(id)) => net.cgroup_exists(id),
                _ => self
                    .registry
                    .layout()
                    .hierarchies()
                    .iter()
                    .any(|root| root.join(&cgroup).is_dir()),
            };
            if exists {
                continue;
            }
            let recorded = recorded.get_or_insert_with(|| {
                ledger
                    .read_current()
                    .iter()
                    .map(Record::incarnation)
                    .collect()
            });
            if recorded.contains(&known.incarnation()) {
                continue;
            }
            let mut sample = Sample::default();
            if let (Some(net), Some(id)) = (&self.net, known.cgroup_id) {
                let totals = net.gone_totals(id);
                let classes = Some(net.classes());
                crate::sample::net_values(&totals, classes, Group::NetTraffic, &mut sample);
                crate::sample::net_values(&totals, classes, Group::NetConn, &mut sample);
            }
            log::info!(
                "{} container {} ended while no daemon ran; recorded from the pinned counters",
                known.runtime,
                known.name
            );
            records.push(Record {
                name: known.name,
                id: known.id,
                runtime: known.runtime,
                cgroup: known.cgroup,
                cgroup_id: known.cgroup_id,
                first_seen: known.first_seen,
                exited: now.clone(),
                recovered: true,
                counters: ledger_counters(&sample),
            });
        }
        let pending = !ledger.record(records);
        self.update_index(ledger, true);
        if pending {
            self.sweep_owed.store(true, Ordering::Relaxed);
        }
    }

    /// What `find` finds, or if nothing, what it finds once discovery's
    /// pending changes are taken. With [`Model::refresh`] before every
    /// listing and after a container is found gone, this is how the
    /// filesystem drives discovery: a name, a file or a `self` that is not
    /// known yet is looked for again, so a new cgroup is there the moment
    /// its `mkdir` returned.
    fn or_refresh<T>(&self, find: impl Fn() -> Option<T>) -> Option<T> {
        find().or_else(|| {
            self.refresh();
            find()
        })
    }

    /// How often discovery must be refreshed without being told to.
    pub fn rewalk_interval(&self) -> Option<std::time::Duration> {
        let rewalk = self.registry().discovery().rewalk_interval();
        // A lagging index, or ledger records waiting for room, are retried.
        let pending = self.ledger.as_ref().is_some_and(|l| l.pending() > 0);
        match self.index.lock().dirty || pending {
            true => Some(rewalk.map_or(INDEX_INTERVAL, |r| r.min(INDEX_INTERVAL))),
            false => rewalk,
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let node = match Node::from_ino(parent).ok_or(FsError::NotFound)? {
            Node::Root => self.root_child(name)?,
            Node::ExitedDir => {
                let ended = self.exited.by_name(name).ok_or(FsError::NotFound)?;
                Node::Dir(Owner::Exited(ended.exit))
            }
            Node::Dir(Owner::Exited(exit)) => {
                let ended = self.ended(exit)?;
                Node::File(Owner::Exited(exit), exited_entry(&ended, name)?)
            }
            Node::Dir(owner) => {
                let dir = self.owner(owner)?;
                match self.entry(&dir, name) {
                    Ok(entry) => Node::File(owner, entry),
                    Err(e) => match owner {
                        Owner::Cgroup(_) => {
                            Node::Dir(Owner::Cgroup(self.cgroup_child(&dir, name)?))
                        }
                        // A catalogue file the container lacks may belong to
                        // a hierarchy whose mkdir event is still queued: take
                        // the pending changes, then look once more.
                        // (The first look was the one above.)
                        Owner::Container(_) if METRICS.iter().any(|m| m.file == name) => {
                            self.refresh();
                            Node::File(owner, self.entry(&*self.owner(owner)?, name)?)
                        }
                        Owner::Container(_) | Owner::Exited(_) => return Err(e),
                    },
                }
            }
            _ => return Err(FsError::NotDir),
        };
        self.attr(node)
    }

    /// The node's attributes, ownership and modes as `--private` says, and
    /// a file's size.
    fn attr(&self, node: Node) -> Result<Attr> {
        let mut attr = Attr::of(node);
        if attr.kind == Kind::File {
            attr.size = self.size(node);
        }
        let owner = || match node {
            Node::Dir(owner) | Node::File(owner, _) => Some(self.owner(owner).ok()?.owner),
            _ => None,
        };
        if self.private && !make_private(&mut attr, node, owner) {
            return Err(FsError::NotFound);
        }
        Ok(attr)
    }

    fn root_child(&self, name: &str) -> Result<Node> {
        if let Some(file) = RootFile::ALL.into_iter().find(|f| f.name() == name) {
            return Ok(Node::RootFile(file));
        }
        match name {
            SELF_NAME => return Ok(Node::SelfLink),
            CGROUP_NAME => return Ok(Node::Dir(Owner::Cgroup(0))),
            EXITED_NAME => return Ok(Node::ExitedDir),
            _ => {}
        }
        // Not known yet: resolved now, so a new container is there the
        // moment anybody looks.
        self.or_refresh(|| self.registry().by_name(name))
            .map(|c| Node::Dir(Owner::Container(c.slot)))
            .ok_or(FsError::NotFound)
    }

    fn cgroup_child(&self, dir: &Metered, name: &str) -> Result<u64> {
        if name.contains('/') || name == "." || name == ".." {
            return Err(FsError::NotFound);
        }
        self.tree()
            .node(&dir.cgroup.join(name))
            .map(|(node, _)| node)
            .ok_or(FsError::NotFound)
    }

    fn entry(&self, dir: &Metered, name: &str) -> Result<Entry> {
        let live = |m: &Meta| m.name() == name && *m != Meta::ExitedAt;
        if let Some(meta) = Meta::ALL.into_iter().find(live) {
            return Ok(Entry::Meta(meta));
        }
        if let Some(id) = MetricId::by_file(name) {
            self.check_available(dir, id)?;
            return Ok(Entry::Metric(id));
        }
        let classes = self.sampler.classes().ok_or(FsError::NotFound)?;
        let entry = class_entry(classes.names(), name).ok_or(FsError::NotFound)?;
        self.check_available(dir, MetricId::NetBytesTx)?;
        Ok(entry)
    }

    /// Whether `dir` has the files of the class at `class`.
    fn check_class(&self, dir: &Metered, class: u8) -> Result<()> {
        let count = self.sampler.classes().map_or(0, |c| c.names().count());
        if usize::from(class) >= count {
            return Err(FsError::NotFound);
        }
        self.check_available(dir, MetricId::NetBytesTx)
    }

    fn check_available(&self, dir: &Metered, id: MetricId) -> Result<()> {
        match self.sampler.available(dir).contains(&id) {
            true => Ok(()),
            false => Err(FsError::NotFound),
        }
    }

    fn owner(&self, owner: Owner) -> Result<Arc<Metered>> {
        match owner {
            Owner::Container(slot) => self.registry().get(slot),
            Owner::Cgroup(node) => self.tree().get(node),
            Owner::Exited(exit) => self.exited.get(exit).map(|e| e.container.clone()),
        }
        .ok_or(FsError::NotFound)
    }

    fn ended(&self, exit: u64) -> Result<Arc<Ended>> {
        self.exited.get(exit).ok_or(FsError::NotFound)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let node = Node::from_ino(ino).ok_or(FsError::NotFound)?;
        match node {
            Node::Root | Node::RootFile(_) | Node::SelfLink | Node::ExitedDir => {}
            Node::Dir(Owner::Exited(exit)) | Node::File(Owner::Exited(exit), Entry::Meta(_)) => {
                self.ended(exit)?;
            }
            Node::File(Owner::Exited(exit), Entry::Metric(id)) => {
                if !self.ended(exit)?.has(id) {
                    return Err(FsError::NotFound);
                }
            }
            Node::File(Owner::Exited(exit), Entry::Class { class, .. }) => {
                if self.ended(exit)?.sample.classes.len() <= usize::from(class) {
                    return Err(FsError::NotFound);
                }
            }
            Node::Dir(owner) | Node::File(owner, Entry::Meta(_)) => {
                self.owner(owner)?;
            }
            Node::File(owner, Entry::Metric(id)) => {
                self.check_available(&*self.owner(owner)?, id)?
            }
            Node::File(owner, Entry::Class { class, .. }) => {
                self.check_class(&*self.owner(owner)?, class)?
            }
        }
        self.attr(node)
    }

    /// Where `self` points for the process `pid`: its container's directory.
    pub fn readlink(&self, ino: u64, pid: u32) -> Result<String> {
        if Node::from_ino(ino) != Some(Node::SelfLink) {
            return Err(FsError::NotSymlink);
        }
        // pid 0: the caller's pid namespace cannot see the daemon's.
        if pid == 0 {
            return Err(FsError::NotFound);
        }
        let cgroup = crate::cgroup::of_process(pid).ok_or(FsError::NotFound)?;
        let find = || {
            self.registry()
                .list()
                .into_iter()
                .filter(|c| cgroup.starts_with(&c.cgroup))
                .max_by_key(|c| c.cgroup.components().count())
        };
        let container = self.or_refresh(find).ok_or(FsError::NotFound)?;
        Ok(container.name.clone())
    }

    /// The length of the text a stat stands for. A file that cannot be
    /// rendered now shows 0: its open reports the error.
    fn size(&self, node: Node) -> u64 {
        let ino = node.ino();
        self.snapshots
            .for_stat(ino, || self.render(node).map(String::into_bytes))
            .map_or(0, |text| text.len() as u64)
    }

    /// Renders the file (or takes the rendering a stat just measured) and
    /// returns a handle to that snapshot.
    pub fn open(&self, ino: u64, write: bool) -> Result<u64> {
        let node = Node::from_ino(ino).ok_or(FsError::NotFound)?;
        if node.kind() == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let opened = self
            .snapshots
            .for_open(ino, || self.render(node).map(String::into_bytes))?;
        if let (true, Some(kernel), Some(&last)) =
            (opened.raise, self.kernel.get(), opened.text.last())
        {
            kernel.raise_size(ino, opened.text.len() as u64, last);
        }
        Ok(self.handles.insert(Handle::File(opened.text)))
    }

    /// Up to `size` bytes of the snapshot from `offset`, not copied. A
    /// handle this server did not hand out is a predecessor's (this server
    /// took the connection over): the file is rendered anew for it. A value
    /// read in several chunks across the switch may then be torn; values of
    /// one line are read in one.
    pub fn read(&self, ino: u64, handle: u64, offset: u64, size: u32) -> Result<Chunk> {
        match self.handles.read(handle, offset, size) {
            Err(FsError::BadHandle) => {
                let node = Node::from_ino(ino).ok_or(FsError::NotFound)?;
                if node.kind() == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                let text = self.render(node)?.into_bytes();
                self.handles.adopt(handle, Handle::File(Arc::new(text)));
                self.handles.read(handle, offset, size)
            }
            read => read,
        }
    }

    /// The kernel dropped its inode `ino`.
    pub fn forget(&self, ino: u64) {
        self.snapshots.forget(ino);
    }

    pub fn release(&self, handle: u64) {
        self.handles.release(handle);
    }

    /// Lists the directory once; later reads of the handle page through the
    /// same listing, so offsets stay valid while containers come and go.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let entries = self.list(ino)?;
        Ok(self.handles.insert(Handle::Dir(Arc::new(entries))))
    }

    fn list(&self, ino: u64) -> Result<Vec<DirEntry>> {
        Ok(match Node::from_ino(ino).ok_or(FsError::NotFound)? {
            Node::Root => self.list_root(),
            Node::ExitedDir => self.list_exited(),
            Node::Dir(Owner::Exited(exit)) => list_ended(&*self.ended(exit)?),
            Node::Dir(owner) => {
                let dir = self.owner(owner)?;
                self.list_dir(owner, &dir)
            }
            _ => return Err(FsError::NotDir),
        })
    }

    /// The listing of a directory handle, `.` and `..` first; a
    /// predecessor's handle gets a listing of its own (see [`Model::read`]).
    pub fn readdir(&self, ino: u64, handle: u64) -> Result<Arc<Vec<DirEntry>>> {
        match self.handles.listing(handle) {
            Err(FsError::BadHandle) => {
                let entries = Arc::new(self.list(ino)?);
                self.handles.adopt(handle, Handle::Dir(entries.clone()));
                Ok(entries)
            }
            listing => listing,
        }
    }

    fn list_root(&self) -> Vec<DirEntry> {
        self.refresh();
        let mut entries = dots(ROOT_INO);
        entries.extend(RootFile::ALL.map(|f| entry(Node::RootFile(f), f.name())));
        entries.push(entry(Node::SelfLink, SELF_NAME));
        entries.push(entry(Node::Dir(Owner::Cgroup(0)), CGROUP_NAME));
        entries.push(entry(Node::ExitedDir, EXITED_NAME));
        entries.extend(
            self.registry()
                .list()
                .iter()
                .map(|c| entry(Node::Dir(Owner::Container(c.slot)), &c.name)),
        );
        entries
    }

    fn list_exited(&self) -> Vec<DirEntry> {
        self.refresh();
        let mut entries = dots(Node::ExitedDir.ino());
        entries.extend(
            self.exited
                .list()
                .iter()
                .map(|e| entry(Node::Dir(Owner::Exited(e.exit)), &e.container.name)),
        );
        entries
    }

    fn list_dir(&self, owner: Owner, dir: &Metered) -> Vec<DirEntry> {
        let mut entries = dots(Node::Dir(owner).ino());
        entries.extend(
            Meta::ALL
                .into_iter()
                .filter(|m| owner.has(*m))
                .map(|m| entry(Node::File(owner, Entry::Meta(m)), m.name())),
        );
        entries.extend(
            self.sampler
                .available(dir)
                .iter()
                .map(|id| entry(Node::File(owner, Entry::Metric(*id)), id.def().file)),
        );
        if let Some(classes) = self.sampler.classes() {
            if self.check_available(dir, MetricId::NetBytesTx).is_ok() {
                entries.extend(class_entries(owner, classes.names()));
            }
        }
        if let Owner::Cgroup(_) = owner {
            for name in self.tree().children(dir) {
                if let Some((node, _)) = self.tree().node(&dir.cgroup.join(&name)) {
                    entries.push(entry(Node::Dir(Owner::Cgroup(node)), &name));
                }
            }
        }
        entries
    }

    fn render(&self, node: Node) -> Result<String> {
        match node {
            Node::Root | Node::Dir(_) | Node::ExitedDir => Err(FsError::IsDir),
            Node::SelfLink => Err(FsError::NotFound),
            Node::RootFile(RootFile::Metric) => {
                let samples = self.sample_all();
                Ok(self.rendering(|| {
                    let mut out = String::new();
                    for (container, sample) in samples {
                        render::metric_lines(&mut out, &container.name, &sample);
                    }
                    out
                }))
            }
            Node::RootFile(RootFile::MetricsProm) => {
                let live = self.sample_all();
                let exited: Vec<(Arc<Metered>, Sample)> = self
                    .exited
                    .list()
                    .iter()
                    .map(|e| (e.container.clone(), e.sample.clone()))
                    .collect();
                let own = render::OwnMetrics {
                    ebpf_health: self.sampler.health(),
                    ledger_write_errors: self.ledger.as_ref().map(|l| l.write_errors()),
                    spent: Some(&self.sampler.spent),
                };
                Ok(self
                    .rendering(|| render::prometheus(&live, &exited, &own, self.prometheus_names)))
            }
            Node::File(Owner::Exited(exit), entry) => render_ended(&*self.ended(exit)?, entry),
            Node::File(owner, entry) => {
                let dir = self.owner(owner)?;
                self.render_file(&dir, entry)
                    .inspect_err(|e| self.note_failure(owner, &dir, e))
            }
        }
    }

    fn render_file(&self, dir: &Metered, entry: Entry) -> Result<String> {
        match entry {
            Entry::Meta(Meta::Name) => Ok(format!("{}\n", dir.name)),
            Entry::Meta(Meta::Id) => Ok(format!("{}\n", dir.id)),
            Entry::Meta(Meta::Cgroup) => Ok(format!("/{}\n", dir.cgroup.display())),
            Entry::Meta(Meta::Runtime) => Ok(format!("{}\n", dir.runtime)),
            Entry::Meta(Meta::Metrics) => {
                let sample = self.sampler.sample(dir).map_err(FsError::Source)?;
                Ok(render::container_metrics(&sample))
            }
            Entry::Meta(Meta::ExitedAt) => Err(FsError::NotFound),
            Entry::Metric(id) => {
                self.check_available(dir, id)?;
                let mut sample = Sample::default();
                self.sampler
                    .read(dir, id.def().group, &mut sample)
                    .map_err(FsError::Source)?;
                sample
                    .get(id)
                    .map(render::value_file)
                    .ok_or(FsError::NotFound)
            }
            Entry::Class { metric, class } => {
                self.check_class(dir, class)?;
                let mut sample = Sample::default();
                self.sampler
                    .read(dir, Group::NetTraffic, &mut sample)
                    .map_err(FsError::Source)?;
                class_value(&sample, metric, class)
            }
        }
    }

    /// Logs what a reader cannot see, and drops what was found gone.
    /// A sample of every container, after a fresh discovery. The first
    /// aggregate read (or the first after a quiet spell) primes the rates
    /// that have nothing to compute against, with one wait for all; later
    /// ones never wait, and newcomers' rates come on the next read.
    fn sample_all(&self) -> Vec<(Arc<Metered>, Sample)> {
        self.refresh();
        let containers = self.registry().list();
        if self.sampler.prime_rates(&containers) {
            self.refresh();
        }
        let samples = fanout::sample_all(&self.sampler, &self.helpers, self.registry().list());
        self.remember(&samples);
        samples
    }

    /// Renders an aggregate, its CPU time counted as its rendering's.
    fn rendering(&self, render: impl FnOnce() -> String) -> String {
        let started = thread_cpu();
        let text = render();
        let spent = &self.sampler.spent;
        spent.add(Source::Render, thread_cpu().saturating_sub(started));
        spent.count_read();
        text
    }

    fn note_failure(&self, owner: Owner, dir: &Metered, error: &FsError) {
        match (error, owner) {
            // Its removal is queued (or a walk finds it): refreshing drops
            // it the same way as every other removal.
            (FsError::Source(SourceError::Vanished(_)), Owner::Container(_)) => self.refresh(),
            (FsError::Source(SourceError::Vanished(_)), Owner::Cgroup(node)) => {
                self.tree().forget(node)
            }
            (FsError::Source(_), Owner::Exited(_)) => {}
            (FsError::Source(e), _) => log::warn!("{} {}: {e}", dir.runtime, dir.name),
            _ => {}
        }
    }
}

/// The file `name` of an ended container's directory.
fn exited_entry(ended: &Ended, name: &str) -> Result<Entry> {
    if let Some(meta) = Meta::ALL.into_iter().find(|m| m.name() == name) {
        return Ok(Entry::Meta(meta));
    }
    match MetricId::by_file(name) {
        Some(id) if ended.has(id) => Ok(Entry::Metric(id)),
        Some(_) => Err(FsError::NotFound),
        None => class_entry(ended.sample.classes.iter().map(|c| &*c.class), name)
            .ok_or(FsError::NotFound),
    }
}

/// The per-class file `name` among `classes`, if it is one.
fn class_entry<'c>(classes: impl Iterator<Item = &'c str> + Clone, name: &str) -> Option<Entry> {
    CLASS_METRICS.iter().enumerate().find_map(|(metric, def)| {
        let wanted = def.class_of(name)?;
        let class = classes.clone().position(|c| c == wanted)?;
        Some(Entry::Class {
            metric: metric as u8,
            class: u8::try_from(class).ok()?,
        })
    })
}

/// The per-class files of `owner`, metric by metric.
fn class_entries<'c>(
    owner: Owner,
    classes: impl Iterator<Item = &'c str> + Clone,
) -> Vec<DirEntry> {
    let mut entries = Vec::new();
    for (metric, def) in CLASS_METRICS.iter().enumerate() {
        for (class, name) in classes.clone().enumerate() {
            let node = Node::File(
                owner,
                Entry::Class {
                    metric: metric as u8,
                    class: class as u8,
                },
            );
            entries.push(entry(node, &def.file_of(name)));
        }
    }
    entries
}

/// The value of a per-class file, from a sample that read the traffic.
fn class_value(sample: &Sample, metric: u8, class: u8) -> Result<String> {
    let def = CLASS_METRICS
        .get(usize::from(metric))
        .ok_or(FsError::NotFound)?;
    let bytes = sample
        .classes
        .get(usize::from(class))
        .ok_or(FsError::NotFound)?;
    Ok(render::value_file(Value::Count((def.pick)(bytes))))
}

fn list_ended(ended: &Ended) -> Vec<DirEntry> {
    let owner = Owner::Exited(ended.exit);
    let mut entries = dots(Node::Dir(owner).ino());
    entries.extend(Meta::ALL.map(|m| entry(Node::File(owner, Entry::Meta(m)), m.name())));
    entries.extend(
        ended
            .available()
            .map(|id| entry(Node::File(owner, Entry::Metric(id)), id.def().file)),
    );
    let classes = ended.sample.classes.iter().map(|c| &*c.class);
    entries.extend(class_entries(owner, classes));
    entries
}

/// A file of an ended container: its frozen values.
fn render_ended(ended: &Ended, entry: Entry) -> Result<String> {
    let c = &ended.container;
    match entry {
        Entry::Meta(Meta::Name) => Ok(format!("{}\n", c.name)),
        Entry::Meta(Meta::Id) => Ok(format!("{}\n", c.id)),
        Entry::Meta(Meta::Cgroup) => Ok(format!("/{}\n", c.cgroup.display())),
        Entry::Meta(Meta::Runtime) => Ok(format!("{}\n", c.runtime)),
        Entry::Meta(Meta::ExitedAt) => Ok(format!("{}\n", timestamp(ended.exited_at))),
        Entry::Meta(Meta::Metrics) => Ok(render::container_metrics(&ended.sample)),
        Entry::Metric(id) => ended
            .sample
            .get(id)
            .map(render::value_file)
            .ok_or(FsError::NotFound),
        Entry::Class { metric, class } => class_value(&ended.sample, metric, class),
    }
}

fn entry(node: Node, name: &str) -> DirEntry {
    DirEntry {
        ino: node.ino(),
        kind: node.kind(),
        name: name.to_string(),
    }
}

fn dots(ino: u64) -> Vec<DirEntry> {
    vec![
        DirEntry {
            ino,
            kind: Kind::Dir,
            name: ".".into(),
        },
        DirEntry {
            ino: ROOT_INO,
            kind: Kind::Dir,
            name: "..".into(),
        },
    ]
}

/// An ended container and its final values, as `exited/` shows them.
type Final = (Arc<Metered>, Sample);

/// What a ledger record keeps of a container's final sample: its counters.
fn ledger_counters(
    sample: &Sample,
) -> std::collections::BTreeMap<std::borrow::Cow<'static, str>, u64> {
    sample
        .iter()
        .filter(|(def, _)| def.kind == PromType::Counter)
        .filter_map(|(def, value)| match value {
            Value::Count(n) => Some((def.file.into(), n)),
            Value::Max => None,
        })
        // And each class's bytes, for a bill priced by destination.
        .chain(sample.class_files().map(|(file, n)| (file.into(), n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Layout;
    use crate::containers::discovery::{Discovery, Globs};
    use std::path::Path;
    use std::time::Duration;

    fn model(tree: &str) -> Model {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(tree);
        let layout = Layout::from_tree(&root).unwrap();
        let globs = Globs::new(&["tenants/*".to_string()]).unwrap();
        let registry = Arc::new(Registry::new(
            layout,
            Discovery::new(globs, None),
            crate::fs::inode::RESERVED_NAMES,
        ));
        registry.refresh();
        Model::new(registry, None, Duration::from_millis(20), false)
    }

    fn cat(model: &Model, path: &str) -> Result<String> {
        let mut ino = ROOT_INO;
        for part in path.split('/') {
            ino = model.lookup(ino, part)?.ino;
        }
        let handle = model.open(ino, false)?;
        // Read in small chunks: the snapshot must stitch together.
        let mut out = Vec::new();
        loop {
            let chunk = model.read(ino, handle, out.len() as u64, 7)?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        model.release(handle);
        Ok(String::from_utf8(out).unwrap())
    }

    fn ls(model: &Model, path: &str) -> Vec<String> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = model.lookup(ino, part).unwrap().ino;
        }
        let handle = model.opendir(ino).unwrap();
        let names = model
            .readdir(ino, handle)
            .unwrap()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        model.release(handle);
        names
    }

    /// What a server that takes over sees: the numbers its predecessor
    /// handed out, for the same cgroups.
    #[test]
    fn a_successor_numbers_the_tree_alike_and_serves_its_predecessors_handles() {
        let (old, new) = (model("v2"), model("v2"));
        let path = |m: &Model, path: &str| {
            let mut ino = ROOT_INO;
            for part in path.split('/') {
                ino = m.lookup(ino, part).unwrap().ino;
            }
            ino
        };
        for file in [
            "alpha/memory_usage",
            "alpha/name",
            "cgroup/tenants",
            "beta/pids_current",
        ] {
            assert_eq!(path(&old, file), path(&new, file), "{file}");
        }
        let ino = path(&old, "alpha/name");
        let handle = old.open(ino, false).unwrap();
        assert_eq!(&*new.read(ino, handle, 0, 100).unwrap(), b"alpha\n");
        let dir = path(&old, "alpha");
        let listing = old.opendir(dir).unwrap();
        assert_eq!(
            new.readdir(dir, listing).unwrap().len(),
            old.readdir(dir, listing).unwrap().len()
        );
    }

    #[test]
    fn tree_of_a_v2_host() {
        let m = model("v2");
        assert_eq!(
            ls(&m, ""),
            [
                ".",
                "..",
                "metric",
                "metrics.prom",
                "self",
                "cgroup",
                "exited",
                "alpha",
                "beta",
                "broken"
            ]
        );
        let files = ls(&m, "alpha");
        assert_eq!(
            &files[..7],
            [".", "..", "metrics", "name", "id", "cgroup", "runtime"]
        );
        assert!(files.contains(&"memory_rss".to_string()));
        assert!(!files.contains(&"memory_pgpgin".to_string()));
        assert_eq!(cat(&m, "alpha/memory_rss").unwrap(), "67108864\n");
        assert_eq!(cat(&m, "alpha/memory_limit").unwrap(), "max\n");
        assert_eq!(cat(&m, "alpha/cpu_limit_millicores").unwrap(), "500\n");
        assert_eq!(cat(&m, "alpha/cgroup").unwrap(), "/tenants/alpha\n");
        assert_eq!(cat(&m, "alpha/runtime").unwrap(), "cgroup\n");
        assert_eq!(cat(&m, "alpha/name").unwrap(), "alpha\n");
        // Static counters: zero CPU use.
        assert_eq!(cat(&m, "alpha/cpu_millicores").unwrap(), "0\n");
    }

    #[test]
    fn the_cgroup_tree_mirrors_every_cgroup() {
        let m = model("v2");
        let root = ls(&m, "cgroup");
        assert!(root.contains(&"tenants".to_string()), "{root:?}");
        assert!(
            root.contains(&"cgroup".to_string()),
            "the root cgroup's own meta file"
        );
        let tenants = ls(&m, "cgroup/tenants");
        for child in ["alpha", "beta", "broken", "metrics", "name"] {
            assert!(tenants.contains(&child.to_string()), "{child}: {tenants:?}");
        }
        assert_eq!(
            cat(&m, "cgroup/tenants/alpha/memory_rss").unwrap(),
            "67108864\n"
        );
        assert_eq!(
            cat(&m, "cgroup/tenants/alpha/cgroup").unwrap(),
            "/tenants/alpha\n"
        );
        assert_eq!(cat(&m, "cgroup/tenants/name").unwrap(), "tenants\n");
        // The same cgroup keeps its inode; an absent one is not there.
        let ino = |m: &Model| {
            let c = m.lookup(ROOT_INO, "cgroup").unwrap().ino;
            let t = m.lookup(c, "tenants").unwrap().ino;
            m.lookup(t, "alpha").unwrap().ino
        };
        assert_eq!(ino(&m), ino(&m));
        let c = m.lookup(ROOT_INO, "cgroup").unwrap().ino;
        assert_eq!(m.lookup(c, "nope").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(m.lookup(c, "..").unwrap_err().errno(), libc::ENOENT);
    }

    #[test]
    fn private_trees_belong_to_cgroup_owners() {
        let mut m = model("v2");
        m.private = true;
        let dir = m.lookup(ROOT_INO, "alpha").unwrap();
        assert_eq!((dir.perm, dir.kind), (0o500, Kind::Dir));
        assert_eq!(m.getattr(dir.ino).unwrap().perm, 0o500);
        let file = m.lookup(dir.ino, "memory_rss").unwrap();
        assert_eq!(file.perm, 0o400);
        assert_eq!(m.lookup(ROOT_INO, "metric").unwrap().perm, 0o400);
        assert_eq!(m.getattr(ROOT_INO).unwrap().perm, 0o555);
    }

    #[test]
    fn self_is_a_symlink_that_resolves_per_reader() {
        let m = model("v2");
        let attr = m.lookup(ROOT_INO, "self").unwrap();
        assert_eq!(attr.kind, Kind::Symlink);
        // pid 0: the reader's pid namespace cannot see the daemon's.
        assert_eq!(m.readlink(attr.ino, 0).unwrap_err().errno(), libc::ENOENT);
        // This test process is in no fixture container.
        assert_eq!(
            m.readlink(attr.ino, std::process::id())
                .unwrap_err()
                .errno(),
            libc::ENOENT
        );
        assert_eq!(m.readlink(ROOT_INO, 1).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn tree_of_a_v1_host() {
        let m = model("v1");
        assert_eq!(
            ls(&m, ""),
            [
                ".",
                "..",
                "metric",
                "metrics.prom",
                "self",
                "cgroup",
                "exited",
                "alpha"
            ]
        );
        assert_eq!(cat(&m, "alpha/memory_pgpgin").unwrap(), "20000\n");
        assert_eq!(cat(&m, "alpha/cpu_usage_usec").unwrap(), "2500000\n");
        assert_eq!(cat(&m, "alpha/memory_limit").unwrap(), "max\n");
        assert_eq!(cat(&m, "alpha/io_read_bytes").unwrap(), "1052672\n");
    }

    #[test]
    fn aggregates_agree_with_single_files() {
        let m = model("v2");
        let metric = cat(&m, "metric").unwrap();
        let metrics = cat(&m, "alpha/metrics").unwrap();
        for line in metrics.lines() {
            let (file, value) = line.split_once(' ').unwrap();
            assert!(
                metric.contains(&format!("alpha_{file} {value}\n")),
                "{line}"
            );
            if file != "cpu_millicores" {
                assert_eq!(
                    cat(&m, &format!("alpha/{file}")).unwrap(),
                    format!("{value}\n")
                );
            }
        }
        let prom = cat(&m, "metrics.prom").unwrap();
        assert!(prom.contains("# TYPE cgmetric_memory_rss_bytes gauge\n"));
        assert!(prom.contains("cgmetric_memory_rss_bytes{container=\"alpha\","));
        assert!(prom.contains("cgmetric_cpu_usage_seconds_total{container=\"alpha\""));
        assert_eq!(prom.matches("# HELP cgmetric_memory_rss_bytes ").count(), 1);
    }

    #[test]
    fn malformed_files_are_eio_and_cost_only_themselves() {
        let m = model("v2");
        assert_eq!(
            cat(&m, "broken/memory_usage").unwrap_err().errno(),
            libc::EIO
        );
        assert_eq!(
            cat(&m, "broken/cpu_limit_millicores").unwrap_err().errno(),
            libc::EIO
        );
        assert_eq!(cat(&m, "broken/pids_current").unwrap(), "5\n");
        // The aggregates still list broken's good values.
        assert!(cat(&m, "metric")
            .unwrap()
            .contains("broken_pids_current 5\n"));
        assert!(cat(&m, "broken/metrics")
            .unwrap()
            .contains("pids_current 5\n"));
    }

    #[test]
    fn missing_names_and_writes() {
        let m = model("v2");
        assert_eq!(
            m.lookup(ROOT_INO, "nope").unwrap_err().errno(),
            libc::ENOENT
        );
        assert_eq!(
            cat(&m, "beta/cpu_nr_periods").unwrap_err().errno(),
            libc::ENOENT
        );
        let ino = m.lookup(ROOT_INO, "metric").unwrap().ino;
        assert_eq!(m.open(ino, true).unwrap_err().errno(), libc::EROFS);
        assert_eq!(m.open(ROOT_INO, false).unwrap_err().errno(), libc::EISDIR);
        // A handle nobody handed out, on a number that names nothing.
        assert_eq!(m.read(999, 999, 0, 10).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(
            m.read(ROOT_INO, 999, 0, 10).unwrap_err().errno(),
            libc::EISDIR
        );
    }
}

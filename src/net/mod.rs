//! Network accounting: the eBPF programs ([`load`]) and reading what they
//! counted, summed over CPUs and over a container's whole cgroup subtree.

pub mod class;
mod load;
mod snapshot;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key as TrieKey, LpmTrie};
use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use cgmetric_common::{
    health, ClassCounters, ClassKey, ConnCounters, NetCounters, PeerCache, Retired,
    CLASS_COUNTERS_MAP, CONN_COUNTERS_MAP, HEALTH_MAP, NET_CLASSES_MAP, NET_CONFIG_MAP,
    NET_COUNTERS_MAP, PEER_CACHE_MAP, RETIRED_CLASSES_MAP, RETIRED_MAP,
};
use parking_lot::{Mutex, RwLock};

use crate::bpf_sys as sys;

pub use class::{Classes, NetClass};
#[cfg(feature = "test-helpers")]
pub use load::load_and_attach_object;
pub use load::{link_pin, PROGRAMS};
use snapshot::Counts;
pub use snapshot::Snapshot;

/// How many classes the programs count at most: the named ones and
/// `loopback`.
pub const MAX_COUNTED_CLASSES: usize = class::MAX_NAMED_CLASSES + 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Occurs on hosts without a cgroup v2 hierarchy to attach to.
    #[error(
        "network accounting needs a cgroup v2 hierarchy, and this host has none (use --no-ebpf)"
    )]
    NoCgroupV2,
    /// Occurs when `--bpf-dir` is not on a bpf filesystem and cannot be.
    #[error("--bpf-dir {0} is not on a bpf filesystem (mount one: mount -t bpf bpf DIR)")]
    NotBpffs(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Occurs when the kernel refuses the object (maps, BTF).
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    /// Occurs when the verifier rejects a program.
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching eBPF program {name}: {source}")]
    Attach {
        name: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Occurs when a program's link cannot be pinned, read or updated.
    #[error("eBPF program {name}, link {}: {source}", path.display())]
    Link {
        name: &'static str,
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Totals of one container: traffic, TCP connections, and the bytes of each
/// counted class (by index among [`Classes`]; `external` is the rest).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub net: NetCounters,
    pub conn: ConnCounters,
    pub classes: [ClassCounters; MAX_COUNTED_CLASSES],
}

impl Totals {
    /// The bytes sent to and received from peers of the class at `index`
    /// among [`Classes::names`]: `external` (the last) is what no counted
    /// class took.
    pub fn class_bytes(&self, classes: &Classes, index: usize) -> (u64, u64) {
        if index < classes.counted() {
            let c = self.classes[index];
            return (c.tx_bytes, c.rx_bytes);
        }
        let counted = &self.classes[..classes.counted()];
        let tx: u64 = counted.iter().map(|c| c.tx_bytes).sum();
        let rx: u64 = counted.iter().map(|c| c.rx_bytes).sum();
        (
            self.net.tx_bytes.saturating_sub(tx),
            self.net.rx_bytes.saturating_sub(rx),
        )
    }

    fn add_classes(&mut self, classes: &[ClassCounters]) {
        for (total, c) in self.classes.iter_mut().zip(classes) {
            add_class(total, c);
        }
    }

    fn add(&mut self, net: &NetCounters, conn: &ConnCounters) {
        add_net(&mut self.net, net);
        add_conn(&mut self.conn, conn);
    }
}

struct Maps {
    traffic: PerCpuHashMap<MapData, u64, NetCounters>,
    connections: PerCpuHashMap<MapData, u64, ConnCounters>,
    retired: BpfHashMap<MapData, u64, Retired>,
    classes: PerCpuHashMap<MapData, ClassKey, ClassCounters>,
    retired_classes: BpfHashMap<MapData, ClassKey, ClassCounters>,
}

/// The attached programs' counters.
pub struct Net {
    maps: RwLock<Maps>,
    /// The classes configured at this start (none: nothing is split).
    classes: Classes,
    health: PerCpuArray<MapData, u64>,
    /// The v2 root, for resolving cgroup ids.
    cgroup_root: File,
    /// The cgroups each container (by id) was seen to have below it. A
    /// removed one still counts for its container until a sweep folds its
    /// entries into the container's `RETIRED` entry.
    below: Mutex<HashMap<u64, Vec<u64>>>,
    /// Sweeps begun: a [`Snapshot`] taken before one is stale for
    /// containers whose removed cgroups it folded.
    sweeps: AtomicU64,
    /// Health counters already reported.
    reported: Mutex<[u64; health::COUNT as usize]>,
    /// When entries of removed cgroups were last swept.
    last_sweep: Mutex<Instant>,
    /// The possible CPUs: a per-CPU map holds a value for each.
    cpus: usize,
    /// Entries the last [`Snapshot`] held (`usize::MAX` once the kernel
    /// refused one).
    snapshot_entries: AtomicUsize,
}

/// Above this many map entries per container an aggregate looks each
/// container up instead of reading every entry: a lookup costs a few
/// system calls a container, a [`Snapshot`] a fraction of one an entry.
const ENTRIES_PER_CONTAINER: usize = 16;

/// How often entries of removed cgroups are swept when no container
/// vanished meanwhile.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, NetError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(NetError::Map {
        name,
        source: Box::new(MapError::InvalidName { name: name.into() }),
    })?;
    T::try_from(map).map_err(|e| NetError::Map {
        name,
        source: Box::new(e),
    })
}

impl Net {
    /// Attaches (or finds attached) the programs at the v2 root `cgroup_root`
    /// and gives them `classes` to split traffic by.
    pub fn start(bpf_dir: &Path, cgroup_root: &Path, classes: Classes) -> Result<Net, NetError> {
        let mut ebpf = load::load_and_attach(bpf_dir, cgroup_root)?;
        configure_classes(&mut ebpf, &classes)?;
        Ok(Net {
            maps: RwLock::new(Maps {
                traffic: take(&mut ebpf, NET_COUNTERS_MAP)?,
                connections: take(&mut ebpf, CONN_COUNTERS_MAP)?,
                retired: take(&mut ebpf, RETIRED_MAP)?,
                classes: take(&mut ebpf, CLASS_COUNTERS_MAP)?,
                retired_classes: take(&mut ebpf, RETIRED_CLASSES_MAP)?,
            }),
            classes,
            health: take(&mut ebpf, HEALTH_MAP)?,
            cgroup_root: File::open(cgroup_root).map_err(|source| NetError::Io {
                path: cgroup_root.to_path_buf(),
                source,
            })?,
            below: Mutex::new(HashMap::new()),
            sweeps: AtomicU64::new(0),
            reported: Mutex::new([0; health::COUNT as usize]),
            last_sweep: Mutex::new(Instant::now()),
            cpus: aya::util::nr_cpus().map_err(|(_, e)| NetError::Io {
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source: e,
            })?,
            snapshot_entries: AtomicUsize::new(0),
        })
    }

    /// After discovery: sweeps the entries of removed cgroups when a
    /// container `vanished` (its counts are final now) or when
    /// `SWEEP_INTERVAL` passed (cgroups below containers come and go
    /// unseen).
    pub fn sweep(&self, vanished: bool) {
        let mut last = self.last_sweep.lock();
        if vanished || last.elapsed() > SWEEP_INTERVAL {
            self.collect_garbage();
            *last = Instant::now();
        }
    }

    /// Traffic and connections of the cgroup at `dir` (a v2 directory) and
    /// every cgroup below it, plus what removed descendants left behind.
    pub fn totals(&self, dir: &Path) -> Option<Totals> {
        // Held from the listing on, so that no sweep runs between what is
        // listed and what is read (see `ids_of`).
        let maps = self.maps.read();
        let ids = self.ids_of(dir)?;
        Some(self.sum(&*maps, &ids))
    }

    /// [`Net::totals`] from a [`Snapshot`] of the maps; from the maps
    /// themselves if a sweep began since the snapshot was taken.
    pub fn totals_in(&self, snapshot: &Snapshot, dir: &Path) -> Option<Totals> {
        let ids = self.ids_of(dir)?;
        // A sweep bumps the count before it touches `below`, and `ids_of`
        // read `below` under its lock: a sweep whose changes it saw is
        // counted here.
        if self.sweeps.load(Ordering::SeqCst) != snapshot.sweeps() {
            return self.totals(dir);
        }
        Some(self.sum(snapshot, &ids))
    }

    /// The ids that count for the container at `dir`, its own first: the
    /// cgroups below it now, and those seen below it before that are gone
    /// but not yet swept (their entries are still in the maps; a sweep
    /// moves them to the container's `RETIRED` entry). Without the latter a
    /// removed child's traffic would drop out of its container's counter
    /// until the next sweep, up to a minute: to Prometheus a counter reset.
    fn ids_of(&self, dir: &Path) -> Option<Vec<u64>> {
        let mut ids = subtree_ids(dir);
        let container = *ids.first()?;
        let mut below = self.below.lock();
        // Most containers have no cgroups below them: one lookup, no entry.
        match below.get_mut(&container) {
            None if ids.len() == 1 => {}
            None => {
                below.insert(container, ids[1..].to_vec());
            }
            Some(known) => {
                for id in &ids[1..] {
                    if !known.contains(id) {
                        known.push(*id);
                    }
                }
                ids.truncate(1);
                ids.extend_from_slice(known);
            }
        }
        Some(ids)
    }

    /// The totals of `ids`, the container's own id first.
    fn sum(&self, counts: &impl Counts, ids: &[u64]) -> Totals {
        let container = ids[0];
        let mut totals = Totals::default();
        if let Some(retired) = counts.retired(container) {
            totals.add(&retired.net, &retired.conn);
        }
        totals.add_classes(&self.retired_classes(counts, container));
        for &id in ids {
            let (net, conn) = counts.entry(id);
            totals.add(&net, &conn);
            totals.add_classes(&self.class_entries(counts, id));
        }
        totals
    }

    /// Every entry of the maps, for an aggregate read of `containers`:
    /// `None` when reading them all would cost more than looking each
    /// container up (by the last snapshot's size: a daemon watching a few
    /// containers on a host whose other cgroups send a lot), or when the
    /// kernel cannot (before 5.6), and then each is looked up.
    pub fn snapshot(&self, containers: usize) -> Option<Snapshot> {
        let last = self.snapshot_entries.load(Ordering::Relaxed);
        if last > ENTRIES_PER_CONTAINER * containers {
            return None;
        }
        let maps = self.maps.read();
        let sweeps = self.sweeps.load(Ordering::SeqCst);
        match Snapshot::read(&maps, self.cpus, self.classes.counted() > 0, sweeps) {
            Ok(snapshot) => {
                self.snapshot_entries
                    .store(snapshot.entries(), Ordering::Relaxed);
                Some(snapshot)
            }
            Err(e) => {
                // Said once: every later aggregate looks each container up.
                if self.snapshot_entries.swap(usize::MAX, Ordering::Relaxed) != usize::MAX {
                    log::info!("reading the eBPF maps at once: {e}; looking up each container");
                }
                None
            }
        }
    }

    /// Totals of a container whose v2 cgroup `id` is gone (or going), from
    /// what the maps still hold: its own entry, what removed descendants
    /// left in `RETIRED`, and the entries of every cgroup last seen below
    /// it. Only exact until the next sweep.
    pub fn gone_totals(&self, id: u64) -> Totals {
        let maps = self.maps.read();
        let mut ids = vec![id];
        if let Some(below) = self.below.lock().get(&id) {
            ids.extend_from_slice(below);
        }
        self.sum(&*maps, &ids)
    }

    /// The classes configured at this start.
    pub fn classes(&self) -> &Classes {
        &self.classes
    }

    /// The class counters of `cgroup`'s own entries, summed over CPUs, by
    /// class index.
    fn class_entries(&self, counts: &impl Counts, cgroup: u64) -> Vec<ClassCounters> {
        (0..self.classes.counted())
            .map(|index| {
                counts.class(&ClassKey {
                    cgroup,
                    class: self.classes.id(index),
                })
            })
            .collect()
    }

    /// What `container`'s removed descendants left per class.
    fn retired_classes(&self, counts: &impl Counts, container: u64) -> Vec<ClassCounters> {
        (0..self.classes.counted())
            .map(|index| {
                counts.retired_class(&ClassKey {
                    cgroup: container,
                    class: self.classes.id(index),
                })
            })
            .collect()
    }

    /// Whether the cgroup with this id (a v2 directory's inode) exists.
    pub fn cgroup_exists(&self, id: u64) -> bool {
        sys::cgroup_exists(self.cgroup_root.as_fd(), id)
    }

    /// Removes the entries of cgroups that no longer exist. A removed cgroup
    /// seen inside a live container is first folded into that container, so
    /// its totals never go down.
    pub fn collect_garbage(&self) {
        let root = self.cgroup_root.as_fd();
        let mut maps = self.maps.write();
        let mut ids: Vec<u64> = maps.traffic.keys().filter_map(Result::ok).collect();
        ids.extend(maps.connections.keys().filter_map(Result::ok));
        ids.extend(maps.retired.keys().filter_map(Result::ok));
        // Every class a cgroup met, configured now or not: a class dropped
        // from the command line still has entries to fold and free.
        let class_keys: Vec<ClassKey> = maps.classes.keys().filter_map(Result::ok).collect();
        let retired_class_keys: Vec<ClassKey> =
            maps.retired_classes.keys().filter_map(Result::ok).collect();
        ids.extend(class_keys.iter().map(|k| k.cgroup));
        ids.extend(retired_class_keys.iter().map(|k| k.cgroup));
        ids.sort_unstable();
        ids.dedup();
        let mut below = self.below.lock();
        // A cgroup can be below two containers (one inside the other): it
        // folds into each, as each counted it.
        let mut owners_of: HashMap<u64, Vec<u64>> = HashMap::new();
        for (owner, ids) in below.iter() {
            for id in ids {
                owners_of.entry(*id).or_default().push(*owner);
            }
        }
        'ids: for id in ids.into_iter().filter(|id| !sys::cgroup_exists(root, *id)) {
            let owners = owners_of.remove(&id).unwrap_or_default();
            let (net, conn) = maps.entry(id);
            for owner in owners.into_iter().filter(|o| sys::cgroup_exists(root, *o)) {
                let mut folded = Totals::default();
                if let Ok(before) = maps.retired.get(&owner, 0) {
                    folded.add(&before.net, &before.conn);
                }
                folded.add(&net, &conn);
                let retired = Retired {
                    net: folded.net,
                    conn: folded.conn,
                };
                if let Err(e) = maps.retired.insert(owner, retired, 0) {
                    log::warn!(
                        "cannot fold removed cgroup {id} into {owner}: {e}; keeping its entry"
                    );
                    continue 'ids;
                }
                if let Err(e) = fold_classes(&mut maps, &class_keys, id, owner) {
                    log::warn!(
                        "cannot fold the classes of removed cgroup {id} into {owner}: {e}; \
                         keeping its entries"
                    );
                    continue 'ids;
                }
                // Folded: the container counts it from `RETIRED` now. A
                // snapshot taken before has it in neither place once
                // `below` forgets it, so those snapshots go stale first;
                // and a later sweep must not fold it into this one again.
                self.sweeps.fetch_add(1, Ordering::SeqCst);
                if let Some(ids) = below.get_mut(&owner) {
                    ids.retain(|below| *below != id);
                }
            }
            let _ = maps.traffic.remove(&id);
            let _ = maps.connections.remove(&id);
            let _ = maps.retired.remove(&id);
            for key in class_keys.iter().chain(&retired_class_keys) {
                if key.cgroup == id {
                    let _ = maps.classes.remove(key);
                    let _ = maps.retired_classes.remove(key);
                }
            }
        }
        // Ids seen under containers that are gone fold into nothing: forget
        // them, or every container that ever lived stays in memory.
        below.retain(|owner, ids| !ids.is_empty() && sys::cgroup_exists(root, *owner));
    }

    /// The health counters, summed over CPUs, by [`health`] index; each
    /// that grew since the last call is logged once.
    pub fn health(&self) -> [u64; health::COUNT as usize] {
        let mut now = [0; health::COUNT as usize];
        for (index, slot) in now.iter_mut().enumerate() {
            if let Ok(values) = self.health.get(&(index as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        let mut reported = self.reported.lock();
        for (index, (now, before)) in now.iter().zip(reported.iter()).enumerate() {
            if now > before {
                let what = match index as u32 {
                    health::NET_MAP_FULL => "packets not counted: the traffic map is full",
                    health::CONN_MAP_FULL => {
                        "connection events not counted: the connection map is full"
                    }
                    _ => "connections on sockets older than the programs: not attributed",
                };
                log::warn!("{what} ({now} in all)");
            }
        }
        *reported = now;
        now
    }
}

/// Adds the class entries of the removed cgroup `id` to what `owner`'s
/// removed descendants left.
fn fold_classes(maps: &mut Maps, keys: &[ClassKey], id: u64, owner: u64) -> Result<(), MapError> {
    for key in keys.iter().filter(|k| k.cgroup == id) {
        let sum = maps.class(key);
        let to = ClassKey {
            cgroup: owner,
            class: key.class,
        };
        let before = maps.retired_classes.get(&to, 0).unwrap_or_default();
        let folded = ClassCounters {
            tx_bytes: before.tx_bytes + sum.tx_bytes,
            rx_bytes: before.rx_bytes + sum.rx_bytes,
        };
        maps.retired_classes.insert(to, folded, 0)?;
    }
    Ok(())
}

/// Writes the classes into the trie (what an earlier start left there goes)
/// and turns the programs' lookups on, or off when there are none.
fn configure_classes(ebpf: &mut aya::Ebpf, classes: &Classes) -> Result<(), NetError> {
    let map_error = |name: &'static str| {
        move |e: MapError| NetError::Map {
            name,
            source: Box::new(e),
        }
    };
    let mut config: Array<MapData, u32> = take(ebpf, NET_CONFIG_MAP)?;
    let mut trie: LpmTrie<MapData, [u8; 16], u64> = take(ebpf, NET_CLASSES_MAP)?;
    let previous = config.get(&0, 0).unwrap_or(0);
    // Off while the trie changes: a packet meanwhile is counted as
    // `external` rather than under a half-written class.
    config.set(0, 0, 0).map_err(map_error(NET_CONFIG_MAP))?;
    let old: Vec<TrieKey<[u8; 16]>> = trie.keys().filter_map(Result::ok).collect();
    for key in old {
        let _ = trie.remove(&key);
    }
    for (addr, len, id) in classes.trie_entries() {
        trie.insert(&TrieKey::new(len, addr), id, 0)
            .map_err(map_error(NET_CLASSES_MAP))?;
    }
    // The programs' cached peers go too: those written under the value
    // restored below, before the classes were last turned off, would match
    // again.
    let mut cache: PerCpuArray<MapData, PeerCache> = take(ebpf, PEER_CACHE_MAP)?;
    let io_error = |e: std::io::Error| NetError::Map {
        name: PEER_CACHE_MAP,
        source: Box::new(e),
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| io_error(e))?;
    let empty = PerCpuValues::try_from(vec![PeerCache::default(); cpus]).map_err(io_error)?;
    cache.set(0, empty, 0).map_err(map_error(PEER_CACHE_MAP))?;
    // A value no earlier trie had (until it wraps): the programs' cached
    // peers were looked up under an earlier one and stop matching.
    let on = match classes.is_empty() {
        true => 0,
        false => previous.wrapping_add(1).max(1),
    };
    config.set(0, on, 0).map_err(map_error(NET_CONFIG_MAP))?;
    Ok(())
}

fn add_net(sum: &mut NetCounters, v: &NetCounters) {
    sum.tx_bytes += v.tx_bytes;
    sum.tx_packets += v.tx_packets;
    sum.rx_bytes += v.rx_bytes;
    sum.rx_packets += v.rx_packets;
}

fn add_conn(sum: &mut ConnCounters, v: &ConnCounters) {
    sum.established += v.established;
    sum.closed += v.closed;
    sum.lifetime_ns += v.lifetime_ns;
    sum.retransmits += v.retransmits;
}

fn add_class(sum: &mut ClassCounters, v: &ClassCounters) {
    sum.tx_bytes += v.tx_bytes;
    sum.rx_bytes += v.rx_bytes;
}

/// The cgroup ids (directory inode numbers) of `dir` and every cgroup below
/// it, `dir`'s first; empty if `dir` is gone.
pub fn subtree_ids(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        ids.push(meta.ino());
        // A directory's link count is 2 plus its subdirectories (kernfs
        // keeps it so): most containers have none, and listing a cgroup's
        // forty-odd files per read would cost more than its map lookups.
        // Some filesystems report 1 for every directory; those are listed.
        if meta.nlink() == 2 {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    ids
}

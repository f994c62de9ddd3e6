//! What the programs counted, for an aggregate read: every entry of the
//! counter maps read at once, a few hundred entries to a system call,
//! instead of three lookups (and two a class) for each container's cgroup.

use std::collections::HashMap;
use std::hash::Hash;
use std::os::fd::AsFd;

use aya::maps::{IterableMap, MapData, PerCpuHashMap};
use aya::Pod;
use cgmetric_common::{ClassCounters, ClassKey, ConnCounters, NetCounters, Retired};

use super::{add_class, add_conn, add_net, Maps};
use crate::bpf_sys as sys;

/// Where a container's totals come from: the maps themselves, one lookup
/// at a time, or a [`Snapshot`] of them.
pub(super) trait Counts {
    /// A cgroup's own traffic and connections, summed over CPUs.
    fn entry(&self, id: u64) -> (NetCounters, ConnCounters);
    /// What removed descendants of `id` left to it.
    fn retired(&self, id: u64) -> Option<Retired>;
    /// A cgroup's bytes of one class, summed over CPUs.
    fn class(&self, key: &ClassKey) -> ClassCounters;
    /// What removed descendants left to a cgroup in one class.
    fn retired_class(&self, key: &ClassKey) -> ClassCounters;
}

impl Counts for Maps {
    fn entry(&self, id: u64) -> (NetCounters, ConnCounters) {
        (
            summed(&self.traffic, &id, add_net),
            summed(&self.connections, &id, add_conn),
        )
    }

    fn retired(&self, id: u64) -> Option<Retired> {
        self.retired.get(&id, 0).ok()
    }

    fn class(&self, key: &ClassKey) -> ClassCounters {
        summed(&self.classes, key, add_class)
    }

    fn retired_class(&self, key: &ClassKey) -> ClassCounters {
        self.retired_classes.get(key, 0).unwrap_or_default()
    }
}

/// Every entry of the counter maps at one moment, per-CPU values summed.
#[derive(Default)]
pub struct Snapshot {
    traffic: HashMap<u64, NetCounters>,
    connections: HashMap<u64, ConnCounters>,
    retired: HashMap<u64, Retired>,
    classes: HashMap<ClassKey, ClassCounters>,
    retired_classes: HashMap<ClassKey, ClassCounters>,
    /// Sweeps begun before it was taken.
    sweeps: u64,
}

impl Snapshot {
    /// Reads the maps (the class maps only when classes are counted), with
    /// the number of sweeps so far, which no sweep can change meanwhile.
    pub(super) fn read(
        maps: &Maps,
        cpus: usize,
        with_classes: bool,
        sweeps: u64,
    ) -> std::io::Result<Snapshot> {
        let mut snapshot = Snapshot {
            sweeps,
            ..Snapshot::default()
        };
        per_cpu(maps.traffic.map(), cpus, &mut snapshot.traffic, add_net)?;
        per_cpu(
            maps.connections.map(),
            cpus,
            &mut snapshot.connections,
            add_conn,
        )?;
        plain(maps.retired.map(), &mut snapshot.retired)?;
        if with_classes {
            per_cpu(maps.classes.map(), cpus, &mut snapshot.classes, add_class)?;
            plain(maps.retired_classes.map(), &mut snapshot.retired_classes)?;
        }
        Ok(snapshot)
    }

    pub(super) fn sweeps(&self) -> u64 {
        self.sweeps
    }

    /// How many entries it holds: what reading it cost.
    pub(super) fn entries(&self) -> usize {
        self.traffic.len()
            + self.connections.len()
            + self.retired.len()
            + self.classes.len()
            + self.retired_classes.len()
    }
}

impl Counts for Snapshot {
    fn entry(&self, id: u64) -> (NetCounters, ConnCounters) {
        (
            self.traffic.get(&id).copied().unwrap_or_default(),
            self.connections.get(&id).copied().unwrap_or_default(),
        )
    }

    fn retired(&self, id: u64) -> Option<Retired> {
        self.retired.get(&id).copied()
    }

    fn class(&self, key: &ClassKey) -> ClassCounters {
        self.classes.get(key).copied().unwrap_or_default()
    }

    fn retired_class(&self, key: &ClassKey) -> ClassCounters {
        self.retired_classes.get(key).copied().unwrap_or_default()
    }
}

/// The value of `key` in a per-CPU hash map, its CPUs' values summed by
/// `add` (zero where there is none).
fn summed<K: Pod, V: Pod + Default>(
    map: &PerCpuHashMap<MapData, K, V>,
    key: &K,
    add: fn(&mut V, &V),
) -> V {
    let mut sum = V::default();
    if let Ok(values) = map.get(key, 0) {
        for v in values.iter() {
            add(&mut sum, v);
        }
    }
    sum
}

/// Every entry of a per-CPU hash map, its CPUs' values summed by `add`.
fn per_cpu<K: Pod + Eq + Hash, V: Pod + Default>(
    map: &MapData,
    cpus: usize,
    into: &mut HashMap<K, V>,
    add: fn(&mut V, &V),
) -> std::io::Result<()> {
    // The kernel lays each CPU's value out on an 8-byte boundary.
    let stride = size_of::<V>().next_multiple_of(8);
    sys::lookup_batch(
        map.fd().as_fd(),
        size_of::<K>(),
        stride * cpus,
        |key, values| {
            let mut sum = V::default();
            for cpu in values.chunks_exact(stride) {
                add(&mut sum, &pod(&cpu[..size_of::<V>()]));
            }
            into.insert(pod(key), sum);
        },
    )?;
    Ok(())
}

/// Every entry of a hash map.
fn plain<K: Pod + Eq + Hash, V: Pod>(
    map: &MapData,
    into: &mut HashMap<K, V>,
) -> std::io::Result<()> {
    sys::lookup_batch(
        map.fd().as_fd(),
        size_of::<K>(),
        size_of::<V>(),
        |key, value| {
            into.insert(pod(key), pod(value));
        },
    )?;
    Ok(())
}

/// A `T` from exactly its bytes.
fn pod<T: Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: the length is T's, and Pod types are valid for any bytes;
    // the read makes no assumption of alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

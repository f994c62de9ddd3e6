//! `exited/`: the containers that ended within `--keep-exited`, one
//! directory per name (its last incarnation), with the values they had when
//! they ended, frozen. Each ended incarnation gets an exit number, never
//! reused, which fixes its inode numbers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;

use crate::containers::registry::Metered;
use crate::metrics::{MetricId, Sample, METRICS};

/// One ended incarnation.
pub struct Ended {
    /// Its exit number ([`super::inode::Owner::Exited`]).
    pub exit: u64,
    /// The container as it was last.
    pub container: Arc<Metered>,
    /// Its final values.
    pub sample: Sample,
    pub exited_at: SystemTime,
}

impl Ended {
    /// The metrics it has files for: those with a final value.
    pub fn available(&self) -> impl Iterator<Item = MetricId> + '_ {
        METRICS
            .iter()
            .map(|m| m.id)
            .filter(|id| self.sample.get(*id).is_some())
    }

    pub fn has(&self, id: MetricId) -> bool {
        self.sample.get(id).is_some()
    }
}

pub struct Exited {
    keep: Duration,
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, Arc<Ended>>,
    by_exit: HashMap<u64, Arc<Ended>>,
    next: u64,
}

impl Exited {
    /// Keeps each ended container for `keep` (none when zero).
    pub fn new(keep: Duration) -> Exited {
        Exited {
            keep,
            inner: RwLock::default(),
        }
    }

    /// Shows `container`, ended at `at` with the values `sample`, in place of
    /// any earlier incarnation of its name.
    pub fn add(&self, container: Arc<Metered>, sample: Sample, at: SystemTime) {
        if self.keep.is_zero() {
            return;
        }
        let mut inner = self.inner.write();
        let exit = inner.next;
        inner.next += 1;
        let ended = Arc::new(Ended {
            exit,
            container,
            sample,
            exited_at: at,
        });
        if let Some(old) = inner
            .by_name
            .insert(ended.container.name.clone(), ended.clone())
        {
            inner.by_exit.remove(&old.exit);
        }
        inner.by_exit.insert(exit, ended);
    }

    /// Whether nothing is kept (`--keep-exited 0`).
    pub fn is_off(&self) -> bool {
        self.keep.is_zero()
    }

    fn live(&self, ended: &Ended) -> bool {
        ended
            .exited_at
            .elapsed()
            .map_or(true, |age| age <= self.keep)
    }

    /// Drops what has been shown for `--keep-exited`. Returns the names
    /// that went.
    pub fn expire(&self) -> Vec<String> {
        if self.inner.read().by_exit.values().all(|e| self.live(e)) {
            return Vec::new();
        }
        let mut inner = self.inner.write();
        let expired: Vec<(u64, String)> = inner
            .by_exit
            .values()
            .filter(|e| !self.live(e))
            .map(|e| (e.exit, e.container.name.clone()))
            .collect();
        let mut gone = Vec::new();
        for (exit, name) in expired {
            inner.by_exit.remove(&exit);
            if inner.by_name.get(&name).is_some_and(|e| e.exit == exit) {
                inner.by_name.remove(&name);
                gone.push(name);
            }
        }
        gone
    }

    pub fn get(&self, exit: u64) -> Option<Arc<Ended>> {
        let inner = self.inner.read();
        inner.by_exit.get(&exit).filter(|e| self.live(e)).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Ended>> {
        let inner = self.inner.read();
        inner.by_name.get(name).filter(|e| self.live(e)).cloned()
    }

    /// Every one shown, by name.
    pub fn list(&self) -> Vec<Arc<Ended>> {
        let inner = self.inner.read();
        inner
            .by_name
            .values()
            .filter(|e| self.live(e))
            .cloned()
            .collect()
    }
}

//! `exited/`: the containers that ended within `--keep-exited`, one
//! directory per name (its last incarnation), with the values they had when
//! they ended, frozen. Each ended incarnation gets an exit number, never
//! reused, which fixes its inode numbers.

use std::collections::BTreeMap;
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
    /// In the order they ended: the oldest first.
    by_exit: BTreeMap<u64, Arc<Ended>>,
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
        let oldest_live =
            |inner: &Inner| inner.by_exit.values().next().is_none_or(|e| self.live(e));
        if oldest_live(&self.inner.read()) {
            return Vec::new();
        }
        let mut inner = self.inner.write();
        let mut gone = Vec::new();
        while !oldest_live(&inner) {
            let Some((exit, ended)) = inner.by_exit.pop_first() else {
                break;
            };
            let name = &ended.container.name;
            if inner.by_name.get(name).is_some_and(|e| e.exit == exit) {
                inner.by_name.remove(name);
                gone.push(name.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricId;

    fn ended(exited: &Exited, name: &str, tx: u64, at: SystemTime) {
        let mut sample = Sample::default();
        sample.set(MetricId::NetBytesTx, Some(tx));
        exited.add(Arc::new(Metered::named(0, name, "1")), sample, at);
    }

    #[test]
    fn a_name_shows_its_last_incarnation_until_it_expires() {
        let exited = Exited::new(Duration::from_secs(60));
        let now = SystemTime::now();
        ended(&exited, "web", 1, now - Duration::from_secs(90));
        ended(&exited, "job", 2, now - Duration::from_secs(30));
        ended(&exited, "job", 3, now);
        // Past --keep-exited: not shown even before it is dropped.
        assert!(exited.by_name("web").is_none());
        let job = exited.by_name("job").unwrap();
        assert_eq!(job.sample.count(MetricId::NetBytesTx), Some(3));
        assert!(job.has(MetricId::NetBytesTx) && !job.has(MetricId::NetBytesRx));
        assert_eq!(job.available().collect::<Vec<_>>(), [MetricId::NetBytesTx]);
        // The earlier incarnation's numbers name nothing now.
        assert!(exited.get(1).is_none());
        assert_eq!(exited.get(2).unwrap().exit, 2);
        assert_eq!(exited.expire(), ["web"]);
        assert!(exited.expire().is_empty());
        assert_eq!(exited.list().len(), 1);
        // Never reused.
        ended(&exited, "web", 4, now);
        assert_eq!(exited.by_name("web").unwrap().exit, 3);
    }

    #[test]
    fn zero_keeps_nothing() {
        let exited = Exited::new(Duration::ZERO);
        assert!(exited.is_off());
        ended(&exited, "web", 1, SystemTime::now());
        assert!(exited.list().is_empty());
    }
}

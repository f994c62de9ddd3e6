//! A container's values from every source: cgroup files, rates measured on
//! demand, and the eBPF maps. The filesystem asks this module for values and
//! never knows where they come from. [`rate`] measures rates on demand,
//! [`pool`] is the helper threads an aggregate read is shared with
//! ([`fanout`]).

pub mod fanout;
pub mod pool;
pub mod rate;
pub mod spent;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::cgroup::files::{Files, SourceError};
use crate::cgroup::read::read_group;
use crate::cgroup::walk::{WalkError, Walked, Walker};
use crate::cgroup::Layout;
use crate::containers::registry::{Metered, Slot};
use crate::metrics::{groups_of, ClassBytes, Group, MetricId as M, MetricId, Sample, METRICS};
use crate::net::{Classes, Net, Snapshot, Totals};
use crate::sample::rate::RateTracker;
use crate::sample::spent::{thread_cpu, Source, Spent};

/// The counters whose rates are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateCounter {
    CpuUsage,
    NetTx,
    NetRx,
}

/// Reads a served cgroup's values from its sources. It knows where values
/// come from, not which cgroups exist: that is the filesystem's.
pub struct Sampler {
    layout: Layout,
    rates: RateTracker<(Slot, RateCounter)>,
    net: Option<Arc<Net>>,
    /// The cgroup walk aggregate reads begin with, when on.
    walker: Option<Walker>,
    /// What aggregate reads cost, by source.
    pub spent: Spent,
}

impl Sampler {
    pub fn new(layout: Layout, window: Duration, net: Option<Arc<Net>>) -> Sampler {
        Sampler {
            layout,
            rates: RateTracker::new(window),
            net,
            walker: None,
            spent: Spent::default(),
        }
    }

    /// Aggregate reads walk the cgroups first (see [`crate::cgroup::walk`]).
    pub fn enable_walk(&mut self) {
        self.walker = Some(Walker::new(&self.layout));
    }

    /// Whether aggregates take files from the walk: then neither they nor
    /// learning a container's files keep open the files the walk answers,
    /// and the budget goes to the files aggregates read from cgroupfs (at
    /// 1,000 containers it would otherwise hold a quarter of them). Not
    /// when a walk does not pay either: which it does changes with the
    /// number of containers, and what is kept should not.
    fn walks_aggregates(&self) -> bool {
        self.walker.as_ref().is_some_and(|w| !w.is_unavailable())
    }

    /// Makes `files` keep what an aggregate keeps (see `walks_aggregates`).
    fn keep_as_aggregates_do(&self, files: &mut Files) {
        if self.walks_aggregates() {
            files.keep_only_unwalked();
        }
    }

    /// What an aggregate read of `containers` takes once for all of them:
    /// a walk of the cgroups and a snapshot of the eBPF maps, each when it
    /// pays; their CPU time counted.
    pub fn begin_pass(&self, containers: usize) -> Pass {
        let walked = self.walk(containers);
        let started = thread_cpu();
        let net = self.net.as_ref().and_then(|net| net.snapshot(containers));
        self.spent
            .add(Source::Ebpf, thread_cpu().saturating_sub(started));
        if net.is_some() {
            self.spent.count_snapshot();
        }
        Pass { walked, net }
    }

    /// One walk of the cgroups for an aggregate read of `containers`, its
    /// CPU time counted; `None` when the walk is off, not available, or
    /// would cost more than it spares.
    fn walk(&self, containers: usize) -> Option<Walked> {
        let walker = self.walker.as_ref().filter(|w| w.pays_for(containers))?;
        let started = thread_cpu();
        let walked = walker.walk();
        self.spent
            .add(Source::CgroupWalk, thread_cpu().saturating_sub(started));
        match walked {
            Ok(walked) => Some(walked),
            // Said once when it went; this aggregate reads the files.
            Err(WalkError::Unavailable(_)) => None,
            Err(e) => {
                log::warn!("{e}; this read takes every value from cgroupfs");
                None
            }
        }
    }

    /// Before an aggregate read. A cold one (the first, or the first after
    /// a quiet spell) records the counters of the rates it will serve that
    /// have nothing to compute against and waits one window once, rather
    /// than once per container; a warm one leaves newcomers' rates out
    /// until the next (see `rate`). Returns whether it waited.
    pub fn prime_rates(&self, containers: &[Arc<Metered>]) -> bool {
        if !self.rates.aggregate_begins() {
            return false;
        }
        let mut missing = Vec::new();
        let mut files = Files::default();
        for c in containers {
            let available = self.available(c);
            let wants = |id| available.contains(&id);
            let cpu = (c.slot, RateCounter::CpuUsage);
            if wants(M::CpuMillicores) && !self.rates.ready(cpu) {
                files.reset(&c.kept);
                if let Some(usage) = cpu_usage_usec(&self.layout, c, &mut files) {
                    missing.push((cpu, usage));
                }
            }
            let (tx, rx) = ((c.slot, RateCounter::NetTx), (c.slot, RateCounter::NetRx));
            if wants(M::NetTxBps) && !(self.rates.ready(tx) && self.rates.ready(rx)) {
                if let Some(totals) = net_totals(self.net.as_deref(), c) {
                    missing.push((tx, totals.net.tx_bytes));
                    missing.push((rx, totals.net.rx_bytes));
                }
            }
        }
        self.rates.prime(missing)
    }

    /// Forgets the rates of cgroups that went: `live` says which slots are
    /// still served.
    pub fn forget_rates(&self, live: impl Fn(Slot) -> bool) {
        self.rates.retain(|(slot, _)| live(*slot));
    }

    /// The metrics this host provides for `container`, hence its files. A
    /// cgroup group whose files are absent provides nothing; a malformed one
    /// keeps its files so that reading them reports the error.
    pub fn available<'c>(&self, container: &'c Metered) -> &'c [MetricId] {
        container.available_with(|| {
            let mut sample = Sample::default();
            let mut files = Files::new(&container.kept);
            // Learning which files there are opens every one; those the
            // walk answers for aggregates are kept only once a single-file
            // read reads them.
            self.keep_as_aggregates_do(&mut files);
            let mut broken: HashSet<Group> = HashSet::new();
            let groups = groups_of(METRICS.iter().map(|m| m.id));
            for group in groups.into_iter().filter(|g| g.is_cgroupfs()) {
                if let Err(e) = read_group(
                    &self.layout,
                    &container.dirs,
                    group,
                    &mut sample,
                    &mut files,
                ) {
                    if !matches!(e, SourceError::Vanished(_)) {
                        log::warn!("container {}: {e}", container.name);
                        broken.insert(group);
                    }
                }
            }
            let has_cpu = sample.get(M::CpuUsageUsec).is_some();
            // A container that had a v2 directory keeps its network files
            // when a teardown removes that directory before the v1 ones:
            // reading them then fails as vanished, which leaves the whole
            // container out of an aggregate, as for any ended container.
            // Listed without them, it would show in `metric` with no
            // network counters, and a bill read then would miss them.
            let has_net =
                self.net.is_some() && (container.dirs.v2.is_some() || container.net_id.is_some());
            METRICS
                .iter()
                .filter(|m| match m.group {
                    Group::CpuRate => has_cpu,
                    Group::NetTraffic | Group::NetRate | Group::NetConn => has_net,
                    group => sample.get(m.id).is_some() || broken.contains(&group),
                })
                .map(|m| m.id)
                .collect()
        })
    }

    /// Reads one group; errors are the caller's to report.
    pub fn read(
        &self,
        container: &Metered,
        group: Group,
        out: &mut Sample,
    ) -> Result<(), SourceError> {
        self.read_cached(container, group, out, &mut Scratch::new(container))
    }

    /// Reads one group of a container whose last process left: no more of
    /// its files are kept open than an aggregate keeps, as nobody reads
    /// them one by one for long.
    pub fn read_final(
        &self,
        container: &Metered,
        group: Group,
        out: &mut Sample,
    ) -> Result<(), SourceError> {
        let mut scratch = Scratch::new(container);
        self.keep_as_aggregates_do(&mut scratch.files);
        self.read_cached(container, group, out, &mut scratch)
    }

    /// Every available metric of one container. A malformed source is
    /// logged and left out; a vanished cgroup is an error.
    pub fn sample(&self, container: &Metered) -> Result<Sample, SourceError> {
        self.sample_with(container, &mut Scratch::new(container))
    }

    /// [`Sampler::sample`] of each container, leaving out those that vanish;
    /// one buffer serves them all, and `pass` answers what it can.
    /// The CPU time it takes is added to [`Sampler::spent`] by source.
    pub fn sample_each(
        &self,
        containers: &[Arc<Metered>],
        pass: &Pass,
    ) -> Vec<(Arc<Metered>, Sample)> {
        let mut scratch = Scratch::default();
        scratch.files.use_walk(pass.walked.as_ref());
        scratch.snapshot = pass.net.as_ref();
        self.keep_as_aggregates_do(&mut scratch.files);
        let mut clock = Clock::default();
        let samples = containers
            .iter()
            .filter_map(|c| {
                scratch.reset(c);
                Some((
                    c.clone(),
                    self.sample_timed(c, &mut scratch, Some(&mut clock)).ok()?,
                ))
            })
            .collect();
        for source in Source::ALL {
            self.spent.add(source, clock[source as usize]);
        }
        self.spent.add_walked_files(scratch.files.take_answered());
        samples
    }

    fn sample_with<'c>(
        &self,
        container: &'c Metered,
        scratch: &mut Scratch<'c>,
    ) -> Result<Sample, SourceError> {
        self.sample_timed(container, scratch, None)
    }

    /// A sample, cgroup files first and then the eBPF maps, with the CPU
    /// time each took added to `clock` when given.
    fn sample_timed<'c>(
        &self,
        container: &'c Metered,
        scratch: &mut Scratch<'c>,
        mut clock: Option<&mut Clock>,
    ) -> Result<Sample, SourceError> {
        let groups = groups_of(self.available(container).iter().copied());
        let mut out = Sample::default();
        let mut last = clock.is_some().then(thread_cpu);
        for source in [Source::CgroupFiles, Source::Ebpf] {
            let from_ebpf = source == Source::Ebpf;
            for &group in groups.iter().filter(|g| g.reads_ebpf() == from_ebpf) {
                match self.read_cached(container, group, &mut out, scratch) {
                    Ok(()) => {}
                    Err(e @ SourceError::Vanished(_)) => return Err(e),
                    Err(e) => log::warn!("container {}: {e}", container.name),
                }
            }
            if let (Some(clock), Some(then)) = (clock.as_deref_mut(), last) {
                let now = thread_cpu();
                clock[source as usize] += now.saturating_sub(then);
                last = Some(now);
            }
        }
        Ok(out)
    }

    fn read_cached<'c>(
        &self,
        c: &'c Metered,
        group: Group,
        out: &mut Sample,
        scratch: &mut Scratch<'c>,
    ) -> Result<(), SourceError> {
        let vanished =
            || SourceError::Vanished(c.dirs.v2.clone().unwrap_or_else(|| c.cgroup.clone()));
        // A rate reuses what this sample read (CPU usage, the eBPF totals)
        // unless it had to wait, which makes that value stale.
        match group {
            Group::CpuRate => {
                let files = &mut scratch.files;
                let usec_per_second = self
                    .rates
                    .per_second((c.slot, RateCounter::CpuUsage), scratch.may_wait, |stale| {
                        if stale {
                            files.forget();
                        }
                        cpu_usage_usec(&self.layout, c, files)
                    })
                    .ok_or_else(vanished)?;
                out.set(
                    M::CpuMillicores,
                    usec_per_second
                        .value()
                        .map(|usec| (usec / 1000.0).round() as u64),
                );
            }
            Group::NetRate => {
                for (id, counter, pick) in [
                    (M::NetTxBps, RateCounter::NetTx, tx as fn(&Totals) -> u64),
                    (M::NetRxBps, RateCounter::NetRx, rx),
                ] {
                    let may_wait = scratch.may_wait;
                    let per_second = self
                        .rates
                        .per_second((c.slot, counter), may_wait, |stale| {
                            if stale {
                                scratch.totals = None;
                            }
                            scratch.totals(self.net.as_deref(), c).map(|t| pick(&t))
                        })
                        .ok_or_else(vanished)?;
                    out.set(id, per_second.value().map(|rate| rate.round() as u64));
                }
            }
            Group::NetTraffic | Group::NetConn => {
                let t = scratch
                    .totals(self.net.as_deref(), c)
                    .ok_or_else(vanished)?;
                let classes = self.net.as_deref().map(|n| n.classes());
                net_values(&t, classes, group, out);
            }
            group => read_group(&self.layout, &c.dirs, group, out, &mut scratch.files)?,
        }
        Ok(())
    }

    /// The eBPF health counters, when network accounting runs.
    /// The destination classes traffic is split by, when configured.
    pub fn classes(&self) -> Option<&Classes> {
        self.net
            .as_deref()
            .map(|n| n.classes())
            .filter(|c| !c.is_empty())
    }

    pub fn health(&self) -> Option<[u64; cgmetric_common::health::COUNT as usize]> {
        self.net.as_ref().map(|n| n.health())
    }
}

/// CPU time one thread spent sampling, by [`Source`] (rendering stays 0).
type Clock = [Duration; Source::ALL.len()];

/// What an aggregate read takes once and shares, read-only, with every
/// thread sampling its containers.
pub struct Pass {
    walked: Option<Walked>,
    net: Option<Snapshot>,
}

/// What one sample has read so far: each source (a cgroup file, the eBPF
/// totals) is read once however many groups use it.
#[derive(Default)]
struct Scratch<'c> {
    totals: Option<Totals>,
    /// The aggregate's snapshot of the eBPF maps, if it took one.
    snapshot: Option<&'c Snapshot>,
    files: Files<'c>,
    /// Whether a rate with nothing to compute against may wait a window:
    /// yes for one container's read, no within an aggregate (primed before,
    /// so only containers found since lack one; they answer on the next).
    may_wait: bool,
}

impl<'c> Scratch<'c> {
    fn new(container: &'c Metered) -> Scratch<'c> {
        Scratch {
            totals: None,
            snapshot: None,
            files: Files::new(&container.kept),
            may_wait: true,
        }
    }

    fn reset(&mut self, container: &'c Metered) {
        self.totals = None;
        self.files.reset(&container.kept);
    }

    /// The container's eBPF totals, read once per sample; `None` when its
    /// cgroup is gone.
    fn totals(&mut self, net: Option<&Net>, container: &Metered) -> Option<Totals> {
        if self.totals.is_none() {
            self.totals = match (net, self.snapshot) {
                (Some(net), Some(snapshot)) => {
                    net.totals_in(snapshot, container.dirs.v2.as_deref()?)
                }
                _ => net_totals(net, container),
            };
        }
        self.totals
    }
}

/// The values of `group` (`NetTraffic` or `NetConn`) in `t`.
/// With `NetTraffic`, the bytes of each of `classes` too.
pub fn net_values(t: &Totals, classes: Option<&Classes>, group: Group, out: &mut Sample) {
    if group == Group::NetTraffic {
        out.set(M::NetBytesTx, Some(t.net.tx_bytes));
        out.set(M::NetBytesRx, Some(t.net.rx_bytes));
        out.set(M::NetPacketsTx, Some(t.net.tx_packets));
        out.set(M::NetPacketsRx, Some(t.net.rx_packets));
        out.classes = classes
            .map(|classes| {
                classes
                    .names()
                    .enumerate()
                    .map(|(index, _)| {
                        let (tx, rx) = t.class_bytes(classes, index);
                        ClassBytes {
                            class: classes.shared_name(index),
                            tx,
                            rx,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
    } else {
        let conn = t.conn;
        out.set(M::NetConnectionsTotal, Some(conn.established));
        out.set(M::NetConnectionsClosed, Some(conn.closed));
        out.set(
            M::NetConnectionsActive,
            Some(conn.established.saturating_sub(conn.closed)),
        );
        let avg_ms = conn.lifetime_ns.checked_div(conn.closed).unwrap_or(0) / 1_000_000;
        out.set(M::NetConnectionLifetimeAvgMs, Some(avg_ms));
        out.set(M::NetTcpRetransmits, Some(conn.retransmits));
    }
}

fn tx(t: &Totals) -> u64 {
    t.net.tx_bytes
}

fn rx(t: &Totals) -> u64 {
    t.net.rx_bytes
}

fn cpu_usage_usec<'c>(
    layout: &Layout,
    container: &'c Metered,
    files: &mut Files<'c>,
) -> Option<u64> {
    crate::cgroup::read::cpu_usage_usec(layout, &container.dirs, files)
        .ok()
        .flatten()
}

fn net_totals(net: Option<&Net>, container: &Metered) -> Option<Totals> {
    // A vanished directory has no subtree: totals() says None.
    net?.totals(container.dirs.v2.as_deref()?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::containers::discovery::{Discovery, Globs};
    use crate::containers::registry::Registry;

    #[test]
    fn availability_follows_the_host() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
        let layout = Layout::from_tree(&root).unwrap();
        let discovery = Discovery::new(Globs::new(&["tenants/*".into()]).unwrap(), None);
        let registry = Arc::new(Registry::new(layout, discovery, &[]));
        registry.refresh();
        let sampler = Sampler::new(registry.layout().clone(), Duration::from_millis(20), None);
        let files = |name: &str| -> Vec<&str> {
            let c = registry.by_name(name).unwrap();
            sampler.available(&c).iter().map(|m| m.def().file).collect()
        };
        let alpha = files("alpha");
        assert!(alpha.contains(&"cpu_millicores"));
        assert!(alpha.contains(&"memory_swap"));
        assert!(!alpha.contains(&"memory_pgpgin"), "v2 has no pgpgin");
        assert!(
            !alpha.contains(&"net_bytes_tx"),
            "no eBPF, no network files"
        );
        let beta = files("beta");
        assert!(!beta.contains(&"cpu_nr_periods"), "cpu controller is off");
        assert!(!beta.contains(&"io_read_bytes"));
        // broken's malformed files keep their names: reading them says why.
        assert!(files("broken").contains(&"memory_usage"));
    }
}

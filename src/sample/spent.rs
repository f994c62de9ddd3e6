//! What aggregate reads (`metric`, `metrics.prom`) cost the daemon, by
//! source: CPU time walking the cgroups (one eBPF pass per hierarchy),
//! reading cgroup files, reading the eBPF maps, and rendering the text. `metrics.prom` serves the totals, so an operator can
//! see what being scraped costs (`rate()` of each over `rate()` of the
//! reads is one scrape's cost) and where it goes, and the benchmark reports
//! the split from the same counters.
//!
//! Thread CPU time rather than wall time: on a busy host a thread waiting
//! for a CPU would be charged for the wait. It costs a system call, so it is
//! taken three times per container (before, between and after the two
//! kinds of source), not per file.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Where an aggregate read's time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    CgroupWalk,
    CgroupFiles,
    Ebpf,
    Render,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::CgroupWalk,
        Source::CgroupFiles,
        Source::Ebpf,
        Source::Render,
    ];

    /// The value of the `source` label.
    pub fn label(self) -> &'static str {
        match self {
            Source::CgroupWalk => "cgroup_walk",
            Source::CgroupFiles => "cgroup_files",
            Source::Ebpf => "ebpf",
            Source::Render => "render",
        }
    }
}

/// Totals since the daemon started, in nanoseconds of thread CPU time.
#[derive(Default)]
pub struct Spent {
    by_source: [AtomicU64; Source::ALL.len()],
    reads: AtomicU64,
    walked_files: AtomicU64,
    snapshots: AtomicU64,
}

impl Spent {
    pub fn add(&self, source: Source, time: Duration) {
        self.by_source[source as usize].fetch_add(time.as_nanos() as u64, Relaxed);
    }

    /// One aggregate read done.
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Relaxed);
    }

    pub fn total(&self, source: Source) -> Duration {
        Duration::from_nanos(self.by_source[source as usize].load(Relaxed))
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Relaxed)
    }

    /// Cgroup files answered from the cgroup walk.
    pub fn add_walked_files(&self, files: u64) {
        self.walked_files.fetch_add(files, Relaxed);
    }

    pub fn walked_files(&self) -> u64 {
        self.walked_files.load(Relaxed)
    }

    /// An aggregate read took its eBPF counters from one snapshot of the maps.
    pub fn count_snapshot(&self) {
        self.snapshots.fetch_add(1, Relaxed);
    }

    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Relaxed)
    }
}

/// The calling thread's CPU time so far.
pub fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_time_counts_work_not_sleep() {
        let start = thread_cpu();
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu() - start;
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - start < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(slept < Duration::from_millis(10), "{slept:?} while asleep");
    }

    #[test]
    fn totals_add_up_by_source() {
        let spent = Spent::default();
        spent.add(Source::Ebpf, Duration::from_micros(3));
        spent.add(Source::Ebpf, Duration::from_micros(4));
        spent.add(Source::Render, Duration::from_micros(1));
        spent.count_read();
        assert_eq!(spent.total(Source::Ebpf), Duration::from_micros(7));
        assert_eq!(spent.total(Source::CgroupFiles), Duration::ZERO);
        assert_eq!(spent.total(Source::Render), Duration::from_micros(1));
        assert_eq!(spent.reads(), 1);
    }
}

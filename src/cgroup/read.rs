//! Reading a container's values from cgroupfs, one [`Group`] of source files
//! at a time.
//!
//! The backend for each group is chosen from the layout: a mounted v1
//! controller wins (hybrid hosts keep CPU and memory there), otherwise the v2
//! directory is read. A file that is absent while its cgroup exists means the
//! host does not provide those metrics; they stay `None` and get no file.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use super::files::Files;
use super::files::SourceError;
use super::parse::{self, ParseError};
use super::{CgroupDirs, Controller, Layout};
use crate::metrics::{Group, MetricId as M, Sample};

type Result<T> = std::result::Result<T, SourceError>;

/// One source file of one cgroup directory.
struct Source<'a> {
    dir: &'a Path,
    file: &'static str,
}

impl<'a> Source<'a> {
    /// Where the file's text is in `files`, or `None` when the cgroup exists
    /// but has no such file.
    fn range(&self, files: &mut Files<'a>) -> Result<Option<Range<usize>>> {
        files.range(self.dir, self.file)
    }

    /// Parses the file with `parse`, keeping the path for the error.
    fn parse<T>(
        &self,
        files: &mut Files<'a>,
        parse: impl FnOnce(&str) -> std::result::Result<T, ParseError>,
    ) -> Result<Option<T>> {
        self.range(files)?
            .map(|range| parse(files.slice(range)).map_err(|source| self.malformed(source)))
            .transpose()
    }

    /// A flat keyed file: `apply` gets the values of `keys`, in their order.
    fn keyed<const N: usize>(
        &self,
        files: &mut Files<'a>,
        keys: [&str; N],
        apply: impl FnOnce([Option<u64>; N]),
    ) -> Result<()> {
        if let Some(range) = self.range(files)? {
            let values =
                parse::keyed(files.slice(range), keys).map_err(|source| self.malformed(source))?;
            apply(values);
        }
        Ok(())
    }

    fn malformed(&self, source: ParseError) -> SourceError {
        SourceError::Malformed {
            path: self.dir.join(self.file),
            source,
        }
    }
}

/// Where one controller's files are for this cgroup: the v1 hierarchy when the
/// controller is mounted there, else the v2 directory.
enum Backend<'a> {
    V1(&'a Path),
    V2(&'a Path),
}

fn backend<'a>(
    layout: &Layout,
    dirs: &'a CgroupDirs,
    controller: Controller,
) -> Option<Backend<'a>> {
    if layout.v1(controller).is_some() {
        dirs.v1(controller).map(Backend::V1)
    } else {
        dirs.v2.as_deref().map(Backend::V2)
    }
}

fn src<'a>(dir: &'a Path, file: &'static str) -> Source<'a> {
    Source { dir, file }
}

/// USER_HZ, the unit of v1 `cpuacct.stat`.
fn user_hz() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *HZ.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    })
}

/// Reads the files of `group` for one cgroup into `out`. Derived groups
/// (rates) are not read here.
pub fn read_group<'a>(
    layout: &Layout,
    dirs: &'a CgroupDirs,
    group: Group,
    out: &mut Sample,
    files: &mut Files<'a>,
) -> Result<()> {
    let controller = match group {
        Group::CpuUsage => Controller::Cpuacct,
        Group::CpuRate | Group::NetTraffic | Group::NetRate | Group::NetConn => return Ok(()),
        // Pressure files are core cgroup v2 files, in every non-root v2
        // cgroup whatever its controllers (the v2 tree of a hybrid host
        // too); cgroup v1 has none.
        Group::CpuPressure | Group::MemoryPressure | Group::IoPressure => {
            return match dirs.v2.as_deref() {
                Some(dir) => read_v2(dir, group, out, files),
                None => Ok(()),
            };
        }
        Group::CpuThrottle | Group::CpuLimit => Controller::Cpu,
        Group::MemoryUsage
        | Group::MemoryPeak
        | Group::MemoryStat
        | Group::MemorySwap
        | Group::MemoryLimit
        | Group::MemoryOom
        | Group::MemoryEvents => Controller::Memory,
        Group::Io => Controller::Blkio,
        Group::PidsCurrent | Group::PidsLimit => Controller::Pids,
    };
    let Some(backend) = backend(layout, dirs, controller) else {
        return Ok(());
    };
    match backend {
        Backend::V1(dir) => read_v1(dir, group, out, files),
        Backend::V2(dir) => read_v2(dir, group, out, files),
    }
}

/// CPU time used, in µs, from the one file that has it: what the rate
/// sampler reads for every container twice a window, so nothing more. A
/// file `files` already holds is not read again.
pub fn cpu_usage_usec<'a>(
    layout: &Layout,
    dirs: &'a CgroupDirs,
    files: &mut Files<'a>,
) -> Result<Option<u64>> {
    match backend(layout, dirs, Controller::Cpuacct) {
        None => Ok(None),
        Some(Backend::V1(dir)) => Ok(src(dir, "cpuacct.usage")
            .parse(files, parse::single)?
            .map(|ns| ns / 1000)),
        Some(Backend::V2(dir)) => {
            let mut usage = None;
            src(dir, "cpu.stat").keyed(files, ["usage_usec"], |[u]| usage = u)?;
            Ok(usage)
        }
    }
}

fn read_v2<'a>(dir: &'a Path, group: Group, out: &mut Sample, files: &mut Files<'a>) -> Result<()> {
    match group {
        Group::CpuUsage => src(dir, "cpu.stat").keyed(
            files,
            ["usage_usec", "user_usec", "system_usec"],
            |[usage, user, system]| {
                out.set(M::CpuUsageUsec, usage);
                out.set(M::CpuUserUsec, user);
                out.set(M::CpuSystemUsec, system);
            },
        )?,
        Group::CpuThrottle => src(dir, "cpu.stat").keyed(
            files,
            ["nr_periods", "nr_throttled", "throttled_usec"],
            |[periods, throttled, throttled_usec]| {
                out.set(M::CpuNrPeriods, periods);
                out.set(M::CpuNrThrottled, throttled);
                out.set(M::CpuThrottledUsec, throttled_usec);
            },
        )?,
        Group::CpuLimit => {
            if let Some(limit) = src(dir, "cpu.max").parse(files, parse::cpu_max)? {
                out.set_value(M::CpuLimitMillicores, limit.into());
            }
        }
        Group::MemoryUsage => out.set(
            M::MemoryUsage,
            src(dir, "memory.current").parse(files, parse::single)?,
        ),
        Group::MemoryStat => {
            let usage = src(dir, "memory.current").parse(files, parse::single)?;
            let keys = MEMORY_STAT.map(|(_, v2, _)| v2);
            memory_stat(dir, keys, usage, out, files)?
        }
        Group::MemorySwap => out.set(
            M::MemorySwap,
            src(dir, "memory.swap.current").parse(files, parse::single)?,
        ),
        Group::MemoryLimit => {
            if let Some(limit) = src(dir, "memory.max").parse(files, parse::limit)? {
                out.set_value(M::MemoryLimit, limit.into());
            }
        }
        Group::MemoryOom => src(dir, "memory.events").keyed(files, ["oom_kill"], |[kills]| {
            out.set(M::MemoryOomKills, kills)
        })?,
        Group::MemoryPeak => out.set(
            M::MemoryPeak,
            src(dir, "memory.peak").parse(files, parse::single)?,
        ),
        Group::MemoryEvents => src(dir, "memory.events").keyed(
            files,
            ["low", "high", "max", "oom", "oom_group_kill"],
            |[low, high, max, oom, group_kills]| {
                out.set(M::MemoryLowEvents, low);
                out.set(M::MemoryHighEvents, high);
                out.set(M::MemoryMaxEvents, max);
                out.set(M::MemoryOomEvents, oom);
                out.set(M::MemoryOomGroupKills, group_kills);
            },
        )?,
        Group::CpuPressure => pressure(
            dir,
            "cpu.pressure",
            [M::CpuPressureSomeUsec, M::CpuPressureFullUsec],
            out,
            files,
        )?,
        Group::MemoryPressure => pressure(
            dir,
            "memory.pressure",
            [M::MemoryPressureSomeUsec, M::MemoryPressureFullUsec],
            out,
            files,
        )?,
        Group::IoPressure => pressure(
            dir,
            "io.pressure",
            [M::IoPressureSomeUsec, M::IoPressureFullUsec],
            out,
            files,
        )?,
        Group::Io => {
            if let Some(io) = src(dir, "io.stat").parse(files, parse::io_stat)? {
                out.set(M::IoReadBytes, Some(io.read_bytes));
                out.set(M::IoWriteBytes, Some(io.write_bytes));
                out.set(M::IoReadOps, Some(io.read_ops));
                out.set(M::IoWriteOps, Some(io.write_ops));
            }
        }
        Group::PidsCurrent => out.set(
            M::PidsCurrent,
            src(dir, "pids.current").parse(files, parse::single)?,
        ),
        Group::PidsLimit => {
            if let Some(limit) = src(dir, "pids.max").parse(files, parse::limit)? {
                out.set_value(M::PidsLimit, limit.into());
            }
        }
        Group::CpuRate | Group::NetTraffic | Group::NetRate | Group::NetConn => {}
    }
    Ok(())
}

fn read_v1<'a>(dir: &'a Path, group: Group, out: &mut Sample, files: &mut Files<'a>) -> Result<()> {
    match group {
        Group::CpuUsage => {
            let usage_ns = src(dir, "cpuacct.usage").parse(files, parse::single)?;
            out.set(M::CpuUsageUsec, usage_ns.map(|ns| ns / 1000));
            let to_usec = |ticks: u64| ticks.saturating_mul(1_000_000) / user_hz();
            src(dir, "cpuacct.stat").keyed(files, ["user", "system"], |[user, system]| {
                out.set(M::CpuUserUsec, user.map(to_usec));
                out.set(M::CpuSystemUsec, system.map(to_usec));
            })?
        }
        Group::CpuThrottle => src(dir, "cpu.stat").keyed(
            files,
            ["nr_periods", "nr_throttled", "throttled_time"],
            |[periods, throttled, throttled_ns]| {
                out.set(M::CpuNrPeriods, periods);
                out.set(M::CpuNrThrottled, throttled);
                out.set(M::CpuThrottledUsec, throttled_ns.map(|ns| ns / 1000));
            },
        )?,
        Group::CpuLimit => {
            let quota = src(dir, "cpu.cfs_quota_us");
            let (quota_text, period_text) = (
                quota.range(files)?,
                src(dir, "cpu.cfs_period_us").range(files)?,
            );
            if let (Some(q), Some(p)) = (quota_text, period_text) {
                let limit = parse::cfs_quota(files.slice(q), files.slice(p))
                    .map_err(|source| quota.malformed(source))?;
                out.set_value(M::CpuLimitMillicores, limit.into());
            }
        }
        Group::MemoryUsage => out.set(
            M::MemoryUsage,
            src(dir, "memory.usage_in_bytes").parse(files, parse::single)?,
        ),
        Group::MemoryStat => {
            let usage = src(dir, "memory.usage_in_bytes").parse(files, parse::single)?;
            let keys = MEMORY_STAT.map(|(_, _, v1)| v1);
            memory_stat(dir, keys, usage, out, files)?
        }
        Group::MemorySwap => src(dir, "memory.stat")
            .keyed(files, ["total_swap"], |[swap]| out.set(M::MemorySwap, swap))?,
        Group::MemoryLimit => {
            if let Some(limit) = src(dir, "memory.limit_in_bytes").parse(files, parse::limit)? {
                out.set_value(M::MemoryLimit, limit.into());
            }
        }
        Group::MemoryOom => {
            src(dir, "memory.oom_control").keyed(files, ["oom_kill"], |[kills]| {
                out.set(M::MemoryOomKills, kills)
            })?
        }
        Group::MemoryPeak => out.set(
            M::MemoryPeak,
            src(dir, "memory.max_usage_in_bytes").parse(files, parse::single)?,
        ),
        // v1 counts only charges that failed at the limit (as runc and
        // cAdvisor read v2's `max` as the failcnt); it has no memory.low or
        // memory.high, no count of OOM invocations (`under_oom` in
        // memory.oom_control is a state, not a count) and no group kill.
        Group::MemoryEvents => out.set(
            M::MemoryMaxEvents,
            src(dir, "memory.failcnt").parse(files, parse::single)?,
        ),
        Group::Io => {
            // The _recursive files include descendants; old kernels lack them.
            let bytes = first_present(
                dir,
                [
                    "blkio.throttle.io_service_bytes_recursive",
                    "blkio.throttle.io_service_bytes",
                ],
                files,
            )?;
            let ops = first_present(
                dir,
                [
                    "blkio.throttle.io_serviced_recursive",
                    "blkio.throttle.io_serviced",
                ],
                files,
            )?;
            if let (Some(bytes), Some(ops)) = (bytes, ops) {
                let (read_bytes, write_bytes) = bytes
                    .parse(files, parse::blkio_throttle)?
                    .unwrap_or_default();
                let (read_ops, write_ops) =
                    ops.parse(files, parse::blkio_throttle)?.unwrap_or_default();
                out.set(M::IoReadBytes, Some(read_bytes));
                out.set(M::IoWriteBytes, Some(write_bytes));
                out.set(M::IoReadOps, Some(read_ops));
                out.set(M::IoWriteOps, Some(write_ops));
            }
        }
        Group::PidsCurrent => out.set(
            M::PidsCurrent,
            src(dir, "pids.current").parse(files, parse::single)?,
        ),
        Group::PidsLimit => {
            if let Some(limit) = src(dir, "pids.max").parse(files, parse::limit)? {
                out.set_value(M::PidsLimit, limit.into());
            }
        }
        // No v1 pressure files: read_group reads these from the v2 tree.
        Group::CpuPressure | Group::MemoryPressure | Group::IoPressure => {}
        Group::CpuRate | Group::NetTraffic | Group::NetRate | Group::NetConn => {}
    }
    Ok(())
}

/// A pressure file's `some` and `full` totals into `ids`.
fn pressure<'a>(
    dir: &'a Path,
    file: &'static str,
    [some, full]: [M; 2],
    out: &mut Sample,
    files: &mut Files<'a>,
) -> Result<()> {
    if let Some(p) = src(dir, file).parse(files, parse::pressure)? {
        out.set(some, p.some_usec);
        out.set(full, p.full_usec);
    }
    Ok(())
}

/// The first of `files` the cgroup has.
fn first_present<'a>(
    dir: &'a Path,
    candidates: [&'static str; 2],
    files: &mut Files<'a>,
) -> Result<Option<Source<'a>>> {
    for file in candidates {
        if files.range(dir, file)?.is_some() {
            return Ok(Some(src(dir, file)));
        }
    }
    Ok(None)
}

/// The `memory.stat` lines cgmetric reads: the metric, the v2 key and the
/// v1 key (v1's total_ lines include every descendant). v2 has no pgpgin or
/// pgpgout, so those have no file there.
const MEMORY_STAT: [(Option<M>, &str, &str); 12] = [
    (Some(M::MemoryRss), "anon", "total_rss"),
    (Some(M::MemoryCache), "file", "total_cache"),
    (Some(M::MemoryRssHuge), "anon_thp", "total_rss_huge"),
    (Some(M::MemoryShmem), "shmem", "total_shmem"),
    (
        Some(M::MemoryMappedFile),
        "file_mapped",
        "total_mapped_file",
    ),
    (Some(M::MemoryDirty), "file_dirty", "total_dirty"),
    (
        Some(M::MemoryWriteback),
        "file_writeback",
        "total_writeback",
    ),
    (Some(M::MemoryPgfault), "pgfault", "total_pgfault"),
    (Some(M::MemoryPgmajfault), "pgmajfault", "total_pgmajfault"),
    (Some(M::MemoryPgpgin), "pgpgin", "total_pgpgin"),
    (Some(M::MemoryPgpgout), "pgpgout", "total_pgpgout"),
    // No metric of its own: the working set is usage minus it.
    (None, "inactive_file", "total_inactive_file"),
];

/// `memory.stat` read with `keys`, [`MEMORY_STAT`]'s names for this version.
fn memory_stat<'a>(
    dir: &'a Path,
    keys: [&str; MEMORY_STAT.len()],
    usage: Option<u64>,
    out: &mut Sample,
    files: &mut Files<'a>,
) -> Result<()> {
    src(dir, "memory.stat").keyed(files, keys, |values| {
        for ((id, _, _), value) in MEMORY_STAT.iter().zip(values) {
            match id {
                Some(id) => out.set(*id, value),
                None => out.set(M::MemoryWorkingSet, working_set(usage, value)),
            }
        }
    })
}

/// Usage minus inactive file cache, floored at zero (the kubelet's definition).
fn working_set(usage: Option<u64>, inactive_file: Option<u64>) -> Option<u64> {
    Some(usage?.saturating_sub(inactive_file.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One group, read on its own.
    fn read(layout: &Layout, dirs: &CgroupDirs, group: Group, out: &mut Sample) -> Result<()> {
        read_group(layout, dirs, group, out, &mut Files::default())
    }
    use crate::metrics::{Value::*, METRICS};

    const ALL_GROUPS: [Group; 16] = [
        Group::CpuUsage,
        Group::CpuThrottle,
        Group::CpuLimit,
        Group::CpuPressure,
        Group::MemoryUsage,
        Group::MemoryPeak,
        Group::MemoryStat,
        Group::MemorySwap,
        Group::MemoryLimit,
        Group::MemoryOom,
        Group::MemoryEvents,
        Group::MemoryPressure,
        Group::Io,
        Group::IoPressure,
        Group::PidsCurrent,
        Group::PidsLimit,
    ];

    const PRESSURE: [M; 6] = [
        M::CpuPressureSomeUsec,
        M::CpuPressureFullUsec,
        M::MemoryPressureSomeUsec,
        M::MemoryPressureFullUsec,
        M::IoPressureSomeUsec,
        M::IoPressureFullUsec,
    ];

    fn fixture(tree: &str, cgroup: &str) -> (Layout, CgroupDirs) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(tree);
        let layout = Layout::from_tree(&root).unwrap();
        let dirs = CgroupDirs::resolve(&layout, Path::new(cgroup));
        (layout, dirs)
    }

    fn sample(tree: &str, cgroup: &str) -> Sample {
        let (layout, dirs) = fixture(tree, cgroup);
        let mut sample = Sample::default();
        for group in ALL_GROUPS {
            read(&layout, &dirs, group, &mut sample).unwrap();
        }
        sample
    }

    /// Both fixtures describe the same container state, so v1 and v2 must
    /// read the same values except where the catalogue says they differ.
    fn expect_alpha(s: &Sample) {
        assert_eq!(s.get(M::CpuUsageUsec), Some(Count(2_500_000)));
        assert_eq!(s.get(M::CpuUserUsec), Some(Count(2_000_000)));
        assert_eq!(s.get(M::CpuSystemUsec), Some(Count(500_000)));
        assert_eq!(s.get(M::CpuLimitMillicores), Some(Count(500)));
        assert_eq!(s.get(M::CpuNrPeriods), Some(Count(120)));
        assert_eq!(s.get(M::CpuNrThrottled), Some(Count(7)));
        assert_eq!(s.get(M::CpuThrottledUsec), Some(Count(350_000)));
        assert_eq!(s.get(M::MemoryUsage), Some(Count(73_400_320)));
        assert_eq!(
            s.get(M::MemoryWorkingSet),
            Some(Count(73_400_320 - 4_194_304))
        );
        assert_eq!(s.get(M::MemoryRss), Some(Count(67_108_864)));
        assert_eq!(s.get(M::MemoryCache), Some(Count(6_291_456)));
        assert_eq!(s.get(M::MemoryRssHuge), Some(Count(2_097_152)));
        assert_eq!(s.get(M::MemoryShmem), Some(Count(1_048_576)));
        assert_eq!(s.get(M::MemoryMappedFile), Some(Count(2_097_152)));
        assert_eq!(s.get(M::MemoryDirty), Some(Count(4096)));
        assert_eq!(s.get(M::MemoryWriteback), Some(Count(8192)));
        assert_eq!(s.get(M::MemorySwap), Some(Count(1_048_576)));
        assert_eq!(s.get(M::MemoryPgfault), Some(Count(17000)));
        assert_eq!(s.get(M::MemoryPgmajfault), Some(Count(12)));
        assert_eq!(s.get(M::MemoryLimit), Some(Max));
        assert_eq!(s.get(M::MemoryPeak), Some(Count(75_497_472)));
        assert_eq!(s.get(M::MemoryMaxEvents), Some(Count(3)));
        assert_eq!(s.get(M::IoReadBytes), Some(Count(1_052_672)));
        assert_eq!(s.get(M::IoWriteBytes), Some(Count(4_194_304)));
        assert_eq!(s.get(M::IoReadOps), Some(Count(257)));
        assert_eq!(s.get(M::IoWriteOps), Some(Count(1024)));
        assert_eq!(s.get(M::PidsCurrent), Some(Count(3)));
        assert_eq!(s.get(M::PidsLimit), Some(Max));
    }

    #[test]
    fn v2_container() {
        let s = sample("v2", "tenants/alpha");
        expect_alpha(&s);
        assert_eq!(s.get(M::MemoryOomKills), Some(Count(1)));
        // v2 has no pgpgin/pgpgout: no value, hence no file.
        assert_eq!(s.get(M::MemoryPgpgin), None);
        assert_eq!(s.get(M::MemoryPgpgout), None);
        // memory.events beyond oom_kill, and the pressure totals.
        assert_eq!(s.get(M::MemoryLowEvents), Some(Count(2)));
        assert_eq!(s.get(M::MemoryHighEvents), Some(Count(12)));
        assert_eq!(s.get(M::MemoryOomEvents), Some(Count(1)));
        assert_eq!(s.get(M::MemoryOomGroupKills), Some(Count(0)));
        let pressure = PRESSURE.map(|id| s.get(id));
        let expected = [1_500_000, 900_000, 40_000, 25_000, 3000, 2000].map(|n| Some(Count(n)));
        assert_eq!(pressure, expected);
    }

    #[test]
    fn older_v2_kernels_lack_peak_group_kills_and_cpu_full() {
        let s = sample("v2", "tenants/beta");
        // No memory.peak (before 5.19): no file rather than a fake 0.
        assert_eq!(s.get(M::MemoryPeak), None);
        // memory.events without oom_group_kill: the others still read.
        assert_eq!(s.get(M::MemoryOomGroupKills), None);
        assert_eq!(s.get(M::MemoryMaxEvents), Some(Count(0)));
        assert_eq!(s.get(M::MemoryHighEvents), Some(Count(0)));
        // cpu.pressure with no `full` line (before 5.13).
        assert_eq!(s.get(M::CpuPressureSomeUsec), Some(Count(10)));
        assert_eq!(s.get(M::CpuPressureFullUsec), None);
        assert_eq!(s.get(M::MemoryPressureFullUsec), Some(Count(0)));
        assert_eq!(s.get(M::IoPressureSomeUsec), Some(Count(0)));
    }

    #[test]
    fn v1_container() {
        let s = sample("v1", "tenants/alpha");
        expect_alpha(&s);
        assert_eq!(s.get(M::MemoryOomKills), Some(Count(2)));
        assert_eq!(s.get(M::MemoryPgpgin), Some(Count(20000)));
        assert_eq!(s.get(M::MemoryPgpgout), Some(Count(3000)));
        // v1 has max events (memory.failcnt) and nothing else of
        // memory.events, and no pressure files without a v2 tree.
        for id in [
            M::MemoryLowEvents,
            M::MemoryHighEvents,
            M::MemoryOomEvents,
            M::MemoryOomGroupKills,
        ]
        .into_iter()
        .chain(PRESSURE)
        {
            assert_eq!(s.get(id), None, "{id:?}");
        }
    }

    #[test]
    fn hybrid_reads_v1_controllers_not_the_v2_tree() {
        let s = sample("hybrid", "tenants/alpha");
        // cpuacct.usage (7 ms), not the v2 cpu.stat's 1 usec.
        assert_eq!(s.get(M::CpuUsageUsec), Some(Count(7000)));
        assert_eq!(s.get(M::CpuUserUsec), Some(Count(1_000_000 / user_hz())));
        assert_eq!(s.get(M::CpuLimitMillicores), Some(Max));
        assert_eq!(s.get(M::MemoryUsage), Some(Count(4096)));
        // No blkio or pids hierarchy in this fixture: no values.
        assert_eq!(s.get(M::IoReadBytes), None);
        assert_eq!(s.get(M::PidsCurrent), None);
        // Memory peak and max events from the v1 memory controller...
        assert_eq!(s.get(M::MemoryPeak), Some(Count(8192)));
        assert_eq!(s.get(M::MemoryMaxEvents), Some(Count(0)));
        assert_eq!(s.get(M::MemoryHighEvents), None);
        // ...and pressure from the v2 tree, which has no controllers.
        let pressure = PRESSURE.map(|id| s.get(id));
        let expected = [2_617_677, 2_617_677, 71_447, 71_447, 5, 4].map(|n| Some(Count(n)));
        assert_eq!(pressure, expected);
    }

    #[test]
    fn absent_controller_files_provide_nothing() {
        let s = sample("v2", "tenants/beta");
        // cpu controller off: usage only, no throttling, no quota.
        assert_eq!(s.get(M::CpuUsageUsec), Some(Count(10)));
        assert_eq!(s.get(M::CpuNrPeriods), None);
        assert_eq!(s.get(M::CpuLimitMillicores), None);
        assert_eq!(s.get(M::MemorySwap), None);
        assert_eq!(s.get(M::IoReadBytes), None);
        assert_eq!(s.get(M::MemoryLimit), Some(Count(268_435_456)));
        assert_eq!(s.get(M::PidsLimit), Some(Count(100)));
        // Working set floors at zero when inactive_file exceeds usage.
        assert_eq!(s.get(M::MemoryWorkingSet), Some(Count(0)));
    }

    #[test]
    fn malformed_files_are_errors_that_name_the_file() {
        let (layout, dirs) = fixture("v2", "tenants/broken");
        let cases = [
            (Group::CpuUsage, "cpu.stat", "empty file"),
            (Group::CpuLimit, "cpu.max", "CPU period is zero"),
            (Group::MemoryUsage, "memory.current", "not a number"),
            (Group::MemoryStat, "memory.current", "not a number"),
            (Group::MemoryLimit, "memory.max", "empty file"),
            (Group::MemoryOom, "memory.events", "not a number"),
            (Group::MemoryEvents, "memory.events", "not a number"),
            (Group::MemoryPeak, "memory.peak", "not a number"),
            (Group::CpuPressure, "cpu.pressure", "malformed line"),
            (Group::MemoryPressure, "memory.pressure", "not a number"),
            (Group::IoPressure, "io.pressure", "empty file"),
            (Group::PidsLimit, "pids.max", "not a number"),
        ];
        for (group, file, reason) in cases {
            let err = read(&layout, &dirs, group, &mut Sample::default()).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, SourceError::Malformed { .. }),
                "{group:?}: {text}"
            );
            assert!(
                text.contains(file) && text.contains(reason),
                "{group:?}: {text}"
            );
        }
        // A good file beside bad ones still reads.
        let mut s = Sample::default();
        read(&layout, &dirs, Group::PidsCurrent, &mut s).unwrap();
        assert_eq!(s.get(M::PidsCurrent), Some(Count(5)));
    }

    #[test]
    fn vanished_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "").unwrap();
        std::fs::create_dir(tmp.path().join("gone")).unwrap();
        let layout = Layout::from_tree(tmp.path()).unwrap();
        let dirs = CgroupDirs::resolve(&layout, Path::new("gone"));
        std::fs::remove_dir(tmp.path().join("gone")).unwrap();
        for group in ALL_GROUPS {
            let err = read(&layout, &dirs, group, &mut Sample::default()).unwrap_err();
            assert!(matches!(err, SourceError::Vanished(_)), "{group:?}");
        }
    }

    #[test]
    fn every_cataloged_group_is_read_somewhere() {
        for def in METRICS {
            assert!(!def.group.is_cgroupfs() || ALL_GROUPS.contains(&def.group));
        }
    }
}

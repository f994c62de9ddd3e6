//! The cgroup walk: one pass of an eBPF cgroup iterator over each hierarchy
//! reads the kernel's counters (memory page counters and events, the v1 OOM
//! state, pids, CPU bandwidth and its v1 statistics) for every cgroup at
//! once, where cgroupfs costs an open, a read and a
//! close per cgroup and file. An aggregate read walks once and answers
//! those files from the walk ([`Walked::render`]), in the very text the
//! kernel would print; every other file, and any cgroup the walk did not
//! see, is read from cgroupfs as before.
//!
//! The kernel's structures have no stable layout and aya's Rust programs
//! carry no CO-RE relocations, so the program reads plain addresses at
//! offsets found in the running kernel's BTF (`btf.rs`), loaded with its
//! maps and links by `load.rs`. A field the BTF lacks is left to cgroupfs;
//! a kernel without cgroup iterators (before 6.1), or a v1 hierarchy it
//! cannot walk (before 6.2), leaves all of it to cgroupfs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgmetric_common::walk::{WalkRecord, FIELDS};
use parking_lot::Mutex;

use super::{Controller, Layout};
use btf::Offsets;
use load::{page_size, Loaded};

mod btf;
mod load;

/// Why the walk is not available; cgroupfs then serves everything.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("reading the kernel's BTF: {0}")]
    Btf(String),
    #[error("the kernel's BTF has no {0}")]
    Layout(String),
    #[error("loading the cgroup walk: {0}")]
    Load(Box<dyn std::error::Error + Send + Sync>),
    #[error("{path}: {source}")]
    Hierarchy {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no hierarchy could be walked")]
    NoHierarchy,
    #[error("running the cgroup walk: {0}")]
    Run(std::io::Error),
    #[error("the cgroup walk is not available: {0}")]
    Unavailable(String),
    #[error("starting a cgroup walk: {0}")]
    Count(aya::maps::MapError),
}

// The words a record holds, by index.
const MEM_USAGE: usize = 0;
const MEM_MAX: usize = 1;
const MEM_WATERMARK: usize = 2;
const MEM_FAILCNT: usize = 3;
const PIDS_COUNT: usize = 4;
const PIDS_LIMIT: usize = 5;
const CFS_QUOTA: usize = 6;
const CFS_PERIOD: usize = 7;
const CFS_PERIODS: usize = 8;
const CFS_THROTTLED: usize = 9;
const CFS_THROTTLED_TIME: usize = 10;
const CFS_BURSTS: usize = 11;
const CFS_BURST_TIME: usize = 12;
const OOM_KILL_DISABLE: usize = 13;
const UNDER_OOM: usize = 14;
const OOM_KILL: usize = 15;
const MEM_SWAP: usize = 16;
/// The lines of v2 `memory.events`, as many as this kernel prints.
const EVENTS: usize = 17;
const EVENT_SLOTS: usize = FIELDS - EVENTS;

/// What the walk knows of the running kernel's words.
#[derive(Debug, Clone, Default)]
pub(super) struct Words {
    /// Bit `i` set: word `i` was found in the kernel's BTF.
    configured: u64,
    /// Each word's size in bytes: 8, or less for an `int`, whose other
    /// bytes the program read too.
    sizes: [u8; FIELDS],
    /// The lines of v2 `memory.events` in the kernel's order; line `i` is
    /// word `EVENTS + i`. Empty when not learnt.
    events: Vec<String>,
}

/// Which hierarchies have a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Both: no file of these has another meaning in the other.
    Any,
    /// v1 only: v2 has a `cpu.stat` of other lines.
    V1,
    /// v2 only.
    V2,
}

/// How the kernel prints a file the walk answers.
#[derive(Debug, Clone, Copy)]
pub enum Print {
    /// A page count, printed in bytes.
    Bytes(usize),
    /// A page limit in bytes, or `max` for none (v2).
    BytesOrMax(usize),
    /// A number as it is.
    Number(usize),
    /// `pids.max`: the limit, or `max` for none.
    PidsMax,
    /// v1 `cpu.cfs_quota_us`: microseconds, -1 for none.
    QuotaUs,
    /// v1 `cpu.cfs_period_us`.
    PeriodUs,
    /// v2 `cpu.max`: quota (or `max`) and period, in microseconds.
    CpuMax,
    /// v1 `cpu.stat`: the bandwidth counters (`cpu_cfs_stat_show`), when
    /// scheduler statistics are off (on, it adds a per-CPU sum).
    CfsStat,
    /// v1 `memory.oom_control`.
    OomControl,
    /// v2 `memory.events`: the lines this kernel prints.
    Events,
}

impl Print {
    /// The words the text is made of, as a mask; `events` lines learnt.
    fn words(self, events: usize) -> u64 {
        let bits = |words: &[usize]| words.iter().fold(0u64, |mask, &i| mask | 1 << i);
        match self {
            Print::Bytes(i) | Print::BytesOrMax(i) | Print::Number(i) => bits(&[i]),
            Print::PidsMax => bits(&[PIDS_LIMIT]),
            Print::QuotaUs => bits(&[CFS_QUOTA]),
            Print::PeriodUs => bits(&[CFS_PERIOD]),
            Print::CpuMax => bits(&[CFS_QUOTA, CFS_PERIOD]),
            Print::CfsStat => bits(&[
                CFS_PERIODS,
                CFS_THROTTLED,
                CFS_THROTTLED_TIME,
                CFS_BURSTS,
                CFS_BURST_TIME,
            ]),
            Print::OomControl => bits(&[OOM_KILL_DISABLE, UNDER_OOM, OOM_KILL]),
            Print::Events => (EVENTS..EVENTS + events).fold(0, |mask, i| mask | 1 << i),
        }
    }
}

/// The files the walk answers. The same text as the kernel's `_show` and
/// `_read` functions make (mm/memcontrol.c, memcontrol-v1.c,
/// kernel/cgroup/pids.c, kernel/sched/core.c), for cgroups other than a
/// hierarchy's root, which the walk never answers for.
pub const FILES: [(&str, Tree, Print); 16] = [
    ("memory.current", Tree::V2, Print::Bytes(MEM_USAGE)),
    ("memory.usage_in_bytes", Tree::V1, Print::Bytes(MEM_USAGE)),
    ("memory.max", Tree::V2, Print::BytesOrMax(MEM_MAX)),
    ("memory.limit_in_bytes", Tree::V1, Print::Bytes(MEM_MAX)),
    ("memory.peak", Tree::V2, Print::Bytes(MEM_WATERMARK)),
    (
        "memory.max_usage_in_bytes",
        Tree::V1,
        Print::Bytes(MEM_WATERMARK),
    ),
    ("memory.failcnt", Tree::V1, Print::Number(MEM_FAILCNT)),
    // Only where swap is accounted: learnt from a cgroup at load.
    ("memory.swap.current", Tree::V2, Print::Bytes(MEM_SWAP)),
    ("memory.events", Tree::V2, Print::Events),
    ("memory.oom_control", Tree::V1, Print::OomControl),
    ("pids.current", Tree::Any, Print::Number(PIDS_COUNT)),
    ("pids.max", Tree::Any, Print::PidsMax),
    ("cpu.cfs_quota_us", Tree::V1, Print::QuotaUs),
    ("cpu.cfs_period_us", Tree::V1, Print::PeriodUs),
    ("cpu.max", Tree::V2, Print::CpuMax),
    ("cpu.stat", Tree::V1, Print::CfsStat),
];

/// `PAGE_COUNTER_MAX` on 64-bit kernels: `LONG_MAX / PAGE_SIZE`.
fn page_counter_max(page: u64) -> u64 {
    i64::MAX as u64 / page
}

/// `RUNTIME_INF`: no CPU quota.
const RUNTIME_INF: u64 = u64::MAX;

/// How the walk answers a file of one cgroup.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The text was appended.
    Text,
    /// The cgroup has no such file: its controller is not enabled for it.
    Absent,
    /// Read the file: the walk does not answer it.
    ReadFile,
    /// Read the file: the walk did not see this cgroup (made since, or its
    /// directory made anew).
    Unseen,
}

/// Whether the walk can answer `file` at all: a cheap test before looking a
/// cgroup up.
pub fn answers(file: &str) -> bool {
    FILES.iter().any(|(f, _, _)| *f == file)
}

/// Names the walk answers in one tree only, though the other has a file of
/// that name too (with other lines).
const NAMESAKES: [&str; 1] = ["cpu.stat"];

/// Whether the walk answers `file` in every cgroup that has a file of that
/// name (when it saw the cgroup): such files need not be kept open for
/// aggregates.
pub fn answers_wherever(file: &str) -> bool {
    answers(file) && !NAMESAKES.contains(&file)
}

/// A cgroup directory as the walk knows it: its hierarchy's device and
/// its inode number (the kernel's cgroup id in that hierarchy).
pub type CgroupKey = (u64, u64);

/// The key of a cgroup directory; `None` when it cannot be stat'ed.
pub fn key_of(dir: &Path) -> Option<CgroupKey> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// One hierarchy's cgroups as one walk found them.
#[derive(Debug)]
struct Hierarchy {
    /// The device of its cgroupfs mount.
    dev: u64,
    /// A v1 hierarchy.
    v1: bool,
    /// Its root, which the walk never answers for (the kernel prints
    /// other values for a root) but whose pids limit is `PIDS_MAX`, the
    /// value that reads as `max` (4M + 1 on most kernels, 32K + 1 with
    /// CONFIG_BASE_SMALL).
    root: Option<WalkRecord>,
    /// The other cgroups, sorted by id.
    records: Vec<WalkRecord>,
}

/// One walk's records, by hierarchy.
#[derive(Debug, Default)]
pub struct Walked {
    hierarchies: Vec<Hierarchy>,
    words: Words,
    /// Scheduler statistics were on (`kernel.sched_schedstats`): v1
    /// `cpu.stat` then has a line the walk does not read.
    schedstats: bool,
    page: u64,
    /// Cgroups visited, over all hierarchies.
    visited: usize,
}

impl Walked {
    /// Cgroups seen, over all hierarchies.
    pub fn len(&self) -> usize {
        self.hierarchies.iter().map(|h| h.records.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cgroup's hierarchy, when walked, and its record, when seen.
    fn record(&self, (dev, id): CgroupKey) -> Option<(&Hierarchy, Option<&WalkRecord>)> {
        let hierarchy = self.hierarchies.iter().find(|h| h.dev == dev)?;
        let at = hierarchy.records.binary_search_by_key(&id, |r| r.id);
        Some((hierarchy, at.ok().map(|at| &hierarchy.records[at])))
    }

    /// Appends to `out` what the kernel would print for `file` of the cgroup
    /// `key`, when the walk saw that cgroup and read what the file shows.
    pub fn render(&self, key: CgroupKey, file: &str, out: &mut Vec<u8>) -> Answer {
        let Some(&(_, tree, print)) = FILES.iter().find(|(f, _, _)| *f == file) else {
            return Answer::ReadFile;
        };
        let (hierarchy, record) = match self.record(key) {
            // A hierarchy not walked (before 6.2, a v1 one).
            None => return Answer::ReadFile,
            Some((_, None)) => return Answer::Unseen,
            Some((hierarchy, Some(record))) => (hierarchy, record),
        };
        let other_tree = match tree {
            Tree::Any => false,
            Tree::V1 => !hierarchy.v1,
            Tree::V2 => hierarchy.v1,
        };
        let words = print.words(self.words.events.len());
        if other_tree
            || words == 0
            || words & !self.words.configured != 0
            || matches!(print, Print::CfsStat) && self.schedstats
        {
            return Answer::ReadFile;
        }
        if words & record.missing != 0 {
            return Answer::Absent;
        }
        if words & !record.present != 0 {
            return Answer::ReadFile;
        }
        let pids_max = hierarchy
            .root
            .filter(|root| root.present & 1 << PIDS_LIMIT != 0)
            .map(|root| root.values[PIDS_LIMIT] as i64);
        if matches!(print, Print::PidsMax) && pids_max.is_none() {
            return Answer::ReadFile;
        }
        // A word narrower than the 8 bytes read: its own bytes, as the
        // kernel's `%d` prints them.
        let value = |i: usize| -> i128 {
            match self.words.sizes[i] {
                8 => record.values[i] as i128,
                size => {
                    let shift = 64 - 8 * u32::from(size);
                    ((record.values[i] << shift) as i64 >> shift) as i128
                }
            }
        };
        fn put(out: &mut Vec<u8>, n: i128) {
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        fn line(out: &mut Vec<u8>, name: &str, n: i128) {
            out.extend_from_slice(name.as_bytes());
            out.push(b' ');
            put(out, n);
            out.push(b'\n');
        }
        // The kernel's `%ld` of a `long`: signed, unlike the words read as
        // `u64`.
        let long = |i: usize| value(i) as i64 as i128;
        let page = self.page as i128;
        match print {
            Print::CfsStat => {
                line(out, "nr_periods", value(CFS_PERIODS));
                line(out, "nr_throttled", value(CFS_THROTTLED));
                line(out, "throttled_time", value(CFS_THROTTLED_TIME));
                line(out, "nr_bursts", value(CFS_BURSTS));
                line(out, "burst_time", value(CFS_BURST_TIME));
                return Answer::Text;
            }
            Print::OomControl => {
                line(out, "oom_kill_disable", value(OOM_KILL_DISABLE));
                line(out, "under_oom", (value(UNDER_OOM) != 0) as i128);
                line(out, "oom_kill", value(OOM_KILL));
                return Answer::Text;
            }
            Print::Events => {
                for (i, name) in self.words.events.iter().enumerate() {
                    line(out, name, value(EVENTS + i));
                }
                return Answer::Text;
            }
            _ => {}
        }
        match print {
            Print::Bytes(i) => put(out, value(i) * page),
            Print::BytesOrMax(i) if value(i) == page_counter_max(self.page) as i128 => {
                out.extend_from_slice(b"max")
            }
            Print::BytesOrMax(i) => put(out, value(i) * page),
            Print::Number(i) => put(out, long(i)),
            Print::PidsMax if Some(long(PIDS_LIMIT) as i64) >= pids_max => {
                out.extend_from_slice(b"max")
            }
            Print::PidsMax => put(out, long(PIDS_LIMIT)),
            Print::QuotaUs => put(out, quota_us(record.values[CFS_QUOTA])),
            Print::PeriodUs => put(out, long(CFS_PERIOD) / 1000),
            Print::CpuMax => {
                match quota_us(record.values[CFS_QUOTA]) {
                    -1 => out.extend_from_slice(b"max"),
                    quota => put(out, quota),
                }
                out.push(b' ');
                put(out, long(CFS_PERIOD) / 1000);
            }
            Print::CfsStat | Print::OomControl | Print::Events => unreachable!("printed above"),
        }
        out.push(b'\n');
        Answer::Text
    }
}

/// `tg_get_cfs_quota`: microseconds, or -1 for none.
fn quota_us(quota_ns: u64) -> i128 {
    if quota_ns == RUNTIME_INF {
        -1
    } else {
        (quota_ns / 1000) as i128
    }
}

/// The walk of a daemon's hierarchies, loaded on first use.
pub struct Walker {
    roots: Vec<PathBuf>,
    /// The v2 root among them, and its device.
    unified: Option<PathBuf>,
    unified_dev: Option<u64>,
    btf: PathBuf,
    state: Mutex<State>,
    /// When the last walk was, and how many cgroups it visited.
    last: Mutex<Option<(Instant, usize)>>,
}

/// A walk pays when the cgroups it visits are at most this many per
/// container: it visits a cgroup in 0.9 µs and spares each container 8
/// (v2) to 10 (v1) files of 3 µs (kept open) to 9 µs (opened) each, so it
/// pays up to about 27 cgroups a container (`cargo bench --bench reads --
/// aggregates`, 2026-11-28, session 17: 30.3 ms for 33,623 cgroups).
const CGROUPS_PER_CONTAINER: usize = 16;

/// How long a walk's count of cgroups is trusted.
const RELEARN: Duration = Duration::from_secs(60);

enum State {
    Untried,
    Ready(Box<Offsets>, Box<Loaded>),
    /// Why not, said once in the log.
    Unavailable(String),
}

/// Records the array holds at first: a host's cgroups, and then some.
const FIRST_CAPACITY: usize = 4096;

impl Walker {
    /// The walk of `layout`'s hierarchies that hold what it reads: v2 when
    /// it has the memory, pids or cpu controller (not on a hybrid host,
    /// where they are v1's), and the v1 memory, pids and cpu hierarchies.
    pub fn new(layout: &Layout) -> Walker {
        let mut roots: Vec<PathBuf> = layout
            .unified
            .iter()
            .filter(|root| {
                std::fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| {
                    c.split_whitespace()
                        .any(|c| matches!(c, "memory" | "pids" | "cpu"))
                })
            })
            .cloned()
            .collect();
        let unified = roots.first().cloned();
        for controller in [Controller::Memory, Controller::Pids, Controller::Cpu] {
            if let Some(root) = layout.v1(controller) {
                if !roots.iter().any(|r| r == root) {
                    roots.push(root.to_path_buf());
                }
            }
        }
        Walker {
            unified_dev: unified.as_deref().and_then(key_of).map(|(dev, _)| dev),
            unified,
            roots,
            btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
            state: Mutex::new(State::Untried),
            last: Mutex::new(None),
        }
    }

    /// Whether the walk could not be loaded: aggregates read every file.
    pub fn is_unavailable(&self) -> bool {
        matches!(*self.state.lock(), State::Unavailable(_))
    }

    /// Whether walking pays for an aggregate of `containers`: a walk visits
    /// every cgroup of each hierarchy, and spares each container a few
    /// files. Judged by the last walk's count of cgroups, learnt again
    /// once it is a minute old.
    pub fn pays_for(&self, containers: usize) -> bool {
        match *self.last.lock() {
            Some((at, visited)) if at.elapsed() < RELEARN => {
                containers.saturating_mul(CGROUPS_PER_CONTAINER) >= visited
            }
            _ => true,
        }
    }

    /// Walks every hierarchy once. When the walk is not available (said
    /// once, in the log) cgroupfs serves everything.
    pub fn walk(&self) -> Result<Walked, WalkError> {
        let mut state = self.state.lock();
        if let State::Untried = *state {
            *state = match self.load(FIRST_CAPACITY, None) {
                Ok((offsets, loaded)) => State::Ready(Box::new(offsets), Box::new(loaded)),
                Err(e) => {
                    log::warn!("{e}; every cgroup value is read from cgroupfs");
                    State::Unavailable(e.to_string())
                }
            };
        }
        let (offsets, loaded) = match &mut *state {
            State::Ready(offsets, loaded) => (offsets, loaded),
            State::Unavailable(why) => return Err(WalkError::Unavailable(why.clone())),
            State::Untried => unreachable!("loaded above"),
        };
        let needed = match walk_all(offsets, loaded, self.unified_dev)? {
            Ok(walked) => {
                *self.last.lock() = Some((Instant::now(), walked.visited));
                return Ok(walked);
            }
            Err(needed) => needed,
        };
        // More cgroups than room: load again with twice what the largest
        // hierarchy has, and walk again. A load that fails now would fail
        // on every read: the walk is given up instead.
        let capacity = (needed * 2).next_power_of_two();
        let reloaded =
            self.load(capacity, Some((**offsets).clone()))
                .and_then(|(offsets, mut loaded)| {
                    let walked = walk_all(&offsets, &mut loaded, self.unified_dev)?;
                    Ok((offsets, loaded, walked))
                });
        match reloaded {
            Ok((offsets, loaded, walked)) => {
                *state = State::Ready(Box::new(offsets), Box::new(loaded));
                let walked = walked.map_err(|needed| {
                    WalkError::Run(std::io::Error::other(format!(
                        "{needed} cgroups, more than room was made for"
                    )))
                })?;
                *self.last.lock() = Some((Instant::now(), walked.visited));
                Ok(walked)
            }
            Err(e) => {
                log::warn!("{e}; every cgroup value is read from cgroupfs");
                *state = State::Unavailable(e.to_string());
                Err(e)
            }
        }
    }

    fn load(
        &self,
        capacity: usize,
        offsets: Option<Offsets>,
    ) -> Result<(Offsets, Loaded), WalkError> {
        let offsets = match offsets {
            Some(offsets) => offsets,
            None => {
                let (events, swap) = self.learn_memory_files();
                let mut offsets = Offsets::from_btf(&self.btf, &events)?;
                if !swap {
                    offsets.words.configured &= !(1 << MEM_SWAP);
                }
                offsets
            }
        };
        let loaded = Loaded::new(&offsets, &self.roots, capacity);
        // aya's load parses the kernel's BTF (twice: the loader's own and
        // the one `Iter::load` needs), some 20 MiB of small allocations, all
        // freed by now; glibc keeps such memory in its heap unless told to
        // return it.
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
        let loaded = loaded?;
        log::info!(
            "cgroup walk: {} hierarchies, room for {capacity} cgroups",
            loaded.hierarchies.len()
        );
        Ok((offsets, loaded))
    }

    /// What the v2 memory files of a cgroup show on this kernel, learnt
    /// from the first child of the v2 root that has them: the lines of
    /// `memory.events` (they vary by kernel: `oom_group_kill` from 5.17,
    /// `sock_throttled` later), and whether there is a
    /// `memory.swap.current` (not where swap is not accounted). Nothing
    /// when no child has the memory controller yet: those files are read.
    fn learn_memory_files(&self) -> (Vec<String>, bool) {
        let children = self
            .unified
            .as_deref()
            .and_then(|root| std::fs::read_dir(root).ok());
        for child in children.into_iter().flatten().flatten() {
            let dir = child.path();
            if let Ok(text) = std::fs::read_to_string(dir.join("memory.events")) {
                let lines = text
                    .lines()
                    .filter_map(|l| Some(l.split_once(' ')?.0.to_string()))
                    .collect();
                return (lines, dir.join("memory.swap.current").exists());
            }
        }
        (Vec::new(), false)
    }
}

/// Each hierarchy walked, or the room that was lacking.
fn walk_all(
    offsets: &Offsets,
    loaded: &mut Loaded,
    unified_dev: Option<u64>,
) -> Result<Result<Walked, usize>, WalkError> {
    let mut walked = Walked {
        hierarchies: Vec::with_capacity(loaded.hierarchies.len()),
        words: offsets.words.clone(),
        // Absent where the kernel has no scheduler statistics at all.
        schedstats: std::fs::read("/proc/sys/kernel/sched_schedstats")
            .is_ok_and(|on| on.starts_with(b"1")),
        page: page_size(),
        visited: 0,
    };
    // Every hierarchy is walked even when one overflows: the program
    // counts past the end, so the largest is known for the next room.
    let mut needed = None;
    for index in 0..loaded.hierarchies.len() {
        match loaded.walk(index)? {
            Ok(found) => {
                walked.visited += found.visited;
                let dev = loaded.hierarchies[index].0;
                walked.hierarchies.push(Hierarchy {
                    dev,
                    v1: Some(dev) != unified_dev,
                    root: found.root,
                    records: found.records,
                });
            }
            Err(n) => needed = needed.max(Some(n)),
        }
    }
    Ok(needed.map_or(Ok(walked), Err))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_WORDS: u64 = (1 << FIELDS) - 1;

    /// PIDS_MAX of most kernels, as a root's pids limit holds it.
    const PIDS_MAX: u64 = 4 * 1024 * 1024 + 1;

    /// The lines of 6.1's `memory.events`.
    const EVENT_LINES: [&str; 6] = ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"];

    /// A v2 hierarchy (device 7) and a v1 one (device 8), each with a root
    /// and cgroup 42 holding `values`.
    fn walked(present: u64, missing: u64, values: [u64; FIELDS]) -> Walked {
        let mut root = [0; FIELDS];
        root[PIDS_LIMIT] = PIDS_MAX;
        let hierarchy = |dev, v1| Hierarchy {
            dev,
            v1,
            root: Some(WalkRecord {
                id: 1,
                present: ALL_WORDS,
                missing: 0,
                values: root,
            }),
            records: vec![WalkRecord {
                id: 42,
                present,
                missing,
                values,
            }],
        };
        let mut sizes = [8; FIELDS];
        for int in [
            CFS_PERIODS,
            CFS_THROTTLED,
            CFS_BURSTS,
            OOM_KILL_DISABLE,
            UNDER_OOM,
        ] {
            sizes[int] = 4;
        }
        Walked {
            hierarchies: vec![hierarchy(7, false), hierarchy(8, true)],
            words: Words {
                configured: ALL_WORDS,
                sizes,
                events: EVENT_LINES.map(String::from).to_vec(),
            },
            schedstats: false,
            page: 4096,
            visited: 4,
        }
    }

    /// Cgroup 42's file, in the hierarchy that has it.
    fn text(w: &Walked, file: &str) -> (Answer, String) {
        let v1 = FILES
            .iter()
            .any(|(f, tree, _)| *f == file && *tree == Tree::V1);
        let dev = if v1 { 8 } else { 7 };
        let mut out = Vec::new();
        let answer = w.render((dev, 42), file, &mut out);
        (answer, String::from_utf8(out).unwrap())
    }

    #[test]
    fn prints_as_the_kernel_does() {
        let mut values = [0u64; FIELDS];
        values[MEM_USAGE] = 3;
        values[MEM_MAX] = page_counter_max(4096);
        values[MEM_WATERMARK] = 5;
        values[MEM_FAILCNT] = 2;
        values[PIDS_COUNT] = 4;
        values[PIDS_LIMIT] = PIDS_MAX;
        values[CFS_QUOTA] = RUNTIME_INF;
        values[CFS_PERIOD] = 100_000_000;
        let w = walked(ALL_WORDS, 0, values);
        let text = |file| text(&w, file).1;
        assert_eq!(text("memory.current"), "12288\n");
        assert_eq!(text("memory.usage_in_bytes"), "12288\n");
        assert_eq!(text("memory.max"), "max\n");
        assert_eq!(text("memory.limit_in_bytes"), "9223372036854771712\n");
        assert_eq!(text("memory.peak"), "20480\n");
        assert_eq!(text("memory.failcnt"), "2\n");
        assert_eq!(text("pids.current"), "4\n");
        assert_eq!(text("pids.max"), "max\n");
        assert_eq!(text("cpu.cfs_quota_us"), "-1\n");
        assert_eq!(text("cpu.cfs_period_us"), "100000\n");
        assert_eq!(text("cpu.max"), "max 100000\n");
    }

    #[test]
    fn prints_limits_that_are_set() {
        let mut values = [0u64; FIELDS];
        values[MEM_MAX] = 256;
        values[PIDS_LIMIT] = 64;
        values[CFS_QUOTA] = 50_000_000;
        values[CFS_PERIOD] = 100_000_000;
        let w = walked(ALL_WORDS, 0, values);
        let text = |file| text(&w, file).1;
        assert_eq!(text("memory.max"), "1048576\n");
        assert_eq!(text("pids.max"), "64\n");
        assert_eq!(text("cpu.cfs_quota_us"), "50000\n");
        assert_eq!(text("cpu.max"), "50000 100000\n");
    }

    #[test]
    fn a_missing_controller_is_an_absent_file_and_an_unread_word_a_file_read() {
        let w = walked(1 << MEM_USAGE, 1 << PIDS_COUNT, [0; FIELDS]);
        assert_eq!(text(&w, "pids.current").0, Answer::Absent);
        assert_eq!(text(&w, "memory.failcnt").0, Answer::ReadFile);
        assert_eq!(text(&w, "memory.current").0, Answer::Text);
        assert_eq!(text(&w, "memory.stat").0, Answer::ReadFile);
        let mut out = Vec::new();
        assert_eq!(
            w.render((7, 43), "memory.current", &mut out),
            Answer::Unseen,
            "a cgroup the walk did not see"
        );
        assert_eq!(
            w.render((9, 42), "memory.current", &mut out),
            Answer::ReadFile,
            "a hierarchy not walked"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn pids_max_is_max_at_the_roots_limit_whatever_the_kernel_makes_it() {
        let mut values = [0u64; FIELDS];
        values[PIDS_LIMIT] = 32 * 1024 + 1;
        let mut w = walked(ALL_WORDS, 0, values);
        assert_eq!(text(&w, "pids.max").1, "32769\n");
        w.hierarchies[0].root.as_mut().unwrap().values[PIDS_LIMIT] = 32 * 1024 + 1;
        assert_eq!(text(&w, "pids.max").1, "max\n", "CONFIG_BASE_SMALL");
        w.hierarchies[0].root = None;
        assert_eq!(text(&w, "pids.max").0, Answer::ReadFile, "no root seen");
    }

    #[test]
    fn a_walk_pays_when_the_host_has_few_cgroups_a_container() {
        let walker = Walker {
            roots: Vec::new(),
            unified: None,
            unified_dev: None,
            btf: PathBuf::new(),
            state: Mutex::new(State::Untried),
            last: Mutex::new(None),
        };
        assert!(walker.pays_for(1), "the first walk learns the count");
        *walker.last.lock() = Some((Instant::now(), 1600));
        assert!(walker.pays_for(100));
        assert!(!walker.pays_for(99));
        let old = Instant::now().checked_sub(RELEARN).unwrap();
        *walker.last.lock() = Some((old, 1600));
        assert!(walker.pays_for(1), "an old count is learnt again");
    }

    #[test]
    fn a_word_the_kernel_lacks_is_read_from_the_file() {
        let mut w = walked(ALL_WORDS, 0, [0; FIELDS]);
        w.words.configured &= !(1 << CFS_QUOTA);
        assert_eq!(text(&w, "cpu.max").0, Answer::ReadFile);
        assert_eq!(text(&w, "cpu.cfs_period_us").0, Answer::Text);
    }

    #[test]
    fn prints_counters_as_the_kernel_does() {
        let mut values = [0u64; FIELDS];
        // An int's other four bytes are whatever follows it in the struct.
        values[CFS_PERIODS] = 0xdead_beef_0000_0007;
        values[CFS_THROTTLED] = 0xffff_ffff_ffff_fffe;
        values[CFS_THROTTLED_TIME] = 123_456_789_012;
        values[CFS_BURSTS] = 1 << 32;
        values[CFS_BURST_TIME] = 0;
        values[OOM_KILL_DISABLE] = 1;
        values[UNDER_OOM] = 0x1_0000_0002;
        values[OOM_KILL] = 3;
        for (i, v) in (EVENTS..EVENTS + 6).zip(10..) {
            values[i] = v;
        }
        values[MEM_SWAP] = 2;
        let w = walked(ALL_WORDS, 0, values);
        let text = |file| text(&w, file).1;
        assert_eq!(
            text("cpu.stat"),
            "nr_periods 7\nnr_throttled -2\nthrottled_time 123456789012\n\
             nr_bursts 0\nburst_time 0\n"
        );
        assert_eq!(
            text("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 1\noom_kill 3\n"
        );
        assert_eq!(
            text("memory.events"),
            "low 10\nhigh 11\nmax 12\noom 13\noom_kill 14\noom_group_kill 15\n"
        );
        assert_eq!(text("memory.swap.current"), "8192\n");
    }

    #[test]
    fn a_file_of_the_other_tree_or_not_learnt_is_read() {
        let mut w = walked(ALL_WORDS, 0, [0; FIELDS]);
        let mut out = Vec::new();
        // v2's cpu.stat has other lines.
        assert_eq!(w.render((7, 42), "cpu.stat", &mut out), Answer::ReadFile);
        assert_eq!(w.render((8, 42), "cpu.stat", &mut out), Answer::Text);
        assert_eq!(
            w.render((8, 42), "memory.events", &mut out),
            Answer::ReadFile
        );
        // Scheduler statistics add a line the walk does not read.
        w.schedstats = true;
        assert_eq!(text(&w, "cpu.stat").0, Answer::ReadFile);
        assert_eq!(text(&w, "memory.oom_control").0, Answer::Text);
        // No memory.events was seen at load.
        w.words.events.clear();
        assert_eq!(text(&w, "memory.events").0, Answer::ReadFile);
        // One line's word missing from the kernel: the whole file is read.
        w.words.events = EVENT_LINES.map(String::from).to_vec();
        w.words.configured &= !(1 << (EVENTS + 5));
        assert_eq!(text(&w, "memory.events").0, Answer::ReadFile);
    }

    #[test]
    fn a_name_both_trees_have_is_not_answered_wherever() {
        assert!(answers("cpu.stat"));
        assert!(!answers_wherever("cpu.stat"));
        assert!(answers_wherever("memory.current"));
        assert!(answers_wherever("pids.max"));
        assert!(!answers_wherever("memory.stat"));
        for name in NAMESAKES {
            assert!(answers(name), "{name} is in FILES");
        }
    }
}

//! The cgroup walk: one pass of an eBPF cgroup iterator over each hierarchy
//! reads the kernel's counters (memory page counters, pids, CPU bandwidth)
//! for every cgroup at once, where cgroupfs costs an open, a read and a
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
}

impl Print {
    /// The words the text is made of.
    fn words(self) -> &'static [usize] {
        const INDICES: [usize; FIELDS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        match self {
            Print::Bytes(i) | Print::BytesOrMax(i) | Print::Number(i) => &INDICES[i..=i],
            Print::PidsMax => &INDICES[PIDS_LIMIT..=PIDS_LIMIT],
            Print::QuotaUs => &INDICES[CFS_QUOTA..=CFS_QUOTA],
            Print::PeriodUs => &INDICES[CFS_PERIOD..=CFS_PERIOD],
            Print::CpuMax => &INDICES[CFS_QUOTA..=CFS_PERIOD],
        }
    }
}

/// The files the walk answers. The same text as the kernel's `_show` and
/// `_read` functions make (mm/memcontrol.c, memcontrol-v1.c,
/// kernel/cgroup/pids.c, kernel/sched/core.c), for cgroups other than a
/// hierarchy's root, which the walk never answers for.
///
/// Not `memory.swap.current`: the kernel leaves it out where swap is not
/// accounted (`cgroup.memory=noswap`) though the counter exists.
pub const FILES: [(&str, Print); 12] = [
    ("memory.current", Print::Bytes(MEM_USAGE)),
    ("memory.usage_in_bytes", Print::Bytes(MEM_USAGE)),
    ("memory.max", Print::BytesOrMax(MEM_MAX)),
    ("memory.limit_in_bytes", Print::Bytes(MEM_MAX)),
    ("memory.peak", Print::Bytes(MEM_WATERMARK)),
    ("memory.max_usage_in_bytes", Print::Bytes(MEM_WATERMARK)),
    ("memory.failcnt", Print::Number(MEM_FAILCNT)),
    ("pids.current", Print::Number(PIDS_COUNT)),
    ("pids.max", Print::PidsMax),
    ("cpu.cfs_quota_us", Print::QuotaUs),
    ("cpu.cfs_period_us", Print::PeriodUs),
    ("cpu.max", Print::CpuMax),
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
    FILES.iter().any(|(f, _)| *f == file)
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
    /// Bit `i` set: word `i` was configured (the kernel's BTF has it).
    configured: u64,
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
        let Some((_, print)) = FILES.iter().find(|(f, _)| *f == file) else {
            return Answer::ReadFile;
        };
        let (hierarchy, record) = match self.record(key) {
            // A hierarchy not walked (before 6.2, a v1 one).
            None => return Answer::ReadFile,
            Some((_, None)) => return Answer::Unseen,
            Some((hierarchy, Some(record))) => (hierarchy, record),
        };
        let words = print.words();
        let bit = |i: usize| 1u64 << i;
        if words.iter().any(|&i| self.configured & bit(i) == 0) {
            return Answer::ReadFile;
        }
        if words.iter().any(|&i| record.missing & bit(i) != 0) {
            return Answer::Absent;
        }
        if words.iter().any(|&i| record.present & bit(i) == 0) {
            return Answer::ReadFile;
        }
        let pids_max = hierarchy
            .root
            .filter(|root| root.present & bit(PIDS_LIMIT) != 0)
            .map(|root| root.values[PIDS_LIMIT] as i64);
        if matches!(print, Print::PidsMax) && pids_max.is_none() {
            return Answer::ReadFile;
        }
        let value = |i: usize| record.values[i];
        let mut number = itoa::Buffer::new();
        let mut put = |out: &mut Vec<u8>, n: i128| {
            out.extend_from_slice(number.format(n).as_bytes());
        };
        let page = self.page as i128;
        match *print {
            Print::Bytes(i) => put(out, value(i) as i128 * page),
            Print::BytesOrMax(i) if value(i) == page_counter_max(self.page) => {
                out.extend_from_slice(b"max")
            }
            Print::BytesOrMax(i) => put(out, value(i) as i128 * page),
            Print::Number(i) => put(out, value(i) as i64 as i128),
            Print::PidsMax if Some(value(PIDS_LIMIT) as i64) >= pids_max => {
                out.extend_from_slice(b"max")
            }
            Print::PidsMax => put(out, value(PIDS_LIMIT) as i64 as i128),
            Print::QuotaUs => put(out, quota_us(value(CFS_QUOTA))),
            Print::PeriodUs => put(out, value(CFS_PERIOD) as i64 as i128 / 1000),
            Print::CpuMax => {
                match quota_us(value(CFS_QUOTA)) {
                    -1 => out.extend_from_slice(b"max"),
                    quota => put(out, quota),
                }
                out.push(b' ');
                put(out, value(CFS_PERIOD) as i64 as i128 / 1000);
            }
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
    btf: PathBuf,
    state: Mutex<State>,
    /// When the last walk was, and how many cgroups it visited.
    last: Mutex<Option<(Instant, usize)>>,
}

/// A walk pays when the cgroups it visits are at most this many per
/// container: it visits a cgroup in 0.76 µs and spares each container 6
/// (v2) to 8 (v1) files of 3 µs (kept open) to 9 µs (opened) each, so it
/// pays up to about 23 cgroups a container (`cargo bench --bench reads --
/// aggregates`, 2026-11-28: 25.7 ms for 33,624 cgroups).
const CGROUPS_PER_CONTAINER: usize = 16;

/// How long a walk's count of cgroups is trusted.
const RELEARN: Duration = Duration::from_secs(60);

enum State {
    Untried,
    Ready(Offsets, Box<Loaded>),
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
        for controller in [Controller::Memory, Controller::Pids, Controller::Cpu] {
            if let Some(root) = layout.v1(controller) {
                if !roots.iter().any(|r| r == root) {
                    roots.push(root.to_path_buf());
                }
            }
        }
        Walker {
            roots,
            btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
            state: Mutex::new(State::Untried),
            last: Mutex::new(None),
        }
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
                Ok((offsets, loaded)) => State::Ready(offsets, Box::new(loaded)),
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
        let needed = match walk_all(offsets, loaded)? {
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
            self.load(capacity, Some(offsets.clone()))
                .and_then(|(offsets, mut loaded)| {
                    let walked = walk_all(&offsets, &mut loaded)?;
                    Ok((offsets, loaded, walked))
                });
        match reloaded {
            Ok((offsets, loaded, walked)) => {
                *state = State::Ready(offsets, Box::new(loaded));
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
            None => Offsets::from_btf(&self.btf)?,
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
}

/// Each hierarchy walked, or the room that was lacking.
fn walk_all(offsets: &Offsets, loaded: &mut Loaded) -> Result<Result<Walked, usize>, WalkError> {
    let mut walked = Walked {
        hierarchies: Vec::with_capacity(loaded.hierarchies.len()),
        configured: offsets.configured,
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
                walked.hierarchies.push(Hierarchy {
                    dev: loaded.hierarchies[index].0,
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

    const ALL_WORDS: u64 = (1 << btf::WORDS.len()) - 1;

    /// PIDS_MAX of most kernels, as a root's pids limit holds it.
    const PIDS_MAX: u64 = 4 * 1024 * 1024 + 1;

    fn walked(present: u64, missing: u64, values: [u64; FIELDS]) -> Walked {
        let mut root = [0; FIELDS];
        root[PIDS_LIMIT] = PIDS_MAX;
        Walked {
            hierarchies: vec![Hierarchy {
                dev: 7,
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
            }],
            configured: ALL_WORDS,
            page: 4096,
            visited: 2,
        }
    }

    fn text(w: &Walked, file: &str) -> (Answer, String) {
        let mut out = Vec::new();
        let answer = w.render((7, 42), file, &mut out);
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
            w.render((8, 42), "memory.current", &mut out),
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
        w.configured &= !(1 << CFS_QUOTA);
        assert_eq!(text(&w, "cpu.max").0, Answer::ReadFile);
        assert_eq!(text(&w, "cpu.cfs_period_us").0, Answer::Text);
    }
}

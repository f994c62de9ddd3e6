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
//! offsets found here in the running kernel's BTF ([`Offsets`]). A field the
//! BTF lacks is left to cgroupfs; a kernel without cgroup iterators (before
//! 6.1), or a v1 hierarchy it cannot walk (before 6.2), leaves all of it to
//! cgroupfs.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData};
use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader};
use cgmetric_common::walk::{
    WalkConfig, WalkField, WalkRecord, FIELDS, PROG_WALK, WALKED_MAP, WALK_CONFIG_GLOBAL,
    WALK_COUNT_MAP,
};
use parking_lot::Mutex;

use super::{Controller, Layout};
use crate::bpf_sys;

/// The compiled walk (see `ebpf/build.sh`), aligned as aya requires.
static OBJECT: &[u8] = aligned::OBJECT;

mod aligned {
    #[repr(C, align(8))]
    struct Aligned<T: ?Sized>(T);
    static ALIGNED: &Aligned<[u8]> =
        &Aligned(*include_bytes!("../../ebpf/prebuilt/cgmetric-walk.bpf.o"));
    pub static OBJECT: &[u8] = &ALIGNED.0;
}

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

/// Where each word is: the index, the controller (`enum cgroup_subsys_id`),
/// the controller's structure and the member's path in it.
const WORDS: [(usize, &str, &str, &str); 8] = [
    (MEM_USAGE, "memory_cgrp_id", "mem_cgroup", "memory.usage"),
    (MEM_MAX, "memory_cgrp_id", "mem_cgroup", "memory.max"),
    (
        MEM_WATERMARK,
        "memory_cgrp_id",
        "mem_cgroup",
        "memory.watermark",
    ),
    (
        MEM_FAILCNT,
        "memory_cgrp_id",
        "mem_cgroup",
        "memory.failcnt",
    ),
    (PIDS_COUNT, "pids_cgrp_id", "pids_cgroup", "counter"),
    (PIDS_LIMIT, "pids_cgrp_id", "pids_cgroup", "limit"),
    (
        CFS_QUOTA,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.quota",
    ),
    (
        CFS_PERIOD,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.period",
    ),
];

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

/// `PIDS_MAX` on 64-bit kernels: `PID_MAX_LIMIT + 1`, 4M + 1.
const PIDS_MAX: u64 = 4 * 1024 * 1024 + 1;

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

/// One walk's records, by hierarchy.
#[derive(Debug, Default)]
pub struct Walked {
    /// Each hierarchy's device and its records sorted by id, the root's
    /// left out.
    hierarchies: Vec<(u64, Vec<WalkRecord>)>,
    /// Bit `i` set: word `i` was configured (the kernel's BTF has it).
    configured: u64,
    page: u64,
}

impl Walked {
    /// Cgroups seen, over all hierarchies.
    pub fn len(&self) -> usize {
        self.hierarchies.iter().map(|(_, r)| r.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn record(&self, (dev, id): CgroupKey) -> Option<&WalkRecord> {
        let (_, records) = self.hierarchies.iter().find(|(d, _)| *d == dev)?;
        let at = records.binary_search_by_key(&id, |r| r.id).ok()?;
        Some(&records[at])
    }

    /// Appends to `out` what the kernel would print for `file` of the cgroup
    /// `key`, when the walk saw that cgroup and read what the file shows.
    pub fn render(&self, key: CgroupKey, file: &str, out: &mut Vec<u8>) -> Answer {
        let Some((_, print)) = FILES.iter().find(|(f, _)| *f == file) else {
            return Answer::ReadFile;
        };
        let Some(record) = self.record(key) else {
            return Answer::Unseen;
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
            Print::PidsMax if value(PIDS_LIMIT) as i64 >= PIDS_MAX as i64 => {
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

/// Offsets in the running kernel, from its BTF.
#[derive(Debug, Clone)]
struct Offsets {
    config: WalkConfig,
    configured: u64,
}

impl Offsets {
    fn from_btf(path: &Path) -> Result<Offsets, WalkError> {
        let bytes = std::fs::read(path).map_err(|e| WalkError::Btf(format!("{path:?}: {e}")))?;
        let types = btfparse::TypeInformation::new(&BtfBytes(bytes))
            .map_err(|e| WalkError::Btf(format!("{path:?}: {e:?}")))?;
        let offset = |ty: &str, member: &str| -> Result<u32, WalkError> {
            let missing = || WalkError::Layout(format!("{ty}.{member}"));
            let id = types.id_of(ty).ok_or_else(missing)?;
            match types.offset_of(id, member).map_err(|_| missing())? {
                (_, btfparse::Offset::ByteOffset(at)) => Ok(at),
                _ => Err(missing()),
            }
        };
        let subsys_ids = subsystem_ids(&types)?;
        let subsys_count = subsys_ids
            .iter()
            .find(|(name, _)| name == "CGROUP_SUBSYS_COUNT")
            .map(|(_, v)| *v)
            .ok_or_else(|| WalkError::Layout("CGROUP_SUBSYS_COUNT".into()))?;
        let mut config = WalkConfig {
            cgroup_kn: offset("cgroup", "kn")?,
            kn_id: offset("kernfs_node", "id")?,
            cgroup_subsys: offset("cgroup", "subsys")?,
            subsys_count,
            ..WalkConfig::EMPTY
        };
        let mut configured = 0u64;
        for (index, subsys, structure, member) in WORDS {
            // A kernel built without the controller, or without CPU
            // bandwidth control, lacks these: its files are read instead.
            let found = subsys_ids
                .iter()
                .find(|(n, _)| n == subsys)
                .map(|(_, v)| *v);
            let at = offset(structure, member)
                .and_then(|at| Ok(at.checked_sub(offset(structure, "css")?)))
                .ok()
                .flatten();
            if let (Some(subsys), Some(offset)) = (found, at) {
                config.fields[index] = WalkField { subsys, offset };
                configured |= 1 << index;
            } else {
                log::debug!("cgroup walk: no {structure}.{member} in this kernel");
            }
        }
        Ok(Offsets { config, configured })
    }
}

/// `enum cgroup_subsys_id`: each controller's index in `cgroup.subsys`.
fn subsystem_ids(types: &btfparse::TypeInformation) -> Result<Vec<(String, u32)>, WalkError> {
    let missing = || WalkError::Layout("enum cgroup_subsys_id".into());
    let id = types.id_of("cgroup_subsys_id").ok_or_else(missing)?;
    let Some(btfparse::TypeVariant::Enum(e)) = types.from_id(id) else {
        return Err(missing());
    };
    Ok(e.named_value_list()
        .iter()
        .map(|v| {
            let value = match v.value {
                btfparse::Integer32Value::Signed(n) => n as u32,
                btfparse::Integer32Value::Unsigned(n) => n,
            };
            (v.name.clone(), value)
        })
        .collect())
}

/// The BTF file's bytes, as btfparse reads them.
struct BtfBytes(Vec<u8>);

impl btfparse::Readable for BtfBytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = offset as usize;
        match self.0.get(start..start + buffer.len()) {
            Some(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::EOF,
                "read past the end of the BTF",
            )),
        }
    }
}

/// The walk's records as this process sees them: the array map, mapped
/// read-only.
struct Mapped {
    address: *mut libc::c_void,
    len: usize,
    capacity: usize,
}

// SAFETY: a read-only mapping, read only under the walker's lock.
unsafe impl Send for Mapped {}

impl Mapped {
    fn new(map: &MapData, capacity: usize) -> Result<Mapped, WalkError> {
        let page = page_size() as usize;
        let len = (capacity * std::mem::size_of::<WalkRecord>()).div_ceil(page) * page;
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a BPF_F_MMAPABLE array of `capacity` records, no
        // more; unmapped on drop.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(WalkError::Run(std::io::Error::last_os_error()));
        }
        Ok(Mapped {
            address,
            len,
            capacity,
        })
    }

    /// The first `n` records.
    fn records(&self, n: usize) -> &[WalkRecord] {
        // SAFETY: the mapping holds `capacity` records, written by the
        // program only while this process reads its iterator, under the
        // same lock as this read.
        unsafe { std::slice::from_raw_parts(self.address.cast(), n.min(self.capacity)) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.address, self.len) };
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// The program loaded, its maps, and a link per hierarchy.
struct Loaded {
    // Owns the program; the links hold it too.
    _ebpf: Ebpf,
    count: Array<MapData, u64>,
    records: Mapped,
    /// Each hierarchy's device, root id and link.
    hierarchies: Vec<(u64, u64, OwnedFd)>,
}

impl Loaded {
    fn new(offsets: &Offsets, roots: &[PathBuf], capacity: usize) -> Result<Loaded, WalkError> {
        let load = |e: Box<dyn std::error::Error + Send + Sync>| WalkError::Load(e);
        let mut ebpf = EbpfLoader::new()
            .override_global(WALK_CONFIG_GLOBAL, &offsets.config, true)
            .map_max_entries(WALKED_MAP, capacity as u32)
            .load(OBJECT)
            .map_err(|e| load(e.into()))?;
        let btf = Btf::from_sys_fs().map_err(|e| load(e.into()))?;
        let program: &mut Iter = ebpf
            .program_mut(PROG_WALK)
            .ok_or_else(|| load(format!("no program {PROG_WALK}").into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| load(e.into()))?;
        program.load("cgroup", &btf).map_err(|e| load(e.into()))?;
        let program_fd = program.fd().map_err(|e| load(e.into()))?;
        let mut hierarchies = Vec::new();
        for root in roots {
            let link = File::open(root).and_then(|dir| {
                let meta = dir.metadata()?;
                let link = bpf_sys::cgroup_iter_link(program_fd.as_fd(), dir.as_fd())?;
                Ok((meta.dev(), meta.ino(), link))
            });
            match link {
                Ok(link) => hierarchies.push(link),
                // Linux before 6.2 walks v2 only.
                Err(e) => log::info!("cgroup walk: {}: {e}; its files are read", root.display()),
            }
        }
        if hierarchies.is_empty() {
            return Err(WalkError::NoHierarchy);
        }
        let records = match ebpf.map(WALKED_MAP) {
            Some(aya::maps::Map::Array(data)) => Mapped::new(data, capacity)?,
            _ => return Err(load(format!("no map {WALKED_MAP}").into())),
        };
        let count = ebpf
            .take_map(WALK_COUNT_MAP)
            .ok_or_else(|| load(format!("no map {WALK_COUNT_MAP}").into()))?;
        let count = Array::try_from(count).map_err(|e| load(e.into()))?;
        Ok(Loaded {
            _ebpf: ebpf,
            count,
            records,
            hierarchies,
        })
    }

    /// Walks one hierarchy: its records, or `Err(n)` when the array holds
    /// fewer than the `n` cgroups it has.
    fn walk(&mut self, index: usize) -> Result<Result<Vec<WalkRecord>, usize>, WalkError> {
        let (_, root, link) = &self.hierarchies[index];
        self.count.set(0, 0, 0).map_err(WalkError::Count)?;
        let mut iter = File::from(bpf_sys::iter_create(link.as_fd()).map_err(WalkError::Run)?);
        let mut out = Vec::with_capacity(8);
        iter.read_to_end(&mut out).map_err(WalkError::Run)?;
        let visited = out
            .get(..8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()) as usize)
            .ok_or_else(|| WalkError::Run(std::io::ErrorKind::UnexpectedEof.into()))?;
        if visited > self.records.capacity {
            return Ok(Err(visited));
        }
        let mut records: Vec<WalkRecord> = self
            .records
            .records(visited)
            .iter()
            .filter(|r| r.id != *root && r.id != 0)
            .copied()
            .collect();
        records.sort_unstable_by_key(|r| r.id);
        Ok(Ok(records))
    }
}

/// The walk of a daemon's hierarchies, loaded on first use.
pub struct Walker {
    roots: Vec<PathBuf>,
    btf: PathBuf,
    state: Mutex<State>,
}

enum State {
    Untried,
    Ready(Offsets, Box<Loaded>),
    /// Why not, said once in the log.
    Unavailable(String),
}

/// Records the array holds at first: a host's cgroups, and then some.
const FIRST_CAPACITY: usize = 4096;

impl Walker {
    /// The walk of `layout`'s hierarchies that hold what it reads: v2, and
    /// the v1 memory, pids and cpu hierarchies.
    pub fn new(layout: &Layout) -> Walker {
        let mut roots: Vec<PathBuf> = layout.unified.iter().cloned().collect();
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
            Ok(walked) => return Ok(walked),
            Err(needed) => needed,
        };
        // More cgroups than room: load again with twice what the walk
        // found, and walk again.
        let capacity = (needed * 2).next_power_of_two();
        let (offsets, mut loaded) = self.load(capacity, Some(offsets.clone()))?;
        let walked = walk_all(&offsets, &mut loaded)?;
        *state = State::Ready(offsets, Box::new(loaded));
        walked.map_err(|needed| {
            WalkError::Run(std::io::Error::other(format!(
                "{needed} cgroups, more than room was made for"
            )))
        })
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
        let loaded = Loaded::new(&offsets, &self.roots, capacity)?;
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
    };
    for index in 0..loaded.hierarchies.len() {
        match loaded.walk(index)? {
            Ok(records) => walked
                .hierarchies
                .push((loaded.hierarchies[index].0, records)),
            Err(needed) => return Ok(Err(needed)),
        }
    }
    Ok(Ok(walked))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_WORDS: u64 = (1 << WORDS.len()) - 1;

    fn walked(present: u64, missing: u64, values: [u64; FIELDS]) -> Walked {
        Walked {
            hierarchies: vec![(
                7,
                vec![WalkRecord {
                    id: 42,
                    present,
                    missing,
                    values,
                }],
            )],
            configured: ALL_WORDS,
            page: 4096,
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
            Answer::Unseen,
            "another hierarchy"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn a_word_the_kernel_lacks_is_read_from_the_file() {
        let mut w = walked(ALL_WORDS, 0, [0; FIELDS]);
        w.configured &= !(1 << CFS_QUOTA);
        assert_eq!(text(&w, "cpu.max").0, Answer::ReadFile);
        assert_eq!(text(&w, "cpu.cfs_period_us").0, Answer::Text);
    }
}

//! The walk loaded: its program, its array of records mapped into this
//! process, and an iterator link per hierarchy.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use aya::maps::{Array, MapData};
use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader};
use cgmetric_common::walk::{
    WalkRecord, PROG_WALK, WALKED_MAP, WALK_CONFIG_GLOBAL, WALK_COUNT_MAP,
};

use super::btf::Offsets;
use super::WalkError;
use crate::bpf_sys;

/// The compiled walk (see `ebpf/build.sh`), aligned as aya requires.
static OBJECT: &[u8] = aligned::OBJECT;

mod aligned {
    #[repr(C, align(8))]
    struct Aligned<T: ?Sized>(T);
    static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(
        "../../../ebpf/prebuilt/cgmetric-walk.bpf.o"
    ));
    pub static OBJECT: &[u8] = &ALIGNED.0;
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

pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// One hierarchy's walk.
pub(super) struct Found {
    /// Cgroups visited.
    pub visited: usize,
    pub root: Option<WalkRecord>,
    /// The others, sorted by id.
    pub records: Vec<WalkRecord>,
}

/// The program loaded, its maps, and a link per hierarchy.
pub(super) struct Loaded {
    // Owns the program; the links hold it too.
    _ebpf: Ebpf,
    count: Array<MapData, u64>,
    records: Mapped,
    /// Each hierarchy's device, root id and link.
    pub hierarchies: Vec<(u64, u64, OwnedFd)>,
}

impl Loaded {
    pub fn new(offsets: &Offsets, roots: &[PathBuf], capacity: usize) -> Result<Loaded, WalkError> {
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

    /// Walks one hierarchy, or says `Err(n)` when the array holds fewer
    /// than the `n` cgroups it has.
    pub fn walk(&mut self, index: usize) -> Result<Result<Found, usize>, WalkError> {
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
        let walked = self.records.records(visited);
        let mut records: Vec<WalkRecord> = walked
            .iter()
            .filter(|r| r.id != *root && r.id != 0)
            .copied()
            .collect();
        records.sort_unstable_by_key(|r| r.id);
        Ok(Ok(Found {
            visited,
            root: walked.iter().find(|r| r.id == *root).copied(),
            records,
        }))
    }
}

//! The system calls cgmetric issues itself, where aya has no API for them.
//!
//! aya (0.14) creates, pins and opens the cgroup links, and reads their
//! ids and programs. What it lacks is BPF_LINK_UPDATE of a link it did not
//! create in this process: its own update (`bpf_link_update`) is private and
//! serves only to replace the XDP and TC links it manages, and neither
//! `FdLink` nor `PinnedLink` lends out its descriptor. A restart that brings
//! a changed program must swap it into the pinned link, atomically, so that
//! no packet goes uncounted: hence BPF_OBJ_GET and BPF_LINK_UPDATE here.
//! Its iterator links (`Iter::attach`) walk the default hierarchy only; the
//! cgroup walk needs each hierarchy's root, a cgroup iterator's link info:
//! hence BPF_LINK_CREATE and BPF_ITER_CREATE for them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
/// `enum bpf_attach_type`.
const BPF_TRACE_ITER: u32 = 28;
/// `enum bpf_cgroup_iter_order`.
const BPF_CGROUP_ITER_DESCENDANTS_PRE: u32 = 2;

/// Every attr struct here is padding-free: the kernel rejects non-zero bytes
/// in fields it knows, and Rust leaves padding uninitialized.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, correctly laid out bpf_attr prefix of the
    // size passed; the kernel reads no further.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us alone.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Opens a pinned bpf object.
fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    /// `bpf_attr` for BPF_OBJ_GET.
    #[repr(C, align(8))]
    struct Obj {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = Obj {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Swaps the program that the link pinned at `pin` runs, atomically: no
/// packet goes uncounted.
pub fn link_update(pin: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C, align(8))]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = open_pinned(pin)?;
    let mut attr = LinkUpdate {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Whether a cgroup with this id still exists: cgroupfs resolves a file
/// handle made of the id (FILEID_KERNFS), so no tree walk is needed.
pub fn cgroup_exists(cgroup_root: BorrowedFd<'_>, id: u64) -> bool {
    const FILEID_KERNFS: i32 = 0xfe;
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    let mut handle = Handle {
        bytes: 8,
        kind: FILEID_KERNFS,
        id,
    };
    // SAFETY: handle is a valid struct file_handle with 8 bytes of payload.
    let fd = unsafe {
        libc::open_by_handle_at(
            cgroup_root.as_raw_fd(),
            (&mut handle as *mut Handle).cast(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd >= 0 {
        drop(owned(fd.into()));
        return true;
    }
    // Anything but "stale" or "gone" (EPERM, ENOMEM): assume it exists,
    // since forgetting live counters is the worse mistake.
    !matches!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ESTALE) | Some(libc::ENOENT)
    )
}

/// A link that runs the cgroup iterator `program` over `root` (a cgroup
/// directory of any hierarchy, v1 ones from Linux 6.2) and every cgroup
/// below it, parents first.
pub fn cgroup_iter_link(program: BorrowedFd<'_>, root: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    /// `union bpf_iter_link_info`, its `cgroup` member.
    #[repr(C, align(8))]
    struct CgroupIterInfo {
        order: u32,
        cgroup_fd: u32,
        cgroup_id: u64,
    }
    /// `bpf_attr` for BPF_LINK_CREATE of an iterator.
    #[repr(C, align(8))]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        iter_info: u64,
        iter_info_len: u32,
        padding: u32,
    }
    let info = CgroupIterInfo {
        order: BPF_CGROUP_ITER_DESCENDANTS_PRE,
        cgroup_fd: root.as_raw_fd() as u32,
        cgroup_id: 0,
    };
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: &info as *const CgroupIterInfo as u64,
        iter_info_len: std::mem::size_of::<CgroupIterInfo>() as u32,
        padding: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// A new run of an iterator link: reading the descriptor runs the program.
pub fn iter_create(link: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    #[repr(C, align(8))]
    struct IterCreate {
        link_fd: u32,
        flags: u32,
    }
    let mut attr = IterCreate {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    bpf(BPF_ITER_CREATE, &mut attr).map(owned)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every entry of the hash map `map`, a few hundred to a system call
/// (BPF_MAP_LOOKUP_BATCH, Linux 5.6): `each` gets a key of `key_size` bytes
/// and its value of `value_size` bytes (of a per-CPU map: each possible
/// CPU's value, rounded up to 8 bytes, one after another). Returns how many
/// entries there were. An entry that the programs add meanwhile to a
/// bucket already read is missed, as it would be by a read just before.
pub fn lookup_batch(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<usize> {
    /// `bpf_attr` for the BPF_MAP_*_BATCH commands.
    #[repr(C, align(8))]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    // A hash map's position is its next bucket's index, a u32; none at
    // first, to start from the beginning.
    let mut position: Option<u64> = None;
    let mut next = 0u64;
    let mut count = 256usize;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut entries = 0;
    loop {
        keys.resize(count * key_size, 0u8);
        values.resize(count * value_size, 0u8);
        let mut attr = Batch {
            in_batch: position.as_ref().map_or(0, |p| p as *const u64 as u64),
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: count as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // ENOENT ends the walk, and may come with the last entries.
        let done = match result {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than fit: ask for more at once.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count < 1 << 20 => {
                count *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        let got = (attr.count as usize).min(count);
        for i in 0..got {
            each(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        entries += got;
        if done {
            return Ok(entries);
        }
        position = Some(next);
    }
}

//! The bpf(2) commands cgmetric issues itself: aya 0.13 creates cgroup links
//! but does not hand them out for pinning, and pinned links are what keep
//! the programs attached while no daemon runs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Where a program attaches to a cgroup (uapi `enum bpf_attach_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    Ingress = 0,
    Egress = 1,
    SockCreate = 2,
    SockOps = 3,
}

/// `bpf_attr.link_create`; the kernel zero-fills what follows.
#[repr(C, align(8))]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C, align(8))]
struct Obj {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

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

/// Attaches `program` to `cgroup` through a link (multi-attach semantics:
/// other programs at the same cgroup keep running).
pub fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach_type as u32,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

fn path_attr(path: &Path) -> io::Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

/// Pins a link (or any bpf object) at `path` on a bpf filesystem.
pub fn pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = path_attr(path)?;
    let mut attr = Obj {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: object.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned bpf object.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c_path = path_attr(path)?;
    let mut attr = Obj {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// `bpf_attr.info` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C, align(8))]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The leading fields of `bpf_link_info` and `bpf_prog_info` that are read.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    kind: u32,
    id: u32,
    tag: [u8; 8],
}

fn info<T: Default>(fd: BorrowedFd<'_>) -> io::Result<T> {
    let mut info = T::default();
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: &mut info as *mut T as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The tag (a hash of the instructions) of a loaded program.
pub fn program_tag(program: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    info::<ProgInfo>(program).map(|i| i.tag)
}

/// A link's id: the same id after a restart means the same attachment.
pub fn link_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    info::<LinkInfo>(link).map(|i| i.id)
}

/// The tag of the program a link runs.
pub fn link_program_tag(link: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let prog_id = info::<LinkInfo>(link)?.prog_id;
    #[repr(C, align(8))]
    struct ById {
        id: u32,
        next_id: u32,
        open_flags: u32,
        token_fd: u32,
    }
    let mut attr = ById {
        id: prog_id,
        next_id: 0,
        open_flags: 0,
        token_fd: 0,
    };
    let program = owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?);
    program_tag(program.as_fd())
}

/// Swaps the program a link runs, atomically: no packet goes uncounted.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C, align(8))]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
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
